//! Per-instance flags: HMAC-SHA256 of a server secret over team, challenge
//! and instance, and a constant-time check of a submitted flag.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tidegate_schema::{ChallengeSpec, InstanceId};

/// The HMAC text placed in the challenge's flag template (32 hex characters).
pub fn hmac_hex(secret: &[u8], team: &str, challenge: &str, instance: &InstanceId) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    for part in [team, challenge, instance.as_str()] {
        mac.update(part.as_bytes());
        mac.update(&[0]);
    }
    mac.finalize().into_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The flag of one instance.
pub fn render(
    secret: &[u8],
    spec: &ChallengeSpec,
    team: &str,
    challenge: &str,
    instance: &InstanceId,
) -> String {
    spec.render_flag(&hmac_hex(secret, team, challenge, instance))
}

/// The SHA-256 of a flag in lowercase hex: the key of its owner record
/// (`flag-owners/{challenge}/{digest}`), so the check finds a flag's
/// instance with one read and the keyspace holds no flag in clear.
pub fn digest(flag: &str) -> String {
    use sha2::Digest;
    Sha256::digest(flag.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `submitted` equals `expected`, in time independent of where they differ.
pub fn matches(expected: &str, submitted: &str) -> bool {
    expected.len() == submitted.len() && bool::from(expected.as_bytes().ct_eq(submitted.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_differ_per_instance_team_and_secret() {
        let a = InstanceId::parse("0000000001").unwrap();
        let b = InstanceId::parse("0000000002").unwrap();
        let base = hmac_hex(b"secret-secret-secret", "t1", "web", &a);
        assert_eq!(base.len(), 32);
        assert_eq!(base, hmac_hex(b"secret-secret-secret", "t1", "web", &a));
        assert_ne!(base, hmac_hex(b"secret-secret-secret", "t1", "web", &b));
        assert_ne!(base, hmac_hex(b"secret-secret-secret", "t2", "web", &a));
        assert_ne!(base, hmac_hex(b"other-secret-other", "t1", "web", &a));
        // The separator keeps ("t1w", "eb") apart from ("t1", "web").
        assert_ne!(base, hmac_hex(b"secret-secret-secret", "t1w", "eb", &a));
    }

    #[test]
    fn digests_are_keys() {
        let d = digest("flag{abc}");
        assert!(tidegate_schema::keys::is_sha256_hex(&d), "{d}");
        assert_ne!(d, digest("flag{abd}"));
        assert_eq!(
            digest(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn compare() {
        assert!(matches("flag{abc}", "flag{abc}"));
        assert!(!matches("flag{abc}", "flag{abd}"));
        assert!(!matches("flag{abc}", "flag{abc}x"));
        assert!(!matches("flag{abc}", ""));
    }
}
