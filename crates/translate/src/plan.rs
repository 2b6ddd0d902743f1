//! Per-object analysis that needs no other object: validation, Consul names, field paths.
//!
//! Everything here is a function of one object and the options, so the index computes it
//! once per object version and reuses it whenever a destination or splitter is recomputed.

use std::collections::BTreeMap;

use consul_smi_api::{
    HttpMatch, HttpRouteGroup, Meta, ObjectRef, RuleKind, SmiKind, Subject, TcpRoute, TrafficSplit,
    TrafficTarget, UdpRoute,
};
use consul_smi_core::{
    Action, HeaderMatch, HeaderMatchKind, HttpPermission, PathMatch, Permission, ServiceName,
    ServiceSplitter, Split,
};

use crate::TranslateOptions;
use crate::diagnostic::{Diagnostic, codes};

/// Where in a TrafficTarget something is, rendered only when a diagnostic needs the text
/// (building strings for every field of every object would dominate a full build).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct TargetField {
    /// access v1alpha1 had no `spec` and called rules `specs`.
    pub v1alpha1: bool,
    pub part: TargetPart,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum TargetPart {
    Destination,
    Source(usize),
    Sources,
    Rule(usize),
    Rules,
}

impl TargetField {
    /// The field path followed by `suffix`, e.g. `spec.rules[0]` + `.name`.
    pub fn path(self, suffix: &str) -> String {
        let root = if self.v1alpha1 { "" } else { "spec." };
        let rules = if self.v1alpha1 { "specs" } else { "rules" };
        match self.part {
            TargetPart::Destination => format!("{root}destination{suffix}"),
            TargetPart::Source(i) => format!("{root}sources[{i}]{suffix}"),
            TargetPart::Sources => format!("{root}sources{suffix}"),
            TargetPart::Rule(i) => format!("{root}{rules}[{i}]{suffix}"),
            TargetPart::Rules => format!("{root}{rules}{suffix}"),
        }
    }
}

/// A ServiceAccount reference that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    pub service: ServiceName,
    /// Kubernetes namespace, for the OSS collapse check (the name is `service.name`).
    pub namespace: String,
    /// The subject (destination or source) it came from; diagnostics name its `.name`.
    pub field: TargetField,
}

/// A TCPRoute or HTTPRouteGroup rule; UDPRoute rules never grant and are dropped here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RulePlan {
    pub route: ObjectRef,
    pub matches: Option<Vec<String>>,
    pub field: TargetField,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TargetPlan {
    pub destination: Option<Identity>,
    pub sources: Vec<Identity>,
    pub rules: Vec<RulePlan>,
    pub local: Vec<Diagnostic>,
}

impl TargetPlan {
    /// Every valid ServiceAccount reference (destination first).
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.destination.iter().chain(self.sources.iter())
    }
}

/// ServiceAccount and Service names must be Kubernetes names; the writer checks the same
/// rule at its boundary ([`consul_smi_core::names`] says why).
fn invalid_name(name: &str) -> bool {
    !consul_smi_core::names::is_valid_name(name)
}

fn object_ref(kind: SmiKind, meta: &Meta) -> ObjectRef {
    ObjectRef::new(kind, meta.namespace.clone(), meta.name.clone())
}

fn plan_subject(
    meta: &Meta,
    subject: &Subject,
    field: TargetField,
    options: &TranslateOptions,
    local: &mut Vec<Diagnostic>,
) -> Option<Identity> {
    if subject.kind != "ServiceAccount" {
        local.push(Diagnostic::error(
            &object_ref(SmiKind::TrafficTarget, meta),
            field.path(".kind"),
            codes::UNSUPPORTED_SUBJECT_KIND,
            format!(
                "subject kind {:?} is not supported (only ServiceAccount maps to a Consul \
                 service); this subject is ignored",
                subject.kind
            ),
        ));
        return None;
    }
    if invalid_name(&subject.name) {
        local.push(Diagnostic::error(
            &object_ref(SmiKind::TrafficTarget, meta),
            field.path(".name"),
            codes::INVALID_SUBJECT_NAME,
            format!(
                "ServiceAccount name {:?} is not a Kubernetes name (SMI has no wildcards; Consul \
                 would read `*` as every service); this subject is ignored",
                subject.name
            ),
        ));
        return None;
    }
    // SMI: a subject without namespace means the TrafficTarget's own namespace.
    let namespace = subject.namespace.as_deref().unwrap_or(&meta.namespace);
    Some(Identity {
        service: options.consul_service(namespace, &subject.name),
        namespace: namespace.to_string(),
        field,
    })
}

pub(crate) fn plan_target(target: &TrafficTarget, options: &TranslateOptions) -> TargetPlan {
    let meta = &target.meta;
    let v1alpha1 = meta.api_version.ends_with("/v1alpha1");
    let field = |part| TargetField { v1alpha1, part };
    let mut local = Vec::new();

    let destination = plan_subject(
        meta,
        &target.destination,
        field(TargetPart::Destination),
        options,
        &mut local,
    );
    if let Some(port) = target.destination_port {
        local.push(Diagnostic::warning(
            &object_ref(SmiKind::TrafficTarget, meta),
            field(TargetPart::Destination).path(".port"),
            codes::PORT_NOT_ENFORCED,
            format!(
                "Consul intentions have no ports: access is granted on every port, not only {port}"
            ),
        ));
    }

    let mut sources = Vec::with_capacity(target.sources.len());
    for (i, subject) in target.sources.iter().enumerate() {
        if let Some(identity) = plan_subject(
            meta,
            subject,
            field(TargetPart::Source(i)),
            options,
            &mut local,
        ) {
            sources.push(identity);
        }
    }
    if target.sources.is_empty() {
        local.push(Diagnostic::error(
            &object_ref(SmiKind::TrafficTarget, meta),
            field(TargetPart::Sources).path(""),
            codes::NO_SOURCES,
            "no sources: a TrafficTarget must list at least one source, so it grants nothing",
        ));
    }

    let mut rules = Vec::with_capacity(target.rules.len());
    for (i, rule) in target.rules.iter().enumerate() {
        match rule.kind {
            RuleKind::UDPRoute => local.push(Diagnostic::error(
                &object_ref(SmiKind::TrafficTarget, meta),
                field(TargetPart::Rule(i)).path(".kind"),
                codes::UDP_UNENFORCEABLE,
                format!(
                    "UDPRoute {:?} cannot be enforced: Consul Connect has no UDP, so this rule \
                     grants nothing",
                    rule.name
                ),
            )),
            RuleKind::TCPRoute | RuleKind::HTTPRouteGroup => rules.push(RulePlan {
                route: ObjectRef::new(
                    rule.kind.as_smi_kind(),
                    meta.namespace.clone(),
                    rule.name.clone(),
                ),
                matches: rule.matches.clone(),
                field: field(TargetPart::Rule(i)),
            }),
        }
    }
    if target.rules.is_empty() {
        local.push(Diagnostic::error(
            &object_ref(SmiKind::TrafficTarget, meta),
            field(TargetPart::Rules).path(""),
            codes::NO_RULES,
            "no rules: a TrafficTarget must list at least one rule, so it grants nothing",
        ));
    }

    TargetPlan {
        destination,
        sources,
        rules,
        local,
    }
}

/// An HTTPRouteGroup's matches as Consul permissions; `None` = the match can grant nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HttpRoutePlan {
    pub matches: Vec<(String, Option<Permission>)>,
    pub local: Vec<Diagnostic>,
}

/// The methods SMI allows (besides `*`), which are also the ones Consul accepts.
const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "PUT", "POST", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

pub(crate) fn plan_http_route_group(group: &HttpRouteGroup) -> HttpRoutePlan {
    let object = ObjectRef::new(
        SmiKind::HTTPRouteGroup,
        group.meta.namespace.clone(),
        group.meta.name.clone(),
    );
    // specs v1alpha1/v1alpha2 had `matches` at the top level, later ones under `spec`.
    let matches_field = if group.meta.api_version.ends_with("/v1alpha1")
        || group.meta.api_version.ends_with("/v1alpha2")
    {
        "matches"
    } else {
        "spec.matches"
    };
    let mut local = Vec::new();
    let matches = group
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = format!("{matches_field}[{i}]");
            (
                m.name.clone(),
                match_permission(&object, m, &field, &mut local),
            )
        })
        .collect();
    HttpRoutePlan { matches, local }
}

/// One SMI HTTP match → one Consul L7 permission.
///
/// * `pathRegex` is anchored with `^` by SMI; Consul's `PathRegex` (an Envoy safe_regex) is
///   not, so a missing `^` is added.
/// * methods: empty or containing `*` means any method (no `Methods` restriction). Names are
///   upper-cased (Consul normalises them the same way); a non-HTTP method is dropped with an
///   error, and if none is left the match grants nothing rather than every method.
/// * headers: name → value regex, as Consul header `Regex` matches.
/// * A match without any restriction becomes `PathPrefix: "/"` (every request), because
///   Consul rejects an empty `HTTP` permission.
fn match_permission(
    object: &ObjectRef,
    m: &HttpMatch,
    field: &str,
    local: &mut Vec<Diagnostic>,
) -> Option<Permission> {
    let mut methods: Vec<String> = Vec::new();
    if !m.methods.is_empty() && !m.methods.iter().any(|method| method.trim() == "*") {
        for (j, method) in m.methods.iter().enumerate() {
            let upper = method.trim().to_ascii_uppercase();
            if HTTP_METHODS.contains(&upper.as_str()) {
                methods.push(upper);
            } else {
                local.push(Diagnostic::error(
                    object,
                    format!("{field}.methods[{j}]"),
                    codes::INVALID_HTTP_METHOD,
                    format!("{method:?} is not an HTTP method; it grants nothing"),
                ));
            }
        }
        if methods.is_empty() {
            return None;
        }
        methods.sort();
        methods.dedup();
    }

    let path = match m.path_regex.as_deref() {
        None | Some("") => None,
        Some(regex) if regex.starts_with('^') => Some(PathMatch::Regex(regex.to_string())),
        Some(regex) => Some(PathMatch::Regex(format!("^{regex}"))),
    };
    let headers: Vec<HeaderMatch> = m
        .headers
        .iter()
        .map(|(name, regex)| HeaderMatch {
            name: name.clone(),
            kind: HeaderMatchKind::Regex(regex.clone()),
            invert: false,
        })
        .collect();
    let path = if path.is_none() && methods.is_empty() && headers.is_empty() {
        Some(PathMatch::Prefix("/".into()))
    } else {
        path
    };
    Some(Permission {
        action: Action::Allow,
        http: HttpPermission {
            path,
            methods,
            headers,
        },
    })
}

pub(crate) fn tcp_route_diagnostics(route: &TcpRoute) -> Vec<Diagnostic> {
    let object = ObjectRef::new(
        SmiKind::TCPRoute,
        route.meta.namespace.clone(),
        route.meta.name.clone(),
    );
    match &route.matches {
        Some(port_match) if !port_match.ports.is_empty() => vec![Diagnostic::warning(
            &object,
            "spec.matches.ports",
            codes::PORT_NOT_ENFORCED,
            format!(
                "Consul intentions have no ports: TrafficTargets using this route grant every \
                 port, not only {:?}",
                port_match.ports
            ),
        )],
        _ => Vec::new(),
    }
}

pub(crate) fn udp_route_diagnostics(route: &UdpRoute) -> Vec<Diagnostic> {
    let object = ObjectRef::new(
        SmiKind::UDPRoute,
        route.meta.namespace.clone(),
        route.meta.name.clone(),
    );
    vec![Diagnostic::warning(
        &object,
        "kind",
        codes::UDP_UNENFORCEABLE,
        "Consul Connect has no UDP: TrafficTargets using this route grant nothing",
    )]
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SplitPlan {
    /// The Consul service the splitter is for; `None` when `spec.service` is invalid.
    pub root: Option<ServiceName>,
    /// `None` when the split cannot be expressed (its errors are in `local`).
    pub splitter: Option<ServiceSplitter>,
    pub local: Vec<Diagnostic>,
}

/// TrafficSplit → `service-splitter`.
///
/// * Weights become percentages with two decimals that sum to exactly 100.00, by the
///   largest-remainder method: Consul rejects a splitter unless `round(weight*100)` of the
///   splits sums to 10000. Ties go to the earlier backend. Backends whose share rounds to 0 are
///   left out (they would receive no traffic anyway).
/// * A backend listed twice gets the sum of its weights (warning).
/// * Zero total weight or no backends: error, no splitter (there is nothing to send traffic to).
/// * `matches` (split v1alpha3+) restrict the split to some HTTP routes, which a splitter
///   cannot express (it splits all traffic to the service). Splitting all traffic instead would
///   send requests the user meant to keep on the root service to other backends, so the
///   splitter is withheld with an error, just as unenforceable grants are.
pub(crate) fn plan_split(split: &TrafficSplit, options: &TranslateOptions) -> SplitPlan {
    let object = ObjectRef::new(
        SmiKind::TrafficSplit,
        split.meta.namespace.clone(),
        split.meta.name.clone(),
    );
    let namespace = split.meta.namespace.as_str();
    let mut local = Vec::new();

    let root = if invalid_name(&split.service) {
        local.push(Diagnostic::error(
            &object,
            "spec.service",
            codes::INVALID_SERVICE_NAME,
            format!(
                "service name {:?} is not a Kubernetes name; no splitter",
                split.service
            ),
        ));
        None
    } else {
        Some(options.consul_service(namespace, &split.service))
    };

    let mut valid = root.is_some();
    if !split.matches.is_empty() {
        local.push(Diagnostic::error(
            &object,
            "spec.matches",
            codes::SPLIT_MATCHES_UNSUPPORTED,
            "a Consul service-splitter splits all traffic and cannot be limited to HTTP route \
             matches; no splitter is written rather than splitting every request",
        ));
        valid = false;
    }

    // Backends in first-seen order, duplicates merged.
    let mut backends: Vec<(&str, u64)> = Vec::new();
    let mut positions: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, backend) in split.backends.iter().enumerate() {
        if invalid_name(&backend.service) {
            local.push(Diagnostic::error(
                &object,
                format!("spec.backends[{i}].service"),
                codes::INVALID_SERVICE_NAME,
                format!(
                    "service name {:?} is not a Kubernetes name; no splitter",
                    backend.service
                ),
            ));
            valid = false;
            continue;
        }
        match positions.get(backend.service.as_str()) {
            Some(&position) => {
                backends[position].1 = backends[position].1.saturating_add(backend.weight.millis);
                local.push(Diagnostic::warning(
                    &object,
                    format!("spec.backends[{i}].service"),
                    codes::SPLIT_DUPLICATE_BACKEND,
                    format!(
                        "backend {:?} is listed more than once; its weights are added",
                        backend.service
                    ),
                ));
            }
            None => {
                positions.insert(backend.service.as_str(), backends.len());
                backends.push((backend.service.as_str(), backend.weight.millis));
            }
        }
    }

    let weights: Vec<u64> = backends.iter().map(|(_, weight)| *weight).collect();
    let percentages = split_percentages(&weights);
    if percentages.is_none() {
        local.push(Diagnostic::error(
            &object,
            "spec.backends",
            codes::SPLIT_ZERO_TOTAL_WEIGHT,
            "the backend weights sum to zero, so there is no split to express; no splitter",
        ));
        valid = false;
    }

    let splitter = match (valid, &root, percentages) {
        (true, Some(root), Some(percentages)) => {
            let split_namespace = root.namespace.clone();
            let splits = backends
                .iter()
                .zip(percentages)
                .filter(|(_, hundredths)| *hundredths > 0)
                .map(|((service, _), hundredths)| Split {
                    weight: hundredths as f32 / 100.0,
                    service: (*service).to_string(),
                    namespace: split_namespace.clone(),
                })
                .collect();
            Some(ServiceSplitter {
                service: root.clone(),
                splits,
            })
        }
        _ => None,
    };
    SplitPlan {
        root,
        splitter,
        local,
    }
}

/// Shares of `weights` in hundredths of a percent, summing to exactly 10000 (largest remainder,
/// ties to the earlier entry). `None` when the total is zero.
pub(crate) fn split_percentages(weights: &[u64]) -> Option<Vec<u32>> {
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if total == 0 {
        return None;
    }
    let mut shares: Vec<u32> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(weights.len());
    for (i, &weight) in weights.iter().enumerate() {
        let exact = u128::from(weight) * 10_000;
        // exact / total ≤ 10000, so it fits.
        shares.push((exact / total) as u32);
        remainders.push((exact % total, i));
    }
    let assigned: u32 = shares.iter().sum();
    let missing = 10_000 - assigned as usize;
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take(missing) {
        shares[i] += 1;
    }
    Some(shares)
}

#[cfg(test)]
mod tests {
    use super::split_percentages;

    #[test]
    fn every_two_decimal_percentage_survives_f32_and_consuls_rounding() {
        // Consul scales each f32 weight by 100 and rounds; the sum must be exactly 10000.
        for hundredths in 0u32..=10_000 {
            let weight = hundredths as f32 / 100.0;
            assert_eq!((f64::from(weight) * 100.0).round() as u32, hundredths);
        }
    }

    #[test]
    fn largest_remainder_shares_sum_to_10000() {
        assert_eq!(split_percentages(&[0, 0]), None);
        assert_eq!(split_percentages(&[]), None);
        assert_eq!(split_percentages(&[1, 1, 1]), Some(vec![3334, 3333, 3333]));
        assert_eq!(split_percentages(&[u64::MAX, 1]), Some(vec![10_000, 0]));
        for n in 1..40u64 {
            let weights: Vec<u64> = (1..=n).collect();
            let shares = split_percentages(&weights).unwrap();
            assert_eq!(shares.iter().sum::<u32>(), 10_000);
        }
    }
}
