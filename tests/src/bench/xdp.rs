//! The XDP cost per packet of `lb-bench --xdp-only` as files: `xdp.json` (every round's
//! figures and the machine), `xdp.md` (the README's table) and `xdp.png` (written by
//! `chart::draw_xdp`).

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::report::{Machine, median};

/// One case's figures: ns per run, one value per round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct XdpCase {
    pub name: String,
    /// The balancer.
    pub lb_ns: Vec<f64>,
    /// A trivial `XDP_PASS` program on the same frame, in the same round.
    pub pass_ns: Vec<f64>,
    /// `LB_BENCH_BASELINE`'s object in the same round; empty without one.
    #[serde(default)]
    pub baseline_ns: Vec<f64>,
}

impl XdpCase {
    pub fn lb(&self) -> f64 {
        median(self.lb_ns.iter().copied())
    }

    pub fn pass(&self) -> f64 {
        median(self.pass_ns.iter().copied())
    }

    /// The balancer's cost over `XDP_PASS`: the figure the goals are set in.
    pub fn over_pass(&self) -> f64 {
        self.lb() - self.pass()
    }

    /// The baseline object's cost over `XDP_PASS`, if one was measured.
    pub fn baseline_over_pass(&self) -> Option<f64> {
        (!self.baseline_ns.is_empty())
            .then(|| median(self.baseline_ns.iter().copied()) - self.pass())
    }
}

/// One case's line of a table: its medians and what they give.
struct Row<'a> {
    name: &'a str,
    lb: f64,
    pass: f64,
    /// `lb / pass`.
    ratio: f64,
    /// `lb - pass`.
    over: f64,
    /// The baseline's cost over `XDP_PASS`, and ours minus it.
    baseline: Option<(f64, f64)>,
}

impl XdpCase {
    fn row(&self) -> Row<'_> {
        let (lb, pass) = (self.lb(), self.pass());
        let over = lb - pass;
        Row {
            name: &self.name,
            lb,
            pass,
            ratio: lb / pass.max(1.0),
            over,
            baseline: self.baseline_over_pass().map(|b| (b, over - b)),
        }
    }
}

/// Everything one `--xdp-only` run measured: what `xdp.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct XdpReport {
    pub machine: Machine,
    pub rounds: usize,
    /// `BPF_PROG_TEST_RUN`'s repeat: runs per round and case.
    pub repeat: u32,
    /// The file `LB_BENCH_BASELINE` named, if any.
    #[serde(default)]
    pub baseline: Option<String>,
    pub cases: Vec<XdpCase>,
}

impl XdpReport {
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).context("writing the XDP report as JSON")
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).context("reading the XDP report (JSON)")
    }

    /// The console's table, and the baseline's beside it if there is one.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "XDP cost per packet, BPF_PROG_TEST_RUN, median of {} rounds x {} runs",
            self.rounds, self.repeat
        );
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>14} {:>8} {:>10}",
            "case", "lb ns/pkt", "XDP_PASS ns", "ratio", "lb - pass"
        );
        for r in self.cases.iter().map(XdpCase::row) {
            let _ = writeln!(
                out,
                "{:<24} {:>10.1} {:>14.1} {:>7.2}x {:>10.1}",
                r.name, r.lb, r.pass, r.ratio, r.over
            );
        }
        if let Some(baseline) = &self.baseline {
            let _ = writeln!(
                out,
                "the same cases, the object in {baseline} measured in the same rounds:"
            );
            let _ = writeln!(
                out,
                "{:<24} {:>10} {:>10} {:>12}",
                "case", "shipped", "baseline", "difference"
            );
            for r in self.cases.iter().map(XdpCase::row) {
                let (b, d) = r.baseline.unwrap_or((f64::NAN, f64::NAN));
                let _ = writeln!(
                    out,
                    "{:<24} {:>+10.1} {:>+10.1} {:>+12.1}",
                    r.name, r.over, b, d
                );
            }
        }
        out
    }

    /// The README's table, under a line naming the machine and the method.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Measured {} on {} ({} cores), Linux {}; `BPF_PROG_TEST_RUN`, median of {} \
             rounds of {} runs per case.",
            m.date, m.cpu_model, m.cores, m.kernel, self.rounds, self.repeat
        );
        out.push('\n');
        out.push_str("| case | lb ns/pkt | XDP_PASS ns/pkt | ratio | difference |\n");
        out.push_str("|---|---|---|---|---|\n");
        for r in self.cases.iter().map(XdpCase::row) {
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.0} | {:.2}x | {:.0} |",
                r.name, r.lb, r.pass, r.ratio, r.over
            );
        }
        if let Some(baseline) = &self.baseline {
            let _ = writeln!(
                out,
                "\nBeside `{baseline}` in the same rounds (ns over XDP_PASS):\n"
            );
            out.push_str("| case | shipped | baseline | difference |\n|---|---|---|---|\n");
            for r in self.cases.iter().map(XdpCase::row) {
                let _ = match r.baseline {
                    Some((b, d)) => {
                        writeln!(out, "| {} | {:+.0} | {b:+.0} | {d:+.0} |", r.name, r.over)
                    }
                    None => writeln!(out, "| {} | {:+.0} | – | – |", r.name, r.over),
                };
            }
        }
        out
    }
}

/// Writes `xdp.json`, `xdp.md` and `xdp.png` into `dir`; returns their paths. A chart
/// that cannot be drawn (no font) is reported and left out.
pub fn write_files(report: &XdpReport, dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("xdp.json");
    std::fs::write(&json, report.to_json()?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = dir.join("xdp.md");
    std::fs::write(&md, report.markdown()).with_context(|| format!("writing {}", md.display()))?;
    let mut files = vec![json, md];
    match super::chart::draw_xdp(report, dir) {
        Ok(chart) => files.push(chart),
        Err(e) => eprintln!("lb-bench: WARNING: no XDP chart: {e:#}"),
    }
    Ok(files)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fixed(baseline: bool) -> XdpReport {
        let case = |name: &str, lb: [f64; 3], pass: [f64; 3], base: [f64; 3]| XdpCase {
            name: name.into(),
            lb_ns: lb.to_vec(),
            pass_ns: pass.to_vec(),
            baseline_ns: if baseline { base.to_vec() } else { Vec::new() },
        };
        XdpReport {
            machine: Machine {
                cpu_model: "Test CPU".into(),
                cores: 2,
                kernel: "6.18.0".into(),
                date: "2026-11-28T00:50:00Z".into(),
            },
            rounds: 3,
            repeat: 1000,
            baseline: baseline.then(|| "/tmp/old.o".into()),
            cases: vec![
                case(
                    "non-VIP IPv4 packet",
                    [26.0, 27.0, 30.0],
                    [21.0, 21.0, 22.0],
                    [28.0, 28.0, 28.0],
                ),
                case(
                    "established IPv4 flow",
                    [90.0, 89.0, 95.0],
                    [21.0, 20.0, 21.0],
                    [120.0, 119.0, 121.0],
                ),
            ],
        }
    }

    #[test]
    fn the_table_takes_each_column_s_median_and_the_differences() {
        let md = fixed(false).markdown();
        assert!(
            md.starts_with("Measured 2026-11-28T00:50:00Z on Test CPU (2 cores), Linux 6.18.0;"),
            "{md}"
        );
        assert!(
            md.contains("| non-VIP IPv4 packet | 27 | 21 | 1.29x | 6 |"),
            "{md}"
        );
        assert!(
            md.contains("| established IPv4 flow | 90 | 21 | 4.29x | 69 |"),
            "{md}"
        );
        assert!(!md.contains("Beside"), "no baseline, no second table: {md}");
        let md = fixed(true).markdown();
        assert!(
            md.contains("Beside `/tmp/old.o` in the same rounds"),
            "{md}"
        );
        assert!(
            md.contains("| established IPv4 flow | +69 | +99 | -30 |"),
            "{md}"
        );
        let text = fixed(true).text();
        assert!(text.contains("median of 3 rounds x 1000 runs"), "{text}");
        assert!(text.contains("-30.0"), "{text}");
    }

    #[test]
    fn the_json_reads_back_as_written() -> Result<()> {
        let report = fixed(true);
        assert_eq!(XdpReport::from_json(&report.to_json()?)?, report);
        // A report without a baseline may leave its fields out.
        let bare = r#"{"machine":{"cpu_model":"c","cores":1,"kernel":"k","date":"d"},
            "rounds":1,"repeat":1,"cases":[{"name":"x","lb_ns":[2.0],"pass_ns":[1.0]}]}"#;
        let read = XdpReport::from_json(bare)?;
        assert_eq!(
            (read.baseline, read.cases[0].baseline_over_pass()),
            (None, None)
        );
        Ok(())
    }
}
