//! Active-active scale-out (`[announce]`): while this host can serve a VIP, the agent
//! keeps a host route for it (`/32`, `/128`) in a kernel table of its own; a routing
//! daemon (BIRD: `protocol kernel { kernel table N; learn; }`) learns the table and
//! announces the routes over BGP, and the router spreads clients over every host that
//! announces a VIP (ECMP).
//!
//! A route is present only while the program is attached, the agent is alive, the VIP
//! has a service with a usable backend, and (with `[vrrp]`) this host is serving. The
//! routes sit on a TUN device the agent opens without making it persistent
//! (`kernel::RouteDevice`): when the agent's process ends, however it ends, the kernel
//! destroys the device and every route on it, and BIRD withdraws them at once (it sees
//! the device go). The pinned program meanwhile keeps forwarding what still arrives
//! (fail-static) until the router has moved the flows.
//!
//! This module decides; `kernel` applies the decision.

pub mod kernel;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

/// Why a VIP is, or is not, announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Announce,
    /// No service of the VIP has a usable backend (healthy, enabled, resolved).
    NoUsableBackend,
    /// With `[vrrp]`: this host is not the master of its pair.
    NotServing,
    /// A graceful stop: withdrawn first, forwarding for the grace period.
    Stopping,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Decision::Announce => "announce",
            Decision::NoUsableBackend => "no usable backend",
            Decision::NotServing => "not serving (VRRP backup)",
            Decision::Stopping => "stopping",
        })
    }
}

/// The host-wide conditions of an announcement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gate {
    /// Answering for the VIPs and forwarding: always without `[vrrp]`, as master with it.
    pub serving: bool,
    /// A graceful stop has begun.
    pub stopping: bool,
}

/// What each VIP deserves, from its services' `(vip, has a usable backend)`. A VIP with
/// several services (ports) is announced while any of them can serve: the route is per
/// address, and withdrawing it would cut off the ports that still work.
pub fn decide(
    services: impl IntoIterator<Item = (IpAddr, bool)>,
    gate: Gate,
) -> BTreeMap<IpAddr, Decision> {
    let mut usable: BTreeMap<IpAddr, bool> = BTreeMap::new();
    for (vip, ok) in services {
        *usable.entry(vip).or_default() |= ok;
    }
    usable
        .into_iter()
        .map(|(vip, ok)| {
            let d = if gate.stopping {
                Decision::Stopping
            } else if !gate.serving {
                Decision::NotServing
            } else if !ok {
                Decision::NoUsableBackend
            } else {
                Decision::Announce
            };
            (vip, d)
        })
        .collect()
}

/// The VIPs to keep a route for.
pub fn wanted(decisions: &BTreeMap<IpAddr, Decision>) -> BTreeSet<IpAddr> {
    decisions
        .iter()
        .filter(|(_, d)| **d == Decision::Announce)
        .map(|(vip, _)| *vip)
        .collect()
}

/// What to change to go from the routes `present` to the routes `wanted`: routes to
/// add, routes to remove.
pub fn diff(present: &BTreeSet<IpAddr>, wanted: &BTreeSet<IpAddr>) -> (Vec<IpAddr>, Vec<IpAddr>) {
    (
        wanted.difference(present).copied().collect(),
        present.difference(wanted).copied().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const ON: Gate = Gate {
        serving: true,
        stopping: false,
    };

    #[test]
    fn a_vip_is_announced_while_any_of_its_services_can_serve() {
        let d = decide(
            [
                (ip("192.0.2.1"), true),
                (ip("192.0.2.1"), false),
                (ip("192.0.2.2"), false),
                (ip("2001:db8::1"), true),
            ],
            ON,
        );
        assert_eq!(d[&ip("192.0.2.1")], Decision::Announce);
        assert_eq!(d[&ip("192.0.2.2")], Decision::NoUsableBackend);
        assert_eq!(d[&ip("2001:db8::1")], Decision::Announce);
        assert_eq!(
            wanted(&d),
            BTreeSet::from([ip("192.0.2.1"), ip("2001:db8::1")])
        );
    }

    #[test]
    fn nothing_is_announced_by_a_backup_or_while_stopping() {
        let services = [(ip("192.0.2.1"), true), (ip("192.0.2.2"), false)];
        let backup = decide(
            services,
            Gate {
                serving: false,
                stopping: false,
            },
        );
        assert!(wanted(&backup).is_empty());
        assert_eq!(backup[&ip("192.0.2.1")], Decision::NotServing);
        for serving in [true, false] {
            let stopping = decide(
                services,
                Gate {
                    serving,
                    stopping: true,
                },
            );
            assert!(wanted(&stopping).is_empty());
            assert!(stopping.values().all(|d| *d == Decision::Stopping));
        }
    }

    #[test]
    fn no_services_no_routes() {
        assert!(decide([], ON).is_empty());
    }

    #[test]
    fn diff_adds_the_missing_and_removes_the_extra() {
        let present = BTreeSet::from([ip("192.0.2.1"), ip("192.0.2.2")]);
        let want = BTreeSet::from([ip("192.0.2.2"), ip("192.0.2.3")]);
        assert_eq!(
            diff(&present, &want),
            (vec![ip("192.0.2.3")], vec![ip("192.0.2.1")])
        );
        assert_eq!(diff(&want, &want), (vec![], vec![]));
    }
}
