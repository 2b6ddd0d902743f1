//! Decode errors that name the object and the field, so a user can fix the manifest.

use std::fmt;

/// What went wrong, coarsely, so callers can react (a watcher reading a directory may want to
/// skip documents that are not SMI at all, but must report broken SMI objects).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeErrorKind {
    /// The text is not valid YAML/JSON.
    Syntax,
    /// apiVersion/kind do not name any SMI resource (e.g. `apps/v1 Deployment`).
    NotSmi,
    /// An SMI group, but a version or kind this project does not know.
    UnknownVersion,
    /// An SMI object whose fields are missing, mistyped or violate the spec.
    Invalid,
    /// The hub object cannot be expressed in the requested (older) version.
    NotExpressible,
}

/// An SMI object that could not be decoded (or encoded), with everything known about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct DecodeError {
    pub error_kind: DecodeErrorKind,
    /// The `kind` as written, when known.
    pub kind: Option<String>,
    /// `metadata.namespace`, "default" when the object omits it.
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub api_version: Option<String>,
    /// 1-based document index within a multi-document manifest.
    pub document: Option<usize>,
    /// Path of the offending field, e.g. `spec.rules[1].kind`.
    pub field: Option<String>,
    pub message: String,
}

impl DecodeError {
    pub(crate) fn new(error_kind: DecodeErrorKind, message: impl Into<String>) -> Self {
        DecodeError {
            error_kind,
            kind: None,
            namespace: None,
            name: None,
            api_version: None,
            document: None,
            field: None,
            message: message.into(),
        }
    }

    pub(crate) fn at(mut self, field: impl Into<String>) -> Self {
        let field = field.into();
        self.field = if field.is_empty() { None } else { Some(field) };
        self
    }

    /// True when the document is simply not an SMI resource.
    pub fn is_not_smi(&self) -> bool {
        self.error_kind == DecodeErrorKind::NotSmi
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut wrote_prefix = false;
        if let Some(doc) = self.document {
            write!(f, "document {doc}")?;
            wrote_prefix = true;
        }
        if let Some(kind) = &self.kind {
            if wrote_prefix {
                f.write_str(": ")?;
            }
            f.write_str(kind)?;
            wrote_prefix = true;
        }
        if self.name.is_some() || self.namespace.is_some() {
            let ns = self.namespace.as_deref().unwrap_or("default");
            let name = self.name.as_deref().unwrap_or("<unnamed>");
            write!(f, "{}{ns}/{name}", if wrote_prefix { " " } else { "" })?;
            wrote_prefix = true;
        }
        if let Some(api_version) = &self.api_version {
            write!(f, "{}({api_version})", if wrote_prefix { " " } else { "" })?;
            wrote_prefix = true;
        }
        if wrote_prefix {
            f.write_str(": ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// A problem at a field path, before the object identity is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub error_kind: DecodeErrorKind,
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            error_kind: DecodeErrorKind::Invalid,
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn not_expressible(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            error_kind: DecodeErrorKind::NotExpressible,
            field: field.into(),
            message: message.into(),
        }
    }

    /// Turns a serde error with its path into a field error with a readable message.
    pub fn from_serde(prefix: &str, err: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = err.path().to_string();
        let raw = err.into_inner().to_string();
        let (mut field, message) = split_missing_field(&join_path(prefix, &path), &raw);
        if field == "." {
            field.clear();
        }
        FieldError::invalid(field, humanize_serde_message(&message))
    }
}

pub(crate) fn join_path(prefix: &str, path: &str) -> String {
    let path = if path == "." { "" } else { path };
    match (prefix.is_empty(), path.is_empty()) {
        (true, _) => path.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) if path.starts_with('[') => format!("{prefix}{path}"),
        (false, false) => format!("{prefix}.{path}"),
    }
}

/// serde reports a missing field at its parent ("spec.destination: missing field `name`");
/// users want the field itself ("spec.destination.name: missing field").
fn split_missing_field(path: &str, message: &str) -> (String, String) {
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some(name) = rest.strip_suffix('`')
    {
        return (
            join_path(path, name),
            "required field is missing".to_string(),
        );
    }
    (path.to_string(), message.to_string())
}

/// serde quotes values with backticks (`unknown variant `X`, expected one of `A`, `B``); in
/// a one-line log message the subject reads better in double quotes and the choices bare.
pub(crate) fn humanize_serde_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    let mut first = true;
    while let Some(start) = rest.find('`') {
        let Some(len) = rest[start + 1..].find('`') else {
            break;
        };
        out.push_str(&rest[..start]);
        let token = &rest[start + 1..start + 1 + len];
        if first {
            out.push('"');
            out.push_str(token);
            out.push('"');
            first = false;
        } else {
            out.push_str(token);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanizes_serde_messages() {
        assert_eq!(
            humanize_serde_message(
                "unknown variant `GRPCRoute`, expected one of `HTTPRouteGroup`, `TCPRoute`, `UDPRoute`"
            ),
            r#"unknown variant "GRPCRoute", expected one of HTTPRouteGroup, TCPRoute, UDPRoute"#
        );
        assert_eq!(
            humanize_serde_message("invalid type: string \"x\""),
            "invalid type: string \"x\""
        );
    }

    #[test]
    fn display_names_object_and_field() {
        let mut err = DecodeError::new(DecodeErrorKind::Invalid, "boom").at("spec.rules[1].kind");
        err.kind = Some("TrafficTarget".into());
        err.namespace = Some("default".into());
        err.name = Some("web".into());
        err.api_version = Some("access.smi-spec.io/v1alpha3".into());
        assert_eq!(
            err.to_string(),
            "TrafficTarget default/web (access.smi-spec.io/v1alpha3): spec.rules[1].kind: boom"
        );
        let bare = DecodeError::new(DecodeErrorKind::Syntax, "bad yaml");
        assert_eq!(bare.to_string(), "bad yaml");
    }
}
