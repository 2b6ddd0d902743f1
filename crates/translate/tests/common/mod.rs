//! Builders for hub objects, so tests read like the manifests they stand for.
#![allow(dead_code)]

use std::collections::BTreeMap;

use consul_smi_api::{
    HttpMatch, HttpRouteGroup, Meta, PortMatch, RouteRef, RuleKind, SmiObject, Subject, TcpRoute,
    TrafficSplit, TrafficSplitBackend, TrafficTarget, TrafficTargetRule, UdpRoute, Weight,
};
use consul_smi_core::{IntentionKey, ServiceName};

pub const ACCESS_V1ALPHA1: &str = "access.smi-spec.io/v1alpha1";
pub const ACCESS_V1ALPHA3: &str = "access.smi-spec.io/v1alpha3";
pub const SPECS_V1ALPHA4: &str = "specs.smi-spec.io/v1alpha4";
pub const SPLIT_V1ALPHA4: &str = "split.smi-spec.io/v1alpha4";

pub fn meta(namespace: &str, name: &str, api_version: &str) -> Meta {
    Meta {
        namespace: namespace.into(),
        name: name.into(),
        api_version: api_version.into(),
        ..Meta::default()
    }
}

/// A ServiceAccount subject without namespace (= the TrafficTarget's namespace).
pub fn sa(name: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: None,
    }
}

pub fn sa_in(namespace: &str, name: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: Some(namespace.into()),
    }
}

pub fn tcp_rule(name: &str) -> TrafficTargetRule {
    TrafficTargetRule {
        kind: RuleKind::TCPRoute,
        name: name.into(),
        matches: None,
    }
}

pub fn udp_rule(name: &str) -> TrafficTargetRule {
    TrafficTargetRule {
        kind: RuleKind::UDPRoute,
        name: name.into(),
        matches: None,
    }
}

pub fn http_rule(name: &str, matches: Option<&[&str]>) -> TrafficTargetRule {
    TrafficTargetRule {
        kind: RuleKind::HTTPRouteGroup,
        name: name.into(),
        matches: matches.map(|m| m.iter().map(|s| s.to_string()).collect()),
    }
}

pub fn target_obj(
    namespace: &str,
    name: &str,
    destination: Subject,
    sources: Vec<Subject>,
    rules: Vec<TrafficTargetRule>,
) -> TrafficTarget {
    TrafficTarget {
        meta: meta(namespace, name, ACCESS_V1ALPHA3),
        destination,
        destination_port: None,
        sources,
        rules,
    }
}

pub fn target(
    namespace: &str,
    name: &str,
    destination: Subject,
    sources: Vec<Subject>,
    rules: Vec<TrafficTargetRule>,
) -> SmiObject {
    SmiObject::TrafficTarget(target_obj(namespace, name, destination, sources, rules))
}

pub fn tcp_route(namespace: &str, name: &str) -> SmiObject {
    SmiObject::TcpRoute(TcpRoute {
        meta: meta(namespace, name, SPECS_V1ALPHA4),
        matches: None,
    })
}

pub fn tcp_route_ports(namespace: &str, name: &str, ports: &[u16]) -> SmiObject {
    SmiObject::TcpRoute(TcpRoute {
        meta: meta(namespace, name, SPECS_V1ALPHA4),
        matches: Some(PortMatch {
            name: None,
            ports: ports.to_vec(),
        }),
    })
}

pub fn udp_route(namespace: &str, name: &str) -> SmiObject {
    SmiObject::UdpRoute(UdpRoute {
        meta: meta(namespace, name, SPECS_V1ALPHA4),
        matches: None,
    })
}

pub fn http_match(name: &str, methods: &[&str], path_regex: Option<&str>) -> HttpMatch {
    HttpMatch {
        name: name.into(),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        path_regex: path_regex.map(str::to_string),
        headers: BTreeMap::new(),
    }
}

pub fn with_header(mut m: HttpMatch, name: &str, regex: &str) -> HttpMatch {
    m.headers.insert(name.into(), regex.into());
    m
}

pub fn http_group(namespace: &str, name: &str, matches: Vec<HttpMatch>) -> SmiObject {
    SmiObject::HttpRouteGroup(HttpRouteGroup {
        meta: meta(namespace, name, SPECS_V1ALPHA4),
        matches,
    })
}

/// Backends as (service, weight in thousandths).
pub fn split(namespace: &str, name: &str, service: &str, backends: &[(&str, u64)]) -> SmiObject {
    SmiObject::TrafficSplit(TrafficSplit {
        meta: meta(namespace, name, SPLIT_V1ALPHA4),
        service: service.into(),
        backends: backends
            .iter()
            .map(|(service, millis)| TrafficSplitBackend {
                service: service.to_string(),
                weight: Weight { millis: *millis },
            })
            .collect(),
        matches: Vec::new(),
    })
}

pub fn split_with_matches(namespace: &str, name: &str, service: &str, group: &str) -> SmiObject {
    let SmiObject::TrafficSplit(mut s) =
        split(namespace, name, service, &[("v1", 1000), ("v2", 1000)])
    else {
        unreachable!()
    };
    s.matches.push(RouteRef {
        kind: "HTTPRouteGroup".into(),
        name: group.into(),
        api_group: Some("specs.smi-spec.io".into()),
    });
    SmiObject::TrafficSplit(s)
}

pub fn key(source: &str, destination: &str) -> IntentionKey {
    IntentionKey {
        source: ServiceName::new(source),
        destination: ServiceName::new(destination),
    }
}
