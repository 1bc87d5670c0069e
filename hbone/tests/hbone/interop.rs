//! Interoperability with an HBONE peer that shares none of warden's stack: `peer.py`, on Python's
//! ssl (OpenSSL 3) and hyper-h2, speaking the published protocol (HTTP/2 CONNECT with an `ip:port`
//! authority, over mutual TLS 1.3 with SPIFFE certificates, ALPN `h2`). Not ztunnel itself (it
//! cannot be built here), but a second, independent implementation: OpenSSL must accept warden's
//! certificates and handshake, hyper-h2 its framing, and the peer finds warden's CONNECT
//! well-formed by RFC 9113 section 8.5 (no `:scheme`, no `:path`, an `ip:port` authority); and
//! warden must serve a client that sends only what the protocol requires.
//!
//! The peer's Python is `cargo xtask setup`'s virtual environment (`target/interop-venv`), or
//! `WARDEN_INTEROP_PYTHON`.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;

use warden_hbone::{ConnectRequest, Key, Pool, PoolOptions};
use warden_identity::Clock;

use crate::common::*;

const PEER: &str = "independent-peer";
const MIB: usize = 1024 * 1024;

/// As `warden_tests::interop_python` (this crate cannot use warden-tests, which depends on it).
fn python() -> PathBuf {
    let path = std::env::var_os("WARDEN_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/interop-venv/bin/python3"));
    assert!(
        path.exists(),
        "{}: no Python for the interop peer; `cargo xtask setup` creates it (or set WARDEN_INTEROP_PYTHON to a \
         python3 with hyper-h2)",
        path.display()
    );
    path
}

fn peer(mode: &str) -> Command {
    let mut c = Command::new(python());
    c.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/hbone/peer.py")).arg(mode);
    c
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("the peer printed {line:?}: {e}"))
}

/// The peer's TLS session as it reported it: TLS 1.3, ALPN h2, and `identity` as the only
/// SPIFFE ID it verified.
fn assert_session(v: &serde_json::Value, identity: &str) {
    assert_eq!(v["tls"], "TLSv1.3", "{v}");
    assert_eq!(v["alpn"], "h2", "{v}");
    assert_eq!(v["peer"], serde_json::json!([identity]), "{v}");
}

#[tokio::test]
async fn an_independent_client_tunnels_through_wardens_server() {
    let setup = Setup::default().await;
    let echo = echo_server().await;
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = setup.pki.issue_pem(&id(PEER), files.path());
    let mut client = peer("client");
    client
        .args(["--connect", &setup.server.addr.to_string(), "--authority", &echo.to_string()])
        .args(["--bytes", &MIB.to_string()])
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--ca")
        .arg(setup.pki.roots_pem());
    let out = tokio::task::spawn_blocking(move || client.output()).await.unwrap().expect("run the peer");
    assert!(out.status.success(), "peer client: {}", String::from_utf8_lossy(&out.stderr));
    let v = json(String::from_utf8_lossy(&out.stdout).trim());

    assert_eq!(v["status"], "200", "{v}");
    assert_eq!(
        (v["ended"].as_bool(), v["echoed"].as_u64(), v["intact"].as_bool()),
        (Some(true), Some(MIB as u64), Some(true)),
        "{v}"
    );
    assert_session(&v, &id(SERVER).to_string());
    // warden authorized the stream as the peer's certificate says, and relayed every byte.
    let requests = setup.server.inbound.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].peer_identity(), &id(PEER));
    assert_eq!(requests[0].destination, echo);
    let stats = setup.server.inbound.wait_closed(1).await[0].clone().unwrap();
    assert_eq!((stats.received, stats.sent), (MIB as u64, MIB as u64));
}

/// The peer's server process, killed when dropped.
struct PeerServer {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl PeerServer {
    fn next(&mut self) -> serde_json::Value {
        let line = self.lines.next().expect("the peer server exited").expect("read the peer");
        json(&line)
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn wardens_client_tunnels_through_an_independent_server() {
    init_tracing();
    let pki = Pki::new();
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = pki.issue_pem(&id(SERVER), files.path());
    let mut child = peer("server")
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--ca")
        .arg(pki.roots_pem())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the peer server");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut server = PeerServer { child, lines };
    let port = server.next()["listening"].as_u64().expect("the peer's port") as u16;

    let clock: Arc<dyn Clock> = pki.clock.clone();
    let client_cert = pki.issue(&id(CLIENT), DAY);
    let tls = Arc::new(TestClientTls::new(pki.bundle(), clock.clone()).with(id(CLIENT), slot(clock, &client_cert)));
    let pool = Pool::new(tls, PoolOptions::default());
    let key = Key::new(id(CLIENT), ([127, 0, 0, 1], port).into(), vec![id(SERVER)]);
    // The peer echoes instead of connecting on: the destination only travels in the request.
    let destination = "10.9.8.7:4242".parse().unwrap();
    let source = "10.1.2.3:45678".parse().unwrap();
    let tunnel = match pool.connect(&key, ConnectRequest::new(destination).forwarded_for(source)).await {
        Ok(t) => t,
        Err(e) => panic!("{e}; the peer said {}", tokio::task::spawn_blocking(move || server.next()).await.unwrap()),
    };
    assert_eq!(tunnel.peer_identity(), &id(SERVER));
    let data = pattern(MIB + 17, 5);
    let back = round_trip(tunnel, &data).await;
    assert!(back == data, "echoed {} bytes, sent {}", back.len(), data.len());

    let v = tokio::task::spawn_blocking(move || server.next()).await.unwrap();
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    assert_eq!(v["echoed"], data.len(), "{v}");
    assert_session(&v, &id(CLIENT).to_string());
    let headers: Vec<(String, String)> = v["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|h| (h[0].as_str().unwrap().to_owned(), h[1].as_str().unwrap().to_owned()))
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!(header(":method"), Some("CONNECT"), "{headers:?}");
    assert_eq!(header(":authority"), Some("10.9.8.7:4242"), "{headers:?}");
    assert_eq!((header(":scheme"), header(":path")), (None, None), "a CONNECT carries neither: {headers:?}");
    assert_eq!(header("forwarded"), Some(r#"for="10.1.2.3:45678""#), "{headers:?}");
}
