//! VRRP version 3 (RFC 5798) between two LB hosts: which one holds the VIPs.
//!
//! The master's XDP program answers ARP/ND for the VIPs and forwards; the backup's does
//! neither. This module decides which host is which, flips the data path's serving
//! switch itself (on its own thread, so that no work of the agent's delays it), and
//! tells the agent.
//!
//! - [`packet`] (pure): adverts on the wire, encoded and strictly decoded. Every
//!   reason to drop an advert is its own [`packet::DropReason`], counted apart.
//! - [`auth`] (pure): the optional HMAC-SHA256 trailer and its replay protection. It is
//!   keepalived's `auth_hmac` extension (keepalived 2.4 and later), so the format is
//!   not ours alone; see that module for the layout.
//! - [`state`] (pure): the RFC 5798 state machine. Time comes in as an argument and
//!   the machine answers with actions (send an advert, change state) and the next
//!   deadline; it never sleeps and reads no clock, so every rule has a plain test.
//! - [`announce`] (pure): gratuitous ARP and unsolicited neighbour advertisement frames.
//! - [`net`]: the raw sockets (IP protocol 112, and `AF_PACKET` for the announcements)
//!   and the interface's own addresses.
//! - [`realtime`]: SCHED_FIFO for the speaker's thread, locked memory for the process.
//! - [`speaker`]: the thread that ties them together: [`speaker::spawn`] takes the
//!   serving switch and returns a [`speaker::VrrpHandle`] (tracking input, status,
//!   graceful shutdown) and a lossless channel of [`speaker::StateChange`]s.
//! - The status types are the control protocol's (`crate::protocol`), re-exported here.
//!
//! Choices worth knowing:
//! - One election per host, in one address family: the family of the unicast peers if
//!   any, else that of the first VIP the agent passes (the first service's, as
//!   `config.rs` checks), IPv4 when there is none. The adverts carry the VIPs of that
//!   family; VIPs of the other family follow the same state (keepalived's "excluded"
//!   addresses). Two elections could disagree, and the data path has one switch.
//! - The tie-break address is the interface's primary IPv4 address, or its IPv6
//!   link-local address; adverts are sent from it.
//! - States: `init` (not started, or stopped), `backup`, `master`, and `fault`: the
//!   agent's effective priority is 0 (the data path cannot serve). A fault host listens
//!   but never becomes master; a master that goes to fault first sends priority 0 so
//!   its peer takes over at once. Only `master` serves.
//! - The notify command gets the new state as its one argument (`master`, `backup`,
//!   `fault`, or `init` after a graceful stop), with `LB_VRRP_FROM` (the old state) and
//!   `LB_VRRP_REASON` in its environment. It runs in the background; a failure is logged.
//! - A new master announces every VIP (both families) at once and 4 more times, 200 ms
//!   apart (`speaker::ANNOUNCE_ROUNDS`, `ANNOUNCE_SPACING`).
//! - An advert for our router id whose VIP list differs from ours is another group's
//!   (or a peer with other services): dropped as `foreign_group`, never obeyed.
//! - Without a key the adverts are plain VRRPv3 and keepalived (VRRPv3, default
//!   checksum) takes them as its own; with a key they carry keepalived's `auth_hmac`
//!   trailer. `lab_tests` checks both against a real keepalived. Without a key any host
//!   on the segment can take the VIPs: the speaker warns at start. With one, authentic
//!   adverts dropped only for their time stamp raise a clock skew alarm (log, counter,
//!   status).
//! - Not followed after start: the interface's addresses (the advert source) and the
//!   interface itself being deleted and created again; restart the speaker for those.

pub mod announce;
pub mod auth;
pub mod net;
pub mod packet;
pub mod realtime;
pub mod speaker;
pub mod state;

#[cfg(test)]
mod lab_tests;

use std::{net::IpAddr, time::Duration};

// The status types are the control protocol's: `lbctl` reads them without this module.
pub use crate::protocol::{MasterStatus, TransitionStatus, VrrpCounters, VrrpState, VrrpStatus};
pub use speaker::{StateChange, VrrpError, VrrpHandle, spawn};

/// The `[vrrp]` section, as `config.rs` validated it; the speaker's own checks below
/// guard callers that build one by hand.
pub type VrrpConfig = crate::config::VrrpSettings;

/// A `VrrpConfig` the speaker cannot run with (`config.rs` rejects these first; this
/// guards callers that build one by hand).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("router id 0 is not a VRID (1 to 255)")]
    RouterId,
    #[error("priority {0} is not 1 to 254")]
    Priority(u8),
    #[error("advert interval {0} ms is not a multiple of 10 from 10 to 40950")]
    Interval(u32),
    #[error("unicast peers of both address families")]
    MixedPeers,
}

impl VrrpConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.router_id == 0 {
            return Err(ConfigError::RouterId);
        }
        if !(1..=254).contains(&self.priority) {
            return Err(ConfigError::Priority(self.priority));
        }
        let ms = self.advert_interval_ms;
        if !ms.is_multiple_of(10) || !(10..=u32::from(packet::MAX_INTERVAL_CS) * 10).contains(&ms) {
            return Err(ConfigError::Interval(ms));
        }
        if let Some(first) = self.peers.first()
            && self.peers.iter().any(|p| p.is_ipv4() != first.is_ipv4())
        {
            return Err(ConfigError::MixedPeers);
        }
        Ok(())
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.advert_interval_ms))
    }

    /// The interval as the wire carries it.
    pub fn interval_cs(&self) -> u16 {
        u16::try_from(self.advert_interval_ms / 10).unwrap_or(packet::MAX_INTERVAL_CS)
    }

    /// The family the election runs in (see the module doc).
    pub fn family_v4(&self, vips: &[IpAddr]) -> bool {
        match (self.peers.first(), vips.first()) {
            (Some(peer), _) => peer.is_ipv4(),
            (None, Some(vip)) => vip.is_ipv4(),
            (None, None) => true,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid config for tests: router 51, priority 100, adverts every 100 ms.
    pub(crate) fn cfg() -> VrrpConfig {
        VrrpConfig {
            router_id: 51,
            priority: 100,
            advert_interval_ms: 100,
            preempt: true,
            preempt_delay_ms: 0,
            peers: vec![],
            auth_key_file: None,
            notify: None,
            rt_priority: 0,
        }
    }

    #[test]
    fn validation() {
        assert_eq!(cfg().validate(), Ok(()));
        assert_eq!(cfg().interval_cs(), 10);
        let bad = |f: fn(&mut VrrpConfig)| {
            let mut c = cfg();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(bad(|c| c.router_id = 0), ConfigError::RouterId);
        assert_eq!(bad(|c| c.priority = 255), ConfigError::Priority(255));
        assert_eq!(bad(|c| c.priority = 0), ConfigError::Priority(0));
        assert_eq!(
            bad(|c| c.advert_interval_ms = 105),
            ConfigError::Interval(105)
        );
        assert_eq!(bad(|c| c.advert_interval_ms = 0), ConfigError::Interval(0));
        assert_eq!(
            bad(|c| c.advert_interval_ms = 40_960),
            ConfigError::Interval(40_960)
        );
        assert_eq!(
            bad(|c| c.peers = vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()]),
            ConfigError::MixedPeers
        );
    }

    #[test]
    fn election_family() {
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        let mut c = cfg();
        assert!(c.family_v4(&[]));
        assert!(c.family_v4(&[v4, v6]));
        assert!(!c.family_v4(&[v6, v4]));
        c.peers = vec!["2001:db8::2".parse().unwrap()];
        assert!(!c.family_v4(&[v4]));
    }
}
