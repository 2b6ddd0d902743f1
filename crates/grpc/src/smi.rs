//! Conversions between the hub model (`consul_smi_api`) and its wire form (`smi.proto`).
//!
//! Hub -> wire is infallible (`From`). Wire -> hub is `TryFrom`: the wire form can carry
//! values the hub cannot (an unspecified enum, a port above 65535, a missing message); each
//! error names the object and the field.

use std::collections::BTreeMap;

use consul_smi_api as hub;

use crate::v1;

/// The largest `WatchEvent` either side of `SmiWatch.Watch` handles: the watcher's encoding
/// limit and every subscriber's decoding limit. One SMI object
/// (`consul_smi_api::MAX_OBJECT_BYTES`, 1.5 MiB as JSON) fits with room to spare; the
/// watcher sends anything larger as an `Invalid` event instead, so no event can stop a stream
/// that every resume would replay.
pub const WATCH_MESSAGE_LIMIT: usize = 4 * 1024 * 1024;

/// The largest `WatchRequest` the watcher reads: three short fields.
pub const WATCH_REQUEST_LIMIT: usize = 64 * 1024;

/// A wire message that has no hub equivalent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: field `{field}`: {problem}")]
pub struct WireError {
    /// `Kind/namespace/name` as far as known, e.g. `TrafficTarget/default/api`.
    pub object: String,
    pub field: String,
    pub problem: String,
}

impl WireError {
    pub(crate) fn new(object: &str, field: &str, problem: impl Into<String>) -> Self {
        WireError {
            object: object.to_string(),
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

// ---- kinds -------------------------------------------------------------------------------

impl From<hub::SmiKind> for v1::SmiKind {
    fn from(kind: hub::SmiKind) -> Self {
        match kind {
            hub::SmiKind::TrafficTarget => v1::SmiKind::TrafficTarget,
            hub::SmiKind::HTTPRouteGroup => v1::SmiKind::HttpRouteGroup,
            hub::SmiKind::TCPRoute => v1::SmiKind::TcpRoute,
            hub::SmiKind::UDPRoute => v1::SmiKind::UdpRoute,
            hub::SmiKind::TrafficSplit => v1::SmiKind::TrafficSplit,
        }
    }
}

/// Reads a wire `SmiKind` (an `i32` in prost messages).
pub fn kind_from_wire(kind: i32, object: &str, field: &str) -> Result<hub::SmiKind, WireError> {
    match v1::SmiKind::try_from(kind) {
        Ok(v1::SmiKind::TrafficTarget) => Ok(hub::SmiKind::TrafficTarget),
        Ok(v1::SmiKind::HttpRouteGroup) => Ok(hub::SmiKind::HTTPRouteGroup),
        Ok(v1::SmiKind::TcpRoute) => Ok(hub::SmiKind::TCPRoute),
        Ok(v1::SmiKind::UdpRoute) => Ok(hub::SmiKind::UDPRoute),
        Ok(v1::SmiKind::TrafficSplit) => Ok(hub::SmiKind::TrafficSplit),
        Ok(v1::SmiKind::Unspecified) => Err(WireError::new(object, field, "kind is unspecified")),
        Err(_) => Err(WireError::new(
            object,
            field,
            format!("unknown kind {kind}"),
        )),
    }
}

impl From<hub::RuleKind> for v1::RuleKind {
    fn from(kind: hub::RuleKind) -> Self {
        match kind {
            hub::RuleKind::HTTPRouteGroup => v1::RuleKind::HttpRouteGroup,
            hub::RuleKind::TCPRoute => v1::RuleKind::TcpRoute,
            hub::RuleKind::UDPRoute => v1::RuleKind::UdpRoute,
        }
    }
}

fn rule_kind_from_wire(kind: i32, object: &str, field: &str) -> Result<hub::RuleKind, WireError> {
    match v1::RuleKind::try_from(kind) {
        Ok(v1::RuleKind::HttpRouteGroup) => Ok(hub::RuleKind::HTTPRouteGroup),
        Ok(v1::RuleKind::TcpRoute) => Ok(hub::RuleKind::TCPRoute),
        Ok(v1::RuleKind::UdpRoute) => Ok(hub::RuleKind::UDPRoute),
        Ok(v1::RuleKind::Unspecified) => {
            Err(WireError::new(object, field, "rule kind is unspecified"))
        }
        Err(_) => Err(WireError::new(
            object,
            field,
            format!("unknown rule kind {kind}"),
        )),
    }
}

// ---- object references -------------------------------------------------------------------

impl From<&hub::ObjectRef> for v1::ObjectRef {
    fn from(r: &hub::ObjectRef) -> Self {
        v1::ObjectRef {
            kind: v1::SmiKind::from(r.kind) as i32,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        }
    }
}

impl TryFrom<&v1::ObjectRef> for hub::ObjectRef {
    type Error = WireError;

    fn try_from(r: &v1::ObjectRef) -> Result<Self, WireError> {
        let object = format!("?/{}/{}", r.namespace, r.name);
        let kind = kind_from_wire(r.kind, &object, "kind")?;
        Ok(hub::ObjectRef::new(
            kind,
            r.namespace.clone(),
            r.name.clone(),
        ))
    }
}

// ---- objects: hub -> wire ----------------------------------------------------------------

fn meta_to_wire(m: &hub::Meta) -> v1::Meta {
    v1::Meta {
        namespace: m.namespace.clone(),
        name: m.name.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        generation: m.generation,
        labels: m
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        api_version: m.api_version.clone(),
    }
}

fn subject_to_wire(s: &hub::Subject) -> v1::Subject {
    v1::Subject {
        kind: s.kind.clone(),
        name: s.name.clone(),
        namespace: s.namespace.clone(),
    }
}

fn port_match_to_wire(p: &hub::PortMatch) -> v1::PortMatch {
    v1::PortMatch {
        name: p.name.clone(),
        ports: p.ports.iter().map(|&p| u32::from(p)).collect(),
    }
}

impl From<&hub::SmiObject> for v1::SmiObject {
    fn from(object: &hub::SmiObject) -> Self {
        use v1::smi_object::Object;
        let wire = match object {
            hub::SmiObject::TrafficTarget(t) => Object::TrafficTarget(v1::TrafficTarget {
                meta: Some(meta_to_wire(&t.meta)),
                destination: Some(subject_to_wire(&t.destination)),
                destination_port: t.destination_port.map(u32::from),
                sources: t.sources.iter().map(subject_to_wire).collect(),
                rules: t
                    .rules
                    .iter()
                    .map(|r| v1::TrafficTargetRule {
                        kind: v1::RuleKind::from(r.kind) as i32,
                        name: r.name.clone(),
                        matches: r
                            .matches
                            .as_ref()
                            .map(|m| v1::StringList { values: m.clone() }),
                    })
                    .collect(),
            }),
            hub::SmiObject::HttpRouteGroup(g) => Object::HttpRouteGroup(v1::HttpRouteGroup {
                meta: Some(meta_to_wire(&g.meta)),
                matches: g
                    .matches
                    .iter()
                    .map(|m| v1::HttpMatch {
                        name: m.name.clone(),
                        methods: m.methods.clone(),
                        path_regex: m.path_regex.clone(),
                        headers: m
                            .headers
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    })
                    .collect(),
            }),
            hub::SmiObject::TcpRoute(r) => Object::TcpRoute(v1::TcpRoute {
                meta: Some(meta_to_wire(&r.meta)),
                matches: r.matches.as_ref().map(port_match_to_wire),
            }),
            hub::SmiObject::UdpRoute(r) => Object::UdpRoute(v1::UdpRoute {
                meta: Some(meta_to_wire(&r.meta)),
                matches: r.matches.as_ref().map(port_match_to_wire),
            }),
            hub::SmiObject::TrafficSplit(s) => Object::TrafficSplit(v1::TrafficSplit {
                meta: Some(meta_to_wire(&s.meta)),
                service: s.service.clone(),
                backends: s
                    .backends
                    .iter()
                    .map(|b| v1::TrafficSplitBackend {
                        service: b.service.clone(),
                        weight_millis: b.weight.millis,
                    })
                    .collect(),
                matches: s
                    .matches
                    .iter()
                    .map(|m| v1::RouteRef {
                        kind: m.kind.clone(),
                        name: m.name.clone(),
                        api_group: m.api_group.clone(),
                    })
                    .collect(),
            }),
        };
        v1::SmiObject { object: Some(wire) }
    }
}

impl From<hub::SmiObject> for v1::SmiObject {
    fn from(object: hub::SmiObject) -> Self {
        v1::SmiObject::from(&object)
    }
}

// ---- objects: wire -> hub ----------------------------------------------------------------

fn meta_from_wire(
    meta: Option<&v1::Meta>,
    kind: hub::SmiKind,
) -> Result<(hub::Meta, String), WireError> {
    let Some(m) = meta else {
        return Err(WireError::new(&format!("{kind}/?/?"), "meta", "missing"));
    };
    let object = format!("{kind}/{}/{}", m.namespace, m.name);
    let meta = hub::Meta {
        namespace: m.namespace.clone(),
        name: m.name.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        generation: m.generation,
        labels: m
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        api_version: m.api_version.clone(),
    };
    Ok((meta, object))
}

fn subject_from_wire(s: &v1::Subject) -> hub::Subject {
    hub::Subject {
        kind: s.kind.clone(),
        name: s.name.clone(),
        namespace: s.namespace.clone(),
    }
}

fn port_from_wire(port: u32, object: &str, field: &str) -> Result<u16, WireError> {
    u16::try_from(port)
        .map_err(|_| WireError::new(object, field, format!("port {port} is above 65535")))
}

fn port_match_from_wire(
    p: &v1::PortMatch,
    object: &str,
    field: &str,
) -> Result<hub::PortMatch, WireError> {
    let ports = p
        .ports
        .iter()
        .enumerate()
        .map(|(i, &port)| port_from_wire(port, object, &format!("{field}.ports[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(hub::PortMatch {
        name: p.name.clone(),
        ports,
    })
}

/// Which object a wire object is, from its kind and metadata alone, with its Kubernetes uid:
/// names an object whose content does not decode (e.g. sent by a newer watcher) so it can be
/// reported and its last valid version kept. `None` when even that is missing.
pub fn wire_object_identity(wire: &v1::SmiObject) -> Option<(hub::ObjectRef, Option<String>)> {
    let (kind, meta) = wire_meta(wire)?;
    Some((
        hub::ObjectRef::new(kind, &meta.namespace, &meta.name),
        meta.uid.clone(),
    ))
}

fn wire_meta(wire: &v1::SmiObject) -> Option<(hub::SmiKind, &v1::Meta)> {
    use v1::smi_object::Object;
    let (kind, meta) = match wire.object.as_ref()? {
        Object::TrafficTarget(t) => (hub::SmiKind::TrafficTarget, t.meta.as_ref()),
        Object::HttpRouteGroup(g) => (hub::SmiKind::HTTPRouteGroup, g.meta.as_ref()),
        Object::TcpRoute(r) => (hub::SmiKind::TCPRoute, r.meta.as_ref()),
        Object::UdpRoute(r) => (hub::SmiKind::UDPRoute, r.meta.as_ref()),
        Object::TrafficSplit(s) => (hub::SmiKind::TrafficSplit, s.meta.as_ref()),
    };
    Some((kind, meta?))
}

/// `event` in a form that fits in [`WATCH_MESSAGE_LIMIT`]. An `Applied` too large becomes an
/// `Invalid` for the same object (its last valid version stays in effect at the subscriber,
/// as for any broken edit); any other event too large has its reason cut, and is emptied
/// (`event: None`, which subscribers skip) if it still does not fit: only an object whose
/// name is itself megabytes long, which no valid object has, gets there. Returns the event
/// and whether it had to be changed.
pub fn fit_watch_event(mut event: v1::WatchEvent) -> (v1::WatchEvent, bool) {
    use prost::Message;
    use v1::watch_event::Event;
    let size = event.encoded_len();
    if size <= WATCH_MESSAGE_LIMIT {
        return (event, false);
    }
    let reason = format!(
        "the object is {size} bytes on the watch stream, over its limit of \
         {WATCH_MESSAGE_LIMIT} bytes"
    );
    event.event = match event.event.take() {
        Some(Event::Applied(applied)) => {
            applied
                .object
                .as_ref()
                .and_then(wire_meta)
                .map(|(kind, meta)| {
                    Event::Invalid(v1::Invalid {
                        object: Some(v1::ObjectRef {
                            kind: v1::SmiKind::from(kind) as i32,
                            namespace: meta.namespace.clone(),
                            name: meta.name.clone(),
                        }),
                        api_version: meta.api_version.clone(),
                        reason,
                    })
                })
        }
        Some(Event::Invalid(mut invalid)) => {
            let mut end = WATCH_MESSAGE_LIMIT / 4;
            while end < invalid.reason.len() && !invalid.reason.is_char_boundary(end) {
                end -= 1;
            }
            invalid.reason.truncate(end);
            Some(Event::Invalid(invalid))
        }
        other => other,
    };
    if event.encoded_len() > WATCH_MESSAGE_LIMIT {
        event.event = None;
    }
    (event, true)
}

impl TryFrom<&v1::SmiObject> for hub::SmiObject {
    type Error = WireError;

    fn try_from(wire: &v1::SmiObject) -> Result<Self, WireError> {
        use v1::smi_object::Object;
        let Some(object) = &wire.object else {
            return Err(WireError::new("?/?/?", "object", "no object set"));
        };
        Ok(match object {
            Object::TrafficTarget(t) => {
                let (meta, id) = meta_from_wire(t.meta.as_ref(), hub::SmiKind::TrafficTarget)?;
                let destination = t
                    .destination
                    .as_ref()
                    .map(subject_from_wire)
                    .ok_or_else(|| WireError::new(&id, "destination", "missing"))?;
                let destination_port = t
                    .destination_port
                    .map(|p| port_from_wire(p, &id, "destination_port"))
                    .transpose()?;
                let rules = t
                    .rules
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        Ok(hub::TrafficTargetRule {
                            kind: rule_kind_from_wire(r.kind, &id, &format!("rules[{i}].kind"))?,
                            name: r.name.clone(),
                            matches: r.matches.as_ref().map(|m| m.values.clone()),
                        })
                    })
                    .collect::<Result<Vec<_>, WireError>>()?;
                hub::SmiObject::TrafficTarget(hub::TrafficTarget {
                    meta,
                    destination,
                    destination_port,
                    sources: t.sources.iter().map(subject_from_wire).collect(),
                    rules,
                })
            }
            Object::HttpRouteGroup(g) => {
                let (meta, _) = meta_from_wire(g.meta.as_ref(), hub::SmiKind::HTTPRouteGroup)?;
                hub::SmiObject::HttpRouteGroup(hub::HttpRouteGroup {
                    meta,
                    matches: g
                        .matches
                        .iter()
                        .map(|m| hub::HttpMatch {
                            name: m.name.clone(),
                            methods: m.methods.clone(),
                            path_regex: m.path_regex.clone(),
                            headers: m
                                .headers
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                        })
                        .collect(),
                })
            }
            Object::TcpRoute(r) => {
                let (meta, id) = meta_from_wire(r.meta.as_ref(), hub::SmiKind::TCPRoute)?;
                let matches = r
                    .matches
                    .as_ref()
                    .map(|m| port_match_from_wire(m, &id, "matches"))
                    .transpose()?;
                hub::SmiObject::TcpRoute(hub::TcpRoute { meta, matches })
            }
            Object::UdpRoute(r) => {
                let (meta, id) = meta_from_wire(r.meta.as_ref(), hub::SmiKind::UDPRoute)?;
                let matches = r
                    .matches
                    .as_ref()
                    .map(|m| port_match_from_wire(m, &id, "matches"))
                    .transpose()?;
                hub::SmiObject::UdpRoute(hub::UdpRoute { meta, matches })
            }
            Object::TrafficSplit(s) => {
                let (meta, _) = meta_from_wire(s.meta.as_ref(), hub::SmiKind::TrafficSplit)?;
                hub::SmiObject::TrafficSplit(hub::TrafficSplit {
                    meta,
                    service: s.service.clone(),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| hub::TrafficSplitBackend {
                            service: b.service.clone(),
                            weight: hub::Weight {
                                millis: b.weight_millis,
                            },
                        })
                        .collect(),
                    matches: s
                        .matches
                        .iter()
                        .map(|m| hub::RouteRef {
                            kind: m.kind.clone(),
                            name: m.name.clone(),
                            api_group: m.api_group.clone(),
                        })
                        .collect(),
                })
            }
        })
    }
}

impl TryFrom<v1::SmiObject> for hub::SmiObject {
    type Error = WireError;

    fn try_from(wire: v1::SmiObject) -> Result<Self, WireError> {
        hub::SmiObject::try_from(&wire)
    }
}

// ---- watch events: wire -> typed ---------------------------------------------------------

/// Why a snapshot is being sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotReason {
    /// The subscriber asked for no resume point.
    Initial,
    /// The resume point cannot be served: replace everything held with this snapshot.
    ResumeUnavailable,
}

/// One `WatchEvent`'s payload in hub types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchChange {
    SnapshotBegin(SnapshotReason),
    SnapshotEnd,
    Applied(hub::SmiObject),
    Deleted(hub::ObjectRef),
    /// The object's current version cannot be used. The last `Applied` version of it (if any)
    /// still stands: a snapshot carries it as `Applied` followed by this `Invalid`.
    Invalid {
        object: hub::ObjectRef,
        api_version: String,
        reason: String,
    },
}

/// A `WatchEvent` in hub types, for subscribers of `SmiWatch.Watch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubWatchEvent {
    pub epoch: String,
    pub revision: u64,
    pub change: WatchChange,
    /// W3C trace context of the change (absent in snapshots).
    pub trace: Option<v1::TraceContext>,
}

impl TryFrom<v1::WatchEvent> for HubWatchEvent {
    type Error = WireError;

    fn try_from(event: v1::WatchEvent) -> Result<Self, WireError> {
        use v1::watch_event::Event;
        let id = format!("WatchEvent@{}", event.revision);
        let object_ref = |r: Option<&v1::ObjectRef>| -> Result<hub::ObjectRef, WireError> {
            hub::ObjectRef::try_from(r.ok_or_else(|| WireError::new(&id, "object", "missing"))?)
        };
        let change = match event.event {
            None => return Err(WireError::new(&id, "event", "no event set")),
            Some(Event::SnapshotBegin(begin)) => {
                match v1::snapshot_begin::Reason::try_from(begin.reason) {
                    Ok(v1::snapshot_begin::Reason::ResumeUnavailable) => {
                        WatchChange::SnapshotBegin(SnapshotReason::ResumeUnavailable)
                    }
                    // An unspecified reason still starts a snapshot that replaces everything.
                    _ => WatchChange::SnapshotBegin(SnapshotReason::Initial),
                }
            }
            Some(Event::SnapshotEnd(_)) => WatchChange::SnapshotEnd,
            Some(Event::Applied(applied)) => {
                let object = applied
                    .object
                    .as_ref()
                    .ok_or_else(|| WireError::new(&id, "applied.object", "missing"))?;
                WatchChange::Applied(hub::SmiObject::try_from(object)?)
            }
            Some(Event::Deleted(deleted)) => {
                WatchChange::Deleted(object_ref(deleted.object.as_ref())?)
            }
            Some(Event::Invalid(invalid)) => WatchChange::Invalid {
                object: object_ref(invalid.object.as_ref())?,
                api_version: invalid.api_version,
                reason: invalid.reason,
            },
        };
        Ok(HubWatchEvent {
            epoch: event.epoch,
            revision: event.revision,
            change,
            trace: event.trace,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str) -> hub::Meta {
        hub::Meta {
            namespace: "default".into(),
            name: name.into(),
            uid: Some("u-1".into()),
            resource_version: Some("42".into()),
            generation: Some(3),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            api_version: "access.smi-spec.io/v1alpha3".into(),
        }
    }

    fn samples() -> Vec<hub::SmiObject> {
        vec![
            hub::SmiObject::TrafficTarget(hub::TrafficTarget {
                meta: meta("tt"),
                destination: hub::Subject {
                    kind: "ServiceAccount".into(),
                    name: "api".into(),
                    namespace: Some("default".into()),
                },
                destination_port: Some(8080),
                sources: vec![hub::Subject {
                    kind: "ServiceAccount".into(),
                    name: "web".into(),
                    namespace: None,
                }],
                rules: vec![
                    hub::TrafficTargetRule {
                        kind: hub::RuleKind::HTTPRouteGroup,
                        name: "routes".into(),
                        matches: Some(vec!["metrics".into()]),
                    },
                    hub::TrafficTargetRule {
                        kind: hub::RuleKind::TCPRoute,
                        name: "tcp".into(),
                        matches: None,
                    },
                ],
            }),
            hub::SmiObject::HttpRouteGroup(hub::HttpRouteGroup {
                meta: meta("routes"),
                matches: vec![hub::HttpMatch {
                    name: "metrics".into(),
                    methods: vec!["GET".into()],
                    path_regex: Some("/metrics".into()),
                    headers: BTreeMap::from([("x-debug".into(), "1".into())]),
                }],
            }),
            hub::SmiObject::TcpRoute(hub::TcpRoute {
                meta: meta("tcp"),
                matches: Some(hub::PortMatch {
                    name: Some("db".into()),
                    ports: vec![5432, 6432],
                }),
            }),
            hub::SmiObject::UdpRoute(hub::UdpRoute {
                meta: meta("udp"),
                matches: None,
            }),
            hub::SmiObject::TrafficSplit(hub::TrafficSplit {
                meta: meta("split"),
                service: "web".into(),
                backends: vec![hub::TrafficSplitBackend {
                    service: "web-v2".into(),
                    weight: hub::Weight { millis: 10 },
                }],
                matches: vec![hub::RouteRef {
                    kind: "HTTPRouteGroup".into(),
                    name: "routes".into(),
                    api_group: Some("specs.smi-spec.io".into()),
                }],
            }),
        ]
    }

    #[test]
    fn events_too_large_for_the_stream_become_invalid_or_empty() {
        use v1::watch_event::Event;
        let mut route = meta("huge");
        route
            .labels
            .insert("big".into(), "x".repeat(WATCH_MESSAGE_LIMIT));
        let object = hub::SmiObject::TcpRoute(hub::TcpRoute {
            meta: route,
            matches: None,
        });
        let event = |event| v1::WatchEvent {
            epoch: "e".into(),
            revision: 7,
            event: Some(event),
            ..Default::default()
        };
        let applied = event(Event::Applied(v1::Applied {
            object: Some(v1::SmiObject::from(&object)),
        }));
        let (fitted, changed) = fit_watch_event(applied);
        assert!(changed);
        assert_eq!(
            fitted.revision, 7,
            "the revision is kept: resumes move past it"
        );
        let Some(Event::Invalid(invalid)) = &fitted.event else {
            panic!("{:?}", fitted.event.map(|_| ()))
        };
        let object = invalid.object.as_ref().expect("names the object");
        assert_eq!(
            (object.name.as_str(), object.kind),
            ("huge", v1::SmiKind::TcpRoute as i32)
        );
        assert_eq!(invalid.api_version, "access.smi-spec.io/v1alpha3");
        assert!(invalid.reason.contains("limit"), "{}", invalid.reason);

        let long_reason = event(Event::Invalid(v1::Invalid {
            object: Some(v1::ObjectRef::default()),
            api_version: String::new(),
            reason: "é".repeat(WATCH_MESSAGE_LIMIT),
        }));
        let (fitted, changed) = fit_watch_event(long_reason);
        assert!(changed && prost::Message::encoded_len(&fitted) <= WATCH_MESSAGE_LIMIT);
        assert!(matches!(fitted.event, Some(Event::Invalid(_))));

        let unnameable = event(Event::Deleted(v1::Deleted {
            object: Some(v1::ObjectRef {
                name: "n".repeat(WATCH_MESSAGE_LIMIT),
                ..Default::default()
            }),
        }));
        let (fitted, _) = fit_watch_event(unnameable);
        assert_eq!(fitted.event, None);

        let small = event(Event::SnapshotEnd(v1::SnapshotEnd {}));
        assert_eq!(fit_watch_event(small.clone()), (small, false));
    }

    #[test]
    fn every_kind_round_trips_through_the_wire() {
        for object in samples() {
            let wire = v1::SmiObject::from(&object);
            let back = hub::SmiObject::try_from(&wire).expect("round trip");
            assert_eq!(back, object);
        }
    }

    #[test]
    fn object_refs_round_trip() {
        for kind in hub::SmiKind::ALL {
            let r = hub::ObjectRef::new(kind, "ns", "n");
            let back = hub::ObjectRef::try_from(&v1::ObjectRef::from(&r)).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn out_of_range_port_names_object_and_field() {
        let mut wire = v1::SmiObject::from(&samples()[2]);
        if let Some(v1::smi_object::Object::TcpRoute(r)) = &mut wire.object {
            r.matches.as_mut().unwrap().ports[1] = 70_000;
        }
        let err = hub::SmiObject::try_from(&wire).unwrap_err();
        assert_eq!(err.object, "TCPRoute/default/tcp");
        assert_eq!(err.field, "matches.ports[1]");
    }

    #[test]
    fn watch_events_decode_into_hub_types() {
        let object = samples().remove(0);
        let event = v1::WatchEvent {
            epoch: "e".into(),
            revision: 7,
            event: Some(v1::watch_event::Event::Applied(v1::Applied {
                object: Some(v1::SmiObject::from(&object)),
            })),
            trace: None,
            ..Default::default()
        };
        let typed = HubWatchEvent::try_from(event).unwrap();
        assert_eq!(typed.revision, 7);
        assert_eq!(typed.change, WatchChange::Applied(object));
        let begin = v1::WatchEvent {
            event: Some(v1::watch_event::Event::SnapshotBegin(v1::SnapshotBegin {
                reason: v1::snapshot_begin::Reason::ResumeUnavailable as i32,
            })),
            ..Default::default()
        };
        assert_eq!(
            HubWatchEvent::try_from(begin).unwrap().change,
            WatchChange::SnapshotBegin(SnapshotReason::ResumeUnavailable)
        );
    }

    #[test]
    fn unspecified_kind_is_rejected() {
        let wire = v1::ObjectRef {
            kind: 0,
            namespace: "a".into(),
            name: "b".into(),
        };
        let err = hub::ObjectRef::try_from(&wire).unwrap_err();
        assert_eq!(err.field, "kind");
        assert!(err.to_string().contains("unspecified"), "{err}");
    }
}
