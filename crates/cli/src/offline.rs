//! Tools that need no cluster: `validate`, `plan`, and the `diagnostics` client.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use consul_smi_api::{ObjectRef, SmiKind, SmiObject};
use consul_smi_consul::Ownership;
use consul_smi_consul::entries::ServiceIntentionsEntry;
use consul_smi_core::{
    Action, Command, DesiredState, Intention, IntentionKey, IntentionRule, ServiceName,
};
use consul_smi_grpc::v1;
use consul_smi_telemetry::escape_control;
use consul_smi_translate::{ConsulApi, Severity, diff, translate};
use consul_smi_translator::{ConsulApiArg, TranslateArgs};

#[derive(clap::Args)]
pub struct ValidateArgs {
    /// Manifest files or directories (every *.yaml / *.yml inside, recursively).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    translate: TranslateArgs,
}

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Manifest files or directories describing the desired SMI objects.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Manifests of the current state (e.g. the main branch) to plan against; default: nothing.
    #[arg(long = "from", conflicts_with = "live")]
    from: Vec<PathBuf>,
    /// Plan against the intentions a live Consul holds (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, ...),
    /// and show which keys are held by objects consul-smi does not own (conflicts).
    #[arg(long)]
    live: bool,
    /// The writer id whose objects count as owned (`--writer-id` of consul-writer).
    #[arg(long, env = "CONSUL_SMI_WRITER_ID", default_value = "consul-smi")]
    writer_id: String,
    #[command(flatten)]
    translate: TranslateArgs,
}

#[derive(clap::Args)]
pub struct DiagnosticsArgs {
    /// smi-translator gRPC endpoint.
    #[arg(
        long,
        env = "CONSUL_SMI_TRANSLATOR_ADDR",
        default_value = "http://127.0.0.1:7402"
    )]
    translator: String,
    /// Only this object, as Kind/namespace/name (e.g. TrafficTarget/default/api-clients).
    object: Option<String>,
    /// mTLS to a translator that requires it: a certificate signed by the services' CA.
    #[command(flatten)]
    tls: consul_smi_grpc::tls::ClientTlsArgs,
}

/// Every YAML file under `paths`, sorted, so output is stable.
fn manifest_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            for entry in
                std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))?
            {
                walk(&entry?.path(), out)?;
            }
        } else if meta.is_file()
            && path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e == "yaml" || e == "yml")
        {
            out.push(path.to_path_buf());
        }
        Ok(())
    }
    let mut files = Vec::new();
    for path in paths {
        if std::fs::metadata(path)
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            files.push(path.clone());
        } else {
            walk(path, &mut files)?;
        }
    }
    files.sort();
    Ok(files)
}

/// Decodes every document; problems are returned as printable lines naming file and field.
fn load(paths: &[PathBuf]) -> Result<(Vec<SmiObject>, Vec<String>)> {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for file in manifest_files(paths)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for result in consul_smi_api::decode_manifests(&text) {
            match result {
                Ok(object) => objects.push(object),
                Err(error) => problems.push(format!("{}: {error}", file.display())),
            }
        }
    }
    Ok((objects, problems))
}

/// Prints every object's status; returns whether there were no errors.
pub fn validate(args: &ValidateArgs) -> Result<bool> {
    let (objects, problems) = load(&args.paths)?;
    for problem in &problems {
        println!("error   {problem}");
    }
    let translation = translate(&objects, &args.translate.options());
    let mut errors = problems.len();
    let mut refs: Vec<ObjectRef> = objects.iter().map(SmiObject::object_ref).collect();
    refs.sort();
    refs.dedup();
    for object in &refs {
        let diagnostics: Vec<_> = translation
            .diagnostics
            .iter()
            .filter(|d| &d.object == object)
            .collect();
        if diagnostics.is_empty() {
            println!("ok      {object}");
        }
        for diagnostic in diagnostics {
            let label = match diagnostic.severity {
                Severity::Warning => "warning",
                Severity::Error => {
                    errors += 1;
                    "error  "
                }
            };
            println!(
                "{label} {object} {}: {} ({})",
                diagnostic.field, diagnostic.message, diagnostic.code
            );
        }
    }
    println!(
        "{} object(s), {} intention(s), {} splitter(s), {errors} error(s)",
        refs.len(),
        translation.state.intentions.len(),
        translation.state.splitters.len()
    );
    Ok(errors == 0)
}

pub async fn plan(args: &PlanArgs) -> Result<()> {
    let mut options = args.translate.options();
    if args.live && args.translate.consul_api == ConsulApiArg::Auto {
        options.target = live_consul_api().await?;
    }
    let (objects, problems) = load(&args.paths)?;
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("error   {problem}");
        }
        bail!(
            "{} manifest document(s) could not be decoded",
            problems.len()
        );
    }
    let next = translate(&objects, &options);
    let mut conflicts = Vec::new();
    let previous: DesiredState = if args.live {
        let (owned, foreign) = live_intentions(&args.writer_id).await?;
        conflicts = foreign
            .into_iter()
            .filter(|(key, _)| next.state.intentions.contains_key(key))
            .collect();
        // Only intentions are read back; splitters and service-defaults are planned as if new.
        DesiredState {
            intentions: owned,
            ..DesiredState::default()
        }
    } else if args.from.is_empty() {
        DesiredState::default()
    } else {
        let (old_objects, old_problems) = load(&args.from)?;
        if !old_problems.is_empty() {
            for problem in &old_problems {
                eprintln!("error   {problem}");
            }
            bail!(
                "{} document(s) of --from could not be decoded",
                old_problems.len()
            );
        }
        translate(&old_objects, &options).state
    };
    let commands = diff(&previous, &next.state);
    for (key, holder) in &conflicts {
        println!(
            "! conflict: intention {key} is held by {holder}; consul-writer will leave it and report it"
        );
    }
    if commands.is_empty() {
        println!("No changes.");
    }
    for command in &commands {
        println!("{}", describe(command, &previous));
    }
    for diagnostic in next
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
    {
        println!("# not in effect: {diagnostic}");
    }
    Ok(())
}

/// The intentions API the Consul at CONSUL_HTTP_ADDR speaks, as consul-writer detects it.
async fn live_consul_api() -> Result<ConsulApi> {
    use consul_smi_consul::{ApiFlavor, ConsulClient, ConsulConfig};
    consul_smi_consul::install_crypto_provider();
    let client = ConsulClient::new(&ConsulConfig::from_env()?)?;
    let flavor = client
        .flavor()
        .await
        .context("asking Consul which intentions API it speaks (or pass --consul-api)")?;
    Ok(match flavor {
        ApiFlavor::Legacy => ConsulApi::Legacy,
        ApiFlavor::Modern => ConsulApi::Modern,
    })
}

type LiveIntentions = (
    std::collections::BTreeMap<consul_smi_core::IntentionKey, consul_smi_core::Intention>,
    Vec<(consul_smi_core::IntentionKey, String)>,
);

/// Consul's intentions, split into the ones this writer owns (as desired-state entries) and
/// the others (key and who holds it). L7 intentions read back as permissions-less L7 rules,
/// so the plan shows them as updates.
async fn live_intentions(writer_id: &str) -> Result<LiveIntentions> {
    use consul_smi_consul::{ApiFlavor, ConsulClient, ConsulConfig, Owner};
    consul_smi_consul::install_crypto_provider();
    let client = ConsulClient::new(&ConsulConfig::from_env()?)?;
    let owner = Owner::new(writer_id)?;
    let flavor = client
        .flavor()
        .await
        .context("asking Consul which intentions API it speaks")?;
    let mut live = LiveSorter::default();
    match flavor {
        ApiFlavor::Legacy => {
            let listed = client
                .list_legacy_intentions(None)
                .await
                .context("listing Consul's intentions")?
                .value;
            for intention in listed {
                let key = IntentionKey {
                    source: live_service(&intention.source_ns, &intention.source_name),
                    destination: live_service(
                        &intention.destination_ns,
                        &intention.destination_name,
                    ),
                };
                let ownership = match owner.judge_meta(intention.meta.as_ref()) {
                    Ownership::Foreign => owner.judge_description(&intention.description),
                    judged => judged,
                };
                live.add(key, ownership, &intention.action, intention.description);
            }
        }
        // 1.9+: read the entries themselves; the legacy list view copies each entry's Meta onto
        // its sources and would label an operator's source in our entry as ours.
        ApiFlavor::Modern => {
            let entries = client
                .list_config_entries::<ServiceIntentionsEntry>(false, None)
                .await
                .context("listing Consul's service-intentions entries")?
                .value;
            for entry in entries {
                let destination = entry.namespace.as_deref().unwrap_or_default();
                for source in entry.sources {
                    let key = IntentionKey {
                        source: live_service(
                            source.namespace.as_deref().unwrap_or(destination),
                            &source.name,
                        ),
                        destination: live_service(destination, &entry.name),
                    };
                    let ownership =
                        owner.judge_source(&source.description, source.legacy_meta.as_ref());
                    let action = source.action.as_deref().unwrap_or("L7 permissions");
                    let description = owner.untag_description(&source.description).to_string();
                    live.add(key, ownership, action, description);
                }
            }
        }
    }
    Ok((live.owned, live.foreign))
}

fn live_service(namespace: &str, name: &str) -> ServiceName {
    ServiceName {
        namespace: Some(namespace.to_string()).filter(|ns| !ns.is_empty() && ns != "default"),
        name: name.to_string(),
    }
}

#[derive(Default)]
struct LiveSorter {
    owned: std::collections::BTreeMap<IntentionKey, Intention>,
    foreign: Vec<(IntentionKey, String)>,
}

impl LiveSorter {
    fn add(&mut self, key: IntentionKey, ownership: Ownership, action: &str, description: String) {
        if ownership != Ownership::Ours {
            let holder = format!("{} ({action})", ownership.describe());
            self.foreign.push((key, holder));
            return;
        }
        let rule = match action {
            "allow" => IntentionRule::L4(Action::Allow),
            "deny" => IntentionRule::L4(Action::Deny),
            _ => IntentionRule::L7(Vec::new()),
        };
        let intention = Intention {
            key: key.clone(),
            rule,
            description,
        };
        self.owned.insert(key, intention);
    }
}

fn rule_text(rule: &IntentionRule) -> String {
    match rule {
        IntentionRule::L4(action) => action.as_consul().to_string(),
        IntentionRule::L7(permissions) => {
            let parts: Vec<String> = permissions
                .iter()
                .map(|p| {
                    let path = match &p.http.path {
                        Some(consul_smi_core::PathMatch::Exact(x)) => format!("path={x}"),
                        Some(consul_smi_core::PathMatch::Prefix(x)) => format!("prefix={x}"),
                        Some(consul_smi_core::PathMatch::Regex(x)) => format!("regex={x}"),
                        None => "any path".to_string(),
                    };
                    let methods = if p.http.methods.is_empty() {
                        "any method".to_string()
                    } else {
                        p.http.methods.join(",")
                    };
                    format!("{} {path} {methods}", p.action.as_consul())
                })
                .collect();
            format!("L7 [{}]", parts.join("; "))
        }
    }
}

fn describe(command: &Command, previous: &DesiredState) -> String {
    match command {
        Command::UpsertIntention(intention) => {
            let sign = if previous.intentions.contains_key(&intention.key) {
                "~"
            } else {
                "+"
            };
            format!(
                "{sign} intention {}  {}",
                intention.key,
                rule_text(&intention.rule)
            )
        }
        Command::DeleteIntention(key) => format!("- intention {key}"),
        Command::UpsertSplitter(splitter) => {
            let sign = if previous.splitters.contains_key(&splitter.service) {
                "~"
            } else {
                "+"
            };
            let splits: Vec<String> = splitter
                .splits
                .iter()
                .map(|s| format!("{}={}%", s.service, s.weight))
                .collect();
            format!(
                "{sign} service-splitter {}  {}",
                splitter.service,
                splits.join(" ")
            )
        }
        Command::DeleteSplitter(service) => format!("- service-splitter {service}"),
        Command::UpsertServiceDefaults(defaults) => {
            let sign = if previous.service_defaults.contains_key(&defaults.service) {
                "~"
            } else {
                "+"
            };
            format!(
                "{sign} service-defaults {}  protocol={}",
                defaults.service, defaults.protocol
            )
        }
        Command::DeleteServiceDefaults(service) => {
            format!("- service-defaults {}", display_service(service))
        }
    }
}

fn display_service(service: &ServiceName) -> String {
    service.to_string()
}

fn parse_object_ref(text: &str) -> Result<ObjectRef> {
    let parts: Vec<&str> = text.split('/').collect();
    let [kind, namespace, name] = parts.as_slice() else {
        bail!("object {text:?}: expected Kind/namespace/name");
    };
    let kind = SmiKind::from_kind(kind)
        .with_context(|| format!("object {text:?}: unknown SMI kind {kind:?}"))?;
    Ok(ObjectRef::new(kind, *namespace, *name))
}

pub async fn diagnostics(args: &DiagnosticsArgs) -> Result<()> {
    let object = args.object.as_deref().map(parse_object_ref).transpose()?;
    let endpoint =
        consul_smi_grpc::tls::ClientEndpoint::new(&args.translator, args.tls.connector()?)?
            .configure(|endpoint| endpoint.connect_timeout(std::time::Duration::from_secs(5)));
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to smi-translator at {}", args.translator))?;
    let mut client = v1::translator_diagnostics_client::TranslatorDiagnosticsClient::new(channel);
    let listed = list_pages(&mut client, object.as_ref(), print_statuses).await?;
    if listed == 0 {
        println!("no objects known to the translator");
    }
    Ok(())
}

/// Lists every object page by page (one response holds at most about 1 MiB, so any listing
/// fits gRPC's message limit), handing each page to `on_page`; returns how many objects.
async fn list_pages(
    client: &mut v1::translator_diagnostics_client::TranslatorDiagnosticsClient<
        tonic::transport::Channel,
    >,
    object: Option<&ObjectRef>,
    mut on_page: impl FnMut(Vec<v1::ObjectStatus>),
) -> Result<usize> {
    let mut token = String::new();
    let mut listed = 0;
    loop {
        let page = client
            .list(v1::ListDiagnosticsRequest {
                object: object.map(Into::into),
                page_token: std::mem::take(&mut token),
                ..Default::default()
            })
            .await
            .context("listing diagnostics")?
            .into_inner();
        listed += page.objects.len();
        on_page(page.objects);
        if page.next_page_token.is_empty() {
            return Ok(listed);
        }
        token = page.next_page_token;
    }
}

fn print_statuses(statuses: Vec<v1::ObjectStatus>) {
    for status in statuses {
        let object = status
            .object
            .as_ref()
            .and_then(|o| ObjectRef::try_from(o).ok())
            .map(|o| o.to_string())
            .unwrap_or_else(|| "?".into());
        println!("{:<8} {object}", status.status);
        for d in status.diagnostics {
            let severity = if d.severity == v1::Severity::Error as i32 {
                "error"
            } else {
                "warning"
            };
            // Messages quote SMI objects, which anyone who may write one controls: no
            // terminal escape sequences reach the operator's terminal.
            println!(
                "         {severity} {}: {} ({})",
                escape_control(&d.field),
                escape_control(&d.message),
                d.code
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use consul_smi_grpc::v1;

    use crate::{Cli, Commands};

    /// A translator that pages its objects three at a time.
    struct Pager(Vec<String>);

    #[tonic::async_trait]
    impl v1::translator_diagnostics_server::TranslatorDiagnostics for Pager {
        async fn list(
            &self,
            request: tonic::Request<v1::ListDiagnosticsRequest>,
        ) -> Result<tonic::Response<v1::ListDiagnosticsResponse>, tonic::Status> {
            let token = request.into_inner().page_token;
            let start = self
                .0
                .iter()
                .position(|n| *n > token)
                .unwrap_or(self.0.len());
            let page = &self.0[start..(start + 3).min(self.0.len())];
            let more = start + page.len() < self.0.len();
            Ok(tonic::Response::new(v1::ListDiagnosticsResponse {
                objects: page
                    .iter()
                    .map(|name| v1::ObjectStatus {
                        object: Some(v1::ObjectRef {
                            name: name.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                next_page_token: if more {
                    page.last().unwrap().clone()
                } else {
                    String::new()
                },
            }))
        }
    }

    /// Issue 24, finding 11: `consul-smi diagnostics` read one response only.
    #[tokio::test]
    async fn diagnostics_pages_through_the_whole_listing() {
        let names: Vec<String> = (0..10).map(|i| format!("t{i:02}")).collect();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    v1::translator_diagnostics_server::TranslatorDiagnosticsServer::new(Pager(
                        names.clone(),
                    )),
                )
                .serve(addr),
        );
        let endpoint =
            consul_smi_grpc::tls::ClientEndpoint::new(&format!("http://{addr}"), None).unwrap();
        let mut attempts = 0;
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(e) if attempts == 250 => panic!("the fake translator never listened: {e}"),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
            attempts += 1;
        };
        let mut client =
            v1::translator_diagnostics_client::TranslatorDiagnosticsClient::new(channel);
        let mut seen = Vec::new();
        let listed = super::list_pages(&mut client, None, |page| {
            seen.extend(page.into_iter().map(|s| s.object.unwrap().name))
        })
        .await
        .unwrap();
        assert_eq!(listed, 10);
        assert_eq!(seen, names);
    }

    #[test]
    fn diagnostics_takes_the_services_tls_flags() {
        let cli = Cli::try_parse_from([
            "consul-smi",
            "diagnostics",
            "--translator",
            "http://smi-translator:7402",
            "--tls-cert",
            "/grpc-tls/tls.crt",
            "--tls-key",
            "/grpc-tls/tls.key",
            "--tls-ca",
            "/grpc-tls/ca.crt",
            "TrafficTarget/default/api-clients",
        ])
        .unwrap();
        let Commands::Diagnostics(args) = cli.command else {
            panic!("not the diagnostics command");
        };
        let files = args.tls.files().unwrap().expect("TLS configured");
        assert_eq!(files.cert, std::path::Path::new("/grpc-tls/tls.crt"));
        assert_eq!(files.key, std::path::Path::new("/grpc-tls/tls.key"));
        assert_eq!(files.ca, std::path::Path::new("/grpc-tls/ca.crt"));
        assert_eq!(
            args.object.as_deref(),
            Some("TrafficTarget/default/api-clients")
        );
    }

    #[test]
    fn plan_takes_the_translators_options_including_enterprise_namespaces() {
        use consul_smi_translate::{ConsulApi, NamespaceMode};
        let cli = Cli::try_parse_from([
            "consul-smi",
            "plan",
            "deploy/examples",
            "--consul-api",
            "modern",
            "--enterprise-namespaces",
            "--namespace-prefix",
            "k8s-",
            "--default-deny",
        ])
        .unwrap();
        let Commands::Plan(args) = cli.command else {
            panic!("not the plan command");
        };
        let options = args.translate.options();
        assert_eq!(options.target, ConsulApi::Modern);
        assert_eq!(
            options.namespaces,
            NamespaceMode::Enterprise {
                mirroring_prefix: Some("k8s-".into())
            }
        );
        assert!(options.default_deny);
        // Without a live Consul to ask, `auto` (the default) plans for the legacy API.
        let cli = Cli::try_parse_from(["consul-smi", "validate", "deploy/examples"]).unwrap();
        let Commands::Validate(args) = cli.command else {
            panic!("not the validate command");
        };
        assert_eq!(args.translate.options().target, ConsulApi::Legacy);
    }
}
