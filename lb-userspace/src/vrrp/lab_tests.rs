//! Root-only tests on real sockets: two namespaces joined by a veth pair, a speaker in
//! each (a thread that entered the namespace, with its own current-thread runtime),
//! and keepalived as the peer for the interoperability checks. Without root they say
//! loudly that they did not run (and fail under `CI=true`). Every namespace is removed
//! by a guard, also on panic; every wait is bounded.

use std::{
    fs::File,
    io::Read,
    net::IpAddr,
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::dataplane::FakeServeSwitch;

use super::{
    StateChange, VrrpConfig, VrrpState, VrrpStatus,
    net::AdvertSocket,
    packet::{self, Advert},
    spawn,
};

const A4: &str = "10.251.0.1";
const B4: &str = "10.251.0.2";
const VIP4: &str = "10.251.0.100";
const A6: &str = "fe80::a";
const B6: &str = "fe80::b";
const VIP6: &str = "fd00:251::100";
const MAC_A: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 2];
const INTERVAL_MS: u32 = 100;

fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: needs root (network namespaces), and CI=true: failing instead of skipping");
    }
    eprintln!(
        "\n*** {test}: NOT RUN: needs root. Run as root (cargo xtask test) to exercise it. ***\n"
    );
    false
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn run(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ipcmd(args: &[&str]) {
    run(Command::new("ip").args(args));
}

fn enter_netns(ns: &str) {
    let file = File::open(Path::new("/var/run/netns").join(ns))
        .unwrap_or_else(|e| panic!("opening netns {ns}: {e}"));
    // SAFETY: setns on a valid namespace fd; it changes only the calling thread.
    assert_eq!(
        unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns {ns}: {}",
        std::io::Error::last_os_error()
    );
}

/// Polls `f` every 10 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Two namespaces, `a` (interface `va`) and `b` (`vb`), joined by a veth pair, with
/// IPv4 addresses and fixed link-local IPv6 ones (no DAD wait). `Drop` deletes them.
struct Lab {
    a: String,
    b: String,
    made: Vec<String>,
    dir: PathBuf,
}

impl Lab {
    fn new(tag: &str) -> Self {
        let prefix = format!("lbvrrp{}{tag}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let mut lab = Lab {
            a: format!("{prefix}a"),
            b: format!("{prefix}b"),
            made: Vec::new(),
            dir,
        };
        std::fs::create_dir_all(&lab.dir).unwrap();
        for ns in [lab.a.clone(), lab.b.clone()] {
            ipcmd(&["netns", "add", &ns]);
            lab.made.push(ns);
        }
        let (a, b) = (lab.a.as_str(), lab.b.as_str());
        ipcmd(&[
            "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b,
        ]);
        for (ns, dev, v4, v6) in [(a, "va", A4, A6), (b, "vb", B4, B6)] {
            ipcmd(&["-n", ns, "link", "set", dev, "addrgenmode", "none"]);
            ipcmd(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ipcmd(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ipcmd(&["-n", ns, "link", "set", "lo", "up"]);
            ipcmd(&["-n", ns, "link", "set", dev, "up"]);
            // Let gratuitous ARP create neighbour entries, so the test can see them.
            run(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv4.conf.{dev}.arp_accept=1"),
            ]));
        }
        lab
    }

    fn neigh(&self, ns: &str, addr: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", ns, "neigh", "show", addr])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.made {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum Cmd {
    SetPriority(u8),
    /// Blocks the runtime the handle lives on, as a long map walk would the agent's.
    Block(Duration),
    Stop,
}

/// A speaker running on its own thread inside a namespace.
struct Speaker {
    status: Arc<ArcSwap<VrrpStatus>>,
    /// The serving switch the speaker was handed.
    switch: FakeServeSwitch,
    changes: Arc<Mutex<Vec<StateChange>>>,
    cmd: mpsc::UnboundedSender<Cmd>,
    done: std::sync::mpsc::Receiver<()>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Speaker {
    fn start(
        ns: &str,
        iface: &str,
        cfg: VrrpConfig,
        vips: Vec<IpAddr>,
        mac: [u8; 6],
        first: Option<u8>,
    ) -> Self {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        let (cmd, mut cmd_rx) = mpsc::unbounded_channel();
        let ns = ns.to_string();
        let iface = iface.to_string();
        let switch = FakeServeSwitch::default();
        let theirs = Box::new(switch.clone());
        let thread = thread::spawn(move || {
            enter_netns(&ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (handle, mut rx) = match spawn(cfg, iface, vips, mac, theirs) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                // Before the task first runs: counts from the start.
                if let Some(p) = first {
                    handle.set_priority(p);
                }
                let changes = Arc::new(Mutex::new(Vec::new()));
                let _ = ready_tx.send(Ok((handle.status.clone(), changes.clone())));
                let mut open = true;
                loop {
                    tokio::select! {
                        c = cmd_rx.recv() => match c {
                            Some(Cmd::SetPriority(p)) => handle.set_priority(p),
                            Some(Cmd::Block(d)) => thread::sleep(d),
                            Some(Cmd::Stop) | None => break,
                        },
                        c = rx.recv(), if open => match c {
                            Some(c) => changes.lock().unwrap().push(c),
                            None => open = false,
                        },
                    }
                }
                handle.shutdown().await;
                while let Ok(c) = rx.try_recv() {
                    changes.lock().unwrap().push(c);
                }
            });
            let _ = done_tx.send(());
        });
        let (status, changes) = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("speaker thread did not start")
            .unwrap_or_else(|e| panic!("spawn: {e}"));
        Speaker {
            status,
            switch,
            changes,
            cmd,
            done,
            thread: Some(thread),
        }
    }

    fn status(&self) -> VrrpStatus {
        VrrpStatus::clone(&self.status.load())
    }

    fn serving(&self) -> bool {
        self.switch.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn state(&self) -> VrrpState {
        self.status().state
    }

    fn set_priority(&self, p: u8) {
        let _ = self.cmd.send(Cmd::SetPriority(p));
    }

    /// Graceful stop; returns once the speaker has sent its last advert.
    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.cmd.send(Cmd::Stop);
            self.done
                .recv_timeout(Duration::from_secs(5))
                .expect("speaker did not stop within 5 s");
            thread.join().expect("speaker thread panicked");
        }
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        if self.thread.is_some() && !thread::panicking() {
            self.stop();
        } else if let Some(thread) = self.thread.take() {
            let _ = self.cmd.send(Cmd::Stop);
            if self.done.recv_timeout(Duration::from_secs(5)).is_ok() {
                let _ = thread.join();
            }
        }
    }
}

fn cfg(priority: u8) -> VrrpConfig {
    VrrpConfig {
        router_id: 51,
        priority,
        advert_interval_ms: INTERVAL_MS,
        preempt: true,
        preempt_delay_ms: 0,
        peers: vec![],
        auth_key_file: None,
        notify: None,
        rt_priority: 10,
    }
}

fn masters(s: &VrrpStatus) -> Option<(IpAddr, u8)> {
    s.master.as_ref().map(|m| (m.address, m.priority))
}

/// Waits for `a` master and `b` backup following it.
fn assert_elected(a: &Speaker, b: &Speaker, a_addr: &str, a_prio: u8) {
    let ok = wait_until(Duration::from_secs(3), || {
        a.state() == VrrpState::Master
            && b.state() == VrrpState::Backup
            && masters(&b.status()) == Some((ip(a_addr), a_prio))
            && b.status().counters.adverts_received >= 3
    });
    assert!(ok, "no election:\nA {:#?}\nB {:#?}", a.status(), b.status());
    // The speaker sets the switch before it publishes the state.
    assert!(
        a.serving() && !b.serving(),
        "serving: A {}, B {}",
        a.serving(),
        b.serving()
    );
}

/// Stops master `a` gracefully and checks `b` takes over within about one interval.
fn assert_handover(a: &mut Speaker, b: &Speaker) {
    let stopped = Instant::now();
    a.stop();
    assert!(
        wait_until(Duration::from_secs(2), || b.state() == VrrpState::Master),
        "no takeover: {:#?}",
        b.status()
    );
    let took = stopped.elapsed();
    eprintln!("vrrp lab: takeover after a graceful stop: {took:?}");
    assert!(!a.serving(), "a stopped speaker left its host serving");
    assert!(b.serving(), "the new master does not serve");
    assert!(
        took < Duration::from_millis(u64::from(INTERVAL_MS) * 3),
        "{took:?}"
    );
    let reason = b.status().last_transition.unwrap().reason;
    assert!(reason.contains("resigned"), "{reason}");
    let changes = b.changes.lock().unwrap().clone();
    assert_eq!(
        changes.last().map(|c| c.to),
        Some(VrrpState::Master),
        "{changes:?}"
    );
}

/// The issue "under load the pair flaps": the loop that holds the handles (the agent's)
/// stops for 15 intervals, and the election does not notice: the master keeps
/// advertising, the backup keeps following, nobody changes state.
#[test]
fn a_blocked_agent_loop_does_not_stop_the_election() {
    if !require_root("vrrp a_blocked_agent_loop_does_not_stop_the_election") {
        return;
    }
    let lab = Lab::new("m7");
    let vips = vec![ip(VIP4)];
    let a = Speaker::start(&lab.a, "va", cfg(200), vips.clone(), MAC_A, None);
    let b = Speaker::start(&lab.b, "vb", cfg(100), vips, MAC_B, None);
    assert_elected(&a, &b, A4, 200);
    let (sent, heard) = (
        a.status().counters.adverts_sent,
        b.status().counters.adverts_received,
    );
    let changes = b.changes.lock().unwrap().len();
    let block = Duration::from_millis(u64::from(INTERVAL_MS) * 15);
    let _ = a.cmd.send(Cmd::Block(block));
    let _ = b.cmd.send(Cmd::Block(block));
    // The status is read from here, while both handles' loops sleep.
    let end = Instant::now() + block;
    while Instant::now() < end {
        assert_eq!(a.state(), VrrpState::Master);
        assert_eq!(b.state(), VrrpState::Backup);
        assert!(a.serving() && !b.serving());
        thread::sleep(Duration::from_millis(20));
    }
    let (sa, sb) = (a.status(), b.status());
    // About 15 adverts each way in the time; allow for a slow machine.
    assert!(
        sa.counters.adverts_sent >= sent + 10,
        "{sent} -> {}",
        sa.counters.adverts_sent
    );
    assert!(
        sb.counters.adverts_received >= heard + 10,
        "{heard} -> {}",
        sb.counters.adverts_received
    );
    thread::sleep(Duration::from_millis(100));
    assert_eq!(b.changes.lock().unwrap().len(), changes, "b changed state");
}

#[test]
fn two_speakers_elect_one_master_and_hand_over() {
    if !require_root("vrrp two_speakers_elect_one_master_and_hand_over") {
        return;
    }
    let lab = Lab::new("m4");
    let vips = vec![ip(VIP4)];
    let mut a = Speaker::start(&lab.a, "va", cfg(200), vips.clone(), MAC_A, None);
    let b = Speaker::start(&lab.b, "vb", cfg(100), vips.clone(), MAC_B, None);
    assert_elected(&a, &b, A4, 200);
    let (sa, sb) = (a.status(), b.status());
    assert!(sa.counters.adverts_sent > 0);
    assert!(sb.counters.dropped.is_empty(), "{:?}", sb.counters.dropped);
    assert!(sa.counters.dropped.is_empty(), "{:?}", sa.counters.dropped);
    assert_eq!(sa.master.as_ref().map(|m| m.address), Some(ip(A4)));

    // The bytes on the wire decode strictly (TTL 255, checksum, version, length).
    let ns = lab.b.clone();
    let (payload, env) = thread::spawn(move || {
        enter_netns(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sock = AdvertSocket::open("vb", ip(B4), true).unwrap();
            let mut buf = vec![0u8; 4096];
            let r = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
                .await
                .expect("no advert within 2 s")
                .unwrap()
                .expect("an IPv4 header");
            (buf[r.payload.clone()].to_vec(), r.env)
        })
    })
    .join()
    .unwrap();
    assert_eq!(env.src, ip(A4));
    assert_eq!(env.dst, IpAddr::V4(packet::GROUP_V4));
    assert_eq!(env.ttl, 255);
    let adv = packet::decode(&payload, &env, 51, None, Duration::ZERO).unwrap();
    assert_eq!(
        adv,
        Advert {
            router_id: 51,
            priority: 200,
            interval_cs: 10,
            addresses: vips.clone()
        }
    );

    // The gratuitous ARP moved the VIP to A's MAC in B's neighbour table.
    let neigh = lab.neigh(&lab.b, VIP4);
    assert!(neigh.contains("02:aa:00:00:00:01"), "{neigh:?}");
    assert!(sa.counters.announcements_sent >= 1);

    assert_handover(&mut a, &b);
    // And B's announcements move it back the other way.
    assert!(
        wait_until(Duration::from_secs(1), || lab
            .neigh(&lab.a, VIP4)
            .contains("02:bb:00:00:00:02")),
        "{:?}",
        lab.neigh(&lab.a, VIP4)
    );
}

#[test]
fn ipv6_speakers_elect_and_hand_over() {
    if !require_root("vrrp ipv6_speakers_elect_and_hand_over") {
        return;
    }
    let lab = Lab::new("m6");
    let vips = vec![ip(VIP6), ip(VIP4)];
    let mut a = Speaker::start(&lab.a, "va", cfg(200), vips.clone(), MAC_A, None);
    let b = Speaker::start(&lab.b, "vb", cfg(100), vips, MAC_B, None);
    assert_elected(&a, &b, A6, 200);
    assert_eq!(a.status().address, ip(A6));
    assert!(
        b.status().counters.dropped.is_empty(),
        "{:?}",
        b.status().counters.dropped
    );
    // One announcement per VIP (both families) per round.
    assert!(a.status().counters.announcements_sent >= 2);
    assert_eq!(a.status().counters.announcement_errors, 0);
    assert_handover(&mut a, &b);
}

#[test]
fn unicast_authenticated_speakers() {
    if !require_root("vrrp unicast_authenticated_speakers") {
        return;
    }
    let lab = Lab::new("ua");
    let key = lab.dir.join("vrrp.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    let other_key = lab.dir.join("other.key");
    std::fs::write(&other_key, "another key, also long enough!!\n").unwrap();
    let vips = vec![ip(VIP4)];
    let peer = |p: &str, k: &Path, prio| VrrpConfig {
        peers: vec![ip(p)],
        auth_key_file: Some(k.to_path_buf()),
        ..cfg(prio)
    };
    let mut a = Speaker::start(&lab.a, "va", peer(B4, &key, 200), vips.clone(), MAC_A, None);
    let mut b = Speaker::start(&lab.b, "vb", peer(A4, &key, 100), vips.clone(), MAC_B, None);
    assert_elected(&a, &b, A4, 200);
    assert!(b.status().authenticated);
    assert!(
        b.status().counters.dropped.is_empty(),
        "{:?}",
        b.status().counters.dropped
    );

    // A peer with another key hears nothing it trusts: it counts and becomes master.
    b.stop();
    let c = Speaker::start(&lab.b, "vb", peer(A4, &other_key, 100), vips, MAC_B, None);
    assert!(
        wait_until(Duration::from_secs(3), || c.state() == VrrpState::Master
            && c.status()
                .counters
                .dropped
                .get("auth_bad_hmac")
                .is_some_and(|n| *n >= 3)),
        "{:#?}",
        c.status()
    );
    assert_eq!(c.status().counters.adverts_received, 0);
    a.stop();
}

/// keepalived as the peer (VRRPv3, advert_int 0.1): its adverts pass our strict
/// decoder, ours pass its checks (it yields to our higher priority), multicast and
/// unicast; and its priority-0 advert on SIGTERM makes us take over at once.
#[test]
fn interoperates_with_keepalived() {
    if !require_root("vrrp interoperates_with_keepalived") {
        return;
    }
    let candidates = std::env::var_os("LB_KEEPALIVED")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/sbin/keepalived",
                "/sbin/keepalived",
                "/usr/local/sbin/keepalived",
            ]
            .into_iter()
            .map(PathBuf::from),
        );
    let Some(keepalived) = candidates.into_iter().find(|p| p.is_file()) else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("keepalived is not installed (cargo xtask setup installs it)");
        }
        eprintln!(
            "\n*** vrrp interoperates_with_keepalived: NOT RUN: keepalived is not installed ***\n"
        );
        return;
    };
    for unicast in [false, true] {
        keepalived_round(&keepalived, unicast, false);
    }
    // keepalived's auth_hmac trailer, our authenticated format, came with 2.4.
    if keepalived_version(&keepalived).is_some_and(|v| v >= (2, 4)) {
        for unicast in [false, true] {
            keepalived_round(&keepalived, unicast, true);
        }
    } else {
        eprintln!(
            "vrrp lab: {} is older than 2.4 (no auth_hmac): authenticated adverts not checked \
             against it (set LB_KEEPALIVED to a newer one)",
            keepalived.display()
        );
    }
}

/// (major, minor) from `keepalived --version` ("Keepalived v2.2.7 (...)").
fn keepalived_version(bin: &Path) -> Option<(u32, u32)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split('.').map(|n| n.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// keepalived in a namespace; `Drop` stops it (SIGTERM, then SIGKILL).
struct Keepalived {
    child: Child,
    log: PathBuf,
}

impl Keepalived {
    fn start(bin: &Path, lab: &Lab, unicast: bool, key: Option<&Path>) -> Self {
        let conf = lab.dir.join(format!("keepalived-{unicast}.conf"));
        let log = lab.dir.join(format!("keepalived-{unicast}.log"));
        let mut peers = if unicast {
            format!("    unicast_src_ip {A4}\n    unicast_peer {{\n        {B4}\n    }}\n")
        } else {
            String::new()
        };
        if let Some(key) = key {
            peers += &format!(
                "    auth_hmac {{\n        key 1 file:{}\n        active_key 1\n        mode enforce\n    }}\n",
                key.display()
            );
        }
        std::fs::write(
            &conf,
            format!(
                "global_defs {{\n    router_id lbtest\n    vrrp_version 3\n    enable_script_security\n}}\n\
                 vrrp_instance lbtest {{\n    state BACKUP\n    interface va\n    virtual_router_id 51\n    \
                 priority 200\n    advert_int 0.1\n{peers}    virtual_ipaddress {{\n        {VIP4}/32\n    }}\n}}\n"
            ),
        )
        .unwrap();
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let pid = |n: &str| lab.dir.join(format!("{n}-{unicast}.pid"));
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.a])
            .arg(bin)
            .args([
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--vrrp",
                "--no-syslog",
                "--use-file",
            ])
            .arg(&conf)
            .arg("--pid")
            .arg(pid("keepalived"))
            .arg("--vrrp_pid")
            .arg(pid("vrrp"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting keepalived");
        Keepalived { child, log }
    }

    fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn terminate(&self) {
        // SAFETY: signalling the child we started, by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    fn stop(&mut self) {
        self.terminate();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

fn keepalived_round(bin: &Path, unicast: bool, auth: bool) {
    let lab = Lab::new(match (unicast, auth) {
        (false, false) => "km",
        (true, false) => "ku",
        (false, true) => "kma",
        (true, true) => "kua",
    });
    let key = auth.then(|| {
        let key = lab.dir.join("vrrp.key");
        std::fs::write(&key, "a shared secret of 32 bytes here\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        key
    });
    let mut ka = Keepalived::start(bin, &lab, unicast, key.as_deref());
    assert!(
        wait_until(Duration::from_secs(10), || ka
            .log()
            .contains("Entering MASTER STATE")),
        "keepalived never became master:\n{}",
        ka.log()
    );
    let mut config = cfg(250);
    if unicast {
        config.peers = vec![ip(A4)];
    }
    config.auth_key_file = key.clone();
    // Configured 250, but 100 from the start: follow keepalived first.
    let ours = Speaker::start(&lab.b, "vb", config, vec![ip(VIP4)], MAC_B, Some(100));
    let ok = wait_until(Duration::from_secs(3), || {
        let s = ours.status();
        s.state == VrrpState::Backup
            && masters(&s) == Some((ip(A4), 200))
            && s.counters.adverts_received >= 3
    });
    let s = ours.status();
    assert!(
        ok,
        "not following keepalived (unicast {unicast}, auth {auth}): {s:#?}\n{}",
        ka.log()
    );
    assert!(
        s.counters.dropped.is_empty(),
        "unicast {unicast}: {:?}",
        s.counters.dropped
    );

    // 250 > 200: we preempt, and keepalived accepts our adverts and yields.
    let mark = ka.log().len();
    ours.set_priority(250);
    let ok = wait_until(Duration::from_secs(3), || {
        ours.state() == VrrpState::Master && ka.log()[mark..].contains("Entering BACKUP STATE")
    });
    assert!(
        ok,
        "keepalived did not yield (unicast {unicast}, auth {auth}): {:#?}\n{}",
        ours.status(),
        ka.log()
    );
    thread::sleep(Duration::from_millis(500));
    let log = ka.log();
    assert_eq!(ours.state(), VrrpState::Master);
    assert!(
        !log[mark..].contains("Entering MASTER STATE"),
        "flapping:\n{log}"
    );
    assert!(
        !log.contains("Invalid VRRPv3 checksum"),
        "keepalived saw a bad checksum:\n{log}"
    );
    for complaint in [
        "authentication trailer",
        "authentication HMAC",
        "authentication key",
    ] {
        assert!(!log.contains(complaint), "keepalived: {complaint}:\n{log}");
    }
    // Nor did it fall back to the pre-1.3.6 unicast checksum (group address).
    assert!(!log.contains("old version"), "{log}");
    assert!(
        !log.contains("too short") && !log.contains("too long"),
        "{log}"
    );

    if !unicast {
        // Back to 100: keepalived preempts us again...
        ours.set_priority(100);
        assert!(
            wait_until(Duration::from_secs(3), || ours.state() == VrrpState::Backup
                && masters(&ours.status()) == Some((ip(A4), 200))),
            "{:#?}\n{}",
            ours.status(),
            ka.log()
        );
        // ...and its priority 0 on SIGTERM hands the VIPs back at once.
        let stopped = Instant::now();
        ka.terminate();
        assert!(
            wait_until(Duration::from_secs(2), || ours.state() == VrrpState::Master),
            "{:#?}",
            ours.status()
        );
        let took = stopped.elapsed();
        eprintln!("vrrp lab: takeover after keepalived's SIGTERM: {took:?}");
        let reason = ours.status().last_transition.unwrap().reason;
        assert!(reason.contains("resigned"), "{reason}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        ka.stop();
    }
    let s = ours.status();
    assert!(
        s.counters.dropped.is_empty(),
        "unicast {unicast}: {:?}",
        s.counters.dropped
    );
    drop(ours);
    drop(ka);
}
