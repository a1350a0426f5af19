//! The control protocol between `lbctl` and the agent, defined once for both.
//!
//! One JSON object per line over the agent's Unix socket. Each request carries the
//! protocol version; a request the agent cannot read gets an `Error` reply, never a
//! dropped connection without a word. Frames are capped at `MAX_FRAME` bytes.
//!
//! Versions: 1 is one request, one reply, any number of times on one connection.
//! 2 adds one streaming request, `trace`: the agent answers `tracing` once the program
//! traces, then one `trace` line per decision (and `trace_lost` when events were lost),
//! until `count` events were sent (then `done`) or the client closes the connection.
//! Nothing else is read on a connection that traces. A request is sent with the lowest
//! version that has it (`Request::version`), so a newer lbctl still speaks to an older
//! agent; the agent accepts every version from `MIN_PROTOCOL_VERSION` to its own.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

/// The newest version this side speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest version the agent still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// Largest request or response line, newline included.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest request line the agent reads.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    ListBackends {
        service: Option<String>,
    },
    DisableBackend {
        service: String,
        backend: String,
    },
    EnableBackend {
        service: String,
        backend: String,
    },
    SetWeight {
        service: String,
        backend: String,
        weight: u32,
    },
    Reload,
    /// Version 2, streaming: the program's decisions about VIP traffic, live.
    Trace {
        /// Only packets to this address (a VIP).
        #[serde(default)]
        vip: Option<IpAddr>,
        /// Stop after this many events.
        #[serde(default)]
        count: Option<u64>,
    },
}

impl Request {
    /// The lowest protocol version that has this request.
    pub fn version(&self) -> u32 {
        match self {
            Request::Trace { .. } => 2,
            _ => 1,
        }
    }
}

/// What goes over the wire: the request and the version it speaks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u32,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Backends {
        backends: Vec<BackendStatus>,
    },
    Done {
        message: String,
    },
    Error {
        message: String,
        details: Vec<String>,
    },
    /// Version 2: the answer to `trace` once the program traces; events follow.
    Tracing {
        message: String,
    },
    /// Version 2: one decision of the program.
    Trace(TraceRecord),
    /// Version 2: this many events never reached this client (the ring buffer or the
    /// client was too slow).
    TraceLost {
        events: u64,
    },
}

/// One decision of the XDP program, as `lbctl trace` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// When the agent read it, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// `tcp`, `icmp`, `icmpv6`, `udp`, `arp`, `ip proto N`, or `non-ip`.
    pub protocol: String,
    /// Absent when the packet was not IP (or ARP).
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    /// Absent when unknown (a fragment, not TCP).
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// The XDP action: `tx`, `pass`, `drop`, `aborted`.
    pub verdict: String,
    /// `forwarded`, or the reason it was not (the names of `lbctl status`'s counters).
    pub reason: String,
    /// Where a forwarded packet went.
    pub service: Option<String>,
    pub backend: Option<String>,
    /// It took the ring: a SYN, or a flow no table knew.
    #[serde(default)]
    pub new_flow: bool,
    /// An ICMP error about a flow; the addresses and ports are the flow's.
    #[serde(default)]
    pub icmp_error: bool,
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Response::Error {
            message: message.into(),
            details: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub interface: String,
    pub xdp_mode: String,
    pub uptime_s: u64,
    pub services: Vec<ServiceStatus>,
    /// Global counters of packets not forwarded, by reason.
    pub counters: BTreeMap<String, u64>,
    /// Data-path events that are not a verdict: flows the flood guard left unrecorded,
    /// flows the tables lost, ICMP errors sent on to a flow's backend.
    #[serde(default)]
    pub events: BTreeMap<String, u64>,
    /// Absent when the agent runs standalone (no `[vrrp]`): always master.
    pub vrrp: Option<VrrpStatus>,
    /// Whether this host answers for the VIPs and forwards their traffic now.
    pub serving: bool,
    /// The flow tables as the last background scan saw them.
    #[serde(default)]
    pub flows: FlowTableStatus,
    /// State shared with the other LB hosts; absent without `[sync]`.
    #[serde(default)]
    pub sync: Option<SyncStatus>,
    /// The VIP routes a routing daemon announces; absent without `[announce]`.
    #[serde(default)]
    pub announce: Option<AnnounceStatus>,
}

/// `[announce]` as `lbctl status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// The kernel table the routes are in, and the device they are on.
    pub table: u32,
    pub device: String,
    #[serde(default)]
    pub vips: Vec<VipAnnouncement>,
    /// The last failure to change a route, while it lasts.
    #[serde(default)]
    pub error: Option<String>,
}

/// One VIP: whether this host has its route in the table (so the routing daemon
/// announces it), since when, and why not when it has none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipAnnouncement {
    pub vip: IpAddr,
    pub announcing: bool,
    /// When (Unix ms) the route went in, or was last removed; absent if this VIP has
    /// never been announced by this agent.
    #[serde(default)]
    pub since_unix_ms: Option<u64>,
    /// `announce`, or why not: `no usable backend`, `not serving (VRRP backup)`,
    /// `stopping`.
    pub decision: String,
}

/// `[sync]` as `lbctl status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// This host's sync address and port.
    pub address: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub peers: Vec<SyncPeerStatus>,
    /// Admin entries with a version (the ones shared), and their digest.
    #[serde(default)]
    pub admin_entries: u64,
    #[serde(default)]
    pub admin_digest: String,
    #[serde(default)]
    pub counters: SyncCounters,
}

impl Default for SyncStatus {
    fn default() -> Self {
        Self {
            address: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port: 0,
            peers: Vec::new(),
            admin_entries: 0,
            admin_digest: String::new(),
            counters: SyncCounters::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPeerStatus {
    pub address: IpAddr,
    /// Heard within the last 1.5 s.
    #[serde(default)]
    pub connected: bool,
    /// Wall-clock time it connected (ms since the epoch), while connected.
    #[serde(default)]
    pub connected_since_unix_ms: Option<u64>,
    #[serde(default)]
    pub last_heard_unix_ms: Option<u64>,
    #[serde(default)]
    pub last_heard_ms_ago: Option<u64>,
    /// Its last heartbeat's admin digest equals ours.
    #[serde(default)]
    pub admin_in_step: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncCounters {
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub messages_received: u64,
    pub admin_updates_received: u64,
    /// Flow pins sent (once per peer) and received.
    pub flows_sent: u64,
    pub flows_received: u64,
    pub unpins_sent: u64,
    pub unpins_received: u64,
    /// Persistence entries sent (once per peer) and received.
    pub persistence_sent: u64,
    pub persistence_received: u64,
    /// Dropped messages by reason: `unknown_source`, `bad_tag`, `replayed`, `stale`,
    /// `oversized`, `malformed`.
    pub dropped: BTreeMap<String, u64>,
    pub send_errors: u64,
    pub receive_errors: u64,
}

/// What the flow scanner last saw. Active-flow counts come from the same scan, so
/// `scan_age_ms` says how old they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTableStatus {
    /// Milliseconds since the scan began; absent before the first scan.
    pub scan_age_ms: Option<u64>,
    /// How long that scan took, in milliseconds (the scans take at most a twentieth of a
    /// core, so a dear one makes them further apart); absent before the first scan.
    #[serde(default)]
    pub scan_ms: Option<u64>,
    /// Flows in the connection table (its used slots).
    pub connections: u64,
    /// Flows pinned because their backend is no longer the ring's choice.
    pub pinned: u64,
    /// Flows that should have been pinned but found the pinned table full.
    pub pin_failures: u64,
    /// Pins from sync peers written into the pinned table (since start).
    #[serde(default)]
    pub synced_pins_installed: u64,
    /// NAT flows (each a pair of entries) in the NAT tables.
    #[serde(default)]
    pub nat_flows: u64,
    /// NAT flows collected after their close or idle timeout (since start).
    #[serde(default)]
    pub nat_collected: u64,
    /// Why the last scan failed, if it did.
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// `persistence_timeout_s`; 0: off.
    #[serde(default)]
    pub persistence_timeout_s: u32,
    /// Client addresses whose persistence entry is live (as of the last flow scan).
    #[serde(default)]
    pub persistent_clients: u64,
    pub backends: Vec<BackendStatus>,
}

/// How an operator sees a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Healthy and enabled.
    Up,
    /// Failing its health checks (or its MAC is unknown).
    Down,
    /// Disabled by the operator, no active flows left.
    Disabled,
    /// Disabled by the operator, established flows still running.
    Draining,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Disabled => "disabled",
            BackendState::Draining => "draining",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub service: String,
    pub name: String,
    pub address: String,
    pub state: BackendState,
    /// Why it is down, or the last health check's outcome.
    pub health: String,
    pub enabled: bool,
    pub backup: bool,
    /// Weight in effect (an operator's `lbctl backend weight` wins over the config).
    pub weight: u32,
    pub config_weight: u32,
    /// Whether new flows can land on it now.
    pub in_ring: bool,
    pub active_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

// ---- VRRP, as `lbctl status` shows it -----------------------------------------------------
// The speaker (`crate::vrrp`) fills these in; they are defined here so that the wire
// depends on nothing of the speaker's.

/// A VRRP state as operators see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VrrpState {
    /// Not started, or stopped.
    Init,
    Backup,
    Master,
    /// Effective priority 0: the data path cannot serve; never becomes master.
    Fault,
}

impl VrrpState {
    pub fn as_str(self) -> &'static str {
        match self {
            VrrpState::Init => "init",
            VrrpState::Backup => "backup",
            VrrpState::Master => "master",
            VrrpState::Fault => "fault",
        }
    }

    /// Whether the data path should answer ARP/ND for the VIPs and forward.
    pub fn serves(self) -> bool {
        self == VrrpState::Master
    }
}

impl fmt::Display for VrrpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterStatus {
    pub address: IpAddr,
    pub priority: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionStatus {
    /// Wall-clock time of the transition, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub from: VrrpState,
    pub to: VrrpState,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VrrpCounters {
    /// Advert packets sent (one per destination: the group, or each peer).
    pub adverts_sent: u64,
    /// Adverts that passed every check.
    pub adverts_received: u64,
    /// Dropped adverts by reason: the speaker's drop reasons (`bad_checksum`,
    /// `auth_stale`...), and `from_self`, `unknown_source` (not a configured peer),
    /// `foreign_group` (our router id, another VIP list), `unreadable_ip_header`.
    pub dropped: BTreeMap<String, u64>,
    pub send_errors: u64,
    pub receive_errors: u64,
    /// Gratuitous ARP / unsolicited NA frames sent.
    pub announcements_sent: u64,
    pub announcement_errors: u64,
    /// Failed writes of the data path's serving switch (each is retried).
    #[serde(default)]
    pub serve_switch_errors: u64,
    /// Authentic adverts dropped for their age alone (clock skew, or old captures).
    #[serde(default)]
    pub clock_skew: u64,
    /// State transitions since the speaker started.
    #[serde(default)]
    pub transitions: u64,
}

/// Something an operator should look at; it stays until the condition clears.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VrrpAlarm {
    /// What kind: `clock_skew`.
    pub kind: String,
    /// The peer it is about.
    pub source: IpAddr,
    pub message: String,
    /// When it was last seen, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// What `lbctl status` shows of VRRP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VrrpStatus {
    pub state: VrrpState,
    pub router_id: u8,
    pub interface: String,
    /// Our advert source: the election's address.
    pub address: IpAddr,
    /// "multicast" or "unicast".
    pub mode: String,
    pub authenticated: bool,
    /// Configured priority.
    pub priority: u8,
    /// The priority the data path's health allows (tracking), what we advertise.
    pub effective_priority: u8,
    pub advert_interval_ms: u32,
    /// The master we follow, or ourselves.
    pub master: Option<MasterStatus>,
    pub last_transition: Option<TransitionStatus>,
    pub counters: VrrpCounters,
    #[serde(default)]
    pub alarms: Vec<VrrpAlarm>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(
        "protocol version {got}, this side speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
    )]
    Version { got: u32 },
    #[error("this request needs protocol version {needs}, it came with {got}")]
    TooOld { got: u32, needs: u32 },
}

/// One message as a frame: its JSON and a newline.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing these plain types cannot fail; an empty object would be read as malformed.
    let mut frame = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    frame.push(b'\n');
    frame
}

/// A request frame (without or with its newline), version checked.
pub fn decode_request(frame: &[u8]) -> Result<Request, ProtocolError> {
    if frame.len() > MAX_REQUEST {
        return Err(ProtocolError::TooLarge(MAX_REQUEST));
    }
    // Read the version first, so a newer lbctl gets "version" rather than "malformed".
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let v: Version = serde_json::from_slice(frame)?;
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v.version) {
        return Err(ProtocolError::Version { got: v.version });
    }
    let envelope: Envelope = serde_json::from_slice(frame)?;
    if envelope.request.version() > v.version {
        return Err(ProtocolError::TooOld {
            got: v.version,
            needs: envelope.request.version(),
        });
    }
    Ok(envelope.request)
}

pub fn decode_response(frame: &[u8]) -> Result<Response, ProtocolError> {
    if frame.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(MAX_FRAME));
    }
    Ok(serde_json::from_slice(frame)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Status,
            Request::ListBackends { service: None },
            Request::ListBackends {
                service: Some("web".into()),
            },
            Request::DisableBackend {
                service: "web".into(),
                backend: "b1".into(),
            },
            Request::EnableBackend {
                service: "web".into(),
                backend: "b1".into(),
            },
            Request::SetWeight {
                service: "web".into(),
                backend: "b1".into(),
                weight: 7,
            },
            Request::Reload,
            Request::Trace {
                vip: Some("192.0.2.10".parse().unwrap()),
                count: Some(3),
            },
            Request::Trace {
                vip: None,
                count: None,
            },
        ] {
            let frame = encode(&Envelope {
                version: r.version(),
                request: r.clone(),
            });
            assert_eq!(frame.last(), Some(&b'\n'));
            assert_eq!(decode_request(&frame).unwrap(), r);
        }
    }

    #[test]
    fn wire_format_is_plain_json() {
        let frame = encode(&Envelope {
            version: 1,
            request: Request::DisableBackend {
                service: "s".into(),
                backend: "b".into(),
            },
        });
        assert_eq!(frame, b"{\"version\":1,\"command\":\"disable_backend\",\"service\":\"s\",\"backend\":\"b\"}\n");
    }

    #[test]
    fn bad_requests_are_named() {
        assert!(matches!(
            decode_request(b"{\"version\":1,\"command\":\"explode\"}"),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            decode_request(b"not json"),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            decode_request(b"{\"version\":9,\"command\":\"status\"}"),
            Err(ProtocolError::Version { got: 9 })
        ));
        // A trace is version 2; the same request as version 1 is named as such.
        assert!(matches!(
            decode_request(b"{\"version\":1,\"command\":\"trace\"}"),
            Err(ProtocolError::TooOld { got: 1, needs: 2 })
        ));
        let big = vec![b' '; MAX_REQUEST + 1];
        assert!(matches!(
            decode_request(&big),
            Err(ProtocolError::TooLarge(_))
        ));
    }

    #[test]
    fn responses_round_trip() {
        let r = Response::Error {
            message: "no".into(),
            details: vec!["a".into()],
        };
        assert_eq!(decode_response(&encode(&r)).unwrap(), r);
        let trace = Response::Trace(TraceRecord {
            at_unix_ms: 1,
            protocol: "tcp".into(),
            src: Some("198.51.100.7".parse().unwrap()),
            dst: Some("192.0.2.10".parse().unwrap()),
            sport: Some(40000),
            dport: Some(80),
            verdict: "tx".into(),
            reason: "forwarded".into(),
            service: Some("web".into()),
            backend: Some("b1".into()),
            new_flow: true,
            icmp_error: false,
        });
        let frame = encode(&trace);
        assert!(frame.starts_with(b"{\"result\":\"trace\","), "{frame:?}");
        assert_eq!(decode_response(&frame).unwrap(), trace);
    }

    #[test]
    fn version_1_requests_are_still_served() {
        // What an lbctl of protocol version 1 sends.
        assert_eq!(
            decode_request(b"{\"version\":1,\"command\":\"status\"}").unwrap(),
            Request::Status
        );
        assert_eq!(Request::Status.version(), 1);
    }

    #[test]
    fn vrrp_status_serializes_for_lbctl() {
        let mut counters = VrrpCounters::default();
        counters.dropped.insert("bad_checksum".into(), 2);
        let status = VrrpStatus {
            state: VrrpState::Backup,
            router_id: 51,
            interface: "eth0".into(),
            address: "192.0.2.1".parse().unwrap(),
            mode: "multicast".into(),
            authenticated: false,
            priority: 100,
            effective_priority: 90,
            advert_interval_ms: 100,
            master: Some(MasterStatus {
                address: "192.0.2.2".parse().unwrap(),
                priority: 200,
            }),
            last_transition: Some(TransitionStatus {
                at_unix_ms: 1,
                from: VrrpState::Init,
                to: VrrpState::Backup,
                reason: "started".into(),
            }),
            counters,
            alarms: vec![VrrpAlarm {
                kind: "clock_skew".into(),
                source: "192.0.2.2".parse().unwrap(),
                message: "stale".into(),
                at_unix_ms: 2,
            }],
        };
        let mut json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["state"], "backup");
        assert_eq!(json["master"]["address"], "192.0.2.2");
        assert_eq!(json["counters"]["dropped"]["bad_checksum"], 2);
        assert_eq!(json["alarms"][0]["source"], "192.0.2.2");
        let back: VrrpStatus = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, status);
        // An older agent's status, without the newer fields, still reads.
        json.as_object_mut().unwrap().remove("alarms");
        json["counters"]
            .as_object_mut()
            .unwrap()
            .remove("clock_skew");
        json["counters"]
            .as_object_mut()
            .unwrap()
            .remove("serve_switch_errors");
        let old: VrrpStatus = serde_json::from_value(json).unwrap();
        assert!(old.alarms.is_empty());
    }
}
