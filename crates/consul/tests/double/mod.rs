//! A test double of Consul 1.9+'s config-entry API, for the modern code path that cannot run
//! against a real server here. It follows the upstream docs (`api-docs/config.mdx`,
//! `config-entries/service-intentions.mdx`) and the validation in upstream
//! `agent/structs/config_entry_intentions.go`, NOT a live server:
//!
//! - `GET /v1/agent/self` reports `Config.Version` (default `1.16.0`).
//! - `GET /v1/config/:kind` (blocking with `?index=&wait=`, `X-Consul-Index`),
//!   `GET /v1/config/:kind/:name` (404 when absent), `PUT /v1/config?cas=` (`true`/`false`;
//!   `cas=0` = create only), `DELETE /v1/config/:kind/:name?cas=` (see below).
//! - Unknown fields are rejected with 400 `invalid config key`; service-intentions sources
//!   are validated (Action xor Permissions, HTTP match rules, no Permissions on a wildcard
//!   destination, L7 needs an http-family protocol, legacy fields must be omitted, no
//!   duplicate sources, at least one source, 512-byte descriptions); Consul fills
//!   `Precedence` and `Type` on read.
//! - Like upstream, entry names are keyed case-insensitively (`indexFromConfigEntryKindName`
//!   in `agent/consul/state/config_entry_oss.go` lowercases kind and name), writes are
//!   normalised before they are stored (`ServiceConfigEntry.Normalize` lowercases `Protocol`;
//!   `ServiceSplitterConfigEntry.Normalize` rounds each weight to hundredths,
//!   `NormalizeServiceSplitWeight`/`scaleWeight` in `agent/structs/config_entry_discoverychain.go`),
//!   and `DELETE ?cas=` is honoured only from 1.11 (hashicorp/consul#11419; older servers
//!   ignore it and delete unconditionally), answering a bare `true`/`false`
//!   (`configDelete` in `agent/config_endpoint.go` returns `reply.Deleted`).
//! - Faults for tests: N transient 500s (`No cluster leader`), a concurrent write injected
//!   just before the next CAS write, a normalisation the writer does not know applied to
//!   every write, and an ACL token requirement (403 otherwise).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

type Entries = BTreeMap<(String, String), Value>;
type Race = Box<dyn FnOnce(&mut Value) + Send>;
type Mangle = Box<dyn Fn(&mut Value) + Send>;

/// Upstream's key: kind and name, lowercased.
fn entry_key(kind: &str, name: &str) -> (String, String) {
    (kind.to_lowercase(), name.to_lowercase())
}

/// What upstream's `Normalize` does to the entries this double knows before storing them.
fn normalise(entry: &mut Value) {
    match entry["Kind"].as_str() {
        Some("service-defaults") => {
            if let Some(protocol) = entry["Protocol"].as_str() {
                entry["Protocol"] = json!(protocol.to_lowercase());
            }
        }
        Some("service-splitter") => {
            if let Some(splits) = entry["Splits"].as_array_mut() {
                for split in splits {
                    if let Some(weight) = split["Weight"].as_f64() {
                        // scaleWeight: int(math.Round(float64(v * 100.0))) on a float32 v.
                        let scaled = f64::from(weight as f32 * 100.0).round() as i64;
                        split["Weight"] = json!(f64::from(scaled as f32 / 100.0));
                    }
                }
            }
        }
        _ => {}
    }
}

fn version_at_least(version: &str, major: u64, minor: u64) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (have_major, have_minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (have_major, have_minor) >= (major, minor)
}

#[derive(Default)]
struct Inner {
    version: String,
    index: u64,
    entries: Entries,
    writes: u64,
    transient_failures: u32,
    /// Applied to the stored entry right before the next CAS write is checked.
    race: Option<Race>,
    mangle: Option<Mangle>,
    required_token: Option<String>,
}

#[derive(Clone)]
pub struct ModernConsul {
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
    pub address: String,
}

impl ModernConsul {
    pub async fn start() -> ModernConsul {
        let (changed, _) = watch::channel(1);
        let double = ModernConsul {
            inner: Arc::new(Mutex::new(Inner {
                version: "1.16.0".into(),
                index: 1,
                ..Default::default()
            })),
            changed,
            address: String::new(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(double.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        ModernConsul { address, ..double }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    pub fn entry(&self, kind: &str, name: &str) -> Option<Value> {
        self.lock().entries.get(&entry_key(kind, name)).cloned()
    }

    /// Reports this version in `/v1/agent/self` and follows its `DELETE ?cas=` behaviour.
    pub fn set_version(&self, version: &str) {
        self.lock().version = version.to_string();
    }

    /// Applies `change` to every entry written through the API from now on, like a
    /// normalisation of Consul's that the writer does not know about.
    pub fn mangle_writes(&self, change: impl Fn(&mut Value) + Send + 'static) {
        self.lock().mangle = Some(Box::new(change));
    }

    /// Writes an entry as an operator would (no validation beyond JSON).
    pub fn put_raw(&self, mut entry: Value) {
        let mut inner = self.lock();
        inner.index += 1;
        let index = inner.index;
        let key = entry_key(
            entry["Kind"].as_str().unwrap(),
            entry["Name"].as_str().unwrap(),
        );
        normalise(&mut entry);
        if key.0 == "service-intentions" {
            fill_computed_fields(&mut entry);
        }
        entry["CreateIndex"] = json!(index);
        entry["ModifyIndex"] = json!(index);
        inner.entries.insert(key, entry);
        drop(inner);
        self.changed.send_replace(index);
    }

    /// Deletes an entry as an operator would.
    pub fn remove(&self, kind: &str, name: &str) {
        let mut inner = self.lock();
        inner.entries.remove(&entry_key(kind, name));
        inner.index += 1;
        let index = inner.index;
        drop(inner);
        self.changed.send_replace(index);
    }

    pub fn fail_next(&self, count: u32) {
        self.lock().transient_failures = count;
    }

    pub fn race_next_write(&self, change: impl FnOnce(&mut Value) + Send + 'static) {
        self.lock().race = Some(Box::new(change));
    }

    pub fn require_token(&self, token: &str) {
        self.lock().required_token = Some(token.to_string());
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [("Content-Type", "text/plain")], body.into()).into_response()
}

fn validation(message: impl AsRef<str>) -> Response {
    // Modern Consul reports config-entry validation failures as 500 with a text body.
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("1 error occurred:\n\t* {}\n\n", message.as_ref()),
    )
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

async fn handle(
    State(double): State<ModernConsul>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    {
        let mut inner = double.lock();
        if let Some(token) = &inner.required_token
            && headers.get("X-Consul-Token").and_then(|v| v.to_str().ok()) != Some(token.as_str())
        {
            return text(StatusCode::FORBIDDEN, "Permission denied");
        }
        if inner.transient_failures > 0 && uri.path() != "/v1/agent/self" {
            inner.transient_failures -= 1;
            return text(StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader");
        }
    }
    let params = query(&uri);
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["v1", "agent", "self"]) => {
            let version = double.lock().version.clone();
            axum::Json(json!({"Config": {"Version": version, "Datacenter": "dc1"}})).into_response()
        }
        (Method::GET, ["v1", "config", kind]) => list(&double, kind, &params).await,
        (Method::GET, ["v1", "config", kind, name]) => {
            match double.lock().entries.get(&entry_key(kind, name)) {
                Some(entry) => axum::Json(entry.clone()).into_response(),
                None => text(
                    StatusCode::NOT_FOUND,
                    format!("Config entry not found for {kind:?} / {name:?}"),
                ),
            }
        }
        (Method::PUT, ["v1", "config"]) => put(&double, &params, &body),
        (Method::DELETE, ["v1", "config", kind, name]) => delete(&double, kind, name, &params),
        _ => text(
            StatusCode::NOT_FOUND,
            format!("double: no route for {method} {uri}"),
        ),
    }
}

async fn list(double: &ModernConsul, kind: &str, params: &BTreeMap<String, String>) -> Response {
    if let Some(index) = params.get("index").and_then(|i| i.parse::<u64>().ok()) {
        let wait = params
            .get("wait")
            .and_then(|w| w.strip_suffix("ms"))
            .and_then(|w| w.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(300));
        let mut changed = double.changed.subscribe();
        let _ = tokio::time::timeout(wait, changed.wait_for(|current| *current > index)).await;
    }
    let inner = double.lock();
    let entries: Vec<Value> = inner
        .entries
        .iter()
        .filter(|((k, _), _)| k == kind)
        .map(|(_, v)| v.clone())
        .collect();
    let mut response = axum::Json(entries).into_response();
    response
        .headers_mut()
        .insert("X-Consul-Index", inner.index.to_string().parse().unwrap());
    response
}

const INTENTIONS_KEYS: &[&str] = &[
    "Kind",
    "Name",
    "Namespace",
    "Partition",
    "Sources",
    "Meta",
    "JWT",
    "CreateIndex",
    "ModifyIndex",
    "Hash",
];
const SOURCE_KEYS: &[&str] = &[
    "Name",
    "Namespace",
    "Partition",
    "Peer",
    "SamenessGroup",
    "Action",
    "Permissions",
    "Description",
    "Type",
    "Precedence",
    "LegacyID",
    "LegacyMeta",
    "LegacyCreateTime",
    "LegacyUpdateTime",
];
const DEFAULTS_KEYS: &[&str] = &[
    "Kind",
    "Name",
    "Namespace",
    "Partition",
    "Protocol",
    "Meta",
    "MeshGateway",
    "Expose",
    "CreateIndex",
    "ModifyIndex",
];
const SPLITTER_KEYS: &[&str] = &[
    "Kind",
    "Name",
    "Namespace",
    "Partition",
    "Splits",
    "Meta",
    "CreateIndex",
    "ModifyIndex",
];

fn unknown_key(object: &Map<String, Value>, known: &[&str]) -> Option<String> {
    object
        .keys()
        .find(|k| !known.contains(&k.as_str()))
        .cloned()
}

fn put(double: &ModernConsul, params: &BTreeMap<String, String>, body: &[u8]) -> Response {
    let Ok(mut entry) = serde_json::from_slice::<Value>(body) else {
        return text(
            StatusCode::BAD_REQUEST,
            "Request decoding failed: invalid JSON",
        );
    };
    let Some(object) = entry.as_object() else {
        return text(
            StatusCode::BAD_REQUEST,
            "Request decoding failed: not an object",
        );
    };
    let kind = object
        .get("Kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let name = object
        .get("Name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let known = match kind.as_str() {
        "service-intentions" => INTENTIONS_KEYS,
        "service-defaults" => DEFAULTS_KEYS,
        "service-splitter" => SPLITTER_KEYS,
        other => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Request decoding failed: invalid config entry kind: {other}"),
            );
        }
    };
    if let Some(key) = unknown_key(object, known) {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "Request decoding failed: 1 error occurred:\n\t* invalid config key \"{key}\"\n\n"
            ),
        );
    }
    if name.is_empty() {
        return validation("Name is required");
    }
    if let Some(meta) = object.get("Meta").and_then(Value::as_object)
        && (meta.len() > 64
            || meta
                .iter()
                .any(|(k, v)| k.len() > 128 || v.as_str().is_none_or(|v| v.len() > 512)))
    {
        return validation(
            "Meta exceeds Consul's limits (64 keys, 128-byte keys, 512-byte values)",
        );
    }
    let mut inner = double.lock();
    if kind == "service-intentions" {
        if let Err(message) = validate_intentions(&inner.entries, &name, &entry) {
            return validation(message);
        }
        fill_computed_fields(&mut entry);
    }
    if kind == "service-splitter" {
        let protocol = protocol_of(&inner.entries, &name);
        if protocol == "tcp" {
            return validation(format!(
                "discovery chain {name:?} uses a protocol \"tcp\" that does not permit advanced routing or splitting behavior"
            ));
        }
    }
    normalise(&mut entry);
    if let Some(mangle) = &inner.mangle {
        mangle(&mut entry);
    }
    let key = entry_key(&kind, &name);
    if let Some(race) = inner.race.take()
        && let Some(stored) = inner.entries.get_mut(&key)
    {
        race(stored);
        inner.index += 1;
        let index = inner.index;
        inner.entries.get_mut(&key).unwrap()["ModifyIndex"] = json!(index);
    }
    let current = inner
        .entries
        .get(&key)
        .map(|e| e["ModifyIndex"].as_u64().unwrap_or(0));
    if let Some(cas) = params.get("cas").and_then(|c| c.parse::<u64>().ok()) {
        let ok = match current {
            None => cas == 0,
            Some(index) => cas == index,
        };
        if !ok {
            return axum::Json(false).into_response();
        }
    }
    inner.index += 1;
    inner.writes += 1;
    let index = inner.index;
    let create_index = inner
        .entries
        .get(&key)
        .and_then(|e| e["CreateIndex"].as_u64())
        .unwrap_or(index);
    entry["CreateIndex"] = json!(create_index);
    entry["ModifyIndex"] = json!(index);
    inner.entries.insert(key, entry);
    drop(inner);
    double.changed.send_replace(index);
    axum::Json(true).into_response()
}

fn delete(
    double: &ModernConsul,
    kind: &str,
    name: &str,
    params: &BTreeMap<String, String>,
) -> Response {
    let mut inner = double.lock();
    let key = entry_key(kind, name);
    let cas = params
        .get("cas")
        .and_then(|c| c.parse::<u64>().ok())
        .filter(|_| version_at_least(&inner.version, 1, 11));
    let current = inner
        .entries
        .get(&key)
        .map(|e| e["ModifyIndex"].as_u64().unwrap_or(0));
    if let Some(cas) = cas
        && current.is_some_and(|index| index != cas)
    {
        return axum::Json(false).into_response();
    }
    if inner.entries.remove(&key).is_some() {
        inner.index += 1;
        inner.writes += 1;
    }
    let index = inner.index;
    drop(inner);
    double.changed.send_replace(index);
    if cas.is_some() {
        axum::Json(true).into_response()
    } else {
        axum::Json(json!({})).into_response()
    }
}

fn protocol_of(entries: &Entries, service: &str) -> String {
    entries
        .get(&entry_key("service-defaults", service))
        .and_then(|e| e["Protocol"].as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("tcp")
        .to_string()
}

fn validate_intentions(entries: &Entries, name: &str, entry: &Value) -> Result<(), String> {
    let sources = entry["Sources"].as_array().cloned().unwrap_or_default();
    if sources.is_empty() {
        return Err("At least one source is required".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, source) in sources.iter().enumerate() {
        let Some(object) = source.as_object() else {
            return Err(format!("Sources[{i}] must be an object"));
        };
        if let Some(key) = unknown_key(object, SOURCE_KEYS) {
            return Err(format!("invalid config key \"Sources[{i}].{key}\""));
        }
        for legacy in [
            "LegacyID",
            "LegacyMeta",
            "LegacyCreateTime",
            "LegacyUpdateTime",
        ] {
            if object.get(legacy).is_some_and(|v| !v.is_null()) {
                return Err(format!("Sources[{i}].{legacy} must be omitted"));
            }
        }
        let source_name = object
            .get("Name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if source_name.is_empty() {
            return Err(format!("Sources[{i}].Name is required"));
        }
        let namespace = object
            .get("Namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        if !seen.insert((namespace.to_string(), source_name.to_string())) {
            return Err(format!(
                "Sources[{i}] defines {namespace:?}/{source_name:?} more than once"
            ));
        }
        let action = object
            .get("Action")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let permissions = object
            .get("Permissions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if permissions.is_empty() {
            if action != "allow" && action != "deny" {
                return Err(format!(
                    "Sources[{i}].Action must be set to 'allow' or 'deny'"
                ));
            }
            continue;
        }
        if !action.is_empty() {
            return Err(format!(
                "Sources[{i}].Action must be omitted if Permissions are specified"
            ));
        }
        if name == "*" {
            return Err(format!(
                "Sources[{i}].Permissions cannot be specified on intentions with wildcarded destinations"
            ));
        }
        let protocol = protocol_of(entries, name);
        if !["http", "http2", "grpc"].contains(&protocol.as_str()) {
            return Err(format!(
                "service {name:?} has protocol {protocol:?}, which does not match defined L7 intentions"
            ));
        }
        for (j, permission) in permissions.iter().enumerate() {
            validate_permission(i, j, permission)?;
        }
    }
    Ok(())
}

fn validate_permission(i: usize, j: usize, permission: &Value) -> Result<(), String> {
    let at = format!("Sources[{i}].Permissions[{j}]");
    let action = permission["Action"].as_str().unwrap_or_default();
    if action != "allow" && action != "deny" {
        return Err(format!("{at}.Action must be set to 'allow' or 'deny'"));
    }
    let Some(http) = permission["HTTP"].as_object() else {
        return Err(format!("{at}.HTTP is required"));
    };
    let paths: Vec<(&str, &str)> = ["PathExact", "PathPrefix", "PathRegex"]
        .iter()
        .filter_map(|k| http.get(*k).and_then(Value::as_str).map(|v| (*k, v)))
        .collect();
    if paths.len() > 1 {
        return Err(format!(
            "{at}.HTTP should only contain at most one of PathExact, PathPrefix, or PathRegex"
        ));
    }
    for (kind, path) in &paths {
        if *kind != "PathRegex" && !path.starts_with('/') {
            return Err(format!("{at}.HTTP.{kind} doesn't start with '/': {path:?}"));
        }
    }
    let headers = http
        .get("Header")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let methods = http
        .get("Methods")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if paths.is_empty() && headers.is_empty() && methods.is_empty() {
        return Err(format!("{at}.HTTP should not be empty"));
    }
    for (k, header) in headers.iter().enumerate() {
        if header["Name"].as_str().unwrap_or_default().is_empty() {
            return Err(format!("{at}.HTTP.Header[{k}] missing required Name field"));
        }
        let matchers = ["Present", "Exact", "Prefix", "Suffix", "Regex"]
            .iter()
            .filter(|m| match &header[**m] {
                Value::Bool(b) => *b,
                Value::String(_) => true,
                _ => false,
            })
            .count();
        if matchers != 1 {
            return Err(format!(
                "{at}.HTTP.Header[{k}] should only contain one of Present, Exact, Prefix, Suffix, or Regex"
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for method in &methods {
        let method = method.as_str().unwrap_or_default();
        if ![
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
        ]
        .contains(&method)
        {
            return Err(format!(
                "{at}.HTTP.Methods contains an invalid method {method:?}"
            ));
        }
        if !seen.insert(method) {
            return Err(format!(
                "{at}.HTTP.Methods contains {method:?} more than once"
            ));
        }
    }
    Ok(())
}

/// What Consul adds to each source on write and returns on read.
fn fill_computed_fields(entry: &mut Value) {
    let destination_wild = entry["Name"] == "*";
    if let Some(sources) = entry["Sources"].as_array_mut() {
        for source in sources {
            let source_wild = source["Name"] == "*";
            let precedence = match (source_wild, destination_wild) {
                (false, false) => 9,
                (true, false) => 8,
                (false, true) => 6,
                (true, true) => 5,
            };
            source["Precedence"] = json!(precedence);
            if source.get("Type").is_none() {
                source["Type"] = json!("consul");
            }
        }
    }
}
