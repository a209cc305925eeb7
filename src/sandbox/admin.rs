//! `/_sandbox/*`: fault settings, the record, and the OpenAPI document. Partner API keys give no
//! access here; with an admin token (`--admin-token`, `DATAPULSE_SANDBOX_ADMIN_TOKEN` or
//! `--admin-token-file`) every endpoint requires header `X-Admin-Token`, and without one the
//! sandbox only starts on a loopback address (`SandboxError::AdminOpen`).

use super::api::{body_timeout, read_body, BodyError};
use super::{ct_eq, joined, Faults, Shared};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

const OPENAPI: &str = include_str!("../../docs/openapi.yaml");

/// `GET /_sandbox/events` without `limit`: this many events (a page, not the whole log: issue 23
/// measured 19.7 MB and the sandbox's RSS at 122 MB for one unpaged answer).
const DEFAULT_PAGE: usize = 1_000;

/// The largest `limit` honoured; a larger one is cut to it.
const MAX_PAGE: usize = 10_000;

/// The most bytes of event JSON in one `GET /_sandbox/events` answer (8 MiB): a page stops
/// early, after at least one event, rather than pass it (issue 23: a default page of 1,000
/// events of 1 MB each was a 1 GB answer). Header `X-Sandbox-Next-Offset` says where to go on.
const MAX_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// The largest fault-settings body read, in bytes.
const MAX_FAULTS_BODY: usize = 64 * 1024;

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
async fn put_faults(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_body(body, &headers, MAX_FAULTS_BODY, sh.body_read_timeout).await {
        Ok(b) => b,
        Err(BodyError::TimedOut) => return body_timeout(sh.body_read_timeout),
        Err(BodyError::Refused(code, message)) => return error(StatusCode::BAD_REQUEST, code, &message),
    };
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
    offset: Option<u64>,
    limit: Option<usize>,
}

/// A page of the stored events: from log index `offset` (default 0), `limit` of them (default
/// [`DEFAULT_PAGE`], at most [`MAX_PAGE`]), and at most [`MAX_PAGE_BYTES`] of JSON (at least
/// one event). Headers say where the log stands: `X-Sandbox-Accepted-Events` (every event
/// accepted), `X-Sandbox-First-Stored` (the index of the oldest event still stored; those before
/// it were evicted), `X-Sandbox-Next-Offset` (the `offset` of the next page) and, when the byte
/// budget ended the page before `limit`, `X-Sandbox-Page-Cut: bytes`. A query that does not
/// parse (`offset=-1`, `limit=x`) is answered 400 `{"error":"invalid_query","message":…}`.
async fn events(State(sh): State<Arc<Shared>>, page: Result<Query<Page>, QueryRejection>) -> Response {
    let page = match page {
        Ok(Query(p)) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", &e.body_text()),
    };
    let offset = page.offset.unwrap_or(0);
    let limit = page.limit.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
    let (body, next, accepted, first) = {
        let rec = sh.record();
        let (body, next) = rec.events_json(offset, limit, MAX_PAGE_BYTES);
        (body, next, rec.accepted(), rec.first_stored())
    };
    // Cut by bytes: the page ended before `limit` events and before the end of the log.
    let cut = next < accepted && next < offset.max(first).saturating_add(limit as u64);
    let mut resp = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    let h = resp.headers_mut();
    h.insert("x-sandbox-accepted-events", HeaderValue::from(accepted));
    h.insert("x-sandbox-first-stored", HeaderValue::from(first));
    h.insert("x-sandbox-next-offset", HeaderValue::from(next));
    if cut {
        h.insert("x-sandbox-page-cut", HeaderValue::from_static("bytes"));
    }
    resp
}

async fn reset(State(sh): State<Arc<Shared>>) -> Response {
    sh.record().reset();
    Json(json!({ "reset": true })).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}
