//! Layout of the per-CPU counter array: per-VIP slots, then per-backend slots, then
//! one slot for each global reason a packet was passed, dropped or answered.

use crate::{MAX_BACKENDS, MAX_VIPS};

pub const fn vip_slot(vip_num: u32) -> u32 {
    vip_num
}

pub const fn backend_slot(backend: u32) -> u32 {
    MAX_VIPS + backend
}

pub const fn global_slot(reason: u32) -> u32 {
    MAX_VIPS + MAX_BACKENDS + reason
}

/// Global reasons. Each packet that is not forwarded lands in exactly one of them.
pub mod reason {
    /// Not addressed to a VIP (or not IP/ARP at all): passed to the kernel untouched.
    pub const PASS_NOT_VIP: u32 = 0;
    /// Too short to read the headers needed to tell whether it is for a VIP: passed.
    pub const PASS_TRUNCATED: u32 = 1;
    /// ARP request for a VIP answered by the program.
    pub const ARP_REPLY: u32 = 2;
    /// IPv6 neighbour solicitation for a VIP answered by the program.
    pub const ND_REPLY: u32 = 3;
    /// IPv4 to a VIP with a bad header (version, length, header length): dropped.
    pub const DROP_BAD_IPV4: u32 = 4;
    /// IPv4 fragment to a VIP: dropped (ports are unknown, DSR cannot pin it).
    pub const DROP_FRAGMENT: u32 = 5;
    /// IPv4 with options to a VIP: dropped.
    pub const DROP_IP_OPTIONS: u32 = 6;
    /// IPv6 to a VIP address with extension headers: dropped.
    pub const DROP_IPV6_EXT: u32 = 7;
    /// TCP header to a VIP truncated or with a bad data offset: dropped.
    pub const DROP_BAD_TCP: u32 = 8;
    /// VIP with no usable backend for this packet: dropped.
    pub const DROP_NO_BACKEND: u32 = 9;
    /// VIP traffic while this host does not forward (not master): passed.
    pub const PASS_NOT_FORWARDING: u32 = 10;
    /// Internal map lookup failure (should never happen): aborted.
    pub const ABORT_INTERNAL: u32 = 11;
    /// IPv6 to a VIP with a bad header (payload length beyond the frame): dropped.
    pub const DROP_BAD_IPV6: u32 = 12;

    pub const COUNT: u32 = 13;

    /// Human names, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_vip",
        "pass_truncated",
        "arp_reply",
        "nd_reply",
        "drop_bad_ipv4",
        "drop_fragment",
        "drop_ip_options",
        "drop_ipv6_ext",
        "drop_bad_tcp",
        "drop_no_backend",
        "pass_not_forwarding",
        "abort_internal",
        "drop_bad_ipv6",
    ];
}

pub const STATS_SLOTS: u32 = MAX_VIPS + MAX_BACKENDS + reason::COUNT;
