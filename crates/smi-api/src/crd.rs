//! The CustomResourceDefinitions: one per kind, serving every version, converted by webhook.
//!
//! Why a webhook: v1alpha1 TrafficTarget and v1alpha1/v1alpha2 HTTPRouteGroup keep their
//! fields at the top level while later versions nest them under `spec`, and access v1alpha3
//! moved `destination.port` out. The API server's `None` conversion only rewrites `apiVersion`,
//! so it would hand v1alpha3 readers a v1alpha1 shape. smi-sdk-go answers this by not serving
//! old versions; clusters still carrying the original Consul announcement's v1alpha1 objects
//! need them served, so smi-watcher serves `/convert` and every conversion goes via the hub.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceConversion, CustomResourceDefinition,
    JSONSchemaProps, ServiceReference, WebhookClientConfig, WebhookConversion,
};
use serde_json::{Value, json};

use crate::common::Versioned;
use crate::decode::{VersionVisitor, served_versions, storage_version, visit_version};
use crate::hub::SmiKind;

/// Where the API server sends ConversionReviews.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookTarget {
    /// A URL (tests, out-of-cluster webhooks); must be `https://`.
    Url(String),
    /// An in-cluster Service.
    Service {
        namespace: String,
        name: String,
        path: String,
        port: i32,
    },
}

/// How the CRDs convert between versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrdConversion {
    /// Serve every version; convert through the webhook, trusting `ca_bundle_pem` (or the
    /// system roots when `None`).
    Webhook {
        client_config: WebhookTarget,
        ca_bundle_pem: Option<Vec<u8>>,
    },
    /// Serve every version through the webhook; cert-manager's CA injector fills the caBundle
    /// from the Certificate named `inject_ca_from` (`namespace/name`).
    CertManagerWebhook {
        client_config: WebhookTarget,
        inject_ca_from: String,
    },
    /// Serve only the storage version (what smi-sdk-go's CRDs do); no webhook needed.
    StorageVersionOnly,
}

impl CrdConversion {
    /// The webhook as deployed by `deploy/`: smi-watcher's `/convert` behind Service
    /// `consul-smi/consul-smi-watcher:9443`, CA injected by cert-manager.
    pub fn deployed() -> CrdConversion {
        CrdConversion::CertManagerWebhook {
            client_config: WebhookTarget::Service {
                namespace: "consul-smi".to_string(),
                name: "consul-smi-watcher".to_string(),
                path: "/convert".to_string(),
                port: 9443,
            },
            inject_ca_from: "consul-smi/consul-smi-webhook".to_string(),
        }
    }
}

/// All CRDs, in [`SmiKind::ALL`] order.
pub fn crds(conversion: &CrdConversion) -> Vec<CustomResourceDefinition> {
    SmiKind::ALL
        .into_iter()
        .map(|kind| crd(kind, conversion))
        .collect()
}

struct CrdVisitor;

impl VersionVisitor for CrdVisitor {
    type Out = CustomResourceDefinition;
    fn visit<V: Versioned>(self) -> CustomResourceDefinition {
        V::crd()
    }
}

/// The CRD of one kind with all its versions, newest first, the newest stored.
pub fn crd(kind: SmiKind, conversion: &CrdConversion) -> CustomResourceDefinition {
    let storage = storage_version(kind);
    let mut versions = Vec::new();
    let mut crd = None;
    for version in served_versions(kind).iter().rev() {
        let Some(one) = visit_version(kind, version, CrdVisitor) else {
            continue;
        };
        versions.extend(one.spec.versions.iter().cloned());
        crd.get_or_insert(one);
    }
    let mut crd = crd.unwrap_or_default();
    crd.spec.names.list_kind = Some(format!("{kind}List"));
    crd.spec.names.categories = Some(vec!["smi".to_string()]);
    for version in &mut versions {
        version.storage = version.name == storage;
        version.served =
            version.storage || !matches!(conversion, CrdConversion::StorageVersionOnly);
        version.additional_printer_columns = Some(printer_columns(kind, &version.name));
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            *schema = structural_schema(kind, &version.name, schema);
        }
    }
    crd.spec.versions = versions;
    crd.spec.conversion = Some(conversion_spec(kind, conversion));
    if let CrdConversion::CertManagerWebhook { inject_ca_from, .. } = conversion
        && crd.spec.versions.len() > 1
    {
        crd.metadata.annotations = Some(BTreeMap::from([(
            "cert-manager.io/inject-ca-from".to_string(),
            inject_ca_from.clone(),
        )]));
    }
    crd.metadata.labels = Some(BTreeMap::from([(
        "app.kubernetes.io/part-of".to_string(),
        "consul-smi".to_string(),
    )]));
    crd
}

/// A CRD as the JSON/YAML document to apply: integral numbers written as integers
/// (`JSONSchemaProps` keeps bounds as floats, which would print as `65535.0`).
pub fn crd_manifest(crd: &CustomResourceDefinition) -> Value {
    let mut value = serde_json::to_value(crd).unwrap_or_default();
    integral_numbers(&mut value);
    value
}

fn integral_numbers(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() < 9.0e15
            {
                *value = json!(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        Value::Object(map) => map.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

fn conversion_spec(kind: SmiKind, conversion: &CrdConversion) -> CustomResourceConversion {
    let none = CustomResourceConversion {
        strategy: "None".to_string(),
        webhook: None,
    };
    // A single version (UDPRoute) never converts; not depending on the webhook keeps it usable
    // while smi-watcher is down.
    if served_versions(kind).len() < 2 {
        return none;
    }
    let (target, ca_bundle) = match conversion {
        CrdConversion::StorageVersionOnly => return none,
        CrdConversion::Webhook {
            client_config,
            ca_bundle_pem,
        } => (client_config, ca_bundle_pem.clone()),
        CrdConversion::CertManagerWebhook { client_config, .. } => (client_config, None),
    };
    let client_config = match target {
        WebhookTarget::Url(url) => WebhookClientConfig {
            url: Some(url.clone()),
            ca_bundle: ca_bundle.map(ByteString),
            service: None,
        },
        WebhookTarget::Service {
            namespace,
            name,
            path,
            port,
        } => WebhookClientConfig {
            service: Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(path.clone()),
                port: Some(*port),
            }),
            ca_bundle: ca_bundle.map(ByteString),
            url: None,
        },
    };
    CustomResourceConversion {
        strategy: "Webhook".to_string(),
        webhook: Some(WebhookConversion {
            client_config: Some(client_config),
            conversion_review_versions: vec!["v1".to_string()],
        }),
    }
}

fn column(
    name: &str,
    json_path: &str,
    priority: i32,
    description: &str,
) -> CustomResourceColumnDefinition {
    CustomResourceColumnDefinition {
        name: name.to_string(),
        type_: if json_path == ".metadata.creationTimestamp" {
            "date"
        } else {
            "string"
        }
        .to_string(),
        json_path: json_path.to_string(),
        description: Some(description.to_string()),
        format: None,
        priority: Some(priority).filter(|p| *p > 0),
    }
}

/// Printer columns. The API server prints only the first value a JSON path yields, so list
/// columns print the whole list (`.spec.sources`), not `[*].name` (which would show one
/// source and hide the rest); the longer ones only in `-o wide` (priority 1).
fn printer_columns(kind: SmiKind, version: &str) -> Vec<CustomResourceColumnDefinition> {
    let top_level = matches!(
        (kind, version),
        (SmiKind::TrafficTarget, "v1alpha1") | (SmiKind::HTTPRouteGroup, "v1alpha1" | "v1alpha2")
    );
    let at = |path: &str| {
        if top_level {
            format!(".{path}")
        } else {
            format!(".spec.{path}")
        }
    };
    let mut columns = match kind {
        SmiKind::TrafficTarget => {
            let rules = if version == "v1alpha1" {
                "specs"
            } else {
                "rules"
            };
            vec![
                column(
                    "Destination",
                    &at("destination.name"),
                    0,
                    "Destination ServiceAccount.",
                ),
                column("Sources", &at("sources"), 0, "Source ServiceAccounts."),
                column("Rules", &at(rules), 1, "Routes the sources may use."),
            ]
        }
        SmiKind::HTTPRouteGroup => vec![column("Matches", &at("matches"), 1, "HTTP matches.")],
        SmiKind::TCPRoute | SmiKind::UDPRoute if version == "v1alpha4" => {
            vec![column(
                "Ports",
                ".spec.matches.ports",
                0,
                "Matched ports; empty means all.",
            )]
        }
        SmiKind::TCPRoute | SmiKind::UDPRoute => Vec::new(),
        SmiKind::TrafficSplit => {
            let mut split = vec![
                column(
                    "Service",
                    ".spec.service",
                    0,
                    "The apex service of this split.",
                ),
                column(
                    "Backends",
                    ".spec.backends",
                    0,
                    "Backend services and weights.",
                ),
            ];
            if !matches!(version, "v1alpha1" | "v1alpha2") {
                split.push(column(
                    "Matches",
                    ".spec.matches",
                    1,
                    "HTTPRouteGroups this split applies to.",
                ));
            }
            split
        }
    };
    columns.push(column(
        "Age",
        ".metadata.creationTimestamp",
        0,
        "Time since creation.",
    ));
    columns
}

fn kind_description(kind: SmiKind) -> &'static str {
    match kind {
        SmiKind::TrafficTarget => {
            "TrafficTarget allows pods running as the source ServiceAccounts to reach pods of the destination ServiceAccount on the referenced routes (SMI access)."
        }
        SmiKind::HTTPRouteGroup => {
            "HTTPRouteGroup names HTTP matches (methods, path regex, headers) for TrafficTarget rules and TrafficSplit matches (SMI specs)."
        }
        SmiKind::TCPRoute => {
            "TCPRoute describes TCP traffic, optionally restricted to ports, for TrafficTarget rules (SMI specs)."
        }
        SmiKind::UDPRoute => {
            "UDPRoute describes UDP traffic, optionally restricted to ports, for TrafficTarget rules (SMI specs)."
        }
        SmiKind::TrafficSplit => {
            "TrafficSplit splits traffic for an apex service between weighted backend services (SMI split)."
        }
    }
}

/// Turns the derived schema into what the API server accepts as structural, and what reads
/// well: no `additionalProperties: false` next to `properties` (forbidden in CRDs; pruning
/// does that job), formats the API server knows, a description per kind.
fn structural_schema(kind: SmiKind, version: &str, schema: &JSONSchemaProps) -> JSONSchemaProps {
    let mut value = serde_json::to_value(schema).unwrap_or_default();
    clean_crd_node(&mut value);
    if let Some(root) = value.as_object_mut() {
        root.insert(
            "description".to_string(),
            json!(format!(
                "{} {}",
                kind_description(kind),
                version_note(kind, version)
            )),
        );
        root.remove("title");
        // The derive marks `spec` required; route kinds may omit it (all fields optional).
        if matches!(kind, SmiKind::TCPRoute | SmiKind::UDPRoute)
            && let Some(required) = root.get_mut("required").and_then(Value::as_array_mut)
        {
            required.retain(|r| r != "spec");
            if required.is_empty() {
                root.remove("required");
            }
        }
    }
    serde_json::from_value(value).unwrap_or_else(|_| schema.clone())
}

fn version_note(kind: SmiKind, version: &str) -> String {
    if version == storage_version(kind) {
        format!("{version} is the final SMI release of this kind and the storage version.")
    } else {
        format!("{version} is served for existing manifests and converted by consul-smi's webhook.")
    }
}

fn clean_crd_node(node: &mut Value) {
    let Some(obj) = node.as_object_mut() else {
        return;
    };
    // `additionalProperties: false` is forbidden in CRD schemas; pruning drops unknown fields.
    if obj.get("additionalProperties") == Some(&Value::Bool(false)) {
        obj.remove("additionalProperties");
    }
    // Defaults are applied by the decoder; as schema defaults they would be written into
    // stored objects and show up in every read.
    obj.remove("default");
    if obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        // The one anyOf shape structural schemas allow: exactly integer | string, with value
        // validations (the Quantity pattern) on the node itself.
        let pattern = obj
            .get("anyOf")
            .and_then(Value::as_array)
            .and_then(|branches| branches.iter().find_map(|b| b.get("pattern").cloned()))
            .or_else(|| obj.get("pattern").cloned());
        obj.remove("type");
        obj.insert(
            "anyOf".to_string(),
            json!([{"type": "integer"}, {"type": "string"}]),
        );
        if let Some(pattern) = pattern {
            obj.insert("pattern".to_string(), pattern);
        }
    }
    if let Some(format) = obj.get("format").and_then(Value::as_str) {
        match format {
            "int8" | "int16" | "int32" | "uint8" | "uint16" => {
                obj.insert("format".to_string(), json!("int32"));
            }
            "uint32" | "uint64" | "int64" => {
                obj.insert("format".to_string(), json!("int64"));
            }
            "float" | "double" | "byte" | "date" | "date-time" | "password" => {}
            _ => {
                obj.remove("format");
            }
        }
    }
    // Optional fields are omitted rather than null; `nullable` would only admit `null` values
    // that the decoder then has to treat as absent.
    obj.remove("nullable");
    for_each_subschema(obj, clean_crd_node);
}

/// Visits the schemas nested in a schema node; `properties` holds a map of schemas, not one.
fn for_each_subschema(obj: &mut serde_json::Map<String, Value>, visit: fn(&mut Value)) {
    for (key, child) in obj.iter_mut() {
        match (key.as_str(), child) {
            ("properties", Value::Object(props)) => props.values_mut().for_each(visit),
            ("enum" | "required" | "const" | "default" | "example", _) => {}
            (_, child @ Value::Object(_)) => visit(child),
            (_, Value::Array(items)) => items.iter_mut().for_each(visit),
            _ => {}
        }
    }
}

/// A JSON Schema (draft 2020-12) for manifests of one kind and version, for editors and CI:
/// the CRD schema plus `apiVersion`/`kind` constants and `metadata`, with unknown fields
/// rejected (the decoder rejects them too).
pub fn json_schema(kind: SmiKind, version: &str) -> Option<Value> {
    let crd = crd(kind, &CrdConversion::StorageVersionOnly);
    let schema = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == version)?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()?;
    let mut value = serde_json::to_value(schema).ok()?;
    to_json_schema_node(&mut value);
    let root = value.as_object_mut()?;
    let api_version = format!("{}/{}", kind.group(), version);
    let mut properties = root
        .remove("properties")
        .and_then(|p| p.as_object().cloned())
        .unwrap_or_default();
    properties.insert("apiVersion".to_string(), json!({"const": api_version}));
    properties.insert("kind".to_string(), json!({"const": kind.as_str()}));
    properties.insert(
        "metadata".to_string(),
        json!({
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}}
            }
        }),
    );
    let mut required: Vec<Value> = vec![json!("apiVersion"), json!("kind"), json!("metadata")];
    if let Some(existing) = root.get("required").and_then(Value::as_array) {
        required.extend(existing.iter().cloned());
    }
    let mut out = serde_json::Map::new();
    out.insert(
        "$schema".to_string(),
        json!("https://json-schema.org/draft/2020-12/schema"),
    );
    out.insert(
        "$id".to_string(),
        json!(format!(
            "https://consul-smi.io/schemas/{}-{version}.json",
            kind.as_str().to_lowercase()
        )),
    );
    out.insert(
        "title".to_string(),
        json!(format!("{} {api_version}", kind.as_str())),
    );
    for (k, v) in root.iter() {
        if k != "required" {
            out.insert(k.clone(), v.clone());
        }
    }
    out.insert("required".to_string(), Value::Array(required));
    out.insert("properties".to_string(), Value::Object(properties));
    out.insert("additionalProperties".to_string(), json!(false));
    let mut out = Value::Object(out);
    integral_numbers(&mut out);
    Some(out)
}

fn to_json_schema_node(node: &mut Value) {
    let Some(obj) = node.as_object_mut() else {
        return;
    };
    // The one untyped node in our CRDs is HTTPRouteGroup `headers` (map or list of maps;
    // tests/crds.rs checks that no other node is untyped); JSON Schema can say it precisely.
    if obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        && !obj.contains_key("type")
    {
        obj.remove("x-kubernetes-preserve-unknown-fields");
        if let Value::Object(precise) = crate::specs::headers_json_schema() {
            obj.extend(precise);
        }
        return;
    }
    let int_or_string = obj.remove("x-kubernetes-int-or-string").is_some();
    obj.retain(|k, _| !k.starts_with("x-kubernetes-"));
    if int_or_string {
        // Quantity weights: a non-negative integer, or a string in Quantity syntax.
        let pattern = obj.remove("pattern").unwrap_or(json!(".*"));
        obj.insert(
            "anyOf".to_string(),
            json!([{"type": "integer", "minimum": 0}, {"type": "string", "pattern": pattern}]),
        );
    }
    if obj.contains_key("properties") && !obj.contains_key("additionalProperties") {
        obj.insert("additionalProperties".to_string(), json!(false));
    }
    for_each_subschema(obj, to_json_schema_node);
}

const GENERATED_HEADER: &str =
    "# Generated by `cargo xtask gen-crds` from crates/smi-api; do not edit.\n";

/// Directories (relative to the workspace root) whose every file is generated.
pub const GENERATED_DIRS: [&str; 2] = ["schemas/crds", "schemas/jsonschema"];

/// Every file `cargo xtask gen-crds` writes, by path relative to the workspace root:
/// `schemas/crds/<plural>.<group>.yaml`, `schemas/jsonschema/<kind>-<version>.json` and
/// `deploy/base/crds.yaml`, all with the deployed webhook ([`CrdConversion::deployed`]).
pub fn generated_files() -> Result<BTreeMap<String, String>, String> {
    let conversion = CrdConversion::deployed();
    let mut files = BTreeMap::new();
    let mut all = String::from(GENERATED_HEADER);
    for kind in SmiKind::ALL {
        let yaml = serde_saphyr::to_string(&crd_manifest(&crd(kind, &conversion)))
            .map_err(|e| format!("{kind}: {e}"))?;
        files.insert(
            format!("schemas/crds/{}.{}.yaml", kind.plural(), kind.group()),
            format!("{GENERATED_HEADER}{yaml}"),
        );
        all.push_str("---\n");
        all.push_str(&yaml);
        for version in served_versions(kind) {
            let schema = json_schema(kind, version)
                .ok_or_else(|| format!("no JSON Schema for {kind} {version}"))?;
            let text = serde_json::to_string_pretty(&schema).map_err(|e| e.to_string())?;
            files.insert(
                format!(
                    "schemas/jsonschema/{}-{version}.json",
                    kind.as_str().to_lowercase()
                ),
                text + "\n",
            );
        }
    }
    files.insert("deploy/base/crds.yaml".to_string(), all);
    Ok(files)
}
