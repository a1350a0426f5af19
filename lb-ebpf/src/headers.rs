//! Wire headers, byte arrays only (alignment 1), read with explicit byte order, and the
//! one bounds-checked accessor every stage uses.

use aya_ebpf::{helpers::bpf_xdp_get_buff_len, programs::XdpContext};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub version_class_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub data_off: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urgent: [u8; 2],
}

#[repr(C)]
pub struct ArpHdr {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub oper: [u8; 2],
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

/// ICMPv6 neighbour solicitation / advertisement body (RFC 4861 4.3, 4.4) without options.
#[repr(C)]
pub struct NdMsg {
    pub icmp_type: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub flags: [u8; 4],
    pub target: [u8; 16],
}

pub const ETH_HLEN: usize = core::mem::size_of::<EthHdr>();
pub const IPV4_HLEN: usize = core::mem::size_of::<Ipv4Hdr>();
pub const IPV6_HLEN: usize = core::mem::size_of::<Ipv6Hdr>();
pub const TCP_HLEN: usize = core::mem::size_of::<TcpHdr>();

/// The group bit of a MAC address: multicast or broadcast.
#[inline(always)]
pub fn is_multicast_mac(mac: &[u8; 6]) -> bool {
    mac[0] & 1 != 0
}

/// A MAC as three 16-bit words, in memory order.
#[inline(always)]
pub fn mac_halves(mac: &[u8; 6]) -> [u16; 3] {
    [
        u16::from_ne_bytes([mac[0], mac[1]]),
        u16::from_ne_bytes([mac[2], mac[3]]),
        u16::from_ne_bytes([mac[4], mac[5]]),
    ]
}

/// Whether the MAC at `p` in the frame is `mac`: three 16-bit loads (a MAC is 2-aligned
/// in the kernel's model of a frame, see `packet_word`) where bytes take six.
///
/// # Safety
/// `p .. p + 6` is within the frame, bounds-checked.
#[inline(always)]
pub unsafe fn packet_mac_is(p: *const [u8; 6], mac: &[u8; 6]) -> bool {
    let p = p as *const u16;
    let m = mac_halves(mac);
    // SAFETY: the caller's.
    unsafe { p.read() == m[0] && p.add(1).read() == m[1] && p.add(2).read() == m[2] }
}

/// Writes `mac` at `p` in the frame as three 16-bit stores (see `packet_mac_is`).
///
/// # Safety
/// `p .. p + 6` is within the frame, bounds-checked.
#[inline(always)]
pub unsafe fn packet_set_mac(p: *mut [u8; 6], mac: &[u8; 6]) {
    let p = p as *mut u16;
    let m = mac_halves(mac);
    // SAFETY: the caller's.
    unsafe {
        p.write(m[0]);
        p.add(1).write(m[1]);
        p.add(2).write(m[2]);
    }
}

/// Writes the frame's destination and source MACs (`packet_set_mac`).
///
/// # Safety
/// `eth` is the frame's Ethernet header, bounds-checked.
#[inline(always)]
pub unsafe fn packet_set_macs(eth: *mut EthHdr, dst: &[u8; 6], src: &[u8; 6]) {
    // SAFETY: the caller's; both fields within the header.
    unsafe {
        packet_set_mac(core::ptr::addr_of_mut!((*eth).dst), dst);
        packet_set_mac(core::ptr::addr_of_mut!((*eth).src), src);
    }
}

/// Writes `mac` over `to`, of any alignment: a plain assignment of a `[u8; 6]` may
/// become a call to a byte-by-byte `memmove` (the BPF backend's), which NAT's next-hop
/// writes did. The BPF backend splits these unaligned stores into bytes; a MAC in the
/// frame takes `packet_set_mac`'s three 16-bit stores instead.
#[inline(always)]
pub fn set_mac(to: *mut [u8; 6], mac: &[u8; 6]) {
    let to = to as *mut u8;
    // SAFETY: `to` points at 6 writable bytes (a header field); unaligned stores.
    unsafe {
        core::ptr::write_unaligned(
            to as *mut u32,
            u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]),
        );
        core::ptr::write_unaligned(to.add(4) as *mut u16, u16::from_ne_bytes([mac[4], mac[5]]));
    }
}

/// Writes a 16-byte address over `to` as four 32-bit stores (see `set_mac`).
#[inline(always)]
pub fn set_addr(to: *mut [u8; 16], addr: &[u8; 16]) {
    let to = to as *mut u32;
    let mut i = 0;
    while i < 4 {
        let w = u32::from_ne_bytes([
            addr[4 * i],
            addr[4 * i + 1],
            addr[4 * i + 2],
            addr[4 * i + 3],
        ]);
        // SAFETY: `to` points at 16 writable bytes; unaligned stores.
        unsafe { core::ptr::write_unaligned(to.add(i), w) };
        i += 1;
    }
}

/// An address as the maps hold it (IPv4 in the first 4 bytes), 4-aligned on the stack,
/// so that the key builders' reads of its words (`keys`) are single loads.
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct Addr(pub [u8; 16]);

impl Addr {
    /// An IPv4 address read from the packet at `p` as one 32-bit load.
    ///
    /// # Safety
    /// `p` points at 4 bytes of the frame, bounds-checked (`ptr_at`).
    #[inline(always)]
    pub unsafe fn v4(p: *const [u8; 4]) -> Self {
        let mut a = Addr([0; 16]);
        // SAFETY: the caller's 4 bytes; `a` is 4-aligned (see `packet_word`).
        unsafe { (a.0.as_mut_ptr() as *mut u32).write(packet_word(p as *const u8, 0)) };
        a
    }

    /// An IPv6 address read from the packet at `p` as four 32-bit loads.
    ///
    /// # Safety
    /// `p` points at 16 bytes of the frame, bounds-checked (`ptr_at`).
    #[inline(always)]
    pub unsafe fn v6(p: *const [u8; 16]) -> Self {
        let mut a = Addr([0; 16]);
        let out = a.0.as_mut_ptr() as *mut u32;
        let mut i = 0;
        while i < 4 {
            // SAFETY: the caller's 16 bytes; `a` is 4-aligned.
            unsafe { out.add(i).write(packet_word(p as *const u8, i)) };
            i += 1;
        }
        a
    }
}

/// Bytes `4 * i .. 4 * i + 4` at `p` in the frame as one 32-bit load, in memory order.
/// A load through a byte array (alignment 1) becomes four byte loads and the shifts to
/// join them. The fields read so (IP addresses, the TCP ports) are 4-aligned in the
/// kernel's model of a frame (NET_IP_ALIGN before the Ethernet header, which a VLAN tag
/// keeps), which is what the verifier checks where unaligned access is slow; elsewhere
/// it lets packet loads of any alignment through.
///
/// # Safety
/// `p + 4 * i .. p + 4 * i + 4` is within the frame, bounds-checked.
#[inline(always)]
pub unsafe fn packet_word(p: *const u8, i: usize) -> u32 {
    unsafe { (p.add(4 * i) as *const u32).read() }
}

/// Writes `w` over bytes `4 * i .. 4 * i + 4` at `p` in the frame as one 32-bit store
/// (see `packet_word`).
///
/// # Safety
/// `p + 4 * i .. p + 4 * i + 4` is within the frame, bounds-checked.
#[inline(always)]
pub unsafe fn packet_set_word(p: *mut u8, i: usize, w: u32) {
    unsafe { (p.add(4 * i) as *mut u32).write(w) }
}

#[inline(always)]
pub fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// A pointer to a `T` at `offset` bytes into the frame, or `None` when the frame is
/// too short. The comparison against `data_end` is what the verifier needs to see.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// The whole frame's length: the first buffer and, for a multi-buffer frame
/// (`xdp.frags`), its fragments. A helper call, unlike `frame_len`.
#[inline(always)]
pub fn whole_len(ctx: &XdpContext) -> usize {
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

/// The frame's length for the counters when its IP packet ends at `end`: the first
/// buffer's, with no helper call, when the packet ends within it; else the whole
/// multi-buffer frame's (`whole_len`).
#[inline(always)]
pub fn counted_len(ctx: &XdpContext, end: usize) -> usize {
    let linear = frame_len(ctx);
    if end <= linear {
        linear
    } else {
        whole_len(ctx)
    }
}

/// Whether the frame is at least `end` bytes long. The fragments are asked about only
/// when the first buffer is shorter.
#[inline(always)]
pub fn holds(ctx: &XdpContext, end: usize) -> bool {
    end <= frame_len(ctx) || end <= whole_len(ctx)
}
