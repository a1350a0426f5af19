//! The systemd unit `config/lb-agent.service`: `systemd-analyze verify` accepts it, and
//! the agent does its whole job (attach, VRRP master at real-time priority with its
//! memory locked, forwarding) with exactly the unit's `CapabilityBoundingSet`, as root's
//! uid, in the namespace lab; without CAP_BPF it cannot start. See `lb_tests::lab`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::lab::{
    Lab, Node, ProcessGuard, SERVICE_PORT, Service, VIP4, VrrpSection, bin_path, run_bounded,
};

const UNIT: &str = "config/lb-agent.service";
/// Where the unit expects the agent; the verify test substitutes the built one.
const INSTALLED_AGENT: &str = "/usr/local/bin/lb-agent";
const START_TIMEOUT: Duration = Duration::from_secs(20);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn unit_text() -> Result<String> {
    let path = repo_root().join(UNIT);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The capabilities a unit's `CapabilityBoundingSet=` lines allow, in order.
fn bounding_set(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix("CapabilityBoundingSet="))
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect()
}

/// A capability's number (linux/capability.h), for the ones an agent could need.
fn cap_number(name: &str) -> Option<u32> {
    Some(match name {
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_NET_BIND_SERVICE" => 10,
        "CAP_NET_ADMIN" => 12,
        "CAP_NET_RAW" => 13,
        "CAP_IPC_LOCK" => 14,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_NICE" => 23,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        _ => return None,
    })
}

/// `setpriv`'s spelling: `-all,+bpf,+net_admin...`.
fn setpriv_caps(caps: &[String]) -> String {
    let mut spec = String::from("-all");
    for c in caps {
        spec.push_str(",+");
        spec.push_str(&c.trim_start_matches("CAP_").to_lowercase());
    }
    spec
}

/// A capability set line of `/proc/PID/status` (`CapEff:\t000000c000807000`).
fn proc_caps(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(":"))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

/// `tool` exists, or: under `CI=true` the test fails; elsewhere it says it did not run.
fn require_tool(test: &str, tool: &str, package: &str) -> bool {
    if Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {tool} not found (Debian {package}; cargo xtask setup installs it)");
    }
    eprintln!("\n*** {test}: NOT RUN: {tool} not found; run cargo xtask setup ***\n");
    false
}

#[test]
fn the_unit_names_only_known_capabilities() -> Result<()> {
    let caps = bounding_set(&unit_text()?);
    ensure!(!caps.is_empty(), "no CapabilityBoundingSet in {UNIT}");
    for c in &caps {
        ensure!(
            cap_number(c).is_some(),
            "{c}: not a capability this test knows"
        );
    }
    ensure!(!caps.iter().any(|c| c == "CAP_SYS_ADMIN"), "{caps:?}");
    ensure!(
        setpriv_caps(&caps[..2]) == "-all,+bpf,+perfmon",
        "{}",
        setpriv_caps(&caps[..2])
    );
    Ok(())
}

/// `systemd-analyze verify` (it runs without systemd as PID 1) on a copy of the unit
/// whose ExecStart names the agent just built: verify insists that the binary exists.
#[test]
fn the_unit_passes_systemd_analyze_verify() -> Result<()> {
    let test = "the_unit_passes_systemd_analyze_verify";
    if !require_tool(test, "systemd-analyze", "systemd") {
        return Ok(());
    }
    let agent = bin_path("lb-agent")?;
    let text = unit_text()?;
    ensure!(
        text.contains(INSTALLED_AGENT),
        "{UNIT} does not start {INSTALLED_AGENT}"
    );
    let dir = std::env::temp_dir().join(format!("lb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let unit = dir.join("lb-agent.service");
    std::fs::write(
        &unit,
        text.replace(INSTALLED_AGENT, &agent.to_string_lossy()),
    )?;
    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify").arg(&unit);
    let out = run_bounded(verify, Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("systemd-analyze verify: exit {}; said {said:?}", out.status);
    // Unknown keys are warnings with exit 0: any word from it is a failure here.
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    Ok(())
}

/// Starts the agent in the LB namespace under `setpriv` with `caps` as its bounding and
/// inheritable sets (root's uid: that is its whole permitted set, as under the unit).
fn spawn_with_caps<'l>(lab: &'l Lab, config: &str, caps: &[String]) -> Result<ProcessGuard<'l>> {
    let path = lab.dir().join(format!("caps-{}.toml", caps.len()));
    std::fs::write(&path, config)?;
    let spec = setpriv_caps(caps);
    let agent = bin_path("lb-agent")?;
    let args = [
        "setpriv".as_ref(),
        "--bounding-set".as_ref(),
        spec.as_ref(),
        "--inh-caps".as_ref(),
        spec.as_ref(),
        "--".as_ref(),
        agent.as_os_str(),
        "--config".as_ref(),
        path.as_os_str(),
    ];
    lab.spawn::<&std::ffi::OsStr>(Node::Lb, &args)
}

/// Waits until the agent answers `lbctl status`; fails when it exits first.
fn wait_ready(lab: &Lab, agent: &mut ProcessGuard<'_>) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if lab.lbctl_status().is_ok() {
            return Ok(());
        }
        if let Some(status) = agent.exited() {
            bail!("the agent exited ({status}):\n{}", agent.log());
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not answer within {START_TIMEOUT:?}:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_agent_does_its_job_with_only_the_units_capabilities() -> Result<()> {
    let test = "the_agent_does_its_job_with_only_the_units_capabilities";
    if !lb_tests::require_root(test) || !require_tool(test, "setpriv", "util-linux") {
        return Ok(());
    }
    let caps = bounding_set(&unit_text()?);
    let mask = caps
        .iter()
        .map(|c| cap_number(c).map(|n| 1u64 << n))
        .sum::<Option<u64>>()
        .context("an unknown capability in the unit")?;
    let lab = Lab::builder().backends(2).build()?;
    lab.start_servers(SERVICE_PORT)?;
    let services = [Service::new("web", VIP4, SERVICE_PORT).backends(1..=2)];
    // VRRP too: its raw socket, gratuitous ARP, SCHED_FIFO and mlockall.
    let config = lab.config_on(
        Node::Lb,
        "native",
        &services,
        Some(&VrrpSection::new(51, 150)),
    );

    // Without CAP_BPF nothing loads: the restriction is real.
    let without_bpf: Vec<String> = caps.iter().filter(|c| *c != "CAP_BPF").cloned().collect();
    let mut refused = spawn_with_caps(&lab, &config, &without_bpf)?;
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        if let Some(s) = refused.exited() {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "the agent without CAP_BPF still runs:\n{}",
            refused.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "without CAP_BPF: {status}; {}",
        refused.log().lines().last().unwrap_or("")
    );
    ensure!(!status.success(), "the agent without CAP_BPF exited 0");
    drop(refused);

    let mut agent = spawn_with_caps(&lab, &config, &caps)?;
    wait_ready(&lab, &mut agent)?;
    let pid = agent.pid().context("no pid")?;
    let (eff, bnd) = (proc_caps(pid, "CapEff")?, proc_caps(pid, "CapBnd")?);
    println!("agent capabilities: CapEff {eff:016x}, CapBnd {bnd:016x}; the unit's {mask:016x}");
    ensure!(
        eff == mask && bnd == mask,
        "the agent runs with other capabilities"
    );
    let (took, _) = lab
        .wait_status_on(Node::Lb, "serving", Duration::from_secs(5), |s| s.serving)
        .with_context(|| agent.log())?;
    println!("master and serving after {took:?}");
    let spread = lab.spread((VIP4, SERVICE_PORT).into(), 30, Duration::from_secs(30));
    ensure!(
        spread.succeeded() == 30,
        "{} of 30 connections: {:?}\n{}",
        spread.succeeded(),
        spread.failures,
        agent.log()
    );
    let log = agent.log();
    for refused in [
        "cannot lock",
        "cannot run the speaker",
        "not locking",
        "Operation not permitted",
    ] {
        ensure!(
            !log.contains(refused),
            "the agent lacked a privilege ({refused}):\n{log}"
        );
    }
    let status = agent.stop()?;
    ensure!(
        status.success(),
        "the agent did not stop cleanly: {status}\n{}",
        agent.log()
    );
    Ok(())
}
