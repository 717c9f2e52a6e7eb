//! Connecting a daemon to etcd: endpoint URLs, optional TLS (server CA,
//! client certificate) and optional user/password auth, as the daemons'
//! configs give them (`[etcd_tls]`, `[etcd_auth]`).

use std::path::Path;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tidegate_schema::config::{ConfigError, EtcdAuth, EtcdTls, check_etcd};

/// Why a daemon cannot connect, naming the config field.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("etcd {endpoints:?}: {source}")]
    Etcd {
        endpoints: Vec<String>,
        source: etcd_client::Error,
    },
}

fn config(field: &'static str, message: impl Into<String>) -> ConnectError {
    ConnectError::Config(ConfigError {
        field,
        message: message.into(),
    })
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|e| config(field, format!("{}: {e}", path.display())))
}

/// Connects with a 2 s connect timeout and 2 s HTTP/2 keep-alives; with
/// auth, tokens are refreshed when etcd expires them.
///
/// Every request requires a leader: a member cut off from the others
/// (TCP to it still works, so it stays in the client's balance) refuses
/// new requests at once instead of holding them until they time out, and
/// cancels the watch streams open on it a few election timeouts after
/// losing its leader; the retry lands on a member that has one. Without
/// it, an agent whose watch was on such a member saw nothing until the
/// partition healed.
pub async fn connect(
    endpoints: &[String],
    tls: Option<&EtcdTls>,
    auth: Option<&EtcdAuth>,
) -> Result<Client, ConnectError> {
    check_etcd(endpoints, tls)?;
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_require_leader(true);
    if let Some(t) = tls {
        let ca = read("etcd_tls.ca_file", &t.ca_file)?;
        let mut tls_options = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) {
            let cert = read("etcd_tls.cert_file", cert)?;
            let key = read("etcd_tls.key_file", key)?;
            tls_options = tls_options.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &t.server_name {
            tls_options = tls_options.domain_name(name.clone());
        }
        options = options.with_tls(tls_options);
    }
    if let Some(a) = auth {
        let raw = read("etcd_auth.password_file", &a.password_file)?;
        let password = String::from_utf8(raw)
            .map_err(|_| config("etcd_auth.password_file", "the password is not UTF-8"))?;
        let password = password.trim_end_matches(['\n', '\r']);
        if a.username.is_empty() || password.is_empty() {
            return Err(config(
                "etcd_auth",
                "username and the password file's content must not be empty",
            ));
        }
        options = options
            .with_user(a.username.clone(), password)
            .with_auto_token_refresh(true);
    }
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|source| ConnectError::Etcd {
            endpoints: endpoints.to_vec(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_ca_file_is_named() {
        let https = vec!["https://198.18.0.2:2379".to_string()];
        let tls = EtcdTls {
            ca_file: "/nonexistent/ca.pem".into(),
            cert_file: None,
            key_file: None,
            server_name: None,
        };
        let Err(e) = connect(&https, Some(&tls), None).await else {
            panic!("connected without a CA file");
        };
        let text = e.to_string();
        assert!(
            text.starts_with("config etcd_tls.ca_file: /nonexistent/ca.pem:"),
            "{text}"
        );
    }
}
