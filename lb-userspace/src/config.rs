//! The agent's TOML config: parsing, and validation that reports every error with its
//! place in the file. A config that fails here never reaches the data path.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use lb_common::{
    DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_FLOWS, MAX_NAT_FLOWS, MAX_PERSISTENT, MAX_PINNED_FLOWS,
    MAX_RING_SIZE, MAX_VIPS, NAT_DEFAULT_PORT_MAX, NAT_DEFAULT_PORT_MIN,
};
use serde::Deserialize;
use toml::Spanned;

/// Smallest ring we accept: below this Maglev cannot spread weights evenly.
pub const MIN_RING_SIZE: u32 = 101;
pub const DEFAULT_WEIGHT: u32 = 100;
pub const MAX_WEIGHT: u32 = 10_000;

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub agent: AgentConfig,
    pub services: Vec<Service>,
    /// Absent: standalone, always master.
    pub vrrp: Option<VrrpSettings>,
    /// Absent: no state shared with other LB hosts.
    pub sync: Option<SyncSettings>,
    /// Absent: no route kept for the VIPs (no ECMP / BGP announcement).
    pub announce: Option<AnnounceSettings>,
}

/// Host routes for the VIPs this host can serve, in a kernel table that a routing
/// daemon (BIRD) learns and announces (`crate::announce`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceSettings {
    /// The kernel routing table the agent owns (not 0, 253, 254 or 255).
    pub table: u32,
    /// How long the program keeps forwarding after a graceful withdrawal, so that the
    /// router has moved the flows elsewhere before this host stops.
    pub withdraw_grace_ms: u32,
}

pub const DEFAULT_WITHDRAW_GRACE_MS: u32 = 2000;
/// The kernel's reserved tables: unspec (0), default (253), main (254), local (255). A
/// VIP route there would steer this host's own traffic for the VIP into the agent's
/// device.
pub const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

/// State sharing with the other LB host(s): admin changes and flow pins (`crate::sync`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncSettings {
    /// The other LB hosts, all of one family, on the `[agent]` interface's segment.
    pub peers: Vec<IpAddr>,
    /// The shared HMAC key (at least 16 bytes; mode 0600).
    pub key_file: PathBuf,
    pub port: u16,
}

pub const DEFAULT_SYNC_PORT: u16 = 7947;

/// Peering with a second LB host (VRRP version 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VrrpSettings {
    pub router_id: u8,
    pub priority: u8,
    pub advert_interval_ms: u32,
    pub preempt: bool,
    pub preempt_delay_ms: u32,
    /// Unicast peers; empty: multicast.
    pub peers: Vec<IpAddr>,
    pub auth_key_file: Option<PathBuf>,
    pub notify: Option<PathBuf>,
    /// SCHED_FIFO priority of the speaker's thread (1 to 99); 0: an ordinary thread.
    pub rt_priority: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    pub interface: String,
    pub xdp_mode: XdpMode,
    /// Unix socket `lbctl` talks to.
    pub control_socket: PathBuf,
    /// Where admin state (disabled backends, weights set by `lbctl`) is kept.
    pub state_dir: PathBuf,
    /// A flow with no packet for this long no longer counts as active.
    pub flow_idle_timeout_s: u32,
    /// Flood guard: new flows one CPU records in the connection table per second;
    /// beyond it new flows are still forwarded but not recorded. 0: no limit.
    pub new_flows_per_cpu_s: u32,
    /// Size of the connection table (FLOWS); changing it needs a restart.
    pub max_flows: u32,
    /// Whether the config still sets `flow_lru`, which chose the LRU lists of the
    /// connection table while it was the kernel's LRU hash: read and ignored (the
    /// agent says so when it starts), so an older config still loads.
    pub obsolete_flow_lru: bool,
    /// Size of the pinned-flow table (PINNED); changing it needs a restart.
    pub max_pinned_flows: u32,
    /// Size of the persistence table (PERSIST, LRU); changing it needs a restart.
    pub max_persistent_clients: u32,
    /// Where the maps and the XDP link are pinned (`<bpffs_dir>/<interface>/v<layout>/`),
    /// so that they outlive the agent and the next one takes them over.
    pub bpffs_dir: PathBuf,
    /// Where `/metrics` is served (Prometheus text format); absent: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Size of the NAT flow table (and of its reverse twin); changing it needs a restart.
    pub max_nat_flows: u32,
    /// Source ports the LB uses towards NAT backends, per (VIP, backend, port).
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// A NAT flow that saw FIN from both sides, or an RST, keeps its port this long
    /// (the backend's TIME_WAIT) before the port may serve another flow.
    pub nat_time_wait_s: u32,
}

pub const DEFAULT_MAX_NAT_FLOWS: u32 = MAX_NAT_FLOWS;
/// Linux's TIME_WAIT (`TCP_TIMEWAIT_LEN`): a backend that closed first holds VIP:nport
/// this long.
pub const DEFAULT_NAT_TIME_WAIT_S: u32 = 60;

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lb/lb.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/lb";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/lb";
pub const DEFAULT_FLOW_IDLE_TIMEOUT_S: u32 = 900;
/// 100,000 new flows per second on each CPU. One CPU of this data path can record about
/// 2 million SYNs a second (the bench: ~440 ns each), a SYN flood easily that many;
/// legitimate connection setups at an L4 LB are tens of thousands a second for the
/// whole host, spread over its CPUs by RSS, and each costs its backend a handshake (and
/// usually TLS) that is far dearer than our lookup. So legitimate load stays well below
/// the limit on any one CPU, while a flood records at most this many flows per CPU per
/// second instead of everything it sends.
pub const DEFAULT_NEW_FLOWS_PER_CPU_S: u32 = 100_000;
pub const DEFAULT_MAX_FLOWS: u32 = MAX_FLOWS;
pub const DEFAULT_MAX_PINNED_FLOWS: u32 = MAX_PINNED_FLOWS;
pub const DEFAULT_MAX_PERSISTENT_CLIENTS: u32 = MAX_PERSISTENT;
/// The longest `persistence_timeout_s`: one day, as for the flow idle timeout.
pub const MAX_PERSISTENCE_TIMEOUT_S: u32 = 86_400;
/// Flow-table sizes accepted: below this a table is useless, above it the memory (about
/// 200 bytes a flow with the kernel's own overhead) is more than an LB host should lock.
pub const MIN_FLOW_TABLE: u32 = 1024;
pub const MAX_FLOW_TABLE: u32 = 1 << 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode if the driver supports it, else generic.
    Auto,
    Native,
    Generic,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        })
    }
}

/// A backend's one identity in the agent: its service and its address (unique within a
/// service). Health, admin state, backend ids and flow pins are all keyed by it; names
/// are for people, so renaming a backend in the config keeps all of that.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, Deserialize)]
pub struct BackendId {
    pub service: String,
    pub address: IpAddr,
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.address)
    }
}

impl Config {
    /// The service and backend an operator names, if the config has them.
    pub fn find_backend(&self, service: &str, name: &str) -> Option<(&Service, &BackendSpec)> {
        let s = self.services.iter().find(|s| s.name == service)?;
        Some((s, s.backends.iter().find(|b| b.name == name)?))
    }

    /// The configured name of a backend, if it is still in the config.
    pub fn backend_name(&self, id: &BackendId) -> Option<&str> {
        let s = self.services.iter().find(|s| s.name == id.service)?;
        let b = s.backends.iter().find(|b| b.address == id.address)?;
        Some(&b.name)
    }
}

impl Service {
    pub fn backend_id(&self, backend: &BackendSpec) -> BackendId {
        BackendId {
            service: self.name.clone(),
            address: backend.address,
        }
    }
}

/// How a service's packets reach its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Forwarding {
    /// Direct server return: the client's packet as is, to the backend's MAC; the
    /// backend holds the VIP and answers the client itself.
    #[default]
    Dsr,
    /// Full NAT: `VIP:nport -> backend:bport`, replies translated back by the LB.
    Nat,
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Forwarding::Dsr => "dsr",
            Forwarding::Nat => "nat",
        })
    }
}

impl BackendSpec {
    /// The port the backend listens on: its own (NAT), else the service's.
    pub fn port_in(&self, service: &Service) -> u16 {
        self.port.unwrap_or(service.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub forwarding: Forwarding,
    pub ring_size: u32,
    /// A client address keeps its backend for new connections until this long after
    /// its last one (LVS `persistence_timeout`). 0: off, every connection takes the ring.
    pub persistence_timeout_s: u32,
    pub health_check: HealthCheck,
    pub backends: Vec<BackendSpec>,
}

/// TCP connect checks from the LB host to each backend's address and the service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Passes in a row that bring a down backend up.
    pub rise: u32,
    /// Failures in a row that take an up backend down.
    pub fall: u32,
}

impl Default for HealthCheck {
    /// A dead backend is seen within about 3 x 200 ms.
    fn default() -> Self {
        Self {
            interval_ms: 200,
            timeout_ms: 200,
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub address: IpAddr,
    pub weight: u32,
    /// Takes new flows only while no primary backend of the service is usable.
    pub backup: bool,
    /// NAT only: the backend's port; `None`: the service's.
    pub port: Option<u16>,
}

/// One problem in a config file, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line and column, when known.
    pub line: Option<(usize, usize)>,
    /// Dotted path of the key, e.g. `services[0].backends[1].weight`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((line, col)) = self.line {
            write!(f, "line {line}, column {col}: ")?;
        }
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every error found in one config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub source_name: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{}: {n} error{}",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {}: {e}", self.source_name)?;
        }
        Ok(())
    }
}

// The raw shape of the file. Every value is optional and spanned so that validation,
// not serde, decides what is missing and can say where.
#[derive(Deserialize)]
struct RawConfig {
    agent: Option<Spanned<RawAgent>>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
    vrrp: Option<Spanned<RawVrrp>>,
    sync: Option<Spanned<RawSync>>,
    announce: Option<Spanned<RawAnnounce>>,
}

#[derive(Deserialize)]
struct RawAnnounce {
    table: Option<Spanned<i64>>,
    withdraw_grace_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
struct RawSync {
    #[serde(default)]
    peers: Vec<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
struct RawVrrp {
    router_id: Option<Spanned<i64>>,
    priority: Option<Spanned<i64>>,
    advert_interval_ms: Option<Spanned<i64>>,
    preempt: Option<Spanned<bool>>,
    preempt_delay_ms: Option<Spanned<i64>>,
    #[serde(default)]
    peers: Vec<Spanned<String>>,
    auth_key_file: Option<Spanned<String>>,
    notify: Option<Spanned<String>>,
    rt_priority: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
struct RawAgent {
    interface: Option<Spanned<String>>,
    xdp_mode: Option<Spanned<String>>,
    control_socket: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    flow_idle_timeout_s: Option<Spanned<i64>>,
    new_flows_per_cpu_s: Option<Spanned<i64>>,
    max_flows: Option<Spanned<i64>>,
    /// Obsolete (see `AgentConfig::obsolete_flow_lru`): any value is accepted.
    flow_lru: Option<toml::Value>,
    max_pinned_flows: Option<Spanned<i64>>,
    max_persistent_clients: Option<Spanned<i64>>,
    bpffs_dir: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    max_nat_flows: Option<Spanned<i64>>,
    nat_port_min: Option<Spanned<i64>>,
    nat_port_max: Option<Spanned<i64>>,
    nat_time_wait_s: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
struct RawService {
    name: Option<Spanned<String>>,
    vip: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    forwarding: Option<Spanned<String>>,
    ring_size: Option<Spanned<i64>>,
    persistence_timeout_s: Option<Spanned<i64>>,
    health_check: Option<Spanned<RawHealthCheck>>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
struct RawHealthCheck {
    interval_ms: Option<Spanned<i64>>,
    timeout_ms: Option<Spanned<i64>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
struct RawBackend {
    name: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
    backup: Option<Spanned<bool>>,
    port: Option<Spanned<i64>>,
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &name),
        Err(e) => Err(ConfigErrors {
            source_name: name,
            errors: vec![ConfigError {
                line: None,
                path: String::new(),
                message: format!("cannot read: {e}"),
            }],
        }),
    }
}

/// Parses and validates config text; `source_name` names it in errors.
pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigErrors> {
    let mut v = Validator {
        text,
        errors: Vec::new(),
    };
    let raw = v.deserialize();
    let config = raw.and_then(|raw| v.validate(raw));
    match config {
        Some(c) if v.errors.is_empty() => Ok(c),
        _ => Err(ConfigErrors {
            source_name: source_name.to_string(),
            errors: v.errors,
        }),
    }
}

struct Validator<'a> {
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn place(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, col)
    }

    fn err_at(
        &mut self,
        span: Option<std::ops::Range<usize>>,
        path: &str,
        message: impl Into<String>,
    ) {
        let line = span.map(|s| self.place(s.start));
        self.errors.push(ConfigError {
            line,
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn err<T>(&mut self, value: &Spanned<T>, path: &str, message: impl Into<String>) {
        self.err_at(Some(value.span()), path, message);
    }

    fn deserialize(&mut self) -> Option<RawConfig> {
        let de = match toml::Deserializer::parse(self.text) {
            Ok(de) => de,
            Err(e) => {
                self.err_at(e.span(), "", e.message().trim().to_string());
                return None;
            }
        };
        let mut unknown = Vec::new();
        let raw: Result<RawConfig, _> =
            serde_ignored::deserialize(de, |path| unknown.push(path.to_string()));
        for path in unknown {
            let span = self.find_key(&path);
            self.err_at(span, &display_path(&path), "unknown key");
        }
        match raw {
            Ok(raw) => Some(raw),
            Err(e) => {
                self.err_at(e.span(), "", e.message().trim().to_string());
                None
            }
        }
    }

    /// Best effort: the first line that assigns or opens the key's last component.
    fn find_key(&self, path: &str) -> Option<std::ops::Range<usize>> {
        let last = path.rsplit('.').next()?;
        let mut offset = 0;
        for line in self.text.split_inclusive('\n') {
            let t = line.trim_start();
            let key = t
                .trim_start_matches('[')
                .split(['=', ']'])
                .next()
                .unwrap_or("")
                .trim();
            let key = key.rsplit('.').next().unwrap_or(key).trim_matches('"');
            if key == last {
                let start = offset + (line.len() - t.len());
                return Some(start..start);
            }
            offset += line.len();
        }
        None
    }

    fn required<'r, T>(
        &mut self,
        v: &'r Option<Spanned<T>>,
        table_span: std::ops::Range<usize>,
        path: &str,
    ) -> Option<&'r Spanned<T>> {
        if v.is_none() {
            self.err_at(Some(table_span), path, "missing (required)");
        }
        v.as_ref()
    }

    fn validate(&mut self, raw: RawConfig) -> Option<Config> {
        let agent = match &raw.agent {
            None => {
                self.err_at(None, "agent", "missing [agent] table");
                None
            }
            Some(a) => self.agent(a),
        };
        if raw.services.len() > MAX_VIPS as usize {
            self.err_at(
                None,
                "services",
                format!("{} services; at most {MAX_VIPS}", raw.services.len()),
            );
        }
        let mut services = Vec::new();
        let mut names = HashSet::new();
        let mut vips = HashMap::new();
        let mut total_backends = 0;
        for (i, s) in raw.services.iter().enumerate() {
            let path = format!("services[{i}]");
            total_backends += s.get_ref().backends.len();
            if let Some(svc) = self.service(s, &path) {
                if !names.insert(svc.name.clone()) {
                    self.err_at(
                        Some(s.span()),
                        &format!("{path}.name"),
                        format!("service name {:?} is used twice", svc.name),
                    );
                }
                if let Some(other) = vips.insert((svc.vip, svc.port), svc.name.clone()) {
                    self.err_at(
                        Some(s.span()),
                        &format!("{path}.vip"),
                        format!(
                            "{}:{} is already the VIP of service {other:?}",
                            svc.vip, svc.port
                        ),
                    );
                }
                services.push(svc);
            }
        }
        if total_backends > MAX_BACKENDS as usize {
            self.err_at(
                None,
                "services",
                format!("{total_backends} backends in all; at most {MAX_BACKENDS}"),
            );
        }
        let vrrp = match &raw.vrrp {
            None => Some(None),
            Some(v) => self.vrrp(v, &services).map(Some),
        };
        let peers = match &vrrp {
            Some(Some(v)) => v.peers.clone(),
            _ => Vec::new(),
        };
        let sync = match &raw.sync {
            None => Some(None),
            Some(v) => self.sync(v).map(Some),
        };
        // Also when [sync] has errors of its own: each address is checked once.
        let sync_peers: Vec<IpAddr> = raw
            .sync
            .iter()
            .flat_map(|s| s.get_ref().peers.iter())
            .filter_map(|p| p.get_ref().parse().ok())
            .collect();
        self.backends_elsewhere(&raw, &services, &peers, &sync_peers);
        let announce = match &raw.announce {
            None => Some(None),
            Some(v) => self.announce(v).map(Some),
        };
        Some(Config {
            agent: agent?,
            services,
            vrrp: vrrp?,
            sync: sync?,
            announce: announce?,
        })
    }

    fn announce(&mut self, v: &Spanned<RawAnnounce>) -> Option<AnnounceSettings> {
        let raw = v.get_ref();
        let table = self
            .required(&raw.table, v.span(), "announce.table")
            .and_then(|t| match u32::try_from(*t.get_ref()) {
                Ok(n) if RESERVED_TABLES.contains(&n) => {
                    self.err(
                        t,
                        "announce.table",
                        format!(
                            "{n} is a table of the kernel's own (0 unspec, 253 default, 254 main, 255 local); give the agent a table of its own"
                        ),
                    );
                    None
                }
                Ok(n) => Some(n),
                Err(_) => {
                    self.err(
                        t,
                        "announce.table",
                        format!("{} is not a routing table (1 to 4294967295)", t.get_ref()),
                    );
                    None
                }
            });
        let withdraw_grace_ms = self.number(
            &raw.withdraw_grace_ms,
            "announce.withdraw_grace_ms",
            DEFAULT_WITHDRAW_GRACE_MS,
            0,
            600_000,
        );
        Some(AnnounceSettings {
            table: table?,
            withdraw_grace_ms: withdraw_grace_ms?,
        })
    }

    fn sync(&mut self, v: &Spanned<RawSync>) -> Option<SyncSettings> {
        let raw = v.get_ref();
        if raw.peers.is_empty() {
            self.err_at(
                Some(v.span()),
                "sync.peers",
                "missing or empty (required: the other LB host(s))",
            );
        }
        let mut peers: Vec<IpAddr> = Vec::new();
        let mut ok = true;
        for (i, p) in raw.peers.iter().enumerate() {
            let path = format!("sync.peers[{i}]");
            let Some(ip) = self.ip(p, &path) else {
                ok = false;
                continue;
            };
            if let Some(first) = peers.first()
                && first.is_ipv4() != ip.is_ipv4()
            {
                self.err(
                    p,
                    &path,
                    format!("{ip}: every peer must be of one family (the first is {first})"),
                );
                ok = false;
            } else if peers.contains(&ip) {
                self.err(p, &path, format!("{ip} is listed twice"));
                ok = false;
            } else {
                peers.push(ip);
            }
        }
        let key_file = self
            .required(&raw.key_file, v.span(), "sync.key_file")
            .is_some()
            .then(|| self.path(&raw.key_file, "sync.key_file", ""))
            .flatten();
        let port = self
            .number(
                &raw.port,
                "sync.port",
                u32::from(DEFAULT_SYNC_PORT),
                1,
                65_535,
            )
            .and_then(|p| u16::try_from(p).ok());
        if !ok || peers.is_empty() {
            return None;
        }
        Some(SyncSettings {
            peers,
            key_file: key_file?,
            port: port?,
        })
    }

    fn vrrp(&mut self, v: &Spanned<RawVrrp>, services: &[Service]) -> Option<VrrpSettings> {
        let raw = v.get_ref();
        let router_id = self
            .required(&raw.router_id, v.span(), "vrrp.router_id")
            .and_then(|r| match u8::try_from(*r.get_ref()) {
                Ok(id) if id >= 1 => Some(id),
                _ => {
                    self.err(
                        r,
                        "vrrp.router_id",
                        format!("{} is not a router id (1 to 255)", r.get_ref()),
                    );
                    None
                }
            });
        let priority = self
            .required(&raw.priority, v.span(), "vrrp.priority")
            .and_then(|p| match u8::try_from(*p.get_ref()) {
                Ok(n) if (1..=254).contains(&n) => Some(n),
                _ => {
                    self.err(p, "vrrp.priority", format!("{} is not a priority (1 to 254; 255 is for an address owner, which an LB is not)", p.get_ref()));
                    None
                }
            });
        // Sent in centiseconds in a 12-bit field.
        let advert_interval_ms = match &raw.advert_interval_ms {
            Some(i) if *i.get_ref() % 10 != 0 => {
                self.err(
                    i,
                    "vrrp.advert_interval_ms",
                    format!(
                        "{} is not a multiple of 10 (adverts carry centiseconds)",
                        i.get_ref()
                    ),
                );
                None
            }
            // 100 ms: a dead master is replaced in about a third of a second.
            other => self.number(other, "vrrp.advert_interval_ms", 100, 10, 40_950),
        };
        let preempt = raw.preempt.as_ref().is_none_or(|p| *p.get_ref());
        let preempt_delay_ms = self.number(
            &raw.preempt_delay_ms,
            "vrrp.preempt_delay_ms",
            0,
            0,
            3_600_000,
        );
        let family_v4 = services.first().is_none_or(|s| s.vip.is_ipv4());
        let mut peers = Vec::new();
        for (i, p) in raw.peers.iter().enumerate() {
            let path = format!("vrrp.peers[{i}]");
            if let Some(ip) = self.ip(p, &path) {
                if ip.is_ipv4() != family_v4 {
                    self.err(
                        p,
                        &path,
                        format!(
                            "{ip}: adverts go over {} (the family of the first service's VIP)",
                            if family_v4 { "IPv4" } else { "IPv6" }
                        ),
                    );
                } else {
                    peers.push(ip);
                }
            }
        }
        let auth_key_file = match &raw.auth_key_file {
            None => Some(None),
            Some(_) => self
                .path(&raw.auth_key_file, "vrrp.auth_key_file", "")
                .map(Some),
        };
        let notify = match &raw.notify {
            None => Some(None),
            Some(_) => self.path(&raw.notify, "vrrp.notify", "").map(Some),
        };
        // SCHED_FIFO 1 to 99, as keepalived's vrrp_rt_priority. 10: above every ordinary
        // task (load, builds, the agent's own loop), below the kernel's interrupt
        // threads (50) that deliver the adverts; the speaker sleeps between events, so
        // it cannot starve the rest. 0 turns it off.
        let rt_priority = self
            .number(&raw.rt_priority, "vrrp.rt_priority", 10, 0, 99)
            .and_then(|p| u8::try_from(p).ok());
        if peers.len() != raw.peers.len() {
            return None;
        }
        Some(VrrpSettings {
            router_id: router_id?,
            priority: priority?,
            advert_interval_ms: advert_interval_ms?,
            preempt,
            preempt_delay_ms: preempt_delay_ms?,
            peers,
            auth_key_file: auth_key_file?,
            notify: notify?,
            rt_priority: rt_priority?,
        })
    }

    fn agent(&mut self, a: &Spanned<RawAgent>) -> Option<AgentConfig> {
        let span = a.span();
        let raw = a.get_ref();
        let interface = self.required(&raw.interface, span.clone(), "agent.interface").and_then(|i| {
            let name = i.get_ref();
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                self.err(i, "agent.interface", format!("{name:?} is not an interface name (1 to 15 characters, no '/' or space)"));
                None
            } else {
                Some(name.clone())
            }
        });
        let xdp_mode = self.choice(
            &raw.xdp_mode,
            "agent.xdp_mode",
            XdpMode::Auto,
            &[
                ("auto", XdpMode::Auto),
                ("native", XdpMode::Native),
                ("generic", XdpMode::Generic),
            ],
        );
        let control_socket = self.path(
            &raw.control_socket,
            "agent.control_socket",
            DEFAULT_CONTROL_SOCKET,
        );
        let state_dir = self.path(&raw.state_dir, "agent.state_dir", DEFAULT_STATE_DIR);
        let bpffs_dir = self.path(&raw.bpffs_dir, "agent.bpffs_dir", DEFAULT_BPFFS_DIR);
        let flow_idle_timeout_s = self.number(
            &raw.flow_idle_timeout_s,
            "agent.flow_idle_timeout_s",
            DEFAULT_FLOW_IDLE_TIMEOUT_S,
            1,
            86_400,
        );
        let new_flows_per_cpu_s = self.number(
            &raw.new_flows_per_cpu_s,
            "agent.new_flows_per_cpu_s",
            DEFAULT_NEW_FLOWS_PER_CPU_S,
            0,
            100_000_000,
        );
        let max_flows = self.number(
            &raw.max_flows,
            "agent.max_flows",
            DEFAULT_MAX_FLOWS,
            MIN_FLOW_TABLE,
            MAX_FLOW_TABLE,
        );
        let max_pinned_flows = self.number(
            &raw.max_pinned_flows,
            "agent.max_pinned_flows",
            DEFAULT_MAX_PINNED_FLOWS,
            MIN_FLOW_TABLE,
            MAX_FLOW_TABLE,
        );
        let max_persistent_clients = self.number(
            &raw.max_persistent_clients,
            "agent.max_persistent_clients",
            DEFAULT_MAX_PERSISTENT_CLIENTS,
            MIN_FLOW_TABLE,
            MAX_FLOW_TABLE,
        );
        let metrics_listen = match &raw.metrics_listen {
            None => Some(None),
            Some(m) => match m.get_ref().parse::<SocketAddr>() {
                Ok(a) if a.port() == 0 => {
                    self.err(
                        m,
                        "agent.metrics_listen",
                        format!("{a}: port 0 is not a port to scrape"),
                    );
                    None
                }
                Ok(a) if a.ip().is_multicast() => {
                    self.err(
                        m,
                        "agent.metrics_listen",
                        format!("{a}: a multicast address cannot be listened on"),
                    );
                    None
                }
                Ok(a) => Some(Some(a)),
                Err(_) => {
                    self.err(
                        m,
                        "agent.metrics_listen",
                        format!(
                            "{:?} is not an address and port such as \"127.0.0.1:9721\" or \"[::1]:9721\"",
                            m.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let max_nat_flows = self.number(
            &raw.max_nat_flows,
            "agent.max_nat_flows",
            DEFAULT_MAX_NAT_FLOWS,
            MIN_FLOW_TABLE,
            MAX_FLOW_TABLE,
        );
        let nat_port_min = self.number(
            &raw.nat_port_min,
            "agent.nat_port_min",
            NAT_DEFAULT_PORT_MIN as u32,
            1,
            65535,
        );
        let nat_port_max = self.number(
            &raw.nat_port_max,
            "agent.nat_port_max",
            NAT_DEFAULT_PORT_MAX as u32,
            1,
            65535,
        );
        if let (Some(min), Some(max)) = (nat_port_min, nat_port_max)
            && min > max
        {
            self.err_at(
                raw.nat_port_max
                    .as_ref()
                    .map(|m| m.span())
                    .or(Some(span.clone())),
                "agent.nat_port_max",
                format!("{max} is below agent.nat_port_min ({min})"),
            );
        }
        let nat_time_wait_s = self.number(
            &raw.nat_time_wait_s,
            "agent.nat_time_wait_s",
            DEFAULT_NAT_TIME_WAIT_S,
            0,
            3600,
        );
        Some(AgentConfig {
            max_nat_flows: max_nat_flows?,
            nat_port_min: nat_port_min? as u16,
            nat_port_max: nat_port_max? as u16,
            nat_time_wait_s: nat_time_wait_s?,
            interface: interface?,
            xdp_mode: xdp_mode?,
            control_socket: control_socket?,
            state_dir: state_dir?,
            flow_idle_timeout_s: flow_idle_timeout_s?,
            new_flows_per_cpu_s: new_flows_per_cpu_s?,
            max_flows: max_flows?,
            obsolete_flow_lru: raw.flow_lru.is_some(),
            max_pinned_flows: max_pinned_flows?,
            max_persistent_clients: max_persistent_clients?,
            bpffs_dir: bpffs_dir?,
            metrics_listen: metrics_listen?,
        })
    }

    /// A backend must be a host of its own: a VIP's traffic sent to a VIP, or to the
    /// peer LB, would come back to an LB instead of reaching a server.
    fn backends_elsewhere(
        &mut self,
        raw: &RawConfig,
        services: &[Service],
        peers: &[IpAddr],
        sync_peers: &[IpAddr],
    ) {
        let vips: HashMap<IpAddr, &str> =
            services.iter().map(|s| (s.vip, s.name.as_str())).collect();
        for (i, s) in raw.services.iter().enumerate() {
            for (j, b) in s.get_ref().backends.iter().enumerate() {
                let Some(a) = &b.get_ref().address else {
                    continue;
                };
                // Unparsable addresses were reported already.
                let Ok(addr) = a.get_ref().parse::<IpAddr>() else {
                    continue;
                };
                let path = format!("services[{i}].backends[{j}].address");
                if let Some(service) = vips.get(&addr) {
                    self.err(
                        a,
                        &path,
                        format!("{addr} is the VIP of service {service:?}, not a backend"),
                    );
                } else if peers.contains(&addr) {
                    self.err(
                        a,
                        &path,
                        format!("{addr} is a VRRP peer (another LB host), not a backend"),
                    );
                } else if sync_peers.contains(&addr) {
                    self.err(
                        a,
                        &path,
                        format!("{addr} is a sync peer (another LB host), not a backend"),
                    );
                }
            }
        }
    }

    /// An absolute path, or the default when absent.
    fn path(&mut self, v: &Option<Spanned<String>>, path: &str, default: &str) -> Option<PathBuf> {
        match v {
            None => Some(PathBuf::from(default)),
            Some(p) if p.get_ref().starts_with('/') => Some(PathBuf::from(p.get_ref())),
            Some(p) => {
                self.err(
                    p,
                    path,
                    format!("{:?} must be an absolute path", p.get_ref()),
                );
                None
            }
        }
    }

    /// An integer in `min..=max`, or the default when absent.
    fn number(
        &mut self,
        v: &Option<Spanned<i64>>,
        path: &str,
        default: u32,
        min: u32,
        max: u32,
    ) -> Option<u32> {
        match v {
            None => Some(default),
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(x) if (min..=max).contains(&x) => Some(x),
                _ => {
                    self.err(
                        n,
                        path,
                        format!("{} is out of range ({min} to {max})", n.get_ref()),
                    );
                    None
                }
            },
        }
    }

    /// One of `choices` by its name, or `default` when absent; any other string is an
    /// error naming the accepted ones (`"a", "b" or "c"`).
    fn choice<T: Copy>(
        &mut self,
        v: &Option<Spanned<String>>,
        path: &str,
        default: T,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let Some(v) = v else {
            return Some(default);
        };
        if let Some((_, value)) = choices.iter().find(|(name, _)| name == v.get_ref()) {
            return Some(*value);
        }
        let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
        let expected = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        self.err(v, path, format!("{:?}: expected {expected}", v.get_ref()));
        None
    }

    fn health_check(
        &mut self,
        h: &Option<Spanned<RawHealthCheck>>,
        path: &str,
    ) -> Option<HealthCheck> {
        let Some(h) = h else {
            return Some(HealthCheck::default());
        };
        let d = HealthCheck::default();
        let raw = h.get_ref();
        let interval_ms = self.number(
            &raw.interval_ms,
            &format!("{path}.interval_ms"),
            d.interval_ms,
            10,
            3_600_000,
        );
        let timeout_ms = self.number(
            &raw.timeout_ms,
            &format!("{path}.timeout_ms"),
            d.timeout_ms,
            1,
            3_600_000,
        );
        let rise = self.number(&raw.rise, &format!("{path}.rise"), d.rise, 1, 100);
        let fall = self.number(&raw.fall, &format!("{path}.fall"), d.fall, 1, 100);
        Some(HealthCheck {
            interval_ms: interval_ms?,
            timeout_ms: timeout_ms?,
            rise: rise?,
            fall: fall?,
        })
    }

    fn ip(&mut self, v: &Spanned<String>, path: &str) -> Option<IpAddr> {
        match v.get_ref().parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
                self.err(v, path, format!("{ip} cannot be used here"));
                None
            }
            Ok(ip) => Some(ip),
            Err(_) => {
                self.err(
                    v,
                    path,
                    format!("{:?} is not an IPv4 or IPv6 address", v.get_ref()),
                );
                None
            }
        }
    }

    fn service(&mut self, s: &Spanned<RawService>, path: &str) -> Option<Service> {
        let span = s.span();
        let raw = s.get_ref();
        let name = self
            .required(&raw.name, span.clone(), &format!("{path}.name"))
            .and_then(|n| self.name(n, &format!("{path}.name")));
        let vip = self
            .required(&raw.vip, span.clone(), &format!("{path}.vip"))
            .and_then(|v| self.ip(v, &format!("{path}.vip")));
        let port = self
            .required(&raw.port, span.clone(), &format!("{path}.port"))
            .and_then(|p| match u16::try_from(*p.get_ref()) {
                Ok(port) if port > 0 => Some(port),
                _ => {
                    self.err(
                        p,
                        &format!("{path}.port"),
                        format!("{} is not a port (1 to 65535)", p.get_ref()),
                    );
                    None
                }
            });
        let forwarding = self.choice(
            &raw.forwarding,
            &format!("{path}.forwarding"),
            Forwarding::Dsr,
            &[("dsr", Forwarding::Dsr), ("nat", Forwarding::Nat)],
        );
        let ring_size = match &raw.ring_size {
            None => Some(DEFAULT_RING_SIZE),
            Some(r) => match u32::try_from(*r.get_ref()) {
                Ok(n) if (MIN_RING_SIZE..=MAX_RING_SIZE).contains(&n) && is_prime(n) => Some(n),
                _ => {
                    self.err(
                        r,
                        &format!("{path}.ring_size"),
                        format!(
                            "{} must be a prime from {MIN_RING_SIZE} to {MAX_RING_SIZE}",
                            r.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let persistence_timeout_s = self.number(
            &raw.persistence_timeout_s,
            &format!("{path}.persistence_timeout_s"),
            0,
            0,
            MAX_PERSISTENCE_TIMEOUT_S,
        );
        let health_check = self.health_check(&raw.health_check, &format!("{path}.health_check"));
        let mut backends = Vec::new();
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        let mut ok = true;
        for (j, b) in raw.backends.iter().enumerate() {
            let bpath = format!("{path}.backends[{j}]");
            match self.backend(b, &bpath) {
                Some(be) => {
                    if !names.insert(be.name.clone()) {
                        self.err_at(
                            Some(b.span()),
                            &format!("{bpath}.name"),
                            format!("backend name {:?} is used twice in this service", be.name),
                        );
                    }
                    if !addresses.insert(be.address) {
                        self.err_at(
                            Some(b.span()),
                            &format!("{bpath}.address"),
                            format!("{} is used twice in this service", be.address),
                        );
                    }
                    // A backend on any VIP, this one included, is `backends_elsewhere`'s.
                    if let Some(vip) = vip
                        && vip.is_ipv4() != be.address.is_ipv4()
                    {
                        let why = if forwarding == Some(Forwarding::Nat) {
                            "NAT translates addresses within one family"
                        } else {
                            "DSR forwards the client's packet as is"
                        };
                        self.err_at(
                            Some(b.span()),
                            &format!("{bpath}.address"),
                            format!(
                                "{} and the VIP {vip} are of different families ({why})",
                                be.address
                            ),
                        );
                    }
                    if let Some(p) = &b.get_ref().port
                        && forwarding == Some(Forwarding::Dsr)
                    {
                        self.err(
                            p,
                            &format!("{bpath}.port"),
                            "a backend port needs forwarding = \"nat\" (in DSR the backend gets the client's packet as is, to the service's port)",
                        );
                    }
                    backends.push(be);
                }
                None => ok = false,
            }
        }
        if let Some(m) = ring_size
            && backends.len() * 10 > m as usize
        {
            self.err_at(
                Some(span.clone()),
                &format!("{path}.ring_size"),
                format!(
                    "{m} slots for {} backends: need at least 10 slots per backend",
                    backends.len()
                ),
            );
        }
        if !ok {
            return None;
        }
        Some(Service {
            name: name?,
            vip: vip?,
            port: port?,
            forwarding: forwarding?,
            ring_size: ring_size?,
            persistence_timeout_s: persistence_timeout_s?,
            health_check: health_check?,
            backends,
        })
    }

    fn name(&mut self, n: &Spanned<String>, path: &str) -> Option<String> {
        let s = n.get_ref();
        if s.is_empty()
            || s.len() > 64
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            self.err(
                n,
                path,
                format!("{s:?}: names are 1 to 64 characters of letters, digits, '-', '_' or '.'"),
            );
            return None;
        }
        Some(s.clone())
    }

    fn backend(&mut self, b: &Spanned<RawBackend>, path: &str) -> Option<BackendSpec> {
        let span = b.span();
        let raw = b.get_ref();
        let name = self
            .required(&raw.name, span.clone(), &format!("{path}.name"))
            .and_then(|n| self.name(n, &format!("{path}.name")));
        let address = self
            .required(&raw.address, span.clone(), &format!("{path}.address"))
            .and_then(|a| self.ip(a, &format!("{path}.address")));
        let weight = match &raw.weight {
            None => Some(DEFAULT_WEIGHT),
            Some(w) => match u32::try_from(*w.get_ref()) {
                Ok(n) if n <= MAX_WEIGHT => Some(n),
                _ => {
                    self.err(
                        w,
                        &format!("{path}.weight"),
                        format!("{} is not a weight (0 to {MAX_WEIGHT})", w.get_ref()),
                    );
                    None
                }
            },
        };
        let backup = raw.backup.as_ref().is_some_and(|b| *b.get_ref());
        let port = match &raw.port {
            None => Some(None),
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(port) if port > 0 => Some(Some(port)),
                _ => {
                    self.err(
                        p,
                        &format!("{path}.port"),
                        format!("{} is not a port (1 to 65535)", p.get_ref()),
                    );
                    None
                }
            },
        };
        Some(BackendSpec {
            name: name?,
            address: address?,
            weight: weight?,
            backup,
            port: port?,
        })
    }
}

/// A backend whose address is one of this LB host's own (`own`: the interface's
/// addresses): its traffic would be sent back to ourselves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnBackend {
    pub service: String,
    pub backend: String,
    pub address: IpAddr,
}

/// Every backend of `config` whose address is in `own`, in config order.
pub fn backends_on_own_addresses(config: &Config, own: &[IpAddr]) -> Vec<OwnBackend> {
    config
        .services
        .iter()
        .flat_map(|s| {
            s.backends
                .iter()
                .filter(|b| own.contains(&b.address))
                .map(|b| OwnBackend {
                    service: s.name.clone(),
                    backend: b.name.clone(),
                    address: b.address,
                })
        })
        .collect()
}

impl fmt::Display for OwnBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backend {:?} of service {:?} has {}, an address of this host",
            self.backend, self.service, self.address
        )
    }
}

/// `services.0.backends.1.wieght` -> `services[0].backends[1].wieght`
fn display_path(path: &str) -> String {
    let mut out = String::new();
    for part in path
        .split('.')
        .filter(|p| !p.starts_with("$__serde_spanned"))
    {
        if part.chars().all(|c| c.is_ascii_digit()) && !part.is_empty() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
interface = "eth0"
xdp_mode = "native"

[[services]]
name = "web"
vip = "192.0.2.10"
port = 80

[[services.backends]]
name = "web-1"
address = "192.0.2.21"

[[services.backends]]
name = "web-2"
address = "192.0.2.22"
weight = 300
"#;

    #[test]
    fn parses_a_good_config_with_defaults() {
        let c = parse(GOOD, "t").expect("valid");
        assert_eq!(c.agent.interface, "eth0");
        assert_eq!(c.agent.xdp_mode, XdpMode::Native);
        let s = &c.services[0];
        assert_eq!(s.ring_size, DEFAULT_RING_SIZE);
        assert_eq!(s.backends[0].weight, DEFAULT_WEIGHT);
        assert_eq!(s.backends[1].weight, 300);
        assert_eq!(s.vip, "192.0.2.10".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn persistence_is_off_by_default_and_bounded() {
        let c = parse(GOOD, "t").expect("valid");
        assert_eq!(c.services[0].persistence_timeout_s, 0);
        assert_eq!(
            c.agent.max_persistent_clients,
            DEFAULT_MAX_PERSISTENT_CLIENTS
        );
        let with = |timeout: &str, size: &str| {
            let text = GOOD
                .replace(
                    "port = 80\n",
                    &format!("port = 80\npersistence_timeout_s = {timeout}\n"),
                )
                .replace(
                    "[agent]\n",
                    &format!("[agent]\nmax_persistent_clients = {size}\n"),
                );
            parse(&text, "t")
        };
        let c = with("300", "100000").expect("valid");
        assert_eq!(c.services[0].persistence_timeout_s, 300);
        assert_eq!(c.agent.max_persistent_clients, 100_000);
        for (timeout, size, what) in [
            ("-1", "4096", "services[0].persistence_timeout_s"),
            ("86401", "4096", "services[0].persistence_timeout_s"),
            ("10", "10", "agent.max_persistent_clients"),
        ] {
            let errs = with(timeout, size).expect_err("invalid").errors;
            let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            assert!(
                text.iter()
                    .any(|t| t.contains(what) && t.contains("out of range")),
                "{timeout} {size}: {text:?}"
            );
        }
    }

    #[test]
    fn reports_every_error_with_its_line() {
        let bad = r#"
[agent]
interface = "eth0"
xdp_mode = "fast"

[[services]]
name = "web"
vip = "192.0.2.300"
port = 0
ring_size = 1000

[[services.backends]]
name = "web-1"
address = "2001:db8::1"
wieght = 5
"#;
        let errs = parse(bad, "bad.toml").expect_err("invalid").errors;
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let joined = text.join("\n");
        assert!(
            joined.contains("line 4, column 12: agent.xdp_mode"),
            "{joined}"
        );
        assert!(
            joined.contains("line 8, column 7: services[0].vip"),
            "{joined}"
        );
        assert!(
            joined.contains("line 9, column 8: services[0].port"),
            "{joined}"
        );
        assert!(
            joined.contains("line 10, column 13: services[0].ring_size"),
            "{joined}"
        );
        assert!(
            joined.contains("line 15, column 1: services[0].backends[0].wieght: unknown key"),
            "{joined}"
        );
        assert_eq!(errs.len(), 5, "{joined}");
    }

    #[test]
    fn family_mismatch_and_duplicates_are_errors() {
        let bad = r#"
[agent]
interface = "eth0"
[[services]]
name = "web"
vip = "192.0.2.10"
port = 80
[[services.backends]]
name = "a"
address = "2001:db8::1"
[[services.backends]]
name = "a"
address = "192.0.2.20"
[[services.backends]]
name = "c"
address = "192.0.2.20"
[[services]]
name = "web"
vip = "192.0.2.10"
port = 80
"#;
        let errs = parse(bad, "t").expect_err("invalid").errors;
        let joined: String = errs.iter().map(|e| format!("{e}\n")).collect();
        assert!(joined.contains("different families"), "{joined}");
        assert!(
            joined.contains("backend name \"a\" is used twice"),
            "{joined}"
        );
        assert!(joined.contains("192.0.2.20 is used twice"), "{joined}");
        assert!(
            joined.contains("service name \"web\" is used twice"),
            "{joined}"
        );
        assert!(joined.contains("already the VIP of service"), "{joined}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let errs = parse("[[services]]\nport = 80\n", "t")
            .expect_err("invalid")
            .errors;
        let joined: String = errs.iter().map(|e| format!("{e}\n")).collect();
        assert!(joined.contains("missing [agent] table"), "{joined}");
        assert!(joined.contains("services[0].name: missing"), "{joined}");
        assert!(joined.contains("services[0].vip: missing"), "{joined}");
    }

    #[test]
    fn syntax_errors_have_a_place() {
        let errs = parse("[agent]\ninterface = \n", "t")
            .expect_err("invalid")
            .errors;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line.map(|l| l.0), Some(2), "{}", errs[0]);
    }

    #[test]
    fn type_errors_have_a_place() {
        let errs = parse("[agent]\ninterface = \"eth0\"\n[[services]]\nname = \"w\"\nvip = \"192.0.2.1\"\nport = \"80\"\n", "t")
            .expect_err("invalid")
            .errors;
        assert_eq!(errs[0].line.map(|l| l.0), Some(6), "{}", errs[0]);
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(101) && is_prime(2));
        assert!(!is_prime(65535) && !is_prime(1) && !is_prime(0) && !is_prime(1000));
    }

    #[test]
    fn shipped_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("config/ exists") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen > 0, "no config in {}", dir.display());
    }

    #[test]
    fn the_obsolete_flow_lru_key_is_read_and_ignored() {
        let c = parse(GOOD, "t").expect("valid");
        assert!(!c.agent.obsolete_flow_lru);
        for text in ["\"auto\"", "\"per-cpu\"", "\"shared\"", "\"percpu\""] {
            let set = GOOD.replace(
                "xdp_mode = \"native\"\n",
                &format!("xdp_mode = \"native\"\nflow_lru = {text}\n"),
            );
            let c = parse(&set, "t").expect("still valid");
            assert!(c.agent.obsolete_flow_lru, "{text}");
        }
    }

    #[test]
    fn flow_table_keys() {
        let c = parse(GOOD, "t").expect("valid");
        assert_eq!(
            (
                c.agent.new_flows_per_cpu_s,
                c.agent.max_flows,
                c.agent.max_pinned_flows
            ),
            (100_000, 262_144, 65_536)
        );
        let set = GOOD.replace(
            "xdp_mode = \"native\"\n",
            "xdp_mode = \"native\"\nnew_flows_per_cpu_s = 0\nmax_flows = 1048576\nmax_pinned_flows = 4096\n",
        );
        let c = parse(&set, "t").expect("valid");
        assert_eq!(
            (
                c.agent.new_flows_per_cpu_s,
                c.agent.max_flows,
                c.agent.max_pinned_flows
            ),
            (0, 1_048_576, 4096)
        );
        let bad = GOOD.replace(
            "xdp_mode = \"native\"\n",
            "xdp_mode = \"native\"\nnew_flows_per_cpu_s = -1\nmax_flows = 10\nmax_pinned_flows = 99999999999\n",
        );
        let errs = parse(&bad, "t").expect_err("invalid").errors;
        let joined: String = errs.iter().map(|e| format!("{e}\n")).collect();
        for want in [
            "line 5, column 23: agent.new_flows_per_cpu_s: -1 is out of range",
            "line 6, column 13: agent.max_flows: 10 is out of range (1024 to 16777216)",
            "line 7, column 20: agent.max_pinned_flows",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
        assert_eq!(errs.len(), 3, "{joined}");
    }

    #[test]
    fn metrics_listen_is_an_address_and_port() {
        assert_eq!(parse(GOOD, "t").expect("valid").agent.metrics_listen, None);
        for (value, want) in [
            ("127.0.0.1:9721", "127.0.0.1:9721"),
            ("[::1]:9721", "[::1]:9721"),
        ] {
            let set = GOOD.replace(
                "xdp_mode = \"native\"\n",
                &format!("xdp_mode = \"native\"\nmetrics_listen = \"{value}\"\n"),
            );
            let c = parse(&set, "t").expect("valid");
            assert_eq!(c.agent.metrics_listen, Some(want.parse().unwrap()));
        }
        for (value, want) in [
            (
                "localhost:9721",
                "line 5, column 18: agent.metrics_listen: \"localhost:9721\" is not an address and port such as \"127.0.0.1:9721\"",
            ),
            (
                "127.0.0.1",
                "agent.metrics_listen: \"127.0.0.1\" is not an address and port",
            ),
            (
                "127.0.0.1:0",
                "agent.metrics_listen: 127.0.0.1:0: port 0 is not a port to scrape",
            ),
            (
                "224.0.0.1:9721",
                "agent.metrics_listen: 224.0.0.1:9721: a multicast address",
            ),
        ] {
            let bad = GOOD.replace(
                "xdp_mode = \"native\"\n",
                &format!("xdp_mode = \"native\"\nmetrics_listen = \"{value}\"\n"),
            );
            let errs = parse(&bad, "t").expect_err("invalid").errors;
            let joined: String = errs.iter().map(|e| format!("{e}\n")).collect();
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
            assert_eq!(errs.len(), 1, "{joined}");
        }
    }

    #[test]
    fn a_backend_cannot_be_a_vip_or_a_vrrp_peer() {
        let bad = r#"
[agent]
interface = "eth0"
[[services]]
name = "web"
vip = "192.0.2.10"
port = 80
[[services.backends]]
name = "a"
address = "192.0.2.11"
[[services.backends]]
name = "b"
address = "192.0.2.7"
[[services.backends]]
name = "c"
address = "192.0.2.21"
[[services]]
name = "api"
vip = "192.0.2.11"
port = 443
[[services.backends]]
name = "d"
address = "192.0.2.11"
[vrrp]
router_id = 51
priority = 100
peers = ["192.0.2.7"]
"#;
        let errs = parse(bad, "t").expect_err("invalid").errors;
        let joined: String = errs.iter().map(|e| format!("{e}\n")).collect();
        assert!(
            joined.contains(
                "line 10, column 11: services[0].backends[0].address: 192.0.2.11 is the VIP of service \"api\""
            ),
            "{joined}"
        );
        assert!(
            joined.contains(
                "line 13, column 11: services[0].backends[1].address: 192.0.2.7 is a VRRP peer"
            ),
            "{joined}"
        );
        assert!(
            joined.contains(
                "line 23, column 11: services[1].backends[0].address: 192.0.2.11 is the VIP of service \"api\""
            ),
            "{joined}"
        );
        assert_eq!(errs.len(), 3, "{joined}");
    }

    #[test]
    fn backends_on_the_hosts_own_addresses_are_listed() {
        let c = parse(GOOD, "t").expect("valid");
        let own: Vec<IpAddr> = vec!["192.0.2.22".parse().unwrap(), "fe80::1".parse().unwrap()];
        let found = backends_on_own_addresses(&c, &own);
        assert_eq!(
            found,
            vec![OwnBackend {
                service: "web".into(),
                backend: "web-2".into(),
                address: "192.0.2.22".parse().unwrap(),
            }]
        );
        assert_eq!(
            found[0].to_string(),
            "backend \"web-2\" of service \"web\" has 192.0.2.22, an address of this host"
        );
        assert!(backends_on_own_addresses(&c, &["192.0.2.1".parse().unwrap()]).is_empty());
    }

    #[test]
    fn vrrp_section() {
        let base = "[agent]\ninterface = \"eth0\"\n[[services]]\nname = \"w\"\nvip = \"192.0.2.1\"\nport = 80\n";
        assert_eq!(parse(base, "t").unwrap().vrrp, None);
        let good = format!(
            "{base}[vrrp]\nrouter_id = 51\npriority = 100\nadvert_interval_ms = 100\npeers = [\"192.0.2.7\"]\nauth_key_file = \"/etc/lb/vrrp.key\"\n"
        );
        let v = parse(&good, "t").unwrap().vrrp.unwrap();
        assert_eq!(
            (
                v.router_id,
                v.priority,
                v.advert_interval_ms,
                v.preempt,
                v.preempt_delay_ms
            ),
            (51, 100, 100, true, 0)
        );
        assert_eq!(v.peers, vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(v.auth_key_file, Some(PathBuf::from("/etc/lb/vrrp.key")));
        assert_eq!(v.rt_priority, 10);
        let off = format!("{base}[vrrp]\nrouter_id = 51\npriority = 100\nrt_priority = 0\n");
        assert_eq!(parse(&off, "t").unwrap().vrrp.unwrap().rt_priority, 0);
        let bad = format!(
            "{base}[vrrp]\nrouter_id = 0\npriority = 255\nadvert_interval_ms = 105\npeers = [\"2001:db8::1\"]\nnotify = \"relative\"\nrt_priority = 100\n"
        );
        let errs = parse(&bad, "t").expect_err("invalid").errors;
        let joined: String = errs.iter().map(|e| format!("{e}\n")).collect();
        for want in [
            "line 8, column 13: vrrp.router_id",
            "line 9, column 12: vrrp.priority",
            "vrrp.advert_interval_ms: 105 is not a multiple of 10",
            "vrrp.peers[0]",
            "vrrp.notify",
            "vrrp.rt_priority: 100 is out of range (0 to 99)",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
        assert_eq!(errs.len(), 6, "{joined}");
    }

    #[test]
    fn sync_section() {
        let base = "[agent]\ninterface = \"eth0\"\n[[services]]\nname = \"w\"\nvip = \"192.0.2.1\"\nport = 80\n[[services.backends]]\nname = \"b\"\naddress = \"192.0.2.9\"\n";
        assert_eq!(parse(base, "t").unwrap().sync, None);
        let good = format!(
            "{base}[sync]\npeers = [\"192.0.2.7\", \"192.0.2.8\"]\nkey_file = \"/etc/lb/sync.key\"\n"
        );
        let s = parse(&good, "t").unwrap().sync.unwrap();
        assert_eq!(s.peers.len(), 2);
        assert_eq!(s.key_file, PathBuf::from("/etc/lb/sync.key"));
        assert_eq!(s.port, DEFAULT_SYNC_PORT);
        let v6 = format!("{base}[sync]\npeers = [\"fd00::3\"]\nkey_file = \"/k\"\nport = 9000\n");
        assert_eq!(parse(&v6, "t").unwrap().sync.unwrap().port, 9000);
        // Line 10 is [sync]; every error says where.
        let bad = format!(
            "{base}[sync]\npeers = [\"192.0.2.7\", \"fd00::3\", \"nope\", \"192.0.2.7\", \"192.0.2.9\"]\nkey_file = \"relative\"\nport = 70000\n"
        );
        let errs = parse(&bad, "t").expect_err("invalid").errors;
        let joined: String = errs.iter().map(|e| format!("{e}\n")).collect();
        for want in [
            "line 11, column 23: sync.peers[1]: fd00::3: every peer must be of one family",
            "line 11, column 34: sync.peers[2]: \"nope\" is not an IPv4 or IPv6 address",
            "sync.peers[3]: 192.0.2.7 is listed twice",
            "line 12, column 12: sync.key_file: \"relative\" must be an absolute path",
            "line 13, column 8: sync.port: 70000 is out of range (1 to 65535)",
            "line 9, column 11: services[0].backends[0].address: 192.0.2.9 is a sync peer",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
        assert_eq!(errs.len(), 6, "{joined}");
        let empty = format!("{base}[sync]\nport = 1\n");
        let errs = parse(&empty, "t").expect_err("invalid").errors;
        let joined: String = errs.iter().map(|e| format!("{e}\n")).collect();
        assert!(joined.contains("sync.peers: missing or empty"), "{joined}");
        assert!(
            joined.contains("sync.key_file: missing (required)"),
            "{joined}"
        );
        assert!(joined.starts_with("line 10"), "{joined}");
    }

    #[test]
    fn announce_section() {
        let base = "[agent]\ninterface = \"eth0\"\n[[services]]\nname = \"w\"\nvip = \"192.0.2.1\"\nport = 80\n";
        assert_eq!(parse(base, "t").unwrap().announce, None);
        let good = format!("{base}[announce]\ntable = 100\n");
        assert_eq!(
            parse(&good, "t").unwrap().announce,
            Some(AnnounceSettings {
                table: 100,
                withdraw_grace_ms: DEFAULT_WITHDRAW_GRACE_MS
            })
        );
        let high = format!("{base}[announce]\ntable = 4294967295\nwithdraw_grace_ms = 0\n");
        assert_eq!(
            parse(&high, "t").unwrap().announce,
            Some(AnnounceSettings {
                table: u32::MAX,
                withdraw_grace_ms: 0
            })
        );
        // Line 7 is [announce].
        for (table, want) in [
            (
                "254",
                "line 8, column 9: announce.table: 254 is a table of the kernel's own",
            ),
            ("255", "announce.table: 255 is a table of the kernel's own"),
            ("253", "announce.table: 253 is a table of the kernel's own"),
            ("0", "announce.table: 0 is a table of the kernel's own"),
            ("-1", "announce.table: -1 is not a routing table"),
            (
                "4294967296",
                "announce.table: 4294967296 is not a routing table",
            ),
        ] {
            let bad = format!("{base}[announce]\ntable = {table}\n");
            let errs = parse(&bad, "t").expect_err("invalid").errors;
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(errs[0].to_string().contains(want), "{}", errs[0]);
        }
        let missing = format!("{base}[announce]\nwithdraw_grace_ms = 700000\nport = 1\n");
        let errs = parse(&missing, "t").expect_err("invalid").errors;
        let joined: String = errs.iter().map(|e| format!("{e}\n")).collect();
        for want in [
            "line 7, column 1: announce.table: missing (required)",
            "line 8, column 21: announce.withdraw_grace_ms: 700000 is out of range (0 to 600000)",
            "port: unknown key",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
        assert_eq!(errs.len(), 3, "{joined}");
    }

    #[test]
    fn nat_services_and_backend_ports() {
        let nat = r#"
[agent]
interface = "eth0"
nat_port_min = 20000
nat_port_max = 29999
max_nat_flows = 4096

[[services]]
name = "api"
vip = "192.0.2.20"
port = 443
forwarding = "nat"

[[services.backends]]
name = "api-1"
address = "10.0.1.5"
port = 8443

[[services.backends]]
name = "api-2"
address = "10.0.1.6"

[[services]]
name = "web"
vip = "192.0.2.10"
port = 80

[[services.backends]]
name = "web-1"
address = "192.0.2.21"
"#;
        let c = parse(nat, "t").expect("valid");
        let (api, web) = (&c.services[0], &c.services[1]);
        assert_eq!(api.forwarding, Forwarding::Nat);
        assert_eq!(
            web.forwarding,
            Forwarding::Dsr,
            "DSR by default, beside NAT"
        );
        assert_eq!(api.backends[0].port_in(api), 8443);
        assert_eq!(
            api.backends[1].port_in(api),
            443,
            "the service's port by default"
        );
        assert_eq!(
            (
                c.agent.nat_port_min,
                c.agent.nat_port_max,
                c.agent.max_nat_flows
            ),
            (20000, 29999, 4096)
        );
        assert_eq!(c.agent.nat_time_wait_s, DEFAULT_NAT_TIME_WAIT_S);
        let defaults = parse(GOOD, "t").expect("valid").agent;
        assert_eq!(
            (defaults.nat_port_min, defaults.nat_port_max),
            (NAT_DEFAULT_PORT_MIN, NAT_DEFAULT_PORT_MAX)
        );

        // A backend port without NAT, an unknown mode, a port range upside down.
        let bad = r#"
[agent]
interface = "eth0"
nat_port_min = 3000
nat_port_max = 2000

[[services]]
name = "web"
vip = "192.0.2.10"
port = 80

[[services.backends]]
name = "web-1"
address = "192.0.2.21"
port = 8080

[[services]]
name = "other"
vip = "192.0.2.11"
port = 80
forwarding = "tunnel"
"#;
        let errs = parse(bad, "t").expect_err("invalid").errors;
        let joined: String = errs.iter().map(|e| format!("{e}\n")).collect();
        for want in [
            "line 5, column 16: agent.nat_port_max: 2000 is below agent.nat_port_min (3000)",
            "line 15, column 8: services[0].backends[0].port: a backend port needs forwarding = \"nat\"",
            "line 21, column 14: services[1].forwarding: \"tunnel\": expected \"dsr\" or \"nat\"",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
        assert_eq!(errs.len(), 3, "{joined}");
    }
}
