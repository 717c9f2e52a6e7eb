//! The TCP data plane's userspace path: one listener per allocated public
//! port on the agent's `tcp_host`, each connection spliced to its instance.
//!
//! This is the fallback of issue #6 (used when eBPF cannot load): after
//! every route-table swap the listeners are made to match the table's
//! ports — new ports bound, gone ones closed, so a deleted instance's port
//! refuses connections at once. A connection goes to the local container,
//! or to the owning agent's `tcp_host` on the same port (the owner routes
//! locally). Bytes are copied in both directions with half-close forwarded
//! (`copy_bidirectional`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::policy::{Connection, EdgePolicy, Verdict};
use crate::routes::{SharedRoutes, Target};

/// How long connecting to an instance may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps a listener on `host:port` for every TCP route, until `builds` closes.
pub async fn run(
    host: IpAddr,
    routes: SharedRoutes,
    mut builds: tokio::sync::watch::Receiver<u64>,
    policy: Arc<dyn EdgePolicy>,
) {
    let mut listeners: HashMap<u16, JoinHandle<()>> = HashMap::new();
    loop {
        let table = routes.load_full();
        listeners.retain(|port, task| {
            let keep = table.by_port.contains_key(port);
            if !keep {
                task.abort();
                tracing::info!(port, "closed the TCP port of a removed instance");
            }
            keep
        });
        for port in table.by_port.keys() {
            if listeners.contains_key(port) {
                continue;
            }
            match TcpListener::bind((host, *port)).await {
                Ok(listener) => {
                    let task =
                        tokio::spawn(accept(listener, *port, routes.clone(), policy.clone()));
                    listeners.insert(*port, task);
                }
                Err(e) => {
                    tracing::warn!(port, %host, error = %e, "cannot bind an instance's TCP port")
                }
            }
        }
        if builds.changed().await.is_err() {
            break;
        }
    }
    for (_, task) in listeners {
        task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    port: u16,
    routes: SharedRoutes,
    policy: Arc<dyn EdgePolicy>,
) {
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (routes, policy) = (routes.clone(), policy.clone());
        tokio::spawn(async move {
            if let Err(e) = serve(client, peer, port, &routes, policy.as_ref()).await {
                tracing::debug!(port, %peer, error = %e, "TCP connection ended with an error");
            }
        });
    }
}

async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    port: u16,
    routes: &SharedRoutes,
    policy: &dyn EdgePolicy,
) -> std::io::Result<()> {
    let Some(route) = routes.load().by_port.get(&port).cloned() else {
        return Ok(());
    };
    let upstream = match &route.target {
        Target::Local(a) | Target::Remote(a) => *a,
        Target::NotReady(_) => return Ok(()),
    };
    let conn = Connection {
        instance: route.instance.as_str(),
        team: &route.team,
        challenge: &route.challenge,
        source: Some(peer.ip()),
        protocol: "tcp",
        host: "",
    };
    if let Verdict::Reject(reason) = policy.admit(&conn) {
        tracing::info!(port, %peer, %reason, "connection refused by policy");
        return Ok(());
    }
    let mut server = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    route
        .stats
        .tcp_connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    route.stats.touch();
    let (up, down) = tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    route
        .stats
        .bytes_in
        .fetch_add(up, std::sync::atomic::Ordering::Relaxed);
    route
        .stats
        .bytes_out
        .fetch_add(down, std::sync::atomic::Ordering::Relaxed);
    route.stats.touch();
    Ok(())
}
