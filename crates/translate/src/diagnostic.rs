//! What the translation says about each object: problems that changed what it produces.

use std::fmt;

use consul_smi_api::ObjectRef;

/// [`Severity::Error`]: the object (or the named part) produces *less* than it asks for, e.g.
/// a rule naming a missing route grants nothing. [`Severity::Warning`]: it was translated, but
/// Consul enforces something broader or merged, e.g. a port that intentions cannot express.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "Warning",
            Severity::Error => "Error",
        }
    }
}

/// One finding about one field of one SMI object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    pub object: ObjectRef,
    pub severity: Severity,
    /// Path of the field in the manifest as written for the object's apiVersion, e.g.
    /// `spec.rules[0].name` (access v1alpha2+) or `specs[0].name` (access v1alpha1).
    pub field: String,
    /// Stable machine-readable identifier, one of [`codes`].
    pub code: &'static str,
    pub message: String,
}

impl Diagnostic {
    pub(crate) fn new(
        object: &ObjectRef,
        severity: Severity,
        field: impl Into<String>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            object: object.clone(),
            severity,
            field: field.into(),
            code,
            message: message.into(),
        }
    }

    pub(crate) fn error(
        object: &ObjectRef,
        field: impl Into<String>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic::new(object, Severity::Error, field, code, message)
    }

    pub(crate) fn warning(
        object: &ObjectRef,
        field: impl Into<String>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic::new(object, Severity::Warning, field, code, message)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}: {} ({})",
            self.severity.as_str(),
            self.object,
            self.field,
            self.message,
            self.code
        )
    }
}

/// Summary status of one object known to the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    Ok,
    Warnings,
    Errors,
}

/// One object with all diagnostics that currently apply to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStatus<'a> {
    pub object: &'a ObjectRef,
    pub status: Status,
    pub diagnostics: Vec<&'a Diagnostic>,
}

impl<'a> ObjectStatus<'a> {
    pub(crate) fn new(object: &'a ObjectRef, mut diagnostics: Vec<&'a Diagnostic>) -> Self {
        diagnostics.sort();
        let status = match diagnostics.iter().map(|d| d.severity).max() {
            None => Status::Ok,
            Some(Severity::Warning) => Status::Warnings,
            Some(Severity::Error) => Status::Errors,
        };
        ObjectStatus {
            object,
            status,
            diagnostics,
        }
    }
}

/// Stable diagnostic codes.
pub mod codes {
    /// A subject's `kind` is not `ServiceAccount` (e.g. the draft v1alpha4 `IdentityBinding`).
    pub const UNSUPPORTED_SUBJECT_KIND: &str = "unsupported-subject-kind";
    /// A ServiceAccount name is empty or contains `*`.
    pub const INVALID_SUBJECT_NAME: &str = "invalid-subject-name";
    /// A TrafficTarget lists no (valid) source.
    pub const NO_SOURCES: &str = "no-sources";
    /// A TrafficTarget lists no rule.
    pub const NO_RULES: &str = "no-rules";
    /// A rule names a route that does not exist (yet) in the TrafficTarget's namespace.
    pub const ROUTE_NOT_FOUND: &str = "route-not-found";
    /// A rule names a match the HTTPRouteGroup does not have.
    pub const MATCH_NOT_FOUND: &str = "match-not-found";
    /// A rule selects all matches of an HTTPRouteGroup that has none.
    pub const ROUTE_HAS_NO_MATCHES: &str = "route-has-no-matches";
    /// An HTTPRouteGroup match lists a method that is not an HTTP method.
    pub const INVALID_HTTP_METHOD: &str = "invalid-http-method";
    /// A UDPRoute rule, or a UDPRoute: Consul Connect has no UDP.
    pub const UDP_UNENFORCEABLE: &str = "udp-unenforceable";
    /// A destination port or TCPRoute port list: intentions have no ports.
    pub const PORT_NOT_ENFORCED: &str = "port-not-enforced";
    /// An HTTPRouteGroup grant withheld because Consul < 1.9 has no L7 intentions.
    pub const L7_WITHHELD_ON_LEGACY: &str = "l7-withheld-on-legacy-consul";
    /// An HTTPRouteGroup grant widened to L4 on Consul < 1.9, as configured.
    pub const L7_WIDENED_ON_LEGACY: &str = "l7-widened-on-legacy-consul";
    /// ServiceAccounts of different namespaces map to one Consul service (Consul OSS).
    pub const NAMESPACE_COLLAPSE: &str = "namespace-collapse";
    /// A TrafficSplit service or backend name is empty or contains `*`.
    pub const INVALID_SERVICE_NAME: &str = "invalid-service-name";
    /// A TrafficSplit's backend weights sum to zero (or it has no backends).
    pub const SPLIT_ZERO_TOTAL_WEIGHT: &str = "split-zero-total-weight";
    /// A TrafficSplit lists a backend service twice; the weights were added.
    pub const SPLIT_DUPLICATE_BACKEND: &str = "split-duplicate-backend";
    /// A TrafficSplit has `matches`, which a service-splitter cannot express.
    pub const SPLIT_MATCHES_UNSUPPORTED: &str = "split-matches-unsupported";
    /// Another TrafficSplit already splits the same Consul service.
    pub const SPLIT_CONFLICT: &str = "split-conflict";
}
