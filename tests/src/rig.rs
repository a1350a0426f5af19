//! The XDP program loaded outside any interface, its maps filled through the agent's
//! own code, run on crafted frames with BPF_PROG_TEST_RUN. Shared by the packet tests
//! and the benchmark.

use std::{net::IpAddr, time::Duration};

use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun, TestRunOptions},
};
use lb_common::{
    CONFIG_F_TRACE, Counter, FAMILY_V4, FlowKey, LbConfig, PROTO_TCP, PersistKey, PersistState,
    TraceEvent, hash::flow_hash,
};
use lb_userspace::{
    config::{BackendSpec, Service},
    dataplane::{DataPlane, FlowStore, MapSizes, OBJECT, ServeSwitch, ServingMap, XdpDataPlane},
    maglev,
    programmer::{BackendView, Programmer, addr_bytes},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];

/// The MAC the rig gives a backend address (the "neighbour table").
pub fn backend_mac(addr: IpAddr) -> [u8; 6] {
    let (b, family) = addr_bytes(addr);
    let last = if family == FAMILY_V4 { b[3] } else { b[15] };
    [0x02, 0xbe, 0, 0, family, last]
}

/// A service whose backends `name-0`, `name-1`, ... have weight 100.
pub fn service(name: &str, vip: &str, port: u16, ring_size: u32, backends: &[&str]) -> Service {
    Service {
        name: name.into(),
        vip: vip.parse().expect("VIP address"),
        port,
        forwarding: Default::default(),
        ring_size,
        persistence_timeout_s: 0,
        health_check: Default::default(),
        backends: backends
            .iter()
            .enumerate()
            .map(|(i, a)| BackendSpec {
                name: format!("{name}-{i}"),
                address: a.parse().expect("backend address"),
                weight: 100,
                backup: false,
                port: None,
            })
            .collect(),
    }
}

/// A TCP flow's key as the program builds it (and hashes it, and keys persistence on it).
pub fn flow_key(src: (IpAddr, u16), dst: (IpAddr, u16)) -> FlowKey {
    let (s, family) = addr_bytes(src.0);
    let (d, _) = addr_bytes(dst.0);
    FlowKey {
        src: s,
        dst: d,
        sport_be: src.1.to_be(),
        dport_be: dst.1.to_be(),
        proto: PROTO_TCP,
        family,
        _pad: [0; 2],
    }
}

/// The persistence table's entry for `key`, if any.
pub fn persist_entry(store: &mut dyn FlowStore, key: &PersistKey) -> Option<PersistState> {
    store
        .read_persist()
        .expect("read PERSIST")
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Every backend resolved, healthy, enabled, at its configured weight.
pub fn all_up(_: &Service, b: &BackendSpec) -> BackendView {
    BackendView {
        mac: Some(backend_mac(b.address)),
        healthy: true,
        enabled: true,
        weight: b.weight,
    }
}

/// `all_up`, with every backend at the LB's own MAC: a frame forwarded in DSR comes
/// out as it went in, so each of BPF_PROG_TEST_RUN's repeated runs (which take the
/// previous run's output) finds a frame to our MAC and takes the same path as the first.
pub fn looped(s: &Service, b: &BackendSpec) -> BackendView {
    BackendView {
        mac: Some(LB_MAC),
        ..all_up(s, b)
    }
}

pub struct Rig {
    pub dp: XdpDataPlane,
    /// Serving from the start; a test turns it off to play a backup host.
    pub serving: ServingMap,
    pub programmer: Programmer,
    pub services: Vec<Service>,
    /// The packet trace's ring buffer (absent in the untraced build).
    pub trace: Option<RingBuf<MapData>>,
    /// The config entry as last written (flood guard, trace flag).
    config: LbConfig,
}

/// One BPF_PROG_TEST_RUN: verdict, output frame, average time per run.
pub struct Run {
    pub verdict: u32,
    pub output: Vec<u8>,
    pub per_run: Duration,
}

impl Rig {
    /// Loads the program (root needed) and programs `services` with LB_MAC as ours.
    pub fn new(services: Vec<Service>) -> anyhow::Result<Self> {
        Self::new_sized(services, MapSizes::default())
    }

    /// As `new`, with flow tables of `sizes`.
    pub fn new_sized(services: Vec<Service>, sizes: MapSizes) -> anyhow::Result<Self> {
        Self::new_object(OBJECT, services, sizes)
    }

    /// As `new_sized`, with another build of the program (the bench's untraced one).
    pub fn new_object(
        object: &[u8],
        services: Vec<Service>,
        sizes: MapSizes,
    ) -> anyhow::Result<Self> {
        Self::new_object_with(object, services, sizes, &all_up)
    }

    /// As `new_object`, each backend as `view` says.
    pub fn new_object_with(
        object: &[u8],
        services: Vec<Service>,
        sizes: MapSizes,
        view: &dyn Fn(&Service, &BackendSpec) -> BackendView,
    ) -> anyhow::Result<Self> {
        Self::with_dataplane(XdpDataPlane::load_object(object, sizes)?, services, view)
    }

    /// As `new_object_with`, on a data plane already loaded (with pinned maps, say).
    pub fn with_dataplane(
        mut dp: XdpDataPlane,
        services: Vec<Service>,
        view: &dyn Fn(&Service, &BackendSpec) -> BackendView,
    ) -> anyhow::Result<Self> {
        let mut programmer = Programmer::new();
        programmer.apply(&mut dp, &services, view)?;
        let config = LbConfig {
            mac: LB_MAC,
            flags: 0,
            new_flows_per_cpu_s: 0,
        };
        dp.set_config(&config)?;
        let trace = dp.take_trace_ring();
        let mut serving = dp
            .take_serve_switch()
            .ok_or_else(|| anyhow::anyhow!("the data plane has no serving switch"))?;
        serving.set_serving(true, 0)?;
        Ok(Self {
            dp,
            serving,
            programmer,
            services,
            trace,
            config,
        })
    }

    pub fn apply(&mut self, services: Vec<Service>) -> anyhow::Result<()> {
        self.apply_with(services, &all_up)
    }

    /// Programs `services` with each backend as `view` says.
    pub fn apply_with(
        &mut self,
        services: Vec<Service>,
        view: &dyn Fn(&Service, &BackendSpec) -> BackendView,
    ) -> anyhow::Result<()> {
        self.programmer.apply(&mut self.dp, &services, view)?;
        self.services = services;
        Ok(())
    }

    /// Runs `program` on `input` `repeat` times (the kernel feeds each run the previous
    /// run's output).
    pub fn run_program(
        &mut self,
        program: &'static str,
        input: &[u8],
        repeat: u32,
    ) -> anyhow::Result<Run> {
        let program = self.dp.program_mut(program)?;
        let mut out = vec![0u8; input.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let result = program.test_run(opts)?;
        out.truncate(result.data_size_out as usize);
        Ok(Run {
            verdict: result.return_value,
            output: out,
            per_run: result.duration,
        })
    }

    /// The backend id and address the Maglev ring of `s` gives `flow`, computed from the
    /// pure Maglev table apart from the program (a backend of weight 0 takes no slot).
    pub fn ring_choice(&self, s: &Service, flow: &FlowKey) -> (u32, IpAddr) {
        let id_of = |b: &BackendSpec| self.programmer.backend_id(&s.name, b.address).expect("id");
        let members: Vec<maglev::Member> = s
            .backends
            .iter()
            .map(|b| maglev::Member {
                identity: b.address.to_string(),
                id: id_of(b),
                weight: b.weight,
            })
            .collect();
        let ring = maglev::build(&members, s.ring_size);
        let id = ring[(flow_hash(flow) % s.ring_size) as usize];
        let b = s.backends.iter().find(|b| id_of(b) == id).expect("member");
        (id, b.address)
    }

    /// A client port, among the thousand from `from`, whose flow the ring of `s` does
    /// NOT give to `not`: a new connection from it shows whether persistence, not the
    /// ring, decided.
    pub fn port_off(&self, s: &Service, client: IpAddr, not: u32, from: u16) -> u16 {
        let vip = (s.vip, s.port);
        (from..from + 1000)
            .find(|p| self.ring_choice(s, &flow_key((client, *p), vip)).0 != not)
            .expect("some port the ring sends elsewhere")
    }

    /// One run of the balancer program.
    pub fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        let r = self
            .run_program(lb_common::names::PROG_LB, input, 1)
            .expect("BPF_PROG_TEST_RUN");
        (r.verdict, r.output)
    }

    /// Sets the flood guard (new flows recorded per CPU per second; 0: off).
    pub fn set_flood_guard(&mut self, per_cpu_s: u32) {
        self.config.new_flows_per_cpu_s = per_cpu_s;
        self.dp.set_config(&self.config).expect("config map");
    }

    /// Sets or clears the program's trace flag, as the agent does for `lbctl trace`.
    pub fn set_tracing(&mut self, on: bool) {
        if on {
            self.config.flags |= CONFIG_F_TRACE;
        } else {
            self.config.flags &= !CONFIG_F_TRACE;
        }
        self.dp.set_config(&self.config).expect("config map");
    }

    /// Every event the program wrote to its trace ring buffer since the last call.
    pub fn trace_events(&mut self) -> Vec<TraceEvent> {
        let ring = self
            .trace
            .as_mut()
            .expect("this build has a trace ring buffer");
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            events.push(lb_userspace::trace::decode(&item).expect("a whole trace event"));
        }
        events
    }

    pub fn counter(&self, slot: u32) -> Counter {
        self.dp.counter(slot).expect("counter")
    }

    /// The program's connection table, by key (see `Flows`).
    pub fn flows(&mut self) -> anyhow::Result<Flows> {
        let meta: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(self.map(lb_common::names::MAP_META)?)?;
        let (seed, buckets) =
            lb_common::flowtab::table_of(meta.get(&lb_common::layout::meta::FLOW_TABLE, 0)?);
        let table = aya::maps::Array::try_from(self.map(lb_common::names::MAP_FLOWS)?)?;
        Ok(Flows {
            table,
            seed,
            buckets,
        })
    }

    /// The balancer program's map named `name`, through a descriptor of its own: for a
    /// test that changes a map behind the agent's back.
    pub fn map(&mut self, name: &str) -> anyhow::Result<aya::maps::Map> {
        let program = self.dp.program_mut(lb_common::names::PROG_LB)?;
        let ids = program
            .info()?
            .map_ids()?
            .ok_or_else(|| anyhow::anyhow!("the kernel lists no maps of the program"))?;
        for id in ids {
            let info = aya::maps::MapInfo::from_id(id)?;
            if info.name_as_str() == Some(name) {
                let data = MapData::from_id(id)?;
                return Ok(match info.map_type()? {
                    aya::maps::MapType::Hash => aya::maps::Map::HashMap(data),
                    aya::maps::MapType::LruHash => aya::maps::Map::LruHashMap(data),
                    aya::maps::MapType::Array => aya::maps::Map::Array(data),
                    other => anyhow::bail!("map {name}: type {other:?} not handled here"),
                });
            }
        }
        anyhow::bail!("the program has no map {name}")
    }
}

/// Moves the calling thread onto one CPU, so that BPF_PROG_TEST_RUN runs there: the
/// flood guard and the connection table's LRU lists are per CPU.
pub fn run_on_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let r = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            r,
            0,
            "sched_setaffinity to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Online CPUs (not this thread's affinity, which `run_on_cpu` narrows).
pub fn cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// The program's connection table (`lb_common::flowtab`) as a test reads and writes it:
/// by key, in the bucket the program looks in.
pub struct Flows {
    table: aya::maps::Array<aya::maps::MapData, lb_common::flowtab::FlowSlot>,
    seed: u32,
    buckets: u32,
}

impl Flows {
    /// The first slot of the bucket `key` belongs in.
    pub fn bucket_of(&self, key: &lb_common::FlowKey) -> u32 {
        lb_common::flowtab::bucket_of(key, self.seed, self.buckets)
    }

    /// Whether the table holds the flow.
    pub fn holds(&self, key: &lb_common::FlowKey) -> anyhow::Result<bool> {
        Ok(self.slot_of(key)?.is_some())
    }

    /// The slot that holds `key` (its index and content), or `None`.
    fn slot_of(
        &self,
        key: &lb_common::FlowKey,
    ) -> anyhow::Result<Option<(u32, lb_common::flowtab::FlowSlot)>> {
        Ok(lb_common::flowtab::find_slot(
            key,
            self.seed,
            self.buckets,
            |i| self.table.get(&i, 0),
        )?)
    }

    /// The slot of a flow the table holds; an error if it does not.
    fn held(
        &self,
        key: &lb_common::FlowKey,
    ) -> anyhow::Result<(u32, lb_common::flowtab::FlowSlot)> {
        self.slot_of(key)?
            .ok_or_else(|| anyhow::anyhow!("no entry for {key:?}"))
    }

    /// The flow's entry; an error if the table does not hold it.
    pub fn get(&self, key: &lb_common::FlowKey) -> anyhow::Result<lb_common::FlowState> {
        Ok(self.held(key)?.1.state)
    }

    /// Rewrites the entry of a flow the table holds.
    pub fn set(
        &mut self,
        key: &lb_common::FlowKey,
        state: lb_common::FlowState,
    ) -> anyhow::Result<()> {
        let (i, _) = self.held(key)?;
        let slot = lb_common::flowtab::FlowSlot { key: *key, state };
        self.table.set(i, slot, 0)?;
        Ok(())
    }
}
