//! The one narrow interface between the control plane and the kernel: the maps of the
//! XDP program. `XdpDataPlane` is the real one; `FakeDataPlane` records writes for tests.

use std::collections::HashMap as StdHashMap;

use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use crate::pins::{Found, PinDir};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};

use lb_common::{
    Backend, Counter, FlowKey, FlowState, LbConfig, MAX_FLOWS, MAX_NAT_FLOWS, MAX_PERSISTENT,
    MAX_PINNED_FLOWS, MAX_RING_SIZE, NatConfig, NatFlow, NatReply, NatTarget, PersistKey,
    PersistState, SERVE_F_ALL, Serving, VipAddrKey, VipInfo, VipKey, VipSlot,
    flowtab::{self, FlowSlot},
    layout, names,
};

/// The XDP object built from `lb-ebpf`, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// The same program built without the trace code (lb-ebpf without its `trace`
/// feature): only for the benchmark, which shows that tracing off costs nothing.
#[doc(hidden)]
pub static OBJECT_UNTRACED: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/untraced/lb"));

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
    #[error("map {map}: {op}: {source}")]
    Syscall {
        map: &'static str,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("attaching to {interface} in {mode} mode: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        source: ProgramError,
    },
    #[error(
        "maps of another layout are pinned at {path} (layout {found}; this agent's is v{ours:08x}): \
         they cannot be reused. `lb-agent --config PATH --detach` removes them (every flow \
         is lost; an old agent still running must be stopped first)"
    )]
    OtherLayout {
        path: PathBuf,
        found: String,
        ours: u32,
    },
    #[error(
        "pinned map {map} at {path} has {what} {found}, this agent wants {wanted}: it was made \
         by another layout or with another [agent] max_flows / max_pinned_flows / \
         max_persistent_clients / max_nat_flows. \
         `lb-agent --config PATH --detach` removes the pins (every flow is lost); then start again"
    )]
    PinnedMismatch {
        map: &'static str,
        path: PathBuf,
        what: &'static str,
        found: u32,
        wanted: u32,
    },
    #[error("{what} {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, DataPlaneError>;

/// What the control plane needs from the data path, and nothing more.
pub trait DataPlane {
    fn set_config(&mut self, cfg: &LbConfig) -> Result<()>;
    /// The VIP number's slot (`lb_common::VipSlot`) cleared, the VIPS entry written,
    /// then the slot: a write refused half-way leaves no slot that differs from VIPS.
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()>;
    /// The slot of `vip_num` cleared, then the VIPS entry removed: a slot never names a
    /// service VIPS has no longer.
    fn remove_vip(&mut self, key: &VipKey, vip_num: u32) -> Result<()>;
    fn set_vip_addr(&mut self, key: &VipAddrKey) -> Result<()>;
    fn remove_vip_addr(&mut self, key: &VipAddrKey) -> Result<()>;
    /// One 64-bit word of the VIP address filter (`lb_common::filter`).
    fn set_vip_filter_word(&mut self, word: u32, bits: u64) -> Result<()>;
    /// One word of the DSR filter: the bits of addresses with a DSR service.
    fn set_dsr_filter_word(&mut self, word: u32, bits: u64) -> Result<()>;
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    /// Writes `(slot, backend id)` pairs into the ring window of `vip_num`.
    fn set_ring_slots(&mut self, vip_num: u32, slots: &[(u32, u32)]) -> Result<()>;
    /// One counter slot, summed over CPUs.
    fn counter(&self, slot: u32) -> Result<Counter>;
    /// Where a NAT service's backend listens (all zero: not a NAT backend).
    fn set_nat_target(&mut self, id: u32, target: &NatTarget) -> Result<()>;
    fn set_nat_config(&mut self, cfg: &NatConfig) -> Result<()>;
}

/// The one switch that says whether this host serves the VIPs (answers ARP/ND for them
/// and forwards their traffic). It owns its own handle on the SERVING map, so the VRRP
/// speaker's thread flips it without going through the agent's loop.
pub trait ServeSwitch: Send {
    /// `lease_until_ns` (CLOCK_MONOTONIC, see `monotonic_ns`): when the program stops
    /// serving by itself unless the lease is renewed (by setting it again); 0: no lease.
    /// One map write; never blocks.
    fn set_serving(&mut self, on: bool, lease_until_ns: u64) -> Result<()>;
}

/// The real switch: the program's SERVING map.
pub struct ServingMap(Array<MapData, Serving>);

impl ServeSwitch for ServingMap {
    fn set_serving(&mut self, on: bool, lease_until_ns: u64) -> Result<()> {
        let value = Serving {
            flags: if on { SERVE_F_ALL } else { 0 },
            _pad: 0,
            lease_until_ns: if on { lease_until_ns } else { 0 },
        };
        self.0.set(0, value, 0).map_err(map_err(names::MAP_SERVING))
    }
}

/// A switch for tests: shares its state with whoever holds a clone of the flag; the
/// last lease written is in the second field.
#[derive(Clone, Debug, Default)]
pub struct FakeServeSwitch(
    pub std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub std::sync::Arc<std::sync::atomic::AtomicU64>,
);

impl ServeSwitch for FakeServeSwitch {
    fn set_serving(&mut self, on: bool, lease_until_ns: u64) -> Result<()> {
        self.0.store(on, std::sync::atomic::Ordering::SeqCst);
        self.1
            .store(lease_until_ns, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The two flow tables of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowTable {
    /// FLOWS: the connection table every flow enters on its first packet (buckets of
    /// slots the program keeps, `lb_common::flowtab`).
    Connections,
    /// PINNED: flows whose backend is no longer the ring's choice, copied here by the
    /// agent so that no eviction from the connection table can move them; the program
    /// consults it when the connection table misses.
    Pinned,
}

/// The flow tables, read and written off the agent's main loop: whoever holds this has
/// its own handles on the maps (a scanner thread, say).
pub trait FlowStore: Send {
    /// A copy of every entry of `table`: the connection table's used slots read in
    /// place (a mapping), the pinned table in batches (BPF_MAP_LOOKUP_BATCH). Entries
    /// that come and go during the read may or may not be in it.
    fn read(&mut self, table: FlowTable)
    -> Result<Vec<(lb_common::FlowKey, lb_common::FlowState)>>;
    /// Writes flows into the pinned table (an existing entry is overwritten), with no
    /// refresh stamp (`FlowState::touched_jiffies` 0). Returns how many did not fit
    /// because the table is full.
    fn pin(&mut self, flows: &[(lb_common::FlowKey, lb_common::FlowState)]) -> Result<usize>;
    /// Removes flows from the pinned table; absent ones are ignored.
    fn unpin(&mut self, keys: &[lb_common::FlowKey]) -> Result<()>;
    /// A copy of every entry of the persistence table, read in batches.
    fn read_persist(&mut self) -> Result<Vec<(PersistKey, PersistState)>>;
    /// Writes persistence entries (a peer's); an existing entry is overwritten.
    fn write_persist(&mut self, entries: &[(PersistKey, PersistState)]) -> Result<()>;
    /// Removes persistence entries (expired ones); absent ones are ignored.
    fn remove_persist(&mut self, keys: &[PersistKey]) -> Result<()>;
    /// A copy of every NAT flow (NAT_FLOWS), read in batches.
    fn read_nat(&mut self) -> Result<Vec<(FlowKey, NatFlow)>>;
    /// Removes NAT flows, both halves: the forward entry first, so that no packet of
    /// the flow goes out on a port a new flow may already hold. Absent ones are ignored,
    /// and so is one whose entry is no longer the one given (read by an earlier scan):
    /// the data path wrote it since (a client's SYN reopened a closed flow's pair,
    /// a packet came), and the next scan judges it anew. Returns how many it removed.
    fn remove_nat(&mut self, flows: &[(FlowKey, NatFlow)]) -> Result<usize>;
    /// Installs NAT flows (a peer's), both halves: the reverse entry first, as the
    /// program does; one whose port another flow holds here is left out. Returns how
    /// many were left out (port taken or table full).
    fn install_nat(&mut self, flows: &[(FlowKey, NatFlow)]) -> Result<usize>;
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
    pub persist: std::sync::Arc<std::sync::Mutex<StdHashMap<PersistKey, PersistState>>>,
    /// NAT flows by the client's key; the reverse half is derived (`nat::reverse_key`).
    pub nat: std::sync::Arc<std::sync::Mutex<StdHashMap<FlowKey, NatFlow>>>,
    /// How long a read of the connection table takes (a big table's), and how many
    /// have started.
    pub read_delay: std::time::Duration,
    pub connection_reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FlowStore for FakeFlowStore {
    fn read(
        &mut self,
        table: FlowTable,
    ) -> Result<Vec<(lb_common::FlowKey, lb_common::FlowState)>> {
        let map = match table {
            FlowTable::Connections => {
                self.connection_reads
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(self.read_delay);
                &self.connections
            }
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
                map.insert(*k, v.unstamped());
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
    fn read_persist(&mut self) -> Result<Vec<(PersistKey, PersistState)>> {
        let map = self.persist.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn write_persist(&mut self, entries: &[(PersistKey, PersistState)]) -> Result<()> {
        let mut map = self.persist.lock().unwrap_or_else(|e| e.into_inner());
        map.extend(entries.iter().copied());
        Ok(())
    }
    fn remove_persist(&mut self, keys: &[PersistKey]) -> Result<()> {
        let mut map = self.persist.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            map.remove(k);
        }
        Ok(())
    }
    fn read_nat(&mut self) -> Result<Vec<(FlowKey, NatFlow)>> {
        let map = self.nat.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn remove_nat(&mut self, flows: &[(FlowKey, NatFlow)]) -> Result<usize> {
        let mut map = self.nat.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        for (k, v) in flows {
            if map.get(k) == Some(v) {
                map.remove(k);
                removed += 1;
            }
        }
        Ok(removed)
    }
    fn install_nat(&mut self, flows: &[(FlowKey, NatFlow)]) -> Result<usize> {
        let mut map = self.nat.lock().unwrap_or_else(|e| e.into_inner());
        let taken: std::collections::HashSet<FlowKey> = map
            .iter()
            .map(|(k, v)| crate::nat::reverse_key(k, v))
            .collect();
        let mut left_out = 0;
        for (k, v) in flows {
            if !map.contains_key(k) && taken.contains(&crate::nat::reverse_key(k, v)) {
                left_out += 1;
            } else {
                map.insert(*k, *v);
            }
        }
        Ok(left_out)
    }
}

/// The real flow tables: the program's FLOWS and PINNED maps, through handles of its own
/// (duplicated descriptors), so a scanner thread can hold it apart from the data plane.
pub struct FlowMaps {
    flows: MappedSlots,
    pinned: MapData,
    persist: OwnedFd,
    nat_flows: MapData,
    nat_reverse: MapData,
}

/// Entries asked for in one BPF_MAP_LOOKUP_BATCH call. A hash map's batch is made of
/// whole buckets, so a call may need room for one bucket more than it returns.
const BATCH: usize = 8192;

/// The connection table's slots, mapped read-only into our memory (FLOWS is
/// `BPF_F_MMAPABLE`): a scan reads them in place, where a batch read copied every slot,
/// used or not, through the kernel (a few ms against 60 for the default 262,144 slots,
/// however few flows there are).
struct MappedSlots {
    ptr: std::ptr::NonNull<FlowSlot>,
    slots: usize,
}

// SAFETY: a read-only mapping of the map's memory, owned by this value alone (it is
// unmapped on drop); reading it from another thread is as safe as from this one.
unsafe impl Send for MappedSlots {}

impl MappedSlots {
    /// Maps the `slots` slots of the FLOWS array behind `fd`. The mapping holds the map
    /// alive by itself.
    fn new(fd: BorrowedFd<'_>, slots: u32) -> Result<Self> {
        let slots = slots as usize;
        let len = slots * std::mem::size_of::<FlowSlot>();
        // SAFETY: a fresh shared read-only mapping of the map's memory; the kernel
        // checks that `len` is within it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataPlaneError::Syscall {
                map: names::MAP_FLOWS,
                op: "mmap",
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<FlowSlot>()).ok_or_else(|| {
            DataPlaneError::Syscall {
                map: names::MAP_FLOWS,
                op: "mmap",
                source: std::io::Error::other("a null mapping"),
            }
        })?;
        Ok(Self { ptr, slots })
    }

    /// The used slots' flows. Each slot is copied once (volatile: the program writes
    /// them meanwhile); a slot written during its copy may read half old, half new, as
    /// a batch read's copy could.
    fn flows(&self) -> Vec<(FlowKey, FlowState)> {
        (0..self.slots)
            .filter_map(|i| {
                // SAFETY: slot i < slots of the mapping, which lives as long as `self`.
                let slot = unsafe { self.ptr.as_ptr().add(i).read_volatile() };
                slot.is_used().then_some((slot.key, slot.state))
            })
            .collect()
    }
}

impl Drop for MappedSlots {
    fn drop(&mut self) {
        let len = self.slots * std::mem::size_of::<FlowSlot>();
        // SAFETY: our own mapping, of this length, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), len) };
    }
}

impl FlowStore for FlowMaps {
    fn read(&mut self, table: FlowTable) -> Result<Vec<(FlowKey, FlowState)>> {
        match table {
            FlowTable::Connections => Ok(self.flows.flows()),
            FlowTable::Pinned => {
                sys::lookup_batch(&self.pinned.fd().as_fd(), BATCH).map_err(|source| {
                    DataPlaneError::Syscall {
                        map: names::MAP_PINNED,
                        op: "BPF_MAP_LOOKUP_BATCH",
                        source,
                    }
                })
            }
        }
    }
    fn pin(&mut self, flows: &[(FlowKey, FlowState)]) -> Result<usize> {
        let mut full = 0;
        for (key, value) in flows {
            // No data path's refresh stamp: the flow's next packet refreshes the time
            // the agent wrote.
            match sys::update(&self.pinned.fd().as_fd(), key, &value.unstamped()) {
                Ok(()) => {}
                // A full preallocated hash answers E2BIG; ENOMEM when memory runs out.
                Err(e) if matches!(e.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)) => full += 1,
                Err(source) => {
                    return Err(DataPlaneError::Syscall {
                        map: names::MAP_PINNED,
                        op: "BPF_MAP_UPDATE_ELEM",
                        source,
                    });
                }
            }
        }
        Ok(full)
    }
    fn read_persist(&mut self) -> Result<Vec<(PersistKey, PersistState)>> {
        sys::lookup_batch(&self.persist.as_fd(), BATCH).map_err(|source| DataPlaneError::Syscall {
            map: names::MAP_PERSIST,
            op: "BPF_MAP_LOOKUP_BATCH",
            source,
        })
    }
    fn write_persist(&mut self, entries: &[(PersistKey, PersistState)]) -> Result<()> {
        for (key, value) in entries {
            // An LRU map makes room by itself; any error is worth reporting.
            sys::update(&self.persist.as_fd(), key, value).map_err(|source| {
                DataPlaneError::Syscall {
                    map: names::MAP_PERSIST,
                    op: "BPF_MAP_UPDATE_ELEM",
                    source,
                }
            })?;
        }
        Ok(())
    }
    fn remove_persist(&mut self, keys: &[PersistKey]) -> Result<()> {
        for key in keys {
            deleted(names::MAP_PERSIST, sys::delete(&self.persist.as_fd(), key))?;
        }
        Ok(())
    }
    fn read_nat(&mut self) -> Result<Vec<(FlowKey, NatFlow)>> {
        sys::lookup_batch(&self.nat_flows.fd().as_fd(), BATCH).map_err(|source| {
            DataPlaneError::Syscall {
                map: names::MAP_NAT_FLOWS,
                op: "BPF_MAP_LOOKUP_BATCH",
                source,
            }
        })
    }
    fn remove_nat(&mut self, flows: &[(FlowKey, NatFlow)]) -> Result<usize> {
        let mut removed = 0;
        for (key, value) in flows {
            // Read again just before: the window in which the program may reopen the
            // pair (`nat::reopen`) and lose it to this delete shrinks from a whole scan
            // to two system calls. (No compare-and-delete for hash maps closes it.)
            match sys::lookup::<FlowKey, NatFlow>(&self.nat_flows.fd().as_fd(), key) {
                Ok(now) if now == *value => {}
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(source) => {
                    return Err(DataPlaneError::Syscall {
                        map: names::MAP_NAT_FLOWS,
                        op: "BPF_MAP_LOOKUP_ELEM",
                        source,
                    });
                }
            }
            removed += 1;
            deleted(
                names::MAP_NAT_FLOWS,
                sys::delete(&self.nat_flows.fd().as_fd(), key),
            )?;
            let rev = crate::nat::reverse_key(key, value);
            deleted(
                names::MAP_NAT_REVERSE,
                sys::delete(&self.nat_reverse.fd().as_fd(), &rev),
            )?;
        }
        Ok(removed)
    }
    fn install_nat(&mut self, flows: &[(FlowKey, NatFlow)]) -> Result<usize> {
        let mut left_out = 0;
        for (key, value) in flows {
            let rev = crate::nat::reverse_key(key, value);
            let reply = crate::nat::reply_entry(key, value);
            // Our own copy of this flow (an earlier sync) is simply refreshed.
            match sys::update_flags(
                &self.nat_reverse.fd().as_fd(),
                &rev,
                &reply,
                sys::BPF_NOEXIST,
            ) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    match sys::lookup::<FlowKey, NatReply>(&self.nat_reverse.fd().as_fd(), &rev) {
                        Ok(owner) if owner.client == *key => {}
                        _ => {
                            left_out += 1;
                            continue;
                        }
                    }
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)) => {
                    left_out += 1;
                    continue;
                }
                Err(source) => {
                    return Err(DataPlaneError::Syscall {
                        map: names::MAP_NAT_REVERSE,
                        op: "BPF_MAP_UPDATE_ELEM",
                        source,
                    });
                }
            }
            match sys::update_flags(&self.nat_flows.fd().as_fd(), key, value, sys::BPF_ANY) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)) => {
                    let _ = sys::delete(&self.nat_reverse.fd().as_fd(), &rev);
                    left_out += 1;
                }
                Err(source) => {
                    return Err(DataPlaneError::Syscall {
                        map: names::MAP_NAT_FLOWS,
                        op: "BPF_MAP_UPDATE_ELEM",
                        source,
                    });
                }
            }
        }
        Ok(left_out)
    }
    fn unpin(&mut self, keys: &[FlowKey]) -> Result<()> {
        for key in keys {
            deleted(
                names::MAP_PINNED,
                sys::delete(&self.pinned.fd().as_fd(), key),
            )?;
        }
        Ok(())
    }
}

/// A delete's result: an entry already gone (ENOENT) is what the caller wanted too.
fn deleted(map: &'static str, result: std::io::Result<()>) -> Result<()> {
    match result {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(DataPlaneError::Syscall {
            map,
            op: "BPF_MAP_DELETE_ELEM",
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The bpf(2) commands aya 0.14 does not wrap for us (batch lookup), and the two element
/// writes, on a raw map descriptor.
mod sys {
    use std::{io, os::fd::AsRawFd};

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    pub const BPF_ANY: u64 = 0;
    pub const BPF_NOEXIST: u64 = 1;

    /// `union bpf_attr` as BPF_MAP_*_ELEM reads it.
    #[repr(C)]
    #[derive(Default)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    /// `union bpf_attr` as BPF_MAP_LOOKUP_BATCH reads it.
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
        bpf_value(cmd, attr).map(drop)
    }

    /// `bpf`, with the syscall's value (BPF_MAP_CREATE: the new map's descriptor).
    fn bpf_value<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a bpf_attr prefix of the right layout for `cmd`, and every
        // pointer in it points to memory that outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T as *mut libc::c_void,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// `K` and `V` must be the map's key and value types (repr(C), as the map stores them).
    pub fn update<K, V>(fd: &impl AsRawFd, key: &K, value: &V) -> io::Result<()> {
        update_flags(fd, key, value, BPF_ANY)
    }

    /// `K` and `V` must be the map's key and value types (plain `repr(C)` data).
    pub fn update_flags<K, V>(fd: &impl AsRawFd, key: &K, value: &V, flags: u64) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: value as *const V as u64,
            flags,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
    }

    pub fn lookup<K, V: Default>(fd: &impl AsRawFd, key: &K) -> io::Result<V> {
        let mut value = V::default();
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: &mut value as *mut V as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
        Ok(value)
    }

    pub fn delete<K>(fd: &impl AsRawFd, key: &K) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_DELETE_ELEM, &mut attr)
    }

    /// Every entry, `batch` at a time. The position between calls is a bucket index
    /// kept by the kernel (not a key), so entries removed meanwhile cost nothing: they
    /// are simply not returned. ENOENT ends the walk (with that call's last
    /// entries); ENOSPC means one bucket holds more than `batch`: retried with more room.
    pub fn lookup_batch<K: Copy + Default, V: Copy + Default>(
        fd: &impl AsRawFd,
        batch: usize,
    ) -> io::Result<Vec<(K, V)>> {
        let mut out = Vec::new();
        let mut size = batch.max(1);
        let mut keys = vec![K::default(); size];
        let mut values = vec![V::default(); size];
        // Tokens: the kernel reads and writes a u32 bucket index for hash maps.
        let mut token = 0u64;
        let mut first = true;
        loop {
            let mut next = 0u64;
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    &token as *const u64 as u64
                },
                out_batch: &mut next as *mut u64 as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: size as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..Default::default()
            };
            let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let n = (attr.count as usize).min(size);
            match r {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
                    return Ok(out);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                    size *= 2;
                    keys.resize(size, K::default());
                    values.resize(size, V::default());
                    continue;
                }
                Err(e) => return Err(e),
            }
            out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
            token = next;
            first = false;
        }
    }
}

/// How big the flow tables are made at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// FLOWS, the connection table (rounded up to whole buckets,
    /// `lb_common::flowtab::slots_for`).
    pub max_flows: u32,
    /// PINNED, the agent's table of flows kept on their backend.
    pub max_pinned_flows: u32,
    /// PERSIST, the LRU table of client-address persistence.
    pub max_persistent_clients: u32,
    /// NAT_FLOWS and NAT_REVERSE, one entry each per NAT flow.
    pub max_nat_flows: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            max_flows: MAX_FLOWS,
            max_pinned_flows: MAX_PINNED_FLOWS,
            max_persistent_clients: MAX_PERSISTENT,
            max_nat_flows: MAX_NAT_FLOWS,
        }
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

/// A descriptor of our own on a map: it keeps the map alive as long as we hold it.
fn dup_fd(map: &MapData, name: &'static str) -> Result<OwnedFd> {
    map.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| DataPlaneError::Syscall {
            map: name,
            op: "dup",
            source,
        })
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataPlaneError {
    move |source| DataPlaneError::Map { map, source }
}

/// The loaded XDP object and typed handles on its maps.
pub struct XdpDataPlane {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_addrs: HashMap<MapData, VipAddrKey, u32>,
    vip_filter: Array<MapData, u64>,
    vip_slots: Array<MapData, VipSlot>,
    dsr_filter: Array<MapData, u64>,
    rings: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    stats: PerCpuArray<MapData, Counter>,
    /// Our own descriptor on the counter array, for `stats_reader`.
    stats_fd: OwnedFd,
    config: Array<MapData, LbConfig>,
    meta: Array<MapData, u64>,
    nat_targets: Array<MapData, NatTarget>,
    nat_config: Array<MapData, NatConfig>,
    serving: Option<ServingMap>,
    flow_store: Option<FlowMaps>,
    /// The packet trace's ring buffer (absent in an object built without it).
    trace_ring: Option<RingBuf<MapData>>,
    /// Where the maps are pinned, if they are (`load_pinned`).
    pins: Option<PinDir>,
    /// The pinned XDP link, once attached by `attach_pinned`.
    link: Option<PinnedLink>,
}

/// How `attach_pinned` put the program on the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link, now pinned.
    New(AttachedMode),
    /// The program replaced an earlier agent's in its pinned link, atomically
    /// (`bpf_link_update`): not one packet without a program. The mode is the link's.
    Replaced(Option<AttachedMode>),
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
    /// Loads the embedded object with the default table sizes; attaches nothing.
    pub fn load() -> Result<Self> {
        Self::load_sized(MapSizes::default())
    }

    /// Loads the embedded object into the kernel (verifier included) with its flow
    /// tables of `sizes`; attaches nothing. Its maps live as long as this value.
    pub fn load_sized(sizes: MapSizes) -> Result<Self> {
        Self::load_with(OBJECT, sizes, None)
    }

    /// As `load_sized`, another build of the program (the benchmark's untraced one).
    #[doc(hidden)]
    pub fn load_object(object: &[u8], sizes: MapSizes) -> Result<Self> {
        Self::load_with(object, sizes, None)
    }

    /// Loads the embedded object with its maps pinned at `pins`: maps an earlier agent
    /// pinned there are reused as they are (checked first: another layout, or tables of
    /// other sizes, are refused), the others are made and pinned. Attaches nothing; see
    /// `attach_pinned`.
    pub fn load_pinned(sizes: MapSizes, pins: &PinDir) -> Result<(Self, Found)> {
        Self::load_pinned_object(OBJECT, sizes, pins)
    }

    /// As `load_pinned`, another build of the program (the benchmark's, which fills a
    /// pinned connection table from outside).
    #[doc(hidden)]
    pub fn load_pinned_object(
        object: &[u8],
        sizes: MapSizes,
        pins: &PinDir,
    ) -> Result<(Self, Found)> {
        let found = pins.prepare(sizes)?;
        let mut dp = Self::load_with(object, sizes, Some(pins))?;
        dp.pins = Some(pins.clone());
        dp.meta
            .set(layout::meta::LAYOUT, u64::from(layout::VERSION), 0)
            .map_err(map_err(names::MAP_META))?;
        Ok((dp, found))
    }

    fn load_with(object: &[u8], sizes: MapSizes, pins: Option<&PinDir>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::MAP_FLOWS, flowtab::slots_for(sizes.max_flows))
            .map_max_entries(names::MAP_PINNED, sizes.max_pinned_flows)
            .map_max_entries(names::MAP_PERSIST, sizes.max_persistent_clients)
            .map_max_entries(names::MAP_NAT_FLOWS, sizes.max_nat_flows)
            .map_max_entries(names::MAP_NAT_REVERSE, sizes.max_nat_flows);
        if let Some(pins) = pins {
            for m in &layout::MAPS {
                loader.map_pin_path(m.name, pins.map_path(m.name));
            }
        }
        let mut ebpf = loader.load(object)?;
        fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map> {
            ebpf.take_map(name)
                .ok_or(DataPlaneError::Missing { kind: "map", name })
        }
        let vips = HashMap::try_from(take(&mut ebpf, names::MAP_VIPS)?)
            .map_err(map_err(names::MAP_VIPS))?;
        let vip_addrs = HashMap::try_from(take(&mut ebpf, names::MAP_VIP_ADDRS)?)
            .map_err(map_err(names::MAP_VIP_ADDRS))?;
        let vip_filter = Array::try_from(take(&mut ebpf, names::MAP_VIP_FILTER)?)
            .map_err(map_err(names::MAP_VIP_FILTER))?;
        let vip_slots = Array::try_from(take(&mut ebpf, names::MAP_VIP_SLOTS)?)
            .map_err(map_err(names::MAP_VIP_SLOTS))?;
        let dsr_filter = Array::try_from(take(&mut ebpf, names::MAP_DSR_FILTER)?)
            .map_err(map_err(names::MAP_DSR_FILTER))?;
        let rings = Array::try_from(take(&mut ebpf, names::MAP_RINGS)?)
            .map_err(map_err(names::MAP_RINGS))?;
        let backends = Array::try_from(take(&mut ebpf, names::MAP_BACKENDS)?)
            .map_err(map_err(names::MAP_BACKENDS))?;
        let stats = take(&mut ebpf, names::MAP_STATS)?;
        let stats_fd = match &stats {
            Map::PerCpuArray(m) => dup_fd(m, names::MAP_STATS)?,
            _ => {
                return Err(DataPlaneError::Missing {
                    kind: "per-CPU array",
                    name: names::MAP_STATS,
                });
            }
        };
        let stats = PerCpuArray::try_from(stats).map_err(map_err(names::MAP_STATS))?;
        let config = Array::try_from(take(&mut ebpf, names::MAP_CONFIG)?)
            .map_err(map_err(names::MAP_CONFIG))?;
        let serving = Array::try_from(take(&mut ebpf, names::MAP_SERVING)?)
            .map_err(map_err(names::MAP_SERVING))?;
        let meta =
            Array::try_from(take(&mut ebpf, names::MAP_META)?).map_err(map_err(names::MAP_META))?;
        let nat_targets = Array::try_from(take(&mut ebpf, names::MAP_NAT_BACKENDS)?)
            .map_err(map_err(names::MAP_NAT_BACKENDS))?;
        let nat_config = Array::try_from(take(&mut ebpf, names::MAP_NAT_CONFIG)?)
            .map_err(map_err(names::MAP_NAT_CONFIG))?;
        // FLOWS stays in `ebpf` too (for `flow`): the store maps its slots. PINNED
        // belongs to the store alone.
        let flows = match ebpf.map(names::MAP_FLOWS) {
            Some(Map::Array(m)) => {
                MappedSlots::new(m.fd().as_fd(), flowtab::slots_for(sizes.max_flows))?
            }
            _ => {
                return Err(DataPlaneError::Missing {
                    kind: "array",
                    name: names::MAP_FLOWS,
                });
            }
        };
        let persist = match ebpf.map(names::MAP_PERSIST) {
            Some(Map::LruHashMap(m)) => dup_fd(m, names::MAP_PERSIST)?,
            _ => {
                return Err(DataPlaneError::Missing {
                    kind: "LRU hash map",
                    name: names::MAP_PERSIST,
                });
            }
        };
        let nat_map = |ebpf: &mut Ebpf, name: &'static str| match take(ebpf, name)? {
            Map::HashMap(m) => Ok(m),
            _ => Err(DataPlaneError::Missing {
                kind: "hash map",
                name,
            }),
        };
        let nat_flows = nat_map(&mut ebpf, names::MAP_NAT_FLOWS)?;
        let nat_reverse = nat_map(&mut ebpf, names::MAP_NAT_REVERSE)?;
        let pinned = match take(&mut ebpf, names::MAP_PINNED)? {
            // Kept, not duplicated: the program is loaded below and refers to this map
            // by the descriptor the loader created.
            Map::HashMap(m) => m,
            _ => {
                return Err(DataPlaneError::Missing {
                    kind: "hash map",
                    name: names::MAP_PINNED,
                });
            }
        };
        let trace_ring = match ebpf.take_map(names::MAP_TRACE) {
            Some(map) => Some(RingBuf::try_from(map).map_err(map_err(names::MAP_TRACE))?),
            None => None,
        };
        let mut dp = Self {
            ebpf,
            vips,
            vip_addrs,
            vip_filter,
            vip_slots,
            dsr_filter,
            rings,
            backends,
            stats,
            stats_fd,
            config,
            meta,
            nat_targets,
            nat_config,
            serving: Some(ServingMap(serving)),
            flow_store: Some(FlowMaps {
                flows,
                pinned,
                persist,
                nat_flows,
                nat_reverse,
            }),
            trace_ring,
            pins: None,
            link: None,
        };
        dp.program_mut(names::PROG_LB)?;
        dp.describe_flow_table(sizes.max_flows)?;
        Ok(dp)
    }

    /// Writes the connection table's description (`meta::FLOW_TABLE`: a fresh random
    /// seed and the bucket count) unless the table has one of its size: a pinned table
    /// keeps its own, or its flows would no longer be found. (A description of another
    /// size can only be left from a table that is gone: a pinned table of another size
    /// is refused before the load.)
    fn describe_flow_table(&mut self, max_flows: u32) -> Result<()> {
        let word = self
            .meta
            .get(&layout::meta::FLOW_TABLE, 0)
            .map_err(map_err(names::MAP_META))?;
        if word != 0 && flowtab::table_of(word).1 == flowtab::buckets_for(max_flows) {
            return Ok(());
        }
        let mut seed = [0u8; 4];
        // SAFETY: a 4-byte buffer of our own.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        if n != seed.len() as isize {
            return Err(DataPlaneError::Syscall {
                map: names::MAP_META,
                op: "getrandom (the connection table's seed)",
                source: std::io::Error::last_os_error(),
            });
        }
        let word = flowtab::table_word(u32::from_ne_bytes(seed), flowtab::buckets_for(max_flows));
        self.meta
            .set(layout::meta::FLOW_TABLE, word, 0)
            .map_err(map_err(names::MAP_META))
    }

    /// A handle of its own on the counter array, for a reader on another thread (the
    /// metrics endpoint): reading it never waits for the agent's loop.
    pub fn stats_reader(&self) -> Result<StatsReader> {
        let fd = self
            .stats_fd
            .try_clone()
            .map_err(|source| DataPlaneError::Syscall {
                map: names::MAP_STATS,
                op: "dup",
                source,
            })?;
        let data = MapData::from_fd(fd).map_err(map_err(names::MAP_STATS))?;
        let map = Map::from_map_data(data).map_err(map_err(names::MAP_STATS))?;
        let array = PerCpuArray::try_from(map).map_err(map_err(names::MAP_STATS))?;
        Ok(StatsReader(array))
    }

    /// The serving switch, handed out once: whoever holds it decides whether this host
    /// serves (the VRRP speaker, or a standalone agent). The program starts not serving.
    pub fn take_serve_switch(&mut self) -> Option<ServingMap> {
        self.serving.take()
    }

    /// The packet trace's ring buffer, handed out once: to the agent's reader task.
    pub fn take_trace_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.trace_ring.take()
    }

    /// The flow tables, handed out once: whoever holds them reads FLOWS and PINNED and
    /// writes PINNED (the agent's flow scanner).
    pub fn take_flow_store(&mut self) -> Option<FlowMaps> {
        self.flow_store.take()
    }

    /// Each CPU's last reading of the serving lease (`lb_common::lease`), for tests and
    /// diagnostics: which lease a CPU last found running, in which jiffy, and how many
    /// packets it may still answer from that reading.
    pub fn lease_readings(&self) -> Result<Vec<lb_common::lease::LeaseCache>> {
        let name = names::MAP_LEASE_CACHE;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataPlaneError::Missing { kind: "map", name })?;
        let array: PerCpuArray<&MapData, lb_common::lease::LeaseCache> =
            PerCpuArray::try_from(map).map_err(map_err(name))?;
        Ok(array
            .get(&0, 0)
            .map_err(map_err(name))?
            .iter()
            .copied()
            .collect())
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
        self.attach_link(interface, mode).map(|(m, _)| m)
    }

    fn attach_link(
        &mut self,
        interface: &str,
        mode: Option<AttachedMode>,
    ) -> Result<(AttachedMode, XdpLinkId)> {
        let program = self.program_mut(names::PROG_LB)?;
        let try_mode = |program: &mut Xdp, m: AttachedMode| {
            let (flag, label) = match m {
                AttachedMode::Native => (XdpMode::Driver, "native"),
                AttachedMode::Generic => (XdpMode::Skb, "generic"),
            };
            program
                .attach(interface, flag)
                .map(|id| (m, id))
                .map_err(|source| DataPlaneError::Attach {
                    interface: interface.to_string(),
                    mode: label,
                    source,
                })
        };
        match mode {
            Some(m) => try_mode(program, m),
            None => match try_mode(program, AttachedMode::Native) {
                Ok(attached) => Ok(attached),
                Err(native) => {
                    tracing::warn!(
                        "native XDP unavailable on {interface} ({native}); trying generic"
                    );
                    try_mode(program, AttachedMode::Generic)
                }
            },
        }
    }

    /// Attaches the balancer program through a pinned link that outlives this process:
    /// the link an earlier agent pinned has its program replaced atomically; without
    /// one, the program is attached (as `attach`) and the new link pinned. Needs
    /// `load_pinned`.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        mode: Option<AttachedMode>,
    ) -> Result<Attached> {
        let pins = self.pins.clone().ok_or(DataPlaneError::Missing {
            kind: "pin directory",
            name: "load_pinned",
        })?;
        let path = pins.link_path();
        let pin_err = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |e: &dyn std::fmt::Display| DataPlaneError::Pin {
                what,
                path,
                source: std::io::Error::other(e.to_string()),
            }
        };
        if path.exists() {
            match self.replace_in_link(&path) {
                Ok(()) => {
                    let stored = self.meta.get(&layout::meta::XDP_MODE, 0).unwrap_or(0);
                    let mode = match stored {
                        1 => Some(AttachedMode::Native),
                        2 => Some(AttachedMode::Generic),
                        _ => None,
                    };
                    return Ok(Attached::Replaced(mode));
                }
                // A link whose interface went away (defunct) cannot take a program:
                // start over with a new one.
                Err(e) => {
                    tracing::warn!(
                        "replacing the program in {}: {e}; attaching anew",
                        path.display()
                    );
                    std::fs::remove_file(&path).map_err(|e| pin_err("removing", &path)(&e))?;
                }
            }
        }
        let (got, id) = self.attach_link(interface, mode)?;
        let program = self.program_mut(names::PROG_LB)?;
        let link = program
            .take_link(id)
            .map_err(|source| DataPlaneError::Program {
                program: names::PROG_LB,
                source,
            })?;
        let link = FdLink::try_from(link).map_err(|e| pin_err("pinning the link at", &path)(&e))?;
        let pinned = link
            .pin(&path)
            .map_err(|e| pin_err("pinning the link at", &path)(&e))?;
        self.link = Some(pinned);
        let stored = match got {
            AttachedMode::Native => 1,
            AttachedMode::Generic => 2,
        };
        self.meta
            .set(layout::meta::XDP_MODE, stored, 0)
            .map_err(map_err(names::MAP_META))?;
        Ok(Attached::New(got))
    }

    /// `bpf_link_update` of the pinned link at `path` to our program.
    fn replace_in_link(&mut self, path: &Path) -> Result<()> {
        let fail = |e: &dyn std::fmt::Display| DataPlaneError::Pin {
            what: "replacing the program in the pinned link",
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        };
        let pinned = PinnedLink::from_pin(path).map_err(|e| fail(&e))?;
        let fd_link: FdLink = pinned.into();
        let link = XdpLink::try_from(fd_link).map_err(|e| fail(&e))?;
        let program = self.program_mut(names::PROG_LB)?;
        program.attach_to_link(link).map_err(|e| fail(&e))?;
        Ok(())
    }

    /// The connection table, read-only.
    fn flows(&self) -> Result<Array<&MapData, FlowSlot>> {
        let map = self
            .ebpf
            .map(names::MAP_FLOWS)
            .ok_or(DataPlaneError::Missing {
                kind: "map",
                name: names::MAP_FLOWS,
            })?;
        Array::try_from(map).map_err(map_err(names::MAP_FLOWS))
    }

    /// The connection-table entry of one flow, if any: its bucket's slots, as the
    /// program looks it up.
    pub fn flow(&self, key: &lb_common::FlowKey) -> Result<Option<lb_common::FlowState>> {
        let word = self
            .meta
            .get(&layout::meta::FLOW_TABLE, 0)
            .map_err(map_err(names::MAP_META))?;
        let (seed, buckets) = flowtab::table_of(word);
        let flows = self.flows()?;
        let found = flowtab::find_slot(key, seed, buckets, |i| {
            flows.get(&i, 0).map_err(map_err(names::MAP_FLOWS))
        })?;
        Ok(found.map(|(_, slot)| slot.state))
    }
}

impl DataPlane for XdpDataPlane {
    fn set_config(&mut self, cfg: &LbConfig) -> Result<()> {
        self.config
            .set(0, cfg, 0)
            .map_err(map_err(names::MAP_CONFIG))
    }
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        self.vip_slots
            .set(info.vip_num, VipSlot::default(), 0)
            .map_err(map_err(names::MAP_VIP_SLOTS))?;
        self.vips
            .insert(key, info, 0)
            .map_err(map_err(names::MAP_VIPS))?;
        let slot = VipSlot {
            key: *key,
            info: *info,
        };
        self.vip_slots
            .set(info.vip_num, slot, 0)
            .map_err(map_err(names::MAP_VIP_SLOTS))
    }
    fn remove_vip(&mut self, key: &VipKey, vip_num: u32) -> Result<()> {
        self.vip_slots
            .set(vip_num, VipSlot::default(), 0)
            .map_err(map_err(names::MAP_VIP_SLOTS))?;
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
    fn set_vip_filter_word(&mut self, word: u32, bits: u64) -> Result<()> {
        self.vip_filter
            .set(word, bits, 0)
            .map_err(map_err(names::MAP_VIP_FILTER))
    }
    fn set_dsr_filter_word(&mut self, word: u32, bits: u64) -> Result<()> {
        self.dsr_filter
            .set(word, bits, 0)
            .map_err(map_err(names::MAP_DSR_FILTER))
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
    fn counter(&self, slot: u32) -> Result<Counter> {
        read_summed(&self.stats, slot)
    }
    fn set_nat_target(&mut self, id: u32, target: &NatTarget) -> Result<()> {
        self.nat_targets
            .set(id, target, 0)
            .map_err(map_err(names::MAP_NAT_BACKENDS))
    }
    fn set_nat_config(&mut self, cfg: &NatConfig) -> Result<()> {
        self.nat_config
            .set(0, cfg, 0)
            .map_err(map_err(names::MAP_NAT_CONFIG))
    }
}

/// One slot of the counter array, summed over CPUs.
fn read_summed(stats: &PerCpuArray<MapData, Counter>, slot: u32) -> Result<Counter> {
    let per_cpu = stats.get(&slot, 0).map_err(map_err(names::MAP_STATS))?;
    Ok(sum_per_cpu(per_cpu.iter()))
}

/// Per-CPU values of one counter slot, added up.
pub fn sum_per_cpu<'c>(per_cpu: impl IntoIterator<Item = &'c Counter>) -> Counter {
    let mut sum = Counter::default();
    for c in per_cpu {
        sum.add(c);
    }
    sum
}

/// The counter array through a descriptor of its own (`XdpDataPlane::stats_reader`).
pub struct StatsReader(PerCpuArray<MapData, Counter>);

impl crate::metrics::CounterSource for StatsReader {
    fn counter(&self, slot: u32) -> Result<Counter> {
        read_summed(&self.0, slot)
    }
}

/// An in-memory data path that records what was written, for control-plane tests.
#[derive(Default, Debug)]
pub struct FakeDataPlane {
    pub config: LbConfig,
    pub vips: StdHashMap<VipKey, VipInfo>,
    pub vip_addrs: StdHashMap<VipAddrKey, u32>,
    /// The VIP filter's words that are not zero.
    pub vip_filter: StdHashMap<u32, u64>,
    /// VIP number -> its slot, where not cleared.
    pub vip_slots: StdHashMap<u32, VipSlot>,
    /// The DSR filter's words that are not zero.
    pub dsr_filter: StdHashMap<u32, u64>,
    pub backends: StdHashMap<u32, Backend>,
    pub rings: StdHashMap<u32, u32>,
    pub ring_writes: usize,
    pub counters: StdHashMap<u32, Counter>,
    pub nat_targets: StdHashMap<u32, NatTarget>,
    pub nat_config: NatConfig,
    /// Refuse one map write once this many more have succeeded (a kernel that says no
    /// half-way through an apply); the writes after it succeed again.
    pub fail_one_write_after: Option<usize>,
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

/// A filter word in a fake's map of the words that are not zero.
fn set_word(words: &mut StdHashMap<u32, u64>, word: u32, bits: u64) {
    if bits == 0 {
        words.remove(&word);
    } else {
        words.insert(word, bits);
    }
}

impl FakeDataPlane {
    fn write(&mut self, map: &'static str) -> Result<()> {
        match &mut self.fail_one_write_after {
            Some(0) => {
                self.fail_one_write_after = None;
                Err(DataPlaneError::Map {
                    map,
                    source: MapError::KeyNotFound,
                })
            }
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl DataPlane for FakeDataPlane {
    fn set_config(&mut self, cfg: &LbConfig) -> Result<()> {
        self.write(names::MAP_CONFIG)?;
        self.config = *cfg;
        Ok(())
    }
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        self.write(names::MAP_VIP_SLOTS)?;
        self.vip_slots.remove(&info.vip_num);
        self.write(names::MAP_VIPS)?;
        self.vips.insert(*key, *info);
        self.write(names::MAP_VIP_SLOTS)?;
        let slot = VipSlot {
            key: *key,
            info: *info,
        };
        self.vip_slots.insert(info.vip_num, slot);
        Ok(())
    }
    fn remove_vip(&mut self, key: &VipKey, vip_num: u32) -> Result<()> {
        self.write(names::MAP_VIP_SLOTS)?;
        self.vip_slots.remove(&vip_num);
        self.write(names::MAP_VIPS)?;
        self.vips.remove(key);
        Ok(())
    }
    fn set_vip_addr(&mut self, key: &VipAddrKey) -> Result<()> {
        self.write(names::MAP_VIP_ADDRS)?;
        self.vip_addrs.insert(*key, 1);
        Ok(())
    }
    fn remove_vip_addr(&mut self, key: &VipAddrKey) -> Result<()> {
        self.write(names::MAP_VIP_ADDRS)?;
        self.vip_addrs.remove(key);
        Ok(())
    }
    fn set_vip_filter_word(&mut self, word: u32, bits: u64) -> Result<()> {
        self.write(names::MAP_VIP_FILTER)?;
        set_word(&mut self.vip_filter, word, bits);
        Ok(())
    }
    fn set_dsr_filter_word(&mut self, word: u32, bits: u64) -> Result<()> {
        self.write(names::MAP_DSR_FILTER)?;
        set_word(&mut self.dsr_filter, word, bits);
        Ok(())
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.write(names::MAP_BACKENDS)?;
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn set_ring_slots(&mut self, vip_num: u32, slots: &[(u32, u32)]) -> Result<()> {
        self.write(names::MAP_RINGS)?;
        for (slot, backend) in slots {
            self.rings.insert(vip_num * MAX_RING_SIZE + slot, *backend);
        }
        self.ring_writes += slots.len();
        Ok(())
    }
    fn counter(&self, slot: u32) -> Result<Counter> {
        Ok(self.counters.get(&slot).copied().unwrap_or_default())
    }
    fn set_nat_target(&mut self, id: u32, target: &NatTarget) -> Result<()> {
        self.write(names::MAP_NAT_BACKENDS)?;
        self.nat_targets.insert(id, *target);
        Ok(())
    }
    fn set_nat_config(&mut self, cfg: &NatConfig) -> Result<()> {
        self.write(names::MAP_NAT_CONFIG)?;
        self.nat_config = *cfg;
        Ok(())
    }
}
