//! The operator API: "why is this TrafficTarget not in effect?". Lists every known SMI
//! object with its status and diagnostics, including objects the watcher reported invalid.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use consul_smi_api::ObjectRef;
use consul_smi_grpc::v1::{self, translator_diagnostics_server::TranslatorDiagnosticsServer};
use consul_smi_translate::Severity;
use tonic::{Request, Response, Status};

use crate::SharedIndex;

/// Objects the watcher reported as undecodable, with the reason (names the field).
#[derive(Clone, Default)]
pub(crate) struct InvalidObjects(Arc<Mutex<BTreeMap<ObjectRef, String>>>);

impl InvalidObjects {
    pub(crate) fn set(&self, object: ObjectRef, reason: String) {
        self.0
            .lock()
            .expect("invalid-objects lock poisoned")
            .insert(object, reason);
    }

    pub(crate) fn clear(&self, object: &ObjectRef) {
        self.0
            .lock()
            .expect("invalid-objects lock poisoned")
            .remove(object);
    }

    pub(crate) fn replace(&self, objects: Vec<(ObjectRef, String)>) {
        *self.0.lock().expect("invalid-objects lock poisoned") = objects.into_iter().collect();
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<ObjectRef, String> {
        self.0
            .lock()
            .expect("invalid-objects lock poisoned")
            .clone()
    }
}

fn diagnostic_to_wire(diagnostic: &consul_smi_translate::Diagnostic) -> v1::Diagnostic {
    v1::Diagnostic {
        object: Some((&diagnostic.object).into()),
        severity: match diagnostic.severity {
            Severity::Warning => v1::Severity::Warning,
            Severity::Error => v1::Severity::Error,
        } as i32,
        field: diagnostic.field.clone(),
        code: diagnostic.code.to_string(),
        message: diagnostic.message.clone(),
    }
}

pub struct DiagnosticsService {
    index: SharedIndex,
    invalid: InvalidObjects,
}

impl DiagnosticsService {
    pub(crate) fn new(index: SharedIndex, invalid: InvalidObjects) -> Self {
        DiagnosticsService { index, invalid }
    }

    pub(crate) fn into_server(self) -> TranslatorDiagnosticsServer<Self> {
        TranslatorDiagnosticsServer::new(self)
    }
}

#[tonic::async_trait]
impl v1::translator_diagnostics_server::TranslatorDiagnostics for DiagnosticsService {
    async fn list(
        &self,
        request: Request<v1::ListDiagnosticsRequest>,
    ) -> Result<Response<v1::ListDiagnosticsResponse>, Status> {
        let filter = match request.into_inner().object {
            Some(object) => Some(
                ObjectRef::try_from(&object)
                    .map_err(|e| Status::invalid_argument(format!("object: {e}")))?,
            ),
            None => None,
        };
        let mut statuses: BTreeMap<ObjectRef, Vec<v1::Diagnostic>> = BTreeMap::new();
        {
            let index = self.index.read().expect("index lock poisoned");
            for status in index.statuses() {
                statuses.insert(
                    status.object.clone(),
                    status
                        .diagnostics
                        .iter()
                        .map(|d| diagnostic_to_wire(d))
                        .collect(),
                );
            }
        }
        for (object, reason) in self.invalid.snapshot() {
            statuses
                .entry(object.clone())
                .or_default()
                .push(v1::Diagnostic {
                    object: Some((&object).into()),
                    severity: v1::Severity::Error as i32,
                    field: String::new(),
                    code: "invalid-object".to_string(),
                    message: reason,
                });
        }
        let objects = statuses
            .into_iter()
            .filter(|(object, _)| filter.as_ref().is_none_or(|wanted| wanted == object))
            .map(|(object, diagnostics)| {
                let status = if diagnostics
                    .iter()
                    .any(|d| d.severity == v1::Severity::Error as i32)
                {
                    "errors"
                } else if diagnostics.is_empty() {
                    "ok"
                } else {
                    "warnings"
                };
                v1::ObjectStatus {
                    object: Some((&object).into()),
                    status: status.to_string(),
                    diagnostics,
                }
            })
            .collect();
        Ok(Response::new(v1::ListDiagnosticsResponse { objects }))
    }
}
