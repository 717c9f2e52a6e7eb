//! Bad configuration exits 64 and names the field; nothing starts.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Command;

#[test]
fn bad_configuration_exits_64_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("worker_id = \"Not_A_Label\"", "worker_id"),
        ("capacity = 0", "capacity"),
        ("etcd = []", "etcd"),
        ("docker_socket = \"/var/run/docker.sock\"", "docker_socket"),
        ("egress_network = \"tidegate-isolated\"", "egress_network"),
        ("membership_ttl_secs = 1", "membership_ttl_secs"),
        ("capcity = 3", "capcity"),
        ("http_entry = \"not an address\"", "http_entry"),
        (
            "tcp_ports = \"30000-39999\"",
            "tcp_ports: \"30000-39999\" overlaps the ephemeral",
        ),
        (
            "tcp_ports = \"2000-3000\"",
            "holds port 2379, etcd's client port",
        ),
        ("tcp_ports = \"7000-7999\"", "holds port 7080"),
        ("tcp_ports = \"9000-9999\"", "holds port 9464"),
    ];
    for (line, field) in cases {
        let path = dir.path().join("agent.toml");
        let text = if line.starts_with("worker_id") {
            line.to_string()
        } else {
            format!("worker_id = \"w1\"\n{line}")
        };
        std::fs::write(&path, text + "\n").unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tidegate-agent"))
            .arg("--config")
            .arg(&path)
            .env_remove("TIDEGATE_WORKER_ID")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{line}: {err}");
        assert!(err.contains(field), "{line}: {err:?} does not name {field}");
    }
}
