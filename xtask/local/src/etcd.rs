//! Real etcd clusters of 1 or 3 (or more) members, on loopback or on hosts
//! of the caller's (network namespaces), torn down on drop.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::ports::free_ports;
use crate::process::{Supervised, wait_until};

/// How long a member may take to report healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where one member listens and keeps its data.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    pub name: String,
    /// The address it listens on (loopback, or its test host's).
    pub ip: Ipv4Addr,
    /// The network namespace it runs in (a test host), if any.
    pub netns: Option<String>,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
}

impl MemberSpec {
    /// The URL clients use.
    pub fn client_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.client_port)
    }

    /// Where its client port is.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.client_port))
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.peer_port)
    }

    /// The `etcd` command-line arguments for this member of `cluster`.
    pub fn args(&self, cluster: &[MemberSpec], token: &str) -> Vec<String> {
        let initial_cluster = cluster
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let client = self.client_url();
        let peer = self.peer_url();
        [
            ("--name", self.name.clone()),
            ("--data-dir", self.data_dir.display().to_string()),
            ("--listen-client-urls", client.clone()),
            ("--advertise-client-urls", client),
            ("--listen-peer-urls", peer.clone()),
            ("--initial-advertise-peer-urls", peer),
            ("--initial-cluster", initial_cluster),
            ("--initial-cluster-token", token.to_string()),
            ("--initial-cluster-state", "new".to_string()),
            // Small elections keep failover tests short; the defaults are
            // what production uses (deploy/ documents them).
            ("--heartbeat-interval", "50".to_string()),
            ("--election-timeout", "500".to_string()),
            ("--logger", "zap".to_string()),
            ("--log-level", "warn".to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        // A member back from a crash asks before it campaigns, so its
        // return does not depose a working leader (off by default in etcd
        // 3.4; deploy/ turns it on too). A boolean flag takes `=`.
        .chain(["--pre-vote=true".to_string()])
        .collect()
    }
}

/// `n` member specs with free loopback ports and data dirs under `dir`.
pub fn plan_members(n: usize, dir: &Path) -> Result<Vec<MemberSpec>> {
    let ports = free_ports(2 * n)?;
    Ok((0..n)
        .map(|i| MemberSpec {
            name: format!("m{i}"),
            ip: Ipv4Addr::LOCALHOST,
            netns: None,
            client_port: ports[2 * i],
            peer_port: ports[2 * i + 1],
            data_dir: dir.join(format!("m{i}.etcd")),
        })
        .collect())
}

/// Whether the member at `addr` answers `/health` with `"health":"true"`
/// (which needs a leader, so a member without quorum answers false).
pub fn healthy(addr: SocketAddr) -> bool {
    http_get(addr, "/health").is_some_and(|body| body.contains(r#""health":"true""#))
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

/// A host an etcd member can run on: a network namespace with an address.
pub trait MemberHost {
    /// The network namespace (`ip netns exec <name>`).
    fn netns(&self) -> &str;
    /// The address the member listens on.
    fn addr(&self) -> Ipv4Addr;
}

/// The etcd user of worker `worker` (its role has the same name).
pub fn worker_user(worker: &str) -> String {
    format!("tidegate-worker-{worker}")
}

/// The controllers' etcd user (and role): readwrite on the key root.
pub const CONTROLLER_USER: &str = "tidegate-controller";

/// The users of a cluster with auth on ([`EtcdCluster::enable_auth`]):
/// each password in a 0600 file of the cluster's directory.
#[derive(Debug, Clone)]
pub struct EtcdUsers {
    dir: PathBuf,
}

impl EtcdUsers {
    /// `[etcd_auth]` of `user`.
    pub fn auth(&self, user: &str) -> tidegate_schema::config::EtcdAuth {
        tidegate_schema::config::EtcdAuth {
            username: user.to_string(),
            password_file: self.dir.join(format!("{user}.password")),
        }
    }

    /// `[etcd_auth]` of the controllers.
    pub fn controller(&self) -> tidegate_schema::config::EtcdAuth {
        self.auth(CONTROLLER_USER)
    }

    /// `[etcd_auth]` of worker `worker`.
    pub fn worker(&self, worker: &str) -> tidegate_schema::config::EtcdAuth {
        self.auth(&worker_user(worker))
    }

    /// `user`'s password (`root` for etcd's admin view).
    pub fn password(&self, user: &str) -> Result<String> {
        Ok(std::fs::read_to_string(self.auth(user).password_file)?
            .trim()
            .to_string())
    }
}

/// A running etcd cluster owned by a test; every member is killed and every
/// data dir removed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    specs: Vec<MemberSpec>,
    procs: Vec<Option<Supervised>>,
    /// Members added to a running cluster ([`EtcdCluster::replace_member`]):
    /// they start with `--initial-cluster-state existing`.
    joined: Vec<bool>,
    token: String,
    // Declared last: dropped after the processes that use it.
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one of them is healthy.
    pub fn start(n: usize) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tidegate-etcd-")
            .tempdir()?;
        let specs = plan_members(n, dir.path())?;
        Self::start_members(specs, dir)
    }

    /// Starts one member on each host (ports 2379 and 2380 of its address,
    /// as on real machines) and waits until all are healthy.
    pub fn start_on<H: MemberHost>(hosts: &[&H]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tidegate-etcd-")
            .tempdir()?;
        let specs = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| MemberSpec {
                name: format!("m{i}"),
                ip: host.addr(),
                netns: Some(host.netns().to_string()),
                client_port: 2379,
                peer_port: 2380,
                data_dir: dir.path().join(format!("m{i}.etcd")),
            })
            .collect();
        Self::start_members(specs, dir)
    }

    fn start_members(specs: Vec<MemberSpec>, dir: tempfile::TempDir) -> Result<Self> {
        let n = specs.len();
        let token = format!("tidegate-test-{:08x}", rand::random::<u32>());
        let mut cluster = Self {
            procs: specs.iter().map(|_| None).collect(),
            joined: vec![false; n],
            specs,
            token,
            dir,
        };
        for i in 0..n {
            cluster.spawn_member(i)?;
        }
        for i in 0..n {
            cluster.wait_healthy(i)?;
        }
        Ok(cluster)
    }

    fn spawn_member(&mut self, i: usize) -> Result<()> {
        let spec = &self.specs[i];
        let log = self.dir.path().join(format!("{}.log", spec.name));
        let mut args = spec.args(&self.specs, &self.token);
        if self.joined[i]
            && let Some(state) = args.iter().position(|a| a == "--initial-cluster-state")
        {
            args[state + 1] = "existing".to_string();
        }
        let program = match &spec.netns {
            None => "etcd",
            Some(ns) => {
                args.splice(0..0, ["netns", "exec", ns, "etcd"].map(String::from));
                "ip"
            }
        };
        self.procs[i] = Some(Supervised::spawn(&spec.name, program, &args, &log)?);
        Ok(())
    }

    /// Turns etcd's auth on with the production roles: `root`, the
    /// controllers' user (readwrite on the key root) and one user and role
    /// per worker in `workers`, granted exactly
    /// [`Keyspace::worker_grants`](tidegate_schema::Keyspace::worker_grants).
    /// Passwords go to etcdctl on stdin, never in argv.
    pub fn enable_auth(&self, workers: &[&str]) -> Result<EtcdUsers> {
        let users = EtcdUsers {
            dir: self.dir.path().join("users"),
        };
        std::fs::create_dir_all(&users.dir)?;
        let etcdctl = |args: &[String], stdin: Option<&str>| self.etcdctl(args, stdin);
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ks = tidegate_schema::Keyspace::default();
        let mut roles: Vec<(String, Vec<tidegate_schema::Grant>)> = vec![
            ("root".into(), Vec::new()),
            (
                CONTROLLER_USER.into(),
                vec![tidegate_schema::Grant {
                    key: ks.root_prefix(),
                    prefix: true,
                    write: true,
                }],
            ),
        ];
        for w in workers {
            let id = tidegate_schema::WorkerId::parse(w)
                .map_err(|e| Error::NotReady(format!("worker {w:?}: {e}")))?;
            roles.push((worker_user(w), ks.worker_grants(&id)));
        }
        for (user, grants) in &roles {
            let password = format!("{:032x}", rand::random::<u128>());
            crate::daemons::write_private(
                &users.auth(user).password_file,
                format!("{password}\n").as_bytes(),
            )?;
            etcdctl(
                &args(&["user", "add", user, "--interactive=false"]),
                Some(&format!("{password}\n")),
            )?;
            etcdctl(&args(&["role", "add", user]), None)?;
            for g in grants {
                let mut a = args(&["role", "grant-permission", user]);
                a.extend(g.etcdctl_args());
                etcdctl(&a, None)?;
            }
            etcdctl(&args(&["user", "grant-role", user, user]), None)?;
        }
        etcdctl(&args(&["auth", "enable"]), None)?;
        Ok(users)
    }

    /// Runs `etcdctl` against every member's endpoint with `args` (and
    /// `stdin`), returning its stdout; a failure carries its stderr.
    fn etcdctl(&self, args: &[String], stdin: Option<&str>) -> Result<String> {
        let mut cmd = std::process::Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let command = crate::error::display(&cmd);
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(Error::Failed {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A membership change through etcdctl. etcd refuses one that would
    /// leave it without a healthy quorum ("unhealthy cluster"), which it
    /// also says for a while after the previous change: retried for up to
    /// 30 s.
    fn reconfigure(&self, args: &[String]) -> Result<String> {
        let mut tries = 0;
        loop {
            match self.etcdctl(args, None) {
                Err(Error::Failed { stderr, .. })
                    if stderr.contains("unhealthy cluster") && tries < 60 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                done => return done,
            }
        }
    }

    /// The member id etcd gave member `i` (hex, as etcdctl prints it), from
    /// `etcdctl member list`.
    pub fn member_id(&self, i: usize) -> Result<String> {
        let name = &self.specs[i].name;
        let list = self.etcdctl(&["member".into(), "list".into()], None)?;
        list.lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split(", ").collect();
                (fields.get(2) == Some(&name.as_str())).then(|| fields[0].to_string())
            })
            .ok_or_else(|| Error::NotReady(format!("etcd member {name} is not listed:\n{list}")))
    }

    /// Replaces member `i` the way an operator replaces a dead machine:
    /// kills it, removes it from the cluster (`etcdctl member remove`),
    /// wipes its data dir, adds it back under the same name and peer URL
    /// (`member add`, so it gets a new id) and starts it empty with
    /// `--initial-cluster-state existing`; it catches up from the leader.
    /// Needs the other members to have quorum. Returns the new member id.
    /// Does not wait for health.
    pub fn replace_member(&mut self, i: usize) -> Result<String> {
        let old = self.member_id(i)?;
        self.kill_member(i)?;
        self.reconfigure(&["member".into(), "remove".into(), old.clone()])?;
        let data = &self.specs[i].data_dir;
        if data.exists() {
            std::fs::remove_dir_all(data)?;
        }
        // `Member <id> added to cluster <id>`: a member added but not yet
        // started has no name in `member list`.
        let added = self.reconfigure(&[
            "member".to_string(),
            "add".into(),
            self.specs[i].name.clone(),
            format!("--peer-urls={}", self.specs[i].peer_url()),
        ])?;
        let new = added
            .split_whitespace()
            .skip_while(|w| *w != "Member")
            .nth(1)
            .map(str::to_string)
            .ok_or_else(|| Error::NotReady(format!("etcdctl member add said: {added}")))?;
        self.joined[i] = true;
        self.spawn_member(i)?;
        if new == old {
            return Err(Error::NotReady(format!(
                "etcd member {} kept its id {old} after remove and add",
                self.specs[i].name
            )));
        }
        Ok(new)
    }

    /// Client URLs of every member, killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        self.specs.iter().map(MemberSpec::client_url).collect()
    }

    /// The members' specs (ports, data dirs).
    pub fn members(&self) -> &[MemberSpec] {
        &self.specs
    }

    /// The member's process, while it runs.
    pub fn process(&self, i: usize) -> Option<&Supervised> {
        self.procs[i].as_ref()
    }

    /// Waits until member `i` reports healthy; the error carries its log tail.
    pub fn wait_healthy(&self, i: usize) -> Result<()> {
        let addr = self.specs[i].client_addr();
        if wait_until(READY_TIMEOUT, || healthy(addr)) {
            return Ok(());
        }
        let tail = self.procs[i]
            .as_ref()
            .map(|p| p.log_tail(20))
            .unwrap_or_default();
        Err(Error::NotReady(format!(
            "etcd member {} ({addr}) not healthy after {READY_TIMEOUT:?}:\n{tail}",
            self.specs[i].name
        )))
    }

    /// Kills member `i` with SIGKILL (its data dir stays for a restart).
    pub fn kill_member(&mut self, i: usize) -> Result<()> {
        if let Some(mut p) = self.procs[i].take() {
            p.kill()?;
        }
        Ok(())
    }

    /// The disaster drill of deploy/README.md: kills every member, wipes its
    /// data dir, rebuilds it from `snapshot` with `script`
    /// (deploy/etcd/restore-member.sh) under a new cluster token, starts
    /// every member and waits until all are healthy.
    pub fn restore_from(&mut self, snapshot: &Path, script: &Path) -> Result<()> {
        for i in 0..self.specs.len() {
            self.kill_member(i)?;
        }
        self.token = format!("tidegate-restored-{:08x}", rand::random::<u32>());
        self.joined.fill(false);
        let initial_cluster = self
            .specs
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for spec in &self.specs {
            if spec.data_dir.exists() {
                std::fs::remove_dir_all(&spec.data_dir)?;
            }
            let out = std::process::Command::new(script)
                .arg(snapshot)
                .arg(&spec.name)
                .arg(spec.peer_url())
                .arg(&initial_cluster)
                .arg(&self.token)
                .arg(&spec.data_dir)
                .output()?;
            if !out.status.success() {
                return Err(Error::NotReady(format!(
                    "{} {}: {}{}",
                    script.display(),
                    spec.name,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        for i in 0..self.specs.len() {
            self.spawn_member(i)?;
        }
        for i in 0..self.specs.len() {
            self.wait_healthy(i)?;
        }
        Ok(())
    }

    /// Starts member `i` again from its data dir. Does not wait for health:
    /// a lone member of a 3-member cluster has no quorum until a second one
    /// returns.
    pub fn restart_member(&mut self, i: usize) -> Result<()> {
        self.kill_member(i)?;
        self.spawn_member(i)
    }
}
