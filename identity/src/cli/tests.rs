use std::os::unix::fs::PermissionsExt;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::clock::ManualClock;
use crate::tls::TrustBundle;
use crate::workload::{LocalCaClient, SecretManagerConfig};

#[derive(Parser, Debug)]
struct Warden {
    #[command(subcommand)]
    ca: CaCommand,
}

#[derive(Parser, Debug)]
struct CertsCli {
    #[command(flatten)]
    args: CertsArgs,
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn clap_definitions_parse_and_validate_spiffe_ids() {
    <Warden as clap::CommandFactory>::command().debug_assert();
    <CertsCli as clap::CommandFactory>::command().debug_assert();
    let w = Warden::try_parse_from([
        "ca",
        "issue",
        "--dir",
        "/x",
        "--spiffe",
        "spiffe://cluster.local/ns/a/sa/b",
        "--out",
        "/o",
    ])
    .unwrap();
    assert!(matches!(w.ca, CaCommand::Issue { ttl_hours: 24, .. }));
    let err =
        Warden::try_parse_from(["ca", "issue", "--spiffe", "spiffe://cluster.local/ns/a", "--out", "/o"]).unwrap_err();
    assert!(err.to_string().contains("does not have the shape"), "{err}");
    let w = Warden::try_parse_from(["ca", "revoke", "0a1b", "--dir", "/x"]).unwrap();
    assert!(matches!(w.ca, CaCommand::Revoke { ref serial, .. } if serial == "0a1b"));
    let err = Warden::try_parse_from(["ca", "serve", "--node-workloads", "w"]).unwrap_err();
    assert!(err.to_string().contains("--token-file"), "{err}");
    let err = Warden::try_parse_from(["ca", "serve", "--node-workloads", "w", "--node-certs", "n", "--plaintext"])
        .unwrap_err();
    assert!(err.to_string().contains("cannot be used with"), "{err}");
    let w = Warden::try_parse_from(["ca", "serve", "--node-workloads", "w", "--node-certs", "n"]).unwrap();
    assert!(matches!(w.ca, CaCommand::Serve { token_file: None, node_certs: Some(_), plaintext: false, .. }));
    let c = CertsCli::try_parse_from(["certs", "-o", "json"]).unwrap();
    assert_eq!(c.args.output, CertsOutput::Json);
    assert_eq!(c.args.admin_url, DEFAULT_ADMIN_CERTS_URL);
}

#[test]
fn ca_init_issue_revoke_round_trip() {
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::starting_now());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out = run_ca_offline(CaCommand::Init { dir: dir.clone(), trust_domain: "cluster.local".into() }, clock.clone())
        .unwrap();
    assert!(out.contains("created root CA"), "{out}");
    assert_eq!(mode(&dir.join(ca::CA_KEY_FILE)), 0o600);

    let wdir = tmp.path().join("web");
    let spiffe: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
    let out = run_ca_offline(
        CaCommand::Issue {
            dir: dir.clone(),
            trust_domain: Some("cluster.local".into()),
            spiffe: spiffe.clone(),
            out: wdir.clone(),
            ttl_hours: 2,
        },
        clock.clone(),
    )
    .unwrap();
    assert_eq!(mode(&wdir.join(ISSUED_KEY_FILE)), 0o600);
    let foreign = run_ca_offline(
        CaCommand::Issue {
            dir: dir.clone(),
            trust_domain: Some("cluster.local".into()),
            spiffe: "spiffe://other.example/ns/default/sa/web".parse().unwrap(),
            out: tmp.path().join("foreign"),
            ttl_hours: 2,
        },
        clock.clone(),
    )
    .unwrap_err();
    assert!(foreign.to_string().contains("outside this CA's trust domain"), "{foreign}");
    let chain = std::fs::read_to_string(wdir.join(ISSUED_CERT_CHAIN_FILE)).unwrap();
    let leaf =
        <rustls_pki_types::CertificateDer<'_> as rustls_pki_types::pem::PemObject>::from_pem_slice(chain.as_bytes())
            .unwrap();
    assert_eq!(crate::tls::spiffe_identity(&leaf).unwrap(), spiffe);
    let (_, x) = X509Certificate::from_der(leaf.as_ref()).unwrap();
    let serial = ca::serial_hex(x.raw_serial());
    assert!(out.contains(&serial), "{out}");
    // The issued key is the certificate's key.
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(wdir.join(ISSUED_KEY_FILE)).unwrap()).unwrap();
    assert_eq!(key.public_key_raw(), x.public_key().subject_public_key.data.as_ref());

    let out = run_ca_offline(CaCommand::Revoke { serial: serial.clone(), dir: dir.clone() }, clock.clone()).unwrap();
    assert!(out.starts_with(&format!("revoked serial {serial}")), "{out}");
    assert!(dir.join(ca::CRL_FILE).exists());

    let err = run_ca_offline(CaCommand::Init { dir, trust_domain: "cluster.local".into() }, clock.clone()).unwrap_err();
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
}

#[test]
fn ca_commands_with_a_broken_ca_fail_naming_the_file() {
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::starting_now());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    run_ca_offline(CaCommand::Init { dir: dir.clone(), trust_domain: "cluster.local".into() }, clock.clone()).unwrap();
    std::fs::remove_file(dir.join(ca::CA_KEY_FILE)).unwrap();
    let spiffe: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
    let cmd = CaCommand::Issue {
        dir: dir.clone(),
        trust_domain: Some("cluster.local".into()),
        spiffe,
        out: tmp.path().join("o"),
        ttl_hours: 1,
    };
    let err = run_ca_offline(cmd.clone(), clock.clone()).unwrap_err();
    assert!(err.to_string().contains(ca::CA_KEY_FILE), "{err}");
    assert_eq!(run_ca(cmd), ExitCode::FAILURE);
    assert!(!tmp.path().join("o").exists(), "nothing written with a broken CA");
}

fn init(dir: &Path, trust_domain: &str, clock: &Arc<dyn Clock>) {
    run_ca_offline(CaCommand::Init { dir: dir.to_owned(), trust_domain: trust_domain.into() }, clock.clone()).unwrap();
}

fn issue(dir: &Path, trust_domain: Option<&str>, spiffe: &str, out: &Path, ttl_hours: u64) -> CaCommand {
    CaCommand::Issue {
        dir: dir.to_owned(),
        trust_domain: trust_domain.map(str::to_owned),
        spiffe: spiffe.parse().unwrap(),
        out: out.to_owned(),
        ttl_hours,
    }
}

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

/// Every entry of `dir` but the three issued files (left-over temporary files).
fn strays(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.retain(|n| ![ISSUED_KEY_FILE, ISSUED_CERT_CHAIN_FILE, ISSUED_ROOT_FILE].contains(&n.as_str()));
    names
}

#[test]
fn issue_replaces_a_symlinked_key_file_instead_of_writing_through_it() {
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::starting_now());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir, "cluster.local", &clock);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, "not a key\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&victim, out.join(ISSUED_KEY_FILE)).unwrap();

    run_ca_offline(issue(&dir, None, WEB, &out, 1), clock).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not a key\n", "the link's target is untouched");
    assert_eq!(mode(&victim), 0o644);
    let key = out.join(ISSUED_KEY_FILE);
    assert!(std::fs::symlink_metadata(&key).unwrap().file_type().is_file(), "the link is replaced by the key");
    assert_eq!(mode(&key), ca::KEY_FILE_MODE);
    assert!(std::fs::read_to_string(&key).unwrap().contains("PRIVATE KEY"));
    assert!(strays(&out).is_empty(), "{:?}", strays(&out));
}

#[test]
fn issue_that_cannot_write_every_file_leaves_the_previous_ones() {
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::starting_now());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir, "cluster.local", &clock);
    let out = tmp.path().join("out");
    run_ca_offline(issue(&dir, None, WEB, &out, 1), clock.clone()).unwrap();
    let before: Vec<String> =
        [ISSUED_KEY_FILE, ISSUED_ROOT_FILE].iter().map(|f| std::fs::read_to_string(out.join(f)).unwrap()).collect();

    // cert-chain.pem cannot be replaced (a directory in its place).
    std::fs::remove_file(out.join(ISSUED_CERT_CHAIN_FILE)).unwrap();
    std::fs::create_dir(out.join(ISSUED_CERT_CHAIN_FILE)).unwrap();
    let err = run_ca_offline(issue(&dir, None, WEB, &out, 1), clock.clone()).unwrap_err();
    assert!(err.to_string().contains(ISSUED_CERT_CHAIN_FILE), "{err}");
    let after: Vec<String> =
        [ISSUED_KEY_FILE, ISSUED_ROOT_FILE].iter().map(|f| std::fs::read_to_string(out.join(f)).unwrap()).collect();
    assert_eq!(after, before, "no new key next to the old certificate");
    assert!(strays(&out).is_empty(), "{:?}", strays(&out));

    // A directory that refuses new files: nothing is changed either.
    std::fs::remove_dir(out.join(ISSUED_CERT_CHAIN_FILE)).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o500)).unwrap();
    let probe = out.join("probe");
    if std::fs::write(&probe, "").is_err() {
        // (Skipped as root, who may write anyway.)
        let err = run_ca_offline(issue(&dir, None, WEB, &out, 1), clock).unwrap_err();
        assert!(err.to_string().contains(ISSUED_KEY_FILE), "{err}");
        assert_eq!(std::fs::read_to_string(out.join(ISSUED_KEY_FILE)).unwrap(), before[0]);
    }
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn issue_takes_the_trust_domain_from_the_ca() {
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::starting_now());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("caE");
    init(&dir, "example.org", &clock);
    let out = tmp.path().join("out");
    let text = run_ca_offline(issue(&dir, None, "spiffe://example.org/ns/a/sa/b", &out, 1), clock.clone()).unwrap();
    assert!(text.contains("issued spiffe://example.org/ns/a/sa/b"), "{text}");

    // The CA does not sign another trust domain's identities, whatever the flag says.
    let err = run_ca_offline(issue(&dir, None, WEB, &tmp.path().join("o2"), 1), clock.clone()).unwrap_err();
    assert!(err.to_string().contains("outside this CA's trust domain \"example.org\""), "{err}");
    let err =
        run_ca_offline(issue(&dir, Some("cluster.local"), WEB, &tmp.path().join("o3"), 1), clock.clone()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("\"example.org\"") && text.contains("\"cluster.local\"") && text.contains("--trust-domain"));
    assert!(!tmp.path().join("o2").exists() && !tmp.path().join("o3").exists());
    // The flag that agrees is accepted; revoke needs none.
    run_ca_offline(issue(&dir, Some("example.org"), "spiffe://example.org/ns/a/sa/c", &out, 1), clock.clone()).unwrap();
    run_ca_offline(CaCommand::Revoke { serial: "1234".into(), dir }, clock).unwrap();
}

#[test]
fn issue_refuses_a_zero_ttl() {
    let err = Warden::try_parse_from(["ca", "issue", "--spiffe", WEB, "--out", "/o", "--ttl-hours", "0"]).unwrap_err();
    assert!(err.to_string().contains("--ttl-hours") && err.to_string().contains("at least 1 hour"), "{err}");
    let err =
        Warden::try_parse_from(["ca", "serve", "--node-workloads", "w", "--token-file", "t", "--max-ttl-hours", "0"])
            .unwrap_err();
    assert!(err.to_string().contains("--max-ttl-hours") && err.to_string().contains("at least 1 hour"), "{err}");
    let w = Warden::try_parse_from(["ca", "issue", "--spiffe", WEB, "--out", "/o", "--ttl-hours", "1"]).unwrap();
    assert!(matches!(w.ca, CaCommand::Issue { ttl_hours: 1, trust_domain: None, .. }));

    let clock: Arc<dyn Clock> = Arc::new(ManualClock::starting_now());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir, "cluster.local", &clock);
    let err = run_ca_offline(issue(&dir, None, WEB, &tmp.path().join("o"), 0), clock).unwrap_err();
    assert!(err.to_string().contains("--ttl-hours 0"), "{err}");
    assert!(!tmp.path().join("o").exists());
}

#[test]
fn revoke_refuses_serials_no_certificate_can_have_and_warns_about_odd_lengths() {
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::starting_now());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir, "cluster.local", &clock);
    let revoke =
        |serial: &str| run_ca_offline(CaCommand::Revoke { serial: serial.into(), dir: dir.clone() }, clock.clone());
    for (serial, reason) in [("00", "zero"), ("0x00:00", "zero"), (&"ff".repeat(25)[..], "20 octets")] {
        let err = revoke(serial).unwrap_err();
        assert!(err.to_string().contains(reason), "{serial}: {err}");
    }
    assert!(!dir.join(ca::CRL_FILE).exists(), "nothing revoked");
    let out = revoke("1234").unwrap();
    assert!(out.starts_with("warning: serial 1234 is 2 octets; warden issues 16-octet serials"), "{out}");
    assert!(out.contains("revoked serial 1234"), "{out}");
    let full = format!("01{}", "ab".repeat(ca::SERIAL_LEN - 1));
    assert!(revoke(&full).unwrap().starts_with("revoked serial"));
}

fn serve_cmd(tmp: &Path, dir: PathBuf) -> CaCommand {
    std::fs::write(tmp.join("tokens"), "tok node-1\n").unwrap();
    std::fs::write(tmp.join("workloads"), "node-1 spiffe://cluster.local/ns/default/sa/web\n").unwrap();
    CaCommand::Serve {
        dir,
        trust_domain: "cluster.local".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        token_file: Some(tmp.join("tokens")),
        node_certs: None,
        node_workloads: Some(tmp.join("workloads")),
        max_ttl_hours: 48,
        plaintext: true,
        kubernetes: false,
        kubeconfig: None,
        namespace: DEFAULT_KUBE_NAMESPACE.into(),
        trusted_node_accounts: vec![DEFAULT_TRUSTED_NODE_ACCOUNT.into()],
        token_audience: DEFAULT_TOKEN_AUDIENCE.into(),
        root_configmap: DEFAULT_ROOT_CONFIGMAP.into(),
    }
}

#[tokio::test]
async fn ca_serve_kubernetes_without_its_plugins_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = serve_cmd(tmp.path(), tmp.path().join("ca"));
    if let CaCommand::Serve { kubernetes, node_workloads, .. } = &mut cmd {
        *kubernetes = true;
        *node_workloads = None;
    }
    let err = serve_ca(cmd, None, |_| panic!("must not listen"), async {}).await.unwrap_err();
    assert!(err.to_string().contains("Kubernetes support"), "{err}");
}

#[tokio::test]
async fn ca_serve_issues_and_refuses_to_start_with_a_broken_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(serve_ca(serve_cmd(tmp.path(), dir.clone()), None, move |a| addr_tx.send(a).unwrap(), async {
            let _ = stop_rx.await;
        }));
    let addr = addr_rx.await.unwrap();
    let mut client = crate::proto::istio_certificate_service_client::IstioCertificateServiceClient::connect(format!(
        "http://{addr}"
    ))
    .await
    .unwrap();
    let web: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
    let (_k, csr) = generate_key_and_csr(&web).unwrap();
    let mut req =
        tonic::Request::new(crate::proto::IstioCertificateRequest { csr, validity_duration: 0, metadata: None });
    req.metadata_mut().insert("authorization", "Bearer tok".parse().unwrap());
    let resp = client.create_certificate(req).await.unwrap().into_inner();
    assert_eq!(resp.cert_chain.len(), 2);
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();

    // Corrupt the CA: serve must fail before listening.
    std::fs::write(dir.join(ca::CERT_CHAIN_FILE), "garbage").unwrap();
    let listened = std::sync::atomic::AtomicBool::new(false);
    let err = serve_ca(
        serve_cmd(tmp.path(), dir),
        None,
        |_| listened.store(true, std::sync::atomic::Ordering::SeqCst),
        async {},
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains(ca::CERT_CHAIN_FILE), "{err}");
    assert!(!listened.load(std::sync::atomic::Ordering::SeqCst));
}

async fn manager(clock: Arc<ManualClock>, dir: &Path) -> SecretManager {
    let authority = Arc::new(CertificateAuthority::load_or_init(dir, CaConfig::default(), clock.clone()).unwrap());
    let trust = Arc::new(TrustBundle::new(authority.roots().to_vec(), vec!["cluster.local".into()]).unwrap());
    let config = SecretManagerConfig { rotation_jitter: 0.0, ..SecretManagerConfig::default() };
    let mgr = SecretManager::new(Arc::new(LocalCaClient(authority)), trust, clock, config, None);
    mgr.fetch(&"spiffe://cluster.local/ns/default/sa/web".parse().unwrap()).await.unwrap();
    mgr
}

#[tokio::test]
async fn certs_snapshot_reports_identity_serial_issuer_validity_rotation_chain_and_bundle() {
    let clock = Arc::new(ManualClock::starting_now());
    let tmp = tempfile::tempdir().unwrap();
    let mgr = manager(clock.clone(), tmp.path()).await;
    clock.advance(Duration::from_secs(3600));
    let v = certs_snapshot(&mgr);
    let c = &v["certificates"][0];
    assert_eq!(c["identity"], "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(c["state"], "VALID");
    assert_eq!(c["issuer"], "O=cluster.local, CN=warden root CA");
    // Rotation at half of 24h + 60 s back-dating, one hour has passed.
    assert_eq!(c["seconds_until_rotation"], 12 * 3600 - 30 - 3600);
    assert_eq!(c["chain"].as_array().unwrap().len(), 2);
    assert_eq!(c["chain"][0]["serial"], c["serial"]);
    assert_eq!(v["trust_bundle"].as_array().unwrap().len(), 1);

    let table = render_certs(&v, CertsOutput::Table, false);
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for col in ["IDENTITY", "STATE", "SERIAL", "ISSUER", "NOT BEFORE", "NOT AFTER", "ROTATES IN"] {
        assert!(header.contains(col), "{table}");
    }
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("spiffe://cluster.local/ns/default/sa/web") && row.contains(c["serial"].as_str().unwrap()),
        "{table}"
    );
    assert!(row.ends_with("10h59m"), "{table}");
    assert!(lines.next().unwrap().starts_with("ROOTCA"), "{table}");
    let verbose = render_certs(&v, CertsOutput::Table, true);
    assert!(verbose.contains("trust bundle:") && verbose.matches("BEGIN CERTIFICATE").count() == 3, "{verbose}");
}

/// A one-shot HTTP/1.1 responder standing in for the agent's admin server.
async fn admin_stub(body: String) -> (SocketAddr, tokio::task::JoinHandle<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            req.extend_from_slice(&buf[..n]);
        }
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
        String::from_utf8(req).unwrap()
    });
    (addr, task)
}

#[tokio::test]
async fn warden_certs_queries_the_admin_endpoint() {
    let clock = Arc::new(ManualClock::starting_now());
    let tmp = tempfile::tempdir().unwrap();
    let mgr = manager(clock, tmp.path()).await;
    let snapshot = certs_snapshot(&mgr);
    let (addr, req) = admin_stub(snapshot.to_string()).await;
    let got = fetch_certs(&format!("http://{addr}/certs")).await.unwrap();
    assert_eq!(got, snapshot);
    assert!(req.await.unwrap().starts_with("GET /certs HTTP/1.1\r\n"));

    let (addr, _req) = admin_stub(snapshot.to_string()).await;
    let args = CertsArgs { admin_url: format!("http://{addr}/certs"), output: CertsOutput::Json, verbose: false };
    assert_eq!(run_certs(&args).await, ExitCode::SUCCESS);

    // Nothing listening: a clear failure.
    let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let err = fetch_certs(&format!("http://{free}/certs")).await.unwrap_err();
    assert!(err.to_string().contains(&format!("cannot query http://{free}/certs")), "{err}");
    let args = CertsArgs { admin_url: format!("http://{free}/certs"), output: CertsOutput::Table, verbose: false };
    assert_eq!(run_certs(&args).await, ExitCode::FAILURE);
    assert!(fetch_certs("https://127.0.0.1:1/certs").await.is_err());
}
