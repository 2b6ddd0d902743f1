//! Per-change tracing cost on the hot path, with trace export off (no OpenTelemetry layer)
//! and on (OTel layer + batch exporter shipping to an in-process OTLP receiver).
//! `cargo bench -p consul-smi-telemetry --bench span_overhead`

use std::hint::black_box;
use std::time::Duration;

use consul_smi_telemetry::testing::OtlpReceiver;
use consul_smi_telemetry::{OtlpConfig, TelemetryConfig, build, current_context, set_parent};
use criterion::{Criterion, criterion_group, criterion_main};

/// What one change costs a service: a span with the attributes, a child span, and
/// handing the context on to the next hop.
fn one_change(revision: u64) {
    let observe = tracing::info_span!(
        "observe_change",
        kind = "TrafficTarget",
        namespace = "default",
        name = "a-to-b",
        revision
    );
    let _observing = observe.enter();
    let _encoding = tracing::info_span!("encode_event").entered();
    let wire = current_context();
    if let Some(wire) = &wire {
        let translate = tracing::info_span!("translate");
        set_parent(&translate, wire);
        let _translating = translate.enter();
    }
    black_box(wire);
}

fn span_overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let _runtime_context = runtime.enter();
    let receiver = runtime
        .block_on(OtlpReceiver::start())
        .expect("start OTLP receiver");

    let mut group = c.benchmark_group("one_change");
    group.measurement_time(Duration::from_secs(3));

    let (off, _off_guard) = build(&TelemetryConfig::new("bench")).unwrap();
    tracing::dispatcher::with_default(&off, || {
        let mut revision = 0;
        group.bench_function("export_off", |b| {
            b.iter(|| {
                revision += 1;
                one_change(revision)
            })
        });
    });

    let mut exporting = TelemetryConfig::new("bench");
    let mut otlp = OtlpConfig::new(receiver.endpoint());
    otlp.batch_delay = Some(Duration::from_millis(200));
    exporting.otlp = Some(otlp);
    let (on, on_guard) = build(&exporting).unwrap();
    tracing::dispatcher::with_default(&on, || {
        let mut revision = 0;
        group.bench_function("export_on", |b| {
            b.iter(|| {
                revision += 1;
                one_change(revision)
            })
        });
    });
    group.finish();

    runtime.block_on(on_guard.shutdown()).expect("flush");
    println!(
        "OTLP receiver got {} spans (the batch queue drops spans beyond 2048 pending, so this \
         can be fewer than produced)",
        receiver.spans().len()
    );
}

criterion_group!(benches, span_overhead);
criterion_main!(benches);
