//! The `dir:` source end to end: `serve` on a temporary directory, a real gRPC subscriber.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use consul_smi_api::{ObjectRef, SmiKind, SmiObject};
use consul_smi_grpc::smi::{HubWatchEvent, SnapshotReason, WatchChange};
use consul_smi_watcher::{Source, WatchEventStream, WatcherConfig};
use tokio::net::TcpListener;

const TIMEOUT: Duration = Duration::from_secs(20);

/// smi-watcher serving a directory of manifests, polled every 50 ms.
struct DirWatcher {
    endpoint: String,
    metrics: consul_smi_telemetry::Metrics,
    readiness: consul_smi_telemetry::Readiness,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), consul_smi_watcher::WatcherError>>,
}

impl DirWatcher {
    async fn start(dir: &std::path::Path) -> DirWatcher {
        let mut config = WatcherConfig::new(Source::Dir(dir.to_path_buf()));
        config.poll_interval_ms = 50;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (metrics, readiness) = (
            consul_smi_telemetry::Metrics::new(),
            consul_smi_telemetry::Readiness::new(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(consul_smi_watcher::serve(
            config,
            listener,
            metrics.clone(),
            readiness.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        DirWatcher {
            endpoint,
            metrics,
            readiness,
            stop,
            server,
        }
    }

    /// Graceful shutdown; fails if the watcher ended with an error.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(TIMEOUT, self.server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

struct Replica {
    stream: WatchEventStream,
    objects: BTreeMap<ObjectRef, Result<SmiObject, String>>,
    revision: u64,
    deltas: usize,
}

impl Replica {
    async fn subscribe(
        endpoint: String,
        epoch: impl Into<String>,
        after: u64,
        name: &str,
    ) -> Replica {
        let stream = consul_smi_watcher::subscribe(endpoint, epoch, after, name)
            .await
            .unwrap();
        Replica {
            stream,
            objects: BTreeMap::new(),
            revision: after,
            deltas: 0,
        }
    }

    async fn next(&mut self) -> HubWatchEvent {
        let message = tokio::time::timeout(TIMEOUT, self.stream.message())
            .await
            .expect("event within timeout")
            .expect("stream ok")
            .expect("stream open");
        let event = HubWatchEvent::try_from(message).unwrap();
        match &event.change {
            WatchChange::SnapshotBegin(_) => self.objects.clear(),
            WatchChange::SnapshotEnd => {}
            change => {
                if event.revision > self.revision {
                    self.deltas += 1;
                }
                match change {
                    WatchChange::Applied(o) => {
                        self.objects.insert(o.object_ref(), Ok(o.clone()));
                    }
                    WatchChange::Deleted(r) => {
                        self.objects.remove(r);
                    }
                    WatchChange::Invalid { object, reason, .. } => {
                        self.objects.insert(object.clone(), Err(reason.clone()));
                    }
                    _ => unreachable!(),
                }
            }
        }
        self.revision = event.revision;
        event
    }

    async fn wait_until(&mut self, what: &str, done: impl Fn(&Replica) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}: {:?}",
                self.objects
            );
            self.next().await;
        }
    }

    fn names(&self) -> Vec<String> {
        self.objects
            .keys()
            .map(|r| format!("{}/{}", r.kind, r.name))
            .collect()
    }
}

fn write(dir: &Path, file: &str, text: &str) {
    // Write-then-rename, like editors and git do, so a poll never sees half a file here.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

const ROUTES: &str = "\
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: db, namespace: default}
spec: {matches: {ports: [5432]}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: not-smi}
---
apiVersion: specs.smi-spec.io/v1alpha1
kind: TCPRoute
metadata: {name: legacy, namespace: default}
";

const TARGET: &str = "\
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha1
metadata: {name: counting-traffic-target, namespace: default}
destination: {kind: ServiceAccount, name: counting, namespace: default}
sources:
- {kind: ServiceAccount, name: dashboard, namespace: default}
specs:
- {kind: TCPRoute, name: legacy}
";

#[tokio::test]
async fn dir_source_streams_snapshot_and_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "routes.yaml", ROUTES);
    std::fs::create_dir(dir.path().join("access")).unwrap();
    write(&dir.path().join("access"), "target.yml", TARGET);

    let watcher = DirWatcher::start(dir.path()).await;
    let (endpoint, readiness) = (watcher.endpoint.clone(), watcher.readiness.clone());

    let mut replica = Replica::subscribe(endpoint.clone(), "", 0, "dir-test").await;
    let begin = replica.next().await;
    assert_eq!(
        begin.change,
        WatchChange::SnapshotBegin(SnapshotReason::Initial)
    );
    replica
        .wait_until("snapshot end", |r| r.objects.len() == 3)
        .await;
    assert!(matches!(
        replica.next().await.change,
        WatchChange::SnapshotEnd
    ));
    // /readyz follows the first complete snapshot.
    assert!(readiness.is_ready());
    assert_eq!(
        replica.names(),
        [
            "TrafficTarget/counting-traffic-target",
            "TCPRoute/db",
            "TCPRoute/legacy"
        ]
    );
    match &replica.objects
        [&ObjectRef::new(SmiKind::TrafficTarget, "default", "counting-traffic-target")]
    {
        Ok(SmiObject::TrafficTarget(t)) => {
            assert_eq!(t.destination.name, "counting");
            assert_eq!(t.sources[0].name, "dashboard");
        }
        other => panic!("{other:?}"),
    }

    // An object removed from a file is deleted; a changed one is applied.
    write(
        dir.path(),
        "routes.yaml",
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: db}\nspec: {matches: {ports: [6432]}}\n",
    );
    replica
        .wait_until("legacy deleted and db changed", |r| {
            let db = &r.objects.get(&ObjectRef::new(SmiKind::TCPRoute, "default", "db"));
            r.objects.len() == 2
                && matches!(db, Some(Ok(SmiObject::TcpRoute(t))) if t.matches.as_ref().unwrap().ports == [6432])
        })
        .await;

    // A file that does not parse keeps its objects (a half-written file must not delete them).
    write(dir.path(), "routes.yaml", "apiVersion: [unclosed\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quiet = tokio::time::timeout(Duration::from_millis(300), replica.stream.message()).await;
    assert!(quiet.is_err(), "no change for a broken file: {quiet:?}");

    // An invalid SMI object is reported and does not stop the stream.
    write(
        dir.path(),
        "split.yaml",
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: canary}\nspec:\n  service: \"\"\n  backends: [{service: v1, weight: 1}]\n",
    );
    replica
        .wait_until("invalid split reported", |r| {
            matches!(r.objects.get(&ObjectRef::new(SmiKind::TrafficSplit, "default", "canary")), Some(Err(reason)) if reason.contains("spec.service"))
        })
        .await;

    // Removing a file deletes its objects.
    std::fs::remove_file(dir.path().join("access/target.yml")).unwrap();
    replica
        .wait_until("target deleted", |r| {
            !r.objects.contains_key(&ObjectRef::new(
                SmiKind::TrafficTarget,
                "default",
                "counting-traffic-target",
            ))
        })
        .await;

    // Resume in the same epoch gets exactly what came after.
    let epoch = begin.epoch.clone();
    let at = replica.revision;
    write(
        dir.path(),
        "more.yaml",
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: UDPRoute\nmetadata: {name: dns}\nspec: {matches: {ports: [53]}}\n",
    );
    let resumed_endpoint = endpoint.clone();
    let mut resumed = Replica::subscribe(endpoint, epoch, at, "dir-resume").await;
    let first = resumed.next().await;
    assert!(
        matches!(first.change, WatchChange::Applied(ref o) if o.meta().name == "dns"),
        "{first:?}"
    );
    assert_eq!(first.revision, at + 1);

    // grpc.health.v1 reports SERVING once the initial state is complete (the readiness probe
    // of deploy/base uses the server-wide "" service).
    let channel = tonic::transport::Channel::from_shared(resumed_endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "consul_smi.v1.SmiWatch"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }

    watcher.stop().await;
}

const SPLIT_INVALID: &str = "\
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: canary}
spec:
  service: \"\"
  backends: [{service: v1, weight: 1}]
";

/// The lines of `/metrics` that start with `prefix` and are no comment, sorted.
fn exposed(metrics: &consul_smi_telemetry::Metrics, prefix: &str) -> Vec<String> {
    let mut lines: Vec<String> = metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// Waits until `/metrics` has `line` (state a subscription task updates after its last event).
async fn wait_for_line(metrics: &consul_smi_telemetry::Metrics, line: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !metrics.encode().lines().any(|l| l == line) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {line:?} in\n{}",
            metrics.encode()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn dir_source_records_metrics() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "routes.yaml", ROUTES);
    write(dir.path(), "target.yml", TARGET);
    write(dir.path(), "split.yaml", SPLIT_INVALID);

    let watcher = DirWatcher::start(dir.path()).await;
    let (endpoint, metrics) = (watcher.endpoint.clone(), watcher.metrics.clone());

    let mut replica = Replica::subscribe(endpoint.clone(), "", 0, "metrics-test").await;
    let begin = replica.next().await;
    replica
        .wait_until("snapshot complete", |r| r.objects.len() == 4)
        .await;
    assert!(matches!(
        replica.next().await.change,
        WatchChange::SnapshotEnd
    ));
    // The gauges and counters are set with the store's lock held, before any snapshot can
    // include the changes, and the subscriber is counted before its first event: all exact.
    // The kinds starting with T: the three the manifests define.
    assert_eq!(
        exposed(&metrics, "consul_smi_watcher_changes_total{kind=\"T"),
        [
            "consul_smi_watcher_changes_total{kind=\"TCPRoute\",change=\"applied\"} 2",
            "consul_smi_watcher_changes_total{kind=\"TCPRoute\",change=\"deleted\"} 0",
            "consul_smi_watcher_changes_total{kind=\"TCPRoute\",change=\"invalid\"} 0",
            "consul_smi_watcher_changes_total{kind=\"TrafficSplit\",change=\"applied\"} 0",
            "consul_smi_watcher_changes_total{kind=\"TrafficSplit\",change=\"deleted\"} 0",
            "consul_smi_watcher_changes_total{kind=\"TrafficSplit\",change=\"invalid\"} 1",
            "consul_smi_watcher_changes_total{kind=\"TrafficTarget\",change=\"applied\"} 1",
            "consul_smi_watcher_changes_total{kind=\"TrafficTarget\",change=\"deleted\"} 0",
            "consul_smi_watcher_changes_total{kind=\"TrafficTarget\",change=\"invalid\"} 0",
        ]
    );
    assert_eq!(
        exposed(&metrics, "consul_smi_watcher_objects"),
        [
            "consul_smi_watcher_objects{kind=\"HTTPRouteGroup\"} 0",
            "consul_smi_watcher_objects{kind=\"TCPRoute\"} 2",
            "consul_smi_watcher_objects{kind=\"TrafficSplit\"} 1",
            "consul_smi_watcher_objects{kind=\"TrafficTarget\"} 1",
            "consul_smi_watcher_objects{kind=\"UDPRoute\"} 0",
        ]
    );
    assert_eq!(
        exposed(
            &metrics,
            "consul_smi_watcher_invalid_objects{kind=\"TrafficSplit\"}"
        ),
        ["consul_smi_watcher_invalid_objects{kind=\"TrafficSplit\"} 1"]
    );
    assert_eq!(
        exposed(&metrics, "consul_smi_watcher_revision"),
        ["consul_smi_watcher_revision 4"]
    );
    assert_eq!(
        exposed(&metrics, "consul_smi_watcher_subscribers"),
        ["consul_smi_watcher_subscribers 1"]
    );
    assert_eq!(
        exposed(&metrics, "consul_smi_watcher_snapshots_total"),
        [
            "consul_smi_watcher_snapshots_total{cause=\"fell_behind\"} 0",
            "consul_smi_watcher_snapshots_total{cause=\"initial\"} 1",
            "consul_smi_watcher_snapshots_total{cause=\"resume_unavailable\"} 0",
        ]
    );

    // A changed file: `legacy` deleted, `db` changed. The split fixed: applied, no longer invalid.
    write(
        dir.path(),
        "routes.yaml",
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: db}\nspec: {matches: {ports: [6432]}}\n",
    );
    write(
        dir.path(),
        "split.yaml",
        &SPLIT_INVALID.replace("service: \"\"", "service: api"),
    );
    // A removed file: its target deleted.
    std::fs::remove_file(dir.path().join("target.yml")).unwrap();
    replica
        .wait_until("legacy and target deleted, db changed, split valid", |r| {
            r.names() == ["TCPRoute/db", "TrafficSplit/canary"]
                && r.objects.values().all(Result::is_ok)
                && matches!(
                    r.objects.get(&ObjectRef::new(SmiKind::TCPRoute, "default", "db")),
                    Some(Ok(SmiObject::TcpRoute(t))) if t.matches.as_ref().unwrap().ports == [6432]
                )
        })
        .await;
    let revision = replica.revision;
    assert_eq!(revision, 4 + 4, "four changes: {:?}", replica.objects);
    for line in [
        "consul_smi_watcher_changes_total{kind=\"TCPRoute\",change=\"applied\"} 3",
        "consul_smi_watcher_changes_total{kind=\"TCPRoute\",change=\"deleted\"} 1",
        "consul_smi_watcher_changes_total{kind=\"TrafficTarget\",change=\"deleted\"} 1",
        "consul_smi_watcher_changes_total{kind=\"TrafficSplit\",change=\"applied\"} 1",
        "consul_smi_watcher_changes_total{kind=\"TrafficSplit\",change=\"invalid\"} 1",
        "consul_smi_watcher_objects{kind=\"TCPRoute\"} 1",
        "consul_smi_watcher_objects{kind=\"TrafficTarget\"} 0",
        "consul_smi_watcher_objects{kind=\"TrafficSplit\"} 1",
        "consul_smi_watcher_invalid_objects{kind=\"TrafficSplit\"} 0",
        "consul_smi_watcher_revision 8",
    ] {
        assert!(
            metrics.encode().lines().any(|l| l == line),
            "missing {line:?} in\n{}",
            metrics.encode()
        );
    }

    // A second subscriber resuming in this epoch gets no snapshot; one from another epoch does.
    let resumed =
        consul_smi_watcher::subscribe(endpoint.clone(), begin.epoch.clone(), revision, "resumer")
            .await
            .unwrap();
    wait_for_line(&metrics, "consul_smi_watcher_resumes_total 1").await;
    let mut restarted =
        consul_smi_watcher::subscribe(endpoint, "an-earlier-run", revision, "restarted")
            .await
            .unwrap();
    let first = restarted.message().await.unwrap().unwrap();
    assert_eq!(
        HubWatchEvent::try_from(first).unwrap().change,
        WatchChange::SnapshotBegin(SnapshotReason::ResumeUnavailable)
    );
    assert!(
        metrics
            .encode()
            .contains("consul_smi_watcher_snapshots_total{cause=\"resume_unavailable\"} 1\n")
    );
    wait_for_line(&metrics, "consul_smi_watcher_subscribers 3").await;
    // Subscribers that go away are no longer counted.
    drop(resumed);
    drop(restarted);
    wait_for_line(&metrics, "consul_smi_watcher_subscribers 1").await;

    watcher.stop().await;
}

// ---- Messy and hostile directories (issue 24) ----

/// A TrafficTarget allowing `source` to call api's `metrics` match only (block style, so a
/// cut right after `matches:` still parses: as "every match").
fn metrics_target(source: &str) -> String {
    format!(
        "\
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: api-metrics, namespace: default}}
spec:
  destination: {{kind: ServiceAccount, name: api, namespace: default}}
  sources:
  - {{kind: ServiceAccount, name: {source}, namespace: default}}
  rules:
  - kind: HTTPRouteGroup
    name: api-routes
    matches:
    - metrics
"
    )
}

fn api_metrics() -> ObjectRef {
    ObjectRef::new(SmiKind::TrafficTarget, "default", "api-metrics")
}

/// The sources of api-metrics when every rule is limited to `metrics`; panics on a wider rule.
fn narrow_sources(object: &SmiObject) -> Vec<String> {
    let SmiObject::TrafficTarget(t) = object else {
        panic!("not a TrafficTarget: {object:?}")
    };
    for rule in &t.rules {
        assert_eq!(
            rule.matches.as_deref(),
            Some(&["metrics".to_string()][..]),
            "a widened rule was published: {t:?}"
        );
    }
    t.sources.iter().map(|s| s.name.clone()).collect()
}

/// A replica holding the initial snapshot of `dir`.
async fn synced_replica(watcher: &DirWatcher, until: impl Fn(&Replica) -> bool) -> Replica {
    let mut replica = Replica::subscribe(watcher.endpoint.clone(), "", 0, "hostile").await;
    while replica.next().await.change != WatchChange::SnapshotEnd {}
    replica.wait_until("initial state", until).await;
    replica
}

#[tokio::test]
async fn a_file_rewritten_in_place_in_two_halves_is_never_used_half_written() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "target.yaml", &metrics_target("prometheus"));
    let watcher = DirWatcher::start(dir.path()).await;
    let mut replica = synced_replica(&watcher, |r| r.objects.contains_key(&api_metrics())).await;

    // An in-place save (truncate, write) that stalls right after `matches:`: that prefix
    // parses, as a rule granting every match of api-routes.
    let text = metrics_target("grafana");
    let cut = text.find("matches:").unwrap() + "matches:\n".len();
    {
        use std::io::Write;
        let mut file = std::fs::File::create(dir.path().join("target.yaml")).unwrap();
        file.write_all(&text.as_bytes()[..cut]).unwrap();
        file.flush().unwrap();
        // Several polls (50 ms) see the prefix; shorter than the settle time (1 s).
        tokio::time::sleep(Duration::from_millis(300)).await;
        file.write_all(&text.as_bytes()[cut..]).unwrap();
    }

    // Every event until the complete new version: never the prefix, never a deletion.
    loop {
        let event = replica.next().await;
        match &event.change {
            WatchChange::Applied(o) if o.object_ref() == api_metrics() => {
                if narrow_sources(o) == ["grafana"] {
                    break;
                }
            }
            WatchChange::Deleted(r) => panic!("{r} deleted by a half-written file"),
            other => panic!("unexpected change {other:?}"),
        }
    }
    watcher.stop().await;
}

/// Writes `file` with one TCPRoute named `name`: a change the test can wait for.
fn marker(dir: &Path, file: &str, name: &str) -> ObjectRef {
    write(
        dir,
        file,
        &format!(
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {{name: {name}}}\n"
        ),
    );
    ObjectRef::new(SmiKind::TCPRoute, "default", name)
}

#[tokio::test]
async fn broken_edits_keep_the_last_valid_version() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "target.yaml", &metrics_target("prometheus"));
    let watcher = DirWatcher::start(dir.path()).await;
    let mut replica = synced_replica(&watcher, |r| r.objects.contains_key(&api_metrics())).await;

    let good = metrics_target("prometheus");
    let broken = [
        (
            "a kind typo",
            good.replace("kind: TrafficTarget", "kind: TrafficTargte"),
        ),
        ("a lost name", good.replace("name: api-metrics, ", "")),
        ("an emptied file", String::new()),
        ("a comment left", "# TODO\n".to_string()),
    ];
    for (i, (what, text)) in broken.iter().enumerate() {
        write(dir.path(), "target.yaml", text);
        // Written after the broken edit, so read in the same scan or a later one.
        let marker = marker(
            dir.path(),
            &format!("marker{i}.yaml"),
            &format!("marker{i}"),
        );
        replica
            .wait_until(what, |r| r.objects.contains_key(&marker))
            .await;
        assert!(
            matches!(replica.objects.get(&api_metrics()), Some(Ok(o)) if narrow_sources(o) == ["prometheus"]),
            "{what} changed the target: {:?}",
            replica.objects.get(&api_metrics())
        );
    }
    // Deleting the file is how its objects are removed.
    std::fs::remove_file(dir.path().join("target.yaml")).unwrap();
    replica
        .wait_until("target deleted", |r| {
            !r.objects.contains_key(&api_metrics())
        })
        .await;
    watcher.stop().await;
}

#[tokio::test]
async fn replacements_with_the_same_size_and_mtime_are_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("target.yaml");
    write(dir.path(), "target.yaml", &metrics_target("prometheus"));
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    let watcher = DirWatcher::start(dir.path()).await;
    let mut replica = synced_replica(&watcher, |r| r.objects.contains_key(&api_metrics())).await;

    // `cp -p` of a same-size file over it: same inode, size and mtime; only ctime differs.
    let replacement = metrics_target("monitoring");
    assert_eq!(replacement.len(), metrics_target("prometheus").len());
    std::fs::write(&path, &replacement).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    replica
        .wait_until("the replacement", |r| {
            matches!(r.objects.get(&api_metrics()), Some(Ok(o)) if narrow_sources(o) == ["monitoring"])
        })
        .await;
    watcher.stop().await;
}

#[tokio::test]
async fn upper_case_extensions_are_read_and_symlinks_outside_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "target.yaml", &metrics_target("prometheus"));
    std::os::unix::fs::symlink(
        outside.path().join("target.yaml"),
        dir.path().join("linked.yaml"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("linked-dir")).unwrap();
    let upper = marker(dir.path(), "UPPER.YAML", "upper");
    let yml = marker(dir.path(), "short.yml", "short");
    let watcher = DirWatcher::start(dir.path()).await;
    let replica = synced_replica(&watcher, |r| r.objects.contains_key(&yml)).await;
    assert!(
        replica.objects.contains_key(&upper),
        "{:?}",
        replica.names()
    );
    assert!(
        !replica.objects.contains_key(&api_metrics()),
        "followed a symlink outside the directory: {:?}",
        replica.names()
    );
    watcher.stop().await;
}

/// Starts the watcher on `dir` (holding one target and whatever hostile entries the test
/// added), then checks that a deletion is still published and the watcher stops.
async fn deletions_still_flow(dir: &Path) {
    write(dir, "target.yaml", &metrics_target("prometheus"));
    let watcher = DirWatcher::start(dir).await;
    let mut replica = synced_replica(&watcher, |r| r.objects.contains_key(&api_metrics())).await;
    std::fs::remove_file(dir.join("target.yaml")).unwrap();
    replica
        .wait_until("target deleted", |r| {
            !r.objects.contains_key(&api_metrics())
        })
        .await;
    assert!(watcher.readiness.is_ready());
    watcher.stop().await;
}

#[tokio::test]
async fn a_fifo_named_like_a_manifest_does_not_block_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = std::ffi::CString::new(dir.path().join("pipe.yaml").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    deletions_still_flow(dir.path()).await;
}

#[tokio::test]
async fn a_symlink_to_dev_zero_and_a_huge_file_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero.yaml")).unwrap();
    // Sparse: 5 GB that take no disk space.
    std::fs::File::create(dir.path().join("huge.yaml"))
        .unwrap()
        .set_len(5 << 30)
        .unwrap();
    deletions_still_flow(dir.path()).await;
}

#[tokio::test]
async fn a_branching_directory_symlink_loop_does_not_stop_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    for name in ["a", "b", "c"] {
        std::os::unix::fs::symlink("..", dir.path().join("sub").join(name)).unwrap();
    }
    deletions_still_flow(dir.path()).await;
}

#[tokio::test]
async fn readiness_follows_a_directory_that_cannot_be_read() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("manifests");
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "target.yaml", &metrics_target("prometheus"));
    let watcher = DirWatcher::start(&dir).await;
    let _replica = synced_replica(&watcher, |r| r.objects.contains_key(&api_metrics())).await;
    assert!(watcher.readiness.is_ready());

    let moved = parent.path().join("away");
    std::fs::rename(&dir, &moved).unwrap();
    wait_for_readiness(&watcher.readiness, false).await;
    std::fs::rename(&moved, &dir).unwrap();
    wait_for_readiness(&watcher.readiness, true).await;
    watcher.stop().await;
}

async fn wait_for_readiness(readiness: &consul_smi_telemetry::Readiness, ready: bool) {
    let deadline = Instant::now() + TIMEOUT;
    while readiness.is_ready() != ready {
        assert!(Instant::now() < deadline, "readiness never became {ready}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
