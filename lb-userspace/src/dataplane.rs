//! The one narrow interface between the control plane and the kernel: the maps of the
//! XDP program. `XdpDataPlane` is the real one; `FakeDataPlane` records writes for tests.

use std::collections::HashMap as StdHashMap;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode},
};
use lb_common::{
    Backend, Counter, LbConfig, MAX_RING_SIZE, SERVE_F_ALL, Serving, VipAddrKey, VipInfo, VipKey,
    names,
};

/// The XDP object built from `lb-ebpf`, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: ProgramError,
    },
    #[error("attaching to {interface} in {mode} mode: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        source: ProgramError,
    },
}

type Result<T> = std::result::Result<T, DataPlaneError>;

/// What the control plane needs from the data path, and nothing more.
pub trait DataPlane {
    fn set_config(&mut self, cfg: &LbConfig) -> Result<()>;
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()>;
    fn remove_vip(&mut self, key: &VipKey) -> Result<()>;
    fn set_vip_addr(&mut self, key: &VipAddrKey) -> Result<()>;
    fn remove_vip_addr(&mut self, key: &VipAddrKey) -> Result<()>;
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    /// Writes `(slot, backend id)` pairs into the ring window of `vip_num`.
    fn set_ring_slots(&mut self, vip_num: u32, slots: &[(u32, u32)]) -> Result<()>;
    /// One counter slot, summed over CPUs.
    fn counter(&self, slot: u32) -> Result<Counter>;
    /// Flows per backend id that are still active: no FIN or RST from the client, and a
    /// packet within the last `idle` (walks the connection table).
    fn active_flows(&self, idle: std::time::Duration) -> Result<StdHashMap<u32, u64>>;
}

/// The one switch that says whether this host serves the VIPs (answers ARP/ND for them
/// and forwards their traffic). It owns its own handle on the SERVING map, so the VRRP
/// speaker's thread flips it without going through the agent's loop.
pub trait ServeSwitch: Send {
    fn set_serving(&mut self, on: bool) -> Result<()>;
}

/// The real switch: the program's SERVING map.
pub struct ServingMap(Array<MapData, Serving>);

impl ServeSwitch for ServingMap {
    fn set_serving(&mut self, on: bool) -> Result<()> {
        let value = Serving {
            flags: if on { SERVE_F_ALL } else { 0 },
            _pad: 0,
        };
        self.0.set(0, value, 0).map_err(map_err(names::MAP_SERVING))
    }
}

/// A switch for tests: shares its state with whoever holds a clone of the flag.
#[derive(Clone, Debug, Default)]
pub struct FakeServeSwitch(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl ServeSwitch for FakeServeSwitch {
    fn set_serving(&mut self, on: bool) -> Result<()> {
        self.0.store(on, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The two flow tables of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowTable {
    /// FLOWS: the LRU connection table every flow enters on its first packet.
    Connections,
    /// PINNED: flows whose backend is no longer the ring's choice, copied here by the
    /// agent so that no eviction from the connection table can move them; the program
    /// consults it when the connection table misses.
    Pinned,
}

/// The flow tables, read and written off the agent's main loop: whoever holds this has
/// its own handles on the maps (a scanner thread, say).
pub trait FlowStore: Send {
    /// A copy of every entry of `table`, read in batches (BPF_MAP_LOOKUP_BATCH). Entries
    /// that come and go during the read may or may not be in it.
    fn read(&mut self, table: FlowTable)
    -> Result<Vec<(lb_common::FlowKey, lb_common::FlowState)>>;
    /// Writes flows into the pinned table (an existing entry is overwritten). Returns
    /// how many did not fit because the table is full.
    fn pin(&mut self, flows: &[(lb_common::FlowKey, lb_common::FlowState)]) -> Result<usize>;
    /// Removes flows from the pinned table; absent ones are ignored.
    fn unpin(&mut self, keys: &[lb_common::FlowKey]) -> Result<()>;
}

/// Flow tables in memory, for tests: clones share the tables.
#[derive(Clone, Debug, Default)]
pub struct FakeFlowStore {
    pub connections:
        std::sync::Arc<std::sync::Mutex<StdHashMap<lb_common::FlowKey, lb_common::FlowState>>>,
    pub pinned:
        std::sync::Arc<std::sync::Mutex<StdHashMap<lb_common::FlowKey, lb_common::FlowState>>>,
    /// Capacity of the pinned table.
    pub max_pinned: usize,
}

impl FlowStore for FakeFlowStore {
    fn read(
        &mut self,
        table: FlowTable,
    ) -> Result<Vec<(lb_common::FlowKey, lb_common::FlowState)>> {
        let map = match table {
            FlowTable::Connections => &self.connections,
            FlowTable::Pinned => &self.pinned,
        };
        let map = map.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn pin(&mut self, flows: &[(lb_common::FlowKey, lb_common::FlowState)]) -> Result<usize> {
        let mut map = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        let mut full = 0;
        for (k, v) in flows {
            if map.len() >= self.max_pinned && !map.contains_key(k) {
                full += 1;
            } else {
                map.insert(*k, *v);
            }
        }
        Ok(full)
    }
    fn unpin(&mut self, keys: &[lb_common::FlowKey]) -> Result<()> {
        let mut map = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            map.remove(k);
        }
        Ok(())
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Whether a connection-table entry still counts as an active flow at `now`.
pub fn flow_is_active(
    state: &lb_common::FlowState,
    now_ns: u64,
    idle: std::time::Duration,
) -> bool {
    state.flags & lb_common::FLOW_F_CLOSING == 0
        && now_ns.saturating_sub(state.last_seen_ns) < idle.as_nanos() as u64
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataPlaneError {
    move |source| DataPlaneError::Map { map, source }
}

/// The loaded XDP object and typed handles on its maps.
pub struct XdpDataPlane {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_addrs: HashMap<MapData, VipAddrKey, u32>,
    rings: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    stats: PerCpuArray<MapData, Counter>,
    config: Array<MapData, LbConfig>,
    serving: Option<ServingMap>,
}

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        })
    }
}

impl XdpDataPlane {
    /// Loads the embedded object into the kernel (verifier included); attaches nothing.
    pub fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map> {
            ebpf.take_map(name)
                .ok_or(DataPlaneError::Missing { kind: "map", name })
        }
        let vips = HashMap::try_from(take(&mut ebpf, names::MAP_VIPS)?)
            .map_err(map_err(names::MAP_VIPS))?;
        let vip_addrs = HashMap::try_from(take(&mut ebpf, names::MAP_VIP_ADDRS)?)
            .map_err(map_err(names::MAP_VIP_ADDRS))?;
        let rings = Array::try_from(take(&mut ebpf, names::MAP_RINGS)?)
            .map_err(map_err(names::MAP_RINGS))?;
        let backends = Array::try_from(take(&mut ebpf, names::MAP_BACKENDS)?)
            .map_err(map_err(names::MAP_BACKENDS))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, names::MAP_STATS)?)
            .map_err(map_err(names::MAP_STATS))?;
        let config = Array::try_from(take(&mut ebpf, names::MAP_CONFIG)?)
            .map_err(map_err(names::MAP_CONFIG))?;
        let serving = Array::try_from(take(&mut ebpf, names::MAP_SERVING)?)
            .map_err(map_err(names::MAP_SERVING))?;
        let mut dp = Self {
            ebpf,
            vips,
            vip_addrs,
            rings,
            backends,
            stats,
            config,
            serving: Some(ServingMap(serving)),
        };
        dp.program_mut(names::PROG_LB)?;
        Ok(dp)
    }

    /// The serving switch, handed out once: whoever holds it decides whether this host
    /// serves (the VRRP speaker, or a standalone agent). The program starts not serving.
    pub fn take_serve_switch(&mut self) -> Option<ServingMap> {
        self.serving.take()
    }

    /// The XDP program `name`, loaded into the kernel.
    pub fn program_mut(&mut self, name: &'static str) -> Result<&mut Xdp> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(DataPlaneError::Missing {
                kind: "program",
                name,
            })?
            .try_into()
            .map_err(|source| DataPlaneError::Program {
                program: name,
                source,
            })?;
        if program.fd().is_err() {
            program.load().map_err(|source| DataPlaneError::Program {
                program: name,
                source,
            })?;
        }
        Ok(program)
    }

    /// Attaches the balancer program. `None` tries native first, then generic.
    /// The attachment is a BPF link owned by this process: it ends when the process
    /// does, however it ends.
    pub fn attach(&mut self, interface: &str, mode: Option<AttachedMode>) -> Result<AttachedMode> {
        let program = self.program_mut(names::PROG_LB)?;
        let try_mode = |program: &mut Xdp, m: AttachedMode| {
            let (flag, label) = match m {
                AttachedMode::Native => (XdpMode::Driver, "native"),
                AttachedMode::Generic => (XdpMode::Skb, "generic"),
            };
            program
                .attach(interface, flag)
                .map(|_| m)
                .map_err(|source| DataPlaneError::Attach {
                    interface: interface.to_string(),
                    mode: label,
                    source,
                })
        };
        match mode {
            Some(m) => try_mode(program, m),
            None => match try_mode(program, AttachedMode::Native) {
                Ok(m) => Ok(m),
                Err(native) => {
                    eprintln!(
                        "lb-agent: native XDP unavailable on {interface} ({native}); trying generic"
                    );
                    try_mode(program, AttachedMode::Generic)
                }
            },
        }
    }

    /// The connection table, read-only.
    fn flows(&self) -> Result<HashMap<&MapData, lb_common::FlowKey, lb_common::FlowState>> {
        let map = self
            .ebpf
            .map(names::MAP_FLOWS)
            .ok_or(DataPlaneError::Missing {
                kind: "map",
                name: names::MAP_FLOWS,
            })?;
        HashMap::try_from(map).map_err(map_err(names::MAP_FLOWS))
    }

    /// The connection-table entry of one flow, if any.
    pub fn flow(&self, key: &lb_common::FlowKey) -> Result<Option<lb_common::FlowState>> {
        let flows = self.flows()?;
        match flows.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::MAP_FLOWS)(e)),
        }
    }
}

impl DataPlane for XdpDataPlane {
    fn set_config(&mut self, cfg: &LbConfig) -> Result<()> {
        self.config
            .set(0, cfg, 0)
            .map_err(map_err(names::MAP_CONFIG))
    }
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        self.vips
            .insert(key, info, 0)
            .map_err(map_err(names::MAP_VIPS))
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        match self.vips.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::MAP_VIPS)(e)),
        }
    }
    fn set_vip_addr(&mut self, key: &VipAddrKey) -> Result<()> {
        self.vip_addrs
            .insert(key, 1, 0)
            .map_err(map_err(names::MAP_VIP_ADDRS))
    }
    fn remove_vip_addr(&mut self, key: &VipAddrKey) -> Result<()> {
        match self.vip_addrs.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::MAP_VIP_ADDRS)(e)),
        }
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .map_err(map_err(names::MAP_BACKENDS))
    }
    fn set_ring_slots(&mut self, vip_num: u32, slots: &[(u32, u32)]) -> Result<()> {
        let base = vip_num * MAX_RING_SIZE;
        for (slot, backend) in slots {
            self.rings
                .set(base + slot, backend, 0)
                .map_err(map_err(names::MAP_RINGS))?;
        }
        Ok(())
    }
    fn active_flows(&self, idle: std::time::Duration) -> Result<StdHashMap<u32, u64>> {
        let flows = self.flows()?;
        let now = monotonic_ns();
        let mut counts = StdHashMap::new();
        // Entries can vanish (LRU eviction) while we walk; those errors are skipped.
        for (_, state) in flows.iter().flatten() {
            if flow_is_active(&state, now, idle) {
                *counts.entry(state.backend).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }
    fn counter(&self, slot: u32) -> Result<Counter> {
        let per_cpu = self
            .stats
            .get(&slot, 0)
            .map_err(map_err(names::MAP_STATS))?;
        let mut sum = Counter::default();
        for c in per_cpu.iter() {
            sum.add(c);
        }
        Ok(sum)
    }
}

/// An in-memory data path that records what was written, for control-plane tests.
#[derive(Default, Debug)]
pub struct FakeDataPlane {
    pub config: LbConfig,
    pub vips: StdHashMap<VipKey, VipInfo>,
    pub vip_addrs: StdHashMap<VipAddrKey, u32>,
    pub backends: StdHashMap<u32, Backend>,
    pub rings: StdHashMap<u32, u32>,
    pub ring_writes: usize,
    pub counters: StdHashMap<u32, Counter>,
    /// What `active_flows` reports.
    pub active: StdHashMap<u32, u64>,
}

impl FakeDataPlane {
    /// The ring window of `vip_num`, `size` slots long.
    pub fn ring(&self, vip_num: u32, size: u32) -> Vec<u32> {
        (0..size)
            .map(|s| {
                self.rings
                    .get(&(vip_num * MAX_RING_SIZE + s))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }
}

impl DataPlane for FakeDataPlane {
    fn set_config(&mut self, cfg: &LbConfig) -> Result<()> {
        self.config = *cfg;
        Ok(())
    }
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        self.vips.insert(*key, *info);
        Ok(())
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vips.remove(key);
        Ok(())
    }
    fn set_vip_addr(&mut self, key: &VipAddrKey) -> Result<()> {
        self.vip_addrs.insert(*key, 1);
        Ok(())
    }
    fn remove_vip_addr(&mut self, key: &VipAddrKey) -> Result<()> {
        self.vip_addrs.remove(key);
        Ok(())
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn set_ring_slots(&mut self, vip_num: u32, slots: &[(u32, u32)]) -> Result<()> {
        for (slot, backend) in slots {
            self.rings.insert(vip_num * MAX_RING_SIZE + slot, *backend);
        }
        self.ring_writes += slots.len();
        Ok(())
    }
    fn counter(&self, slot: u32) -> Result<Counter> {
        Ok(self.counters.get(&slot).copied().unwrap_or_default())
    }
    fn active_flows(&self, _idle: std::time::Duration) -> Result<StdHashMap<u32, u64>> {
        Ok(self.active.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{FLOW_F_CLOSING, FlowState};
    use std::time::Duration;

    #[test]
    fn closed_and_idle_flows_are_not_active() {
        let idle = Duration::from_secs(10);
        let now = 100_000_000_000;
        let fresh = FlowState {
            backend: 1,
            vip_num: 0,
            last_seen_ns: now - 1_000_000_000,
            flags: 0,
            _pad: 0,
        };
        assert!(flow_is_active(&fresh, now, idle));
        assert!(!flow_is_active(
            &FlowState {
                flags: FLOW_F_CLOSING,
                ..fresh
            },
            now,
            idle
        ));
        assert!(!flow_is_active(
            &FlowState {
                last_seen_ns: now - 11_000_000_000,
                ..fresh
            },
            now,
            idle
        ));
        // A timestamp from after `now` (read races) counts as fresh, not as ancient.
        assert!(flow_is_active(
            &FlowState {
                last_seen_ns: now + 5,
                ..fresh
            },
            now,
            idle
        ));
    }
}
