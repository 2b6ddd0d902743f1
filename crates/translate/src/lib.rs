//! Pure translation: SMI hub objects → desired Consul state → commands.
//!
//! No I/O: the translator service feeds objects in, the Consul writer applies the commands.
//!
//! * [`translate`] computes the whole [`DesiredState`] from a snapshot of objects. It is the
//!   reference the incremental [`Index`] must always equal (property-tested).
//! * [`Index`] keeps every object and the state computed from them; [`Index::apply`] and
//!   [`Index::delete`] recompute only the Consul destinations and splitters an object touches
//!   and return the commands for exactly that change.
//! * [`diff`] and [`apply_commands`] convert between states and command lists.
//!
//! # Semantics (SMI spec rule → Consul)
//! * A TrafficTarget lets each `sources[]` ServiceAccount call the `destination`
//!   ServiceAccount. The Consul service name is the ServiceAccount name, because consul-k8s
//!   requires them to be equal under ACLs. SMI policy is additive, so the intention for one
//!   (source, destination) pair is the union over all TrafficTargets naming the pair; removing
//!   one TrafficTarget never removes access another one still grants.
//! * Rules: a TCPRoute grants all traffic (L4 `allow`); an HTTPRouteGroup grants L7
//!   permissions, one per match (see [`TranslateOptions::target`]). If any rule for a pair is a
//!   TCPRoute, the pair is a plain L4 allow, since "all traffic" includes every HTTP request.
//! * An L7 grant permits exactly its routes under either default intention action: its
//!   permission list ends with a deny of every request (`PathPrefix: "/"`). Consul evaluates
//!   permissions in order, first match wins, and when compiling them into Envoy RBAC drops
//!   every permission whose action equals the default action, and the whole intention when none
//!   is left, which also exempts the source from a lower-precedence `* -> dst` deny
//!   (`removePermissionPrecedence` / `removeIntentionPrecedence` in agent/xds/rbac.go, 1.14.11).
//!   With ACLs off or `default_policy = "allow"` an allow-only list therefore became full
//!   access. With the closing deny, default-allow keeps "deny `/` and not the routes"; under
//!   default-deny that deny is the one dropped and the routes stay the only allow.
//! * Anything that cannot be enforced never widens silently: UDPRoute rules (Consul Connect has
//!   no UDP), L7 grants on Consul < 1.9 (unless [`TranslateOptions::widen_l7_on_legacy`]), rules
//!   naming missing routes or matches, and TrafficSplit `matches` grant or produce nothing and
//!   carry an error [`Diagnostic`]. Port restrictions cannot be expressed by intentions either;
//!   the pair is still granted (SMI ports only narrow a grant the spec already makes) and a
//!   warning says the port is not enforced.
//! * Rules name routes in the TrafficTarget's own namespace. `matches` omitted (or `[]`,
//!   which Kubernetes cannot tell apart from omitted) selects every match of the group. A match
//!   without any restriction becomes `PathPrefix: "/"`, since Consul rejects an empty one.
//! * Names: a ServiceAccount name that is empty or contains `*` is rejected with an error.
//!   Consul reads `*` as "every service", SMI has no wildcards, and Kubernetes names cannot
//!   contain `*`, so accepting it could only widen a grant to everyone.
//! * Namespaces: a subject without `namespace` is in the TrafficTarget's namespace (spec).
//!   See [`NamespaceMode`] for how namespaces reach Consul.
//! * `service-defaults`: L7 intentions require the destination's protocol to be http, and a
//!   splitter requires it for its service and every backend (Consul refuses discovery chains
//!   with mixed protocols), so those services get a `protocol = "http"` entry. Only modern
//!   Consul gets L7 intentions, so legacy targets only see them for splitters. The writer only
//!   writes service-defaults consul-smi owns, so a user's own entry is never overwritten.
//! * TrafficSplit → `service-splitter` for `spec.service`. Weights (v1alpha1 Quantities too)
//!   become two-decimal percentages summing to exactly 100.00 by largest remainder, because
//!   Consul requires `round(weight * 100)` to sum to 10000; zero shares are left out,
//!   duplicate backends merged (warning). Zero total weight, or `matches` (a splitter would
//!   split every request, not only those routes), give an error and no splitter. Two splits of
//!   one Consul service: the first by namespace/name is written, the other gets an error.
//! * Intention descriptions list the granting TrafficTargets (`namespace/name`, sorted),
//!   truncated deterministically to Consul's 512-byte limit.
//!
//! Diagnostic severities follow one rule: [`Severity::Error`] means the object (or part of it)
//! produced *less* than it asks for; [`Severity::Warning`] means it was translated but Consul
//! enforces something *broader or merged*.

mod diagnostic;
mod diff;
mod index;
mod plan;
mod resolve;

use std::collections::{BTreeMap, BTreeSet, HashMap};

pub use consul_smi_api::{ObjectRef, SmiObject};
pub use consul_smi_core::{Command, DesiredState};

pub use diagnostic::{Diagnostic, ObjectStatus, Severity, Status, codes};
pub use diff::{apply_commands, diff};
pub use index::Index;

use consul_smi_api::SmiKind;
use consul_smi_core::{
    Action, Intention, IntentionKey, IntentionRule, ServiceDefaults, ServiceName,
};

/// Which Consul intention API the writer talks to; decides whether L7 permissions exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ConsulApi {
    /// Consul < 1.9: ID-based intentions with only an L4 `Action`. 1.8 rejects unknown JSON
    /// fields, so `Permissions` can never be sent.
    #[default]
    Legacy,
    /// Consul ≥ 1.9: `service-intentions` config entries with L7 `Permissions`.
    Modern,
}

/// How Kubernetes namespaces map onto Consul.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum NamespaceMode {
    /// Consul OSS has no namespaces: every ServiceAccount maps to a namespace-less Consul name,
    /// and same-named ServiceAccounts of different namespaces collapse (reported as warnings).
    #[default]
    Oss,
    /// Consul Enterprise with consul-k8s namespace mirroring: Kubernetes namespace `ns` is
    /// Consul namespace `{prefix}{ns}` (consul-k8s applies the prefix to every namespace).
    Enterprise { mirroring_prefix: Option<String> },
}

/// Knobs that change the translation. The translator sets `target` from the Consul version
/// the writer detects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TranslateOptions {
    /// Defaults to [`ConsulApi::Legacy`]: its output (L4 intentions only, L7 grants withheld
    /// with a diagnostic) is accepted by every Consul version, whereas L7 permissions are
    /// rejected by 1.8. Until the writer has reported the version, this is the safe choice.
    pub target: ConsulApi,
    /// On [`ConsulApi::Legacy`], turn L7-only grants into an L4 allow (a warning is emitted
    /// per widened rule). Off by default: the spec grants only the listed routes.
    pub widen_l7_on_legacy: bool,
    pub namespaces: NamespaceMode,
    /// Manage a `* → *` deny intention (Consul's default-deny for clusters whose ACL default
    /// policy is allow). Off by default.
    pub default_deny: bool,
}

impl TranslateOptions {
    /// The Consul service for a Kubernetes ServiceAccount (or Service) `name` in `namespace`.
    pub fn consul_service(&self, namespace: &str, name: &str) -> ServiceName {
        match &self.namespaces {
            NamespaceMode::Oss => ServiceName::new(name),
            NamespaceMode::Enterprise { mirroring_prefix } => ServiceName::in_namespace(
                format!("{}{namespace}", mirroring_prefix.as_deref().unwrap_or("")),
                name,
            ),
        }
    }

    /// The managed default-deny intention, when enabled.
    pub fn default_deny_intention(&self) -> Option<Intention> {
        if !self.default_deny {
            return None;
        }
        let wildcard = match self.namespaces {
            NamespaceMode::Oss => ServiceName::new("*"),
            NamespaceMode::Enterprise { .. } => ServiceName::in_namespace("*", "*"),
        };
        Some(Intention {
            key: IntentionKey {
                source: wildcard.clone(),
                destination: wildcard,
            },
            rule: IntentionRule::L4(Action::Deny),
            description: "consul-smi: managed default deny (SMI access is deny by default)".into(),
        })
    }
}

/// Kubernetes namespace → (TrafficTarget, field) references to one ServiceAccount name.
type ReferencesByNamespace<'a> = BTreeMap<&'a str, Vec<(&'a ObjectRef, plan::TargetField)>>;

/// The result of a full, non-incremental translation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translation {
    pub state: DesiredState,
    /// Sorted (by object, then severity, field, code, message).
    pub diagnostics: Vec<Diagnostic>,
}

/// Translate a complete snapshot of SMI objects.
///
/// If `objects` holds two objects with the same [`ObjectRef`], the later one wins (as an
/// update would). Apart from that the result does not depend on the order of `objects`.
pub fn translate(objects: &[SmiObject], options: &TranslateOptions) -> Translation {
    let mut latest: HashMap<(SmiKind, &str, &str), &SmiObject> =
        HashMap::with_capacity(objects.len());
    for object in objects {
        let meta = object.meta();
        latest.insert((object.kind(), &meta.namespace, &meta.name), object);
    }

    let mut diagnostics: Vec<Diagnostic> = Vec::new();
    let mut routes = resolve::Routes::default();
    let mut targets: Vec<(ObjectRef, plan::TargetPlan)> = Vec::with_capacity(objects.len());
    let mut splits: BTreeMap<ObjectRef, plan::SplitPlan> = BTreeMap::new();
    for object in latest.into_values() {
        let object_ref = object.object_ref();
        match object {
            SmiObject::TrafficTarget(target) => {
                let target_plan = plan::plan_target(target, options);
                diagnostics.extend(target_plan.local.iter().cloned());
                targets.push((object_ref, target_plan));
            }
            SmiObject::HttpRouteGroup(group) => {
                let route_plan = plan::plan_http_route_group(group);
                diagnostics.extend(route_plan.local.iter().cloned());
                routes.http.insert(object_ref.clone(), route_plan);
            }
            SmiObject::TcpRoute(route) => {
                diagnostics.extend(plan::tcp_route_diagnostics(route));
                routes.tcp.insert(object_ref.clone());
            }
            SmiObject::UdpRoute(route) => diagnostics.extend(plan::udp_route_diagnostics(route)),
            SmiObject::TrafficSplit(split) => {
                let split_plan = plan::plan_split(split, options);
                diagnostics.extend(split_plan.local.iter().cloned());
                splits.insert(object_ref.clone(), split_plan);
            }
        }
    }

    let mut state = DesiredState::default();
    let mut http_services: BTreeSet<ServiceName> = BTreeSet::new();

    // Grouping order does not matter: each group's output is sorted by construction. Hash maps
    // and one bulk BTreeMap build keep a 10k-object build cache-friendly.
    let mut by_destination: HashMap<&ServiceName, Vec<(&ObjectRef, &plan::TargetPlan)>> =
        HashMap::new();
    for (object_ref, target_plan) in &targets {
        if let Some(destination) = &target_plan.destination {
            by_destination
                .entry(&destination.service)
                .or_default()
                .push((object_ref, target_plan));
        }
    }
    let mut intentions = Vec::new();
    for (destination, group) in by_destination {
        let output = resolve::resolve_destination(destination, group, &routes, options);
        if output.needs_http {
            http_services.insert(destination.clone());
        }
        diagnostics.extend(output.diagnostics);
        intentions.extend(output.intentions);
    }
    state.intentions = resolve::intention_map(intentions);

    let mut by_root: BTreeMap<&ServiceName, Vec<(&ObjectRef, &plan::SplitPlan)>> = BTreeMap::new();
    for (object_ref, split_plan) in &splits {
        if let Some(root) = &split_plan.root {
            by_root
                .entry(root)
                .or_default()
                .push((object_ref, split_plan));
        }
    }
    for (root, group) in by_root {
        let output = resolve::resolve_split_group(root, group);
        diagnostics.extend(output.diagnostics);
        if let Some(splitter) = output.splitter {
            http_services.extend(resolve::splitter_services(&splitter));
            state.splitters.insert(root.clone(), splitter);
        }
    }

    if matches!(options.namespaces, NamespaceMode::Oss) {
        // First find the names used from more than one namespace (`None`), cheaply; only
        // those need their references collected.
        let mut single_namespace: HashMap<&str, Option<&str>> = HashMap::new();
        for (_, target_plan) in &targets {
            for identity in target_plan.identities() {
                let namespace = Some(identity.namespace.as_str());
                single_namespace
                    .entry(identity.service.name.as_str())
                    .and_modify(|seen| {
                        if *seen != namespace {
                            *seen = None;
                        }
                    })
                    .or_insert(namespace);
            }
        }
        let mut references: HashMap<&str, ReferencesByNamespace> = HashMap::new();
        for (object_ref, target_plan) in &targets {
            for identity in target_plan.identities() {
                if single_namespace.get(identity.service.name.as_str()) != Some(&None) {
                    continue;
                }
                references
                    .entry(identity.service.name.as_str())
                    .or_default()
                    .entry(identity.namespace.as_str())
                    .or_default()
                    .push((object_ref, identity.field));
            }
        }
        for (name, by_namespace) in references {
            if by_namespace.len() < 2 {
                continue;
            }
            let namespaces: BTreeSet<&str> = by_namespace.keys().copied().collect();
            for (namespace, refs) in &by_namespace {
                for (object_ref, field) in refs {
                    diagnostics.push(resolve::collapse_diagnostic(
                        object_ref,
                        *field,
                        namespace,
                        name,
                        &namespaces,
                    ));
                }
            }
        }
    }

    for service in http_services {
        state.service_defaults.insert(
            service.clone(),
            ServiceDefaults {
                service,
                protocol: "http".into(),
            },
        );
    }
    if let Some(deny) = options.default_deny_intention() {
        state.intentions.insert(deny.key.clone(), deny);
    }

    diagnostics.sort();
    Translation { state, diagnostics }
}
