//! `POST /v2/s2s/event` and `POST /v2/s2s/batch`.

use super::faults::FaultStep;
use super::record::AcceptedBatch;
use super::Shared;
use crate::event::{Event, Field, FieldKind, Rule, Violation};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Event,
    Batch,
}

pub(super) async fn event(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    ingest(&sh, Endpoint::Event, &headers, body).await
}

pub(super) async fn batch(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    ingest(&sh, Endpoint::Batch, &headers, body).await
}

pub(super) async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; the API is POST /v2/s2s/event and POST /v2/s2s/batch".into(),
    )
}

async fn ingest(sh: &Shared, ep: Endpoint, headers: &HeaderMap, body: Body) -> Response {
    sh.record().count_request();
    let resp = handle(sh, ep, headers, body).await;
    sh.record().count_status(resp.status().as_u16());
    resp
}

async fn handle(sh: &Shared, ep: Endpoint, headers: &HeaderMap, body: Body) -> Response {
    let (latency, auth_fail_all, body_limit, unavailable) = {
        let f = sh.faults();
        (f.latency(), f.auth_fail_all(), f.body_limit(), f.unavailable_left())
    };
    // A gateway in front of the API: its body limit and its maintenance answers come first.
    if let Some(limit) = body_limit {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            sh.record().count_injected("413");
            let mut resp = json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "injected_fault",
                format!("injected fault: a gateway refuses bodies over {limit} bytes"),
            );
            // As nginx does: the body is not read, so the connection cannot carry another
            // request; saying so keeps the client from reusing it (a request sent on it would
            // meet a closed connection and look unanswered).
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    }
    if let Some(left) = unavailable {
        sh.record().count_injected("503");
        return unavailable_503(sh, left);
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if auth_fail_all {
        sh.record().count_injected("auth_fail_all");
        return unauthorized();
    }
    let Some(key) = sh.authenticate(headers.get("x-api-key").map(HeaderValue::as_bytes)) else {
        return unauthorized();
    };
    // Every authenticated request spends budget, whatever becomes of it: the real API counts
    // requests, not valid ones.
    if let Some(limiter) = &sh.limiter {
        use governor::clock::Clock as _;
        if let Err(not_until) = limiter.check_key(&key) {
            let wait = not_until.wait_time_from(limiter.clock().now());
            let msg = format!(
                "rate limit exceeded: {} requests per {} per API key",
                sh.rate_limit,
                humantime::format_duration(sh.rate_window)
            );
            return too_many_requests(sh, wait, "rate_limited", msg);
        }
    }
    let step = sh.faults().next(rand::random::<f64>);
    if step != FaultStep::Ok {
        sh.record().count_injected(step.as_str());
    }
    match step {
        FaultStep::Ok => {}
        FaultStep::Status400 => {
            return bad_request(
                sh,
                "injected_fault",
                "injected fault: a fake rejection; the request was not looked at".into(),
                Vec::new(),
            )
        }
        FaultStep::Status401 => return unauthorized(),
        FaultStep::Status404 => return not_found().await,
        FaultStep::Status429 => {
            return too_many_requests(
                sh,
                Duration::from_secs(1),
                "injected_fault",
                "injected fault: rate limit exceeded".into(),
            )
        }
        FaultStep::Status500 => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "injected_fault",
                "injected fault: internal error; retry with backoff".into(),
            )
        }
        FaultStep::Timeout => return hang(sh).await,
        FaultStep::Status504 => {
            return json_error(
                StatusCode::GATEWAY_TIMEOUT,
                "injected_fault",
                "injected fault: a gateway timed out before the API handled the request".into(),
            )
        }
        FaultStep::Status502 => {
            let resp = process(sh, ep, headers, body).await;
            if !resp.status().is_success() {
                return resp;
            }
            return json_error(
                StatusCode::BAD_GATEWAY,
                "injected_fault",
                "injected fault: the API handled the request and a gateway lost its answer".into(),
            );
        }
        FaultStep::Slow => {
            let resp = process(sh, ep, headers, body).await;
            let wait = sh.faults().slow_answer();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = sh.shutdown.cancelled() => {}
            }
            return resp;
        }
    }
    process(sh, ep, headers, body).await
}

/// A request past the faults: content type, size caps, JSON, validation, and the record.
async fn process(sh: &Shared, ep: Endpoint, headers: &HeaderMap, body: Body) -> Response {
    if !is_json(headers) {
        return bad_request(
            sh,
            "unsupported_content_type",
            "the body must be sent with Content-Type: application/json".into(),
            Vec::new(),
        );
    }
    let bytes = match read_body(body, headers, sh.max_body_bytes).await {
        Ok(b) => b,
        Err(resp) => return bad_request(sh, resp.0, resp.1, Vec::new()),
    };
    // One pass over the body: each object as `serde_json` values (what `Event::from_json` reads),
    // with its amounts' text as the client wrote them. Reading the body as a `Value` and then its
    // items' amounts again cost the sandbox three passes (its CPU rose a fifth in the e2e bench,
    // on the two cores the bridge shares).
    let body: BodyJson<'_> = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(
                sh,
                "malformed_json",
                format!("the body is not valid JSON: {e}"),
                Vec::new(),
            )
        }
    };
    let items = match (ep, body) {
        (Endpoint::Event, BodyJson::One(Item::Object(o))) => vec![Item::Object(o)],
        (Endpoint::Event, other) => {
            let msg = format!("/v2/s2s/event takes one JSON object (an event), got {}", other.kind());
            return bad_request(sh, "not_an_object", msg, Vec::new());
        }
        (Endpoint::Batch, BodyJson::Many(items)) => {
            if items.is_empty() {
                return bad_request(
                    sh,
                    "empty_batch",
                    "the batch is empty; send at least one event".into(),
                    Vec::new(),
                );
            }
            if items.len() > sh.max_batch_events {
                let msg = format!(
                    "the batch has {} events; at most {} are accepted per request",
                    items.len(),
                    sh.max_batch_events
                );
                return bad_request(sh, "too_many_events", msg, Vec::new());
            }
            items
        }
        (Endpoint::Batch, other) => {
            let msg = format!("/v2/s2s/batch takes a JSON array of events, got {}", other.kind());
            return bad_request(sh, "not_an_array", msg, Vec::new());
        }
    };
    let mut events = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    let mut bad_events = 0;
    for (index, item) in items.iter().enumerate() {
        let violations = match item {
            Item::Object(o) => match Event::from_json(&o.fields) {
                Ok(mut e) => {
                    o.exact_amounts(&mut e);
                    let v = e.validate(&sh.opts);
                    if v.is_empty() {
                        events.push(e);
                    }
                    v
                }
                Err(v) => v,
            },
            Item::Other(kind) => vec![Violation::new(
                "",
                Rule::Type,
                format!("an event must be a JSON object, got {kind}"),
            )],
        };
        if !violations.is_empty() {
            bad_events += 1;
            errors.extend(violations.into_iter().map(|violation| ItemError { index, violation }));
        }
    }
    if !errors.is_empty() {
        let msg = format!(
            "{bad_events} of {} events break the contract; nothing was accepted",
            items.len()
        );
        return bad_request(sh, "validation_failed", msg, errors);
    }
    let accepted = events.len();
    let batch = AcceptedBatch::new(&events, bytes.len());
    sh.record().accept(&events, batch);
    (StatusCode::OK, axum::Json(json!({ "accepted": accepted }))).into_response()
}

/// One entry of a 400's `errors`: which event (its index in the batch; 0 for /event), which
/// field, which rule.
#[derive(Serialize)]
struct ItemError {
    index: usize,
    #[serde(flatten)]
    violation: Violation,
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = ct.split(';').next().unwrap_or("").trim();
    mime.eq_ignore_ascii_case("application/json")
}

/// Reads the body, refusing more than `max` bytes without reading them all.
async fn read_body(body: Body, headers: &HeaderMap, max: usize) -> Result<Vec<u8>, (&'static str, String)> {
    let too_large = || ("body_too_large", format!("the body is larger than {max} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(declared.unwrap_or(8 * 1024));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ("body_unreadable", format!("the body could not be read: {e}")))?;
        if buf.len() + chunk.len() > max {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// An injected timeout: hang for the configured time (then 504, as a gateway would), or until
/// the client gives up (the future is dropped), or until shutdown (503).
async fn hang(sh: &Shared) -> Response {
    let hang = sh.faults().timeout_hang();
    let wait = async {
        match hang {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = wait => json_error(
            StatusCode::GATEWAY_TIMEOUT,
            "injected_fault",
            "injected fault: the request timed out".into(),
        ),
        _ = sh.shutdown.cancelled() => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the sandbox is shutting down".into(),
        ),
    }
}

/// `unavailable_for`: 503 with `Retry-After` (seconds, or a date with `retry_after_date`) for the
/// time `left`, and a `Date` header, both on the sandbox's clock moved by `clock_offset_s`.
fn unavailable_503(sh: &Shared, left: Duration) -> Response {
    let (as_date, offset) = {
        let f = sh.faults();
        (f.retry_after_date(), f.clock_offset_s())
    };
    let secs = left.as_nanos().div_ceil(1_000_000_000).max(1) as u64;
    let now = std::time::SystemTime::now();
    let clock = if offset >= 0 {
        now + Duration::from_secs(offset.unsigned_abs())
    } else {
        now - Duration::from_secs(offset.unsigned_abs())
    };
    let mut resp = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "injected_fault",
        format!("injected fault: unavailable for {secs} s more"),
    );
    let h = resp.headers_mut();
    let date = httpdate::fmt_http_date(clock);
    let retry_after = if as_date {
        // Whole seconds of an HTTP date: round the end up so that it is never early.
        httpdate::fmt_http_date(clock + Duration::from_secs(secs + 1))
    } else {
        secs.to_string()
    };
    if let (Ok(d), Ok(r)) = (HeaderValue::from_str(&date), HeaderValue::from_str(&retry_after)) {
        h.insert(header::DATE, d);
        h.insert(header::RETRY_AFTER, r);
    }
    resp
}

fn json_error(status: StatusCode, error: &str, message: String) -> Response {
    (status, axum::Json(json!({ "error": error, "message": message }))).into_response()
}

/// The same answer whatever key was sent (or none), so that it reveals nothing about the keys.
fn unauthorized() -> Response {
    json_error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or invalid API key (header X-API-Key)".into(),
    )
}

fn too_many_requests(sh: &Shared, wait: Duration, error: &str, message: String) -> Response {
    let mut resp = json_error(StatusCode::TOO_MANY_REQUESTS, error, message);
    if sh.retry_after {
        // Whole seconds, rounded up, at least 1: retrying after that is allowed.
        let secs = wait.as_nanos().div_ceil(1_000_000_000).max(1);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
    }
    resp
}

fn bad_request(sh: &Shared, error: &str, message: String, errors: Vec<ItemError>) -> Response {
    if sh.bare_400 {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let body = if errors.is_empty() {
        json!({ "error": error, "message": message })
    } else {
        json!({ "error": error, "message": message, "errors": errors })
    };
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

/// A request body as the sandbox reads it, in one pass: one item (the `/event` body, or a batch
/// body that is not an array) or the items of an array.
enum BodyJson<'b> {
    One(Item<'b>),
    Many(Vec<Item<'b>>),
}

impl BodyJson<'_> {
    /// "an object", "an array", …: the body's JSON type, for the 400's message.
    fn kind(&self) -> &'static str {
        match self {
            BodyJson::One(item) => item.kind(),
            BodyJson::Many(_) => "an array",
        }
    }
}

/// One item of a body: an object, or the JSON type of anything else (all a 400 names of it).
enum Item<'b> {
    Object(Object<'b>),
    Other(&'static str),
}

impl Item<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Item::Object(_) => "an object",
            Item::Other(kind) => kind,
        }
    }
}

/// An object of the body: its members as `serde_json` values, and the text of its `amount` and
/// `bet_result_amount` as the client wrote them (a `Value` keeps a number only as an f64 or a
/// 64-bit integer, so `50.00` would read back as `50.0`; API-CONTRACT: amounts are exact). A key
/// given twice keeps its last value, as `serde_json::Value` does.
struct Object<'b> {
    fields: serde_json::Map<String, Value>,
    /// The raw text of each amount field ([`FieldKind::Decimal`] in the field table), the last
    /// when a key is given twice.
    amounts: Vec<(Field, &'b serde_json::value::RawValue)>,
}

impl Object<'_> {
    /// Replaces the event's amounts by the number text the object holds for them (when they are
    /// JSON numbers), so that the sandbox keeps what it received verbatim: `50.00` stays `50.00`.
    fn exact_amounts(&self, e: &mut Event<'_>) {
        let exact = |r: &serde_json::value::RawValue| {
            Some(r.get().trim())
                .filter(|t| t.starts_with(|c: char| c == '-' || c.is_ascii_digit()))
                .and_then(|t| crate::decimal::Decimal::parse_owned(t.to_string()))
        };
        for (field, raw) in &self.amounts {
            if let Some(slot) = e.decimal_slot(*field).filter(|slot| slot.is_some()) {
                if let Some(d) = exact(raw) {
                    *slot = Some(d);
                }
            }
        }
    }
}

/// Reads an object's members: the amounts (the field table's decimal fields) as raw text, then
/// as a `Value` from that text, every other member as a `Value`.
fn read_object<'de, A: serde::de::MapAccess<'de>>(mut map: A) -> Result<Object<'de>, A::Error> {
    let mut o = Object {
        fields: serde_json::Map::new(),
        amounts: Vec::new(),
    };
    while let Some(key) = map.next_key::<String>()? {
        let value = match Field::from_name(&key).filter(|f| f.kind() == FieldKind::Decimal) {
            Some(field) => {
                let raw: &'de serde_json::value::RawValue = map.next_value()?;
                let value = serde_json::from_str(raw.get()).map_err(serde::de::Error::custom)?;
                o.amounts.retain(|(f, _)| *f != field);
                o.amounts.push((field, raw));
                value
            }
            None => map.next_value()?,
        };
        o.fields.insert(key, value);
    }
    Ok(o)
}

/// The JSON type of a scalar or array met where an object was wanted (`json_kind`'s words).
macro_rules! other_kinds {
    ($value:ty) => {
        fn visit_bool<E>(self, _: bool) -> Result<$value, E> {
            Ok(Self::other("a boolean"))
        }
        fn visit_i64<E>(self, _: i64) -> Result<$value, E> {
            Ok(Self::other("a number"))
        }
        fn visit_u64<E>(self, _: u64) -> Result<$value, E> {
            Ok(Self::other("a number"))
        }
        fn visit_f64<E>(self, _: f64) -> Result<$value, E> {
            Ok(Self::other("a number"))
        }
        fn visit_str<E>(self, _: &str) -> Result<$value, E> {
            Ok(Self::other("a string"))
        }
        fn visit_unit<E>(self) -> Result<$value, E> {
            Ok(Self::other("null"))
        }
    };
}

impl<'de> serde::Deserialize<'de> for Item<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl V {
            fn other(kind: &'static str) -> Item<'static> {
                Item::Other(kind)
            }
        }
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Item<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            other_kinds!(Item<'de>);
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Item<'de>, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Item::Other("an array"))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Item<'de>, A::Error> {
                read_object(map).map(Item::Object)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::Deserialize<'de> for BodyJson<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl V {
            fn other(kind: &'static str) -> BodyJson<'static> {
                BodyJson::One(Item::Other(kind))
            }
        }
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = BodyJson<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            other_kinds!(BodyJson<'de>);
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<BodyJson<'de>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(BodyJson::Many(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<BodyJson<'de>, A::Error> {
                read_object(map).map(|o| BodyJson::One(Item::Object(o)))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: &str) -> BodyJson<'_> {
        serde_json::from_str(body).unwrap()
    }

    /// One pass reads each object with its amounts' text as written; a key given twice keeps its
    /// last value and its last text, as `serde_json::Value` does.
    #[test]
    fn the_body_is_read_once_with_each_amounts_text() {
        let BodyJson::Many(items) = read(
            r#"[{"amount": 50.00, "bet_result_amount": -1e2, "a": [1, {"amount": 7}]},
                {"amount": 1, "amount": 2.50}, 3, "x", null, true, [1], {}]"#,
        ) else {
            panic!("an array")
        };
        let kinds: Vec<&str> = items.iter().map(Item::kind).collect();
        assert_eq!(
            kinds,
            [
                "an object",
                "an object",
                "a number",
                "a string",
                "null",
                "a boolean",
                "an array",
                "an object"
            ]
        );
        let Item::Object(first) = &items[0] else { panic!() };
        let raw = |o: &Object<'_>, f: Field| {
            o.amounts
                .iter()
                .find(|(g, _)| *g == f)
                .map(|(_, r)| r.get().to_string())
        };
        assert_eq!(raw(first, Field::Amount).as_deref(), Some("50.00"));
        assert_eq!(raw(first, Field::BetResultAmount).as_deref(), Some("-1e2"));
        assert_eq!(first.fields["amount"], serde_json::json!(50.0));
        assert_eq!(first.fields["a"], serde_json::json!([1, {"amount": 7}]));
        let Item::Object(second) = &items[1] else { panic!() };
        assert_eq!(raw(second, Field::Amount).as_deref(), Some("2.50"));
        assert_eq!(second.amounts.len(), 1);
        assert_eq!(second.fields["amount"], serde_json::json!(2.5));
    }

    /// What is not an array or an object is named by its JSON type, as the 400 says it; a
    /// number the API cannot read as a binary64 is malformed JSON, as before.
    #[test]
    fn a_body_that_is_not_an_array_is_named_by_its_type() {
        assert_eq!(read("{}").kind(), "an object");
        assert_eq!(read("[]").kind(), "an array");
        assert_eq!(read(" 12 ").kind(), "a number");
        assert_eq!(read("\"s\"").kind(), "a string");
        assert!(matches!(read("[]"), BodyJson::Many(v) if v.is_empty()));
        assert!(serde_json::from_str::<BodyJson<'_>>(r#"[{"amount": 1e400}]"#).is_err());
        assert!(serde_json::from_str::<BodyJson<'_>>(r#"[{"x": 1e400}]"#).is_err());
        assert!(serde_json::from_str::<BodyJson<'_>>("[{]").is_err());
    }
}
