//! How to reach Consul: the same environment variables as the `consul` CLI, plus the
//! writer's own limits (concurrency, rate, retries).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::error::ConsulError;

/// Connection settings. Every field has a `CONSUL_*` environment fallback named like the
/// Consul CLI's, so a writer configured like `consul` talks to the same agent.
#[derive(Clone, Debug, clap::Args)]
pub struct ConsulConfig {
    /// Consul HTTP address: `host:port`, `http://host:port` or `https://host:port`.
    #[arg(
        long = "consul-http-addr",
        env = "CONSUL_HTTP_ADDR",
        default_value = "127.0.0.1:8500"
    )]
    pub address: String,

    /// Use https when the address has no scheme (like the CLI's `CONSUL_HTTP_SSL`).
    #[arg(
        long = "consul-http-ssl",
        env = "CONSUL_HTTP_SSL",
        default_value_t = false
    )]
    pub ssl: bool,

    /// Verify the server certificate (`CONSUL_HTTP_SSL_VERIFY=false` disables it, as in the CLI).
    #[arg(
        long = "consul-http-ssl-verify",
        env = "CONSUL_HTTP_SSL_VERIFY",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub ssl_verify: bool,

    /// ACL token sent as `X-Consul-Token`.
    #[arg(
        long = "consul-http-token",
        env = "CONSUL_HTTP_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// File holding the ACL token; read at start-up. `CONSUL_HTTP_TOKEN` wins when both are set.
    #[arg(long = "consul-http-token-file", env = "CONSUL_HTTP_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM CA bundle used instead of the system roots.
    #[arg(long = "consul-cacert", env = "CONSUL_CACERT")]
    pub ca_cert: Option<PathBuf>,

    /// PEM client certificate for servers with `verify_incoming`.
    #[arg(
        long = "consul-client-cert",
        env = "CONSUL_CLIENT_CERT",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,

    /// PEM private key of the client certificate.
    #[arg(
        long = "consul-client-key",
        env = "CONSUL_CLIENT_KEY",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,

    /// Datacenter (`?dc=`); defaults to the agent's own.
    #[arg(long = "consul-datacenter", env = "CONSUL_DATACENTER")]
    pub datacenter: Option<String>,

    /// Enterprise namespace used when an object names none (`?ns=`).
    #[arg(long = "consul-namespace", env = "CONSUL_NAMESPACE")]
    pub namespace: Option<String>,

    /// Enterprise admin partition (`?partition=`).
    #[arg(long = "consul-partition", env = "CONSUL_PARTITION")]
    pub partition: Option<String>,

    /// At most this many Consul requests in flight (blocking watch queries excluded).
    #[arg(
        long = "consul-max-concurrency",
        env = "CONSUL_SMI_CONSUL_MAX_CONCURRENCY",
        default_value_t = 16
    )]
    pub max_concurrency: usize,

    /// At most this many Consul requests per second (0 = unlimited).
    #[arg(
        long = "consul-rate-limit",
        env = "CONSUL_SMI_CONSUL_RATE_LIMIT",
        default_value_t = 5000.0
    )]
    pub rate_limit: f64,

    /// Attempts per request for transient failures (connection errors, 429, non-validation 5xx).
    #[arg(
        long = "consul-max-attempts",
        env = "CONSUL_SMI_CONSUL_MAX_ATTEMPTS",
        default_value_t = 6
    )]
    pub max_attempts: u32,

    /// First retry delay; doubles each attempt with full jitter, capped at 2 s.
    #[arg(long = "consul-retry-base", env = "CONSUL_SMI_CONSUL_RETRY_BASE", default_value = "50ms", value_parser = parse_duration)]
    pub retry_base: Duration,

    /// Timeout of one non-blocking request.
    #[arg(long = "consul-request-timeout", env = "CONSUL_SMI_CONSUL_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
}

#[derive(Parser)]
struct EnvOnly {
    #[command(flatten)]
    config: ConsulConfig,
}

impl ConsulConfig {
    /// Settings from the environment only (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`, ...).
    pub fn from_env() -> Result<Self, ConsulError> {
        EnvOnly::try_parse_from(["consul-smi"])
            .map(|parsed| parsed.config)
            .map_err(|e| ConsulError::Config(e.to_string()))
    }

    /// Defaults plus the given address; ignores the environment (for tests and embedding).
    pub fn for_address(address: impl Into<String>) -> Self {
        ConsulConfig {
            address: address.into(),
            ssl: false,
            ssl_verify: true,
            token: None,
            token_file: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            datacenter: None,
            namespace: None,
            partition: None,
            max_concurrency: 16,
            rate_limit: 5000.0,
            max_attempts: 6,
            retry_base: Duration::from_millis(50),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// The token, from `token` or else `token_file` (trimmed, as the CLI does).
    pub fn resolve_token(&self) -> Result<Option<String>, ConsulError> {
        if let Some(token) = self.token.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Some(token.to_string()));
        }
        match &self.token_file {
            None => Ok(None),
            Some(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    ConsulError::Config(format!("CONSUL_HTTP_TOKEN_FILE {}: {e}", path.display()))
                })?;
                let token = token.trim();
                Ok((!token.is_empty()).then(|| token.to_string()))
            }
        }
    }

    /// `scheme://host:port` without a trailing slash.
    pub fn base_url(&self) -> Result<String, ConsulError> {
        let address = self.address.trim().trim_end_matches('/');
        if address.is_empty() {
            return Err(ConsulError::Config("CONSUL_HTTP_ADDR is empty".into()));
        }
        if address.starts_with("unix://") {
            return Err(ConsulError::Config(format!(
                "CONSUL_HTTP_ADDR {address}: unix sockets are not supported; use host:port"
            )));
        }
        if address.starts_with("http://") || address.starts_with("https://") {
            return Ok(address.to_string());
        }
        if address.contains("://") {
            return Err(ConsulError::Config(format!(
                "CONSUL_HTTP_ADDR {address}: scheme must be http or https"
            )));
        }
        let scheme = if self.ssl { "https" } else { "http" };
        Ok(format!("{scheme}://{address}"))
    }
}

/// Parses `250ms`, `2s`, `1m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?} (use ms, s or m)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_gets_a_scheme_like_the_cli() {
        let mut config = ConsulConfig::for_address("127.0.0.1:8500");
        assert_eq!(config.base_url().unwrap(), "http://127.0.0.1:8500");
        config.ssl = true;
        assert_eq!(config.base_url().unwrap(), "https://127.0.0.1:8500");
        config.address = "http://consul:8500/".into();
        assert_eq!(config.base_url().unwrap(), "http://consul:8500");
        config.address = "https://consul:8501".into();
        assert_eq!(config.base_url().unwrap(), "https://consul:8501");
        config.address = "ftp://consul".into();
        assert!(config.base_url().is_err());
    }

    #[test]
    fn token_comes_from_the_file_when_not_given_directly() {
        let dir = std::env::temp_dir().join(format!("consul-smi-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  secret-from-file\n").unwrap();
        let mut config = ConsulConfig::for_address("x:1");
        config.token_file = Some(file.clone());
        assert_eq!(
            config.resolve_token().unwrap().as_deref(),
            Some("secret-from-file")
        );
        config.token = Some("direct".into());
        assert_eq!(config.resolve_token().unwrap().as_deref(), Some("direct"));
        config.token = None;
        config.token_file = Some(dir.join("missing"));
        let err = config.resolve_token().unwrap_err().to_string();
        assert!(err.contains("CONSUL_HTTP_TOKEN_FILE"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("1h").is_err());
    }
}
