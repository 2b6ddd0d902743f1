//! Decoding real manifests of every version, and invalid ones whose errors must name the field.

use std::path::{Path, PathBuf};

use consul_smi_api::{
    DecodeErrorKind, RuleKind, SmiKind, SmiObject, Subject, Weight, decode_manifests, decode_object,
};

fn fixture_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(sub)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn decode_ok(file: &str) -> Vec<SmiObject> {
    let path = fixture_dir("valid").join(file);
    decode_manifests(&read(&path))
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
}

fn sa(name: &str, namespace: Option<&str>) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: namespace.map(Into::into),
    }
}

#[test]
fn consul_announcement_example_decodes_unchanged() {
    let text = read(&fixture_dir("").join("consul-announcement-v1alpha1.yaml"));
    let objects: Vec<SmiObject> = decode_manifests(&text)
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(objects.len(), 2);

    let SmiObject::TcpRoute(route) = &objects[0] else {
        panic!("first is the TCPRoute: {:?}", objects[0])
    };
    assert_eq!(route.meta.name, "counting-tcp-route");
    assert_eq!(route.meta.namespace, "default");
    assert_eq!(route.meta.api_version, "specs.smi-spec.io/v1alpha1");
    assert_eq!(route.matches, None, "no matches = all ports");

    let SmiObject::TrafficTarget(tt) = &objects[1] else {
        panic!("second is the TrafficTarget: {:?}", objects[1])
    };
    assert_eq!(tt.meta.name, "counting-traffic-target");
    assert_eq!(tt.meta.api_version, "access.smi-spec.io/v1alpha1");
    assert_eq!(tt.destination, sa("counting", Some("default")));
    assert_eq!(tt.destination_port, None);
    assert_eq!(tt.sources, vec![sa("dashboard", Some("default"))]);
    assert_eq!(tt.rules.len(), 1);
    assert_eq!(tt.rules[0].kind, RuleKind::TCPRoute);
    assert_eq!(tt.rules[0].name, "counting-tcp-route");
    assert_eq!(tt.rules[0].matches, None);
}

#[test]
fn access_every_version() {
    let v1 = decode_ok("access-v1alpha1.yaml");
    let v2 = decode_ok("access-v1alpha2.yaml");
    let (SmiObject::TrafficTarget(a), SmiObject::TrafficTarget(b)) = (&v1[0], &v2[0]) else {
        panic!()
    };
    // v1alpha1 (top level, `specs`) and v1alpha2 (`spec.rules`) say the same thing.
    assert_eq!(a.destination, b.destination);
    assert_eq!(a.destination_port, Some(8080));
    assert_eq!(b.destination_port, Some(8080));
    assert_eq!(a.sources, b.sources);
    assert_eq!(a.rules, b.rules);
    assert_eq!(
        a.rules[0].matches.as_deref(),
        Some(&["metrics".to_string()][..])
    );
    assert_eq!(
        a.meta.labels.get("app").map(String::as_str),
        Some("service-a")
    );

    let v3 = decode_ok("access-v1alpha3.yaml");
    let SmiObject::TrafficTarget(c) = &v3[0] else {
        panic!()
    };
    assert_eq!(c.destination_port, None);
    let kinds: Vec<RuleKind> = c.rules.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [
            RuleKind::TCPRoute,
            RuleKind::HTTPRouteGroup,
            RuleKind::UDPRoute
        ]
    );
    assert_eq!(
        c.sources[1],
        sa("grafana", None),
        "omitted namespace stays None (= the target's namespace)"
    );
}

#[test]
fn specs_every_version() {
    let v1 = decode_ok("specs-v1alpha1.yaml");
    let SmiObject::HttpRouteGroup(h1) = &v1[0] else {
        panic!()
    };
    assert_eq!(h1.matches.len(), 2);
    assert_eq!(h1.matches[0].methods, ["GET"]);
    assert_eq!(h1.matches[0].path_regex.as_deref(), Some("/metrics"));
    assert_eq!(h1.matches[1].methods, ["*"]);
    assert_eq!(v1[1].kind(), SmiKind::TCPRoute);
    assert_eq!(
        v1[1].meta().namespace,
        "default",
        "namespace defaults to default"
    );

    let v2 = decode_ok("specs-v1alpha2.yaml");
    let SmiObject::HttpRouteGroup(h2) = &v2[0] else {
        panic!()
    };
    assert_eq!(
        h2.matches[0].headers.get("user-agent").map(String::as_str),
        Some(".*Android.*")
    );
    assert_eq!(h2.matches[0].headers.len(), 2);
    assert!(h2.matches[0].methods.is_empty());

    let v3 = decode_ok("specs-v1alpha3.yaml");
    let SmiObject::HttpRouteGroup(h3) = &v3[0] else {
        panic!()
    };
    assert_eq!(
        h3.matches[1].headers.get("x-debug").map(String::as_str),
        Some("1")
    );
    let SmiObject::TcpRoute(t3) = &v3[1] else {
        panic!()
    };
    assert_eq!(t3.matches, None);

    let v4 = decode_ok("specs-v1alpha4.yaml");
    let SmiObject::HttpRouteGroup(h4) = &v4[0] else {
        panic!()
    };
    assert_eq!(
        h4.matches[1].headers.len(),
        2,
        "list-of-maps headers merged"
    );
    let SmiObject::TcpRoute(t4) = &v4[1] else {
        panic!()
    };
    let ports = t4.matches.as_ref().unwrap();
    assert_eq!(
        (ports.name.as_deref(), ports.ports.as_slice()),
        (Some("tcp-ports"), &[3306, 6446][..])
    );
    let SmiObject::TcpRoute(all) = &v4[2] else {
        panic!()
    };
    assert_eq!(all.matches, None);
    let SmiObject::UdpRoute(u4) = &v4[3] else {
        panic!()
    };
    assert_eq!(u4.matches.as_ref().unwrap().ports, [53]);
}

#[test]
fn split_every_version() {
    let v1 = decode_ok("split-v1alpha1.yaml");
    let SmiObject::TrafficSplit(s1) = &v1[0] else {
        panic!()
    };
    assert_eq!(s1.service, "website");
    let weights: Vec<Weight> = s1.backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [Weight { millis: 900 }, Weight { millis: 100 }]);
    let SmiObject::TrafficSplit(units) = &v1[1] else {
        panic!()
    };
    assert_eq!(
        units.backends[0].weight,
        Weight::from_units(1),
        "YAML integer quantity"
    );
    assert_eq!(
        units.backends[1].weight,
        Weight::from_units(3),
        "string quantity"
    );

    let v2 = decode_ok("split-v1alpha2.yaml");
    let SmiObject::TrafficSplit(s2) = &v2[0] else {
        panic!()
    };
    assert_eq!(s2.backends[0].weight, Weight::from_units(50));
    assert!(s2.matches.is_empty());

    for file in ["split-v1alpha3.yaml", "split-v1alpha4.yaml"] {
        let objects = decode_ok(file);
        let SmiObject::TrafficSplit(s) = &objects[0] else {
            panic!()
        };
        assert_eq!(s.matches.len(), 1, "{file}");
        assert_eq!(s.matches[0].kind, "HTTPRouteGroup");
        assert_eq!(s.matches[0].name, "ab-test");
    }
}

#[test]
fn every_served_version_has_a_valid_fixture() {
    let mut seen = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(fixture_dir("valid")).unwrap() {
        for object in decode_ok(entry.unwrap().file_name().to_str().unwrap()) {
            seen.insert((object.kind(), object.meta().api_version.clone()));
        }
    }
    for kind in SmiKind::ALL {
        for version in consul_smi_api::served_versions(kind) {
            let api_version = format!("{}/{version}", kind.group());
            assert!(
                seen.contains(&(kind, api_version.clone())),
                "no fixture for {kind} {api_version}"
            );
        }
    }
}

/// Expectations are written at the top of each invalid fixture as `# expect-<what>: value`.
fn expectation<'a>(text: &'a str, what: &str) -> Option<&'a str> {
    let prefix = format!("# expect-{what}: ");
    text.lines().find_map(|l| l.strip_prefix(prefix.as_str()))
}

#[test]
fn invalid_manifests_name_the_field() {
    let mut checked = 0;
    for entry in std::fs::read_dir(fixture_dir("invalid")).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        let text = read(&path);
        let results = decode_manifests(&text);
        assert_eq!(results.len(), 1, "{file}: one document");
        let err = match &results[0] {
            Ok(obj) => panic!("{file}: decoded but should fail: {obj:?}"),
            Err(e) => e,
        };
        assert_eq!(
            err.field.as_deref(),
            expectation(&text, "field"),
            "{file}: field of {err}"
        );
        let message =
            expectation(&text, "message").unwrap_or_else(|| panic!("{file}: no expect-message"));
        assert!(
            err.message.contains(message),
            "{file}: message {:?} lacks {message:?}",
            err.message
        );
        let kind = expectation(&text, "kind").unwrap_or("Invalid");
        assert_eq!(format!("{:?}", err.error_kind), kind, "{file}: {err}");
        if let Some(display) = expectation(&text, "display") {
            assert_eq!(err.to_string(), format!("document 1: {display}"), "{file}");
        }
        assert_eq!(err.document, Some(1), "{file}");
        // Whatever identity the object has is in the message.
        if let Some(field) = &err.field {
            assert!(err.to_string().contains(field.as_str()), "{file}: {err}");
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} invalid fixtures");
}

#[test]
fn error_display_names_object_namespace_and_version() {
    let text = read(&fixture_dir("invalid").join("missing-destination.yaml"));
    let err = decode_manifests(&text).remove(0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "document 1: TrafficTarget shop/web (access.smi-spec.io/v1alpha3): spec.destination: required field is missing"
    );
    assert_eq!(err.kind.as_deref(), Some("TrafficTarget"));
    assert_eq!(err.namespace.as_deref(), Some("shop"));
    assert_eq!(err.name.as_deref(), Some("web"));
    assert_eq!(
        err.api_version.as_deref(),
        Some("access.smi-spec.io/v1alpha3")
    );
}

#[test]
fn one_broken_document_does_not_hide_the_others() {
    let good = read(&fixture_dir("").join("consul-announcement-v1alpha1.yaml"));
    let text = format!("{good}\n---\nkind: [unclosed\n---\n# just a comment\n---\n{good}");
    let results = decode_manifests(&text);
    assert_eq!(results.len(), 5, "{results:?}");
    assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok() && results[4].is_ok());
    let err = results[2].as_ref().unwrap_err();
    assert_eq!(err.error_kind, DecodeErrorKind::Syntax);
    assert_eq!(err.document, Some(3));
    // Line numbers count from the top of the file, on one line.
    let line = good.lines().count() + 3;
    assert!(err.message.contains(&format!("line {line}")), "{err}");
    assert!(!err.message.contains('\n'), "{err}");
}

#[test]
fn empty_documents_and_lists() {
    assert!(decode_manifests("").is_empty());
    assert!(decode_manifests("---\n---\n# nothing\n...\n").is_empty());
    assert!(decode_manifests("~\n").is_empty());
    let list = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: specs.smi-spec.io/v1alpha4, kind: TCPRoute, metadata: {name: a}, spec: {}}
- {apiVersion: specs.smi-spec.io/v1alpha4, kind: UDPRoute, metadata: {name: b}, spec: {}}
"#;
    let kinds: Vec<SmiKind> = decode_manifests(list)
        .into_iter()
        .map(|r| r.unwrap().kind())
        .collect();
    assert_eq!(kinds, [SmiKind::TCPRoute, SmiKind::UDPRoute]);
}

#[test]
fn api_server_json_with_server_fields_decodes() {
    // What a watch event carries: server-populated metadata and no omitted namespace.
    let value = serde_json::json!({
        "apiVersion": "access.smi-spec.io/v1alpha3",
        "kind": "TrafficTarget",
        "metadata": {
            "name": "web", "namespace": "shop", "uid": "1234", "resourceVersion": "42", "generation": 3,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "access.smi-spec.io/v1alpha3"}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}
        },
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": "web"},
            "rules": [{"kind": "HTTPRouteGroup", "name": "routes", "matches": ["metrics"]}],
            "sources": [{"kind": "ServiceAccount", "name": "dashboard", "namespace": "monitoring"}]
        }
    });
    let SmiObject::TrafficTarget(tt) = decode_object(&value).unwrap() else {
        panic!()
    };
    assert_eq!(tt.meta.uid.as_deref(), Some("1234"));
    assert_eq!(tt.meta.resource_version.as_deref(), Some("42"));
    assert_eq!(tt.meta.generation, Some(3));
    assert_eq!(tt.meta.namespace, "shop");
}

#[test]
fn decode_object_rejects_non_objects_without_panicking() {
    for value in [
        serde_json::json!(null),
        serde_json::json!(3),
        serde_json::json!("x"),
        serde_json::json!([]),
    ] {
        let err = decode_object(&value).unwrap_err();
        assert!(err.message.contains("expected an object"), "{err}");
    }
    let err = decode_object(&serde_json::json!({"kind": "TrafficTarget"})).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("apiVersion"));
}
