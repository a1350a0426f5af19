//! Jumbo frames through the LB (XDP multi-buffer, `xdp.frags`), in a network-namespace
//! lab: every veth and the bridge at MTU 9000, a client uploading megabytes to a VIP
//! in segments of about 9000 bytes, the backend echoing them straight back (DSR).
//! Needs root; see `lb_tests::lab`.
//!
//! Why frags matter here: a frame longer than a page no longer fits one XDP buffer, so
//! the veth hands it over as a first buffer (the headers) plus fragments. A veth takes
//! an XDP program that is not frags-aware only while its peer's MTU fits one page less
//! headroom (about 3,500 bytes), and then caps the peer's MTU there
//! (drivers/net/veth.c, `veth_xdp_set`: ERANGE, "Peer MTU is too large to set XDP").
//! So without frags support the agent could not attach at MTU 9000 at all, nor could
//! the lab's `xdp_pass` sit on the bridge side of the LB's veth. Both programs are
//! declared `#[xdp(frags)]`; the program reads and writes only the first buffer.
//! Not tested here: the failure without frags (read from the kernel source).

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lb_tests::lab::{Lab, Node, SERVICE_PORT, Service, VIP4};

const MTU: &str = "9000";
/// Lines of `LINE` bytes each (newline included): 8 MB each way.
const LINES: usize = 2000;
const LINE: usize = 4000;
/// The whole transfer's budget; each read and write has its own timeout too.
const BUDGET: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Line `i`: printable bytes that differ from line to line, then a newline.
fn line(i: usize) -> Vec<u8> {
    let mut out: Vec<u8> = (0..LINE - 1)
        .map(|j| b'!' + ((i * 31 + j * 7 + j / 97) % 90) as u8)
        .collect();
    out.push(b'\n');
    out
}

/// Sets MTU 9000 on every node's `eth0`, on their peers in the bridge namespace and
/// on the bridge.
fn jumbo(lab: &Lab, nodes: &[Node]) -> Result<()> {
    for node in nodes {
        lab.run(*node, &["ip", "link", "set", "eth0", "mtu", MTU])
            .with_context(|| format!("MTU {MTU} on {node:?}'s eth0"))?;
        let peer = format!("v{}", node.short_name());
        lab.run(Node::Bridge, &["ip", "link", "set", &peer, "mtu", MTU])
            .with_context(|| format!("MTU {MTU} on {peer}"))?;
    }
    lab.run(Node::Bridge, &["ip", "link", "set", "br0", "mtu", MTU])?;
    Ok(())
}

#[test]
fn jumbo_frames_are_forwarded_whole_and_counted_whole() -> Result<()> {
    if !lb_tests::require_root("jumbo_frames_are_forwarded_whole_and_counted_whole") {
        return Ok(());
    }
    let lab = Lab::builder().backends(1).build()?;
    lab.start_servers(SERVICE_PORT)?;
    jumbo(&lab, &[Node::Client, Node::Lb, Node::Backend(1)])?;
    let agent = lab.spawn_agent(&lab.config(
        "native",
        &[Service::new("web", VIP4, SERVICE_PORT).backends(1..=1)],
    ))?;
    let mtu = lab.run(Node::Lb, &["ip", "-d", "link", "show", "eth0"])?;
    ensure!(
        mtu.contains(&format!("mtu {MTU}")) && mtu.contains("xdp"),
        "the LB's eth0 is not at MTU {MTU} with the program attached:\n{mtu}"
    );
    let before = lab.lbctl_status()?;

    let vip: SocketAddr = (VIP4, SERVICE_PORT).into();
    let stream = lab
        .connect(vip, IO_TIMEOUT)
        .with_context(|| format!("connecting to {vip}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut greeting = String::new();
    reader.read_line(&mut greeting)?;
    ensure!(greeting.trim_end() == "b1", "greeted by {greeting:?}");

    let start = Instant::now();
    // Written from a thread of its own: the echo comes back while we send, and a
    // writer that waits for its reader (or the other way round) would stall both.
    let sender = thread::spawn(move || -> std::io::Result<()> {
        // In writes of many lines, so that segments are as long as the MSS allows.
        let all: Vec<u8> = (0..LINES).flat_map(line).collect();
        for chunk in all.chunks(64 * 1024) {
            writer.write_all(chunk)?;
        }
        writer.flush()
    });
    let mut got = Vec::with_capacity(LINE);
    for i in 0..LINES {
        ensure!(
            start.elapsed() < BUDGET,
            "only {i} of {LINES} lines back in {BUDGET:?}"
        );
        got.clear();
        let n = reader
            .read_until(b'\n', &mut got)
            .with_context(|| format!("reading line {i} back\n{}", lab.diagnostics()))?;
        ensure!(n > 0, "the connection closed after {i} lines");
        ensure!(got == line(i), "line {i} came back changed ({n} bytes)");
    }
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender panicked"))?
        .context("sending")?;
    let took = start.elapsed();
    // The largest segment the backend received on this connection (still open).
    let port = format!(":{SERVICE_PORT}");
    let ss = lab.run(
        Node::Backend(1),
        &["ss", "-tni", "state", "established", "sport", "=", &port],
    )?;
    let rcv_mss: u64 = ss
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rcvmss:"))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no rcvmss in the backend's ss output:\n{ss}"))?;

    let after = lab.lbctl_status()?;
    let (packets, bytes) = match (before.services.first(), after.services.first()) {
        (Some(b), Some(a)) => (a.packets - b.packets, a.bytes - b.bytes),
        _ => anyhow::bail!("no service in lbctl status"),
    };
    let sent = (LINES * LINE) as u64;
    println!(
        "{sent} bytes through the LB and back in {took:.2?}; segments of up to {rcv_mss} \
         bytes reached the backend; the VIP counted {packets} packets (data and ACKs), \
         {bytes} bytes"
    );
    // Segments longer than a page went through the LB: multi-buffer frames.
    ensure!(
        rcv_mss > 4096,
        "the backend received segments of at most {rcv_mss} bytes:\n{ss}"
    );
    // Whole frames are counted: at least every byte sent (counting the first buffers
    // only would give well under half of it).
    ensure!(
        bytes >= sent,
        "the VIP counted {bytes} bytes of {sent} sent"
    );
    drop(agent);
    Ok(())
}
