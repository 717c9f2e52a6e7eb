//! The red team's range: a cluster laid out as in production, on this
//! machine. etcd on a host of its own (a network namespace) with auth on
//! and the production roles (each agent its worker's own user), the
//! controller (and a standby replica) and agent `a` on this host's address toward the others
//! (198.18.128.x), agent `b` on another host; each daemon of the debug
//! build, so `TIDEGATE_PLANTED` can switch a defence off. Five instances:
//! team locked's on agent `b` (spawned while b is the only worker; its
//! challenge's allowlist policy then refuses team locked at the edge), and
//! on agent `a`: team mallory's on the isolated network, on the egress
//! network and with `unsafe_caps = ["NET_RAW"]`, and team alice's (the
//! victim). Everything is removed on drop.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tidegate_local::etcd::{EtcdCluster, EtcdUsers, worker_user};
use tidegate_local::images::{REDTEAM_HTTP_PORT, REDTEAM_TCP_PORT, redteam_image};
use tidegate_local::netns::{NetnsHost, Routed};
use tidegate_local::ports::free_port;
use tidegate_local::process::{Supervised, wait_until};
use tidegate_schema::config::AgentConfig;

use crate::cluster::{Containers, ControlPlane, agent_config, agent_wrapped, api};
use crate::{sh, workspace_root};

/// `tcp_idle_timeout_secs` of challenge `rt-idle` (the least a spec may say).
pub(super) const IDLE_SECS: u32 = 10;

/// One instance of the range.
#[derive(Debug, Clone)]
pub(super) struct Instance {
    pub(super) id: String,
    pub(super) container: String,
    pub(super) address: IpAddr,
    pub(super) hostname: String,
    pub(super) tcp_port: u16,
}

/// The range (fields drop in order: agents before the control plane,
/// containers after the agents, hosts last).
pub(super) struct Range {
    pub(super) a: Supervised,
    pub(super) a_cfg: AgentConfig,
    pub(super) b: Supervised,
    pub(super) b_cfg: AgentConfig,
    pub(super) plane: ControlPlane,
    /// A standby replica's API (it forwards scheduling calls to `plane`'s).
    pub(super) standby: String,
    /// etcd's users: root (the admin), the controllers', each worker's.
    pub(super) users: EtcdUsers,
    _containers: Containers,
    pub(super) host_b: NetnsHost,
    _host_etcd: NetnsHost,
    _routed: Routed,
    /// Agent a's extra egress rule (etcd's address), taken out at the end.
    _etcd_rule: EgressRule,
    pub(super) bin_dir: PathBuf,
    /// The defence switched off, if any.
    pub(super) planted: Option<String>,
    pub(super) mallory: Instance,
    pub(super) mallory_egress: Instance,
    pub(super) mallory_raw: Instance,
    pub(super) alice: Instance,
    /// Team idler's instance of `rt-idle`, whose TCP connections close
    /// after [`IDLE_SECS`] without a byte.
    pub(super) idler: Instance,
    /// Team locked's instance on agent b, which its challenge's edge
    /// policy (the allowlist) refuses to everyone but red, blue and the
    /// organizers.
    pub(super) locked: Instance,
    /// A listener on 0.0.0.0 of this host (accepting, then dropping).
    pub(super) listener: SocketAddr,
    /// The challenges' `secret_env` value (`ADMIN_PASSWORD`).
    pub(super) secret_env_value: String,
}

impl Range {
    /// Builds the debug binaries and the image, starts everything, spawns
    /// the five instances and waits until they run.
    pub(super) fn start(planted: Option<&str>) -> Result<Self> {
        println!("building the daemons and the player's tools (debug)");
        sh::run(Command::new("cargo").current_dir(workspace_root()).args([
            "build",
            "--quiet",
            "--workspace",
            "--bins",
        ]))?;
        let bin_dir = crate::target_dir().join("debug");
        let image = redteam_image(&bin_dir.join("player"), &bin_dir.join("tcp-echo"))?;
        let routed = Routed::enable()?;
        let host_etcd = NetnsHost::create()?;
        let host_b = NetnsHost::create()?;
        let etcd = EtcdCluster::start_on(&[&host_etcd])?;
        let users = etcd.enable_auth(&["worker-a", "worker-b"])?;
        let here = IpAddr::V4(host_b.host_side_addr());
        let env: Vec<String> = match planted {
            Some(d) => vec!["env".into(), format!("TIDEGATE_PLANTED={d}")],
            None => Vec::new(),
        };
        if planted == Some("etcd-roles") {
            // As before per-worker roles: every agent readwrite on the root.
            let role = worker_user("worker-b");
            let (ok, _, err) = etcdctl_as(
                &etcd.endpoints(),
                &users,
                "root",
                &[
                    "role",
                    "grant-permission",
                    &role,
                    "--prefix=true",
                    "readwrite",
                    "/tidegate/",
                ],
            )?;
            if !ok {
                bail!("widening {role}: {err}");
            }
        }
        let mut plane = ControlPlane::start_with(&bin_dir, etcd, &env, |c| {
            c.listen = SocketAddr::new(here, c.listen.port());
            c.etcd_auth = Some(users.controller());
        })?;
        // A second replica: platforms may send any call to either.
        let standby = plane.add_standby(&bin_dir, &env)?;
        let label = format!("redteam-{}", std::process::id());
        let containers = Containers(label.clone());
        let dir = plane.dir().to_path_buf();
        let endpoints = plane.etcd.endpoints();

        let b_ip = IpAddr::V4(host_b.addr());
        let mut b_cfg = agent_config("worker-b", &endpoints, &dir, &label)?;
        b_cfg.advertise_address = b_ip;
        b_cfg.tcp_host = b_ip;
        b_cfg.http_entry = SocketAddr::new(b_ip, 8080);
        b_cfg.metrics_listen = SocketAddr::new(b_ip, 9464);
        b_cfg.capacity = 1;
        b_cfg.etcd_auth = Some(users.worker("worker-b"));
        // b shares this host's Docker engine from its own network
        // namespace: the kernel rules of the instance networks are this
        // host's, kept by agent a.
        b_cfg.allow_host_access = true;
        // Team locked's instance runs here: under the read-only-rootfs
        // control its spec asks for a writable layer too.
        b_cfg.allow_unbounded_rootfs = planted == Some("read-only-rootfs");
        let mut b_wrapper: Vec<String> = ["ip", "netns", "exec", host_b.name()]
            .map(String::from)
            .to_vec();
        b_wrapper.extend(env.iter().cloned());
        let b = agent_wrapped(&bin_dir, &dir, &b_cfg, &b_wrapper)?;

        let writable = planted == Some("read-only-rootfs");
        // Swept for like the flags: it must reach no one but the instances.
        let secret_env_value = format!("rt-secret-{:016x}", rand::random::<u64>());
        for (name, extra) in [
            // Mallory's flag as a file (`flag.file`), for the flag-file attack.
            ("rt-web", json!({"flag": {"file": "/flag"}})),
            ("rt-egress", json!({"egress": true})),
            ("rt-raw", json!({"unsafe_caps": ["NET_RAW"]})),
            // Served pinned: the policy decides at a connection's first request.
            ("rt-locked", json!({"http_mode": "pinned"})),
            ("rt-idle", json!({"tcp_idle_timeout_secs": IDLE_SECS})),
        ] {
            let mut spec = json!({
                "image": image,
                "ports": [
                    {"name": "web", "port": REDTEAM_HTTP_PORT, "protocol": "http"},
                    {"name": "echo", "port": REDTEAM_TCP_PORT, "protocol": "tcp"},
                ],
                "read_only_rootfs": !writable,
                "per_team_max": 3,
                "secret_env": {"ADMIN_PASSWORD": secret_env_value},
            });
            for (k, v) in extra.as_object().into_iter().flatten() {
                spec[k] = v.clone();
            }
            let (status, body) = call(&plane, "PUT", &format!("/v1/challenges/{name}"), &spec)?;
            if status != 201 && status != 200 {
                bail!("registering {name}: {status} {body}");
            }
        }
        // The locked instance first, while b is the only worker: its owner
        // is b, and a is the agent a player's forged hops claim to be.
        let locked = spawn(&plane, "rt-locked", "locked")?;
        let locked = running(&plane, &locked.0, &locked.1).with_context(|| {
            format!(
                "the locked instance never ran; agent b:\n{}",
                b.log_tail(20)
            )
        })?;
        lock(&plane)?;
        let mut a_cfg = agent_config("worker-a", &endpoints, &dir, &label)?;
        a_cfg.advertise_address = here;
        a_cfg.tcp_host = here;
        a_cfg.http_entry = SocketAddr::new(here, free_port()?);
        a_cfg.metrics_listen = SocketAddr::new(here, free_port()?);
        a_cfg.capacity = 64;
        a_cfg.etcd_auth = Some(users.worker("worker-a"));
        a_cfg.allow_unbounded_rootfs = planted == Some("read-only-rootfs");
        a_cfg.allow_host_access = planted == Some("firewall");
        // etcd is a cluster machine: as in production, where it sits in a
        // private range, egress instances may not reach it.
        a_cfg.egress_deny.push(format!("{}/32", host_etcd.addr()));
        let etcd_rule = EgressRule(format!("{}/32", host_etcd.addr()));
        let a = agent_wrapped(&bin_dir, &dir, &a_cfg, &env)?;

        let spawn = |challenge: &str, team: &str| spawn(&plane, challenge, team);
        let (mallory, mallory_egress, mallory_raw, alice, idler) = (
            spawn("rt-web", "mallory")?,
            spawn("rt-egress", "mallory")?,
            spawn("rt-raw", "mallory")?,
            spawn("rt-web", "alice")?,
            spawn("rt-idle", "idler")?,
        );
        let listener = std::net::TcpListener::bind("0.0.0.0:0")?;
        let listening = listener.local_addr()?;
        std::thread::spawn(move || for _ in listener.incoming() {});
        let mut range = Self {
            a,
            a_cfg,
            b,
            plane,
            standby,
            users,
            _containers: containers,
            host_b,
            _host_etcd: host_etcd,
            _routed: routed,
            _etcd_rule: etcd_rule,
            bin_dir,
            planted: planted.map(String::from),
            mallory: Instance::pending(mallory),
            mallory_egress: Instance::pending(mallory_egress),
            mallory_raw: Instance::pending(mallory_raw),
            alice: Instance::pending(alice),
            idler: Instance::pending(idler),
            locked,
            b_cfg,
            listener: listening,
            secret_env_value,
        };
        for inst in [
            &mut range.mallory,
            &mut range.mallory_egress,
            &mut range.mallory_raw,
            &mut range.alice,
            &mut range.idler,
        ] {
            let (id, body) = (inst.id.clone(), inst.hostname.clone());
            *inst = running(&range.plane, &id, &body).with_context(|| {
                format!(
                    "instance {id} never ran; agent a:\n{}",
                    range.a.log_tail(20)
                )
            })?;
        }
        Ok(range)
    }

    /// The gateway of `inst`'s network (this host's address on its bridge).
    pub(super) fn gateway(&self, inst: &Instance) -> Result<String> {
        sh::output(Command::new("docker").args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}",
            &inst.container,
        ]))
        .map(|g| g.trim().to_string())
        .filter(|g| !g.is_empty())
        .with_context(|| format!("no gateway for {}", inst.container))
    }

    /// The etcd endpoints.
    pub(super) fn endpoints(&self) -> Vec<String> {
        self.plane.etcd.endpoints()
    }

    /// etcdctl on the range's etcd as etcd user `user` (`root`: the admin);
    /// (whether it succeeded, stdout, stderr).
    pub(super) fn etcdctl(&self, user: &str, args: &[&str]) -> Result<(bool, String, String)> {
        etcdctl_as(&self.endpoints(), &self.users, user, args)
    }

    /// etcdctl as `user` that must succeed: its stdout, or an error naming
    /// the command and what etcdctl said.
    pub(super) fn etcdctl_ok(&self, user: &str, args: &[&str]) -> Result<String> {
        let (ok, out, err) = self.etcdctl(user, args)?;
        if !ok {
            bail!("etcdctl {args:?} as {user}: {err}");
        }
        Ok(out)
    }

    /// Runs `args` in `inst`'s container as its root would; the output.
    pub(super) fn exec(&self, inst: &Instance, args: &[&str]) -> Result<String> {
        let out = Command::new("docker")
            .args(["exec", &inst.container])
            .args(args)
            .output()?;
        if out.status.code() == Some(2) || out.status.code() == Some(126) {
            bail!(
                "docker exec {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The `player` tool on this host, through `wrapper` (e.g. `ip netns exec B`).
    pub(super) fn player(&self, wrapper: &[&str], args: &[&str]) -> Result<String> {
        let player = self.bin_dir.join("player");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&player);
                c
            }
            None => Command::new(&player),
        };
        let out = cmd.args(args).output()?;
        if !out.status.success() {
            bail!(
                "player {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The range's working directory (configs, logs).
    pub(super) fn dir(&self) -> &Path {
        self.plane.dir()
    }
}

impl Instance {
    /// An instance known only by its id (and its hostname in `hostname`).
    fn pending((id, hostname): (String, String)) -> Self {
        Self {
            id,
            container: String::new(),
            address: IpAddr::from([0, 0, 0, 0]),
            hostname,
            tcp_port: 0,
        }
    }
}

/// Drop rules for one network on the egress bridge, which agents keep
/// after they stop: removed when dropped, so that address (a test host's
/// next time) stays reachable for later runs.
struct EgressRule(String);

impl Drop for EgressRule {
    fn drop(&mut self) {
        let Some(rules) = sh::output(Command::new("iptables").args(["-w", "-S", "DOCKER-USER"]))
        else {
            return;
        };
        for line in rules
            .lines()
            .filter(|l| l.starts_with("-A ") && l.contains(&format!("-d {} ", self.0)))
        {
            let mut args: Vec<&str> = line.split_whitespace().collect();
            args[0] = "-D";
            let _ = Command::new("iptables").arg("-w").args(&args).status();
        }
    }
}

/// The allowlist example's component (built with its default teams: red,
/// blue, organizers).
pub(super) fn allowlist_component() -> Result<Vec<u8>> {
    let built = tidegate_local::plugins::build(
        &workspace_root().join("plugins"),
        &crate::target_dir().join("plugins"),
        &[],
    )
    .map_err(anyhow::Error::msg)?;
    let allowlist = built
        .iter()
        .find(|b| b.name == "allowlist")
        .context("plugin allowlist was not built")?;
    Ok(std::fs::read(&allowlist.component)?)
}

/// Puts the allowlist policy on `rt-locked` (after its instance was
/// spawned: the policy refuses team locked at the edge from then on).
fn lock(plane: &ControlPlane) -> Result<()> {
    let wasm = allowlist_component()?;
    let out = api(
        plane.dir(),
        &plane.url,
        "PUT",
        "/v1/challenges/rt-locked/policy",
        wasm,
    )?;
    if !out.ends_with(" 200") {
        bail!("putting the allowlist on rt-locked: {out}");
    }
    Ok(())
}

/// One admin API call: status and JSON body.
pub(super) fn call(
    plane: &ControlPlane,
    method: &str,
    path: &str,
    body: &Value,
) -> Result<(u16, Value)> {
    let out = api(
        plane.dir(),
        &plane.url,
        method,
        path,
        body.to_string().into_bytes(),
    )?;
    let (text, status) = out.rsplit_once(' ').context("curl printed no status")?;
    Ok((
        status.parse()?,
        serde_json::from_str(text).unwrap_or(Value::Null),
    ))
}

/// Spawns `challenge` for `team` with the admin token: (id, hostname).
pub(super) fn spawn(plane: &ControlPlane, challenge: &str, team: &str) -> Result<(String, String)> {
    let (status, body) = call(
        plane,
        "POST",
        "/v1/instances",
        &json!({"challenge": challenge, "team": team}),
    )?;
    if status != 201 {
        bail!("spawning {challenge} for {team}: {status} {body}");
    }
    let id = body["id"].as_str().context("no id")?.to_string();
    let host = body["http"][0]["hostname"]
        .as_str()
        .unwrap_or("")
        .to_string();
    Ok((id, host))
}

/// Waits until instance `id` runs; its container, address and ports.
fn running(plane: &ControlPlane, id: &str, hostname: &str) -> Result<Instance> {
    let mut last = Value::Null;
    let up = wait_until(Duration::from_secs(60), || {
        last = call(plane, "GET", &format!("/v1/instances/{id}"), &Value::Null)
            .map(|(_, b)| b)
            .unwrap_or(Value::Null);
        last["status"].as_str() == Some("running")
    });
    if !up {
        bail!("instance {id}: {last}");
    }
    let filter = format!("label=tidegate.instance={id}");
    let container =
        sh::output(Command::new("docker").args(["ps", "-q", "--no-trunc", "--filter", &filter]))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .with_context(|| format!("no container for {id}"))?;
    let address = sh::output(Command::new("docker").args([
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &container,
    ]))
    .and_then(|a| a.trim().parse().ok())
    .with_context(|| format!("no address for {container}"))?;
    Ok(Instance {
        id: id.to_string(),
        container,
        address,
        hostname: hostname.to_string(),
        tcp_port: last["tcp"][0]["port"].as_u64().unwrap_or(0) as u16,
    })
}

/// etcdctl on `endpoints` as `user`, its password in the environment
/// (`ETCDCTL_USER`), never in argv; (success, stdout, stderr).
fn etcdctl_as(
    endpoints: &[String],
    users: &EtcdUsers,
    user: &str,
    args: &[&str],
) -> Result<(bool, String, String)> {
    let password = users.password(user)?;
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_USER", format!("{user}:{password}"))
        .args(["--endpoints", &endpoints.join(",")])
        .args(args)
        .output()
        .context("running etcdctl")?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    Ok((out.status.success(), text(&out.stdout), text(&out.stderr)))
}
