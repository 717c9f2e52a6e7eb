//! What is made once per cluster and kept beside the inventory in
//! `.<name>.deploy/`: the tokens and etcd passwords (`secrets.toml`) and the
//! etcd CA with the members' and clients' certificates (`pki/`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::{Inventory, Role};
use tidegate_local::etcd::{CONTROLLER_USER, worker_user};

/// The tokens and passwords of one cluster.
#[derive(Debug, serde::Serialize, Deserialize)]
pub(super) struct Secrets {
    pub(super) admin_token: String,
    pub(super) platform_token: String,
    pub(super) flag_secret: String,
    pub(super) etcd_root_password: String,
    pub(super) etcd_controller_password: String,
    /// The seed of each worker's etcd password ([`Secrets::worker_password`]).
    pub(super) etcd_agent_password: String,
    /// The agents' hop key (added after the first release: a cluster's
    /// existing file gets one on the next run).
    #[serde(default)]
    pub(super) hop_key: String,
    /// The token for agents' per-instance metrics and `/activity` (added
    /// like `hop_key`).
    #[serde(default)]
    pub(super) scrape_token: String,
}

impl Secrets {
    /// Worker `worker`'s etcd password: SHA-256 of the agents' seed and its
    /// name, so a host added later needs no new state, and one worker's
    /// password says nothing about another's.
    pub(super) fn worker_password(&self, worker: &str) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(self.etcd_agent_password.as_bytes())
            .chain_update(b"\0worker\0")
            .chain_update(worker.as_bytes())
            .finalize();
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// What the dry run and tests render configs with.
    pub(super) fn placeholders() -> Self {
        Self {
            admin_token: "<admin token>".into(),
            platform_token: "<platform token>".into(),
            flag_secret: "<flag secret>".into(),
            etcd_root_password: "<password>".into(),
            etcd_controller_password: "<password>".into(),
            etcd_agent_password: "<password>".into(),
            hop_key: "<hop key>".into(),
            scrape_token: "<scrape token>".into(),
        }
    }
}

fn random_secret() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// 256 bits, hex.
fn random_key() -> String {
    format!("{}{}", random_secret(), random_secret())
}

/// `.<name>.deploy/` beside the inventory.
pub(super) fn state_dir(inventory: &Path, inv: &Inventory) -> PathBuf {
    inventory
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".{}.deploy", inv.name))
}

pub(super) fn secrets(dir: &Path) -> Result<Secrets> {
    let path = dir.join("secrets.toml");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let mut s: Secrets = toml::from_str(&text).with_context(|| path.display().to_string())?;
        if s.hop_key.is_empty() || s.scrape_token.is_empty() {
            if s.hop_key.is_empty() {
                s.hop_key = random_key();
            }
            if s.scrape_token.is_empty() {
                s.scrape_token = random_key();
            }
            write_private(&path, toml::to_string(&s)?.as_bytes())?;
            println!(
                "made the agents' hop key and scrape token: {}",
                path.display()
            );
        }
        return Ok(s);
    }
    let s = Secrets {
        admin_token: random_secret(),
        platform_token: random_secret(),
        flag_secret: random_secret(),
        etcd_root_password: random_secret(),
        etcd_controller_password: random_secret(),
        etcd_agent_password: random_secret(),
        hop_key: random_key(),
        scrape_token: random_key(),
    };
    write_private(&path, toml::to_string(&s)?.as_bytes())?;
    println!(
        "made the cluster's tokens and passwords: {}",
        path.display()
    );
    Ok(s)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    tidegate_local::daemons::write_private(path, bytes).with_context(|| path.display().to_string())
}

fn openssl(args: &[&str], dir: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The etcd CA, one certificate per member (server and peer, SANs = its
/// name and address) and client certificates for root, the controllers
/// and each worker (CN = the etcd user). Made once; a member or worker
/// added to the inventory later gets its certificate on the next run.
pub(super) fn pki(dir: &Path, inv: &Inventory) -> Result<PathBuf> {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki)?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    if !pki.join("ca.pem").exists() {
        let subject = format!("/CN=tidegate {} etcd CA", inv.name);
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "3650",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&args, &pki)?;
        println!("made the etcd CA: {}", pki.join("ca.pem").display());
    }
    for (name, san, usage) in certificates(inv) {
        if pki.join(format!("{name}.pem")).exists() {
            continue;
        }
        let cn = name
            .strip_prefix("client-")
            .or_else(|| name.strip_prefix("member-"))
            .unwrap_or(&name)
            .to_string();
        let ext = format!(
            "{san}\nextendedKeyUsage={usage}\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=critical,CA:FALSE\n"
        );
        std::fs::write(pki.join(format!("{name}.ext")), ext)?;
        let (key, csr, pem, extfile) = (
            format!("{name}-key.pem"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let subject = format!("/CN={cn}");
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(&args, &pki)?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "825",
                "-extfile",
                &extfile,
            ],
            &pki,
        )?;
    }
    Ok(pki)
}

/// The certificates besides the CA: `(file stem, SANs, extended key usage)`.
/// One per etcd member (server and peer), one per etcd user (client).
pub(super) fn certificates(inv: &Inventory) -> Vec<(String, String, &'static str)> {
    let mut certs: Vec<(String, String, &'static str)> = inv
        .with_role(Role::Etcd)
        .iter()
        .map(|h| {
            // 127.0.0.1 too: etcdctl on the member (backups) uses loopback.
            let san = format!(
                "subjectAltName=DNS:{},DNS:localhost,IP:{},IP:127.0.0.1",
                h.name, h.address
            );
            (format!("member-{}", h.name), san, "serverAuth,clientAuth")
        })
        .collect();
    let mut users = vec!["root".to_string(), CONTROLLER_USER.to_string()];
    users.extend(
        inv.with_role(Role::Agent)
            .iter()
            .map(|h| worker_user(&h.name)),
    );
    for user in users {
        certs.push((
            format!("client-{user}"),
            format!("subjectAltName=DNS:{user}"),
            "clientAuth",
        ));
    }
    certs
}
