//! Consumes smi-watcher's stream: snapshot → `Index::reset`, deltas → `Index::apply/delete`,
//! and forwards the resulting commands to the writer link in small batches.

use std::time::Duration;

use consul_smi_api::{ObjectRef, SmiObject};
use consul_smi_core::Command;
use consul_smi_grpc::v1::{self, smi_watch_client::SmiWatchClient, watch_event::Event};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, info_span, warn};

use crate::SharedIndex;
use crate::diagnostics::InvalidObjects;
use crate::writer_link::{LinkMessage, TracedCommand};

pub(crate) struct Pipeline {
    pub(crate) watcher: consul_smi_grpc::tls::ClientEndpoint,
    pub(crate) index: SharedIndex,
    pub(crate) invalid: InvalidObjects,
    pub(crate) to_writer: mpsc::Sender<LinkMessage>,
    pub(crate) subscriber: String,
    pub(crate) batch_window: Duration,
    pub(crate) metrics: consul_smi_telemetry::Metrics,
    /// Where current diagnostics go to become Kubernetes Events (when enabled).
    pub(crate) events: Option<tokio::sync::watch::Sender<Vec<crate::events::ReportedDiagnostic>>>,
    /// Resume point: (epoch, last revision seen).
    pub(crate) position: Option<(String, u64)>,
    /// The Consul API consul-writer reports (`--consul-api auto` only).
    pub(crate) consul_api_updates:
        Option<tokio::sync::watch::Receiver<Option<consul_smi_translate::ConsulApi>>>,
    /// Held off (`STUCK`) while the stream fails again and again without progress.
    pub(crate) readiness: consul_smi_telemetry::Readiness,
    pub(crate) stall: Stall,
}

/// The watch stream fails at the same place on every attempt: an event the translator
/// cannot take, replayed by every resume, would otherwise stop all later changes
/// (revocations included) while the periodic Sync keeps Consul at the stale state.
pub(crate) struct Stall {
    failures: u32,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

/// Failed attempts in a row, with no event taken, after which the stream counts as stuck.
const STUCK_AFTER_FAILURES: u32 = 3;
/// How long a stream must stay up, if it delivers nothing, to count as making progress.
const STREAM_HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// The readiness reason (shown by `/readyz`).
const STUCK: &str = "the watch stream from smi-watcher cannot make progress";

impl Stall {
    pub(crate) fn register(metrics: &consul_smi_telemetry::Metrics) -> Stall {
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        metrics.register(
            "translator_watch_stream_stuck",
            "1 while the watch stream from smi-watcher keeps failing without delivering a change",
            gauge.clone(),
        );
        Stall { failures: 0, gauge }
    }
}

/// What woke the stream consumer.
// Lives for one loop iteration on the stack; boxing the message would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Wakeup {
    Message(Result<Option<v1::WatchEvent>, tonic::Status>),
    BatchDue,
    ConsulApiReported,
    /// The stream has stayed up for [`STREAM_HEALTHY_AFTER`].
    Healthy,
}

/// Resolves when the writer reports a (new) Consul API; never without auto-detection.
async fn consul_api_reported(
    updates: &mut Option<tokio::sync::watch::Receiver<Option<consul_smi_translate::ConsulApi>>>,
) {
    let Some(updates) = updates else {
        return std::future::pending().await;
    };
    if updates.changed().await.is_err() {
        // The writer link is gone (the process is ending): nothing more will be reported.
        std::future::pending::<()>().await;
    }
}

enum Handled {
    Commands(Vec<Command>),
    SyncNeeded,
}

/// A snapshot being received; applied to the index only once complete so that a stream cut
/// mid-snapshot never makes the index (and so Consul) lose objects.
struct PendingSnapshot {
    objects: Vec<SmiObject>,
    invalid: Vec<(ObjectRef, String)>,
}

impl Pipeline {
    pub(crate) async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            let start = self.position.clone();
            match self.follow_stream().await {
                Ok(()) => {
                    info!("watcher closed the stream; reconnecting");
                    attempt = 0;
                }
                Err(error) => {
                    warn!(%error, attempt, "watch stream failed; reconnecting");
                    attempt = attempt.saturating_add(1);
                    if self.position == start {
                        self.failed_without_progress(&error);
                    }
                }
            }
            self.metrics.inc_stream_reconnects("watch");
            // The writer link holds back Syncs until the index follows the API it reported:
            // adopt it even while the watcher is away.
            let backoff = tokio::time::sleep(crate::backoff(attempt));
            tokio::pin!(backoff);
            loop {
                tokio::select! {
                    _ = &mut backoff => break,
                    _ = consul_api_reported(&mut self.consul_api_updates) => {
                        self.switch_to_reported_consul_api().await;
                    }
                }
            }
        }
    }

    fn failed_without_progress(&mut self, error: &tonic::Status) {
        self.stall.failures = self.stall.failures.saturating_add(1);
        if self.stall.failures == STUCK_AFTER_FAILURES {
            error!(
                %error,
                resume = ?self.position,
                failures = self.stall.failures,
                "the watch stream keeps failing without delivering a change: SMI changes, \
                 revocations included, no longer reach Consul; not ready until it recovers"
            );
            self.readiness.block(STUCK);
            self.stall.gauge.set(1);
        }
    }

    fn made_progress(&mut self) {
        if self.stall.failures >= STUCK_AFTER_FAILURES {
            info!("the watch stream delivers changes again");
        }
        self.stall.failures = 0;
        self.readiness.unblock(STUCK);
        self.stall.gauge.set(0);
    }

    async fn follow_stream(&mut self) -> Result<(), tonic::Status> {
        let channel = self
            .watcher
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connect to watcher: {e}")))?;
        let mut client = SmiWatchClient::new(channel)
            .max_decoding_message_size(consul_smi_grpc::smi::WATCH_MESSAGE_LIMIT);
        let (epoch, after_revision) = self.position.clone().unwrap_or_default();
        let request = v1::WatchRequest {
            epoch,
            after_revision,
            subscriber: self.subscriber.clone(),
        };
        let mut stream = client.watch(request).await?.into_inner();
        info!(resume = ?self.position, "subscribed to smi-watcher");

        // A resumed stream with nothing to deliver (all quiet) moves no position: staying up
        // this long is progress too.
        let healthy_at = Instant::now() + STREAM_HEALTHY_AFTER;
        let mut snapshot: Option<PendingSnapshot> = None;
        let mut batch: Vec<TracedCommand> = Vec::new();
        let mut batch_deadline: Option<Instant> = None;
        loop {
            let wakeup = tokio::select! {
                message = stream.message() => Wakeup::Message(message),
                _ = tokio::time::sleep_until(healthy_at), if self.stall.failures > 0 => Wakeup::Healthy,
                _ = tokio::time::sleep_until(batch_deadline.unwrap_or_else(Instant::now)),
                    if batch_deadline.is_some() => Wakeup::BatchDue,
                _ = consul_api_reported(&mut self.consul_api_updates) => Wakeup::ConsulApiReported,
            };
            let message = match wakeup {
                Wakeup::Healthy => {
                    self.made_progress();
                    continue;
                }
                Wakeup::BatchDue => {
                    self.flush(&mut batch).await;
                    batch_deadline = None;
                    continue;
                }
                Wakeup::ConsulApiReported => {
                    // Commands translated for the previous API go first; the Sync after the
                    // switch supersedes them.
                    self.flush(&mut batch).await;
                    batch_deadline = None;
                    self.switch_to_reported_consul_api().await;
                    continue;
                }
                Wakeup::Message(Ok(message)) => message,
                Wakeup::Message(Err(status)) => {
                    // The resume position is already past these commands' events: deliver
                    // them before reconnecting, or nothing would.
                    self.flush(&mut batch).await;
                    return Err(status);
                }
            };
            let Some(event) = message else {
                self.flush(&mut batch).await;
                return Ok(());
            };
            if matches!(event.event, Some(Event::SnapshotBegin(_))) {
                // Commands from earlier deltas must reach the writer before the Sync this
                // snapshot ends with; delivered after it, they would undo it.
                self.flush(&mut batch).await;
                batch_deadline = None;
            }
            let commands = self.handle(event, &mut snapshot).await;
            if !commands.is_empty() {
                batch.extend(commands);
                batch_deadline.get_or_insert_with(|| Instant::now() + self.batch_window);
            }
            if batch.len() >= 512 {
                self.flush(&mut batch).await;
                batch_deadline = None;
            }
        }
    }

    async fn handle(
        &mut self,
        event: v1::WatchEvent,
        snapshot: &mut Option<PendingSnapshot>,
    ) -> Vec<TracedCommand> {
        let revision = event.revision;
        let epoch = event.epoch.clone();
        let observed_at_unix_nanos = event.observed_at_unix_nanos;
        let span = info_span!(
            "translate",
            revision,
            epoch = %epoch,
            kind = tracing::field::Empty,
            namespace = tracing::field::Empty,
            name = tracing::field::Empty
        );
        // The watcher started this change's trace; translation and the commands it yields
        // continue it.
        if let Some(trace) = &event.trace {
            consul_smi_telemetry::set_parent(&span, &crate::trace_from_wire(trace));
        }
        let handled = span.in_scope(|| self.handle_in_span(event.event, snapshot));
        // A resume point inside a snapshot would skip the part not yet received: only a
        // delta or a complete snapshot moves it.
        if snapshot.is_none() {
            self.position = Some((epoch, revision));
            if self.stall.failures > 0 {
                self.made_progress();
            }
        }
        if snapshot.is_none() {
            self.publish_events();
        }
        match handled {
            Handled::Commands(commands) => {
                let trace = consul_smi_telemetry::span_context(&span).map(|t| v1::TraceContext {
                    traceparent: t.traceparent,
                    tracestate: t.tracestate,
                });
                commands
                    .into_iter()
                    .map(|command| TracedCommand {
                        command,
                        trace: trace.clone(),
                        observed_at_unix_nanos,
                    })
                    .collect()
            }
            Handled::SyncNeeded => {
                // A switch the writer reported meanwhile goes into this Sync, not a later one.
                if self.adopt_reported_consul_api() {
                    self.publish_events();
                }
                self.record_gauges();
                // A fresh snapshot may follow a gap (our restart, the watcher's, lost
                // commands): a full Sync makes Consul exactly the desired state.
                let _ = self.to_writer.send(LinkMessage::Sync).await;
                Vec::new()
            }
        }
    }

    fn handle_in_span(
        &mut self,
        event: Option<Event>,
        snapshot: &mut Option<PendingSnapshot>,
    ) -> Handled {
        let record = |object: &ObjectRef| {
            let span = tracing::Span::current();
            span.record("kind", object.kind.as_str());
            span.record("namespace", object.namespace.as_str());
            span.record("name", object.name.as_str());
        };
        let commands = match event {
            Some(Event::SnapshotBegin(begin)) => {
                debug!(reason = begin.reason, "snapshot begins");
                *snapshot = Some(PendingSnapshot {
                    objects: Vec::new(),
                    invalid: Vec::new(),
                });
                Vec::new()
            }
            Some(Event::Applied(applied)) => match decode_object(applied.object.as_ref()) {
                Ok(object) => match snapshot {
                    Some(pending) => {
                        pending.objects.push(object);
                        Vec::new()
                    }
                    None => {
                        let object_ref = object.object_ref();
                        record(&object_ref);
                        self.invalid.clear(&object_ref);
                        let _index = info_span!("index_apply").entered();
                        self.index
                            .write()
                            .expect("index lock poisoned")
                            .apply(object)
                    }
                },
                Err(reason) => {
                    self.undecodable(applied.object.as_ref(), reason, snapshot);
                    Vec::new()
                }
            },
            Some(Event::Deleted(deleted)) => match decode_ref(deleted.object) {
                Ok(object) if snapshot.is_none() => {
                    record(&object);
                    self.invalid.clear(&object);
                    let _index = info_span!("index_delete").entered();
                    self.index
                        .write()
                        .expect("index lock poisoned")
                        .delete(&object)
                }
                Ok(_) => Vec::new(),
                Err(reason) => {
                    warn!(%reason, "undecodable delete in watch stream");
                    Vec::new()
                }
            },
            Some(Event::Invalid(invalid)) => {
                match decode_ref(invalid.object) {
                    Ok(object) => {
                        // The last valid version (if any) stays in the index: a broken edit
                        // must not revoke access that is already in effect.
                        // The reason can quote the object's content, which its author chose.
                        warn!(object = %object, reason = %consul_smi_telemetry::escape_control(&invalid.reason), "invalid SMI object");
                        match snapshot {
                            Some(pending) => pending.invalid.push((object, invalid.reason)),
                            None => self.invalid.set(object, invalid.reason),
                        }
                    }
                    Err(reason) => warn!(%reason, "undecodable invalid-object report"),
                }
                Vec::new()
            }
            Some(Event::SnapshotEnd(_)) => match snapshot.take() {
                Some(pending) => {
                    info!(
                        objects = pending.objects.len(),
                        invalid = pending.invalid.len(),
                        "snapshot complete"
                    );
                    self.invalid.replace(pending.invalid);
                    // No commands: the full Sync that follows carries the whole state.
                    self.index
                        .write()
                        .expect("index lock poisoned")
                        .replace(pending.objects);
                    return Handled::SyncNeeded;
                }
                None => Vec::new(),
            },
            None => Vec::new(),
        };
        Handled::Commands(commands)
    }

    /// An object the watcher sent but this translator cannot decode (a newer watcher, say) is
    /// treated like an invalid one: listed in diagnostics, and its last valid version stays in
    /// effect, also across snapshots, so skew between the two never revokes granted access.
    fn undecodable(
        &mut self,
        wire: Option<&v1::SmiObject>,
        reason: String,
        snapshot: &mut Option<PendingSnapshot>,
    ) {
        let Some((object, uid)) = wire.and_then(consul_smi_grpc::smi::wire_object_identity) else {
            warn!(%reason, "undecodable object without a name in the watch stream");
            return;
        };
        let reason = format!("smi-translator cannot decode this object: {reason}");
        warn!(object = %object, reason = %consul_smi_telemetry::escape_control(&reason), "undecodable SMI object");
        match snapshot {
            Some(pending) => {
                // Not the version of an object deleted and re-created under the same name
                // while the stream was down: that one's grants must not come back.
                let last_valid = self
                    .index
                    .read()
                    .expect("index lock poisoned")
                    .get(&object)
                    .filter(|kept| match (&kept.meta().uid, &uid) {
                        (Some(kept), Some(sent)) => kept == sent,
                        _ => true,
                    })
                    .cloned();
                pending.objects.extend(last_valid);
                pending.invalid.push((object, reason));
            }
            None => self.invalid.set(object, reason),
        }
    }

    async fn flush(&mut self, batch: &mut Vec<TracedCommand>) {
        self.record_gauges();
        if batch.is_empty() {
            return;
        }
        let commands = std::mem::take(batch);
        if self
            .to_writer
            .send(LinkMessage::Commands(commands))
            .await
            .is_err()
        {
            warn!("writer link stopped; commands dropped (the next Sync restores them)");
        }
    }
}

impl Pipeline {
    /// Re-translates everything for the Consul API the writer reported, if it differs from
    /// the index's; returns whether it did. The commands are not needed: a Sync carries the
    /// whole new desired state.
    fn adopt_reported_consul_api(&mut self) -> bool {
        let reported = self
            .consul_api_updates
            .as_mut()
            .and_then(|updates| *updates.borrow_and_update());
        let Some(api) = reported else { return false };
        let mut index = self.index.write().expect("index lock poisoned");
        let previous = index.options().target;
        if api == previous {
            return false;
        }
        info!(
            ?api,
            ?previous,
            "translating for the Consul API consul-writer reports"
        );
        let options = consul_smi_translate::TranslateOptions {
            target: api,
            ..index.options().clone()
        };
        let _ = index.set_options(options);
        true
    }

    /// Adopts a reported API between events, with the Sync the writer link waits for.
    async fn switch_to_reported_consul_api(&mut self) {
        if !self.adopt_reported_consul_api() {
            return;
        }
        self.record_gauges();
        self.publish_events();
        // Before the first complete snapshot the index is not worth a Sync: the snapshot's
        // own Sync will carry the new translation.
        if self.position.is_some() {
            let _ = self.to_writer.send(LinkMessage::Sync).await;
        }
    }

    /// The current diagnostics, to become Kubernetes Events (when enabled).
    fn publish_events(&self) {
        if let Some(events) = &self.events {
            let current = crate::events::current_diagnostics(
                &self.index.read().expect("index lock poisoned"),
            );
            events.send_replace(current);
        }
    }

    /// Diagnostics by severity and the writer link's backlog, for `/metrics`.
    fn record_gauges(&self) {
        let (mut errors, mut warnings) = (0, 0);
        for diagnostic in self
            .index
            .read()
            .expect("index lock poisoned")
            .diagnostics()
        {
            match diagnostic.severity {
                consul_smi_translate::Severity::Error => errors += 1,
                consul_smi_translate::Severity::Warning => warnings += 1,
            }
        }
        self.metrics.set_diagnostics("error", errors);
        self.metrics.set_diagnostics("warning", warnings);
        let backlog = self.to_writer.max_capacity() - self.to_writer.capacity();
        self.metrics
            .set_queue_depth("translator_to_writer", backlog as i64);
    }
}

fn decode_object(object: Option<&v1::SmiObject>) -> Result<SmiObject, String> {
    let object = object.ok_or_else(|| "event without object".to_string())?;
    SmiObject::try_from(object).map_err(|e| e.to_string())
}

fn decode_ref(object: Option<v1::ObjectRef>) -> Result<ObjectRef, String> {
    let object = object.ok_or_else(|| "event without object reference".to_string())?;
    ObjectRef::try_from(&object).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, RwLock};
    use std::time::Duration;

    use consul_smi_grpc::v1::{self, smi_watch_server::SmiWatch, watch_event::Event};
    use consul_smi_translate::{Index, TranslateOptions};
    use tokio::sync::mpsc;

    use super::Pipeline;
    use crate::diagnostics::InvalidObjects;

    /// Answers the first Watch with a snapshot cut after its first object, and records every
    /// request's resume point.
    #[derive(Clone, Default)]
    struct CutSnapshot {
        requests: Arc<Mutex<Vec<(String, u64)>>>,
    }

    #[tonic::async_trait]
    impl SmiWatch for CutSnapshot {
        type WatchStream =
            tokio_stream::Iter<std::vec::IntoIter<Result<v1::WatchEvent, tonic::Status>>>;

        async fn watch(
            &self,
            request: tonic::Request<v1::WatchRequest>,
        ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
            let request = request.into_inner();
            self.requests
                .lock()
                .unwrap()
                .push((request.epoch, request.after_revision));
            let event = |revision, event| v1::WatchEvent {
                epoch: "e1".into(),
                revision,
                event: Some(event),
                ..Default::default()
            };
            let events = vec![
                Ok(event(
                    7,
                    Event::SnapshotBegin(v1::SnapshotBegin { reason: 1 }),
                )),
                Ok(event(
                    7,
                    Event::Deleted(v1::Deleted {
                        object: Some(v1::ObjectRef {
                            kind: 1,
                            namespace: "default".into(),
                            name: "x".into(),
                        }),
                    }),
                )),
            ];
            Ok(tonic::Response::new(tokio_stream::iter(events)))
        }
    }

    /// A pipeline with an empty index, following the watcher at `watcher`.
    fn test_pipeline(
        watcher: &str,
        to_writer: mpsc::Sender<crate::writer_link::LinkMessage>,
    ) -> Pipeline {
        let metrics = consul_smi_telemetry::Metrics::new();
        Pipeline {
            watcher: consul_smi_grpc::tls::ClientEndpoint::new(watcher, None).unwrap(),
            index: Arc::new(RwLock::new(Index::new(TranslateOptions::default()))),
            invalid: InvalidObjects::default(),
            to_writer,
            subscriber: "test".into(),
            batch_window: Duration::from_millis(1),
            metrics: metrics.clone(),
            events: None,
            position: None,
            consul_api_updates: None,
            readiness: consul_smi_telemetry::Readiness::new(),
            stall: super::Stall::register(&metrics),
        }
    }

    #[tokio::test]
    async fn a_cut_snapshot_is_never_a_resume_point() {
        let service = CutSnapshot::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(v1::smi_watch_server::SmiWatchServer::new(service.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let (to_writer, _from_pipeline) = mpsc::channel(4);
        let pipeline = test_pipeline(&format!("http://{addr}"), to_writer);
        let task = tokio::spawn(pipeline.run());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while service.requests.lock().unwrap().len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the pipeline did not reconnect"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        let requests = service.requests.lock().unwrap().clone();
        assert_eq!(
            requests[1],
            (String::new(), 0),
            "reconnect after a cut snapshot must ask for a fresh one: {requests:?}"
        );
    }

    /// A watcher whose stream, after a snapshot, carries one event larger than any
    /// subscriber accepts, on every resume, until `fixed` is set: then a small delta instead.
    #[derive(Clone, Default)]
    struct OversizedDelta {
        fixed: Arc<std::sync::atomic::AtomicBool>,
    }

    #[tonic::async_trait]
    impl SmiWatch for OversizedDelta {
        type WatchStream =
            tokio_stream::Iter<std::vec::IntoIter<Result<v1::WatchEvent, tonic::Status>>>;

        async fn watch(
            &self,
            request: tonic::Request<v1::WatchRequest>,
        ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
            let event = |revision, event| {
                Ok(v1::WatchEvent {
                    epoch: "e1".into(),
                    revision,
                    event: Some(event),
                    ..Default::default()
                })
            };
            let mut events = Vec::new();
            if request.into_inner().epoch.is_empty() {
                events.push(event(
                    1,
                    Event::SnapshotBegin(v1::SnapshotBegin { reason: 1 }),
                ));
                events.push(event(1, Event::SnapshotEnd(v1::SnapshotEnd {})));
            }
            let mut route = wire(ROUTE);
            if !self.fixed.load(std::sync::atomic::Ordering::SeqCst)
                && let Some(v1::smi_object::Object::TcpRoute(r)) = &mut route.object
            {
                let meta = r.meta.as_mut().expect("meta");
                let big = "x".repeat(consul_smi_grpc::smi::WATCH_MESSAGE_LIMIT);
                meta.labels.insert("big".into(), big);
            }
            events.push(event(2, applied(route).unwrap()));
            Ok(tonic::Response::new(tokio_stream::iter(events)))
        }
    }

    /// Issue 24, finding 7: a stream that fails at the same event on every resume makes the
    /// translator not ready and is reported, and recovers once the event passes.
    #[tokio::test]
    async fn a_stream_that_cannot_make_progress_makes_the_translator_not_ready() {
        let service = OversizedDelta::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(v1::smi_watch_server::SmiWatchServer::new(service.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let (to_writer, mut from_pipeline) = mpsc::channel(64);
        tokio::spawn(async move { while from_pipeline.recv().await.is_some() {} });
        let pipeline = test_pipeline(&format!("http://{addr}"), to_writer);
        let (readiness, metrics, index) = (
            pipeline.readiness.clone(),
            pipeline.metrics.clone(),
            pipeline.index.clone(),
        );
        // As the writer link does once a Sync is delivered.
        readiness.set_ready();
        let task = tokio::spawn(pipeline.run());
        let stuck = |value: u8| format!("consul_smi_translator_watch_stream_stuck {value}");
        let wait_for = |what: &str, check: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !check() {
                assert!(std::time::Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let ready = readiness.clone();
        tokio::task::spawn_blocking(move || {
            wait_for("not ready while the stream is stuck", &|| !ready.is_ready());
        })
        .await
        .unwrap();
        assert!(
            metrics.encode().lines().any(|l| l == stuck(1)),
            "{}",
            metrics.encode()
        );
        assert_eq!(readiness.blocked_by(), [super::STUCK]);

        service
            .fixed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let ready = readiness.clone();
        tokio::task::spawn_blocking(move || {
            wait_for("ready again once the stream moves", &|| ready.is_ready());
        })
        .await
        .unwrap();
        assert!(metrics.encode().lines().any(|l| l == stuck(0)));
        let route =
            consul_smi_api::ObjectRef::new(consul_smi_api::SmiKind::TCPRoute, "default", "db");
        assert!(index.read().unwrap().get(&route).is_some());
        task.abort();
    }

    /// A watcher whose stream fails at once three times, then stays up with nothing to say
    /// (a quiet mesh after a network blip).
    #[derive(Clone, Default)]
    struct FailsThenQuiet {
        calls: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[tonic::async_trait]
    impl SmiWatch for FailsThenQuiet {
        type WatchStream = std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = Result<v1::WatchEvent, tonic::Status>> + Send>,
        >;

        async fn watch(
            &self,
            _request: tonic::Request<v1::WatchRequest>,
        ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
            let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let stream: Self::WatchStream = if call < 3 {
                Box::pin(tokio_stream::iter([Err(tonic::Status::internal("cut"))]))
            } else {
                Box::pin(tokio_stream::pending())
            };
            Ok(tonic::Response::new(stream))
        }
    }

    #[tokio::test]
    async fn a_stream_that_stays_up_counts_as_progress_even_when_quiet() {
        let service = FailsThenQuiet::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(v1::smi_watch_server::SmiWatchServer::new(service.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let (to_writer, _from_pipeline) = mpsc::channel(4);
        let pipeline = test_pipeline(&format!("http://{addr}"), to_writer);
        let readiness = pipeline.readiness.clone();
        readiness.set_ready();
        let task = tokio::spawn(pipeline.run());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while readiness.is_ready() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never counted as stuck"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while !readiness.is_ready() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a stream that stays up must clear the stuck state"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(service.calls.load(std::sync::atomic::Ordering::SeqCst), 4);
        task.abort();
    }

    fn wire(manifest: &str) -> v1::SmiObject {
        let object = consul_smi_api::decode_manifests(manifest)
            .remove(0)
            .expect("a valid manifest");
        v1::SmiObject::from(&object)
    }

    fn applied(object: v1::SmiObject) -> Option<Event> {
        Some(Event::Applied(v1::Applied {
            object: Some(object),
        }))
    }

    const ROUTE: &str = "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: db, namespace: default}\nspec: {matches: {ports: [5432]}}\n";
    const TARGET: &str = "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {name: t, namespace: default}\nspec:\n  destination: {kind: ServiceAccount, name: db, namespace: default}\n  rules: [{kind: TCPRoute, name: db}]\n  sources: [{kind: ServiceAccount, name: app, namespace: default}]\n";

    /// The route as a newer watcher might send it: content this translator rejects.
    fn undecodable_route() -> v1::SmiObject {
        let mut route = wire(ROUTE);
        if let Some(v1::smi_object::Object::TcpRoute(r)) = &mut route.object {
            r.matches.as_mut().expect("matches").ports = vec![70_000];
        }
        route
    }

    #[test]
    fn an_undecodable_object_is_reported_and_its_last_valid_version_kept_across_snapshots() {
        let (to_writer, _from_pipeline) = mpsc::channel(4);
        let mut pipeline = test_pipeline("http://127.0.0.1:1", to_writer);
        let (index, invalid) = (pipeline.index.clone(), pipeline.invalid.clone());
        let route =
            consul_smi_api::ObjectRef::new(consul_smi_api::SmiKind::TCPRoute, "default", "db");
        let ports = |index: &Index| match index.get(&route) {
            Some(consul_smi_api::SmiObject::TcpRoute(r)) => {
                r.matches.as_ref().map(|m| m.ports.clone())
            }
            other => panic!("route not in the index: {other:?}"),
        };
        let begin = || Some(Event::SnapshotBegin(v1::SnapshotBegin { reason: 1 }));
        let end = || Some(Event::SnapshotEnd(v1::SnapshotEnd::default()));

        let mut snapshot = None;
        for event in [begin(), applied(wire(ROUTE)), applied(wire(TARGET)), end()] {
            pipeline.handle_in_span(event, &mut snapshot);
        }
        assert_eq!(ports(&index.read().unwrap()), Some(vec![5432]));
        let granted = index.read().unwrap().desired().intentions.len();
        assert_eq!(granted, 1);

        // As a delta: reported, the valid version stays.
        pipeline.handle_in_span(applied(undecodable_route()), &mut snapshot);
        assert_eq!(ports(&index.read().unwrap()), Some(vec![5432]));
        let reported = invalid.snapshot();
        assert!(
            reported
                .get(&route)
                .is_some_and(|r| r.contains("cannot decode") && r.contains("ports")),
            "{reported:?}"
        );

        // In a fresh snapshot too.
        for event in [
            begin(),
            applied(wire(TARGET)),
            applied(undecodable_route()),
            end(),
        ] {
            pipeline.handle_in_span(event, &mut snapshot);
        }
        assert_eq!(ports(&index.read().unwrap()), Some(vec![5432]));
        assert_eq!(index.read().unwrap().desired().intentions.len(), granted);
        assert!(invalid.snapshot().contains_key(&route));

        // Deleted and re-created under the same name while the stream was down: the new
        // object (another uid) does not decode, and the old one's version must not stand in.
        let with_uid = |mut wire: v1::SmiObject, uid: &str| {
            if let Some(v1::smi_object::Object::TcpRoute(r)) = &mut wire.object {
                r.meta.as_mut().expect("meta").uid = Some(uid.into());
            }
            wire
        };
        pipeline.handle_in_span(applied(with_uid(wire(ROUTE), "old")), &mut snapshot);
        assert_eq!(ports(&index.read().unwrap()), Some(vec![5432]));
        for event in [
            begin(),
            applied(wire(TARGET)),
            applied(with_uid(undecodable_route(), "new")),
            end(),
        ] {
            pipeline.handle_in_span(event, &mut snapshot);
        }
        assert!(index.read().unwrap().get(&route).is_none());
        assert!(invalid.snapshot().contains_key(&route));
    }
}
