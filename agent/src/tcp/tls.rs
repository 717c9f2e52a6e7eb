//! TCP over TLS, routed by SNI (`tls_tcp_entry`): one port for every TCP
//! challenge. The agent terminates TLS with the wildcard certificate, reads
//! the SNI the player sent (`{instance}-{port name}.{domain}`), and serves
//! the connection like one on that instance's public TCP port — the same
//! edge policy (with the SNI as its `host`), the same forwarding to the
//! owner — moving the plaintext with a userspace copy (TLS is userspace).
//!
//! `openssl s_client -quiet -connect {agent}:443 -servername {tls_hostname}`
//! or `ncat --ssl` is the player's client.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Relay;
use super::error::{Result, Step, TcpError};

/// A player's connection after the handshake.
pub type ServerStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `tls_tcp_entry`, bound, with its certificate loaded.
pub struct Entry {
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// Loads the certificate and binds `entry`: a bad file or a taken port
    /// fails the agent's start, naming the field.
    pub fn bind(entry: SocketAddr, cert: &Path, key: &Path) -> Result<Self> {
        let acceptor = acceptor(cert, key)?;
        let listener = std::net::TcpListener::bind(entry)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .step(format!("tls_tcp_entry {entry}"))?;
        Ok(Self { listener, acceptor })
    }
}

/// The TLS side of `tls_tcp_entry`, from PEM files.
fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .step(format!("tls_cert {}", cert.display()))?;
    if chain.is_empty() {
        return Err(TcpError::new(
            format!("tls_cert {}", cert.display()),
            "no certificate in it",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key).step(format!("tls_key {}", key.display()))?;
    let config = ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .step("TLS versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .step("tls_cert and tls_key do not make a certificate")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts on `entry` until the task is dropped.
pub async fn serve(entry: Entry, relay: Arc<Relay>) -> Result<()> {
    let Entry { listener, acceptor } = entry;
    let listener = TcpListener::from_std(listener).step("tls_tcp_entry")?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(entry = %addr, "TCP over TLS served, routed by SNI");
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a TLS connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, relay) = (acceptor.clone(), relay.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    relay.failures.tls.inc();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    relay.failures.tls.inc();
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            relay.serve_tls(tls, peer).await;
        });
    }
}

/// The route key of an SNI: its first label (`{instance}-{port name}`),
/// lowercased; `None` without SNI.
pub fn sni_key(sni: Option<&str>) -> Option<String> {
    let first = sni?.split('.').next()?;
    (!first.is_empty()).then(|| first.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_key_is_the_first_label() {
        assert_eq!(
            sni_key(Some("3f2a9c0d1e-nc.ctf.example.org")).as_deref(),
            Some("3f2a9c0d1e-nc")
        );
        assert_eq!(
            sni_key(Some("3F2A9C0D1E-NC.CTF.example.org")).as_deref(),
            Some("3f2a9c0d1e-nc")
        );
        assert_eq!(sni_key(Some("")), None);
        assert_eq!(sni_key(None), None);
    }
}
