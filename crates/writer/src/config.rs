use std::net::SocketAddr;
use std::time::Duration;

use consul_smi_consul::{ConsulConfig, parse_duration};

/// The writer's settings; every flag has an environment fallback so the CLI's
/// `consul-smi writer` and a container spec can configure it the same way.
#[derive(Clone, Debug, clap::Args)]
pub struct WriterConfig {
    /// gRPC listen address (the CLI binds it; `serve` takes the bound listener).
    #[arg(
        long = "listen",
        env = "CONSUL_SMI_WRITER_LISTEN",
        default_value = "0.0.0.0:7403"
    )]
    pub listen: SocketAddr,

    /// Identity stamped on everything this writer creates; writers with different ids
    /// never touch each other's objects.
    #[arg(
        long = "writer-id",
        env = "CONSUL_SMI_WRITER_ID",
        default_value = "consul-smi"
    )]
    pub writer_id: String,

    /// Objects written to Consul at once.
    #[arg(
        long = "write-concurrency",
        env = "CONSUL_SMI_WRITER_CONCURRENCY",
        default_value_t = 16
    )]
    pub write_concurrency: usize,

    /// Watch Consul and restore owned objects changed or deleted behind the writer's back.
    #[arg(
        long = "drift-repair",
        env = "CONSUL_SMI_WRITER_DRIFT_REPAIR",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub drift_repair: bool,

    /// Pause after a change is seen before reconciling, so a burst of writes costs one pass.
    #[arg(long = "drift-debounce", env = "CONSUL_SMI_WRITER_DRIFT_DEBOUNCE", default_value = "200ms", value_parser = parse_duration)]
    pub drift_debounce: Duration,

    /// Longest wait of one blocking query on Consul.
    #[arg(long = "drift-wait", env = "CONSUL_SMI_WRITER_DRIFT_WAIT", default_value = "5m", value_parser = parse_duration)]
    pub drift_wait: Duration,

    #[command(flatten)]
    pub consul: ConsulConfig,

    #[command(flatten)]
    pub tls: consul_smi_grpc::tls::TlsArgs,
}

impl WriterConfig {
    /// Defaults (no environment) for a Consul at `consul_address`; for tests and embedding.
    pub fn for_consul(consul_address: impl Into<String>) -> Self {
        WriterConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 7403)),
            writer_id: "consul-smi".into(),
            write_concurrency: 16,
            drift_repair: true,
            drift_debounce: Duration::from_millis(200),
            drift_wait: Duration::from_secs(300),
            consul: ConsulConfig::for_address(consul_address),
            tls: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        writer: WriterConfig,
    }

    #[test]
    fn flags_parse_like_the_cli_will_embed_them() {
        let cli = Cli::try_parse_from([
            "consul-smi-writer",
            "--listen",
            "0.0.0.0:9000",
            "--writer-id",
            "cluster-a",
            "--drift-repair",
            "false",
            "--drift-debounce",
            "50ms",
            "--consul-http-addr",
            "https://consul:8501",
            "--consul-http-token",
            "secret",
            "--consul-datacenter",
            "dc2",
        ])
        .unwrap();
        let config = cli.writer;
        assert_eq!(config.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(config.writer_id, "cluster-a");
        assert!(!config.drift_repair);
        assert_eq!(config.drift_debounce, Duration::from_millis(50));
        assert_eq!(config.consul.base_url().unwrap(), "https://consul:8501");
        assert_eq!(
            config.consul.resolve_token().unwrap().as_deref(),
            Some("secret")
        );
        assert_eq!(config.consul.datacenter.as_deref(), Some("dc2"));
    }

    #[test]
    fn a_client_cert_needs_its_key() {
        let result = Cli::try_parse_from(["w", "--consul-client-cert", "/tmp/cert.pem"]);
        assert!(result.is_err());
    }
}
