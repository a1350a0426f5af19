//! The VIP address filter (`lb_common::filter`): one array load and a bit test before
//! the hash lookup of VIP_ADDRS, so traffic for the host pays no hash.

use lb_common::filter;

use aya_ebpf::maps::Array;

use crate::maps::{DSR_FILTER, VIP_FILTER};

/// False when no VIP has this address; true when one may have it.
#[inline(always)]
pub fn may_be_vip(addr: &[u8; 16], family: u8) -> bool {
    may_be_vip_bit(filter::bit(addr, family))
}

/// `may_be_vip` for an address whose last two bytes are `hi`, `lo`: what the pipeline
/// asks first, straight from the packet, before any key or call.
#[inline(always)]
pub fn may_end_a_vip(hi: u8, lo: u8) -> bool {
    may_be_vip_bit(filter::bit_of(hi, lo))
}

/// False when no DSR service has this address; true when one may have it.
#[inline(always)]
pub fn may_be_dsr_vip(addr: &[u8; 16], family: u8) -> bool {
    bit_set(&DSR_FILTER, filter::bit(addr, family))
}

/// `may_be_dsr_vip` for an address whose last two bytes are `hi`, `lo` (as
/// `may_end_a_vip`).
#[inline(always)]
pub fn may_end_a_dsr_vip(hi: u8, lo: u8) -> bool {
    bit_set(&DSR_FILTER, filter::bit_of(hi, lo))
}

#[inline(always)]
fn may_be_vip_bit(bit: u32) -> bool {
    bit_set(&VIP_FILTER, bit)
}

#[inline(always)]
fn bit_set(bitmap: &Array<u64>, bit: u32) -> bool {
    let (word, mask) = filter::word_and_mask(bit);
    // A missing word (never: the index is below WORDS) counts as "maybe".
    bitmap.get(word).is_none_or(|w| *w & mask != 0)
}
