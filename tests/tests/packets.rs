//! The XDP program, packet by packet, through BPF_PROG_TEST_RUN. The maps are filled by
//! the agent's own code (Programmer over XdpDataPlane); each fixture is an input frame,
//! the expected verdict, the expected output bytes and the counter it must move.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    FLOW_F_CLOSING, FlowKey, FlowState, NO_BACKEND, PROTO_TCP, TRACE_F_NEW_FLOW, TRACE_FORWARDED,
    VipInfo, VipKey,
    counters::{backend_slot, event, event_slot, global_slot, reason, vip_slot},
    lease::LEASE_CACHE_PACKETS,
    names,
};
use lb_tests::{
    packet::*,
    require_root,
    rig::{
        CLIENT_MAC, LB_MAC, Rig, XDP_DROP, XDP_PASS, XDP_TX, all_up, backend_mac, cpus,
        flow_key as flow, looped, persist_entry, run_on_cpu, service,
    },
};
use lb_userspace::{
    config::{BackendSpec, Service},
    dataplane::{
        DataPlaneError, FlowStore, FlowTable, MapSizes, ServeSwitch, XdpDataPlane, monotonic_ns,
    },
    flows,
    pins::{self, Found, PinDir},
    programmer::{BackendView, vip_key},
};

const ROUTER_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x01];
const OTHER_HOST_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x02];
/// A group (multicast) MAC: the low bit of the first byte set.
const GROUP_MAC: [u8; 6] = [0x03, 0xc1, 0, 0, 0, 0x01];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}
fn v4(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}
fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("test address")
}

fn services() -> Vec<Service> {
    vec![
        service(
            "web",
            "192.0.2.10",
            80,
            1009,
            &["192.0.2.21", "192.0.2.22", "192.0.2.23"],
        ),
        service(
            "web6",
            "2001:db8::10",
            443,
            65537,
            &["2001:db8::21", "2001:db8::22"],
        ),
        service("empty", "192.0.2.11", 80, 101, &[]),
    ]
}

fn rig() -> Rig {
    Rig::new(services()).expect("load the XDP object and fill its maps (needs root)")
}

fn global_counters(rig: &Rig) -> Vec<u64> {
    (0..reason::COUNT)
        .map(|r| rig.counter(global_slot(r)).packets)
        .collect()
}

fn vip_num(rig: &Rig, service: &str) -> u32 {
    let s = rig
        .services
        .iter()
        .find(|s| s.name == service)
        .expect("service");
    rig.programmer.vip_num(s.vip, s.port).expect("vip num")
}

/// The backend the ring of the service named `service` gives this flow (`ring_choice_of`).
fn ring_choice(rig: &Rig, service: &str, flow: &FlowKey) -> (u32, [u8; 6]) {
    let s = rig
        .services
        .iter()
        .find(|s| s.name == service)
        .expect("service");
    ring_choice_of(rig, s, flow)
}

/// A frame with its MACs replaced, as DSR forwarding must leave it.
fn with_macs(frame: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}

enum Expect {
    /// Verdict, output must equal the input, one packet in this global reason.
    Unchanged(u32, u32),
    /// Verdict, exact output bytes, one packet in this global reason.
    Bytes(u32, Vec<u8>, u32),
    /// Forwarded with XDP_TX to the ring's choice for (service, flow); `new` if a new flow.
    Forward {
        service: &'static str,
        flow: FlowKey,
        new: bool,
    },
}

struct Fixture {
    name: &'static str,
    input: Vec<u8>,
    expect: Expect,
}

fn tcp4(dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    tcp_frame(
        LB_MAC,
        CLIENT_MAC,
        None,
        (ip("198.51.100.7"), 40000),
        (ip(dst), dport),
        flags,
    )
}

fn tcp6(dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    tcp_frame(
        LB_MAC,
        CLIENT_MAC,
        None,
        (ip("2001:db8:1::7"), 40000),
        (ip(dst), dport),
        flags,
    )
}

/// IPv4 to the VIP with a broken header, built field by field.
fn bad_ipv4(edit: impl Fn(&mut Ipv4)) -> Vec<u8> {
    let seg = tcp(ip("198.51.100.7"), ip("192.0.2.10"), 40000, 80, SYN, b"");
    let mut h = Ipv4::new(v4("198.51.100.7"), v4("192.0.2.10"), 6);
    edit(&mut h);
    ethernet(LB_MAC, CLIENT_MAC, None, ETH_P_IP, &h.build(&seg))
}

fn fixtures() -> Vec<Fixture> {
    let c4 = (ip("198.51.100.7"), 40000);
    let c6 = (ip("2001:db8:1::7"), 40000);
    let vip4 = (ip("192.0.2.10"), 80);
    let vip6 = (ip("2001:db8::10"), 443);
    let mut v = vec![
        // Not for a VIP: passed untouched.
        Fixture {
            name: "non-VIP IPv4 TCP",
            input: tcp4("192.0.2.99", 80, SYN),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        Fixture {
            name: "non-VIP IPv6 TCP",
            input: tcp6("2001:db8::99", 443, SYN),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        // The filter's "maybe" (the low 16 bits of a VIP's address): the exact lookup
        // says no.
        Fixture {
            name: "non-VIP IPv4 TCP sharing the VIP's filter bit",
            input: tcp4("198.51.2.10", 80, SYN),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        Fixture {
            name: "non-VIP IPv6 TCP sharing the VIP's filter bit",
            input: tcp6("2001:db8:5::10", 443, SYN),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        Fixture {
            name: "VIP address, other port",
            input: tcp4("192.0.2.10", 81, SYN),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_VIP_UNSERVED),
        },
        Fixture {
            name: "VIP address, UDP",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                None,
                ETH_P_IP,
                &Ipv4::new(v4("198.51.100.7"), v4("192.0.2.10"), 17).build(&[0; 8]),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_VIP_UNSERVED),
        },
        Fixture {
            name: "ARP request for a non-VIP",
            input: ethernet(
                BROADCAST,
                CLIENT_MAC,
                None,
                ETH_P_ARP,
                &arp(1, CLIENT_MAC, v4("192.0.2.50"), [0; 6], v4("192.0.2.99")),
            ),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        Fixture {
            name: "ARP reply (not a request) for a VIP",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                None,
                ETH_P_ARP,
                &arp(2, CLIENT_MAC, v4("192.0.2.50"), LB_MAC, v4("192.0.2.10")),
            ),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        Fixture {
            name: "other ethertype",
            input: ethernet(BROADCAST, CLIENT_MAC, None, 0x88cc, &[0; 46]),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        // Neighbour answers for VIP addresses.
        Fixture {
            name: "ARP request for a VIP",
            input: ethernet(
                BROADCAST,
                CLIENT_MAC,
                None,
                ETH_P_ARP,
                &arp(1, CLIENT_MAC, v4("192.0.2.50"), [0; 6], v4("192.0.2.10")),
            ),
            expect: Expect::Bytes(
                XDP_TX,
                ethernet(
                    CLIENT_MAC,
                    LB_MAC,
                    None,
                    ETH_P_ARP,
                    &arp(2, LB_MAC, v4("192.0.2.10"), CLIENT_MAC, v4("192.0.2.50")),
                ),
                reason::ARP_REPLY,
            ),
        },
        Fixture {
            name: "ARP request for a VIP, VLAN-tagged",
            input: ethernet(
                BROADCAST,
                CLIENT_MAC,
                Some(7),
                ETH_P_ARP,
                &arp(1, CLIENT_MAC, v4("192.0.2.50"), [0; 6], v4("192.0.2.10")),
            ),
            expect: Expect::Bytes(
                XDP_TX,
                ethernet(
                    CLIENT_MAC,
                    LB_MAC,
                    Some(7),
                    ETH_P_ARP,
                    &arp(2, LB_MAC, v4("192.0.2.10"), CLIENT_MAC, v4("192.0.2.50")),
                ),
                reason::ARP_REPLY,
            ),
        },
        Fixture {
            name: "gratuitous ARP for a VIP is not answered",
            input: ethernet(
                BROADCAST,
                CLIENT_MAC,
                None,
                ETH_P_ARP,
                &arp(1, CLIENT_MAC, v4("192.0.2.10"), [0; 6], v4("192.0.2.10")),
            ),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        Fixture {
            name: "neighbour solicitation for a VIP",
            input: ethernet(
                [0x33, 0x33, 0xff, 0, 0, 0x10],
                CLIENT_MAC,
                None,
                ETH_P_IPV6,
                &neighbour_solicitation(
                    v6("2001:db8::50"),
                    solicited_node(v6("2001:db8::10")),
                    v6("2001:db8::10"),
                    Some(CLIENT_MAC),
                ),
            ),
            expect: Expect::Bytes(
                XDP_TX,
                ethernet(
                    CLIENT_MAC,
                    LB_MAC,
                    None,
                    ETH_P_IPV6,
                    &neighbour_advertisement(
                        v6("2001:db8::10"),
                        v6("2001:db8::50"),
                        v6("2001:db8::10"),
                        LB_MAC,
                    ),
                ),
                reason::ND_REPLY,
            ),
        },
        Fixture {
            name: "neighbour solicitation for a VIP without source option (frame grows)",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                None,
                ETH_P_IPV6,
                &neighbour_solicitation(
                    v6("2001:db8::50"),
                    v6("2001:db8::10"),
                    v6("2001:db8::10"),
                    None,
                ),
            ),
            expect: Expect::Bytes(
                XDP_TX,
                ethernet(
                    CLIENT_MAC,
                    LB_MAC,
                    None,
                    ETH_P_IPV6,
                    &neighbour_advertisement(
                        v6("2001:db8::10"),
                        v6("2001:db8::50"),
                        v6("2001:db8::10"),
                        LB_MAC,
                    ),
                ),
                reason::ND_REPLY,
            ),
        },
        Fixture {
            name: "neighbour solicitation for a non-VIP",
            input: ethernet(
                [0x33, 0x33, 0xff, 0, 0, 0x99],
                CLIENT_MAC,
                None,
                ETH_P_IPV6,
                &neighbour_solicitation(
                    v6("2001:db8::50"),
                    solicited_node(v6("2001:db8::99")),
                    v6("2001:db8::99"),
                    Some(CLIENT_MAC),
                ),
            ),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        Fixture {
            name: "duplicate address detection for a VIP is left to the kernel",
            input: ethernet(
                [0x33, 0x33, 0xff, 0, 0, 0x10],
                CLIENT_MAC,
                None,
                ETH_P_IPV6,
                &neighbour_solicitation(
                    Ipv6Addr::UNSPECIFIED,
                    solicited_node(v6("2001:db8::10")),
                    v6("2001:db8::10"),
                    None,
                ),
            ),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        // Hostile neighbour requests for a VIP: never answered.
        Fixture {
            name: "ARP request for a VIP from a multicast sender MAC",
            input: ethernet(
                BROADCAST,
                CLIENT_MAC,
                None,
                ETH_P_ARP,
                &arp(1, GROUP_MAC, v4("192.0.2.50"), [0; 6], v4("192.0.2.10")),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_NEIGH),
        },
        Fixture {
            name: "ARP request for a VIP from a broadcast Ethernet source",
            input: ethernet(
                BROADCAST,
                BROADCAST,
                None,
                ETH_P_ARP,
                &arp(1, CLIENT_MAC, v4("192.0.2.50"), [0; 6], v4("192.0.2.10")),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_NEIGH),
        },
        Fixture {
            name: "ARP probe (sender 0.0.0.0) for a VIP",
            input: ethernet(
                BROADCAST,
                CLIENT_MAC,
                None,
                ETH_P_ARP,
                &arp(1, CLIENT_MAC, v4("0.0.0.0"), [0; 6], v4("192.0.2.10")),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_NEIGH),
        },
        Fixture {
            name: "ARP request for a VIP from a multicast sender address",
            input: ethernet(
                BROADCAST,
                CLIENT_MAC,
                None,
                ETH_P_ARP,
                &arp(1, CLIENT_MAC, v4("224.0.0.1"), [0; 6], v4("192.0.2.10")),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_NEIGH),
        },
        Fixture {
            name: "ARP request for a VIP from the broadcast address",
            input: ethernet(
                BROADCAST,
                CLIENT_MAC,
                None,
                ETH_P_ARP,
                &arp(
                    1,
                    CLIENT_MAC,
                    v4("255.255.255.255"),
                    [0; 6],
                    v4("192.0.2.10"),
                ),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_NEIGH),
        },
        Fixture {
            name: "neighbour solicitation for a VIP from a multicast IPv6 source",
            input: ethernet(
                [0x33, 0x33, 0xff, 0, 0, 0x10],
                CLIENT_MAC,
                None,
                ETH_P_IPV6,
                &neighbour_solicitation(
                    v6("ff02::1"),
                    solicited_node(v6("2001:db8::10")),
                    v6("2001:db8::10"),
                    Some(CLIENT_MAC),
                ),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_NEIGH),
        },
        Fixture {
            name: "neighbour solicitation for a VIP from a multicast Ethernet source",
            input: ethernet(
                [0x33, 0x33, 0xff, 0, 0, 0x10],
                GROUP_MAC,
                None,
                ETH_P_IPV6,
                &neighbour_solicitation(
                    v6("2001:db8::50"),
                    solicited_node(v6("2001:db8::10")),
                    v6("2001:db8::10"),
                    Some(CLIENT_MAC),
                ),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_NEIGH),
        },
        // VIP traffic in a frame not sent to us.
        Fixture {
            name: "VIP SYN IPv4 to the broadcast MAC",
            input: tcp_frame(BROADCAST, CLIENT_MAC, None, c4, vip4, SYN),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_OTHER_MAC),
        },
        Fixture {
            name: "VIP SYN IPv6 to a multicast MAC",
            input: tcp_frame([0x33, 0x33, 0, 0, 0, 1], CLIENT_MAC, None, c6, vip6, SYN),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_OTHER_MAC),
        },
        Fixture {
            name: "VIP ACK IPv4 to another host's MAC",
            input: tcp_frame(OTHER_HOST_MAC, CLIENT_MAC, None, c4, vip4, ACK),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_OTHER_MAC),
        },
        Fixture {
            name: "non-VIP to another host's MAC passes",
            input: tcp_frame(
                OTHER_HOST_MAC,
                CLIENT_MAC,
                None,
                c4,
                (ip("192.0.2.99"), 80),
                SYN,
            ),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        // VIP addresses, but nothing this host serves.
        Fixture {
            name: "VIP address IPv6, other port",
            input: tcp6("2001:db8::10", 80, SYN),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_VIP_UNSERVED),
        },
        Fixture {
            name: "VIP address IPv6, UDP",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                None,
                ETH_P_IPV6,
                &ipv6(v6("2001:db8:1::7"), v6("2001:db8::10"), 17, 64, &[0; 8]),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_VIP_UNSERVED),
        },
        Fixture {
            name: "ICMP echo to a VIP",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                None,
                ETH_P_IP,
                &echo_request(c4.0, vip4.0),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_VIP_UNSERVED),
        },
        Fixture {
            name: "ICMPv6 echo to a VIP",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                None,
                ETH_P_IPV6,
                &echo_request(c6.0, vip6.0),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_VIP_UNSERVED),
        },
        Fixture {
            name: "ICMP frag-needed to a VIP quoting a UDP packet",
            input: ethernet(
                LB_MAC,
                ROUTER_MAC,
                None,
                ETH_P_IP,
                &icmp4_frag_needed(
                    v4("203.0.113.1"),
                    v4("192.0.2.10"),
                    1400,
                    &Ipv4::new(v4("192.0.2.10"), v4("198.51.100.7"), 17).build(&[0; 8]),
                ),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_VIP_UNSERVED),
        },
        // ICMP errors whose quote cannot be read.
        Fixture {
            name: "ICMP frag-needed to a VIP with the quote cut before the ports",
            input: ethernet(
                LB_MAC,
                ROUTER_MAC,
                None,
                ETH_P_IP,
                &icmp4_frag_needed(
                    v4("203.0.113.1"),
                    v4("192.0.2.10"),
                    1400,
                    &quote(vip4, c4, ACK)[..22],
                ),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_ICMP),
        },
        Fixture {
            name: "ICMP frag-needed to a VIP quoting IP with options",
            input: ethernet(
                LB_MAC,
                ROUTER_MAC,
                None,
                ETH_P_IP,
                &icmp4_frag_needed(v4("203.0.113.1"), v4("192.0.2.10"), 1400, &{
                    let mut q = quote(vip4, c4, ACK);
                    q[0] = 0x46;
                    q
                }),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_ICMP),
        },
        Fixture {
            name: "ICMPv6 packet-too-big to a VIP quoting a truncated IPv6 header",
            input: ethernet(
                LB_MAC,
                ROUTER_MAC,
                None,
                ETH_P_IPV6,
                &icmp6_packet_too_big(
                    v6("2001:db8:ff::1"),
                    v6("2001:db8::10"),
                    1280,
                    &quote(vip6, c6, ACK)[..30],
                ),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_ICMP),
        },
        Fixture {
            name: "ICMPv6 packet-too-big to a VIP quoting an extension header",
            input: ethernet(
                LB_MAC,
                ROUTER_MAC,
                None,
                ETH_P_IPV6,
                &icmp6_packet_too_big(v6("2001:db8:ff::1"), v6("2001:db8::10"), 1280, &{
                    let mut q = quote(vip6, c6, ACK);
                    q[6] = 44;
                    q
                }),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_ICMP),
        },
        // Forwarded.
        Fixture {
            name: "VIP SYN IPv4",
            input: tcp4("192.0.2.10", 80, SYN),
            expect: Expect::Forward {
                service: "web",
                flow: flow(c4, vip4),
                new: true,
            },
        },
        Fixture {
            name: "VIP ACK IPv4, same flow",
            input: tcp4("192.0.2.10", 80, ACK),
            expect: Expect::Forward {
                service: "web",
                flow: flow(c4, vip4),
                new: false,
            },
        },
        Fixture {
            name: "VIP ACK IPv4, unknown flow takes the ring",
            input: tcp_frame(
                LB_MAC,
                ROUTER_MAC,
                None,
                (ip("198.51.100.8"), 40001),
                vip4,
                ACK | PSH,
            ),
            expect: Expect::Forward {
                service: "web",
                flow: flow((ip("198.51.100.8"), 40001), vip4),
                new: true,
            },
        },
        Fixture {
            name: "VIP SYN IPv6",
            input: tcp6("2001:db8::10", 443, SYN),
            expect: Expect::Forward {
                service: "web6",
                flow: flow(c6, vip6),
                new: true,
            },
        },
        Fixture {
            name: "VIP ACK IPv6, same flow",
            input: tcp6("2001:db8::10", 443, ACK),
            expect: Expect::Forward {
                service: "web6",
                flow: flow(c6, vip6),
                new: false,
            },
        },
        Fixture {
            name: "VIP SYN IPv4, VLAN-tagged",
            input: tcp_frame(
                LB_MAC,
                CLIENT_MAC,
                Some(42),
                (ip("198.51.100.9"), 40002),
                vip4,
                SYN,
            ),
            expect: Expect::Forward {
                service: "web",
                flow: flow((ip("198.51.100.9"), 40002), vip4),
                new: true,
            },
        },
        Fixture {
            name: "VIP SYN IPv6, VLAN-tagged",
            input: tcp_frame(
                LB_MAC,
                CLIENT_MAC,
                Some(42),
                (ip("2001:db8:1::9"), 40002),
                vip6,
                SYN,
            ),
            expect: Expect::Forward {
                service: "web6",
                flow: flow((ip("2001:db8:1::9"), 40002), vip6),
                new: true,
            },
        },
        Fixture {
            name: "non-VIP, VLAN-tagged",
            input: tcp_frame(
                LB_MAC,
                CLIENT_MAC,
                Some(42),
                c4,
                (ip("192.0.2.99"), 80),
                SYN,
            ),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_NOT_VIP),
        },
        Fixture {
            name: "VIP with no backend",
            input: tcp4("192.0.2.11", 80, SYN),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_NO_BACKEND),
        },
        // Truncated before the destination is known: passed (the kernel drops them).
        // (BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, so the
        // shortest truncation a fixture can show is one cut right after it.)
        Fixture {
            name: "VLAN tag cut short",
            input: [&LB_MAC[..], &CLIENT_MAC[..], &[0x81, 0x00, 0x00]].concat(),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_TRUNCATED),
        },
        Fixture {
            name: "IPv4 header cut short",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                None,
                ETH_P_IP,
                &Ipv4::new(v4("198.51.100.7"), v4("192.0.2.10"), 6).build(&[])[..12],
            ),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_TRUNCATED),
        },
        Fixture {
            name: "IPv6 header cut short",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                None,
                ETH_P_IPV6,
                &ipv6(v6("2001:db8:1::7"), v6("2001:db8::10"), 6, 64, &[])[..30],
            ),
            expect: Expect::Unchanged(XDP_PASS, reason::PASS_TRUNCATED),
        },
        // Malformed, for a VIP: dropped, never forwarded half-parsed.
        Fixture {
            name: "IPv4 header length 4",
            input: bad_ipv4(|h| h.ihl = 4),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_IPV4),
        },
        Fixture {
            name: "IPv4 version 5",
            input: bad_ipv4(|h| h.version = 5),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_IPV4),
        },
        Fixture {
            name: "IPv4 total length beyond the frame",
            input: bad_ipv4(|h| h.total_len = Some(400)),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_IPV4),
        },
        Fixture {
            name: "IPv4 total length below the header",
            input: bad_ipv4(|h| h.total_len = Some(19)),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_IPV4),
        },
        Fixture {
            name: "IPv4 options",
            input: bad_ipv4(|h| h.ihl = 6),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_IP_OPTIONS),
        },
        Fixture {
            name: "IPv4 first fragment",
            input: bad_ipv4(|h| h.frag = 0x2000),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_FRAGMENT),
        },
        Fixture {
            name: "IPv4 later fragment",
            input: bad_ipv4(|h| h.frag = 0x0010),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_FRAGMENT),
        },
        Fixture {
            name: "TCP header cut short",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                None,
                ETH_P_IP,
                &Ipv4::new(v4("198.51.100.7"), v4("192.0.2.10"), 6)
                    .build(&tcp4("192.0.2.10", 80, SYN)[34..44]),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_TCP),
        },
        Fixture {
            name: "TCP data offset 4",
            input: {
                let mut seg = tcp(ip("198.51.100.7"), ip("192.0.2.10"), 40000, 80, SYN, b"");
                seg[12] = 4 << 4;
                ethernet(
                    LB_MAC,
                    CLIENT_MAC,
                    None,
                    ETH_P_IP,
                    &Ipv4::new(v4("198.51.100.7"), v4("192.0.2.10"), 6).build(&seg),
                )
            },
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_TCP),
        },
        Fixture {
            name: "TCP data offset beyond the packet",
            input: {
                let mut seg = tcp(ip("198.51.100.7"), ip("192.0.2.10"), 40000, 80, SYN, b"");
                seg[12] = 15 << 4;
                ethernet(
                    LB_MAC,
                    CLIENT_MAC,
                    None,
                    ETH_P_IP,
                    &Ipv4::new(v4("198.51.100.7"), v4("192.0.2.10"), 6).build(&seg),
                )
            },
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_TCP),
        },
        Fixture {
            name: "IPv6 hop-by-hop header to a VIP",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                None,
                ETH_P_IPV6,
                &ipv6(
                    v6("2001:db8:1::7"),
                    v6("2001:db8::10"),
                    0,
                    64,
                    &[6, 0, 1, 4, 0, 0, 0, 0],
                ),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_IPV6_EXT),
        },
        Fixture {
            name: "IPv6 fragment to a VIP",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                None,
                ETH_P_IPV6,
                &ipv6(
                    v6("2001:db8:1::7"),
                    v6("2001:db8::10"),
                    44,
                    64,
                    &[6, 0, 0, 1, 0, 0, 0, 1],
                ),
            ),
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_IPV6_EXT),
        },
        Fixture {
            name: "IPv6 payload length beyond the frame",
            input: {
                let mut f = tcp6("2001:db8::10", 443, SYN);
                f[18..20].copy_from_slice(&500u16.to_be_bytes());
                f
            },
            expect: Expect::Unchanged(XDP_DROP, reason::DROP_BAD_IPV6),
        },
    ];
    // Ethernet padding after a short IPv4 packet is fine: still forwarded.
    let padded = |flags| {
        let mut f = tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            (ip("198.51.100.10"), 40003),
            vip4,
            flags,
        );
        f.extend_from_slice(&[0; 6]);
        f
    };
    v.push(Fixture {
        name: "VIP SYN with Ethernet padding",
        input: padded(SYN),
        expect: Expect::Forward {
            service: "web",
            flow: flow((ip("198.51.100.10"), 40003), vip4),
            new: true,
        },
    });
    // Its flow's next segment, padded too: sent from the parse (an entry that needs no
    // write), counted by the frame's length, padding included, as the SYN was.
    v.push(Fixture {
        name: "VIP ACK with Ethernet padding, same flow",
        input: padded(ACK),
        expect: Expect::Forward {
            service: "web",
            flow: flow((ip("198.51.100.10"), 40003), vip4),
            new: false,
        },
    });
    v
}

#[test]
fn fixtures_verdicts_bytes_and_counters() {
    if !require_root("fixtures_verdicts_bytes_and_counters") {
        return;
    }
    let mut rig = rig();
    let mut failures = Vec::new();
    for f in fixtures() {
        let globals = global_counters(&rig);
        let forward_before = match &f.expect {
            Expect::Forward { service, flow, .. } => {
                let (id, _) = ring_choice(&rig, service, flow);
                Some((
                    rig.counter(vip_slot(vip_num(&rig, service))),
                    rig.counter(backend_slot(id)),
                ))
            }
            _ => None,
        };
        let (verdict, out) = rig.run(&f.input);
        let after = global_counters(&rig);
        let mut problems = Vec::new();
        match &f.expect {
            Expect::Unchanged(v, why) | Expect::Bytes(v, _, why) => {
                if verdict != *v {
                    problems.push(format!("verdict {verdict}, want {v}"));
                }
                let want = match &f.expect {
                    Expect::Bytes(_, b, _) => b.clone(),
                    _ => f.input.clone(),
                };
                if out != want {
                    problems.push(format!(
                        "output differs\n   got  {out:02x?}\n   want {want:02x?}"
                    ));
                }
                for r in 0..reason::COUNT as usize {
                    let want = globals[r] + u64::from(r as u32 == *why);
                    if after[r] != want {
                        problems.push(format!(
                            "counter {} is {}, want {want}",
                            reason::NAMES[r],
                            after[r]
                        ));
                    }
                }
            }
            Expect::Forward { service, flow, new } => {
                let (id, mac) = ring_choice(&rig, service, flow);
                if verdict != XDP_TX {
                    problems.push(format!("verdict {verdict}, want XDP_TX"));
                }
                let want = with_macs(&f.input, mac, LB_MAC);
                if out != want {
                    problems.push(format!(
                        "output differs\n   got  {out:02x?}\n   want {want:02x?}"
                    ));
                }
                if after != globals {
                    problems.push(format!("a global counter moved: {globals:?} -> {after:?}"));
                }
                let (vip_before, backend_before) = forward_before.unwrap_or_default();
                let vip_after = rig.counter(vip_slot(vip_num(&rig, service)));
                let backend_after = rig.counter(backend_slot(id));
                for (what, before, after) in [
                    ("VIP", vip_before, vip_after),
                    ("backend", backend_before, backend_after),
                ] {
                    if after.packets != before.packets + 1
                        || after.bytes != before.bytes + f.input.len() as u64
                        || after.new_flows != before.new_flows + u64::from(*new)
                    {
                        problems.push(format!("{what} counter {before:?} -> {after:?}, want one packet of {} bytes, new flow: {new}", f.input.len()));
                    }
                }
                match rig.dp.flow(flow).expect("flow lookup") {
                    Some(state) if state.backend == id => {}
                    other => problems.push(format!(
                        "connection table holds {other:?}, want backend {id}"
                    )),
                }
            }
        }
        if problems.is_empty() {
            println!("ok    {}", f.name);
        } else {
            println!("FAIL  {}", f.name);
            failures.push(format!("{}:\n  {}", f.name, problems.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn new_flows_are_counted_on_vip_and_backend() {
    if !require_root("new_flows_are_counted_on_vip_and_backend") {
        return;
    }
    let mut rig = rig();
    let vip = vip_num(&rig, "web");
    let before = rig.counter(vip_slot(vip));
    let mut backends_new = 0;
    for port in 0..50u16 {
        let f = tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            (ip("198.51.100.20"), 50000 + port),
            (ip("192.0.2.10"), 80),
            SYN,
        );
        let (v, _) = rig.run(&f);
        assert_eq!(v, XDP_TX);
    }
    let after = rig.counter(vip_slot(vip));
    assert_eq!(after.new_flows - before.new_flows, 50);
    assert_eq!(after.packets - before.packets, 50);
    for s in &rig.services[0].backends {
        let id = rig.programmer.backend_id("web", s.address).expect("id");
        backends_new += rig.counter(backend_slot(id)).new_flows;
    }
    assert_eq!(
        backends_new, 50,
        "every new flow is counted on exactly one backend"
    );
}

#[test]
fn established_flow_keeps_its_backend_after_its_slot_moves() {
    if !require_root("established_flow_keeps_its_backend_after_its_slot_moves") {
        return;
    }
    let mut rig = rig();
    let vip = (ip("192.0.2.10"), 80);
    let client = (ip("198.51.100.30"), 41000);
    let key = flow(client, vip);
    let syn = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN);
    let ack = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK);
    let (v, out) = rig.run(&syn);
    assert_eq!(v, XDP_TX);
    let (first_id, first_mac) = ring_choice(&rig, "web", &key);
    assert_eq!(out[0..6], first_mac);

    // Take that backend out of the ring: its slots move to the others.
    let mut s = services();
    let gone = rig.services[0]
        .backends
        .iter()
        .find(|b| backend_mac(b.address) == first_mac)
        .expect("backend")
        .address;
    s[0].backends.retain(|b| b.address != gone);
    rig.apply(s).expect("reprogram");
    let (moved_id, moved_mac) = ring_choice(&rig, "web", &key);
    assert_ne!(
        moved_id, first_id,
        "the slot must have moved for this test to mean anything"
    );

    // The established flow stays where it was...
    for _ in 0..3 {
        let (v, out) = rig.run(&ack);
        assert_eq!(v, XDP_TX);
        assert_eq!(out[0..6], first_mac, "established flow moved");
    }
    // ...a new connection on the same 5-tuple (SYN) follows today's ring...
    let (v, out) = rig.run(&syn);
    assert_eq!(v, XDP_TX);
    assert_eq!(out[0..6], moved_mac);
    // ...and from then on the flow's packets go there.
    let (_, out) = rig.run(&ack);
    assert_eq!(out[0..6], moved_mac);
}

/// An established DSR segment takes its service from its VIP number's slot
/// (`VIP_SLOTS`), with no VIPS lookup: with the VIPS entry taken away behind the agent's
/// back, the flow's segments still reach its backend, while a new flow is not served.
/// An entry whose VIP number's slot holds another service is served through VIPS, to
/// the entry's backend, and counted on its own service. When the agent removes the
/// service, the slot goes first: the flow's segments are no longer forwarded.
#[test]
fn established_dsr_segments_take_their_service_from_the_vip_slot() {
    if !require_root("established_dsr_segments_take_their_service_from_the_vip_slot") {
        return;
    }
    let mut rig = rig();
    let vip = (ip("192.0.2.10"), 80);
    let client = (ip("198.51.100.40"), 42000);
    let syn = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN);
    let ack = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK);
    let (v, out) = rig.run(&syn);
    assert_eq!(v, XDP_TX);
    let mac = &out[0..6].to_vec();

    // The slot alone: VIPS loses the service behind the agent's back.
    let mut vips: aya::maps::HashMap<_, VipKey, VipInfo> =
        aya::maps::HashMap::try_from(rig.map(names::MAP_VIPS).expect("VIPS")).expect("VIPS");
    let info = vips
        .get(&vip_key(vip.0, vip.1), 0)
        .expect("the service in VIPS");
    vips.remove(&vip_key(vip.0, vip.1))
        .expect("remove from VIPS");
    for _ in 0..3 {
        let (v, out) = rig.run(&ack);
        assert_eq!(
            v, XDP_TX,
            "an established flow's segment, by its VIP's slot"
        );
        assert_eq!(&out[0..6], mac);
    }
    let new = tcp_frame(LB_MAC, CLIENT_MAC, None, (client.0, 42001), vip, SYN);
    assert_ne!(rig.run(&new).0, XDP_TX, "a new flow needs VIPS");
    vips.insert(vip_key(vip.0, vip.1), info, 0)
        .expect("VIPS back");

    // An entry naming another service's number: VIPS decides the service, the entry the
    // backend.
    let key = flow(client, vip);
    let mut flows = rig.flows().expect("FLOWS");
    let mut state = flows.get(&key).expect("the flow's entry");
    let (web, web6) = (vip_num(&rig, "web"), vip_num(&rig, "web6"));
    state.vip_num = web6;
    flows.set(&key, state).expect("entry rewritten");
    let (web_before, web6_before) = (rig.counter(vip_slot(web)), rig.counter(vip_slot(web6)));
    let (v, out) = rig.run(&ack);
    assert_eq!(v, XDP_TX);
    assert_eq!(&out[0..6], mac, "the entry's backend");
    assert_eq!(rig.counter(vip_slot(web)).packets, web_before.packets + 1);
    assert_eq!(rig.counter(vip_slot(web6)).packets, web6_before.packets);

    // The agent removes the service: no slot, no VIPS entry, no VIP address.
    state.vip_num = web;
    flows.set(&key, state).expect("entry restored");
    assert_eq!(rig.run(&ack).0, XDP_TX);
    let mut s = services();
    s.retain(|s| s.name != "web");
    rig.apply(s).expect("reprogram");
    assert_eq!(
        rig.run(&ack).0,
        XDP_PASS,
        "a removed service's flow is not forwarded"
    );
}

/// An established segment whose entry's refresh stamp is fresh
/// (`FlowState::touched_jiffies`, less than `FLOW_TOUCH_JIFFIES` old) reads no clock and
/// writes nothing, whatever the entry's time; it is still forwarded and counted. A stale
/// stamp (0, as the agent writes) makes the next segment refresh the time and the stamp;
/// a FIN still marks a fresh entry closing. IPv4 and IPv6.
#[test]
fn an_established_flows_time_is_refreshed_by_its_stamp_not_by_every_segment() {
    if !require_root("an_established_flows_time_is_refreshed_by_its_stamp_not_by_every_segment") {
        return;
    }
    let mut rig = rig();
    let mut flows = rig.flows().expect("FLOWS");
    for (name, vip, client) in [
        ("web", (ip("192.0.2.10"), 80), (ip("198.51.100.41"), 42100)),
        (
            "web6",
            (ip("2001:db8::10"), 443),
            (ip("2001:db8:1::41"), 42100),
        ),
    ] {
        let key = flow(client, vip);
        let syn = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN);
        let ack = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK);
        let fin = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, FIN | ACK);
        let (v, out) = rig.run(&syn);
        assert_eq!(v, XDP_TX, "{name}");
        let mac: [u8; 6] = out[0..6].try_into().expect("MAC");
        let (backend, _) = backend_id_by_mac(&rig, name, mac);
        let recorded = flows.get(&key).expect("recorded");

        // A stale stamp: the segment refreshes the time and the stamp.
        let before = monotonic_ns();
        let old = FlowState {
            last_seen_ns: 1,
            touched_jiffies: 0,
            ..recorded
        };
        flows.set(&key, old).expect("entry aged");
        assert_eq!(
            rig.run(&ack),
            (XDP_TX, with_macs(&ack, mac, LB_MAC)),
            "{name}"
        );
        let refreshed = flows.get(&key).expect("entry");
        assert!(
            refreshed.last_seen_ns >= before - lb_common::COARSE_CLOCK_LAG_NS,
            "{name}: a stale stamp: the time is refreshed ({refreshed:?})"
        );
        assert_ne!(refreshed.touched_jiffies, 0, "{name}: and the stamp");

        // A fresh stamp: no write, however old the time, and the segment still counts.
        // Should this process sleep past `FLOW_TOUCH_JIFFIES` between the write and the
        // segment, the stamp is due and moves by at least that much: tried again.
        let mut kept = false;
        for _ in 0..5 {
            let stamp = flows.get(&key).expect("entry").touched_jiffies;
            let aged = FlowState {
                last_seen_ns: 1,
                touched_jiffies: stamp,
                ..refreshed
            };
            flows.set(&key, aged).expect("entry aged");
            let (vip_before, backend_before) = (
                rig.counter(vip_slot(vip_num(&rig, name))),
                rig.counter(backend_slot(backend)),
            );
            assert_eq!(
                rig.run(&ack),
                (XDP_TX, with_macs(&ack, mac, LB_MAC)),
                "{name}"
            );
            let backend_after = rig.counter(backend_slot(backend));
            assert_eq!(backend_after.packets, backend_before.packets + 1, "{name}");
            assert_eq!(
                backend_after.bytes,
                backend_before.bytes + ack.len() as u64,
                "{name}: the frame's bytes"
            );
            assert_eq!(backend_after.new_flows, backend_before.new_flows, "{name}");
            assert_eq!(
                rig.counter(vip_slot(vip_num(&rig, name))).packets,
                vip_before.packets + 1,
                "{name}"
            );
            let after = flows.get(&key).expect("entry");
            if after == aged {
                kept = true;
                break;
            }
            assert!(
                after.touched_jiffies.wrapping_sub(stamp) >= lb_common::FLOW_TOUCH_JIFFIES,
                "{name}: written with a fresh stamp: {aged:?} -> {after:?}"
            );
        }
        assert!(kept, "{name}: a fresh stamp: the entry is not written");

        // A FIN: closing is written even with a fresh stamp.
        assert_eq!(
            rig.run(&fin),
            (XDP_TX, with_macs(&fin, mac, LB_MAC)),
            "{name}"
        );
        let closed = flows.get(&key).expect("entry");
        assert_eq!(closed.flags & FLOW_F_CLOSING, FLOW_F_CLOSING, "{name}");
        assert_eq!(closed.backend, backend, "{name}");
    }
}

#[test]
fn host_that_does_not_serve_drops_vip_traffic_and_answers_nothing() {
    if !require_root("host_that_does_not_serve_drops_vip_traffic_and_answers_nothing") {
        return;
    }
    let mut rig = rig();
    rig.serving.set_serving(false, 0).expect("serving switch");
    // Every kind of VIP traffic, served port or not, TCP or not: dropped, never passed.
    let udp = ethernet(
        LB_MAC,
        CLIENT_MAC,
        None,
        ETH_P_IP,
        &Ipv4::new(v4("198.51.100.7"), v4("192.0.2.10"), 17).build(&[0; 8]),
    );
    for frame in [
        tcp4("192.0.2.10", 80, SYN),
        tcp4("192.0.2.10", 80, ACK),
        tcp4("192.0.2.10", 81, SYN),
        tcp6("2001:db8::10", 443, SYN),
        udp,
    ] {
        let globals = global_counters(&rig);
        let (v, out) = rig.run(&frame);
        assert_eq!((v, &out), (XDP_DROP, &frame));
        let mut want = globals.clone();
        want[reason::DROP_NOT_MASTER as usize] += 1;
        assert_eq!(global_counters(&rig), want, "only drop_not_master moves");
    }
    // Non-VIP traffic still passes untouched.
    let other = tcp4("192.0.2.99", 80, SYN);
    assert_eq!(rig.run(&other), (XDP_PASS, other));
    let req = ethernet(
        BROADCAST,
        CLIENT_MAC,
        None,
        ETH_P_ARP,
        &arp(1, CLIENT_MAC, v4("192.0.2.50"), [0; 6], v4("192.0.2.10")),
    );
    let (v, out) = rig.run(&req);
    assert_eq!((v, out), (XDP_PASS, req));
}

#[test]
fn fin_and_rst_end_a_flows_activity() {
    if !require_root("fin_and_rst_end_a_flows_activity") {
        return;
    }
    let mut rig = rig();
    let vip = (ip("192.0.2.10"), 80);
    let a = (ip("198.51.100.40"), 42000);
    let b = (ip("198.51.100.41"), 42001);
    let idle = std::time::Duration::from_secs(60);
    // Counted as the agent's flow scanner counts: both tables read, merged, filtered.
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let mut count = |idle: std::time::Duration| -> u64 {
        let conns = store.read(FlowTable::Connections).expect("read flows");
        let pinned = store.read(FlowTable::Pinned).expect("read pinned");
        let merged = flows::merge(&conns, &pinned);
        flows::count_active(&conns, &merged, monotonic_ns(), idle)
            .values()
            .sum()
    };
    let mut active = |_: &Rig| count(idle);
    assert_eq!(active(&rig), 0);
    for client in [a, b] {
        let (v, _) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN));
        assert_eq!(v, XDP_TX);
    }
    rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, a, vip, ACK | PSH));
    assert_eq!(active(&rig), 2);
    // The client closes one: FIN. The flow still forwards (the last ACKs must reach the
    // backend) but no longer counts as active.
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, a, vip, FIN | ACK));
    assert_eq!(v, XDP_TX);
    assert_eq!(out[0..6], ring_choice(&rig, "web", &flow(a, vip)).1);
    assert_eq!(active(&rig), 1);
    rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, a, vip, ACK));
    assert_eq!(active(&rig), 1, "an ACK after FIN does not revive the flow");
    // The other resets.
    rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, b, vip, RST));
    assert_eq!(active(&rig), 0);
    // A new connection on the same 5-tuple is active again.
    rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, a, vip, SYN));
    assert_eq!(active(&rig), 1);
    // And idle flows age out of the count.
    assert_eq!(count(std::time::Duration::from_nanos(1)), 0);
}

#[test]
fn flows_of_a_backend_that_went_down_are_rebalanced() {
    if !require_root("flows_of_a_backend_that_went_down_are_rebalanced") {
        return;
    }
    let mut rig = rig();
    let vip = (ip("192.0.2.10"), 80);
    let client = (ip("198.51.100.50"), 43000);
    let key = flow(client, vip);
    rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN));
    let (first, first_mac) = ring_choice(&rig, "web", &key);
    let dead = rig.services[0]
        .backends
        .iter()
        .find(|b| backend_mac(b.address) == first_mac)
        .expect("backend")
        .address;
    let down = move |s: &Service, b: &BackendSpec| BackendView {
        healthy: b.address != dead,
        ..all_up(s, b)
    };
    rig.apply_with(services(), &down).expect("reprogram");
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK));
    assert_eq!(v, XDP_TX);
    assert_ne!(
        out[0..6],
        first_mac,
        "a flow must not follow its backend into the void"
    );
    let moved = rig.dp.flow(&key).expect("lookup").expect("flow");
    assert_ne!(moved.backend, first);
    let new_mac = rig.services[0]
        .backends
        .iter()
        .find(|b| rig.programmer.backend_id("web", b.address) == Some(moved.backend))
        .map(|b| backend_mac(b.address));
    assert_eq!(
        Some(&out[0..6]),
        new_mac.as_ref().map(|m| &m[..]),
        "sent where the table now says"
    );
}

fn events(rig: &Rig) -> Vec<u64> {
    (0..event::COUNT)
        .map(|e| rig.counter(event_slot(e)).packets)
        .collect()
}

/// `before` with `n` more in `which`.
fn plus(before: &[u64], which: u32, n: u64) -> Vec<u64> {
    let mut v = before.to_vec();
    v[which as usize] += n;
    v
}

fn backend_id_by_mac(rig: &Rig, service: &str, mac: [u8; 6]) -> (u32, IpAddr) {
    let s = rig
        .services
        .iter()
        .find(|s| s.name == service)
        .expect("service");
    let b = s
        .backends
        .iter()
        .find(|b| backend_mac(b.address) == mac)
        .expect("backend");
    (
        rig.programmer.backend_id(service, b.address).expect("id"),
        b.address,
    )
}

#[test]
fn flood_guard_records_at_most_the_limit_per_cpu_and_window() {
    if !require_root("flood_guard_records_at_most_the_limit_per_cpu_and_window") {
        return;
    }
    run_on_cpu(0);
    let mut rig = rig();
    let mut store = rig.dp.take_flow_store().expect("flow store");
    rig.set_flood_guard(5);
    let vip = (ip("192.0.2.10"), 80);
    let before = events(&rig);
    let mut keys = Vec::new();
    for port in 0..8u16 {
        let client = (ip("198.51.100.60"), 44000 + port);
        let key = flow(client, vip);
        let syn = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN);
        let (v, out) = rig.run(&syn);
        // Every one is forwarded, recorded or not.
        assert_eq!(v, XDP_TX);
        assert_eq!(
            out,
            with_macs(&syn, ring_choice(&rig, "web", &key).1, LB_MAC)
        );
        keys.push(key);
    }
    let mut recorded: Vec<FlowKey> = store
        .read(FlowTable::Connections)
        .expect("read FLOWS")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    recorded.sort_by_key(|k| (k.sport_be.to_be(), k.src));
    assert_eq!(
        recorded,
        keys[..5],
        "the first five flows are recorded, no more"
    );
    assert_eq!(
        events(&rig),
        plus(&before, event::FLOW_NOT_RECORDED, 3),
        "three flows over the limit are counted"
    );
    // Off again: the next new flow is recorded.
    rig.set_flood_guard(0);
    let client = (ip("198.51.100.61"), 45000);
    rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN));
    assert!(rig.dp.flow(&flow(client, vip)).expect("lookup").is_some());
    assert_eq!(events(&rig), plus(&before, event::FLOW_NOT_RECORDED, 3));
}

/// The connection table's buckets (`lb_common::flowtab`): a new flow into a full
/// bucket takes a closing flow's slot first, else the longest idle flow's; a flow the
/// bucket holds keeps its own slot (a retransmitted SYN pushes nothing out); the
/// bucket's other flows stay.
#[test]
fn a_full_bucket_gives_up_a_closing_then_the_longest_idle_flow() {
    if !require_root("a_full_bucket_gives_up_a_closing_then_the_longest_idle_flow") {
        return;
    }
    let sizes = MapSizes {
        max_flows: 1024,
        max_pinned_flows: 1024,
        ..MapSizes::default()
    };
    let mut rig = Rig::new_sized(services(), sizes).expect("load (needs root)");
    let mut flows = rig.flows().expect("FLOWS");
    let vip = (ip("192.0.2.10"), 80);
    let first = (ip("198.51.100.9"), 1000);
    let bucket = flows.bucket_of(&flow(first, vip));
    // Ten flows of one bucket (of 128), by the table's own seed.
    let clients: Vec<(IpAddr, u16)> = (1000..u16::MAX)
        .map(|port| (first.0, port))
        .filter(|c| flows.bucket_of(&flow(*c, vip)) == bucket)
        .take(10)
        .collect();
    assert_eq!(clients.len(), 10);
    let keys: Vec<FlowKey> = clients.iter().map(|c| flow(*c, vip)).collect();
    let syn = |c: (IpAddr, u16)| tcp_frame(LB_MAC, CLIENT_MAC, None, c, vip, SYN);
    let held = |flows: &lb_tests::rig::Flows| -> Vec<bool> {
        keys.iter().map(|k| flows.holds(k).expect("read")).collect()
    };
    for c in &clients[..8] {
        assert_eq!(rig.run(&syn(*c)).0, XDP_TX);
    }
    let full = [true, true, true, true, true, true, true, true, false, false];
    assert_eq!(held(&flows), full, "eight flows fill the bucket");
    // A retransmitted SYN takes its own slot again.
    assert_eq!(rig.run(&syn(clients[3])).0, XDP_TX);
    assert_eq!(held(&flows), full, "a flow it holds pushes nothing out");
    // Flow 5 idle for 10 s, flow 2 closing (though seen last).
    let idle = flows.get(&keys[5]).expect("flow 5");
    let idle = FlowState {
        last_seen_ns: idle.last_seen_ns.saturating_sub(10_000_000_000),
        ..idle
    };
    flows.set(&keys[5], idle).expect("aged");
    let closing = flows.get(&keys[2]).expect("flow 2");
    let closing = FlowState {
        flags: closing.flags | FLOW_F_CLOSING,
        last_seen_ns: closing.last_seen_ns + 1,
        ..closing
    };
    flows.set(&keys[2], closing).expect("closing");
    assert_eq!(rig.run(&syn(clients[8])).0, XDP_TX);
    assert_eq!(
        held(&flows),
        [true, true, false, true, true, true, true, true, true, false],
        "the ninth flow takes the closing flow's slot"
    );
    assert_eq!(rig.run(&syn(clients[9])).0, XDP_TX);
    assert_eq!(
        held(&flows),
        [true, true, false, true, true, false, true, true, true, true],
        "the tenth takes the longest idle flow's"
    );
}

#[test]
fn a_pinned_flow_keeps_its_backend_when_the_connection_table_loses_it() {
    if !require_root("a_pinned_flow_keeps_its_backend_when_the_connection_table_loses_it") {
        return;
    }
    run_on_cpu(0);
    // A small connection table, so that other flows push this one out.
    let sizes = MapSizes {
        max_flows: 1024,
        max_pinned_flows: 1024,
        ..MapSizes::default()
    };
    let mut rig = Rig::new_sized(services(), sizes).expect("load (needs root)");
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let vip = (ip("192.0.2.10"), 80);
    let client = (ip("198.51.100.70"), 46000);
    let key = flow(client, vip);
    let syn = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN);
    let ack = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK);
    let (_, out) = rig.run(&syn);
    let first_mac: [u8; 6] = out[0..6].try_into().expect("MAC");
    let (first, gone) = backend_id_by_mac(&rig, "web", first_mac);

    // The agent pins it: its backend leaves the ring (but stays valid for old flows).
    let state = rig.dp.flow(&key).expect("lookup").expect("recorded");
    assert_eq!(state.backend, first);
    let pinned = FlowState {
        last_seen_ns: 0,
        ..state
    };
    assert_eq!(store.pin(&[(key, pinned)]).expect("pin"), 0);
    let mut s = services();
    s[0].backends.retain(|b| b.address != gone);
    rig.apply(s).expect("reprogram");
    assert_ne!(
        ring_choice(&rig, "web", &key).0,
        first,
        "the ring must now choose another backend"
    );

    // Other flows push it out of the connection table (its bucket's slots go to newer
    // flows).
    for i in 0..4096u32 {
        let c = (
            IpAddr::V4(Ipv4Addr::from(0xc633_0000 + i)),
            (40000 + i % 1000) as u16,
        );
        rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, c, vip, SYN));
    }
    assert_eq!(
        rig.dp.flow(&key).expect("lookup"),
        None,
        "evicted from FLOWS"
    );

    // The pinned table keeps it on its backend; no miss, nothing recorded.
    let before = events(&rig);
    let backend_before = rig.counter(backend_slot(first));
    let (v, out) = rig.run(&ack);
    assert_eq!((v, out), (XDP_TX, with_macs(&ack, first_mac, LB_MAC)));
    assert_eq!(events(&rig), before, "a pinned hit is no miss");
    let backend_after = rig.counter(backend_slot(first));
    assert_eq!(backend_after.packets, backend_before.packets + 1);
    assert_eq!(backend_after.new_flows, backend_before.new_flows);
    assert_eq!(rig.dp.flow(&key).expect("lookup"), None, "not copied back");
    let read = store.read(FlowTable::Pinned).expect("read PINNED");
    assert_eq!(read.len(), 1);
    let touched = read[0].1;
    assert!(touched.last_seen_ns > 0, "a stale last_seen is refreshed");
    assert_eq!(touched.flags & FLOW_F_CLOSING, 0);

    // Within the second, another packet writes nothing.
    rig.run(&ack);
    assert_eq!(
        store.read(FlowTable::Pinned).expect("read")[0].1,
        touched,
        "no write per packet"
    );

    // FIN: still to its backend, now closing.
    let fin = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, FIN | ACK);
    let (v, out) = rig.run(&fin);
    assert_eq!((v, out), (XDP_TX, with_macs(&fin, first_mac, LB_MAC)));
    let closed = store.read(FlowTable::Pinned).expect("read")[0].1;
    assert_eq!(closed.flags & FLOW_F_CLOSING, FLOW_F_CLOSING);
    assert_eq!(closed.backend, first);

    // Unpinned, the flow is lost: the ring takes it, and that is a miss.
    store.unpin(&[key]).expect("unpin");
    let before = events(&rig);
    let (_, out) = rig.run(&ack);
    assert_eq!(out[0..6], ring_choice(&rig, "web", &key).1);
    assert_eq!(events(&rig), plus(&before, event::FLOW_MISS, 1));
}

#[test]
fn an_rst_is_forwarded_but_never_records_a_flow() {
    if !require_root("an_rst_is_forwarded_but_never_records_a_flow") {
        return;
    }
    let mut rig = rig();
    let vip = (ip("192.0.2.10"), 80);
    let client = (ip("198.51.100.80"), 47000);
    let key = flow(client, vip);
    let before = events(&rig);
    for flags in [RST, RST | ACK] {
        let rst = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, flags);
        let (v, out) = rig.run(&rst);
        assert_eq!(
            (v, out),
            (
                XDP_TX,
                with_macs(&rst, ring_choice(&rig, "web", &key).1, LB_MAC)
            )
        );
        assert_eq!(rig.dp.flow(&key).expect("lookup"), None, "RST recorded");
    }
    assert_eq!(events(&rig), plus(&before, event::FLOW_MISS, 2));
}

#[test]
fn a_flow_in_neither_table_is_counted_as_a_miss_once() {
    if !require_root("a_flow_in_neither_table_is_counted_as_a_miss_once") {
        return;
    }
    let mut rig = rig();
    let vip = (ip("2001:db8::10"), 443);
    let client = (ip("2001:db8:1::80"), 47001);
    let key = flow(client, vip);
    let ack = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK);
    let before = events(&rig);
    let (v, out) = rig.run(&ack);
    assert_eq!(
        (v, out),
        (
            XDP_TX,
            with_macs(&ack, ring_choice(&rig, "web6", &key).1, LB_MAC)
        )
    );
    assert_eq!(events(&rig), plus(&before, event::FLOW_MISS, 1));
    assert!(rig.dp.flow(&key).expect("lookup").is_some(), "recorded");
    // Known now: no more misses. A SYN is never a miss.
    rig.run(&ack);
    let other = (ip("2001:db8:1::81"), 47002);
    rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, other, vip, SYN));
    assert_eq!(events(&rig), plus(&before, event::FLOW_MISS, 1));
}

/// An ICMP error about `flow` (client -> VIP) must reach `mac`, byte for byte.
fn check_icmp_forward(
    rig: &mut Rig,
    frame: &[u8],
    service: &str,
    id: u32,
    mac: [u8; 6],
    what: u32,
) {
    let globals = global_counters(rig);
    let before = events(rig);
    let vip_before = rig.counter(vip_slot(vip_num(rig, service)));
    let backend_before = rig.counter(backend_slot(id));
    let (v, out) = rig.run(frame);
    assert_eq!(v, XDP_TX);
    assert_eq!(out, with_macs(frame, mac, LB_MAC), "exact output bytes");
    assert_eq!(global_counters(rig), globals, "no reason counter moves");
    assert_eq!(events(rig), plus(&before, what, 1));
    let len = frame.len() as u64;
    for (b, a) in [
        (vip_before, rig.counter(vip_slot(vip_num(rig, service)))),
        (backend_before, rig.counter(backend_slot(id))),
    ] {
        assert_eq!(
            (a.packets, a.bytes, a.new_flows),
            (b.packets + 1, b.bytes + len, b.new_flows)
        );
    }
}

#[test]
fn icmp_frag_needed_reaches_the_flows_backend() {
    if !require_root("icmp_frag_needed_reaches_the_flows_backend") {
        return;
    }
    let mut rig = rig();
    let vip = (ip("192.0.2.10"), 80);
    let client = (ip("198.51.100.90"), 48000);
    let key = flow(client, vip);
    let (_, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN));
    let first_mac: [u8; 6] = out[0..6].try_into().expect("MAC");
    let (first, gone) = backend_id_by_mac(&rig, "web", first_mac);
    let mut s = services();
    s[0].backends.retain(|b| b.address != gone);
    rig.apply(s).expect("reprogram");
    assert_ne!(ring_choice(&rig, "web", &key).0, first);

    // The backend's answer (VIP -> client) was too big for a router on the way.
    let icmp = ethernet(
        LB_MAC,
        ROUTER_MAC,
        None,
        ETH_P_IP,
        &icmp4_frag_needed(
            v4("203.0.113.1"),
            v4("192.0.2.10"),
            1400,
            &quote(vip, client, ACK | PSH),
        ),
    );
    check_icmp_forward(
        &mut rig,
        &icmp,
        "web",
        first,
        first_mac,
        event::ICMP_TO_FLOW,
    );

    // About a flow in no table: where the ring puts it; nothing is recorded.
    let stranger = (ip("198.51.100.91"), 48001);
    let skey = flow(stranger, vip);
    let icmp = ethernet(
        LB_MAC,
        ROUTER_MAC,
        None,
        ETH_P_IP,
        &icmp4_frag_needed(
            v4("203.0.113.1"),
            v4("192.0.2.10"),
            1400,
            &quote(vip, stranger, ACK),
        ),
    );
    let (id, mac) = ring_choice(&rig, "web", &skey);
    check_icmp_forward(&mut rig, &icmp, "web", id, mac, event::ICMP_TO_RING);
    assert_eq!(rig.dp.flow(&skey).expect("lookup"), None);
}

#[test]
fn icmpv6_packet_too_big_reaches_the_flows_backend() {
    if !require_root("icmpv6_packet_too_big_reaches_the_flows_backend") {
        return;
    }
    let mut rig = rig();
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let vip = (ip("2001:db8::10"), 443);
    let client = (ip("2001:db8:1::90"), 48002);
    let key = flow(client, vip);
    let (_, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN));
    let first_mac: [u8; 6] = out[0..6].try_into().expect("MAC");
    let (first, gone) = backend_id_by_mac(&rig, "web6", first_mac);
    let mut s = services();
    s[1].backends.retain(|b| b.address != gone);
    rig.apply(s).expect("reprogram");
    assert_ne!(ring_choice(&rig, "web6", &key).0, first);
    let icmp = ethernet(
        LB_MAC,
        ROUTER_MAC,
        None,
        ETH_P_IPV6,
        &icmp6_packet_too_big(
            v6("2001:db8:ff::1"),
            v6("2001:db8::10"),
            1280,
            &quote(vip, client, ACK | PSH),
        ),
    );
    check_icmp_forward(
        &mut rig,
        &icmp,
        "web6",
        first,
        first_mac,
        event::ICMP_TO_FLOW,
    );

    // A flow known only to the pinned table is found there too.
    let pinned_client = (ip("2001:db8:1::91"), 48003);
    let pkey = flow(pinned_client, vip);
    let state = FlowState {
        backend: first,
        vip_num: vip_num(&rig, "web6"),
        last_seen_ns: 0,
        flags: 0,
        touched_jiffies: 0,
    };
    assert_eq!(store.pin(&[(pkey, state)]).expect("pin"), 0);
    assert_ne!(ring_choice(&rig, "web6", &pkey).0, first);
    let icmp = ethernet(
        LB_MAC,
        ROUTER_MAC,
        None,
        ETH_P_IPV6,
        &icmp6_packet_too_big(
            v6("2001:db8:ff::1"),
            v6("2001:db8::10"),
            1280,
            &quote(vip, pinned_client, ACK),
        ),
    );
    check_icmp_forward(
        &mut rig,
        &icmp,
        "web6",
        first,
        first_mac,
        event::ICMP_TO_FLOW,
    );
}

/// Flows with distinct keys and values, as the agent would pin them.
fn made_up_flows(n: u32) -> Vec<(FlowKey, FlowState)> {
    (0..n)
        .map(|i| {
            let client = (
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
                (i % 60000) as u16 + 1,
            );
            (
                flow(client, (ip("192.0.2.10"), 80)),
                FlowState {
                    backend: i % 4096,
                    vip_num: i % 64,
                    last_seen_ns: u64::from(i) * 1000 + 7,
                    flags: i % 2,
                    // A data path's refresh stamp, which the agent's writes drop.
                    touched_jiffies: i + 1,
                },
            )
        })
        .collect()
}

#[test]
fn pinned_table_reads_back_exactly_what_was_pinned_and_says_what_did_not_fit() {
    if !require_root("pinned_table_reads_back_exactly_what_was_pinned_and_says_what_did_not_fit") {
        return;
    }
    let sizes = MapSizes {
        max_flows: 1024,
        max_pinned_flows: 65536,
        ..MapSizes::default()
    };
    let mut rig = Rig::new_sized(services(), sizes).expect("load (needs root)");
    let mut store = rig.dp.take_flow_store().expect("flow store");
    assert!(rig.dp.take_flow_store().is_none(), "handed out once");
    assert!(store.read(FlowTable::Pinned).expect("read").is_empty());
    let flows = made_up_flows(65536 + 100);
    assert_eq!(store.pin(&flows).expect("pin"), 100, "100 did not fit");
    let t = std::time::Instant::now();
    let read = store.read(FlowTable::Pinned).expect("read");
    println!("read() of {} pinned flows: {:?}", read.len(), t.elapsed());
    let got: std::collections::HashMap<FlowKey, FlowState> = read.iter().copied().collect();
    assert_eq!(read.len(), 65536, "each entry once");
    assert_eq!(got.len(), 65536);
    let want: std::collections::HashMap<FlowKey, FlowState> = flows
        .iter()
        .map(|(k, v)| (*k, v.unstamped()))
        .filter(|(k, _)| got.contains_key(k))
        .collect();
    assert_eq!(want.len(), 65536, "only pinned flows come back");
    assert_eq!(
        got, want,
        "keys and values as written, with no refresh stamp (`FlowStore::pin`)"
    );
    // Overwrite and remove.
    let mut changed = flows[0];
    changed.1.backend = 4095;
    if got.contains_key(&changed.0) {
        store.pin(&[changed]).expect("pin");
    }
    let removed: Vec<FlowKey> = read.iter().take(10).map(|(k, _)| *k).collect();
    store.unpin(&removed).expect("unpin");
    store.unpin(&removed).expect("unpin of absent keys is fine");
    let again: std::collections::HashMap<FlowKey, FlowState> = store
        .read(FlowTable::Pinned)
        .expect("read")
        .into_iter()
        .collect();
    assert_eq!(again.len(), 65526);
    assert!(removed.iter().all(|k| !again.contains_key(k)));
}

#[test]
fn connection_table_full_size_reads_back_exactly_what_the_program_recorded() {
    if !require_root("connection_table_full_size_reads_back_exactly_what_the_program_recorded") {
        return;
    }
    let mut rig = rig();
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let vip = (ip("192.0.2.10"), 80);
    // Flows from every CPU, half the table's size: a table holds all of them
    // (about 0.8% would share a full bucket at this load, see `lb_common::flowtab`, and
    // the read must return exactly those the table kept).
    let cpus = cpus() as u32;
    let share = lb_common::MAX_FLOWS / 2 / cpus;
    let mut want = std::collections::HashMap::new();
    let mut frame = tcp_frame(LB_MAC, CLIENT_MAC, None, (ip("10.0.0.0"), 1), vip, SYN);
    for cpu in 0..cpus {
        run_on_cpu(cpu as usize);
        for i in 0..share {
            let n = cpu * share + i;
            let client = (
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)),
                1000 + (n % 50000) as u16,
            );
            // The address and the port in place; the program does not check checksums.
            frame[26..30].copy_from_slice(&Ipv4Addr::from(0x0a00_0000 + n).octets());
            frame[34..36].copy_from_slice(&client.1.to_be_bytes());
            let (v, _) = rig.run(&frame);
            assert_eq!(v, XDP_TX);
            let key = flow(client, vip);
            want.insert(key, ring_choice(&rig, "web", &key).0);
        }
    }
    let t = std::time::Instant::now();
    let read = store.read(FlowTable::Connections).expect("read");
    let took = t.elapsed();
    let got: std::collections::HashMap<FlowKey, u32> =
        read.iter().map(|(k, s)| (*k, s.backend)).collect();
    assert_eq!(got.len(), read.len(), "no duplicates");
    for (key, backend) in &got {
        assert_eq!(want.get(key), Some(backend), "as the program recorded it");
    }
    // The flows a full bucket gave up are the ones its lookups miss, no others.
    let lost: Vec<&FlowKey> = want.keys().filter(|k| !got.contains_key(k)).collect();
    for key in &lost {
        assert_eq!(rig.dp.flow(key).expect("lookup"), None);
    }
    println!(
        "read() of {} flows (the table half full): {took:?}; {} of {} ({:.2}%) gave up by full buckets",
        read.len(),
        lost.len(),
        want.len(),
        100.0 * lost.len() as f64 / want.len() as f64
    );
    assert!(
        lost.len() * 50 <= want.len(),
        "more than 2% of the flows lost at half the table's size"
    );
    assert!(read.iter().all(|(_, s)| s.flags == 0 && s.last_seen_ns > 0));
}

/// The serving lease: a VRRP master's switch carries a deadline (CLOCK_MONOTONIC) that
/// its speaker renews with every advert. Past it, the program answers nothing and
/// forwards nothing, as a backup; before it, it serves; 0 is no lease (standalone).
#[test]
fn the_serving_lease_decides_whether_the_host_answers_and_forwards() {
    if !require_root("the_serving_lease_decides_whether_the_host_answers_and_forwards") {
        return;
    }
    let mut rig = rig();
    let arp_req = ethernet(
        BROADCAST,
        CLIENT_MAC,
        None,
        ETH_P_ARP,
        &arp(1, CLIENT_MAC, v4("192.0.2.50"), [0; 6], v4("192.0.2.10")),
    );
    let ns = ethernet(
        [0x33, 0x33, 0xff, 0, 0, 0x10],
        CLIENT_MAC,
        None,
        ETH_P_IPV6,
        &neighbour_solicitation(
            v6("2001:db8::50"),
            solicited_node(v6("2001:db8::10")),
            v6("2001:db8::10"),
            Some(CLIENT_MAC),
        ),
    );
    let syn = tcp4("192.0.2.10", 80, SYN);
    let ack = tcp4("192.0.2.10", 80, ACK);
    let serves = |rig: &mut Rig| {
        assert_eq!(rig.run(&arp_req).0, XDP_TX, "ARP for a VIP answered");
        assert_eq!(rig.run(&ns).0, XDP_TX, "NS for a VIP answered");
        assert_eq!(rig.run(&syn).0, XDP_TX, "SYN forwarded");
        assert_eq!(rig.run(&ack).0, XDP_TX, "ACK forwarded");
    };
    // Lease 0: standalone, serving.
    rig.serving.set_serving(true, 0).expect("serving switch");
    serves(&mut rig);
    // A fresh lease: serving.
    let fresh = monotonic_ns() + 10_000_000_000;
    rig.serving
        .set_serving(true, fresh)
        .expect("serving switch");
    serves(&mut rig);
    // An expired lease (the master that wrote it was killed): nothing answered, VIP
    // traffic dropped as a backup's, the established flow included.
    let expired = monotonic_ns() - 1;
    rig.serving
        .set_serving(true, expired)
        .expect("serving switch");
    for frame in [&arp_req, &ns] {
        let globals = global_counters(&rig);
        assert_eq!(rig.run(frame), (XDP_PASS, frame.clone()), "not answered");
        let mut want = globals.clone();
        want[reason::PASS_NOT_VIP as usize] += 1;
        assert_eq!(global_counters(&rig), want);
    }
    for frame in [&syn, &ack] {
        let globals = global_counters(&rig);
        assert_eq!(rig.run(frame), (XDP_DROP, frame.clone()), "not forwarded");
        let mut want = globals.clone();
        want[reason::DROP_NOT_MASTER as usize] += 1;
        assert_eq!(global_counters(&rig), want, "only drop_not_master moves");
    }
    // Renewed: serving again.
    let renewed = monotonic_ns() + 10_000_000_000;
    rig.serving
        .set_serving(true, renewed)
        .expect("serving switch");
    serves(&mut rig);
}

/// Each CPU answers from its last reading of the lease within that reading's jiffy
/// (`lb_common::lease`) instead of reading the clock per packet. That reading is kept per
/// CPU; a demotion counts from the next packet; and a run of repeated segments across
/// the lease's end, most of which read no clock, forwards nothing after it.
#[test]
fn the_lease_read_once_a_jiffy_still_ends_on_time() {
    if !require_root("the_lease_read_once_a_jiffy_still_ends_on_time") {
        return;
    }
    let mut rig = rig();
    // Backends at our own MAC: each repeated run forwards the frame the last one sent.
    let services = rig.services.clone();
    rig.apply_with(services, &looped)
        .expect("program the looped backends");
    let syn = tcp4("192.0.2.10", 80, SYN);
    let ack = tcp4("192.0.2.10", 80, ACK);
    let lease = monotonic_ns() + 10_000_000_000;
    rig.serving
        .set_serving(true, lease)
        .expect("serving switch");
    assert_eq!(rig.run(&syn).0, XDP_TX, "SYN forwarded");
    let run = rig
        .run_program(names::PROG_LB, &ack, 16)
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(run.verdict, XDP_TX, "ACKs forwarded");
    let readings = rig.dp.lease_readings().expect("the lease cache");
    assert!(
        readings
            .iter()
            .any(|r| r.lease_until_ns == lease && r.left < LEASE_CACHE_PACKETS),
        "a CPU keeps its reading of the lease: {readings:?}"
    );

    // A demotion under a cached lease: the next packet is dropped.
    rig.serving.set_serving(false, 0).expect("serving switch");
    assert_eq!(rig.run(&ack).0, XDP_DROP, "a backup forwards nothing");

    // A lease 200 ms ahead (more than the margin, so it is cached) and batches of
    // repeated ACKs until the lease is 10 ms past: the last batch's last runs come after
    // its end, whatever the machine's speed.
    let vip = vip_num(&rig, "web");
    let batch = 1_000_000;
    let lease = monotonic_ns() + 200_000_000;
    rig.serving
        .set_serving(true, lease)
        .expect("serving switch");
    let (globals, before) = (global_counters(&rig), rig.counter(vip_slot(vip)));
    let mut batches = 0u64;
    let mut last = None;
    while monotonic_ns() <= lease + 10_000_000 {
        assert!(
            batches < 200,
            "200 batches of runs did not outlast a 200 ms lease"
        );
        last = Some(
            rig.run_program(names::PROG_LB, &ack, batch)
                .expect("BPF_PROG_TEST_RUN"),
        );
        batches += 1;
    }
    let last = last.expect("at least one batch");
    let forwarded = rig.counter(vip_slot(vip)).packets - before.packets;
    let dropped = global_counters(&rig)[reason::DROP_NOT_MASTER as usize]
        - globals[reason::DROP_NOT_MASTER as usize];
    println!(
        "{forwarded} runs forwarded within the lease, {dropped} dropped after it, {:?} a run",
        last.per_run
    );
    assert_eq!(
        last.verdict, XDP_DROP,
        "the last run, after the lease, dropped"
    );
    assert!(forwarded > 0, "runs within the lease forwarded");
    assert_eq!(
        forwarded + dropped,
        batches * u64::from(batch),
        "every run forwarded or dropped"
    );
    assert!(dropped > 0);
}

/// A bpffs directory of this test's own, removed (pins and all) when dropped.
struct TestPins(std::path::PathBuf);

impl TestPins {
    fn new(name: &str) -> Self {
        let dir =
            std::path::PathBuf::from(format!("/sys/fs/bpf/lbtest-{}-{name}", std::process::id()));
        let _ = pins::remove(&dir, "test0");
        Self(dir)
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(e) = pins::remove(&self.0, "test0") {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

/// Pinned maps are taken over by the next load as they are (flows included), and a
/// layout the agent cannot read is refused with an error that says what to do.
#[test]
fn pinned_maps_are_reused_and_other_layouts_refused() {
    if !require_root("pinned_maps_are_reused_and_other_layouts_refused") {
        return;
    }
    let t = TestPins::new("layout");
    let dir = PinDir::new(&t.0, "test0");
    let sizes = MapSizes {
        max_flows: 1024,
        max_pinned_flows: 1024,
        ..MapSizes::default()
    };
    let (first, found) = XdpDataPlane::load_pinned(sizes, &dir).expect("first load");
    assert_eq!(
        found,
        Found {
            maps: false,
            link: false
        }
    );
    let key = FlowKey {
        src: [198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        dst: [192, 0, 2, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sport_be: 4000u16.to_be(),
        dport_be: 80u16.to_be(),
        proto: PROTO_TCP,
        family: lb_common::FAMILY_V4,
        _pad: [0; 2],
    };
    let flow = FlowState {
        backend: 3,
        vip_num: 0,
        last_seen_ns: 1,
        flags: 0,
        touched_jiffies: 0,
    };
    let mut first = first;
    let mut store = first.take_flow_store().expect("flow store");
    assert_eq!(store.pin(&[(key, flow)]).expect("pin a flow"), 0);
    drop(store);
    drop(first);
    // The next load finds every map of the layout (so the table in lb_common::layout
    // matches the object: each pinned map was checked against it) and the flow.
    let (mut second, found) = XdpDataPlane::load_pinned(sizes, &dir).expect("second load");
    assert!(found.maps);
    for name in lb_common::layout::UNPINNED {
        assert!(!dir.map_path(name).exists(), "{name} is not pinned");
    }
    let mut store = second.take_flow_store().expect("flow store");
    assert_eq!(
        store.read(FlowTable::Pinned).expect("read pinned"),
        vec![(key, flow)]
    );
    drop(store);
    drop(second);
    // Another connection-table size: refused, nothing misread.
    let other = MapSizes {
        max_flows: 2048,
        ..sizes
    };
    let err = XdpDataPlane::load_pinned(other, &dir)
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(
        matches!(err, DataPlaneError::PinnedMismatch { .. })
            && text.contains("FLOWS")
            && text.contains("--detach"),
        "{text}"
    );
    // A META map saying another layout version: refused.
    {
        let meta = aya::maps::MapData::from_pin(dir.map_path(lb_common::names::MAP_META))
            .expect("META pinned");
        let mut meta: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(aya::maps::Map::Array(meta)).expect("array");
        meta.set(lb_common::layout::meta::LAYOUT, 0xdead_beef, 0)
            .expect("write META");
    }
    let err = XdpDataPlane::load_pinned(sizes, &dir)
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(
        matches!(err, DataPlaneError::OtherLayout { .. }) && text.contains("vdeadbeef"),
        "{text}"
    );
    // Pins of another layout's directory beside ours: refused too.
    let t2 = TestPins::new("other");
    let old = t2.0.join("test0").join("v00000001");
    std::fs::create_dir_all(&old).expect("an old layout's directory");
    let err = XdpDataPlane::load_pinned(sizes, &PinDir::new(&t2.0, "test0"))
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(
        matches!(err, DataPlaneError::OtherLayout { .. }) && text.contains("v00000001"),
        "{text}"
    );
}

/// The connection table's description (`meta::FLOW_TABLE`: its hash seed and bucket
/// count) is made with the table and kept with it: an agent that takes over pinned maps
/// finds every flow where the program put it. A table of another size is refused.
#[test]
fn a_pinned_connection_table_keeps_its_seed() {
    if !require_root("a_pinned_connection_table_keeps_its_seed") {
        return;
    }
    use lb_common::{
        flowtab,
        layout::meta,
        names::{MAP_FLOWS, MAP_META},
    };
    let sizes = |max_flows| MapSizes {
        max_flows,
        max_pinned_flows: 1024,
        ..MapSizes::default()
    };
    let word = |dir: &PinDir| -> u64 {
        let data = aya::maps::MapData::from_pin(dir.map_path(MAP_META)).expect("META pinned");
        let meta: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("array");
        meta.get(&meta::FLOW_TABLE, 0).expect("slot")
    };
    let t = TestPins::new("flowtab-seed");
    let dir = PinDir::new(&t.0, "test0");
    let (dp, found) = XdpDataPlane::load_pinned(sizes(1000), &dir).expect("load");
    assert!(!found.maps);
    let first = word(&dir);
    let (_, buckets) = flowtab::table_of(first);
    assert_eq!(buckets, flowtab::buckets_for(1000));
    let info = aya::maps::MapInfo::from_pin(dir.map_path(MAP_FLOWS)).expect("FLOWS pinned");
    assert_eq!(info.max_entries(), flowtab::slots_for(1000));
    drop(dp);
    let (dp, found) = XdpDataPlane::load_pinned(sizes(1000), &dir).expect("again");
    assert!(found.maps);
    assert_eq!(word(&dir), first, "the pinned table's seed kept");
    drop(dp);
    let err = XdpDataPlane::load_pinned(sizes(2000), &dir)
        .err()
        .expect("another size refused");
    let text = err.to_string();
    assert!(
        matches!(
            err,
            DataPlaneError::PinnedMismatch {
                what: "max entries",
                ..
            }
        ) && text.contains("max_flows")
            && text.contains("--detach"),
        "{text}"
    );
    // Another table, another seed (a fresh random one).
    let t2 = TestPins::new("flowtab-seed-2");
    let dir2 = PinDir::new(&t2.0, "test0");
    let (dp, _) = XdpDataPlane::load_pinned(sizes(1000), &dir2).expect("load");
    assert_ne!(
        flowtab::table_of(word(&dir2)).0,
        flowtab::table_of(first).0,
        "seeds are drawn per table (1 in 2^32 to fail by chance)"
    );
    drop(dp);
}

#[test]
fn the_trace_reports_each_decision_while_on_and_nothing_while_off() {
    if !require_root("the_trace_reports_each_decision_while_on_and_nothing_while_off") {
        return;
    }
    let mut rig = rig();
    let client = (ip("198.51.100.7"), 40000);
    let vip = (ip("192.0.2.10"), 80);
    let syn = tcp4("192.0.2.10", 80, SYN);
    let ack = tcp4("192.0.2.10", 80, ACK);
    let fragment = bad_ipv4(|h| h.frag = 0x2000);
    let not_vip = tcp4("192.0.2.99", 80, ACK);
    let frames = [&syn, &ack, &fragment, &not_vip];
    let mut off = Vec::new();
    for f in frames {
        off.push(rig.run(f));
    }
    assert!(rig.trace_events().is_empty(), "tracing off wrote events");

    rig.set_tracing(true);
    let mut on = Vec::new();
    for f in frames {
        on.push(rig.run(f));
    }
    // Tracing changes no verdict and no byte.
    assert_eq!(on, off);
    let events = rig.trace_events();
    // SYN, ACK, fragment; traffic for no VIP is not traced.
    assert_eq!(events.len(), 3, "{events:?}");
    let (chosen, _) = ring_choice(&rig, "web", &flow(client, vip));
    let syn_event = &events[0];
    assert_eq!(syn_event.flow, flow(client, vip));
    assert_eq!(
        (syn_event.reason, syn_event.verdict, syn_event.backend),
        (TRACE_FORWARDED, XDP_TX, chosen)
    );
    assert_eq!(syn_event.flags, TRACE_F_NEW_FLOW);
    let ack_event = &events[1];
    // Sent from the parse (`send_known`): the flow as the connection table knows it.
    assert_eq!(ack_event.flow, flow(client, vip));
    assert_eq!(
        (
            ack_event.reason,
            ack_event.verdict,
            ack_event.backend,
            ack_event.flags
        ),
        (TRACE_FORWARDED, XDP_TX, chosen, 0)
    );
    let frag = &events[2];
    assert_eq!(
        (frag.reason, frag.verdict, frag.backend),
        (reason::DROP_FRAGMENT, XDP_DROP, NO_BACKEND)
    );
    // Addresses as far as they were read; a fragment's ports are unknown.
    let mut frag_flow = flow(client, vip);
    frag_flow.sport_be = 0;
    frag_flow.dport_be = 0;
    assert_eq!(frag.flow, frag_flow);
    let record = lb_userspace::trace::record(frag, &Default::default(), 0);
    assert_eq!(
        (record.verdict.as_str(), record.reason.as_str()),
        ("drop", "drop_fragment")
    );

    rig.set_tracing(false);
    for f in frames {
        rig.run(f);
    }
    assert!(
        rig.trace_events().is_empty(),
        "tracing off again wrote events"
    );
}
// ---- client-address persistence --------------------------------------------------------

const PERSIST_S: u32 = 300;

/// `services()` with persistence on "web" and "web6".
fn persistent_services() -> Vec<Service> {
    let mut s = services();
    s[0].persistence_timeout_s = PERSIST_S;
    s[1].persistence_timeout_s = PERSIST_S;
    s
}

/// The backend id and MAC the Maglev ring of `s` gives this flow, computed from the pure
/// Maglev table (`Rig::ring_choice`).
fn ring_choice_of(rig: &Rig, s: &Service, flow: &FlowKey) -> (u32, [u8; 6]) {
    let (id, addr) = rig.ring_choice(s, flow);
    (id, backend_mac(addr))
}

/// An established DSR segment of a persistent service keeps its client's entry alive
/// when it refreshes its flow's entry (the flow's stamp due, `FLOW_TOUCH_JIFFIES`): an
/// entry older than `PERSIST_TOUCH_NS` is brought forward then. While the flow's stamp
/// is fresh, its segments leave the client's entry alone (no lookup, no clock read).
/// IPv4 and IPv6.
#[test]
fn established_dsr_segments_refresh_the_persistence_entry_with_their_flows_entry() {
    if !require_root(
        "established_dsr_segments_refresh_the_persistence_entry_with_their_flows_entry",
    ) {
        return;
    }
    let mut rig = Rig::new(persistent_services()).expect("load (needs root)");
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let mut flows = rig.flows().expect("FLOWS");
    for (svc, client) in [(0usize, ip("198.51.100.84")), (1, ip("2001:db8:1::84"))] {
        let s = rig.services[svc].clone();
        let vip = (s.vip, s.port);
        let key = flow((client, 40000), vip);
        let pkey = lb_common::PersistKey::of_flow(&key);
        let syn = tcp_frame(LB_MAC, CLIENT_MAC, None, (client, 40000), vip, SYN);
        let ack = tcp_frame(LB_MAC, CLIENT_MAC, None, (client, 40000), vip, ACK);
        assert_eq!(rig.run(&syn).0, XDP_TX, "{}", s.name);
        let mut entry = persist_entry(&mut store, &pkey).expect("remembered");
        let aged = monotonic_ns() - 60 * 1_000_000_000;
        entry.last_seen_ns = aged;

        // The flow's stamp fresh: the client's entry is left as it is. Should this
        // process sleep past the stamp's interval, the segment refreshes the flow's
        // entry (its stamp moves by at least that much): tried again.
        let mut left = false;
        for _ in 0..5 {
            store.write_persist(&[(pkey, entry)]).expect("age it");
            let stamp = flows.get(&key).expect("the flow").touched_jiffies;
            assert_eq!(rig.run(&ack).0, XDP_TX, "{}", s.name);
            if persist_entry(&mut store, &pkey)
                .expect("remembered")
                .last_seen_ns
                == aged
            {
                left = true;
                break;
            }
            let now = flows.get(&key).expect("the flow").touched_jiffies;
            assert!(
                now.wrapping_sub(stamp) >= lb_common::FLOW_TOUCH_JIFFIES,
                "{}: the client's entry refreshed with the flow's stamp fresh",
                s.name
            );
        }
        assert!(left, "{}: a fresh stamp: no refresh", s.name);

        // The flow's stamp due (0, as the agent writes): its segment refreshes the
        // client's entry too.
        let state = flows.get(&key).expect("the flow");
        flows.set(&key, state.unstamped()).expect("stamp cleared");
        let before = monotonic_ns();
        assert_eq!(rig.run(&ack).0, XDP_TX, "{}", s.name);
        let touched = persist_entry(&mut store, &pkey).expect("remembered");
        assert!(
            touched.last_seen_ns >= before - lb_common::COARSE_CLOCK_LAG_NS,
            "{}: refreshed with the flow's entry ({} < {before})",
            s.name,
            touched.last_seen_ns
        );
        assert_eq!(touched.backend, entry.backend, "{}", s.name);
    }
}

/// One client's connections keep the backend of its first after the ring moved it
/// (weights changed), IPv4 and IPv6; a service without persistence follows the ring.
#[test]
fn persistence_keeps_a_client_on_its_backend_after_the_ring_changes() {
    if !require_root("persistence_keeps_a_client_on_its_backend_after_the_ring_changes") {
        return;
    }
    for (i, (client_ip, svc)) in [("198.51.100.80", 0usize), ("2001:db8:1::80", 1)]
        .into_iter()
        .enumerate()
    {
        let mut rig = Rig::new(persistent_services()).expect("load (needs root)");
        let mut store = rig.dp.take_flow_store().expect("flow store");
        let s0 = rig.services[svc].clone();
        let vip = (s0.vip, s0.port);
        let client = ip(client_ip);
        let first_key = flow((client, 40000), vip);
        let (v, out) = rig.run(&tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            (client, 40000),
            vip,
            SYN,
        ));
        assert_eq!(v, XDP_TX);
        let (first, first_mac) = ring_choice_of(&rig, &s0, &first_key);
        assert_eq!(out[0..6], first_mac, "the first connection takes the ring");
        let pkey = lb_common::PersistKey::of_flow(&first_key);
        let entry = persist_entry(&mut store, &pkey).expect("the choice is remembered");
        assert_eq!(entry.backend, first);
        assert_eq!(entry.vip_num, vip_num(&rig, &s0.name));

        // The ring changes: the first backend's weight drops, another backend joins.
        let mut s = persistent_services();
        for b in &mut s[svc].backends {
            if rig.programmer.backend_id(&s0.name, b.address) == Some(first) {
                b.weight = 10;
            }
        }
        let extra = if svc == 0 {
            "192.0.2.24"
        } else {
            "2001:db8::24"
        };
        s[svc].backends.push(BackendSpec {
            name: "extra".into(),
            address: ip(extra),
            weight: 100,
            backup: false,
            port: None,
        });
        rig.apply(s.clone()).expect("reprogram");
        let port = rig.port_off(&s[svc], client, first, 50000);
        for p in [port, port + 1000, port + 2000] {
            let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, (client, p), vip, SYN));
            assert_eq!(v, XDP_TX);
            assert_eq!(
                out[0..6],
                first_mac,
                "case {i}: a new connection of a persistent client keeps its backend"
            );
        }
        let entry = persist_entry(&mut store, &pkey).expect("still remembered");
        assert_eq!(entry.backend, first);

        // Persistence off: the same client follows the ring.
        s[svc].persistence_timeout_s = 0;
        rig.apply(s.clone()).expect("reprogram");
        let key = flow((client, port), vip);
        let (_, ring_mac) = ring_choice_of(&rig, &s[svc], &key);
        assert_ne!(ring_mac, first_mac);
        let (v, out) = rig.run(&tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            (client, port),
            vip,
            SYN,
        ));
        assert_eq!(v, XDP_TX);
        assert_eq!(
            out[0..6],
            ring_mac,
            "case {i}: no persistence, the ring decides"
        );
    }
}

/// An entry older than the timeout no longer decides: the ring does, and its choice
/// replaces the entry.
#[test]
fn an_expired_persistence_entry_gives_way_to_the_ring() {
    if !require_root("an_expired_persistence_entry_gives_way_to_the_ring") {
        return;
    }
    let mut rig = Rig::new(persistent_services()).expect("load (needs root)");
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let s0 = rig.services[0].clone();
    let vip = (s0.vip, s0.port);
    let client = ip("198.51.100.81");
    let first_key = flow((client, 40000), vip);
    rig.run(&tcp_frame(
        LB_MAC,
        CLIENT_MAC,
        None,
        (client, 40000),
        vip,
        SYN,
    ));
    let (first, first_mac) = ring_choice_of(&rig, &s0, &first_key);
    let pkey = lb_common::PersistKey::of_flow(&first_key);
    let port = rig.port_off(&s0, client, first, 50000);
    let key = flow((client, port), vip);
    let (ring_id, ring_mac) = ring_choice_of(&rig, &s0, &key);

    // Just within the timeout: still sticky.
    let now = monotonic_ns();
    let mut entry = persist_entry(&mut store, &pkey).expect("remembered");
    entry.last_seen_ns = now - u64::from(PERSIST_S - 5) * 1_000_000_000;
    store.write_persist(&[(pkey, entry)]).expect("age it");
    let (_, out) = rig.run(&tcp_frame(
        LB_MAC,
        CLIENT_MAC,
        None,
        (client, port),
        vip,
        SYN,
    ));
    assert_eq!(out[0..6], first_mac, "within the timeout");
    let refreshed = persist_entry(&mut store, &pkey).expect("remembered");
    assert!(
        refreshed.last_seen_ns >= now - lb_common::COARSE_CLOCK_LAG_NS,
        "a new connection refreshes the entry"
    );

    // Past it: the ring.
    entry.last_seen_ns = monotonic_ns() - u64::from(PERSIST_S + 1) * 1_000_000_000;
    store.write_persist(&[(pkey, entry)]).expect("age it");
    let (v, out) = rig.run(&tcp_frame(
        LB_MAC,
        CLIENT_MAC,
        None,
        (client, port),
        vip,
        SYN,
    ));
    assert_eq!(v, XDP_TX);
    assert_eq!(out[0..6], ring_mac, "expired: the ring decides");
    assert_eq!(
        persist_entry(&mut store, &pkey)
            .expect("remembered")
            .backend,
        ring_id,
        "and its choice is remembered"
    );
}

/// The remembered backend disabled (draining) or down: its client's new connections go
/// where the ring says, and that backend is remembered instead; the old flow of a
/// disabled backend keeps going to it.
#[test]
fn a_persistent_client_of_a_disabled_or_down_backend_is_rechosen() {
    if !require_root("a_persistent_client_of_a_disabled_or_down_backend_is_rechosen") {
        return;
    }
    for down in [false, true] {
        let mut rig = Rig::new(persistent_services()).expect("load (needs root)");
        let mut store = rig.dp.take_flow_store().expect("flow store");
        let s0 = rig.services[0].clone();
        let vip = (s0.vip, s0.port);
        let client = ip("198.51.100.82");
        let first_key = flow((client, 40000), vip);
        rig.run(&tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            (client, 40000),
            vip,
            SYN,
        ));
        let (first, first_mac) = ring_choice_of(&rig, &s0, &first_key);
        let gone = s0
            .backends
            .iter()
            .find(|b| backend_mac(b.address) == first_mac)
            .expect("backend")
            .address;
        let view = move |s: &Service, b: &BackendSpec| BackendView {
            enabled: down || b.address != gone,
            healthy: !down || b.address != gone,
            ..all_up(s, b)
        };
        rig.apply_with(persistent_services(), &view)
            .expect("reprogram");
        // The ring without that backend.
        let mut without = s0.clone();
        without.backends.retain(|b| b.address != gone);
        let key = flow((client, 40001), vip);
        let (ring_id, ring_mac) = ring_choice_of(&rig, &without, &key);
        let (v, out) = rig.run(&tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            (client, 40001),
            vip,
            SYN,
        ));
        assert_eq!(v, XDP_TX);
        assert_eq!(out[0..6], ring_mac, "down={down}: re-chosen by the ring");
        assert_ne!(ring_id, first);
        let pkey = lb_common::PersistKey::of_flow(&first_key);
        assert_eq!(
            persist_entry(&mut store, &pkey)
                .expect("remembered")
                .backend,
            ring_id,
            "down={down}: the new choice is remembered"
        );
        // The first connection: a disabled backend drains it, a down one loses it.
        let (_, out) = rig.run(&tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            (client, 40000),
            vip,
            ACK,
        ));
        if down {
            assert_ne!(out[0..6], first_mac, "down: its flow goes elsewhere");
        } else {
            assert_eq!(out[0..6], first_mac, "disabled: its flow drains there");
        }
    }
}
