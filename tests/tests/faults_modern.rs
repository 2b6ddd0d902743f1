//! `faults.rs` against real Consul 1.14.11 (the 1.9+ config-entry API, built by
//! tests/harness/build-consul.sh): the same cases, compiled a second time under this name.

#[path = "faults.rs"]
mod suite;
