//! access.smi-spec.io: TrafficTarget v1alpha1, v1alpha2, v1alpha3.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    DESTINATION_PORT_ANNOTATION, UNEXPRESSED_RULES_ANNOTATION, annotation, join, set_annotation,
};
use crate::error::FieldError;
use crate::hub::{self, RuleKind};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// A workload identity. SMI only defines `kind: ServiceAccount`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    /// Kind of the subject (ServiceAccount).
    pub kind: String,
    /// Name of the subject.
    pub name: String,
    /// Namespace of the subject; defaults to the TrafficTarget's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The destination identity of v1alpha1/v1alpha2, which could still name a port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationWithPort {
    /// Kind of the destination (ServiceAccount).
    pub kind: String,
    /// Name of the destination.
    pub name: String,
    /// Namespace of the destination; defaults to the TrafficTarget's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Port number of the destination; omitted means all ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
}

/// Route kinds a v1alpha1/v1alpha2 rule may reference (UDPRoute came with v1alpha3).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum LegacyRuleKind {
    HTTPRouteGroup,
    TCPRoute,
}

/// Route kinds a v1alpha3 rule may reference.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RuleKindV1alpha3 {
    HTTPRouteGroup,
    TCPRoute,
    UDPRoute,
}

/// A reference to a route and, optionally, some of its named matches.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule<K> {
    /// Kind of the referenced route.
    pub kind: K,
    /// Name of the referenced route, in the TrafficTarget's namespace.
    pub name: String,
    /// Names of the route's matches to allow; omitted means all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<String>>,
}

trait RuleKindConv: Copy {
    fn to_hub(self) -> RuleKind;
    fn from_hub(kind: RuleKind) -> Option<Self>;
}

impl RuleKindConv for LegacyRuleKind {
    fn to_hub(self) -> RuleKind {
        match self {
            LegacyRuleKind::HTTPRouteGroup => RuleKind::HTTPRouteGroup,
            LegacyRuleKind::TCPRoute => RuleKind::TCPRoute,
        }
    }
    fn from_hub(kind: RuleKind) -> Option<Self> {
        match kind {
            RuleKind::HTTPRouteGroup => Some(LegacyRuleKind::HTTPRouteGroup),
            RuleKind::TCPRoute => Some(LegacyRuleKind::TCPRoute),
            RuleKind::UDPRoute => None,
        }
    }
}

impl RuleKindConv for RuleKindV1alpha3 {
    fn to_hub(self) -> RuleKind {
        match self {
            RuleKindV1alpha3::HTTPRouteGroup => RuleKind::HTTPRouteGroup,
            RuleKindV1alpha3::TCPRoute => RuleKind::TCPRoute,
            RuleKindV1alpha3::UDPRoute => RuleKind::UDPRoute,
        }
    }
    fn from_hub(kind: RuleKind) -> Option<Self> {
        Some(match kind {
            RuleKind::HTTPRouteGroup => RuleKindV1alpha3::HTTPRouteGroup,
            RuleKind::TCPRoute => RuleKindV1alpha3::TCPRoute,
            RuleKind::UDPRoute => RuleKindV1alpha3::UDPRoute,
        })
    }
}

fn subject_to_hub(subject: &Subject, field: &str) -> Result<hub::Subject, FieldError> {
    require_identity(&subject.kind, &subject.name, field)?;
    Ok(hub::Subject {
        kind: subject.kind.clone(),
        name: subject.name.clone(),
        namespace: subject.namespace.clone(),
    })
}

fn subject_from_hub(subject: &hub::Subject) -> Subject {
    Subject {
        kind: subject.kind.clone(),
        name: subject.name.clone(),
        namespace: subject.namespace.clone(),
    }
}

fn require_identity(kind: &str, name: &str, field: &str) -> Result<(), FieldError> {
    if kind.is_empty() {
        return Err(FieldError::invalid(
            join(field, "kind"),
            "must not be empty",
        ));
    }
    if name.is_empty() {
        return Err(FieldError::invalid(
            join(field, "name"),
            "must not be empty",
        ));
    }
    Ok(())
}

fn sources_to_hub(sources: &[Subject], prefix: &str) -> Result<Vec<hub::Subject>, FieldError> {
    let field = join(prefix, "sources");
    if sources.is_empty() {
        return Err(FieldError::invalid(
            field,
            "at least one source is required",
        ));
    }
    sources
        .iter()
        .enumerate()
        .map(|(i, s)| subject_to_hub(s, &format!("{field}[{i}]")))
        .collect()
}

fn rules_to_hub<K: RuleKindConv>(
    rules: &[Rule<K>],
    field: &str,
) -> Result<Vec<hub::TrafficTargetRule>, FieldError> {
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            if rule.name.is_empty() {
                return Err(FieldError::invalid(
                    format!("{field}[{i}].name"),
                    "must not be empty",
                ));
            }
            Ok(hub::TrafficTargetRule {
                kind: rule.kind.to_hub(),
                name: rule.name.clone(),
                matches: rule.matches.clone(),
            })
        })
        .collect()
}

fn rules_from_hub<K: RuleKindConv>(
    rules: &[hub::TrafficTargetRule],
    field: &str,
    version: &str,
) -> Result<Vec<Rule<K>>, FieldError> {
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let kind = K::from_hub(rule.kind).ok_or_else(|| {
                FieldError::not_expressible(
                    format!("{field}[{i}].kind"),
                    format!(
                        "access.smi-spec.io/{version} cannot reference a {:?}",
                        rule.kind
                    ),
                )
            })?;
            Ok(Rule {
                kind,
                name: rule.name.clone(),
                matches: rule.matches.clone(),
            })
        })
        .collect()
}

/// Rules for a version that cannot reference every route kind: the expressible ones, with
/// the others put in [`UNEXPRESSED_RULES_ANNOTATION`] (with their positions) so that reading a
/// stored object through an old version neither fails nor loses them.
fn rules_from_hub_keeping_rest<K: RuleKindConv>(
    rules: &[hub::TrafficTargetRule],
    metadata: &mut ObjectMeta,
) -> Vec<Rule<K>> {
    let mut expressed = Vec::new();
    let mut rest = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        match K::from_hub(rule.kind) {
            Some(kind) => expressed.push(Rule {
                kind,
                name: rule.name.clone(),
                matches: rule.matches.clone(),
            }),
            None => rest.push(serde_json::json!({ "index": index, "rule": rule })),
        }
    }
    if !rest.is_empty() {
        set_annotation(
            metadata,
            UNEXPRESSED_RULES_ANNOTATION,
            serde_json::Value::Array(rest).to_string(),
        );
    }
    expressed
}

/// The inverse of [`rules_from_hub_keeping_rest`].
fn restore_unexpressed_rules(
    metadata: &ObjectMeta,
    rules: &mut Vec<hub::TrafficTargetRule>,
) -> Result<(), FieldError> {
    let Some(text) = annotation(metadata, UNEXPRESSED_RULES_ANNOTATION) else {
        return Ok(());
    };
    #[derive(Deserialize)]
    struct Placed {
        index: usize,
        rule: hub::TrafficTargetRule,
    }
    let placed: Vec<Placed> = serde_json::from_str(text).map_err(|e| {
        FieldError::invalid(
            format!("metadata.annotations[{UNEXPRESSED_RULES_ANNOTATION}]"),
            e.to_string(),
        )
    })?;
    for Placed { index, rule } in placed {
        rules.insert(index.min(rules.len()), rule);
    }
    Ok(())
}

fn destination_with_port_to_hub(
    dest: &DestinationWithPort,
    prefix: &str,
) -> Result<(hub::Subject, Option<u16>), FieldError> {
    let field = join(prefix, "destination");
    require_identity(&dest.kind, &dest.name, &field)?;
    if dest.port == Some(0) {
        return Err(FieldError::invalid(
            join(&field, "port"),
            "must be between 1 and 65535",
        ));
    }
    Ok((
        hub::Subject {
            kind: dest.kind.clone(),
            name: dest.name.clone(),
            namespace: dest.namespace.clone(),
        },
        dest.port,
    ))
}

fn destination_with_port_from_hub(tt: &hub::TrafficTarget) -> DestinationWithPort {
    DestinationWithPort {
        kind: tt.destination.kind.clone(),
        name: tt.destination.name.clone(),
        namespace: tt.destination.namespace.clone(),
        port: tt.destination_port,
    }
}

fn expect_traffic_target(obj: &hub::SmiObject) -> Result<&hub::TrafficTarget, FieldError> {
    match obj {
        hub::SmiObject::TrafficTarget(tt) => Ok(tt),
        other => Err(crate::common::wrong_kind(
            hub::SmiKind::TrafficTarget,
            other,
        )),
    }
}

/// v1alpha1: fields at the top level of the object (no `spec`), rules are called `specs`.
pub mod v1alpha1 {
    use super::*;
    use crate::common::{meta_from_hub, meta_to_hub, versioned};
    use kube::CustomResource;

    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
    #[kube(
        group = "access.smi-spec.io",
        version = "v1alpha1",
        kind = "TrafficTarget",
        namespaced,
        no_spec,
        shortname = "tt",
        derive = "PartialEq"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct TrafficTargetFields {
        /// The destination of this traffic target.
        pub destination: DestinationWithPort,
        /// Sources of this traffic target.
        #[schemars(length(min = 1))]
        pub sources: Vec<Subject>,
        /// Specifications of this traffic target (routes the sources may use).
        #[serde(default)]
        pub specs: Vec<Rule<LegacyRuleKind>>,
    }

    versioned!(
        TrafficTarget,
        TrafficTargetFields,
        hub::SmiKind::TrafficTarget,
        "v1alpha1",
        Some(&["destination", "sources", "specs"])
    );

    fn to_hub(tt: &TrafficTarget, prefix: &str) -> Result<hub::SmiObject, FieldError> {
        let (destination, destination_port) =
            destination_with_port_to_hub(&tt.spec.destination, prefix)?;
        Ok(hub::SmiObject::TrafficTarget(hub::TrafficTarget {
            meta: meta_to_hub(&tt.metadata, "access.smi-spec.io/v1alpha1"),
            destination,
            destination_port,
            sources: sources_to_hub(&tt.spec.sources, prefix)?,
            rules: {
                let mut rules = rules_to_hub(&tt.spec.specs, &join(prefix, "specs"))?;
                restore_unexpressed_rules(&tt.metadata, &mut rules)?;
                rules
            },
        }))
    }

    fn from_hub(obj: &hub::SmiObject, _prefix: &str) -> Result<TrafficTarget, FieldError> {
        let tt = expect_traffic_target(obj)?;
        let mut metadata = meta_from_hub(&tt.meta);
        let fields = TrafficTargetFields {
            destination: destination_with_port_from_hub(tt),
            sources: tt.sources.iter().map(subject_from_hub).collect(),
            specs: rules_from_hub_keeping_rest(&tt.rules, &mut metadata),
        };
        let mut root = TrafficTarget::new(&tt.meta.name, fields);
        root.metadata = metadata;
        Ok(root)
    }
}

/// v1alpha2: fields under `spec`, `specs` renamed to `rules`; destination may still name a port.
pub mod v1alpha2 {
    use super::*;
    use crate::common::{meta_from_hub, meta_to_hub, versioned};
    use kube::CustomResource;

    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
    #[kube(
        group = "access.smi-spec.io",
        version = "v1alpha2",
        kind = "TrafficTarget",
        namespaced,
        shortname = "tt",
        derive = "PartialEq"
    )]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct TrafficTargetSpec {
        /// The destination of this traffic target.
        pub destination: DestinationWithPort,
        /// Sources of this traffic target.
        #[schemars(length(min = 1))]
        pub sources: Vec<Subject>,
        /// Rules of this traffic target (routes the sources may use).
        #[serde(default)]
        pub rules: Vec<Rule<LegacyRuleKind>>,
    }

    versioned!(
        TrafficTarget,
        TrafficTargetSpec,
        hub::SmiKind::TrafficTarget,
        "v1alpha2",
        None
    );

    fn to_hub(tt: &TrafficTarget, prefix: &str) -> Result<hub::SmiObject, FieldError> {
        let (destination, destination_port) =
            destination_with_port_to_hub(&tt.spec.destination, prefix)?;
        Ok(hub::SmiObject::TrafficTarget(hub::TrafficTarget {
            meta: meta_to_hub(&tt.metadata, "access.smi-spec.io/v1alpha2"),
            destination,
            destination_port,
            sources: sources_to_hub(&tt.spec.sources, prefix)?,
            rules: {
                let mut rules = rules_to_hub(&tt.spec.rules, &join(prefix, "rules"))?;
                restore_unexpressed_rules(&tt.metadata, &mut rules)?;
                rules
            },
        }))
    }

    fn from_hub(obj: &hub::SmiObject, _prefix: &str) -> Result<TrafficTarget, FieldError> {
        let tt = expect_traffic_target(obj)?;
        let mut metadata = meta_from_hub(&tt.meta);
        let spec = TrafficTargetSpec {
            destination: destination_with_port_from_hub(tt),
            sources: tt.sources.iter().map(subject_from_hub).collect(),
            rules: rules_from_hub_keeping_rest(&tt.rules, &mut metadata),
        };
        let mut root = TrafficTarget::new(&tt.meta.name, spec);
        root.metadata = metadata;
        Ok(root)
    }
}

/// v1alpha3 (final): destination port removed, UDPRoute rules allowed, rules required.
pub mod v1alpha3 {
    use super::*;
    use crate::common::{meta_from_hub, meta_to_hub, versioned};
    use kube::CustomResource;

    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
    #[kube(
        group = "access.smi-spec.io",
        version = "v1alpha3",
        kind = "TrafficTarget",
        namespaced,
        shortname = "tt",
        derive = "PartialEq"
    )]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct TrafficTargetSpec {
        /// The destination of this traffic target.
        pub destination: Subject,
        /// Sources of this traffic target.
        #[schemars(length(min = 1))]
        pub sources: Vec<Subject>,
        /// Rules of this traffic target (routes the sources may use).
        #[schemars(length(min = 1))]
        pub rules: Vec<Rule<RuleKindV1alpha3>>,
    }

    versioned!(
        TrafficTarget,
        TrafficTargetSpec,
        hub::SmiKind::TrafficTarget,
        "v1alpha3",
        None
    );

    fn to_hub(tt: &TrafficTarget, prefix: &str) -> Result<hub::SmiObject, FieldError> {
        let destination = subject_to_hub(&tt.spec.destination, &join(prefix, "destination"))?;
        let sources = sources_to_hub(&tt.spec.sources, prefix)?;
        if tt.spec.rules.is_empty() {
            return Err(FieldError::invalid(
                join(prefix, "rules"),
                "at least one rule is required (\"a valid TrafficTarget must specify a destination, at least one rule, and at least one source\")",
            ));
        }
        let destination_port =
            match annotation(&tt.metadata, DESTINATION_PORT_ANNOTATION) {
                None => None,
                Some(text) => Some(text.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(
                    || {
                        FieldError::invalid(
                            format!("metadata.annotations[{DESTINATION_PORT_ANNOTATION}]"),
                            format!("expected a port number, got {text:?}"),
                        )
                    },
                )?),
            };
        Ok(hub::SmiObject::TrafficTarget(hub::TrafficTarget {
            meta: meta_to_hub(&tt.metadata, "access.smi-spec.io/v1alpha3"),
            destination,
            destination_port,
            sources,
            rules: rules_to_hub(&tt.spec.rules, &join(prefix, "rules"))?,
        }))
    }

    fn from_hub(obj: &hub::SmiObject, prefix: &str) -> Result<TrafficTarget, FieldError> {
        let tt = expect_traffic_target(obj)?;
        if tt.rules.is_empty() {
            return Err(FieldError::not_expressible(
                join(prefix, "rules"),
                "access.smi-spec.io/v1alpha3 requires at least one rule",
            ));
        }
        let spec = TrafficTargetSpec {
            destination: subject_from_hub(&tt.destination),
            sources: tt.sources.iter().map(subject_from_hub).collect(),
            rules: rules_from_hub(&tt.rules, &join(prefix, "rules"), "v1alpha3")?,
        };
        let mut root = TrafficTarget::new(&tt.meta.name, spec);
        root.metadata = meta_from_hub(&tt.meta);
        if let Some(port) = tt.destination_port {
            set_annotation(
                &mut root.metadata,
                DESTINATION_PORT_ANNOTATION,
                port.to_string(),
            );
        }
        Ok(root)
    }
}
