//! lb-bench: the XDP program's cost per packet through BPF_PROG_TEST_RUN with `repeat`,
//! beside a trivial XDP_PASS program measured in the same run on the same frame.
//! Rounds interleave the cases so that drift hits them all alike; medians are reported.
//!
//! With `repeat`, each run sees the previous run's output. Every case here rewrites at
//! most MAC addresses, and the rig's backends have the LB's own MAC (`rig::looped`), so
//! a forwarded frame comes out as it went in and run 2..N take the same path as run 1:
//! each measured run checks so in the counters (every one of its runs counted where the
//! case says), else the bench fails.
//!
//! Then NAT: the same comparison for the NAT path, both directions. NAT rewrites
//! addresses, so a repeated run would measure the program on its own output (no longer
//! to a VIP): every NAT case is measured as separate single runs, the trivial program
//! too, and medians compared; with `LB_BENCH_BASELINE=FILE` that build too, the two taking
//! turns at going first. `--nat-only` runs only this part.
//!
//! Then failover: two LB hosts with VRRP in the namespace lab, a client probing the VIP
//! every 5 ms; the gap without a successful connection when the master goes, beside the
//! longest gap the same prober sees over a quiet stretch of the same length (its own
//! resolution), measured in the same run.
//!
//! Then active-active (`[announce]`): a router namespace running BIRD in front of two LB
//! hosts, each running BIRD and lb-agent, the VIP announced over BGP and spread by
//! ECMP; the time from a graceful stop (SIGTERM) or a SIGKILL of one host's agent to
//! the router's withdrawal of that host, and the client's gap, beside the quiet gap.
//! `--announce-only` runs only this part.
//!
//! Then VRRP advert jitter on the wire: the same pair, adverts every 100 ms, the master's
//! adverts captured with tcpdump (kernel timestamps) in the client namespace; the gaps
//! between consecutive adverts with the agent idle, then with its flow table kept
//! overfilled by a SYN flood on every CPU while `lbctl status` is polled at 5 Hz.
//! `--jitter-only` runs only this part.
//!
//! Then flow-pin sync: two sync threads over loopback (127.0.0.1 and 127.0.0.2), the
//! receiver's flow scanner over a real (loaded, unattached) pinned table; the flows per
//! second one host sends and the other installs, and the bytes per flow on the wire.
//! `--sync-only` runs only this part.
//!
//! Then the flow scanner at a full connection table (the default size and 1M entries,
//! loaded unattached, every slot used): the table's read alone, then the whole
//! scan as at a ring change, and the share of a core the periodic scans take, once a
//! second beside the scans' budget. `--scan-only` runs only this part.
//!
//! Then the packet trace's cost while off: the program as shipped (trace code in, flag
//! off) beside the same program built without the trace code (lb-ebpf without its
//! `trace` feature) and XDP_PASS, interleaved in the same rounds. `--trace-only` runs
//! only this part.
//! `--xdp-only` runs only the first part (the XDP cost per packet, written to
//! `target/bench/` as `xdp.json`, `xdp.md` and `xdp.png`); with
//! `LB_BENCH_BASELINE=FILE` it also measures another build of the program beside it.
//!
//! Then the comparative lab bench (`lb_tests::bench`): direct, a null XDP forwarder,
//! the agent in DSR mode, the agent in NAT mode, HAProxy and nginx, rotated in each
//! repetition; connection rate, one bulk stream and the CPU split, written to
//! `target/bench/` as JSON, a Markdown table and PNG charts. `--lab-only` runs only this part; `--lab-report`
//! prints the table of the latest `lab.json` again and redraws its charts (no root).

use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, ExitCode},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use lb_common::{
    counters::{global_slot, reason, vip_slot},
    names,
};
use lb_tests::{
    bench::{
        comparative,
        report::LabReport,
        xdp::{self, XdpCase, XdpReport},
    },
    lab::{
        AnnounceSection, Lab, Node, ROUTED_VIP4, SERVICE_PORT, Service, SyncSection, VIP4,
        VrrpSection, addr4, probe_gap, run_bounded,
    },
    packet::{ACK, RST, SYN, tcp_frame},
    rig::{CLIENT_MAC, LB_MAC, Rig, XDP_PASS, XDP_TX, looped, service},
};
use lb_userspace::{
    dataplane::{MapSizes, OBJECT, OBJECT_UNTRACED, ServeSwitch, XdpDataPlane, monotonic_ns},
    pins::{self, PinDir},
};

const ROUNDS: usize = 9;
const REPEAT: u32 = 200_000;

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    /// Sent once before measuring (the SYN that creates an established flow).
    prime: Option<Vec<u8>>,
    /// The service a forwarded case's runs are counted on; `None`: not a VIP's packet,
    /// counted as passed to the host.
    service: Option<(IpAddr, u16)>,
    /// Measured with a serving lease set (as a VRRP master's), whose expiry each CPU
    /// checks about once a jiffy (`lb_common::lease`); cleared after.
    leased: bool,
}

impl Case {
    /// The counter slot every run of this case moves by one packet.
    fn slot(&self, rig: &Rig) -> anyhow::Result<u32> {
        Ok(match self.service {
            Some((vip, port)) => vip_slot(
                rig.programmer
                    .vip_num(vip, port)
                    .ok_or_else(|| anyhow::anyhow!("{}: no service {vip}:{port}", self.name))?,
            ),
            None => global_slot(reason::PASS_NOT_VIP),
        })
    }

    /// The balancer's time per run over `REPEAT` runs of this case, after checking that
    /// every run was counted where the case says (so none took a shorter path).
    fn time_lb(&self, rig: &mut Rig) -> anyhow::Result<Duration> {
        let slot = self.slot(rig)?;
        let before = rig.counter(slot).packets;
        let run = self.leased_if(rig, |rig| {
            rig.run_program(names::PROG_LB, &self.frame, REPEAT)
        })?;
        let counted = rig.counter(slot).packets - before;
        anyhow::ensure!(
            counted == u64::from(REPEAT) && run.verdict == self.verdict,
            "{}: {counted} of {REPEAT} runs counted on the case's path, last verdict {} \
             (want {}): the runs did not all do what the case measures",
            self.name,
            run.verdict,
            self.verdict
        );
        Ok(run.per_run)
    }

    /// `run` with the case's serving lease (`leased`: an hour ahead) set, then cleared.
    fn leased_if<T>(
        &self,
        rig: &mut Rig,
        run: impl FnOnce(&mut Rig) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        if !self.leased {
            return run(rig);
        }
        rig.serving
            .set_serving(true, monotonic_ns() + 3_600_000_000_000)?;
        let out = run(rig);
        rig.serving.set_serving(true, 0)?;
        out
    }

    /// Primes the flow if the case has one, then checks one run's verdict.
    fn check(&self, rig: &mut Rig) -> anyhow::Result<()> {
        if let Some(p) = &self.prime {
            rig.run_program(names::PROG_LB, p, 1)?;
        }
        let out = self.leased_if(rig, |rig| rig.run_program(names::PROG_LB, &self.frame, 1))?;
        anyhow::ensure!(
            out.verdict == self.verdict,
            "{}: verdict {} (want {})",
            self.name,
            out.verdict,
            self.verdict
        );
        Ok(())
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_nanos() as f64
}

const USAGE: &str = "usage: lb-bench [--xdp-only | --jitter-only | --sync-only | --scan-only
                 | --announce-only | --trace-only | --nat-only | --lab-only
                 | --lab-report]
                [--lab-reps N] [--lab-paths P,P,..] [--lab-napi threaded|inline]
                [--lab-out DIR]

With no part named, runs them all: XDP cost per packet, NAT cost per packet, VRRP
failover, BGP withdrawal
([announce]), advert jitter, flow-pin sync, the flow scanner at a full table, the
trace's cost while off, then the comparative lab bench.
  --xdp-only            only the XDP cost per packet; with LB_BENCH_BASELINE=FILE
                        (another build of lb-ebpf, same maps) that object is measured
                        in the same rounds too
  --jitter-only         only the VRRP advert jitter
  --sync-only           only the flow-pin sync rate
  --scan-only           only the flow scanner's cost at a full connection table
  --announce-only       only the [announce] withdrawal time and probe gap
  --trace-only          only the packet trace's cost while off
  --nat-only            only the NAT path's cost per packet, both directions; with
                        LB_BENCH_BASELINE=FILE as for --xdp-only
  --lab-only            only the comparative lab bench (direct, null XDP forwarder
                        one way and both ways, lb in DSR mode, lb in NAT mode,
                        HAProxy, nginx stream)
  --lab-report          print the Markdown table of DIR/lab.json again (medians and
                        ratios computed anew from its samples) and redraw its charts
                        (no root)
  --lab-reps N          repetitions of the lab bench, each path once in each (default 5)
  --lab-paths P,P,..    only these paths of the lab bench, of: direct, null-fwd,
                        lb-dsr, null-fwd-both, lb-nat, haproxy, nginx, and with
                        LB_BENCH_BASELINE_BIN_DIR=DIR (another build's lb-agent)
                        lb-dsr-baseline and lb-nat-baseline
                        (default: all, the baseline paths with that variable; the
                        ratios need direct and null-fwd among them)
  --lab-napi MODE       threaded (default): the LB veth's NAPI thread, the proxies and
                        the backend's servers pinned to the last CPU, wrk and iperf3
                        to CPU 0;
                        inline: nothing threaded or pinned
  --lab-out DIR         where the bench writes its files: lab.json, lab.md and the
                        lab's PNG charts; xdp.json, xdp.md and xdp.png for the XDP
                        cost per packet (default target/bench)";

/// Which parts to run, and the lab bench's settings.
struct Args {
    part: Option<String>,
    lab: comparative::Options,
    lab_out: std::path::PathBuf,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut args = Args {
        part: None,
        lab: comparative::Options::default(),
        lab_out: "target/bench".into(),
    };
    let mut paths_given = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--xdp-only" | "--jitter-only" | "--sync-only" | "--scan-only" | "--announce-only"
            | "--trace-only" | "--nat-only" | "--lab-only" | "--lab-report" => {
                if let Some(other) = &args.part {
                    anyhow::bail!("{other} and {arg} exclude each other");
                }
                args.part = Some(arg);
            }
            "--lab-reps" => {
                let v = value("--lab-reps")?;
                args.lab.repetitions = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=20).contains(n))
                    .ok_or_else(|| anyhow::anyhow!("--lab-reps takes 1 to 20, not {v:?}"))?;
            }
            "--lab-napi" => args.lab.napi = comparative::Napi::parse(&value("--lab-napi")?)?,
            "--lab-paths" => {
                paths_given = true;
                args.lab.paths = value("--lab-paths")?
                    .split(',')
                    .map(lb_tests::bench::report::Path::from_id)
                    .collect::<anyhow::Result<_>>()?;
            }
            "--lab-out" => args.lab_out = value("--lab-out")?.into(),
            _ => anyhow::bail!("unknown argument {arg:?}\n{USAGE}"),
        }
    }
    use lb_tests::bench::report::Path;
    args.lab.baseline_bin_dir = std::env::var_os(BASELINE_BIN_DIR_VAR).map(Into::into);
    match &args.lab.baseline_bin_dir {
        // A default run measures the baseline build beside each lb path.
        Some(_) if !paths_given => {
            args.lab.paths = Path::ALL
                .into_iter()
                .flat_map(|p| {
                    let base = Path::BASELINES.into_iter().find(|b| b.measured_as() == p);
                    std::iter::once(p).chain(base)
                })
                .collect();
        }
        Some(_) => {}
        None => {
            if let Some(p) = args.lab.paths.iter().find(|p| p.is_baseline()) {
                anyhow::bail!(
                    "the lab path {} needs {BASELINE_BIN_DIR_VAR}=DIR (another build's lb-agent)",
                    p.id()
                );
            }
        }
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("lb-bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if args.part.as_deref() == Some("--lab-report") {
        return match lab_report(&args.lab_out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("lb-bench: needs root (it loads the XDP program). Run: sudo cargo xtask bench");
        return ExitCode::FAILURE;
    }
    let lab = || lab_bench(&args.lab, &args.lab_out);
    let result = match args.part.as_deref() {
        Some("--xdp-only") => run(&args.lab_out),
        Some("--jitter-only") => jitter(),
        Some("--sync-only") => sync_pins(),
        Some("--scan-only") => flow_scan(),
        Some("--announce-only") => announce(),
        Some("--trace-only") => trace_cost(),
        Some("--nat-only") => nat(),
        Some(_) => lab(),
        None => run(&args.lab_out)
            .and_then(|()| nat())
            .and_then(|()| failover())
            .and_then(|()| announce())
            .and_then(|()| jitter())
            .and_then(|()| sync_pins())
            .and_then(|()| flow_scan())
            .and_then(|()| trace_cost())
            .and_then(|()| lab()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `LB_BENCH_BASELINE=FILE`: an object of another build of lb-ebpf (same maps),
/// measured in the same rounds as the shipped one: an A/B comparison that machine
/// noise between runs cannot blur.
const BASELINE_VAR: &str = "LB_BENCH_BASELINE";

/// The object `LB_BENCH_BASELINE` names, read; `None` without the variable.
fn baseline_object() -> anyhow::Result<Option<Vec<u8>>> {
    let Some(path) = std::env::var_os(BASELINE_VAR) else {
        return Ok(None);
    };
    std::fs::read(&path).map(Some).map_err(|e| {
        anyhow::anyhow!(
            "{BASELINE_VAR}={}: {e}",
            std::path::Path::new(&path).display()
        )
    })
}

/// `LB_BENCH_BASELINE_BIN_DIR=DIR`: the directory of another build's `lb-agent`, run by
/// the lab bench's baseline paths beside this build's, in the same rotation.
const BASELINE_BIN_DIR_VAR: &str = "LB_BENCH_BASELINE_BIN_DIR";

/// The XDP cost per packet; its files go to `out`.
fn run(out: &std::path::Path) -> anyhow::Result<()> {
    let services = || {
        let mut sticky = service(
            "sticky",
            "192.0.2.11",
            80,
            65537,
            &["192.0.2.21", "192.0.2.22", "192.0.2.23"],
        );
        sticky.persistence_timeout_s = 300;
        vec![
            sticky,
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
        ]
    };
    let mut rig = bench_rig(OBJECT, &services)?;
    let baseline_path = std::env::var_os(BASELINE_VAR);
    let mut baseline = match baseline_object()? {
        Some(object) => Some(bench_rig(&object, &services)?),
        None => None,
    };
    let c4 = ("198.51.100.7".parse()?, 40000);
    let c6 = ("2001:db8:1::7".parse()?, 40000);
    let vip6 = ("2001:db8::10".parse()?, 443);
    let sticky4 = ("192.0.2.11".parse()?, 80);
    let frame = |src, dst, flags| tcp_frame(LB_MAC, CLIENT_MAC, None, src, dst, flags);
    let vip4 = ("192.0.2.10".parse()?, 80);
    let [non_vip4, syn4, established4] = ipv4_cases()?;
    let cases = [
        non_vip4,
        syn4,
        established4,
        // The client's entry exists after the first run: every later SYN is a
        // persistent client's new connection (entry lookup and refresh, then FLOWS).
        Case {
            name: "SYN, persistent service",
            frame: frame(c4, sticky4, SYN),
            verdict: XDP_TX,
            prime: None,
            service: Some(sticky4),
            leased: false,
        },
        Case {
            name: "established, persistent",
            frame: frame(c4, sticky4, ACK),
            verdict: XDP_TX,
            prime: Some(frame(c4, sticky4, SYN)),
            service: Some(sticky4),
            leased: false,
        },
        Case {
            name: "established, VRRP lease",
            frame: frame(c4, vip4, ACK),
            verdict: XDP_TX,
            prime: Some(frame(c4, vip4, SYN)),
            service: Some(vip4),
            leased: true,
        },
        Case {
            name: "non-VIP IPv6 packet",
            frame: frame(c6, ("2001:db8::99".parse()?, 443), ACK),
            verdict: XDP_PASS,
            prime: None,
            service: None,
            leased: false,
        },
        Case {
            name: "SYN to an IPv6 VIP",
            frame: frame(c6, vip6, SYN),
            verdict: XDP_TX,
            prime: None,
            service: Some(vip6),
            leased: false,
        },
        Case {
            name: "established IPv6 flow",
            frame: frame(c6, vip6, ACK),
            verdict: XDP_TX,
            prime: Some(frame(c6, vip6, SYN)),
            service: Some(vip6),
            leased: false,
        },
    ];
    for r in std::iter::once(&mut rig).chain(baseline.as_mut()) {
        for case in &cases {
            case.check(r)?;
        }
    }
    let mut report = XdpReport {
        machine: comparative::machine(std::thread::available_parallelism().map_or(1, usize::from))?,
        rounds: ROUNDS,
        repeat: REPEAT,
        baseline: baseline_path.map(|p| p.to_string_lossy().into_owned()),
        cases: cases
            .iter()
            .map(|c| XdpCase {
                name: c.name.into(),
                ..XdpCase::default()
            })
            .collect(),
    };
    let ns = |d: Duration| d.as_nanos() as f64;
    for _ in 0..ROUNDS {
        for (case, figures) in cases.iter().zip(&mut report.cases) {
            figures.pass_ns.push(ns(rig
                .run_program(names::PROG_PASS, &case.frame, REPEAT)?
                .per_run));
            figures.lb_ns.push(ns(case.time_lb(&mut rig)?));
            if let Some(b) = baseline.as_mut() {
                figures.baseline_ns.push(ns(case.time_lb(b)?));
            }
        }
    }
    print!("{}", report.text());
    for file in xdp::write_files(&report, out)? {
        println!("  wrote {}", file.display());
    }
    Ok(())
}

/// A bpffs directory of the bench's own, its pins removed when dropped.
struct BenchPins(std::path::PathBuf);

/// The interface name the bench's pin directories are made under.
const BENCH_PINS_IF: &str = "bench0";

impl BenchPins {
    fn new(tag: &str) -> Self {
        let dir =
            std::path::PathBuf::from(format!("/sys/fs/bpf/lb-bench-{}-{tag}", std::process::id()));
        let _ = pins::remove(&dir, BENCH_PINS_IF);
        Self(dir)
    }
}

impl Drop for BenchPins {
    fn drop(&mut self) {
        if let Err(e) = pins::remove(&self.0, BENCH_PINS_IF) {
            eprintln!("lb-bench: removing {}: {e}", self.0.display());
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// One object's rig, its maps as the agent makes them by default.
fn bench_rig(
    object: &[u8],
    services: &dyn Fn() -> Vec<lb_userspace::config::Service>,
) -> anyhow::Result<Rig> {
    Rig::new_object_with(object, services(), MapSizes::default(), &looped)
}

/// Single runs per case and program in the NAT comparison.
const NAT_RUNS: usize = 20_000;

/// One NAT case: the frames of its single runs (one each), what the program must say.
struct NatCase {
    name: &'static str,
    frames: Vec<Vec<u8>>,
    verdict: u32,
    /// A frame run (not timed) before each timed run, with its own frame.
    before_each: Option<Vec<u8>>,
}

fn nat() -> anyhow::Result<()> {
    use lb_userspace::config::Forwarding;
    let nat_service = |name, vip, port, backend| {
        let mut s = service(name, vip, port, 65537, &[backend]);
        s.forwarding = Forwarding::Nat;
        s.backends[0].port = Some(8443);
        s
    };
    let services = || {
        vec![
            nat_service("api", "192.0.2.20", 443, "10.0.1.5"),
            nat_service("api6", "2001:db8::20", 443, "2001:db8:1::5"),
            service("web", "192.0.2.10", 80, 65537, &["192.0.2.21"]),
            // A NAT service listening on a port of the NAT range.
            nat_service("alt", "192.0.2.22", 8080, "10.0.1.6"),
        ]
    };
    let mut rig = bench_rig(OBJECT, &services)?;
    let cases = nat_cases(&mut rig)?;
    // With `LB_BENCH_BASELINE`: the other build, its own flows opened the same way
    // (its source ports may differ), measured in the same rounds.
    let mut baseline = match baseline_object()? {
        Some(object) => {
            let mut rig = bench_rig(&object, &services)?;
            let cases = nat_cases(&mut rig)?;
            Some((rig, cases))
        }
        None => None,
    };
    println!();
    println!(
        "NAT cost per packet: separate single runs (NAT rewrites addresses), median of {NAT_RUNS}"
    );
    if baseline.is_some() {
        println!(
            "{:<28} {:>10} {:>14} {:>8} {:>10} {:>14} {:>8}",
            "case", "lb ns/pkt", "XDP_PASS ns", "ratio", "lb - pass", "baseline - pass", "change"
        );
    } else {
        println!(
            "{:<28} {:>10} {:>14} {:>8} {:>10}",
            "case", "lb ns/pkt", "XDP_PASS ns", "ratio", "lb - pass"
        );
    }
    for (n, case) in cases.iter().enumerate() {
        let mut lb = Vec::with_capacity(NAT_RUNS);
        let mut pass = Vec::with_capacity(NAT_RUNS);
        let mut base = Vec::with_capacity(NAT_RUNS);
        for i in 0..NAT_RUNS {
            let frame = &case.frames[i % case.frames.len()];
            pass.push(rig.run_program(names::PROG_PASS, frame, 1)?.per_run);
            // With a baseline, the two builds take turns at going first: in an A/A
            // comparison the first after XDP_PASS read up to 40 ns dearer on a SYN.
            let baseline_first = i % 2 == 1;
            if baseline_first && let Some((b, b_cases)) = &mut baseline {
                base.push(run_nat_case(b, &b_cases[n], i)?);
            }
            lb.push(run_nat_case(&mut rig, case, i)?);
            if !baseline_first && let Some((b, b_cases)) = &mut baseline {
                base.push(run_nat_case(b, &b_cases[n], i)?);
            }
        }
        let (l, p) = (median(lb), median(pass));
        print!(
            "{:<28} {:>10.1} {:>14.1} {:>7.2}x {:>10.1}",
            case.name,
            l,
            p,
            l / p.max(1.0),
            l - p
        );
        if baseline.is_some() {
            let b = median(base);
            print!(" {:>14.1} {:>+8.1}", b - p, l - b);
        }
        println!();
    }
    Ok(())
}

/// Single run `i` of `case` on `rig`: its time, the verdict checked.
fn run_nat_case(rig: &mut Rig, case: &NatCase, i: usize) -> anyhow::Result<Duration> {
    let frame = &case.frames[i % case.frames.len()];
    if let Some(before) = &case.before_each {
        rig.run_program(names::PROG_LB, before, 1)?;
    }
    let r = rig.run_program(names::PROG_LB, frame, 1)?;
    anyhow::ensure!(
        r.verdict == case.verdict,
        "{}: run {i}: verdict {} (want {})",
        case.name,
        r.verdict,
        case.verdict
    );
    Ok(r.per_run)
}

/// The NAT comparison's cases on `rig`: its flows opened first (a SYN each), the
/// backend's replies to the source port `rig` gave them.
fn nat_cases(rig: &mut Rig) -> anyhow::Result<Vec<NatCase>> {
    use lb_tests::packet::PSH;
    let mut cases = Vec::new();
    for (family, vip, client, backend) in [
        ("IPv4", "192.0.2.20", "198.51.100.7", "10.0.1.5"),
        ("IPv6", "2001:db8::20", "2001:db8:1::7", "2001:db8:1::5"),
    ] {
        let vip = (vip.parse()?, 443);
        let client = (client.parse()?, 40000);
        let backend_ip: std::net::IpAddr = backend.parse()?;
        let bmac = lb_tests::rig::backend_mac(backend_ip);
        let to_vip =
            |port: u16, flags| tcp_frame(LB_MAC, CLIENT_MAC, None, (client.0, port), vip, flags);
        // The established flow, and its source port towards the backend.
        let syn = rig.run_program(names::PROG_LB, &to_vip(client.1, SYN), 1)?;
        anyhow::ensure!(syn.verdict == XDP_TX, "NAT SYN: verdict {}", syn.verdict);
        let at = if family == "IPv4" { 34 } else { 54 };
        let nport = u16::from_be_bytes([syn.output[at], syn.output[at + 1]]);
        let reply = tcp_frame(
            LB_MAC,
            bmac,
            None,
            (backend_ip, 8443),
            (vip.0, nport),
            ACK | PSH,
        );
        cases.push(NatCase {
            name: if family == "IPv4" {
                "NAT SYN, new IPv4 flow"
            } else {
                "NAT SYN, new IPv6 flow"
            },
            frames: (0..NAT_RUNS)
                .map(|i| to_vip(10_000 + i as u16, SYN))
                .collect(),
            verdict: XDP_TX,
            before_each: None,
        });
        cases.push(NatCase {
            name: if family == "IPv4" {
                "NAT IPv4 client->backend"
            } else {
                "NAT IPv6 client->backend"
            },
            frames: vec![to_vip(client.1, ACK | PSH)],
            verdict: XDP_TX,
            before_each: None,
        });
        cases.push(NatCase {
            name: if family == "IPv4" {
                "NAT IPv4 backend->client"
            } else {
                "NAT IPv6 backend->client"
            },
            frames: vec![reply],
            verdict: XDP_TX,
            before_each: None,
        });
        // A client's new connection on the tuple of one that closed (its RST, not
        // timed, before each): the pair is reopened (`nat::reopen`).
        cases.push(NatCase {
            name: if family == "IPv4" {
                "NAT IPv4 SYN, closed tuple"
            } else {
                "NAT IPv6 SYN, closed tuple"
            },
            frames: vec![to_vip(client.1 + 1, SYN)],
            verdict: XDP_TX,
            before_each: Some(to_vip(client.1 + 1, RST | ACK)),
        });
    }
    // A NAT service on a port of the NAT range (8080): its clients' segments ask the
    // reverse table first (a miss), then the flow's entry.
    let (vip, client) = (
        ("192.0.2.22".parse()?, 8080),
        ("198.51.100.7".parse()?, 40000),
    );
    let syn = rig.run_program(
        names::PROG_LB,
        &tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN),
        1,
    )?;
    anyhow::ensure!(
        syn.verdict == XDP_TX,
        "NAT SYN to port 8080: verdict {}",
        syn.verdict
    );
    cases.push(NatCase {
        name: "NAT IPv4 c->b, service 8080",
        frames: vec![tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, ACK | PSH)],
        verdict: XDP_TX,
        before_each: None,
    });
    // DSR, measured the same way, for scale.
    let dsr = tcp_frame(
        LB_MAC,
        CLIENT_MAC,
        None,
        ("198.51.100.7".parse()?, 40000),
        ("192.0.2.10".parse()?, 80),
        ACK,
    );
    rig.run_program(
        names::PROG_LB,
        &tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            ("198.51.100.7".parse()?, 40000),
            ("192.0.2.10".parse()?, 80),
            SYN,
        ),
        1,
    )?;
    cases.push(NatCase {
        name: "DSR IPv4 established",
        frames: vec![dsr],
        verdict: XDP_TX,
        before_each: None,
    });
    // A DSR SYN of a new flow in each run (a client's new connection: an entry added to
    // the connection table), and one SYN again and again (a retransmission: its entry
    // replaced, as in every repeated run of the XDP table's SYN cases).
    let dsr_syn = |port: u16| {
        tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            None,
            ("198.51.100.8".parse().expect("address"), port),
            ("192.0.2.10".parse().expect("address"), 80),
            SYN,
        )
    };
    cases.push(NatCase {
        name: "DSR IPv4 SYN, new flow",
        frames: (0..NAT_RUNS).map(|i| dsr_syn(10_000 + i as u16)).collect(),
        verdict: XDP_TX,
        before_each: None,
    });
    cases.push(NatCase {
        name: "DSR IPv4 SYN, same again",
        frames: vec![dsr_syn(9_999)],
        verdict: XDP_TX,
        before_each: None,
    });
    Ok(cases)
}

const FAILOVER_ROUNDS: usize = 3;
const PROBE_EVERY: Duration = Duration::from_millis(5);
const PROBE_TIMEOUT: Duration = Duration::from_millis(80);
/// How long each record runs: the event comes after a third of it.
const RECORD: Duration = Duration::from_secs(3);
/// How long the agent in `Node::Lb` may take to become master and serve.
const MASTER_WAIT: Duration = Duration::from_secs(10);

/// Two LB hosts, three backends serving the greeting/echo server, IPv4 only.
fn pair_lab() -> anyhow::Result<Lab> {
    let lab = Lab::builder()
        .backends(3)
        .ipv6(false)
        .second_lb(true)
        .build()?;
    lab.start_servers(SERVICE_PORT)?;
    Ok(lab)
}

fn failover() -> anyhow::Result<()> {
    let lab = pair_lab()?;
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

/// The agents' routing table in the active-active bench.
const ANNOUNCE_TABLE: u32 = 100;
/// How long BGP may take to (re)converge on both hosts.
const CONVERGE: Duration = Duration::from_secs(30);

/// Active-active: the time from a stop to the router's withdrawal, and the clients' gap.
fn announce() -> anyhow::Result<()> {
    let lab = Lab::builder()
        .backends(3)
        .ipv6(false)
        .second_lb(true)
        .routed(true)
        .build()?;
    lab.start_servers(SERVICE_PORT)?;
    let key = lab.dir().join("sync.key");
    std::fs::write(&key, b"bench announce key, 16 bytes or more\n")?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let services = [Service::new("web", ROUTED_VIP4, SERVICE_PORT).backends(1..=3)];
    let config = |node: Node, peer: Node| {
        let mut file = lab.config_file(node, "native", &services);
        file.sync = Some(SyncSection::new([addr4(peer).into()], key.clone()));
        file.announce = Some(AnnounceSection::new(ANNOUNCE_TABLE));
        file.to_toml()
    };
    let vip: SocketAddr = (ROUTED_VIP4, SERVICE_PORT).into();
    let vip_ip = vip.ip();
    let _router = lab.spawn_bird(Node::Router, &lab.bird_router_config()?)?;
    let _bird1 = lab.spawn_bird(Node::Lb, &lab.bird_lb_config(Node::Lb, ANNOUNCE_TABLE)?)?;
    let _bird2 = lab.spawn_bird(Node::Lb2, &lab.bird_lb_config(Node::Lb2, ANNOUNCE_TABLE)?)?;
    let _lb = lab.spawn_agent_on(Node::Lb, &config(Node::Lb, Node::Lb2))?;
    let gap_of = |attempts: &[lb_tests::lab::Attempt], at: Instant| -> anyhow::Result<f64> {
        let g = probe_gap(attempts, at)
            .ok_or_else(|| anyhow::anyhow!("no connection succeeded after the event"))?;
        Ok(g.gap.as_secs_f64() * 1000.0)
    };
    println!();
    println!(
        "Active-active, 2 LB hosts announcing the VIP over BGP (BIRD), ECMP at the router: time to the router's withdrawal, and the gap without a successful connection, client probing every {} ms",
        PROBE_EVERY.as_millis()
    );
    println!(
        "{:<28} {:>14} {:>10} {:>12} {:>8}",
        "event", "withdrawal ms", "gap ms", "quiet gap ms", "ratio"
    );
    for (name, graceful) in [
        ("graceful stop (SIGTERM)", true),
        ("agent killed (SIGKILL)", false),
    ] {
        let (mut withdrawals, mut gaps, mut quiet) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..FAILOVER_ROUNDS {
            let mut lb2 = lab.spawn_agent_on(Node::Lb2, &config(Node::Lb2, Node::Lb))?;
            lab.wait_next_hops(vip_ip, &[Node::Lb, Node::Lb2], CONVERGE)?;
            let probe = lab.start_probe(vip, PROBE_EVERY, PROBE_TIMEOUT, RECORD)?;
            let start = Instant::now();
            std::thread::sleep(RECORD);
            quiet.push(gap_of(&probe.stop(), start + RECORD / 3)?);
            let probe = lab.start_probe(vip, PROBE_EVERY, PROBE_TIMEOUT, RECORD)?;
            std::thread::sleep(RECORD / 3);
            let event = Instant::now();
            if graceful {
                lb2.signal(libc::SIGTERM)?;
            } else {
                lb2.kill()?;
            }
            let took = lab.wait_next_hops(vip_ip, &[Node::Lb], Duration::from_secs(5))?;
            withdrawals.push(took.as_secs_f64() * 1000.0);
            std::thread::sleep((RECORD * 2 / 3).saturating_sub(event.elapsed()));
            gaps.push(gap_of(&probe.stop(), event)?);
            if graceful {
                // It exits by itself after its grace period (2 s).
                let deadline = Instant::now() + Duration::from_secs(5);
                while lb2.exited().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                lb2.stop()?;
            }
        }
        let (w, g, q) = (median_ms(withdrawals), median_ms(gaps), median_ms(quiet));
        println!(
            "{name:<28} {w:>14.1} {g:>10.1} {q:>12.1} {:>7.1}x",
            g / q.max(0.001)
        );
    }
    Ok(())
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Adverts every this long.
const ADVERT_MS: u32 = 100;
/// Gaps measured per condition (one record of about `JITTER_GAPS` × 100 ms).
const JITTER_GAPS: usize = 100;
/// A small table, so that the flood overfills it within a second or two.
const JITTER_MAX_FLOWS: u32 = 16_384;
/// SYNs at most in the flood; it is also bounded in time (`JITTER_FLOOD_TIME`).
const JITTER_FLOOD_SYNS: u32 = 2_000_000;
/// How long the table may take to fill before the record starts.
const JITTER_FILL_LIMIT: Duration = Duration::from_secs(10);
const JITTER_STATUS_EVERY: Duration = Duration::from_millis(200);

fn jitter_record() -> Duration {
    Duration::from_millis(u64::from(ADVERT_MS) * JITTER_GAPS as u64)
}

fn jitter() -> anyhow::Result<()> {
    let lab = pair_lab()?;
    let config = |node: Node, priority: u8| {
        let services = [Service::new("web", VIP4, SERVICE_PORT).backends(1..=3)];
        let mut file = lab
            .config_file(node, "native", &services)
            .vrrp(VrrpSection::new(51, priority).advert_interval_ms(ADVERT_MS));
        file.agent.max_flows = Some(JITTER_MAX_FLOWS);
        file.to_toml()
    };
    let _master = lab.spawn_agent_on(Node::Lb, &config(Node::Lb, 150))?;
    lab.wait_status_on(Node::Lb, "master", MASTER_WAIT, |s| s.serving)?;
    let _backup = lab.spawn_agent_on(Node::Lb2, &config(Node::Lb2, 100))?;
    lab.wait_status_on(Node::Lb2, "backup", MASTER_WAIT, |s| {
        !s.serving
            && s.vrrp
                .as_ref()
                .is_some_and(|v| v.counters.adverts_received >= 3)
    })?;

    let idle = advert_gaps(&lab)?;

    // The flood runs until the table is full, through the record, then a little more.
    let flood_time = JITTER_FILL_LIMIT + jitter_record() + Duration::from_secs(3);
    let stop = AtomicBool::new(false);
    let (full, flood, polls, during) = thread::scope(|scope| -> anyhow::Result<_> {
        let flood = scope.spawn(|| lab.syn_flood(JITTER_FLOOD_SYNS, flood_time));
        let filled = lab.wait_status_on(Node::Lb, "a full flow table", JITTER_FILL_LIMIT, |s| {
            s.flows.connections >= u64::from(JITTER_MAX_FLOWS) * 9 / 10
        });
        let poller = scope.spawn(|| poll_status(&lab, &stop, flood_time));
        let gaps = filled.and_then(|_| advert_gaps(&lab));
        let during = lab.lbctl_status_on(Node::Lb);
        stop.store(true, Ordering::Relaxed);
        let polls = poller
            .join()
            .map_err(|_| anyhow::anyhow!("the status poller panicked"))?;
        let flood = flood
            .join()
            .map_err(|_| anyhow::anyhow!("the flood thread panicked"))?;
        Ok((gaps?, flood?, polls, during?))
    })?;

    println!();
    println!(
        "VRRP advert gaps on the wire (advert interval {ADVERT_MS} ms, {} gaps per condition, tcpdump in the client namespace)",
        JITTER_GAPS
    );
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>14}",
        "condition", "p50 ms", "p99 ms", "max ms", "p99 - idle ms"
    );
    let idle_p99 = percentile(&idle, 0.99);
    for (name, gaps) in [
        ("idle agent", &idle),
        ("full flow table, SYN flood, status at 5 Hz", &full),
    ] {
        let p99 = percentile(gaps, 0.99);
        println!(
            "{name:<44} {:>8.2} {p99:>8.2} {:>8.2} {:>+14.2}",
            percentile(gaps, 0.5),
            gaps.iter().copied().fold(0.0, f64::max),
            p99 - idle_p99
        );
    }
    println!(
        "flood: {} SYNs in {:.1?} ({:.0}/s) from every CPU to {VIP4}:{SERVICE_PORT} [{}]",
        flood.sent,
        flood.elapsed,
        flood.sent as f64 / flood.elapsed.as_secs_f64().max(0.001),
        flood.summary()
    );
    let events: Vec<String> = during
        .events
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    println!(
        "flow table after the record (flood still on): {} connections (max_flows {JITTER_MAX_FLOWS}), events: {}",
        during.flows.connections,
        if events.is_empty() {
            "none".to_string()
        } else {
            events.join(" ")
        }
    );
    println!(
        "lbctl status on the master during the flood: {} answers, slowest {:.1?}, {} failed",
        polls.answered, polls.slowest, polls.failed
    );
    anyhow::ensure!(
        flood.elapsed >= jitter_record(),
        "the flood ended before the record did: the flooded figures are not valid"
    );
    Ok(())
}

/// The gaps (ms) between `JITTER_GAPS + 1` consecutive adverts from the master, as
/// tcpdump timestamps them in the client namespace.
fn advert_gaps(lab: &Lab) -> anyhow::Result<Vec<f64>> {
    let filter = format!("ip proto 112 and src host {}", addr4(Node::Lb));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns(Node::Client)])
        .args(["tcpdump", "-tt", "-n", "-i", "eth0", "-c"])
        .arg((JITTER_GAPS + 1).to_string())
        .arg(&filter);
    let out = run_bounded(cmd, jitter_record() + Duration::from_secs(5))?;
    let times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    anyhow::ensure!(
        times.len() == JITTER_GAPS + 1,
        "tcpdump caught {} adverts, not {}: {}",
        times.len(),
        JITTER_GAPS + 1,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(times.windows(2).map(|w| (w[1] - w[0]) * 1000.0).collect())
}

/// Nearest-rank percentile of `v` (`p` in 0..=1).
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[derive(Default)]
struct Polls {
    answered: usize,
    failed: usize,
    slowest: Duration,
}

/// Polls the master's `lbctl status` every `JITTER_STATUS_EVERY` until `stop`, or
/// `limit` has passed.
fn poll_status(lab: &Lab, stop: &AtomicBool, limit: Duration) -> Polls {
    let mut polls = Polls::default();
    let deadline = Instant::now() + limit;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let asked = Instant::now();
        match lab.lbctl_status_on(Node::Lb) {
            Ok(_) => {
                polls.answered += 1;
                polls.slowest = polls.slowest.max(asked.elapsed());
            }
            Err(_) => polls.failed += 1,
        }
        thread::sleep(JITTER_STATUS_EVERY.saturating_sub(asked.elapsed()));
    }
    polls
}

/// Flows one host sends and its peer installs per second, and bytes per flow.
fn sync_pins() -> anyhow::Result<()> {
    use std::{collections::HashMap, net::IpAddr, sync::Arc};

    use lb_common::{FAMILY_V4, FlowKey, VipKey};
    use lb_userspace::{
        admin::AdminState,
        config::{BackendId, SyncSettings},
        dataplane::{MapSizes, XdpDataPlane},
        flows::{Names, RingSet, Scanner},
        sync::{SyncHandle, wire::Pin},
        vrrp::auth::AuthKey,
    };

    const FLOWS: u32 = 200_000;
    const BATCH: usize = 5_000;
    let (a_addr, b_addr): (IpAddr, IpAddr) = ("127.0.0.1".parse()?, "127.0.0.2".parse()?);
    let key = AuthKey::from_bytes(b"lb-bench sync key, 16+ bytes".to_vec())?;
    let settings = |peer: IpAddr| SyncSettings {
        peers: vec![peer],
        key_file: "/unused".into(),
        port: 7947,
    };
    let backends: Vec<BackendId> = (1..=3)
        .map(|i| BackendId {
            service: "web".into(),
            address: IpAddr::from([10, 0, 0, 20 + i]),
        })
        .collect();
    let mut vip = VipKey {
        port_be: 80u16.to_be(),
        proto: 6,
        family: FAMILY_V4,
        ..Default::default()
    };
    vip.addr[..4].copy_from_slice(&[10, 0, 0, 100]);

    let mut dp = XdpDataPlane::load_sized(MapSizes {
        max_flows: 16_384,
        max_pinned_flows: 262_144,
        ..MapSizes::default()
    })?;
    let store = dp
        .take_flow_store()
        .ok_or_else(|| anyhow::anyhow!("no flow tables"))?;
    let scanner = Scanner::spawn(Box::new(store), Duration::from_secs(900))?;
    scanner.committed(Arc::new(RingSet {
        // The receiver's ring gives every flow backend 1: the pins are for 2 and 3.
        rings: HashMap::from([(0, Arc::new(vec![1; 101]))]),
        forwarding: [1, 2, 3].into_iter().collect(),
        names: Arc::new(Names {
            backends: backends
                .iter()
                .cloned()
                .zip(1..)
                .map(|(b, i)| (i, b))
                .collect(),
            ids: backends.iter().cloned().zip(1..).collect(),
            vips: HashMap::from([(vip, 0)]),
        }),
        persistence: HashMap::new(),
    }));
    let (a, _a_events) = SyncHandle::spawn(
        &settings(b_addr),
        key.clone(),
        a_addr,
        AdminState::default(),
        true,
        None,
    )?;
    let (b, _b_events) = SyncHandle::spawn(
        &settings(a_addr),
        key,
        b_addr,
        AdminState::default(),
        false,
        Some(scanner.inbox()),
    )?;
    thread::sleep(Duration::from_millis(300));
    let pins: Vec<Pin> = (0..FLOWS)
        .map(|i| {
            let mut key = FlowKey {
                sport_be: ((i % 60_000) as u16 + 1024).to_be(),
                dport_be: 80u16.to_be(),
                proto: 6,
                family: FAMILY_V4,
                ..Default::default()
            };
            key.src[..4].copy_from_slice(&[198, 51, (i / 60_000) as u8, 7]);
            key.dst[..4].copy_from_slice(&[10, 0, 0, 100]);
            Pin {
                key,
                backend: backends[1 + (i % 2) as usize].clone(),
                idle_ms: 100,
                closing: false,
            }
        })
        .collect();
    let before = a.status().counters;
    let start = Instant::now();
    let sink = a.pin_sink();
    for chunk in pins.chunks(BATCH) {
        sink.pinned(chunk.to_vec());
    }
    let deadline = start + Duration::from_secs(30);
    let installed = loop {
        let n = scanner.snapshot().remote_installed;
        if n >= u64::from(FLOWS) || Instant::now() > deadline {
            break n;
        }
        thread::sleep(Duration::from_millis(1));
    };
    let took = start.elapsed();
    thread::sleep(Duration::from_millis(200));
    let (sent, got) = (a.status().counters, b.status().counters);
    let messages = sent.messages_sent - before.messages_sent;
    let payload = sent.bytes_sent - before.bytes_sent;
    let per_flow = payload as f64 / f64::from(FLOWS);
    // IPv4 and UDP headers on top of each datagram; Ethernet not counted.
    let per_flow_ip = (payload + 28 * messages) as f64 / f64::from(FLOWS);
    println!();
    println!("## Flow-pin sync (loopback, receiver writes the kernel's pinned table)");
    println!();
    println!(
        "| flows | installed | time | flows/s | datagrams | bytes/flow (payload) | bytes/flow (with IP+UDP) | dropped |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {FLOWS} | {installed} | {:.0} ms | {:.0} | {} | {per_flow:.1} | {per_flow_ip:.1} | {:?} |",
        took.as_secs_f64() * 1000.0,
        installed as f64 / took.as_secs_f64(),
        messages,
        got.dropped
    );
    anyhow::ensure!(
        installed >= u64::from(FLOWS),
        "only {installed} of {FLOWS} pins installed in {took:?} (received {})",
        got.flows_received
    );
    Ok(())
}

/// The flow scanner's cost at a full connection table (a busy host's steady state:
/// nothing leaves it but by a new flow taking a slot), at the default size and at 1M entries: the read alone,
/// then the whole scan (read, decisions, snapshot) as the agent runs it at a ring
/// change (`Scanner::prepare`), and what the periodic scans take of one core, a scan a
/// second beside the scans' budget (`flows::next_scan_in`).
fn flow_scan() -> anyhow::Result<()> {
    use std::{collections::HashMap, sync::Arc};

    use lb_common::{FAMILY_V4, FlowKey, FlowState, PROTO_TCP, flowtab::FlowSlot, names};
    use lb_userspace::{
        dataplane::{FlowStore, FlowTable},
        flows::{RingSet, Scanner},
    };

    const SCANS: usize = 5;
    println!();
    println!("Flow scanner at a full connection table: median of {SCANS} scans");
    println!(
        "{:>10} {:>9} {:>9} {:>22} {:>22}",
        "entries", "read ms", "scan ms", "a scan a second", "the scans' budget"
    );
    for entries in [lb_common::MAX_FLOWS, 1 << 20] {
        let pins = BenchPins::new("scan");
        let dir = PinDir::new(&pins.0, BENCH_PINS_IF);
        let sizes = MapSizes {
            max_flows: entries,
            ..MapSizes::default()
        };
        let (mut dp, _) = XdpDataPlane::load_pinned_object(OBJECT, sizes, &dir)?;
        let map = aya::maps::MapData::from_pin(dir.map_path(names::MAP_FLOWS))?;
        let mut flows: aya::maps::Array<_, FlowSlot> =
            aya::maps::Array::try_from(aya::maps::Map::Array(map))?;
        let now = monotonic_ns();
        for i in 0..entries {
            let mut key = FlowKey {
                sport_be: (i as u16).to_be(),
                dport_be: 80u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_V4,
                ..FlowKey::default()
            };
            key.src[..4].copy_from_slice(&(0x0a00_0000 | (i >> 16)).to_be_bytes());
            key.dst[..4].copy_from_slice(&[192, 0, 2, 10]);
            let state = FlowState {
                backend: 1,
                last_seen_ns: now,
                ..FlowState::default()
            };
            // Every slot used, in order: the scan reads them all wherever they sit.
            flows.set(i, FlowSlot { key, state }, 0)?;
        }
        let mut store = dp
            .take_flow_store()
            .ok_or_else(|| anyhow::anyhow!("no flow tables"))?;
        let mut read = Vec::new();
        for _ in 0..SCANS {
            let t = Instant::now();
            let got = store.read(FlowTable::Connections)?.len();
            read.push(t.elapsed());
            anyhow::ensure!(
                got == entries as usize,
                "read {got} of {entries} connection-table entries"
            );
        }
        let scanner = Scanner::spawn(Box::new(store), Duration::from_secs(900))?;
        // Every flow on backend 1, the ring's only choice: nothing to pin, as at rest.
        let rings = Arc::new(RingSet {
            rings: HashMap::from([(0, Arc::new(vec![1; 101]))]),
            forwarding: [1].into_iter().collect(),
            ..RingSet::default()
        });
        let mut scans = Vec::new();
        for _ in 0..SCANS {
            let t = Instant::now();
            anyhow::ensure!(scanner.prepare(rings.clone()), "the scanner did not answer");
            scans.push(t.elapsed());
        }
        let snapshot = scanner.snapshot();
        anyhow::ensure!(
            snapshot.connections == entries as usize,
            "the scan saw {} of {entries} entries",
            snapshot.connections
        );
        let (read_ms, scan_ms) = (median(read) / 1e6, median(scans) / 1e6);
        // A periodic scan starts its interval after the last one ended.
        let share = |every: Duration| {
            let scan_s = scan_ms / 1e3;
            format!(
                "{:>5.1} s, {:>5.1}% of a core",
                every.as_secs_f64(),
                100.0 * scan_s / (scan_s + every.as_secs_f64())
            )
        };
        let budget = lb_userspace::flows::next_scan_in(Duration::from_secs_f64(scan_ms / 1e3));
        println!(
            "{:>10} {:>9.1} {:>9.1} {:>22} {:>22}",
            entries,
            read_ms,
            scan_ms,
            share(lb_userspace::flows::SCAN_EVERY),
            share(budget)
        );
        drop(scanner);
        drop(dp);
    }
    Ok(())
}

/// The IPv4 cases every per-packet measurement has: a packet for no VIP, a SYN to
/// 192.0.2.10:80 and a packet of the flow it made.
fn ipv4_cases() -> anyhow::Result<[Case; 3]> {
    let c4 = ("198.51.100.7".parse()?, 40000);
    let vip4 = ("192.0.2.10".parse()?, 80);
    let frame = |src, dst, flags| tcp_frame(LB_MAC, CLIENT_MAC, None, src, dst, flags);
    Ok([
        Case {
            name: "non-VIP IPv4 packet",
            frame: frame(c4, ("192.0.2.99".parse()?, 80), ACK),
            verdict: XDP_PASS,
            prime: None,
            service: None,
            leased: false,
        },
        Case {
            name: "SYN to an IPv4 VIP",
            frame: frame(c4, vip4, SYN),
            verdict: XDP_TX,
            prime: None,
            service: Some(vip4),
            leased: false,
        },
        Case {
            name: "established IPv4 flow",
            frame: frame(c4, vip4, ACK),
            verdict: XDP_TX,
            prime: Some(frame(c4, vip4, SYN)),
            service: Some(vip4),
            leased: false,
        },
    ])
}

/// The program with its trace code but tracing off, beside the same program built
/// without the trace code, each over XDP_PASS, in the same rounds.
fn trace_cost() -> anyhow::Result<()> {
    let services = || {
        vec![service(
            "web",
            "192.0.2.10",
            80,
            65537,
            &["192.0.2.21", "192.0.2.22", "192.0.2.23"],
        )]
    };
    let mut traced = Rig::new_object_with(OBJECT, services(), MapSizes::default(), &looped)?;
    anyhow::ensure!(
        traced.trace.is_some(),
        "the shipped program has no trace ring buffer"
    );
    let mut untraced =
        Rig::new_object_with(OBJECT_UNTRACED, services(), MapSizes::default(), &looped)?;
    let cases = ipv4_cases()?;
    for rig in [&mut traced, &mut untraced] {
        for case in &cases {
            case.check(rig)?;
        }
    }
    let n = cases.len();
    let (mut pass, mut on, mut off) = (
        vec![Vec::new(); n],
        vec![Vec::new(); n],
        vec![Vec::new(); n],
    );
    for _ in 0..ROUNDS {
        for (i, case) in cases.iter().enumerate() {
            pass[i].push(
                traced
                    .run_program(names::PROG_PASS, &case.frame, REPEAT)?
                    .per_run,
            );
            on[i].push(case.time_lb(&mut traced)?);
            off[i].push(case.time_lb(&mut untraced)?);
        }
    }
    anyhow::ensure!(
        traced.trace_events().is_empty(),
        "the program traced with its flag off"
    );
    println!();
    println!(
        "Packet trace, tracing off: ns per packet over XDP_PASS, median of {ROUNDS} rounds x {REPEAT} runs"
    );
    println!(
        "{:<24} {:>12} {:>16} {:>14} {:>12}",
        "case", "XDP_PASS ns", "no trace code", "trace code", "difference"
    );
    for (i, case) in cases.iter().enumerate() {
        let p = median(pass[i].clone());
        let without = median(off[i].clone()) - p;
        let with = median(on[i].clone()) - p;
        println!(
            "{:<24} {:>12.1} {:>16.1} {:>14.1} {:>+12.1}",
            case.name,
            p,
            without,
            with,
            with - without
        );
    }
    Ok(())
}

/// The comparative lab bench: runs it, writes its files, prints its table.
fn lab_bench(options: &comparative::Options, out: &std::path::Path) -> anyhow::Result<()> {
    println!();
    println!(
        "Comparative lab bench: {} repetitions of {} paths",
        options.repetitions,
        options.paths.len()
    );
    let report = comparative::run(options)?;
    let files = comparative::write_files(&report, out)?;
    println!();
    println!("{}", report.markdown());
    for file in files {
        println!("wrote {}", file.display());
    }
    Ok(())
}

/// Prints the Markdown table of `DIR/lab.json`.
fn lab_report(dir: &std::path::Path) -> anyhow::Result<()> {
    let file = dir.join("lab.json");
    let text = std::fs::read_to_string(&file).map_err(|e| {
        anyhow::anyhow!(
            "reading {}: {e} (run `cargo xtask bench -- --lab-only` first)",
            file.display()
        )
    })?;
    let mut report = LabReport::from_json(&text)?;
    // The medians and ratios again from the samples: a file written by an older bench
    // gets the figures this one adds.
    report.summarise();
    print!("{}", report.markdown());
    for chart in lb_tests::bench::chart::draw(&report, dir)? {
        println!("wrote {}", chart.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use lb_tests::bench::report::Path;

    /// `--help` names every path `--lab-paths` takes.
    #[test]
    fn the_usage_names_every_lab_path() {
        for path in Path::ALL {
            assert!(
                super::USAGE.contains(&format!(" {},", path.id()))
                    || super::USAGE.contains(&format!(" {}\n", path.id()))
                    || super::USAGE.contains(&format!(" {} ", path.id())),
                "{} is not in the usage",
                path.id()
            );
        }
    }
}
