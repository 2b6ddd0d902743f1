//! `cargo xtask e2e-kind`: the e2e suite against a kind cluster. Needs Docker, kind, kubectl
//! and helm (none of which run on the CI machines, which use the local harness instead).
//! Creates the cluster from deploy/kind/, builds and loads the consul-smi image, installs
//! cert-manager (for the conversion webhook's certificate), Consul with HashiCorp's Helm chart
//! and deploy/kind (kustomize), then runs the same suite as CI with the external harness.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const CLUSTER: &str = "consul-smi-e2e";
const CERT_MANAGER: &str =
    "https://github.com/cert-manager/cert-manager/releases/download/v1.16.2/cert-manager.yaml";

#[derive(clap::Args)]
pub struct Args {
    /// Keep the cluster after the run (default: keep; pass --delete to remove it).
    #[arg(long)]
    pub delete: bool,
    /// Extra arguments for the test binary (e.g. a test-name filter).
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let missing: Vec<&str> = ["docker", "kind", "kubectl", "helm"]
        .into_iter()
        .filter(|tool| which(tool).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "e2e-kind needs {} on PATH (and a running Docker engine)",
            missing.join(", ")
        );
    }
    let kubeconfig = root.join("target/kind-kubeconfig");
    let clusters = output(Command::new("kind").args(["get", "clusters"]))?;
    if !clusters.lines().any(|c| c == CLUSTER) {
        run_cmd(
            Command::new("kind")
                .args(["create", "cluster", "--config"])
                .arg(root.join("deploy/kind/cluster.yaml")),
        )?;
    }
    run_cmd(
        Command::new("kind")
            .args(["export", "kubeconfig", "--name", CLUSTER, "--kubeconfig"])
            .arg(&kubeconfig),
    )?;
    let kubectl = |args: &[&str]| {
        let mut command = Command::new("kubectl");
        command.arg("--kubeconfig").arg(&kubeconfig).args(args);
        command
    };

    run_cmd(Command::new("docker").current_dir(&root).args([
        "build",
        "-f",
        "deploy/docker/Dockerfile",
        "-t",
        "consul-smi:dev",
        ".",
    ]))?;
    run_cmd(Command::new("kind").args([
        "load",
        "docker-image",
        "consul-smi:dev",
        "--name",
        CLUSTER,
    ]))?;

    run_cmd(&mut kubectl(&["apply", "-f", CERT_MANAGER]))?;
    run_cmd(&mut kubectl(&[
        "-n",
        "cert-manager",
        "wait",
        "--for=condition=Available",
        "deployment",
        "--all",
        "--timeout=300s",
    ]))?;

    run_cmd(Command::new("helm").args([
        "repo",
        "add",
        "hashicorp",
        "https://helm.releases.hashicorp.com",
        "--force-update",
    ]))?;
    run_cmd(
        Command::new("helm")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "upgrade",
                "--install",
                "consul",
                "hashicorp/consul",
                "-n",
                "consul",
                "--create-namespace",
                "--wait",
                "-f",
            ])
            .arg(root.join("deploy/kind/consul-values.yaml")),
    )?;

    run_cmd(&mut kubectl(&[
        "apply",
        "-k",
        &root.join("deploy/kind").display().to_string(),
    ]))?;
    run_cmd(&mut kubectl(&[
        "-n",
        "consul-smi",
        "wait",
        "--for=condition=Available",
        "deployment",
        "--all",
        "--timeout=300s",
    ]))?;

    // The API server cannot be restarted inside kind, so that case runs only locally.
    let mut test = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    test.current_dir(&root)
        .args(["test", "-p", "consul-smi-e2e", "--test", "e2e", "--"])
        .args(["--skip", "api_server_restart", "--test-threads", "1"])
        .args(&args.test_args)
        .env("CONSUL_SMI_E2E_KUBECONFIG", &kubeconfig)
        .env("CONSUL_SMI_E2E_CONSUL_ADDR", "127.0.0.1:8500");
    let result = run_cmd(&mut test);
    if args.delete {
        run_cmd(Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]))?;
    }
    result
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file())
}

fn run_cmd(command: &mut Command) -> Result<()> {
    println!("$ {command:?}");
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
