//! `init` reads the standard environment and installs the process-wide subscriber. It is
//! the only test in this binary because it mutates the environment and global state.

use std::time::Duration;

use consul_smi_telemetry::testing::OtlpReceiver;
use consul_smi_telemetry::{Error, current_context, init};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_exports_to_the_env_endpoint_under_otel_service_name() {
    let receiver = OtlpReceiver::start().await.expect("start OTLP receiver");
    // SAFETY: this binary has one test and no other thread reads the environment yet.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint());
        std::env::set_var("OTEL_SERVICE_NAME", "writer-under-test");
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "50");
        std::env::set_var("RUST_LOG", "info");
    }
    let guard = init("smi-writer").expect("first init");
    assert!(guard.is_exporting());
    assert!(
        matches!(init("smi-writer"), Err(Error::AlreadyInitialised(_))),
        "a second init must be refused"
    );
    let fields: Vec<String> =
        opentelemetry::global::get_text_map_propagator(|p| p.fields().map(String::from).collect());
    assert!(fields.contains(&"traceparent".to_owned()), "{fields:?}");

    // The global subscriber sees spans on every runtime thread.
    let context = tokio::spawn(async {
        let _span = tracing::info_span!("consul_request", method = "PUT").entered();
        current_context()
    })
    .await
    .unwrap()
    .expect("exporting subscriber gives a context");

    guard.shutdown().await.expect("shutdown flushes");
    let span = receiver
        .wait_for_span("consul_request", Duration::from_secs(20))
        .await
        .unwrap_or_else(|timeout| panic!("{timeout}"));
    assert_eq!(span.service_name, "writer-under-test");
    assert_eq!(span.attribute("method"), Some("PUT"));
    assert_eq!(Some(span.trace_id), context.trace_id());
}
