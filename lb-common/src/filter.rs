//! The VIP address filter: the first test of every IPv4 / IPv6 packet, and of ARP and
//! neighbour solicitations. A bitmap of `BITS` bits indexed by the low 16 bits of the
//! destination address: a clear bit means "no VIP has this address", so most traffic for
//! the host leaves after one array load, without the hash of the VIP address map.
//! A set bit means "maybe": the exact lookup follows. The agent writes the bitmap as a
//! function of the set of VIP addresses (`lb-userspace`'s programmer), always a superset
//! of the addresses in the map while it changes.
//!
//! A second bitmap of the same shape (`DSR_FILTER`) has the bits of the addresses with
//! a DSR service: only their TCP segments are looked up in the connection table before
//! the service (a NAT service's flows are in the NAT tables).

/// Words of 64 bits in the filter array.
pub const WORDS: u32 = 1024;
/// Bits in the filter: one per value of the address's low 16 bits.
pub const BITS: u32 = WORDS * 64;

const _: () = assert!(BITS == 1 << 16);

/// The bit of an address (IPv4 in the first 4 bytes, as the maps store it): its last
/// 16 bits, which tell hosts of one /16 (or one IPv6 interface id's tail) apart.
#[inline(always)]
pub fn bit(addr: &[u8; 16], family: u8) -> u32 {
    if family == crate::FAMILY_V4 {
        bit_of(addr[2], addr[3])
    } else {
        bit_of(addr[14], addr[15])
    }
}

/// The bit of an address whose last two bytes are `hi`, `lo`.
#[inline(always)]
pub fn bit_of(hi: u8, lo: u8) -> u32 {
    (hi as u32) << 8 | lo as u32
}

/// The word holding `bit` and its mask in that word.
#[inline(always)]
pub fn word_and_mask(bit: u32) -> (u32, u64) {
    (bit >> 6, 1u64 << (bit & 63))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, FAMILY_V6};

    #[test]
    fn the_low_16_bits_of_either_family() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[192, 0, 2, 10]);
        assert_eq!(bit(&v4, FAMILY_V4), 0x020a);
        let mut v6 = [0u8; 16];
        v6[0] = 0x20;
        v6[14] = 0x12;
        v6[15] = 0x34;
        assert_eq!(bit(&v6, FAMILY_V6), 0x1234);
        assert_eq!(word_and_mask(0x1234), (0x1234 / 64, 1 << (0x1234 % 64)));
        assert_eq!(word_and_mask(BITS - 1), (WORDS - 1, 1 << 63));
    }
}
