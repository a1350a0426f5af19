//! The connection table's shape, shared by the program (which keeps it) and the agent
//! (which reads it): an array of `FlowSlot`s the program manages itself, in buckets of
//! `FLOW_WAYS` slots. A flow lives in the bucket its seeded hash picks (`bucket_of`),
//! in any of its slots; a new flow takes its own slot if it is there already, else an
//! empty one, else the one a closing or the longest idle flow holds (`victim_rank`).
//!
//! Why not the kernel's LRU hash: its insert (a free-list pop and push under a lock,
//! plus its own hash of the key) was two thirds of a SYN's cost, and its lookup a
//! helper call into several kernel functions, each return dear on hosts with the SRSO
//! mitigation. An array's lookup is inlined by the verifier: a bucket costs a hash of
//! the key's ten words (five independent multiplies) and a few compares.
//!
//! Eviction is per bucket, not across the table: with `FLOW_WAYS` = 8, a table filled to
//! half its size by live flows has about 0.8% of them in a bucket that overflows (a
//! Poisson count of mean 4 above 8), where an LRU hash evicts nothing until full. A
//! flow that loses its slot loses nothing while the ring stands (its next packet takes
//! the same backend from the ring and records it again); what the table is for is a
//! ring change, before which the agent pins the flows it moves (PINNED), and the pinned
//! table is never evicted from. Size `max_flows` to twice the flows a host holds.

use crate::{FlowKey, FlowState};

/// Slots per bucket.
pub const FLOW_WAYS: u32 = 8;

/// One slot of the connection table: 64 bytes, a cache line. Empty while
/// `key.family` is 0 (no flow has family 0).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSlot {
    pub key: FlowKey,
    pub state: FlowState,
}

const _: () = assert!(core::mem::size_of::<FlowSlot>() == 64);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowSlot {
    /// Whether a flow holds the slot.
    #[inline(always)]
    pub fn is_used(&self) -> bool {
        self.key.family != 0
    }
}

/// The table's number of buckets for `max_flows` flows (rounded up to whole buckets).
pub const fn buckets_for(max_flows: u32) -> u32 {
    max_flows.div_ceil(FLOW_WAYS)
}

/// The table's number of slots (its array's size) for `max_flows` flows.
pub const fn slots_for(max_flows: u32) -> u32 {
    buckets_for(max_flows) * FLOW_WAYS
}

/// The word of the META map (`layout::meta::FLOW_TABLE`) that describes the table to
/// the program: its hash seed in the high half, its bucket count in the low. Written
/// once by the agent that made the table, kept with it through restarts.
pub const fn table_word(seed: u32, buckets: u32) -> u64 {
    ((seed as u64) << 32) | buckets as u64
}

/// `table_word` read back: (seed, buckets).
pub const fn table_of(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// The key's `i`-th 32-bit word (of ten), in memory order; read in place, so the
/// program's stack holds no copy of the key.
#[inline(always)]
pub fn key_word(key: &FlowKey, i: usize) -> u32 {
    const { assert!(core::mem::align_of::<FlowKey>() >= 4) };
    assert!(i < 10);
    // SAFETY: within the 40-byte key (i < 10), 4-aligned (asserted above).
    unsafe { *(key as *const FlowKey as *const u32).add(i) }
}

/// Odd constants (from the fractional digits of pi) the seed is mixed into, one per
/// key word.
const K: [u32; 10] = [
    0x243f_6a89,
    0x85a3_08d3,
    0x1319_8a2f,
    0x0370_7345,
    0xa409_3823,
    0x299f_31d1,
    0x082e_fa99,
    0xec4e_6c89,
    0x4528_21e7,
    0x38d0_1377,
];

/// The first slot of the bucket a hash falls in, of `buckets`: the hash's high bits
/// scaled to the count (multiply and shift, no division; any count works).
#[inline(always)]
pub fn first_slot(hash: u32, buckets: u32) -> u32 {
    (((hash as u64) * (buckets as u64)) >> 32) as u32 * FLOW_WAYS
}

/// The bucket hash of a key, its words read in place: NH (the sum of the products of
/// word pairs, each word offset by a seeded constant; the pairs' multiplies are
/// independent, unlike a chained hash's), folded and mixed. Seeded per table
/// (`table_word`), so a sender cannot aim flows at another flow's bucket without the
/// seed. Not the ring's hash (`hash::flow_hash`), which must stay the same across builds
/// and hosts.
#[inline(always)]
pub fn key_hash(key: &FlowKey, seed: u32) -> u32 {
    let mut acc: u64 = 0;
    let mut i = 0;
    while i < 10 {
        let a = key_word(key, i).wrapping_add(K[i] ^ seed) as u64;
        let b = key_word(key, i + 1).wrapping_add(K[i + 1].wrapping_add(seed)) as u64;
        acc = acc.wrapping_add(a.wrapping_mul(b));
        i += 2;
    }
    let h = (acc ^ (acc >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) as u32
}

/// The first slot of `key`'s bucket in a table of `buckets` with `seed`.
#[inline(always)]
pub fn bucket_of(key: &FlowKey, seed: u32, buckets: u32) -> u32 {
    first_slot(key_hash(key, seed), buckets)
}

/// Where a table described by (`seed`, `buckets`) holds `key`, as the program looks for
/// it: the slot's index and its content, read through `read` (slot index -> slot), or
/// `None`. For the agent and the tests, which read the table through the kernel; the
/// program compares in place (`same_key`). A table not described yet (`buckets` 0)
/// holds nothing.
pub fn find_slot<E>(
    key: &FlowKey,
    seed: u32,
    buckets: u32,
    mut read: impl FnMut(u32) -> Result<FlowSlot, E>,
) -> Result<Option<(u32, FlowSlot)>, E> {
    if buckets == 0 {
        return Ok(None);
    }
    let first = bucket_of(key, seed, buckets);
    for i in first..first + FLOW_WAYS {
        let slot = read(i)?;
        if slot.is_used() && slot.key == *key {
            return Ok(Some((i, slot)));
        }
    }
    Ok(None)
}

/// Whether two keys are the same flow, word by word in place: the ports' word first
/// (the one two flows of one client to one service differ in), then the addresses'
/// first words.
#[inline(always)]
pub fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    const ORDER: [usize; 10] = [8, 0, 4, 9, 1, 2, 3, 5, 6, 7];
    let mut i = 0;
    while i < 10 {
        if key_word(a, ORDER[i]) != key_word(b, ORDER[i]) {
            return false;
        }
        i += 1;
    }
    true
}

/// How willing an insert is to take a slot: the lowest rank of a bucket goes. An empty
/// slot first (0), then a closing flow's (`FLOW_F_CLOSING`), then the longest idle
/// (the oldest `last_seen_ns`). The slot of the inserted flow itself is taken before
/// any of these (`insert` checks it first).
#[inline(always)]
pub fn victim_rank(slot_used: bool, state: &FlowState) -> u64 {
    if !slot_used {
        return 0;
    }
    let age = (state.last_seen_ns >> 2) | 1;
    if state.flags & crate::FLOW_F_CLOSING != 0 {
        age
    } else {
        age | (1 << 63)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{FAMILY_V4, FAMILY_V6, FLOW_F_CLOSING, PROTO_TCP};
    use std::vec;

    fn v4(client: [u8; 4], port: u16) -> FlowKey {
        let mut k = FlowKey {
            sport_be: port.to_be(),
            dport_be: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..FlowKey::default()
        };
        k.src[..4].copy_from_slice(&client);
        k.dst[..4].copy_from_slice(&[192, 0, 2, 10]);
        k
    }

    #[test]
    fn sizes_round_up_to_whole_buckets() {
        assert_eq!(buckets_for(8), 1);
        assert_eq!(buckets_for(9), 2);
        assert_eq!(slots_for(9), 16);
        assert_eq!(slots_for(crate::MAX_FLOWS), crate::MAX_FLOWS);
        assert_eq!(
            table_of(table_word(0xdead_beef, 32768)),
            (0xdead_beef, 32768)
        );
    }

    #[test]
    fn every_bucket_is_within_the_table() {
        for buckets in [1, 2, 3, 1000, 32768, u32::MAX / FLOW_WAYS] {
            for hash in [0, 1, u32::MAX / 2, u32::MAX - 1, u32::MAX] {
                let first = first_slot(hash, buckets);
                assert_eq!(first % FLOW_WAYS, 0);
                assert!(first / FLOW_WAYS < buckets, "{hash} of {buckets}");
            }
        }
    }

    /// One client's connections (ports apart) and many clients' spread evenly: no
    /// bucket gets far more than its share, which per-bucket eviction would punish.
    #[test]
    fn flows_spread_evenly_over_the_buckets() {
        let buckets = 4096u32;
        for seed in [0, 1, 0x5eed_1234] {
            let mut count = vec![0u32; buckets as usize];
            let mut n = 0;
            for c in 0..64u8 {
                for port in 0..512u16 {
                    let key = v4([198, 51, c, 7], 10_000 + port);
                    count[(bucket_of(&key, seed, buckets) / FLOW_WAYS) as usize] += 1;
                    n += 1;
                }
            }
            let mean = n as f64 / buckets as f64; // 8
            let max = *count.iter().max().unwrap_or(&0) as f64;
            // A Poisson count of mean 8 exceeds 24 about once in 10^6 buckets.
            assert!(
                max <= 3.0 * mean,
                "seed {seed}: a bucket of {max}, mean {mean}"
            );
            let empty = count.iter().filter(|&&c| c == 0).count();
            assert!(
                empty < 20,
                "seed {seed}: {empty} empty buckets (mean {mean})"
            );
        }
    }

    /// `key` with `mask` xored into its byte `i`.
    fn flipped(key: &FlowKey, i: usize, mask: u8) -> FlowKey {
        let mut k = *key;
        // SAFETY: byte i (< 40) of the 40-byte key.
        unsafe { *(&mut k as *mut FlowKey as *mut u8).add(i) ^= mask };
        k
    }

    #[test]
    fn the_in_place_compare_sees_every_byte() {
        let a = v4([198, 51, 100, 7], 40000);
        let b = v4([198, 51, 100, 7], 40001);
        assert!(same_key(&a, &a));
        assert!(!same_key(&a, &b));
        for i in 0..40 {
            assert!(!same_key(&a, &flipped(&a, i, 1)), "byte {i}");
        }
    }

    #[test]
    fn the_seed_moves_flows_and_every_word_counts() {
        let key = v4([198, 51, 100, 7], 40000);
        let h = key_hash(&key, 7);
        assert_ne!(h, key_hash(&key, 8));
        for i in 0..10 {
            // Bit 9 of word i (bit 1 of its second byte), as the words are read.
            let other = flipped(&key, 4 * i + 1, 1 << 1);
            assert_ne!(h, key_hash(&other, 7), "word {i}");
        }
        let mut k6 = key;
        k6.family = FAMILY_V6;
        assert_ne!(bucket_of(&key, 7, 1 << 20), bucket_of(&k6, 7, 1 << 20));
    }

    #[test]
    fn an_insert_takes_an_empty_slot_then_a_closing_flow_then_the_oldest() {
        let state = |last_seen_ns, flags| FlowState {
            last_seen_ns,
            flags,
            ..FlowState::default()
        };
        let empty = victim_rank(false, &state(5, 0));
        let closing_new = victim_rank(true, &state(9_000, FLOW_F_CLOSING));
        let open_old = victim_rank(true, &state(1_000, 0));
        let open_new = victim_rank(true, &state(9_000, 0));
        assert!(empty < closing_new);
        assert!(closing_new < open_old);
        assert!(open_old < open_new);
        // A flow seen at time 0 (pinned by the agent, say) still ranks above empty.
        assert!(empty < victim_rank(true, &state(0, 0)));
        assert!(empty < victim_rank(true, &state(0, FLOW_F_CLOSING)));
    }
}
