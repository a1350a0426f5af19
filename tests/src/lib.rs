//! Test support: the network-namespace lab (`lab`), packet builders for the
//! BPF_PROG_TEST_RUN fixtures (`packet`), and the privilege guard every test that
//! needs root goes through.

pub mod bench;
pub mod lab;
pub mod packet;
pub mod rig;

/// True when this process may create namespaces and load BPF. Otherwise: under
/// `CI=true` the test fails; elsewhere it says loudly that it did not run.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test}: needs root (CAP_NET_ADMIN, CAP_BPF), and CI=true: failing instead of skipping"
        );
    }
    eprintln!(
        "\n*** {test}: NOT RUN: needs root. Run as root (cargo xtask test) to exercise it. ***\n"
    );
    false
}
