#![no_std]
//! The XDP program lives in `main.rs` (the `lb` binary). This empty library lets
//! lb-userspace name this crate as a build-dependency, so cargo rebuilds the agent
//! when the program changes.
