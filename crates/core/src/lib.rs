//! The Consul state consul-smi manages, as plain data with no I/O.
//!
//! The translation core produces a [`DesiredState`] and [`Command`]s from it; the Consul
//! writer applies them. Both sides use these types; the gRPC crate mirrors them on the wire.

pub mod names;
pub mod text;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A Consul service, optionally in an Enterprise namespace/partition.
/// `namespace: None` means "no namespace" (OSS), never "default" implicitly.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceName {
    pub namespace: Option<String>,
    pub name: String,
}

impl ServiceName {
    pub fn new(name: impl Into<String>) -> Self {
        ServiceName {
            namespace: None,
            name: name.into(),
        }
    }

    pub fn in_namespace(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceName {
            namespace: Some(namespace.into()),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One intention is identified by its (source, destination) pair: Consul allows one per pair.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IntentionKey {
    pub source: ServiceName,
    pub destination: ServiceName,
}

impl fmt::Display for IntentionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.source, self.destination)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// Consul's spelling; it is case-sensitive.
    pub fn as_consul(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum HeaderMatchKind {
    Present,
    Exact(String),
    Prefix(String),
    Suffix(String),
    Regex(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HeaderMatch {
    pub name: String,
    pub kind: HeaderMatchKind,
    pub invert: bool,
}

/// The HTTP part of an L7 permission (Consul `Permissions[].HTTP`).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HttpPermission {
    pub path: Option<PathMatch>,
    /// Empty = any method.
    pub methods: Vec<String>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Permission {
    pub action: Action,
    pub http: HttpPermission,
}

impl Permission {
    /// Denies every HTTP request (every path starts with `/`). Ends each L7 permission list
    /// consul-smi writes, so the grant holds whatever Consul's default action is (see the
    /// translate crate's rules).
    pub fn deny_every_request() -> Permission {
        Permission {
            action: Action::Deny,
            http: HttpPermission {
                path: Some(PathMatch::Prefix("/".into())),
                methods: Vec::new(),
                headers: Vec::new(),
            },
        }
    }
}

/// What an intention does: an L4 action, or L7 permissions (mutually exclusive in Consul).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IntentionRule {
    L4(Action),
    L7(Vec<Permission>),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Intention {
    pub key: IntentionKey,
    pub rule: IntentionRule,
    /// Human-readable provenance, e.g. the SMI objects that grant it. Consul limits it to 512 bytes.
    pub description: String,
}

/// One split of a `service-splitter` config entry. Weights are percentages summing to 100.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct Split {
    pub weight: f32,
    pub service: String,
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct ServiceSplitter {
    pub service: ServiceName,
    pub splits: Vec<Split>,
}

/// A `service-defaults` config entry; consul-smi only sets the protocol a splitter needs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceDefaults {
    pub service: ServiceName,
    pub protocol: String,
}

/// Everything consul-smi wants Consul to hold, keyed for deterministic order and diffing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    pub intentions: BTreeMap<IntentionKey, Intention>,
    pub splitters: BTreeMap<ServiceName, ServiceSplitter>,
    pub service_defaults: BTreeMap<ServiceName, ServiceDefaults>,
}

impl DesiredState {
    pub fn is_empty(&self) -> bool {
        self.intentions.is_empty() && self.splitters.is_empty() && self.service_defaults.is_empty()
    }
}

/// A change to make in Consul. Deletes name only the key; the writer deletes only what it owns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    UpsertIntention(Intention),
    DeleteIntention(IntentionKey),
    UpsertSplitter(ServiceSplitter),
    DeleteSplitter(ServiceName),
    UpsertServiceDefaults(ServiceDefaults),
    DeleteServiceDefaults(ServiceName),
}

impl Command {
    /// A short stable description for logs and per-command outcomes (control characters
    /// escaped: names come from callers).
    pub fn target(&self) -> String {
        let target = match self {
            Command::UpsertIntention(i) => format!("intention {}", i.key),
            Command::DeleteIntention(k) => format!("intention {k}"),
            Command::UpsertSplitter(s) => format!("service-splitter {}", s.service),
            Command::DeleteSplitter(s) => format!("service-splitter {s}"),
            Command::UpsertServiceDefaults(d) => format!("service-defaults {}", d.service),
            Command::DeleteServiceDefaults(s) => format!("service-defaults {s}"),
        };
        text::escape_control(&target).into_owned()
    }
}

/// The per-command result the writer reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// Consul now holds what was asked, and a write was made.
    Applied,
    /// Consul already held exactly this; nothing was written.
    Unchanged,
    /// An object consul-smi does not own occupies the key; left untouched.
    Conflict,
    /// Consul refused the request as invalid (not retried).
    Rejected,
    /// Transient failures persisted past the retry budget; Sync will retry.
    Failed,
}
