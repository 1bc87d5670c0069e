//! The pool: multiplexing, single-flight, idle close, reconnects; and server shutdown.

use std::sync::atomic::Ordering;
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
    let setup = Setup::default().await;
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let key = Key::new(id(CLIENT), nobody, vec![id(SERVER)]);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (pool, key) = (setup.pool.clone(), key.clone());
        tasks.spawn(async move { pool.connect(&key, ConnectRequest::new(nobody)).await.map(drop) });
    }
    while let Some(done) = tasks.join_next().await {
        let err = done.unwrap().unwrap_err();
        assert!(matches!(err, ConnectError::Connect { node, .. } if node == nobody), "{err}");
    }
    let attempts = setup.client_tls.configs.load(Ordering::SeqCst);
    assert!(attempts <= 2, "{attempts} connection attempts for 20 concurrent callers");
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
