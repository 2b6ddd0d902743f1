//! Distributed tracing and propagation metrics, end to end: the three services run as
//! processes against a real API server and a real Consul, exporting OTLP to a receiver in
//! this test process.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use consul_smi_e2e::env::{E2eEnv, LocalOptions, eventually};
use consul_smi_e2e::services::free_addr;
use consul_smi_telemetry::testing::{OtlpReceiver, ReceivedSpan};

const CONVERGE: Duration = Duration::from_secs(30);

fn tcp_target(name: &str, destination: &str, source: &str) -> String {
    format!(
        "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {{name: {name}-tcp, namespace: default}}
spec:
  matches:
    ports: []
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: {name}, namespace: default}}
spec:
  destination: {{kind: ServiceAccount, name: {destination}, namespace: default}}
  rules:
  - {{kind: TCPRoute, name: {name}-tcp}}
  sources:
  - {{kind: ServiceAccount, name: {source}, namespace: default}}
"
    )
}

/// The local harness with every service exporting to `receiver`, and the writer's admin
/// endpoint on `admin`.
async fn start_env(receiver: &OtlpReceiver, admin: std::net::SocketAddr) -> Result<E2eEnv> {
    let env = E2eEnv::start_with(LocalOptions {
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
            // Batches leave within 100 ms instead of the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
            // RUST_LOG decides which spans exist at all (see consul_smi_telemetry's
            // TelemetryConfig::log_filter); the harness default `warn` would leave none.
            (
                "RUST_LOG".into(),
                "warn,kube_client=off,consul_smi_watcher=info,consul_smi_translator=info,\
                 consul_smi_writer=info,consul_smi_consul=info"
                    .into(),
            ),
        ],
        writer_args: vec!["--admin-listen".into(), admin.to_string()],
        ..Default::default()
    })
    .await?;
    if !env.is_local() {
        bail!("the tracing suite needs the local harness (it runs the OTLP receiver in-process)");
    }
    Ok(env)
}

async fn has_owned_allow(env: &E2eEnv, source: &str, destination: &str) -> Result<bool> {
    Ok(env.intentions().await?.iter().any(|r| {
        r.source == source && r.destination == destination && r.action == "allow" && r.owned
    }))
}

/// Applies a first TrafficTarget and waits for it in Consul: after that the translator's
/// initial Sync is done, so the next change travels as an Apply command (a Sync carries no
/// per-change trace).
async fn warm_up(env: &E2eEnv) -> Result<()> {
    env.apply(&tcp_target("warm-up", "warm-api", "warm-web"))
        .await?;
    eventually("the warm-up intention in Consul", CONVERGE, || async {
        has_owned_allow(env, "warm-web", "warm-api").await
    })
    .await
}

fn find<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    predicate: impl Fn(&ReceivedSpan) -> bool,
) -> Result<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|span| predicate(span))
        .with_context(|| format!("no {what} among {:#?}", summary(spans)))
}

fn summary(spans: &[ReceivedSpan]) -> Vec<String> {
    spans
        .iter()
        .map(|s| {
            format!(
                "{}/{} span={} parent={} {:?}",
                s.service_name,
                s.name,
                s.span_id,
                s.parent_span_id.as_deref().unwrap_or("-"),
                s.attributes
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_change_is_one_trace_from_watcher_to_consul_request() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let env = start_env(&receiver, free_addr()?).await?;
    warm_up(&env).await?;

    let name = "traced";
    env.apply(&tcp_target(name, "traced-api", "traced-web"))
        .await?;
    eventually("the traced intention in Consul", CONVERGE, || async {
        has_owned_allow(&env, "traced-web", "traced-api").await
    })
    .await?;

    // The translator's span for the TrafficTarget names the trace; the writer's command span
    // ends after its Consul requests, so once it is in, the whole chain is.
    let is_translate = |span: &ReceivedSpan| {
        span.service_name == "smi-translator"
            && span.name == "translate"
            && span.attribute("kind") == Some("TrafficTarget")
            && span.attribute("name") == Some(name)
    };
    let spans = receiver
        .wait_for(
            "the traced change's writer.command span",
            CONVERGE,
            |spans| {
                spans.iter().filter(|s| is_translate(s)).any(|translate| {
                    spans.iter().any(|s| {
                        s.trace_id == translate.trace_id
                            && s.service_name == "consul-writer"
                            && s.name == "writer.command"
                    })
                })
            },
        )
        .await?;
    let translate = find(&spans, "translate span for the TrafficTarget", is_translate)?;
    let trace = receiver.spans_in_trace(&translate.trace_id);

    let change = find(&trace, "watcher change span", |s| {
        s.service_name == "smi-watcher" && s.name == "smi.change"
    })?;
    assert_eq!(
        change.parent_span_id, None,
        "the change span starts the trace"
    );
    assert_eq!(change.attribute("kind"), Some("TrafficTarget"));
    assert_eq!(change.attribute("namespace"), Some("default"));
    assert_eq!(change.attribute("name"), Some(name));
    assert!(
        translate.is_child_of(change),
        "translate is a child of the watcher's change span: {:#?}",
        summary(&trace)
    );

    let command = find(&trace, "writer command span", |s| {
        s.service_name == "consul-writer" && s.name == "writer.command"
    })?;
    assert!(
        command.is_child_of(translate),
        "the writer's command span is a child of translate: {:#?}",
        summary(&trace)
    );
    assert!(
        command
            .attribute("target")
            .is_some_and(|t| t.starts_with("intention ") && t.contains("traced-web")),
        "{:?}",
        command.attributes
    );
    assert_eq!(command.attribute("outcome"), Some("Applied"));

    let requests: Vec<&ReceivedSpan> = trace
        .iter()
        .filter(|s| s.name == "consul_request")
        .collect();
    assert!(
        !requests.is_empty(),
        "no Consul HTTP span in the trace: {:#?}",
        summary(&trace)
    );
    for request in &requests {
        assert_eq!(request.service_name, "consul-writer");
        assert_eq!(request.kind, "client");
        assert!(
            request.is_child_of(command),
            "Consul request {:?} is a child of the command span",
            request.attributes
        );
        assert!(request.attribute("http.request.method").is_some());
        assert!(
            request
                .attribute("url.path")
                .is_some_and(|p| p.starts_with("/v1/")),
            "{:?}",
            request.attributes
        );
        assert!(
            request
                .attribute("http.response.status_code")
                .is_some_and(|status| status.starts_with('2')),
            "{:?}",
            request.attributes
        );
    }
    assert!(
        requests
            .iter()
            .any(|r| matches!(r.attribute("http.request.method"), Some("POST" | "PUT"))),
        "the write itself is traced: {:#?}",
        summary(&trace)
    );
    assert!(
        requests
            .iter()
            .any(|r| r.attribute("consul.index").is_some()),
        "a read records Consul's index: {:#?}",
        summary(&trace)
    );

    // Exactly one trace: every service's spans for this change share the change's trace id.
    for service in ["smi-watcher", "smi-translator", "consul-writer"] {
        assert!(
            trace.iter().any(|s| s.service_name == service),
            "{service} has no span in the trace"
        );
    }
    Ok(())
}

/// `consul_smi_propagation_latency_seconds_{count,sum}` from the writer's `/metrics`.
async fn propagation(admin: std::net::SocketAddr) -> Result<(u64, f64)> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?;
    let value = |metric: &str| -> Result<String> {
        text.lines()
            .find_map(|line| line.strip_prefix(metric)?.strip_prefix(' '))
            .map(str::to_string)
            .with_context(|| format!("no {metric} in /metrics:\n{text}"))
    };
    Ok((
        value("consul_smi_propagation_latency_seconds_count")?.parse()?,
        value("consul_smi_propagation_latency_seconds_sum")?.parse()?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_measures_propagation_of_a_change() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let admin = free_addr()?;
    let env = start_env(&receiver, admin).await?;
    warm_up(&env).await?;
    let (count_before, sum_before) = propagation(admin).await?;

    env.apply(&tcp_target("measured", "measured-api", "measured-web"))
        .await?;
    eventually("the measured intention in Consul", CONVERGE, || async {
        has_owned_allow(&env, "measured-web", "measured-api").await
    })
    .await?;

    // The writer observes after Consul's answer, which the test may see a moment earlier.
    eventually("the propagation histogram moved", CONVERGE, || async {
        Ok(propagation(admin).await?.0 > count_before)
    })
    .await?;
    let (count, sum) = propagation(admin).await?;
    assert!(count > count_before, "count {count_before} -> {count}");
    assert!(
        sum > sum_before,
        "the change took a positive time to propagate: sum {sum_before} -> {sum}"
    );
    Ok(())
}
