//! The VRRP state machine of RFC 5798 §6.4, pure: every input comes with the time it
//! happens at, and the machine answers with actions and a next deadline.
//!
//! - Start: to backup (priority 255, the address owner's, is not allowed here), with
//!   the master-down timer at 3 × interval + skew, skew = (256 − priority) × interval
//!   / 256, the interval being the master's advertised one once it is known.
//! - Backup: an advert with priority 0 sets the master-down timer to the skew time; one
//!   with priority ≥ ours, or any one if preemption is off, restarts the timer (and
//!   names the master); one with a lower priority is ignored when preemption is on, so
//!   the timer fires and we take over. With a preemption delay, lower-priority adverts
//!   still count for that long after the first of them.
//! - Master: sends an advert every interval; answers a priority-0 or lower-priority
//!   advert with one at once (a peer that stops, a peer back from a partition), at most
//!   one answer per interval (a flood of low adverts is not amplified); yields
//!   to a higher priority, or to the same priority from a higher address.
//! - Tracking: effective priority 0 means the data path cannot serve: fault. A master
//!   first sends priority 0 so its peer takes over at once. Fault never becomes master;
//!   a positive priority brings it back to backup.
//! - Shutdown: a master sends priority 0; every state goes to init.

use std::{
    fmt,
    net::IpAddr,
    time::{Duration, Instant},
};

use super::VrrpState;

/// What the machine is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// Configured priority, 1 to 254.
    pub priority: u8,
    /// Our advert interval.
    pub interval: Duration,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// Our primary address, for the tie-break between equal priorities.
    pub address: IpAddr,
}

/// Why a transition happened: the log line and the status say it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    Startup,
    /// No advert from a master for the master-down interval.
    MasterDown {
        last_master: Option<IpAddr>,
    },
    /// The master sent priority 0 (it stopped or cannot serve).
    MasterResigned {
        master: IpAddr,
    },
    /// We have a higher priority than the master and preempt it.
    Preempted {
        master: IpAddr,
        priority: u8,
    },
    /// An advert with a higher priority than ours.
    HigherPriority {
        master: IpAddr,
        priority: u8,
    },
    /// An advert with our priority from a higher address.
    HigherAddress {
        master: IpAddr,
        priority: u8,
    },
    /// Effective priority 0: the data path cannot serve.
    CannotServe,
    /// Effective priority back above 0.
    CanServe {
        priority: u8,
    },
    Shutdown,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Startup => f.write_str("started"),
            Reason::MasterDown {
                last_master: Some(m),
            } => write!(f, "no advert from master {m} for 3 intervals + skew"),
            Reason::MasterDown { last_master: None } => {
                f.write_str("no advert from any master for 3 intervals + skew")
            }
            Reason::MasterResigned { master } => {
                write!(f, "master {master} resigned (priority 0)")
            }
            Reason::Preempted { master, priority } => {
                write!(f, "preempted master {master} of lower priority {priority}")
            }
            Reason::HigherPriority { master, priority } => {
                write!(f, "advert from {master} with higher priority {priority}")
            }
            Reason::HigherAddress { master, priority } => write!(
                f,
                "advert from {master} with the same priority {priority} and a higher address"
            ),
            Reason::CannotServe => f.write_str("effective priority 0: the data path cannot serve"),
            Reason::CanServe { priority } => {
                write!(
                    f,
                    "effective priority {priority}: the data path can serve again"
                )
            }
            Reason::Shutdown => f.write_str("shutting down"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub at: Instant,
    pub from: VrrpState,
    pub to: VrrpState,
    pub reason: Reason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send one advert with this priority (to the group, or to each peer).
    SendAdvert { priority: u8 },
    /// The state changed: log, notify, and flip the data path.
    Transition(Transition),
    /// Announce the VIPs again (gratuitous ARP / unsolicited NA): another master was
    /// heard, so the segment may have followed it during a partition.
    Announce,
}

/// How often a master re-announces the VIPs while it hears other masters.
pub const REANNOUNCE_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Machine {
    p: Params,
    state: VrrpState,
    effective: u8,
    /// The interval the master advertises (ours until one is heard).
    master_interval: Duration,
    master_down_at: Option<Instant>,
    /// When this master last re-announced the VIPs on hearing another master.
    reannounced: Option<Instant>,
    advert_at: Option<Instant>,
    /// When this master last answered a lower or priority-0 advert (rate limit).
    answered: Option<Instant>,
    /// The master we follow (or are: our own address), and its priority.
    master: Option<(IpAddr, u8)>,
    /// The master sent priority 0 and the timer runs on skew time.
    resigned: Option<IpAddr>,
    /// The last lower-priority master we chose not to follow (preemption).
    lower: Option<(IpAddr, u8)>,
    /// When we first saw a lower-priority master (preemption delay).
    lower_since: Option<Instant>,
    last: Option<Transition>,
}

impl Machine {
    pub fn new(p: Params) -> Self {
        let effective = p.priority;
        let master_interval = p.interval;
        Self {
            p,
            state: VrrpState::Init,
            effective,
            master_interval,
            master_down_at: None,
            reannounced: None,
            advert_at: None,
            answered: None,
            master: None,
            resigned: None,
            lower: None,
            lower_since: None,
            last: None,
        }
    }

    pub fn state(&self) -> VrrpState {
        self.state
    }

    pub fn params(&self) -> &Params {
        &self.p
    }

    pub fn effective_priority(&self) -> u8 {
        self.effective
    }

    /// The master's address and priority, our own while we are master.
    pub fn master(&self) -> Option<(IpAddr, u8)> {
        self.master
    }

    pub fn last_transition(&self) -> Option<&Transition> {
        self.last.as_ref()
    }

    /// The master's advertised interval (ours until one is heard).
    pub fn master_interval(&self) -> Duration {
        self.master_interval
    }

    /// (256 − priority) × master interval / 256.
    pub fn skew_time(&self) -> Duration {
        self.master_interval * (256 - u32::from(self.effective)) / 256
    }

    /// 3 × master interval + skew.
    pub fn master_down_interval(&self) -> Duration {
        self.master_interval * 3 + self.skew_time()
    }

    /// When `on_timer` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            VrrpState::Backup => self.master_down_at,
            VrrpState::Master => self.advert_at,
            VrrpState::Init | VrrpState::Fault => None,
        }
    }

    fn go(&mut self, at: Instant, to: VrrpState, reason: Reason) -> Action {
        let t = Transition {
            at,
            from: self.state,
            to,
            reason,
        };
        self.state = to;
        self.last = Some(t.clone());
        self.lower = None;
        self.lower_since = None;
        self.resigned = None;
        match to {
            VrrpState::Master => {
                self.master_down_at = None;
                self.advert_at = Some(at + self.p.interval);
                self.master = Some((self.p.address, self.effective));
            }
            VrrpState::Backup => {
                self.advert_at = None;
                self.master_down_at = Some(at + self.master_down_interval());
            }
            VrrpState::Fault | VrrpState::Init => {
                self.advert_at = None;
                self.master_down_at = None;
                if self.master.is_some_and(|(a, _)| a == self.p.address) {
                    self.master = None;
                }
            }
        }
        Action::Transition(t)
    }

    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        if self.state != VrrpState::Init {
            return Vec::new();
        }
        self.master_interval = self.p.interval;
        let to = if self.effective == 0 {
            VrrpState::Fault
        } else {
            VrrpState::Backup
        };
        vec![self.go(now, to, Reason::Startup)]
    }

    /// An advert that passed every check, from `from`.
    pub fn on_advert(
        &mut self,
        now: Instant,
        from: IpAddr,
        priority: u8,
        interval: Duration,
    ) -> Vec<Action> {
        match self.state {
            VrrpState::Init => Vec::new(),
            VrrpState::Fault => {
                self.master = Some((from, priority));
                self.master_interval = interval;
                Vec::new()
            }
            VrrpState::Backup => {
                self.backup_advert(now, from, priority, interval);
                Vec::new()
            }
            VrrpState::Master => self.master_advert(now, from, priority, interval),
        }
    }

    fn backup_advert(&mut self, now: Instant, from: IpAddr, priority: u8, interval: Duration) {
        if priority == 0 {
            self.master = Some((from, 0));
            self.resigned = Some(from);
            self.lower = None;
            self.master_down_at = Some(now + self.skew_time());
            return;
        }
        let follow = if !self.p.preempt || priority >= self.effective {
            self.lower = None;
            self.lower_since = None;
            true
        } else {
            self.lower = Some((from, priority));
            let since = *self.lower_since.get_or_insert(now);
            now < since + self.p.preempt_delay
        };
        if follow {
            self.master = Some((from, priority));
            self.resigned = None;
            self.master_interval = interval;
            self.master_down_at = Some(now + self.master_down_interval());
        }
    }

    fn master_advert(
        &mut self,
        now: Instant,
        from: IpAddr,
        priority: u8,
        interval: Duration,
    ) -> Vec<Action> {
        let ours = self.effective;
        if priority > ours || (priority == ours && from > self.p.address) {
            self.master_interval = interval;
            let reason = if priority > ours {
                Reason::HigherPriority {
                    master: from,
                    priority,
                }
            } else {
                Reason::HigherAddress {
                    master: from,
                    priority,
                }
            };
            // One last advert at our own priority before yielding: if we were master
            // through a partition, clients may have followed our announcements, and
            // only a lower advert tells the winner to win them back (see below).
            let last = Action::SendAdvert { priority: ours };
            let t = self.go(now, VrrpState::Backup, reason);
            self.master = Some((from, priority));
            return vec![last, t];
        }
        // Priority 0: the peer stops, tell it (and the segment) who is master now.
        // Lower: a peer back from a partition, or just started; it yields on hearing us.
        // At most one answer per interval: anyone on the segment can send low adverts,
        // and each answer goes to the group or every peer. The regular advert is never
        // more than an interval away anyway.
        let mut actions = Vec::new();
        if self.answered.is_none_or(|t| now >= t + self.p.interval) {
            self.answered = Some(now);
            self.advert_at = Some(now + self.p.interval);
            actions.push(Action::SendAdvert { priority: ours });
        }
        // Only a master sends adverts, so a lower one means two masters: clients may
        // have followed the other one's announcements. Win them back (rate-limited).
        if priority > 0 && self.reannounced.is_none_or(|t| now >= t + REANNOUNCE_EVERY) {
            self.reannounced = Some(now);
            actions.push(Action::Announce);
        }
        actions
    }

    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        match self.state {
            VrrpState::Backup if self.master_down_at.is_some_and(|t| t <= now) => {
                let reason = if let Some(master) = self.resigned {
                    Reason::MasterResigned { master }
                } else if let Some((master, priority)) = self.lower {
                    Reason::Preempted { master, priority }
                } else {
                    Reason::MasterDown {
                        last_master: self.master.map(|(a, _)| a),
                    }
                };
                let t = self.go(now, VrrpState::Master, reason);
                vec![
                    t,
                    Action::SendAdvert {
                        priority: self.effective,
                    },
                ]
            }
            VrrpState::Master if self.advert_at.is_some_and(|t| t <= now) => {
                self.advert_at = Some(now + self.p.interval);
                vec![Action::SendAdvert {
                    priority: self.effective,
                }]
            }
            _ => Vec::new(),
        }
    }

    /// The tracking input: the priority the data path's health allows, 0 to 254
    /// (more than the configured priority is capped to it).
    pub fn set_effective_priority(&mut self, now: Instant, priority: u8) -> Vec<Action> {
        let priority = priority.min(self.p.priority);
        if priority == self.effective {
            return Vec::new();
        }
        self.effective = priority;
        match self.state {
            VrrpState::Init => Vec::new(),
            VrrpState::Master if priority == 0 => {
                let t = self.go(now, VrrpState::Fault, Reason::CannotServe);
                vec![Action::SendAdvert { priority: 0 }, t]
            }
            VrrpState::Master => {
                // Tell the peer at once: a lower priority may let it preempt us.
                self.master = Some((self.p.address, priority));
                self.advert_at = Some(now + self.p.interval);
                vec![Action::SendAdvert { priority }]
            }
            VrrpState::Backup if priority == 0 => {
                vec![self.go(now, VrrpState::Fault, Reason::CannotServe)]
            }
            VrrpState::Backup => Vec::new(),
            VrrpState::Fault if priority > 0 => {
                vec![self.go(now, VrrpState::Backup, Reason::CanServe { priority })]
            }
            VrrpState::Fault => Vec::new(),
        }
    }

    pub fn shutdown(&mut self, now: Instant) -> Vec<Action> {
        match self.state {
            VrrpState::Init => Vec::new(),
            VrrpState::Master => {
                let t = self.go(now, VrrpState::Init, Reason::Shutdown);
                vec![Action::SendAdvert { priority: 0 }, t]
            }
            VrrpState::Backup | VrrpState::Fault => {
                vec![self.go(now, VrrpState::Init, Reason::Shutdown)]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const INTERVAL: Duration = Duration::from_millis(100);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn params(priority: u8, address: &str) -> Params {
        Params {
            priority,
            interval: INTERVAL,
            preempt: true,
            preempt_delay: Duration::ZERO,
            address: ip(address),
        }
    }

    fn to(actions: &[Action]) -> Option<VrrpState> {
        actions.iter().find_map(|a| match a {
            Action::Transition(t) => Some(t.to),
            _ => None,
        })
    }

    fn sends(actions: &[Action]) -> Vec<u8> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendAdvert { priority } => Some(*priority),
                _ => None,
            })
            .collect()
    }

    /// A backup that has heard `master` at `t0`.
    fn backup_following(p: Params, master: &str, priority: u8, t0: Instant) -> Machine {
        let mut m = Machine::new(p);
        m.start(t0);
        m.on_advert(t0, ip(master), priority, INTERVAL);
        m
    }

    #[test]
    fn timers_follow_the_rfc() {
        let m = Machine::new(params(100, "10.0.0.1"));
        // (256 - 100) * 100 ms / 256 = 60.9375 ms
        assert_eq!(
            m.skew_time(),
            Duration::from_micros(60_937) + Duration::from_nanos(500)
        );
        assert_eq!(m.master_down_interval(), INTERVAL * 3 + m.skew_time());
        let high = Machine::new(params(254, "10.0.0.1"));
        assert!(high.master_down_interval() < m.master_down_interval());
    }

    #[test]
    fn starts_as_backup_and_takes_over_after_master_down_interval() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, "10.0.0.1"));
        let a = m.start(t0);
        assert_eq!(to(&a), Some(VrrpState::Backup));
        assert_eq!(m.state(), VrrpState::Backup);
        let down = m.master_down_interval();
        assert_eq!(m.next_deadline(), Some(t0 + down));
        assert!(m.on_timer(t0 + down - MS).is_empty());
        let a = m.on_timer(t0 + down);
        assert_eq!(to(&a), Some(VrrpState::Master));
        assert_eq!(sends(&a), vec![100]);
        assert!(matches!(
            m.last_transition().unwrap().reason,
            Reason::MasterDown { last_master: None }
        ));
        assert_eq!(m.master(), Some((ip("10.0.0.1"), 100)));
        // Then one advert per interval.
        assert_eq!(m.next_deadline(), Some(t0 + down + INTERVAL));
        assert_eq!(sends(&m.on_timer(t0 + down + INTERVAL)), vec![100]);
        assert_eq!(m.next_deadline(), Some(t0 + down + INTERVAL * 2));
    }

    #[test]
    fn adverts_keep_a_backup_backup_and_takeover_follows_silence() {
        let t0 = Instant::now();
        let mut m = backup_following(params(100, "10.0.0.1"), "10.0.0.2", 200, t0);
        assert_eq!(m.master(), Some((ip("10.0.0.2"), 200)));
        let mut t = t0;
        for _ in 0..20 {
            t += INTERVAL;
            assert!(m.on_advert(t, ip("10.0.0.2"), 200, INTERVAL).is_empty());
            assert!(m.on_timer(t).is_empty());
        }
        let down = m.master_down_interval();
        assert_eq!(m.next_deadline(), Some(t + down));
        let a = m.on_timer(t + down);
        assert_eq!(to(&a), Some(VrrpState::Master));
        assert_eq!(
            m.last_transition().unwrap().reason,
            Reason::MasterDown {
                last_master: Some(ip("10.0.0.2"))
            }
        );
    }

    #[test]
    fn master_down_uses_the_masters_interval() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, "10.0.0.1"));
        m.start(t0);
        let slow = Duration::from_secs(1);
        m.on_advert(t0, ip("10.0.0.2"), 200, slow);
        assert_eq!(m.master_interval(), slow);
        assert_eq!(m.next_deadline(), Some(t0 + slow * 3 + slow * 156 / 256));
    }

    #[test]
    fn priority_zero_means_takeover_after_skew_time() {
        let t0 = Instant::now();
        let mut m = backup_following(params(100, "10.0.0.1"), "10.0.0.2", 200, t0);
        let t1 = t0 + INTERVAL;
        assert!(m.on_advert(t1, ip("10.0.0.2"), 0, INTERVAL).is_empty());
        assert_eq!(m.next_deadline(), Some(t1 + m.skew_time()));
        let a = m.on_timer(t1 + m.skew_time());
        assert_eq!(to(&a), Some(VrrpState::Master));
        assert_eq!(
            m.last_transition().unwrap().reason,
            Reason::MasterResigned {
                master: ip("10.0.0.2")
            }
        );
        // A lower priority backup waits longer: the better one wins the race.
        let mut low = backup_following(params(10, "10.0.0.3"), "10.0.0.2", 200, t0);
        low.on_advert(t1, ip("10.0.0.2"), 0, INTERVAL);
        assert!(low.next_deadline().unwrap() > t1 + m.skew_time());
    }

    #[test]
    fn preemption_without_delay() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(200, "10.0.0.1"));
        m.start(t0);
        // A lower-priority master keeps advertising; we ignore it and take over.
        let mut t = t0;
        while m.state() == VrrpState::Backup {
            t += INTERVAL;
            m.on_advert(t, ip("10.0.0.2"), 100, INTERVAL);
            m.on_timer(t);
            assert!(
                t < t0 + m.master_down_interval() + INTERVAL,
                "never preempted"
            );
        }
        assert_eq!(m.state(), VrrpState::Master);
        assert_eq!(
            m.last_transition().unwrap().reason,
            Reason::Preempted {
                master: ip("10.0.0.2"),
                priority: 100
            }
        );
    }

    #[test]
    fn preemption_waits_for_the_delay() {
        let t0 = Instant::now();
        let mut p = params(200, "10.0.0.1");
        p.preempt_delay = Duration::from_secs(2);
        let mut m = Machine::new(p);
        m.start(t0);
        let mut t = t0;
        while m.state() == VrrpState::Backup {
            t += INTERVAL;
            m.on_advert(t, ip("10.0.0.2"), 100, INTERVAL);
            m.on_timer(t);
            assert!(t < t0 + Duration::from_secs(3), "never preempted");
        }
        // Not before the delay, and within one master-down interval after it.
        let took = t - t0;
        assert!(took >= Duration::from_secs(2), "{took:?}");
        assert!(took <= Duration::from_secs(2) + m.master_down_interval() + INTERVAL);
        // The delay counts from the first lower-priority advert: a higher master in
        // between resets it.
        let mut m = Machine::new(params(200, "10.0.0.1"));
        m.p.preempt_delay = Duration::from_secs(2);
        m.start(t0);
        m.on_advert(t0, ip("10.0.0.2"), 100, INTERVAL);
        m.on_advert(t0 + Duration::from_secs(1), ip("10.0.0.3"), 250, INTERVAL);
        let t = t0 + Duration::from_millis(2500);
        m.on_advert(t, ip("10.0.0.2"), 100, INTERVAL);
        assert_eq!(m.next_deadline(), Some(t + m.master_down_interval()));
    }

    #[test]
    fn no_preemption_when_off() {
        let t0 = Instant::now();
        let mut p = params(200, "10.0.0.1");
        p.preempt = false;
        let mut m = Machine::new(p);
        m.start(t0);
        let mut t = t0;
        for _ in 0..100 {
            t += INTERVAL;
            m.on_advert(t, ip("10.0.0.2"), 100, INTERVAL);
            assert!(m.on_timer(t).is_empty());
        }
        assert_eq!(m.state(), VrrpState::Backup);
        assert_eq!(m.master(), Some((ip("10.0.0.2"), 100)));
    }

    #[test]
    fn master_yields_to_higher_priority_only() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, "10.0.0.1"));
        m.start(t0);
        m.on_timer(t0 + m.master_down_interval());
        assert_eq!(m.state(), VrrpState::Master);
        let t = t0 + Duration::from_secs(1);
        // Lower: answered at once, stays master.
        assert_eq!(
            sends(&m.on_advert(t, ip("10.0.0.9"), 50, INTERVAL)),
            vec![100]
        );
        assert_eq!(m.state(), VrrpState::Master);
        assert_eq!(m.next_deadline(), Some(t + INTERVAL));
        let a = m.on_advert(t, ip("10.0.0.0"), 101, INTERVAL);
        assert_eq!(to(&a), Some(VrrpState::Backup));
        // One last advert at its own priority, so a winner after a partition knows.
        assert_eq!(sends(&a), vec![100]);
        assert_eq!(m.master(), Some((ip("10.0.0.0"), 101)));
        assert_eq!(
            m.last_transition().unwrap().reason,
            Reason::HigherPriority {
                master: ip("10.0.0.0"),
                priority: 101
            }
        );
        assert_eq!(m.next_deadline(), Some(t + m.master_down_interval()));
    }

    #[test]
    fn equal_priority_tie_break_by_address() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, "10.0.0.5"));
        m.start(t0);
        m.on_timer(t0 + m.master_down_interval());
        let t = t0 + Duration::from_secs(1);
        // Same priority, lower address: we stay.
        assert_eq!(
            sends(&m.on_advert(t, ip("10.0.0.4"), 100, INTERVAL)),
            vec![100]
        );
        assert_eq!(m.state(), VrrpState::Master);
        // Same priority, higher address (compared as numbers, not text).
        let a = m.on_advert(t, ip("10.0.0.40"), 100, INTERVAL);
        assert_eq!(to(&a), Some(VrrpState::Backup));
        assert!(matches!(
            m.last_transition().unwrap().reason,
            Reason::HigherAddress { .. }
        ));
        // IPv6 link-local addresses compare the same way.
        let mut m = Machine::new(params(100, "fe80::9"));
        m.start(t0);
        m.on_timer(t0 + m.master_down_interval());
        let a = m.on_advert(t, ip("fe80::10"), 100, INTERVAL);
        assert_eq!(to(&a), Some(VrrpState::Backup));
        assert_eq!(sends(&a), vec![100]);
    }

    #[test]
    fn resigns_when_it_cannot_serve() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, "10.0.0.1"));
        m.start(t0);
        m.on_timer(t0 + m.master_down_interval());
        let t = t0 + Duration::from_secs(1);
        let a = m.set_effective_priority(t, 0);
        assert_eq!(sends(&a), vec![0]);
        assert_eq!(to(&a), Some(VrrpState::Fault));
        assert_eq!(m.next_deadline(), None);
        assert_eq!(m.master(), None);
        // Silence for a long time: still not master.
        assert!(m.on_timer(t + Duration::from_secs(60)).is_empty());
        m.on_advert(t, ip("10.0.0.2"), 50, INTERVAL);
        assert_eq!(m.master(), Some((ip("10.0.0.2"), 50)));
        // Back: backup first, master only after the master-down interval.
        let t2 = t + Duration::from_secs(61);
        let a = m.set_effective_priority(t2, 100);
        assert_eq!(to(&a), Some(VrrpState::Backup));
        assert_eq!(m.next_deadline(), Some(t2 + m.master_down_interval()));
        // A backup that cannot serve goes to fault too, without a word on the wire.
        let a = m.set_effective_priority(t2, 0);
        assert_eq!(to(&a), Some(VrrpState::Fault));
        assert!(sends(&a).is_empty());
        // Starting with 0: fault from the start.
        let mut m = Machine::new(params(100, "10.0.0.1"));
        m.set_effective_priority(t0, 0);
        assert_eq!(to(&m.start(t0)), Some(VrrpState::Fault));
    }

    #[test]
    fn lowered_priority_is_advertised_at_once_and_lets_the_peer_preempt() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(200, "10.0.0.1"));
        m.start(t0);
        m.on_timer(t0 + m.master_down_interval());
        let a = m.set_effective_priority(t0 + Duration::from_secs(1), 90);
        assert_eq!(sends(&a), vec![90]);
        assert_eq!(m.master(), Some((ip("10.0.0.1"), 90)));
        // More than configured is capped.
        let a = m.set_effective_priority(t0 + Duration::from_secs(2), 255);
        assert_eq!(sends(&a), vec![200]);
        assert!(m.set_effective_priority(t0, 200).is_empty());
    }

    #[test]
    fn shutdown_sends_priority_zero_from_master_only() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, "10.0.0.1"));
        assert!(m.shutdown(t0).is_empty());
        m.start(t0);
        let a = m.shutdown(t0);
        assert!(sends(&a).is_empty());
        assert_eq!(to(&a), Some(VrrpState::Init));
        let mut m = Machine::new(params(100, "10.0.0.1"));
        m.start(t0);
        m.on_timer(t0 + m.master_down_interval());
        let a = m.shutdown(t0 + Duration::from_secs(1));
        assert_eq!(sends(&a), vec![0]);
        assert_eq!(to(&a), Some(VrrpState::Init));
        assert_eq!(m.next_deadline(), None);
        // Adverts after the end change nothing.
        assert!(m.on_advert(t0, ip("10.0.0.2"), 1, INTERVAL).is_empty());
    }

    /// Two machines on one segment, stepped in 1 ms ticks; adverts cross when linked.
    struct Pair {
        m: [Machine; 2],
        addr: [IpAddr; 2],
        linked: bool,
        now: Instant,
    }

    impl Pair {
        fn new(a: Params, b: Params) -> Self {
            let now = Instant::now();
            let addr = [a.address, b.address];
            let mut m = [Machine::new(a), Machine::new(b)];
            for x in &mut m {
                x.start(now);
            }
            Self {
                m,
                addr,
                linked: true,
                now,
            }
        }

        fn deliver(&mut self, from: usize, actions: Vec<Action>) {
            for a in actions {
                if let Action::SendAdvert { priority } = a
                    && self.linked
                {
                    let to = 1 - from;
                    let more = self.m[to].on_advert(self.now, self.addr[from], priority, INTERVAL);
                    self.deliver(to, more);
                }
            }
        }

        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += MS;
                for i in 0..2 {
                    let a = self.m[i].on_timer(self.now);
                    self.deliver(i, a);
                }
            }
        }

        fn states(&self) -> [VrrpState; 2] {
            [self.m[0].state(), self.m[1].state()]
        }
    }

    #[test]
    fn pair_elects_one_master() {
        let mut pair = Pair::new(params(100, "10.0.0.1"), params(200, "10.0.0.2"));
        pair.run(Duration::from_secs(1));
        assert_eq!(pair.states(), [VrrpState::Backup, VrrpState::Master]);
        assert_eq!(pair.m[0].master(), Some((ip("10.0.0.2"), 200)));
    }

    #[test]
    fn equal_priorities_settle_on_the_higher_address() {
        // Both come up alone (whoever fires first would otherwise simply win), then meet.
        let mut pair = Pair::new(params(100, "10.0.0.1"), params(100, "10.0.0.2"));
        pair.linked = false;
        pair.run(Duration::from_secs(1));
        assert_eq!(pair.states(), [VrrpState::Master, VrrpState::Master]);
        pair.linked = true;
        pair.run(Duration::from_millis(150));
        assert_eq!(pair.states(), [VrrpState::Backup, VrrpState::Master]);
    }

    #[test]
    fn graceful_stop_hands_over_within_skew_time() {
        let mut pair = Pair::new(params(100, "10.0.0.1"), params(200, "10.0.0.2"));
        pair.run(Duration::from_secs(1));
        let stop = pair.now;
        let a = pair.m[1].shutdown(stop);
        pair.deliver(1, a);
        pair.run(pair.m[0].skew_time() + 2 * MS);
        assert_eq!(pair.states(), [VrrpState::Master, VrrpState::Init]);
        assert!(pair.m[0].last_transition().unwrap().at - stop <= pair.m[0].skew_time() + MS);
    }

    #[test]
    fn resigning_master_hands_over_and_takes_back() {
        let mut pair = Pair::new(params(100, "10.0.0.1"), params(200, "10.0.0.2"));
        pair.run(Duration::from_secs(1));
        let now = pair.now;
        let a = pair.m[1].set_effective_priority(now, 0);
        pair.deliver(1, a);
        pair.run(Duration::from_millis(100));
        assert_eq!(pair.states(), [VrrpState::Master, VrrpState::Fault]);
        // Healthy again: preempts (priority 200 > 100) within a master-down interval.
        let now = pair.now;
        let a = pair.m[1].set_effective_priority(now, 200);
        pair.deliver(1, a);
        pair.run(Duration::from_secs(1));
        assert_eq!(pair.states(), [VrrpState::Backup, VrrpState::Master]);
    }

    #[test]
    fn partition_then_heal_leaves_exactly_one_master() {
        for (pa, pb) in [(100, 200), (200, 100), (150, 150)] {
            let mut pair = Pair::new(params(pa, "10.0.0.1"), params(pb, "10.0.0.2"));
            pair.run(Duration::from_secs(1));
            pair.linked = false;
            pair.run(Duration::from_secs(1));
            assert_eq!(pair.states(), [VrrpState::Master, VrrpState::Master]);
            pair.linked = true;
            pair.run(Duration::from_millis(250));
            let masters = pair
                .states()
                .iter()
                .filter(|s| **s == VrrpState::Master)
                .count();
            assert_eq!(masters, 1, "priorities {pa}/{pb}: {:?}", pair.states());
            let winner = if pa > pb { 0 } else { 1 };
            assert_eq!(pair.m[winner].state(), VrrpState::Master);
            // And it stays that way.
            pair.run(Duration::from_secs(2));
            assert_eq!(pair.m[winner].state(), VrrpState::Master);
            assert_eq!(pair.m[1 - winner].state(), VrrpState::Backup);
        }
    }

    #[test]
    fn a_master_that_hears_another_master_reannounces_at_most_once_a_second() {
        let mut pair = Pair::new(params(200, "10.0.0.1"), params(100, "10.0.0.2"));
        pair.linked = false;
        pair.run(Duration::from_secs(1));
        assert_eq!(pair.states(), [VrrpState::Master, VrrpState::Master]);
        let announces = |a: &[Action]| a.iter().filter(|x| matches!(x, Action::Announce)).count();
        let peer = pair.addr[1];
        let t0 = pair.now;
        // The healed partition: the lower master's advert arrives.
        assert_eq!(announces(&pair.m[0].on_advert(t0, peer, 100, INTERVAL)), 1);
        assert_eq!(
            announces(&pair.m[0].on_advert(t0 + INTERVAL, peer, 100, INTERVAL)),
            0
        );
        assert_eq!(
            announces(&pair.m[0].on_advert(t0 + REANNOUNCE_EVERY, peer, 100, INTERVAL)),
            1
        );
        // A peer that stops (priority 0) is not a rival: no announcement.
        let later = t0 + 3 * REANNOUNCE_EVERY;
        assert_eq!(announces(&pair.m[0].on_advert(later, peer, 0, INTERVAL)), 0);
        assert_eq!(pair.m[0].state(), VrrpState::Master);
    }

    #[test]
    fn after_a_heal_the_winner_announces_whoever_hears_whom_first() {
        let mut pair = Pair::new(params(200, "10.0.0.1"), params(100, "10.0.0.2"));
        pair.linked = false;
        pair.run(Duration::from_secs(1));
        assert_eq!(pair.states(), [VrrpState::Master, VrrpState::Master]);
        // The winner's advert reaches the loser first: the loser answers with one last
        // advert at its own priority, then yields.
        let now = pair.now;
        let loser = pair.m[1].on_advert(now, pair.addr[0], 200, INTERVAL);
        assert!(
            matches!(loser.first(), Some(Action::SendAdvert { priority: 100 })),
            "{loser:?}"
        );
        assert_eq!(pair.m[1].state(), VrrpState::Backup);
        // That advert makes the winner announce the VIPs again.
        let winner = pair.m[0].on_advert(now, pair.addr[1], 100, INTERVAL);
        assert!(
            winner.iter().any(|a| matches!(a, Action::Announce)),
            "{winner:?}"
        );
        assert_eq!(pair.states(), [VrrpState::Master, VrrpState::Backup]);
    }

    #[test]
    fn a_master_answers_low_adverts_at_most_once_an_interval() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(200, "10.0.0.1"));
        m.start(t0);
        let t1 = t0 + m.master_down_interval();
        m.on_timer(t1);
        assert_eq!(m.state(), VrrpState::Master);
        // A flood: a low advert every millisecond for one second.
        let mut answers = 0;
        let mut t = t1;
        for _ in 0..1000 {
            t += MS;
            answers += sends(&m.on_advert(t, ip("10.0.0.9"), 50, INTERVAL)).len();
            answers += sends(&m.on_advert(t, ip("10.0.0.8"), 0, INTERVAL)).len();
        }
        // One answer per interval (10 in a second), and the first one at once.
        assert!((10..=11).contains(&answers), "{answers} answers");
        let t2 = t + INTERVAL;
        assert_eq!(
            sends(&m.on_advert(t2, ip("10.0.0.9"), 50, INTERVAL)),
            vec![200]
        );
        assert_eq!(
            sends(&m.on_advert(t2 + MS, ip("10.0.0.9"), 50, INTERVAL)),
            Vec::<u8>::new()
        );
        // The regular adverts go on regardless.
        assert_eq!(m.next_deadline(), Some(t2 + INTERVAL));
        assert_eq!(sends(&m.on_timer(t2 + INTERVAL)), vec![200]);
        assert_eq!(m.state(), VrrpState::Master);
    }
}
