//! A small synchronous rtnetlink client: the rules, routes and addresses the mesh's routing
//! needs, as typed values, in the agent's own network namespace. No `ip` binary: a check of the
//! node's routing is a few `recv`s, cheap enough to repeat while the agent runs.
//!
//! Each call sends one request and reads its answer to the end (an ACK or a NACK for a change, the
//! whole dump for a listing); the kernel's error comes back as the `errno` it sent, with the
//! request named.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, IpProtocol, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A netlink request the kernel refused, or a socket that failed.
#[derive(Debug, thiserror::Error)]
#[error("routing: {what}: {source}")]
pub struct NetlinkError {
    /// The request, in `ip`'s words (`adding rule 1001: ...`).
    pub what: String,
    pub source: io::Error,
}

impl NetlinkError {
    /// The kernel's `errno` for the request, if it answered with one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// A policy-routing rule of the selectors the mesh uses, for IPv4: enough to add the mesh's
/// rules and to recognise them (and anything else at their priorities) in a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub pref: u32,
    /// `iif NAME`.
    pub iif: Option<String>,
    /// `ipproto tcp dport PORT`.
    pub tcp_dport: Option<u16>,
    /// `fwmark VALUE/MASK`.
    pub fwmark: Option<(u32, u32)>,
    /// `lookup TABLE`.
    pub table: u32,
    /// Selectors or an action the mesh never uses, as `ip rule` would print them: such a rule is
    /// never the mesh's.
    pub other: Vec<String>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let from = self.other.iter().find(|o| o.starts_with("from "));
        write!(f, "{}: {}", self.pref, from.map_or("from all", String::as_str))?;
        if let Some(iif) = &self.iif {
            write!(f, " iif {iif}")?;
        }
        if let Some((mark, mask)) = self.fwmark {
            write!(f, " fwmark {mark:#x}/{mask:#x}")?;
        }
        if let Some(port) = self.tcp_dport {
            write!(f, " ipproto tcp dport {port}")?;
        }
        for o in self.other.iter().filter(|o| Some(*o) != from) {
            write!(f, " {o}")?;
        }
        match self.table {
            254 => write!(f, " lookup main"),
            t => write!(f, " lookup {t}"),
        }
    }
}

impl Rule {
    fn to_message(&self) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.action = RuleAction::ToTable;
        // The table goes in FRA_TABLE: the header's byte holds only the first 256.
        m.header.table = if self.table < 256 { self.table as u8 } else { 0 };
        m.attributes.push(RuleAttribute::Priority(self.pref));
        m.attributes.push(RuleAttribute::Table(self.table));
        if let Some(iif) = &self.iif {
            m.attributes.push(RuleAttribute::Iifname(iif.clone()));
        }
        if let Some((mark, mask)) = self.fwmark {
            m.attributes.push(RuleAttribute::FwMark(mark));
            m.attributes.push(RuleAttribute::FwMask(mask));
        }
        if let Some(port) = self.tcp_dport {
            m.attributes.push(RuleAttribute::IpProtocol(IpProtocol::Tcp));
            m.attributes.push(RuleAttribute::DestinationPortRange(RulePortRange { start: port, end: port }));
        }
        m
    }

    fn from_message(m: &RuleMessage) -> Rule {
        let mut rule = Rule {
            pref: 0,
            iif: None,
            tcp_dport: None,
            fwmark: None,
            table: u32::from(m.header.table),
            other: Vec::new(),
        };
        let (mut mark, mut mask, mut proto, mut dport) = (None, None, None, None);
        for a in &m.attributes {
            match a {
                RuleAttribute::Priority(p) => rule.pref = *p,
                RuleAttribute::Table(t) => rule.table = *t,
                RuleAttribute::Iifname(i) => rule.iif = Some(i.clone()),
                RuleAttribute::FwMark(v) => mark = Some(*v),
                RuleAttribute::FwMask(v) => mask = Some(*v),
                RuleAttribute::IpProtocol(p) => proto = Some(*p),
                RuleAttribute::DestinationPortRange(r) => dport = Some(*r),
                // Who added it says nothing of what it matches, and the kernel reports an unset
                // suppressor as -1.
                RuleAttribute::Protocol(_) | RuleAttribute::SuppressPrefixLen(u32::MAX) => {}
                RuleAttribute::Source(a) => rule.other.push(format!("from {a}/{}", m.header.src_len)),
                RuleAttribute::Destination(a) => rule.other.push(format!("to {a}/{}", m.header.dst_len)),
                RuleAttribute::Oifname(o) => rule.other.push(format!("oif {o}")),
                RuleAttribute::SourcePortRange(r) => rule.other.push(format!("sport {}-{}", r.start, r.end)),
                RuleAttribute::Goto(g) => rule.other.push(format!("goto {g}")),
                RuleAttribute::SuppressPrefixLen(n) => rule.other.push(format!("suppress_prefixlength {n}")),
                // Kernels since 6.15 report a port range's mask (FRA_SPORT_MASK, FRA_DPORT_MASK),
                // whole for a range.
                RuleAttribute::Other(nla) if is_whole_port_mask(nla) => {}
                other => rule.other.push(format!("{other:?}")),
            }
        }
        if m.header.tos != 0 {
            rule.other.push(format!("tos {:#x}", m.header.tos));
        }
        if m.header.action != RuleAction::ToTable {
            rule.other.push(format!("action {:?}", m.header.action));
        }
        if m.header.flags.bits() != 0 {
            rule.other.push(format!("flags {:#x}", m.header.flags.bits()));
        }
        // A mark without a mask matches the whole mark (`fwmark 0x1` is `0x1/0xffffffff`).
        rule.fwmark = mark.map(|v| (v, mask.unwrap_or(u32::MAX)));
        match (proto, dport) {
            (Some(IpProtocol::Tcp), Some(r)) if r.start == r.end => rule.tcp_dport = Some(r.start),
            (None, None) => {}
            (p, r) => {
                p.into_iter().for_each(|p| rule.other.push(format!("ipproto {p:?}")));
                r.into_iter().for_each(|r| rule.other.push(format!("dport {}-{}", r.start, r.end)));
            }
        }
        rule
    }
}

/// `FRA_SPORT_MASK` or `FRA_DPORT_MASK` of 0xffff: what a port range without a mask has.
fn is_whole_port_mask(nla: &netlink_packet_core::DefaultNla) -> bool {
    use netlink_packet_core::Nla;
    const FRA_SPORT_MASK: u16 = 28;
    const FRA_DPORT_MASK: u16 = 29;
    let mut value = [0; 2];
    matches!(nla.kind(), FRA_SPORT_MASK | FRA_DPORT_MASK) && nla.value_len() == 2 && {
        nla.emit_value(&mut value);
        value == [0xff, 0xff]
    }
}

/// The loopback device's index. `lo` is created first in every network namespace.
pub fn loopback() -> Result<u32, NetlinkError> {
    // SAFETY: a NUL-terminated name; the call only reads it.
    match unsafe { libc::if_nametoindex(c"lo".as_ptr()) } {
        0 => Err(NetlinkError { what: "finding the loopback device".into(), source: io::Error::last_os_error() }),
        i => Ok(i),
    }
}

/// A netlink socket of the agent's network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open() -> Result<Netlink, NetlinkError> {
        let err = |source| NetlinkError { what: "opening a netlink socket".into(), source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(err)?;
        socket.bind_auto().map_err(err)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
        // Dumps filtered by the kernel (a table's routes, not every table's).
        socket.set_netlink_get_strict_chk(true).map_err(err)?;
        // The kernel sizes a dump's datagrams from the reader's largest receive buffer (at least
        // one page): 64 KiB holds any of them.
        Ok(Netlink { socket, seq: 0, buf: vec![0; 64 * 1024] })
    }

    /// Send `msg` with `flags` and read its answer: the messages of a dump, or nothing for an
    /// acknowledged change.
    fn call(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: impl FnOnce() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.exchange(msg, flags).map_err(|source| NetlinkError { what: what(), source })
    }

    fn exchange(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;

        let mut messages = Vec::new();
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(messages),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                            None => Ok(messages),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        messages.push(m);
                        // The answer to a request that is neither a dump nor acknowledged.
                        if flags & (NLM_F_DUMP | NLM_F_ACK) == 0 {
                            return Ok(messages);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// The IPv4 rules at priority `pref`.
    pub fn rules(&mut self, pref: u32) -> Result<Vec<Rule>, NetlinkError> {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        let all = self.call(RouteNetlinkMessage::GetRule(m), NLM_F_DUMP, || "listing the rules".into())?;
        Ok(all
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(Rule::from_message(r)),
                _ => None,
            })
            .filter(|r| r.pref == pref)
            .collect())
    }

    pub fn add_rule(&mut self, rule: &Rule) -> Result<(), NetlinkError> {
        let m = RouteNetlinkMessage::NewRule(rule.to_message());
        self.call(m, NLM_F_ACK | NLM_F_CREATE, || format!("adding rule {rule}")).map(drop)
    }

    pub fn del_rule(&mut self, rule: &Rule) -> Result<(), NetlinkError> {
        let m = RouteNetlinkMessage::DelRule(rule.to_message());
        self.call(m, NLM_F_ACK, || format!("removing rule {rule}")).map(drop)
    }

    /// The destinations (address, prefix length) of the `local` routes of `table`.
    pub fn local_routes(&mut self, table: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.kind = RouteType::Local;
        m.attributes.push(RouteAttribute::Table(table));
        let all = match self.call(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP, || format!("listing table {table}")) {
            Ok(all) => all,
            // No route was ever added to it.
            Err(e) if e.errno() == Some(libc::ENOENT) => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(all
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .filter(|r| r.header.kind == RouteType::Local && route_table(r) == table)
            .map(|r| {
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                    _ => None,
                });
                (dst.unwrap_or(Ipv4Addr::UNSPECIFIED), r.header.destination_prefix_length)
            })
            .collect())
    }

    fn local_route(dst: Ipv4Addr, prefix: u8, table: u32, lo: u32) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = prefix;
        m.header.table = if table < 256 { table as u8 } else { 0 };
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Host;
        m.header.kind = RouteType::Local;
        m.attributes.push(RouteAttribute::Table(table));
        if prefix > 0 {
            m.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        }
        m.attributes.push(RouteAttribute::Oif(lo));
        m
    }

    /// `ip route replace local DST/PREFIX dev lo table TABLE`.
    pub fn replace_local_route(&mut self, dst: Ipv4Addr, prefix: u8, table: u32, lo: u32) -> Result<(), NetlinkError> {
        let m = RouteNetlinkMessage::NewRoute(Self::local_route(dst, prefix, table, lo));
        self.call(m, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, || {
            format!("adding route local {dst}/{prefix} dev lo table {table}")
        })
        .map(drop)
    }

    /// `ip route del local DST/PREFIX dev lo table TABLE`.
    pub fn del_local_route(&mut self, dst: Ipv4Addr, prefix: u8, table: u32, lo: u32) -> Result<(), NetlinkError> {
        let m = RouteNetlinkMessage::DelRoute(Self::local_route(dst, prefix, table, lo));
        self.call(m, NLM_F_ACK, || format!("removing route local {dst}/{prefix} dev lo table {table}")).map(drop)
    }

    /// Whether the node delivers packets to `addr` locally (`ip route get ADDR` says `local`). An
    /// address with no route at all is not local.
    pub fn is_local(&mut self, addr: Ipv4Addr) -> Result<bool, NetlinkError> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = 32;
        m.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(addr)));
        match self.call(RouteNetlinkMessage::GetRoute(m), 0, || format!("looking up the route to {addr}")) {
            Ok(answer) => Ok(answer
                .iter()
                .any(|m| matches!(m, RouteNetlinkMessage::NewRoute(r) if r.header.kind == RouteType::Local))),
            Err(e) if matches!(e.errno(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The IPv4 addresses of device `index` labelled `label`.
    pub fn labelled_addresses(&mut self, index: u32, label: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.index = index;
        let all = self.call(RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP, || "listing addresses".into())?;
        Ok(all
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => Some(a),
                _ => None,
            })
            .filter(|a| a.attributes.iter().any(|x| matches!(x, AddressAttribute::Label(l) if l == label)))
            .filter_map(|a| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(IpAddr::V4(v)) => Some((*v, a.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    fn host_address(addr: Ipv4Addr, prefix: u8, index: u32, label: &str) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix;
        m.header.scope = AddressScope::Host;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(IpAddr::V4(addr)));
        m.attributes.push(AddressAttribute::Address(IpAddr::V4(addr)));
        m.attributes.push(AddressAttribute::Label(label.into()));
        m
    }

    /// `ip addr add ADDR/PREFIX dev lo scope host label LABEL`.
    pub fn add_host_address(
        &mut self,
        addr: Ipv4Addr,
        prefix: u8,
        index: u32,
        label: &str,
    ) -> Result<(), NetlinkError> {
        let m = RouteNetlinkMessage::NewAddress(Self::host_address(addr, prefix, index, label));
        self.call(m, NLM_F_ACK | NLM_F_CREATE, || format!("adding address {addr}/{prefix} ({label})")).map(drop)
    }

    pub fn del_address(&mut self, addr: Ipv4Addr, prefix: u8, index: u32, label: &str) -> Result<(), NetlinkError> {
        let m = RouteNetlinkMessage::DelAddress(Self::host_address(addr, prefix, index, label));
        self.call(m, NLM_F_ACK, || format!("removing address {addr}/{prefix} ({label})")).map(drop)
    }
}

/// A route's table: `RTA_TABLE` when present (every table past 255 needs it), else the header's.
fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pref: u32) -> Rule {
        Rule { pref, iif: None, tcp_dport: None, fwmark: None, table: 254, other: Vec::new() }
    }

    #[test]
    fn a_rule_survives_the_round_trip_through_its_netlink_message() {
        let rules = [
            Rule { iif: Some("lo".into()), tcp_dport: Some(15008), ..rule(1000) },
            Rule { tcp_dport: Some(15008), table: 15008, ..rule(1001) },
            Rule { fwmark: Some((0x20_0000, 0xf0_0000)), table: 15009, ..rule(1002) },
        ];
        for r in rules {
            assert_eq!(Rule::from_message(&r.to_message()), r);
        }
    }

    #[test]
    fn what_the_kernel_adds_to_a_rule_it_reports_changes_nothing() {
        let want = Rule { iif: Some("lo".into()), tcp_dport: Some(15008), ..rule(1000) };
        let mut m = want.to_message();
        m.attributes.extend([
            RuleAttribute::Protocol(RouteProtocol::Boot),
            RuleAttribute::SuppressPrefixLen(u32::MAX),
            RuleAttribute::Other(netlink_packet_core::DefaultNla::new(29, vec![0xff, 0xff])),
        ]);
        assert_eq!(Rule::from_message(&m), want);
        // A real port mask is another rule.
        m.attributes.push(RuleAttribute::Other(netlink_packet_core::DefaultNla::new(29, vec![0xf0, 0xff])));
        assert_ne!(Rule::from_message(&m), want);
    }

    #[test]
    fn a_rule_with_a_selector_the_mesh_never_uses_says_so() {
        let mut m = Rule { table: 100, ..rule(1000) }.to_message();
        m.attributes.push(RuleAttribute::Source("10.0.0.0".parse().unwrap()));
        m.header.src_len = 8;
        let r = Rule::from_message(&m);
        assert_eq!(r.to_string(), "1000: from 10.0.0.0/8 lookup 100");
        assert_ne!(r, Rule { table: 100, ..rule(1000) });
        // A port range is not the mesh's port.
        let mut m = rule(1001).to_message();
        m.attributes.push(RuleAttribute::IpProtocol(IpProtocol::Tcp));
        m.attributes.push(RuleAttribute::DestinationPortRange(RulePortRange { start: 1, end: 2 }));
        assert!(!Rule::from_message(&m).other.is_empty());
    }

    #[test]
    fn rules_print_as_ip_rule_does() {
        let r = Rule { fwmark: Some((0x20_0000, 0xf0_0000)), table: 15009, ..rule(1002) };
        assert_eq!(r.to_string(), "1002: from all fwmark 0x200000/0xf00000 lookup 15009");
        let r = Rule { iif: Some("lo".into()), tcp_dport: Some(15008), ..rule(1000) };
        assert_eq!(r.to_string(), "1000: from all iif lo ipproto tcp dport 15008 lookup main");
    }
}
