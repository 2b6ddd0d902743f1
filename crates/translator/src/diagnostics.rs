//! The operator API: "why is this TrafficTarget not in effect?". Lists every known SMI
//! object with its status and diagnostics, including objects the watcher reported invalid.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use consul_smi_api::{ObjectRef, SmiKind};
use consul_smi_grpc::v1::{self, translator_diagnostics_server::TranslatorDiagnosticsServer};
use consul_smi_translate::Severity;
use tokio::sync::Semaphore;
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

    /// Up to `limit` invalid objects after `after` (matching `filter`), in order.
    pub(crate) fn page(
        &self,
        after: Option<&ObjectRef>,
        filter: Option<&ObjectRef>,
        limit: usize,
    ) -> Vec<(ObjectRef, String)> {
        let invalid = self.0.lock().expect("invalid-objects lock poisoned");
        let from = match after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        invalid
            .range::<ObjectRef, _>((from, Bound::Unbounded))
            .filter(|(object, _)| filter.is_none_or(|only| only == *object))
            .take(limit)
            .map(|(object, reason)| (object.clone(), reason.clone()))
            .collect()
    }

    #[cfg(test)]
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

/// Objects per page when the caller does not say, and the most it may ask for.
const DEFAULT_PAGE_SIZE: usize = 500;
const MAX_PAGE_SIZE: usize = 1000;
/// A page ends once its objects encode to this much, well below gRPC's default 4 MiB message
/// limit even when the next object is a large one (a diagnostic can quote a large field).
const PAGE_BYTES: usize = 1024 * 1024;
/// `List` calls served at once; more wait. Each builds a page from a copy of the invalid
/// objects, so without a cap, hundreds of pending calls held gigabytes.
const CONCURRENT_LISTS: usize = 4;

pub struct DiagnosticsService {
    index: SharedIndex,
    invalid: InvalidObjects,
    lists: Semaphore,
}

impl DiagnosticsService {
    pub(crate) fn new(index: SharedIndex, invalid: InvalidObjects) -> Self {
        DiagnosticsService {
            index,
            invalid,
            lists: Semaphore::new(CONCURRENT_LISTS),
        }
    }

    pub(crate) fn into_server(self) -> TranslatorDiagnosticsServer<Self> {
        TranslatorDiagnosticsServer::new(self)
    }

    /// Up to `limit` objects after `after` (matching `filter`), in order, with their
    /// diagnostics; from the index and the invalid objects merged.
    fn collect(
        &self,
        after: Option<&ObjectRef>,
        filter: Option<&ObjectRef>,
        limit: usize,
    ) -> BTreeMap<ObjectRef, Vec<v1::Diagnostic>> {
        let wanted = |object: &ObjectRef| {
            after.is_none_or(|after| object > after) && filter.is_none_or(|only| only == object)
        };
        let mut statuses: BTreeMap<ObjectRef, Vec<v1::Diagnostic>> = BTreeMap::new();
        {
            let index = self.index.read().expect("index lock poisoned");
            // Both sources are sorted: the first `limit` of each cover the merged first `limit`.
            for status in index.statuses().filter(|s| wanted(s.object)).take(limit) {
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
        let invalid = self.invalid.page(after, filter, limit);
        for (object, reason) in invalid {
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
        statuses
    }
}

fn object_status(object: &ObjectRef, diagnostics: Vec<v1::Diagnostic>) -> v1::ObjectStatus {
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
        object: Some(object.into()),
        status: status.to_string(),
        diagnostics,
    }
}

/// The page token is the last object of the previous page, `Kind/namespace/name`.
fn parse_page_token(token: &str) -> Result<Option<ObjectRef>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        Status::invalid_argument(format!(
            "page_token {token:?} is not one this server issued"
        ))
    };
    let mut parts = token.splitn(3, '/');
    let (Some(kind), Some(namespace), Some(name)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    let kind = SmiKind::from_kind(kind).ok_or_else(invalid)?;
    Ok(Some(ObjectRef::new(kind, namespace, name)))
}

#[tonic::async_trait]
impl v1::translator_diagnostics_server::TranslatorDiagnostics for DiagnosticsService {
    async fn list(
        &self,
        request: Request<v1::ListDiagnosticsRequest>,
    ) -> Result<Response<v1::ListDiagnosticsResponse>, Status> {
        let request = request.into_inner();
        let filter = match request.object {
            Some(object) => Some(
                ObjectRef::try_from(&object)
                    .map_err(|e| Status::invalid_argument(format!("object: {e}")))?,
            ),
            None => None,
        };
        let after = parse_page_token(&request.page_token)?;
        let page_size = match request.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let _slot = self
            .lists
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let statuses = self.collect(after.as_ref(), filter.as_ref(), page_size + 1);
        let available = statuses.len();
        let (mut objects, mut bytes, mut last) = (Vec::new(), 0, None);
        for (object, diagnostics) in statuses {
            if objects.len() == page_size || (!objects.is_empty() && bytes >= PAGE_BYTES) {
                break;
            }
            let status = object_status(&object, diagnostics);
            bytes += prost::Message::encoded_len(&status);
            objects.push(status);
            last = Some(object);
        }
        let next_page_token = match (objects.len() < available, last) {
            (true, Some(last)) => last.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(v1::ListDiagnosticsResponse {
            objects,
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use consul_smi_translate::{Index, TranslateOptions};

    use super::*;

    /// Issue 24, finding 11: one `List` answered everything in one message, which failed
    /// past 4 MiB (the default limit of every gRPC client, `consul-smi diagnostics`
    /// included). Paged, a 24k-object listing of about 6 MiB comes through whole.
    #[tokio::test]
    async fn a_listing_larger_than_a_grpc_message_comes_through_in_pages() {
        let invalid = InvalidObjects::default();
        let objects = 24_000;
        for i in 0..objects {
            invalid.set(
                ObjectRef::new(SmiKind::TrafficTarget, "default", format!("t{i:05}")),
                format!("spec.rules[0].kind: {}", "x".repeat(240)),
            );
        }
        let index = Arc::new(RwLock::new(Index::new(TranslateOptions::default())));
        let service = DiagnosticsService::new(index, invalid);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service.into_server())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut client = v1::translator_diagnostics_client::TranslatorDiagnosticsClient::connect(
            format!("http://{addr}"),
        )
        .await
        .unwrap();
        let (mut names, mut pages, mut token) = (Vec::new(), 0, String::new());
        loop {
            let page = client
                .list(v1::ListDiagnosticsRequest {
                    page_token: token,
                    ..Default::default()
                })
                .await
                .expect("every page fits in a gRPC message")
                .into_inner();
            pages += 1;
            names.extend(page.objects.into_iter().map(|o| o.object.unwrap().name));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let expected: Vec<String> = (0..objects).map(|i| format!("t{i:05}")).collect();
        assert_eq!(names.len(), objects);
        assert!(names == expected, "every object once, in order");
        assert!(pages > 1);

        // One object, and a page size.
        let one = client
            .list(v1::ListDiagnosticsRequest {
                object: Some(v1::ObjectRef {
                    kind: v1::SmiKind::TrafficTarget as i32,
                    namespace: "default".into(),
                    name: "t00042".into(),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(one.objects.len(), 1);
        assert!(one.next_page_token.is_empty());
        let small = client
            .list(v1::ListDiagnosticsRequest {
                page_size: 3,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(small.objects.len(), 3);
        assert_eq!(small.next_page_token, "TrafficTarget/default/t00002");
        let bad = client
            .list(v1::ListDiagnosticsRequest {
                page_token: "nonsense".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    }
}
