//! The OpenAPI document describes exactly the routes the router serves.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;
use utoipa::openapi::path::PathItem;

use super::{UNDOCUMENTED, openapi_document, router, routes};
use crate::App;

/// (path, METHOD).
type Route = (String, String);

/// Every route of the router (not its fallback), read from axum 0.8's
/// `Debug` output: the paths by route id, and each route's `allow_header`
/// (the methods it serves; GET implies HEAD).
fn served(router: &axum::Router<Arc<App>>) -> BTreeSet<Route> {
    let text = format!("{router:?}");
    let main = text.split(", fallback_router:").next().unwrap_or_default();
    let (routes, node) = main
        .split_once("node: Node { paths: ")
        .unwrap_or_else(|| panic!("axum's Router Debug format changed: {text}"));
    let mut paths = HashMap::new();
    for part in node.split("RouteId(").skip(1) {
        let (id, rest) = part.split_once("): \"").expect("RouteId(n): \"path\"");
        paths.insert(id, rest.split('"').next().unwrap_or_default());
    }
    let mut out = BTreeSet::new();
    for part in routes.split("RouteId(").skip(1) {
        let (id, rest) = part.split_once("): ").expect("RouteId(n): endpoint");
        let methods = rest
            .split_once("allow_header: Bytes(b\"")
            .map_or("*", |(_, r)| r.split('"').next().unwrap_or_default());
        let all: Vec<&str> = methods.split(',').collect();
        for m in &all {
            if *m == "HEAD" && all.contains(&"GET") {
                continue;
            }
            out.insert((paths[id].to_string(), m.to_string()));
        }
    }
    out
}

/// Each method of a path item, and its operation if documented.
fn methods(item: &PathItem) -> [(&'static str, bool); 8] {
    [
        ("GET", item.get.is_some()),
        ("PUT", item.put.is_some()),
        ("POST", item.post.is_some()),
        ("DELETE", item.delete.is_some()),
        ("PATCH", item.patch.is_some()),
        ("HEAD", item.head.is_some()),
        ("OPTIONS", item.options.is_some()),
        ("TRACE", item.trace.is_some()),
    ]
}

fn documented(doc: &utoipa::openapi::OpenApi) -> BTreeSet<Route> {
    let mut out = BTreeSet::new();
    for (path, item) in &doc.paths.paths {
        for (method, op) in methods(item) {
            if op {
                out.insert((path.clone(), method.to_string()));
            }
        }
    }
    out
}

#[test]
fn every_served_route_is_documented_and_every_documented_one_served() {
    let served = served(&routes());
    let documented = documented(&openapi_document());
    let excluded: BTreeSet<Route> = UNDOCUMENTED
        .iter()
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect();
    assert!(
        served.contains(&("/v1/status".into(), "GET".into())),
        "the routes could not be read from axum's Debug output: {served:?}"
    );
    let undocumented: Vec<_> = served
        .difference(&documented)
        .filter(|r| !excluded.contains(*r))
        .collect();
    assert!(
        undocumented.is_empty(),
        "served but missing from openapi.json: {undocumented:?}"
    );
    let phantom: Vec<_> = documented.difference(&served).collect();
    assert!(
        phantom.is_empty(),
        "in openapi.json but not served: {phantom:?}"
    );
    let stale: Vec<_> = excluded.difference(&served).collect();
    assert!(
        stale.is_empty(),
        "UNDOCUMENTED names routes not served: {stale:?}"
    );
}

#[test]
fn the_document_names_both_scopes_and_unique_operations() {
    let v = serde_json::to_value(openapi_document()).expect("serializes");
    assert_eq!(v["openapi"], "3.1.0");
    for scheme in ["admin", "platform"] {
        assert_eq!(
            v["components"]["securitySchemes"][scheme]["scheme"], "bearer",
            "{scheme}"
        );
    }
    let schemas = &v["components"]["schemas"];
    assert!(schemas["ChallengeSpec"]["properties"]["image"].is_object());
    // Several services per instance: the map, each service's fields, the
    // port's service and the flag's.
    assert!(schemas["ChallengeSpec"]["properties"]["services"].is_object());
    for field in ["image", "command", "ready", "depends_on"] {
        assert!(
            schemas["ServiceSpec"]["properties"][field].is_object(),
            "ServiceSpec.{field}: {}",
            schemas["ServiceSpec"]
        );
    }
    assert!(schemas["PortSpec"]["properties"]["service"].is_object());
    assert!(schemas["FlagSpec"]["properties"]["services"].is_object());
    assert!(v["components"]["schemas"]["SpawnRequest"]["properties"]["team"].is_object());
    let mut ids = BTreeSet::new();
    for item in v["paths"].as_object().expect("paths").values() {
        for op in item.as_object().expect("a path item").values() {
            let id = op["operationId"].as_str().expect("an operationId");
            assert!(ids.insert(id.to_string()), "operationId {id} twice");
            assert!(op["responses"]["503"].is_object(), "{id} has no 503");
        }
    }
}

/// Every documented method of every documented path answers (401 without
/// a token, never 404 or 405), and the other methods answer 405: the
/// document against the live router.
#[tokio::test]
async fn documented_methods_are_served_and_others_are_405() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cfg = tidegate_schema::config::ControllerConfig {
        admin_token: "admin-token-0123456789".into(),
        platform_token: "platform-token-0123456789".into(),
        flag_secret: "flag-secret-0123456789".into(),
        artifact_dir: dir.path().into(),
        // Nothing listens there: no request below reaches etcd (each is
        // refused for its missing token first).
        etcd: vec!["http://127.0.0.1:1".into()],
        ..Default::default()
    };
    let client = etcd_client::Client::connect(&cfg.etcd, None)
        .await
        .expect("a lazy client");
    let app = Arc::new(App::new(cfg, client).expect("an app"));
    let router = router(app);
    for (path, item) in &openapi_document().paths.paths {
        let uri = path.replace("{name}", "web").replace("{id}", "0123456789");
        for (method, op) in methods(item).into_iter().take(5) {
            let req = Request::builder()
                .method(method)
                .uri(&uri)
                .body(Body::empty())
                .expect("a request");
            let status = router
                .clone()
                .oneshot(req)
                .await
                .expect("an answer")
                .status();
            if op {
                assert!(
                    status.as_u16() != 404 && status.as_u16() != 405,
                    "{method} {path}: {status}"
                );
            } else {
                assert_eq!(
                    status.as_u16(),
                    405,
                    "{method} {path} is served but not documented"
                );
            }
        }
    }
}
