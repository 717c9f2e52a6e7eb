//! `[etcd_tls]`, `[etcd_auth]` and the endpoint checks both daemons share.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, bad};

/// `[etcd_tls]`: how to check etcd's certificate and prove our own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdAuth {
    pub username: String,
    /// A file holding the password (trailing newline ignored), so that the
    /// config can be world-readable and the secret not.
    pub password_file: PathBuf,
}

/// Checks the endpoint URLs against the TLS setting before any connection:
/// `https://` needs `[etcd_tls]`, and `[etcd_tls]` needs `https://`.
pub fn check_etcd(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<(), ConfigError> {
    if endpoints.is_empty() {
        return Err(bad("etcd", "give at least one etcd endpoint URL"));
    }
    for e in endpoints {
        let https = e.starts_with("https://");
        if !https && !e.starts_with("http://") {
            return Err(bad(
                "etcd",
                format!("{e:?} is not an http:// or https:// URL"),
            ));
        }
        match (https, tls.is_some()) {
            (true, false) => {
                return Err(bad(
                    "etcd",
                    format!("{e} is https: add [etcd_tls] with the CA of the etcd members"),
                ));
            }
            (false, true) => {
                return Err(bad(
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
        return Err(bad(
            "etcd_tls",
            "cert_file and key_file go together (a client certificate and its key)",
        ));
    }
    Ok(())
}
