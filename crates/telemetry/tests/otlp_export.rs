//! Spans leave through the real OTLP/gRPC exporter and arrive at an in-process receiver.

use std::time::Duration;

use consul_smi_telemetry::testing::OtlpReceiver;
use consul_smi_telemetry::{OtlpConfig, TelemetryConfig, build, current_context, set_parent};
use opentelemetry_sdk::trace::Sampler;
use tracing::info_span;

const WAIT: Duration = Duration::from_secs(20);

fn exporting_to(receiver: &OtlpReceiver, service: &str) -> TelemetryConfig {
    let mut config = TelemetryConfig::new(service);
    config.capture_logs_for_tests = true;
    let mut otlp = OtlpConfig::new(receiver.endpoint());
    otlp.batch_delay = Some(Duration::from_millis(50));
    config.otlp = Some(otlp);
    config
}

// Multi-threaded: the batch exporter's thread waits on the gRPC connection task, which needs
// a runtime thread that is not blocked (see TelemetryGuard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_two_services_reaches_the_receiver() {
    let receiver = OtlpReceiver::start().await.expect("start OTLP receiver");
    let (watcher, watcher_guard) = build(&exporting_to(&receiver, "smi-watcher")).unwrap();
    let (translator, translator_guard) = build(&exporting_to(&receiver, "smi-translator")).unwrap();
    assert!(watcher_guard.is_exporting());

    let on_the_wire = tracing::dispatcher::with_default(&watcher, || {
        let observe = info_span!(
            "observe_change",
            kind = "TrafficTarget",
            namespace = "default",
            name = "a-to-b",
            revision = 7u64
        );
        let _observing = observe.enter();
        let _encoding = info_span!("encode_event").entered();
        current_context().expect("exporting subscriber gives a context")
    });
    tracing::dispatcher::with_default(&translator, || {
        let translate = info_span!("translate");
        set_parent(&translate, &on_the_wire);
        let _translating = translate.enter();
        let _diffing = info_span!("diff").entered();
    });

    watcher_guard.flush().await.expect("flush watcher spans");
    translator_guard
        .flush()
        .await
        .expect("flush translator spans");
    let spans = receiver
        .wait_for("four spans", WAIT, |spans| spans.len() >= 4)
        .await
        .unwrap_or_else(|timeout| panic!("{timeout}"));
    let span = |name: &str| {
        spans
            .iter()
            .find(|span| span.name == name)
            .unwrap_or_else(|| panic!("no span {name:?} in {spans:#?}"))
    };
    let (observe, encode, translate, diff) = (
        span("observe_change"),
        span("encode_event"),
        span("translate"),
        span("diff"),
    );

    assert_eq!(observe.service_name, "smi-watcher");
    assert_eq!(translate.service_name, "smi-translator");
    assert_eq!(observe.parent_span_id, None, "the change starts the trace");
    assert_eq!(observe.attribute("kind"), Some("TrafficTarget"));
    assert_eq!(observe.attribute("namespace"), Some("default"));
    assert_eq!(observe.attribute("name"), Some("a-to-b"));
    assert_eq!(observe.attribute("revision"), Some("7"));
    assert!(encode.is_child_of(observe));
    assert_eq!(
        Some(observe.trace_id.clone()),
        on_the_wire.trace_id(),
        "the wire context names the watcher's trace"
    );
    // The wire context was taken inside encode_event, so that span is the remote parent.
    assert!(
        translate.is_child_of(encode),
        "{translate:#?} vs {encode:#?}"
    );
    assert!(diff.is_child_of(translate));
    assert_eq!(receiver.spans_in_trace(&observe.trace_id).len(), 4);

    watcher_guard.shutdown().await.unwrap();
    translator_guard.shutdown().await.unwrap();
    receiver.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_out_traces_propagate_but_are_not_exported() {
    let receiver = OtlpReceiver::start().await.expect("start OTLP receiver");
    let mut config = exporting_to(&receiver, "smi-writer");
    config.otlp.as_mut().unwrap().sampler = Sampler::AlwaysOff;
    let (dispatch, guard) = build(&config).unwrap();
    let context = tracing::dispatcher::with_default(&dispatch, || {
        let _span = info_span!("apply").entered();
        current_context()
    })
    .expect("unsampled spans still have a context to propagate");
    assert!(context.traceparent.ends_with("-00"), "{context:?}");

    guard.shutdown().await.unwrap();
    assert_eq!(receiver.spans(), Vec::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_guard_exports_what_is_pending() {
    let receiver = OtlpReceiver::start().await.expect("start OTLP receiver");
    let mut config = exporting_to(&receiver, "smi-writer");
    // Longer than the test waits: only the shutdown in Drop can have sent the span.
    config.otlp.as_mut().unwrap().batch_delay = Some(Duration::from_secs(600));
    let (dispatch, guard) = build(&config).unwrap();
    tracing::dispatcher::with_default(&dispatch, || {
        let _span = info_span!("consul_request").entered();
    });
    drop(guard);
    assert_eq!(
        receiver.spans().len(),
        1,
        "Drop returns after the exporter shut down"
    );
}

#[test]
fn without_an_endpoint_there_is_no_exporter() {
    let mut config = TelemetryConfig::new("smi-writer");
    config.capture_logs_for_tests = true;
    let (dispatch, guard) = build(&config).unwrap();
    assert!(!guard.is_exporting());
    tracing::dispatcher::with_default(&dispatch, || {
        let _span = info_span!("apply").entered();
        assert_eq!(current_context(), None);
    });
}
