//! NAT flows as the agent sees them: the reverse half of a pair, whether a flow still
//! counts as active, when its pair is collected. Plain functions; the flow scanner
//! applies them (`flows.rs`), the data path makes the entries (`lb-ebpf/src/nat.rs`).

use std::time::Duration;

use lb_common::{
    FlowKey, NAT_F_ESTABLISHED, NAT_F_FIN_BACKEND, NAT_F_FIN_CLIENT, NAT_F_RST, NatFlow, NatReply,
    PROTO_TCP,
};

/// After an RST neither side keeps state (no TIME_WAIT): the pair goes after this
/// grace for packets still in flight, or the time-wait if that is shorter.
pub const RST_GRACE: Duration = Duration::from_secs(10);
/// A flow whose client never sent more than a SYN goes after this long (a SYN flood's
/// entries and ports come back soon; LVS keeps SYN_RECV 60 s, Linux retries a SYN for
/// about 63 s, by then on another port of the client anyway).
pub const EMBRYONIC_TIMEOUT: Duration = Duration::from_secs(30);

/// The reverse table's key of a NAT flow: what the backend sends, backend:bport ->
/// VIP:nport.
pub fn reverse_key(client: &FlowKey, flow: &NatFlow) -> FlowKey {
    FlowKey {
        src: flow.baddr,
        dst: client.dst,
        sport_be: flow.bport_be,
        dport_be: flow.nport_be,
        proto: PROTO_TCP,
        family: client.family,
        _pad: [0; 2],
    }
}

/// The reverse table's entry of a NAT flow (`NatReply`) as the agent installs it for a
/// flow a peer sent: the client's key, the flow's backend and service; no next hop
/// towards the client yet (this host's program asks its own FIB), and the refresh of
/// the forward entry's last-seen time due at the first reply.
pub fn reply_entry(client: &FlowKey, flow: &NatFlow) -> NatReply {
    NatReply {
        client: *client,
        backend: flow.backend,
        vip_num: flow.vip_num,
        ..NatReply::default()
    }
}

/// Both sides sent FIN, or one sent RST: the connection is over.
pub fn is_closed(flow: &NatFlow) -> bool {
    flow.flags & NAT_F_RST != 0
        || flow.flags & (NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND)
            == (NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND)
}

/// Counts as a live connection of its backend (status, `disable --wait`).
pub fn is_active(flow: &NatFlow, now_ns: u64, idle: Duration) -> bool {
    !is_closed(flow) && idle_for(flow, now_ns) < idle
}

fn idle_for(flow: &NatFlow, now_ns: u64) -> Duration {
    Duration::from_nanos(now_ns.saturating_sub(flow.last_seen_ns))
}

/// Whether a NAT flow's pair may go, its port with it: closed and quiet for the
/// time-wait (an RST: for `RST_GRACE` at most), never past its SYN and quiet for
/// `EMBRYONIC_TIMEOUT`, or idle for `idle`.
pub fn collect(flow: &NatFlow, now_ns: u64, idle: Duration, time_wait: Duration) -> bool {
    let quiet = idle_for(flow, now_ns);
    if flow.flags & NAT_F_RST != 0 {
        return quiet >= time_wait.min(RST_GRACE);
    }
    if is_closed(flow) {
        return quiet >= time_wait;
    }
    if flow.flags & NAT_F_ESTABLISHED == 0 {
        return quiet >= idle.min(EMBRYONIC_TIMEOUT);
    }
    quiet >= idle
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::FAMILY_V4;

    const S: u64 = 1_000_000_000;

    fn flow(flags: u32, last_seen_s: u64) -> NatFlow {
        NatFlow {
            backend: 3,
            vip_num: 1,
            last_seen_ns: last_seen_s * S,
            flags,
            nport_be: 5000u16.to_be(),
            bport_be: 8080u16.to_be(),
            baddr: [10, 0, 1, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            client_mac: [2, 0, 0, 0, 0, 1],
            ..Default::default()
        }
    }

    #[test]
    fn the_reverse_key_and_entry_are_what_the_backend_sends_and_needs() {
        let client = FlowKey {
            src: [198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [192, 0, 2, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport_be: 40000u16.to_be(),
            dport_be: 443u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let r = reverse_key(&client, &flow(0, 0));
        assert_eq!(&r.src[..4], &[10, 0, 1, 5]);
        assert_eq!(&r.dst[..4], &[192, 0, 2, 20]);
        assert_eq!(u16::from_be(r.sport_be), 8080);
        assert_eq!(u16::from_be(r.dport_be), 5000);
        assert_eq!(r.family, FAMILY_V4);
        // Its entry names the client's key, the flow's backend and service; no next hop
        // and the refresh due, for this host's program to fill.
        let e = reply_entry(&client, &flow(0, 0));
        assert_eq!((e.client, e.backend, e.vip_num), (client, 3, 1));
        assert_eq!(e.to_client, Default::default());
        assert_eq!(e.touched, 0);
    }

    #[test]
    fn pairs_go_after_close_plus_time_wait_or_idle() {
        let idle = Duration::from_secs(900);
        let tw = Duration::from_secs(60);
        let now = 1000 * S;
        // Open: only idleness ends it.
        let open = NAT_F_ESTABLISHED;
        assert!(!collect(&flow(open, 999), now, idle, tw));
        assert!(!collect(&flow(open, 101), now, idle, tw));
        assert!(collect(&flow(open, 100), now, idle, tw));
        // Never past the SYN: the short timeout.
        assert!(!collect(&flow(0, 971), now, idle, tw));
        assert!(collect(&flow(0, 970), now, idle, tw));
        // Half closed (one FIN): still a connection.
        assert!(!collect(&flow(open | NAT_F_FIN_CLIENT, 900), now, idle, tw));
        assert!(!collect(
            &flow(open | NAT_F_FIN_BACKEND, 900),
            now,
            idle,
            tw
        ));
        // Both FINs: the time-wait after the last packet.
        let both = NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND;
        assert!(!collect(&flow(both, 941), now, idle, tw));
        assert!(collect(&flow(both, 940), now, idle, tw));
        // RST: a short grace.
        assert!(!collect(&flow(NAT_F_RST, 991), now, idle, tw));
        assert!(collect(&flow(NAT_F_RST, 990), now, idle, tw));
        assert!(collect(&flow(NAT_F_RST, 999), now, idle, Duration::ZERO));
        // A clock behind the entry's (a packet after the scan began): not idle.
        assert!(!collect(&flow(open, 2000), now, idle, tw));
        assert!(!collect(&flow(0, 2000), now, idle, tw));
    }

    #[test]
    fn only_open_recent_flows_are_active() {
        let idle = Duration::from_secs(900);
        let now = 1000 * S;
        assert!(is_active(&flow(0, 999), now, idle));
        assert!(is_active(&flow(NAT_F_FIN_CLIENT, 999), now, idle));
        assert!(!is_active(
            &flow(NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND, 999),
            now,
            idle
        ));
        assert!(!is_active(&flow(NAT_F_RST, 999), now, idle));
        assert!(!is_active(&flow(0, 100), now, idle));
    }
}
