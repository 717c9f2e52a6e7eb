use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use super::*;

/// Dotted keys of a TOML table (`etcd_tls.ca_file`).
fn keys(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in table {
        let key = format!("{prefix}{k}");
        match v {
            toml::Value::Table(t) => keys(t, &format!("{key}."), out),
            _ => {
                out.insert(key);
            }
        }
    }
}

/// Parses `text` as `T` (a config with `deny_unknown_fields`, so a misspelt
/// field fails here) and returns the fields `T` has that `text` does not
/// set: a field missing from the file takes its default and shows up when
/// the parsed config is written back.
fn fields_not_in<T: ConfigFile>(text: &str) -> Result<Vec<String>, String> {
    let parsed: T = toml::from_str(text).map_err(|e| e.to_string())?;
    let written = toml::Table::try_from(&parsed).map_err(|e| e.to_string())?;
    let given: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let (mut all, mut set) = (BTreeSet::new(), BTreeSet::new());
    keys(&written, "", &mut all);
    keys(&given, "", &mut set);
    Ok(all.difference(&set).cloned().collect())
}

#[test]
fn the_reference_agent_config_in_deploy_names_every_field() {
    let missing = fields_not_in::<AgentConfig>(include_str!("../../../deploy/agent.toml"));
    assert_eq!(
        missing,
        Ok(vec![]),
        "deploy/agent.toml does not document these"
    );
}

#[test]
fn the_reference_controller_config_in_deploy_names_every_field() {
    let text = include_str!("../../../deploy/controller.toml");
    let missing = fields_not_in::<ControllerConfig>(text);
    assert_eq!(
        missing,
        Ok(vec![]),
        "deploy/controller.toml does not document these"
    );
    // And it passes validation as written.
    let cfg: ControllerConfig = toml::from_str(text).unwrap();
    assert!(cfg.validate().is_ok(), "{:?}", cfg.validate());
}

#[test]
fn a_written_config_reads_back_the_same() {
    let agent = AgentConfig {
        worker_id: "w1".into(),
        tcp_data_path: DataPath::Copy,
        tls_tcp_entry: Some(SocketAddr::from(([127, 0, 0, 1], 8443))),
        etcd_auth: Some(EtcdAuth {
            username: "tidegate-agent".into(),
            password_file: "/etc/tidegate/etcd-password-agent".into(),
        }),
        ..AgentConfig::default()
    };
    let text = agent.to_toml().unwrap();
    let back: AgentConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, agent);
    // Only what differs from the defaults, and the worker id always.
    assert!(text.contains("worker_id = \"w1\""), "{text}");
    assert!(text.contains("tcp_data_path = \"copy\""), "{text}");
    assert!(!text.contains("capacity"), "{text}");
    let controller = ControllerConfig {
        advertise_url: Some("http://198.18.128.1:7080".into()),
        ..ControllerConfig::default()
    };
    let text = controller.to_toml().unwrap();
    let back: ControllerConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, controller);
    assert!(text.starts_with("id = "), "{text}");
}

#[test]
fn enums_parse_from_their_config_names() {
    assert_eq!("sockhash".parse::<DataPath>(), Ok(DataPath::Sockhash));
    assert_eq!(DataPath::Splice.to_string(), "splice");
    assert_eq!("ebpf".parse::<Steering>(), Ok(Steering::Ebpf));
    let e = "bpf".parse::<Steering>().unwrap_err().to_string();
    assert_eq!(
        e,
        "\"bpf\" is not a TCP steering: one of auto, ebpf, listeners"
    );
}

#[test]
fn the_activity_address_is_one_the_leader_can_reach() {
    let mut cfg = AgentConfig {
        advertise_address: IpAddr::from([198, 18, 0, 7]),
        metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9464)),
        ..AgentConfig::default()
    };
    assert_eq!(
        cfg.activity_address(),
        Some(SocketAddr::from(([198, 18, 0, 7], 9464)))
    );
    cfg.metrics_listen = SocketAddr::from(([198, 18, 0, 7], 9500));
    assert_eq!(cfg.activity_address(), Some(cfg.metrics_listen));
    // Loopback while others reach us elsewhere: unreachable, so none.
    cfg.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 9464));
    assert_eq!(cfg.activity_address(), None);
    // A one-machine cluster on loopback.
    cfg.advertise_address = IpAddr::from([127, 0, 0, 1]);
    assert_eq!(cfg.activity_address(), Some(cfg.metrics_listen));
}

fn tls() -> EtcdTls {
    EtcdTls {
        ca_file: "/nonexistent/ca.pem".into(),
        cert_file: None,
        key_file: None,
        server_name: None,
    }
}

#[test]
fn endpoint_schemes_must_match_the_tls_setting() {
    let https = vec!["https://198.18.0.2:2379".to_string()];
    let http = vec!["http://198.18.0.2:2379".to_string()];
    assert!(check_etcd(&http, None).is_ok());
    assert!(check_etcd(&https, Some(&tls())).is_ok());
    let e = check_etcd(&https, None).unwrap_err().to_string();
    assert!(e.contains("add [etcd_tls]"), "{e}");
    let e = check_etcd(&http, Some(&tls())).unwrap_err().to_string();
    assert!(e.contains("use https://"), "{e}");
    let e = check_etcd(&["198.18.0.2:2379".into()], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an http:// or https:// URL"), "{e}");
    assert!(check_etcd(&[], None).is_err());
    let half = EtcdTls {
        cert_file: Some("/c.pem".into()),
        ..tls()
    };
    let e = check_etcd(&https, Some(&half)).unwrap_err().to_string();
    assert!(e.contains("cert_file and key_file go together"), "{e}");
}

#[test]
fn tcp_ports_stay_clear_of_daemons_listeners_and_the_ephemeral_range() {
    let eph = DEFAULT_EPHEMERAL;
    let own = [(8443, "this agent's https_entry".to_string())];
    assert_eq!(
        tcp_port_range("20000-29999", &own, eph.clone()),
        Ok(20000..=29999)
    );
    for (value, says) in [
        ("2000-3000", "holds port 2379, etcd's client port"),
        ("2380-2380", "holds port 2380, etcd's peer port"),
        ("7000-7999", "holds port 7080, the controller API"),
        ("9000-9999", "holds port 9464, the agent's metrics"),
        ("8000-8999", "holds port 8443, this agent's https_entry"),
        (
            "30000-39999",
            "overlaps the ephemeral port range 32768-60999",
        ),
        ("60999-61000", "overlaps the ephemeral port range"),
        ("80-90", "not a range of ports 1024-65535"),
        ("29999-20000", "not a range of ports"),
        ("20000", "a range like 20000-29999"),
    ] {
        let e = tcp_port_range(value, &own, eph.clone()).unwrap_err();
        assert_eq!(e.field, "tcp_ports");
        assert!(e.message.contains(says), "{value}: {}", e.message);
    }
    // Above the ephemeral range is fine too.
    assert!(tcp_port_range("61000-62000", &own, eph).is_ok());
    assert_eq!(
        url_ports(&["https://10.0.0.1:2379".into(), "http://h:12379/".into()]),
        vec![2379, 12379]
    );
}

#[test]
fn both_configs_check_tcp_ports_against_their_own_listeners() {
    let agent = AgentConfig {
        http_entry: "127.0.0.1:20080".parse().unwrap(),
        ..AgentConfig::default()
    };
    let e = agent.validate().unwrap_err();
    assert!(
        e.message
            .contains("holds port 20080, this agent's http_entry"),
        "{e}"
    );
    let controller = ControllerConfig {
        listen: "127.0.0.1:21000".parse().unwrap(),
        ..ControllerConfig::default()
    };
    let e = controller.tcp_port_range().unwrap_err();
    assert!(
        e.message
            .contains("holds port 21000, this controller's listen"),
        "{e}"
    );
}

#[test]
fn egress_deny_takes_ipv4_networks_without_host_bits() {
    for ok in [
        "10.0.0.0/8",
        "198.18.128.2/32",
        "0.0.0.0/0",
        "169.254.0.0/16",
    ] {
        let cfg = AgentConfig {
            egress_deny: vec![ok.into()],
            ..AgentConfig::default()
        };
        assert!(cfg.validate().is_ok(), "{ok}: {:?}", cfg.validate());
    }
    for bad in [
        "10.0.0.1/8",
        "192.168.1.1/24",
        "10.0.0.0/33",
        "10.0.0.0",
        "fd00::/8",
        "x/8",
    ] {
        let cfg = AgentConfig {
            egress_deny: vec![bad.into()],
            ..AgentConfig::default()
        };
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.field, "egress_deny", "{bad}");
    }
}

#[test]
fn the_agents_http_limits_are_checked_and_named() {
    type Change = fn(&mut AgentConfig);
    let cases: [(&str, Change); 6] = [
        ("max_header_bytes", |c| c.max_header_bytes = 2 * 1024 * 1024),
        ("http_header_timeout_ms", |c| c.http_header_timeout_ms = 50),
        ("http_keepalive_timeout_secs", |c| {
            c.http_keepalive_timeout_secs = 0
        }),
        ("http_max_connections", |c| c.http_max_connections = 0),
        ("http_max_connections_per_source", |c| {
            c.http_max_connections_per_source = 0
        }),
        ("http_max_connections_per_source", |c| {
            c.http_max_connections_per_source = c.http_max_connections + 1
        }),
    ];
    for (field, change) in cases {
        let mut cfg = AgentConfig::default();
        change(&mut cfg);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    assert!(AgentConfig::default().validate().is_ok());
}

#[test]
fn advertise_url_must_be_plain_http_the_replicas_forward_to() {
    let base = ControllerConfig {
        admin_token: "admin-token-0123456789".into(),
        platform_token: "platform-token-0123456789".into(),
        flag_secret: "flag-secret-0123456789".into(),
        ..ControllerConfig::default()
    };
    assert_eq!(base.validate().map_err(|e| e.field), Ok(()));
    for (url, ok) in [
        ("http://198.18.128.1:7080", true),
        ("https://198.18.128.1:7080", false),
        ("198.18.128.1:7080", false),
        ("http://", false),
        ("http://198.18.128.1:7080/?x=1", false),
    ] {
        let cfg = ControllerConfig {
            advertise_url: Some(url.into()),
            ..base.clone()
        };
        match cfg.validate() {
            Ok(_) => assert!(ok, "{url} passed"),
            Err(e) => {
                assert!(!ok, "{url}: {e}");
                assert_eq!(e.field, "advertise_url", "{url}");
            }
        }
    }
}
