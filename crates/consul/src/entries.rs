//! Config entries (`/v1/config`): `service-defaults` and `service-splitter` (1.8+) and
//! `service-intentions` (1.9+). Writes use `?cas=<ModifyIndex>` (0 = create only).

use std::collections::BTreeMap;

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::client::{Blocking, Call, ConsulClient, Indexed};
use crate::error::ConsulError;

pub const SERVICE_DEFAULTS: &str = "service-defaults";
pub const SERVICE_SPLITTER: &str = "service-splitter";
pub const SERVICE_INTENTIONS: &str = "service-intentions";

/// What every config entry has; lets the client name and CAS any kind.
pub trait ConfigEntry: Serialize + DeserializeOwned {
    const KIND: &'static str;
    fn name(&self) -> &str;
    fn namespace(&self) -> Option<&str>;
    fn modify_index(&self) -> u64;
    fn meta(&self) -> &BTreeMap<String, String>;
}

type Meta = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceDefaultsEntry {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Meta::is_empty")]
    pub meta: Meta,
    #[serde(default, skip_serializing)]
    pub modify_index: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceSplitterEntry {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub splits: Vec<WireSplit>,
    #[serde(default, skip_serializing_if = "Meta::is_empty")]
    pub meta: Meta,
    #[serde(default, skip_serializing)]
    pub modify_index: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct WireSplit {
    pub weight: f32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_subset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A `service-intentions` entry. Fields this crate does not model (JWT, ...) live in
/// `extra` so a read-modify-write of a shared entry keeps them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceIntentionsEntry {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub sources: Vec<SourceIntention>,
    #[serde(default, skip_serializing_if = "Meta::is_empty")]
    pub meta: Meta,
    #[serde(default, skip_serializing)]
    pub modify_index: u64,
    #[serde(default, skip_serializing)]
    pub create_index: u64,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Fields Consul computes or fills from legacy intentions; a config-entry write must omit them.
const SOURCE_READ_ONLY: &[&str] = &[
    "Precedence",
    "LegacyID",
    "LegacyCreateTime",
    "LegacyUpdateTime",
];
const ENTRY_READ_ONLY: &[&str] = &["Hash"];

impl ServiceIntentionsEntry {
    pub fn new(name: &str, namespace: Option<&str>, meta: Meta) -> Self {
        ServiceIntentionsEntry {
            kind: SERVICE_INTENTIONS.into(),
            name: name.into(),
            namespace: namespace.map(str::to_string),
            sources: Vec::new(),
            meta,
            modify_index: 0,
            create_index: 0,
            extra: Default::default(),
        }
    }

    /// Drops what Consul fills in itself, so the entry can be written back.
    pub fn strip_read_only(&mut self) {
        for key in ENTRY_READ_ONLY {
            self.extra.remove(*key);
        }
        for source in &mut self.sources {
            for key in SOURCE_READ_ONLY {
                source.extra.remove(*key);
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SourceIntention {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<WirePermission>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Meta of a legacy intention Consul migrated into this entry; read-only.
    #[serde(default, skip_serializing)]
    pub legacy_meta: Option<Meta>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct WirePermission {
    pub action: String,
    #[serde(rename = "HTTP", default, skip_serializing_if = "Option::is_none")]
    pub http: Option<WireHttp>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct WireHttp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header: Vec<WireHeader>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct WireHeader {
    pub name: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub present: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

macro_rules! config_entry {
    ($ty:ty, $kind:expr) => {
        impl ConfigEntry for $ty {
            const KIND: &'static str = $kind;
            fn name(&self) -> &str {
                &self.name
            }
            fn namespace(&self) -> Option<&str> {
                self.namespace.as_deref()
            }
            fn modify_index(&self) -> u64 {
                self.modify_index
            }
            fn meta(&self) -> &BTreeMap<String, String> {
                &self.meta
            }
        }
    };
}

config_entry!(ServiceDefaultsEntry, SERVICE_DEFAULTS);
config_entry!(ServiceSplitterEntry, SERVICE_SPLITTER);
config_entry!(ServiceIntentionsEntry, SERVICE_INTENTIONS);

#[derive(Deserialize)]
struct DeleteResult {
    #[serde(rename = "Deleted", default = "yes")]
    deleted: bool,
}

fn yes() -> bool {
    true
}

impl ConsulClient {
    fn with_ns<'a>(&self, call: Call<'a>, namespace: Option<&str>) -> Call<'a> {
        match self.namespace_for(namespace) {
            Some(ns) => call.query("ns", ns),
            None => call,
        }
    }

    /// One entry; `None` when it does not exist.
    pub async fn get_config_entry<E: ConfigEntry>(
        &self,
        name: &str,
        namespace: Option<&str>,
    ) -> Result<Option<E>, ConsulError> {
        check_entry_name(E::KIND, name, namespace)?;
        let what = format!("GET {} {name}", E::KIND);
        let call = Call::new(Method::GET, entry_path(E::KIND, name)?, &what);
        match self.get_json(self.with_ns(call, namespace)).await {
            Ok(entry) => Ok(Some(entry)),
            Err(ConsulError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// All entries of a kind. `all_namespaces` adds Enterprise's `?ns=*`.
    pub async fn list_config_entries<E: ConfigEntry>(
        &self,
        all_namespaces: bool,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Vec<E>>, ConsulError> {
        let what = format!("GET /v1/config/{}", E::KIND);
        let mut call =
            Call::new(Method::GET, format!("/v1/config/{}", E::KIND), &what).blocking(blocking);
        if all_namespaces {
            call = call.query("ns", "*");
        }
        let mut listed: Indexed<Option<Vec<E>>> = self.get_indexed(call).await?;
        // Consul answers `null` rather than `[]` for a kind with no entries.
        Ok(Indexed {
            index: listed.index,
            value: listed.value.take().unwrap_or_default(),
        })
    }

    /// `PUT /v1/config?cas=<cas>`; `false` when the entry changed since `cas` was read.
    pub async fn cas_config_entry<E: ConfigEntry>(
        &self,
        entry: &E,
        cas: u64,
    ) -> Result<bool, ConsulError> {
        check_entry_name(E::KIND, entry.name(), entry.namespace())?;
        let what = format!("PUT {} {}", E::KIND, entry.name());
        let call = Call::new(Method::PUT, "/v1/config", &what)
            .query("cas", cas.to_string())
            .json(entry)?;
        self.get_json(self.with_ns(call, entry.namespace())).await
    }

    /// Deletes an entry. With `cas` (Consul 1.12+ honours it; older ones ignore it) returns
    /// `false` when the entry changed since it was read.
    pub async fn delete_config_entry<E: ConfigEntry>(
        &self,
        name: &str,
        namespace: Option<&str>,
        cas: Option<u64>,
    ) -> Result<bool, ConsulError> {
        check_entry_name(E::KIND, name, namespace)?;
        let what = format!("DELETE {} {name}", E::KIND);
        let mut call = Call::new(Method::DELETE, entry_path(E::KIND, name)?, &what);
        if let Some(cas) = cas {
            call = call.query("cas", cas.to_string());
        }
        let response = self.send(self.with_ns(call, namespace)).await?;
        // 1.8 answers `{}`, newer versions `{"Deleted": bool}` (or `true`).
        if let Ok(result) = serde_json::from_slice::<DeleteResult>(&response.body) {
            return Ok(result.deleted);
        }
        Ok(serde_json::from_slice::<bool>(&response.body).unwrap_or(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_a_read_modify_write_but_read_only_ones_do_not() {
        let json = serde_json::json!({
            "Kind": "service-intentions", "Name": "api",
            "Sources": [{"Name": "web", "Action": "allow", "Precedence": 9, "Type": "consul",
                         "LegacyID": "x", "LegacyMeta": {"a": "b"}}],
            "JWT": {"Providers": []},
            "Meta": {"team": "ops"}, "CreateIndex": 5, "ModifyIndex": 7, "Hash": 1
        });
        let mut entry: ServiceIntentionsEntry = serde_json::from_value(json).unwrap();
        assert_eq!(entry.modify_index, 7);
        assert_eq!(entry.sources[0].legacy_meta.as_ref().unwrap()["a"], "b");
        entry.strip_read_only();
        let written = serde_json::to_value(&entry).unwrap();
        assert_eq!(
            written,
            serde_json::json!({
                "Kind": "service-intentions", "Name": "api",
                "Sources": [{"Name": "web", "Action": "allow", "Type": "consul"}],
                "JWT": {"Providers": []}, "Meta": {"team": "ops"}
            })
        );
    }
}

/// `/v1/config/<kind>/<name>`. The writer refuses non-Kubernetes names at its gRPC boundary;
/// this is the second line of defence where the path is built: a name must never be able to
/// address another endpoint (`..`, `/`, `?`) with the writer's token. Consul decodes `%2F`
/// before cleaning the path, so percent-encoding alone is not enough. `*` names only a
/// `service-intentions` entry (the managed default deny's destination).
pub(crate) fn entry_path(kind: &str, name: &str) -> Result<String, ConsulError> {
    check_entry_name(kind, name, None)?;
    Ok(format!("/v1/config/{kind}/{name}"))
}

/// Refuses a config entry name or namespace outside the shared rule (see [`entry_path`]).
fn check_entry_name(kind: &str, name: &str, namespace: Option<&str>) -> Result<(), ConsulError> {
    use consul_smi_core::names::{WILDCARD, name_problem};
    let wildcard = |value: &str| kind == SERVICE_INTENTIONS && value == WILDCARD;
    let fields = [("name", Some(name)), ("namespace", namespace)];
    for (field, value) in fields {
        let Some(value) = value else { continue };
        if !wildcard(value)
            && let Some(problem) = name_problem(value)
        {
            return Err(ConsulError::Refused {
                what: format!("{kind} {}", consul_smi_core::text::excerpt(name, 64)),
                message: format!(
                    "the {field} \"{}\" {problem}, so it cannot be part of a Consul API request",
                    consul_smi_core::text::excerpt(value, 64)
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod entry_path_tests {
    use super::entry_path;

    #[test]
    fn names_stay_one_path_segment() {
        assert_eq!(
            entry_path("service-splitter", "api-v1").unwrap(),
            "/v1/config/service-splitter/api-v1"
        );
        for bad in ["a/../acl?x", "..", "", "x%2F..%2Fapi", "*", "../../kv/x"] {
            assert!(entry_path("service-splitter", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            entry_path("service-intentions", "*").unwrap(),
            "/v1/config/service-intentions/*"
        );
    }
}
