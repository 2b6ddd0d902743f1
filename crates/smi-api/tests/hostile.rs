//! Hostile and broken input (issue 8): every bad object yields an error or diagnostic that
//! names the object and the field, nothing panics, nothing blows up memory or the stack, and a
//! bad object never changes what the good objects around it translate to.
//!
//! Static cases live in `fixtures/hostile/`; huge ones are generated here. What the decoder
//! accepts but must not grant (wildcards) is checked end to end through
//! `consul_smi_translate::translate`, where that rule lives.

// DecodeError is the crate's flat error struct (see its lib.rs).
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

use consul_smi_api::{
    DecodeError, DecodeErrorKind, SmiObject, decode_manifests, decode_object, encode_object,
};
use consul_smi_translate::{
    ConsulApi, DesiredState, Severity, TranslateOptions, Translation, codes, translate,
};
use serde_json::json;

fn hostile(file: &str) -> String {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hostile")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The one result of a one-document manifest.
fn decode_one(yaml: &str) -> Result<SmiObject, DecodeError> {
    let mut results = decode_manifests(yaml);
    assert_eq!(results.len(), 1, "one document: {results:?}");
    results.remove(0)
}

fn decode_err(yaml: &str) -> DecodeError {
    match decode_one(yaml) {
        Ok(object) => panic!("accepted: {object:?}"),
        Err(e) => e,
    }
}

/// The objects hostile ones are mixed into: `web` may call `api` over TCPRoute `api-tcp`.
const GOOD: &str = "
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: api-tcp, namespace: default}
spec: {}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: web-to-api, namespace: default}
spec:
  destination: {kind: ServiceAccount, name: api, namespace: default}
  rules: [{kind: TCPRoute, name: api-tcp}]
  sources: [{kind: ServiceAccount, name: web, namespace: default}]
";

fn good_objects() -> Vec<SmiObject> {
    decode_manifests(GOOD)
        .into_iter()
        .map(|r| r.expect("the good objects decode"))
        .collect()
}

fn modern() -> TranslateOptions {
    TranslateOptions {
        target: ConsulApi::Modern,
        ..TranslateOptions::default()
    }
}

fn with(extra: SmiObject) -> Translation {
    let mut objects = good_objects();
    objects.push(extra);
    translate(&objects, &modern())
}

fn service_names(state: &DesiredState) -> Vec<String> {
    state
        .intentions
        .keys()
        .flat_map(|k| [k.source.name.clone(), k.destination.name.clone()])
        .collect()
}

// ---- names --------------------------------------------------------------------------------

#[test]
fn object_names_that_are_not_dns_names_are_rejected_naming_the_field() {
    let e = decode_err(&hostile("name-not-dns.yaml"));
    assert_eq!(e.error_kind, DecodeErrorKind::Invalid);
    assert_eq!(e.kind.as_deref(), Some("TrafficTarget"));
    assert_eq!(e.name.as_deref(), Some("Web_Service"));
    assert_eq!(e.field.as_deref(), Some("metadata.name"));
    assert!(e.message.contains("'W' is not allowed"), "{e}");

    let e = decode_err(&hostile("namespace-not-dns.yaml"));
    assert_eq!(e.kind.as_deref(), Some("TCPRoute"));
    assert_eq!(e.namespace.as_deref(), Some("Team.Prod"));
    assert_eq!(e.field.as_deref(), Some("metadata.namespace"));

    for (name, problem) in [
        ("web*", "'*' is not allowed"),
        ("a/b", "'/' is not allowed"),
        ("-web", "must start and end"),
        ("web..api", "empty part between dots"),
        ("web api", "' ' is not allowed"),
        ("wéb", "'é' is not allowed"),
    ] {
        let e = decode_object(&json!({
            "apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "TCPRoute",
            "metadata": {"name": name, "namespace": "default"}, "spec": {}
        }))
        .expect_err(name);
        assert_eq!(e.field.as_deref(), Some("metadata.name"), "{name}: {e}");
        assert!(e.message.contains(problem), "{name}: {e}");
    }
    // Dotted names are valid custom resource names (RFC 1123 subdomains); namespaces are not.
    let dotted = json!({
        "apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "TCPRoute",
        "metadata": {"name": "api.v2", "namespace": "default"}, "spec": {}
    });
    decode_object(&dotted).expect("a dotted name is a valid subdomain");
    let long_namespace = json!({
        "apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "TCPRoute",
        "metadata": {"name": "api", "namespace": "n".repeat(64)}, "spec": {}
    });
    let e = decode_object(&long_namespace).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("metadata.namespace"));
    assert!(e.message.contains("longer than 63"), "{e}");
}

#[test]
fn wildcard_subjects_decode_but_grant_nothing() {
    // SMI has no wildcards and Kubernetes names cannot contain `*`; Consul reads `*` as every
    // service. Each case: (fixture, field of the offending name in that version's layout).
    for (file, field) in [
        ("partial-wildcard-source.yaml", "spec.sources[0].name"),
        ("star-source.yaml", "spec.sources[0].name"),
        ("star-destination.yaml", "destination.name"),
    ] {
        let object = decode_one(&hostile(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let object_ref = object.object_ref();
        let translation = with(object);
        let diagnostic = translation
            .diagnostics
            .iter()
            .find(|d| d.object == object_ref && d.code == codes::INVALID_SUBJECT_NAME)
            .unwrap_or_else(|| panic!("{file}: no diagnostic in {:#?}", translation.diagnostics));
        assert_eq!(diagnostic.severity, Severity::Error, "{file}");
        assert_eq!(diagnostic.field, field, "{file}");
        assert!(
            !service_names(&translation.state)
                .iter()
                .any(|n| n.contains('*')),
            "{file}: a wildcard reached Consul: {:#?}",
            translation.state.intentions
        );
        // The good objects' intentions are exactly what they are without the hostile one.
        assert_eq!(
            translation.state,
            translate(&good_objects(), &modern()).state,
            "{file}"
        );
    }
}

#[test]
fn unknown_kinds_are_named() {
    let e = decode_err(&hostile("unknown-kind.yaml"));
    assert_eq!(e.error_kind, DecodeErrorKind::UnknownVersion);
    assert_eq!(e.kind.as_deref(), Some("GRPCRoute"));
    assert_eq!(e.name.as_deref(), Some("grpc"));
    assert_eq!(e.field.as_deref(), Some("kind"));
    assert!(
        e.message.contains("HTTPRouteGroup, TCPRoute, UDPRoute"),
        "{e}"
    );
}

// ---- YAML itself --------------------------------------------------------------------------

#[test]
fn malformed_yaml_is_a_syntax_error_with_its_line() {
    let e = decode_err(&hostile("malformed.yaml"));
    assert_eq!(e.error_kind, DecodeErrorKind::Syntax);
    assert_eq!(e.document, Some(1));
    assert!(e.message.starts_with("invalid YAML: line 4"), "{e}");
}

#[test]
fn duplicate_keys_are_an_error_naming_the_key_and_the_object() {
    let e = decode_err(&hostile("duplicate-keys.yaml"));
    assert_eq!(e.error_kind, DecodeErrorKind::Syntax);
    assert_eq!(
        e.to_string(),
        "document 1: TrafficTarget default/twice (access.smi-spec.io/v1alpha3): invalid YAML: \
         line 9 column 3: duplicate mapping key: sources"
    );
    // Anywhere in the object, including metadata and flow mappings.
    let e = decode_err(
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\n\
         metadata: {name: a, namespace: default, name: b}\nspec: {}\n",
    );
    assert!(e.message.contains("duplicate mapping key: name"), "{e}");
    let e = decode_err(
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nkind: UDPRoute\n\
         metadata: {name: a}\nspec: {}\n",
    );
    assert!(e.message.contains("duplicate mapping key: kind"), "{e}");
    // One broken document does not hide its neighbours.
    let results = decode_manifests(&format!("{GOOD}---\n{}", hostile("duplicate-keys.yaml")));
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[1].is_ok());
    assert_eq!(results[2].as_ref().unwrap_err().document, Some(3));
}

#[test]
fn alias_bombs_fail_within_the_parser_budget() {
    let e = decode_err(&hostile("billion-laughs.yaml"));
    assert_eq!(e.error_kind, DecodeErrorKind::Syntax);
    assert!(e.message.contains("alias replay limit exceeded"), "{e}");

    // Ordinary alias use still works: one anchored subject reused by every source.
    let mut yaml = String::from(
        "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\n\
         metadata: {name: anchors, namespace: default}\nspec:\n\
         \x20 destination: &sa {kind: ServiceAccount, name: api, namespace: default}\n\
         \x20 rules: [{kind: TCPRoute, name: api-tcp}]\n  sources:\n",
    );
    // (The parser's default budget refuses 100 or more aliases of under ten anchors.)
    for _ in 0..50 {
        yaml.push_str("  - *sa\n");
    }
    let SmiObject::TrafficTarget(target) = decode_one(&yaml).expect("aliases are YAML") else {
        panic!()
    };
    assert_eq!(target.sources.len(), 50);
    assert_eq!(target.sources[49].name, "api");
}

#[test]
fn deep_nesting_fails_without_overflowing_the_stack() {
    for depth in [100, 10_000, 1_000_000] {
        let flow = format!(
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {{name: a}}\n\
             spec: {}{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let e = decode_err(&flow);
        assert_eq!(e.error_kind, DecodeErrorKind::Syntax, "flow {depth}: {e}");

        let mut block =
            String::from("apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nspec:\n");
        for level in 1..=depth.min(20_000) {
            block.push_str(&" ".repeat(level));
            block.push_str("k:\n");
        }
        let e = decode_err(&block);
        assert_eq!(e.error_kind, DecodeErrorKind::Syntax, "block {depth}: {e}");
        assert!(e.message.contains("budget breached"), "block {depth}: {e}");
    }
    // An unclosed flow sequence of a million openers.
    let e = decode_err(&format!("spec: {}", "[".repeat(1_000_000)));
    assert_eq!(e.error_kind, DecodeErrorKind::Syntax);
}

// ---- size ---------------------------------------------------------------------------------

/// A TrafficTarget with `rules` rule entries, all naming `api-tcp`, as YAML.
fn many_rules(rules: usize, bad_index: Option<usize>) -> String {
    let mut yaml = String::from(
        "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\n\
         metadata: {name: huge, namespace: default}\nspec:\n\
         \x20 destination: {kind: ServiceAccount, name: api, namespace: default}\n\
         \x20 sources: [{kind: ServiceAccount, name: web, namespace: default}]\n  rules:\n",
    );
    for i in 0..rules {
        let kind = if Some(i) == bad_index {
            "GRPCRoute"
        } else {
            "TCPRoute"
        };
        yaml.push_str(&format!("  - {{kind: {kind}, name: api-tcp}}\n"));
    }
    yaml
}

#[test]
fn ten_thousand_rules_decode_and_translate() {
    let object = decode_one(&many_rules(10_000, None)).expect("10k rules are valid");
    let SmiObject::TrafficTarget(target) = &object else {
        panic!("{object:?}")
    };
    assert_eq!(target.rules.len(), 10_000);
    // The same grant as one rule: web -> api, once.
    let translation = translate(&[good_objects()[0].clone(), object], &modern());
    assert_eq!(translation.state.intentions.len(), 1, "{translation:#?}");
    assert!(
        translation.diagnostics.is_empty(),
        "{:?}",
        translation.diagnostics
    );

    // A bad entry deep in the list is named by its index.
    let e = decode_err(&many_rules(10_000, Some(9_999)));
    assert_eq!(e.name.as_deref(), Some("huge"));
    assert_eq!(e.field.as_deref(), Some("spec.rules[9999].kind"), "{e}");
}

#[test]
fn megabyte_objects_are_decoded_or_rejected_by_field() {
    let megabyte = 1 << 20;
    // A 1 MB name is rejected by its field, and the message does not repeat the megabyte
    // more than once (the name is in the error's identity and message).
    let e = decode_object(&json!({
        "apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "TCPRoute",
        "metadata": {"name": "a".repeat(megabyte), "namespace": "default"}, "spec": {}
    }))
    .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("metadata.name"));
    assert!(
        e.message.contains("longer than 253"),
        "{}",
        &e.message[..200]
    );

    // A 1 MB object of otherwise valid content: 1 MB of HTTP matches decodes, and survives a
    // trip through its own version unchanged.
    let mut yaml = String::from(
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\n\
         metadata: {name: big, namespace: default}\nspec:\n  matches:\n",
    );
    let mut count = 0;
    while yaml.len() < megabyte {
        yaml.push_str(&format!(
            "  - {{name: m{count}, pathRegex: '/api/v1/{count}/.*', methods: [GET, POST]}}\n"
        ));
        count += 1;
    }
    let object = decode_one(&yaml).expect("a 1 MB HTTPRouteGroup is valid");
    let encoded = encode_object(&object, "specs.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(decode_object(&encoded).unwrap(), object);
    let SmiObject::HttpRouteGroup(group) = &object else {
        panic!()
    };
    assert_eq!(group.matches.len(), count);

    // A 1 MB path regex in a single string.
    let single = format!(
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\n\
         metadata: {{name: one-big, namespace: default}}\n\
         spec: {{matches: [{{name: m, pathRegex: '{}'}}]}}\n",
        "a".repeat(megabyte)
    );
    decode_one(&single).expect("one long string is still valid YAML and SMI");
}

/// Issue 24, finding 7: an object too large for one message of the watcher's stream wedged
/// the translator. Over the limit, an object is invalid like any other bad object, named with
/// the field that holds the bulk of it.
#[test]
fn objects_over_the_size_limit_are_rejected_naming_the_field() {
    let label = "x".repeat(20 << 20);
    let yaml = format!(
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\n\
         metadata: {{name: huge, namespace: default, labels: {{small: a, big: {label}}}}}\n\
         spec: {{}}\n"
    );
    let e = decode_err(&yaml);
    assert_eq!(e.error_kind, DecodeErrorKind::Invalid);
    assert_eq!(
        (e.kind.as_deref(), e.name.as_deref()),
        (Some("TCPRoute"), Some("huge"))
    );
    assert_eq!(e.field.as_deref(), Some("metadata.labels.big"), "{e}");
    assert!(e.message.contains("limit"), "{e}");
    assert!(
        e.to_string().len() < 1000,
        "the error does not quote the value"
    );

    // Many small parts (as the API server would send them; YAML's node budget stops this
    // many first): named by the list that holds them.
    let rules: Vec<_> = (0..60_000)
        .map(|_| json!({"kind": "TCPRoute", "name": "api-tcp"}))
        .collect();
    let e = decode_object(&json!({
        "apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
        "metadata": {"name": "many", "namespace": "default"},
        "spec": {"destination": {"kind": "ServiceAccount", "name": "api"}, "rules": rules}
    }))
    .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("spec.rules"), "{e}");

    // Just under the limit: still valid.
    let fits = consul_smi_api::MAX_OBJECT_BYTES - 1024;
    let yaml = format!(
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\n\
         metadata: {{name: fits, namespace: default, labels: {{big: {}}}}}\nspec: {{}}\n",
        "x".repeat(fits)
    );
    decode_one(&yaml).expect("an object under the limit decodes");
}

/// Garbage never panics and every document gets a result or is skipped as empty.
#[test]
fn arbitrary_bytes_never_panic() {
    let inputs = [
        "\u{0}\u{1}\u{2}".to_string(),
        "\u{feff}apiVersion: access.smi-spec.io/v1alpha3\n".to_string(),
        "---\n--- !!binary AAAA\n...\n".to_string(),
        "? [a, b]\n: c\n".to_string(),
        "apiVersion: !!int 3\nkind: !!map {}\n".to_string(),
        "&a [*a]".to_string(),
        "*undefined".to_string(),
        "kind: List\napiVersion: v1\nitems: 3\n".to_string(),
        "kind: List\napiVersion: v1\nitems: [[], 1, null, {kind: TrafficTarget}]\n".to_string(),
        "\t\tkey: value".to_string(),
        "a: 'unterminated".to_string(),
        "%YAML 9.9\n---\na: 1\n".to_string(),
        "- ".repeat(100_000),
    ];
    for input in inputs {
        for result in decode_manifests(&input) {
            if let Err(e) = result {
                assert!(!e.message.is_empty());
            }
        }
    }
}

/// A ServiceAccount or service name that is no Kubernetes name must never reach Consul: as a
/// config-entry name in a URL path (`/v1/config/service-intentions/{name}`), a destination
/// `x/../../acl/...` or `api?dc=other` would address another endpoint with the writer's token.
#[test]
fn subject_and_service_names_that_are_not_kubernetes_names_grant_nothing() {
    let object = decode_one(&hostile("subject-name-not-dns.yaml")).expect("decodes");
    let object_ref = object.object_ref();
    let translation = with(object);
    assert!(
        translation
            .diagnostics
            .iter()
            .any(|d| d.object == object_ref
                && d.code == codes::INVALID_SUBJECT_NAME
                && d.field == "spec.sources[0].name"),
        "{:#?}",
        translation.diagnostics
    );
    assert_eq!(
        translation.state,
        translate(&good_objects(), &modern()).state
    );

    for destination in ["api/../../acl/bootstrap", "api?dc=other", "API"] {
        let target = decode_object(&json!({
            "apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
            "metadata": {"name": "odd-destination", "namespace": "default"},
            "spec": {
                "destination": {"kind": "ServiceAccount", "name": destination, "namespace": "default"},
                "rules": [{"kind": "TCPRoute", "name": "api-tcp"}],
                "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": "default"}],
            }
        }))
        .unwrap();
        let translation = with(target);
        assert_eq!(
            translation.state,
            translate(&good_objects(), &modern()).state,
            "{destination}"
        );
    }
}
