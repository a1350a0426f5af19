//! The metrics endpoint end to end: an agent with `[agent] metrics_listen` in the LB
//! namespace, scraped from inside that namespace (never from the root one), counts the
//! connections a client made exactly, and `promtool` accepts what it serves. Also
//! checks the alert rules shipped in `config/`. Needs root and promtool (Debian
//! `prometheus`, installed by `cargo xtask setup`); see `lb_tests::lab`.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::lab::{Lab, Node, SERVICE_PORT, Service, VIP4, run_bounded, try_in_ns};
use lb_userspace::metrics::parse;

/// The endpoint, on the LB namespace's own loopback.
const METRICS: &str = "127.0.0.1:9721";
const CONNECTIONS: usize = 60;
/// Connections to a port of the VIP no service has: each one SYN, dropped.
const UNSERVED: usize = 3;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `promtool`, or why not: under `CI=true` its absence fails the test.
fn promtool(test: &str) -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("promtool");
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: promtool not found (Debian prometheus; cargo xtask setup installs it)");
    }
    eprintln!("\n*** {test}: NOT RUN: promtool not found; run cargo xtask setup ***\n");
    None
}

/// One HTTP/1.1 request from inside `node`'s namespace; the status line and the body.
fn http_get(lab: &Lab, node: Node, addr: SocketAddr, path: &str) -> Result<(String, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let raw = try_in_ns(&lab.ns(node), || {
        let mut s = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)?;
        s.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
        s.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
        s.write_all(request.as_bytes())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    })
    .with_context(|| format!("GET http://{addr}{path} in {node:?}"))?;
    let text = String::from_utf8(raw).context("the answer is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// `GET /metrics` from the LB namespace, checked by `promtool check metrics`, parsed.
fn scrape(lab: &Lab, promtool: &str) -> Result<(BTreeMap<String, f64>, Duration)> {
    let started = Instant::now();
    let (status, body) = http_get(lab, Node::Lb, METRICS.parse()?, "/metrics")?;
    let took = started.elapsed();
    ensure!(status == "HTTP/1.1 200 OK", "{status}\n{body}");
    let file = lab.dir().join("scrape.prom");
    std::fs::write(&file, &body)?;
    let mut check = Command::new("sh");
    check
        .arg("-c")
        .arg(format!("{promtool} check metrics < \"$1\""))
        .arg("sh")
        .arg(&file);
    let out = run_bounded(check, Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "promtool check metrics refused the exposition: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((parse(&body), took))
}

fn value(m: &BTreeMap<String, f64>, series: &str) -> Result<f64> {
    match m.get(series) {
        Some(v) => Ok(*v),
        None => bail!(
            "no {series} in the scrape; it has:\n{}",
            m.keys().cloned().collect::<Vec<_>>().join("\n")
        ),
    }
}

fn backend(i: usize) -> String {
    format!(r#"{{service="web",backend="b{i}",address="10.77.0.1{i}"}}"#)
}

/// After a known number of connections the counters say so exactly, for the service
/// and for each backend; the gauges follow an admin change; promtool accepts it all.
#[test]
fn metrics_count_the_connections_exactly() -> Result<()> {
    let test = "metrics_count_the_connections_exactly";
    if !lb_tests::require_root(test) {
        return Ok(());
    }
    let Some(promtool) = promtool(test) else {
        return Ok(());
    };
    let lab = Lab::builder().backends(2).build()?;
    lab.start_servers(SERVICE_PORT)?;
    let mut file = lab.config_file(
        Node::Lb,
        "native",
        &[Service::new("web", VIP4, SERVICE_PORT).backends(1..=2)],
    );
    file.agent.metrics_listen = Some(METRICS.parse()?);
    let agent = lab.spawn_agent(&file.to_toml())?;
    lab.wait_backends_up("web", &["b1", "b2"], Duration::from_secs(10))?;

    let (before, took) = scrape(&lab, promtool)?;
    println!("first scrape took {took:?}");
    ensure!(
        value(
            &before,
            r#"lb_agent_info{version="0.1.0",xdp_mode="native",interface="eth0"}"#
        )? == 1.0
    );
    ensure!(value(&before, "lb_serving")? == 1.0);
    for i in 1..=2 {
        let b = backend(i);
        ensure!(value(&before, &format!("lb_backend_up{b}"))? == 1.0);
        ensure!(value(&before, &format!("lb_backend_weight{b}"))? == 100.0);
        ensure!(value(&before, &format!("lb_backend_admin_disabled{b}"))? == 0.0);
    }

    let spread = lab.spread(
        (VIP4, SERVICE_PORT).into(),
        CONNECTIONS,
        Duration::from_secs(60),
    );
    println!("{}", spread.table());
    ensure!(
        spread.succeeded() == CONNECTIONS,
        "{} of {CONNECTIONS} connections: {:?}",
        spread.succeeded(),
        spread.failures
    );
    let unserved: SocketAddr = (VIP4, SERVICE_PORT + 1).into();
    for _ in 0..UNSERVED {
        // One SYN each: the first retransmission would come after 1 s.
        ensure!(
            lab.connect(unserved, Duration::from_millis(300)).is_err(),
            "{unserved} answered"
        );
    }
    // A connection held open shows as an active flow once the scanner (every 1 s) saw it.
    let held = lab.converse((VIP4, SERVICE_PORT).into())?;
    let held_on: usize = held
        .greeting
        .trim_start_matches('b')
        .parse()
        .with_context(|| format!("greeting {:?}", held.greeting))?;

    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let (m, _) = scrape(&lab, promtool)?;
        if value(&m, &format!("lb_backend_active_flows{}", backend(held_on)))? >= 1.0
            || Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let delta =
        |series: &str| -> Result<f64> { Ok(value(&after, series)? - value(&before, series)?) };

    // The held connection's SYN is a new flow too.
    let new_flows = CONNECTIONS as f64 + 1.0;
    let service_new = delta(r#"lb_service_new_flows_total{service="web"}"#)?;
    println!("service new flows: {service_new} (expected {new_flows})");
    ensure!(
        service_new == new_flows,
        "service new flows {service_new}, expected {new_flows}"
    );
    for i in 1..=2 {
        let b = backend(i);
        let expected = spread.count(&format!("b{i}")) as f64 + f64::from(u8::from(i == held_on));
        let got = delta(&format!("lb_backend_new_flows_total{b}"))?;
        println!("b{i}: new flows {got} (expected {expected})");
        ensure!(
            got == expected,
            "b{i}: {got} new flows, expected {expected}"
        );
        // SYN, ACK of the greeting and FIN at least, from the client of each connection.
        let packets = delta(&format!("lb_backend_packets_total{b}"))?;
        ensure!(
            packets >= 3.0 * expected,
            "b{i}: {packets} packets for {expected} flows"
        );
        ensure!(delta(&format!("lb_backend_bytes_total{b}"))? >= 40.0 * packets);
    }
    let service_packets = delta(r#"lb_service_packets_total{service="web"}"#)?;
    let backend_packets: f64 = (1..=2)
        .map(|i| delta(&format!("lb_backend_packets_total{}", backend(i))))
        .sum::<Result<f64>>()?;
    ensure!(
        service_packets == backend_packets,
        "service {service_packets} packets, backends {backend_packets}"
    );
    let dropped = delta(r#"lb_packets_total{reason="drop_vip_unserved"}"#)?;
    ensure!(
        dropped == UNSERVED as f64,
        "drop_vip_unserved moved by {dropped}, expected {UNSERVED}"
    );
    for reason in ["drop_no_backend", "drop_not_master", "abort_internal"] {
        ensure!(
            delta(&format!(r#"lb_packets_total{{reason="{reason}"}}"#))? == 0.0,
            "{reason} moved"
        );
    }
    ensure!(
        value(
            &after,
            r#"lb_datapath_events_total{event="flow_not_recorded"}"#
        )? == 0.0
    );
    let active = value(
        &after,
        &format!("lb_backend_active_flows{}", backend(held_on)),
    )?;
    ensure!(
        active >= 1.0,
        "the held connection on b{held_on} is not counted as active"
    );
    ensure!(value(&after, r#"lb_flow_table_entries{table="connections"}"#)? >= new_flows);

    // An admin change shows at the next scrape.
    lab.lbctl_ok(&["backend", "disable", "web", "b1"])?;
    let (m, _) = scrape(&lab, promtool)?;
    ensure!(value(&m, &format!("lb_backend_admin_disabled{}", backend(1)))? == 1.0);
    ensure!(value(&m, &format!("lb_backend_admin_disabled{}", backend(2)))? == 0.0);

    // Only GET /metrics.
    let (status, _) = http_get(&lab, Node::Lb, METRICS.parse()?, "/")?;
    ensure!(status == "HTTP/1.1 404 Not Found", "GET /: {status}");
    drop(held);
    drop(agent);
    Ok(())
}

/// The alert rules in `config/` load, and their unit tests (`lb-alerts.test.yml`) pass.
#[test]
fn alert_rules_pass_promtool() -> Result<()> {
    let Some(promtool) = promtool("alert_rules_pass_promtool") else {
        return Ok(());
    };
    let config = repo_root().join("config");
    for args in [
        &["check", "rules", "lb-alerts.yml"][..],
        &["test", "rules", "lb-alerts.test.yml"],
    ] {
        let mut cmd = Command::new(promtool);
        cmd.args(args).current_dir(&config);
        let out = run_bounded(cmd, Duration::from_secs(30))?;
        ensure!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
