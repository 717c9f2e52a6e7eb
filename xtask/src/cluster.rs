//! A local cluster of tidegate's own build for the benchmarks and the red
//! team: an etcd, a controller that leads, agents from typed configs, and
//! their containers removed at the end; the admin API through curl.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tidegate_local::daemons::write_config;
use tidegate_local::etcd::EtcdCluster;
use tidegate_local::ports::free_port;
use tidegate_local::process::{Supervised, wait_until};
use tidegate_schema::config::{AgentConfig, ControllerConfig};

use crate::sh;

/// The admin token of the cluster's controllers.
pub(crate) const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";
/// The platform token of the cluster's controllers.
pub(crate) const PLATFORM_TOKEN: &str = "bench-platform-token-0123456789";

/// A control plane: etcd, one controller leading, and the working directory
/// of their files; stopped and removed when dropped.
pub(crate) struct ControlPlane {
    /// Stopped when dropped.
    _controller: Supervised,
    /// Replicas added by [`ControlPlane::add_standby`]; stopped when dropped.
    standbys: Vec<Supervised>,
    pub(crate) etcd: EtcdCluster,
    /// The controller's API.
    pub(crate) url: String,
    /// The leading controller's settings (a standby copies them).
    cfg: ControllerConfig,
    work: tempfile::TempDir,
}

impl ControlPlane {
    /// `members` etcd members on loopback and a controller of the build in
    /// `bin_dir`.
    pub(crate) fn start(bin_dir: &Path, members: usize) -> Result<Self> {
        let etcd = EtcdCluster::start(members)?;
        Self::start_with(bin_dir, etcd, &[], |_| {})
    }

    /// A controller of the build in `bin_dir` on `etcd`, started through
    /// `wrapper` (e.g. `env NAME=VALUE`), its config changed by `configure`.
    pub(crate) fn start_with(
        bin_dir: &Path,
        etcd: EtcdCluster,
        wrapper: &[String],
        configure: impl FnOnce(&mut ControllerConfig),
    ) -> Result<Self> {
        let work = work_dir()?;
        let mut cfg = controller_config(work.path(), &etcd.endpoints())?;
        configure(&mut cfg);
        let (controller, url) = controller(bin_dir, work.path(), &cfg, wrapper)?;
        Ok(Self {
            _controller: controller,
            standbys: Vec::new(),
            etcd,
            url,
            cfg,
            work,
        })
    }

    /// Starts another replica of the build in `bin_dir` (under `wrapper`)
    /// with the leader's settings on a free port of the same address, and
    /// waits until it answers as a standby; its API URL.
    pub(crate) fn add_standby(&mut self, bin_dir: &Path, wrapper: &[String]) -> Result<String> {
        self.add_replica(bin_dir, wrapper, "\"role\":\"standby\"")
    }

    /// As [`ControlPlane::add_standby`], waiting until its `/v1/status`
    /// contains `until` (with shards it leads some: no standby).
    pub(crate) fn add_replica(
        &mut self,
        bin_dir: &Path,
        wrapper: &[String],
        until: &str,
    ) -> Result<String> {
        let mut cfg = self.cfg.clone();
        cfg.id = format!("standby-{}", self.standbys.len() + 1);
        cfg.listen.set_port(free_port()?);
        cfg.advertise_url = None;
        let (proc, url) = start(bin_dir, self.work.path(), &cfg, wrapper)?;
        let answering = wait_until(Duration::from_secs(15), || {
            api(self.dir(), &url, "GET", "/v1/status", Vec::new()).is_ok_and(|s| s.contains(until))
        });
        if !answering {
            bail!(
                "the replica {} did not answer with {until} within 15 s:\n{}",
                cfg.id,
                proc.log_tail(20)
            );
        }
        self.standbys.push(proc);
        Ok(url)
    }

    pub(crate) fn dir(&self) -> &Path {
        self.work.path()
    }
}

/// A fresh working directory, removed when dropped.
pub(crate) fn work_dir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("tidegate-bench-")
        .tempdir()?)
}

/// The settings of the cluster's controller: a free loopback port, the
/// tokens above, a short election.
fn controller_config(dir: &Path, endpoints: &[String]) -> Result<ControllerConfig> {
    let port = free_port()?;
    Ok(ControllerConfig {
        id: "bench".into(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        etcd: endpoints.to_vec(),
        admin_token: ADMIN_TOKEN.into(),
        platform_token: PLATFORM_TOKEN.into(),
        flag_secret: "bench-flag-secret-0123456789".into(),
        election_ttl_secs: 2,
        artifact_dir: dir.join("artifacts"),
        tcp_ports: "20000-29999".into(),
        scrape_token_file: Some(tidegate_local::daemons::scrape_token_file(dir)?),
        ..ControllerConfig::default()
    })
}

/// Starts the controller `cfg` (of the build in `bin_dir`, under `wrapper`)
/// and waits until it leads; its API URL.
fn controller(
    bin_dir: &Path,
    dir: &Path,
    cfg: &ControllerConfig,
    wrapper: &[String],
) -> Result<(Supervised, String)> {
    let (controller, url) = start(bin_dir, dir, cfg, wrapper)?;
    let leading = wait_until(Duration::from_secs(15), || {
        api(dir, &url, "GET", "/v1/status", Vec::new())
            .is_ok_and(|s| s.contains("\"role\":\"leader\""))
    });
    if !leading {
        bail!(
            "the controller did not lead within 15 s:\n{}",
            controller.log_tail(20)
        );
    }
    Ok((controller, url))
}

/// Writes `cfg` and starts that controller; its process and API URL. The
/// first replica's files are `controller.toml` and `controller.log`, the
/// others' are named by their id.
fn start(
    bin_dir: &Path,
    dir: &Path,
    cfg: &ControllerConfig,
    wrapper: &[String],
) -> Result<(Supervised, String)> {
    let url = format!("http://{}", cfg.listen);
    let name = if cfg.id == "bench" {
        "controller".to_string()
    } else {
        format!("controller-{}", cfg.id)
    };
    let path = dir.join(format!("{name}.toml"));
    write_config(cfg, &path)?;
    let (program, args) = wrapped(
        wrapper,
        &bin_dir.join("tidegate-controller"),
        &["--config".into(), path.display().to_string()],
    );
    let proc = Supervised::spawn(&name, &program, &args, &dir.join(format!("{name}.log")))?;
    Ok((proc, url))
}

/// `binary args` run under `wrapper` (a command that execs the rest of its
/// arguments), as a program and its arguments.
pub(crate) fn wrapped(wrapper: &[String], binary: &Path, args: &[String]) -> (String, Vec<String>) {
    let binary = binary.display().to_string();
    match wrapper.split_first() {
        None => (binary, args.to_vec()),
        Some((first, rest)) => {
            let mut all = rest.to_vec();
            all.push(binary);
            all.extend_from_slice(args);
            (first.clone(), all)
        }
    }
}

/// The settings every agent of the cluster has: no image pulls, metrics on
/// a free loopback port, the artifact store and containers' label of the run.
pub(crate) fn agent_config(
    worker: &str,
    etcd: &[String],
    dir: &Path,
    label: &str,
) -> Result<AgentConfig> {
    Ok(AgentConfig {
        worker_id: worker.into(),
        etcd: etcd.to_vec(),
        pull_images: false,
        metrics_listen: std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        artifact_dir: dir.join("artifacts"),
        cluster_label: Some(label.into()),
        hop_key_file: Some(tidegate_local::daemons::hop_key_file(dir)?),
        scrape_token_file: Some(tidegate_local::daemons::scrape_token_file(dir)?),
        ..AgentConfig::default()
    })
}

/// Starts an agent (of the build in `bin_dir`) with `cfg` and waits until
/// its metrics answer.
pub(crate) fn agent(bin_dir: &Path, dir: &Path, cfg: &AgentConfig) -> Result<Supervised> {
    agent_wrapped(bin_dir, dir, cfg, &[])
}

/// As [`agent`], started through `wrapper` (e.g. `ip netns exec NAME`).
pub(crate) fn agent_wrapped(
    bin_dir: &Path,
    dir: &Path,
    cfg: &AgentConfig,
    wrapper: &[String],
) -> Result<Supervised> {
    let name = &cfg.worker_id;
    let path = dir.join(format!("{name}.toml"));
    write_config(cfg, &path)?;
    let (program, args) = wrapped(
        wrapper,
        &bin_dir.join("tidegate-agent"),
        &["--config".into(), path.display().to_string()],
    );
    let proc = Supervised::spawn(name, &program, &args, &dir.join(format!("{name}.log")))?;
    let metrics = format!("http://{}/metrics", cfg.metrics_listen);
    let curl = wrapped(wrapper, Path::new("curl"), &["-sf".into(), metrics]);
    let up = wait_until(Duration::from_secs(20), || {
        sh::output(Command::new(&curl.0).args(&curl.1)).is_some()
    });
    if !up {
        bail!("agent {name} did not start:\n{}", proc.log_tail(20));
    }
    Ok(proc)
}

/// Removes the containers and networks of label `tidegate.cluster={label}`
/// when dropped.
pub(crate) struct Containers(pub(crate) String);

impl Drop for Containers {
    fn drop(&mut self) {
        let _ = tidegate_local::docker::remove_labelled(&format!("tidegate.cluster={}", self.0));
        tidegate_local::docker::remove_flag_files(&self.0);
    }
}

/// One API call with the admin token through curl: the body, a space and the status code.
pub(crate) fn api(
    dir: &Path,
    url: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<String> {
    let body_file = dir.join(format!("body-{}", std::process::id()));
    std::fs::write(&body_file, body)?;
    // The token goes in a header file: no process's argv holds it.
    let header_file = dir.join("admin-header");
    tidegate_local::daemons::write_private(
        &header_file,
        format!("Authorization: Bearer {ADMIN_TOKEN}\n").as_bytes(),
    )?;
    sh::output(
        Command::new("curl")
            .args(["-sS", "-X", method, "-H"])
            .arg(format!("@{}", header_file.display()))
            .arg("--data-binary")
            .arg(format!("@{}", body_file.display()))
            .args(["-w", " %{http_code}"])
            .arg(format!("{url}{path}")),
    )
    .with_context(|| format!("curl {method} {path} failed"))
}
