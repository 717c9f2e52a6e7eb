//! Riding through the loss of one etcd member.
//!
//! etcd-client balances requests over every endpoint it was given and keeps
//! sending a share of them to a member that is down; each such request fails
//! with a connect error without ever reaching a server. Two remedies, used
//! by the controller and the agent:
//!
//! - [`never_sent`] says whether an error is of that kind, so the request
//!   can be retried at once on another member (it had no effect);
//! - [`prune_dead_members`] takes an unreachable member out of the
//!   balance within half a second and puts it back when it answers again.

use std::error::Error as StdError;
use std::time::Duration;

use etcd_client::Client;

/// Whether `e` means the request had no effect: no connection to the
/// chosen member could be made, or the member refused it for having no
/// raft leader. Retrying such a request is safe.
pub fn never_sent(e: &etcd_client::Error) -> bool {
    let first: &(dyn StdError + 'static) = match e {
        // A member without a raft leader refuses require-leader requests
        // (every daemon's, `connect`) before handling them.
        etcd_client::Error::GRpcStatus(s)
            if s.code() == tonic::Code::Unavailable && s.message() == "etcdserver: no leader" =>
        {
            return true;
        }
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable => s,
        etcd_client::Error::TransportError(t) => t,
        _ => return false,
    };
    let mut cause = Some(first);
    while let Some(err) = cause {
        if err.to_string() == "tcp connect error" {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::HostUnreachable
            )
        {
            return true;
        }
        cause = err.source();
    }
    false
}

/// How often each endpoint is checked.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long a TCP connect to a live member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

/// `host:port` of an endpoint URL (`http://h:p`, `https://h:p` or `h:p`).
fn authority(endpoint: &str) -> &str {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

/// Checks every endpoint every 500 ms with a TCP connect; an endpoint that
/// refuses or times out leaves `client`'s balance (never the last one) and
/// returns once it accepts connections again. Runs until aborted.
pub async fn prune_dead_members(client: Client, endpoints: Vec<String>) {
    if endpoints.len() < 2 {
        return;
    }
    let mut removed = vec![false; endpoints.len()];
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        for (i, endpoint) in endpoints.iter().enumerate() {
            let up = matches!(
                tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio::net::TcpStream::connect(authority(endpoint))
                )
                .await,
                Ok(Ok(_))
            );
            let in_use = removed.iter().filter(|r| !**r).count();
            if !up && !removed[i] && in_use > 1 {
                match client.remove_endpoint(endpoint).await {
                    Ok(()) => {
                        tracing::warn!(%endpoint, "etcd member unreachable; not sending requests to it until it answers");
                        removed[i] = true;
                    }
                    Err(e) => {
                        tracing::warn!(%endpoint, error = %e, "could not take an unreachable etcd member out of the balance")
                    }
                }
            } else if up && removed[i] {
                match client.add_endpoint(endpoint).await {
                    Ok(()) => {
                        tracing::info!(%endpoint, "etcd member answers again; back in the balance");
                        removed[i] = false;
                    }
                    Err(e) => {
                        tracing::warn!(%endpoint, error = %e, "could not put an etcd member back in the balance")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_of_endpoint_urls() {
        assert_eq!(authority("http://198.18.128.2:2379"), "198.18.128.2:2379");
        assert_eq!(
            authority("https://etcd-a.example:2379/"),
            "etcd-a.example:2379"
        );
        assert_eq!(authority("127.0.0.1:2379"), "127.0.0.1:2379");
    }

    #[test]
    fn only_connect_failures_and_no_leader_count_as_never_sent() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = etcd_client::Error::GRpcStatus(tonic_status_from(refused));
        assert!(never_sent(&status));
        let leader_changed = etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
            "etcdserver: leader changed",
        ));
        assert!(!never_sent(&leader_changed));
        let no_leader =
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("etcdserver: no leader"));
        assert!(never_sent(&no_leader));
        assert!(!never_sent(&etcd_client::Error::InvalidArgs("x".into())));
    }

    fn tonic_status_from(source: std::io::Error) -> tonic::Status {
        let mut s = tonic::Status::unavailable("tcp connect error");
        s.set_source(std::sync::Arc::new(source));
        s
    }
}
