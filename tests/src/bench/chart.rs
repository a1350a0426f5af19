//! PNG bar charts of a `LabReport`: connections/s and bulk Gbit/s per path, each bar
//! labelled with its value and its ratio to the null forwarder. Text is drawn with a
//! TrueType font read at run time (Debian's DejaVu Sans, `fonts-dejavu-core`), so the
//! build needs no fontconfig or freetype.

use std::{path::Path as FsPath, sync::OnceLock};

use anyhow::{Context, Result, anyhow};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::{
    report::{LabReport, Path, Summary},
    xdp::XdpReport,
};

/// Where Debian's `fonts-dejavu-core` puts its sans-serif font.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FAMILY: &str = "sans-serif";

/// Registers `FONT` with plotters once per process.
fn font() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| format!("reading {FONT}: {e}"))?;
            // plotters keeps the font for the process's lifetime.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
                .map_err(|_| format!("{FONT} is not a font plotters can read"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

fn colour(path: Path) -> RGBColor {
    match path {
        Path::Direct => RGBColor(120, 120, 120),
        Path::NullFwd => RGBColor(170, 170, 170),
        Path::NullFwdBoth => RGBColor(200, 200, 200),
        Path::LbDsr => RGBColor(31, 119, 180),
        Path::LbNat => RGBColor(255, 127, 14),
        Path::LbDsrBaseline => RGBColor(120, 170, 210),
        Path::LbNatBaseline => RGBColor(250, 185, 120),
        Path::Haproxy => RGBColor(214, 39, 40),
        Path::Nginx => RGBColor(44, 160, 44),
    }
}

/// One bar: the path, its value, its ratio to the null forwarder.
struct Bar {
    path: Path,
    value: f64,
    vs_null: Option<f64>,
}

/// Draws `lab-conn.png` and `lab-bulk.png` into `dir`; returns their paths.
pub fn draw(report: &LabReport, dir: &FsPath) -> Result<Vec<std::path::PathBuf>> {
    font().context("the charts need a font")?;
    let bars = |of: fn(&Summary) -> (f64, Option<f64>)| -> Vec<Bar> {
        report
            .paths
            .iter()
            .map(|r| {
                let (value, vs_null) = of(&r.median);
                Bar {
                    path: r.path,
                    value,
                    vs_null,
                }
            })
            .collect()
    };
    let conn = bars(|m| (m.conn_per_second, m.conn_vs_null_fwd));
    let bulk = bars(|m| (m.bulk_gbit_per_second, m.bulk_vs_null_fwd));
    let m = &report.machine;
    let machine = format!(
        "{} ({} cores), Linux {}, {}; median of {}",
        m.cpu_model, m.cores, m.kernel, m.date, report.settings.repetitions
    );
    let files = [
        (
            "lab-conn.png",
            "Short connections (wrk, Connection: close)",
            "connections/s",
            conn,
            0,
        ),
        (
            "lab-bulk.png",
            "One bulk stream (iperf3)",
            "Gbit/s",
            bulk,
            2,
        ),
    ];
    let mut written = Vec::new();
    for (name, title, unit, bars, decimals) in files {
        let file = dir.join(name);
        bar_chart(&file, title, &machine, unit, &bars, decimals)
            .with_context(|| format!("drawing {}", file.display()))?;
        written.push(file);
    }
    Ok(written)
}

fn bar_chart(
    file: &FsPath,
    title: &str,
    subtitle: &str,
    unit: &str,
    bars: &[Bar],
    decimals: usize,
) -> Result<()> {
    let root = BitMapBackend::new(file, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(56);
    top.draw(&Text::new(
        title.to_string(),
        (12, 6),
        (FAMILY, 22).into_font(),
    ))?;
    top.draw(&Text::new(
        subtitle.to_string(),
        (12, 34),
        (FAMILY, 13).into_font().color(&RGBColor(90, 90, 90)),
    ))?;
    let n = bars.len().max(1);
    let top_value = bars.iter().map(|b| b.value).fold(0.0, f64::max).max(1e-9);
    let mut chart = ChartBuilder::on(&body)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n as f64, 0f64..top_value * 1.2)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc(unit)
        .y_label_formatter(&|v| format!("{v:.*}", decimals.saturating_sub(1)))
        .light_line_style(WHITE)
        .label_style((FAMILY, 13))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let x = i as f64;
        Rectangle::new(
            [(x + 0.15, 0.0), (x + 0.85, b.value)],
            colour(b.path).filled(),
        )
    }))?;
    let above = (FAMILY, 14)
        .into_font()
        .into_text_style(&body)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    let below = (FAMILY, 14)
        .into_font()
        .into_text_style(&body)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (i, b) in bars.iter().enumerate() {
        let at = (i as f64 + 0.5, b.value);
        let label = match b.vs_null {
            Some(r) => format!("{:.*}  ({r:.2}× null)", decimals, b.value),
            None => format!("{:.*}", decimals, b.value),
        };
        chart.draw_series(std::iter::once(Text::new(label, at, above.clone())))?;
        chart.draw_series(std::iter::once(
            EmptyElement::at((i as f64 + 0.5, 0.0))
                + Text::new(b.path.name().to_string(), (0, 6), below.clone()),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// Draws `xdp.png` into `dir`: each case's cost over `XDP_PASS` as a horizontal bar, the
/// baseline object's beside it when there is one; returns its path.
pub fn draw_xdp(report: &XdpReport, dir: &FsPath) -> Result<std::path::PathBuf> {
    font().context("the chart needs a font")?;
    let file = dir.join("xdp.png");
    xdp_chart(report, &file).with_context(|| format!("drawing {}", file.display()))?;
    Ok(file)
}

fn xdp_chart(report: &XdpReport, file: &FsPath) -> Result<()> {
    let shipped = RGBColor(31, 119, 180);
    let baseline = RGBColor(170, 170, 170);
    let n = report.cases.len().max(1);
    let root = BitMapBackend::new(file, (1000, 120 + 44 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(56);
    top.draw(&Text::new(
        "XDP cost per packet over XDP_PASS (BPF_PROG_TEST_RUN)".to_string(),
        (12, 6),
        (FAMILY, 22).into_font(),
    ))?;
    let m = &report.machine;
    let mut subtitle = format!(
        "{} ({} cores), Linux {}, {}; median of {} rounds x {} runs",
        m.cpu_model, m.cores, m.kernel, m.date, report.rounds, report.repeat
    );
    if report.baseline.is_some() {
        subtitle.push_str("; grey: the baseline object, same rounds");
    }
    top.draw(&Text::new(
        subtitle,
        (12, 34),
        (FAMILY, 13).into_font().color(&RGBColor(90, 90, 90)),
    ))?;
    let values = report
        .cases
        .iter()
        .flat_map(|c| std::iter::once(c.over_pass()).chain(c.baseline_over_pass()));
    let top_value = values.fold(0.0, f64::max).max(1.0);
    let names: Vec<String> = report.cases.iter().map(|c| c.name.clone()).collect();
    let mut chart = ChartBuilder::on(&body)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(200)
        .build_cartesian_2d(0f64..top_value * 1.25, (0..n - 1).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("ns over XDP_PASS")
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(row) if *row < n => names[n - 1 - row].clone(),
            _ => String::new(),
        })
        .light_line_style(WHITE)
        .label_style((FAMILY, 13))
        .draw()?;
    let label = (FAMILY, 13)
        .into_font()
        .into_text_style(&body)
        .pos(Pos::new(HPos::Left, VPos::Center));
    // A bar a few pixels short of its row's edges (`gaps`: top, bottom), so rows part.
    let bar = |corners, colour: RGBColor, gaps: (u32, u32)| {
        let mut r = Rectangle::new(corners, colour.filled());
        r.set_margin(gaps.0, gaps.1, 0, 0);
        r
    };
    for (i, c) in report.cases.iter().enumerate() {
        // Rows are drawn bottom up; the first case goes on top.
        let row = n - 1 - i;
        let (from, to) = (SegmentValue::Exact(row), SegmentValue::Exact(row + 1));
        let mid = SegmentValue::CenterOf(row);
        let v = c.over_pass();
        let text = match c.baseline_over_pass() {
            Some(b) => {
                chart.draw_series(std::iter::once(bar(
                    [(0.0, from.clone()), (b, mid.clone())],
                    baseline,
                    (0, 4),
                )))?;
                chart.draw_series(std::iter::once(bar(
                    [(0.0, mid.clone()), (v, to)],
                    shipped,
                    (4, 0),
                )))?;
                format!("{v:+.0} ns ({:+.0} vs baseline)", v - b)
            }
            None => {
                chart.draw_series(std::iter::once(bar(
                    [(0.0, from), (v, to)],
                    shipped,
                    (4, 4),
                )))?;
                format!("{v:+.0} ns")
            }
        };
        let end = c.baseline_over_pass().map_or(v, |b| v.max(b));
        chart.draw_series(std::iter::once(Text::new(
            format!("  {text}"),
            (end, mid),
            label.clone(),
        )))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::fixed;

    /// Both charts of a fixed report are written as PNG files.
    #[test]
    fn draws_both_charts() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lb-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let drawn = draw(&fixed(), &dir);
        let files: Vec<Vec<u8>> = match &drawn {
            Ok(files) => files.iter().map(std::fs::read).collect::<Result<_, _>>()?,
            Err(_) => Vec::new(),
        };
        std::fs::remove_dir_all(&dir)?;
        let drawn = drawn.with_context(|| format!("is {FONT} installed? (cargo xtask setup)"))?;
        assert_eq!(drawn.len(), 2);
        for (file, bytes) in drawn.iter().zip(&files) {
            assert_drawn(file, bytes);
        }
        Ok(())
    }

    /// `bytes`, read from `file`, are a PNG image with something drawn in it.
    fn assert_drawn(file: &FsPath, bytes: &[u8]) {
        assert!(
            bytes.starts_with(b"\x89PNG"),
            "{} is no PNG",
            file.display()
        );
        assert!(bytes.len() > 5_000, "{} is nearly empty", file.display());
    }

    /// The XDP chart of a fixed report, with and without a baseline, is a PNG file.
    #[test]
    fn draws_the_xdp_chart() -> Result<()> {
        for baseline in [false, true] {
            let dir = std::env::temp_dir()
                .join(format!("lb-xdp-chart-{}-{baseline}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let drawn = draw_xdp(&crate::bench::xdp::tests::fixed(baseline), &dir);
            let bytes = match &drawn {
                Ok(file) => std::fs::read(file)?,
                Err(_) => Vec::new(),
            };
            std::fs::remove_dir_all(&dir)?;
            let file =
                drawn.with_context(|| format!("is {FONT} installed? (cargo xtask setup)"))?;
            assert_drawn(&file, &bytes);
        }
        Ok(())
    }
}
