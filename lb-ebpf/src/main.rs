//! The XDP data path. One pipeline, read top to bottom:
//! Ethernet (+ one VLAN tag) -> ARP / IPv4 / IPv6 -> the VIP filter (one array load) ->
//! [TCP but a SYN, to an address with no DSR service: a NAT flow's segment either way,
//! sent from a frame of its own if it passes every check below (`nat::known`)] ->
//! VIP address? (for TCP: its service, whose hit says so; for an established segment to
//! an address with a DSR service, the connection table first, whose entry names the
//! service: see `service`) -> serving, our MAC? -> header sanity -> TCP (or an ICMP
//! error about a flow, see `icmp.rs`; or a NAT reply, see `nat.rs`) -> connection table
//! (`flowtab`, if not asked already), pinned table, else persistence or Maglev ring
//! (`persist::choose_backend`) -> backend -> MAC rewrite -> count -> XDP_TX.
//! The common case, an established DSR segment whose entry needs no write, is sent from
//! the TCP parse (`send_known`): no hash-map lookup (the connection table is an array
//! the program keeps) and no clock read (`is_current`). An established NAT segment asks
//! its flow's entry and no service (`nat::known`): one hash lookup each way.
//!
//! Each stage returns `Step<T>`: `Ok` goes on, `Err(reason)` ends the packet. The reason
//! is counted once in `lb_xdp` and mapped to a verdict by `verdict_of`.
#![no_std]
#![no_main]

mod filter;
mod flowtab;
mod headers;
mod icmp;
mod keys;
mod maps;
mod nat;
mod neigh;
mod null_fwd;
mod persist;
#[cfg(feature = "trace")]
mod trace;

use core::{
    mem::MaybeUninit,
    ptr::{addr_of, addr_of_mut},
};

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
        xdp_md,
    },
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::xdp,
    programs::XdpContext,
};
use headers::*;
use lb_common::{
    BACKEND_F_VALID, Backend, Counter, FAMILY_V4, FAMILY_V6, FLOW_F_CLOSING, FLOW_TOUCH_JIFFIES,
    FlowKey, FlowState, LbConfig, MAX_RING_SIZE, NO_BACKEND, PROTO_TCP, SERVE_F_FORWARD, Serving,
    VipInfo,
    counters::{backend_slot, event, event_slot, global_slot, reason, vip_slot},
    hash::flow_hash,
};
use maps::{
    BACKENDS, CONFIG, FLOOD_GUARD, LEASE_CACHE, PINNED, RINGS, SERVING, STATS, VIP_SLOTS, VIPS,
};

/// The flood guard's window.
const GUARD_WINDOW_NS: u64 = 1_000_000_000;

/// `Ok` to go on to the next stage, `Err(reason)` to end the packet (see `verdict_of`).
pub type Step<T> = Result<T, u32>;

/// Frags-aware (`xdp.frags`): jumbo and GRO'd frames come as a first buffer holding
/// the headers plus fragments; only the first buffer is read or written here.
#[xdp(frags)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let Some(cfg) = CONFIG.get(0) else {
        count(
            global_slot(reason::ABORT_INTERNAL),
            frame_len(&ctx) as u64,
            false,
        );
        return XDP_ABORTED;
    };
    match try_lb(&ctx, cfg) {
        Ok(verdict) => verdict,
        Err(why) => {
            count(global_slot(why), frame_len(&ctx) as u64, false);
            let verdict = verdict_of(why);
            // Traffic for no VIP is the host's own business: not traced.
            #[cfg(feature = "trace")]
            if tracing(cfg) && why != reason::PASS_NOT_VIP {
                trace::ended(ctx.ctx, why, verdict);
            }
            verdict
        }
    }
}

/// Whether an `lbctl trace` is listening: a flag of the config entry read anyway.
#[cfg(feature = "trace")]
#[inline(always)]
fn tracing(cfg: &LbConfig) -> bool {
    cfg.flags & lb_common::CONFIG_F_TRACE != 0
}

/// A program that passes everything: the baseline for benchmarks, and what the lab puts
/// on the peer of a veth so native XDP_TX works there.
/// Frags-aware too: a veth refuses a peer MTU above a page with a program that is not.
#[xdp(frags)]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Every reason a packet ends early, and what happens to it. Decided once, here.
#[inline(always)]
fn verdict_of(why: u32) -> u32 {
    match why {
        reason::PASS_NOT_VIP | reason::PASS_TRUNCATED => XDP_PASS,
        reason::ARP_REPLY | reason::ND_REPLY => XDP_TX,
        reason::ABORT_INTERNAL => XDP_ABORTED,
        _ => XDP_DROP,
    }
}

/// What the L3/L4 stages hand to the forwarding stage.
struct Packet {
    flow: FlowKey,
    vip: VipInfo,
    tcp_flags: u8,
    known: Known,
}

/// What the connection table said of a segment before its service was looked up
/// (`service`): `what` is one of `KNOWN_*`, `backend` the entry's on a hit. Plain
/// words, not an enum: `parse_ip` writes it through a pointer, where an enum's padding
/// could carry a register the verifier refuses to store in part.
#[derive(Clone, Copy)]
struct Known {
    what: u32,
    backend: u32,
}

/// Not asked: a SYN, an address with no DSR service, or not a plain TCP segment.
const KNOWN_NOT_ASKED: u32 = 0;
/// No entry.
const KNOWN_MISSED: u32 = 1;
/// An entry that needs a write for this segment (`is_current`).
const KNOWN_HIT: u32 = 2;
/// An entry that needs no write: the forwarding stage need not look it up again.
const KNOWN_HIT_CURRENT: u32 = 3;

impl Known {
    #[inline(always)]
    fn just(what: u32) -> Self {
        Known { what, backend: 0 }
    }
}

/// What a VIP packet turned out to be.
enum Parsed {
    /// TCP to a served (VIP, port).
    Tcp(Packet),
    /// An ICMP error about a flow: the client's 5-tuple, rebuilt from the quoted packet.
    IcmpError(FlowKey),
    /// TCP to a VIP address but no service's port: a backend's reply to a NAT flow if
    /// the NAT tables know it (its key as sent, and the TCP flags), else nothing of
    /// ours.
    NatReply(FlowKey, u8),
    /// An established DSR segment sent on to its backend already (`send_known`).
    Sent,
}

/// What `parse_ip` found (its `Ok`): `Parsed::Tcp`, with the whole `Packet` written.
const PARSED_TCP: u32 = 0;
/// `Parsed::IcmpError`: the `Packet`'s flow written.
const PARSED_ICMP_ERROR: u32 = 1;
/// `Parsed::NatReply`: the `Packet`'s flow and TCP flags written.
const PARSED_NAT_REPLY: u32 = 2;
/// `Parsed::Sent`: nothing written; the frame goes out (XDP_TX).
const PARSED_SENT: u32 = 3;

#[inline(always)]
fn try_lb(ctx: &XdpContext, cfg: &LbConfig) -> Step<u32> {
    let (ether_type, l3) = parse_ethernet(ctx)?;
    let mut out = MaybeUninit::<Packet>::uninit();
    // The VIP filter comes first, before any call: traffic for the host leaves after one
    // array load. Only an IPv6 neighbour solicitation, whose destination is a group, is
    // looked at before it.
    let what = match ether_type {
        ETH_P_IP => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(reason::PASS_TRUNCATED)?;
            // SAFETY: within the frame (`ptr_at`).
            let (dst, proto) = unsafe { ((*ip).dst, (*ip).proto) };
            if !filter::may_end_a_vip(dst[2], dst[3]) {
                return Err(reason::PASS_NOT_VIP);
            }
            if !filter::may_end_a_dsr_vip(dst[2], dst[3])
                && proto == PROTO_TCP
                && may_be_known_nat(ctx, l3 + IPV4_HLEN)
                && let Some(verdict) = known_nat(nat::known::<false>(ctx.ctx, cfg, l3))?
            {
                return Ok(verdict);
            }
            unpack(parse_ip::<false>(ctx.ctx, cfg, l3, &mut out))?
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(reason::PASS_TRUNCATED)?;
            // SAFETY: within the frame (`ptr_at`).
            let (next_hdr, hi, lo) = unsafe { ((*ip).next_hdr, (*ip).dst[14], (*ip).dst[15]) };
            if next_hdr == IPPROTO_ICMPV6 {
                unpack(solicitation(ctx.ctx, cfg, l3))?;
            }
            if !filter::may_end_a_vip(hi, lo) {
                return Err(reason::PASS_NOT_VIP);
            }
            if !filter::may_end_a_dsr_vip(hi, lo)
                && next_hdr == PROTO_TCP
                && may_be_known_nat(ctx, l3 + IPV6_HLEN)
                && let Some(verdict) = known_nat(nat::known::<true>(ctx.ctx, cfg, l3))?
            {
                return Ok(verdict);
            }
            unpack(parse_ip::<true>(ctx.ctx, cfg, l3, &mut out))?
        }
        ETH_P_ARP => return unpack(arp(ctx.ctx, cfg, l3)),
        _ => return Err(reason::PASS_NOT_VIP),
    };
    let out = out.as_ptr();
    // SAFETY: the fields `parse_ip` wrote for `what` (see `PARSED_TCP` and the others).
    unsafe {
        match what {
            PARSED_TCP => forward(ctx, cfg, &*out),
            PARSED_ICMP_ERROR => forward_icmp_error(ctx, cfg, &*addr_of!((*out).flow)),
            PARSED_SENT => Ok(XDP_TX),
            _ => nat::reply(ctx, &*addr_of!((*out).flow), *addr_of!((*out).tcp_flags)),
        }
    }
}

/// Whether the TCP segment at `l4` (where it starts in a plain header) may be one
/// `nat::known` sends: anything but a SYN, which opens a flow the long way (`nat::forward`).
#[inline(always)]
fn may_be_known_nat(ctx: &XdpContext, l4: usize) -> bool {
    match ptr_at::<TcpHdr>(ctx, l4) {
        // SAFETY: within the frame (`ptr_at`).
        Some(tcp) => (unsafe { (*tcp).flags }) & (TCP_SYN | TCP_ACK) != TCP_SYN,
        None => false,
    }
}

/// What `nat::known` said: `None` to go on with the parse, else its step.
#[inline(always)]
fn known_nat(packed: u64) -> Step<Option<u32>> {
    if packed == nat::NOT_KNOWN {
        return Ok(None);
    }
    unpack(packed).map(Some)
}

/// ARP from `l3` (`neigh::arp`), packed (see `pack`). Not inlined: its VIP address key
/// would otherwise sit in the pipeline's frame, which must leave room for the IPv6
/// parser's (`parse_ip`).
#[inline(never)]
fn arp(raw: *mut xdp_md, cfg: &LbConfig, l3: usize) -> u64 {
    let Some(serving) = SERVING.get(0) else {
        return pack(Err(reason::ABORT_INTERNAL));
    };
    pack(neigh::arp(&XdpContext::new(raw), l3, cfg, serving))
}

/// ICMPv6 from `l3`: a neighbour solicitation for a VIP answered (`neigh`), packed (see
/// `pack`; `Ok` for anything else). Not inlined: its VIP address key would otherwise sit
/// in the IPv6 parser's frame (`parse_ip`), which the pipeline's must leave room for.
#[inline(never)]
fn solicitation(raw: *mut xdp_md, cfg: &LbConfig, l3: usize) -> u64 {
    let Some(serving) = SERVING.get(0) else {
        return pack(Err(reason::ABORT_INTERNAL));
    };
    pack(neigh::neighbour_solicitation(&XdpContext::new(raw), l3, cfg, serving).map(|()| 0))
}

/// IPv4 (or IPv6, `V6`) from `l3` up to the VIP lookup; `Ok` says what it found
/// (`PARSED_TCP` and the others) and which fields of `out` it wrote. Not inlined, one
/// function per family: the keys it builds (word stores, which stay on the stack) and the
/// frame-length checks of `xdp.frags` would otherwise sit in the pipeline's frame, under
/// which the DSR and NAT calls must fit the 512-byte stack. Takes the raw context, so
/// that the compiler cannot hand it packet pointers the verifier would refuse. Writes
/// through `out` field by field: a returned struct would hand the caller a stack pointer
/// back, and an enum written whole stores padding from any register, a pointer too,
/// which the verifier refuses to spill in part.
#[inline(never)]
fn parse_ip<const V6: bool>(
    raw: *mut xdp_md,
    cfg: &LbConfig,
    l3: usize,
    out: &mut MaybeUninit<Packet>,
) -> u64 {
    pack(parse_ip_into::<V6>(raw, cfg, l3, out))
}

/// A `Step<u32>` as one register: `PACKED_OK | value`, or the reason. Returned as a
/// struct, it would go through a pointer to the caller's stack, which the verifier
/// refuses to see in r0 when the function returns.
const PACKED_OK: u64 = 1 << 32;

#[inline(always)]
pub fn pack(step: Step<u32>) -> u64 {
    match step {
        Ok(v) => PACKED_OK | v as u64,
        Err(why) => why as u64,
    }
}

#[inline(always)]
fn unpack(packed: u64) -> Step<u32> {
    if packed & PACKED_OK != 0 {
        Ok(packed as u32)
    } else {
        Err(packed as u32)
    }
}

#[inline(always)]
fn parse_ip_into<const V6: bool>(
    raw: *mut xdp_md,
    cfg: &LbConfig,
    l3: usize,
    out: &mut MaybeUninit<Packet>,
) -> Step<u32> {
    let ctx = &XdpContext::new(raw);
    let serving = SERVING.get(0).ok_or(reason::ABORT_INTERNAL)?;
    let parsed = if V6 {
        parse_ipv6(ctx, l3, cfg, serving)?
    } else {
        parse_ipv4(ctx, l3, cfg, serving)?
    };
    let out = out.as_mut_ptr();
    // SAFETY: fields of the caller's `Packet`, written whole.
    unsafe {
        match parsed {
            Parsed::Tcp(p) => {
                addr_of_mut!((*out).flow).write(p.flow);
                addr_of_mut!((*out).vip).write(p.vip);
                addr_of_mut!((*out).tcp_flags).write(p.tcp_flags);
                addr_of_mut!((*out).known).write(p.known);
                Ok(PARSED_TCP)
            }
            Parsed::IcmpError(flow) => {
                addr_of_mut!((*out).flow).write(flow);
                Ok(PARSED_ICMP_ERROR)
            }
            Parsed::NatReply(flow, flags) => {
                addr_of_mut!((*out).flow).write(flow);
                addr_of_mut!((*out).tcp_flags).write(flags);
                Ok(PARSED_NAT_REPLY)
            }
            Parsed::Sent => Ok(PARSED_SENT),
        }
    }
}

#[inline(always)]
pub fn parse_ethernet(ctx: &XdpContext) -> Step<(u16, usize)> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(reason::PASS_TRUNCATED)?;
    let ether_type = be16(unsafe { (*eth).proto });
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *const VlanHdr = ptr_at(ctx, ETH_HLEN).ok_or(reason::PASS_TRUNCATED)?;
        return Ok((be16(unsafe { (*vlan).proto }), ETH_HLEN + 4));
    }
    Ok((ether_type, ETH_HLEN))
}

/// For IP to a VIP address, before anything else is read: a host that does not serve
/// drops it (its kernel must not answer for a VIP), and only frames sent to our MAC are
/// forwarded (a broadcast or another host's frame would be sent on a second time).
#[inline(always)]
pub fn vip_gate(ctx: &XdpContext, cfg: &LbConfig, serving: &Serving) -> Step<()> {
    if serve_flags(serving) & SERVE_F_FORWARD == 0 {
        return Err(reason::DROP_NOT_MASTER);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(reason::ABORT_INTERNAL)?;
    // SAFETY: within the frame (`ptr_at`).
    if !unsafe { packet_mac_is(addr_of!((*eth).dst), &cfg.mac) } {
        return Err(reason::DROP_OTHER_MAC);
    }
    Ok(())
}

/// What this host may do for the VIPs now: the switch's flags while its lease (if any)
/// runs. With a lease, this CPU's last reading of it answers within its jiffy, for a
/// bounded number of packets (`lb_common::lease`); past that the clock is read.
#[inline(always)]
pub fn serve_flags(serving: &Serving) -> u32 {
    if serving.lease_until_ns == 0 {
        return serving.flags;
    }
    let clock = || unsafe { bpf_ktime_get_ns() };
    match LEASE_CACHE.get_ptr_mut(0) {
        // SAFETY: this CPU's own entry; XDP runs with preemption off on a CPU.
        Some(cache) => serving.flags_cached(unsafe { &mut *cache }, jiffies64(), clock),
        None => serving.flags_at(clock()),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize, cfg: &LbConfig, serving: &Serving) -> Step<Parsed> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(reason::PASS_TRUNCATED)?;
    let ip = unsafe { &*ip };
    // SAFETY: within the frame (`ptr_at`).
    let (src, dst) = unsafe { (Addr::v4(&ip.src), Addr::v4(&ip.dst)) };
    // Only traffic for a VIP address is ours to judge; the rest goes to the kernel as is.
    // (The filter was asked in `try_lb`.) A plain header's TCP is looked up as a service
    // first (`vip_of`).
    let plain_tcp = ip.version_ihl == 0x45 && ip.proto == PROTO_TCP;
    let vip = vip_of(ctx, l3 + IPV4_HLEN, &src, &dst, FAMILY_V4, plain_tcp)?;
    vip_gate(ctx, cfg, serving)?;
    let ihl = (ip.version_ihl & 0x0f) as usize * 4;
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_HLEN {
        return Err(reason::DROP_BAD_IPV4);
    }
    let tot_len = be16(ip.tot_len) as usize;
    if tot_len < IPV4_HLEN || !holds(ctx, l3 + tot_len) {
        return Err(reason::DROP_BAD_IPV4);
    }
    if ihl != IPV4_HLEN {
        return Err(reason::DROP_IP_OPTIONS);
    }
    // More-fragments flag or a fragment offset: a fragment.
    if be16(ip.frag_off) & 0x3fff != 0 {
        return Err(reason::DROP_FRAGMENT);
    }
    let l4 = l3 + IPV4_HLEN;
    let end = l3 + tot_len;
    match ip.proto {
        PROTO_TCP => parse_tcp(ctx, cfg, l4, end, &src, &dst, FAMILY_V4, vip),
        IPPROTO_ICMP => icmp::quoted_flow_v4(ctx, l4, end).map(Parsed::IcmpError),
        _ => Err(reason::DROP_VIP_UNSERVED),
    }
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize, cfg: &LbConfig, serving: &Serving) -> Step<Parsed> {
    // A neighbour solicitation was answered before (`solicitation`).
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(reason::PASS_TRUNCATED)?;
    let ip = unsafe { &*ip };
    // SAFETY: within the frame (`ptr_at`).
    let (src, dst) = unsafe { (Addr::v6(&ip.src), Addr::v6(&ip.dst)) };
    // As for IPv4 (`parse_ipv4`): TCP as a service first.
    let tcp = ip.next_hdr == PROTO_TCP;
    let vip = vip_of(ctx, l3 + IPV6_HLEN, &src, &dst, FAMILY_V6, tcp)?;
    vip_gate(ctx, cfg, serving)?;
    let end = l3 + IPV6_HLEN + be16(ip.payload_len) as usize;
    if ip.version_class_flow[0] >> 4 != 6 || !holds(ctx, end) {
        return Err(reason::DROP_BAD_IPV6);
    }
    let l4 = l3 + IPV6_HLEN;
    match ip.next_hdr {
        PROTO_TCP => parse_tcp(ctx, cfg, l4, end, &src, &dst, FAMILY_V6, vip),
        IPPROTO_ICMPV6 => icmp::quoted_flow_v6(ctx, l4, end).map(Parsed::IcmpError),
        next if is_ipv6_ext(next) => Err(reason::DROP_IPV6_EXT),
        _ => Err(reason::DROP_VIP_UNSERVED),
    }
}

/// Whether IP to `dst` (past the VIP filter) is ours, before the serving and MAC
/// checks, and what it is: for TCP (`tcp`, its header at `l4`) its service (`service`;
/// a hit says the address is a VIP's, with no lookup of the address alone), else
/// whether the reverse table knows it as a NAT reply (`nat_reply_known`, which implies
/// a VIP address too; most replies were sent before the parse, `nat::known`);
/// otherwise the VIP addresses decide, and `PASS_NOT_VIP` when the address is none of
/// them.
#[inline(always)]
fn vip_of(
    ctx: &XdpContext,
    l4: usize,
    src: &Addr,
    dst: &Addr,
    family: u8,
    tcp: bool,
) -> Step<Option<(VipInfo, Known, *mut FlowState)>> {
    let vip = if tcp {
        service(ctx, l4, src, dst, family)
    } else {
        None
    };
    let nat_reply = vip.is_none() && tcp && nat_reply_known(ctx, l4, src, dst, family);
    if vip.is_none() && !nat_reply && !neigh::in_vip_addrs(&dst.0, family) {
        return Err(reason::PASS_NOT_VIP);
    }
    Ok(vip)
}

/// Hop-by-hop, routing, fragment, ESP, AH, destination options, mobility, HIP, shim6.
#[inline(always)]
pub fn is_ipv6_ext(next_hdr: u8) -> bool {
    matches!(next_hdr, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140)
}

/// The TCP service of the segment at `l4` from `src` to `dst`, if there is one, what
/// the connection table said of it, and its entry on a hit (null otherwise: `send_known`
/// writes through it, with no second lookup); `None` as well when the frame is too
/// short for a TCP header (`parse_tcp` judges it).
///
/// An established segment to an address with a DSR service (`filter::may_be_dsr_vip`)
/// is looked up in the connection table first. An entry names its VIP's number; when
/// that number's slot (`VIP_SLOTS`) holds the segment's (VIP, port), the slot's copy of
/// the VIPS entry is the service, and VIPS is not asked: one hash lookup for the whole
/// segment. Otherwise VIPS is asked as for any segment, and the entry still decides the
/// backend, as it always has. Nothing is written here: the serving and MAC checks come
/// after (`vip_gate`).
#[inline(always)]
fn service(
    ctx: &XdpContext,
    l4: usize,
    src: &Addr,
    dst: &Addr,
    family: u8,
) -> Option<(VipInfo, Known, *mut FlowState)> {
    let tcp: *const TcpHdr = ptr_at(ctx, l4)?;
    // SAFETY: within the frame (`ptr_at`).
    let ((sport_be, dport_be), flags) = unsafe { (ports(tcp), (*tcp).flags) };
    let (src, dst) = (&src.0, &dst.0);
    let mut known = Known::just(KNOWN_NOT_ASKED);
    let mut entry: *mut FlowState = core::ptr::null_mut();
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN
        && filter::may_be_dsr_vip(dst, family)
        && let Ok(scratch) = maps::scratch()
    {
        // The key in the scratch space: this frame is the pipeline's (see `parse_ip`).
        let flow = &mut scratch.early_flow;
        keys::write_flow_key(flow, src, dst, sport_be, dport_be, family);
        // Read, the key checked again after (`lookup_read`); written only after the
        // serving and MAC checks (`send_known`, `forward_dsr`).
        known = match flowtab::lookup_read(flow) {
            None => Known::just(KNOWN_MISSED),
            Some((seen, ptr)) => {
                entry = ptr;
                let current = is_current(&seen, jiffies(), closing_flag(flags));
                let hit = Known {
                    what: if current {
                        KNOWN_HIT_CURRENT
                    } else {
                        KNOWN_HIT
                    },
                    backend: seen.backend,
                };
                if let Some(slot) = VIP_SLOTS.get(seen.vip_num)
                    && keys::is_vip(&slot.key, dst, dport_be, family)
                {
                    return Some((slot.info, hit, entry));
                }
                hit
            }
        };
    }
    let key = keys::vip_key(dst, dport_be, family);
    unsafe { VIPS.get(&key) }.map(|vip| (*vip, known, entry))
}

/// For a TCP segment to no service (`service` found none), to an address with no DSR
/// service: whether it is a backend's reply to a NAT flow, asked of the reverse table
/// before the VIP addresses (whose answer the reverse table's implies: its keys are to
/// VIPs). Nothing is written but the scratch space: the serving and MAC checks come
/// after (`vip_gate`).
#[inline(always)]
fn nat_reply_known(ctx: &XdpContext, l4: usize, src: &Addr, dst: &Addr, family: u8) -> bool {
    if filter::may_be_dsr_vip(&dst.0, family) {
        return false;
    }
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, l4) else {
        return false;
    };
    // SAFETY: within the frame (`ptr_at`).
    let (sport_be, dport_be) = unsafe { ports(tcp) };
    let Ok(s) = maps::scratch() else {
        return false;
    };
    keys::write_flow_key(
        &mut s.early_flow,
        &src.0,
        &dst.0,
        sport_be,
        dport_be,
        family,
    );
    unsafe { maps::NAT_REVERSE.get(&s.early_flow) }.is_some()
}

/// A TCP header's source and destination ports, network order, from one 32-bit load.
///
/// # Safety
/// `tcp` is within the frame (`ptr_at`).
#[inline(always)]
pub unsafe fn ports(tcp: *const TcpHdr) -> (u16, u16) {
    // SAFETY: the header's first 4 bytes (the caller's).
    let w = unsafe { packet_word(tcp as *const u8, 0) }.to_ne_bytes();
    (
        u16::from_ne_bytes([w[0], w[1]]),
        u16::from_ne_bytes([w[2], w[3]]),
    )
}

/// `l4` is where TCP starts, `end` where the IP packet ends; `vip` is the segment's
/// service (`service`), looked up before: `None` makes it a NAT reply or unserved.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn parse_tcp(
    ctx: &XdpContext,
    cfg: &LbConfig,
    l4: usize,
    end: usize,
    src: &Addr,
    dst: &Addr,
    family: u8,
    vip: Option<(VipInfo, Known, *mut FlowState)>,
) -> Step<Parsed> {
    let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(reason::DROP_BAD_TCP)?;
    // SAFETY: within the frame (`ptr_at`).
    let (sport_be, dport_be) = unsafe { ports(tcp) };
    let tcp = unsafe { &*tcp };
    let doff = (tcp.data_off >> 4) as usize * 4;
    if doff < TCP_HLEN || l4 + doff > end {
        return Err(reason::DROP_BAD_TCP);
    }
    if let Some((vip, known, entry)) = &vip
        && send_known(ctx, cfg, vip, known, *entry, tcp.flags, end)?
    {
        return Ok(Parsed::Sent);
    }
    let flow = keys::flow_key(&src.0, &dst.0, sport_be, dport_be, family);
    let Some((vip, known, _)) = vip else {
        return Ok(Parsed::NatReply(flow, tcp.flags));
    };
    Ok(Parsed::Tcp(Packet {
        flow,
        vip,
        tcp_flags: tcp.flags,
        known,
    }))
}

/// The common case, sent on where it was parsed: an established DSR segment with a
/// connection-table entry (`entry`, from `service`'s lookup), whose backend is usable.
/// What `forward_dsr` would do for it, without the call, a second lookup and flow key,
/// and the `Packet` copy. An entry that needs no write (`KNOWN_HIT_CURRENT`) costs no
/// clock read and no write, and leaves the persistence entry alone (it is refreshed
/// with the flow's own); one whose stamp is due or that starts closing (`KNOWN_HIT`)
/// is refreshed here (`touch`), but for a persistent service, whose client's entry is
/// refreshed then too (`forward_dsr`). Returns whether it sent it; the rest (a backend
/// gone, no entry) goes the long way.
#[inline(always)]
fn send_known(
    ctx: &XdpContext,
    cfg: &LbConfig,
    vip: &VipInfo,
    known: &Known,
    entry: *mut FlowState,
    tcp_flags: u8,
    end: usize,
) -> Step<bool> {
    let refresh = match known.what {
        KNOWN_HIT_CURRENT => false,
        KNOWN_HIT if !entry.is_null() && vip.persistence_s == 0 => true,
        _ => return Ok(false),
    };
    if nat::is_nat(vip) {
        return Ok(false);
    }
    let Some(backend) = usable_backend(known.backend) else {
        return Ok(false);
    };
    if refresh {
        touch(entry, flow_clock(), jiffies(), closing_flag(tcp_flags));
    }
    send(
        ctx,
        cfg,
        vip.vip_num,
        known.backend,
        backend,
        false,
        counted_len(ctx, end),
    )?;
    #[cfg(feature = "trace")]
    if tracing(cfg) {
        // The key `service` looked up, still in this CPU's scratch.
        trace::forwarded(&maps::scratch()?.early_flow, XDP_TX, known.backend, 0);
    }
    Ok(true)
}

/// DSR's last step: the frame to `backend`'s MAC (`rewrite_macs`), counted on service
/// `vip_num` and backend `id`. Returns the frame's length.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    cfg: &LbConfig,
    vip_num: u32,
    id: u32,
    backend: &Backend,
    new_flow: bool,
    len: usize,
) -> Step<u64> {
    rewrite_macs(ctx, cfg, backend)?;
    let len = len as u64;
    count(vip_slot(vip_num), len, new_flow);
    count(backend_slot(id), len, new_flow);
    Ok(len)
}

/// Connection table first; on a miss (non-SYN), the pinned table; a SYN or an unknown
/// flow takes the ring and is recorded (not an RST, and within the flood guard).
#[inline(always)]
fn forward(ctx: &XdpContext, cfg: &LbConfig, p: &Packet) -> Step<u32> {
    if nat::is_nat(&p.vip) {
        return nat::forward(ctx, p);
    }
    forward_dsr(ctx, cfg, p)
}

/// DSR: see `forward`. Not inlined: its frame is not the pipeline's, whose stack the
/// NAT path's calls share (512 bytes for the deepest chain).
#[inline(never)]
fn forward_dsr(ctx: &XdpContext, cfg: &LbConfig, p: &Packet) -> Step<u32> {
    let now = flow_clock();
    let j = jiffies();
    let syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let rst = p.tcp_flags & TCP_RST != 0;
    let closing = closing_flag(p.tcp_flags);
    let mut found = None;
    let mut lost = false;
    if !syn {
        // The connection table's entry: its backend, and where to write if it needs a
        // write (asked again only then when `service` asked first).
        let hit = match p.known.what {
            KNOWN_HIT_CURRENT => Some((p.known.backend, None)),
            KNOWN_HIT => Some((p.known.backend, flowtab::lookup(&p.flow))),
            KNOWN_MISSED => None,
            _ => flowtab::lookup_read(&p.flow).map(|(seen, state)| (seen.backend, Some(state))),
        };
        if let Some((id, state)) = hit {
            // A backend that went down loses its flows to the ring, not into a void.
            if let Some(backend) = usable_backend(id) {
                found = Some((id, backend));
                persist::touch(&p.vip, &p.flow, id, now);
                if let Some(state) = state {
                    touch(state, now, j, closing);
                }
            }
        } else if let Some(state) = PINNED.get_ptr_mut(&p.flow) {
            let id = unsafe { (*state).backend };
            if let Some(backend) = usable_backend(id) {
                found = Some((id, backend));
                touch(state, now, j, closing);
            }
        } else {
            lost = true;
        }
    }
    let new_flow = found.is_none();
    let mut not_recorded = false;
    let (chosen, backend) = match found {
        Some(found) => found,
        None => {
            let (id, backend) = persist::choose_backend(&p.vip, &p.flow, now)?;
            // An RST ends a flow: recording it would only push a live flow out.
            if !rst {
                // The new entry in the per-CPU scratch, not on this frame: the deepest
                // call chain below it (NAT) must fit the 512-byte stack with it.
                let state = &mut maps::scratch()?.flow_state;
                *state = FlowState {
                    backend: id,
                    vip_num: p.vip.vip_num,
                    last_seen_ns: now,
                    flags: closing,
                    touched_jiffies: j,
                };
                not_recorded = !record(cfg, &p.flow, state, now)?;
            }
            (id, backend)
        }
    };
    let len = send(
        ctx,
        cfg,
        p.vip.vip_num,
        chosen,
        backend,
        new_flow,
        whole_len(ctx),
    )?;
    if lost {
        count(event_slot(event::FLOW_MISS), len, false);
    }
    if not_recorded {
        count(event_slot(event::FLOW_NOT_RECORDED), len, false);
    }
    #[cfg(feature = "trace")]
    if tracing(cfg) {
        let flags = if new_flow {
            lb_common::TRACE_F_NEW_FLOW
        } else {
            0
        };
        trace::forwarded(&p.flow, XDP_TX, chosen, flags);
    }
    Ok(XDP_TX)
}

/// The time of flow, NAT and persistence entries and of the flood guard's window:
/// CLOCK_MONOTONIC_COARSE, no clock-source read (in the lab's VM, `bpf_ktime_get_ns`'s
/// TSC read was a fifth of an established packet's cost). At most one tick behind the
/// agent's CLOCK_MONOTONIC (`lb_common::COARSE_CLOCK_LAG_NS`); all of these count in
/// seconds. The serving lease, a safety bound, keeps the precise clock (`serve_flags`).
#[inline(always)]
pub fn flow_clock() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// `FLOW_F_CLOSING` for a segment with FIN or RST, else 0.
#[inline(always)]
fn closing_flag(tcp_flags: u8) -> u32 {
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        FLOW_F_CLOSING
    } else {
        0
    }
}

/// The kernel's jiffies: the verifier inlines `bpf_jiffies64` as one load, where the
/// flow clock (`flow_clock`) is a call. Only ever compared with an entry's stamp (as
/// `FlowState::touched_jiffies`), as a distance.
#[inline(always)]
pub fn jiffies64() -> u64 {
    unsafe { bpf_jiffies64() }
}

/// `jiffies64`'s low 32 bits.
#[inline(always)]
fn jiffies() -> u32 {
    jiffies64() as u32
}

/// Whether an entry's time is due to be refreshed (`touch`) at jiffies `j`: it was last
/// refreshed `FLOW_TOUCH_JIFFIES` or more ago, or by the agent (0, most likely far).
#[inline(always)]
fn is_stale(state: &FlowState, j: u32) -> bool {
    is_stale_at(state.touched_jiffies, j)
}

/// `is_stale` of an entry stamped at jiffies `touched`.
#[inline(always)]
fn is_stale_at(touched: u32, j: u32) -> bool {
    j.wrapping_sub(touched) >= FLOW_TOUCH_JIFFIES
}

/// Whether `touch` would write nothing to an entry (as read: `flowtab::Seen`) for a
/// segment at jiffies `j` with `closing` (`closing_flag`): then the segment needs no
/// clock read either.
#[inline(always)]
fn is_current(seen: &flowtab::Seen, j: u32, closing: u32) -> bool {
    !is_stale_at(seen.touched_jiffies, j) && seen.flags & closing == closing
}

/// A connection-table or pinned-table hit: the flow's last_seen_ns is rewritten once
/// per `FLOW_TOUCH_JIFFIES` (with the jiffies of the write), its flags only when it
/// starts closing, so a busy flow's entry is not written (and its cache line not taken
/// from other CPUs) on every packet. A time ahead of `now` (the agent writes pinned
/// entries with its precise clock, at most a tick ahead of the flow clock) is kept.
#[inline(always)]
fn touch(state: *mut FlowState, now: u64, j: u32, closing: u32) {
    // SAFETY: a pointer the map lookup just returned.
    let state = unsafe { &mut *state };
    if is_stale(state, j) {
        if state.last_seen_ns < now {
            state.last_seen_ns = now;
        }
        state.touched_jiffies = j;
    }
    if state.flags & closing != closing {
        state.flags |= closing;
    }
}

/// Records a new flow in the connection table unless this CPU has already recorded
/// `new_flows_per_cpu_s` in the current one-second window. Returns whether it did.
#[inline(always)]
fn record(cfg: &LbConfig, flow: &FlowKey, state: &FlowState, now: u64) -> Step<bool> {
    let limit = cfg.new_flows_per_cpu_s;
    if limit != 0 {
        let w = FLOOD_GUARD.get_ptr_mut(0).ok_or(reason::ABORT_INTERNAL)?;
        // SAFETY: this CPU's own entry; XDP runs with preemption off on a CPU.
        let w = unsafe { &mut *w };
        if now.wrapping_sub(w.start_ns) >= GUARD_WINDOW_NS {
            w.start_ns = now;
            w.recorded = 0;
        }
        if w.recorded >= limit {
            return Ok(false);
        }
        w.recorded += 1;
    }
    // A full bucket gives up its longest idle flow (`flowtab::insert`).
    Ok(flowtab::insert(flow, state))
}

/// ICMP fragmentation-needed / packet-too-big about a VIP flow goes to the backend that
/// sent the packet it quotes (in DSR only the backend can lower its path MTU): the
/// flow's backend from FLOWS or PINNED, else the ring's choice; nothing is recorded.
#[inline(always)]
fn forward_icmp_error(ctx: &XdpContext, cfg: &LbConfig, flow: &FlowKey) -> Step<u32> {
    if let Some(verdict) = nat::icmp_error(ctx, flow)? {
        return Ok(verdict);
    }
    let mut found = None;
    if let Some((seen, _)) = flowtab::lookup_read(flow) {
        found = usable_backend(seen.backend).map(|b| (seen.backend, seen.vip_num, b));
    }
    if found.is_none()
        && let Some(state) = unsafe { PINNED.get(flow) }
    {
        found = usable_backend(state.backend).map(|b| (state.backend, state.vip_num, b));
    }
    let (chosen, vip_num, backend, what) = match found {
        Some((id, vip_num, backend)) => (id, vip_num, backend, event::ICMP_TO_FLOW),
        None => {
            let key = keys::vip_key(&flow.dst, flow.dport_be, flow.family);
            let vip = *unsafe { VIPS.get(&key) }.ok_or(reason::DROP_VIP_UNSERVED)?;
            let id = ring_lookup(&vip, flow)?;
            let backend = usable_backend(id).ok_or(reason::DROP_NO_BACKEND)?;
            (id, vip.vip_num, backend, event::ICMP_TO_RING)
        }
    };
    let len = send(ctx, cfg, vip_num, chosen, backend, false, whole_len(ctx))?;
    count(event_slot(what), len, false);
    #[cfg(feature = "trace")]
    if tracing(cfg) {
        trace::forwarded(flow, XDP_TX, chosen, lb_common::TRACE_F_ICMP_ERROR);
    }
    Ok(XDP_TX)
}

/// DSR: the frame goes to the backend's MAC from ours, IP untouched.
#[inline(always)]
fn rewrite_macs(ctx: &XdpContext, cfg: &LbConfig, backend: &Backend) -> Step<()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(reason::ABORT_INTERNAL)?;
    // SAFETY: within the frame (`ptr_at`).
    unsafe { packet_set_macs(eth, &backend.mac, &cfg.mac) };
    Ok(())
}

/// The backend's entry, if it may take packets.
#[inline(always)]
pub fn usable_backend(id: u32) -> Option<&'static Backend> {
    BACKENDS.get(id).filter(|b| b.flags & BACKEND_F_VALID != 0)
}

#[inline(always)]
pub fn ring_lookup(vip: &VipInfo, flow: &FlowKey) -> Step<u32> {
    if vip.ring_size == 0 || vip.ring_size > MAX_RING_SIZE {
        return Err(reason::ABORT_INTERNAL);
    }
    let slot = vip.vip_num * MAX_RING_SIZE + flow_hash(flow) % vip.ring_size;
    let backend = *RINGS.get(slot).ok_or(reason::ABORT_INTERNAL)?;
    if backend == NO_BACKEND {
        return Err(reason::DROP_NO_BACKEND);
    }
    Ok(backend)
}

#[inline(always)]
fn count(slot: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = STATS.get_ptr_mut(slot) {
        let c: &mut Counter = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
        if new_flow {
            c.new_flows += 1;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
