//! Turns the validated services into map contents. It remembers what it wrote, so an
//! update writes only the difference: changed ring slots, new or changed backends, VIPs
//! that came or went.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Instant,
};

use lb_common::{
    BACKEND_F_NEW_FLOWS, BACKEND_F_VALID, Backend, FAMILY_V4, FAMILY_V6, MAX_BACKENDS, MAX_VIPS,
    NO_BACKEND, NatTarget, PROTO_TCP, VIP_F_NAT, VipAddrKey, VipInfo, VipKey, filter,
};

use crate::{
    config::{BackendId, BackendSpec, Forwarding, Service},
    dataplane::{DataPlane, DataPlaneError},
    flows::RingSet,
    maglev,
    numbering::{BackendNumber, Numbering, VipNumber},
};

/// An address as the maps store it: IPv4 in the first 4 bytes.
pub fn addr_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

pub fn vip_key(vip: IpAddr, port: u16) -> VipKey {
    let (addr, family) = addr_bytes(vip);
    VipKey {
        addr,
        port_be: port.to_be(),
        proto: PROTO_TCP,
        family,
    }
}

/// The VIP and port of a VIP key (the inverse of `vip_key`).
pub fn vip_of(key: &VipKey) -> (IpAddr, u16) {
    let ip = if key.family == FAMILY_V4 {
        IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    } else {
        IpAddr::from(key.addr)
    };
    (ip, u16::from_be(key.port_be))
}

/// What the data path translates a backend's flows to: its address and port for a NAT
/// service, nothing (zero) for DSR.
pub fn nat_target(service: &Service, backend: &BackendSpec) -> NatTarget {
    if service.forwarding != Forwarding::Nat {
        return NatTarget::default();
    }
    let (addr, family) = addr_bytes(backend.address);
    NatTarget {
        addr,
        port_be: backend.port_in(service).to_be(),
        family,
        _pad: 0,
    }
}

pub fn vip_addr_key(vip: IpAddr) -> VipAddrKey {
    let (addr, family) = addr_bytes(vip);
    VipAddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

/// The VIP address filter (`lb_common::filter`) for a set of VIP addresses: its words
/// that are not zero.
pub fn filter_words<'a>(addrs: impl IntoIterator<Item = &'a VipAddrKey>) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    for a in addrs {
        let (word, mask) = filter::word_and_mask(filter::bit(&a.addr, a.family));
        *words.entry(word).or_insert(0) |= mask;
    }
    words
}

/// The words to write to turn filter `from` into filter `to`; with `all`, every word
/// either has, changed or not (the map may hold neither, after a refused write).
fn filter_changes(
    from: &BTreeMap<u32, u64>,
    to: &BTreeMap<u32, u64>,
    all: bool,
) -> Vec<(u32, u64)> {
    let words: BTreeSet<u32> = from.keys().chain(to.keys()).copied().collect();
    words
        .into_iter()
        .filter_map(|w| {
            let new = to.get(&w).copied().unwrap_or(0);
            (all || from.get(&w).copied().unwrap_or(0) != new).then_some((w, new))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
    #[error("no free VIP slot (at most {MAX_VIPS})")]
    TooManyVips,
    #[error("no free backend id (at most {MAX_BACKENDS})")]
    TooManyBackends,
}

/// What the agent knows of one backend right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendView {
    /// From the neighbour table; `None` until resolved.
    pub mac: Option<[u8; 6]>,
    /// Passing its health checks.
    pub healthy: bool,
    /// Not disabled by an operator.
    pub enabled: bool,
    /// Weight in effect.
    pub weight: u32,
}

impl BackendView {
    /// Can take new flows (if it is of the tier that serves).
    pub fn usable(&self) -> bool {
        self.mac.is_some() && self.healthy && self.enabled && self.weight > 0
    }

    /// Established flows may keep going to it: known and healthy. Disabled and weight-0
    /// backends keep their flows (drain); down ones lose them to the ring.
    pub fn forwards(&self) -> bool {
        self.mac.is_some() && self.healthy
    }
}

/// Which backends take new flows: the usable primaries, or, while there is none, the
/// usable backups (nginx's `backup`).
pub fn ring_members(
    service: &Service,
    view: &dyn Fn(&Service, &BackendSpec) -> BackendView,
) -> Vec<usize> {
    let usable = |backup: bool| -> Vec<usize> {
        service
            .backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.backup == backup && view(service, b).usable())
            .map(|(i, _)| i)
            .collect()
    };
    let primaries = usable(false);
    if primaries.is_empty() {
        usable(true)
    } else {
        primaries
    }
}

/// What one `apply` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub vips_added: usize,
    pub vips_removed: usize,
    pub ring_slots_written: usize,
    pub backends_written: usize,
    /// (service, backend) left out of the ring because their MAC is unknown.
    pub unresolved: Vec<(String, String)>,
}

/// What the data path holds for one VIP.
#[derive(Debug)]
struct VipState {
    vip_num: u32,
    flags: u32,
    /// Shared with the flow scanner's `RingSet`: handing it over copies no slot.
    ring: Arc<Vec<u32>>,
    persistence_s: u32,
}

/// Everything one apply will write, computed before anything is written: the plan of a
/// reload either is complete or fails here, with the maps untouched.
#[derive(Debug, Default)]
pub struct Plan {
    gone_vips: Vec<VipKey>,
    vips: Vec<PlannedVip>,
    backends: Vec<(u32, Backend)>,
    /// NAT translations of backends (zero for DSR backends), where they changed.
    nat_targets: Vec<(u32, NatTarget)>,
    /// Ids handed out by this plan, and ids it takes back from the retired.
    new_ids: Vec<(BackendId, u32)>,
    names: Vec<(u32, (String, String))>,
    /// Backends that left the config in this plan: their ids retire (flows finish).
    retiring: Vec<u32>,
    vip_addrs: HashSet<VipAddrKey>,
    /// The addresses with a DSR service (`DSR_FILTER`).
    dsr_addrs: HashSet<VipAddrKey>,
    pub unresolved: Vec<(String, String)>,
}

#[derive(Debug)]
struct PlannedVip {
    key: VipKey,
    vip_num: u32,
    ring: Arc<Vec<u32>>,
    ring_size: u32,
    persistence_s: u32,
    /// `VIP_F_*`: NAT or DSR.
    flags: u32,
    added: bool,
    /// Its ring (or its forwarding) differs from the one in the map.
    changed: bool,
}

impl Plan {
    /// Whether committing it writes any map entry.
    pub fn writes_anything(&self) -> bool {
        !self.gone_vips.is_empty()
            || !self.backends.is_empty()
            || !self.nat_targets.is_empty()
            || !self.retiring.is_empty()
            || self.vips.iter().any(|v| v.added || v.changed)
    }

    /// The rings and forwarding backends the data path will have once this plan is
    /// committed (what the flow scanner pins against).
    pub fn ring_set(&self, programmer: &Programmer) -> RingSet {
        let mut set = programmer.ring_set();
        for k in &self.gone_vips {
            if let Some(v) = programmer.vips.get(k) {
                set.rings.remove(&v.vip_num);
            }
        }
        for v in &self.vips {
            set.rings.insert(v.vip_num, v.ring.clone());
            set.persistence.insert(v.vip_num, v.persistence_s);
        }
        for (id, b) in &self.backends {
            if b.flags & BACKEND_F_VALID != 0 {
                set.forwarding.insert(*id);
            } else {
                set.forwarding.remove(id);
            }
        }
        set
    }
}

#[derive(Debug, Default)]
pub struct Programmer {
    vips: HashMap<VipKey, VipState>,
    free_vip_nums: BTreeSet<u32>,
    /// (service, backend address) -> backend id. Ids of backends that left the config
    /// stay assigned (retired) until their flows have ended, so established flows keep
    /// forwarding; then `reclaim` frees them for reuse.
    backend_ids: HashMap<BackendId, u32>,
    backend_names: HashMap<u32, (String, String)>,
    backends: HashMap<u32, Backend>,
    nat_targets: HashMap<u32, NatTarget>,
    /// Ids of backends no longer in the config, still forwarding their flows, with
    /// when they left.
    retired: BTreeMap<u32, Instant>,
    free_ids: BTreeSet<u32>,
    next_id: u32,
    vip_addrs: HashSet<VipAddrKey>,
    /// The addresses with a DSR service, as the DSR filter holds them.
    dsr_addrs: HashSet<VipAddrKey>,
    /// A commit failed half-way: the maps may differ from what we recorded, so the next
    /// commit writes everything again.
    dirty: bool,
}

impl Programmer {
    pub fn new() -> Self {
        Self {
            free_vip_nums: (0..MAX_VIPS).collect(),
            ..Default::default()
        }
    }

    pub fn vip_num(&self, vip: IpAddr, port: u16) -> Option<u32> {
        self.vips.get(&vip_key(vip, port)).map(|v| v.vip_num)
    }

    pub fn backend_id(&self, service: &str, address: IpAddr) -> Option<u32> {
        let id = BackendId {
            service: service.to_string(),
            address,
        };
        self.backend_ids.get(&id).copied()
    }

    /// (service, backend name) of a backend id.
    pub fn backend_name(&self, id: u32) -> Option<&(String, String)> {
        self.backend_names.get(&id)
    }

    /// Ids of backends that left the config and whose flows may still be running.
    pub fn retired(&self) -> impl Iterator<Item = u32> + '_ {
        self.retired.keys().copied()
    }

    /// The VIP numbers and backend ids given out (retired ids included), sorted.
    pub fn numbering(&self) -> Numbering {
        let mut n = Numbering {
            vips: self
                .vips
                .iter()
                .map(|(key, v)| {
                    let (vip, port) = vip_of(key);
                    VipNumber {
                        vip,
                        port,
                        vip_num: v.vip_num,
                    }
                })
                .collect(),
            backends: self
                .backend_ids
                .iter()
                .map(|(b, id)| BackendNumber {
                    service: b.service.clone(),
                    address: b.address,
                    id: *id,
                })
                .collect(),
        };
        n.vips.sort();
        n.backends.sort();
        n
    }

    /// The numbering once `plan` is committed, if the plan gives out a number that is
    /// not in `numbering()` yet (to be saved before the commit); None otherwise.
    pub fn numbering_after(&self, plan: &Plan) -> Option<Numbering> {
        if plan.new_ids.is_empty() && !plan.vips.iter().any(|v| v.added) {
            return None;
        }
        let mut n = self.numbering();
        for key in &plan.gone_vips {
            let (vip, port) = vip_of(key);
            n.vips.retain(|x| (x.vip, x.port) != (vip, port));
        }
        n.backends
            .extend(plan.new_ids.iter().map(|(b, id)| BackendNumber {
                service: b.service.clone(),
                address: b.address,
                id: *id,
            }));
        for v in plan.vips.iter().filter(|v| v.added) {
            let (vip, port) = vip_of(&v.key);
            n.vips.retain(|x| (x.vip, x.port) != (vip, port));
            n.vips.push(VipNumber {
                vip,
                port,
                vip_num: v.vip_num,
            });
        }
        n.vips.sort();
        n.backends.sort();
        Some(n)
    }

    /// Takes over the numbering an earlier agent gave the maps this programmer is about
    /// to write (pinned maps), before its first plan: the same backend keeps its id, so
    /// the flows recorded under it keep their backend; the same VIP keeps its number. A
    /// VIP no longer in the config is removed by the next commit; a backend no longer in
    /// it retires (its flows finish, then its id is freed). Rings are written whole.
    pub fn adopt(&mut self, numbering: &Numbering) {
        for v in &numbering.vips {
            if v.vip_num >= MAX_VIPS {
                continue;
            }
            self.free_vip_nums.remove(&v.vip_num);
            self.vips.insert(
                vip_key(v.vip, v.port),
                VipState {
                    vip_num: v.vip_num,
                    flags: 0,
                    ring: Arc::new(Vec::new()),
                    persistence_s: 0,
                },
            );
            self.vip_addrs.insert(vip_addr_key(v.vip));
        }
        for b in &numbering.backends {
            if b.id >= MAX_BACKENDS {
                continue;
            }
            let identity = BackendId {
                service: b.service.clone(),
                address: b.address,
            };
            self.backend_ids.insert(identity, b.id);
            self.next_id = self.next_id.max(b.id + 1);
        }
        let used: HashSet<u32> = self.backend_ids.values().copied().collect();
        self.free_ids = (0..self.next_id).filter(|id| !used.contains(id)).collect();
    }

    /// What the data path does with new flows now, for the flow scanner.
    pub fn ring_set(&self) -> RingSet {
        RingSet {
            rings: self
                .vips
                .values()
                .map(|v| (v.vip_num, v.ring.clone()))
                .collect(),
            forwarding: self
                .backends
                .iter()
                .filter(|(_, b)| b.flags & BACKEND_F_VALID != 0)
                .map(|(id, _)| *id)
                .collect(),
            names: Arc::new(crate::flows::Names {
                backends: self
                    .backend_ids
                    .iter()
                    .map(|(b, id)| (*id, b.clone()))
                    .collect(),
                ids: self.backend_ids.clone(),
                vips: self.vips.iter().map(|(k, v)| (*k, v.vip_num)).collect(),
            }),
            persistence: self
                .vips
                .values()
                .map(|v| (v.vip_num, v.persistence_s))
                .collect(),
        }
    }

    /// Computes everything that making the data path serve exactly `services` (each
    /// backend as `view` sees it) will write. Changes nothing.
    pub fn plan(
        &self,
        services: &[Service],
        view: &dyn Fn(&Service, &BackendSpec) -> BackendView,
    ) -> Result<Plan, ProgramError> {
        let mut plan = Plan::default();
        let wanted: HashSet<VipKey> = services.iter().map(|s| vip_key(s.vip, s.port)).collect();
        let mut free_vip_nums = self.free_vip_nums.clone();
        // Departures first, so their VIP numbers are free for arrivals.
        for (key, state) in &self.vips {
            if !wanted.contains(key) {
                plan.gone_vips.push(*key);
                free_vip_nums.insert(state.vip_num);
            }
        }
        let mut ids: HashMap<BackendId, u32> = HashMap::new();
        let mut free_ids = self.free_ids.clone();
        let mut next_id = self.next_id;
        for service in services {
            let mut service_ids = Vec::with_capacity(service.backends.len());
            let in_ring = ring_members(service, view);
            for (i, b) in service.backends.iter().enumerate() {
                let identity = service.backend_id(b);
                let id = match ids.get(&identity).or(self.backend_ids.get(&identity)) {
                    Some(id) => *id,
                    None => {
                        let id = match free_ids.pop_first() {
                            Some(id) => id,
                            None if next_id < MAX_BACKENDS => {
                                next_id += 1;
                                next_id - 1
                            }
                            None => return Err(ProgramError::TooManyBackends),
                        };
                        plan.new_ids.push((identity.clone(), id));
                        id
                    }
                };
                ids.insert(identity, id);
                service_ids.push(id);
                plan.names
                    .push((id, (service.name.clone(), b.name.clone())));
                let target = nat_target(service, b);
                if self.dirty || self.nat_targets.get(&id).copied().unwrap_or_default() != target {
                    plan.nat_targets.push((id, target));
                }
                let v = view(service, b);
                let Some(mac) = v.mac else {
                    plan.unresolved.push((service.name.clone(), b.name.clone()));
                    continue;
                };
                let mut flags = if v.forwards() { BACKEND_F_VALID } else { 0 };
                // Persistence may send a client's new connection only to a ring member.
                if in_ring.contains(&i) {
                    flags |= BACKEND_F_NEW_FLOWS;
                }
                let entry = Backend {
                    mac,
                    _pad: [0; 2],
                    flags,
                };
                if self.dirty || self.backends.get(&id) != Some(&entry) {
                    plan.backends.push((id, entry));
                }
            }
            let members: Vec<maglev::Member> = in_ring
                .into_iter()
                .map(|i| {
                    let b = &service.backends[i];
                    maglev::Member {
                        identity: b.address.to_string(),
                        id: service_ids[i],
                        weight: view(service, b).weight,
                    }
                })
                .collect();
            let ring = Arc::new(maglev::build(&members, service.ring_size));
            let key = vip_key(service.vip, service.port);
            let (vip_num, added) = match self.vips.get(&key) {
                Some(state) if !plan.gone_vips.contains(&key) => (state.vip_num, false),
                _ => (
                    free_vip_nums.pop_first().ok_or(ProgramError::TooManyVips)?,
                    true,
                ),
            };
            let flags = match service.forwarding {
                Forwarding::Dsr => 0,
                Forwarding::Nat => VIP_F_NAT,
            };
            let changed = self.dirty
                || self.vips.get(&key).is_none_or(|state| {
                    state.ring != ring
                        || state.persistence_s != service.persistence_timeout_s
                        || state.flags != flags
                });
            plan.vips.push(PlannedVip {
                key,
                vip_num,
                ring,
                ring_size: service.ring_size,
                persistence_s: service.persistence_timeout_s,
                flags,
                added,
                changed,
            });
        }
        for (identity, id) in &self.backend_ids {
            if !ids.contains_key(identity) && !self.retired.contains_key(id) {
                plan.retiring.push(*id);
            }
            // A backend that left the config forwards its flows but takes no new ones,
            // not even a persistent client's.
            if !ids.contains_key(identity)
                && let Some(b) = self.backends.get(id)
                && b.flags & BACKEND_F_NEW_FLOWS != 0
            {
                let entry = Backend {
                    flags: b.flags & !BACKEND_F_NEW_FLOWS,
                    ..*b
                };
                plan.backends.push((*id, entry));
            }
        }
        plan.vip_addrs = services.iter().map(|s| vip_addr_key(s.vip)).collect();
        plan.dsr_addrs = services
            .iter()
            .filter(|s| s.forwarding == Forwarding::Dsr)
            .map(|s| vip_addr_key(s.vip))
            .collect();
        Ok(plan)
    }

    /// Writes a plan made by `plan` on this programmer's current state. Rings are
    /// complete before their VIP becomes visible. If a write fails, the maps may hold
    /// part of the plan: the programmer then rewrites everything on its next commit,
    /// so committing the previous plan again restores the previous state.
    pub fn commit(
        &mut self,
        dp: &mut dyn DataPlane,
        plan: Plan,
    ) -> Result<ApplyReport, ProgramError> {
        let dirty = std::mem::replace(&mut self.dirty, true);
        let mut report = ApplyReport {
            unresolved: plan.unresolved,
            ..Default::default()
        };
        for key in &plan.gone_vips {
            if let Some(state) = self.vips.get(key) {
                dp.remove_vip(key, state.vip_num)?;
            }
            if let Some(state) = self.vips.remove(key) {
                self.free_vip_nums.insert(state.vip_num);
            }
            report.vips_removed += 1;
        }
        for (identity, id) in plan.new_ids {
            self.free_ids.remove(&id);
            self.next_id = self.next_id.max(id + 1);
            self.retired.remove(&id);
            self.backend_ids.insert(identity, id);
        }
        for (id, name) in plan.names {
            self.retired.remove(&id);
            self.backend_names.insert(id, name);
        }
        let now = Instant::now();
        self.retired
            .extend(plan.retiring.into_iter().map(|id| (id, now)));
        // Translations before the entries that make backends usable.
        for (id, target) in plan.nat_targets {
            dp.set_nat_target(id, &target)?;
            self.nat_targets.insert(id, target);
        }
        for (id, entry) in plan.backends {
            dp.set_backend(id, &entry)?;
            self.backends.insert(id, entry);
            report.backends_written += 1;
        }
        for v in plan.vips {
            let old = match self.vips.get(&v.key) {
                Some(state) if !dirty && state.ring.len() == v.ring.len() => state.ring.as_slice(),
                _ => &[],
            };
            let changed = maglev::diff(old, &v.ring);
            dp.set_ring_slots(v.vip_num, &changed)?;
            report.ring_slots_written += changed.len();
            if v.added {
                self.free_vip_nums.remove(&v.vip_num);
                report.vips_added += 1;
            }
            self.vips.insert(
                v.key,
                VipState {
                    vip_num: v.vip_num,
                    flags: v.flags,
                    ring: v.ring,
                    persistence_s: v.persistence_s,
                },
            );
            // The VIP becomes visible only once its ring is complete.
            let info = VipInfo {
                vip_num: v.vip_num,
                ring_size: v.ring_size,
                flags: v.flags,
                persistence_s: v.persistence_s,
            };
            dp.set_vip(&v.key, &info)?;
        }
        let current = if dirty {
            HashSet::new()
        } else {
            self.vip_addrs.clone()
        };
        // The filter lets through every address in VIP_ADDRS at all times: it covers
        // the old and the new addresses while the map changes, then the new ones only.
        let before = filter_words(&current);
        let both = filter_words(self.vip_addrs.union(&plan.vip_addrs));
        for (word, bits) in filter_changes(&before, &both, false) {
            dp.set_vip_filter_word(word, bits)?;
        }
        for a in plan.vip_addrs.difference(&current) {
            dp.set_vip_addr(a)?;
        }
        for a in self.vip_addrs.difference(&plan.vip_addrs) {
            dp.remove_vip_addr(a)?;
        }
        for (word, bits) in filter_changes(&both, &filter_words(&plan.vip_addrs), false) {
            dp.set_vip_filter_word(word, bits)?;
        }
        self.vip_addrs = plan.vip_addrs;
        // Which segments look in the connection table first: a speed-up only, so any
        // order of writes is safe (a segment not asked first is asked later, as before).
        let before = filter_words(&self.dsr_addrs);
        let after = filter_words(&plan.dsr_addrs);
        for (word, bits) in filter_changes(&before, &after, dirty) {
            dp.set_dsr_filter_word(word, bits)?;
        }
        self.dsr_addrs = plan.dsr_addrs;
        self.dirty = false;
        Ok(report)
    }

    /// Makes the data path serve exactly `services`, each backend as `view` sees it.
    pub fn apply(
        &mut self,
        dp: &mut dyn DataPlane,
        services: &[Service],
        view: &dyn Fn(&Service, &BackendSpec) -> BackendView,
    ) -> Result<ApplyReport, ProgramError> {
        let plan = self.plan(services, view)?;
        self.commit(dp, plan)
    }

    /// Frees the ids of retired backends that no active flow uses any more, as a flow
    /// scan started at `scanned_at` saw them (`active`); only backends that retired
    /// before that scan qualify. Their entries stop forwarding; the ids go to the next
    /// new backends. Returns the ids freed.
    pub fn reclaim(
        &mut self,
        dp: &mut dyn DataPlane,
        active: &HashMap<u32, u64>,
        scanned_at: Instant,
    ) -> Result<Vec<u32>, ProgramError> {
        let done: Vec<u32> = self
            .retired
            .iter()
            .filter(|(id, since)| **since < scanned_at && active.get(id).copied().unwrap_or(0) == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in &done {
            dp.set_backend(*id, &Backend::default())?;
            dp.set_nat_target(*id, &NatTarget::default())?;
            self.retired.remove(id);
            self.backends.remove(id);
            self.nat_targets.remove(id);
            self.backend_names.remove(id);
            self.backend_ids.retain(|_, v| v != id);
            self.free_ids.insert(*id);
        }
        Ok(done)
    }

    /// Whether any backend takes new flows for this VIP (tracking asks often: it stops
    /// at the first filled slot).
    pub fn serves(&self, vip: IpAddr, port: u16) -> bool {
        self.vips
            .get(&vip_key(vip, port))
            .is_some_and(|s| s.ring.iter().any(|b| *b != NO_BACKEND))
    }

    /// Backend ids currently in some ring (for tests and status).
    pub fn ring_members(&self, vip: IpAddr, port: u16) -> BTreeSet<u32> {
        self.vips
            .get(&vip_key(vip, port))
            .map(|s| {
                s.ring
                    .iter()
                    .copied()
                    .filter(|b| *b != NO_BACKEND)
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::BackendSpec, dataplane::FakeDataPlane};

    fn service(name: &str, vip: &str, backends: &[(&str, &str, u32)]) -> Service {
        Service {
            name: name.into(),
            vip: vip.parse().unwrap(),
            port: 80,
            ring_size: 1009,
            persistence_timeout_s: 0,
            forwarding: Default::default(),
            health_check: Default::default(),
            backends: backends
                .iter()
                .map(|(n, a, w)| BackendSpec {
                    name: n.to_string(),
                    address: a.parse().unwrap(),
                    weight: *w,
                    backup: false,
                    port: None,
                })
                .collect(),
        }
    }

    fn mac_of(ip: IpAddr) -> [u8; 6] {
        let (b, _) = addr_bytes(ip);
        [2, 0, b[0], b[1], b[2], b[3]]
    }

    fn all_up(_: &Service, b: &BackendSpec) -> BackendView {
        BackendView {
            mac: Some(mac_of(b.address)),
            healthy: true,
            enabled: true,
            weight: b.weight,
        }
    }

    fn members(p: &Programmer, s: &Service) -> BTreeSet<u32> {
        p.ring_members(s.vip, s.port)
    }

    fn id(p: &Programmer, s: &Service, backend: &str) -> u32 {
        let b = s.backends.iter().find(|b| b.name == backend).unwrap();
        p.backend_id(&s.name, b.address).unwrap()
    }

    #[test]
    fn first_apply_writes_everything_then_nothing() {
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let s = vec![service(
            "web",
            "192.0.2.10",
            &[("a", "192.0.2.21", 100), ("b", "192.0.2.22", 100)],
        )];
        let r = p.apply(&mut dp, &s, &all_up).unwrap();
        assert_eq!(r.ring_slots_written, 1009);
        assert_eq!(r.vips_added, 1);
        assert_eq!(dp.vips.len(), 1);
        assert_eq!(dp.vip_addrs.len(), 1);
        assert_eq!(dp.backends.len(), 2);
        let r = p.apply(&mut dp, &s, &all_up).unwrap();
        assert_eq!(r, ApplyReport::default());
    }

    #[test]
    fn removing_a_backend_writes_only_its_slots_and_keeps_its_entry() {
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let three = vec![service(
            "web",
            "192.0.2.10",
            &[
                ("a", "192.0.2.21", 100),
                ("b", "192.0.2.22", 100),
                ("c", "192.0.2.23", 100),
            ],
        )];
        p.apply(&mut dp, &three, &all_up).unwrap();
        let vip_num = p.vip_num("192.0.2.10".parse().unwrap(), 80).unwrap();
        let before = dp.ring(vip_num, 1009);
        let c = p.backend_id("web", "192.0.2.23".parse().unwrap()).unwrap();
        let owned_by_c = before.iter().filter(|b| **b == c).count();

        let two = vec![service(
            "web",
            "192.0.2.10",
            &[("a", "192.0.2.21", 100), ("b", "192.0.2.22", 100)],
        )];
        dp.ring_writes = 0;
        let r = p.apply(&mut dp, &two, &all_up).unwrap();
        let after = dp.ring(vip_num, 1009);
        assert_eq!(r.ring_slots_written, maglev::diff(&before, &after).len());
        assert_eq!(dp.ring_writes, r.ring_slots_written);
        assert!(r.ring_slots_written >= owned_by_c);
        assert!(!after.contains(&c));
        // Established flows to c keep forwarding: its entry stays valid, but it takes no
        // new connection, not even a persistent client's.
        assert_eq!(dp.backends[&c].flags, BACKEND_F_VALID);
        let a = p.backend_id("web", "192.0.2.21".parse().unwrap()).unwrap();
        assert_eq!(dp.backends[&a].flags, BACKEND_F_VALID | BACKEND_F_NEW_FLOWS);
    }

    #[test]
    fn a_plan_writes_nothing_until_committed() {
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let s = vec![service("web", "192.0.2.10", &[("a", "192.0.2.21", 100)])];
        let plan = p.plan(&s, &all_up).unwrap();
        assert!(plan.writes_anything());
        assert!(dp.vips.is_empty() && dp.backends.is_empty() && dp.rings.is_empty());
        assert_eq!(p.vip_num(s[0].vip, 80), None);
        p.commit(&mut dp, plan).unwrap();
        assert_eq!(dp.vips.len(), 1);
        assert!(!p.plan(&s, &all_up).unwrap().writes_anything());
    }

    #[test]
    fn removed_backends_ids_are_reused_once_their_flows_have_ended() {
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let two = vec![service(
            "web",
            "192.0.2.10",
            &[("a", "192.0.2.21", 100), ("b", "192.0.2.22", 100)],
        )];
        p.apply(&mut dp, &two, &all_up).unwrap();
        let b = p.backend_id("web", "192.0.2.22".parse().unwrap()).unwrap();
        let one = vec![service("web", "192.0.2.10", &[("a", "192.0.2.21", 100)])];
        p.apply(&mut dp, &one, &all_up).unwrap();
        assert_eq!(p.retired().collect::<Vec<_>>(), vec![b]);
        assert_eq!(
            dp.backends[&b].flags, BACKEND_F_VALID,
            "its flows still forward"
        );

        // A scan from before the removal proves nothing; one after with active flows keeps it.
        let before = Instant::now() - std::time::Duration::from_secs(60);
        assert!(
            p.reclaim(&mut dp, &HashMap::new(), before)
                .unwrap()
                .is_empty()
        );
        let active = HashMap::from([(b, 3)]);
        assert!(
            p.reclaim(&mut dp, &active, Instant::now())
                .unwrap()
                .is_empty()
        );
        // No flow left: freed, its entry no longer forwards, and the next new backend gets it.
        assert_eq!(
            p.reclaim(&mut dp, &HashMap::new(), Instant::now()).unwrap(),
            vec![b]
        );
        assert_eq!(dp.backends[&b], Backend::default());
        let again = vec![service(
            "web",
            "192.0.2.10",
            &[("a", "192.0.2.21", 100), ("c", "192.0.2.23", 100)],
        )];
        p.apply(&mut dp, &again, &all_up).unwrap();
        assert_eq!(p.backend_id("web", "192.0.2.23".parse().unwrap()), Some(b));
        assert_eq!(p.backend_id("web", "192.0.2.22".parse().unwrap()), None);
        assert_eq!(dp.backends[&b].flags, BACKEND_F_VALID | BACKEND_F_NEW_FLOWS);
    }

    #[test]
    fn a_programmer_that_adopts_the_numbering_writes_what_the_maps_hold() {
        // A history a fresh programmer would not repeat: a removed, its id freed and
        // given to c; then a VIP removed and another added.
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let web = |b: &[(&str, &str, u32)]| service("web", "192.0.2.10", b);
        let api = service("api", "192.0.2.11", &[("x", "192.0.2.31", 100)]);
        let other = service("other", "192.0.2.12", &[("y", "192.0.2.32", 100)]);
        let ab = web(&[("a", "192.0.2.21", 100), ("b", "192.0.2.22", 100)]);
        p.apply(&mut dp, &[ab, api.clone()], &all_up).unwrap();
        p.apply(
            &mut dp,
            &[web(&[("b", "192.0.2.22", 100)]), api.clone()],
            &all_up,
        )
        .unwrap();
        p.reclaim(&mut dp, &HashMap::new(), Instant::now()).unwrap();
        let bc = web(&[("b", "192.0.2.22", 100), ("c", "192.0.2.23", 100)]);
        let plan = p.plan(&[bc.clone(), other.clone()], &all_up).unwrap();
        let saved = p.numbering_after(&plan).expect("new numbers given out");
        p.commit(&mut dp, plan).unwrap();
        assert_eq!(saved, p.numbering());
        let current = [bc, other];
        assert!(!p.plan(&current, &all_up).unwrap().writes_anything());
        assert_eq!(p.numbering_after(&p.plan(&current, &all_up).unwrap()), None);

        // The next agent, over the same maps: same ids, same VIP numbers, same rings.
        let mut next = Programmer::new();
        next.adopt(&saved);
        let mut dp2 = FakeDataPlane::default();
        next.apply(&mut dp2, &current, &all_up).unwrap();
        assert_eq!(next.numbering(), p.numbering());
        for s in &current {
            for b in &s.backends {
                let id = p.backend_id(&s.name, b.address).unwrap();
                assert_eq!(next.backend_id(&s.name, b.address), Some(id));
                assert_eq!(dp2.backends[&id], dp.backends[&id]);
            }
            let n = p.vip_num(s.vip, s.port).unwrap();
            assert_eq!(next.vip_num(s.vip, s.port), Some(n));
            assert_eq!(dp2.ring(n, s.ring_size), dp.ring(n, s.ring_size));
        }

        // A fresh programmer would have numbered them otherwise: that is what adopt avoids.
        let mut fresh = Programmer::new();
        fresh
            .apply(&mut FakeDataPlane::default(), &current, &all_up)
            .unwrap();
        assert_ne!(fresh.numbering(), p.numbering());

        // A VIP gone from the config meanwhile is removed; backends gone retire (c, and
        // the other service's y, beside api's x, which had retired already).
        let mut later = Programmer::new();
        later.adopt(&saved);
        let mut dp3 = FakeDataPlane::default();
        let only_b = [web(&[("b", "192.0.2.22", 100)])];
        let r = later.apply(&mut dp3, &only_b, &all_up).unwrap();
        assert_eq!(r.vips_removed, 1);
        let c = p.backend_id("web", "192.0.2.23".parse().unwrap()).unwrap();
        let y = p
            .backend_id("other", "192.0.2.32".parse().unwrap())
            .unwrap();
        let x = p.backend_id("api", "192.0.2.31".parse().unwrap()).unwrap();
        let mut want = vec![c, x, y];
        want.sort();
        assert_eq!(later.retired().collect::<Vec<_>>(), want);
    }

    #[test]
    fn a_backend_back_before_its_id_is_freed_keeps_it() {
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let two = vec![service(
            "web",
            "192.0.2.10",
            &[("a", "192.0.2.21", 100), ("b", "192.0.2.22", 100)],
        )];
        p.apply(&mut dp, &two, &all_up).unwrap();
        let b = p.backend_id("web", "192.0.2.22".parse().unwrap()).unwrap();
        p.apply(&mut dp, &two[..0], &all_up).unwrap();
        p.apply(&mut dp, &two, &all_up).unwrap();
        assert_eq!(p.backend_id("web", "192.0.2.22".parse().unwrap()), Some(b));
        assert_eq!(p.retired().count(), 0);
    }

    #[test]
    fn unresolved_backends_stay_out_of_the_ring() {
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let s = vec![service(
            "web",
            "192.0.2.10",
            &[("a", "192.0.2.21", 100), ("b", "192.0.2.22", 100)],
        )];
        let only_a = |svc: &Service, b: &BackendSpec| BackendView {
            mac: (b.name == "a").then(|| mac_of(b.address)),
            ..all_up(svc, b)
        };
        let r = p.apply(&mut dp, &s, &only_a).unwrap();
        assert_eq!(r.unresolved, vec![("web".to_string(), "b".to_string())]);
        let a = p.backend_id("web", "192.0.2.21".parse().unwrap()).unwrap();
        assert_eq!(
            p.ring_members("192.0.2.10".parse().unwrap(), 80),
            BTreeSet::from([a])
        );
    }

    #[test]
    fn vips_come_and_go() {
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let a = service("a", "192.0.2.10", &[("x", "192.0.2.21", 100)]);
        let b = service("b", "2001:db8::10", &[("y", "2001:db8::21", 100)]);
        p.apply(&mut dp, &[a.clone(), b.clone()], &all_up).unwrap();
        assert_eq!(dp.vips.len(), 2);
        assert_eq!(dp.vip_addrs.len(), 2);
        let r = p.apply(&mut dp, &[b], &all_up).unwrap();
        assert_eq!(r.vips_removed, 1);
        assert_eq!(dp.vips.len(), 1);
        assert_eq!(dp.vip_addrs.len(), 1);
        assert!(
            dp.vip_addrs
                .contains_key(&vip_addr_key("2001:db8::10".parse().unwrap()))
        );
        // The freed VIP number is reused, and its whole window is rewritten.
        let r = p.apply(&mut dp, &[a], &all_up).unwrap();
        assert_eq!(r.ring_slots_written, 1009);
    }

    /// Every slot the fake holds is its VIP number's VIPS entry, key and value.
    fn slots_match_vips(dp: &FakeDataPlane) -> bool {
        dp.vip_slots.iter().all(|(num, slot)| {
            slot.info.vip_num == *num && dp.vips.get(&slot.key) == Some(&slot.info)
        })
    }

    #[test]
    fn vip_slots_name_only_services_in_vips_and_the_dsr_filter_only_dsr_addresses() {
        let a = service("a", "192.0.2.10", &[("x", "192.0.2.21", 100)]);
        let mut nat = service("n", "192.0.2.12", &[("y", "192.0.2.22", 100)]);
        nat.forwarding = Forwarding::Nat;
        let c = service("c", "2001:db8::10", &[("z", "2001:db8::21", 100)]);
        let mut c_nat = c.clone();
        c_nat.forwarding = Forwarding::Nat;
        let steps: [Vec<Service>; 5] = [
            vec![a.clone(), nat.clone()],
            vec![nat.clone(), c.clone()],
            vec![c_nat.clone()],
            vec![a.clone(), c.clone()],
            vec![],
        ];
        // As for the filter: every state an apply passes through after a refusal.
        through_every_refusal(
            &steps,
            |i| i == 1 || i == 2,
            |dp, _, i, after| {
                assert!(slots_match_vips(dp), "step {i}, {after:?}");
                if after.is_some() {
                    return;
                }
                let s = &steps[i];
                assert_eq!(
                    dp.vip_slots.len(),
                    s.len(),
                    "step {i}: one slot per service"
                );
                let dsr: Vec<VipAddrKey> = s
                    .iter()
                    .filter(|s| s.forwarding == Forwarding::Dsr)
                    .map(|s| vip_addr_key(s.vip))
                    .collect();
                let held: BTreeMap<u32, u64> =
                    dp.dsr_filter.iter().map(|(w, b)| (*w, *b)).collect();
                assert_eq!(
                    held,
                    filter_words(&dsr),
                    "step {i}: the DSR addresses' bits"
                );
                if s.is_empty() {
                    assert!(dp.vip_slots.is_empty() && dp.dsr_filter.is_empty());
                }
            },
        );
    }

    /// Applies `steps` in order on a fresh fake, with one map write refused after n
    /// writes in the steps `failing` names, for n = 0, 1, ... until no write is refused.
    /// A refusal leaves the maps as they were after n writes: `check` sees that state
    /// (`after`: `Some(n)`), and the state after each step (`None`), a refused step being
    /// applied again whole. So `check` sees every state an apply passes through.
    fn through_every_refusal(
        steps: &[Vec<Service>],
        failing: impl Fn(usize) -> bool,
        check: impl Fn(&FakeDataPlane, &Programmer, usize, Option<usize>),
    ) {
        for n in 0.. {
            let mut dp = FakeDataPlane::default();
            let mut p = Programmer::new();
            let mut failed = false;
            for (i, s) in steps.iter().enumerate() {
                dp.fail_one_write_after = failing(i).then_some(n);
                if p.apply(&mut dp, s, &all_up).is_err() {
                    failed = true;
                    check(&dp, &p, i, Some(n));
                    dp.fail_one_write_after = None;
                    p.apply(&mut dp, s, &all_up).unwrap();
                }
                check(&dp, &p, i, None);
            }
            if !failed {
                break;
            }
        }
    }

    /// Every address in the fake's VIP_ADDRS has its bit in the fake's filter.
    fn filter_covers_vip_addrs(dp: &FakeDataPlane) -> bool {
        dp.vip_addrs.keys().all(|a| {
            let (word, mask) = filter::word_and_mask(filter::bit(&a.addr, a.family));
            dp.vip_filter.get(&word).is_some_and(|w| w & mask != 0)
        })
    }

    #[test]
    fn the_filter_lets_every_vip_address_through_after_every_write() {
        let a = service("a", "192.0.2.10", &[("x", "192.0.2.21", 100)]);
        // Same low 16 bits as a's address: one bit for two VIPs.
        let b = service("b", "198.51.2.10", &[("y", "192.0.2.22", 100)]);
        let c = service("c", "2001:db8::10", &[("z", "2001:db8::21", 100)]);
        let steps: [Vec<Service>; 4] = [
            vec![a.clone(), b.clone()],
            vec![b.clone(), c.clone()],
            vec![c.clone()],
            vec![],
        ];
        through_every_refusal(
            &steps,
            |i| i == 1,
            |dp, p, i, after| {
                assert!(filter_covers_vip_addrs(dp), "step {i}, {after:?}");
                if after.is_some() {
                    return;
                }
                let want = filter_words(&p.vip_addrs);
                let held: BTreeMap<u32, u64> =
                    dp.vip_filter.iter().map(|(w, b)| (*w, *b)).collect();
                assert_eq!(held, want, "step {i}: exactly the VIP addresses' bits");
                if steps[i].is_empty() {
                    assert!(dp.vip_filter.is_empty(), "no VIP, no bit");
                }
            },
        );
        // a and b share a bit; removing a keeps it for b.
        let both = filter_words(
            &[vip_addr_key(a.vip), vip_addr_key(b.vip)]
                .into_iter()
                .collect::<Vec<_>>(),
        );
        assert_eq!(both.len(), 1);
        assert_eq!(both.values().next().map(|w| w.count_ones()), Some(1));
    }

    #[test]
    fn keys_are_in_network_order() {
        let k = vip_key("192.0.2.10".parse().unwrap(), 80);
        assert_eq!(&k.addr[..4], &[192, 0, 2, 10]);
        assert_eq!(k.port_be.to_ne_bytes(), [0, 80]);
        assert_eq!(k.family, FAMILY_V4);
    }

    fn with_backup() -> Service {
        let mut s = service(
            "web",
            "192.0.2.10",
            &[
                ("a", "192.0.2.21", 100),
                ("b", "192.0.2.22", 100),
                ("spare", "192.0.2.29", 100),
            ],
        );
        s.backends[2].backup = true;
        s
    }

    #[test]
    fn backups_serve_only_while_no_primary_is_usable() {
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let s = with_backup();
        p.apply(&mut dp, std::slice::from_ref(&s), &all_up).unwrap();
        assert_eq!(
            members(&p, &s),
            BTreeSet::from([id(&p, &s, "a"), id(&p, &s, "b")])
        );

        // One primary down: the other serves, not the backup.
        let a_down = |svc: &Service, b: &BackendSpec| BackendView {
            healthy: b.name != "a",
            ..all_up(svc, b)
        };
        p.apply(&mut dp, std::slice::from_ref(&s), &a_down).unwrap();
        assert_eq!(members(&p, &s), BTreeSet::from([id(&p, &s, "b")]));

        // Both primaries out (one down, one disabled): the backup serves.
        let none = |svc: &Service, b: &BackendSpec| BackendView {
            healthy: b.name != "a",
            enabled: b.name != "b",
            ..all_up(svc, b)
        };
        p.apply(&mut dp, std::slice::from_ref(&s), &none).unwrap();
        assert_eq!(members(&p, &s), BTreeSet::from([id(&p, &s, "spare")]));

        // A primary back: new flows go to it; the backup keeps forwarding its flows.
        p.apply(&mut dp, std::slice::from_ref(&s), &a_down).unwrap();
        assert_eq!(members(&p, &s), BTreeSet::from([id(&p, &s, "b")]));
        assert_eq!(dp.backends[&id(&p, &s, "spare")].flags, BACKEND_F_VALID);
    }

    #[test]
    fn down_backends_lose_their_flows_disabled_ones_keep_them() {
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let s = with_backup();
        let view = |svc: &Service, b: &BackendSpec| BackendView {
            healthy: b.name != "a",
            enabled: b.name != "b",
            ..all_up(svc, b)
        };
        p.apply(&mut dp, std::slice::from_ref(&s), &view).unwrap();
        assert_eq!(
            dp.backends[&id(&p, &s, "a")].flags,
            0,
            "down: its flows go back to the ring"
        );
        assert_eq!(
            dp.backends[&id(&p, &s, "b")].flags,
            BACKEND_F_VALID,
            "disabled: drains, takes no new connection (persistent or not)"
        );
        assert_eq!(
            dp.backends[&id(&p, &s, "spare")].flags,
            BACKEND_F_VALID | BACKEND_F_NEW_FLOWS,
            "the backup serving: takes new connections"
        );
    }

    #[test]
    fn nothing_usable_leaves_an_empty_ring() {
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let s = with_backup();
        let all_down = |svc: &Service, b: &BackendSpec| BackendView {
            healthy: false,
            ..all_up(svc, b)
        };
        p.apply(&mut dp, std::slice::from_ref(&s), &all_down)
            .unwrap();
        assert!(members(&p, &s).is_empty());
        assert!(!p.serves(s.vip, s.port));
        let vip_num = p.vip_num(s.vip, s.port).unwrap();
        assert!(
            dp.ring(vip_num, s.ring_size)
                .iter()
                .all(|b| *b == NO_BACKEND)
        );
    }

    #[test]
    fn weights_from_the_view_shape_the_ring() {
        let mut dp = FakeDataPlane::default();
        let mut p = Programmer::new();
        let s = service(
            "web",
            "192.0.2.10",
            &[("a", "192.0.2.21", 100), ("b", "192.0.2.22", 100)],
        );
        let heavy_b = |svc: &Service, b: &BackendSpec| BackendView {
            weight: if b.name == "b" { 300 } else { 100 },
            ..all_up(svc, b)
        };
        p.apply(&mut dp, std::slice::from_ref(&s), &heavy_b)
            .unwrap();
        let vip_num = p.vip_num(s.vip, s.port).unwrap();
        let ring = dp.ring(vip_num, s.ring_size);
        let b_share =
            ring.iter().filter(|x| **x == id(&p, &s, "b")).count() as f64 / ring.len() as f64;
        assert!((b_share - 0.75).abs() < 0.01, "{b_share}");
        let a_zero = |svc: &Service, b: &BackendSpec| BackendView {
            weight: if b.name == "a" { 0 } else { 100 },
            ..all_up(svc, b)
        };
        p.apply(&mut dp, std::slice::from_ref(&s), &a_zero).unwrap();
        assert_eq!(members(&p, &s), BTreeSet::from([id(&p, &s, "b")]));
    }
}
