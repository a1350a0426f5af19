//! Active-active scale-out end to end (`[announce]`): a router namespace runs BIRD with
//! the shipped `config/bird-router.conf` (`merge paths`, dynamic LB peers) and hashes
//! ECMP on ports (`fib_multipath_hash_policy = 1`); the client sits behind it; two (or
//! three) LB hosts each run BIRD with the shipped `config/bird-lb.conf` and lb-agent
//! with `[announce]` and `[sync]`; the backends hold the VIP on `lo` and route the
//! client's subnet back through the router (DSR). No namespace has a default route.
//!
//! Both hosts carry connections; a graceful stop withdraws a host from the router
//! with no failed probe and no broken connection; a SIGKILLed agent's route goes with
//! its process and clients recover; a third host moves no established connection.
//! Needs root; see `lb_tests::lab`.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use lb_tests::lab::{
    AgentGuard, AnnounceSection, Attempt, BirdGuard, Conversation, Lab, Node, ROUTED_VIP4,
    SERVICE_PORT, Service, SyncSection, VrrpSection, addr4, probe_gap,
};
use lb_userspace::protocol::Status;

/// The agents' routing table, which their BIRD learns.
const TABLE: u32 = 100;
/// BGP sessions come up within seconds (connect delay 1 s); generous for a busy host.
const CONVERGE: Duration = Duration::from_secs(30);
/// How long the router may take to drop a withdrawn host (BIRD hears at once).
const WITHDRAW_BOUND: Duration = Duration::from_secs(3);
/// The documented recovery bound after an agent is killed (README): its routes go
/// with the process and the program forwards meanwhile, so clients should see no gap
/// at all; 3 s leaves room for a slow machine.
const KILL_RECOVERY_BOUND: Duration = Duration::from_secs(3);
const PROBE_EVERY: Duration = Duration::from_millis(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const PROBE_MAX: Duration = Duration::from_secs(60);
const KEY: &[u8] = b"lab announce key, at least 16 bytes\n";
/// Established connections kept open across each event.
const CONVERSATIONS: usize = 30;

fn services() -> Vec<Service> {
    vec![Service::new("web", ROUTED_VIP4, SERVICE_PORT).backends(1..=3)]
}

fn vip() -> SocketAddr {
    (ROUTED_VIP4, SERVICE_PORT).into()
}

fn vip_ip() -> IpAddr {
    IpAddr::V4(ROUTED_VIP4)
}

fn routed_lab(lbs: usize) -> Result<Lab> {
    let lab = Lab::builder()
        .backends(3)
        .ipv6(false)
        .second_lb(true)
        .third_lb(lbs >= 3)
        .routed(true)
        .build()?;
    lab.start_servers(SERVICE_PORT)?;
    Ok(lab)
}

/// `node`'s config: the routed service, `[announce]` in `TABLE`, and `[sync]` with
/// every other LB host of the lab (pins reach a host that joins later too); `[vrrp]`
/// with this priority if given, else none: every host is active.
fn agent_config(lab: &Lab, node: Node, vrrp: Option<u8>) -> Result<String> {
    let mut file = lab.config_file(node, "native", &services());
    let peers = lab
        .lbs()
        .into_iter()
        .filter(|n| *n != node)
        .map(|n| IpAddr::V4(addr4(n)));
    file.sync = Some(SyncSection::new(peers, lab.key_file("sync.key", KEY)?));
    file.announce = Some(AnnounceSection::new(TABLE));
    file.vrrp = vrrp.map(|priority| VrrpSection::new(51, priority));
    Ok(file.to_toml())
}

fn announcing(s: &Status) -> Option<bool> {
    s.announce
        .as_ref()?
        .vips
        .iter()
        .find(|v| v.vip == vip_ip())
        .map(|v| v.announcing)
}

/// The BIRDs and agents of one test; their logs, the router's BGP state and the lab's
/// routes are printed if it fails.
struct Hosts<'lab> {
    lab: &'lab Lab,
    birds: Vec<BirdGuard<'lab>>,
    agents: Vec<(Node, AgentGuard<'lab>)>,
    finished: bool,
}

impl<'lab> Hosts<'lab> {
    fn new(lab: &'lab Lab) -> Result<Self> {
        let mut hosts = Hosts {
            lab,
            birds: Vec::new(),
            agents: Vec::new(),
            finished: false,
        };
        let router = lab.spawn_bird(Node::Router, &lab.bird_router_config()?)?;
        hosts.birds.push(router);
        Ok(hosts)
    }

    /// BIRD, then the agent (with `[vrrp]` at this priority if given), on LB host
    /// `node`.
    fn start_lb(&mut self, node: Node, vrrp: Option<u8>) -> Result<()> {
        let bird = self
            .lab
            .spawn_bird(node, &self.lab.bird_lb_config(node, TABLE)?)?;
        self.birds.push(bird);
        let agent = self
            .lab
            .spawn_agent_on(node, &agent_config(self.lab, node, vrrp)?)?;
        self.agents.push((node, agent));
        Ok(())
    }

    fn agent(&mut self, node: Node) -> Result<&mut AgentGuard<'lab>> {
        self.agents
            .iter_mut()
            .rev()
            .find(|(n, _)| *n == node)
            .map(|(_, a)| a)
            .ok_or_else(|| anyhow!("no agent in {node:?}"))
    }

    /// Starts `lbs` and waits until the router routes the VIP to each of them.
    fn start_all(&mut self, lbs: &[Node]) -> Result<()> {
        for &node in lbs {
            self.start_lb(node, None)?;
        }
        self.lab
            .wait_backends_up("web", &["b1", "b2", "b3"], Duration::from_secs(5))?;
        let took = self.lab.wait_next_hops(vip_ip(), lbs, CONVERGE)?;
        eprintln!(
            "announce: the router routes {} over {lbs:?} ({took:?} after the last start)",
            vip()
        );
        for &node in lbs {
            let s = self.lab.lbctl_status_on(node)?;
            ensure!(
                announcing(&s) == Some(true),
                "{node:?} does not say it announces: {:#?}",
                s.announce
            );
        }
        Ok(())
    }
}

impl Drop for Hosts<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut report = String::from("\n===== announce test failed: logs =====\n");
        for (node, agent) in &self.agents {
            report += &format!("--- lb-agent in {node:?} ---\n{}\n", agent.log());
        }
        for bird in &self.birds {
            report += &format!("--- bird in {:?} ---\n{}\n", bird.node(), bird.log());
            if let Ok(p) = bird.birdc(&["show", "protocols"]) {
                report += &p;
            }
        }
        for node in self.lab.lbs() {
            if let Ok(r) = self
                .lab
                .run(node, &["ip", "route", "show", "table", &TABLE.to_string()])
            {
                report += &format!("--- table {TABLE} of {node:?} ---\n{r}");
            }
        }
        report += &self.lab.diagnostics();
        eprintln!("{report}");
    }
}

/// `n` established connections, each greeted (by the backend it reached).
fn open_conversations(lab: &Lab, n: usize) -> Result<Vec<Conversation>> {
    (0..n)
        .map(|i| {
            lab.converse(vip())
                .with_context(|| format!("opening connection {i}"))
        })
        .collect()
}

/// Every connection still works, on its backend (a connection moved to another
/// backend would be reset there).
fn check_conversations(conversations: &mut [Conversation], when: &str) -> Result<()> {
    for (i, c) in conversations.iter_mut().enumerate() {
        let line = format!("{when} {i}");
        let echo = c
            .echo(&line)
            .with_context(|| format!("connection {i} to {} {when}", c.greeting))?;
        ensure!(echo == line, "connection {i} {when}: echo {echo:?}");
    }
    Ok(())
}

fn failures(attempts: &[Attempt]) -> Vec<String> {
    attempts
        .iter()
        .filter_map(|a| a.outcome.as_ref().err().cloned())
        .collect()
}

/// New flows counted by the service on `node`.
fn new_flows(lab: &Lab, node: Node) -> Result<u64> {
    let s = lab.lbctl_status_on(node)?;
    s.services
        .first()
        .map(|s| s.new_flows)
        .ok_or_else(|| anyhow!("{node:?} has no service"))
}

fn packets(lab: &Lab, node: Node) -> Result<u64> {
    let s = lab.lbctl_status_on(node)?;
    s.services
        .first()
        .map(|s| s.packets)
        .ok_or_else(|| anyhow!("{node:?} has no service"))
}

#[test]
fn both_hosts_carry_connections_and_a_graceful_stop_breaks_none() -> Result<()> {
    if !lb_tests::require_root("both_hosts_carry_connections_and_a_graceful_stop_breaks_none") {
        return Ok(());
    }
    let lab = routed_lab(2)?;
    let mut hosts = Hosts::new(&lab)?;
    hosts.start_all(&[Node::Lb, Node::Lb2])?;
    let text = lab.lbctl_ok_on(Node::Lb, &["status"])?;
    ensure!(
        text.contains(&format!("announce: VIP routes in table {TABLE}"))
            && text.contains(&format!("{}: announcing since ", vip_ip())),
        "lbctl status:\n{text}"
    );

    let spread = lab.spread(vip(), 200, Duration::from_secs(60));
    ensure!(
        spread.failures.is_empty() && spread.succeeded() == 200,
        "connections failed: {:?}",
        spread.failures
    );
    let (on_lb, on_lb2) = (new_flows(&lab, Node::Lb)?, new_flows(&lab, Node::Lb2)?);
    eprintln!("announce: 200 connections: {on_lb} new flows through lb, {on_lb2} through lb2");
    ensure!(
        on_lb > 0 && on_lb2 > 0,
        "ECMP should spread flows over both hosts: lb {on_lb}, lb2 {on_lb2}"
    );

    let mut conversations = open_conversations(&lab, CONVERSATIONS)?;
    let probe = lab.start_probe(vip(), PROBE_EVERY, PROBE_TIMEOUT, PROBE_MAX)?;
    thread::sleep(Duration::from_millis(500));

    hosts.agent(Node::Lb2)?.signal(libc::SIGTERM)?;
    let stopped = Instant::now();
    let withdrawn = lab.wait_next_hops(vip_ip(), &[Node::Lb], WITHDRAW_BOUND)?;
    eprintln!("announce: the router dropped lb2 {withdrawn:?} after its SIGTERM");
    // Withdrawn, still forwarding: the grace period.
    let s = lab.lbctl_status_on(Node::Lb2)?;
    let vip_state = s
        .announce
        .as_ref()
        .and_then(|a| a.vips.iter().find(|v| v.vip == vip_ip()))
        .ok_or_else(|| anyhow!("lb2's status has no announce entry: {:#?}", s.announce))?;
    ensure!(
        !vip_state.announcing && vip_state.decision == "stopping",
        "lb2 during its grace period: {vip_state:?}"
    );
    let agent = hosts.agent(Node::Lb2)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.exited().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let exit = agent
        .exited()
        .ok_or_else(|| anyhow!("lb2's agent still runs 10 s after SIGTERM"))?;
    let ran = stopped.elapsed();
    eprintln!("announce: lb2's agent exited ({exit}) {ran:?} after SIGTERM (grace 2000 ms)");
    ensure!(exit.success(), "lb2's agent: {exit}");
    ensure!(
        ran >= Duration::from_millis(2000),
        "lb2 stopped before its grace period was over: {ran:?}"
    );
    thread::sleep(Duration::from_millis(500));
    let attempts = probe.stop();
    let failed = failures(&attempts);
    eprintln!(
        "announce: {} probes every {PROBE_EVERY:?} across the graceful stop, {} failed",
        attempts.len(),
        failed.len()
    );
    ensure!(attempts.len() > 100, "too few probes: {}", attempts.len());
    ensure!(failed.is_empty(), "probes failed: {failed:?}");
    check_conversations(&mut conversations, "after lb2 stopped")?;
    // Every new connection now goes through lb.
    let before = new_flows(&lab, Node::Lb)?;
    let spread = lab.spread(vip(), 20, Duration::from_secs(30));
    ensure!(spread.succeeded() == 20, "{:?}", spread.failures);
    ensure!(new_flows(&lab, Node::Lb)? >= before + 20);

    // The last backend going down withdraws the VIP: nothing here could serve it.
    drop(conversations);
    for i in 1..=3 {
        lab.stop_server(i, SERVICE_PORT);
    }
    let took = lab.wait_next_hops(vip_ip(), &[], Duration::from_secs(5))?;
    eprintln!("announce: with every backend down, the router dropped the VIP after {took:?}");
    let s = lab.lbctl_status_on(Node::Lb)?;
    let state = s
        .announce
        .as_ref()
        .and_then(|a| a.vips.iter().find(|v| v.vip == vip_ip()))
        .ok_or_else(|| anyhow!("lb's status has no announce entry: {:#?}", s.announce))?;
    ensure!(
        !state.announcing && state.decision == "no usable backend" && state.since_unix_ms.is_some(),
        "lb with every backend down: {state:?}"
    );
    let text = lab.lbctl_ok_on(Node::Lb, &["status"])?;
    eprintln!("announce: lbctl status on lb now:\n{text}");
    ensure!(
        text.contains(&format!("{}: not announcing since ", vip_ip()))
            && text.contains(": no usable backend"),
        "lbctl status:\n{text}"
    );
    hosts.finished = true;
    Ok(())
}

#[test]
fn a_killed_agents_route_goes_with_it_and_clients_recover() -> Result<()> {
    if !lb_tests::require_root("a_killed_agents_route_goes_with_it_and_clients_recover") {
        return Ok(());
    }
    let lab = routed_lab(2)?;
    let mut hosts = Hosts::new(&lab)?;
    hosts.start_all(&[Node::Lb, Node::Lb2])?;
    let mut conversations = open_conversations(&lab, CONVERSATIONS)?;
    let probe = lab.start_probe(vip(), PROBE_EVERY, PROBE_TIMEOUT, PROBE_MAX)?;
    thread::sleep(Duration::from_millis(500));

    hosts.agent(Node::Lb2)?.kill()?;
    let killed = Instant::now();
    let withdrawn = lab.wait_next_hops(vip_ip(), &[Node::Lb], WITHDRAW_BOUND)?;
    eprintln!("announce: the router dropped lb2 {withdrawn:?} after its agent's SIGKILL");
    let table = lab.run(
        Node::Lb2,
        &["ip", "route", "show", "table", &TABLE.to_string()],
    )?;
    ensure!(
        table.trim().is_empty(),
        "lb2's routes outlived its agent: {table}"
    );
    thread::sleep(Duration::from_secs(1));
    let attempts = probe.stop();
    let gap = probe_gap(&attempts, killed).ok_or_else(|| {
        anyhow!(
            "no probe succeeded after the kill: {:?}",
            failures(&attempts)
        )
    })?;
    eprintln!(
        "announce: clients across the SIGKILL: {gap}; {} of {} probes failed",
        failures(&attempts).len(),
        attempts.len()
    );
    ensure!(gap.still_failing.is_none(), "still failing: {gap}");
    ensure!(
        gap.gap < KILL_RECOVERY_BOUND,
        "clients recovered after {:?}, more than {KILL_RECOVERY_BOUND:?}: {gap}",
        gap.gap
    );
    check_conversations(&mut conversations, "after lb2's agent was killed")?;
    hosts.finished = true;
    Ok(())
}

#[test]
fn a_third_host_moves_no_established_connection() -> Result<()> {
    if !lb_tests::require_root("a_third_host_moves_no_established_connection") {
        return Ok(());
    }
    let lab = routed_lab(3)?;
    let mut hosts = Hosts::new(&lab)?;
    hosts.start_all(&[Node::Lb, Node::Lb2])?;
    let mut conversations = open_conversations(&lab, CONVERSATIONS)?;
    check_conversations(&mut conversations, "before lb3")?;

    hosts.start_lb(Node::Lb3, None)?;
    let took = lab.wait_next_hops(vip_ip(), &[Node::Lb, Node::Lb2, Node::Lb3], CONVERGE)?;
    eprintln!("announce: the router added lb3 {took:?} after its agent was ready");
    // Established flows only, no new connection yet: the ones ECMP moved reach lb3,
    // which sends them to the backend they had.
    check_conversations(&mut conversations, "after lb3 joined")?;
    let moved = packets(&lab, Node::Lb3)?;
    eprintln!("announce: lb3 forwarded {moved} packets of established connections");
    ensure!(
        moved > 0,
        "no established connection passed through lb3: ECMP did not rehash?"
    );
    let before = new_flows(&lab, Node::Lb3)?;
    let spread = lab.spread(vip(), 150, Duration::from_secs(60));
    ensure!(spread.succeeded() == 150, "{:?}", spread.failures);
    let on_lb3 = new_flows(&lab, Node::Lb3)? - before;
    eprintln!("announce: 150 new connections, {on_lb3} through lb3");
    ensure!(on_lb3 > 0, "no new connection went through lb3");
    check_conversations(&mut conversations, "after new connections")?;
    hosts.finished = true;
    Ok(())
}

#[test]
fn with_vrrp_the_route_follows_the_master_through_a_graceful_stop() -> Result<()> {
    if !lb_tests::require_root("with_vrrp_the_route_follows_the_master_through_a_graceful_stop") {
        return Ok(());
    }
    let lab = routed_lab(2)?;
    let mut hosts = Hosts::new(&lab)?;
    hosts.start_lb(Node::Lb, Some(150))?;
    lab.wait_status_on(Node::Lb, "master", Duration::from_secs(5), |s| s.serving)?;
    hosts.start_lb(Node::Lb2, Some(100))?;
    lab.wait_backends_up("web", &["b1", "b2", "b3"], Duration::from_secs(5))?;
    let took = lab.wait_next_hops(vip_ip(), &[Node::Lb], CONVERGE)?;
    eprintln!("announce+vrrp: the router routes the VIP to the master only ({took:?})");
    let s = lab.lbctl_status_on(Node::Lb2)?;
    let backup = s
        .announce
        .as_ref()
        .and_then(|a| a.vips.iter().find(|v| v.vip == vip_ip()))
        .ok_or_else(|| anyhow!("lb2's status has no announce entry: {:#?}", s.announce))?;
    ensure!(
        !backup.announcing && backup.decision == "not serving (VRRP backup)",
        "the backup: {backup:?}"
    );
    // Still only the master a while later: the backup never announces.
    thread::sleep(Duration::from_millis(500));
    lab.wait_next_hops(vip_ip(), &[Node::Lb], Duration::ZERO)?;

    let mut conversations = open_conversations(&lab, CONVERSATIONS)?;
    let probe = lab.start_probe(vip(), PROBE_EVERY, PROBE_TIMEOUT, PROBE_MAX)?;
    thread::sleep(Duration::from_millis(500));
    hosts.agent(Node::Lb)?.signal(libc::SIGTERM)?;
    let took = lab.wait_next_hops(vip_ip(), &[Node::Lb2], Duration::from_secs(5))?;
    eprintln!("announce+vrrp: the router routes the VIP to lb2 alone {took:?} after lb's SIGTERM");
    let agent = hosts.agent(Node::Lb)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.exited().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let exit = agent
        .exited()
        .ok_or_else(|| anyhow!("lb's agent still runs 10 s after SIGTERM"))?;
    ensure!(exit.success(), "lb's agent: {exit}");
    thread::sleep(Duration::from_millis(500));
    let attempts = probe.stop();
    let failed = failures(&attempts);
    eprintln!(
        "announce+vrrp: {} probes across the handover, {} failed",
        attempts.len(),
        failed.len()
    );
    ensure!(attempts.len() > 100, "too few probes: {}", attempts.len());
    ensure!(failed.is_empty(), "probes failed: {failed:?}");
    check_conversations(&mut conversations, "after the handover")?;
    hosts.finished = true;
    Ok(())
}
