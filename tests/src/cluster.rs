//! A Consul cluster as users run one: three servers with Raft on disk and a client agent, on
//! loopback ports, of either [`ConsulRelease`]. The writer talks to the **client agent**, as
//! in a consul-k8s install, so every write is forwarded to the leader and every error comes
//! back in its forwarded shape. Servers can be killed (the leader, mid-burst) and restarted
//! on the same data directory. Everything is killed and removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::consul::{
    ConsulRelease, HttpReply, Ports, consul_binary, create_token_on, http_request, json_field,
};

const SERVERS: usize = 3;
const START_TIMEOUT: Duration = Duration::from_secs(60);

struct Node {
    name: String,
    server: bool,
    ports: Ports,
    child: Option<Child>,
    starts: u32,
}

pub struct ConsulCluster {
    release: ConsulRelease,
    acl: bool,
    binary: PathBuf,
    dir: tempfile::TempDir,
    /// `SERVERS` servers, then the client agent.
    nodes: Vec<Node>,
    management_token: Option<String>,
}

impl ConsulCluster {
    /// Starts three servers and a client agent and waits until a write through the client
    /// succeeds. With `acl`, ACLs are on with `default_policy = "deny"` and bootstrapped.
    pub fn start(release: ConsulRelease, acl: bool) -> Result<ConsulCluster> {
        let binary = consul_binary(release)?;
        let dir = tempfile::Builder::new()
            .prefix("consul-smi-cluster-")
            .tempdir()
            .context("creating the cluster directory")?;
        let mut nodes = Vec::new();
        for i in 0..=SERVERS {
            let server = i < SERVERS;
            nodes.push(Node {
                name: if server {
                    format!("server-{i}")
                } else {
                    "client".into()
                },
                server,
                ports: Ports::pick()?,
                child: None,
                starts: 0,
            });
        }
        let mut cluster = ConsulCluster {
            release,
            acl,
            binary,
            dir,
            nodes,
            management_token: None,
        };
        // Free ports are found by binding port 0 and letting go, so a test running in
        // parallel can take one first: start again on new ports, then fail loudly.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = (0..cluster.nodes.len())
                .try_for_each(|i| cluster.launch(i))
                .and_then(|()| cluster.wait_ready());
            match started {
                Ok(()) => return Ok(cluster),
                Err(error) if attempt < 3 => {
                    eprintln!(
                        "consul cluster: start attempt {attempt} failed, retrying on new ports: {error:#}"
                    );
                    for index in 0..cluster.nodes.len() {
                        cluster.kill_server(index);
                        cluster.nodes[index].ports = Ports::pick()?;
                        let data = cluster.dir.path().join(&cluster.nodes[index].name);
                        let _ = std::fs::remove_dir_all(data);
                    }
                    cluster.management_token = None;
                }
                Err(error) => {
                    cluster.print_logs();
                    return Err(error);
                }
            }
        }
    }

    /// The client agent's `127.0.0.1:<port>` (what the writer is given).
    pub fn client_http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.client().ports.http)
    }

    pub fn release(&self) -> ConsulRelease {
        self.release
    }

    /// The management token from `/v1/acl/bootstrap` (ACL clusters only).
    pub fn management_token(&self) -> Option<&str> {
        self.management_token.as_deref()
    }

    /// A raw request through the client agent with the management token.
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> Result<HttpReply> {
        http_request(
            self.client().ports.http,
            method,
            path,
            body,
            self.management_token.as_deref(),
        )
    }

    /// An ACL policy with `rules` and a token holding only it; returns the SecretID.
    pub fn create_token(&self, name: &str, rules: &str) -> Result<String> {
        create_token_on(
            self.client().ports.http,
            self.management_token.as_deref(),
            name,
            rules,
        )
    }

    /// Index of the server that is the Raft leader now.
    pub fn leader(&self) -> Result<usize> {
        let reply = self.http("GET", "/v1/status/leader", None)?;
        let leader = reply.body.trim().trim_matches('"').to_string();
        self.nodes
            .iter()
            .position(|n| n.server && leader.ends_with(&format!(":{}", n.ports.server)))
            .ok_or_else(|| anyhow!("no server is the leader ({leader:?})"))
    }

    /// SIGKILLs server `index` (its data directory stays).
    pub fn kill_server(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed server again on its data directory.
    pub fn restart_server(&mut self, index: usize) -> Result<()> {
        self.kill_server(index);
        self.launch(index)
    }

    /// Blocks until the cluster has a leader and a write through the client succeeds.
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::from("no answer yet");
        let port = self.client().ports.http;
        loop {
            for node in &mut self.nodes {
                if let Some(Ok(Some(status))) = node.child.as_mut().map(|c| c.try_wait()) {
                    bail!("consul {} exited with {status}", node.name);
                }
            }
            if Instant::now() > deadline {
                bail!("cluster not ready after {START_TIMEOUT:?}; last: {last}");
            }
            if self.acl && self.management_token.is_some() && !self.acl_ready(port) {
                // 1.8 servers start in legacy ACL mode and switch after bootstrap.
                last = "the ACL system is still in legacy mode".into();
            } else if self.acl && self.management_token.is_none() {
                match http_request(port, "PUT", "/v1/acl/bootstrap", None, None) {
                    Ok(reply) if reply.status == 200 => {
                        self.management_token =
                            Some(json_field(&reply.body, "SecretID").ok_or_else(|| {
                                anyhow!("no SecretID in bootstrap reply {}", reply.body)
                            })?);
                    }
                    Ok(reply) => last = format!("bootstrap: HTTP {} {}", reply.status, reply.body),
                    Err(e) => last = format!("{e:#}"),
                }
            } else {
                let reply = http_request(
                    port,
                    "PUT",
                    "/v1/kv/consul-smi-harness-ready",
                    Some("1"),
                    self.management_token.as_deref(),
                );
                match reply {
                    Ok(reply) if reply.status == 200 => return Ok(()),
                    Ok(reply) => last = format!("kv write: HTTP {} {}", reply.status, reply.body),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn acl_ready(&self, port: u16) -> bool {
        let reply = http_request(
            port,
            "GET",
            "/v1/acl/policies",
            None,
            self.management_token.as_deref(),
        );
        matches!(reply, Ok(reply) if reply.status == 200)
    }

    fn client(&self) -> &Node {
        &self.nodes[SERVERS]
    }

    fn launch(&mut self, index: usize) -> Result<()> {
        let join = format!("127.0.0.1:{}", self.nodes[0].ports.serf_lan);
        let node = &mut self.nodes[index];
        node.starts += 1;
        let data = self.dir.path().join(&node.name);
        std::fs::create_dir_all(&data).context("creating a node's data dir")?;
        let log_path = self
            .dir
            .path()
            .join(format!("{}-{}.log", node.name, node.starts));
        let log = std::fs::File::create(&log_path).context("creating a node's log")?;
        let mut command = Command::new(&self.binary);
        command
            .args(["agent", "-node", &node.name, "-datacenter", "dc1"])
            .args(["-client", "127.0.0.1", "-bind", "127.0.0.1"])
            .args(["-http-port", &node.ports.http.to_string()])
            .args(["-dns-port", &node.ports.dns.to_string()])
            .args(["-serf-lan-port", &node.ports.serf_lan.to_string()])
            .args(["-serf-wan-port", &node.ports.serf_wan.to_string()])
            .args(["-server-port", &node.ports.server.to_string()])
            .args(["-grpc-port", "-1", "-disable-host-node-id"])
            .args(["-retry-join", &join, "-retry-interval", "1s"])
            .arg("-data-dir")
            .arg(&data)
            .args(["-hcl", "disable_update_check = true"])
            .args(["-hcl", "connect { enabled = true }"])
            // Elections in about a second instead of the production default's five.
            .args(["-hcl", "performance { raft_multiplier = 1 }"]);
        if node.server {
            command.args(["-server", "-bootstrap-expect", &SERVERS.to_string()]);
        }
        if self.release == ConsulRelease::Modern {
            command.args(["-hcl", "ports { grpc_tls = -1 }"]);
        }
        if self.acl {
            command.args([
                "-hcl",
                r#"primary_datacenter = "dc1" acl { enabled = true default_policy = "deny" }"#,
            ]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning the log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        node.child = Some(child);
        Ok(())
    }

    fn print_logs(&self) {
        for node in &self.nodes {
            let path = self
                .dir
                .path()
                .join(format!("{}-{}.log", node.name, node.starts));
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            eprintln!("--- {} log tail ---", node.name);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for ConsulCluster {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill_server(index);
        }
    }
}
