//! Identity metrics (prometheus-client), registered under the `warden_identity_` prefix.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `warden_identity_cert_expiration_timestamp_seconds` | gauge | `identity` |
//! | `warden_identity_cert_rotations_total` | counter | `identity` |
//! | `warden_identity_cert_rotation_failures_total` | counter | `identity` |
//! | `warden_identity_ca_issuances_total` | counter | `result` |
//! | `warden_identity_ca_issuance_duration_seconds` | histogram | |
//! | `warden_identity_crl_age_seconds` | gauge (absent without CRL) | |
//!
//! Alert on a certificate expiring within a week:
//! `(warden_identity_cert_expiration_timestamp_seconds - time()) / 86400 < 7`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::clock::{Clock, unix_secs};
use crate::identity::Identity;
use crate::tls::TrustBundle;

/// Prefix of every metric of this crate.
pub const METRIC_PREFIX: &str = "warden_identity";
/// Issuance latency buckets: 100 µs doubling up to ~1.6 s.
const ISSUANCE_BUCKETS: (f64, f64, u16) = (0.0001, 2.0, 15);

/// `identity` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabel {
    /// SPIFFE ID.
    pub identity: String,
}

/// `result` label of CA issuances.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `issued`, `unauthenticated`, `denied`, `invalid`, `rate_limited` or `error`.
    pub result: String,
}

type CrlSource = Arc<Mutex<Option<(Arc<TrustBundle>, Arc<dyn Clock>)>>>;

/// All identity metrics. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    cert_expiry: Family<IdentityLabel, Gauge>,
    rotations: Family<IdentityLabel, Counter>,
    rotation_failures: Family<IdentityLabel, Counter>,
    issuances: Family<ResultLabel, Counter>,
    issuance_latency: Histogram,
    crl_source: CrlSource,
}

#[derive(Debug)]
struct CrlAge(CrlSource);

impl Collector for CrlAge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some((bundle, clock)) = guard.as_ref() else {
            return Ok(());
        };
        let Some(this_update) = bundle.crl_this_update() else {
            return Ok(());
        };
        let age = clock.now().duration_since(this_update).unwrap_or(Duration::ZERO).as_secs();
        let gauge = ConstGauge::new(i64::try_from(age).unwrap_or(i64::MAX));
        let m = encoder.encode_descriptor(
            "crl_age_seconds",
            "Seconds since thisUpdate of the newest CRL the trust bundle enforces",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(m)
    }
}

impl Metrics {
    /// Creates the metrics and registers them in `registry` under [`METRIC_PREFIX`].
    pub fn new(registry: &mut Registry) -> Self {
        let (start, factor, len) = ISSUANCE_BUCKETS;
        let m = Self {
            cert_expiry: Family::default(),
            rotations: Family::default(),
            rotation_failures: Family::default(),
            issuances: Family::default(),
            issuance_latency: Histogram::new(exponential_buckets(start, factor, len)),
            crl_source: Arc::new(Mutex::new(None)),
        };
        let r = registry.sub_registry_with_prefix(METRIC_PREFIX);
        r.register(
            "cert_expiration_timestamp_seconds",
            "notAfter of the current workload certificate, seconds since the Unix epoch",
            m.cert_expiry.clone(),
        );
        r.register("cert_rotations", "Workload certificates obtained (first issue and rotations)", m.rotations.clone());
        r.register(
            "cert_rotation_failures",
            "Failed attempts to obtain or rotate a workload certificate",
            m.rotation_failures.clone(),
        );
        r.register("ca_issuances", "Certificate requests handled by the CA, by result", m.issuances.clone());
        r.register(
            "ca_issuance_duration_seconds",
            "Time to authenticate, authorise and sign a certificate request",
            m.issuance_latency.clone(),
        );
        r.register_collector(Box::new(CrlAge(m.crl_source.clone())));
        m
    }

    /// Reports the age of the CRLs of `bundle` as `crl_age_seconds`.
    pub fn observe_crl(&self, bundle: Arc<TrustBundle>, clock: Arc<dyn Clock>) {
        *self.crl_source.lock().unwrap_or_else(|e| e.into_inner()) = Some((bundle, clock));
    }

    pub(crate) fn cert_installed(&self, identity: &Identity, not_after: SystemTime) {
        let l = IdentityLabel { identity: identity.to_string() };
        self.cert_expiry.get_or_create(&l).set(unix_secs(not_after));
        self.rotations.get_or_create(&l).inc();
    }

    pub(crate) fn cert_removed(&self, identity: &Identity) {
        self.cert_expiry.remove(&IdentityLabel { identity: identity.to_string() });
    }

    pub(crate) fn rotation_failed(&self, identity: &Identity) {
        self.rotation_failures.get_or_create(&IdentityLabel { identity: identity.to_string() }).inc();
    }

    pub(crate) fn issuance(&self, result: &str, elapsed: Duration) {
        self.issuances.get_or_create(&ResultLabel { result: result.to_owned() }).inc();
        self.issuance_latency.observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn render(r: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, r).unwrap();
        s
    }

    #[test]
    fn expiry_gauge_is_seconds_since_epoch_and_crl_age_follows_the_clock() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let id = Identity::spiffe("cluster.local", "ns", "sa").unwrap();
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        m.cert_installed(&id, not_after);
        m.rotation_failed(&id);
        m.issuance("issued", Duration::from_millis(2));
        let text = render(&registry);
        assert!(text.contains(
            "warden_identity_cert_expiration_timestamp_seconds{identity=\"spiffe://cluster.local/ns/ns/sa/sa\"} 1900000000"
        ), "{text}");
        assert!(
            text.contains(
                "warden_identity_cert_rotation_failures_total{identity=\"spiffe://cluster.local/ns/ns/sa/sa\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("warden_identity_ca_issuances_total{result=\"issued\"} 1"), "{text}");
        assert!(text.contains("warden_identity_ca_issuance_duration_seconds_count 1"), "{text}");
        assert!(!text.contains("crl_age_seconds"), "no CRL, no age: {text}");

        // A CRL issued "now", observed an hour later.
        let clock = Arc::new(ManualClock::starting_now());
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::CertificateAuthority::load_or_init(dir.path(), Default::default(), clock.clone()).unwrap();
        ca.revoke("01").unwrap();
        let bundle = Arc::new(TrustBundle::new(ca.roots().to_vec(), vec!["cluster.local".into()]).unwrap());
        bundle.set_crls(vec![ca.crl().unwrap()]).unwrap();
        m.observe_crl(bundle, clock.clone());
        clock.advance(Duration::from_secs(3600));
        let text = render(&registry);
        assert!(text.contains("warden_identity_crl_age_seconds 3600"), "{text}");
        m.cert_removed(&id);
        assert!(!render(&registry).contains("cert_expiration_timestamp_seconds{"));
    }
}
