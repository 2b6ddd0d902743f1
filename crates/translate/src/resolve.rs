//! Cross-object resolution: everything one Consul destination or one split root needs.
//!
//! Both [`crate::translate`] and [`crate::Index`] call these functions per destination/root;
//! they differ only in how they find the group of objects (all at once vs. incrementally).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use consul_smi_api::{ObjectRef, SmiKind};
use consul_smi_core::{
    Action, Intention, IntentionKey, IntentionRule, Permission, ServiceName, ServiceSplitter,
};

use crate::diagnostic::{Diagnostic, codes};
use crate::plan::{HttpRoutePlan, RulePlan, SplitPlan, TargetField, TargetPlan};
use crate::{ConsulApi, TranslateOptions};

/// The routes rules can name, keyed by [`ObjectRef`] (kind, namespace, name).
#[derive(Clone, Debug, Default)]
pub(crate) struct Routes {
    pub http: HashMap<ObjectRef, HttpRoutePlan>,
    pub tcp: HashSet<ObjectRef>,
}

/// What one rule grants once its route is resolved.
enum Grant<'a> {
    /// TCPRoute: all traffic.
    All,
    /// HTTPRouteGroup: these permissions (never empty), borrowed from the route's plan so
    /// they are cloned once per intention rather than once per source and rule.
    Http(Vec<&'a Permission>),
}

fn resolve_rule<'a>(
    object: &ObjectRef,
    rule: &RulePlan,
    routes: &'a Routes,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Grant<'a>> {
    let not_found = |diagnostics: &mut Vec<Diagnostic>| {
        diagnostics.push(Diagnostic::error(
            object,
            rule.field.path(".name"),
            codes::ROUTE_NOT_FOUND,
            format!(
                "{} {}/{} does not exist; this rule grants nothing until it does",
                rule.route.kind, rule.route.namespace, rule.route.name
            ),
        ));
    };
    if rule.route.kind == SmiKind::TCPRoute {
        if routes.tcp.contains(&rule.route) {
            return Some(Grant::All);
        }
        not_found(diagnostics);
        return None;
    }
    let Some(group) = routes.http.get(&rule.route) else {
        not_found(diagnostics);
        return None;
    };
    let mut permissions = Vec::new();
    match rule.matches.as_deref() {
        // SMI: matches omitted = all matches of the route. An explicit empty list is the same
        // thing once it has been through Kubernetes (Go's omitempty), so it is read that way.
        None | Some([]) => {
            if group.matches.is_empty() {
                diagnostics.push(Diagnostic::error(
                    object,
                    rule.field.path(".name"),
                    codes::ROUTE_HAS_NO_MATCHES,
                    format!(
                        "HTTPRouteGroup {}/{} has no matches, so this rule grants nothing",
                        rule.route.namespace, rule.route.name
                    ),
                ));
            }
            permissions.extend(group.matches.iter().filter_map(|(_, p)| p.as_ref()));
        }
        Some(names) => {
            for (j, name) in names.iter().enumerate() {
                let mut found = false;
                for (match_name, permission) in &group.matches {
                    if match_name == name {
                        found = true;
                        permissions.extend(permission.as_ref());
                    }
                }
                if !found {
                    diagnostics.push(Diagnostic::error(
                        object,
                        rule.field.path(&format!(".matches[{j}]")),
                        codes::MATCH_NOT_FOUND,
                        format!(
                            "HTTPRouteGroup {}/{} has no match named {name:?}; it grants nothing",
                            rule.route.namespace, rule.route.name
                        ),
                    ));
                }
            }
        }
    }
    if permissions.is_empty() {
        None
    } else {
        Some(Grant::Http(permissions))
    }
}

#[derive(Default)]
struct PairGrant<'a> {
    all: bool,
    permissions: BTreeSet<&'a Permission>,
    grantors: BTreeSet<&'a ObjectRef>,
    /// (TrafficTarget, rule) of every HTTP rule that contributed.
    http_rules: Vec<(&'a ObjectRef, TargetField)>,
}

#[derive(Debug, Default)]
pub(crate) struct DestinationOutput {
    /// Sorted by key.
    pub intentions: Vec<Intention>,
    /// L7 intentions were produced, so the destination needs `protocol = http`.
    pub needs_http: bool,
    /// Diagnostics about the TrafficTargets of the group, sorted.
    pub diagnostics: Vec<Diagnostic>,
}

/// All intentions whose destination is `destination`, from the TrafficTargets naming it.
///
/// Union semantics (SMI access policy is additive): per source, a TCPRoute rule anywhere makes
/// the pair an L4 allow; otherwise the deduplicated, sorted permissions of all HTTP rules
/// become one L7 intention (modern Consul) or, on legacy Consul, are withheld with an error
/// (or widened to L4 with a warning, if configured).
pub(crate) fn resolve_destination<'a>(
    destination: &ServiceName,
    group: impl IntoIterator<Item = (&'a ObjectRef, &'a TargetPlan)>,
    routes: &'a Routes,
    options: &TranslateOptions,
) -> DestinationOutput {
    let mut diagnostics = Vec::new();
    let mut pairs: BTreeMap<&'a ServiceName, PairGrant<'a>> = BTreeMap::new();
    for (object, plan) in group {
        let grants: Vec<(TargetField, Grant<'a>)> = plan
            .rules
            .iter()
            .filter_map(|rule| {
                resolve_rule(object, rule, routes, &mut diagnostics)
                    .map(|grant| (rule.field, grant))
            })
            .collect();
        if grants.is_empty() {
            continue;
        }
        for source in &plan.sources {
            let pair = pairs.entry(&source.service).or_default();
            pair.grantors.insert(object);
            for (field, grant) in &grants {
                match grant {
                    Grant::All => pair.all = true,
                    Grant::Http(permissions) => {
                        pair.permissions.extend(permissions.iter().copied());
                        pair.http_rules.push((object, *field));
                    }
                }
            }
        }
    }

    let mut output = DestinationOutput::default();
    let mut withheld: BTreeSet<(&ObjectRef, TargetField)> = BTreeSet::new();
    let mut widened: BTreeSet<(&ObjectRef, TargetField)> = BTreeSet::new();
    for (source, pair) in pairs {
        let rule = if pair.all {
            IntentionRule::L4(Action::Allow)
        } else {
            match options.target {
                ConsulApi::Modern => {
                    output.needs_http = true;
                    let mut permissions: Vec<Permission> =
                        pair.permissions.into_iter().cloned().collect();
                    permissions.push(Permission::deny_every_request());
                    IntentionRule::L7(permissions)
                }
                ConsulApi::Legacy if options.widen_l7_on_legacy => {
                    widened.extend(pair.http_rules.iter().copied());
                    IntentionRule::L4(Action::Allow)
                }
                ConsulApi::Legacy => {
                    withheld.extend(pair.http_rules.iter().copied());
                    continue;
                }
            }
        };
        output.intentions.push(Intention {
            key: IntentionKey {
                source: source.clone(),
                destination: destination.clone(),
            },
            rule,
            description: describe(pair.grantors.iter().copied()),
        });
    }
    for (object, field) in withheld {
        diagnostics.push(Diagnostic::error(
            object,
            field.path(""),
            codes::L7_WITHHELD_ON_LEGACY,
            format!(
                "Consul before 1.9 has no L7 intentions: this HTTPRouteGroup grant to {destination} \
                 is withheld (widening it to all traffic is an explicit option)"
            ),
        ));
    }
    for (object, field) in widened {
        diagnostics.push(Diagnostic::warning(
            object,
            field.path(""),
            codes::L7_WIDENED_ON_LEGACY,
            format!(
                "Consul before 1.9 has no L7 intentions: this HTTPRouteGroup grant to {destination} \
                 was widened to all traffic, as configured"
            ),
        ));
    }
    diagnostics.sort();
    output.diagnostics = diagnostics;
    output
}

/// The intention map for `intentions` (keys unique), built from a sorted sequence so the map
/// is bulk-built instead of searched once per insert.
pub(crate) fn intention_map(mut intentions: Vec<Intention>) -> BTreeMap<IntentionKey, Intention> {
    intentions.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    intentions
        .into_iter()
        .map(|intention| (intention.key.clone(), intention))
        .collect()
}

/// Consul limits an intention's Description to 512 bytes.
pub(crate) const DESCRIPTION_LIMIT: usize = 512;

/// Provenance of an intention: the granting TrafficTargets in (namespace, name) order. When
/// they do not fit into Consul's 512 bytes, the longest prefix of the list that fits is kept
/// and the rest is counted, so the text depends only on the set of grantors.
pub(crate) fn describe<'a>(grantors: impl ExactSizeIterator<Item = &'a ObjectRef>) -> String {
    let total = grantors.len();
    let head = if total == 1 {
        "consul-smi: TrafficTarget "
    } else {
        "consul-smi: TrafficTargets "
    };
    let mut description = String::with_capacity(64);
    description.push_str(head);
    let mut used = 0;
    for (i, grantor) in grantors.enumerate() {
        let separator = if i == 0 { "" } else { ", " };
        let remaining_after = total - i - 1;
        let suffix_len = if remaining_after == 0 {
            0
        } else {
            more_suffix(remaining_after).len()
        };
        let name_len = grantor.namespace.len() + 1 + grantor.name.len();
        if description.len() + separator.len() + name_len + suffix_len > DESCRIPTION_LIMIT {
            break;
        }
        description.push_str(separator);
        description.push_str(&grantor.namespace);
        description.push('/');
        description.push_str(&grantor.name);
        used += 1;
    }
    if used < total {
        let suffix = more_suffix(total - used);
        description.push_str(if used == 0 { &suffix[2..] } else { &suffix });
    }
    // Only reachable if a single name is longer than the limit (Kubernetes names are ≤ 253
    // bytes, so not in practice); cut on a character boundary.
    if description.len() > DESCRIPTION_LIMIT {
        let mut end = DESCRIPTION_LIMIT;
        while !description.is_char_boundary(end) {
            end -= 1;
        }
        description.truncate(end);
    }
    description
}

fn more_suffix(count: usize) -> String {
    format!(", ... (+{count} more)")
}

#[derive(Debug, Default)]
pub(crate) struct SplitOutput {
    pub splitter: Option<ServiceSplitter>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Consul has one service-splitter per service. When several valid TrafficSplits name the
/// same Consul service (same namespace, or different namespaces on Consul OSS), the first by
/// (namespace, name) is written and the others get an error, so the result is stable whatever
/// order they arrived in.
pub(crate) fn resolve_split_group<'a>(
    root: &ServiceName,
    group: impl IntoIterator<Item = (&'a ObjectRef, &'a SplitPlan)>,
) -> SplitOutput {
    let mut candidates: Vec<(&ObjectRef, &ServiceSplitter)> = group
        .into_iter()
        .filter_map(|(object, plan)| plan.splitter.as_ref().map(|s| (object, s)))
        .collect();
    candidates.sort_by(|a, b| a.0.cmp(b.0));
    let mut output = SplitOutput::default();
    let mut candidates = candidates.into_iter();
    let Some((winner, splitter)) = candidates.next() else {
        return output;
    };
    output.splitter = Some(splitter.clone());
    for (object, _) in candidates {
        output.diagnostics.push(Diagnostic::error(
            object,
            "spec.service",
            codes::SPLIT_CONFLICT,
            format!(
                "TrafficSplit {}/{} already splits Consul service {root}; only the first \
                 (by namespace/name) is written",
                winner.namespace, winner.name
            ),
        ));
    }
    output.diagnostics.sort();
    output
}

/// Services a splitter needs `protocol = http` for: the root, and every backend, because
/// Consul refuses a discovery chain whose services use different protocols ("cannot split to a
/// service using tcp").
pub(crate) fn splitter_services(splitter: &ServiceSplitter) -> Vec<ServiceName> {
    let mut services = vec![splitter.service.clone()];
    services.extend(splitter.splits.iter().map(|split| ServiceName {
        namespace: split.namespace.clone(),
        name: split.service.clone(),
    }));
    services.sort();
    services.dedup();
    services
}

/// Consul OSS has no namespaces, so ServiceAccounts with one name in several Kubernetes
/// namespaces are one Consul service and their intentions merge; the spec says they are
/// different identities, so every reference is flagged.
pub(crate) fn collapse_diagnostic(
    object: &ObjectRef,
    field: TargetField,
    namespace: &str,
    name: &str,
    namespaces: &BTreeSet<&str>,
) -> Diagnostic {
    let others: Vec<&str> = namespaces
        .iter()
        .copied()
        .filter(|ns| *ns != namespace)
        .collect();
    Diagnostic::warning(
        object,
        field.path(".name"),
        codes::NAMESPACE_COLLAPSE,
        format!(
            "ServiceAccount {namespace}/{name} and ServiceAccounts named {name:?} in namespace(s) \
             {} all map to Consul service {name:?}: Consul OSS has no namespaces, so their \
             intentions are merged",
            others.join(", ")
        ),
    )
}
