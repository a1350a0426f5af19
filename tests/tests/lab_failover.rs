//! VRRP failover between two LB hosts, end to end, in a network-namespace lab: `lb`
//! (priority 150) and `lb2` (priority 100) run lb-agent with identical services and
//! `[vrrp] router_id = 51, advert_interval_ms = 100`. A prober in the client namespace
//! opens a short connection to the VIP every 5 ms and the tests measure the gap
//! around each event (SIGKILL, link down, SIGTERM, preemption, a healed partition);
//! a long-lived connection opened before the event must keep working after it, which
//! rests on both hosts building the same Maglev table. Forged and malformed adverts
//! sent from the client namespace must be dropped and counted, and keepalived must be
//! able to stand in for one of the agents. Needs root; see `lb_tests::lab`.
//!
//! Neighbour caches: the client never sets `arp_accept`. A new master's gratuitous ARP
//! (a request with sender = target = the VIP) updates an entry the client already has,
//! which is what these tests check (`ip neigh` moves to the new master's MAC); for
//! IPv6 the unsolicited NA carries the override flag and does the same.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use lb_tests::lab::{
    AgentGuard, Attempt, BackendSection, Lab, Node, ProcessGuard, SERVICE_PORT, Service, VIP4,
    VIP6, VrrpSection, addr4, parse_backends_json, probe_gap, try_in_ns,
};
use lb_userspace::{
    protocol::Status,
    vrrp::{
        VrrpState, VrrpStatus,
        auth::{self, AuthKey},
        packet::{self, Advert},
    },
};

const ROUTER_ID: u8 = 51;
const INTERVAL_MS: u32 = 100;
const PRIO_LB: u8 = 150;
const PRIO_LB2: u8 = 100;
/// The prober: one short connection every 5 ms, connect and greeting each within 80 ms.
const PROBE_EVERY: Duration = Duration::from_millis(5);
const PROBE_TIMEOUT: Duration = Duration::from_millis(80);
/// The prober's own bound; tests stop it long before.
const PROBE_MAX: Duration = Duration::from_secs(30);
/// How long a failover may take to show in `lbctl status`.
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);
const BOTH_VIPS: [IpAddr; 2] = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];

fn vip4() -> SocketAddr {
    (VIP4, SERVICE_PORT).into()
}

fn vip6() -> SocketAddr {
    (VIP6, SERVICE_PORT).into()
}

/// Both hosts serve the same two services (the IPv4 one first: the election runs
/// over IPv4 and the IPv6 VIP follows it).
fn services() -> Vec<Service> {
    vec![
        Service::new("web4", VIP4, SERVICE_PORT).backends(1..=3),
        Service::new("web6", VIP6, SERVICE_PORT).backends(1..=3),
    ]
}

fn vrrp(priority: u8) -> VrrpSection {
    VrrpSection::new(ROUTER_ID, priority).advert_interval_ms(INTERVAL_MS)
}

/// A lab with two LBs and three backends running the greeting/echo server.
fn failover_lab() -> Result<Lab> {
    let lab = Lab::builder().backends(3).second_lb(true).build()?;
    lab.start_servers(SERVICE_PORT)?;
    Ok(lab)
}

fn config(lab: &Lab, node: Node, vrrp: &VrrpSection) -> String {
    lab.config_on(node, "native", &services(), Some(vrrp))
}

fn vrrp_of(status: &Status) -> Result<&VrrpStatus> {
    status
        .vrrp
        .as_ref()
        .ok_or_else(|| anyhow!("lbctl status shows no vrrp: {status:#?}"))
}

/// Polls `lbctl status` of the agent in `node` until `done` holds; returns how long
/// that took and the status then. Fails after `timeout` with the last status.
fn wait_status(
    lab: &Lab,
    node: Node,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Status) -> bool,
) -> Result<(Duration, Status)> {
    lab.wait_status_on(node, what, timeout, done)
}

fn is_state(status: &Status, state: VrrpState) -> bool {
    status.vrrp.as_ref().is_some_and(|v| v.state == state)
}

/// Master and serving.
fn is_master(status: &Status) -> bool {
    is_state(status, VrrpState::Master) && status.serving
}

/// Backup, not serving, following the master at `master`.
fn follows(status: &Status, master: Ipv4Addr) -> bool {
    is_state(status, VrrpState::Backup)
        && !status.serving
        && status
            .vrrp
            .as_ref()
            .and_then(|v| v.master.as_ref())
            .is_some_and(|m| m.address == IpAddr::V4(master))
}

/// The agents of one test. If the test does not reach `finish`, `Drop` prints every
/// agent's log (the killed ones' too) and the lab's diagnostics.
struct Agents<'lab> {
    lab: &'lab Lab,
    lb: Option<AgentGuard<'lab>>,
    lb2: Option<AgentGuard<'lab>>,
    /// Agents that were killed or stopped, kept for their logs.
    gone: Vec<(Node, AgentGuard<'lab>)>,
    /// Other processes (keepalived), with a name for the report.
    others: Vec<(String, ProcessGuard<'lab>)>,
    finished: bool,
}

impl<'lab> Agents<'lab> {
    fn new(lab: &'lab Lab) -> Self {
        Agents {
            lab,
            lb: None,
            lb2: None,
            gone: Vec::new(),
            others: Vec::new(),
            finished: false,
        }
    }

    fn slot(&mut self, node: Node) -> &mut Option<AgentGuard<'lab>> {
        match node {
            Node::Lb => &mut self.lb,
            Node::Lb2 => &mut self.lb2,
            other => panic!("no agent runs in {other:?}"),
        }
    }

    fn agent(&mut self, node: Node) -> Result<&mut AgentGuard<'lab>> {
        self.slot(node)
            .as_mut()
            .ok_or_else(|| anyhow!("no agent runs in {node:?}"))
    }

    /// Starts the agent of `node` with `config`; the one before, if any, is kept for
    /// its log.
    fn start(&mut self, node: Node, config: &str) -> Result<()> {
        let agent = self.lab.spawn_agent_on(node, config)?;
        if let Some(old) = self.slot(node).replace(agent) {
            self.gone.push((node, old));
        }
        Ok(())
    }

    /// SIGKILL, reaped; the guard is kept for its log.
    fn kill(&mut self, node: Node) -> Result<()> {
        let mut agent = self
            .slot(node)
            .take()
            .ok_or_else(|| anyhow!("no agent runs in {node:?}"))?;
        let status = agent.kill();
        self.gone.push((node, agent));
        let status = status.with_context(|| format!("killing the agent in {node:?}"))?;
        eprintln!("failover: agent in {node:?} killed ({status})");
        Ok(())
    }

    /// Starts lb (priority 150) and waits for it to be master, then lb2 (priority 100)
    /// and waits for it to follow lb; returns the two configs.
    fn start_pair(&mut self, lb: &VrrpSection, lb2: &VrrpSection) -> Result<(String, String)> {
        let (c1, c2) = (
            config(self.lab, Node::Lb, lb),
            config(self.lab, Node::Lb2, lb2),
        );
        self.start(Node::Lb, &c1)?;
        let (took, _) = wait_status(self.lab, Node::Lb, "master", TAKEOVER_WAIT, is_master)?;
        eprintln!("failover: lb master {took:.1?} after its agent was ready");
        self.start(Node::Lb2, &c2)?;
        let lb_addr = addr4(Node::Lb);
        let (_, s) = wait_status(self.lab, Node::Lb2, "backup of lb", TAKEOVER_WAIT, |s| {
            follows(s, lb_addr)
                && s.vrrp
                    .as_ref()
                    .is_some_and(|v| v.counters.adverts_received >= 3)
        })?;
        let v = vrrp_of(&s)?;
        ensure!(
            v.counters.dropped.is_empty(),
            "lb2 dropped adverts of lb: {:?}",
            v.counters.dropped
        );
        ensure!(
            is_master(&self.lab.lbctl_status_on(Node::Lb)?),
            "lb is no longer master after lb2 started"
        );
        Ok((c1, c2))
    }

    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Agents<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut report = String::from("\n===== failover test failed: logs =====\n");
        let running = [(Node::Lb, &self.lb), (Node::Lb2, &self.lb2)];
        for (node, agent) in running
            .into_iter()
            .filter_map(|(n, a)| a.as_ref().map(|a| (n, a)))
            .chain(self.gone.iter().map(|(n, a)| (*n, a)))
        {
            report += &format!("--- lb-agent in {node:?} ---\n{}\n", agent.log());
        }
        for (name, p) in &self.others {
            report += &format!("--- {name} ---\n{}\n", p.log());
        }
        for node in [Node::Lb, Node::Lb2] {
            if let Ok(s) = self.lab.lbctl_status_on(node) {
                report += &format!("--- lbctl status in {node:?} ---\n{:#?}\n", s.vrrp);
            }
        }
        report += &format!("--- lab ---\n{}", self.lab.diagnostics());
        eprintln!("{report}");
    }
}

/// Waits until the client's neighbour entry for `vip` holds `node`'s MAC.
fn wait_neigh(lab: &Lab, vip: IpAddr, node: Node, timeout: Duration) -> Result<Duration> {
    let mac = lab.mac_of(node)?;
    let start = Instant::now();
    loop {
        let entry = lab.neigh(Node::Client, vip)?;
        if entry.contains(&mac) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!(
                "the client's neighbour entry for {vip} is not {node:?}'s MAC {mac} after {timeout:?}: {:?}",
                entry.trim()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the prober has `n` successes begun after `since`; false at `timeout`.
fn wait_successes(
    probe: &lb_tests::lab::Load,
    since: Instant,
    n: usize,
    timeout: Duration,
) -> bool {
    probe.wait_for(timeout, |attempts| {
        attempts
            .iter()
            .filter(|a| a.started >= since && a.outcome.is_ok())
            .count()
            >= n
    })
}

fn summary(attempts: &[Attempt]) -> String {
    let ok = attempts.iter().filter(|a| a.outcome.is_ok()).count();
    let first_err = attempts
        .iter()
        .find_map(|a| a.outcome.as_ref().err())
        .map(|e| format!(", first error: {e}"))
        .unwrap_or_default();
    format!(
        "{} probes, {ok} succeeded, {} failed{first_err}",
        attempts.len(),
        attempts.len() - ok
    )
}

/// Measures the gap around `event` once the prober has seen 20 successes begun after
/// `settled` (when the new master was seen to be master).
fn measure_gap(
    probe: &lb_tests::lab::Load,
    event: Instant,
    settled: Instant,
    what: &str,
    limit: Duration,
) -> Result<lb_tests::lab::ProbeGap> {
    let recovered = wait_successes(probe, settled, 20, Duration::from_secs(5));
    let attempts = probe.attempts();
    let gap = probe_gap(&attempts, event).ok_or_else(|| {
        anyhow!(
            "{what}: no probe succeeded after the event ({})",
            summary(&attempts)
        )
    })?;
    eprintln!("failover: {what}: {gap}; {}", summary(&attempts));
    ensure!(
        recovered,
        "{what}: the prober did not recover: {}",
        summary(&attempts)
    );
    ensure!(gap.gap < limit, "{what}: {gap}, not under {limit:?}");
    Ok(gap)
}

/// The long-lived connections of a test: one per VIP, opened through the master.
struct LongLived {
    v4: lb_tests::lab::Conversation,
    v6: lb_tests::lab::Conversation,
}

impl LongLived {
    fn open(lab: &Lab) -> Result<Self> {
        let mut v4 = lab.converse(vip4()).context("long-lived IPv4 connection")?;
        let mut v6 = lab.converse(vip6()).context("long-lived IPv6 connection")?;
        ensure!(v4.echo("hello")? == "hello", "no IPv4 echo");
        ensure!(v6.echo("hello")? == "hello", "no IPv6 echo");
        eprintln!(
            "failover: long-lived connections on {} (IPv4) and {} (IPv6)",
            v4.greeting, v6.greeting
        );
        Ok(LongLived { v4, v6 })
    }

    /// Sends and receives on both, after the move.
    fn check(&mut self, what: &str) -> Result<()> {
        for (family, c) in [("IPv4", &mut self.v4), ("IPv6", &mut self.v6)] {
            let line = format!("still there after {what}");
            let back = c.echo(&line).with_context(|| {
                format!(
                    "{family} long-lived connection to {} after {what}",
                    c.greeting
                )
            })?;
            ensure!(back == line, "{family}: echoed {back:?}");
        }
        Ok(())
    }
}

/// The client's neighbour entries for `vips` point at `node` (within 2 s).
fn check_neigh_on(lab: &Lab, node: Node, vips: &[IpAddr]) -> Result<()> {
    for &vip in vips {
        let took = wait_neigh(lab, vip, node, Duration::from_secs(2))?;
        eprintln!("failover: client's neighbour entry for {vip} on {node:?} ({took:.1?})");
    }
    Ok(())
}

/// The common shape of the three takeover tests: elect, open long-lived connections,
/// start the prober, do `event`, and check lb2 takes over within `limit` of gap.
fn takeover(
    test: &str,
    limit: Duration,
    event: impl FnOnce(&mut Agents) -> Result<()>,
    after: impl FnOnce(&mut Agents) -> Result<()>,
) -> Result<()> {
    let lab = failover_lab()?;
    let mut agents = Agents::new(&lab);
    agents.start_pair(&vrrp(PRIO_LB), &vrrp(PRIO_LB2))?;
    let mut long = LongLived::open(&lab)?;
    check_neigh_on(&lab, Node::Lb, &BOTH_VIPS)?;
    let probe = lab.start_probe(vip4(), PROBE_EVERY, PROBE_TIMEOUT, PROBE_MAX)?;
    ensure!(
        wait_successes(
            &probe,
            Instant::now() - Duration::from_secs(1),
            20,
            Duration::from_secs(5)
        ),
        "{test}: the prober does not reach the VIP before the event: {}",
        summary(&probe.attempts())
    );

    let at = Instant::now();
    event(&mut agents)?;
    let (took, s) = wait_status(&lab, Node::Lb2, "master", TAKEOVER_WAIT, is_master)?;
    let reason = vrrp_of(&s)?
        .last_transition
        .as_ref()
        .map(|t| t.reason.clone())
        .unwrap_or_default();
    eprintln!("failover: {test}: lb2 master by {took:.1?} after the event ({reason})");
    measure_gap(&probe, at, Instant::now(), test, limit)?;
    check_neigh_on(&lab, Node::Lb2, &BOTH_VIPS)?;
    long.check(test)?;
    let attempts = probe.stop();
    eprintln!("failover: {test}: {}", summary(&attempts));
    after(&mut agents)?;
    agents.finish();
    Ok(())
}

/// SIGKILL on the master: its XDP link goes with the process (no more ARP answers, no
/// forwarding, no priority 0); lb2 takes over when lb's adverts stop (3 intervals and
/// its skew, about 360 ms).
#[test]
fn sigkill_master() -> Result<()> {
    if !lb_tests::require_root("sigkill_master") {
        return Ok(());
    }
    takeover(
        "sigkill_master",
        Duration::from_secs(1),
        |agents| agents.kill(Node::Lb),
        |_| Ok(()),
    )
}

/// A reload on the backup that waits for an unresolvable backend's MAC (3 s) while the
/// master is killed: the backup's VRRP speaker and its serving switch run on a thread
/// of their own, so the takeover is as quick as without the reload (same bound as
/// `sigkill_master`), and the reload still finishes afterwards.
#[test]
fn reload_waiting_on_a_mac_does_not_delay_a_takeover() -> Result<()> {
    const TEST: &str = "reload_waiting_on_a_mac_does_not_delay_a_takeover";
    if !lb_tests::require_root(TEST) {
        return Ok(());
    }
    takeover(
        TEST,
        Duration::from_secs(1),
        |agents| {
            // Nobody has this address on the segment: the reload probes it for 3 s.
            let mut file = agents
                .lab
                .config_file(Node::Lb2, "native", &services())
                .vrrp(vrrp(PRIO_LB2));
            file.services[0].backends.push(BackendSection {
                name: "ghost".into(),
                address: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 250)),
                weight: 100,
                backup: None,
                port: None,
            });
            let lb2 = agents.agent(Node::Lb2)?;
            lb2.write_config(&file.to_toml())?;
            lb2.signal(libc::SIGHUP)?;
            // The reload is under way (resolving) when the master goes.
            thread::sleep(Duration::from_millis(200));
            agents.kill(Node::Lb)
        },
        |agents| {
            let lb2 = agents.agent(Node::Lb2)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while lb2.count_log("reloaded: ") == 0 {
                ensure!(
                    Instant::now() < deadline,
                    "lb2's reload did not finish: {}",
                    lb2.log()
                );
                thread::sleep(POLL);
            }
            let list = agents
                .lab
                .lbctl_ok_on(Node::Lb2, &["--json", "backend", "list", "web4"])?;
            let ghost = parse_backends_json(&list)?
                .into_iter()
                .find(|b| b.name == "ghost")
                .ok_or_else(|| anyhow!("lb2 does not list the reloaded backend: {list}"))?;
            ensure!(
                !ghost.in_ring,
                "an unresolved backend is in the ring: {ghost:?}"
            );
            Ok(())
        },
    )
}

/// The master's link goes down: tracking lowers its priority to 0 (it cannot send
/// that advert, the link is down) and lb2 takes over when the adverts stop.
#[test]
fn master_link_down() -> Result<()> {
    if !lb_tests::require_root("master_link_down") {
        return Ok(());
    }
    takeover(
        "master_link_down",
        Duration::from_secs(1),
        |agents| {
            agents
                .lab
                .run(Node::Lb, &["ip", "link", "set", "eth0", "down"])?;
            Ok(())
        },
        // lb itself: effective priority 0, fault, not serving.
        |agents| {
            let (took, s) = wait_status(agents.lab, Node::Lb, "fault", TAKEOVER_WAIT, |s| {
                is_state(s, VrrpState::Fault) && !s.serving
            })?;
            let v = vrrp_of(&s)?;
            ensure!(
                v.effective_priority == 0,
                "lb in fault advertises {}",
                v.effective_priority
            );
            eprintln!(
                "failover: master_link_down: lb is in fault ({took:.1?} after the check began)"
            );
            Ok(())
        },
    )
}

/// SIGTERM: the master sends priority 0 and keeps forwarding for one interval; lb2
/// takes over after its skew time (about 60 ms).
#[test]
fn graceful_stop() -> Result<()> {
    if !lb_tests::require_root("graceful_stop") {
        return Ok(());
    }
    takeover(
        "graceful_stop",
        Duration::from_millis(500),
        |agents| {
            agents.agent(Node::Lb)?.signal(libc::SIGTERM)?;
            Ok(())
        },
        // lb's agent exits cleanly after its grace interval.
        |agents| {
            let agent = agents.agent(Node::Lb)?;
            let status = agent.stop()?;
            ensure!(status.success(), "lb-agent exited with {status}");
            ensure!(
                agent.count_log("the program stays attached to eth0, not serving") == 1,
                "lb-agent did not say it left the program attached and not serving:\n{}",
                agent.log()
            );
            Ok(())
        },
    )
}

/// lb is killed, lb2 takes over; lb's agent comes back with preemption on and takes
/// the VIPs back, exactly once; a connection opened while lb2 was master survives.
#[test]
fn preempt_back() -> Result<()> {
    if !lb_tests::require_root("preempt_back") {
        return Ok(());
    }
    let lab = failover_lab()?;
    let mut agents = Agents::new(&lab);
    let (c1, _) = agents.start_pair(&vrrp(PRIO_LB), &vrrp(PRIO_LB2))?;
    agents.kill(Node::Lb)?;
    wait_status(&lab, Node::Lb2, "master", TAKEOVER_WAIT, is_master)?;
    let mut long = LongLived::open(&lab)?;
    check_neigh_on(&lab, Node::Lb2, &BOTH_VIPS)?;
    let probe = lab.start_probe(vip4(), PROBE_EVERY, PROBE_TIMEOUT, PROBE_MAX)?;
    ensure!(
        wait_successes(&probe, Instant::now(), 20, Duration::from_secs(5)),
        "the prober does not reach the VIP through lb2: {}",
        summary(&probe.attempts())
    );
    let lb2_to_backup = "vrrp 51: master -> backup";
    let before = agents.agent(Node::Lb2)?.count_log(lb2_to_backup);

    let at = Instant::now();
    agents.start(Node::Lb, &c1)?;
    let (took, _) = wait_status(&lab, Node::Lb, "master again", TAKEOVER_WAIT, is_master)?;
    eprintln!(
        "failover: preempt_back: lb master again {:.1?} after its agent started ({took:.1?} after it was ready)",
        at.elapsed()
    );
    let lb_addr = addr4(Node::Lb);
    wait_status(&lab, Node::Lb2, "backup of lb", TAKEOVER_WAIT, |s| {
        follows(s, lb_addr)
    })?;
    measure_gap(
        &probe,
        at,
        Instant::now(),
        "preempt_back",
        Duration::from_secs(1),
    )?;
    check_neigh_on(&lab, Node::Lb, &BOTH_VIPS)?;
    long.check("preempt_back")?;

    // No flapping: 2 s of lb master and lb2 backup.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(2) {
        let (s1, s2) = (
            lab.lbctl_status_on(Node::Lb)?,
            lab.lbctl_status_on(Node::Lb2)?,
        );
        ensure!(
            is_master(&s1) && follows(&s2, lb_addr),
            "flapping {:.1?} after the preemption: lb {:?}, lb2 {:?}",
            watch.elapsed(),
            s1.vrrp,
            s2.vrrp
        );
        thread::sleep(Duration::from_millis(100));
    }
    let lb2_log = agents.agent(Node::Lb2)?.log();
    let after = count_lines(&lb2_log, lb2_to_backup);
    ensure!(
        after == before + 1,
        "lb2 went master -> backup {} times since lb came back, not once:\n{lb2_log}",
        after - before
    );
    let lb_log = agents.agent(Node::Lb)?.log();
    let masters = count_lines(&lb_log, "-> master");
    ensure!(masters == 1, "lb became master {masters} times:\n{lb_log}");
    long.check("2 s of quiet")?;
    let attempts = probe.stop();
    eprintln!("failover: preempt_back: {}", summary(&attempts));
    agents.finish();
    Ok(())
}

fn count_lines(log: &str, marker: &str) -> usize {
    log.lines().filter(|l| l.contains(marker)).count()
}

/// `iptables ARGS` in `node`'s namespace (rules are per network namespace).
fn iptables(lab: &Lab, node: Node, args: &[&str]) -> Result<()> {
    let mut cmd = vec!["iptables", "-w"];
    cmd.extend_from_slice(args);
    lab.run(node, &cmd)?;
    Ok(())
}

/// Adverts cut both ways: both hosts become master, as VRRP must. Healed, exactly one
/// master remains within 2 s and the client reaches the VIP.
#[test]
fn partition() -> Result<()> {
    if !lb_tests::require_root("partition") {
        return Ok(());
    }
    let lab = failover_lab()?;
    let mut agents = Agents::new(&lab);
    agents.start_pair(&vrrp(PRIO_LB), &vrrp(PRIO_LB2))?;
    let rule = ["INPUT", "-p", "112", "-j", "DROP"];
    let with = |op: &'static str| [&[op][..], &rule[..]].concat();
    for node in [Node::Lb, Node::Lb2] {
        iptables(&lab, node, &with("-A"))?;
    }
    let (took, _) = wait_status(
        &lab,
        Node::Lb2,
        "master (partitioned)",
        TAKEOVER_WAIT,
        is_master,
    )?;
    eprintln!("failover: partition: lb2 master {took:.1?} after the cut");
    ensure!(
        is_master(&lab.lbctl_status_on(Node::Lb)?),
        "lb is not master during the partition"
    );
    // Both masters: the client follows the last gratuitous ARP (lb2's).
    let mut long = LongLived::open(&lab)?;
    thread::sleep(Duration::from_millis(300));
    ensure!(
        is_master(&lab.lbctl_status_on(Node::Lb)?) && is_master(&lab.lbctl_status_on(Node::Lb2)?),
        "not both master during the partition"
    );
    let probe = lab.start_probe(vip4(), PROBE_EVERY, PROBE_TIMEOUT, PROBE_MAX)?;
    ensure!(
        wait_successes(&probe, Instant::now(), 20, Duration::from_secs(5)),
        "the prober does not reach the VIP during the partition: {}",
        summary(&probe.attempts())
    );

    let announced = |s: &Status| s.vrrp.as_ref().map_or(0, |v| v.counters.announcements_sent);
    let lb_announced = announced(&lab.lbctl_status_on(Node::Lb)?);
    let neigh_before = lab.neigh(Node::Client, IpAddr::V4(VIP4))?;
    let healed = Instant::now();
    for node in [Node::Lb, Node::Lb2] {
        iptables(&lab, node, &with("-D"))?;
    }
    let lb_addr = addr4(Node::Lb);
    let (took, s) = wait_status(
        &lab,
        Node::Lb2,
        "backup after the heal",
        Duration::from_secs(2),
        |s| follows(s, lb_addr),
    )?;
    eprintln!(
        "failover: partition: lb2 back to backup {took:.1?} after the heal ({})",
        vrrp_of(&s)?
            .last_transition
            .as_ref()
            .map(|t| t.reason.as_str())
            .unwrap_or("")
    );
    ensure!(
        is_master(&lab.lbctl_status_on(Node::Lb)?),
        "lb is not master after the heal"
    );
    // The client followed lb2's gratuitous ARP during the partition; after the heal
    // only a new announcement from lb (the master that stayed) moves it back before its
    // neighbour entry expires (tens of seconds), as keepalived does on hearing a
    // lower-priority advert as master (vrrp_garp_lower_prio_repeat).
    let settled = Instant::now();
    let gap = measure_gap(
        &probe,
        healed,
        settled,
        "partition heal",
        Duration::from_secs(2),
    );
    let after = announced(&lab.lbctl_status_on(Node::Lb)?);
    let facts = format!(
        "client's entry for {VIP4} before the heal: {:?}, after: {:?} (lb {}, lb2 {}); \
         lb's announcements_sent: {lb_announced} before the heal, {after} after",
        neigh_before.trim(),
        lab.neigh(Node::Client, IpAddr::V4(VIP4))?.trim(),
        lab.mac_of(Node::Lb)?,
        lab.mac_of(Node::Lb2)?,
    );
    eprintln!("failover: partition: {facts}");
    gap.with_context(|| facts.clone())?;
    long.check("the heal")?;
    let attempts = probe.stop();
    eprintln!("failover: partition: {}", summary(&attempts));
    agents.finish();
    Ok(())
}

// ---- adverts from a third host -----------------------------------------------------------

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// Sends each payload as an IP protocol 112 packet to 224.0.0.18 out of `eth0` of the
/// namespace `ns`, with IP TTL `ttl`, from a thread that entered it. The kernel builds
/// the IP header; the source is `eth0`'s address.
fn send_adverts(ns: &str, payloads: &[Vec<u8>], ttl: u8) -> io::Result<()> {
    try_in_ns(ns, || {
        fn check(rc: libc::c_int, what: &str) -> io::Result<libc::c_int> {
            if rc < 0 {
                let e = io::Error::last_os_error();
                Err(io::Error::new(e.kind(), format!("{what}: {e}")))
            } else {
                Ok(rc)
            }
        }
        fn set<T>(fd: &OwnedFd, name: libc::c_int, value: &T, what: &str) -> io::Result<()> {
            // SAFETY: `value` points to a live T of the size given.
            check(
                unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::IPPROTO_IP,
                        name,
                        (value as *const T).cast(),
                        size_of::<T>() as libc::socklen_t,
                    )
                },
                what,
            )
            .map(|_| ())
        }
        // SAFETY: socket(2) has no preconditions; the fd is owned at once.
        let fd = unsafe {
            OwnedFd::from_raw_fd(check(
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::c_int::from(packet::IPPROTO_VRRP),
                ),
                "socket(AF_INET, SOCK_RAW, 112)",
            )?)
        };
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let mreq = libc::ip_mreqn {
            imr_multiaddr: libc::in_addr { s_addr: 0 },
            imr_address: libc::in_addr { s_addr: 0 },
            imr_ifindex: ifindex as libc::c_int,
        };
        set(&fd, libc::IP_MULTICAST_IF, &mreq, "IP_MULTICAST_IF")?;
        set(
            &fd,
            libc::IP_MULTICAST_TTL,
            &libc::c_int::from(ttl),
            "IP_MULTICAST_TTL",
        )?;
        set(
            &fd,
            libc::IP_MULTICAST_LOOP,
            &0 as &libc::c_int,
            "IP_MULTICAST_LOOP",
        )?;
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(packet::GROUP_V4).to_be(),
            },
            sin_zero: [0; 8],
        };
        for p in payloads {
            // SAFETY: a valid fd, a live buffer and a sockaddr_in of the size given.
            check(
                unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        p.as_ptr().cast(),
                        p.len(),
                        0,
                        (&dst as *const libc::sockaddr_in).cast(),
                        size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    ) as libc::c_int
                },
                "sendto 224.0.0.18",
            )?;
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    })
}

/// An advert for `router_id` with `priority` listing the IPv4 VIP, as the client
/// (10.77.0.2) would send it to the group: correct checksum, optionally signed.
fn advert_from_client(router_id: u8, priority: u8, key: Option<&AuthKey>) -> Result<Vec<u8>> {
    let adv = Advert {
        router_id,
        priority,
        interval_cs: (INTERVAL_MS / 10) as u16,
        addresses: vec![IpAddr::V4(VIP4)],
    };
    let seq = auth::seq_from_unix(unix_now());
    packet::encode(
        &adv,
        IpAddr::V4(addr4(Node::Client)),
        IpAddr::V4(packet::GROUP_V4),
        key.map(|k| (k, seq)),
    )
    .map_err(|e| anyhow!("encoding an advert: {e}"))
}

/// Recomputes the IPv4 checksum of a payload whose header was changed.
fn fix_checksum(p: &mut [u8]) {
    p[packet::CHECKSUM_AT..packet::CHECKSUM_AT + 2].fill(0);
    let sum = packet::checksum(
        p,
        IpAddr::V4(addr4(Node::Client)),
        IpAddr::V4(packet::GROUP_V4),
    );
    p[packet::CHECKSUM_AT..packet::CHECKSUM_AT + 2].copy_from_slice(&sum.to_be_bytes());
}

fn dropped(status: &Status, reason: &str) -> u64 {
    status
        .vrrp
        .as_ref()
        .and_then(|v| v.counters.dropped.get(reason).copied())
        .unwrap_or(0)
}

fn last_transition_at(status: &Status) -> Option<u64> {
    status
        .vrrp
        .as_ref()
        .and_then(|v| v.last_transition.as_ref())
        .map(|t| t.at_unix_ms)
}

/// Checks for `quiet` that lb stays master and lb2 its backup, with no new transition
/// on either since `before`.
fn assert_unchanged(lab: &Lab, before: &[(Node, Status)], quiet: Duration) -> Result<()> {
    let lb_addr = addr4(Node::Lb);
    let start = Instant::now();
    loop {
        let (s1, s2) = (
            lab.lbctl_status_on(Node::Lb)?,
            lab.lbctl_status_on(Node::Lb2)?,
        );
        ensure!(
            is_master(&s1) && follows(&s2, lb_addr),
            "the election moved: lb {:#?}\nlb2 {:#?}",
            s1.vrrp,
            s2.vrrp
        );
        for ((node, old), new) in before.iter().zip([&s1, &s2]) {
            ensure!(
                last_transition_at(old) == last_transition_at(new),
                "{node:?} made a transition: {:?}",
                new.vrrp.as_ref().and_then(|v| v.last_transition.as_ref())
            );
        }
        if start.elapsed() > quiet {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (at most 2 s) until every agent's `reason` counter grew by at least `n`.
fn wait_dropped(lab: &Lab, before: &[(Node, Status)], reason: &str, n: u64) -> Result<()> {
    for (node, old) in before {
        let was = dropped(old, reason);
        let (_, s) = wait_status(
            lab,
            *node,
            &format!("counting {reason}"),
            Duration::from_secs(2),
            |s| dropped(s, reason) >= was + n,
        )
        .with_context(|| format!("{node:?}: {reason} was {was}, {n} more expected"))?;
        eprintln!(
            "failover: {node:?} dropped {} advert(s) as {reason} ({} -> {})",
            dropped(&s, reason) - was,
            was,
            dropped(&s, reason)
        );
    }
    Ok(())
}

fn snapshot(lab: &Lab) -> Result<Vec<(Node, Status)>> {
    [Node::Lb, Node::Lb2]
        .into_iter()
        .map(|n| Ok((n, lab.lbctl_status_on(n)?)))
        .collect()
}

/// Both agents authenticate adverts. A third host's forged adverts claiming priority
/// 254 (no trailer; a trailer signed with another key) change nothing and are counted.
#[test]
fn forged_advert_ignored() -> Result<()> {
    if !lb_tests::require_root("forged_advert_ignored") {
        return Ok(());
    }
    let lab = failover_lab()?;
    let key = lab.key_file("vrrp.key", b"0123456789abcdef0123456789ABCDEF")?;
    let mut agents = Agents::new(&lab);
    agents.start_pair(
        &vrrp(PRIO_LB).auth_key_file(&key),
        &vrrp(PRIO_LB2).auth_key_file(&key),
    )?;
    for node in [Node::Lb, Node::Lb2] {
        let s = lab.lbctl_status_on(node)?;
        ensure!(vrrp_of(&s)?.authenticated, "{node:?} is not authenticated");
    }
    let before = snapshot(&lab)?;
    let client = lab.ns(Node::Client);

    let unsigned = advert_from_client(ROUTER_ID, 254, None)?;
    send_adverts(&client, &vec![unsigned; 5], packet::TTL)?;
    let other = AuthKey::from_bytes(b"not the key the LBs share, 32 b!".to_vec())
        .map_err(|e| anyhow!("{e}"))?;
    let signed: Vec<Vec<u8>> = (0..5)
        .map(|_| advert_from_client(ROUTER_ID, 254, Some(&other)))
        .collect::<Result<_>>()?;
    send_adverts(&client, &signed, packet::TTL)?;

    wait_dropped(&lab, &before, "auth_missing", 5)?;
    wait_dropped(&lab, &before, "auth_bad_hmac", 5)?;
    assert_unchanged(&lab, &before, Duration::from_secs(1))?;
    agents.finish();
    Ok(())
}

/// Without keys: adverts of each bad kind from a third host are dropped, each counted
/// under its own reason by both agents, and nothing moves.
#[test]
fn malformed_adverts_dropped() -> Result<()> {
    if !lb_tests::require_root("malformed_adverts_dropped") {
        return Ok(());
    }
    let lab = failover_lab()?;
    let mut agents = Agents::new(&lab);
    agents.start_pair(&vrrp(PRIO_LB), &vrrp(PRIO_LB2))?;
    let client = lab.ns(Node::Client);
    let good = advert_from_client(ROUTER_ID, 254, None)?;

    let mut bad_checksum = good.clone();
    bad_checksum[packet::CHECKSUM_AT] ^= 0x5a;
    let mut version2 = good.clone();
    version2[0] = (2 << 4) | packet::TYPE_ADVERT;
    fix_checksum(&mut version2);
    let mut bad_type = good.clone();
    bad_type[0] = (packet::VERSION << 4) | 2;
    fix_checksum(&mut bad_type);
    let wrong_router = advert_from_client(ROUTER_ID + 1, 254, None)?;
    let mut zero_interval = good.clone();
    zero_interval[4..6].fill(0);
    fix_checksum(&mut zero_interval);
    let too_short = good[..6].to_vec();
    // The header claims one address; only half of it came.
    let mut cut = good[..packet::HEADER_LEN + 2].to_vec();
    fix_checksum(&mut cut);

    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        ("bad_checksum", bad_checksum, packet::TTL),
        ("bad_version", version2, packet::TTL),
        ("bad_type", bad_type, packet::TTL),
        ("wrong_router_id", wrong_router, packet::TTL),
        ("bad_interval", zero_interval, packet::TTL),
        ("bad_ttl", good, 64),
        ("too_short", too_short, packet::TTL),
        ("address_count_mismatch", cut, packet::TTL),
    ];
    let first = snapshot(&lab)?;
    for (reason, payload, ttl) in cases {
        let before = snapshot(&lab)?;
        send_adverts(&client, &[payload.clone(), payload.clone(), payload], ttl)?;
        wait_dropped(&lab, &before, reason, 3)?;
        // Nothing else was counted for it: no other reason grew.
        for (node, old) in &before {
            let new = lab.lbctl_status_on(*node)?;
            let (o, n) = (vrrp_of(old)?, vrrp_of(&new)?);
            for (name, count) in &n.counters.dropped {
                let was = o.counters.dropped.get(name).copied().unwrap_or(0);
                ensure!(
                    name == reason || *count == was,
                    "{node:?}: sending {reason} adverts also counted {name} ({was} -> {count})"
                );
            }
        }
    }
    assert_unchanged(&lab, &first, Duration::from_secs(1))?;
    // The backup still takes the master's real adverts.
    let (old, new) = (&first[1].1, lab.lbctl_status_on(Node::Lb2)?);
    ensure!(
        vrrp_of(&new)?.counters.adverts_received > vrrp_of(old)?.counters.adverts_received,
        "lb2 stopped taking lb's adverts"
    );
    agents.finish();
    Ok(())
}

// ---- keepalived as the peer ---------------------------------------------------------------

fn keepalived_bin() -> Option<PathBuf> {
    std::env::var_os("LB_KEEPALIVED")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/sbin/keepalived",
                "/sbin/keepalived",
                "/usr/local/sbin/keepalived",
            ]
            .into_iter()
            .map(PathBuf::from),
        )
        .find(|p| p.is_file())
}

/// Starts keepalived (VRRPv3, router 51, 100 ms adverts, the IPv4 VIP) in lb2's
/// namespace with `priority`. Its config and pid files are named by `tag`.
fn start_keepalived<'lab>(
    lab: &'lab Lab,
    bin: &Path,
    priority: u8,
    tag: &str,
) -> Result<ProcessGuard<'lab>> {
    let conf = lab.dir().join(format!("keepalived-{tag}.conf"));
    std::fs::write(
        &conf,
        format!(
            "global_defs {{\n    router_id lbfailover\n    vrrp_version 3\n    enable_script_security\n}}\n\
             vrrp_instance lbfailover {{\n    state BACKUP\n    interface eth0\n    virtual_router_id {ROUTER_ID}\n    \
             priority {priority}\n    advert_int 0.1\n    virtual_ipaddress {{\n        {VIP4}/32\n    }}\n}}\n"
        ),
    )?;
    let pid = |n: &str| lab.dir().join(format!("{n}-{tag}.pid"));
    let args: Vec<std::ffi::OsString> = vec![
        bin.into(),
        "--dont-fork".into(),
        "--log-console".into(),
        "--log-detail".into(),
        "--vrrp".into(),
        "--no-syslog".into(),
        "--dont-respawn".into(),
        "--use-file".into(),
        conf.into(),
        "--pid".into(),
        pid("keepalived").into(),
        "--vrrp_pid".into(),
        pid("vrrp").into(),
    ];
    lab.spawn(Node::Lb2, &args)
}

/// The pid in keepalived's VRRP pid file (`--vrrp_pid`) for `tag`, checked to be a
/// child of `parent` (the keepalived this test started).
fn vrrp_child(lab: &Lab, tag: &str, parent: u32) -> Result<libc::pid_t> {
    let file = lab.dir().join(format!("vrrp-{tag}.pid"));
    let pid: libc::pid_t = std::fs::read_to_string(&file)
        .with_context(|| format!("reading {}", file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} holds no pid", file.display()))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
    let ppid: u32 = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no ppid in /proc/{pid}/stat: {stat:?}"))?;
    ensure!(
        ppid == parent,
        "keepalived's VRRP process {pid} has parent {ppid}, not {parent}"
    );
    Ok(pid)
}

/// keepalived in lb2's namespace (priority 200) is master; our agent in lb (150)
/// follows it. keepalived is killed: our agent takes over within 1 s and the client
/// reaches the VIP through it. keepalived comes back: our agent yields to it.
#[test]
fn keepalived_interop() -> Result<()> {
    if !lb_tests::require_root("keepalived_interop") {
        return Ok(());
    }
    let Some(bin) = keepalived_bin() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("keepalived is not installed (cargo xtask setup installs it)");
        }
        eprintln!("\n*** keepalived_interop: NOT RUN: keepalived is not installed ***\n");
        return Ok(());
    };
    let lab = failover_lab()?;
    let mut agents = Agents::new(&lab);
    let ka = start_keepalived(&lab, &bin, 200, "1")?;
    agents.others.push(("keepalived (first)".into(), ka));
    let entered = |agents: &Agents, i: usize, state: &str| {
        agents.others[i]
            .1
            .log()
            .contains(&format!("Entering {state} STATE"))
    };
    let start = Instant::now();
    while !entered(&agents, 0, "MASTER") {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "keepalived did not become master within 10 s"
        );
        thread::sleep(POLL);
    }
    let lb2_addr = addr4(Node::Lb2);
    agents.start(Node::Lb, &config(&lab, Node::Lb, &vrrp(PRIO_LB)))?;
    let (_, s) = wait_status(&lab, Node::Lb, "backup of keepalived", TAKEOVER_WAIT, |s| {
        follows(s, lb2_addr)
            && s.vrrp
                .as_ref()
                .is_some_and(|v| v.counters.adverts_received >= 3)
    })?;
    let v = vrrp_of(&s)?;
    ensure!(
        v.master.as_ref().is_some_and(|m| m.priority == 200),
        "master not at priority 200: {:?}",
        v.master
    );
    ensure!(
        v.counters.dropped.is_empty(),
        "our agent dropped keepalived's adverts: {:?}",
        v.counters
    );

    // SIGKILL to keepalived's VRRP process (a child of the one we started, which would
    // take a killed parent as a stop and resign): no priority 0, our agent waits out
    // the master-down time. --dont-respawn: the parent does not start another.
    let parent = agents.others[0].1.pid().context("keepalived's pid")?;
    let child = vrrp_child(&lab, "1", parent)?;
    let at = Instant::now();
    // SAFETY: kill(2) on keepalived's VRRP process, a child of our child (checked above).
    ensure!(
        unsafe { libc::kill(child, libc::SIGKILL) } == 0,
        "killing keepalived's VRRP process {child}: {}",
        io::Error::last_os_error()
    );
    let (_, s) = wait_status(&lab, Node::Lb, "master", TAKEOVER_WAIT, is_master)?;
    let took = at.elapsed();
    let status = agents.others[0].1.stop()?;
    eprintln!(
        "failover: keepalived_interop: keepalived's VRRP process killed (the parent then ended: {status}); our agent master after {took:.1?} ({})",
        vrrp_of(&s)?
            .last_transition
            .as_ref()
            .map(|t| t.reason.as_str())
            .unwrap_or("")
    );
    ensure!(took < Duration::from_secs(1), "takeover took {took:?}");
    // A killed keepalived leaves its VIP on lb2's eth0: remove it, as its restart would.
    let _ = lab.exec(
        Node::Lb2,
        &["ip", "addr", "del", &format!("{VIP4}/32"), "dev", "eth0"],
    );
    let start = Instant::now();
    let backend = loop {
        match lab.ask_backend(vip4()) {
            Ok(b) => break b,
            Err(e) if start.elapsed() > Duration::from_secs(5) => {
                bail!("the client does not reach the VIP through our agent: {e}")
            }
            Err(_) => thread::sleep(POLL),
        }
    };
    check_neigh_on(&lab, Node::Lb, &[IpAddr::V4(VIP4)])?;
    eprintln!("failover: keepalived_interop: the client reaches {backend} through lb");

    // keepalived again, higher priority: it preempts us.
    let ka = start_keepalived(&lab, &bin, 200, "2")?;
    agents.others.push(("keepalived (second)".into(), ka));
    let at = Instant::now();
    let (_, s) = wait_status(
        &lab,
        Node::Lb,
        "backup of keepalived again",
        Duration::from_secs(10),
        |s| follows(s, lb2_addr),
    )?;
    eprintln!(
        "failover: keepalived_interop: our agent yielded {:.1?} after keepalived started again ({})",
        at.elapsed(),
        vrrp_of(&s)?
            .last_transition
            .as_ref()
            .map(|t| t.reason.as_str())
            .unwrap_or("")
    );
    ensure!(
        entered(&agents, 1, "MASTER"),
        "keepalived did not say it is master"
    );
    thread::sleep(Duration::from_millis(500));
    let s = lab.lbctl_status_on(Node::Lb)?;
    ensure!(
        follows(&s, lb2_addr),
        "not following keepalived 500 ms later: {:?}",
        s.vrrp
    );
    let log = &agents.others[1].1.log();
    ensure!(
        log.matches("Entering MASTER STATE").count() == 1,
        "keepalived flapped:\n{log}"
    );

    // The other way round: keepalived is the backup of our agent, takes over when our
    // agent is killed, and yields when our agent comes back with the higher priority.
    let status = agents.others[1].1.stop()?;
    wait_status(
        &lab,
        Node::Lb,
        "master after keepalived stopped",
        TAKEOVER_WAIT,
        is_master,
    )?;
    eprintln!("failover: keepalived_interop: keepalived stopped ({status}); our agent is master");
    let _ = lab.exec(
        Node::Lb2,
        &["ip", "addr", "del", &format!("{VIP4}/32"), "dev", "eth0"],
    );
    let ka = start_keepalived(&lab, &bin, PRIO_LB - 50, "3")?;
    agents.others.push(("keepalived (third, lower)".into(), ka));
    let count = |agents: &Agents, state: &str| {
        agents.others[2]
            .1
            .log()
            .matches(&format!("Entering {state} STATE"))
            .count()
    };
    let wait_count = |agents: &Agents, state: &str, n: usize, what: &str| -> Result<Duration> {
        let start = Instant::now();
        while count(agents, state) < n {
            ensure!(
                start.elapsed() < Duration::from_secs(10),
                "keepalived did not {what} within 10 s:\n{}",
                agents.others[2].1.log()
            );
            thread::sleep(POLL);
        }
        Ok(start.elapsed())
    };
    wait_count(&agents, "BACKUP", 1, "follow our agent")?;
    thread::sleep(Duration::from_millis(500));
    ensure!(
        count(&agents, "MASTER") == 0,
        "keepalived took over from a live master"
    );
    ensure!(
        is_master(&lab.lbctl_status_on(Node::Lb)?),
        "our agent lost master to a lower keepalived"
    );

    agents.kill(Node::Lb)?;
    let took = wait_count(&agents, "MASTER", 1, "take over from our killed agent")?;
    eprintln!(
        "failover: keepalived_interop: keepalived master {took:.1?} after our agent was killed"
    );
    ensure!(
        took < Duration::from_secs(1),
        "keepalived took {took:?} to take over"
    );

    agents.start(Node::Lb, &config(&lab, Node::Lb, &vrrp(PRIO_LB)))?;
    let took = wait_count(&agents, "BACKUP", 2, "yield to our agent")?;
    wait_status(&lab, Node::Lb, "master again", TAKEOVER_WAIT, is_master)?;
    eprintln!(
        "failover: keepalived_interop: keepalived yielded {took:.1?} after our agent started again"
    );
    agents.finish();
    Ok(())
}
