//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016), as a pure function.
//!
//! Each backend walks its own permutation of the table, derived from a hash of its
//! identity (never of its position in the config), taking the next free slot on each
//! turn. Weights set how often a backend gets a turn. Backends are ordered by identity
//! first, so the same set of backends gives the same table on every host.

use lb_common::NO_BACKEND;
use xxhash_rust::xxh64::xxh64;

const OFFSET_SEED: u64 = 0x6c62_2d6f_6666_7365;
const SKIP_SEED: u64 = 0x6c62_2d73_6b69_7030;

/// One entry of the table: who it is and what it is worth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Stable identity, hashed for the permutation (the backend's address, say).
    pub identity: String,
    /// What the table stores for this member (the backend id of the data path).
    pub id: u32,
    pub weight: u32,
}

/// Builds a table of `size` slots (a prime). Members of weight 0 take no slot; with no
/// member of positive weight every slot is `NO_BACKEND`.
pub fn build(members: &[Member], size: u32) -> Vec<u32> {
    let m = size as u64;
    let mut table = vec![NO_BACKEND; size as usize];
    let mut live: Vec<&Member> = members.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() || size < 2 {
        return table;
    }
    live.sort_by(|a, b| a.identity.cmp(&b.identity));
    let max_weight = live.iter().map(|b| b.weight as u64).max().unwrap_or(1);
    let walk: Vec<(u64, u64)> = live
        .iter()
        .map(|b| {
            let offset = xxh64(b.identity.as_bytes(), OFFSET_SEED) % m;
            let skip = xxh64(b.identity.as_bytes(), SKIP_SEED) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; live.len()];
    let mut credit = vec![0u64; live.len()];
    let mut filled = 0u64;
    while filled < m {
        for (i, b) in live.iter().enumerate() {
            credit[i] += b.weight as u64;
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let (offset, skip) = walk[i];
            loop {
                let slot = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[slot] == NO_BACKEND {
                    table[slot] = b.id;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table
}

/// The slots whose owner differs between two tables of the same size: what an update
/// has to write.
pub fn diff(old: &[u32], new: &[u32]) -> Vec<(u32, u32)> {
    new.iter()
        .enumerate()
        .filter(|(i, b)| old.get(*i) != Some(*b))
        .map(|(i, b)| (i as u32, *b))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Member {
                identity: format!("10.0.0.{}", i + 1),
                id: i as u32,
                weight: *w,
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for b in table {
            counts[*b as usize] += 1;
        }
        counts
            .iter()
            .map(|c| *c as f64 / table.len() as f64)
            .collect()
    }

    fn assert_shares_match_weights(weights: &[u32], size: u32) {
        let table = build(&members(weights), size);
        assert!(table.iter().all(|b| *b != NO_BACKEND));
        let total: u32 = weights.iter().sum();
        for (i, share) in shares(&table, weights.len()).iter().enumerate() {
            let want = weights[i] as f64 / total as f64;
            assert!(
                (share - want).abs() <= 0.01,
                "backend {i}: share {share:.4}, weight share {want:.4} ({weights:?})"
            );
        }
    }

    #[test]
    fn equal_weights_share_equally() {
        for n in [1, 2, 3, 5, 10, 33] {
            assert_shares_match_weights(&vec![100; n], 65537);
        }
    }

    #[test]
    fn unequal_weights_shape_the_shares() {
        assert_shares_match_weights(&[1, 2, 3], 65537);
        assert_shares_match_weights(&[100, 300, 50, 1000, 7], 65537);
        assert_shares_match_weights(&[1, 2, 3], 1009);
    }

    #[test]
    fn weight_zero_takes_nothing_and_empty_is_no_backend() {
        let table = build(&members(&[100, 0, 100]), 1009);
        assert!(!table.contains(&1));
        assert!(
            build(&members(&[0, 0]), 101)
                .iter()
                .all(|b| *b == NO_BACKEND)
        );
        assert!(build(&[], 101).iter().all(|b| *b == NO_BACKEND));
    }

    #[test]
    fn deterministic_and_independent_of_order() {
        let a = members(&[100, 200, 300, 400]);
        let mut b = a.clone();
        b.reverse();
        assert_eq!(build(&a, 65537), build(&a, 65537));
        assert_eq!(build(&a, 65537), build(&b, 65537));
    }

    #[test]
    fn removing_one_of_n_moves_few_slots() {
        for n in [2usize, 3, 5, 8, 13, 20] {
            let all = members(&vec![100; n]);
            let before = build(&all, 65537);
            for removed in 0..n {
                let rest: Vec<Member> = all
                    .iter()
                    .filter(|m| m.id != removed as u32)
                    .cloned()
                    .collect();
                let after = build(&rest, 65537);
                let moved = diff(&before, &after).len() as f64 / 65537.0;
                let bound = 1.0 / n as f64 + 0.01;
                assert!(
                    moved <= bound,
                    "n={n}, removed {removed}: {moved:.4} of slots moved, bound {bound:.4}"
                );
            }
        }
    }

    #[test]
    fn diff_lists_only_changed_slots() {
        assert_eq!(diff(&[1, 2, 3], &[1, 5, 3]), vec![(1, 5)]);
        assert!(diff(&[1, 2], &[1, 2]).is_empty());
    }
}
