//! `GET /v1/openapi.json`: the document generated from the handlers'
//! `#[utoipa::path]` and the body types, with the two bearer scopes.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::bodies::ErrorBody;

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "tidegate",
        description = "Per-team CTF challenge instances. Bearer tokens: admin (organizers) or platform (the CTF platform). Every error body is an ErrorBody. Bodies over 1 MiB get 413."
    ),
    modifiers(&BearerSchemes),
    security(("admin" = []), ("platform" = [])),
    components(schemas(ErrorBody)),
    tags(
        (name = "challenges", description = "organizers' challenge specs (admin writes)"),
        (name = "policies", description = "per-challenge WebAssembly policy plugins (admin writes)"),
        (name = "instances", description = "per-team instances (platform or admin)"),
        (name = "cluster", description = "this replica, the workers, the dashboard's data"),
        (name = "meta", description = "this document"),
    )
)]
pub(super) struct ApiDoc;

/// The two bearer scopes.
#[derive(Debug)]
struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc
            .components
            .get_or_insert_with(utoipa::openapi::Components::new);
        for (name, what) in [
            ("admin", "the organizers' token (`admin_token`)"),
            ("platform", "the CTF platform's token (`platform_token`)"),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

/// This document.
#[utoipa::path(
    get, path = "/v1/openapi.json", tag = "meta", operation_id = "openapi",
    security(()),
    responses((status = 200, description = "this document (OpenAPI 3.1)", body = serde_json::Value))
)]
pub(super) async fn document() -> Response {
    static DOC: LazyLock<String> = LazyLock::new(|| {
        super::openapi_document()
            .to_pretty_json()
            .unwrap_or_default()
    });
    ([(header::CONTENT_TYPE, "application/json")], DOC.as_str()).into_response()
}

/// Adds what every operation may answer: 401 where a token is needed, and
/// 503 (etcd without quorum, no scheduler elected).
pub(super) fn add_common_responses(doc: &mut utoipa::openapi::OpenApi) {
    let error = |what: &str| {
        ResponseBuilder::new()
            .description(what)
            .content(
                "application/json",
                Content::new(Some(Ref::from_schema_name("ErrorBody"))),
            )
            .build()
    };
    for item in doc.paths.paths.values_mut() {
        for op in operations(item) {
            let open = op
                .security
                .as_ref()
                .is_some_and(|s| s.iter().all(|r| *r == Default::default()));
            if !open {
                op.responses
                    .responses
                    .entry("401".into())
                    .or_insert_with(|| error("missing or unknown token").into());
            }
            op.responses
                .responses
                .entry("503".into())
                .or_insert_with(|| error("etcd has no quorum or no scheduler is elected").into());
        }
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
        &mut item.head,
        &mut item.options,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}
