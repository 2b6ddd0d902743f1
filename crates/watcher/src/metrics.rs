//! smi-watcher's own Prometheus metrics (`consul_smi_watcher_*` on `/metrics`).
//!
//! They are registered on the process's [`consul_smi_telemetry::Metrics`] through
//! [`Metrics::register`] rather than created for every service there: several are unlabelled
//! gauges, which would show a misleading `0` in the translator's and writer's expositions.
//! Labels stay bounded: an SMI kind, a change type, a snapshot cause; never an object name.

use consul_smi_api::SmiKind;
use consul_smi_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::store::{Change, Held};

/// The `kind` label of the CustomResourceDefinition watch (the SMI kinds use their own name).
pub const CRD_KIND: &str = "CustomResourceDefinition";

/// Why a subscriber gets a full snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotCause {
    /// It asked for one (empty epoch): a new subscriber.
    Initial,
    /// It asked to resume from another epoch (the watcher restarted) or from a revision the
    /// bounded history no longer holds.
    ResumeUnavailable,
    /// It fell behind the history while connected. The watcher never queues for a slow
    /// subscriber (only one that stops reading altogether is dropped); this is what being too
    /// slow costs it (and what a too-small `--history` shows up as).
    FellBehind,
}

impl SnapshotCause {
    pub const ALL: [SnapshotCause; 3] = [
        SnapshotCause::Initial,
        SnapshotCause::ResumeUnavailable,
        SnapshotCause::FellBehind,
    ];

    /// The `cause` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotCause::Initial => "initial",
            SnapshotCause::ResumeUnavailable => "resume_unavailable",
            SnapshotCause::FellBehind => "fell_behind",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabels {
    kind: &'static str,
    change: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

/// The watcher's metric families; clones share the same values.
#[derive(Clone, Debug)]
pub struct WatcherMetrics {
    changes: Family<ChangeLabels, Counter>,
    objects: Family<KindLabels, Gauge>,
    invalid_objects: Family<KindLabels, Gauge>,
    revision: Gauge,
    subscribers: Gauge,
    subscribers_dropped: Counter,
    snapshots: Family<CauseLabels, Counter>,
    resumes: Counter,
    kube_watch_errors: Family<KindLabels, Counter>,
    kube_relists: Family<KindLabels, Counter>,
}

impl WatcherMetrics {
    /// Registers the families on `metrics`. Call once per `Metrics` (a second call would
    /// expose every family twice).
    pub fn register(metrics: &Metrics) -> WatcherMetrics {
        let watcher = WatcherMetrics::unregistered();
        metrics.register(
            "watcher_changes",
            "Changes the watcher published to subscribers, by SMI kind and change (applied, deleted, invalid)",
            watcher.changes.clone(),
        );
        metrics.register(
            "watcher_objects",
            "SMI objects the watcher currently holds, by kind (invalid ones included)",
            watcher.objects.clone(),
        );
        metrics.register(
            "watcher_invalid_objects",
            "SMI objects whose current version cannot be decoded, by kind (their last valid version, if any, still stands)",
            watcher.invalid_objects.clone(),
        );
        metrics.register(
            "watcher_revision",
            "The watcher's current revision: the number of changes published since it started",
            watcher.revision.clone(),
        );
        metrics.register(
            "watcher_subscribers",
            "Connected SmiWatch subscribers",
            watcher.subscribers.clone(),
        );
        metrics.register(
            "watcher_dropped_subscribers",
            "Subscribers dropped because they stopped reading (they resume when they reconnect)",
            watcher.subscribers_dropped.clone(),
        );
        metrics.register(
            "watcher_snapshots",
            "Full snapshots started for subscribers, by cause (initial, resume_unavailable, fell_behind)",
            watcher.snapshots.clone(),
        );
        metrics.register(
            "watcher_resumes",
            "Subscribers that resumed from their last revision without a snapshot",
            watcher.resumes.clone(),
        );
        metrics.register(
            "watcher_kube_watch_errors",
            "Failed Kubernetes list/watch requests (each retried with backoff), by SMI kind or CustomResourceDefinition",
            watcher.kube_watch_errors.clone(),
        );
        metrics.register(
            "watcher_kube_relists",
            "Complete re-lists of an SMI kind after its first (a watch restart: API server restart, 410 Gone)",
            watcher.kube_relists.clone(),
        );
        watcher
    }

    /// Families recorded into but exposed nowhere (tests and embedders without `/metrics`).
    pub fn unregistered() -> WatcherMetrics {
        let watcher = WatcherMetrics {
            changes: Family::default(),
            objects: Family::default(),
            invalid_objects: Family::default(),
            revision: Gauge::default(),
            subscribers: Gauge::default(),
            subscribers_dropped: Counter::default(),
            snapshots: Family::default(),
            resumes: Counter::default(),
            kube_watch_errors: Family::default(),
            kube_relists: Family::default(),
        };
        // Every known series exists from the start, so a dashboard shows 0 rather than no
        // data, and rate() sees the first change.
        for kind in SmiKind::ALL {
            let kind = kind.as_str();
            for change in ["applied", "deleted", "invalid"] {
                watcher
                    .changes
                    .get_or_create_owned(&ChangeLabels { kind, change });
            }
            watcher.objects.get_or_create_owned(&KindLabels { kind });
            watcher
                .invalid_objects
                .get_or_create_owned(&KindLabels { kind });
        }
        for cause in SnapshotCause::ALL {
            watcher.snapshots.get_or_create_owned(&CauseLabels {
                cause: cause.as_str(),
            });
        }
        watcher
    }

    pub(crate) fn changed(&self, change: &Change) {
        self.changes
            .get_or_create(&ChangeLabels {
                kind: change.kind().as_str(),
                change: change.type_name(),
            })
            .inc();
    }

    pub(crate) fn set_held(&self, kind: SmiKind, held: Held) {
        let labels = KindLabels {
            kind: kind.as_str(),
        };
        self.objects
            .get_or_create(&labels)
            .set(gauge_value(held.objects));
        self.invalid_objects
            .get_or_create(&labels)
            .set(gauge_value(held.invalid));
    }

    pub(crate) fn set_revision(&self, revision: u64) {
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    /// Counts a subscriber as connected until the returned guard is dropped.
    pub(crate) fn subscriber_connected(&self) -> ConnectedSubscriber {
        self.subscribers.inc();
        ConnectedSubscriber(self.subscribers.clone())
    }

    pub(crate) fn snapshot_started(&self, cause: SnapshotCause) {
        self.snapshots
            .get_or_create(&CauseLabels {
                cause: cause.as_str(),
            })
            .inc();
    }

    pub(crate) fn subscriber_dropped(&self) {
        self.subscribers_dropped.inc();
    }

    #[cfg(test)]
    pub(crate) fn dropped_for_tests(&self) -> u64 {
        self.subscribers_dropped.get()
    }

    pub(crate) fn resumed(&self) {
        self.resumes.inc();
    }

    /// `kind`: an SMI kind's name or [`CRD_KIND`].
    pub(crate) fn kube_watch_error(&self, kind: &'static str) {
        self.kube_watch_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub(crate) fn kube_relisted(&self, kind: SmiKind) {
        self.kube_relists
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .inc();
    }
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Decrements the subscriber gauge when the subscription ends, however it ends.
pub(crate) struct ConnectedSubscriber(Gauge);

impl Drop for ConnectedSubscriber {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use consul_smi_api::{Meta, ObjectRef, SmiObject, TcpRoute};

    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let metrics = Metrics::new();
        let watcher = WatcherMetrics::register(&metrics);
        let route = SmiObject::TcpRoute(TcpRoute {
            meta: Meta {
                namespace: "default".into(),
                name: "db".into(),
                ..Meta::default()
            },
            matches: None,
        });
        watcher.changed(&Change::Applied(Arc::new(route)));
        watcher.changed(&Change::Deleted(ObjectRef::new(
            SmiKind::TrafficSplit,
            "default",
            "canary",
        )));
        watcher.set_held(
            SmiKind::TCPRoute,
            Held {
                objects: 3,
                invalid: 1,
            },
        );
        watcher.set_revision(42);
        let first = watcher.subscriber_connected();
        let second = watcher.subscriber_connected();
        drop(first);
        watcher.snapshot_started(SnapshotCause::FellBehind);
        watcher.resumed();
        watcher.kube_watch_error(CRD_KIND);
        watcher.kube_relisted(SmiKind::HTTPRouteGroup);
        let text = metrics.encode();
        for expected in [
            "# TYPE consul_smi_watcher_changes counter",
            "consul_smi_watcher_changes_total{kind=\"TCPRoute\",change=\"applied\"} 1",
            "consul_smi_watcher_changes_total{kind=\"TrafficSplit\",change=\"deleted\"} 1",
            // Known series exist before their first change.
            "consul_smi_watcher_changes_total{kind=\"UDPRoute\",change=\"invalid\"} 0",
            "consul_smi_watcher_objects{kind=\"TCPRoute\"} 3",
            "consul_smi_watcher_objects{kind=\"TrafficTarget\"} 0",
            "consul_smi_watcher_invalid_objects{kind=\"TCPRoute\"} 1",
            "consul_smi_watcher_revision 42",
            "consul_smi_watcher_subscribers 1",
            "consul_smi_watcher_snapshots_total{cause=\"fell_behind\"} 1",
            "consul_smi_watcher_snapshots_total{cause=\"initial\"} 0",
            "consul_smi_watcher_resumes_total 1",
            "consul_smi_watcher_kube_watch_errors_total{kind=\"CustomResourceDefinition\"} 1",
            "consul_smi_watcher_kube_relists_total{kind=\"HTTPRouteGroup\"} 1",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        drop(second);
        assert!(
            metrics
                .encode()
                .contains("consul_smi_watcher_subscribers 0\n")
        );
    }
}
