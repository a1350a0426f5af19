//! Full NAT for services with `forwarding = "nat"`: the client's
//! `client:cport -> VIP:port` leaves as `VIP:nport -> backend:bport`, and the backend's
//! `backend:bport -> VIP:nport` goes back as `VIP:port -> client:cport`. Backends need
//! nothing: they see the VIP as their peer and answer it, wherever the LB is.
//!
//! A flow is two entries made and removed together: NAT_FLOWS (the client's key -> the
//! translation and TCP state) and NAT_REVERSE (the backend's key -> the client's key).
//! Neither map is an LRU, so nothing evicts one half of a pair; the agent's flow scanner
//! removes both once a flow closed (FIN/RST plus a time-wait) or went idle. The
//! reverse entry is made first with BPF_NOEXIST: that insert is what hands a source
//! port to one flow only.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, bpf_fib_lookup as FibParams,
        xdp_action::{XDP_REDIRECT, XDP_TX},
        xdp_md,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V4, FAMILY_V6, FLOW_TOUCH_JIFFIES, FlowKey, LbConfig, NAT_CFG_F_FIB,
    NAT_DEFAULT_PORT_MAX, NAT_DEFAULT_PORT_MIN, NAT_F_ESTABLISHED, NAT_F_FIN_BACKEND,
    NAT_F_FIN_CLIENT, NAT_F_RST, NAT_F_SYNCED, NAT_HOP_TTL_JIFFIES, NAT_PORT_PROBES, NO_BACKEND,
    NatFlow, NatReply, NatTuple as Tuple, NextHop, PROTO_TCP, VIP_F_NAT, VipInfo, VipKey,
    counters::{backend_slot, event, event_slot, reason, vip_slot},
    hash::flow_hash,
};

use crate::{
    Packet, Step, count,
    headers::{
        Addr, EthHdr, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, TCP_ACK, TCP_FIN, TCP_HLEN, TCP_RST,
        TCP_SYN, TcpHdr, frame_len, holds, packet_set_macs, packet_set_word, packet_word, ptr_at,
        set_addr, set_mac,
    },
    keys,
    maps::{
        CONFIG, NAT_BACKENDS, NAT_CONFIG, NAT_FLOWS, NAT_REVERSE, SERVING, VIP_SLOTS, VIPS, scratch,
    },
    parse_ethernet, usable_backend,
};

/// Type, code, checksum and 4 more bytes before the quoted packet (ICMP and ICMPv6).
const ICMP_HLEN: usize = 8;
/// Where the TCP checksum sits in the TCP header.
const TCP_CHECK_AT: usize = 16;

#[inline(always)]
pub fn is_nat(vip: &VipInfo) -> bool {
    vip.flags & VIP_F_NAT != 0
}

/// Client -> VIP:port of a NAT service: the flow's entry, or a new one for a SYN.
#[inline(never)]
pub fn forward(ctx: &XdpContext, p: &Packet) -> Step<u32> {
    let j = crate::jiffies64();
    let syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let mut entry = NAT_FLOWS.get_ptr_mut(&p.flow);
    // A SYN on the tuple of a flow that closed, or whose backend went away, is a new
    // connection: it takes persistence or the ring (`chosen`). A closed flow's pair
    // whose backend is chosen again is the new flow's (`reopen`: the same backend, the
    // same source port, the port the claim would give it again); otherwise the old
    // pair goes. A retransmitted SYN of a live flow keeps its translation.
    let mut chosen = None;
    let mut reopened = false;
    if syn {
        let stale = match entry {
            // SAFETY: an entry of NAT_FLOWS.
            Some(e) => {
                let (flags, backend) = unsafe { ((*e).flags, (*e).backend) };
                if is_closed(flags) || usable_backend(backend).is_none() {
                    Some((is_closed(flags), backend))
                } else {
                    None
                }
            }
            None => Some((false, NO_BACKEND)),
        };
        if let Some((closed, old)) = stale {
            let (id, _) = crate::persist::choose_backend(&p.vip, &p.flow, crate::flow_clock())?;
            chosen = Some(id);
            if let Some(e) = entry {
                // SAFETY: as above.
                let e = unsafe { &mut *e };
                if closed && id == old && reopen(ctx, e, p, j) {
                    reopened = true;
                } else {
                    remove_pair(&p.flow, e);
                    entry = None;
                }
            }
        }
    }
    let new_flow = entry.is_none() || reopened;
    let e = match (entry, chosen) {
        (Some(e), _) => e,
        (None, Some(id)) => {
            if let Some(verdict) = open(ctx, p, id, crate::flow_clock(), j)? {
                count_flow(frame_len(ctx) as u64, p.vip.vip_num, id, true);
                return Ok(verdict);
            }
            // Another CPU opened this very flow a moment ago: its entry decides.
            NAT_FLOWS
                .get_ptr_mut(&p.flow)
                .ok_or(reason::ABORT_INTERNAL)?
        }
        (None, None) => return Err(reason::DROP_NAT_NO_FLOW),
    };
    // SAFETY: an entry of NAT_FLOWS; concurrent writers only ever set flags and times.
    let e = unsafe { &mut *e };
    if !new_flow && p.vip.persistence_s != 0 {
        // The client's persistence entry stays alive while its connections do.
        crate::persist::touch(&p.vip, &p.flow, e.backend, crate::flow_clock());
    }
    to_backend(
        ctx,
        e,
        p.flow.family,
        &p.flow.dst,
        p.vip.vip_num,
        p.tcp_flags,
        new_flow,
        j,
    )
}

/// What `known` returns for a segment it leaves to the parse.
pub const NOT_KNOWN: u64 = 1 << 33;

/// A NAT flow's segment, sent from its own frame before the parse (`crate::try_lb`,
/// for an address with no DSR service): an established client segment whose flow entry
/// names its service, checked in that service's slot (`VIP_SLOTS`, as for DSR), or a
/// backend's reply to a port of the NAT range that the reverse table knows (asked
/// first for a segment to such a port; on a miss, the segment may still be a client's
/// to a service listening on a port of the range). What
/// `forward` and `reply` do for them, without the parse, the service lookup (VIPS)
/// and the `Packet`. The packed verdict (`crate::pack`), or `NOT_KNOWN` for anything
/// else, and for anything that would not pass the parse's checks (not serving, not our
/// MAC, IP options, a fragment, a short frame), which the parse then judges: nothing
/// is written before it is known to be sent here.
#[inline(never)]
pub fn known<const V6: bool>(raw: *mut xdp_md, cfg: &LbConfig, l3: usize) -> u64 {
    match known_step::<V6>(&XdpContext::new(raw), cfg, l3) {
        Some(step) => crate::pack(step),
        None => NOT_KNOWN,
    }
}

#[inline(always)]
fn known_step<const V6: bool>(ctx: &XdpContext, cfg: &LbConfig, l3: usize) -> Option<Step<u32>> {
    let serving = SERVING.get(0)?;
    crate::vip_gate(ctx, cfg, serving).ok()?;
    let s = scratch().ok()?;
    let (family, l4, end) = if V6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, l3)?;
        // SAFETY: within the frame (`ptr_at`).
        let ip = unsafe { &*ip };
        if ip.version_class_flow[0] >> 4 != 6 || ip.next_hdr != PROTO_TCP {
            return None;
        }
        let end = l3 + IPV6_HLEN + u16::from_be_bytes(ip.payload_len) as usize;
        // SAFETY: as above.
        let (src, dst) = unsafe { (Addr::v6(&ip.src), Addr::v6(&ip.dst)) };
        s.early_flow.family = FAMILY_V6;
        set_addr(addr_of_mut!(s.early_flow.src), &src.0);
        set_addr(addr_of_mut!(s.early_flow.dst), &dst.0);
        (FAMILY_V6, l3 + IPV6_HLEN, end)
    } else {
        let ip: *const Ipv4Hdr = ptr_at(ctx, l3)?;
        // SAFETY: within the frame (`ptr_at`).
        let ip = unsafe { &*ip };
        // A plain header (no options) of TCP, not a fragment.
        if ip.version_ihl != 0x45
            || ip.proto != PROTO_TCP
            || u16::from_be_bytes(ip.frag_off) & 0x3fff != 0
        {
            return None;
        }
        let end = l3 + u16::from_be_bytes(ip.tot_len) as usize;
        // SAFETY: as above.
        let (src, dst) = unsafe { (Addr::v4(&ip.src), Addr::v4(&ip.dst)) };
        s.early_flow.family = FAMILY_V4;
        set_addr(addr_of_mut!(s.early_flow.src), &src.0);
        set_addr(addr_of_mut!(s.early_flow.dst), &dst.0);
        (FAMILY_V4, l3 + IPV4_HLEN, end)
    };
    if !holds(ctx, end) {
        return None;
    }
    let tcp: *const TcpHdr = ptr_at(ctx, l4)?;
    // SAFETY: within the frame (`ptr_at`).
    let ((sport_be, dport_be), tcp) = unsafe { (crate::ports(tcp), &*tcp) };
    let doff = (tcp.data_off >> 4) as usize * 4;
    if doff < TCP_HLEN || l4 + doff > end {
        return None;
    }
    let tcp_flags = tcp.flags;
    s.early_flow.sport_be = sport_be;
    s.early_flow.dport_be = dport_be;
    s.early_flow.proto = PROTO_TCP;
    s.early_flow._pad = [0; 2];
    let (min, max) = port_range();
    let dport = u16::from_be(dport_be);
    if min <= dport
        && dport <= max
        && let Some(r) = NAT_REVERSE.get_ptr_mut(&s.early_flow)
    {
        // A backend's reply. (A miss: a client's segment to a service on a port of the
        // range, asked below, or nothing of ours.)
        return Some(to_client(ctx, r, tcp_flags));
    }
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return None;
    }
    let e = NAT_FLOWS.get_ptr_mut(&s.early_flow)?;
    // SAFETY: an entry of NAT_FLOWS; concurrent writers only ever set flags and times.
    let e = unsafe { &mut *e };
    let vip_num = e.vip_num;
    let slot = VIP_SLOTS.get(vip_num)?;
    // Copied: `to_backend` writes the scratch space's translation.
    let vip = s.early_flow.dst;
    if !keys::is_vip(&slot.key, &vip, dport_be, family) || !is_nat(&slot.info) {
        return None;
    }
    if slot.info.persistence_s != 0 {
        // As in `forward`.
        let flow = s.early_flow;
        crate::persist::touch(&slot.info, &flow, e.backend, crate::flow_clock());
    }
    Some(to_backend(
        ctx,
        e,
        family,
        &vip,
        vip_num,
        tcp_flags,
        false,
        crate::jiffies64(),
    ))
}

/// The client's segment of flow `e` to VIP address `vip` (of `family`, service `vip_num`), at
/// jiffies `j`: the entry touched, the packet translated, sent to the backend and
/// counted.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn to_backend(
    ctx: &XdpContext,
    e: &mut NatFlow,
    family: u8,
    vip: &[u8; 16],
    vip_num: u32,
    tcp_flags: u8,
    new_flow: bool,
    j: u64,
) -> Step<u32> {
    let established = if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        0
    } else {
        NAT_F_ESTABLISHED
    };
    touch(
        e,
        j,
        established | closing_flags(tcp_flags, NAT_F_FIN_CLIENT),
    );
    let backend = e.backend;
    let s = scratch()?;
    set_tuple(&mut s.new, family, vip, &e.baddr, e.nport_be, e.bport_be);
    let l3 = rewrite(ctx, &s.new)?;
    let verdict = next_hop(
        ctx.ctx,
        l3,
        Fallback::Backend(backend),
        addr_of_mut!(e.to_backend),
        j,
    )?;
    count_flow(frame_len(ctx) as u64, vip_num, backend, new_flow);
    Ok(verdict)
}

/// A translated frame of `len` bytes, either way, counted on its flow's service and
/// backend.
#[inline(always)]
fn count_flow(len: u64, vip_num: u32, backend: u32, new_flow: bool) {
    count(vip_slot(vip_num), len, new_flow);
    count(backend_slot(backend), len, new_flow);
}

/// backend:bport -> VIP:nport, back to the client as VIP:port -> client:cport, if the
/// reverse table knows the backend's tuple; else it is to no service of ours. For the
/// replies `nat::known` left to the parse.
#[inline(never)]
pub fn reply(ctx: &XdpContext, backend_flow: &FlowKey, tcp_flags: u8) -> Step<u32> {
    let r = NAT_REVERSE
        .get_ptr_mut(backend_flow)
        .ok_or(reason::DROP_VIP_UNSERVED)?;
    to_client(ctx, r, tcp_flags)
}

/// A backend's segment of the flow whose reverse entry is `r`, back to the client:
/// translated from `r` alone, sent and counted. The forward entry is asked only to
/// write what it keeps of the flow: a FIN or an RST (its TCP state), and its last-seen
/// time once per `FLOW_TOUCH_JIFFIES` (`NatReply::touched`), then also clearing
/// `NAT_F_SYNCED` (seen here) as `touch` does.
#[inline(always)]
fn to_client(ctx: &XdpContext, r: *mut NatReply, tcp_flags: u8) -> Step<u32> {
    // SAFETY: an entry of NAT_REVERSE; concurrent writers only ever set its hop and time.
    let r = unsafe { &mut *r };
    let j = crate::jiffies64();
    let set = closing_flags(tcp_flags, NAT_F_FIN_BACKEND);
    if set != 0 || is_due(r.touched, j) {
        let e = NAT_FLOWS
            .get_ptr_mut(&r.client)
            .ok_or(reason::DROP_NAT_NO_FLOW)?;
        // SAFETY: as in `forward`.
        touch(unsafe { &mut *e }, j, set);
        r.touched = j as u16;
    }
    let client = &r.client;
    let (backend, vip_num) = (r.backend, r.vip_num);
    let s = scratch()?;
    set_tuple(
        &mut s.new,
        client.family,
        &client.dst,
        &client.src,
        client.dport_be,
        client.sport_be,
    );
    let l3 = rewrite(ctx, &s.new)?;
    let verdict = next_hop(
        ctx.ctx,
        l3,
        Fallback::Flow(client),
        addr_of_mut!(r.to_client),
        j,
    )?;
    let len = frame_len(ctx) as u64;
    count_flow(len, vip_num, backend, false);
    count(event_slot(event::NAT_REPLY), len, false);
    Ok(verdict)
}

/// A packet of a flow at jiffies `j`: `set` joins its flags, `NAT_F_SYNCED` goes (the
/// flow is seen here now), and its last-seen time moves on. Written only when that
/// changes something: new flags, or a time last refreshed `FLOW_TOUCH_JIFFIES` or more
/// ago (`NatFlow::touched`); so a busy flow's entry, read by both directions from any
/// CPU, is not written on every packet, and its packets read no clock in between.
#[inline(always)]
fn touch(e: &mut NatFlow, j: u64, set: u32) {
    let stale = is_due(e.touched, j);
    if stale || e.flags & (set | NAT_F_SYNCED) != set {
        if stale {
            e.last_seen_ns = crate::flow_clock();
            e.touched = j as u16;
        }
        e.flags = (e.flags & !NAT_F_SYNCED) | set;
    }
}

/// Whether a 16-bit jiffies stamp (`NatFlow::touched`, `NatReply::touched`) is
/// `FLOW_TOUCH_JIFFIES` or more behind jiffies `j`: its entry's time is due a refresh.
#[inline(always)]
fn is_due(touched: u16, j: u64) -> bool {
    (j as u16).wrapping_sub(touched) >= FLOW_TOUCH_JIFFIES as u16
}

#[inline(always)]
fn closing_flags(tcp_flags: u8, fin: u32) -> u32 {
    let mut f = 0;
    if tcp_flags & TCP_FIN != 0 {
        f |= fin;
    }
    if tcp_flags & TCP_RST != 0 {
        f |= NAT_F_RST;
    }
    f
}

/// A new flow to backend `id` (`persist::choose_backend`'s choice): a free source port
/// towards it, the SYN translated and its next hop found, then the pair of entries, the
/// forward one with that next hop already in it (so it is not looked up again).
/// Returns the SYN's verdict; `None` if another CPU made the pair for the same SYN a
/// moment ago (the caller sends the SYN by that pair: translated again, from what this
/// one wrote, which the incremental checksums allow).
#[inline(always)]
fn open(ctx: &XdpContext, p: &Packet, id: u32, now: u64, j: u64) -> Step<Option<u32>> {
    let s = scratch()?;
    // The reverse entry first: written where more values are live, it cost `forward`
    // 32 bytes more stack, past the 512 its callers leave. (Its padding stays as the
    // scratch began: zero.)
    keys::copy_flow_key(addr_of_mut!(s.reply.client), &p.flow);
    s.reply.backend = id;
    s.reply.vip_num = p.vip.vip_num;
    zero(addr_of_mut!(s.reply.to_client));
    s.reply.touched = j as u16;
    let target = NAT_BACKENDS.get(id).ok_or(reason::ABORT_INTERNAL)?;
    if target.family != p.flow.family {
        return Err(reason::DROP_NO_BACKEND);
    }
    let (min, max) = port_range();
    // Keys and entries written word by word, not as literals: a literal's zeros become
    // a call to the BPF backend's byte-by-byte `memset` (72 bytes for the entry).
    s.rev = keys::flow_key(&target.addr, &p.flow.dst, target.port_be, 0, p.flow.family);
    // SAFETY: fields of this CPU's scratch, apart from each other.
    let nport = claim_port(unsafe { &mut *addr_of_mut!(s.rev) }, &s.reply, min, max)?;
    let e = &mut s.entry;
    e.backend = id;
    e.vip_num = p.vip.vip_num;
    e.last_seen_ns = now;
    e.flags = closing_flags(p.tcp_flags, NAT_F_FIN_CLIENT);
    e.nport_be = nport;
    e.bport_be = target.port_be;
    set_addr(addr_of_mut!(e.baddr), &target.addr);
    zero(addr_of_mut!(e.to_backend));
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(reason::ABORT_INTERNAL)?;
    set_mac(addr_of_mut!(e.client_mac), unsafe { &(*eth).src });
    e.touched = j as u16;
    set_tuple(
        // SAFETY: a field of this CPU's scratch other than `entry` and `rev`.
        unsafe { &mut *addr_of_mut!(s.new) },
        p.flow.family,
        &p.flow.dst,
        &target.addr,
        nport,
        target.port_be,
    );
    let sent = rewrite(ctx, &s.new).and_then(|l3| {
        next_hop(
            ctx.ctx,
            l3,
            Fallback::Backend(id),
            addr_of_mut!(s.entry.to_backend),
            j,
        )
    });
    let verdict = match sent {
        Ok(verdict) => verdict,
        Err(why) => {
            // Not sent: the port goes back.
            let _ = NAT_REVERSE.remove(&s.rev);
            return Err(why);
        }
    };
    if NAT_FLOWS
        .insert(&p.flow, &s.entry, BPF_NOEXIST as u64)
        .is_err()
    {
        // The table is full, or another CPU opened this flow a moment ago: either way
        // our port goes back at once.
        let _ = NAT_REVERSE.remove(&s.rev);
        if unsafe { NAT_FLOWS.get(&p.flow) }.is_none() {
            return Err(reason::DROP_NAT_TABLE_FULL);
        }
        return Ok(None);
    }
    Ok(Some(verdict))
}

/// Whether a flow's flags say it closed (a FIN either way, or an RST).
#[inline(always)]
fn is_closed(flags: u32) -> bool {
    flags & (NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND | NAT_F_RST) != 0
}

/// A SYN on the tuple of closed flow `e`, whose backend was chosen again: the pair is
/// the new connection's, if the backend's target is still the one the pair leads to
/// (an address or port changed in a reload: no). Its state starts anew, as `open`'s
/// would (its next-hop copies are kept: they lead to the same hosts). Returns whether
/// it took the pair. The agent's scanner, which may have read the closed flow to remove
/// it, sees the entry changed and leaves it (`lb_userspace`'s `remove_nat`).
#[inline(always)]
fn reopen(ctx: &XdpContext, e: &mut NatFlow, p: &Packet, j: u64) -> bool {
    let Some(target) = NAT_BACKENDS.get(e.backend) else {
        return false;
    };
    // The reverse entry keeps the service number for the replies' counters: a service
    // renumbered since (removed and added again) makes a new pair.
    if target.family != p.flow.family
        || target.port_be != e.bport_be
        || !keys::same_addr(&target.addr, &e.baddr)
        || e.vip_num != p.vip.vip_num
    {
        return false;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    e.last_seen_ns = crate::flow_clock();
    e.flags = 0;
    e.touched = j as u16;
    // SAFETY: the frame's Ethernet header (`ptr_at`).
    set_mac(addr_of_mut!(e.client_mac), unsafe { &(*eth).src });
    true
}

/// The source ports NAT flows take towards backends (`NAT_CONFIG`, else the default).
#[inline(always)]
pub fn port_range() -> (u16, u16) {
    match NAT_CONFIG.get(0) {
        Some(c) if c.port_min != 0 && c.port_max >= c.port_min => (c.port_min, c.port_max),
        _ => (NAT_DEFAULT_PORT_MIN, NAT_DEFAULT_PORT_MAX),
    }
}

/// Claims a source port for the flow of `reply` (`NatReply::client`) towards the backend
/// of `rev` (whose `dport_be` is set to it), `reply` its reverse entry: candidates from
/// a hash of the client's tuple, the first whose reverse entry does not exist yet wins.
/// Ports of the VIP's own services are skipped (a reply to one would look like a new
/// client). Returns the port, network order.
#[inline(always)]
fn claim_port(rev: &mut FlowKey, reply: &NatReply, min: u16, max: u16) -> Step<u16> {
    let range = (max - min) as u32 + 1;
    let h = flow_hash(&reply.client);
    let mut full = false;
    let mut i = 0;
    while i < NAT_PORT_PROBES {
        let port = min + (h.wrapping_add(i.wrapping_mul(0x9e37_79b1)) % range) as u16;
        i += 1;
        let vip_key = VipKey {
            addr: rev.dst,
            port_be: port.to_be(),
            proto: PROTO_TCP,
            family: rev.family,
        };
        if unsafe { VIPS.get(&vip_key) }.is_some() {
            continue;
        }
        rev.dport_be = port.to_be();
        match NAT_REVERSE.insert(&*rev, reply, BPF_NOEXIST as u64) {
            Ok(()) => return Ok(port.to_be()),
            // EEXIST: the port is taken; anything else (E2BIG, ENOMEM): the table is full.
            Err(e) if e == -17 => {}
            Err(_) => full = true,
        }
    }
    Err(if full {
        reason::DROP_NAT_TABLE_FULL
    } else {
        reason::DROP_NAT_NO_PORT
    })
}

#[inline(always)]
fn remove_pair(client: &FlowKey, e: &NatFlow) {
    let rev = FlowKey {
        src: e.baddr,
        dst: client.dst,
        sport_be: e.bport_be,
        dport_be: e.nport_be,
        proto: PROTO_TCP,
        family: client.family,
        _pad: [0; 2],
    };
    let _ = NAT_REVERSE.remove(&rev);
    let _ = NAT_FLOWS.remove(client);
}

/// Writes `new` into the packet's IP and TCP headers with incremental checksum updates
/// (RFC 1624): the IPv4 header checksum, and the TCP checksum over the pseudo-header's
/// addresses and the ports. Words in and out of the packet as 32-bit loads and stores,
/// summed in their native byte order (`csum_add`): the one's-complement sum does not
/// care, as long as the checksum is read and written in that order too (RFC 1071,
/// "byte order independence"). Returns where IP starts.
#[inline(always)]
fn rewrite(ctx: &XdpContext, new: &Tuple) -> Step<usize> {
    let (_, l3) = parse_ethernet(ctx)?;
    let ports = u32::from_ne_bytes({
        let (s, d) = (new.sport_be.to_ne_bytes(), new.dport_be.to_ne_bytes());
        [s[0], s[1], d[0], d[1]]
    });
    if new.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, l3).ok_or(reason::ABORT_INTERNAL)?;
        let tcp: *mut TcpHdr = ptr_at(ctx, l3 + IPV4_HLEN).ok_or(reason::ABORT_INTERNAL)?;
        let (ipb, tcpb) = (ip as *mut u8, tcp as *mut u8);
        let (src, dst) = (keys::word(&new.src, 0), keys::word(&new.dst, 0));
        // SAFETY: the headers' fields, within the frame (`ptr_at`): the addresses are
        // words 3 and 4 of the IPv4 header, the ports word 0 of TCP's.
        unsafe {
            let addrs = csum_add(
                csum_add(0, packet_word(ipb, 3), src),
                packet_word(ipb, 4),
                dst,
            );
            packet_set_word(ipb, 3, src);
            packet_set_word(ipb, 4, dst);
            csum_apply(addr_of_mut!((*ip).check), addrs);
            let all = csum_add(addrs, packet_word(tcpb, 0), ports);
            packet_set_word(tcpb, 0, ports);
            csum_apply(addr_of_mut!((*tcp).check), all);
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, l3).ok_or(reason::ABORT_INTERNAL)?;
        let tcp: *mut TcpHdr = ptr_at(ctx, l3 + IPV6_HLEN).ok_or(reason::ABORT_INTERNAL)?;
        let (ipb, tcpb) = (ip as *mut u8, tcp as *mut u8);
        let mut acc = 0;
        let mut i = 0;
        // SAFETY: as above: the source address is words 2 to 5 of the IPv6 header, the
        // destination 6 to 9.
        unsafe {
            while i < 4 {
                let (src, dst) = (keys::word(&new.src, i), keys::word(&new.dst, i));
                acc = csum_add(acc, packet_word(ipb, 2 + i), src);
                acc = csum_add(acc, packet_word(ipb, 6 + i), dst);
                packet_set_word(ipb, 2 + i, src);
                packet_set_word(ipb, 6 + i, dst);
                i += 1;
            }
            acc = csum_add(acc, packet_word(tcpb, 0), ports);
            packet_set_word(tcpb, 0, ports);
            csum_apply(addr_of_mut!((*tcp).check), acc);
        }
    }
    Ok(l3)
}

/// `acc` plus the one's-complement difference of a 32-bit word `old` becoming `new`,
/// both in native byte order: a 32-bit word counts as the sum of its halves, since
/// 2^16 is 1 modulo 2^16 - 1. Unfolded; `csum_apply` folds.
#[inline(always)]
fn csum_add(acc: u64, old: u32, new: u32) -> u64 {
    acc + (!old) as u64 + new as u64
}

/// RFC 1624 eqn. 3 on the checksum at `check` in the frame, read and written in native
/// byte order (see `rewrite`): HC' = ~(~HC + sum of (~m + m')).
///
/// # Safety
/// `check .. check + 2` is within the frame, bounds-checked.
#[inline(always)]
unsafe fn csum_apply(check: *mut [u8; 2], acc: u64) {
    let check = check as *mut u16;
    // SAFETY: the caller's; a checksum field is 2-aligned in the kernel's model of a
    // frame (see `packet_word`).
    let old = unsafe { check.read() };
    let mut sum = (!old) as u64 + acc;
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    unsafe { check.write(!(sum as u16)) };
}

/// Writes the IPv4 addresses of `src` and `dst` (the maps' 16-byte form) into `ip`;
/// returns the difference for the checksums that cover them (unfolded, see `diff`).
#[inline(always)]
fn readdress4(ip: &mut Ipv4Hdr, src: &[u8; 16], dst: &[u8; 16]) -> u32 {
    let mut s = [0u8; 4];
    let mut d = [0u8; 4];
    s.copy_from_slice(&src[..4]);
    d.copy_from_slice(&dst[..4]);
    let delta = diff(diff(0, &ip.src, &s), &ip.dst, &d);
    ip.src = s;
    ip.dst = d;
    delta
}

/// `readdress4` for IPv6; the addresses are written as words (`set_addr`).
#[inline(always)]
fn readdress6(ip: &mut Ipv6Hdr, src: &[u8; 16], dst: &[u8; 16]) -> u32 {
    let delta = diff(diff(0, &ip.src, src), &ip.dst, dst);
    set_addr(addr_of_mut!(ip.src), src);
    set_addr(addr_of_mut!(ip.dst), dst);
    delta
}

/// The one's-complement difference of replacing `old` by `new`, added to `acc`
/// (unfolded: callers add a few of these, `apply` folds). Not inlined: LLVM turns the
/// loop into vector code whose spills, inlined a few times, overflow the BPF stack.
#[inline(never)]
fn diff<const N: usize>(mut acc: u32, old: &[u8; N], new: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        acc += (!u16::from_be_bytes([old[i], old[i + 1]])) as u32;
        acc += u16::from_be_bytes([new[i], new[i + 1]]) as u32;
        i += 2;
    }
    acc
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + sum of (~m + m')).
#[inline(always)]
fn apply(check: [u8; 2], acc: u32) -> [u8; 2] {
    let mut sum = (!u16::from_be_bytes(check)) as u32 + (acc & 0xffff) + (acc >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Sends the rewritten frame towards `new.dst`: the next hop the kernel's FIB gives
/// (the backend, or a router before it), else `fallback` (the backend's resolved
/// MAC, or the MAC the client's frames came from).
///
/// `hop` (null: none) is the flow's cached next hop for this direction: used while
/// younger than `NAT_HOP_TTL_JIFFIES` at jiffies `j`, else the FIB is asked and what it leads to
/// (its next hop, or the fallback) is kept there. Two CPUs refreshing one copy at once
/// write the same answer, but for a route that changed in between: then one packet
/// may go by either.
#[inline(always)]
fn next_hop(
    raw: *mut xdp_md,
    l3: usize,
    fallback: Fallback,
    hop: *mut NextHop,
    j: u64,
) -> Step<u32> {
    let ctx = &XdpContext::new(raw);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(reason::ABORT_INTERNAL)?;
    let ingress = ctx.ingress_ifindex() as u32;
    if !hop.is_null() {
        // SAFETY: a field of a NAT_FLOWS or NAT_REVERSE value (`to_backend`, `to_client`).
        let h = unsafe { &*hop };
        if h.at_jiffies != 0 && j.wrapping_sub(h.at_jiffies) < NAT_HOP_TTL_JIFFIES {
            // SAFETY: the frame's Ethernet header (`ptr_at`).
            unsafe { packet_set_macs(eth, &h.dmac, &h.smac) };
            return send(h.ifindex, ingress);
        }
    }
    let cfg = CONFIG.get(0).ok_or(reason::ABORT_INTERNAL)?;
    let s = scratch()?;
    let new = &s.new;
    let family = new.family;
    let use_fib = NAT_CONFIG
        .get(0)
        .is_some_and(|c| c.flags & NAT_CFG_F_FIB != 0);
    if use_fib {
        const _: () = assert!(core::mem::size_of::<FibParams>() == 64);
        // SAFETY: 64 bytes of this CPU's scratch, aligned for u64, as the helper's struct.
        let params = unsafe { &mut *(s.fib.as_mut_ptr() as *mut FibParams) };
        zero(params as *mut FibParams);
        params.family = family;
        params.l4_protocol = PROTO_TCP;
        params.ifindex = ingress;
        params.__bindgen_anon_1.tot_len = (frame_len(ctx) - l3) as u16;
        if family == FAMILY_V4 {
            params.__bindgen_anon_3.ipv4_src = keys::word(&new.src, 0);
            params.__bindgen_anon_4.ipv4_dst = keys::word(&new.dst, 0);
        } else {
            params.__bindgen_anon_3.ipv6_src = words(&new.src);
            params.__bindgen_anon_4.ipv6_dst = words(&new.dst);
        }
        let rc = unsafe {
            bpf_fib_lookup(
                ctx.ctx as *mut _,
                params as *mut FibParams,
                core::mem::size_of::<FibParams>() as i32,
                0,
            )
        };
        if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
            return go(
                eth,
                hop,
                &params.dmac,
                &params.smac,
                params.ifindex,
                ingress,
                j,
            );
        }
    }
    // Looked up only now that the FIB gave nothing: most packets never need it.
    let fallback_mac = match fallback {
        Fallback::Backend(id) => match usable_backend(id) {
            Some(b) => &b.mac,
            None => return Err(reason::DROP_NAT_NO_ROUTE),
        },
        Fallback::Mac(mac) => mac,
        Fallback::Flow(client) => match unsafe { NAT_FLOWS.get(client) } {
            Some(e) => &e.client_mac,
            None => return Err(reason::DROP_NAT_NO_FLOW),
        },
    };
    // An unresolved MAC is all zeros.
    if fallback_mac.iter().fold(0, |a, b| a | b) == 0 {
        return Err(reason::DROP_NAT_NO_ROUTE);
    }
    // Cached as well: the FIB has no neighbour for a client the LB host never spoke
    // to itself, and would say so again for each of the flow's replies.
    go(eth, hop, fallback_mac, &cfg.mac, ingress, ingress, j)
}

/// The frame to `dmac` from `smac`, out of `ifindex` (`send`); the choice kept in
/// `hop` (if any) from jiffies `j`.
#[inline(always)]
fn go(
    eth: *mut EthHdr,
    hop: *mut NextHop,
    dmac: &[u8; 6],
    smac: &[u8; 6],
    ifindex: u32,
    ingress: u32,
    j: u64,
) -> Step<u32> {
    // SAFETY: the frame's Ethernet header (`ptr_at`, the caller's).
    unsafe { packet_set_macs(eth, dmac, smac) };
    if !hop.is_null() {
        // SAFETY: a field of a NAT_FLOWS or NAT_REVERSE value (`next_hop`).
        let h = unsafe { &mut *hop };
        set_mac(addr_of_mut!(h.dmac), dmac);
        set_mac(addr_of_mut!(h.smac), smac);
        h.ifindex = ifindex;
        h.at_jiffies = j;
    }
    send(ifindex, ingress)
}

/// Out of the interface `ifindex`: back where it came in (`XDP_TX`), else redirected.
#[inline(always)]
fn send(ifindex: u32, ingress: u32) -> Step<u32> {
    if ifindex == ingress {
        return Ok(XDP_TX);
    }
    let r = unsafe { bpf_redirect(ifindex, 0) } as u32;
    if r == XDP_REDIRECT {
        Ok(r)
    } else {
        Err(reason::DROP_NAT_NO_ROUTE)
    }
}

/// Where a translated frame goes when the FIB gives no next hop (or is not asked).
#[derive(Clone, Copy)]
enum Fallback<'a> {
    /// The backend's resolved MAC (`Backend::mac`), if the backend is usable.
    Backend(u32),
    /// A MAC at hand: the one the client's frames came from.
    Mac(&'a [u8; 6]),
    /// The MAC the client's frames came from, as the forward entry under this key
    /// keeps it (`NatFlow::client_mac`): looked up only when needed.
    Flow(&'a FlowKey),
}

/// Writes a translation's fields one by one (addresses as words, see `set_addr`): a
/// struct literal's padding and address copies became calls to byte-by-byte `memset`
/// and `memmove`.
#[inline(always)]
fn set_tuple(t: &mut Tuple, family: u8, src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16) {
    t.family = family;
    set_addr(addr_of_mut!(t.src), src);
    set_addr(addr_of_mut!(t.dst), dst);
    t.sport_be = sport;
    t.dport_be = dport;
}

/// Zeroes the `T` at `p` as 64-bit stores (`p` 8-aligned, `T` a whole number of
/// words): `mem::zeroed()` or a literal's zeros became calls to the BPF backend's
/// byte-by-byte `memset`. For the FIB helper's 64 bytes (in the scratch) and a new
/// flow's next-hop copies.
#[inline(always)]
fn zero<T>(p: *mut T) {
    const { assert!(core::mem::size_of::<T>() % 8 == 0) };
    let p = p as *mut u64;
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        // SAFETY: within the `T`, which the caller's pointer makes u64-aligned.
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
        i += 1;
    }
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        keys::word(a, 0),
        keys::word(a, 1),
        keys::word(a, 2),
        keys::word(a, 3),
    ]
}

/// An ICMP error (fragmentation needed / packet too big) about a NAT flow, `quoted`
/// being the quoted packet's tuple turned around (see `icmp.rs`). About our reply to a
/// client (`quoted` is the client's key): it goes to the backend as if about the
/// backend's own packet. About our packet to a backend (`quoted` is the backend's key):
/// it goes to the client as if about the client's packet. Either way the outer source
/// becomes the VIP (the receiver may have no route to the router that sent it), and
/// every checksum is updated. `Ok(None)`: not about a NAT flow.
#[inline(never)]
pub fn icmp_error(ctx: &XdpContext, quoted: &FlowKey) -> Step<Option<u32>> {
    let (client, to_backend): (&FlowKey, bool) = if unsafe { NAT_FLOWS.get(quoted) }.is_some() {
        (quoted, true)
    } else if let Some(r) = unsafe { NAT_REVERSE.get(quoted) } {
        (&r.client, false)
    } else {
        // A NAT service's flow we do not know: never DSR-forwarded raw. The key in the
        // scratch: this frame and the rewrite's below it share the 512-byte stack with
        // the pipeline's.
        let s = scratch()?;
        s.vip_key = VipKey {
            addr: quoted.dst,
            port_be: quoted.dport_be,
            proto: PROTO_TCP,
            family: quoted.family,
        };
        return match unsafe { VIPS.get(&s.vip_key) } {
            Some(vip) if is_nat(vip) => Err(reason::DROP_NAT_NO_FLOW),
            _ => Ok(None),
        };
    };
    let e = unsafe { NAT_FLOWS.get(client) }.ok_or(reason::DROP_NAT_NO_FLOW)?;
    let vip = client.dst;
    // The quoted packet as it must read, and where the outer packet goes.
    let s = scratch()?;
    let fallback = if to_backend {
        set_tuple(
            &mut s.inner,
            client.family,
            &e.baddr,
            &vip,
            e.bport_be,
            e.nport_be,
        );
        set_addr(addr_of_mut!(s.new.dst), &e.baddr);
        Fallback::Backend(e.backend)
    } else {
        set_tuple(
            &mut s.inner,
            client.family,
            &client.src,
            &vip,
            client.sport_be,
            client.dport_be,
        );
        set_addr(addr_of_mut!(s.new.dst), &client.src);
        Fallback::Mac(&e.client_mac)
    };
    s.new.family = client.family;
    set_addr(addr_of_mut!(s.new.src), &vip);
    let l3 = if client.family == FAMILY_V4 {
        rewrite_icmp4(ctx.ctx)?
    } else {
        rewrite_icmp6(ctx.ctx)?
    };
    // Not cached: an ICMP error is rare, and its flow's entry is not written here.
    let verdict = next_hop(ctx.ctx, l3, fallback, core::ptr::null_mut(), 0)?;
    let len = frame_len(ctx) as u64;
    count_flow(len, e.vip_num, e.backend, false);
    count(event_slot(event::NAT_ICMP), len, false);
    Ok(Some(verdict))
}

/// The quoted TCP header's ports and, when the quote holds it, its checksum.
#[inline(always)]
fn rewrite_quoted_tcp(ctx: &XdpContext, at: usize, inner: &Tuple, addrs: u32) -> Step<u32> {
    let ports: *mut [u8; 4] = ptr_at(ctx, at).ok_or(reason::DROP_BAD_ICMP)?;
    let ports = unsafe { &mut *ports };
    let mut new = [0u8; 4];
    new[..2].copy_from_slice(&inner.sport_be.to_ne_bytes());
    new[2..].copy_from_slice(&inner.dport_be.to_ne_bytes());
    let d = diff(0, ports, &new);
    *ports = new;
    let mut icmp_delta = d;
    if let Some(check) = ptr_at::<[u8; 2]>(ctx, at + TCP_CHECK_AT) {
        let check = unsafe { &mut *check };
        let updated = apply(*check, addrs + d);
        icmp_delta = diff(icmp_delta, check, &updated);
        *check = updated;
    }
    Ok(icmp_delta)
}

/// Not inlined, to keep `icmp_error`'s frame small; takes the raw context so that the
/// compiler cannot hand it packet pointers the verifier would refuse to compare.
#[inline(never)]
fn rewrite_icmp4(raw: *mut xdp_md) -> Step<usize> {
    let ctx = &XdpContext::new(raw);
    let s = scratch()?;
    let (outer, inner) = (&s.new, &s.inner);
    let (_, l3) = parse_ethernet(ctx)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3).ok_or(reason::ABORT_INTERNAL)?;
    let l4 = l3 + IPV4_HLEN;
    let icmp: *mut [u8; ICMP_HLEN] = ptr_at(ctx, l4).ok_or(reason::DROP_BAD_ICMP)?;
    let qip: *mut Ipv4Hdr = ptr_at(ctx, l4 + ICMP_HLEN).ok_or(reason::DROP_BAD_ICMP)?;
    let (ip, icmp, qip) = unsafe { (&mut *ip, &mut *icmp, &mut *qip) };
    ip.check = apply(ip.check, readdress4(ip, &outer.src, &outer.dst));
    let qaddrs = readdress4(qip, &inner.src, &inner.dst);
    let qcheck = apply(qip.check, qaddrs);
    let mut icmp_delta = diff(qaddrs, &qip.check, &qcheck);
    qip.check = qcheck;
    icmp_delta += rewrite_quoted_tcp(ctx, l4 + ICMP_HLEN + IPV4_HLEN, inner, qaddrs)?;
    // The ICMP checksum covers the message only, the quoted packet included.
    let check = apply([icmp[2], icmp[3]], icmp_delta);
    icmp[2] = check[0];
    icmp[3] = check[1];
    Ok(l3)
}

/// Not inlined, to keep `icmp_error`'s frame small; takes the raw context so that the
/// compiler cannot hand it packet pointers the verifier would refuse to compare.
#[inline(never)]
fn rewrite_icmp6(raw: *mut xdp_md) -> Step<usize> {
    let ctx = &XdpContext::new(raw);
    let s = scratch()?;
    let (outer, inner) = (&s.new, &s.inner);
    let (_, l3) = parse_ethernet(ctx)?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3).ok_or(reason::ABORT_INTERNAL)?;
    let l4 = l3 + IPV6_HLEN;
    let icmp: *mut [u8; ICMP_HLEN] = ptr_at(ctx, l4).ok_or(reason::DROP_BAD_ICMP)?;
    let qip: *mut Ipv6Hdr = ptr_at(ctx, l4 + ICMP_HLEN).ok_or(reason::DROP_BAD_ICMP)?;
    let (ip, icmp, qip) = unsafe { (&mut *ip, &mut *icmp, &mut *qip) };
    // ICMPv6's checksum covers a pseudo-header with the outer addresses as well.
    let mut icmp_delta = readdress6(ip, &outer.src, &outer.dst);
    let qaddrs = readdress6(qip, &inner.src, &inner.dst);
    icmp_delta += qaddrs;
    icmp_delta += rewrite_quoted_tcp(ctx, l4 + ICMP_HLEN + IPV6_HLEN, inner, qaddrs)?;
    let check = apply([icmp[2], icmp[3]], icmp_delta);
    icmp[2] = check[0];
    icmp[3] = check[1];
    Ok(l3)
}
