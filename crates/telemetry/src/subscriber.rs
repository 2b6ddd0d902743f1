//! The one place that builds the `tracing` subscriber: env filter, fmt (text or JSON) and,
//! only when an OTLP endpoint is configured, the OpenTelemetry layer with a batching
//! gRPC exporter.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing::{Dispatch, Metadata};
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Registry, fmt};

use crate::Error;

/// `text` (default) or `json`.
pub const LOG_FORMAT_ENV: &str = "CONSUL_SMI_LOG_FORMAT";
const DEFAULT_LOG_FILTER: &str = "info";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Everything [`build`] needs; [`TelemetryConfig::from_env`] reads it the standard way.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// `service.name` of exported spans.
    pub service_name: String,
    /// An `EnvFilter` directive string such as `info,consul_smi_writer=debug`. It also decides
    /// which spans exist at all, so it filters exported spans too.
    pub log_filter: String,
    pub log_format: LogFormat,
    /// Write logs through libtest's capture instead of straight to stdout.
    pub capture_logs_for_tests: bool,
    /// `None` = no OpenTelemetry layer at all, so spans cost only what logging costs.
    pub otlp: Option<OtlpConfig>,
}

#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// gRPC endpoint of an OTLP trace receiver, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    pub sampler: Sampler,
    /// How long spans wait in the batch before export; `None` keeps the SDK default
    /// (5 s, or `OTEL_BSP_SCHEDULE_DELAY` in milliseconds).
    pub batch_delay: Option<Duration>,
}

impl OtlpConfig {
    /// Exports everything a sampled parent (or a new root) produces.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            sampler: Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            batch_delay: None,
        }
    }
}

impl TelemetryConfig {
    /// Text logs at `info`, no trace export.
    pub fn new(service_name: impl Into<String>) -> Self {
        Self {
            service_name: service_name.into(),
            log_filter: DEFAULT_LOG_FILTER.to_owned(),
            log_format: LogFormat::Text,
            capture_logs_for_tests: false,
            otlp: None,
        }
    }

    /// Reads `RUST_LOG`, `CONSUL_SMI_LOG_FORMAT`, `OTEL_SERVICE_NAME` (overrides
    /// `default_service_name`), `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`,
    /// and the spec's off switches `OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none`.
    pub fn from_env(default_service_name: &str) -> Result<Self, Error> {
        Self::from_lookup(default_service_name, |name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] with the environment given as a function, for tests.
    pub fn from_lookup(
        default_service_name: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        let non_empty = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());

        let log_format = match non_empty(LOG_FORMAT_ENV) {
            None => LogFormat::Text,
            Some(value) => match value.trim().to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(Error::InvalidEnv {
                        variable: LOG_FORMAT_ENV,
                        value,
                        expected: "`text` or `json`",
                    });
                }
            },
        };

        let sdk_disabled = non_empty("OTEL_SDK_DISABLED")
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"));
        let exporter_none = non_empty("OTEL_TRACES_EXPORTER")
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("none"));
        // Same precedence as the OTLP exporter itself: the signal-specific variable wins.
        let endpoint = non_empty("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| non_empty("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let otlp = match endpoint {
            Some(endpoint) if !sdk_disabled && !exporter_none => Some(OtlpConfig {
                endpoint: endpoint.trim().to_owned(),
                sampler: sampler_from_env(
                    non_empty("OTEL_TRACES_SAMPLER"),
                    non_empty("OTEL_TRACES_SAMPLER_ARG"),
                )?,
                batch_delay: None,
            }),
            _ => None,
        };

        Ok(Self {
            service_name: non_empty("OTEL_SERVICE_NAME")
                .map(|name| name.trim().to_owned())
                .unwrap_or_else(|| default_service_name.to_owned()),
            log_filter: non_empty("RUST_LOG").unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned()),
            log_format,
            capture_logs_for_tests: false,
            otlp,
        })
    }
}

/// The SDK silently falls back to always-on for a value it does not know; a typo in a
/// sampler setting should stop the service at start-up instead.
fn sampler_from_env(name: Option<String>, arg: Option<String>) -> Result<Sampler, Error> {
    let ratio = || match &arg {
        None => Ok(1.0),
        Some(value) => value
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|ratio| (0.0..=1.0).contains(ratio))
            .ok_or_else(|| Error::InvalidEnv {
                variable: "OTEL_TRACES_SAMPLER_ARG",
                value: value.clone(),
                expected: "a sampling ratio between 0.0 and 1.0",
            }),
    };
    let parent_based = |root: Sampler| Sampler::ParentBased(Box::new(root));
    let Some(name) = name else {
        return Ok(parent_based(Sampler::AlwaysOn));
    };
    Ok(match name.trim().to_ascii_lowercase().as_str() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "parentbased_always_on" => parent_based(Sampler::AlwaysOn),
        "parentbased_always_off" => parent_based(Sampler::AlwaysOff),
        "parentbased_traceidratio" => parent_based(Sampler::TraceIdRatioBased(ratio()?)),
        _ => {
            return Err(Error::InvalidEnv {
                variable: "OTEL_TRACES_SAMPLER",
                value: name,
                expected: "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio",
            });
        }
    })
}

/// Installs the process-wide subscriber configured from the environment (see
/// [`TelemetryConfig::from_env`]) and the W3C TraceContext propagator. Call once, inside
/// the Tokio runtime when trace export may be configured; keep the guard until exit.
pub fn init(service_name: &str) -> Result<TelemetryGuard, Error> {
    let config = TelemetryConfig::from_env(service_name)?;
    let (dispatch, guard) = build(&config)?;
    dispatch.try_init().map_err(Error::AlreadyInitialised)?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(provider) = &guard.provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    tracing::info!(
        service = %config.service_name,
        otlp_endpoint = config.otlp.as_ref().map(|otlp| otlp.endpoint.as_str()),
        "telemetry initialised"
    );
    Ok(guard)
}

/// Builds the subscriber without installing it anywhere, for tests
/// (`tracing::dispatcher::with_default`) or callers that install it themselves.
pub fn build(config: &TelemetryConfig) -> Result<(Dispatch, TelemetryGuard), Error> {
    let env_filter =
        EnvFilter::try_new(&config.log_filter).map_err(|source| Error::InvalidLogFilter {
            filter: config.log_filter.clone(),
            source,
        })?;

    type Boxed =
        Box<dyn Layer<tracing_subscriber::layer::Layered<EnvFilter, Registry>> + Send + Sync>;
    let mut layers: Vec<Boxed> = Vec::with_capacity(2);

    let fmt_layer = fmt::layer();
    layers.push(match (config.log_format, config.capture_logs_for_tests) {
        (LogFormat::Text, false) => fmt_layer.boxed(),
        (LogFormat::Text, true) => fmt_layer.with_test_writer().boxed(),
        (LogFormat::Json, false) => fmt_layer.json().boxed(),
        (LogFormat::Json, true) => fmt_layer.json().with_test_writer().boxed(),
    });

    let provider = match &config.otlp {
        None => None,
        Some(otlp) => {
            let provider = tracer_provider(&config.service_name, otlp)?;
            let tracer = provider.tracer(config.service_name.clone());
            layers.push(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(filter_fn(is_not_export_machinery))
                    .boxed(),
            );
            Some(provider)
        }
    };

    let subscriber = Registry::default().with(env_filter).with(layers);
    Ok((Dispatch::new(subscriber), TelemetryGuard { provider }))
}

/// Spans of the gRPC stack the exporter itself runs on would, at debug level, be exported
/// by that same exporter and feed back on themselves.
fn is_not_export_machinery(metadata: &Metadata<'_>) -> bool {
    const EXPORT_STACK: [&str; 6] = ["h2", "hyper", "tonic", "tower", "opentelemetry", "reqwest"];
    let target = metadata.target();
    !EXPORT_STACK.iter().any(|prefix| {
        target
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::") || rest.starts_with('_'))
    })
}

fn tracer_provider(service_name: &str, otlp: &OtlpConfig) -> Result<SdkTracerProvider, Error> {
    // tonic's channel spawns its connection task onto the current runtime while building.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::NoTokioRuntime {
            endpoint: otlp.endpoint.clone(),
        });
    }
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(otlp.endpoint.clone())
        .build()
        .map_err(|source| Error::Exporter {
            endpoint: otlp.endpoint.clone(),
            source,
        })?;
    let mut batch = BatchConfigBuilder::default();
    if let Some(delay) = otlp.batch_delay {
        batch = batch.with_scheduled_delay(delay);
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(otlp.sampler.clone())
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build())
}

/// Keeps trace export running; flushes and shuts the exporter down when dropped.
///
/// Prefer `guard.shutdown().await` at the end of `main`: the batch exporter runs on its own
/// thread but its gRPC connection runs on the Tokio runtime, so a blocking shutdown on a
/// single-threaded runtime's only thread waits for the export timeout. `Drop` handles the
/// multi-threaded runtime (it steps out with `block_in_place`) and no runtime at all.
#[must_use = "dropping the guard shuts trace export down"]
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported (an OTLP endpoint was configured).
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span now; returns once the receiver has answered.
    pub async fn flush(&self) -> Result<(), Error> {
        let Some(provider) = self.provider.clone() else {
            return Ok(());
        };
        run_blocking(move || provider.force_flush()).await
    }

    /// Exports what is left and stops the exporter.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        let Some(provider) = self.provider.take() else {
            return Ok(());
        };
        run_blocking(move || provider.shutdown()).await
    }
}

async fn run_blocking(
    operation: impl FnOnce() -> opentelemetry_sdk::error::OTelSdkResult + Send + 'static,
) -> Result<(), Error> {
    match tokio::task::spawn_blocking(operation).await {
        Ok(result) => result.map_err(Error::from),
        Err(join_error) => std::panic::resume_unwind(join_error.into_panic()),
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        let result =
            match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                    tokio::task::block_in_place(|| provider.shutdown())
                }
                _ => provider.shutdown(),
            };
        if let Err(error) = result {
            // The subscriber may already be gone, so stderr is the one channel left.
            eprintln!("consul-smi telemetry: shutting down trace export: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<TelemetryConfig, Error> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        TelemetryConfig::from_lookup("smi-writer", |name| vars.get(name).cloned())
    }

    #[test]
    fn no_endpoint_means_no_exporter_and_defaults() {
        let config = config(&[]).unwrap();
        assert!(config.otlp.is_none());
        assert_eq!(config.service_name, "smi-writer");
        assert_eq!(config.log_filter, "info");
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn traces_endpoint_wins_over_generic_endpoint() {
        let config = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
        ])
        .unwrap();
        assert_eq!(config.otlp.unwrap().endpoint, "http://traces:4317");
    }

    #[test]
    fn empty_endpoint_is_unset() {
        let config = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]).unwrap();
        assert!(config.otlp.is_none());
    }

    #[test]
    fn off_switches_disable_export() {
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let config = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"), off]).unwrap();
            assert!(config.otlp.is_none(), "{off:?} should disable export");
        }
    }

    #[test]
    fn otel_service_name_overrides_default() {
        let config = config(&[("OTEL_SERVICE_NAME", "writer-canary")]).unwrap();
        assert_eq!(config.service_name, "writer-canary");
    }

    #[test]
    fn json_log_format() {
        let config = config(&[(LOG_FORMAT_ENV, "JSON")]).unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
        let error = super::TelemetryConfig::from_lookup("x", |name| {
            (name == LOG_FORMAT_ENV).then(|| "yaml".to_owned())
        })
        .unwrap_err();
        assert!(
            error.to_string().contains("CONSUL_SMI_LOG_FORMAT"),
            "{error}"
        );
    }

    #[test]
    fn samplers_from_env() {
        let sampler = |name: &str, arg: Option<&str>| {
            let mut vars = vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_TRACES_SAMPLER", name),
            ];
            if let Some(arg) = arg {
                vars.push(("OTEL_TRACES_SAMPLER_ARG", arg));
            }
            config(&vars).map(|config| format!("{:?}", config.otlp.unwrap().sampler))
        };
        assert_eq!(sampler("always_off", None).unwrap(), "AlwaysOff");
        assert_eq!(
            sampler("traceidratio", Some("0.25")).unwrap(),
            "TraceIdRatioBased(0.25)"
        );
        assert_eq!(
            sampler("parentbased_traceidratio", None).unwrap(),
            "ParentBased(TraceIdRatioBased(1.0))"
        );
        let bad_ratio = sampler("traceidratio", Some("1.5")).unwrap_err();
        assert!(
            bad_ratio.to_string().contains("OTEL_TRACES_SAMPLER_ARG"),
            "{bad_ratio}"
        );
        let unknown = sampler("sometimes", None).unwrap_err();
        assert!(unknown.to_string().contains("\"sometimes\""), "{unknown}");
    }

    #[test]
    fn invalid_log_filter_names_the_filter() {
        let mut config = TelemetryConfig::new("t");
        config.log_filter = "info,[[[".to_owned();
        let error = build(&config).unwrap_err();
        assert!(error.to_string().contains("info,[[["), "{error}");
    }

    #[test]
    fn exporter_outside_a_runtime_is_an_error_not_a_panic() {
        let mut config = TelemetryConfig::new("t");
        config.otlp = Some(OtlpConfig::new("http://127.0.0.1:4317"));
        let error = build(&config).unwrap_err();
        assert!(matches!(error, Error::NoTokioRuntime { .. }), "{error}");
    }

    #[test]
    fn export_machinery_filter() {
        use tracing::Level;
        use tracing::callsite::Identifier;
        use tracing::field::FieldSet;
        use tracing::metadata::Kind;
        struct Callsite;
        impl tracing::Callsite for Callsite {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!()
            }
        }
        static CALLSITE: Callsite = Callsite;
        let metadata = |target: &'static str| {
            Metadata::new(
                "span",
                target,
                Level::INFO,
                None,
                None,
                None,
                FieldSet::new(&[], Identifier(&CALLSITE)),
                Kind::SPAN,
            )
        };
        assert!(!is_not_export_machinery(&metadata("h2::proto")));
        assert!(!is_not_export_machinery(&metadata("hyper_util::client")));
        assert!(!is_not_export_machinery(&metadata("opentelemetry_sdk")));
        assert!(is_not_export_machinery(&metadata(
            "consul_smi_writer::apply"
        )));
        assert!(is_not_export_machinery(&metadata("towering")));
    }
}
