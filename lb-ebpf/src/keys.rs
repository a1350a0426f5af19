//! Map keys built as 32-bit words. A key built field by field holds runs of zero bytes
//! (an IPv4 address's last 12, the padding); LLVM merges those into a `memset`, which
//! the BPF backend leaves as a call to a byte-by-byte loop: five such calls on the
//! IPv4 path cost about 10 ns per packet. Volatile word stores are never merged.

use core::{mem::MaybeUninit, ptr::write_volatile};

use lb_common::{FlowKey, FlowState, PROTO_TCP, VipAddrKey, VipKey};

/// Bytes `4 * i .. 4 * i + 4` of an address as one word, in memory order (one load
/// where the address is 4-aligned: the keys', `Addr`, `NatTuple`).
#[inline(always)]
pub fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
}

/// Whether two addresses (the maps' 16-byte form) are the same, compared as words.
#[inline(always)]
pub fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    word(a, 0) == word(b, 0)
        && word(a, 1) == word(b, 1)
        && word(a, 2) == word(b, 2)
        && word(a, 3) == word(b, 3)
}

/// Two 16-bit halves as one word, in memory order.
#[inline(always)]
fn halves(first: [u8; 2], second: [u8; 2]) -> u32 {
    u32::from_ne_bytes([first[0], first[1], second[0], second[1]])
}

/// Writes `words` over the whole of the `T` at `to` (whose size is `4 * N`, alignment
/// 4), in place: a key built in a local and then moved is written twice.
#[inline(always)]
fn write_words<T, const N: usize>(to: *mut T, words: [u32; N]) {
    const { assert!(core::mem::size_of::<T>() == 4 * N && core::mem::align_of::<T>() >= 4) };
    let p = to as *mut u32;
    let mut i = 0;
    while i < N {
        // SAFETY: in bounds and aligned (asserted above); the caller's `T`.
        unsafe { write_volatile(p.add(i), words[i]) };
        i += 1;
    }
}

/// A `T` made of `words` (see `write_words`).
#[inline(always)]
fn from_words<T, const N: usize>(words: [u32; N]) -> T {
    let mut out = MaybeUninit::<T>::uninit();
    write_words(out.as_mut_ptr(), words);
    // SAFETY: every byte written; all the key types are plain integers.
    unsafe { out.assume_init() }
}

#[inline(always)]
pub fn vip_addr_key(addr: &[u8; 16], family: u8) -> VipAddrKey {
    from_words([
        word(addr, 0),
        word(addr, 1),
        word(addr, 2),
        word(addr, 3),
        u32::from_ne_bytes([family, 0, 0, 0]),
    ])
}

/// A TCP VIP's key, as words.
#[inline(always)]
fn vip_words(addr: &[u8; 16], port_be: u16, family: u8) -> [u32; 5] {
    [
        word(addr, 0),
        word(addr, 1),
        word(addr, 2),
        word(addr, 3),
        halves(port_be.to_ne_bytes(), [PROTO_TCP, family]),
    ]
}

/// A TCP VIP.
#[inline(always)]
pub fn vip_key(addr: &[u8; 16], port_be: u16, family: u8) -> VipKey {
    from_words(vip_words(addr, port_be, family))
}

/// Whether `key` is the TCP VIP `addr`:`port_be`, compared word by word with no key
/// built (a derived `==` on the address bytes may become a call to the BPF backend's
/// byte loop).
#[inline(always)]
pub fn is_vip(key: &VipKey, addr: &[u8; 16], port_be: u16, family: u8) -> bool {
    const N: usize = core::mem::size_of::<VipKey>() / 4;
    const { assert!(core::mem::size_of::<VipKey>() == 4 * N && core::mem::align_of::<VipKey>() >= 4) };
    let want = vip_words(addr, port_be, family);
    let k = key as *const VipKey as *const u32;
    let mut i = 0;
    while i < N {
        // SAFETY: in bounds and aligned (asserted above).
        if unsafe { *k.add(i) } != want[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// A TCP flow as the client sends it.
#[inline(always)]
pub fn flow_key(
    src: &[u8; 16],
    dst: &[u8; 16],
    sport_be: u16,
    dport_be: u16,
    family: u8,
) -> FlowKey {
    from_words(flow_words(src, dst, sport_be, dport_be, family))
}

/// A copy of `from` at `to`, word by word (a struct copy may become a call to the BPF
/// backend's byte loop). `N` is the `T`'s size in words (`write_words` asserts it).
#[inline(always)]
fn copy_words<T, const N: usize>(to: *mut T, from: &T) {
    let f = from as *const T as *const u32;
    let mut words = [0u32; N];
    let mut i = 0;
    while i < N {
        // SAFETY: in bounds and aligned (`write_words` asserts the size and alignment).
        words[i] = unsafe { *f.add(i) };
        i += 1;
    }
    write_words(to, words);
}

/// A flow key copied word by word (see `copy_words`).
#[inline(always)]
pub fn copy_flow_key(to: *mut FlowKey, from: &FlowKey) {
    copy_words::<FlowKey, 10>(to, from);
}

/// A connection-table entry copied word by word (see `copy_words`).
#[inline(always)]
pub fn copy_flow_state(to: *mut FlowState, from: &FlowState) {
    copy_words::<FlowState, 6>(to, from);
}

/// `flow_key`, written in place at `to`.
#[inline(always)]
pub fn write_flow_key(
    to: *mut FlowKey,
    src: &[u8; 16],
    dst: &[u8; 16],
    sport_be: u16,
    dport_be: u16,
    family: u8,
) {
    write_words(to, flow_words(src, dst, sport_be, dport_be, family))
}

/// A TCP flow's key, as words.
#[inline(always)]
fn flow_words(
    src: &[u8; 16],
    dst: &[u8; 16],
    sport_be: u16,
    dport_be: u16,
    family: u8,
) -> [u32; 10] {
    [
        word(src, 0),
        word(src, 1),
        word(src, 2),
        word(src, 3),
        word(dst, 0),
        word(dst, 1),
        word(dst, 2),
        word(dst, 3),
        halves(sport_be.to_ne_bytes(), dport_be.to_ne_bytes()),
        halves([PROTO_TCP, family], [0, 0]),
    ]
}
