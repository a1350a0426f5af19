//! The network-namespace lab: a client, one or two load balancers and N backends, each
//! in its own network namespace, joined by veth pairs to a bridge that lives in a
//! namespace of its own.
//!
//! ```text
//!            ns <p>-br: br0 (no address)
//!      vcl ---------- vlb ----------- vlb2 ---------- vb1 ... vbN
//!       |              |               |               |
//!   <p>-cl eth0    <p>-lb eth0    <p>-lb2 eth0    <p>-b1 eth0 ... <p>-bN eth0
//!   10.77.0.2      10.77.0.3      10.77.0.4       10.77.0.11 ... 10.77.0.(10+N)
//!   fd00:77::2     fd00:77::3     fd00:77::4      fd00:77::11 ...
//! ```
//!
//! The VIPs (10.77.0.100, fd00:77::100) sit on the backends' `lo` (direct server
//! return); the LB namespaces hold no VIP, their XDP program answers ARP / NDP for them.
//! The root namespace holds no lab address and sends no lab traffic; no namespace has a
//! default route. `Node::Lb2` exists only with `LabBuilder::second_lb`, for VRRP
//! failover, and `Node::Lb3` (10.77.0.5) only with `LabBuilder::third_lb`.
//!
//! A routed lab (`LabBuilder::routed`, for `[announce]`) puts the client behind a
//! router instead of on the bridge:
//!
//! ```text
//!   <p>-cl eth0 10.78.0.2 ---- eth1 10.78.0.1  <p>-rt  eth0 10.77.0.1 ---- br0 ...
//! ```
//!
//! The client routes `ROUTED_VIPS4` (10.99.0.0/24) via the router; the router learns
//! its route to `ROUTED_VIP4` from the LB hosts over BGP (`bird`: the shipped BIRD
//! configs, `Lab::spawn_bird`) and spreads flows over them (ECMP, hashed on ports);
//! the backends hold `ROUTED_VIP4` on `lo` and route `CLIENT_NET4` via the router.
//!
//! One module a concern, one API for one or two LB hosts, all of it re-exported here:
//! - `topology`: `Node`, the addresses (`addr4`, `addr6`), the namespaces and their
//!   guards, `in_ns` / `try_in_ns`, `Lab::exec` / `run` / `mac_of` / `neigh` /
//!   `diagnostics`.
//! - `config`: the agent's config as typed values (`ConfigFile` and its sections,
//!   `Service`, `VrrpSection`), serialised with `toml`: `Lab::config_file(node, ..)`,
//!   and `Lab::config` / `config_on` for the TOML text.
//! - `processes`: `Lab::spawn`, `Lab::spawn_agent_on(node, config)` (`spawn_agent` for
//!   `Node::Lb`) and its `AgentGuard` (`reload`, `status`, `kill`, `log`), `lbctl*_on`
//!   (and the `Node::Lb` shorthands `lbctl*`), `wait_status_on`, `wait_backend`,
//!   `run_bounded`, `Streaming`.
//! - `servers`: the backends' greeting / echo servers (`Lab::start_servers`).
//! - `probes`: single connections from the client (`ask_backend`, `converse`), the
//!   prober (`start_probe`) and `probe_gap`.
//! - `load`: `start_load`, `spread` and `syn_flood`, with `Load`, `Attempt`, `Spread`
//!   and `Flood`.
//! - `bird`: `Lab::spawn_bird` and its `BirdGuard` (`birdc`, `log`), the shipped
//!   configs with the lab's values (`bird_lb_config`, `bird_router_config`,
//!   `set_defines`), and the router's next hops (`next_hops`, `wait_next_hops`).
//!
//! An agent is ready when its control socket answers `lbctl --json status`; a reload is
//! confirmed by `lbctl reload`'s answer; what an agent did is asked of `lbctl status` /
//! `backend list`. Its log is kept for diagnostics (printed when a test fails) and for
//! tests about what it logs.
//!
//! Every namespace and every process is owned by a guard whose `Drop` removes or kills
//! it, so a failing or panicking test leaves nothing behind. Processes (`ProcessGuard`,
//! `AgentGuard`) borrow the `Lab`, so the borrow checker makes them end before the
//! namespaces do.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use lb_tests::lab::{Lab, Node, Service, SERVICE_PORT, VIP4, VrrpSection};
//! let lab = Lab::builder().backends(3).second_lb(true).build()?;
//! lab.start_servers(SERVICE_PORT)?;
//! let services = [Service::new("web", VIP4, SERVICE_PORT).backends(1..=3)];
//! let _lb = lab.spawn_agent(&lab.config_on(Node::Lb, "native", &services, Some(&VrrpSection::new(51, 150))))?;
//! let _lb2 = lab.spawn_agent_on(Node::Lb2, &lab.config_on(Node::Lb2, "native", &services, Some(&VrrpSection::new(51, 100))))?;
//! let (took, _) = lab.wait_status_on(Node::Lb, "master", std::time::Duration::from_secs(3), |s| s.serving)?;
//! println!("lb serving after {took:?}");
//! let spread = lab.spread((VIP4, SERVICE_PORT).into(), 300, std::time::Duration::from_secs(30));
//! println!("{}", spread.table());
//! # Ok(()) }
//! ```

mod bird;
mod config;
mod load;
mod probes;
mod processes;
mod servers;
mod topology;

use std::{
    collections::HashMap,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};

pub use bird::{BIRD_LB_CONF, BIRD_ROUTER_CONF, BirdGuard, set_defines};
pub use config::{
    AgentSection, AnnounceSection, BackendSection, ConfigFile, HealthCheckSection, Service,
    ServiceSection, SyncSection, VrrpSection,
};
pub use load::{Attempt, Flood, Load, Spread};
pub use probes::{Conversation, ProbeGap, probe_gap};
pub use processes::{
    AgentGuard, ProcessGuard, Streaming, bin_path, parse_backends_json, parse_status_json,
    run_bounded,
};
pub use topology::{
    Node, addr_like, addr4, addr6, client_net_addresses, in_ns, parse_mac, try_in_ns,
};

use servers::Server;
use topology::Netns;

/// The IPv4 VIP every lab service uses unless a test says otherwise.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// A routed lab's VIP (`LabBuilder::routed`): outside every subnet of the lab, so the
/// client reaches it through the router and the router through a BGP route.
pub const ROUTED_VIP4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
/// Where the routed VIPs are; the client routes it via the router.
pub const ROUTED_VIPS4: &str = "10.99.0.0/24";
/// The client's subnet in a routed lab; backends route it via the router.
pub const CLIENT_NET4: &str = "10.78.0.0/24";
/// The IPv6 VIP (`fd00:77::100`).
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);
/// The port the lab's services and backend servers use by default.
pub const SERVICE_PORT: u16 = 8080;
/// Connect and read timeout of `ask_backend`.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one `lbctl` run may take before the lab kills it (`Lab::lbctl`).
pub const LBCTL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `Lab::wait_backend` and `Lab::wait_status_on` ask lbctl.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

const MAX_BACKENDS: usize = 50;

/// Lab numbers within this process; with the pid they make the name prefix unique.
static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A temporary directory for configs and logs; `Drop` removes it.
struct TempDir(PathBuf);

/// The lab's own bpffs, in its temporary directory.
const BPFFS: &str = "bpffs";

fn mount_bpffs(at: &Path) -> Result<()> {
    fs::create_dir(at).with_context(|| format!("creating {}", at.display()))?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let target = c(&at.to_string_lossy());
    let bpf = c("bpf");
    // SAFETY: valid C strings, no data.
    let r = unsafe {
        libc::mount(
            bpf.as_ptr(),
            target.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    ensure!(
        r == 0,
        "mounting bpffs on {}: {}",
        at.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // The lab's bpffs, if mounted: its pins go with it.
        let bpffs = self.0.join(BPFFS);
        if let Ok(c) = std::ffi::CString::new(bpffs.to_string_lossy().as_bytes()) {
            // SAFETY: a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("lab: could not remove {}: {e}", self.0.display());
        }
    }
}

/// Builds a `Lab`. Defaults: 3 backends, IPv6 addresses on.
#[derive(Clone, Debug)]
pub struct LabBuilder {
    backends: usize,
    ipv6: bool,
    second_lb: bool,
    third_lb: bool,
    routed: bool,
    stock_backends: bool,
    routed_backend: bool,
}

impl LabBuilder {
    /// Whether to add a third load balancer, `Node::Lb3` (10.77.0.5, fd00:77::5), set
    /// up like the second. Off by default.
    pub fn third_lb(mut self, on: bool) -> Self {
        self.third_lb = on;
        self
    }

    /// Whether the client sits behind a router (`Node::Router`, 10.77.0.1 on the
    /// bridge, 10.78.0.1 on the client's own veth) instead of on the bridge: the
    /// client is 10.78.0.2 and routes `ROUTED_VIPS4` via the router; the backends hold
    /// `ROUTED_VIP4` on `lo` too and route `CLIENT_NET4` via the router. The router
    /// forwards and hashes ECMP on ports; its routes to the VIPs come from BGP
    /// (`Lab::spawn_bird`). IPv4 only on the client's side. Off by default.
    pub fn routed(mut self, on: bool) -> Self {
        self.routed = on;
        self
    }

    /// Adds `Node::Routed`, a stock backend in another subnet (10.79.0.0/24) behind
    /// `Node::Router` (added to the bridge if the lab is not routed already), for NAT. Off by default.
    pub fn routed_backend(mut self, on: bool) -> Self {
        self.routed_backend = on;
        self
    }

    /// Whether to add a second load balancer, `Node::Lb2` (10.77.0.4, fd00:77::4), on
    /// the same bridge, set up like the first (checksum offload off, `xdp_pass` on its
    /// veth peer `vlb2`). Off by default.
    pub fn second_lb(mut self, on: bool) -> Self {
        self.second_lb = on;
        self
    }

    /// Backends as they come (for NAT): no VIP on `lo`, no ARP sysctls. Off by default
    /// (the DSR set-up).
    pub fn stock_backends(mut self, on: bool) -> Self {
        self.stock_backends = on;
        self
    }

    /// Number of backend namespaces, 1 to 50.
    pub fn backends(mut self, n: usize) -> Self {
        self.backends = n;
        self
    }

    /// Whether to add the `fd00:77::/64` addresses and the IPv6 VIP.
    pub fn ipv6(mut self, on: bool) -> Self {
        self.ipv6 = on;
        self
    }

    /// Creates the namespaces, links and addresses, and attaches `xdp_pass` to each
    /// LB's veth peer. On error, whatever was made so far is removed again.
    pub fn build(self) -> Result<Lab> {
        ensure!(
            (1..=MAX_BACKENDS).contains(&self.backends),
            "a lab has 1 to {MAX_BACKENDS} backends, not {}",
            self.backends
        );
        let prefix = format!(
            "lbt{}x{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&prefix);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = TempDir(dir);
        mount_bpffs(&dir.0.join(BPFFS))?;
        let mut lab = Lab {
            prefix,
            backends: self.backends,
            ipv6: self.ipv6,
            servers: Mutex::new(HashMap::new()),
            second_lb: self.second_lb,
            third_lb: self.third_lb,
            routed: self.routed,
            stock_backends: self.stock_backends,
            routed_backend: self.routed_backend,
            xdp_pass: Vec::new(),
            namespaces: Vec::new(),
            dir,
            files: AtomicUsize::new(0),
        };
        lab.setup()
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }
}

/// A running lab. See the module documentation for the layout.
pub struct Lab {
    prefix: String,
    backends: usize,
    ipv6: bool,
    /// TCP servers, by node and port.
    servers: Mutex<HashMap<(Node, u16), Server>>,
    /// Whether `Node::Lb2` exists.
    second_lb: bool,
    /// Whether `Node::Lb3` exists.
    third_lb: bool,
    /// Whether the client sits behind `Node::Router`.
    routed: bool,
    /// Backends without the DSR set-up (`LabBuilder::stock_backends`).
    stock_backends: bool,
    /// Whether `Node::Router` and `Node::Routed` exist.
    routed_backend: bool,
    /// `xdp_pass` on each LB's veth peer; a link lives as long as its value.
    xdp_pass: Vec<aya::Ebpf>,
    namespaces: Vec<Netns>,
    dir: TempDir,
    /// Numbers the files written into `dir`.
    files: AtomicUsize,
}

impl Lab {
    pub fn builder() -> LabBuilder {
        LabBuilder {
            backends: 3,
            ipv6: true,
            second_lb: false,
            third_lb: false,
            routed: false,
            stock_backends: false,
            routed_backend: false,
        }
    }

    /// The name prefix of this lab's namespaces (`lbt<pid>x<n>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn backend_count(&self) -> usize {
        self.backends
    }

    pub fn has_ipv6(&self) -> bool {
        self.ipv6
    }

    /// Whether the lab has `Node::Lb2`.
    pub fn has_second_lb(&self) -> bool {
        self.second_lb
    }

    /// The lab's temporary directory (configs, logs, the control sockets).
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Writes `key` to the file `name` in the lab's directory, mode 0600 from its
    /// creation on (the agent refuses key files others can read): a `[sync] key_file`
    /// or `[vrrp] auth_key_file`.
    pub fn key_file(&self, name: &str, key: &[u8]) -> Result<PathBuf> {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let path = self.dir().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(key)?;
        Ok(path)
    }

    /// The bpffs the lab mounted for its agents' pins (`bpffs_dir_of`).
    pub fn bpffs(&self) -> PathBuf {
        self.dir.0.join(BPFFS)
    }

    /// A new file name in the lab's temporary directory.
    fn new_file(&self, stem: &str, ext: &str) -> PathBuf {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        self.dir.0.join(format!("{stem}{n}.{ext}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes borrow the lab and are gone already; then servers, the XDP links,
        // the namespaces (bridge last) and the files.
        self.servers
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.xdp_pass.clear();
        // Agents leave their program attached and their maps pinned for the next one:
        // removing the pins detaches the programs and frees the maps.
        for node in self.lbs() {
            let dir = self.bpffs_dir_of(node);
            if let Err(e) = lb_userspace::pins::remove(&dir, "eth0") {
                eprintln!("lab: removing the pins under {}: {e}", dir.display());
            }
        }
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
    }
}
