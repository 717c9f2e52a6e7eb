//! Validated names: challenges, teams, instances, workers, hostnames.
//!
//! Each is a newtype that can only hold a valid value, so a key built from
//! one is always a key the parser accepts back, and nothing with `/` or
//! control characters can reach etcd or a Docker label.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::validate::Invalid;

/// Whether `s` is a DNS label: 1–`max` chars of `a-z0-9-`, no leading or
/// trailing `-`.
pub(crate) fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:expr, $rule:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// What a valid value looks like, for error messages.
            pub const RULE: &'static str = $rule;

            /// Checks `s` and wraps it.
            pub fn parse(s: &str) -> Result<Self, Invalid> {
                let check: fn(&str) -> bool = $check;
                if check(s) {
                    Ok(Self(s.to_string()))
                } else {
                    Err(Invalid::new(format!("{} {:?} is not valid: {}", $what, s, $rule)))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = Invalid;
            fn from_str(s: &str) -> Result<Self, Invalid> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A challenge name: a DNS label of at most 48 characters (`web-1`).
    ChallengeName,
    "challenge name",
    |s| is_dns_label(s, 48),
    "1-48 characters of a-z, 0-9 and '-', not starting or ending with '-'"
);

name_type!(
    /// A team id as the CTF platform knows it (`team-42`, `1337`, `Blue_Team`).
    TeamId,
    "team id",
    |s| !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric(),
    "1-64 characters of A-Z, a-z, 0-9, '_', '.' and '-', starting with a letter or digit"
);

name_type!(
    /// An instance id: 10 lowercase hex characters; also its hostname's first label.
    InstanceId,
    "instance id",
    |s| s.len() == 10 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
    "exactly 10 characters of 0-9 and a-f"
);

name_type!(
    /// A worker id: a DNS label of at most 63 characters (`worker-a`).
    WorkerId,
    "worker id",
    |s| is_dns_label(s, 63),
    "1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
);

name_type!(
    /// A lowercase DNS hostname of dot-separated labels (`a3f4b92c8d.ctf.example.org`).
    Hostname,
    "hostname",
    |s| s.len() <= 253 && s.split('.').all(|l| is_dns_label(l, 63)),
    "dot-separated labels of 1-63 characters of a-z, 0-9 and '-', at most 253 in all"
);

name_type!(
    /// A port name in a challenge spec (`web`, `ssh`); used in hostnames, so a short DNS label.
    PortName,
    "port name",
    |s| is_dns_label(s, 15),
    "1-15 characters of a-z, 0-9 and '-', not starting or ending with '-'"
);

name_type!(
    /// A service of a challenge (`app`, `db`, `bot`): the name its
    /// neighbours reach it by on the instance's network, so a DNS label.
    ServiceName,
    "service name",
    |s| is_dns_label(s, 63),
    "1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
);

impl Hostname {
    /// Normalises a Host header or SNI value: strips a `:port`, lowercases,
    /// drops one trailing dot; `None` when the result is not a hostname.
    pub fn from_host_header(host: &str) -> Option<Self> {
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        Self::parse(&host.to_ascii_lowercase()).ok()
    }
}

impl InstanceId {
    /// A fresh random id from 40 random bits.
    pub fn from_random(bits: u64) -> Self {
        Self(format!("{:010x}", bits & 0xff_ffff_ffff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_names() {
        for ok in ["web", "web-1", "a", "x9"] {
            assert!(ChallengeName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-web",
            "web-",
            "Web",
            "we b",
            "we/b",
            "we.b",
            &"a".repeat(49),
        ] {
            let err = ChallengeName::parse(bad).unwrap_err();
            assert!(err.to_string().contains("challenge name"), "{err}");
        }
    }

    #[test]
    fn host_header_normalisation() {
        let h = Hostname::from_host_header("A3F4B92C8D.Ctf.Localhost:8080").unwrap();
        assert_eq!(h.as_str(), "a3f4b92c8d.ctf.localhost");
        assert_eq!(
            Hostname::from_host_header("x.ctf.localhost.")
                .unwrap()
                .as_str(),
            "x.ctf.localhost"
        );
        assert!(Hostname::from_host_header("bad host").is_none());
        assert!(Hostname::from_host_header("").is_none());
        assert!(Hostname::from_host_header("a..b").is_none());
    }

    #[test]
    fn instance_ids() {
        let id = InstanceId::from_random(u64::MAX);
        assert_eq!(id.as_str(), "ffffffffff");
        assert_eq!(InstanceId::from_random(1).as_str(), "0000000001");
        assert!(InstanceId::parse("ABCDEF0123").is_err());
        assert!(InstanceId::parse("abcdef012").is_err());
    }

    #[test]
    fn deserialize_checks() {
        let err = serde_json::from_str::<TeamId>(r#""a/b""#).unwrap_err();
        assert!(err.to_string().contains("team id"), "{err}");
    }
}
