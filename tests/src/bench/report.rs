//! The comparative lab bench's results as plain values: the paths, the raw samples,
//! the medians and ratios, the JSON file and the Markdown table made from it. Pure: no
//! root, no lab; the parsers of `wrk`, `iperf3 -J` and `/proc/stat` live here too.

use std::fmt::Write as _;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

/// One way from the client to the backend: a variant, its name below, and its setup in
/// `comparative::Bench::measure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// The client connects to the backend's own address: no LB host on the way.
    Direct,
    /// The null XDP forwarder on the LB's veth: MAC rewrite to the one backend, `XDP_TX`.
    NullFwd,
    /// The null forwarder with the backend's replies through the LB host as well (the
    /// backend's neighbour entry for the client points at the LB): the yardstick of the
    /// paths whose replies cross the LB host too (NAT, the proxies).
    NullFwdBoth,
    /// lb-agent in DSR mode: the XDP program the agent loads, one service, one backend.
    LbDsr,
    /// lb-agent in NAT mode: full NAT to the one backend on a VIP of its own that the
    /// backend does not hold; the backend's replies come back through the LB.
    LbNat,
    /// `LbDsr` with another build's lb-agent (`LB_BENCH_BASELINE_BIN_DIR`): an A/B of two
    /// builds in the same rotation.
    LbDsrBaseline,
    /// `LbNat` with another build's lb-agent, as `LbDsrBaseline`.
    LbNatBaseline,
    /// HAProxy `mode tcp` in the LB namespace, one thread.
    Haproxy,
    /// nginx `stream` in the LB namespace, one worker.
    Nginx,
}

impl Path {
    /// The paths of another build, run only when asked for (`--lab-paths`, or
    /// `LB_BENCH_BASELINE_BIN_DIR` set).
    pub const BASELINES: [Path; 2] = [Path::LbDsrBaseline, Path::LbNatBaseline];

    /// Every path of a default run: the order of the table; repetition `r` starts at the
    /// `r`-th.
    pub const ALL: [Path; 7] = [
        Path::Direct,
        Path::NullFwd,
        Path::LbDsr,
        Path::NullFwdBoth,
        Path::LbNat,
        Path::Haproxy,
        Path::Nginx,
    ];

    /// The short name in tables, charts and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::NullFwd => "null XDP forwarder",
            Path::NullFwdBoth => "null XDP forwarder, both ways",
            Path::LbDsr => "lb (DSR)",
            Path::LbNat => "lb (NAT)",
            Path::LbDsrBaseline => "lb (DSR), baseline build",
            Path::LbNatBaseline => "lb (NAT), baseline build",
            Path::Haproxy => "HAProxy mode tcp",
            Path::Nginx => "nginx stream",
        }
    }

    /// The path's name in `lab.json` and on the command line (`--lab-paths`).
    pub fn id(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::NullFwd => "null-fwd",
            Path::NullFwdBoth => "null-fwd-both",
            Path::LbDsr => "lb-dsr",
            Path::LbNat => "lb-nat",
            Path::LbDsrBaseline => "lb-dsr-baseline",
            Path::LbNatBaseline => "lb-nat-baseline",
            Path::Haproxy => "haproxy",
            Path::Nginx => "nginx",
        }
    }

    /// The path whose `id` is `id`.
    pub fn from_id(id: &str) -> Result<Path> {
        let all = || Path::ALL.into_iter().chain(Path::BASELINES);
        all().find(|p| p.id() == id).ok_or_else(|| {
            let ids: Vec<&str> = all().map(|p| p.id()).collect();
            anyhow!("no lab path {id:?} (the paths: {})", ids.join(", "))
        })
    }

    /// Whether the LB host's work is an XDP program (the proxies' is a process).
    pub fn is_xdp(self) -> bool {
        matches!(
            self,
            Path::NullFwd
                | Path::NullFwdBoth
                | Path::LbDsr
                | Path::LbNat
                | Path::LbDsrBaseline
                | Path::LbNatBaseline
        )
    }

    /// Whether the backend's replies cross the LB host as well.
    pub fn both_ways(self) -> bool {
        matches!(
            self,
            Path::NullFwdBoth | Path::LbNat | Path::LbNatBaseline | Path::Haproxy | Path::Nginx
        )
    }

    /// The path a baseline path measures (with another build); any other path itself.
    pub fn measured_as(self) -> Path {
        match self {
            Path::LbDsrBaseline => Path::LbDsr,
            Path::LbNatBaseline => Path::LbNat,
            other => other,
        }
    }

    /// Whether this path runs another build's lb-agent.
    pub fn is_baseline(self) -> bool {
        self.measured_as() != self
    }
}

/// Where the time of all CPUs went during one measurement, in % of all of it
/// (`/proc/stat` deltas; user includes nice).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuSplit {
    pub user: f64,
    pub sys: f64,
    pub softirq: f64,
    pub irq: f64,
    pub idle: f64,
    /// Busy % of each CPU (everything but idle and iowait), cpu0 first.
    pub per_cpu_busy: Vec<f64>,
}

/// The counters of one `/proc/stat` line (in USER_HZ ticks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTicks {
    fn total(&self) -> u64 {
        self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
    }

    fn since(&self, before: &CpuTicks) -> CpuTicks {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        CpuTicks {
            user: d(self.user, before.user),
            nice: d(self.nice, before.nice),
            system: d(self.system, before.system),
            idle: d(self.idle, before.idle),
            iowait: d(self.iowait, before.iowait),
            irq: d(self.irq, before.irq),
            softirq: d(self.softirq, before.softirq),
            steal: d(self.steal, before.steal),
        }
    }
}

/// `/proc/stat`: the `cpu` line (all CPUs) and each `cpuN` line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcStat {
    pub all: CpuTicks,
    pub cpus: Vec<CpuTicks>,
}

impl ProcStat {
    pub fn parse(text: &str) -> Result<Self> {
        let mut stat = ProcStat::default();
        let mut seen_all = false;
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let Some(name) = words.next() else { continue };
            if !name.starts_with("cpu") {
                continue;
            }
            let numbers: Vec<u64> = words
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("/proc/stat: {line:?}"))?;
            if numbers.len() < 7 {
                bail!("/proc/stat: too few fields in {line:?}");
            }
            let at = |i: usize| numbers.get(i).copied().unwrap_or(0);
            let ticks = CpuTicks {
                user: at(0),
                nice: at(1),
                system: at(2),
                idle: at(3),
                iowait: at(4),
                irq: at(5),
                softirq: at(6),
                steal: at(7),
            };
            if name == "cpu" {
                stat.all = ticks;
                seen_all = true;
            } else {
                stat.cpus.push(ticks);
            }
        }
        if !seen_all {
            bail!("/proc/stat has no `cpu` line");
        }
        Ok(stat)
    }

    /// The split of the time between `before` and `self`.
    pub fn split_since(&self, before: &ProcStat) -> CpuSplit {
        let d = self.all.since(&before.all);
        let total = d.total().max(1) as f64;
        let pct = |v: u64| 100.0 * v as f64 / total;
        let per_cpu_busy = self
            .cpus
            .iter()
            .zip(&before.cpus)
            .map(|(now, then)| {
                let d = now.since(then);
                let busy = d.total() - d.idle - d.iowait;
                100.0 * busy as f64 / d.total().max(1) as f64
            })
            .collect();
        CpuSplit {
            user: pct(d.user + d.nice),
            sys: pct(d.system),
            softirq: pct(d.softirq),
            irq: pct(d.irq),
            idle: pct(d.idle + d.iowait),
            per_cpu_busy,
        }
    }
}

/// What one `wrk` run reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WrkRun {
    pub requests: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx answers.
    pub errors: u64,
}

/// Parses `wrk`'s text output.
pub fn parse_wrk(text: &str) -> Result<WrkRun> {
    let mut run = WrkRun::default();
    let mut have_rate = false;
    let mut have_count = false;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            run.per_second = rest
                .trim()
                .parse()
                .with_context(|| format!("wrk: {line:?}"))?;
            have_rate = true;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 3"
            for part in rest.split(',') {
                let n = part
                    .split_whitespace()
                    .nth(1)
                    .ok_or_else(|| anyhow!("wrk: {line:?}"))?;
                run.errors += n.parse::<u64>().with_context(|| format!("wrk: {line:?}"))?;
            }
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.errors += rest
                .trim()
                .parse::<u64>()
                .with_context(|| format!("wrk: {line:?}"))?;
        } else if line.contains(" requests in ") {
            // "81234 requests in 4.00s, 9.21MB read"
            let mut words = line.split_whitespace();
            run.requests = words
                .next()
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| anyhow!("wrk: {line:?}"))?;
            run.seconds = words
                .nth(2)
                .and_then(|w| w.trim_end_matches(',').strip_suffix('s'))
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| anyhow!("wrk: {line:?}"))?;
            have_count = true;
        }
    }
    if !have_rate || !have_count {
        bail!("wrk printed no request count or rate: {text:?}");
    }
    Ok(run)
}

/// What one `iperf3 -J` client run reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IperfRun {
    /// Received by the server, bits per second.
    pub bits_per_second: f64,
    pub seconds: f64,
    /// Sender retransmissions.
    pub retransmits: u64,
}

/// Parses `iperf3 -c … -J` output.
pub fn parse_iperf3(json: &str) -> Result<IperfRun> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 -J: not JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let end = v.get("end").ok_or_else(|| anyhow!("iperf3 -J: no `end`"))?;
    let received = end
        .get("sum_received")
        .ok_or_else(|| anyhow!("iperf3 -J: no end.sum_received"))?;
    let number = |o: &serde_json::Value, k: &str| o.get(k).and_then(serde_json::Value::as_f64);
    Ok(IperfRun {
        bits_per_second: number(received, "bits_per_second")
            .ok_or_else(|| anyhow!("iperf3 -J: no end.sum_received.bits_per_second"))?,
        seconds: number(received, "seconds").unwrap_or(0.0),
        retransmits: end
            .get("sum_sent")
            .and_then(|s| s.get("retransmits"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
    })
}

/// TCP's own counters in the client's and the backend's namespaces over one
/// connections run (`/proc/net/snmp` and `/proc/net/netstat`): what the run cost the
/// two hosts' TCP beyond the forwarding. A SYN the backend refuses in TIME_WAIT
/// (its timestamp older than the one the old connection on that tuple last carried)
/// costs the client a reset and a SYN sent again.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpEvents {
    /// SYNs the client sent again (`TcpExt: TCPSynRetrans`).
    pub syn_retransmits: u64,
    /// Resets the client sent (`Tcp: OutRsts`).
    pub client_resets: u64,
    /// Segments the backend refused in TIME_WAIT for an old timestamp
    /// (`TcpExt: PAWSTimewait`).
    pub backend_paws_timewait: u64,
}

impl TcpEvents {
    /// The counts between two readings of each host's counters (`parse_net_counters`).
    pub fn between(
        client: (&NetCounters, &NetCounters),
        backend: (&NetCounters, &NetCounters),
    ) -> Self {
        let delta = |(before, after): (&NetCounters, &NetCounters), name: &str| {
            let of = |c: &NetCounters| c.get(name).copied().unwrap_or(0);
            of(after).saturating_sub(of(before))
        };
        TcpEvents {
            syn_retransmits: delta(client, "TcpExt:TCPSynRetrans"),
            client_resets: delta(client, "Tcp:OutRsts"),
            backend_paws_timewait: delta(backend, "TcpExt:PAWSTimewait"),
        }
    }
}

/// A host's network counters by `Group:Name` (`Tcp:OutRsts`).
pub type NetCounters = std::collections::BTreeMap<String, u64>;

/// Parses `/proc/net/snmp` and `/proc/net/netstat` (read one after the other): each
/// group is a line of names and a line of values, both starting with `Group:`.
/// Values that are not unsigned (`Tcp: MaxConn -1`) are left out.
pub fn parse_net_counters(text: &str) -> Result<NetCounters> {
    let mut out = NetCounters::new();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    while let Some(names) = lines.next() {
        let values = lines
            .next()
            .ok_or_else(|| anyhow!("net counters: `{names}` has no line of values"))?;
        let (group, names) = names
            .split_once(':')
            .ok_or_else(|| anyhow!("net counters: no group in `{names}`"))?;
        let (vgroup, values) = values
            .split_once(':')
            .ok_or_else(|| anyhow!("net counters: no group in `{values}`"))?;
        if group != vgroup {
            bail!("net counters: names of {group} followed by values of {vgroup}");
        }
        let names: Vec<&str> = names.split_whitespace().collect();
        let values: Vec<&str> = values.split_whitespace().collect();
        if names.len() != values.len() {
            bail!(
                "net counters: {group} has {} names and {} values",
                names.len(),
                values.len()
            );
        }
        for (name, value) in names.into_iter().zip(values) {
            if let Ok(v) = value.parse::<u64>() {
                out.insert(format!("{group}:{name}"), v);
            }
        }
    }
    Ok(out)
}

/// One repetition of one path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub repetition: usize,
    pub conn: WrkRun,
    pub conn_cpu: CpuSplit,
    pub bulk: IperfRun,
    pub bulk_cpu: CpuSplit,
    /// The mean ns per run of the XDP program on the LB's veth during each load (the
    /// kernel's run-time statistics); `None` on the direct path.
    #[serde(default)]
    pub conn_xdp_ns: Option<f64>,
    #[serde(default)]
    pub bulk_xdp_ns: Option<f64>,
    /// The client's and the backend's TCP events during the connections run; `None` in
    /// files from before they were read.
    #[serde(default)]
    pub conn_tcp: Option<TcpEvents>,
    /// The packets the LB's veth received during the connections run (its XDP program
    /// ran once for each); `None` in files from before they were kept.
    #[serde(default)]
    pub conn_lb_packets: Option<u64>,
}

/// The medians of one path, and its ratios to direct and to the null forwarder.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub conn_per_second: f64,
    pub bulk_gbit_per_second: f64,
    pub conn_vs_direct: Option<f64>,
    pub conn_vs_null_fwd: Option<f64>,
    pub bulk_vs_direct: Option<f64>,
    pub bulk_vs_null_fwd: Option<f64>,
    /// The bulk stream's retransmitted segments: how much of its rate loss decided.
    #[serde(default)]
    pub bulk_retransmits: f64,
    /// The medians of the samples' XDP ns per run (see `Sample`).
    #[serde(default)]
    pub conn_xdp_ns: Option<f64>,
    #[serde(default)]
    pub bulk_xdp_ns: Option<f64>,
    /// The lowest and the highest ratio to the null forwarder's sample of the same
    /// repetition (run next to it in time): how far one comparison may go.
    #[serde(default)]
    pub conn_vs_null_fwd_range: Option<[f64; 2]>,
    #[serde(default)]
    pub bulk_vs_null_fwd_range: Option<[f64; 2]>,
    /// The lowest and the highest sample: how far one run may be from the median.
    #[serde(default)]
    pub conn_range: [f64; 2],
    #[serde(default)]
    pub bulk_range: [f64; 2],
    pub conn_cpu: CpuSplit,
    pub bulk_cpu: CpuSplit,
    /// The medians of the samples' `TcpEvents` per 1000 connections: SYNs sent again,
    /// the client's resets, the backend's refusals in TIME_WAIT.
    #[serde(default)]
    pub conn_tcp_per_1000: Option<[f64; 3]>,
    /// The LB program's work per connection (`xdp_per_conn`): packets, µs, and the
    /// share of a core it took at the path's connection rate, in %.
    #[serde(default)]
    pub conn_xdp_per_conn: Option<[f64; 3]>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathResult {
    pub path: Path,
    pub samples: Vec<Sample>,
    pub median: Summary,
}

/// The machine the figures come from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub date: String,
}

/// How the lab was set up for every path alike.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub repetitions: usize,
    pub conn_seconds: u32,
    pub wrk_connections: u32,
    pub bulk_seconds: u32,
    /// `threaded`: the LB's veth polled by a NAPI thread pinned to the last CPU, the
    /// proxies there too, the client's tools on CPU 0. `inline`: no pinning.
    pub napi: String,
    /// The `ethtool -K` settings of every sender's veth.
    pub offloads: String,
    /// The queue (qdisc) of every bridge port; empty: the veth default (none).
    #[serde(default)]
    pub queue: String,
    /// Where the baseline paths' lb-agent came from (`LB_BENCH_BASELINE_BIN_DIR`); empty:
    /// no baseline path.
    #[serde(default)]
    pub baseline_bin_dir: String,
}

/// Everything one run of the comparative bench measured: what `lab.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LabReport {
    pub machine: Machine,
    pub settings: Settings,
    pub paths: Vec<PathResult>,
}

/// The largest spread between repetitions, (highest − lowest) / median, that still makes
/// a quiet run, for the paths every ratio rests on (direct, the null forwarder). Quiet
/// runs on the development machine stayed within 10%; runs while other load moved the
/// machine spread by 20 to 30% and more.
pub const STEADY_SPREAD: f64 = 0.15;

/// The median (the mean of the two middle values for an even count); 0 for none.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// A sample's connection rate and bulk rate, as measures to pair.
const CONN: fn(&Sample) -> f64 = |x| x.conn.per_second;
const BULK: fn(&Sample) -> f64 = |x| x.bulk.bits_per_second;

/// Each repetition's ratio of `samples`' measure `f` to `base`'s in the same repetition:
/// (repetition, ratio), for the repetitions both have (and a base above 0).
fn paired_ratios(samples: &[Sample], base: &[Sample], f: fn(&Sample) -> f64) -> Vec<(usize, f64)> {
    samples
        .iter()
        .filter_map(|x| {
            let n = base.iter().find(|n| n.repetition == x.repetition)?;
            (f(n) > 0.0).then(|| (x.repetition, f(x) / f(n)))
        })
        .collect()
}

/// One repetition of a measured path far from its path's other repetitions: its ratio
/// to the null forwarder in the same repetition, and the median of those ratios.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outlier {
    pub path: Path,
    pub measure: &'static str,
    pub repetition: usize,
    pub ratio: f64,
    pub median: f64,
}

/// The median of the values present; `None` if none is.
fn median_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let present: Vec<f64> = values.flatten().collect();
    (!present.is_empty()).then(|| median(present))
}

/// The lowest and the highest value; zeros for none.
fn range(values: impl Iterator<Item = f64>) -> [f64; 2] {
    values
        .fold(None, |r: Option<[f64; 2]>, v| {
            Some(r.map_or([v, v], |[lo, hi]| [lo.min(v), hi.max(v)]))
        })
        .unwrap_or_default()
}

/// `count` per connection of a run of `requests` connections (0 for a run of none).
fn per_connection(count: f64, requests: u64) -> f64 {
    if requests > 0 {
        count / requests as f64
    } else {
        0.0
    }
}

/// The medians, field by field, of what `f` reads from each sample; `None` if a sample
/// lacks it (a file from before it was kept), or for no sample.
fn sample_medians<const N: usize>(
    samples: &[Sample],
    f: impl Fn(&Sample) -> Option<[f64; N]>,
) -> Option<[f64; N]> {
    let per: Vec<[f64; N]> = samples.iter().map(f).collect::<Option<_>>()?;
    if per.is_empty() {
        return None;
    }
    Some(std::array::from_fn(|i| median(per.iter().map(|v| v[i]))))
}

/// The medians of the samples' TCP events per 1000 connections (`Summary`), if every
/// sample has them.
fn tcp_per_1000(samples: &[Sample]) -> Option<[f64; 3]> {
    sample_medians(samples, |x| {
        let t = x.conn_tcp.as_ref()?;
        let rate = |n: u64| 1000.0 * per_connection(n as f64, x.conn.requests);
        Some([
            rate(t.syn_retransmits),
            rate(t.client_resets),
            rate(t.backend_paws_timewait),
        ])
    })
}

/// The medians of the LB program's work per connection (`Summary::conn_xdp_per_conn`),
/// if every sample has its packet count and its ns per packet: the packets its veth
/// received per connection; those times the ns per packet, in µs; and that times the
/// connection rate, as a share of one core in %. Where the LB shares a core with the
/// backend's servers, as in this lab, that share comes off the connection rate.
fn xdp_per_conn(samples: &[Sample]) -> Option<[f64; 3]> {
    sample_medians(samples, |x| {
        let packets = per_connection(x.conn_lb_packets? as f64, x.conn.requests);
        let us = packets * x.conn_xdp_ns? / 1000.0;
        Some([packets, us, us * x.conn.per_second / 1e6 * 100.0])
    })
}

fn median_split<'a>(splits: impl Iterator<Item = &'a CpuSplit> + Clone) -> CpuSplit {
    let field = |f: fn(&CpuSplit) -> f64| median(splits.clone().map(f));
    let cpus = splits
        .clone()
        .map(|s| s.per_cpu_busy.len())
        .max()
        .unwrap_or(0);
    CpuSplit {
        user: field(|s| s.user),
        sys: field(|s| s.sys),
        softirq: field(|s| s.softirq),
        irq: field(|s| s.irq),
        idle: field(|s| s.idle),
        per_cpu_busy: (0..cpus)
            .map(|i| {
                median(
                    splits
                        .clone()
                        .filter_map(|s| s.per_cpu_busy.get(i).copied()),
                )
            })
            .collect(),
    }
}

impl LabReport {
    /// Fills every path's `median` from its samples, ratios included.
    pub fn summarise(&mut self) {
        for result in &mut self.paths {
            let s = &result.samples;
            result.median = Summary {
                conn_per_second: median(s.iter().map(|x| x.conn.per_second)),
                bulk_gbit_per_second: median(s.iter().map(|x| x.bulk.bits_per_second / 1e9)),
                bulk_retransmits: median(s.iter().map(|x| x.bulk.retransmits as f64)),
                conn_xdp_ns: median_of(s.iter().map(|x| x.conn_xdp_ns)),
                bulk_xdp_ns: median_of(s.iter().map(|x| x.bulk_xdp_ns)),
                conn_range: range(s.iter().map(|x| x.conn.per_second)),
                bulk_range: range(s.iter().map(|x| x.bulk.bits_per_second / 1e9)),
                conn_cpu: median_split(s.iter().map(|x| &x.conn_cpu)),
                bulk_cpu: median_split(s.iter().map(|x| &x.bulk_cpu)),
                conn_tcp_per_1000: tcp_per_1000(s),
                conn_xdp_per_conn: xdp_per_conn(s),
                ..Summary::default()
            };
        }
        let of = |report: &LabReport, path: Path| {
            report
                .paths
                .iter()
                .find(|r| r.path == path)
                .map(|r| (r.median.conn_per_second, r.median.bulk_gbit_per_second))
        };
        let direct = of(self, Path::Direct);
        let null = of(self, Path::NullFwd);
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        let null_samples: Option<Vec<Sample>> = self
            .paths
            .iter()
            .find(|r| r.path == Path::NullFwd)
            .map(|r| r.samples.clone());
        for result in &mut self.paths {
            if let Some(base) = &null_samples {
                let paired = |f: fn(&Sample) -> f64| -> Option<[f64; 2]> {
                    let ratios = paired_ratios(&result.samples, base, f);
                    (!ratios.is_empty()).then(|| range(ratios.into_iter().map(|(_, r)| r)))
                };
                result.median.conn_vs_null_fwd_range = paired(CONN);
                result.median.bulk_vs_null_fwd_range = paired(BULK);
            }
            let m = &mut result.median;
            m.conn_vs_direct = direct.and_then(|d| ratio(m.conn_per_second, d.0));
            m.bulk_vs_direct = direct.and_then(|d| ratio(m.bulk_gbit_per_second, d.1));
            m.conn_vs_null_fwd = null.and_then(|n| ratio(m.conn_per_second, n.0));
            m.bulk_vs_null_fwd = null.and_then(|n| ratio(m.bulk_gbit_per_second, n.1));
        }
    }

    /// The reference paths' measures (direct, the null forwarder) whose repetitions
    /// spread beyond `STEADY_SPREAD` of their median: (path, measure, spread). Empty for
    /// a quiet run.
    pub fn unsteady(&self) -> Vec<(Path, &'static str, f64)> {
        let mut out = Vec::new();
        for r in &self.paths {
            if !matches!(r.path, Path::Direct | Path::NullFwd) {
                continue;
            }
            let m = &r.median;
            for (what, [lo, hi], median) in [
                ("connection rate", m.conn_range, m.conn_per_second),
                ("bulk rate", m.bulk_range, m.bulk_gbit_per_second),
            ] {
                if median > 0.0 && (hi - lo) / median > STEADY_SPREAD {
                    out.push((r.path, what, (hi - lo) / median));
                }
            }
        }
        out
    }

    /// The measured paths' repetitions (every path but direct and the null forwarder)
    /// whose ratio to the null forwarder in the same repetition lies more than
    /// `STEADY_SPREAD` (relative) from the median of the path's such ratios: a
    /// repetition something else disturbed (a compile, another tenant), or one the
    /// path itself lost. The reference paths' check (`unsteady`) cannot see them.
    pub fn outliers(&self) -> Vec<Outlier> {
        let Some(base) = self.paths.iter().find(|r| r.path == Path::NullFwd) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for r in &self.paths {
            if matches!(r.path, Path::Direct | Path::NullFwd) {
                continue;
            }
            for (measure, f) in [("connections", CONN), ("bulk", BULK)] {
                let ratios = paired_ratios(&r.samples, &base.samples, f);
                let m = median(ratios.iter().map(|(_, x)| *x));
                for (repetition, ratio) in ratios {
                    if m > 0.0 && (ratio / m - 1.0).abs() > STEADY_SPREAD {
                        out.push(Outlier {
                            path: r.path,
                            measure,
                            repetition,
                            ratio,
                            median: m,
                        });
                    }
                }
            }
        }
        out
    }

    /// Whether this was a quiet run (`unsteady`), and the measured paths' repetitions far
    /// from the rest (`outliers`), in a sentence or two.
    pub fn steadiness(&self) -> String {
        let outliers = self.outliers();
        let far = if outliers.is_empty() {
            String::new()
        } else {
            let each: Vec<String> = outliers
                .iter()
                .map(|o| {
                    format!(
                        "{} {} {:.2}× in repetition {} (its repetitions' median {:.2}×)",
                        o.path.name(),
                        o.measure,
                        o.ratio,
                        o.repetition + 1,
                        o.median
                    )
                })
                .collect();
            format!(
                " Repetitions more than {:.0}% from their path's median ratio to the null \
                 forwarder, which the medians hold out and the brackets show: {}.",
                STEADY_SPREAD * 100.0,
                each.join("; ")
            )
        };
        let unsteady = self.unsteady();
        if unsteady.is_empty() {
            return format!(
                "A quiet run: every repetition of the direct path and of the null forwarder \
                 within {:.0}% of their medians.{far}",
                STEADY_SPREAD * 100.0
            );
        }
        let what: Vec<String> = unsteady
            .iter()
            .map(|(path, measure, spread)| {
                format!("{} {measure} {:.0}%", path.name(), spread * 100.0)
            })
            .collect();
        format!(
            "**Not a quiet run**: repetitions spread by more than {:.0}% of the median ({}); \
             other load moved the figures, so this run's ratios cannot tell whether a goal \
             is met.{far}",
            STEADY_SPREAD * 100.0,
            what.join(", ")
        )
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).context("writing the bench report as JSON")
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).context("reading the bench report (JSON)")
    }

    /// The README's table: one row per path, medians, ratios and the CPU split.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let s = &self.settings;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Measured {} on {} ({} cores), Linux {}; median of {} repetitions, paths rotated \
             in each; wrk {} s with {} connections (`Connection: close`), iperf3 one stream \
             {} s after {} s not counted; NAPI {}; sender offloads: {}; bridge ports' queue: \
             {}. In brackets: the lowest \
             and the highest repetition (for × null fwd: of the ratio to the null \
             forwarder's run in the same repetition).",
            m.date,
            m.cpu_model,
            m.cores,
            m.kernel,
            s.repetitions,
            s.conn_seconds,
            s.wrk_connections,
            s.bulk_seconds,
            super::comparative::BULK_OMIT_SECONDS,
            s.napi,
            s.offloads,
            if s.queue.is_empty() { "none" } else { &s.queue }
        );
        if !s.baseline_bin_dir.is_empty() {
            let _ = writeln!(
                out,
                "The baseline build's paths ran the lb-agent of `{}`.",
                s.baseline_bin_dir
            );
        }
        out.push('\n');
        out.push_str(
            "| path | connections/s | × direct | × null fwd | bulk Gbit/s | × direct | × null fwd \
             | bulk retransmits | XDP ns per packet (connections / bulk) \
             | XDP per connection: packets / µs / % of a core \
             | per 1000 connections: SYNs sent again / client resets / backend TIME_WAIT refusals \
             | CPU during connections (user / sys / softirq %) \
             | CPU during bulk (user / sys / softirq %) |\n",
        );
        out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n");
        let ratio = |r: Option<f64>| r.map_or("–".to_string(), |r| format!("{r:.2}×"));
        let paired = |r: Option<f64>, range: Option<[f64; 2]>| match (r, range) {
            (Some(r), Some([lo, hi])) => format!("{r:.2}× ({lo:.2}–{hi:.2})"),
            (r, _) => ratio(r),
        };
        let ns = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.0}"));
        let cpu = |c: &CpuSplit| format!("{:.0} / {:.0} / {:.0}", c.user, c.sys, c.softirq);
        for r in &self.paths {
            let x = &r.median;
            let _ = writeln!(
                out,
                "| {} | {:.0} ({:.0}–{:.0}) | {} | {} | {:.2} ({:.2}–{:.2}) | {} | {} | {:.0} | {} \
                 | {} | {} | {} | {} |",
                r.path.name(),
                x.conn_per_second,
                x.conn_range[0],
                x.conn_range[1],
                ratio(x.conn_vs_direct),
                paired(x.conn_vs_null_fwd, x.conn_vs_null_fwd_range),
                x.bulk_gbit_per_second,
                x.bulk_range[0],
                x.bulk_range[1],
                ratio(x.bulk_vs_direct),
                paired(x.bulk_vs_null_fwd, x.bulk_vs_null_fwd_range),
                x.bulk_retransmits,
                match (x.conn_xdp_ns, x.bulk_xdp_ns) {
                    (None, None) => "–".to_string(),
                    (c, b) => format!("{} / {}", ns(c), ns(b)),
                },
                x.conn_xdp_per_conn
                    .map_or("–".to_string(), |[packets, us, share]| format!(
                        "{packets:.1} / {us:.2} / {share:.1}"
                    )),
                x.conn_tcp_per_1000
                    .map_or("–".to_string(), |[a, b, c]| format!(
                        "{a:.1} / {b:.1} / {c:.1}"
                    )),
                cpu(&x.conn_cpu),
                cpu(&x.bulk_cpu),
            );
        }
        out.push('\n');
        out.push_str(&self.steadiness());
        out.push('\n');
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const WRK: &str = "Running 4s test @ http://10.77.0.11:80/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms  402.11us   9.80ms   80.12%
    Req/Sec    20.10k     1.02k   21.90k    70.00%
  80400 requests in 4.00s, 12.11MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  20099.50
Transfer/sec:      3.03MB
";

    #[test]
    fn reads_wrk() {
        let run = parse_wrk(WRK).unwrap();
        assert_eq!(
            run,
            WrkRun {
                requests: 80400,
                seconds: 4.0,
                per_second: 20099.5,
                errors: 6
            }
        );
        assert!(parse_wrk("unable to connect to 10.77.0.11:80 Connection refused").is_err());
    }

    #[test]
    fn reads_iperf3() {
        let json = r#"{"start":{},"intervals":[],"end":{"sum_sent":{"seconds":4.0,"bytes":1,"bits_per_second":5.1e9,"retransmits":7},"sum_received":{"seconds":4.01,"bytes":1,"bits_per_second":5.0e9}}}"#;
        let run = parse_iperf3(json).unwrap();
        assert_eq!(run.bits_per_second, 5.0e9);
        assert_eq!(run.retransmits, 7);
        let err = parse_iperf3(r#"{"start":{},"error":"unable to connect to server"}"#);
        assert!(format!("{:#}", err.unwrap_err()).contains("unable to connect"));
    }

    #[test]
    fn reads_net_counters() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoMin MaxConn ActiveOpens OutRsts\nTcp: 200 -1 31 7\n\
                    TcpExt: SyncookiesSent PAWSTimewait TCPSynRetrans\nTcpExt: 0 5 12\n";
        let c = parse_net_counters(text).unwrap();
        assert_eq!(c.get("Tcp:OutRsts"), Some(&7));
        assert_eq!(c.get("TcpExt:PAWSTimewait"), Some(&5));
        assert_eq!(c.get("Tcp:MaxConn"), None, "not a count");
        let mut later = c.clone();
        later.insert("Tcp:OutRsts".into(), 10);
        later.insert("TcpExt:TCPSynRetrans".into(), 20);
        let mut backend = c.clone();
        backend.insert("TcpExt:PAWSTimewait".into(), 9);
        assert_eq!(
            TcpEvents::between((&c, &later), (&c, &backend)),
            TcpEvents {
                syn_retransmits: 8,
                client_resets: 3,
                backend_paws_timewait: 4
            }
        );
        assert!(parse_net_counters("Tcp: A B\nTcp: 1\n").is_err());
        assert!(parse_net_counters("Tcp: A B\nUdp: 1 2\n").is_err());
        assert!(parse_net_counters("Tcp: A B\n").is_err());
    }

    #[test]
    fn splits_cpu_time() {
        let before = ProcStat::parse(
            "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\ncpu1 50 0 50 400 0 0 0 0 0 0\nintr 1\n",
        )
        .unwrap();
        let after = ProcStat::parse(
            "cpu  150 10 140 900 0 0 100 0 0 0\ncpu0 100 10 90 400 0 0 0 0 0 0\ncpu1 50 0 50 500 0 0 100 0 0 0\nintr 2\n",
        )
        .unwrap();
        let s = after.split_since(&before);
        // 300 ticks: 60 user + nice, 40 sys, 100 softirq, 100 idle.
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(s.user, 20.0) && near(s.sys, 40.0 / 3.0), "{s:?}");
        assert!(
            near(s.softirq, 100.0 / 3.0) && near(s.idle, 100.0 / 3.0),
            "{s:?}"
        );
        assert_eq!(s.per_cpu_busy, vec![100.0, 50.0]);
        assert!(ProcStat::parse("intr 1\n").is_err());
    }

    fn split(user: f64) -> CpuSplit {
        CpuSplit {
            user,
            sys: 10.0,
            softirq: 30.0,
            irq: 0.0,
            idle: 60.0 - user,
            per_cpu_busy: vec![90.0, 50.0],
        }
    }

    fn sample(repetition: usize, conn: f64, gbit: f64) -> Sample {
        Sample {
            repetition,
            conn: WrkRun {
                requests: (conn * 4.0) as u64,
                seconds: 4.0,
                per_second: conn,
                errors: 0,
            },
            conn_cpu: split(20.0 + repetition as f64),
            bulk: IperfRun {
                bits_per_second: gbit * 1e9,
                seconds: 4.0,
                retransmits: 10 * repetition as u64,
            },
            bulk_cpu: split(5.0),
            conn_xdp_ns: (repetition > 0).then_some(100.0 * repetition as f64),
            bulk_xdp_ns: None,
            conn_tcp: Some(TcpEvents {
                syn_retransmits: 40 * repetition as u64,
                client_resets: 10 * repetition as u64,
                backend_paws_timewait: 20 * repetition as u64,
            }),
            conn_lb_packets: Some(10 * (conn * 4.0) as u64 + 1000 * repetition as u64),
        }
    }

    /// A fixed sample: direct, the null forwarder and HAProxy, three repetitions each.
    pub(crate) fn fixed() -> LabReport {
        let result = |path, figures: [(f64, f64); 3]| PathResult {
            path,
            samples: figures
                .iter()
                .enumerate()
                .map(|(i, &(c, g))| sample(i, c, g))
                .collect(),
            median: Summary::default(),
        };
        let mut report = LabReport {
            machine: Machine {
                cpu_model: "Test CPU".into(),
                cores: 2,
                kernel: "6.18.0".into(),
                date: "2026-11-27T12:00:00Z".into(),
            },
            settings: Settings {
                repetitions: 3,
                conn_seconds: 4,
                wrk_connections: 32,
                bulk_seconds: 4,
                napi: "threaded".into(),
                offloads: "tx off, gso off".into(),
                queue: "pfifo limit 1000".into(),
                baseline_bin_dir: String::new(),
            },
            paths: vec![
                result(
                    Path::Direct,
                    [(20_000.0, 10.0), (22_000.0, 12.0), (21_000.0, 11.0)],
                ),
                result(
                    Path::NullFwd,
                    [(16_000.0, 8.0), (15_000.0, 9.0), (17_000.0, 7.0)],
                ),
                result(
                    Path::Haproxy,
                    [(8_000.0, 4.0), (8_400.0, 4.4), (7_000.0, 4.2)],
                ),
            ],
        };
        report.summarise();
        report
    }

    #[test]
    fn medians_and_ratios() {
        let r = fixed();
        let haproxy = &r.paths[2].median;
        assert_eq!(haproxy.conn_per_second, 8_000.0);
        assert!((haproxy.bulk_gbit_per_second - 4.2).abs() < 1e-9);
        assert_eq!(haproxy.conn_vs_direct, Some(8_000.0 / 21_000.0));
        assert_eq!(haproxy.conn_vs_null_fwd, Some(0.5));
        assert!((haproxy.bulk_vs_null_fwd.unwrap() - 4.2 / 8.0).abs() < 1e-9);
        assert_eq!(r.paths[0].median.conn_vs_direct, Some(1.0));
        assert_eq!(haproxy.conn_cpu.user, 21.0);
        assert_eq!(haproxy.conn_cpu.per_cpu_busy, vec![90.0, 50.0]);
        assert_eq!(haproxy.bulk_retransmits, 10.0);
        assert_eq!(haproxy.conn_range, [7_000.0, 8_400.0]);
        // Paired by repetition: 8000/16000, 8400/15000, 7000/17000.
        assert_eq!(
            haproxy.conn_vs_null_fwd_range,
            Some([7_000.0 / 17_000.0, 8_400.0 / 15_000.0])
        );
        assert_eq!(
            haproxy.conn_xdp_ns,
            Some(150.0),
            "the samples that have one"
        );
        assert_eq!(haproxy.bulk_xdp_ns, None);
        // Per 1000 connections: 0 of 32000, 40 of 33600, 80 of 28000 SYNs again.
        let [syn, resets, paws] = haproxy.conn_tcp_per_1000.unwrap();
        assert!((syn - 40_000.0 / 33_600.0).abs() < 1e-9, "{syn}");
        assert!((resets - 10_000.0 / 33_600.0).abs() < 1e-9, "{resets}");
        assert!((paws - 20_000.0 / 33_600.0).abs() < 1e-9, "{paws}");
        let mut old = r.paths[2].samples.clone();
        old[1].conn_tcp = None;
        assert_eq!(
            tcp_per_1000(&old),
            None,
            "a sample without them: no medians"
        );
        // The program's work per connection: the first sample has no ns per packet.
        assert_eq!(
            haproxy.conn_xdp_per_conn, None,
            "a sample without one: none"
        );
        let mut all = r.paths[2].samples.clone();
        all[0].conn_xdp_ns = Some(50.0);
        // Packets per connection 10, 10 + 1000/33600, 10 + 2000/28000; ns 50, 100, 200.
        let [packets, us, share] = xdp_per_conn(&all).unwrap();
        let p1 = 10.0 + 1000.0 / 33_600.0;
        assert!((packets - p1).abs() < 1e-9, "{packets}");
        assert!((us - p1 * 0.1).abs() < 1e-9, "{us}");
        // µs per connection times 8400 connections/s, of a second, in %.
        assert!((share - p1 * 0.1 * 8_400.0 / 1e4).abs() < 1e-9, "{share}");
        all[1].conn_lb_packets = None;
        assert_eq!(
            xdp_per_conn(&all),
            None,
            "a sample without its packets: none"
        );
        assert_eq!(range(std::iter::empty()), [0.0, 0.0]);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median([]), 0.0);
    }

    #[test]
    fn a_run_is_quiet_only_if_its_reference_paths_kept_still() {
        // The fixed report: direct's bulk 10-12 around 11 (18%), the null forwarder's
        // connections 15-17k around 16k (12.5%) and bulk 7-9 around 8 (25%).
        let r = fixed();
        let unsteady: Vec<(Path, &str)> = r.unsteady().iter().map(|(p, m, _)| (*p, *m)).collect();
        assert_eq!(
            unsteady,
            vec![(Path::Direct, "bulk rate"), (Path::NullFwd, "bulk rate")]
        );
        let line = r.steadiness();
        assert!(line.starts_with("**Not a quiet run**"), "{line}");
        assert!(line.contains("null XDP forwarder bulk rate 25%"), "{line}");
        assert!(r.markdown().ends_with(&format!("{line}\n")));
        // HAProxy's own spread does not count; the reference paths held still.
        let mut quiet = fixed();
        for p in &mut quiet.paths {
            for (i, x) in p.samples.iter_mut().enumerate() {
                if p.path != Path::Haproxy {
                    x.conn.per_second = 10_000.0 + 100.0 * i as f64;
                    x.bulk.bits_per_second = 5e9 + 1e8 * i as f64;
                }
            }
        }
        quiet.summarise();
        assert!(quiet.unsteady().is_empty());
        assert!(quiet.steadiness().starts_with("A quiet run"));
    }

    #[test]
    fn a_disturbed_repetition_of_a_measured_path_is_named() {
        // HAProxy against the null forwarder by repetition: connections 0.50, 0.56,
        // 0.41 (median 0.50: the last 18% off), bulk 0.50, 0.49, 0.60 (median 0.50:
        // the last 20% off).
        let r = fixed();
        let far: Vec<(Path, &str, usize)> = r
            .outliers()
            .iter()
            .map(|o| (o.path, o.measure, o.repetition))
            .collect();
        assert_eq!(
            far,
            vec![
                (Path::Haproxy, "connections", 2),
                (Path::Haproxy, "bulk", 2)
            ]
        );
        let line = r.steadiness();
        assert!(
            line.contains(
                "HAProxy mode tcp connections 0.41× in repetition 3 (its repetitions' median 0.50×)"
            ),
            "{line}"
        );
        // Steady repetitions: none named, and the sentence says nothing more.
        let mut steady = fixed();
        for p in &mut steady.paths {
            for x in &mut p.samples {
                x.conn.per_second = 10_000.0;
                x.bulk.bits_per_second = 5e9;
            }
        }
        steady.summarise();
        assert!(steady.outliers().is_empty());
        assert!(steady.steadiness().ends_with("of their medians."));
        // No null forwarder: nothing to pair with.
        let mut alone = fixed();
        alone.paths.retain(|p| p.path != Path::NullFwd);
        assert!(alone.outliers().is_empty());
    }

    #[test]
    fn ratios_absent_without_their_base() {
        let mut r = fixed();
        r.paths.retain(|p| p.path != Path::NullFwd);
        r.summarise();
        assert_eq!(r.paths[1].median.conn_vs_null_fwd, None);
        assert!(r.markdown().contains("| – |"));
    }

    #[test]
    fn json_round_trip_and_markdown() {
        let mut r = fixed();
        // The null forwarder with an ns per packet in every sample: 50, 100, 200.
        r.paths[1].samples[0].conn_xdp_ns = Some(50.0);
        r.summarise();
        let json = r.to_json().unwrap();
        assert!(json.contains("\"path\": \"null-fwd\""));
        let back = LabReport::from_json(&json).unwrap();
        assert_eq!(back, r);
        for path in Path::ALL.into_iter().chain(Path::BASELINES) {
            assert_eq!(Path::from_id(path.id()).unwrap(), path);
            assert!(
                json.contains(&format!("\"path\": \"{}\"", path.id()))
                    || !r.paths.iter().any(|p| p.path == path)
            );
        }
        assert!(Path::from_id("katran").is_err());
        // A baseline path is its counterpart with another build: the same setup.
        for (base, path) in [
            (Path::LbDsrBaseline, Path::LbDsr),
            (Path::LbNatBaseline, Path::LbNat),
        ] {
            assert_eq!(base.measured_as(), path);
            assert!(base.is_baseline() && !path.is_baseline());
            assert_eq!(
                (base.is_xdp(), base.both_ways()),
                (path.is_xdp(), path.both_ways())
            );
        }
        let md = back.markdown();
        assert!(md.starts_with(
            "Measured 2026-11-27T12:00:00Z on Test CPU (2 cores), Linux 6.18.0; median of 3"
        ));
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 4, "{md}");
        assert_eq!(
            rows[2],
            "| null XDP forwarder | 16000 (15000–17000) | 0.76× | 1.00× (1.00–1.00) | 8.00 (7.00–9.00) | 0.73× | 1.00× (1.00–1.00) | 10 | 100 / – | 10.0 / 1.00 / 1.5 | 0.7 / 0.2 / 0.3 | 21 / 10 / 30 | 5 / 10 / 30 |"
        );
        assert_eq!(
            rows[3],
            "| HAProxy mode tcp | 8000 (7000–8400) | 0.38× | 0.50× (0.41–0.56) | 4.20 (4.00–4.40) | 0.38× | 0.53× (0.49–0.60) | 10 | 150 / – | – | 1.2 / 0.3 / 0.6 | 21 / 10 / 30 | 5 / 10 / 30 |"
        );
    }
}
