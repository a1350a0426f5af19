//! The maps' layout, as one value both sides agree on: every map's type, key size, value
//! size, size and flags. The agent pins the maps under a directory named after
//! `VERSION` and checks every pinned map against `MAPS` before it reuses one, so an
//! agent never reads maps another layout wrote.

use crate::{
    BPF_F_MMAPABLE, Backend, Counter, FloodWindow, FlowKey, FlowState, LbConfig, MAX_BACKENDS,
    MAX_RING_SIZE, MAX_VIPS, NatConfig, NatFlow, NatReply, NatScratch, NatTarget, PersistKey,
    PersistState, Serving, TRACE_RING_BYTES, VipAddrKey, VipInfo, VipKey, VipSlot,
    counters::STATS_SLOTS, flowtab::FlowSlot, names,
};

/// Bumped by hand when the meaning of a map changes while its sizes stay (a flag or a
/// field read differently): sizes alone are hashed into `VERSION` anyway.
pub const EPOCH: u32 = 2;

/// `BPF_MAP_TYPE_*` values of the maps used here.
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
pub const BPF_MAP_TYPE_RINGBUF: u32 = 27;

/// Slots of the META array.
pub mod meta {
    /// The layout `VERSION` the maps were made with.
    pub const LAYOUT: u32 = 0;
    /// How the pinned link attached the program: 1 native, 2 generic; 0 not yet.
    pub const XDP_MODE: u32 = 1;
    /// The connection table's hash seed and bucket count (`flowtab::table_word`),
    /// written by the agent that made the table; read by the program on every lookup.
    pub const FLOW_TABLE: u32 = 2;
    pub const SLOTS: u32 = 4;
}

/// One map as the program defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// 0: set by the agent at load time (`[agent] max_flows`, `max_pinned_flows`,
    /// `max_persistent_clients`).
    pub max_entries: u32,
    pub flags: u32,
}

const fn size<T>() -> u32 {
    core::mem::size_of::<T>() as u32
}

const fn map(
    name: &'static str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> MapLayout {
    MapLayout {
        name,
        map_type,
        key_size,
        value_size,
        max_entries,
        flags,
    }
}

/// The map named `name` (`MAPS`).
pub fn by_name(name: &str) -> Option<&'static MapLayout> {
    MAPS.iter().find(|m| m.name == name)
}

/// The program's maps that are neither pinned nor part of the layout: per-CPU soft
/// state a new program may start without (`lease::LeaseCache`), so adding one does not
/// make another `VERSION`.
pub const UNPINNED: [&str; 1] = [names::MAP_LEASE_CACHE];

/// Every other map of the program (`lb-ebpf/src/maps.rs`), pinned.
pub const MAPS: [MapLayout; 21] = [
    map(
        names::MAP_VIPS,
        BPF_MAP_TYPE_HASH,
        size::<VipKey>(),
        size::<VipInfo>(),
        MAX_VIPS,
        0,
    ),
    map(
        names::MAP_VIP_ADDRS,
        BPF_MAP_TYPE_HASH,
        size::<VipAddrKey>(),
        4,
        MAX_VIPS,
        0,
    ),
    map(
        names::MAP_VIP_FILTER,
        BPF_MAP_TYPE_ARRAY,
        4,
        8,
        crate::filter::WORDS,
        0,
    ),
    map(
        names::MAP_VIP_SLOTS,
        BPF_MAP_TYPE_ARRAY,
        4,
        size::<VipSlot>(),
        MAX_VIPS,
        0,
    ),
    map(
        names::MAP_DSR_FILTER,
        BPF_MAP_TYPE_ARRAY,
        4,
        8,
        crate::filter::WORDS,
        0,
    ),
    map(
        names::MAP_RINGS,
        BPF_MAP_TYPE_ARRAY,
        4,
        4,
        MAX_VIPS * MAX_RING_SIZE,
        0,
    ),
    map(
        names::MAP_BACKENDS,
        BPF_MAP_TYPE_ARRAY,
        4,
        size::<Backend>(),
        MAX_BACKENDS,
        0,
    ),
    map(
        names::MAP_FLOWS,
        BPF_MAP_TYPE_ARRAY,
        4,
        size::<FlowSlot>(),
        0,
        BPF_F_MMAPABLE,
    ),
    map(
        names::MAP_PINNED,
        BPF_MAP_TYPE_HASH,
        size::<FlowKey>(),
        size::<FlowState>(),
        0,
        0,
    ),
    map(
        names::MAP_PERSIST,
        BPF_MAP_TYPE_LRU_HASH,
        size::<PersistKey>(),
        size::<PersistState>(),
        0,
        0,
    ),
    map(
        names::MAP_FLOOD_GUARD,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        size::<FloodWindow>(),
        1,
        0,
    ),
    map(
        names::MAP_STATS,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        size::<Counter>(),
        STATS_SLOTS,
        0,
    ),
    map(
        names::MAP_CONFIG,
        BPF_MAP_TYPE_ARRAY,
        4,
        size::<LbConfig>(),
        1,
        0,
    ),
    map(
        names::MAP_SERVING,
        BPF_MAP_TYPE_ARRAY,
        4,
        size::<Serving>(),
        1,
        0,
    ),
    map(names::MAP_META, BPF_MAP_TYPE_ARRAY, 4, 8, meta::SLOTS, 0),
    map(
        names::MAP_TRACE,
        BPF_MAP_TYPE_RINGBUF,
        0,
        0,
        TRACE_RING_BYTES,
        0,
    ),
    map(
        names::MAP_NAT_BACKENDS,
        BPF_MAP_TYPE_ARRAY,
        4,
        size::<NatTarget>(),
        MAX_BACKENDS,
        0,
    ),
    map(
        names::MAP_NAT_FLOWS,
        BPF_MAP_TYPE_HASH,
        size::<FlowKey>(),
        size::<NatFlow>(),
        0,
        0,
    ),
    map(
        names::MAP_NAT_REVERSE,
        BPF_MAP_TYPE_HASH,
        size::<FlowKey>(),
        size::<NatReply>(),
        0,
        0,
    ),
    map(
        names::MAP_NAT_SCRATCH,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        size::<NatScratch>(),
        1,
        0,
    ),
    map(
        names::MAP_NAT_CONFIG,
        BPF_MAP_TYPE_ARRAY,
        4,
        size::<NatConfig>(),
        1,
        0,
    ),
];

const fn fnv(mut h: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    h
}

const fn version() -> u32 {
    let mut h = fnv(0x811c_9dc5, &EPOCH.to_le_bytes());
    let mut i = 0;
    while i < MAPS.len() {
        let m = &MAPS[i];
        h = fnv(h, m.name.as_bytes());
        h = fnv(h, &m.map_type.to_le_bytes());
        h = fnv(h, &m.key_size.to_le_bytes());
        h = fnv(h, &m.value_size.to_le_bytes());
        h = fnv(h, &m.max_entries.to_le_bytes());
        h = fnv(h, &m.flags.to_le_bytes());
        i += 1;
    }
    h
}

/// The layout's version: a hash of `EPOCH` and `MAPS`. Any change of a map's type,
/// key, value, size or flags makes another version.
pub const VERSION: u32 = version();
