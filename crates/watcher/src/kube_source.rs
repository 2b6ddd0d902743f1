//! The Kubernetes source: finds the SMI CRDs the cluster serves and watches each kind.
//!
//! Discovery lists and watches `CustomResourceDefinition`s (apiextensions.k8s.io/v1) instead
//! of using `/apis` discovery, which not every API server offers (the test server returns
//! 404) and which would need polling to notice a CRD installed later. Each SMI kind with an
//! Established CRD gets a `kube::runtime::watcher` (default backoff) through
//! `Api<DynamicObject>` at the storage version (or the newest served version this watcher
//! decodes). A watch restart (API server restart, 410 Gone) arrives as Init/InitApply/InitDone;
//! the complete re-list replaces that kind in the store, which yields exactly the changes that
//! happened meanwhile, deletions included.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use consul_smi_api::{ObjectRef, SmiKind};
use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::metrics::{CRD_KIND, WatcherMetrics};
use crate::shared::SharedStore;
use crate::store::{Observed, Scope};

/// Which objects to watch.
#[derive(Clone, Debug, Default)]
pub struct KubeFilter {
    pub namespace: Option<String>,
    pub label_selector: Option<String>,
}

/// Runs until aborted; never returns an error: every failure is logged and retried with
/// backoff, so a missing CRD or an API server outage is waited out rather than crash-looped.
pub async fn run(client: kube::Client, shared: Arc<SharedStore>, filter: KubeFilter) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crd_events = watcher(crds, watcher::Config::default())
        .default_backoff()
        .boxed();
    let (tx, mut rx) = mpsc::channel::<KindMessage>(64);
    let mut supervisor = Supervisor {
        client,
        filter,
        shared,
        tx,
        kinds: BTreeMap::new(),
        next_generation: 0,
        announced_missing: BTreeSet::new(),
        crds_listed: false,
    };
    let mut listing: Option<BTreeMap<SmiKind, CustomResourceDefinition>> = None;
    loop {
        tokio::select! {
            event = crd_events.next() => match event {
                Some(Ok(watcher::Event::Init)) => listing = Some(BTreeMap::new()),
                Some(Ok(watcher::Event::InitApply(crd))) => {
                    if let (Some(kind), Some(listing)) = (smi_kind_of(&crd), listing.as_mut()) {
                        listing.insert(kind, crd);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    let listed = listing.take().unwrap_or_default();
                    for kind in SmiKind::ALL {
                        match listed.get(&kind) {
                            Some(crd) => supervisor.crd_present(kind, crd),
                            None => supervisor.crd_absent(kind),
                        }
                    }
                    supervisor.crds_listed = true;
                }
                Some(Ok(watcher::Event::Apply(crd))) => {
                    if let Some(kind) = smi_kind_of(&crd) {
                        supervisor.crd_present(kind, &crd);
                    }
                }
                Some(Ok(watcher::Event::Delete(crd))) => {
                    if let Some(kind) = smi_kind_of(&crd) {
                        supervisor.crd_absent(kind);
                    }
                }
                Some(Err(e)) => {
                    supervisor.shared.metrics().kube_watch_error(CRD_KIND);
                    warn!(error = %e, "listing/watching CustomResourceDefinitions failed; retrying with backoff");
                }
                None => return,
            },
            Some(message) = rx.recv() => supervisor.kind_message(message),
        }
        supervisor.update_readiness();
    }
}

struct KindWatch {
    version: String,
    generation: u64,
    task: JoinHandle<()>,
    /// The first complete list of this watch has been applied.
    synced: bool,
}

impl Drop for KindWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct KindMessage {
    kind: SmiKind,
    generation: u64,
    update: KindUpdate,
}

enum KindUpdate {
    Listed(Vec<Observed>),
    Apply(Box<Observed>),
    Delete(ObjectRef),
}

struct Supervisor {
    client: kube::Client,
    filter: KubeFilter,
    shared: Arc<SharedStore>,
    tx: mpsc::Sender<KindMessage>,
    kinds: BTreeMap<SmiKind, KindWatch>,
    next_generation: u64,
    announced_missing: BTreeSet<SmiKind>,
    crds_listed: bool,
}

impl Supervisor {
    fn crd_present(&mut self, kind: SmiKind, crd: &CustomResourceDefinition) {
        let name = crd.metadata.name.clone().unwrap_or_default();
        if !is_established(crd) {
            if !self.kinds.contains_key(&kind) {
                info!(crd = %name, "CRD exists but is not Established yet; waiting");
            }
            return;
        }
        let Some(version) = choose_version(kind, crd) else {
            error!(
                crd = %name,
                served = ?served_versions_of(crd),
                known = ?consul_smi_api::served_versions(kind),
                "CRD serves no version this watcher can decode; not watching it"
            );
            self.stop(kind);
            return;
        };
        if self.kinds.get(&kind).is_some_and(|w| w.version == version) {
            return;
        }
        self.announced_missing.remove(&kind);
        let resource = ApiResource {
            group: kind.group().to_string(),
            version: version.clone(),
            api_version: format!("{}/{version}", kind.group()),
            kind: kind.as_str().to_string(),
            plural: crd.spec.names.plural.clone(),
        };
        let api: Api<DynamicObject> = match &self.filter.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        let mut config = watcher::Config::default();
        if let Some(selector) = &self.filter.label_selector {
            config = config.labels(selector);
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        info!(
            crd = %name,
            version = %version,
            namespace = self.filter.namespace.as_deref().unwrap_or("<all>"),
            selector = self.filter.label_selector.as_deref().unwrap_or(""),
            "watching SMI kind"
        );
        let task = tokio::spawn(watch_kind(
            api,
            config,
            kind,
            resource,
            generation,
            self.tx.clone(),
            self.shared.metrics().clone(),
        ));
        // Replacing the entry aborts the previous watch (another version); its last messages
        // carry the old generation and are ignored. The new watch's first list replaces the kind.
        self.kinds.insert(
            kind,
            KindWatch {
                version,
                generation,
                task,
                synced: false,
            },
        );
    }

    fn crd_absent(&mut self, kind: SmiKind) {
        if self.stop(kind) {
            warn!(kind = %kind, "CRD removed; its objects are gone");
        }
        if self.announced_missing.insert(kind) {
            info!(
                crd = %format!("{}.{}", kind.plural(), kind.group()),
                "CRD not installed; will watch it when it appears"
            );
        }
    }

    /// Stops watching `kind` and deletes its objects. True when it was being watched.
    fn stop(&mut self, kind: SmiKind) -> bool {
        if self.kinds.remove(&kind).is_some() {
            self.shared.replace(Scope::Kind(kind), Vec::new());
            true
        } else {
            false
        }
    }

    fn kind_message(&mut self, message: KindMessage) {
        let Some(watch) = self.kinds.get_mut(&message.kind) else {
            return;
        };
        if watch.generation != message.generation {
            return;
        }
        match message.update {
            KindUpdate::Listed(objects) => {
                if watch.synced {
                    self.shared.metrics().kube_relisted(message.kind);
                } else {
                    info!(kind = %message.kind, objects = objects.len(), "initial list complete");
                }
                watch.synced = true;
                self.shared.replace(Scope::Kind(message.kind), objects);
            }
            KindUpdate::Apply(observed) => self.shared.upsert(*observed),
            KindUpdate::Delete(object) => self.shared.delete(&object),
        }
    }

    fn update_readiness(&self) {
        if self.crds_listed && !self.shared.is_ready() && self.kinds.values().all(|w| w.synced) {
            self.shared.set_ready();
        }
    }
}

async fn watch_kind(
    api: Api<DynamicObject>,
    config: watcher::Config,
    kind: SmiKind,
    resource: ApiResource,
    generation: u64,
    tx: mpsc::Sender<KindMessage>,
    metrics: WatcherMetrics,
) {
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut listing = Vec::new();
    while let Some(event) = events.next().await {
        let update = match event {
            Ok(watcher::Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                listing.push(observe(kind, &resource, object));
                continue;
            }
            Ok(watcher::Event::InitDone) => KindUpdate::Listed(std::mem::take(&mut listing)),
            Ok(watcher::Event::Apply(object)) => {
                KindUpdate::Apply(Box::new(observe(kind, &resource, object)))
            }
            Ok(watcher::Event::Delete(object)) => KindUpdate::Delete(object_ref(kind, &object)),
            Err(e) => {
                metrics.kube_watch_error(kind.as_str());
                warn!(kind = %kind, version = %resource.version, error = %e, "watch failed; retrying with backoff");
                continue;
            }
        };
        if tx
            .send(KindMessage {
                kind,
                generation,
                update,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

fn object_ref(kind: SmiKind, object: &DynamicObject) -> ObjectRef {
    ObjectRef::new(
        kind,
        object
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        object.metadata.name.clone().unwrap_or_default(),
    )
}

/// Decodes one API object into the hub; a failure becomes an `Invalid` entry naming the
/// object, not an error that would stop the watch.
fn observe(kind: SmiKind, resource: &ApiResource, object: DynamicObject) -> Observed {
    let reference = object_ref(kind, &object);
    let api_version = object
        .types
        .as_ref()
        .map(|t| t.api_version.clone())
        .unwrap_or_else(|| resource.api_version.clone());
    let mut value = match serde_json::to_value(&object) {
        Ok(value) => value,
        Err(e) => {
            return Observed::Invalid {
                object: reference,
                api_version,
                reason: e.to_string(),
            };
        }
    };
    // Watch events carry apiVersion/kind, but list items may omit them.
    if let Some(map) = value.as_object_mut() {
        map.entry("apiVersion")
            .or_insert_with(|| resource.api_version.clone().into());
        map.entry("kind")
            .or_insert_with(|| resource.kind.clone().into());
    }
    match consul_smi_api::decode_object(&value) {
        Ok(decoded) if decoded.kind() == kind => Observed::Valid(decoded),
        Ok(decoded) => Observed::Invalid {
            object: reference,
            api_version,
            reason: format!("decoded as {} instead of {kind}", decoded.kind()),
        },
        Err(e) => Observed::Invalid {
            object: reference,
            api_version,
            reason: e.to_string(),
        },
    }
}

fn smi_kind_of(crd: &CustomResourceDefinition) -> Option<SmiKind> {
    SmiKind::from_kind(&crd.spec.names.kind).filter(|k| k.group() == crd.spec.group)
}

fn is_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

fn served_versions_of(crd: &CustomResourceDefinition) -> Vec<&str> {
    crd.spec
        .versions
        .iter()
        .filter(|v| v.served)
        .map(|v| v.name.as_str())
        .collect()
}

/// The storage version when it is served and decodable (reads need no conversion), else the
/// newest served version this watcher decodes.
fn choose_version(kind: SmiKind, crd: &CustomResourceDefinition) -> Option<String> {
    let decodable = consul_smi_api::served_versions(kind);
    let served: Vec<&str> = served_versions_of(crd);
    let storage = crd
        .spec
        .versions
        .iter()
        .find(|v| v.storage)
        .map(|v| v.name.as_str());
    if let Some(storage) = storage.filter(|s| served.contains(s) && decodable.contains(s)) {
        return Some(storage.to_string());
    }
    decodable
        .iter()
        .rev()
        .find(|v| served.contains(v))
        .map(|v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinitionNames, CustomResourceDefinitionSpec,
        CustomResourceDefinitionVersion,
    };

    fn crd(kind: SmiKind, versions: &[(&str, bool, bool)]) -> CustomResourceDefinition {
        CustomResourceDefinition {
            spec: CustomResourceDefinitionSpec {
                group: kind.group().into(),
                names: CustomResourceDefinitionNames {
                    kind: kind.as_str().into(),
                    plural: kind.plural().into(),
                    ..Default::default()
                },
                scope: "Namespaced".into(),
                versions: versions
                    .iter()
                    .map(|&(name, served, storage)| CustomResourceDefinitionVersion {
                        name: name.into(),
                        served,
                        storage,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn storage_version_is_preferred() {
        let c = crd(
            SmiKind::TrafficTarget,
            &[
                ("v1alpha1", true, false),
                ("v1alpha2", true, true),
                ("v1alpha3", true, false),
            ],
        );
        assert_eq!(
            choose_version(SmiKind::TrafficTarget, &c).as_deref(),
            Some("v1alpha2")
        );
    }

    #[test]
    fn newest_decodable_served_version_when_storage_is_unusable() {
        let c = crd(
            SmiKind::TrafficTarget,
            &[
                ("v1alpha1", true, false),
                ("v1alpha2", true, false),
                ("v9", true, true),
            ],
        );
        assert_eq!(
            choose_version(SmiKind::TrafficTarget, &c).as_deref(),
            Some("v1alpha2")
        );
        let none = crd(SmiKind::TrafficTarget, &[("v9", true, true)]);
        assert_eq!(choose_version(SmiKind::TrafficTarget, &none), None);
    }

    /// A client for an API server that closes every connection at once: every request fails.
    async fn unreachable_client() -> (kube::Client, JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let refuser = tokio::spawn(async move {
            while let Ok((connection, _)) = listener.accept().await {
                drop(connection);
            }
        });
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        (client, refuser)
    }

    fn metered() -> (Arc<SharedStore>, consul_smi_telemetry::Metrics) {
        let metrics = consul_smi_telemetry::Metrics::new();
        let shared = SharedStore::with_metrics("e".into(), 16, WatcherMetrics::register(&metrics));
        (shared, metrics)
    }

    #[tokio::test]
    async fn failed_crd_watches_are_counted() {
        let (client, _refuser) = unreachable_client().await;
        let (shared, metrics) = metered();
        let source = tokio::spawn(run(client, shared.clone(), KubeFilter::default()));
        let counted =
            "consul_smi_watcher_kube_watch_errors_total{kind=\"CustomResourceDefinition\"} 1";
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while !metrics.encode().lines().any(|l| l == counted) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no CRD watch error counted:\n{}",
                metrics.encode()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(!shared.is_ready(), "no CRD list, no complete state");
        source.abort();
    }

    #[tokio::test]
    async fn only_a_repeated_list_of_the_current_watch_counts_as_a_relist() {
        let (client, _refuser) = unreachable_client().await;
        let (shared, metrics) = metered();
        let (tx, _rx) = mpsc::channel(1);
        let mut supervisor = Supervisor {
            client,
            filter: KubeFilter::default(),
            shared,
            tx,
            kinds: BTreeMap::new(),
            next_generation: 1,
            announced_missing: BTreeSet::new(),
            crds_listed: true,
        };
        supervisor.kinds.insert(
            SmiKind::TCPRoute,
            KindWatch {
                version: "v1alpha4".into(),
                generation: 1,
                task: tokio::spawn(async {}),
                synced: false,
            },
        );
        let listed = |generation| KindMessage {
            kind: SmiKind::TCPRoute,
            generation,
            update: KindUpdate::Listed(Vec::new()),
        };
        let relists = || {
            metrics
                .encode()
                .lines()
                .find(|l| l.starts_with("consul_smi_watcher_kube_relists_total{kind=\"TCPRoute\"}"))
                .map(str::to_owned)
        };
        supervisor.kind_message(listed(1));
        assert_eq!(relists(), None, "the first list is no restart");
        // A message from the previous watch of this kind (another version) is ignored.
        supervisor.kind_message(listed(0));
        assert_eq!(relists(), None);
        supervisor.kind_message(listed(1));
        supervisor.kind_message(listed(1));
        assert_eq!(
            relists().as_deref(),
            Some("consul_smi_watcher_kube_relists_total{kind=\"TCPRoute\"} 2")
        );
    }

    #[test]
    fn only_smi_crds_are_recognised() {
        let mut c = crd(SmiKind::TCPRoute, &[]);
        assert_eq!(smi_kind_of(&c), Some(SmiKind::TCPRoute));
        c.spec.group = "example.com".into();
        assert_eq!(smi_kind_of(&c), None);
    }
}
