//! Ownership-aware writes: apply commands and reconcile a desired state, touching only
//! objects this writer owns, on whichever intentions API the server speaks.
//!
//! Order matters to Consul's discovery-chain validation, so every batch runs in phases:
//! service-defaults upserts (a splitter or L7 intention needs protocol http), splitters,
//! intentions, then service-defaults deletes.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use consul_smi_core::{
    Action, Command, DesiredState, HeaderMatchKind, Intention, IntentionKey, IntentionRule,
    Outcome, PathMatch, Permission, ServiceDefaults, ServiceName, ServiceSplitter,
};
use futures::StreamExt;
use rand::Rng;
use tracing::{Instrument, Span};

use crate::client::ConsulClient;
use crate::entries::{
    ConfigEntry, SERVICE_DEFAULTS, SERVICE_SPLITTER, ServiceDefaultsEntry, ServiceIntentionsEntry,
    ServiceSplitterEntry, SourceIntention, WireHeader, WireHttp, WirePermission, WireSplit,
};
use crate::error::ConsulError;
use crate::legacy::{LegacyIntention, LegacyIntentionWrite, is_duplicate, is_vanished};
use crate::owner::{DESCRIPTION_MAX, Owner, Ownership, truncate_bytes};
use crate::version::ApiFlavor;

/// Read-modify-write rounds before giving up on an entry that keeps changing.
const MAX_CAS_ROUNDS: u32 = 20;
/// Above this many distinct pairs, one full list is cheaper than a lookup per pair.
const LIST_THRESHOLD: usize = 16;

/// What a command did to Consul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    Deleted,
    None,
}

/// The result of one command or one reconciled object.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandReport {
    /// `Command::target()`, e.g. `intention web -> api`.
    pub target: String,
    pub outcome: Outcome,
    pub change: Change,
    /// Consul's message (or ours) for conflicts, rejections and failures.
    pub message: String,
}

impl CommandReport {
    fn new(target: &str, outcome: Outcome, change: Change, message: impl Into<String>) -> Self {
        CommandReport {
            target: target.to_string(),
            outcome,
            change,
            message: message.into(),
        }
    }

    fn applied(target: &str, change: Change) -> Self {
        let message = match change {
            Change::Created => "created",
            Change::Updated => "updated",
            Change::Deleted => "deleted",
            Change::None => "",
        };
        CommandReport::new(target, Outcome::Applied, change, message)
    }

    fn unchanged(target: &str, message: &str) -> Self {
        CommandReport::new(target, Outcome::Unchanged, Change::None, message)
    }

    fn conflict(target: &str, message: String) -> Self {
        CommandReport::new(target, Outcome::Conflict, Change::None, message)
    }

    fn error(target: &str, error: &ConsulError) -> Self {
        CommandReport::new(target, error.outcome(), Change::None, error.to_string())
    }
}

/// Whether a reconcile may delete owned objects that the state does not mention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Consul ends up holding exactly the state (among owned objects).
    Exact,
    /// Only create/restore what the state holds; used before a writer has seen a full state.
    RestoreOnly,
}

/// The outcome of a reconcile: counts, plus one report per object touched or not applied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyncReport {
    pub results: Vec<CommandReport>,
    pub created: u32,
    pub updated: u32,
    pub deleted: u32,
    pub unchanged: u32,
    pub conflicts: u32,
    pub rejected: u32,
    pub failed: u32,
}

impl SyncReport {
    fn add(&mut self, report: CommandReport) {
        match report.change {
            Change::Created => self.created += 1,
            Change::Updated => self.updated += 1,
            Change::Deleted => self.deleted += 1,
            Change::None => {}
        }
        match report.outcome {
            Outcome::Unchanged => self.unchanged += 1,
            Outcome::Conflict => self.conflicts += 1,
            Outcome::Rejected => self.rejected += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Applied => {}
        }
        if report.outcome != Outcome::Unchanged {
            self.results.push(report);
        }
    }

    /// Whether this reconcile wrote anything.
    pub fn wrote(&self) -> bool {
        self.created + self.updated + self.deleted > 0
    }
}

// Owned (not borrowed) so the futures that carry ops stay `Send` for any caller.
#[derive(Clone, Debug)]
enum IntentionOp {
    Upsert(Intention),
    Delete(IntentionKey),
}

impl IntentionOp {
    fn key(&self) -> &IntentionKey {
        match self {
            IntentionOp::Upsert(i) => &i.key,
            IntentionOp::Delete(k) => k,
        }
    }

    fn target(&self) -> String {
        format!("intention {}", self.key())
    }
}

/// `default` and empty both mean "no namespace" (OSS lists `default`).
/// The span the Consul requests for command `i` run in; `Span::none()` leaves the caller's.
fn span_of(spans: &[Span], i: usize) -> Span {
    spans.get(i).cloned().unwrap_or_else(Span::none)
}

fn ns_norm(namespace: Option<&str>) -> Option<&str> {
    namespace.filter(|ns| !ns.is_empty() && *ns != "default")
}

type PairKey = (Option<String>, String, Option<String>, String);
type ServiceKey = (Option<String>, String);

fn service_key(service: &ServiceName) -> ServiceKey {
    (
        ns_norm(service.namespace.as_deref()).map(str::to_string),
        service.name.clone(),
    )
}

fn pair_key(key: &IntentionKey) -> PairKey {
    let (sns, sname) = service_key(&key.source);
    let (dns, dname) = service_key(&key.destination);
    (sns, sname, dns, dname)
}

fn legacy_pair_key(intention: &LegacyIntention) -> PairKey {
    let ns = |s: &str| ns_norm(Some(s)).map(str::to_string);
    (
        ns(&intention.source_ns),
        intention.source_name.clone(),
        ns(&intention.destination_ns),
        intention.destination_name.clone(),
    )
}

fn key_from_legacy(intention: &LegacyIntention) -> IntentionKey {
    let service = |ns: &str, name: &str| ServiceName {
        namespace: ns_norm(Some(ns)).map(str::to_string),
        name: name.to_string(),
    };
    IntentionKey {
        source: service(&intention.source_ns, &intention.source_name),
        destination: service(&intention.destination_ns, &intention.destination_name),
    }
}

/// Applies commands and reconciles states for one owner.
#[derive(Clone, Debug)]
pub struct Reconciler {
    client: ConsulClient,
    owner: Owner,
    concurrency: usize,
}

impl Reconciler {
    /// `concurrency` bounds the objects written at once (the client bounds requests too).
    pub fn new(client: ConsulClient, owner: Owner, concurrency: usize) -> Self {
        Reconciler {
            client,
            owner,
            concurrency: concurrency.max(1),
        }
    }

    pub fn client(&self) -> &ConsulClient {
        &self.client
    }

    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// Applies a batch; one report per command, in order. Never fails as a whole.
    pub async fn apply(&self, commands: &[Command]) -> Vec<CommandReport> {
        self.apply_in_spans(commands, &[]).await
    }

    /// Like [`apply`](Self::apply), with the Consul requests for `commands[i]` made inside
    /// `spans[i]` (e.g. a span continuing the trace of the change behind the command); a
    /// missing span means the caller's. Intentions on one destination (one pair, on the
    /// legacy API) share one read-modify-write, which runs in the first such command's span.
    pub async fn apply_in_spans(&self, commands: &[Command], spans: &[Span]) -> Vec<CommandReport> {
        let mut reports: Vec<Option<CommandReport>> = vec![None; commands.len()];
        let flavor = self.client.flavor().await;

        let phase = |wanted: fn(&Command) -> bool| -> Vec<usize> {
            (0..commands.len())
                .filter(|&i| wanted(&commands[i]))
                .collect()
        };
        let defaults_upserts = phase(|c| matches!(c, Command::UpsertServiceDefaults(_)));
        let splitters =
            phase(|c| matches!(c, Command::UpsertSplitter(_) | Command::DeleteSplitter(_)));
        let intentions =
            phase(|c| matches!(c, Command::UpsertIntention(_) | Command::DeleteIntention(_)));
        let defaults_deletes = phase(|c| matches!(c, Command::DeleteServiceDefaults(_)));

        let flavor = match flavor {
            Ok(flavor) => flavor,
            Err(error) => {
                return commands
                    .iter()
                    .map(|c| CommandReport::error(&c.target(), &error))
                    .collect();
            }
        };

        for i in defaults_upserts.into_iter().chain(splitters) {
            reports[i] = Some(
                self.apply_config_command(&commands[i], flavor)
                    .instrument(span_of(spans, i))
                    .await,
            );
        }

        let ops: Vec<(usize, IntentionOp)> = intentions
            .into_iter()
            .map(|i| match &commands[i] {
                Command::UpsertIntention(intention) => (i, IntentionOp::Upsert(intention.clone())),
                Command::DeleteIntention(key) => (i, IntentionOp::Delete(key.clone())),
                _ => unreachable!("filtered to intention commands above"),
            })
            .collect();
        if !ops.is_empty() {
            let results = match flavor {
                ApiFlavor::Legacy => self.legacy_apply(ops, None, spans).await,
                ApiFlavor::Modern => self.modern_apply(ops, None, spans).await,
            };
            for (i, report) in results {
                reports[i] = Some(report);
            }
        }

        for i in defaults_deletes {
            reports[i] = Some(
                self.apply_config_command(&commands[i], flavor)
                    .instrument(span_of(spans, i))
                    .await,
            );
        }

        reports
            .into_iter()
            .zip(commands)
            .map(|(report, command)| {
                report.unwrap_or_else(|| {
                    CommandReport::new(
                        &command.target(),
                        Outcome::Failed,
                        Change::None,
                        "not processed",
                    )
                })
            })
            .collect()
    }

    /// Reconciles Consul to `state` among the objects this writer owns. Fails as a whole
    /// only when Consul cannot be listed; per-object problems are in the report.
    pub async fn sync(
        &self,
        state: &DesiredState,
        mode: SyncMode,
    ) -> Result<SyncReport, ConsulError> {
        let flavor = self.client.flavor().await?;
        let all_ns = self.uses_namespaces(state);
        let mut report = SyncReport::default();

        let defaults = self
            .client
            .list_config_entries::<ServiceDefaultsEntry>(all_ns, None)
            .await?
            .value;
        let splitters = self
            .client
            .list_config_entries::<ServiceSplitterEntry>(all_ns, None)
            .await?
            .value;
        let defaults: HashMap<ServiceKey, ServiceDefaultsEntry> = defaults
            .into_iter()
            .map(|e| {
                (
                    (
                        ns_norm(e.namespace.as_deref()).map(str::to_string),
                        e.name.clone(),
                    ),
                    e,
                )
            })
            .collect();
        let splitters: HashMap<ServiceKey, ServiceSplitterEntry> = splitters
            .into_iter()
            .map(|e| {
                (
                    (
                        ns_norm(e.namespace.as_deref()).map(str::to_string),
                        e.name.clone(),
                    ),
                    e,
                )
            })
            .collect();

        // Phase 1: service-defaults upserts.
        let mut futures = Vec::new();
        for desired in state.service_defaults.values() {
            let current = defaults.get(&service_key(&desired.service)).cloned();
            futures.push(self.config_op(
                format!("service-defaults {}", desired.service),
                &desired.service,
                Some(self.defaults_entry(desired)),
                Some(current),
                flavor,
            ));
        }
        for r in self.run_all(futures).await {
            report.add(r);
        }

        // Phase 2: splitters.
        let mut orphans = Vec::new();
        let mut futures = Vec::new();
        for desired in state.splitters.values() {
            let current = splitters.get(&service_key(&desired.service)).cloned();
            futures.push(self.config_op(
                format!("service-splitter {}", desired.service),
                &desired.service,
                Some(self.splitter_entry(desired)),
                Some(current),
                flavor,
            ));
        }
        if mode == SyncMode::Exact {
            for ((ns, name), entry) in &splitters {
                let service = ServiceName {
                    namespace: ns.clone(),
                    name: name.clone(),
                };
                if self.owner.judge_meta(Some(&entry.meta)) == Ownership::Ours
                    && !state
                        .splitters
                        .keys()
                        .any(|k| service_key(k) == (ns.clone(), name.clone()))
                {
                    orphans.push((service, entry.clone()));
                }
            }
        }
        for (service, entry) in &orphans {
            futures.push(self.config_op::<ServiceSplitterEntry>(
                format!("service-splitter {service}"),
                service,
                None,
                Some(Some(entry.clone())),
                flavor,
            ));
        }
        for r in self.run_all(futures).await {
            report.add(r);
        }

        // Phase 3: intentions.
        let mut ops: Vec<(usize, IntentionOp)> = state
            .intentions
            .values()
            .enumerate()
            .map(|(i, x)| (i, IntentionOp::Upsert(x.clone())))
            .collect();
        let results = match flavor {
            ApiFlavor::Legacy => {
                let listed = self.client.list_legacy_intentions(None).await?.value;
                let orphan_keys: Vec<IntentionKey> = if mode == SyncMode::Exact {
                    let desired: std::collections::HashSet<PairKey> =
                        state.intentions.keys().map(pair_key).collect();
                    listed
                        .iter()
                        .filter(|x| self.owner.judge_meta(x.meta.as_ref()) == Ownership::Ours)
                        .filter(|x| !desired.contains(&legacy_pair_key(x)))
                        .map(key_from_legacy)
                        .collect()
                } else {
                    Vec::new()
                };
                let base = ops.len();
                ops.extend(
                    orphan_keys
                        .iter()
                        .enumerate()
                        .map(|(i, k)| (base + i, IntentionOp::Delete(k.clone()))),
                );
                let existing: HashMap<PairKey, LegacyIntention> = listed
                    .into_iter()
                    .map(|x| (legacy_pair_key(&x), x))
                    .collect();
                self.legacy_apply(ops, Some(existing), &[]).await
            }
            ApiFlavor::Modern => {
                let listed = self
                    .client
                    .list_config_entries::<ServiceIntentionsEntry>(all_ns, None)
                    .await?
                    .value;
                let orphan_keys: Vec<IntentionKey> = if mode == SyncMode::Exact {
                    let desired: std::collections::HashSet<PairKey> =
                        state.intentions.keys().map(pair_key).collect();
                    let mut keys = Vec::new();
                    for entry in &listed {
                        let destination = ServiceName {
                            namespace: ns_norm(entry.namespace.as_deref()).map(str::to_string),
                            name: entry.name.clone(),
                        };
                        for source in &entry.sources {
                            if self.judge_source(source) != Ownership::Ours || is_peered(source) {
                                continue;
                            }
                            let key = IntentionKey {
                                source: ServiceName {
                                    namespace: ns_norm(source.namespace.as_deref())
                                        .map(str::to_string),
                                    name: source.name.clone(),
                                },
                                destination: destination.clone(),
                            };
                            if !desired.contains(&pair_key(&key)) {
                                keys.push(key);
                            }
                        }
                    }
                    keys
                } else {
                    Vec::new()
                };
                let base = ops.len();
                ops.extend(
                    orphan_keys
                        .iter()
                        .enumerate()
                        .map(|(i, k)| (base + i, IntentionOp::Delete(k.clone()))),
                );
                let existing: HashMap<ServiceKey, ServiceIntentionsEntry> = listed
                    .into_iter()
                    .map(|e| {
                        (
                            (
                                ns_norm(e.namespace.as_deref()).map(str::to_string),
                                e.name.clone(),
                            ),
                            e,
                        )
                    })
                    .collect();
                self.modern_apply(ops, Some(existing), &[]).await
            }
        };
        for (_, r) in results {
            report.add(r);
        }

        // Phase 4: service-defaults deletes.
        if mode == SyncMode::Exact {
            let mut orphans = Vec::new();
            let mut futures = Vec::new();
            for ((ns, name), entry) in &defaults {
                if self.owner.judge_meta(Some(&entry.meta)) == Ownership::Ours
                    && !state
                        .service_defaults
                        .keys()
                        .any(|k| service_key(k) == (ns.clone(), name.clone()))
                {
                    orphans.push((
                        ServiceName {
                            namespace: ns.clone(),
                            name: name.clone(),
                        },
                        entry.clone(),
                    ));
                }
            }
            for (service, entry) in &orphans {
                futures.push(self.config_op::<ServiceDefaultsEntry>(
                    format!("service-defaults {service}"),
                    service,
                    None,
                    Some(Some(entry.clone())),
                    flavor,
                ));
            }
            for r in self.run_all(futures).await {
                report.add(r);
            }
        }
        Ok(report)
    }

    fn uses_namespaces(&self, state: &DesiredState) -> bool {
        self.client.namespace_for(None).is_some()
            || state.intentions.keys().any(|k| {
                ns_norm(k.source.namespace.as_deref()).is_some()
                    || ns_norm(k.destination.namespace.as_deref()).is_some()
            })
            || state
                .splitters
                .keys()
                .chain(state.service_defaults.keys())
                .any(|s| ns_norm(s.namespace.as_deref()).is_some())
    }

    async fn run_all<F: Future<Output = CommandReport>>(
        &self,
        futures: Vec<F>,
    ) -> Vec<CommandReport> {
        futures::stream::iter(futures)
            .buffer_unordered(self.concurrency)
            .collect()
            .await
    }

    // ---- config entries -------------------------------------------------------------

    fn defaults_entry(&self, desired: &ServiceDefaults) -> ServiceDefaultsEntry {
        ServiceDefaultsEntry {
            kind: SERVICE_DEFAULTS.into(),
            name: desired.service.name.clone(),
            namespace: ns_norm(desired.service.namespace.as_deref()).map(str::to_string),
            protocol: desired.protocol.clone(),
            meta: self.owner.meta(),
            modify_index: 0,
        }
    }

    fn splitter_entry(&self, desired: &ServiceSplitter) -> ServiceSplitterEntry {
        ServiceSplitterEntry {
            kind: SERVICE_SPLITTER.into(),
            name: desired.service.name.clone(),
            namespace: ns_norm(desired.service.namespace.as_deref()).map(str::to_string),
            splits: desired
                .splits
                .iter()
                .map(|s| WireSplit {
                    weight: s.weight,
                    service: s.service.clone(),
                    service_subset: String::new(),
                    namespace: ns_norm(s.namespace.as_deref()).map(str::to_string),
                })
                .collect(),
            meta: self.owner.meta(),
            modify_index: 0,
        }
    }

    async fn apply_config_command(&self, command: &Command, flavor: ApiFlavor) -> CommandReport {
        let target = command.target();
        match command {
            Command::UpsertServiceDefaults(d) => {
                self.config_op(
                    target,
                    &d.service,
                    Some(self.defaults_entry(d)),
                    None,
                    flavor,
                )
                .await
            }
            Command::DeleteServiceDefaults(s) => {
                self.config_op::<ServiceDefaultsEntry>(target, s, None, None, flavor)
                    .await
            }
            Command::UpsertSplitter(s) => {
                self.config_op(
                    target,
                    &s.service,
                    Some(self.splitter_entry(s)),
                    None,
                    flavor,
                )
                .await
            }
            Command::DeleteSplitter(s) => {
                self.config_op::<ServiceSplitterEntry>(target, s, None, None, flavor)
                    .await
            }
            Command::UpsertIntention(_) | Command::DeleteIntention(_) => {
                CommandReport::new(&target, Outcome::Failed, Change::None, "not a config entry")
            }
        }
    }

    /// Creates, updates (`desired: Some`) or deletes (`None`) one owned config entry.
    /// `current: Some(listed)` skips the first read.
    async fn config_op<E: ConfigEntry>(
        &self,
        target: String,
        service: &ServiceName,
        desired: Option<E>,
        mut current: Option<Option<E>>,
        flavor: ApiFlavor,
    ) -> CommandReport {
        let namespace = ns_norm(service.namespace.as_deref());
        for round in 0..MAX_CAS_ROUNDS {
            if round > 0 {
                cas_pause(round).await;
            }
            let existing = match current.take() {
                Some(existing) => existing,
                None => match self
                    .client
                    .get_config_entry::<E>(&service.name, namespace)
                    .await
                {
                    Ok(existing) => existing,
                    Err(e) => return CommandReport::error(&target, &e),
                },
            };
            let result = match (&existing, &desired) {
                (None, None) => return CommandReport::unchanged(&target, "already absent"),
                (None, Some(desired)) => self
                    .client
                    .cas_config_entry(desired, 0)
                    .await
                    .map(|ok| (ok, Change::Created)),
                (Some(existing), desired) => {
                    let ownership = self.owner.judge_meta(Some(existing.meta()));
                    if ownership != Ownership::Ours {
                        let matches = desired
                            .as_ref()
                            .is_some_and(|d| same_entry_content(existing, d, false));
                        return CommandReport::conflict(
                            &target,
                            format!(
                                "{target} exists in Consul and is {}{}; left untouched",
                                ownership.describe(),
                                if matches {
                                    " (its content matches the desired one)"
                                } else {
                                    ""
                                }
                            ),
                        );
                    }
                    match desired {
                        Some(desired) if same_entry(existing, desired) => {
                            return CommandReport::unchanged(&target, "");
                        }
                        Some(desired) => self
                            .client
                            .cas_config_entry(desired, existing.modify_index())
                            .await
                            .map(|ok| (ok, Change::Updated)),
                        None => {
                            // 1.8 ignores `?cas=` on delete; modern servers (1.12+) honour it.
                            let cas =
                                (flavor == ApiFlavor::Modern).then(|| existing.modify_index());
                            self.client
                                .delete_config_entry::<E>(&service.name, namespace, cas)
                                .await
                                .map(|ok| (ok, Change::Deleted))
                        }
                    }
                }
            };
            match result {
                Ok((true, change)) => return CommandReport::applied(&target, change),
                Ok((false, _)) => {
                    tracing::debug!(%target, round, "config entry changed under us; re-reading")
                }
                Err(e) => return CommandReport::error(&target, &e),
            }
        }
        CommandReport::new(
            &target,
            Outcome::Failed,
            Change::None,
            "entry kept changing during check-and-set",
        )
    }

    // ---- legacy intentions ----------------------------------------------------------

    fn legacy_body(&self, intention: &Intention, action: Action) -> LegacyIntentionWrite {
        let key = &intention.key;
        LegacyIntentionWrite {
            source_ns: ns_norm(key.source.namespace.as_deref()).map(str::to_string),
            source_name: key.source.name.clone(),
            destination_ns: ns_norm(key.destination.namespace.as_deref()).map(str::to_string),
            destination_name: key.destination.name.clone(),
            source_type: "consul",
            action: action.as_consul(),
            description: truncate_bytes(&intention.description, DESCRIPTION_MAX).to_string(),
            meta: self.owner.meta(),
        }
    }

    async fn legacy_apply(
        &self,
        ops: Vec<(usize, IntentionOp)>,
        listed: Option<HashMap<PairKey, LegacyIntention>>,
        spans: &[Span],
    ) -> Vec<(usize, CommandReport)> {
        let mut groups: BTreeMap<PairKey, Vec<(usize, IntentionOp)>> = BTreeMap::new();
        for (i, op) in ops {
            groups.entry(pair_key(op.key())).or_default().push((i, op));
        }
        let listed = match listed {
            Some(listed) => Some(listed),
            None if groups.len() > LIST_THRESHOLD => {
                match self.client.list_legacy_intentions(None).await {
                    Ok(list) => Some(
                        list.value
                            .into_iter()
                            .map(|x| (legacy_pair_key(&x), x))
                            .collect(),
                    ),
                    Err(e) => {
                        return groups
                            .into_values()
                            .flatten()
                            .map(|(i, op)| (i, CommandReport::error(&op.target(), &e)))
                            .collect();
                    }
                }
            }
            None => None,
        };
        let listed = listed.as_ref();
        futures::stream::iter(groups)
            .map(|(pair, ops)| async move {
                let mut existing = match listed {
                    Some(listed) => Ok(listed.get(&pair).cloned()),
                    None => {
                        self.legacy_lookup(ops[0].1.key())
                            .instrument(span_of(spans, ops[0].0))
                            .await
                    }
                };
                let mut out = Vec::with_capacity(ops.len());
                for (i, op) in ops {
                    let report = match &mut existing {
                        Ok(current) => {
                            let (report, after) = self
                                .legacy_execute(op, current.take())
                                .instrument(span_of(spans, i))
                                .await;
                            *current = after;
                            report
                        }
                        Err(e) => CommandReport::error(&op.target(), e),
                    };
                    out.push((i, report));
                }
                out
            })
            .buffer_unordered(self.concurrency)
            .flat_map(futures::stream::iter)
            .collect()
            .await
    }

    async fn legacy_lookup(
        &self,
        key: &IntentionKey,
    ) -> Result<Option<LegacyIntention>, ConsulError> {
        let wanted = pair_key(key);
        let found = self
            .client
            .find_legacy_intentions(&key.source.name, &key.destination.name)
            .await?;
        Ok(found.into_iter().find(|x| legacy_pair_key(x) == wanted))
    }

    /// Runs one op against the intention currently holding its pair; returns the report and
    /// what now holds the pair (for the next op on the same pair in this batch).
    async fn legacy_execute(
        &self,
        op: IntentionOp,
        mut existing: Option<LegacyIntention>,
    ) -> (CommandReport, Option<LegacyIntention>) {
        let target = op.target();
        for _ in 0..3 {
            match (&op, &existing) {
                (IntentionOp::Upsert(intention), current) => {
                    let action = match &intention.rule {
                        IntentionRule::L4(action) => *action,
                        IntentionRule::L7(_) => {
                            let message = format!(
                                "{target}: L7 permissions need Consul 1.9+ (service-intentions config \
                                 entries); this Consul only supports the legacy L4 intentions API"
                            );
                            return (
                                CommandReport::new(
                                    &target,
                                    Outcome::Rejected,
                                    Change::None,
                                    message,
                                ),
                                existing,
                            );
                        }
                    };
                    let body = self.legacy_body(intention, action);
                    match current {
                        None => match self.client.create_legacy_intention(&target, &body).await {
                            Ok(id) => {
                                let after = legacy_from_body(id, &body);
                                return (
                                    CommandReport::applied(&target, Change::Created),
                                    Some(after),
                                );
                            }
                            Err(e) if is_duplicate(&e) => {}
                            Err(e) => return (CommandReport::error(&target, &e), existing),
                        },
                        Some(current) => {
                            let ownership = self.owner.judge_meta(current.meta.as_ref());
                            if ownership != Ownership::Ours {
                                // Not the ID: a caller must not learn handles to objects
                                // it does not own.
                                let message = format!(
                                    "{target} already exists in Consul (action {:?}) and is {}; left untouched",
                                    current.action,
                                    ownership.describe()
                                );
                                return (CommandReport::conflict(&target, message), existing);
                            }
                            if legacy_matches(current, &body) {
                                return (CommandReport::unchanged(&target, ""), existing);
                            }
                            let id = current.id.clone();
                            match self
                                .client
                                .update_legacy_intention(&target, &id, &body)
                                .await
                            {
                                Ok(()) => {
                                    return (
                                        CommandReport::applied(&target, Change::Updated),
                                        Some(legacy_from_body(id, &body)),
                                    );
                                }
                                Err(e) if is_vanished(&e) => {}
                                Err(e) => return (CommandReport::error(&target, &e), existing),
                            }
                        }
                    }
                }
                (IntentionOp::Delete(_), None) => {
                    return (CommandReport::unchanged(&target, "already absent"), None);
                }
                (IntentionOp::Delete(_), Some(current)) => {
                    let ownership = self.owner.judge_meta(current.meta.as_ref());
                    if ownership != Ownership::Ours {
                        let message = format!(
                            "{target} exists in Consul (action {:?}) and is {}; not deleted",
                            current.action,
                            ownership.describe()
                        );
                        return (CommandReport::conflict(&target, message), existing);
                    }
                    return match self
                        .client
                        .delete_legacy_intention(&target, &current.id)
                        .await
                    {
                        Ok(()) => (CommandReport::applied(&target, Change::Deleted), None),
                        Err(e) if is_vanished(&e) => {
                            (CommandReport::unchanged(&target, "already absent"), None)
                        }
                        Err(e) => (CommandReport::error(&target, &e), existing),
                    };
                }
            }
            // The pair changed between our read and our write: read it again and re-decide.
            existing = match self.legacy_lookup(op.key()).await {
                Ok(found) => found,
                Err(e) => return (CommandReport::error(&target, &e), None),
            };
        }
        (
            CommandReport::new(
                &target,
                Outcome::Failed,
                Change::None,
                "intention kept changing under us",
            ),
            existing,
        )
    }

    // ---- modern service-intentions entries -----------------------------------------

    fn judge_source(&self, source: &SourceIntention) -> Ownership {
        match self.owner.judge_description(&source.description) {
            Ownership::Foreign => self.owner.judge_meta(source.legacy_meta.as_ref()),
            judged => judged,
        }
    }

    fn desired_source(&self, intention: &Intention) -> SourceIntention {
        let (action, permissions) = match &intention.rule {
            IntentionRule::L4(action) => (Some(action.as_consul().to_string()), Vec::new()),
            IntentionRule::L7(permissions) => {
                (None, permissions.iter().map(wire_permission).collect())
            }
        };
        SourceIntention {
            name: intention.key.source.name.clone(),
            namespace: ns_norm(intention.key.source.namespace.as_deref()).map(str::to_string),
            action,
            permissions,
            // Upstream validates source descriptions against the legacy 512-byte limit too.
            description: truncate_bytes(
                &self.owner.tag_description(&intention.description),
                DESCRIPTION_MAX,
            )
            .to_string(),
            legacy_meta: None,
            extra: Default::default(),
        }
    }

    async fn modern_apply(
        &self,
        ops: Vec<(usize, IntentionOp)>,
        mut listed: Option<HashMap<ServiceKey, ServiceIntentionsEntry>>,
        spans: &[Span],
    ) -> Vec<(usize, CommandReport)> {
        let mut groups: BTreeMap<ServiceKey, Vec<(usize, IntentionOp)>> = BTreeMap::new();
        for (i, op) in ops {
            groups
                .entry(service_key(&op.key().destination))
                .or_default()
                .push((i, op));
        }
        let work: Vec<_> = groups
            .into_iter()
            .map(|(dest, ops)| {
                let current = listed.as_mut().map(|listed| listed.remove(&dest));
                (ops, current)
            })
            .collect();
        futures::stream::iter(work)
            .map(|(ops, current)| {
                let span = span_of(spans, ops[0].0);
                self.modern_group(ops, current).instrument(span)
            })
            .buffer_unordered(self.concurrency)
            .flat_map(futures::stream::iter)
            .collect()
            .await
    }

    /// Read-modify-write of one destination's entry for all ops on it.
    fn modern_group<'a>(
        &'a self,
        ops: Vec<(usize, IntentionOp)>,
        mut current: Option<Option<ServiceIntentionsEntry>>,
    ) -> BoxedReports<'a> {
        Box::pin(async move {
            let destination = ops[0].1.key().destination.clone();
            let namespace = ns_norm(destination.namespace.as_deref()).map(str::to_string);
            let fail_all = |e: &ConsulError| -> Vec<(usize, CommandReport)> {
                ops.iter()
                    .map(|(i, op)| (*i, CommandReport::error(&op.target(), e)))
                    .collect()
            };
            for round in 0..MAX_CAS_ROUNDS {
                if round > 0 {
                    cas_pause(round).await;
                }
                let entry = match current.take() {
                    Some(entry) => entry,
                    None => match self
                        .client
                        .get_config_entry::<ServiceIntentionsEntry>(
                            &destination.name,
                            namespace.as_deref(),
                        )
                        .await
                    {
                        Ok(entry) => entry,
                        Err(e) => return fail_all(&e),
                    },
                };
                let (write, reports) = self.plan_modern(&destination, entry.as_ref(), &ops);
                let result = match write {
                    None => return reports,
                    Some(EntryWrite::Put(entry, cas)) => {
                        self.client.cas_config_entry(&entry, cas).await
                    }
                    Some(EntryWrite::Delete(cas)) => {
                        self.client
                            .delete_config_entry::<ServiceIntentionsEntry>(
                                &destination.name,
                                namespace.as_deref(),
                                Some(cas),
                            )
                            .await
                    }
                };
                match result {
                    Ok(true) => return reports,
                    Ok(false) => {
                        tracing::debug!(%destination, round, "service-intentions changed under us; re-reading")
                    }
                    // One invalid source must not sink the others: retry each op alone.
                    Err(ConsulError::Validation { .. }) if ops.len() > 1 => {
                        let mut out = Vec::with_capacity(ops.len());
                        for op in ops.iter().cloned() {
                            out.extend(self.modern_group(vec![op], None).await);
                        }
                        return out;
                    }
                    Err(e) => {
                        return reports
                            .into_iter()
                            .map(|(i, r)| {
                                if r.change == Change::None {
                                    (i, r)
                                } else {
                                    (i, CommandReport::error(&r.target, &e))
                                }
                            })
                            .collect();
                    }
                }
            }
            ops.iter()
                .map(|(i, op)| {
                    (
                        *i,
                        CommandReport::new(
                            &op.target(),
                            Outcome::Failed,
                            Change::None,
                            "entry kept changing during check-and-set",
                        ),
                    )
                })
                .collect()
        })
    }

    /// Decides the new entry (if any write is needed) and each op's report, assuming the write succeeds.
    fn plan_modern(
        &self,
        destination: &ServiceName,
        entry: Option<&ServiceIntentionsEntry>,
        ops: &[(usize, IntentionOp)],
    ) -> (Option<EntryWrite>, Vec<(usize, CommandReport)>) {
        let cas = entry.map(|e| e.modify_index).unwrap_or(0);
        let mut work = entry.cloned().unwrap_or_else(|| {
            ServiceIntentionsEntry::new(
                &destination.name,
                ns_norm(destination.namespace.as_deref()),
                self.owner.meta(),
            )
        });
        let mut changed = false;
        let mut reports = Vec::with_capacity(ops.len());
        for (i, op) in ops {
            let target = op.target();
            let source_key = service_key(&op.key().source);
            let position = work.sources.iter().position(|s| {
                !is_peered(s)
                    && s.name == source_key.1
                    && ns_norm(s.namespace.as_deref()).map(str::to_string) == source_key.0
            });
            let report = match (op, position) {
                (IntentionOp::Upsert(intention), None) => {
                    work.sources.push(self.desired_source(intention));
                    changed = true;
                    CommandReport::applied(&target, Change::Created)
                }
                (IntentionOp::Upsert(intention), Some(p)) => {
                    let desired = self.desired_source(intention);
                    match self.judge_source(&work.sources[p]) {
                        Ownership::Ours if same_source(&work.sources[p], &desired) => {
                            CommandReport::unchanged(&target, "")
                        }
                        Ownership::Ours => {
                            work.sources[p] = desired;
                            changed = true;
                            CommandReport::applied(&target, Change::Updated)
                        }
                        other => CommandReport::conflict(
                            &target,
                            format!(
                                "{target}: source {} in service-intentions {} is {}; left untouched",
                                work.sources[p].name,
                                destination,
                                other.describe()
                            ),
                        ),
                    }
                }
                (IntentionOp::Delete(_), None) => {
                    CommandReport::unchanged(&target, "already absent")
                }
                (IntentionOp::Delete(_), Some(p)) => match self.judge_source(&work.sources[p]) {
                    Ownership::Ours => {
                        work.sources.remove(p);
                        changed = true;
                        CommandReport::applied(&target, Change::Deleted)
                    }
                    other => CommandReport::conflict(
                        &target,
                        format!(
                            "{target}: source {} in service-intentions {} is {}; not deleted",
                            work.sources[p].name,
                            destination,
                            other.describe()
                        ),
                    ),
                },
            };
            reports.push((*i, report));
        }
        if !changed {
            return (None, reports);
        }
        work.strip_read_only();
        // Consul refuses an entry without sources ("At least one source is required"), so
        // removing the last source (necessarily ours: only ours are removed) deletes the entry,
        // even one an operator created. Its Meta held nothing but labels for those sources.
        let write = match (work.sources.is_empty(), entry) {
            // Created and removed within one batch: nothing to write.
            (true, None) => None,
            (true, Some(_)) => Some(EntryWrite::Delete(cas)),
            (false, _) => Some(EntryWrite::Put(work, cas)),
        };
        (write, reports)
    }
}

type BoxedReports<'a> =
    std::pin::Pin<Box<dyn Future<Output = Vec<(usize, CommandReport)>> + Send + 'a>>;

enum EntryWrite {
    Put(ServiceIntentionsEntry, u64),
    Delete(u64),
}

/// Sources imported from a cluster peer or sameness group are other keys than ours.
fn is_peered(source: &SourceIntention) -> bool {
    ["Peer", "SamenessGroup"].iter().any(|k| {
        source
            .extra
            .get(*k)
            .and_then(|v| v.as_str())
            .is_some_and(|v| !v.is_empty())
    })
}

fn same_source(existing: &SourceIntention, desired: &SourceIntention) -> bool {
    existing.action == desired.action
        && existing.permissions == desired.permissions
        && existing.description == desired.description
}

/// Compares what would be written (ModifyIndex is never serialised); `default`/empty
/// namespaces count as none, as Enterprise reports `default` for entries written without one.
fn same_entry<E: ConfigEntry>(existing: &E, desired: &E) -> bool {
    same_entry_content(existing, desired, true)
}

fn same_entry_content<E: ConfigEntry>(existing: &E, desired: &E, with_meta: bool) -> bool {
    let normalised = |entry: &E| -> Option<serde_json::Value> {
        let mut value = serde_json::to_value(entry).ok()?;
        if let Some(object) = value.as_object_mut() {
            if !with_meta {
                object.remove("Meta");
            }
            if object
                .get("Namespace")
                .and_then(|v| v.as_str())
                .is_some_and(|ns| ns.is_empty() || ns == "default")
            {
                object.remove("Namespace");
            }
        }
        Some(value)
    };
    let existing = normalised(existing);
    existing.is_some() && existing == normalised(desired)
}

fn legacy_matches(current: &LegacyIntention, body: &LegacyIntentionWrite) -> bool {
    current.action == body.action
        && current.description == body.description
        && current.meta.as_ref() == Some(&body.meta)
        && current.permissions.as_ref().is_none_or(|p| p.is_null())
        && (current.source_type.is_empty() || current.source_type == body.source_type)
}

fn legacy_from_body(id: String, body: &LegacyIntentionWrite) -> LegacyIntention {
    LegacyIntention {
        id,
        description: body.description.clone(),
        source_ns: body.source_ns.clone().unwrap_or_default(),
        source_name: body.source_name.clone(),
        destination_ns: body.destination_ns.clone().unwrap_or_default(),
        destination_name: body.destination_name.clone(),
        source_type: body.source_type.to_string(),
        action: body.action.to_string(),
        permissions: None,
        meta: Some(body.meta.clone()),
        modify_index: 0,
    }
}

fn wire_permission(permission: &Permission) -> WirePermission {
    let http = &permission.http;
    let mut wire = WireHttp {
        methods: http.methods.clone(),
        ..Default::default()
    };
    match &http.path {
        Some(PathMatch::Exact(p)) => wire.path_exact = Some(p.clone()),
        Some(PathMatch::Prefix(p)) => wire.path_prefix = Some(p.clone()),
        Some(PathMatch::Regex(p)) => wire.path_regex = Some(p.clone()),
        None => {}
    }
    wire.header = http
        .headers
        .iter()
        .map(|h| {
            let mut header = WireHeader {
                name: h.name.clone(),
                invert: h.invert,
                ..Default::default()
            };
            match &h.kind {
                HeaderMatchKind::Present => header.present = true,
                HeaderMatchKind::Exact(v) => header.exact = Some(v.clone()),
                HeaderMatchKind::Prefix(v) => header.prefix = Some(v.clone()),
                HeaderMatchKind::Suffix(v) => header.suffix = Some(v.clone()),
                HeaderMatchKind::Regex(v) => header.regex = Some(v.clone()),
            }
            header
        })
        .collect();
    WirePermission {
        action: permission.action.as_consul().to_string(),
        http: Some(wire),
    }
}

async fn cas_pause(round: u32) {
    let max = 5u64 * u64::from(round.min(10));
    let millis = rand::rng().random_range(0..=max);
    tokio::time::sleep(Duration::from_millis(millis)).await;
}
