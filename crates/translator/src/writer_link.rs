//! The one task that talks to consul-writer. Commands are sent in order, in batches; any
//! failure to deliver switches to a full `Sync` of the index's desired state, which makes
//! lost or duplicated commands harmless.

use std::time::Duration;

use consul_smi_core::Command;
use consul_smi_grpc::v1::{self, consul_writer_client::ConsulWriterClient};
use consul_smi_translate::ConsulApi;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::SharedIndex;

pub(crate) enum LinkMessage {
    Commands(Vec<TracedCommand>),
    Sync,
}

/// A command with the trace context of the change it came from.
pub(crate) struct TracedCommand {
    pub(crate) command: Command,
    pub(crate) trace: Option<v1::TraceContext>,
    /// When the watcher observed that change (Unix nanoseconds, 0 = unknown).
    pub(crate) observed_at_unix_nanos: u64,
}

pub(crate) struct WriterLink {
    endpoint: consul_smi_grpc::tls::ClientEndpoint,
    index: SharedIndex,
    resync_every: Duration,
    client: Option<ConsulWriterClient<Channel>>,
    next_command_id: u64,
    /// Ready while Consul follows the index: from the first delivered Sync until a delivery
    /// fails.
    readiness: consul_smi_telemetry::Readiness,
    /// Where the Consul API the writer reports goes (`--consul-api auto` only).
    reported_api: Option<tokio::sync::watch::Sender<Option<ConsulApi>>>,
    /// Whether the writer behind the current connection has said which API it speaks.
    api_reported: bool,
}

impl WriterLink {
    pub(crate) fn new(
        endpoint: consul_smi_grpc::tls::ClientEndpoint,
        index: SharedIndex,
        resync_every: Duration,
        readiness: consul_smi_telemetry::Readiness,
        reported_api: Option<tokio::sync::watch::Sender<Option<ConsulApi>>>,
    ) -> Self {
        WriterLink {
            endpoint,
            index,
            resync_every,
            client: None,
            next_command_id: 0,
            readiness,
            reported_api,
            api_reported: false,
        }
    }

    pub(crate) async fn run(mut self, mut inbox: mpsc::Receiver<LinkMessage>) {
        // Nothing is sent before the first complete snapshot has reached the index: a Sync of
        // an empty index would delete every owned intention, an outage on every restart.
        // The pipeline asks for a Sync once the snapshot is in.
        let mut sync_needed = false;
        let mut have_snapshot = false;
        let mut attempt = 0u32;
        let mut resync = tokio::time::interval(self.resync_every);
        resync.tick().await;
        loop {
            let mut batch = Vec::new();
            if !sync_needed {
                tokio::select! {
                    message = inbox.recv() => match message {
                        Some(LinkMessage::Commands(commands)) => batch.extend(commands),
                        Some(LinkMessage::Sync) => {
                            have_snapshot = true;
                            sync_needed = true;
                        }
                        None => return,
                    },
                    _ = resync.tick(), if have_snapshot => sync_needed = true,
                }
            }
            // Take everything already queued: one RPC instead of many.
            while let Ok(message) = inbox.try_recv() {
                match message {
                    LinkMessage::Commands(commands) => batch.extend(commands),
                    LinkMessage::Sync => {
                        have_snapshot = true;
                        sync_needed = true;
                    }
                }
            }
            if sync_needed {
                // tonic reconnects a channel by itself, so a writer restarted after a Consul
                // upgrade may sit behind the same client: ask again before every Sync.
                self.api_reported = false;
            }
            self.ask_consul_api().await;
            if self.index_awaits_reported_api() {
                // Delivered now, the index's translation for the previous API would strip (or,
                // with --widen-l7-on-legacy, widen) L7 grants until the next Sync. The stream
                // consumer re-translates and then asks for the Sync that replaces this one.
                debug!(
                    "holding delivery until the index follows the Consul API the writer reported"
                );
                sync_needed = false;
                continue;
            }
            let delivered = if sync_needed {
                // The Sync reads the index now, so it also covers every queued command.
                self.sync().await
            } else {
                self.apply(batch).await
            };
            match delivered {
                Ok(()) => {
                    if sync_needed {
                        sync_needed = false;
                        resync.reset();
                        self.readiness.set_ready();
                    }
                    attempt = 0;
                }
                Err(error) => {
                    warn!(%error, attempt, "delivery to consul-writer failed; will Sync when it is back");
                    self.client = None;
                    self.readiness.set_not_ready();
                    // Never a Sync of an index that has not had its first snapshot.
                    sync_needed = have_snapshot;
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(crate::backoff(attempt)).await;
                }
            }
        }
    }

    /// Whether the writer reported a Consul API the index does not translate for yet.
    fn index_awaits_reported_api(&self) -> bool {
        let Some(reported) = self.reported_api.as_ref().and_then(|r| *r.borrow()) else {
            return false;
        };
        self.index
            .read()
            .expect("index lock poisoned")
            .options()
            .target
            != reported
    }

    /// Asks the writer behind a new connection which Consul API it speaks, once; a writer
    /// that cannot tell yet (Consul unreachable) is asked again before the next delivery.
    async fn ask_consul_api(&mut self) {
        let Some(reported_api) = self.reported_api.clone() else {
            return;
        };
        if self.api_reported {
            return;
        }
        // A connection failure here is the delivery's to report.
        let Ok(client) = self.client().await else {
            return;
        };
        match client.describe(v1::DescribeRequest {}).await {
            Ok(answer) => {
                self.api_reported = true;
                let api = match v1::ConsulApi::try_from(answer.into_inner().consul_api) {
                    Ok(v1::ConsulApi::Modern) => ConsulApi::Modern,
                    Ok(v1::ConsulApi::Legacy) => ConsulApi::Legacy,
                    _ => return,
                };
                info!(?api, "consul-writer reports Consul's intentions API");
                reported_api.send_if_modified(|current| {
                    let changed = *current != Some(api);
                    *current = Some(api);
                    changed
                });
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                self.api_reported = true;
                warn!(
                    "consul-writer cannot say which Consul API it speaks; translating for the legacy API"
                );
            }
            Err(status) => {
                debug!(%status, "consul-writer cannot say which Consul API it speaks yet")
            }
        }
    }

    async fn client(&mut self) -> Result<&mut ConsulWriterClient<Channel>, tonic::Status> {
        if self.client.is_none() {
            self.api_reported = false;
            let channel = self
                .endpoint
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("connect to writer: {e}")))?;
            self.client = Some(
                ConsulWriterClient::new(channel)
                    .max_decoding_message_size(consul_smi_grpc::writer::WRITER_MESSAGE_LIMIT)
                    .max_encoding_message_size(consul_smi_grpc::writer::WRITER_MESSAGE_LIMIT),
            );
        }
        Ok(self.client.as_mut().expect("client just set"))
    }

    async fn apply(&mut self, commands: Vec<TracedCommand>) -> Result<(), tonic::Status> {
        if commands.is_empty() {
            return Ok(());
        }
        let span = info_span!("apply_batch", commands = commands.len());
        // One batch may carry several changes: the batch links to each originating trace,
        // and each command keeps its own trace context for the writer's spans.
        let mut linked = std::collections::BTreeSet::new();
        for trace in commands.iter().filter_map(|c| c.trace.as_ref()) {
            if linked.insert(trace.traceparent.clone()) {
                consul_smi_telemetry::add_link(&span, &crate::trace_from_wire(trace));
            }
        }
        let wire: Vec<v1::Command> = commands
            .into_iter()
            .map(|traced| {
                self.next_command_id += 1;
                let mut command = consul_smi_grpc::writer::command_to_wire(
                    format!("c{}", self.next_command_id),
                    &traced.command,
                );
                command.trace = traced.trace;
                command.observed_at_unix_nanos = traced.observed_at_unix_nanos;
                command
            })
            .collect();
        let client = self.client().await?;
        let response = client
            .apply(v1::ApplyRequest { commands: wire })
            .instrument(span)
            .await?
            .into_inner();
        report_outcomes(&response.results);
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), tonic::Status> {
        let state = {
            let index = self.index.read().expect("index lock poisoned");
            v1::DesiredState::from(index.desired())
        };
        let span = info_span!(
            "sync",
            intentions = state.intentions.len(),
            splitters = state.splitters.len()
        );
        let client = self.client().await?;
        let response = client
            .sync(v1::SyncRequest {
                state: Some(state),
                trace: None,
            })
            .instrument(span)
            .await?
            .into_inner();
        info!(
            created = response.created,
            updated = response.updated,
            deleted = response.deleted,
            unchanged = response.unchanged,
            conflicts = response.conflicts,
            "synced Consul to the desired state"
        );
        report_outcomes(&response.results);
        Ok(())
    }
}

fn report_outcomes(results: &[v1::CommandResult]) {
    for result in results {
        match v1::Outcome::try_from(result.outcome).unwrap_or(v1::Outcome::Unspecified) {
            v1::Outcome::Applied | v1::Outcome::Unchanged => {}
            v1::Outcome::Conflict => {
                warn!(id = %result.id, message = %result.message, "conflict: an object consul-smi does not own is in the way")
            }
            v1::Outcome::Rejected => {
                warn!(id = %result.id, message = %result.message, "Consul rejected a command")
            }
            v1::Outcome::Failed | v1::Outcome::Unspecified => {
                warn!(id = %result.id, message = %result.message, "command failed; the next Sync retries it")
            }
        }
    }
}
