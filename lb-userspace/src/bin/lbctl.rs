//! lbctl: the operator's tool for a running lb-agent, over its control socket.

use std::{
    io::{BufRead, BufReader, Read, Write},
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
        BackendStatus, Envelope, MAX_FRAME, PROTOCOL_VERSION, Request, Response, Status,
        VrrpStatus, decode_response, encode,
    },
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
    /// Agent version, interface, XDP mode, uptime; every service and its backends; counters.
    Status,
    /// Backends and what they are doing.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Re-read the agent's config file and apply only the difference. An invalid file is
    /// reported with every error and changes nothing.
    Reload,
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
            version: PROTOCOL_VERSION,
            request,
        }))
        .context("sending the request")?;
    let mut line = Vec::new();
    BufReader::new(stream)
        .take(MAX_FRAME as u64 + 1)
        .read_until(b'\n', &mut line)
        .context("reading the response")?;
    if line.is_empty() {
        bail!("the agent closed the connection without answering");
    }
    Ok(decode_response(&line)?)
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
        print_backends(&s.backends);
    }
    println!();
    let f = &status.flows;
    let age = match f.scan_age_ms {
        Some(ms) => format!("scanned {ms} ms ago"),
        None => "not scanned yet".to_string(),
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
        "  messages sent {} ({} bytes), received {}; flows sent {}, received {}; unpins sent {}, received {}; dropped: {}",
        c.messages_sent,
        c.bytes_sent,
        c.messages_received,
        c.flows_sent,
        c.flows_received,
        c.unpins_sent,
        c.unpins_received,
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
    println!(
        "  {:<12} {:<16} {:<24} {:<9} {:>6} {:>7} {:>6} {:>10} {:>10}",
        "backend", "address", "health", "state", "weight", "ring", "active", "packets", "new flows"
    );
    for b in backends {
        let name = if b.backup {
            format!("{} (backup)", b.name)
        } else {
            b.name.clone()
        };
        println!(
            "  {:<12} {:<16} {:<24} {:<9} {:>6} {:>7} {:>6} {:>10} {:>10}",
            name,
            b.address,
            b.health,
            b.state.to_string(),
            b.weight,
            if b.in_ring { "yes" } else { "no" },
            b.active_flows,
            b.packets,
            b.new_flows
        );
    }
}

fn human_duration(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}
