//! The cluster source: this node's workloads and the Istio security resources, from a
//! Kubernetes API server.
//!
//! Watchers (tokio tasks) keep one [`Store`] per watched kind: Namespaces, the Pods of this node
//! (`spec.nodeName=NODE`), the other Pods (`spec.nodeName!=NODE`, identities of remote peers),
//! Services (for `targetRefs`), and AuthorizationPolicy, PeerAuthentication and
//! RequestAuthentication in the version the server prefers (v1, else v1beta1). Each change flips
//! a dirty flag; the agent polls [`Source::changed`] and reads a snapshot.
//!
//! A snapshot is published only while every watcher has completed its list since it last
//! (re)started, so a resync after a watch error or an API-server restart never commits an empty
//! or partial state: the last committed state keeps enforcing until the lists are complete.
//!
//! A failing watch is retried with a growing delay ([`WATCH_BACKOFF`]); it counts as recovered
//! only once a list completed, or an event arrived after its completed list. Each watch reports
//! whether it is in sync to its [`Watches`] (the telemetry's: metrics, readiness).
//!
//! ServiceAccounts are not watched: a pod's identity is its `spec.serviceAccountName`, which is
//! immutable and admitted only when the account exists (as in Istio's ztunnel).

pub mod cluster;
pub mod node;
pub mod policies;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod, Service};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        watcher,
    },
};
use serde::de::DeserializeOwned;

use self::{
    cluster::{Change, Store, node_view},
    node::NodeLocator,
    policies::{KINDS, PolicyBook, Report},
};
use super::{Inputs, Source, SourceError};
use crate::telemetry::{ready::OUT_OF_SYNC_LIMIT, watches::Watches};

/// How long `connect` waits for the first complete lists.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Retry delays of a failing watch: the first after a failure, doubling at each further failure
/// up to the second; back to the first once the watch has recovered (a list completed, or an
/// event arrived after a completed list: a list that starts and fails is no recovery).
pub const WATCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// A watch that failed after its list completed and whose retry then neither fails nor delivers
/// within this is listed again: a resumed watch says nothing when it works (and a quiet resource
/// sends nothing), so only a completed list proves it is in sync again.
pub const QUIET_RESUME: Duration = Duration::from_secs(5);
/// How often a watch that keeps failing at the longest delay is logged again (each step of the
/// delay up to it is logged once).
pub const FAILURE_REMINDER: Duration = Duration::from_secs(60);
/// How often local pods whose veth or cgroup is not there yet are looked up again.
pub const RETRY_UNRESOLVED: Duration = Duration::from_secs(1);
/// The name events are reported under.
pub const REPORTER: &str = "warden-agent";

/// How to reach the API server.
#[derive(Clone, Debug)]
pub enum Connection {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    InCluster,
}

#[derive(Clone, Debug)]
pub struct KubeConfig {
    pub connection: Connection,
    /// This node's name, as in the pods' `spec.nodeName`.
    pub node_name: String,
    /// The cgroup v2 hierarchy holding the pods' cgroups.
    pub cgroup_root: PathBuf,
    pub options: warden_authz::Options,
    /// Where each watch reports whether it is in sync (the telemetry's, `TelemetryConfig::watches`).
    pub watches: Watches,
}

#[derive(Default)]
struct State {
    namespaces: Store<Namespace>,
    local_pods: Store<Pod>,
    remote_pods: Store<Pod>,
    services: Store<Service>,
    /// In the order of [`KINDS`].
    policies: [Store<DynamicObject>; 3],
}

impl State {
    /// The watchers that have not completed their list since they last (re)started.
    fn unsynced(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let all = [
            ("namespaces", self.namespaces.synced),
            ("pods on this node", self.local_pods.synced),
            ("pods on other nodes", self.remote_pods.synced),
            ("services", self.services.synced),
            (KINDS[0].1, self.policies[0].synced),
            (KINDS[1].1, self.policies[1].synced),
            (KINDS[2].1, self.policies[2].synced),
        ];
        for (what, synced) in all {
            if !synced {
                out.push(what);
            }
        }
        out
    }
}

struct Shared {
    state: Mutex<State>,
    dirty: AtomicBool,
    /// Whether each watch is in sync, and the last error of each failing one (metrics,
    /// readiness, and the start-up wait's messages).
    watches: Watches,
}

/// The cluster source. Dropping it stops the watchers.
pub struct KubeSource {
    shared: Arc<Shared>,
    book: PolicyBook,
    locator: NodeLocator,
    options: warden_authz::Options,
    client: Client,
    recorder: Recorder,
    policy_apis: Vec<ApiResource>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    describe: String,
    unresolved: Vec<String>,
    last_retry: Instant,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Errors of [`KubeSource::connect`]; each says what to fix. The underlying error's text is part
/// of the message (not a `source`), so a chain printer shows it once.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("kubeconfig {path}: {error}")]
    Kubeconfig { path: PathBuf, error: kube::config::KubeconfigError },
    #[error("in-cluster configuration (is this running in a pod?): {0}")]
    InCluster(kube::config::InClusterError),
    #[error("creating the Kubernetes client: {0}")]
    Client(kube::Error),
    #[error("the API server at {url} does not answer: {error}")]
    Unreachable { url: String, error: kube::Error },
    #[error("{kind} ({group}) is not served by the API server at {url}: install the CRDs (kubectl apply -k deploy/)")]
    MissingCrd { kind: &'static str, group: &'static str, url: String },
    #[error("discovering the API group {group}: {error}")]
    Discovery { group: &'static str, error: kube::Error },
    #[error("the first lists did not complete within {timeout:?}; still waiting for {waiting}{errors}")]
    SyncTimeout { timeout: Duration, waiting: String, errors: String },
}

/// A client for `connection`, and the API server's URL (for messages). Nothing is sent yet.
pub async fn client(connection: &Connection) -> Result<(Client, String), ConnectError> {
    let config = match connection {
        Connection::Kubeconfig(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|error| ConnectError::Kubeconfig { path: path.clone(), error })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|error| ConnectError::Kubeconfig { path: path.clone(), error })?
        }
        Connection::InCluster => kube::Config::incluster().map_err(ConnectError::InCluster)?,
    };
    let url = config.cluster_url.to_string();
    Ok((Client::try_from(config).map_err(ConnectError::Client)?, url))
}

impl KubeSource {
    /// Connect, start the watchers and wait until every one has listed its objects.
    pub async fn connect(cfg: KubeConfig) -> Result<KubeSource, ConnectError> {
        let (client, url) = client(&cfg.connection).await?;
        let version =
            client.apiserver_version().await.map_err(|error| ConnectError::Unreachable { url: url.clone(), error })?;
        let group = kube::discovery::group(&client, policies::GROUP).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => {
                ConnectError::MissingCrd { kind: KINDS[0].0, group: policies::GROUP, url: url.clone() }
            }
            other => ConnectError::Discovery { group: policies::GROUP, error: other },
        })?;
        let mut policy_apis = Vec::new();
        for (kind, _) in KINDS {
            let (ar, _) = group.recommended_kind(kind).ok_or_else(|| ConnectError::MissingCrd {
                kind,
                group: policies::GROUP,
                url: url.clone(),
            })?;
            policy_apis.push(ar);
        }

        let shared =
            Arc::new(Shared { state: Mutex::default(), dirty: AtomicBool::new(false), watches: cfg.watches.clone() });
        let node = cfg.node_name.clone();
        let mut tasks = vec![
            spawn_watch(
                Api::<Namespace>::all(client.clone()),
                watcher::Config::default(),
                Watch { resource: "namespaces", what: "namespaces" },
                &shared,
                |s| &mut s.namespaces,
                never_same,
            ),
            spawn_watch(
                Api::<Pod>::all(client.clone()),
                watcher::Config::default().fields(&format!("spec.nodeName={node}")),
                Watch { resource: "pods_local", what: "pods on this node" },
                &shared,
                |s| &mut s.local_pods,
                never_same,
            ),
            spawn_watch(
                Api::<Pod>::all(client.clone()),
                watcher::Config::default().fields(&format!("spec.nodeName!={node}")),
                Watch { resource: "pods_remote", what: "pods on other nodes" },
                &shared,
                |s| &mut s.remote_pods,
                never_same,
            ),
            spawn_watch(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
                Watch { resource: "services", what: "services" },
                &shared,
                |s| &mut s.services,
                never_same,
            ),
        ];
        let picks: [fn(&mut State) -> &mut Store<DynamicObject>; 3] =
            [|s| &mut s.policies[0], |s| &mut s.policies[1], |s| &mut s.policies[2]];
        for (i, ar) in policy_apis.iter().enumerate() {
            tasks.push(spawn_watch(
                Api::<DynamicObject>::all_with(client.clone(), ar),
                watcher::Config::default(),
                Watch { resource: KINDS[i].1, what: KINDS[i].1 },
                &shared,
                picks[i],
                same_policy,
            ));
        }

        let versions: Vec<String> = policy_apis.iter().map(|a| format!("{}.{}", a.plural, a.api_version)).collect();
        tracing::info!(api = %url, server = %version.git_version, node = %node, policies = %versions.join(", "), "watching the cluster");
        let started = Instant::now();
        let mut last_note = Instant::now();
        loop {
            let waiting = shared.state.lock().expect("state lock").unsynced();
            if waiting.is_empty() {
                break;
            }
            let errors: String = shared
                .watches
                .out_of_sync_longer_than(Duration::ZERO)
                .iter()
                .filter_map(|w| w.error.as_ref().map(|e| format!("\n  {}: {e}", w.what)))
                .collect();
            if started.elapsed() > SYNC_TIMEOUT {
                for t in &tasks {
                    t.abort();
                }
                return Err(ConnectError::SyncTimeout { timeout: SYNC_TIMEOUT, waiting: waiting.join(", "), errors });
            }
            if last_note.elapsed() > Duration::from_secs(5) {
                tracing::warn!("waiting for the first lists of {}{errors}", waiting.join(", "));
                last_note = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(ms = started.elapsed().as_millis() as u64, "cluster lists complete");

        let recorder =
            Recorder::new(client.clone(), Reporter { controller: REPORTER.into(), instance: Some(node.clone()) });
        Ok(KubeSource {
            shared,
            book: PolicyBook::default(),
            locator: NodeLocator::new(cfg.cgroup_root.clone()),
            options: cfg.options,
            client,
            recorder,
            policy_apis,
            tasks,
            describe: format!("cluster {url} (node {node}, cgroups under {})", cfg.cgroup_root.display()),
            unresolved: Vec::new(),
            last_retry: Instant::now(),
        })
    }

    /// Tell the API server about invalid (or fixed) resources: a Warning Event on the object
    /// and its status. In the background; failures are logged (the log line already names the
    /// resource and the problems).
    fn report(&self, reports: Vec<Report>) {
        for r in reports {
            let Some(i) = KINDS.iter().position(|(k, _)| *k == r.kind) else { continue };
            let ar = self.policy_apis[i].clone();
            let client = self.client.clone();
            let recorder = self.recorder.clone();
            tokio::spawn(async move {
                let name = policies::display_name(r.kind, &r.object);
                let ns = r.object.metadata.namespace.clone().unwrap_or_default();
                let obj_name = r.object.metadata.name.clone().unwrap_or_default();
                if let Some(mut note) = r.message() {
                    // An Event's note holds at most 1 KiB; cut at a character boundary (the
                    // problems quote the user's text, which may be any UTF-8).
                    truncate_at_char(&mut note, 1000);
                    let reference = ObjectReference {
                        api_version: Some(ar.api_version.clone()),
                        kind: Some(r.kind.to_string()),
                        name: Some(obj_name.clone()),
                        namespace: Some(ns.clone()),
                        uid: r.object.metadata.uid.clone(),
                        resource_version: r.object.metadata.resource_version.clone(),
                        field_path: None,
                    };
                    let ev = KubeEvent {
                        type_: EventType::Warning,
                        reason: "InvalidResource".into(),
                        note: Some(note),
                        action: "Validate".into(),
                        secondary: None,
                    };
                    if let Err(e) = recorder.publish(&ev, &reference).await {
                        tracing::warn!(resource = %name, "could not record the event: {e}");
                    }
                }
                let now = k8s_openapi::jiff::Timestamp::now()
                    .round(k8s_openapi::jiff::Unit::Second)
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                let patch = policies::status_patch(&r, &now);
                let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &ar);
                if let Err(e) = api.patch_status(&obj_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    tracing::warn!(resource = %name, "could not write the status: {e}");
                }
            });
        }
    }
}

/// One watch: its `resource` label in the metrics, and what logs and readiness call it.
#[derive(Clone, Copy, Debug)]
struct Watch {
    resource: &'static str,
    what: &'static str,
}

/// A watch's retry policy: the delay before its next attempt, whether its events are live updates
/// of a completed list, and which of its failures deserve a log line.
#[derive(Debug)]
struct Retry {
    backoff: Duration,
    /// A list completed and no new one started since.
    listed: bool,
    /// The failures since the watch was last in sync.
    failing: Option<Failing>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Failing {
    since: Instant,
    attempts: u32,
    /// The delay last logged, and when.
    logged: (Duration, Instant),
}

/// What an event means for a watch's sync.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Part of a list under way.
    Listing,
    /// A live update; the watch was in sync.
    Live,
    /// A list completed; the watch was not failing.
    Synced,
    /// The watch is in sync again after these failures.
    Recovered(Failing),
}

/// What a failure calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Failure {
    /// Wait this long before the next attempt.
    delay: Duration,
    note: Note,
    /// Failed attempts since the watch was last in sync, this one included.
    attempts: u32,
    /// Out of sync for this long (since the first of them).
    out: Duration,
}

/// What to log about a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Note {
    /// The first of a run of failures.
    First,
    /// The first at a longer delay.
    Step,
    /// Still failing at the longest delay, [`FAILURE_REMINDER`] after the last line.
    Reminder,
    /// Nothing new (debug only).
    Quiet,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry { backoff: WATCH_BACKOFF.0, listed: false, failing: None }
    }
}

impl Retry {
    /// A list starts (the watcher's `Init`, which it reports before sending the request).
    fn list_started(&mut self) {
        self.listed = false;
    }

    /// A list completed (`list_done`), or a watch event arrived.
    fn progress(&mut self, list_done: bool) -> Progress {
        if list_done {
            self.listed = true;
        } else if !self.listed {
            return Progress::Listing;
        }
        self.backoff = WATCH_BACKOFF.0;
        match self.failing.take() {
            Some(f) => Progress::Recovered(f),
            None if list_done => Progress::Synced,
            None => Progress::Live,
        }
    }

    /// A request failed at `now`: how long to wait before the next attempt, and what to log.
    fn failed(&mut self, now: Instant) -> Failure {
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(WATCH_BACKOFF.1);
        let Some(f) = &mut self.failing else {
            self.failing = Some(Failing { since: now, attempts: 1, logged: (delay, now) });
            return Failure { delay, note: Note::First, attempts: 1, out: Duration::ZERO };
        };
        f.attempts += 1;
        let note = if delay != f.logged.0 {
            Note::Step
        } else if now.saturating_duration_since(f.logged.1) >= FAILURE_REMINDER {
            Note::Reminder
        } else {
            Note::Quiet
        };
        if note != Note::Quiet {
            f.logged = (delay, now);
        }
        Failure { delay, note, attempts: f.attempts, out: now.saturating_duration_since(f.since) }
    }

    /// Whether the watch failed after its list completed and may since have resumed without a
    /// word (a resumed watch reports nothing until an object changes): then [`QUIET_RESUME`]
    /// without news calls for a new list.
    fn resuming(&self) -> bool {
        self.listed && self.failing.is_some()
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Run one watch forever, applying its changes to its store; an update for which `same` holds
/// (e.g. only the status warden wrote) does not mark the inputs dirty. Errors are retried with
/// backoff ([`Retry`]); the watcher itself resumes from the last resource version or re-lists
/// when that is gone. Whether the watch is in sync goes to the source's [`Watches`].
fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    watch: Watch,
    shared: &Arc<Shared>,
    pick: fn(&mut State) -> &mut Store<K>,
    same: fn(&K, &K) -> bool,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + cluster::Compact + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let shared = shared.clone();
    let watches = shared.watches.clone();
    let Watch { resource, what } = watch;
    watches.register(resource, what);
    tokio::spawn(async move {
        let mut stream = watcher(api.clone(), config.clone()).boxed();
        let mut retry = Retry::default();
        let mut ever_listed = false;
        loop {
            let next = if retry.resuming() {
                match tokio::time::timeout(QUIET_RESUME, stream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        tracing::debug!(
                            "watch of {what}: no failure and no event for {QUIET_RESUME:?} since it failed; listing again to know it is in sync"
                        );
                        stream = watcher(api.clone(), config.clone()).boxed();
                        retry.list_started();
                        continue;
                    }
                }
            } else {
                stream.next().await
            };
            let Some(event) = next else { break };
            match event {
                Ok(event) => {
                    // Some(true): a list completed; Some(false): a live event.
                    let progress = match &event {
                        watcher::Event::Init => {
                            retry.list_started();
                            watches.resyncing(resource);
                            None
                        }
                        watcher::Event::InitApply(_) => None,
                        watcher::Event::InitDone => Some(true),
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => Some(false),
                    };
                    let compact = |mut o: K| {
                        o.compact();
                        o
                    };
                    let change = match event {
                        watcher::Event::Init => Change::Init,
                        watcher::Event::InitApply(o) => Change::InitApply(compact(o)),
                        watcher::Event::InitDone => Change::InitDone,
                        watcher::Event::Apply(o) => Change::Apply(compact(o)),
                        watcher::Event::Delete(o) => Change::Delete(compact(o)),
                    };
                    let list_done = matches!(change, Change::InitDone);
                    {
                        let mut state = shared.state.lock().expect("state lock");
                        let store = pick(&mut state);
                        let significant = match &change {
                            Change::Apply(o) => store.get(o).is_none_or(|old| !same(old, o)),
                            _ => true,
                        };
                        if store.apply(change) && significant {
                            shared.dirty.store(true, Ordering::SeqCst);
                        }
                        if list_done {
                            if ever_listed {
                                tracing::info!(objects = store.objects.len(), "watch of {what} re-listed");
                            }
                            ever_listed = true;
                        }
                    }
                    match progress.map(|list_done| retry.progress(list_done)) {
                        Some(Progress::Recovered(f)) => {
                            watches.synced(resource);
                            tracing::info!(
                                "watch of {what} recovered after {} failed attempts in {}",
                                f.attempts,
                                seconds(f.since.elapsed())
                            );
                        }
                        Some(Progress::Synced) => watches.synced(resource),
                        Some(Progress::Live | Progress::Listing) | None => {}
                    }
                }
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    // The server no longer has the watch's version: the watcher lists again.
                    // Routine (compaction), so no failure; out of sync until the list completes.
                    tracing::debug!("watch of {what} expired ({}), listing again", status.message);
                    watches.resyncing(resource);
                    tokio::time::sleep(retry.backoff).await;
                }
                Err(e) => {
                    let text = e.to_string();
                    let Failure { delay, note, attempts, out } = retry.failed(Instant::now());
                    watches.failed(resource, &text);
                    match note {
                        Note::First => tracing::warn!(
                            "watch of {what} failed, retrying in {delay:?} (the last committed state keeps enforcing): {text}"
                        ),
                        Note::Step => tracing::warn!(
                            "watch of {what} failed again ({attempts} attempts in {}), retrying in {delay:?}: {text}",
                            seconds(out)
                        ),
                        Note::Reminder => {
                            let ready = if out > OUT_OF_SYNC_LIMIT { "; /healthz/ready reports not ready" } else { "" };
                            tracing::warn!(
                                "watch of {what} out of sync for {} ({attempts} failed attempts, retrying every {delay:?}{ready}; the last committed state keeps enforcing): {text}",
                                seconds(out)
                            );
                        }
                        Note::Quiet => tracing::debug!("watch of {what} failed again ({attempts} attempts): {text}"),
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    })
}

fn never_same<K>(_: &K, _: &K) -> bool {
    false
}

/// A policy whose spec (generation), labels and annotations did not change: a status write.
fn same_policy(a: &DynamicObject, b: &DynamicObject) -> bool {
    a.metadata.uid == b.metadata.uid
        && a.metadata.generation.is_some()
        && a.metadata.generation == b.metadata.generation
        && a.metadata.labels == b.metadata.labels
        && a.metadata.annotations == b.metadata.annotations
}

impl Source for KubeSource {
    fn changed(&mut self) -> bool {
        if !self.shared.state.lock().expect("state lock").unsynced().is_empty() {
            // A resync is under way: keep the last committed state until it is complete.
            return false;
        }
        if self.shared.dirty.load(Ordering::SeqCst) {
            return true;
        }
        // Local pods not found on the node yet: look again now and then; a new snapshot only when
        // one of them turned up (or went), so waiting costs no commits.
        if !self.unresolved.is_empty() && self.last_retry.elapsed() >= RETRY_UNRESOLVED {
            self.last_retry = Instant::now();
            let state = self.shared.state.lock().expect("state lock");
            let view =
                node_view(&state.namespaces, &state.local_pods, &state.remote_pods, &state.services, &mut self.locator);
            return view.unresolved != self.unresolved;
        }
        false
    }

    fn read(&mut self) -> Result<Inputs, SourceError> {
        self.last_retry = Instant::now();
        let (view, resources, reports) = {
            let state = self.shared.state.lock().expect("state lock");
            let waiting = state.unsynced();
            if !waiting.is_empty() {
                return Err(SourceError::Other(format!("the cluster is resyncing ({})", waiting.join(", "))));
            }
            // Cleared under the lock: a change applied after this point sets it again.
            self.shared.dirty.store(false, Ordering::SeqCst);
            let view =
                node_view(&state.namespaces, &state.local_pods, &state.remote_pods, &state.services, &mut self.locator);
            let objects =
                state.policies.iter().enumerate().flat_map(|(i, s)| s.objects.values().map(move |o| (KINDS[i].0, o)));
            let (resources, reports) = self.book.resolve(objects);
            (view, resources, reports)
        };
        if view.unresolved != self.unresolved {
            for u in view.unresolved.iter().filter(|u| !self.unresolved.contains(u)) {
                tracing::warn!("local pod not enforced yet (retrying every {RETRY_UNRESOLVED:?}): {u}");
            }
            self.unresolved = view.unresolved;
        }
        self.report(reports);
        let policies = warden_authz::PolicySet::from_resources(resources, &self.options)?;
        Ok(Inputs { workloads: view.workloads, services: view.services, policies, outside_mesh: view.outside_mesh })
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let cut = (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_note_is_cut_at_a_character_boundary() {
        let mut s = format!("{}é tail", "a".repeat(999));
        truncate_at_char(&mut s, 1000);
        assert_eq!(s, "a".repeat(999));
        let mut short = "ok".to_string();
        truncate_at_char(&mut short, 1000);
        assert_eq!(short, "ok");
    }

    /// Drive `retry` through `n` failed lists (each announced by `Init`), `request` apart plus the
    /// delay asked for; the delays and the notes.
    fn failing_lists(retry: &mut Retry, now: &mut Instant, n: usize, request: Duration) -> Vec<Failure> {
        (0..n)
            .map(|_| {
                retry.list_started();
                *now += request;
                let f = retry.failed(*now);
                *now += f.delay;
                f
            })
            .collect()
    }

    #[test]
    fn a_list_that_starts_and_fails_is_no_recovery_and_the_delay_doubles_to_its_maximum() {
        let mut retry = Retry::default();
        let mut now = Instant::now();
        // The first list completes; later the watch fails and every new list is refused.
        assert_eq!(retry.progress(true), Progress::Synced);
        let fails = failing_lists(&mut retry, &mut now, 8, Duration::from_millis(5));
        let delays: Vec<u64> = fails.iter().map(|f| f.delay.as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(fails.iter().map(|f| f.attempts).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(!retry.resuming(), "a list is under way: the watcher itself lists again");
        // Watch events cannot come before a list completes; were one seen, it is no recovery.
        assert_eq!(retry.progress(false), Progress::Listing);
        assert_eq!(retry.failed(now).delay, WATCH_BACKOFF.1, "still at the maximum");
    }

    #[test]
    fn a_repeated_failure_is_logged_once_per_delay_step_then_once_a_minute() {
        let mut retry = Retry::default();
        let mut now = Instant::now();
        // The audit's case: `list` removed from the RBAC, 120 s of refused lists.
        let fails = failing_lists(&mut retry, &mut now, 200, Duration::from_millis(5));
        let fails: Vec<Failure> = fails.into_iter().take_while(|f| f.out <= Duration::from_secs(120)).collect();
        assert!((55..70).contains(&fails.len()), "{} attempts in 120 s, at most one per 2 s", fails.len());
        let logged: Vec<(Note, u64)> =
            fails.iter().filter(|f| f.note != Note::Quiet).map(|f| (f.note, f.out.as_secs())).collect();
        assert_eq!(
            logged.iter().map(|l| l.0).collect::<Vec<_>>(),
            [Note::First, Note::Step, Note::Step, Note::Step, Note::Step, Note::Step, Note::Reminder],
            "seven lines in 120 s (the audit counted 14k): {logged:?}"
        );
        // The steps (100 ms to 2 s) within the first seconds, then one reminder a minute.
        assert!(logged[5].1 <= 4 && (60..=65).contains(&logged[6].1), "{logged:?}");
    }

    #[test]
    fn a_watch_recovers_when_a_list_completes_and_the_delay_starts_again() {
        let mut retry = Retry::default();
        let mut now = Instant::now();
        retry.list_started();
        assert_eq!(retry.progress(true), Progress::Synced, "the first list");
        assert_eq!(retry.progress(false), Progress::Live);
        // The API server goes away: the watch fails after its list, and may resume quietly.
        let first = now;
        let fails = failing_lists(&mut retry, &mut now, 3, Duration::ZERO);
        assert_eq!(fails[2].delay, Duration::from_millis(400));
        // failing_lists announced lists; a resumed watch has none under way.
        retry.listed = true;
        assert!(retry.resuming(), "failed after its list: quiet means re-list to know");
        retry.list_started();
        assert!(!retry.resuming(), "listing");
        let f = match retry.progress(true) {
            Progress::Recovered(f) => f,
            other => panic!("{other:?}"),
        };
        assert_eq!((f.since, f.attempts), (first, 3));
        assert_eq!(retry.backoff, WATCH_BACKOFF.0);
        assert_eq!(
            retry.failed(now),
            Failure { delay: WATCH_BACKOFF.0, note: Note::First, attempts: 1, out: Duration::ZERO }
        );
    }

    #[test]
    fn a_live_event_after_the_completed_list_is_a_recovery() {
        let mut retry = Retry::default();
        let now = Instant::now();
        retry.list_started();
        retry.progress(true);
        // The watch request itself fails (no `watch` verb, or the server restarts): the watcher
        // retries the watch from its version without listing again.
        for _ in 0..6 {
            retry.failed(now);
        }
        assert_eq!(retry.backoff, WATCH_BACKOFF.1);
        assert!(retry.resuming());
        match retry.progress(false) {
            Progress::Recovered(f) => assert_eq!(f.attempts, 6),
            other => panic!("{other:?}"),
        }
        assert_eq!((retry.backoff, retry.resuming()), (WATCH_BACKOFF.0, false));
        assert_eq!(retry.progress(false), Progress::Live);
    }
}
