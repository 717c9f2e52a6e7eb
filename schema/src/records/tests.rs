use serde_json::json;

use super::*;

fn instance_json() -> serde_json::Value {
    json!({
        "v": 1,
        "id": "a3f4b92c8d",
        "challenge": "web",
        "team": "team-1",
        "worker": "worker-a",
        "token": 42,
        "created_at": 1000,
        "expires_at": 2800,
        "http": [{"port_name": "web", "hostname": "a3f4b92c8d.ctf.localhost", "target_port": 8080}],
        "container": {"image": "tidegate/demo-http:2", "limits": {"memory_mib": 256, "cpus": 0.5, "pids": 128}},
        "flag": "flag{00}"
    })
}

#[test]
fn instance_round_trips() {
    let rec = InstanceRecord::decode(instance_json().to_string().as_bytes()).unwrap();
    assert_eq!(rec.token, 42);
    assert_eq!(InstanceRecord::decode(&rec.encode()).unwrap(), rec);
}

#[test]
fn hostile_values_are_named() {
    let cases = [
        ("v", json!(2)),
        ("id", json!("../../etc")),
        ("team", json!("a/b")),
        ("token", json!(0)),
        ("expires_at", json!(1)),
        (
            "http[0].hostname",
            json!([{"port_name": "web", "hostname": "Not A Host", "target_port": 1}]),
        ),
        ("extra", json!(true)),
    ];
    for (field, value) in cases {
        let mut v = instance_json();
        let target = if field.starts_with("http") {
            "http"
        } else {
            field
        };
        v[target] = value;
        let e = InstanceRecord::decode(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
    let e = InstanceRecord::decode(b"{not json").unwrap_err();
    assert!(e.message.contains("key must be a string"), "{e}");
    let e = InstanceRecord::decode(&[0xff, 0xfe]).unwrap_err();
    assert_eq!(e.field, ".");
}

#[test]
fn version_error_says_so() {
    let mut v = instance_json();
    v["v"] = json!(7);
    let e = InstanceRecord::decode(v.to_string().as_bytes()).unwrap_err();
    assert!(
        e.message.contains("record version 7 is not supported"),
        "{e}"
    );
}

#[test]
fn status_record_shapes() {
    let running = json!({"v": 1, "instance": "a3f4b92c8d", "worker": "w1",
        "address": "198.19.0.5", "status": {"state": "running"}, "updated_at": 5});
    let rec = StatusRecord::decode(running.to_string().as_bytes()).unwrap();
    assert_eq!(rec.status, InstanceStatus::Running);
    let failed = json!({"v": 1, "instance": "a3f4b92c8d", "worker": "w1",
        "status": {"state": "failed", "reason": "image missing"}, "updated_at": 5});
    let rec = StatusRecord::decode(failed.to_string().as_bytes()).unwrap();
    assert_eq!(
        rec.status,
        InstanceStatus::Failed {
            reason: "image missing".into()
        }
    );
    let no_addr = json!({"v": 1, "instance": "a3f4b92c8d", "worker": "w1",
        "status": {"state": "running"}, "updated_at": 5});
    assert_eq!(
        StatusRecord::decode(no_addr.to_string().as_bytes())
            .unwrap_err()
            .field,
        "address"
    );
}

#[test]
fn challenge_record_prefixes_spec_fields() {
    let v = json!({"v": 1, "name": "web", "spec": {"image": "x", "ports": [], }});
    let e = ChallengeRecord::decode(v.to_string().as_bytes()).unwrap_err();
    assert_eq!(e.field, "spec.ports");
    let v = json!({"v": 1, "name": "web",
        "spec": {"image": "x", "ports": [{"name": "a", "port": 1, "protocol": "tcp"}]},
        "policy": {"digest": "md5:abc"}});
    let e = ChallengeRecord::decode(v.to_string().as_bytes()).unwrap_err();
    assert_eq!(e.field, "policy.digest");
}

#[test]
fn worker_record() {
    let v = json!({"v": 1, "id": "worker-a", "address": "127.0.0.2", "http_entry": "127.0.0.2:8080",
        "tcp_host": "127.0.0.2", "capacity": 0, "version": "0.1.0", "started_at": 1});
    assert_eq!(
        WorkerRecord::decode(v.to_string().as_bytes())
            .unwrap_err()
            .field,
        "capacity"
    );
}
