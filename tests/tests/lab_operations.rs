//! Operating the load balancer under traffic, in a network-namespace lab: health checks,
//! backup backends, draining with `lbctl backend disable --wait`, reloads good and bad,
//! admin state that survives a restart, and a control socket that shrugs off bad input.
//! Needs root; see `lb_tests::lab`.
//!
//! Every test bounds its loops in count and time and prints what it measured.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::UnixStream,
    },
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use lb_tests::lab::{
    Attempt, Lab, SERVICE_PORT, Service, Streaming, VIP4, parse_backends_json, parse_status_json,
    run_bounded,
};
use lb_userspace::protocol::{self, BackendState, BackendStatus, Response};

/// Health checks of every service here: a dead backend is seen after 3 x 200 ms.
const INTERVAL_MS: u32 = 200;
const TIMEOUT_MS: u32 = 200;
const RISE: u32 = 2;
const FALL: u32 = 3;
/// Bound of every wait for a backend to come up (first check at start, or `rise` passes).
const UP_TIMEOUT: Duration = Duration::from_secs(10);
/// What the brief allows for detecting a dead backend (interval x fall = 600 ms, plus margin).
const DETECT_LIMIT: Duration = Duration::from_secs(3);
/// After detection, connections started this much later must all succeed.
const SETTLE: Duration = Duration::from_millis(500);
/// Pause between two short connections of a load.
const LOAD_PAUSE: Duration = Duration::from_millis(5);
/// Bounds of every load.
const LOAD_MAX_CONNECTIONS: usize = 3000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(60);
/// Budget of a `spread` run.
const SPREAD_BUDGET: Duration = Duration::from_secs(30);
const SERVICE: &str = "web";

fn vip() -> SocketAddr {
    (VIP4, SERVICE_PORT).into()
}

/// A lab with `backends` backends (IPv4 only), each running the greeting/echo server.
fn lab_with_servers(backends: usize) -> Result<Lab> {
    let lab = Lab::builder().backends(backends).ipv6(false).build()?;
    lab.start_servers(SERVICE_PORT)?;
    Ok(lab)
}

/// Service `web` on the IPv4 VIP with this file's health checks.
fn web() -> Service {
    Service::new(SERVICE, VIP4, SERVICE_PORT).health_check(INTERVAL_MS, TIMEOUT_MS, RISE, FALL)
}

/// Adds the lab's diagnostics to an error, for a failure caused by the data path.
fn with_diagnostics<T>(lab: &Lab, result: Result<T>) -> Result<T> {
    result.map_err(|e| e.context(format!("lab diagnostics:\n{}", lab.diagnostics())))
}

/// Whether lbctl's `health` says the checks pass (`up`; a failing one reads `down (refused)`).
fn health_passing(b: &BackendStatus) -> bool {
    let h = b.health.trim().to_ascii_lowercase();
    h == "up"
}

fn started_in(a: &Attempt, from: Instant, to: Option<Instant>) -> bool {
    a.started >= from && to.is_none_or(|to| a.started < to)
}

/// Connections per backend, and failures, for each phase: a phase runs from its
/// instant to the next one's (the last to the end).
fn phase_table(attempts: &[Attempt], phases: &[(&str, Instant)]) -> String {
    let mut backends: Vec<String> = attempts
        .iter()
        .filter_map(|a| a.backend().map(str::to_string))
        .collect();
    backends.sort();
    backends.dedup();
    let mut out = format!("  {:<24}", "phase");
    for b in &backends {
        out += &format!(" {b:>6}");
    }
    out += &format!(" {:>6} {:>6} {:>9}\n", "errors", "total", "slowest");
    for (k, &(name, from)) in phases.iter().enumerate() {
        let to = phases.get(k + 1).map(|&(_, t)| t);
        let these: Vec<&Attempt> = attempts
            .iter()
            .filter(|a| started_in(a, from, to))
            .collect();
        out += &format!("  {name:<24}");
        for b in &backends {
            let n = these.iter().filter(|a| a.backend() == Some(b)).count();
            out += &format!(" {n:>6}");
        }
        let errors = these.iter().filter(|a| a.outcome.is_err()).count();
        let slowest = these.iter().map(|a| a.elapsed).max().unwrap_or_default();
        out += &format!(
            " {errors:>6} {:>6} {:>7}ms\n",
            these.len(),
            slowest.as_millis()
        );
    }
    let errors: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome.is_err()).collect();
    out += &format!("  {} connections, {} failed", attempts.len(), errors.len());
    if let Some(first) = errors.first() {
        out += &format!(", first: {:?} (after {:?})", first.outcome, first.elapsed);
    }
    out
}

/// The failures among `attempts` started in [from, to).
fn failures(attempts: &[Attempt], from: Instant, to: Option<Instant>) -> Vec<&Attempt> {
    attempts
        .iter()
        .filter(|a| started_in(a, from, to) && a.outcome.is_err())
        .collect()
}

/// Waits until the load has `n` connections that started at or after `from`.
fn wait_for_connections_since(
    load: &lb_tests::lab::Load<'_>,
    from: Instant,
    n: usize,
) -> Result<()> {
    let ok = load.wait_for(Duration::from_secs(20), |a| {
        a.iter().filter(|a| a.started >= from).count() >= n
    });
    ensure!(
        ok,
        "the load did not make {n} connections in time (running: {})",
        load.is_running()
    );
    Ok(())
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs lbctl, which must fail with a message on stderr that contains each of
/// `mentions`; returns stderr.
fn lbctl_fails(lab: &Lab, args: &[&str], mentions: &[&str]) -> Result<String> {
    let out = lab.lbctl(args)?;
    let stderr = stderr_of(&out);
    ensure!(
        !out.status.success(),
        "lbctl {} succeeded; stdout: {}",
        args.join(" "),
        stdout_of(&out)
    );
    ensure!(
        !stderr.trim().is_empty(),
        "lbctl {} failed ({}) without a word on stderr",
        args.join(" "),
        out.status
    );
    for m in mentions {
        ensure!(
            stderr.to_lowercase().contains(&m.to_lowercase()),
            "lbctl {}: stderr does not mention {m:?}: {stderr}",
            args.join(" ")
        );
    }
    println!(
        "lbctl {} -> {}: {}",
        args.join(" "),
        out.status,
        stderr.trim()
    );
    Ok(stderr)
}

/// The agent log lines that contain `marker`.
fn log_lines(log: &str, marker: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(marker))
        .map(str::to_string)
        .collect()
}

// ---- 1 ----------------------------------------------------------------------------------

/// The upgrade of one backend while clients keep connecting: drain it with
/// `disable --wait` (which waits for its last connection), restart its server, enable
/// it again. No client sees an error, and no new connection reaches it while disabled.
#[test]
fn rolling_upgrade_under_load() -> Result<()> {
    if !lb_tests::require_root("rolling_upgrade_under_load") {
        return Ok(());
    }
    let lab = lab_with_servers(3)?;
    let agent = lab.spawn_agent(&lab.config("native", &[web().backends(1..=3)]))?;
    lab.wait_backends_up(SERVICE, &["b1", "b2", "b3"], UP_TIMEOUT)?;
    let mut long = with_diagnostics(&lab, lab.one_per_backend(vip(), &["b1", "b2", "b3"], 200))?;

    let load = lab.start_load(vip(), LOAD_MAX_CONNECTIONS, LOAD_MAX_TIME, LOAD_PAUSE)?;
    let t_start = Instant::now();
    wait_for_connections_since(&load, t_start, 100)?;

    // Drain b1.
    let cmd = lab.lbctl_command(&[
        "backend",
        "disable",
        SERVICE,
        "b1",
        "--wait",
        "--timeout",
        "60",
    ])?;
    let t_disable = Instant::now();
    let mut disable = Streaming::spawn(cmd)?;
    // lbctl prints its first line when the agent has answered, after the maps changed:
    // from then on no new connection may reach b1.
    let (t_effective, first) = disable.first_line(Duration::from_secs(10))?;
    println!(
        "disable in effect {:.2?} after lbctl started: {first}",
        t_effective - t_disable
    );
    thread::sleep(
        (t_disable + Duration::from_millis(1200)).saturating_duration_since(Instant::now()),
    );
    if let Some((status, _)) = disable.poll()? {
        bail!(
            "lbctl backend disable --wait returned ({status}) while b1's long-lived connection is open: {}{}",
            disable.stdout(),
            disable.stderr()
        );
    }
    let b1 = lab.lbctl_backend(SERVICE, "b1")?;
    println!(
        "1.2 s after disable: b1 state {}, enabled {}, in_ring {}, active_flows {}",
        b1.state, b1.enabled, b1.in_ring, b1.active_flows
    );
    ensure!(
        b1.state == BackendState::Draining && !b1.enabled && !b1.in_ring && b1.active_flows >= 1,
        "b1 while its long-lived connection is open: {b1:?}"
    );
    let long_b1 = long.get_mut("b1").context("no b1 connection")?;
    for k in 0..3 {
        with_diagnostics(&lab, long_b1.check_echo(&format!("draining {k}")))?;
    }
    let early: Vec<Attempt> = load
        .attempts()
        .into_iter()
        .filter(|a| a.started >= t_effective && a.backend() == Some("b1"))
        .collect();
    ensure!(
        early.is_empty(),
        "{} new connections reached b1 after its disable took effect (the first started {:?} after)",
        early.len(),
        early[0].started - t_effective
    );

    // Its last connection ends: --wait returns.
    drop(long.remove("b1"));
    let t_close = Instant::now();
    let Some((status, t_drained)) = disable.wait(Duration::from_secs(10))? else {
        bail!(
            "lbctl backend disable --wait still waits 10 s after b1's last connection closed; lbctl shows {:?}",
            lab.lbctl_backend(SERVICE, "b1")
        );
    };
    println!(
        "disable --wait returned {status} {:.2?} after b1's last connection closed ({:.2?} after the disable)\n  stdout: {}\n  stderr: {}",
        t_drained - t_close,
        t_drained - t_disable,
        disable.stdout().trim(),
        disable.stderr().trim()
    );
    ensure!(
        status.success(),
        "disable --wait failed: {}",
        disable.stderr()
    );
    ensure!(
        t_drained - t_close < Duration::from_secs(5),
        "disable --wait took {:?} after the last connection closed",
        t_drained - t_close
    );
    let b1 = lab.lbctl_backend(SERVICE, "b1")?;
    ensure!(
        b1.state == BackendState::Disabled && b1.active_flows == 0,
        "b1 after the drain: {b1:?}"
    );

    // The upgrade: b1's server goes away and comes back; b1 stays disabled throughout.
    lab.stop_server(1, SERVICE_PORT);
    let t_stopped = Instant::now();
    let (seen_down, b1) =
        lab.wait_backend(SERVICE, "b1", "failing its checks", DETECT_LIMIT, |b| {
            !health_passing(b)
        })?;
    println!(
        "b1's server stopped: health {:?} after {seen_down:.2?}, state {}",
        b1.health, b1.state
    );
    ensure!(
        b1.state != BackendState::Up,
        "b1 is up while disabled: {b1:?}"
    );
    lab.start_server(1, SERVICE_PORT)?;
    let (seen_up, b1) = lab.wait_backend(SERVICE, "b1", "healthy again", UP_TIMEOUT, |b| {
        health_passing(b)
    })?;
    println!(
        "b1's server restarted: health {:?} after {seen_up:.2?}, state {} (server down for {:.2?})",
        b1.health,
        b1.state,
        t_stopped.elapsed()
    );
    ensure!(
        b1.state == BackendState::Disabled && !b1.in_ring,
        "b1 healthy but still disabled should show state disabled: {b1:?}"
    );

    // The window in which b1 must take nothing ends when the enable is issued.
    let t_enable = Instant::now();
    lab.lbctl_ok(&["backend", "enable", SERVICE, "b1"])?;
    println!("lbctl backend enable took {:.2?}", t_enable.elapsed());
    let back = load.wait_for(Duration::from_secs(10), |a| {
        a.iter()
            .filter(|a| a.started >= t_enable && a.backend() == Some("b1"))
            .count()
            >= 20
    });
    ensure!(
        back,
        "b1 took no (or too few) new connections within 10 s of its enable; lbctl shows {:?}",
        lab.lbctl_backend(SERVICE, "b1")
    );
    let t_back = Instant::now();
    wait_for_connections_since(&load, t_back, 100)?;
    ensure!(
        load.is_running(),
        "the load ran out of its bounds before the end of the test"
    );
    let attempts = load.stop();

    for (name, c) in long.iter_mut() {
        c.check_echo(&format!("still on {name} at the end"))?;
    }
    let phases = [
        ("before", t_start),
        ("disable issued", t_disable),
        ("draining b1", t_effective),
        ("b1 disabled, upgraded", t_drained),
        ("b1 enabled again", t_enable),
    ];
    println!(
        "connections per backend per phase:\n{}",
        phase_table(&attempts, &phases)
    );
    let stray: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| started_in(a, t_effective, Some(t_enable)) && a.backend() == Some("b1"))
        .collect();
    ensure!(
        stray.is_empty(),
        "{} new connections reached b1 while it was disabled, the first {:?} after the disable \
         ({:?} before the enable was issued): {:?}",
        stray.len(),
        stray[0].started - t_disable,
        t_enable - stray[0].started,
        stray[0]
    );
    let errors = failures(&attempts, t_start, None);
    with_diagnostics(
        &lab,
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "{} of {} client connections failed during the rolling upgrade; first: {:?}",
                errors.len(),
                attempts.len(),
                errors[0]
            ))
        },
    )?;
    drop(agent);
    Ok(())
}

// ---- 2 ----------------------------------------------------------------------------------

/// A backend whose server dies (connections refused), then one whose link goes down
/// (checks time out): each is marked down within interval x fall plus a margin, and
/// after that no client connection fails.
#[test]
fn dead_backend_detected() -> Result<()> {
    if !lb_tests::require_root("dead_backend_detected") {
        return Ok(());
    }
    let lab = lab_with_servers(3)?;
    let mut agent = lab.spawn_agent(&lab.config("native", &[web().backends(1..=3)]))?;
    lab.wait_backends_up(SERVICE, &["b1", "b2", "b3"], UP_TIMEOUT)?;

    let load = lab.start_load(vip(), LOAD_MAX_CONNECTIONS, LOAD_MAX_TIME, LOAD_PAUSE)?;
    let t_start = Instant::now();
    wait_for_connections_since(&load, t_start, 100)?;

    // Refused: b2's server stops without warning.
    let t_stop = Instant::now();
    lab.stop_server(2, SERVICE_PORT);
    let (detect, b2) = lab.wait_backend(SERVICE, "b2", "down", DETECT_LIMIT, |b| {
        b.state == BackendState::Down
    })?;
    let t_down = Instant::now();
    println!(
        "b2 refused: down after {detect:.2?} (interval {INTERVAL_MS} ms x fall {FALL}); health {:?}, in_ring {}",
        b2.health, b2.in_ring
    );
    ensure!(!b2.in_ring, "b2 is down but still in the ring: {b2:?}");
    wait_for_connections_since(&load, t_down + SETTLE, 300)?;
    let log = agent.log();
    let lines = log_lines(&log, "backend b2 is down");
    println!("agent: {lines:?}");
    ensure!(
        lines.len() == 1 && lines[0].contains("refused"),
        "expected one line `backend b2 is down (refused)` in the agent log:\n{log}"
    );

    // Unreachable: b3's link goes down; checks time out.
    let t_cut = Instant::now();
    lab.run(
        lb_tests::lab::Node::Backend(3),
        &["ip", "link", "set", "eth0", "down"],
    )?;
    let (detect3, b3) = lab.wait_backend(SERVICE, "b3", "down", DETECT_LIMIT, |b| {
        b.state == BackendState::Down
    })?;
    let t_down3 = Instant::now();
    println!(
        "b3 unreachable: down after {detect3:.2?}; health {:?}",
        b3.health
    );
    wait_for_connections_since(&load, t_down3 + SETTLE, 300)?;
    ensure!(
        load.is_running(),
        "the load ran out of its bounds before the end of the test"
    );
    let attempts = load.stop();

    let phases = [
        ("all up", t_start),
        ("b2 stopped, detecting", t_stop),
        ("b2 down + settle", t_down),
        ("b2 down, settled", t_down + SETTLE),
        ("b3 cut, detecting", t_cut),
        ("b3 down + settle", t_down3),
        ("b3 down, settled", t_down3 + SETTLE),
    ];
    println!(
        "connections per phase:\n{}",
        phase_table(&attempts, &phases)
    );
    let before = failures(&attempts, t_start, Some(t_stop));
    let window2 = failures(&attempts, t_stop, Some(t_down + SETTLE));
    let after2 = failures(&attempts, t_down + SETTLE, Some(t_cut));
    let window3 = failures(&attempts, t_cut, Some(t_down3 + SETTLE));
    let after3 = failures(&attempts, t_down3 + SETTLE, None);
    println!(
        "failed connections: {} before, {} while detecting b2 ({detect:.2?}), {} after, \
         {} while detecting b3 ({detect3:.2?}), {} after",
        before.len(),
        window2.len(),
        after2.len(),
        window3.len(),
        after3.len()
    );
    ensure!(before.is_empty(), "failures while all were up: {before:?}");
    ensure!(
        after2.is_empty(),
        "failures after b2 was detected: {after2:?}"
    );
    ensure!(
        after3.is_empty(),
        "failures after b3 was detected: {after3:?}"
    );
    let late_b2 = attempts
        .iter()
        .filter(|a| a.started >= t_down + SETTLE && a.backend() == Some("b2"))
        .count();
    let late_b3 = attempts
        .iter()
        .filter(|a| a.started >= t_down3 + SETTLE && a.backend() != Some("b1"))
        .count();
    ensure!(late_b2 == 0, "{late_b2} connections reached the stopped b2");
    ensure!(
        late_b3 == 0,
        "{late_b3} connections went elsewhere than b1 after b2 and b3 were down"
    );

    let log = agent.log();
    let lines = log_lines(&log, "backend b3 is down");
    println!("agent: {lines:?}");
    ensure!(
        lines.len() == 1 && (lines[0].contains("timeout") || lines[0].contains("unreachable")),
        "expected one line `backend b3 is down (timeout|unreachable)` in the agent log:\n{log}"
    );
    ensure!(
        detect < DETECT_LIMIT && detect3 < DETECT_LIMIT,
        "detection too slow"
    );
    let status = agent.stop()?;
    ensure!(status.success(), "lb-agent exited with {status}");
    Ok(())
}

// ---- 3 ----------------------------------------------------------------------------------

/// A backup takes new connections only while no primary is up; a primary that comes
/// back takes them over, and the connections the backup holds keep going. With no
/// backend at all, packets to the VIP are dropped and counted.
#[test]
fn backups() -> Result<()> {
    if !lb_tests::require_root("backups") {
        return Ok(());
    }
    let lab = lab_with_servers(3)?;
    let service = web().backends(1..=2).backup(3, 100);
    let _agent = lab.spawn_agent(&lab.config("native", &[service]))?;
    lab.wait_backends_up(SERVICE, &["b1", "b2"], UP_TIMEOUT)?;
    let (_, b3) = lab.wait_backend(SERVICE, "b3", "healthy", UP_TIMEOUT, health_passing)?;
    println!(
        "backup b3 at start: state {}, backup {}, in_ring {}, health {:?}",
        b3.state, b3.backup, b3.in_ring, b3.health
    );
    ensure!(b3.backup && !b3.in_ring, "the backup at start: {b3:?}");

    let spread = lab.spread(vip(), 150, SPREAD_BUDGET);
    println!("primaries up:\n{}", spread.table());
    with_diagnostics(
        &lab,
        spread.check_shares(&[("b1", 1.0), ("b2", 1.0)], 0.5, 1.5),
    )?;

    let load = lab.start_load(vip(), LOAD_MAX_CONNECTIONS, LOAD_MAX_TIME, LOAD_PAUSE)?;
    let t_start = Instant::now();
    wait_for_connections_since(&load, t_start, 50)?;

    // Both primaries die.
    let t_stop = Instant::now();
    lab.stop_server(1, SERVICE_PORT);
    lab.stop_server(2, SERVICE_PORT);
    for b in ["b1", "b2"] {
        lab.wait_backend(SERVICE, b, "down", DETECT_LIMIT, |s| {
            s.state == BackendState::Down
        })?;
    }
    let t_down = Instant::now();
    println!("both primaries down after {:.2?}", t_down - t_stop);
    let b3 = lab.lbctl_backend(SERVICE, "b3")?;
    ensure!(
        b3.in_ring,
        "the backup is not in the ring with both primaries down: {b3:?}"
    );
    wait_for_connections_since(&load, t_down + SETTLE, 150)?;
    let mut on_backup = lab.converse(vip()).context("a connection to the backup")?;
    ensure!(
        on_backup.greeting == "b3",
        "with both primaries down a new connection went to {}",
        on_backup.greeting
    );
    on_backup.check_echo("on the backup")?;

    // One primary comes back.
    let t_restart = Instant::now();
    lab.start_server(1, SERVICE_PORT)?;
    let (rise, _) = lab.wait_backend(SERVICE, "b1", "up", UP_TIMEOUT, |s| {
        s.state == BackendState::Up
    })?;
    let t_up = Instant::now();
    println!("b1 up again {rise:.2?} after its server restarted");
    let b3 = lab.lbctl_backend(SERVICE, "b3")?;
    ensure!(
        !b3.in_ring,
        "the backup is still in the ring with b1 up: {b3:?}"
    );
    wait_for_connections_since(&load, t_up + SETTLE, 150)?;
    for k in 0..3 {
        on_backup.check_echo(&format!("on the backup after b1 came back {k}"))?;
    }
    ensure!(
        load.is_running(),
        "the load ran out of its bounds before the end of the test"
    );
    let attempts = load.stop();

    let phases = [
        ("primaries up", t_start),
        ("primaries stopped", t_stop),
        ("primaries down", t_down),
        ("  + settled", t_down + SETTLE),
        ("b1 restarted", t_restart),
        ("b1 up", t_up),
        ("  + settled", t_up + SETTLE),
    ];
    println!(
        "connections per phase:\n{}",
        phase_table(&attempts, &phases)
    );
    let window = failures(&attempts, t_stop, Some(t_down + SETTLE));
    println!(
        "{} connections failed while the primaries' death was detected",
        window.len()
    );
    let before = failures(&attempts, t_start, Some(t_stop));
    let after = failures(&attempts, t_down + SETTLE, None);
    ensure!(before.is_empty(), "failures with primaries up: {before:?}");
    ensure!(
        after.is_empty(),
        "failures after the primaries' death was detected: {after:?}"
    );
    let count = |from: Instant, to: Option<Instant>, name: &str| {
        attempts
            .iter()
            .filter(|a| started_in(a, from, to) && a.backend() == Some(name))
            .count()
    };
    ensure!(
        count(t_start, Some(t_stop), "b3") == 0,
        "the backup took connections while the primaries were up"
    );
    let served = attempts
        .iter()
        .filter(|a| started_in(a, t_down + SETTLE, Some(t_restart)))
        .count();
    ensure!(
        count(t_down + SETTLE, Some(t_restart), "b3") == served,
        "with both primaries down, not every connection went to the backup"
    );
    let late = attempts
        .iter()
        .filter(|a| a.started >= t_up + SETTLE)
        .count();
    ensure!(
        count(t_up + SETTLE, None, "b1") == late,
        "with b1 back, not every new connection went to b1"
    );

    // No backend at all: dropped and counted.
    drop(on_backup);
    lab.stop_server(1, SERVICE_PORT);
    lab.stop_server(3, SERVICE_PORT);
    for b in ["b1", "b3"] {
        lab.wait_backend(SERVICE, b, "down", DETECT_LIMIT, |s| {
            s.state == BackendState::Down
        })?;
    }
    let before = lab.lbctl_status()?;
    let dropped_before = before.counters.get("drop_no_backend").copied();
    let attempt = lab.connect(vip(), Duration::from_secs(1));
    let after = lab.lbctl_status()?;
    let dropped_after = after.counters.get("drop_no_backend").copied();
    println!(
        "no backend: connect -> {:?}; drop_no_backend {dropped_before:?} -> {dropped_after:?}",
        attempt.as_ref().map(|_| "connected")
    );
    ensure!(
        attempt.is_err(),
        "a connection succeeded with no backend up"
    );
    match (dropped_before, dropped_after) {
        (Some(b), Some(a)) => ensure!(a > b, "drop_no_backend did not grow: {b} -> {a}"),
        _ => bail!(
            "lbctl status has no drop_no_backend counter: {:?}",
            after.counters
        ),
    }
    Ok(())
}

// ---- 4 ----------------------------------------------------------------------------------

/// `lbctl reload` of a broken file names every error with its line and changes
/// nothing; a good file adding a backend takes effect without disturbing the
/// connections already open.
#[test]
fn reload_bad_and_good() -> Result<()> {
    if !lb_tests::require_root("reload_bad_and_good") {
        return Ok(());
    }
    let lab = lab_with_servers(4)?;
    let three = lab.config("native", &[web().backends(1..=3)]);
    let agent = lab.spawn_agent(&three)?;
    lab.wait_backends_up(SERVICE, &["b1", "b2", "b3"], UP_TIMEOUT)?;
    let mut long = with_diagnostics(&lab, lab.one_per_backend(vip(), &["b1", "b2", "b3"], 200))?;
    let shares3 = [("b1", 1.0), ("b2", 1.0), ("b3", 1.0)];

    // Three errors: a bad address, a ring size that is not a prime, an unknown key.
    let b2_address = "address = \"10.77.0.12\"";
    ensure!(three.contains(b2_address), "unexpected config:\n{three}");
    let broken = three
        .replace(b2_address, "address = \"10.77.0.999\"")
        .replace(
            &format!("port = {SERVICE_PORT}\n"),
            &format!("port = {SERVICE_PORT}\nring_size = 1000\n"),
        )
        .replace("name = \"b3\"\n", "name = \"b3\"\ncolour = \"blue\"\n");
    let line_of = |needle: &str| -> Result<usize> {
        broken
            .lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .ok_or_else(|| anyhow!("{needle:?} not in the broken config"))
    };
    let expected = [
        (line_of("10.77.0.999")?, "address"),
        (line_of("ring_size = 1000")?, "ring_size"),
        (line_of("colour")?, "colour"),
    ];
    agent.write_config(&broken)?;
    let t_reload = Instant::now();
    let out = lab.lbctl(&["reload"])?;
    let stderr = stderr_of(&out);
    println!(
        "lbctl reload of a broken file -> {} in {:.2?}; stderr:\n{}",
        out.status,
        t_reload.elapsed(),
        stderr.trim_end()
    );
    ensure!(
        !out.status.success(),
        "lbctl reload of a broken file succeeded"
    );
    for (line, key) in expected {
        let found = stderr.lines().any(|l| {
            l.contains(key)
                && l.match_indices(&format!("line {line}"))
                    .any(|(i, m)| !l[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()))
        });
        ensure!(
            found,
            "stderr names no error about {key} on line {line}:\n{stderr}"
        );
    }

    // Nothing changed.
    let status = lab.lbctl_status()?;
    let names: Vec<&str> = status.services[0]
        .backends
        .iter()
        .map(|b| b.name.as_str())
        .collect();
    ensure!(
        status.services.len() == 1 && names == ["b1", "b2", "b3"],
        "the running config changed after a failed reload: {status:?}"
    );
    let spread = lab.spread(vip(), 150, SPREAD_BUDGET);
    println!("after the failed reload:\n{}", spread.table());
    with_diagnostics(&lab, spread.check_shares(&shares3, 0.5, 1.5))?;
    for (name, c) in long.iter_mut() {
        c.check_echo(&format!("{name} after the failed reload"))?;
    }

    // A good file with a fourth backend.
    let four = lab.config("native", &[web().backends(1..=4)]);
    agent.write_config(&four)?;
    let t_reload = Instant::now();
    let out = lab.lbctl(&["reload"])?;
    println!(
        "lbctl reload of a good file -> {} in {:.2?}: {}{}",
        out.status,
        t_reload.elapsed(),
        stdout_of(&out).trim(),
        stderr_of(&out).trim()
    );
    ensure!(
        out.status.success(),
        "lbctl reload of a good file failed: {}",
        stderr_of(&out)
    );
    let (up, _) = lab.wait_backend(SERVICE, "b4", "up", UP_TIMEOUT, |b| {
        b.state == BackendState::Up
    })?;
    println!("b4 up {up:.2?} after the reload");
    let spread = lab.spread(vip(), 300, SPREAD_BUDGET);
    println!("after adding b4:\n{}", spread.table());
    with_diagnostics(
        &lab,
        spread.check_shares(
            &[("b1", 1.0), ("b2", 1.0), ("b3", 1.0), ("b4", 1.0)],
            0.5,
            1.5,
        ),
    )?;
    // An echo can only come back from the backend that holds the connection: the
    // others have no socket for it and would reset it.
    for (name, c) in long.iter_mut() {
        for k in 0..3 {
            with_diagnostics(&lab, c.check_echo(&format!("{name} after adding b4 {k}")))?;
        }
    }
    println!("the long-lived connections to b1, b2 and b3 still echo after both reloads");
    Ok(())
}

// ---- 5 ----------------------------------------------------------------------------------

/// Checks the admin state lbctl shows and that new connections follow it: b1
/// disabled, b2 at weight 300, b3 at 100.
fn check_admin_state(lab: &Lab, when: &str) -> Result<()> {
    let list = lab.lbctl_backends(Some(SERVICE))?;
    let get = |name: &str| {
        list.iter()
            .find(|b| b.name == name)
            .ok_or_else(|| anyhow!("no {name} in {list:?}"))
    };
    let (b1, b2) = (get("b1")?, get("b2")?);
    println!(
        "{when}: b1 state {} enabled {}; b2 weight {} (config {})",
        b1.state, b1.enabled, b2.weight, b2.config_weight
    );
    ensure!(
        !b1.enabled && b1.state == BackendState::Disabled && !b1.in_ring,
        "{when}: b1 is not disabled: {b1:?}"
    );
    ensure!(
        b2.weight == 300 && b2.config_weight == 100,
        "{when}: b2's weight is not 300: {b2:?}"
    );
    let spread = lab.spread(vip(), 200, SPREAD_BUDGET);
    println!("{when}:\n{}", spread.table());
    // check_shares also fails if b1 got any connection.
    with_diagnostics(
        lab,
        spread.check_shares(&[("b2", 3.0), ("b3", 1.0)], 0.6, 1.4),
    )
}

/// What an operator set with lbctl (a disabled backend, a weight) outlives the agent
/// process and reloads.
#[test]
fn admin_state_survives_restart() -> Result<()> {
    if !lb_tests::require_root("admin_state_survives_restart") {
        return Ok(());
    }
    let lab = lab_with_servers(3)?;
    let config = lab.config("native", &[web().backends(1..=3)]);
    let mut agent = lab.spawn_agent(&config)?;
    lab.wait_backends_up(SERVICE, &["b1", "b2", "b3"], UP_TIMEOUT)?;
    let out = lab.lbctl_ok(&["backend", "disable", SERVICE, "b1"])?;
    println!("lbctl backend disable {SERVICE} b1: {}", out.trim());
    let out = lab.lbctl_ok(&["backend", "weight", SERVICE, "b2", "300"])?;
    println!("lbctl backend weight {SERVICE} b2 300: {}", out.trim());
    check_admin_state(&lab, "set by lbctl")?;

    let state_dir = lab.state_dir();
    let files: Vec<String> = fs::read_dir(&state_dir)
        .with_context(|| format!("reading {}", state_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    println!("{}: {files:?}", state_dir.display());
    ensure!(!files.is_empty(), "nothing in the state directory");

    let status = agent.stop()?;
    ensure!(
        status.success(),
        "lb-agent did not exit cleanly on SIGTERM: {status}\n{}",
        agent.log()
    );
    drop(agent);
    let t_restart = Instant::now();
    let mut agent = lab.spawn_agent(&config)?;
    lab.wait_backends_up(SERVICE, &["b2", "b3"], UP_TIMEOUT)?;
    println!(
        "new agent serving {:.2?} after the start",
        t_restart.elapsed()
    );
    check_admin_state(&lab, "after an agent restart")?;

    lab.lbctl_ok(&["reload"])?;
    check_admin_state(&lab, "after lbctl reload")?;

    agent.reload_by_sighup(&config)?;
    check_admin_state(&lab, "after SIGHUP")?;
    Ok(())
}

// ---- 6 ----------------------------------------------------------------------------------

/// Sends `request` on `stream` (write errors ignored: the agent may hang up first) and
/// reads one reply line.
fn exchange(stream: &UnixStream, request: &[u8]) -> Result<Response> {
    let mut writer = stream.try_clone()?;
    if let Err(e) = writer.write_all(request) {
        println!("  (writing {} bytes: {e})", request.len());
    }
    let mut line = Vec::new();
    BufReader::new(stream)
        .read_until(b'\n', &mut line)
        .context("reading the reply")?;
    ensure!(
        !line.is_empty(),
        "the agent closed the connection without a reply"
    );
    protocol::decode_response(&line).map_err(|e| {
        anyhow!(
            "the reply is not a protocol response ({e}): {:?}",
            String::from_utf8_lossy(&line)
        )
    })
}

fn connect_control(lab: &Lab) -> Result<UnixStream> {
    let s =
        UnixStream::connect(lab.control_socket()).context("connecting to the control socket")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

fn expect_error(reply: &Response, what: &str) -> Result<()> {
    match reply {
        Response::Error { message, details } => {
            println!("{what}: error reply {message:?} {details:?}");
            ensure!(!message.trim().is_empty(), "{what}: an empty error message");
            Ok(())
        }
        other => bail!("{what}: not an error reply: {other:?}"),
    }
}

/// Bad input on the control socket gets error replies and breaks nothing; the socket
/// is root's only; lbctl's own errors are clear and non-zero.
#[test]
fn control_socket_robustness() -> Result<()> {
    if !lb_tests::require_root("control_socket_robustness") {
        return Ok(());
    }
    let lab = lab_with_servers(2)?;
    let _agent = lab.spawn_agent(&lab.config("native", &[web().backends(1..=2)]))?;
    lab.wait_backends_up(SERVICE, &["b1", "b2"], UP_TIMEOUT)?;
    let socket = lab.control_socket();

    // The socket file: root's, mode 0600.
    let meta = fs::symlink_metadata(&socket)?;
    println!(
        "{}: mode {:o}, uid {}",
        socket.display(),
        meta.permissions().mode() & 0o7777,
        meta.uid()
    );
    ensure!(
        meta.permissions().mode() & 0o777 == 0o600 && meta.uid() == 0,
        "the control socket is not root's with mode 0600"
    );

    // Idle and half-written connections do not block anybody.
    let _idle = connect_control(&lab)?;
    let mut half = connect_control(&lab)?;
    half.write_all(b"{\"version\":1,")?;

    let status = protocol::encode(&protocol::Envelope {
        version: protocol::PROTOCOL_VERSION,
        request: protocol::Request::Status,
    });
    let s = connect_control(&lab)?;
    expect_error(&exchange(&s, b"not json\n")?, "not json")?;
    // A line protocol: the same connection serves the next request.
    match exchange(&s, &status)? {
        Response::Status(st) => println!(
            "same connection, then status: {} services",
            st.services.len()
        ),
        other => bail!("a status request after a bad one got {other:?}"),
    }
    let s = connect_control(&lab)?;
    expect_error(
        &exchange(&s, b"{\"version\":1,\"command\":\"explode\"}\n")?,
        "unknown command",
    )?;
    let s = connect_control(&lab)?;
    expect_error(
        &exchange(&s, b"{\"version\":99,\"command\":\"status\"}\n")?,
        "protocol version 99",
    )?;
    let s = connect_control(&lab)?;
    let mut big = vec![b'x'; 100 * 1024];
    big.push(b'\n');
    expect_error(&exchange(&s, &big)?, "a 100 KiB line")?;
    drop(s);

    // Still serving: a new connection, and lbctl with --json after the subcommand.
    let s = connect_control(&lab)?;
    ensure!(
        matches!(exchange(&s, &status)?, Response::Status(_)),
        "no status on a new connection after the bad requests"
    );
    let st = parse_status_json(&lab.lbctl_ok(&["status", "--json"])?)?;
    println!(
        "lbctl status --json: version {}, {} on {}, {} services, counters {:?}",
        st.version,
        st.xdp_mode,
        st.interface,
        st.services.len(),
        st.counters
    );
    ensure!(
        st.services.len() == 1
            && st.services[0].name == SERVICE
            && st.services[0].backends.len() == 2,
        "unexpected status: {st:?}"
    );
    let list = parse_backends_json(&lab.lbctl_ok(&["backend", "list", SERVICE, "--json"])?)?;
    ensure!(list.len() == 2, "backend list: {list:?}");
    let human = lab.lbctl_ok(&["status"])?;
    println!("lbctl status:\n{}", human.trim_end());
    ensure!(
        human.contains(SERVICE) && human.contains("b1") && human.contains("b2"),
        "lbctl status does not show the service and its backends"
    );
    drop(half);

    // Not root: the socket refuses. lbctl is copied where nobody may run it, so that
    // the failure is lbctl's and not the exec's.
    let bin_dir = lab.dir().join("bin");
    fs::create_dir_all(&bin_dir)?;
    let lbctl = bin_dir.join("lbctl");
    fs::copy(lb_tests::lab::bin_path("lbctl")?, &lbctl)?;
    fs::set_permissions(&bin_dir, fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(lab.dir(), fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(&lbctl, fs::Permissions::from_mode(0o755))?;
    let as_nobody = |args: &[&str]| -> Result<std::process::Output> {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&lbctl)
            .arg("--socket")
            .arg(&socket)
            .args(args);
        run_bounded(cmd, Duration::from_secs(10))
    };
    let help = as_nobody(&["--help"])?;
    ensure!(
        help.status.success(),
        "nobody cannot run lbctl --help ({}): {}",
        help.status,
        stderr_of(&help)
    );
    let out = as_nobody(&["status"])?;
    println!(
        "lbctl status as nobody -> {}: {}",
        out.status,
        stderr_of(&out).trim()
    );
    ensure!(!out.status.success(), "lbctl status succeeded as nobody");
    ensure!(
        stderr_of(&out).to_lowercase().contains("permission"),
        "lbctl as nobody does not say permission denied: {}",
        stderr_of(&out)
    );

    // lbctl's own errors.
    lbctl_fails(&lab, &["backend", "disable", "nosuch", "b1"], &["nosuch"])?;
    lbctl_fails(&lab, &["backend", "disable", SERVICE, "b9"], &["b9"])?;
    lbctl_fails(&lab, &["backend", "enable", SERVICE, "b9"], &["b9"])?;
    lbctl_fails(&lab, &["backend", "weight", SERVICE, "b9", "5"], &["b9"])?;
    lbctl_fails(
        &lab,
        &["backend", "weight", "nosuch", "b1", "5"],
        &["nosuch"],
    )?;
    lbctl_fails(&lab, &["backend", "list", "nosuch"], &["nosuch"])?;
    lbctl_fails(&lab, &["backend", "weight", SERVICE, "b1", "10001"], &[])?;
    {
        let mut cmd = Command::new(lb_tests::lab::bin_path("lbctl")?);
        cmd.arg("--socket")
            .arg(lab.dir().join("no-such.sock"))
            .arg("status");
        let out = run_bounded(cmd, Duration::from_secs(10))?;
        println!(
            "lbctl with no agent -> {}: {}",
            out.status,
            stderr_of(&out).trim()
        );
        ensure!(
            !out.status.success() && !stderr_of(&out).trim().is_empty(),
            "lbctl with no agent behind the socket: {out:?}"
        );
    }
    let list = lab.lbctl_backends(Some(SERVICE))?;
    ensure!(
        list.iter().all(|b| b.enabled && b.weight == 100),
        "a failed lbctl command changed something: {list:?}"
    );

    // disable --wait gives up at its timeout and says how many flows remain.
    let mut held = lab.converse(vip())?;
    let name = held.greeting.clone();
    let t = Instant::now();
    let out = lab.lbctl(&[
        "backend",
        "disable",
        SERVICE,
        &name,
        "--wait",
        "--timeout",
        "1",
    ])?;
    println!(
        "disable {name} --wait --timeout 1 with a connection open -> {} after {:.2?}: {}",
        out.status,
        t.elapsed(),
        stderr_of(&out).trim()
    );
    ensure!(
        !out.status.success() && stderr_of(&out).contains('1'),
        "disable --wait --timeout 1 with one flow open: {out:?}"
    );
    ensure!(
        t.elapsed() < Duration::from_secs(5),
        "disable --wait --timeout 1 took {:?}",
        t.elapsed()
    );
    held.check_echo("draining")?;
    lab.lbctl_ok(&["backend", "enable", SERVICE, &name])?;
    held.check_echo("enabled again")?;
    Ok(())
}
