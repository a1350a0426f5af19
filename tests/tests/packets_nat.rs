//! NAT forwarding, packet by packet, through BPF_PROG_TEST_RUN. Every expected frame is
//! built from scratch by `lb_tests::packet` (its own checksums), so the program's
//! incremental checksum updates are checked against an independent computation. The
//! rig runs without FIB lookups: next hops are the backend's resolved MAC and the MAC
//! the client's frames came from.

use std::net::IpAddr;

use lb_common::{
    COARSE_CLOCK_LAG_NS, FLOW_TOUCH_JIFFIES, FlowKey, NAT_F_ESTABLISHED, NAT_F_FIN_BACKEND,
    NAT_F_FIN_CLIENT, NAT_F_SYNCED, NAT_HOP_TTL_JIFFIES, NatConfig, NatFlow, NatReply, NextHop,
    PERSIST_TOUCH_NS, PersistKey,
    counters::{event, event_slot, global_slot, reason, vip_slot},
    names,
};
use lb_tests::{
    packet::*,
    require_root,
    rig::{
        CLIENT_MAC, LB_MAC, Rig, XDP_DROP, XDP_TX, all_up, backend_mac, flow_key as flow,
        persist_entry, service,
    },
};
use lb_userspace::{
    config::{BackendSpec, Forwarding, Service},
    dataplane::{DataPlane, FlowStore, monotonic_ns},
    programmer::BackendView,
};

const ROUTER_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x01];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// A NAT service whose backends listen on `bport`.
fn nat_service(name: &str, vip: &str, port: u16, backends: &[&str], bport: u16) -> Service {
    let mut s = service(name, vip, port, 1009, backends);
    s.forwarding = Forwarding::Nat;
    for b in &mut s.backends {
        b.port = Some(bport);
    }
    s
}

fn services() -> Vec<Service> {
    vec![
        nat_service("api", "192.0.2.20", 443, &["10.0.1.5"], 8443),
        nat_service("api6", "2001:db8::20", 443, &["2001:db8:1::5"], 8443),
        service("web", "192.0.2.10", 80, 1009, &["192.0.2.21", "192.0.2.22"]),
    ]
}

fn rig() -> Rig {
    Rig::new(services()).expect("load the XDP object and fill its maps (needs root)")
}

fn reasons(rig: &Rig) -> Vec<u64> {
    (0..reason::COUNT)
        .map(|r| rig.counter(global_slot(r)).packets)
        .collect()
}

fn plus(before: &[u64], which: u32, n: u64) -> Vec<u64> {
    let mut v = before.to_vec();
    v[which as usize] += n;
    v
}

fn event_count(rig: &Rig, e: u32) -> u64 {
    rig.counter(event_slot(e)).packets
}

/// The LB's source port towards the backend, read from a translated frame.
fn nport(frame: &[u8], v6: bool) -> u16 {
    let at = if v6 { 14 + 40 } else { 14 + 20 };
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// The backend's segment (`flags`) from `backend` to the flow's source port `n` at the
/// VIP comes back as VIP -> `client`, to the client's MAC, byte for byte.
fn reply_comes_back(
    rig: &mut Rig,
    backend: (IpAddr, u16),
    vip: (IpAddr, u16),
    n: u16,
    client: (IpAddr, u16),
    flags: u8,
) {
    let reply = tcp_frame(
        LB_MAC,
        backend_mac(backend.0),
        None,
        backend,
        (vip.0, n),
        flags,
    );
    let (v, out) = rig.run(&reply);
    assert_eq!(v, XDP_TX, "the reply is forwarded");
    assert_eq!(
        out,
        tcp_frame(CLIENT_MAC, LB_MAC, None, vip, client, flags),
        "translated reply, checksums as computed from scratch"
    );
}

/// Client -> VIP and back, byte for byte, for one family.
fn both_directions(rig: &mut Rig, vip: &str, backend: &str, client: &str, v6: bool) {
    let vip = (ip(vip), 443);
    let client = (ip(client), 40000);
    let backend_ip = ip(backend);
    let bmac = backend_mac(backend_ip);
    let vip_slot_before = rig.counter(vip_slot(rig.programmer.vip_num(vip.0, 443).expect("vip")));

    // The SYN leaves as VIP:nport -> backend:8443, to the backend's MAC from ours.
    let syn = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN);
    let (v, out) = rig.run(&syn);
    assert_eq!(v, XDP_TX, "the SYN is forwarded");
    let n = nport(&out, v6);
    assert!(n >= 1024, "source port {n} in the default range");
    let expected = tcp_frame(bmac, LB_MAC, None, (vip.0, n), (backend_ip, 8443), SYN);
    assert_eq!(
        out, expected,
        "translated SYN, checksums as computed from scratch"
    );

    // A retransmitted SYN and the handshake's ACK keep the translation.
    let (v, again) = rig.run(&syn);
    assert_eq!((v, &again), (XDP_TX, &expected));
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK));
    assert_eq!(v, XDP_TX);
    assert_eq!(
        out,
        tcp_frame(bmac, LB_MAC, None, (vip.0, n), (backend_ip, 8443), ACK)
    );

    // The backend's SYN-ACK comes back as VIP:443 -> client, to the client's MAC.
    let replies = event_count(rig, event::NAT_REPLY);
    reply_comes_back(rig, (backend_ip, 8443), vip, n, client, SYN | ACK);
    assert_eq!(event_count(rig, event::NAT_REPLY), replies + 1);
    let after = rig.counter(vip_slot(rig.programmer.vip_num(vip.0, 443).expect("vip")));
    assert_eq!(
        after.new_flows,
        vip_slot_before.new_flows + 1,
        "one new flow"
    );
    assert_eq!(after.packets, vip_slot_before.packets + 4);

    // A reply on a port no flow holds, and mid-flow packets of no flow: dropped.
    let before = reasons(rig);
    let stray = tcp_frame(LB_MAC, bmac, None, (backend_ip, 8443), (vip.0, n ^ 1), ACK);
    assert_eq!(rig.run(&stray).0, XDP_DROP);
    assert_eq!(reasons(rig), plus(&before, reason::DROP_VIP_UNSERVED, 1));
    let before = reasons(rig);
    let lost = tcp_frame(LB_MAC, CLIENT_MAC, None, (client.0, 40001), vip, ACK);
    assert_eq!(rig.run(&lost).0, XDP_DROP);
    assert_eq!(reasons(rig), plus(&before, reason::DROP_NAT_NO_FLOW, 1));
}

#[test]
fn nat_translates_both_directions_ipv4() {
    if !require_root("nat_translates_both_directions_ipv4") {
        return;
    }
    let mut rig = rig();
    both_directions(&mut rig, "192.0.2.20", "10.0.1.5", "198.51.100.7", false);
}

#[test]
fn nat_translates_both_directions_ipv6() {
    if !require_root("nat_translates_both_directions_ipv6") {
        return;
    }
    let mut rig = rig();
    both_directions(
        &mut rig,
        "2001:db8::20",
        "2001:db8:1::5",
        "2001:db8:2::7",
        true,
    );
}

#[test]
fn dsr_services_beside_nat_ones_are_untouched() {
    if !require_root("dsr_services_beside_nat_ones_are_untouched") {
        return;
    }
    let mut rig = rig();
    let frame = tcp_frame(
        LB_MAC,
        CLIENT_MAC,
        None,
        (ip("198.51.100.7"), 40000),
        (ip("192.0.2.10"), 80),
        SYN,
    );
    let (v, out) = rig.run(&frame);
    assert_eq!(v, XDP_TX);
    let mac: [u8; 6] = out[0..6].try_into().expect("MAC");
    assert!(
        [ip("192.0.2.21"), ip("192.0.2.22")]
            .iter()
            .any(|b| backend_mac(*b) == mac),
        "to a DSR backend's MAC"
    );
    assert_eq!(&out[6..12], &LB_MAC);
    assert_eq!(
        &out[12..],
        &frame[12..],
        "IP and TCP as the client sent them"
    );
    let mut store = rig.dp.take_flow_store().expect("flow store");
    assert!(
        store.read_nat().expect("NAT table").is_empty(),
        "no NAT flow"
    );
}

#[test]
fn nat_ports_are_never_shared_and_exhaustion_drops_the_syn() {
    if !require_root("nat_ports_are_never_shared_and_exhaustion_drops_the_syn") {
        return;
    }
    let mut rig = rig();
    rig.dp
        .set_nat_config(&NatConfig {
            port_min: 2000,
            port_max: 2001,
            flags: 0,
        })
        .expect("NAT config");
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let vip = (ip("192.0.2.20"), 443);
    let backend = ip("10.0.1.5");
    let syn = |port: u16| {
        tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            (ip("198.51.100.7"), port),
            vip,
            SYN,
        )
    };
    let mut ports = Vec::new();
    for cport in [41000, 41001] {
        let (v, out) = rig.run(&syn(cport));
        assert_eq!(v, XDP_TX);
        ports.push((cport, nport(&out, false)));
    }
    let mut got: Vec<u16> = ports.iter().map(|p| p.1).collect();
    got.sort();
    assert_eq!(got, vec![2000, 2001], "two flows, two ports");

    // Each port's reply reaches its own client.
    for (cport, n) in &ports {
        let reply = tcp_frame(
            LB_MAC,
            backend_mac(backend),
            None,
            (backend, 8443),
            (vip.0, *n),
            SYN | ACK,
        );
        let (v, out) = rig.run(&reply);
        assert_eq!(v, XDP_TX);
        assert_eq!(
            out,
            tcp_frame(
                CLIENT_MAC,
                LB_MAC,
                None,
                vip,
                (ip("198.51.100.7"), *cport),
                SYN | ACK
            )
        );
    }

    // No port left: the third SYN is dropped and counted, never sent on a taken port.
    let before = reasons(&rig);
    let (v, _) = rig.run(&syn(41002));
    assert_eq!(v, XDP_DROP);
    assert_eq!(reasons(&rig), plus(&before, reason::DROP_NAT_NO_PORT, 1));
    let flows = store.read_nat().expect("NAT table");
    assert_eq!(flows.len(), 2, "the dropped SYN made no entry");

    // Collecting one pair frees its port for the next flow.
    let first = flows
        .iter()
        .find(|(k, _)| u16::from_be(k.sport_be) == ports[0].0)
        .copied()
        .expect("the first flow");
    store.remove_nat(&[first]).expect("remove the pair");
    let (v, out) = rig.run(&syn(41002));
    assert_eq!(v, XDP_TX);
    assert_eq!(nport(&out, false), ports[0].1, "the freed port");
    assert_eq!(store.read_nat().expect("NAT table").len(), 2);
}

/// An ICMP error about a NAT flow, both ways: about our reply to the client (to the
/// backend, as if about the backend's packet) and about our packet to the backend (to
/// the client, as if about the client's packet).
fn icmp_both_ways(rig: &mut Rig, vip: &str, backend: &str, client: &str, router: &str) {
    let v6 = ip(vip).is_ipv6();
    let vip = (ip(vip), 443);
    let client = (ip(client), 40000);
    let backend_ip = ip(backend);
    let bmac = backend_mac(backend_ip);
    let router = ip(router);
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN));
    assert_eq!(v, XDP_TX);
    let n = nport(&out, v6);
    let icmp = |src: IpAddr, dst: IpAddr, quoted: &[u8]| match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            Ipv4::new(s, d, 1).build(&icmp4_frag_needed_body(1400, quoted))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => icmp6_packet_too_big(s, d, 1280, quoted),
        _ => panic!("mixed families"),
    };
    let ether = if v6 { ETH_P_IPV6 } else { ETH_P_IP };
    let events = event_count(rig, event::NAT_ICMP);

    // A router towards the client: our VIP:443 -> client was too big.
    let input = ethernet(
        LB_MAC,
        ROUTER_MAC,
        None,
        ether,
        &icmp(router, vip.0, &quote(vip, client, ACK)),
    );
    let (v, out) = rig.run(&input);
    assert_eq!(v, XDP_TX, "to the backend");
    let expected = ethernet(
        bmac,
        LB_MAC,
        None,
        ether,
        &icmp(
            vip.0,
            backend_ip,
            &quote((backend_ip, 8443), (vip.0, n), ACK),
        ),
    );
    assert_eq!(out, expected, "as if about the backend's own packet");

    // A router towards the backend: our VIP:nport -> backend was too big.
    let input = ethernet(
        LB_MAC,
        ROUTER_MAC,
        None,
        ether,
        &icmp(router, vip.0, &quote((vip.0, n), (backend_ip, 8443), ACK)),
    );
    let (v, out) = rig.run(&input);
    assert_eq!(v, XDP_TX, "to the client");
    let expected = ethernet(
        CLIENT_MAC,
        LB_MAC,
        None,
        ether,
        &icmp(vip.0, client.0, &quote(client, vip, ACK)),
    );
    assert_eq!(out, expected, "as if about the client's own packet");
    assert_eq!(event_count(rig, event::NAT_ICMP), events + 2);

    // About a flow of the NAT service that does not exist: dropped, not DSR-forwarded.
    let before = reasons(rig);
    let stranger = (client.0, 40009);
    let input = ethernet(
        LB_MAC,
        ROUTER_MAC,
        None,
        ether,
        &icmp(router, vip.0, &quote(vip, stranger, ACK)),
    );
    assert_eq!(rig.run(&input).0, XDP_DROP);
    assert_eq!(reasons(rig), plus(&before, reason::DROP_NAT_NO_FLOW, 1));
}

/// ICMP fragmentation needed (type 3 code 4) with its checksum, quoting `quoted`.
fn icmp4_frag_needed_body(mtu: u16, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![3, 4, 0, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(quoted);
    let c = checksum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

#[test]
fn icmp_errors_about_nat_flows_are_translated_both_ways_ipv4() {
    if !require_root("icmp_errors_about_nat_flows_are_translated_both_ways_ipv4") {
        return;
    }
    let mut rig = rig();
    icmp_both_ways(
        &mut rig,
        "192.0.2.20",
        "10.0.1.5",
        "198.51.100.7",
        "203.0.113.1",
    );
}

#[test]
fn icmp_errors_about_nat_flows_are_translated_both_ways_ipv6() {
    if !require_root("icmp_errors_about_nat_flows_are_translated_both_ways_ipv6") {
        return;
    }
    let mut rig = rig();
    icmp_both_ways(
        &mut rig,
        "2001:db8::20",
        "2001:db8:1::5",
        "2001:db8:2::7",
        "2001:db8:3::1",
    );
}

/// One NAT service ("api", 192.0.2.20:443) of two backends, 10.0.1.5 and 10.0.1.6.
fn two_backends() -> Vec<Service> {
    vec![nat_service(
        "api",
        "192.0.2.20",
        443,
        &["10.0.1.5", "10.0.1.6"],
        8443,
    )]
}

/// `services` with `backend` out of the ring (weight 0, as a drain does).
fn drained(mut services: Vec<Service>, backend: IpAddr) -> Vec<Service> {
    for b in services.iter_mut().flat_map(|s| s.backends.iter_mut()) {
        if b.address == backend {
            b.weight = 0;
        }
    }
    services
}

/// Closes the flow of `client` (source port `n` towards `backend`) both ways.
fn close_both_ways(
    rig: &mut Rig,
    client: (IpAddr, u16),
    vip: (IpAddr, u16),
    backend: IpAddr,
    n: u16,
) {
    rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, FIN | ACK));
    rig.run(&tcp_frame(
        LB_MAC,
        backend_mac(backend),
        None,
        (backend, 8443),
        (vip.0, n),
        FIN | ACK,
    ));
}

/// A client reuses the tuple of a closed flow: a new connection. When its backend is
/// chosen again, the closed flow's pair becomes the new connection's (the same source
/// port, which the claim would give it again), with no pair removed and made; a scan
/// that read the closed flow before does not remove it. When another backend is
/// chosen, the old pair goes and a new one is made.
#[test]
fn a_syn_on_a_closed_flows_tuple_is_a_new_connection() {
    if !require_root("a_syn_on_a_closed_flows_tuple_is_a_new_connection") {
        return;
    }
    let mut rig = rig();
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let vip = (ip("192.0.2.20"), 443);
    let client = (ip("198.51.100.7"), 42000);
    let backend = ip("10.0.1.5");
    let bmac = backend_mac(backend);
    let syn = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN);
    let (_, out) = rig.run(&syn);
    let n = nport(&out, false);
    rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK));
    close_both_ways(&mut rig, client, vip, backend, n);
    let closed = store.read_nat().expect("NAT table");
    assert_eq!(closed.len(), 1);
    assert!(lb_userspace::nat::is_closed(&closed[0].1), "both FINs seen");
    assert_ne!(closed[0].1.flags & NAT_F_ESTABLISHED, 0, "past the SYN");
    let slot = vip_slot(rig.programmer.vip_num(vip.0, 443).expect("vip"));
    let new_flows = rig.counter(slot).new_flows;

    // The client reuses its port; the one backend is chosen again.
    let (v, out) = rig.run(&syn);
    assert_eq!(
        (v, out),
        (
            XDP_TX,
            tcp_frame(bmac, LB_MAC, None, (vip.0, n), (backend, 8443), SYN)
        ),
        "the same backend, the same source port"
    );
    assert_eq!(rig.counter(slot).new_flows, new_flows + 1, "a new flow");
    let flows = store.read_nat().expect("NAT table");
    assert_eq!(flows.len(), 1);
    assert!(!lb_userspace::nat::is_closed(&flows[0].1), "a fresh flow");
    assert_eq!(
        flows[0].1.flags & NAT_F_ESTABLISHED,
        0,
        "a SYN only: collected after the embryonic timeout unless more follows"
    );
    assert!(flows[0].1.last_seen_ns >= closed[0].1.last_seen_ns);
    // A scan that read the closed flow removes nothing now.
    assert_eq!(store.remove_nat(&closed).expect("remove"), 0);
    assert_eq!(
        store.read_nat().expect("NAT table"),
        flows,
        "the pair stays"
    );
    // The backend's SYN-ACK comes back.
    reply_comes_back(&mut rig, (backend, 8443), vip, n, client, SYN | ACK);

    // Two backends; the closed flow's backend is drained: the SYN takes the other.
    let mut rig = Rig::new(two_backends()).expect("load (needs root)");
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let (v, out) = rig.run(&syn);
    assert_eq!(v, XDP_TX);
    let n = nport(&out, false);
    let chosen = translated_to(&out).0;
    close_both_ways(&mut rig, client, vip, chosen, n);
    rig.apply(drained(two_backends(), chosen))
        .expect("reprogram");
    let (v, out) = rig.run(&syn);
    assert_eq!(v, XDP_TX);
    let other = translated_to(&out).0;
    assert_ne!(other, chosen, "the ring's other backend");
    let flows = store.read_nat().expect("NAT table");
    assert_eq!(flows.len(), 1, "the old pair went");
    assert!(!lb_userspace::nat::is_closed(&flows[0].1));
    // The old backend's port leads nowhere now.
    let before = reasons(&rig);
    let stray = tcp_frame(
        LB_MAC,
        backend_mac(chosen),
        None,
        (chosen, 8443),
        (vip.0, n),
        ACK,
    );
    assert_eq!(rig.run(&stray).0, XDP_DROP);
    assert_eq!(reasons(&rig), plus(&before, reason::DROP_VIP_UNSERVED, 1));
}

#[test]
fn a_host_that_does_not_serve_translates_nothing() {
    if !require_root("a_host_that_does_not_serve_translates_nothing") {
        return;
    }
    use lb_userspace::dataplane::ServeSwitch;
    let mut rig = rig();
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let vip = (ip("192.0.2.20"), 443);
    let client = (ip("198.51.100.7"), 43000);
    let backend = ip("10.0.1.5");
    let n = open_ipv4_flow(&mut rig, client, vip);
    // A backup (or a master whose lease ran out): neither direction is translated.
    rig.serving.set_serving(false, 0).expect("serving switch");
    let before = reasons(&rig);
    let reply = tcp_frame(
        LB_MAC,
        backend_mac(backend),
        None,
        (backend, 8443),
        (vip.0, n),
        SYN | ACK,
    );
    for frame in [
        tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK),
        tcp_frame(LB_MAC, CLIENT_MAC, None, (client.0, 43001), vip, SYN),
        reply.clone(),
    ] {
        let (v, out) = rig.run(&frame);
        assert_eq!((v, &out), (XDP_DROP, &frame), "dropped untouched");
    }
    assert_eq!(reasons(&rig), plus(&before, reason::DROP_NOT_MASTER, 3));
    assert_eq!(store.read_nat().expect("NAT table").len(), 1, "no new pair");
    // Serving again, the pair is still there.
    rig.serving.set_serving(true, 0).expect("serving switch");
    assert_eq!(rig.run(&reply).0, XDP_TX);
}

#[test]
fn an_established_nat_flow_keeps_its_backend_through_ring_changes() {
    if !require_root("an_established_nat_flow_keeps_its_backend_through_ring_changes") {
        return;
    }
    let mut rig = Rig::new(two_backends()).expect("load (needs root)");
    let vip = (ip("192.0.2.20"), 443);
    let client = (ip("198.51.100.7"), 44000);
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN));
    assert_eq!(v, XDP_TX);
    let n = nport(&out, false);
    let chosen = translated_to(&out).0;
    // Its backend leaves the ring (weight 0, as a drain does).
    rig.apply(drained(two_backends(), chosen))
        .expect("reprogram");
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK));
    assert_eq!(v, XDP_TX);
    assert_eq!(
        out,
        tcp_frame(
            backend_mac(chosen),
            LB_MAC,
            None,
            (vip.0, n),
            (chosen, 8443),
            ACK
        ),
        "the same backend, the same port"
    );
    // New flows go to the other one.
    for port in 44001..44021 {
        let (v, out) = rig.run(&tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            (client.0, port),
            vip,
            SYN,
        ));
        assert_eq!(v, XDP_TX);
        assert_ne!(translated_to(&out).0, chosen);
    }
}

// ---- client-address persistence in NAT mode ------------------------------------------

const PERSIST_S: u32 = 300;

/// Two NAT services (IPv4 "api", IPv6 "api6") of two backends each, with persistence.
fn persistent_nat_services() -> Vec<Service> {
    let mut s = vec![
        nat_service("api", "192.0.2.20", 443, &["10.0.1.5", "10.0.1.6"], 8443),
        nat_service(
            "api6",
            "2001:db8::20",
            443,
            &["2001:db8:1::5", "2001:db8:1::6"],
            8443,
        ),
    ];
    for svc in &mut s {
        svc.persistence_timeout_s = PERSIST_S;
    }
    s
}

/// The translated destination (backend address and port) and the destination MAC of a
/// frame the NAT path sent towards a backend.
fn translated_to(frame: &[u8]) -> (IpAddr, u16, [u8; 6]) {
    let mac: [u8; 6] = frame[0..6].try_into().expect("MAC");
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IP => {
            let a: [u8; 4] = frame[30..34].try_into().expect("IPv4 address");
            (
                IpAddr::from(a),
                u16::from_be_bytes([frame[36], frame[37]]),
                mac,
            )
        }
        _ => {
            let a: [u8; 16] = frame[38..54].try_into().expect("IPv6 address");
            (
                IpAddr::from(a),
                u16::from_be_bytes([frame[56], frame[57]]),
                mac,
            )
        }
    }
}

/// A NAT client's new connections (other source ports) keep the backend of its first
/// after the ring moved (weights changed, a backend added), IPv4 and IPv6; without
/// persistence the ring decides.
#[test]
fn nat_persistence_keeps_a_client_on_its_backend_after_the_ring_changes() {
    if !require_root("nat_persistence_keeps_a_client_on_its_backend_after_the_ring_changes") {
        return;
    }
    for (svc, client, extra) in [
        (0usize, "198.51.100.80", "10.0.1.7"),
        (1, "2001:db8:2::80", "2001:db8:1::7"),
    ] {
        let mut rig = Rig::new(persistent_nat_services()).expect("load (needs root)");
        let mut store = rig.dp.take_flow_store().expect("flow store");
        let s0 = rig.services[svc].clone();
        let vip = (s0.vip, s0.port);
        let client = ip(client);
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
        let (first, first_addr) = rig.ring_choice(&s0, &first_key);
        assert_eq!(
            translated_to(&out),
            (first_addr, 8443, backend_mac(first_addr)),
            "{}: the first connection takes the ring",
            s0.name
        );
        let pkey = PersistKey::of_flow(&first_key);
        let entry = persist_entry(&mut store, &pkey).expect("the choice is remembered");
        assert_eq!(entry.backend, first);
        assert_eq!(
            entry.vip_num,
            rig.programmer.vip_num(vip.0, vip.1).expect("vip")
        );

        // The ring changes: the first backend's weight drops, a third joins (on its
        // own port, so the translated port tells it apart too).
        let mut s = persistent_nat_services();
        for b in &mut s[svc].backends {
            if b.address == first_addr {
                b.weight = 10;
            }
        }
        s[svc].backends.push(BackendSpec {
            name: "extra".into(),
            address: ip(extra),
            weight: 100,
            backup: false,
            port: Some(9443),
        });
        rig.apply(s.clone()).expect("reprogram");
        let port = rig.port_off(&s[svc], client, first, 50000);
        for p in [port, port + 1000, port + 2000] {
            let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, (client, p), vip, SYN));
            assert_eq!(v, XDP_TX);
            assert_eq!(
                translated_to(&out),
                (first_addr, 8443, backend_mac(first_addr)),
                "{}: a new connection of a persistent client keeps its backend",
                s0.name
            );
        }
        assert_eq!(
            persist_entry(&mut store, &pkey)
                .expect("still remembered")
                .backend,
            first
        );

        // Persistence off: the same client follows the ring, to another backend.
        s[svc].persistence_timeout_s = 0;
        rig.apply(s.clone()).expect("reprogram");
        let p = rig.port_off(&s[svc], client, first, 53000);
        let (_, ring_addr) = rig.ring_choice(&s[svc], &flow((client, p), vip));
        let ring_port = if ring_addr == ip(extra) { 9443 } else { 8443 };
        let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, (client, p), vip, SYN));
        assert_eq!(v, XDP_TX);
        assert_eq!(
            translated_to(&out),
            (ring_addr, ring_port, backend_mac(ring_addr)),
            "{}: no persistence, the ring decides",
            s0.name
        );
    }
}

/// The remembered backend disabled or down: the client's next connection goes where the
/// ring says, that choice is remembered, and the connection after it follows it.
#[test]
fn nat_persistent_client_of_a_disabled_or_down_backend_is_rechosen() {
    if !require_root("nat_persistent_client_of_a_disabled_or_down_backend_is_rechosen") {
        return;
    }
    for svc in [0usize, 1] {
        for down in [false, true] {
            let mut rig = Rig::new(persistent_nat_services()).expect("load (needs root)");
            let mut store = rig.dp.take_flow_store().expect("flow store");
            let s0 = rig.services[svc].clone();
            let vip = (s0.vip, s0.port);
            let client = if svc == 0 {
                ip("198.51.100.82")
            } else {
                ip("2001:db8:2::82")
            };
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
            let (first, gone) = rig.ring_choice(&s0, &first_key);
            assert_eq!(translated_to(&out).0, gone);
            let view = move |s: &Service, b: &BackendSpec| BackendView {
                enabled: down || b.address != gone,
                healthy: !down || b.address != gone,
                ..all_up(s, b)
            };
            rig.apply_with(persistent_nat_services(), &view)
                .expect("reprogram");
            let other = s0
                .backends
                .iter()
                .find(|b| b.address != gone)
                .expect("the other backend")
                .address;
            let (v, out) = rig.run(&tcp_frame(
                LB_MAC,
                CLIENT_MAC,
                None,
                (client, 40001),
                vip,
                SYN,
            ));
            assert_eq!(v, XDP_TX);
            assert_eq!(
                translated_to(&out),
                (other, 8443, backend_mac(other)),
                "{} down={down}: re-chosen",
                s0.name
            );
            let pkey = PersistKey::of_flow(&first_key);
            let entry = persist_entry(&mut store, &pkey).expect("remembered");
            assert_ne!(entry.backend, first, "{} down={down}", s0.name);
            assert_eq!(
                Some(entry.backend),
                rig.programmer.backend_id(&s0.name, other),
                "{} down={down}: the new choice is remembered",
                s0.name
            );
            // With the old backend back, the client stays on the new one.
            rig.apply(persistent_nat_services()).expect("reprogram");
            let back = rig.port_off(&rig.services[svc].clone(), client, entry.backend, 50000);
            let (_, out) = rig.run(&tcp_frame(
                LB_MAC,
                CLIENT_MAC,
                None,
                (client, back),
                vip,
                SYN,
            ));
            assert_eq!(
                translated_to(&out).0,
                other,
                "{} down={down}: the new choice persists",
                s0.name
            );
        }
    }
}

/// Established NAT packets of a client keep its entry alive: an entry older than
/// PERSIST_TOUCH_NS is brought forward, a fresher one left as it is (a write per second
/// at most); a packet the NAT table does not know touches nothing.
#[test]
fn established_nat_packets_refresh_the_persistence_entry() {
    if !require_root("established_nat_packets_refresh_the_persistence_entry") {
        return;
    }
    for svc in [0usize, 1] {
        let mut rig = Rig::new(persistent_nat_services()).expect("load (needs root)");
        let mut store = rig.dp.take_flow_store().expect("flow store");
        let s0 = rig.services[svc].clone();
        let vip = (s0.vip, s0.port);
        let client = if svc == 0 {
            ip("198.51.100.83")
        } else {
            ip("2001:db8:2::83")
        };
        let key = flow((client, 40000), vip);
        let pkey = PersistKey::of_flow(&key);
        let (v, _) = rig.run(&tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            (client, 40000),
            vip,
            SYN,
        ));
        assert_eq!(v, XDP_TX);
        let ack = tcp_frame(LB_MAC, CLIENT_MAC, None, (client, 40000), vip, ACK);

        // Older than the touch interval (here: 60 s ago): an ACK moves it to now.
        let mut entry = persist_entry(&mut store, &pkey).expect("remembered");
        let aged = monotonic_ns() - 60 * 1_000_000_000;
        entry.last_seen_ns = aged;
        store.write_persist(&[(pkey, entry)]).expect("age it");
        let before = monotonic_ns();
        assert_eq!(rig.run(&ack).0, XDP_TX);
        let touched = persist_entry(&mut store, &pkey).expect("remembered");
        assert!(
            touched.last_seen_ns >= before - COARSE_CLOCK_LAG_NS,
            "{}: an established packet refreshes an old entry ({} < {before})",
            s0.name,
            touched.last_seen_ns
        );
        assert_eq!(touched.backend, entry.backend);

        // Fresher than the interval: left as it is.
        let recent = monotonic_ns() - PERSIST_TOUCH_NS / 10;
        entry.last_seen_ns = recent;
        store.write_persist(&[(pkey, entry)]).expect("set it");
        assert_eq!(rig.run(&ack).0, XDP_TX);
        let after = persist_entry(&mut store, &pkey).expect("remembered");
        let waited = monotonic_ns() - recent;
        // Only meaningful if the run came back within the interval (it takes micro-
        // seconds; the figure is printed).
        println!("{}: {waited} ns between the write and the check", s0.name);
        if waited < PERSIST_TOUCH_NS {
            assert_eq!(
                after.last_seen_ns, recent,
                "{}: within PERSIST_TOUCH_NS, no write",
                s0.name
            );
        }

        // A mid-flow packet of no NAT flow: dropped, and the entry untouched.
        entry.last_seen_ns = aged;
        store.write_persist(&[(pkey, entry)]).expect("age it");
        let stray = tcp_frame(LB_MAC, CLIENT_MAC, None, (client, 40001), vip, ACK);
        assert_eq!(rig.run(&stray).0, XDP_DROP);
        assert_eq!(
            persist_entry(&mut store, &pkey)
                .expect("remembered")
                .last_seen_ns,
            aged,
            "{}: no flow, no refresh",
            s0.name
        );
    }
}

/// The NAT table's one flow, read back.
/// A client's SYN from `client` to the IPv4 NAT service `vip`, translated: the source
/// port its flow took towards the backend.
fn open_ipv4_flow(rig: &mut Rig, client: (IpAddr, u16), vip: (IpAddr, u16)) -> u16 {
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN));
    assert_eq!(v, XDP_TX, "the SYN is translated");
    nport(&out, false)
}

/// The backend's segment (from its port 8443) to the VIP address `vip` at NAT port `n`.
fn backend_segment(backend: IpAddr, vip: IpAddr, n: u16, flags: u8) -> Vec<u8> {
    tcp_frame(
        LB_MAC,
        backend_mac(backend),
        None,
        (backend, 8443),
        (vip, n),
        flags,
    )
}

/// The reverse table (NAT_REVERSE), through a descriptor of its own.
fn reverse_table(rig: &mut Rig) -> aya::maps::HashMap<aya::maps::MapData, FlowKey, NatReply> {
    aya::maps::HashMap::try_from(rig.map(names::MAP_NAT_REVERSE).expect("NAT_REVERSE"))
        .expect("NAT_REVERSE")
}

fn only_nat_flow(store: &mut dyn FlowStore) -> (FlowKey, NatFlow) {
    let flows = store.read_nat().expect("NAT table");
    assert_eq!(flows.len(), 1);
    flows[0]
}

/// A NAT flow's entry is written by its packets only when that changes something: a
/// time last refreshed `FLOW_TOUCH_JIFFIES` or more ago (`NatFlow::touched`; 0, as a
/// peer's copy comes, is due), a flag not yet set (a FIN, an RST), or a peer's copy
/// seen here for the first time (`NAT_F_SYNCED` goes). Otherwise both directions only
/// read it (and no clock): its time stays as it was, however old.
#[test]
fn nat_packets_write_their_entry_only_when_it_changes() {
    if !require_root("nat_packets_write_their_entry_only_when_it_changes") {
        return;
    }
    let mut rig = rig();
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let vip = (ip("192.0.2.20"), 443);
    let client = (ip("198.51.100.9"), 42001);
    let backend = ip("10.0.1.5");
    let n = open_ipv4_flow(&mut rig, client, vip);
    let from_client = |flags| tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, flags);
    let from_backend = |flags| backend_segment(backend, vip.0, n, flags);
    assert_eq!(rig.run(&from_client(ACK)).0, XDP_TX);
    let (key, mut e) = only_nat_flow(&mut store);
    assert_ne!(e.flags & NAT_F_ESTABLISHED, 0);

    // Due (no stamp), and a peer's copy: the next packet writes the time and the stamp
    // and clears SYNCED.
    let aged = monotonic_ns() - 60 * 1_000_000_000;
    e.last_seen_ns = aged;
    e.touched = 0;
    e.flags |= NAT_F_SYNCED;
    store.install_nat(&[(key, e)]).expect("age it");
    let before = monotonic_ns();
    assert_eq!(rig.run(&from_client(ACK)).0, XDP_TX);
    let (_, after) = only_nat_flow(&mut store);
    assert!(
        after.last_seen_ns >= before - COARSE_CLOCK_LAG_NS,
        "a stale time is refreshed"
    );
    assert_eq!(after.flags & NAT_F_SYNCED, 0, "seen here now");
    assert_ne!(after.touched, 0, "and stamped");

    // A fresh stamp, an old time, a peer's copy: the first packet clears SYNCED and
    // keeps the time; then neither direction writes (a write per packet would move
    // the time). Should this process sleep past the stamp's interval, the stamp moves
    // by at least that much: tried again.
    let mut kept = false;
    for _ in 0..5 {
        let (_, now) = only_nat_flow(&mut store);
        e.last_seen_ns = aged;
        e.touched = now.touched;
        e.flags = after.flags | NAT_F_SYNCED;
        store.install_nat(&[(key, e)]).expect("set it");
        assert_eq!(rig.run(&from_client(ACK)).0, XDP_TX);
        let (_, seen) = only_nat_flow(&mut store);
        assert_eq!(seen.flags, after.flags, "seen here now, nothing else new");
        for _ in 0..3 {
            assert_eq!(rig.run(&from_client(ACK)).0, XDP_TX);
            assert_eq!(rig.run(&from_backend(ACK)).0, XDP_TX);
        }
        let (_, later) = only_nat_flow(&mut store);
        assert_eq!(later.flags, after.flags);
        if later.last_seen_ns == aged {
            kept = true;
            break;
        }
        assert!(
            later.touched.wrapping_sub(e.touched) >= FLOW_TOUCH_JIFFIES as u16,
            "the time written with a fresh stamp: {e:?} -> {later:?}"
        );
    }
    assert!(kept, "a fresh stamp: the time is kept");

    // A FIN each way is always written, time or not.
    assert_eq!(rig.run(&from_client(FIN | ACK)).0, XDP_TX);
    assert_ne!(only_nat_flow(&mut store).1.flags & NAT_F_FIN_CLIENT, 0);
    assert_eq!(rig.run(&from_backend(FIN | ACK)).0, XDP_TX);
    let (_, closed) = only_nat_flow(&mut store);
    assert_ne!(closed.flags & NAT_F_FIN_BACKEND, 0);
    assert!(lb_userspace::nat::is_closed(&closed));
}

/// A backend's reply is translated from its reverse entry (`NatReply`) alone: it asks
/// the forward entry only to write to it, for a FIN or an RST, and for the flow's
/// last-seen time once the reverse entry's own stamp is due (then also clearing
/// `NAT_F_SYNCED`). A peer's pair, as the agent installs it, has that stamp due.
#[test]
fn a_nat_reply_asks_only_its_reverse_entry_until_the_flow_needs_a_write() {
    if !require_root("a_nat_reply_asks_only_its_reverse_entry_until_the_flow_needs_a_write") {
        return;
    }
    let mut rig = rig();
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let vip = (ip("192.0.2.20"), 443);
    let client = (ip("198.51.100.9"), 42001);
    let backend = ip("10.0.1.5");
    let n = open_ipv4_flow(&mut rig, client, vip);
    let from_backend = |flags| backend_segment(backend, vip.0, n, flags);
    let to_client = |flags| tcp_frame(CLIENT_MAC, LB_MAC, None, vip, client, flags);
    let from_client = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK);
    assert_eq!(rig.run(&from_client).0, XDP_TX);
    let (key, e) = only_nat_flow(&mut store);
    let rev = lb_userspace::nat::reverse_key(&key, &e);
    let mut replies = reverse_table(&mut rig);
    let r = replies.get(&rev, 0).expect("the flow's reverse entry");
    assert_eq!(
        (r.client, r.backend, r.vip_num),
        (key, e.backend, e.vip_num),
        "the reverse entry names the flow, its backend and its service"
    );

    // A peer's copy, its time old and its own stamp due (a packet that visits it
    // writes it): while the reverse entry's stamp is fresh, replies go back translated
    // and the forward entry is not written. Should this process sleep past the stamp's
    // interval, the time moves: tried again.
    let aged = monotonic_ns() - 60 * 1_000_000_000;
    let mut kept = false;
    for _ in 0..5 {
        let fresh = replies.get(&rev, 0).expect("reverse entry").touched;
        store
            .install_nat(&[(
                key,
                NatFlow {
                    last_seen_ns: aged,
                    touched: 0,
                    flags: e.flags | NAT_F_SYNCED,
                    ..e
                },
            )])
            .expect("age it");
        replies
            .insert(
                rev,
                NatReply {
                    touched: fresh,
                    ..r
                },
                0,
            )
            .expect("a fresh stamp");
        for _ in 0..3 {
            assert_eq!(rig.run(&from_backend(ACK)), (XDP_TX, to_client(ACK)));
        }
        let (_, now) = only_nat_flow(&mut store);
        if now.last_seen_ns == aged {
            assert_ne!(
                now.flags & NAT_F_SYNCED,
                0,
                "not written: still the peer's copy"
            );
            kept = true;
            break;
        }
    }
    assert!(kept, "a fresh stamp: the forward entry is not written");

    // The stamp due (0, as the agent installs it): the next reply refreshes the
    // forward entry's time, clears SYNCED and stamps the reverse entry.
    replies
        .insert(rev, NatReply { touched: 0, ..r }, 0)
        .expect("a due stamp");
    let before = monotonic_ns();
    assert_eq!(rig.run(&from_backend(ACK)), (XDP_TX, to_client(ACK)));
    let (_, now) = only_nat_flow(&mut store);
    assert!(
        now.last_seen_ns >= before - COARSE_CLOCK_LAG_NS,
        "refreshed: {now:?}"
    );
    assert_eq!(now.flags & NAT_F_SYNCED, 0, "seen here now");
    assert_ne!(
        replies.get(&rev, 0).expect("reverse entry").touched,
        0,
        "stamped"
    );

    // A FIN is written whatever the stamp.
    assert_eq!(
        rig.run(&from_backend(FIN | ACK)),
        (XDP_TX, to_client(FIN | ACK))
    );
    assert_ne!(only_nat_flow(&mut store).1.flags & NAT_F_FIN_BACKEND, 0);

    // The pair as a peer's sync installs it on a host that had none: its reverse
    // entry is the agent's (`reply_entry`), with no next hop and the stamp due; the
    // first reply goes back and marks the flow seen here.
    let closed = only_nat_flow(&mut store);
    assert_eq!(store.remove_nat(&[closed]).expect("remove"), 1);
    assert!(replies.get(&rev, 0).is_err(), "both halves removed");
    let peers = NatFlow {
        flags: NAT_F_ESTABLISHED | NAT_F_SYNCED,
        ..e
    };
    assert_eq!(store.install_nat(&[(key, peers)]).expect("install"), 0);
    let installed = replies.get(&rev, 0).expect("the installed reverse entry");
    assert_eq!(installed, lb_userspace::nat::reply_entry(&key, &peers));
    assert_eq!((installed.touched, installed.to_client.at_jiffies), (0, 0));
    assert_eq!(rig.run(&from_backend(ACK)), (XDP_TX, to_client(ACK)));
    assert_eq!(only_nat_flow(&mut store).1.flags & NAT_F_SYNCED, 0);
}

/// A flow's cached next hop (`NatFlow::to_backend`, `NatReply::to_client`) takes each direction's
/// packets while younger than `NAT_HOP_TTL_JIFFIES`: its MACs, and `XDP_TX` when its
/// interface is the one the packet came in on, else a redirect. An old copy is not used
/// (here, without FIB lookups, the packet then takes the fallback MACs, and those are
/// cached). The lab's NAT tests check the FIB's answers being cached and followed when
/// the next hop changes.
#[test]
fn nat_packets_take_the_flows_cached_next_hop_while_it_is_fresh() {
    if !require_root("nat_packets_take_the_flows_cached_next_hop_while_it_is_fresh") {
        return;
    }
    const XDP_REDIRECT: u32 = 4;
    // BPF_PROG_TEST_RUN without a context: the packet came in on loopback.
    const INGRESS: u32 = 1;
    let hop = |dmac: [u8; 6], smac: [u8; 6], ifindex: u32, at_jiffies: u64| NextHop {
        dmac,
        smac,
        ifindex,
        at_jiffies,
    };
    let (r1, s1) = ([0x02, 0xaa, 0, 0, 0, 1], [0x02, 0xbb, 0, 0, 0, 1]);
    let (r2, s2) = ([0x02, 0xaa, 0, 0, 0, 2], [0x02, 0xbb, 0, 0, 0, 2]);

    let mut rig = rig();
    let mut store = rig.dp.take_flow_store().expect("flow store");
    let vip = (ip("192.0.2.20"), 443);
    let client = (ip("198.51.100.9"), 42001);
    let backend = ip("10.0.1.5");
    let bmac = backend_mac(backend);
    let n = open_ipv4_flow(&mut rig, client, vip);
    let from_client = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK);
    let from_backend = tcp_frame(LB_MAC, bmac, None, (backend, 8443), (vip.0, n), ACK);
    let to_backend = |dst, src| tcp_frame(dst, src, None, (vip.0, n), (backend, 8443), ACK);
    let to_client = |dst, src| tcp_frame(dst, src, None, vip, client, ACK);
    assert_eq!(rig.run(&from_client), (XDP_TX, to_backend(bmac, LB_MAC)));
    assert_eq!(
        rig.run(&from_backend),
        (XDP_TX, to_client(CLIENT_MAC, LB_MAC))
    );
    let (key, e) = only_nat_flow(&mut store);
    let rev = lb_userspace::nat::reverse_key(&key, &e);
    let mut replies = reverse_table(&mut rig);
    let r = replies.get(&rev, 0).expect("the flow's reverse entry");
    assert_eq!(r.client, key);
    let fallback = |dmac| (dmac, LB_MAC, INGRESS);
    let kept = |h: NextHop| (h.dmac, h.smac, h.ifindex);
    assert_eq!(
        (kept(e.to_backend), kept(r.to_client)),
        (fallback(bmac), fallback(CLIENT_MAC)),
        "the fallback's choice is cached too"
    );
    assert!(e.to_backend.at_jiffies != 0 && r.to_client.at_jiffies != 0);

    // Fresh copies, out of the interface the packets came in on: the jiffies of the
    // copy the program just made (should this process sleep past the copy's age, the
    // program asks again, here with the fallback's MACs: the assertions would say so).
    let fresh = e.to_backend.at_jiffies.min(r.to_client.at_jiffies);
    let mut cache = |to_backend, to_client| {
        store
            .install_nat(&[(key, NatFlow { to_backend, ..e })])
            .expect("cache the next hop towards the backend");
        replies
            .insert(rev, NatReply { to_client, ..r }, 0)
            .expect("cache the next hop towards the client");
    };
    cache(hop(r1, s1, INGRESS, fresh), hop(r2, s2, INGRESS, fresh));
    assert_eq!(rig.run(&from_client), (XDP_TX, to_backend(r1, s1)));
    assert_eq!(rig.run(&from_backend), (XDP_TX, to_client(r2, s2)));

    // Another interface: redirected there, with the cached MACs.
    cache(hop(r1, s1, 999_999, fresh), hop(r2, s2, 999_999, fresh));
    assert_eq!(rig.run(&from_client), (XDP_REDIRECT, to_backend(r1, s1)));
    assert_eq!(rig.run(&from_backend), (XDP_REDIRECT, to_client(r2, s2)));

    // Old copies: not used.
    let old = fresh - 2 * NAT_HOP_TTL_JIFFIES;
    cache(hop(r1, s1, INGRESS, old), hop(r2, s2, INGRESS, old));
    assert_eq!(rig.run(&from_client), (XDP_TX, to_backend(bmac, LB_MAC)));
    assert_eq!(
        rig.run(&from_backend),
        (XDP_TX, to_client(CLIENT_MAC, LB_MAC))
    );
}

/// A backend's reply comes to a port of the NAT range, so the program asks the reverse
/// table first there; a NAT service may listen on a port of that range too: its
/// clients' segments miss the reverse table and still find the service (their flow's
/// entry, before the parse, as for any other port), and its backend's replies still
/// come back.
#[test]
fn a_nat_service_on_a_port_of_the_nat_range() {
    if !require_root("a_nat_service_on_a_port_of_the_nat_range") {
        return;
    }
    let mut rig = Rig::new(vec![nat_service(
        "alt",
        "192.0.2.30",
        8080,
        &["10.0.1.6"],
        9000,
    )])
    .expect("load (needs root)");
    let vip = (ip("192.0.2.30"), 8080);
    let client = (ip("198.51.100.30"), 41000);
    let backend_ip = ip("10.0.1.6");
    let bmac = backend_mac(backend_ip);
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN));
    assert_eq!(v, XDP_TX, "the SYN finds the service");
    let n = nport(&out, false);
    assert_eq!(
        out,
        tcp_frame(bmac, LB_MAC, None, (vip.0, n), (backend_ip, 9000), SYN)
    );
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK));
    assert_eq!(v, XDP_TX, "so does the handshake's ACK");
    assert_eq!(
        out,
        tcp_frame(bmac, LB_MAC, None, (vip.0, n), (backend_ip, 9000), ACK)
    );
    reply_comes_back(&mut rig, (backend_ip, 9000), vip, n, client, SYN | ACK);
}

/// A NAT flow's established segments and its backend's replies are sent before the
/// parse (`nat::known`) only when they would pass everything the parse checks; the
/// rest goes the long way and gets the parse's verdict: a fragment, a frame to another
/// MAC, a flow whose service went (its slot cleared, or taken by another service).
/// A NAT service at an address that has a DSR service too goes the long way as well,
/// and translates as always.
#[test]
fn a_nat_flow_sent_before_the_parse_still_meets_the_parses_checks() {
    if !require_root("a_nat_flow_sent_before_the_parse_still_meets_the_parses_checks") {
        return;
    }
    let mut rig = rig();
    let vip = (ip("192.0.2.20"), 443);
    let client = (ip("198.51.100.7"), 45000);
    let backend = ip("10.0.1.5");
    let bmac = backend_mac(backend);
    let n = open_ipv4_flow(&mut rig, client, vip);
    let ack = tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK);
    let (v, out) = rig.run(&ack);
    assert_eq!(v, XDP_TX);
    assert_eq!(
        out,
        tcp_frame(bmac, LB_MAC, None, (vip.0, n), (backend, 8443), ACK)
    );

    // A fragment of the flow (more-fragments set): the parse drops it, untouched.
    let mut fragment = ack.clone();
    fragment[14 + 6] |= 0x20;
    let before = reasons(&rig);
    assert_eq!(rig.run(&fragment), (XDP_DROP, fragment.clone()));
    assert_eq!(reasons(&rig), plus(&before, reason::DROP_FRAGMENT, 1));
    // A frame of the flow to another host's MAC (flooded to us by a switch): not ours
    // to send on, either way.
    let reply = tcp_frame(LB_MAC, bmac, None, (backend, 8443), (vip.0, n), ACK);
    let mut other = [0x02, 0, 0, 0, 0, 0x99];
    for frame in [ack.clone(), reply.clone()] {
        let mut elsewhere = frame.clone();
        elsewhere[0..6].copy_from_slice(&other);
        let before = reasons(&rig);
        assert_eq!(rig.run(&elsewhere), (XDP_DROP, elsewhere.clone()));
        assert_eq!(reasons(&rig), plus(&before, reason::DROP_OTHER_MAC, 1));
        other[5] += 1;
    }

    // The service goes, another takes the address (and perhaps its number): the flow's
    // entry names a service that is no more, and its segments are not sent on.
    let mut changed = services();
    changed[0] = nat_service("api-b", "192.0.2.20", 444, &["10.0.1.6"], 8444);
    rig.apply(changed).expect("reprogram");
    let before = reasons(&rig);
    assert_eq!(rig.run(&ack), (XDP_DROP, ack.clone()));
    assert_eq!(reasons(&rig), plus(&before, reason::DROP_VIP_UNSERVED, 1));
    // The new service's flows are translated.
    let b_vip = (vip.0, 444);
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, b_vip, SYN));
    assert_eq!(v, XDP_TX);
    let n_b = nport(&out, false);
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, b_vip, ACK));
    assert_eq!(v, XDP_TX);
    assert_eq!(
        out,
        tcp_frame(
            backend_mac(ip("10.0.1.6")),
            LB_MAC,
            None,
            (vip.0, n_b),
            (ip("10.0.1.6"), 8444),
            ACK
        )
    );

    // A NAT service beside a DSR one at one address.
    let mut rig = Rig::new(vec![
        service("web", "192.0.2.40", 80, 1009, &["192.0.2.21"]),
        nat_service("api", "192.0.2.40", 443, &["10.0.1.5"], 8443),
    ])
    .expect("load (needs root)");
    let vip = (ip("192.0.2.40"), 443);
    let n = open_ipv4_flow(&mut rig, client, vip);
    let (v, out) = rig.run(&tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK));
    assert_eq!(v, XDP_TX);
    assert_eq!(
        out,
        tcp_frame(bmac, LB_MAC, None, (vip.0, n), (backend, 8443), ACK)
    );
    reply_comes_back(&mut rig, (backend, 8443), vip, n, client, ACK);
}

/// A NAT flow never takes, as its source port towards a backend, a port a service of
/// its VIP listens on: a reply to it would be that service's segment. With the range
/// 2000 to 2002 and a service on the VIP's port 2001, two flows take 2000 and 2002 and
/// a third finds no port.
#[test]
fn a_nat_flow_never_takes_a_port_a_service_of_its_vip_listens_on() {
    if !require_root("a_nat_flow_never_takes_a_port_a_service_of_its_vip_listens_on") {
        return;
    }
    let mut rig = Rig::new(vec![
        nat_service("api", "192.0.2.20", 443, &["10.0.1.5"], 8443),
        nat_service("alt", "192.0.2.20", 2001, &["10.0.1.6"], 9000),
    ])
    .expect("load (needs root)");
    rig.dp
        .set_nat_config(&NatConfig {
            port_min: 2000,
            port_max: 2002,
            flags: 0,
        })
        .expect("NAT config");
    let vip = (ip("192.0.2.20"), 443);
    let mut got = Vec::new();
    for cport in 47000..47002 {
        let syn = tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            (ip("198.51.100.7"), cport),
            vip,
            SYN,
        );
        let (v, out) = rig.run(&syn);
        assert_eq!(v, XDP_TX, "client port {cport}");
        got.push(nport(&out, false));
    }
    got.sort();
    assert_eq!(got, vec![2000, 2002], "the service's port is never taken");
    let before = reasons(&rig);
    let syn = tcp_frame(
        LB_MAC,
        CLIENT_MAC,
        None,
        (ip("198.51.100.7"), 47002),
        vip,
        SYN,
    );
    assert_eq!(rig.run(&syn).0, XDP_DROP);
    assert_eq!(reasons(&rig), plus(&before, reason::DROP_NAT_NO_PORT, 1));
    // The service on that port still takes its own clients.
    let alt = (vip.0, 2001);
    let (v, out) = rig.run(&tcp_frame(
        LB_MAC,
        CLIENT_MAC,
        None,
        (ip("198.51.100.8"), 47000),
        alt,
        SYN,
    ));
    assert_eq!(v, XDP_TX);
    assert_eq!(translated_to(&out).0, ip("10.0.1.6"));
}
