//! The `dir:` source in the shipped binary: a FIFO named like a manifest once blocked the
//! directory scan for good, so the watcher never became ready, never published another
//! change, and did not exit on SIGTERM (the runtime waited for the blocked scan).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use consul_smi_e2e::services::{consul_smi_binary, free_addr};

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_watcher_with_a_fifo_in_its_directory_gets_ready_and_exits_on_sigterm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("routes.yaml"),
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: db}\n",
    )?;
    let fifo = dir.path().join("pipe.yaml");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
    ensure!(made.success(), "mkfifo {} failed", fifo.display());

    let (grpc, admin) = (free_addr()?, free_addr()?);
    let mut watcher = tokio::process::Command::new(consul_smi_binary()?)
        .args(["watcher", "--listen", &grpc.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .arg("--source")
        .arg(format!("dir:{}", dir.path().display()))
        .kill_on_drop(true)
        .spawn()
        .context("starting consul-smi watcher")?;

    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let status = readyz(admin).await;
        if status.as_ref().is_ok_and(|s| s.starts_with("HTTP/1.0 200")) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the watcher never got ready (/readyz: {status:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pid = watcher.id().context("the watcher has already exited")?;
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(sent.success(), "kill -TERM {pid} failed");
    let status = tokio::time::timeout(TIMEOUT, watcher.wait())
        .await
        .context("the watcher did not exit after SIGTERM")??;
    ensure!(status.success(), "the watcher exited with {status}");
    Ok(())
}

/// The status line of `/readyz` (plain HTTP/1.0: no client, no TLS provider needed).
async fn readyz(admin: SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    stream.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response.lines().next().unwrap_or_default().to_string())
}
