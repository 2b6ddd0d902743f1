//! Real etcd + apiextensions-apiserver for tests.
//!
//! [`KubeApiServer::start`] runs `tests/harness/build-apiserver.sh` (cached binaries), makes a
//! CA, a serving certificate for 127.0.0.1 and a `system:masters` client certificate with
//! openssl, starts etcd and the upstream `apiextensions-apiserver` on free loopback ports,
//! writes a kubeconfig and waits until the server answers a real request. Facts about this
//! server (`shared/reference/kube-apiserver.md`): `/readyz` stays 500 forever and `/apis`
//! discovery is 404, so readiness is a CRD list and every client must address
//! group/version/resource directly; only CRDs and custom resources are served.
//!
//! Everything lives in a temporary directory and the processes are killed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// How long a component may take to come up before the harness gives up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// etcd key prefix of the standalone apiextensions-apiserver (its `--etcd-prefix` default).
pub const ETCD_PREFIX: &str = "/registry/apiextensions.kubernetes.io";

/// A running etcd + apiextensions-apiserver pair.
pub struct KubeApiServer {
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    etcd_port: u16,
    apiserver_port: u16,
    restarts: u32,
    client: kube::Client,
}

/// A serving certificate signed by the harness CA, e.g. for a conversion webhook the API
/// server calls.
#[derive(Clone, Debug)]
pub struct ServingCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// PEM of the CA that signed it: the CRD's `caBundle`.
    pub ca_pem: Vec<u8>,
}

impl KubeApiServer {
    /// Starts etcd and the API server. Fails (never skips) if anything cannot start.
    pub async fn start() -> Result<KubeApiServer> {
        let bin_dir = tokio::task::spawn_blocking(build_binaries).await??;
        // A free port can be taken between probing and binding: a fresh attempt probes again.
        let mut errors = Vec::new();
        for _attempt in 0..3 {
            match Self::try_start(&bin_dir).await {
                Ok(server) => return Ok(server),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        bail!(
            "the API server harness did not start:\n{}",
            errors.join("\n---\n")
        )
    }

    async fn try_start(bin_dir: &Path) -> Result<KubeApiServer> {
        let dir = tempfile::Builder::new()
            .prefix("consul-smi-kube-")
            .tempdir()?;
        make_certificates(dir.path())?;
        let (etcd_port, etcd_peer_port, apiserver_port) =
            (free_port()?, free_port()?, free_port()?);
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(dir.path(), apiserver_port))?;
        let etcd = start_etcd(bin_dir, dir.path(), etcd_port, etcd_peer_port)?;
        let client = client_from_kubeconfig(&kubeconfig).await?;
        let mut server = KubeApiServer {
            dir,
            bin_dir: bin_dir.to_path_buf(),
            etcd: Some(etcd),
            apiserver: None,
            etcd_port,
            apiserver_port,
            restarts: 0,
            client,
        };
        server.start_apiserver().await?;
        Ok(server)
    }

    /// Path of a kubeconfig with the `system:masters` client certificate.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A client for the server (cheap to clone; kept across restarts: the port is stable).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// PEM of the CA that signed every certificate the harness made.
    pub fn ca_pem(&self) -> Result<Vec<u8>> {
        Ok(std::fs::read(self.dir.path().join("ca.crt"))?)
    }

    /// Issues a serving certificate for 127.0.0.1/localhost signed by the harness CA.
    pub fn issue_serving_cert(&self, name: &str) -> Result<ServingCert> {
        let dir = self.dir.path();
        issue_cert(dir, name, &format!("/CN={name}"), "serverAuth")?;
        Ok(ServingCert {
            cert_path: dir.join(format!("{name}.crt")),
            key_path: dir.join(format!("{name}.key")),
            ca_pem: self.ca_pem()?,
        })
    }

    /// Kills the API server (SIGKILL, like a crash) and starts it again on the same port with
    /// the same etcd, so all data survives. Waits until it serves again.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop_apiserver();
        self.start_apiserver().await
    }

    /// Kills the API server and leaves it down (etcd keeps running).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the API server (again) on its port and waits until it serves a real request.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        if self.apiserver.is_some() {
            bail!("the API server is already running");
        }
        let log = self
            .dir
            .path()
            .join(format!("apiserver-{}.log", self.restarts));
        self.restarts += 1;
        let dir = self.dir.path();
        let kubeconfig = self.kubeconfig_path();
        let mut child = Command::new(self.bin_dir.join("apiextensions-apiserver"))
            .arg(format!(
                "--etcd-servers=http://127.0.0.1:{}",
                self.etcd_port
            ))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", self.apiserver_port))
            .arg(format!(
                "--tls-cert-file={}",
                dir.join("apiserver.crt").display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                dir.join("apiserver.key").display()
            ))
            .arg(format!("--client-ca-file={}", dir.join("ca.crt").display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg("--authentication-skip-lookup")
            .arg("--enable-priority-and-fairness=false")
            .arg(
                "--disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionPolicy,\
                 MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(std::fs::File::create(&log)?.try_clone()?))
            .spawn()
            .context("spawning apiextensions-apiserver")?;

        // /readyz never turns 200 on this server; a CRD list is the real readiness signal.
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "apiextensions-apiserver exited with {status}:\n{}",
                    tail(&log)
                );
            }
            if crds.list(&ListParams::default().limit(1)).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "apiextensions-apiserver did not serve within {START_TIMEOUT:?}:\n{}",
                    tail(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.apiserver = Some(child);
        // After a restart the server answers before it has loaded the CRDs from etcd: their
        // resources are 404 until then. "Up" means serving everything it served before.
        for crd in crds.list(&ListParams::default()).await?.items {
            let established = crd
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                for version in crd.spec.versions.iter().filter(|v| v.served) {
                    wait_servable(&self.client, &api_resource(&crd, &version.name)).await?;
                }
            }
        }
        Ok(())
    }

    /// Creates (or replaces) the CRDs, waits until each is Established and until every served
    /// version of its resource answers a list (right after creation the resource may answer
    /// 429 "storage is (re)initializing").
    pub async fn install_crds(&self, crds: &[CustomResourceDefinition]) -> Result<()> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for crd in crds {
            let name = crd
                .metadata
                .name
                .clone()
                .context("CRD without metadata.name")?;
            match api.create(&PostParams::default(), crd).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let existing = api.get(&name).await?;
                    let mut replacement = crd.clone();
                    replacement.metadata.resource_version = existing.metadata.resource_version;
                    api.replace(&name, &PostParams::default(), &replacement)
                        .await
                        .with_context(|| format!("replacing CRD {name}"))?;
                }
                Err(e) => return Err(e).with_context(|| format!("creating CRD {name}")),
            }
        }
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            wait_established(&api, &name).await?;
            for version in crd.spec.versions.iter().filter(|v| v.served) {
                wait_servable(&self.client, &api_resource(crd, &version.name)).await?;
            }
        }
        Ok(())
    }

    /// Deletes one key straight from etcd, behind the API server's back: what another API
    /// server replica's delete looks like to a watcher whose own server is down. Returns how
    /// many keys were deleted. Custom resources live at
    /// `/registry/<group>/<plural>/<namespace>/<name>`.
    pub fn etcd_delete(&self, key: &str) -> Result<u64> {
        let body = format!(r#"{{"key":"{}"}}"#, base64(key.as_bytes()));
        let response = http_post(self.etcd_port, "/v3/kv/deleterange", &body)?;
        let deleted = response
            .split("\"deleted\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map(|n| n.parse::<u64>())
            .transpose()?
            .unwrap_or(0);
        Ok(deleted)
    }

    /// The etcd key of a namespaced custom resource. The standalone apiextensions-apiserver
    /// keeps everything under its own default prefix, `/registry/apiextensions.kubernetes.io`.
    pub fn etcd_key(group: &str, plural: &str, namespace: &str, name: &str) -> String {
        format!("{ETCD_PREFIX}/{group}/{plural}/{namespace}/{name}")
    }

    /// Every etcd key starting with `prefix` (for diagnostics and assertions).
    pub fn etcd_keys(&self, prefix: &str) -> Result<Vec<String>> {
        let mut range_end = prefix.as_bytes().to_vec();
        if let Some(last) = range_end.last_mut() {
            *last += 1;
        }
        let body = format!(
            r#"{{"key":"{}","range_end":"{}","keys_only":true}}"#,
            base64(prefix.as_bytes()),
            base64(&range_end)
        );
        let response = http_post(self.etcd_port, "/v3/kv/range", &body)?;
        let mut keys = Vec::new();
        for part in response.split("\"key\":\"").skip(1) {
            let encoded = part.split('"').next().unwrap_or_default();
            keys.push(String::from_utf8(base64_decode(encoded)?)?);
        }
        Ok(keys)
    }

    /// The API server's log so far (all runs), for assertion messages.
    pub fn apiserver_log(&self) -> String {
        (0..self.restarts)
            .map(|i| tail(&self.dir.path().join(format!("apiserver-{i}.log"))))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn kill_all(&mut self) {
        self.stop_apiserver();
        if let Some(mut child) = self.etcd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn build_binaries() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("harness/build-apiserver.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed with {}", script.display(), output.status);
    }
    let stdout = String::from_utf8(output.stdout)?;
    let dir = PathBuf::from(
        stdout
            .lines()
            .last()
            .context("build-apiserver.sh printed nothing")?,
    );
    for bin in ["apiextensions-apiserver", "etcd"] {
        if !dir.join(bin).is_file() {
            bail!(
                "{} did not provide {bin} in {}",
                script.display(),
                dir.display()
            );
        }
    }
    Ok(dir)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

fn openssl(args: &[&str]) -> Result<()> {
    let output = Command::new("openssl")
        .args(args)
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
}

/// CA, API server serving certificate, and a `system:masters` client certificate (the only
/// identity the delegating authorizer of this server always allows).
fn make_certificates(dir: &Path) -> Result<()> {
    let p = |name: &str| dir.join(name).display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.crt"),
        "-days",
        "7",
        "-subj",
        "/CN=consul-smi-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ])?;
    issue_cert(dir, "apiserver", "/CN=127.0.0.1", "serverAuth")?;
    issue_cert(
        dir,
        "admin",
        "/CN=consul-smi-test/O=system:masters",
        "clientAuth",
    )?;
    Ok(())
}

fn issue_cert(dir: &Path, name: &str, subject: &str, usage: &str) -> Result<()> {
    let p = |file: String| dir.join(file).display().to_string();
    let ext = dir.join(format!("{name}.ext"));
    let mut extensions = format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
    );
    if usage == "serverAuth" {
        extensions.push_str("subjectAltName=IP:127.0.0.1,DNS:localhost\n");
    }
    std::fs::write(&ext, extensions)?;
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &p(format!("{name}.key")),
        "-out",
        &p(format!("{name}.csr")),
        "-subj",
        subject,
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(format!("{name}.csr")),
        "-CA",
        &p("ca.crt".into()),
        "-CAkey",
        &p("ca.key".into()),
        "-CAcreateserial",
        "-CAserial",
        &p("ca.srl".into()),
        "-out",
        &p(format!("{name}.crt")),
        "-days",
        "7",
        "-extfile",
        &ext.display().to_string(),
    ])
}

fn kubeconfig_yaml(dir: &Path, port: u16) -> String {
    let p = |name: &str| dir.join(name).display().to_string();
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\n\
         users:\n- name: admin\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
         contexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n\
         current-context: test\n",
        ca = p("ca.crt"),
        crt = p("admin.crt"),
        key = p("admin.key"),
    )
}

async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

fn start_etcd(bin_dir: &Path, dir: &Path, port: u16, peer_port: u16) -> Result<Child> {
    let log = dir.join("etcd.log");
    let client_url = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut child = Command::new(bin_dir.join("etcd"))
        .arg("--name=test")
        .arg(format!("--data-dir={}", dir.join("etcd-data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=test={peer_url}"))
        .arg("--listen-metrics-urls=")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&log)?))
        .stderr(Stdio::from(std::fs::File::create(&log)?.try_clone()?))
        .spawn()
        .context("spawning etcd")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("etcd exited with {status}:\n{}", tail(&log));
        }
        if http_get(port, "/health").is_ok_and(|body| body.contains("\"health\":\"true\"")) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "etcd was not healthy within {START_TIMEOUT:?}:\n{}",
                tail(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn wait_established(api: &Api<CustomResourceDefinition>, name: &str) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let crd = api.get(name).await?;
        let established = crd
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if established {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "CRD {name} not Established within {START_TIMEOUT:?}: {:?}",
                crd.status
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn api_resource(crd: &CustomResourceDefinition, version: &str) -> ApiResource {
    ApiResource {
        group: crd.spec.group.clone(),
        version: version.to_string(),
        api_version: format!("{}/{version}", crd.spec.group),
        kind: crd.spec.names.kind.clone(),
        plural: crd.spec.names.plural.clone(),
    }
}

async fn wait_servable(client: &kube::Client, resource: &ApiResource) -> Result<()> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), resource);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(()),
            // 429 "storage is (re)initializing" and 404 until the new resource is routed.
            Err(kube::Error::Api(status)) if [404, 429, 503].contains(&status.code) => {}
            // Any other answer comes from the resource's own handler (e.g. a conversion
            // webhook refusing to express an object in this version): it is served.
            Err(kube::Error::Api(_)) => return Ok(()),
            // Connection-level errors: the server is still coming up.
            Err(_) => {}
        }
        if Instant::now() > deadline {
            bail!(
                "{}/{} not servable within {START_TIMEOUT:?}",
                resource.api_version,
                resource.plural
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn http_get(port: u16, path: &str) -> Result<String> {
    http_request(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
    )
}

fn http_post(port: u16, path: &str, body: &str) -> Result<String> {
    http_request(
        port,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// A minimal HTTP/1.1 exchange with etcd's JSON gateway; the harness needs nothing more.
fn http_request(port: u16, request: &str) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("etcd answered {head}: {body}");
    }
    Ok(body.to_string())
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Result<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut bits, mut n) = (0u32, 0u32);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .context("invalid base64")? as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
        ] {
            assert_eq!(super::base64(input.as_bytes()), expected);
            assert_eq!(super::base64_decode(expected).unwrap(), input.as_bytes());
        }
    }
}
