//! The pool: multiplexing, single-flight, idle close, reconnects; and server shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warden_hbone::{ConnectError, ConnectRequest, Key, PoolOptions, PoolStats, ServerOptions, Tunnel};

use crate::common::*;

/// Opens `n` tunnels concurrently and keeps them all open.
async fn open_concurrently(setup: &Setup, n: usize, dst: std::net::SocketAddr) -> Vec<Tunnel> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (pool, key) = (setup.pool.clone(), setup.key.clone());
        tasks.spawn(async move { pool.connect(&key, ConnectRequest::new(dst)).await });
    }
    let mut tunnels = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        tunnels.push(done.expect("task").expect("tunnel"));
    }
    tunnels
}

async fn use_all(tunnels: Vec<Tunnel>) {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, tunnel) in tunnels.into_iter().enumerate() {
        tasks.spawn(async move {
            let data = pattern(4096, i as u8);
            assert_eq!(round_trip(tunnel, &data).await, data);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("tunnel works");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_tunnels_share_one_connection() {
    let setup = Setup::default().await;
    let echo = echo_server().await;
    let tunnels = open_concurrently(&setup, 50, echo).await;
    assert_eq!(setup.pool.key_stats(&setup.key), PoolStats { connections: 1, streams: 50 });
    assert_eq!(setup.server.tls.handshakes.load(Ordering::SeqCst), 1, "one TLS connection reached the server");
    let ids: std::collections::HashSet<u64> = tunnels.iter().map(Tunnel::connection_id).collect();
    assert_eq!(ids.len(), 1);
    use_all(tunnels).await;
    assert_eq!(setup.pool.key_stats(&setup.key), PoolStats { connections: 1, streams: 0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_stream_limit_spreads_tunnels_over_connections() {
    let options = ServerOptions { max_concurrent_streams: 10, ..ServerOptions::default() };
    let setup = Setup::new(options, PoolOptions::default()).await;
    let echo = echo_server().await;
    let tunnels = open_concurrently(&setup, 50, echo).await;
    assert_eq!(setup.pool.key_stats(&setup.key), PoolStats { connections: 5, streams: 50 });
    assert_eq!(setup.server.tls.handshakes.load(Ordering::SeqCst), 5);
    let mut per_connection = std::collections::HashMap::<u64, usize>::new();
    for t in &tunnels {
        *per_connection.entry(t.connection_id()).or_default() += 1;
    }
    assert!(per_connection.values().all(|n| *n == 10), "{per_connection:?}");
    use_all(tunnels).await;
}

#[tokio::test]
async fn our_own_stream_cap_opens_another_connection() {
    let pool_options = PoolOptions { max_streams_per_connection: 2, ..PoolOptions::default() };
    let setup = Setup::new(ServerOptions::default(), pool_options).await;
    let echo = echo_server().await;
    let tunnels = open_concurrently(&setup, 5, echo).await;
    assert_eq!(setup.pool.key_stats(&setup.key), PoolStats { connections: 3, streams: 5 });
    use_all(tunnels).await;
}

#[tokio::test]
async fn keys_do_not_share_connections() {
    let setup = Setup::default().await;
    let echo = echo_server().await;
    let a = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap();
    // Same source and node, but a different set of accepted server identities.
    let other = Key::new(id(CLIENT), setup.server.addr, vec![id(SERVER), id("other")]);
    let b = setup.pool.connect(&other, ConnectRequest::new(echo)).await.unwrap();
    assert_ne!(a.connection_id(), b.connection_id());
    assert_eq!(setup.pool.stats(), PoolStats { connections: 2, streams: 2 });
    assert_eq!(setup.pool.stats_by_key().len(), 2);
}

#[tokio::test]
async fn concurrent_first_connects_make_one_attempt_and_share_its_error() {
    let pool_options = PoolOptions { connect_timeout: Duration::from_millis(500), ..PoolOptions::default() };
    let setup = Setup::new(ServerOptions::default(), pool_options).await;
    // A node that accepts TCP connections and never answers the TLS handshake.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let key = Key::new(id(CLIENT), node, vec![id(SERVER)]);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (pool, key) = (setup.pool.clone(), key.clone());
        tasks.spawn(async move { pool.connect(&key, ConnectRequest::new(node)).await.map(drop) });
    }
    while let Some(done) = tasks.join_next().await {
        let err = done.unwrap().unwrap_err();
        assert!(matches!(err, ConnectError::Timeout { stage: "TLS handshake", .. }), "{err}");
    }
    assert_eq!(setup.client_tls.configs.load(Ordering::SeqCst), 1, "one connection attempt for 20 callers");
    assert_eq!(setup.pool.stats(), PoolStats::default());
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let pool_options = PoolOptions { idle_timeout: Duration::from_millis(200), ..PoolOptions::default() };
    let setup = Setup::new(ServerOptions::default(), pool_options).await;
    let echo = echo_server().await;
    let tunnel = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap();
    // In use: not idle, however long it takes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(setup.pool.key_stats(&setup.key).connections, 1);
    assert_eq!(round_trip(tunnel, b"x").await, b"x");
    eventually(|| (setup.pool.stats() == PoolStats::default()).then_some(())).await;
    // The next tunnel opens a new connection.
    let tunnel = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap();
    assert_eq!(round_trip(tunnel, b"y").await, b"y");
    assert_eq!(setup.server.tls.handshakes.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_pool_reconnects_transparently_after_the_server_restarts() {
    let mut setup = Setup::default().await;
    let echo = echo_server().await;
    let first = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap();
    assert_eq!(round_trip(first, b"before").await, b"before");
    assert_eq!(setup.pool.key_stats(&setup.key).connections, 1);

    // The node agent restarts on the same address.
    setup.server.shutdown();
    (&mut setup.server.task).await.unwrap();
    let listener = TcpListener::bind(setup.server.addr).await.unwrap();
    let restarted = Server::start_on(listener, setup.server.tls.clone(), ServerOptions::default());

    // Whether or not the pool has noticed yet, the caller gets a working tunnel.
    let second = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap();
    assert_eq!(round_trip(second, b"after").await, b"after");
    assert_eq!(restarted.inbound.requests().len(), 1);
    assert_eq!(setup.pool.key_stats(&setup.key).connections, 1, "the closed connection was dropped");
    assert_eq!(setup.server.tls.handshakes.load(Ordering::SeqCst), 2);
}

/// A TCP relay to `to` whose existing connections can be turned into black holes: bytes are read
/// and dropped in both directions, the sockets stay open (a peer that vanished without a FIN).
struct Relay {
    addr: std::net::SocketAddr,
    connections: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Relay {
    async fn start(to: std::net::SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let registry = connections.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(to).await else { continue };
                let hole = Arc::new(AtomicBool::new(false));
                registry.lock().unwrap().push(hole.clone());
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, hole.clone()));
                tokio::spawn(pump(sr, cw, hole));
            }
        });
        Relay { addr, connections }
    }

    fn black_hole_existing(&self) {
        for hole in self.connections.lock().unwrap().iter() {
            hole.store(true, Ordering::SeqCst);
        }
    }
}

async fn pump(mut from: impl AsyncReadExt + Unpin, mut to: impl AsyncWriteExt + Unpin, hole: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if !hole.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_silently_dead_connection_is_detected_and_the_tunnel_retried_on_a_new_one() {
    let pool_options = PoolOptions {
        ping_interval: Duration::from_millis(100),
        ping_timeout: Duration::from_millis(300),
        ..PoolOptions::default()
    };
    let setup = Setup::new(ServerOptions::default(), pool_options).await;
    let echo = echo_server().await;
    let relay = Relay::start(setup.server.addr).await;
    let key = Key::new(id(CLIENT), relay.addr, vec![id(SERVER)]);
    let first = setup.pool.connect(&key, ConnectRequest::new(echo)).await.unwrap();
    let first_connection = first.connection_id();
    assert_eq!(round_trip(first, b"before").await, b"before");

    // The connection still looks open to the pool, but nothing gets through any more.
    relay.black_hole_existing();
    let started = std::time::Instant::now();
    let second = setup.pool.connect(&key, ConnectRequest::new(echo)).await.unwrap();
    assert_ne!(second.connection_id(), first_connection, "the tunnel moved to a new connection");
    assert_eq!(round_trip(second, b"after").await, b"after");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(setup.pool.key_stats(&key).connections, 1, "the dead connection was dropped");
    assert_eq!(setup.server.tls.handshakes.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_pool_notices_a_closed_connection_without_being_used() {
    let mut setup = Setup::default().await;
    let echo = echo_server().await;
    let tunnel = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap();
    assert_eq!(round_trip(tunnel, b"x").await, b"x");
    setup.server.shutdown();
    eventually(|| (setup.pool.stats() == PoolStats::default()).then_some(())).await;
}

#[tokio::test]
async fn shutdown_lets_open_tunnels_finish_and_refuses_new_ones() {
    let mut setup = Setup::default().await;
    let echo = echo_server().await;
    let mut tunnel = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap();
    setup.server.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!setup.server.task.is_finished(), "the open tunnel keeps the server draining");

    // The open tunnel still works.
    tunnel.write_all(b"draining").await.unwrap();
    let mut buf = [0u8; 8];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"draining");

    // New tunnels are not accepted (GOAWAY on the connection, listener closed).
    let err = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap_err();
    assert!(matches!(err, ConnectError::Connect { .. }), "{err}");

    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).await.unwrap();
    drop(tunnel);
    tokio::time::timeout(Duration::from_secs(5), &mut setup.server.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn the_drain_timeout_drops_lingering_tunnels() {
    let options = ServerOptions { drain_timeout: Duration::from_millis(300), ..ServerOptions::default() };
    let mut setup = Setup::new(options, PoolOptions::default()).await;
    let echo = echo_server().await;
    let mut tunnel = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap();
    setup.server.shutdown();
    tokio::time::timeout(Duration::from_secs(5), &mut setup.server.task).await.unwrap().unwrap();
    // The tunnel ends (with an error or EOF) instead of hanging.
    let ended = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut [0u8; 8])).await.unwrap();
    assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
}

#[tokio::test]
async fn dropping_the_pool_closes_idle_connections() {
    let setup = Setup::default().await;
    let echo = echo_server().await;
    let tunnel = setup.pool.connect(&setup.key, ConnectRequest::new(echo)).await.unwrap();
    assert_eq!(round_trip(tunnel, b"x").await, b"x");
    let Setup { pool, mut server, .. } = setup;
    drop(pool);
    // With its only client connection closed, the server drains at once.
    server.shutdown();
    tokio::time::timeout(Duration::from_secs(5), &mut server.task).await.unwrap().unwrap();
}
