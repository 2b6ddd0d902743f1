//! `cargo xtask demo`: the product end to end on this machine. A real Consul dev agent
//! (installed when missing), the three services as separate processes talking gRPC, the
//! watcher reading a copy of `deploy/examples/`; prints the intentions, then edits the
//! manifests and prints what changed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use consul_smi_e2e::consul::{ConsulAgent, ConsulAgentOptions};
use consul_smi_e2e::services::{Pipeline, PipelineOptions, Source};

#[derive(clap::Args)]
pub struct Args {
    /// Keep everything running after the demo until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Run against a local real Kubernetes API server (etcd + apiextensions-apiserver) instead
    /// of the directory source: manifests are applied to it like `kubectl apply`.
    #[arg(long)]
    pub kube: bool,
}

pub fn run(args: Args) -> Result<()> {
    let root = workspace_root()?;
    step("building consul-smi");
    let status = Process::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "-p", "consul-smi"])
        .current_dir(&root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p consul-smi failed");
    }
    let binary = root.join("target/debug/consul-smi");
    // SAFETY: single-threaded at this point; the harness reads it when spawning services.
    unsafe {
        std::env::set_var("CONSUL_SMI_BIN", &binary);
        // The services log to this terminal too; keep it to what needs attention.
        if std::env::var_os("CONSUL_SMI_TEST_LOG").is_none() {
            std::env::set_var("CONSUL_SMI_TEST_LOG", "warn");
        }
    }

    if args.kube {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(run_kube(&root, &binary, args.keep_running));
    }

    step("starting a Consul dev agent");
    let consul = ConsulAgent::start(ConsulAgentOptions::default())?;
    println!("Consul {} at {}", consul_version(&consul)?, consul.url());

    let manifests = tempfile::Builder::new()
        .prefix("consul-smi-demo-")
        .tempdir()?;
    for entry in std::fs::read_dir(root.join("deploy/examples"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, manifests.path().join(path.file_name().unwrap()))?;
        }
    }
    println!(
        "manifests: {} (a copy of deploy/examples)",
        manifests.path().display()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        step("starting smi-watcher (dir source), smi-translator and consul-writer");
        let options = PipelineOptions::new(Source::Dir(manifests.path().to_path_buf()), consul.http_addr());
        let pipeline = Pipeline::start(options).await?;
        println!(
            "watcher {}  translator {}  writer {}",
            pipeline.watcher_addr, pipeline.translator_addr, pipeline.writer_addr
        );

        step("waiting for the announcement example's intention dashboard -> counting");
        let first = wait_for(&consul, |set| set.contains("dashboard -> counting allow"))?;
        print_state(&consul, &first)?;
        diagnostics(&binary, &pipeline)?;

        step("edit: add source `cron` to 02-api-tcp-v1alpha3.yaml");
        let file = manifests.path().join("02-api-tcp-v1alpha3.yaml");
        let text = std::fs::read_to_string(&file)?;
        std::fs::write(
            &file,
            text.replace(
                "  - {kind: ServiceAccount, name: batch, namespace: default}",
                "  - {kind: ServiceAccount, name: batch, namespace: default}\n  - {kind: ServiceAccount, name: cron, namespace: default}",
            ),
        )?;
        let second = wait_for(&consul, |set| set.contains("cron -> api allow"))?;
        print_changes(&first, &second);

        step("edit: delete 01-dashboard-counting.yaml (the announcement example)");
        std::fs::remove_file(manifests.path().join("01-dashboard-counting.yaml"))?;
        let third = wait_for(&consul, |set| !set.contains("dashboard -> counting allow"))?;
        print_changes(&second, &third);

        if args.keep_running {
            step("running until Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
        drop(pipeline);
        anyhow::Ok(())
    })?;
    step("done");
    Ok(())
}

/// The same story against a real API server: the watcher uses the kube source and serves the
/// CRDs' conversion webhook, so the v1alpha1 announcement example is stored as v1alpha3.
async fn run_kube(root: &Path, binary: &Path, keep_running: bool) -> Result<()> {
    step(
        "starting a real API server (etcd + apiextensions-apiserver), Consul, and the three services",
    );
    let env = consul_smi_e2e::env::E2eEnv::start().await?;
    let consul = env
        .consul_agent()
        .context("the local harness has a Consul agent")?;
    let pipeline = env
        .pipeline()
        .context("the local harness runs the services")?;
    println!("Consul {} at {}", consul_version(consul)?, consul.url());
    println!("(the harness adds an operator-owned `* -> *` deny, as a real cluster would have)");

    step("applying deploy/examples/*.yaml to the API server");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("deploy/examples"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in &files {
        env.apply(&std::fs::read_to_string(file)?).await?;
        println!("  applied {}", file.display());
    }
    let first = tokio::task::block_in_place(|| {
        wait_for(consul, |set| set.contains("dashboard -> counting allow"))
    })?;
    print_state(consul, &first)?;
    diagnostics(binary, pipeline)?;

    step("edit: add source `cron` to 02-api-tcp-v1alpha3.yaml and apply it");
    let text = std::fs::read_to_string(root.join("deploy/examples/02-api-tcp-v1alpha3.yaml"))?;
    env.apply(&text.replace(
        "  - {kind: ServiceAccount, name: batch, namespace: default}",
        "  - {kind: ServiceAccount, name: batch, namespace: default}\n  - {kind: ServiceAccount, name: cron, namespace: default}",
    ))
    .await?;
    let second =
        tokio::task::block_in_place(|| wait_for(consul, |set| set.contains("cron -> api allow")))?;
    print_changes(&first, &second);

    step("delete the announcement example (kubectl delete -f 01-dashboard-counting.yaml)");
    env.delete(&std::fs::read_to_string(
        root.join("deploy/examples/01-dashboard-counting.yaml"),
    )?)
    .await?;
    let third = tokio::task::block_in_place(|| {
        wait_for(consul, |set| !set.contains("dashboard -> counting allow"))
    })?;
    print_changes(&second, &third);

    if keep_running {
        step("running until Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
    }
    step("done");
    Ok(())
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest_dir
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

fn consul_version(consul: &ConsulAgent) -> Result<String> {
    let reply = consul.http("GET", "/v1/agent/self", None)?;
    let body: serde_json::Value = serde_json::from_str(&reply.body)?;
    Ok(body["Config"]["Version"]
        .as_str()
        .unwrap_or("?")
        .to_string())
}

/// Consul's intentions as `source -> destination action` lines.
fn intentions(consul: &ConsulAgent) -> Result<BTreeSet<String>> {
    let reply = consul.http("GET", "/v1/connect/intentions", None)?;
    if reply.status != 200 {
        bail!("listing intentions: HTTP {} {}", reply.status, reply.body);
    }
    let list: Vec<serde_json::Value> = serde_json::from_str(&reply.body)?;
    Ok(list
        .iter()
        .map(|i| {
            format!(
                "{} -> {} {}",
                i["SourceName"].as_str().unwrap_or("?"),
                i["DestinationName"].as_str().unwrap_or("?"),
                i["Action"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

fn wait_for(
    consul: &ConsulAgent,
    done: impl Fn(&BTreeSet<String>) -> bool,
) -> Result<BTreeSet<String>> {
    let start = Instant::now();
    loop {
        let set = intentions(consul)?;
        if done(&set) {
            println!("(converged in {} ms)", start.elapsed().as_millis());
            return Ok(set);
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("Consul did not reach the expected intentions within 60 s; it holds: {set:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_state(consul: &ConsulAgent, set: &BTreeSet<String>) -> Result<()> {
    println!("Consul intentions:");
    for line in set {
        println!("  {line}");
    }
    for kind in ["service-splitter", "service-defaults"] {
        let reply = consul.http("GET", &format!("/v1/config/{kind}"), None)?;
        let entries: Vec<serde_json::Value> = serde_json::from_str(&reply.body).unwrap_or_default();
        for entry in entries {
            let detail = match kind {
                "service-splitter" => entry["Splits"]
                    .as_array()
                    .map(|splits| {
                        splits
                            .iter()
                            .map(|s| {
                                format!("{}={}%", s["Service"].as_str().unwrap_or("?"), s["Weight"])
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default(),
                _ => format!("protocol={}", entry["Protocol"].as_str().unwrap_or("?")),
            };
            println!("{kind} {}: {detail}", entry["Name"].as_str().unwrap_or("?"));
        }
    }
    Ok(())
}

fn print_changes(before: &BTreeSet<String>, after: &BTreeSet<String>) {
    for added in after.difference(before) {
        println!("  + {added}");
    }
    for removed in before.difference(after) {
        println!("  - {removed}");
    }
}

fn diagnostics(binary: &Path, pipeline: &Pipeline) -> Result<()> {
    println!("smi-translator diagnostics (`consul-smi diagnostics`):");
    let status = Process::new(binary)
        .args([
            "diagnostics",
            "--translator",
            &format!("http://{}", pipeline.translator_addr),
        ])
        .status()
        .context("running consul-smi diagnostics")?;
    if !status.success() {
        bail!("consul-smi diagnostics failed");
    }
    Ok(())
}
