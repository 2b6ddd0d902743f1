//! CRD structure: every version present, one storage version, structural schemas, the
//! webhook wiring, printer columns; JSON Schemas cover what the fixtures use.

use std::collections::BTreeSet;
use std::path::Path;

use consul_smi_api::crd::{CrdConversion, WebhookTarget, crd_manifest, json_schema};
use consul_smi_api::{SmiKind, crds, served_versions, storage_version};
use serde_json::Value;

const CA: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn test_conversion() -> CrdConversion {
    CrdConversion::Webhook {
        client_config: WebhookTarget::Url("https://127.0.0.1:9443/convert".into()),
        ca_bundle_pem: Some(CA.to_vec()),
    }
}

#[test]
fn one_crd_per_kind_with_every_version_and_one_storage_version() {
    let all = crds(&test_conversion());
    assert_eq!(all.len(), SmiKind::ALL.len());
    for (crd, kind) in all.iter().zip(SmiKind::ALL) {
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{}.{}", kind.plural(), kind.group()).as_str())
        );
        assert_eq!(crd.spec.group, kind.group());
        assert_eq!(crd.spec.names.kind, kind.as_str());
        assert_eq!(crd.spec.scope, "Namespaced");
        let names: BTreeSet<&str> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
        let expected: BTreeSet<&str> = served_versions(kind).iter().copied().collect();
        assert_eq!(names, expected, "{kind}");
        assert_eq!(
            crd.spec.versions.len(),
            expected.len(),
            "{kind}: no duplicate versions"
        );
        let stored: Vec<&str> = crd
            .spec
            .versions
            .iter()
            .filter(|v| v.storage)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(stored, [storage_version(kind)], "{kind}");
        assert!(
            crd.spec.versions.iter().all(|v| v.served),
            "{kind}: all versions served"
        );
        assert_eq!(
            crd.spec.versions[0].name,
            storage_version(kind),
            "{kind}: newest first"
        );
    }
}

#[test]
fn storage_versions_are_the_final_smi_releases() {
    assert_eq!(storage_version(SmiKind::TrafficTarget), "v1alpha3");
    assert_eq!(storage_version(SmiKind::HTTPRouteGroup), "v1alpha4");
    assert_eq!(storage_version(SmiKind::TCPRoute), "v1alpha4");
    assert_eq!(storage_version(SmiKind::UDPRoute), "v1alpha4");
    assert_eq!(storage_version(SmiKind::TrafficSplit), "v1alpha4");
    assert_eq!(
        served_versions(SmiKind::TrafficTarget),
        ["v1alpha1", "v1alpha2", "v1alpha3"]
    );
}

#[test]
fn short_names_match_the_published_crds() {
    let short: Vec<Vec<String>> = crds(&test_conversion())
        .into_iter()
        .map(|c| c.spec.names.short_names.unwrap_or_default())
        .collect();
    assert_eq!(
        short,
        [vec!["tt"], vec!["htr"], vec!["tr"], vec!["ur"], vec!["ts"]]
    );
}

#[test]
fn webhook_conversion_wiring() {
    for crd in crds(&test_conversion()) {
        let conversion = crd.spec.conversion.as_ref().unwrap();
        if crd.spec.versions.len() == 1 {
            assert_eq!(conversion.strategy, "None", "{:?}", crd.metadata.name);
            continue;
        }
        assert_eq!(conversion.strategy, "Webhook");
        let webhook = conversion.webhook.as_ref().unwrap();
        assert_eq!(webhook.conversion_review_versions, ["v1"]);
        let client = webhook.client_config.as_ref().unwrap();
        assert_eq!(
            client.url.as_deref(),
            Some("https://127.0.0.1:9443/convert")
        );
        assert_eq!(client.ca_bundle.as_ref().unwrap().0, CA);
        assert!(client.service.is_none());
    }

    for crd in crds(&CrdConversion::deployed()) {
        if crd.spec.versions.len() == 1 {
            continue;
        }
        let annotations = crd.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            annotations["cert-manager.io/inject-ca-from"],
            "consul-smi/consul-smi-webhook"
        );
        let client = crd
            .spec
            .conversion
            .unwrap()
            .webhook
            .unwrap()
            .client_config
            .unwrap();
        let service = client.service.unwrap();
        assert_eq!(
            (
                service.namespace.as_str(),
                service.name.as_str(),
                service.path.as_deref(),
                service.port
            ),
            (
                "consul-smi",
                "consul-smi-watcher",
                Some("/convert"),
                Some(9443)
            )
        );
        assert!(client.ca_bundle.is_none(), "cert-manager injects it");
    }

    for crd in crds(&CrdConversion::StorageVersionOnly) {
        for v in &crd.spec.versions {
            assert_eq!(v.served, v.storage, "{:?} {}", crd.metadata.name, v.name);
        }
        assert_eq!(crd.spec.conversion.unwrap().strategy, "None");
    }
}

#[test]
fn printer_columns_show_what_users_look_for() {
    let columns = |kind: SmiKind, version: &str| -> Vec<(String, String)> {
        let crd = consul_smi_api::crd::crd(kind, &test_conversion());
        let v = crd
            .spec
            .versions
            .into_iter()
            .find(|v| v.name == version)
            .unwrap();
        v.additional_printer_columns
            .unwrap()
            .into_iter()
            .map(|c| (c.name, c.json_path))
            .collect()
    };
    let tt3 = columns(SmiKind::TrafficTarget, "v1alpha3");
    assert!(
        tt3.contains(&("Destination".into(), ".spec.destination.name".into())),
        "{tt3:?}"
    );
    assert!(
        tt3.contains(&("Sources".into(), ".spec.sources".into())),
        "{tt3:?}"
    );
    assert!(
        tt3.contains(&("Age".into(), ".metadata.creationTimestamp".into())),
        "{tt3:?}"
    );
    let tt1 = columns(SmiKind::TrafficTarget, "v1alpha1");
    assert!(
        tt1.contains(&("Destination".into(), ".destination.name".into())),
        "v1alpha1 is top level: {tt1:?}"
    );
    assert!(tt1.contains(&("Rules".into(), ".specs".into())), "{tt1:?}");
    let ts = columns(SmiKind::TrafficSplit, "v1alpha4");
    assert!(
        ts.contains(&("Service".into(), ".spec.service".into())),
        "{ts:?}"
    );
    assert!(
        ts.contains(&("Backends".into(), ".spec.backends".into())),
        "{ts:?}"
    );
    let htr = columns(SmiKind::HTTPRouteGroup, "v1alpha2");
    assert!(
        htr.contains(&("Matches".into(), ".matches".into())),
        "{htr:?}"
    );
}

/// Kubernetes' structural-schema rules, as far as our schemas use features at all.
fn assert_structural(node: &Value, path: &str) {
    let obj = node
        .as_object()
        .unwrap_or_else(|| panic!("{path}: schema is not an object"));
    for forbidden in [
        "$ref",
        "definitions",
        "$defs",
        "oneOf",
        "allOf",
        "not",
        "nullable",
        "default",
        "$schema",
    ] {
        assert!(!obj.contains_key(forbidden), "{path}: has {forbidden}");
    }
    assert_ne!(
        obj.get("additionalProperties"),
        Some(&Value::Bool(false)),
        "{path}: additionalProperties: false"
    );
    assert!(
        !(obj.contains_key("properties") && obj.contains_key("additionalProperties")),
        "{path}: properties and additionalProperties are mutually exclusive"
    );
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if int_or_string {
        assert!(
            !obj.contains_key("type"),
            "{path}: int-or-string has no type"
        );
        if let Some(any_of) = obj.get("anyOf") {
            assert_eq!(
                any_of,
                &serde_json::json!([{"type": "integer"}, {"type": "string"}]),
                "{path}"
            );
        }
        return;
    }
    if obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        // Only HTTP headers (map or list of maps) are left to the decoder.
        assert!(path.ends_with(".headers"), "{path}: untyped node");
        assert!(
            !obj.contains_key("type") && !obj.contains_key("anyOf"),
            "{path}"
        );
        return;
    }
    assert!(
        !obj.contains_key("anyOf"),
        "{path}: anyOf outside int-or-string"
    );
    let ty = obj
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{path}: no type"));
    if let Some(format) = obj.get("format").and_then(Value::as_str) {
        assert!(
            [
                "int32",
                "int64",
                "float",
                "double",
                "byte",
                "date",
                "date-time"
            ]
            .contains(&format),
            "{path}: format {format}"
        );
    }
    match ty {
        "object" => {
            if let Some(props) = obj.get("properties").and_then(Value::as_object) {
                for (name, child) in props {
                    assert_structural(child, &format!("{path}.{name}"));
                }
                for req in obj
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    assert!(
                        props.contains_key(req.as_str().unwrap()),
                        "{path}: required {req} not a property"
                    );
                }
            }
            if let Some(extra) = obj.get("additionalProperties") {
                assert_structural(extra, &format!("{path}.*"));
            }
        }
        "array" => assert_structural(
            obj.get("items")
                .unwrap_or_else(|| panic!("{path}: array without items")),
            &format!("{path}[]"),
        ),
        "string" | "integer" | "number" | "boolean" => {}
        other => panic!("{path}: unknown type {other}"),
    }
}

#[test]
fn every_schema_is_structural() {
    for crd in crds(&test_conversion()) {
        // Walk the manifest form, exactly what is applied.
        let manifest = crd_manifest(&crd);
        for version in manifest["spec"]["versions"].as_array().unwrap() {
            let schema = &version["schema"]["openAPIV3Schema"];
            let path = format!(
                "{}/{}",
                crd.metadata.name.as_deref().unwrap(),
                version["name"]
            );
            assert_eq!(schema["type"], "object", "{path}");
            if let Some(props) = schema["properties"].as_object() {
                assert!(
                    !props.contains_key("metadata") && !props.contains_key("apiVersion"),
                    "{path}: server-defined"
                );
            }
            assert_structural(schema, &path);
        }
    }
}

#[test]
fn manifest_numbers_are_integers() {
    let text = serde_json::to_string(
        &crds(&test_conversion())
            .iter()
            .map(crd_manifest)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(text.contains("\"maximum\":65535"), "port bounds present");
    assert!(
        !text.contains(".0,") && !text.contains(".0}"),
        "no float-looking integers"
    );
}

/// Every key a fixture uses is declared by its JSON Schema (which rejects unknown keys).
fn assert_declared(value: &Value, schema: &Value, path: &str) -> Result<(), String> {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for (key, child) in map {
                let child_schema = props
                    .and_then(|p| p.get(key))
                    .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()));
                if child_schema.is_some_and(|s| s.get("anyOf").is_some()) {
                    continue; // a union (headers): both branches are plain maps of strings
                }
                match child_schema {
                    Some(s) => assert_declared(child, s, &format!("{path}.{key}"))?,
                    None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                        return Err(format!("{path}.{key} is not declared"));
                    }
                    None => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    assert_declared(item, item_schema, &format!("{path}[{i}]"))?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("\n---\n")
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn json_schemas_declare_every_field_the_fixtures_use() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        for doc in documents(&entry.unwrap().path()) {
            let kind = SmiKind::from_kind(doc["kind"].as_str().unwrap()).unwrap();
            let version = doc["apiVersion"]
                .as_str()
                .unwrap()
                .split('/')
                .nth(1)
                .unwrap();
            let schema = json_schema(kind, version).unwrap();
            assert_eq!(
                schema["properties"]["apiVersion"]["const"],
                doc["apiVersion"]
            );
            assert_eq!(schema["properties"]["kind"]["const"], doc["kind"]);
            assert_declared(&doc, &schema, "").unwrap_or_else(|e| panic!("{kind} {version}: {e}"));
            checked += 1;
        }
    }
    assert!(checked >= 16);

    let typo = documents(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/invalid/unknown-field-typo.yaml"),
    );
    let schema = json_schema(SmiKind::HTTPRouteGroup, "v1alpha4").unwrap();
    assert_eq!(
        assert_declared(&typo[0], &schema, ""),
        Err(".spec.matches[0].pathregex is not declared".into())
    );
    assert!(json_schema(SmiKind::UDPRoute, "v1alpha1").is_none());
}

/// The committed generated files match the code (the same check as `cargo xtask gen-crds
/// --check`, which prints the diff; run that command to regenerate).
#[test]
fn committed_generated_files_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let files = consul_smi_api::crd::generated_files().unwrap();
    assert_eq!(files.len(), 5 + 16 + 1);
    let stale: Vec<&String> = files
        .iter()
        .filter(|(path, wanted)| {
            std::fs::read_to_string(root.join(path)).ok().as_ref() != Some(*wanted)
        })
        .map(|(path, _)| path)
        .collect();
    assert!(
        stale.is_empty(),
        "stale generated files {stale:?}: run `cargo xtask gen-crds`"
    );
}
