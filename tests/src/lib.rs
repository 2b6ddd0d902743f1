//! Harnesses that start real components for tests (Consul dev agents, etcd + API server)
//! on free loopback ports and tear them down, plus the harness-agnostic e2e suite's helpers.
//! A harness that cannot start its component returns an error; tests unwrap it so they fail
//! loudly instead of skipping.

pub mod cluster;
pub mod consul;
pub mod env;
pub mod kube;
pub mod oracle;
pub mod proxy;
pub mod services;
