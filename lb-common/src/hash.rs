//! The flow hash, shared so that userspace tests can predict the program's choice.
//! MurmurHash3 (x86, 32-bit) over the key's ten 32-bit words: cheap, well mixed, and
//! a fixed loop the verifier accepts.

use crate::FlowKey;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
const SEED: u32 = 0x4c42_5631;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
}

#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, word(&key.src, 0));
    h = mix(h, word(&key.src, 1));
    h = mix(h, word(&key.src, 2));
    h = mix(h, word(&key.src, 3));
    h = mix(h, word(&key.dst, 0));
    h = mix(h, word(&key.dst, 1));
    h = mix(h, word(&key.dst, 2));
    h = mix(h, word(&key.dst, 3));
    h = mix(h, (key.sport_be as u32) | ((key.dport_be as u32) << 16));
    h = mix(h, (key.proto as u32) | ((key.family as u32) << 8));
    h ^= 40;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, FAMILY_V6, PROTO_TCP};

    /// The values every build so far gave: a change of the hash would move new flows
    /// between backends, and two LB hosts of different versions would disagree on them.
    #[test]
    fn the_hash_is_the_one_every_build_gave() {
        let mut v4 = FlowKey {
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..FlowKey::default()
        };
        v4.src[..4].copy_from_slice(&[198, 51, 100, 7]);
        v4.dst[..4].copy_from_slice(&[192, 0, 2, 10]);
        let mut v6 = FlowKey {
            sport_be: 40001u16.to_be(),
            dport_be: 443u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V6,
            ..FlowKey::default()
        };
        for i in 0..16 {
            v6.src[i] = 0x20 + i as u8;
            v6.dst[i] = 0xf0 - 3 * i as u8;
        }
        assert_eq!(flow_hash(&v4), 0x83fe_27a3);
        assert_eq!(flow_hash(&v6), 0x12e8_28b5);
    }
}
