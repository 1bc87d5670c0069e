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
//! ServiceAccounts are not watched: a pod's identity is its `spec.serviceAccountName`, which is
//! immutable and admitted only when the account exists (as in Istio's ztunnel).

pub mod cluster;
pub mod node;
pub mod policies;

use std::{
    collections::BTreeMap,
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

/// How long `connect` waits for the first complete lists.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Retry delays of a failing watch (doubling from the first to the second).
pub const WATCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
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
    /// The last error of each failing watch, for the operator.
    errors: Mutex<BTreeMap<&'static str, String>>,
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
            Arc::new(Shared { state: Mutex::default(), dirty: AtomicBool::new(false), errors: Mutex::default() });
        let node = cfg.node_name.clone();
        let mut tasks = vec![
            spawn_watch(
                Api::<Namespace>::all(client.clone()),
                watcher::Config::default(),
                "namespaces",
                &shared,
                |s| &mut s.namespaces,
                never_same,
            ),
            spawn_watch(
                Api::<Pod>::all(client.clone()),
                watcher::Config::default().fields(&format!("spec.nodeName={node}")),
                "pods on this node",
                &shared,
                |s| &mut s.local_pods,
                never_same,
            ),
            spawn_watch(
                Api::<Pod>::all(client.clone()),
                watcher::Config::default().fields(&format!("spec.nodeName!={node}")),
                "pods on other nodes",
                &shared,
                |s| &mut s.remote_pods,
                never_same,
            ),
            spawn_watch(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
                "services",
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
                KINDS[i].1,
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
            let errors: String =
                shared.errors.lock().expect("errors lock").iter().map(|(w, e)| format!("\n  {w}: {e}")).collect();
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
                if let Some(problems) = &r.problems {
                    let mut note = problems.join("; ");
                    if r.kept_previous {
                        note = format!("ignored, the previous version stays in force: {note}");
                    } else {
                        note = format!("ignored: {note}");
                    }
                    note.truncate(1000);
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

/// Run one watch forever, applying its changes to its store; an update for which `same` holds
/// (e.g. only the status warden wrote) does not mark the inputs dirty. Errors are retried with backoff;
/// the watcher itself resumes from the last resource version or re-lists when that is gone.
fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    shared: &Arc<Shared>,
    pick: fn(&mut State) -> &mut Store<K>,
    same: fn(&K, &K) -> bool,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + cluster::Compact + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut stream = watcher(api, config).boxed();
        let mut backoff = WATCH_BACKOFF.0;
        let mut listed = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    backoff = WATCH_BACKOFF.0;
                    if shared.errors.lock().expect("errors lock").remove(what).is_some() {
                        tracing::info!("watch of {what} recovered");
                    }
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
                        if listed {
                            tracing::info!(objects = store.objects.len(), "watch of {what} re-listed");
                        }
                        listed = true;
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    let first = shared.errors.lock().expect("errors lock").insert(what, text.clone()).is_none();
                    if first {
                        tracing::warn!(
                            "watch of {what} failed, retrying (the last committed state keeps enforcing): {text}"
                        );
                    } else {
                        tracing::debug!("watch of {what} failed again: {text}");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(WATCH_BACKOFF.1);
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
