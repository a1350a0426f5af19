//! The comparative lab bench of `lb-bench --lab-only`: `comparative` runs it (root),
//! `report` holds its figures and makes the JSON and the Markdown table, `chart` draws
//! the PNG charts. `xdp` does the same for the XDP cost per packet (`--xdp-only`).

pub mod chart;
pub mod comparative;
pub mod report;
pub mod xdp;
