//! `cargo xtask`: the project's build, test and lab tasks.
//!
//! Every task but `setup` runs `setup` first, so a fresh machine needs one command.

mod setup;
mod workspace;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use workspace::{Workspace, exec, is_root, require_root, run, run_tests};

/// The eBPF crate builds only for the BPF target, through lb-userspace's build script;
/// cargo commands over the whole workspace leave it out.
const EBPF_PACKAGE: &str = "lb-ebpf";

/// Where lab tests, the demo and the bench look for lb-agent and lbctl.
const BIN_DIR_VAR: &str = "LB_BIN_DIR";

#[derive(Parser)]
#[command(about = "Build, test and run the XDP load balancer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the lab need: rust-src, bpf-linker, Debian packages
    Setup,
    /// Build the agent, lbctl and the lab programs
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Check formatting and lints, build, then run every test (the lab tests need root)
    Test,
    /// Build a namespace lab and show how connections spread over the backends (root)
    Demo {
        /// Passed on to lb-demo
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build and run lb-agent with ARGS (after `--`)
    Run {
        /// Passed on to lb-agent
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build in release mode and run lb-bench (root): XDP cost per packet, failover,
    /// advert jitter, pin sync and the comparative lab bench (`-- --help` for its options)
    Bench {
        /// Passed on to lb-bench
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The error and its causes on one line; a backtrace of xtask itself would only be noise.
    match run_task(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    let ws = Workspace::locate()?;
    match task {
        Task::Setup => setup::setup(&ws),
        Task::Build { release } => {
            setup::setup(&ws)?;
            build_bins(&ws, release).map(|_| ())
        }
        Task::Test => test(&ws),
        Task::Demo { args } => {
            require_root("demo")?;
            setup::setup(&ws)?;
            let bin_dir = build_bins(&ws, false)?;
            run(ws
                .command(bin_dir.join("lb-demo"))
                .args(args)
                .env(BIN_DIR_VAR, &bin_dir)
                .current_dir(&ws.root))
        }
        Task::Run { args } => {
            setup::setup(&ws)?;
            let bin_dir = build_bins(&ws, false)?;
            exec(ws.command(bin_dir.join("lb-agent")).args(args))
        }
        Task::Bench { args } => {
            require_root("bench")?;
            setup::setup(&ws)?;
            let bin_dir = build_bins(&ws, true)?;
            run(ws
                .command(bin_dir.join("lb-bench"))
                .args(args)
                .env(BIN_DIR_VAR, &bin_dir)
                .current_dir(&ws.root))
        }
    }
}

/// Builds every binary of the workspace and returns the folder they are in.
fn build_bins(ws: &Workspace, release: bool) -> Result<PathBuf> {
    let mut args = vec!["build", "--workspace", "--exclude", EBPF_PACKAGE, "--bins"];
    if release {
        args.push("--release");
    }
    run(&mut ws.cargo(&args))?;
    Ok(ws.bin_dir(if release { "release" } else { "debug" }))
}

fn test(ws: &Workspace) -> Result<()> {
    setup::setup(ws)?;
    let root = is_root()?;
    if !root {
        warn_not_root();
    }
    run(&mut ws.cargo(&["fmt", "--all", "--", "--check"]))?;
    run(&mut ws.cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_PACKAGE,
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let bin_dir = build_bins(ws, false)?;
    let (totals, status) = run_tests(
        ws.cargo(&[
            "test",
            "--workspace",
            "--exclude",
            EBPF_PACKAGE,
            "--",
            "--test-threads=1",
        ])
        .env(BIN_DIR_VAR, &bin_dir),
    )?;
    if !root {
        // Said again at the end, where it is seen after the test output.
        warn_not_root();
    }
    println!();
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() || totals.failed > 0 {
        bail!("cargo test failed ({status})");
    }
    if totals.passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

fn warn_not_root() {
    eprintln!();
    eprintln!("!!! WARNING: not running as root.");
    eprintln!("!!! The lab tests build network namespaces and load XDP programs:");
    eprintln!("!!! they will fail or be skipped. Run `cargo xtask test` as root to run them.");
    eprintln!();
}
