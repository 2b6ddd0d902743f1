//! The harness-agnostic e2e environment: a kube client, a Consul endpoint, and a way to
//! restart components. Two harnesses provide it:
//! - local (CI): real etcd + API server, a real Consul dev agent and the three services as
//!   processes, all started here;
//! - external (kind): `CONSUL_SMI_E2E_KUBECONFIG` and `CONSUL_SMI_E2E_CONSUL_ADDR` point at a
//!   cluster where consul-smi and Consul already run (`cargo xtask e2e-kind` sets them).
//!
//! The suite in `tests/tests/e2e.rs` only talks to this type, so one code path serves both.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use consul_smi_api::{CrdConversion, SmiKind, WebhookTarget};
use consul_smi_consul::{ApiFlavor, Call, ConsulClient, ConsulConfig};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::ApiResource;

use crate::consul::{ConsulAgent, ConsulAgentOptions, ConsulRelease};
use crate::kube::KubeApiServer;
use crate::proxy::FaultProxy;
use crate::services::{Pipeline, PipelineOptions, Service, Source, free_addr};

/// What a case can restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Service(Service),
    Consul,
    ApiServer,
}

/// One intention as Consul reports it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IntentionRow {
    pub source: String,
    pub destination: String,
    pub action: String,
    pub owned: bool,
}

/// Fields drop in order: the services stop before the components they talk to.
struct Local {
    pipeline: Pipeline,
    consul_proxy: Option<FaultProxy>,
    consul: ConsulAgent,
    apiserver: KubeApiServer,
}

pub struct E2eEnv {
    pub kube: kube::Client,
    consul: ConsulClient,
    local: Option<Local>,
}

#[derive(Clone, Debug, Default)]
pub struct LocalOptions {
    /// Extra translator flags, e.g. `--consul-api modern`.
    pub translator_args: Vec<String>,
    /// Extra environment for every service.
    pub env: Vec<(String, String)>,
    /// Start the translator with `--kube-events` against the local API server.
    pub kube_events: bool,
    /// Extra writer flags, e.g. `--admin-listen 127.0.0.1:PORT`.
    pub writer_args: Vec<String>,
    /// The writer reaches Consul through a [`FaultProxy`] (`E2eEnv::consul_proxy`).
    pub consul_proxy: bool,
    /// The translator reaches the watcher and the writer through [`FaultProxy`]s
    /// (`E2eEnv::link_proxy`).
    pub link_proxies: bool,
    /// Which Consul the local harness starts (`None`: `CONSUL_SMI_CONSUL`, else 1.8.7).
    pub consul: Option<ConsulRelease>,
}

impl LocalOptions {
    /// Defaults, on the Consul a test binary's crate name selects
    /// ([`ConsulRelease::for_test_target`]); pass `env!("CARGO_CRATE_NAME")`.
    pub fn for_test_target(crate_name: &str) -> Result<LocalOptions> {
        Ok(LocalOptions {
            consul: Some(ConsulRelease::for_test_target(crate_name)?),
            ..LocalOptions::default()
        })
    }
}

impl E2eEnv {
    /// External when `CONSUL_SMI_E2E_KUBECONFIG` is set, else a fresh local environment.
    pub async fn start() -> Result<E2eEnv> {
        Self::start_with(LocalOptions::default()).await
    }

    pub async fn start_with(options: LocalOptions) -> Result<E2eEnv> {
        consul_smi_consul::install_crypto_provider();
        match std::env::var_os("CONSUL_SMI_E2E_KUBECONFIG") {
            Some(kubeconfig) => Self::external(PathBuf::from(kubeconfig)).await,
            None => Self::local(options).await,
        }
    }

    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    async fn external(kubeconfig: PathBuf) -> Result<E2eEnv> {
        let consul_addr = std::env::var("CONSUL_SMI_E2E_CONSUL_ADDR")
            .context("CONSUL_SMI_E2E_CONSUL_ADDR must be set with CONSUL_SMI_E2E_KUBECONFIG")?;
        let config = kube::config::Kubeconfig::read_from(&kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(config, &Default::default()).await?;
        let kube = kube::Client::try_from(config)?;
        let mut consul_config = ConsulConfig::for_address(consul_addr);
        consul_config.token = std::env::var("CONSUL_SMI_E2E_CONSUL_TOKEN").ok();
        Ok(E2eEnv {
            kube,
            consul: ConsulClient::new(&consul_config)?,
            local: None,
        })
    }

    async fn local(options: LocalOptions) -> Result<E2eEnv> {
        let apiserver = KubeApiServer::start()
            .await
            .context("starting the local API server")?;
        let release = match options.consul {
            Some(release) => release,
            None => ConsulRelease::from_env()?,
        };
        let consul = ConsulAgent::start(ConsulAgentOptions::default().on(release))
            .with_context(|| format!("starting Consul ({release:?})"))?;
        let cert = apiserver.issue_serving_cert("watcher-webhook")?;
        let consul_proxy = match options.consul_proxy {
            true => Some(FaultProxy::start(consul.http_addr().parse()?).await?),
            false => None,
        };
        let mut pipeline_options = PipelineOptions::new(
            Source::Kube {
                kubeconfig: apiserver.kubeconfig_path(),
            },
            match &consul_proxy {
                Some(proxy) => proxy.addr().to_string(),
                None => consul.http_addr(),
            },
        );
        pipeline_options.link_proxies = options.link_proxies;
        pipeline_options.translator_args = options.translator_args;
        pipeline_options.writer_args = options.writer_args;
        if options.kube_events {
            pipeline_options.translator_args.extend([
                "--kube-events".to_string(),
                "--kubeconfig".to_string(),
                apiserver.kubeconfig_path().display().to_string(),
            ]);
        }
        pipeline_options.env = options.env;

        // The conversion webhook's port is named in the CRDs before the watcher binds it, so a
        // process of a parallel test can take it first; then the watcher cannot start, and
        // the CRDs are installed again with a new port.
        let mut attempt = 0;
        let pipeline = loop {
            attempt += 1;
            let webhook_addr = free_addr()?;
            let crds = consul_smi_api::crds(&CrdConversion::Webhook {
                client_config: WebhookTarget::Url(format!("https://{webhook_addr}/convert")),
                ca_bundle_pem: Some(cert.ca_pem.clone()),
            });
            apiserver
                .install_crds(&crds)
                .await
                .context("installing the SMI CRDs")?;
            let mut attempt_options = pipeline_options.clone();
            attempt_options.watcher_args = vec![
                "--webhook-listen".into(),
                webhook_addr.to_string(),
                "--webhook-cert".into(),
                cert.cert_path.display().to_string(),
                "--webhook-key".into(),
                cert.key_path.display().to_string(),
            ];
            match Pipeline::start(attempt_options).await {
                Ok(pipeline) => break pipeline,
                Err(error) if attempt < 3 => eprintln!(
                    "e2e harness: the services did not start (attempt {attempt}), retrying \
                     with a new webhook port: {error:#}"
                ),
                Err(error) => return Err(error.context("starting the consul-smi services")),
            }
        };
        let kube = apiserver.client();
        let consul_client = ConsulClient::new(&ConsulConfig::for_address(consul.http_addr()))?;
        let env = E2eEnv {
            kube,
            consul: consul_client,
            local: Some(Local {
                apiserver,
                consul,
                consul_proxy,
                pipeline,
            }),
        };
        env.operator_default_deny().await?;
        Ok(env)
    }

    /// Without ACLs a dev agent allows everything no intention denies, which would make
    /// `/v1/connect/intentions/check` useless as an oracle. An operator-style `* -> *` deny
    /// (not owned by consul-smi, as in a real cluster) makes only granted pairs allowed.
    async fn operator_default_deny(&self) -> Result<()> {
        self.create_foreign_intention("*", "*", "deny").await
    }

    pub fn pipeline(&self) -> Option<&Pipeline> {
        self.local.as_ref().map(|l| &l.pipeline)
    }

    pub fn consul_agent(&self) -> Option<&ConsulAgent> {
        self.local.as_ref().map(|l| &l.consul)
    }

    /// The proxy between the writer and Consul (`LocalOptions::consul_proxy`).
    pub fn consul_proxy(&self) -> Option<&FaultProxy> {
        self.local.as_ref().and_then(|l| l.consul_proxy.as_ref())
    }

    /// The proxy between the translator and `service` (`LocalOptions::link_proxies`).
    pub fn link_proxy(&self, service: Service) -> Option<&FaultProxy> {
        self.local
            .as_ref()
            .and_then(|l| l.pipeline.link_proxy(service))
    }

    /// The local API server (etcd stays up when it is stopped).
    pub fn apiserver(&mut self) -> Option<&mut KubeApiServer> {
        self.local.as_mut().map(|l| &mut l.apiserver)
    }

    /// Applies every document of a multi-document SMI manifest (server-side apply).
    pub async fn apply(&self, yaml: &str) -> Result<()> {
        for document in split_documents(yaml)? {
            let (api, name) = self.api_for(&document)?;
            let params = PatchParams::apply("consul-smi-e2e").force();
            let patch = Patch::Apply(&document);
            retry_transient(|| api.patch(&name, &params, &patch))
                .await
                .with_context(|| format!("applying {name}"))?;
        }
        Ok(())
    }

    /// Deletes every object a manifest names.
    pub async fn delete(&self, yaml: &str) -> Result<()> {
        for document in split_documents(yaml)? {
            let (api, name) = self.api_for(&document)?;
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("deleting {name}")),
            }
        }
        Ok(())
    }

    fn api_for(&self, document: &serde_json::Value) -> Result<(Api<DynamicObject>, String)> {
        let api_version = document["apiVersion"]
            .as_str()
            .context("document without apiVersion")?;
        let kind_name = document["kind"].as_str().context("document without kind")?;
        let kind = SmiKind::from_kind(kind_name)
            .with_context(|| format!("not an SMI kind: {kind_name}"))?;
        let (group, version) = api_version
            .split_once('/')
            .context("apiVersion without group")?;
        let resource = ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: api_version.into(),
            kind: kind_name.into(),
            plural: kind.plural().into(),
        };
        let namespace = document["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let name = document["metadata"]["name"]
            .as_str()
            .context("document without metadata.name")?;
        Ok((
            Api::namespaced_with(self.kube.clone(), namespace, &resource),
            name.to_string(),
        ))
    }

    /// Consul's intentions.
    pub async fn intentions(&self) -> Result<BTreeSet<IntentionRow>> {
        let list: Vec<serde_json::Value> = if self.consul.flavor().await? == ApiFlavor::Modern {
            let call = Call::new(
                reqwest::Method::GET,
                "/v1/config/service-intentions",
                "list service-intentions",
            );
            let entries: Option<Vec<serde_json::Value>> = self.consul.get_json(call).await?;
            crate::oracle::intention_rows(&entries.unwrap_or_default())
        } else {
            let call = Call::new(
                reqwest::Method::GET,
                "/v1/connect/intentions",
                "list intentions",
            );
            self.consul.get_json(call).await?
        };
        Ok(list
            .iter()
            .map(|i| IntentionRow {
                source: i["SourceName"].as_str().unwrap_or_default().to_string(),
                destination: i["DestinationName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                action: i["Action"].as_str().unwrap_or_default().to_string(),
                owned: crate::oracle::is_owned(i),
            })
            .collect())
    }

    /// Consul's own verdict for a connection source → destination.
    pub async fn allowed(&self, source: &str, destination: &str) -> Result<bool> {
        let call = Call::new(
            reqwest::Method::GET,
            "/v1/connect/intentions/check",
            "check intention",
        )
        .query("source", source)
        .query("destination", destination);
        let verdict: serde_json::Value = self.consul.get_json(call).await?;
        verdict["Allowed"]
            .as_bool()
            .context("check answer without Allowed")
    }

    /// A config entry, if present.
    pub async fn config_entry(&self, kind: &str, name: &str) -> Result<Option<serde_json::Value>> {
        let call = Call::new(
            reqwest::Method::GET,
            format!("/v1/config/{kind}/{name}"),
            "read config entry",
        );
        match self.consul.get_json::<serde_json::Value>(call).await {
            Ok(entry) => Ok(Some(entry)),
            Err(consul_smi_consul::ConsulError::NotFound { .. }) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Writes an intention the way an operator would (not owned by consul-smi): on 1.9+ as a
    /// source in the destination's `service-intentions` entry (`consul config write`; the
    /// legacy endpoint refuses a destination whose entry was edited as a config entry), before
    /// 1.9 through the intentions API.
    pub async fn create_foreign_intention(
        &self,
        source: &str,
        destination: &str,
        action: &str,
    ) -> Result<()> {
        if self.consul.flavor().await? == ApiFlavor::Modern {
            return self.add_foreign_source(source, destination, action).await;
        }
        let body = serde_json::json!({"SourceName": source, "DestinationName": destination, "Action": action, "Description": "operator"});
        let call = Call::new(
            reqwest::Method::POST,
            "/v1/connect/intentions",
            "create foreign intention",
        )
        .json(&body)?;
        self.consul.send(call).await?;
        Ok(())
    }

    /// Read-modify-write of a `service-intentions` entry with `?cas=`, retried on a lost race
    /// (consul-smi may write the same entry at the same time).
    async fn add_foreign_source(
        &self,
        source: &str,
        destination: &str,
        action: &str,
    ) -> Result<()> {
        const READ_ONLY: &[&str] = &["CreateIndex", "ModifyIndex", "Hash"];
        const SOURCE_READ_ONLY: &[&str] = &[
            "Precedence",
            "LegacyID",
            "LegacyCreateTime",
            "LegacyUpdateTime",
        ];
        for _ in 0..10 {
            let (mut entry, index) = match self
                .config_entry("service-intentions", destination)
                .await?
            {
                Some(entry) => {
                    let index = entry["ModifyIndex"]
                        .as_u64()
                        .context("entry without ModifyIndex")?;
                    (entry, index)
                }
                None => (
                    serde_json::json!({"Kind": "service-intentions", "Name": destination, "Sources": []}),
                    0,
                ),
            };
            let object = entry.as_object_mut().context("entry is not an object")?;
            for key in READ_ONLY {
                object.remove(*key);
            }
            let sources = object
                .get_mut("Sources")
                .and_then(|s| s.as_array_mut())
                .context("entry without Sources")?;
            for existing in sources.iter_mut().filter_map(|s| s.as_object_mut()) {
                for key in SOURCE_READ_ONLY {
                    existing.remove(*key);
                }
            }
            sources.retain(|s| s["Name"] != source);
            sources.push(
                serde_json::json!({"Name": source, "Action": action, "Description": "operator"}),
            );
            let call = Call::new(reqwest::Method::PUT, "/v1/config", "write foreign source")
                .query("cas", index.to_string())
                .json(&entry)?;
            let reply = self.consul.send(call).await?;
            if String::from_utf8_lossy(&reply.body).trim() == "true" {
                return Ok(());
            }
        }
        anyhow::bail!("writing {source} -> {destination} lost the CAS race ten times")
    }

    /// Kills and restarts a component: processes locally; pods in kind (the API server of a
    /// kind cluster cannot be restarted from here).
    pub async fn restart(&mut self, component: Component) -> Result<()> {
        let Some(local) = self.local.as_mut() else {
            return match component {
                Component::Service(service) => {
                    self.delete_pods("consul-smi", deployment_name(service))
                        .await
                }
                Component::Consul => self.delete_pods("consul", "consul").await,
                Component::ApiServer => bail!("the kind harness cannot restart the API server"),
            };
        };
        match component {
            Component::Service(service) => local.pipeline.restart(service).await?,
            Component::Consul => {
                local.consul.restart()?;
                self.operator_default_deny().await?;
            }
            Component::ApiServer => local.apiserver.restart().await?,
        }
        Ok(())
    }

    /// SIGKILL locally; scale to zero in kind.
    pub async fn kill(&mut self, service: Service) -> Result<()> {
        match self.local.as_mut() {
            Some(local) => local.pipeline.kill(service).await,
            None => self.scale(service, 0).await,
        }
    }

    /// Kills the local Consul agent (its data directory stays) until `start_consul`.
    pub fn stop_consul(&mut self) -> Result<()> {
        match self.local.as_mut() {
            Some(local) => {
                local.consul.stop();
                Ok(())
            }
            None => bail!("stop_consul needs the local harness (unset CONSUL_SMI_E2E_KUBECONFIG)"),
        }
    }

    /// Starts the local Consul agent again on the same ports and data after `stop_consul`.
    pub async fn start_consul(&mut self) -> Result<()> {
        match self.local.as_mut() {
            Some(local) => local.consul.restart()?,
            None => bail!("start_consul needs the local harness (unset CONSUL_SMI_E2E_KUBECONFIG)"),
        }
        self.operator_default_deny().await
    }

    /// SIGTERM to a local service process and its exit status (see `Pipeline::terminate`).
    pub async fn terminate(
        &mut self,
        service: Service,
        grace: Duration,
    ) -> Result<std::process::ExitStatus> {
        match self.local.as_mut() {
            Some(local) => local.pipeline.terminate(service, grace).await,
            None => bail!("terminate needs the local harness (unset CONSUL_SMI_E2E_KUBECONFIG)"),
        }
    }

    pub async fn start_service(&mut self, service: Service) -> Result<()> {
        match self.local.as_mut() {
            Some(local) => local.pipeline.start_service(service).await,
            None => self.scale(service, 1).await,
        }
    }

    async fn scale(&self, service: Service, replicas: i32) -> Result<()> {
        use k8s_openapi::api::apps::v1::Deployment;
        let api: Api<Deployment> = Api::namespaced(self.kube.clone(), "consul-smi");
        let patch = serde_json::json!({"spec": {"replicas": replicas}});
        api.patch(
            deployment_name(service),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .with_context(|| format!("scaling {} to {replicas}", deployment_name(service)))?;
        Ok(())
    }

    async fn delete_pods(&self, namespace: &str, app: &str) -> Result<()> {
        use k8s_openapi::api::core::v1::Pod;
        let api: Api<Pod> = Api::namespaced(self.kube.clone(), namespace);
        let selector =
            kube::api::ListParams::default().labels(&format!("app.kubernetes.io/name={app}"));
        api.delete_collection(&DeleteParams::default(), &selector)
            .await
            .with_context(|| format!("deleting pods of {app} in {namespace}"))?;
        Ok(())
    }

    /// `Config.Version` of the Consul agent the suite talks to.
    pub async fn consul_version(&self) -> Result<String> {
        let call = Call::new(reqwest::Method::GET, "/v1/agent/self", "read agent");
        let agent: serde_json::Value = self.consul.get_json(call).await?;
        Ok(agent["Config"]["Version"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }
}

fn deployment_name(service: Service) -> &'static str {
    match service {
        Service::Watcher => "smi-watcher",
        Service::Translator => "smi-translator",
        Service::Writer => "consul-writer",
    }
}

fn split_documents(yaml: &str) -> Result<Vec<serde_json::Value>> {
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml)
        .map_err(|e| anyhow::anyhow!("parsing test manifest: {e}"))?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

/// Right after a CRD appears, or while the API server restarts, writes may fail briefly.
async fn retry_transient<T, F, Fut>(mut operation: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match operation().await {
            Err(error) if Instant::now() < deadline && is_transient(&error) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            result => return result,
        }
    }
}

fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        _ => true,
    }
}

/// Polls `check` until it returns `Ok(true)`; the error names what was awaited and the last
/// observation.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => "condition false".to_string(),
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
