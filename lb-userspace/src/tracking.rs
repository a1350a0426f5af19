//! What priority this host should advertise, given whether its data path can serve.
//! A host that cannot serve must not hold the VIPs: it resigns (priority 0) so a
//! healthy peer takes over; a host that can serve only some services steps down in
//! favour of a peer that can serve more.

/// Priority lost for each service that has no usable backend.
pub const PENALTY_PER_SERVICE: u8 = 10;

/// The data path as tracking sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataPathHealth {
    /// The interface is up (operstate "up") and the program attached.
    pub interface_up: bool,
    pub services: usize,
    /// Services whose ring has at least one backend.
    pub services_serving: usize,
}

/// 0 (resign) when the interface is down or no service can serve; otherwise the
/// configured priority less `PENALTY_PER_SERVICE` for each service that cannot, never
/// below 1.
pub fn effective_priority(configured: u8, health: DataPathHealth) -> u8 {
    if !health.interface_up || (health.services > 0 && health.services_serving == 0) {
        return 0;
    }
    let failing = health.services.saturating_sub(health.services_serving);
    let penalty = u8::try_from(failing)
        .unwrap_or(u8::MAX)
        .saturating_mul(PENALTY_PER_SERVICE);
    configured.saturating_sub(penalty).max(1)
}

/// Whether an interface is up, from sysfs; unknown counts as down.
pub fn interface_up(interface: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/operstate"))
        .map(|s| s.trim() == "up")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(interface_up: bool, services: usize, services_serving: usize) -> DataPathHealth {
        DataPathHealth {
            interface_up,
            services,
            services_serving,
        }
    }

    #[test]
    fn healthy_host_keeps_its_priority() {
        assert_eq!(effective_priority(100, h(true, 3, 3)), 100);
        assert_eq!(effective_priority(100, h(true, 0, 0)), 100);
    }

    #[test]
    fn a_host_that_cannot_serve_resigns() {
        assert_eq!(effective_priority(100, h(false, 3, 3)), 0);
        assert_eq!(effective_priority(100, h(true, 2, 0)), 0);
    }

    #[test]
    fn partly_serving_hosts_step_down_but_stay_eligible() {
        assert_eq!(effective_priority(100, h(true, 3, 2)), 90);
        assert_eq!(effective_priority(100, h(true, 3, 1)), 80);
        assert_eq!(effective_priority(5, h(true, 3, 1)), 1);
        assert_eq!(effective_priority(254, h(true, 300, 1)), 1);
    }
}
