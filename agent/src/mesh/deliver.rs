//! The last hop: the agent's connection to a local workload, carrying a connection it received
//! (or captured) for it.
//!
//! The socket is transparent (`IP_TRANSPARENT`) and bound to the original client's address, so
//! the workload sees the source it expects and the kernel's identity cache finds the client's
//! identity; it carries [`MARK_TUNNEL`], which only a process with CAP_NET_ADMIN in the node's
//! namespace can set, so the workload's TC program decides it in the authenticated view of its
//! policy. The workload's replies are marked by the kernel and routed back here (`routing`).

use std::net::{SocketAddr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use warden_common::MARK_TUNNEL;

use super::local_hop::LocalCongestion;

/// `IP_BIND_ADDRESS_NO_PORT` (not wrapped by socket2).
fn bind_address_no_port(socket: &Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Connect to `workload` as `client` (port chosen by the kernel), with the local hops' congestion
/// control.
pub async fn connect(
    client: std::net::Ipv4Addr,
    workload: SocketAddrV4,
    congestion: LocalCongestion,
) -> std::io::Result<TcpStream> {
    // Transparent: the client's address is not the node's.
    last_hop(client, true, congestion)?.connect(SocketAddr::V4(workload)).await
}

/// Connect to `workload` on behalf of the workload itself (it reached itself through a Service),
/// from the capture address `capture` (the workload's gateway on the node). Its own address cannot
/// be the source: a packet arriving on its interface from its own address is a martian, and
/// dropped. So the workload sees the node's address as its peer, as kube-proxy's hairpin
/// masquerade shows it. The socket carries [`MARK_TUNNEL`]: the workload's TC program decides a
/// marked connection from the capture address as one from the workload itself, in the
/// authenticated view of its policy (the agent has authorized it with the workload's identity).
pub async fn connect_hairpin(
    capture: std::net::Ipv4Addr,
    workload: SocketAddrV4,
    congestion: LocalCongestion,
) -> std::io::Result<TcpStream> {
    last_hop(capture, false, congestion)?.connect(SocketAddr::V4(workload)).await
}

/// A marked, non-blocking socket bound to `source` (`transparent`: an address not the node's).
fn last_hop(source: std::net::Ipv4Addr, transparent: bool, congestion: LocalCongestion) -> std::io::Result<TcpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    congestion.apply(&socket)?;
    if transparent {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_mark(MARK_TUNNEL)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    // The port is chosen at connect(), unique per (source, workload) pair: bind() alone would
    // search a port free for the source address whatever the destination, past every TIME-WAIT
    // socket of earlier deliveries (`cargo xtask bench mtls` saw the rate fall tenfold).
    bind_address_no_port(&socket)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())?;
    Ok(TcpSocket::from_std_stream(socket.into()))
}
