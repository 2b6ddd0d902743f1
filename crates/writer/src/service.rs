//! The `ConsulWriter` gRPC service over [`Writer`].

use std::sync::Arc;

use consul_smi_consul::{ApiFlavor, ConsulError, SyncReport};
use consul_smi_core::text::excerpt;
use consul_smi_core::{Command, DesiredState, Outcome};
use consul_smi_grpc::v1;
use consul_smi_telemetry::{TraceContext, add_link, set_parent};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::writer::Writer;

/// Implements `consul_smi.v1.ConsulWriter`.
#[derive(Clone, Debug)]
pub struct WriterService {
    writer: Arc<Writer>,
}

impl WriterService {
    pub fn new(writer: Arc<Writer>) -> Self {
        WriterService { writer }
    }

    pub fn into_server(self) -> v1::consul_writer_server::ConsulWriterServer<WriterService> {
        v1::consul_writer_server::ConsulWriterServer::new(self)
            .max_decoding_message_size(consul_smi_grpc::writer::WRITER_MESSAGE_LIMIT)
            .max_encoding_message_size(consul_smi_grpc::writer::WRITER_MESSAGE_LIMIT)
    }
}

fn trace_context(trace: Option<&v1::TraceContext>) -> Option<TraceContext> {
    trace
        .filter(|t| !t.traceparent.is_empty())
        .map(|t| TraceContext {
            traceparent: t.traceparent.clone(),
            tracestate: t.tracestate.clone(),
        })
}

/// How much of a caller's text (a decoding error, a command id) goes into a message or log.
const MESSAGE_MAX: usize = 300;
const ID_MAX: usize = 128;

/// `None` for 0, the proto default: the sender did not know when the change was observed.
fn observed_at(unix_nanos: u64) -> Option<std::time::SystemTime> {
    (unix_nanos > 0).then(|| std::time::UNIX_EPOCH + std::time::Duration::from_nanos(unix_nanos))
}

fn result(id: String, outcome: Outcome, message: String) -> v1::CommandResult {
    v1::CommandResult {
        id,
        outcome: v1::Outcome::from(outcome) as i32,
        message,
    }
}

fn status_of(error: ConsulError) -> Status {
    match &error {
        ConsulError::PermissionDenied { .. } => Status::permission_denied(error.to_string()),
        ConsulError::Unavailable { .. } => Status::unavailable(error.to_string()),
        ConsulError::Config(_) => Status::failed_precondition(error.to_string()),
        ConsulError::Refused { .. } => Status::invalid_argument(error.to_string()),
        _ => Status::internal(error.to_string()),
    }
}

fn sync_response(report: SyncReport) -> v1::SyncResponse {
    v1::SyncResponse {
        results: report
            .results
            .into_iter()
            .map(|r| result(format!("sync:{}", r.target), r.outcome, r.message))
            .collect(),
        created: report.created,
        updated: report.updated,
        deleted: report.deleted,
        unchanged: report.unchanged,
        conflicts: report.conflicts,
    }
}

#[tonic::async_trait]
impl v1::consul_writer_server::ConsulWriter for WriterService {
    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::info_span!("writer.apply", commands = request.commands.len());
        // A batch carries commands from several changes: link each originating trace.
        for command in &request.commands {
            if let Some(context) = trace_context(command.trace.as_ref()) {
                add_link(&span, &context);
            }
        }
        async move {
            // Commands that do not decode are rejected alone; the rest of the batch proceeds.
            let mut results: Vec<Option<v1::CommandResult>> = vec![None; request.commands.len()];
            let mut decoded: Vec<(usize, Command)> = Vec::with_capacity(request.commands.len());
            for (i, wire) in request.commands.iter().enumerate() {
                // The wire boundary: names are checked here, before any Consul request or
                // log line is made from them (and again where Consul paths are built).
                let checked = Command::try_from(wire)
                    .map_err(|e| excerpt(&e.to_string(), MESSAGE_MAX))
                    .and_then(|command| match command.validate() {
                        Ok(()) => Ok(command),
                        Err(e) => Err(format!("refused by consul-writer: {e}")),
                    });
                match checked {
                    Ok(command) => decoded.push((i, command)),
                    Err(message) => {
                        tracing::warn!(id = %excerpt(&wire.id, ID_MAX), %message, "command refused");
                        results[i] = Some(result(wire.id.clone(), Outcome::Rejected, message))
                    }
                }
            }
            let commands: Vec<Command> = decoded.iter().map(|(_, c)| c.clone()).collect();
            // One span per command, continuing the trace of the change it came from; the
            // Consul requests for that command are its children.
            let spans: Vec<tracing::Span> = decoded
                .iter()
                .map(|(i, command)| {
                    let wire = &request.commands[*i];
                    let span = tracing::info_span!(
                        "writer.command",
                        id = %excerpt(&wire.id, ID_MAX),
                        target = %command.target(),
                        outcome = tracing::field::Empty,
                    );
                    if let Some(context) = trace_context(wire.trace.as_ref()) {
                        set_parent(&span, &context);
                    }
                    span
                })
                .collect();
            let reports = self.writer.apply_in_spans(&commands, &spans).await;
            for (((i, _), report), span) in decoded.iter().zip(&reports).zip(&spans) {
                span.record("outcome", tracing::field::debug(report.outcome));
                // Consul holds what the change asked for: the change has propagated.
                if matches!(report.outcome, Outcome::Applied | Outcome::Unchanged)
                    && let Some(observed_at) =
                        observed_at(request.commands[*i].observed_at_unix_nanos)
                {
                    self.writer.metrics().observe_propagation(observed_at);
                }
            }
            drop(spans);
            for ((i, _), report) in decoded.iter().zip(reports) {
                results[*i] = Some(result(
                    request.commands[*i].id.clone(),
                    report.outcome,
                    report.message,
                ));
            }
            let results = results
                .into_iter()
                .map(|r| r.expect("every command has a result"))
                .collect();
            Ok(Response::new(v1::ApplyResponse { results }))
        }
        .instrument(span)
        .await
    }

    async fn sync(
        &self,
        request: Request<v1::SyncRequest>,
    ) -> Result<Response<v1::SyncResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::info_span!("writer.sync");
        if let Some(context) = trace_context(request.trace.as_ref()) {
            set_parent(&span, &context);
        }
        async move {
            // A missing state is not "nothing": it would delete everything owned. A caller
            // that means nothing sends an empty state.
            let wire = request.state.ok_or_else(|| {
                Status::invalid_argument(
                    "SyncRequest.state is missing (send an empty state to mean nothing)",
                )
            })?;
            let state = DesiredState::try_from(&wire)
                .map_err(|e| Status::invalid_argument(excerpt(&e.to_string(), MESSAGE_MAX)))?;
            state.validate().map_err(|e| {
                Status::invalid_argument(format!("Sync state refused by consul-writer: {e}"))
            })?;
            let report = self.writer.sync(state).await.map_err(status_of)?;
            Ok(Response::new(sync_response(report)))
        }
        .instrument(span)
        .await
    }

    async fn describe(
        &self,
        _request: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::DescribeResponse>, Status> {
        let flavor = self.writer.client().flavor().await.map_err(|e| {
            Status::unavailable(format!("cannot tell which API Consul speaks: {e}"))
        })?;
        let consul_api = match flavor {
            ApiFlavor::Legacy => v1::ConsulApi::Legacy,
            ApiFlavor::Modern => v1::ConsulApi::Modern,
        };
        Ok(Response::new(v1::DescribeResponse {
            consul_api: consul_api as i32,
        }))
    }
}
