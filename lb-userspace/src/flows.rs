//! The flow scanner: everything the agent learns from, or does to, the flow tables,
//! on a thread of its own so that no control request and no VRRP timer waits for it.
//!
//! - It reads both tables in batches (`FlowStore::read`) right after every ring change
//!   and periodically, and publishes a [`FlowSnapshot`]: active flows per backend id,
//!   and how old that count is. `lbctl status`, `backend list` and `disable --wait` read
//!   the snapshot; none of them walks a table. The periodic scans take at most a
//!   [`SCAN_SHARE_DIVISOR`]th of a core: a full table of a million entries takes most
//!   of a second to read, so they come from [`SCAN_EVERY`] to [`SCAN_EVERY_MAX`] apart
//!   ([`next_scan_in`]).
//! - It keeps flows whose backend is no longer the ring's choice out of the reach of
//!   new flows taking their slots: such a flow is copied into the pinned table, which the program consults
//!   when the connection table misses. A flood that evicts the flow from the
//!   connection table then costs it nothing. Before the agent writes a new ring it hands
//!   the scanner that ring and waits for the copy ([`Scanner::prepare`]), so a flow
//!   is pinned before the ring stops choosing its backend; after the write the scanner
//!   looks again, for flows that arrived in between.
//! - It collects the pinned table: a flow leaves it once closed (FIN or RST from the
//!   client, plus `CLOSE_GRACE` for the last ACKs), idle for the idle timeout, when its
//!   backend can no longer forward (down: its flows go back to the ring), or when the
//!   ring chooses its backend again.
//!
//! - With `[sync]`, it tells the sync thread which flows it pinned and unpinned, named
//!   by backend (service and address) rather than by this host's backend id
//!   ([`wire_pins`]), and all of its pins every [`PIN_REFRESH_EVERY`]; and it
//!   installs the pins peers send ([`remote_pins`]), translated to its own ids, into
//!   its pinned table, where the same collection rules apply to them.
//!
//! - It collects the persistence table (`persistence_timeout_s`): expired entries are
//!   removed, live ones counted per VIP for `lbctl status`, and new or refreshed ones
//!   handed to the sync thread; peers' entries are installed (`crate::persist`).
//!
//! The decisions ([`to_pin`], [`to_unpin`], [`count_active`], [`wire_pins`],
//! [`remote_pins`]) are plain functions with plain tests; the thread only moves data
//! between them, the store and the sync thread.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use lb_common::{
    FLOW_F_CLOSING, FlowKey, FlowState, NAT_F_ESTABLISHED, NAT_F_FIN_BACKEND, NAT_F_FIN_CLIENT,
    NAT_F_RST, NAT_F_SYNCED, NatFlow, PersistKey, PersistState, VipKey, hash::flow_hash,
};

use crate::{
    config::BackendId,
    dataplane::{FlowStore, FlowTable, monotonic_ns},
    persist,
    sync::{
        PinSink,
        wire::{NatPin, Pin, Sticky},
    },
};

/// The scanner's maps of flows, keyed by 5-tuples from the network: hashed with
/// foldhash (seeded at random per map), not SipHash: with SipHash, a map of every entry
/// of the connection table (as each scan made then) was a third of the scanner's time.
pub type FlowMap<V> = HashMap<FlowKey, V, foldhash::quality::RandomState>;

/// How often the tables are read when nothing asks, at the most (`next_scan_in`).
pub const SCAN_EVERY: Duration = Duration::from_secs(1);
/// The periodic scans' share of one core, as a divisor: the next scan starts this many
/// times the last one's duration after it ended (`next_scan_in`). A full connection
/// table (a busy host's steady state: nothing leaves it but by a new flow taking a slot)
/// costs a scan 17 ms at the default 262,144 slots and 97 ms at 1M here (`cargo xtask
/// bench -- --scan-only`; read in place, the table mapped): once a second, 1.7% and
/// 8.8% of a core.
pub const SCAN_SHARE_DIVISOR: u32 = 20;
/// How stale the periodic scans may get, whatever they cost: the snapshot's counts
/// (`lbctl status`, `disable --wait`) and the NAT and pinned tables' collection wait
/// for them.
pub const SCAN_EVERY_MAX: Duration = Duration::from_secs(30);
/// How long a closed flow stays pinned, for the client's last ACKs.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// How often `prepare` looks whether the scanner still works on its way to the answer.
pub const PREPARE_WAIT: Duration = Duration::from_secs(2);
/// A scan that has run this long is taken for stuck: `prepare` stops waiting for it
/// and the agent writes the ring anyway. A million entries take most of a second.
pub const SCAN_STUCK: Duration = Duration::from_secs(60);
/// How often all pins (and NAT flows) go to the sync peers again, at the first scan
/// after it is due: their copies' idle time.
pub const PIN_REFRESH_EVERY: Duration = Duration::from_secs(10);

/// When the next periodic scan is due after one that took `took`: the scans take at
/// most a `SCAN_SHARE_DIVISOR`th of a core, from `SCAN_EVERY` to `SCAN_EVERY_MAX` apart.
pub fn next_scan_in(took: Duration) -> Duration {
    took.saturating_mul(SCAN_SHARE_DIVISOR)
        .clamp(SCAN_EVERY, SCAN_EVERY_MAX)
}

/// Whether `Scanner::prepare` still waits, at `now`, for a scanner whose latest scan
/// started at `started`: as long as that scan is younger than `SCAN_STUCK`. The scan
/// under way when it asked ends and its own starts, however long each takes: a fixed
/// wait would, on a table big enough, write the ring before the flows it moves were
/// pinned.
pub fn still_scanning(started: Option<Instant>, now: Instant) -> bool {
    started.is_some_and(|t| now.saturating_duration_since(t) < SCAN_STUCK)
}

/// What the data path does with new flows right now: each VIP's ring (by VIP number)
/// and the backend ids that may still take packets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RingSet {
    pub rings: HashMap<u32, Arc<Vec<u32>>>,
    pub forwarding: HashSet<u32>,
    /// This host's numbers for backends and VIPs, to name pins between hosts.
    pub names: Arc<Names>,
    /// `persistence_timeout_s` by VIP number (services without persistence: absent or 0).
    pub persistence: HashMap<u32, u32>,
}

/// Backend ids and VIP numbers of this host, both ways.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub backends: HashMap<u32, BackendId>,
    pub ids: HashMap<BackendId, u32>,
    pub vips: HashMap<VipKey, u32>,
}

/// Pins from a peer, for the scanner to install (or remove).
#[derive(Clone, Debug, Default)]
pub struct RemotePins {
    pub pins: Vec<Pin>,
    pub unpins: Vec<FlowKey>,
    /// NAT flows to install (both halves) or refresh.
    pub nat: Vec<NatPin>,
}

/// The sync thread's way to the scanner.
#[derive(Clone)]
pub struct PinInbox(mpsc::Sender<Command>);

impl PinInbox {
    pub fn deliver(&self, pins: RemotePins) {
        let _ = self.0.send(Command::Remote(pins));
    }

    /// A peer (re)connected: hand the sync thread every pin at once, rather than at the
    /// next periodic refresh, so a host back from a restart or a partition holds them
    /// before it can become master again.
    pub fn resend_all(&self) {
        let _ = self.0.send(Command::ResendAll);
    }

    /// A peer's persistence entries, to install.
    pub fn deliver_persistence(&self, entries: Vec<Sticky>) {
        let _ = self.0.send(Command::RemotePersist(entries));
    }
}

/// Pins of this host as peers should know them: by backend address, with their idle
/// time. Flows whose backend id has no name here (a plan not yet committed) are left
/// for the next scan's refresh.
pub fn wire_pins(
    pins: &[(FlowKey, FlowState)],
    merged: &FlowMap<FlowState>,
    names: &Names,
    now_ns: u64,
) -> Vec<Pin> {
    pins.iter()
        .filter_map(|(k, p)| {
            let s = merged.get(k).unwrap_or(p);
            let idle_ms = now_ns.saturating_sub(s.last_seen_ns) / 1_000_000;
            Some(Pin {
                key: *k,
                backend: names.backends.get(&p.backend)?.clone(),
                idle_ms: u32::try_from(idle_ms).unwrap_or(u32::MAX),
                closing: s.flags & FLOW_F_CLOSING != 0,
            })
        })
        .collect()
}

/// A peer's pins as entries of this host's pinned table: its backend id and VIP number
/// for the flow; skipped when this host has no such backend or VIP, or the backend does
/// not forward here. A pin whose backend this host's ring still chooses is installed
/// all the same: the peer pins before it tells us of the change that moves the ring
/// (and this host's scanner drops pins its ring agrees with at its next scan, by then
/// after the change).
pub fn remote_pins(pins: &[Pin], rings: &RingSet, now_ns: u64) -> Vec<(FlowKey, FlowState)> {
    pins.iter()
        .filter_map(|p| {
            let id = *rings.names.ids.get(&p.backend)?;
            let vip = VipKey {
                addr: p.key.dst,
                port_be: p.key.dport_be,
                proto: p.key.proto,
                family: p.key.family,
            };
            let vip_num = *rings.names.vips.get(&vip)?;
            if !rings.forwarding.contains(&id) {
                return None;
            }
            Some((
                p.key,
                FlowState {
                    backend: id,
                    vip_num,
                    last_seen_ns: now_ns.saturating_sub(u64::from(p.idle_ms) * 1_000_000),
                    flags: if p.closing { FLOW_F_CLOSING } else { 0 },
                    touched_jiffies: 0,
                },
            ))
        })
        .collect()
}

/// The NAT flow flags that travel to peers: the TCP state, not where the entry came from.
const NAT_WIRE_FLAGS: u32 = NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND | NAT_F_RST | NAT_F_ESTABLISHED;

/// This host's NAT flows as peers should know them: by backend address, with their
/// idle time and TCP state. Copies a peer sent (not seen here since) are not sent back.
pub fn wire_nat(flows: &[(FlowKey, NatFlow)], names: &Names, now_ns: u64) -> Vec<NatPin> {
    flows
        .iter()
        .filter(|(_, f)| f.flags & NAT_F_SYNCED == 0)
        .filter_map(|(k, f)| {
            let idle_ms = now_ns.saturating_sub(f.last_seen_ns) / 1_000_000;
            Some(NatPin {
                key: *k,
                backend: names.backends.get(&f.backend)?.clone(),
                bport: u16::from_be(f.bport_be),
                nport: u16::from_be(f.nport_be),
                idle_ms: u32::try_from(idle_ms).unwrap_or(u32::MAX),
                flags: (f.flags & NAT_WIRE_FLAGS) as u8,
                client_mac: f.client_mac,
            })
        })
        .collect()
}

/// A peer's NAT flows as entries of this host's NAT table: its backend id and VIP
/// number; skipped when this host has no such backend or VIP. Marked as synced.
pub fn remote_nat(flows: &[NatPin], rings: &RingSet, now_ns: u64) -> Vec<(FlowKey, NatFlow)> {
    flows
        .iter()
        .filter_map(|f| {
            let id = *rings.names.ids.get(&f.backend)?;
            let vip = VipKey {
                addr: f.key.dst,
                port_be: f.key.dport_be,
                proto: f.key.proto,
                family: f.key.family,
            };
            let vip_num = *rings.names.vips.get(&vip)?;
            let (baddr, family) = crate::programmer::addr_bytes(f.backend.address);
            if family != f.key.family {
                return None;
            }
            Some((
                f.key,
                NatFlow {
                    backend: id,
                    vip_num,
                    last_seen_ns: now_ns.saturating_sub(u64::from(f.idle_ms) * 1_000_000),
                    flags: u32::from(f.flags) & NAT_WIRE_FLAGS | NAT_F_SYNCED,
                    nport_be: f.nport.to_be(),
                    bport_be: f.bport.to_be(),
                    baddr,
                    client_mac: f.client_mac,
                    // This host's own next hops: asked for on the first packet here.
                    ..Default::default()
                },
            ))
        })
        .collect()
}

impl RingSet {
    /// The backend the ring gives this flow, if its VIP has a ring.
    pub fn choice(&self, vip_num: u32, key: &FlowKey) -> Option<u32> {
        let ring = self.rings.get(&vip_num)?;
        let len = u32::try_from(ring.len()).ok().filter(|n| *n > 0)?;
        ring.get((flow_hash(key) % len) as usize).copied()
    }
}

/// Active flows per backend, as of one scan.
#[derive(Clone, Debug, Default)]
pub struct FlowSnapshot {
    /// When the scan that made it started; `None` before the first one.
    pub taken_at: Option<Instant>,
    /// How long that scan took (`next_scan_in`).
    pub took: Duration,
    pub active: HashMap<u32, u64>,
    /// Entries in the connection table and in the pinned table.
    pub connections: usize,
    pub pinned: usize,
    /// Flows that should have been pinned but the pinned table was full (since start).
    pub pin_failures: u64,
    /// Pins from sync peers written into the pinned table (since start).
    pub remote_installed: u64,
    /// Live persistence entries (client addresses) per VIP number.
    pub persistent: HashMap<u32, u64>,
    /// Persistence entries from sync peers written into the table (since start).
    pub persistence_installed: u64,
    /// NAT flows (pairs) in the NAT tables, and pairs collected (since start).
    pub nat_flows: usize,
    pub nat_collected: u64,
    /// The last scan's error, if it failed.
    pub error: Option<String>,
}

impl FlowSnapshot {
    pub fn age(&self) -> Option<Duration> {
        self.taken_at.map(|t| t.elapsed())
    }
}

/// What `lbctl status` and the metrics show of a snapshot.
impl From<&FlowSnapshot> for crate::protocol::FlowTableStatus {
    fn from(s: &FlowSnapshot) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            scan_age_ms: s.age().map(ms),
            scan_ms: s.taken_at.map(|_| ms(s.took)),
            connections: s.connections as u64,
            pinned: s.pinned as u64,
            pin_failures: s.pin_failures,
            synced_pins_installed: s.remote_installed,
            nat_flows: s.nat_flows as u64,
            nat_collected: s.nat_collected,
            error: s.error.clone(),
        }
    }
}

/// Whether an entry still counts as an active flow at `now_ns`: no FIN or RST from the
/// client, and a packet within `idle`.
pub fn is_active(state: &FlowState, now_ns: u64, idle: Duration) -> bool {
    state.flags & FLOW_F_CLOSING == 0
        && now_ns.saturating_sub(state.last_seen_ns) < idle.as_nanos() as u64
}

/// The pinned flows as both tables see them: the freshest time, closed if either saw
/// the close, the pinned table's backend (it is the older pin). Only the pinned flows:
/// a map of the whole connection table, made at every scan, was a third of a scan's
/// time at a full table; a flow only in the connection table is its entry as it is.
pub fn merge(
    connections: &[(FlowKey, FlowState)],
    pinned: &[(FlowKey, FlowState)],
) -> FlowMap<FlowState> {
    let mut merged: FlowMap<FlowState> = pinned.iter().copied().collect();
    if merged.is_empty() {
        return merged;
    }
    for (k, c) in connections {
        if let Some(p) = merged.get_mut(k) {
            *p = FlowState {
                last_seen_ns: c.last_seen_ns.max(p.last_seen_ns),
                flags: c.flags | p.flags,
                ..*p
            };
        }
    }
    merged
}

/// Active flows per backend id: each flow once, a pinned one as `merged` (`merge`) has it.
pub fn count_active(
    connections: &[(FlowKey, FlowState)],
    merged: &FlowMap<FlowState>,
    now_ns: u64,
    idle: Duration,
) -> HashMap<u32, u64> {
    // Counted in a foldhash map too (one entry per flow), handed out as a plain one.
    let mut counts: HashMap<u32, u64, foldhash::quality::RandomState> = HashMap::default();
    let unpinned = connections
        .iter()
        .filter(|(k, _)| merged.is_empty() || !merged.contains_key(k))
        .map(|(_, s)| s);
    for state in unpinned.chain(merged.values()) {
        if is_active(state, now_ns, idle) {
            *counts.entry(state.backend).or_insert(0) += 1;
        }
    }
    counts.into_iter().collect()
}

/// Connection-table flows to copy into the pinned table: still active, their backend
/// still forwarding, and not the ring's choice (any more). Flows already pinned to the
/// same backend are left alone.
pub fn to_pin(
    connections: &[(FlowKey, FlowState)],
    pinned: &FlowMap<FlowState>,
    rings: &RingSet,
    now_ns: u64,
    idle: Duration,
) -> Vec<(FlowKey, FlowState)> {
    connections
        .iter()
        .filter(|(k, s)| {
            is_active(s, now_ns, idle)
                && rings.forwarding.contains(&s.backend)
                && rings
                    .choice(s.vip_num, k)
                    .is_some_and(|chosen| chosen != s.backend)
                && pinned.get(k).is_none_or(|p| p.backend != s.backend)
        })
        .copied()
        .collect()
}

/// Pinned flows to remove. `merged` is [`merge`] of both tables, so a pinned flow that
/// is busy in the connection table is not taken for idle.
pub fn to_unpin(
    pinned: &[(FlowKey, FlowState)],
    merged: &FlowMap<FlowState>,
    rings: &RingSet,
    now_ns: u64,
    idle: Duration,
) -> Vec<FlowKey> {
    pinned
        .iter()
        .filter(|(k, p)| {
            let s = merged.get(k).unwrap_or(p);
            let quiet_ns = now_ns.saturating_sub(s.last_seen_ns);
            let closed = s.flags & FLOW_F_CLOSING != 0 && quiet_ns >= CLOSE_GRACE.as_nanos() as u64;
            let idle = quiet_ns >= idle.as_nanos() as u64;
            let gone = !rings.forwarding.contains(&p.backend);
            let chosen_again = rings.choice(p.vip_num, k) == Some(p.backend);
            closed || idle || gone || chosen_again
        })
        .map(|(k, _)| *k)
        .collect()
}

enum Command {
    /// New rings; `done` is told once the flows they move are pinned.
    Rings {
        rings: Arc<RingSet>,
        done: Option<mpsc::SyncSender<()>>,
    },
    /// From now on, tell the sync thread what is pinned and unpinned.
    Sync(PinSink),
    /// Pins from a peer.
    Remote(RemotePins),
    /// Persistence entries from a peer.
    RemotePersist(Vec<Sticky>),
    /// Send every pin to the sync thread at the next scan, which runs now.
    ResendAll,
    Stop,
}

/// The agent's side of the scanner thread.
pub struct Scanner {
    commands: mpsc::Sender<Command>,
    snapshot: Arc<ArcSwap<FlowSnapshot>>,
    /// When the worker's latest scan started (`still_scanning`).
    started: Arc<Mutex<Option<Instant>>>,
    thread: Option<JoinHandle<()>>,
}

impl Scanner {
    /// Starts the thread over `store`. `idle`: when a quiet flow stops counting.
    pub fn spawn(store: Box<dyn FlowStore>, idle: Duration) -> std::io::Result<Self> {
        Self::spawn_nat(
            store,
            idle,
            Duration::from_secs(u64::from(crate::config::DEFAULT_NAT_TIME_WAIT_S)),
        )
    }

    /// As `spawn`; a NAT flow's pair is collected `nat_time_wait` after its close (or
    /// once idle for `idle`).
    pub fn spawn_nat(
        store: Box<dyn FlowStore>,
        idle: Duration,
        nat_time_wait: Duration,
    ) -> std::io::Result<Self> {
        let (commands, rx) = mpsc::channel();
        let snapshot = Arc::new(ArcSwap::from_pointee(FlowSnapshot::default()));
        let published = snapshot.clone();
        let started = Arc::new(Mutex::new(None));
        let scan_started = started.clone();
        let thread = std::thread::Builder::new()
            .name("lb-flows".into())
            .spawn(move || {
                Worker {
                    store,
                    idle,
                    nat_time_wait,
                    nat_collected: 0,
                    nat_left_out: 0,
                    nat_known: HashSet::default(),
                    rings: None,
                    snapshot: published,
                    started: scan_started,
                    pin_failures: 0,
                    logged_failures: 0,
                    sync: None,
                    last_refresh: None,
                    resend_all: false,
                    remote_installed: 0,
                    persist_seen: HashMap::new(),
                    persist_sent: HashMap::new(),
                    persistent: HashMap::new(),
                    persistence_installed: 0,
                }
                .run(rx)
            })?;
        Ok(Self {
            commands,
            snapshot,
            started,
            thread: Some(thread),
        })
    }

    /// Where the scanner publishes its snapshots, for readers off the agent's loop
    /// (the metrics endpoint).
    pub fn snapshot_source(&self) -> Arc<ArcSwap<FlowSnapshot>> {
        self.snapshot.clone()
    }

    /// The latest snapshot; never waits for a scan.
    pub fn snapshot(&self) -> Arc<FlowSnapshot> {
        self.snapshot.load_full()
    }

    /// Hands the scanner the rings about to be written and waits until the flows they
    /// move away from their backend are pinned, however long the scans take, while the
    /// scanner works (`still_scanning`). Returns false if it stopped or is stuck.
    pub fn prepare(&self, rings: Arc<RingSet>) -> bool {
        let (done, wait) = mpsc::sync_channel(1);
        let sent = self.commands.send(Command::Rings {
            rings,
            done: Some(done),
        });
        if sent.is_err() {
            return false;
        }
        loop {
            match wait.recv_timeout(PREPARE_WAIT) {
                Ok(()) => return true,
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let started = *self.started.lock().unwrap_or_else(|e| e.into_inner());
                    if !still_scanning(started, Instant::now()) {
                        return false;
                    }
                }
            }
        }
    }

    /// Where pins from peers are to be delivered.
    pub fn inbox(&self) -> PinInbox {
        PinInbox(self.commands.clone())
    }

    /// Tells the sync thread, from now on, which flows this scanner pins and unpins.
    pub fn connect_sync(&self, sink: PinSink) {
        let _ = self.commands.send(Command::Sync(sink));
    }

    /// The rings now in the maps: the scanner looks again for flows that took the old
    /// ones meanwhile, and from now on keeps to these.
    pub fn committed(&self, rings: Arc<RingSet>) {
        let _ = self.commands.send(Command::Rings { rings, done: None });
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    store: Box<dyn FlowStore>,
    idle: Duration,
    nat_time_wait: Duration,
    nat_collected: u64,
    /// A peer's NAT flows not installed (their port held here by another flow).
    nat_left_out: u64,
    /// The NAT flows of the last scan, to send only new ones between refreshes.
    nat_known: HashSet<FlowKey, foldhash::quality::RandomState>,
    /// None until the agent hands over its first rings: until then the tables are only
    /// read, never pinned or collected. The tables may be an earlier agent's (pinned
    /// maps), full of flows an empty ring set would take for flows of gone backends.
    rings: Option<Arc<RingSet>>,
    snapshot: Arc<ArcSwap<FlowSnapshot>>,
    /// When the latest scan started, for `Scanner::prepare`.
    started: Arc<Mutex<Option<Instant>>>,
    pin_failures: u64,
    logged_failures: u64,
    sync: Option<PinSink>,
    /// When all pins last went to the sync peers (`PIN_REFRESH_EVERY`).
    last_refresh: Option<Instant>,
    /// A peer asked for every pin: the next scan sends them all.
    resend_all: bool,
    /// Pins from peers written into the pinned table (since start).
    remote_installed: u64,
    /// The persistence table's live entries as the last scan saw them, plus those peers
    /// installed since: what is not in it (or differs) is new, for the sync peers.
    persist_seen: HashMap<PersistKey, PersistState>,
    /// What the sync peers were last told of each live entry (or told us).
    persist_sent: HashMap<PersistKey, PersistState>,
    /// Live persistence entries per VIP number, as of the last scan.
    persistent: HashMap<u32, u64>,
    persistence_installed: u64,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut next = Instant::now();
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Command::Rings { rings, done }) => {
                    self.rings = Some(rings);
                    next = self.scan();
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
                Ok(Command::Sync(sink)) => self.sync = Some(sink),
                Ok(Command::Remote(pins)) => self.install(pins),
                Ok(Command::RemotePersist(entries)) => self.install_persistence(entries),
                Ok(Command::ResendAll) => {
                    self.resend_all = true;
                    next = self.scan();
                }
                Ok(Command::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => next = self.scan(),
            }
        }
    }

    /// Writes a peer's pins into the pinned table, removes those it unpinned.
    fn install(&mut self, remote: RemotePins) {
        // Before the agent's first rings there are no local ids to translate to; the
        // peer's periodic full re-send brings these pins again.
        let Some(rings) = self.rings.clone() else {
            tracing::debug!(
                "a peer's flow pins arrived before the first rings; left for its re-send"
            );
            return;
        };
        if !remote.nat.is_empty() {
            let flows = remote_nat(&remote.nat, &rings, monotonic_ns());
            match self.store.install_nat(&flows) {
                Ok(left_out) => {
                    self.remote_installed += (flows.len() - left_out) as u64;
                    self.nat_left_out += left_out as u64;
                }
                Err(e) => tracing::warn!("installing a peer's NAT flows failed: {e}"),
            }
        }
        let pins = remote_pins(&remote.pins, &rings, monotonic_ns());
        let result = self.store.unpin(&remote.unpins).and_then(|()| {
            if pins.is_empty() {
                Ok(0)
            } else {
                self.store.pin(&pins)
            }
        });
        match result {
            Ok(full) => {
                self.remote_installed += (pins.len() - full) as u64;
                self.pin_failures += full as u64;
                // Published at once (not at the next scan): `lbctl status` and the bench
                // see what arrived.
                let old = self.snapshot.load_full();
                self.snapshot.store(Arc::new(FlowSnapshot {
                    remote_installed: self.remote_installed,
                    pin_failures: self.pin_failures,
                    ..(*old).clone()
                }));
            }
            Err(e) => tracing::warn!("installing a peer's flow pins failed: {e}"),
        }
    }

    /// Writes a peer's persistence entries into the table, where they are newer.
    fn install_persistence(&mut self, entries: Vec<Sticky>) {
        let Some(rings) = self.rings.clone() else {
            tracing::debug!("a peer's persistence entries arrived before the first rings");
            return;
        };
        let mine = persist::from_peer(&entries, &rings, &self.persist_seen, monotonic_ns());
        if mine.is_empty() {
            return;
        }
        match self.store.write_persist(&mine) {
            Ok(()) => {
                self.persistence_installed += mine.len() as u64;
                // Not new for the next scan: never sent back to the peer it came from.
                self.persist_seen.extend(mine.iter().copied());
                self.persist_sent.extend(mine.iter().copied());
                let old = self.snapshot.load_full();
                self.snapshot.store(Arc::new(FlowSnapshot {
                    persistence_installed: self.persistence_installed,
                    ..(*old).clone()
                }));
            }
            Err(e) => tracing::warn!("installing a peer's persistence entries failed: {e}"),
        }
    }

    /// Collects the persistence table and tells the sync thread what is new in it
    /// (everything when `all`).
    fn scan_persistence(
        &mut self,
        rings: &RingSet,
        now: u64,
        all: bool,
    ) -> Result<(), crate::dataplane::DataPlaneError> {
        let entries = self.store.read_persist()?;
        let scan = persist::scan(&entries, rings, now);
        if !scan.expired.is_empty() {
            self.store.remove_persist(&scan.expired)?;
        }
        if let Some(sink) = &self.sync {
            let send = if all {
                scan.live.clone()
            } else {
                persist::changed(&scan.live, &self.persist_sent, rings)
            };
            self.persist_sent.extend(send.iter().copied());
            sink.persisted(persist::to_wire(&send, &rings.names, now));
        }
        self.persist_seen = scan.live.into_iter().collect();
        self.persist_sent
            .retain(|k, _| self.persist_seen.contains_key(k));
        self.persistent = scan.per_vip;
        Ok(())
    }

    /// Reads every table and acts on it; returns when the next periodic scan is due
    /// (`next_scan_in` of how long this one took, which the snapshot carries too).
    fn scan(&mut self) -> Instant {
        let taken_at = Instant::now();
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(taken_at);
        // A peer asked for everything, or the refresh is due: all pins and NAT flows go.
        let resend_all = std::mem::take(&mut self.resend_all);
        let refresh = resend_all
            || self
                .last_refresh
                .is_none_or(|t| taken_at.duration_since(t) >= PIN_REFRESH_EVERY);
        let snapshot = match self.try_scan(resend_all, refresh) {
            Ok((mut active, connections, pinned)) => match self.scan_nat(&mut active, refresh) {
                Ok(nat_flows) => {
                    // Before the first rings nothing goes to the peers: not a refresh.
                    if refresh && self.rings.is_some() {
                        self.last_refresh = Some(taken_at);
                    }
                    FlowSnapshot {
                        taken_at: Some(taken_at),
                        took: taken_at.elapsed(),
                        active,
                        connections,
                        pinned,
                        pin_failures: self.pin_failures,
                        remote_installed: self.remote_installed,
                        persistent: self.persistent.clone(),
                        persistence_installed: self.persistence_installed,
                        nat_flows,
                        nat_collected: self.nat_collected,
                        error: None,
                    }
                }
                Err(e) => self.failed("NAT flow scan", e, resend_all, taken_at),
            },
            Err(e) => self.failed("flow scan", e, resend_all, taken_at),
        };
        let took = snapshot.took;
        self.snapshot.store(Arc::new(snapshot));
        Instant::now() + next_scan_in(took)
    }

    /// The snapshot after a failed scan: the last one's counts, with the error; a
    /// peer's ask for everything stays for the next scan.
    fn failed(
        &mut self,
        what: &str,
        e: crate::dataplane::DataPlaneError,
        resend_all: bool,
        taken_at: Instant,
    ) -> FlowSnapshot {
        tracing::warn!("{what} failed: {e}");
        self.resend_all |= resend_all;
        FlowSnapshot {
            took: taken_at.elapsed(),
            error: Some(e.to_string()),
            ..(*self.snapshot.load_full()).clone()
        }
    }

    /// Reads the NAT table: its active flows are added to `active`, closed and idle
    /// pairs are removed (both halves). Returns how many pairs remain.
    fn scan_nat(
        &mut self,
        active: &mut HashMap<u32, u64>,
        refresh: bool,
    ) -> Result<usize, crate::dataplane::DataPlaneError> {
        let flows = self.store.read_nat()?;
        let now = monotonic_ns();
        let (gone, live): (Vec<_>, Vec<_>) = flows
            .into_iter()
            .partition(|(_, f)| crate::nat::collect(f, now, self.idle, self.nat_time_wait));
        for (_, f) in &live {
            if crate::nat::is_active(f, now, self.idle) {
                *active.entry(f.backend).or_insert(0) += 1;
            }
        }
        if !gone.is_empty() {
            // A pair written since it was read (reopened by a SYN) stays, judged again
            // at the next scan.
            self.nat_collected += self.store.remove_nat(&gone)? as u64;
        }
        if let (Some(sink), Some(rings)) = (&self.sync, &self.rings) {
            // New flows at every scan, all of them with the pins' refresh.
            let send: Vec<(FlowKey, NatFlow)> = live
                .iter()
                .filter(|(k, _)| refresh || !self.nat_known.contains(k))
                .copied()
                .collect();
            sink.nat(wire_nat(&send, &rings.names, now));
        }
        self.nat_known = live.iter().map(|(k, _)| *k).collect();
        Ok(live.len())
    }

    /// The connection and pinned tables (and persistence): pins, unpins, counts. With
    /// `refresh`, all pins go to the sync peers, else the new ones; with `resend_all`,
    /// all persistence entries too.
    fn try_scan(
        &mut self,
        resend_all: bool,
        refresh: bool,
    ) -> Result<(HashMap<u32, u64>, usize, usize), crate::dataplane::DataPlaneError> {
        let connections = self.store.read(FlowTable::Connections)?;
        let pinned = self.store.read(FlowTable::Pinned)?;
        let now = monotonic_ns();
        let merged = merge(&connections, &pinned);
        let Some(rings) = self.rings.clone() else {
            return Ok((
                count_active(&connections, &merged, now, self.idle),
                connections.len(),
                pinned.len(),
            ));
        };
        // `merged` has every pinned flow, with its pinned backend.
        let pin = to_pin(&connections, &merged, &rings, now, self.idle);
        let unpin = to_unpin(&pinned, &merged, &rings, now, self.idle);
        if !unpin.is_empty() {
            self.store.unpin(&unpin)?;
        }
        let mut full = 0;
        if !pin.is_empty() {
            full = self.store.pin(&pin)?;
            if full > 0 {
                self.pin_failures += full as u64;
                // The 1st, 2nd, 4th... time: a full table is worth knowing, not a flood of lines.
                if self.logged_failures.count_ones() <= 1 {
                    tracing::warn!(
                        "pinned-flow table full: {full} flow(s) not pinned ({} so far); raise [agent] max_pinned_flows",
                        self.pin_failures
                    );
                }
                self.logged_failures += 1;
            }
        }
        // All entries only to a peer that (re)connects: busy clients' entries go out
        // again anyway (`persist::changed`), idle ones need no refresh to stay live.
        self.scan_persistence(&rings, now, resend_all)?;
        if let Some(sink) = &self.sync {
            let names = &rings.names;
            if refresh {
                let gone: HashSet<&FlowKey> = unpin.iter().collect();
                let all: Vec<(FlowKey, FlowState)> = pinned
                    .iter()
                    .filter(|(k, _)| !gone.contains(k))
                    .chain(pin.iter())
                    .copied()
                    .collect();
                sink.pinned(wire_pins(&all, &merged, names, now));
            } else {
                sink.pinned(wire_pins(&pin, &merged, names, now));
            }
            sink.unpinned(unpin.clone());
        }
        // New pins may overwrite old ones of the same flow: an upper bound until the next scan.
        let pinned_now = pinned.len().saturating_sub(unpin.len()) + pin.len().saturating_sub(full);
        Ok((
            count_active(&connections, &merged, now, self.idle),
            connections.len(),
            pinned_now,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::FakeFlowStore;

    const IDLE: Duration = Duration::from_secs(900);
    const NOW: u64 = 10_000_000_000_000;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            src: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [10, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport_be: port.to_be(),
            dport_be: 80u16.to_be(),
            proto: 6,
            family: 2,
            _pad: [0; 2],
        }
    }

    fn state(backend: u32) -> FlowState {
        FlowState {
            backend,
            vip_num: 0,
            last_seen_ns: NOW - 1_000_000_000,
            flags: 0,
            touched_jiffies: 0,
        }
    }

    /// A ring of 7 slots, every slot `backend`; `forwarding` ids still valid.
    fn rings(backend: u32, forwarding: &[u32]) -> RingSet {
        RingSet {
            rings: HashMap::from([(0, Arc::new(vec![backend; 7]))]),
            forwarding: forwarding.iter().copied().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn flows_off_the_ring_are_pinned_others_not() {
        let conns = vec![
            (key(1), state(1)),
            (key(2), state(2)),
            (
                key(3),
                FlowState {
                    flags: FLOW_F_CLOSING,
                    ..state(2)
                },
            ),
            (
                key(4),
                FlowState {
                    last_seen_ns: NOW - IDLE.as_nanos() as u64 - 1,
                    ..state(2)
                },
            ),
            // Its backend is down: it goes back to the ring, nothing to keep.
            (key(5), state(3)),
        ];
        let r = rings(1, &[1, 2]);
        let pin = to_pin(&conns, &FlowMap::default(), &r, NOW, IDLE);
        assert_eq!(pin, vec![(key(2), state(2))]);
        // Already pinned to that backend: not written again.
        let pinned = FlowMap::from_iter([(key(2), state(2))]);
        assert!(to_pin(&conns, &pinned, &r, NOW, IDLE).is_empty());
    }

    #[test]
    fn pinned_flows_leave_when_closed_idle_down_or_chosen_again() {
        let long_ago = NOW - CLOSE_GRACE.as_nanos() as u64 - 1;
        let pinned = vec![
            (key(1), state(2)),
            (
                key(2),
                FlowState {
                    flags: FLOW_F_CLOSING,
                    last_seen_ns: long_ago,
                    ..state(2)
                },
            ),
            // Closed just now: kept for the last ACKs.
            (
                key(3),
                FlowState {
                    flags: FLOW_F_CLOSING,
                    ..state(2)
                },
            ),
            (
                key(4),
                FlowState {
                    last_seen_ns: NOW - IDLE.as_nanos() as u64,
                    ..state(2)
                },
            ),
            (key(5), state(3)),
            (key(6), state(1)),
        ];
        let merged = merge(&[], &pinned);
        let mut gone = to_unpin(&pinned, &merged, &rings(1, &[1, 2]), NOW, IDLE);
        gone.sort_by_key(|k| u16::from_be(k.sport_be));
        assert_eq!(gone, vec![key(2), key(4), key(5), key(6)]);
    }

    #[test]
    fn a_busy_connection_entry_keeps_its_pin_from_idling_out() {
        let stale = FlowState {
            last_seen_ns: NOW - IDLE.as_nanos() as u64 - 5,
            ..state(2)
        };
        let pinned = vec![(key(1), stale)];
        let conns = vec![(key(1), state(2))];
        let merged = merge(&conns, &pinned);
        assert!(to_unpin(&pinned, &merged, &rings(1, &[1, 2]), NOW, IDLE).is_empty());
        // And a close seen by either table counts.
        let closing = vec![(
            key(1),
            FlowState {
                flags: FLOW_F_CLOSING,
                last_seen_ns: NOW - CLOSE_GRACE.as_nanos() as u64 - 1,
                ..state(2)
            },
        )];
        let merged = merge(&closing, &pinned);
        assert_eq!(
            to_unpin(&pinned, &merged, &rings(1, &[1, 2]), NOW, IDLE),
            vec![key(1)]
        );
    }

    #[test]
    fn closed_and_idle_flows_are_not_active() {
        let fresh = state(1);
        assert!(is_active(&fresh, NOW, IDLE));
        let closed = FlowState {
            flags: FLOW_F_CLOSING,
            ..fresh
        };
        assert!(!is_active(&closed, NOW, IDLE));
        let quiet = FlowState {
            last_seen_ns: NOW - IDLE.as_nanos() as u64 - 1,
            ..fresh
        };
        assert!(!is_active(&quiet, NOW, IDLE));
        // A time from after `now` (the program wrote it during the read) is fresh.
        let later = FlowState {
            last_seen_ns: NOW + 5,
            ..fresh
        };
        assert!(is_active(&later, NOW, IDLE));
    }

    #[test]
    fn active_counts_each_flow_once() {
        let conns = vec![(key(1), state(2)), (key(2), state(1))];
        let pinned = vec![(key(1), state(2))];
        let merged = merge(&conns, &pinned);
        let counts = count_active(&conns, &merged, NOW, IDLE);
        assert_eq!(counts, HashMap::from([(1, 1), (2, 1)]));
        // No pins: the connection table alone, with no map made of it.
        let merged = merge(&conns, &[]);
        assert!(merged.is_empty());
        assert_eq!(
            count_active(&conns, &merged, NOW, IDLE),
            HashMap::from([(1, 1), (2, 1)])
        );
        // A pin only (the connection table evicted it) counts too; a closed one doesn't.
        let closed = FlowState {
            flags: FLOW_F_CLOSING,
            ..state(3)
        };
        let pinned = vec![(key(7), state(3)), (key(8), closed)];
        let merged = merge(&conns, &pinned);
        assert_eq!(
            count_active(&conns, &merged, NOW, IDLE),
            HashMap::from([(1, 1), (2, 1), (3, 1)])
        );
    }

    #[test]
    fn the_merge_holds_the_pinned_flows_as_both_tables_see_them() {
        let old = FlowState {
            last_seen_ns: NOW - 50,
            ..state(2)
        };
        let busy_elsewhere = FlowState {
            last_seen_ns: NOW - 1,
            flags: FLOW_F_CLOSING,
            ..state(1)
        };
        let conns = vec![(key(1), busy_elsewhere), (key(2), state(1))];
        let pinned = vec![(key(1), old), (key(3), old)];
        let merged = merge(&conns, &pinned);
        assert_eq!(merged.len(), 2, "the pinned flows only");
        let m = merged[&key(1)];
        assert_eq!(
            (m.backend, m.last_seen_ns, m.flags),
            (2, NOW - 1, FLOW_F_CLOSING),
            "the pin's backend, the fresher time, the close either saw"
        );
        assert_eq!(merged[&key(3)], old);
    }

    #[test]
    fn the_periodic_scans_keep_to_their_share_of_a_core() {
        // Cheap scans: once a second.
        assert_eq!(next_scan_in(Duration::ZERO), SCAN_EVERY);
        assert_eq!(next_scan_in(Duration::from_millis(20)), SCAN_EVERY);
        // Dearer ones: their duration times the divisor, a twentieth of a core.
        assert_eq!(
            next_scan_in(Duration::from_millis(150)),
            Duration::from_millis(150 * u64::from(SCAN_SHARE_DIVISOR))
        );
        // Never staler than the bound, whatever a scan costs.
        assert_eq!(next_scan_in(Duration::from_secs(10)), SCAN_EVERY_MAX);
        assert_eq!(next_scan_in(Duration::MAX), SCAN_EVERY_MAX);
    }

    #[test]
    fn a_ring_change_waits_while_the_scanner_works() {
        let now = Instant::now();
        let ago = |s| now.checked_sub(Duration::from_secs(s));
        assert!(!still_scanning(None, now), "never scanned: no thread");
        assert!(still_scanning(Some(now), now));
        assert!(still_scanning(ago(5), now), "a long scan of a big table");
        if let Some(stuck) = ago(SCAN_STUCK.as_secs()) {
            assert!(!still_scanning(Some(stuck), now));
        }
    }

    /// A scanner over a connection table that takes `delay` to read, once its first
    /// read has started, and the count of reads started.
    fn slow_scanner(delay: Duration) -> (Scanner, Arc<std::sync::atomic::AtomicUsize>) {
        let store = FakeFlowStore {
            read_delay: delay,
            ..Default::default()
        };
        let reads = store.connection_reads.clone();
        let scanner = Scanner::spawn(Box::new(store), IDLE).unwrap();
        assert!(
            wait_for_reads(&reads, 1, Duration::from_secs(5)),
            "no first scan"
        );
        (scanner, reads)
    }

    fn wait_for_reads(reads: &std::sync::atomic::AtomicUsize, n: usize, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if reads.load(std::sync::atomic::Ordering::SeqCst) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn dear_scans_come_further_apart() {
        // A read of 150 ms: the next periodic scan is 3 s (x20) after, not 1 s.
        let delay = Duration::from_millis(150);
        let (scanner, reads) = slow_scanner(delay);
        let first = Instant::now();
        assert!(
            wait_for_reads(&reads, 2, Duration::from_secs(10)),
            "no second scan"
        );
        let gap = first.elapsed();
        println!("a scan of {delay:?}, the next {gap:?} later");
        assert!(scanner.snapshot().took >= delay);
        assert!(
            gap >= delay * SCAN_SHARE_DIVISOR - delay,
            "the next scan came after {gap:?}"
        );
    }

    #[test]
    fn a_ring_change_waits_out_scans_longer_than_its_poll() {
        // Each scan 1.5 s: the one under way and the prepare's own end 3 s on, past
        // the 2 s that used to be the whole wait.
        let delay = Duration::from_millis(1500);
        let (scanner, reads) = slow_scanner(delay);
        let asked = Instant::now();
        assert!(scanner.prepare(Arc::new(rings(1, &[1, 2]))));
        let waited = asked.elapsed();
        println!("prepare waited {waited:?} for two scans of {delay:?}");
        assert!(
            waited > PREPARE_WAIT,
            "the prepare's own scan was not waited for"
        );
        assert!(reads.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    }

    #[test]
    fn the_ring_choice_follows_the_program() {
        let mut r = RingSet::default();
        let ring: Vec<u32> = (0..13).collect();
        r.rings.insert(4, Arc::new(ring));
        let k = key(4242);
        assert_eq!(r.choice(4, &k), Some(flow_hash(&k) % 13));
        assert_eq!(r.choice(5, &k), None);
    }

    #[test]
    fn the_scanner_pins_before_prepare_returns_and_publishes_counts() {
        let store = FakeFlowStore {
            max_pinned: 1,
            ..Default::default()
        };
        {
            let mut c = store.connections.lock().unwrap();
            let now = monotonic_ns();
            for (port, backend) in [(1, 1), (2, 2), (3, 2)] {
                c.insert(
                    key(port),
                    FlowState {
                        last_seen_ns: now,
                        ..state(backend)
                    },
                );
            }
        }
        let scanner = Scanner::spawn(Box::new(store.clone()), IDLE).unwrap();
        // Backend 2 leaves the ring but still forwards (a drain).
        assert!(scanner.prepare(Arc::new(rings(1, &[1, 2]))));
        let pinned = store.pinned.lock().unwrap().clone();
        assert_eq!(
            pinned.len(),
            1,
            "the table holds one; the other is a failure"
        );
        assert!(pinned.values().all(|s| s.backend == 2));
        let snap = scanner.snapshot();
        assert!(snap.taken_at.is_some());
        assert_eq!(snap.active.get(&2), Some(&2));
        assert_eq!(snap.active.get(&1), Some(&1));
        assert_eq!(snap.pin_failures, 1);
        assert_eq!(snap.connections, 3);
        assert_eq!(snap.pinned, 1);
        drop(scanner);
    }

    #[test]
    fn nat_flows_cross_hosts_by_backend_address_and_come_back_as_pairs() {
        let b = BackendId {
            service: "api".into(),
            address: "10.0.1.5".parse().unwrap(),
        };
        let mut vip = VipKey {
            port_be: 80u16.to_be(),
            proto: 6,
            family: lb_common::FAMILY_V4,
            ..Default::default()
        };
        vip.addr[..4].copy_from_slice(&[10, 0, 0, 100]);
        let flow = |backend: u32, flags: u32| NatFlow {
            backend,
            vip_num: 1,
            last_seen_ns: NOW - 7_000_000,
            flags,
            nport_be: 2001u16.to_be(),
            bport_be: 8443u16.to_be(),
            baddr: [10, 0, 1, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            client_mac: [2, 0, 0, 0, 0, 9],
            ..Default::default()
        };
        let sender = Names {
            backends: HashMap::from([(2, b.clone())]),
            ..Default::default()
        };
        let flows = vec![
            (key(1), flow(2, NAT_F_FIN_CLIENT)),
            (key(2), flow(2, NAT_F_SYNCED)),
            (key(3), flow(3, 0)),
        ];
        let wire = wire_nat(&flows, &sender, NOW);
        assert_eq!(
            wire.len(),
            1,
            "a peer's copy is not sent back; backend 3 has no name"
        );
        assert_eq!(
            (wire[0].bport, wire[0].nport, wire[0].idle_ms, wire[0].flags),
            (8443, 2001, 7, NAT_F_FIN_CLIENT as u8)
        );
        let receiver = RingSet {
            names: Arc::new(Names {
                ids: HashMap::from([(b, 9)]),
                vips: HashMap::from([(vip, 4)]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let local = remote_nat(&wire, &receiver, NOW);
        assert_eq!(local.len(), 1);
        let (k, f) = local[0];
        assert_eq!(k, key(1));
        assert_eq!((f.backend, f.vip_num), (9, 4), "the receiver's own numbers");
        assert_eq!(f.flags, NAT_F_FIN_CLIENT | NAT_F_SYNCED);
        assert_eq!(
            (f.nport_be, f.bport_be, f.baddr),
            (2001u16.to_be(), 8443u16.to_be(), flow(2, 0).baddr)
        );
        assert_eq!(f.last_seen_ns, NOW - 7_000_000);
        // The reverse half follows from it, as on the sender.
        assert_eq!(
            crate::nat::reverse_key(&k, &f),
            crate::nat::reverse_key(&flows[0].0, &flows[0].1)
        );
    }

    #[test]
    fn pins_cross_hosts_by_backend_address_and_land_on_local_ids() {
        let b = BackendId {
            service: "web".into(),
            address: "10.0.0.22".parse().unwrap(),
        };
        let mut vip = VipKey {
            port_be: 80u16.to_be(),
            proto: 6,
            family: lb_common::FAMILY_V4,
            ..Default::default()
        };
        vip.addr[..4].copy_from_slice(&[10, 0, 0, 100]);
        // The sender knows the backend as id 2; the receiver as id 7, its VIP as 4.
        let sender = Names {
            backends: HashMap::from([(2, b.clone())]),
            ..Default::default()
        };
        let closing = FlowState {
            flags: FLOW_F_CLOSING,
            ..state(2)
        };
        let pins = vec![(key(1), state(2)), (key(2), closing), (key(3), state(3))];
        // key(1) is busier in the connection table than in the pin.
        let merged = FlowMap::from_iter([(
            key(1),
            FlowState {
                last_seen_ns: NOW - 5_000_000,
                ..state(2)
            },
        )]);
        let wire = wire_pins(&pins, &merged, &sender, NOW);
        assert_eq!(wire.len(), 2, "backend 3 has no name: left for the refresh");
        assert_eq!((wire[0].idle_ms, wire[0].closing), (5, false));
        assert_eq!((wire[1].idle_ms, wire[1].closing), (1000, true));
        assert!(wire.iter().all(|p| p.backend == b));

        let mut receiver = RingSet {
            rings: HashMap::from([(4, Arc::new(vec![7; 7]))]),
            forwarding: [7].into_iter().collect(),
            names: Arc::new(Names {
                ids: HashMap::from([(b.clone(), 7)]),
                vips: HashMap::from([(vip, 4)]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let local = remote_pins(&wire, &receiver, NOW);
        assert_eq!(local.len(), 2, "installed even where the ring still agrees");
        assert_eq!(local[0].0, key(1));
        assert_eq!(
            (
                local[0].1.backend,
                local[0].1.vip_num,
                local[0].1.last_seen_ns
            ),
            (7, 4, NOW - 5_000_000)
        );
        assert_eq!(local[1].1.flags, FLOW_F_CLOSING);
        // A backend that does not forward here, or a VIP this host lacks: nothing.
        receiver.forwarding.clear();
        assert!(remote_pins(&wire, &receiver, NOW).is_empty());
        receiver.forwarding.insert(7);
        receiver.names = Arc::new(Names {
            ids: HashMap::from([(b, 7)]),
            ..Default::default()
        });
        assert!(remote_pins(&wire, &receiver, NOW).is_empty());
    }

    #[test]
    fn a_new_scanner_leaves_the_tables_alone_until_it_has_rings() {
        // An earlier agent's pinned flow, in tables this agent took over.
        let store = FakeFlowStore {
            max_pinned: 10,
            ..Default::default()
        };
        let now = monotonic_ns();
        let drained = FlowState {
            last_seen_ns: now,
            ..state(2)
        };
        store.pinned.lock().unwrap().insert(key(1), drained);
        store.connections.lock().unwrap().insert(key(1), drained);
        let scanner = Scanner::spawn(Box::new(store.clone()), IDLE).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while scanner.snapshot().taken_at.is_none() {
            assert!(Instant::now() < deadline, "no scan");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Counted, but not collected although no ring is known to forward to backend 2.
        assert_eq!(scanner.snapshot().active.get(&2), Some(&1));
        assert_eq!(store.pinned.lock().unwrap().len(), 1);
        // The agent's first rings: backend 2 drained, still forwarding: it stays.
        assert!(scanner.prepare(Arc::new(rings(1, &[1, 2]))));
        assert_eq!(store.pinned.lock().unwrap().len(), 1);
    }

    /// The scanner removes expired persistence entries and those of a service without
    /// persistence, and counts the live ones per VIP.
    #[test]
    fn the_scanner_collects_and_counts_persistence_entries() {
        let store = FakeFlowStore {
            max_pinned: 10,
            ..Default::default()
        };
        let vip = VipKey {
            addr: key(1).dst,
            port_be: key(1).dport_be,
            proto: 6,
            family: 2,
        };
        let now = monotonic_ns();
        let entry = |client: u8, age_s: u64| {
            let mut k = PersistKey::of_flow(&key(1));
            k.client[3] = client;
            let s = PersistState {
                backend: 1,
                vip_num: 0,
                last_seen_ns: now.saturating_sub(age_s * 1_000_000_000),
            };
            (k, s)
        };
        let fresh = [entry(1, 5), entry(2, 50)];
        let old = entry(3, 200);
        store
            .persist
            .lock()
            .unwrap()
            .extend(fresh.iter().copied().chain([old]));
        let scanner = Scanner::spawn(Box::new(store.clone()), IDLE).unwrap();
        let mut set = rings(1, &[1]);
        set.names = Arc::new(Names {
            vips: HashMap::from([(vip, 0)]),
            ..Default::default()
        });
        set.persistence = HashMap::from([(0, 100)]);
        assert!(scanner.prepare(Arc::new(set.clone())));
        let left: HashSet<PersistKey> = store.persist.lock().unwrap().keys().copied().collect();
        assert_eq!(left, fresh.iter().map(|(k, _)| *k).collect());
        assert_eq!(scanner.snapshot().persistent, HashMap::from([(0, 2)]));
        // Persistence turned off: every entry goes.
        set.persistence.clear();
        assert!(scanner.prepare(Arc::new(set)));
        assert!(store.persist.lock().unwrap().is_empty());
        assert!(scanner.snapshot().persistent.is_empty());
    }
}
