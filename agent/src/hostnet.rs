//! The host's side of the instance networks: what the agent sets in the
//! kernel so that one instance cannot take over another's traffic.
//!
//! Neighbour pinning: every container on the instance networks has a
//! permanent neighbour entry (`ip neigh replace … nud permanent`) on its
//! bridge, with the MAC Docker gave it. An instance with raw sockets
//! (`unsafe_caps = ["NET_RAW"]`) can send ARP replies claiming another
//! instance's address; the kernel never changes a permanent entry, so the
//! host keeps sending that instance's traffic to the right container. The
//! set is what Docker lists on the networks (every agent sharing an engine
//! computes the same one); permanent entries on those bridges that Docker
//! no longer lists are removed, so an address given to a new container
//! never keeps an old MAC.

use std::collections::BTreeSet;
use std::net::IpAddr;

use tokio::io::AsyncWriteExt;

/// One pinned neighbour: bridge, address, MAC.
pub type Neighbour = (String, IpAddr, String);

/// Makes the permanent entries on `bridges` equal to `want`, with one
/// `ip -batch` for the changes.
pub async fn pin_neighbours(bridges: &[String], want: &BTreeSet<Neighbour>) -> Result<(), String> {
    let have = permanent_entries(bridges).await?;
    let mut batch = String::new();
    for (bridge, addr, mac) in want.difference(&have) {
        batch += &format!("neigh replace {addr} lladdr {mac} nud permanent dev {bridge}\n");
    }
    for (bridge, addr, _) in have.difference(want) {
        if !want.iter().any(|(b, a, _)| b == bridge && a == addr) {
            batch += &format!("neigh del {addr} dev {bridge}\n");
        }
    }
    if batch.is_empty() {
        return Ok(());
    }
    with_stdin("ip", &["-batch", "-"], &batch).await
}

/// The permanent neighbour entries on `bridges`.
async fn permanent_entries(bridges: &[String]) -> Result<BTreeSet<Neighbour>, String> {
    let out = tokio::process::Command::new("ip")
        .args(["-j", "neigh", "show", "nud", "permanent"])
        .output()
        .await
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip neigh show: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("ip -j neigh: {e}"))?;
    Ok(entries
        .iter()
        .filter_map(|e| {
            let dev = e["dev"].as_str()?;
            bridges.iter().any(|b| b == dev).then_some(())?;
            Some((
                dev.to_string(),
                e["dst"].as_str()?.parse().ok()?,
                e["lladdr"].as_str()?.to_string(),
            ))
        })
        .collect())
}

/// The chain every instance bridge's traffic to this host goes through.
const HOST_CHAIN: &str = "TIDEGATE-HOST";

/// The host firewall: instances cannot open connections to any address of
/// this host (its daemons, etcd, anything listening on 0.0.0.0), over IPv4
/// or IPv6; replies to connections the host opened (the agent proxying to
/// them) pass. Egress instances cannot open connections to `egress_deny`
/// (private ranges and cloud metadata by default: where a cluster's own
/// machines are). Rules are added when missing and never duplicated, so
/// agents sharing a host keep one set.
///
/// ```text
/// -N TIDEGATE-HOST
/// -A TIDEGATE-HOST -m conntrack --ctstate RELATED,ESTABLISHED --ctdir REPLY -j RETURN
/// -A TIDEGATE-HOST -j DROP
/// -I INPUT -i <each instance bridge> -j TIDEGATE-HOST          (and ip6tables)
/// -I DOCKER-USER -i <each egress bridge> -d <each egress_deny> -m conntrack --ctstate NEW -j DROP
/// ```
///
/// The bridges of per-instance networks are named by their subnet with a
/// fixed prefix (`tgi…` internal, `tge…` egress), so one wildcard rule each
/// (`-i tgi+`) covers them all, before any exists.
#[derive(Debug, Clone)]
pub struct Firewall {
    pub bridges: Vec<String>,
    pub egress_bridges: Vec<String>,
    pub egress_deny: Vec<String>,
}

impl Firewall {
    /// Adds whatever rule is missing. An IPv6 failure is an error only
    /// when the host has IPv6 (ip6tables answers).
    pub async fn ensure(&self) -> Result<(), String> {
        if let Some(b) = self
            .bridges
            .iter()
            .filter(|b| !b.ends_with('+'))
            .find(|b| !std::path::Path::new("/sys/class/net").join(b).exists())
        {
            return Err(format!(
                "bridge {b} of the instance networks is not in this agent's network namespace: the Docker engine's host must keep the firewall (allow_host_access on an agent that shares an engine from another namespace)"
            ));
        }
        for cmd in ["iptables", "ip6tables"] {
            let chain = self.ensure_chain(cmd).await;
            if cmd == "ip6tables" && chain.is_err() && !has_ipv6().await {
                continue;
            }
            chain?;
            for bridge in &self.bridges {
                ensure_rule(cmd, "INPUT", &["-i", bridge, "-j", HOST_CHAIN]).await?;
            }
        }
        for bridge in &self.egress_bridges {
            for cidr in self.egress_deny.iter().filter(|c| !c.contains(':')) {
                let rule = egress_rule(bridge, cidr);
                ensure_rule("iptables", "DOCKER-USER", &rule).await?;
            }
            self.prune_egress(bridge).await?;
        }
        Ok(())
    }

    /// Takes out drop rules on the egress bridge for networks no longer in
    /// `egress_deny` (a changed config), so they do not outlive it.
    async fn prune_egress(&self, bridge: &str) -> Result<(), String> {
        let out = tokio::process::Command::new("iptables")
            .args(["-w", "-S", "DOCKER-USER"])
            .output()
            .await
            .map_err(|e| format!("iptables: {e}"))?;
        let rules = String::from_utf8_lossy(&out.stdout);
        for line in rules.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let ours = words.first() == Some(&"-A")
                && words.windows(2).any(|w| w == ["-i", bridge])
                && words.windows(2).any(|w| w == ["--comment", EGRESS_TAG]);
            let dest = words
                .windows(2)
                .find(|w| w[0] == "-d")
                .map(|w| w[1].trim_end_matches("/32"));
            let kept = dest.is_some_and(|d| {
                self.egress_deny
                    .iter()
                    .any(|c| c.trim_end_matches("/32") == d)
            });
            if ours && !kept {
                let mut delete = words[1..].to_vec();
                delete.insert(0, "-D");
                iptables("iptables", &delete).await?;
            }
        }
        Ok(())
    }

    /// Removes this firewall's jumps and egress rules (the red team's
    /// positive control of the firewall).
    pub async fn remove(&self) {
        for cmd in ["iptables", "ip6tables"] {
            for bridge in &self.bridges {
                let _ = iptables(cmd, &["-D", "INPUT", "-i", bridge, "-j", HOST_CHAIN]).await;
            }
        }
        for bridge in &self.egress_bridges {
            for cidr in &self.egress_deny {
                let rule = egress_rule(bridge, cidr);
                let _ = iptables("iptables", &[&["-D", "DOCKER-USER"][..], &rule].concat()).await;
            }
        }
    }

    /// The host chain with its two rules, in order. Only replies pass
    /// (`--ctdir REPLY`): a connection an instance opened while the rules
    /// were missing does not survive their return. Rebuilt in one
    /// `iptables-restore` commit, so the chain is never empty in between.
    async fn ensure_chain(&self, cmd: &str) -> Result<(), String> {
        let replies = "-m conntrack --ctstate RELATED,ESTABLISHED --ctdir REPLY -j RETURN";
        let first: Vec<&str> = ["-C", HOST_CHAIN]
            .into_iter()
            .chain(replies.split(' '))
            .collect();
        let last = ["-C", HOST_CHAIN, "-j", "DROP"];
        if iptables(cmd, &first).await.is_ok() && iptables(cmd, &last).await.is_ok() {
            return Ok(());
        }
        // Declaring the chain in a --noflush restore empties just it, and
        // the commit replaces its rules at once.
        let rules = format!(
            "*filter\n:{HOST_CHAIN} - [0:0]\n-A {HOST_CHAIN} {replies}\n-A {HOST_CHAIN} -j DROP\nCOMMIT\n"
        );
        restore(&format!("{cmd}-restore"), &rules).await
    }
}

/// The comment on every egress rule an agent adds: only rules with it are
/// ever pruned (other software's DOCKER-USER rules are left alone).
const EGRESS_TAG: &str = "tidegate-egress";

/// The DOCKER-USER rule dropping new connections from `bridge` to `cidr`.
fn egress_rule<'a>(bridge: &'a str, cidr: &'a str) -> [&'a str; 14] {
    [
        "-i",
        bridge,
        "-d",
        cidr,
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "comment",
        "--comment",
        EGRESS_TAG,
        "-j",
        "DROP",
    ]
}

/// Inserts `rule` at the top of `chain` unless it is there.
async fn ensure_rule(cmd: &str, chain: &str, rule: &[&str]) -> Result<(), String> {
    if iptables(cmd, &[&["-C", chain][..], rule].concat())
        .await
        .is_ok()
    {
        return Ok(());
    }
    iptables(cmd, &[&["-I", chain, "1"][..], rule].concat()).await
}

async fn has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
        && std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
            .is_ok_and(|v| v.trim() == "0")
}

/// `cmd -w args` (the filter table); the error names the command.
/// `{cmd} --noflush` with `rules` on stdin (one atomic commit).
async fn restore(cmd: &str, rules: &str) -> Result<(), String> {
    with_stdin(cmd, &["-w", "--noflush"], rules).await
}

/// Runs `cmd args` with `input` on its stdin; an error carries its stderr.
async fn with_stdin(cmd: &str, args: &[&str], input: &str) -> Result<(), String> {
    let what = format!("{cmd} {}", args.join(" "));
    let mut child = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|e| format!("{what}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

async fn iptables(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new(cmd)
        .arg("-w")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
