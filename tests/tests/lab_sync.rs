//! One LB pair, one state (`[sync]`), end to end in the namespace lab: `lb` (10.77.0.3,
//! VRRP priority 150) and `lb2` (10.77.0.4, priority 100) share admin changes and flow
//! pins over authenticated UDP. An operator's change on either host shows on the other
//! within a second and says on how many hosts it is applied; a drained backend's
//! long-lived connection survives the master's SIGKILL because its pin was synced; a
//! partition with changes on both sides converges once it heals; and forged, replayed,
//! garbage and oversized sync messages are dropped and counted. Needs root; see
//! `lb_tests::lab`.

use std::{
    fs,
    net::{IpAddr, SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, ensure};
use lb_tests::lab::{
    AgentGuard, Lab, Node, SERVICE_PORT, Service, SyncSection, VIP4, VrrpSection, addr4,
    parse_backends_json, try_in_ns,
};
use lb_userspace::{
    admin::{AdminBackend, Version},
    config::{BackendId, DEFAULT_SYNC_PORT},
    protocol::{BackendStatus, Status, SyncStatus},
    sync::wire::{self, AdminEntry, Body, Message},
    vrrp::{VrrpState, auth::AuthKey},
};

const KEY: &[u8] = b"lab sync key, at least 16 bytes\n";
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);
/// The bound for a change to show on the other host.
const APPLY_WAIT: Duration = Duration::from_secs(1);

fn services() -> Vec<Service> {
    vec![Service::new("web", VIP4, SERVICE_PORT).backends(1..=3)]
}

fn vip() -> SocketAddr {
    (VIP4, SERVICE_PORT).into()
}

fn lb_addr(node: Node) -> IpAddr {
    IpAddr::V4(addr4(node))
}

fn other(node: Node) -> Node {
    if node == Node::Lb {
        Node::Lb2
    } else {
        Node::Lb
    }
}

/// `node`'s config: the lab services, `[sync]` with the other LB host, and `[vrrp]`
/// (priority 150 on lb, 100 on lb2) unless `vrrp` is false.
fn config(lab: &Lab, node: Node, vrrp: bool) -> Result<String> {
    let mut file = lab.config_file(node, "native", &services());
    file.sync = Some(SyncSection::new(
        [lb_addr(other(node))],
        lab.key_file("sync.key", KEY)?,
    ));
    if vrrp {
        let priority = if node == Node::Lb { 150 } else { 100 };
        file.vrrp = Some(VrrpSection::new(51, priority));
    }
    Ok(file.to_toml())
}

fn sync_of(s: &Status) -> Result<&SyncStatus> {
    s.sync
        .as_ref()
        .ok_or_else(|| anyhow!("lbctl status shows no sync: {s:#?}"))
}

fn in_step(s: &Status) -> bool {
    s.sync
        .as_ref()
        .is_some_and(|y| y.peers.iter().all(|p| p.connected && p.admin_in_step))
}

fn is_master(s: &Status) -> bool {
    s.vrrp
        .as_ref()
        .is_some_and(|v| v.state == VrrpState::Master)
        && s.serving
}

fn backends_on(lab: &Lab, node: Node) -> Result<Vec<BackendStatus>> {
    parse_backends_json(&lab.lbctl_ok_on(node, &["--json", "backend", "list", "web"])?)
}

/// Polls `node`'s backend list until `done` holds for it; how long that took.
fn wait_backends_on(
    lab: &Lab,
    node: Node,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[BackendStatus]) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let all = backends_on(lab, node)?;
        if done(&all) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(anyhow!(
                "{node:?}: not {what} after {timeout:?}: {:#?}",
                all.iter()
                    .map(|b| (&b.name, b.enabled, b.weight))
                    .collect::<Vec<_>>()
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn backend<'a>(all: &'a [BackendStatus], name: &str) -> Option<&'a BackendStatus> {
    all.iter().find(|b| b.name == name)
}

fn enabled(all: &[BackendStatus], name: &str) -> Option<bool> {
    backend(all, name).map(|b| b.enabled)
}

/// The agents of one test; their logs and sync status are printed if it fails.
struct Pair<'lab> {
    lab: &'lab Lab,
    agents: Vec<(Node, AgentGuard<'lab>)>,
    finished: bool,
}

impl<'lab> Pair<'lab> {
    fn new(lab: &'lab Lab) -> Self {
        Pair {
            lab,
            agents: Vec::new(),
            finished: false,
        }
    }

    fn start(&mut self, node: Node, config: &str) -> Result<()> {
        let agent = self.lab.spawn_agent_on(node, config)?;
        self.agents.push((node, agent));
        Ok(())
    }

    fn kill(&mut self, node: Node) -> Result<()> {
        let a = self
            .agents
            .iter_mut()
            .rev()
            .find(|(n, a)| *n == node && a.pid().is_some())
            .ok_or_else(|| anyhow!("no agent in {node:?}"))?;
        a.1.kill()?;
        Ok(())
    }

    /// lb master, then lb2 backup, both in step.
    fn start_both(&mut self) -> Result<()> {
        self.start(Node::Lb, &config(self.lab, Node::Lb, true)?)?;
        self.lab
            .wait_status_on(Node::Lb, "master", TAKEOVER_WAIT, is_master)?;
        self.start(Node::Lb2, &config(self.lab, Node::Lb2, true)?)?;
        for node in [Node::Lb, Node::Lb2] {
            self.lab
                .wait_status_on(node, "sync in step", TAKEOVER_WAIT, in_step)?;
        }
        Ok(())
    }
}

impl Drop for Pair<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut report = String::from("\n===== sync test failed: logs =====\n");
        for (node, agent) in &self.agents {
            report += &format!("--- lb-agent in {node:?} ---\n{}\n", agent.log());
        }
        for node in [Node::Lb, Node::Lb2] {
            if let Ok(s) = self.lab.lbctl_status_on(node) {
                report += &format!("--- sync status of {node:?} ---\n{:#?}\n", s.sync);
            }
        }
        eprintln!("{report}");
    }
}

fn sync_lab() -> Result<Lab> {
    let lab = Lab::builder().backends(3).second_lb(true).build()?;
    lab.start_servers(SERVICE_PORT)?;
    Ok(lab)
}

#[test]
fn admin_changes_and_pins_follow_the_pair_through_a_failover() -> Result<()> {
    if !lb_tests::require_root("admin_changes_and_pins_follow_the_pair") {
        return Ok(());
    }
    let lab = sync_lab()?;
    let mut pair = Pair::new(&lab);
    pair.start_both()?;
    lab.wait_backends_up("web", &["b1", "b2", "b3"], Duration::from_secs(5))?;

    // An idle long-lived connection, on the backend about to be drained.
    let mut conversation = lab.converse(vip()).context("long-lived connection")?;
    let drained = conversation.greeting.clone();
    let said = lab.lbctl_ok_on(Node::Lb, &["backend", "disable", "web", drained.as_str()])?;
    ensure!(
        said.contains("applied on 2 of 2 hosts"),
        "lbctl said: {said}"
    );
    let took = wait_backends_on(&lab, Node::Lb2, "disabled on lb2", APPLY_WAIT, |all| {
        enabled(all, &drained) == Some(false)
    })?;
    eprintln!("sync: the disable of {drained} showed on lb2 after {took:?} (lbctl: {said})");
    let state_dir = lab.state_dir_of(Node::Lb2);
    let saved = fs::read_to_string(state_dir.join("admin.json"))?;
    ensure!(
        saved.contains("\"disabled\": true"),
        "lb2's admin.json: {saved}"
    );

    // The drained flow's pin reaches lb2's pinned table.
    let (took, _) = lab.wait_status_on(
        Node::Lb2,
        "the pin synced",
        Duration::from_millis(1500),
        |s| {
            s.flows.pinned >= 1
                && s.sync
                    .as_ref()
                    .is_some_and(|y| y.counters.flows_received >= 1)
        },
    )?;
    eprintln!("sync: lb2 holds the pin {took:?} later");
    thread::sleep(Duration::from_millis(500));

    pair.kill(Node::Lb)?;
    let killed = Instant::now();
    lab.wait_status_on(Node::Lb2, "master", TAKEOVER_WAIT, is_master)?;
    eprintln!("sync: lb2 master {:?} after the kill", killed.elapsed());
    let echo = conversation
        .echo("still there?")
        .context("the drained backend's connection after the failover")?;
    ensure!(echo == "still there?", "echo: {echo:?}");
    for i in 0..30 {
        let who = lab
            .ask_backend(vip())
            .with_context(|| format!("new connection {i}"))?;
        ensure!(
            who != drained,
            "a new connection reached the drained {drained}"
        );
    }

    // lb comes back holding the disable, and takes over again. Its pinned maps are
    // removed first (a host rebuilt, or `--detach`ed), so the drained flow's pin can
    // only come from lb2, which sends every pin to a peer that reconnects.
    fs::remove_dir_all(lab.bpffs_dir_of(Node::Lb)).context("removing lb's pinned maps")?;
    pair.start(Node::Lb, &config(&lab, Node::Lb, true)?)?;
    lab.wait_status_on(Node::Lb, "master again", TAKEOVER_WAIT, is_master)?;
    ensure!(enabled(&backends_on(&lab, Node::Lb)?, &drained) == Some(false));
    lab.wait_status_on(Node::Lb2, "sync in step", TAKEOVER_WAIT, in_step)?;
    let back = lab.lbctl_status_on(Node::Lb)?;
    ensure!(
        back.flows.synced_pins_installed >= 1,
        "lb came back without lb2's pins: {:?}",
        back.flows
    );
    let echo = conversation
        .echo("and back?")
        .context("the drained backend's connection after lb took over again")?;
    ensure!(echo == "and back?", "echo: {echo:?}");

    // An enable on the backup reaches the master.
    let said = lab.lbctl_ok_on(Node::Lb2, &["backend", "enable", "web", drained.as_str()])?;
    ensure!(
        said.contains("applied on 2 of 2 hosts"),
        "lbctl said: {said}"
    );
    let took = wait_backends_on(&lab, Node::Lb, "enabled on lb", APPLY_WAIT, |all| {
        enabled(all, &drained) == Some(true)
    })?;
    eprintln!("sync: the enable on lb2 showed on lb after {took:?}");
    let weight = lab.lbctl_ok_on(Node::Lb, &["backend", "weight", "web", "b1", "250"])?;
    ensure!(
        weight.contains("applied on 2 of 2 hosts"),
        "lbctl said: {weight}"
    );
    wait_backends_on(&lab, Node::Lb2, "weight 250 on lb2", APPLY_WAIT, |all| {
        backend(all, "b1").is_some_and(|b| b.weight == 250)
    })?;
    pair.finished = true;
    Ok(())
}

/// Drops sync traffic in and out of `node`'s namespace (or lets it through again).
fn partition(lab: &Lab, node: Node, on: bool) -> Result<()> {
    let op = if on { "-A" } else { "-D" };
    let port = DEFAULT_SYNC_PORT.to_string();
    for (chain, dir) in [("INPUT", "--dport"), ("OUTPUT", "--dport")] {
        lab.run(
            node,
            &[
                "iptables",
                op,
                chain,
                "-p",
                "udp",
                dir,
                port.as_str(),
                "-j",
                "DROP",
            ],
        )?;
    }
    Ok(())
}

#[test]
fn a_partition_with_changes_on_both_sides_converges_when_it_heals() -> Result<()> {
    if !lb_tests::require_root("a_partition_converges") {
        return Ok(());
    }
    let lab = sync_lab()?;
    let mut pair = Pair::new(&lab);
    pair.start_both()?;
    partition(&lab, Node::Lb2, true)?;
    let result = (|| -> Result<()> {
        let lb2 = lb_addr(Node::Lb2).to_string();
        let said = lab.lbctl_ok_on(Node::Lb, &["backend", "disable", "web", "b1"])?;
        ensure!(
            said.contains("applied on 1 of 2 hosts") && said.contains(&lb2),
            "lbctl said: {said}"
        );
        lab.lbctl_ok_on(Node::Lb, &["backend", "disable", "web", "b2"])?;
        thread::sleep(Duration::from_millis(50));
        // Later, on the other side: b2 gets a weight (and stays enabled there), b3 too.
        lab.lbctl_ok_on(Node::Lb2, &["backend", "weight", "web", "b2", "50"])?;
        let said = lab.lbctl_ok_on(Node::Lb2, &["backend", "weight", "web", "b3", "7"])?;
        ensure!(said.contains("not confirmed by"), "lbctl said: {said}");
        ensure!(enabled(&backends_on(&lab, Node::Lb2)?, "b1") == Some(true));
        lab.wait_status_on(Node::Lb, "peer disconnected", Duration::from_secs(3), |s| {
            s.sync
                .as_ref()
                .is_some_and(|y| y.peers.iter().all(|p| !p.connected))
        })?;
        Ok(())
    })();
    partition(&lab, Node::Lb2, false)?;
    result?;
    let healed = Instant::now();
    let converged = |all: &[BackendStatus]| {
        enabled(all, "b1") == Some(false)
            // The later change wins the whole entry: b2 enabled, weight 50.
            && backend(all, "b2").is_some_and(|b| b.enabled && b.weight == 50)
            && backend(all, "b3").is_some_and(|b| b.weight == 7)
    };
    for node in [Node::Lb, Node::Lb2] {
        wait_backends_on(&lab, node, "converged", Duration::from_secs(4), converged)?;
    }
    for node in [Node::Lb, Node::Lb2] {
        lab.wait_status_on(node, "in step", Duration::from_secs(3), in_step)?;
    }
    eprintln!(
        "sync: both hosts converged {:?} after the partition healed",
        healed.elapsed()
    );
    pair.finished = true;
    Ok(())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A message from lb2's address, signed with `key`.
fn message(key: &AuthKey, sender: IpAddr, body: Body) -> Result<Vec<u8>> {
    let msg = Message {
        sender,
        seq: now_us(),
        body,
    };
    Ok(wire::encode(&msg, key)?)
}

fn send_from(lab: &Lab, node: Node, datagrams: &[Vec<u8>]) -> Result<()> {
    let to = SocketAddr::new(lb_addr(Node::Lb), DEFAULT_SYNC_PORT);
    let from = SocketAddr::new(IpAddr::V4(addr4(node)), 0);
    let datagrams = datagrams.to_vec();
    try_in_ns(&lab.ns(node), move || {
        let socket = UdpSocket::bind(from)?;
        for d in &datagrams {
            socket.send_to(d, to)?;
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    })?;
    Ok(())
}

#[test]
fn forged_replayed_garbage_and_oversized_messages_are_dropped_and_counted() -> Result<()> {
    if !lb_tests::require_root("forged_sync_messages") {
        return Ok(());
    }
    let lab = sync_lab()?;
    let mut pair = Pair::new(&lab);
    // lb alone, without [vrrp]; lb2's address is its peer, and the test speaks for it.
    pair.start(Node::Lb, &config(&lab, Node::Lb, false)?)?;
    lab.wait_status_on(Node::Lb, "ready", Duration::from_secs(5), |s| {
        s.sync.is_some()
    })?;
    let key = AuthKey::parse(KEY)?;
    let wrong = AuthKey::from_bytes(b"not the lab's key, 16+".to_vec())?;
    let lb2 = lb_addr(Node::Lb2);
    let entry = |address: IpAddr| AdminEntry {
        id: BackendId {
            service: "web".into(),
            address,
        },
        admin: AdminBackend {
            disabled: true,
            weight: None,
            version: Some(Version {
                ms: now_us() / 1000,
                counter: 0,
                host: lb2,
            }),
        },
    };
    let b1 = addr4(Node::Backend(1)).into();
    let b3 = addr4(Node::Backend(3)).into();
    let forged = message(
        &wrong,
        lb2,
        Body::Update {
            change: 1,
            entries: vec![entry(b3)],
        },
    )?;
    let genuine = message(
        &key,
        lb2,
        Body::Update {
            change: 2,
            entries: vec![entry(b1)],
        },
    )?;
    send_from(&lab, Node::Lb2, &[forged, genuine.clone()])?;
    // The genuine update is applied; the forged one is not.
    wait_backends_on(
        &lab,
        Node::Lb,
        "b1 disabled by the genuine update",
        APPLY_WAIT,
        |all| enabled(all, "b1") == Some(false),
    )?;
    ensure!(enabled(&backends_on(&lab, Node::Lb)?, "b3") == Some(true));
    // The same bytes again, garbage, an oversized datagram; and a genuine message from
    // an address that is no peer (the client's).
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
    let oversized = vec![0x5a; 2000];
    send_from(&lab, Node::Lb2, &[genuine, garbage, oversized])?;
    let stranger = message(
        &key,
        IpAddr::V4(addr4(Node::Client)),
        Body::Ack { change: 9 },
    )?;
    send_from(&lab, Node::Client, &[stranger])?;
    let reasons = [
        "bad_tag",
        "replayed",
        "malformed",
        "oversized",
        "unknown_source",
    ];
    let (_, s) = lab.wait_status_on(
        Node::Lb,
        "every drop counted",
        Duration::from_secs(3),
        |s| {
            s.sync.as_ref().is_some_and(|y| {
                reasons
                    .iter()
                    .all(|r| y.counters.dropped.get(*r) == Some(&1))
            })
        },
    )?;
    let y = sync_of(&s)?;
    eprintln!(
        "sync: dropped {:?}, received {}",
        y.counters.dropped, y.counters.messages_received
    );
    ensure!(y.counters.admin_updates_received == 1, "{:?}", y.counters);
    let human = lab.lbctl_ok_on(Node::Lb, &["status"])?;
    ensure!(
        human.contains("peer 10.77.0.4") && human.contains("bad_tag 1"),
        "lbctl status:\n{human}"
    );
    pair.finished = true;
    Ok(())
}
