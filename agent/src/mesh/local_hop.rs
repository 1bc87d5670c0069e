//! The congestion control of the agent's hops to workloads of its own node: the captured
//! connection a workload opened to the capture listener, and the delivery the agent opens to a
//! workload (`deliver`).
//!
//! Such a hop is two sockets of one kernel joined by a veth. Nothing on it queues but the
//! receiver's buffer, which TCP's window already guards, so pacing a hop like this buys nothing,
//! and a pacing congestion control (BBR, the node default on some platforms) costs timer work on
//! every burst: without an `fq` qdisc the kernel paces with a per-socket hrtimer and sends from
//! softirq. Measured in the `bench mtls` lab (a BBR node), delivering cross-node traffic with
//! cubic instead of BBR cut the machine's CPU per GB by a tenth (docs/mesh.md).
//!
//! So the agent sets its own choice (`--local-congestion-control`, cubic by default) on these
//! sockets only. Its connections between nodes keep the node's default: that is the operator's
//! choice for the network. The workloads' own sockets are never touched.

use std::{fmt, str::FromStr};

use socket2::Socket;

/// `TCP_CA_NAME_MAX` less the terminating NUL.
const NAME_MAX: usize = 15;

/// What the agent's local hops use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalCongestion {
    /// The network namespace's default (`net.ipv4.tcp_congestion_control`).
    Inherit,
    /// This algorithm, set with `TCP_CONGESTION`.
    Algorithm(Algorithm),
}

/// A congestion-control algorithm's name as the kernel knows it (`cubic`, `reno`, `bbr`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Algorithm {
    name: [u8; NAME_MAX],
    len: u8,
}

impl Algorithm {
    pub fn as_bytes(&self) -> &[u8] {
        &self.name[..usize::from(self.len)]
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only ASCII is accepted (`FromStr`).
        f.write_str(std::str::from_utf8(self.as_bytes()).unwrap_or("?"))
    }
}

impl fmt::Debug for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Algorithm({self})")
    }
}

impl FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("an empty name".into());
        }
        if s.len() > NAME_MAX {
            return Err(format!("{s:?} is longer than the kernel's {NAME_MAX} characters"));
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(format!("{s:?} is not a congestion-control name (letters, digits, '_' and '-')"));
        }
        let mut name = [0; NAME_MAX];
        name[..s.len()].copy_from_slice(s.as_bytes());
        Ok(Algorithm { name, len: s.len() as u8 })
    }
}

impl FromStr for LocalCongestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inherit" => Ok(LocalCongestion::Inherit),
            _ => s.parse().map(LocalCongestion::Algorithm),
        }
    }
}

impl fmt::Display for LocalCongestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalCongestion::Inherit => f.write_str("inherit"),
            LocalCongestion::Algorithm(a) => a.fmt(f),
        }
    }
}

impl Default for LocalCongestion {
    fn default() -> Self {
        LocalCongestion::Algorithm(DEFAULT.parse().expect("a valid name"))
    }
}

/// The default: the kernel's own default algorithm, which does not pace.
pub const DEFAULT: &str = "cubic";

impl LocalCongestion {
    /// Set on `socket` (a listener passes it on to the connections it accepts).
    pub fn apply(&self, socket: &Socket) -> std::io::Result<()> {
        match self {
            LocalCongestion::Inherit => Ok(()),
            LocalCongestion::Algorithm(a) => socket.set_tcp_congestion(a.as_bytes()),
        }
    }

    /// Whether this kernel lets the agent use it: checked once at start, so a name the kernel
    /// does not have is an error naming the option there, not a failure of every connection.
    pub fn check(&self) -> anyhow::Result<()> {
        use socket2::{Domain, Protocol, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        self.apply(&socket).map_err(|e| {
            let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into());
            anyhow::anyhow!(
                "--local-congestion-control {self}: the kernel refused it ({e}); available: {available}, or `inherit`"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_parsed_and_bad_ones_refused_with_the_reason() {
        assert_eq!("inherit".parse::<LocalCongestion>(), Ok(LocalCongestion::Inherit));
        let cubic: LocalCongestion = "cubic".parse().unwrap();
        assert_eq!(cubic, LocalCongestion::default());
        assert_eq!(cubic.to_string(), "cubic");
        assert_eq!("bbr".parse::<Algorithm>().unwrap().as_bytes(), b"bbr");
        assert!("".parse::<Algorithm>().unwrap_err().contains("empty"));
        assert!("a-name-longer-than-15".parse::<Algorithm>().unwrap_err().contains("15 characters"));
        assert!("cubic\0".parse::<Algorithm>().unwrap_err().contains("not a congestion-control name"));
    }

    #[test]
    fn the_algorithm_is_set_on_the_socket_and_inherit_leaves_the_default() {
        use socket2::{Domain, Protocol, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        let default = socket.tcp_congestion().unwrap();
        LocalCongestion::Inherit.apply(&socket).unwrap();
        assert_eq!(socket.tcp_congestion().unwrap(), default);
        // reno is always built in (the kernel's fallback).
        let reno: LocalCongestion = "reno".parse().unwrap();
        reno.apply(&socket).unwrap();
        assert_eq!(socket.tcp_congestion().unwrap().split(|&b| b == 0).next().unwrap(), b"reno");
        let missing: LocalCongestion = "nosuchalgo".parse().unwrap();
        let e = missing.check().unwrap_err().to_string();
        assert!(e.contains("--local-congestion-control nosuchalgo") && e.contains("available:"), "{e}");
    }
}
