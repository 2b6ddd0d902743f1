//! SMI resource types for every published version, the hub model they all convert into,
//! and decoding of API-server objects and YAML manifests into the hub.

pub mod hub;

pub use hub::*;
