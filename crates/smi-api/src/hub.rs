//! The version-independent ("hub") model of SMI objects.
//!
//! Every served SMI version converts into these types; everything downstream of decoding
//! (the watcher stream, the translation core) sees only the hub. Field names follow the
//! newest SMI versions (access v1alpha3, specs v1alpha4, split v1alpha4) and keep the
//! extras older versions had (TrafficTarget destination port).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The SMI kinds this project understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SmiKind {
    TrafficTarget,
    HTTPRouteGroup,
    TCPRoute,
    UDPRoute,
    TrafficSplit,
}

impl SmiKind {
    pub const ALL: [SmiKind; 5] = [
        SmiKind::TrafficTarget,
        SmiKind::HTTPRouteGroup,
        SmiKind::TCPRoute,
        SmiKind::UDPRoute,
        SmiKind::TrafficSplit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SmiKind::TrafficTarget => "TrafficTarget",
            SmiKind::HTTPRouteGroup => "HTTPRouteGroup",
            SmiKind::TCPRoute => "TCPRoute",
            SmiKind::UDPRoute => "UDPRoute",
            SmiKind::TrafficSplit => "TrafficSplit",
        }
    }

    pub fn group(self) -> &'static str {
        match self {
            SmiKind::TrafficTarget => "access.smi-spec.io",
            SmiKind::HTTPRouteGroup | SmiKind::TCPRoute | SmiKind::UDPRoute => "specs.smi-spec.io",
            SmiKind::TrafficSplit => "split.smi-spec.io",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            SmiKind::TrafficTarget => "traffictargets",
            SmiKind::HTTPRouteGroup => "httproutegroups",
            SmiKind::TCPRoute => "tcproutes",
            SmiKind::UDPRoute => "udproutes",
            SmiKind::TrafficSplit => "trafficsplits",
        }
    }

    pub fn from_kind(kind: &str) -> Option<SmiKind> {
        SmiKind::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

impl fmt::Display for SmiKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one SMI object independent of version: what diagnostics and deletions refer to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub kind: SmiKind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: SmiKind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// The metadata the system keeps from Kubernetes' ObjectMeta.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Namespace of the object ("default" when a manifest omits it).
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub generation: Option<i64>,
    pub labels: BTreeMap<String, String>,
    /// The apiVersion the object was read as (e.g. `access.smi-spec.io/v1alpha1`), for diagnostics.
    pub api_version: String,
}

/// A workload identity: in SMI always `kind: ServiceAccount`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Subject {
    pub kind: String,
    pub name: String,
    /// `None` when the manifest omitted it; SMI then means the TrafficTarget's own namespace.
    pub namespace: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RuleKind {
    HTTPRouteGroup,
    TCPRoute,
    UDPRoute,
}

impl RuleKind {
    pub fn as_smi_kind(self) -> SmiKind {
        match self {
            RuleKind::HTTPRouteGroup => SmiKind::HTTPRouteGroup,
            RuleKind::TCPRoute => SmiKind::TCPRoute,
            RuleKind::UDPRoute => SmiKind::UDPRoute,
        }
    }
}

/// One `rules[]` entry (`specs[]` in v1alpha1) of a TrafficTarget.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TrafficTargetRule {
    pub kind: RuleKind,
    pub name: String,
    /// `None` = all matches of the referenced route (spec: "matches omitted").
    pub matches: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficTarget {
    pub meta: Meta,
    pub destination: Subject,
    /// v1alpha1/v1alpha2 only; later versions moved ports onto TCPRoute/UDPRoute.
    pub destination_port: Option<u16>,
    pub sources: Vec<Subject>,
    pub rules: Vec<TrafficTargetRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpMatch {
    pub name: String,
    /// Empty = any method; `*` also means any.
    pub methods: Vec<String>,
    /// Regex anchored with `^` by SMI.
    pub path_regex: Option<String>,
    /// Header name → value regex (v1alpha2+).
    pub headers: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRouteGroup {
    pub meta: Meta,
    pub matches: Vec<HttpMatch>,
}

/// v1alpha4 `spec.matches` of TCPRoute/UDPRoute; older versions had none (= all ports).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMatch {
    pub name: Option<String>,
    /// Empty = all ports.
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRoute {
    pub meta: Meta,
    pub matches: Option<PortMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpRoute {
    pub meta: Meta,
    pub matches: Option<PortMatch>,
}

/// A backend weight, exact across versions: v1alpha1 weights are Quantities (`10m`, `1`,
/// `500m`), later ones integers. Stored in thousandths so both convert without loss.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Weight {
    pub millis: u64,
}

impl Weight {
    pub fn from_units(units: u64) -> Self {
        Weight {
            millis: units * 1000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficSplitBackend {
    pub service: String,
    pub weight: Weight,
}

/// `matches[]` of TrafficSplit v1alpha3+: a TypedLocalObjectReference to an HTTPRouteGroup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRef {
    pub kind: String,
    pub name: String,
    pub api_group: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficSplit {
    pub meta: Meta,
    /// The root service clients address.
    pub service: String,
    pub backends: Vec<TrafficSplitBackend>,
    pub matches: Vec<RouteRef>,
}

/// Any SMI object, in hub form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SmiObject {
    TrafficTarget(TrafficTarget),
    HttpRouteGroup(HttpRouteGroup),
    TcpRoute(TcpRoute),
    UdpRoute(UdpRoute),
    TrafficSplit(TrafficSplit),
}

impl SmiObject {
    pub fn kind(&self) -> SmiKind {
        match self {
            SmiObject::TrafficTarget(_) => SmiKind::TrafficTarget,
            SmiObject::HttpRouteGroup(_) => SmiKind::HTTPRouteGroup,
            SmiObject::TcpRoute(_) => SmiKind::TCPRoute,
            SmiObject::UdpRoute(_) => SmiKind::UDPRoute,
            SmiObject::TrafficSplit(_) => SmiKind::TrafficSplit,
        }
    }

    pub fn meta(&self) -> &Meta {
        match self {
            SmiObject::TrafficTarget(o) => &o.meta,
            SmiObject::HttpRouteGroup(o) => &o.meta,
            SmiObject::TcpRoute(o) => &o.meta,
            SmiObject::UdpRoute(o) => &o.meta,
            SmiObject::TrafficSplit(o) => &o.meta,
        }
    }

    pub fn meta_mut(&mut self) -> &mut Meta {
        match self {
            SmiObject::TrafficTarget(o) => &mut o.meta,
            SmiObject::HttpRouteGroup(o) => &mut o.meta,
            SmiObject::TcpRoute(o) => &mut o.meta,
            SmiObject::UdpRoute(o) => &mut o.meta,
            SmiObject::TrafficSplit(o) => &mut o.meta,
        }
    }

    pub fn object_ref(&self) -> ObjectRef {
        let meta = self.meta();
        ObjectRef::new(self.kind(), meta.namespace.clone(), meta.name.clone())
    }
}
