//! The load balancer's control plane: config, Maglev, the data-path interface, and the
//! agent that ties them together. `lb-agent` and `lbctl` are thin binaries over this.

pub mod admin;
pub mod agent;
pub mod announce;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod flows;
pub mod health;
pub mod logging;
pub mod maglev;
pub mod metrics;
pub mod neigh;
pub mod numbering;
pub mod persist;
pub mod pins;
pub mod programmer;
pub mod protocol;
pub mod statefile;
pub mod sync;
pub mod table;
pub mod top;
pub mod trace;
pub mod tracking;
pub mod vrrp;
