//! The connection table, kept by the program itself (`lb_common::flowtab` says why and
//! how): a lookup hashes the key and compares it with its bucket's slots, all inlined
//! array reads; an insert writes a slot in place.
//!
//! No lock: a slot is written key first, then state, by whichever CPU records a flow.
//! Two CPUs recording two new flows into one slot at the same instant can leave a key
//! that is neither (found by no flow, taken by the next insert); a reader can meet a
//! slot another CPU is handing to a new flow, as the kernel's LRU hash reuses an entry
//! a reader holds. Either takes an insert into a full bucket at the nanosecond the
//! evicted flow's own packet is read.

use lb_common::{
    FlowKey, FlowState,
    flowtab::{FLOW_WAYS, first_slot, key_hash, same_key, table_of, victim_rank},
    layout::meta,
};

use crate::maps::{FLOWS, META};

/// The first slot of `key`'s bucket; `None` before the agent described the table
/// (`meta::FLOW_TABLE`).
#[inline(always)]
fn bucket(key: &FlowKey) -> Option<u32> {
    let (seed, buckets) = table_of(*META.get(meta::FLOW_TABLE)?);
    if buckets == 0 {
        return None;
    }
    Some(first_slot(key_hash(key, seed), buckets))
}

/// The flow's entry, if the table holds it.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut FlowState> {
    let first = bucket(key)?;
    let mut i = 0;
    while i < FLOW_WAYS {
        let slot = FLOWS.get_ptr_mut(first + i)?;
        // SAFETY: a value of the array, just looked up.
        if same_key(unsafe { &(*slot).key }, key) {
            // SAFETY: as above.
            return Some(unsafe { core::ptr::addr_of_mut!((*slot).state) });
        }
        i += 1;
    }
    None
}

/// Records the flow: its own slot if the bucket holds it, else the bucket's lowest
/// `victim_rank`. Returns whether it was written (false before the agent described the
/// table).
#[inline(always)]
pub fn insert(key: &FlowKey, state: &FlowState) -> bool {
    let Some(first) = bucket(key) else {
        return false;
    };
    let mut chosen = first;
    let mut lowest = u64::MAX;
    let mut i = 0;
    while i < FLOW_WAYS {
        let Some(slot) = FLOWS.get(first + i) else {
            return false;
        };
        if same_key(&slot.key, key) {
            chosen = first + i;
            break;
        }
        let rank = victim_rank(slot.is_used(), &slot.state);
        if rank < lowest {
            lowest = rank;
            chosen = first + i;
        }
        i += 1;
    }
    let Some(slot) = FLOWS.get_ptr_mut(chosen) else {
        return false;
    };
    // SAFETY: a value of the array; the key's words first, then the state.
    unsafe {
        crate::keys::copy_flow_key(core::ptr::addr_of_mut!((*slot).key), key);
        crate::keys::copy_flow_state(core::ptr::addr_of_mut!((*slot).state), state);
    }
    true
}
