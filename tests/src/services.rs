//! The three consul-smi services as real processes (the `consul-smi` binary), wired together
//! over gRPC on free loopback ports. Each can be killed and restarted independently.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::proxy::FaultProxy;

/// Where the watcher reads SMI objects from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of SMI manifests (`--source dir:PATH`).
    Dir(PathBuf),
    /// A Kubernetes API server reached through this kubeconfig.
    Kube { kubeconfig: PathBuf },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Watcher,
    Translator,
    Writer,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Watcher => "watcher",
            Service::Translator => "translator",
            Service::Writer => "writer",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PipelineOptions {
    pub source: Source,
    pub consul_addr: String,
    pub consul_token: Option<String>,
    /// Extra arguments per service, e.g. `--consul-api modern` for the translator.
    pub translator_args: Vec<String>,
    pub writer_args: Vec<String>,
    pub watcher_args: Vec<String>,
    /// Extra environment for every service (e.g. OTLP exporter settings).
    pub env: Vec<(String, String)>,
    /// Route the translator's connections to the watcher and the writer through
    /// [`FaultProxy`]s, so a test can cut them mid-message.
    pub link_proxies: bool,
}

impl PipelineOptions {
    pub fn new(source: Source, consul_addr: impl Into<String>) -> Self {
        PipelineOptions {
            source,
            consul_addr: consul_addr.into(),
            consul_token: None,
            translator_args: Vec::new(),
            writer_args: Vec::new(),
            watcher_args: Vec::new(),
            env: Vec::new(),
            link_proxies: false,
        }
    }
}

pub struct Pipeline {
    options: PipelineOptions,
    binary: PathBuf,
    pub watcher_addr: SocketAddr,
    pub translator_addr: SocketAddr,
    pub writer_addr: SocketAddr,
    watcher: Option<Child>,
    translator: Option<Child>,
    writer: Option<Child>,
    watcher_proxy: Option<FaultProxy>,
    writer_proxy: Option<FaultProxy>,
}

impl Pipeline {
    pub async fn start(options: PipelineOptions) -> Result<Pipeline> {
        let (watcher_addr, writer_addr) = (free_addr()?, free_addr()?);
        let (watcher_proxy, writer_proxy) = match options.link_proxies {
            true => (
                Some(FaultProxy::start(watcher_addr).await?),
                Some(FaultProxy::start(writer_addr).await?),
            ),
            false => (None, None),
        };
        let mut pipeline = Pipeline {
            binary: consul_smi_binary()?,
            options,
            watcher_addr,
            translator_addr: free_addr()?,
            writer_addr,
            watcher: None,
            translator: None,
            writer: None,
            watcher_proxy,
            writer_proxy,
        };
        for service in [Service::Writer, Service::Watcher, Service::Translator] {
            pipeline.start_on_a_free_port(service).await?;
        }
        Ok(pipeline)
    }

    fn args(&self, service: Service) -> Vec<String> {
        let mut args = vec![service.name().to_string(), "--listen".into()];
        match service {
            Service::Watcher => {
                args.push(self.watcher_addr.to_string());
                match &self.options.source {
                    Source::Dir(path) => {
                        args.extend(["--source".into(), format!("dir:{}", path.display())])
                    }
                    Source::Kube { kubeconfig } => args.extend([
                        "--source".into(),
                        "kube".into(),
                        "--kubeconfig".into(),
                        kubeconfig.display().to_string(),
                    ]),
                }
                args.extend(self.options.watcher_args.iter().cloned());
            }
            Service::Translator => {
                args.push(self.translator_addr.to_string());
                args.extend([
                    "--watcher".into(),
                    format!("http://{}", self.dialled_addr(Service::Watcher)),
                    "--writer".into(),
                    format!("http://{}", self.dialled_addr(Service::Writer)),
                    "--batch-millis".into(),
                    "5".into(),
                ]);
                args.extend(self.options.translator_args.iter().cloned());
            }
            Service::Writer => {
                args.push(self.writer_addr.to_string());
                args.extend(self.options.writer_args.iter().cloned());
            }
        }
        args
    }

    fn slot(&mut self, service: Service) -> &mut Option<Child> {
        match service {
            Service::Watcher => &mut self.watcher,
            Service::Translator => &mut self.translator,
            Service::Writer => &mut self.writer,
        }
    }

    fn addr(&self, service: Service) -> SocketAddr {
        match service {
            Service::Watcher => self.watcher_addr,
            Service::Translator => self.translator_addr,
            Service::Writer => self.writer_addr,
        }
    }

    /// The proxy the translator reaches `service` through (`link_proxies` only).
    pub fn link_proxy(&self, service: Service) -> Option<&FaultProxy> {
        match service {
            Service::Watcher => self.watcher_proxy.as_ref(),
            Service::Writer => self.writer_proxy.as_ref(),
            Service::Translator => None,
        }
    }

    /// Where the translator dials `service`: its proxy when there is one.
    fn dialled_addr(&self, service: Service) -> SocketAddr {
        match self.link_proxy(service) {
            Some(proxy) => proxy.addr(),
            None => self.addr(service),
        }
    }

    pub async fn start_service(&mut self, service: Service) -> Result<()> {
        if let Some(proxy) = self.link_proxy(service) {
            proxy.set_upstream(self.addr(service));
        }
        let mut command = Command::new(&self.binary);
        command
            .args(self.args(service))
            .env("CONSUL_HTTP_ADDR", &self.options.consul_addr)
            .env(
                "RUST_LOG",
                std::env::var("CONSUL_SMI_TEST_LOG")
                    .unwrap_or_else(|_| "warn,kube_client=off".into()),
            )
            .envs(self.options.env.iter().cloned())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(token) = &self.options.consul_token {
            command.env("CONSUL_HTTP_TOKEN", token);
        }
        if std::env::var_os("CONSUL_SMI_TEST_QUIET").is_some() {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawning {} {}", self.binary.display(), service.name()))?;
        *self.slot(service) = Some(child);
        wait_for_port(self.addr(service), Duration::from_secs(20))
            .await
            .with_context(|| {
                format!(
                    "consul-smi {} did not start listening on {}",
                    service.name(),
                    self.addr(service)
                )
            })?;
        Ok(())
    }

    /// Free ports are found by binding port 0 and letting go, so a process of a parallel test
    /// can take one first; then our service fails to bind while the port check sees the other
    /// process. Started services that exit at once are retried on a new port.
    async fn start_on_a_free_port(&mut self, service: Service) -> Result<()> {
        for attempt in 1..=3 {
            self.start_service(service).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let exited = match self.slot(service).as_mut() {
                Some(child) => child.try_wait().context("checking the service process")?,
                None => None,
            };
            let Some(status) = exited else { return Ok(()) };
            if attempt == 3 {
                bail!(
                    "consul-smi {} exited at start ({status}) three times",
                    service.name()
                );
            }
            eprintln!(
                "services harness: {} exited at start ({status}); retrying on a new port",
                service.name()
            );
            let addr = free_addr()?;
            match service {
                Service::Watcher => self.watcher_addr = addr,
                Service::Translator => self.translator_addr = addr,
                Service::Writer => self.writer_addr = addr,
            }
        }
        Ok(())
    }

    /// SIGKILL: no graceful shutdown, as a crash or OOM kill would do.
    pub async fn kill(&mut self, service: Service) -> Result<()> {
        if let Some(mut child) = self.slot(service).take() {
            child.kill().await.context("killing service")?;
        }
        Ok(())
    }

    /// SIGTERM, as Kubernetes stops a pod; waits up to `grace` for the process to exit by
    /// itself (then SIGKILLs it and fails, as the kubelet would after the grace period).
    pub async fn terminate(
        &mut self,
        service: Service,
        grace: Duration,
    ) -> Result<std::process::ExitStatus> {
        let mut child = self
            .slot(service)
            .take()
            .with_context(|| format!("consul-smi {} is not running", service.name()))?;
        let pid = child.id().context("the service has already exited")?;
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                child.kill().await.ok();
                anyhow::bail!(
                    "consul-smi {} did not exit within {grace:?} of SIGTERM",
                    service.name()
                )
            }
        }
    }

    pub async fn restart(&mut self, service: Service) -> Result<()> {
        self.kill(service).await?;
        self.start_service(service).await
    }
}

/// The `consul-smi` binary to run: `CONSUL_SMI_BIN`, or else this workspace's, built (once per
/// test process) with the test's own profile so the e2e suite never runs a stale binary;
/// `cargo test` does not build other packages' binaries by itself.
pub fn consul_smi_binary() -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    if let Some(path) = std::env::var_os("CONSUL_SMI_BIN") {
        return Ok(PathBuf::from(path));
    }
    BUILT
        .get_or_init(|| build_consul_smi().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn build_consul_smi() -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no profile directory")?;
    let release = profile_dir
        .file_name()
        .is_some_and(|name| name == "release");
    let mut cargo =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(workspace)
        .args(["build", "--quiet", "-p", "consul-smi"]);
    if release {
        cargo.arg("--release");
    }
    let status = cargo
        .status()
        .context("running cargo build -p consul-smi")?;
    if !status.success() {
        bail!("cargo build -p consul-smi failed ({status})");
    }
    let binary = profile_dir.join("consul-smi");
    if !binary.exists() {
        bail!(
            "cargo build -p consul-smi did not produce {}",
            binary.display()
        );
    }
    Ok(binary)
}

pub fn free_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?)
}

pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("nothing listening on {addr} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
