//! Unit tests of the 400 handling, over real HTTP against an in-process fake of the batch endpoint
//! (the component tests in `tests/deliver_*.rs` use the project's sandbox).

use super::*;
use crate::event::Event;
use axum::body::Bytes as AxumBytes;
use axum::http::StatusCode;
use axum::routing::post;
use parking_lot::Mutex as StdMutex;

/// No dedupe store to tell.
struct NoStore;

impl Exposure for NoStore {
    async fn exposed(&self) {}
    async fn unexposed(&self) {}
}

impl Deliverer {
    /// [`Deliverer::deliver_json`] for events not serialised yet, telling no dedupe store.
    async fn deliver(&self, events: &[Event<'_>], cancel: &CancellationToken) -> Result<Vec<EventResult>, Interrupted> {
        let json: Vec<Vec<u8>> = events
            .iter()
            .map(|e| {
                let mut out = Vec::new();
                e.write_json(&mut out);
                out
            })
            .collect();
        let slices: Vec<&[u8]> = json.iter().map(Vec::as_slice).collect();
        self.deliver_json(&slices, cancel, None, &NoStore).await
    }
}

/// Events whose `client_user_id` starts with "bad" are refused.
#[derive(Clone, Copy, PartialEq)]
enum Bodies {
    Bare,
    Indexed,
}

#[derive(Default)]
struct Seen {
    requests: usize,
    /// Ids the fake accepted, in arrival order.
    accepted: Vec<String>,
}

async fn fake(bodies: Bodies) -> (String, Arc<StdMutex<Seen>>) {
    let seen = Arc::new(StdMutex::new(Seen::default()));
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/v2/s2s/batch",
        post(move |body: AxumBytes| {
            let s = s.clone();
            async move {
                let events: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
                let ids: Vec<String> = events
                    .iter()
                    .map(|e| e["client_user_id"].as_str().unwrap().to_string())
                    .collect();
                let mut seen = s.lock();
                seen.requests += 1;
                let bad: Vec<usize> = (0..ids.len()).filter(|&i| ids[i].starts_with("bad")).collect();
                if bad.is_empty() {
                    seen.accepted.extend(ids);
                    return (StatusCode::OK, String::new());
                }
                match bodies {
                    Bodies::Bare => (StatusCode::BAD_REQUEST, String::new()),
                    Bodies::Indexed => {
                        let errors: Vec<_> = bad
                            .iter()
                            .map(|i| serde_json::json!({"index": i, "field": "amount", "rule": "required", "message": "amount is required"}))
                            .collect();
                        let body = serde_json::json!({"error": "validation_failed", "errors": errors});
                        (StatusCode::BAD_REQUEST, body.to_string())
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn deliverer(base_url: &str) -> Deliverer {
    let api: ApiConfig = serde_json::from_value(serde_json::json!({
        "base_url": base_url,
        "key": "dp_test_key_123",
    }))
    .unwrap();
    let cfg = DeliveryConfig {
        rate_limit: 1_000_000,
        rate_window: Duration::from_secs(1),
        ..DeliveryConfig::default()
    };
    Deliverer::new(&api, &cfg, &crate::telemetry::Telemetry::new()).unwrap()
}

fn batch(n: usize, bad: &[usize]) -> Vec<Event<'static>> {
    (0..n)
        .map(|i| Event {
            client_user_id: if bad.contains(&i) {
                format!("bad{i:04}").into()
            } else {
                format!("u{i:04}").into()
            },
            event_name: "login".into(),
            timestamp: 1_702_963_200,
            ..Event::default()
        })
        .collect()
}

fn check_results(results: &[EventResult], bad: &[usize]) {
    for (i, r) in results.iter().enumerate() {
        if bad.contains(&i) {
            assert!(
                matches!(r, EventResult::Rejected { status: 400, .. }),
                "event {i}: {r:?}"
            );
        } else {
            assert_eq!(r, &EventResult::Delivered, "event {i}");
        }
    }
}

/// Accepted ids must reach the API in batch order (invariant 7).
fn check_order(seen: &Seen, n: usize, bad: &[usize]) {
    let expected: Vec<String> = (0..n)
        .filter(|i| !bad.contains(i))
        .map(|i| format!("u{i:04}"))
        .collect();
    assert_eq!(seen.accepted, expected);
}

#[tokio::test]
async fn bare_400_isolates_one_bad_event_in_log2_requests() {
    let (url, seen) = fake(Bodies::Bare).await;
    let d = deliverer(&url);
    let cancel = CancellationToken::new();
    // ⌈log2 500⌉ = 9 probes, one more to confirm an inferred single event, one for the rest.
    let bound = 9 + 2;
    let mut worst = 0;
    for bad in [0, 1, 137, 249, 250, 251, 377, 498, 499] {
        *seen.lock() = Seen::default();
        let events = batch(500, &[bad]);
        let results = d.deliver(&events, &cancel).await.unwrap();
        check_results(&results, &[bad]);
        let seen = seen.lock();
        check_order(&seen, 500, &[bad]);
        let extra = seen.requests - 1;
        assert!(extra <= bound, "bad event at {bad}: {extra} extra requests");
        worst = worst.max(extra);
    }
    eprintln!("one bad event in 500, bare 400: at most {worst} extra requests");
}

#[tokio::test]
async fn bare_400_rejected_single_event_keeps_status_and_body() {
    let (url, _seen) = fake(Bodies::Bare).await;
    let d = deliverer(&url);
    let results = d.deliver(&batch(1, &[0]), &CancellationToken::new()).await.unwrap();
    assert_eq!(
        results,
        vec![EventResult::Rejected {
            status: 400,
            body: String::new()
        }]
    );
}

#[tokio::test]
async fn bare_400_isolates_several_bad_events() {
    let (url, seen) = fake(Bodies::Bare).await;
    let d = deliverer(&url);
    let bad = [3, 4, 100, 499];
    let results = d.deliver(&batch(500, &bad), &CancellationToken::new()).await.unwrap();
    check_results(&results, &bad);
    check_order(&seen.lock(), 500, &bad);
}

#[tokio::test]
async fn indexed_400_costs_exactly_one_extra_request() {
    let (url, seen) = fake(Bodies::Indexed).await;
    let d = deliverer(&url);
    for bad in [vec![7], vec![0, 250, 499]] {
        *seen.lock() = Seen::default();
        let results = d.deliver(&batch(500, &bad), &CancellationToken::new()).await.unwrap();
        check_results(&results, &bad);
        let seen = seen.lock();
        assert_eq!(seen.requests, 2, "bad {bad:?}");
        check_order(&seen, 500, &bad);
        // Each rejected event carries its own part of the body.
        let EventResult::Rejected { body, .. } = &results[bad[0]] else {
            unreachable!()
        };
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["errors"][0]["field"], "amount");
        assert_eq!(v["errors"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn all_bad_are_rejected_without_bisection_when_indexed() {
    let (url, seen) = fake(Bodies::Indexed).await;
    let d = deliverer(&url);
    let bad: Vec<usize> = (0..10).collect();
    let results = d.deliver(&batch(10, &bad), &CancellationToken::new()).await.unwrap();
    check_results(&results, &bad);
    assert_eq!(seen.lock().requests, 1);
}

#[test]
fn config_defaults_and_validation() {
    let cfg: DeliveryConfig = serde_json::from_value(serde_json::json!({})).unwrap();
    assert_eq!(cfg.rate_limit, 60);
    assert_eq!(cfg.rate_window, Duration::from_secs(60));
    assert_eq!(cfg.rate_mode, RateMode::Local);
    assert!(cfg.validate().is_empty());
    let keys = |c: &DeliveryConfig| c.validate().into_iter().map(|i| i.key).collect::<Vec<_>>();
    let bad = DeliveryConfig {
        rate_mode: RateMode::Redis,
        rate_burst: 100,
        ..DeliveryConfig::default()
    };
    assert_eq!(keys(&bad), ["delivery.rate_burst", "delivery.redis_url"]);
    let share = DeliveryConfig {
        rate_mode: RateMode::StaticShare,
        replicas: Some(100),
        ..DeliveryConfig::default()
    };
    assert_eq!(keys(&share), ["delivery.replicas"]);
    assert!(serde_json::from_value::<DeliveryConfig>(serde_json::json!({"rate_limt": 5})).is_err());
}

#[test]
fn redis_url_is_redacted() {
    let cfg = DeliveryConfig {
        rate_mode: RateMode::Redis,
        redis_url: Some(Secret("redis://:hunter2@127.0.0.1:6379".into())),
        ..DeliveryConfig::default()
    };
    assert!(!format!("{cfg:?}").contains("hunter2"));
    assert!(!toml::to_string(&cfg).unwrap().contains("hunter2"));
}

#[test]
fn every_config_key_is_documented() {
    let doc = include_str!("../../docs/delivery.md");
    let keys = serde_json::to_value(DeliveryConfig::default()).unwrap();
    for key in keys.as_object().unwrap().keys() {
        assert!(
            doc.contains(&format!("| `{key}` |")),
            "docs/delivery.md lacks a row for `{key}`"
        );
    }
}
