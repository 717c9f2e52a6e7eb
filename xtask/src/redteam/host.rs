//! Attacks on the host from inside an instance: connections from team
//! mallory's containers (the isolated network's and the egress network's)
//! to every address of the host and the cluster's daemons.

use anyhow::Result;

use super::range::{Instance, Range};
use super::{Attack, From, Verdict};

/// Which of mallory's instances.
#[derive(Clone, Copy)]
enum Which {
    Isolated,
    Egress,
}

impl Which {
    fn of(self, r: &Range) -> &Instance {
        match self {
            Which::Isolated => &r.mallory,
            Which::Egress => &r.mallory_egress,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Which::Isolated => "isolated",
            Which::Egress => "egress",
        }
    }
}

/// A target of the host: what it is, and its address from the range.
type Target = (&'static str, fn(&Range, &Instance) -> Result<String>);

const TARGETS: [Target; 4] = [
    ("a listener on 0.0.0.0 through the gateway", |r, i| {
        Ok(format!("{} {}", r.gateway(i)?, r.listener.port()))
    }),
    ("a listener on 0.0.0.0 on the host's address", |r, _| {
        Ok(format!(
            "{} {}",
            r.a_cfg.advertise_address,
            r.listener.port()
        ))
    }),
    ("agent a's metrics", |r, _| {
        Ok(format!(
            "{} {}",
            r.a_cfg.metrics_listen.ip(),
            r.a_cfg.metrics_listen.port()
        ))
    }),
    ("the controller API", |r, _| {
        let addr = r.plane.url.trim_start_matches("http://");
        Ok(addr.replace(':', " "))
    }),
];

pub(super) fn attacks() -> Vec<Attack> {
    let mut all = Vec::new();
    // The isolated network has no route beyond its bridge: from there the
    // host is its gateway address (a listener on 0.0.0.0 answers on it).
    for (which, targets) in [
        (Which::Isolated, &TARGETS[..1]),
        (Which::Egress, &TARGETS[..]),
    ] {
        for &(what, target) in targets {
            all.push(Attack::new(
                format!("{} instance → {what}", which.name()),
                From::Instance,
                "firewall",
                move |r| connect(r, which.of(r), &target(r, which.of(r))?),
            ));
        }
    }
    all.push(Attack::new(
        "egress instance → etcd on its own host",
        From::Instance,
        "firewall",
        |r| {
            let etcd = r.endpoints()[0]
                .trim_start_matches("http://")
                .replace(':', " ");
            connect(r, &r.mallory_egress, &etcd)
        },
    ));
    all
}

/// `player connect` from `inst` to `target` (`host port`).
fn connect(r: &Range, inst: &Instance, target: &str) -> Result<Verdict> {
    let (host, port) = target.split_once(' ').unwrap_or((target, ""));
    let out = r.exec(inst, &["/player", "connect", host, port])?;
    Ok(if out == "open" {
        Verdict::Succeeded(format!("{host}:{port} {out}"))
    } else {
        Verdict::Blocked(format!("{host}:{port} {out}"))
    })
}
