//! NAT forwarding end to end in a network-namespace lab, with stock backends: no VIP on
//! their `lo`, no ARP sysctls, and their servers on another port than the service's.
//! Needs root; see `lb_tests::lab`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::lab::{Conversation, Lab, SERVICE_PORT, Service, Streaming, VIP4, VIP6};
use lb_userspace::protocol::BackendState;

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

/// Opens connections to `vip` until each of `wanted` holds one.
fn one_per_backend(
    lab: &Lab,
    vip: SocketAddr,
    wanted: &[&str],
    max_attempts: usize,
) -> Result<BTreeMap<String, Conversation>> {
    let mut held = BTreeMap::new();
    for k in 0..max_attempts {
        if held.len() == wanted.len() {
            return Ok(held);
        }
        let c = lab
            .converse(vip)
            .with_context(|| format!("connection attempt {k} to {vip}"))?;
        if wanted.contains(&c.greeting.as_str()) && !held.contains_key(&c.greeting) {
            held.insert(c.greeting.clone(), c);
        }
    }
    ensure!(
        held.len() == wanted.len(),
        "not one connection on each of {wanted:?} in {max_attempts}: {:?}",
        held.keys().collect::<Vec<_>>()
    );
    Ok(held)
}

fn echo(c: &mut Conversation, line: &str) -> Result<()> {
    let got = c
        .echo(line)
        .with_context(|| format!("echo {line:?} via {}", c.greeting))?;
    ensure!(got == line, "{} echoed {got:?} for {line:?}", c.greeting);
    Ok(())
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
        let mut held =
            with_diagnostics(&lab, one_per_backend(&lab, vip, &["b1", "b2", "b3"], 200))?;
        for (name, c) in held.iter_mut() {
            for k in 0..3 {
                with_diagnostics(&lab, echo(c, &format!("{vip} {name} {k}")))?;
            }
        }
    }
    let status = lab.lbctl_status()?;
    println!("lbctl status: {status:?}");
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
    let mut held = with_diagnostics(&lab, one_per_backend(&lab, vip, &["b1", "b2"], 200))?;
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
    with_diagnostics(&lab, echo(c, "still here"))?;
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
