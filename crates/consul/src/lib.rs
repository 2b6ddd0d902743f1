//! Consul HTTP API client for consul-smi: intentions (legacy ID-based API before 1.9,
//! `service-intentions` config entries from 1.9), `service-splitter` and `service-defaults`.
//!
//! - [`ConsulClient`]: reqwest, configured like the Consul CLI ([`ConsulConfig`]), with
//!   bounded concurrency, a rate limit and jittered exponential backoff for transient errors.
//! - [`Reconciler`]: ownership-aware [`apply`](Reconciler::apply) of commands and
//!   [`sync`](Reconciler::sync) of a desired state; it never changes what it does not own.
//! - [`owner`]: how ownership is marked on each kind of object.

mod client;
mod config;
pub mod entries;
mod error;
pub mod legacy;
pub mod owner;
mod progress;
mod reconcile;
mod version;

pub use client::{
    Blocking, Call, ConsulClient, Indexed, RawResponse, RequestObserver, clean_validation,
    install_crypto_provider,
};
pub use config::{ConsulConfig, parse_duration};
pub use error::ConsulError;
pub use owner::{Owner, Ownership};
pub use reconcile::{Change, CommandReport, Reconciler, SyncMode, SyncReport};
pub use version::{ApiFlavor, ConsulVersion};
