//! The secret manager: one certificate per workload identity on this node, kept fresh.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::client::{CaClient, CaClientError};
use super::keys::generate_key_and_csr;
use crate::ca::{DEFAULT_WORKLOAD_CERT_TTL, serial_hex};
use crate::clock::{Clock, rfc3339};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::tls::{self, CertSlot, CompliancePolicy, SpiffeVerifier, TlsError, TrustBundle, VerifyError};

/// Fraction of the lifetime after which a certificate is renewed (Istio: half).
pub const DEFAULT_ROTATION_FRACTION: f64 = 0.5;
/// Largest random advance of the renewal time, as a fraction of the lifetime.
pub const DEFAULT_ROTATION_JITTER: f64 = 0.05;
/// First retry delay after a failed CA request.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Cap of the exponential retry delay.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The rotation loop wakes at least this often (to notice new identities and clock jumps).
const MAX_ROTATION_SLEEP: Duration = Duration::from_secs(30);

/// Errors of the secret manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The CA did not issue a certificate.
    #[error("cannot obtain a certificate for {identity}: {source}")]
    Ca {
        /// The identity.
        identity: Identity,
        /// The CA's error.
        source: Box<CaClientError>,
    },
    /// Key or CSR generation failed.
    #[error("cannot generate a key/CSR for {identity}: {source}")]
    KeyGen {
        /// The identity.
        identity: Identity,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// The CA returned something that is not a certificate for the requested identity.
    #[error("CA returned an unusable certificate for {identity}: {reason}")]
    BadCertificate {
        /// The identity.
        identity: Identity,
        /// Why.
        reason: String,
    },
    /// Building a TLS config failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Rotation settings; every knob has a named default.
#[derive(Debug, Clone)]
pub struct SecretManagerConfig {
    /// TTL requested from the CA.
    pub cert_ttl: Duration,
    /// Renew after this fraction of the lifetime (0 < f <= 1).
    pub rotation_fraction: f64,
    /// Renew up to this fraction of the lifetime earlier, at random (0 disables jitter).
    pub rotation_jitter: f64,
    /// First retry delay after a CA failure.
    pub initial_backoff: Duration,
    /// Cap of the retry delay.
    pub max_backoff: Duration,
}

impl Default for SecretManagerConfig {
    fn default() -> Self {
        Self {
            cert_ttl: DEFAULT_WORKLOAD_CERT_TTL,
            rotation_fraction: DEFAULT_ROTATION_FRACTION,
            rotation_jitter: DEFAULT_ROTATION_JITTER,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

/// A workload certificate held by the agent.
#[derive(Clone)]
pub struct WorkloadCert {
    /// Identity in the certificate.
    pub identity: Identity,
    /// Serial, lower-case hex.
    pub serial: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// When the manager renews it.
    pub refresh_at: SystemTime,
    /// PEM chain as returned by the CA, leaf first.
    pub chain_pem: Vec<String>,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &rfc3339(self.not_after))
            .field("refresh_at", &rfc3339(self.refresh_at))
            .finish()
    }
}

#[derive(Debug, Default, Clone)]
struct RetryState {
    failures: u32,
    next_attempt: Option<SystemTime>,
    last_error: Option<String>,
}

struct Entry {
    slot: Arc<CertSlot>,
    current: ArcSwapOption<WorkloadCert>,
    retry: Mutex<RetryState>,
    /// Serialises issuance per identity (fetch racing the rotation loop).
    issuing: tokio::sync::Mutex<()>,
}

/// Status of one identity, for `warden certs`.
#[derive(Debug, Clone)]
pub struct CertStatus {
    /// The identity.
    pub identity: Identity,
    /// Current certificate, if any.
    pub cert: Option<Arc<WorkloadCert>>,
    /// Consecutive failed attempts.
    pub failures: u32,
    /// Next retry after a failure.
    pub next_attempt: Option<SystemTime>,
    /// Last CA error.
    pub last_error: Option<String>,
}

/// Outcome of one rotation pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RotationReport {
    /// Identities that received a new certificate.
    pub rotated: Vec<Identity>,
    /// Identities whose attempt failed (current certificate kept while valid).
    pub failed: Vec<Identity>,
    /// Identities whose certificate expired and was withdrawn.
    pub expired: Vec<Identity>,
}

struct Inner {
    ca: Arc<dyn CaClient>,
    trust: Arc<TrustBundle>,
    clock: Arc<dyn Clock>,
    config: SecretManagerConfig,
    metrics: Option<Metrics>,
    entries: RwLock<HashMap<Identity, Arc<Entry>>>,
    wake: tokio::sync::Notify,
}

/// Holds and rotates the certificates of the workloads on this node. Cheap to clone.
#[derive(Clone)]
pub struct SecretManager {
    inner: Arc<Inner>,
}

impl fmt::Debug for SecretManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretManager").field("identities", &self.identities()).finish()
    }
}

impl SecretManager {
    /// A manager obtaining certificates from `ca`, verifying peers against `trust`.
    pub fn new(
        ca: Arc<dyn CaClient>,
        trust: Arc<TrustBundle>,
        clock: Arc<dyn Clock>,
        config: SecretManagerConfig,
        metrics: Option<Metrics>,
    ) -> Self {
        if let Some(m) = &metrics {
            m.observe_crl(trust.clone(), clock.clone());
        }
        Self {
            inner: Arc::new(Inner {
                ca,
                trust,
                clock,
                config,
                metrics,
                entries: RwLock::new(HashMap::new()),
                wake: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The trust bundle peers are verified against.
    pub fn trust_bundle(&self) -> &Arc<TrustBundle> {
        &self.inner.trust
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    fn entry(&self, id: &Identity) -> Arc<Entry> {
        if let Some(e) = self.inner.entries.read().unwrap_or_else(|e| e.into_inner()).get(id) {
            return e.clone();
        }
        let mut map = self.inner.entries.write().unwrap_or_else(|e| e.into_inner());
        map.entry(id.clone())
            .or_insert_with(|| {
                Arc::new(Entry {
                    slot: Arc::new(CertSlot::new(self.inner.clock.clone())),
                    current: ArcSwapOption::empty(),
                    retry: Mutex::new(RetryState::default()),
                    issuing: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// Identities currently managed.
    pub fn identities(&self) -> Vec<Identity> {
        let mut v: Vec<_> = self.inner.entries.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        v.sort();
        v
    }

    /// Starts managing `id` and returns its certificate, requesting one now if there is none or
    /// the current one is due. On CA failure a still-valid current certificate is returned.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, SecretError> {
        let entry = self.entry(id);
        let now = self.inner.clock.now();
        if let Some(cur) = entry.current.load_full()
            && now < cur.refresh_at
        {
            return Ok(cur);
        }
        match self.renew(id, &entry).await {
            Ok(cert) => Ok(cert),
            Err(e) => match entry.current.load_full() {
                Some(cur) if now < cur.not_after => Ok(cur),
                _ => Err(e),
            },
        }
    }

    /// The serial of the certificate `id` presents now, if it has one (never registers `id`, never
    /// waits). Changes exactly when the certificate is rotated or replaced.
    pub fn current_serial(&self, id: &Identity) -> Option<String> {
        let entries = self.inner.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.get(id)?.current.load().as_ref().map(|c| c.serial.clone())
    }

    /// The swappable certificate of `id` (registers the identity; the rotation loop fills it).
    pub fn cert_slot(&self, id: &Identity) -> Arc<CertSlot> {
        let e = self.entry(id);
        self.inner.wake.notify_one();
        e.slot.clone()
    }

    /// Stops managing `id` (its workload left the node).
    pub fn forget(&self, id: &Identity) {
        if self.inner.entries.write().unwrap_or_else(|e| e.into_inner()).remove(id).is_some()
            && let Some(m) = &self.inner.metrics
        {
            m.cert_removed(id);
        }
    }

    /// Server config presenting `id`'s certificate and requiring SPIFFE client certificates.
    /// Rotation of `id` applies to the next handshake without rebuilding the config.
    pub fn server_config(&self, id: &Identity, policy: CompliancePolicy) -> Result<Arc<ServerConfig>, SecretError> {
        let verifier = Arc::new(SpiffeVerifier::new(self.inner.trust.clone(), self.inner.clock.clone()));
        Ok(Arc::new(tls::server_config(policy, verifier, self.cert_slot(id))?))
    }

    /// Client config presenting `id`'s certificate; the server must be one of `expected_peers`
    /// (empty: any identity of the trusted trust domains).
    pub fn client_config(
        &self,
        id: &Identity,
        policy: CompliancePolicy,
        expected_peers: Vec<Identity>,
    ) -> Result<Arc<ClientConfig>, SecretError> {
        let mut verifier = SpiffeVerifier::new(self.inner.trust.clone(), self.inner.clock.clone());
        if !expected_peers.is_empty() {
            verifier = verifier.expecting(expected_peers);
        }
        Ok(Arc::new(tls::client_config(policy, Arc::new(verifier), self.cert_slot(id))?))
    }

    /// One rotation pass at the clock's current time: renews every due certificate whose backoff
    /// has elapsed and withdraws expired ones.
    pub async fn rotate_due(&self) -> RotationReport {
        let mut report = RotationReport::default();
        let entries: Vec<(Identity, Arc<Entry>)> = self
            .inner
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, entry) in entries {
            let now = self.inner.clock.now();
            let cur = entry.current.load_full();
            let due = cur.as_ref().is_none_or(|c| now >= c.refresh_at);
            let backing_off =
                entry.retry.lock().unwrap_or_else(|e| e.into_inner()).next_attempt.is_some_and(|t| now < t);
            if due && !backing_off {
                match self.renew(&id, &entry).await {
                    Ok(_) => report.rotated.push(id.clone()),
                    Err(e) => {
                        tracing::warn!(identity = %id, error = %e, "certificate rotation failed; keeping the current certificate while valid");
                        report.failed.push(id.clone());
                    }
                }
            }
            if let Some(cur) = entry.current.load_full()
                && self.inner.clock.now() > cur.not_after
            {
                tracing::error!(identity = %id, serial = %cur.serial, "certificate expired without renewal; withdrawn");
                entry.current.store(None);
                entry.slot.clear();
                if let Some(m) = &self.inner.metrics {
                    m.cert_removed(&id);
                }
                report.expired.push(id);
            }
        }
        report
    }

    /// The earliest time the rotation loop has work to do.
    pub fn next_due(&self) -> Option<SystemTime> {
        let map = self.inner.entries.read().unwrap_or_else(|e| e.into_inner());
        map.values()
            .map(|e| {
                let retry = e.retry.lock().unwrap_or_else(|e| e.into_inner()).next_attempt;
                let refresh = e.current.load().as_ref().map(|c| c.refresh_at.min(c.not_after));
                match (refresh, retry) {
                    (Some(r), Some(t)) => r.max(t),
                    (Some(r), None) => r,
                    (None, Some(t)) => t,
                    (None, None) => SystemTime::UNIX_EPOCH,
                }
            })
            .min()
    }

    /// Runs [`rotate_due`](Self::rotate_due) forever on the tokio runtime, sleeping until the next
    /// certificate is due (at most 30 s, woken early when an identity is added).
    pub fn spawn_rotation(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let report = this.rotate_due().await;
                if !report.rotated.is_empty() {
                    tracing::info!(count = report.rotated.len(), "rotated workload certificates");
                }
                let now = this.inner.clock.now();
                let sleep = this
                    .next_due()
                    .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
                    .unwrap_or(MAX_ROTATION_SLEEP)
                    .clamp(Duration::from_millis(100), MAX_ROTATION_SLEEP);
                tokio::select! {
                    () = tokio::time::sleep(sleep) => {}
                    () = this.inner.wake.notified() => {}
                }
            }
        })
    }

    /// Status of every identity, sorted.
    pub fn snapshot(&self) -> Vec<CertStatus> {
        let map = self.inner.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<CertStatus> = map
            .iter()
            .map(|(id, e)| {
                let r = e.retry.lock().unwrap_or_else(|e| e.into_inner()).clone();
                CertStatus {
                    identity: id.clone(),
                    cert: e.current.load_full(),
                    failures: r.failures,
                    next_attempt: r.next_attempt,
                    last_error: r.last_error,
                }
            })
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    async fn renew(&self, id: &Identity, entry: &Entry) -> Result<Arc<WorkloadCert>, SecretError> {
        let _guard = entry.issuing.lock().await;
        // Someone else may have renewed while we waited.
        if let Some(cur) = entry.current.load_full()
            && self.inner.clock.now() < cur.refresh_at
        {
            return Ok(cur);
        }
        match self.issue(id).await {
            Ok((cert, key)) => {
                entry.slot.store(key, cert.not_after);
                let cert = Arc::new(cert);
                entry.current.store(Some(cert.clone()));
                *entry.retry.lock().unwrap_or_else(|e| e.into_inner()) = RetryState::default();
                if let Some(m) = &self.inner.metrics {
                    m.cert_installed(id, cert.not_after);
                }
                tracing::info!(identity = %id, serial = %cert.serial, not_after = %rfc3339(cert.not_after),
                    refresh_at = %rfc3339(cert.refresh_at), "installed workload certificate");
                Ok(cert)
            }
            Err(e) => {
                let mut r = entry.retry.lock().unwrap_or_else(|e| e.into_inner());
                r.failures = r.failures.saturating_add(1);
                let backoff = self.backoff(r.failures);
                r.next_attempt = Some(self.inner.clock.now() + backoff);
                r.last_error = Some(e.to_string());
                if let Some(m) = &self.inner.metrics {
                    m.rotation_failed(id);
                }
                Err(e)
            }
        }
    }

    /// Delay after the `failures`-th consecutive failure: initial * 2^(failures-1), capped.
    pub fn backoff(&self, failures: u32) -> Duration {
        let c = &self.inner.config;
        let exp = failures.saturating_sub(1).min(31);
        c.initial_backoff.saturating_mul(1u32 << exp).min(c.max_backoff)
    }

    async fn issue(&self, id: &Identity) -> Result<(WorkloadCert, Arc<rustls::sign::CertifiedKey>), SecretError> {
        let (key, csr) =
            generate_key_and_csr(id).map_err(|source| SecretError::KeyGen { identity: id.clone(), source })?;
        let chain = self
            .inner
            .ca
            .sign(id, &csr, self.inner.config.cert_ttl)
            .await
            .map_err(|source| SecretError::Ca { identity: id.clone(), source: Box::new(source) })?;
        let bad = |reason: String| SecretError::BadCertificate { identity: id.clone(), reason };
        let leaf = CertificateDer::from_pem_slice(chain[0].as_bytes()).map_err(|e| bad(e.to_string()))?;
        let got = tls::spiffe_identity(&leaf).map_err(|e: VerifyError| bad(e.to_string()))?;
        if &got != id {
            return Err(bad(format!("certificate is for {got}")));
        }
        let (_, x) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| bad(e.to_string()))?;
        let not_before = SystemTime::from(x.validity().not_before.to_datetime());
        let not_after = SystemTime::from(x.validity().not_after.to_datetime());
        let ck = tls::certified_key(&chain, key.serialize_der())?;
        let cert = WorkloadCert {
            identity: id.clone(),
            serial: serial_hex(x.raw_serial()),
            issuer: x.issuer().to_string(),
            not_before,
            not_after,
            refresh_at: self.refresh_at(not_before, not_after),
            chain_pem: chain,
        };
        Ok((cert, Arc::new(ck)))
    }

    fn refresh_at(&self, not_before: SystemTime, not_after: SystemTime) -> SystemTime {
        let c = &self.inner.config;
        let lifetime = not_after.duration_since(not_before).unwrap_or(Duration::ZERO);
        let fraction = c.rotation_fraction.clamp(0.0, 1.0);
        let jitter = c.rotation_jitter.clamp(0.0, fraction) * rand::random::<f64>();
        not_before + lifetime.mul_f64(fraction - jitter)
    }
}
