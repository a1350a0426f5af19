//! Client-address persistence (`persistence_timeout_s`) as the agent sees it: which
//! entries of the program's PERSIST table are live, which are expired and removed, which
//! go to the sync peers and how a peer's entries become this host's. Plain functions;
//! the flow scanner (`crate::flows`) moves the data.
//!
//! The data path decides on its own (`lb-ebpf/src/persist.rs`): an entry older than its
//! service's timeout, or whose backend no longer takes new connections, is ignored and
//! replaced by the ring's choice. Removal here only frees room and keeps the counts
//! true; it is never needed for correctness.

use std::collections::HashMap;

use lb_common::{PERSIST_LAG_NS, PersistKey, PersistState, VipKey};

use crate::{
    flows::{Names, RingSet},
    sync::wire::Sticky,
};

/// The VIP number and timeout (seconds, not 0) of an entry's service on this host.
pub fn service_of(key: &PersistKey, rings: &RingSet) -> Option<(u32, u32)> {
    let vip = VipKey {
        addr: key.vip,
        port_be: key.port_be,
        proto: key.proto,
        family: key.family,
    };
    let vip_num = *rings.names.vips.get(&vip)?;
    let timeout = *rings.persistence.get(&vip_num)?;
    (timeout != 0).then_some((vip_num, timeout))
}

/// Whether an entry still decides its client's next connection, as far as time goes.
pub fn is_live(state: &PersistState, timeout_s: u32, now_ns: u64) -> bool {
    now_ns.saturating_sub(state.last_seen_ns) <= u64::from(timeout_s) * 1_000_000_000
}

/// One scan of the persistence table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PersistScan {
    /// Entries to remove: expired, or of a service that has no persistence (any more).
    pub expired: Vec<PersistKey>,
    /// The others.
    pub live: Vec<(PersistKey, PersistState)>,
    /// Live entries per VIP number.
    pub per_vip: HashMap<u32, u64>,
}

pub fn scan(entries: &[(PersistKey, PersistState)], rings: &RingSet, now_ns: u64) -> PersistScan {
    let mut out = PersistScan::default();
    for (k, s) in entries {
        match service_of(k, rings) {
            Some((vip_num, timeout)) if is_live(s, timeout, now_ns) => {
                *out.per_vip.entry(vip_num).or_insert(0) += 1;
                out.live.push((*k, *s));
            }
            _ => out.expired.push(*k),
        }
    }
    out
}

/// The most a peer's copy of an entry may lag behind: a tenth of the service's
/// timeout, at most `MAX_LAG_NS`. A busy client's entry is refreshed here every second;
/// sending each refresh would cost a datagram per ~80 busy clients per second for
/// nothing, while a copy that lags by a tenth of the timeout only expires that much
/// early on the peer.
pub const MAX_LAG_NS: u64 = 10_000_000_000;

pub fn max_lag_ns(timeout_s: u32) -> u64 {
    (u64::from(timeout_s) * 100_000_000).min(MAX_LAG_NS)
}

/// Live entries the sync peers should hear of, given what they were last sent (or
/// sent us): new ones, those whose backend changed, and those whose time moved on by
/// more than `max_lag_ns` of their service.
pub fn changed(
    live: &[(PersistKey, PersistState)],
    sent: &HashMap<PersistKey, PersistState>,
    rings: &RingSet,
) -> Vec<(PersistKey, PersistState)> {
    live.iter()
        .filter(|(k, s)| match sent.get(k) {
            None => true,
            Some(old) if old.backend != s.backend => true,
            Some(old) => {
                let lag = service_of(k, rings).map_or(0, |(_, t)| max_lag_ns(t));
                s.last_seen_ns.saturating_sub(old.last_seen_ns) > lag
            }
        })
        .copied()
        .collect()
}

/// Entries as peers should know them: by backend address, with their idle time. Those
/// whose backend id has no name here (a plan not yet committed) are left out.
pub fn to_wire(entries: &[(PersistKey, PersistState)], names: &Names, now_ns: u64) -> Vec<Sticky> {
    entries
        .iter()
        .filter_map(|(k, s)| {
            let idle_ms = now_ns.saturating_sub(s.last_seen_ns) / 1_000_000;
            Some(Sticky {
                key: *k,
                backend: names.backends.get(&s.backend)?.clone(),
                idle_ms: u32::try_from(idle_ms).unwrap_or(u32::MAX),
            })
        })
        .collect()
}

/// A peer's entries as entries of this host's table: its backend id and VIP number,
/// its time in this host's clock. Skipped: a backend or VIP this host does not have, a
/// service without persistence here, an entry already expired, and one that is not
/// newer (by more than the data path's lag, `PERSIST_LAG_NS`) than this host's own (`local`):
/// the freshest use of a client decides, so two hosts never undo each other's entries.
pub fn from_peer(
    entries: &[Sticky],
    rings: &RingSet,
    local: &HashMap<PersistKey, PersistState>,
    now_ns: u64,
) -> Vec<(PersistKey, PersistState)> {
    entries
        .iter()
        .filter_map(|e| {
            let backend = *rings.names.ids.get(&e.backend)?;
            let (vip_num, timeout) = service_of(&e.key, rings)?;
            let state = PersistState {
                backend,
                vip_num,
                last_seen_ns: now_ns.saturating_sub(u64::from(e.idle_ms) * 1_000_000),
            };
            if !is_live(&state, timeout, now_ns) {
                return None;
            }
            if local.get(&e.key).is_some_and(|l| {
                l.last_seen_ns.saturating_add(PERSIST_LAG_NS) >= state.last_seen_ns
            }) {
                return None;
            }
            Some((e.key, state))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::BackendId;

    const NOW: u64 = 10_000_000_000_000;
    const S: u64 = 1_000_000_000;

    fn vip() -> VipKey {
        crate::programmer::vip_key("10.0.0.100".parse().unwrap(), 80)
    }

    fn key(client: u8) -> PersistKey {
        let v = vip();
        let mut c = [0; 16];
        c[..4].copy_from_slice(&[10, 0, 1, client]);
        PersistKey {
            client: c,
            vip: v.addr,
            port_be: v.port_be,
            proto: v.proto,
            family: v.family,
        }
    }

    fn backend(n: u8) -> BackendId {
        BackendId {
            service: "web".into(),
            address: format!("10.0.0.{n}").parse().unwrap(),
        }
    }

    /// VIP number 3 with a timeout of `timeout` s; backends 21 and 22 as ids 1 and 2.
    fn rings(timeout: u32) -> RingSet {
        RingSet {
            persistence: HashMap::from([(3, timeout)]),
            names: Arc::new(Names {
                backends: HashMap::from([(1, backend(21)), (2, backend(22))]),
                ids: HashMap::from([(backend(21), 1), (backend(22), 2)]),
                vips: HashMap::from([(vip(), 3)]),
            }),
            ..Default::default()
        }
    }

    fn state(backend: u32, age_s: u64) -> PersistState {
        PersistState {
            backend,
            vip_num: 3,
            last_seen_ns: NOW - age_s * S,
        }
    }

    #[test]
    fn live_until_the_timeout_then_expired() {
        assert!(is_live(&state(1, 300), 300, NOW));
        assert!(!is_live(&state(1, 301), 300, NOW));
        // A time ahead of ours (a peer's rounding) is live, not an underflow.
        let ahead = PersistState {
            last_seen_ns: NOW + S,
            ..state(1, 0)
        };
        assert!(is_live(&ahead, 1, NOW));
    }

    #[test]
    fn a_scan_counts_live_entries_and_collects_the_rest() {
        let entries = vec![
            (key(1), state(1, 10)),
            (key(2), state(2, 299)),
            (key(3), state(1, 301)),
        ];
        let s = scan(&entries, &rings(300), NOW);
        assert_eq!(s.expired, vec![key(3)]);
        assert_eq!(s.per_vip, HashMap::from([(3, 2)]));
        assert_eq!(s.live.len(), 2);
        // Persistence turned off, or the VIP gone: every entry goes.
        let s = scan(&entries, &rings(0), NOW);
        assert_eq!(s.expired.len(), 3);
        assert!(s.per_vip.is_empty());
        let mut gone = rings(300);
        gone.names = Arc::new(Names::default());
        assert_eq!(scan(&entries, &gone, NOW).expired.len(), 3);
    }

    #[test]
    fn new_moved_or_much_refreshed_entries_count_as_changed() {
        // Timeout 300 s: a peer's copy may lag by 10 s (capped); timeout 20 s: by 2 s.
        assert_eq!(max_lag_ns(300), MAX_LAG_NS);
        assert_eq!(max_lag_ns(20), 2 * S);
        let sent = HashMap::from([
            (key(1), state(1, 30)),
            (key(2), state(2, 30)),
            (key(4), state(1, 30)),
        ]);
        let live = vec![
            (key(1), state(1, 25)), // refreshed 5 s later: the peer's copy is good enough
            (key(2), state(2, 15)), // 15 s later: sent
            (key(3), state(1, 1)),  // new: sent
            (key(4), state(2, 30)), // another backend: sent
        ];
        let keys =
            |c: Vec<(PersistKey, PersistState)>| c.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(changed(&live, &sent, &rings(300))),
            vec![key(2), key(3), key(4)]
        );
        assert_eq!(
            keys(changed(&live, &sent, &rings(20))),
            vec![key(1), key(2), key(3), key(4)],
            "a short timeout allows a short lag"
        );
    }

    #[test]
    fn entries_cross_hosts_by_backend_address_and_the_freshest_wins() {
        let sender = rings(300);
        let wire = to_wire(
            &[
                (key(1), state(1, 10)),
                (key(2), state(2, 100)),
                (key(3), state(9, 1)),
            ],
            &sender.names,
            NOW,
        );
        assert_eq!(wire.len(), 2, "backend 9 has no name here: left out");
        assert_eq!((wire[0].idle_ms, &wire[0].backend), (10_000, &backend(21)));

        // The receiver numbers the same backends the other way round.
        let mut receiver = rings(300);
        receiver.names = Arc::new(Names {
            backends: HashMap::from([(5, backend(21)), (6, backend(22))]),
            ids: HashMap::from([(backend(21), 5), (backend(22), 6)]),
            vips: HashMap::from([(vip(), 3)]),
        });
        let got = from_peer(&wire, &receiver, &HashMap::new(), NOW);
        assert_eq!(
            got,
            vec![(key(1), state(5, 10)), (key(2), state(6, 100))],
            "translated to this host's ids and clock"
        );
        // An entry of our own at least as fresh stays; an older one is replaced.
        let local = HashMap::from([(key(1), state(6, 10)), (key(2), state(5, 200))]);
        let got = from_peer(&wire, &receiver, &local, NOW);
        assert_eq!(got, vec![(key(2), state(6, 100))]);
        // Ours older by less than the data path's lag (`PERSIST_LAG_NS`, 2 s): it may
        // be in use all the same, and stays.
        let lagging = PersistState {
            last_seen_ns: NOW - 11_500_000_000,
            ..state(6, 0)
        };
        let local = HashMap::from([(key(1), lagging)]);
        let got = from_peer(&wire, &receiver, &local, NOW);
        assert_eq!(got, vec![(key(2), state(6, 100))]);
        // Expired on arrival, or persistence off here: nothing.
        assert!(from_peer(&wire, &rings(5), &HashMap::new(), NOW).is_empty());
        assert!(from_peer(&wire, &rings(0), &HashMap::new(), NOW).is_empty());
    }

    #[test]
    fn the_data_path_rule_takes_only_live_entries_of_backends_that_take_new_flows() {
        use lb_common::{BACKEND_F_NEW_FLOWS, BACKEND_F_VALID, persist_applies};
        let both = BACKEND_F_VALID | BACKEND_F_NEW_FLOWS;
        assert!(persist_applies(&state(1, 300), 300, both, NOW));
        assert!(!persist_applies(&state(1, 301), 300, both, NOW), "expired");
        assert!(!persist_applies(&state(1, 1), 0, both, NOW), "off");
        assert!(
            !persist_applies(&state(1, 1), 300, BACKEND_F_VALID, NOW),
            "drained or disabled: out of the ring"
        );
        assert!(
            !persist_applies(&state(1, 1), 300, BACKEND_F_NEW_FLOWS, NOW),
            "down"
        );
        assert!(!persist_applies(&state(1, 1), 300, 0, NOW), "gone");
    }
}
