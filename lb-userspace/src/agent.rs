//! The agent: loads the XDP program, keeps its maps in step with the config and the
//! neighbour table, and detaches when told to stop.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use lb_common::{CFG_F_ANSWER_NEIGH, CFG_F_FORWARD, LbConfig};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{self, Config, XdpMode},
    dataplane::{AttachedMode, DataPlane, XdpDataPlane},
    neigh::Neighbours,
    programmer::{ApplyReport, Programmer},
};

/// How long start-up waits for backend MACs before serving with what it has.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);
/// How often the neighbour table is read again (new MACs, unresolved backends).
const REFRESH_EVERY: Duration = Duration::from_secs(2);

pub struct Agent {
    config_path: PathBuf,
    config: Config,
    dp: XdpDataPlane,
    programmer: Programmer,
    neigh: Neighbours,
    macs: HashMap<IpAddr, [u8; 6]>,
    mode: AttachedMode,
}

/// The MAC of an interface, from sysfs.
pub fn interface_mac(interface: &str) -> Result<[u8; 6]> {
    let path = Path::new("/sys/class/net").join(interface).join("address");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("interface {interface}: reading {}", path.display()))?;
    parse_mac(text.trim()).with_context(|| {
        format!(
            "interface {interface}: {:?} is not a MAC address",
            text.trim()
        )
    })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn backend_addresses(config: &Config) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = config
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.address))
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

impl Agent {
    /// Loads, fills the maps, then attaches: the program never sees half a config.
    pub async fn start(config_path: &Path, config: Config) -> Result<Self> {
        let interface = config.agent.interface.clone();
        let mac = interface_mac(&interface)?;
        let mut dp = XdpDataPlane::load().context("loading the XDP program")?;
        let neigh = Neighbours::new(&interface)
            .with_context(|| format!("watching neighbours on {interface}"))?;
        let macs = neigh
            .resolve(&backend_addresses(&config), RESOLVE_WAIT)
            .await?;
        let mut programmer = Programmer::new();
        let report = programmer.apply(&mut dp, &config.services, &|ip| macs.get(&ip).copied())?;
        log_unresolved(&report);
        dp.set_config(&LbConfig {
            mac,
            _pad: [0; 2],
            flags: CFG_F_ANSWER_NEIGH | CFG_F_FORWARD,
        })?;
        let wanted = match config.agent.xdp_mode {
            XdpMode::Auto => None,
            XdpMode::Native => Some(AttachedMode::Native),
            XdpMode::Generic => Some(AttachedMode::Generic),
        };
        let mode = dp.attach(&interface, wanted)?;
        eprintln!(
            "lb-agent: attached to {interface} in {mode} mode (xdp_mode = {})",
            config.agent.xdp_mode
        );
        Ok(Self {
            config_path: config_path.to_path_buf(),
            config,
            dp,
            programmer,
            neigh,
            macs,
            mode,
        })
    }

    pub fn mode(&self) -> AttachedMode {
        self.mode
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dataplane(&self) -> &XdpDataPlane {
        &self.dp
    }

    fn apply(&mut self) -> Result<ApplyReport> {
        let macs = &self.macs;
        let report = self
            .programmer
            .apply(&mut self.dp, &self.config.services, &|ip| {
                macs.get(&ip).copied()
            })?;
        log_unresolved(&report);
        Ok(report)
    }

    /// Re-reads the config file. An invalid file changes nothing.
    pub async fn reload(&mut self) -> Result<ApplyReport> {
        let new = config::load(&self.config_path)?;
        if new.agent != self.config.agent {
            bail!("[agent] changed (interface or xdp_mode): restart the agent to apply it");
        }
        let fresh = self
            .neigh
            .resolve(&backend_addresses(&new), RESOLVE_WAIT)
            .await?;
        self.macs.extend(fresh);
        self.config = new;
        self.apply()
    }

    /// Picks up MACs that changed or appeared; probes the backends still unresolved.
    pub async fn refresh_neighbours(&mut self) -> Result<()> {
        let table = self.neigh.table().await?;
        let mut changed = false;
        for ip in backend_addresses(&self.config) {
            match table.get(&ip) {
                Some(mac) if self.macs.get(&ip) != Some(mac) => {
                    if let Some(old) = self.macs.insert(ip, *mac) {
                        eprintln!(
                            "lb-agent: backend {ip} moved from {} to {}",
                            fmt_mac(&old),
                            fmt_mac(mac)
                        );
                    }
                    changed = true;
                }
                Some(_) => {}
                // Keep using a MAC the kernel forgot; ask again in the background.
                None => {
                    let _ = self.neigh.probe(ip);
                }
            }
        }
        if changed {
            self.apply()?;
        }
        Ok(())
    }
}

fn log_unresolved(report: &ApplyReport) {
    for (service, backend) in &report.unresolved {
        eprintln!(
            "lb-agent: service {service}: backend {backend} has no MAC yet (not in the neighbour table); left out until it resolves"
        );
    }
}

pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs until SIGINT or SIGTERM; SIGHUP reloads the config.
pub async fn run(config_path: &Path, config: Config) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut agent = Agent::start(config_path, config).await?;
    let backends: usize = agent.config.services.iter().map(|s| s.backends.len()).sum();
    eprintln!(
        "lb-agent: ready: {} services, {backends} backends on {} ({} XDP)",
        agent.config.services.len(),
        agent.config.agent.interface,
        agent.mode
    );
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => match agent.reload().await {
                Ok(r) => eprintln!(
                    "lb-agent: reloaded: {} VIPs added, {} removed, {} ring slots and {} backends written",
                    r.vips_added, r.vips_removed, r.ring_slots_written, r.backends_written
                ),
                Err(e) => eprintln!("lb-agent: reload failed, running config unchanged: {e:#}"),
            },
            _ = tick.tick() => {
                if let Err(e) = agent.refresh_neighbours().await {
                    eprintln!("lb-agent: neighbour refresh failed: {e:#}");
                }
            }
        }
    }
    let interface = agent.config.agent.interface.clone();
    drop(agent);
    eprintln!("lb-agent: detached from {interface}; exiting");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:02"), None);
        assert_eq!(parse_mac("zz:00:0a:ff:00:01"), None);
        assert_eq!(fmt_mac(&[2, 0, 10, 255, 0, 1]), "02:00:0a:ff:00:01");
    }
}
