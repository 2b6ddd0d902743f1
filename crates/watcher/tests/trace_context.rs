//! Each delta carries the W3C trace context of the span that recorded its change, so the
//! translator and writer can continue the trace; snapshot events carry none.

use std::time::Duration;

use consul_smi_api::{Meta, SmiObject, TcpRoute};
use consul_smi_grpc::v1;
use consul_smi_telemetry::testing::OtlpReceiver;
use consul_smi_telemetry::{OtlpConfig, TelemetryConfig};
use consul_smi_watcher::SharedStore;
use consul_smi_watcher::store::Observed;

#[tokio::test]
async fn deltas_carry_the_trace_context_of_their_change() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let mut config = TelemetryConfig::new("smi-watcher");
    config.capture_logs_for_tests = true;
    let mut otlp = OtlpConfig::new(receiver.endpoint());
    otlp.batch_delay = Some(Duration::from_millis(50));
    config.otlp = Some(otlp);
    let (dispatch, guard) = consul_smi_telemetry::build(&config).unwrap();
    // The current-thread test runtime runs every task on this thread.
    let _default = tracing::dispatcher::set_default(&dispatch);

    let shared = SharedStore::new("epoch".into(), 16);
    shared.set_ready();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(shared.clone().run_subscription(
        v1::WatchRequest {
            epoch: String::new(),
            after_revision: 0,
            subscriber: "t".into(),
        },
        tx,
    ));
    for _ in 0..2 {
        let event = rx.recv().await.unwrap().unwrap();
        assert_eq!(event.trace, None, "snapshot events carry no trace");
    }
    shared.upsert(Observed::Valid(SmiObject::TcpRoute(TcpRoute {
        meta: Meta {
            namespace: "default".into(),
            name: "db".into(),
            ..Meta::default()
        },
        matches: None,
    })));
    let delta = rx.recv().await.unwrap().unwrap();
    let trace = delta.trace.expect("a delta carries its trace context");
    let context = consul_smi_telemetry::TraceContext {
        traceparent: trace.traceparent.clone(),
        tracestate: trace.tracestate.clone(),
    };
    let trace_id = context.trace_id().expect("well-formed traceparent");

    guard.flush().await.unwrap();
    let span = receiver
        .wait_for_span("smi.change", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(span.trace_id, trace_id);
    assert_eq!(span.attribute("name"), Some("db"));
    assert!(
        trace.traceparent.contains(&span.span_id),
        "{} names span {}",
        trace.traceparent,
        span.span_id
    );
}
