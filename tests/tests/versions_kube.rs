//! Every SMI version against a real API server (etcd + apiextensions-apiserver, see
//! `tests/src/kube.rs`), with the CRDs converting through smi-watcher's own webhook.
//!
//! Each valid fixture under `crates/smi-api/tests/fixtures/valid/` is created through its own
//! version's endpoint and must (a) read back in that version exactly as written, (b) read back
//! in every other served version exactly when `encode_object` says that version can express
//! it, decoding to the same hub object, and (c) arrive on the watcher's gRPC stream as the hub
//! object `decode_manifests` makes of the fixture file. Objects differ from the fixture only
//! in server-set metadata and in their namespace: each fixture file gets a namespace of its
//! own, because the files reuse names (`path-specific` in every access version).
//!
//! The test fails (never skips) when the API server cannot start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use consul_smi_api::{
    CrdConversion, ObjectRef, RuleKind, SmiKind, SmiObject, WebhookTarget, decode_manifests,
    decode_object, encode_object, served_versions,
};
use consul_smi_e2e::kube::KubeApiServer;
use consul_smi_grpc::smi::{HubWatchEvent, WatchChange};
use consul_smi_watcher::{Source, WatcherConfig, WatcherError};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Metadata the API server sets on create; everything else must survive a round trip.
const SERVER_SET_METADATA: [&str; 5] = [
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
];

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

// ---- the cluster: API server + smi-watcher serving gRPC and the conversion webhook -----------

struct Cluster {
    server: KubeApiServer,
    watcher_endpoint: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    watcher: JoinHandle<Result<(), WatcherError>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Cluster {
    /// The API server, smi-watcher with its webhook on, and the CRDs pointing at that webhook.
    async fn start() -> Cluster {
        init_logs();
        let server = KubeApiServer::start()
            .await
            .expect("the test API server must start");
        let cert = server
            .issue_serving_cert("versions-webhook")
            .expect("webhook certificate");
        let webhook_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = WatcherConfig::new(Source::Kube);
        config.kubeconfig = Some(server.kubeconfig_path());
        config.webhook_listen = Some(([127, 0, 0, 1], webhook_port).into());
        config.webhook_cert = Some(cert.cert_path.clone());
        config.webhook_key = Some(cert.key_path.clone());

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let watcher_endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(consul_smi_watcher::serve(
            config,
            listener,
            consul_smi_telemetry::Metrics::new(),
            consul_smi_telemetry::Readiness::new(),
            async {
                let _ = stopped.await;
            },
        ));

        let conversion = CrdConversion::Webhook {
            client_config: WebhookTarget::Url(format!("https://127.0.0.1:{webhook_port}/convert")),
            ca_bundle_pem: Some(cert.ca_pem.clone()),
        };
        server
            .install_crds(&consul_smi_api::crds(&conversion))
            .await
            .expect("installing the SMI CRDs");
        Cluster {
            server,
            watcher_endpoint,
            stop: Some(stop),
            watcher,
        }
    }

    fn client(&self) -> kube::Client {
        self.server.client()
    }

    async fn subscribe(&self) -> Replica {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let stream = loop {
            match consul_smi_watcher::subscribe(&self.watcher_endpoint, "", 0, "versions").await {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("subscribing to {}: {e}", self.watcher_endpoint),
            }
        };
        Replica {
            stream,
            state: BTreeMap::new(),
            invalid: BTreeMap::new(),
            in_snapshot: false,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(EVENT_TIMEOUT, &mut self.watcher)
            .await
            .expect("watcher stops within the timeout")
            .expect("watcher task")
            .expect("watcher exits cleanly");
    }
}

/// What a subscriber holds after applying the stream.
struct Replica {
    stream: consul_smi_watcher::WatchEventStream,
    state: BTreeMap<ObjectRef, SmiObject>,
    invalid: BTreeMap<ObjectRef, String>,
    in_snapshot: bool,
}

impl Replica {
    async fn next(&mut self) {
        let message = tokio::time::timeout(EVENT_TIMEOUT, self.stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no event within {EVENT_TIMEOUT:?}; replica: {:?}; invalid: {:?}",
                    self.state.keys(),
                    self.invalid
                )
            })
            .expect("stream error")
            .expect("stream ended");
        let event = HubWatchEvent::try_from(message).expect("well-formed event");
        match event.change {
            WatchChange::SnapshotBegin(_) => {
                self.in_snapshot = true;
                self.state.clear();
                self.invalid.clear();
            }
            WatchChange::SnapshotEnd => self.in_snapshot = false,
            WatchChange::Applied(object) => {
                self.invalid.remove(&object.object_ref());
                self.state.insert(object.object_ref(), object);
            }
            WatchChange::Deleted(object) => {
                self.state.remove(&object);
                self.invalid.remove(&object);
            }
            WatchChange::Invalid { object, reason, .. } => {
                self.invalid.insert(object, reason);
            }
        }
    }

    /// Reads events until the replica holds `count` valid objects.
    async fn wait_for(&mut self, count: usize) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while self.state.len() < count || self.in_snapshot {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {count} objects; replica: {:?}; invalid: {:?}",
                self.state.keys(),
                self.invalid
            );
            self.next().await;
        }
    }
}

// ---- fixtures ---------------------------------------------------------------------------------

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/smi-api/tests/fixtures")
}

/// One object of a fixture file, as written to the cluster, and its expected hub form.
struct Case {
    /// `<file>#<document>` for messages.
    origin: String,
    manifest: Value,
    expected: SmiObject,
}

/// Every document of `file`, moved into `namespace`; the hub objects come from
/// `decode_manifests` on the unmodified file text.
fn cases_of(file: &Path, namespace: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    let decoded: Vec<SmiObject> = decode_manifests(&text)
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{name}: a valid fixture fails to decode: {e}")))
        .collect();
    let documents: Vec<Value> = text
        .split("\n---\n")
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap())
        .filter(|d| !d.is_null())
        .collect();
    assert_eq!(
        documents.len(),
        decoded.len(),
        "{name}: one hub object per document"
    );
    documents
        .into_iter()
        .zip(decoded)
        .enumerate()
        .map(|(index, (mut manifest, mut expected))| {
            manifest["metadata"]["namespace"] = json!(namespace);
            expected.meta_mut().namespace = namespace.to_string();
            Case {
                origin: format!("{name}#{}", index + 1),
                manifest,
                expected,
            }
        })
        .collect()
}

fn resource(kind: SmiKind, version: &str) -> ApiResource {
    ApiResource {
        group: kind.group().into(),
        version: version.into(),
        api_version: format!("{}/{version}", kind.group()),
        kind: kind.as_str().into(),
        plural: kind.plural().into(),
    }
}

fn kind_and_version(manifest: &Value) -> (SmiKind, String) {
    let kind = SmiKind::from_kind(manifest["kind"].as_str().unwrap()).expect("an SMI kind");
    let api_version = manifest["apiVersion"].as_str().unwrap();
    let (_, version) = api_version.split_once('/').unwrap();
    (kind, version.to_string())
}

fn api(client: &kube::Client, kind: SmiKind, version: &str, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &resource(kind, version))
}

async fn create(client: &kube::Client, manifest: &Value) {
    let (kind, version) = kind_and_version(manifest);
    let namespace = manifest["metadata"]["namespace"].as_str().unwrap();
    let object: DynamicObject = serde_json::from_value(manifest.clone()).unwrap();
    api(client, kind, &version, namespace)
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating {manifest}: {e}"));
}

/// Reads an object as `version`; the JSON form without server-set metadata.
async fn read_as(
    client: &kube::Client,
    kind: SmiKind,
    version: &str,
    namespace: &str,
    name: &str,
) -> Result<Value, kube::Error> {
    let object = api(client, kind, version, namespace).get(name).await?;
    let mut value = serde_json::to_value(&object).unwrap();
    let metadata = value["metadata"].as_object_mut().unwrap();
    for key in SERVER_SET_METADATA {
        metadata.remove(key);
    }
    Ok(value)
}

/// The hub object without what the cluster sets or the reading version determines.
fn without_server_meta(mut object: SmiObject) -> SmiObject {
    let meta = object.meta_mut();
    meta.uid = None;
    meta.resource_version = None;
    meta.generation = None;
    meta.api_version = String::new();
    object
}

/// split v1alpha1 weights are Kubernetes Quantities, whose canonical (serialized) form is a
/// string: `weight: 1` reads back as `"1"`, as it would from the SMI Go types.
fn quantities_as_strings(manifest: &Value) -> Value {
    let mut manifest = manifest.clone();
    if manifest["apiVersion"] == "split.smi-spec.io/v1alpha1"
        && let Some(backends) = manifest["spec"]["backends"].as_array_mut()
    {
        for backend in backends {
            if let Some(n) = backend["weight"].as_number() {
                backend["weight"] = json!(n.to_string());
            }
        }
    }
    manifest
}

fn name_of(manifest: &Value) -> &str {
    manifest["metadata"]["name"].as_str().unwrap()
}

// ---- tests ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_of_every_version_round_trips_through_the_api_server_and_the_watcher() {
    let cluster = Cluster::start().await;
    let client = cluster.client();

    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures_dir().join("valid"))
        .expect("fixtures/valid")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        11,
        "one fixture file per version of each group: {files:?}"
    );
    let mut cases = Vec::new();
    for file in &files {
        // `access-v1alpha1.yaml` -> namespace `access-v1alpha1` (a DNS label).
        let namespace = file.file_stem().unwrap().to_string_lossy().to_string();
        cases.extend(cases_of(file, &namespace));
    }
    let versions_written: std::collections::BTreeSet<(SmiKind, String)> = cases
        .iter()
        .map(|c| kind_and_version(&c.manifest))
        .collect();
    let every_served: usize = SmiKind::ALL.iter().map(|k| served_versions(*k).len()).sum();
    assert_eq!(
        versions_written.len(),
        every_served,
        "the fixtures cover every served kind/version: {versions_written:?}"
    );

    for case in &cases {
        create(&client, &case.manifest).await;
    }

    let (mut cross_version_reads, mut refused_reads) = (0, 0);
    for case in &cases {
        let (kind, own_version) = kind_and_version(&case.manifest);
        let namespace = case.expected.meta().namespace.clone();
        let name = name_of(&case.manifest);

        // (a) its own version gives back exactly what was written.
        let read = read_as(&client, kind, &own_version, &namespace, name)
            .await
            .unwrap_or_else(|e| panic!("{}: read as {own_version}: {e}", case.origin));
        assert_eq!(
            read,
            quantities_as_strings(&case.manifest),
            "{}: read back through its own version ({own_version})",
            case.origin
        );

        // Every other served version: readable exactly when that version can express the
        // object, and then the same hub object.
        for version in served_versions(kind) {
            if *version == own_version {
                continue;
            }
            let api_version = format!("{}/{version}", kind.group());
            let expressible = encode_object(&case.expected, &api_version);
            let read = read_as(&client, kind, version, &namespace, name).await;
            match (expressible, read) {
                (Ok(_), Ok(read)) => {
                    assert_eq!(read["apiVersion"], json!(api_version), "{}", case.origin);
                    let hub = decode_object(&read).unwrap_or_else(|e| {
                        panic!(
                            "{}: read as {version} does not decode: {e}\n{read}",
                            case.origin
                        )
                    });
                    assert_eq!(
                        without_server_meta(hub),
                        without_server_meta(case.expected.clone()),
                        "{}: read as {version}",
                        case.origin
                    );
                    cross_version_reads += 1;
                }
                (Err(why), Ok(read)) => panic!(
                    "{}: {api_version} cannot express it ({why}), yet the server returned {read}",
                    case.origin
                ),
                (Ok(_), Err(e)) => {
                    panic!("{}: read as {api_version} failed: {e}", case.origin)
                }
                (Err(_), Err(kube::Error::Api(status))) => {
                    // The webhook's refusal reaches the client as a server error naming the field.
                    assert_eq!(status.code, 500, "{}: {status:?}", case.origin);
                    assert!(
                        status.message.contains("conversion webhook"),
                        "{}: {status:?}",
                        case.origin
                    );
                    refused_reads += 1;
                }
                (Err(_), Err(e)) => panic!("{}: unexpected error {e}", case.origin),
            }
        }
    }
    // Which reads are refused depends on what conversion can carry in annotations; the
    // expectation above follows `encode_object`, so either count may change with it.
    assert!(cross_version_reads > 0);
    println!("{cross_version_reads} reads through another version, {refused_reads} refused");

    // (b) the watcher's stream carries each object as decode_manifests reads the fixture.
    let mut replica = cluster.subscribe().await;
    replica.wait_for(cases.len()).await;
    assert!(
        replica.invalid.is_empty(),
        "invalid objects: {:?}",
        replica.invalid
    );
    assert_eq!(replica.state.len(), cases.len());
    for case in &cases {
        let delivered = replica
            .state
            .get(&case.expected.object_ref())
            .unwrap_or_else(|| panic!("{}: not on the stream", case.origin));
        let meta = delivered.meta();
        assert!(meta.uid.is_some(), "{}: uid from the server", case.origin);
        assert!(meta.resource_version.is_some(), "{}", case.origin);
        assert_eq!(
            without_server_meta(delivered.clone()),
            without_server_meta(case.expected.clone()),
            "{}: delivered by the watcher",
            case.origin
        );
    }
    cluster.stop().await;
}

/// The issue's requirement: the Consul announcement's v1alpha1 example (fields at the top
/// level, `specs` instead of `rules`) and a v1alpha3 TrafficTarget in the same cluster are
/// both read correctly, through either endpoint and through the watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcement_v1alpha1_and_v1alpha3_side_by_side() {
    let cluster = Cluster::start().await;
    let client = cluster.client();
    let namespace = "default";
    let mut cases = cases_of(
        &fixtures_dir().join("consul-announcement-v1alpha1.yaml"),
        namespace,
    );
    assert_eq!(
        cases.len(),
        2,
        "the announcement: a TCPRoute and a TrafficTarget"
    );
    let v1alpha3 = json!({
        "apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
        "metadata": {"name": "counting-from-web", "namespace": namespace},
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": "counting", "namespace": "default"},
            "rules": [{"kind": "TCPRoute", "name": "counting-tcp-route"}],
            "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": "default"}],
        }
    });
    cases.push(Case {
        origin: "inline v1alpha3 TrafficTarget".into(),
        expected: decode_object(&v1alpha3).expect("the v1alpha3 TrafficTarget decodes"),
        manifest: v1alpha3,
    });
    for case in &cases {
        create(&client, &case.manifest).await;
    }

    for case in &cases {
        let (kind, own_version) = kind_and_version(&case.manifest);
        let name = name_of(&case.manifest);
        let own = read_as(&client, kind, &own_version, namespace, name)
            .await
            .unwrap();
        assert_eq!(own, case.manifest, "{}", case.origin);
        // Both shapes of the TrafficTarget: v1alpha1 (top level, `specs`) and v1alpha3.
        for version in ["v1alpha1", "v1alpha3"] {
            let read = read_as(&client, kind, version, namespace, name)
                .await
                .unwrap_or_else(|e| panic!("{}: read as {version}: {e}", case.origin));
            let hub = decode_object(&read)
                .unwrap_or_else(|e| panic!("{}: as {version}: {e}\n{read}", case.origin));
            assert_eq!(
                without_server_meta(hub),
                without_server_meta(case.expected.clone()),
                "{}: read as {version}",
                case.origin
            );
        }
    }
    let old = read_as(
        &client,
        SmiKind::TrafficTarget,
        "v1alpha1",
        namespace,
        "counting-from-web",
    )
    .await
    .unwrap();
    assert_eq!(old["specs"][0]["name"], "counting-tcp-route", "{old}");
    assert!(old.get("spec").is_none(), "v1alpha1 has no spec: {old}");
    let new = read_as(
        &client,
        SmiKind::TrafficTarget,
        "v1alpha3",
        namespace,
        "counting-traffic-target",
    )
    .await
    .unwrap();
    assert_eq!(new["spec"]["sources"][0]["name"], "dashboard", "{new}");

    let mut replica = cluster.subscribe().await;
    replica.wait_for(cases.len()).await;
    assert!(replica.invalid.is_empty(), "{:?}", replica.invalid);
    for case in &cases {
        let delivered = replica.state.get(&case.expected.object_ref()).unwrap();
        assert_eq!(
            without_server_meta(delivered.clone()),
            without_server_meta(case.expected.clone()),
            "{}",
            case.origin
        );
    }
    // Both TrafficTargets allow their source to reach `counting` over the same TCPRoute.
    for (name, source) in [
        ("counting-traffic-target", "dashboard"),
        ("counting-from-web", "web"),
    ] {
        match replica
            .state
            .get(&ObjectRef::new(SmiKind::TrafficTarget, namespace, name))
        {
            Some(SmiObject::TrafficTarget(t)) => {
                assert_eq!(t.destination.name, "counting");
                assert_eq!(t.sources[0].name, source);
                assert_eq!(t.rules.len(), 1);
                assert_eq!(t.rules[0].kind, RuleKind::TCPRoute);
                assert_eq!(t.rules[0].name, "counting-tcp-route");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    cluster.stop().await;
}
