//! One LB pair, one state: operator changes (admin state) and flow pins shared between
//! the LB hosts over authenticated UDP (`[sync]`).
//!
//! The sync thread owns its socket and timers; it never touches the data path, the
//! VRRP speaker or the agent's state. The agent talks to it over channels only: it
//! hands over its admin state and each operator change ([`SyncHandle::publish`],
//! answered once the peers acknowledged or after [`ACK_WAIT`]), and receives the
//! peers' entries as [`SyncEvent`]s, which it merges, saves and applies like its own.
//! The flow scanner hands it the pins it makes and removes ([`PinSink`]); pins from
//! peers go to the scanner's [`PinInbox`], since the scanner owns the flow tables.
//!
//! - Every [`HEARTBEAT`] each host sends each peer a heartbeat with a digest of its
//!   admin state. A peer not heard for [`PEER_TIMEOUT`] is disconnected; when it is
//!   heard again, and whenever its digest differs from ours (at most every
//!   [`STATE_EVERY`]), it gets our whole admin state. Entries merge by version
//!   ([`AdminState::merge`]), so both ends converge whatever crossed first.
//! - A starting host sends its whole state at once; a peer that hears it after a
//!   silence sends its own back. [`SyncEvent::CaughtUp`] says every peer's state has
//!   been merged (or was already equal); the agent waits for it, bounded, before it
//!   starts the VRRP speaker, so a host that was down does not preempt with a stale state.
//! - Pins are sent only while this host serves (it is the only one whose flow table
//!   fills), all of them to a peer that (re)connects or sends its whole state (as a
//!   starting host does), and all of them again every
//!   [`crate::flows::PIN_REFRESH_SCANS`] scans so a peer's copies do not idle out while
//!   the flows are busy here.
//! - Persistence entries (`persistence_timeout_s`) go the same way: the scanner hands
//!   over those that are new, moved or much refreshed (`crate::persist::changed`), all
//!   of them to a peer that (re)connects; sent only while this host serves. There is no
//!   removal message: an entry expires on the peer as it does here.

pub mod wire;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_common::FlowKey;
use tokio::sync::{mpsc as tmpsc, oneshot};

use self::wire::{AdminEntry, Body, Dropped, Message, Pin, Sequencer, Sticky, Verifier};
use crate::{
    admin::{AdminState, now_ms},
    config::SyncSettings,
    flows::{PinInbox, RemotePins},
    protocol::{SyncCounters, SyncPeerStatus, SyncStatus},
    vrrp::auth::AuthKey,
};

pub const HEARTBEAT: Duration = Duration::from_millis(250);
pub const PEER_TIMEOUT: Duration = Duration::from_millis(1500);
/// Least time between two whole-state sends to one peer.
pub const STATE_EVERY: Duration = Duration::from_millis(500);
/// How long an operator's change waits for the peers' acknowledgements.
pub const ACK_WAIT: Duration = Duration::from_secs(1);
/// How often an unacknowledged change is sent again.
const RESEND_EVERY: Duration = Duration::from_millis(200);
/// How long the socket waits before the thread looks at its commands and timers.
const POLL: Duration = Duration::from_millis(10);

/// What the agent and the scanner tell the sync thread.
pub enum Command {
    /// The agent's admin state (at start, and after every change).
    State(AdminState),
    /// An operator's change made here: send it, and say who acknowledged it.
    Publish {
        entries: Vec<AdminEntry>,
        reply: oneshot::Sender<Confirmation>,
    },
    /// A peer's change is merged and saved here: acknowledge it.
    Applied {
        peer: IpAddr,
        change: u64,
    },
    /// Whether this host serves the VIPs (pins are sent only then).
    Serving(bool),
    Pinned(Vec<Pin>),
    Unpinned(Vec<FlowKey>),
    Persisted(Vec<Sticky>),
    Stop,
}

/// What the sync thread tells the agent.
#[derive(Debug)]
pub enum SyncEvent {
    /// Admin entries from a peer; `ack`: the change to acknowledge once saved.
    Admin {
        from: IpAddr,
        entries: Vec<AdminEntry>,
        ack: Option<u64>,
    },
    /// Every peer's state has been merged once (or was equal to ours).
    CaughtUp,
}

/// Which peers acknowledged an operator's change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Confirmation {
    pub confirmed: Vec<IpAddr>,
    pub missing: Vec<IpAddr>,
}

impl Confirmation {
    /// "applied on 2 of 2 hosts", or which peers did not confirm.
    pub fn describe(&self) -> String {
        let hosts = self.confirmed.len() + self.missing.len() + 1;
        let applied = self.confirmed.len() + 1;
        if self.missing.is_empty() {
            format!("applied on {applied} of {hosts} hosts")
        } else {
            let list: Vec<String> = self.missing.iter().map(|a| a.to_string()).collect();
            format!(
                "applied on {applied} of {hosts} hosts; not confirmed by {} within {} ms (it catches up when it is back)",
                list.join(", "),
                ACK_WAIT.as_millis()
            )
        }
    }
}

/// The scanner's way to the sync thread.
#[derive(Clone)]
pub struct PinSink(mpsc::Sender<Command>);

impl PinSink {
    pub fn pinned(&self, pins: Vec<Pin>) {
        if !pins.is_empty() {
            let _ = self.0.send(Command::Pinned(pins));
        }
    }

    pub fn unpinned(&self, keys: Vec<FlowKey>) {
        if !keys.is_empty() {
            let _ = self.0.send(Command::Unpinned(keys));
        }
    }

    /// Persistence entries, new or refreshed.
    pub fn persisted(&self, entries: Vec<Sticky>) {
        if !entries.is_empty() {
            let _ = self.0.send(Command::Persisted(entries));
        }
    }
}

/// The address this host syncs from: on `interface`, in the family of the peers
/// (IPv4: the primary address; IPv6: the first that is not link-local).
pub fn local_address(interface: &str, peers: &[IpAddr]) -> io::Result<IpAddr> {
    let v4 = peers.first().is_none_or(|p| p.is_ipv4());
    crate::vrrp::net::interface_addresses(interface)?
        .into_iter()
        .find(|a| match a {
            IpAddr::V4(_) => v4,
            IpAddr::V6(a) => !v4 && !crate::vrrp::net::is_link_local_v6(a),
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{interface} has no {} address to sync from",
                    if v4 { "IPv4" } else { "global IPv6" }
                ),
            )
        })
}

/// Loads the key, refusing one that group or others can read.
pub fn load_key(settings: &SyncSettings) -> anyhow::Result<AuthKey> {
    use std::os::unix::fs::PermissionsExt;
    let path = &settings.key_file;
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("sync key file {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "sync key file {} is readable by group or others: make it mode 0600",
            path.display()
        );
    }
    AuthKey::load(path).map_err(|e| anyhow::anyhow!("sync key file {}: {e}", path.display()))
}

/// A drain of tens of thousands of flows arrives as hundreds of datagrams at once:
/// room for them (root may go past `net.core.rmem_max`). Lost pins come back with the
/// next refresh, so a failure here is not fatal.
fn grow_receive_buffer(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    const BYTES: libc::c_int = 8 << 20;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid socket and a c_int option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&BYTES as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// The agent's side of the sync thread.
pub struct SyncHandle {
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<SyncStatus>>,
    thread: Option<JoinHandle<()>>,
    pub local: IpAddr,
}

impl SyncHandle {
    /// Binds `local`:port and starts the thread with the agent's admin state.
    pub fn spawn(
        settings: &SyncSettings,
        key: AuthKey,
        local: IpAddr,
        admin: AdminState,
        serving: bool,
        inbox: Option<PinInbox>,
    ) -> anyhow::Result<(Self, tmpsc::UnboundedReceiver<SyncEvent>)> {
        let socket = UdpSocket::bind(SocketAddr::new(local, settings.port))
            .map_err(|e| anyhow::anyhow!("sync: binding {local} port {}: {e}", settings.port))?;
        socket.set_read_timeout(Some(POLL))?;
        grow_receive_buffer(&socket);
        let (commands, rx) = mpsc::channel();
        let (events, events_rx) = tmpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(SyncStatus {
            address: local,
            port: settings.port,
            ..Default::default()
        }));
        let peers = settings
            .peers
            .iter()
            .map(|a| (*a, Peer::default()))
            .collect();
        let mut worker = Worker {
            socket,
            port: settings.port,
            local,
            key: key.clone(),
            verifier: Verifier::new(key, settings.peers.clone()),
            seq: Sequencer::default(),
            admin,
            peers,
            pending: BTreeMap::new(),
            next_change: now_ms() << 16,
            serving,
            inbox,
            events,
            counters: SyncCounters::default(),
            logged: HashMap::new(),
            status: status.clone(),
            caught_up: false,
            digest: [0; 8],
            status_due: Instant::now(),
        };
        worker.remerged();
        let thread = std::thread::Builder::new()
            .name("lb-sync".into())
            .spawn(move || worker.run(rx))?;
        Ok((
            Self {
                commands,
                status,
                thread: Some(thread),
                local,
            },
            events_rx,
        ))
    }

    pub fn pin_sink(&self) -> PinSink {
        PinSink(self.commands.clone())
    }

    pub fn state(&self, admin: AdminState) {
        let _ = self.commands.send(Command::State(admin));
    }

    /// Sends an operator's change; the answer comes once every peer acknowledged it,
    /// or after `ACK_WAIT`.
    pub fn publish(&self, entries: Vec<AdminEntry>) -> oneshot::Receiver<Confirmation> {
        let (reply, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Publish { entries, reply });
        rx
    }

    pub fn applied(&self, peer: IpAddr, change: u64) {
        let _ = self.commands.send(Command::Applied { peer, change });
    }

    pub fn set_serving(&self, serving: bool) {
        let _ = self.commands.send(Command::Serving(serving));
    }

    pub fn status(&self) -> SyncStatus {
        self.status_source().read()
    }

    /// The thread's published status, for readers off the agent's loop (the metrics
    /// endpoint).
    pub fn status_source(&self) -> SyncStatusSource {
        SyncStatusSource(self.status.clone())
    }
}

/// The sync thread's status as it last published it (at most every 50 ms); reading it
/// takes a lock the thread holds only to replace the status.
#[derive(Clone)]
pub struct SyncStatusSource(Arc<Mutex<SyncStatus>>);

impl SyncStatusSource {
    pub fn read(&self) -> SyncStatus {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let now = now_ms();
        for p in &mut s.peers {
            p.last_heard_ms_ago = p.last_heard_unix_ms.map(|t| now.saturating_sub(t));
        }
        s
    }
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Default)]
struct Peer {
    last_heard: Option<Instant>,
    last_heard_unix_ms: Option<u64>,
    connected_since_unix_ms: Option<u64>,
    digest: Option<[u8; 8]>,
    state_sent: Option<Instant>,
    /// Its whole state has been merged here (since start).
    got_state: bool,
    heartbeat_due: Option<Instant>,
}

impl Peer {
    fn connected(&self, now: Instant) -> bool {
        self.last_heard
            .is_some_and(|t| now.duration_since(t) < PEER_TIMEOUT)
    }
}

struct Pending {
    entries: Vec<AdminEntry>,
    waiting: BTreeSet<IpAddr>,
    confirmed: Vec<IpAddr>,
    reply: Option<oneshot::Sender<Confirmation>>,
    deadline: Instant,
    next_send: Instant,
}

struct Worker {
    socket: UdpSocket,
    port: u16,
    local: IpAddr,
    key: AuthKey,
    verifier: Verifier,
    seq: Sequencer,
    /// The agent's admin state plus what peers sent since (merged the same way).
    admin: AdminState,
    peers: BTreeMap<IpAddr, Peer>,
    pending: BTreeMap<u64, Pending>,
    next_change: u64,
    serving: bool,
    inbox: Option<PinInbox>,
    events: tmpsc::UnboundedSender<SyncEvent>,
    counters: SyncCounters,
    /// Drops logged per reason (the 1st, 2nd, 4th... time).
    logged: HashMap<&'static str, u64>,
    status: Arc<Mutex<SyncStatus>>,
    caught_up: bool,
    /// `admin.digest()`, kept up to date by `remerged`.
    digest: [u8; 8],
    status_due: Instant,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Worker {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        let peers: Vec<IpAddr> = self.peers.keys().copied().collect();
        for p in &peers {
            self.send_state(*p);
        }
        let mut buf = vec![0u8; wire::MAX_MESSAGE + 1];
        loop {
            loop {
                match rx.try_recv() {
                    Ok(Command::Stop) | Err(mpsc::TryRecvError::Disconnected) => return,
                    Ok(cmd) => self.command(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            self.timers();
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => self.datagram(from.ip(), &buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    self.counters.receive_errors += 1;
                    tracing::debug!("sync: receive failed: {e}");
                }
            }
            self.publish_status();
        }
    }

    fn send(&mut self, to: IpAddr, body: Body) {
        let msg = Message {
            sender: self.local,
            seq: self.seq.next(now_us()),
            body,
        };
        let bytes = match wire::encode(&msg, &self.key) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("sync: not sent: {e}");
                self.counters.send_errors += 1;
                return;
            }
        };
        match self.socket.send_to(&bytes, SocketAddr::new(to, self.port)) {
            Ok(_) => {
                self.counters.messages_sent += 1;
                self.counters.bytes_sent += bytes.len() as u64;
            }
            Err(_) => self.counters.send_errors += 1,
        }
    }

    fn versioned(&self) -> Vec<AdminEntry> {
        self.admin
            .versioned()
            .map(|(id, a)| AdminEntry {
                id: id.clone(),
                admin: *a,
            })
            .collect()
    }

    /// Sends `bodies` to every peer; returns to how many.
    fn send_to_every_peer(&mut self, bodies: &[Body]) -> u64 {
        let peers: Vec<IpAddr> = self.peers.keys().copied().collect();
        for &p in &peers {
            for b in bodies {
                self.send(p, b.clone());
            }
        }
        peers.len() as u64
    }

    fn send_state(&mut self, to: IpAddr) {
        for body in wire::state_bodies(&self.versioned()) {
            self.send(to, body);
        }
        if let Some(p) = self.peers.get_mut(&to) {
            p.state_sent = Some(Instant::now());
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::State(state) => {
                for (id, a) in state.versioned() {
                    self.admin.merge(id, *a);
                }
                self.remerged();
            }
            Command::Publish { entries, reply } => {
                for e in &entries {
                    self.admin.merge(&e.id, e.admin);
                }
                self.remerged();
                self.next_change += 1;
                let now = Instant::now();
                self.pending.insert(
                    self.next_change,
                    Pending {
                        entries,
                        waiting: self.peers.keys().copied().collect(),
                        confirmed: Vec::new(),
                        reply: Some(reply),
                        deadline: now + ACK_WAIT,
                        next_send: now,
                    },
                );
            }
            Command::Applied { peer, change } => self.send(peer, Body::Ack { change }),
            Command::Serving(on) => self.serving = on,
            Command::Pinned(pins) => {
                if self.serving {
                    let sent = self.send_to_every_peer(&wire::pin_bodies(&pins));
                    self.counters.flows_sent += sent * pins.len() as u64;
                }
            }
            Command::Unpinned(keys) => {
                if self.serving {
                    let sent = self.send_to_every_peer(&wire::unpin_bodies(&keys));
                    self.counters.unpins_sent += sent * keys.len() as u64;
                }
            }
            Command::Persisted(entries) => {
                if self.serving {
                    let sent = self.send_to_every_peer(&wire::persist_bodies(&entries));
                    self.counters.persistence_sent += sent * entries.len() as u64;
                }
            }
            Command::Stop => {}
        }
    }

    fn timers(&mut self) {
        let now = Instant::now();
        let peers: Vec<IpAddr> = self.peers.keys().copied().collect();
        let digest = self.digest;
        let count = self.admin.versioned().count() as u32;
        for p in peers {
            let due = self.peers.get(&p).and_then(|x| x.heartbeat_due);
            if due.is_none_or(|d| d <= now) {
                self.send(
                    p,
                    Body::Heartbeat {
                        digest,
                        entries: count,
                    },
                );
                if let Some(peer) = self.peers.get_mut(&p) {
                    peer.heartbeat_due = Some(now + HEARTBEAT);
                }
            }
            if let Some(peer) = self.peers.get_mut(&p)
                && peer.connected_since_unix_ms.is_some()
                && !peer.connected(now)
            {
                peer.connected_since_unix_ms = None;
                tracing::warn!(
                    event = "sync_peer",
                    peer = %p,
                    state = "disconnected",
                    "sync: peer {p} not heard for {} ms: disconnected",
                    PEER_TIMEOUT.as_millis()
                );
            }
        }
        // Unacknowledged changes: again, or answer.
        let mut done = Vec::new();
        let mut resend = Vec::new();
        for (change, p) in &mut self.pending {
            if p.waiting.is_empty() || now >= p.deadline {
                done.push(*change);
            } else if now >= p.next_send {
                p.next_send = now + RESEND_EVERY;
                for peer in &p.waiting {
                    resend.push((*peer, *change, p.entries.clone()));
                }
            }
        }
        for (peer, change, entries) in resend {
            for run in wire::update_runs(&entries) {
                self.send(
                    peer,
                    Body::Update {
                        change,
                        entries: run,
                    },
                );
            }
        }
        for change in done {
            if let Some(mut p) = self.pending.remove(&change)
                && let Some(reply) = p.reply.take()
            {
                let _ = reply.send(Confirmation {
                    confirmed: p.confirmed,
                    missing: p.waiting.into_iter().collect(),
                });
            }
        }
        self.check_caught_up();
    }

    fn check_caught_up(&mut self) {
        if self.caught_up {
            return;
        }
        let digest = self.digest;
        if self
            .peers
            .values()
            .all(|p| p.got_state || p.digest == Some(digest))
        {
            self.caught_up = true;
            let _ = self.events.send(SyncEvent::CaughtUp);
        }
    }

    fn drop_counted(&mut self, from: IpAddr, why: Dropped) {
        let name = why.name();
        *self.counters.dropped.entry(name.to_string()).or_insert(0) += 1;
        let n = self.logged.entry(name).or_insert(0);
        *n += 1;
        if n.count_ones() == 1 {
            tracing::warn!(
                "sync: message from {from} dropped: {why} ({name}, {} so far)",
                *n
            );
        }
    }

    fn datagram(&mut self, from: IpAddr, bytes: &[u8]) {
        let msg = match self.verifier.open(from, bytes, bytes.len(), now_us()) {
            Ok(m) => m,
            Err(why) => return self.drop_counted(wire::canonical(from), why),
        };
        self.counters.messages_received += 1;
        let peer_addr = msg.sender;
        let now = Instant::now();
        let reconnected = {
            let Some(peer) = self.peers.get_mut(&peer_addr) else {
                return;
            };
            let was = peer.connected(now) && peer.connected_since_unix_ms.is_some();
            peer.last_heard = Some(now);
            peer.last_heard_unix_ms = Some(now_ms());
            if !was {
                peer.connected_since_unix_ms = Some(now_ms());
            }
            !was
        };
        if reconnected {
            tracing::info!(
                event = "sync_peer",
                peer = %peer_addr,
                state = "connected",
                "sync: peer {peer_addr} connected; sending it our admin state"
            );
            self.send_state(peer_addr);
            // And every pin, if this host serves (the scanner sends them through us).
            if self.serving
                && let Some(inbox) = &self.inbox
            {
                inbox.resend_all();
            }
        }
        match msg.body {
            Body::Heartbeat { digest, .. } => {
                let ours = self.digest;
                let Some(peer) = self.peers.get_mut(&peer_addr) else {
                    return;
                };
                peer.digest = Some(digest);
                let due = peer
                    .state_sent
                    .is_none_or(|t| now.duration_since(t) >= STATE_EVERY);
                if digest != ours && due {
                    self.send_state(peer_addr);
                }
            }
            Body::State { entries, last } => {
                self.merge_in(peer_addr, entries, None);
                if last && let Some(peer) = self.peers.get_mut(&peer_addr) {
                    peer.got_state = true;
                }
                // A whole state comes from a peer that starts (also one restarted within
                // PEER_TIMEOUT, which never looked disconnected) or that differs from us:
                // either may lack our pins, so it gets them all, now.
                if last
                    && self.serving
                    && let Some(inbox) = &self.inbox
                {
                    inbox.resend_all();
                }
            }
            Body::Update { change, entries } => {
                self.counters.admin_updates_received += 1;
                self.merge_in(peer_addr, entries, Some(change));
            }
            Body::Ack { change } => {
                if let Some(p) = self.pending.get_mut(&change)
                    && p.waiting.remove(&peer_addr)
                {
                    p.confirmed.push(peer_addr);
                }
            }
            Body::Pins(pins) => {
                self.counters.flows_received += pins.len() as u64;
                if let Some(inbox) = &self.inbox {
                    inbox.deliver(RemotePins {
                        pins,
                        unpins: Vec::new(),
                    });
                }
            }
            Body::Unpins(keys) => {
                self.counters.unpins_received += keys.len() as u64;
                if let Some(inbox) = &self.inbox {
                    inbox.deliver(RemotePins {
                        pins: Vec::new(),
                        unpins: keys,
                    });
                }
            }
            Body::Persist(entries) => {
                self.counters.persistence_received += entries.len() as u64;
                if let Some(inbox) = &self.inbox {
                    inbox.deliver_persistence(entries);
                }
            }
        }
    }

    /// Merges a peer's entries into our copy and hands the agent those that changed
    /// it (all of them when the change is to be acknowledged: the agent answers).
    fn merge_in(&mut self, from: IpAddr, entries: Vec<AdminEntry>, ack: Option<u64>) {
        let mut changed = Vec::new();
        for e in entries {
            if self.admin.merge(&e.id, e.admin) || ack.is_some() {
                changed.push(e);
            }
        }
        self.remerged();
        if !changed.is_empty() || ack.is_some() {
            let _ = self.events.send(SyncEvent::Admin {
                from,
                entries: changed,
                ack,
            });
        }
    }

    fn remerged(&mut self) {
        self.digest = self.admin.digest();
    }

    fn publish_status(&mut self) {
        let now = Instant::now();
        if now < self.status_due {
            return;
        }
        self.status_due = now + Duration::from_millis(50);
        let digest = self.digest;
        let peers = self
            .peers
            .iter()
            .map(|(a, p)| {
                let connected = p.connected(now);
                SyncPeerStatus {
                    address: *a,
                    connected,
                    connected_since_unix_ms: p.connected_since_unix_ms.filter(|_| connected),
                    last_heard_unix_ms: p.last_heard_unix_ms,
                    last_heard_ms_ago: None,
                    admin_in_step: p.digest == Some(digest),
                }
            })
            .collect();
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.peers = peers;
        s.counters = self.counters.clone();
        s.admin_entries = self.admin.versioned().count() as u64;
        s.admin_digest = digest.iter().map(|b| format!("{b:02x}")).collect();
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv4Addr};

    use lb_common::{FAMILY_V4, FlowKey};

    use super::*;
    use crate::{
        admin::{AdminBackend, Version},
        config::BackendId,
        dataplane::FakeFlowStore,
        flows::{Names, RingSet, Scanner},
    };

    fn settings(peer: &str, port: u16) -> SyncSettings {
        SyncSettings {
            peers: vec![peer.parse().unwrap()],
            key_file: "/unused".into(),
            port,
        }
    }

    fn key() -> AuthKey {
        AuthKey::from_bytes(b"a unit test key of 16+".to_vec()).unwrap()
    }

    fn backend() -> BackendId {
        BackendId {
            service: "web".into(),
            address: "10.0.0.21".parse().unwrap(),
        }
    }

    async fn next(rx: &mut tmpsc::UnboundedReceiver<SyncEvent>) -> SyncEvent {
        tokio::time::timeout(Duration::from_secs(3), rx.recv())
            .await
            .expect("an event within 3 s")
            .expect("the thread runs")
    }

    /// Two sync threads over loopback (127.0.0.1 and 127.0.0.2): catch-up, a change
    /// acknowledged, pins installed in the peer's pinned table.
    #[tokio::test]
    async fn two_hosts_over_loopback() {
        let port = 20_000 + (std::process::id() % 20_000) as u16;
        let (a_addr, b_addr): (IpAddr, IpAddr) =
            ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        // B's scanner over a fake store, with names for one backend and one VIP.
        let store = FakeFlowStore {
            max_pinned: 1 << 20,
            ..Default::default()
        };
        let scanner = Scanner::spawn(Box::new(store.clone()), Duration::from_secs(900)).unwrap();
        let mut vip = lb_common::VipKey {
            port_be: 80u16.to_be(),
            proto: 6,
            family: FAMILY_V4,
            ..Default::default()
        };
        vip.addr[..4].copy_from_slice(&[10, 0, 0, 100]);
        scanner.committed(Arc::new(RingSet {
            rings: HashMap::from([(3, Arc::new(vec![9; 7]))]),
            forwarding: [5, 9].into_iter().collect(),
            names: Arc::new(Names {
                backends: HashMap::from([(5, backend())]),
                ids: HashMap::from([(backend(), 5)]),
                vips: HashMap::from([(vip, 3)]),
            }),
            persistence: HashMap::from([(3, 300)]),
        }));
        let (a, mut a_events) = SyncHandle::spawn(
            &settings("127.0.0.2", port),
            key(),
            a_addr,
            AdminState::default(),
            true,
            None,
        )
        .unwrap();
        let (b, mut b_events) = SyncHandle::spawn(
            &settings("127.0.0.1", port),
            key(),
            b_addr,
            AdminState::default(),
            false,
            Some(scanner.inbox()),
        )
        .unwrap();
        assert!(matches!(next(&mut a_events).await, SyncEvent::CaughtUp));
        assert!(matches!(next(&mut b_events).await, SyncEvent::CaughtUp));

        let change = AdminEntry {
            id: backend(),
            admin: AdminBackend {
                disabled: true,
                weight: None,
                version: Some(Version {
                    ms: 1,
                    counter: 0,
                    host: a_addr,
                }),
            },
        };
        let confirmation = a.publish(vec![change.clone()]);
        let SyncEvent::Admin { from, entries, ack } = next(&mut b_events).await else {
            panic!("not an admin event");
        };
        assert_eq!((from, entries, ack.is_some()), (a_addr, vec![change], true));
        b.applied(from, ack.unwrap());
        let c = tokio::time::timeout(Duration::from_secs(2), confirmation)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.confirmed, vec![b_addr]);
        assert_eq!(c.describe(), "applied on 2 of 2 hosts");

        let pins: Vec<Pin> = (0..500u16)
            .map(|i| {
                let mut key = FlowKey {
                    sport_be: (1000 + i).to_be(),
                    dport_be: 80u16.to_be(),
                    proto: 6,
                    family: FAMILY_V4,
                    ..Default::default()
                };
                key.src[..4].copy_from_slice(&Ipv4Addr::new(10, 0, 1, 1).octets());
                key.dst[..4].copy_from_slice(&[10, 0, 0, 100]);
                Pin {
                    key,
                    backend: backend(),
                    idle_ms: 10,
                    closing: false,
                }
            })
            .collect();
        a.pin_sink().pinned(pins.clone());
        let deadline = Instant::now() + Duration::from_secs(3);
        while store.pinned.lock().unwrap().len() < pins.len() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let pinned = store.pinned.lock().unwrap().clone();
        assert_eq!(pinned.len(), 500, "{:?} {:?}", a.status(), b.status());
        assert!(pinned.values().all(|s| s.backend == 5 && s.vip_num == 3));
        // Unpins follow; a host that does not serve sends none.
        b.pin_sink().pinned(pins.clone());
        a.pin_sink().unpinned(pins.iter().map(|p| p.key).collect());
        let deadline = Instant::now() + Duration::from_secs(3);
        while !store.pinned.lock().unwrap().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(store.pinned.lock().unwrap().is_empty());
        // Persistence entries: installed in the peer's table, with its ids; a host that
        // does not serve sends none.
        let sticky: Vec<Sticky> = (0..300u16)
            .map(|i| {
                let mut key = lb_common::PersistKey {
                    port_be: 80u16.to_be(),
                    proto: 6,
                    family: FAMILY_V4,
                    ..Default::default()
                };
                key.client[..4].copy_from_slice(&[10, 0, (i >> 8) as u8, i as u8]);
                key.vip[..4].copy_from_slice(&[10, 0, 0, 100]);
                Sticky {
                    key,
                    backend: backend(),
                    idle_ms: 1000,
                }
            })
            .collect();
        b.pin_sink().persisted(sticky.clone());
        a.pin_sink().persisted(sticky.clone());
        let deadline = Instant::now() + Duration::from_secs(3);
        while store.persist.lock().unwrap().len() < sticky.len() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let persist = store.persist.lock().unwrap().clone();
        assert_eq!(persist.len(), 300);
        assert!(persist.values().all(|s| s.backend == 5 && s.vip_num == 3));
        // The status is published at most every 50 ms.
        std::thread::sleep(Duration::from_millis(120));
        let status = a.status();
        assert_eq!(status.counters.flows_sent, 500);
        assert_eq!(status.counters.unpins_sent, 500);
        assert!(b.status().counters.dropped.is_empty());
        assert_eq!(b.status().counters.flows_received, 500);
        assert_eq!(status.counters.persistence_sent, 300);
        assert_eq!(b.status().counters.persistence_sent, 0);
        assert_eq!(b.status().counters.persistence_received, 300);
    }
}
