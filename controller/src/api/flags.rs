//! `/v1/flags/check`: whose flag a submission is, for the platform's
//! scoreboard and its flag-sharing report.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use tidegate_schema::config::planted;
use tidegate_schema::decode_json;

use super::bodies::{ErrorBody, FlagOwner, FlagSubmission, FlagVerdict};
use super::instances::{challenge_named, rate_limit};
use super::{ApiError, ApiResult, AppState, Scope, etcd, json_response};
use crate::lifecycle;
use crate::ratelimit::Op;

/// Checks a team's submission for a challenge: correct when it is the flag
/// of one of the team's instances of that challenge, live or ended (or the
/// challenge's static flag); `shared` when it is another team's instance
/// flag, with that instance's owner, so the platform can record it. Any
/// replica answers; each check takes a token of the team's flag bucket.
#[utoipa::path(
    post, path = "/v1/flags/check", tag = "instances", operation_id = "check_submission",
    request_body = FlagSubmission,
    responses(
        (status = 200, description = "the verdict", body = FlagVerdict),
        (status = 400, description = "an invalid request, naming the field", body = ErrorBody),
        (status = 404, description = "no such challenge", body = ErrorBody),
        (status = 429, description = "the team's (or the platform's) flag bucket is empty", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds"))),
    )
)]
pub(super) async fn check(State(app): AppState, scope: Scope, body: Bytes) -> ApiResult<Response> {
    let req: FlagSubmission = decode_json(&body).map_err(ApiError::bad_request)?;
    rate_limit(&app, scope, Op::Flag, &req.team)?;
    let (challenge, _) = challenge_named(&app, &req.challenge).await?;
    let submitted = req.flag.trim();
    let spec = &challenge.spec;
    if !spec.per_instance_flag() {
        // One flag for every team: nothing to share, nobody to name.
        let correct = crate::flag::matches(&spec.flag.template, submitted);
        return Ok(json_response(
            StatusCode::OK,
            FlagVerdict {
                correct,
                shared: false,
                owner: None,
            },
        ));
    }
    // Looked up by digest: the time taken says nothing about the flag's bytes.
    let digest = crate::flag::digest(submitted);
    let owner = etcd(&app, || {
        lifecycle::flag_owner(&app.client, &app.ks, &req.challenge, &digest)
    })
    .await?;
    let verdict = match owner {
        None => FlagVerdict {
            correct: false,
            shared: false,
            owner: None,
        },
        Some(o) => {
            let own = o.team == req.team || planted("team-scope");
            if !own {
                app.metrics.shared_flags.inc();
                tracing::warn!(
                    challenge = %req.challenge, submitter = %req.team, owner = %o.team,
                    instance = %o.instance, "flag sharing: a team submitted another team's instance flag"
                );
            }
            FlagVerdict {
                correct: own,
                shared: !own,
                owner: Some(FlagOwner {
                    team: o.team,
                    instance: o.instance,
                    worker: o.worker,
                    created_at: o.created_at,
                }),
            }
        }
    };
    Ok(json_response(StatusCode::OK, verdict))
}
