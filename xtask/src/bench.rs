//! `cargo xtask bench`: end-to-end figures on real components (printed, never asserted).
//! Builds `consul-smi` in release mode, starts the local harness (real API server, real
//! Consul 1.8.7, the three services as processes) and measures:
//! - change → Consul propagation for single TrafficTargets (p50/p99), with trace export off
//!   and on (to an in-process OTLP receiver), which gives the tracing overhead;
//! - total convergence time for N TrafficTargets written at once (default 10,000);
//! - next to two baselines in the same run: a raw Consul intention write (one HTTP request)
//!   and a raw kube-rs watch (API server write → watch event), the two ends the pipeline joins.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use consul_smi_e2e::env::{E2eEnv, LocalOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Single changes measured per run.
    #[arg(long, default_value_t = 200)]
    pub singles: usize,
    /// TrafficTargets written at once for the convergence figure.
    #[arg(long, default_value_t = 10_000)]
    pub bulk: usize,
    /// Concurrent writes to the API server during the bulk run.
    #[arg(long, default_value_t = 16)]
    pub write_concurrency: usize,
}

pub fn run(args: Args) -> Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    println!("== building consul-smi (release)");
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--quiet", "-p", "consul-smi"])
            .current_dir(&root)
            .status()?;
    if !status.success() {
        bail!("cargo build --release -p consul-smi failed");
    }
    // SAFETY: no other threads yet.
    unsafe {
        std::env::set_var("CONSUL_SMI_BIN", root.join("target/release/consul-smi"));
        // RUST_LOG also decides which spans exist (and so are exported): both runs get the
        // services' info spans, with output discarded, so only the export differs.
        if std::env::var_os("CONSUL_SMI_TEST_LOG").is_none() {
            std::env::set_var(
                "CONSUL_SMI_TEST_LOG",
                "error,consul_smi_watcher=info,consul_smi_translator=info,consul_smi_writer=info,consul_smi_consul=info",
            );
        }
        std::env::set_var("CONSUL_SMI_TEST_QUIET", "1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        baselines(args.singles).await?;
        let off = singles("export off", LocalOptions::default(), args.singles).await?;
        let receiver = consul_smi_telemetry::testing::OtlpReceiver::start().await?;
        let traced = LocalOptions {
            env: vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
                ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
            ],
            ..LocalOptions::default()
        };
        let on = singles("export on", traced, args.singles).await?;
        println!(
            "tracing overhead on single-change propagation: p50 {:+.2} ms, p99 {:+.2} ms ({} spans received)",
            ms(on.0) - ms(off.0),
            ms(on.1) - ms(off.1),
            receiver.spans().len()
        );
        bulk(args.bulk, args.write_concurrency).await
    })
}

fn percentiles(label: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    println!(
        "{label}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        ms(p50),
        ms(p99),
        ms(*samples.last().unwrap_or(&Duration::ZERO)),
        samples.len()
    );
    (p50, p99)
}

/// The raw ends of the pipeline on the same machine and run: one Consul intention write, and
/// one API server write observed through a plain kube-rs watch.
async fn baselines(count: usize) -> Result<()> {
    use futures::StreamExt;
    use kube::runtime::watcher;
    let env = E2eEnv::start().await?;
    let mut writes = Vec::with_capacity(count);
    for i in 0..count {
        let start = Instant::now();
        env.create_foreign_intention(&format!("raw-src-{i}"), &format!("raw-dst-{i}"), "allow")
            .await?;
        writes.push(start.elapsed());
    }
    percentiles(
        "baseline: raw Consul intention write (POST /v1/connect/intentions)",
        writes,
    );

    let resource = kube::core::ApiResource {
        group: "access.smi-spec.io".into(),
        version: "v1alpha3".into(),
        api_version: "access.smi-spec.io/v1alpha3".into(),
        kind: "TrafficTarget".into(),
        plural: "traffictargets".into(),
    };
    let api: kube::Api<kube::core::DynamicObject> =
        kube::Api::namespaced_with(env.kube.clone(), "default", &resource);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let watch = tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = stream.next().await {
            if let Ok(watcher::Event::Apply(object)) = event {
                let _ = seen_tx.send((object.metadata.name.unwrap_or_default(), Instant::now()));
            }
        }
    });
    env.apply(ROUTE).await?;
    let mut delays = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("raw-watch-{i}");
        let start = Instant::now();
        env.apply(&target(&name, &format!("w-dst-{i}"), &format!("w-src-{i}")))
            .await?;
        loop {
            let (seen, at) = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv())
                .await
                .context("no watch event within 30 s")?
                .context("watch ended")?;
            if seen == name {
                delays.push(at - start);
                break;
            }
        }
    }
    watch.abort();
    percentiles(
        "baseline: raw kube-rs watch (API server write -> watch event)",
        delays,
    );
    Ok(())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn target(name: &str, destination: &str, source: &str) -> String {
    format!(
        "apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: {name}, namespace: default}}
spec:
  destination: {{kind: ServiceAccount, name: {destination}, namespace: default}}
  rules:
  - {{kind: TCPRoute, name: bench-tcp}}
  sources:
  - {{kind: ServiceAccount, name: {source}, namespace: default}}
"
    )
}

const ROUTE: &str = "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: bench-tcp, namespace: default}
spec: {}
";

/// Returns (p50, p99) of write → intention visible in Consul.
async fn singles(label: &str, options: LocalOptions, count: usize) -> Result<(Duration, Duration)> {
    let env = E2eEnv::start_with(options).await?;
    env.apply(ROUTE).await?;
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let (source, destination) = (format!("src-{i}"), format!("dst-{i}"));
        let start = Instant::now();
        env.apply(&target(&format!("single-{i}"), &destination, &source))
            .await?;
        loop {
            if env
                .intentions()
                .await?
                .iter()
                .any(|r| r.source == source && r.destination == destination)
            {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("single change {i} did not reach Consul within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        samples.push(start.elapsed());
    }
    Ok(percentiles(
        &format!("single change -> Consul intention ({label}; API server write included)"),
        samples,
    ))
}

async fn bulk(count: usize, concurrency: usize) -> Result<()> {
    let env = E2eEnv::start().await?;
    env.apply(ROUTE).await?;
    let start = Instant::now();
    let manifests: Vec<String> = (0..count)
        .map(|i| {
            target(
                &format!("bulk-{i}"),
                &format!("bulk-dst-{}", i % 100),
                &format!("bulk-src-{i}"),
            )
        })
        .collect();
    let env_ref = &env;
    use futures::StreamExt;
    let results: Vec<Result<()>> = futures::stream::iter(manifests.iter())
        .map(|manifest| async move { env_ref.apply(manifest).await })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let written = start.elapsed();
    let mut seen: BTreeSet<String>;
    loop {
        seen = env
            .intentions()
            .await?
            .into_iter()
            .filter(|r| r.source.starts_with("bulk-src-"))
            .map(|r| r.source)
            .collect();
        if seen.len() >= count {
            break;
        }
        if start.elapsed() > Duration::from_secs(1800) {
            bail!("only {} of {count} intentions after 30 minutes", seen.len());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged = start.elapsed();
    println!(
        "bulk: {count} TrafficTargets written to the API server in {:.1} s; all {count} intentions in Consul after {:.1} s ({:.0} intentions/s end to end)",
        written.as_secs_f64(),
        converged.as_secs_f64(),
        count as f64 / converged.as_secs_f64()
    );
    Ok(())
}
