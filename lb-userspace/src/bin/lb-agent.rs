//! lb-agent: loads the XDP load balancer onto an interface and keeps it configured.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use lb_userspace::{
    agent, config,
    logging::{self, LogFormat},
};

/// The load balancer agent: attaches the XDP data path to the configured interface,
/// programs VIPs and backends, checks their health, and serves `lbctl` on its control
/// socket. It answers ARP/NDP for the VIPs and forwards their traffic while it runs, or,
/// with a [vrrp] section, while it is the master of its pair: the VRRP speaker then runs
/// on a thread of its own at real-time priority ([vrrp] rt_priority) with the agent's
/// memory locked, and flips serving itself (a warning if it lacks the privilege; a
/// warning too without [vrrp] auth_key_file). SIGHUP re-reads the config (an invalid
/// file changes nothing). The maps and the program's link are pinned under [agent]
/// bpffs_dir: SIGINT or SIGTERM end the agent but leave the program attached, and a
/// standalone host forwarding with the last config, until the next agent takes the
/// program and its flow tables over (a restart or an upgrade loses no flow). With
/// [vrrp], SIGTERM as master sends priority 0 first, so the peer takes over at once, then
/// stops serving; a killed master stops serving by itself (its lease runs out within
/// 3 advert intervals). With [announce], the agent keeps a host route for each VIP it
/// can serve in [announce] table, for BIRD to announce over BGP; the routes sit on a
/// device that goes with the agent's process (even on SIGKILL), and SIGINT or SIGTERM
/// withdraw them first and keep forwarding for withdraw_grace_ms before the rest of the
/// stop (a second signal ends the wait). With [agent] metrics_listen it serves Prometheus
/// metrics on GET /metrics there. `--detach` removes the program and the pins for good.
#[derive(Parser)]
#[command(name = "lb-agent", version)]
struct Args {
    /// Path of the TOML config file.
    #[arg(long, value_name = "PATH")]
    config: PathBuf,
    /// Only validate the config: print every error with its place, exit non-zero if any.
    #[arg(long)]
    check: bool,
    /// Remove the program from the interface and the pinned maps (every flow) for good,
    /// then exit. Stop the agent first: a running one keeps its link until it exits.
    #[arg(long, conflicts_with = "check")]
    detach: bool,
    /// Log lines on stderr as text, or as one JSON object a line. Health, admin, VRRP,
    /// reload and VIP route (announce) transitions are one event each, with an `event`
    /// field and their details.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Least severe level logged: error, warn, info, debug or trace; or a filter such as
    /// `info,lb_userspace::vrrp=debug`.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match config::load(&args.config) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("lb-agent: invalid config {errors}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
        println!(
            "{}: OK ({} services, {backends} backends)",
            args.config.display(),
            config.services.len()
        );
        return ExitCode::SUCCESS;
    }
    if let Err(e) = logging::init(args.log_format, &args.log_level) {
        eprintln!("lb-agent: {e}");
        return ExitCode::from(2);
    }
    if args.detach {
        return match agent::detach(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(&args.config, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
