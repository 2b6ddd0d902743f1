//! specs.smi-spec.io: HTTPRouteGroup and TCPRoute v1alpha1–v1alpha4, UDPRoute v1alpha4.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::common::join;
use crate::error::FieldError;
use crate::hub;

/// HTTP methods SMI allows in a match (RFC 7231 plus PATCH); `*` means any.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum HttpMethod {
    #[serde(rename = "*")]
    Any,
    GET,
    HEAD,
    PUT,
    POST,
    DELETE,
    CONNECT,
    OPTIONS,
    TRACE,
    PATCH,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Any => "*",
            HttpMethod::GET => "GET",
            HttpMethod::HEAD => "HEAD",
            HttpMethod::PUT => "PUT",
            HttpMethod::POST => "POST",
            HttpMethod::DELETE => "DELETE",
            HttpMethod::CONNECT => "CONNECT",
            HttpMethod::OPTIONS => "OPTIONS",
            HttpMethod::TRACE => "TRACE",
            HttpMethod::PATCH => "PATCH",
        }
    }

    fn parse(method: &str) -> Option<Self> {
        const ALL: [HttpMethod; 10] = [
            HttpMethod::Any,
            HttpMethod::GET,
            HttpMethod::HEAD,
            HttpMethod::PUT,
            HttpMethod::POST,
            HttpMethod::DELETE,
            HttpMethod::CONNECT,
            HttpMethod::OPTIONS,
            HttpMethod::TRACE,
            HttpMethod::PATCH,
        ];
        ALL.into_iter().find(|m| m.as_str() == method)
    }
}

/// One named HTTP match of an HTTPRouteGroup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    /// Name of the match, referenced from TrafficTarget rules.
    pub name: String,
    /// HTTP methods of this match; omitted or `*` means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<HttpMethod>,
    /// URI path regex of this match, anchored at the start (`^`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// Header name to value regex; all must match. A map, or a list of single-entry maps as
    /// smi-sdk-go's published CRDs required.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "headers_map_or_list"
    )]
    #[schemars(schema_with = "headers_schema")]
    pub headers: BTreeMap<String, String>,
}

/// A structural schema cannot say "map or list of maps", so the CRD leaves the shape to the
/// decoder (which rejects anything else with the field path); the JSON Schema for editors,
/// which can, gets the precise form ([`headers_json_schema`]).
fn headers_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"x-kubernetes-preserve-unknown-fields": true})
}

/// The precise JSON Schema of `headers`: a map, or a list of maps.
pub(crate) fn headers_json_schema() -> serde_json::Value {
    let map = serde_json::json!({"type": "object", "additionalProperties": {"type": "string"}});
    serde_json::json!({"anyOf": [map, {"type": "array", "items": map}]})
}

/// smi-sdk-go's published CRDs declare `headers` as a list of single-entry maps while its Go
/// types (and the spec examples) use one map; manifests written against either are accepted.
fn headers_map_or_list<'de, D: Deserializer<'de>>(
    de: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    use serde::de::Error;
    let expected = "a map of header name to value regex (or a list of such maps)";
    let mut merged = BTreeMap::new();
    let mut add = |map: serde_json::Map<String, serde_json::Value>| -> Result<(), D::Error> {
        for (name, regex) in map {
            let serde_json::Value::String(regex) = regex else {
                return Err(D::Error::custom(format!(
                    "header {name:?}: expected a string regex, got {regex}"
                )));
            };
            if merged.insert(name.clone(), regex).is_some() {
                return Err(D::Error::custom(format!("header {name:?} listed twice")));
            }
        }
        Ok(())
    };
    match Option::<serde_json::Value>::deserialize(de)? {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) => add(map)?,
        Some(serde_json::Value::Array(list)) => {
            for entry in list {
                let serde_json::Value::Object(map) = entry else {
                    return Err(D::Error::custom(format!(
                        "expected {expected}, got list entry {entry}"
                    )));
                };
                add(map)?;
            }
        }
        Some(other) => {
            return Err(D::Error::custom(format!(
                "expected {expected}, got {other}"
            )));
        }
    }
    Ok(merged)
}

fn matches_to_hub(matches: &[HttpMatch], field: &str) -> Result<Vec<hub::HttpMatch>, FieldError> {
    let mut seen = std::collections::BTreeSet::new();
    matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if m.name.is_empty() {
                return Err(FieldError::invalid(
                    format!("{field}[{i}].name"),
                    "must not be empty",
                ));
            }
            if !seen.insert(m.name.as_str()) {
                return Err(FieldError::invalid(
                    format!("{field}[{i}].name"),
                    format!(
                        "duplicate match name {:?}; TrafficTarget rules reference matches by name",
                        m.name
                    ),
                ));
            }
            Ok(hub::HttpMatch {
                name: m.name.clone(),
                methods: m.methods.iter().map(|x| x.as_str().to_string()).collect(),
                path_regex: m.path_regex.clone(),
                headers: m.headers.clone(),
            })
        })
        .collect()
}

fn matches_from_hub(matches: &[hub::HttpMatch], field: &str) -> Result<Vec<HttpMatch>, FieldError> {
    matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let methods = m
                .methods
                .iter()
                .enumerate()
                .map(|(j, method)| {
                    HttpMethod::parse(method).ok_or_else(|| {
                        FieldError::not_expressible(
                            format!("{field}[{i}].methods[{j}]"),
                            format!("{method:?} is not an SMI HTTP method"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(HttpMatch {
                name: m.name.clone(),
                methods,
                path_regex: m.path_regex.clone(),
                headers: m.headers.clone(),
            })
        })
        .collect()
}

/// `spec.matches` of v1alpha4 TCPRoute/UDPRoute.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortMatch {
    /// Name of this match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port numbers to match; empty means all ports.
    #[serde(default)]
    #[schemars(inner(range(min = 1, max = 65535)))]
    pub ports: Vec<u16>,
}

fn port_match_to_hub(
    m: &Option<PortMatch>,
    field: &str,
) -> Result<Option<hub::PortMatch>, FieldError> {
    let Some(m) = m else { return Ok(None) };
    if let Some(i) = m.ports.iter().position(|p| *p == 0) {
        return Err(FieldError::invalid(
            format!("{field}.ports[{i}]"),
            "must be between 1 and 65535",
        ));
    }
    Ok(Some(hub::PortMatch {
        name: m.name.clone(),
        ports: m.ports.clone(),
    }))
}

fn port_match_from_hub(m: &Option<hub::PortMatch>) -> Option<PortMatch> {
    m.as_ref().map(|m| PortMatch {
        name: m.name.clone(),
        ports: m.ports.clone(),
    })
}

/// Versions before v1alpha4 have no port matches: a v1alpha4 port restriction read through
/// them travels in [`PORT_MATCH_ANNOTATION`](crate::common::PORT_MATCH_ANNOTATION).
fn port_match_to_annotation(m: &Option<hub::PortMatch>, meta: &mut ObjectMeta) {
    if let Some(m) = m
        .as_ref()
        .filter(|m| !m.ports.is_empty() || m.name.is_some())
    {
        let value = serde_json::json!({ "name": m.name, "ports": m.ports });
        crate::common::set_annotation(
            meta,
            crate::common::PORT_MATCH_ANNOTATION,
            value.to_string(),
        );
    }
}

fn port_match_from_annotation(meta: &ObjectMeta) -> Result<Option<hub::PortMatch>, FieldError> {
    let Some(text) = crate::common::annotation(meta, crate::common::PORT_MATCH_ANNOTATION) else {
        return Ok(None);
    };
    let field = format!(
        "metadata.annotations[{}]",
        crate::common::PORT_MATCH_ANNOTATION
    );
    let parsed: PortMatch = serde_json::from_str(text).map_err(|e| {
        FieldError::invalid(
            field.clone(),
            format!("expected {{\"name\":..,\"ports\":[..]}}: {e}"),
        )
    })?;
    port_match_to_hub(&Some(parsed), &field)
}

fn expect_http(obj: &hub::SmiObject) -> Result<&hub::HttpRouteGroup, FieldError> {
    match obj {
        hub::SmiObject::HttpRouteGroup(h) => Ok(h),
        other => Err(crate::common::wrong_kind(
            hub::SmiKind::HTTPRouteGroup,
            other,
        )),
    }
}

fn expect_tcp(obj: &hub::SmiObject) -> Result<&hub::TcpRoute, FieldError> {
    match obj {
        hub::SmiObject::TcpRoute(t) => Ok(t),
        other => Err(crate::common::wrong_kind(hub::SmiKind::TCPRoute, other)),
    }
}

/// Generates one version's HTTPRouteGroup with its conversions.
macro_rules! http_route_group {
    ($version:literal, top_level) => {
        use kube::CustomResource;
        use crate::specs::*;
        use crate::common::{meta_from_hub, meta_to_hub, versioned};

        #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
        #[kube(group = "specs.smi-spec.io", version = $version, kind = "HTTPRouteGroup", namespaced, no_spec, shortname = "htr", derive = "PartialEq")]
        #[serde(rename_all = "camelCase")]
        pub struct HTTPRouteGroupFields {
            /// Match conditions of this route group.
            pub matches: Vec<HttpMatch>,
        }
        versioned!(HTTPRouteGroup, HTTPRouteGroupFields, hub::SmiKind::HTTPRouteGroup, $version, Some(&["matches"]));
        fn to_hub(r: &HTTPRouteGroup, prefix: &str) -> Result<hub::SmiObject, FieldError> {
            Ok(hub::SmiObject::HttpRouteGroup(hub::HttpRouteGroup {
                meta: meta_to_hub(&r.metadata, concat!("specs.smi-spec.io/", $version)),
                matches: matches_to_hub(&r.spec.matches, &join(prefix, "matches"))?,
            }))
        }
        fn from_hub(obj: &hub::SmiObject, prefix: &str) -> Result<HTTPRouteGroup, FieldError> {
            let h = expect_http(obj)?;
            let fields = HTTPRouteGroupFields { matches: matches_from_hub(&h.matches, &join(prefix, "matches"))? };
            let mut root = HTTPRouteGroup::new(&h.meta.name, fields);
            root.metadata = meta_from_hub(&h.meta);
            Ok(root)
        }
    };
    ($version:literal, spec) => {
        use kube::CustomResource;
        use crate::specs::*;
        use crate::common::{meta_from_hub, meta_to_hub, versioned};

        #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
        #[kube(group = "specs.smi-spec.io", version = $version, kind = "HTTPRouteGroup", namespaced, shortname = "htr", derive = "PartialEq")]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct HTTPRouteGroupSpec {
            /// Match conditions of this route group.
            pub matches: Vec<HttpMatch>,
        }
        versioned!(HTTPRouteGroup, HTTPRouteGroupSpec, hub::SmiKind::HTTPRouteGroup, $version, None);
        fn to_hub(r: &HTTPRouteGroup, prefix: &str) -> Result<hub::SmiObject, FieldError> {
            Ok(hub::SmiObject::HttpRouteGroup(hub::HttpRouteGroup {
                meta: meta_to_hub(&r.metadata, concat!("specs.smi-spec.io/", $version)),
                matches: matches_to_hub(&r.spec.matches, &join(prefix, "matches"))?,
            }))
        }
        fn from_hub(obj: &hub::SmiObject, prefix: &str) -> Result<HTTPRouteGroup, FieldError> {
            let h = expect_http(obj)?;
            let spec = HTTPRouteGroupSpec { matches: matches_from_hub(&h.matches, &join(prefix, "matches"))? };
            let mut root = HTTPRouteGroup::new(&h.meta.name, spec);
            root.metadata = meta_from_hub(&h.meta);
            Ok(root)
        }
    };
}

/// Generates a TCPRoute of a version before v1alpha4 (no fields; all ports).
macro_rules! empty_tcp_route {
    ($version:literal, [$($kube_attr:tt)*], [$(#[$serde_attr:meta])*]) => {
        use kube::CustomResource;
        use crate::specs::*;
        use crate::common::{meta_from_hub, meta_to_hub, versioned};

        /// TCPRoute before v1alpha4 carries no fields: it stands for all TCP traffic.
        #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
        #[kube(group = "specs.smi-spec.io", version = $version, kind = "TCPRoute", namespaced, $($kube_attr)* shortname = "tr", derive = "PartialEq")]
        $(#[$serde_attr])*
        pub struct TCPRouteSpec {}
        fn to_hub(r: &TCPRoute, _prefix: &str) -> Result<hub::SmiObject, FieldError> {
            Ok(hub::SmiObject::TcpRoute(hub::TcpRoute {
                meta: meta_to_hub(&r.metadata, concat!("specs.smi-spec.io/", $version)),
                matches: port_match_from_annotation(&r.metadata)?,
            }))
        }
        fn from_hub(obj: &hub::SmiObject, _prefix: &str) -> Result<TCPRoute, FieldError> {
            let t = expect_tcp(obj)?;
            let mut root = TCPRoute::new(&t.meta.name, TCPRouteSpec {});
            root.metadata = meta_from_hub(&t.meta);
            port_match_to_annotation(&t.matches, &mut root.metadata);
            Ok(root)
        }
    };
}

/// v1alpha1: HTTPRouteGroup fields at the top level; TCPRoute has no fields at all.
pub mod v1alpha1 {
    /// HTTPRouteGroup v1alpha1.
    pub mod http {
        http_route_group!("v1alpha1", top_level);
    }
    /// TCPRoute v1alpha1.
    pub mod tcp {
        empty_tcp_route!("v1alpha1", [no_spec,], []);
        // The root's `spec` is flattened away; serde(deny_unknown_fields) is not used on the
        // root, so top-level keys are checked by the decoder.
        versioned!(
            TCPRoute,
            TCPRouteSpec,
            hub::SmiKind::TCPRoute,
            "v1alpha1",
            Some(&[])
        );
    }
    pub use http::{HTTPRouteGroup, HTTPRouteGroupFields};
    pub use tcp::{TCPRoute, TCPRouteSpec};
}

/// v1alpha2: HTTPRouteGroup still top level (headers documented from here on).
pub mod v1alpha2 {
    /// HTTPRouteGroup v1alpha2.
    pub mod http {
        http_route_group!("v1alpha2", top_level);
    }
    /// TCPRoute v1alpha2.
    pub mod tcp {
        empty_tcp_route!("v1alpha2", [no_spec,], []);
        versioned!(
            TCPRoute,
            TCPRouteSpec,
            hub::SmiKind::TCPRoute,
            "v1alpha2",
            Some(&[])
        );
    }
    pub use http::{HTTPRouteGroup, HTTPRouteGroupFields};
    pub use tcp::{TCPRoute, TCPRouteSpec};
}

/// v1alpha3: both wrapped in `spec`; TCPRoute `spec: {}`.
pub mod v1alpha3 {
    /// HTTPRouteGroup v1alpha3.
    pub mod http {
        http_route_group!("v1alpha3", spec);
    }
    /// TCPRoute v1alpha3.
    pub mod tcp {
        empty_tcp_route!("v1alpha3", [], [#[serde(deny_unknown_fields)]]);
        versioned!(
            TCPRoute,
            TCPRouteSpec,
            hub::SmiKind::TCPRoute,
            "v1alpha3",
            None,
            spec_optional = true
        );
    }
    pub use http::{HTTPRouteGroup, HTTPRouteGroupSpec};
    pub use tcp::{TCPRoute, TCPRouteSpec};
}

/// v1alpha4 (final): TCPRoute gains port matches; UDPRoute appears with the same shape.
pub mod v1alpha4 {
    /// HTTPRouteGroup v1alpha4.
    pub mod http {
        http_route_group!("v1alpha4", spec);
    }
    pub use http::{HTTPRouteGroup, HTTPRouteGroupSpec};

    use super::*;
    use crate::common::{meta_from_hub, meta_to_hub, versioned};
    use kube::CustomResource;

    #[derive(
        CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema,
    )]
    #[kube(
        group = "specs.smi-spec.io",
        version = "v1alpha4",
        kind = "TCPRoute",
        namespaced,
        shortname = "tr",
        derive = "PartialEq"
    )]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct TCPRouteSpec {
        /// Match conditions of this route; omitted means all ports.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub matches: Option<PortMatch>,
    }
    versioned!(
        TCPRoute,
        TCPRouteSpec,
        hub::SmiKind::TCPRoute,
        "v1alpha4",
        None,
        spec_optional = true
    );

    fn to_hub(r: &TCPRoute, prefix: &str) -> Result<hub::SmiObject, FieldError> {
        Ok(hub::SmiObject::TcpRoute(hub::TcpRoute {
            meta: meta_to_hub(&r.metadata, "specs.smi-spec.io/v1alpha4"),
            matches: port_match_to_hub(&r.spec.matches, &join(prefix, "matches"))?,
        }))
    }

    fn from_hub(obj: &hub::SmiObject, _prefix: &str) -> Result<TCPRoute, FieldError> {
        let t = expect_tcp(obj)?;
        let mut root = TCPRoute::new(
            &t.meta.name,
            TCPRouteSpec {
                matches: port_match_from_hub(&t.matches),
            },
        );
        root.metadata = meta_from_hub(&t.meta);
        Ok(root)
    }

    /// UDPRoute v1alpha4 (its only version).
    pub mod udp {
        use crate::common::{meta_from_hub, meta_to_hub, versioned};
        use crate::specs::*;
        use kube::CustomResource;

        #[derive(
            CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema,
        )]
        #[kube(
            group = "specs.smi-spec.io",
            version = "v1alpha4",
            kind = "UDPRoute",
            namespaced,
            shortname = "ur",
            derive = "PartialEq"
        )]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct UDPRouteSpec {
            /// Match conditions of this route; omitted means all ports.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub matches: Option<PortMatch>,
        }
        versioned!(
            UDPRoute,
            UDPRouteSpec,
            hub::SmiKind::UDPRoute,
            "v1alpha4",
            None,
            spec_optional = true
        );

        fn to_hub(r: &UDPRoute, prefix: &str) -> Result<hub::SmiObject, FieldError> {
            Ok(hub::SmiObject::UdpRoute(hub::UdpRoute {
                meta: meta_to_hub(&r.metadata, "specs.smi-spec.io/v1alpha4"),
                matches: port_match_to_hub(&r.spec.matches, &join(prefix, "matches"))?,
            }))
        }

        fn from_hub(obj: &hub::SmiObject, _prefix: &str) -> Result<UDPRoute, FieldError> {
            let hub::SmiObject::UdpRoute(u) = obj else {
                return Err(crate::common::wrong_kind(hub::SmiKind::UDPRoute, obj));
            };
            let mut root = UDPRoute::new(
                &u.meta.name,
                UDPRouteSpec {
                    matches: port_match_from_hub(&u.matches),
                },
            );
            root.metadata = meta_from_hub(&u.meta);
            Ok(root)
        }
    }
    pub use udp::{UDPRoute, UDPRouteSpec};
}
