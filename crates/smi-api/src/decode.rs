//! Reading any SMI object (API-server JSON or manifest YAML) into the hub, writing the hub back
//! as any version, and the conversion-webhook logic built on both.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Map, Value, json};

use crate::common::{CONVERSION_ANNOTATIONS, Versioned};
use crate::error::{DecodeError, DecodeErrorKind, FieldError};
use crate::hub::{SmiKind, SmiObject};
use crate::{access, specs, split};

/// Served versions of each kind, oldest first.
pub fn served_versions(kind: SmiKind) -> &'static [&'static str] {
    match kind {
        SmiKind::TrafficTarget => &["v1alpha1", "v1alpha2", "v1alpha3"],
        SmiKind::HTTPRouteGroup | SmiKind::TCPRoute => {
            &["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"]
        }
        SmiKind::UDPRoute => &["v1alpha4"],
        SmiKind::TrafficSplit => &["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"],
    }
}

/// The version each kind is stored as: the newest (final) SMI release of its group.
pub fn storage_version(kind: SmiKind) -> &'static str {
    let versions = served_versions(kind);
    versions[versions.len() - 1]
}

/// Does something generic with the typed version `V` chosen at run time.
pub(crate) trait VersionVisitor {
    type Out;
    fn visit<V: Versioned>(self) -> Self::Out;
}

/// Calls `visitor` with the typed version for `kind`/`version`; `None` for unknown versions.
pub(crate) fn visit_version<F: VersionVisitor>(
    kind: SmiKind,
    version: &str,
    visitor: F,
) -> Option<F::Out> {
    use SmiKind::*;
    Some(match (kind, version) {
        (TrafficTarget, "v1alpha1") => visitor.visit::<access::v1alpha1::TrafficTarget>(),
        (TrafficTarget, "v1alpha2") => visitor.visit::<access::v1alpha2::TrafficTarget>(),
        (TrafficTarget, "v1alpha3") => visitor.visit::<access::v1alpha3::TrafficTarget>(),
        (HTTPRouteGroup, "v1alpha1") => visitor.visit::<specs::v1alpha1::HTTPRouteGroup>(),
        (HTTPRouteGroup, "v1alpha2") => visitor.visit::<specs::v1alpha2::HTTPRouteGroup>(),
        (HTTPRouteGroup, "v1alpha3") => visitor.visit::<specs::v1alpha3::HTTPRouteGroup>(),
        (HTTPRouteGroup, "v1alpha4") => visitor.visit::<specs::v1alpha4::HTTPRouteGroup>(),
        (TCPRoute, "v1alpha1") => visitor.visit::<specs::v1alpha1::TCPRoute>(),
        (TCPRoute, "v1alpha2") => visitor.visit::<specs::v1alpha2::TCPRoute>(),
        (TCPRoute, "v1alpha3") => visitor.visit::<specs::v1alpha3::TCPRoute>(),
        (TCPRoute, "v1alpha4") => visitor.visit::<specs::v1alpha4::TCPRoute>(),
        (UDPRoute, "v1alpha4") => visitor.visit::<specs::v1alpha4::UDPRoute>(),
        (TrafficSplit, "v1alpha1") => visitor.visit::<split::v1alpha1::TrafficSplit>(),
        (TrafficSplit, "v1alpha2") => visitor.visit::<split::v1alpha2::TrafficSplit>(),
        (TrafficSplit, "v1alpha3") => visitor.visit::<split::v1alpha3::TrafficSplit>(),
        (TrafficSplit, "v1alpha4") => visitor.visit::<split::v1alpha4::TrafficSplit>(),
        _ => return None,
    })
}

/// Where a version keeps its fields: under `spec`, or at the top level.
pub(crate) fn body_prefix<V: Versioned>() -> &'static str {
    if V::TOP_LEVEL_FIELDS.is_some() {
        ""
    } else {
        "spec"
    }
}

const ROOT_KEYS: [&str; 4] = ["apiVersion", "kind", "metadata", "status"];

fn deserialize_at<T: serde::de::DeserializeOwned>(
    value: &Value,
    prefix: &str,
) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| FieldError::from_serde(prefix, e))
}

/// Decodes a JSON object into the typed version `V`, checking what serde cannot see.
pub(crate) fn decode_typed<V: Versioned>(
    object: &Map<String, Value>,
    require_name: bool,
) -> Result<V, FieldError> {
    let metadata: ObjectMeta = match object.get("metadata") {
        None | Some(Value::Null) => ObjectMeta::default(),
        Some(m) => deserialize_at(m, "metadata")?,
    };
    if require_name && metadata.name.as_deref().unwrap_or("").is_empty() {
        return Err(FieldError::invalid(
            "metadata.name",
            "required field is missing",
        ));
    }
    // The API server enforces these; a directory of manifests has no one else to. A name is
    // part of every diagnostic and Consul description, and `/` or `*` in it would mislead.
    if let Some(name) = metadata.name.as_deref().filter(|n| !n.is_empty())
        && let Some(problem) = dns_subdomain_problem(name)
    {
        return Err(FieldError::invalid(
            "metadata.name",
            format!("not a valid object name: {problem}"),
        ));
    }
    if let Some(namespace) = metadata.namespace.as_deref().filter(|n| !n.is_empty())
        && let Some(problem) = dns_label_problem(namespace)
    {
        return Err(FieldError::invalid(
            "metadata.namespace",
            format!("not a valid namespace: {problem}"),
        ));
    }

    let body = match V::TOP_LEVEL_FIELDS {
        Some(fields) => {
            // serde cannot deny unknown fields next to a flattened struct, so check here: an
            // ignored typo in a policy object could silently widen access.
            for key in object.keys() {
                if ROOT_KEYS.contains(&key.as_str()) || fields.contains(&key.as_str()) {
                    continue;
                }
                let hint = if key == "spec" {
                    format!(
                        "; {}/{} keeps its fields at the top level, not under spec",
                        V::KIND.group(),
                        V::VERSION
                    )
                } else {
                    String::new()
                };
                let expected = if fields.is_empty() {
                    "no fields".to_string()
                } else {
                    fields.join(", ")
                };
                return Err(FieldError::invalid(
                    key.clone(),
                    format!("unknown field, expected {expected}{hint}"),
                ));
            }
            let body: Map<String, Value> = object
                .iter()
                .filter(|(k, _)| fields.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            deserialize_at(&Value::Object(body), "")?
        }
        None => {
            for key in object.keys() {
                if ROOT_KEYS.contains(&key.as_str()) || key == "spec" {
                    continue;
                }
                return Err(FieldError::invalid(
                    key.clone(),
                    format!(
                        "unknown field at the top level; {}/{} keeps its fields under spec",
                        V::KIND.group(),
                        V::VERSION
                    ),
                ));
            }
            match object.get("spec") {
                Some(spec) if !spec.is_null() => deserialize_at(spec, "spec")?,
                _ if V::SPEC_OPTIONAL => deserialize_at(&json!({}), "spec")?,
                _ => return Err(FieldError::invalid("spec", "required field is missing")),
            }
        }
    };
    Ok(V::assemble(metadata, body))
}

/// Why `name` is not an RFC 1123 label (what Kubernetes requires of a namespace), if it is not.
fn dns_label_problem(name: &str) -> Option<String> {
    if name.len() > 63 {
        return Some(format!("longer than 63 characters ({})", name.len()));
    }
    if name.is_empty() {
        return Some("empty".to_string());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!(
            "{c:?} is not allowed (RFC 1123 label: lower-case letters, digits and '-')"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some("must start and end with a letter or digit".to_string());
    }
    None
}

/// Why `name` is not an RFC 1123 subdomain (what Kubernetes requires of a custom resource's
/// name), if it is not.
fn dns_subdomain_problem(name: &str) -> Option<String> {
    if name.len() > 253 {
        return Some(format!("longer than 253 characters ({})", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        return Some(format!(
            "{c:?} is not allowed (RFC 1123 subdomain: lower-case letters, digits, '-' and '.')"
        ));
    }
    name.split('.').find_map(|label| {
        if label.is_empty() {
            Some("empty part between dots".to_string())
        } else {
            dns_label_problem(label)
        }
    })
}

struct DecodeVisitor<'a> {
    object: &'a Map<String, Value>,
    require_name: bool,
}

impl VersionVisitor for DecodeVisitor<'_> {
    type Out = Result<SmiObject, FieldError>;
    fn visit<V: Versioned>(self) -> Self::Out {
        let typed = decode_typed::<V>(self.object, self.require_name)?;
        typed.to_hub(body_prefix::<V>())
    }
}

struct EncodeVisitor<'a> {
    object: &'a SmiObject,
}

impl VersionVisitor for EncodeVisitor<'_> {
    type Out = Result<Value, FieldError>;
    fn visit<V: Versioned>(self) -> Self::Out {
        let typed = V::from_hub(self.object, body_prefix::<V>())?;
        serde_json::to_value(&typed)
            .map_err(|e| FieldError::invalid("", format!("cannot serialize: {e}")))
    }
}

/// What an object says about itself, for error messages, however broken the rest is.
struct Identity {
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    api_version: Option<String>,
}

impl Identity {
    fn of(value: &Value) -> Identity {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        let metadata = value.get("metadata");
        let name = text(metadata.and_then(|m| m.get("name")));
        Identity {
            kind: text(value.get("kind")),
            namespace: name.as_ref().map(|_| {
                text(metadata.and_then(|m| m.get("namespace")))
                    .unwrap_or_else(|| "default".to_string())
            }),
            name,
            api_version: text(value.get("apiVersion")),
        }
    }

    fn error(
        &self,
        error_kind: DecodeErrorKind,
        field: &str,
        message: impl Into<String>,
    ) -> DecodeError {
        DecodeError {
            error_kind,
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            api_version: self.api_version.clone(),
            document: None,
            field: Some(field.to_string()).filter(|f| !f.is_empty()),
            message: message.into(),
        }
    }

    fn field_error(&self, e: FieldError) -> DecodeError {
        self.error(e.error_kind, &e.field, e.message)
    }
}

/// Finds the SMI kind and version an object claims to be.
fn resolve_type(value: &Value, id: &Identity) -> Result<(SmiKind, String), DecodeError> {
    let Some(api_version) = id.api_version.as_deref() else {
        let field_kind = if value.get("apiVersion").is_some() {
            "must be a string"
        } else {
            "required field is missing"
        };
        return Err(id.error(DecodeErrorKind::NotSmi, "apiVersion", field_kind));
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    if !group.ends_with("smi-spec.io") {
        return Err(id.error(
            DecodeErrorKind::NotSmi,
            "apiVersion",
            format!("{api_version:?} is not an SMI API group"),
        ));
    }
    let Some(kind_text) = id.kind.as_deref() else {
        return Err(id.error(
            DecodeErrorKind::Invalid,
            "kind",
            "required field is missing",
        ));
    };
    let kind = SmiKind::from_kind(kind_text).filter(|k| k.group() == group).ok_or_else(|| {
        let known: Vec<&str> = SmiKind::ALL.iter().filter(|k| k.group() == group).map(|k| k.as_str()).collect();
        let message = if known.is_empty() {
            format!("API group {group:?} is not supported (supported: access, specs and split.smi-spec.io)")
        } else {
            format!("unknown kind {kind_text:?} in {group}, expected one of {}", known.join(", "))
        };
        id.error(DecodeErrorKind::UnknownVersion, "kind", message)
    })?;
    if !served_versions(kind).contains(&version) {
        return Err(id.error(
            DecodeErrorKind::UnknownVersion,
            "apiVersion",
            format!(
                "unknown version {version:?} of {kind}, expected one of {}",
                served_versions(kind).join(", ")
            ),
        ));
    }
    Ok((kind, version.to_string()))
}

/// The largest object, as compact JSON, that decodes. The API server cannot store more (etcd's
/// default request limit is 1.5 MiB), so only a manifest directory can hold a larger one; and
/// every decoded object travels in one message of the watcher's stream, whose limit
/// (`consul_smi_grpc::smi::WATCH_MESSAGE_LIMIT`) this stays well below.
pub const MAX_OBJECT_BYTES: usize = 3 * 512 * 1024;

/// Compact-JSON size of `value`, without building the text.
fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing into a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Rejects an object over [`MAX_OBJECT_BYTES`], naming the field that holds most of it: the
/// path follows the largest child for as long as it makes up more than half of its parent.
fn check_size(value: &Value) -> Result<(), FieldError> {
    let total = json_size(value);
    if total <= MAX_OBJECT_BYTES {
        return Ok(());
    }
    let (mut node, mut node_size, mut field) = (value, total, String::new());
    loop {
        let children: Vec<(String, &Value)> = match node {
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| {
                    let sep = if field.is_empty() { "" } else { "." };
                    (format!("{field}{sep}{k}"), v)
                })
                .collect(),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{field}[{i}]"), v))
                .collect(),
            _ => break,
        };
        let largest = children
            .into_iter()
            .map(|(path, child)| (json_size(child), path, child))
            .max_by_key(|(size, _, _)| *size);
        match largest {
            Some((size, path, child)) if size > node_size / 2 => {
                (node, node_size, field) = (child, size, path);
            }
            _ => break,
        }
    }
    let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
    let message = format!(
        "the object is {:.1} MiB as JSON, over the {:.1} MiB limit for one SMI object;          {:.1} MiB of it is in this field",
        mib(total),
        mib(MAX_OBJECT_BYTES),
        mib(node_size)
    );
    Err(FieldError::invalid(field, message))
}

fn decode_with(value: &Value, require_name: bool) -> Result<SmiObject, DecodeError> {
    let id = Identity::of(value);
    let Some(object) = value.as_object() else {
        return Err(id.error(
            DecodeErrorKind::Invalid,
            "",
            format!("expected an object (mapping), got {}", type_name(value)),
        ));
    };
    let (kind, version) = resolve_type(value, &id)?;
    // After the type: a large document that is not SMI at all stays "not SMI".
    check_size(value).map_err(|e| id.field_error(e))?;
    visit_version(
        kind,
        &version,
        DecodeVisitor {
            object,
            require_name,
        },
    )
    .unwrap_or_else(|| Err(FieldError::invalid("apiVersion", "unknown version")))
    .map_err(|e| id.field_error(e))
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Decodes one SMI object of any served version into the hub, picking the type from
/// `apiVersion` and `kind`.
pub fn decode_object(value: &Value) -> Result<SmiObject, DecodeError> {
    decode_with(value, true)
}

/// Decodes every document of a multi-document YAML manifest; empty documents are skipped and a
/// `kind: List` is expanded into its items. Each result names its 1-based document.
pub fn decode_manifests(yaml: &str) -> Vec<Result<SmiObject, DecodeError>> {
    let mut results = Vec::new();
    for (index, (first_line, document)) in split_documents(yaml).into_iter().enumerate() {
        let number = index + 1;
        let with_doc = |mut e: DecodeError| {
            e.document = Some(number);
            e
        };
        let value: Value = match serde_saphyr::from_str_with_options(document, yaml_options()) {
            Ok(v) => v,
            Err(e) => {
                // Line numbers count from the top of the whole file. (Padding each document
                // with the lines before it would make a file of N documents cost O(N x lines).)
                let message = e.render_with_options(
                    serde_saphyr::render_options! { line_offset: first_line as u64 },
                );
                let message = first_line_of(&message);
                let mut error = DecodeError::new(
                    DecodeErrorKind::Syntax,
                    format!("invalid YAML: {}", without_parser_advice(message)),
                );
                if message.contains("duplicate mapping key") {
                    name_object_despite_duplicate_keys(document, &mut error);
                }
                results.push(Err(with_doc(error)));
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        let is_list = value.get("kind").and_then(Value::as_str) == Some("List")
            && value.get("apiVersion").and_then(Value::as_str) == Some("v1");
        if is_list {
            match value.get("items").and_then(Value::as_array) {
                Some(items) => results.extend(
                    items
                        .iter()
                        .map(|item| decode_object(item).map_err(with_doc)),
                ),
                None => results.push(Err(with_doc(
                    DecodeError::new(DecodeErrorKind::Invalid, "a List needs an items list")
                        .at("items"),
                ))),
            }
        } else {
            results.push(decode_object(&value).map_err(with_doc));
        }
    }
    results
}

/// Splits a YAML stream at `---` lines. YAML forbids a document marker at the start of a line
/// inside any scalar, so a line-based split is exact; it lets one broken document fail alone.
/// Blank and comment-only documents are dropped; the rest keep their position numbers.
/// Returns each document with the 0-based line of the file it starts on.
fn split_documents(yaml: &str) -> Vec<(usize, &str)> {
    let mut documents = Vec::new();
    let (mut start, mut start_line) = (0, 0);
    let mut offset = 0;
    for (line_number, line) in yaml.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        let is_end = bare == "..." || bare.starts_with("... ");
        if is_marker || is_end {
            documents.push((start_line, &yaml[start..offset]));
            // Content may follow the marker on the same line (`--- {a: 1}`).
            (start, start_line) = if is_marker {
                (offset + 3, line_number)
            } else {
                (offset + line.len(), line_number + 1)
            };
        }
        offset += line.len();
    }
    documents.push((start_line, &yaml[start..]));
    documents
        .into_iter()
        .filter(|(_, doc)| {
            doc.lines().any(|l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#') && !t.starts_with('%')
            })
        })
        .collect()
}

/// How manifests are parsed. Duplicate keys are an error: Kubernetes' own YAML decoding
/// rejects them, and last-wins would let a second `sources:` silently replace the first. The
/// default budget bounds nesting depth (64) and node count per document, so hostile input
/// fails instead of exhausting memory or the stack.
fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    // The default allows a million replayed alias events: an alias bomb ("billion laughs")
    // then costs about a second of CPU per document before failing, and a file may hold a
    // thousand documents. An SMI object small enough to write by hand replays far fewer.
    options.alias_limits.max_total_replayed_events = MAX_REPLAYED_ALIAS_EVENTS;
    options
}

/// Alias events one manifest document may replay (see [`yaml_options`]).
const MAX_REPLAYED_ALIAS_EVENTS: usize = 10_000;

/// Adds kind/namespace/name to a duplicate-key error, read from a lenient second parse (the
/// error itself still stands: the object is not used).
fn name_object_despite_duplicate_keys(document: &str, error: &mut DecodeError) {
    let mut lenient = yaml_options();
    lenient.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::FirstWins;
    if let Ok(value) = serde_saphyr::from_str_with_options::<Value>(document, lenient) {
        let id = Identity::of(&value);
        error.kind = id.kind;
        error.namespace = id.namespace;
        error.name = id.name;
        error.api_version = id.api_version;
    }
}

/// The parser addresses its caller ("set DuplicateKeyPolicy in Options if acceptable"); a
/// user editing a manifest cannot act on that.
fn without_parser_advice(message: &str) -> &str {
    message
        .split_once(", set DuplicateKeyPolicy")
        .map_or(message, |(before, _)| before)
}

/// The parser's one-line summary (it appends a source snippet on further lines).
fn first_line_of(message: &str) -> &str {
    let line = message.lines().next().unwrap_or(message);
    line.strip_prefix("error: ").unwrap_or(line)
}

/// Encodes a hub object as the given version (`group/version`), e.g. to serve an old client.
/// Fails when the version cannot express what the hub holds (a UDPRoute rule in
/// access v1alpha1, port matches before specs v1alpha4, split matches before v1alpha3).
pub fn encode_object(obj: &SmiObject, api_version: &str) -> Result<Value, DecodeError> {
    let meta = obj.meta();
    let error = |error_kind, field: &str, message: String| DecodeError {
        error_kind,
        kind: Some(obj.kind().to_string()),
        namespace: Some(meta.namespace.clone()),
        name: Some(meta.name.clone()),
        api_version: Some(api_version.to_string()),
        document: None,
        field: Some(field.to_string()).filter(|f| !f.is_empty()),
        message,
    };
    let kind = obj.kind();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    if group != kind.group() || !served_versions(kind).contains(&version) {
        return Err(error(
            DecodeErrorKind::UnknownVersion,
            "apiVersion",
            format!(
                "{kind} is served as {}/{{{}}}",
                kind.group(),
                served_versions(kind).join(",")
            ),
        ));
    }
    visit_version(kind, version, EncodeVisitor { object: obj })
        .unwrap_or_else(|| Err(FieldError::invalid("apiVersion", "unknown version")))
        .map_err(|e| error(e.error_kind, &e.field, e.message))
}

/// Converts one stored object to `desired` for the conversion webhook: fields go through the
/// hub; metadata is kept byte for byte (the API server rejects any other change) except the
/// annotations conversion owns.
fn convert_object(object: &Value, desired: &str) -> Result<Value, DecodeError> {
    if object.get("apiVersion").and_then(Value::as_str) == Some(desired) {
        return Ok(object.clone());
    }
    let hub = decode_with(object, false)?;
    let mut converted = encode_object(&hub, desired)?;
    let mut metadata = object.get("metadata").cloned().unwrap_or_else(|| json!({}));
    if let Some(meta) = metadata.as_object_mut() {
        let mut annotations = meta
            .get("annotations")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        annotations.retain(|k, _| !CONVERSION_ANNOTATIONS.contains(&k.as_str()));
        if let Some(new) = converted
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
        {
            for (k, v) in new {
                if CONVERSION_ANNOTATIONS.contains(&k.as_str()) {
                    annotations.insert(k.clone(), v.clone());
                }
            }
        }
        if annotations.is_empty() {
            meta.remove("annotations");
        } else {
            meta.insert("annotations".to_string(), Value::Object(annotations));
        }
    }
    converted["metadata"] = metadata;
    Ok(converted)
}

/// Answers an `apiextensions.k8s.io/v1` ConversionReview: converts every object of the
/// request to `desiredAPIVersion` via the hub. The uid is echoed; any failure fails the whole
/// review with a message naming the object and field (the API server then fails the request).
pub fn convert_review(review: &Value) -> Value {
    let request = review.get("request");
    let uid = request
        .and_then(|r| r.get("uid"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let respond = |converted: Vec<Value>, failure: Option<String>| {
        let result = match failure {
            None => json!({"status": "Success"}),
            Some(message) => json!({"status": "Failure", "message": message}),
        };
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "ConversionReview",
            "response": {"uid": uid, "convertedObjects": converted, "result": result},
        })
    };
    let Some(request) = request else {
        return respond(
            Vec::new(),
            Some("ConversionReview has no request".to_string()),
        );
    };
    if uid.is_empty() {
        return respond(
            Vec::new(),
            Some("ConversionReview request has no uid".to_string()),
        );
    }
    let Some(desired) = request.get("desiredAPIVersion").and_then(Value::as_str) else {
        return respond(
            Vec::new(),
            Some("ConversionReview request has no desiredAPIVersion".to_string()),
        );
    };
    let objects = request
        .get("objects")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut converted = Vec::with_capacity(objects.len());
    for object in objects {
        match convert_object(object, desired) {
            Ok(v) => converted.push(v),
            Err(e) => return respond(Vec::new(), Some(format!("converting to {desired}: {e}"))),
        }
    }
    respond(converted, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_at_markers_only() {
        let docs =
            split_documents("a: 1\n---\nb: |\n  ---x\n---   \n# only a comment\n--- {c: 3}\n...\n");
        assert_eq!(
            docs,
            vec![(0, "a: 1\n"), (1, "\nb: |\n  ---x\n"), (6, " {c: 3}\n")]
        );
        assert!(split_documents("").is_empty());
        assert!(split_documents("---\n---\n").is_empty());
    }
}
