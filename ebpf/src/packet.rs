//! Header parsing with explicit bounds checks. Anything that cannot be parsed is an error the
//! caller turns into a drop.

use warden_common::{DropReason, PROTO_TCP, PROTO_UDP};

pub const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IPV4_MIN_HDR: usize = 20;
/// Fragment offset bits of the IPv4 flags/offset field.
const IP_OFFSET_MASK: u16 = 0x1fff;

/// The L3/L4 facts a decision needs (addresses network order, ports host order).
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl Tuple {
    /// The first packet of a TCP connection.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
    /// A TCP packet that ends the connection.
    #[inline(always)]
    pub fn is_fin_or_rst(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
}

pub enum L3 {
    Ipv4(Tuple),
    /// ARP is let through: neighbours must resolve for any traffic to flow, and ARP carries no
    /// workload payload.
    Arp,
}

/// Bounds-checked reads from a packet.
pub trait Packet {
    fn read<T: Copy>(&self, offset: usize) -> Result<T, DropReason>;
}

/// Direct packet access (TC): the fastest path; the verifier checks the bounds test.
pub struct Direct {
    pub data: usize,
    pub data_end: usize,
}

impl Packet for Direct {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Result<T, DropReason> {
        if self.data + offset + core::mem::size_of::<T>() > self.data_end {
            return Err(DropReason::Malformed);
        }
        // SAFETY: the range [offset, offset + size_of::<T>()) lies inside the packet (checked
        // above); read_unaligned because packet data has no alignment guarantee.
        Ok(unsafe { core::ptr::read_unaligned((self.data + offset) as *const T) })
    }
}

/// Parse an Ethernet frame (TC hooks).
#[inline(always)]
pub fn parse_ethernet(p: &impl Packet) -> Result<L3, DropReason> {
    let ethertype = u16::from_be(p.read::<u16>(12)?);
    match ethertype {
        ETH_P_IP => parse_ipv4(p, ETH_HDR_LEN).map(L3::Ipv4),
        ETH_P_ARP => Ok(L3::Arp),
        _ => Err(DropReason::UnsupportedL3),
    }
}

/// Parse an IPv4 packet starting at `l3` bytes into the buffer.
#[inline(always)]
pub fn parse_ipv4(p: &impl Packet, l3: usize) -> Result<Tuple, DropReason> {
    let vihl = p.read::<u8>(l3)?;
    if vihl >> 4 != 4 {
        return Err(DropReason::UnsupportedL3);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HDR {
        return Err(DropReason::Malformed);
    }
    let frag = u16::from_be(p.read::<u16>(l3 + 6)?);
    if frag & IP_OFFSET_MASK != 0 {
        return Err(DropReason::Fragment);
    }
    let proto = p.read::<u8>(l3 + 9)?;
    let saddr = p.read::<[u8; 4]>(l3 + 12)?;
    let daddr = p.read::<[u8; 4]>(l3 + 16)?;
    let l4 = l3 + ihl;
    let (sport, dport) = if proto == PROTO_TCP || proto == PROTO_UDP {
        (u16::from_be(p.read::<u16>(l4)?), u16::from_be(p.read::<u16>(l4 + 2)?))
    } else {
        (0, 0)
    };
    let tcp_flags = if proto == PROTO_TCP { p.read::<u8>(l4 + 13)? } else { 0 };
    Ok(Tuple { saddr, daddr, sport, dport, proto, tcp_flags })
}
