//! Backend selection for a new flow: the client's persistence entry if its service has
//! `persistence_timeout_s` and the entry is live, else the VIP's Maglev ring (whose
//! choice is then remembered). One function for every forwarding mode.

use lb_common::{
    Backend, FlowKey, PERSIST_TOUCH_NS, PersistKey, PersistState, VipInfo, counters::reason,
    persist_applies,
};

use crate::{
    Step,
    maps::{BACKENDS, PERSIST, scratch},
    ring_lookup, usable_backend,
};

/// The backend for a flow the tables do not know (a SYN, or a flow they lost): see the
/// module. An expired entry, or one whose backend no longer takes new connections
/// (drained, disabled, down, gone), is replaced by the ring's choice.
#[inline(always)]
pub fn choose_backend(vip: &VipInfo, flow: &FlowKey, now: u64) -> Step<(u32, &'static Backend)> {
    if vip.persistence_s == 0 {
        let id = ring_lookup(vip, flow)?;
        let backend = usable_backend(id).ok_or(reason::DROP_NO_BACKEND)?;
        return Ok((id, backend));
    }
    // The key and the entry in the per-CPU scratch, not on the stack: the deepest call
    // chain (the pipeline, NAT, a checksum helper) must fit 512 bytes.
    let s = scratch()?;
    s.persist_key = PersistKey::of_flow(flow);
    if let Some(found) = PERSIST.get_ptr_mut(&s.persist_key) {
        // SAFETY: a value of the map; a concurrent writer can only tear the timestamp.
        let id = unsafe { (*found).backend };
        if let Some(backend) = BACKENDS.get(id)
            && persist_applies(unsafe { &*found }, vip.persistence_s, backend.flags, now)
        {
            unsafe { (*found).last_seen_ns = now };
            return Ok((id, backend));
        }
    }
    let id = ring_lookup(vip, flow)?;
    let backend = usable_backend(id).ok_or(reason::DROP_NO_BACKEND)?;
    s.persist_state = PersistState {
        backend: id,
        vip_num: vip.vip_num,
        last_seen_ns: now,
    };
    // A full table evicts its least recently used client; an error only costs this
    // client its stickiness.
    let _ = PERSIST.insert(&s.persist_key, &s.persist_state, 0);
    Ok((id, backend))
}

/// An established packet of a persistent service keeps its client's entry alive: the
/// timeout runs from the client's last activity, written at most once per
/// `PERSIST_TOUCH_NS`. A DSR flow asks only when its own entry is refreshed (once per
/// `FLOW_TOUCH_JIFFIES`, see `send_known`); a NAT flow on each packet.
#[inline(always)]
pub fn touch(vip: &VipInfo, flow: &FlowKey, backend: u32, now: u64) {
    if vip.persistence_s == 0 {
        return;
    }
    // The key in the per-CPU scratch, as in `choose_backend`.
    let Ok(s) = scratch() else {
        return;
    };
    s.persist_key = PersistKey::of_flow(flow);
    if let Some(state) = PERSIST.get_ptr_mut(&s.persist_key) {
        unsafe {
            if (*state).backend == backend
                && now.saturating_sub((*state).last_seen_ns) > PERSIST_TOUCH_NS
            {
                (*state).last_seen_ns = now;
            }
        }
    }
}
