//! The HTTP layer: one reqwest client, bounded concurrency, a rate limit, retries with
//! jittered exponential backoff, and Consul's error conventions mapped to [`ConsulError`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::ConsulConfig;
use crate::error::ConsulError;
use crate::version::{ApiFlavor, ConsulVersion};

/// Installs ring as the process-wide rustls provider (the workspace builds reqwest with
/// `rustls-no-provider`). Safe to call many times; a provider installed earlier wins.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How Consul wraps an error it forwarded from another agent (a client agent to a server, a
/// follower to the leader): `rpc error making call: <error>` (agent/consul/rpc.go, 1.8.7 and
/// 1.14.11), `rpc error: <error>` from the pool, possibly nested. The reason is what follows.
const FORWARDING_PREFIXES: &[&str] = &[
    "rpc error making call:",
    "rpc error getting client:",
    "rpc error:",
];

/// HTTP 500 reasons (after the forwarding prefixes) that mean "try again later" rather than
/// "your request is invalid": Consul's own phrases, matched at the start of the reason so a
/// service name in a validation message (`videofeed` holds `eof`) never looks transient.
/// Consul 1.8 reports validation errors as 500 too, so everything else is final.
const TRANSIENT_500_STARTS: &[&str] = &[
    "no cluster leader",
    "leadership lost",
    "not the leader",
    "node is not the leader",
    "not ready to serve consistent reads",
    "raft ",
    "eof",
    "unexpected eof",
    "timed out",
    "rate limit",
    "too many requests",
    "failed to get conn",
];

/// Network failures between agents end a reason after a `: ` (`dial tcp 10.0.0.2:8300:
/// connect: connection refused`); a Kubernetes name cannot follow `: `.
const TRANSIENT_500_ENDS: &[&str] = &[
    ": connection refused",
    ": connection reset by peer",
    ": i/o timeout",
    ": eof",
    ": broken pipe",
    ": no route to host",
];

/// `message` without Consul's forwarding prefixes.
fn forwarded_reason(message: &str) -> &str {
    let mut reason = message.trim();
    while let Some(rest) = FORWARDING_PREFIXES.iter().find_map(|prefix| {
        reason
            .get(..prefix.len())
            .filter(|head| head.eq_ignore_ascii_case(prefix))
            .map(|_| &reason[prefix.len()..])
    }) {
        reason = rest.trim_start();
    }
    reason
}

const MAX_RETRY_DELAY: Duration = Duration::from_millis(2000);

/// Sees every HTTP attempt, for metrics and trace propagation (the writer plugs telemetry
/// in here so this crate stays free of it).
pub trait RequestObserver: Send + Sync + 'static {
    /// `status` is `None` when no HTTP response arrived (connect, TLS or timeout failure).
    fn observe(&self, method: &Method, path: &str, status: Option<u16>, elapsed: Duration);

    /// Adds headers to an outgoing request, e.g. W3C `traceparent`.
    fn add_headers(&self, _headers: &mut reqwest::header::HeaderMap) {}
}

/// A Consul response body with the `X-Consul-Index` of blocking-capable endpoints.
#[derive(Debug)]
pub struct RawResponse {
    pub index: Option<u64>,
    pub body: Vec<u8>,
}

/// A list result with its `X-Consul-Index`, for blocking queries.
#[derive(Clone, Debug)]
pub struct Indexed<T> {
    pub index: u64,
    pub value: T,
}

/// A blocking query: wait until the index moves past `index` or `wait` elapses.
#[derive(Clone, Copy, Debug)]
pub struct Blocking {
    pub index: u64,
    pub wait: Duration,
}

/// One request to Consul, described without borrowing the client.
#[derive(Debug)]
pub struct Call<'a> {
    pub method: Method,
    pub path: String,
    pub query: Vec<(&'static str, String)>,
    pub body: Option<Vec<u8>>,
    /// Used in errors and logs, e.g. `intention web -> api`.
    pub what: &'a str,
    pub blocking: Option<Blocking>,
}

impl<'a> Call<'a> {
    pub fn new(method: Method, path: impl Into<String>, what: &'a str) -> Self {
        Call {
            method,
            path: path.into(),
            query: Vec::new(),
            body: None,
            what,
            blocking: None,
        }
    }

    pub fn query(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.query.push((key, value.into()));
        self
    }

    pub fn json<T: Serialize>(mut self, body: &T) -> Result<Self, ConsulError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ConsulError::Decode {
            what: self.what.to_string(),
            message: format!("cannot encode request body: {e}"),
        })?;
        self.body = Some(bytes);
        Ok(self)
    }

    pub fn blocking(mut self, blocking: Option<Blocking>) -> Self {
        self.blocking = blocking;
        self
    }
}

/// Spaces requests `interval` apart on average, allowing a burst of up to `burst` worth of
/// unused time (tokio timers tick in milliseconds; sleeping per request at 5000/s would
/// serialise everything on that tick).
struct RateLimiter {
    interval: Duration,
    burst: Duration,
    next_slot: Mutex<Instant>,
}

impl RateLimiter {
    fn new(per_second: f64) -> Self {
        RateLimiter {
            interval: Duration::from_secs_f64(1.0 / per_second),
            burst: Duration::from_millis(10),
            next_slot: Mutex::new(Instant::now()),
        }
    }

    /// Reserves the next slot at `now`; the caller waits until it.
    fn reserve(&self, now: Instant) -> Instant {
        let mut next = self.next_slot.lock().unwrap_or_else(|e| e.into_inner());
        let earliest = now.checked_sub(self.burst).unwrap_or(now);
        let slot = (*next).max(earliest);
        *next = slot + self.interval;
        slot
    }

    async fn acquire(&self) {
        let now = Instant::now();
        let slot = self.reserve(now);
        if slot > now {
            tokio::time::sleep_until(slot).await;
        }
    }
}

struct Inner {
    http: reqwest::Client,
    base_url: String,
    token: Option<String>,
    datacenter: Option<String>,
    namespace: Option<String>,
    partition: Option<String>,
    permits: Semaphore,
    rate: Option<RateLimiter>,
    max_attempts: u32,
    retry_base: Duration,
    request_timeout: Duration,
    flavor: OnceCell<ApiFlavor>,
    observer: Option<Arc<dyn RequestObserver>>,
}

/// A cheaply clonable Consul HTTP client.
#[derive(Clone)]
pub struct ConsulClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ConsulClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulClient")
            .field("base_url", &self.inner.base_url)
            .field("token", &self.inner.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ConsulClient {
    /// Builds the client (reads the token file and TLS files now, so mistakes fail fast).
    pub fn new(config: &ConsulConfig) -> Result<Self, ConsulError> {
        Self::with_observer(config, None)
    }

    /// Like [`new`](Self::new), reporting every HTTP attempt to `observer`.
    pub fn with_observer(
        config: &ConsulConfig,
        observer: Option<Arc<dyn RequestObserver>>,
    ) -> Result<Self, ConsulError> {
        install_crypto_provider();
        let base_url = config.base_url()?;
        let token = config.resolve_token()?;
        let mut builder = reqwest::Client::builder()
            // Consul cleans `..` out of a decoded path and answers 301 to the cleaned one;
            // following it would repeat the method, with the token, on another endpoint.
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(config.max_concurrency.max(1))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        if let Some(path) = &config.ca_cert {
            let pem = read_file("CONSUL_CACERT", path)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ConsulError::Config(format!("CONSUL_CACERT {}: {e}", path.display()))
            })?;
            builder = builder.tls_certs_only(certs);
        }
        if let (Some(cert), Some(key)) = (&config.client_cert, &config.client_key) {
            let mut pem = read_file("CONSUL_CLIENT_CERT", cert)?;
            pem.push(b'\n');
            pem.extend(read_file("CONSUL_CLIENT_KEY", key)?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                ConsulError::Config(format!(
                    "CONSUL_CLIENT_CERT {} / CONSUL_CLIENT_KEY {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })?;
            builder = builder.identity(identity);
        } else if config.client_cert.is_some() != config.client_key.is_some() {
            return Err(ConsulError::Config(
                "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY must be set together".into(),
            ));
        }
        if !config.ssl_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| ConsulError::Config(format!("cannot build HTTP client: {e}")))?;
        let rate = (config.rate_limit > 0.0).then(|| RateLimiter::new(config.rate_limit));
        Ok(ConsulClient {
            inner: Arc::new(Inner {
                http,
                base_url,
                token,
                datacenter: config.datacenter.clone().filter(|s| !s.is_empty()),
                namespace: config.namespace.clone().filter(|s| !s.is_empty()),
                partition: config.partition.clone().filter(|s| !s.is_empty()),
                permits: Semaphore::new(config.max_concurrency.max(1)),
                rate,
                max_attempts: config.max_attempts.max(1),
                retry_base: config.retry_base,
                request_timeout: config.request_timeout,
                flavor: OnceCell::new(),
                observer,
            }),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    pub fn has_token(&self) -> bool {
        self.inner.token.is_some()
    }

    /// The namespace to use for an object that names `namespace` (Enterprise `?ns=`).
    pub fn namespace_for<'n>(&'n self, namespace: Option<&'n str>) -> Option<&'n str> {
        namespace.or(self.inner.namespace.as_deref())
    }

    /// Which intentions API this server speaks; detected once, then cached.
    pub async fn flavor(&self) -> Result<ApiFlavor, ConsulError> {
        self.inner
            .flavor
            .get_or_try_init(|| self.detect_flavor())
            .await
            .copied()
    }

    /// `/v1/agent/self` `.Config.Version`, uncached.
    pub async fn agent_version(&self) -> Result<ConsulVersion, ConsulError> {
        #[derive(serde::Deserialize)]
        struct AgentSelf {
            #[serde(rename = "Config")]
            config: AgentConfig,
        }
        #[derive(serde::Deserialize)]
        struct AgentConfig {
            #[serde(rename = "Version")]
            version: String,
        }
        let what = "GET /v1/agent/self";
        let me: AgentSelf = self
            .get_json(Call::new(Method::GET, "/v1/agent/self", what))
            .await?;
        ConsulVersion::parse(&me.config.version).ok_or_else(|| ConsulError::Decode {
            what: what.into(),
            message: format!("unparsable Config.Version {:?}", me.config.version),
        })
    }

    async fn detect_flavor(&self) -> Result<ApiFlavor, ConsulError> {
        match self.agent_version().await {
            Ok(version) => {
                let flavor = ApiFlavor::for_version(version);
                tracing::info!(%version, ?flavor, "detected Consul version");
                Ok(flavor)
            }
            // `/v1/agent/self` needs agent:read, which a least-privilege writer token lacks.
            // Probe instead: 1.8 rejects the service-intentions kind with 400.
            Err(ConsulError::PermissionDenied { .. }) => {
                let what = "probe GET /v1/config/service-intentions";
                let call = Call::new(Method::GET, "/v1/config/service-intentions", what);
                match self.send(call).await {
                    Ok(_) | Err(ConsulError::PermissionDenied { .. }) => {
                        tracing::info!("no agent:read; service-intentions kind exists: modern API");
                        Ok(ApiFlavor::Modern)
                    }
                    Err(ConsulError::Validation { .. }) => {
                        tracing::info!(
                            "no agent:read; service-intentions kind unknown: legacy API"
                        );
                        Ok(ApiFlavor::Legacy)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    pub async fn get_json<T: DeserializeOwned>(&self, call: Call<'_>) -> Result<T, ConsulError> {
        let what = call.what.to_string();
        let response = self.send(call).await?;
        decode(&what, &response.body)
    }

    pub async fn get_indexed<T: DeserializeOwned>(
        &self,
        call: Call<'_>,
    ) -> Result<Indexed<T>, ConsulError> {
        let what = call.what.to_string();
        let response = self.send(call).await?;
        Ok(Indexed {
            index: response.index.unwrap_or(0),
            value: decode(&what, &response.body)?,
        })
    }

    /// Sends with retries. Validation errors, 403 and 404 are returned at once.
    pub async fn send(&self, call: Call<'_>) -> Result<RawResponse, ConsulError> {
        let inner = &self.inner;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result =
                {
                    // Blocking queries park for minutes; they must not starve writes of permits.
                    let _permit =
                        match call.blocking {
                            Some(_) => None,
                            None => Some(inner.permits.acquire().await.map_err(|_| {
                                ConsulError::Config("client semaphore closed".into())
                            })?),
                        };
                    if let Some(rate) = &inner.rate {
                        rate.acquire().await;
                    }
                    self.send_once(&call).await
                };
            match result {
                Ok(response) => return Ok(response),
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Transient(message)) => {
                    if attempt >= inner.max_attempts {
                        return Err(ConsulError::Unavailable {
                            what: call.what.to_string(),
                            attempts: attempt,
                            message,
                        });
                    }
                    let delay = backoff(inner.retry_base, attempt);
                    tracing::debug!(what = call.what, attempt, ?delay, %message, "retrying Consul request");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One HTTP attempt in its own client span; the observer's `traceparent` names that span,
    /// so Consul-side tooling (or a proxy) can join the trace.
    async fn send_once(&self, call: &Call<'_>) -> Result<RawResponse, Attempt> {
        let span = tracing::info_span!(
            "consul_request",
            otel.kind = "client",
            http.request.method = %call.method,
            url.path = %call.path,
            what = call.what,
            http.response.status_code = tracing::field::Empty,
            consul.index = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        self.send_once_in_span(call).instrument(span).await
    }

    async fn send_once_in_span(&self, call: &Call<'_>) -> Result<RawResponse, Attempt> {
        let inner = &self.inner;
        let url = format!("{}{}", inner.base_url, call.path);
        let mut request = inner.http.request(call.method.clone(), url);
        let mut query: Vec<(&str, String)> = call.query.clone();
        if let Some(dc) = &inner.datacenter {
            query.push(("dc", dc.clone()));
        }
        if let Some(partition) = &inner.partition {
            query.push(("partition", partition.clone()));
        }
        let timeout = match call.blocking {
            Some(blocking) => {
                query.push(("index", blocking.index.to_string()));
                query.push(("wait", format!("{}ms", blocking.wait.as_millis())));
                // Consul adds up to wait/16 of jitter to a blocking query.
                blocking.wait + blocking.wait / 16 + inner.request_timeout
            }
            None => inner.request_timeout,
        };
        if !query.is_empty() {
            request = request.query(&query);
        }
        if let Some(token) = &inner.token {
            request = request.header("X-Consul-Token", token);
        }
        if let Some(observer) = &inner.observer {
            let mut headers = reqwest::header::HeaderMap::new();
            observer.add_headers(&mut headers);
            if !headers.is_empty() {
                request = request.headers(headers);
            }
        }
        let started = std::time::Instant::now();
        let observe = |status: Option<u16>| {
            let span = tracing::Span::current();
            match status {
                Some(status) => {
                    span.record("http.response.status_code", status);
                    if status >= 400 {
                        span.record("otel.status_code", "ERROR");
                    }
                }
                None => {
                    span.record("otel.status_code", "ERROR");
                }
            }
            if let Some(observer) = &inner.observer {
                observer.observe(&call.method, &call.path, status, started.elapsed());
            }
        };
        if let Some(body) = &call.body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.clone());
        }
        let response = match request.timeout(timeout).send().await {
            Ok(response) => response,
            Err(e) => {
                observe(None);
                return Err(Attempt::Transient(error_chain(&e)));
            }
        };
        let status = response.status();
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        if let Some(index) = index {
            tracing::Span::current().record("consul.index", index);
        }
        if status.is_redirection() {
            // The body (and Location) describe another endpoint: neither is echoed.
            observe(Some(status.as_u16()));
            return Err(Attempt::Final(ConsulError::Refused {
                what: call.what.to_string(),
                message: format!(
                    "Consul answered HTTP {} (a redirect); consul-smi never follows redirects",
                    status.as_u16()
                ),
            }));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| {
                observe(None);
                Attempt::Transient(error_chain(&e))
            })?
            .to_vec();
        observe(Some(status.as_u16()));
        if status.is_success() {
            return Ok(RawResponse { index, body });
        }
        Err(self.classify(call, status, &String::from_utf8_lossy(&body)))
    }

    /// Maps an error answer to what the caller should do. Messages carry a short excerpt of
    /// the body (Consul's reason), never the whole of it.
    fn classify(&self, call: &Call<'_>, status: StatusCode, body: &str) -> Attempt {
        let what = call.what.to_string();
        let message = body_excerpt(body.trim());
        match status {
            StatusCode::FORBIDDEN => {
                let hint = if self.inner.token.is_none() {
                    "no ACL token is configured; set CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE"
                        .to_string()
                } else if message.contains("ACL not found") {
                    "the configured token (CONSUL_HTTP_TOKEN) is unknown to Consul".to_string()
                } else {
                    "the configured token lacks the ACL rights for this request (intentions need \
                     service `intentions = \"write\"` on the destination; service-splitter and \
                     service-defaults need service `policy = \"write\"`)"
                        .to_string()
                };
                Attempt::Final(ConsulError::PermissionDenied {
                    what,
                    message,
                    hint,
                })
            }
            StatusCode::NOT_FOUND => Attempt::Final(ConsulError::NotFound { what, message }),
            StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => {
                Attempt::Transient(format!("HTTP {status}: {message}"))
            }
            StatusCode::INTERNAL_SERVER_ERROR => {
                if is_transient_500(body) {
                    Attempt::Transient(format!("HTTP 500: {message}"))
                } else {
                    Attempt::Final(ConsulError::Validation {
                        what,
                        message: body_excerpt(&clean_validation(body)),
                    })
                }
            }
            s if s.is_client_error() => Attempt::Final(ConsulError::Validation {
                what,
                message: body_excerpt(&clean_validation(body)),
            }),
            s => Attempt::Final(ConsulError::Unexpected {
                what,
                status: s.as_u16(),
                message,
            }),
        }
    }
}

enum Attempt {
    Transient(String),
    Final(ConsulError),
}

/// How much of a Consul error body a message quotes: enough for Consul's reason (validation
/// messages are one line), not enough to carry another endpoint's content.
const BODY_EXCERPT_CHARS: usize = 240;

fn body_excerpt(body: &str) -> String {
    consul_smi_core::text::excerpt(body, BODY_EXCERPT_CHARS)
}

fn is_transient_500(body: &str) -> bool {
    let lower = forwarded_reason(body).to_ascii_lowercase();
    // A multierror list is always validation, even if an item mentions a transient word.
    if is_multierror(&lower) {
        return false;
    }
    let first = lower.lines().next().unwrap_or_default().trim_end();
    TRANSIENT_500_STARTS
        .iter()
        .any(|start| first.starts_with(start))
        || TRANSIENT_500_ENDS.iter().any(|end| first.ends_with(end))
}

fn is_multierror(text: &str) -> bool {
    text.lines().next().is_some_and(|first| {
        let first = first.trim_start_matches("bad request: request decoding failed: ");
        first.ends_with(" error occurred:") || first.ends_with(" errors occurred:")
    })
}

/// Turns `1 error occurred:\n\t* msg\n\n` into `msg` (and several items into `a; b`).
/// The forwarding prefixes are dropped too: they say which hop relayed the refusal, not why.
pub fn clean_validation(body: &str) -> String {
    let body = forwarded_reason(body);
    let items: Vec<&str> = body
        .lines()
        .filter_map(|line| line.trim().strip_prefix("* "))
        .map(str::trim)
        .collect();
    if is_multierror(&body.to_ascii_lowercase()) && !items.is_empty() {
        let prefix = body.lines().next().unwrap_or_default();
        let prefix = prefix
            .find(|c: char| c.is_ascii_digit())
            .map(|i| prefix[..i].trim())
            .unwrap_or_default();
        let joined = items.join("; ");
        if prefix.is_empty() {
            joined
        } else {
            format!("{prefix} {joined}")
        }
    } else {
        body.trim().to_string()
    }
}

fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_RETRY_DELAY);
    let millis = exp.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis.max(1)))
}

fn decode<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, ConsulError> {
    serde_json::from_slice(body).map_err(|e| ConsulError::Decode {
        what: what.to_string(),
        // serde quotes the values it could not use.
        message: body_excerpt(&e.to_string()),
    })
}

fn read_file(variable: &str, path: &std::path::Path) -> Result<Vec<u8>, ConsulError> {
    std::fs::read(path)
        .map_err(|e| ConsulError::Config(format!("{variable} {}: {e}", path.display())))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consul_18_validation_bodies_are_not_transient() {
        let body = "1 error occurred:\n\t* Action must be set to 'allow' or 'deny'\n\n";
        assert!(!is_transient_500(body));
        assert_eq!(
            clean_validation(body),
            "Action must be set to 'allow' or 'deny'"
        );
        let two = "2 errors occurred:\n\t* a\n\t* b\n\n";
        assert_eq!(clean_validation(two), "a; b");
        let decode = "Bad request: Request decoding failed: 1 error occurred:\n\t* invalid config key \"X\"\n\n";
        assert_eq!(
            clean_validation(decode),
            "Bad request: Request decoding failed: invalid config key \"X\""
        );
        assert!(!is_transient_500(
            "duplicate intention found: ALLOW default/a => default/b"
        ));
        assert!(!is_transient_500(
            "Failed to decode request body: json: unknown field \"Permissions\""
        ));
    }

    #[test]
    fn leader_and_rpc_troubles_are_transient() {
        assert!(is_transient_500("No cluster leader"));
        assert!(is_transient_500("rpc error making call: EOF"));
        assert!(is_transient_500(
            "rpc error: leadership lost while committing log"
        ));
        assert!(is_transient_500(
            "rpc error making call: rpc error making call: No cluster leader"
        ));
        assert!(is_transient_500(
            "rpc error making call: dial tcp 10.0.0.2:8300: connect: connection refused"
        ));
        // A client agent whose server was just killed (seen against a real 1.14 cluster).
        assert!(is_transient_500(
            "rpc error making call: rpc error getting client: failed to get conn: dial tcp 127.0.0.1:0->127.0.0.1:38853: connect: connection refused"
        ));
    }

    #[test]
    fn forwarded_refusals_are_final_and_names_never_look_transient() {
        // A client agent's forward of a 1.14 validation error (seen against a real cluster).
        let forwarded = "rpc error making call: Sources[0].Action must be set to 'allow' or 'deny'";
        assert!(!is_transient_500(forwarded));
        assert_eq!(
            clean_validation(forwarded),
            "Sources[0].Action must be set to 'allow' or 'deny'"
        );
        assert!(!is_transient_500(
            "rpc error making call: duplicate intention found: ALLOW default/videofeed => default/api"
        ));
        assert!(!is_transient_500(
            "duplicate intention found: ALLOW default/eof => default/raft"
        ));
    }

    #[test]
    fn rate_limiter_spaces_slots_and_allows_a_small_burst() {
        let limiter = RateLimiter::new(1000.0);
        let now = Instant::now() + Duration::from_secs(1);
        // After idle time, up to `burst` (10 ms = 10 slots) may go at once...
        let slots: Vec<Instant> = (0..30).map(|_| limiter.reserve(now)).collect();
        assert_eq!(slots.iter().filter(|s| **s <= now).count(), 11);
        // ...then slots are spaced by the interval: 30 requests span 29 ms.
        for pair in slots.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_millis(1));
        }
        assert_eq!(*slots.last().unwrap() - now, Duration::from_millis(19));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(50);
        for attempt in 1..20 {
            let delay = backoff(base, attempt);
            assert!(delay <= MAX_RETRY_DELAY, "{attempt}: {delay:?}");
        }
        assert!(backoff(base, 1) <= Duration::from_millis(50));
        assert!(backoff(base, 5) >= Duration::from_millis(400));
    }
}
