//! The packet trace behind `lbctl trace`: the program writes one `TraceEvent` per
//! decision to its TRACE ring buffer while `CONFIG_F_TRACE` is set. The agent sets it
//! while at least one client listens (`TraceHub::subscribe` counts them, and the main
//! loop follows the count), reads the ring on a task of its own, and hands each event,
//! with names, to every client's connection task, which filters and sends it.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use arc_swap::ArcSwap;
use aya::maps::{MapData, RingBuf};
use lb_common::{
    FAMILY_V4, FAMILY_V6, NO_BACKEND, PROTO_TCP, TRACE_F_ARP, TRACE_F_ICMP_ERROR, TRACE_F_NEW_FLOW,
    TRACE_FORWARDED, TraceEvent, counters::reason,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{broadcast, watch},
    task::JoinHandle,
};

use crate::protocol::TraceRecord;

/// Events a slow client may fall behind by before it is told it lost some.
const CLIENT_BACKLOG: usize = 4096;

/// Backend ids as operators name them: (service, backend).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceNames {
    pub backends: HashMap<u32, (String, String)>,
}

/// What one client asked to see.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceFilter {
    pub vip: Option<IpAddr>,
}

impl TraceFilter {
    pub fn matches(&self, record: &TraceRecord) -> bool {
        self.vip.is_none_or(|vip| record.dst == Some(vip))
    }
}

fn addr(bytes: &[u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

fn protocol_name(proto: u8, family: u8, flags: u32) -> String {
    if flags & TRACE_F_ARP != 0 {
        return "arp".into();
    }
    match (proto, family) {
        (_, f) if f != FAMILY_V4 && f != FAMILY_V6 => "non-ip".into(),
        (PROTO_TCP, _) => "tcp".into(),
        (1, _) => "icmp".into(),
        (17, _) => "udp".into(),
        (58, _) => "icmpv6".into(),
        (p, _) => format!("ip proto {p}"),
    }
}

/// The XDP action's name.
pub fn verdict_name(verdict: u32) -> String {
    match verdict {
        0 => "aborted".into(),
        1 => "drop".into(),
        2 => "pass".into(),
        3 => "tx".into(),
        4 => "redirect".into(),
        v => format!("action {v}"),
    }
}

/// One event as the client sees it.
pub fn record(event: &TraceEvent, names: &TraceNames, at_unix_ms: u64) -> TraceRecord {
    let flow = &event.flow;
    let port = |p: u16| Some(u16::from_be(p)).filter(|p| *p != 0);
    let reason = if event.reason == TRACE_FORWARDED {
        "forwarded".to_string()
    } else {
        reason::NAMES
            .get(event.reason as usize)
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("reason {}", event.reason))
    };
    let named = (event.backend != NO_BACKEND).then(|| {
        names
            .backends
            .get(&event.backend)
            .cloned()
            .unwrap_or_else(|| (String::new(), format!("#{}", event.backend)))
    });
    let (service, backend) = match named {
        Some((s, b)) => (Some(s).filter(|s| !s.is_empty()), Some(b)),
        None => (None, None),
    };
    TraceRecord {
        at_unix_ms,
        protocol: protocol_name(flow.proto, flow.family, event.flags),
        src: addr(&flow.src, flow.family),
        dst: addr(&flow.dst, flow.family),
        sport: port(flow.sport_be),
        dport: port(flow.dport_be),
        verdict: verdict_name(event.verdict),
        reason,
        service,
        backend,
        new_flow: event.flags & TRACE_F_NEW_FLOW != 0,
        icmp_error: event.flags & TRACE_F_ICMP_ERROR != 0,
    }
}

/// `HH:MM:SS.mmm proto src > dst verdict reason [-> service/backend] [(new flow)]`,
/// the time of day in UTC: how `lbctl trace` prints one event.
pub fn line(r: &TraceRecord) -> String {
    let end = |a: Option<IpAddr>, p: Option<u16>| match (a, p) {
        (Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
        (None, _) => "-".to_string(),
    };
    let day_ms = r.at_unix_ms % 86_400_000;
    let (h, m, s, ms) = (
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000,
    );
    let mut line = format!(
        "{h:02}:{m:02}:{s:02}.{ms:03} {} {} > {} {} {}",
        r.protocol,
        end(r.src, r.sport),
        end(r.dst, r.dport),
        r.verdict,
        r.reason
    );
    match (&r.service, &r.backend) {
        (Some(s), Some(b)) => line.push_str(&format!(" -> {s}/{b}")),
        (None, Some(b)) => line.push_str(&format!(" -> {b}")),
        _ => {}
    }
    if r.new_flow {
        line.push_str(" (new flow)");
    }
    if r.icmp_error {
        line.push_str(" (ICMP error about this flow)");
    }
    line
}

/// An event from the ring buffer's bytes; `None` if too short (never, from our program).
pub fn decode(bytes: &[u8]) -> Option<TraceEvent> {
    if bytes.len() < std::mem::size_of::<TraceEvent>() {
        return None;
    }
    // SAFETY: TraceEvent is plain old data (repr(C), every bit pattern valid), and the
    // length was checked; the ring's bytes need not be aligned for it.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TraceEvent>()) })
}

/// Where trace clients subscribe and the ring reader publishes. Cheap to clone.
#[derive(Clone)]
pub struct TraceHub {
    events: broadcast::Sender<Arc<TraceRecord>>,
    clients: Arc<watch::Sender<usize>>,
    names: Arc<ArcSwap<TraceNames>>,
}

/// One client's stream; the program traces as long as one of these lives.
pub struct Subscription {
    pub events: broadcast::Receiver<Arc<TraceRecord>>,
    clients: Arc<watch::Sender<usize>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.clients.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Default for TraceHub {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceHub {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(CLIENT_BACKLOG);
        let (clients, _) = watch::channel(0);
        Self {
            events,
            clients: Arc::new(clients),
            names: Arc::new(ArcSwap::from_pointee(TraceNames::default())),
        }
    }

    pub fn subscribe(&self) -> Subscription {
        // Receiver first: no event published after the count goes up is missed.
        let events = self.events.subscribe();
        self.clients.send_modify(|n| *n += 1);
        Subscription {
            events,
            clients: self.clients.clone(),
        }
    }

    /// How many clients listen now.
    pub fn clients(&self) -> usize {
        *self.clients.borrow()
    }

    /// Changes of the number of clients, for the loop that sets the program's flag.
    pub fn watch_clients(&self) -> watch::Receiver<usize> {
        self.clients.subscribe()
    }

    pub fn set_names(&self, names: TraceNames) {
        self.names.store(Arc::new(names));
    }

    /// Hands one event from the program to every client.
    pub fn publish(&self, event: &TraceEvent, at_unix_ms: u64) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let record = record(event, &self.names.load(), at_unix_ms);
        let _ = self.events.send(Arc::new(record));
    }

    /// Reads the program's ring buffer on a task of its own, off the main loop, until
    /// the task is aborted.
    pub fn spawn_reader(&self, ring: RingBuf<MapData>) -> std::io::Result<JoinHandle<()>> {
        // SAFETY: the RingBuf owns its map's descriptor, open and the same until the
        // RingBuf (here inside the AsyncFd) is dropped.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        let hub = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                let mut guard = match ring.readable_mut().await {
                    Ok(guard) => guard,
                    Err(e) => {
                        tracing::warn!("trace ring buffer: {e}; the trace stops");
                        return;
                    }
                };
                let now = crate::admin::now_ms();
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(event) = decode(&item) {
                        hub.publish(&event, now);
                    }
                }
                guard.clear_ready();
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::FlowKey;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut b = [0; 16];
        b[..4].copy_from_slice(&a);
        b
    }

    fn names() -> TraceNames {
        let mut n = TraceNames::default();
        n.backends.insert(7, ("web".into(), "b1".into()));
        n
    }

    #[test]
    fn a_forwarded_syn_names_its_backend() {
        let event = TraceEvent {
            flow: FlowKey {
                src: v4([198, 51, 100, 7]),
                dst: v4([192, 0, 2, 10]),
                sport_be: 40000u16.to_be(),
                dport_be: 80u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_V4,
                _pad: [0; 2],
            },
            reason: TRACE_FORWARDED,
            verdict: 3,
            backend: 7,
            flags: TRACE_F_NEW_FLOW,
        };
        let r = record(&event, &names(), 5);
        assert_eq!(r.protocol, "tcp");
        assert_eq!(r.src, Some("198.51.100.7".parse().unwrap()));
        assert_eq!(r.dst, Some("192.0.2.10".parse().unwrap()));
        assert_eq!((r.sport, r.dport), (Some(40000), Some(80)));
        assert_eq!(r.verdict, "tx");
        assert_eq!(r.reason, "forwarded");
        assert_eq!(r.service.as_deref(), Some("web"));
        assert_eq!(r.backend.as_deref(), Some("b1"));
        assert!(r.new_flow && !r.icmp_error);
        assert_eq!(r.at_unix_ms, 5);
    }

    #[test]
    fn lines_say_time_tuple_verdict_reason_and_backend() {
        let mut flow = FlowKey {
            src: v4([198, 51, 100, 7]),
            dst: v4([192, 0, 2, 10]),
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let forwarded = TraceEvent {
            flow,
            reason: TRACE_FORWARDED,
            verdict: 3,
            backend: 7,
            flags: TRACE_F_NEW_FLOW,
        };
        // 1970-01-02 01:02:03.045 UTC.
        let at = 86_400_000 + 3_723_045;
        assert_eq!(
            line(&record(&forwarded, &names(), at)),
            "01:02:03.045 tcp 198.51.100.7:40000 > 192.0.2.10:80 tx forwarded -> web/b1 (new flow)"
        );
        flow.sport_be = 0;
        flow.dport_be = 0;
        let fragment = TraceEvent {
            flow,
            reason: reason::DROP_FRAGMENT,
            verdict: 1,
            backend: NO_BACKEND,
            flags: 0,
        };
        assert_eq!(
            line(&record(&fragment, &names(), 0)),
            "00:00:00.000 tcp 198.51.100.7 > 192.0.2.10 drop drop_fragment"
        );
        let mut v6 = record(&forwarded, &TraceNames::default(), 0);
        v6.src = Some("2001:db8::7".parse().unwrap());
        v6.new_flow = false;
        v6.icmp_error = true;
        assert_eq!(
            line(&v6),
            "00:00:00.000 tcp [2001:db8::7]:40000 > 192.0.2.10:80 tx forwarded -> #7 (ICMP error about this flow)"
        );
    }

    #[test]
    fn a_dropped_fragment_has_no_ports_and_its_reason() {
        let event = TraceEvent {
            flow: FlowKey {
                src: v4([10, 0, 0, 1]),
                dst: v4([192, 0, 2, 10]),
                proto: PROTO_TCP,
                family: FAMILY_V4,
                ..Default::default()
            },
            reason: reason::DROP_FRAGMENT,
            verdict: 1,
            backend: NO_BACKEND,
            flags: 0,
        };
        let r = record(&event, &names(), 0);
        assert_eq!((r.sport, r.dport), (None, None));
        assert_eq!(r.verdict, "drop");
        assert_eq!(r.reason, "drop_fragment");
        assert_eq!((r.service, r.backend), (None, None));
    }

    #[test]
    fn ipv6_arp_unknown_ids_and_reasons_are_shown_as_they_are() {
        let mut flow = FlowKey {
            family: FAMILY_V6,
            proto: 58,
            ..Default::default()
        };
        flow.dst[0] = 0x20;
        flow.dst[1] = 0x01;
        let event = TraceEvent {
            flow,
            reason: 99,
            verdict: 0,
            backend: 12,
            flags: TRACE_F_ICMP_ERROR,
        };
        let r = record(&event, &names(), 0);
        assert_eq!(r.dst, Some("2001::".parse().unwrap()));
        assert_eq!(r.protocol, "icmpv6");
        assert_eq!(r.reason, "reason 99");
        assert_eq!(r.verdict, "aborted");
        assert_eq!(r.backend.as_deref(), Some("#12"));
        assert_eq!(r.service, None);
        assert!(r.icmp_error);
        let arp = TraceEvent {
            flow: FlowKey {
                family: FAMILY_V4,
                ..Default::default()
            },
            reason: reason::ARP_REPLY,
            verdict: 3,
            backend: NO_BACKEND,
            flags: TRACE_F_ARP,
        };
        assert_eq!(record(&arp, &names(), 0).protocol, "arp");
        let none = TraceEvent::default();
        let r = record(&none, &names(), 0);
        assert_eq!((r.protocol.as_str(), r.src), ("non-ip", None));
    }

    #[test]
    fn decode_reads_unaligned_bytes_and_refuses_short_ones() {
        let event = TraceEvent {
            reason: 5,
            verdict: 1,
            backend: NO_BACKEND,
            ..Default::default()
        };
        let size = std::mem::size_of::<TraceEvent>();
        let mut bytes = vec![0u8; size + 1];
        // SAFETY: writing a POD value's bytes into a buffer of its size.
        unsafe {
            std::ptr::write_unaligned(bytes[1..].as_mut_ptr().cast::<TraceEvent>(), event);
        }
        assert_eq!(decode(&bytes[1..]), Some(event));
        assert_eq!(decode(&bytes[1..size]), None);
    }

    #[test]
    fn the_filter_keeps_one_vip() {
        let r = record(&TraceEvent::default(), &names(), 0);
        assert!(TraceFilter::default().matches(&r));
        let vip: IpAddr = "192.0.2.10".parse().unwrap();
        let f = TraceFilter { vip: Some(vip) };
        assert!(!f.matches(&r));
        let mut to_vip = r.clone();
        to_vip.dst = Some(vip);
        assert!(f.matches(&to_vip));
    }

    #[tokio::test]
    async fn clients_are_counted_until_they_go() {
        let hub = TraceHub::new();
        let mut watch = hub.watch_clients();
        assert_eq!(hub.clients(), 0);
        let a = hub.subscribe();
        let mut b = hub.subscribe();
        assert_eq!(hub.clients(), 2);
        assert!(watch.has_changed().unwrap());
        assert_eq!(*watch.borrow_and_update(), 2);
        hub.publish(&TraceEvent::default(), 1);
        assert_eq!(b.events.recv().await.unwrap().at_unix_ms, 1);
        drop(a);
        assert_eq!(hub.clients(), 1);
        drop(b);
        assert_eq!(hub.clients(), 0);
        assert!(watch.has_changed().unwrap());
    }
}
