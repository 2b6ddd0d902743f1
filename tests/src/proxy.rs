//! A TCP proxy in front of a component that can slow its answers down or cut its connections
//! in the middle of a message: the fault matrix's "Consul answering slowly" and "stream cut
//! mid-message", with the real processes on both sides.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    accept_task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    upstream: Mutex<SocketAddr>,
    /// Added before every chunk travelling from the upstream back to the client.
    answer_delay_millis: AtomicU64,
    /// Bumped by `cut_mid_message`; a connection opened under an older generation is cut.
    cut_generation: watch::Sender<u64>,
    /// While true, connections are closed at once and new ones closed on accept.
    partitioned: watch::Sender<bool>,
    connections: AtomicU64,
    cut_connections: AtomicU64,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fault proxy")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProxyState {
            upstream: Mutex::new(upstream),
            answer_delay_millis: AtomicU64::new(0),
            cut_generation: watch::channel(0).0,
            partitioned: watch::channel(false).0,
            connections: AtomicU64::new(0),
            cut_connections: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *state.partitioned.borrow() {
                        drop(client);
                        continue;
                    }
                    state.connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(forward(client, state.clone()));
                }
            }
        });
        Ok(FaultProxy {
            addr,
            state,
            accept_task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where new connections go (a restarted component may listen on a new port).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self
            .state
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = upstream;
    }

    /// Every answer (each chunk from the upstream) waits this long before it is passed on.
    pub fn set_answer_delay(&self, delay: Duration) {
        self.state
            .answer_delay_millis
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Every connection open now is cut at its next chunk, in either direction: part of the
    /// chunk is passed on, then both sides are closed. A chunk is one or more HTTP/2 frames,
    /// so the peer sees a frame that ends in the middle.
    pub fn cut_mid_message(&self) {
        self.state.cut_generation.send_modify(|g| *g += 1);
    }

    /// While partitioned the upstream is unreachable: open connections are closed at once and
    /// new ones as soon as they are accepted, as a crashed host or a dropped route looks.
    pub fn set_partitioned(&self, partitioned: bool) {
        self.state.partitioned.send_replace(partitioned);
    }

    /// Connections cut in the middle of a chunk so far.
    pub fn cut_connections(&self) -> u64 {
        self.state.cut_connections.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

async fn forward(client: TcpStream, state: Arc<ProxyState>) {
    let upstream_addr = *state.upstream.lock().unwrap_or_else(|p| p.into_inner());
    let Ok(upstream) = TcpStream::connect(upstream_addr).await else {
        // As if the upstream refused: the client sees its connection closed.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let mut cut = state.cut_generation.subscribe();
    cut.borrow_and_update();
    let mut partitioned = state.partitioned.subscribe();
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let to_upstream = pump(client_read, upstream_write, cut.clone(), None);
    let to_client = pump(upstream_read, client_write, cut, Some(state.clone()));
    // Whichever direction ends (closed, or cut) ends the connection: dropping the other
    // half-streams closes both sockets.
    let cut_here = tokio::select! {
        cut = to_upstream => cut,
        cut = to_client => cut,
        _ = partitioned.wait_for(|p| *p) => false,
    };
    if cut_here {
        state.cut_connections.fetch_add(1, Ordering::Relaxed);
    }
}

/// Copies `from` into `to` until either closes or a cut is requested; returns whether the
/// connection was cut mid-chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<u64>,
    answers: Option<Arc<ProxyState>>,
) -> bool {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut cut_requested = false;
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = cut.changed(), if !cut_requested => {
                cut_requested = changed.is_ok();
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if let Some(state) = &answers {
            let delay = state.answer_delay_millis.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
        }
        if cut_requested {
            // At least one byte through, at least one byte missing.
            let through = (n / 2).max(1).min(n.saturating_sub(1));
            if through > 0 {
                let _ = to.write_all(&buffer[..through]).await;
            }
            return n >= 2;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return false;
        }
    }
}
