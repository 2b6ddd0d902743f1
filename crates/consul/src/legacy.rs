//! The ID-based intentions API (`/v1/connect/intentions`), the only one Consul < 1.9 has.
//! Consul 1.8 rejects unknown JSON fields, so the write body holds exactly 1.8's fields.

use std::collections::BTreeMap;

use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::client::{Blocking, Call, ConsulClient, Indexed};
use crate::error::ConsulError;

/// An intention as `GET /v1/connect/intentions` returns it (unknown fields ignored).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LegacyIntention {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(default)]
    pub description: String,
    #[serde(rename = "SourceNS", default)]
    pub source_ns: String,
    pub source_name: String,
    #[serde(rename = "DestinationNS", default)]
    pub destination_ns: String,
    pub destination_name: String,
    #[serde(default)]
    pub source_type: String,
    #[serde(default)]
    pub action: String,
    /// Only modern servers list L7 intentions here; never written by this module.
    #[serde(default)]
    pub permissions: Option<serde_json::Value>,
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub modify_index: u64,
}

/// The create/replace body: Consul 1.8.7's fields and nothing else.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct LegacyIntentionWrite {
    #[serde(rename = "SourceNS", skip_serializing_if = "Option::is_none")]
    pub source_ns: Option<String>,
    pub source_name: String,
    #[serde(rename = "DestinationNS", skip_serializing_if = "Option::is_none")]
    pub destination_ns: Option<String>,
    pub destination_name: String,
    pub source_type: &'static str,
    pub action: &'static str,
    pub description: String,
    pub meta: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Created {
    #[serde(rename = "ID")]
    id: String,
}

/// Escapes a value for a go-bexpr string literal in `?filter=`.
fn bexpr_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

impl ConsulClient {
    /// All intentions the token may read. Without a token Consul returns `[]`, not 403.
    pub async fn list_legacy_intentions(
        &self,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Vec<LegacyIntention>>, ConsulError> {
        let call = Call::new(
            Method::GET,
            "/v1/connect/intentions",
            "GET /v1/connect/intentions",
        )
        .blocking(blocking);
        self.get_indexed(call).await
    }

    /// The intentions of one source/destination name pair (any namespace).
    pub async fn find_legacy_intentions(
        &self,
        source_name: &str,
        destination_name: &str,
    ) -> Result<Vec<LegacyIntention>, ConsulError> {
        let what = format!("GET intention {source_name} -> {destination_name}");
        let filter = format!(
            "SourceName == {} and DestinationName == {}",
            bexpr_string(source_name),
            bexpr_string(destination_name)
        );
        let call = Call::new(Method::GET, "/v1/connect/intentions", &what).query("filter", filter);
        self.get_json(call).await
    }

    /// One intention by ID; `None` when it no longer exists.
    pub async fn get_legacy_intention(
        &self,
        what: &str,
        id: &str,
    ) -> Result<Option<LegacyIntention>, ConsulError> {
        // IDs come from Consul's own answers; anything but a UUID's characters is not one.
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(ConsulError::Decode {
                what: what.to_string(),
                message: format!("intention ID {id:?} is not a UUID"),
            });
        }
        let call = Call::new(Method::GET, format!("/v1/connect/intentions/{id}"), what);
        match self.get_json(call).await {
            Ok(intention) => Ok(Some(intention)),
            Err(e) if is_vanished(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates an intention; returns its ID. Consul has no upsert: a second intention for the
    /// same pair fails with a 500 `duplicate intention found`.
    pub async fn create_legacy_intention(
        &self,
        what: &str,
        body: &LegacyIntentionWrite,
    ) -> Result<String, ConsulError> {
        let call = Call::new(Method::POST, "/v1/connect/intentions", what).json(body)?;
        let created: Created = self.get_json(call).await?;
        Ok(created.id)
    }

    /// Replaces an intention: omitted fields (Meta, Description) are cleared.
    pub async fn update_legacy_intention(
        &self,
        what: &str,
        id: &str,
        body: &LegacyIntentionWrite,
    ) -> Result<(), ConsulError> {
        let call = Call::new(Method::PUT, intention_path(what, id)?, what).json(body)?;
        self.send(call).await.map(drop)
    }

    pub async fn delete_legacy_intention(&self, what: &str, id: &str) -> Result<(), ConsulError> {
        let call = Call::new(Method::DELETE, intention_path(what, id)?, what);
        self.send(call).await.map(drop)
    }
}

/// `/v1/connect/intentions/<id>`. Consul's IDs are UUIDs; anything else in the path could
/// address another endpoint with the writer's token.
fn intention_path(what: &str, id: &str) -> Result<String, ConsulError> {
    let uuid_like =
        (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if !uuid_like {
        return Err(ConsulError::Refused {
            what: what.to_string(),
            message: "the intention ID Consul listed is not a UUID".into(),
        });
    }
    Ok(format!("/v1/connect/intentions/{id}"))
}

/// Consul 1.8 answers 500 `duplicate intention found: ...` when the pair already exists.
pub fn is_duplicate(error: &ConsulError) -> bool {
    matches!(error, ConsulError::Validation { message, .. } if message.contains("duplicate intention found"))
}

/// Consul 1.8 answers 500 `Cannot modify/delete non-existent intention` for a vanished ID.
pub fn is_vanished(error: &ConsulError) -> bool {
    match error {
        ConsulError::Validation { message, .. } => message.contains("non-existent intention"),
        ConsulError::NotFound { .. } => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_body_has_only_consul_18_fields() {
        let body = LegacyIntentionWrite {
            source_ns: None,
            source_name: "web".into(),
            destination_ns: None,
            destination_name: "api".into(),
            source_type: "consul",
            action: "allow",
            description: "d".into(),
            meta: BTreeMap::new(),
        };
        let json = serde_json::to_value(&body).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "Action",
                "Description",
                "DestinationName",
                "Meta",
                "SourceName",
                "SourceType"
            ]
        );
    }

    #[test]
    fn filter_strings_are_escaped() {
        assert_eq!(bexpr_string(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
