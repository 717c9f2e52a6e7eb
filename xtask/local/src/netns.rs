//! Hosts on this machine for tests: network namespaces joined to this one
//! by a veth pair, with addresses from 198.18.128.0/17 (part of the
//! benchmarking range; Docker has 198.18.0.0/24 and 198.19.0.0/17; per-instance
//! networks 198.19.128.0/17).
//!
//! Host `i` gets the /30 at 198.18.(128 + i / 64).((i % 64) * 4): `.1` on
//! this side, `.2` inside. Slots are claimed with `ip netns add`, which fails
//! when the name exists, so concurrent test processes never share one.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::etcd::MemberHost;
use crate::{Error, Result, run};

/// How many hosts can exist at once.
pub const MAX_HOSTS: u32 = 64 * 128;
const NAME_PREFIX: &str = "tgt";

/// A network namespace with one veth link to the host; deleted on drop.
#[derive(Debug)]
pub struct NetnsHost {
    name: String,
    index: u32,
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

impl NetnsHost {
    /// Creates a namespace with loopback up and its veth configured and up.
    pub fn create() -> Result<Self> {
        for index in 0..MAX_HOSTS {
            let name = format!("{NAME_PREFIX}{index}");
            if ip(&["netns", "add", &name]).is_err() {
                continue;
            }
            let host = Self { name, index };
            host.configure()?;
            return Ok(host);
        }
        Err(Error::NotReady(format!(
            "all {MAX_HOSTS} test-host slots are taken (`ip netns list`)"
        )))
    }

    fn configure(&self) -> Result<()> {
        let (outer, inner) = (self.veth_outer(), self.veth_inner());
        // A stale veth of a killed test would block the name.
        let _ = ip(&["link", "del", &outer]);
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        ip(&["link", "set", &inner, "netns", &self.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_side_addr()),
            "dev",
            &outer,
        ])?;
        ip(&["link", "set", &outer, "up"])?;
        self.exec(&["ip", "link", "set", "lo", "up"])?;
        self.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", self.addr()),
            "dev",
            &inner,
        ])?;
        self.exec(&["ip", "link", "set", &inner, "up"])?;
        self.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &self.host_side_addr().to_string(),
        ])?;
        Ok(())
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address inside the namespace.
    pub fn addr(&self) -> Ipv4Addr {
        self.nth(2)
    }

    /// The address of this side of the veth (the namespace's gateway).
    pub fn host_side_addr(&self) -> Ipv4Addr {
        self.nth(1)
    }

    fn nth(&self, n: u8) -> Ipv4Addr {
        let third = 128 + (self.index / 64) as u8;
        let fourth = ((self.index % 64) * 4) as u8 + n;
        Ipv4Addr::new(198, 18, third, fourth)
    }

    fn veth_outer(&self) -> String {
        format!("tgv{}h", self.index)
    }

    fn veth_inner(&self) -> String {
        format!("tgv{}n", self.index)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `argv` inside the namespace and returns its stdout.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Error::NotReady("exec needs a program".into()))?;
        run(self.command(program).args(args))
    }
}

impl MemberHost for NetnsHost {
    fn netns(&self) -> &str {
        &self.name
    }

    fn addr(&self) -> Ipv4Addr {
        self.nth(2)
    }
}

impl NetnsHost {
    fn iptables(&self, args: &[&str]) -> Result<()> {
        let mut argv = vec!["iptables", "-w"];
        argv.extend_from_slice(args);
        self.exec(&argv).map(drop)
    }

    /// Cuts the host off: every packet in or out of it is dropped, except on
    /// its loopback (established connections hang, as on a real partition).
    pub fn partition(&self) -> Result<()> {
        self.iptables(&["-I", "INPUT", "!", "-i", "lo", "-j", "DROP"])?;
        self.iptables(&["-I", "OUTPUT", "!", "-o", "lo", "-j", "DROP"])
    }

    /// Cuts the host's link to TCP `port` of other hosts: its next packet on
    /// an open connection gets a reset, and new connections are refused.
    pub fn cut_port(&self, port: u16) -> Result<()> {
        let port = port.to_string();
        self.iptables(&[
            "-I",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            &port,
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ])
    }

    /// Undoes [`partition`](Self::partition) and [`cut_port`](Self::cut_port).
    pub fn heal(&self) -> Result<()> {
        self.iptables(&["-F"])
    }
}

/// Lets test hosts reach each other and the containers on Docker's
/// networks through this namespace, for as long as it lives: Docker's
/// FORWARD policy is DROP, so the guard inserts ACCEPT rules into the
/// `DOCKER-USER` chain (Docker's place for them) and masquerades the hosts'
/// connections into Docker bridges (an internal network's containers have
/// no route back to 198.18.128.0/17). Containers still cannot open
/// connections to the hosts. Removed on drop.
#[derive(Debug)]
pub struct Routed {
    rules: Vec<Vec<String>>,
}

const HOSTS_NET: &str = "198.18.128.0/17";

impl Routed {
    /// Inserts the rules (and turns on IPv4 forwarding, as Docker does).
    pub fn enable() -> Result<Self> {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        let rules: Vec<Vec<String>> = [
            vec!["filter", "DOCKER-USER", "-s", HOSTS_NET, "-j", "ACCEPT"],
            vec![
                "filter",
                "DOCKER-USER",
                "-d",
                HOSTS_NET,
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
            vec![
                "nat",
                "POSTROUTING",
                "-s",
                HOSTS_NET,
                "-o",
                "br-+",
                "-j",
                "MASQUERADE",
            ],
        ]
        .into_iter()
        .map(|r| r.into_iter().map(String::from).collect())
        .collect();
        let mut guard = Self { rules: Vec::new() };
        for rule in rules {
            let (table, rest) = rule.split_at(2);
            let mut args = vec!["-w", "-t", &table[0], "-I", &table[1]];
            args.extend(rest.iter().map(String::as_str));
            run(Command::new("iptables").args(&args))?;
            guard.rules.push(rule);
        }
        Ok(guard)
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        for rule in &self.rules {
            let (table, rest) = rule.split_at(2);
            let mut args = vec!["-w", "-t", &table[0], "-D", &table[1]];
            args.extend(rest.iter().map(String::as_str));
            let _ = run(Command::new("iptables").args(&args));
        }
    }
}

impl Drop for NetnsHost {
    fn drop(&mut self) {
        // Deleting the namespace destroys the inner veth and with it the pair.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.veth_outer()]);
    }
}
