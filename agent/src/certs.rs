//! Workload certificates on the node: the agent holds a SPIFFE certificate for every identity of
//! its local workloads, obtained from the CA and rotated by `warden-identity`'s secret manager,
//! and shows them on the admin endpoint (`GET /certs`, read by `warden certs`).
//!
//! The CA is either in-process (`--ca-dir`: a single-node lab; a broken CA directory stops the
//! agent) or Istio's CA API over TLS (`--ca-addr` with `--ca-root-cert` and `--ca-token-file`).

use std::{collections::BTreeSet, path::PathBuf, sync::Arc, time::Duration};

use crate::telemetry::server::{Handler, Reply, serve};
use warden_identity::{
    Identity,
    ca::{CLOCK_SKEW_ALLOWANCE, CRL_FILE, CaConfig, CertificateAuthority, DEFAULT_WORKLOAD_CERT_TTL, ROOT_CERT_FILE},
    clock::{Clock, SystemClock},
    metrics::Metrics,
    server::ca_server_identity,
    tls::{DEFAULT_TRUST_RELOAD_INTERVAL, SpiffeVerifier, TrustBundle},
    workload::{CaClient, GrpcCaClient, LocalCaClient, SecretManager, SecretManagerConfig},
};

/// `warden agent`'s certificate settings.
#[derive(Clone, Debug)]
pub struct CertsConfig {
    pub source: CaSource,
    /// The admin endpoint serving `GET /certs` (default `127.0.0.1:15000`: local only).
    pub admin_addr: std::net::SocketAddr,
    /// The lifetime requested for workload certificates (`--workload-cert-ttl`, Istio's
    /// `SECRET_TTL`); each is renewed at half of it (see [`parse_ttl`]).
    pub cert_ttl: Duration,
}

/// The shortest `--workload-cert-ttl`: a certificate's lifetime starts [`CLOCK_SKEW_ALLOWANCE`]
/// before it is issued, and it is renewed at half its lifetime, so a TTL `T` is renewed
/// `(T - 60 s) / 2` after issuance; below this it would be due again at once.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(CLOCK_SKEW_ALLOWANCE.as_secs() + 10);

/// `--workload-cert-ttl`: a number with a unit, `s`, `m` or `h` (`90s`, `30m`, `24h`), at least
/// [`MIN_CERT_TTL`].
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let unit = |u: &str| match u {
        "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        _ => None,
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (n, u) = text.split_at(split);
    let secs = match (n.parse::<u64>(), unit(u)) {
        (Ok(n), Some(u)) => n.saturating_mul(u),
        _ => return Err(format!("{text:?} is not a duration: a number and s, m or h (90s, 30m, 24h)")),
    };
    let ttl = Duration::from_secs(secs);
    if ttl < MIN_CERT_TTL {
        return Err(format!(
            "{text:?} is too short: at least {}s (a certificate's lifetime starts {}s before issuance and it \
             is renewed at half of it)",
            MIN_CERT_TTL.as_secs(),
            CLOCK_SKEW_ALLOWANCE.as_secs()
        ));
    }
    Ok(ttl)
}

/// [`CertsConfig::cert_ttl`]'s default, as text for the flag.
pub const DEFAULT_CERT_TTL: &str = "24h";
const _: () = assert!(DEFAULT_WORKLOAD_CERT_TTL.as_secs() == 24 * 3600, "DEFAULT_CERT_TTL says 24h");

/// Where certificates come from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// An in-process CA in this directory (Istio `cacerts` layout; a root is generated if empty).
    Local { dir: PathBuf },
    /// Istio's CA API at `url`, verified against `root_cert`, authenticated with the token file.
    Remote { url: String, root_cert: PathBuf, token_file: Option<PathBuf> },
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("the CA in {dir}: {source}")]
    Ca { dir: PathBuf, source: warden_identity::ca::CaError },
    #[error("trust bundle {path}: {reason}")]
    Trust { path: PathBuf, reason: String },
    #[error("reading the CA token file {path}: {source}")]
    Token { path: PathBuf, source: std::io::Error },
    #[error("CA client for {url}: {reason}")]
    Client { url: String, reason: String },
    #[error("{0}")]
    Identity(String),
    #[error("admin endpoint {addr}: {reason}")]
    Admin { addr: std::net::SocketAddr, reason: String },
}

/// The node's workload certificates.
pub struct WorkloadCerts {
    secrets: SecretManager,
    trust_domain: String,
    managed: std::sync::Mutex<BTreeSet<Identity>>,
}

impl WorkloadCerts {
    /// Start the secret manager (and its rotation loop) on `source`, with 24 h certificates.
    pub fn start(source: &CaSource, trust_domain: &str, metrics: Option<Metrics>) -> Result<WorkloadCerts, CertsError> {
        Self::start_with_ttl(source, trust_domain, metrics, DEFAULT_WORKLOAD_CERT_TTL)
    }

    /// [`WorkloadCerts::start`], requesting `cert_ttl`.
    pub fn start_with_ttl(
        source: &CaSource,
        trust_domain: &str,
        metrics: Option<Metrics>,
        cert_ttl: Duration,
    ) -> Result<WorkloadCerts, CertsError> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let td = vec![trust_domain.to_string()];
        let (ca, bundle): (Arc<dyn CaClient>, Arc<TrustBundle>) = match source {
            CaSource::Local { dir } => {
                let config = CaConfig { trust_domain: trust_domain.to_string(), ..CaConfig::default() };
                let ca = CertificateAuthority::load_or_init(dir, config, clock.clone())
                    .map_err(|source| CertsError::Ca { dir: dir.clone(), source })?;
                // Peers are verified against the CA directory's files, watched, so a root
                // rotation or a `warden ca revoke` applies without a restart.
                let (root, crl) = (dir.join(ROOT_CERT_FILE), dir.join(CRL_FILE));
                let bundle = Arc::new(
                    TrustBundle::from_files(&root, crl.exists().then_some(crl.as_path()), td)
                        .map_err(|e| CertsError::Trust { path: root.clone(), reason: e.to_string() })?,
                );
                bundle.clone().spawn_file_watcher(root, Some(crl), DEFAULT_TRUST_RELOAD_INTERVAL);
                (Arc::new(LocalCaClient(Arc::new(ca))), bundle)
            }
            CaSource::Remote { url, root_cert, token_file } => {
                // The CRL, when the CA publishes one, next to the root (both keys of the CA's
                // root ConfigMap in a cluster); both are watched.
                let crl = root_cert.with_file_name(CRL_FILE);
                let bundle = Arc::new(
                    TrustBundle::from_files(root_cert, crl.exists().then_some(crl.as_path()), td)
                        .map_err(|e| CertsError::Trust { path: root_cert.clone(), reason: e.to_string() })?,
                );
                bundle.clone().spawn_file_watcher(root_cert.clone(), Some(crl), DEFAULT_TRUST_RELOAD_INTERVAL);
                let ca_id = ca_server_identity(trust_domain).map_err(|e| CertsError::Identity(e.to_string()))?;
                let verifier = Arc::new(SpiffeVerifier::new(bundle.clone(), clock.clone()).expecting(vec![ca_id]));
                let client = GrpcCaClient::new_tls(url, None, verifier)
                    .map_err(|e| CertsError::Client { url: url.clone(), reason: e.to_string() })?;
                // Read before every request: a projected service-account token is replaced by the
                // kubelet before it expires. It must be readable now (a typo stops the agent).
                let client = match token_file {
                    Some(p) => {
                        std::fs::read(p).map_err(|source| CertsError::Token { path: p.clone(), source })?;
                        client.with_token_file(p)
                    }
                    None => client,
                };
                (Arc::new(client), bundle)
            }
        };
        let config = SecretManagerConfig { cert_ttl, ..SecretManagerConfig::default() };
        let secrets = SecretManager::new(ca, bundle, clock, config, metrics);
        secrets.spawn_rotation();
        Ok(WorkloadCerts { secrets, trust_domain: trust_domain.to_string(), managed: Default::default() })
    }

    /// Start the manager and serve `GET /certs` on the admin address.
    pub fn serve(
        cfg: &CertsConfig,
        trust_domain: &str,
        metrics: Option<Metrics>,
    ) -> Result<Arc<WorkloadCerts>, CertsError> {
        let certs = Arc::new(WorkloadCerts::start_with_ttl(&cfg.source, trust_domain, metrics, cfg.cert_ttl)?);
        let listener = std::net::TcpListener::bind(cfg.admin_addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| CertsError::Admin { addr: cfg.admin_addr, reason: e.to_string() })?;
        let c = certs.clone();
        let handler: Handler = Arc::new(move |path: &str| match path {
            "/certs" => Reply { status: 200, content_type: "application/json", body: c.snapshot_json() },
            other => Reply::not_found(other),
        });
        tokio::spawn(serve(listener, handler));
        tracing::info!(addr = %cfg.admin_addr, "admin endpoint: GET /certs");
        Ok(certs)
    }

    /// Manage the identities of the local workloads among `workloads`.
    pub async fn sync_workloads(&self, workloads: &[crate::workloads::Workload]) {
        self.sync(
            workloads.iter().filter(|w| w.local.is_some()).map(|w| (w.namespace.clone(), w.service_account.clone())),
        )
        .await
    }

    /// Manage exactly the identities of `workloads` (namespace, service account): new ones are
    /// issued a certificate, departed ones are forgotten.
    pub async fn sync(&self, workloads: impl IntoIterator<Item = (String, String)>) {
        let mut wanted = BTreeSet::new();
        for (ns, sa) in workloads {
            match Identity::spiffe(&self.trust_domain, &ns, &sa) {
                Ok(id) => {
                    wanted.insert(id);
                }
                Err(e) => tracing::error!(namespace = %ns, service_account = %sa, "no SPIFFE identity: {e}"),
            }
        }
        let (added, removed): (Vec<Identity>, Vec<Identity>) = {
            let mut managed = self.managed.lock().unwrap_or_else(|e| e.into_inner());
            let added = wanted.difference(&managed).cloned().collect();
            let removed = managed.difference(&wanted).cloned().collect();
            *managed = wanted;
            (added, removed)
        };
        for id in removed {
            self.secrets.forget(&id);
            tracing::info!(identity = %id, "certificate released");
        }
        for id in added {
            // A CA failure is retried by the rotation loop with backoff; the identity stays managed.
            match self.secrets.fetch(&id).await {
                Ok(c) => tracing::info!(identity = %id, "certificate issued, valid until {:?}", c.not_after),
                Err(e) => tracing::warn!(identity = %id, "certificate not issued yet (retrying): {e}"),
            }
        }
    }

    /// The secret manager (the mesh's TLS configurations come from it).
    pub fn secrets(&self) -> &SecretManager {
        &self.secrets
    }

    /// `GET /certs`: what `warden certs` shows.
    pub fn snapshot_json(&self) -> String {
        serde_json::to_string_pretty(&warden_identity::cli::certs_snapshot(&self.secrets)).expect("snapshot serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ttl_is_a_number_and_a_unit_and_long_enough_to_rotate() {
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1_800)));
        assert_eq!(parse_ttl("80s"), Ok(Duration::from_secs(80)));
        assert_eq!(parse_ttl(DEFAULT_CERT_TTL), Ok(DEFAULT_WORKLOAD_CERT_TTL));
        for bad in ["", "24", "h", "1d", "-5s", "1.5h", "5 m"] {
            assert!(parse_ttl(bad).unwrap_err().contains("is not a duration"), "{bad}");
        }
        assert!(parse_ttl("60s").unwrap_err().contains("too short"));
    }
}
