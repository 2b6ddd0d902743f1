//! The fault matrix's oracle: Consul's intentions sampled every 50 ms while faults happen,
//! straight from its HTTP API (so sampling runs while the harness kills things), and the
//! intentions others own, compared before and after.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;

pub type Pair = (String, String);

/// What the sampler saw.
#[derive(Debug, Default)]
pub struct GrantReport {
    pub samples: u32,
    /// Owned allows of pairs outside the granted set.
    pub never_granted: BTreeSet<Pair>,
    /// Pairs seen allowed, then seen revoked after their SMI object was deleted, then seen
    /// allowed again: access re-granted by stale state (a replay after a restart, say).
    pub re_granted: BTreeSet<Pair>,
}

/// Samples the owned allow intentions whose destination contains `infix`.
pub struct GrantSampler {
    stop: watch::Sender<bool>,
    deletions: Arc<Mutex<BTreeMap<Pair, Instant>>>,
    task: tokio::task::JoinHandle<GrantReport>,
}

impl GrantSampler {
    /// `grantable`: every pair the test's SMI objects grant at any point, minus pairs whose
    /// intention belongs to someone else (those must never become owned allows).
    pub fn start(consul_url: String, infix: String, grantable: BTreeSet<Pair>) -> GrantSampler {
        let (stop, mut stopped) = watch::channel(false);
        let deletions: Arc<Mutex<BTreeMap<Pair, Instant>>> = Arc::default();
        let task = tokio::spawn({
            let deletions = deletions.clone();
            async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(1))
                    .build()
                    .expect("building a reqwest client");
                let mut observations = GrantObservations::new(grantable);
                while !*stopped.borrow() {
                    let asked_at = Instant::now();
                    // A failed read (Consul down) is simply not a sample.
                    if let Ok(allows) = owned_allows(&http, &consul_url, &infix).await {
                        let deleted = deletions.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        observations.observe(&allows, &deleted, asked_at);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = stopped.changed() => {}
                    }
                }
                observations.report
            }
        });
        GrantSampler {
            stop,
            deletions,
            task,
        }
    }

    /// Call once the SMI object granting `pair` has been deleted (the delete call returned).
    pub fn deleted(&self, pair: Pair) {
        self.deletions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pair, Instant::now());
    }

    /// Stops sampling; fails if the sampler barely ran or saw an over-grant.
    pub async fn finish(self, min_samples: u32) -> Result<GrantReport> {
        let _ = self.stop.send(true);
        let report = self.task.await.context("the sampler task")?;
        eprintln!(
            "{} samples of Consul's intentions during the faults and recovery",
            report.samples
        );
        anyhow::ensure!(
            report.samples >= min_samples,
            "the sampler barely ran ({} samples)",
            report.samples
        );
        anyhow::ensure!(
            report.never_granted.is_empty(),
            "owned intentions allowed pairs no SMI object granted: {:?}",
            report.never_granted
        );
        anyhow::ensure!(
            report.re_granted.is_empty(),
            "access re-granted after it had been revoked: {:?}",
            report.re_granted
        );
        Ok(report)
    }
}

/// The judgement over successive samples, apart from the sampling.
struct GrantObservations {
    grantable: BTreeSet<Pair>,
    seen_allowed: BTreeSet<Pair>,
    seen_revoked: BTreeSet<Pair>,
    report: GrantReport,
}

impl GrantObservations {
    fn new(grantable: BTreeSet<Pair>) -> GrantObservations {
        GrantObservations {
            grantable,
            seen_allowed: BTreeSet::new(),
            seen_revoked: BTreeSet::new(),
            report: GrantReport::default(),
        }
    }

    /// `allows` was read by a request sent at `asked_at`; `deletions` holds when each
    /// deleted pair's SMI object was deleted. A pair absent from a sample only counts as
    /// revoked if it had been seen allowed and its deletion preceded the request: an allow
    /// written late (after its object was deleted, by a pipeline behind) is lag, but an allow
    /// coming back after its revocation was observed is stale state winning.
    fn observe(
        &mut self,
        allows: &BTreeSet<Pair>,
        deletions: &BTreeMap<Pair, Instant>,
        asked_at: Instant,
    ) {
        self.report.samples += 1;
        self.report
            .never_granted
            .extend(allows.difference(&self.grantable).cloned());
        for (pair, deleted_at) in deletions {
            let allowed = allows.contains(pair);
            if allowed && self.seen_revoked.contains(pair) {
                self.report.re_granted.insert(pair.clone());
            } else if !allowed && *deleted_at < asked_at && self.seen_allowed.contains(pair) {
                self.seen_revoked.insert(pair.clone());
            }
        }
        self.seen_allowed.extend(allows.iter().cloned());
    }
}

/// Owned (consul-smi metadata) allow intentions whose destination contains `infix`.
pub async fn owned_allows(
    http: &reqwest::Client,
    consul_url: &str,
    infix: &str,
) -> Result<BTreeSet<Pair>> {
    Ok(intentions(http, consul_url)
        .await?
        .iter()
        .filter(|i| i["Action"] == "allow" && is_owned(i))
        .map(|i| (text(i, "SourceName"), text(i, "DestinationName")))
        .filter(|(_, destination)| destination.contains(infix))
        .collect())
}

/// Every intention not owned by consul-smi, by ID, exactly as Consul returns it (modify
/// indexes included, so any write to one shows).
pub async fn foreign_intentions(
    http: &reqwest::Client,
    consul_url: &str,
) -> Result<BTreeMap<String, serde_json::Value>> {
    Ok(intentions(http, consul_url)
        .await?
        .into_iter()
        .filter(|i| !is_owned(i))
        .map(|i| (text(&i, "ID"), i))
        .collect())
}

/// Consul's intentions as rows of the legacy list's shape, from the entries themselves on 1.9+
/// (see [`intention_rows`]).
async fn intentions(http: &reqwest::Client, consul_url: &str) -> Result<Vec<serde_json::Value>> {
    let entries = http
        .get(format!("{consul_url}/v1/config/service-intentions"))
        .send()
        .await?;
    // 1.8.7 has no such config-entry kind and answers with an error.
    if entries.status().is_success() {
        let entries: Option<Vec<serde_json::Value>> = entries.json().await?;
        return Ok(intention_rows(&entries.unwrap_or_default()));
    }
    Ok(http
        .get(format!("{consul_url}/v1/connect/intentions"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// One legacy-shaped row per source of 1.9+ `service-intentions` entries. Consul's own legacy
/// list view copies each entry's `Meta` onto its sources (`ToIntention` in
/// agent/structs/config_entry_intentions.go), so an operator's source in an entry consul-smi
/// created would look owned there; here `Meta` is only the source's `LegacyMeta`. A source
/// has no ID of its own: `ID` is `source -> destination`, and the row holds the source exactly
/// as Consul returns it (without the entry's indexes, which change on every write to it).
pub fn intention_rows(entries: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    for entry in entries {
        let destination = text(entry, "Name");
        for source in entry["Sources"].as_array().into_iter().flatten() {
            let name = text(source, "Name");
            rows.push(serde_json::json!({
                "ID": format!("{name} -> {destination}"),
                "SourceName": name,
                "DestinationName": destination,
                "Action": source["Action"].as_str().unwrap_or("L7 permissions"),
                "Description": source["Description"],
                "Meta": source["LegacyMeta"],
                "Source": source,
            }));
        }
    }
    rows
}

/// Owned by some consul-smi writer: consul-smi's keys in `Meta` (a 1.8 intention, or a 1.9+
/// source migrated from one), or a `[consul-smi:<id>] ` description mark (a 1.9+ source).
/// Rows come from [`intentions`], never from the legacy list view of a 1.9+ Consul.
pub fn is_owned(intention: &serde_json::Value) -> bool {
    let meta = intention["Meta"]
        .as_object()
        .is_some_and(|meta| meta.keys().any(|k| k.contains("consul-smi")));
    meta || intention["Description"]
        .as_str()
        .is_some_and(|d| d.starts_with("[consul-smi:"))
}

fn text(value: &serde_json::Value, field: &str) -> String {
    value[field].as_str().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(n: u8) -> Pair {
        (format!("web-{n}"), format!("api-{n}"))
    }

    fn set(pairs: &[u8]) -> BTreeSet<Pair> {
        pairs.iter().map(|n| pair(*n)).collect()
    }

    #[test]
    fn an_operator_source_in_an_entry_consul_smi_created_is_not_owned() {
        let entry = serde_json::json!({
            "Kind": "service-intentions", "Name": "api",
            "Meta": {"managed-by": "consul-smi", "consul-smi/owner": "consul-smi"},
            "Sources": [
                {"Name": "web", "Action": "allow", "Description": "[consul-smi:consul-smi] tt"},
                {"Name": "ops", "Action": "deny", "Description": "operator"},
                {"Name": "old", "Action": "allow",
                 "LegacyMeta": {"managed-by": "consul-smi", "consul-smi/owner": "consul-smi"}}
            ]
        });
        let rows = intention_rows(&[entry]);
        let owned: Vec<bool> = rows.iter().map(is_owned).collect();
        assert_eq!(owned, [true, false, true]);
        assert_eq!(rows[1]["ID"], "ops -> api");
    }

    #[test]
    fn an_allow_no_object_granted_is_reported() {
        let mut observations = GrantObservations::new(set(&[1, 2]));
        observations.observe(&set(&[1, 3]), &BTreeMap::new(), Instant::now());
        assert_eq!(observations.report.never_granted, set(&[3]));
    }

    #[test]
    fn access_back_after_its_revocation_was_seen_is_reported() {
        let mut observations = GrantObservations::new(set(&[1, 2]));
        let t0 = Instant::now();
        observations.observe(&set(&[1, 2]), &BTreeMap::new(), t0);
        let deletions = BTreeMap::from([(pair(1), t0)]);
        let t1 = t0 + Duration::from_millis(50);
        observations.observe(&set(&[2]), &deletions, t1);
        assert!(observations.report.re_granted.is_empty());
        observations.observe(&set(&[1, 2]), &deletions, t1 + Duration::from_millis(50));
        assert_eq!(observations.report.re_granted, set(&[1]));
    }

    #[test]
    fn a_late_first_allow_or_a_sample_before_the_deletion_is_not_a_re_grant() {
        let mut observations = GrantObservations::new(set(&[1, 2]));
        let t0 = Instant::now();
        // Deleted before its allow was ever written: absent, then written late, then gone.
        let deletions = BTreeMap::from([(pair(1), t0)]);
        observations.observe(&set(&[]), &deletions, t0 + Duration::from_millis(1));
        observations.observe(&set(&[1]), &deletions, t0 + Duration::from_millis(2));
        observations.observe(&set(&[]), &deletions, t0 + Duration::from_millis(3));
        // Pair 2: absent in a sample asked before its deletion, present again after.
        observations.observe(&set(&[2]), &deletions, t0 + Duration::from_millis(4));
        let deletions = BTreeMap::from([(pair(2), t0 + Duration::from_millis(10))]);
        observations.observe(&set(&[]), &deletions, t0 + Duration::from_millis(5));
        observations.observe(&set(&[2]), &deletions, t0 + Duration::from_millis(6));
        assert!(observations.report.re_granted.is_empty());
        assert!(observations.report.never_granted.is_empty());
    }
}
