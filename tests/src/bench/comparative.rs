//! The comparative lab bench: in one lab, the same client and the same backend, each
//! repetition runs every `Path` once (rotated, each repetition starting one path later, so
//! drift hits all alike): a short-
//! connection rate (`wrk`, `Connection: close`), one bulk stream (`iperf3`) and the CPU
//! split of each. Every load is bounded in time; every process is the lab's, killed by
//! its guard; all traffic stays in the lab's namespaces.
//!
//! Fair for every path alike:
//! - offloads: `tx off gso off tso off` on every sender's veth (client, LB, backend), so
//!   no path carries 64 KB GSO frames while another carries MTU-sized ones (a veth with
//!   an XDP program gets MTU-sized frames: the kernel turns software GSO off on its peer);
//! - the LB host's veth always has an XDP program when a path goes through it: the null
//!   forwarder, the agent's, or `xdp_pass` under the proxies, so its receive side is the
//!   same NAPI poll in every case;
//! - a queue on every bridge port (`QUEUE`), as a NIC has one in front of its ring: when
//!   the 256-slot ring of a veth with an XDP program is full, the kernel (6.16 and
//!   later) stops the sending port's queue instead of dropping, and the queue holds
//!   what waits. A port with no queue drops instead, and one stream's bulk rate was
//!   then set by bursts of loss (tens of thousands of retransmits in 4 s, runs of one
//!   path varying by half), not by the forwarding work; the table shows retransmits;
//! - `Napi::Threaded` (the default): that NAPI poll runs in a kernel thread pinned to the
//!   last CPU, the proxies and the backend's servers run there too, the client's `wrk` /
//!   `iperf3` on CPU 0: the LB's work apart from the client's, as on a host of its own
//!   (with two CPUs, the backend has to share one; left to the scheduler, where its
//!   servers ran moved one path's bulk rate by up to a third between repetitions).
//!   `Napi::Inline` leaves all of it to the scheduler and the sender's softirq;
//! - with `Napi::Threaded`, each end receives on its own CPU (RPS on its veth): a veth
//!   delivers in its sender's context, which had the client receive its replies (and
//!   send its last ACKs) on the LB's CPU while `wrk` sent its FINs from its own, and the
//!   two reached the backend swapped (up to half the connections of the paths whose
//!   replies cross the LB ended with a reset);
//! - no TIME_WAIT left from the paths before (`Bench::forget_time_wait`): each path starts
//!   with none on the client or the backend, as its own LB state starts empty.

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    EbpfLoader,
    programs::{Xdp, XdpMode},
};
use lb_common::names;

use super::report::{
    IperfRun, LabReport, Machine, NetCounters, Path, PathResult, ProcStat, Sample, Settings,
    Summary, TcpEvents, WrkRun, parse_iperf3, parse_net_counters, parse_wrk,
};
use crate::lab::{Lab, Node, ProcessGuard, Service, VIP4, addr4, in_ns, parse_mac, run_bounded};

/// The backends' HTTP port (nginx, a fixed 200 answer) and iperf3's.
const HTTP_PORT: u16 = 80;
const IPERF_PORT: u16 = 5201;
/// The proxies' listening ports on the LB's own address.
const HAPROXY_HTTP: u16 = 8081;
const HAPROXY_BULK: u16 = 8082;
const NGINX_HTTP: u16 = 8083;
const NGINX_BULK: u16 = 8084;
/// The NAT path's VIP, on the lab's segment like `VIP4` but held by no backend: the
/// backend holds `VIP4` on `lo` for the DSR path, and a NAT flow reaches it from its
/// VIP, so with `VIP4` the backend would answer itself.
const NAT_VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 101);
/// The agent's event counter of NAT replies translated back to the client.
const NAT_REPLY_EVENT: &str = "nat_reply";

const WRK_CONNECTIONS: u32 = 32;
/// What a wrk or iperf3 run may take beyond its own duration before it is killed.
const TOOL_SLACK: Duration = Duration::from_secs(15);
/// How long a path may take to carry its first connection after its setup.
const PATH_READY: Duration = Duration::from_secs(10);
const OFFLOADS: [&str; 6] = ["tx", "off", "gso", "off", "tso", "off"];
/// The qdisc of every bridge port (see the module documentation): a NIC's usual
/// transmit queue length.
const QUEUE: [&str; 3] = ["pfifo", "limit", "1000"];
/// How long the runs that measure the XDP program's cost per packet last.
const PROBE_SECONDS: u32 = 1;
/// The seconds at the start of each iperf3 run that are not counted (`-O`).
pub(crate) const BULK_OMIT_SECONDS: u32 = 1;

/// Where the LB host's receive work runs; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Napi {
    Threaded,
    Inline,
}

impl Napi {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "threaded" => Ok(Napi::Threaded),
            "inline" => Ok(Napi::Inline),
            _ => bail!("--lab-napi takes `threaded` or `inline`, not {s:?}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub repetitions: usize,
    pub napi: Napi,
    pub paths: Vec<Path>,
    /// The directory of another build's lb-agent, for the baseline paths
    /// (`Path::BASELINES`).
    pub baseline_bin_dir: Option<PathBuf>,
    /// How long each wrk run lasts.
    pub conn_seconds: u32,
    /// How long each iperf3 run lasts.
    pub bulk_seconds: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            repetitions: 5,
            napi: Napi::Threaded,
            paths: Path::ALL.to_vec(),
            baseline_bin_dir: None,
            conn_seconds: 4,
            bulk_seconds: 4,
        }
    }
}

/// Runs the bench and returns its report, medians and ratios filled in.
pub fn run(options: &Options) -> Result<LabReport> {
    ensure!(options.repetitions >= 1, "at least one repetition");
    ensure!(
        (1..=60).contains(&options.conn_seconds) && (1..=60).contains(&options.bulk_seconds),
        "each load lasts 1 to 60 s"
    );
    let cores = thread::available_parallelism().map_or(1, usize::from);
    let lab = Lab::builder().backends(1).ipv6(false).build()?;
    let bench = Bench::new(&lab, options, cores)?;
    let _servers = bench.start_backend_servers()?;
    let _proxies = bench.start_proxies()?;

    let mut results: Vec<PathResult> = options
        .paths
        .iter()
        .map(|&path| PathResult {
            path,
            samples: Vec::new(),
            median: Summary::default(),
        })
        .collect();
    let started = Instant::now();
    let n = results.len();
    for repetition in 0..options.repetitions {
        // Each repetition starts one path later, so no path always runs first or last.
        for k in 0..n {
            let result = &mut results[(k + repetition) % n];
            let sample = bench.measure(result.path, repetition).with_context(|| {
                format!("{}, repetition {}", result.path.name(), repetition + 1)
            })?;
            println!(
                "  rep {} {:<20} {:>8.0} conn/s ({} errors)  {:>6.2} Gbit/s  cpu busy {:?}",
                repetition + 1,
                result.path.name(),
                sample.conn.per_second,
                sample.conn.errors,
                sample.bulk.bits_per_second / 1e9,
                sample
                    .conn_cpu
                    .per_cpu_busy
                    .iter()
                    .map(|b| format!("{b:.0}%"))
                    .collect::<Vec<_>>()
            );
            result.samples.push(sample);
        }
    }
    println!("  lab bench took {:.0?}", started.elapsed());
    let mut report = LabReport {
        machine: machine(cores)?,
        settings: Settings {
            repetitions: options.repetitions,
            conn_seconds: options.conn_seconds,
            wrk_connections: WRK_CONNECTIONS,
            bulk_seconds: options.bulk_seconds,
            napi: bench.napi_text(),
            offloads: OFFLOADS.join(" "),
            queue: QUEUE.join(" "),
            baseline_bin_dir: options
                .baseline_bin_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        },
        paths: results,
    };
    report.summarise();
    Ok(report)
}

/// Writes `lab.json`, `lab.md` and the charts into `dir`; returns the files written.
/// A chart that cannot be drawn is a warning: the JSON holds every figure.
pub fn write_files(report: &LabReport, dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("lab.json");
    fs::write(&json, report.to_json()?).with_context(|| format!("writing {}", json.display()))?;
    let md = dir.join("lab.md");
    fs::write(&md, report.markdown()).with_context(|| format!("writing {}", md.display()))?;
    let mut files = vec![json, md];
    match super::chart::draw(report, dir) {
        Ok(charts) => files.extend(charts),
        Err(e) => eprintln!("lb-bench: WARNING: no charts: {e:#}"),
    }
    Ok(files)
}

/// The machine this runs on: CPU model, `cores`, kernel release, the time now (UTC).
pub fn machine(cores: usize) -> Result<Machine> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the kernel release")?
        .trim()
        .to_string();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .context("running date")?;
    Ok(Machine {
        cpu_model,
        cores,
        kernel,
        date: String::from_utf8_lossy(&date.stdout).trim().to_string(),
    })
}

struct Bench<'lab> {
    lab: &'lab Lab,
    napi: Napi,
    conn_seconds: u32,
    bulk_seconds: u32,
    /// The CPU for the client's tools and the one for the LB's work, when pinned.
    cpus: Option<(usize, usize)>,
    backend: IpAddr,
    lb: IpAddr,
    lb_mac: [u8; 6],
    backend_mac: [u8; 6],
    client_mac: [u8; 6],
    /// Options::baseline_bin_dir.
    baseline_bin_dir: Option<PathBuf>,
}

/// While it lives, the backend sends its frames for the client to the LB host's MAC
/// (`Path::NullFwdBoth`); dropped, the backend resolves the client again.
struct RepliesViaLb<'lab> {
    lab: &'lab Lab,
    client: String,
}

impl<'lab> RepliesViaLb<'lab> {
    fn new(lab: &'lab Lab, lb_mac: &str) -> Result<Self> {
        let client = addr4(Node::Client).to_string();
        lab.run(
            Node::Backend(1),
            &[
                "ip",
                "neigh",
                "replace",
                &client,
                "lladdr",
                lb_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )?;
        Ok(RepliesViaLb { lab, client })
    }
}

impl Drop for RepliesViaLb<'_> {
    fn drop(&mut self) {
        let deleted = self.lab.run(
            Node::Backend(1),
            &["ip", "neigh", "del", &self.client, "dev", "eth0"],
        );
        if let Err(e) = deleted {
            eprintln!("lb-bench: the backend's neighbour entry for the client stays: {e:#}");
        }
    }
}

/// What sits on the LB's veth while a path is measured; dropping it takes it away.
enum LbState<'lab> {
    Nothing,
    /// The program stays attached as long as its `Ebpf` lives; it is never read.
    Xdp(#[allow(dead_code)] aya::Ebpf),
    Agent(crate::lab::AgentGuard<'lab>),
}

/// The bitmap of one CPU as sysfs writes CPU masks (`rps_cpus`): hexadecimal, in
/// comma-separated groups of 32 bits, the highest first.
fn cpu_mask(cpu: usize) -> String {
    let (group, bit) = (cpu / 32, cpu % 32);
    let mut out = format!("{:x}", 1u32 << bit);
    for _ in 0..group {
        out.push_str(",00000000");
    }
    out
}

impl<'lab> Bench<'lab> {
    fn new(lab: &'lab Lab, options: &Options, cores: usize) -> Result<Self> {
        let napi = options.napi;
        let cpus = (napi == Napi::Threaded && cores >= 2).then_some((0, cores - 1));
        for node in [Node::Client, Node::Lb, Node::Backend(1)] {
            let mut args = vec!["ethtool", "-K", "eth0"];
            args.extend(OFFLOADS);
            lab.run(node, &args)
                .with_context(|| format!("offloads on {node:?}"))?;
        }
        for node in [Node::Client, Node::Lb, Node::Backend(1)] {
            let port = node.peer_name();
            let mut args = vec!["tc", "qdisc", "replace", "dev", &port, "root"];
            args.extend(QUEUE);
            lab.run(Node::Bridge, &args)
                .with_context(|| format!("the queue of {node:?}'s bridge port"))?;
        }
        // Each end's receive work on its own CPU, as on a host of its own: a veth delivers
        // in its sender's context, so without this the client's replies were received
        // (and its ACKs sent) on whichever CPU sent them, the LB's on the XDP paths, and
        // the backend's requests on the client's CPU on the direct path. RPS queues each
        // frame to the CPU of the end it reaches: the client's (`wrk`, `iperf3`), the
        // backend's (its servers, beside the LB's NAPI thread).
        if let Some((client_cpu, lb_cpu)) = cpus {
            for (node, cpu) in [(Node::Client, client_cpu), (Node::Backend(1), lb_cpu)] {
                let mask = cpu_mask(cpu);
                lab.run(
                    node,
                    &[
                        "sh",
                        "-c",
                        &format!("echo {mask} > /sys/class/net/eth0/queues/rx-0/rps_cpus"),
                    ],
                )
                .with_context(|| format!("RPS to CPU {cpu} on {node:?}'s veth"))?;
            }
        }
        // Tens of thousands of short connections a second through a few ports.
        for node in [Node::Client, Node::Lb] {
            lab.run(
                node,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_local_port_range=1024 65535",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.core.somaxconn=4096",
                ],
            )?;
        }
        lab.run(
            Node::Backend(1),
            &["sysctl", "-q", "-w", "net.core.somaxconn=4096"],
        )?;
        // The agent turns forwarding on for its NAT service (for the FIB lookup) and
        // leaves it on; on from the start, every path runs with the same setting.
        lab.run(
            Node::Lb,
            &["sysctl", "-q", "-w", "net.ipv4.conf.eth0.forwarding=1"],
        )?;
        // The null forwarder answers no ARP: the client finds the VIP at the LB's MAC
        // by a static entry, for the agent's paths as well; the backend finds the NAT
        // VIP (its NAT flows' source) the same way.
        let lb_mac = lab.mac_of(Node::Lb)?;
        for (node, vip) in [
            (Node::Client, VIP4),
            (Node::Client, NAT_VIP4),
            (Node::Backend(1), NAT_VIP4),
        ] {
            lab.run(
                node,
                &[
                    "ip",
                    "neigh",
                    "replace",
                    &vip.to_string(),
                    "lladdr",
                    &lb_mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            )?;
        }
        Ok(Bench {
            lab,
            napi,
            conn_seconds: options.conn_seconds,
            bulk_seconds: options.bulk_seconds,
            cpus,
            backend: addr4(Node::Backend(1)).into(),
            lb: addr4(Node::Lb).into(),
            lb_mac: parse_mac(&lb_mac)?,
            backend_mac: lab.mac_bytes_of(Node::Backend(1))?,
            client_mac: lab.mac_bytes_of(Node::Client)?,
            baseline_bin_dir: options.baseline_bin_dir.clone(),
        })
    }

    fn napi_text(&self) -> String {
        match (self.napi, self.cpus) {
            (Napi::Threaded, Some((client, lb))) => format!(
                "threaded, pinned to CPU {lb} with the proxies and the backend's servers; \
                 wrk and iperf3 on CPU {client}; RPS: the client receives on CPU {client}, \
                 the backend on CPU {lb}"
            ),
            (Napi::Threaded, None) => "threaded, unpinned (one CPU)".into(),
            (Napi::Inline, _) => "inline (not threaded, nothing pinned)".into(),
        }
    }

    /// `taskset -c CPU` before `args` when pinning.
    fn pinned(&self, cpu: Option<usize>, args: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(cpu) = cpu {
            out.extend(["taskset".to_string(), "-c".into(), cpu.to_string()]);
        }
        out.extend(args.iter().map(|s| s.to_string()));
        out
    }

    fn file(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.lab.dir().join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// nginx answering every HTTP request with a short 200, and an iperf3 server.
    fn start_backend_servers(&self) -> Result<Vec<ProcessGuard<'lab>>> {
        let dir = self.lab.dir().display().to_string();
        let conf = self.file(
            "nginx-backend.conf",
            &format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx-backend.pid;\n\
                 error_log {dir}/nginx-backend.err warn;\nevents {{ worker_connections 8192; }}\nworker_rlimit_nofile 16384;\n\
                 http {{\n  access_log off;\n  client_body_temp_path {dir}/nginx-b-body;\n\
                 proxy_temp_path {dir}/nginx-b-proxy;\n  server {{\n    listen {HTTP_PORT} backlog=4096;\n\
                 location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
            ),
        )?;
        let node = Node::Backend(1);
        let conf = conf.display().to_string();
        // On the LB's CPU (see the module documentation): left to the scheduler, where
        // they ran moved one path's bulk rate by up to a third between repetitions.
        let cpu = self.cpus.map(|c| c.1);
        let nginx = self.lab.spawn(
            node,
            &self.pinned(cpu, &["nginx", "-e", "stderr", "-c", &conf]),
        )?;
        let iperf_port = IPERF_PORT.to_string();
        let iperf = self.lab.spawn(
            node,
            &self.pinned(cpu, &["iperf3", "-s", "-p", &iperf_port]),
        )?;
        let guards = vec![nginx, iperf];
        for port in [HTTP_PORT, IPERF_PORT] {
            self.wait_listening(node, port, &guards)?;
        }
        Ok(guards)
    }

    /// HAProxy `mode tcp` and nginx `stream`, each one thread, on the LB's own address.
    fn start_proxies(&self) -> Result<Vec<ProcessGuard<'lab>>> {
        let dir = self.lab.dir().display().to_string();
        let (lb, be) = (self.lb, self.backend);
        let haproxy = self.file(
            "haproxy.cfg",
            &format!(
                "global\n  nbthread 1\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect 2s\n\
                 timeout client 30s\n  timeout server 30s\n\n\
                 listen http\n  bind {lb}:{HAPROXY_HTTP}\n  server b1 {be}:{HTTP_PORT}\n\n\
                 listen bulk\n  bind {lb}:{HAPROXY_BULK}\n  server b1 {be}:{IPERF_PORT}\n"
            ),
        )?;
        let nginx = self.file(
            "nginx-stream.conf",
            &format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\ndaemon off;\n\
                 master_process off;\nworker_processes 1;\npid {dir}/nginx-stream.pid;\n\
                 error_log {dir}/nginx-stream.err warn;\nevents {{ worker_connections 8192; }}\nworker_rlimit_nofile 16384;\n\
                 stream {{\n  server {{ listen {lb}:{NGINX_HTTP} backlog=4096; proxy_pass {be}:{HTTP_PORT}; }}\n\
                 server {{ listen {lb}:{NGINX_BULK}; proxy_pass {be}:{IPERF_PORT}; }}\n}}\n"
            ),
        )?;
        let lb_cpu = self.cpus.map(|c| c.1);
        let (haproxy, nginx) = (haproxy.display().to_string(), nginx.display().to_string());
        let guards = vec![
            self.lab.spawn(
                Node::Lb,
                &self.pinned(lb_cpu, &["haproxy", "-db", "-f", &haproxy]),
            )?,
            self.lab.spawn(
                Node::Lb,
                &self.pinned(lb_cpu, &["nginx", "-e", "stderr", "-c", &nginx]),
            )?,
        ];
        for port in [HAPROXY_HTTP, HAPROXY_BULK, NGINX_HTTP, NGINX_BULK] {
            self.wait_listening(Node::Lb, port, &guards)?;
        }
        Ok(guards)
    }

    /// Waits until something listens on `port` in `node`; the error holds the logs of
    /// `processes`.
    fn wait_listening(&self, node: Node, port: u16, processes: &[ProcessGuard]) -> Result<()> {
        let deadline = Instant::now() + PATH_READY;
        let filter = format!("sport = :{port}");
        loop {
            let out = self.lab.run(node, &["ss", "-Hltn", &filter])?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = processes.iter().map(ProcessGuard::log).collect();
                bail!(
                    "nothing listens on port {port} in {node:?} after {PATH_READY:?}; logs:\n{}",
                    logs.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The HTTP and bulk addresses the client uses for `path`.
    fn targets(&self, path: Path) -> (SocketAddr, SocketAddr) {
        let vip = IpAddr::from(VIP4);
        match path.measured_as() {
            Path::Direct => (
                (self.backend, HTTP_PORT).into(),
                (self.backend, IPERF_PORT).into(),
            ),
            Path::NullFwd | Path::NullFwdBoth | Path::LbDsr => {
                ((vip, HTTP_PORT).into(), (vip, IPERF_PORT).into())
            }
            Path::LbNat => {
                let vip = IpAddr::from(NAT_VIP4);
                ((vip, HTTP_PORT).into(), (vip, IPERF_PORT).into())
            }
            Path::Haproxy => (
                (self.lb, HAPROXY_HTTP).into(),
                (self.lb, HAPROXY_BULK).into(),
            ),
            Path::Nginx => ((self.lb, NGINX_HTTP).into(), (self.lb, NGINX_BULK).into()),
            Path::LbDsrBaseline | Path::LbNatBaseline => unreachable!("measured as LbDsr / LbNat"),
        }
    }

    /// Sets the LB up for `path`, measures, takes it down again.
    fn measure(&self, path: Path, repetition: usize) -> Result<Sample> {
        self.forget_time_wait()?;
        let mut state = match path {
            Path::Direct => LbState::Nothing,
            Path::NullFwd | Path::NullFwdBoth => {
                let globals = [
                    (names::GLOBAL_NULL_FWD_DST, self.backend_mac),
                    (names::GLOBAL_NULL_FWD_SRC, self.lb_mac),
                    (names::GLOBAL_NULL_FWD_CLIENT, self.client_mac),
                ];
                LbState::Xdp(self.attach(names::PROG_NULL_FWD, &globals)?)
            }
            Path::Haproxy | Path::Nginx => LbState::Xdp(self.attach(names::PROG_PASS, &[])?),
            Path::LbDsr | Path::LbNat | Path::LbDsrBaseline | Path::LbNatBaseline => {
                LbState::Agent(self.start_agent(path)?)
            }
        };
        let _replies = (path == Path::NullFwdBoth)
            .then(|| RepliesViaLb::new(self.lab, &mac_text(&self.lb_mac)))
            .transpose()?;
        if path != Path::Direct {
            self.thread_napi()?;
        }
        let (http, bulk_addr) = self.targets(path);
        self.wait_path(http)?;
        // The agent's packets of the `http` service and its NAT replies.
        let agent_counts = |state: &LbState| -> Result<Option<(u64, u64)>> {
            let LbState::Agent(agent) = state else {
                return Ok(None);
            };
            let status = agent.status()?;
            let packets = status
                .services
                .iter()
                .find(|s| s.name == "http")
                .map(|s| s.packets)
                .context("the agent's status has no service `http`")?;
            let replies = status
                .events
                .get(NAT_REPLY_EVENT)
                .copied()
                .with_context(|| format!("the agent's status has no event {NAT_REPLY_EVENT}"))?;
            Ok(Some((packets, replies)))
        };
        let counts_before = agent_counts(&state)?;
        let rx_before = self.lb_rx_packets()?;
        let tcp_before = self.tcp_counters()?;
        let (conn, conn_cpu) = with_cpu(|| self.wrk(http))?;
        let tcp_after = self.tcp_counters()?;
        let rx = self.lb_rx_packets()? - rx_before;
        let conn_tcp =
            TcpEvents::between((&tcp_before.0, &tcp_after.0), (&tcp_before.1, &tcp_after.1));
        let counts = agent_counts(&state)?
            .zip(counts_before)
            .map(|(a, b)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)));
        let (bulk, bulk_cpu) = with_cpu(|| self.iperf3(bulk_addr))?;
        // The program's cost per packet, in short runs of their own: the kernel's
        // statistics read the clock twice per packet, which the figures above must not
        // carry.
        let (conn_xdp_ns, bulk_xdp_ns) = match self.lb_program(path)? {
            None => (None, None),
            Some(id) => {
                let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .context("BPF_ENABLE_STATS (the programs' run time)")?;
                (
                    xdp_ns_per_run(id, || self.wrk_for(http, PROBE_SECONDS))?,
                    xdp_ns_per_run(id, || self.iperf3_for(bulk_addr, PROBE_SECONDS))?,
                )
            }
        };
        // Every path went where it should: each connection is at least 3 packets from
        // the client.
        if path == Path::Direct {
            ensure!(
                rx < conn.requests,
                "{rx} packets reached the LB's veth during the direct run of {} requests",
                conn.requests
            );
        } else {
            // Where the replies cross the LB host too, each connection is at least as
            // many packets again from the backend.
            let per_request = if path.both_ways() { 2 } else { 1 };
            ensure!(
                rx >= per_request * conn.requests,
                "only {rx} packets reached the LB's veth for {} requests{}",
                conn.requests,
                if path.both_ways() {
                    " and their replies"
                } else {
                    ""
                }
            );
        }
        if let Some((packets, replies)) = counts {
            ensure!(
                packets >= conn.requests,
                "the agent counted {packets} packets for {} requests: traffic went around it",
                conn.requests
            );
            // NAT: each connection's answers (SYN-ACK, response, FIN) come back through
            // the LB; DSR: none does.
            if path.measured_as() == Path::LbNat {
                ensure!(
                    replies >= conn.requests,
                    "the agent translated {replies} replies for {} requests: the backend \
                     answered around it",
                    conn.requests
                );
            } else {
                ensure!(
                    replies == 0,
                    "the agent translated {replies} NAT replies on the {} path",
                    path.name()
                );
            }
        }
        if let LbState::Agent(agent) = &mut state {
            agent.detach()?;
        }
        drop(state);
        Ok(Sample {
            repetition,
            conn,
            conn_cpu,
            bulk,
            bulk_cpu,
            conn_xdp_ns,
            bulk_xdp_ns,
            conn_tcp: Some(conn_tcp),
            conn_lb_packets: Some(rx),
        })
    }

    /// Ends the client's and the backend's TIME_WAIT sockets (`ss -K`), so that no path
    /// starts with what the paths before it left. A NAT path's agent starts with an
    /// empty table: its flows take other source ports than the last NAT run's for the
    /// same client ports, and a backend still holding that run's TIME_WAIT on one
    /// refuses the new SYN whose timestamp is older (Linux gives each connection a
    /// timestamp offset of its own), which costs the client a reset and its SYN again:
    /// up to 8% of a NAT run's connections when the runs came 40 s apart. An agent that
    /// keeps its table (a restart, or one run after another) has no such collisions: a
    /// closed flow's port stays its own for `nat_time_wait_s`.
    fn forget_time_wait(&self) -> Result<()> {
        for node in [Node::Client, Node::Backend(1)] {
            // `ss -K` reports an error for the families it has nothing of; what is left
            // decides.
            let _ = self.lab.run(node, &["ss", "-K", "state", "time-wait"]);
            let left = self
                .lab
                .run(node, &["ss", "-H", "-t", "-n", "state", "time-wait"])
                .with_context(|| format!("listing {node:?}'s TIME_WAIT sockets"))?;
            ensure!(
                left.trim().is_empty(),
                "{node:?} still has {} TIME_WAIT sockets after `ss -K` (the kernel needs \
                 CONFIG_INET_DIAG_DESTROY)",
                left.lines().count()
            );
        }
        Ok(())
    }

    /// The client's and the backend's network counters (`parse_net_counters`).
    fn tcp_counters(&self) -> Result<(NetCounters, NetCounters)> {
        let read = |node: Node| -> Result<NetCounters> {
            let text = self
                .lab
                .run(node, &["cat", "/proc/net/snmp", "/proc/net/netstat"])
                .with_context(|| format!("reading {node:?}'s network counters"))?;
            parse_net_counters(&text).with_context(|| format!("{node:?}'s network counters"))
        };
        Ok((read(Node::Client)?, read(Node::Backend(1))?))
    }

    /// The id of the XDP program on the LB's veth while `path` runs (`ip -d link`), if
    /// the path has one.
    fn lb_program(&self, path: Path) -> Result<Option<u32>> {
        if path == Path::Direct {
            return Ok(None);
        }
        let text = self
            .lab
            .run(Node::Lb, &["ip", "-d", "link", "show", "dev", "eth0"])?;
        let id = text
            .split("prog/xdp id ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|id| id.parse().ok())
            .with_context(|| format!("no XDP program on the LB's eth0 for {}", path.name()))?;
        Ok(Some(id))
    }

    /// Packets the LB's veth has received (XDP_TX'd ones included).
    fn lb_rx_packets(&self) -> Result<u64> {
        let text = self.lab.run(
            Node::Lb,
            &["cat", "/sys/class/net/eth0/statistics/rx_packets"],
        )?;
        text.trim()
            .parse()
            .with_context(|| format!("rx_packets of the LB's eth0: {text:?}"))
    }

    /// Loads `program` (with `globals` set) and attaches it (native) to the LB's veth.
    fn attach(&self, program: &str, globals: &[(&str, [u8; 6])]) -> Result<aya::Ebpf> {
        in_ns(&self.lab.ns(Node::Lb), || -> Result<aya::Ebpf> {
            let mut ebpf = load_xdp(program, globals)?;
            let prog: &mut Xdp = ebpf
                .program_mut(program)
                .with_context(|| format!("the XDP object has no program {program}"))?
                .try_into()?;
            prog.attach("eth0", XdpMode::Driver)
                .with_context(|| format!("attaching {program} to the LB's eth0 (native)"))?;
            Ok(ebpf)
        })
    }

    /// The agent with the `http` and `bulk` services: DSR on `VIP4` for `Path::LbDsr`,
    /// NAT on `NAT_VIP4` (to the same ports
    /// on the backend) for `Path::LbNat`.
    fn start_agent(&self, path: Path) -> Result<crate::lab::AgentGuard<'lab>> {
        let services = match path.measured_as() {
            Path::LbNat => [
                Service::new("http", NAT_VIP4, HTTP_PORT)
                    .nat(HTTP_PORT)
                    .backends([1]),
                Service::new("bulk", NAT_VIP4, IPERF_PORT)
                    .nat(IPERF_PORT)
                    .backends([1]),
            ],
            _ => [
                Service::new("http", VIP4, HTTP_PORT).backends([1]),
                Service::new("bulk", VIP4, IPERF_PORT).backends([1]),
            ],
        };
        let file = self.lab.config_file(Node::Lb, "native", &services);
        let agent = if path.is_baseline() {
            let dir = self
                .baseline_bin_dir
                .as_ref()
                .context("a baseline path needs LB_BENCH_BASELINE_BIN_DIR")?;
            self.lab
                .spawn_agent_bin_on(Node::Lb, &dir.join("lb-agent"), &file.to_toml())?
        } else {
            self.lab.spawn_agent(&file.to_toml())?
        };
        for service in ["http", "bulk"] {
            self.lab.wait_backends_up(service, &["b1"], PATH_READY)?;
        }
        Ok(agent)
    }

    /// With `Napi::Threaded`: the LB veth's NAPI poll in a kernel thread, pinned. The
    /// thread is created when an XDP program is attached, so this runs after each attach;
    /// it is found as the one `napi/eth0-*` thread that was not there before.
    fn thread_napi(&self) -> Result<()> {
        if self.napi != Napi::Threaded {
            return Ok(());
        }
        let before = napi_threads();
        self.lab.run(
            Node::Lb,
            &["sh", "-c", "echo 1 > /sys/class/net/eth0/threaded"],
        )?;
        let Some((_, lb_cpu)) = self.cpus else {
            return Ok(());
        };
        // The flag stays on the device: a later attach makes its thread at once, so the
        // newest thread is ours whether or not this write made it.
        let after = napi_threads();
        let new: Vec<u32> = after.difference(&before).copied().collect();
        let pid = match new.as_slice() {
            [pid] => *pid,
            [] => newest_napi_thread(&after).context("no napi/eth0-* thread to pin")?,
            _ => bail!("several new napi/eth0-* threads ({new:?}): another lab is busy?"),
        };
        let out = Command::new("taskset")
            .args(["-p", "-c", &lb_cpu.to_string(), &pid.to_string()])
            .output()
            .context("running taskset")?;
        ensure!(
            out.status.success(),
            "taskset -p -c {lb_cpu} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Connects from the client until a connection to `addr` succeeds.
    fn wait_path(&self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + PATH_READY;
        loop {
            match self.lab.connect(addr, Duration::from_millis(500)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("no connection to {addr} within {PATH_READY:?}: {e}")
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn client_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.lab.ns(Node::Client)])
            .args(self.pinned(self.cpus.map(|c| c.0), args));
        cmd
    }

    fn wrk(&self, addr: SocketAddr) -> Result<WrkRun> {
        self.wrk_for(addr, self.conn_seconds)
    }

    fn wrk_for(&self, addr: SocketAddr, seconds: u32) -> Result<WrkRun> {
        let url = format!("http://{addr}/");
        let cmd = self.client_command(&[
            "wrk",
            "-t1",
            &format!("-c{WRK_CONNECTIONS}"),
            &format!("-d{seconds}s"),
            "--timeout",
            "2s",
            "-H",
            "Connection: close",
            &url,
        ]);
        let out = run_bounded(cmd, Duration::from_secs(seconds.into()) + TOOL_SLACK)?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "wrk {url} failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        let run = parse_wrk(&text)?;
        ensure!(run.requests > 0, "wrk {url}: no request succeeded");
        Ok(run)
    }

    fn iperf3(&self, addr: SocketAddr) -> Result<IperfRun> {
        self.iperf3_for(addr, self.bulk_seconds)
    }

    fn iperf3_for(&self, addr: SocketAddr, seconds: u32) -> Result<IperfRun> {
        let cmd = self.client_command(&[
            "iperf3",
            "-c",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-t",
            &seconds.to_string(),
            // Slow start's first second is not counted (it runs before the `-t` seconds).
            "-O",
            &BULK_OMIT_SECONDS.to_string(),
            "--connect-timeout",
            "2000",
            "-J",
        ]);
        let out = run_bounded(
            cmd,
            Duration::from_secs((seconds + BULK_OMIT_SECONDS).into()) + TOOL_SLACK,
        )?;
        parse_iperf3(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("iperf3 to {addr} ({})", out.status))
    }
}

/// Loads the project's XDP object with `globals` (name, MAC) set, and `program` in the
/// kernel, not attached: the null forwarder is
/// `load_xdp(PROG_NULL_FWD, &[(GLOBAL_NULL_FWD_DST, backend), (GLOBAL_NULL_FWD_SRC, own)])`.
pub fn load_xdp(program: &str, globals: &[(&str, [u8; 6])]) -> Result<aya::Ebpf> {
    let mut loader = EbpfLoader::new();
    for (name, value) in globals {
        loader.override_global(name, value, true);
    }
    let mut ebpf = loader
        .load(lb_userspace::dataplane::OBJECT)
        .context("loading the XDP object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(program)
        .with_context(|| format!("the XDP object has no program {program}"))?
        .try_into()?;
    prog.load().with_context(|| format!("loading {program}"))?;
    Ok(ebpf)
}

/// Runs `f` (a load, checked there); returns the mean ns per run of the program `id`
/// meanwhile: the kernel's run-time statistics (`BPF_ENABLE_STATS` must be on), in
/// place, under the lab's load.
fn xdp_ns_per_run<T>(id: u32, f: impl FnOnce() -> Result<T>) -> Result<Option<f64>> {
    let read = || -> Result<(u128, u64)> {
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id)
            .with_context(|| format!("no loaded program with id {id}"))?;
        Ok((info.run_time().as_nanos(), info.run_count()))
    };
    let before = read()?;
    f()?;
    let after = read()?;
    let runs = after.1.saturating_sub(before.1);
    Ok((runs > 0).then(|| after.0.saturating_sub(before.0) as f64 / runs as f64))
}

/// Runs `f` and returns its result with the CPU split of the time it took.
fn with_cpu<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, super::report::CpuSplit)> {
    let read = || -> Result<ProcStat> {
        ProcStat::parse(&fs::read_to_string("/proc/stat").context("reading /proc/stat")?)
    };
    let before = read()?;
    let value = f()?;
    let after = read()?;
    Ok((value, after.split_since(&before)))
}

/// The PIDs of the kernel threads named `napi/eth0-*` (threaded NAPI of any `eth0`).
fn napi_threads() -> BTreeSet<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = fs::read_to_string(e.path().join("comm")).ok()?;
        comm.starts_with("napi/eth0-").then_some(pid)
    })
    .collect()
}

/// The `napi/eth0-N` thread with the highest NAPI id N: the one made last.
fn newest_napi_thread(pids: &BTreeSet<u32>) -> Option<u32> {
    pids.iter()
        .filter_map(|&pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let id: u64 = comm.trim().strip_prefix("napi/eth0-")?.parse().ok()?;
            Some((id, pid))
        })
        .max()
        .map(|(_, pid)| pid)
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::cpu_mask;

    #[test]
    fn cpu_masks_as_sysfs_writes_them() {
        assert_eq!(cpu_mask(0), "1");
        assert_eq!(cpu_mask(1), "2");
        assert_eq!(cpu_mask(31), "80000000");
        assert_eq!(cpu_mask(32), "1,00000000");
        assert_eq!(cpu_mask(67), "8,00000000,00000000");
    }
}
