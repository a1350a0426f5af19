//! The VRRP task: sockets, timers and the state machine on one loop.
//!
//! Everything that changes the machine arrives on that loop: received adverts, the
//! master-down and advert deadlines, the agent's effective priority, and the stop.
//! Each transition gets one log line with its reason, a `StateChange` to the agent,
//! and the notify command (in the background). On becoming master the speaker
//! announces every VIP at once (gratuitous ARP for IPv4, unsolicited neighbour
//! advertisement for IPv6) and again `ANNOUNCE_ROUNDS - 1` times, `ANNOUNCE_SPACING`
//! apart: a lost frame or a slow switch does not leave a VIP pointing at the old host.

use std::{
    collections::HashSet,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use super::{
    ConfigError, MasterStatus, TransitionStatus, VrrpConfig, VrrpCounters, VrrpState, VrrpStatus,
    announce,
    auth::{self, AuthKey, KeyError, Sequencer, Verifier},
    net::{self, AdvertSocket, AnnounceSocket, NetError, Received},
    packet::{self, Advert, DropReason},
    state::{Action, Machine, Params, Transition},
};

/// Announcement rounds on becoming master (the first at once).
pub const ANNOUNCE_ROUNDS: u32 = 5;
pub const ANNOUNCE_SPACING: Duration = Duration::from_millis(200);
/// State changes the agent may fall behind by before one is lost (and logged);
/// `status()` always has the current state.
const STATE_CHANGES: usize = 32;
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
    #[error("vrrp: spawn needs a tokio runtime with I/O and time enabled")]
    NoRuntime,
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
    stop: Option<oneshot::Sender<()>>,
    /// Shared with the task, which updates it; the lab tests read it from afar.
    pub(super) status: Arc<Mutex<VrrpStatus>>,
    task: JoinHandle<()>,
}

impl VrrpHandle {
    /// Tracking input: the priority the data path can back, 0 (cannot serve: resign,
    /// never become master) to the configured priority (more is capped to it).
    pub fn set_priority(&self, effective: u8) {
        self.priority.send_replace(effective);
    }

    pub fn status(&self) -> VrrpStatus {
        lock(&self.status).clone()
    }

    /// Stops the speaker; a master first sends priority 0 so its peer takes over at
    /// once. Returns when the task has ended. (Dropping the handle stops it the same
    /// way, without waiting.)
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.task).await {
            eprintln!("lb-agent: vrrp: speaker task failed: {e}");
        }
    }
}

fn lock(status: &Mutex<VrrpStatus>) -> std::sync::MutexGuard<'_, VrrpStatus> {
    // A panic elsewhere leaves plain counters behind: still worth reading.
    status.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// Starts the speaker on `interface` for `vips` (in service order: the first one's
/// family is the election's unless peers say otherwise), announcing them from `mac`.
/// Must be called inside a tokio runtime with I/O and time enabled.
pub fn spawn(
    cfg: VrrpConfig,
    interface: String,
    vips: Vec<IpAddr>,
    mac: [u8; 6],
) -> Result<(VrrpHandle, mpsc::Receiver<StateChange>), VrrpError> {
    cfg.validate()?;
    tokio::runtime::Handle::try_current().map_err(|_| VrrpError::NoRuntime)?;
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
        None => None,
    };
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
    let sock = AdvertSocket::open(&interface, src, multicast)?;
    let announcer = AnnounceSocket::open(&interface)?;
    let interval = cfg.interval();
    let machine = Machine::new(Params {
        priority: cfg.priority,
        interval,
        preempt: cfg.preempt,
        preempt_delay: Duration::from_millis(u64::from(cfg.preempt_delay_ms)),
        address: src,
    });
    let status = Arc::new(Mutex::new(VrrpStatus {
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
    }));
    let window = auth::window_for(interval);
    let (changes_tx, changes_rx) = mpsc::channel(STATE_CHANGES);
    let (priority_tx, priority_rx) = watch::channel(cfg.priority);
    let (stop_tx, stop_rx) = oneshot::channel();
    eprintln!(
        "lb-agent: vrrp {}: on {interface} from {src}, {}, priority {}, advert every {} ms{}",
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
        sock,
        announcer,
        dests,
        advert_vips,
        all_vips,
        mac,
        auth: key.map(|k| Auth {
            sequencer: Sequencer::new(window),
            verifier: Verifier::new(k.clone(), window),
            key: k,
        }),
        status: status.clone(),
        changes: changes_tx,
        announce_left: 0,
        announce_next: None,
    };
    let task = tokio::spawn(run(speaker, stop_rx, priority_rx));
    Ok((
        VrrpHandle {
            priority: priority_tx,
            stop: Some(stop_tx),
            status,
            task,
        },
        changes_rx,
    ))
}

fn warn_if_readable(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "lb-agent: vrrp: warning: key file {} is readable by group or others",
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

struct Auth {
    key: AuthKey,
    sequencer: Sequencer,
    verifier: Verifier,
}

struct Speaker {
    machine: Machine,
    router_id: u8,
    interval_cs: u16,
    peers: Vec<IpAddr>,
    notify: Option<PathBuf>,
    sock: AdvertSocket,
    announcer: AnnounceSocket,
    dests: Vec<IpAddr>,
    /// The VIPs of the election's family, as adverts carry them.
    advert_vips: Vec<IpAddr>,
    /// Every VIP, announced on becoming master.
    all_vips: Vec<IpAddr>,
    mac: [u8; 6],
    auth: Option<Auth>,
    status: Arc<Mutex<VrrpStatus>>,
    changes: mpsc::Sender<StateChange>,
    announce_left: u32,
    announce_next: Option<Instant>,
}

async fn run(mut sp: Speaker, mut stop: oneshot::Receiver<()>, mut priority: watch::Receiver<u8>) {
    let now = Instant::now();
    // A priority set between spawn and here counts from the start.
    let p = *priority.borrow_and_update();
    let mut actions = sp.machine.set_effective_priority(now, p);
    actions.extend(sp.machine.start(now));
    sp.apply(now, actions);
    let mut buf = vec![0u8; RECV_BUF];
    let mut priority_open = true;
    loop {
        let deadline = [sp.machine.next_deadline(), sp.announce_next]
            .into_iter()
            .flatten()
            .min();
        let sleep = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut stop => break,
            changed = priority.changed(), if priority_open => match changed {
                Ok(()) => {
                    let p = *priority.borrow_and_update();
                    let now = Instant::now();
                    let actions = sp.machine.set_effective_priority(now, p);
                    sp.apply(now, actions);
                }
                // The handle is gone; the stop channel says so too.
                Err(_) => priority_open = false,
            },
            received = sp.sock.recv(&mut buf) => {
                let now = Instant::now();
                match received {
                    Ok(Some(r)) => sp.on_packet(now, &r, &buf),
                    Ok(None) => sp.drop_advert(None, "unreadable_ip_header", "IP header cut short"),
                    Err(e) => {
                        let n = sp.count(|c| &mut c.receive_errors);
                        if n.is_power_of_two() {
                            eprintln!("lb-agent: vrrp: receive error ({n} so far): {e}");
                        }
                    }
                }
            }
            () = sleep => {
                let now = Instant::now();
                let actions = sp.machine.on_timer(now);
                sp.apply(now, actions);
                if sp.announce_next.is_some_and(|t| t <= now) {
                    sp.announce_round(now);
                }
            }
        }
        sp.publish();
    }
    let now = Instant::now();
    let actions = sp.machine.shutdown(now);
    sp.apply(now, actions);
    sp.publish();
}

impl Speaker {
    fn count(&self, field: impl FnOnce(&mut VrrpCounters) -> &mut u64) -> u64 {
        let mut status = lock(&self.status);
        let c = field(&mut status.counters);
        *c += 1;
        *c
    }

    /// Counts a dropped advert; logs the 1st, 2nd, 4th, 8th... of each reason.
    fn drop_advert(&self, src: Option<IpAddr>, name: &str, why: &str) {
        let n = {
            let mut status = lock(&self.status);
            let c = status.counters.dropped.entry(name.to_string()).or_default();
            *c += 1;
            *c
        };
        if n.is_power_of_two() {
            let from = src.map(|s| format!(" from {s}")).unwrap_or_default();
            eprintln!(
                "lb-agent: vrrp {}: dropped advert{from}: {why} ({name}: {n} so far)",
                self.router_id
            );
        }
    }

    fn on_packet(&mut self, now: Instant, r: &Received, buf: &[u8]) {
        let src = r.env.src;
        if src == self.sock.src() {
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
            Err(reason) => return self.drop_advert(Some(src), reason.name(), &reason.to_string()),
        };
        self.count(|c| &mut c.adverts_received);
        let ours: HashSet<&IpAddr> = self.advert_vips.iter().collect();
        let theirs: HashSet<&IpAddr> = advert.addresses.iter().collect();
        if ours != theirs {
            let n = self.count(|c| &mut c.address_list_mismatch);
            if n.is_power_of_two() {
                eprintln!(
                    "lb-agent: vrrp {}: advert from {src} lists VIPs [{}], ours are [{}] ({n} so far); the two hosts' services differ",
                    self.router_id,
                    fmt_list(&advert.addresses),
                    fmt_list(&self.advert_vips)
                );
            }
        }
        let actions = self
            .machine
            .on_advert(now, src, advert.priority, advert.interval());
        self.apply(now, actions);
    }

    fn apply(&mut self, now: Instant, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SendAdvert { priority } => self.send_advert(priority),
                Action::Transition(t) => self.transition(now, t),
                Action::Announce => {
                    eprintln!(
                        "lb-agent: vrrp {}: heard another master: announcing the VIPs again",
                        self.router_id
                    );
                    self.announce_left = ANNOUNCE_ROUNDS;
                    self.announce_round(now);
                }
            }
        }
    }

    fn send_advert(&mut self, priority: u8) {
        let advert = Advert {
            router_id: self.router_id,
            priority,
            interval_cs: self.interval_cs,
            addresses: self.advert_vips.clone(),
        };
        // One sequence number per advert: the HMAC does not cover the destination.
        let seq = self.auth.as_mut().map(|a| a.sequencer.next(unix_now()));
        let auth = self.auth.as_ref().zip(seq).map(|(a, seq)| (&a.key, seq));
        let src = self.sock.src();
        for &dst in &self.dests {
            let sent = packet::encode(&advert, src, dst, auth)
                .map_err(|e| e.to_string())
                .and_then(|bytes| self.sock.send_to(dst, &bytes).map_err(|e| e.to_string()));
            match sent {
                Ok(()) => {
                    self.count(|c| &mut c.adverts_sent);
                }
                Err(e) => {
                    let n = self.count(|c| &mut c.send_errors);
                    if n.is_power_of_two() {
                        eprintln!(
                            "lb-agent: vrrp {}: sending an advert to {dst}: {e} ({n} so far)",
                            self.router_id
                        );
                    }
                }
            }
        }
    }

    fn transition(&mut self, now: Instant, t: Transition) {
        let reason = t.reason.to_string();
        eprintln!(
            "lb-agent: vrrp {}: {} -> {}: {reason}",
            self.router_id, t.from, t.to
        );
        {
            let mut status = lock(&self.status);
            status.last_transition = Some(TransitionStatus {
                at_unix_ms: u64::try_from(unix_now().as_millis()).unwrap_or(u64::MAX),
                from: t.from,
                to: t.to,
                reason: reason.clone(),
            });
        }
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
        let change = StateChange {
            from: t.from,
            to: t.to,
            reason,
        };
        if let Err(e) = self.changes.try_send(change) {
            eprintln!(
                "lb-agent: vrrp {}: the agent missed a state change ({e}); status has the current state",
                self.router_id
            );
        }
    }

    fn announce_round(&mut self, now: Instant) {
        for &vip in &self.all_vips {
            match self.announcer.send(&announce::frame(self.mac, vip)) {
                Ok(()) => {
                    self.count(|c| &mut c.announcements_sent);
                }
                Err(e) => {
                    let n = self.count(|c| &mut c.announcement_errors);
                    if n.is_power_of_two() {
                        eprintln!("lb-agent: vrrp: announcing {vip}: {e} ({n} so far)");
                    }
                }
            }
        }
        self.announce_left = self.announce_left.saturating_sub(1);
        self.announce_next = (self.announce_left > 0).then(|| now + ANNOUNCE_SPACING);
    }

    /// Copies the machine's view into the status the handle reads.
    fn publish(&self) {
        let mut status = lock(&self.status);
        status.state = self.machine.state();
        status.effective_priority = self.machine.effective_priority();
        status.master = self
            .machine
            .master()
            .map(|(address, priority)| MasterStatus { address, priority });
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
                Ok(s) => eprintln!("lb-agent: vrrp: notify {cmd} {to}: {s}"),
                Err(e) => eprintln!("lb-agent: vrrp: notify {cmd} {to}: {e}"),
            });
        }
        Err(e) => eprintln!("lb-agent: vrrp: notify {cmd} {to}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
