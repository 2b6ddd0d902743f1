//! Prometheus metrics shared by the services. One [`Metrics`] per process creates every
//! family; a service simply never touches the ones it does not own (labelled families
//! without samples encode as just their HELP/TYPE lines).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry, Unit};

const PREFIX: &str = "consul_smi";

/// How a Consul HTTP request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ConsulOutcome {
    /// 2xx and the write took effect.
    Ok,
    /// A check-and-set write that Consul refused because the index moved (HTTP 200 with
    /// body `false`), or an object owned by someone else.
    Conflict,
    /// 4xx: Consul rejected the request.
    ClientError,
    /// 5xx.
    ServerError,
    /// No HTTP response: connect, TLS or timeout failure.
    TransportError,
}

impl ConsulOutcome {
    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Conflict => "conflict",
            Self::ClientError => "client_error",
            Self::ServerError => "server_error",
            Self::TransportError => "transport_error",
        }
    }

    /// Classifies an HTTP status; a CAS refusal arrives as 200 and is the caller's to report
    /// as [`ConsulOutcome::Conflict`].
    pub fn from_status(status: http::StatusCode) -> Self {
        if status.is_server_error() {
            Self::ServerError
        } else if status == http::StatusCode::CONFLICT {
            Self::Conflict
        } else if status.is_client_error() {
            Self::ClientError
        } else {
            Self::Ok
        }
    }
}

impl EncodeLabelValue for ConsulOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsulRequestLabels {
    method: String,
    outcome: ConsulOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The process's metrics; clones share the same registry and values.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Mutex<Registry>,
    propagation_latency: Histogram,
    /// prometheus-client only exposes a histogram's count to its own tests.
    propagation_count: AtomicU64,
    queue_depth: Family<QueueLabels, Gauge>,
    stream_reconnects: Family<StreamLabels, Counter>,
    consul_requests: Family<ConsulRequestLabels, Counter>,
    consul_request_duration: HistogramFamily<ConsulRequestLabels>,
    conflicts: Family<KindLabels, Counter>,
    diagnostics: Family<KindLabels, Gauge>,
}

/// 5 ms .. ~82 s: one change normally crosses the pipeline in milliseconds, but a Consul
/// outage or a slow resync holds it for tens of seconds.
fn propagation_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// 1 ms .. ~16 s, the client's request timeout range.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let propagation_latency = propagation_histogram();
        registry.register_with_unit(
            "propagation_latency",
            "Time from the watcher observing an SMI change to Consul acknowledging the resulting write",
            Unit::Seconds,
            propagation_latency.clone(),
        );
        let queue_depth = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Items waiting in an internal queue",
            queue_depth.clone(),
        );
        let stream_reconnects = Family::<StreamLabels, Counter>::default();
        registry.register(
            "stream_reconnects",
            "Times a gRPC stream between services was re-established",
            stream_reconnects.clone(),
        );
        let consul_requests = Family::<ConsulRequestLabels, Counter>::default();
        registry.register(
            "consul_requests",
            "Consul HTTP API requests by method and outcome",
            consul_requests.clone(),
        );
        let consul_request_duration: HistogramFamily<ConsulRequestLabels> =
            Family::new_with_constructor(request_histogram);
        registry.register_with_unit(
            "consul_request_duration",
            "Consul HTTP API request latency by method and outcome",
            Unit::Seconds,
            consul_request_duration.clone(),
        );
        let conflicts = Family::<KindLabels, Counter>::default();
        registry.register(
            "conflicts",
            "Consul objects the writer did not overwrite because someone else owns or changed them",
            conflicts.clone(),
        );
        let diagnostics = Family::<KindLabels, Gauge>::default();
        registry.register(
            "diagnostics",
            "Current translation diagnostics by kind",
            diagnostics.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(registry),
                propagation_latency,
                propagation_count: AtomicU64::new(0),
                queue_depth,
                stream_reconnects,
                consul_requests,
                consul_request_duration,
                conflicts,
                diagnostics,
            }),
        }
    }

    /// Records a change's end-to-end latency once Consul acknowledged its write.
    /// `observed_at` is the watcher's wall-clock time of observing the change (it crosses
    /// processes, so it cannot be an `Instant`); a clock that went backwards records 0.
    pub fn observe_propagation(&self, observed_at: SystemTime) {
        let latency = SystemTime::now()
            .duration_since(observed_at)
            .unwrap_or(Duration::ZERO);
        self.observe_propagation_latency(latency);
    }

    pub fn observe_propagation_latency(&self, latency: Duration) {
        self.inner
            .propagation_latency
            .observe(latency.as_secs_f64());
        self.inner.propagation_count.fetch_add(1, Ordering::Relaxed);
    }

    /// How many changes the propagation histogram has seen.
    pub fn propagation_count(&self) -> u64 {
        self.inner.propagation_count.load(Ordering::Relaxed)
    }

    /// `queue` names the queue, e.g. `"watch_events"`, `"pending_commands"`.
    pub fn set_queue_depth(&self, queue: &str, depth: i64) {
        self.inner
            .queue_depth
            .get_or_create(&QueueLabels {
                queue: queue.to_owned(),
            })
            .set(depth);
    }

    /// `stream` names the stream, e.g. `"watch"`, `"apply"`.
    pub fn inc_stream_reconnects(&self, stream: &str) {
        self.inner
            .stream_reconnects
            .get_or_create(&StreamLabels {
                stream: stream.to_owned(),
            })
            .inc();
    }

    /// One Consul HTTP request: `method` is the HTTP method (`"PUT"`), `elapsed` its duration.
    pub fn observe_consul_request(&self, method: &str, outcome: ConsulOutcome, elapsed: Duration) {
        let labels = ConsulRequestLabels {
            method: method.to_owned(),
            outcome,
        };
        self.inner.consul_requests.get_or_create(&labels).inc();
        self.inner
            .consul_request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// `kind` is the Consul object kind, e.g. `"intention"`, `"service-splitter"`.
    pub fn inc_conflicts(&self, kind: &str) {
        self.inner
            .conflicts
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Sets the number of current diagnostics of one kind (a gauge: diagnostics clear when
    /// the offending object is fixed).
    pub fn set_diagnostics(&self, kind: &str, count: i64) {
        self.inner
            .diagnostics
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .set(count);
    }

    /// Registers a service-specific metric under the `consul_smi_` prefix.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry().register(name, help, metric);
    }

    /// The OpenMetrics text exposition, as served on `/metrics`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry())
            .expect("writing to a String cannot fail");
        text
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock cannot leave a Registry half-updated in a way that
        // matters for exposition, so a poisoned lock is still usable.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_units_and_labels() {
        let metrics = Metrics::new();
        metrics.observe_propagation_latency(Duration::from_millis(30));
        metrics.set_queue_depth("pending_commands", 7);
        metrics.inc_stream_reconnects("watch");
        metrics.observe_consul_request("PUT", ConsulOutcome::Conflict, Duration::from_millis(3));
        metrics.inc_conflicts("intention");
        metrics.set_diagnostics("unknown_backend", 2);
        let text = metrics.encode();

        for expected in [
            "# TYPE consul_smi_propagation_latency_seconds histogram",
            "consul_smi_propagation_latency_seconds_count 1",
            "consul_smi_propagation_latency_seconds_bucket{le=\"0.04\"} 1",
            "consul_smi_propagation_latency_seconds_bucket{le=\"0.02\"} 0",
            "consul_smi_queue_depth{queue=\"pending_commands\"} 7",
            "consul_smi_stream_reconnects_total{stream=\"watch\"} 1",
            "consul_smi_consul_requests_total{method=\"PUT\",outcome=\"conflict\"} 1",
            "consul_smi_consul_request_duration_seconds_count{method=\"PUT\",outcome=\"conflict\"} 1",
            "consul_smi_conflicts_total{kind=\"intention\"} 1",
            "consul_smi_diagnostics{kind=\"unknown_backend\"} 2",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(metrics.propagation_count(), 1);
    }

    #[test]
    fn outcome_from_status() {
        use http::StatusCode;
        assert_eq!(
            ConsulOutcome::from_status(StatusCode::OK),
            ConsulOutcome::Ok
        );
        assert_eq!(
            ConsulOutcome::from_status(StatusCode::CONFLICT),
            ConsulOutcome::Conflict
        );
        assert_eq!(
            ConsulOutcome::from_status(StatusCode::FORBIDDEN),
            ConsulOutcome::ClientError
        );
        assert_eq!(
            ConsulOutcome::from_status(StatusCode::BAD_GATEWAY),
            ConsulOutcome::ServerError
        );
    }

    #[test]
    fn clones_share_values_and_services_can_add_metrics() {
        let metrics = Metrics::new();
        let clone = metrics.clone();
        clone.observe_propagation(SystemTime::now() - Duration::from_secs(2));
        // A future timestamp (clock skew between nodes) counts as zero, not a panic.
        clone.observe_propagation(SystemTime::now() + Duration::from_secs(60));
        assert_eq!(metrics.propagation_count(), 2);

        let snapshots = Counter::<u64>::default();
        metrics.register("watch_snapshots", "Full snapshots sent", snapshots.clone());
        snapshots.inc();
        assert!(
            metrics
                .encode()
                .contains("consul_smi_watch_snapshots_total 1"),
            "{}",
            metrics.encode()
        );
    }
}
