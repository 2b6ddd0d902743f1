//! The writer's core: applies commands and states through the ownership-aware reconciler,
//! remembers the last desired state, and repairs drift from Consul's blocking queries.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use consul_smi_consul::{
    ApiFlavor, Blocking, Call, CommandReport, ConsulClient, ConsulError, Owner, Reconciler,
    RequestObserver, SyncMode, SyncReport,
};
use consul_smi_core::names::InvalidName;
use consul_smi_core::{Command, DesiredState, Outcome};
use consul_smi_telemetry::{ConsulOutcome, Metrics};
use tokio::sync::{Mutex, Notify, watch};

use crate::config::WriterConfig;
use crate::error::WriterError;

/// What the writer believes Consul should hold: the last `Sync` state with every applied
/// command folded in. Drift repair reconciles Consul back to it.
#[derive(Debug, Default)]
struct Memory {
    state: DesiredState,
    /// A full state arrived (`Sync`). Before that, drift repair only restores and never
    /// deletes: the writer does not yet know everything it should own.
    baseline: bool,
}

impl Memory {
    fn fold(&mut self, command: &Command, outcome: Outcome) {
        // Only what Consul holds (or what an operator's object holds the place of) is
        // remembered. A rejected or failed command never is: drift repair would replay it
        // outside any caller's view (and the next Sync carries whatever is still wanted).
        if matches!(outcome, Outcome::Rejected | Outcome::Failed) {
            return;
        }
        let state = &mut self.state;
        match command {
            Command::UpsertIntention(i) => {
                state.intentions.insert(i.key.clone(), i.clone());
            }
            Command::DeleteIntention(k) => {
                state.intentions.remove(k);
            }
            Command::UpsertSplitter(s) => {
                state.splitters.insert(s.service.clone(), s.clone());
            }
            Command::DeleteSplitter(s) => {
                state.splitters.remove(s);
            }
            Command::UpsertServiceDefaults(d) => {
                state.service_defaults.insert(d.service.clone(), d.clone());
            }
            Command::DeleteServiceDefaults(s) => {
                state.service_defaults.remove(s);
            }
        }
    }
}

/// Counters a test or an admin endpoint can read (Prometheus gets the same via [`Metrics`]).
#[derive(Debug, Default)]
pub struct WriterCounters {
    pub commands: AtomicU64,
    pub syncs: AtomicU64,
    pub conflicts: AtomicU64,
    pub drift_passes: AtomicU64,
    /// Objects created, updated or deleted by drift repair.
    pub drift_repairs: AtomicU64,
}

/// The consul-writer.
pub struct Writer {
    reconciler: Reconciler,
    memory: std::sync::Mutex<Memory>,
    /// One reconcile at a time: Apply, Sync and drift repair must not interleave writes.
    write_lock: Mutex<()>,
    known_conflicts: std::sync::Mutex<HashSet<String>>,
    metrics: Metrics,
    /// Owned objects drift repair stopped rewriting (Consul holds them differently right
    /// after each write); see `Reconciler::stalled_objects`.
    stalled: prometheus_client::metrics::gauge::Gauge,
    counters: WriterCounters,
    config: WriterConfig,
    /// Wakes the drift loop early (after a failed pass, or for tests).
    nudge: Notify,
}

struct MetricsObserver(Metrics);

impl RequestObserver for MetricsObserver {
    fn observe(
        &self,
        method: &tonic::codegen::http::Method,
        _path: &str,
        status: Option<u16>,
        elapsed: Duration,
    ) {
        let outcome = match status.and_then(|s| tonic::codegen::http::StatusCode::from_u16(s).ok())
        {
            Some(status) => ConsulOutcome::from_status(status),
            None => ConsulOutcome::TransportError,
        };
        self.0
            .observe_consul_request(method.as_str(), outcome, elapsed);
    }

    fn add_headers(&self, headers: &mut tonic::codegen::http::HeaderMap) {
        consul_smi_telemetry::inject_http_headers(headers);
    }
}

fn refused_report(command: &Command, error: &InvalidName) -> CommandReport {
    CommandReport {
        target: command.target(),
        outcome: Outcome::Rejected,
        change: consul_smi_consul::Change::None,
        message: format!("refused by consul-writer: {error}"),
    }
}

fn kind_of(target: &str) -> &str {
    target
        .split_once(' ')
        .map(|(kind, _)| kind)
        .unwrap_or(target)
}

impl Writer {
    pub fn new(config: WriterConfig, metrics: Metrics) -> Result<Arc<Writer>, WriterError> {
        let observer: Arc<dyn RequestObserver> = Arc::new(MetricsObserver(metrics.clone()));
        let client = ConsulClient::with_observer(&config.consul, Some(observer))?;
        let owner = Owner::new(config.writer_id.clone())?;
        let reconciler = Reconciler::new(client, owner, config.write_concurrency);
        let stalled = prometheus_client::metrics::gauge::Gauge::default();
        metrics.register(
            "writer_stalled_objects",
            "Owned Consul objects not rewritten because Consul held them differently right after each write (no progress)",
            stalled.clone(),
        );
        Ok(Arc::new(Writer {
            reconciler,
            memory: std::sync::Mutex::new(Memory::default()),
            write_lock: Mutex::new(()),
            known_conflicts: Default::default(),
            metrics,
            stalled,
            counters: WriterCounters::default(),
            config,
            nudge: Notify::new(),
        }))
    }

    pub fn client(&self) -> &ConsulClient {
        self.reconciler.client()
    }

    pub fn counters(&self) -> &WriterCounters {
        &self.counters
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The state drift repair restores (last Sync plus applied commands).
    pub fn desired_state(&self) -> DesiredState {
        self.memory().state.clone()
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a batch; one report per command, in order.
    pub async fn apply(&self, commands: &[Command]) -> Vec<CommandReport> {
        self.apply_in_spans(commands, &[]).await
    }

    /// Like [`apply`](Self::apply), making the Consul requests for `commands[i]` inside
    /// `spans[i]` (see [`Reconciler::apply_in_spans`]).
    pub async fn apply_in_spans(
        &self,
        commands: &[Command],
        spans: &[tracing::Span],
    ) -> Vec<CommandReport> {
        // The gRPC service checks names at the wire; this library entry checks them again.
        let checked: Vec<Result<(), InvalidName>> =
            commands.iter().map(Command::validate).collect();
        if checked.iter().all(Result::is_ok) {
            return self.apply_valid(commands, spans).await;
        }
        let valid: Vec<usize> = (0..commands.len())
            .filter(|&i| checked[i].is_ok())
            .collect();
        let valid_commands: Vec<Command> = valid.iter().map(|&i| commands[i].clone()).collect();
        let valid_spans: Vec<tracing::Span> = match spans.is_empty() {
            true => Vec::new(),
            false => valid
                .iter()
                .map(|&i| spans.get(i).cloned().unwrap_or_else(tracing::Span::none))
                .collect(),
        };
        let mut applied = self
            .apply_valid(&valid_commands, &valid_spans)
            .await
            .into_iter();
        let mut refused = Vec::new();
        let reports = commands
            .iter()
            .zip(checked)
            .map(|(command, check)| match check {
                Ok(()) => applied.next().expect("one report per valid command"),
                Err(e) => {
                    let report = refused_report(command, &e);
                    refused.push(report.clone());
                    report
                }
            })
            .collect();
        self.record(&refused, true);
        reports
    }

    async fn apply_valid(
        &self,
        commands: &[Command],
        spans: &[tracing::Span],
    ) -> Vec<CommandReport> {
        if commands.is_empty() {
            return Vec::new();
        }
        let _guard = self.write_lock.lock().await;
        let reports = self.reconciler.apply_in_spans(commands, spans).await;
        {
            let mut memory = self.memory();
            for (command, report) in commands.iter().zip(&reports) {
                memory.fold(command, report.outcome);
            }
        }
        self.counters
            .commands
            .fetch_add(commands.len() as u64, Ordering::Relaxed);
        self.record(&reports, true);
        reports
    }

    /// Makes `state` the whole desired state and reconciles Consul to it. The memory takes
    /// the state only once the Sync went through: a failed Sync leaves drift repair working
    /// from the last good one.
    pub async fn sync(&self, state: DesiredState) -> Result<SyncReport, ConsulError> {
        state.validate().map_err(|e| ConsulError::Refused {
            what: "Sync".into(),
            message: e.to_string(),
        })?;
        let _guard = self.write_lock.lock().await;
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        let report = self.reconciler.sync(&state, SyncMode::Exact).await?;
        {
            let mut memory = self.memory();
            memory.state = state;
            memory.baseline = true;
        }
        self.record(&report.results, true);
        Ok(report)
    }

    /// One drift-repair pass: reconciles Consul to the remembered state.
    pub async fn repair_drift(&self) -> Result<SyncReport, ConsulError> {
        let _guard = self.write_lock.lock().await;
        let (state, mode) = {
            let memory = self.memory();
            let mode = if memory.baseline {
                SyncMode::Exact
            } else {
                SyncMode::RestoreOnly
            };
            (memory.state.clone(), mode)
        };
        self.counters.drift_passes.fetch_add(1, Ordering::Relaxed);
        if state.is_empty() && mode == SyncMode::RestoreOnly {
            return Ok(SyncReport::default());
        }
        let report = self.reconciler.sync(&state, mode).await?;
        let repaired = u64::from(report.created + report.updated + report.deleted);
        if repaired > 0 {
            self.counters
                .drift_repairs
                .fetch_add(repaired, Ordering::Relaxed);
            tracing::warn!(
                created = report.created,
                updated = report.updated,
                deleted = report.deleted,
                "repaired drift: owned Consul objects were changed or deleted out of band"
            );
        }
        // Conflicts already reported once are not news on every pass.
        self.record(&report.results, false);
        Ok(report)
    }

    fn record(&self, reports: &[CommandReport], commanded: bool) {
        self.stalled
            .set(i64::try_from(self.reconciler.stalled_objects()).unwrap_or(i64::MAX));
        let mut known = self
            .known_conflicts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for report in reports {
            match report.outcome {
                Outcome::Conflict => {
                    let new = known.insert(report.target.clone());
                    if commanded || new {
                        self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                        self.metrics.inc_conflicts(kind_of(&report.target));
                        tracing::warn!(target_object = %report.target, message = %report.message, "conflict: object not owned by this writer");
                    }
                }
                Outcome::Rejected => {
                    tracing::warn!(target_object = %report.target, message = %report.message, "Consul rejected");
                }
                Outcome::Failed => {
                    tracing::warn!(target_object = %report.target, message = %report.message, "write failed after retries");
                }
                Outcome::Applied | Outcome::Unchanged => {
                    known.remove(&report.target);
                }
            }
        }
    }

    /// Wakes the drift loop now.
    pub fn nudge_drift_repair(&self) {
        self.nudge.notify_one();
    }

    /// Watches Consul with blocking queries and repairs drift until `stop` turns true.
    pub async fn run_drift_repair(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let changed = Arc::new(Notify::new());
        let flavor = loop {
            match self.client().flavor().await {
                Ok(flavor) => break flavor,
                Err(e) => {
                    tracing::warn!(error = %e, "drift repair waits for Consul");
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let mut watches = Vec::new();
        for endpoint in Endpoint::all(flavor) {
            let watcher = Watcher {
                client: self.client().clone(),
                owner_filter: self.config.writer_id.clone(),
                endpoint,
                wait: self.config.drift_wait,
                pace: self.config.drift_debounce,
                changed: changed.clone(),
            };
            watches.push(tokio::spawn(watcher.run()));
        }
        let mut retry: Option<Duration> = None;
        loop {
            let sleep = tokio::time::sleep(retry.unwrap_or(Duration::from_secs(3600)));
            tokio::select! {
                _ = stop.changed() => break,
                _ = changed.notified() => {}
                _ = self.nudge.notified() => {}
                _ = sleep => {}
            }
            tokio::time::sleep(self.config.drift_debounce).await;
            match self.repair_drift().await {
                Ok(report) if report.failed > 0 => {
                    retry = Some(next_retry(retry));
                    tracing::warn!(failed = report.failed, retry_in = ?retry, "drift repair incomplete");
                }
                Ok(_) => retry = None,
                Err(e) => {
                    retry = Some(next_retry(retry));
                    tracing::warn!(error = %e, retry_in = ?retry, "drift repair pass failed");
                }
            }
        }
        for watch in watches {
            watch.abort();
        }
    }
}

fn next_retry(previous: Option<Duration>) -> Duration {
    previous
        .map(|d| (d * 2).min(Duration::from_secs(10)))
        .unwrap_or(Duration::from_millis(500))
}

#[derive(Clone, Copy, Debug)]
enum Endpoint {
    LegacyIntentions,
    ServiceIntentions,
    ServiceSplitters,
    ServiceDefaults,
}

impl Endpoint {
    fn all(flavor: ApiFlavor) -> [Endpoint; 3] {
        let intentions = match flavor {
            ApiFlavor::Legacy => Endpoint::LegacyIntentions,
            ApiFlavor::Modern => Endpoint::ServiceIntentions,
        };
        [
            intentions,
            Endpoint::ServiceSplitters,
            Endpoint::ServiceDefaults,
        ]
    }

    fn path(self) -> &'static str {
        match self {
            Endpoint::LegacyIntentions => "/v1/connect/intentions",
            Endpoint::ServiceIntentions => "/v1/config/service-intentions",
            Endpoint::ServiceSplitters => "/v1/config/service-splitter",
            Endpoint::ServiceDefaults => "/v1/config/service-defaults",
        }
    }
}

/// One blocking query loop; signals `changed` whenever Consul's index for it moves.
struct Watcher {
    client: ConsulClient,
    owner_filter: String,
    endpoint: Endpoint,
    wait: Duration,
    pace: Duration,
    changed: Arc<Notify>,
}

impl Watcher {
    async fn run(self) {
        let mut index = 0u64;
        let mut failures = 0u32;
        let mut seen = false;
        let what = format!("watch {}", self.endpoint.path());
        loop {
            let mut call = Call::new(
                tonic::codegen::http::Method::GET,
                self.endpoint.path(),
                &what,
            )
            .blocking(Some(Blocking {
                index,
                wait: self.wait,
            }));
            if let Endpoint::LegacyIntentions = self.endpoint {
                // Only our own intentions matter for drift; the filter keeps 10k-intention
                // lists off the wire on every wake-up.
                call = call.query(
                    "filter",
                    format!("Meta[\"consul-smi/owner\"] == \"{}\"", self.owner_filter),
                );
            }
            match self.client.send(call).await {
                Ok(response) => {
                    // Consul's rule: an index must be at least 1. A smaller index than before
                    // means Consul lost or restored its state (a restart); any move is a change.
                    let new_index = response.index.unwrap_or(1).max(1);
                    if (seen && new_index != index) || failures > 0 {
                        self.changed.notify_one();
                    }
                    seen = true;
                    failures = 0;
                    index = new_index;
                    // Pace re-queries: each of our own writes wakes the watch.
                    tokio::time::sleep(self.pace).await;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(endpoint = self.endpoint.path(), error = %e, "blocking query failed; retrying");
                    }
                    // Reconciling waits for the answer after the outage (see above).
                    index = 0;
                    tokio::time::sleep(Duration::from_millis(250 * u64::from(failures.min(8))))
                        .await;
                }
            }
        }
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("client", self.client())
            .finish()
    }
}
