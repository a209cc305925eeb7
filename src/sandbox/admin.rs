//! `/_sandbox/*`: fault settings, the record, and the OpenAPI document. Partner API keys give no
//! access here; with `--admin-token` every endpoint requires header `X-Admin-Token`.

use super::{ct_eq, joined, Faults, Shared};
use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

const OPENAPI: &str = include_str!("../../docs/openapi.yaml");

pub(super) fn router(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/faults", get(get_faults).put(put_faults))
        .route("/stats", get(stats))
        .route("/events", get(events))
        .route("/reset", post(reset))
        .route("/openapi.yaml", get(openapi))
        .route_layer(middleware::from_fn_with_state(shared, require_token))
}

async fn require_token(State(sh): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Some(token) = &sh.admin_token {
        let given = req.headers().get("x-admin-token").map(|v| v.as_bytes()).unwrap_or(b"");
        if !ct_eq(given, token) {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the /_sandbox/ endpoints need header X-Admin-Token",
            );
        }
    }
    next.run(req).await
}

fn error(status: StatusCode, error: &str, message: &str) -> Response {
    (status, Json(json!({ "error": error, "message": message }))).into_response()
}

async fn get_faults(State(sh): State<Arc<Shared>>) -> Json<Faults> {
    Json(sh.faults().current())
}

/// Replaces every fault setting; fields left out take their defaults (no fault).
async fn put_faults(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_faults", &e.to_string()),
    };
    let problems = faults.problems();
    if !problems.is_empty() {
        return error(StatusCode::BAD_REQUEST, "invalid_faults", &joined(&problems));
    }
    let mut f = sh.faults();
    f.set(faults);
    Json(f.current()).into_response()
}

async fn stats(State(sh): State<Arc<Shared>>) -> Response {
    Json(sh.record().stats()).into_response()
}

#[derive(Deserialize)]
struct Page {
    offset: Option<usize>,
    limit: Option<usize>,
}

async fn events(State(sh): State<Arc<Shared>>, Query(page): Query<Page>) -> Response {
    let body = sh
        .record()
        .events_json(page.offset.unwrap_or(0), page.limit.unwrap_or(usize::MAX));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn reset(State(sh): State<Arc<Shared>>) -> Response {
    sh.record().reset();
    Json(json!({ "reset": true })).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}
