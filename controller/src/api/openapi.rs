//! `GET /v1/openapi.json`: the API contract, written out by hand so it says
//! exactly what the handlers do (and a test checks every route is in it).

use axum::Json;
use serde_json::{Value, json};

/// Every path and method the router serves.
pub const ROUTES: &[(&str, &str)] = &[
    ("/v1/openapi.json", "get"),
    ("/v1/status", "get"),
    ("/v1/workers", "get"),
    ("/v1/challenges", "get"),
    ("/v1/challenges/{name}", "get"),
    ("/v1/challenges/{name}", "put"),
    ("/v1/challenges/{name}", "delete"),
    ("/v1/challenges/{name}/policy", "get"),
    ("/v1/challenges/{name}/policy", "put"),
    ("/v1/challenges/{name}/policy", "delete"),
    ("/v1/instances", "post"),
    ("/v1/instances", "get"),
    ("/v1/instances/{id}", "get"),
    ("/v1/instances/{id}", "delete"),
    ("/v1/instances/{id}/renew", "post"),
    ("/v1/instances/{id}/flag", "post"),
    ("/v1/dashboard", "get"),
];

fn op(summary: &str, scope: &str, responses: &[(&str, &str)]) -> Value {
    let mut r = serde_json::Map::new();
    for (code, what) in responses {
        let schema = if code.starts_with('2') && *code != "204" {
            json!({ "type": "object" })
        } else {
            json!({ "$ref": "#/components/schemas/Error" })
        };
        r.insert(
            (*code).into(),
            json!({ "description": what, "content": { "application/json": { "schema": schema } } }),
        );
    }
    json!({ "summary": summary, "description": format!("Scope: {scope}."), "responses": r })
}

fn with_body(mut op: Value, schema: &str) -> Value {
    op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } });
    op
}

pub(crate) async fn document() -> Json<Value> {
    Json(spec())
}

/// The OpenAPI 3.0 document.
pub fn spec() -> Value {
    let common = [
        ("401", "missing or unknown token"),
        ("503", "etcd has no quorum or no scheduler is elected"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        extra.iter().chain(common.iter()).copied().collect()
    };
    json!({
        "openapi": "3.0.3",
        "info": { "title": "tidegate", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Per-team CTF challenge instances. Bearer tokens: admin (organizers) or platform (the CTF platform). Every error body is {\"error\", \"field\"?}. Bodies over 1 MiB get 413." },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": {
                    "error": { "type": "string" }, "field": { "type": "string" }, "leader": { "type": "string" } } },
                "ChallengeSpec": { "type": "object", "required": ["image", "ports"], "additionalProperties": false, "properties": {
                    "image": { "type": "string" },
                    "ports": { "type": "array", "items": { "type": "object", "required": ["name", "port", "protocol"], "additionalProperties": false, "properties": {
                        "name": { "type": "string" }, "port": { "type": "integer" }, "protocol": { "type": "string", "enum": ["http", "tcp"] } } } },
                    "env": { "type": "object", "additionalProperties": { "type": "string" } },
                    "limits": { "type": "object", "properties": { "memory_mib": { "type": "integer" }, "cpus": { "type": "number" }, "pids": { "type": "integer" } } },
                    "ttl": { "type": "object", "properties": { "default_secs": { "type": "integer" }, "max_secs": { "type": "integer" }, "max_renewals": { "type": "integer" } } },
                    "per_team_max": { "type": "integer" },
                    "flag": { "type": "object", "properties": { "template": { "type": "string" } } },
                    "egress": { "type": "boolean" }, "read_only_rootfs": { "type": "boolean" },
                    "cap_add": { "type": "array", "items": { "type": "string" } },
                    "policy_fallback": { "type": "string", "enum": ["deny", "allow"], "description": "what a failing policy plugin's decision becomes (default deny)" } } },
                "SpawnRequest": { "type": "object", "required": ["challenge", "team"], "additionalProperties": false, "properties": {
                    "challenge": { "type": "string" }, "team": { "type": "string" } } },
                "FlagRequest": { "type": "object", "required": ["flag"], "additionalProperties": false, "properties": { "flag": { "type": "string" } } }
            }
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/v1/openapi.json": { "get": op("This document", "none", &[("200", "OpenAPI 3.0")]) },
            "/v1/status": { "get": op("This replica's role, the leader, etcd members and revision", "any", &with(&[("200", "status")])) },
            "/v1/workers": { "get": op("Live workers with capacity and load", "any", &with(&[("200", "workers")])) },
            "/v1/challenges": { "get": op("All challenges", "any", &with(&[("200", "challenges, and stored values that failed to parse")])) },
            "/v1/challenges/{name}": {
                "get": op("One challenge; ETag is its revision", "any", &with(&[("200", "challenge"), ("404", "no such challenge")])),
                "put": with_body(op("Create or replace; If-Match: \"<revision>\" (\"0\" = create only)", "admin",
                    &with(&[("200", "replaced"), ("201", "created"), ("400", "invalid spec, naming the field"), ("403", "needs admin"), ("412", "revision differs"), ("413", "body too large")])), "ChallengeSpec"),
                "delete": op("Delete; optional If-Match", "admin", &with(&[("204", "deleted"), ("404", "no such challenge"), ("412", "revision differs")]))
            },
            "/v1/challenges/{name}/policy": {
                "get": op("The challenge's policy plugin: digest, hooks, size, fallback", "any", &with(&[("200", "policy"), ("404", "no such challenge, or no policy")])),
                "put": {
                    "summary": "Upload a WebAssembly component (world tidegate:policy/policy@0.1.0, at most 10 MiB) as the challenge's policy: checked, dry-run (admit-spawn), stored by sha256, then pointed at; optional If-Match",
                    "description": "Scope: admin.",
                    "requestBody": { "required": true, "content": { "application/wasm": { "schema": { "type": "string", "format": "binary" } } } },
                    "responses": op("", "admin", &with(&[("200", "policy"), ("400", "not wasm, a core module, another world, a missing export, too big, or the dry run trapped"), ("403", "needs admin"), ("404", "no such challenge"), ("412", "revision differs")]))["responses"].clone()
                },
                "delete": op("Remove the challenge's policy; optional If-Match", "admin", &with(&[("204", "removed"), ("404", "no such challenge, or no policy"), ("412", "revision differs")]))
            },
            "/v1/instances": {
                "post": with_body(op("Spawn an instance for a team (standbys answer 307 to the scheduler). A policy's denial is a 403 whose `error` is its reason and `policy` names digest, hook and decision; `queue` is a 429 with Retry-After", "platform or admin",
                    &with(&[("201", "instance"), ("307", "this replica is a standby"), ("400", "invalid request, naming the field"), ("403", "denied by the challenge's policy (or its failure under policy_fallback deny)"), ("404", "no such challenge"), ("409", "the team is at its per_team_max"), ("429", "the policy asks to retry after Retry-After seconds")])), "SpawnRequest"),
                "get": op("Live instances; filter with ?team=&challenge=", "any", &with(&[("200", "instances")]))
            },
            "/v1/instances/{id}": {
                "get": op("One instance", "any", &with(&[("200", "instance"), ("404", "no such instance")])),
                "delete": op("Delete an instance (revokes its lease)", "any", &with(&[("204", "deleted"), ("404", "no such instance")]))
            },
            "/v1/instances/{id}/renew": { "post": op("Extend the lifetime per the challenge's ttl rules (and its policy's renew hook)", "any",
                &with(&[("200", "instance with its new expires_at"), ("307", "this replica is a standby"), ("403", "refused by the challenge's policy"), ("404", "no such instance"), ("409", "max renewals or max lifetime reached, or too early to extend it")])) },
            "/v1/instances/{id}/flag": { "post": with_body(op("Check a flag (constant-time)", "any", &with(&[("200", "{\"correct\": bool}"), ("404", "no such instance")])), "FlagRequest") },
            "/v1/dashboard": { "get": op("What the organizer dashboard (GET /dashboard, an HTML page) shows: this replica, the leader, workers (registered or absent), live instances, this replica's recent refusals, policies in force", "admin", &with(&[("200", "dashboard data"), ("403", "needs admin")])) }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_documented() {
        let spec = super::spec();
        for (path, method) in super::ROUTES {
            assert!(
                spec["paths"][path][method].is_object(),
                "{method} {path} missing from openapi.json"
            );
        }
        let documented: usize = spec["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(documented, super::ROUTES.len());
    }
}
