//! The `admit-spawn` and `renew` decisions, as outcomes the API maps to
//! answers: admit (with the TTL), extend, or a refusal that says why. When
//! a plugin fails (trap, deadline, memory, blob unavailable), the
//! challenge's `policy_fallback` decides and the failure is counted.

use tidegate_plugin_host::{InstanceInfo, RenewDecision, SpawnDecision, SpawnRequest};
use tidegate_schema::spec::MIN_TTL_SECS;
use tidegate_schema::{ChallengeRecord, InstanceRecord, PolicyFallback, PolicyRef, TeamId};

use crate::App;

/// What a policy said to a spawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Spawn it, living `ttl_secs`; `note` when a failed plugin's fallback
    /// allowed it (the answer says so).
    Admit {
        ttl_secs: u64,
        note: Option<PolicyNote>,
    },
    Refused(PolicyRefusal),
}

/// What a policy said to a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Extend by this many seconds (`None`: the challenge's default).
    Extend(Option<u64>),
    Refused(PolicyRefusal),
}

/// A plugin failed and the challenge's fallback allowed the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyNote {
    pub digest: String,
    pub hook: &'static str,
    pub error: String,
}

/// How a policy refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// `admit-spawn` answered deny.
    Deny,
    /// `admit-spawn` asked the caller to come back later.
    Queue { retry_after_secs: u32 },
    /// `renew` answered refuse.
    Refuse,
    /// The plugin failed and the challenge's fallback is deny.
    FallbackDeny,
}

/// A policy's refusal: what the caller is told, and which plugin and hook said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRefusal {
    pub kind: RefusalKind,
    pub message: String,
    pub digest: String,
    pub hook: &'static str,
}

impl PolicyRefusal {
    /// The decision as answers and logs name it.
    pub fn decision(&self) -> &'static str {
        match self.kind {
            RefusalKind::Deny => "deny",
            RefusalKind::Queue { .. } => "queue",
            RefusalKind::Refuse => "refuse",
            RefusalKind::FallbackDeny => "fallback-deny",
        }
    }

    /// The refusal label of `tidegate_controller_refusals_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            RefusalKind::Deny => "policy_deny",
            RefusalKind::Queue { .. } => "policy_queue",
            RefusalKind::Refuse => "policy_refuse",
            RefusalKind::FallbackDeny => "policy_fallback_deny",
        }
    }
}

/// A plugin's answer, or its failure.
enum Answer<T> {
    /// No policy, or the plugin does not implement the hook.
    None,
    Plugin(T),
    Failed(String),
}

/// Asks `admit-spawn` of the challenge's policy (under the spawn lock, so
/// the counts it is told include every earlier spawn).
pub async fn admit_spawn(app: &App, challenge: &ChallengeRecord, team: &TeamId) -> Admission {
    let default_ttl = challenge.spec.ttl.default_secs;
    let Some(policy) = &challenge.policy else {
        return Admission::Admit {
            ttl_secs: default_ttl,
            note: None,
        };
    };
    let hook = "admit-spawn";
    let request = spawn_request(app, challenge, team);
    let answer = match app.policies.plugin(policy).await {
        Ok(plugin) => match app
            .policies
            .calls
            .timed(hook, || plugin.admit_spawn(&request))
        {
            None => Answer::None,
            Some(Ok(d)) => Answer::Plugin(d),
            Some(Err(e)) => Answer::Failed(e.to_string()),
        },
        Err(e) => Answer::Failed(e.to_string()),
    };
    let refused = |kind, message| Admission::Refused(refusal(app, policy, hook, kind, message));
    match answer {
        Answer::None | Answer::Plugin(SpawnDecision::Allow(None)) => Admission::Admit {
            ttl_secs: default_ttl,
            note: None,
        },
        Answer::Plugin(SpawnDecision::Allow(Some(t))) => Admission::Admit {
            ttl_secs: u64::from(t).clamp(MIN_TTL_SECS, challenge.spec.ttl.max_secs),
            note: None,
        },
        Answer::Plugin(SpawnDecision::Deny(reason)) => refused(RefusalKind::Deny, reason),
        Answer::Plugin(SpawnDecision::Queue(secs)) => {
            let secs = secs.max(1);
            refused(
                RefusalKind::Queue {
                    retry_after_secs: secs,
                },
                format!("the challenge's policy asks to retry in {secs} s"),
            )
        }
        Answer::Failed(error) => match failed(app, challenge, policy, hook, error) {
            Ok(note) => Admission::Admit {
                ttl_secs: default_ttl,
                note: Some(note),
            },
            Err(r) => Admission::Refused(r),
        },
    }
}

/// Asks `renew` of the challenge's policy how long to extend `record`.
pub async fn renew(app: &App, challenge: &ChallengeRecord, record: &InstanceRecord) -> Renewal {
    let Some(policy) = &challenge.policy else {
        return Renewal::Extend(None);
    };
    let hook = "renew";
    let info = InstanceInfo {
        instance: record.id.to_string(),
        team: record.team_str().to_string(),
        challenge: record.challenge.to_string(),
        created_ms: record.created_at * 1000,
        expires_ms: record.expires_at * 1000,
        renewals: record.renewals,
        now_ms: tidegate_plugin_host::unix_ms(),
    };
    let answer = match app.policies.plugin(policy).await {
        Ok(plugin) => match app.policies.calls.timed(hook, || plugin.renew(&info)) {
            None => Answer::None,
            Some(Ok(d)) => Answer::Plugin(d),
            Some(Err(e)) => Answer::Failed(e.to_string()),
        },
        Err(e) => Answer::Failed(e.to_string()),
    };
    match answer {
        Answer::None => Renewal::Extend(None),
        Answer::Plugin(RenewDecision::Extend(secs)) => Renewal::Extend(Some(u64::from(secs))),
        Answer::Plugin(RenewDecision::Refuse(reason)) => {
            Renewal::Refused(refusal(app, policy, hook, RefusalKind::Refuse, reason))
        }
        Answer::Failed(error) => match failed(app, challenge, policy, hook, error) {
            Ok(_) => Renewal::Extend(None),
            Err(r) => Renewal::Refused(r),
        },
    }
}

/// A plugin's own refusal, counted.
fn refusal(
    app: &App,
    policy: &PolicyRef,
    hook: &'static str,
    kind: RefusalKind,
    message: String,
) -> PolicyRefusal {
    app.metrics.policy_denials.inc();
    PolicyRefusal {
        kind,
        message,
        digest: policy.digest.clone(),
        hook,
    }
}

/// A failed plugin: logged and counted; the challenge's fallback decides
/// (`Ok`: allowed, with the note for the answer).
fn failed(
    app: &App,
    challenge: &ChallengeRecord,
    policy: &PolicyRef,
    hook: &'static str,
    error: String,
) -> Result<PolicyNote, PolicyRefusal> {
    let fallback = challenge.spec.policy_fallback;
    tracing::warn!(challenge = %challenge.name, hook, ?fallback, %error,
        "policy plugin failed; applying the challenge's fallback");
    app.metrics.policy_failures.inc();
    match fallback {
        PolicyFallback::Allow => Ok(PolicyNote {
            digest: policy.digest.clone(),
            hook,
            error,
        }),
        PolicyFallback::Deny => {
            app.metrics.policy_denials.inc();
            Err(PolicyRefusal {
                kind: RefusalKind::FallbackDeny,
                message: format!("{error}; the challenge's policy_fallback is deny"),
                digest: policy.digest.clone(),
                hook,
            })
        }
    }
}

/// What `admit-spawn` is told: the team's counts and the cluster's room,
/// from this replica's view (the leader's, which places every spawn).
fn spawn_request(app: &App, challenge: &ChallengeRecord, team: &TeamId) -> SpawnRequest {
    let now = tidegate_schema::time::unix_secs();
    let view = app.view.lock();
    let mut team_live = 0u32;
    let mut team_live_all = 0u32;
    let mut per_worker: std::collections::BTreeMap<&str, u32> = Default::default();
    for i in view.instances.values() {
        *per_worker.entry(i.record.worker.as_str()).or_default() += 1;
        if i.record.is_of(team) {
            team_live_all += 1;
            if i.record.challenge == challenge.name {
                team_live += 1;
            }
        }
    }
    let mut capacity = 0u32;
    let mut free = 0u32;
    for w in view.workers.values() {
        capacity = capacity.saturating_add(w.capacity);
        let used = per_worker.get(w.id.as_str()).copied().unwrap_or(0);
        free = free.saturating_add(w.capacity.saturating_sub(used));
    }
    drop(view);
    SpawnRequest {
        team: team.to_string(),
        challenge: challenge.name.to_string(),
        team_live,
        team_live_all,
        team_recent: app.recent_spawns.count(now, team, &challenge.name),
        cluster_free_slots: free,
        cluster_capacity: capacity,
        now_ms: tidegate_plugin_host::unix_ms(),
    }
}
