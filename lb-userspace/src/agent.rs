//! The agent: loads the XDP program, keeps its maps in step with the config, the health
//! of the backends, the operator's admin state and the neighbour table, serves `lbctl`,
//! and detaches when told to stop.
//!
//! Everything that changes state runs on one loop (`run`): health reports, control
//! requests, signals and the neighbour refresh arrive there over channels.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::{
    LbConfig,
    counters::{backend_slot, global_slot, reason, vip_slot},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    admin::{AdminBackend, AdminState},
    config::{self, BackendSpec, Config, ConfigErrors, HealthCheck, MAX_WEIGHT, Service, XdpMode},
    control::{self, Call},
    dataplane::{AttachedMode, DataPlane, ServeSwitch, ServingMap, XdpDataPlane},
    health::{CheckResult, Health, Verdict, check_tcp},
    neigh::Neighbours,
    programmer::{ApplyReport, BackendView, Programmer},
    protocol::{BackendState, BackendStatus, Request, Response, ServiceStatus, Status},
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
    service: String,
    backend: String,
    target: SocketAddr,
    result: CheckResult,
}

struct BackendHealth {
    target: SocketAddr,
    health: Health,
}

type BackendKey = (String, String);

pub struct Agent {
    config_path: PathBuf,
    config: Config,
    dp: XdpDataPlane,
    programmer: Programmer,
    neigh: Neighbours,
    macs: HashMap<IpAddr, [u8; 6]>,
    mode: AttachedMode,
    started: Instant,
    admin: AdminState,
    health: HashMap<BackendKey, BackendHealth>,
    checkers: Vec<JoinHandle<()>>,
    health_tx: mpsc::Sender<HealthReport>,
    /// The interface's MAC: the source of forwarded frames and of ARP/ND answers.
    mac: [u8; 6],
    /// Answering for the VIPs and forwarding: always when standalone, as master with VRRP
    /// (as the speaker last said: it flips the switch itself).
    serving: bool,
    /// Ours while standalone or until the VRRP speaker takes it.
    serve_switch: Option<ServingMap>,
    vrrp: Option<VrrpHandle>,
    /// The priority last handed to the VRRP speaker.
    advertised: Option<u8>,
}

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

fn key(service: &Service, backend: &BackendSpec) -> BackendKey {
    (service.name.clone(), backend.name.clone())
}

fn target(service: &Service, backend: &BackendSpec) -> SocketAddr {
    SocketAddr::new(backend.address, service.port)
}

fn log_transition(service: &str, backend: &str, from: Verdict, to: Verdict, cause: &CheckResult) {
    match to {
        Verdict::Down => {
            eprintln!("lb-agent: service {service}: backend {backend} is down ({cause})")
        }
        Verdict::Up if from == Verdict::Unknown => {
            eprintln!("lb-agent: service {service}: backend {backend} is up")
        }
        Verdict::Up => eprintln!("lb-agent: service {service}: backend {backend} is up again"),
        Verdict::Unknown => {}
    }
}

impl Agent {
    /// Loads, checks health, fills the maps, then attaches: the program never sees half
    /// a config, and traffic starts on backends known to be up.
    pub async fn start(
        config_path: &Path,
        config: Config,
        health_tx: mpsc::Sender<HealthReport>,
    ) -> Result<Self> {
        let interface = config.agent.interface.clone();
        let mac = interface_mac(&interface)?;
        let admin = AdminState::load(&config.agent.state_dir)?;
        let mut dp = XdpDataPlane::load().context("loading the XDP program")?;
        let serve_switch = dp
            .take_serve_switch()
            .context("the XDP object has no serving switch")?;
        let neigh = Neighbours::new(&interface)
            .with_context(|| format!("watching neighbours on {interface}"))?;
        let macs = neigh
            .resolve(&backend_addresses(&config), RESOLVE_WAIT)
            .await?;
        let mut agent = Self {
            config_path: config_path.to_path_buf(),
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
            vrrp: None,
            advertised: None,
        };
        agent.sync_health().await;
        agent.dp.set_config(&LbConfig {
            mac,
            _pad: [0; 2],
            new_flows_per_cpu_s: 0,
        })?;
        agent.apply()?;
        // With VRRP, a host starts as backup: it serves once the election says so.
        agent.set_serving(agent.config.vrrp.is_none())?;
        let wanted = match agent.config.agent.xdp_mode {
            XdpMode::Auto => None,
            XdpMode::Native => Some(AttachedMode::Native),
            XdpMode::Generic => Some(AttachedMode::Generic),
        };
        agent.mode = agent.dp.attach(&interface, wanted)?;
        eprintln!(
            "lb-agent: attached to {interface} in {} mode (xdp_mode = {})",
            agent.mode, agent.config.agent.xdp_mode
        );
        Ok(agent)
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
        switch.set_serving(on)?;
        self.serving = on;
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
            Box::new(switch),
        )?;
        self.vrrp = Some(handle);
        self.track();
        Ok(Some(changes))
    }

    /// An election result, for the status: the speaker has already flipped the switch.
    pub fn on_vrrp(&mut self, change: StateChange) {
        self.serving = change.to.serves();
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
                eprintln!(
                    "lb-agent: tracking: priority {priority} of {} (interface {}, {serving} of {} services with a usable backend)",
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
    pub async fn stop_vrrp(&mut self) {
        let Some(handle) = self.vrrp.take() else {
            return;
        };
        handle.shutdown().await;
        self.serving = false;
    }

    fn apply(&mut self) -> Result<ApplyReport> {
        let report = self.program()?;
        self.track();
        Ok(report)
    }

    fn program(&mut self) -> Result<ApplyReport> {
        let Self {
            programmer,
            dp,
            config,
            macs,
            health,
            admin,
            ..
        } = self;
        let view = |s: &Service, b: &BackendSpec| view_of(macs, health, admin, s, b);
        let report = programmer.apply(dp, &config.services, &view)?;
        for (service, backend) in &report.unresolved {
            eprintln!(
                "lb-agent: service {service}: backend {backend} has no MAC yet (not in the neighbour table); left out until it resolves"
            );
        }
        Ok(report)
    }

    /// Matches health state and checker tasks to the config: keeps the state of backends
    /// whose target is unchanged, checks new ones once right away, and restarts the
    /// checkers.
    async fn sync_health(&mut self) {
        for task in self.checkers.drain(..) {
            task.abort();
        }
        let mut next = HashMap::new();
        let mut fresh = Vec::new();
        for s in &self.config.services {
            for b in &s.backends {
                let k = key(s, b);
                let t = target(s, b);
                match self.health.remove(&k) {
                    Some(h) if h.target == t => {
                        next.insert(k, h);
                    }
                    _ => {
                        let h = Health::new(s.health_check.rise, s.health_check.fall);
                        next.insert(
                            k.clone(),
                            BackendHealth {
                                target: t,
                                health: h,
                            },
                        );
                        fresh.push((k, t, s.health_check.timeout_ms));
                    }
                }
            }
        }
        self.health = next;
        let results = futures_util::future::join_all(
            fresh
                .iter()
                .map(|(_, t, timeout)| check_tcp(*t, Duration::from_millis(u64::from(*timeout)))),
        )
        .await;
        for ((k, _, _), result) in fresh.into_iter().zip(results) {
            if let Some(h) = self.health.get_mut(&k)
                && let Some(t) = h.health.observe(result)
            {
                log_transition(&k.0, &k.1, t.from, t.to, &t.cause);
            }
        }
        for s in &self.config.services {
            for b in &s.backends {
                self.checkers.push(spawn_checker(
                    self.health_tx.clone(),
                    s.name.clone(),
                    b.name.clone(),
                    target(s, b),
                    s.health_check,
                ));
            }
        }
    }

    /// One check's outcome; re-programs the data path when it changes a verdict.
    pub fn on_health(&mut self, report: HealthReport) -> Result<()> {
        let k = (report.service, report.backend);
        let Some(h) = self.health.get_mut(&k) else {
            return Ok(());
        };
        // A report from a checker of an older config.
        if h.target != report.target {
            return Ok(());
        }
        if let Some(t) = h.health.observe(report.result) {
            log_transition(&k.0, &k.1, t.from, t.to, &t.cause);
            self.apply()?;
        }
        Ok(())
    }

    /// Re-reads the config file. An invalid file, or one that changes what only a
    /// restart can change, changes nothing.
    pub async fn reload(&mut self) -> Result<ApplyReport, ReloadError> {
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
        if self.config.vrrp != new.vrrp {
            return Err(ReloadError::NeedsRestart("[vrrp] changed"));
        }
        let fresh = self
            .neigh
            .resolve(&backend_addresses(&new), RESOLVE_WAIT)
            .await
            .map_err(anyhow::Error::from)?;
        self.macs.extend(fresh);
        self.config = new;
        self.sync_health().await;
        Ok(self.apply()?)
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

    /// Answers one control request.
    pub async fn handle(&mut self, request: Request) -> Response {
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
            Request::Reload => return self.reload_response().await,
        };
        result.unwrap_or_else(|e| Response::error(format!("{e:#}")))
    }

    async fn reload_response(&mut self) -> Response {
        match self.reload().await {
            Ok(r) => {
                let message = format!(
                    "reloaded: {} VIPs added, {} removed, {} ring slots and {} backends written",
                    r.vips_added, r.vips_removed, r.ring_slots_written, r.backends_written
                );
                eprintln!("lb-agent: {message}");
                Response::Done { message }
            }
            Err(e) => {
                eprintln!("lb-agent: reload failed, running config unchanged: {e:#}");
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

    fn find(&self, service: &str, backend: &str) -> Result<(&Service, &BackendSpec)> {
        let s = self
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .with_context(|| format!("no service named {service:?}"))?;
        let b = s
            .backends
            .iter()
            .find(|b| b.name == backend)
            .with_context(|| format!("service {service} has no backend named {backend:?}"))?;
        Ok((s, b))
    }

    /// Changes one backend's admin state: saved first, then applied. If it cannot be
    /// saved, nothing changes.
    fn set_admin(
        &mut self,
        service: &str,
        backend: &str,
        change: impl FnOnce(&mut AdminBackend),
    ) -> Result<Response> {
        self.find(service, backend)?;
        let before = self.admin.clone();
        let mut entry = self.admin.get(service, backend);
        change(&mut entry);
        self.admin.set(service, backend, entry);
        if let Err(e) = self.admin.save(&self.config.agent.state_dir) {
            self.admin = before;
            return Err(e).context("saving admin state; nothing changed");
        }
        self.apply()?;
        let (s, b) = self.find(service, backend)?;
        let v = self.view(s, b);
        let message = match (entry.disabled, v.weight) {
            (true, _) => format!(
                "service {service}: backend {backend} disabled: no new flows; established flows continue"
            ),
            (false, w) => format!("service {service}: backend {backend} enabled, weight {w}"),
        };
        eprintln!("lb-agent: {message}");
        Ok(Response::Done { message })
    }

    fn backends(&self, service: Option<&str>) -> Result<Vec<BackendStatus>> {
        if let Some(name) = service
            && !self.config.services.iter().any(|s| s.name == name)
        {
            anyhow::bail!("no service named {name:?}");
        }
        let active = self.dp.active_flows(Duration::from_secs(u64::from(
            self.config.agent.flow_idle_timeout_s,
        )))?;
        let mut out = Vec::new();
        for s in &self.config.services {
            if service.is_some_and(|n| n != s.name) {
                continue;
            }
            let ring = self.programmer.ring_members(s.vip, s.port);
            for b in &s.backends {
                out.push(self.backend_status(s, b, &active, &ring)?);
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
        let h = self.health.get(&key(s, b));
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
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            interface: self.config.agent.interface.clone(),
            xdp_mode: self.mode.to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            services,
            counters,
            vrrp: self.vrrp.as_ref().map(|h| h.status()),
            serving: self.serving,
        })
    }
}

/// The view of one backend that decides its place in the ring: over borrowed parts of
/// the agent, so `apply` can lend the programmer and the data path mutably beside it.
fn view_of(
    macs: &HashMap<IpAddr, [u8; 6]>,
    health: &HashMap<BackendKey, BackendHealth>,
    admin: &AdminState,
    service: &Service,
    backend: &BackendSpec,
) -> BackendView {
    let a = admin.get(&service.name, &backend.name);
    BackendView {
        mac: macs.get(&backend.address).copied(),
        healthy: health
            .get(&key(service, backend))
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

fn spawn_checker(
    tx: mpsc::Sender<HealthReport>,
    service: String,
    backend: String,
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
                service: service.clone(),
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
    let (health_tx, mut health_rx) = mpsc::channel(1024);
    let (call_tx, mut call_rx) = mpsc::channel::<Call>(64);
    // A failed start leaves no socket file behind for the next one to find.
    let started = async {
        let mut agent = Agent::start(config_path, config, health_tx).await?;
        let changes = agent.start_vrrp()?;
        anyhow::Ok((agent, changes))
    };
    let (mut agent, mut vrrp_changes) = match started.await {
        Ok(started) => started,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let server = tokio::spawn(control::serve(listener, call_tx));
    eprintln!("lb-agent: control socket {}", socket.display());
    let backends: usize = agent.config.services.iter().map(|s| s.backends.len()).sum();
    eprintln!(
        "lb-agent: ready: {} services, {backends} backends on {} ({} XDP)",
        agent.config.services.len(),
        agent.config.agent.interface,
        agent.mode
    );
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut track_tick = tokio::time::interval(TRACK_EVERY);
    track_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                let _ = agent.reload_response().await;
            }
            Some(report) = health_rx.recv() => {
                if let Err(e) = agent.on_health(report) {
                    eprintln!("lb-agent: applying a health change failed: {e:#}");
                }
            }
            Some((request, answer)) = call_rx.recv() => {
                let response = agent.handle(request).await;
                let _ = answer.send(response);
            }
            Some(change) = next_change(&mut vrrp_changes) => agent.on_vrrp(change),
            _ = track_tick.tick(), if agent.vrrp.is_some() => agent.track(),
            _ = tick.tick() => {
                if let Err(e) = agent.refresh_neighbours().await {
                    eprintln!("lb-agent: neighbour refresh failed: {e:#}");
                }
            }
        }
    }
    agent.stop_vrrp().await;
    server.abort();
    let _ = std::fs::remove_file(&socket);
    let interface = agent.config.agent.interface.clone();
    for task in agent.checkers.drain(..) {
        task.abort();
    }
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
