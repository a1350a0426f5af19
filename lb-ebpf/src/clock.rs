//! The time the data path stamps on flows and flood-guard windows.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

/// CLOCK_MONOTONIC_COARSE: the same clock as `bpf_ktime_get_ns` (the agent compares
/// it with CLOCK_MONOTONIC), as of the last timer tick (a few ms behind at most).
/// It reads a stored value instead of the clock source: cheaper on every packet,
/// and precise enough for idle timeouts in seconds and one-second guard windows.
#[inline(always)]
pub fn coarse_now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}
