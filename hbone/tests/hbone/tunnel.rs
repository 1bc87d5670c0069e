//! Tunnels: bytes, half-close, flow control, refusals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warden_hbone::protocol::{STATUS_BAD_REQUEST, STATUS_DENIED, STATUS_UPSTREAM_UNREACHABLE, TRACEPARENT};
use warden_hbone::{ClientTls, ConnectError, ConnectRequest, Refusal};

use crate::common::*;

#[tokio::test]
async fn echo_through_a_tunnel() {
    let setup = Setup::default().await;
    let echo = echo_server().await;
    let source: SocketAddr = "10.1.2.3:45678".parse().unwrap();
    let tunnel = setup.pool.connect(&setup.key, ConnectRequest::new(echo).forwarded_for(source)).await.unwrap();
    assert_eq!(tunnel.peer_identity(), &id(SERVER));

    let data = pattern(1024 * 1024 + 17, 3);
    let back = round_trip(tunnel, &data).await;
    assert!(back == data, "echoed {} bytes, sent {}", back.len(), data.len());

    let requests = setup.server.inbound.requests();
    assert_eq!(requests.len(), 1);
    let req = &requests[0];
    assert_eq!(req.peer_identity(), &id(CLIENT));
    assert_eq!(req.destination, echo);
    assert_eq!(req.forwarded.for_addr(), Some(source));
    assert_eq!(req.connection.local, setup.server.addr);
    assert!(req.header(TRACEPARENT).is_some_and(|t| t.starts_with("00-")), "{:?}", req.headers);
    // Same IP as the dialled address (ztunnel compares addresses; the port picks the workload's port).
    assert!(req.destination_is_local());

    let closed = setup.server.inbound.wait_closed(1).await;
    let stats = closed[0].clone().unwrap();
    assert_eq!((stats.received, stats.sent), (data.len() as u64, data.len() as u64));
}

#[tokio::test]
async fn half_close_lets_the_upstream_reply_after_eof() {
    let setup = Setup::default().await;
    let upstream = serve_upstream(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read to EOF");
        // Our read side saw EOF; the write side is still open.
        s.write_all(format!("got {} bytes", got.len()).as_bytes()).await.expect("reply");
        s.shutdown().await.expect("close");
    })
    .await;
    let mut tunnel = setup.pool.connect(&setup.key, ConnectRequest::new(upstream)).await.unwrap();
    tunnel.write_all(b"hello").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut reply = String::new();
    tunnel.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "got 5 bytes");
    // EOF stays EOF.
    assert_eq!(tunnel.read(&mut [0u8; 16]).await.unwrap(), 0);

    let stats = setup.server.inbound.wait_closed(1).await[0].clone().unwrap();
    assert_eq!((stats.received, stats.sent), (5, reply.len() as u64));
}

const LARGE: usize = 64 * 1024 * 1024;
/// Bytes written but not yet read anywhere along the path: h2 windows and send buffers, relay
/// buffers, and the kernel's socket buffers of two TCP connections. Without flow control the fast
/// writer would be almost 64 MiB ahead of the slow reader.
const IN_FLIGHT_BOUND: u64 = 32 * 1024 * 1024;

/// Reads `total` bytes slowly, checking the data and the gap to the writer's `written` count.
async fn read_slowly(mut r: impl tokio::io::AsyncRead + Unpin, total: usize, written: &AtomicU64) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut read, mut max_in_flight) = (0usize, 0u64);
    let mut iterations = 0u32;
    while read < total {
        let n = r.read(&mut buf).await.expect("read");
        assert!(n > 0, "EOF after {read} of {total} bytes");
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, ((read + i) % 251) as u8, "byte {}", read + i);
        }
        read += n;
        max_in_flight = max_in_flight.max(written.load(Ordering::SeqCst).saturating_sub(read as u64));
        iterations += 1;
        if iterations.is_multiple_of(4) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert_eq!(r.read(&mut buf).await.expect("read EOF"), 0);
    max_in_flight
}

async fn write_fast(mut w: impl tokio::io::AsyncWrite + Unpin, total: usize, written: &AtomicU64) {
    let chunk: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    while sent < total {
        // Chunks are a multiple of 251 bytes apart, so every chunk continues the pattern.
        let n = (total - sent).min(chunk.len() - chunk.len() % 251);
        w.write_all(&chunk[..n]).await.expect("write");
        sent += n;
        written.fetch_add(n as u64, Ordering::SeqCst);
    }
    w.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_of_a_large_download_bounds_buffering() {
    let setup = Setup::default().await;
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    let upstream = serve_upstream(move |s| {
        let w = w.clone();
        async move { write_fast(s, LARGE, &w).await }
    })
    .await;
    let mut tunnel = setup.pool.connect(&setup.key, ConnectRequest::new(upstream)).await.unwrap();
    tunnel.shutdown().await.unwrap();
    let max_in_flight = read_slowly(tunnel, LARGE, &written).await;
    assert!(max_in_flight < IN_FLIGHT_BOUND, "{max_in_flight} bytes were in flight");
    let stats = setup.server.inbound.wait_closed(1).await[0].clone().unwrap();
    assert_eq!(stats.sent, LARGE as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_reader_of_a_large_upload_bounds_buffering() {
    let setup = Setup::default().await;
    let written = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicU64::new(u64::MAX));
    let (w, f) = (written.clone(), in_flight.clone());
    let upstream = serve_upstream(move |s| {
        let (w, f) = (w.clone(), f.clone());
        async move {
            let max = read_slowly(s, LARGE, &w).await;
            f.store(max, Ordering::SeqCst);
        }
    })
    .await;
    let mut tunnel = setup.pool.connect(&setup.key, ConnectRequest::new(upstream)).await.unwrap();
    write_fast(&mut tunnel, LARGE, &written).await;
    // Dropping a tunnel before the server's END_STREAM would reset it (and discard what the
    // server has not delivered yet): read to EOF, as a TCP client reads to FIN.
    assert_eq!(tunnel.read_to_end(&mut Vec::new()).await.unwrap(), 0);
    let stats = setup.server.inbound.wait_closed(1).await[0].clone().unwrap();
    assert_eq!(stats.received, LARGE as u64);
    let max_in_flight = eventually(|| Some(in_flight.load(Ordering::SeqCst)).filter(|v| *v != u64::MAX)).await;
    assert!(max_in_flight < IN_FLIGHT_BOUND, "{max_in_flight} bytes were in flight");
}

#[tokio::test]
async fn refusals_become_ztunnel_status_codes_and_clear_errors() {
    let setup = Setup::default().await;
    let echo = echo_server().await;
    let inbound = &setup.server.inbound;

    *inbound.decision.lock().unwrap() = Decision::Refuse(Refusal::denied("fintech-core/deny-debug"));
    let err = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap_err();
    assert_eq!(err.status(), Some(STATUS_DENIED));
    assert!(err.is_denied());
    let text = err.to_string();
    assert!(
        text.contains("401") && text.contains("authorization policy") && text.contains(&echo.to_string()),
        "{text}"
    );
    assert!(!text.contains("deny-debug"), "the policy name is not disclosed to the client: {text}");

    *inbound.decision.lock().unwrap() = Decision::Refuse(Refusal::bad_request("destination is not local"));
    let err = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap_err();
    assert_eq!(err.status(), Some(STATUS_BAD_REQUEST), "{err}");

    // A real unreachable upstream: nothing listens on the port of a closed listener.
    *inbound.decision.lock().unwrap() = Decision::Connect;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = setup.pool.connect(&setup.key, ConnectRequest::new(closed)).await.unwrap_err();
    assert_eq!(err.status(), Some(STATUS_UPSTREAM_UNREACHABLE), "{err}");
    assert!(err.to_string().contains("could not connect to the workload"), "{err}");
    assert!(matches!(err, ConnectError::Refused { .. }));

    // Refusals do not break the connection: the next tunnel on it works.
    let tunnel = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap();
    assert_eq!(round_trip(tunnel, b"still fine").await, b"still fine");
    assert_eq!(setup.pool.key_stats(&setup.key).connections, 1);
    assert_eq!(inbound.requests().len(), 4);
}

/// Sends raw requests on an HBONE connection, as a peer that does not follow the protocol.
async fn raw_requests(setup: &Setup, requests: Vec<Request<()>>) -> Vec<StatusCode> {
    let tls = Arc::new(
        TestClientTls::new(setup.pki.bundle(), setup.pki.clock.clone())
            .with(id(CLIENT), slot(setup.pki.clock.clone(), &setup.pki.issue(&id(CLIENT), DAY))),
    );
    let config = warden_hbone::tls::client_alpn(tls.config(&id(CLIENT), &[id(SERVER)]).await.unwrap());
    let tcp = TcpStream::connect(setup.server.addr).await.unwrap();
    let name = ServerName::IpAddress(setup.server.addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
    let (mut sender, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let mut statuses = Vec::new();
    for request in requests {
        sender = sender.ready().await.unwrap();
        let (response, _send) = sender.send_request(request, true).unwrap();
        statuses.push(response.await.unwrap().status());
    }
    statuses
}

#[tokio::test]
async fn malformed_requests_are_refused_without_the_handler() {
    let setup = Setup::default().await;
    let get = Request::builder().method(Method::GET).uri("https://127.0.0.1:8080/").body(()).unwrap();
    let post = Request::builder().method(Method::POST).uri("https://127.0.0.1:8080/x").body(()).unwrap();
    let hostname = Request::builder().method(Method::CONNECT).uri("reviews.default:9080").body(()).unwrap();
    let no_port = Request::builder().method(Method::CONNECT).uri("127.0.0.1:0").body(()).unwrap();
    let statuses = raw_requests(&setup, vec![get, post, hostname, no_port]).await;
    assert_eq!(statuses, [STATUS_BAD_REQUEST; 4]);
    assert!(setup.server.inbound.requests().is_empty(), "the handler was consulted");

    // A well-formed CONNECT on the same raw connection reaches the handler.
    let echo = echo_server().await;
    let ok = Request::builder().method(Method::CONNECT).uri(echo.to_string()).body(()).unwrap();
    assert_eq!(raw_requests(&setup, vec![ok]).await, [StatusCode::OK]);
    assert_eq!(setup.server.inbound.requests().len(), 1);
}

#[tokio::test]
async fn every_tunnel_is_reported_with_its_counts() {
    let setup = Setup::default().await;
    let echo = echo_server().await;
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8usize {
        let (pool, key, done) = (setup.pool.clone(), setup.key.clone(), done.clone());
        tasks.spawn(async move {
            let tunnel = pool.connect(&key, ConnectRequest::new(echo)).await.unwrap();
            let data = pattern(1000 * (i + 1), i as u8);
            assert_eq!(round_trip(tunnel, &data).await, data);
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let mut sizes: Vec<u64> =
        setup.server.inbound.wait_closed(8).await.into_iter().map(|r| r.unwrap().received).collect();
    sizes.sort();
    assert_eq!(sizes, (1..=8).map(|i| 1000 * i).collect::<Vec<u64>>());
}
