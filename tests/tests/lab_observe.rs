//! What an operator watches, in a network-namespace lab: `lbctl top` under a
//! pseudo-terminal (tmux, 80 columns) while traffic flows, `lbctl top --once --json`,
//! and `lbctl trace` showing a dropped IP fragment sent to the VIP with its reason.
//! lbctl and tmux talk to the agent over its control socket (a file, not lab traffic);
//! the traffic comes from the client namespace. Needs root; see `lb_tests::lab`.
//!
//! Every loop is bounded in count and time.

use std::{
    net::SocketAddr,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::lab::{Lab, Node, SERVICE_PORT, Service, Streaming, VIP4, bin_path, run_bounded};

const SERVICE: &str = "web";
const UP_TIMEOUT: Duration = Duration::from_secs(10);
/// The client's load: a short connection every 5 ms, bounded.
const LOAD_PAUSE: Duration = Duration::from_millis(5);
const LOAD_MAX_CONNECTIONS: usize = 20_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(60);
const TMUX_TIMEOUT: Duration = Duration::from_secs(10);

fn vip() -> SocketAddr {
    (VIP4, SERVICE_PORT).into()
}

/// Two backends serving the greeting/echo server.
fn lab() -> Result<Lab> {
    let lab = Lab::builder().backends(2).ipv6(false).build()?;
    lab.start_servers(SERVICE_PORT)?;
    Ok(lab)
}

fn config(lab: &Lab) -> String {
    lab.config(
        "native",
        &[Service::new(SERVICE, VIP4, SERVICE_PORT).backends(1..=2)],
    )
}

/// A tmux server of its own (`-L`), killed on drop with everything it runs.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn command(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.args(["-L", &self.socket]);
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.command();
        cmd.args(args);
        let out = run_bounded(cmd, TMUX_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn has_session(&self, name: &str) -> Result<bool> {
        let mut cmd = self.command();
        cmd.args(["has-session", "-t", name]);
        Ok(run_bounded(cmd, TMUX_TIMEOUT)?.status.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let mut cmd = self.command();
        cmd.arg("kill-server");
        let _ = run_bounded(cmd, TMUX_TIMEOUT);
    }
}

/// The numbers of a `lbctl top` screen: every cell of the table that is a rate.
fn table_lines(screen: &str) -> Vec<String> {
    screen
        .lines()
        .filter(|l| l.starts_with(SERVICE) || l.starts_with("  b"))
        .map(|l| l.trim_end().to_string())
        .collect()
}

#[test]
fn lbctl_top_shows_services_and_backends_and_moves_while_traffic_flows() -> Result<()> {
    const TEST: &str = "lbctl_top_shows_services_and_backends_and_moves_while_traffic_flows";
    if !lb_tests::require_root(TEST) {
        return Ok(());
    }
    let lab = lab()?;
    let _agent = lab.spawn_agent(&config(&lab))?;
    lab.wait_backends_up(SERVICE, &["b1", "b2"], UP_TIMEOUT)?;
    let load = lab.start_load(vip(), LOAD_MAX_CONNECTIONS, LOAD_MAX_TIME, LOAD_PAUSE)?;
    let tmux = Tmux {
        socket: format!("{}-top", lab.prefix()),
    };
    let lbctl = bin_path("lbctl")?;
    let socket = lab.control_socket();
    let command = format!("{} --socket {} top", lbctl.display(), socket.display());
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "80",
        "-y",
        "24",
        &command,
    ])?;
    // Readings every second: wait for two with rates, then compare a few screens.
    let mut screens: Vec<String> = Vec::new();
    let start = Instant::now();
    while screens.len() < 5 && start.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(1100));
        ensure!(
            tmux.has_session("top")?,
            "lbctl top ended by itself; screens so far: {screens:#?}"
        );
        let screen = tmux.run(&["capture-pane", "-p", "-t", "top"])?;
        screens.push(screen);
    }
    let last = screens.last().cloned().unwrap_or_default();
    println!("lbctl top at 80 columns, last screen:\n{last}");
    ensure!(
        last.lines().all(|l| l.chars().count() <= 80),
        "a line wider than 80 columns:\n{last}"
    );
    ensure!(
        last.contains("vrrp standalone"),
        "no VRRP state on the screen:\n{last}"
    );
    ensure!(
        last.contains("pkt/s") && last.contains("bit/s") && last.contains("new/s"),
        "no rate columns:\n{last}"
    );
    let rows = table_lines(&last);
    ensure!(
        rows.iter().any(|l| l.starts_with(SERVICE))
            && rows.iter().any(|l| l.starts_with("  b1"))
            && rows.iter().any(|l| l.starts_with("  b2")),
        "the service and both backends should have a row:\n{last}"
    );
    // The service's row has rates (not "-") while traffic flows.
    let service_row = rows
        .iter()
        .find(|l| l.starts_with(SERVICE))
        .cloned()
        .unwrap_or_default();
    ensure!(
        service_row.split_whitespace().any(|c| c
            .chars()
            .next()
            .is_some_and(|d| d.is_ascii_digit())
            && c != "0"),
        "the service row shows no traffic: {service_row:?}"
    );
    let distinct: std::collections::BTreeSet<Vec<String>> =
        screens.iter().skip(1).map(|s| table_lines(s)).collect();
    ensure!(
        distinct.len() >= 2,
        "the numbers did not change between {} captures:\n{}",
        screens.len(),
        screens.join("\n----\n")
    );
    // `q` ends it.
    tmux.run(&["send-keys", "-t", "top", "q"])?;
    let quit = Instant::now();
    while tmux.has_session("top")? {
        ensure!(
            quit.elapsed() < Duration::from_secs(5),
            "lbctl top did not quit on q"
        );
        thread::sleep(Duration::from_millis(50));
    }
    println!("lbctl top quit {:?} after q", quit.elapsed());
    let attempts = load.stop();
    let ok = attempts.iter().filter(|a| a.outcome.is_ok()).count();
    println!("load: {ok} of {} connections succeeded", attempts.len());
    ensure!(ok > 0, "no connection succeeded during the test");
    Ok(())
}

#[test]
fn lbctl_top_once_json_gives_one_sample_of_the_rates() -> Result<()> {
    const TEST: &str = "lbctl_top_once_json_gives_one_sample_of_the_rates";
    if !lb_tests::require_root(TEST) {
        return Ok(());
    }
    let lab = lab()?;
    let _agent = lab.spawn_agent(&config(&lab))?;
    lab.wait_backends_up(SERVICE, &["b1", "b2"], UP_TIMEOUT)?;
    let load = lab.start_load(vip(), LOAD_MAX_CONNECTIONS, LOAD_MAX_TIME, LOAD_PAUSE)?;
    // Let connections flow before the first reading.
    thread::sleep(Duration::from_millis(500));
    let text = lab.lbctl_ok(&["--json", "top", "--once"])?;
    let attempts = load.stop();
    println!("lbctl --json top --once:\n{text}");
    let sample: serde_json::Value = serde_json::from_str(&text).context("top --once --json")?;
    let interval = sample["interval_s"].as_f64().context("interval_s")?;
    ensure!(
        (0.9..5.0).contains(&interval),
        "interval {interval} s, asked for 1 s"
    );
    ensure!(
        sample["vrrp_state"] == "standalone",
        "vrrp_state: {}",
        sample["vrrp_state"]
    );
    let service = &sample["services"][0];
    ensure!(service["name"] == SERVICE, "{service}");
    let pps = service["packets_per_s"].as_f64().context("packets_per_s")?;
    let bps = service["bits_per_s"].as_f64().context("bits_per_s")?;
    ensure!(
        pps > 0.0 && bps >= pps * 8.0 * 40.0,
        "rates {pps} pkt/s, {bps} bit/s under load"
    );
    let backends = service["backends"].as_array().context("backends")?;
    ensure!(backends.len() == 2, "{service}");
    let sum: f64 = backends
        .iter()
        .filter_map(|b| b["packets_per_s"].as_f64())
        .sum();
    // The same packets, counted per service and per backend: equal up to the instant
    // each counter was read.
    ensure!(
        (sum - pps).abs() <= pps * 0.2 + 5.0,
        "backends {sum} pkt/s, service {pps} pkt/s"
    );
    let ok = attempts.iter().filter(|a| a.outcome.is_ok()).count();
    println!(
        "{pps:.0} pkt/s, {bps:.0} bit/s over {interval:.2} s; load: {ok} of {} connections",
        attempts.len()
    );
    Ok(())
}

#[test]
fn lbctl_trace_shows_a_dropped_fragment_with_its_reason() -> Result<()> {
    const TEST: &str = "lbctl_trace_shows_a_dropped_fragment_with_its_reason";
    if !lb_tests::require_root(TEST) {
        return Ok(());
    }
    let lab = lab()?;
    let _agent = lab.spawn_agent(&config(&lab))?;
    lab.wait_backends_up(SERVICE, &["b1", "b2"], UP_TIMEOUT)?;
    let vip = VIP4.to_string();
    let mut trace =
        Streaming::spawn(lab.lbctl_command(&["trace", "--vip", &vip, "--count", "100"])?)?;
    let client = lb_tests::lab::addr4(Node::Client).to_string();
    // The trace starts asynchronously: send one fragment at a time until one shows.
    // A TCP SYN with the more-fragments flag set: the first fragment of a packet.
    let port = SERVICE_PORT.to_string();
    let start = Instant::now();
    let mut sent = 0;
    let line = loop {
        if let Some(line) = trace.stdout().lines().find(|l| l.contains("drop_fragment")) {
            break line.to_string();
        }
        if sent >= 30 || start.elapsed() > Duration::from_secs(30) {
            bail!(
                "no drop_fragment line after {sent} fragments in {:?}; lbctl trace printed:\n{}",
                start.elapsed(),
                trace.stdout()
            );
        }
        // hping3 exits non-zero when nothing answers, as here: the fragment is dropped.
        lab.exec(
            Node::Client,
            &["hping3", "-q", "-c", "1", "-S", "-x", "-p", &port, &vip],
        )?;
        sent += 1;
        thread::sleep(Duration::from_millis(300));
    };
    println!("after {sent} fragment(s): {line}");
    ensure!(
        line.contains(&format!("{client} > {vip} drop drop_fragment")),
        "the line should name the client, the VIP, the verdict and the reason: {line}"
    );
    ensure!(line.contains(" tcp "), "a fragment of a TCP packet: {line}");
    let status = lab.lbctl_status()?;
    ensure!(
        status.counters.get("drop_fragment").copied().unwrap_or(0) >= 1,
        "the fragment should be counted too: {:?}",
        status.counters
    );
    // `--json`: the same decision as a record; `--count` ends it.
    let mut json =
        Streaming::spawn(lab.lbctl_command(&["--json", "trace", "--vip", &vip, "--count", "1"])?)?;
    let start = Instant::now();
    let mut sent = 0;
    let ended = loop {
        if let Some(ended) = json.poll()? {
            break ended;
        }
        ensure!(
            sent < 30 && start.elapsed() < Duration::from_secs(30),
            "lbctl --json trace --count 1 did not end"
        );
        lab.exec(
            Node::Client,
            &["hping3", "-q", "-c", "1", "-S", "-x", "-p", &port, &vip],
        )?;
        sent += 1;
        thread::sleep(Duration::from_millis(300));
    };
    ensure!(
        ended.0.success(),
        "lbctl --json trace failed: {}",
        json.stderr()
    );
    let out = json.stdout();
    let record: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or_default())
        .context("a JSON trace record")?;
    println!("json: {record}");
    ensure!(
        record["reason"] == "drop_fragment"
            && record["verdict"] == "drop"
            && record["dport"].is_null(),
        "{record}"
    );
    drop(trace);
    Ok(())
}
