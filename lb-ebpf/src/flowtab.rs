//! The connection table, kept by the program itself (`lb_common::flowtab` says why and
//! how): a lookup hashes the key and compares it with its bucket's slots, all inlined
//! array reads; an insert writes a slot in place.
//!
//! No lock: a slot is written key first, then state, by whichever CPU records a flow.
//! Two CPUs recording two new flows into one slot at the same instant can leave a key
//! that is neither (found by no flow, taken by the next insert). A reader that meets a
//! slot another CPU is handing to a new flow reads a miss (`lookup_read` compares the
//! key again after reading the state: on x86, whose stores become visible in order,
//! a new state word read means the new key is read too), never the new flow's
//! backend.

use lb_common::{
    FlowKey, FlowState,
    flowtab::{
        FLOW_WAYS, FlowSlot, first_slot, key_hash, key_word, same_key, table_of, victim_rank,
    },
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

/// The slot that holds the flow, if the table does.
#[inline(always)]
fn find(key: &FlowKey) -> Option<*mut FlowSlot> {
    let first = bucket(key)?;
    let mut i = 0;
    while i < FLOW_WAYS {
        let slot = FLOWS.get_ptr_mut(first + i)?;
        // SAFETY: a value of the array, just looked up.
        if same_key(unsafe { &(*slot).key }, key) {
            return Some(slot);
        }
        i += 1;
    }
    None
}

/// The flow's entry, if the table holds it: for a write (`touch`) whose reads the
/// caller made before (`lookup_read`).
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut FlowState> {
    // SAFETY: a value of the array (`find`).
    find(key).map(|slot| unsafe { core::ptr::addr_of_mut!((*slot).state) })
}

/// What a reader takes from an entry (`lookup_read`).
#[derive(Clone, Copy)]
pub struct Seen {
    pub backend: u32,
    pub vip_num: u32,
    pub flags: u32,
    pub touched_jiffies: u32,
}

/// The flow's entry as read (`Seen`), and the entry, if the table holds the flow and
/// still holds it once read: the key is compared again after, so a slot another CPU
/// handed to a new flow meanwhile (key first, then state, see `insert`) reads as a
/// miss, never as this flow with the new flow's backend. Volatile loads, in this
/// order: the key, the state's words, the key again.
#[inline(always)]
pub fn lookup_read(key: &FlowKey) -> Option<(Seen, *mut FlowState)> {
    let slot = find(key)?;
    // SAFETY: a value of the array (`find`), its fields read in place.
    unsafe {
        let state = core::ptr::addr_of_mut!((*slot).state);
        let seen = Seen {
            backend: core::ptr::addr_of!((*state).backend).read_volatile(),
            vip_num: core::ptr::addr_of!((*state).vip_num).read_volatile(),
            flags: core::ptr::addr_of!((*state).flags).read_volatile(),
            touched_jiffies: core::ptr::addr_of!((*state).touched_jiffies).read_volatile(),
        };
        still_holds(core::ptr::addr_of!((*slot).key), key).then_some((seen, state))
    }
}

/// Whether the key at `at` (a slot's, in place) is `key`, read with volatile loads
/// (see `lookup_read`).
///
/// # Safety
/// `at` points at a slot's key.
#[inline(always)]
unsafe fn still_holds(at: *const FlowKey, key: &FlowKey) -> bool {
    let words = at as *const u32;
    let mut i = 0;
    while i < 10 {
        // SAFETY: within the 40-byte key, 4-aligned (the caller's).
        if unsafe { words.add(i).read_volatile() } != key_word(key, i) {
            return false;
        }
        i += 1;
    }
    true
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
