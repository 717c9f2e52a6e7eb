//! The API's HTTP/1.1 server: hyper with the limits a public endpoint
//! needs, since players' traffic reaches it through the CTF platform and
//! anyone can open sockets to it.
//!
//! - Every request's head must arrive within `header_timeout`, counted from
//!   when the connection waits for it: the first request and each one on a
//!   kept-alive connection. So an idle keep-alive connection is closed after
//!   the same time, and a slowloris client that trickles header bytes is cut
//!   off at the deadline.
//! - A head larger than `max_header_bytes` is refused with 431 and nothing
//!   more is buffered.
//! - At most `max_connections` at once, and `max_connections_per_source`
//!   from one source (an IPv4 address, an IPv6 /64); past either, a new
//!   connection is closed at once.
//!   Refusals are counted by reason.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tidegate_schema::caps::{ConnectionCaps, Refused};
use tokio::net::TcpListener;

use crate::App;

/// The server's limits (the `http_*` fields of the config).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    /// How long requests in flight may finish after shutdown begins (past
    /// the etcd timeout, so no write is cut mid-Txn).
    pub drain: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
}

impl Limits {
    pub fn of(cfg: &tidegate_schema::config::ControllerConfig) -> Self {
        if tidegate_schema::config::planted("http-limits") {
            // The red team's positive control: an hour per head, no caps.
            return Self {
                header_timeout: Duration::from_secs(3600),
                drain: Duration::from_millis(cfg.etcd_timeout_ms + 1000),
                max_header_bytes: cfg.http_max_header_bytes,
                max_connections: usize::MAX,
                max_connections_per_source: usize::MAX,
            };
        }
        Self {
            header_timeout: Duration::from_millis(cfg.http_header_timeout_ms),
            drain: Duration::from_millis(cfg.etcd_timeout_ms + 1000)
                .max(Duration::from_millis(cfg.http_header_timeout_ms)),
            max_header_bytes: cfg.http_max_header_bytes,
            max_connections: cfg.http_max_connections,
            max_connections_per_source: cfg.http_max_connections_per_source,
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets open requests
/// finish (at most `drain` more).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let limits = Limits::of(&app.cfg);
    let caps = ConnectionCaps::new(limits.max_connections, limits.max_connections_per_source);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Reap finished connection tasks as we go.
        while conns.try_join_next().is_some() {}
        let admitted = match caps.admit(peer.ip(), false) {
            Ok(a) => a,
            Err(refused) => {
                app.metrics.connection_refused(match refused {
                    Refused::Total => "max_connections",
                    Refused::PerSource => "max_connections_per_source",
                });
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _admitted = admitted;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_header_size(limits.max_header_bytes);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = tokio::time::timeout(limits.drain, conn).await;
        });
    }
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}
