//! `warden ca serve --kubernetes`: the CA in a cluster, as istiod's CA works for ztunnel.
//!
//! | piece | what |
//! |---|---|
//! | [`TokenReviewAuthenticator`] | a node agent sends its projected service-account token (audience `--token-audience`); a TokenReview proves it, the account must be a trusted node account, and the pod the token is bound to names the node |
//! | [`PodNodeWorkloads`] | a node may obtain the identity of a pod scheduled on it: a pod of that namespace and service account with `spec.nodeName` = the node, not finished |
//! | [`keep_root`] | before the CA loads its directory: a plugged-in CA (Istio's `cacerts` Secret, copied in by the init container) wins; else the root kept in the Secret `warden-ca-secret` is restored; else a root is generated and kept there, so a restarted CA signs under the same root |
//! | [`publish_root`] | the root (and the CRL, once `warden ca revoke` wrote one) in the ConfigMap `--root-configmap`, which the node agents mount (Istio's `istio-ca-root-cert`), kept up to date |
//!
//! RBAC (`deploy/ca/ca.yaml`): `create` on `tokenreviews`, `get`/`list` on `pods`, and in the
//! CA's namespace `get`/`create` on the Secret and `get`/`create`/`patch` on the ConfigMap.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenReview, TokenReviewSpec},
        core::v1::{ConfigMap, Pod, Secret},
    },
};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use warden_identity::{
    Identity,
    ca::{CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, CRL_FILE, CertificateAuthority, KEY_FILE_MODE, ROOT_CERT_FILE},
    cli::{CaCommand, CaPlugins, CliError},
    clock::SystemClock,
    server::{AuthError, Authenticator, LookupError, MetadataMap, NodeWorkloads, bearer_token},
    workload::BoxFuture,
};

use crate::source::kube::{ConnectError, Connection};

/// The Secret a generated root is kept in (Istio's self-signed root lives in `istio-ca-secret`).
pub const ROOT_SECRET: &str = "warden-ca-secret";
/// The files of a CA directory the Secret holds.
const CA_FILES: [&str; 4] = [CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE];
/// TokenReview's extra fields naming the pod a projected token is bound to.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// How often the published root and CRL are compared with the CA directory.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(10);
/// The field manager of the ConfigMap's data.
const FIELD_MANAGER: &str = "warden-ca";

/// Why the CA could not start in the cluster. Nothing was served.
#[derive(Debug, thiserror::Error)]
pub enum KubeCaError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("--trusted-node-account {value:?}: expected `namespace/service-account`")]
    TrustedAccount { value: String },
    #[error("Secret {namespace}/{name}: {source}")]
    Secret { namespace: String, name: String, source: kube::Error },
    #[error("Secret {namespace}/{name} has no {key}: delete it to generate a new root, or complete it")]
    SecretData { namespace: String, name: String, key: &'static str },
    #[error("CA directory {dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("generating the root in {dir}: {source}")]
    Generate { dir: PathBuf, source: warden_identity::ca::CaError },
    #[error(transparent)]
    Serve(#[from] CliError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// `namespace/service-account` pairs.
fn trusted_accounts(values: &[String]) -> Result<Vec<(String, String)>, KubeCaError> {
    values
        .iter()
        .map(|v| match v.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => Ok((ns.into(), sa.into())),
            _ => Err(KubeCaError::TrustedAccount { value: v.clone() }),
        })
        .collect()
}

/// Authenticates node agents by their Kubernetes service-account token: the node is the one the
/// token's pod is scheduled on. Only tokens bound to a pod (projected tokens are) of a trusted
/// account, issued for the CA's audience, are accepted.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    client: Client,
    audience: String,
    trusted: Vec<(String, String)>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audience", &self.audience)
            .field("trusted", &self.trusted)
            .finish_non_exhaustive()
    }
}

/// A refusal, logged with its reason (the caller learns only that it was refused).
fn refused(reason: &str) -> AuthError {
    tracing::warn!("node token refused: {reason}");
    AuthError::Invalid
}

fn unavailable(what: &str, e: kube::Error) -> AuthError {
    AuthError::Unavailable(format!("{what}: {e}"))
}

impl TokenReviewAuthenticator {
    pub fn new(client: Client, audience: String, trusted: Vec<(String, String)>) -> Self {
        TokenReviewAuthenticator { client, audience, trusted }
    }

    /// The node of the pod `token` is bound to.
    pub async fn node_of(&self, token: &str) -> Result<String, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![self.audience.clone()]) },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable("TokenReview", e))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(refused(status.error.as_deref().unwrap_or("not authenticated")));
        }
        // An audience-unaware review answers for the API server's own audience.
        if !status.audiences.unwrap_or_default().contains(&self.audience) {
            return Err(refused(&format!("not issued for the audience {:?}", self.audience)));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((ns, sa)) = username.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')) else {
            return Err(refused(&format!("{username:?} is not a service account")));
        };
        if !self.trusted.iter().any(|(n, s)| n == ns && s == sa) {
            return Err(refused(&format!("service account {ns}/{sa} is not a trusted node account")));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (first(POD_NAME_EXTRA), first(POD_UID_EXTRA)) else {
            return Err(refused(&format!("the token of {ns}/{sa} is not bound to a pod (use a projected token)")));
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get_opt(&pod_name)
            .await
            .map_err(|e| unavailable("reading the node agent's pod", e))?
            .ok_or_else(|| refused(&format!("pod {ns}/{pod_name} is gone")))?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(refused(&format!("pod {ns}/{pod_name} was replaced since the token was issued")));
        }
        pod.spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| refused(&format!("pod {ns}/{pod_name} is not scheduled")))
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
        _peer: Option<&'a [rustls::pki_types::CertificateDer<'static>]>,
    ) -> BoxFuture<'a, Result<String, AuthError>> {
        Box::pin(async move { self.node_of(bearer_token(metadata)?).await })
    }
}

/// A node may obtain the identities of the pods scheduled on it.
#[derive(Clone)]
pub struct PodNodeWorkloads {
    client: Client,
}

impl std::fmt::Debug for PodNodeWorkloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodNodeWorkloads").finish_non_exhaustive()
    }
}

impl PodNodeWorkloads {
    pub fn new(client: Client) -> Self {
        PodNodeWorkloads { client }
    }
}

impl NodeWorkloads for PodNodeWorkloads {
    fn is_on_node<'a>(&'a self, node: &'a str, identity: &'a Identity) -> BoxFuture<'a, Result<bool, LookupError>> {
        Box::pin(async move {
            let pods = Api::<Pod>::namespaced(self.client.clone(), identity.namespace())
                .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                .await
                .map_err(|e| LookupError(format!("listing the pods of {node}: {e}")))?;
            Ok(pods.items.iter().any(|p| {
                let spec = p.spec.as_ref();
                // As the agents name a pod's identity: `default` when the account is unset.
                let sa = spec.and_then(|s| s.service_account_name.as_deref()).filter(|s| !s.is_empty());
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                sa.unwrap_or("default") == identity.service_account() && !matches!(phase, Some("Succeeded" | "Failed"))
            }))
        })
    }
}

/// Where the CA's root came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// The directory already held a CA (a plugged-in `cacerts`).
    Plugged,
    /// Restored from the Secret.
    Restored,
    /// Generated now and kept in the Secret.
    Generated,
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), KubeCaError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let path = dir.join(name);
    let mode = if name == CA_KEY_FILE { KEY_FILE_MODE } else { 0o644 };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|source| KubeCaError::Dir { dir: dir.into(), source })
}

/// Make sure the CA directory holds a CA, and that a generated one outlives the pod (see the
/// module's table).
pub async fn keep_root(client: &Client, namespace: &str, dir: &Path, trust_domain: &str) -> Result<Root, KubeCaError> {
    if dir.join(CA_CERT_FILE).exists() {
        return Ok(Root::Plugged);
    }
    std::fs::create_dir_all(dir).map_err(|source| KubeCaError::Dir { dir: dir.into(), source })?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let err = |source| KubeCaError::Secret { namespace: namespace.into(), name: ROOT_SECRET.into(), source };
    let restore = |secret: Secret| -> Result<Root, KubeCaError> {
        let data = secret.data.unwrap_or_default();
        for name in CA_FILES {
            let bytes = data.get(name).ok_or(KubeCaError::SecretData {
                namespace: namespace.into(),
                name: ROOT_SECRET.into(),
                key: name,
            })?;
            write_file(dir, name, &bytes.0)?;
        }
        Ok(Root::Restored)
    };
    if let Some(secret) = secrets.get_opt(ROOT_SECRET).await.map_err(err)? {
        return restore(secret);
    }
    CertificateAuthority::init_self_signed(dir, trust_domain, &SystemClock)
        .map_err(|source| KubeCaError::Generate { dir: dir.into(), source })?;
    let mut data = BTreeMap::new();
    for name in CA_FILES {
        let bytes = std::fs::read(dir.join(name)).map_err(|source| KubeCaError::Dir { dir: dir.into(), source })?;
        data.insert(name.to_string(), ByteString(bytes));
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(ROOT_SECRET.into()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "warden".to_string())].into()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(Root::Generated),
        // Another CA replica kept its root first: sign under that one.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            for name in CA_FILES {
                let _ = std::fs::remove_file(dir.join(name));
            }
            restore(secrets.get(ROOT_SECRET).await.map_err(err)?)
        }
        Err(e) => Err(err(e)),
    }
}

/// The ConfigMap data for the CA directory's root and CRL (`None` for an absent CRL, which the
/// merge patch removes).
fn root_data(dir: &Path) -> std::io::Result<BTreeMap<String, Option<String>>> {
    let root = std::fs::read_to_string(dir.join(ROOT_CERT_FILE))?;
    let crl = match std::fs::read_to_string(dir.join(CRL_FILE)) {
        Ok(c) => Some(c),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    Ok([(ROOT_CERT_FILE.to_string(), Some(root)), (CRL_FILE.to_string(), crl)].into())
}

/// Write the root (and CRL) of `dir` into the ConfigMap `name`, creating it if needed.
pub async fn publish_root(client: &Client, namespace: &str, name: &str, dir: &Path) -> anyhow::Result<()> {
    let data = root_data(dir)?;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({ "data": data });
    match maps.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    labels: Some([("app.kubernetes.io/part-of".to_string(), "warden".to_string())].into()),
                    ..ObjectMeta::default()
                },
                data: Some(data.into_iter().filter_map(|(k, v)| Some((k, v?))).collect()),
                ..ConfigMap::default()
            };
            let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
            maps.create(&pp, &cm).await.map(|_| ()).map_err(Into::into)
        }
        Err(e) => Err(e.into()),
    }
}

/// Publish the root now and whenever the CA directory's root or CRL changes.
pub fn spawn_publisher(client: Client, namespace: String, name: String, dir: PathBuf) {
    tokio::spawn(async move {
        let mut published = None;
        loop {
            let current = root_data(&dir).ok();
            if current.is_some() && current != published {
                match publish_root(&client, &namespace, &name, &dir).await {
                    Ok(()) => {
                        tracing::info!(configmap = %format!("{namespace}/{name}"), "published the root certificate");
                        published = current;
                    }
                    Err(e) => tracing::warn!("publishing the root in ConfigMap {namespace}/{name} (will retry): {e:#}"),
                }
            }
            tokio::time::sleep(PUBLISH_INTERVAL).await;
        }
    });
}

/// `warden ca serve --kubernetes`.
pub fn run(cmd: CaCommand) -> ExitCode {
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(KubeCaError::Runtime)
        .and_then(|rt| rt.block_on(serve(cmd)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cmd: CaCommand) -> Result<(), KubeCaError> {
    let CaCommand::Serve {
        dir,
        trust_domain,
        kubeconfig,
        namespace,
        trusted_node_accounts,
        token_audience,
        root_configmap,
        ..
    } = &cmd
    else {
        return Err(CliError::Usage("not a serve command".into()).into());
    };
    let trusted = trusted_accounts(trusted_node_accounts)?;
    let connection = kubeconfig.clone().map_or(Connection::InCluster, Connection::Kubeconfig);
    let (client, url) = crate::source::kube::client(&connection).await?;
    let root = keep_root(&client, namespace, dir, trust_domain).await?;
    tracing::info!(api = %url, ?root, secret = %format!("{namespace}/{ROOT_SECRET}"), "CA root ready");
    spawn_publisher(client.clone(), namespace.clone(), root_configmap.clone(), dir.clone());
    let plugins = CaPlugins {
        authenticator: Arc::new(TokenReviewAuthenticator::new(client.clone(), token_audience.clone(), trusted)),
        workloads: Arc::new(PodNodeWorkloads::new(client)),
    };
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    warden_identity::cli::serve_ca(cmd, Some(plugins), |addr| println!("warden CA listening on {addr}"), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_accounts_are_namespace_slash_account() {
        assert_eq!(
            trusted_accounts(&["warden-system/warden-agent".into()]).unwrap(),
            [("warden-system".to_string(), "warden-agent".to_string())]
        );
        for bad in ["warden-agent", "/a", "a/", "a/b/c"] {
            let e = trusted_accounts(&[bad.into()]).unwrap_err();
            assert!(e.to_string().contains("--trusted-node-account") && e.to_string().contains(bad), "{e}");
        }
    }
}
