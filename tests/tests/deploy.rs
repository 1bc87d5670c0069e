//! `deploy/` against a real kube-apiserver (1.20.2): with the CRDs installed, a server-side dry
//! run of `kubectl apply -k deploy/` accepts every manifest (schema, RBAC, CRD-backed kinds); the
//! DaemonSet runs the mesh with what the CA publishes and accepts; and the CA, run as deploy/ca
//! runs it with its own RBAC, authenticates node agents through the API server and keeps its
//! root. Needs no root: etcd, the API server and the CA run on loopback as any user.

use std::{net::Ipv4Addr, process::Command, sync::Arc, time::Duration};

use serde::Deserialize as _;
use serde_yaml::Value;
use warden_identity::{
    Identity,
    clock::{Clock, SystemClock},
    tls::{SpiffeVerifier, TrustBundle},
    workload::{CaClient, CaClientError, GrpcCaClient, generate_key_and_csr},
};
use warden_tests::{
    kapi::{ApiServer, CaProcess},
    workspace_root,
};

#[test]
fn the_api_server_accepts_every_manifest_of_deploy() {
    let api = ApiServer::start("deploy", 16563, 12499);
    // A server-side dry run creates nothing, so what the other objects need must exist first:
    // the CRDs (for nothing here, but as a user applies them first) and the namespace.
    api.install_crds();
    let deploy = workspace_root().join("deploy");
    api.kubectl(&["apply", "-f", deploy.join("namespace.yaml").to_str().unwrap()]).unwrap();
    let out = api.kubectl(&["apply", "--dry-run=server", "-k", deploy.to_str().unwrap()]).unwrap();
    // Every object kustomize renders is accepted by the server.
    let rendered = Command::new("kubectl").args(["kustomize"]).arg(&deploy).output().unwrap();
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let rendered = String::from_utf8(rendered.stdout).unwrap();
    let objects = rendered.split("\n---\n").filter(|d| d.contains("kind:")).count();
    let accepted: Vec<&str> = out.lines().filter(|l| l.contains("(server dry run)")).collect();
    assert_eq!(accepted.len(), objects, "kubectl said:\n{out}");
    for kind in [
        "namespace/warden-system",
        "daemonset.apps/warden-agent",
        "deployment.apps/warden-ca",
        "service/warden-ca",
        "clusterrole.rbac.authorization.k8s.io/warden-agent",
    ] {
        assert!(out.contains(kind), "{kind} missing from:\n{out}");
    }
    // The agent's container asks for exactly the capabilities tests/tests/kube.rs shows it
    // needs, nothing broader.
    assert!(rendered.contains("- BPF\n") && rendered.contains("- NET_ADMIN\n") && rendered.contains("- PERFMON\n"));
    assert!(
        !rendered.contains("SYS_ADMIN")
            && !rendered.contains("privileged: true")
            && !rendered.contains("hostPID: true")
    );
}

/// The objects `kubectl kustomize deploy/` renders.
fn rendered() -> Vec<Value> {
    let out = Command::new("kubectl").arg("kustomize").arg(workspace_root().join("deploy")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_yaml::Deserializer::from_slice(&out.stdout).map(|d| Value::deserialize(d).unwrap()).collect()
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("deploy/ renders no {kind} {name}"))
}

/// The value of `--name=VALUE` among a container's args.
fn arg<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    let prefix = format!("--{name}=");
    container["args"].as_sequence()?.iter().filter_map(Value::as_str).find_map(|a| a.strip_prefix(prefix.as_str()))
}

fn has_flag(container: &Value, name: &str) -> bool {
    container["args"].as_sequence().is_some_and(|a| a.iter().any(|a| a.as_str() == Some(&format!("--{name}"))))
}

/// The volume mounted at the directory of `path` in `pod`'s `container`, and the file's name.
fn volume_of<'a>(pod: &'a Value, container: &Value, path: &str) -> (&'a Value, String) {
    let (dir, file) = path.rsplit_once('/').unwrap();
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
    let volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    (volume, file.to_string())
}

/// An env var of `container` that is `fieldPath` of the pod (downward API).
fn env_field(container: &Value, var: &str) -> Option<String> {
    let e = container["env"].as_sequence()?.iter().find(|e| e["name"] == var)?;
    e["valueFrom"]["fieldRef"]["fieldPath"].as_str().map(String::from)
}

#[test]
fn the_daemonset_runs_the_mesh_with_what_the_ca_publishes_and_accepts() {
    let objects = rendered();
    let ds = object(&objects, "DaemonSet", "warden-agent");
    let agent_pod = &ds["spec"]["template"]["spec"];
    let agent = &agent_pod["containers"][0];
    let ca_pod = &object(&objects, "Deployment", "warden-ca")["spec"]["template"]["spec"];
    let ca = &ca_pod["containers"][0];
    let service = object(&objects, "Service", "warden-ca");
    let namespace = "warden-system";

    assert!(has_flag(agent, "mesh") && has_flag(agent, "cluster"), "the agents run the mesh: {:?}", agent["args"]);
    assert!(has_flag(ca, "kubernetes"), "the CA authenticates agents through the API server: {:?}", ca["args"]);
    // The CA's address is its Service, in the namespace the pod runs in.
    assert_eq!(env_field(agent, "POD_NAMESPACE").as_deref(), Some("metadata.namespace"));
    let port = service["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert_eq!(arg(agent, "ca-addr"), Some(format!("https://warden-ca.$(POD_NAMESPACE).svc:{port}").as_str()));
    assert_eq!(service["metadata"]["namespace"], namespace);
    assert!(arg(ca, "listen").unwrap().ends_with(&format!(":{port}")));
    // The root the agents verify against is the ConfigMap the CA publishes.
    let (root, file) = volume_of(agent_pod, agent, arg(agent, "ca-root-cert").unwrap());
    assert_eq!(root["configMap"]["name"].as_str(), arg(ca, "root-configmap"), "{root:?}");
    assert_eq!(file, warden_identity::ca::ROOT_CERT_FILE);
    // The agents' token: projected, for the audience the CA accepts.
    let (token, file) = volume_of(agent_pod, agent, arg(agent, "ca-token-file").unwrap());
    let projected = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projected["path"].as_str(), Some(file.as_str()));
    assert_eq!(projected["audience"].as_str(), arg(ca, "token-audience"), "{projected:?}");
    // The account the CA trusts is the DaemonSet's.
    assert_eq!(env_field(ca, "POD_NAMESPACE").as_deref(), Some("metadata.namespace"));
    let account = format!("$(POD_NAMESPACE)/{}", agent_pod["serviceAccountName"].as_str().unwrap());
    assert_eq!(arg(ca, "trusted-node-account"), Some(account.as_str()));
    // The CA's RBAC covers what it does (the functional test below runs it with exactly this).
    let role = object(&objects, "Role", "warden-ca");
    let names: Vec<String> = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|r| r["resourceNames"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(String::from))
        .collect();
    for name in [warden_agent::kubeca::ROOT_SECRET, arg(ca, "root-configmap").unwrap()] {
        assert!(names.iter().any(|n| n == name), "the CA's Role names {name}: {names:?}");
    }
    for (kind, name) in [("ClusterRoleBinding", "warden-ca"), ("RoleBinding", "warden-ca")] {
        let b = object(&objects, kind, name);
        assert_eq!(b["subjects"][0]["name"], ca_pod["serviceAccountName"], "{kind} {name} binds the CA's account");
    }
    // The mesh adds no capability: NET_ADMIN covers policy routing, IP_TRANSPARENT and SO_MARK.
    let caps: Vec<&str> = agent["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "PERFMON"]);
}

/// Ask the CA at `port` (verified against `root`) for `identity`'s certificate with `token`.
fn sign(port: u16, root: &str, token: &str, identity: &str) -> Result<Vec<String>, CaClientError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let file = std::env::temp_dir().join(format!("warden-kubeca-root-{}.pem", std::process::id()));
        std::fs::write(&file, root).unwrap();
        let bundle = Arc::new(TrustBundle::from_files(&file, None, vec!["cluster.local".into()]).unwrap());
        let _ = std::fs::remove_file(&file);
        let ca_id = warden_identity::server::ca_server_identity("cluster.local").unwrap();
        let verifier = Arc::new(SpiffeVerifier::new(bundle, clock).expecting(vec![ca_id]));
        let client = GrpcCaClient::new_tls(&format!("https://127.0.0.1:{port}"), Some(token.into()), verifier).unwrap();
        let id: Identity = identity.parse().unwrap();
        let (_key, csr) = generate_key_and_csr(&id).unwrap();
        client.sign(&id, &csr, Duration::from_secs(3600)).await
    })
}

fn rejected(r: Result<Vec<String>, CaClientError>, code: &str) {
    match r {
        Err(CaClientError::Rejected { code: c, message }) => assert_eq!(c, code, "{message}"),
        other => panic!("expected a {code} refusal, got {other:?}"),
    }
}

#[test]
fn the_ca_authenticates_node_agents_through_the_api_server_and_keeps_its_root() {
    let api = ApiServer::start("kubeca", 16573, 12509);
    api.install();
    let tmp = std::env::temp_dir().join(format!("warden-kubeca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // The agent of node n1, workloads a (on n1) and b (on n2), and a pod of another account.
    api.system_pod("warden-agent-n1", "warden-agent", "n1");
    api.apply("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: other, namespace: warden-system}\n").unwrap();
    api.system_pod("other-n1", "other", "n1");
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n").unwrap();
    api.pod("team", "a", "n1", Ipv4Addr::new(10, 90, 0, 2), &[("app", "a")]);
    api.pod("team", "b", "n2", Ipv4Addr::new(10, 90, 0, 3), &[("app", "b")]);
    let (a, b) = ("spiffe://cluster.local/ns/team/sa/a", "spiffe://cluster.local/ns/team/sa/b");

    let port = 16575;
    let ca = CaProcess::start(&api, &tmp.join("ca1"), port);
    // The generated root is kept in the Secret and published in the ConfigMap the agents mount.
    let root = api.wait_data("configmap", "warden-ca-root-cert", "root-cert.pem", Duration::from_secs(20));
    let kept = api.data("secret", "warden-ca-secret", "root-cert.pem").expect("the root is kept in its Secret");
    assert_eq!(kept, root);
    assert!(api.data("secret", "warden-ca-secret", "ca-key.pem").is_some_and(|k| k.contains("PRIVATE KEY")));

    // n1's agent, with its projected token (bound to its pod, for the CA's audience): the
    // identities of n1's pods, and only those.
    let agent = api.token("warden-agent", "warden-ca", Some("warden-agent-n1"));
    let chain = sign(port, &root, &agent, a).expect("n1's agent obtains a's certificate");
    assert!(chain.len() >= 2, "{chain:?}");
    rejected(sign(port, &root, &agent, b), "PermissionDenied");
    // Refused: a token for another audience, one bound to no pod, another account's, garbage.
    rejected(sign(port, &root, &api.token("warden-agent", "elsewhere", Some("warden-agent-n1")), a), "Unauthenticated");
    rejected(sign(port, &root, &api.token("warden-agent", "warden-ca", None), a), "Unauthenticated");
    rejected(sign(port, &root, &api.token("other", "warden-ca", Some("other-n1")), a), "Unauthenticated");
    rejected(sign(port, &root, "not-a-token", a), "Unauthenticated");
    // a's pod is gone from n1 (a terminating pod still counts: it runs until its grace period
    // ends; there is no kubelet here to end it, so it is removed at once): its identity is no
    // longer n1's to obtain.
    api.kubectl(&["delete", "pod", "a", "-n", "team", "--grace-period=0", "--force"]).unwrap();
    rejected(sign(port, &root, &agent, a), "PermissionDenied");
    api.pod("team", "a", "n1", Ipv4Addr::new(10, 90, 0, 2), &[("app", "a")]);

    // A restarted CA (an empty directory, as its emptyDir) signs under the same root.
    drop(ca);
    let _ca = CaProcess::start(&api, &tmp.join("ca2"), port);
    let restored = std::fs::read_to_string(tmp.join("ca2").join("root-cert.pem")).unwrap();
    assert_eq!(restored, root, "the root is restored from its Secret");
    sign(port, &root, &agent, a).expect("the restarted CA issues under the same root");
    // The agent's pod is replaced: tokens bound to the old one are refused.
    api.kubectl(&["delete", "pod", "warden-agent-n1", "-n", "warden-system", "--grace-period=0", "--force"]).unwrap();
    api.system_pod("warden-agent-n1", "warden-agent", "n1");
    rejected(sign(port, &root, &agent, a), "Unauthenticated");
    let _ = std::fs::remove_dir_all(&tmp);
}
