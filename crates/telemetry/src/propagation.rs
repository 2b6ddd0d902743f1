//! W3C trace context between `tracing` spans and the `TraceContext { traceparent,
//! tracestate }` strings each wire message carries (proto/consul_smi/v1/trace.proto).
//!
//! Without the OpenTelemetry layer (no exporter configured) every function here is a cheap
//! no-op: [`current_context`] returns `None` and nothing is parented, linked or injected.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::{OpenTelemetrySpanExt, SetParentError};

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The W3C trace context of one change, as carried in a wire message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`.
    pub traceparent: String,
    /// Vendor key/value list; usually empty.
    pub tracestate: String,
}

impl TraceContext {
    /// The trace id (32 lowercase hex digits), if `traceparent` is well formed.
    pub fn trace_id(&self) -> Option<String> {
        let span_context = self.to_otel().span().span_context().clone();
        span_context
            .is_valid()
            .then(|| span_context.trace_id().to_string())
    }

    fn to_otel(&self) -> opentelemetry::Context {
        TraceContextPropagator::new().extract(self)
    }

    fn from_otel(context: &opentelemetry::Context) -> Option<Self> {
        if !context.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = HashMap::with_capacity(2);
        TraceContextPropagator::new().inject_context(context, &mut carrier);
        Some(Self {
            traceparent: carrier.remove(TRACEPARENT)?,
            tracestate: carrier.remove(TRACESTATE).unwrap_or_default(),
        })
    }
}

impl Extractor for TraceContext {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(&self.traceparent),
            TRACESTATE => Some(&self.tracestate),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// The context of the current `tracing` span, to put into an outgoing message.
pub fn current_context() -> Option<TraceContext> {
    span_context(&tracing::Span::current())
}

/// The context of `span`, to put into an outgoing message.
pub fn span_context(span: &tracing::Span) -> Option<TraceContext> {
    TraceContext::from_otel(&span.context())
}

/// The current trace id (32 hex digits) for log fields, like controller-rs records on its
/// reconcile span.
pub fn current_trace_id() -> Option<String> {
    let context = tracing::Span::current().context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Makes `span` a child of the remote span in `context`. Call it right after creating the
/// span, before entering it or reading its context: OpenTelemetry fixes a span's parent
/// when the span starts. An empty or malformed `traceparent` leaves `span` a root.
pub fn set_parent(span: &tracing::Span, context: &TraceContext) {
    if context.traceparent.is_empty() {
        return;
    }
    let parent = context.to_otel();
    if !parent.span().span_context().is_valid() {
        tracing::debug!(traceparent = %context.traceparent, "ignoring malformed traceparent");
        return;
    }
    match span.set_parent(parent) {
        // No OpenTelemetry layer (export off) or the span is filtered out: nothing to parent.
        Ok(()) | Err(SetParentError::LayerNotFound | SetParentError::SpanDisabled) => {}
        Err(error @ SetParentError::AlreadyStarted) => {
            tracing::debug!(%error, "set_parent called after the span started; parent ignored");
        }
    }
}

/// Links `span` to the remote span in `context`: for a batch that carries commands from
/// several changes, one link per originating trace. Malformed contexts are skipped.
pub fn add_link(span: &tracing::Span, context: &TraceContext) {
    if context.traceparent.is_empty() {
        return;
    }
    let linked = context.to_otel().span().span_context().clone();
    // tracing-opentelemetry ignores invalid span contexts itself.
    span.add_link(linked);
}

/// Adds `traceparent` (and `tracestate` when non-empty) for the current span to an
/// outgoing HTTP request, so Consul's side of the call joins the trace.
pub fn inject_http_headers(headers: &mut http::HeaderMap) {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) else {
            return;
        };
        self.0.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Keeps exported spans in memory (the SDK's own one needs its heavier `testing` feature).
    #[derive(Clone, Debug, Default)]
    struct InMemorySpanExporter(Arc<Mutex<Vec<SpanData>>>);

    impl InMemorySpanExporter {
        fn get_finished_spans(&self) -> Result<Vec<SpanData>, std::convert::Infallible> {
            Ok(self.0.lock().unwrap().clone())
        }
    }

    impl SpanExporter for InMemorySpanExporter {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    /// A subscriber with an in-memory exporter, so tests see exactly the spans produced.
    fn traced() -> (tracing::Dispatch, SdkTracerProvider, InMemorySpanExporter) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        (tracing::Dispatch::new(subscriber), provider, exporter)
    }

    #[test]
    fn round_trip_parents_across_a_message() {
        let (dispatch, provider, exporter) = traced();
        let (sent, upstream_span_id) = tracing::dispatcher::with_default(&dispatch, || {
            let observed = tracing::info_span!("observe_change");
            let _entered = observed.enter();
            let sent = current_context().expect("a sampled span has a context");
            (sent, observed.context().span().span_context().span_id())
        });

        assert!(sent.traceparent.starts_with("00-"), "{sent:?}");
        assert!(sent.traceparent.ends_with("-01"), "sampled flag: {sent:?}");
        assert_eq!(
            sent.traceparent.split('-').nth(2).unwrap(),
            upstream_span_id.to_string()
        );

        tracing::dispatcher::with_default(&dispatch, || {
            let translate = tracing::info_span!("translate");
            set_parent(&translate, &sent);
            let _entered = translate.enter();
            let child = tracing::info_span!("diff");
            let _child = child.enter();
        });
        provider.force_flush().unwrap();

        let spans = exporter.get_finished_spans().unwrap();
        let by_name = |name: &str| spans.iter().find(|span| span.name == name).unwrap();
        let (observe, translate, diff) = (
            by_name("observe_change"),
            by_name("translate"),
            by_name("diff"),
        );
        let trace_id = observe.span_context.trace_id();
        assert_eq!(sent.trace_id().unwrap(), trace_id.to_string());
        assert_eq!(translate.span_context.trace_id(), trace_id);
        assert_eq!(translate.parent_span_id, observe.span_context.span_id());
        assert!(translate.parent_span_is_remote);
        assert_eq!(diff.span_context.trace_id(), trace_id);
        assert_eq!(diff.parent_span_id, translate.span_context.span_id());
    }

    #[test]
    fn batch_links_to_each_originating_trace() {
        let (dispatch, provider, exporter) = traced();
        let origins: Vec<TraceContext> = tracing::dispatcher::with_default(&dispatch, || {
            (0..3)
                .map(|_| {
                    let change = tracing::info_span!("observe_change");
                    span_context(&change).unwrap()
                })
                .collect()
        });
        tracing::dispatcher::with_default(&dispatch, || {
            let batch = tracing::info_span!("apply_batch");
            for origin in &origins {
                add_link(&batch, origin);
            }
            add_link(&batch, &TraceContext::default());
            add_link(
                &batch,
                &TraceContext {
                    traceparent: "garbage".into(),
                    tracestate: String::new(),
                },
            );
        });
        provider.force_flush().unwrap();

        let spans = exporter.get_finished_spans().unwrap();
        let batch = spans
            .iter()
            .find(|span| span.name == "apply_batch")
            .unwrap();
        let linked: Vec<String> = batch
            .links
            .iter()
            .map(|link| link.span_context.trace_id().to_string())
            .collect();
        let expected: Vec<String> = origins.iter().map(|o| o.trace_id().unwrap()).collect();
        assert_eq!(linked, expected);
        assert_eq!(
            spans
                .iter()
                .filter(|span| span.name == "observe_change")
                .map(|span| span.span_context.trace_id())
                .collect::<std::collections::HashSet<_>>()
                .len(),
            3,
            "three independent traces"
        );
    }

    #[test]
    fn http_headers_carry_the_current_span() {
        let (dispatch, _provider, _exporter) = traced();
        let (headers, expected) = tracing::dispatcher::with_default(&dispatch, || {
            let request = tracing::info_span!("consul_request");
            let _entered = request.enter();
            let mut headers = http::HeaderMap::new();
            inject_http_headers(&mut headers);
            (headers, current_context().unwrap())
        });
        assert_eq!(headers["traceparent"], expected.traceparent.as_str());
        assert!(
            !headers.contains_key("tracestate"),
            "empty tracestate is not sent"
        );
    }

    #[test]
    fn tracestate_survives_the_round_trip() {
        let (dispatch, _provider, _exporter) = traced();
        let incoming = TraceContext {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: "vendor=abc".into(),
        };
        let outgoing = tracing::dispatcher::with_default(&dispatch, || {
            let span = tracing::info_span!("translate");
            set_parent(&span, &incoming);
            let _entered = span.enter();
            current_context().unwrap()
        });
        assert_eq!(outgoing.tracestate, "vendor=abc");
        assert_eq!(outgoing.trace_id(), incoming.trace_id());
        assert_ne!(outgoing.traceparent, incoming.traceparent, "new span id");
    }

    #[test]
    fn without_the_otel_layer_everything_is_a_no_op() {
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry());
        tracing::dispatcher::with_default(&dispatch, || {
            let span = tracing::info_span!("observe_change");
            set_parent(
                &span,
                &TraceContext {
                    traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                    tracestate: String::new(),
                },
            );
            let _entered = span.enter();
            assert_eq!(current_context(), None);
            assert_eq!(current_trace_id(), None);
            let mut headers = http::HeaderMap::new();
            inject_http_headers(&mut headers);
            assert!(headers.is_empty());
        });
    }

    #[test]
    fn malformed_traceparent_has_no_trace_id() {
        let context = TraceContext {
            traceparent: "00-zz-00f067aa0ba902b7-01".into(),
            tracestate: String::new(),
        };
        assert_eq!(context.trace_id(), None);
    }
}
