//! The services deploy runs on a host: their systemd units, and the same
//! command lines for `init = "direct"` (under setpriv with the unit's
//! capability bounding set), with the shell lines that start, stop and
//! check them.

use std::fmt::Write as _;
use std::path::Path;

use super::{Init, at, q};

/// One service: its unit, and the same command line for `init = "direct"`.
pub(super) struct Service {
    /// `tidegate-etcd`, `tidegate-controller`, `tidegate-agent`.
    pub(super) name: &'static str,
    pub(super) description: &'static str,
    pub(super) exec: Vec<String>,
    pub(super) user: &'static str,
    pub(super) groups: &'static [&'static str],
    /// Capabilities kept (bounding and ambient set); empty: none.
    pub(super) caps: &'static [&'static str],
    /// Paths the service writes (everything else is read-only to it).
    pub(super) writes: Vec<String>,
    pub(super) env: Vec<(&'static str, &'static str)>,
    pub(super) after: &'static str,
    pub(super) notify: bool,
}

/// The agent's capabilities: attach eBPF sk_lookup (BPF, NET_ADMIN) and
/// bind a privileged HTTP port. Docker is reached through the socket
/// (group docker, which is root-equivalent: see deploy/README.md).
pub(super) const AGENT_CAPS: &[&str] = &["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"];

impl Service {
    pub(super) fn unit(&self) -> String {
        let mut u = String::new();
        let _ = writeln!(
            u,
            "# Written by `cargo xtask deploy`; changes here are replaced on the next run.\n[Unit]\nDescription={}\nDocumentation=https://example.invalid/tidegate/deploy/README.md\nWants=network-online.target\nAfter=network-online.target {}\n\n[Service]",
            self.description, self.after
        );
        let _ = writeln!(u, "Type={}", if self.notify { "notify" } else { "exec" });
        let _ = writeln!(u, "User={}", self.user);
        if !self.groups.is_empty() {
            let _ = writeln!(u, "SupplementaryGroups={}", self.groups.join(" "));
        }
        for (k, v) in &self.env {
            let _ = writeln!(u, "Environment={k}={v}");
        }
        let _ = writeln!(u, "ExecStart={}", self.exec.join(" "));
        let _ = writeln!(
            u,
            "Restart=always\nRestartSec=2\nLimitNOFILE=1048576\nTimeoutStopSec=30"
        );
        let _ = writeln!(u, "CapabilityBoundingSet={}", self.caps.join(" "));
        if !self.caps.is_empty() {
            let _ = writeln!(u, "AmbientCapabilities={}", self.caps.join(" "));
        }
        let _ = writeln!(
            u,
            "NoNewPrivileges=yes\nProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes\nProtectKernelModules=yes\nProtectControlGroups=yes\nRestrictSUIDSGID=yes\nLockPersonality=yes"
        );
        if !self.writes.is_empty() {
            let _ = writeln!(u, "ReadWritePaths={}", self.writes.join(" "));
        }
        let _ = writeln!(u, "\n[Install]\nWantedBy=multi-user.target");
        u
    }

    /// The `init = "direct"` command: the unit's command line under setpriv
    /// with the unit's capability bounding set.
    pub(super) fn direct_command(&self) -> String {
        let caps = if self.caps.is_empty() {
            "-all".to_string()
        } else {
            let keep: Vec<String> = self
                .caps
                .iter()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
                .collect();
            format!("-all,{}", keep.join(","))
        };
        let env: String = self
            .env
            .iter()
            .map(|(k, v)| format!("{k}={} ", q(v)))
            .collect();
        let exec: Vec<String> = self.exec.iter().map(|a| q(a)).collect();
        format!(
            "env {env}setpriv --bounding-set={caps} -- {}",
            exec.join(" ")
        )
    }
}

/// Shell lines that say `running` or `stopped` for a service.
pub(super) fn status_script(init: Init, root: &Path, svc: &str) -> String {
    match init {
        Init::Systemd => format!(
            "if systemctl is-active --quiet {svc}; then echo running; else echo stopped; fi"
        ),
        Init::Direct => {
            let pid = q(&at(root, &format!("/run/tidegate/{svc}.pid")));
            format!(
                "p=$(cat {pid} 2>/dev/null); if [ -n \"$p\" ] && kill -0 \"$p\" 2>/dev/null; then echo running; else echo stopped; fi"
            )
        }
    }
}

pub(super) fn stop_script(init: Init, root: &Path, svc: &str) -> String {
    match init {
        Init::Systemd => format!("systemctl stop {svc} || true"),
        Init::Direct => {
            let pid = q(&at(root, &format!("/run/tidegate/{svc}.pid")));
            format!(
                "p=$(cat {pid} 2>/dev/null); if [ -n \"$p\" ] && kill -0 \"$p\" 2>/dev/null; then kill \"$p\"; \
for i in $(seq 1 100); do kill -0 \"$p\" 2>/dev/null || break; sleep 0.1; done; kill -9 \"$p\" 2>/dev/null || true; fi; rm -f {pid}"
            )
        }
    }
}

pub(super) fn start_script(init: Init, root: &Path, s: &Service) -> String {
    match init {
        Init::Systemd => format!(
            "systemctl daemon-reload && systemctl enable --quiet {0} && systemctl restart {0}",
            s.name
        ),
        Init::Direct => {
            let pid = at(root, &format!("/run/tidegate/{}.pid", s.name));
            let log = at(root, &format!("/var/log/tidegate/{}.log", s.name));
            let inner = format!("echo $$ > {}; exec {}", q(&pid), s.direct_command());
            format!(
                "{stop}; mkdir -p {run} {logs} && nohup setsid sh -c {inner} >> {log} 2>&1 < /dev/null &",
                stop = stop_script(init, root, s.name),
                run = q(&at(root, "/run/tidegate")),
                logs = q(&at(root, "/var/log/tidegate")),
                inner = q(&inner),
                log = q(&log),
            )
        }
    }
}
