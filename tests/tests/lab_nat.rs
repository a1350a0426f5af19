//! NAT forwarding end to end in a network-namespace lab, with stock backends: no VIP on
//! their `lo`, no ARP sysctls, and their servers on another port than the service's.
//! Needs root; see `lb_tests::lab`.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{HashMap as AyaHashMap, Map, MapData};
use lb_common::{FlowKey, NAT_HOP_TTL_MAX_NS, NatFlow, NatReply, names};
use lb_tests::lab::{
    BackendSection, Lab, Node, SERVICE_PORT, Service, Streaming, SyncSection, VIP4, VIP6,
    VrrpSection, addr_like, addr4, parse_mac,
};
use lb_userspace::{
    pins::PinDir,
    protocol::{BackendState, Status},
    vrrp::VrrpState,
};

/// The port the backends' servers listen on; the service is on `SERVICE_PORT`.
const BACKEND_PORT: u16 = 9090;
const UP_TIMEOUT: Duration = Duration::from_secs(10);
const BUDGET: Duration = Duration::from_secs(60);

fn lab(backends: usize, second_lb: bool) -> Result<Lab> {
    let lab = Lab::builder()
        .backends(backends)
        .stock_backends(true)
        .second_lb(second_lb)
        .build()?;
    lab.start_servers(BACKEND_PORT)?;
    Ok(lab)
}

fn nat4(backends: usize) -> Service {
    Service::new("api", VIP4, SERVICE_PORT)
        .nat(BACKEND_PORT)
        .backends(1..=backends)
        .health_check(100, 200, 1, 2)
}

fn nat6(backends: usize) -> Service {
    Service::new("api6", VIP6, SERVICE_PORT)
        .nat(BACKEND_PORT)
        .backends(1..=backends)
        .health_check(100, 200, 1, 2)
}

fn with_diagnostics<T>(lab: &Lab, result: Result<T>) -> Result<T> {
    result.map_err(|e| e.context(format!("lab diagnostics:\n{}", lab.diagnostics())))
}

/// Stock backends behind an IPv4 and an IPv6 NAT service: every connection succeeds,
/// every backend gets some, and long connections carry data both ways.
#[test]
fn nat_serves_stock_backends_ipv4_and_ipv6() -> Result<()> {
    if !lb_tests::require_root("nat_serves_stock_backends_ipv4_and_ipv6") {
        return Ok(());
    }
    let lab = lab(3, false)?;
    let _agent = lab.spawn_agent(&lab.config("native", &[nat4(3), nat6(3)]))?;
    lab.wait_backends_up("api", &["b1", "b2", "b3"], UP_TIMEOUT)?;
    lab.wait_backends_up("api6", &["b1", "b2", "b3"], UP_TIMEOUT)?;
    for vip in [
        SocketAddr::from((VIP4, SERVICE_PORT)),
        (VIP6, SERVICE_PORT).into(),
    ] {
        let spread = lab.spread(vip, 300, BUDGET);
        println!("{vip}:\n{}", spread.table());
        with_diagnostics(
            &lab,
            spread.check_shares(&[("b1", 1.0), ("b2", 1.0), ("b3", 1.0)], 0.4, 1.6),
        )?;
        let mut held = with_diagnostics(&lab, lab.one_per_backend(vip, &["b1", "b2", "b3"], 200))?;
        for (name, c) in held.iter_mut() {
            for k in 0..3 {
                with_diagnostics(&lab, c.check_echo(&format!("{vip} {name} {k}")))?;
            }
        }
    }
    let status = lab.lbctl_status()?;
    println!("lbctl status: {status:?}");
    Ok(())
}

/// A backend in another subnet, behind a router namespace, beside two on the LB's
/// segment: the LB sends its flows to the router (the FIB's next hop), the router
/// forwards them, and the answers come back through it. The far backend has no route
/// to the client, only to the VIPs and the LB hosts.
#[test]
fn nat_reaches_a_backend_behind_a_router() -> Result<()> {
    if !lb_tests::require_root("nat_reaches_a_backend_behind_a_router") {
        return Ok(());
    }
    let lab = Lab::builder()
        .backends(2)
        .stock_backends(true)
        .routed_backend(true)
        .build()?;
    lab.start_servers(BACKEND_PORT)?;
    lab.start_server_on(Node::Routed, BACKEND_PORT)?;
    let mut file = lab.config_file(Node::Lb, "native", &[nat4(2), nat6(2)]);
    for s in &mut file.services {
        s.backends.push(BackendSection {
            name: "far".into(),
            address: addr_like(Node::Routed, s.vip),
            weight: 100,
            backup: None,
            port: Some(BACKEND_PORT),
        });
    }
    let _agent = lab.spawn_agent(&file.to_toml())?;
    for service in ["api", "api6"] {
        lab.wait_backends_up(service, &["b1", "b2", "far"], UP_TIMEOUT)?;
    }
    for vip in [
        SocketAddr::from((VIP4, SERVICE_PORT)),
        (VIP6, SERVICE_PORT).into(),
    ] {
        let spread = lab.spread(vip, 300, BUDGET);
        println!("{vip}:\n{}", spread.table());
        with_diagnostics(
            &lab,
            spread.check_shares(&[("b1", 1.0), ("b2", 1.0), ("far", 1.0)], 0.4, 1.6),
        )?;
        let mut held = with_diagnostics(&lab, lab.one_per_backend(vip, &["far"], 200))?;
        let far = held.get_mut("far").context("no connection to far")?;
        for k in 0..3 {
            with_diagnostics(&lab, far.check_echo(&format!("{vip} far {k}")))?;
        }
    }
    // The far backend really has no way to the client but through the LB.
    let routes = lab.run(
        Node::Routed,
        &["ip", "route", "get", &addr4(Node::Client).to_string()],
    );
    ensure!(
        routes.is_err(),
        "the far backend has a route to the client: {routes:?}"
    );
    Ok(())
}

/// `disable --wait` on a NAT backend waits for its NAT connection, and returns soon
/// after it closes; meanwhile the connection keeps working and no new one reaches it.
#[test]
fn nat_drain_with_wait_counts_nat_flows() -> Result<()> {
    if !lb_tests::require_root("nat_drain_with_wait_counts_nat_flows") {
        return Ok(());
    }
    let lab = lab(2, false)?;
    let vip = SocketAddr::from((VIP4, SERVICE_PORT));
    let _agent = lab.spawn_agent(&lab.config("native", &[nat4(2)]))?;
    lab.wait_backends_up("api", &["b1", "b2"], UP_TIMEOUT)?;
    let mut held = with_diagnostics(&lab, lab.one_per_backend(vip, &["b1", "b2"], 200))?;
    let cmd = lab.lbctl_command(&[
        "backend",
        "disable",
        "api",
        "b1",
        "--wait",
        "--timeout",
        "60",
    ])?;
    let mut disable = Streaming::spawn(cmd)?;
    disable.first_line(Duration::from_secs(10))?;
    // A scan or two: --wait must still be waiting for b1's connection.
    thread::sleep(Duration::from_millis(2500));
    if let Some((status, _)) = disable.poll()? {
        bail!(
            "disable --wait returned ({status}) while b1 holds a NAT connection: {}{}",
            disable.stdout(),
            disable.stderr()
        );
    }
    let b1 = lab.lbctl_backend("api", "b1")?;
    println!(
        "draining: state {}, active_flows {}",
        b1.state, b1.active_flows
    );
    ensure!(
        b1.state == BackendState::Draining && b1.active_flows >= 1,
        "b1 while its NAT connection is open: {b1:?}"
    );
    let c = held.get_mut("b1").context("no b1 connection")?;
    with_diagnostics(&lab, c.check_echo("still here"))?;
    for k in 0..20 {
        let c = lab.converse(vip)?;
        ensure!(
            c.greeting == "b2",
            "new connection {k} reached {}",
            c.greeting
        );
    }
    drop(held.remove("b1"));
    let closed = Instant::now();
    let Some((status, done)) = disable.wait(Duration::from_secs(15))? else {
        bail!(
            "disable --wait still waits 15 s after b1's NAT connection closed: {:?}",
            lab.lbctl_backend("api", "b1")
        );
    };
    println!(
        "disable --wait returned {status} {:.2?} after the close",
        done - closed
    );
    ensure!(status.success(), "disable --wait: {}", disable.stderr());
    Ok(())
}

const KEY: &[u8] = b"lab nat sync key, at least 16 bytes\n";
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);

/// `node`'s config: both NAT services, `[sync]` with the other LB, `[vrrp]` (lb 150,
/// lb2 100).
fn pair_config(lab: &Lab, node: Node) -> Result<String> {
    let other = if node == Node::Lb {
        Node::Lb2
    } else {
        Node::Lb
    };
    let mut file = lab.config_file(node, "native", &[nat4(3), nat6(3)]);
    file.sync = Some(SyncSection::new(
        [IpAddr::V4(addr4(other))],
        lab.key_file("sync.key", KEY)?,
    ));
    let priority = if node == Node::Lb { 150 } else { 100 };
    file.vrrp = Some(VrrpSection::new(51, priority));
    Ok(file.to_toml())
}

fn is_master(s: &Status) -> bool {
    s.vrrp
        .as_ref()
        .is_some_and(|v| v.state == VrrpState::Master)
        && s.serving
}

fn in_step(s: &Status) -> bool {
    s.sync
        .as_ref()
        .is_some_and(|y| y.peers.iter().all(|p| p.connected && p.admin_in_step))
}

/// Established NAT connections (IPv4 and IPv6, one on each backend) survive a SIGKILL
/// of the master: their pairs reached the backup through `[sync]`, and the backup,
/// once master, translates both directions as the old master did.
#[test]
fn nat_connections_survive_a_sigkill_of_the_master() -> Result<()> {
    if !lb_tests::require_root("nat_connections_survive_a_sigkill_of_the_master") {
        return Ok(());
    }
    let lab = lab(3, true)?;
    let mut lb = lab.spawn_agent_on(Node::Lb, &pair_config(&lab, Node::Lb)?)?;
    lab.wait_status_on(Node::Lb, "master", TAKEOVER_WAIT, is_master)?;
    let _lb2 = lab.spawn_agent_on(Node::Lb2, &pair_config(&lab, Node::Lb2)?)?;
    for node in [Node::Lb, Node::Lb2] {
        lab.wait_status_on(node, "sync in step", TAKEOVER_WAIT, in_step)?;
    }
    lab.wait_backends_up("api", &["b1", "b2", "b3"], UP_TIMEOUT)?;
    lab.wait_backends_up("api6", &["b1", "b2", "b3"], UP_TIMEOUT)?;
    let mut held = Vec::new();
    for vip in [
        SocketAddr::from((VIP4, SERVICE_PORT)),
        (VIP6, SERVICE_PORT).into(),
    ] {
        let conns = with_diagnostics(&lab, lab.one_per_backend(vip, &["b1", "b2", "b3"], 200))?;
        held.extend(
            conns
                .into_iter()
                .map(|(name, c)| (format!("{vip} {name}"), c)),
        );
    }
    for (name, c) in held.iter_mut() {
        with_diagnostics(&lab, c.check_echo(&format!("before {name}")))?;
    }
    // Every held flow is in lb2's NAT table (the connections opened to find one per
    // backend are there too, closing).
    let (took, _) = lab.wait_status_on(
        Node::Lb2,
        "the NAT flows synced",
        Duration::from_secs(5),
        |s| s.flows.nat_flows >= held.len() as u64,
    )?;
    println!("lb2 holds the NAT flows {took:?} after the echoes");

    let replies = |s: &Status| s.events.get("nat_reply").copied().unwrap_or(0);
    let before = replies(&lab.lbctl_status_on(Node::Lb2)?);
    lb.kill()?;
    let killed = Instant::now();
    lab.wait_status_on(Node::Lb2, "master", TAKEOVER_WAIT, is_master)?;
    println!("lb2 master {:?} after the SIGKILL", killed.elapsed());
    let mut failures = Vec::new();
    for (name, c) in held.iter_mut() {
        if let Err(e) = c.check_echo(&format!("after {name}")) {
            failures.push(format!("{name}: {e:#}"));
        }
    }
    ensure!(
        failures.is_empty(),
        "established NAT connections lost in the failover:\n{}\n{}",
        failures.join("\n"),
        lab.diagnostics()
    );
    println!(
        "{} established NAT connections kept ({:?} after the kill)",
        held.len(),
        killed.elapsed()
    );
    // It was lb2 that translated the backends' answers, from the synced pairs.
    let after = replies(&lab.lbctl_status_on(Node::Lb2)?);
    ensure!(
        after >= before + held.len() as u64,
        "lb2 translated {} replies after the failover, fewer than the {} echoes",
        after - before,
        held.len()
    );
    // New connections go through lb2 as well.
    for vip in [
        SocketAddr::from((VIP4, SERVICE_PORT)),
        (VIP6, SERVICE_PORT).into(),
    ] {
        let c = lab
            .converse(vip)
            .with_context(|| format!("a new connection to {vip} via lb2"))?;
        ensure!(c.greeting.starts_with('b'), "{vip}: {}", c.greeting);
    }
    Ok(())
}

/// The NAT flows' entries in the LB's pinned table (`NAT_FLOWS`), read as the agent
/// left them.
fn nat_entries(lab: &Lab) -> Result<Vec<(FlowKey, NatFlow)>> {
    pinned_entries(lab, names::MAP_NAT_FLOWS)
}

/// The entries of the LB's pinned hash map `name`.
fn pinned_entries<V: aya::Pod>(lab: &Lab, name: &str) -> Result<Vec<(FlowKey, V)>> {
    let pins = PinDir::new(&lab.bpffs_dir_of(Node::Lb), "eth0");
    let path = pins.dir().join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map: AyaHashMap<MapData, FlowKey, V> = AyaHashMap::try_from(Map::HashMap(data))?;
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {name}"))
}

/// Each NAT flow keeps the FIB's next hop for both directions in its entries (the
/// backend's MAC one way in the forward entry, the client's the other in the reverse
/// one, from the LB's MAC, out of `eth0`),
/// and asks again once that copy is older than `NAT_HOP_TTL_JIFFIES` (at most
/// `NAT_HOP_TTL_MAX_NS`): when the backend takes a new MAC and the LB host's neighbour entry says so, the held connection
/// goes on, its packets to the new MAC.
#[test]
fn nat_flows_cache_their_next_hops_and_follow_a_change() -> Result<()> {
    if !lb_tests::require_root("nat_flows_cache_their_next_hops_and_follow_a_change") {
        return Ok(());
    }
    let lab = lab(1, false)?;
    let _agent = lab.spawn_agent(&lab.config("native", &[nat4(1)]))?;
    lab.wait_backends_up("api", &["b1"], UP_TIMEOUT)?;
    let vip = SocketAddr::from((VIP4, SERVICE_PORT));
    let mut held = with_diagnostics(&lab, lab.one_per_backend(vip, &["b1"], 20))?;
    let c = held.get_mut("b1").context("no connection to b1")?;
    with_diagnostics(&lab, c.check_echo("before"))?;

    let b1 = Node::Backend(1);
    let (lb_mac, client_mac, old_mac) = (
        lab.mac_bytes_of(Node::Lb)?,
        lab.mac_bytes_of(Node::Client)?,
        lab.mac_bytes_of(b1)?,
    );
    let lb_ifindex: u32 = lab
        .run(Node::Lb, &["cat", "/sys/class/net/eth0/ifindex"])?
        .trim()
        .parse()
        .context("eth0's ifindex")?;
    let entries = nat_entries(&lab)?;
    let replies: Vec<(FlowKey, NatReply)> = pinned_entries(&lab, names::MAP_NAT_REVERSE)?;
    let cached: Vec<(&NatFlow, &NatReply)> = entries
        .iter()
        .filter_map(|(k, e)| {
            let rev = lb_userspace::nat::reverse_key(k, e);
            let (_, r) = replies.iter().find(|(key, _)| *key == rev)?;
            (r.client == *k && e.to_backend.at_jiffies != 0 && r.to_client.at_jiffies != 0)
                .then_some((e, r))
        })
        .collect();
    ensure!(
        !cached.is_empty(),
        "no NAT flow with both next hops cached: {entries:?} {replies:?}"
    );
    for (e, r) in &cached {
        ensure!(
            (e.to_backend.dmac, e.to_backend.smac, e.to_backend.ifindex)
                == (old_mac, lb_mac, lb_ifindex),
            "towards the backend: {:?}",
            e.to_backend
        );
        ensure!(
            (r.to_client.dmac, r.to_client.smac, r.to_client.ifindex)
                == (client_mac, lb_mac, lb_ifindex),
            "towards the client: {:?}",
            r.to_client
        );
    }

    // The backend takes a new MAC; the LB host learns it.
    let new_mac = "02:77:00:00:b1:01";
    lab.run(
        b1,
        &["ip", "link", "set", "dev", "eth0", "address", new_mac],
    )?;
    lab.run(
        Node::Lb,
        &[
            "ip",
            "neigh",
            "replace",
            &addr4(b1).to_string(),
            "lladdr",
            new_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    // The copies made by the last echo are old by now.
    let changed = Instant::now();
    thread::sleep(Duration::from_nanos(NAT_HOP_TTL_MAX_NS) + Duration::from_millis(200));
    with_diagnostics(&lab, c.check_echo("after"))?;
    println!(
        "echo answered {} ms after the backend's MAC changed",
        changed.elapsed().as_millis()
    );
    let new = parse_mac(new_mac)?;
    ensure!(
        nat_entries(&lab)?
            .iter()
            .any(|(_, e)| e.to_backend.dmac == new),
        "no NAT flow's next hop is the backend's new MAC"
    );
    Ok(())
}
