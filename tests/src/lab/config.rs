//! Config: the agent's TOML file as typed values, serialised with the `toml` crate.
//!
//! The types mirror the agent's layout: `ConfigFile` holds `[agent]` (`AgentSection`),
//! `[[services]]` (`ServiceSection`, with `[services.health_check]` and
//! `[[services.backends]]`), `[vrrp]` (`VrrpSection`), `[sync]` (`SyncSection`) and
//! `[announce]` (`AnnounceSection`). One field is one key, in
//! the order an operator would write them; a key the agent may go without is an
//! `Option` (or an empty list) left out of the file while unset, so the agent's own
//! default applies. A new `[agent]` key is one field:
//!
//! ```text
//! #[serde(skip_serializing_if = "Option::is_none")]
//! pub max_flows: Option<u32>,
//! ```
//!
//! and a test sets it on the typed value before rendering it:
//! `let mut file = lab.config_file(Node::Lb, "native", &services);`
//! `file.agent.max_flows = Some(1000); lab.spawn_agent(&file.to_toml())`.
//!
//! `Service` is the lab's shorthand for a service: backends are named by their lab
//! number and get the address of that backend in the family of the VIP.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{Lab, Node, addr_like};

/// A whole lb-agent config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigFile {
    pub agent: AgentSection,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSection>,
    /// Absent: a standalone LB, always master.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vrrp: Option<VrrpSection>,
    /// Absent: nothing shared with other LB hosts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncSection>,
    /// Absent: no VIP routes for a routing daemon.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce: Option<AnnounceSection>,
}

/// `[announce]`: the agent's routing table, the grace period (the agent's default if
/// unset).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AnnounceSection {
    pub table: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub withdraw_grace_ms: Option<u32>,
}

impl AnnounceSection {
    pub fn new(table: u32) -> Self {
        AnnounceSection {
            table,
            withdraw_grace_ms: None,
        }
    }
}

/// `[sync]`: the other LB hosts, the shared key, the port (the agent's default if unset).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SyncSection {
    pub peers: Vec<IpAddr>,
    pub key_file: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl SyncSection {
    pub fn new(peers: impl IntoIterator<Item = IpAddr>, key_file: impl Into<PathBuf>) -> Self {
        SyncSection {
            peers: peers.into_iter().collect(),
            key_file: key_file.into(),
            port: None,
        }
    }
}

impl ConfigFile {
    /// A file with `agent` and no service.
    pub fn new(agent: AgentSection) -> Self {
        ConfigFile {
            agent,
            services: Vec::new(),
            vrrp: None,
            sync: None,
            announce: None,
        }
    }

    /// Adds the lab services, in order.
    pub fn services<'s>(mut self, services: impl IntoIterator<Item = &'s Service>) -> Self {
        self.services
            .extend(services.into_iter().map(Service::section));
        self
    }

    pub fn vrrp(mut self, vrrp: VrrpSection) -> Self {
        self.vrrp = Some(vrrp);
        self
    }

    pub fn sync(mut self, sync: SyncSection) -> Self {
        self.sync = Some(sync);
        self
    }

    /// The file as TOML.
    pub fn to_toml(&self) -> String {
        // Every key is a string, number, boolean, address or UTF-8 path, and every
        // table comes after the plain keys of its parent: this cannot fail.
        toml::to_string(self).expect("a lab config serialises to TOML")
    }
}

/// `[agent]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AgentSection {
    pub interface: String,
    /// `auto`, `native` or `generic`.
    pub xdp_mode: String,
    pub control_socket: PathBuf,
    pub state_dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_idle_timeout_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_flows: Option<u32>,
    /// Where the agent pins its maps and link. Lab hosts share the root's bpffs and all
    /// call their interface eth0: `config_file` gives each node a directory of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bpffs_dir: Option<PathBuf>,
    /// Where the agent serves `/metrics`, in its own namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl AgentSection {
    /// The agent on `eth0` with `xdp_mode`, its control socket and state directory;
    /// every optional key unset.
    pub fn new(xdp_mode: &str, control_socket: &Path, state_dir: &Path) -> Self {
        AgentSection {
            interface: "eth0".into(),
            xdp_mode: xdp_mode.into(),
            control_socket: control_socket.into(),
            state_dir: state_dir.into(),
            ..AgentSection::default()
        }
    }
}

/// One `[[services]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceSection {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// `dsr` or `nat`; None: the agent's default (DSR).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistence_timeout_s: Option<u32>,
    /// None: the agent's defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSection>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendSection>,
}

/// `[services.health_check]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheckSection {
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub rise: u32,
    pub fall: u32,
}

/// One `[[services.backends]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendSection {
    pub name: String,
    pub address: IpAddr,
    pub weight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<bool>,
    /// NAT only: the backend's port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// `[vrrp]`, with builder methods. `new` sets the keys the lab always writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VrrpSection {
    pub router_id: u8,
    pub priority: u8,
    pub advert_interval_ms: u32,
    pub preempt: bool,
    pub preempt_delay_ms: u32,
    /// Empty: multicast.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_key_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify: Option<PathBuf>,
}

impl VrrpSection {
    /// Adverts every 100 ms, preemption on, no delay, multicast, no key, no notify.
    pub fn new(router_id: u8, priority: u8) -> Self {
        VrrpSection {
            router_id,
            priority,
            advert_interval_ms: 100,
            preempt: true,
            preempt_delay_ms: 0,
            peers: Vec::new(),
            auth_key_file: None,
            notify: None,
        }
    }

    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    pub fn advert_interval_ms(mut self, ms: u32) -> Self {
        self.advert_interval_ms = ms;
        self
    }

    pub fn preempt(mut self, on: bool) -> Self {
        self.preempt = on;
        self
    }

    pub fn preempt_delay_ms(mut self, ms: u32) -> Self {
        self.preempt_delay_ms = ms;
        self
    }

    pub fn peers(mut self, peers: impl IntoIterator<Item = IpAddr>) -> Self {
        self.peers = peers.into_iter().collect();
        self
    }

    pub fn auth_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.auth_key_file = Some(path.into());
        self
    }

    pub fn notify(mut self, path: impl Into<PathBuf>) -> Self {
        self.notify = Some(path.into());
        self
    }
}

/// A service of a lab config, its backends named by lab number; see `Lab::config`.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub ring_size: Option<u32>,
    /// `persistence_timeout_s`; None: left out (off).
    pub persistence_timeout_s: Option<u32>,
    /// (backend number, weight)
    pub backends: Vec<(usize, u32)>,
    /// Backend numbers written with `backup = true`.
    pub backups: Vec<usize>,
    /// The `[services.health_check]` table; none means the agent's defaults.
    pub health_check: Option<HealthCheckSection>,
    /// `forwarding = "nat"` with every backend's `port` this one (`Service::nat`).
    pub nat_backend_port: Option<u16>,
}

impl Service {
    pub fn new(name: &str, vip: impl Into<IpAddr>, port: u16) -> Self {
        Service {
            name: name.into(),
            vip: vip.into(),
            port,
            ring_size: None,
            persistence_timeout_s: None,
            backends: Vec::new(),
            backups: Vec::new(),
            health_check: None,
            nat_backend_port: None,
        }
    }

    /// Full NAT, every backend listening on `backend_port`.
    pub fn nat(mut self, backend_port: u16) -> Self {
        self.nat_backend_port = Some(backend_port);
        self
    }

    /// Adds backend `i` with `weight` as a backup (`backup = true`).
    pub fn backup(mut self, i: usize, weight: u32) -> Self {
        self.backends.push((i, weight));
        self.backups.push(i);
        self
    }

    pub fn health_check(mut self, interval_ms: u32, timeout_ms: u32, rise: u32, fall: u32) -> Self {
        self.health_check = Some(HealthCheckSection {
            interval_ms,
            timeout_ms,
            rise,
            fall,
        });
        self
    }

    /// Adds backend `i` with `weight`.
    pub fn backend(mut self, i: usize, weight: u32) -> Self {
        self.backends.push((i, weight));
        self
    }

    /// Adds the given backends with weight 100 each.
    pub fn backends(mut self, backends: impl IntoIterator<Item = usize>) -> Self {
        self.backends.extend(backends.into_iter().map(|i| (i, 100)));
        self
    }

    pub fn ring_size(mut self, size: u32) -> Self {
        self.ring_size = Some(size);
        self
    }

    /// `persistence_timeout_s = seconds`.
    pub fn persistence(mut self, seconds: u32) -> Self {
        self.persistence_timeout_s = Some(seconds);
        self
    }

    /// The `[[services]]` table: backend `i` is named `b<i>` and has backend `i`'s
    /// address in the family of the VIP.
    pub fn section(&self) -> ServiceSection {
        let backends = self
            .backends
            .iter()
            .map(|&(i, weight)| {
                let node = Node::Backend(i);
                BackendSection {
                    name: node.short_name(),
                    address: addr_like(node, self.vip),
                    weight,
                    backup: self.backups.contains(&i).then_some(true),
                    port: self.nat_backend_port,
                }
            })
            .collect();
        ServiceSection {
            name: self.name.clone(),
            vip: self.vip,
            port: self.port,
            forwarding: self.nat_backend_port.map(|_| "nat".to_string()),
            ring_size: self.ring_size,
            persistence_timeout_s: self.persistence_timeout_s,
            health_check: self.health_check,
            backends,
        }
    }
}

impl Lab {
    /// The control socket of the agent in `node`'s namespace: `<lab dir>/lb.sock` for
    /// `Node::Lb`, `<lab dir>/<short name>.sock` for the others (`lb2.sock`).
    pub fn control_socket_of(&self, node: Node) -> PathBuf {
        self.dir().join(format!("{}.sock", node.short_name()))
    }

    /// The state directory of the agent in `node`'s namespace: `<lab dir>/state` for
    /// `Node::Lb`, `<lab dir>/state-<short name>` for the others.
    pub fn state_dir_of(&self, node: Node) -> PathBuf {
        match node {
            Node::Lb => self.dir().join("state"),
            other => self.dir().join(format!("state-{}", other.short_name())),
        }
    }

    /// Where the agent in `node`'s namespace pins its maps and XDP link:
    /// `<lab dir>/bpffs/<short name>`, on a bpffs the lab mounts for itself (`ip netns
    /// exec` gives each program a /sys of its own, without /sys/fs/bpf), so labs never
    /// share pins; dropping the lab removes them and unmounts it.
    pub fn bpffs_dir_of(&self, node: Node) -> PathBuf {
        self.bpffs().join(node.short_name())
    }

    /// The control socket of the agent in the LB namespace (`control_socket_of(Node::Lb)`).
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket_of(Node::Lb)
    }

    /// The state directory of the agent in the LB namespace (`state_dir_of(Node::Lb)`).
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir_of(Node::Lb)
    }

    /// The config of an agent in `node`'s namespace, as a typed value: `eth0`, the given
    /// XDP mode (`auto`, `native`, `generic`), services whose backends are lab backends,
    /// no `[vrrp]`. It names a control socket and a state directory of its own inside
    /// this lab's temporary directory (`control_socket_of`, `state_dir_of`) and a bpffs
    /// directory of its own (`bpffs_dir_of`), so labs never share them and every agent
    /// of one node finds the admin state, maps and XDP link of the one
    /// before.
    pub fn config_file(&self, node: Node, xdp_mode: &str, services: &[Service]) -> ConfigFile {
        let mut agent = AgentSection::new(
            xdp_mode,
            &self.control_socket_of(node),
            &self.state_dir_of(node),
        );
        agent.bpffs_dir = Some(self.bpffs_dir_of(node));
        ConfigFile::new(agent).services(services)
    }

    /// `config_file` for the agent in the LB namespace, as TOML.
    pub fn config(&self, xdp_mode: &str, services: &[Service]) -> String {
        self.config_file(Node::Lb, xdp_mode, services).to_toml()
    }

    /// `config_file` for the agent in `node`'s namespace with the `[vrrp]` table if
    /// given, as TOML.
    pub fn config_on(
        &self,
        node: Node,
        xdp_mode: &str,
        services: &[Service],
        vrrp: Option<&VrrpSection>,
    ) -> String {
        let mut file = self.config_file(node, xdp_mode, services);
        file.vrrp = vrrp.cloned();
        file.to_toml()
    }
}

#[cfg(test)]
mod tests {
    //! The files the lab writes pass the agent's own check and mean what the typed
    //! values say. Needs the `lb-agent` binary (`cargo build --bins`), not root.

    use std::{
        fs,
        net::Ipv4Addr,
        path::PathBuf,
        process::Command,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use anyhow::{Context, Result, ensure};
    use lb_userspace::config::{self, Config, XdpMode};

    use super::*;
    use crate::lab::{SERVICE_PORT, VIP4, VIP6, addr4, addr6, bin_path};

    static FILES: AtomicUsize = AtomicUsize::new(0);

    /// A file of its own in the temporary directory; removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn write(text: &str) -> Result<Self> {
            let path = std::env::temp_dir().join(format!(
                "lbt-config-{}-{}.toml",
                std::process::id(),
                FILES.fetch_add(1, Ordering::Relaxed)
            ));
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(TempFile(path))
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }

    /// Writes `file`, runs `lb-agent --config F --check` on it, and returns what the
    /// agent's parser makes of the same text.
    fn check(file: &ConfigFile) -> Result<Config> {
        let text = file.to_toml();
        let written = TempFile::write(&text)?;
        let out = Command::new(bin_path("lb-agent")?)
            .arg("--config")
            .arg(&written.0)
            .arg("--check")
            .output()
            .context("running lb-agent --check")?;
        ensure!(
            out.status.success(),
            "lb-agent --check failed ({}):\n{}{}\nthe file:\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        config::parse(&text, "the lab config").map_err(|e| anyhow::anyhow!("{e}\n{text}"))
    }

    fn agent(node: Node) -> AgentSection {
        let dir = PathBuf::from("/tmp/lbt-config");
        let mut agent = AgentSection::new(
            "native",
            &dir.join(format!("{}.sock", node.short_name())),
            &dir.join(format!("state-{}", node.short_name())),
        );
        agent.bpffs_dir = Some(PathBuf::from("/sys/fs/bpf/lbt-config"));
        agent
    }

    fn services() -> Vec<Service> {
        vec![
            Service::new("web4", VIP4, SERVICE_PORT)
                .backends(1..=2)
                .backend(3, 300)
                .backup(4, 50)
                .health_check(100, 150, 2, 3)
                .ring_size(1021),
            Service::new("web6", VIP6, 443).backends([1, 2]),
        ]
    }

    #[test]
    fn standalone_config_passes_the_agents_check() -> Result<()> {
        let file = ConfigFile::new(agent(Node::Lb)).services(&services());
        let text = file.to_toml();
        for absent in ["flow_idle_timeout_s", "[vrrp]", "peers"] {
            ensure!(
                !text.contains(absent),
                "{absent} in a file without it:\n{text}"
            );
        }
        let parsed = check(&file)?;

        ensure!(parsed.agent.interface == "eth0" && parsed.agent.xdp_mode == XdpMode::Native);
        ensure!(parsed.agent.control_socket == file.agent.control_socket);
        ensure!(parsed.agent.state_dir == file.agent.state_dir);
        ensure!(Some(&parsed.agent.bpffs_dir) == file.agent.bpffs_dir.as_ref());
        ensure!(parsed.vrrp.is_none());
        ensure!(parsed.services.len() == 2, "{parsed:#?}");
        let web4 = &parsed.services[0];
        ensure!(web4.name == "web4" && web4.vip == IpAddr::V4(VIP4) && web4.port == SERVICE_PORT);
        ensure!(web4.ring_size == 1021);
        let hc = web4.health_check;
        ensure!((hc.interval_ms, hc.timeout_ms, hc.rise, hc.fall) == (100, 150, 2, 3));
        let backends: Vec<(&str, IpAddr, u32, bool)> = web4
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.address, b.weight, b.backup))
            .collect();
        let b = |i| addr4(Node::Backend(i)).into();
        ensure!(
            backends
                == [
                    ("b1", b(1), 100, false),
                    ("b2", b(2), 100, false),
                    ("b3", b(3), 300, false),
                    ("b4", b(4), 50, true),
                ],
            "{backends:?}"
        );
        let web6 = &parsed.services[1];
        ensure!(web6.vip == IpAddr::V6(VIP6) && web6.port == 443);
        ensure!(web6.health_check == config::HealthCheck::default());
        let v6: Vec<IpAddr> = web6.backends.iter().map(|b| b.address).collect();
        ensure!(
            v6 == [
                IpAddr::V6(addr6(Node::Backend(1))),
                IpAddr::V6(addr6(Node::Backend(2)))
            ],
            "{v6:?}"
        );
        Ok(())
    }

    #[test]
    fn vrrp_pair_configs_pass_the_agents_check() -> Result<()> {
        let plain = ConfigFile::new(agent(Node::Lb))
            .services(&services())
            .vrrp(VrrpSection::new(51, 150));
        let v = check(&plain)?
            .vrrp
            .context("no [vrrp] in the parsed config")?;
        ensure!((v.router_id, v.priority, v.advert_interval_ms) == (51, 150, 100));
        ensure!(v.preempt && v.preempt_delay_ms == 0 && v.peers.is_empty());
        ensure!(v.auth_key_file.is_none() && v.notify.is_none());

        let peer = IpAddr::V4(addr4(Node::Lb));
        let full = ConfigFile::new(agent(Node::Lb2))
            .services(&services())
            .vrrp(
                VrrpSection::new(51, 150)
                    .priority(100)
                    .advert_interval_ms(250)
                    .preempt(false)
                    .preempt_delay_ms(1500)
                    .peers([peer, IpAddr::V4(Ipv4Addr::new(10, 77, 0, 9))])
                    .auth_key_file("/tmp/lbt-config/vrrp.key")
                    .notify("/tmp/lbt-config/notify.sh"),
            );
        let v = check(&full)?
            .vrrp
            .context("no [vrrp] in the parsed config")?;
        ensure!((v.router_id, v.priority, v.advert_interval_ms) == (51, 100, 250));
        ensure!(!v.preempt && v.preempt_delay_ms == 1500);
        ensure!(v.peers == [peer, IpAddr::V4(Ipv4Addr::new(10, 77, 0, 9))]);
        ensure!(v.auth_key_file == Some(PathBuf::from("/tmp/lbt-config/vrrp.key")));
        ensure!(v.notify == Some(PathBuf::from("/tmp/lbt-config/notify.sh")));
        Ok(())
    }

    #[test]
    fn optional_agent_keys_are_written_when_set() -> Result<()> {
        let mut file = ConfigFile::new(agent(Node::Lb)).services(&services()[1..]);
        file.agent.flow_idle_timeout_s = Some(30);
        file.agent.xdp_mode = "generic".into();
        file.agent.metrics_listen = Some("127.0.0.1:9721".parse()?);
        let parsed = check(&file)?;
        ensure!(parsed.agent.flow_idle_timeout_s == 30);
        ensure!(parsed.agent.xdp_mode == XdpMode::Generic);
        ensure!(parsed.agent.metrics_listen == file.agent.metrics_listen);
        Ok(())
    }

    #[test]
    fn a_file_without_services_passes_the_agents_check() -> Result<()> {
        let parsed = check(&ConfigFile::new(agent(Node::Lb)))?;
        ensure!(parsed.services.is_empty());
        Ok(())
    }
}
