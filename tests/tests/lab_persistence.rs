//! Client-address persistence (`persistence_timeout_s`) end to end in the namespace lab:
//! a client keeps its backend across connections while the ring changes under it (a
//! backend joins, its backend's weight drops), while the same client on a service
//! without persistence follows the ring; a disabled backend gets no persistent client's
//! new connection; and after the master's SIGKILL the backup, which got the entries
//! through `[sync]`, still sends the client to its backend. Needs root; see
//! `lb_tests::lab`.
//!
//! Every loop is bounded in count and time; the test prints what it saw.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    net::{IpAddr, SocketAddr},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use lb_tests::lab::{
    AgentGuard, Lab, Node, SERVICE_PORT, Service, SyncSection, VIP4, VIP6, VrrpSection, addr4,
};
use lb_userspace::{
    protocol::{ServiceStatus, Status},
    vrrp::VrrpState,
};

const PERSIST_S: u32 = 300;
/// The service without persistence listens here (same VIP, same backends).
const PLAIN_PORT: u16 = 8081;
const UP_WAIT: Duration = Duration::from_secs(10);
/// The flow scanner counts live entries once a second.
const SCAN_WAIT: Duration = Duration::from_secs(5);
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);
/// Connections per phase.
const CONNECTIONS: usize = 20;
const SYNC_KEY: &[u8] = b"lab persistence sync key, 16+ bytes\n";

fn addr(vip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    (vip.into(), port).into()
}

/// `n` short connections from the client to `to`: the backend each reached, in order.
fn connections(lab: &Lab, to: SocketAddr, n: usize) -> Result<Vec<String>> {
    (0..n)
        .map(|i| {
            lab.ask_backend(to)
                .with_context(|| format!("connection {i} to {to}"))
        })
        .collect()
}

fn tally(seen: &[String]) -> BTreeMap<&str, usize> {
    let mut t = BTreeMap::new();
    for b in seen {
        *t.entry(b.as_str()).or_insert(0) += 1;
    }
    t
}

fn service<'s>(status: &'s Status, name: &str) -> Option<&'s ServiceStatus> {
    status.services.iter().find(|s| s.name == name)
}

fn persistent_clients(status: &Status, name: &str) -> u64 {
    service(status, name).map_or(0, |s| s.persistent_clients)
}

/// The sticky services (IPv4 and IPv6) and the plain one, with these weights for b1..b3
/// (0: not in the service).
fn services(weights: [u32; 3]) -> Vec<Service> {
    let with = |mut s: Service| {
        for (i, w) in weights.iter().enumerate() {
            if *w > 0 {
                s = s.backend(i + 1, *w);
            }
        }
        s
    };
    vec![
        with(Service::new("sticky", VIP4, SERVICE_PORT).persistence(PERSIST_S)),
        with(Service::new("sticky6", VIP6, SERVICE_PORT).persistence(PERSIST_S)),
        with(Service::new("plain", VIP4, PLAIN_PORT)),
    ]
}

fn number_of(backend: &str) -> Result<usize> {
    backend
        .strip_prefix('b')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("{backend:?} is not a lab backend"))
}

#[test]
fn persistence_across_ring_changes() -> Result<()> {
    if !lb_tests::require_root("persistence_across_ring_changes") {
        return Ok(());
    }
    let lab = Lab::builder().backends(3).build()?;
    lab.start_servers(SERVICE_PORT)?;
    lab.start_servers(PLAIN_PORT)?;
    let mut agent = lab.spawn_agent(&lab.config("native", &services([100, 100, 0])))?;
    let result = ring_changes(&lab, &mut agent);
    if result.is_err() {
        eprintln!(
            "--- lb-agent log ---\n{}\n{}",
            agent.log(),
            lab.diagnostics()
        );
    }
    result
}

fn ring_changes(lab: &Lab, agent: &mut AgentGuard<'_>) -> Result<()> {
    for s in ["sticky", "sticky6", "plain"] {
        lab.wait_backends_up(s, &["b1", "b2"], UP_WAIT)?;
    }
    let sticky = [
        ("sticky", addr(VIP4, SERVICE_PORT)),
        ("sticky6", addr(VIP6, SERVICE_PORT)),
    ];
    let plain = addr(VIP4, PLAIN_PORT);

    // Before: each sticky service keeps the client on its first backend; the plain one
    // spreads the same client's connections over both.
    let mut first = BTreeMap::new();
    for (name, to) in sticky {
        let seen = connections(lab, to, CONNECTIONS)?;
        println!("{name} before the change: {:?}", tally(&seen));
        ensure!(
            seen.iter().all(|b| *b == seen[0]),
            "{name}: one client address reached several backends: {:?}",
            tally(&seen)
        );
        first.insert(name, seen[0].clone());
    }
    let seen = connections(lab, plain, CONNECTIONS)?;
    println!("plain before the change: {:?}", tally(&seen));
    ensure!(
        tally(&seen).len() == 2,
        "without persistence the ring spreads one client's connections: {:?}",
        tally(&seen)
    );
    let (took, status) = lab.wait_status_on(Node::Lb, "live entries counted", SCAN_WAIT, |s| {
        persistent_clients(s, "sticky") == 1 && persistent_clients(s, "sticky6") == 1
    })?;
    println!("status: one live client per sticky service, {took:?} after the connections");
    let plain_status = service(&status, "plain").ok_or_else(|| anyhow!("no plain service"))?;
    ensure!(
        (
            plain_status.persistence_timeout_s,
            plain_status.persistent_clients
        ) == (0, 0),
        "plain: {plain_status:?}"
    );
    ensure!(
        service(&status, "sticky").map(|s| s.persistence_timeout_s) == Some(PERSIST_S),
        "sticky: {:?}",
        service(&status, "sticky")
    );
    let text = lab.lbctl_ok(&["status"])?;
    ensure!(
        text.contains(&format!(
            "persistence {PERSIST_S} s: 1 client address(es) keep their backend"
        )),
        "lbctl status says:\n{text}"
    );

    // The ring changes: b3 joins, and the sticky services' backends drop to weight 1 (on
    // every service, so that the plain one shows where the ring now sends the client:
    // hardly ever there).
    let mut weights = [100, 100, 100];
    for b in first.values() {
        weights[number_of(b)? - 1] = 1;
    }
    let said = agent.reload(&lab.config("native", &services(weights)))?;
    println!("reload: {said}");
    lab.wait_backends_up("plain", &["b1", "b2", "b3"], UP_WAIT)?;
    let seen = connections(lab, plain, 2 * CONNECTIONS)?;
    let after = tally(&seen);
    println!("plain after the change: {after:?}");
    let on_first = after.get(first["sticky"].as_str()).copied().unwrap_or(0);
    ensure!(
        on_first <= 4 && after.contains_key("b3"),
        "the ring did not move as configured (weight 1 for {}, b3 added): {after:?}",
        first["sticky"]
    );
    for (name, to) in sticky {
        let seen = connections(lab, to, CONNECTIONS)?;
        println!("{name} after the change: {:?}", tally(&seen));
        ensure!(
            seen.iter().all(|b| *b == first[name]),
            "{name}: the client left its backend {} after the ring changed: {:?}",
            first[name],
            tally(&seen)
        );
    }

    // Its backend disabled (draining): the client's next connections go where the ring
    // says, and stay together on the new choice.
    lab.lbctl_ok(&["backend", "disable", "sticky", first["sticky"].as_str()])?;
    let deadline = Instant::now() + UP_WAIT;
    while lab.lbctl_backend("sticky", &first["sticky"])?.in_ring {
        ensure!(Instant::now() < deadline, "the disable took no effect");
        thread::sleep(Duration::from_millis(20));
    }
    let seen = connections(lab, sticky[0].1, CONNECTIONS)?;
    println!(
        "sticky with {} disabled: {:?}",
        first["sticky"],
        tally(&seen)
    );
    ensure!(
        seen[0] != first["sticky"] && seen.iter().all(|b| *b == seen[0]),
        "a disabled backend's client must be re-chosen once and stay: {:?}",
        tally(&seen)
    );
    Ok(())
}

// ---- failover -------------------------------------------------------------------------

fn lb_addr(node: Node) -> IpAddr {
    IpAddr::V4(addr4(node))
}

fn key_file(lab: &Lab) -> Result<PathBuf> {
    let path = lab.dir().join("sync.key");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(SYNC_KEY)?;
    Ok(path)
}

/// `node`'s config: the sticky IPv4 service on b1..b3, `[sync]` with the other LB host,
/// `[vrrp]` with priority 150 on lb, 100 on lb2.
fn pair_config(lab: &Lab, node: Node) -> Result<String> {
    let services = [Service::new("sticky", VIP4, SERVICE_PORT)
        .backends(1..=3)
        .persistence(PERSIST_S)];
    let mut file = lab.config_file(node, "native", &services);
    let peer = if node == Node::Lb {
        Node::Lb2
    } else {
        Node::Lb
    };
    file.sync = Some(SyncSection::new([lb_addr(peer)], key_file(lab)?));
    let priority = if node == Node::Lb { 150 } else { 100 };
    file.vrrp = Some(VrrpSection::new(51, priority));
    Ok(file.to_toml())
}

fn is_master(s: &Status) -> bool {
    s.serving
        && s.vrrp
            .as_ref()
            .is_some_and(|v| v.state == VrrpState::Master)
}

fn in_step(s: &Status) -> bool {
    s.sync
        .as_ref()
        .is_some_and(|y| !y.peers.is_empty() && y.peers.iter().all(|p| p.connected))
}

#[test]
fn persistence_survives_a_failover_through_sync() -> Result<()> {
    if !lb_tests::require_root("persistence_survives_a_failover_through_sync") {
        return Ok(());
    }
    let lab = Lab::builder().backends(3).second_lb(true).build()?;
    lab.start_servers(SERVICE_PORT)?;
    let mut agents: Vec<(Node, AgentGuard<'_>)> = Vec::new();
    let result = failover(&lab, &mut agents);
    if result.is_err() {
        for (node, a) in &agents {
            eprintln!("--- lb-agent in {node:?} ---\n{}", a.log());
        }
        eprintln!("{}", lab.diagnostics());
    }
    result
}

fn failover<'lab>(lab: &'lab Lab, agents: &mut Vec<(Node, AgentGuard<'lab>)>) -> Result<()> {
    agents.push((
        Node::Lb,
        lab.spawn_agent_on(Node::Lb, &pair_config(lab, Node::Lb)?)?,
    ));
    lab.wait_status_on(Node::Lb, "master", TAKEOVER_WAIT, is_master)?;
    agents.push((
        Node::Lb2,
        lab.spawn_agent_on(Node::Lb2, &pair_config(lab, Node::Lb2)?)?,
    ));
    for node in [Node::Lb, Node::Lb2] {
        lab.wait_status_on(node, "sync connected", TAKEOVER_WAIT, in_step)?;
    }
    lab.wait_backends_up("sticky", &["b1", "b2", "b3"], UP_WAIT)?;
    let to = addr(VIP4, SERVICE_PORT);

    let first = lab.ask_backend(to).context("first connection")?;
    // Its backend's weight drops to 1 on both hosts: without the entry, the ring would
    // send new connections elsewhere (on 1 in 201 of its slots it stays there).
    let said = lab.lbctl_ok(&["backend", "weight", "sticky", first.as_str(), "1"])?;
    ensure!(
        said.contains("applied on 2 of 2 hosts"),
        "lbctl said: {said}"
    );
    let seen = connections(lab, to, CONNECTIONS)?;
    println!("on lb, weight of {first} 1: {:?}", tally(&seen));
    ensure!(
        seen.iter().all(|b| *b == first),
        "the master let the client leave {first}: {:?}",
        tally(&seen)
    );
    let (took, lb2) = lab.wait_status_on(Node::Lb2, "the entry synced", SCAN_WAIT, |s| {
        persistent_clients(s, "sticky") == 1
    })?;
    println!(
        "lb2 holds the client's entry {took:?} later (received {})",
        lb2.sync
            .as_ref()
            .map_or(0, |y| y.counters.persistence_received)
    );

    let lb = agents
        .iter_mut()
        .find(|(n, _)| *n == Node::Lb)
        .ok_or_else(|| anyhow!("no agent on lb"))?;
    lb.1.kill()?;
    let killed = Instant::now();
    lab.wait_status_on(Node::Lb2, "master", TAKEOVER_WAIT, is_master)?;
    println!("lb2 master {:?} after the kill", killed.elapsed());
    // The first connections may still race the takeover: a bounded wait for one answer.
    let deadline = Instant::now() + TAKEOVER_WAIT;
    while lab.ask_backend(to).is_err() {
        ensure!(Instant::now() < deadline, "no answer from lb2");
    }
    let seen = connections(lab, to, CONNECTIONS)?;
    println!("on lb2 after the failover: {:?}", tally(&seen));
    ensure!(
        seen.iter().all(|b| *b == first),
        "after the failover the client left {first}: {:?}",
        tally(&seen)
    );
    Ok(())
}
