//! lb-bench: the XDP program's cost per packet through BPF_PROG_TEST_RUN with `repeat`,
//! beside a trivial XDP_PASS program measured in the same run on the same frame.
//! Rounds interleave the cases so that drift hits them all alike; medians are reported.
//!
//! With `repeat`, each run sees the previous run's output. Every case here rewrites at
//! most MAC addresses, so run 2..N take the same path as run 1.

use std::{process::ExitCode, time::Duration};

use lb_common::names;
use lb_tests::{
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
    match run() {
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
