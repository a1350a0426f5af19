//! Prometheus metrics: what the agent exports, under which names.
//!
//! Pure: `gather` turns what the agent, the flow scanner, the VRRP speaker and the sync
//! thread published (plus the data path's counters, summed over CPUs) into a `Sample`;
//! `render` writes a sample in the Prometheus text format (version 0.0.4) through
//! `prometheus-client`. The HTTP side is `server`.
//!
//! Names follow Prometheus conventions: `lb_` first, `_total` on counters, base units
//! (bytes, seconds), and labels for what varies (service, backend, reason, state).

pub mod server;

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    Counter as Slot,
    counters::{backend_slot, event, event_slot, global_slot, reason, vip_slot},
};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use crate::{
    dataplane::DataPlaneError,
    flows::FlowSnapshot,
    protocol::{FlowTableStatus, SyncStatus, VrrpState, VrrpStatus},
};

/// What the agent's loop publishes for the metrics after each change: names, ids and
/// the state of each backend. Counters are read from the data path at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub version: String,
    pub xdp_mode: String,
    pub interface: String,
    /// Whether this host answers for the VIPs and forwards their traffic.
    pub serving: bool,
    pub services: Vec<ServiceView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    /// Its VIP's number in the data path (its counter slot); none until programmed.
    pub vip_num: Option<u32>,
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendView {
    pub name: String,
    pub address: IpAddr,
    /// Its id in the data path (its counter slot and its flows); none until programmed.
    pub id: Option<u32>,
    /// Passing its health checks, MAC known.
    pub up: bool,
    /// The weight in effect (an operator's `lbctl backend weight` wins).
    pub weight: u32,
    pub admin_disabled: bool,
}

/// The data path's counters, summed over CPUs; read by whoever scrapes, without the
/// agent's loop.
pub trait CounterSource: Send + Sync {
    fn counter(&self, slot: u32) -> Result<Slot, DataPlaneError>;
}

/// Everything one scrape shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub version: String,
    pub xdp_mode: String,
    pub interface: String,
    pub serving: bool,
    pub services: Vec<ServiceSample>,
    /// Packets not forwarded, by reason (every reason, in the data path's order).
    pub reasons: Vec<(&'static str, u64)>,
    /// Events of forwarded packets (flood guard, flow misses, ICMP), by name.
    pub events: Vec<(&'static str, u64)>,
    pub flows: FlowTableStatus,
    pub vrrp: Option<VrrpStatus>,
    pub sync: Option<SyncStatus>,
    /// With `[announce]`: each VIP with a route in the announce table (true) or whose
    /// route this agent withdrew (false), as the kernel has them.
    pub announced: Option<BTreeMap<IpAddr, bool>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSample {
    pub name: String,
    pub counter: Slot,
    /// Live persistence entries (client addresses), as of the last flow scan.
    pub persistent_clients: u64,
    pub backends: Vec<BackendSample>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSample {
    pub name: String,
    pub address: IpAddr,
    pub counter: Slot,
    pub up: bool,
    pub active_flows: u64,
    pub weight: u32,
    pub admin_disabled: bool,
}

/// One sample from the published state and the counters.
pub fn gather(
    view: &View,
    counters: &dyn CounterSource,
    flows: &FlowSnapshot,
    vrrp: Option<VrrpStatus>,
    sync: Option<SyncStatus>,
) -> Result<Sample, DataPlaneError> {
    let mut services = Vec::with_capacity(view.services.len());
    for s in &view.services {
        let mut backends = Vec::with_capacity(s.backends.len());
        for b in &s.backends {
            backends.push(BackendSample {
                name: b.name.clone(),
                address: b.address,
                counter: match b.id {
                    Some(id) => counters.counter(backend_slot(id))?,
                    None => Slot::default(),
                },
                up: b.up,
                active_flows: b
                    .id
                    .and_then(|id| flows.active.get(&id))
                    .copied()
                    .unwrap_or(0),
                weight: b.weight,
                admin_disabled: b.admin_disabled,
            });
        }
        services.push(ServiceSample {
            name: s.name.clone(),
            counter: match s.vip_num {
                Some(n) => counters.counter(vip_slot(n))?,
                None => Slot::default(),
            },
            persistent_clients: s
                .vip_num
                .and_then(|n| flows.persistent.get(&n))
                .copied()
                .unwrap_or(0),
            backends,
        });
    }
    let mut reasons = Vec::with_capacity(reason::COUNT as usize);
    for (r, name) in reason::NAMES.iter().enumerate() {
        reasons.push((*name, counters.counter(global_slot(r as u32))?.packets));
    }
    let mut events = Vec::with_capacity(event::COUNT as usize);
    for (e, name) in event::NAMES.iter().enumerate() {
        events.push((*name, counters.counter(event_slot(e as u32))?.packets));
    }
    Ok(Sample {
        version: view.version.clone(),
        xdp_mode: view.xdp_mode.clone(),
        interface: view.interface.clone(),
        serving: view.serving,
        services,
        reasons,
        events,
        flows: FlowTableStatus::from(flows),
        vrrp,
        sync,
        announced: None,
    })
}

type Labels = Vec<(&'static str, String)>;

/// A metric family being filled: its name and help, then its series.
struct Counters(Family<Labels, Counter>);
struct Gauges(Family<Labels, Gauge>);

impl Counters {
    /// A counter family: prometheus-client appends `_total` to `name`.
    fn new(registry: &mut Registry, name: &str, help: &str) -> Self {
        let family = Family::<Labels, Counter>::default();
        registry.register(name, help, family.clone());
        Self(family)
    }
    fn set(&self, labels: Labels, value: u64) {
        self.0.get_or_create(&labels).inc_by(value);
    }
}

impl Gauges {
    fn new(registry: &mut Registry, name: &str, help: &str) -> Self {
        let family = Family::<Labels, Gauge>::default();
        registry.register(name, help, family.clone());
        Self(family)
    }
    fn set(&self, labels: Labels, value: u64) {
        self.0
            .get_or_create(&labels)
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    }
}

fn service_labels(service: &str) -> Labels {
    vec![("service", service.to_string())]
}

fn backend_labels(service: &str, b: &BackendSample) -> Labels {
    vec![
        ("service", service.to_string()),
        ("backend", b.name.clone()),
        ("address", b.address.to_string()),
    ]
}

/// The Prometheus text exposition (version 0.0.4) of `sample`.
pub fn render(sample: &Sample) -> String {
    let mut r = Registry::default();
    r.register(
        "lb_agent",
        "The agent's version, XDP mode and interface (value 1)",
        Info::new(vec![
            ("version", sample.version.clone()),
            ("xdp_mode", sample.xdp_mode.clone()),
            ("interface", sample.interface.clone()),
        ]),
    );
    Gauges::new(
        &mut r,
        "lb_serving",
        "1 while this host answers for the VIPs and forwards their traffic",
    )
    .set(Vec::new(), u64::from(sample.serving));

    let packets = Counters::new(
        &mut r,
        "lb_service_packets",
        "Packets forwarded for the service's VIP",
    );
    let bytes = Counters::new(
        &mut r,
        "lb_service_bytes",
        "Bytes forwarded for the service's VIP",
    );
    let new_flows = Counters::new(
        &mut r,
        "lb_service_new_flows",
        "New flows (SYNs and lost flows) that took the service's ring",
    );
    let persistent = Gauges::new(
        &mut r,
        "lb_service_persistent_clients",
        "Client addresses whose persistence entry is live (persistence_timeout_s)",
    );
    for s in &sample.services {
        packets.set(service_labels(&s.name), s.counter.packets);
        bytes.set(service_labels(&s.name), s.counter.bytes);
        new_flows.set(service_labels(&s.name), s.counter.new_flows);
        persistent.set(service_labels(&s.name), s.persistent_clients);
    }

    let packets = Counters::new(
        &mut r,
        "lb_backend_packets",
        "Packets forwarded to the backend",
    );
    let bytes = Counters::new(&mut r, "lb_backend_bytes", "Bytes forwarded to the backend");
    let new_flows = Counters::new(
        &mut r,
        "lb_backend_new_flows",
        "New flows sent to the backend by the ring",
    );
    let up = Gauges::new(
        &mut r,
        "lb_backend_up",
        "1 while the backend passes its health checks and its MAC is known",
    );
    let active = Gauges::new(
        &mut r,
        "lb_backend_active_flows",
        "Flows on the backend seen active by the last flow-table scan",
    );
    let weight = Gauges::new(
        &mut r,
        "lb_backend_weight",
        "The backend's weight in effect",
    );
    let disabled = Gauges::new(
        &mut r,
        "lb_backend_admin_disabled",
        "1 while an operator has disabled the backend (draining)",
    );
    for s in &sample.services {
        for b in &s.backends {
            packets.set(backend_labels(&s.name, b), b.counter.packets);
            bytes.set(backend_labels(&s.name, b), b.counter.bytes);
            new_flows.set(backend_labels(&s.name, b), b.counter.new_flows);
            up.set(backend_labels(&s.name, b), u64::from(b.up));
            active.set(backend_labels(&s.name, b), b.active_flows);
            weight.set(backend_labels(&s.name, b), u64::from(b.weight));
            disabled.set(backend_labels(&s.name, b), u64::from(b.admin_disabled));
        }
    }

    let reasons = Counters::new(
        &mut r,
        "lb_packets",
        "Packets the XDP program did not forward, by reason (passed, answered or dropped)",
    );
    for (name, value) in &sample.reasons {
        reasons.set(vec![("reason", name.to_string())], *value);
    }
    let events = Counters::new(
        &mut r,
        "lb_datapath_events",
        "Events of forwarded packets: flow_not_recorded (flood guard), flow_miss, icmp_to_flow, icmp_to_ring",
    );
    for (name, value) in &sample.events {
        events.set(vec![("event", name.to_string())], *value);
    }

    let f = &sample.flows;
    let entries = Gauges::new(
        &mut r,
        "lb_flow_table_entries",
        "Entries in the connection table and in the pinned-flow table at the last scan",
    );
    entries.set(vec![("table", "connections".into())], f.connections);
    entries.set(vec![("table", "pinned".into())], f.pinned);
    entries.set(vec![("table", "nat".into())], f.nat_flows);
    Counters::new(
        &mut r,
        "lb_nat_flows_collected",
        "NAT flows (both entries) removed after their close, time-wait or idle timeout",
    )
    .set(Vec::new(), f.nat_collected);
    Counters::new(
        &mut r,
        "lb_flow_pin_failures",
        "Flows that should have been pinned but found the pinned table full",
    )
    .set(Vec::new(), f.pin_failures);
    Counters::new(
        &mut r,
        "lb_flow_synced_pins_installed",
        "Flow pins from sync peers written into the pinned table",
    )
    .set(Vec::new(), f.synced_pins_installed);
    // Both absent before the first scan.
    let scan_seconds = [
        (
            "lb_flow_scan_age_seconds",
            "Time since the last flow-table scan began",
            f.scan_age_ms,
        ),
        (
            "lb_flow_scan_duration_seconds",
            "How long the last flow-table scan took (the scans keep to a twentieth of a core)",
            f.scan_ms,
        ),
    ];
    for (name, help, ms) in scan_seconds {
        if let Some(ms) = ms {
            let gauge = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
            r.register(name, help, gauge.clone());
            gauge.get_or_create(&Vec::new()).set(ms as f64 / 1000.0);
        }
    }

    if let Some(v) = &sample.vrrp {
        render_vrrp(&mut r, v);
    }
    if let Some(s) = &sample.sync {
        render_sync(&mut r, s);
    }
    if let Some(announced) = &sample.announced {
        let g = Gauges::new(
            &mut r,
            "lb_vip_announced",
            "1 while this host keeps the VIP's route in the [announce] table, 0 once withdrawn",
        );
        for (vip, on) in announced {
            g.set(vec![("vip", vip.to_string())], u64::from(*on));
        }
    }

    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut text, &r);
    text
}

const VRRP_STATES: [VrrpState; 4] = [
    VrrpState::Init,
    VrrpState::Backup,
    VrrpState::Master,
    VrrpState::Fault,
];

fn render_vrrp(r: &mut Registry, v: &VrrpStatus) {
    let state = Gauges::new(
        r,
        "lb_vrrp_state",
        "1 for the VRRP state this host is in, 0 for the others",
    );
    for s in VRRP_STATES {
        state.set(vec![("state", s.as_str().into())], u64::from(v.state == s));
    }
    Gauges::new(r, "lb_vrrp_priority", "Configured VRRP priority")
        .set(Vec::new(), u64::from(v.priority));
    Gauges::new(
        r,
        "lb_vrrp_effective_priority",
        "The VRRP priority advertised: the configured one, lowered by tracking",
    )
    .set(Vec::new(), u64::from(v.effective_priority));
    let c = &v.counters;
    let one = |r: &mut Registry, name: &str, help: &str, value: u64| {
        Counters::new(r, name, help).set(Vec::new(), value);
    };
    one(
        r,
        "lb_vrrp_adverts_sent",
        "VRRP adverts sent (one per destination)",
        c.adverts_sent,
    );
    one(
        r,
        "lb_vrrp_adverts_received",
        "VRRP adverts received that passed every check",
        c.adverts_received,
    );
    let dropped = Counters::new(
        r,
        "lb_vrrp_adverts_dropped",
        "VRRP adverts dropped, by reason",
    );
    for (reason, n) in &c.dropped {
        dropped.set(vec![("reason", reason.clone())], *n);
    }
    one(
        r,
        "lb_vrrp_transitions",
        "VRRP state transitions",
        c.transitions,
    );
    one(
        r,
        "lb_vrrp_send_errors",
        "VRRP adverts that could not be sent",
        c.send_errors,
    );
    one(
        r,
        "lb_vrrp_receive_errors",
        "Errors reading the VRRP socket",
        c.receive_errors,
    );
    one(
        r,
        "lb_vrrp_announcements_sent",
        "Gratuitous ARP and unsolicited neighbour advertisements sent",
        c.announcements_sent,
    );
    one(
        r,
        "lb_vrrp_announcement_errors",
        "Gratuitous ARP / neighbour advertisements that could not be sent",
        c.announcement_errors,
    );
    one(
        r,
        "lb_vrrp_serve_switch_errors",
        "Failed writes of the data path's serving switch (each is retried)",
        c.serve_switch_errors,
    );
    one(
        r,
        "lb_vrrp_clock_skew_adverts",
        "Authentic adverts dropped for their age alone (clock skew)",
        c.clock_skew,
    );
}

fn render_sync(r: &mut Registry, s: &SyncStatus) {
    let c = &s.counters;
    let one = |r: &mut Registry, name: &str, help: &str, value: u64| {
        Counters::new(r, name, help).set(Vec::new(), value);
    };
    one(
        r,
        "lb_sync_messages_sent",
        "Sync messages sent",
        c.messages_sent,
    );
    one(
        r,
        "lb_sync_sent_bytes",
        "Bytes of sync messages sent",
        c.bytes_sent,
    );
    one(
        r,
        "lb_sync_messages_received",
        "Sync messages received and accepted",
        c.messages_received,
    );
    one(
        r,
        "lb_sync_admin_updates_received",
        "Admin entries received from peers",
        c.admin_updates_received,
    );
    one(
        r,
        "lb_sync_flows_sent",
        "Flow pins sent (once per peer)",
        c.flows_sent,
    );
    one(
        r,
        "lb_sync_flows_received",
        "Flow pins received",
        c.flows_received,
    );
    one(
        r,
        "lb_sync_unpins_sent",
        "Flow unpins sent (once per peer)",
        c.unpins_sent,
    );
    one(
        r,
        "lb_sync_unpins_received",
        "Flow unpins received",
        c.unpins_received,
    );
    one(
        r,
        "lb_sync_persistence_sent",
        "Persistence entries sent (once per peer)",
        c.persistence_sent,
    );
    one(
        r,
        "lb_sync_persistence_received",
        "Persistence entries received",
        c.persistence_received,
    );
    let dropped = Counters::new(
        r,
        "lb_sync_messages_dropped",
        "Sync messages dropped, by reason",
    );
    for (reason, n) in &c.dropped {
        dropped.set(vec![("reason", reason.clone())], *n);
    }
    one(
        r,
        "lb_sync_send_errors",
        "Sync messages that could not be sent",
        c.send_errors,
    );
    one(
        r,
        "lb_sync_receive_errors",
        "Errors reading the sync socket",
        c.receive_errors,
    );
    let connected = Gauges::new(
        r,
        "lb_sync_peer_connected",
        "1 while the sync peer has been heard within 1.5 s",
    );
    let in_step = Gauges::new(
        r,
        "lb_sync_peer_admin_in_step",
        "1 while the peer's admin state digest equals ours",
    );
    for p in &s.peers {
        connected.set(
            vec![("peer", p.address.to_string())],
            u64::from(p.connected),
        );
        in_step.set(
            vec![("peer", p.address.to_string())],
            u64::from(p.admin_in_step),
        );
    }
}

/// Values by metric line, for tests: `name{labels}` → value, from a rendered text.
pub fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::protocol::{SyncCounters, SyncPeerStatus, VrrpCounters};

    /// Counters by slot; absent slots read zero.
    struct FakeCounters(HashMap<u32, Slot>);

    impl CounterSource for FakeCounters {
        fn counter(&self, slot: u32) -> Result<Slot, DataPlaneError> {
            Ok(self.0.get(&slot).copied().unwrap_or_default())
        }
    }

    fn slot(packets: u64, bytes: u64, new_flows: u64) -> Slot {
        Slot {
            packets,
            bytes,
            new_flows,
        }
    }

    fn view() -> View {
        View {
            version: "0.1.0".into(),
            xdp_mode: "native".into(),
            interface: "eth0".into(),
            serving: true,
            services: vec![ServiceView {
                name: "web".into(),
                vip_num: Some(2),
                backends: vec![
                    BackendView {
                        name: "b1".into(),
                        address: "10.0.0.11".parse().unwrap(),
                        id: Some(5),
                        up: true,
                        weight: 100,
                        admin_disabled: false,
                    },
                    BackendView {
                        name: "b2".into(),
                        address: "2001:db8::12".parse().unwrap(),
                        id: None,
                        up: false,
                        weight: 0,
                        admin_disabled: true,
                    },
                ],
            }],
        }
    }

    fn vrrp() -> VrrpStatus {
        VrrpStatus {
            state: VrrpState::Master,
            router_id: 51,
            interface: "eth0".into(),
            address: "10.0.0.3".parse().unwrap(),
            mode: "multicast".into(),
            authenticated: false,
            priority: 150,
            effective_priority: 140,
            advert_interval_ms: 100,
            master: None,
            last_transition: None,
            counters: VrrpCounters {
                adverts_sent: 40,
                adverts_received: 3,
                dropped: BTreeMap::from([("bad_checksum".to_string(), 2)]),
                transitions: 2,
                ..VrrpCounters::default()
            },
            alarms: Vec::new(),
        }
    }

    fn sync() -> SyncStatus {
        SyncStatus {
            peers: vec![SyncPeerStatus {
                address: "10.0.0.4".parse().unwrap(),
                connected: true,
                connected_since_unix_ms: None,
                last_heard_unix_ms: None,
                last_heard_ms_ago: None,
                admin_in_step: false,
            }],
            counters: SyncCounters {
                messages_sent: 7,
                bytes_sent: 700,
                dropped: BTreeMap::from([("replayed".to_string(), 1)]),
                ..SyncCounters::default()
            },
            ..SyncStatus::default()
        }
    }

    fn sample(vrrp_on: bool) -> Sample {
        let counters = FakeCounters(HashMap::from([
            (vip_slot(2), slot(10, 1000, 3)),
            (backend_slot(5), slot(9, 900, 3)),
            (global_slot(reason::DROP_FRAGMENT), slot(4, 0, 0)),
            (event_slot(event::FLOW_NOT_RECORDED), slot(6, 0, 0)),
        ]));
        let flows = FlowSnapshot {
            active: HashMap::from([(5, 2)]),
            connections: 12,
            pinned: 1,
            pin_failures: 0,
            persistent: HashMap::from([(2, 4)]),
            ..FlowSnapshot::default()
        };
        gather(
            &view(),
            &counters,
            &flows,
            vrrp_on.then(vrrp),
            vrrp_on.then(sync),
        )
        .unwrap()
    }

    #[test]
    fn counters_gauges_and_info_have_their_names_and_labels() {
        let text = render(&sample(false));
        let m = parse(&text);
        let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
        assert_eq!(
            get(r#"lb_agent_info{version="0.1.0",xdp_mode="native",interface="eth0"}"#),
            1.0
        );
        assert_eq!(get("lb_serving"), 1.0);
        assert_eq!(get(r#"lb_service_packets_total{service="web"}"#), 10.0);
        assert_eq!(get(r#"lb_service_bytes_total{service="web"}"#), 1000.0);
        assert_eq!(get(r#"lb_service_new_flows_total{service="web"}"#), 3.0);
        assert_eq!(get(r#"lb_service_persistent_clients{service="web"}"#), 4.0);
        let b1 = r#"{service="web",backend="b1",address="10.0.0.11"}"#;
        assert_eq!(get(&format!("lb_backend_packets_total{b1}")), 9.0);
        assert_eq!(get(&format!("lb_backend_bytes_total{b1}")), 900.0);
        assert_eq!(get(&format!("lb_backend_new_flows_total{b1}")), 3.0);
        assert_eq!(get(&format!("lb_backend_up{b1}")), 1.0);
        assert_eq!(get(&format!("lb_backend_active_flows{b1}")), 2.0);
        assert_eq!(get(&format!("lb_backend_weight{b1}")), 100.0);
        assert_eq!(get(&format!("lb_backend_admin_disabled{b1}")), 0.0);
        // A backend without an id yet (no MAC, say) shows zeros, not an error.
        let b2 = r#"{service="web",backend="b2",address="2001:db8::12"}"#;
        assert_eq!(get(&format!("lb_backend_packets_total{b2}")), 0.0);
        assert_eq!(get(&format!("lb_backend_up{b2}")), 0.0);
        assert_eq!(get(&format!("lb_backend_admin_disabled{b2}")), 1.0);
        // Every reason and every event, moved or not.
        for name in reason::NAMES {
            let want = if name == "drop_fragment" { 4.0 } else { 0.0 };
            assert_eq!(
                get(&format!(r#"lb_packets_total{{reason="{name}"}}"#)),
                want
            );
        }
        for name in event::NAMES {
            let want = if name == "flow_not_recorded" {
                6.0
            } else {
                0.0
            };
            assert_eq!(
                get(&format!(r#"lb_datapath_events_total{{event="{name}"}}"#)),
                want
            );
        }
        assert_eq!(get(r#"lb_flow_table_entries{table="connections"}"#), 12.0);
        assert_eq!(get(r#"lb_flow_table_entries{table="pinned"}"#), 1.0);
        assert_eq!(get(r#"lb_flow_table_entries{table="nat"}"#), 0.0);
        assert_eq!(get("lb_nat_flows_collected_total"), 0.0);
        assert_eq!(get("lb_flow_pin_failures_total"), 0.0);
        // Standalone: no VRRP or sync series at all.
        assert!(!text.contains("lb_vrrp_"), "{text}");
        assert!(!text.contains("lb_sync_"), "{text}");
        // Declared types, in the text format's spelling.
        assert!(
            text.contains("# TYPE lb_service_packets_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE lb_backend_up gauge\n"), "{text}");
        assert!(text.contains("# TYPE lb_agent_info gauge\n"), "{text}");
    }

    #[test]
    fn vrrp_and_sync_series_appear_with_their_sections() {
        let text = render(&sample(true));
        let m = parse(&text);
        let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
        assert_eq!(get(r#"lb_vrrp_state{state="master"}"#), 1.0);
        assert_eq!(get(r#"lb_vrrp_state{state="backup"}"#), 0.0);
        assert_eq!(get(r#"lb_vrrp_state{state="init"}"#), 0.0);
        assert_eq!(get(r#"lb_vrrp_state{state="fault"}"#), 0.0);
        assert_eq!(get("lb_vrrp_priority"), 150.0);
        assert_eq!(get("lb_vrrp_effective_priority"), 140.0);
        assert_eq!(get("lb_vrrp_adverts_sent_total"), 40.0);
        assert_eq!(get("lb_vrrp_adverts_received_total"), 3.0);
        assert_eq!(
            get(r#"lb_vrrp_adverts_dropped_total{reason="bad_checksum"}"#),
            2.0
        );
        assert_eq!(get("lb_vrrp_transitions_total"), 2.0);
        assert_eq!(get("lb_sync_messages_sent_total"), 7.0);
        assert_eq!(get("lb_sync_sent_bytes_total"), 700.0);
        assert_eq!(
            get(r#"lb_sync_messages_dropped_total{reason="replayed"}"#),
            1.0
        );
        assert_eq!(get(r#"lb_sync_peer_connected{peer="10.0.0.4"}"#), 1.0);
        assert_eq!(get(r#"lb_sync_peer_admin_in_step{peer="10.0.0.4"}"#), 0.0);
    }

    #[test]
    fn announced_vips_appear_with_announce() {
        assert!(!render(&sample(false)).contains("lb_vip_announced"));
        let mut s = sample(false);
        s.announced = Some(BTreeMap::from([
            ("192.0.2.10".parse().unwrap(), true),
            ("2001:db8::10".parse().unwrap(), false),
        ]));
        let text = render(&s);
        let m = parse(&text);
        assert_eq!(m[r#"lb_vip_announced{vip="192.0.2.10"}"#], 1.0, "{text}");
        assert_eq!(m[r#"lb_vip_announced{vip="2001:db8::10"}"#], 0.0, "{text}");
        assert!(text.contains("# TYPE lb_vip_announced gauge\n"), "{text}");
    }

    #[test]
    fn every_series_is_declared_once_and_counters_end_in_total() {
        let text = render(&sample(true));
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "{name} declared twice"
                );
                assert!(name.starts_with("lb_"), "{name}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            }
        }
        for series in parse(&text).keys() {
            let name = series.split('{').next().unwrap();
            assert!(types.contains_key(name), "{name} has no TYPE line");
        }
    }

    #[test]
    fn per_cpu_values_are_summed() {
        let per_cpu = [slot(1, 100, 1), slot(0, 0, 0), slot(41, 4100, 2)];
        assert_eq!(
            crate::dataplane::sum_per_cpu(per_cpu.iter()),
            slot(42, 4200, 3)
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = sample(false);
        s.interface = "a\"b\\c".into();
        let text = render(&s);
        assert!(text.contains(r#"interface="a\"b\\c""#), "{text}");
    }
}
