//! Kubernetes Events on SMI objects whose translation has problems, so `kubectl describe
//! traffictarget x` answers "why is this not in effect?". Optional (`--kube-events`), and it
//! degrades to logs alone when the cluster does not serve the Events API (the test API
//! server serves only CRDs), instead of failing the translator.

use std::collections::BTreeSet;

use consul_smi_api::ObjectRef;
use consul_smi_translate::Severity;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// One diagnostic, with what the Event needs to point at its object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ReportedDiagnostic {
    pub(crate) object: ObjectRef,
    pub(crate) api_version: String,
    pub(crate) uid: Option<String>,
    pub(crate) warning: bool,
    pub(crate) code: String,
    pub(crate) field: String,
    pub(crate) message: String,
}

/// Collects the index's current diagnostics (cheap: diagnostics only, not every object).
pub(crate) fn current_diagnostics(index: &consul_smi_translate::Index) -> Vec<ReportedDiagnostic> {
    index
        .diagnostics()
        .map(|d| {
            let meta = index
                .get(&d.object)
                .map(|o| o.meta().clone())
                .unwrap_or_default();
            ReportedDiagnostic {
                object: d.object.clone(),
                api_version: if meta.api_version.is_empty() {
                    format!(
                        "{}/{}",
                        d.object.kind.group(),
                        consul_smi_api::storage_version(d.object.kind)
                    )
                } else {
                    meta.api_version
                },
                uid: meta.uid,
                warning: d.severity == Severity::Warning,
                code: d.code.to_string(),
                field: d.field.clone(),
                message: d.message.clone(),
            }
        })
        .collect()
}

pub(crate) async fn run(
    client: kube::Client,
    mut updates: watch::Receiver<Vec<ReportedDiagnostic>>,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "consul-smi-translator".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    // Only diagnostics not yet reported become Events; one that disappears and returns is
    // reported again.
    let mut reported: BTreeSet<ReportedDiagnostic> = BTreeSet::new();
    // A watch channel holds only the latest state: a slow publisher skips to it.
    while updates.changed().await.is_ok() {
        let current: BTreeSet<ReportedDiagnostic> =
            updates.borrow_and_update().iter().cloned().collect();
        // Gone diagnostics are forgotten, so one that returns is reported again.
        reported.retain(|d| current.contains(d));
        let new: Vec<ReportedDiagnostic> = current.difference(&reported).cloned().collect();
        for diagnostic in new {
            let event = Event {
                // Errors and warnings both need attention; Kubernetes has no "Error" type.
                type_: EventType::Warning,
                reason: kebab_to_pascal(&diagnostic.code),
                note: Some(truncate(
                    &format!(
                        "{} {}: {}",
                        if diagnostic.warning {
                            "Warning"
                        } else {
                            "Error"
                        },
                        diagnostic.field,
                        diagnostic.message
                    ),
                    1000,
                )),
                action: "Translate".into(),
                secondary: None,
            };
            let reference = ObjectReference {
                api_version: Some(diagnostic.api_version.clone()),
                kind: Some(diagnostic.object.kind.as_str().into()),
                name: Some(diagnostic.object.name.clone()),
                namespace: Some(diagnostic.object.namespace.clone()),
                uid: diagnostic.uid.clone(),
                ..ObjectReference::default()
            };
            match recorder.publish(&event, &reference).await {
                Ok(()) => {
                    debug!(object = %diagnostic.object, code = %diagnostic.code, "published Kubernetes Event");
                    reported.insert(diagnostic);
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    info!(
                        "the cluster does not serve the Events API; diagnostics stay in logs, metrics and the diagnostics API"
                    );
                    return;
                }
                Err(kube::Error::Api(status)) if status.code == 403 => {
                    warn!(message = %status.message, "not allowed to create Events; disabling Kubernetes Events");
                    return;
                }
                // Not recorded as reported: the next change retries it.
                Err(error) => {
                    warn!(%error, object = %diagnostic.object, "publishing a Kubernetes Event failed")
                }
            }
        }
    }
}

fn kebab_to_pascal(code: &str) -> String {
    code.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_pascal_case_codes() {
        assert_eq!(kebab_to_pascal("route-not-found"), "RouteNotFound");
        assert_eq!(
            kebab_to_pascal("l7-withheld-on-legacy-consul"),
            "L7WithheldOnLegacyConsul"
        );
    }

    #[test]
    fn notes_are_cut_at_a_char_boundary() {
        let text = "é".repeat(600);
        let cut = truncate(&text, 1000);
        assert!(cut.len() <= 1000);
        assert!(text.starts_with(&cut));
    }
}
