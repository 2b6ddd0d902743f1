//! Command-line/environment configuration of smi-watcher.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Where SMI objects come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A Kubernetes API server: `--kubeconfig`, else the default kubeconfig or in-cluster config.
    Kube,
    /// A directory of multi-document YAML manifests (GitOps, or Consul outside Kubernetes).
    Dir(PathBuf),
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kube" => Ok(Source::Kube),
            _ => match s.strip_prefix("dir:") {
                Some(path) if !path.is_empty() => Ok(Source::Dir(PathBuf::from(path))),
                _ => Err(format!(
                    "unknown source {s:?}: expected `kube` or `dir:PATH`"
                )),
            },
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct WatcherConfig {
    /// gRPC listen address (SmiWatch and grpc.health.v1).
    #[arg(
        long = "listen",
        env = "CONSUL_SMI_WATCHER_LISTEN",
        default_value = "0.0.0.0:7401"
    )]
    pub listen: SocketAddr,

    /// `kube` or `dir:PATH`.
    #[arg(long, env = "CONSUL_SMI_WATCHER_SOURCE", default_value = "kube")]
    pub source: Source,

    /// Kubeconfig for the `kube` source; default: $KUBECONFIG, ~/.kube/config, or in-cluster.
    #[arg(long, env = "CONSUL_SMI_WATCHER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "CONSUL_SMI_WATCHER_NAMESPACE")]
    pub namespace: Option<String>,

    /// Watch only objects matching this label selector, e.g. `mesh=consul,tier!=test`.
    #[arg(long = "selector", env = "CONSUL_SMI_WATCHER_LABEL_SELECTOR")]
    pub label_selector: Option<String>,

    /// HTTPS listen address of the CRD conversion webhook (`/convert`); off when absent.
    #[arg(long, env = "CONSUL_SMI_WATCHER_WEBHOOK_LISTEN", requires_all = ["webhook_cert", "webhook_key"])]
    pub webhook_listen: Option<SocketAddr>,

    /// PEM certificate chain of the conversion webhook.
    #[arg(long, env = "CONSUL_SMI_WATCHER_WEBHOOK_CERT")]
    pub webhook_cert: Option<PathBuf>,

    /// PEM private key of the conversion webhook.
    #[arg(long, env = "CONSUL_SMI_WATCHER_WEBHOOK_KEY")]
    pub webhook_key: Option<PathBuf>,

    /// How many recent changes are kept so subscribers can resume after a reconnect.
    #[arg(long, env = "CONSUL_SMI_WATCHER_HISTORY", default_value_t = 10_000)]
    pub history: usize,

    /// Events buffered per subscriber before the watcher waits for it (backpressure).
    #[arg(
        long,
        env = "CONSUL_SMI_WATCHER_SUBSCRIBER_BUFFER",
        default_value_t = 256
    )]
    pub subscriber_buffer: usize,

    /// How often the `dir:` source checks the directory for changes, in milliseconds.
    #[arg(long, env = "CONSUL_SMI_WATCHER_POLL_MS", default_value_t = 500)]
    pub poll_interval_ms: u64,

    /// How long a changed manifest must stay unchanged before the `dir:` source reads it, in
    /// milliseconds: a file caught half-written is never used unless its writer pauses longer.
    #[arg(long, env = "CONSUL_SMI_WATCHER_DIR_SETTLE_MS", default_value_t = 1000)]
    pub dir_settle_ms: u64,

    #[command(flatten)]
    pub tls: consul_smi_grpc::tls::TlsArgs,
}

impl WatcherConfig {
    /// Defaults for `source`, as if started with no flags other than `--source`.
    pub fn new(source: Source) -> WatcherConfig {
        WatcherConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 7401)),
            source,
            kubeconfig: None,
            namespace: None,
            label_selector: None,
            webhook_listen: None,
            webhook_cert: None,
            webhook_key: None,
            history: 10_000,
            subscriber_buffer: 256,
            poll_interval_ms: 500,
            dir_settle_ms: 1000,
            tls: Default::default(),
        }
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(10))
    }

    pub fn dir_options(&self) -> crate::dir_source::DirOptions {
        crate::dir_source::DirOptions {
            interval: self.poll_interval(),
            settle: Duration::from_millis(self.dir_settle_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        config: WatcherConfig,
    }

    #[test]
    fn sources_parse() {
        assert_eq!("kube".parse::<Source>(), Ok(Source::Kube));
        assert_eq!(
            "dir:/etc/smi".parse::<Source>(),
            Ok(Source::Dir("/etc/smi".into()))
        );
        assert!("dir:".parse::<Source>().is_err());
        assert!("consul".parse::<Source>().is_err());
    }

    #[test]
    fn flags_parse_and_webhook_needs_its_certificate() {
        let cli = Cli::try_parse_from([
            "w",
            "--source",
            "dir:manifests",
            "--namespace",
            "prod",
            "--selector",
            "mesh=consul",
        ])
        .unwrap();
        assert_eq!(cli.config.source, Source::Dir("manifests".into()));
        assert_eq!(cli.config.namespace.as_deref(), Some("prod"));
        assert_eq!(cli.config.label_selector.as_deref(), Some("mesh=consul"));
        assert!(Cli::try_parse_from(["w", "--webhook-listen", "127.0.0.1:9443"]).is_err());
    }
}
