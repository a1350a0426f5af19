//! Restarting the agent of a standalone host, in a network-namespace lab: the program
//! stays attached through its pinned link, the next agent replaces it in that link and
//! takes the pinned maps over, and no connection notices; `lb-agent --detach` then
//! removes the program and the pins for good. Needs root; see `lb_tests::lab`.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use lb_tests::lab::{Lab, Load, Node, SERVICE_PORT, Service, VIP4, probe_gap};
use lb_userspace::protocol::BackendState;

/// The prober: a connection every 5 ms, 80 ms to connect and read the greeting.
const PROBE_EVERY: Duration = Duration::from_millis(5);
const PROBE_TIMEOUT: Duration = Duration::from_millis(80);
const PROBE_MAX: Duration = Duration::from_secs(60);
const UP_TIMEOUT: Duration = Duration::from_secs(10);

fn vip() -> SocketAddr {
    (VIP4, SERVICE_PORT).into()
}

/// Waits (at most 5 s) until `n` probes begun after `since` have succeeded.
fn successes_since(probe: &Load, since: Instant, n: usize) -> bool {
    probe.wait_for(Duration::from_secs(5), |attempts| {
        attempts
            .iter()
            .filter(|a| a.started >= since && a.outcome.is_ok())
            .count()
            >= n
    })
}

/// SIGTERM, then a new agent with the same config: not one probe fails, a long-lived
/// connection to a drained backend still echoes there, and the new agent shows the
/// flow table the old one left. Then `--detach`: the VIP is no longer answered and the
/// pins are gone.
#[test]
fn restart_loses_no_flow_and_detach_removes_everything() -> Result<()> {
    if !lb_tests::require_root("restart_loses_no_flow_and_detach_removes_everything") {
        return Ok(());
    }
    let lab = Lab::builder().backends(3).ipv6(false).build()?;
    lab.start_servers(SERVICE_PORT)?;
    let config = lab.config(
        "native",
        &[Service::new("web", VIP4, SERVICE_PORT).backends(1..=3)],
    );
    let mut first = lab.spawn_agent(&config)?;
    lab.wait_backends_up("web", &["b1", "b2", "b3"], UP_TIMEOUT)?;
    // The connection table, as the agent says it made it (and, after the restart,
    // found it).
    let table = "connection table: 262144 slots in buckets of 8 (max_flows = 262144)";
    ensure!(
        first.count_log(table) == 1,
        "the agent did not log {table:?}:\n{}",
        first.log()
    );

    // A long-lived connection, then its backend drained: it must stay there.
    let mut long = lab.converse(vip())?;
    ensure!(long.echo("hello")? == "hello", "no echo");
    let drained = long.greeting.clone();
    lab.lbctl_ok(&["backend", "disable", "web", &drained])?;
    lab.wait_backend("web", &drained, "draining", UP_TIMEOUT, |b| {
        b.state == BackendState::Draining && b.active_flows >= 1
    })?;
    ensure!(long.echo("drained")? == "drained", "no echo once drained");

    let probe = lab.start_probe(vip(), PROBE_EVERY, PROBE_TIMEOUT, PROBE_MAX)?;
    ensure!(
        successes_since(&probe, Instant::now() - Duration::from_secs(1), 20),
        "the prober does not reach the VIP before the restart"
    );
    let before = first.status()?;
    println!(
        "before: {} connections, {} pinned in the flow tables",
        before.flows.connections, before.flows.pinned
    );

    // The restart: SIGTERM, then the same config again.
    let at = Instant::now();
    let status = first.stop()?;
    ensure!(status.success(), "lb-agent exited with {status}");
    ensure!(
        first.count_log("the program stays attached to eth0 and forwarding") == 1,
        "the old agent did not say it left the program forwarding:\n{}",
        first.log()
    );
    let stopped = at.elapsed();
    let second = lab.spawn_agent(&config)?;
    let ready = at.elapsed();
    for line in [
        "reusing the maps pinned at",
        "took over the program on eth0: replaced in its pinned link",
        table,
    ] {
        ensure!(
            second.count_log(line) == 1,
            "the new agent did not log {line:?}:\n{}",
            second.log()
        );
    }
    let settled = Instant::now();
    ensure!(
        successes_since(&probe, settled, 20),
        "the prober did not go on after the restart"
    );
    let attempts = probe.stop();
    let failed: Vec<_> = attempts.iter().filter(|a| a.outcome.is_err()).collect();
    let gap = probe_gap(&attempts, at);
    println!(
        "restart: old agent gone after {stopped:.1?}, new one ready after {ready:.1?}; {} probes, {} failed; {}",
        attempts.len(),
        failed.len(),
        gap.map(|g| g.to_string()).unwrap_or_default()
    );
    ensure!(
        failed.is_empty(),
        "{} probes failed across the restart, first: {:?}",
        failed.len(),
        failed.first().map(|a| &a.outcome)
    );
    let quiet = attempts
        .iter()
        .filter(|a| a.started > at && a.started < at + ready)
        .count();
    ensure!(
        quiet > 0,
        "no probe ran while the agents changed places: nothing was shown"
    );
    let to_drained = attempts
        .iter()
        .filter(|a| a.started > at && a.backend() == Some(drained.as_str()))
        .count();
    ensure!(
        to_drained == 0,
        "{to_drained} new connections went to the drained backend {drained}"
    );

    // The long-lived connection still reaches its (drained) backend.
    ensure!(
        long.echo("after the restart")? == "after the restart",
        "the long-lived connection lost its echo"
    );
    let after = second.status()?;
    println!(
        "after: {} connections, {} pinned in the flow tables",
        after.flows.connections, after.flows.pinned
    );
    ensure!(
        after.flows.connections > 0 && after.flows.connections >= before.flows.connections,
        "the flow table was not kept: {} connections before, {} after",
        before.flows.connections,
        after.flows.connections
    );
    ensure!(
        after.flows.pinned >= before.flows.pinned,
        "pinned flows lost: {} before, {} after",
        before.flows.pinned,
        after.flows.pinned
    );
    let b = lab.lbctl_backend("web", &drained)?;
    ensure!(
        b.state == BackendState::Draining && b.active_flows >= 1,
        "the new agent does not see the drained backend's flow: {b:?}"
    );

    // --detach: the program and the pins go for good.
    let mut second = second;
    let out = second.detach()?;
    println!(
        "detach: {}",
        String::from_utf8_lossy(&out.stderr)
            .trim()
            .replace('\n', " | ")
    );
    let pins = lab.bpffs_dir_of(Node::Lb);
    ensure!(!pins.exists(), "{} still exists", pins.display());
    ensure!(
        lab.connect(vip(), Duration::from_millis(500)).is_err(),
        "the VIP still answers after --detach"
    );
    Ok(())
}
