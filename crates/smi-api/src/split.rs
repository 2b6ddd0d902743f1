//! split.smi-spec.io: TrafficSplit v1alpha1–v1alpha4.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::common::{WEIGHTS_IN_MILLIS_ANNOTATION, annotation, join, set_annotation};
use crate::error::FieldError;
use crate::hub::{self, Weight};
use crate::quantity::{format_weight, parse_weight};

/// A v1alpha1 weight: a Kubernetes Quantity (`10m`, `1`, `500m`), parsed exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantityWeight(pub Weight);

impl Serialize for QuantityWeight {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(&format_weight(self.0))
    }
}

impl<'de> Deserialize<'de> for QuantityWeight {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct QuantityVisitor;
        impl Visitor<'_> for QuantityVisitor {
            type Value = QuantityWeight;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a quantity such as 1, 500m or 10m")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_weight(v).map(QuantityWeight).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                if !v.is_finite() {
                    return Err(E::custom(format!("invalid quantity {v}")));
                }
                self.visit_str(&v.to_string())
            }
        }
        de.deserialize_any(QuantityVisitor)
    }
}

impl JsonSchema for QuantityWeight {
    fn schema_name() -> Cow<'static, str> {
        "QuantityWeight".into()
    }
    fn schema_id() -> Cow<'static, str> {
        concat!(module_path!(), "::QuantityWeight").into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // The structural-schema form of a Quantity: int-or-string, restricted to what
        // `parse_weight` accepts (no sign but `+`).
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^\\+?([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$"}
            ]
        })
    }
}

/// A v1alpha2+ weight: a non-negative integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct IntWeight(pub u64);

impl<'de> Deserialize<'de> for IntWeight {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct IntVisitor;
        impl Visitor<'_> for IntVisitor {
            type Value = IntWeight;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative integer weight")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(IntWeight(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(IntWeight)
                    .map_err(|_| E::custom(format!("weight must not be negative, got {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                if v.fract() == 0.0 && v >= 0.0 && v <= u64::MAX as f64 {
                    Ok(IntWeight(v as u64))
                } else {
                    Err(E::custom(format!(
                        "weight must be a non-negative integer, got {v}"
                    )))
                }
            }
        }
        de.deserialize_any(IntVisitor)
    }
}

impl JsonSchema for IntWeight {
    fn schema_name() -> Cow<'static, str> {
        "IntWeight".into()
    }
    fn schema_id() -> Cow<'static, str> {
        concat!(module_path!(), "::IntWeight").into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "integer", "format": "int64", "minimum": 0})
    }
}

/// A backend of a v1alpha1 split.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendV1alpha1 {
    /// Name of the Kubernetes service.
    pub service: String,
    /// Traffic weight of this backend (a Quantity, relative to the other backends).
    pub weight: QuantityWeight,
}

/// A backend of a v1alpha2+ split.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// Name of the Kubernetes service.
    pub service: String,
    /// Traffic weight of this backend, relative to the other backends.
    pub weight: IntWeight,
}

/// The only kind a split may match on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RouteGroupKind {
    HTTPRouteGroup,
}

/// A TypedLocalObjectReference to an HTTPRouteGroup (v1alpha3+ `matches[]`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteGroupRef {
    /// Kind of the matching group.
    pub kind: RouteGroupKind,
    /// Name of the matching group.
    pub name: String,
    /// API group of the matching group (specs.smi-spec.io).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
}

fn check_service(service: &str, prefix: &str) -> Result<(), FieldError> {
    if service.is_empty() {
        return Err(FieldError::invalid(
            join(prefix, "service"),
            "must not be empty",
        ));
    }
    Ok(())
}

fn backends_to_hub<'a>(
    backends: impl ExactSizeIterator<Item = (&'a str, Weight)>,
    prefix: &str,
) -> Result<Vec<hub::TrafficSplitBackend>, FieldError> {
    let field = join(prefix, "backends");
    if backends.len() == 0 {
        return Err(FieldError::invalid(
            field,
            "at least one backend is required",
        ));
    }
    backends
        .enumerate()
        .map(|(i, (service, weight))| {
            if service.is_empty() {
                return Err(FieldError::invalid(
                    format!("{field}[{i}].service"),
                    "must not be empty",
                ));
            }
            Ok(hub::TrafficSplitBackend {
                service: service.to_string(),
                weight,
            })
        })
        .collect()
}

/// v1alpha2+ integer weights, in thousandths when the conversion annotation says so.
fn int_backends_to_hub(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    backends: &[Backend],
    prefix: &str,
) -> Result<Vec<hub::TrafficSplitBackend>, FieldError> {
    let in_millis = annotation(metadata, WEIGHTS_IN_MILLIS_ANNOTATION) == Some("true");
    let mut weights = Vec::with_capacity(backends.len());
    for (i, b) in backends.iter().enumerate() {
        let weight = if in_millis {
            Weight { millis: b.weight.0 }
        } else {
            Weight {
                millis: b.weight.0.checked_mul(1000).ok_or_else(|| {
                    FieldError::invalid(
                        format!("{}[{i}].weight", join(prefix, "backends")),
                        "too large",
                    )
                })?,
            }
        };
        weights.push((b.service.as_str(), weight));
    }
    backends_to_hub(weights.into_iter(), prefix)
}

/// Integer weights for v1alpha2+: whole units when exact, else thousandths plus the annotation.
fn int_backends_from_hub(
    split: &hub::TrafficSplit,
    metadata: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Vec<Backend> {
    let whole = split
        .backends
        .iter()
        .all(|b| b.weight.millis.is_multiple_of(1000));
    if !whole {
        set_annotation(metadata, WEIGHTS_IN_MILLIS_ANNOTATION, "true".to_string());
    }
    split
        .backends
        .iter()
        .map(|b| Backend {
            service: b.service.clone(),
            weight: IntWeight(if whole {
                b.weight.millis / 1000
            } else {
                b.weight.millis
            }),
        })
        .collect()
}

fn matches_to_hub(
    matches: &[RouteGroupRef],
    prefix: &str,
) -> Result<Vec<hub::RouteRef>, FieldError> {
    matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if m.name.is_empty() {
                return Err(FieldError::invalid(
                    format!("{}[{i}].name", join(prefix, "matches")),
                    "must not be empty",
                ));
            }
            Ok(hub::RouteRef {
                kind: "HTTPRouteGroup".to_string(),
                name: m.name.clone(),
                api_group: m.api_group.clone(),
            })
        })
        .collect()
}

fn matches_from_hub(
    matches: &[hub::RouteRef],
    prefix: &str,
) -> Result<Vec<RouteGroupRef>, FieldError> {
    matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if m.kind != "HTTPRouteGroup" {
                return Err(FieldError::not_expressible(
                    format!("{}[{i}].kind", join(prefix, "matches")),
                    format!(
                        "a TrafficSplit can only match HTTPRouteGroups, not {:?}",
                        m.kind
                    ),
                ));
            }
            Ok(RouteGroupRef {
                kind: RouteGroupKind::HTTPRouteGroup,
                name: m.name.clone(),
                api_group: m.api_group.clone(),
            })
        })
        .collect()
}

/// split v1alpha1/v1alpha2 have no `matches`: a stored object's matches travel in
/// [`SPLIT_MATCHES_ANNOTATION`](crate::common::SPLIT_MATCHES_ANNOTATION) when it is read
/// through them (the API server converts every stored object into every served version).
fn matches_to_annotation(split: &hub::TrafficSplit, metadata: &mut ObjectMeta) {
    if !split.matches.is_empty() {
        let value = serde_json::to_string(&split.matches).unwrap_or_default();
        crate::common::set_annotation(metadata, crate::common::SPLIT_MATCHES_ANNOTATION, value);
    }
}

fn matches_from_annotation(metadata: &ObjectMeta) -> Result<Vec<hub::RouteRef>, FieldError> {
    match crate::common::annotation(metadata, crate::common::SPLIT_MATCHES_ANNOTATION) {
        None => Ok(Vec::new()),
        Some(text) => serde_json::from_str(text).map_err(|e| {
            FieldError::invalid(
                format!(
                    "metadata.annotations[{}]",
                    crate::common::SPLIT_MATCHES_ANNOTATION
                ),
                e.to_string(),
            )
        }),
    }
}

fn expect_split(obj: &hub::SmiObject) -> Result<&hub::TrafficSplit, FieldError> {
    match obj {
        hub::SmiObject::TrafficSplit(s) => Ok(s),
        other => Err(crate::common::wrong_kind(hub::SmiKind::TrafficSplit, other)),
    }
}

/// v1alpha1: weights are Quantities.
pub mod v1alpha1 {
    use super::*;
    use crate::common::{meta_from_hub, meta_to_hub, versioned};
    use kube::CustomResource;

    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
    #[kube(
        group = "split.smi-spec.io",
        version = "v1alpha1",
        kind = "TrafficSplit",
        namespaced,
        shortname = "ts",
        derive = "PartialEq"
    )]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct TrafficSplitSpec {
        /// The apex service of this split.
        pub service: String,
        /// The backend services of this split.
        #[schemars(length(min = 1))]
        pub backends: Vec<BackendV1alpha1>,
    }
    versioned!(
        TrafficSplit,
        TrafficSplitSpec,
        hub::SmiKind::TrafficSplit,
        "v1alpha1",
        None
    );

    fn to_hub(s: &TrafficSplit, prefix: &str) -> Result<hub::SmiObject, FieldError> {
        check_service(&s.spec.service, prefix)?;
        Ok(hub::SmiObject::TrafficSplit(hub::TrafficSplit {
            meta: meta_to_hub(&s.metadata, "split.smi-spec.io/v1alpha1"),
            service: s.spec.service.clone(),
            backends: backends_to_hub(
                s.spec
                    .backends
                    .iter()
                    .map(|b| (b.service.as_str(), b.weight.0)),
                prefix,
            )?,
            matches: matches_from_annotation(&s.metadata)?,
        }))
    }

    fn from_hub(obj: &hub::SmiObject, _prefix: &str) -> Result<TrafficSplit, FieldError> {
        let s = expect_split(obj)?;
        let spec = TrafficSplitSpec {
            service: s.service.clone(),
            backends: s
                .backends
                .iter()
                .map(|b| BackendV1alpha1 {
                    service: b.service.clone(),
                    weight: QuantityWeight(b.weight),
                })
                .collect(),
        };
        let mut root = TrafficSplit::new(&s.meta.name, spec);
        root.metadata = meta_from_hub(&s.meta);
        matches_to_annotation(s, &mut root.metadata);
        Ok(root)
    }
}

/// v1alpha2: integer weights.
pub mod v1alpha2 {
    use super::*;
    use crate::common::{meta_from_hub, meta_to_hub, versioned};
    use kube::CustomResource;

    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
    #[kube(
        group = "split.smi-spec.io",
        version = "v1alpha2",
        kind = "TrafficSplit",
        namespaced,
        shortname = "ts",
        derive = "PartialEq"
    )]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct TrafficSplitSpec {
        /// The apex service of this split.
        pub service: String,
        /// The backend services of this split.
        #[schemars(length(min = 1))]
        pub backends: Vec<Backend>,
    }
    versioned!(
        TrafficSplit,
        TrafficSplitSpec,
        hub::SmiKind::TrafficSplit,
        "v1alpha2",
        None
    );

    fn to_hub(s: &TrafficSplit, prefix: &str) -> Result<hub::SmiObject, FieldError> {
        check_service(&s.spec.service, prefix)?;
        Ok(hub::SmiObject::TrafficSplit(hub::TrafficSplit {
            meta: meta_to_hub(&s.metadata, "split.smi-spec.io/v1alpha2"),
            service: s.spec.service.clone(),
            backends: int_backends_to_hub(&s.metadata, &s.spec.backends, prefix)?,
            matches: matches_from_annotation(&s.metadata)?,
        }))
    }

    fn from_hub(obj: &hub::SmiObject, _prefix: &str) -> Result<TrafficSplit, FieldError> {
        let s = expect_split(obj)?;
        let mut metadata = meta_from_hub(&s.meta);
        matches_to_annotation(s, &mut metadata);
        let backends = int_backends_from_hub(s, &mut metadata);
        let mut root = TrafficSplit::new(
            &s.meta.name,
            TrafficSplitSpec {
                service: s.service.clone(),
                backends,
            },
        );
        root.metadata = metadata;
        Ok(root)
    }
}

macro_rules! split_with_matches {
    ($version:literal) => {
        use super::*;
        use crate::common::{meta_from_hub, meta_to_hub, versioned};
        use kube::CustomResource;

        #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
        #[kube(group = "split.smi-spec.io", version = $version, kind = "TrafficSplit", namespaced, shortname = "ts", derive = "PartialEq")]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct TrafficSplitSpec {
            /// The apex service of this split.
            pub service: String,
            /// The backend services of this split.
            #[schemars(length(min = 1))]
            pub backends: Vec<Backend>,
            /// The HTTP route groups this split applies to; omitted means all traffic.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub matches: Vec<RouteGroupRef>,
        }
        versioned!(TrafficSplit, TrafficSplitSpec, hub::SmiKind::TrafficSplit, $version, None);

        fn to_hub(s: &TrafficSplit, prefix: &str) -> Result<hub::SmiObject, FieldError> {
            check_service(&s.spec.service, prefix)?;
            Ok(hub::SmiObject::TrafficSplit(hub::TrafficSplit {
                meta: meta_to_hub(&s.metadata, concat!("split.smi-spec.io/", $version)),
                service: s.spec.service.clone(),
                backends: int_backends_to_hub(&s.metadata, &s.spec.backends, prefix)?,
                matches: matches_to_hub(&s.spec.matches, prefix)?,
            }))
        }

        fn from_hub(obj: &hub::SmiObject, prefix: &str) -> Result<TrafficSplit, FieldError> {
            let s = expect_split(obj)?;
            let mut metadata = meta_from_hub(&s.meta);
            let backends = int_backends_from_hub(s, &mut metadata);
            let spec = TrafficSplitSpec { service: s.service.clone(), backends, matches: matches_from_hub(&s.matches, prefix)? };
            let mut root = TrafficSplit::new(&s.meta.name, spec);
            root.metadata = metadata;
            Ok(root)
        }
    };
}

/// v1alpha3: adds `matches` (HTTPRouteGroup references).
pub mod v1alpha3 {
    split_with_matches!("v1alpha3");
}

/// v1alpha4 (final): same shape as v1alpha3.
pub mod v1alpha4 {
    split_with_matches!("v1alpha4");
}
