//! Topology: the namespaces, the bridge, the veths and the addresses of a lab, the
//! guards that remove them, and `in_ns` to run code inside one of them.

use std::{
    ffi::OsStr,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
};

use anyhow::{Context, Result, anyhow, bail};

use super::{CLIENT_NET4, Lab, ROUTED_VIP4, ROUTED_VIPS4, VIP4, VIP6};

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
    /// The third load balancer (`LabBuilder::third_lb`), 10.77.0.5 / fd00:77::5, set up
    /// like the second.
    Lb3,
    /// A router on the bridge, 10.77.0.1 / fd00:77::1: in a routed lab
    /// (`LabBuilder::routed`) the client sits behind it (10.78.0.0/24); with
    /// `LabBuilder::routed_backend`, `Routed` does (10.79.0.0/24, fd00:79::/64).
    Router,
    /// Backend `i`, counted from 1.
    Backend(usize),
    /// A stock backend behind `Router`, 10.79.0.2 / fd00:79::2, with routes to the VIPs
    /// and the LB hosts only (none to the client).
    Routed,
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
            Node::Lb3 => "lb3".into(),
            Node::Router => "rt".into(),
            Node::Backend(i) => format!("b{i}"),
            Node::Routed => "far".into(),
        }
    }

    /// The last number of the node's addresses (`10.77.0.<n>`, `fd00:77::<n>`).
    fn host_number(self) -> Option<usize> {
        match self {
            Node::Bridge => None,
            Node::Client => Some(2),
            Node::Lb => Some(3),
            Node::Lb2 => Some(4),
            Node::Lb3 => Some(5),
            Node::Router => Some(1),
            Node::Backend(i) => Some(10 + i),
            Node::Routed => Some(2),
        }
    }

    /// The name of this node's veth peer inside the bridge namespace.
    pub fn peer_name(self) -> String {
        format!("v{}", self.short_name())
    }
}

/// The node's IPv4 address on the bridge, `10.77.0.<n>`. Panics for the bridge, which
/// has none. In a routed lab the client is not on the bridge: see `CLIENT_ROUTED4`.
pub fn addr4(node: Node) -> Ipv4Addr {
    let n = node
        .host_number()
        .expect("the bridge namespace has no address");
    let subnet = if node == Node::Routed { 79 } else { 77 };
    Ipv4Addr::new(10, subnet, 0, n as u8)
}

/// The node's IPv6 address, `fd00:77::<n>` with the same digits as the IPv4 one
/// (backend 1 is `fd00:77::11`). Panics for the bridge.
pub fn addr6(node: Node) -> Ipv6Addr {
    let n = node
        .host_number()
        .expect("the bridge namespace has no address");
    let subnet = if node == Node::Routed { 79 } else { 77 };
    format!("fd00:{subnet}::{n}")
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

/// The client's and the router's addresses on the client's subnet of a routed lab.
pub fn client_net_addresses() -> (Ipv4Addr, Ipv4Addr) {
    (Ipv4Addr::new(10, 78, 0, 2), Ipv4Addr::new(10, 78, 0, 1))
}

/// Where `/var/run/netns/NAME` lives.
fn netns_path(ns: &str) -> PathBuf {
    Path::new("/var/run/netns").join(ns)
}

pub(super) fn enter_netns(ns: &str) -> io::Result<()> {
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

/// A named network namespace; `Drop` deletes it, and with it every link inside.
pub(super) struct Netns {
    name: String,
}

impl Netns {
    pub(super) fn add(name: String) -> Result<Self> {
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

/// Loads `xdp_pass` and attaches it (native) to `peer` in the bridge namespace `br`;
/// the link lives as long as the returned value. aya resolves the interface name in
/// the calling thread's namespace.
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

impl Lab {
    /// Every node of the lab, the bridge first (and the router before the client that
    /// sits behind it).
    pub fn nodes(&self) -> Vec<Node> {
        let mut nodes = vec![Node::Bridge];
        if self.routed {
            nodes.push(Node::Router);
        }
        nodes.push(Node::Client);
        nodes.extend(self.lbs());
        nodes.extend((1..=self.backends).map(Node::Backend));
        if self.routed_backend {
            if !self.routed {
                nodes.push(Node::Router);
            }
            nodes.push(Node::Routed);
        }
        nodes
    }

    /// The load balancers: `Node::Lb`, `Node::Lb2` with `LabBuilder::second_lb`, and
    /// `Node::Lb3` with `LabBuilder::third_lb`.
    pub fn lbs(&self) -> Vec<Node> {
        let mut lbs = vec![Node::Lb];
        if self.second_lb {
            lbs.push(Node::Lb2);
        }
        if self.third_lb {
            lbs.push(Node::Lb3);
        }
        lbs
    }

    /// The network namespace name of `node`, e.g. `lbt1234x0-b2`.
    pub fn ns(&self, node: Node) -> String {
        format!("{}-{}", self.prefix, node.short_name())
    }

    pub(super) fn setup(&mut self) -> Result<()> {
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
        // A switch runs no netfilter: with `br_netfilter` loaded, every new namespace's
        // bridges would pass each frame through the IP hooks (`br_nf_*`, 8% of the LB's
        // CPU during a bulk stream in the lab bench), work no real segment does.
        if Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
            self.sysctl(
                Node::Bridge,
                &[
                    "net.bridge.bridge-nf-call-iptables=0",
                    "net.bridge.bridge-nf-call-ip6tables=0",
                    "net.bridge.bridge-nf-call-arptables=0",
                ],
            )?;
        }

        for node in self.nodes().into_iter().skip(1) {
            if self.routed && node == Node::Client {
                self.plug_behind_router()?;
            } else if node != Node::Routed {
                self.plug(node)?;
            }
        }
        if self.routed {
            self.route_backends_to_client()?;
        }
        if self.routed_backend {
            self.route_far()?;
        }

        // Native XDP_TX on an LB's veth only delivers when the peer has an XDP program
        // too.
        for lb in self.lbs() {
            self.xdp_pass.push(xdp_pass_on(&br, &lb.peer_name())?);
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
        let dsr_backend = matches!(node, Node::Backend(_)) && !self.stock_backends;
        if dsr_backend {
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
        // The node's own addresses on eth0; on a backend, the VIPs on lo as well.
        let mut addresses = vec![(format!("{}/24", addr4(node)), "eth0")];
        if self.ipv6 {
            addresses.push((format!("{}/64", addr6(node)), "eth0"));
        }
        if dsr_backend {
            addresses.push((format!("{VIP4}/32"), "lo"));
            if self.ipv6 {
                addresses.push((format!("{VIP6}/128"), "lo"));
            }
        }
        for (address, dev) in &addresses {
            let mut args = vec!["-n", &ns, "addr", "add", address, "dev", dev];
            if address.contains(':') {
                args.push("nodad");
            }
            ip(&args)?;
        }
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// A routed lab's client: a veth of its own to the router (`eth0` here, `eth1`
    /// there), its subnet `CLIENT_NET4`, and a route to the routed VIPs via the router;
    /// the router forwards, hashes on ports for ECMP and checks no source path.
    fn plug_behind_router(&self) -> Result<()> {
        let cl = self.ns(Node::Client);
        let rt = self.ns(Node::Router);
        self.sysctl(
            Node::Router,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        ip(&[
            "link", "add", "eth0", "netns", &cl, "type", "veth", "peer", "name", "eth1", "netns",
            &rt,
        ])?;
        // Checksums complete on the wire: the router forwards in software, but the LB's
        // native XDP drops the skb metadata that would finish them.
        run(Command::new("ip").args(["netns", "exec", &cl, "ethtool", "-K", "eth0", "tx", "off"]))?;
        let (client, router) = client_net_addresses();
        ip(&[
            "-n",
            &cl,
            "addr",
            "add",
            &format!("{client}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &rt,
            "addr",
            "add",
            &format!("{router}/24"),
            "dev",
            "eth1",
        ])?;
        ip(&["-n", &cl, "link", "set", "eth0", "up"])?;
        ip(&["-n", &rt, "link", "set", "eth1", "up"])?;
        ip(&[
            "-n",
            &cl,
            "route",
            "add",
            ROUTED_VIPS4,
            "via",
            &router.to_string(),
        ])?;
        Ok(())
    }

    /// Backends of a routed lab: the routed VIP on `lo` too, and the way back to the
    /// client through the router (their replies go straight there: DSR).
    fn route_backends_to_client(&self) -> Result<()> {
        for i in 1..=self.backends {
            let ns = self.ns(Node::Backend(i));
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ROUTED_VIP4}/32"),
                "dev",
                "lo",
            ])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                CLIENT_NET4,
                "via",
                &addr4(Node::Router).to_string(),
            ])?;
        }
        Ok(())
    }

    /// `Node::Routed` behind `Node::Router`: a veth pair between them, forwarding on the
    /// router, routes from the LB hosts to the far subnet, and from the far backend to
    /// the VIPs and the LB hosts only.
    fn route_far(&self) -> Result<()> {
        let rt = self.ns(Node::Router);
        let far = self.ns(Node::Routed);
        self.sysctl(
            Node::Routed,
            &[
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        self.sysctl(
            Node::Router,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )?;
        ip(&[
            "link", "add", "eth2", "netns", &rt, "type", "veth", "peer", "name", "eth0", "netns",
            &far,
        ])?;
        for (ns, dev, v4, v6) in [
            (&rt, "eth2", "10.79.0.1/24", "fd00:79::1/64"),
            (&far, "eth0", "10.79.0.2/24", "fd00:79::2/64"),
        ] {
            run(Command::new("ip").args(["netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"]))?;
            ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
            if self.ipv6 {
                ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])?;
            }
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        let mut far_routes = vec![format!("{VIP4}/32")];
        let mut far_routes6 = vec![format!("{VIP6}/128")];
        for lb in self.lbs() {
            far_routes.push(format!("{}/32", addr4(lb)));
            far_routes6.push(format!("{}/128", addr6(lb)));
            ip(&[
                "-n",
                &self.ns(lb),
                "route",
                "add",
                "10.79.0.0/24",
                "via",
                &addr4(Node::Router).to_string(),
            ])?;
            if self.ipv6 {
                ip(&[
                    "-n",
                    &self.ns(lb),
                    "route",
                    "add",
                    "fd00:79::/64",
                    "via",
                    &addr6(Node::Router).to_string(),
                ])?;
            }
        }
        for r in &far_routes {
            ip(&["-n", &far, "route", "add", r, "via", "10.79.0.1"])?;
        }
        if self.ipv6 {
            for r in &far_routes6 {
                ip(&["-n", &far, "route", "add", r, "via", "fd00:79::1"])?;
            }
        }
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

    /// `mac_of` as bytes.
    pub fn mac_bytes_of(&self, node: Node) -> Result<[u8; 6]> {
        parse_mac(&self.mac_of(node)?)
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
        if self.routed {
            show(Node::Router, &["ip", "route"]);
            show(Node::Router, &["ip", "-s", "link"]);
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

/// A MAC address as `ip link` writes it (`02:..`), as bytes.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    if parts.len() != 6 {
        bail!("not a MAC address: {text:?}");
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("not a MAC: {text:?}"))?;
    }
    Ok(mac)
}
