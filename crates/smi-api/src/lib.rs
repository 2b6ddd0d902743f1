//! SMI resource types for every published version, the hub model they all convert into,
//! and decoding of API-server objects and YAML manifests into the hub.
//!
//! - [`access`], [`specs`], [`split`]: one typed Kubernetes resource per kind and version
//!   (`kube::CustomResource`; versions that keep their fields at the top level use
//!   `#[kube(no_spec)]`).
//! - [`hub`]: the version-independent model everything downstream uses.
//! - [`decode_object`] / [`decode_manifests`] / [`encode_object`]: any version <-> hub.
//! - [`convert_review`]: the CRD conversion webhook's logic.
//! - [`crds`]: the CustomResourceDefinitions, one per kind, serving every version.

// DecodeError is a flat struct of what is known about the failing object; errors are the cold
// path, and public fields are easier to match on than a boxed inner value.
#![allow(clippy::result_large_err)]

pub mod access;
mod common;
pub mod crd;
mod decode;
mod error;
pub mod hub;
pub mod quantity;
pub mod specs;
pub mod split;

pub use common::{
    CONVERSION_ANNOTATIONS, DESTINATION_PORT_ANNOTATION, PORT_MATCH_ANNOTATION,
    SPLIT_MATCHES_ANNOTATION, UNEXPRESSED_RULES_ANNOTATION, WEIGHTS_IN_MILLIS_ANNOTATION,
};
pub use crd::{CrdConversion, WebhookTarget, crds};
pub use decode::{
    MAX_OBJECT_BYTES, convert_review, decode_manifests, decode_object, encode_object,
    served_versions, storage_version,
};
pub use error::{DecodeError, DecodeErrorKind};
pub use hub::*;
