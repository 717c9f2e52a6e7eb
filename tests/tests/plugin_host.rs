//! The plugin host against the real example and fixture components
//! (plugins/, built for wasm32 and wrapped as components by the lab).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tidegate_lab::plugins::{component, core_module};
use tidegate_plugin_host::{
    Activity, Cause, Connection, Host, IdleDecision, Limits, LoadError, Protocol, SpawnDecision,
    SpawnRequest, Verdict,
};

fn request(team: &str) -> SpawnRequest {
    SpawnRequest {
        team: team.into(),
        challenge: "web".into(),
        team_live: 0,
        team_live_all: 0,
        team_recent: 0,
        cluster_free_slots: 10,
        cluster_capacity: 10,
        now_ms: 1,
    }
}

#[test]
fn examples_decide_as_documented() {
    let host = Host::new(Limits::default()).unwrap();

    let allowlist = host.load(&component("allowlist")).unwrap();
    assert_eq!(allowlist.hook_names(), ["admit-spawn", "admit-connection"]);
    assert_eq!(
        allowlist.admit_spawn(&request("red")).unwrap().unwrap(),
        SpawnDecision::Allow(None)
    );
    assert_eq!(
        allowlist.admit_spawn(&request("mallory")).unwrap().unwrap(),
        SpawnDecision::Deny("team mallory is not on the allowlist of challenge web".into())
    );
    let conn = |team: &str| Connection {
        instance: "i".into(),
        team: team.into(),
        challenge: "web".into(),
        source: Some("127.0.0.1".into()),
        protocol: Protocol::Http,
        host: "i.ctf.localhost".into(),
    };
    assert_eq!(
        allowlist.admit_connection(&conn("blue")).unwrap().unwrap(),
        Verdict::Allow
    );
    assert!(matches!(
        allowlist.admit_connection(&conn("mallory")).unwrap().unwrap(),
        Verdict::Reject(r) if r.contains("mallory")
    ));
    // Hooks it does not implement are not called.
    assert!(allowlist.on_idle(&activity(0, 0)).is_none());

    let team_limit = host.load(&component("team-limit")).unwrap();
    let mut r = request("red");
    r.team_live_all = 1;
    assert_eq!(
        team_limit.admit_spawn(&r).unwrap().unwrap(),
        SpawnDecision::Allow(None)
    );
    r.team_live_all = 2;
    assert!(matches!(
        team_limit.admit_spawn(&r).unwrap().unwrap(),
        SpawnDecision::Deny(_)
    ));

    let load_ttl = host.load(&component("load-ttl")).unwrap();
    let mut r = request("red");
    r.cluster_free_slots = 5;
    assert_eq!(
        load_ttl.admit_spawn(&r).unwrap().unwrap(),
        SpawnDecision::Allow(None)
    );
    r.cluster_free_slots = 2;
    assert_eq!(
        load_ttl.admit_spawn(&r).unwrap().unwrap(),
        SpawnDecision::Allow(Some(300))
    );
    r.cluster_free_slots = 0;
    assert_eq!(
        load_ttl.admit_spawn(&r).unwrap().unwrap(),
        SpawnDecision::Queue(60)
    );

    let reaper = host.load(&component("idle-reaper")).unwrap();
    // The test build reaps after 6 s.
    assert_eq!(
        reaper.on_idle(&activity(10_000, 5_000)).unwrap().unwrap(),
        IdleDecision::Keep
    );
    assert_eq!(
        reaper.on_idle(&activity(10_000, 3_000)).unwrap().unwrap(),
        IdleDecision::Expire
    );
}

fn activity(now_ms: u64, last_ms: u64) -> Activity {
    Activity {
        instance: "i".into(),
        team: "red".into(),
        challenge: "web".into(),
        last_activity_ms: last_ms,
        created_ms: 0,
        now_ms,
        open_connections: 0,
    }
}

#[test]
fn a_digest_is_compiled_once() {
    let host = Host::new(Limits::default()).unwrap();
    let bytes = component("team-limit");
    let a = host.load(&bytes).unwrap();
    let b = host.load(&bytes).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(host.cached(), 1);
}

#[test]
fn runaway_and_hungry_plugins_are_stopped_and_the_host_goes_on() {
    let host = Host::new(Limits::default()).unwrap();
    let runaway = host.load(&component("runaway")).unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let err = runaway.admit_spawn(&request("red")).unwrap().unwrap_err();
        assert_eq!(err.cause, Cause::Timeout(5), "{err}");
        assert_eq!(err.hook, "admit-spawn");
        assert!(err.to_string().contains(runaway.digest().as_str()), "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
    }
    let hog = host.load(&component("hog")).unwrap();
    let err = hog.admit_spawn(&request("red")).unwrap().unwrap_err();
    assert_eq!(err.cause, Cause::Memory(32), "{err}");
    // The host still runs well-behaved plugins.
    let fine = host.load(&component("team-limit")).unwrap();
    assert_eq!(
        fine.admit_spawn(&request("red")).unwrap().unwrap(),
        SpawnDecision::Allow(None)
    );
    // And the bad ones again, with the same answers (a fresh instance each call).
    assert_eq!(
        hog.admit_spawn(&request("red")).unwrap().unwrap_err().cause,
        Cause::Memory(32)
    );
}

#[test]
fn a_call_that_yields_each_tick_keeps_its_cpu_deadline() {
    // The agents' edge calls give up the CPU every millisecond; that must
    // not stretch a runaway call's budget nor fail a well-behaved one.
    let host = Host::new(Limits {
        yield_each_tick: true,
        // As the agents: yielding on a busy machine stretches a call's
        // wall time, and this test is about its CPU deadline.
        stall_after: Some(Duration::from_secs(1)),
        ..Limits::default()
    })
    .unwrap();
    let runaway = host.load(&component("runaway")).unwrap();
    let before = tidegate_plugin_host::thread_cpu();
    let err = runaway.admit_spawn(&request("red")).unwrap().unwrap_err();
    assert_eq!(err.cause, Cause::Timeout(5), "{err}");
    // Instantiating and the hook have 5 ms of CPU each, checked on 1 ms ticks.
    let spent = tidegate_plugin_host::thread_cpu() - before;
    assert!(
        (Duration::from_millis(5)..Duration::from_millis(40)).contains(&spent),
        "{spent:?}"
    );
    let fine = host.load(&component("team-limit")).unwrap();
    assert_eq!(
        fine.admit_spawn(&request("red")).unwrap().unwrap(),
        SpawnDecision::Allow(None)
    );
}

#[test]
fn bad_components_are_refused_with_their_reason() {
    let host = Host::new(Limits::default()).unwrap();
    assert!(matches!(
        host.load(&core_module("team-limit")),
        Err(LoadError::CoreModule)
    ));
    let err = host.load(&component("other-world")).unwrap_err();
    assert!(matches!(err, LoadError::WrongWorld(_)), "{err}");
    assert!(
        err.to_string().contains("does not target the world"),
        "{err}"
    );
    // A traps-on-everything plugin still loads (it answers `hooks`); the
    // upload's dry run is what refuses it.
    let broken = host.load(&component("dry-run-trap")).unwrap();
    let err = broken.admit_spawn(&request("red")).unwrap().unwrap_err();
    assert!(matches!(err.cause, Cause::Trap(_)), "{err}");
}
