//! Per-instance networks: each instance of a challenge with `services` gets
//! a Docker bridge network of its own, `tidegate-{id}`, with a /28 the agent
//! allocates from `instance_networks` (so it knows how many are left, and
//! Docker's own address pools are never used up by instances).
//!
//! The network is internal unless the spec sets `egress`, has
//! inter-container traffic on (the instance's services reach each other by
//! name), and is labelled like the instance's containers, so a sweep finds
//! it after a crash. Its Linux bridge is named from its subnet with a fixed
//! prefix (`tgi` internal, `tge` egress), which the host firewall matches
//! with one wildcard rule each.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use bollard::errors::Error as DockerError;
use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::ListNetworksOptions;
use tidegate_schema::{InstanceId, InstanceRecord};

use super::{LABEL_INSTANCE, LABEL_WORKER, Runtime};

/// The bridge name prefixes of per-instance networks: internal, egress.
pub const INSTANCE_BRIDGE_PREFIXES: [&str; 2] = ["tgi", "tge"];

/// The label marking a network as an instance's own.
const LABEL_NETWORK: &str = "tidegate.network";
const NETWORK_KIND: &str = "instance";

/// Each instance network's prefix length: 13 addresses for at most 8
/// services.
const PREFIX: u32 = 28;

/// The Docker name of an instance's own network. (The red team's
/// positive control: one network shared by every instance with services.)
pub fn name(id: &InstanceId) -> String {
    if tidegate_schema::config::planted("instance-networks") {
        return "tidegate-planted-shared".into();
    }
    format!("tidegate-{id}")
}

/// The /28s of `instance_networks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnets {
    base: u32,
    count: u32,
}

impl Default for Subnets {
    fn default() -> Self {
        Self::parse("198.19.128.0/17").unwrap_or(Self { base: 0, count: 0 })
    }
}

impl Subnets {
    /// From a CIDR of /8 to /28 (the agent's config checked it).
    pub fn parse(cidr: &str) -> Option<Self> {
        let (ip, len) = cidr.split_once('/')?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        let len: u32 = len.parse().ok()?;
        if !(8..=PREFIX).contains(&len) {
            return None;
        }
        Some(Self {
            base: u32::from(ip),
            count: 1 << (PREFIX - len),
        })
    }

    /// How many there are.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The `i`th subnet's network address.
    fn nth(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base + (i << (32 - PREFIX)))
    }

    /// The index of the subnet `cidr` names, if it is one of these.
    pub fn index_of(&self, cidr: &str) -> Option<u32> {
        let (ip, len) = cidr.split_once('/')?;
        if len != PREFIX.to_string() {
            return None;
        }
        let at = u32::from(ip.parse::<Ipv4Addr>().ok()?).checked_sub(self.base)?;
        let i = at >> (32 - PREFIX);
        (at & ((1 << (32 - PREFIX)) - 1) == 0 && i < self.count).then_some(i)
    }

    /// The first subnet not in `used`.
    pub fn first_free(&self, used: &BTreeSet<u32>) -> Option<u32> {
        (0..self.count).find(|i| !used.contains(i))
    }
}

/// An instance network of this worker, as Docker lists it.
#[derive(Debug, Clone)]
pub struct InstanceNetwork {
    pub name: String,
    pub instance: String,
    /// Its subnet's index in `instance_networks` (None: outside it, e.g. a
    /// changed config).
    pub subnet: Option<u32>,
}

impl Runtime {
    /// The per-instance networks carrying this worker's label, and the
    /// subnets of `instance_networks` any network on the engine holds
    /// (another agent's on a shared engine, one made by hand): those are
    /// never offered.
    pub async fn instance_networks(
        &self,
    ) -> Result<(Vec<InstanceNetwork>, BTreeSet<u32>), DockerError> {
        let list = self
            .docker
            .list_networks(None::<ListNetworksOptions>)
            .await?;
        let mut taken = BTreeSet::new();
        let mut ours = Vec::new();
        for n in list {
            let subnet = n
                .ipam
                .as_ref()
                .and_then(|i| i.config.as_ref())
                .and_then(|c| c.iter().find_map(|c| c.subnet.clone()))
                .and_then(|s| self.subnets.index_of(&s));
            taken.extend(subnet);
            let labels = n.labels.unwrap_or_default();
            let mine = labels.get(LABEL_WORKER) == Some(&self.worker)
                && labels.get(LABEL_NETWORK).map(String::as_str) == Some(NETWORK_KIND)
                && labels.get(super::LABEL_CLUSTER) == self.cluster.as_ref();
            if let (true, Some(instance), Some(name)) = (mine, labels.get(LABEL_INSTANCE), n.name) {
                ours.push(InstanceNetwork {
                    name,
                    instance: instance.clone(),
                    subnet,
                });
            }
        }
        Ok((ours, taken))
    }

    /// How many per-instance networks this worker has in all.
    pub fn subnets(&self) -> Subnets {
        self.subnets
    }

    /// Creates the network of `rec` on subnet `index` (or finds it made).
    /// Err with Docker's answer: a subnet taken by a network this agent
    /// does not know of (another engine user) is refused with 403 or 409.
    pub async fn create_instance_network(
        &self,
        rec: &InstanceRecord,
        index: u32,
        egress: bool,
    ) -> Result<(), DockerError> {
        let name = name(&rec.id);
        // An engine speaking API 1.41 makes a second network of the same
        // name rather than refusing it: look first, one step at a time.
        let _one_at_a_time = self.network_lock.lock().await;
        match self.docker.inspect_network(&name, None).await {
            Ok(_) => return Ok(()),
            Err(e) if super::not_found(&e) => {}
            Err(e) => return Err(e),
        }
        let net = self.subnets.nth(index);
        let octets = net.octets();
        let gateway = Ipv4Addr::from(u32::from(net) + 1);
        let prefix = INSTANCE_BRIDGE_PREFIXES[usize::from(egress)];
        let bridge = format!(
            "{prefix}{:02x}{:02x}{:02x}{:02x}",
            octets[0], octets[1], octets[2], octets[3]
        );
        let mut labels = self.labels(rec);
        labels.insert(LABEL_NETWORK.to_string(), NETWORK_KIND.to_string());
        let options = HashMap::from([
            ("com.docker.network.bridge.name".to_string(), bridge),
            (
                "com.docker.network.bridge.enable_icc".to_string(),
                "true".to_string(),
            ),
        ]);
        let req = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            internal: Some(!egress),
            options: Some(options),
            labels: Some(labels),
            ipam: Some(Ipam {
                driver: Some("default".into()),
                config: Some(vec![IpamConfig {
                    subnet: Some(format!("{net}/{PREFIX}")),
                    gateway: Some(gateway.to_string()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        match self.docker.create_network(req).await {
            Ok(_) => {
                tracing::debug!(network = %name, subnet = %format!("{net}/{PREFIX}"), "created an instance network");
                Ok(())
            }
            Err(DockerError::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already exists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes a network; gone already is fine. Fails while a container is
    /// still attached (the next pass tries again).
    pub async fn remove_network(&self, name: &str) -> Result<(), DockerError> {
        match self.docker.remove_network(name).await {
            Err(e) if super::not_found(&e) => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_28s_of_the_range() {
        let s = Subnets::parse("198.19.128.0/17").unwrap();
        assert_eq!(s.count(), 2048);
        assert_eq!(s.nth(0), Ipv4Addr::new(198, 19, 128, 0));
        assert_eq!(s.nth(1), Ipv4Addr::new(198, 19, 128, 16));
        assert_eq!(s.nth(2047), Ipv4Addr::new(198, 19, 255, 240));
        assert_eq!(s.index_of("198.19.128.16/28"), Some(1));
        assert_eq!(s.index_of("198.19.255.240/28"), Some(2047));
        // Not one of them: another prefix, host bits, outside the range.
        assert_eq!(s.index_of("198.19.128.16/24"), None);
        assert_eq!(s.index_of("198.19.128.17/28"), None);
        assert_eq!(s.index_of("198.19.127.240/28"), None);
        assert_eq!(s.index_of("198.20.0.0/28"), None);
        assert_eq!(s.index_of("garbage"), None);
        let used = BTreeSet::from([0, 1, 3]);
        assert_eq!(s.first_free(&used), Some(2));
        let one = Subnets::parse("198.19.200.0/28").unwrap();
        assert_eq!(one.count(), 1);
        assert_eq!(one.first_free(&BTreeSet::from([0])), None);
        assert_eq!(Subnets::parse("198.19.200.0/29"), None);
    }
}
