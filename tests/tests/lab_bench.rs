//! The comparative lab bench end to end, shortened (one repetition, one second per
//! load): every path carries connections and a bulk stream (the bench itself checks that
//! each went through the LB's veth, or around it for the direct path, and through the
//! agent's program for its paths, with the backend's replies translated back through it
//! on the NAT path and none on the DSR path), and the files it writes read back. Asserts
//! no timing.
//! Needs root and the bench's tools (wrk, iperf3, haproxy, nginx; `cargo xtask setup`).

use anyhow::{Context, Result, ensure};
use lb_tests::bench::{
    comparative::{self, Options},
    report::{LabReport, Path},
};

#[test]
fn every_path_carries_connections_and_a_stream() -> Result<()> {
    if !lb_tests::require_root("every_path_carries_connections_and_a_stream") {
        return Ok(());
    }
    let options = Options {
        repetitions: 1,
        conn_seconds: 1,
        bulk_seconds: 1,
        ..Options::default()
    };
    let report = comparative::run(&options)?;
    println!("{}", report.markdown());
    let paths: Vec<Path> = report.paths.iter().map(|r| r.path).collect();
    assert_eq!(paths, Path::ALL.to_vec());
    ensure!(
        paths.contains(&Path::LbDsr) && paths.contains(&Path::LbNat),
        "both agent paths run: {paths:?}"
    );
    for result in &report.paths {
        let name = result.path.name();
        ensure!(result.samples.len() == 1, "{name}: {:?}", result.samples);
        let sample = &result.samples[0];
        ensure!(sample.conn.requests > 0, "{name}: no request: {sample:?}");
        ensure!(
            sample.bulk.bits_per_second > 0.0,
            "{name}: no bulk: {sample:?}"
        );
        ensure!(
            sample.conn_cpu.per_cpu_busy.len() == report.machine.cores,
            "{name}: CPU split {:?} for {} cores",
            sample.conn_cpu,
            report.machine.cores
        );
        // The program on the LB's veth ran for every packet of an XDP path (and the
        // proxies' `xdp_pass`); the direct path has none.
        let has_program = result.path != Path::Direct;
        ensure!(
            sample.conn_xdp_ns.is_some_and(|ns| ns > 0.0) == has_program
                && sample.bulk_xdp_ns.is_some_and(|ns| ns > 0.0) == has_program,
            "{name}: XDP ns per packet {:?} / {:?}",
            sample.conn_xdp_ns,
            sample.bulk_xdp_ns
        );
        // The client's and the backend's TCP counters were read around the run (every
        // path started with no TIME_WAIT left, or the bench failed).
        ensure!(
            sample.conn_tcp.is_some() && result.median.conn_tcp_per_1000.is_some(),
            "{name}: no TCP events: {sample:?}"
        );
        // The LB's veth received packets for each connection on every path through
        // the LB host (the bench itself checks at least one each), and the program's
        // work per connection follows from them; the direct path's go around it.
        let packets = sample.conn_lb_packets.unwrap_or(0);
        let per_conn = result.median.conn_xdp_per_conn;
        ensure!(
            if has_program {
                packets >= sample.conn.requests
                    && per_conn.is_some_and(|[p, us, share]| p >= 1.0 && us > 0.0 && share > 0.0)
            } else {
                sample.conn_lb_packets.is_some() && per_conn.is_none()
            },
            "{name}: LB packets {:?} for {} requests, per connection {per_conn:?}",
            sample.conn_lb_packets,
            sample.conn.requests
        );
        ensure!(
            result.median.conn_vs_null_fwd.is_some() && result.median.bulk_vs_direct.is_some(),
            "{name}: ratios missing: {:?}",
            result.median
        );
    }

    let dir = std::env::temp_dir().join(format!("lb-lab-bench-{}", std::process::id()));
    let written = comparative::write_files(&report, &dir);
    let json = std::fs::read_to_string(dir.join("lab.json"));
    let md = std::fs::read_to_string(dir.join("lab.md"));
    std::fs::remove_dir_all(&dir).ok();
    let written = written?;
    ensure!(written.len() == 4, "files written: {written:?}");
    let back = LabReport::from_json(&json.context("lab.json")?)?;
    assert_eq!(back, report);
    assert_eq!(md.context("lab.md")?, report.markdown());
    Ok(())
}
