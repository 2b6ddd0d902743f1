//! One test (or table) per translation rule of the issue, on hand-built hub objects.

mod common;

use common::*;
use consul_smi_api::{ObjectRef, SmiKind, SmiObject};
use consul_smi_core::{
    Action, Command, HeaderMatch, HeaderMatchKind, HttpPermission, IntentionRule, PathMatch,
    Permission, ServiceDefaults, ServiceName,
};
use consul_smi_translate::{
    ConsulApi, Diagnostic, Index, NamespaceMode, Severity, Status, TranslateOptions, Translation,
    codes, diff, translate,
};

fn modern() -> TranslateOptions {
    TranslateOptions {
        target: ConsulApi::Modern,
        ..TranslateOptions::default()
    }
}

fn legacy() -> TranslateOptions {
    TranslateOptions {
        target: ConsulApi::Legacy,
        ..TranslateOptions::default()
    }
}

fn codes_of(translation: &Translation) -> Vec<(&str, Severity, &str)> {
    translation
        .diagnostics
        .iter()
        .map(|d| (d.code, d.severity, d.field.as_str()))
        .collect()
}

fn diag<'a>(translation: &'a Translation, code: &str) -> &'a Diagnostic {
    translation
        .diagnostics
        .iter()
        .find(|d| d.code == code)
        .unwrap_or_else(|| panic!("no {code} diagnostic in {:#?}", translation.diagnostics))
}

fn allow_all(path: PathMatch) -> Permission {
    Permission {
        action: Action::Allow,
        http: HttpPermission {
            path: Some(path),
            methods: vec![],
            headers: vec![],
        },
    }
}

/// The v1alpha1 example from the Consul SMI announcement, as hub objects.
fn announcement() -> Vec<SmiObject> {
    let mut tt = target_obj(
        "default",
        "counting-traffic-target",
        sa_in("default", "counting"),
        vec![sa_in("default", "dashboard")],
        vec![tcp_rule("counting-tcp-route")],
    );
    tt.meta.api_version = ACCESS_V1ALPHA1.into();
    let mut route = tcp_route("default", "counting-tcp-route");
    route.meta_mut().api_version = "specs.smi-spec.io/v1alpha1".into();
    vec![route, SmiObject::TrafficTarget(tt)]
}

#[test]
fn announcement_example_allows_dashboard_to_counting_on_every_target() {
    for options in [legacy(), modern()] {
        let t = translate(&announcement(), &options);
        assert_eq!(t.diagnostics, vec![]);
        assert_eq!(t.state.intentions.len(), 1);
        let intention = &t.state.intentions[&key("dashboard", "counting")];
        assert_eq!(intention.rule, IntentionRule::L4(Action::Allow));
        assert_eq!(
            intention.description,
            "consul-smi: TrafficTarget default/counting-traffic-target"
        );
        assert!(t.state.splitters.is_empty());
        assert!(t.state.service_defaults.is_empty());
    }
}

#[test]
fn announcement_example_deleting_the_target_deletes_the_intention() {
    let mut index = Index::new(legacy());
    let mut commands = Vec::new();
    for object in announcement() {
        commands.extend(index.apply(object));
    }
    assert!(
        matches!(&commands[..], [Command::UpsertIntention(i)] if i.key == key("dashboard", "counting"))
    );
    let tt = ObjectRef::new(SmiKind::TrafficTarget, "default", "counting-traffic-target");
    assert_eq!(
        index.delete(&tt),
        vec![Command::DeleteIntention(key("dashboard", "counting"))]
    );
    assert!(index.desired().is_empty());
    assert_eq!(index.objects_len(), 1);
}

const ANNOUNCEMENT_YAML: &str = "\
apiVersion: specs.smi-spec.io/v1alpha1
kind: TCPRoute
metadata: {name: counting-tcp-route, namespace: default}
---
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha1
metadata: {name: counting-traffic-target, namespace: default}
destination: {kind: ServiceAccount, name: counting, namespace: default}
sources:
- {kind: ServiceAccount, name: dashboard, namespace: default}
specs:
- {kind: TCPRoute, name: counting-tcp-route}
";

#[test]
fn announcement_example_decoded_from_yaml_translates_like_the_hand_built_one() {
    let objects: Vec<SmiObject> = consul_smi_api::decode_manifests(ANNOUNCEMENT_YAML)
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("the announcement example decodes");
    let decoded = translate(&objects, &legacy());
    assert_eq!(decoded, translate(&announcement(), &legacy()));
}

#[test]
fn grants_are_a_union_and_survive_deleting_one_granting_target() {
    let objects = vec![
        tcp_route("default", "tcp"),
        target(
            "default",
            "a",
            sa("api"),
            vec![sa("web")],
            vec![tcp_rule("tcp")],
        ),
        target(
            "default",
            "b",
            sa("api"),
            vec![sa("web"), sa("cron")],
            vec![tcp_rule("tcp")],
        ),
    ];
    let t = translate(&objects, &legacy());
    assert_eq!(
        t.state.intentions[&key("web", "api")].description,
        "consul-smi: TrafficTargets default/a, default/b"
    );
    assert!(t.state.intentions.contains_key(&key("cron", "api")));

    let mut index = Index::new(legacy());
    index.reset(objects);
    let commands = index.delete(&ObjectRef::new(SmiKind::TrafficTarget, "default", "b"));
    // web -> api is still granted by `a`; only its provenance changes.
    assert_eq!(commands.len(), 2);
    assert_eq!(commands[0], Command::DeleteIntention(key("cron", "api")));
    let Command::UpsertIntention(web) = &commands[1] else {
        panic!("{commands:?}")
    };
    assert_eq!(web.key, key("web", "api"));
    assert_eq!(web.rule, IntentionRule::L4(Action::Allow));
    assert_eq!(web.description, "consul-smi: TrafficTarget default/a");
}

#[test]
fn http_route_group_matches_become_l7_permissions() {
    let objects = vec![
        http_group(
            "default",
            "routes",
            vec![
                http_match("metrics", &["get", "HEAD"], Some("/metrics")),
                http_match("anchored", &["*", "POST"], Some("^/api/.*")),
                with_header(
                    http_match("android", &[], None),
                    "user-agent",
                    ".*Android.*",
                ),
                http_match("everything", &[], None),
            ],
        ),
        target(
            "default",
            "tt",
            sa("api"),
            vec![sa("web")],
            vec![http_rule("routes", None)],
        ),
    ];
    let t = translate(&objects, &modern());
    assert_eq!(t.diagnostics, vec![]);
    let IntentionRule::L7(permissions) = &t.state.intentions[&key("web", "api")].rule else {
        panic!("expected L7")
    };
    let expected = vec![
        Permission {
            action: Action::Allow,
            http: HttpPermission {
                path: None,
                methods: vec![],
                headers: vec![HeaderMatch {
                    name: "user-agent".into(),
                    kind: HeaderMatchKind::Regex(".*Android.*".into()),
                    invert: false,
                }],
            },
        },
        // No restriction at all: Consul rejects an empty HTTP permission, "/" matches all.
        allow_all(PathMatch::Prefix("/".into())),
        Permission {
            action: Action::Allow,
            http: HttpPermission {
                path: Some(PathMatch::Regex("^/api/.*".into())),
                methods: vec![],
                headers: vec![],
            },
        },
        Permission {
            action: Action::Allow,
            http: HttpPermission {
                path: Some(PathMatch::Regex("^/metrics".into())),
                methods: vec!["GET".into(), "HEAD".into()],
                headers: vec![],
            },
        },
        // Everything else is denied by the grant itself, not left to Consul's default action.
        Permission::deny_every_request(),
    ];
    assert_eq!(permissions, &expected);
    // L7 intentions need the destination's protocol to be http.
    assert_eq!(
        t.state.service_defaults.values().collect::<Vec<_>>(),
        vec![&ServiceDefaults {
            service: ServiceName::new("api"),
            protocol: "http".into()
        }]
    );
}

#[test]
fn permissions_of_several_rules_and_targets_merge_deduplicated() {
    let objects = vec![
        http_group(
            "default",
            "g",
            vec![
                http_match("a", &[], Some("/a")),
                http_match("b", &[], Some("/b")),
            ],
        ),
        target(
            "default",
            "t1",
            sa("api"),
            vec![sa("web")],
            vec![http_rule("g", Some(&["a"]))],
        ),
        target(
            "default",
            "t2",
            sa("api"),
            vec![sa("web")],
            vec![http_rule("g", Some(&["b", "a"]))],
        ),
    ];
    let t = translate(&objects, &modern());
    let IntentionRule::L7(permissions) = &t.state.intentions[&key("web", "api")].rule else {
        panic!("expected L7")
    };
    assert_eq!(
        permissions,
        &vec![
            allow_all(PathMatch::Regex("^/a".into())),
            allow_all(PathMatch::Regex("^/b".into())),
            Permission::deny_every_request(),
        ]
    );
}

#[test]
fn any_tcp_rule_makes_the_pair_a_plain_l4_allow() {
    let objects = vec![
        tcp_route("default", "tcp"),
        http_group("default", "g", vec![http_match("a", &["GET"], Some("/a"))]),
        target(
            "default",
            "http",
            sa("api"),
            vec![sa("web")],
            vec![http_rule("g", None)],
        ),
        target(
            "default",
            "tcp",
            sa("api"),
            vec![sa("web")],
            vec![tcp_rule("tcp")],
        ),
    ];
    for options in [legacy(), modern()] {
        let t = translate(&objects, &options);
        assert_eq!(
            t.state.intentions[&key("web", "api")].rule,
            IntentionRule::L4(Action::Allow)
        );
        assert!(
            t.state.service_defaults.is_empty(),
            "no L7 intention, no protocol needed"
        );
        assert_eq!(t.diagnostics, vec![]);
    }
}

#[test]
fn missing_match_is_diagnosed_and_grants_nothing_for_that_name() {
    let objects = vec![
        http_group("default", "g", vec![http_match("a", &[], Some("/a"))]),
        target(
            "default",
            "tt",
            sa("api"),
            vec![sa("web")],
            vec![http_rule("g", Some(&["a", "nope"]))],
        ),
        target(
            "default",
            "only-missing",
            sa("db"),
            vec![sa("web")],
            vec![http_rule("g", Some(&["nope"]))],
        ),
    ];
    let t = translate(&objects, &modern());
    assert_eq!(
        t.state.intentions[&key("web", "api")].rule,
        IntentionRule::L7(vec![
            allow_all(PathMatch::Regex("^/a".into())),
            Permission::deny_every_request()
        ])
    );
    assert!(!t.state.intentions.contains_key(&key("web", "db")));
    assert_eq!(
        codes_of(&t),
        vec![
            (
                codes::MATCH_NOT_FOUND,
                Severity::Error,
                "spec.rules[0].matches[0]"
            ),
            (
                codes::MATCH_NOT_FOUND,
                Severity::Error,
                "spec.rules[0].matches[1]"
            ),
        ]
    );
    assert_eq!(t.diagnostics[0].object.name, "only-missing");
    assert_eq!(t.diagnostics[1].object.name, "tt");
}

#[test]
fn missing_route_grants_nothing_until_it_appears() {
    let tt = target(
        "default",
        "tt",
        sa("api"),
        vec![sa("web")],
        vec![tcp_rule("later")],
    );
    let t = translate(std::slice::from_ref(&tt), &legacy());
    assert!(t.state.intentions.is_empty());
    let d = diag(&t, codes::ROUTE_NOT_FOUND);
    assert_eq!(
        d.object,
        ObjectRef::new(SmiKind::TrafficTarget, "default", "tt")
    );
    assert_eq!(d.field, "spec.rules[0].name");
    assert_eq!(d.severity, Severity::Error);

    let mut index = Index::new(legacy());
    assert_eq!(index.apply(tt), vec![]);
    assert_eq!(index.status(&d.object).unwrap().status, Status::Errors);
    let commands = index.apply(tcp_route("default", "later"));
    assert!(matches!(&commands[..], [Command::UpsertIntention(i)] if i.key == key("web", "api")));
    assert_eq!(index.status(&d.object).unwrap().status, Status::Ok);
    // And it goes away again with the route.
    let commands = index.delete(&ObjectRef::new(SmiKind::TCPRoute, "default", "later"));
    assert_eq!(commands, vec![Command::DeleteIntention(key("web", "api"))]);
}

#[test]
fn route_in_another_namespace_does_not_resolve() {
    let objects = vec![
        tcp_route("other", "tcp"),
        target(
            "default",
            "tt",
            sa("api"),
            vec![sa("web")],
            vec![tcp_rule("tcp")],
        ),
    ];
    let t = translate(&objects, &legacy());
    assert!(t.state.intentions.is_empty());
    diag(&t, codes::ROUTE_NOT_FOUND);
}

#[test]
fn legacy_consul_withholds_l7_only_grants_unless_widening_is_enabled() {
    let objects = vec![
        http_group("default", "g", vec![http_match("a", &["GET"], Some("/a"))]),
        target(
            "default",
            "tt",
            sa("api"),
            vec![sa("web")],
            vec![http_rule("g", None)],
        ),
    ];
    let withheld = translate(&objects, &legacy());
    assert!(
        withheld.state.is_empty(),
        "never silently widen: {:?}",
        withheld.state
    );
    assert_eq!(
        codes_of(&withheld),
        vec![(
            codes::L7_WITHHELD_ON_LEGACY,
            Severity::Error,
            "spec.rules[0]"
        )]
    );

    let options = TranslateOptions {
        widen_l7_on_legacy: true,
        ..legacy()
    };
    let widened = translate(&objects, &options);
    assert_eq!(
        widened.state.intentions[&key("web", "api")].rule,
        IntentionRule::L4(Action::Allow)
    );
    assert!(widened.state.service_defaults.is_empty());
    assert_eq!(
        codes_of(&widened),
        vec![(
            codes::L7_WIDENED_ON_LEGACY,
            Severity::Warning,
            "spec.rules[0]"
        )]
    );
}

#[test]
fn udp_rules_are_unenforceable_and_never_allow() {
    let objects = vec![
        udp_route("default", "dns"),
        target(
            "default",
            "tt",
            sa("dns"),
            vec![sa("web")],
            vec![udp_rule("dns")],
        ),
    ];
    for options in [legacy(), modern()] {
        let t = translate(&objects, &options);
        assert!(t.state.is_empty());
        assert_eq!(
            codes_of(&t),
            vec![
                (
                    codes::UDP_UNENFORCEABLE,
                    Severity::Error,
                    "spec.rules[0].kind"
                ),
                (codes::UDP_UNENFORCEABLE, Severity::Warning, "kind"),
            ]
        );
    }
}

#[test]
fn ports_are_granted_with_a_not_enforced_warning() {
    let mut tt = target_obj(
        "default",
        "tt",
        sa("api"),
        vec![sa("web")],
        vec![tcp_rule("tcp")],
    );
    tt.meta.api_version = ACCESS_V1ALPHA1.into();
    tt.destination_port = Some(8080);
    let objects = vec![
        tcp_route_ports("default", "tcp", &[5432]),
        SmiObject::TrafficTarget(tt),
    ];
    let t = translate(&objects, &legacy());
    assert_eq!(
        t.state.intentions[&key("web", "api")].rule,
        IntentionRule::L4(Action::Allow)
    );
    assert_eq!(
        codes_of(&t),
        vec![
            (
                codes::PORT_NOT_ENFORCED,
                Severity::Warning,
                "destination.port"
            ),
            (
                codes::PORT_NOT_ENFORCED,
                Severity::Warning,
                "spec.matches.ports"
            ),
        ]
    );
}

#[test]
fn diagnostic_fields_follow_the_object_api_version() {
    let mut v1 = target_obj(
        "default",
        "v1",
        sa("api"),
        vec![sa("web")],
        vec![tcp_rule("missing")],
    );
    v1.meta.api_version = ACCESS_V1ALPHA1.into();
    let v3 = target(
        "default",
        "v3",
        sa("api"),
        vec![sa("web")],
        vec![tcp_rule("missing")],
    );
    let t = translate(&[SmiObject::TrafficTarget(v1), v3], &legacy());
    let fields: Vec<&str> = t.diagnostics.iter().map(|d| d.field.as_str()).collect();
    assert_eq!(fields, vec!["specs[0].name", "spec.rules[0].name"]);
}

#[test]
fn source_namespace_defaults_to_the_target_namespace() {
    let options = TranslateOptions {
        namespaces: NamespaceMode::Enterprise {
            mirroring_prefix: Some("k8s-".into()),
        },
        ..legacy()
    };
    let objects = vec![
        tcp_route("shop", "tcp"),
        target(
            "shop",
            "tt",
            sa("api"),
            vec![sa("web"), sa_in("ops", "prometheus")],
            vec![tcp_rule("tcp")],
        ),
    ];
    let t = translate(&objects, &options);
    let keys: Vec<String> = t.state.intentions.keys().map(ToString::to_string).collect();
    assert_eq!(
        keys,
        vec![
            "k8s-ops/prometheus -> k8s-shop/api",
            "k8s-shop/web -> k8s-shop/api"
        ]
    );
    assert_eq!(t.diagnostics, vec![]);
}

#[test]
fn enterprise_without_prefix_mirrors_namespaces_and_does_not_collapse() {
    let options = TranslateOptions {
        namespaces: NamespaceMode::Enterprise {
            mirroring_prefix: None,
        },
        ..legacy()
    };
    let objects = vec![
        tcp_route("a", "tcp"),
        tcp_route("b", "tcp"),
        target("a", "tt", sa("api"), vec![sa("web")], vec![tcp_rule("tcp")]),
        target("b", "tt", sa("api"), vec![sa("web")], vec![tcp_rule("tcp")]),
    ];
    let t = translate(&objects, &options);
    let keys: Vec<String> = t.state.intentions.keys().map(ToString::to_string).collect();
    assert_eq!(keys, vec!["a/web -> a/api", "b/web -> b/api"]);
    assert_eq!(t.diagnostics, vec![]);
}

#[test]
fn oss_reports_service_accounts_of_different_namespaces_collapsing() {
    let objects = vec![
        tcp_route("a", "tcp"),
        tcp_route("b", "tcp"),
        target("a", "tt", sa("api"), vec![sa("web")], vec![tcp_rule("tcp")]),
        target("b", "tt", sa("db"), vec![sa("web")], vec![tcp_rule("tcp")]),
    ];
    let t = translate(&objects, &legacy());
    assert_eq!(t.state.intentions.len(), 2);
    let collapse: Vec<(&str, &str)> = t
        .diagnostics
        .iter()
        .filter(|d| d.code == codes::NAMESPACE_COLLAPSE)
        .map(|d| (d.object.namespace.as_str(), d.field.as_str()))
        .collect();
    assert_eq!(
        collapse,
        vec![("a", "spec.sources[0].name"), ("b", "spec.sources[0].name")]
    );
    assert!(
        t.diagnostics
            .iter()
            .all(|d| d.severity == Severity::Warning)
    );
    assert!(
        diag(&t, codes::NAMESPACE_COLLAPSE)
            .message
            .contains("namespace(s) b")
    );

    // Incrementally: removing one side clears the warning on the other.
    let mut index = Index::new(legacy());
    index.reset(objects);
    assert_eq!(index.diagnostics().count(), 2);
    index.delete(&ObjectRef::new(SmiKind::TrafficTarget, "b", "tt"));
    assert_eq!(index.diagnostics().count(), 0);
}

#[test]
fn invalid_subjects_are_ignored_with_errors() {
    let objects = vec![
        tcp_route("default", "tcp"),
        target(
            "default",
            "tt",
            sa("api"),
            vec![
                consul_smi_api::Subject {
                    kind: "IdentityBinding".into(),
                    name: "x".into(),
                    namespace: None,
                },
                sa("*"),
                sa("web*"),
                sa(""),
                sa("web"),
            ],
            vec![tcp_rule("tcp")],
        ),
        target(
            "default",
            "wild-destination",
            sa("*"),
            vec![sa("web")],
            vec![tcp_rule("tcp")],
        ),
        target(
            "default",
            "no-sources",
            sa("api"),
            vec![],
            vec![tcp_rule("tcp")],
        ),
        target("default", "no-rules", sa("api"), vec![sa("cron")], vec![]),
    ];
    let t = translate(&objects, &legacy());
    let keys: Vec<String> = t.state.intentions.keys().map(ToString::to_string).collect();
    assert_eq!(
        keys,
        vec!["web -> api"],
        "wildcards must never reach Consul"
    );
    assert_eq!(
        codes_of(&t),
        vec![
            (codes::NO_RULES, Severity::Error, "spec.rules"),
            (codes::NO_SOURCES, Severity::Error, "spec.sources"),
            (
                codes::UNSUPPORTED_SUBJECT_KIND,
                Severity::Error,
                "spec.sources[0].kind"
            ),
            (
                codes::INVALID_SUBJECT_NAME,
                Severity::Error,
                "spec.sources[1].name"
            ),
            (
                codes::INVALID_SUBJECT_NAME,
                Severity::Error,
                "spec.sources[2].name"
            ),
            (
                codes::INVALID_SUBJECT_NAME,
                Severity::Error,
                "spec.sources[3].name"
            ),
            (
                codes::INVALID_SUBJECT_NAME,
                Severity::Error,
                "spec.destination.name"
            ),
        ]
    );
}

#[test]
fn invalid_http_methods_narrow_and_never_widen_a_match() {
    let objects = vec![
        http_group(
            "default",
            "g",
            vec![
                http_match("some", &["GET", "FETCH"], Some("/a")),
                http_match("none", &["FETCH"], Some("/b")),
            ],
        ),
        target(
            "default",
            "tt",
            sa("api"),
            vec![sa("web")],
            vec![http_rule("g", None)],
        ),
    ];
    let t = translate(&objects, &modern());
    let IntentionRule::L7(permissions) = &t.state.intentions[&key("web", "api")].rule else {
        panic!("expected L7")
    };
    assert_eq!(permissions.len(), 2);
    assert_eq!(permissions[0].http.methods, vec!["GET".to_string()]);
    assert_eq!(permissions[1], Permission::deny_every_request());
    assert_eq!(
        codes_of(&t),
        vec![
            (
                codes::INVALID_HTTP_METHOD,
                Severity::Error,
                "spec.matches[0].methods[1]"
            ),
            (
                codes::INVALID_HTTP_METHOD,
                Severity::Error,
                "spec.matches[1].methods[0]"
            ),
        ]
    );
}

#[test]
fn empty_route_group_grants_nothing() {
    let objects = vec![
        http_group("default", "g", vec![]),
        target(
            "default",
            "tt",
            sa("api"),
            vec![sa("web")],
            vec![http_rule("g", None)],
        ),
    ];
    let t = translate(&objects, &modern());
    assert!(t.state.is_empty());
    assert_eq!(
        codes_of(&t),
        vec![(
            codes::ROUTE_HAS_NO_MATCHES,
            Severity::Error,
            "spec.rules[0].name"
        )]
    );
}

#[test]
fn traffic_split_becomes_a_splitter_summing_to_exactly_100() {
    type Case<'a> = (&'a [(&'a str, u64)], &'a [(&'a str, f32)]);
    let cases: &[Case] = &[
        (
            &[("v1", 1000), ("v2", 1000), ("v3", 1000)],
            &[("v1", 33.34), ("v2", 33.33), ("v3", 33.33)],
        ),
        // v1alpha1 Quantities: 500m and 1500m.
        (&[("v1", 500), ("v2", 1500)], &[("v1", 25.0), ("v2", 75.0)]),
        (
            &[("v1", 90_000), ("v2", 10_000)],
            &[("v1", 90.0), ("v2", 10.0)],
        ),
        (
            &[("v1", 2000), ("v2", 1000), ("v3", 1000)],
            &[("v1", 50.0), ("v2", 25.0), ("v3", 25.0)],
        ),
        // A zero-weight backend receives nothing and is left out.
        (&[("v1", 1000), ("v2", 0)], &[("v1", 100.0)]),
        (
            &[
                ("v1", 1),
                ("v2", 1),
                ("v3", 1),
                ("v4", 1),
                ("v5", 1),
                ("v6", 1),
            ],
            &[
                ("v1", 16.67),
                ("v2", 16.67),
                ("v3", 16.67),
                ("v4", 16.67),
                ("v5", 16.66),
                ("v6", 16.66),
            ],
        ),
    ];
    for (backends, expected) in cases {
        let t = translate(&[split("default", "s", "web", backends)], &legacy());
        let splitter = &t.state.splitters[&ServiceName::new("web")];
        let got: Vec<(&str, f32)> = splitter
            .splits
            .iter()
            .map(|s| (s.service.as_str(), s.weight))
            .collect();
        assert_eq!(&got, expected, "{backends:?}");
        // Consul's own check: round(weight * 100) must sum to 10000.
        let scaled: i64 = splitter
            .splits
            .iter()
            .map(|s| (f64::from(s.weight) * 100.0).round() as i64)
            .sum();
        assert_eq!(scaled, 10_000);
        assert_eq!(t.diagnostics, vec![]);
    }
}

#[test]
fn traffic_split_needs_http_on_root_and_backends() {
    let t = translate(
        &[split(
            "default",
            "s",
            "web",
            &[("web-v1", 1000), ("web-v2", 1000)],
        )],
        &legacy(),
    );
    let services: Vec<&str> = t
        .state
        .service_defaults
        .keys()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(services, vec!["web", "web-v1", "web-v2"]);
    assert!(
        t.state
            .service_defaults
            .values()
            .all(|d| d.protocol == "http")
    );
}

#[test]
fn unexpressible_traffic_splits_produce_no_splitter() {
    let cases: Vec<(SmiObject, &str, &str)> = vec![
        (
            split("default", "zero", "web", &[("v1", 0), ("v2", 0)]),
            codes::SPLIT_ZERO_TOTAL_WEIGHT,
            "spec.backends",
        ),
        (
            split("default", "empty", "web", &[]),
            codes::SPLIT_ZERO_TOTAL_WEIGHT,
            "spec.backends",
        ),
        (
            split_with_matches("default", "matches", "web", "g"),
            codes::SPLIT_MATCHES_UNSUPPORTED,
            "spec.matches",
        ),
        (
            split("default", "wild", "*", &[("v1", 1000)]),
            codes::INVALID_SERVICE_NAME,
            "spec.service",
        ),
        (
            split("default", "wild-backend", "web", &[("*", 1000)]),
            codes::INVALID_SERVICE_NAME,
            "spec.backends[0].service",
        ),
    ];
    for (object, code, field) in cases {
        let t = translate(std::slice::from_ref(&object), &modern());
        assert!(t.state.is_empty(), "{object:?}");
        let d = diag(&t, code);
        assert_eq!((d.severity, d.field.as_str()), (Severity::Error, field));
    }
}

#[test]
fn duplicate_backends_are_merged_with_a_warning() {
    let t = translate(
        &[split(
            "default",
            "s",
            "web",
            &[("v1", 1000), ("v2", 2000), ("v1", 1000)],
        )],
        &legacy(),
    );
    let got: Vec<(&str, f32)> = t.state.splitters[&ServiceName::new("web")]
        .splits
        .iter()
        .map(|s| (s.service.as_str(), s.weight))
        .collect();
    assert_eq!(got, vec![("v1", 50.0), ("v2", 50.0)]);
    assert_eq!(
        codes_of(&t),
        vec![(
            codes::SPLIT_DUPLICATE_BACKEND,
            Severity::Warning,
            "spec.backends[2].service"
        )]
    );
}

#[test]
fn two_splits_of_one_service_keep_the_first_by_namespace_and_name() {
    let objects = vec![
        split("b", "s", "web", &[("v2", 1000)]),
        split("a", "s", "web", &[("v1", 1000)]),
    ];
    let t = translate(&objects, &legacy());
    assert_eq!(
        t.state.splitters[&ServiceName::new("web")].splits[0].service,
        "v1"
    );
    let d = diag(&t, codes::SPLIT_CONFLICT);
    assert_eq!(d.object, ObjectRef::new(SmiKind::TrafficSplit, "b", "s"));

    // Deleting the winner promotes the other.
    let mut index = Index::new(legacy());
    index.reset(objects);
    index.delete(&ObjectRef::new(SmiKind::TrafficSplit, "a", "s"));
    assert_eq!(
        index.desired().splitters[&ServiceName::new("web")].splits[0].service,
        "v2"
    );
    assert_eq!(index.diagnostics().count(), 0);
}

#[test]
fn default_deny_is_managed_only_when_enabled() {
    assert!(translate(&[], &legacy()).state.is_empty());
    let options = TranslateOptions {
        default_deny: true,
        ..legacy()
    };
    let t = translate(&[], &options);
    let keys: Vec<String> = t.state.intentions.keys().map(ToString::to_string).collect();
    assert_eq!(keys, vec!["* -> *"]);
    assert_eq!(
        t.state.intentions.values().next().unwrap().rule,
        IntentionRule::L4(Action::Deny)
    );
    assert_eq!(Index::new(options).desired(), &t.state);
}

#[test]
fn description_is_truncated_to_consuls_512_bytes_deterministically() {
    let mut objects = vec![tcp_route("default", "tcp")];
    for i in 0..60 {
        objects.push(target(
            "default",
            &format!("a-rather-long-traffic-target-name-{i:03}"),
            sa("api"),
            vec![sa("web")],
            vec![tcp_rule("tcp")],
        ));
    }
    let t = translate(&objects, &legacy());
    let description = &t.state.intentions[&key("web", "api")].description;
    assert!(description.len() <= 512, "{}", description.len());
    assert!(
        description.starts_with(
            "consul-smi: TrafficTargets default/a-rather-long-traffic-target-name-000, "
        )
    );
    assert!(description.ends_with(" more)"), "{description}");
    objects.reverse();
    assert_eq!(
        &translate(&objects, &legacy()).state.intentions[&key("web", "api")].description,
        description
    );
}

#[test]
fn diff_orders_writes_so_consul_accepts_each_one() {
    let objects = vec![
        http_group("default", "g", vec![http_match("a", &["GET"], Some("/a"))]),
        target(
            "default",
            "tt",
            sa("api"),
            vec![sa("web")],
            vec![http_rule("g", None)],
        ),
        split("default", "s", "api", &[("api-v2", 1000)]),
    ];
    let state = translate(&objects, &modern()).state;
    let kinds = |commands: &[Command]| -> Vec<String> {
        commands
            .iter()
            .map(|c| {
                c.target().split(' ').next().unwrap().to_string()
                    + if matches!(
                        c,
                        Command::DeleteIntention(_)
                            | Command::DeleteSplitter(_)
                            | Command::DeleteServiceDefaults(_)
                    ) {
                        "-"
                    } else {
                        "+"
                    }
            })
            .collect()
    };
    let up = diff(&Default::default(), &state);
    assert_eq!(
        kinds(&up),
        vec![
            "service-defaults+",
            "service-defaults+",
            "service-splitter+",
            "intention+"
        ]
    );
    let down = diff(&state, &Default::default());
    assert_eq!(
        kinds(&down),
        vec![
            "intention-",
            "service-splitter-",
            "service-defaults-",
            "service-defaults-"
        ]
    );
}

#[test]
fn every_object_is_listed_with_its_status() {
    let mut index = Index::new(legacy());
    index.reset(vec![
        tcp_route("default", "tcp"),
        tcp_route_ports("default", "ports", &[80]),
        target(
            "default",
            "bad",
            sa("api"),
            vec![sa("web")],
            vec![tcp_rule("missing")],
        ),
    ]);
    let statuses: Vec<(String, Status)> = index
        .statuses()
        .map(|s| (s.object.to_string(), s.status))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("TrafficTarget/default/bad".to_string(), Status::Errors),
            ("TCPRoute/default/ports".to_string(), Status::Warnings),
            ("TCPRoute/default/tcp".to_string(), Status::Ok),
        ]
    );
}

#[test]
fn reapplying_an_identical_object_is_a_no_op_and_changing_options_recomputes() {
    let objects = vec![
        http_group("default", "g", vec![http_match("a", &["GET"], Some("/a"))]),
        target(
            "default",
            "tt",
            sa("api"),
            vec![sa("web")],
            vec![http_rule("g", None)],
        ),
    ];
    let mut index = Index::new(legacy());
    index.reset(objects.clone());
    assert!(index.desired().is_empty());
    assert_eq!(index.apply(objects[1].clone()), vec![]);
    let commands = index.set_options(modern());
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert_eq!(index.desired(), &translate(&objects, &modern()).state);
}

#[test]
fn the_index_can_move_between_threads() {
    // The translator service keeps it in an async task.
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Index>();
    assert_send_sync::<Translation>();
}

#[test]
fn a_reset_to_a_nearly_identical_snapshot_returns_only_the_difference() {
    // A watch restart delivers every object again; Consul must only see what changed meanwhile.
    let grant = |name: &str, destination: &str, sources: &[&str]| {
        let sources = sources.iter().map(|s| sa(s)).collect();
        target(
            "default",
            name,
            sa(destination),
            sources,
            vec![tcp_rule("tcp")],
        )
    };
    let mut objects = vec![tcp_route("default", "tcp")];
    objects.extend((0..40).map(|i| grant(&format!("tt-{i}"), &format!("api-{i}"), &["web"])));
    objects.push(target(
        "default",
        "tt-broken",
        sa("db"),
        vec![sa("web")],
        vec![tcp_rule("missing")],
    ));
    let mut index = Index::new(modern());
    index.reset(objects.clone());
    let diagnostics: Vec<Diagnostic> = index.diagnostics().cloned().collect();
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");

    assert_eq!(index.reset(objects.clone()), vec![]);
    assert_eq!(index.desired(), &translate(&objects, &modern()).state);
    assert_eq!(
        index.diagnostics().cloned().collect::<Vec<_>>(),
        diagnostics
    );

    // tt-5 gains a source, tt-7 is gone, tt-new appears.
    let mut next = objects.clone();
    next[1 + 5] = grant("tt-5", "api-5", &["web", "batch"]);
    next.remove(1 + 7);
    next.push(grant("tt-new", "api-new", &["web"]));
    let commands = index.reset(next.clone());
    let expected = translate(&next, &modern()).state;
    assert_eq!(
        commands,
        vec![
            Command::UpsertIntention(expected.intentions[&key("batch", "api-5")].clone()),
            Command::DeleteIntention(key("web", "api-7")),
            Command::UpsertIntention(expected.intentions[&key("web", "api-new")].clone()),
        ]
    );
    assert_eq!(index.desired(), &expected);
    assert_eq!(index.objects_len(), 42);
    assert_eq!(
        index.diagnostics().cloned().collect::<Vec<_>>(),
        diagnostics
    );
    assert_eq!(index.get(&next[1 + 5].object_ref()), Some(&next[1 + 5]));
}
