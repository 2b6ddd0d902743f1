//! The store shared between the sources (writers) and any number of subscribers (readers).
//!
//! Subscribers pull: each one keeps a cursor (the last revision it sent) and reads the
//! changes after it from the store's bounded history, waiting on a revision notification when
//! it is up to date. Nothing is queued per subscriber beyond its bounded gRPC channel, so a
//! slow subscriber costs no memory and never slows the sources down; one that falls behind the
//! history gets a fresh snapshot (`REASON_RESUME_UNAVAILABLE`) instead of the changes it missed,
//! and one that stops reading altogether is dropped (see `run_subscription_with`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use consul_smi_api::ObjectRef;
use consul_smi_grpc::v1;
use consul_smi_grpc::v1::snapshot_begin::Reason;
use consul_smi_grpc::v1::watch_event::Event;
use consul_smi_telemetry::escape_control;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::metrics::{SnapshotCause, WatcherMetrics};
use crate::store::{Change, Delta, Observed, ResumeError, Scope, Store, TraceContext};

/// Deltas copied out of the store per lock acquisition.
const BATCH: usize = 128;

pub struct SharedStore {
    epoch: String,
    store: Mutex<Store>,
    revision: watch::Sender<u64>,
    ready: watch::Sender<bool>,
    /// Whether the source is keeping up (a directory that cannot be read or a scan that is
    /// stuck is not); readiness follows it once the initial state is complete.
    source_healthy: watch::Sender<bool>,
    closing: watch::Sender<bool>,
    metrics: WatcherMetrics,
}

impl SharedStore {
    /// A store whose metrics are recorded but exposed nowhere; see [`SharedStore::with_metrics`].
    pub fn new(epoch: String, history_limit: usize) -> Arc<SharedStore> {
        SharedStore::with_metrics(epoch, history_limit, WatcherMetrics::unregistered())
    }

    pub fn with_metrics(
        epoch: String,
        history_limit: usize,
        metrics: WatcherMetrics,
    ) -> Arc<SharedStore> {
        Arc::new(SharedStore {
            epoch,
            store: Mutex::new(Store::new(history_limit)),
            revision: watch::channel(0).0,
            ready: watch::channel(false).0,
            source_healthy: watch::channel(true).0,
            closing: watch::channel(false).0,
            metrics,
        })
    }

    pub fn metrics(&self) -> &WatcherMetrics {
        &self.metrics
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn revision(&self) -> u64 {
        self.lock().revision()
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the store half-updated in a way later
        // readers could misinterpret (each mutation is one insert/remove plus a push), so a
        // poisoned lock is still usable.
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `deltas`, just produced by `store`. Called with the lock held, so the gauges
    /// follow the store's order of changes even with concurrent writers.
    fn count(&self, store: &Store, deltas: &[Arc<Delta>]) {
        if deltas.is_empty() {
            return;
        }
        let mut kinds = Vec::new();
        for delta in deltas {
            self.metrics.changed(&delta.change);
            let kind = delta.change.kind();
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        for kind in kinds {
            self.metrics.set_held(kind, store.held(kind));
        }
        self.metrics.set_revision(store.revision());
    }

    fn published(&self, deltas: &[Arc<Delta>]) {
        if let Some(last) = deltas.last() {
            for delta in deltas {
                log_delta(delta);
            }
            self.revision.send_replace(last.revision);
        }
    }

    pub fn upsert(&self, observed: Observed) {
        let span = change_span("apply", &observed.object_ref());
        if let Observed::Valid(object) = &observed
            && let Some(resource_version) = &object.meta().resource_version
        {
            span.record("resource_version", resource_version.as_str());
        }
        let trace = consul_smi_telemetry::span_context(&span);
        let delta = {
            let mut store = self.lock();
            let delta = store.upsert(observed, trace);
            self.count(&store, delta.as_slice());
            delta
        };
        record_revision(&span, delta.as_slice());
        self.published(delta.as_slice());
    }

    pub fn delete(&self, object: &ObjectRef) {
        let span = change_span("delete", object);
        let trace = consul_smi_telemetry::span_context(&span);
        let delta = {
            let mut store = self.lock();
            let delta = store.delete(object, trace);
            self.count(&store, delta.as_slice());
            delta
        };
        record_revision(&span, delta.as_slice());
        self.published(delta.as_slice());
    }

    /// Replaces everything within `scope` with a complete listing; see [`Store::replace`].
    pub fn replace(&self, scope: Scope, observed: Vec<Observed>) {
        let span = tracing::info_span!("smi.relist", scope = ?scope, objects = observed.len());
        let trace = consul_smi_telemetry::span_context(&span);
        let deltas = {
            let mut store = self.lock();
            let deltas = store.replace(scope, observed, trace);
            self.count(&store, &deltas);
            deltas
        };
        if !deltas.is_empty() {
            info!(scope = ?scope, changes = deltas.len(), "re-list produced changes");
        }
        self.published(&deltas);
    }

    #[cfg(test)]
    pub(crate) fn snapshot_for_tests(&self) -> MutexGuard<'_, Store> {
        self.lock()
    }

    /// The sources have delivered their initial state: subscribers may get snapshots.
    pub fn set_ready(&self) {
        if !self.ready.send_replace(true) {
            let store = self.lock();
            info!(
                objects = store.len(),
                revision = store.revision(),
                "initial state complete; serving snapshots"
            );
        }
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives in `self`, so this cannot fail while we hold `&self`.
        let _ = ready.wait_for(|r| *r).await;
    }

    /// The source reports whether it is keeping up; see [`SharedStore::source_health`].
    pub fn set_source_healthy(&self, healthy: bool) {
        self.source_healthy
            .send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
    }

    /// Follows the source's health (initially healthy).
    pub fn source_health(&self) -> watch::Receiver<bool> {
        self.source_healthy.subscribe()
    }

    /// Ends every subscription (the server is shutting down).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Streams `request`'s events into `tx` until the subscriber goes away, the store closes,
    /// or the subscriber leaves [`DEFAULT_STALL_TIMEOUT`] pass without making room for the
    /// next event. Waits for the initial state first, so no subscriber ever sees a partial
    /// snapshot.
    pub async fn run_subscription(
        self: Arc<Self>,
        request: v1::WatchRequest,
        tx: mpsc::Sender<Result<v1::WatchEvent, tonic::Status>>,
    ) -> Ended {
        self.run_subscription_with(request, tx, DEFAULT_STALL_TIMEOUT)
            .await
    }

    /// [`SharedStore::run_subscription`] dropping a subscriber that leaves `stall` pass
    /// without making room for the next event: a subscriber that stopped reading would
    /// otherwise keep a copy of the snapshot it was being sent for as long as it stays
    /// connected. It resumes from where it was when it reconnects.
    pub async fn run_subscription_with(
        self: Arc<Self>,
        request: v1::WatchRequest,
        tx: mpsc::Sender<Result<v1::WatchEvent, tonic::Status>>,
        stall: Duration,
    ) -> Ended {
        let outcome = Subscription { tx, stall }.run(&self, request).await;
        if outcome == Ended::Stalled {
            self.metrics.subscriber_dropped();
        }
        outcome
    }
}

/// How long a subscriber may leave its queue full before it is dropped.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a subscription ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The subscriber went away or the store closed.
    Closed,
    /// The subscriber did not read for longer than the stall timeout.
    Stalled,
}

struct Subscription {
    tx: mpsc::Sender<Result<v1::WatchEvent, tonic::Status>>,
    stall: Duration,
}

impl Subscription {
    /// Queues `event`; `Err` ends the subscription.
    async fn send(&self, event: v1::WatchEvent) -> Result<(), Ended> {
        match tokio::time::timeout(self.stall, self.tx.send(Ok(event))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Ended::Closed),
            Err(_) => Err(Ended::Stalled),
        }
    }

    async fn run(self, shared: &SharedStore, request: v1::WatchRequest) -> Ended {
        match self.follow(shared, &request).await {
            Ok(never) => match never {},
            Err(Ended::Stalled) => {
                warn!(
                    subscriber = %subscriber_name(&request),
                    stall = ?self.stall,
                    "dropped a subscriber that stopped reading; it resumes when it reconnects"
                );
                Ended::Stalled
            }
            Err(Ended::Closed) => Ended::Closed,
        }
    }

    async fn follow(
        &self,
        this: &SharedStore,
        request: &v1::WatchRequest,
    ) -> Result<std::convert::Infallible, Ended> {
        let tx = &self.tx;
        let subscriber = subscriber_name(request);
        let _connected = this.metrics.subscriber_connected();
        let mut closing = this.closing.subscribe();
        tokio::select! {
            _ = this.wait_ready() => {}
            _ = tx.closed() => return Err(Ended::Closed),
            _ = closing.wait_for(|c| *c) => return Err(Ended::Closed),
        }
        let mut revisions = this.revision.subscribe();
        revisions.borrow_and_update();

        let resumable = !request.epoch.is_empty()
            && request.epoch == this.epoch
            && this.lock().deltas_after(request.after_revision, 0).is_ok();
        let mut cursor = if resumable {
            info!(
                subscriber,
                after_revision = request.after_revision,
                "subscriber resumed"
            );
            this.metrics.resumed();
            request.after_revision
        } else {
            let cause = if request.epoch.is_empty() {
                SnapshotCause::Initial
            } else {
                SnapshotCause::ResumeUnavailable
            };
            if cause == SnapshotCause::ResumeUnavailable {
                info!(
                    subscriber,
                    requested_epoch = %request.epoch,
                    after_revision = request.after_revision,
                    epoch = %this.epoch,
                    "cannot resume; sending a fresh snapshot"
                );
            }
            self.send_snapshot(this, cause).await?
        };

        loop {
            if *closing.borrow() {
                return Err(Ended::Closed);
            }
            revisions.borrow_and_update();
            let batch = this.lock().deltas_after(cursor, BATCH);
            match batch {
                Ok(deltas) if deltas.is_empty() => {
                    tokio::select! {
                        changed = revisions.changed() => if changed.is_err() { return Err(Ended::Closed) },
                        _ = tx.closed() => return Err(Ended::Closed),
                        _ = closing.changed() => {},
                    }
                }
                Ok(deltas) => {
                    for delta in deltas {
                        if let Err(ended) = self.send(delta_event(&this.epoch, &delta)).await {
                            debug!(subscriber, ?ended, "subscription ends");
                            return Err(ended);
                        }
                        cursor = delta.revision;
                    }
                }
                Err(ResumeError::Trimmed { oldest_available }) => {
                    warn!(
                        subscriber,
                        cursor,
                        oldest_available,
                        "subscriber fell behind the change history; sending a fresh snapshot"
                    );
                    cursor = self.send_snapshot(this, SnapshotCause::FellBehind).await?;
                }
                Err(ResumeError::Future { .. }) => unreachable!("cursor never passes the store"),
            }
        }
    }

    /// Sends SnapshotBegin, one Applied/Invalid per object, SnapshotEnd, all at the snapshot's
    /// revision, which it returns.
    async fn send_snapshot(&self, this: &SharedStore, cause: SnapshotCause) -> Result<u64, Ended> {
        this.metrics.snapshot_started(cause);
        let reason = match cause {
            SnapshotCause::Initial => Reason::Initial,
            SnapshotCause::ResumeUnavailable | SnapshotCause::FellBehind => {
                Reason::ResumeUnavailable
            }
        };
        let snapshot = this.lock().snapshot();
        let event = |e: Event| {
            on_the_wire(v1::WatchEvent {
                epoch: this.epoch.clone(),
                revision: snapshot.revision,
                event: Some(e),
                trace: None,
                observed_at_unix_nanos: 0,
            })
        };
        let begin = Event::SnapshotBegin(v1::SnapshotBegin {
            reason: reason as i32,
        });
        self.send(event(begin)).await?;
        for change in snapshot.changes() {
            self.send(event(change_event(&change))).await?;
        }
        self.send(event(Event::SnapshotEnd(v1::SnapshotEnd {})))
            .await?;
        Ok(snapshot.revision)
    }
}

fn subscriber_name(request: &v1::WatchRequest) -> &str {
    if request.subscriber.is_empty() {
        "anonymous"
    } else {
        &request.subscriber
    }
}

fn change_span(action: &'static str, object: &ObjectRef) -> tracing::Span {
    tracing::info_span!(
        "smi.change",
        action,
        kind = %object.kind,
        namespace = %object.namespace,
        name = %object.name,
        resource_version = tracing::field::Empty,
        revision = tracing::field::Empty
    )
}

fn record_revision(span: &tracing::Span, deltas: &[Arc<Delta>]) {
    if let Some(delta) = deltas.last() {
        span.record("revision", delta.revision);
    }
}

fn log_delta(delta: &Delta) {
    match &delta.change {
        Change::Applied(o) => {
            debug!(revision = delta.revision, object = %o.object_ref(), "applied")
        }
        Change::Deleted(r) => debug!(revision = delta.revision, object = %r, "deleted"),
        Change::Invalid {
            object,
            api_version,
            reason,
        } => {
            // The reason can quote the object's content: whoever writes SMI objects wrote it.
            warn!(
                revision = delta.revision,
                // An invalid object's name is as its author wrote it.
                object = %escape_control(&object.to_string()),
                api_version = %escape_control(api_version),
                reason = %escape_control(reason),
                "invalid SMI object"
            )
        }
    }
}

fn change_event(change: &Change) -> Event {
    match change {
        Change::Applied(o) => Event::Applied(v1::Applied {
            object: Some(v1::SmiObject::from(&**o)),
        }),
        Change::Deleted(r) => Event::Deleted(v1::Deleted {
            object: Some(v1::ObjectRef::from(r)),
        }),
        Change::Invalid {
            object,
            api_version,
            reason,
        } => Event::Invalid(v1::Invalid {
            object: Some(v1::ObjectRef::from(object)),
            api_version: api_version.clone(),
            reason: reason.clone(),
        }),
    }
}

fn delta_event(epoch: &str, delta: &Delta) -> v1::WatchEvent {
    on_the_wire(v1::WatchEvent {
        epoch: epoch.to_string(),
        revision: delta.revision,
        event: Some(change_event(&delta.change)),
        trace: delta.trace.as_ref().map(trace_to_wire),
        observed_at_unix_nanos: unix_nanos(delta.observed_at),
    })
}

/// Every event leaves through here. One larger than the subscribers' message limit would
/// fail their stream at it on every resume, so nothing after it (revocations included) would
/// ever arrive. The decoder's object size limit keeps this from happening; this is the net.
fn on_the_wire(event: v1::WatchEvent) -> v1::WatchEvent {
    let (event, changed) = consul_smi_grpc::smi::fit_watch_event(event);
    if changed {
        warn!(
            revision = event.revision,
            limit = consul_smi_grpc::smi::WATCH_MESSAGE_LIMIT,
            "an event too large for the watch stream was sent as invalid"
        );
    }
    event
}

fn unix_nanos(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn trace_to_wire(trace: &TraceContext) -> v1::TraceContext {
    v1::TraceContext {
        traceparent: trace.traceparent.clone(),
        tracestate: trace.tracestate.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use consul_smi_api::{Meta, SmiKind, SmiObject, TcpRoute};
    use consul_smi_telemetry::Metrics;

    use super::*;

    fn metered(epoch: &str, history_limit: usize) -> (Arc<SharedStore>, Metrics) {
        let metrics = Metrics::new();
        let shared = SharedStore::with_metrics(
            epoch.into(),
            history_limit,
            WatcherMetrics::register(&metrics),
        );
        (shared, metrics)
    }

    #[track_caller]
    fn assert_exposes(metrics: &Metrics, lines: &[&str]) {
        let text = metrics.encode();
        for line in lines {
            assert!(
                text.lines().any(|l| l == *line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    fn route(name: &str, rv: u32) -> Observed {
        Observed::Valid(SmiObject::TcpRoute(TcpRoute {
            meta: Meta {
                namespace: "default".into(),
                name: name.into(),
                resource_version: Some(rv.to_string()),
                ..Meta::default()
            },
            matches: None,
        }))
    }

    fn request(epoch: &str, after_revision: u64) -> v1::WatchRequest {
        v1::WatchRequest {
            epoch: epoch.into(),
            after_revision,
            subscriber: "test".into(),
        }
    }

    type Rx = mpsc::Receiver<Result<v1::WatchEvent, tonic::Status>>;

    fn subscribe(shared: &Arc<SharedStore>, req: v1::WatchRequest, buffer: usize) -> Rx {
        let (tx, rx) = mpsc::channel(buffer);
        tokio::spawn(shared.clone().run_subscription(req, tx));
        rx
    }

    async fn next(rx: &mut Rx) -> v1::WatchEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event within 5 s")
            .expect("stream open")
            .expect("not an error")
    }

    /// A compact description of an event: `begin:initial@2`, `applied:a@3`, `deleted:a@4`, ...
    fn describe(event: &v1::WatchEvent) -> String {
        let what = match event.event.as_ref().unwrap() {
            Event::SnapshotBegin(b) if b.reason == Reason::Initial as i32 => "begin:initial".into(),
            Event::SnapshotBegin(_) => "begin:unavailable".into(),
            Event::SnapshotEnd(_) => "end".into(),
            Event::Applied(a) => match a.object.as_ref().unwrap().object.as_ref().unwrap() {
                v1::smi_object::Object::TcpRoute(r) => {
                    format!("applied:{}", r.meta.as_ref().unwrap().name)
                }
                _ => "applied:?".into(),
            },
            Event::Deleted(d) => format!("deleted:{}", d.object.as_ref().unwrap().name),
            Event::Invalid(i) => format!("invalid:{}", i.object.as_ref().unwrap().name),
        };
        format!("{what}@{}", event.revision)
    }

    async fn take(rx: &mut Rx, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(describe(&next(rx).await));
        }
        out
    }

    #[tokio::test]
    async fn subscribers_wait_for_the_initial_state_then_get_snapshot_and_deltas() {
        let shared = SharedStore::new("e1".into(), 100);
        let mut rx = subscribe(&shared, request("", 0), 16);
        shared.replace(Scope::Kind(SmiKind::TCPRoute), vec![route("a", 1)]);
        // Not ready yet: nothing may be sent, or the subscriber would act on a partial state.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), rx.recv())
                .await
                .is_err()
        );
        shared.upsert(route("b", 1));
        shared.set_ready();
        assert_eq!(
            take(&mut rx, 4).await,
            ["begin:initial@2", "applied:a@2", "applied:b@2", "end@2"]
        );
        shared.delete(&ObjectRef::new(SmiKind::TCPRoute, "default", "a"));
        shared.upsert(route("c", 1));
        assert_eq!(take(&mut rx, 2).await, ["deleted:a@3", "applied:c@4"]);
    }

    #[tokio::test]
    async fn resume_in_the_same_epoch_sends_only_missed_deltas() {
        let (shared, metrics) = metered("e1", 100);
        shared.set_ready();
        shared.upsert(route("a", 1));
        shared.upsert(route("b", 1));
        shared.upsert(route("a", 2));
        let mut rx = subscribe(&shared, request("e1", 1), 16);
        assert_eq!(take(&mut rx, 2).await, ["applied:b@2", "applied:a@3"]);
        shared.upsert(route("c", 1));
        assert_eq!(take(&mut rx, 1).await, ["applied:c@4"]);
        assert_exposes(
            &metrics,
            &[
                "consul_smi_watcher_resumes_total 1",
                "consul_smi_watcher_snapshots_total{cause=\"initial\"} 0",
                "consul_smi_watcher_subscribers 1",
                "consul_smi_watcher_revision 4",
                "consul_smi_watcher_changes_total{kind=\"TCPRoute\",change=\"applied\"} 4",
                "consul_smi_watcher_objects{kind=\"TCPRoute\"} 3",
            ],
        );
    }

    #[tokio::test]
    async fn resume_from_another_epoch_or_beyond_history_gets_a_fresh_snapshot() {
        let (shared, metrics) = metered("e2", 2);
        shared.set_ready();
        for rv in 1..=5 {
            shared.upsert(route("a", rv));
        }
        let mut other_epoch = subscribe(&shared, request("e1", 5), 16);
        assert_eq!(
            take(&mut other_epoch, 3).await,
            ["begin:unavailable@5", "applied:a@5", "end@5"]
        );
        let mut trimmed = subscribe(&shared, request("e2", 1), 16);
        assert_eq!(
            take(&mut trimmed, 3).await,
            ["begin:unavailable@5", "applied:a@5", "end@5"]
        );
        let mut future = subscribe(&shared, request("e2", 99), 16);
        assert_eq!(take(&mut future, 1).await, ["begin:unavailable@5"]);
        assert_exposes(
            &metrics,
            &[
                "consul_smi_watcher_snapshots_total{cause=\"resume_unavailable\"} 3",
                "consul_smi_watcher_snapshots_total{cause=\"fell_behind\"} 0",
                "consul_smi_watcher_resumes_total 0",
                "consul_smi_watcher_subscribers 3",
            ],
        );
    }

    #[tokio::test]
    async fn a_slow_subscriber_costs_no_memory_and_catches_up_with_a_fresh_snapshot() {
        let (shared, metrics) = metered("e1", 8);
        shared.set_ready();
        let mut rx = subscribe(&shared, request("", 0), 1);
        assert_eq!(take(&mut rx, 2).await, ["begin:initial@0", "end@0"]);
        // The subscriber reads nothing while 1,000 changes happen: at most one event waits in
        // its channel, the history keeps 8, and the writer is never blocked.
        for rv in 1..=1000 {
            shared.upsert(route(&format!("r{}", rv % 3), rv));
        }
        assert_eq!(shared.revision(), 1000);
        let mut events = Vec::new();
        loop {
            let event = next(&mut rx).await;
            let done = event.revision == 1000 && matches!(event.event, Some(Event::SnapshotEnd(_)));
            events.push(describe(&event));
            if done {
                break;
            }
        }
        assert!(
            events.contains(&"begin:unavailable@1000".to_string()),
            "{events:?}"
        );
        assert!(
            events.len() < 20,
            "caught up through a snapshot, not 1,000 deltas: {events:?}"
        );
        shared.upsert(route("late", 1));
        assert_eq!(take(&mut rx, 1).await, ["applied:late@1001"]);
        // The test runtime runs the subscription only while the test awaits, so it fell
        // behind exactly once: after the 1,000 changes.
        assert_exposes(
            &metrics,
            &[
                "consul_smi_watcher_snapshots_total{cause=\"initial\"} 1",
                "consul_smi_watcher_snapshots_total{cause=\"fell_behind\"} 1",
                "consul_smi_watcher_revision 1001",
                "consul_smi_watcher_objects{kind=\"TCPRoute\"} 4",
            ],
        );
    }

    #[tokio::test]
    async fn many_subscribers_see_the_same_sequence() {
        let shared = SharedStore::new("e1".into(), 1000);
        shared.set_ready();
        let mut subscribers: Vec<Rx> = (0..50)
            .map(|_| subscribe(&shared, request("", 0), 4))
            .collect();
        for rx in &mut subscribers {
            assert_eq!(take(rx, 2).await, ["begin:initial@0", "end@0"]);
        }
        for rv in 1..=20 {
            shared.upsert(route("a", rv));
        }
        let expected: Vec<String> = (1..=20).map(|r| format!("applied:a@{r}")).collect();
        for rx in &mut subscribers {
            assert_eq!(take(rx, 20).await, expected);
        }
    }

    #[tokio::test]
    async fn closing_ends_every_subscription() {
        let (shared, metrics) = metered("e1", 10);
        shared.set_ready();
        let mut rx = subscribe(&shared, request("", 0), 4);
        take(&mut rx, 2).await;
        assert_exposes(&metrics, &["consul_smi_watcher_subscribers 1"]);
        shared.close();
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(end.is_none(), "stream ends");
        // The subscription dropped its count before its channel.
        assert_exposes(&metrics, &["consul_smi_watcher_subscribers 0"]);
    }
}
