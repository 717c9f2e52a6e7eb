//! Faults the kernel's tools cannot aim: a link to etcd that loses the
//! answer to one chosen request after etcd has committed it; and a slow
//! disk under one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A slow disk under process `pid` (an etcd member) for as long as the
/// result lives: `strace -e inject` delays each of its `fdatasync` and
/// `fsync` calls by `delay_us` (ptrace stops every traced syscall, so the
/// process is a little slower all round too). Dropping it kills strace,
/// which detaches: the process runs at full speed again.
pub fn slow_disk(
    pid: u32,
    delay_us: u32,
    log: &std::path::Path,
) -> Result<crate::process::Supervised, String> {
    crate::process::Supervised::spawn(
        "strace",
        "strace",
        &[
            "-f".into(),
            "-qq".into(),
            "-p".into(),
            pid.to_string(),
            "-e".into(),
            "trace=fdatasync,fsync".into(),
            "-e".into(),
            format!("inject=fdatasync,fsync:delay_enter={delay_us}"),
            "-o".into(),
            "/dev/null".into(),
        ],
        log,
    )
    .map_err(|e| format!("strace on pid {pid}: {e}"))
}

/// Requests at least this large are writes carrying a record (a spawn's or
/// a renewal's Txn); reads, lease calls, watches and a renewal's settling
/// check are smaller.
pub const LARGE_REQUEST: usize = 400;

/// A TCP proxy to etcd (the first member of `upstream` that accepts) that,
/// armed, passes the next large request on, lets etcd commit it, never
/// reads the answer and resets the client's connection: what a client sees
/// when a member commits its write and then drops off the network.
#[derive(Debug)]
pub struct LossyLink {
    addr: SocketAddr,
    armed: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LossyLink {
    /// Listens on loopback.
    pub async fn start(upstream: Vec<SocketAddr>) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// Listens on `listen` (port 0: any).
    pub async fn start_on(listen: SocketAddr, upstream: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("lossy link on {listen}: {e}"));
        let addr = listener.local_addr().unwrap_or(listen);
        let armed = Arc::new(AtomicUsize::new(0));
        let lost = Arc::new(AtomicUsize::new(0));
        let (a, l) = (armed.clone(), lost.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (a, l, upstream) = (a.clone(), l.clone(), upstream.clone());
                tokio::spawn(async move {
                    for member in upstream {
                        let connect = TcpStream::connect(member);
                        if let Ok(Ok(server)) =
                            tokio::time::timeout(Duration::from_millis(300), connect).await
                        {
                            relay(client, server, a, l).await;
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            armed,
            lost,
            task,
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The endpoint URL clients are given.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Loses the answers to the next `n` large requests (0: none).
    pub fn arm(&self, n: usize) {
        self.armed.store(n, SeqCst);
    }

    /// How many answers were lost so far.
    pub fn lost(&self) -> usize {
        self.lost.load(SeqCst)
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    armed: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        tokio::select! {
            r = cr.read(&mut up) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                let lose = n >= LARGE_REQUEST
                    && armed.fetch_update(SeqCst, SeqCst, |a| a.checked_sub(1)).is_ok();
                if sw.write_all(&up[..n]).await.is_err() {
                    return;
                }
                if lose {
                    // etcd commits it; its answer is never read, and the
                    // client's connection is reset.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    lost.fetch_add(1, SeqCst);
                    if let Ok(client) = cr.reunite(cw) {
                        let _ = client.set_zero_linger();
                    }
                    return;
                }
            }
            r = sr.read(&mut down) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                if cw.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
