//! The VRRP speaker: sockets, timers and the state machine on a thread of its own.
//!
//! Nothing the agent does can delay an advert or a takeover. The speaker runs on its own
//! OS thread with its own current-thread tokio runtime (its sockets and timers only), at
//! real-time priority with the process's memory locked (see [`super::realtime`]), as
//! keepalived runs its VRRP process apart from its checkers. It shares no lock or queue
//! with map walks, reloads, health checks, neighbour resolution or file I/O:
//! - it owns the data path's serving switch: on becoming master it turns serving on
//!   before the first announcement; on leaving master it turns it off before anything
//!   else (a graceful stop excepted: priority 0 first, then one more interval of
//!   forwarding while the peer takes over). A failed write is counted, logged and retried
//!   every `SWITCH_RETRY`; a master does not announce the VIPs until it serves. Serving
//!   is a lease (`LEASE_INTERVALS` advert intervals) that the master renews with every
//!   advert it sends: the link and maps outlive the process, so a killed master's
//!   program stops answering and forwarding by itself before the backup takes over;
//! - each transition goes to the agent over an unbounded channel: none is lost, and they
//!   arrive in order however long the agent takes to read them;
//! - its status is published as an immutable snapshot after each loop turn (`ArcSwap`):
//!   the agent reads it without a lock it could hold the speaker up with;
//! - the tracking input (effective priority) comes in over a watch channel: only the
//!   latest value matters.
//!
//! Each transition gets one log line with its reason and runs the notify command (in the
//! background). On becoming master the speaker announces every VIP at once (gratuitous
//! ARP for IPv4, unsolicited neighbour advertisement for IPv6) and again
//! `ANNOUNCE_ROUNDS - 1` times, `ANNOUNCE_SPACING` apart: a lost frame or a slow switch
//! does not leave a VIP pointing at the old host.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    ConfigError, MasterStatus, TransitionStatus, VrrpConfig, VrrpCounters, VrrpState, VrrpStatus,
    announce,
    auth::{self, AuthError, AuthKey, KeyError, Sequencer, Verifier},
    net::{self, AdvertSocket, AnnounceSocket, NetError, Received},
    packet::{self, Advert, DropReason},
    realtime,
    state::{Action, Machine, Params, Transition},
};
use crate::{dataplane::ServeSwitch, protocol::VrrpAlarm};

/// Announcement rounds on becoming master (the first at once).
pub const ANNOUNCE_ROUNDS: u32 = 5;
pub const ANNOUNCE_SPACING: Duration = Duration::from_millis(200);
/// How soon a failed write of the serving switch is tried again.
pub const SWITCH_RETRY: Duration = Duration::from_millis(10);
/// A master's serving lease, in advert intervals from its last advert. The backup takes
/// over 3 intervals plus its skew after the last advert it received: a killed master
/// has stopped serving by then.
pub const LEASE_INTERVALS: u32 = 3;
/// How often a standing clock skew alarm is logged again, per peer.
const ALARM_LOG_EVERY: Duration = Duration::from_secs(60);
/// Larger than any advert: 255 IPv6 addresses and a trailer are about 4 KiB.
const RECV_BUF: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum VrrpError {
    #[error("vrrp: {0}")]
    Config(#[from] ConfigError),
    #[error("vrrp auth key: {0}")]
    Key(#[from] KeyError),
    #[error("vrrp: reading the addresses of {interface}: {source}")]
    Addresses {
        interface: String,
        source: std::io::Error,
    },
    #[error("vrrp: interface {interface} has no {family} address to send adverts from")]
    NoAddress {
        interface: String,
        family: &'static str,
    },
    #[error("vrrp: {0} VIPs of the adverts' family; one advert carries at most 255")]
    TooManyVips(usize),
    #[error("vrrp: {0}")]
    Net(#[from] NetError),
    #[error("vrrp: starting the speaker's thread: {0}")]
    Thread(std::io::Error),
}

/// A transition, for the agent: serve (answer ARP/ND and forward) only as master.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    pub from: VrrpState,
    pub to: VrrpState,
    pub reason: String,
}

/// The agent's side of a running speaker.
pub struct VrrpHandle {
    priority: watch::Sender<u8>,
    /// Carries how much longer than usual a master keeps forwarding after priority 0.
    stop: Option<oneshot::Sender<Duration>>,
    /// Replaced by the speaker after each loop turn; the lab tests read it from afar.
    pub(super) status: Arc<ArcSwap<VrrpStatus>>,
    /// Fires when the speaker has finished (its last advert sent, serving off).
    done: Option<oneshot::Receiver<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl VrrpHandle {
    /// Tracking input: the priority the data path can back, 0 (cannot serve: resign,
    /// never become master) to the configured priority (more is capped to it).
    pub fn set_priority(&self, effective: u8) {
        self.priority.send_replace(effective);
    }

    /// Where the speaker publishes its snapshots, for readers off the agent's loop
    /// (the metrics endpoint).
    pub fn status_source(&self) -> Arc<ArcSwap<VrrpStatus>> {
        self.status.clone()
    }

    /// The speaker's latest snapshot: a load, never a wait on the speaker.
    pub fn status(&self) -> VrrpStatus {
        VrrpStatus::clone(&self.status.load())
    }

    /// Stops the speaker; a master first sends priority 0 so its peer takes over at
    /// once, and keeps forwarding for one more interval (at most 1 s) while it does.
    /// Returns when the speaker has ended. (Dropping the handle stops it the same way,
    /// without waiting.)
    pub async fn shutdown(self) {
        self.shutdown_after(Duration::ZERO).await;
    }

    /// `shutdown`, a master forwarding `extra` longer after its priority 0 (with
    /// `[announce]`: while the router moves the flows from its route to the new
    /// master's).
    pub async fn shutdown_after(mut self, extra: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(extra);
        }
        if let Some(done) = self.done.take()
            && done.await.is_err()
        {
            tracing::warn!("vrrp: the speaker's thread ended before its graceful stop");
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("vrrp: the speaker's thread panicked");
        }
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

fn unix_ms() -> u64 {
    u64::try_from(unix_now().as_millis()).unwrap_or(u64::MAX)
}

/// Starts the speaker on `interface` for `vips` (in service order: the first one's
/// family is the election's unless peers say otherwise), announcing them from `mac`,
/// on a thread of its own. It takes `switch`, the data path's serving switch, and is
/// its only writer from here on. Needs no runtime of the caller's.
pub fn spawn(
    cfg: VrrpConfig,
    interface: String,
    vips: Vec<IpAddr>,
    mac: [u8; 6],
    switch: Box<dyn ServeSwitch>,
) -> Result<(VrrpHandle, mpsc::UnboundedReceiver<StateChange>), VrrpError> {
    cfg.validate()?;
    let v4 = cfg.family_v4(&vips);
    let src = net::advert_source(&interface, v4)
        .map_err(|source| VrrpError::Addresses {
            interface: interface.clone(),
            source,
        })?
        .ok_or_else(|| VrrpError::NoAddress {
            interface: interface.clone(),
            family: if v4 { "IPv4" } else { "IPv6 link-local" },
        })?;
    let key = match &cfg.auth_key_file {
        Some(path) => {
            warn_if_readable(path);
            Some(AuthKey::load(path)?)
        }
        None => {
            tracing::warn!(
                "vrrp {}: warning: no auth_key_file: any host on the segment can send adverts and take the VIPs",
                cfg.router_id
            );
            None
        }
    };
    // The speaker's runtime is built here so that its sockets register with it (and
    // their errors are the caller's); its thread then drives it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(VrrpError::Thread)?;
    let wire = {
        let _in_runtime = runtime.enter();
        Net {
            sock: AdvertSocket::open(&interface, src, cfg.peers.is_empty())?,
            announcer: AnnounceSocket::open(&interface)?,
        }
    };
    let (speaker, changes) = Speaker::new(&cfg, interface, vips, mac, key, wire, switch)?;
    let status = speaker.published.clone();
    let (priority_tx, priority_rx) = watch::channel(cfg.priority);
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    realtime::lock_memory();
    let rt_priority = cfg.rt_priority;
    let thread = std::thread::Builder::new()
        .name(format!("vrrp-{}", cfg.router_id))
        .spawn(move || {
            realtime::set_thread_priority(rt_priority);
            runtime.block_on(run(speaker, stop_rx, priority_rx));
            drop(runtime);
            let _ = done_tx.send(());
        })
        .map_err(VrrpError::Thread)?;
    Ok((
        VrrpHandle {
            priority: priority_tx,
            stop: Some(stop_tx),
            status,
            done: Some(done_rx),
            thread: Some(thread),
        },
        changes,
    ))
}

fn warn_if_readable(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "vrrp: warning: key file {} is readable by group or others",
            path.display()
        );
    }
}

fn fmt_list(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the speaker puts on the wire: adverts and announcements. The real one is two
/// sockets; tests record what would have been sent.
trait Wire {
    /// The advert source.
    fn src(&self) -> IpAddr;
    fn send_advert(&mut self, dst: IpAddr, packet: &[u8]) -> io::Result<()>;
    fn announce(&mut self, frame: &[u8]) -> io::Result<()>;
}

struct Net {
    sock: AdvertSocket,
    announcer: AnnounceSocket,
}

impl Wire for Net {
    fn src(&self) -> IpAddr {
        self.sock.src()
    }

    fn send_advert(&mut self, dst: IpAddr, packet: &[u8]) -> io::Result<()> {
        self.sock.send_to(dst, packet)
    }

    fn announce(&mut self, frame: &[u8]) -> io::Result<()> {
        self.announcer.send(frame)
    }
}

struct Auth {
    key: AuthKey,
    sequencer: Sequencer,
    verifier: Verifier,
}

struct Speaker<W> {
    machine: Machine,
    router_id: u8,
    interval_cs: u16,
    peers: Vec<IpAddr>,
    notify: Option<PathBuf>,
    wire: W,
    dests: Vec<IpAddr>,
    /// The VIPs of the election's family, as adverts carry them.
    advert_vips: Vec<IpAddr>,
    /// Every VIP, announced on becoming master.
    all_vips: Vec<IpAddr>,
    mac: [u8; 6],
    auth: Option<Auth>,
    /// The status as this thread keeps it; `publish` hands out snapshots of it.
    status: VrrpStatus,
    published: Arc<ArcSwap<VrrpStatus>>,
    changes: mpsc::UnboundedSender<StateChange>,
    switch: Box<dyn ServeSwitch>,
    /// Whether the data path should serve now.
    serve: bool,
    /// What the switch was last set to; `None` before the first write and after a
    /// failed one (the map's state is then unknown).
    serving: Option<bool>,
    switch_retry: Option<Instant>,
    announce_left: u32,
    announce_next: Option<Instant>,
    /// Per peer, when its clock skew alarm was last logged.
    skew_logged: HashMap<IpAddr, Instant>,
}

impl<W: Wire> Speaker<W> {
    fn new(
        cfg: &VrrpConfig,
        interface: String,
        vips: Vec<IpAddr>,
        mac: [u8; 6],
        key: Option<AuthKey>,
        wire: W,
        switch: Box<dyn ServeSwitch>,
    ) -> Result<(Self, mpsc::UnboundedReceiver<StateChange>), VrrpError> {
        let v4 = cfg.family_v4(&vips);
        let src = wire.src();
        let mut seen = HashSet::new();
        let all_vips: Vec<IpAddr> = vips.into_iter().filter(|v| seen.insert(*v)).collect();
        let advert_vips: Vec<IpAddr> = all_vips
            .iter()
            .copied()
            .filter(|v| v.is_ipv4() == v4)
            .collect();
        if advert_vips.len() > 255 {
            return Err(VrrpError::TooManyVips(advert_vips.len()));
        }
        let multicast = cfg.peers.is_empty();
        let dests = if multicast {
            vec![if v4 {
                IpAddr::V4(packet::GROUP_V4)
            } else {
                IpAddr::V6(packet::GROUP_V6)
            }]
        } else {
            cfg.peers.clone()
        };
        let interval = cfg.interval();
        let machine = Machine::new(Params {
            priority: cfg.priority,
            interval,
            preempt: cfg.preempt,
            preempt_delay: Duration::from_millis(u64::from(cfg.preempt_delay_ms)),
            address: src,
        });
        let status = VrrpStatus {
            state: VrrpState::Init,
            router_id: cfg.router_id,
            interface: interface.clone(),
            address: src,
            mode: if multicast { "multicast" } else { "unicast" }.to_string(),
            authenticated: key.is_some(),
            priority: cfg.priority,
            effective_priority: cfg.priority,
            advert_interval_ms: cfg.advert_interval_ms,
            master: None,
            last_transition: None,
            counters: VrrpCounters::default(),
            alarms: Vec::new(),
        };
        let window = auth::window_for(interval);
        let (changes_tx, changes_rx) = mpsc::unbounded_channel();
        tracing::info!(
            "vrrp {}: on {interface} from {src}, {}, priority {}, advert every {} ms{}",
            cfg.router_id,
            if multicast {
                "multicast".to_string()
            } else {
                format!("unicast to {}", fmt_list(&cfg.peers))
            },
            cfg.priority,
            cfg.advert_interval_ms,
            if key.is_some() { ", authenticated" } else { "" }
        );
        let speaker = Speaker {
            machine,
            router_id: cfg.router_id,
            interval_cs: cfg.interval_cs(),
            peers: cfg.peers.clone(),
            notify: cfg.notify.clone(),
            wire,
            dests,
            advert_vips,
            all_vips,
            mac,
            auth: key.map(|k| Auth {
                sequencer: Sequencer::new(window),
                verifier: Verifier::new(k.clone(), window),
                key: k,
            }),
            published: Arc::new(ArcSwap::from_pointee(status.clone())),
            status,
            changes: changes_tx,
            switch,
            serve: false,
            serving: None,
            switch_retry: None,
            announce_left: 0,
            announce_next: None,
            skew_logged: HashMap::new(),
        };
        Ok((speaker, changes_rx))
    }
}

async fn run(
    mut sp: Speaker<Net>,
    mut stop: oneshot::Receiver<Duration>,
    mut priority: watch::Receiver<u8>,
) {
    let now = Instant::now();
    // Off until the election says otherwise, whatever the map held.
    sp.sync_switch(now);
    // A priority set between spawn and here counts from the start.
    let p = *priority.borrow_and_update();
    let mut actions = sp.machine.set_effective_priority(now, p);
    actions.extend(sp.machine.start(now));
    sp.apply(now, actions);
    sp.publish();
    let mut buf = vec![0u8; RECV_BUF];
    let mut priority_open = true;
    let extra = loop {
        let deadline = sp.next_deadline();
        let sleep = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            extra = &mut stop => break extra.unwrap_or(Duration::ZERO),
            changed = priority.changed(), if priority_open => match changed {
                Ok(()) => {
                    let p = *priority.borrow_and_update();
                    sp.set_priority(Instant::now(), p);
                }
                // The handle is gone; the stop channel says so too.
                Err(_) => priority_open = false,
            },
            received = sp.wire.sock.recv(&mut buf) => {
                let now = Instant::now();
                match received {
                    Ok(Some(r)) => sp.on_packet(now, &r, &buf),
                    Ok(None) => sp.drop_advert(None, "unreadable_ip_header", "IP header cut short"),
                    Err(e) => {
                        let n = sp.count(|c| &mut c.receive_errors);
                        if n.is_power_of_two() {
                            tracing::warn!("vrrp: receive error ({n} so far): {e}");
                        }
                    }
                }
            }
            () = sleep => sp.on_timer(Instant::now()),
        }
        sp.publish();
    };
    // Graceful stop: priority 0 first, so the peer takes over within its skew time;
    // a master keeps forwarding meanwhile, then stops serving and says so.
    let now = Instant::now();
    let was_master = sp.machine.state() == VrrpState::Master;
    let (sends, rest): (Vec<Action>, Vec<Action>) = sp
        .machine
        .shutdown(now)
        .into_iter()
        .partition(|a| matches!(a, Action::SendAdvert { .. }));
    sp.apply(now, sends);
    if was_master {
        let grace = sp.machine.params().interval.min(Duration::from_secs(1)) + extra;
        tokio::time::sleep(grace).await;
    }
    sp.apply(Instant::now(), rest);
    // Never leave this host serving: a few more tries if the switch fails.
    for _ in 0..100 {
        if sp.serving == Some(false) {
            break;
        }
        tokio::time::sleep(SWITCH_RETRY).await;
        sp.sync_switch(Instant::now());
    }
    sp.publish();
}

impl<W: Wire> Speaker<W> {
    fn count(&mut self, field: impl FnOnce(&mut VrrpCounters) -> &mut u64) -> u64 {
        let c = field(&mut self.status.counters);
        *c += 1;
        *c
    }

    /// When the loop next has something to do on its own.
    fn next_deadline(&self) -> Option<Instant> {
        [
            self.machine.next_deadline(),
            self.announce_next,
            self.switch_retry,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timer(&mut self, now: Instant) {
        if self.switch_retry.is_some_and(|t| t <= now) {
            self.sync_switch(now);
        }
        let actions = self.machine.on_timer(now);
        self.apply(now, actions);
        if self.announce_next.is_some_and(|t| t <= now) {
            self.announce_round(now);
        }
    }

    fn set_priority(&mut self, now: Instant, priority: u8) {
        let actions = self.machine.set_effective_priority(now, priority);
        self.apply(now, actions);
    }

    /// Counts a dropped advert; logs the 1st, 2nd, 4th, 8th... of each reason.
    fn drop_advert(&mut self, src: Option<IpAddr>, name: &str, why: &str) {
        let n = {
            let c = self
                .status
                .counters
                .dropped
                .entry(name.to_string())
                .or_default();
            *c += 1;
            *c
        };
        if n.is_power_of_two() {
            let from = src.map(|s| format!(" from {s}")).unwrap_or_default();
            tracing::warn!(
                "vrrp {}: dropped advert{from}: {why} ({name}: {n} so far)",
                self.router_id
            );
        }
    }

    fn on_packet(&mut self, now: Instant, r: &Received, buf: &[u8]) {
        let src = r.env.src;
        if src == self.wire.src() {
            return self.drop_advert(Some(src), "from_self", "our own advert");
        }
        if !self.peers.is_empty() && !self.peers.contains(&src) {
            return self.drop_advert(Some(src), "unknown_source", "not a configured peer");
        }
        let Some(payload) = buf.get(r.payload.clone()) else {
            return self.drop_advert(Some(src), DropReason::TooShort.name(), "cut short");
        };
        let verifier = self.auth.as_mut().map(|a| &mut a.verifier);
        let advert = match packet::decode(payload, &r.env, self.router_id, verifier, unix_now()) {
            Ok(a) => a,
            Err(reason) => {
                if let DropReason::Auth(AuthError::Stale { skew_ms }) = reason {
                    self.clock_skew(now, src, skew_ms);
                }
                return self.drop_advert(Some(src), reason.name(), &reason.to_string());
            }
        };
        // Our router id with other VIPs: another group on the segment (or a peer
        // configured with other services). Obeying it would hand our VIPs to a host
        // that does not serve them, or take over theirs.
        let ours: HashSet<&IpAddr> = self.advert_vips.iter().collect();
        let theirs: HashSet<&IpAddr> = advert.addresses.iter().collect();
        if ours != theirs {
            let why = format!(
                "lists VIPs [{}], ours are [{}]: another group with our router id, or the two hosts' services differ",
                fmt_list(&advert.addresses),
                fmt_list(&self.advert_vips)
            );
            return self.drop_advert(Some(src), "foreign_group", &why);
        }
        self.count(|c| &mut c.adverts_received);
        self.clear_clock_skew(src);
        let actions = self
            .machine
            .on_advert(now, src, advert.priority, advert.interval());
        self.apply(now, actions);
    }

    /// An authentic advert dropped for its age alone: the peer's clock (or ours) is
    /// off, or someone replays old captures. Either way an operator should know.
    fn clock_skew(&mut self, now: Instant, src: IpAddr, skew_ms: i64) {
        self.count(|c| &mut c.clock_skew);
        let secs = skew_ms.unsigned_abs() as f64 / 1000.0;
        let message = if skew_ms >= 0 {
            format!("adverts from {src} are {secs:.1} s stale: clock skew?")
        } else {
            format!("adverts from {src} are {secs:.1} s ahead of our clock: clock skew?")
        };
        let at_unix_ms = unix_ms();
        match self
            .status
            .alarms
            .iter_mut()
            .find(|a| a.kind == "clock_skew" && a.source == src)
        {
            Some(a) => {
                a.message.clone_from(&message);
                a.at_unix_ms = at_unix_ms;
            }
            None => self.status.alarms.push(VrrpAlarm {
                kind: "clock_skew".into(),
                source: src,
                message: message.clone(),
                at_unix_ms,
            }),
        }
        if self
            .skew_logged
            .get(&src)
            .is_none_or(|t| now >= *t + ALARM_LOG_EVERY)
        {
            self.skew_logged.insert(src, now);
            tracing::warn!(
                "vrrp {}: alarm: {message} Its adverts carry the right HMAC but a time stamp outside the freshness window, so they are dropped: synchronise the hosts' clocks (or old adverts are being replayed)",
                self.router_id
            );
        }
    }

    fn clear_clock_skew(&mut self, src: IpAddr) {
        let before = self.status.alarms.len();
        self.status
            .alarms
            .retain(|a| !(a.kind == "clock_skew" && a.source == src));
        if self.status.alarms.len() != before {
            self.skew_logged.remove(&src);
            tracing::info!(
                "vrrp {}: adverts from {src} are fresh again: clock skew alarm cleared",
                self.router_id
            );
        }
    }

    fn apply(&mut self, now: Instant, actions: Vec<Action>) {
        // The switch moves before anything else a transition brings: off before the
        // advert that yields or resigns, on before the first announcement.
        if let Some(to) = actions.iter().rev().find_map(|a| match a {
            Action::Transition(t) => Some(t.to),
            _ => None,
        }) {
            self.serve = to.serves();
            self.sync_switch(now);
        }
        for action in actions {
            match action {
                Action::SendAdvert { priority } => self.send_advert(priority),
                Action::Transition(t) => self.transition(now, t),
                Action::Announce => {
                    tracing::info!(
                        "vrrp {}: heard another master: announcing the VIPs again",
                        self.router_id
                    );
                    self.announce_left = ANNOUNCE_ROUNDS;
                    self.announce_round(now);
                }
            }
        }
    }

    /// Brings the data path's switch to `serve`; a failure is retried from the loop.
    fn sync_switch(&mut self, now: Instant) {
        if self.serving == Some(self.serve) {
            self.switch_retry = None;
            return;
        }
        let on = self.serve;
        let lease = if on { self.lease_until_ns() } else { 0 };
        match self.switch.set_serving(on, lease) {
            Ok(()) => {
                if self.switch_retry.is_some() {
                    tracing::info!(
                        "vrrp {}: serving switch set {} after failures",
                        self.router_id,
                        if on { "on" } else { "off" }
                    );
                }
                self.serving = Some(on);
                self.switch_retry = None;
            }
            Err(e) => {
                self.serving = None;
                self.switch_retry = Some(now + SWITCH_RETRY);
                let n = self.count(|c| &mut c.serve_switch_errors);
                if n.is_power_of_two() {
                    tracing::warn!(
                        "vrrp {}: setting the serving switch {}: {e} ({n} so far); retrying every {} ms",
                        self.router_id,
                        if on { "on" } else { "off" },
                        SWITCH_RETRY.as_millis()
                    );
                }
            }
        }
    }

    /// When serving set now should end unless renewed.
    fn lease_until_ns(&self) -> u64 {
        let lease = self.machine.params().interval * LEASE_INTERVALS;
        crate::dataplane::monotonic_ns().saturating_add(lease.as_nanos() as u64)
    }

    /// A master renews its lease with each advert: one map write, never a wait. A failed
    /// renewal is counted and logged; the next advert tries again.
    fn renew_lease(&mut self) {
        if !(self.serve && self.serving == Some(true)) {
            return;
        }
        if let Err(e) = self.switch.set_serving(true, self.lease_until_ns()) {
            let n = self.count(|c| &mut c.serve_switch_errors);
            if n.is_power_of_two() {
                tracing::warn!(
                    "vrrp {}: renewing the serving lease: {e} ({n} so far)",
                    self.router_id
                );
            }
        }
    }

    fn send_advert(&mut self, priority: u8) {
        self.renew_lease();
        let advert = Advert {
            router_id: self.router_id,
            priority,
            interval_cs: self.interval_cs,
            addresses: self.advert_vips.clone(),
        };
        // One sequence number per advert: the HMAC does not cover the destination.
        let seq = self.auth.as_mut().map(|a| a.sequencer.next(unix_now()));
        let src = self.wire.src();
        for i in 0..self.dests.len() {
            let dst = self.dests[i];
            let auth = self.auth.as_ref().zip(seq).map(|(a, seq)| (&a.key, seq));
            let sent = packet::encode(&advert, src, dst, auth)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    self.wire
                        .send_advert(dst, &bytes)
                        .map_err(|e| e.to_string())
                });
            match sent {
                Ok(()) => {
                    self.count(|c| &mut c.adverts_sent);
                }
                Err(e) => {
                    let n = self.count(|c| &mut c.send_errors);
                    if n.is_power_of_two() {
                        tracing::warn!(
                            "vrrp {}: sending an advert to {dst}: {e} ({n} so far)",
                            self.router_id
                        );
                    }
                }
            }
        }
    }

    fn transition(&mut self, now: Instant, t: Transition) {
        let reason = t.reason.to_string();
        tracing::info!(
            event = "vrrp_transition",
            router_id = self.router_id,
            from = %t.from,
            to = %t.to,
            reason = %reason,
            "vrrp {}: {} -> {}: {reason}",
            self.router_id,
            t.from,
            t.to
        );
        self.status.counters.transitions += 1;
        self.status.last_transition = Some(TransitionStatus {
            at_unix_ms: unix_ms(),
            from: t.from,
            to: t.to,
            reason: reason.clone(),
        });
        if t.to == VrrpState::Master {
            self.announce_left = ANNOUNCE_ROUNDS;
            self.announce_round(now);
        } else {
            self.announce_left = 0;
            self.announce_next = None;
        }
        if let Some(cmd) = &self.notify {
            notify(cmd, t.from, t.to, &reason);
        }
        // Unbounded: the agent may fall behind, never lose one. It fails only when the
        // agent has gone, and then nobody is left to tell.
        let _ = self.changes.send(StateChange {
            from: t.from,
            to: t.to,
            reason,
        });
    }

    fn announce_round(&mut self, now: Instant) {
        if self.serving != Some(true) {
            // Pointing the segment at a host that does not forward would black-hole
            // the VIPs: wait for the switch (retried every SWITCH_RETRY).
            self.announce_next = Some(now + SWITCH_RETRY);
            return;
        }
        for i in 0..self.all_vips.len() {
            let vip = self.all_vips[i];
            match self.wire.announce(&announce::frame(self.mac, vip)) {
                Ok(()) => {
                    self.count(|c| &mut c.announcements_sent);
                }
                Err(e) => {
                    let n = self.count(|c| &mut c.announcement_errors);
                    if n.is_power_of_two() {
                        tracing::warn!("vrrp: announcing {vip}: {e} ({n} so far)");
                    }
                }
            }
        }
        self.announce_left = self.announce_left.saturating_sub(1);
        self.announce_next = (self.announce_left > 0).then(|| now + ANNOUNCE_SPACING);
    }

    /// Hands out a snapshot of the status: readers never wait for this thread, nor it
    /// for them.
    fn publish(&mut self) {
        self.status.state = self.machine.state();
        self.status.effective_priority = self.machine.effective_priority();
        self.status.master = self
            .machine
            .master()
            .map(|(address, priority)| MasterStatus { address, priority });
        self.published.store(Arc::new(self.status.clone()));
    }
}

/// Runs the notify command with the new state as its argument, in the background.
fn notify(cmd: &Path, from: VrrpState, to: VrrpState, reason: &str) {
    let spawned = Command::new(cmd)
        .arg(to.as_str())
        .env("LB_VRRP_FROM", from.as_str())
        .env("LB_VRRP_REASON", reason)
        .stdin(Stdio::null())
        .spawn();
    let cmd = cmd.display().to_string();
    match spawned {
        // Reaped on its own thread: a slow script never holds up the loop, and a
        // thread (unlike a tokio blocking task) never holds up the runtime's shutdown.
        Ok(mut child) => {
            std::thread::spawn(move || match child.wait() {
                Ok(s) if s.success() => {}
                Ok(s) => tracing::warn!("vrrp: notify {cmd} {to}: {s}"),
                Err(e) => tracing::warn!("vrrp: notify {cmd} {to}: {e}"),
            });
        }
        Err(e) => tracing::warn!("vrrp: notify {cmd} {to}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::dataplane::DataPlaneError;

    /// What the speaker did, in order: the switch, adverts, announcements.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Event {
        Serving(bool),
        Advert { priority: u8 },
        Announce,
    }

    type Log = Arc<Mutex<Vec<Event>>>;

    const SRC: &str = "192.0.2.1";
    const PEER: &str = "192.0.2.2";
    const VIP: &str = "192.0.2.100";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    struct FakeWire(Log);

    impl Wire for FakeWire {
        fn src(&self) -> IpAddr {
            ip(SRC)
        }

        fn send_advert(&mut self, _dst: IpAddr, packet: &[u8]) -> io::Result<()> {
            // The VRRP message as encoded: byte 2 is the priority.
            self.0.lock().unwrap().push(Event::Advert {
                priority: packet[2],
            });
            Ok(())
        }

        fn announce(&mut self, _frame: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().push(Event::Announce);
            Ok(())
        }
    }

    /// A switch that logs its changes (not lease renewals), and fails the first `fail`
    /// writes; the last lease written is kept.
    struct Switch {
        log: Log,
        fail: usize,
        last: Option<bool>,
        lease: Arc<std::sync::atomic::AtomicU64>,
    }

    impl ServeSwitch for Switch {
        fn set_serving(&mut self, on: bool, lease_until_ns: u64) -> Result<(), DataPlaneError> {
            if self.fail > 0 {
                self.fail -= 1;
                return Err(DataPlaneError::Missing {
                    kind: "map",
                    name: "SERVING",
                });
            }
            self.lease
                .store(lease_until_ns, std::sync::atomic::Ordering::SeqCst);
            if self.last != Some(on) {
                self.log.lock().unwrap().push(Event::Serving(on));
                self.last = Some(on);
            }
            Ok(())
        }
    }

    use crate::vrrp::tests::cfg;

    type Made = (Speaker<FakeWire>, mpsc::UnboundedReceiver<StateChange>, Log);

    fn speaker(fail: usize) -> Made {
        keyed_speaker(fail, None)
    }

    fn keyed_speaker(fail: usize, key: Option<AuthKey>) -> Made {
        leased_speaker(fail, key, Arc::default())
    }

    /// A speaker whose switch keeps the last lease written in `lease`.
    fn leased_speaker(
        fail: usize,
        key: Option<AuthKey>,
        lease: Arc<std::sync::atomic::AtomicU64>,
    ) -> Made {
        let log = Log::default();
        let (sp, rx) = Speaker::new(
            &cfg(),
            "test0".into(),
            vec![ip(VIP), ip("2001:db8::100")],
            [2, 0, 0, 0, 0, 1],
            key,
            FakeWire(log.clone()),
            Box::new(Switch {
                log: log.clone(),
                fail,
                last: None,
                lease,
            }),
        )
        .unwrap();
        (sp, rx, log)
    }

    /// Starts `sp` as `run` does and brings it to master; returns the time.
    fn to_master(sp: &mut Speaker<FakeWire>) -> Instant {
        let t0 = Instant::now();
        sp.sync_switch(t0);
        let actions = sp.machine.start(t0);
        sp.apply(t0, actions);
        let t = t0 + sp.machine.master_down_interval();
        sp.on_timer(t);
        assert_eq!(sp.machine.state(), VrrpState::Master);
        t
    }

    fn take(log: &Log) -> Vec<Event> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    /// An advert from `src` as received, with `vips`.
    fn received(src: &str, priority: u8, vips: &[&str]) -> (Received, Vec<u8>) {
        signed(src, priority, vips, None)
    }

    /// The same, with a trailer signed by `auth` (key, sequence).
    fn signed(
        src: &str,
        priority: u8,
        vips: &[&str],
        auth: Option<(&AuthKey, u64)>,
    ) -> (Received, Vec<u8>) {
        let adv = Advert {
            router_id: 51,
            priority,
            interval_cs: 10,
            addresses: vips.iter().map(|v| ip(v)).collect(),
        };
        let dst = IpAddr::V4(packet::GROUP_V4);
        let bytes = packet::encode(&adv, ip(src), dst, auth).unwrap();
        let r = Received {
            env: packet::Envelope {
                src: ip(src),
                dst,
                ttl: packet::TTL,
            },
            payload: 0..bytes.len(),
        };
        (r, bytes)
    }

    #[test]
    fn serving_goes_on_before_the_first_announcement_and_off_first_on_leaving() {
        let (mut sp, mut rx, log) = speaker(0);
        let t = to_master(&mut sp);
        let events = take(&log);
        // Off at start, on before anything a new master sends: both VIPs announced,
        // then the first advert.
        assert_eq!(
            events,
            vec![
                Event::Serving(false),
                Event::Serving(true),
                Event::Announce,
                Event::Announce,
                Event::Advert { priority: 100 },
            ]
        );
        // Yielding to a higher priority: off before the last advert at our priority.
        let (r, bytes) = received(PEER, 200, &[VIP]);
        sp.on_packet(t, &r, &bytes);
        assert_eq!(sp.machine.state(), VrrpState::Backup);
        assert_eq!(
            take(&log),
            vec![Event::Serving(false), Event::Advert { priority: 100 }]
        );
        // Resigning (tracking says the data path cannot serve): off before priority 0.
        let (mut sp, _rx2, log) = speaker(0);
        let t = to_master(&mut sp);
        take(&log);
        sp.set_priority(t, 0);
        assert_eq!(sp.machine.state(), VrrpState::Fault);
        assert_eq!(
            take(&log),
            vec![Event::Serving(false), Event::Advert { priority: 0 }]
        );
        let states: Vec<VrrpState> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|c| c.to)
            .collect();
        assert_eq!(
            states,
            vec![VrrpState::Backup, VrrpState::Master, VrrpState::Backup]
        );
    }

    /// Each transition is one structured event (`--log-format json`) and one count.
    #[test]
    fn each_transition_is_one_structured_event() {
        let log = crate::logging::capture::json();
        let (mut sp, mut rx, _) = speaker(0);
        let t = to_master(&mut sp);
        let (r, bytes) = received(PEER, 200, &[VIP]);
        sp.on_packet(t, &r, &bytes);
        assert_eq!(sp.machine.state(), VrrpState::Backup);
        let changes: Vec<StateChange> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        let events = log.events("vrrp_transition");
        assert_eq!(events.len(), changes.len(), "{events:?}");
        assert_eq!(sp.status.counters.transitions, changes.len() as u64);
        for (e, c) in events.iter().zip(&changes) {
            let f = &e["fields"];
            assert_eq!(e["level"], "INFO");
            assert_eq!(f["router_id"], 51);
            assert_eq!(f["from"], c.from.as_str());
            assert_eq!(f["to"], c.to.as_str());
            assert_eq!(f["reason"], c.reason.as_str());
        }
        let last = &events[events.len() - 1]["fields"];
        assert_eq!(
            (&last["from"], &last["to"]),
            (&"master".into(), &"backup".into())
        );
    }

    #[test]
    fn a_master_renews_its_serving_lease_with_every_advert() {
        use std::sync::atomic::Ordering::SeqCst;
        let lease = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (mut sp, _rx, _log) = leased_speaker(0, None, lease.clone());
        let t = to_master(&mut sp);
        let interval = sp.machine.params().interval;
        let window = (interval * LEASE_INTERVALS).as_nanos() as u64;
        let first = lease.load(SeqCst);
        let now = crate::dataplane::monotonic_ns();
        assert!(
            first > now && first <= now + window,
            "lease {first}, now {now}"
        );
        // The next advert, one interval on, renews it.
        std::thread::sleep(Duration::from_millis(2));
        sp.on_timer(t + interval);
        let renewed = lease.load(SeqCst);
        assert!(renewed > first, "lease not renewed: {first} then {renewed}");
        // Off: no lease (0), and a backup's adverts renew nothing.
        let (r, bytes) = received(PEER, 200, &[VIP]);
        sp.on_packet(t + interval, &r, &bytes);
        assert_eq!(sp.machine.state(), VrrpState::Backup);
        assert_eq!(lease.load(SeqCst), 0);
    }

    #[test]
    fn a_failed_switch_write_is_retried_and_nothing_is_announced_before_it_works() {
        // Every write fails until the new master's first "on": the start's "off", the
        // backup's, its retry at the master-down timer, then that "on".
        let (mut sp, _rx, log) = speaker(4);
        let t = to_master(&mut sp);
        assert_eq!(sp.status.counters.serve_switch_errors, 4);
        assert_eq!(sp.serving, None);
        // Adverts go out (the election goes on), announcements wait for the switch.
        let events = take(&log);
        assert!(!events.contains(&Event::Announce), "{events:?}");
        let retry = sp.next_deadline().unwrap();
        assert!(retry <= t + SWITCH_RETRY, "{retry:?}");
        sp.on_timer(retry);
        let events = take(&log);
        assert_eq!(events[0], Event::Serving(true), "{events:?}");
        assert_eq!(events[1..3], [Event::Announce, Event::Announce]);
        assert_eq!(sp.serving, Some(true));
    }

    #[test]
    fn no_state_change_is_lost_when_the_agent_does_not_read() {
        let (mut sp, mut rx, _log) = speaker(0);
        let mut t = Instant::now();
        let actions = sp.machine.start(t);
        sp.apply(t, actions);
        // Tracking flaps: backup -> fault -> backup ..., 10,000 transitions unread.
        for i in 0..10_000 {
            t += Duration::from_millis(1);
            sp.set_priority(t, if i % 2 == 0 { 0 } else { 100 });
        }
        let changes: Vec<StateChange> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(changes.len(), 10_001);
        assert_eq!(changes[0].to, VrrpState::Backup);
        for pair in changes.windows(2) {
            assert_eq!(pair[0].to, pair[1].from, "out of order: {pair:?}");
        }
        assert_eq!(changes.last().unwrap().to, VrrpState::Backup);
    }

    #[test]
    fn status_is_a_snapshot_published_after_each_turn() {
        let (mut sp, _rx, _log) = speaker(0);
        let published = sp.published.clone();
        let before = published.load_full();
        to_master(&mut sp);
        // Not yet published: readers see the last snapshot whole, never a half-made one.
        assert_eq!(published.load().state, VrrpState::Init);
        sp.publish();
        let now = published.load_full();
        assert_eq!(now.state, VrrpState::Master);
        assert_eq!(now.master.as_ref().map(|m| m.address), Some(ip(SRC)));
        assert!(now.counters.adverts_sent >= 1);
        // An old snapshot stays as it was for whoever holds it.
        assert_eq!(before.state, VrrpState::Init);
    }

    #[test]
    fn an_advert_of_another_group_is_dropped_never_obeyed() {
        let (mut sp, _rx, log) = speaker(0);
        let t = to_master(&mut sp);
        take(&log);
        // Our router id, priority 254, other VIPs: dropped and counted.
        for _ in 0..3 {
            let (r, bytes) = received(PEER, 254, &["192.0.2.200"]);
            sp.on_packet(t, &r, &bytes);
        }
        let (r, bytes) = received(PEER, 254, &[VIP, "192.0.2.200"]);
        sp.on_packet(t, &r, &bytes);
        assert_eq!(sp.machine.state(), VrrpState::Master);
        assert_eq!(sp.status.counters.dropped.get("foreign_group"), Some(&4));
        assert_eq!(sp.status.counters.adverts_received, 0);
        assert!(take(&log).is_empty());
        // The same list in another order is ours.
        let (r, bytes) = received(PEER, 254, &[VIP]);
        sp.on_packet(t, &r, &bytes);
        assert_eq!(sp.machine.state(), VrrpState::Backup);
    }

    #[test]
    fn an_authentic_stale_advert_raises_the_alarm_a_forged_one_does_not() {
        let key = AuthKey::from_bytes(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap();
        let other = AuthKey::from_bytes(b"another key, also 32 bytes long!".to_vec()).unwrap();
        let (mut sp, _rx, _log) = keyed_speaker(0, Some(key.clone()));
        let t = Instant::now();
        let stale = auth::seq_from_unix(unix_now() - Duration::from_secs(30));
        // Signed with another key and stale: a forgery, not a clock problem.
        let (r, bytes) = signed(PEER, 200, &[VIP], Some((&other, stale)));
        sp.on_packet(t, &r, &bytes);
        assert_eq!(sp.status.counters.dropped.get("auth_bad_hmac"), Some(&1));
        assert!(sp.status.alarms.is_empty());
        // The right key, 30 s old: dropped, counted, and an alarm.
        let (r, bytes) = signed(PEER, 200, &[VIP], Some((&key, stale)));
        sp.on_packet(t, &r, &bytes);
        assert_eq!(sp.status.counters.dropped.get("auth_stale"), Some(&1));
        assert_eq!(sp.status.counters.clock_skew, 1);
        assert_eq!(sp.status.alarms.len(), 1, "{:?}", sp.status.alarms);
        let message = &sp.status.alarms[0].message;
        assert!(
            message.starts_with(&format!("adverts from {PEER} are 3")),
            "{message}"
        );
        assert!(message.ends_with("s stale: clock skew?"), "{message}");
        assert_eq!(sp.status.counters.adverts_received, 0);
        // Fresh again: taken, and the alarm goes.
        let fresh = auth::seq_from_unix(unix_now());
        let (r, bytes) = signed(PEER, 200, &[VIP], Some((&key, fresh)));
        sp.on_packet(t, &r, &bytes);
        assert_eq!(sp.status.counters.adverts_received, 1);
        assert!(sp.status.alarms.is_empty());
    }

    #[test]
    fn clock_skew_raises_an_alarm_until_fresh_adverts_come() {
        let (mut sp, _rx, _log) = speaker(0);
        let now = Instant::now();
        sp.clock_skew(now, ip(PEER), 5_200);
        sp.clock_skew(now, ip(PEER), 5_300);
        assert_eq!(sp.status.counters.clock_skew, 2);
        assert_eq!(sp.status.alarms.len(), 1);
        let alarm = &sp.status.alarms[0];
        assert_eq!(
            (alarm.kind.as_str(), alarm.source),
            ("clock_skew", ip(PEER))
        );
        assert_eq!(
            alarm.message,
            format!("adverts from {PEER} are 5.3 s stale: clock skew?")
        );
        sp.clock_skew(now, ip("192.0.2.3"), -7_000);
        assert!(sp.status.alarms[1].message.contains("7.0 s ahead"));
        sp.clear_clock_skew(ip(PEER));
        assert_eq!(sp.status.alarms.len(), 1);
        assert_eq!(sp.status.alarms[0].source, ip("192.0.2.3"));
    }

    #[test]
    fn notify_runs_in_the_background_with_the_state() {
        let dir = std::env::temp_dir().join(format!("lb-vrrp-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let script = dir.join("notify.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$1 $LB_VRRP_FROM $LB_VRRP_REASON\" > {}\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        notify(&script, VrrpState::Backup, VrrpState::Master, "a reason");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = String::new();
        while Instant::now() < deadline {
            got = std::fs::read_to_string(&out).unwrap_or_default();
            if !got.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(got.trim(), "master backup a reason");
        // A missing command is logged, not fatal.
        notify(
            Path::new("/nonexistent/notify"),
            VrrpState::Master,
            VrrpState::Fault,
            "x",
        );
    }
}
