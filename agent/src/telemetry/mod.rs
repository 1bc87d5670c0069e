//! The node agent's observability, Istio-compatible so existing dashboards and alerts work.
//!
//! | file          | concern                                                                    |
//! |---------------|----------------------------------------------------------------------------|
//! | `names`       | kernel numbers -> workload, namespace, SPIFFE principal, policy name       |
//! | `metrics`     | `istio_tcp_*` and `warden_*` traffic metrics from the per-CPU counters     |
//! | `fastpath`    | `warden_fastpath_*`: what the same-node fast path did                      |
//! | `access_log`  | one line per ring-buffer event (text or JSON) on stdout                    |
//! | `watches`     | `warden_kube_watch_*`: whether each watch of the cluster is in sync        |
//! | `commits`     | `warden_commit_*`: the committed generation and when, failed applies       |
//! | `ready`       | `/healthz/ready`: 200 once committed, unless a watch is out of sync (60 s) |
//! | `server`      | the small HTTP server both endpoints use                                   |
//!
//! Lifecycle: [`Telemetry::new`] builds the registry (other concerns may register their metrics
//! through [`Telemetry::registry_mut`]); [`Telemetry::serve`] binds both ports before the first
//! commit (readiness answers 503); [`Running::committed`] after the first commit opens the pinned
//! counters and the event ring buffer and turns readiness to 200; the agent's loop reports each
//! commit ([`Running::commit_succeeded`], [`Running::commit_failed`]). The cluster source reports
//! its watches to [`TelemetryConfig::watches`]. See `docs/observability.md`.

pub mod access_log;
pub mod commits;
pub mod fastpath;
pub mod metrics;
pub mod names;
pub mod ready;
pub mod server;
pub mod watches;

/// The text exposition of `registry`, for tests of the metrics.
#[cfg(test)]
pub(crate) fn render(registry: &prometheus_client::registry::Registry) -> String {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, registry).unwrap();
    s
}

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::SystemTime,
};

use aya::maps::{MapData, PerCpuHashMap};
use prometheus_client::registry::Registry;
use warden_common::{Counter, CounterKey};

pub use self::{access_log::AccessLogFormat, metrics::SecurityPolicy};
use self::{
    commits::CommitMetrics,
    metrics::TrafficMetrics,
    names::RecordNames,
    ready::Readiness,
    server::{Handler, Reply},
    watches::Watches,
};

/// Istio's metrics path on the agent's stats port.
pub const METRICS_PATH: &str = "/stats/prometheus";
/// Istio's ports: stats (15020) and readiness (15021).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READY_ADDR: &str = "0.0.0.0:15021";
/// OpenMetrics text, which prometheus-client writes and Prometheus negotiates.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the agent exposes and where.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    pub metrics_addr: SocketAddr,
    pub ready_addr: SocketAddr,
    pub access_log: AccessLogFormat,
    /// `connection_security_policy` of the traffic the kernel counts.
    pub security_policy: SecurityPolicy,
    /// The cluster source's watches, reported in the metrics and by readiness (a clone shares
    /// them: give the same to the source, `KubeConfig::watches`).
    pub watches: Watches,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            metrics_addr: DEFAULT_METRICS_ADDR.parse().expect("valid default"),
            ready_addr: DEFAULT_READY_ADDR.parse().expect("valid default"),
            access_log: AccessLogFormat::default(),
            security_policy: SecurityPolicy::default(),
            watches: Watches::default(),
        }
    }
}

/// Log directives added to `RUST_LOG` unless it names one of kube's targets itself: kube's
/// client logs every failed request (`ERROR ... failed with error client error (Connect)`, naming
/// no resource) and its watcher every refused one, at every retry; the agent's own line per watch
/// (`watch of pods on this node failed, retrying ...`, then once per backoff step) says it once,
/// with the resource.
pub const QUIET_KUBE_LOGS: &str = "kube_client::client::builder=off,kube_runtime::watcher=error";

/// The agent's log directives for `RUST_LOG`'s value: it (default `info`) with
/// [`QUIET_KUBE_LOGS`], unless one of its directives is for a target of kube's crates (`kube`,
/// `kube_client::...`, `kube_runtime::...`): then it alone, as given.
pub fn log_directives(rust_log: Option<&str>) -> String {
    let env = rust_log.map(str::trim).filter(|e| !e.is_empty()).unwrap_or("info");
    let names_kube = env.split(',').any(|d| d.trim().split(['[', '=']).next().is_some_and(|t| t.starts_with("kube")));
    if names_kube { env.to_string() } else { format!("{env},{QUIET_KUBE_LOGS}") }
}

/// The agent's log filter: [`log_directives`] of `RUST_LOG`; `info` with [`QUIET_KUBE_LOGS`] when
/// `RUST_LOG` does not parse.
pub fn log_filter() -> tracing_subscriber::EnvFilter {
    let env = std::env::var("RUST_LOG").ok();
    tracing_subscriber::EnvFilter::try_new(log_directives(env.as_deref()))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_directives(None)))
}

type CounterMap = PerCpuHashMap<MapData, CounterKey, Counter>;

/// Everything the scrape handler needs.
struct Scrape {
    registry: Registry,
    traffic: TrafficMetrics,
    names: Arc<RecordNames>,
    /// The pinned counter map, once the datapath exists.
    counters: Mutex<Option<CounterMap>>,
    fast_path: fastpath::FastPathMetrics,
    /// The pinned fast-path counters, once the datapath exists.
    fast_path_counters: Mutex<Option<crate::datapath::maps::FastPathCounterMap>>,
}

impl Scrape {
    fn reply(&self, path: &str) -> Reply {
        if path != METRICS_PATH {
            return Reply::not_found(path);
        }
        self.traffic.poll_live();
        if let Some(map) = self.counters.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let snapshot = map.iter().filter_map(Result::ok).map(|(k, per_cpu)| {
                let mut total = Counter::default();
                for c in per_cpu.iter() {
                    total.add(c);
                }
                (k, total)
            });
            self.traffic.update(snapshot, &self.names.get());
        }
        if let Some(map) = self.fast_path_counters.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            match crate::datapath::maps::fast_path_counters(map) {
                Ok(now) => self.fast_path.update(now),
                Err(e) => tracing::debug!("fast path counters: {e}"),
            }
        }
        let mut body = String::new();
        match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
            Ok(()) => Reply { status: 200, content_type: OPENMETRICS, body },
            Err(e) => Reply::text(500, format!("encoding metrics: {e}\n")),
        }
    }
}

/// The agent's telemetry before it serves.
pub struct Telemetry {
    cfg: TelemetryConfig,
    pin_dir: PathBuf,
    registry: Registry,
    traffic: TrafficMetrics,
    fast_path: fastpath::FastPathMetrics,
    names: Arc<RecordNames>,
    commits: CommitMetrics,
}

impl Telemetry {
    pub fn new(cfg: TelemetryConfig, pin_dir: &Path, state_dir: &Path) -> Telemetry {
        let mut registry = Registry::default();
        let traffic = TrafficMetrics::new(&mut registry, cfg.security_policy);
        let fast_path = fastpath::FastPathMetrics::new(&mut registry);
        let commits = CommitMetrics::new(&mut registry);
        cfg.watches.register_metrics(&mut registry);
        let names = Arc::new(RecordNames::new(state_dir));
        Telemetry { pin_dir: pin_dir.into(), registry, traffic, fast_path, names, commits, cfg }
    }

    /// The registry served on the metrics port, for other concerns' metrics (each registers
    /// under its own prefix, e.g. `warden_identity::metrics::Metrics::new`).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// A recorder for connections the agent carries itself (the mesh), in the same series.
    pub fn tcp_recorder(&self) -> metrics::TcpRecorder {
        self.traffic.recorder()
    }

    /// Bind both ports and serve (readiness 503 until [`Running::committed`]).
    pub async fn serve(self) -> Result<Running, server::BindError> {
        let metrics_listener = server::bind("metrics", self.cfg.metrics_addr).await?;
        let ready_listener = server::bind("readiness", self.cfg.ready_addr).await?;
        let scrape = Arc::new(Scrape {
            registry: self.registry,
            traffic: self.traffic,
            names: self.names.clone(),
            counters: Mutex::new(None),
            fast_path: self.fast_path,
            fast_path_counters: Mutex::new(None),
        });
        let readiness = Readiness::new(self.cfg.watches.clone(), ready::OUT_OF_SYNC_LIMIT);
        let s = scrape.clone();
        let metrics_handler: Handler = Arc::new(move |path| s.reply(path));
        let r = readiness.clone();
        let ready_handler: Handler = Arc::new(move |path| r.reply(path));
        tracing::info!(metrics = %self.cfg.metrics_addr, ready = %self.cfg.ready_addr, "serving {METRICS_PATH} and {}", ready::READY_PATH);
        let tasks = vec![
            tokio::spawn(server::serve(metrics_listener, metrics_handler)),
            tokio::spawn(server::serve(ready_listener, ready_handler)),
        ];
        Ok(Running {
            cfg: self.cfg,
            pin_dir: self.pin_dir,
            scrape,
            readiness,
            names: self.names,
            commits: self.commits,
            tasks,
            stop: Arc::default(),
        })
    }
}

/// Serving telemetry. Dropping it stops the servers and the access log.
pub struct Running {
    cfg: TelemetryConfig,
    pin_dir: PathBuf,
    scrape: Arc<Scrape>,
    readiness: Readiness,
    names: Arc<RecordNames>,
    commits: CommitMetrics,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Stops the access-log thread.
    stop: Arc<AtomicBool>,
}

impl Running {
    /// The first state is committed: read the pinned counters, follow the event ring buffer,
    /// report ready. Telemetry failures are logged; they never stop enforcement.
    pub fn committed(&mut self) {
        if self.readiness.is_ready() {
            return;
        }
        match crate::datapath::Maps::open(&self.pin_dir) {
            Ok(maps) => {
                *self.scrape.counters.lock().unwrap_or_else(|e| e.into_inner()) = Some(maps.counters);
                *self.scrape.fast_path_counters.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(maps.fastpath_counters);
            }
            Err(e) => tracing::error!("traffic metrics unavailable: {e}"),
        }
        if self.cfg.access_log != AccessLogFormat::Off {
            match access_log::open(&self.pin_dir) {
                Ok(ring) => {
                    if let Err(e) = access_log::spawn(ring, self.names.clone(), self.cfg.access_log, self.stop.clone())
                    {
                        tracing::error!("access log unavailable: cannot start its thread: {e}");
                    }
                }
                Err(e) => tracing::error!("access log unavailable: {e}"),
            }
        }
        self.readiness.set_ready();
    }

    /// The agent committed `generation` (`warden_commit_generation`, `_last_success_timestamp_seconds`).
    pub fn commit_succeeded(&mut self, generation: u32) {
        self.commits.succeeded(generation, SystemTime::now());
    }

    /// Applying a new state failed; the last committed state keeps enforcing
    /// (`warden_commit_failures_total`).
    pub fn commit_failed(&mut self) {
        self.commits.failed();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GET `path` from `addr` with a raw HTTP/1.0 request: (status, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }

    #[test]
    fn kubes_per_request_lines_are_quieted_unless_rust_log_names_kube() {
        assert_eq!(log_directives(None), format!("info,{QUIET_KUBE_LOGS}"));
        assert_eq!(log_directives(Some(" ")), format!("info,{QUIET_KUBE_LOGS}"));
        assert_eq!(log_directives(Some("info")), format!("info,{QUIET_KUBE_LOGS}"), "deploy/daemonset.yaml's");
        assert_eq!(
            log_directives(Some("debug,warden_agent=trace")),
            format!("debug,warden_agent=trace,{QUIET_KUBE_LOGS}")
        );
        assert_eq!(log_directives(Some("info,kube_client=debug")), "info,kube_client=debug");
        assert_eq!(log_directives(Some("kube_runtime::watcher")), "kube_runtime::watcher");
        assert_eq!(
            log_directives(Some("info,warden_agent::source::kube=debug")),
            format!("info,warden_agent::source::kube=debug,{QUIET_KUBE_LOGS}"),
            "the agent's own module is not kube's"
        );
        for d in [log_directives(None), log_directives(Some("warn"))] {
            assert!(tracing_subscriber::EnvFilter::try_new(&d).is_ok(), "{d}");
        }
    }

    #[tokio::test]
    async fn readiness_is_503_until_the_first_commit_and_metrics_are_served() {
        let dir = std::env::temp_dir().join(format!("warden-telemetry-{}", std::process::id()));
        let cfg = TelemetryConfig {
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            ready_addr: "127.0.0.1:0".parse().unwrap(),
            access_log: AccessLogFormat::Off,
            security_policy: SecurityPolicy::None,
            watches: Watches::default(),
        };
        // Bind ephemeral ports ourselves to learn them: serve() binds what the config says.
        let m = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let r = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (maddr, raddr) = (m.local_addr().unwrap(), r.local_addr().unwrap());
        drop((m, r));
        let cfg = TelemetryConfig { metrics_addr: maddr, ready_addr: raddr, ..cfg };
        // No pins in this directory: committed() reports the missing maps and still turns ready.
        let mut running = Telemetry::new(cfg, &dir.join("pins"), &dir).serve().await.unwrap();
        assert_eq!(get(raddr, ready::READY_PATH).await.0, 503);
        assert_eq!(get(raddr, "/other").await.0, 404);
        let (status, body) = get(maddr, METRICS_PATH).await;
        assert_eq!(status, 200);
        // No counters yet (no datapath): a valid, empty exposition.
        assert!(body.ends_with("# EOF\n") && !body.contains("_total{"), "{body:?}");
        assert_eq!(get(maddr, "/metrics").await.0, 404);
        running.committed();
        let (status, body) = get(raddr, ready::READY_PATH).await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        // A taken port fails the start.
        let taken = TelemetryConfig {
            metrics_addr: maddr,
            ready_addr: "127.0.0.1:0".parse().unwrap(),
            ..TelemetryConfig::default()
        };
        let e = Telemetry::new(taken, &dir, &dir).serve().await.err().expect("port in use");
        assert!(e.to_string().contains(&format!("cannot listen on {maddr} for metrics")), "{e}");
    }
}
