//! The XDP program, packet by packet, through BPF_PROG_TEST_RUN. The maps are filled by
//! the agent's own code (Programmer over XdpDataPlane); each fixture is an input frame,
//! the expected verdict, the expected output bytes and the counter it must move.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    FlowKey, PROTO_TCP,
    counters::{backend_slot, global_slot, reason, vip_slot},
    hash::flow_hash,
};
use lb_tests::{
    packet::*,
    require_root,
    rig::{CLIENT_MAC, LB_MAC, Rig, XDP_DROP, XDP_PASS, XDP_TX, all_up, backend_mac, service},
};
use lb_userspace::{
    config::{BackendSpec, Service},
    dataplane::{DataPlane, ServeSwitch},
    maglev,
    programmer::{BackendView, addr_bytes},
};

const ROUTER_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x01];

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

/// The backend the ring gives this flow, computed from the pure Maglev table.
fn ring_choice(rig: &Rig, service: &str, flow: &FlowKey) -> (u32, [u8; 6]) {
    let s = rig
        .services
        .iter()
        .find(|s| s.name == service)
        .expect("service");
    let id_of = |b: &BackendSpec| rig.programmer.backend_id(&s.name, b.address).expect("id");
    let members: Vec<maglev::Member> = s
        .backends
        .iter()
        .map(|b| maglev::Member {
            identity: b.address.to_string(),
            id: id_of(b),
            weight: b.weight,
        })
        .collect();
    let ring = maglev::build(&members, s.ring_size);
    let id = ring[(flow_hash(flow) % s.ring_size) as usize];
    let b = s
        .backends
        .iter()
        .find(|b| id_of(b) == id)
        .expect("ring member");
    (id, backend_mac(b.address))
}

fn flow(src: (IpAddr, u16), dst: (IpAddr, u16)) -> FlowKey {
    let (s, family) = addr_bytes(src.0);
    let (d, _) = addr_bytes(dst.0);
    FlowKey {
        src: s,
        dst: d,
        sport_be: src.1.to_be(),
        dport_be: dst.1.to_be(),
        proto: PROTO_TCP,
        family,
        _pad: [0; 2],
    }
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
    let mut padded = tcp_frame(
        LB_MAC,
        CLIENT_MAC,
        None,
        (ip("198.51.100.10"), 40003),
        vip4,
        SYN,
    );
    padded.extend_from_slice(&[0; 6]);
    v.push(Fixture {
        name: "VIP SYN with Ethernet padding",
        input: padded,
        expect: Expect::Forward {
            service: "web",
            flow: flow((ip("198.51.100.10"), 40003), vip4),
            new: true,
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

#[test]
fn host_that_does_not_serve_drops_vip_traffic_and_answers_nothing() {
    if !require_root("host_that_does_not_serve_drops_vip_traffic_and_answers_nothing") {
        return;
    }
    let mut rig = rig();
    rig.serving.set_serving(false).expect("serving switch");
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
    let active = |rig: &Rig| -> u64 {
        rig.dp
            .active_flows(idle)
            .expect("active flows")
            .values()
            .sum()
    };
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
    assert_eq!(
        rig.dp
            .active_flows(std::time::Duration::from_nanos(1))
            .expect("active")
            .values()
            .sum::<u64>(),
        0
    );
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
