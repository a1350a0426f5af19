//! The agent: loads the XDP program, keeps its maps in step with the config, the health
//! of the backends, the operator's admin state and the neighbour table, and serves
//! `lbctl`. The maps and the program's link are pinned (`pins`): when the agent stops,
//! the program stays attached, and the next agent takes it over without a lost flow.
//!
//! Everything that changes state runs on one loop (`run`): health reports, control
//! requests, signals and the neighbour refresh arrive there over channels. What takes
//! time runs elsewhere: the flow tables are read by the scanner thread (`flows`), a
//! reload's MAC resolution and first health checks run on a task of their own and
//! only the finished result is applied on the loop, and the VRRP speaker has its own
//! thread. The loop itself never waits for the network.
//!
//! Every change of the data path is planned first (`Programmer::plan`: pure, no map
//! written) and then committed; a reload whose plan fails changes nothing, and one
//! whose commit fails is rolled back by committing the previous plan.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use lb_common::{
    CONFIG_F_TRACE, LbConfig, NAT_CFG_F_FIB, NatConfig,
    counters::{backend_slot, event, event_slot, global_slot, reason, vip_slot},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    admin::{AdminBackend, AdminState, Clock, Version, now_ms},
    announce::{self, Decision, Gate, kernel::Announcer},
    config::{
        self, BackendId, BackendSpec, Config, ConfigErrors, Forwarding, HealthCheck, MAX_WEIGHT,
        Service, XdpMode,
    },
    control::{self, Call},
    dataplane::{
        Attached, AttachedMode, DataPlane, FlowStore, MapSizes, ServeSwitch, XdpDataPlane,
    },
    flows::Scanner,
    health::{CheckResult, Health, Verdict, check_tcp},
    metrics::{
        self, CounterSource,
        server::{Limits, MetricsServer, Sources},
    },
    neigh::Neighbours,
    numbering::Numbering,
    pins::PinDir,
    programmer::{ApplyReport, BackendView, Plan, Programmer},
    protocol::{
        AnnounceStatus, BackendState, BackendStatus, FlowTableStatus, Request, Response,
        ServiceStatus, Status, VipAnnouncement,
    },
    sync::{self, Confirmation, SyncEvent, SyncHandle, wire::AdminEntry},
    trace::{TraceHub, TraceNames},
    tracking::{DataPathHealth, effective_priority, interface_up},
    vrrp::{self, StateChange, VrrpHandle},
};

/// How long start-up waits for backend MACs before serving with what it has.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);
/// How often the neighbour table is read again (new MACs, unresolved backends).
const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// How often tracking looks at the interface (a sysfs read).
const TRACK_EVERY: Duration = Duration::from_millis(100);

/// One health check's outcome, sent by a checker task to the main loop.
#[derive(Debug)]
pub struct HealthReport {
    backend: BackendId,
    target: SocketAddr,
    result: CheckResult,
}

#[derive(Clone)]
struct BackendHealth {
    target: SocketAddr,
    health: Health,
}

pub struct Agent<D: DataPlane = XdpDataPlane> {
    config_path: PathBuf,
    config: Config,
    dp: D,
    programmer: Programmer,
    /// The kernel's neighbour table; absent in tests, where every MAC is given.
    neigh: Option<Neighbours>,
    macs: HashMap<IpAddr, [u8; 6]>,
    mode: AttachedMode,
    started: Instant,
    admin: AdminState,
    health: HashMap<BackendId, BackendHealth>,
    checkers: Vec<JoinHandle<()>>,
    health_tx: mpsc::Sender<HealthReport>,
    /// The interface's MAC: the source of forwarded frames and of ARP/ND answers.
    mac: [u8; 6],
    /// Answering for the VIPs and forwarding: always when standalone, as master with VRRP
    /// (as the speaker last said: it flips the switch itself).
    serving: bool,
    /// Ours while standalone or until the VRRP speaker takes it.
    serve_switch: Option<Box<dyn ServeSwitch>>,
    /// Reads and pins flows on its own thread; its snapshot answers "how many active".
    scanner: Scanner,
    vrrp: Option<VrrpHandle>,
    /// The priority last handed to the VRRP speaker.
    advertised: Option<u8>,
    /// Shares admin state and flow pins with the other LB hosts (`[sync]`).
    sync: Option<SyncHandle>,
    /// Versions for admin changes made here.
    clock: Clock,
    /// The peers' acknowledgement of the admin change `handle` just made, for the loop
    /// to wait on beside it (`take_confirmation`).
    confirmation: Option<oneshot::Receiver<Confirmation>>,
    /// What the metrics endpoint shows of the services and backends, published after
    /// every change (`publish_metrics`): a scrape never asks this loop.
    metrics: Arc<ArcSwap<metrics::View>>,
    /// Keeps the routes of the VIPs this host can serve (`[announce]`).
    announcer: Option<Announcer>,
    /// A graceful stop has begun: every route is withdrawn, forwarding goes on.
    stopping: bool,
    /// `lbctl trace` clients and the events they get.
    trace: TraceHub,
    /// Whether the program's trace flag is set (while a trace client listens).
    tracing: bool,
    /// Reads the program's trace ring buffer (absent over a fake data path).
    trace_reader: Option<JoinHandle<()>>,
}

/// How long a starting host waits for its peers' admin state before VRRP starts.
const SYNC_CATCH_UP: Duration = Duration::from_millis(1500);

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("invalid config, nothing changed: {0}")]
    Invalid(ConfigErrors),
    #[error("{0}: restart the agent to apply it; nothing changed")]
    NeedsRestart(&'static str),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
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

pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
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

fn target(service: &Service, backend: &BackendSpec) -> SocketAddr {
    SocketAddr::new(backend.address, backend.port_in(service))
}

/// The NAT settings the program reads. `fib`: ask the kernel's FIB for next hops (the
/// agent on a host; the packet tests, outside any interface, go without).
pub fn nat_config(config: &Config, fib: bool) -> NatConfig {
    NatConfig {
        port_min: config.agent.nat_port_min,
        port_max: config.agent.nat_port_max,
        flags: if fib { NAT_CFG_F_FIB } else { 0 },
    }
}

/// `bpf_fib_lookup` answers only for an interface that forwards: NAT needs it to find
/// the next hop towards a backend behind a router. Failing that, NAT still reaches
/// backends on the interface's own segment (by their resolved MAC).
fn enable_forwarding(interface: &str) {
    for family in ["ipv4", "ipv6"] {
        let path = format!("/proc/sys/net/{family}/conf/{interface}/forwarding");
        match std::fs::read_to_string(&path) {
            Ok(v) if v.trim() == "1" => {}
            _ => match std::fs::write(&path, "1") {
                Ok(()) => tracing::info!(
                    "NAT: enabled {family} forwarding on {interface} (the FIB's next hops need it)"
                ),
                Err(e) => tracing::warn!(
                    "NAT: cannot enable {family} forwarding on {interface} ({path}: {e}); backends behind a router are unreachable"
                ),
            },
        }
    }
}

/// One structured event per health transition (`event = "health"`).
fn log_transition(service: &str, backend: &str, from: Verdict, to: Verdict, cause: &CheckResult) {
    match to {
        Verdict::Down => tracing::warn!(
            event = "health",
            service,
            backend,
            state = "down",
            cause = %cause,
            "service {service}: backend {backend} is down ({cause})"
        ),
        Verdict::Up if from == Verdict::Unknown => tracing::info!(
            event = "health",
            service,
            backend,
            state = "up",
            "service {service}: backend {backend} is up"
        ),
        Verdict::Up => tracing::info!(
            event = "health",
            service,
            backend,
            state = "up",
            "service {service}: backend {backend} is up again"
        ),
        Verdict::Unknown => {}
    }
}

/// What a reload gathered off the loop: the new config, the MACs of its backends, and
/// the first health check of each backend that is new (or has a new target).
pub struct PreparedReload {
    config: Config,
    macs: HashMap<IpAddr, [u8; 6]>,
    checks: Vec<(BackendId, SocketAddr, CheckResult)>,
}

/// A reload's slow half, to run on a task of its own.
pub type ReloadJob =
    std::pin::Pin<Box<dyn Future<Output = Result<PreparedReload, ReloadError>> + Send>>;

impl Agent<XdpDataPlane> {
    /// Loads, checks health, fills the maps, then attaches: the program never sees half
    /// a config, and traffic starts on backends known to be up.
    pub async fn start(
        config_path: &Path,
        config: Config,
        health_tx: mpsc::Sender<HealthReport>,
    ) -> Result<Self> {
        let interface = config.agent.interface.clone();
        let mac = interface_mac(&interface)?;
        // A backend on one of our own addresses would have its traffic sent back to us.
        let own = vrrp::net::interface_addresses(&interface)
            .with_context(|| format!("reading the addresses of {interface}"))?;
        let on_us = config::backends_on_own_addresses(&config, &own);
        if !on_us.is_empty() {
            let list: Vec<String> = on_us.iter().map(|b| b.to_string()).collect();
            anyhow::bail!(
                "refusing to start: {} ({interface}); a backend must be another host",
                list.join("; ")
            );
        }
        let (admin, unknown) = AdminState::load(&config.agent.state_dir, &config)?;
        if !unknown.is_empty() {
            // A file of the name-keyed format, naming backends the config no longer has.
            tracing::warn!(
                "admin state for backends no longer in the config dropped: {}",
                unknown.join(", ")
            );
        }
        let sizes = MapSizes {
            max_flows: config.agent.max_flows,
            max_pinned_flows: config.agent.max_pinned_flows,
            max_persistent_clients: config.agent.max_persistent_clients,
            max_nat_flows: config.agent.max_nat_flows,
        };
        // The maps (flow tables included) and the link outlive us: an earlier agent's
        // are taken over as they are, checked first.
        let pins = PinDir::new(&config.agent.bpffs_dir, &interface);
        let (mut dp, found) =
            XdpDataPlane::load_pinned(sizes, &pins).context("loading the XDP program")?;
        if found.maps {
            tracing::info!(
                "reusing the maps pinned at {}: flow tables kept",
                pins.dir().display()
            );
        }
        tracing::info!(
            "connection table: {} slots in buckets of {} (max_flows = {})",
            lb_common::flowtab::slots_for(config.agent.max_flows),
            lb_common::flowtab::FLOW_WAYS,
            config.agent.max_flows
        );
        if config.agent.obsolete_flow_lru {
            tracing::warn!(
                "[agent] flow_lru is ignored: the connection table is no longer the kernel's \
                 LRU hash but buckets the program keeps itself; remove the line"
            );
        }
        let serve_switch = dp
            .take_serve_switch()
            .context("the XDP object has no serving switch")?;
        let flow_store = dp
            .take_flow_store()
            .context("the XDP object has no flow tables")?;
        if config
            .services
            .iter()
            .any(|s| s.forwarding == Forwarding::Nat)
        {
            enable_forwarding(&interface);
        }
        let neigh = Neighbours::new(&interface)
            .with_context(|| format!("watching neighbours on {interface}"))?;
        let macs = neigh
            .resolve(&backend_addresses(&config), RESOLVE_WAIT)
            .await?;
        let trace_ring = dp.take_trace_ring();
        let mut agent = Agent::assemble(Parts {
            config_path: config_path.to_path_buf(),
            config,
            dp,
            serve_switch: Box::new(serve_switch),
            flow_store: Box::new(flow_store),
            neigh: Some(neigh),
            macs,
            admin,
            mac,
            health_tx,
        })?;
        if found.maps {
            // The maps hold flows under the ids the last agent gave out: keep them.
            match Numbering::load(&agent.config.agent.state_dir) {
                Ok(Some(numbering)) => agent.programmer.adopt(&numbering),
                Ok(None) => tracing::warn!(
                    "no saved numbering in {}: backend ids given out afresh, in config order",
                    agent.config.agent.state_dir.display()
                ),
                Err(e) => tracing::warn!("{e}: backend ids given out afresh, in config order"),
            }
        }
        if let Some(ring) = trace_ring {
            agent.trace_reader = Some(
                agent
                    .trace
                    .spawn_reader(ring)
                    .context("reading the trace ring buffer")?,
            );
        }
        agent.first_checks().await;
        agent.apply()?;
        // With VRRP, a host starts as backup: it serves once the election says so.
        agent.set_serving(agent.config.vrrp.is_none())?;
        let wanted = match agent.config.agent.xdp_mode {
            XdpMode::Auto => None,
            XdpMode::Native => Some(AttachedMode::Native),
            XdpMode::Generic => Some(AttachedMode::Generic),
        };
        match agent.dp.attach_pinned(&interface, wanted)? {
            Attached::New(mode) => {
                agent.mode = mode;
                tracing::info!(
                    "attached to {interface} in {mode} mode (xdp_mode = {}); link pinned at {}",
                    agent.config.agent.xdp_mode,
                    pins.link_path().display()
                );
            }
            Attached::Replaced(mode) => {
                agent.mode = mode.unwrap_or(AttachedMode::Generic);
                tracing::info!(
                    "took over the program on {interface}: replaced in its pinned link ({}), {} mode",
                    pins.link_path().display(),
                    agent.mode
                );
                if wanted.is_some_and(|w| Some(w) != mode) {
                    tracing::warn!(
                        "xdp_mode = {} but the pinned link is in {} mode: `lb-agent --detach` and a new start change it",
                        agent.config.agent.xdp_mode,
                        agent.mode
                    );
                }
            }
        }
        agent.publish_metrics();
        Ok(agent)
    }
}

/// Everything an agent is made of, for `Agent::assemble`.
pub struct Parts<D> {
    pub config_path: PathBuf,
    pub config: Config,
    pub dp: D,
    pub serve_switch: Box<dyn ServeSwitch>,
    pub flow_store: Box<dyn FlowStore>,
    pub neigh: Option<Neighbours>,
    pub macs: HashMap<IpAddr, [u8; 6]>,
    pub admin: AdminState,
    pub mac: [u8; 6],
    pub health_tx: mpsc::Sender<HealthReport>,
}

impl<D: DataPlane> Agent<D> {
    /// An agent over a loaded data path that nothing has written yet: writes the host
    /// config and starts the flow scanner. Health starts unknown; `first_checks` and
    /// `apply` follow.
    pub fn assemble(parts: Parts<D>) -> Result<Self> {
        let Parts {
            config_path,
            config,
            mut dp,
            serve_switch,
            flow_store,
            neigh,
            macs,
            admin,
            mac,
            health_tx,
        } = parts;
        dp.set_config(&host_config(mac, &config, false))?;
        dp.set_nat_config(&nat_config(&config, true))?;
        let idle = Duration::from_secs(u64::from(config.agent.flow_idle_timeout_s));
        let time_wait = Duration::from_secs(u64::from(config.agent.nat_time_wait_s));
        let scanner =
            Scanner::spawn_nat(flow_store, idle, time_wait).context("starting the flow scanner")?;
        Ok(Self {
            config_path,
            config,
            dp,
            programmer: Programmer::new(),
            neigh,
            macs,
            mode: AttachedMode::Generic,
            started: Instant::now(),
            admin,
            health: HashMap::new(),
            checkers: Vec::new(),
            health_tx,
            mac,
            serving: false,
            serve_switch: Some(serve_switch),
            scanner,
            vrrp: None,
            advertised: None,
            sync: None,
            clock: Clock::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            confirmation: None,
            metrics: Arc::default(),
            announcer: None,
            stopping: false,
            trace: TraceHub::new(),
            tracing: false,
            trace_reader: None,
        })
    }

    /// Publishes the services and backends as they are now, for the metrics endpoint.
    fn publish_metrics(&self) {
        let services = self
            .config
            .services
            .iter()
            .map(|s| metrics::ServiceView {
                name: s.name.clone(),
                vip_num: self.programmer.vip_num(s.vip, s.port),
                backends: s
                    .backends
                    .iter()
                    .map(|b| {
                        let v = self.view(s, b);
                        metrics::BackendView {
                            name: b.name.clone(),
                            address: b.address,
                            id: self.programmer.backend_id(&s.name, b.address),
                            up: v.mac.is_some() && v.healthy,
                            weight: v.weight,
                            admin_disabled: !v.enabled,
                        }
                    })
                    .collect(),
            })
            .collect();
        self.metrics.store(Arc::new(metrics::View {
            version: env!("CARGO_PKG_VERSION").to_string(),
            xdp_mode: self.mode.to_string(),
            interface: self.config.agent.interface.clone(),
            serving: self.serving,
            services,
        }));
    }

    /// Where the metrics endpoint reads from: what this agent, its scanner, speaker and
    /// sync thread publish, and `counters`. Call after `start_vrrp` and `start_sync`.
    pub fn metrics_sources(&self, counters: Arc<dyn CounterSource>) -> Sources {
        Sources {
            view: self.metrics.clone(),
            counters,
            flows: self.scanner.snapshot_source(),
            vrrp: self.vrrp.as_ref().map(|h| h.status_source()),
            sync: self.sync.as_ref().map(|h| h.status_source()),
            announce: self.announcer.as_ref().map(|a| a.announced_source()),
        }
    }

    /// Where `lbctl trace` clients subscribe (the control socket's connections).
    pub fn trace_hub(&self) -> TraceHub {
        self.trace.clone()
    }

    /// Sets the program's trace flag while at least one client listens, and clears it
    /// when the last one has gone (also when it died: its connection ends).
    pub fn update_tracing(&mut self) -> Result<()> {
        let want = self.trace.clients() > 0;
        if want != self.tracing {
            self.dp
                .set_config(&host_config(self.mac, &self.config, want))?;
            self.tracing = want;
            tracing::info!(
                "packet trace {}",
                if want {
                    "on: a trace client listens"
                } else {
                    "off: no trace client left"
                }
            );
        }
        Ok(())
    }

    /// Backend ids by name, for the trace's events.
    fn refresh_trace_names(&self) {
        let mut names = TraceNames::default();
        for s in &self.config.services {
            for b in &s.backends {
                if let Some(id) = self.programmer.backend_id(&s.name, b.address) {
                    names.backends.insert(id, (s.name.clone(), b.name.clone()));
                }
            }
        }
        self.trace.set_names(names);
    }

    /// The view of one backend that decides its place in the ring.
    fn view(&self, service: &Service, backend: &BackendSpec) -> BackendView {
        view_of(&self.macs, &self.health, &self.admin, service, backend)
    }

    /// Whether the program answers ARP/ND for the VIPs and forwards their traffic; set
    /// here only before the VRRP speaker, if any, takes the switch.
    fn set_serving(&mut self, on: bool) -> Result<()> {
        let switch = self
            .serve_switch
            .as_mut()
            .context("the VRRP speaker holds the serving switch")?;
        // No lease: a standalone host serves until told otherwise, also after its agent
        // has gone (until the next one takes over).
        switch.set_serving(on, 0)?;
        self.serving = on;
        self.publish_metrics();
        Ok(())
    }

    /// Starts the VRRP speaker, if configured, on its own thread; it takes the serving
    /// switch and flips it itself, so that nothing on this loop can delay a takeover.
    pub fn start_vrrp(&mut self) -> Result<Option<mpsc::UnboundedReceiver<StateChange>>> {
        let Some(settings) = self.config.vrrp.clone() else {
            return Ok(None);
        };
        let switch = self
            .serve_switch
            .take()
            .context("the serving switch is already handed over")?;
        let vips = self.config.services.iter().map(|s| s.vip).collect();
        let (handle, changes) = vrrp::spawn(
            settings,
            self.config.agent.interface.clone(),
            vips,
            self.mac,
            switch,
        )?;
        self.vrrp = Some(handle);
        self.track();
        Ok(Some(changes))
    }

    /// An election result, for the status: the speaker has already flipped the switch.
    pub fn on_vrrp(&mut self, change: StateChange) {
        self.serving = change.to.serves();
        self.publish_metrics();
        if let Some(sync) = &self.sync {
            sync.set_serving(self.serving);
        }
        self.announce();
    }

    /// Creates the route device and announces what this host can serve, if
    /// `[announce]` is configured. Call once the program is attached.
    pub async fn start_announce(&mut self) -> Result<()> {
        let Some(settings) = self.config.announce.clone() else {
            return Ok(());
        };
        let announcer = Announcer::start(settings.table)
            .await
            .context("[announce]: setting up the route device")?;
        tracing::info!(
            "announce: routes of the VIPs this host can serve go into table {} on {} (gone with this process)",
            settings.table,
            announcer.device()
        );
        self.announcer = Some(announcer);
        self.announce();
        Ok(())
    }

    /// What each VIP deserves now: a route while it can be served here.
    fn decisions(&self) -> BTreeMap<IpAddr, Decision> {
        let services = self
            .config
            .services
            .iter()
            .map(|s| (s.vip, self.programmer.serves(s.vip, s.port)));
        announce::decide(
            services,
            Gate {
                serving: self.serving,
                stopping: self.stopping,
            },
        )
    }

    /// Hands the announcer the VIPs to keep a route for (it applies them on its task).
    fn announce(&mut self) {
        if let Some(a) = &self.announcer {
            a.want(announce::wanted(&self.decisions()));
        }
    }

    /// The first half of a graceful stop with `[announce]`: every route is withdrawn
    /// while the program goes on forwarding. Returns how long to keep forwarding; None
    /// without `[announce]`, where there is nothing to wait for, and with `[vrrp]`,
    /// where the route moves with the handover (`stop_vrrp`).
    pub fn begin_withdrawal(&mut self) -> Option<Duration> {
        let grace = self.config.announce.as_ref()?.withdraw_grace_ms;
        self.announcer.as_ref()?;
        if self.vrrp.is_some() {
            return None;
        }
        self.stopping = true;
        self.announce();
        tracing::info!(
            "stopping: VIP routes withdrawn; forwarding for {grace} ms (withdraw_grace_ms) while the router moves the flows"
        );
        Some(Duration::from_millis(u64::from(grace)))
    }

    /// Makes sure no route is left (waits at most a second for the kernel).
    pub async fn finish_withdrawal(&mut self) {
        self.stopping = true;
        if let Some(a) = &mut self.announcer
            && !a.withdraw_all(Duration::from_secs(1)).await
        {
            tracing::warn!(
                "stopping: the VIP routes could not be removed ({}); they go with this process",
                a.announced().error.unwrap_or_default()
            );
        }
    }

    fn announce_status(&self, a: &Announcer) -> AnnounceStatus {
        let now = a.announced();
        let vips = self
            .decisions()
            .into_iter()
            .map(|(vip, decision)| {
                let since = now.routes.get(&vip);
                VipAnnouncement {
                    vip,
                    announcing: since.is_some(),
                    since_unix_ms: since.or_else(|| now.withdrawn.get(&vip)).copied(),
                    decision: decision.to_string(),
                }
            })
            .collect();
        AnnounceStatus {
            table: a.table(),
            device: a.device().to_string(),
            vips,
            error: now.error,
        }
    }

    /// Starts sharing state with the other LB hosts, if `[sync]` is configured, and
    /// waits (at most `SYNC_CATCH_UP`) until every peer's admin state is merged here, so
    /// that a host coming back does not take over with a stale state. Call before
    /// `start_vrrp`.
    pub async fn start_sync(&mut self) -> Result<Option<mpsc::UnboundedReceiver<SyncEvent>>> {
        let Some(settings) = self.config.sync.clone() else {
            return Ok(None);
        };
        let key = sync::load_key(&settings)?;
        let local = sync::local_address(&self.config.agent.interface, &settings.peers)
            .with_context(|| format!("[sync] on {}", self.config.agent.interface))?;
        self.clock = Clock::new(local);
        // Entries from before [sync] carry no version: the oldest possible one, so they
        // are shared but lose to any change made since.
        let unversioned: Vec<BackendId> = self
            .admin
            .backends
            .iter()
            .filter(|(_, a)| a.version.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in unversioned {
            let mut a = self.admin.get(&id);
            a.version = Some(Version {
                ms: 0,
                counter: 0,
                host: local,
            });
            self.admin.set(&id, a);
        }
        for a in self.admin.backends.values() {
            if let Some(v) = a.version {
                self.clock.observe(v);
            }
        }
        let (handle, mut events) = SyncHandle::spawn(
            &settings,
            key,
            local,
            self.admin.clone(),
            self.serving || self.config.vrrp.is_none(),
            Some(self.scanner.inbox()),
        )?;
        self.scanner.connect_sync(handle.pin_sink());
        self.sync = Some(handle);
        let deadline = tokio::time::Instant::now() + SYNC_CATCH_UP;
        let caught_up = loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(SyncEvent::CaughtUp)) => break true,
                Ok(Some(event)) => self.on_sync(event),
                Ok(None) | Err(_) => break false,
            }
        };
        let peers: Vec<String> = settings.peers.iter().map(|p| p.to_string()).collect();
        if caught_up {
            tracing::info!(
                "sync: from {local} port {} with {}; admin state in step",
                settings.port,
                peers.join(", ")
            );
        } else {
            tracing::warn!(
                "sync: from {local} port {} with {}; not every peer answered within {} ms: going on with what this host has",
                settings.port,
                peers.join(", "),
                SYNC_CATCH_UP.as_millis()
            );
        }
        Ok(Some(events))
    }

    /// Admin entries from a peer: merged (the higher version wins), saved, applied, and
    /// acknowledged once saved.
    pub fn on_sync(&mut self, event: SyncEvent) {
        let SyncEvent::Admin { from, entries, ack } = event else {
            return;
        };
        let before = self.admin.clone();
        let mut changed = Vec::new();
        for e in entries {
            if let Some(v) = e.admin.version {
                self.clock.observe(v);
            }
            if self.admin.merge(&e.id, e.admin) {
                changed.push(e);
            }
        }
        if !changed.is_empty() {
            if let Err(e) = self.admin.save(&self.config.agent.state_dir) {
                // Not acknowledged: the peer's lbctl reports this host as not
                // confirming. The entries come back from the peer only when its state
                // changes again or either agent restarts (the sync thread's copy has them).
                tracing::warn!("sync: saving admin state from {from} failed, not applied: {e}");
                self.admin = before;
                return;
            }
            if let Err(e) = self.apply() {
                tracing::warn!("applying admin state from {from} failed: {e:#}");
            }
            for e in &changed {
                let backend = self.config.backend_name(&e.id).unwrap_or("?").to_string();
                tracing::info!(
                    event = "admin",
                    service = e.id.service,
                    backend,
                    address = %e.id.address,
                    disabled = e.admin.disabled,
                    weight = e.admin.weight,
                    source = %from,
                    "service {}: backend {backend} ({}) {} by peer {from}{}",
                    e.id.service,
                    e.id.address,
                    if e.admin.disabled { "disabled" } else { "enabled" },
                    e.admin
                        .weight
                        .map(|w| format!(", weight {w}"))
                        .unwrap_or_default()
                );
            }
            if let Some(sync) = &self.sync {
                sync.state(self.admin.clone());
            }
        }
        if let (Some(change), Some(sync)) = (ack, &self.sync) {
            sync.applied(from, change);
        }
    }

    /// The acknowledgement the last `handle` asked the peers for, if any.
    pub fn take_confirmation(&mut self) -> Option<oneshot::Receiver<Confirmation>> {
        self.confirmation.take()
    }

    /// Hands the speaker the priority this host's data path deserves now.
    pub fn track(&mut self) {
        let (Some(handle), Some(settings)) = (&self.vrrp, &self.config.vrrp) else {
            return;
        };
        let serving = self
            .config
            .services
            .iter()
            .filter(|s| self.programmer.serves(s.vip, s.port))
            .count();
        let health = DataPathHealth {
            interface_up: interface_up(&self.config.agent.interface),
            services: self.config.services.len(),
            services_serving: serving,
        };
        let priority = effective_priority(settings.priority, health);
        if self.advertised != Some(priority) {
            if self.advertised.is_some() || priority != settings.priority {
                tracing::info!(
                    "tracking: priority {priority} of {} (interface {}, {serving} of {} services with a usable backend)",
                    settings.priority,
                    if health.interface_up { "up" } else { "down" },
                    health.services
                );
            }
            handle.set_priority(priority);
            self.advertised = Some(priority);
        }
    }

    /// Stops the speaker gracefully: priority 0 tells the peer to take over at once;
    /// the speaker keeps this host forwarding until the peer has had time to, then
    /// turns serving off.
    ///
    /// With `[announce]`, a master's route moves with the handover: the peer takes over
    /// (and announces) within its skew time, this host withdraws after two advert
    /// intervals (at most 1 s), and the speaker keeps it forwarding that long plus
    /// `withdraw_grace_ms` while the router moves the flows.
    pub async fn stop_vrrp(&mut self) {
        let Some(handle) = self.vrrp.take() else {
            return;
        };
        let (Some(settings), Some(vrrp), true) =
            (&self.config.announce, &self.config.vrrp, self.serving)
        else {
            handle.shutdown().await;
            self.serving = false;
            return;
        };
        let interval = Duration::from_millis(u64::from(vrrp.advert_interval_ms));
        let handover = (interval * 2).min(Duration::from_secs(1));
        let grace = Duration::from_millis(u64::from(settings.withdraw_grace_ms));
        tracing::info!(
            "stopping: handing over to the VRRP peer; VIP routes withdrawn after {} ms, forwarding {} ms more (withdraw_grace_ms)",
            handover.as_millis(),
            grace.as_millis()
        );
        self.stopping = true;
        let announcer = self.announcer.as_mut();
        let withdraw = async move {
            let Some(a) = announcer else {
                return;
            };
            tokio::time::sleep(handover).await;
            if !a.withdraw_all(Duration::from_secs(1)).await {
                tracing::warn!(
                    "stopping: the VIP routes could not be removed ({}); they go with this process",
                    a.announced().error.unwrap_or_default()
                );
            }
        };
        tokio::join!(handle.shutdown_after(handover + grace), withdraw);
        self.serving = false;
    }

    /// Makes the data path follow the current config, health, admin state and MACs.
    /// A commit that fails half-way is retried once as a whole (the programmer then
    /// rewrites every entry).
    fn apply(&mut self) -> Result<ApplyReport> {
        let report = match self.program() {
            Ok(report) => report,
            Err(first) => {
                tracing::warn!("writing the data path failed ({first:#}); rewriting it whole");
                self.program()?
            }
        };
        self.refresh_trace_names();
        self.track();
        self.publish_metrics();
        self.announce();
        Ok(report)
    }

    fn program(&mut self) -> Result<ApplyReport> {
        let plan = {
            let Self {
                programmer,
                config,
                macs,
                health,
                admin,
                ..
            } = &*self;
            let view = |s: &Service, b: &BackendSpec| view_of(macs, health, admin, s, b);
            programmer.plan(&config.services, &view)?
        };
        let report = self.commit(plan)?;
        for (service, backend) in &report.unresolved {
            tracing::warn!(
                "service {service}: backend {backend} has no MAC yet (not in the neighbour table); left out until it resolves"
            );
        }
        Ok(report)
    }

    /// Writes a plan. The flows it moves away from their backend are pinned first, so
    /// the new ring never costs an established flow its backend.
    fn commit(&mut self, plan: Plan) -> Result<ApplyReport> {
        let writes = plan.writes_anything();
        if writes
            && !self
                .scanner
                .prepare(Arc::new(plan.ring_set(&self.programmer)))
        {
            tracing::warn!(
                "the flow scanner did not answer in time; writing the rings without waiting for the pins"
            );
        }
        // New numbers are saved before any map holds them: the next agent, which takes
        // the maps over, must give the same backends the same ids.
        if let Some(numbering) = self.programmer.numbering_after(&plan)
            && let Err(e) = numbering.save(&self.config.agent.state_dir)
        {
            tracing::warn!("saving the numbering: {e}; the next agent may number afresh");
        }
        let result = self.programmer.commit(&mut self.dp, plan);
        // A plan that wrote nothing changed no ring: the scanner's rings are current.
        if writes {
            self.scanner.committed(Arc::new(self.programmer.ring_set()));
        }
        Ok(result?)
    }

    /// The first check of every backend, all at once, then the checker tasks (at start).
    async fn first_checks(&mut self) {
        let fresh = fresh_targets(&self.config, &self.health);
        let checks = run_checks(fresh).await;
        self.health = next_health(&self.config, &self.health, checks);
        self.restart_checkers();
    }

    /// One checker task per backend of the config, replacing the running ones.
    fn restart_checkers(&mut self) {
        for task in self.checkers.drain(..) {
            task.abort();
        }
        for s in &self.config.services {
            for b in &s.backends {
                self.checkers.push(spawn_checker(
                    self.health_tx.clone(),
                    s.backend_id(b),
                    target(s, b),
                    s.health_check,
                ));
            }
        }
    }

    /// One check's outcome; re-programs the data path when it changes a verdict.
    pub fn on_health(&mut self, report: HealthReport) -> Result<()> {
        let Some(h) = self.health.get_mut(&report.backend) else {
            return Ok(());
        };
        // A report from a checker of an older config.
        if h.target != report.target {
            return Ok(());
        }
        if let Some(t) = h.health.observe(report.result) {
            let name = self.config.backend_name(&report.backend).unwrap_or("?");
            log_transition(&report.backend.service, name, t.from, t.to, &t.cause);
            self.apply()?;
        }
        Ok(())
    }

    /// A reload's first half, on the loop: reads and validates the file and refuses what
    /// only a restart can change. Returns the slow half (MACs of the new backends, their
    /// first health checks) to run elsewhere; `finish_reload` applies its result.
    pub fn begin_reload(&self) -> Result<ReloadJob, ReloadError> {
        let new = config::load(&self.config_path).map_err(ReloadError::Invalid)?;
        let (old, newa) = (&self.config.agent, &new.agent);
        if old.interface != newa.interface {
            return Err(ReloadError::NeedsRestart("agent.interface changed"));
        }
        if old.xdp_mode != newa.xdp_mode {
            return Err(ReloadError::NeedsRestart("agent.xdp_mode changed"));
        }
        if old.control_socket != newa.control_socket {
            return Err(ReloadError::NeedsRestart("agent.control_socket changed"));
        }
        if old.state_dir != newa.state_dir {
            return Err(ReloadError::NeedsRestart("agent.state_dir changed"));
        }
        if old.bpffs_dir != newa.bpffs_dir {
            return Err(ReloadError::NeedsRestart("agent.bpffs_dir changed"));
        }
        if old.metrics_listen != newa.metrics_listen {
            return Err(ReloadError::NeedsRestart("agent.metrics_listen changed"));
        }
        if old.flow_idle_timeout_s != newa.flow_idle_timeout_s {
            return Err(ReloadError::NeedsRestart(
                "agent.flow_idle_timeout_s changed",
            ));
        }
        if self.config.vrrp != new.vrrp {
            return Err(ReloadError::NeedsRestart("[vrrp] changed"));
        }
        if self.config.sync != new.sync {
            return Err(ReloadError::NeedsRestart("[sync] changed"));
        }
        if self.config.announce != new.announce {
            return Err(ReloadError::NeedsRestart("[announce] changed"));
        }
        // The flow tables are sized when the program is loaded.
        if old.max_flows != newa.max_flows {
            return Err(ReloadError::NeedsRestart("agent.max_flows changed"));
        }
        if old.max_pinned_flows != newa.max_pinned_flows {
            return Err(ReloadError::NeedsRestart("agent.max_pinned_flows changed"));
        }
        if old.max_persistent_clients != newa.max_persistent_clients {
            return Err(ReloadError::NeedsRestart(
                "agent.max_persistent_clients changed",
            ));
        }
        if old.max_nat_flows != newa.max_nat_flows {
            return Err(ReloadError::NeedsRestart("agent.max_nat_flows changed"));
        }
        if (old.nat_port_min, old.nat_port_max, old.nat_time_wait_s)
            != (newa.nat_port_min, newa.nat_port_max, newa.nat_time_wait_s)
        {
            return Err(ReloadError::NeedsRestart(
                "agent.nat_port_min, nat_port_max or nat_time_wait_s changed",
            ));
        }
        let neigh = self.neigh.clone();
        let fresh = fresh_targets(&new, &self.health);
        Ok(Box::pin(async move {
            let macs = match neigh {
                Some(n) => n
                    .resolve(&backend_addresses(&new), RESOLVE_WAIT)
                    .await
                    .map_err(anyhow::Error::from)?,
                None => HashMap::new(),
            };
            let checks = run_checks(fresh).await;
            Ok(PreparedReload {
                config: new,
                macs,
                checks,
            })
        }))
    }

    /// A reload's second half, on the loop: plans the new config against the current
    /// state and applies it whole, or changes nothing. Health results of backends whose
    /// target changed meanwhile are not taken.
    pub fn finish_reload(&mut self, prepared: PreparedReload) -> Result<ApplyReport, ReloadError> {
        let PreparedReload {
            config: new,
            macs: fresh,
            checks,
        } = prepared;
        let mut macs = self.macs.clone();
        macs.extend(fresh);
        let health = next_health(&new, &self.health, checks);
        let plan = {
            let view = |s: &Service, b: &BackendSpec| view_of(&macs, &health, &self.admin, s, b);
            self.programmer
                .plan(&new.services, &view)
                .map_err(anyhow::Error::from)?
        };
        // The flood guard's limit first: if the rest fails, it is written back too.
        let guard_changed = self.config.agent.new_flows_per_cpu_s != new.agent.new_flows_per_cpu_s;
        if guard_changed {
            self.dp
                .set_config(&host_config(self.mac, &new, self.tracing))
                .map_err(anyhow::Error::from)?;
        }
        let report = match self.commit(plan) {
            Ok(report) => report,
            Err(e) => {
                // Put back what was there: the programmer rewrites every entry now.
                let restored = self.program().and_then(|r| {
                    if guard_changed {
                        self.dp
                            .set_config(&host_config(self.mac, &self.config, self.tracing))?;
                    }
                    Ok(r)
                });
                return Err(ReloadError::Other(match restored {
                    Ok(_) => {
                        e.context("applying the new config failed; the previous one is restored")
                    }
                    Err(r) => e.context(format!(
                        "applying the new config failed, and restoring the previous one failed too ({r:#})"
                    )),
                }));
            }
        };
        self.macs = macs;
        self.config = new;
        self.health = health;
        self.refresh_trace_names();
        self.restart_checkers();
        self.track();
        self.publish_metrics();
        self.announce();
        Ok(report)
    }

    /// Both halves of a reload at once (tests, and callers with nothing else to do).
    pub async fn reload(&mut self) -> Result<ApplyReport, ReloadError> {
        let prepared = self.begin_reload()?.await?;
        self.finish_reload(prepared)
    }

    /// Picks up MACs that changed or appeared; probes the backends still unresolved.
    pub async fn refresh_neighbours(&mut self) -> Result<()> {
        let Some(neigh) = &self.neigh else {
            return Ok(());
        };
        let table = neigh.table().await?;
        let mut changed = false;
        for ip in backend_addresses(&self.config) {
            match table.get(&ip) {
                Some(mac) if self.macs.get(&ip) != Some(mac) => {
                    if let Some(old) = self.macs.insert(ip, *mac) {
                        tracing::warn!(
                            "backend {ip} moved from {} to {}",
                            fmt_mac(&old),
                            fmt_mac(mac)
                        );
                    }
                    changed = true;
                }
                Some(_) => {}
                // Keep using a MAC the kernel forgot; ask again in the background.
                None => {
                    let _ = neigh.probe(ip);
                }
            }
        }
        if changed {
            self.apply()?;
        }
        Ok(())
    }

    /// Frees the backend ids of removed backends whose flows have all ended.
    pub fn reclaim_backend_ids(&mut self) -> Result<()> {
        let snapshot = self.scanner.snapshot();
        let (Some(taken_at), None) = (snapshot.taken_at, &snapshot.error) else {
            return Ok(());
        };
        let freed = self
            .programmer
            .reclaim(&mut self.dp, &snapshot.active, taken_at)?;
        if !freed.is_empty() {
            tracing::info!(
                "{} backend id(s) of removed backends freed: their flows have ended",
                freed.len()
            );
        }
        Ok(())
    }

    /// Answers one control request. A reload is the loop's to run (`begin_reload`).
    pub fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => self.status().map(|s| Response::Status(Box::new(s))),
            Request::ListBackends { service } => self
                .backends(service.as_deref())
                .map(|backends| Response::Backends { backends }),
            Request::DisableBackend { service, backend } => {
                self.set_admin(&service, &backend, |a| a.disabled = true)
            }
            Request::EnableBackend { service, backend } => {
                self.set_admin(&service, &backend, |a| a.disabled = false)
            }
            Request::SetWeight {
                service,
                backend,
                weight,
            } => {
                if weight > MAX_WEIGHT {
                    return Response::error(format!(
                        "weight {weight} is out of range (0 to {MAX_WEIGHT})"
                    ));
                }
                self.set_admin(&service, &backend, |a| a.weight = Some(weight))
            }
            Request::Reload => Err(anyhow::anyhow!(
                "internal: a reload reached the request handler"
            )),
            // The connection subscribed to the trace before asking: the flag follows.
            Request::Trace { .. } => self.update_tracing().map(|()| Response::Tracing {
                message: if self.tracing {
                    "tracing the program's decisions about VIP traffic".to_string()
                } else {
                    "the trace client left before tracing began".to_string()
                },
            }),
        };
        result.unwrap_or_else(|e| Response::error(format!("{e:#}")))
    }

    fn find(&self, service: &str, backend: &str) -> Result<(&Service, &BackendSpec)> {
        if !self.config.services.iter().any(|s| s.name == service) {
            anyhow::bail!("no service named {service:?}");
        }
        self.config
            .find_backend(service, backend)
            .with_context(|| format!("service {service} has no backend named {backend:?}"))
    }

    /// Changes one backend's admin state: saved first, then applied. If it cannot be
    /// saved, nothing changes.
    fn set_admin(
        &mut self,
        service: &str,
        backend: &str,
        change: impl FnOnce(&mut AdminBackend),
    ) -> Result<Response> {
        let id = {
            let (s, b) = self.find(service, backend)?;
            s.backend_id(b)
        };
        let before = self.admin.clone();
        let mut entry = self.admin.get(&id);
        change(&mut entry);
        entry.version = Some(self.clock.tick(now_ms()));
        self.admin.set(&id, entry);
        if let Err(e) = self.admin.save(&self.config.agent.state_dir) {
            self.admin = before;
            return Err(e).context("saving admin state; nothing changed");
        }
        self.apply()?;
        if let Some(sync) = &self.sync {
            self.confirmation = Some(sync.publish(vec![AdminEntry { id, admin: entry }]));
        }
        let (s, b) = self.find(service, backend)?;
        let v = self.view(s, b);
        let message = match (entry.disabled, v.weight) {
            (true, _) => format!(
                "service {service}: backend {backend} disabled: no new flows; established flows continue"
            ),
            (false, w) => format!("service {service}: backend {backend} enabled, weight {w}"),
        };
        tracing::info!(
            event = "admin",
            service,
            backend,
            disabled = entry.disabled,
            weight = v.weight,
            "{message}"
        );
        Ok(Response::Done { message })
    }

    fn backends(&self, service: Option<&str>) -> Result<Vec<BackendStatus>> {
        if let Some(name) = service
            && !self.config.services.iter().any(|s| s.name == name)
        {
            anyhow::bail!("no service named {name:?}");
        }
        let active = self.scanner.snapshot();
        let mut out = Vec::new();
        for s in &self.config.services {
            if service.is_some_and(|n| n != s.name) {
                continue;
            }
            let ring = self.programmer.ring_members(s.vip, s.port);
            for b in &s.backends {
                out.push(self.backend_status(s, b, &active.active, &ring)?);
            }
        }
        Ok(out)
    }

    fn backend_status(
        &self,
        s: &Service,
        b: &BackendSpec,
        active: &HashMap<u32, u64>,
        ring: &std::collections::BTreeSet<u32>,
    ) -> Result<BackendStatus> {
        let v = self.view(s, b);
        let id = self.programmer.backend_id(&s.name, b.address);
        let active_flows = id.and_then(|id| active.get(&id)).copied().unwrap_or(0);
        let counter = match id {
            Some(id) => self.dp.counter(backend_slot(id))?,
            None => Default::default(),
        };
        let h = self.health.get(&s.backend_id(b));
        let health = match (v.mac, h.map(|h| (h.health.verdict(), h.health.last()))) {
            (None, _) => "no MAC (not in the neighbour table)".to_string(),
            (_, Some((Verdict::Up, _))) => "up".to_string(),
            (_, Some((Verdict::Down, Some(last)))) => format!("down ({last})"),
            _ => "unknown".to_string(),
        };
        let state = match (v.enabled, v.forwards()) {
            (false, _) if active_flows > 0 => BackendState::Draining,
            (false, _) => BackendState::Disabled,
            (true, false) => BackendState::Down,
            (true, true) => BackendState::Up,
        };
        Ok(BackendStatus {
            service: s.name.clone(),
            name: b.name.clone(),
            address: b.address.to_string(),
            state,
            health,
            enabled: v.enabled,
            backup: b.backup,
            weight: v.weight,
            config_weight: b.weight,
            in_ring: id.is_some_and(|id| ring.contains(&id)),
            active_flows,
            packets: counter.packets,
            bytes: counter.bytes,
            new_flows: counter.new_flows,
        })
    }

    fn status(&self) -> Result<Status> {
        let backends = self.backends(None)?;
        let flows = FlowTableStatus::from(&*self.scanner.snapshot());
        let mut services = Vec::new();
        for s in &self.config.services {
            let c = match self.programmer.vip_num(s.vip, s.port) {
                Some(n) => self.dp.counter(vip_slot(n))?,
                None => Default::default(),
            };
            services.push(ServiceStatus {
                name: s.name.clone(),
                vip: s.vip.to_string(),
                port: s.port,
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
                persistence_timeout_s: s.persistence_timeout_s,
                persistent_clients: self
                    .programmer
                    .vip_num(s.vip, s.port)
                    .and_then(|n| self.scanner.snapshot().persistent.get(&n).copied())
                    .unwrap_or(0),
                backends: backends
                    .iter()
                    .filter(|b| b.service == s.name)
                    .cloned()
                    .collect(),
            });
        }
        let mut counters = BTreeMap::new();
        for r in 0..reason::COUNT {
            counters.insert(
                reason::NAMES[r as usize].to_string(),
                self.dp.counter(global_slot(r))?.packets,
            );
        }
        let mut events = BTreeMap::new();
        for e in 0..event::COUNT {
            events.insert(
                event::NAMES[e as usize].to_string(),
                self.dp.counter(event_slot(e))?.packets,
            );
        }
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            interface: self.config.agent.interface.clone(),
            xdp_mode: self.mode.to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            services,
            counters,
            events,
            vrrp: self.vrrp.as_ref().map(|h| h.status()),
            serving: self.serving,
            flows,
            sync: self.sync.as_ref().map(|h| h.status()),
            announce: self.announcer.as_ref().map(|a| self.announce_status(a)),
        })
    }
}

/// The view of one backend that decides its place in the ring: over borrowed parts of
/// the agent, so `apply` can lend the programmer and the data path mutably beside it.
fn view_of(
    macs: &HashMap<IpAddr, [u8; 6]>,
    health: &HashMap<BackendId, BackendHealth>,
    admin: &AdminState,
    service: &Service,
    backend: &BackendSpec,
) -> BackendView {
    let a = admin.get(&service.backend_id(backend));
    let mac = macs.get(&backend.address).copied();
    BackendView {
        // NAT finds its next hop in the FIB (the backend may be behind a router): a MAC
        // of its own is only the fallback.
        mac: match service.forwarding {
            Forwarding::Dsr => mac,
            Forwarding::Nat => Some(mac.unwrap_or_default()),
        },
        healthy: health
            .get(&service.backend_id(backend))
            .is_some_and(|h| h.health.is_up()),
        enabled: !a.disabled,
        weight: a.weight.unwrap_or(backend.weight),
    }
}

/// The next VRRP transition, or never when VRRP is off.
async fn next_change(
    changes: &mut Option<mpsc::UnboundedReceiver<StateChange>>,
) -> Option<StateChange> {
    match changes {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A stop signal: with `[announce]`, the first one withdraws the routes and sets when
/// the loop ends (true: go on until then); otherwise, and for a second signal, false.
fn keep_forwarding<D: DataPlane>(
    agent: &mut Agent<D>,
    stop_at: &mut Option<tokio::time::Instant>,
) -> bool {
    if stop_at.is_some() {
        return false;
    }
    match agent.begin_withdrawal() {
        Some(grace) => {
            *stop_at = Some(tokio::time::Instant::now() + grace);
            true
        }
        None => false,
    }
}

/// When `at` comes, or never without it.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next event of the sync thread, or never without `[sync]`.
async fn next_sync(events: &mut Option<mpsc::UnboundedReceiver<SyncEvent>>) -> Option<SyncEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// An admin change's answer, with how many hosts confirmed it.
async fn confirmed(response: Response, wait: oneshot::Receiver<Confirmation>) -> Response {
    let Response::Done { message } = response else {
        return response;
    };
    let said = match tokio::time::timeout(sync::ACK_WAIT * 2, wait).await {
        Ok(Ok(c)) => c.describe(),
        _ => "applied here; the sync thread did not answer".to_string(),
    };
    Response::Done {
        message: format!("{message}; {said}"),
    }
}

/// What the program is told about this host: its MAC, the flood guard's limit, and
/// whether an `lbctl trace` is listening.
fn host_config(mac: [u8; 6], config: &Config, tracing: bool) -> LbConfig {
    LbConfig {
        mac,
        flags: if tracing { CONFIG_F_TRACE } else { 0 },
        new_flows_per_cpu_s: config.agent.new_flows_per_cpu_s,
    }
}

/// Backends of `config` with no health state for their current target yet.
fn fresh_targets(
    config: &Config,
    health: &HashMap<BackendId, BackendHealth>,
) -> Vec<(BackendId, SocketAddr, u32)> {
    let mut fresh = Vec::new();
    for s in &config.services {
        for b in &s.backends {
            let t = target(s, b);
            if health.get(&s.backend_id(b)).is_none_or(|h| h.target != t) {
                fresh.push((s.backend_id(b), t, s.health_check.timeout_ms));
            }
        }
    }
    fresh
}

/// One health check of each target, all at once.
async fn run_checks(
    targets: Vec<(BackendId, SocketAddr, u32)>,
) -> Vec<(BackendId, SocketAddr, CheckResult)> {
    let results = futures_util::future::join_all(
        targets
            .iter()
            .map(|(_, t, timeout)| check_tcp(*t, Duration::from_millis(u64::from(*timeout)))),
    )
    .await;
    targets
        .into_iter()
        .zip(results)
        .map(|((k, t, _), r)| (k, t, r))
        .collect()
}

/// Health state for `config`: a backend whose target is unchanged keeps its state; a new
/// one starts unknown and takes its first check from `checks`, if there is one for
/// its target.
fn next_health(
    config: &Config,
    current: &HashMap<BackendId, BackendHealth>,
    checks: Vec<(BackendId, SocketAddr, CheckResult)>,
) -> HashMap<BackendId, BackendHealth> {
    let mut first: HashMap<(BackendId, SocketAddr), CheckResult> =
        checks.into_iter().map(|(k, t, r)| ((k, t), r)).collect();
    let mut next = HashMap::new();
    for s in &config.services {
        for b in &s.backends {
            let k = s.backend_id(b);
            let t = target(s, b);
            let h = match current.get(&k) {
                Some(h) if h.target == t => h.clone(),
                _ => {
                    let mut h = BackendHealth {
                        target: t,
                        health: Health::new(s.health_check.rise, s.health_check.fall),
                    };
                    if let Some(result) = first.remove(&(k.clone(), t))
                        && let Some(tr) = h.health.observe(result)
                    {
                        log_transition(&s.name, &b.name, tr.from, tr.to, &tr.cause);
                    }
                    h
                }
            };
            next.insert(k, h);
        }
    }
    next
}

/// The answer to a reload, for `lbctl` and the log.
fn reload_response(result: Result<ApplyReport, ReloadError>) -> Response {
    match result {
        Ok(r) => {
            let message = format!(
                "reloaded: {} VIPs added, {} removed, {} ring slots and {} backends written",
                r.vips_added, r.vips_removed, r.ring_slots_written, r.backends_written
            );
            tracing::info!(event = "reload", result = "ok", "{message}");
            Response::Done { message }
        }
        Err(e) => {
            tracing::warn!(
                event = "reload",
                result = "failed",
                "reload failed, running config unchanged: {e:#}"
            );
            match e {
                ReloadError::Invalid(errors) => Response::Error {
                    message: format!(
                        "{}: {} error(s); the running config is unchanged",
                        errors.source_name,
                        errors.errors.len()
                    ),
                    details: errors
                        .errors
                        .iter()
                        .map(|x| format!("{}: {x}", errors.source_name))
                        .collect(),
                },
                other => Response::error(format!("{other:#}")),
            }
        }
    }
}

/// Reloads in flight and asked for: one runs at a time; requests that arrive meanwhile
/// share the next one, which reads the file again.
#[derive(Default)]
struct Reloads {
    running: Option<(ReloadTask, Vec<Waiter>)>,
    queued: Option<Vec<Waiter>>,
}

/// A reload's slow half, running.
type ReloadTask = JoinHandle<Result<PreparedReload, ReloadError>>;

/// Who waits for a reload's answer: an `lbctl reload`, or nobody (SIGHUP).
type Waiter = Option<oneshot::Sender<Response>>;

impl Reloads {
    fn ask<D: DataPlane>(&mut self, agent: &Agent<D>, waiter: Waiter) {
        if self.running.is_some() {
            self.queued.get_or_insert_with(Vec::new).push(waiter);
            return;
        }
        self.start(agent, vec![waiter]);
    }

    fn start<D: DataPlane>(&mut self, agent: &Agent<D>, waiters: Vec<Waiter>) {
        match agent.begin_reload() {
            Ok(job) => self.running = Some((tokio::spawn(job), waiters)),
            Err(e) => answer(waiters, reload_response(Err(e))),
        }
    }

    /// The running reload's slow half once it is done; never, while none runs.
    async fn next(&mut self) -> (Result<PreparedReload, ReloadError>, Vec<Waiter>) {
        let Some((task, _)) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let result = task.await.unwrap_or_else(|e| {
            Err(ReloadError::Other(anyhow::anyhow!(
                "the reload task failed: {e}"
            )))
        });
        let waiters = self.running.take().map(|(_, w)| w).unwrap_or_default();
        (result, waiters)
    }

    fn finish<D: DataPlane>(
        &mut self,
        agent: &mut Agent<D>,
        result: Result<PreparedReload, ReloadError>,
        waiters: Vec<Waiter>,
    ) {
        let outcome = result.and_then(|prepared| agent.finish_reload(prepared));
        answer(waiters, reload_response(outcome));
        if let Some(queued) = self.queued.take() {
            self.start(agent, queued);
        }
    }
}

fn answer(waiters: Vec<Waiter>, response: Response) {
    for w in waiters.into_iter().flatten() {
        let _ = w.send(response.clone());
    }
}

fn spawn_checker(
    tx: mpsc::Sender<HealthReport>,
    backend: BackendId,
    target: SocketAddr,
    hc: HealthCheck,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(u64::from(hc.interval_ms)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick fires at once; the caller has just checked.
        tick.tick().await;
        loop {
            tick.tick().await;
            let result = check_tcp(target, Duration::from_millis(u64::from(hc.timeout_ms))).await;
            let report = HealthReport {
                backend: backend.clone(),
                target,
                result,
            };
            if tx.send(report).await.is_err() {
                return;
            }
        }
    })
}

/// Runs until SIGINT or SIGTERM; SIGHUP reloads the config, as `lbctl reload` does.
pub async fn run(config_path: &Path, config: Config) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let socket = config.agent.control_socket.clone();
    let listener = control::bind(&socket)?;
    let metrics_listener = match config.agent.metrics_listen {
        Some(addr) => match metrics::server::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                anyhow::bail!("[agent] metrics_listen {addr}: {e}");
            }
        },
        None => None,
    };
    let (health_tx, mut health_rx) = mpsc::channel(1024);
    let (call_tx, mut call_rx) = mpsc::channel::<Call>(64);
    // A failed start leaves no socket file behind for the next one to find.
    let started = async {
        let mut agent = Agent::start(config_path, config, health_tx).await?;
        let sync_events = agent.start_sync().await?;
        let changes = agent.start_vrrp()?;
        agent.start_announce().await?;
        // On a thread of its own: a scrape never waits for this loop.
        let metrics = match metrics_listener {
            Some(listener) => {
                let counters = Arc::new(
                    agent
                        .dp
                        .stats_reader()
                        .context("opening the counters for the metrics endpoint")?,
                );
                let sources = agent.metrics_sources(counters);
                let server = MetricsServer::spawn(listener, sources, Limits::default())
                    .context("starting the metrics endpoint")?;
                tracing::info!("metrics on http://{}/metrics", server.local_addr());
                Some(server)
            }
            None => None,
        };
        anyhow::Ok((agent, changes, sync_events, metrics))
    };
    let (mut agent, mut vrrp_changes, mut sync_events, metrics) = match started.await {
        Ok(started) => started,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let server = tokio::spawn(control::serve(listener, call_tx, agent.trace_hub()));
    let mut trace_clients = agent.trace_hub().watch_clients();
    tracing::info!("control socket {}", socket.display());
    let backends: usize = agent.config.services.iter().map(|s| s.backends.len()).sum();
    tracing::info!(
        "ready: {} services, {backends} backends on {} ({} XDP)",
        agent.config.services.len(),
        agent.config.agent.interface,
        agent.mode
    );
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut track_tick = tokio::time::interval(TRACK_EVERY);
    track_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reloads = Reloads::default();
    // With [announce], a stop withdraws the routes first and ends the loop when the
    // grace period is over; a second signal ends it at once.
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => if !keep_forwarding(&mut agent, &mut stop_at) { break },
            _ = sigint.recv() => if !keep_forwarding(&mut agent, &mut stop_at) { break },
            _ = until(stop_at) => break,
            _ = sighup.recv() => reloads.ask(&agent, None),
            (result, waiters) = reloads.next() => {
                reloads.finish(&mut agent, result, waiters);
            }
            Some(report) = health_rx.recv() => {
                if let Err(e) = agent.on_health(report) {
                    tracing::warn!("applying a health change failed: {e:#}");
                }
            }
            Some((request, answer)) = call_rx.recv() => {
                if request == Request::Reload {
                    reloads.ask(&agent, Some(answer));
                } else {
                    let response = agent.handle(request);
                    match agent.take_confirmation() {
                        // The peers' answer is waited for beside the loop.
                        Some(wait) => {
                            tokio::spawn(async move {
                                let _ = answer.send(confirmed(response, wait).await);
                            });
                        }
                        None => {
                            let _ = answer.send(response);
                        }
                    }
                }
            }
            Some(change) = next_change(&mut vrrp_changes) => agent.on_vrrp(change),
            Some(event) = next_sync(&mut sync_events) => agent.on_sync(event),
            Ok(()) = trace_clients.changed() => {
                if let Err(e) = agent.update_tracing() {
                    tracing::warn!("switching the packet trace: {e:#}");
                }
            }
            _ = track_tick.tick(), if agent.vrrp.is_some() => agent.track(),
            _ = tick.tick() => {
                if let Err(e) = agent.refresh_neighbours().await {
                    tracing::warn!("neighbour refresh failed: {e:#}");
                }
                if let Err(e) = agent.reclaim_backend_ids() {
                    tracing::warn!("freeing backend ids failed: {e:#}");
                }
            }
        }
    }
    agent.stop_vrrp().await;
    agent.finish_withdrawal().await;
    server.abort();
    drop(metrics);
    // The program outlives us: it must not trace for nobody.
    if agent.tracing
        && let Err(e) = agent
            .dp
            .set_config(&host_config(agent.mac, &agent.config, false))
    {
        tracing::warn!("turning the packet trace off: {e:#}");
    }
    if let Some(reader) = agent.trace_reader.take() {
        reader.abort();
    }
    let _ = std::fs::remove_file(&socket);
    let interface = agent.config.agent.interface.clone();
    for task in agent.checkers.drain(..) {
        task.abort();
    }
    let vrrp = agent.config.vrrp.is_some();
    drop(agent);
    // The pinned link keeps the program on the interface and the pinned maps keep every
    // flow: the next agent takes them over without a packet lost. `--detach` removes them.
    if vrrp {
        tracing::info!(
            "exiting; the program stays attached to {interface}, not serving, until the next agent"
        );
    } else {
        tracing::info!(
            "exiting; the program stays attached to {interface} and forwarding with the last config until the next agent takes over"
        );
    }
    Ok(())
}

/// `lb-agent --detach`: removes the program from the interface and every pin of this
/// config's `bpffs_dir` and interface (maps of any layout), for good. An agent still
/// running keeps its own link until it exits.
pub fn detach(config: &Config) -> Result<()> {
    let interface = &config.agent.interface;
    let removed = crate::pins::remove(&config.agent.bpffs_dir, interface)
        .with_context(|| format!("removing the pins of {interface}"))?;
    tracing::info!(
        "detached from {interface}: {} pinned link(s) and {} pinned map(s) removed from {}",
        removed.links,
        removed.maps,
        config.agent.bpffs_dir.join(interface).display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{FakeDataPlane, FakeFlowStore, FakeServeSwitch};

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    /// A service on 127.0.0.1's loopback range: health checks of new backends are
    /// refused at once, so they start down without waiting.
    fn config_text(dir: &Path, backends: &[(&str, &str)]) -> String {
        let mut text = format!(
            "[agent]\ninterface = \"lo\"\nstate_dir = \"{}\"\ncontrol_socket = \"{}/s\"\n\n[[services]]\nname = \"web\"\nvip = \"192.0.2.10\"\nport = 9\nring_size = 1009\n",
            dir.display(),
            dir.display()
        );
        for (name, address) in backends {
            text.push_str(&format!(
                "\n[[services.backends]]\nname = \"{name}\"\naddress = \"{address}\"\n"
            ));
        }
        text
    }

    struct TestAgent {
        agent: Agent<FakeDataPlane>,
        dir: PathBuf,
        _health_rx: mpsc::Receiver<HealthReport>,
    }

    impl Drop for TestAgent {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// An agent over the fake data path with `backends` all up and resolved.
    fn test_agent(name: &str, backends: &[(&str, &str)]) -> TestAgent {
        let dir = std::env::temp_dir().join(format!("lb-agent-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(&path, config_text(&dir, backends)).unwrap();
        let config = config::load(&path).unwrap();
        let (health_tx, health_rx) = mpsc::channel(16);
        let macs = backends
            .iter()
            .map(|(_, a)| (a.parse().unwrap(), [2, 0, 0, 0, 0, 9]))
            .collect();
        let mut agent = Agent::assemble(Parts {
            config_path: path,
            config,
            dp: FakeDataPlane::default(),
            serve_switch: Box::new(FakeServeSwitch::default()),
            flow_store: Box::new(FakeFlowStore::default()),
            neigh: None,
            macs,
            admin: AdminState::default(),
            mac: MAC,
            health_tx,
        })
        .unwrap();
        for s in &agent.config.services {
            for b in &s.backends {
                let mut health = Health::new(1, 1);
                health.observe(CheckResult::Passed);
                agent.health.insert(
                    s.backend_id(b),
                    BackendHealth {
                        target: target(s, b),
                        health,
                    },
                );
            }
        }
        agent.apply().unwrap();
        TestAgent {
            agent,
            dir,
            _health_rx: health_rx,
        }
    }

    fn dp_state(dp: &FakeDataPlane) -> String {
        let mut vips: Vec<_> = dp
            .vips
            .iter()
            .map(|(k, v)| format!("{k:?}={v:?}"))
            .collect();
        vips.sort();
        let mut backends: Vec<_> = dp
            .backends
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        backends.sort();
        let mut rings: Vec<_> = dp.rings.iter().map(|(k, v)| (*k, *v)).collect();
        rings.sort();
        format!("{vips:?} {backends:?} {rings:?} {}", dp.vip_addrs.len())
    }

    #[tokio::test]
    async fn a_reload_that_fails_half_way_leaves_the_running_state_as_it_was() {
        let mut t = test_agent("half", &[("a", "127.0.0.2"), ("b", "127.0.0.3")]);
        let before = dp_state(&t.agent.dp);
        let config_before = t.agent.config.clone();
        std::fs::write(
            &t.agent.config_path,
            config_text(&t.dir, &[("a", "127.0.0.2"), ("c", "127.0.0.4")]),
        )
        .unwrap();
        t.agent
            .macs
            .insert("127.0.0.4".parse().unwrap(), [2, 0, 0, 0, 0, 4]);
        let prepared = t.agent.begin_reload().unwrap().await.unwrap();
        // The kernel refuses the plan's second write: the first (c's entry) went in.
        t.agent.dp.fail_one_write_after = Some(1);
        let backends_before = t.agent.dp.backends.len();
        let result = t.agent.finish_reload(prepared);
        assert!(
            matches!(&result, Err(ReloadError::Other(e)) if format!("{e:#}").contains("previous one is restored")),
            "{:?}",
            result.err()
        );
        assert_eq!(
            t.agent.dp.fail_one_write_after, None,
            "the refusal happened"
        );
        assert!(
            t.agent.dp.backends.len() > backends_before,
            "part of the plan was written before the refusal"
        );
        assert_eq!(
            t.agent.config, config_before,
            "the running config is unchanged"
        );
        // c's entry was written before the refusal: its id is retired (no ring slot names
        // it) and freed by the next reclaim, which resets the entry.
        let c = t
            .agent
            .programmer
            .backend_id("web", "127.0.0.4".parse().unwrap())
            .unwrap();
        assert!(t.agent.programmer.retired().any(|id| id == c));
        // The scan after the restore's commit is the one that may free it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.agent.programmer.retired().count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            t.agent.reclaim_backend_ids().unwrap();
        }
        assert_eq!(
            t.agent.dp.backends.get(&c),
            Some(&lb_common::Backend::default())
        );
        t.agent.dp.backends.remove(&c);
        assert_eq!(
            dp_state(&t.agent.dp),
            before,
            "the maps hold the previous state"
        );
        // And the same reload goes through once the kernel says yes.
        let report = t.agent.reload().await.unwrap();
        assert!(report.ring_slots_written > 0);
        assert_ne!(t.agent.config, config_before);
    }

    #[tokio::test]
    async fn a_renamed_backend_keeps_its_admin_state_health_and_id() {
        let mut t = test_agent("rename", &[("a", "127.0.0.2"), ("b", "127.0.0.3")]);
        let r = t.agent.handle(Request::DisableBackend {
            service: "web".into(),
            backend: "b".into(),
        });
        assert!(matches!(r, Response::Done { .. }), "{r:?}");
        let id_before = t
            .agent
            .programmer
            .backend_id("web", "127.0.0.3".parse().unwrap());
        std::fs::write(
            &t.agent.config_path,
            config_text(&t.dir, &[("a", "127.0.0.2"), ("b-renamed", "127.0.0.3")]),
        )
        .unwrap();
        t.agent.reload().await.unwrap();
        let renamed = t
            .agent
            .backends(Some("web"))
            .unwrap()
            .into_iter()
            .find(|b| b.name == "b-renamed")
            .unwrap();
        assert!(
            !renamed.enabled,
            "the operator's disable follows the address"
        );
        assert_eq!(
            renamed.health, "up",
            "its health state is kept, not re-learnt"
        );
        assert_eq!(
            t.agent
                .programmer
                .backend_id("web", "127.0.0.3".parse().unwrap()),
            id_before
        );
        assert_eq!(t.agent.programmer.retired().count(), 0);
    }

    #[tokio::test]
    async fn an_invalid_reload_writes_nothing() {
        let mut t = test_agent("invalid", &[("a", "127.0.0.2")]);
        let before = dp_state(&t.agent.dp);
        std::fs::write(&t.agent.config_path, "[agent]\ninterface = 7\n").unwrap();
        t.agent.dp.fail_one_write_after = Some(0);
        assert!(matches!(
            t.agent.reload().await,
            Err(ReloadError::Invalid(_))
        ));
        assert_eq!(dp_state(&t.agent.dp), before);
    }

    #[tokio::test]
    async fn the_trace_flag_follows_the_clients_and_survives_a_reload() {
        let mut t = test_agent("trace", &[("a", "127.0.0.2"), ("b", "127.0.0.3")]);
        let flag = |t: &TestAgent| t.agent.dp.config.flags & CONFIG_F_TRACE != 0;
        assert!(!flag(&t), "no client yet");
        let hub = t.agent.trace_hub();
        let first = hub.subscribe();
        let r = t.agent.handle(Request::Trace {
            vip: None,
            count: None,
        });
        assert!(matches!(r, Response::Tracing { .. }), "{r:?}");
        assert!(flag(&t));
        let second = hub.subscribe();
        drop(first);
        t.agent.update_tracing().unwrap();
        assert!(flag(&t), "one client still listens");
        // A reload rewrites the config entry: the flag stays while a client listens.
        t.agent.reload().await.unwrap();
        assert!(flag(&t));
        assert_eq!(t.agent.dp.config.mac, MAC);
        drop(second);
        t.agent.update_tracing().unwrap();
        assert!(!flag(&t), "the last client left");
        // Events name the backend the ids stand for.
        let id = t
            .agent
            .programmer
            .backend_id("web", "127.0.0.3".parse().unwrap())
            .unwrap();
        let mut sub = hub.subscribe();
        hub.publish(
            &lb_common::TraceEvent {
                reason: lb_common::TRACE_FORWARDED,
                verdict: 3,
                backend: id,
                ..Default::default()
            },
            0,
        );
        let record = sub.events.try_recv().unwrap();
        assert_eq!(
            (record.service.as_deref(), record.backend.as_deref()),
            (Some("web"), Some("b"))
        );
    }

    #[tokio::test]
    async fn status_answers_from_the_scan_without_walking_the_table() {
        let mut t = test_agent("status", &[("a", "127.0.0.2"), ("b", "127.0.0.3")]);
        let status = t.agent.status().unwrap();
        assert_eq!(status.services.len(), 1);
        assert!(status.flows.scan_age_ms.is_some(), "apply scanned once");
        // Disabling drains: the scan before the ring change pins b's flows.
        let r = t.agent.handle(Request::DisableBackend {
            service: "web".into(),
            backend: "b".into(),
        });
        assert!(matches!(r, Response::Done { .. }), "{r:?}");
        let b = t
            .agent
            .backends(Some("web"))
            .unwrap()
            .into_iter()
            .find(|b| b.name == "b")
            .unwrap();
        assert_eq!(b.state, BackendState::Disabled);
        assert!(!b.in_ring);
    }

    /// No counter moved: the metrics test looks at the published state.
    struct NoCounters;

    impl CounterSource for NoCounters {
        fn counter(
            &self,
            _slot: u32,
        ) -> Result<lb_common::Counter, crate::dataplane::DataPlaneError> {
            Ok(lb_common::Counter::default())
        }
    }

    #[tokio::test]
    async fn the_metrics_show_each_change_without_asking_the_loop() {
        let mut t = test_agent("metrics", &[("a", "127.0.0.2"), ("b", "127.0.0.3")]);
        // The sources are read here, beside an agent that runs no loop at all.
        let sources = t.agent.metrics_sources(Arc::new(NoCounters));
        let b = r#"{service="web",backend="b",address="127.0.0.3"}"#;
        let m = metrics::parse(&sources.scrape().unwrap());
        assert_eq!(m[&format!("lb_backend_up{b}")], 1.0);
        assert_eq!(m[&format!("lb_backend_admin_disabled{b}")], 0.0);
        assert_eq!(m[&format!("lb_backend_weight{b}")], 100.0);
        let r = t.agent.handle(Request::DisableBackend {
            service: "web".into(),
            backend: "b".into(),
        });
        assert!(matches!(r, Response::Done { .. }), "{r:?}");
        let r = t.agent.handle(Request::SetWeight {
            service: "web".into(),
            backend: "a".into(),
            weight: 7,
        });
        assert!(matches!(r, Response::Done { .. }), "{r:?}");
        let m = metrics::parse(&sources.scrape().unwrap());
        assert_eq!(m[&format!("lb_backend_admin_disabled{b}")], 1.0);
        assert_eq!(
            m[r#"lb_backend_weight{service="web",backend="a",address="127.0.0.2"}"#],
            7.0
        );
        // A health change too.
        let report = HealthReport {
            backend: BackendId {
                service: "web".into(),
                address: "127.0.0.2".parse().unwrap(),
            },
            target: "127.0.0.2:9".parse().unwrap(),
            result: CheckResult::Refused,
        };
        t.agent.on_health(report).unwrap();
        let m = metrics::parse(&sources.scrape().unwrap());
        assert_eq!(
            m[r#"lb_backend_up{service="web",backend="a",address="127.0.0.2"}"#],
            0.0
        );
    }

    /// Each admin change and each health transition is one structured event, its
    /// particulars as fields (`--log-format json`).
    #[tokio::test]
    async fn admin_and_health_changes_are_one_structured_event_each() {
        let mut t = test_agent("events", &[("a", "127.0.0.2"), ("b", "127.0.0.3")]);
        let log = crate::logging::capture::json();
        let r = t.agent.handle(Request::DisableBackend {
            service: "web".into(),
            backend: "b".into(),
        });
        assert!(matches!(r, Response::Done { .. }), "{r:?}");
        let admin = log.events("admin");
        assert_eq!(admin.len(), 1, "{admin:?}");
        let f = &admin[0]["fields"];
        assert_eq!(admin[0]["level"], "INFO");
        assert_eq!(f["service"], "web");
        assert_eq!(f["backend"], "b");
        assert_eq!(f["disabled"], true);
        assert_eq!(f["weight"], 100);
        assert_eq!(
            f["message"],
            "service web: backend b disabled: no new flows; established flows continue"
        );
        let r = t.agent.handle(Request::SetWeight {
            service: "web".into(),
            backend: "a".into(),
            weight: 7,
        });
        assert!(matches!(r, Response::Done { .. }), "{r:?}");
        let admin = log.events("admin");
        assert_eq!(admin.len(), 1, "{admin:?}");
        assert_eq!(admin[0]["fields"]["backend"], "a");
        assert_eq!(admin[0]["fields"]["disabled"], false);
        assert_eq!(admin[0]["fields"]["weight"], 7);

        let a = BackendId {
            service: "web".into(),
            address: "127.0.0.2".parse().unwrap(),
        };
        let report = |result| HealthReport {
            backend: a.clone(),
            target: "127.0.0.2:9".parse().unwrap(),
            result,
        };
        t.agent.on_health(report(CheckResult::Refused)).unwrap();
        // A second failure changes nothing: no event.
        t.agent.on_health(report(CheckResult::Refused)).unwrap();
        let health = log.events("health");
        assert_eq!(health.len(), 1, "{health:?}");
        let f = &health[0]["fields"];
        assert_eq!(health[0]["level"], "WARN");
        assert_eq!(
            (&f["service"], &f["backend"], &f["state"]),
            (&"web".into(), &"a".into(), &"down".into())
        );
        assert_eq!(f["cause"], CheckResult::Refused.to_string());
        t.agent.on_health(report(CheckResult::Passed)).unwrap();
        let health = log.events("health");
        assert_eq!(health.len(), 1, "{health:?}");
        assert_eq!(health[0]["fields"]["state"], "up");
        assert_eq!(health[0]["fields"]["backend"], "a");
    }

    #[tokio::test]
    async fn a_vip_is_announced_while_its_service_has_a_usable_backend() {
        let mut t = test_agent("announce", &[("a", "127.0.0.2"), ("b", "127.0.0.3")]);
        t.agent.serving = true;
        let vip: IpAddr = "192.0.2.10".parse().unwrap();
        assert_eq!(t.agent.decisions()[&vip], Decision::Announce);
        // Without [announce] a stop has nothing to wait for.
        assert_eq!(t.agent.begin_withdrawal(), None);
        assert!(!t.agent.stopping);
        for b in ["a", "b"] {
            let r = t.agent.handle(Request::DisableBackend {
                service: "web".into(),
                backend: b.into(),
            });
            assert!(matches!(r, Response::Done { .. }), "{r:?}");
        }
        assert_eq!(t.agent.decisions()[&vip], Decision::NoUsableBackend);
        t.agent.serving = false;
        assert_eq!(t.agent.decisions()[&vip], Decision::NotServing);
    }

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:02"), None);
        assert_eq!(parse_mac("zz:00:0a:ff:00:01"), None);
        assert_eq!(fmt_mac(&[2, 0, 10, 255, 0, 1]), "02:00:0a:ff:00:01");
    }
}
