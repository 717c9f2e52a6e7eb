//! The host's side of the instance networks: what the agent sets in the
//! kernel so that one instance cannot take over another's traffic.
//!
//! Neighbour pinning: every running instance's address is a permanent
//! neighbour entry (`ip neigh replace … nud permanent`) on its bridge. An
//! instance with raw sockets (`unsafe_caps = ["NET_RAW"]`) can send an ARP
//! reply claiming another instance's address; the kernel never changes a
//! permanent entry, so the host keeps sending that instance's traffic to
//! the right container.

use std::collections::BTreeSet;
use std::net::IpAddr;

/// One pinned neighbour: bridge, address, MAC.
pub type Neighbour = (String, IpAddr, String);

/// The permanent entries this agent keeps.
#[derive(Debug, Default)]
pub struct Neighbours {
    pinned: BTreeSet<Neighbour>,
    /// Bridges whose leftover permanent entries (a previous run) were flushed.
    flushed: BTreeSet<String>,
}

impl Neighbours {
    /// Makes the pinned set equal to `want`: pins the new, unpins the gone.
    /// A bridge seen for the first time is flushed of permanent entries first.
    pub async fn sync(&mut self, want: BTreeSet<Neighbour>) {
        for (bridge, ..) in &want {
            if self.flushed.insert(bridge.clone())
                && let Err(e) = ip(&["neigh", "flush", "dev", bridge, "nud", "permanent"]).await
            {
                tracing::warn!(%bridge, error = %e, "cannot flush old neighbour entries");
            }
        }
        let gone: Vec<Neighbour> = self.pinned.difference(&want).cloned().collect();
        for (bridge, addr, _) in gone {
            let a = addr.to_string();
            // Gone already (the bridge went with its network) is fine.
            let _ = ip(&["neigh", "del", &a, "dev", &bridge]).await;
            self.pinned
                .retain(|(b, x, _)| !(b == &bridge && *x == addr));
        }
        for n in want.difference(&self.pinned.clone()) {
            let (bridge, addr, mac) = n;
            let a = addr.to_string();
            let pin = [
                "neigh",
                "replace",
                &a,
                "lladdr",
                mac,
                "nud",
                "permanent",
                "dev",
                bridge,
            ];
            match ip(&pin).await {
                Ok(()) => {
                    self.pinned.insert(n.clone());
                }
                Err(e) => {
                    tracing::warn!(%bridge, address = %addr, error = %e, "cannot pin an instance's neighbour entry; retrying")
                }
            }
        }
    }
}

/// Runs `ip` with `args`; the error is its stderr.
async fn ip(args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
