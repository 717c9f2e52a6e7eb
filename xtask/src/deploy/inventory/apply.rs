//! A run: build, make secrets and PKI once, check every host, copy what
//! differs, then (re)start what changed or is down, in order — etcd, auth,
//! controllers, agents — each tier rolling host by host, and check health.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::cluster::{demo, etcd_auth, etcd_prune_users, etcdctl_prefix};
use super::plan::{Built, HostPlan, build, plan_host, sha256};
use super::secrets::{Secrets, pki, secrets};
use super::services::{start_script, status_script};
use super::ssh::Remote;
use super::{Host, Init, Inventory, Role, at, etcd_urls, q, url_host};
use crate::sh::http;

/// What one run did, for the closing line.
#[derive(Default)]
struct Tally {
    files_changed: usize,
    files_same: usize,
    started: usize,
    running: usize,
    other: usize,
}

/// Host name → the services whose files this run changed there.
type Changed<'a> = BTreeMap<&'a str, BTreeSet<&'static str>>;

/// Deploys `inv`, keeping its secrets and PKI in `state`.
pub(super) fn apply(inv: &Inventory, state: &Path, profile: &str) -> Result<()> {
    std::fs::create_dir_all(state)?;
    let began = Instant::now();
    let built: Built = build(profile)?;
    let built_at = began.elapsed();
    let secrets = secrets(state)?;
    let pki = pki(state, inv)?;
    let plans: Vec<HostPlan> = inv
        .hosts
        .iter()
        .map(|h| plan_host(inv, h, &secrets, Some(&pki), Some(&built)))
        .collect::<Result<_>>()?;
    let mut tally = Tally::default();
    check_hosts(inv, &plans)?;
    let changed = copy_files(inv, &plans, &mut tally)?;
    for p in plans.iter().filter(|p| p.host.roles.contains(&Role::Agent)) {
        if userns_remap(inv, p)? {
            tally.other += 1;
        }
        if key_quotas(inv, p)? {
            tally.other += 1;
        }
    }
    let run = Run {
        inv,
        plans: &plans,
        changed: &changed,
        secrets: &secrets,
    };
    let api = run.start_services(state, &mut tally)?;
    if inv.demo {
        tally.other += demo(inv, &api, &secrets)?;
    }
    println!(
        "deploy {}: {} file(s) written, {} unchanged; {} service(s) (re)started, {} already running; {} other change(s); {:.1} s (build {:.1} s)",
        inv.name,
        tally.files_changed,
        tally.files_same,
        tally.started,
        tally.running,
        tally.other,
        began.elapsed().as_secs_f64(),
        built_at.as_secs_f64(),
    );
    if tally.files_changed + tally.started + tally.other == 0 {
        println!("deploy {}: nothing changed", inv.name);
    }
    println!(
        "API: http://{api}   admin token and passwords: {}   dashboard: http://{api}/dashboard",
        state.join("secrets.toml").display(),
    );
    Ok(())
}

/// Every host answers and has what its roles need.
fn check_hosts(inv: &Inventory, plans: &[HostPlan]) -> Result<()> {
    for p in plans {
        let mut check = String::from("set -e; uname -n >/dev/null");
        if p.host.roles.contains(&Role::Etcd) {
            check.push_str("; command -v etcd >/dev/null || { echo 'etcd is not installed (Debian: apt-get install etcd-server etcd-client)' >&2; exit 1; }; command -v etcdctl >/dev/null || { echo 'etcdctl is not installed (apt-get install etcd-client)' >&2; exit 1; }");
        }
        if p.host.roles.contains(&Role::Agent) {
            check.push_str("; docker info >/dev/null 2>&1 || { echo 'no Docker engine answers (apt-get install docker.io; systemctl start docker)' >&2; exit 1; }");
        }
        if inv.init == Init::Direct {
            check.push_str("; command -v setpriv >/dev/null");
        } else {
            check.push_str("; command -v systemctl >/dev/null || { echo 'no systemctl: set init = \"direct\" in the inventory' >&2; exit 1; }");
        }
        Remote { inv, host: p.host }.run(&check, None)?;
        println!(
            "host {:<12} {} reachable; prerequisites present",
            p.host.name, p.host.address
        );
    }
    Ok(())
}

/// Copies every file whose SHA-256 differs from the host's; returns which
/// services' files changed on which host.
fn copy_files<'a>(
    inv: &Inventory,
    plans: &'a [HostPlan],
    tally: &mut Tally,
) -> Result<Changed<'a>> {
    let mut changed = Changed::new();
    for p in plans {
        let r = Remote { inv, host: p.host };
        if inv.init == Init::Systemd {
            r.run(
                "id tidegate >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin tidegate; \
                 if getent group docker >/dev/null; then usermod -aG docker tidegate; fi",
                None,
            )?;
        }
        let list: String = p.files.iter().map(|f| format!("{} ", q(&f.path))).collect();
        let have = r.run(
            &format!("for f in {list}; do [ -f \"$f\" ] && sha256sum \"$f\"; done; true"),
            None,
        )?;
        let remote: BTreeMap<&str, &str> = have
            .lines()
            .filter_map(|l| l.split_once("  "))
            .map(|(h, f)| (f, h))
            .collect();
        for f in &p.files {
            if remote.get(f.path.as_str()) == Some(&sha256(&f.bytes).as_str()) {
                tally.files_same += 1;
                continue;
            }
            let dir = Path::new(&f.path)
                .parent()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "/".into());
            let tmp = format!("{}.deploy-tmp", f.path);
            r.run(
                &format!(
                    // The file is the owner's alone from creation (it may
                    // hold a secret) until its mode is set.
                    "mkdir -p {d} && (umask 077 && cat > {t}) && chmod {m:o} {t} && mv -f {t} {p}",
                    d = q(&dir),
                    t = q(&tmp),
                    m = f.mode,
                    p = q(&f.path)
                ),
                Some(&f.bytes),
            )?;
            println!("host {:<12} wrote {}", p.host.name, f.path);
            tally.files_changed += 1;
            changed
                .entry(p.host.name.as_str())
                .or_default()
                .extend(f.services.iter().copied());
        }
        own_files(&r, inv, &p.root)?;
    }
    Ok(changed)
}

/// Makes the agent host's Docker engine map container root to an
/// unprivileged range (`"userns-remap": "default"` in its daemon.json,
/// other settings kept), then restarts it (systemd; with `init = direct`
/// it says to). Agents start no instance on an engine without it. A
/// daemon.json that names another remap is left as it is. Whether it
/// changed anything.
fn userns_remap(inv: &Inventory, p: &HostPlan) -> Result<bool> {
    let r = Remote { inv, host: p.host };
    let path = at(&p.root, "/etc/docker/daemon.json");
    let text = r.run(&format!("cat {} 2>/dev/null || true", q(&path)), None)?;
    let mut config: serde_json::Map<String, serde_json::Value> = if text.trim().is_empty() {
        serde_json::Map::new()
    } else {
        serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("host {}: {path} is not a JSON object: {e}", p.host.name)
        })?
    };
    if config.contains_key("userns-remap") {
        return Ok(false);
    }
    config.insert("userns-remap".into(), "default".into());
    let bytes = serde_json::to_vec_pretty(&config)?;
    put_public(&r, &at(&p.root, "/etc/docker"), &path, &bytes)?;
    println!("host {:<12} set userns-remap in {path}", p.host.name);
    if inv.init == Init::Systemd {
        r.run("systemctl restart docker", None)?;
        println!(
            "host {:<12} restarted docker (images must be loaded again into the remapped engine)",
            p.host.name
        );
    } else {
        println!(
            "host {:<12} restart its Docker engine to apply userns-remap (init = direct)",
            p.host.name
        );
    }
    Ok(true)
}

/// Writes `bytes` to `path` (in `dir`) on the host, mode 644, replacing
/// it at once (a temporary file moved over it).
fn put_public(r: &Remote<'_>, dir: &str, path: &str, bytes: &[u8]) -> Result<()> {
    r.run(
        &format!(
            "mkdir -p {d} && cat > {t} && chmod 644 {t} && mv -f {t} {f}",
            d = q(dir),
            t = q(&format!("{path}.deploy-tmp")),
            f = q(path)
        ),
        Some(bytes),
    )?;
    Ok(())
}

/// Raises the agent host's kernel key quotas where they are lower than
/// `KEY_QUOTAS` (every remapped container takes a session keyring of the
/// one remapped uid; at the default 200 the 201st fails to start), and
/// keeps them in `/etc/sysctl.d/60-tidegate-keys.conf`: the higher of the
/// host's value and ours, so a host tuned above them is not lowered at its
/// next boot. The values are set now only with systemd (`init = direct`
/// hosts may share a kernel with others: it says to). Whether it changed
/// anything.
fn key_quotas(inv: &Inventory, p: &HostPlan) -> Result<bool> {
    let r = Remote { inv, host: p.host };
    let mut conf = String::new();
    let mut low = Vec::new();
    for (name, least) in tidegate_local::docker::KEY_QUOTAS {
        // What the host says; unreadable counts as too low.
        let now: u64 = r
            .run(&format!("sysctl -n {name} 2>/dev/null || true"), None)?
            .trim()
            .parse()
            .unwrap_or(0);
        conf.push_str(&format!("{name} = {}\n", now.max(least)));
        if now < least {
            low.push((name, least));
        }
    }
    let path = at(&p.root, "/etc/sysctl.d/60-tidegate-keys.conf");
    let have = r.run(&format!("cat {} 2>/dev/null || true", q(&path)), None)?;
    if have == conf {
        return Ok(false);
    }
    put_public(&r, &at(&p.root, "/etc/sysctl.d"), &path, conf.as_bytes())?;
    println!("host {:<12} wrote {path}", p.host.name);
    if inv.init == Init::Systemd {
        for (name, least) in low {
            r.run(&format!("sysctl -q -w {name}={least}"), None)?;
        }
    } else {
        println!(
            "host {:<12} apply it with `sysctl --system` (init = direct)",
            p.host.name
        );
    }
    Ok(true)
}

/// Gives the daemons' users their files (systemd), and makes the artifact
/// store and the agents' flag directory.
fn own_files(r: &Remote<'_>, inv: &Inventory, root: &Path) -> Result<()> {
    let art = q(&inv.artifact_dir.display().to_string());
    let flags = q(&tidegate_schema::config::AgentConfig::default()
        .flag_dir
        .display()
        .to_string());
    if inv.init != Init::Systemd {
        return r
            .run(&format!("mkdir -p {art} && mkdir -p -m 711 {flags}"), None)
            .map(drop);
    }
    r.run(&format!(
        "chown -R root:tidegate {etc} && chmod 750 {etc} && \
         {{ ! id etcd >/dev/null 2>&1 || {{ mkdir -p {data} && chown -R etcd:etcd {data} && chmod 700 {data} && chown etcd {key}; }}; }} 2>/dev/null; \
         mkdir -p {art} && chown tidegate:tidegate {art} && \
         mkdir -p {flags} && chown tidegate:tidegate {flags} && chmod 711 {flags}",
        etc = q(&at(root, "/etc/tidegate")),
        data = q(&at(root, "/var/lib/tidegate/etcd")),
        key = q(&at(root, "/etc/tidegate/pki/etcd-member-key.pem")),
    ), None)
    .map(drop)
}

/// The starting of services: what the run knows.
struct Run<'a> {
    inv: &'a Inventory,
    plans: &'a [HostPlan<'a>],
    changed: &'a Changed<'a>,
    secrets: &'a Secrets,
}

impl Run<'_> {
    /// Services, in order: etcd everywhere, auth, controllers, agents, each
    /// checked healthy before the next tier. Returns the first API address.
    fn start_services(&self, state: &Path, tally: &mut Tally) -> Result<String> {
        let inv = self.inv;
        self.ensure("tidegate-etcd", tally, &|p| self.member_healthy(p))?;
        let first_etcd = inv.with_role(Role::Etcd)[0];
        let etcd_root: PathBuf = self
            .plans
            .iter()
            .find(|p| p.host.name == first_etcd.name)
            .map(|p| p.root.clone())
            .unwrap_or_default();
        let etcdctl = etcdctl_prefix(inv, &etcd_root);
        let on_first = Remote {
            inv,
            host: first_etcd,
        };
        wait("etcd: every member healthy", || {
            on_first
                .run(&format!("{etcdctl} endpoint health"), None)
                .is_ok()
        })?;
        if etcd_auth(inv, first_etcd, &etcdctl, self.secrets, state)? {
            tally.other += 1;
        }
        self.ensure("tidegate-controller", tally, &|p| {
            self.status_ok(&self.api_of(p.host))
        })?;
        let api: Vec<String> = inv
            .with_role(Role::Controller)
            .into_iter()
            .map(|h| self.api_of(h))
            .collect();
        wait("controllers: answering, a scheduler elected", || {
            api.iter().all(|a| self.status_ok(a))
        })?;
        self.ensure("tidegate-agent", tally, &|p| {
            let metrics = format!("{}:{}", url_host(p.host.address), inv.ports.metrics);
            http(&metrics, "GET", "/metrics", None, "").is_some_and(|(s, _)| s == 200)
                && self.registered(&api[0], &[p.host.name.as_str()])
        })?;
        let agents: Vec<&str> = inv
            .with_role(Role::Agent)
            .iter()
            .map(|h| h.name.as_str())
            .collect();
        wait("agents: every worker registered", || {
            self.registered(&api[0], &agents)
        })?;
        // Only now that every agent runs as its own user: an agent still
        // on the shared user would lose etcd, its lease and its instances.
        if etcd_prune_users(inv, first_etcd, &etcdctl, self.secrets)? {
            tally.other += 1;
        }
        Ok(api[0].clone())
    }

    /// Starts `svc` where it is down, restarts it where its files changed.
    /// A restart is rolling: the next host's service restarts only once
    /// this one's is back (`back`), so an upgrade never takes a whole tier
    /// down (etcd keeps quorum; the load balancer always has agents).
    /// Services that were not running start without waiting: a new etcd
    /// member cannot be healthy before the others start.
    fn ensure(&self, svc: &str, tally: &mut Tally, back: &dyn Fn(&HostPlan) -> bool) -> Result<()> {
        let inv = self.inv;
        for p in self.plans {
            let Some(s) = p.services.iter().find(|s| s.name == svc) else {
                continue;
            };
            let r = Remote { inv, host: p.host };
            let status = r.run(&status_script(inv.init, &p.root, svc), None)?;
            let running = status.trim() == "running";
            let dirty = self
                .changed
                .get(p.host.name.as_str())
                .is_some_and(|c| c.contains(svc));
            if running && !dirty {
                tally.running += 1;
                continue;
            }
            let why = if running {
                "restarted (its files changed)"
            } else {
                "started"
            };
            r.run(&start_script(inv.init, &p.root, s), None)?;
            println!("host {:<12} {svc} {why}", p.host.name);
            if running {
                wait(&format!("host {} {svc} back", p.host.name), || back(p))?;
            }
            tally.started += 1;
        }
        Ok(())
    }

    /// Whether the etcd member of `p` answers `endpoint health`.
    fn member_healthy(&self, p: &HostPlan) -> bool {
        let inv = self.inv;
        let member = format!(
            "https://{}:{}",
            url_host(p.host.address),
            inv.ports.etcd_client
        );
        let one = etcdctl_prefix(inv, &p.root).replacen(
            &etcd_urls(inv, inv.ports.etcd_client).join(","),
            &member,
            1,
        );
        Remote { inv, host: p.host }
            .run(&format!("{one} endpoint health"), None)
            .is_ok()
    }

    fn api_of(&self, h: &Host) -> String {
        format!("{}:{}", url_host(h.address), self.inv.ports.api)
    }

    /// Whether the controller at `addr` answers and knows a leader.
    fn status_ok(&self, addr: &str) -> bool {
        http(
            addr,
            "GET",
            "/v1/status",
            Some(&self.secrets.admin_token),
            "",
        )
        .is_some_and(|(s, body)| s == 200 && body.contains("\"leader\":{"))
    }

    /// Whether every one of `workers` is in the controller's `/v1/workers`.
    fn registered(&self, api: &str, workers: &[&str]) -> bool {
        http(
            api,
            "GET",
            "/v1/workers",
            Some(&self.secrets.admin_token),
            "",
        )
        .is_some_and(|(s, body)| {
            s == 200
                && workers
                    .iter()
                    .all(|w| body.contains(&format!("\"id\":\"{w}\"")))
        })
    }
}

/// Polls `ok` every 250 ms for up to a minute.
fn wait(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let limit = Duration::from_secs(60);
    let started = Instant::now();
    while started.elapsed() < limit {
        if ok() {
            println!(
                "healthy     {what} ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("not healthy after {limit:?}: {what}")
}
