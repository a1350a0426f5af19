//! lb-demo: builds a namespace lab, starts lb-agent on it and shows how connections to
//! the VIP spread over the backends. Root only (namespaces, XDP). Everything it makes
//! is removed when it ends, also on failure. `cargo xtask demo` builds and runs it.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use lb_tests::lab::{Lab, Node, SERVICE_PORT, Service, Spread, VIP4, VIP6, addr4, addr6};

const USAGE: &str = "usage: lb-demo [--connections N]   (root; N from 10 to 10000, default 300)";
const BACKENDS: usize = 3;
/// Whole-run bound of each batch of connections.
const BUDGET: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let connections = match parse_args() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("lb-demo: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "lb-demo: needs root: it creates network namespaces and loads XDP programs.\n\
             Run it as root, e.g. `sudo cargo xtask demo`."
        );
        return ExitCode::FAILURE;
    }
    match demo(connections) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nlb-demo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> Result<usize> {
    let mut connections = 300;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--connections" | "-n" => {
                let value = args.next().context("--connections needs a number")?;
                connections = value
                    .parse()
                    .with_context(|| format!("not a number: {value}"))?;
                if !(10..=10_000).contains(&connections) {
                    bail!("--connections must be from 10 to 10000");
                }
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(connections)
}

fn demo(connections: usize) -> Result<()> {
    println!("lb-demo: an XDP TCP load balancer in a network-namespace lab\n");
    println!("Building the lab ...");
    let lab = Lab::builder().backends(BACKENDS).ipv6(true).build()?;
    let p = lab.prefix();
    println!(
        "  namespaces  {p}-cl (client), {p}-lb (load balancer), {p}-b1..{p}-b{BACKENDS} (backends),"
    );
    println!("              {p}-br (bridge br0 joining everyone's eth0 through veth pairs)");
    println!(
        "  addresses   client {} / {}, load balancer {} / {},",
        addr4(Node::Client),
        addr6(Node::Client),
        addr4(Node::Lb),
        addr6(Node::Lb)
    );
    println!(
        "              backends {}..{} / {}..{}",
        addr4(Node::Backend(1)),
        addr4(Node::Backend(BACKENDS)),
        addr6(Node::Backend(1)),
        addr6(Node::Backend(BACKENDS))
    );
    println!(
        "  VIPs        {VIP4} and {VIP6}, port {SERVICE_PORT}: on each backend's lo (direct server"
    );
    println!(
        "              return); the LB's XDP program answers ARP / neighbour solicitations for them"
    );

    lab.start_servers(SERVICE_PORT)?;
    println!(
        "\nEach backend runs a small TCP server on port {SERVICE_PORT} that greets with its name (b1, b2, b3)."
    );

    let equal = |vip: std::net::IpAddr, name: &str| {
        Service::new(name, vip, SERVICE_PORT).backends(1..=BACKENDS)
    };
    let config = lab.config(
        "native",
        &[equal(VIP4.into(), "web"), equal(VIP6.into(), "web6")],
    );
    println!("Starting lb-agent in {p}-lb (native XDP on eth0) ...");
    let mut agent = lab.spawn_agent(&config)?;
    for line in agent.log().lines() {
        println!("  {line}");
    }

    let vip4: SocketAddr = (VIP4, SERVICE_PORT).into();
    let vip6: SocketAddr = (VIP6, SERVICE_PORT).into();
    let equal_shares = [("b1", 1.0), ("b2", 1.0), ("b3", 1.0)];

    println!(
        "\n1. Equal weights (100, 100, 100): {connections} connections from the client to {vip4}"
    );
    let spread = lab.spread(vip4, connections, BUDGET);
    report(&lab, &spread, &equal_shares)?;

    println!("\n2. Weights 100, 200, 300: config rewritten, then lbctl reload");
    let weighted = Service::new("web", VIP4, SERVICE_PORT)
        .backend(1, 100)
        .backend(2, 200)
        .backend(3, 300);
    let answer = agent.reload(&lab.config("native", &[weighted, equal(VIP6.into(), "web6")]))?;
    println!("   lbctl reload: {}", answer.trim());
    println!("   {connections} connections to {vip4}, expected shares 1/6, 2/6, 3/6");
    let spread = lab.spread(vip4, connections, BUDGET);
    report(&lab, &spread, &[("b1", 1.0), ("b2", 2.0), ("b3", 3.0)])?;

    println!("\n3. IPv6, equal weights: {connections} connections to {vip6}");
    let spread = lab.spread(vip6, connections, BUDGET);
    report(&lab, &spread, &equal_shares)?;

    println!("\n4. What an operator sees: lbctl status");
    for line in lab.lbctl_ok(&["status"])?.lines() {
        println!("   {line}");
    }

    println!(
        "\nEvery connection reached a backend. Cleaning up: lb-agent stops, the namespaces go."
    );
    let status = agent.stop()?;
    if !status.success() {
        bail!("lb-agent did not exit cleanly: {status}\n{}", agent.log());
    }
    Ok(())
}

/// Prints the table; fails if a connection failed or a share is far off.
fn report(lab: &Lab, spread: &Spread, shares: &[(&str, f64)]) -> Result<()> {
    println!("{}", spread.table());
    spread
        .check_shares(shares, 0.5, 1.5)
        .map_err(|e| e.context(format!("what the kernel says:\n{}", lab.diagnostics())))
}
