//! A spoofed SYN flood larger than the flow table against a VRRP pair, end to end in the
//! namespace lab: `lb` (master, priority 150) and `lb2` (backup, 100), adverts every
//! 100 ms, three backends. While `hping3` (bounded in count) floods the VIP's service
//! port from random sources, the master's `lbctl status` is polled at 5 Hz, a client
//! opens short connections, and a long-lived connection to a backend that was drained
//! before the flood sits idle. Expected: no VRRP transition on either host, the idle
//! connection keeps its backend, at least 99 % of the short connections succeed, and
//! every `lbctl status` answers. Needs root; see `lb_tests::lab`.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use lb_tests::lab::{Lab, Node, SERVICE_PORT, Service, VIP4, VrrpSection};
use lb_userspace::protocol::{Status, VrrpState};

/// A small table, so that a flood of a few seconds overfills it.
const MAX_FLOWS: u32 = 16_384;
/// SYNs in the flood: well over the table, at hping3's pace (about 18,000/s here).
const FLOOD_SYNS: u32 = 60_000;
const FLOOD_TIMEOUT: Duration = Duration::from_secs(60);
const STATUS_EVERY: Duration = Duration::from_millis(200);
/// How long one `lbctl status` may take before the test calls it stuck.
const STATUS_LIMIT: Duration = Duration::from_secs(2);

fn vip4() -> SocketAddr {
    (VIP4, SERVICE_PORT).into()
}

fn config(lab: &Lab, node: Node, priority: u8) -> String {
    let services = [Service::new("web4", VIP4, SERVICE_PORT).backends(1..=3)];
    let mut file = lab
        .config_file(node, "native", &services)
        .vrrp(VrrpSection::new(51, priority).advert_interval_ms(100));
    file.agent.max_flows = Some(MAX_FLOWS);
    file.to_toml()
}

fn vrrp_state(status: &Status) -> Option<VrrpState> {
    status.vrrp.as_ref().map(|v| v.state)
}

/// What the status poller saw.
#[derive(Default)]
struct Polls {
    answered: usize,
    failed: Vec<String>,
    slowest: Duration,
    /// Every state either host was seen in that was not the expected one.
    wrong_states: Vec<String>,
}

#[test]
fn syn_flood_moves_no_vip_and_costs_no_pinned_flow() -> Result<()> {
    const TEST: &str = "syn_flood_moves_no_vip_and_costs_no_pinned_flow";
    if !lb_tests::require_root(TEST) {
        return Ok(());
    }
    let lab = Lab::builder().backends(3).second_lb(true).build()?;
    lab.start_servers(SERVICE_PORT)?;
    let lb = lab.spawn_agent_on(Node::Lb, &config(&lab, Node::Lb, 150))?;
    lab.wait_status_on(Node::Lb, "master", Duration::from_secs(5), |s| {
        s.serving && vrrp_state(s) == Some(VrrpState::Master)
    })?;
    let lb2 = lab.spawn_agent_on(Node::Lb2, &config(&lab, Node::Lb2, 100))?;
    lab.wait_status_on(Node::Lb2, "backup", Duration::from_secs(5), |s| {
        !s.serving
            && vrrp_state(s) == Some(VrrpState::Backup)
            && s.vrrp
                .as_ref()
                .is_some_and(|v| v.counters.adverts_received >= 3)
    })?;
    let transitions = |node: Node| -> Result<Option<u64>> {
        Ok(lab
            .lbctl_status_on(node)?
            .vrrp
            .and_then(|v| v.last_transition.map(|t| t.at_unix_ms)))
    };
    let (t1, t2) = (transitions(Node::Lb)?, transitions(Node::Lb2)?);

    // The long-lived connection, then its backend drained on the master.
    let mut idle = lab.converse(vip4()).context("long-lived connection")?;
    ensure!(idle.echo("hello")? == "hello", "no echo before the flood");
    let drained = idle.greeting.clone();
    lab.lbctl_ok_on(Node::Lb, &["backend", "disable", "web4", &drained])?;
    let backend = lab
        .lbctl_backends(Some("web4"))?
        .into_iter()
        .find(|b| b.name == drained)
        .ok_or_else(|| anyhow!("backend {drained} not listed"))?;
    ensure!(
        backend.active_flows >= 1 && !backend.in_ring,
        "the drained backend should be out of the ring with its flow counted: {backend:?}"
    );

    // 5 Hz status polls on the master, with both hosts' states checked each time;
    // legitimate clients (a short connection every 20 ms) through the flood.
    let stop = AtomicBool::new(false);
    let (polls, attempts, flood_out) = thread::scope(|scope| -> Result<_> {
        let poller = scope.spawn(|| poll_status(&lab, &stop));
        let load = lab.start_load(
            vip4(),
            5_000,
            FLOOD_TIMEOUT + Duration::from_secs(10),
            Duration::from_millis(20),
        )?;
        let flood = lab.syn_flood(FLOOD_SYNS, FLOOD_TIMEOUT);
        // A little more load after the flood, on the overfilled table.
        thread::sleep(Duration::from_secs(1));
        let attempts = load.stop();
        stop.store(true, Ordering::Relaxed);
        let polls = poller
            .join()
            .map_err(|_| anyhow!("the status poller panicked"))?;
        Ok((polls, attempts, flood?))
    })?;

    let status = lab.lbctl_status_on(Node::Lb)?;
    let ok = attempts.iter().filter(|a| a.outcome.is_ok()).count();
    let share = ok as f64 / attempts.len().max(1) as f64;
    eprintln!(
        "flood: hping3: {}; table {} connections (max {MAX_FLOWS}), {} pinned, counters {:?}",
        flood_out.summary(),
        status.flows.connections,
        status.flows.pinned,
        status.counters
    );
    eprintln!(
        "flood: {} of {} short connections succeeded ({:.2} %); lbctl status answered {} times, slowest {:.1?}, {} failed",
        ok,
        attempts.len(),
        share * 100.0,
        polls.answered,
        polls.slowest,
        polls.failed.len()
    );
    let report = || format!("lb:\n{}\nlb2:\n{}", lb.log(), lb2.log());
    // Every new flow the guard let through was recorded; at least twice the table's
    // size of them means the table gave up at least a table's worth to new flows.
    let recorded =
        status.services[0].new_flows - status.events.get("flow_not_recorded").copied().unwrap_or(0);
    ensure!(
        recorded >= 2 * u64::from(MAX_FLOWS),
        "the flood recorded only {recorded} flows in a table of {MAX_FLOWS}: the test proves nothing"
    );
    ensure!(
        polls.failed.is_empty(),
        "lbctl status failed during the flood: {:?}",
        polls.failed
    );
    ensure!(
        polls.answered >= 10,
        "too few status polls: {}",
        polls.answered
    );
    ensure!(
        polls.slowest < STATUS_LIMIT,
        "lbctl status took {:.1?}",
        polls.slowest
    );
    ensure!(
        polls.wrong_states.is_empty(),
        "a host left its state during the flood: {:?}\n{}",
        polls.wrong_states,
        report()
    );
    ensure!(
        (transitions(Node::Lb)?, transitions(Node::Lb2)?) == (t1, t2),
        "a VRRP transition happened during the flood\n{}",
        report()
    );
    ensure!(
        share >= 0.99,
        "only {:.2} % of the short connections succeeded; first error: {:?}",
        share * 100.0,
        attempts.iter().find_map(|a| a.outcome.as_ref().err())
    );
    let back = idle
        .echo("still here")
        .with_context(|| format!("the idle connection to drained {drained} after the flood"))?;
    ensure!(back == "still here", "echoed {back:?}");
    ensure!(
        status.flows.pinned >= 1,
        "the drained backend's flow is not pinned: {:?}",
        status.flows
    );
    Ok(())
}

/// Polls the master's `lbctl status` at 5 Hz until `stop` (bounded in time), checking
/// both hosts' VRRP state each time.
fn poll_status(lab: &Lab, stop: &AtomicBool) -> Polls {
    let mut polls = Polls::default();
    let deadline = Instant::now() + FLOOD_TIMEOUT + Duration::from_secs(30);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let asked = Instant::now();
        match lab.lbctl_status_on(Node::Lb) {
            Ok(s) => {
                polls.answered += 1;
                polls.slowest = polls.slowest.max(asked.elapsed());
                if !(s.serving && vrrp_state(&s) == Some(VrrpState::Master)) {
                    polls.wrong_states.push(format!("lb: {:?}", vrrp_state(&s)));
                }
            }
            Err(e) => polls.failed.push(format!("{e:#}")),
        }
        if let Ok(s) = lab.lbctl_status_on(Node::Lb2)
            && (s.serving || vrrp_state(&s) != Some(VrrpState::Backup))
        {
            polls
                .wrong_states
                .push(format!("lb2: {:?}", vrrp_state(&s)));
        }
        thread::sleep(STATUS_EVERY.saturating_sub(asked.elapsed()));
    }
    polls
}
