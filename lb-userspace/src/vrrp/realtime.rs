//! Real-time scheduling for the speaker's thread and locked memory for the process, as
//! keepalived's `vrrp_rt_priority` and `vrrp_no_swap`: under CPU or memory pressure an
//! advert still leaves on time, and a backup still notices a dead master on time.
//! Both need privilege (CAP_SYS_NICE, CAP_IPC_LOCK or a high enough rlimit); without it
//! each logs one warning and the speaker runs as a plain thread.

use std::{io, sync::Once};

/// Locks the process's pages in memory, now and later. With `MCL_ONFAULT`, pages are
/// locked as they are first touched: `MCL_FUTURE` alone would fault in every future
/// mapping whole (each thread's stack reservation, every mmap'ed map) and pin memory
/// nobody uses. Once per process.
pub fn lock_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(why) = memlock_unlimited() {
            tracing::warn!("vrrp: warning: not locking the process's memory: {why}");
            return;
        }
        // SAFETY: mlockall takes flags only and touches no memory of ours.
        let mut r =
            unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
        if r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // A kernel before 4.4 knows no MCL_ONFAULT.
            // SAFETY: as above.
            r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
        }
        if r != 0 {
            tracing::warn!(
                "vrrp: warning: cannot lock the process's memory (mlockall: {}); the speaker may wait on page-ins under memory pressure",
                io::Error::last_os_error()
            );
        }
    });
}

/// Makes sure locking every future page cannot fail an allocation later: with a finite
/// RLIMIT_MEMLOCK and no CAP_IPC_LOCK, MCL_FUTURE makes any mmap past the limit fail.
/// The agent runs as root, which has CAP_IPC_LOCK (the limit does not apply) or can
/// raise the limit (CAP_SYS_RESOURCE); a container may grant one and not the other.
fn memlock_unlimited() -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Err(format!("getrlimit: {}", io::Error::last_os_error()));
    }
    if lim.rlim_cur == libc::RLIM_INFINITY || has_cap_ipc_lock() {
        return Ok(());
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `unlimited` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        return Err(format!(
            "RLIMIT_MEMLOCK is {} bytes and cannot be raised ({}); locking every page could make a later allocation fail",
            lim.rlim_cur,
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Whether this process may lock memory past RLIMIT_MEMLOCK (CapEff in
/// /proc/self/status, read once at start).
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Puts the calling thread on SCHED_FIFO at `priority` (1 to 99; 0: leave it alone).
/// With SCHED_RESET_ON_FORK, so that threads and processes it starts (the notify
/// command and its reaper) are ordinary ones again.
pub fn set_thread_priority(priority: u8) {
    if priority == 0 {
        return;
    }
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
    let r = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if r != 0 {
        static WARNED: Once = Once::new();
        let e = io::Error::last_os_error();
        WARNED.call_once(|| {
            tracing::warn!(
                "vrrp: warning: cannot run the speaker at real-time priority {priority} (SCHED_FIFO: {e}); it runs as an ordinary thread"
            );
        });
    }
}

/// The calling thread's scheduling policy, flags stripped (for tests).
#[cfg(test)]
pub fn thread_policy() -> i32 {
    // SAFETY: no arguments but the calling thread.
    unsafe { libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_time_priority_when_allowed() {
        let policy = std::thread::spawn(|| {
            set_thread_priority(1);
            let got = thread_policy();
            // Threads it starts are ordinary again.
            let child = std::thread::spawn(thread_policy).join().unwrap();
            (got, child)
        })
        .join()
        .unwrap();
        // SAFETY: geteuid has no arguments.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(policy, (libc::SCHED_FIFO, libc::SCHED_OTHER));
        } else {
            // Without privilege: a warning, and an ordinary thread.
            assert_eq!(policy.0, libc::SCHED_OTHER);
        }
        // 0 is off.
        let policy = std::thread::spawn(|| {
            set_thread_priority(0);
            thread_policy()
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_OTHER);
    }
}
