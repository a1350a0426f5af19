//! The packet trace: while the agent sets `CONFIG_F_TRACE` (an `lbctl trace` is
//! connected), each decision about VIP traffic goes to the TRACE ring buffer. Built only
//! with the `trace` feature (the default); the benchmark builds the program without it
//! too, to show that tracing off costs nothing measurable.

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use lb_common::{
    FAMILY_V4, FAMILY_V6, FlowKey, NO_BACKEND, PROTO_TCP, TRACE_F_ARP, TRACE_FORWARDED, TraceEvent,
};

use crate::{
    headers::{
        ArpHdr, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, be16,
        ptr_at,
    },
    maps::TRACE,
    parse_ethernet,
};

/// A forwarded packet: its flow, the backend it went to, `TRACE_F_*` flags. Not
/// inlined: the event is built on a frame of its own, not on the pipeline's, whose
/// stack the NAT path's calls share (512 bytes for the deepest chain).
#[inline(never)]
pub fn forwarded(flow: &FlowKey, verdict: u32, backend: u32, flags: u32) {
    // Written in place in the ring, as in `ended`. A full ring loses this event; the
    // agent tells the client how many it lost.
    let Some(mut entry) = TRACE.reserve::<TraceEvent>(0) else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved entry, ours until submitted.
    unsafe {
        (*e).flow = *flow;
        (*e).reason = TRACE_FORWARDED;
        (*e).verdict = verdict;
        (*e).backend = backend;
        (*e).flags = flags;
    }
    entry.submit(0);
}

/// A packet that ended for `why`: its 5-tuple read again, as far as the headers allow
/// (the pipeline does not keep it on this path, so nothing is paid while off). Not
/// inlined, to keep the pipeline's frame small; it takes the raw context so that the
/// compiler cannot hand it packet pointers the verifier would refuse to compare.
#[inline(never)]
pub fn ended(raw: *mut xdp_md, why: u32, verdict: u32) {
    let ctx = &XdpContext::new(raw);
    // Written in place in the ring, not built on the pipeline's stack (whose 512 bytes
    // the NAT path's calls share). A full ring loses this event.
    let Some(mut entry) = TRACE.reserve::<TraceEvent>(0) else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved entry, ours until submitted; all-zero is a valid event.
    unsafe {
        core::ptr::write_bytes(e, 0, 1);
        (*e).reason = why;
        (*e).verdict = verdict;
        (*e).backend = NO_BACKEND;
        read_flow(ctx, &mut *e);
    }
    entry.submit(0);
}

#[inline(always)]
fn read_flow(ctx: &XdpContext, event: &mut TraceEvent) {
    let Ok((ether_type, l3)) = parse_ethernet(ctx) else {
        return;
    };
    let flow = &mut event.flow;
    match ether_type {
        ETH_P_IP => {
            let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
                return;
            };
            let ip = unsafe { &*ip };
            flow.family = FAMILY_V4;
            flow.proto = ip.proto;
            flow.src[..4].copy_from_slice(&ip.src);
            flow.dst[..4].copy_from_slice(&ip.dst);
            // Ports only of a whole TCP segment behind a plain header.
            let whole = ip.version_ihl == 0x45 && be16(ip.frag_off) & 0x3fff == 0;
            if whole && ip.proto == PROTO_TCP {
                read_ports(ctx, l3 + IPV4_HLEN, flow);
            }
        }
        ETH_P_IPV6 => {
            let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
                return;
            };
            let ip = unsafe { &*ip };
            flow.family = FAMILY_V6;
            flow.proto = ip.next_hdr;
            flow.src = ip.src;
            flow.dst = ip.dst;
            if ip.next_hdr == PROTO_TCP {
                read_ports(ctx, l3 + IPV6_HLEN, flow);
            }
        }
        ETH_P_ARP => {
            let Some(arp) = ptr_at::<ArpHdr>(ctx, l3) else {
                return;
            };
            let arp = unsafe { &*arp };
            flow.family = FAMILY_V4;
            flow.src[..4].copy_from_slice(&arp.spa);
            flow.dst[..4].copy_from_slice(&arp.tpa);
            event.flags |= TRACE_F_ARP;
        }
        _ => {}
    }
}

#[inline(always)]
fn read_ports(ctx: &XdpContext, l4: usize, flow: &mut FlowKey) {
    if let Some(ports) = ptr_at::<[u8; 4]>(ctx, l4) {
        let ports = unsafe { &*ports };
        flow.sport_be = u16::from_ne_bytes([ports[0], ports[1]]);
        flow.dport_be = u16::from_ne_bytes([ports[2], ports[3]]);
    }
}
