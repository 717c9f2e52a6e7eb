//! The edge admission hook: asked for every HTTP request and TCP connection
//! before it reaches an instance. Issue #7 plugs the challenge's WebAssembly
//! policy in here; until then every connection is admitted.

use std::net::IpAddr;

/// What the policy sees of a connection.
#[derive(Debug, Clone)]
pub struct Connection<'a> {
    pub instance: &'a str,
    pub team: &'a str,
    pub challenge: &'a str,
    pub source: Option<IpAddr>,
    /// `http` or `tcp`.
    pub protocol: &'a str,
    /// The Host (HTTP) or SNI, when there is one.
    pub host: &'a str,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused, with the reason shown to the player.
    Reject(String),
}

/// An edge admission policy.
pub trait EdgePolicy: Send + Sync {
    fn admit(&self, conn: &Connection<'_>) -> Verdict;
}

/// Admits everything (the default until a challenge has a policy).
#[derive(Debug, Default)]
pub struct AllowAll;

impl EdgePolicy for AllowAll {
    fn admit(&self, _conn: &Connection<'_>) -> Verdict {
        Verdict::Allow
    }
}
