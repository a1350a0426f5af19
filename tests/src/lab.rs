//! The network-namespace lab: a client, the load balancer and N backends, each in its
//! own network namespace, joined by veth pairs to a bridge that lives in a namespace of
//! its own.
//!
//! ```text
//!            ns <p>-br: br0 (no address)
//!      vcl ---------- vlb ---------- vb1 ... vbN
//!       |              |              |
//!   <p>-cl eth0    <p>-lb eth0    <p>-b1 eth0 ... <p>-bN eth0
//!   10.77.0.2      10.77.0.3      10.77.0.11 ... 10.77.0.(10+N)
//!   fd00:77::2     fd00:77::3     fd00:77::11 ...
//! ```
//!
//! The VIPs (10.77.0.100, fd00:77::100) sit on the backends' `lo` (direct server
//! return); the LB namespace holds no VIP, its XDP program answers ARP / NDP for them.
//! The root namespace holds no lab address and sends no lab traffic; no namespace has a
//! default route.
//!
//! With `LabBuilder::second_lb`, a second LB (`Node::Lb2`, `<p>-lb2`, 10.77.0.4,
//! fd00:77::4, peer `vlb2`) joins the bridge for VRRP failover tests: `config_on` renders
//! a config with its own control socket and state directory and a `[vrrp]` table
//! (`VrrpSection`), `spawn_agent_on` / `lbctl_status_on` start and ask the agent of
//! either LB, `AgentGuard::kill` sends SIGKILL, and `start_probe` / `probe_gap` measure
//! how long the client could not connect around an event.
//!
//! Every config the lab renders names a control socket and a state directory inside the
//! lab's temporary directory; `lbctl*` run the operator tool against that socket,
//! `wait_backend` polls it, and `start_load` keeps a client opening short connections
//! in the background while a test operates the agent.
//!
//! Every namespace and every process is owned by a guard whose `Drop` removes or kills
//! it, so a failing or panicking test leaves nothing behind. Processes (`ProcessGuard`,
//! `AgentGuard`) borrow the `Lab`, so the borrow checker makes them end before the
//! namespaces do.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use lb_tests::lab::{Lab, Service, SERVICE_PORT, VIP4};
//! let lab = Lab::builder().backends(3).build()?;
//! lab.start_servers(SERVICE_PORT)?;
//! let config = lab.config("native", &[Service::new("web", VIP4, SERVICE_PORT).backends(1..=3)]);
//! let _agent = lab.spawn_agent(&config)?;
//! let spread = lab.spread((VIP4, SERVICE_PORT).into(), 300, std::time::Duration::from_secs(30));
//! println!("{}", spread.table());
//! # Ok(()) }
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    fs::{self, File},
    io::{self, BufRead, BufReader, Read, Write},
    marker::PhantomData,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use lb_userspace::protocol::{self, BackendStatus, Status};

/// The IPv4 VIP every lab service uses unless a test says otherwise.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// The IPv6 VIP (`fd00:77::100`).
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);
/// The port the lab's services and backend servers use by default.
pub const SERVICE_PORT: u16 = 8080;
/// Connect and read timeout of `ask_backend`.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one `lbctl` run may take before the lab kills it (`Lab::lbctl`).
pub const LBCTL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `Lab::wait_backend` asks `lbctl backend list`.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

const AGENT_READY: &str = "lb-agent: ready";
const AGENT_CONTROL_SOCKET: &str = "lb-agent: control socket";
const AGENT_RELOADED: &str = "lb-agent: reloaded";
const AGENT_RELOAD_FAILED: &str = "lb-agent: reload failed";
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(20);
const AGENT_RELOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a process gets to exit after SIGTERM before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// How often idle server threads look at their stop flag.
const SERVER_TICK: Duration = Duration::from_millis(50);
const MAX_BACKENDS: usize = 50;

/// Lab numbers within this process; with the pid they make the name prefix unique.
static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One namespace of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Node {
    /// Holds `br0` and the peers `v<node>` of every other namespace's `eth0`.
    Bridge,
    Client,
    /// The load balancer: where lb-agent runs and `lb_xdp` sits on `eth0`.
    Lb,
    /// The second load balancer (`LabBuilder::second_lb`), 10.77.0.4 / fd00:77::4,
    /// for VRRP failover: the same bridge, `xdp_pass` on its veth peer too.
    Lb2,
    /// Backend `i`, counted from 1.
    Backend(usize),
}

impl Node {
    /// `br`, `cl`, `lb`, `b<i>`: the namespace suffix, the backend's name in configs
    /// and the greeting its servers send.
    pub fn short_name(self) -> String {
        match self {
            Node::Bridge => "br".into(),
            Node::Client => "cl".into(),
            Node::Lb => "lb".into(),
            Node::Lb2 => "lb2".into(),
            Node::Backend(i) => format!("b{i}"),
        }
    }

    /// The last number of the node's addresses (`10.77.0.<n>`, `fd00:77::<n>`).
    fn host_number(self) -> Option<usize> {
        match self {
            Node::Bridge => None,
            Node::Client => Some(2),
            Node::Lb => Some(3),
            Node::Lb2 => Some(4),
            Node::Backend(i) => Some(10 + i),
        }
    }

    /// The name of this node's veth peer inside the bridge namespace.
    fn peer_name(self) -> String {
        format!("v{}", self.short_name())
    }
}

/// The node's IPv4 address, `10.77.0.<n>`. Panics for the bridge, which has none.
pub fn addr4(node: Node) -> Ipv4Addr {
    let n = node
        .host_number()
        .expect("the bridge namespace has no address");
    Ipv4Addr::new(10, 77, 0, n as u8)
}

/// The node's IPv6 address, `fd00:77::<n>` with the same digits as the IPv4 one
/// (backend 1 is `fd00:77::11`). Panics for the bridge.
pub fn addr6(node: Node) -> Ipv6Addr {
    let n = node
        .host_number()
        .expect("the bridge namespace has no address");
    format!("fd00:77::{n}")
        .parse()
        .expect("a valid IPv6 address")
}

/// The node's address in the family of `like`.
pub fn addr_like(node: Node, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => addr4(node).into(),
        IpAddr::V6(_) => addr6(node).into(),
    }
}

/// Where `/var/run/netns/NAME` lives.
fn netns_path(ns: &str) -> PathBuf {
    Path::new("/var/run/netns").join(ns)
}

fn enter_netns(ns: &str) -> io::Result<()> {
    let file = File::open(netns_path(ns))
        .map_err(|e| io::Error::new(e.kind(), format!("opening netns {ns}: {e}")))?;
    // SAFETY: setns on a valid namespace fd; it changes only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("setns into {ns}: {e}")));
    }
    Ok(())
}

/// Runs `f` on a scoped thread that entered network namespace `ns`. Sockets created
/// there stay in `ns` whichever thread uses them later. Panics if the namespace cannot
/// be entered (see `try_in_ns`), and passes on a panic of `f`.
pub fn in_ns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> R {
    thread::scope(|s| {
        let handle = s.spawn(|| {
            enter_netns(ns).unwrap_or_else(|e| panic!("{e}"));
            f()
        });
        handle
            .join()
            .unwrap_or_else(|payload| std::panic::resume_unwind(payload))
    })
}

/// `in_ns` for fallible work: failing to enter the namespace is an error, not a panic.
pub fn try_in_ns<R: Send>(ns: &str, f: impl FnOnce() -> io::Result<R> + Send) -> io::Result<R> {
    thread::scope(|s| {
        let handle = s.spawn(|| {
            enter_netns(ns)?;
            f()
        });
        handle
            .join()
            .unwrap_or_else(|payload| std::panic::resume_unwind(payload))
    })
}

/// Runs a command, fails unless it exits 0, returns its stdout.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Where lab programs find `lb-agent` and the other binaries: `$LB_BIN_DIR` (set by
/// `cargo xtask test`), else next to the running executable or one level up
/// (`target/debug/lb-demo`, `target/debug/deps/lab_dataplane-…`).
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("LB_BIN_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    if let Ok(exe) = std::env::current_exe() {
        dirs.extend(exe.ancestors().skip(1).take(2).map(Path::to_path_buf));
    }
    for dir in &dirs {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "{name} not found (looked in {}). Build it with `cargo build --bins`, or set LB_BIN_DIR \
         to the directory that holds it",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A named network namespace; `Drop` deletes it, and with it every link inside.
struct Netns {
    name: String,
}

impl Netns {
    fn add(name: String) -> Result<Self> {
        ip(&["netns", "add", &name]).with_context(|| format!("creating namespace {name}"))?;
        Ok(Netns { name })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("lab: could not delete namespace {}: {e:#}", self.name);
        }
    }
}

/// A temporary directory for configs and logs; `Drop` removes it.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
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
}

impl LabBuilder {
    /// Whether to add a second load balancer, `Node::Lb2` (10.77.0.4, fd00:77::4), on
    /// the same bridge, set up like the first (checksum offload off, `xdp_pass` on its
    /// veth peer `vlb2`). Off by default.
    pub fn second_lb(mut self, on: bool) -> Self {
        self.second_lb = on;
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

    /// Creates the namespaces, links and addresses, and attaches `xdp_pass` to the LB's
    /// veth peer. On error, whatever was made so far is removed again.
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
        let mut lab = Lab {
            prefix,
            backends: self.backends,
            ipv6: self.ipv6,
            servers: Mutex::new(HashMap::new()),
            xdp_pass: None,
            second_lb: self.second_lb,
            xdp_pass_lb2: None,
            namespaces: Vec::new(),
            dir: TempDir(dir),
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
    /// `xdp_pass` on the LB's veth peer; its link lives as long as this value.
    xdp_pass: Option<aya::Ebpf>,
    /// Whether `Node::Lb2` exists.
    second_lb: bool,
    /// `xdp_pass` on the second LB's veth peer, when there is one.
    xdp_pass_lb2: Option<aya::Ebpf>,
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

    /// Every node of the lab, the bridge first.
    pub fn nodes(&self) -> Vec<Node> {
        let mut nodes = vec![Node::Bridge, Node::Client, Node::Lb];
        if self.second_lb {
            nodes.push(Node::Lb2);
        }
        nodes.extend((1..=self.backends).map(Node::Backend));
        nodes
    }

    /// The network namespace name of `node`, e.g. `lbt1234x0-b2`.
    pub fn ns(&self, node: Node) -> String {
        format!("{}-{}", self.prefix, node.short_name())
    }

    fn setup(&mut self) -> Result<()> {
        for node in self.nodes() {
            self.namespaces.push(Netns::add(self.ns(node))?);
            ip(&["-n", &self.ns(node), "link", "set", "lo", "up"])?;
        }
        let br = self.ns(Node::Bridge);
        ip(&[
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;

        for node in self.nodes().into_iter().skip(1) {
            self.plug(node)?;
        }

        // Native XDP_TX on the LB's veth only delivers when the peer has an XDP program
        // too. aya resolves the interface name in the calling thread's namespace.
        let peer = Node::Lb.peer_name();
        let ebpf = in_ns(&br, || -> Result<aya::Ebpf> {
            let mut ebpf = aya::Ebpf::load(lb_userspace::dataplane::OBJECT)
                .context("loading the XDP object")?;
            let name = lb_common::names::PROG_PASS;
            let program: &mut aya::programs::Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("the XDP object has no program {name}"))?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
            program
                .attach(&peer, aya::programs::XdpMode::Driver)
                .with_context(|| format!("attaching {name} to {peer} (native)"))?;
            Ok(ebpf)
        })?;
        self.xdp_pass = Some(ebpf);
        if self.second_lb {
            self.xdp_pass_lb2 = Some(xdp_pass_on(&br, &Node::Lb2.peer_name())?);
        }
        Ok(())
    }

    /// Gives `node` its `eth0`, plugs the peer into `br0` and sets the addresses.
    fn plug(&self, node: Node) -> Result<()> {
        let ns = self.ns(node);
        let br = self.ns(Node::Bridge);
        let peer = node.peer_name();
        // DAD off before any IPv6 address exists, so addresses work at once.
        self.sysctl(
            node,
            &[
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        // Both ends are created inside their namespaces: nothing appears in the root one.
        ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &peer, "netns",
            &br,
        ])?;
        self.sysctl(node, &["net.ipv6.conf.eth0.accept_dad=0"])?;
        if let Node::Backend(_) = node {
            // The VIP sits on lo: only the LB may answer ARP for it.
            self.sysctl(
                node,
                &[
                    "net.ipv4.conf.all.arp_ignore=1",
                    "net.ipv4.conf.all.arp_announce=2",
                    "net.ipv4.conf.eth0.arp_ignore=1",
                    "net.ipv4.conf.eth0.arp_announce=2",
                ],
            )?;
        }
        // Checksums complete on the wire, as a real NIC would do; native XDP forwarding
        // drops the skb metadata that finishes a veth's partial checksum.
        run(Command::new("ip").args(["netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off"]))?;
        ip(&["-n", &br, "link", "set", &peer, "master", "br0"])?;
        ip(&["-n", &br, "link", "set", &peer, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", addr4(node)),
            "dev",
            "eth0",
        ])?;
        if self.ipv6 {
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/64", addr6(node)),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        if let Node::Backend(_) = node {
            ip(&["-n", &ns, "addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
            if self.ipv6 {
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{VIP6}/128"),
                    "dev",
                    "lo",
                    "nodad",
                ])?;
            }
        }
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn sysctl(&self, node: Node, settings: &[&str]) -> Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns(node), "sysctl", "-q", "-w"])
            .args(settings))?;
        Ok(())
    }

    /// Runs `args` inside `node`'s namespace (`ip netns exec`) and returns its output,
    /// whatever the exit status.
    pub fn exec<S: AsRef<OsStr>>(&self, node: Node, args: &[S]) -> Result<Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(node)])
            .args(args)
            .stdin(Stdio::null());
        cmd.output().with_context(|| format!("running {cmd:?}"))
    }

    /// `exec` that fails unless the command exits 0; returns its stdout.
    pub fn run<S: AsRef<OsStr>>(&self, node: Node, args: &[S]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(node)]).args(args);
        run(&mut cmd)
    }

    /// A new file name in the lab's temporary directory.
    fn new_file(&self, stem: &str, ext: &str) -> PathBuf {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        self.dir.0.join(format!("{stem}{n}.{ext}"))
    }

    /// Starts `args` in `node`'s namespace in the background, stdout and stderr to a log
    /// file (see `ProcessGuard::log`). Dropping the guard stops it.
    pub fn spawn<S: AsRef<OsStr>>(&self, node: Node, args: &[S]) -> Result<ProcessGuard<'_>> {
        let log = self.new_file(&format!("{}-proc", node.short_name()), "log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(node)]).args(args);
        ProcessGuard::spawn(cmd, log)
    }

    // ---- TCP servers ---------------------------------------------------------------

    /// Starts a TCP server in backend `i`'s namespace on `[::]:port`, dual stack (IPv4
    /// and IPv6). Each connection gets the line `b<i>`, then every line it sends comes
    /// back, until EOF.
    pub fn start_server(&self, i: usize, port: u16) -> Result<()> {
        ensure!(
            (1..=self.backends).contains(&i),
            "no backend {i} in this lab"
        );
        self.start_server_on(Node::Backend(i), port)
    }

    /// `start_server` for every backend.
    pub fn start_servers(&self, port: u16) -> Result<()> {
        (1..=self.backends).try_for_each(|i| self.start_server(i, port))
    }

    /// A server like the backends' in any node's namespace; it greets with the node's
    /// short name (`lb`, `cl`, `b<i>`).
    pub fn start_server_on(&self, node: Node, port: u16) -> Result<()> {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        ensure!(
            !servers.contains_key(&(node, port)),
            "a server already runs on {node:?} port {port}"
        );
        let server = Server::start(&self.ns(node), port, node.short_name())
            .with_context(|| format!("starting a server on {node:?} port {port}"))?;
        servers.insert((node, port), server);
        Ok(())
    }

    /// Stops backend `i`'s server on `port`, closing its open connections; false when
    /// none ran.
    pub fn stop_server(&self, i: usize, port: u16) -> bool {
        self.stop_server_on(Node::Backend(i), port)
    }

    pub fn stop_server_on(&self, node: Node, port: u16) -> bool {
        let server = self
            .servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(node, port));
        server.is_some() // dropping it stops it
    }

    /// Stops and starts backend `i`'s server on `port` again.
    pub fn restart_server(&self, i: usize, port: u16) -> Result<()> {
        self.stop_server(i, port);
        self.start_server(i, port)
    }

    // ---- the client ----------------------------------------------------------------

    /// Connects from the client namespace.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        try_in_ns(&self.ns(Node::Client), || {
            TcpStream::connect_timeout(&addr, timeout)
        })
    }

    /// Connects from the client namespace and returns the greeting line: the name of the
    /// backend that answered. Connect and read are each bounded by `ASK_TIMEOUT`.
    pub fn ask_backend(&self, addr: SocketAddr) -> io::Result<String> {
        Ok(self.converse(addr)?.greeting)
    }

    /// A connection from the client namespace, greeting read, ready to echo lines.
    pub fn converse(&self, addr: SocketAddr) -> io::Result<Conversation> {
        let stream = self.connect(addr, ASK_TIMEOUT)?;
        stream.set_read_timeout(Some(ASK_TIMEOUT))?;
        stream.set_write_timeout(Some(ASK_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        let mut conversation = Conversation {
            reader: BufReader::new(stream),
            writer,
            greeting: String::new(),
        };
        conversation.greeting = conversation.read_line()?;
        Ok(conversation)
    }

    /// Opens `n` connections to `addr` one after the other and counts which backend
    /// greeted each. Stops early once `budget` has passed; connections not tried then
    /// count as failures.
    pub fn spread(&self, addr: SocketAddr, n: usize, budget: Duration) -> Spread {
        let start = Instant::now();
        let mut spread = Spread {
            addr,
            attempted: 0,
            not_tried: 0,
            counts: BTreeMap::new(),
            failures: Vec::new(),
            elapsed: Duration::ZERO,
        };
        for k in 0..n {
            if start.elapsed() > budget {
                spread.not_tried = n - k;
                break;
            }
            spread.attempted += 1;
            match self.ask_backend(addr) {
                Ok(name) => *spread.counts.entry(name).or_default() += 1,
                Err(e) => spread.failures.push(format!("connection {k}: {e}")),
            }
        }
        spread.elapsed = start.elapsed();
        spread
    }

    // ---- the agent -----------------------------------------------------------------

    /// Renders an lb-agent config for this lab: `eth0`, the given XDP mode (`auto`,
    /// `native`, `generic`) and services whose backends are lab backends, addressed in
    /// the family of the service's VIP.
    ///
    /// The `[agent]` table always names a control socket and a state directory inside
    /// this lab's temporary directory (`control_socket()`, `state_dir()`), so labs never
    /// share them and every agent of one lab finds the admin state of the one before.
    pub fn config(&self, xdp_mode: &str, services: &[Service]) -> String {
        let mut out = format!(
            "[agent]\ninterface = \"eth0\"\nxdp_mode = \"{xdp_mode}\"\ncontrol_socket = {}\nstate_dir = {}\n",
            toml_string(&self.control_socket().to_string_lossy()),
            toml_string(&self.state_dir().to_string_lossy()),
        );
        for s in services {
            out += &format!(
                "\n[[services]]\nname = \"{}\"\nvip = \"{}\"\nport = {}\n",
                s.name, s.vip, s.port
            );
            if let Some(ring) = s.ring_size {
                out += &format!("ring_size = {ring}\n");
            }
            if let Some(hc) = s.health_check {
                out += &format!(
                    "\n[services.health_check]\ninterval_ms = {}\ntimeout_ms = {}\nrise = {}\nfall = {}\n",
                    hc.interval_ms, hc.timeout_ms, hc.rise, hc.fall
                );
            }
            for &(i, weight) in &s.backends {
                let node = Node::Backend(i);
                out += &format!(
                    "\n[[services.backends]]\nname = \"{}\"\naddress = \"{}\"\nweight = {weight}\n",
                    node.short_name(),
                    addr_like(node, s.vip)
                );
                if s.backups.contains(&i) {
                    out += "backup = true\n";
                }
            }
        }
        out
    }

    /// The control socket every config of this lab names (`<lab dir>/lb.sock`).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.0.join("lb.sock")
    }

    /// The agent's state directory every config of this lab names (`<lab dir>/state`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.0.join("state")
    }

    /// The lab's temporary directory (configs, logs, the control socket).
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Starts `lb-agent --config FILE` in the LB namespace and waits (at most 20 s) for
    /// it to say it is ready. On failure the error holds the agent's log.
    pub fn spawn_agent(&self, config: &str) -> Result<AgentGuard<'_>> {
        let bin = bin_path("lb-agent")?;
        let config_path = self.new_file("agent", "toml");
        write_atomically(&config_path, config)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(Node::Lb)])
            .arg(&bin)
            .arg("--config")
            .arg(&config_path);
        let process = ProcessGuard::spawn(cmd, self.new_file("agent", "log"))?;
        let mut agent = AgentGuard {
            process,
            config_path,
        };
        agent.wait_for("start", AGENT_START_TIMEOUT, |log| {
            count_lines(log, AGENT_READY) > 0
        })?;
        Ok(agent)
    }

    /// `spawn_agent`, then waits (at most 20 s) until the agent says its control socket
    /// is up (`lb-agent: control socket <path>`) and the socket file exists.
    pub fn spawn_controlled_agent(&self, config: &str) -> Result<AgentGuard<'_>> {
        let mut agent = self.spawn_agent(config)?;
        agent.wait_log(
            "the control socket",
            AGENT_CONTROL_SOCKET,
            AGENT_START_TIMEOUT,
        )?;
        let socket = self.control_socket();
        ensure!(
            socket.exists(),
            "lb-agent announced its control socket, but {} does not exist; its log:\n{}",
            socket.display(),
            agent.log()
        );
        Ok(agent)
    }

    // ---- lbctl ---------------------------------------------------------------------

    /// The command `lbctl --socket <this lab's socket> ARGS`, not started. It runs in
    /// the root namespace: the control socket is a file, not lab traffic. For a run
    /// on another thread, pass it to `run_bounded`.
    pub fn lbctl_command<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Command> {
        let mut cmd = Command::new(bin_path("lbctl")?);
        cmd.arg("--socket").arg(self.control_socket()).args(args);
        Ok(cmd)
    }

    /// Runs `lbctl --socket <socket> ARGS`, bounded by `LBCTL_TIMEOUT`, and returns its
    /// output whatever the exit status.
    pub fn lbctl<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        run_bounded(self.lbctl_command(args)?, LBCTL_TIMEOUT)
    }

    /// `lbctl` that must exit 0; returns its stdout. The error holds status and stderr.
    pub fn lbctl_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let out = self.lbctl(args)?;
        ensure!(
            out.status.success(),
            "lbctl {} failed ({}):\nstdout: {}\nstderr: {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `lbctl --json status`, parsed.
    pub fn lbctl_status(&self) -> Result<Status> {
        parse_status_json(&self.lbctl_ok(&["--json", "status"])?)
    }

    /// `lbctl --json backend list [SERVICE]`, parsed.
    pub fn lbctl_backends(&self, service: Option<&str>) -> Result<Vec<BackendStatus>> {
        let mut args = vec!["--json", "backend", "list"];
        args.extend(service);
        parse_backends_json(&self.lbctl_ok(&args)?)
    }

    /// One backend as `lbctl --json backend list SERVICE` shows it.
    pub fn lbctl_backend(&self, service: &str, backend: &str) -> Result<BackendStatus> {
        let all = self.lbctl_backends(Some(service))?;
        all.iter()
            .find(|b| b.service == service && b.name == backend)
            .cloned()
            .ok_or_else(|| anyhow!("lbctl backend list {service} has no {backend}: {all:#?}"))
    }

    /// Polls `lbctl --json backend list SERVICE` every `POLL_INTERVAL` until `done`
    /// holds for `backend`; returns how long that took and what lbctl showed then.
    /// Fails after `timeout`, with the last state seen.
    pub fn wait_backend(
        &self,
        service: &str,
        backend: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&BackendStatus) -> bool,
    ) -> Result<(Duration, BackendStatus)> {
        let start = Instant::now();
        loop {
            let b = self.lbctl_backend(service, backend)?;
            if done(&b) {
                return Ok((start.elapsed(), b));
            }
            if start.elapsed() > timeout {
                bail!("{service}/{backend}: not {what} within {timeout:?}; last seen: {b:?}");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until every named backend of `service` is up (healthy, enabled, in the ring).
    pub fn wait_backends_up(
        &self,
        service: &str,
        backends: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            let all = self.lbctl_backends(Some(service))?;
            let missing: Vec<&BackendStatus> = all
                .iter()
                .filter(|b| backends.contains(&b.name.as_str()))
                .filter(|b| b.state != protocol::BackendState::Up)
                .collect();
            let found = all
                .iter()
                .filter(|b| backends.contains(&b.name.as_str()))
                .count();
            if missing.is_empty() && found == backends.len() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{service}: {backends:?} not all up within {timeout:?}; lbctl shows {all:#?}"
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    // ---- load ----------------------------------------------------------------------

    /// Starts a client thread in the client namespace that opens short connections to
    /// `addr` one after the other (each reads the greeting, then closes), pausing
    /// `pause` between two, and records every attempt. It stops by itself after
    /// `max_connections` attempts or `max_time`, or when the `Load` is stopped or dropped.
    pub fn start_load(
        &self,
        addr: SocketAddr,
        max_connections: usize,
        max_time: Duration,
        pause: Duration,
    ) -> Result<Load<'_>> {
        let pacing = Pacing::Pause(pause);
        self.start_recorder("load", addr, max_connections, max_time, pacing, ASK_TIMEOUT)
    }

    /// A client thread in the client namespace that opens short connections to `addr`
    /// (connect and greeting each bounded by `timeout`), paced by `pacing`, and records
    /// every attempt, until `max_connections`, `max_time`, or the `Load` stops or drops.
    fn start_recorder(
        &self,
        what: &'static str,
        addr: SocketAddr,
        max_connections: usize,
        max_time: Duration,
        pacing: Pacing,
        timeout: Duration,
    ) -> Result<Load<'_>> {
        let ns = self.ns(Node::Client);
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, attempts) = (stop.clone(), attempts.clone());
            thread::Builder::new()
                .name(format!("{what}-{addr}"))
                .spawn(move || {
                    let entered = enter_netns(&ns);
                    let ok = entered.is_ok();
                    let _ = entered_tx.send(entered);
                    if !ok {
                        return;
                    }
                    let start = Instant::now();
                    for _ in 0..max_connections {
                        if stop.load(Ordering::Relaxed) || start.elapsed() > max_time {
                            break;
                        }
                        let started = Instant::now();
                        let outcome = greeting_within(addr, timeout).map_err(|e| e.to_string());
                        let attempt = Attempt {
                            started,
                            elapsed: started.elapsed(),
                            outcome,
                        };
                        attempts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(attempt);
                        thread::sleep(match pacing {
                            Pacing::Pause(pause) => pause,
                            Pacing::Every(every) => every.saturating_sub(started.elapsed()),
                        });
                    }
                })
                .with_context(|| format!("starting the {what} thread"))?
        };
        entered_rx
            .recv()
            .with_context(|| {
                format!("the {what} thread ended before entering the client namespace")
            })?
            .with_context(|| format!("{what} thread"))?;
        Ok(Load {
            stop,
            attempts,
            thread: Some(thread),
            _lab: PhantomData,
        })
    }

    /// What the kernel says about the lab's links: for the report of a failing test.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        let mut show = |node: Node, args: &[&str]| {
            out += &format!("--- {} $ {}\n", self.ns(node), args.join(" "));
            match self.exec(node, args) {
                Ok(o) => {
                    out += &String::from_utf8_lossy(&o.stdout);
                    out += &String::from_utf8_lossy(&o.stderr);
                }
                Err(e) => out += &format!("{e:#}\n"),
            }
        };
        show(Node::Lb, &["ip", "-d", "link", "show", "eth0"]);
        show(Node::Lb, &["ethtool", "-S", "eth0"]);
        show(Node::Bridge, &["ip", "-s", "link"]);
        show(Node::Bridge, &["ethtool", "-S", "vlb"]);
        if self.second_lb {
            show(Node::Lb2, &["ip", "-d", "link", "show", "eth0"]);
            show(Node::Lb2, &["ethtool", "-S", "eth0"]);
            show(Node::Bridge, &["ethtool", "-S", "vlb2"]);
        }
        show(Node::Client, &["ip", "neigh"]);
        show(Node::Client, &["ip", "-s", "link", "show", "eth0"]);
        for i in 1..=self.backends {
            show(Node::Backend(i), &["ip", "-s", "link", "show", "eth0"]);
            show(
                Node::Backend(i),
                &[
                    "nstat",
                    "-az",
                    "TcpExtTCPCsumErrors",
                    "IpInDiscards",
                    "TcpInErrs",
                ],
            );
        }
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes borrow the lab and are gone already; then servers, the XDP link,
        // the namespaces (bridge last) and the files.
        self.servers
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.xdp_pass = None;
        self.xdp_pass_lb2 = None;
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// `text` as a TOML basic string, quotes included.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            c if c.is_control() => out += &format!("\\u{:04X}", c as u32),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn count_lines(log: &str, marker: &str) -> usize {
    log.lines().filter(|l| l.contains(marker)).count()
}

/// A service of a lab config; see `Lab::config`.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub ring_size: Option<u32>,
    /// (backend number, weight)
    pub backends: Vec<(usize, u32)>,
    /// Backend numbers rendered with `backup = true`.
    pub backups: Vec<usize>,
    /// The `[services.health_check]` table; none means the agent's defaults.
    pub health_check: Option<HealthCheck>,
}

pub use lb_userspace::config::{HealthCheck, VrrpSettings};

impl Service {
    pub fn new(name: &str, vip: impl Into<IpAddr>, port: u16) -> Self {
        Service {
            name: name.into(),
            vip: vip.into(),
            port,
            ring_size: None,
            backends: Vec::new(),
            backups: Vec::new(),
            health_check: None,
        }
    }

    /// Adds backend `i` with `weight` as a backup (`backup = true`).
    pub fn backup(mut self, i: usize, weight: u32) -> Self {
        self.backends.push((i, weight));
        self.backups.push(i);
        self
    }

    pub fn health_check(mut self, interval_ms: u32, timeout_ms: u32, rise: u32, fall: u32) -> Self {
        self.health_check = Some(HealthCheck {
            interval_ms,
            timeout_ms,
            rise,
            fall,
        });
        self
    }

    /// Adds backend `i` with `weight`.
    pub fn backend(mut self, i: usize, weight: u32) -> Self {
        self.backends.push((i, weight));
        self
    }

    /// Adds the given backends with weight 100 each.
    pub fn backends(mut self, backends: impl IntoIterator<Item = usize>) -> Self {
        self.backends.extend(backends.into_iter().map(|i| (i, 100)));
        self
    }

    pub fn ring_size(mut self, size: u32) -> Self {
        self.ring_size = Some(size);
        self
    }
}

/// How `Lab::spread` found connections to spread over the backends.
#[derive(Clone, Debug)]
pub struct Spread {
    pub addr: SocketAddr,
    pub attempted: usize,
    /// Connections left out because the time budget ran out.
    pub not_tried: usize,
    /// Connections per greeting (backend name).
    pub counts: BTreeMap<String, usize>,
    /// One message per failed connection.
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

impl Spread {
    pub fn succeeded(&self) -> usize {
        self.counts.values().sum()
    }

    pub fn count(&self, backend: &str) -> usize {
        self.counts.get(backend).copied().unwrap_or(0)
    }

    /// A small table: backend, connections, share.
    pub fn table(&self) -> String {
        let total = self.succeeded().max(1) as f64;
        let mut out = format!("  {:<8} {:>11} {:>7}\n", "backend", "connections", "share");
        for (name, &n) in &self.counts {
            out += &format!("  {name:<8} {n:>11} {:>6.1}%\n", 100.0 * n as f64 / total);
        }
        out += &format!(
            "  {} of {} connections to {} succeeded in {:.2?}",
            self.succeeded(),
            self.attempted,
            self.addr,
            self.elapsed
        );
        if !self.failures.is_empty() {
            out += &format!(
                "; {} failed, first: {}",
                self.failures.len(),
                self.failures[0]
            );
        }
        if self.not_tried > 0 {
            out += &format!("; {} not tried: the time budget ran out", self.not_tried);
        }
        out
    }

    /// Checks that every connection was tried and succeeded and that each backend got between `low` and
    /// `high` times its expected share (`weights` are relative). Backends not named in
    /// `weights` must get nothing.
    pub fn check_shares(&self, weights: &[(&str, f64)], low: f64, high: f64) -> Result<()> {
        ensure!(
            self.failures.is_empty() && self.not_tried == 0,
            "not every connection succeeded:\n{}",
            self.table()
        );
        let sum: f64 = weights.iter().map(|&(_, w)| w).sum();
        let total = self.succeeded() as f64;
        for &(name, weight) in weights {
            let expected = total * weight / sum;
            let got = self.count(name) as f64;
            ensure!(
                got >= low * expected && got <= high * expected,
                "{name} got {got} connections, expected {expected:.0} (between {:.0} and {:.0})\n{}",
                low * expected,
                high * expected,
                self.table()
            );
        }
        for name in self.counts.keys() {
            ensure!(
                weights.iter().any(|&(n, _)| n == name),
                "{name} got connections it should not have\n{}",
                self.table()
            );
        }
        Ok(())
    }
}

/// A client connection whose greeting has been read.
pub struct Conversation {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The first line the server sent: the backend's name.
    pub greeting: String,
}

impl Conversation {
    fn read_line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    /// Sends `line` and returns what came back (bounded by `ASK_TIMEOUT`).
    pub fn echo(&mut self, line: &str) -> io::Result<String> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        self.read_line()
    }
}

// ---- load ------------------------------------------------------------------------------

/// How a recording client spaces its connections.
#[derive(Clone, Copy, Debug)]
enum Pacing {
    /// This long between the end of one connection and the start of the next.
    Pause(Duration),
    /// One connection started this often (or as soon as the last one ends).
    Every(Duration),
}

/// One short connection of a `Load`.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// When the connect began.
    pub started: Instant,
    /// Connect plus greeting.
    pub elapsed: Duration,
    /// The greeting (backend name), or the error.
    pub outcome: Result<String, String>,
}

impl Attempt {
    /// The backend that answered, if any.
    pub fn backend(&self) -> Option<&str> {
        self.outcome.as_deref().ok()
    }
}

/// A client thread opening short connections (see `Lab::start_load`). `Drop` stops it.
pub struct Load<'lab> {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<JoinHandle<()>>,
    _lab: PhantomData<&'lab Lab>,
}

impl Load<'_> {
    /// Every attempt so far, in order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the thread still runs (it ends by itself at its bounds).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Polls (every 10 ms) until `done` holds for the attempts so far, the thread ends,
    /// or `timeout` passes; returns whether `done` held.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&[Attempt]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.is_running();
            if done(&self.attempts.lock().unwrap_or_else(|e| e.into_inner())) {
                return true;
            }
            if !running || Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the thread, waits for its last connection, returns every attempt.
    pub fn stop(mut self) -> Vec<Attempt> {
        self.halt();
        self.attempts()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Load<'_> {
    fn drop(&mut self) {
        self.halt();
    }
}

// ---- processes and JSON ----------------------------------------------------------------

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured) and waits at most
/// `timeout` for it to exit; then it is killed and this is an error.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(2));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{what} did not finish within {timeout:?} (killed)\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout).trim(),
            String::from_utf8_lossy(&stderr).trim()
        ),
    }
}

/// A command running in the background whose stdout lines are timestamped as they
/// arrive (e.g. `lbctl backend disable --wait`: when its first line comes, the disable
/// is in effect). `Drop` kills it if it still runs.
pub struct Streaming {
    child: Child,
    what: String,
    lines: std::sync::mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    ended: Option<(ExitStatus, Instant)>,
}

impl Streaming {
    /// Starts `cmd` (stdin from /dev/null, stdout and stderr captured).
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("{cmd:?}");
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().context("no stdout pipe")?;
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().map(|mut pipe| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        });
        Ok(Streaming {
            child,
            what,
            lines,
            seen: Vec::new(),
            stderr,
            ended: None,
        })
    }

    fn collect(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// The first stdout line and when it was read, waiting at most `timeout` for it.
    pub fn first_line(&mut self, timeout: Duration) -> Result<(Instant, String)> {
        if self.seen.is_empty() {
            match self.lines.recv_timeout(timeout) {
                Ok(line) => self.seen.push(line),
                Err(_) => bail!("{}: no output within {timeout:?}", self.what),
            }
        }
        Ok(self.seen[0].clone())
    }

    /// The exit status and when it was first seen, if the command has ended.
    pub fn poll(&mut self) -> Result<Option<(ExitStatus, Instant)>> {
        if self.ended.is_none()
            && let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.what))?
        {
            self.ended = Some((status, Instant::now()));
        }
        Ok(self.ended)
    }

    /// Waits (polling every 5 ms) at most `timeout` for the command to end.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<(ExitStatus, Instant)>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ended) = self.poll()? {
                return Ok(Some(ended));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every stdout line so far.
    pub fn stdout(&mut self) -> String {
        self.collect();
        self.seen.iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    /// Its stderr; empty until the command has ended.
    pub fn stderr(&mut self) -> String {
        if self.ended.is_none() {
            return String::new();
        }
        let bytes = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if self.ended.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `lbctl status --json`.
pub fn parse_status_json(text: &str) -> Result<Status> {
    serde_json::from_str(text.trim()).map_err(|e| anyhow!("lbctl status --json: {e}: {text:?}"))
}

/// `lbctl backend list --json`.
pub fn parse_backends_json(text: &str) -> Result<Vec<BackendStatus>> {
    serde_json::from_str(text.trim())
        .map_err(|e| anyhow!("lbctl backend list --json: {e}: {text:?}"))
}

// ---- servers ---------------------------------------------------------------------------

/// An in-process TCP server; `Drop` stops it and closes its connections.
struct Server {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    fn start(ns: &str, port: u16, greeting: String) -> io::Result<Server> {
        let listener = try_in_ns(ns, || dual_stack_listener(port))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, connections) = (stop.clone(), connections.clone());
            thread::Builder::new()
                .name(format!("accept-{greeting}-{port}"))
                .spawn(move || accept_loop(&listener, &greeting, &stop, &connections))?
        };
        Ok(Server {
            stop,
            acceptor: Some(acceptor),
            connections,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let connections =
            std::mem::take(&mut *self.connections.lock().unwrap_or_else(|e| e.into_inner()));
        for c in connections {
            let _ = c.join();
        }
    }
}

/// One `[::]:port` socket taking IPv4 (mapped) and IPv6 connections alike.
fn dual_stack_listener(port: u16) -> io::Result<TcpListener> {
    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
    // SAFETY: socket(2) has no preconditions; the fd is owned right away.
    let fd = unsafe {
        OwnedFd::from_raw_fd(check(libc::socket(
            libc::AF_INET6,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?)
    };
    let set = |level, name, value: libc::c_int| {
        // SAFETY: a valid fd and a pointer to a c_int of the given size.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
    };
    set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    set(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    // SAFETY: all-zero is a valid sockaddr_in6 (the any address).
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr.sin6_port = port.to_be();
    // SAFETY: a valid fd and a sockaddr_in6 of the size given.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    })?;
    // SAFETY: a valid, bound fd.
    check(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
    Ok(TcpListener::from(fd))
}

/// Waits at most `timeout` for `fd` to become readable.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) > 0 }
}

fn accept_loop(
    listener: &TcpListener,
    greeting: &str,
    stop: &Arc<AtomicBool>,
    connections: &Mutex<Vec<JoinHandle<()>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(listener, SERVER_TICK) {
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                let (name, stop) = (greeting.to_string(), stop.clone());
                let spawned = thread::Builder::new()
                    .name(format!("conn-{greeting}"))
                    .spawn(move || {
                        if let Err(e) = serve_connection(stream, &name, &stop) {
                            eprintln!("lab server {name}: connection from {peer}: {e}");
                        }
                    });
                let mut connections = connections.lock().unwrap_or_else(|e| e.into_inner());
                connections.retain(|c| !c.is_finished());
                match spawned {
                    Ok(handle) => connections.push(handle),
                    Err(e) => {
                        eprintln!("lab server {greeting}: cannot start a connection thread: {e}")
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                eprintln!("lab server {greeting}: accept: {e}");
                thread::sleep(SERVER_TICK);
            }
        }
    }
}

/// Greets, then echoes lines until EOF or until the server stops.
fn serve_connection(stream: TcpStream, greeting: &str, stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(SERVER_TICK))?;
    stream.set_write_timeout(Some(ASK_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(format!("{greeting}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                writer.write_all(&line)?;
                if !line.ends_with(b"\n") {
                    return Ok(()); // EOF after a last, unterminated line
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---- processes -------------------------------------------------------------------------

/// A child process the lab started; `Drop` ends it: SIGTERM, up to 5 s, then SIGKILL.
/// It borrows the lab so that it ends before the namespaces do.
pub struct ProcessGuard<'lab> {
    child: Option<Child>,
    what: String,
    log: PathBuf,
    _lab: PhantomData<&'lab Lab>,
}

impl ProcessGuard<'_> {
    fn spawn(mut cmd: Command, log: PathBuf) -> Result<Self> {
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let what = format!("{cmd:?}");
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(ProcessGuard {
            child: Some(child),
            what,
            log,
            _lab: PhantomData,
        })
    }

    /// The process id (`ip netns exec` execs the program, so it is the program's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if it has ended (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `signal` unless the process has ended. The child is not reaped before this
    /// guard does so, so the pid cannot belong to anyone else.
    pub fn signal(&mut self, signal: libc::c_int) -> io::Result<()> {
        if self.exited().is_some() {
            return Err(io::Error::other(format!("{} has exited", self.what)));
        }
        let Some(pid) = self.pid() else {
            return Err(io::Error::other("no process"));
        };
        // SAFETY: kill(2) on our own unreaped child.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ends the process: SIGTERM, a bounded wait, SIGKILL. Returns how it ended.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(io::Error::other("already stopped"));
        };
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "lab: {} ignored SIGTERM for {TERM_GRACE:?}; killing it",
            self.what
        );
        child.kill()?;
        child.wait()
    }
}

impl Drop for ProcessGuard<'_> {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.stop()
        {
            eprintln!("lab: stopping {}: {e}", self.what);
        }
    }
}

/// A running lb-agent. `Drop` stops it and, if the thread is panicking, prints the
/// end of its log.
pub struct AgentGuard<'lab> {
    process: ProcessGuard<'lab>,
    config_path: PathBuf,
}

impl AgentGuard<'_> {
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Everything the agent wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Rewrites the config file without telling the agent (for `lbctl reload`).
    pub fn write_config(&self, config: &str) -> Result<()> {
        write_atomically(&self.config_path, config)
    }

    /// Sends `signal` to the agent unless it has exited.
    pub fn signal(&mut self, signal: libc::c_int) -> io::Result<()> {
        self.process.signal(signal)
    }

    /// How many lines of the log so far contain `marker`.
    pub fn count_log(&self, marker: &str) -> usize {
        count_lines(&self.log(), marker)
    }

    /// Waits (polling the log) until a line contains `marker`; fails if the agent exits
    /// first or `timeout` passes, with the log.
    pub fn wait_log(&mut self, what: &str, marker: &str, timeout: Duration) -> Result<()> {
        self.wait_for(what, timeout, |log| count_lines(log, marker) > 0)
    }

    /// The exit status if the agent has ended (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.exited()
    }

    /// Rewrites the config file, sends SIGHUP and waits (at most 20 s) for the agent to
    /// report `lb-agent: reloaded`; `lb-agent: reload failed` is an error.
    pub fn reload(&mut self, config: &str) -> Result<()> {
        let log = self.log();
        let (ok_before, failed_before) = (
            count_lines(&log, AGENT_RELOADED),
            count_lines(&log, AGENT_RELOAD_FAILED),
        );
        write_atomically(&self.config_path, config)?;
        self.process
            .signal(libc::SIGHUP)
            .context("sending SIGHUP to lb-agent")?;
        self.wait_for("reload", AGENT_RELOAD_TIMEOUT, |log| {
            count_lines(log, AGENT_RELOADED) > ok_before
                || count_lines(log, AGENT_RELOAD_FAILED) > failed_before
        })?;
        let log = self.log();
        ensure!(
            count_lines(&log, AGENT_RELOAD_FAILED) == failed_before,
            "lb-agent: the reload failed; its log:\n{log}"
        );
        Ok(())
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 5 s) and returns how it ended.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        self.process.stop()
    }

    /// Polls the log until `done` says so, the agent exits, or `timeout` passes.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if done(&log) {
                return Ok(());
            }
            if let Some(status) = self.process.exited() {
                // One more look: it may have written the line and exited at once.
                let log = self.log();
                if done(&log) {
                    return Ok(());
                }
                bail!("lb-agent exited ({status}) during {what}; its log:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("lb-agent: no {what} within {timeout:?}; its log:\n{log}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- lb-agent log (last {} lines) ---\n{}\n---",
                tail.len(),
                tail.join("\n")
            );
        }
        // ProcessGuard's Drop stops the process.
    }
}

// ---- a second LB, VRRP and failover ----------------------------------------------------

/// Loads `xdp_pass` and attaches it (native) to `peer` in the bridge namespace `br`;
/// the link lives as long as the returned value.
fn xdp_pass_on(br: &str, peer: &str) -> Result<aya::Ebpf> {
    in_ns(br, || -> Result<aya::Ebpf> {
        let mut ebpf =
            aya::Ebpf::load(lb_userspace::dataplane::OBJECT).context("loading the XDP object")?;
        let name = lb_common::names::PROG_PASS;
        let program: &mut aya::programs::Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("the XDP object has no program {name}"))?
            .try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
        program
            .attach(peer, aya::programs::XdpMode::Driver)
            .with_context(|| format!("attaching {name} to {peer} (native)"))?;
        Ok(ebpf)
    })
}

/// A `[vrrp]` table to render into a lab config: the agent's own settings type, with
/// builder methods and the TOML an operator would write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VrrpSection(pub VrrpSettings);

impl VrrpSection {
    pub fn new(router_id: u8, priority: u8) -> Self {
        VrrpSection(VrrpSettings {
            router_id,
            priority,
            advert_interval_ms: 100,
            preempt: true,
            preempt_delay_ms: 0,
            peers: Vec::new(),
            auth_key_file: None,
            notify: None,
            // The agent's default: `render` leaves the key out.
            rt_priority: 10,
        })
    }

    pub fn priority(mut self, priority: u8) -> Self {
        self.0.priority = priority;
        self
    }

    pub fn advert_interval_ms(mut self, ms: u32) -> Self {
        self.0.advert_interval_ms = ms;
        self
    }

    pub fn preempt(mut self, on: bool) -> Self {
        self.0.preempt = on;
        self
    }

    pub fn preempt_delay_ms(mut self, ms: u32) -> Self {
        self.0.preempt_delay_ms = ms;
        self
    }

    pub fn peers(mut self, peers: impl IntoIterator<Item = IpAddr>) -> Self {
        self.0.peers = peers.into_iter().collect();
        self
    }

    pub fn auth_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.0.auth_key_file = Some(path.into());
        self
    }

    pub fn notify(mut self, path: impl Into<PathBuf>) -> Self {
        self.0.notify = Some(path.into());
        self
    }

    /// The table as TOML, starting with a blank line and `[vrrp]`.
    pub fn render(&self) -> String {
        let v = &self.0;
        let mut out = format!(
            "\n[vrrp]\nrouter_id = {}\npriority = {}\nadvert_interval_ms = {}\npreempt = {}\npreempt_delay_ms = {}\n",
            v.router_id, v.priority, v.advert_interval_ms, v.preempt, v.preempt_delay_ms
        );
        if !v.peers.is_empty() {
            let peers: Vec<String> = v
                .peers
                .iter()
                .map(|p| toml_string(&p.to_string()))
                .collect();
            out += &format!("peers = [{}]\n", peers.join(", "));
        }
        if let Some(key) = &v.auth_key_file {
            out += &format!("auth_key_file = {}\n", toml_string(&key.to_string_lossy()));
        }
        if let Some(notify) = &v.notify {
            out += &format!("notify = {}\n", toml_string(&notify.to_string_lossy()));
        }
        out
    }
}

/// What a prober (`Lab::start_probe`) saw around one event: the longest time without
/// a successful connection, from the end of the last success begun before the event
/// to the end of the success that closed that stretch. (A connection begun just after
/// a SIGKILL may still get through while the kernel tears the XDP link down, so "the
/// first success after the event" alone would hide the outage that follows.)
#[derive(Clone, Debug)]
pub struct ProbeGap {
    pub gap: Duration,
    /// When the stretch began, measured from the event (negative: before it).
    pub from_event_ms: i64,
    /// Failed attempts within the stretch.
    pub failures: usize,
    /// When the success that ended the stretch ended, measured from the event.
    pub recovered_after: Duration,
    /// The backend that answered that connection.
    pub backend: String,
    /// When the record ends in failures: how long since its last success (an outage
    /// still going on, not counted in `gap`), and how many failed since.
    pub still_failing: Option<(Duration, usize)>,
}

impl std::fmt::Display for ProbeGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gap {:.1?} (from {} ms after the event to a success from {} {:.1?} after it; {} failed attempts in between)",
            self.gap, self.from_event_ms, self.backend, self.recovered_after, self.failures
        )?;
        if let Some((d, n)) = self.still_failing {
            write!(
                f,
                "; STILL FAILING: {n} attempts in {d:.1?} since the last success"
            )?;
        }
        Ok(())
    }
}

/// The longest stretch without success in a prober's record from the last success
/// begun before `event` on (see `ProbeGap`); `None` when no connection begun after
/// `event` succeeded. With no success before the event, the first stretch counts from
/// the event.
pub fn probe_gap(attempts: &[Attempt], event: Instant) -> Option<ProbeGap> {
    let end = |a: &Attempt| a.started + a.elapsed;
    let from = attempts
        .iter()
        .rposition(|a| a.started < event && a.outcome.is_ok());
    if !attempts[from.map_or(0, |i| i + 1)..]
        .iter()
        .any(|a| a.outcome.is_ok())
    {
        return None;
    }
    let mut prev = from.map_or(event, |i| end(&attempts[i]));
    let mut failures = 0;
    let mut best: Option<ProbeGap> = None;
    for a in &attempts[from.map_or(0, |i| i + 1)..] {
        if a.started < event && from.is_none() {
            continue;
        }
        if a.outcome.is_err() {
            failures += 1;
            continue;
        }
        let gap = end(a).saturating_duration_since(prev);
        if best.as_ref().is_none_or(|b| gap > b.gap) {
            let from_event_ms = if prev >= event {
                prev.duration_since(event).as_millis() as i64
            } else {
                -(event.duration_since(prev).as_millis() as i64)
            };
            best = Some(ProbeGap {
                gap,
                from_event_ms,
                failures,
                recovered_after: end(a).saturating_duration_since(event),
                backend: a.backend().unwrap_or_default().to_string(),
                still_failing: None,
            });
        }
        prev = end(a);
        failures = 0;
    }
    if let (Some(b), Some(last)) = (best.as_mut(), attempts.last())
        && failures > 0
    {
        b.still_failing = Some((end(last).saturating_duration_since(prev), failures));
    }
    best
}

/// Connects to `addr` and reads the greeting, connect and read each bounded by `timeout`.
fn greeting_within(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection before its greeting",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

impl Lab {
    /// Whether the lab has `Node::Lb2`.
    pub fn has_second_lb(&self) -> bool {
        self.second_lb
    }

    /// The control socket of the agent in `node`'s namespace: `control_socket()` for
    /// `Node::Lb`, `<lab dir>/<short name>.sock` for the others (`lb2.sock`).
    pub fn control_socket_of(&self, node: Node) -> PathBuf {
        match node {
            Node::Lb => self.control_socket(),
            other => self.dir.0.join(format!("{}.sock", other.short_name())),
        }
    }

    /// The state directory of the agent in `node`'s namespace: `state_dir()` for
    /// `Node::Lb`, `<lab dir>/state-<short name>` for the others.
    pub fn state_dir_of(&self, node: Node) -> PathBuf {
        match node {
            Node::Lb => self.state_dir(),
            other => self.dir.0.join(format!("state-{}", other.short_name())),
        }
    }

    /// `config` for an agent in `node`'s namespace: its own control socket and state
    /// directory (`control_socket_of`, `state_dir_of`), and the `[vrrp]` table if given.
    pub fn config_on(
        &self,
        node: Node,
        xdp_mode: &str,
        services: &[Service],
        vrrp: Option<&VrrpSection>,
    ) -> String {
        let base = self.config(xdp_mode, services);
        let mut out = String::new();
        let mut in_agent = false;
        for line in base.lines() {
            if line.starts_with('[') {
                in_agent = line == "[agent]";
            }
            if in_agent && (line.starts_with("control_socket") || line.starts_with("state_dir")) {
                continue;
            }
            out += line;
            out.push('\n');
            if line == "[agent]" {
                out += &format!(
                    "control_socket = {}\nstate_dir = {}\n",
                    toml_string(&self.control_socket_of(node).to_string_lossy()),
                    toml_string(&self.state_dir_of(node).to_string_lossy()),
                );
            }
        }
        if let Some(v) = vrrp {
            out += &v.render();
        }
        out
    }

    /// Starts `lb-agent --config FILE` in `node`'s namespace (`Node::Lb` or
    /// `Node::Lb2`) and waits (at most 20 s) until it says it is ready and its control
    /// socket (`control_socket_of(node)`) exists. The config should come from
    /// `config_on(node, ..)`. On failure the error holds the agent's log.
    pub fn spawn_agent_on(&self, node: Node, config: &str) -> Result<AgentGuard<'_>> {
        ensure!(
            self.nodes().contains(&node),
            "no {node:?} in this lab (LabBuilder::second_lb for Node::Lb2)"
        );
        let bin = bin_path("lb-agent")?;
        let stem = format!("agent-{}", node.short_name());
        let config_path = self.new_file(&stem, "toml");
        write_atomically(&config_path, config)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(node)])
            .arg(&bin)
            .arg("--config")
            .arg(&config_path);
        let process = ProcessGuard::spawn(cmd, self.new_file(&stem, "log"))?;
        let mut agent = AgentGuard {
            process,
            config_path,
        };
        agent.wait_for("start", AGENT_START_TIMEOUT, |log| {
            count_lines(log, AGENT_READY) > 0
        })?;
        let socket = self.control_socket_of(node);
        ensure!(
            socket.exists(),
            "lb-agent in {node:?} is ready, but its control socket {} does not exist; its log:\n{}",
            socket.display(),
            agent.log()
        );
        Ok(agent)
    }

    /// `lbctl --socket <control_socket_of(node)> ARGS`, bounded by `LBCTL_TIMEOUT`; its
    /// output whatever the exit status.
    pub fn lbctl_on<S: AsRef<OsStr>>(&self, node: Node, args: &[S]) -> Result<Output> {
        let mut cmd = Command::new(bin_path("lbctl")?);
        cmd.arg("--socket")
            .arg(self.control_socket_of(node))
            .args(args);
        run_bounded(cmd, LBCTL_TIMEOUT)
    }

    /// `lbctl --json status` against the agent in `node`'s namespace, parsed.
    pub fn lbctl_status_on(&self, node: Node) -> Result<Status> {
        let out = self.lbctl_on(node, &["--json", "status"])?;
        ensure!(
            out.status.success(),
            "lbctl status ({node:?}) failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        parse_status_json(&String::from_utf8_lossy(&out.stdout))
    }

    /// The MAC address of `node`'s `eth0`, as `ip link` prints it (`02:..`).
    pub fn mac_of(&self, node: Node) -> Result<String> {
        let out = ip(&["-n", &self.ns(node), "-o", "link", "show", "eth0"])?;
        let mut words = out.split_whitespace();
        words
            .find(|w| *w == "link/ether")
            .and_then(|_| words.next())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no MAC in {out:?}"))
    }

    /// What `ip neigh show ADDR dev eth0` says in `node`'s namespace (empty: no entry).
    pub fn neigh(&self, node: Node, addr: IpAddr) -> Result<String> {
        ip(&[
            "-n",
            &self.ns(node),
            "neigh",
            "show",
            &addr.to_string(),
            "dev",
            "eth0",
        ])
    }

    /// Starts a prober: a thread in the client namespace that, every `every`, opens a
    /// short connection to `addr` (connect and greeting each bounded by `timeout`),
    /// records it as an `Attempt`, and closes it. It ends by itself after `max_time`,
    /// or when the returned `Load` is stopped or dropped. `probe_gap` reads the record.
    pub fn start_probe(
        &self,
        addr: SocketAddr,
        every: Duration,
        timeout: Duration,
        max_time: Duration,
    ) -> Result<Load<'_>> {
        let pacing = Pacing::Every(every);
        self.start_recorder("probe", addr, usize::MAX, max_time, pacing, timeout)
    }
}

impl ProcessGuard<'_> {
    /// SIGKILL (no chance to clean up) and reap. Returns how it ended.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(io::Error::other("already stopped"));
        };
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // Child::kill sends SIGKILL to this child's own pid.
        child.kill()?;
        child.wait()
    }
}

impl AgentGuard<'_> {
    /// SIGKILL the agent and reap it: its XDP link goes with the process. The log
    /// stays readable; start a new agent with `Lab::spawn_agent_on`.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        self.process.kill()
    }
}
