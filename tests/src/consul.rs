//! Real Consul dev agents for tests.
//!
//! [`ConsulAgent::start`] finds the binary of the chosen [`ConsulRelease`]
//! (`tests/harness/install-consul.sh` installs Consul 1.8.7 on first use,
//! `tests/harness/build-consul.sh` builds Consul 1.14.11), starts `consul agent -dev` on free loopback ports,
//! waits for a leader and, with ACLs, bootstraps them and keeps the management token.
//! Dev agents keep their state in memory: [`ConsulAgent::restart`] brings the same agent
//! back on the same ports with EMPTY state, which is what a lost Consul looks like to a
//! writer. The process is killed and its data directory removed on drop.
//!
//! HTTP here is a few lines over `std::net::TcpStream`: the harness needs no async runtime
//! and no TLS.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Which Consul to run: the two intention APIs users meet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConsulRelease {
    /// 1.8.7 from Debian bullseye: the legacy `/v1/connect/intentions` API.
    #[default]
    Legacy,
    /// 1.14.11 built from its Go module: `service-intentions` config entries, L7 permissions.
    Modern,
}

impl ConsulRelease {
    /// `CONSUL_SMI_CONSUL=modern` (or `1.14`) runs a whole suite against the modern release;
    /// unset or `legacy` (`1.8`) keeps 1.8.7. Anything else is an error, not a silent default.
    pub fn from_env() -> Result<ConsulRelease> {
        match std::env::var("CONSUL_SMI_CONSUL").as_deref() {
            Err(_) | Ok("") | Ok("legacy") | Ok("1.8") => Ok(ConsulRelease::Legacy),
            Ok("modern") | Ok("1.14") => Ok(ConsulRelease::Modern),
            Ok(other) => {
                bail!("CONSUL_SMI_CONSUL={other:?}: expected legacy (1.8) or modern (1.14)")
            }
        }
    }

    /// The release for a test binary: `*_modern` targets (the e2e suite and the fault matrix
    /// compiled a second time, see tests/tests/e2e_modern.rs) run on 1.14.11, the others on
    /// what [`from_env`](Self::from_env) says.
    pub fn for_test_target(crate_name: &str) -> Result<ConsulRelease> {
        if crate_name.ends_with("_modern") {
            return Ok(ConsulRelease::Modern);
        }
        Self::from_env()
    }

    /// The script that installs or builds this release and prints its path.
    fn script(self) -> &'static str {
        match self {
            ConsulRelease::Legacy => "harness/install-consul.sh",
            ConsulRelease::Modern => "harness/build-consul.sh",
        }
    }
}

/// How to start an agent.
#[derive(Clone, Debug, Default)]
pub struct ConsulAgentOptions {
    /// Which Consul binary (default: 1.8.7).
    pub release: ConsulRelease,
    /// Enable ACLs with `default_policy = "deny"` and bootstrap them.
    pub acl: bool,
    /// Also serve HTTPS (certificates from a throw-away CA made with openssl) and require a
    /// client certificate on it (`verify_incoming_https`). Plain HTTP stays on.
    pub tls: bool,
}

impl ConsulAgentOptions {
    pub fn with_acl() -> Self {
        ConsulAgentOptions {
            acl: true,
            ..Default::default()
        }
    }

    pub fn with_tls() -> Self {
        ConsulAgentOptions {
            tls: true,
            ..Default::default()
        }
    }

    /// The same options on another release.
    pub fn on(self, release: ConsulRelease) -> Self {
        ConsulAgentOptions { release, ..self }
    }
}

/// PEM files of an agent started with [`ConsulAgentOptions::tls`].
#[derive(Clone, Debug)]
pub struct ConsulTls {
    pub ca_cert: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub(crate) struct Ports {
    pub(crate) http: u16,
    pub(crate) https: u16,
    pub(crate) dns: u16,
    pub(crate) serf_lan: u16,
    pub(crate) serf_wan: u16,
    pub(crate) server: u16,
}

impl Ports {
    pub(crate) fn pick() -> Result<Ports> {
        Ok(Ports {
            http: free_port()?,
            https: free_port()?,
            dns: free_port()?,
            serf_lan: free_port()?,
            serf_wan: free_port()?,
            server: free_port()?,
        })
    }
}

/// A running `consul agent -dev`.
pub struct ConsulAgent {
    options: ConsulAgentOptions,
    binary: PathBuf,
    dir: tempfile::TempDir,
    ports: Ports,
    child: Option<Child>,
    bootstrap_token: Option<String>,
    tls: Option<ConsulTls>,
    starts: u32,
}

/// A response from [`ConsulAgent::http`].
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

impl ConsulAgent {
    pub fn start(options: ConsulAgentOptions) -> Result<ConsulAgent> {
        let binary = consul_binary(options.release)?;
        let dir = tempfile::Builder::new()
            .prefix("consul-smi-agent-")
            .tempdir()
            .context("creating the Consul data directory")?;
        let ports = Ports::pick()?;
        let tls = if options.tls {
            Some(make_certificates(dir.path())?)
        } else {
            None
        };
        let mut agent = ConsulAgent {
            options,
            binary,
            dir,
            ports,
            child: None,
            bootstrap_token: None,
            tls,
            starts: 0,
        };
        // Free ports are found by binding port 0 and letting go, so a test running in
        // parallel can take one before Consul binds it: retry with new ports, then fail loudly.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match agent.launch() {
                Ok(()) => return Ok(agent),
                Err(error) if attempt < 3 => {
                    eprintln!(
                        "consul harness: start attempt {attempt} failed, retrying on new ports: {error:#}"
                    );
                    agent.stop();
                    agent.ports = Ports::pick()?;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// `127.0.0.1:<port>`, the form `CONSUL_HTTP_ADDR` takes.
    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.ports.http)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr())
    }

    /// `https://127.0.0.1:<port>` (TLS agents only).
    pub fn https_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|_| format!("https://127.0.0.1:{}", self.ports.https))
    }

    /// CA, client certificate and key for the HTTPS port (TLS agents only).
    pub fn tls(&self) -> Option<&ConsulTls> {
        self.tls.as_ref()
    }

    /// The management token from `/v1/acl/bootstrap` (ACL agents only).
    pub fn bootstrap_token(&self) -> Option<&str> {
        self.bootstrap_token.as_deref()
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the agent (as a crash would) and starts it again on the same ports. Dev agents
    /// come back empty; with ACLs they are bootstrapped again with a new management token.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }

    /// Kills the agent; the data directory stays until drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A raw HTTP request to the agent, with the management token when ACLs are on.
    pub fn http(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&str>,
    ) -> Result<HttpReply> {
        http_request(
            self.ports.http,
            method,
            path_and_query,
            body,
            self.bootstrap_token.as_deref(),
        )
    }

    /// Like [`http`](Self::http) with an explicit token (`None` = no token at all).
    pub fn http_with_token(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> Result<HttpReply> {
        http_request(self.ports.http, method, path_and_query, body, token)
    }

    /// Creates an ACL policy with `rules` (HCL) and a token holding only it; returns the
    /// token's SecretID.
    pub fn create_token(&self, name: &str, rules: &str) -> Result<String> {
        create_token_on(
            self.ports.http,
            self.bootstrap_token.as_deref(),
            name,
            rules,
        )
    }

    fn launch(&mut self) -> Result<()> {
        self.starts += 1;
        let log_path = self.dir.path().join(format!("consul-{}.log", self.starts));
        let log = std::fs::File::create(&log_path).context("creating the Consul log file")?;
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).context("creating the Consul data dir")?;
        let mut command = Command::new(&self.binary);
        command
            .args([
                "agent",
                "-dev",
                "-client",
                "127.0.0.1",
                "-bind",
                "127.0.0.1",
                "-advertise",
                "127.0.0.1",
            ])
            .args(["-http-port", &self.ports.http.to_string()])
            .args(["-dns-port", &self.ports.dns.to_string()])
            .args(["-serf-lan-port", &self.ports.serf_lan.to_string()])
            .args(["-serf-wan-port", &self.ports.serf_wan.to_string()])
            .args(["-server-port", &self.ports.server.to_string()])
            .args(["-grpc-port", "-1", "-disable-host-node-id"])
            .arg("-data-dir")
            .arg(&data)
            .args(["-hcl", "disable_update_check = true"]);
        if self.options.release == ConsulRelease::Modern {
            // 1.14's dev mode also listens on the fixed gRPC TLS port 8503, so parallel agents
            // would collide; 1.8.7 has no such port (and rejects the key).
            command.args(["-hcl", "ports { grpc_tls = -1 }"]);
        }
        if self.options.acl {
            command.args(["-hcl", r#"acl { enabled = true default_policy = "deny" }"#]);
        }
        if self.options.tls {
            let dir = self.dir.path();
            let path = |name: &str| dir.join(name).display().to_string();
            command
                .args(["-hcl", &format!("ports {{ https = {} }}", self.ports.https)])
                .args(["-hcl", &format!("ca_file = {:?}", path("ca.pem"))])
                .args(["-hcl", &format!("cert_file = {:?}", path("server.pem"))])
                .args(["-hcl", &format!("key_file = {:?}", path("server.key"))])
                .args(["-hcl", "verify_incoming_https = true"]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning the log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let ready = self.wait_ready();
        if let Err(e) = ready {
            self.stop();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "Consul agent on port {} did not become ready: {e:#}\n--- log tail ---\n{}",
                self.ports.http,
                tail.join("\n")
            );
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::from("no answer yet");
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!("consul exited with {status}");
            }
            if Instant::now() > deadline {
                bail!("timed out after {START_TIMEOUT:?}; last: {last}");
            }
            match http_request(self.ports.http, "GET", "/v1/status/leader", None, None) {
                Ok(reply) if reply.status == 200 && reply.body.trim().len() > 2 => break,
                Ok(reply) => last = format!("leader: HTTP {} {}", reply.status, reply.body),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.options.acl {
            // Right after election the ACL system may still be initialising; retry bootstrap.
            loop {
                match http_request(self.ports.http, "PUT", "/v1/acl/bootstrap", None, None) {
                    Ok(reply) if reply.status == 200 => {
                        let token = json_field(&reply.body, "SecretID").ok_or_else(|| {
                            anyhow!("no SecretID in bootstrap reply {}", reply.body)
                        })?;
                        self.bootstrap_token = Some(token);
                        break;
                    }
                    Ok(reply) => last = format!("bootstrap: HTTP {} {}", reply.status, reply.body),
                    Err(e) => last = format!("{e:#}"),
                }
                if Instant::now() > deadline {
                    bail!("ACL bootstrap timed out; last: {last}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Ready means writes go through, not just that a leader exists.
        loop {
            let reply = http_request(
                self.ports.http,
                "PUT",
                "/v1/kv/consul-smi-harness-ready",
                Some("1"),
                self.bootstrap_token.as_deref(),
            );
            match reply {
                Ok(reply) if reply.status == 200 => return Ok(()),
                Ok(reply) => last = format!("kv write: HTTP {} {}", reply.status, reply.body),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!("first write timed out; last: {last}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ConsulAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The consul binary of `release`: whatever its harness script prints (`CONSUL_BIN` or
/// `CONSUL_MODERN_BIN` when set).
pub fn consul_binary(release: ConsulRelease) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(release.script());
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed with {}", script.display(), output.status);
    }
    let path = String::from_utf8(output.stdout)
        .with_context(|| format!("{} printed non-UTF-8", script.display()))?;
    let path = PathBuf::from(path.lines().last().unwrap_or_default().trim());
    if !path.is_file() {
        bail!("{} printed {path:?}, which is not a file", script.display());
    }
    Ok(path)
}

/// An ACL policy with `rules` (HCL) and a token holding only it, created through the agent on
/// `port` with `management` token; returns the token's SecretID.
pub(crate) fn create_token_on(
    port: u16,
    management: Option<&str>,
    name: &str,
    rules: &str,
) -> Result<String> {
    let http = |method: &str, path: &str, body: &str| {
        http_request(port, method, path, Some(body), management)
    };
    let policy = serde_like_json_object(&[("Name", name), ("Rules", rules)]);
    let reply = http("PUT", "/v1/acl/policy", &policy)?;
    if reply.status != 200 {
        bail!(
            "creating ACL policy {name}: HTTP {} {}",
            reply.status,
            reply.body
        );
    }
    let token = format!(
        r#"{{"Description":{},"Policies":[{{"Name":{}}}]}}"#,
        json_string(name),
        json_string(name)
    );
    let reply = http("PUT", "/v1/acl/token", &token)?;
    if reply.status != 200 {
        bail!(
            "creating ACL token for policy {name}: HTTP {} {}",
            reply.status,
            reply.body
        );
    }
    json_field(&reply.body, "SecretID").ok_or_else(|| anyhow!("no SecretID in {}", reply.body))
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all P-256.
fn make_certificates(dir: &Path) -> Result<ConsulTls> {
    let openssl = |args: &[&str]| -> Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl")?;
        if !output.status.success() {
            bail!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=consul-smi test CA",
    ];
    args.extend(ec);
    args.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(&args)?;
    for (name, subject, extension) in [
        (
            "server",
            "/CN=server.dc1.consul",
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:server.dc1.consul\nextendedKeyUsage=serverAuth,clientAuth",
        ),
        (
            "client",
            "/CN=consul-smi-writer",
            "extendedKeyUsage=clientAuth",
        ),
    ] {
        let mut args = vec!["req", "-subj", subject];
        args.extend(ec);
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        args.extend(["-keyout", &key, "-out", &csr]);
        openssl(&args)?;
        let ext_file = format!("{name}.ext");
        std::fs::write(dir.join(&ext_file), extension)?;
        let pem = format!("{name}.pem");
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-extfile",
            &ext_file,
        ])?;
    }
    Ok(ConsulTls {
        ca_cert: dir.join("ca.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    })
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

pub(crate) fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Result<HttpReply> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        request.push_str(&format!("X-Consul-Token: {token}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP reply {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(HttpReply { status, body })
}

fn dechunk(mut text: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        text = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// A JSON string literal.
pub fn json_string(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn serde_like_json_object(fields: &[(&str, &str)]) -> String {
    let inner: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// The string value of a top-level `"key": "value"` in a flat JSON reply.
pub(crate) fn json_field(body: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\"");
    let at = body.find(&needle)? + needle.len();
    let rest = body[at..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}
