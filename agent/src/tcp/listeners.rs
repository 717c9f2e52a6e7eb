//! Steering without eBPF: one listener per allocated port on `tcp_host`,
//! made to match the route table after every swap — new ports bound, gone
//! ones closed, so a deleted instance's port refuses connections at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

use super::Relay;
use crate::routes::SharedRoutes;

/// Keeps a listener on `host:port` for every TCP route, until `builds` closes.
pub async fn run(
    host: IpAddr,
    relay: Arc<Relay>,
    routes: SharedRoutes,
    mut builds: tokio::sync::watch::Receiver<u64>,
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
            match bind(SocketAddr::new(host, *port)) {
                Ok(listener) => {
                    let local = SocketAddr::new(host, *port);
                    listeners.insert(*port, tokio::spawn(accept(listener, local, relay.clone())));
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

/// A listener with the same accept queue as the eBPF path's (4096): a burst
/// of connections, e.g. forwarded by other agents, is queued, not dropped.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    super::relay::player_options(&socket)?;
    socket.listen(super::LISTEN_BACKLOG)
}

async fn accept(listener: TcpListener, local: SocketAddr, relay: Arc<Relay>) {
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            // Out of descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // On a wildcard `tcp_host` the kernel says which address it came
        // to (a forwarded connection's proof names it).
        let local = if local.ip().is_unspecified() {
            match client.local_addr() {
                Ok(a) => a,
                Err(_) => continue,
            }
        } else {
            local
        };
        let relay = relay.clone();
        tokio::spawn(async move { relay.serve(client, peer, local).await });
    }
}
