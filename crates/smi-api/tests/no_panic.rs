//! Decoding never panics, whatever it is given.

use consul_smi_api::{convert_review, decode_manifests, decode_object, encode_object};
use proptest::prelude::*;
use serde_json::{Value, json};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[a-zA-Z0-9*./ -]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("ServiceAccount"),
            Just("TCPRoute"),
            Just("UDPRoute"),
            Just("HTTPRouteGroup"),
            Just("10m"),
            Just("-1"),
            Just("access.smi-spec.io/v1alpha1"),
            Just("split.smi-spec.io/v1alpha1"),
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let keys = prop_oneof![
            Just("spec".to_string()),
            Just("destination".to_string()),
            Just("sources".to_string()),
            Just("rules".to_string()),
            Just("specs".to_string()),
            Just("name".to_string()),
            Just("kind".to_string()),
            Just("matches".to_string()),
            Just("backends".to_string()),
            Just("weight".to_string()),
            Just("ports".to_string()),
            Just("headers".to_string()),
            Just("metadata".to_string()),
            "[a-z]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid-looking envelope around an arbitrary body, so decoding gets past apiVersion/kind.
fn arb_object() -> impl Strategy<Value = Value> {
    let types = prop_oneof![
        Just(("access.smi-spec.io/v1alpha1", "TrafficTarget")),
        Just(("access.smi-spec.io/v1alpha2", "TrafficTarget")),
        Just(("access.smi-spec.io/v1alpha3", "TrafficTarget")),
        Just(("specs.smi-spec.io/v1alpha2", "HTTPRouteGroup")),
        Just(("specs.smi-spec.io/v1alpha4", "HTTPRouteGroup")),
        Just(("specs.smi-spec.io/v1alpha4", "TCPRoute")),
        Just(("specs.smi-spec.io/v1alpha4", "UDPRoute")),
        Just(("split.smi-spec.io/v1alpha1", "TrafficSplit")),
        Just(("split.smi-spec.io/v1alpha4", "TrafficSplit")),
    ];
    (types, arb_json(), arb_json()).prop_map(|((api_version, kind), spec, top)| {
        let mut obj = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}, "spec": spec});
        if let Value::Object(extra) = top {
            for (k, v) in extra {
                obj[k] = v;
            }
        }
        obj
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn decode_object_never_panics(value in arb_json()) {
        let _ = decode_object(&value);
    }

    #[test]
    fn decoded_objects_encode_to_every_version_without_panicking(value in arb_object()) {
        if let Ok(hub) = decode_object(&value) {
            for version in consul_smi_api::served_versions(hub.kind()) {
                let api_version = format!("{}/{version}", hub.kind().group());
                if let Ok(json) = encode_object(&hub, &api_version) {
                    // What we write we can read back.
                    prop_assert!(decode_object(&json).is_ok(), "{json}");
                }
            }
        }
        let review = json!({"request": {"uid": "u", "desiredAPIVersion": "access.smi-spec.io/v1alpha1", "objects": [value]}});
        let response = convert_review(&review);
        prop_assert_eq!(&response["response"]["uid"], "u");
    }

    #[test]
    fn decode_manifests_never_panics(text in "(?s)[-a-z: \\[\\]{}\n\"'#&*!|>.0-9]{0,200}") {
        let _ = decode_manifests(&text);
    }
}

#[test]
fn hostile_yaml_is_an_error_not_a_crash() {
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let _ = decode_manifests(&deep);
    let bomb = "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d]\n";
    let _ = decode_manifests(bomb);
    let _ = decode_manifests("\u{0}\u{feff}---\n\t- :");
}
