//! The incremental index: all SMI objects, what they mean in Consul, and what changed.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::mem;
use std::sync::Arc;

use consul_smi_api::{ObjectRef, SmiKind, SmiObject};
use consul_smi_core::{
    Command, DesiredState, Intention, IntentionKey, ServiceDefaults, ServiceName, ServiceSplitter,
};

use crate::diagnostic::{Diagnostic, ObjectStatus};
use crate::diff::diff;
use crate::plan::{self, SplitPlan, TargetField, TargetPlan};
use crate::resolve::{self, DestinationOutput, Routes, SplitOutput};
use crate::{NamespaceMode, TranslateOptions};

/// One shared copy of each object's name: the index refers to an object from many places.
type Ref = Arc<ObjectRef>;

/// The value for `key`, inserted as default if missing; clones the key only when inserting
/// (`entry` takes an owned key), at the price of hashing it twice.
fn slot<'m, K, Q, V>(map: &'m mut HashMap<K, V>, key: &Q) -> &'m mut V
where
    K: Borrow<Q> + Hash + Eq,
    Q: ToOwned<Owned = K> + Hash + Eq + ?Sized,
    V: Default,
{
    if map.contains_key(key) {
        map.get_mut(key).expect("checked above")
    } else {
        map.entry(key.to_owned()).or_default()
    }
}

fn btree_slot<'m, K, Q, V>(map: &'m mut BTreeMap<K, V>, key: &Q) -> &'m mut V
where
    K: Borrow<Q> + Ord,
    Q: ToOwned<Owned = K> + Ord + ?Sized,
    V: Default,
{
    if !map.contains_key(key) {
        map.insert(key.to_owned(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

fn http_defaults(service: &ServiceName) -> ServiceDefaults {
    ServiceDefaults {
        service: service.clone(),
        protocol: "http".into(),
    }
}

/// Why a service needs `protocol = http`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum HttpReason {
    /// It is the destination of L7 intentions.
    Destination,
    /// It is the root or a backend of the splitter for this service.
    Splitter(ServiceName),
}

#[derive(Clone, Debug, Default)]
struct ObjectDiagnostics {
    /// From the object alone.
    local: Vec<Diagnostic>,
    /// From resolving its destination (TrafficTarget) or split root (TrafficSplit).
    resolved: Vec<Diagnostic>,
    /// Namespace collapse warnings, per Consul service name.
    collapse: BTreeMap<String, Vec<Diagnostic>>,
}

impl ObjectDiagnostics {
    /// Kept sorted, so the order does not depend on whether the warnings came from a bulk
    /// load (by namespace) or from single changes (by field).
    fn add_collapse(&mut self, name: &str, diagnostic: Diagnostic) {
        let warnings = btree_slot(&mut self.collapse, name);
        let position = warnings.partition_point(|d| *d <= diagnostic);
        warnings.insert(position, diagnostic);
    }

    fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.local
            .iter()
            .chain(self.resolved.iter())
            .chain(self.collapse.values().flatten())
    }
}

/// OSS only: the references (TrafficTarget, field) to one ServiceAccount name, by Kubernetes
/// namespace (sorted).
///
/// Vectors rather than B-trees: a name is nearly always used from one namespace by a few
/// TrafficTargets, and with two B-tree nodes (~800 bytes) per name this index took a sixth of
/// the time of loading 10,000 TrafficTargets (a third less with vectors). The order of
/// references does not matter (collapse warnings are kept sorted where they are stored);
/// removal scans one namespace's list.
#[derive(Clone, Debug, Default)]
struct NameRefs {
    by_namespace: Vec<(String, Vec<(Ref, TargetField)>)>,
}

impl NameRefs {
    fn position(&self, namespace: &str) -> Result<usize, usize> {
        self.by_namespace
            .binary_search_by(|(held, _)| held.as_str().cmp(namespace))
    }

    fn insert(&mut self, namespace: &str, object: &Ref, field: TargetField) {
        let position = match self.position(namespace) {
            Ok(position) => position,
            Err(position) => {
                let entry = (namespace.to_string(), Vec::new());
                self.by_namespace.insert(position, entry);
                position
            }
        };
        self.by_namespace[position].1.push((object.clone(), field));
    }

    fn remove(&mut self, namespace: &str, object: &Ref, field: TargetField) {
        let Ok(position) = self.position(namespace) else {
            return;
        };
        let refs = &mut self.by_namespace[position].1;
        // `Arc` equality compares the pointers first: usually the same shared name.
        if let Some(i) = refs.iter().position(|(o, f)| o == object && *f == field) {
            refs.swap_remove(i);
        }
        if refs.is_empty() {
            self.by_namespace.remove(position);
        }
    }

    fn is_empty(&self) -> bool {
        self.by_namespace.is_empty()
    }

    fn namespace_count(&self) -> usize {
        self.by_namespace.len()
    }

    fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.by_namespace
            .iter()
            .map(|(namespace, _)| namespace.as_str())
    }

    /// Every reference with its namespace.
    fn iter(&self) -> impl Iterator<Item = (&str, &Ref, TargetField)> {
        self.by_namespace.iter().flat_map(|(namespace, refs)| {
            refs.iter()
                .map(move |(object, field)| (namespace.as_str(), object, *field))
        })
    }
}

/// What one change touched, to be recomputed once at the end.
#[derive(Default)]
struct Touched {
    /// Loading a fresh index: nothing is recorded, everything is computed once at the end.
    bulk: bool,
    destinations: BTreeSet<ServiceName>,
    roots: BTreeSet<ServiceName>,
    /// ServiceAccount name → the namespaces referencing it before the change.
    names: BTreeMap<String, Vec<String>>,
    /// TrafficTargets inserted by the change.
    targets: BTreeSet<Ref>,
}

impl Touched {
    fn destination(&mut self, service: &ServiceName) {
        if !self.bulk && !self.destinations.contains(service) {
            self.destinations.insert(service.clone());
        }
    }

    fn root(&mut self, service: &ServiceName) {
        if !self.bulk && !self.roots.contains(service) {
            self.roots.insert(service.clone());
        }
    }

    fn target(&mut self, object: &Ref) {
        if !self.bulk {
            self.targets.insert(object.clone());
        }
    }
}

/// The previous value of every key a change wrote, to derive the change's commands.
#[derive(Default)]
struct ChangeLog {
    enabled: bool,
    intentions: BTreeMap<IntentionKey, Option<Intention>>,
    splitters: BTreeMap<ServiceName, Option<ServiceSplitter>>,
    defaults: BTreeMap<ServiceName, Option<ServiceDefaults>>,
}

impl ChangeLog {
    fn recording() -> Self {
        ChangeLog {
            enabled: true,
            ..ChangeLog::default()
        }
    }

    fn intention(&mut self, key: &IntentionKey, state: &DesiredState) {
        if self.enabled {
            self.intentions
                .entry(key.clone())
                .or_insert_with(|| state.intentions.get(key).cloned());
        }
    }

    fn splitter(&mut self, key: &ServiceName, state: &DesiredState) {
        if self.enabled {
            self.splitters
                .entry(key.clone())
                .or_insert_with(|| state.splitters.get(key).cloned());
        }
    }

    fn defaults(&mut self, key: &ServiceName, state: &DesiredState) {
        if self.enabled {
            self.defaults
                .entry(key.clone())
                .or_insert_with(|| state.service_defaults.get(key).cloned());
        }
    }

    /// The commands from the logged previous values to `state`, in [`diff`] order.
    fn commands(self, state: &DesiredState) -> Vec<Command> {
        let mut before = DesiredState::default();
        let mut after = DesiredState::default();
        for (key, old) in self.intentions {
            if let Some(new) = state.intentions.get(&key) {
                after.intentions.insert(key.clone(), new.clone());
            }
            if let Some(old) = old {
                before.intentions.insert(key, old);
            }
        }
        for (key, old) in self.splitters {
            if let Some(new) = state.splitters.get(&key) {
                after.splitters.insert(key.clone(), new.clone());
            }
            if let Some(old) = old {
                before.splitters.insert(key, old);
            }
        }
        for (key, old) in self.defaults {
            if let Some(new) = state.service_defaults.get(&key) {
                after.service_defaults.insert(key.clone(), new.clone());
            }
            if let Some(old) = old {
                before.service_defaults.insert(key, old);
            }
        }
        diff(&before, &after)
    }
}

/// [`Index::reset`] replaces changed objects one by one while at most 1/this of the stored
/// objects changed, and rebuilds the index otherwise. Measured at 10,000 TrafficTargets, a
/// batch of changes costs about as much as a rebuild at around a third of the objects; a
/// quarter keeps the cheaper choice on both sides with a margin.
const INCREMENTAL_RESET_DIVISOR: usize = 4;

/// How a snapshot differs from the stored objects.
#[derive(Default)]
struct SnapshotChanges {
    /// Positions in the snapshot of the objects that are new or differ from the stored ones,
    /// ascending.
    replaced: Vec<usize>,
    /// Stored objects the snapshot does not hold.
    deleted: Vec<Ref>,
}

/// In-memory index of every SMI object and the Consul state they mean.
///
/// A change recomputes only what it can affect: a TrafficTarget its old and new destination;
/// a route the destinations of the TrafficTargets that name it (so an intention appears as
/// soon as a missing route does); a TrafficSplit its old and new root service. The state always
/// equals [`crate::translate`] of the same objects.
///
/// [`Index::new`] already holds the managed default-deny intention when it is enabled, so the
/// caller should send a full sync of [`Index::desired`] at start-up rather than rely on
/// [`Index::apply`]'s commands alone.
#[derive(Clone, Debug)]
pub struct Index {
    options: TranslateOptions,
    objects: HashMap<Ref, SmiObject>,
    targets: HashMap<Ref, TargetPlan>,
    routes: Routes,
    splits: HashMap<Ref, SplitPlan>,
    by_destination: HashMap<ServiceName, BTreeSet<Ref>>,
    /// Route → TrafficTargets (with a valid destination) whose rules name it.
    route_dependents: HashMap<ObjectRef, HashSet<Ref>>,
    /// Destination → the sources of its intentions in `desired`, sorted (sources rather than
    /// whole keys: half the strings to copy for every intention).
    destination_sources: HashMap<ServiceName, Vec<ServiceName>>,
    by_root: HashMap<ServiceName, BTreeSet<Ref>>,
    /// Root → the services its written splitter needs http for.
    splitter_http: HashMap<ServiceName, Vec<ServiceName>>,
    http_reasons: HashMap<ServiceName, HashSet<HttpReason>>,
    /// OSS only: ServiceAccount name → namespace → (TrafficTarget, field) references.
    identity_refs: HashMap<String, NameRefs>,
    diagnostics: BTreeMap<Ref, ObjectDiagnostics>,
    desired: DesiredState,
}

impl Index {
    pub fn new(options: TranslateOptions) -> Self {
        let mut desired = DesiredState::default();
        if let Some(deny) = options.default_deny_intention() {
            desired.intentions.insert(deny.key.clone(), deny);
        }
        Index {
            options,
            objects: HashMap::new(),
            targets: HashMap::new(),
            routes: Routes::default(),
            splits: HashMap::new(),
            by_destination: HashMap::new(),
            route_dependents: HashMap::new(),
            destination_sources: HashMap::new(),
            by_root: HashMap::new(),
            splitter_http: HashMap::new(),
            http_reasons: HashMap::new(),
            identity_refs: HashMap::new(),
            diagnostics: BTreeMap::new(),
            desired,
        }
    }

    pub fn options(&self) -> &TranslateOptions {
        &self.options
    }

    /// Insert or replace `object`; returns the commands for what that changed. Re-applying an
    /// identical object returns no commands.
    pub fn apply(&mut self, object: SmiObject) -> Vec<Command> {
        let object_ref = object.object_ref();
        if self.objects.get(&object_ref) == Some(&object) {
            return Vec::new();
        }
        let mut touched = Touched::default();
        self.remove_object(&object_ref, &mut touched);
        self.insert_object(object_ref, object, &mut touched);
        let mut log = ChangeLog::recording();
        self.settle(&touched, &mut log);
        log.commands(&self.desired)
    }

    /// Forget `object`; returns the commands for what that changed (none if it was unknown).
    pub fn delete(&mut self, object: &ObjectRef) -> Vec<Command> {
        let mut touched = Touched::default();
        if !self.remove_object(object, &mut touched) {
            return Vec::new();
        }
        let mut log = ChangeLog::recording();
        self.settle(&touched, &mut log);
        log.commands(&self.desired)
    }

    /// Replace every object with `objects` (a fresh snapshot, e.g. after a watch restart);
    /// returns the commands from the previous state to the new one.
    ///
    /// If `objects` holds two objects with the same [`ObjectRef`], the later one wins.
    pub fn reset(&mut self, objects: Vec<SmiObject>) -> Vec<Command> {
        self.take_snapshot(objects, true)
    }

    /// [`Index::reset`] without the commands, for a caller that sends a full sync of
    /// [`Index::desired`] after a snapshot anyway: listing every entry as a command is a sixth
    /// of rebuilding a large index, all of it wasted then.
    pub fn replace(&mut self, objects: Vec<SmiObject>) {
        self.take_snapshot(objects, false);
    }

    fn take_snapshot(&mut self, objects: Vec<SmiObject>, with_commands: bool) -> Vec<Command> {
        if self.objects.is_empty() {
            return self.rebuild(objects, with_commands);
        }
        // A watch restart usually delivers (nearly) the objects the index already holds, and
        // rebuilding everything costs as much as thousands of single changes. So when few
        // objects differ, only they are replaced and deleted, and only what they touch is
        // recomputed, exactly as `apply`/`delete` would, in one batch.
        let limit = self.objects.len() / INCREMENTAL_RESET_DIVISOR;
        match self.snapshot_changes(&objects, limit) {
            Some(changes) => self.reset_incrementally(objects, changes, with_commands),
            None => self.rebuild(objects, with_commands),
        }
    }

    /// Change the options (e.g. once the writer reports the Consul version) and recompute.
    pub fn set_options(&mut self, options: TranslateOptions) -> Vec<Command> {
        if options == self.options {
            return Vec::new();
        }
        let objects: Vec<SmiObject> = mem::take(&mut self.objects).into_values().collect();
        self.options = options;
        self.rebuild(objects, true)
    }

    /// Replace the whole index by a fresh one loaded with `objects`; returns the commands from
    /// the previous state to the new one, if asked for.
    fn rebuild(&mut self, objects: Vec<SmiObject>, with_commands: bool) -> Vec<Command> {
        let mut fresh = Index::new(self.options.clone());
        fresh.load(objects);
        let commands = if with_commands {
            diff(&self.desired, &fresh.desired)
        } else {
            Vec::new()
        };
        *self = fresh;
        commands
    }

    /// How the snapshot `objects` differs from the stored objects, or `None` when more than
    /// `limit` objects differ (the comparison stops there) or when it names one object twice
    /// (the later one must win, which a full rebuild does; such a snapshot is not expected
    /// from a watch, so it need not be fast).
    fn snapshot_changes(&self, objects: &[SmiObject], limit: usize) -> Option<SnapshotChanges> {
        let mut changes = SnapshotChanges::default();
        // Stored objects the snapshot names, found through the stored keys so no name is
        // cloned; new objects, whose names are owned.
        let mut stored_seen: HashSet<&ObjectRef> = HashSet::with_capacity(self.objects.len());
        let mut new_seen: HashSet<ObjectRef> = HashSet::new();
        for (position, object) in objects.iter().enumerate() {
            let object_ref = object.object_ref();
            match self.objects.get_key_value(&object_ref) {
                Some((stored_ref, stored)) => {
                    if !stored_seen.insert(&**stored_ref) {
                        return None;
                    }
                    if stored != object {
                        changes.replaced.push(position);
                    }
                }
                None => {
                    if !new_seen.insert(object_ref) {
                        return None;
                    }
                    changes.replaced.push(position);
                }
            }
            if changes.replaced.len() > limit {
                return None;
            }
        }
        let deleted = self.objects.len() - stored_seen.len();
        if changes.replaced.len() + deleted > limit {
            return None;
        }
        if deleted > 0 {
            changes.deleted = self
                .objects
                .keys()
                .filter(|stored_ref| !stored_seen.contains(&***stored_ref))
                .cloned()
                .collect();
        }
        Some(changes)
    }

    /// Apply the snapshot `objects` as the single changes `changes` (from
    /// [`Index::snapshot_changes`] of the same snapshot), recomputing once at the end; returns
    /// their commands, if asked for.
    fn reset_incrementally(
        &mut self,
        objects: Vec<SmiObject>,
        changes: SnapshotChanges,
        with_commands: bool,
    ) -> Vec<Command> {
        let mut touched = Touched::default();
        for object_ref in &changes.deleted {
            self.remove_object(object_ref, &mut touched);
        }
        let mut replaced = changes.replaced.into_iter().peekable();
        for (position, object) in objects.into_iter().enumerate() {
            if replaced.next_if_eq(&position).is_some() {
                let object_ref = object.object_ref();
                self.remove_object(&object_ref, &mut touched);
                self.insert_object(object_ref, object, &mut touched);
            }
        }
        let mut log = ChangeLog {
            enabled: with_commands,
            ..ChangeLog::default()
        };
        self.settle(&touched, &mut log);
        log.commands(&self.desired)
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn objects_len(&self) -> usize {
        self.objects.len()
    }

    pub fn get(&self, object: &ObjectRef) -> Option<&SmiObject> {
        self.objects.get(object)
    }

    /// Every current diagnostic, grouped by object in [`ObjectRef`] order.
    pub fn diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.values().flat_map(ObjectDiagnostics::iter)
    }

    /// The status of one known object.
    pub fn status(&self, object: &ObjectRef) -> Option<ObjectStatus<'_>> {
        let (object, diagnostics) = self.diagnostics.get_key_value(object)?;
        Some(ObjectStatus::new(object, diagnostics.iter().collect()))
    }

    /// The status of every known object, in [`ObjectRef`] order (objects without diagnostics
    /// are listed as [`crate::Status::Ok`]).
    pub fn statuses(&self) -> impl Iterator<Item = ObjectStatus<'_>> {
        self.diagnostics
            .iter()
            .map(|(object, diagnostics)| ObjectStatus::new(object, diagnostics.iter().collect()))
    }

    /// Fill a fresh index: insert everything, then compute every destination, split root and
    /// collapse once, building the intention map in one sorted pass.
    fn load(&mut self, objects: Vec<SmiObject>) {
        // Later objects replace earlier ones with the same name, as updates would; what is
        // left is indexed once, with the large maps sized up front rather than regrown.
        let mut stored: HashMap<Ref, SmiObject> = HashMap::with_capacity(objects.len());
        for object in objects {
            stored.insert(Arc::new(object.object_ref()), object);
        }
        let targets = stored
            .keys()
            .filter(|object_ref| object_ref.kind == SmiKind::TrafficTarget)
            .count();
        self.targets.reserve(targets);
        // A guess (meshes commonly have a couple of TrafficTargets per destination); a wrong
        // one costs one regrowth, whereas growing from empty rehashes every key several times.
        self.by_destination.reserve(targets / 2);
        if self.oss() {
            self.identity_refs.reserve(targets / 2);
        }
        let mut touched = Touched {
            bulk: true,
            ..Touched::default()
        };
        let mut diagnostics = Vec::with_capacity(stored.len());
        for (object_ref, object) in &stored {
            let object_diagnostics = self.index_object(object_ref, object, &mut touched);
            diagnostics.push((object_ref.clone(), object_diagnostics));
        }
        self.objects = stored;
        // Built from the sorted pairs in one pass, instead of one search per object.
        self.diagnostics = diagnostics.into_iter().collect();

        let mut intentions: Vec<Intention> = Vec::new();
        self.destination_sources.reserve(self.by_destination.len());
        self.http_reasons.reserve(self.by_destination.len());
        for (destination, group) in &self.by_destination {
            let output = resolve::resolve_destination(
                destination,
                group
                    .iter()
                    .filter_map(|r| self.targets.get(r).map(|p| (&**r, p))),
                &self.routes,
                &self.options,
            );
            for diagnostic in output.diagnostics {
                if let Some(diagnostics) = self.diagnostics.get_mut(&diagnostic.object) {
                    diagnostics.resolved.push(diagnostic);
                }
            }
            if !output.intentions.is_empty() {
                let sources = output.intentions.iter().map(|i| i.key.source.clone());
                self.destination_sources
                    .insert(destination.clone(), sources.collect());
            }
            if output.needs_http {
                let reasons = HashSet::from([HttpReason::Destination]);
                self.http_reasons.insert(destination.clone(), reasons);
            }
            intentions.extend(output.intentions);
        }
        intentions.extend(mem::take(&mut self.desired.intentions).into_values());
        self.desired.intentions = resolve::intention_map(intentions);
        // Nothing else needs http yet: splitters are added below, through `set_http_reason`.
        self.desired.service_defaults = self
            .http_reasons
            .keys()
            .map(|service| (service.clone(), http_defaults(service)))
            .collect();

        let mut log = ChangeLog::default();
        let roots: Vec<ServiceName> = self.by_root.keys().cloned().collect();
        for root in &roots {
            self.recompute_root(root, &mut log);
        }
        if self.oss() {
            for (name, refs) in &self.identity_refs {
                if refs.namespace_count() < 2 {
                    continue;
                }
                let namespaces: BTreeSet<&str> = refs.namespaces().collect();
                for (namespace, object, field) in refs.iter() {
                    let diagnostic =
                        resolve::collapse_diagnostic(object, field, namespace, name, &namespaces);
                    if let Some(diagnostics) = self.diagnostics.get_mut(object) {
                        diagnostics.add_collapse(name, diagnostic);
                    }
                }
            }
        }
    }

    fn oss(&self) -> bool {
        matches!(self.options.namespaces, NamespaceMode::Oss)
    }

    fn namespaces_of(&self, name: &str) -> Vec<String> {
        self.identity_refs
            .get(name)
            .map(|refs| refs.namespaces().map(str::to_string).collect())
            .unwrap_or_default()
    }

    fn touch_name(&self, name: &str, touched: &mut Touched) {
        if !touched.bulk && !touched.names.contains_key(name) {
            touched
                .names
                .insert(name.to_string(), self.namespaces_of(name));
        }
    }

    fn touch_route_dependents(&self, route: &ObjectRef, touched: &mut Touched) {
        for target in self.route_dependents.get(route).into_iter().flatten() {
            if let Some(destination) = self
                .targets
                .get(target)
                .and_then(|p| p.destination.as_ref())
            {
                touched.destination(&destination.service);
            }
        }
    }

    /// Remove `object_ref` from every structure; returns whether it was known.
    fn remove_object(&mut self, object_ref: &ObjectRef, touched: &mut Touched) -> bool {
        let Some((shared, _)) = self.objects.remove_entry(object_ref) else {
            return false;
        };
        self.diagnostics.remove(object_ref);
        match object_ref.kind {
            SmiKind::TrafficTarget => {
                let Some(target_plan) = self.targets.remove(object_ref) else {
                    return true;
                };
                if let Some(destination) = &target_plan.destination {
                    let service = &destination.service;
                    if let Some(group) = self.by_destination.get_mut(service) {
                        group.remove(object_ref);
                        if group.is_empty() {
                            self.by_destination.remove(service);
                        }
                    }
                    touched.destination(service);
                    for rule in &target_plan.rules {
                        if let Some(dependents) = self.route_dependents.get_mut(&rule.route) {
                            dependents.remove(object_ref);
                            if dependents.is_empty() {
                                self.route_dependents.remove(&rule.route);
                            }
                        }
                    }
                }
                if self.oss() {
                    for identity in target_plan.identities() {
                        self.touch_name(&identity.service.name, touched);
                        let Some(refs) = self.identity_refs.get_mut(&identity.service.name) else {
                            continue;
                        };
                        refs.remove(&identity.namespace, &shared, identity.field);
                        if refs.is_empty() {
                            self.identity_refs.remove(&identity.service.name);
                        }
                    }
                }
            }
            SmiKind::HTTPRouteGroup => {
                self.routes.http.remove(object_ref);
                self.touch_route_dependents(object_ref, touched);
            }
            SmiKind::TCPRoute => {
                self.routes.tcp.remove(object_ref);
                self.touch_route_dependents(object_ref, touched);
            }
            SmiKind::UDPRoute => {}
            SmiKind::TrafficSplit => {
                if let Some(root) = self.splits.remove(object_ref).and_then(|p| p.root) {
                    if let Some(group) = self.by_root.get_mut(&root) {
                        group.remove(object_ref);
                        if group.is_empty() {
                            self.by_root.remove(&root);
                        }
                    }
                    touched.root(&root);
                }
            }
        }
        true
    }

    fn insert_object(&mut self, object_ref: ObjectRef, object: SmiObject, touched: &mut Touched) {
        let object_ref: Ref = Arc::new(object_ref);
        let diagnostics = self.index_object(&object_ref, &object, touched);
        self.diagnostics.insert(object_ref.clone(), diagnostics);
        self.objects.insert(object_ref, object);
    }

    /// Enter a new `object` into every structure but `objects` and `diagnostics`; returns its
    /// diagnostics.
    fn index_object(
        &mut self,
        object_ref: &Ref,
        object: &SmiObject,
        touched: &mut Touched,
    ) -> ObjectDiagnostics {
        let mut diagnostics = ObjectDiagnostics::default();
        match object {
            SmiObject::TrafficTarget(target) => {
                let mut target_plan = plan::plan_target(target, &self.options);
                diagnostics.local = mem::take(&mut target_plan.local);
                if let Some(destination) = &target_plan.destination {
                    slot(&mut self.by_destination, &destination.service).insert(object_ref.clone());
                    touched.destination(&destination.service);
                    for rule in &target_plan.rules {
                        slot(&mut self.route_dependents, &rule.route).insert(object_ref.clone());
                    }
                }
                if self.oss() {
                    for identity in target_plan.identities() {
                        self.touch_name(&identity.service.name, touched);
                        slot(&mut self.identity_refs, identity.service.name.as_str()).insert(
                            &identity.namespace,
                            object_ref,
                            identity.field,
                        );
                    }
                    touched.target(object_ref);
                }
                self.targets.insert(object_ref.clone(), target_plan);
            }
            SmiObject::HttpRouteGroup(group) => {
                let mut route_plan = plan::plan_http_route_group(group);
                diagnostics.local = mem::take(&mut route_plan.local);
                self.routes.http.insert((**object_ref).clone(), route_plan);
                self.touch_route_dependents(object_ref, touched);
            }
            SmiObject::TcpRoute(route) => {
                diagnostics.local = plan::tcp_route_diagnostics(route);
                self.routes.tcp.insert((**object_ref).clone());
                self.touch_route_dependents(object_ref, touched);
            }
            SmiObject::UdpRoute(route) => diagnostics.local = plan::udp_route_diagnostics(route),
            SmiObject::TrafficSplit(split) => {
                let mut split_plan = plan::plan_split(split, &self.options);
                diagnostics.local = mem::take(&mut split_plan.local);
                if let Some(root) = &split_plan.root {
                    slot(&mut self.by_root, root).insert(object_ref.clone());
                    touched.root(root);
                }
                self.splits.insert(object_ref.clone(), split_plan);
            }
        }
        diagnostics
    }

    fn settle(&mut self, touched: &Touched, log: &mut ChangeLog) {
        for destination in &touched.destinations {
            self.recompute_destination(destination, log);
        }
        for root in &touched.roots {
            self.recompute_root(root, log);
        }
        if self.oss() {
            self.recompute_collapse(touched);
        }
    }

    fn recompute_destination(&mut self, destination: &ServiceName, log: &mut ChangeLog) {
        let group = self.by_destination.get(destination);
        let output = match group {
            Some(group) => resolve::resolve_destination(
                destination,
                group
                    .iter()
                    .filter_map(|r| self.targets.get(r).map(|p| (&**r, p))),
                &self.routes,
                &self.options,
            ),
            None => DestinationOutput::default(),
        };
        for object in group.into_iter().flatten() {
            if let Some(diagnostics) = self.diagnostics.get_mut(object) {
                diagnostics.resolved.clear();
            }
        }
        for diagnostic in output.diagnostics {
            if let Some(diagnostics) = self.diagnostics.get_mut(&diagnostic.object) {
                diagnostics.resolved.push(diagnostic);
            }
        }

        let new_sources: Vec<ServiceName> = output
            .intentions
            .iter()
            .map(|i| i.key.source.clone())
            .collect();
        for source in self
            .destination_sources
            .remove(destination)
            .unwrap_or_default()
        {
            if new_sources.binary_search(&source).is_err() {
                let key = IntentionKey {
                    source,
                    destination: destination.clone(),
                };
                log.intention(&key, &self.desired);
                self.desired.intentions.remove(&key);
            }
        }
        for intention in output.intentions {
            if self.desired.intentions.get(&intention.key) != Some(&intention) {
                log.intention(&intention.key, &self.desired);
                self.desired
                    .intentions
                    .insert(intention.key.clone(), intention);
            }
        }
        if !new_sources.is_empty() {
            self.destination_sources
                .insert(destination.clone(), new_sources);
        }
        self.set_http_reason(destination, HttpReason::Destination, output.needs_http, log);
    }

    fn recompute_root(&mut self, root: &ServiceName, log: &mut ChangeLog) {
        let group = self.by_root.get(root);
        let output = match group {
            Some(group) => resolve::resolve_split_group(
                root,
                group
                    .iter()
                    .filter_map(|r| self.splits.get(r).map(|p| (&**r, p))),
            ),
            None => SplitOutput::default(),
        };
        for object in group.into_iter().flatten() {
            if let Some(diagnostics) = self.diagnostics.get_mut(object) {
                diagnostics.resolved.clear();
            }
        }
        for diagnostic in output.diagnostics {
            if let Some(diagnostics) = self.diagnostics.get_mut(&diagnostic.object) {
                diagnostics.resolved.push(diagnostic);
            }
        }

        let new_http = output
            .splitter
            .as_ref()
            .map(resolve::splitter_services)
            .unwrap_or_default();
        match output.splitter {
            Some(splitter) => {
                if self.desired.splitters.get(root) != Some(&splitter) {
                    log.splitter(root, &self.desired);
                    self.desired.splitters.insert(root.clone(), splitter);
                }
            }
            None => {
                if self.desired.splitters.contains_key(root) {
                    log.splitter(root, &self.desired);
                    self.desired.splitters.remove(root);
                }
            }
        }
        let reason = HttpReason::Splitter(root.clone());
        for service in self.splitter_http.remove(root).unwrap_or_default() {
            if !new_http.contains(&service) {
                self.set_http_reason(&service, reason.clone(), false, log);
            }
        }
        for service in &new_http {
            self.set_http_reason(service, reason.clone(), true, log);
        }
        if !new_http.is_empty() {
            self.splitter_http.insert(root.clone(), new_http);
        }
    }

    fn set_http_reason(
        &mut self,
        service: &ServiceName,
        reason: HttpReason,
        wanted: bool,
        log: &mut ChangeLog,
    ) {
        if wanted {
            let reasons = self.http_reasons.entry(service.clone()).or_default();
            if reasons.insert(reason) && reasons.len() == 1 {
                log.defaults(service, &self.desired);
                self.desired
                    .service_defaults
                    .insert(service.clone(), http_defaults(service));
            }
        } else if let Some(reasons) = self.http_reasons.get_mut(service)
            && reasons.remove(&reason)
            && reasons.is_empty()
        {
            self.http_reasons.remove(service);
            log.defaults(service, &self.desired);
            self.desired.service_defaults.remove(service);
        }
    }

    /// Namespace-collapse warnings depend on the set of namespaces referencing a name: when it
    /// changed, every reference's warning is regenerated; otherwise only the references of the
    /// TrafficTargets this change inserted get theirs.
    fn recompute_collapse(&mut self, touched: &Touched) {
        for (name, before) in &touched.names {
            let after = self.namespaces_of(name);
            let namespaces: BTreeSet<&str> = after.iter().map(String::as_str).collect();
            if *before != after {
                let Some(refs) = self.identity_refs.get(name) else {
                    continue;
                };
                for (_, object, _) in refs.iter() {
                    if let Some(diagnostics) = self.diagnostics.get_mut(object) {
                        diagnostics.collapse.remove(name);
                    }
                }
                if namespaces.len() < 2 {
                    continue;
                }
                for (namespace, object, field) in refs.iter() {
                    let diagnostic =
                        resolve::collapse_diagnostic(object, field, namespace, name, &namespaces);
                    if let Some(diagnostics) = self.diagnostics.get_mut(object) {
                        diagnostics.add_collapse(name, diagnostic);
                    }
                }
            } else if namespaces.len() >= 2 {
                for object in &touched.targets {
                    let Some(target_plan) = self.targets.get(object) else {
                        continue;
                    };
                    for identity in target_plan.identities().filter(|i| &i.service.name == name) {
                        let diagnostic = resolve::collapse_diagnostic(
                            object,
                            identity.field,
                            &identity.namespace,
                            name,
                            &namespaces,
                        );
                        if let Some(diagnostics) = self.diagnostics.get_mut(object) {
                            diagnostics.add_collapse(name, diagnostic);
                        }
                    }
                }
            }
        }
    }
}
