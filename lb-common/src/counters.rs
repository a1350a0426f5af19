//! Layout of the per-CPU counter array: per-VIP slots, then per-backend slots, then
//! one slot for each global reason a packet was passed, dropped or answered, then one
//! slot for each event of a forwarded packet worth knowing about.

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
    /// VIP traffic while this host does not serve (VRRP backup, or not yet started):
    /// dropped, so that the kernel never answers for a VIP it does not own.
    pub const DROP_NOT_MASTER: u32 = 10;
    /// Internal map lookup failure (should never happen): aborted.
    pub const ABORT_INTERNAL: u32 = 11;
    /// IPv6 to a VIP with a bad header (payload length beyond the frame): dropped.
    pub const DROP_BAD_IPV6: u32 = 12;

    /// IP to a VIP address in a frame not addressed to our MAC (broadcast, multicast,
    /// another host's): dropped.
    pub const DROP_OTHER_MAC: u32 = 13;
    /// ARP request or neighbour solicitation for a VIP from a multicast or broadcast
    /// sender (Ethernet or ARP hardware address, or sender IP): dropped, not answered.
    pub const DROP_BAD_NEIGH: u32 = 14;
    /// To a VIP address but no service of this host: another port, not TCP, an ICMP
    /// message other than the errors the program forwards. Dropped.
    pub const DROP_VIP_UNSERVED: u32 = 15;
    /// ICMP error to a VIP whose quoted packet cannot be read as IP + TCP ports: dropped.
    pub const DROP_BAD_ICMP: u32 = 16;
    /// NAT: a SYN found no free source port towards its backend (every candidate in
    /// use): dropped, never sent on a port another flow holds.
    pub const DROP_NAT_NO_PORT: u32 = 17;
    /// NAT: a SYN found the NAT flow table full: dropped.
    pub const DROP_NAT_TABLE_FULL: u32 = 18;
    /// NAT: a non-SYN packet of no known NAT flow (lost, collected, or never opened): dropped.
    pub const DROP_NAT_NO_FLOW: u32 = 19;
    /// NAT: no next hop for the translated packet (no route, no neighbour, no MAC).
    pub const DROP_NAT_NO_ROUTE: u32 = 20;

    pub const COUNT: u32 = 21;

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
        "drop_not_master",
        "abort_internal",
        "drop_bad_ipv6",
        "drop_other_mac",
        "drop_bad_neigh",
        "drop_vip_unserved",
        "drop_bad_icmp",
        "drop_nat_no_port",
        "drop_nat_table_full",
        "drop_nat_no_flow",
        "drop_nat_no_route",
    ];
}

/// Events of forwarded packets (they are also counted on their VIP and backend): not
/// reasons, a packet may move none or one of them.
pub mod event {
    /// A new flow took the ring and was forwarded, but the flood guard
    /// (`LbConfig::new_flows_per_cpu_s`) kept it out of the connection table.
    pub const FLOW_NOT_RECORDED: u32 = 0;
    /// A non-SYN packet whose flow was in neither FLOWS nor PINNED: a flow the table
    /// lost (evicted, or the LB restarted). It took the ring.
    pub const FLOW_MISS: u32 = 1;
    /// ICMP fragmentation-needed / packet-too-big about a known flow, sent to its backend.
    pub const ICMP_TO_FLOW: u32 = 2;
    /// Such an ICMP error about a flow in no table, sent where the ring puts the flow.
    pub const ICMP_TO_RING: u32 = 3;
    /// NAT: a backend's reply translated back to the client.
    pub const NAT_REPLY: u32 = 4;
    /// NAT: an ICMP error about a NAT flow translated and sent on (either direction).
    pub const NAT_ICMP: u32 = 5;

    pub const COUNT: u32 = 6;

    pub const NAMES: [&str; COUNT as usize] = [
        "flow_not_recorded",
        "flow_miss",
        "icmp_to_flow",
        "icmp_to_ring",
        "nat_reply",
        "nat_icmp",
    ];
}

pub const fn event_slot(event: u32) -> u32 {
    global_slot(reason::COUNT + event)
}

pub const STATS_SLOTS: u32 = MAX_VIPS + MAX_BACKENDS + reason::COUNT + event::COUNT;
