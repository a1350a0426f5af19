//! ICMP errors about VIP flows. In DSR a backend answers the client from the VIP, so a
//! router's "fragmentation needed" (IPv4) or "packet too big" (IPv6) about such an
//! answer comes back to the VIP, that is to the LB: it must reach the backend that sent
//! the packet, or path-MTU discovery never works. The quoted packet is the backend's
//! (VIP:port -> client:cport); the client's flow key is that 5-tuple turned around.

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, counters::reason};

use crate::{
    Step,
    headers::{IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, be16, ptr_at},
    is_ipv6_ext,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// Type, code, checksum and the 4 bytes (unused + next-hop MTU, or the MTU) before the
/// quoted packet, in ICMP and ICMPv6 alike.
const ICMP_HLEN: usize = 8;

/// Source and destination ports: the first 4 bytes of the quoted TCP header, which
/// every ICMP error carries (RFC 792 asks for 8 bytes of it).
#[repr(C)]
struct Ports {
    src: [u8; 2],
    dst: [u8; 2],
}

/// `l4` is where the ICMP message starts, `end` where the IP packet ends.
#[inline(always)]
pub fn quoted_flow_v4(ctx: &XdpContext, l4: usize, end: usize) -> Step<FlowKey> {
    let icmp: *const [u8; ICMP_HLEN] = ptr_at(ctx, l4).ok_or(reason::DROP_BAD_ICMP)?;
    let (icmp_type, code) = unsafe { ((*icmp)[0], (*icmp)[1]) };
    // Echo and every other ICMP message to a VIP: no service of ours.
    if icmp_type != ICMP_DEST_UNREACH || code != ICMP_FRAG_NEEDED {
        return Err(reason::DROP_VIP_UNSERVED);
    }
    let inner_l3 = l4 + ICMP_HLEN;
    let ip: *const Ipv4Hdr = ptr_at(ctx, inner_l3).ok_or(reason::DROP_BAD_ICMP)?;
    let ip = unsafe { &*ip };
    // Options would move the ports; a later fragment quotes no ports at all.
    if ip.version_ihl != 0x45 || be16(ip.frag_off) & 0x1fff != 0 {
        return Err(reason::DROP_BAD_ICMP);
    }
    if ip.proto != PROTO_TCP {
        return Err(reason::DROP_VIP_UNSERVED);
    }
    let ports = quoted_ports(ctx, inner_l3 + IPV4_HLEN, end)?;
    let mut client = [0u8; 16];
    client[..4].copy_from_slice(&ip.dst);
    let mut vip = [0u8; 16];
    vip[..4].copy_from_slice(&ip.src);
    Ok(client_flow(client, vip, ports, FAMILY_V4))
}

#[inline(always)]
pub fn quoted_flow_v6(ctx: &XdpContext, l4: usize, end: usize) -> Step<FlowKey> {
    let icmp: *const [u8; ICMP_HLEN] = ptr_at(ctx, l4).ok_or(reason::DROP_BAD_ICMP)?;
    // Echo, neighbour discovery not for us to answer, and the rest: no service of ours.
    if unsafe { (*icmp)[0] } != ICMPV6_PACKET_TOO_BIG {
        return Err(reason::DROP_VIP_UNSERVED);
    }
    let inner_l3 = l4 + ICMP_HLEN;
    let ip: *const Ipv6Hdr = ptr_at(ctx, inner_l3).ok_or(reason::DROP_BAD_ICMP)?;
    let ip = unsafe { &*ip };
    if ip.version_class_flow[0] >> 4 != 6 || is_ipv6_ext(ip.next_hdr) {
        return Err(reason::DROP_BAD_ICMP);
    }
    if ip.next_hdr != PROTO_TCP {
        return Err(reason::DROP_VIP_UNSERVED);
    }
    let ports = quoted_ports(ctx, inner_l3 + IPV6_HLEN, end)?;
    Ok(client_flow(ip.dst, ip.src, ports, FAMILY_V6))
}

#[inline(always)]
fn quoted_ports(ctx: &XdpContext, at: usize, end: usize) -> Step<([u8; 2], [u8; 2])> {
    // The frame bound first: the verifier needs it, and the IP bound (Ethernet padding
    // is not part of the packet) alone would let the compiler drop it.
    let p: *const Ports = ptr_at(ctx, at).ok_or(reason::DROP_BAD_ICMP)?;
    if at + core::mem::size_of::<Ports>() > end {
        return Err(reason::DROP_BAD_ICMP);
    }
    Ok(unsafe { ((*p).src, (*p).dst) })
}

/// The backend sent vip:vport -> client:cport; the client's key is the other way round.
#[inline(always)]
fn client_flow(
    client: [u8; 16],
    vip: [u8; 16],
    (vport, cport): ([u8; 2], [u8; 2]),
    family: u8,
) -> FlowKey {
    crate::keys::flow_key(
        &client,
        &vip,
        u16::from_ne_bytes(cport),
        u16::from_ne_bytes(vport),
        family,
    )
}
