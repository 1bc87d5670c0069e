//! A real kube-apiserver (1.20.2) with etcd on loopback, for the cluster tests: built by
//! `../shared/kube-apiserver/setup.sh` (`cargo xtask test` passes its path in
//! `WARDEN_KUBE_APISERVER`) and started by its `start.sh`, one per test on its own ports.

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::workspace_root;

/// The kube-apiserver binary: `WARDEN_KUBE_APISERVER`, else what `setup.sh` builds (or has cached).
pub fn apiserver_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WARDEN_KUBE_APISERVER") {
        return p.into();
    }
    let setup = workspace_root().parent().unwrap().join("shared/kube-apiserver/setup.sh");
    let out = Command::new("bash").arg(&setup).stderr(Stdio::inherit()).output().expect("running setup.sh");
    assert!(out.status.success(), "{} failed", setup.display());
    String::from_utf8(out.stdout).unwrap().lines().last().expect("setup.sh prints the binary").trim().into()
}

/// etcd + kube-apiserver on loopback, private to one test.
pub struct ApiServer {
    pub dir: PathBuf,
    pub port: u16,
    pub etcd_port: u16,
    /// The network namespace it listens in (the lab's node, where the agent runs), or the host's.
    pub netns: Option<String>,
    bin: PathBuf,
}

impl ApiServer {
    /// Start one in the host's network namespace.
    pub fn start(name: &str, port: u16, etcd_port: u16) -> ApiServer {
        ApiServer::start_in(name, port, etcd_port, None)
    }

    /// Start one listening on the loopback of network namespace `netns` (`/run/netns/NAME`).
    pub fn start_in(name: &str, port: u16, etcd_port: u16, netns: Option<&str>) -> ApiServer {
        let dir = std::env::temp_dir().join(format!("warden-kapi-{name}"));
        let s = ApiServer { dir, port, etcd_port, netns: netns.map(String::from), bin: apiserver_bin() };
        s.stop();
        let _ = fs::remove_dir_all(&s.dir);
        s.launch();
        s
    }

    pub fn launch(&self) {
        let script = workspace_root().parent().unwrap().join("shared/kube-apiserver/start.sh");
        let out = self
            .command("bash")
            .arg(&script)
            .arg(&self.dir)
            .env("APISERVER", &self.bin)
            .env("KAPI_PORT", self.port.to_string())
            .env("ETCD_PORT", self.etcd_port.to_string())
            .output()
            .expect("running start.sh");
        assert!(
            out.status.success(),
            "start.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stop the API server and etcd and wait until they are gone.
    pub fn stop(&self) {
        for f in ["apiserver.pid", "etcd.pid"] {
            let Some(pid) = fs::read_to_string(self.dir.join(f)).ok().and_then(|p| p.trim().parse::<i32>().ok()) else {
                continue;
            };
            // SAFETY: signalling a process this test started (its pid file is in our directory).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            // SAFETY: signal 0 only checks for existence.
            while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// `program`, in the server's network namespace.
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// A kubeconfig acting as the DaemonSet's service account (impersonation by the admin).
    pub fn agent_kubeconfig(&self) -> PathBuf {
        self.kubeconfig_as("warden-system", "warden-agent")
    }

    /// A kubeconfig acting as service account `namespace/name` (impersonation by the admin), so
    /// the RBAC that account is granted is what the client gets.
    pub fn kubeconfig_as(&self, namespace: &str, name: &str) -> PathBuf {
        let p = self.dir.join(format!("{namespace}-{name}-kubeconfig"));
        let admin = fs::read_to_string(self.kubeconfig()).unwrap();
        let kc = admin.replace(
            "    token: admin-token\n",
            &format!("    token: admin-token\n    as: system:serviceaccount:{namespace}:{name}\n    as-groups: [system:serviceaccounts, system:serviceaccounts:{namespace}, system:authenticated]\n"),
        );
        assert_ne!(kc, admin, "the kubeconfig written by start.sh changed shape");
        fs::write(&p, kc).unwrap();
        p
    }

    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        use std::io::Write as _;
        let mut child = self
            .command("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Apply deploy/'s CRDs and wait until they are served.
    pub fn install_crds(&self) {
        let crds = workspace_root().join("deploy/crds");
        self.kubectl(&["apply", "--validate=false", "-k", crds.to_str().unwrap()]).unwrap();
        for crd in ["authorizationpolicies", "peerauthentications", "requestauthentications"] {
            self.kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=30s",
                &format!("crd/{crd}.security.istio.io"),
            ])
            .unwrap();
        }
    }

    /// Install warden as a user does (`kubectl apply -k deploy/`), CRDs first. Without kubelet
    /// or controllers nothing runs, but every object (and the RBAC the agent uses) exists.
    pub fn install(&self) {
        self.install_crds();
        self.kubectl(&["apply", "--validate=false", "-k", workspace_root().join("deploy").to_str().unwrap()]).unwrap();
    }

    /// A running pod: the object on `node`, then its status (no kubelet here).
    pub fn pod(&self, ns: &str, name: &str, node: &str, ip: Ipv4Addr, labels: &[(&str, &str)]) -> String {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect();
        self.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {ns}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{}}}}}\n\
             spec: {{nodeName: {node}, serviceAccountName: {name}, containers: [{{name: app, image: app:1}}]}}\n",
            labels.join(", ")
        ))
        .unwrap();
        // Running and ready, as a kubelet reports a pod whose containers passed their probes.
        let status = format!(
            "{{\"status\":{{\"phase\":\"Running\",\"podIP\":\"{ip}\",\"podIPs\":[{{\"ip\":\"{ip}\"}}],\
             \"conditions\":[{{\"type\":\"Ready\",\"status\":\"True\"}}]}}}}"
        );
        self.kubectl(&["patch", "pod", name, "-n", ns, "--subresource=status", "--type=merge", "-p", &status]).unwrap();
        self.kubectl(&["get", "pod", name, "-n", ns, "-o", "jsonpath={.metadata.uid}"]).unwrap()
    }
}

impl ApiServer {
    /// `kubectl create token` for `account` of warden-system, for `audience`, bound to `pod`.
    pub fn token(&self, account: &str, audience: &str, pod: Option<&str>) -> String {
        let mut args =
            vec!["create", "token", account, "-n", "warden-system", "--audience", audience, "--duration", "1h"];
        if let Some(pod) = pod {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod]);
        }
        self.kubectl(&args).unwrap().trim().to_string()
    }

    /// A pod of `account` in warden-system on `node` (nothing runs it: the object is what counts,
    /// e.g. the node agent's, which its projected token is bound to).
    pub fn system_pod(&self, name: &str, account: &str, node: &str) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: warden-system}}\n\
             spec: {{nodeName: {node}, serviceAccountName: {account}, containers: [{{name: agent, image: warden:1}}]}}\n"
        ))
        .unwrap();
    }

    /// `data.KEY` of a ConfigMap or Secret (`kind`) of warden-system, decoded; `None` when absent.
    pub fn data(&self, kind: &str, name: &str, key: &str) -> Option<String> {
        let path = format!("jsonpath={{.data.{}}}", key.replace('.', "\\."));
        let v = self.kubectl(&["get", kind, name, "-n", "warden-system", "-o", &path]).ok()?;
        if v.is_empty() {
            return None;
        }
        if kind != "secret" {
            return Some(v);
        }
        let out =
            Command::new("base64").args(["-d"]).arg("-").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().ok()?;
        use std::io::Write as _;
        out.stdin.as_ref()?.write_all(v.as_bytes()).ok()?;
        String::from_utf8(out.wait_with_output().ok()?.stdout).ok()
    }

    /// Poll `data` until it answers.
    pub fn wait_data(&self, kind: &str, name: &str, key: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.data(kind, name, key) {
                return v;
            }
            assert!(Instant::now() < deadline, "{kind} {name} has no {key} after {timeout:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `warden ca serve --kubernetes` as deploy/ca runs it, as its own service account (so deploy/'s
/// RBAC for it is what it gets), in the API server's network namespace; killed on drop.
pub struct CaProcess(std::process::Child);

impl CaProcess {
    /// Start on `127.0.0.1:port` with CA directory `dir`; returns once it listens.
    pub fn start(api: &ApiServer, dir: &std::path::Path, port: u16) -> CaProcess {
        use std::io::BufRead as _;
        let kubeconfig = api.kubeconfig_as("warden-system", "warden-ca");
        let mut child = api
            .command(crate::warden_bin().to_str().unwrap())
            .args(["ca", "serve", "--kubernetes", "--kubeconfig"])
            .arg(&kubeconfig)
            .arg("--dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--trusted-node-account", "warden-system/warden-agent"])
            .env("POD_NAMESPACE", "warden-system")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the CA");
        let stderr = child.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            std::io::BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>().join("\n")
        });
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        if !line.contains("listening") {
            let _ = child.kill();
            panic!("the CA did not start: {line:?}\n{}", log.join().unwrap());
        }
        CaProcess(child)
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
