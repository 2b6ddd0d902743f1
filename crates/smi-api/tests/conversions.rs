//! Every version -> hub -> every version, and the conversion webhook's ConversionReview.

use std::path::Path;

use consul_smi_api::access;
use consul_smi_api::{
    DESTINATION_PORT_ANNOTATION, DecodeErrorKind, SmiObject, WEIGHTS_IN_MILLIS_ANNOTATION,
    convert_review, decode_manifests, decode_object, encode_object, served_versions,
};
use kube::Resource;
use serde_json::{Value, json};

fn fixtures() -> Vec<(String, SmiObject)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid");
    let mut all = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/consul-announcement-v1alpha1.yaml"),
    );
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path).unwrap();
        for result in decode_manifests(&text) {
            let obj = result.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            all.push((path.file_name().unwrap().to_string_lossy().to_string(), obj));
        }
    }
    all
}

/// (fixture file, object name, target apiVersion, failing field) for what an older version cannot say.
// TCPRoute port matches are not refused: they travel in the consul-smi.io/port-match
// annotation, because the API server converts every stored object into every served version.
const NOT_EXPRESSIBLE: &[(&str, &str, &str, &str)] = &[];

#[test]
fn every_fixture_round_trips_through_every_served_version() {
    let mut round_trips = 0;
    let mut refusals = 0;
    for (file, hub) in fixtures() {
        let kind = hub.kind();
        for version in served_versions(kind) {
            let api_version = format!("{}/{version}", kind.group());
            let expected_failure = NOT_EXPRESSIBLE.iter().find(|(f, name, target, _)| {
                *f == file && *name == hub.meta().name && *target == api_version
            });
            match (encode_object(&hub, &api_version), expected_failure) {
                (Ok(json), None) => {
                    assert_eq!(json["apiVersion"], api_version.as_str());
                    assert_eq!(json["kind"], kind.as_str());
                    let mut back = decode_object(&json)
                        .unwrap_or_else(|e| panic!("{file} as {api_version}: {e}\n{json:#}"));
                    assert_eq!(back.meta().api_version, api_version);
                    back.meta_mut().api_version = hub.meta().api_version.clone();
                    assert_eq!(back, hub, "{file}: {} via {api_version}", hub.meta().name);
                    round_trips += 1;
                }
                (Err(e), Some((_, _, _, field))) => {
                    assert_eq!(e.error_kind, DecodeErrorKind::NotExpressible, "{e}");
                    assert_eq!(e.field.as_deref(), Some(*field), "{e}");
                    assert_eq!(e.api_version.as_deref(), Some(api_version.as_str()));
                    refusals += 1;
                }
                (Ok(json), Some(_)) => panic!("{file}: {api_version} should refuse {json:#}"),
                (Err(e), None) => panic!("{file}: {api_version}: {e}"),
            }
        }
    }
    assert_eq!(refusals, NOT_EXPRESSIBLE.len());
    assert!(round_trips > 40, "{round_trips}");
}

#[test]
fn version_specific_values_survive_newer_versions_via_annotations() {
    // access v1alpha1 destination.port has no v1alpha3 field.
    let tt = fixtures()
        .into_iter()
        .find(|(f, _)| f == "access-v1alpha1.yaml")
        .unwrap()
        .1;
    let v3 = encode_object(&tt, "access.smi-spec.io/v1alpha3").unwrap();
    assert_eq!(
        v3["metadata"]["annotations"][DESTINATION_PORT_ANNOTATION],
        "8080"
    );
    assert!(v3["spec"]["destination"].get("port").is_none());
    let SmiObject::TrafficTarget(back) = decode_object(&v3).unwrap() else {
        panic!()
    };
    assert_eq!(back.destination_port, Some(8080));

    // split v1alpha1 Quantity weights that are not whole units.
    let split = fixtures()
        .into_iter()
        .find(|(f, o)| f == "split-v1alpha1.yaml" && o.meta().name == "canary")
        .unwrap()
        .1;
    let v4 = encode_object(&split, "split.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(
        v4["metadata"]["annotations"][WEIGHTS_IN_MILLIS_ANNOTATION],
        "true"
    );
    assert_eq!(v4["spec"]["backends"][0]["weight"], 900);
    assert_eq!(v4["spec"]["backends"][1]["weight"], 100);
    let v1 = encode_object(&decode_object(&v4).unwrap(), "split.smi-spec.io/v1alpha1").unwrap();
    assert_eq!(v1["spec"]["backends"][0]["weight"], "900m");
    assert_eq!(v1["spec"]["backends"][1]["weight"], "100m");

    // Whole units need no annotation.
    let units = fixtures()
        .into_iter()
        .find(|(_, o)| o.meta().name == "whole-units")
        .unwrap()
        .1;
    let v2 = encode_object(&units, "split.smi-spec.io/v1alpha2").unwrap();
    assert!(v2["metadata"].get("annotations").is_none(), "{v2:#}");
    assert_eq!(v2["spec"]["backends"][1]["weight"], 3);
}

#[test]
fn v1alpha1_target_without_rules_cannot_be_stored_as_v1alpha3() {
    let value = json!({
        "apiVersion": "access.smi-spec.io/v1alpha1", "kind": "TrafficTarget", "metadata": {"name": "open"},
        "destination": {"kind": "ServiceAccount", "name": "web"},
        "sources": [{"kind": "ServiceAccount", "name": "dashboard"}]
    });
    let hub = decode_object(&value).unwrap();
    let err = encode_object(&hub, "access.smi-spec.io/v1alpha3").unwrap_err();
    assert_eq!(err.field.as_deref(), Some("spec.rules"));
    assert_eq!(err.error_kind, DecodeErrorKind::NotExpressible);
}

#[test]
fn encode_rejects_foreign_versions() {
    let (_, tt) = fixtures()
        .into_iter()
        .find(|(f, _)| f == "access-v1alpha3.yaml")
        .unwrap();
    for bad in [
        "access.smi-spec.io/v1alpha4",
        "split.smi-spec.io/v1alpha3",
        "v1",
        "",
    ] {
        let err = encode_object(&tt, bad).unwrap_err();
        assert_eq!(
            err.error_kind,
            DecodeErrorKind::UnknownVersion,
            "{bad}: {err}"
        );
    }
}

#[test]
fn top_level_versions_are_kube_resources_with_fields_at_the_root() {
    assert_eq!(
        access::v1alpha1::TrafficTarget::api_version(&()),
        "access.smi-spec.io/v1alpha1"
    );
    assert_eq!(
        access::v1alpha1::TrafficTarget::plural(&()),
        "traffictargets"
    );
    // What a kube client deserializes from the API server.
    let announcement = json!({
        "kind": "TrafficTarget", "apiVersion": "access.smi-spec.io/v1alpha1",
        "metadata": {"name": "counting-traffic-target", "namespace": "default"},
        "destination": {"kind": "ServiceAccount", "name": "counting", "namespace": "default"},
        "sources": [{"kind": "ServiceAccount", "name": "dashboard", "namespace": "default"}],
        "specs": [{"kind": "TCPRoute", "name": "counting-tcp-route"}]
    });
    let typed: access::v1alpha1::TrafficTarget =
        serde_json::from_value(announcement.clone()).unwrap();
    assert_eq!(typed.spec.destination.name, "counting");
    assert_eq!(typed.spec.specs[0].kind, access::LegacyRuleKind::TCPRoute);
    let written = serde_json::to_value(&typed).unwrap();
    assert!(written.get("spec").is_none(), "{written:#}");
    assert_eq!(written, announcement);

    let http: consul_smi_api::specs::v1alpha2::HTTPRouteGroup = serde_json::from_value(json!({
        "apiVersion": "specs.smi-spec.io/v1alpha2", "kind": "HTTPRouteGroup", "metadata": {"name": "r"},
        "matches": [{"name": "m", "headers": {"x": "1"}}]
    }))
    .unwrap();
    assert_eq!(http.spec.matches[0].headers["x"], "1");
}

fn review(desired: &str, objects: Vec<Value>) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "ConversionReview",
        "request": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "desiredAPIVersion": desired, "objects": objects}
    })
}

fn stored_announcement() -> Value {
    json!({
        "kind": "TrafficTarget", "apiVersion": "access.smi-spec.io/v1alpha1",
        "metadata": {
            "name": "counting-traffic-target", "namespace": "default", "uid": "u-1", "resourceVersion": "7",
            "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z",
            "annotations": {"team": "counting"},
            "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "access.smi-spec.io/v1alpha1"}]
        },
        "destination": {"kind": "ServiceAccount", "name": "counting", "namespace": "default", "port": 9001},
        "sources": [{"kind": "ServiceAccount", "name": "dashboard", "namespace": "default"}],
        "specs": [{"kind": "TCPRoute", "name": "counting-tcp-route"}]
    })
}

#[test]
fn convert_review_v1alpha1_to_v1alpha3_and_back() {
    let original = stored_announcement();
    let response = convert_review(&review(
        "access.smi-spec.io/v1alpha3",
        vec![original.clone()],
    ));
    assert_eq!(response["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(response["kind"], "ConversionReview");
    assert_eq!(
        response["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(
        response["response"]["result"]["status"], "Success",
        "{response:#}"
    );
    let converted = &response["response"]["convertedObjects"][0];
    assert_eq!(converted["apiVersion"], "access.smi-spec.io/v1alpha3");
    assert_eq!(converted["kind"], "TrafficTarget");
    assert_eq!(
        converted["spec"]["destination"],
        json!({"kind": "ServiceAccount", "name": "counting", "namespace": "default"})
    );
    assert_eq!(
        converted["spec"]["rules"],
        json!([{"kind": "TCPRoute", "name": "counting-tcp-route"}])
    );
    assert!(converted.get("destination").is_none());
    // Metadata is untouched except the conversion's own annotation.
    let mut expected_meta = original["metadata"].clone();
    expected_meta["annotations"][DESTINATION_PORT_ANNOTATION] = json!("9001");
    assert_eq!(converted["metadata"], expected_meta);

    let back = convert_review(&review(
        "access.smi-spec.io/v1alpha1",
        vec![converted.clone()],
    ));
    assert_eq!(back["response"]["result"]["status"], "Success", "{back:#}");
    assert_eq!(
        back["response"]["convertedObjects"][0], original,
        "lossless round trip"
    );
}

#[test]
fn convert_review_handles_several_objects_and_splits() {
    let split_v1 = json!({
        "apiVersion": "split.smi-spec.io/v1alpha1", "kind": "TrafficSplit", "metadata": {"name": "canary", "namespace": "default"},
        "spec": {"service": "website", "backends": [{"service": "v1", "weight": "900m"}, {"service": "v2", "weight": "100m"}]}
    });
    let split_v4 = json!({
        "apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit", "metadata": {"name": "other"},
        "spec": {"service": "api", "backends": [{"service": "a", "weight": 1}]}
    });
    let response = convert_review(&review(
        "split.smi-spec.io/v1alpha4",
        vec![split_v1.clone(), split_v4.clone()],
    ));
    assert_eq!(
        response["response"]["result"]["status"], "Success",
        "{response:#}"
    );
    let converted = response["response"]["convertedObjects"].as_array().unwrap();
    assert_eq!(converted.len(), 2);
    assert_eq!(converted[0]["spec"]["backends"][0]["weight"], 900);
    assert_eq!(
        converted[1], split_v4,
        "already in the desired version: unchanged"
    );
    let back = convert_review(&review(
        "split.smi-spec.io/v1alpha1",
        vec![converted[0].clone()],
    ));
    assert_eq!(back["response"]["convertedObjects"][0], split_v1);
}

#[test]
fn rules_an_old_version_cannot_reference_travel_in_an_annotation() {
    // The API server converts every stored object into every served version, and retries a
    // failed conversion forever: a UDPRoute rule read through v1alpha1 must not fail.
    let v3 = json!({
        "apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget", "metadata": {"name": "dns", "namespace": "net"},
        "spec": {"destination": {"kind": "ServiceAccount", "name": "coredns"},
                 "sources": [{"kind": "ServiceAccount", "name": "app"}],
                 "rules": [{"kind": "TCPRoute", "name": "tcp"}, {"kind": "UDPRoute", "name": "dns"}]}
    });
    let response = convert_review(&review("access.smi-spec.io/v1alpha1", vec![v3.clone()]));
    assert_eq!(
        response["response"]["result"]["status"], "Success",
        "{response:#}"
    );
    let v1 = &response["response"]["convertedObjects"][0];
    assert_eq!(
        v1["specs"],
        json!([{"kind": "TCPRoute", "name": "tcp"}]),
        "{v1:#}"
    );
    assert!(
        v1["metadata"]["annotations"]["consul-smi.io/unexpressed-rules"].is_string(),
        "{v1:#}"
    );
    let back = convert_review(&review("access.smi-spec.io/v1alpha3", vec![v1.clone()]));
    assert_eq!(
        back["response"]["convertedObjects"][0]["spec"], v3["spec"],
        "{back:#}"
    );
}

#[test]
fn convert_review_failures_name_object_and_field() {
    let v3 = json!({
        "apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget", "metadata": {"name": "dns", "namespace": "net"},
        "spec": {"destination": {"kind": "ServiceAccount", "name": "coredns"},
                 "sources": [{"kind": "ServiceAccount", "name": "app"}],
                 "rules": []}
    });
    let response = convert_review(&review("access.smi-spec.io/v1alpha1", vec![v3]));
    let result = &response["response"]["result"];
    assert_eq!(result["status"], "Failure");
    let message = result["message"].as_str().unwrap();
    assert!(message.contains("TrafficTarget net/dns"), "{message}");
    assert!(message.contains("spec.rules"), "{message}");
    assert_eq!(
        response["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(response["response"]["convertedObjects"], json!([]));

    for bad in [
        json!({}),
        json!({"request": {}}),
        json!({"request": {"uid": "x"}}),
        json!(null),
    ] {
        let response = convert_review(&bad);
        assert_eq!(response["response"]["result"]["status"], "Failure", "{bad}");
    }
    let response = convert_review(&review(
        "access.smi-spec.io/v9",
        vec![stored_announcement()],
    ));
    assert_eq!(response["response"]["result"]["status"], "Failure");
}
