//! The serving lease read without the clock on most packets.
//!
//! A VRRP master's serving switch carries a lease (`Serving::lease_until_ns`) that the
//! program checks on every VIP packet: past it, the host neither answers nor forwards,
//! so a killed master stops by itself. Reading the precise clock for that costs a helper
//! call a packet (30 ns, `cargo xtask bench`). Each CPU instead keeps what its last
//! reading found (`LeaseCache`, a per-CPU map entry) and answers from it while three
//! things hold:
//! - the lease is the one it read (a renewal, or any other write, is read afresh);
//! - `jiffies64` is the one it read with: less than one jiffy has passed, at most
//!   1 / `MIN_HZ` s, and it was cached only with more than `LEASE_CACHE_MARGIN_NS`
//!   (two such jiffies) left, so the lease still runs;
//! - fewer than `LEASE_CACHE_PACKETS` packets were answered from it. Jiffies can lag the
//!   clock for a few ticks when the CPU that keeps time was not running (a VM's vCPU
//!   descheduled); this bounds what a CPU can answer in such a lag to the same order as
//!   the frames a driver already holds between the exact check and their send (a NAPI
//!   budget).
//!
//! The flags are read from the switch on every packet, never cached: a demotion counts
//! from the next packet.

use crate::{Serving, jiffies_max_ns};

/// Packets a CPU answers on one reading of the clock, at most (see the module's text).
pub const LEASE_CACHE_PACKETS: u32 = 64;

/// A reading is cached only while more than this is left of the lease: the jiffy the
/// reading was made in, plus one for the tick that ends it coming late.
pub const LEASE_CACHE_MARGIN_NS: u64 = jiffies_max_ns(2);

/// One CPU's last reading of the lease (the entry of the per-CPU `LEASE_CACHE` map).
/// Not pinned and in no layout: a new program starts with an empty one, which reads the
/// clock on its first packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LeaseCache {
    /// The lease that reading found running with more than `LEASE_CACHE_MARGIN_NS` left.
    pub lease_until_ns: u64,
    /// `jiffies64` when it was read.
    pub jiffies: u64,
    /// Packets it may still answer; 0: read the clock.
    pub left: u32,
    pub _pad: u32,
}

impl Serving {
    /// The flags in force now, for a packet seen at `jiffies` on the CPU whose reading is
    /// `cache`: `clock` (CLOCK_MONOTONIC, ns) is called only when there is a lease and
    /// `cache` cannot answer (see the module's text).
    #[inline(always)]
    pub fn flags_cached(
        &self,
        cache: &mut LeaseCache,
        jiffies: u64,
        clock: impl FnOnce() -> u64,
    ) -> u32 {
        // Read once: the agent may write the entry meanwhile, and the cache must hold
        // the very lease it measured.
        // SAFETY: a field of a live reference.
        let lease = unsafe { core::ptr::read_volatile(&self.lease_until_ns) };
        if lease == 0 {
            return self.flags;
        }
        if cache.left != 0 && cache.lease_until_ns == lease && cache.jiffies == jiffies {
            cache.left -= 1;
            return self.flags;
        }
        let now = clock();
        if lease > now && lease - now > LEASE_CACHE_MARGIN_NS {
            *cache = LeaseCache {
                lease_until_ns: lease,
                jiffies,
                left: LEASE_CACHE_PACKETS - 1,
                _pad: 0,
            };
        } else {
            cache.left = 0;
        }
        self.flags_under(lease, now)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::SERVE_F_ALL;
    use core::cell::Cell;
    use std::vec::Vec;

    const MS: u64 = 1_000_000;

    fn leased(until: u64) -> Serving {
        Serving {
            flags: SERVE_F_ALL,
            _pad: 0,
            lease_until_ns: until,
        }
    }

    /// A clock a cached answer must not read.
    fn unread() -> u64 {
        panic!("the clock was read")
    }

    #[test]
    fn no_lease_reads_no_clock_and_keeps_no_reading() {
        let mut cache = LeaseCache::default();
        assert_eq!(leased(0).flags_cached(&mut cache, 7, unread), SERVE_F_ALL);
        assert_eq!(cache, LeaseCache::default());
    }

    #[test]
    fn one_reading_answers_the_packets_of_its_jiffy_up_to_the_bound() {
        let s = leased(10_000 * MS);
        let mut cache = LeaseCache::default();
        let reads = Cell::new(0);
        let clock = || {
            reads.set(reads.get() + 1);
            1_000 * MS
        };
        assert_eq!(s.flags_cached(&mut cache, 5, clock), SERVE_F_ALL);
        assert_eq!(reads.get(), 1);
        for _ in 1..LEASE_CACHE_PACKETS {
            assert_eq!(s.flags_cached(&mut cache, 5, unread), SERVE_F_ALL);
        }
        assert_eq!(cache.left, 0, "the bound is used up");
        assert_eq!(s.flags_cached(&mut cache, 5, clock), SERVE_F_ALL);
        assert_eq!(reads.get(), 2, "the packet after the bound reads the clock");
    }

    #[test]
    fn another_jiffy_or_another_lease_reads_the_clock() {
        let mut cache = LeaseCache::default();
        let reads = Cell::new(0);
        let clock = || {
            reads.set(reads.get() + 1);
            1_000 * MS
        };
        let s = leased(10_000 * MS);
        s.flags_cached(&mut cache, 5, clock);
        s.flags_cached(&mut cache, 6, clock);
        assert_eq!(reads.get(), 2, "a new jiffy");
        let renewed = leased(11_000 * MS);
        renewed.flags_cached(&mut cache, 6, clock);
        assert_eq!(reads.get(), 3, "a renewed lease");
        // A shorter lease written in the same jiffy is measured, not taken on trust.
        let short = leased(1_000 * MS - 1);
        assert_eq!(short.flags_cached(&mut cache, 6, clock), 0);
        assert_eq!(reads.get(), 4);
    }

    #[test]
    fn a_lease_near_its_end_is_read_on_every_packet_and_ends_on_time() {
        let lease = 1_000 * MS;
        let s = leased(lease);
        let mut cache = LeaseCache::default();
        for (now, want) in [
            (lease - LEASE_CACHE_MARGIN_NS, SERVE_F_ALL),
            (lease - 1, SERVE_F_ALL),
            (lease, SERVE_F_ALL),
            (lease + 1, 0),
        ] {
            let mut reads = 0;
            let flags = s.flags_cached(&mut cache, 9, || {
                reads += 1;
                now
            });
            assert_eq!(
                (flags, reads),
                (want, 1),
                "at lease {:+}",
                now as i64 - lease as i64
            );
            assert_eq!(cache.left, 0, "nothing cached");
        }
    }

    #[test]
    fn a_demotion_counts_from_the_next_packet_whatever_is_cached() {
        let mut s = leased(10_000 * MS);
        let mut cache = LeaseCache::default();
        s.flags_cached(&mut cache, 5, || 1_000 * MS);
        assert!(cache.left > 0);
        s.flags = 0;
        assert_eq!(s.flags_cached(&mut cache, 5, unread), 0);
    }

    /// Time runs in steps finer than a jiffy at each HZ a kernel may have; jiffies are
    /// counted from it as the kernel does. No packet is answered past the lease's end, and
    /// every packet up to it is.
    #[test]
    fn no_packet_is_answered_past_the_lease_at_any_hz() {
        for hz in [100u64, 250, 300, 1000] {
            let jiffy = 1_000_000_000 / hz;
            for lease in [50 * MS, 50 * MS + 1, 73 * MS + 333, 120 * MS] {
                let s = leased(lease);
                let mut cache = LeaseCache::default();
                let mut answered = Vec::new();
                let mut t = 0;
                while t < 200 * MS {
                    // A start-up offset: jiffies do not begin at 0 ns.
                    let j = (t + 3 * MS) / jiffy + 4_294_967_000;
                    if s.flags_cached(&mut cache, j, || t) != 0 {
                        answered.push(t);
                    }
                    t += 97_000;
                }
                let last = answered.last().copied().unwrap_or(0);
                assert!(last <= lease, "HZ {hz}: answered at {last} past {lease}");
                assert!(
                    lease - last < 97_000,
                    "HZ {hz}: served up to the lease's end"
                );
            }
        }
    }
}
