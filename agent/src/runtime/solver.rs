//! Solver checks: a challenge's solver image run once against one of its
//! instances, as a hardened one-shot container on the instance's network.
//!
//! The solver gets `TARGET` (`host:port`), `TARGET_HOST` and `TARGET_PORT`
//! of the instance's port and nothing else: no flag, no secret env, no
//! capabilities, a read-only root with a 16 MiB `/tmp`, 128 MiB, half a
//! CPU, 64 pids, a 1 MiB log. A one-image instance is reached in its own
//! network namespace (`127.0.0.1`: its shared networks keep containers
//! apart); an instance with services on its own network, at the service's
//! address. Its container (`tidegate-{id}_solver`, label `tidegate.solver`)
//! is never taken for one of the instance's: the reconciler lists only
//! containers labelled `tidegate.instance`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, WaitContainerOptions,
};
use futures::StreamExt;
use tidegate_schema::config::planted;
use tidegate_schema::records::ContainerSpec;
use tidegate_schema::spec::TmpfsSpec;
use tidegate_schema::{InstanceId, Limits, SolverRecord};

use super::{
    DockerError, LABEL_CLUSTER, LABEL_WORKER, Runtime, RuntimeError, classify, container_name,
};

/// Labels a solver's container with the instance it checks.
pub const LABEL_SOLVER: &str = "tidegate.solver";

/// At most this much of a run's output (the last bytes) is kept and
/// searched for the flag.
pub const MAX_OUTPUT: usize = 64 * 1024;

/// Where a solver reaches the instance.
#[derive(Debug, Clone)]
pub enum SolverTarget {
    /// In the network namespace of this container (a one-image instance).
    Namespace { container: String },
    /// At this address on the instance's own network (a service).
    Address(IpAddr),
}

/// How a run ended: its exit code (None: stopped at the timeout) and the
/// last [`MAX_OUTPUT`] bytes of its stdout and stderr.
#[derive(Debug, Clone)]
pub struct SolverRun {
    pub exit_code: Option<i64>,
    pub output: Vec<u8>,
}

/// The container a solver of `id` runs in.
pub fn solver_container(id: &InstanceId) -> String {
    format!("{}_solver", container_name(id, None))
}

impl Runtime {
    /// Runs `solver` once against instance `id` at `target`: creates the
    /// container (pulling the image if this worker pulls), waits at most
    /// its timeout, collects its output and removes it.
    pub async fn run_solver(
        &self,
        id: &InstanceId,
        solver: &SolverRecord,
        target: &SolverTarget,
    ) -> Result<SolverRun, RuntimeError> {
        let name = solver_container(id);
        // A run an agent restart cut short.
        self.remove(&name).await?;
        let (network, host) = match target {
            SolverTarget::Namespace { container } => {
                (format!("container:{container}"), "127.0.0.1".to_string())
            }
            SolverTarget::Address(addr) => (super::network::name(id), addr.to_string()),
        };
        let port = solver.target_port;
        let spec = ContainerSpec {
            image: solver.image.clone(),
            env: Default::default(),
            limits: Limits {
                memory_mib: 128,
                cpus: 0.5,
                pids: 64,
                log_mib: 1,
                ..Limits::default()
            },
            egress: false,
            read_only_rootfs: true,
            tmpfs: vec![TmpfsSpec {
                path: "/tmp".into(),
                size_mib: 16,
            }],
            cap_add: Vec::new(),
            unsafe_caps: Vec::new(),
        };
        let mut labels = HashMap::from([
            (LABEL_SOLVER.to_string(), id.to_string()),
            (LABEL_WORKER.to_string(), self.worker.clone()),
        ]);
        if let Some(cluster) = &self.cluster {
            labels.insert(LABEL_CLUSTER.to_string(), cluster.clone());
        }
        let body = || ContainerCreateBody {
            image: Some(solver.image.clone()),
            env: Some(vec![
                format!("TARGET={host}:{port}"),
                format!("TARGET_HOST={host}"),
                format!("TARGET_PORT={port}"),
            ]),
            labels: Some(labels.clone()),
            host_config: Some(self.host_config(&spec, &network, None)),
            ..Default::default()
        };
        let options = || {
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            })
        };
        let created = match self.docker.create_container(options(), body()).await {
            Ok(r) => r.id,
            Err(e) if no_such_image(&e) => {
                self.pull(&solver.image).await?;
                self.docker
                    .create_container(options(), body())
                    .await
                    .map_err(classify)?
                    .id
            }
            Err(e) => return Err(classify(e)),
        };
        let run = self.wait_for(&created, solver).await;
        if let Err(e) = self.remove(&created).await {
            tracing::warn!(instance = %id, error = %e, "could not remove a solver's container");
        }
        run
    }

    async fn wait_for(
        &self,
        container: &str,
        solver: &SolverRecord,
    ) -> Result<SolverRun, RuntimeError> {
        self.start(container).await.map_err(classify)?;
        // The red team's positive control of solver-limits: a run may take
        // an hour.
        let secs = if planted("solver-limits") {
            3600
        } else {
            u64::from(solver.timeout_secs)
        };
        let timeout = Duration::from_secs(secs);
        let mut wait = Box::pin(
            self.docker
                .wait_container(container, None::<WaitContainerOptions>),
        );
        let exit_code = match tokio::time::timeout(timeout, wait.next()).await {
            Ok(Some(Ok(r))) => Some(r.status_code),
            // bollard reports a non-zero exit as an error carrying it.
            Ok(Some(Err(DockerError::DockerContainerWaitError { code, .. }))) => Some(code),
            Ok(Some(Err(e))) => return Err(classify(e)),
            Ok(None) => None,
            Err(_) => None,
        };
        let mut output: Vec<u8> = Vec::new();
        let mut logs = Box::pin(self.docker.logs(
            container,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: "all".into(),
                ..Default::default()
            }),
        ));
        while let Some(chunk) = logs.next().await {
            let Ok(chunk) = chunk else { break };
            output.extend_from_slice(&chunk.into_bytes());
            if output.len() > 2 * MAX_OUTPUT {
                output.drain(..output.len() - MAX_OUTPUT);
            }
        }
        if output.len() > MAX_OUTPUT {
            output.drain(..output.len() - MAX_OUTPUT);
        }
        Ok(SolverRun { exit_code, output })
    }

    /// Removes every solver container of this worker (runs an agent that
    /// stopped left behind).
    pub async fn remove_solvers(&self) -> Result<usize, DockerError> {
        let list = self.solver_containers().await?;
        for (container, _) in &list {
            self.remove(container).await?;
        }
        Ok(list.len())
    }

    /// This worker's solver containers: (container id, instance it checks).
    pub async fn solver_containers(&self) -> Result<Vec<(String, String)>, DockerError> {
        let mut labels = vec![
            LABEL_SOLVER.to_string(),
            format!("{LABEL_WORKER}={}", self.worker),
        ];
        labels.extend(self.cluster.iter().map(|c| format!("{LABEL_CLUSTER}={c}")));
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([("label".to_string(), labels)])),
                ..Default::default()
            }))
            .await?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let instance = c.labels.as_ref()?.get(LABEL_SOLVER)?.clone();
                Some((c.id?, instance))
            })
            .collect())
    }
}

/// Whether Docker refused to create a container because its image is not
/// here (not because the instance's container it joins is gone).
fn no_such_image(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code: 404, message }
        if message.contains("No such image"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_image_is_pulled() {
        let err = |status_code, message: &str| DockerError::DockerResponseServerError {
            status_code,
            message: message.to_string(),
        };
        assert!(no_such_image(&err(404, "No such image: tidegate/solver:2")));
        assert!(!no_such_image(&err(404, "No such container: tidegate-i-1")));
        assert!(!no_such_image(&err(500, "No such image: x")));
    }
}
