//! The lab bench's null forwarder (`lb-ebpf/src/null_fwd.rs`) under BPF_PROG_TEST_RUN:
//! every IPv4 and IPv6 frame goes back out (`XDP_TX`) with the MACs set at load time
//! (to the backend, or from the backend to the client) and not another byte changed;
//! anything else (ARP) goes up the stack untouched.
//! Needs root (it loads BPF).

use std::net::Ipv4Addr;

use anyhow::Result;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::names;
use lb_tests::{
    bench::comparative::load_xdp,
    packet::{ACK, ETH_P_ARP, SYN, arp, ethernet, tcp_frame},
    require_root,
    rig::{CLIENT_MAC, LB_MAC, XDP_PASS, XDP_TX},
};

const BACKEND_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 0x07];

/// The verdict and output frame of one run.
fn run(program: &mut Xdp, input: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; input.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    opts.repeat = 1;
    let result = program.test_run(opts)?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

#[test]
fn null_forwarder_rewrites_only_the_macs() -> Result<()> {
    if !require_root("null_forwarder_rewrites_only_the_macs") {
        return Ok(());
    }
    let mut ebpf = load_xdp(
        names::PROG_NULL_FWD,
        &[
            (names::GLOBAL_NULL_FWD_DST, BACKEND_MAC),
            (names::GLOBAL_NULL_FWD_SRC, LB_MAC),
            (names::GLOBAL_NULL_FWD_CLIENT, CLIENT_MAC),
        ],
    )?;
    let program: &mut Xdp = ebpf
        .program_mut(names::PROG_NULL_FWD)
        .ok_or_else(|| anyhow::anyhow!("no {}", names::PROG_NULL_FWD))?
        .try_into()?;

    let client = ("10.77.0.2".parse()?, 40000);
    let vip = ("10.77.0.100".parse()?, 80);
    let client6 = ("fd00:77::2".parse()?, 40000);
    let vip6 = ("fd00:77::100".parse()?, 80);
    // The client's frames go to the backend, the backend's replies to the client, as
    // they are.
    for (input, to) in [
        (
            tcp_frame(LB_MAC, CLIENT_MAC, None, client, vip, SYN),
            BACKEND_MAC,
        ),
        (
            tcp_frame(LB_MAC, CLIENT_MAC, None, client6, vip6, SYN),
            BACKEND_MAC,
        ),
        (
            tcp_frame(LB_MAC, BACKEND_MAC, None, vip, client, SYN | ACK),
            CLIENT_MAC,
        ),
        (
            tcp_frame(LB_MAC, BACKEND_MAC, None, vip6, client6, SYN | ACK),
            CLIENT_MAC,
        ),
    ] {
        let (verdict, output) = run(program, &input)?;
        assert_eq!(verdict, XDP_TX);
        let mut expected = input.clone();
        expected[..6].copy_from_slice(&to);
        expected[6..12].copy_from_slice(&LB_MAC);
        assert_eq!(output, expected);
    }

    let request = arp(
        1,
        CLIENT_MAC,
        Ipv4Addr::new(10, 77, 0, 2),
        [0; 6],
        Ipv4Addr::new(10, 77, 0, 3),
    );
    let frame = ethernet([0xff; 6], CLIENT_MAC, None, ETH_P_ARP, &request);
    let (verdict, output) = run(program, &frame)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(output, frame);
    Ok(())
}
