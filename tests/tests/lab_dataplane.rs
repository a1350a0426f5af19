//! The data path end to end, in a network-namespace lab: a client connects to a VIP,
//! lb-agent's XDP program on the LB sends each new connection to a backend, and the
//! backend answers the client directly. Needs root; see `lb_tests::lab`.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lb_tests::lab::{Lab, Node, SERVICE_PORT, Service, VIP4, VIP6, addr4, addr6};

/// Whole-loop budget of a spread run; each connection has its own 2 s bounds too.
const BUDGET: Duration = Duration::from_secs(60);

fn vip4() -> SocketAddr {
    (VIP4, SERVICE_PORT).into()
}

fn vip6() -> SocketAddr {
    (VIP6, SERVICE_PORT).into()
}

/// A lab with `backends` backends, each running the greeting/echo server.
fn lab_with_servers(backends: usize) -> Result<Lab> {
    let lab = Lab::builder().backends(backends).build()?;
    lab.start_servers(SERVICE_PORT)?;
    Ok(lab)
}

/// Adds the lab's diagnostics to an error, for a failure caused by the data path.
fn with_diagnostics<T>(lab: &Lab, result: Result<T>) -> Result<T> {
    result.map_err(|e| e.context(format!("lab diagnostics:\n{}", lab.diagnostics())))
}

/// Not the data path: the lab itself works and leaves nothing behind. Runs without
/// lb-agent, so it also tells a lab problem apart from an agent problem.
#[test]
fn lab_reaches_backends_directly_and_cleans_up() -> Result<()> {
    if !lb_tests::require_root("lab_reaches_backends_directly_and_cleans_up") {
        return Ok(());
    }
    let prefix;
    {
        let lab = lab_with_servers(2)?;
        prefix = lab.prefix().to_string();
        for i in 1..=2 {
            for addr in [
                IpAddr::from(addr4(Node::Backend(i))),
                addr6(Node::Backend(i)).into(),
            ] {
                let name = lab
                    .ask_backend((addr, SERVICE_PORT).into())
                    .with_context(|| format!("asking {addr}"))?;
                ensure!(name == format!("b{i}"), "{addr} answered {name:?}");
            }
        }
        let mut conversation = lab.converse((addr4(Node::Backend(1)), SERVICE_PORT).into())?;
        ensure!(conversation.echo("hello")? == "hello", "no echo");

        // A stopped server refuses; a restarted one answers again.
        lab.stop_server(2, SERVICE_PORT);
        ensure!(
            lab.ask_backend((addr4(Node::Backend(2)), SERVICE_PORT).into())
                .is_err(),
            "b2 still answers"
        );
        lab.restart_server(2, SERVICE_PORT)?;
        ensure!(
            lab.ask_backend((addr4(Node::Backend(2)), SERVICE_PORT).into())? == "b2",
            "b2 did not come back"
        );

        // xdp_pass sits on the LB's veth peer, for native XDP_TX.
        let peer = lab.run(Node::Bridge, &["ip", "-d", "link", "show", "vlb"])?;
        ensure!(peer.contains("prog/xdp"), "no XDP program on vlb:\n{peer}");

        // The VIP lives on the backends' lo only: nothing answers ARP for it yet.
        ensure!(
            lab.connect(vip4(), Duration::from_millis(500)).is_err(),
            "the VIP answered without an LB"
        );

        let links = String::from_utf8_lossy(
            &std::process::Command::new("ip")
                .args(["-o", "link"])
                .output()?
                .stdout,
        )
        .into_owned();
        ensure!(
            !links.contains(&prefix) && !links.contains("vlb"),
            "lab links in the root namespace:\n{links}"
        );
    }
    let list = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()?
            .stdout,
    )
    .into_owned();
    ensure!(
        !list.lines().any(|l| l.starts_with(&format!("{prefix}-"))),
        "namespaces left behind:\n{list}"
    );
    Ok(())
}

/// Equal weights over IPv4: every connection lands, about a third each.
#[test]
fn ipv4_spreads_one_to_one_to_one() -> Result<()> {
    if !lb_tests::require_root("ipv4_spreads_one_to_one_to_one") {
        return Ok(());
    }
    let lab = lab_with_servers(3)?;
    let mut agent = lab.spawn_agent(&lab.config(
        "native",
        &[Service::new("web", VIP4, SERVICE_PORT).backends(1..=3)],
    ))?;
    let spread = lab.spread(vip4(), 600, BUDGET);
    println!("1:1:1 over IPv4:\n{}", spread.table());
    with_diagnostics(
        &lab,
        spread.check_shares(&[("b1", 1.0), ("b2", 1.0), ("b3", 1.0)], 0.6, 1.4),
    )?;

    let status = agent.stop()?;
    ensure!(
        status.success(),
        "lb-agent did not exit cleanly on SIGTERM: {status}\n{}",
        agent.log()
    );
    Ok(())
}

/// Weights 100:200:300 give about 1/6, 2/6 and 3/6 of the connections.
#[test]
fn ipv4_spreads_by_weight() -> Result<()> {
    if !lb_tests::require_root("ipv4_spreads_by_weight") {
        return Ok(());
    }
    let lab = lab_with_servers(3)?;
    let service = Service::new("web", VIP4, SERVICE_PORT)
        .backend(1, 100)
        .backend(2, 200)
        .backend(3, 300);
    let _agent = lab.spawn_agent(&lab.config("native", &[service]))?;
    let spread = lab.spread(vip4(), 600, BUDGET);
    println!("1:2:3 over IPv4:\n{}", spread.table());
    with_diagnostics(
        &lab,
        spread.check_shares(&[("b1", 1.0), ("b2", 2.0), ("b3", 3.0)], 0.6, 1.4),
    )
}

/// The same over IPv6: the XDP program answers neighbour solicitations for the VIP.
#[test]
fn ipv6_spreads_one_to_one_to_one() -> Result<()> {
    if !lb_tests::require_root("ipv6_spreads_one_to_one_to_one") {
        return Ok(());
    }
    let lab = lab_with_servers(3)?;
    let _agent = lab.spawn_agent(&lab.config(
        "native",
        &[Service::new("web6", VIP6, SERVICE_PORT).backends(1..=3)],
    ))?;
    let spread = lab.spread(vip6(), 600, BUDGET);
    println!("1:1:1 over IPv6:\n{}", spread.table());
    with_diagnostics(
        &lab,
        spread.check_shares(&[("b1", 1.0), ("b2", 1.0), ("b3", 1.0)], 0.6, 1.4),
    )
}

/// A backend taken out of the ring keeps its open connections (the flow table holds
/// them) and gets no new ones.
#[test]
fn long_lived_connection_survives_removal_from_the_ring() -> Result<()> {
    if !lb_tests::require_root("long_lived_connection_survives_removal_from_the_ring") {
        return Ok(());
    }
    let lab = lab_with_servers(3)?;
    let all = Service::new("web", VIP4, SERVICE_PORT).backends(1..=3);
    let mut agent = lab.spawn_agent(&lab.config("native", &[all]))?;

    let mut long_lived = with_diagnostics(
        &lab,
        lab.converse(vip4())
            .context("opening the long-lived connection"),
    )?;
    let removed = long_lived.greeting.clone();
    println!("the long-lived connection landed on {removed}");
    ensure!(
        long_lived.echo("before the reload")? == "before the reload",
        "no echo before the reload"
    );

    let remaining: Vec<usize> = (1..=3).filter(|&i| format!("b{i}") != removed).collect();
    ensure!(remaining.len() == 2, "unexpected greeting {removed:?}");
    agent.reload(&lab.config(
        "native",
        &[Service::new("web", VIP4, SERVICE_PORT).backends(remaining.clone())],
    ))?;
    println!("reloaded without {removed}; remaining: {remaining:?}");

    for k in 0..5 {
        let line = format!("after the reload {k}");
        let echoed = with_diagnostics(
            &lab,
            long_lived
                .echo(&line)
                .context("echo on the long-lived connection"),
        )?;
        ensure!(
            echoed == line,
            "the long-lived connection echoed {echoed:?} for {line:?}"
        );
    }
    println!("the long-lived connection to {removed} still echoes after the reload");

    let spread = lab.spread(vip4(), 300, BUDGET);
    println!(
        "new connections after removing {removed}:\n{}",
        spread.table()
    );
    let shares: Vec<(String, f64)> = remaining.iter().map(|i| (format!("b{i}"), 1.0)).collect();
    let shares: Vec<(&str, f64)> = shares.iter().map(|(n, w)| (n.as_str(), *w)).collect();
    // check_shares also fails if the removed backend got any connection.
    with_diagnostics(&lab, spread.check_shares(&shares, 0.6, 1.4))?;
    ensure!(
        spread.count(&removed) == 0,
        "{removed} got new connections after its removal"
    );

    // The old connection is still there after the new ones too.
    ensure!(
        long_lived.echo("at the end")? == "at the end",
        "the long-lived connection broke"
    );
    Ok(())
}

/// Traffic that is not for a VIP passes through the XDP program untouched: the client
/// pings the LB's own address and talks TCP to a server in the LB namespace, on the
/// service's port.
#[test]
fn traffic_not_for_a_vip_passes() -> Result<()> {
    if !lb_tests::require_root("traffic_not_for_a_vip_passes") {
        return Ok(());
    }
    let lab = lab_with_servers(2)?;
    let services = [
        Service::new("web", VIP4, SERVICE_PORT).backends(1..=2),
        Service::new("web6", VIP6, SERVICE_PORT).backends(1..=2),
    ];
    let _agent = lab.spawn_agent(&lab.config("native", &services))?;
    lab.start_server_on(Node::Lb, SERVICE_PORT)?;

    for target in [addr4(Node::Lb).to_string(), addr6(Node::Lb).to_string()] {
        let ping = lab.exec(
            Node::Client,
            &["ping", "-c", "3", "-i", "0.2", "-W", "2", &target],
        )?;
        println!(
            "ping {target}: {}",
            String::from_utf8_lossy(&ping.stdout)
                .lines()
                .rev()
                .nth(1)
                .unwrap_or("")
        );
        ensure!(
            ping.status.success(),
            "ping {target} failed: {}{}\n{}",
            String::from_utf8_lossy(&ping.stdout),
            String::from_utf8_lossy(&ping.stderr),
            lab.diagnostics()
        );
    }

    let start = Instant::now();
    for addr in [IpAddr::from(addr4(Node::Lb)), addr6(Node::Lb).into()] {
        let target: SocketAddr = (addr, SERVICE_PORT).into();
        for _ in 0..20 {
            let name = with_diagnostics(
                &lab,
                lab.ask_backend(target)
                    .with_context(|| format!("connecting to {target}")),
            )?;
            ensure!(
                name == "lb",
                "{target} was answered by {name:?}, not by the LB itself"
            );
        }
        let mut conversation = lab.converse(target)?;
        ensure!(
            conversation.echo("not for a VIP")? == "not for a VIP",
            "no echo from {target}"
        );
    }
    println!(
        "40 connections to the LB's own addresses, all answered by the LB, in {:.2?}",
        start.elapsed()
    );

    // And the VIP still balances while the LB serves its own port.
    let spread = lab.spread(vip4(), 60, BUDGET);
    println!("VIP alongside:\n{}", spread.table());
    with_diagnostics(
        &lab,
        spread.check_shares(&[("b1", 1.0), ("b2", 1.0)], 0.4, 1.6),
    )
}

/// No root needed: the share check used above does reject bad spreads.
#[test]
fn share_check_rejects_bad_spreads() {
    use lb_tests::lab::Spread;
    let spread = |counts: &[(&str, usize)], failures: usize, not_tried: usize| Spread {
        addr: vip4(),
        attempted: counts.iter().map(|&(_, n)| n).sum::<usize>() + failures,
        not_tried,
        counts: counts
            .iter()
            .map(|&(name, n)| (name.to_string(), n))
            .collect(),
        failures: (0..failures)
            .map(|k| format!("connection {k}: timed out"))
            .collect(),
        elapsed: Duration::from_secs(1),
    };
    let equal = [("b1", 1.0), ("b2", 1.0), ("b3", 1.0)];
    assert!(
        spread(&[("b1", 200), ("b2", 210), ("b3", 190)], 0, 0)
            .check_shares(&equal, 0.6, 1.4)
            .is_ok()
    );
    assert!(
        spread(&[("b1", 200), ("b2", 210), ("b3", 189)], 1, 0)
            .check_shares(&equal, 0.6, 1.4)
            .is_err()
    );
    assert!(
        spread(&[("b1", 200), ("b2", 210), ("b3", 190)], 0, 5)
            .check_shares(&equal, 0.6, 1.4)
            .is_err()
    );
    assert!(
        spread(&[("b1", 400), ("b2", 110), ("b3", 90)], 0, 0)
            .check_shares(&equal, 0.6, 1.4)
            .is_err()
    );
    assert!(
        spread(&[("b1", 300), ("b2", 300)], 0, 0)
            .check_shares(&equal, 0.6, 1.4)
            .is_err()
    );
    let two = [("b1", 1.0), ("b2", 1.0)];
    assert!(
        spread(&[("b1", 150), ("b2", 149), ("b3", 1)], 0, 0)
            .check_shares(&two, 0.6, 1.4)
            .is_err()
    );
    let weighted = [("b1", 1.0), ("b2", 2.0), ("b3", 3.0)];
    assert!(
        spread(&[("b1", 100), ("b2", 200), ("b3", 300)], 0, 0)
            .check_shares(&weighted, 0.6, 1.4)
            .is_ok()
    );
    assert!(
        spread(&[("b1", 200), ("b2", 200), ("b3", 200)], 0, 0)
            .check_shares(&weighted, 0.6, 1.4)
            .is_err()
    );
}
