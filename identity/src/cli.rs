//! Command-line front ends, as library code the `warden` binary mounts:
//!
//! - `warden ca init|issue|revoke|serve` ([`CaCommand`], [`run_ca`]);
//! - `warden certs` ([`CertsArgs`], [`run_certs`]) reads a running agent's admin endpoint, which
//!   the agent serves from [`certs_snapshot`].

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::{self, CaConfig, CertificateAuthority};
use crate::clock::{Clock, SystemClock, rfc3339, unix_secs};
use crate::identity::{DEFAULT_TRUST_DOMAIN, Identity};
use crate::server::{self, CaService, StaticNodeWorkloads, TokenFileAuthenticator};
use crate::tls::CompliancePolicy;
use crate::workload::{SecretManager, generate_key_and_csr};

/// Default CA directory (Istio's `cacerts` layout).
pub const DEFAULT_CA_DIR: &str = "/etc/warden/cacerts";
/// Default admin endpoint of a running agent for `warden certs`.
pub const DEFAULT_ADMIN_CERTS_URL: &str = "http://127.0.0.1:15000/certs";
/// Timeout of the `warden certs` request.
pub const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Workload certificate file written by `warden ca issue`.
pub const ISSUED_CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Private key file written by `warden ca issue` (mode 0600).
pub const ISSUED_KEY_FILE: &str = "key.pem";
/// Trust bundle file written by `warden ca issue`.
pub const ISSUED_ROOT_FILE: &str = "root-cert.pem";

/// Errors of the CLI front ends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The CA failed.
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    /// The CA server failed.
    #[error(transparent)]
    Server(#[from] server::ServerError),
    /// Writing an output file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Key generation failed.
    #[error("key generation failed: {0}")]
    KeyGen(#[from] rcgen::Error),
    /// The admin endpoint could not be queried.
    #[error("cannot query {url}: {reason}")]
    Admin {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The command line is inconsistent.
    #[error("{0}")]
    Usage(String),
    /// The tokio runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// `warden ca ...`
#[derive(Debug, Clone, clap::Subcommand)]
#[non_exhaustive]
pub enum CaCommand {
    /// Generate a self-signed root CA (ECDSA P-256) in the Istio `cacerts` layout.
    Init {
        /// CA directory.
        #[arg(long, env = "WARDEN_CA_DIR", default_value = DEFAULT_CA_DIR)]
        dir: PathBuf,
        /// Trust domain of the mesh.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Issue a workload certificate: the key is generated here and written with the chain to OUT.
    Issue {
        /// CA directory.
        #[arg(long, env = "WARDEN_CA_DIR", default_value = DEFAULT_CA_DIR)]
        dir: PathBuf,
        /// Trust domain of the CA; identities of other trust domains are refused. Default: the
        /// one the CA's root records (`ca init --trust-domain`), else cluster.local; a value that
        /// differs from the recorded one is an error.
        #[arg(long)]
        trust_domain: Option<String>,
        /// Identity, e.g. spiffe://cluster.local/ns/default/sa/web.
        #[arg(long)]
        spiffe: Identity,
        /// Output directory (cert-chain.pem, key.pem, root-cert.pem), replaced all together.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in hours, at least 1 (clamped to the CA maximum).
        #[arg(long, default_value_t = 24, value_parser = parse_hours)]
        ttl_hours: u64,
    },
    /// Revoke a certificate by serial (hex); rewrites ca-crl.pem, which agents pick up.
    Revoke {
        /// Serial number in hex, as `warden certs` shows it.
        serial: String,
        /// CA directory.
        #[arg(long, env = "WARDEN_CA_DIR", default_value = DEFAULT_CA_DIR)]
        dir: PathBuf,
    },
    /// Serve Istio's CA API (istio.v1.auth.IstioCertificateService) for node agents.
    Serve {
        /// CA directory; a self-signed root is generated there if it holds no CA.
        #[arg(long, env = "WARDEN_CA_DIR", default_value = DEFAULT_CA_DIR)]
        dir: PathBuf,
        /// Trust domain of the mesh.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Listen address.
        #[arg(long, default_value = server::DEFAULT_CA_LISTEN_ADDR)]
        listen: SocketAddr,
        /// Token file: one `<token> <node-name>` per line.
        #[arg(long, required_unless_present_any = ["node_certs", "kubernetes"])]
        token_file: Option<PathBuf>,
        /// Node certificate file: one `<spiffe-id> <node-name>` per line (needs TLS).
        #[arg(long, conflicts_with = "plaintext")]
        node_certs: Option<PathBuf>,
        /// Node workloads file: one `<node-name> <spiffe-id>` per line.
        #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        node_workloads: Option<PathBuf>,
        /// Longest certificate lifetime the CA signs, in hours (at least 1).
        #[arg(long, default_value_t = ca::DEFAULT_MAX_WORKLOAD_CERT_TTL.as_secs() / 3600, value_parser = parse_hours)]
        max_ttl_hours: u64,
        /// Serve plaintext h2c instead of TLS (loopback labs only: tokens travel in the clear).
        #[arg(long)]
        plaintext: bool,
        /// In a Kubernetes cluster (as istiod): node agents authenticate with their
        /// service-account token (TokenReview; the pod it is bound to names the node), and obtain
        /// the identities of the pods scheduled on their node. A generated root is kept in the
        /// Secret `warden-ca-secret` and the root published in the ConfigMap `--root-configmap`.
        /// Implemented by the `warden` binary.
        #[arg(long)]
        kubernetes: bool,
        /// With --kubernetes, outside the cluster: the API server of this kubeconfig.
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// With --kubernetes: the namespace holding the root's Secret and ConfigMap (the CA's own).
        #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_KUBE_NAMESPACE)]
        namespace: String,
        /// With --kubernetes: a `namespace/service-account` whose tokens authenticate node agents
        /// (Istio's CA_TRUSTED_NODE_ACCOUNTS); repeat for several.
        #[arg(long = "trusted-node-account", default_value = DEFAULT_TRUSTED_NODE_ACCOUNT)]
        trusted_node_accounts: Vec<String>,
        /// With --kubernetes: the audience node agents' tokens must be issued for.
        #[arg(long, default_value = DEFAULT_TOKEN_AUDIENCE)]
        token_audience: String,
        /// With --kubernetes: the ConfigMap (in --namespace) the root certificate, and the CRL
        /// when there is one, are published in, for the node agents to mount.
        #[arg(long, default_value = DEFAULT_ROOT_CONFIGMAP)]
        root_configmap: String,
    },
}

const ZERO_HOURS: &str = "a certificate's lifetime must be at least 1 hour";

/// `--ttl-hours`, `--max-ttl-hours`: a whole number of hours, at least 1 (0 would be a
/// certificate that is never valid, not a default).
fn parse_hours(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err(ZERO_HOURS.into()),
        Ok(hours) => Ok(hours),
        Err(_) => Err(format!("{text:?} is not a whole number of hours")),
    }
}

/// `warden ca serve --kubernetes`: the CA's namespace by default.
pub const DEFAULT_KUBE_NAMESPACE: &str = "warden-system";
/// The node agents' service account (`deploy/daemonset.yaml`).
pub const DEFAULT_TRUSTED_NODE_ACCOUNT: &str = "warden-system/warden-agent";
/// The audience of the node agents' projected tokens (Istio's is `istio-ca`).
pub const DEFAULT_TOKEN_AUDIENCE: &str = "warden-ca";
/// The ConfigMap holding the root certificate (Istio's is `istio-ca-root-cert`).
pub const DEFAULT_ROOT_CONFIGMAP: &str = "warden-ca-root-cert";

/// What a caller adds to `warden ca serve`: authentication and authorization it implements
/// itself (the `warden` binary's Kubernetes support).
#[derive(Clone)]
pub struct CaPlugins {
    /// Tried before the token file and node certificates.
    pub authenticator: Arc<dyn server::Authenticator>,
    /// Which identities a node may obtain.
    pub workloads: Arc<dyn server::NodeWorkloads>,
}

/// Runs a `warden ca` subcommand; errors are printed to stderr.
pub fn run_ca(cmd: CaCommand) -> ExitCode {
    let result = match cmd {
        CaCommand::Serve { .. } => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(CliError::Runtime).and_then(|rt| {
                rt.block_on(serve_ca(cmd, None, |addr| println!("warden CA listening on {addr}"), async {
                    let _ = tokio::signal::ctrl_c().await;
                }))
            })
        }
        other => run_ca_offline(other, Arc::new(SystemClock)).map(|out| print!("{out}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `init`, `issue` and `revoke`: returns what to print.
pub fn run_ca_offline(cmd: CaCommand, clock: Arc<dyn Clock>) -> Result<String, CliError> {
    let clock_arc = || clock.clone();
    match cmd {
        CaCommand::Init { dir, trust_domain } => {
            CertificateAuthority::init_self_signed(&dir, &trust_domain, clock.as_ref())?;
            let ca = CertificateAuthority::load(
                &dir,
                CaConfig { trust_domain: trust_domain.clone(), ..CaConfig::default() },
                clock_arc(),
            )?;
            Ok(format!(
                "created root CA for trust domain {trust_domain} in {}\nroot expires {}\n",
                dir.display(),
                rfc3339(ca.ca_not_after())
            ))
        }
        CaCommand::Issue { dir, trust_domain, spiffe, out, ttl_hours } => {
            if ttl_hours == 0 {
                return Err(CliError::Usage(format!("--ttl-hours 0: {ZERO_HOURS}")));
            }
            let ca = load_ca(&dir, trust_domain, clock_arc())?;
            let (key, csr) = generate_key_and_csr(&spiffe)?;
            let issued = ca.sign_csr(&csr, Some(Duration::from_secs(ttl_hours.saturating_mul(3600))))?;
            std::fs::create_dir_all(&out).map_err(|source| CliError::Write { path: out.clone(), source })?;
            let roots: String = ca.roots().iter().map(crate::ca::pem_cert).collect();
            // All three files or none: never a new key next to the previous certificate.
            ca::write_files(
                &out,
                &[
                    (ISSUED_KEY_FILE, key.serialize_pem().as_bytes(), ca::KEY_FILE_MODE),
                    (ISSUED_CERT_CHAIN_FILE, issued.chain_pem.concat().as_bytes(), 0o644),
                    (ISSUED_ROOT_FILE, roots.as_bytes(), 0o644),
                ],
            )
            .map_err(|(path, source)| CliError::Write { path, source })?;
            Ok(format!(
                "issued {}\nserial {}\nnot after {}\nwritten to {}\n",
                issued.identity,
                issued.serial,
                rfc3339(issued.not_after),
                out.display()
            ))
        }
        CaCommand::Revoke { serial, dir } => {
            let ca = load_ca(&dir, None, clock_arc())?;
            let o = ca.revoke(&serial)?;
            // Without an issuance record the CA cannot tell whether it issued the serial; it can
            // tell that it is not the length of the serials it issues (e.g. copied truncated).
            let octets = o.serial.len() / 2;
            let note = if octets == ca::SERIAL_LEN {
                String::new()
            } else {
                format!(
                    "warning: serial {} is {octets} octets; warden issues {}-octet serials ({} hex digits): \
                     check that it is complete\n",
                    o.serial,
                    ca::SERIAL_LEN,
                    2 * ca::SERIAL_LEN
                )
            };
            Ok(format!(
                "{note}{} serial {}; CRL #{} lists {} certificate(s): {}\n",
                if o.already_revoked { "already revoked:" } else { "revoked" },
                o.serial,
                o.crl_number,
                o.revoked_count,
                o.path.display()
            ))
        }
        CaCommand::Serve { .. } => Err(CliError::Usage("serve is not an offline command".into())),
    }
}

/// Loads the CA in `dir` for the trust domain given, by default the one the CA records (else
/// cluster.local); a given one that differs from the recorded one is an error naming both.
fn load_ca(dir: &Path, trust_domain: Option<String>, clock: Arc<dyn Clock>) -> Result<CertificateAuthority, CliError> {
    let trust_domain = match trust_domain {
        Some(td) => td,
        None => CertificateAuthority::recorded_trust_domain(dir)?.unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned()),
    };
    Ok(CertificateAuthority::load(dir, CaConfig { trust_domain, ..CaConfig::default() }, clock)?)
}

/// `warden ca serve` until `shutdown`; `on_listen` receives the bound address. `plugins` (needed
/// with `--kubernetes`) add the caller's authentication and authorization.
pub async fn serve_ca(
    cmd: CaCommand,
    plugins: Option<CaPlugins>,
    on_listen: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CliError> {
    let CaCommand::Serve {
        dir,
        trust_domain,
        listen,
        token_file,
        node_certs,
        node_workloads,
        max_ttl_hours,
        plaintext,
        kubernetes,
        ..
    } = cmd
    else {
        return Err(CliError::Usage("not a serve command".into()));
    };
    if kubernetes != plugins.is_some() {
        return Err(CliError::Usage(if kubernetes {
            "--kubernetes needs the warden binary's Kubernetes support".into()
        } else {
            "authentication plugins are given only with --kubernetes".into()
        }));
    }
    if token_file.is_none() && node_certs.is_none() && plugins.is_none() {
        return Err(CliError::Usage("give --token-file and/or --node-certs, or --kubernetes".into()));
    }
    if plaintext && node_certs.is_some() {
        return Err(CliError::Usage("--node-certs needs TLS; drop --plaintext".into()));
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let config = CaConfig {
        trust_domain,
        max_ttl: Duration::from_secs(max_ttl_hours.saturating_mul(3600)),
        ..CaConfig::default()
    };
    // Validate every input before binding: never serve with a broken CA.
    let ca = Arc::new(CertificateAuthority::load_or_init(&dir, config, clock.clone())?);
    let mut authenticators: Vec<Arc<dyn server::Authenticator>> = Vec::new();
    if let Some(p) = &plugins {
        authenticators.push(p.authenticator.clone());
    }
    if let Some(p) = &node_certs {
        authenticators.push(Arc::new(server::NodeCertAuthenticator::from_file(p)?));
    }
    if let Some(p) = &token_file {
        authenticators.push(Arc::new(TokenFileAuthenticator::from_file(p)?));
    }
    let auth = Arc::new(server::AnyAuthenticator(authenticators));
    let workloads: Arc<dyn server::NodeWorkloads> = match (&plugins, &node_workloads) {
        (Some(p), _) => p.workloads.clone(),
        (None, Some(file)) => Arc::new(StaticNodeWorkloads::from_file(file)?),
        (None, None) => return Err(CliError::Usage("give --node-workloads, or --kubernetes".into())),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = crate::metrics::Metrics::new(&mut registry);
    let service = CaService::new(ca.clone(), auth, workloads, clock.clone(), Some(metrics));
    let tls = if plaintext {
        tracing::warn!("serving the CA in plaintext: bearer tokens are not protected");
        None
    } else {
        let (cfg, mgr) = server::ca_serving_tls(
            &ca,
            clock.clone(),
            CompliancePolicy::from_env().map_err(server::ServerError::from)?,
        )
        .await?;
        mgr.spawn_rotation();
        Some(cfg)
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| server::ServerError::Bind { addr: listen, source })?;
    let addr = listener.local_addr().map_err(|source| server::ServerError::Bind { addr: listen, source })?;
    tracing::info!(%addr, dir = %dir.display(), tls = !plaintext, "serving istio.v1.auth.IstioCertificateService");
    on_listen(addr);
    server::serve(listener, service, tls, shutdown).await?;
    Ok(())
}

/// Output format of `warden certs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum CertsOutput {
    /// A table like `istioctl proxy-config secret`.
    #[default]
    Table,
    /// The agent's JSON as is.
    Json,
}

/// `warden certs`: the certificates of a running agent.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// The agent's admin endpoint.
    #[arg(long, env = "WARDEN_ADMIN_CERTS_URL", default_value = DEFAULT_ADMIN_CERTS_URL)]
    pub admin_url: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = CertsOutput::Table)]
    pub output: CertsOutput,
    /// Show the full chain and trust bundle PEM (table output).
    #[arg(long)]
    pub verbose: bool,
}

/// Runs `warden certs`: fetches the admin endpoint and prints it.
pub async fn run_certs(args: &CertsArgs) -> ExitCode {
    match fetch_certs(&args.admin_url).await {
        Ok(v) => {
            print!("{}", render_certs(&v, args.output, args.verbose));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// GETs `url` (plain HTTP/1.1, as the admin port on loopback speaks) and parses the JSON.
pub async fn fetch_certs(url: &str) -> Result<Value, CliError> {
    let err = |reason: String| CliError::Admin { url: url.to_owned(), reason };
    let uri: hyper::Uri = url.parse().map_err(|e| err(format!("bad URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(err("only http:// admin URLs are supported".into()));
    }
    let host = uri.host().ok_or_else(|| err("URL has no host".into()))?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri.authority().map(ToString::to_string).unwrap_or_else(|| host.clone());
    let path = uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
    let fut = async {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let stream = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| err(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| err(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| err(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.map_err(|e| err(e.to_string()))?.to_bytes();
        if !status.is_success() {
            return Err(err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim())));
        }
        serde_json::from_slice(&body).map_err(|e| err(format!("response is not JSON: {e}")))
    };
    tokio::time::timeout(ADMIN_REQUEST_TIMEOUT, fut).await.map_err(|_| err("timed out".into()))?
}

fn cert_summary(pem: &str) -> Value {
    let Ok(der) =
        <rustls_pki_types::CertificateDer<'_> as rustls_pki_types::pem::PemObject>::from_pem_slice(pem.as_bytes())
    else {
        return json!({ "error": "unparseable PEM" });
    };
    match X509Certificate::from_der(der.as_ref()) {
        Ok((_, x)) => json!({
            "subject": x.subject().to_string(),
            "issuer": x.issuer().to_string(),
            "serial": ca::serial_hex(x.raw_serial()),
            "not_before": rfc3339(SystemTime::from(x.validity().not_before.to_datetime())),
            "not_after": rfc3339(SystemTime::from(x.validity().not_after.to_datetime())),
            "pem": pem,
        }),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// The data behind the agent's `GET /certs` (JSON), which `warden certs` renders.
pub fn certs_snapshot(manager: &SecretManager) -> Value {
    let now = manager.clock().now();
    let bundle = manager.trust_bundle();
    let roots: Vec<Value> = bundle.roots().iter().map(|r| cert_summary(&ca::pem_cert(r))).collect();
    let certificates: Vec<Value> = manager
        .snapshot()
        .into_iter()
        .map(|s| {
            let mut v = json!({
                "identity": s.identity.to_string(),
                "failures": s.failures,
                "last_error": s.last_error,
                "next_attempt": s.next_attempt.map(rfc3339),
            });
            let state = match &s.cert {
                None => "PENDING",
                Some(c) if now > c.not_after => "EXPIRED",
                Some(_) if s.failures > 0 => "RETRYING",
                Some(_) => "VALID",
            };
            v["state"] = json!(state);
            if let Some(c) = &s.cert {
                let until = c.refresh_at.duration_since(now).map(|d| d.as_secs()).unwrap_or(0);
                v["serial"] = json!(c.serial);
                v["issuer"] = json!(c.issuer);
                v["not_before"] = json!(rfc3339(c.not_before));
                v["not_after"] = json!(rfc3339(c.not_after));
                v["not_after_unix"] = json!(unix_secs(c.not_after));
                v["rotation_at"] = json!(rfc3339(c.refresh_at));
                v["seconds_until_rotation"] = json!(until);
                v["chain"] = Value::Array(c.chain_pem.iter().map(|p| cert_summary(p)).collect());
            }
            v
        })
        .collect();
    json!({
        "generated_at": rfc3339(now),
        "trust_domains": bundle.trust_domains(),
        "trust_bundle": roots,
        "crl": bundle.crl_this_update().map(|t| json!({
            "this_update": rfc3339(t),
            "revoked_serials": bundle.revoked_count(),
        })),
        "certificates": certificates,
    })
}

fn human(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// Renders the admin JSON as a table (or pretty JSON).
pub fn render_certs(v: &Value, output: CertsOutput, verbose: bool) -> String {
    if output == CertsOutput::Json {
        return format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default());
    }
    let s = |x: &Value| x.as_str().unwrap_or("-").to_owned();
    let mut rows = vec![[
        "IDENTITY".to_owned(),
        "STATE".into(),
        "SERIAL".into(),
        "ISSUER".into(),
        "NOT BEFORE".into(),
        "NOT AFTER".into(),
        "ROTATES IN".into(),
    ]];
    for c in v["certificates"].as_array().into_iter().flatten() {
        rows.push([
            s(&c["identity"]),
            s(&c["state"]),
            s(&c["serial"]),
            s(&c["issuer"]),
            s(&c["not_before"]),
            s(&c["not_after"]),
            c["seconds_until_rotation"].as_u64().map(human).unwrap_or_else(|| "-".into()),
        ]);
    }
    for r in v["trust_bundle"].as_array().into_iter().flatten() {
        rows.push([
            "ROOTCA".into(),
            "TRUSTED".into(),
            s(&r["serial"]),
            s(&r["issuer"]),
            s(&r["not_before"]),
            s(&r["not_after"]),
            "-".into(),
        ]);
    }
    let widths: Vec<usize> = (0..7).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("   ").trim_end());
    }
    if let Some(crl) = v["crl"].as_object() {
        let _ = writeln!(
            out,
            "\nCRL: this update {}, {} revoked serial(s)",
            crl.get("this_update").and_then(Value::as_str).unwrap_or("-"),
            crl.get("revoked_serials").and_then(Value::as_u64).unwrap_or(0)
        );
    }
    for c in v["certificates"].as_array().into_iter().flatten() {
        if let Some(e) = c["last_error"].as_str() {
            let _ = writeln!(out, "\n{}: last CA error ({} failure(s)): {e}", s(&c["identity"]), c["failures"]);
        }
        if verbose {
            let _ = writeln!(out, "\n{} chain:", s(&c["identity"]));
            for (i, link) in c["chain"].as_array().into_iter().flatten().enumerate() {
                let _ = writeln!(
                    out,
                    "  [{i}] subject={} issuer={} serial={} not_after={}",
                    s(&link["subject"]),
                    s(&link["issuer"]),
                    s(&link["serial"]),
                    s(&link["not_after"])
                );
                let _ = write!(out, "{}", s(&link["pem"]));
            }
        }
    }
    if verbose {
        let _ = writeln!(out, "\ntrust bundle:");
        for r in v["trust_bundle"].as_array().into_iter().flatten() {
            let _ = write!(out, "{}", s(&r["pem"]));
        }
    }
    out
}

#[cfg(test)]
mod tests;
