//! The watcher's state: every SMI object it currently sees (in hub form, or the reason it is
//! invalid), the revision counter, and a bounded history of recent changes so subscribers
//! can resume. Pure: no I/O, no async; the sources feed it and the gRPC layer reads it.
//!
//! Revisions are consecutive: every change gets `revision + 1`. A snapshot at revision `R`
//! contains exactly the changes `1..=R`, so a subscriber that has seen revision `R` needs
//! exactly the history entries with revision `> R`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use consul_smi_api::{ObjectRef, SmiKind, SmiObject};

/// W3C trace context of the change that produced a delta (`traceparent`, `tracestate`).
pub type TraceContext = consul_smi_telemetry::TraceContext;

/// What the watcher knows about one object.
///
/// An object that turns invalid keeps its last valid version: subscribers keep enforcing it
/// (a broken edit must not revoke access already in effect), and a snapshot must show a new
/// subscriber the same thing, so it carries both the last valid version and the diagnostic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The last version that decoded, if any.
    pub valid: Option<Arc<SmiObject>>,
    /// Set while the current version cannot be decoded or converted.
    pub invalid: Option<Invalidity>,
}

/// Why the current version of an object cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidity {
    pub api_version: String,
    pub reason: String,
}

/// One object as a source observed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    Valid(SmiObject),
    Invalid {
        object: ObjectRef,
        api_version: String,
        reason: String,
    },
}

impl Observed {
    pub fn object_ref(&self) -> ObjectRef {
        match self {
            Observed::Valid(o) => o.object_ref(),
            Observed::Invalid { object, .. } => object.clone(),
        }
    }
}

/// A change as subscribers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Applied(Arc<SmiObject>),
    Deleted(ObjectRef),
    /// The current version is unusable; the last `Applied` version (if any) still stands.
    Invalid {
        object: ObjectRef,
        api_version: String,
        reason: String,
    },
}

impl Change {
    pub fn object_ref(&self) -> ObjectRef {
        match self {
            Change::Applied(o) => o.object_ref(),
            Change::Deleted(r) => r.clone(),
            Change::Invalid { object, .. } => object.clone(),
        }
    }

    pub fn kind(&self) -> SmiKind {
        match self {
            Change::Applied(o) => o.kind(),
            Change::Deleted(r) => r.kind,
            Change::Invalid { object, .. } => object.kind,
        }
    }

    /// `applied`, `deleted` or `invalid`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Change::Applied(_) => "applied",
            Change::Deleted(_) => "deleted",
            Change::Invalid { .. } => "invalid",
        }
    }

    fn invalid(object: ObjectRef, invalidity: &Invalidity) -> Change {
        Change::Invalid {
            object,
            api_version: invalidity.api_version.clone(),
            reason: invalidity.reason.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    pub revision: u64,
    pub change: Change,
    pub trace: Option<TraceContext>,
    /// When the store took in the change: the start of the propagation latency the writer
    /// measures when Consul acknowledges it.
    pub observed_at: std::time::SystemTime,
}

/// How many objects of one kind the store holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Every entry, invalid ones included.
    pub objects: usize,
    /// Entries whose current version is unusable.
    pub invalid: usize,
}

/// Which objects a `replace` covers: the objects a source re-listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every object (the directory source re-reads everything).
    All,
    /// One kind (the Kubernetes source watches each kind separately).
    Kind(SmiKind),
}

impl Scope {
    fn covers(self, object: &ObjectRef) -> bool {
        match self {
            Scope::All => true,
            Scope::Kind(kind) => object.kind == kind,
        }
    }
}

/// A consistent view at one revision: every change with a higher revision comes after it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub revision: u64,
    /// Sorted by object reference.
    pub entries: Vec<(ObjectRef, Entry)>,
}

impl Snapshot {
    /// The snapshot as changes: per object its last valid version (Applied), then its
    /// diagnostic (Invalid) when the current version is unusable.
    pub fn changes(&self) -> impl Iterator<Item = Change> + '_ {
        self.entries.iter().flat_map(|(r, e)| {
            let applied = e.valid.clone().map(Change::Applied);
            let invalid = e.invalid.as_ref().map(|i| Change::invalid(r.clone(), i));
            applied.into_iter().chain(invalid)
        })
    }
}

/// Why deltas after a revision cannot be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeError {
    /// Changes after this revision were dropped from the bounded history.
    Trimmed { oldest_available: u64 },
    /// The revision is newer than anything this store produced (another epoch's numbering).
    Future { current: u64 },
}

#[derive(Debug)]
pub struct Store {
    revision: u64,
    objects: BTreeMap<ObjectRef, Entry>,
    /// Kept in step with `objects`, so the per-kind gauges need no scan per change.
    held: BTreeMap<SmiKind, Held>,
    history: VecDeque<Arc<Delta>>,
    history_limit: usize,
}

impl Store {
    /// `history_limit` (at least 1) bounds how many recent changes are kept for resuming.
    pub fn new(history_limit: usize) -> Store {
        Store {
            revision: 0,
            objects: BTreeMap::new(),
            held: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn get(&self, object: &ObjectRef) -> Option<&Entry> {
        self.objects.get(object)
    }

    pub fn held(&self, kind: SmiKind) -> Held {
        self.held.get(&kind).copied().unwrap_or_default()
    }

    /// Records an added or modified object. `None` when nothing changed (a re-list or a
    /// repeated event delivers the same object again: subscribers must not see it twice).
    pub fn upsert(
        &mut self,
        observed: Observed,
        trace: Option<TraceContext>,
    ) -> Option<Arc<Delta>> {
        let object = observed.object_ref();
        let previous = self.objects.get(&object);
        let (entry, change) = match observed {
            Observed::Valid(o) => {
                let o = Arc::new(o);
                let entry = Entry {
                    valid: Some(o.clone()),
                    invalid: None,
                };
                (entry, Change::Applied(o))
            }
            Observed::Invalid {
                object: _,
                api_version,
                reason,
            } => {
                let invalidity = Invalidity {
                    api_version,
                    reason,
                };
                let change = Change::invalid(object.clone(), &invalidity);
                let valid = previous.and_then(|p| p.valid.clone());
                (
                    Entry {
                        valid,
                        invalid: Some(invalidity),
                    },
                    change,
                )
            }
        };
        if previous == Some(&entry) {
            return None;
        }
        let was_invalid = previous.is_some_and(|p| p.invalid.is_some());
        let held = self.held.entry(object.kind).or_default();
        if previous.is_none() {
            held.objects += 1;
        }
        match (was_invalid, entry.invalid.is_some()) {
            (false, true) => held.invalid += 1,
            (true, false) => held.invalid -= 1,
            _ => {}
        }
        self.objects.insert(object, entry);
        Some(self.record(change, trace))
    }

    /// Records a deletion; `None` when the object was not known.
    pub fn delete(
        &mut self,
        object: &ObjectRef,
        trace: Option<TraceContext>,
    ) -> Option<Arc<Delta>> {
        let removed = self.objects.remove(object)?;
        let held = self.held.entry(object.kind).or_default();
        held.objects -= 1;
        if removed.invalid.is_some() {
            held.invalid -= 1;
        }
        Some(self.record(Change::Deleted(object.clone()), trace))
    }

    /// Makes the objects within `scope` exactly `observed` (a complete re-list): deletes what
    /// is gone, applies what is new or changed, and leaves everything identical untouched.
    /// This is what turns a watch restart (API server restart, 410 Gone) into the changes that
    /// happened meanwhile, deletions included, without repeating unchanged objects.
    pub fn replace(
        &mut self,
        scope: Scope,
        observed: Vec<Observed>,
        trace: Option<TraceContext>,
    ) -> Vec<Arc<Delta>> {
        let mut listed: BTreeMap<ObjectRef, Observed> = BTreeMap::new();
        for o in observed {
            let object = o.object_ref();
            if scope.covers(&object) {
                listed.insert(object, o);
            }
        }
        let gone: Vec<ObjectRef> = self
            .objects
            .keys()
            .filter(|r| scope.covers(r) && !listed.contains_key(*r))
            .cloned()
            .collect();
        let mut deltas = Vec::new();
        for object in gone {
            deltas.extend(self.delete(&object, trace.clone()));
        }
        for (_, observed) in listed {
            deltas.extend(self.upsert(observed, trace.clone()));
        }
        deltas
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            revision: self.revision,
            entries: self
                .objects
                .iter()
                .map(|(r, e)| (r.clone(), e.clone()))
                .collect(),
        }
    }

    /// Up to `limit` deltas with revision greater than `after`, oldest first; empty when the
    /// caller is up to date.
    pub fn deltas_after(&self, after: u64, limit: usize) -> Result<Vec<Arc<Delta>>, ResumeError> {
        if after > self.revision {
            return Err(ResumeError::Future {
                current: self.revision,
            });
        }
        if after == self.revision {
            return Ok(Vec::new());
        }
        let oldest_available = self
            .history
            .front()
            .map_or(self.revision + 1, |d| d.revision);
        // Changes `after+1 ..= revision` are needed; the history must reach back to `after+1`.
        if after + 1 < oldest_available {
            return Err(ResumeError::Trimmed { oldest_available });
        }
        let start = (after + 1 - oldest_available) as usize;
        Ok(self
            .history
            .iter()
            .skip(start)
            .take(limit)
            .cloned()
            .collect())
    }

    fn record(&mut self, change: Change, trace: Option<TraceContext>) -> Arc<Delta> {
        self.revision += 1;
        let delta = Arc::new(Delta {
            revision: self.revision,
            change,
            trace,
            observed_at: std::time::SystemTime::now(),
        });
        if self.history.len() == self.history_limit {
            self.history.pop_front();
        }
        self.history.push_back(delta.clone());
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use consul_smi_api::{Meta, TcpRoute, TrafficSplit, TrafficSplitBackend, Weight};

    fn route(name: &str, rv: &str) -> SmiObject {
        SmiObject::TcpRoute(TcpRoute {
            meta: Meta {
                namespace: "default".into(),
                name: name.into(),
                resource_version: Some(rv.into()),
                api_version: "specs.smi-spec.io/v1alpha4".into(),
                ..Meta::default()
            },
            matches: None,
        })
    }

    fn split(name: &str, weight: u64) -> SmiObject {
        SmiObject::TrafficSplit(TrafficSplit {
            meta: Meta {
                namespace: "default".into(),
                name: name.into(),
                ..Meta::default()
            },
            service: "api".into(),
            backends: vec![TrafficSplitBackend {
                service: "api-v1".into(),
                weight: Weight::from_units(weight),
            }],
            matches: vec![],
        })
    }

    fn valid(o: SmiObject) -> Observed {
        Observed::Valid(o)
    }

    fn tcp_ref(name: &str) -> ObjectRef {
        ObjectRef::new(SmiKind::TCPRoute, "default", name)
    }

    fn revisions(deltas: &[Arc<Delta>]) -> Vec<u64> {
        deltas.iter().map(|d| d.revision).collect()
    }

    #[test]
    fn revisions_increase_by_one_per_change_and_repeats_are_not_changes() {
        let mut store = Store::new(10);
        assert_eq!(
            store.upsert(valid(route("a", "1")), None).unwrap().revision,
            1
        );
        assert!(
            store.upsert(valid(route("a", "1")), None).is_none(),
            "identical re-delivery"
        );
        assert_eq!(
            store.upsert(valid(route("a", "2")), None).unwrap().revision,
            2
        );
        assert_eq!(store.delete(&tcp_ref("a"), None).unwrap().revision, 3);
        assert!(
            store.delete(&tcp_ref("a"), None).is_none(),
            "unknown object"
        );
        assert_eq!(store.revision(), 3);
        assert!(store.is_empty());
    }

    #[test]
    fn replace_emits_deletions_for_missing_and_skips_unchanged() {
        let mut store = Store::new(100);
        store.upsert(valid(route("keep", "1")), None);
        store.upsert(valid(route("change", "1")), None);
        store.upsert(valid(route("gone", "1")), None);
        store.upsert(valid(split("other-kind", 1)), None);

        let deltas = store.replace(
            Scope::Kind(SmiKind::TCPRoute),
            vec![
                valid(route("keep", "1")),
                valid(route("change", "7")),
                valid(route("new", "8")),
            ],
            None,
        );
        let changes: Vec<Change> = deltas.iter().map(|d| d.change.clone()).collect();
        assert_eq!(
            changes,
            vec![
                Change::Deleted(tcp_ref("gone")),
                Change::Applied(Arc::new(route("change", "7"))),
                Change::Applied(Arc::new(route("new", "8"))),
            ]
        );
        assert_eq!(revisions(&deltas), vec![5, 6, 7]);
        // Another kind is outside the scope and survives.
        assert!(
            store
                .get(&ObjectRef::new(
                    SmiKind::TrafficSplit,
                    "default",
                    "other-kind"
                ))
                .is_some()
        );
        assert_eq!(store.len(), 4);
    }

    #[test]
    fn replace_with_the_same_list_changes_nothing() {
        let mut store = Store::new(100);
        let list = vec![valid(route("a", "1")), valid(route("b", "2"))];
        assert_eq!(store.replace(Scope::All, list.clone(), None).len(), 2);
        assert!(store.replace(Scope::All, list, None).is_empty());
        assert_eq!(store.revision(), 2);
    }

    #[test]
    fn replace_all_empty_deletes_everything() {
        let mut store = Store::new(100);
        store.upsert(valid(route("a", "1")), None);
        store.upsert(valid(split("s", 1)), None);
        let deltas = store.replace(Scope::All, vec![], None);
        assert_eq!(deltas.len(), 2);
        assert!(
            deltas
                .iter()
                .all(|d| matches!(d.change, Change::Deleted(_)))
        );
        assert!(store.is_empty());
    }

    #[test]
    fn invalid_objects_are_entries_and_turn_valid_again() {
        let mut store = Store::new(100);
        let broken = |reason: &str| Observed::Invalid {
            object: tcp_ref("a"),
            api_version: "specs.smi-spec.io/v1alpha4".into(),
            reason: reason.into(),
        };
        let d = store.upsert(broken("bad port"), None).unwrap();
        assert!(matches!(&d.change, Change::Invalid { object, .. } if *object == tcp_ref("a")));
        assert!(
            store.upsert(broken("bad port"), None).is_none(),
            "same diagnostic again"
        );
        assert!(
            store.upsert(broken("other problem"), None).is_some(),
            "new diagnostic"
        );
        let snapshot: Vec<Change> = store.snapshot().changes().collect();
        assert!(
            matches!(snapshot[..], [Change::Invalid { .. }]),
            "{snapshot:?}"
        );
        let d = store.upsert(valid(route("a", "2")), None).unwrap();
        assert!(matches!(d.change, Change::Applied(_)));
        assert_eq!(store.get(&tcp_ref("a")).unwrap().invalid, None);
    }

    #[test]
    fn a_broken_edit_keeps_the_last_valid_version_in_snapshots() {
        let mut store = Store::new(100);
        store.upsert(valid(route("a", "1")), None);
        let d = store
            .upsert(
                Observed::Invalid {
                    object: tcp_ref("a"),
                    api_version: "specs.smi-spec.io/v1alpha4".into(),
                    reason: "spec.matches.ports[0]: out of range".into(),
                },
                None,
            )
            .unwrap();
        assert!(matches!(d.change, Change::Invalid { .. }));
        let snapshot: Vec<Change> = store.snapshot().changes().collect();
        assert_eq!(snapshot.len(), 2, "{snapshot:?}");
        assert_eq!(snapshot[0], Change::Applied(Arc::new(route("a", "1"))));
        assert!(matches!(&snapshot[1], Change::Invalid { reason, .. } if reason.contains("ports")));
        // A re-list that still sees the broken version changes nothing.
        let relisted = store.replace(
            Scope::Kind(SmiKind::TCPRoute),
            vec![Observed::Invalid {
                object: tcp_ref("a"),
                api_version: "specs.smi-spec.io/v1alpha4".into(),
                reason: "spec.matches.ports[0]: out of range".into(),
            }],
            None,
        );
        assert!(relisted.is_empty());
        // Deleting drops both.
        store.delete(&tcp_ref("a"), None).unwrap();
        assert_eq!(store.snapshot().changes().count(), 0);
    }

    #[test]
    fn snapshot_plus_deltas_after_it_reproduces_the_state() {
        let mut store = Store::new(100);
        store.upsert(valid(route("a", "1")), None);
        store.upsert(valid(route("b", "1")), None);
        let snapshot = store.snapshot();
        assert_eq!(snapshot.revision, 2);
        store.delete(&tcp_ref("a"), None);
        store.upsert(valid(route("c", "1")), None);

        let mut replica: BTreeMap<ObjectRef, Change> =
            snapshot.changes().map(|c| (c.object_ref(), c)).collect();
        for delta in store.deltas_after(snapshot.revision, usize::MAX).unwrap() {
            match &delta.change {
                Change::Deleted(r) => {
                    replica.remove(r);
                }
                other => {
                    replica.insert(other.object_ref(), other.clone());
                }
            }
        }
        let expected: BTreeMap<ObjectRef, Change> = store
            .snapshot()
            .changes()
            .map(|c| (c.object_ref(), c))
            .collect();
        assert_eq!(replica, expected);
    }

    #[test]
    fn deltas_after_serves_the_bounded_history_and_reports_trimming() {
        let mut store = Store::new(3);
        for i in 0..5 {
            store.upsert(valid(route("a", &i.to_string())), None);
        }
        // History holds revisions 3, 4, 5.
        assert_eq!(
            revisions(&store.deltas_after(2, 10).unwrap()),
            vec![3, 4, 5]
        );
        assert_eq!(revisions(&store.deltas_after(3, 10).unwrap()), vec![4, 5]);
        assert_eq!(revisions(&store.deltas_after(2, 2).unwrap()), vec![3, 4]);
        assert!(store.deltas_after(5, 10).unwrap().is_empty());
        assert_eq!(
            store.deltas_after(1, 10).unwrap_err(),
            ResumeError::Trimmed {
                oldest_available: 3
            }
        );
        assert_eq!(
            store.deltas_after(6, 10).unwrap_err(),
            ResumeError::Future { current: 5 }
        );
    }

    #[test]
    fn an_empty_store_serves_resume_from_zero() {
        let store = Store::new(3);
        assert!(store.deltas_after(0, 10).unwrap().is_empty());
    }

    #[test]
    fn held_counts_follow_every_kind_of_change() {
        let mut store = Store::new(100);
        let broken = |name: &str, reason: &str| Observed::Invalid {
            object: tcp_ref(name),
            api_version: "specs.smi-spec.io/v1alpha4".into(),
            reason: reason.into(),
        };
        let counted = |store: &Store, kind: SmiKind| {
            let objects = store.objects.keys().filter(|r| r.kind == kind).count();
            let invalid = store
                .objects
                .iter()
                .filter(|(r, e)| r.kind == kind && e.invalid.is_some())
                .count();
            Held { objects, invalid }
        };
        let check = |store: &Store, objects, invalid| {
            assert_eq!(store.held(SmiKind::TCPRoute), Held { objects, invalid });
            assert_eq!(
                store.held(SmiKind::TCPRoute),
                counted(store, SmiKind::TCPRoute)
            );
            assert_eq!(
                store.held(SmiKind::TrafficSplit),
                counted(store, SmiKind::TrafficSplit)
            );
        };
        check(&store, 0, 0);
        store.upsert(valid(route("a", "1")), None);
        store.upsert(valid(split("s", 1)), None);
        check(&store, 1, 0);
        // Valid -> invalid -> invalid for another reason: still one invalid object.
        store.upsert(broken("a", "bad port"), None).unwrap();
        check(&store, 1, 1);
        store.upsert(broken("a", "bad name"), None).unwrap();
        check(&store, 1, 1);
        // A new object that is invalid from the start.
        store.upsert(broken("b", "bad port"), None);
        check(&store, 2, 2);
        store.upsert(valid(route("a", "2")), None);
        check(&store, 2, 1);
        store.delete(&tcp_ref("b"), None);
        check(&store, 1, 0);
        store.replace(
            Scope::Kind(SmiKind::TCPRoute),
            vec![broken("c", "bad port")],
            None,
        );
        check(&store, 1, 1);
        assert_eq!(store.held(SmiKind::TrafficSplit).objects, 1);
        store.replace(Scope::All, vec![], None);
        check(&store, 0, 0);
        assert_eq!(store.held(SmiKind::TrafficSplit), Held::default());
    }

    #[test]
    fn history_memory_is_bounded() {
        let mut store = Store::new(16);
        for i in 0..1000 {
            store.upsert(valid(route("a", &i.to_string())), None);
        }
        assert_eq!(store.history.len(), 16);
        assert_eq!(store.len(), 1);
    }
}
