//! Pieces shared by all versioned types: metadata <-> hub, annotations that carry values an
//! older or newer version cannot hold, and the `Versioned` glue that decoding, encoding and
//! CRD generation iterate over.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::object::HasSpec;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::FieldError;
use crate::hub::{self, SmiKind, SmiObject};

/// access v1alpha1/v1alpha2 `destination.port` has no field in v1alpha3 (the storage version);
/// the conversion keeps it here so reading the object back as v1alpha1 returns the port.
pub const DESTINATION_PORT_ANNOTATION: &str = "consul-smi.io/destination-port";
/// split v1alpha1 weights are Quantities (`10m`); v1alpha2+ weights are integers. When a
/// weight is not a whole number, the newer version stores every weight in thousandths and sets
/// this annotation, which keeps proportions and the original values exact.
pub const WEIGHTS_IN_MILLIS_ANNOTATION: &str = "consul-smi.io/weights-in-millis";

/// specs v1alpha4 TCPRoute `spec.matches` (ports) has no field before v1alpha4. The API
/// server converts every stored object into every served version (its per-version watch
/// caches), so a conversion that fails is retried forever and breaks listing that version:
/// the ports travel in this annotation (JSON `{"name":..,"ports":[..]}`) instead.
pub const PORT_MATCH_ANNOTATION: &str = "consul-smi.io/port-match";

/// access v1alpha1/v1alpha2 rules cannot reference a UDPRoute: such rules of a stored
/// v1alpha3 object travel here (JSON `[{"index":i,"rule":{..}}]`) when it is read through
/// those versions, for the same reason as [`PORT_MATCH_ANNOTATION`].
pub const UNEXPRESSED_RULES_ANNOTATION: &str = "consul-smi.io/unexpressed-rules";
/// split v1alpha1/v1alpha2 have no `matches`: a stored object's matches travel here (JSON).
pub const SPLIT_MATCHES_ANNOTATION: &str = "consul-smi.io/split-matches";

/// Annotations owned by conversion; a conversion rewrites them and leaves all others alone.
pub const CONVERSION_ANNOTATIONS: [&str; 5] = [
    DESTINATION_PORT_ANNOTATION,
    WEIGHTS_IN_MILLIS_ANNOTATION,
    PORT_MATCH_ANNOTATION,
    UNEXPRESSED_RULES_ANNOTATION,
    SPLIT_MATCHES_ANNOTATION,
];

pub(crate) fn meta_to_hub(meta: &ObjectMeta, api_version: &str) -> hub::Meta {
    hub::Meta {
        namespace: meta
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_string()),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        generation: meta.generation,
        labels: meta.labels.clone().unwrap_or_default(),
        api_version: api_version.to_string(),
    }
}

pub(crate) fn meta_from_hub(meta: &hub::Meta) -> ObjectMeta {
    ObjectMeta {
        name: Some(meta.name.clone()).filter(|n| !n.is_empty()),
        namespace: Some(meta.namespace.clone()).filter(|n| !n.is_empty()),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        generation: meta.generation,
        labels: Some(meta.labels.clone()).filter(|l| !l.is_empty()),
        ..ObjectMeta::default()
    }
}

pub(crate) fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

pub(crate) fn set_annotation(meta: &mut ObjectMeta, key: &str, value: String) {
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(key.to_string(), value);
}

pub(crate) fn join(prefix: &str, field: &str) -> String {
    crate::error::join_path(prefix, field)
}

/// One SMI kind at one version, as a typed Kubernetes object.
pub(crate) trait Versioned:
    Sized + Serialize + HasSpec<Spec = Self::Body> + kube::CustomResourceExt
{
    const KIND: SmiKind;
    const VERSION: &'static str;
    /// `None` when the fields live under `spec`; otherwise the top-level field names
    /// (v1alpha1 TrafficTarget, v1alpha1/v1alpha2 HTTPRouteGroup and TCPRoute).
    const TOP_LEVEL_FIELDS: Option<&'static [&'static str]>;
    /// Whether a missing `spec` is read as `spec: {}` (route kinds whose spec may be empty).
    const SPEC_OPTIONAL: bool = false;
    type Body: DeserializeOwned;

    fn assemble(metadata: ObjectMeta, body: Self::Body) -> Self;
    /// Converts into the hub; `prefix` is where the body's fields live ("spec" or "").
    fn to_hub(&self, prefix: &str) -> Result<SmiObject, FieldError>;
    fn from_hub(obj: &SmiObject, prefix: &str) -> Result<Self, FieldError>;
}

/// Implements the boilerplate of [`Versioned`] for a kube-derived root type.
macro_rules! versioned {
    ($root:ty, $body:ty, $kind:expr, $version:literal, $fields:expr $(, spec_optional = $opt:literal)?) => {
        impl $crate::common::Versioned for $root {
            const KIND: $crate::hub::SmiKind = $kind;
            const VERSION: &'static str = $version;
            const TOP_LEVEL_FIELDS: Option<&'static [&'static str]> = $fields;
            $(const SPEC_OPTIONAL: bool = $opt;)?
            type Body = $body;

            fn assemble(
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                body: Self::Body,
            ) -> Self {
                let mut root = <$root>::new("", body);
                root.metadata = metadata;
                root
            }

            fn to_hub(&self, prefix: &str) -> Result<$crate::hub::SmiObject, $crate::error::FieldError> {
                to_hub(self, prefix)
            }

            fn from_hub(obj: &$crate::hub::SmiObject, prefix: &str) -> Result<Self, $crate::error::FieldError> {
                from_hub(obj, prefix)
            }
        }
    };
}
pub(crate) use versioned;

/// The hub object of the expected kind, or an error (never happens through the public API,
/// which dispatches on the hub kind).
pub(crate) fn wrong_kind(expected: SmiKind, got: &SmiObject) -> FieldError {
    FieldError::invalid(
        "kind",
        format!("cannot encode a {} as {expected}", got.kind()),
    )
}
