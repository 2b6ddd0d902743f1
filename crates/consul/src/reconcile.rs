//! Ownership-aware writes: apply commands and reconcile a desired state, touching only
//! objects this writer owns, on whichever intentions API the server speaks.
//!
//! Order matters to Consul's discovery-chain validation, so every batch runs in phases:
//! service-defaults upserts (a splitter or L7 intention needs protocol http), splitters,
//! intentions, then service-defaults deletes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
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
use crate::progress::{Progress, Verdict, fingerprint};
use crate::version::ApiFlavor;

/// Read-modify-write rounds before giving up on an entry that keeps changing.
const MAX_CAS_ROUNDS: u32 = 20;
/// Above this many distinct pairs, one full list is cheaper than a lookup per pair.
const LIST_THRESHOLD: usize = 16;
/// Reads and writes of one legacy intention before giving up on a pair that keeps changing.
const LEGACY_ROUNDS: u32 = 6;

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

/// Consul keys config entries by lowercased kind and name (`indexFromConfigEntryKindName` in
/// upstream `agent/consul/state/config_entry_oss.go`; 1.8.7 answers `GET
/// .../service-defaults/VICTIM` with `victim`), so `API` and `api` are one entry.
fn entry_key(service: &ServiceName) -> ServiceKey {
    listed_entry_key(service.namespace.as_deref(), &service.name)
}

fn listed_entry_key(namespace: Option<&str>, name: &str) -> ServiceKey {
    (ns_norm(namespace).map(str::to_string), name.to_lowercase())
}

/// How a modern `service-intentions` source is identified: the entry (destination) name
/// ignores case, the source name does not (upstream's duplicate-source check compares
/// names as written).
fn modern_pair_key(key: &IntentionKey) -> PairKey {
    let (sns, sname) = service_key(&key.source);
    let (dns, dname) = entry_key(&key.destination);
    (sns, sname, dns, dname)
}

/// Consul < 1.9 keys intentions by lowercased names: with `op-web -> op-api` in place, a
/// create of `OP-WEB -> OP-API` answers `duplicate intention found` (verified on 1.8.7).
fn legacy_key(key: &IntentionKey) -> PairKey {
    (
        ns_norm(key.source.namespace.as_deref()).map(str::to_string),
        key.source.name.to_lowercase(),
        ns_norm(key.destination.namespace.as_deref()).map(str::to_string),
        key.destination.name.to_lowercase(),
    )
}

fn legacy_pair_key(intention: &LegacyIntention) -> PairKey {
    let ns = |s: &str| ns_norm(Some(s)).map(str::to_string);
    (
        ns(&intention.source_ns),
        intention.source_name.to_lowercase(),
        ns(&intention.destination_ns),
        intention.destination_name.to_lowercase(),
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
    progress: Arc<Progress>,
}

impl Reconciler {
    /// `concurrency` bounds the objects written at once (the client bounds requests too).
    pub fn new(client: ConsulClient, owner: Owner, concurrency: usize) -> Self {
        Reconciler {
            client,
            owner,
            concurrency: concurrency.max(1),
            progress: Arc::default(),
        }
    }

    /// Objects drift repair has stopped rewriting because Consul keeps holding a different
    /// value right after each write (reported as `REJECTED` "no progress").
    pub fn stalled_objects(&self) -> usize {
        self.progress.stalled()
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
                self.apply_config_command(&commands[i])
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
                self.apply_config_command(&commands[i])
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

        // What these lists say is only a plan: every delete or update below re-judges the
        // object from a read made right before it (or writes with check-and-set).
        let defaults = self.list_entries::<ServiceDefaultsEntry>(all_ns).await?;
        let splitters = self.list_entries::<ServiceSplitterEntry>(all_ns).await?;

        // Phase 1: service-defaults upserts.
        let mut futures = Vec::new();
        for desired in state.service_defaults.values() {
            let current = defaults.get(&entry_key(&desired.service)).cloned();
            futures.push(self.config_op(
                format!("service-defaults {}", desired.service),
                &desired.service,
                Some(self.defaults_entry(desired)),
                Some(current),
            ));
        }
        for r in self.run_all(futures).await {
            report.add(r);
        }

        // Phase 2: splitters.
        let orphans = match mode {
            SyncMode::Exact => self.owned_orphans(&splitters, state.splitters.keys()),
            SyncMode::RestoreOnly => Vec::new(),
        };
        let mut futures = Vec::new();
        for desired in state.splitters.values() {
            let current = splitters.get(&entry_key(&desired.service)).cloned();
            futures.push(self.config_op(
                format!("service-splitter {}", desired.service),
                &desired.service,
                Some(self.splitter_entry(desired)),
                Some(current),
            ));
        }
        for (service, entry) in &orphans {
            futures.push(self.config_op::<ServiceSplitterEntry>(
                format!("service-splitter {service}"),
                service,
                None,
                Some(Some(entry.clone())),
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
                    let desired: HashSet<PairKey> =
                        state.intentions.keys().map(legacy_key).collect();
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
                    let desired: HashSet<PairKey> =
                        state.intentions.keys().map(modern_pair_key).collect();
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
                            if !desired.contains(&modern_pair_key(&key)) {
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
                    .map(|e| (listed_entry_key(e.namespace.as_deref(), &e.name), e))
                    .collect();
                self.modern_apply(ops, Some(existing), &[]).await
            }
        };
        for (_, r) in results {
            report.add(r);
        }

        // Phase 4: service-defaults deletes.
        if mode == SyncMode::Exact {
            let orphans = self.owned_orphans(&defaults, state.service_defaults.keys());
            let mut futures = Vec::new();
            for (service, entry) in &orphans {
                futures.push(self.config_op::<ServiceDefaultsEntry>(
                    format!("service-defaults {service}"),
                    service,
                    None,
                    Some(Some(entry.clone())),
                ));
            }
            for r in self.run_all(futures).await {
                report.add(r);
            }
        }
        Ok(report)
    }

    /// Lists one config-entry kind, keyed as Consul keys it.
    async fn list_entries<E: ConfigEntry>(
        &self,
        all_namespaces: bool,
    ) -> Result<HashMap<ServiceKey, E>, ConsulError> {
        let listed = self
            .client
            .list_config_entries::<E>(all_namespaces, None)
            .await?
            .value;
        Ok(listed
            .into_iter()
            .map(|e| (listed_entry_key(e.namespace(), e.name()), e))
            .collect())
    }

    /// Listed entries this writer owns that no desired service names (one set lookup each).
    fn owned_orphans<'a, E: ConfigEntry + Clone>(
        &self,
        listed: &HashMap<ServiceKey, E>,
        desired: impl Iterator<Item = &'a ServiceName>,
    ) -> Vec<(ServiceName, E)> {
        let wanted: HashSet<ServiceKey> = desired.map(entry_key).collect();
        listed
            .iter()
            .filter(|(key, entry)| {
                !wanted.contains(*key)
                    && self.owner.judge_meta(Some(entry.meta())) == Ownership::Ours
            })
            .map(|(_, entry)| {
                let service = ServiceName {
                    namespace: ns_norm(entry.namespace()).map(str::to_string),
                    name: entry.name().to_string(),
                };
                (service, entry.clone())
            })
            .collect()
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
            // Consul lowercases it on write (`ServiceConfigEntry.Normalize`); comparing the
            // raw value would find a difference on every drift pass.
            protocol: desired.protocol.to_lowercase(),
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
                    weight: normalise_weight(s.weight),
                    service: s.service.clone(),
                    service_subset: String::new(),
                    namespace: ns_norm(s.namespace.as_deref()).map(str::to_string),
                })
                .collect(),
            meta: self.owner.meta(),
            modify_index: 0,
        }
    }

    async fn apply_config_command(&self, command: &Command) -> CommandReport {
        let target = command.target();
        match command {
            Command::UpsertServiceDefaults(d) => {
                self.config_op(target, &d.service, Some(self.defaults_entry(d)), None)
                    .await
            }
            Command::DeleteServiceDefaults(s) => {
                self.config_op::<ServiceDefaultsEntry>(target, s, None, None)
                    .await
            }
            Command::UpsertSplitter(s) => {
                self.config_op(target, &s.service, Some(self.splitter_entry(s)), None)
                    .await
            }
            Command::DeleteSplitter(s) => {
                self.config_op::<ServiceSplitterEntry>(target, s, None, None)
                    .await
            }
            Command::UpsertIntention(_) | Command::DeleteIntention(_) => {
                CommandReport::new(&target, Outcome::Failed, Change::None, "not a config entry")
            }
        }
    }

    /// Creates, updates (`desired: Some`) or deletes (`None`) one owned config entry.
    /// `listed: Some(entry)` is what a list said, which may be stale by now: a create or an
    /// update is a check-and-set write against it (Consul 1.8+ honours `?cas=` on PUT), and
    /// a delete first re-reads the entry by name and re-judges it, because only Consul 1.11+
    /// honours `?cas=` on DELETE (hashicorp/consul#11419; 1.8–1.10 delete unconditionally).
    async fn config_op<E: ConfigEntry>(
        &self,
        target: String,
        service: &ServiceName,
        desired: Option<E>,
        listed: Option<Option<E>>,
    ) -> CommandReport {
        let namespace = ns_norm(service.namespace.as_deref());
        let mut current = listed;
        let mut fresh = current.is_none();
        let mut pause = false;
        for round in 0..MAX_CAS_ROUNDS {
            if pause {
                cas_pause(round).await;
            }
            pause = true;
            let existing = match current.take() {
                Some(existing) => existing,
                None => {
                    fresh = true;
                    match self
                        .client
                        .get_config_entry::<E>(&service.name, namespace)
                        .await
                    {
                        Ok(existing) => existing,
                        Err(e) => return CommandReport::error(&target, &e),
                    }
                }
            };
            let result = match (&existing, &desired) {
                (None, None) => {
                    self.progress.settled(&target);
                    return CommandReport::unchanged(&target, "already absent");
                }
                (None, Some(desired)) => self
                    .client
                    .cas_config_entry(desired, 0)
                    .await
                    .map(|ok| (ok, Change::Created)),
                (Some(existing), desired) => {
                    let ownership = self.owner.judge_meta(Some(existing.meta()));
                    if ownership != Ownership::Ours {
                        self.progress.settled(&target);
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
                            self.progress.settled(&target);
                            return CommandReport::unchanged(&target, "");
                        }
                        Some(desired) => {
                            let verdict = self.progress.before_rewrite(
                                &target,
                                fingerprint(desired),
                                fingerprint(existing),
                                existing.modify_index(),
                            );
                            if verdict == Verdict::Stalled {
                                return no_progress(&target, &differing_fields(existing, desired));
                            }
                            self.client
                                .cas_config_entry(desired, existing.modify_index())
                                .await
                                .map(|ok| (ok, Change::Updated))
                        }
                        None if !fresh => {
                            // Judged from a list: read it again right before deleting.
                            pause = false;
                            continue;
                        }
                        None => self
                            .client
                            .delete_config_entry::<E>(
                                &service.name,
                                namespace,
                                Some(existing.modify_index()),
                            )
                            .await
                            .map(|ok| (ok, Change::Deleted)),
                    }
                }
            };
            match result {
                Ok((true, change)) => {
                    match (&desired, change) {
                        (Some(desired), Change::Created | Change::Updated) => {
                            self.progress.written(&target, fingerprint(desired))
                        }
                        _ => self.progress.settled(&target),
                    }
                    return CommandReport::applied(&target, change);
                }
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
        // Grouped by Consul's key, so case variants of one pair run in order, not in parallel.
        let mut groups: BTreeMap<PairKey, Vec<(usize, IntentionOp)>> = BTreeMap::new();
        for (i, op) in ops {
            groups
                .entry(legacy_key(op.key()))
                .or_default()
                .push((i, op));
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
                    Some(listed) => Ok(Known::Listed(listed.get(&pair).cloned())),
                    None => self
                        .legacy_lookup(ops[0].1.key(), false)
                        .instrument(span_of(spans, ops[0].0))
                        .await
                        .map(Known::Read),
                };
                let mut out = Vec::with_capacity(ops.len());
                for (i, op) in ops {
                    let report = match &mut existing {
                        Ok(known) => {
                            let (report, after) = self
                                .legacy_execute(op, std::mem::replace(known, Known::Listed(None)))
                                .instrument(span_of(spans, i))
                                .await;
                            *known = after;
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

    /// The intention holding `key`'s pair. `any_case`: also under another spelling (a full
    /// list; go-bexpr's `==` in the cheap filtered lookup is case-sensitive, Consul's key is not).
    async fn legacy_lookup(
        &self,
        key: &IntentionKey,
        any_case: bool,
    ) -> Result<Option<LegacyIntention>, ConsulError> {
        let wanted = legacy_key(key);
        let found = if any_case {
            self.client.list_legacy_intentions(None).await?.value
        } else {
            self.client
                .find_legacy_intentions(&key.source.name, &key.destination.name)
                .await?
        };
        Ok(found.into_iter().find(|x| legacy_pair_key(x) == wanted))
    }

    /// Runs one op against the intention holding its pair; returns the report and what now
    /// holds the pair (for the next op on the same pair in this batch).
    ///
    /// Consul 1.8 has no check-and-set for intentions, so a PUT or DELETE by ID only follows a
    /// read made right before it (by ID, or the pair's lookup) that still shows an owned
    /// intention needing that write; what a list or an earlier op said is only a plan.
    async fn legacy_execute(
        &self,
        op: IntentionOp,
        known: Known<LegacyIntention>,
    ) -> (CommandReport, Known<LegacyIntention>) {
        let target = op.target();
        let (mut existing, mut fresh) = match known {
            Known::Listed(x) => (x, false),
            Known::Read(x) => (x, true),
        };
        let body = match &op {
            IntentionOp::Upsert(intention) => match &intention.rule {
                IntentionRule::L4(action) => Some(self.legacy_body(intention, *action)),
                IntentionRule::L7(_) => {
                    let message = format!(
                        "{target}: L7 permissions need Consul 1.9+ (service-intentions config \
                         entries); this Consul only supports the legacy L4 intentions API"
                    );
                    let report =
                        CommandReport::new(&target, Outcome::Rejected, Change::None, message);
                    return (report, Known::of(existing, fresh));
                }
            },
            IntentionOp::Delete(_) => None,
        };
        for _ in 0..LEGACY_ROUNDS {
            let next = match (&body, &existing) {
                (Some(body), None) => {
                    match self.client.create_legacy_intention(&target, body).await {
                        Ok(id) => {
                            self.progress.written(&target, fingerprint(body));
                            let after = legacy_from_body(id, body);
                            let report = CommandReport::applied(&target, Change::Created);
                            return (report, Known::Listed(Some(after)));
                        }
                        // Another spelling of the pair may hold it: Consul's key ignores case.
                        Err(e) if is_duplicate(&e) => Reread::AnyCase,
                        Err(e) => return (CommandReport::error(&target, &e), Known::Listed(None)),
                    }
                }
                (None, None) => {
                    self.progress.settled(&target);
                    let report = CommandReport::unchanged(&target, "already absent");
                    return (report, Known::of(None, fresh));
                }
                (body, Some(current)) => {
                    let ownership = self.owner.judge_meta(current.meta.as_ref());
                    if ownership != Ownership::Ours {
                        self.progress.settled(&target);
                        let message = format!(
                            // Not the ID: a caller must not learn handles to objects it does not own.
                            "{target} {} in Consul (action {:?}) and is {}; {}",
                            if body.is_some() {
                                "already exists"
                            } else {
                                "exists"
                            },
                            current.action,
                            ownership.describe(),
                            if body.is_some() {
                                "left untouched"
                            } else {
                                "not deleted"
                            },
                        );
                        return (
                            CommandReport::conflict(&target, message),
                            Known::of(existing, fresh),
                        );
                    }
                    if let Some(body) = body
                        && legacy_matches(current, body)
                    {
                        self.progress.settled(&target);
                        return (
                            CommandReport::unchanged(&target, ""),
                            Known::of(existing, fresh),
                        );
                    }
                    if !fresh {
                        Reread::ById(current.id.clone())
                    } else if let Some(body) = body {
                        let verdict = self.progress.before_rewrite(
                            &target,
                            fingerprint(body),
                            fingerprint(&(&current.action, &current.description, &current.meta)),
                            current.modify_index,
                        );
                        if verdict == Verdict::Stalled {
                            let written = legacy_view(&legacy_from_body(String::new(), body));
                            let fields = differing_fields(&legacy_view(current), &written);
                            return (no_progress(&target, &fields), Known::of(existing, fresh));
                        }
                        let id = current.id.clone();
                        match self
                            .client
                            .update_legacy_intention(&target, &id, body)
                            .await
                        {
                            Ok(()) => {
                                self.progress.written(&target, fingerprint(body));
                                let after = legacy_from_body(id, body);
                                let report = CommandReport::applied(&target, Change::Updated);
                                return (report, Known::Listed(Some(after)));
                            }
                            Err(e) if is_vanished(&e) => Reread::Pair,
                            Err(e) => {
                                return (
                                    CommandReport::error(&target, &e),
                                    Known::Listed(Some(current.clone())),
                                );
                            }
                        }
                    } else {
                        match self
                            .client
                            .delete_legacy_intention(&target, &current.id)
                            .await
                        {
                            Ok(()) => {
                                self.progress.settled(&target);
                                let report = CommandReport::applied(&target, Change::Deleted);
                                return (report, Known::Listed(None));
                            }
                            Err(e) if is_vanished(&e) => Reread::Pair,
                            Err(e) => {
                                return (
                                    CommandReport::error(&target, &e),
                                    Known::Listed(Some(current.clone())),
                                );
                            }
                        }
                    }
                }
            };
            // Re-read, then re-decide from what Consul holds now.
            let read = match next {
                Reread::ById(id) => match self.client.get_legacy_intention(&target, &id).await {
                    // The ID vanished: whoever holds the pair now (if anyone) decides.
                    Ok(None) => self.legacy_lookup(op.key(), false).await,
                    other => other,
                },
                Reread::Pair => self.legacy_lookup(op.key(), false).await,
                // Usually the same spelling (someone created the pair meanwhile): the cheap
                // filtered lookup first, the full list only for another spelling.
                Reread::AnyCase => match self.legacy_lookup(op.key(), false).await {
                    Ok(None) => self.legacy_lookup(op.key(), true).await,
                    other => other,
                },
            };
            existing = match read {
                Ok(found) => found,
                Err(e) => {
                    return (
                        CommandReport::error(&target, &e),
                        Known::Listed(existing.take()),
                    );
                }
            };
            fresh = true;
        }
        (
            CommandReport::new(
                &target,
                Outcome::Failed,
                Change::None,
                "intention kept changing under us",
            ),
            Known::Listed(existing),
        )
    }

    // ---- modern service-intentions entries -----------------------------------------

    fn judge_source(&self, source: &SourceIntention) -> Ownership {
        self.owner
            .judge_source(&source.description, source.legacy_meta.as_ref())
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
                .entry(entry_key(&op.key().destination))
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

    /// Read-modify-write of one destination's entry for all ops on it. A PUT is a
    /// check-and-set against the entry read; deleting the entry (its last source went)
    /// follows a read made right before it, as Consul 1.9 and 1.10 ignore `DELETE ?cas=`.
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
            let mut fresh = current.is_none();
            let mut pause = false;
            for round in 0..MAX_CAS_ROUNDS {
                if pause {
                    cas_pause(round).await;
                }
                pause = true;
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
                        Ok(entry) => {
                            fresh = true;
                            entry
                        }
                        Err(e) => return fail_all(&e),
                    },
                };
                let (write, reports) = self.plan_modern(&destination, entry.as_ref(), &ops);
                let result = match write {
                    None => return reports,
                    // Planned from a list: read the entry again right before deleting it.
                    Some(EntryWrite::Delete(_)) if !fresh => {
                        pause = false;
                        continue;
                    }
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
                    Ok(true) => {
                        self.note_modern_progress(&ops, &reports);
                        return reports;
                    }
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

    /// After a successful write of an entry: what each upsert wrote, for no-progress detection.
    fn note_modern_progress(
        &self,
        ops: &[(usize, IntentionOp)],
        reports: &[(usize, CommandReport)],
    ) {
        for ((_, op), (_, report)) in ops.iter().zip(reports) {
            match (op, report.change) {
                (IntentionOp::Upsert(intention), Change::Created | Change::Updated) => {
                    let desired = self.desired_source(intention);
                    self.progress
                        .written(&report.target, fingerprint(&source_view(&desired)));
                }
                (_, Change::Deleted) => self.progress.settled(&report.target),
                _ => {}
            }
        }
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
                            self.progress.settled(&target);
                            CommandReport::unchanged(&target, "")
                        }
                        Ownership::Ours => {
                            let verdict = self.progress.before_rewrite(
                                &target,
                                fingerprint(&source_view(&desired)),
                                fingerprint(&source_view(&work.sources[p])),
                                cas,
                            );
                            if verdict == Verdict::Stalled {
                                let fields = differing_fields(
                                    &source_view(&work.sources[p]),
                                    &source_view(&desired),
                                );
                                no_progress(&target, &fields)
                            } else {
                                work.sources[p] = desired;
                                changed = true;
                                CommandReport::applied(&target, Change::Updated)
                            }
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
        if let Some(refusal) = self.legacy_sources_refusal(destination, &mut work) {
            let reports = reports
                .into_iter()
                .map(|(i, r)| match r.change {
                    Change::None => (i, r),
                    _ => (i, CommandReport::conflict(&r.target, refusal.clone())),
                })
                .collect();
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

impl Reconciler {
    /// Sources made through the legacy intentions API (Consul < 1.9 data migrated into the
    /// entry, or `consul intention create` on 1.9+) carry `LegacyID` and maybe `LegacyMeta`.
    /// Consul refuses a config-entry write that keeps `LegacyMeta` and converts the sources
    /// when it is left out (agent/structs/config_entry_intentions.go `validate`: "LegacyMeta
    /// must be omitted"; verified on 1.14.11), so any write drops that metadata. A consul-smi
    /// writer's own migrated sources keep their ownership as a description tag; an entry holding
    /// anyone else's is not written (their data and their legacy-API workflow stay), and the
    /// refusal says why.
    fn legacy_sources_refusal(
        &self,
        destination: &ServiceName,
        work: &mut ServiceIntentionsEntry,
    ) -> Option<String> {
        let mut foreign = Vec::new();
        for source in work.sources.iter_mut().filter(|s| is_legacy_source(s)) {
            let tagged = match self.judge_source(source) {
                Ownership::Ours => self.owner.tag_description(&source.description),
                Ownership::OtherWriter(id) => match Owner::new(id) {
                    Ok(writer) => writer.tag_description(&source.description),
                    Err(_) => {
                        foreign.push(source.name.clone());
                        continue;
                    }
                },
                Ownership::Foreign => {
                    foreign.push(source.name.clone());
                    continue;
                }
            };
            if self.owner.judge_description(&source.description) == Ownership::Foreign {
                source.description = tagged;
            }
        }
        if foreign.is_empty() {
            return None;
        }
        Some(format!(
            "service-intentions {destination} holds intentions made through the legacy \
             intentions API (sources {}); writing the entry would convert them and drop their \
             metadata, so consul-smi leaves it; recreate them as config entries (consul config \
             write) to let consul-smi manage this destination",
            foreign.join(", ")
        ))
    }
}

fn is_legacy_source(source: &SourceIntention) -> bool {
    source.legacy_meta.is_some()
        || source
            .extra
            .get("LegacyID")
            .and_then(|v| v.as_str())
            .is_some_and(|v| !v.is_empty())
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

/// The fields of a source that a write sets, named as on the wire.
fn source_view(source: &SourceIntention) -> serde_json::Value {
    serde_json::json!({
        "Action": source.action,
        "Permissions": source.permissions,
        "Description": source.description,
    })
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

/// Consul's rounding of a split weight to hundredths (`NormalizeServiceSplitWeight` and
/// `scaleWeight` in upstream `agent/structs/config_entry_discoverychain.go`:
/// `float32(int(math.Round(float64(w * 100)))) / 100`, with `w * 100` computed in float32).
fn normalise_weight(weight: f32) -> f32 {
    let scaled = f64::from(weight * 100.0).round() as i64;
    scaled as f32 / 100.0
}

/// The top-level fields (JSON names) in which two objects differ, for messages.
fn differing_fields(existing: &impl serde::Serialize, desired: &impl serde::Serialize) -> String {
    let as_object = |value: serde_json::Value| match value {
        serde_json::Value::Object(object) => object,
        _ => Default::default(),
    };
    let existing = as_object(serde_json::to_value(existing).unwrap_or_default());
    let desired = as_object(serde_json::to_value(desired).unwrap_or_default());
    let mut fields: Vec<&str> = existing
        .keys()
        .chain(desired.keys())
        .filter(|k| existing.get(*k) != desired.get(*k))
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    fields.dedup();
    fields.join(", ")
}

/// The report for an object Consul keeps holding differently right after each write.
fn no_progress(target: &str, fields: &str) -> CommandReport {
    CommandReport::new(
        target,
        Outcome::Rejected,
        Change::None,
        format!(
            "{target}: no progress: right after the writer's last write Consul still holds \
             a different value (fields: {fields}); Consul normalises or rewrites it, so it is \
             not rewritten again until the desired object or Consul's copy changes"
        ),
    )
}

fn legacy_matches(current: &LegacyIntention, body: &LegacyIntentionWrite) -> bool {
    current.action == body.action
        && current.description == body.description
        && current.meta.as_ref() == Some(&body.meta)
        && current.permissions.as_ref().is_none_or(|p| p.is_null())
        && (current.source_type.is_empty() || current.source_type == body.source_type)
}

/// What a caller knows about the object on a key: what a list (or an earlier write in this
/// batch) said, or what a read made just now said.
enum Known<T> {
    Listed(Option<T>),
    Read(Option<T>),
}

impl<T> Known<T> {
    fn of(value: Option<T>, fresh: bool) -> Self {
        if fresh {
            Known::Read(value)
        } else {
            Known::Listed(value)
        }
    }
}

/// How a legacy intention is re-read before a decision is final.
enum Reread {
    ById(String),
    Pair,
    AnyCase,
}

/// The fields of a legacy intention that a write sets, named as on the wire.
fn legacy_view(current: &LegacyIntention) -> serde_json::Value {
    serde_json::json!({
        "Action": current.action,
        "Description": current.description,
        "Meta": current.meta,
    })
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
