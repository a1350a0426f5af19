//! Answers ARP requests and IPv6 neighbour solicitations for VIP addresses, in place.
//! Answering here rather than in the kernel means the answers stop the moment the
//! program is detached, also when the agent is killed: no stale owner of a VIP.

use aya_ebpf::{helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use lb_common::{FAMILY_V4, FAMILY_V6, LbConfig, SERVE_F_ANSWER_NEIGH, Serving, counters::reason};

use crate::{
    Step,
    headers::{
        ArpHdr, EthHdr, IPPROTO_ICMPV6, IPV6_HLEN, Ipv6Hdr, NdMsg, be16, frame_len,
        is_multicast_mac, ptr_at,
    },
    maps::VIP_ADDRS,
};

const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const ND_SOLICIT: u8 = 135;
const ND_ADVERT: u8 = 136;
const ND_OPT_TARGET_LLADDR: u8 = 2;
/// Neighbour advertisement: the body plus one target link-layer address option.
const NA_LEN: usize = core::mem::size_of::<NdMsg>() + 8;

#[inline(always)]
pub fn is_vip_addr(addr: &[u8; 16], family: u8) -> bool {
    crate::filter::may_be_vip(addr, family) && in_vip_addrs(addr, family)
}

/// The exact test alone, for an address that passed the filter already.
#[inline(always)]
pub fn in_vip_addrs(addr: &[u8; 16], family: u8) -> bool {
    let key = crate::keys::vip_addr_key(addr, family);
    unsafe { VIP_ADDRS.get(&key) }.is_some()
}

#[inline(always)]
fn answers(serving: &Serving) -> bool {
    crate::serve_flags(serving) & SERVE_F_ANSWER_NEIGH != 0
}

/// ARP: a request for a VIP address becomes the reply, sent back out the same port.
#[inline(always)]
pub fn arp(ctx: &XdpContext, l3: usize, cfg: &LbConfig, serving: &Serving) -> Step<u32> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(reason::PASS_TRUNCATED)?;
    let arp: *mut ArpHdr = ptr_at(ctx, l3).ok_or(reason::PASS_TRUNCATED)?;
    unsafe {
        if be16((*arp).htype) != 1
            || be16((*arp).ptype) != 0x0800
            || (*arp).hlen != 6
            || (*arp).plen != 4
            || be16((*arp).oper) != ARP_REQUEST
        {
            return Err(reason::PASS_NOT_VIP);
        }
        let tpa = (*arp).tpa;
        let spa = (*arp).spa;
        // Announcements (sender == target) need no answer.
        if u32::from_ne_bytes(spa) == u32::from_ne_bytes(tpa) {
            return Err(reason::PASS_NOT_VIP);
        }
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&tpa);
        if !is_vip_addr(&addr, FAMILY_V4) || !answers(serving) {
            return Err(reason::PASS_NOT_VIP);
        }
        let sha = (*arp).sha;
        // The answer goes to the sender: a probe (0.0.0.0), a multicast, broadcast or
        // class E sender, or a group MAC would make us answer to many, or to no one.
        if is_multicast_mac(&(*eth).src)
            || is_multicast_mac(&sha)
            || u32::from_ne_bytes(spa) == 0
            || spa[0] >= 224
        {
            return Err(reason::DROP_BAD_NEIGH);
        }
        (*arp).oper = ARP_REPLY.to_be_bytes();
        (*arp).tha = sha;
        (*arp).tpa = spa;
        (*arp).sha = cfg.mac;
        (*arp).spa = tpa;
        (*eth).dst = (*eth).src;
        (*eth).src = cfg.mac;
    }
    Err(reason::ARP_REPLY)
}

/// ICMPv6 neighbour solicitation for a VIP address: rewritten in place into the
/// advertisement. Returns `Ok(())` when the packet is anything else and should go on.
#[inline(always)]
pub fn neighbour_solicitation(
    ctx: &XdpContext,
    l3: usize,
    cfg: &LbConfig,
    serving: &Serving,
) -> Step<()> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3).ok_or(reason::PASS_TRUNCATED)?;
    let ns: *mut NdMsg = match ptr_at(ctx, l3 + IPV6_HLEN) {
        Some(p) => p,
        None => return Ok(()),
    };
    let (src, target) = unsafe {
        if (*ip).next_hdr != IPPROTO_ICMPV6
            || (*ns).icmp_type != ND_SOLICIT
            || (*ns).code != 0
            || (*ip).hop_limit != 255
        {
            return Ok(());
        }
        ((*ip).src, (*ns).target)
    };
    if !is_vip_addr(&target, FAMILY_V6) || !answers(serving) {
        return Err(reason::PASS_NOT_VIP);
    }
    // Duplicate address detection (source ::) is left to the kernel.
    if src.iter().all(|b| *b == 0) {
        return Err(reason::PASS_NOT_VIP);
    }
    // The advertisement goes back to the source: never to a group.
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(reason::PASS_TRUNCATED)?;
    if is_multicast_mac(unsafe { &(*eth).src }) || src[0] == 0xff {
        return Err(reason::DROP_BAD_NEIGH);
    }
    // Make the frame exactly as long as the advertisement. Only the tail moves: the
    // headers stay where they are, but every pointer must be taken again.
    let want = l3 + IPV6_HLEN + NA_LEN;
    let delta = want as i32 - frame_len(ctx) as i32;
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(reason::PASS_TRUNCATED);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(reason::ABORT_INTERNAL)?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3).ok_or(reason::ABORT_INTERNAL)?;
    let na: *mut [u8; NA_LEN] = ptr_at(ctx, l3 + IPV6_HLEN).ok_or(reason::ABORT_INTERNAL)?;
    // SAFETY: the three pointers were bounds-checked against the resized frame and
    // do not overlap.
    let (eth, ip, na) = unsafe { (&mut *eth, &mut *ip, &mut *na) };
    eth.dst = eth.src;
    eth.src = cfg.mac;
    ip.version_class_flow = [0x60, 0, 0, 0];
    ip.payload_len = (NA_LEN as u16).to_be_bytes();
    ip.hop_limit = 255;
    ip.dst = src;
    ip.src = target;
    // Type, code, checksum, flags (solicited | override); the target stays.
    na[..8].copy_from_slice(&[ND_ADVERT, 0, 0, 0, 0x60, 0, 0, 0]);
    na[24] = ND_OPT_TARGET_LLADDR;
    na[25] = 1; // option length in units of 8 bytes
    na[26..32].copy_from_slice(&cfg.mac);
    let check = icmpv6_checksum(&ip.src, &ip.dst, na);
    na[2..4].copy_from_slice(&check.to_be_bytes());
    Err(reason::ND_REPLY)
}

#[inline(always)]
fn add_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// RFC 4443 2.3: the checksum over the IPv6 pseudo-header and the ICMPv6 message.
#[inline(always)]
pub fn icmpv6_checksum(src: &[u8; 16], dst: &[u8; 16], body: &[u8; NA_LEN]) -> u16 {
    let mut sum = add_words(0, src);
    sum = add_words(sum, dst);
    sum += NA_LEN as u32;
    sum += IPPROTO_ICMPV6 as u32;
    sum = add_words(sum, body);
    // Two folds always suffice for a sum of 36 words.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
