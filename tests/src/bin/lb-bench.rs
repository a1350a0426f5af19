//! lb-bench: the XDP program's cost per packet through BPF_PROG_TEST_RUN with `repeat`,
//! beside a trivial XDP_PASS program measured in the same run on the same frame.
//! Rounds interleave the cases so that drift hits them all alike; medians are reported.
//!
//! With `repeat`, each run sees the previous run's output. Every case here rewrites at
//! most MAC addresses, so run 2..N take the same path as run 1.
//!
//! Then failover: two LB hosts with VRRP in the namespace lab, a client probing the VIP
//! every 5 ms; the gap without a successful connection when the master goes, beside the
//! longest gap the same prober sees over a quiet stretch of the same length (its own
//! resolution), measured in the same run.

use std::{
    net::SocketAddr,
    process::ExitCode,
    time::{Duration, Instant},
};

use lb_common::names;
use lb_tests::{
    lab::{Lab, Node, SERVICE_PORT, Service, VIP4, VrrpSection, probe_gap},
    packet::{ACK, SYN, tcp_frame},
    rig::{CLIENT_MAC, LB_MAC, Rig, XDP_PASS, XDP_TX, service},
};

const ROUNDS: usize = 9;
const REPEAT: u32 = 200_000;

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    /// Sent once before measuring (the SYN that creates an established flow).
    prime: Option<Vec<u8>>,
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_nanos() as f64
}

fn main() -> ExitCode {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("lb-bench: needs root (it loads the XDP program). Run: sudo cargo xtask bench");
        return ExitCode::FAILURE;
    }
    match run().and_then(|()| failover()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut rig = Rig::new(vec![
        service(
            "web",
            "192.0.2.10",
            80,
            65537,
            &["192.0.2.21", "192.0.2.22", "192.0.2.23"],
        ),
        service(
            "web6",
            "2001:db8::10",
            443,
            65537,
            &["2001:db8::21", "2001:db8::22", "2001:db8::23"],
        ),
    ])?;
    let c4 = ("198.51.100.7".parse()?, 40000);
    let c6 = ("2001:db8:1::7".parse()?, 40000);
    let vip4 = ("192.0.2.10".parse()?, 80);
    let vip6 = ("2001:db8::10".parse()?, 443);
    let frame = |src, dst, flags| tcp_frame(LB_MAC, CLIENT_MAC, None, src, dst, flags);
    let cases = [
        Case {
            name: "non-VIP IPv4 packet",
            frame: frame(c4, ("192.0.2.99".parse()?, 80), ACK),
            verdict: XDP_PASS,
            prime: None,
        },
        Case {
            name: "SYN to an IPv4 VIP",
            frame: frame(c4, vip4, SYN),
            verdict: XDP_TX,
            prime: None,
        },
        Case {
            name: "established IPv4 flow",
            frame: frame(c4, vip4, ACK),
            verdict: XDP_TX,
            prime: Some(frame(c4, vip4, SYN)),
        },
        Case {
            name: "non-VIP IPv6 packet",
            frame: frame(c6, ("2001:db8::99".parse()?, 443), ACK),
            verdict: XDP_PASS,
            prime: None,
        },
        Case {
            name: "SYN to an IPv6 VIP",
            frame: frame(c6, vip6, SYN),
            verdict: XDP_TX,
            prime: None,
        },
        Case {
            name: "established IPv6 flow",
            frame: frame(c6, vip6, ACK),
            verdict: XDP_TX,
            prime: Some(frame(c6, vip6, SYN)),
        },
    ];
    for case in &cases {
        if let Some(p) = &case.prime {
            rig.run_program(names::PROG_LB, p, 1)?;
        }
        let r = rig.run_program(names::PROG_LB, &case.frame, 1)?;
        anyhow::ensure!(
            r.verdict == case.verdict,
            "{}: verdict {} (want {})",
            case.name,
            r.verdict,
            case.verdict
        );
    }
    let mut lb: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    let mut pass: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, case) in cases.iter().enumerate() {
            pass[i].push(
                rig.run_program(names::PROG_PASS, &case.frame, REPEAT)?
                    .per_run,
            );
            lb[i].push(
                rig.run_program(names::PROG_LB, &case.frame, REPEAT)?
                    .per_run,
            );
        }
    }
    println!("XDP cost per packet, BPF_PROG_TEST_RUN, median of {ROUNDS} rounds x {REPEAT} runs");
    println!(
        "{:<24} {:>10} {:>14} {:>8} {:>10}",
        "case", "lb ns/pkt", "XDP_PASS ns", "ratio", "lb - pass"
    );
    for (i, case) in cases.iter().enumerate() {
        let l = median(lb[i].clone());
        let p = median(pass[i].clone());
        println!(
            "{:<24} {:>10.1} {:>14.1} {:>7.2}x {:>10.1}",
            case.name,
            l,
            p,
            l / p.max(1.0),
            l - p
        );
    }
    Ok(())
}

const FAILOVER_ROUNDS: usize = 3;
const PROBE_EVERY: Duration = Duration::from_millis(5);
const PROBE_TIMEOUT: Duration = Duration::from_millis(80);
/// How long each record runs: the event comes after a third of it.
const RECORD: Duration = Duration::from_secs(3);
/// How long the agent in `Node::Lb` may take to become master and serve.
const MASTER_WAIT: Duration = Duration::from_secs(10);

fn failover() -> anyhow::Result<()> {
    let lab = Lab::builder()
        .backends(3)
        .ipv6(false)
        .second_lb(true)
        .build()?;
    lab.start_servers(SERVICE_PORT)?;
    let services = [Service::new("web", VIP4, SERVICE_PORT).backends(1..=3)];
    let vip: SocketAddr = (VIP4, SERVICE_PORT).into();
    let master = lab.config_on(
        Node::Lb,
        "native",
        &services,
        Some(&VrrpSection::new(51, 150)),
    );
    let backup = lab.config_on(
        Node::Lb2,
        "native",
        &services,
        Some(&VrrpSection::new(51, 100)),
    );
    let gap_of = |attempts: &[lb_tests::lab::Attempt], at: Instant| -> anyhow::Result<f64> {
        let g = probe_gap(attempts, at)
            .ok_or_else(|| anyhow::anyhow!("no connection succeeded after the event"))?;
        Ok(g.gap.as_secs_f64() * 1000.0)
    };
    println!();
    println!(
        "VRRP failover, advert interval 100 ms: gap without a successful connection, client probing every {} ms",
        PROBE_EVERY.as_millis()
    );
    println!(
        "{:<28} {:>10} {:>12} {:>8}",
        "event", "gap ms", "quiet gap ms", "ratio"
    );
    for (name, graceful) in [
        ("graceful stop (SIGTERM)", true),
        ("agent killed (SIGKILL)", false),
    ] {
        let mut gaps = Vec::new();
        let mut quiet = Vec::new();
        for _ in 0..FAILOVER_ROUNDS {
            let _standby = lab.spawn_agent_on(Node::Lb2, &backup)?;
            let mut active = lab.spawn_agent_on(Node::Lb, &master)?;
            lab.wait_status_on(Node::Lb, "master", MASTER_WAIT, |s| s.serving)?;
            // The baseline: a record of the same length with nothing happening.
            let probe = lab.start_probe(vip, PROBE_EVERY, PROBE_TIMEOUT, RECORD)?;
            let start = Instant::now();
            std::thread::sleep(RECORD);
            quiet.push(gap_of(&probe.stop(), start + RECORD / 3)?);
            // The event.
            let probe = lab.start_probe(vip, PROBE_EVERY, PROBE_TIMEOUT, RECORD)?;
            std::thread::sleep(RECORD / 3);
            let event = Instant::now();
            if graceful {
                active.signal(libc::SIGTERM)?;
            } else {
                active.kill()?;
            }
            std::thread::sleep(RECORD * 2 / 3);
            gaps.push(gap_of(&probe.stop(), event)?);
        }
        let (g, q) = (median_ms(gaps), median_ms(quiet));
        println!("{name:<28} {g:>10.1} {q:>12.1} {:>7.1}x", g / q.max(0.001));
    }
    Ok(())
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
