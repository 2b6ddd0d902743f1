//! Property: any valid hub object, written as any version that can express it, reads back as
//! the same hub object.

use std::collections::BTreeMap;

use consul_smi_api::*;
use proptest::prelude::*;

/// An RFC 1123 label, as Kubernetes requires of names and namespaces.
fn name() -> impl Strategy<Value = String> {
    "[a-z]([a-z0-9-]{0,9}[a-z0-9])?"
}

fn meta() -> impl Strategy<Value = Meta> {
    (
        name(),
        name(),
        proptest::option::of("[a-f0-9]{8}"),
        proptest::option::of("[0-9]{1,6}"),
        proptest::option::of(1i64..1000),
        prop::collection::btree_map("[a-z]{1,5}", "[a-z0-9]{0,5}", 0..3),
    )
        .prop_map(
            |(namespace, name, uid, resource_version, generation, labels)| Meta {
                namespace,
                name,
                uid,
                resource_version,
                generation,
                labels,
                api_version: String::new(),
            },
        )
}

fn subject() -> impl Strategy<Value = Subject> {
    (name(), proptest::option::of(name())).prop_map(|(name, namespace)| Subject {
        kind: "ServiceAccount".into(),
        name,
        namespace,
    })
}

fn traffic_target() -> impl Strategy<Value = SmiObject> {
    let rule = (
        prop_oneof![
            Just(RuleKind::HTTPRouteGroup),
            Just(RuleKind::TCPRoute),
            Just(RuleKind::UDPRoute)
        ],
        name(),
        proptest::option::of(prop::collection::vec(name(), 0..3)),
    )
        .prop_map(|(kind, name, matches)| TrafficTargetRule {
            kind,
            name,
            matches,
        });
    (
        meta(),
        subject(),
        proptest::option::of(1u16..),
        prop::collection::vec(subject(), 1..4),
        prop::collection::vec(rule, 0..4),
    )
        .prop_map(|(meta, destination, destination_port, sources, rules)| {
            SmiObject::TrafficTarget(TrafficTarget {
                meta,
                destination,
                destination_port,
                sources,
                rules,
            })
        })
}

fn http_route_group() -> impl Strategy<Value = SmiObject> {
    let methods = prop::collection::vec(
        prop::sample::select(vec![
            "*", "GET", "HEAD", "PUT", "POST", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ]),
        0..4,
    );
    let one = (
        methods,
        proptest::option::of("[/a-z.*]{0,10}"),
        prop::collection::btree_map("[a-z-]{1,8}", "[a-z.*]{0,6}", 0..3),
    );
    (meta(), prop::collection::vec(one, 0..4)).prop_map(|(meta, matches)| {
        let matches = matches
            .into_iter()
            .enumerate()
            .map(|(i, (methods, path_regex, headers))| HttpMatch {
                name: format!("match-{i}"),
                methods: methods.into_iter().map(String::from).collect(),
                path_regex,
                headers: headers.into_iter().collect::<BTreeMap<_, _>>(),
            })
            .collect();
        SmiObject::HttpRouteGroup(HttpRouteGroup { meta, matches })
    })
}

fn port_match() -> impl Strategy<Value = Option<PortMatch>> {
    proptest::option::of(
        (
            proptest::option::of(name()),
            prop::collection::vec(1u16.., 0..4),
        )
            .prop_map(|(name, ports)| PortMatch { name, ports }),
    )
}

fn traffic_split() -> impl Strategy<Value = SmiObject> {
    let backend = (name(), 0u64..10_000_000).prop_map(|(service, millis)| TrafficSplitBackend {
        service,
        weight: Weight { millis },
    });
    let route = (
        name(),
        proptest::option::of(Just("specs.smi-spec.io".to_string())),
    )
        .prop_map(|(name, api_group)| RouteRef {
            kind: "HTTPRouteGroup".into(),
            name,
            api_group,
        });
    (
        meta(),
        name(),
        prop::collection::vec(backend, 1..4),
        prop::collection::vec(route, 0..3),
    )
        .prop_map(|(meta, service, backends, matches)| {
            SmiObject::TrafficSplit(TrafficSplit {
                meta,
                service,
                backends,
                matches,
            })
        })
}

fn any_object() -> impl Strategy<Value = SmiObject> {
    prop_oneof![
        traffic_target(),
        http_route_group(),
        (meta(), port_match())
            .prop_map(|(meta, matches)| SmiObject::TcpRoute(TcpRoute { meta, matches })),
        (meta(), port_match())
            .prop_map(|(meta, matches)| SmiObject::UdpRoute(UdpRoute { meta, matches })),
        traffic_split(),
    ]
}

/// Before v1alpha4 a TCPRoute says "all ports" by having no matches; an empty match says the same.
fn normalized(mut obj: SmiObject) -> SmiObject {
    if let SmiObject::TcpRoute(t) = &mut obj
        && t.matches
            .as_ref()
            .is_some_and(|m| m.name.is_none() && m.ports.is_empty())
    {
        t.matches = None;
    }
    obj
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    #[test]
    fn hub_round_trips_through_every_version_that_can_express_it(hub in any_object()) {
        let kind = hub.kind();
        let mut expressed = 0;
        for version in served_versions(kind) {
            let api_version = format!("{}/{version}", kind.group());
            match encode_object(&hub, &api_version) {
                Ok(json) => {
                    let mut back = decode_object(&json)
                        .unwrap_or_else(|e| panic!("{api_version}: {e}\n{json:#}"));
                    prop_assert_eq!(&back.meta().api_version, &api_version);
                    back.meta_mut().api_version = String::new();
                    if *version == storage_version(kind) {
                        prop_assert_eq!(&back, &hub);
                    } else {
                        prop_assert_eq!(normalized(back), normalized(hub.clone()));
                    }
                    expressed += 1;
                }
                Err(e) => prop_assert_eq!(e.error_kind, DecodeErrorKind::NotExpressible, "{}", e),
            }
        }
        // The storage version holds everything except a TrafficTarget with no rules.
        let storage = format!("{}/{}", kind.group(), storage_version(kind));
        let rule_less = matches!(&hub, SmiObject::TrafficTarget(t) if t.rules.is_empty());
        prop_assert_eq!(encode_object(&hub, &storage).is_ok(), !rule_less);
        prop_assert!(expressed > 0 || rule_less);
    }
}
