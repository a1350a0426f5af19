//! The null forwarder: the lab bench's yardstick for one extra L2 hop. Every IPv4 and
//! IPv6 frame goes back out (`XDP_TX`) to one fixed backend with no parsing beyond the
//! EtherType and no map lookup, except the backend's own frames, which go to one fixed
//! client (the yardstick of paths whose replies cross the LB host too: NAT, proxies);
//! the rest (ARP to the host itself) goes up the stack.
//! The three MACs are constants of the loaded program, set by the loader
//! (`EbpfLoader::override_global`), so that the verifier sees them as read-only data.
//! Frags-aware (`xdp.frags`) like the LB's program, so that a veth treats both alike and
//! jumbo frames go through it too: only the first buffer's Ethernet header is touched.

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};

use crate::headers::{ETH_P_IP, ETH_P_IPV6, EthHdr};

/// The destination MAC, the backend's. Non-zero so that it lands in `.rodata`.
#[unsafe(no_mangle)]
static NULL_FWD_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
/// Where the backend's frames go: the client's MAC.
#[unsafe(no_mangle)]
static NULL_FWD_CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 3];
/// The source MAC, the forwarding host's own, so that the bridge keeps learning the
/// client's MAC on the client's port.
#[unsafe(no_mangle)]
static NULL_FWD_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

#[xdp(frags)]
pub fn null_fwd(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + core::mem::size_of::<EthHdr>() > ctx.data_end() {
        return XDP_PASS;
    }
    let eth = start as *mut EthHdr;
    // SAFETY: the bounds check above covers the whole Ethernet header.
    unsafe {
        let proto = u16::from_be_bytes((*eth).proto);
        if proto != ETH_P_IP && proto != ETH_P_IPV6 {
            return XDP_PASS;
        }
        let backend = core::ptr::read_volatile(&NULL_FWD_DST);
        (*eth).dst = if (*eth).src == backend {
            core::ptr::read_volatile(&NULL_FWD_CLIENT)
        } else {
            backend
        };
        (*eth).src = core::ptr::read_volatile(&NULL_FWD_SRC);
    }
    XDP_TX
}
