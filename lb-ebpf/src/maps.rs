//! Every map of the program, in one place (`lb_common::layout::MAPS` says the same, for
//! the agent's check of pinned maps). The agent fills all but FLOWS, FLOOD_GUARD
//! and STATS. FLOWS, PINNED and PERSIST are sized by the agent at load time; the sizes here are
//! the defaults.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    BPF_F_MMAPABLE, Backend, Counter, FloodWindow, FlowKey, FlowState, LbConfig, MAX_BACKENDS,
    MAX_FLOWS, MAX_NAT_FLOWS, MAX_PERSISTENT, MAX_PINNED_FLOWS, MAX_RING_SIZE, MAX_VIPS, NatConfig,
    NatFlow, NatReply, NatScratch, NatTarget, PersistKey, PersistState, Serving, TRACE_RING_BYTES,
    VipAddrKey, VipInfo, VipKey, VipSlot, counters::STATS_SLOTS, filter, flowtab::FlowSlot, layout,
    lease::LeaseCache,
};

/// (VIP address, port, protocol) -> the VIP's number and ring size.
#[map]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

/// VIP addresses (no port): first filter for IP traffic, and what ARP / ND answers for.
#[map]
pub static VIP_ADDRS: HashMap<VipAddrKey, u32> = HashMap::with_max_entries(MAX_VIPS, 0);

/// The VIP address filter, tested before VIP_ADDRS: one bit per value of an address's
/// low 16 bits (`lb_common::filter`). An array: the verifier inlines its lookup.
#[map]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(filter::WORDS, 0);

/// VIP number -> its VIPS entry, key and value (`lb_common::VipSlot`): what an
/// established DSR flow's packet takes its service from, with no VIPS lookup.
#[map]
pub static VIP_SLOTS: Array<VipSlot> = Array::with_max_entries(MAX_VIPS, 0);

/// The bits of the VIP filter's shape (`lb_common::filter`) for the addresses with a DSR
/// service: their TCP segments, but a SYN, are looked up in FLOWS first.
#[map]
pub static DSR_FILTER: Array<u64> = Array::with_max_entries(filter::WORDS, 0);

/// Maglev lookup tables: VIP number n owns slots [n * MAX_RING_SIZE, n * MAX_RING_SIZE + ring_size).
#[map]
pub static RINGS: Array<u32> = Array::with_max_entries(MAX_VIPS * MAX_RING_SIZE, 0);

/// Backend id -> where to send its frames.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Connection table: keeps an established flow on its backend when the ring changes.
/// Slots in buckets, kept by the program (`flowtab`); described by META's
/// `FLOW_TABLE` word. Its size is `flowtab::slots_for` the agent's `max_flows`.
/// Mappable: the agent's scanner reads it in place.
#[map]
pub static FLOWS: Array<FlowSlot> = Array::with_max_entries(MAX_FLOWS, BPF_F_MMAPABLE);

/// Flows the agent pinned to their backend (not LRU: nothing evicts them but the
/// agent). Consulted only when FLOWS misses for a non-SYN packet.
#[map]
pub static PINNED: HashMap<FlowKey, FlowState> = HashMap::with_max_entries(MAX_PINNED_FLOWS, 0);

/// Client-address persistence (`persistence_timeout_s`): (service, client address) ->
/// the backend its last connection took. LRU with one list shared by all CPUs (a
/// client's connections arrive on any CPU): an evicted entry costs its client only the
/// stickiness, never a connection. Sized by the agent (`[agent] max_persistent_clients`).
#[map]
pub static PERSIST: LruHashMap<PersistKey, PersistState> =
    LruHashMap::with_max_entries(MAX_PERSISTENT, 0);

/// The flood guard's one-second window, per CPU.
#[map]
pub static FLOOD_GUARD: PerCpuArray<FloodWindow> = PerCpuArray::with_max_entries(1, 0);

/// All counters: per-VIP slots, per-backend slots, then global reasons (lb_common::counters).
#[map]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

/// Host settings from the agent: the interface MAC and what the program may do.
#[map]
pub static CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);

/// Whether this host serves the VIPs (VRRP master or standalone); one writer, see
/// `lb_common::Serving`.
#[map]
pub static SERVING: Array<Serving> = Array::with_max_entries(1, 0);

/// Each CPU's last reading of the serving lease (`lb_common::lease`). Neither pinned nor
/// in the layout: a new program starts with an empty one.
#[map]
pub static LEASE_CACHE: PerCpuArray<LeaseCache> = PerCpuArray::with_max_entries(1, 0);

/// The agent's record of the maps' layout version and of how the pinned link attached
/// the program (never read here), and the connection table's description, read by
/// every lookup of it (`lb_common::layout::meta`).
#[map]
pub static META: Array<u64> = Array::with_max_entries(layout::meta::SLOTS, 0);

/// The packet trace: one `lb_common::TraceEvent` per decision while `CONFIG_F_TRACE`
/// is set (`trace.rs`); the agent reads it for `lbctl trace`.
#[map]
pub static TRACE: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);

/// NAT services' backends by backend id: address and port to translate to.
#[map]
pub static NAT_BACKENDS: Array<NatTarget> = Array::with_max_entries(MAX_BACKENDS, 0);

/// NAT flows by the client's key (see `nat.rs`). Not LRU: the agent removes a flow's
/// two entries together, nothing else does.
#[map]
pub static NAT_FLOWS: HashMap<FlowKey, NatFlow> = HashMap::with_max_entries(MAX_NAT_FLOWS, 0);

/// NAT flows by the backend's key (backend:bport -> VIP:nport) -> what a reply needs
/// (`NatReply`: the client's key first).
#[map]
pub static NAT_REVERSE: HashMap<FlowKey, NatReply> = HashMap::with_max_entries(MAX_NAT_FLOWS, 0);

/// The NAT code's scratch space, per CPU: off the stack, which three calls deep
/// (pipeline, NAT, next hop) would not hold it.
#[map]
pub static NAT_SCRATCH: PerCpuArray<NatScratch> = PerCpuArray::with_max_entries(1, 0);

/// NAT settings from the agent: source port range, FIB lookups.
#[map]
pub static NAT_CONFIG: Array<NatConfig> = Array::with_max_entries(1, 0);

/// This CPU's scratch space (`NAT_SCRATCH`): values the 512-byte BPF stack cannot hold
/// beside the deepest call chain (NAT), for NAT, persistence and a new flow's entry.
#[inline(always)]
pub fn scratch() -> Result<&'static mut NatScratch, u32> {
    let s = NAT_SCRATCH
        .get_ptr_mut(0)
        .ok_or(lb_common::counters::reason::ABORT_INTERNAL)?;
    // SAFETY: this CPU's own entry; XDP runs with preemption off on a CPU.
    Ok(unsafe { &mut *s })
}
