//! `deploy/` against a real kube-apiserver (1.20.2): with the CRDs installed, a server-side dry
//! run of `kubectl apply -k deploy/` accepts every manifest (schema, RBAC, CRD-backed kinds).
//! Needs no root: etcd and the API server run on loopback as any user.

use std::process::Command;

use warden_tests::{kapi::ApiServer, workspace_root};

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
