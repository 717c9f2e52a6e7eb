//! Connecting a daemon to etcd: endpoint URLs, optional TLS (server CA,
//! client certificate) and optional user/password auth, as the controller's
//! and the agent's configs give them (`[etcd_tls]`, `[etcd_auth]`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::Deserialize;

/// `[etcd_tls]`: how to check etcd's certificate and prove our own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// PEM file of the CA that signed the etcd members' certificates.
    pub ca_file: PathBuf,
    /// PEM client certificate, when etcd runs with `--client-cert-auth`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name to check in the members' certificates (default: each
    /// endpoint's host).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// `[etcd_auth]`: an etcd user (etcd's `auth enable`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdAuth {
    pub username: String,
    /// A file holding the password (trailing newline ignored), so that the
    /// config can be world-readable and the secret not.
    pub password_file: PathBuf,
}

/// Why a daemon cannot connect, naming the config field.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("config {field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("etcd {endpoints:?}: {source}")]
    Etcd {
        endpoints: Vec<String>,
        source: etcd_client::Error,
    },
}

fn config(field: &'static str, message: impl Into<String>) -> ConnectError {
    ConnectError::Config {
        field,
        message: message.into(),
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|e| config(field, format!("{}: {e}", path.display())))
}

/// Checks the endpoint URLs against the TLS setting before any connection:
/// `https://` needs `[etcd_tls]`, and `[etcd_tls]` needs `https://`.
pub fn check_endpoints(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<(), ConnectError> {
    if endpoints.is_empty() {
        return Err(config("etcd", "give at least one etcd endpoint URL"));
    }
    for e in endpoints {
        let https = e.starts_with("https://");
        if !https && !e.starts_with("http://") {
            return Err(config(
                "etcd",
                format!("{e:?} is not an http:// or https:// URL"),
            ));
        }
        match (https, tls.is_some()) {
            (true, false) => {
                return Err(config(
                    "etcd",
                    format!("{e} is https: add [etcd_tls] with the CA of the etcd members"),
                ));
            }
            (false, true) => {
                return Err(config(
                    "etcd",
                    format!("{e} is plain http but [etcd_tls] is set: use https:// URLs"),
                ));
            }
            _ => {}
        }
    }
    if let Some(t) = tls
        && t.cert_file.is_some() != t.key_file.is_some()
    {
        return Err(config(
            "etcd_tls",
            "cert_file and key_file go together (a client certificate and its key)",
        ));
    }
    Ok(())
}

/// [`check_endpoints`] for a config's `validate()`: the field and message.
pub fn check_config(
    endpoints: &[String],
    tls: Option<&EtcdTls>,
) -> Result<(), (&'static str, String)> {
    check_endpoints(endpoints, tls).map_err(|e| match e {
        ConnectError::Config { field, message } => (field, message),
        e => ("etcd", e.to_string()),
    })
}

/// Connects with a 2 s connect timeout and 2 s HTTP/2 keep-alives; with
/// auth, tokens are refreshed when etcd expires them.
pub async fn connect(
    endpoints: &[String],
    tls: Option<&EtcdTls>,
    auth: Option<&EtcdAuth>,
) -> Result<Client, ConnectError> {
    check_endpoints(endpoints, tls)?;
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
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

    fn tls() -> EtcdTls {
        EtcdTls {
            ca_file: "/nonexistent/ca.pem".into(),
            cert_file: None,
            key_file: None,
            server_name: None,
        }
    }

    #[test]
    fn endpoint_schemes_must_match_the_tls_setting() {
        let https = vec!["https://198.18.0.2:2379".to_string()];
        let http = vec!["http://198.18.0.2:2379".to_string()];
        assert!(check_endpoints(&http, None).is_ok());
        assert!(check_endpoints(&https, Some(&tls())).is_ok());
        let e = check_endpoints(&https, None).unwrap_err().to_string();
        assert!(e.contains("add [etcd_tls]"), "{e}");
        let e = check_endpoints(&http, Some(&tls()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("use https://"), "{e}");
        let e = check_endpoints(&["198.18.0.2:2379".into()], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an http:// or https:// URL"), "{e}");
        assert!(check_endpoints(&[], None).is_err());
        let half = EtcdTls {
            cert_file: Some("/c.pem".into()),
            ..tls()
        };
        let e = check_endpoints(&https, Some(&half))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cert_file and key_file go together"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_ca_file_is_named() {
        let https = vec!["https://198.18.0.2:2379".to_string()];
        let Err(e) = connect(&https, Some(&tls()), None).await else {
            panic!("connected without a CA file");
        };
        let text = e.to_string();
        assert!(
            text.starts_with("config etcd_tls.ca_file: /nonexistent/ca.pem:"),
            "{text}"
        );
    }
}
