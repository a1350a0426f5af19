//! Types shared by the XDP program (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding, so both sides agree
//! byte for byte; sizes are asserted at compile time. No `bool`, `Option` or enums
//! cross the boundary: flags are integers and "none" is a sentinel.
#![no_std]

pub mod counters;
pub mod filter;
pub mod flowtab;
pub mod hash;
pub mod layout;
pub mod lease;

/// Address family tags stored in keys (`AF_INET`, `AF_INET6` values).
pub const FAMILY_V4: u8 = 2;
pub const FAMILY_V6: u8 = 10;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;

/// How many VIPs (address, port, protocol) one agent can serve.
pub const MAX_VIPS: u32 = 64;
/// Backend ids index the backend array; ids are per (service, backend).
pub const MAX_BACKENDS: u32 = 4096;
/// Largest Maglev lookup table; each VIP owns a window of this many ring slots.
pub const MAX_RING_SIZE: u32 = 65537;
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default connection-table capacity (`flowtab`: in each bucket, the longest idle flow
/// goes first);
/// the agent sets the real size at load time (`[agent] max_flows`).
pub const MAX_FLOWS: u32 = 1 << 18;
/// Default capacity of the pinned-flow table (`[agent] max_pinned_flows`).
pub const MAX_PINNED_FLOWS: u32 = 1 << 16;
/// Default capacity of the persistence table (`[agent] max_persistent_clients`); LRU:
/// an evicted entry only costs its client the stickiness, never a connection.
pub const MAX_PERSISTENT: u32 = 1 << 16;
/// `BPF_F_MMAPABLE`: an array the agent can map into its memory (the connection table,
/// which its scanner then reads in place).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Ring slot value meaning "no backend": traffic for such a slot is dropped and counted.
pub const NO_BACKEND: u32 = u32::MAX;
/// Default capacity of the NAT flow table (`[agent] max_nat_flows`); the reverse table
/// has the same size, one entry per flow.
pub const MAX_NAT_FLOWS: u32 = 1 << 17;

/// Key of the VIP map: one virtual service.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    /// IPv4 in the first 4 bytes (rest zero) or the 16 IPv6 bytes, network order.
    pub addr: [u8; 16],
    /// Destination port, network byte order.
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}

/// Value of the VIP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    /// Index of this VIP: its ring window and its counter slot.
    pub vip_num: u32,
    /// Number of ring slots in use (a prime no larger than `MAX_RING_SIZE`).
    pub ring_size: u32,
    pub flags: u32,
    /// `persistence_timeout_s` of the service: a client address keeps its backend for
    /// new connections until this long after its last one. 0: off.
    pub persistence_s: u32,
}

/// VIP flag: the service forwards in full NAT (see `NatFlow`), not DSR.
pub const VIP_F_NAT: u32 = 1;

/// Value of the VIP slot array, indexed by VIP number: the VIPS entry of that number,
/// key and value. An established DSR flow's connection-table entry names its VIP's
/// number; the data path takes the VIP from this slot, with no VIPS lookup, when the
/// slot's key is the packet's (VIP, port). The agent clears a slot before it writes or
/// removes the VIPS entry and writes the slot after, so a slot never differs from
/// VIPS, even after a write refused half-way; a cleared slot (all zero) matches no
/// packet, whose segments then take the VIPS lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipSlot {
    pub key: VipKey,
    pub info: VipInfo,
}

/// Key of the map of VIP addresses the LB answers ARP / neighbour solicitations for.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipAddrKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Value of the backend array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// The backend's MAC; all zero while unresolved (the program then drops and counts).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    pub flags: u32,
}

/// Backend flag: the backend is usable for forwarding.
pub const BACKEND_F_VALID: u32 = 1;
/// Backend flag: the backend takes new connections (it is a member of its service's
/// ring). A persistence entry sends a client's new connection only to such a backend:
/// a drained, disabled or down one gets none.
pub const BACKEND_F_NEW_FLOWS: u32 = 2;

/// Value of the NAT_BACKENDS array (by backend id): where a NAT service's backend listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatTarget {
    /// IPv4 in the first 4 bytes (rest zero) or the 16 IPv6 bytes, network order.
    pub addr: [u8; 16],
    pub port_be: u16,
    /// 0: no target (not a NAT backend).
    pub family: u8,
    pub _pad: u8,
}

/// Value of the NAT flow table, keyed by the client's `FlowKey` (client -> VIP:port).
/// Its twin in the reverse table is keyed by the backend's tuple (backend:bport ->
/// VIP:nport) and holds what a reply needs (`NatReply`); both are created and removed
/// together.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatFlow {
    pub backend: u32,
    pub vip_num: u32,
    /// The flow clock of the flow's last packet, either direction, refreshed once per
    /// `FLOW_TOUCH_JIFFIES` while packets come (`touched`).
    pub last_seen_ns: u64,
    /// `NAT_F_*`: what the TCP state machine has seen.
    pub flags: u32,
    /// The LB's source port towards the backend, network order.
    pub nport_be: u16,
    /// The backend's port, network order.
    pub bport_be: u16,
    /// The backend's address (as `NatTarget::addr`), fixed for the flow's life.
    pub baddr: [u8; 16],
    /// The FIB's next hop towards the backend, as this host's program last asked for
    /// it: the client's packets skip `bpf_fib_lookup` while it is younger than
    /// `NAT_HOP_TTL_JIFFIES` (the replies' is `NatReply::to_client`). Never sent to peers
    /// (their MACs and interfaces are their own); zero in an entry a peer's sync
    /// installed.
    pub to_backend: NextHop,
    /// Where the client's frames came from (the client or its router): the reply's
    /// next hop when the FIB has no neighbour for the client.
    pub client_mac: [u8; 6],
    /// The low 16 bits of the jiffies when the data path last refreshed
    /// `last_seen_ns` (as `FlowState::touched_jiffies`): a packet less than
    /// `FLOW_TOUCH_JIFFIES` after reads no clock. 0 from the agent (due).
    pub touched: u16,
}

/// Value of the NAT reverse table, keyed by the backend's tuple (backend:bport ->
/// VIP:nport): all a backend's segment needs to go back to the client, so that most
/// replies ask one hash map, not two. The forward entry (`NatFlow`, under `client`)
/// is asked too only for a FIN or an RST (the flow's TCP state), once per
/// `FLOW_TOUCH_JIFFIES` (its last-seen time, `touched`), and for the client's MAC when
/// the FIB has no neighbour for the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatReply {
    /// The flow's key in NAT_FLOWS: client -> VIP:port, the reply's translation read
    /// backwards.
    pub client: FlowKey,
    /// As the forward entry's (`NatFlow::backend`, `vip_num`): the reply's counters.
    pub backend: u32,
    pub vip_num: u32,
    /// The FIB's next hop towards the client, as `NatFlow::to_backend` is towards the
    /// backend. Zero from the agent.
    pub to_client: NextHop,
    /// The low 16 bits of the jiffies when a reply last refreshed the forward entry's
    /// last-seen time (`NatFlow::touched`); 0 from the agent (due).
    pub touched: u16,
    pub _pad: [u8; 6],
}

/// A next hop as `bpf_fib_lookup` gave it (`NatFlow::to_backend`,
/// `NatReply::to_client`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The interface to send on: the one the packet came in on means `XDP_TX`.
    pub ifindex: u32,
    /// The jiffies of the lookup (`bpf_jiffies64`, no clock read); 0: nothing cached.
    pub at_jiffies: u64,
}

/// How long a NAT flow's cached next hop is used before the FIB is asked again, in
/// jiffies (0.1 to 1 s by HZ, as `FLOW_TOUCH_JIFFIES`): a route or neighbour change
/// reaches established NAT flows within `NAT_HOP_TTL_MAX_NS`.
pub const NAT_HOP_TTL_JIFFIES: u64 = 100;

/// `NAT_HOP_TTL_JIFFIES` at the lowest HZ (`MIN_HZ`).
pub const NAT_HOP_TTL_MAX_NS: u64 = jiffies_max_ns(NAT_HOP_TTL_JIFFIES);

/// The lowest timer frequency (CONFIG_HZ) Linux offers on x86 and arm64: the longest a
/// jiffy lasts is 1 / `MIN_HZ` s.
pub const MIN_HZ: u64 = 100;

/// How long `jiffies` jiffies last at most (at `MIN_HZ`), in ns.
pub const fn jiffies_max_ns(jiffies: u64) -> u64 {
    jiffies * 1_000_000_000 / MIN_HZ
}

/// NAT flow flags: a FIN from the client, a FIN from the backend, an RST either way.
pub const NAT_F_FIN_CLIENT: u32 = 1;
pub const NAT_F_FIN_BACKEND: u32 = 2;
pub const NAT_F_RST: u32 = 4;
/// Installed from a peer's sync, not seen here yet: not sent back to peers.
pub const NAT_F_SYNCED: u32 = 8;
/// The client sent more than a SYN: the handshake went through. A flow without it is
/// collected after a short timeout (a SYN flood's entries do not sit out the idle one).
pub const NAT_F_ESTABLISHED: u32 = 16;
/// Addresses (as `NatTarget::addr`) and ports a translated packet leaves with.
/// 4-aligned, so that the program reads its addresses as words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatTuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The NAT code's per-CPU scratch space (NAT_SCRATCH): what would not fit on the BPF
/// stack three calls deep.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatScratch {
    /// `struct bpf_fib_lookup`, as bytes.
    pub fib: [u64; 8],
    /// The packet's new tuple.
    pub new: NatTuple,
    /// ICMP: the quoted packet's new tuple.
    pub inner: NatTuple,
    /// A new flow's reverse key, reverse entry and forward entry, while they are made.
    pub rev: FlowKey,
    pub reply: NatReply,
    pub entry: NatFlow,
    /// A new flow's persistence key and entry (`persistence_timeout_s`), while the
    /// backend is chosen: off the stack, which the NAT path's calls share.
    pub persist_key: PersistKey,
    pub persist_state: PersistState,
    /// An ICMP error's quoted service, while it is looked up.
    pub vip_key: VipKey,
    /// A new DSR flow's connection-table entry, while it is recorded.
    pub flow_state: FlowState,
    /// A segment's key while the connection table is asked before its service.
    pub early_flow: FlowKey,
}

/// The single entry of the NAT_CONFIG array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatConfig {
    /// Source ports towards backends: `port_min..=port_max` (0, 0: 1024..=65535).
    pub port_min: u16,
    pub port_max: u16,
    /// `NAT_CFG_F_*`.
    pub flags: u32,
}

/// NAT config flag: ask the kernel's FIB (`bpf_fib_lookup`) for the next hop. Without
/// it (the packet tests), only the backend's resolved MAC and the client's recorded MAC
/// are used.
pub const NAT_CFG_F_FIB: u32 = 1;
pub const NAT_DEFAULT_PORT_MIN: u16 = 1024;
pub const NAT_DEFAULT_PORT_MAX: u16 = 65535;
/// Candidate ports tried for one new flow before the SYN is dropped as exhausted.
pub const NAT_PORT_PROBES: u32 = 16;

/// Key of the connection table: the 5-tuple as the client sends it.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    pub backend: u32,
    pub vip_num: u32,
    /// The flow clock (CLOCK_MONOTONIC_COARSE) of the flow's last packet, refreshed
    /// once per `FLOW_TOUCH_JIFFIES` while packets come.
    pub last_seen_ns: u64,
    pub flags: u32,
    /// The low 32 bits of the kernel's jiffies when the data path last refreshed
    /// `last_seen_ns` (`bpf_jiffies64`, which the verifier inlines: no clock read). A
    /// segment whose entry was refreshed less than `FLOW_TOUCH_JIFFIES` ago reads no
    /// clock and writes nothing. The agent writes 0 (`FlowStore::pin`): the next packet
    /// refreshes the time.
    pub touched_jiffies: u32,
}

impl FlowState {
    /// The entry as the agent writes it: with no refresh stamp (`touched_jiffies` 0),
    /// so the flow's next packet refreshes its time.
    pub fn unstamped(self) -> Self {
        FlowState {
            touched_jiffies: 0,
            ..self
        }
    }
}

/// How often, at most, the data path refreshes a flow's `last_seen_ns`, in jiffies:
/// 1 s at HZ=100, 0.4 s at HZ=250, 0.1 s at HZ=1000 (at most `FLOW_TOUCH_MAX_NS`). An
/// active flow's time is never more than that (plus a tick) behind.
pub const FLOW_TOUCH_JIFFIES: u32 = 100;

/// Flow flag: the client sent FIN or RST. In DSR only the client's half of a flow passes
/// the LB, so this is what "closed" can mean here; such a flow no longer counts as active.
pub const FLOW_F_CLOSING: u32 = 1;

/// Key of the persistence table: one client address of one service (VIP, port, proto).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PersistKey {
    /// The client's address, as in `FlowKey::src`.
    pub client: [u8; 16],
    /// The VIP, as in `VipKey::addr`.
    pub vip: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}

impl PersistKey {
    /// The persistence key of a flow's client and service.
    #[inline(always)]
    pub fn of_flow(flow: &FlowKey) -> Self {
        Self {
            client: flow.src,
            vip: flow.dst,
            port_be: flow.dport_be,
            proto: flow.proto,
            family: flow.family,
        }
    }
}

/// Value of the persistence table: the backend a client address keeps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PersistState {
    pub backend: u32,
    pub vip_num: u32,
    /// The flow clock of the client's last new connection (or, at most
    /// `PERSIST_LAG_NS` late, of its last packet).
    pub last_seen_ns: u64,
}

/// How far the data path's clock for flow, NAT and persistence times may lag
/// CLOCK_MONOTONIC (the agent's): it reads CLOCK_MONOTONIC_COARSE
/// (`bpf_ktime_get_coarse_ns`), updated once per timer tick (4 ms at HZ=250, 10 ms at
/// HZ=100). Those times are judged in seconds.
pub const COARSE_CLOCK_LAG_NS: u64 = 20_000_000;

/// A persistence entry's last_seen_ns is rewritten by established packets at most this
/// often (a new connection always rewrites it).
pub const PERSIST_TOUCH_NS: u64 = 1_000_000_000;

/// `FLOW_TOUCH_JIFFIES` at the lowest HZ (`MIN_HZ`): how long, at most, a DSR flow's
/// packets go without refreshing its entry, and so its client's persistence entry.
pub const FLOW_TOUCH_MAX_NS: u64 = jiffies_max_ns(FLOW_TOUCH_JIFFIES as u64);

/// How far a persistence entry's time may lag its client's last packet: a DSR flow asks
/// for a refresh once per `FLOW_TOUCH_JIFFIES`, which writes once per `PERSIST_TOUCH_NS`.
pub const PERSIST_LAG_NS: u64 = PERSIST_TOUCH_NS + FLOW_TOUCH_MAX_NS;

/// Whether a persistence entry decides a new connection of its client at `now_ns`: it is
/// within the service's timeout and its backend still takes new connections
/// (`backend_flags`: that backend's `Backend::flags`, 0 if it has none). Else the ring
/// decides and its choice replaces the entry.
#[inline(always)]
pub fn persist_applies(
    state: &PersistState,
    timeout_s: u32,
    backend_flags: u32,
    now_ns: u64,
) -> bool {
    timeout_s != 0
        && now_ns.saturating_sub(state.last_seen_ns) <= timeout_s as u64 * 1_000_000_000
        && backend_flags & (BACKEND_F_VALID | BACKEND_F_NEW_FLOWS)
            == BACKEND_F_VALID | BACKEND_F_NEW_FLOWS
}

/// The single entry of the config array: what the agent tells the program about the host.
/// Written by the agent's main loop only (at start and on reload).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbConfig {
    /// MAC of the interface the program is attached to (source MAC of forwarded frames).
    pub mac: [u8; 6],
    /// `CONFIG_F_*` flags.
    pub flags: u16,
    /// Flood guard: new flows one CPU records in the connection table per second; above
    /// it, new flows still take the ring but are not recorded. 0: no limit.
    pub new_flows_per_cpu_s: u32,
}

/// Config flag: send every decision about VIP traffic to the TRACE ring buffer. Set by
/// the agent while at least one `lbctl trace` is connected; the program reads it from
/// the config entry it looks up anyway, so tracing costs one test while off.
pub const CONFIG_F_TRACE: u16 = 1;

/// Byte size of the TRACE ring buffer (a power-of-2 multiple of the page size):
/// about 4,600 events.
pub const TRACE_RING_BYTES: u32 = 256 * 1024;

/// `TraceEvent::reason` of a forwarded packet (the others are `counters::reason`).
pub const TRACE_FORWARDED: u32 = u32::MAX;
/// Trace flag: the packet took the ring (a SYN, or a flow no table knew).
pub const TRACE_F_NEW_FLOW: u32 = 1;
/// Trace flag: an ICMP error about a flow; `flow` is the flow it quotes.
pub const TRACE_F_ICMP_ERROR: u32 = 2;
/// Trace flag: an ARP request (the addresses are its sender's and target's IPv4).
pub const TRACE_F_ARP: u32 = 4;

/// One decision of the program, as it writes it to the TRACE ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceEvent {
    /// The packet's 5-tuple as far as it was read: ports are 0 when unknown (a
    /// fragment, not TCP), addresses and family 0 when not IP.
    pub flow: FlowKey,
    /// Why it ended (`counters::reason`), or `TRACE_FORWARDED`.
    pub reason: u32,
    /// The XDP action returned.
    pub verdict: u32,
    /// The backend id it went to, or `NO_BACKEND`.
    pub backend: u32,
    /// `TRACE_F_*`.
    pub flags: u32,
}

/// The flood guard's window, one per CPU (a per-CPU array of one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FloodWindow {
    /// `bpf_ktime_get_ns()` when the current one-second window began.
    pub start_ns: u64,
    /// New flows this CPU recorded in the connection table in the window.
    pub recorded: u32,
    pub _pad: u32,
}

/// The single entry of the serving array: whether this host answers for the VIPs.
/// Written by one writer only: the VRRP speaker's thread, or a standalone agent at start.
/// Kept apart from `LbConfig` so the two writers never overwrite each other's fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Serving {
    pub flags: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) after which `flags` no longer count: the
    /// program then neither answers nor forwards for the VIPs. A VRRP master renews it
    /// with every advert, so a killed master stops serving by itself although its link
    /// and maps outlive it. 0: no lease (a standalone host serves until told otherwise).
    pub lease_until_ns: u64,
}

impl Serving {
    /// The flags in force at `now_ns`: none once the lease has run out.
    #[inline(always)]
    pub fn flags_at(&self, now_ns: u64) -> u32 {
        self.flags_under(self.lease_until_ns, now_ns)
    }

    /// The flags in force at `now_ns` under `lease_until_ns` (0: no lease), a value of
    /// `lease_until_ns` read once (`flags_cached`).
    #[inline(always)]
    pub(crate) fn flags_under(&self, lease_until_ns: u64, now_ns: u64) -> u32 {
        if lease_until_ns != 0 && now_ns > lease_until_ns {
            0
        } else {
            self.flags
        }
    }
}

/// Serving flag: answer ARP / neighbour solicitations for VIP addresses.
pub const SERVE_F_ANSWER_NEIGH: u32 = 1;
/// Serving flag: forward VIP traffic.
pub const SERVE_F_FORWARD: u32 = 2;
/// Both: what a master (or a standalone host) does.
pub const SERVE_F_ALL: u32 = SERVE_F_ANSWER_NEIGH | SERVE_F_FORWARD;

/// One counter slot; all counters live in one per-CPU array of these.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl Counter {
    pub fn add(&mut self, other: &Counter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
    }
}

/// Names of the maps and programs in the object, used by both sides.
pub mod names {
    pub const PROG_LB: &str = "lb_xdp";
    pub const PROG_PASS: &str = "xdp_pass";
    /// The lab bench's null forwarder (`lb-ebpf/src/null_fwd.rs`); the agent never loads it.
    pub const PROG_NULL_FWD: &str = "null_fwd";
    pub const GLOBAL_NULL_FWD_DST: &str = "NULL_FWD_DST";
    pub const GLOBAL_NULL_FWD_SRC: &str = "NULL_FWD_SRC";
    pub const GLOBAL_NULL_FWD_CLIENT: &str = "NULL_FWD_CLIENT";
    pub const MAP_VIPS: &str = "VIPS";
    pub const MAP_VIP_ADDRS: &str = "VIP_ADDRS";
    pub const MAP_VIP_FILTER: &str = "VIP_FILTER";
    pub const MAP_VIP_SLOTS: &str = "VIP_SLOTS";
    pub const MAP_DSR_FILTER: &str = "DSR_FILTER";
    pub const MAP_RINGS: &str = "RINGS";
    pub const MAP_BACKENDS: &str = "BACKENDS";
    pub const MAP_FLOWS: &str = "FLOWS";
    pub const MAP_PINNED: &str = "PINNED";
    pub const MAP_PERSIST: &str = "PERSIST";
    pub const MAP_FLOOD_GUARD: &str = "FLOOD_GUARD";
    pub const MAP_STATS: &str = "STATS";
    pub const MAP_CONFIG: &str = "CONFIG";
    pub const MAP_SERVING: &str = "SERVING";
    pub const MAP_META: &str = "META";
    pub const MAP_TRACE: &str = "TRACE";
    pub const MAP_NAT_BACKENDS: &str = "NAT_BACKENDS";
    pub const MAP_NAT_FLOWS: &str = "NAT_FLOWS";
    pub const MAP_NAT_REVERSE: &str = "NAT_REVERSE";
    pub const MAP_NAT_CONFIG: &str = "NAT_CONFIG";
    pub const MAP_NAT_SCRATCH: &str = "NAT_SCRATCH";
    /// Not pinned, in no layout (`lease::LeaseCache`).
    pub const MAP_LEASE_CACHE: &str = "LEASE_CACHE";
}

const _: () = {
    assert!(core::mem::size_of::<VipKey>() == 20);
    assert!(core::mem::size_of::<VipInfo>() == 16);
    assert!(core::mem::size_of::<VipSlot>() == 36);
    assert!(core::mem::size_of::<VipAddrKey>() == 20);
    assert!(core::mem::size_of::<Backend>() == 12);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<FlowState>() == 24);
    assert!(core::mem::size_of::<PersistKey>() == 36);
    assert!(core::mem::size_of::<PersistState>() == 16);
    assert!(core::mem::size_of::<LbConfig>() == 12);
    assert!(core::mem::size_of::<Serving>() == 16);
    assert!(core::mem::size_of::<FloodWindow>() == 16);
    assert!(core::mem::size_of::<lease::LeaseCache>() == 24);
    assert!(core::mem::size_of::<Counter>() == 24);
    assert!(core::mem::size_of::<TraceEvent>() == 56);
    assert!(core::mem::size_of::<NatTarget>() == 20);
    assert!(core::mem::size_of::<NextHop>() == 24);
    assert!(core::mem::size_of::<NatFlow>() == 72);
    assert!(core::mem::size_of::<NatReply>() == 80);
    assert!(core::mem::size_of::<NatConfig>() == 8);
    assert!(core::mem::size_of::<NatTuple>() == 40);
    assert!(core::mem::size_of::<NatScratch>() == 480);
    // The ring array is MAX_VIPS windows of MAX_RING_SIZE slots.
    assert!((MAX_VIPS as u64) * (MAX_RING_SIZE as u64) < u32::MAX as u64);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all these are repr(C), Copy, with every padding byte an explicit field.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for VipSlot {}
    unsafe impl aya::Pod for VipAddrKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for crate::flowtab::FlowSlot {}
    unsafe impl aya::Pod for PersistKey {}
    unsafe impl aya::Pod for PersistState {}
    unsafe impl aya::Pod for LbConfig {}
    unsafe impl aya::Pod for Serving {}
    unsafe impl aya::Pod for FloodWindow {}
    unsafe impl aya::Pod for crate::lease::LeaseCache {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for TraceEvent {}
    unsafe impl aya::Pod for NatTarget {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for NatFlow {}
    unsafe impl aya::Pod for NatReply {}
    unsafe impl aya::Pod for NatConfig {}
}
