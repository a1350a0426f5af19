//! lbctl: the operator's tool for a running lb-agent, over its control socket.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use lb_userspace::{
    config::DEFAULT_CONTROL_SOCKET,
    protocol::{
        BackendStatus, Envelope, MAX_FRAME, Request, Response, Status, VrrpStatus, decode_response,
        encode,
    },
    table::{Align, Table},
    top,
};

/// Control a running lb-agent: show its state, drain and restore backends before and
/// after an upgrade, change weights, reload its config. Must run as root.
#[derive(Parser)]
#[command(name = "lbctl", version)]
struct Args {
    /// The agent's control socket.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Agent version, interface, XDP mode, uptime; VRRP, sync and, with [announce], each
    /// VIP: announcing or not and since when; every service and its backends; counters.
    Status,
    /// Backends and what they are doing.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Re-read the agent's config file and apply only the difference. An invalid file is
    /// reported with every error and changes nothing.
    Reload,
    /// A live view, refreshed every second: per service and backend, packets/s, bits/s,
    /// new flows/s, active flows, state and health; the VRRP state; the reasons packets
    /// were not forwarded that moved. `q`, Esc or Ctrl-C quits.
    Top {
        /// Print one sample of the rates and exit (with --json: as JSON).
        #[arg(long)]
        once: bool,
        /// Seconds between readings.
        #[arg(long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
    },
    /// The XDP program's decisions about VIP traffic, live, one line each: protocol,
    /// source > destination, verdict, reason, and the backend of a forwarded packet.
    /// The program traces only while a trace runs. Ctrl-C ends it.
    Trace {
        /// Only packets to this VIP address.
        #[arg(long, value_name = "ADDR")]
        vip: Option<IpAddr>,
        /// Stop after N events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// List backends (of one service, or all).
    List { service: Option<String> },
    /// Stop sending new flows to a backend; its established flows continue until they end.
    Disable {
        service: String,
        backend: String,
        /// Return only when the backend has no active flows left.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds, saying how many flows remain.
        #[arg(long, value_name = "SECS", default_value_t = 300, requires = "wait")]
        timeout: u64,
    },
    /// Let a backend take new flows again.
    Enable { service: String, backend: String },
    /// Set a backend's weight (0 to 10000; 0 takes no new flows). Kept across restarts
    /// and reloads, over the config's weight.
    Weight {
        service: String,
        backend: String,
        weight: u32,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sends one request and reads its response.
fn call(socket: &Path, request: Request) -> Result<Response> {
    let stream = send(socket, request)?;
    let mut reader = BufReader::new(stream);
    read_response(&mut reader)?
        .ok_or_else(|| anyhow!("the agent closed the connection without answering"))
}

/// The next response on a connection; `None` at its end.
fn read_response(reader: &mut BufReader<UnixStream>) -> Result<Option<Response>> {
    let mut line = Vec::new();
    reader
        .take(MAX_FRAME as u64 + 1)
        .read_until(b'\n', &mut line)
        .context("reading the response")?;
    if line.is_empty() {
        return Ok(None);
    }
    Ok(Some(decode_response(&line)?))
}

/// Connects and sends one request, with the lowest protocol version that has it.
fn send(socket: &Path, request: Request) -> Result<UnixStream> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow!(
            "no agent listening on {} (is lb-agent running? is --socket right?)",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {}: lbctl must run as root",
            socket.display()
        ),
        _ => anyhow!("connecting to {}: {e}", socket.display()),
    })?;
    stream
        .write_all(&encode(&Envelope {
            version: request.version(),
            request,
        }))
        .context("sending the request")?;
    Ok(stream)
}

/// A response that is not an error, or the error as this command's failure.
fn expect_ok(response: Response) -> Result<Response> {
    match response {
        Response::Error { message, details } => {
            let mut text = message;
            for d in details {
                text.push_str("\n  ");
                text.push_str(&d);
            }
            Err(anyhow!(text))
        }
        other => Ok(other),
    }
}

fn run(args: &Args) -> Result<()> {
    let socket = &args.socket;
    match &args.command {
        Command::Status => match expect_ok(call(socket, Request::Status)?)? {
            Response::Status(status) => print_status(&status, args.json),
            other => unexpected(other),
        },
        Command::Backend(BackendCommand::List { service }) => {
            let backends = list(socket, service.clone())?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&backends)?);
            } else {
                print_backends(&backends);
            }
            Ok(())
        }
        Command::Backend(BackendCommand::Disable {
            service,
            backend,
            wait,
            timeout,
        }) => {
            let request = Request::DisableBackend {
                service: service.clone(),
                backend: backend.clone(),
            };
            done(expect_ok(call(socket, request)?)?, args.json)?;
            if *wait {
                wait_drained(
                    socket,
                    service,
                    backend,
                    Duration::from_secs(*timeout),
                    args.json,
                )?;
            }
            Ok(())
        }
        Command::Backend(BackendCommand::Enable { service, backend }) => {
            let request = Request::EnableBackend {
                service: service.clone(),
                backend: backend.clone(),
            };
            done(expect_ok(call(socket, request)?)?, args.json)
        }
        Command::Backend(BackendCommand::Weight {
            service,
            backend,
            weight,
        }) => {
            let request = Request::SetWeight {
                service: service.clone(),
                backend: backend.clone(),
                weight: *weight,
            };
            done(expect_ok(call(socket, request)?)?, args.json)
        }
        Command::Reload => done(expect_ok(call(socket, Request::Reload)?)?, args.json),
        Command::Trace { vip, count } => trace(socket, *vip, *count, args.json),
        Command::Top { once, interval } => top(socket, *once, *interval, args.json),
    }
}

fn status(socket: &Path) -> Result<Status> {
    match expect_ok(call(socket, Request::Status)?)? {
        Response::Status(status) => Ok(*status),
        other => Err(anyhow!("unexpected answer from the agent: {other:?}")),
    }
}

fn top(socket: &Path, once: bool, interval: f64, json: bool) -> Result<()> {
    if !(0.1..=3600.0).contains(&interval) {
        bail!("--interval {interval}: give 0.1 to 3600 seconds");
    }
    let every = Duration::from_secs_f64(interval);
    if !once {
        if json {
            bail!("the live view has no JSON form: use `lbctl top --once --json`");
        }
        return top::screen::run(|| status(socket), every);
    }
    let before = status(socket)?;
    let start = Instant::now();
    std::thread::sleep(every);
    let now = status(socket)?;
    let sample = top::sample(&before, &now, start.elapsed().as_secs_f64());
    if json {
        println!("{}", serde_json::to_string_pretty(&sample)?);
        return Ok(());
    }
    println!(
        "{}  vrrp {}  {}  over {:.2} s",
        sample.interface,
        sample.vrrp_state,
        if sample.serving {
            "serving"
        } else {
            "not serving"
        },
        sample.interval_s
    );
    let columns: Vec<(&str, Align)> = top::COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (header, ..))| {
            let align = if top::right_aligned(i) {
                Align::Right
            } else {
                Align::Left
            };
            (*header, align)
        })
        .collect();
    let mut t = Table::new(&columns);
    for (_, cells) in top::rows(&sample) {
        t.row(cells);
    }
    print!("{}", t.render());
    let list = |m: &std::collections::BTreeMap<String, f64>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k} {}", top::si(Some(*v))))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!("not forwarded/s: {}", list(&sample.not_forwarded_per_s));
    println!("events/s: {}", list(&sample.events_per_s));
    Ok(())
}

/// Streams the agent's trace until `count` events, the agent's end, or Ctrl-C.
fn trace(socket: &Path, vip: Option<IpAddr>, count: Option<u64>, json: bool) -> Result<()> {
    let stream = send(socket, Request::Trace { vip, count })?;
    let mut reader = BufReader::new(stream);
    let mut out = std::io::stdout().lock();
    loop {
        let Some(response) = read_response(&mut reader)? else {
            bail!("the agent closed the trace");
        };
        match expect_ok(response)? {
            Response::Tracing { message } => eprintln!("{message} (Ctrl-C ends)"),
            Response::Trace(record) => {
                let line = if json {
                    serde_json::to_string(&record)?
                } else {
                    lb_userspace::trace::line(&record)
                };
                // A closed pipe (`| head`) ends the trace quietly.
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(());
                }
            }
            Response::TraceLost { events } => {
                eprintln!("({events} events lost: too many to keep up)")
            }
            Response::Done { .. } => return Ok(()),
            other => return unexpected(other),
        }
    }
}

fn unexpected(response: Response) -> Result<()> {
    bail!("unexpected answer from the agent: {response:?}")
}

fn done(response: Response, json: bool) -> Result<()> {
    match response {
        Response::Done { message } => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "result": "done", "message": message })
                );
            } else {
                println!("{message}");
            }
            Ok(())
        }
        other => unexpected(other),
    }
}

fn list(socket: &Path, service: Option<String>) -> Result<Vec<BackendStatus>> {
    match expect_ok(call(socket, Request::ListBackends { service })?)? {
        Response::Backends { backends } => Ok(backends),
        other => Err(anyhow!("unexpected answer from the agent: {other:?}")),
    }
}

/// Polls until the backend has no active flows, or fails at the timeout.
fn wait_drained(
    socket: &Path,
    service: &str,
    backend: &str,
    timeout: Duration,
    json: bool,
) -> Result<()> {
    let start = Instant::now();
    let mut last_said = None;
    loop {
        let backends = list(socket, Some(service.to_string()))?;
        let b = backends
            .iter()
            .find(|b| b.name == backend)
            .with_context(|| format!("backend {backend} left service {service} while draining"))?;
        if b.enabled {
            bail!("backend {backend} was enabled again while waiting for it to drain");
        }
        if b.active_flows == 0 {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "result": "drained", "service": service, "backend": backend, "seconds": start.elapsed().as_secs_f64() })
                );
            } else {
                println!(
                    "backend {backend} drained in {:.1} s: no active flows left",
                    start.elapsed().as_secs_f64()
                );
            }
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bail!(
                "timed out after {} s: backend {backend} still has {} active flow(s)",
                timeout.as_secs(),
                b.active_flows
            );
        }
        if !json && last_said != Some(b.active_flows) {
            eprintln!(
                "waiting: backend {backend} has {} active flow(s)",
                b.active_flows
            );
            last_said = Some(b.active_flows);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_status(status: &Status, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    println!(
        "lb-agent {}  interface {}  XDP {}  up {}",
        status.version,
        status.interface,
        status.xdp_mode,
        human_duration(status.uptime_s)
    );
    match &status.vrrp {
        None => println!("standalone (no [vrrp]): serving the VIPs"),
        Some(v) => print_vrrp(v, status.serving),
    }
    if let Some(sync) = &status.sync {
        print_sync(sync);
    }
    if let Some(a) = &status.announce {
        print_announce(a);
    }
    for s in &status.services {
        println!();
        let vip = if s.vip.contains(':') {
            format!("[{}]", s.vip)
        } else {
            s.vip.clone()
        };
        println!(
            "service {}  {vip}:{}  packets {}  bytes {}  new flows {}",
            s.name, s.port, s.packets, s.bytes, s.new_flows
        );
        if s.persistence_timeout_s > 0 {
            println!(
                "  persistence {} s: {} client address(es) keep their backend",
                s.persistence_timeout_s, s.persistent_clients
            );
        }
        print_backends(&s.backends);
    }
    println!();
    let f = &status.flows;
    let age = match (f.scan_age_ms, f.scan_ms) {
        (Some(ms), Some(took)) => format!("scanned {ms} ms ago, in {took} ms"),
        (Some(ms), None) => format!("scanned {ms} ms ago"),
        (None, _) => "not scanned yet".to_string(),
    };
    println!(
        "flow table: {} connections, {} pinned{} ({age}{})",
        f.connections,
        f.pinned,
        if f.pin_failures > 0 {
            format!(", {} could not be pinned (table full)", f.pin_failures)
        } else {
            String::new()
        },
        f.error
            .as_deref()
            .map(|e| format!("; last scan failed: {e}"))
            .unwrap_or_default()
    );
    let counters: Vec<String> = status
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if f.nat_flows > 0
        || f.nat_collected > 0
        || status
            .counters
            .get("drop_nat_no_port")
            .is_some_and(|n| *n > 0)
    {
        let exhausted = status
            .counters
            .get("drop_nat_no_port")
            .copied()
            .unwrap_or(0);
        let full = status
            .counters
            .get("drop_nat_table_full")
            .copied()
            .unwrap_or(0);
        println!(
            "NAT: {} flows, {} collected{}{}",
            f.nat_flows,
            f.nat_collected,
            if exhausted > 0 {
                format!(
                    ", {exhausted} SYNs dropped: source ports exhausted (raise agent.nat_port_max - nat_port_min, or add backends)"
                )
            } else {
                String::new()
            },
            if full > 0 {
                format!(", {full} SYNs dropped: NAT table full (raise agent.max_nat_flows)")
            } else {
                String::new()
            }
        );
    }
    println!(
        "not forwarded: {}",
        if counters.is_empty() {
            "none".to_string()
        } else {
            counters.join(", ")
        }
    );
    let events: Vec<String> = status
        .events
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if !events.is_empty() {
        println!("events: {}", events.join(", "));
    }
    Ok(())
}

fn print_announce(a: &lb_userspace::protocol::AnnounceStatus) {
    println!("announce: VIP routes in table {} on {}", a.table, a.device);
    if let Some(e) = &a.error {
        println!("  route change failing (retried every second): {e}");
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    for v in &a.vips {
        let since = v
            .since_unix_ms
            .map(|t| {
                format!(
                    " since {} ({} ago)",
                    unix_ms_to_utc(t),
                    human_duration(now_ms.saturating_sub(t) / 1000)
                )
            })
            .unwrap_or_default();
        if v.announcing {
            println!("  {}: announcing{since}", v.vip);
        } else {
            let why = if v.decision == "announce" {
                "the route is not in yet"
            } else {
                v.decision.as_str()
            };
            println!("  {}: not announcing{since}: {why}", v.vip);
        }
    }
}

fn print_sync(s: &lb_userspace::protocol::SyncStatus) {
    println!(
        "sync from {} port {}: {} admin entries (digest {})",
        s.address, s.port, s.admin_entries, s.admin_digest
    );
    for p in &s.peers {
        let heard = p
            .last_heard_ms_ago
            .map(|ms| format!("last heard {ms} ms ago"))
            .unwrap_or_else(|| "never heard".to_string());
        let since = p
            .connected_since_unix_ms
            .map(|t| format!(" since {}", unix_ms_to_utc(t)))
            .unwrap_or_default();
        println!(
            "  peer {}: {}{since}, {heard}, admin state {}",
            p.address,
            if p.connected {
                "connected"
            } else {
                "disconnected"
            },
            if p.admin_in_step {
                "in step"
            } else {
                "differs (exchanging)"
            }
        );
    }
    let c = &s.counters;
    let dropped: Vec<String> = c.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "  messages sent {} ({} bytes), received {}; flows sent {}, received {}; unpins sent {}, received {}; persistence sent {}, received {}; dropped: {}",
        c.messages_sent,
        c.bytes_sent,
        c.messages_received,
        c.flows_sent,
        c.flows_received,
        c.unpins_sent,
        c.unpins_received,
        c.persistence_sent,
        c.persistence_received,
        if dropped.is_empty() {
            "none".to_string()
        } else {
            dropped.join(", ")
        }
    );
}

/// `YYYY-MM-DD HH:MM:SS UTC` for milliseconds since the epoch.
fn unix_ms_to_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn print_vrrp(v: &VrrpStatus, serving: bool) {
    println!(
        "vrrp router {} on {} from {} ({}{}): {}, priority {} (effective {}), advert every {} ms; {}",
        v.router_id,
        v.interface,
        v.address,
        v.mode,
        if v.authenticated {
            ", authenticated"
        } else {
            ""
        },
        v.state,
        v.priority,
        v.effective_priority,
        v.advert_interval_ms,
        if serving {
            "serving the VIPs"
        } else {
            "not serving the VIPs"
        }
    );
    match &v.master {
        Some(m) => println!("  master {} priority {}", m.address, m.priority),
        None => println!("  master unknown"),
    }
    if let Some(t) = &v.last_transition {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(t.at_unix_ms);
        println!(
            "  last transition {} -> {}, {} ago: {}",
            t.from,
            t.to,
            human_duration(now_ms.saturating_sub(t.at_unix_ms) / 1000),
            t.reason
        );
    }
    for a in &v.alarms {
        println!("  ALARM {}: {}", a.kind, a.message);
    }
    let c = &v.counters;
    let dropped: Vec<String> = c.dropped.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "  adverts sent {}, received {}, dropped {}; announcements sent {}",
        c.adverts_sent,
        c.adverts_received,
        if dropped.is_empty() {
            "0".to_string()
        } else {
            dropped.join(", ")
        },
        c.announcements_sent
    );
    if c.serve_switch_errors > 0 {
        println!(
            "  serving switch: {} failed writes (retried)",
            c.serve_switch_errors
        );
    }
}

fn print_backends(backends: &[BackendStatus]) {
    use Align::{Left, Right};
    let mut t = Table::new(&[
        ("backend", Left),
        ("address", Left),
        ("health", Left),
        ("state", Left),
        ("weight", Right),
        ("ring", Right),
        ("active", Right),
        ("packets", Right),
        ("new flows", Right),
    ])
    .indent(2);
    for b in backends {
        let name = if b.backup {
            format!("{} (backup)", b.name)
        } else {
            b.name.clone()
        };
        t.row([
            name,
            b.address.clone(),
            b.health.clone(),
            b.state.to_string(),
            b.weight.to_string(),
            (if b.in_ring { "yes" } else { "no" }).to_string(),
            b.active_flows.to_string(),
            b.packets.to_string(),
            b.new_flows.to_string(),
        ]);
    }
    print!("{}", t.render());
}

fn human_duration(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}
