use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::validate::decode_json;

fn base() -> Value {
    json!({
        "image": "tidegate/demo-http:2",
        "ports": [{"name": "web", "port": 8080, "protocol": "http"}],
    })
}

fn decode(v: &Value) -> Result<ChallengeSpec, FieldError> {
    decode_json(v.to_string().as_bytes())
}

/// Applies `edit` to the base spec and returns the field the error names.
fn error_field(edit: impl FnOnce(&mut Value)) -> String {
    let mut v = base();
    edit(&mut v);
    match decode(&v) {
        Ok(spec) => panic!("accepted {v}: {spec:?}"),
        Err(e) => e.field,
    }
}

#[test]
fn minimal_spec_gets_defaults() {
    let spec = decode(&base()).unwrap();
    assert_eq!(spec.per_team_max, 1);
    assert_eq!(spec.ttl, TtlSpec::default());
    assert_eq!(spec.limits, Limits::default());
    assert!(!spec.egress);
    assert_eq!(spec.render_flag("abc"), "flag{abc}");
}

#[test]
fn full_spec_round_trips() {
    let v = json!({
        "image": "registry.local/web:2",
        "ports": [
            {"name": "web", "port": 80, "protocol": "http"},
            {"name": "admin", "port": 8081, "protocol": "http"},
            {"name": "shell", "port": 1337, "protocol": "tcp"}
        ],
        "env": {"MODE": "hard"},
        "limits": {"memory_mib": 512, "cpus": 1.5, "pids": 256},
        "ttl": {"default_secs": 600, "max_secs": 3600, "max_renewals": 2},
        "per_team_max": 2,
        "flag": {"template": "CTF{static_{hmac}}"},
        "egress": true,
        "read_only_rootfs": true,
        "cap_add": ["NET_BIND_SERVICE"]
    });
    let spec = decode(&v).unwrap();
    assert_eq!(spec.render_flag("00ff"), "CTF{static_00ff}");
    let again: ChallengeSpec = decode_json(&serde_json::to_vec(&spec).unwrap()).unwrap();
    assert_eq!(again, spec);
}

/// A field name and an edit of the base spec that breaks it.
type Case = (&'static str, Box<dyn FnOnce(&mut Value)>);

#[test]
fn each_bad_input_names_its_field() {
    let cases: Vec<Case> = vec![
        ("colour", Box::new(|v| v["colour"] = json!("red"))),
        (
            "ports[0].protocol",
            Box::new(|v| v["ports"][0]["protocol"] = json!("udp")),
        ),
        (
            "ports[0].name",
            Box::new(|v| v["ports"][0]["name"] = json!("Web")),
        ),
        (
            "ports[0].port",
            Box::new(|v| v["ports"][0]["port"] = json!(0)),
        ),
        (
            "ports[0].port",
            Box::new(|v| v["ports"][0]["port"] = json!(70000)),
        ),
        (
            "ports[0].extra",
            Box::new(|v| v["ports"][0]["extra"] = json!(1)),
        ),
        ("ports", Box::new(|v| v["ports"] = json!([]))),
        (
            "ports[1].name",
            Box::new(
                |v| v["ports"] = json!([{"name": "a", "port": 1, "protocol": "tcp"}, {"name": "a", "port": 2, "protocol": "tcp"}]),
            ),
        ),
        (
            "ports[1].port",
            Box::new(
                |v| v["ports"] = json!([{"name": "a", "port": 1, "protocol": "tcp"}, {"name": "b", "port": 1, "protocol": "http"}]),
            ),
        ),
        (
            "solver.image",
            Box::new(|v| v["solver"] = json!({"image": "a b"})),
        ),
        (
            "solver.port",
            Box::new(|v| v["solver"] = json!({"image": "s:1", "port": "nope"})),
        ),
        (
            "solver.interval_secs",
            Box::new(|v| v["solver"] = json!({"image": "s:1", "interval_secs": 5})),
        ),
        (
            "solver.timeout_secs",
            Box::new(|v| v["solver"] = json!({"image": "s:1", "timeout_secs": 301})),
        ),
        (
            "solver.timeout_secs",
            Box::new(|v| {
                v["solver"] = json!({"image": "s:1", "interval_secs": 20, "timeout_secs": 30})
            }),
        ),
        (
            "solver.replace_unhealthy",
            Box::new(|v| v["solver"] = json!({"image": "s:1", "replace_unhealthy": "yes"})),
        ),
        (
            "solver.command",
            Box::new(|v| v["solver"] = json!({"image": "s:1", "command": ["sh"]})),
        ),
        ("image", Box::new(|v| v["image"] = json!(""))),
        ("image", Box::new(|v| v["image"] = json!("a b"))),
        (
            "image",
            Box::new(|v| {
                v.as_object_mut()
                    .unwrap()
                    .remove("image")
                    .map(drop)
                    .unwrap_or(())
            }),
        ),
        ("env.FLAG", Box::new(|v| v["env"] = json!({"FLAG": "x"}))),
        ("env.1X", Box::new(|v| v["env"] = json!({"1X": "x"}))),
        (
            "secret_env.FLAG",
            Box::new(|v| v["secret_env"] = json!({"FLAG": "x"})),
        ),
        (
            "secret_env.KEY",
            Box::new(|v| {
                v["env"] = json!({"KEY": "a"});
                v["secret_env"] = json!({"KEY": "b"});
            }),
        ),
        (
            "secret_env.K",
            Box::new(|v| v["secret_env"] = json!({"K": "a\0b"})),
        ),
        (
            "env",
            Box::new(|v| {
                let many: serde_json::Map<_, _> =
                    (0..40).map(|i| (format!("E{i}"), json!("x"))).collect();
                let secret: serde_json::Map<_, _> =
                    (0..40).map(|i| (format!("S{i}"), json!("x"))).collect();
                v["env"] = serde_json::Value::Object(many);
                v["secret_env"] = serde_json::Value::Object(secret);
            }),
        ),
        (
            "limits.memory_mib",
            Box::new(|v| v["limits"] = json!({"memory_mib": 1})),
        ),
        (
            "limits.cpus",
            Box::new(|v| v["limits"] = json!({"cpus": 0})),
        ),
        (
            "limits.pids",
            Box::new(|v| v["limits"] = json!({"pids": 1_000_000})),
        ),
        (
            "limits.swap",
            Box::new(|v| v["limits"] = json!({"swap": 1})),
        ),
        (
            "ttl.default_secs",
            Box::new(|v| v["ttl"] = json!({"default_secs": 5})),
        ),
        (
            "ttl.default_secs",
            Box::new(|v| v["ttl"] = json!({"default_secs": 4000, "max_secs": 3000})),
        ),
        (
            "ttl.max_secs",
            Box::new(|v| v["ttl"] = json!({"max_secs": 99_999_999})),
        ),
        (
            "ttl.default_secs",
            Box::new(|v| v["ttl"] = json!({"default_secs": -1})),
        ),
        ("per_team_max", Box::new(|v| v["per_team_max"] = json!(0))),
        (
            "flag.template",
            Box::new(|v| v["flag"] = json!({"template": "{hmac}{hmac}"})),
        ),
        (
            "flag.template",
            Box::new(|v| v["flag"] = json!({"template": ""})),
        ),
        (
            "cap_add[0]",
            Box::new(|v| v["cap_add"] = json!(["SYS_ADMIN"])),
        ),
        (
            "cap_add[1]",
            Box::new(|v| v["cap_add"] = json!(["CHOWN", "NET_RAW"])),
        ),
        (
            "unsafe_caps[0]",
            Box::new(|v| v["unsafe_caps"] = json!(["SYS_ADMIN"])),
        ),
        (
            "tmpfs[0].path",
            Box::new(|v| v["tmpfs"] = json!([{"path": "tmp", "size_mib": 1}])),
        ),
        (
            "tmpfs[0].path",
            Box::new(|v| v["tmpfs"] = json!([{"path": "/a/../etc", "size_mib": 1}])),
        ),
        (
            "tmpfs[0].path",
            Box::new(|v| v["tmpfs"] = json!([{"path": "/", "size_mib": 1}])),
        ),
        (
            "tmpfs[0].path",
            Box::new(|v| v["tmpfs"] = json!([{"path": "/x,exec", "size_mib": 1}])),
        ),
        (
            "tmpfs[1].path",
            Box::new(|v| {
                v["tmpfs"] = json!([{"path": "/a", "size_mib": 1}, {"path": "/a", "size_mib": 1}])
            }),
        ),
        (
            "tmpfs[0].size_mib",
            Box::new(|v| v["tmpfs"] = json!([{"path": "/a", "size_mib": 0}])),
        ),
        (
            "tmpfs",
            Box::new(|v| v["tmpfs"] = json!([{"path": "/a", "size_mib": 4000}])),
        ),
        (
            "limits.log_mib",
            Box::new(|v| v["limits"] = json!({"log_mib": 0})),
        ),
        (
            "limits.disk_mib",
            Box::new(|v| v["limits"] = json!({"disk_mib": 1})),
        ),
        (
            "limits.nofile",
            Box::new(|v| v["limits"] = json!({"nofile": 1})),
        ),
        (
            "limits.nproc",
            Box::new(|v| v["limits"] = json!({"nproc": 1})),
        ),
        (
            "limits.io_weight",
            Box::new(|v| v["limits"] = json!({"io_weight": 5})),
        ),
    ];
    for (want, edit) in cases {
        let got = error_field(edit);
        // serde reports a missing field at the struct that lacks it.
        let want = if want == "image" && got == "." {
            "."
        } else {
            want
        };
        assert_eq!(got, want);
    }
}

#[test]
fn messages_say_what_is_wrong() {
    let mut v = base();
    v["ports"][0]["protocol"] = json!("udp");
    let e = decode(&v).unwrap_err();
    assert!(
        e.message.contains("udp") && e.message.contains("http"),
        "{e}"
    );
    let mut v = base();
    v["ports"] = json!([{"name": "a", "port": 1, "protocol": "tcp"}, {"name": "b", "port": 1, "protocol": "tcp"}]);
    assert_eq!(
        decode(&v).unwrap_err().to_string(),
        "ports[1].port: port 1 of app listed twice"
    );
    let mut v = base();
    v["cap_add"] = json!(["NET_RAW"]);
    let e = decode(&v).unwrap_err();
    assert!(e.message.contains("unsafe_caps"), "{e}");
    v["cap_add"] = json!([]);
    v["unsafe_caps"] = json!(["NET_RAW"]);
    assert_eq!(decode(&v).unwrap().unsafe_caps, ["NET_RAW"]);
    // Safe defaults: read-only root with a /tmp of 64 MiB.
    let spec = decode(&base()).unwrap();
    assert!(spec.read_only_rootfs);
    assert_eq!(
        spec.tmpfs,
        [TmpfsSpec {
            path: "/tmp".into(),
            size_mib: 64
        }]
    );
    let e = decode_json::<ChallengeSpec>(b"").unwrap_err();
    assert_eq!(e.to_string(), ".: empty or truncated JSON");
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_json::<ChallengeSpec>(&bytes);
    }

    #[test]
    fn valid_ttls_accepted_and_invalid_named(default in 0u64..1_000_000, max in 0u64..1_000_000) {
        let mut v = base();
        v["ttl"] = json!({"default_secs": default, "max_secs": max});
        let ok = (MIN_TTL_SECS..=MAX_TTL_SECS).contains(&default)
            && (MIN_TTL_SECS..=MAX_TTL_SECS).contains(&max)
            && default <= max;
        match decode(&v) {
            Ok(spec) => { prop_assert!(ok); prop_assert_eq!(spec.ttl.default_secs, default); }
            Err(e) => { prop_assert!(!ok); prop_assert!(e.field.starts_with("ttl."), "{}", e); }
        }
    }

    #[test]
    fn port_lists_unique_or_rejected(ports in prop::collection::vec((0u8..4, 1u16..5), 1..6)) {
        let list: Vec<Value> = ports.iter()
            .map(|(n, p)| json!({"name": format!("p{n}"), "port": p, "protocol": "tcp"}))
            .collect();
        let mut v = base();
        v["ports"] = Value::Array(list);
        let names: std::collections::BTreeSet<_> = ports.iter().map(|(n, _)| n).collect();
        let numbers: std::collections::BTreeSet<_> = ports.iter().map(|(_, p)| p).collect();
        let unique = names.len() == ports.len() && numbers.len() == ports.len();
        prop_assert_eq!(decode(&v).is_ok(), unique);
    }
}

#[test]
fn the_readme_challenge_table_names_every_field() {
    let readme = include_str!("../../../README.md");
    let documented: std::collections::BTreeSet<String> = readme
        .lines()
        .filter_map(|l| {
            l.strip_prefix("| `")?
                .split_once('`')
                .map(|(f, _)| f.to_string())
        })
        .collect();
    let spec = serde_json::to_value(decode(&base()).unwrap()).unwrap();
    let mut fields = std::collections::BTreeSet::new();
    for (k, v) in spec.as_object().unwrap() {
        match (k.as_str(), v) {
            ("limits", Value::Object(inner)) => {
                fields.extend(inner.keys().map(|f| format!("limits.{f}")));
            }
            ("flag", _) => {
                fields.insert("flag.template".to_string());
            }
            _ => {
                fields.insert(k.clone());
            }
        }
    }
    let missing: Vec<_> = fields.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "README's challenge table lacks {missing:?}"
    );
}

#[test]
fn secret_env_values_come_apart_from_the_spec_that_is_stored() {
    let mut v = base();
    v["env"] = json!({"MODE": "ctf"});
    v["secret_env"] = json!({"API_KEY": "s3cr3t"});
    let (stored, values) = decode(&v).unwrap().without_secret_values();
    assert_eq!(
        values,
        BTreeMap::from([("API_KEY".into(), "s3cr3t".into())])
    );
    assert_eq!(stored.secret_env["API_KEY"], "");
    assert_eq!(stored.env["MODE"], "ctf");
    let text = serde_json::to_string(&stored).unwrap();
    assert!(!text.contains("s3cr3t"), "{text}");
    // What is stored is a valid spec again (names kept, values empty).
    assert_eq!(
        decode_json::<ChallengeSpec>(text.as_bytes()).unwrap(),
        stored
    );
}

/// An XSS-shaped challenge: an app, its db, an admin bot with the flag.
fn web_bot() -> Value {
    json!({
        "services": {
            "app": {"image": "tidegate/demo-web:1", "depends_on": ["db"],
                    "ready": {"http": {"port": 8080, "path": "/"}}},
            "db": {"image": "tidegate/demo-db:1", "limits": {"memory_mib": 128},
                   "ready": {"tcp": 6379}},
            "bot": {"image": "tidegate/demo-bot:1", "depends_on": ["app"],
                    "command": ["/bot", "--every", "10"]},
        },
        "ports": [{"name": "web", "port": 8080, "protocol": "http", "service": "app"}],
        "flag": {"services": ["bot"]},
    })
}

#[test]
fn a_challenge_with_services_round_trips() {
    let spec = decode(&web_bot()).unwrap();
    assert_eq!(spec.service_names(), ["app", "bot", "db"]);
    assert!(spec.image.is_empty());
    let db = &spec.services[&"db".parse().unwrap()];
    assert_eq!(db.limits.memory_mib, 128);
    assert_eq!(db.ready, Some(ReadySpec::Tcp(6379)));
    assert!(db.read_only_rootfs, "the safe default holds per service");
    let again: ChallengeSpec = decode_json(&serde_json::to_vec(&spec).unwrap()).unwrap();
    assert_eq!(again, spec);
    // The short form is one service, `app`; a port may name it.
    let mut v = base();
    v["ports"][0]["service"] = json!("app");
    assert_eq!(decode(&v).unwrap().service_names(), [SHORT_FORM_SERVICE]);
    // One port number may be served by two services.
    let mut v = web_bot();
    v["ports"] = json!([
        {"name": "web", "port": 8080, "protocol": "http", "service": "app"},
        {"name": "debug", "port": 8080, "protocol": "http", "service": "bot"},
    ]);
    assert!(decode(&v).is_ok());
}

#[test]
fn each_bad_service_input_names_its_field() {
    let nine: serde_json::Map<String, Value> = (0..9)
        .map(|i| (format!("s{i}"), json!({"image": "x:1"})))
        .collect();
    let cases: Vec<Case> = vec![
        (
            "ports[0].service",
            Box::new(|v| v["ports"][0]["service"] = json!("nope")),
        ),
        (
            "ports[0].service",
            Box::new(|v| {
                v["ports"][0].as_object_mut().unwrap().remove("service");
            }),
        ),
        (
            "services",
            Box::new(move |v| v["services"] = Value::Object(nine)),
        ),
        (
            "services.Bad_Name",
            Box::new(|v| v["services"]["Bad_Name"] = json!({"image": "x:1"})),
        ),
        (
            "services.app.depends_on",
            Box::new(|v| v["services"]["db"]["depends_on"] = json!(["bot"])),
        ),
        (
            "services.app.depends_on[0]",
            Box::new(|v| v["services"]["app"]["depends_on"] = json!(["app"])),
        ),
        (
            "services.app.depends_on[0]",
            Box::new(|v| v["services"]["app"]["depends_on"] = json!(["cache"])),
        ),
        (
            "services.bot.image",
            Box::new(|v| v["services"]["bot"]["image"] = json!("")),
        ),
        (
            "services.db.limits.memory_mib",
            Box::new(|v| v["services"]["db"]["limits"]["memory_mib"] = json!(1)),
        ),
        (
            "services.db.env.FLAG",
            Box::new(|v| v["services"]["db"]["env"] = json!({"FLAG": "x"})),
        ),
        (
            "services.bot.cap_add[0]",
            Box::new(|v| v["services"]["bot"]["cap_add"] = json!(["SYS_ADMIN"])),
        ),
        (
            "services.bot.command",
            Box::new(|v| v["services"]["bot"]["command"] = json!([])),
        ),
        (
            "services.app.ready.http.path",
            Box::new(|v| {
                v["services"]["app"]["ready"] = json!({"http": {"port": 80, "path": "x"}})
            }),
        ),
        (
            "services.db.ready.tcp",
            Box::new(|v| v["services"]["db"]["ready"] = json!({"tcp": 0})),
        ),
        (
            "services.db.tmpfs",
            Box::new(|v| v["services"]["db"]["tmpfs"] = json!([{"path": "/tmp", "size_mib": 129}])),
        ),
        (
            "services.db.colour",
            Box::new(|v| v["services"]["db"]["colour"] = json!("red")),
        ),
        ("image", Box::new(|v| v["image"] = json!("x:1"))),
        ("env", Box::new(|v| v["env"] = json!({"MODE": "x"}))),
        (
            "limits",
            Box::new(|v| v["limits"] = json!({"memory_mib": 512})),
        ),
        (
            "read_only_rootfs",
            Box::new(|v| v["read_only_rootfs"] = json!(false)),
        ),
        (
            "flag.services[0]",
            Box::new(|v| v["flag"]["services"] = json!(["cache"])),
        ),
        (
            "flag.services[1]",
            Box::new(|v| v["flag"]["services"] = json!(["bot", "bot"])),
        ),
        (
            "flag.services",
            Box::new(|v| v["flag"]["services"] = json!([])),
        ),
        (
            "secret_env.TOKEN",
            Box::new(|v| {
                v["secret_env"] = json!({"TOKEN": "s"});
                v["services"]["bot"]["env"] = json!({"TOKEN": "t"});
            }),
        ),
    ];
    for (want, edit) in cases {
        let mut v = web_bot();
        edit(&mut v);
        match decode(&v) {
            Ok(spec) => panic!("accepted {v}: {spec:?}"),
            Err(e) => assert_eq!(e.field, want, "{v}: {e}"),
        }
    }
}

#[test]
fn a_service_named_twice_and_a_cycle_are_named_in_the_message() {
    let text = r#"{"services": {"app": {"image": "a:1"}, "app": {"image": "b:1"}},
                   "ports": [{"name": "web", "port": 80, "protocol": "http"}]}"#;
    let e = decode_json::<ChallengeSpec>(text.as_bytes()).unwrap_err();
    assert!(e.message.contains("\"app\" listed twice"), "{e}");
    let mut v = web_bot();
    v["services"]["db"]["depends_on"] = json!(["bot"]);
    let e = decode(&v).unwrap_err();
    assert_eq!(e.message, "a cycle: app → db → bot → app", "{e}");
    let mut v = web_bot();
    v["ports"][0].as_object_mut().unwrap().remove("service");
    let e = decode(&v).unwrap_err();
    assert!(e.message.contains("one of app, bot, db"), "{e}");
}

#[test]
fn queue_is_on_by_default_and_takes_a_bool_or_a_table() {
    let spec = decode(&base()).unwrap();
    assert_eq!(spec.queue, crate::QueueSpec::default());
    assert!(spec.queue.enabled);
    // The default is not written back (older readers keep decoding it).
    assert!(serde_json::to_value(&spec).unwrap().get("queue").is_none());
    let mut v = base();
    v["queue"] = json!(false);
    assert!(!decode(&v).unwrap().queue.enabled);
    v["queue"] = json!({"hold_secs": 30});
    let q = decode(&v).unwrap().queue;
    assert_eq!((q.enabled, q.hold_secs, q.max_waiting), (true, 30, 1000));
    let back: ChallengeSpec =
        serde_json::from_value(serde_json::to_value(decode(&v).unwrap()).unwrap()).unwrap();
    assert_eq!(back.queue.hold_secs, 30);
}

#[test]
fn bad_queue_settings_name_their_field() {
    for (queue, field) in [
        (json!({"hold_secs": 4}), "queue.hold_secs"),
        (json!({"hold_secs": 3601}), "queue.hold_secs"),
        (json!({"max_waiting": 0}), "queue.max_waiting"),
        (json!({"max_waiting": 100_001}), "queue.max_waiting"),
    ] {
        assert_eq!(
            error_field(|v| v["queue"] = queue.clone()),
            field,
            "{queue}"
        );
    }
    for queue in [json!("yes"), json!(1), json!({"wait": 3})] {
        let mut v = base();
        v["queue"] = queue.clone();
        let e = decode(&v).unwrap_err();
        assert!(
            format!("{} {}", e.field, e.message).contains("queue"),
            "{queue}: {e}"
        );
    }
}
