//! Config: the agent's TOML file as typed values, serialised with the `toml` crate.
//!
//! The types mirror the agent's layout: `ConfigFile` holds `[agent]` (`AgentSection`),
//! `[[services]]` (`ServiceSection`, with `[services.health_check]` and
//! `[[services.backends]]`) and `[vrrp]` (`VrrpSection`). One field is one key, in
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
}

impl ConfigFile {
    /// A file with `agent` and no service.
    pub fn new(agent: AgentSection) -> Self {
        ConfigFile {
            agent,
            services: Vec::new(),
            vrrp: None,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring_size: Option<u32>,
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
    /// (backend number, weight)
    pub backends: Vec<(usize, u32)>,
    /// Backend numbers written with `backup = true`.
    pub backups: Vec<usize>,
    /// The `[services.health_check]` table; none means the agent's defaults.
    pub health_check: Option<HealthCheckSection>,
}

impl Service {
    pub fn new(name: &str, vip: impl Into<IpAddr>, port: u16) -> Self {
        Service {
            name: name.into(),
            vip: vip.into(),
            port,
            ring_size: None,
            backends: Vec::new(),
            backups: Vec::new(),
            health_check: None,
        }
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
                }
            })
            .collect();
        ServiceSection {
            name: self.name.clone(),
            vip: self.vip,
            port: self.port,
            ring_size: self.ring_size,
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
    /// this lab's temporary directory (`control_socket_of`, `state_dir_of`), so labs
    /// never share them and every agent of one node finds the admin state of the one
    /// before.
    pub fn config_file(&self, node: Node, xdp_mode: &str, services: &[Service]) -> ConfigFile {
        let agent = AgentSection::new(
            xdp_mode,
            &self.control_socket_of(node),
            &self.state_dir_of(node),
        );
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

