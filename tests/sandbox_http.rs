//! The sandbox over real HTTP on 127.0.0.1: the seed document's examples (sent with curl), every
//! contract rule, request-level 400s, auth, rate limit, fault injection, the record and the admin
//! endpoints.

use datapulse_bridge::sandbox::{
    self, FaultProblem, FaultStep, Faults, SandboxArgs, SandboxError, SandboxHandle, Stats,
};
use serde_json::{json, Value};
use std::time::Duration;

const KEY: &str = "dp_test_key_123";

async fn start(tweak: impl FnOnce(&mut SandboxArgs)) -> SandboxHandle {
    let mut args = SandboxArgs {
        listen: "127.0.0.1:0".into(),
        api_keys: vec![KEY.into()],
        ..SandboxArgs::default()
    };
    tweak(&mut args);
    sandbox::start(args).await.expect("sandbox starts")
}

struct Reply {
    status: u16,
    retry_after: Option<String>,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }
}

async fn send(h: &SandboxHandle, path: &str, key: Option<&str>, body: &str) -> Reply {
    let client = reqwest::Client::new();
    let mut req = client
        .post(format!("{}{path}", h.url()))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.header("X-API-Key", k);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    Reply {
        status,
        retry_after,
        text: resp.text().await.unwrap(),
    }
}

async fn event(h: &SandboxHandle, body: &Value) -> Reply {
    send(h, "/v2/s2s/event", Some(KEY), &body.to_string()).await
}

async fn batch(h: &SandboxHandle, body: &Value) -> Reply {
    send(h, "/v2/s2s/batch", Some(KEY), &body.to_string()).await
}

async fn admin_get(h: &SandboxHandle, path: &str) -> Reply {
    let resp = reqwest::get(format!("{}/_sandbox/{path}", h.url())).await.unwrap();
    Reply {
        status: resp.status().as_u16(),
        retry_after: None,
        text: resp.text().await.unwrap(),
    }
}

/// The seed document's use-case bodies with realistic values; `ts` in the configured unit.
fn seed_use_cases(ts: i64) -> Vec<Value> {
    let ua =
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36";
    vec![
        json!({"client_user_id": "user_001", "click_id": "clk_998877", "event_name": "register",
               "timestamp": ts, "ip_address": "203.0.113.1", "user_agent": ua}),
        json!({"client_user_id": "user_001", "click_id": "clk_998877", "event_name": "login",
               "timestamp": ts, "ip_address": "2001:db8::1", "user_agent": ua}),
        json!({"client_user_id": "user_001", "click_id": "clk_998877", "event_name": "deposit",
               "currency": "EUR", "amount": 5.00, "transaction_id": "dep_1001", "timestamp": ts,
               "ip_address": "203.0.113.1", "is_crypto": false}),
        json!({"client_user_id": "user_001", "click_id": "clk_998877", "event_name": "deposit",
               "currency": "BTC", "amount": 0.005, "transaction_id": "dep_1002", "timestamp": ts,
               "ip_address": "203.0.113.1", "is_crypto": true}),
        // Pattern A, win and loss.
        json!({"client_user_id": "user_001", "event_name": "bet", "game_type": "slot", "game_provider": "GGP",
               "currency": "USD", "amount": 5.00, "transaction_id": "bet_2001", "timestamp": ts,
               "is_crypto": false, "bet_result": "win", "bet_result_amount": 1.00}),
        json!({"client_user_id": "user_001", "event_name": "bet", "game_type": "roulette", "game_provider": "EA",
               "currency": "USDT", "amount": 5.00, "transaction_id": "bet_2002", "timestamp": ts,
               "is_crypto": true, "bet_result": "loss", "bet_result_amount": -5.00}),
        // Pattern B: the bet, then its standalone win; another bet and its loss.
        json!({"client_user_id": "user_001", "event_name": "bet", "game_type": "sports", "game_provider": "EA",
               "currency": "USD", "amount": 5.00, "transaction_id": "bet_2003", "timestamp": ts, "is_crypto": false}),
        json!({"client_user_id": "user_001", "event_name": "win", "game_type": "sports", "game_provider": "EA",
               "currency": "USD", "amount": 5.00, "transaction_id": "win_3001", "parent_transaction_id": "bet_2003",
               "timestamp": ts, "is_crypto": false}),
        json!({"client_user_id": "user_001", "event_name": "bet", "game_type": "poker", "game_provider": "GGP",
               "currency": "EUR", "amount": 5.00, "transaction_id": "bet_2004", "timestamp": ts, "is_crypto": false}),
        json!({"client_user_id": "user_001", "event_name": "loss", "game_type": "poker", "game_provider": "GGP",
               "currency": "EUR", "amount": -5.00, "transaction_id": "loss_3002", "parent_transaction_id": "bet_2004",
               "timestamp": ts, "is_crypto": false}),
        json!({"client_user_id": "user_001", "event_name": "withdraw", "currency": "USD", "amount": 5.00,
               "transaction_id": "wd_4001", "timestamp": ts, "ip_address": "203.0.113.1", "is_crypto": false}),
    ]
}

async fn curl(url: &str, key_header: &str, body: &str) -> (String, String) {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-X",
            "POST",
            url,
            "-H",
            "Content-Type: application/json",
        ])
        .args(["-H", key_header, "-d", body, "-w", "\n%{http_code}"])
        .output()
        .await
        .expect("curl runs (is it installed?)");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_examples_are_accepted_when_sent_with_curl() {
    // The curl example of section 1.2, verbatim (header spelled X-API-KEY), timestamps in seconds.
    let h = start(|_| {}).await;
    let example = r#"{
"client_user_id": "user_001",
"click_id": "clk_998877",
"ip_address": "203.0.113.1",
"event_name":"deposit",
"transaction_id": "tx_554433",
"timestamp": 1702963200,
"amount": 50.00,
"currency": "USD"
}"#;
    let url = format!("{}/v2/s2s/event", h.url());
    let (code, body) = curl(&url, "X-API-KEY: dp_test_key_123", example).await;
    assert_eq!((code.as_str(), body.as_str()), ("200", r#"{"accepted":1}"#));
    let cases = seed_use_cases(1_702_963_200);
    for case in &cases {
        let (code, body) = curl(&url, "X-API-KEY: dp_test_key_123", &case.to_string()).await;
        assert_eq!(code, "200", "{case} -> {body}");
    }
    let batch_url = format!("{}/v2/s2s/batch", h.url());
    let (code, body) = curl(
        &batch_url,
        "x-api-key: dp_test_key_123",
        &Value::from(cases.clone()).to_string(),
    )
    .await;
    assert_eq!(code, "200", "{body}");
    let stats = h.stats();
    assert_eq!(stats.accepted_events, 1 + 2 * cases.len() as u64);
    assert_eq!(stats.suspicious_timestamps.count, 0);
    assert_eq!(h.events()[0]["transaction_id"], "tx_554433");
    assert_eq!(h.events()[1], cases[0]);

    // The use cases as written ("UTC milliseconds") against a sandbox configured for milliseconds.
    let ms = start(|a| a.timestamp_unit = datapulse_bridge::event::TimestampUnit::Milliseconds).await;
    let url = format!("{}/v2/s2s/batch", ms.url());
    let (code, body) = curl(
        &url,
        "X-API-Key: dp_test_key_123",
        &Value::from(seed_use_cases(1_702_963_200_123)).to_string(),
    )
    .await;
    assert_eq!(code, "200", "{body}");
    assert_eq!(ms.stats().suspicious_timestamps.count, 0);
    // Seconds sent to it are flagged.
    assert_eq!(event(&ms, &seed_use_cases(1_702_963_200)[0]).await.status, 200);
    let sus = ms.stats().suspicious_timestamps;
    assert_eq!((sus.count, sus.examples[0].timestamp), (1, 1_702_963_200));
    // ... and, read as milliseconds, 1970-01-20: implausible too.
    assert_eq!(ms.stats().implausible_timestamps.count, 1);
    assert_eq!(stats.implausible_timestamps.count, 0, "the seed's times are plausible");
}

/// Issue 17: the API accepts any integer as `timestamp` (contract decision 3), so the sandbox
/// accepts an implausible one and reports it in `/_sandbox/stats`: before 2000-01-01 or more
/// than a day after its clock, in its unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_timestamps_are_accepted_and_reported() {
    let h = start(|_| {}).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |i: usize, ts: i64| {
        set(
            set(deposit(), "transaction_id", json!(format!("tx_{i}"))),
            "timestamp",
            json!(ts),
        )
    };
    let events = vec![
        at(0, 20_422),           // the issue's Debezium DATE, days since 1970, sent as seconds
        at(1, now),              // plausible
        at(2, 946_684_800),      // 2000-01-01T00:00:00Z: the window's first second
        at(3, 946_684_799),      // a second before it
        at(4, now + 3 * 86_400), // three days ahead
        at(5, now + 3_600),      // an hour ahead: within the day allowed
        at(6, 1),                // the epoch's first second
    ];
    let reply = batch(&h, &Value::from(events)).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let stats: Value = serde_json::from_str(&admin_get(&h, "stats").await.text).unwrap();
    let found = &stats["implausible_timestamps"];
    assert_eq!(found["count"], 4, "{stats}");
    let examples: Vec<(u64, i64)> = found["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].as_u64().unwrap(), e["timestamp"].as_i64().unwrap()))
        .collect();
    assert_eq!(examples, [(0, 20_422), (3, 946_684_799), (4, now + 3 * 86_400), (6, 1)]);
    assert_eq!(found["examples"][0]["event_name"], "deposit");
    // None of them looks like milliseconds: the unit check says nothing of them.
    assert_eq!(stats["suspicious_timestamps"]["count"], 0);
    assert_eq!(h.stats().accepted_events, 7);
    // A reset forgets them.
    let client = reqwest::Client::new();
    client.post(format!("{}/_sandbox/reset", h.url())).send().await.unwrap();
    assert_eq!(h.stats().implausible_timestamps.count, 0);
}

fn deposit() -> Value {
    json!({"client_user_id": "user_001", "click_id": "clk_998877", "ip_address": "203.0.113.1",
           "event_name": "deposit", "transaction_id": "tx_554433", "timestamp": 1702963200,
           "amount": 50.00, "currency": "USD"})
}

fn bet() -> Value {
    json!({"client_user_id": "user_001", "event_name": "bet", "currency": "USD", "amount": 5.0,
           "transaction_id": "bet_1", "timestamp": 1702963200})
}

fn win() -> Value {
    json!({"client_user_id": "user_001", "event_name": "win", "currency": "USD", "amount": 5.0,
           "transaction_id": "win_1", "parent_transaction_id": "bet_1", "timestamp": 1702963200})
}

fn set(mut v: Value, k: &str, x: Value) -> Value {
    v[k] = x;
    v
}

fn unset(mut v: Value, k: &str) -> Value {
    v.as_object_mut().unwrap().remove(k);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_contract_rule_is_named_in_the_400() {
    let h = start(|_| {}).await;
    // (event, field, rule): one for each `Rule` of src/event.rs.
    let cases = vec![
        (unset(deposit(), "client_user_id"), "client_user_id", "required"),
        (set(deposit(), "event_name", json!("")), "event_name", "required"),
        (set(deposit(), "timestamp", json!("1702963200")), "timestamp", "type"),
        (unset(deposit(), "amount"), "amount", "financial_fields"),
        (unset(deposit(), "click_id"), "click_id", "click_id_ip_address"),
        (
            set(deposit(), "ip_address", json!("203.0.113.256")),
            "ip_address",
            "ip_address",
        ),
        (set(deposit(), "currency", json!("BTC")), "currency", "currency"),
        (set(bet(), "bet_result", json!("draw")), "bet_result", "bet_result"),
        (
            set(bet(), "bet_result", json!("win")),
            "bet_result_amount",
            "bet_result",
        ),
        (
            unset(win(), "parent_transaction_id"),
            "parent_transaction_id",
            "settlement",
        ),
        (
            set(bet(), "parent_transaction_id", json!("bet_0")),
            "parent_transaction_id",
            "settlement",
        ),
        (set(win(), "amount", json!(-1.5)), "amount", "amount_sign"),
        (
            set(set(bet(), "bet_result", json!("loss")), "bet_result_amount", json!(2.0)),
            "bet_result_amount",
            "amount_sign",
        ),
        (set(deposit(), "vip_level", json!(3)), "vip_level", "property_type"),
        (set(deposit(), "timestamp", json!(0)), "timestamp", "timestamp"),
    ];
    for (body, field, rule) in &cases {
        let r = event(&h, body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        let j = r.json();
        assert_eq!(j["error"], "validation_failed", "{j}");
        let errs = j["errors"].as_array().unwrap();
        assert!(
            errs.iter()
                .any(|e| e["index"] == 0 && e["field"] == *field && e["rule"] == *rule && e["message"].is_string()),
            "expected {field}/{rule} in {j}"
        );
    }
    // Rule `amount` (not finite) cannot be expressed in JSON: serde_json refuses 1e999 while
    // parsing, so such a body is rejected before validation, as malformed JSON.
    let r = send(
        &h,
        "/v2/s2s/event",
        Some(KEY),
        &deposit().to_string().replace("50.0", "1e999"),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("malformed_json")),
        "{}",
        r.text
    );
    assert_eq!(h.stats().accepted_events, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_bad_events_is_rejected_whole_naming_each() {
    let h = start(|_| {}).await;
    let mut events: Vec<Value> = (0..10)
        .map(|i| set(deposit(), "transaction_id", json!(format!("tx_{i}"))))
        .collect();
    events[3] = unset(events[3].clone(), "amount");
    events[7] = set(events[7].clone(), "currency", json!("usd"));
    events[8] = json!("not an event");
    let r = batch(&h, &Value::from(events)).await;
    assert_eq!(r.status, 400);
    let j = r.json();
    assert_eq!(j["error"], "validation_failed");
    let got: Vec<(u64, String, String)> = j["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["field"].as_str().unwrap().to_string(),
                e["rule"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (3, "amount".into(), "financial_fields".into()),
            (7, "currency".into(), "currency".into()),
            (8, "".into(), "type".into()),
        ]
    );
    assert!(j["message"].as_str().unwrap().contains("3 of 10"), "{j}");
    assert_eq!(h.stats().accepted_events, 0, "nothing of a rejected batch is recorded");
    assert!(h.events().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_level_400s_say_what_is_wrong() {
    let h = start(|a| {
        a.max_batch_events = 3;
        a.max_body_bytes = 4096;
    })
    .await;
    let cases: Vec<(&str, String, &str)> = vec![
        ("/v2/s2s/event", "{\"client_user_id\": ".into(), "malformed_json"),
        ("/v2/s2s/batch", deposit().to_string(), "not_an_array"),
        ("/v2/s2s/event", json!([deposit()]).to_string(), "not_an_object"),
        ("/v2/s2s/batch", "[]".into(), "empty_batch"),
        (
            "/v2/s2s/batch",
            json!([deposit(), deposit(), deposit(), deposit()]).to_string(),
            "too_many_events",
        ),
        (
            "/v2/s2s/event",
            set(deposit(), "note", json!("x".repeat(5000))).to_string(),
            "body_too_large",
        ),
    ];
    for (path, body, error) in &cases {
        let r = send(&h, path, Some(KEY), body).await;
        assert_eq!(r.status, 400, "{path} {error}");
        let j = r.json();
        assert_eq!(j["error"], *error, "{j}");
        assert!(!j["message"].as_str().unwrap().is_empty());
    }
    let wrong_type = reqwest::Client::new()
        .post(format!("{}/v2/s2s/event", h.url()))
        .header("x-api-key", KEY)
        .header("content-type", "text/plain")
        .body(deposit().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_type.status(), 400);
    let j: Value = wrong_type.json().await.unwrap();
    assert_eq!(j["error"], "unsupported_content_type");
    // A charset parameter is fine.
    let ok = reqwest::Client::new()
        .post(format!("{}/v2/s2s/event", h.url()))
        .header("x-api-key", KEY)
        .header("content-type", "application/json; charset=utf-8")
        .body(deposit().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(h.stats().accepted_events, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_400_answers_with_an_empty_body() {
    let h = start(|a| a.bare_400 = true).await;
    let r = event(&h, &unset(deposit(), "amount")).await;
    assert_eq!((r.status, r.text.as_str()), (400, ""));
    let r = send(&h, "/v2/s2s/batch", Some(KEY), "nonsense").await;
    assert_eq!((r.status, r.text.as_str()), (400, ""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_missing_keys_get_the_same_401_and_spend_no_budget() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "# partner keys\ndp_file_key_1\n\n  dp_file_key_2  \n").unwrap();
    let h = start(|a| {
        a.api_keys_file = Some(file);
        a.rate_limit = 2;
    })
    .await;
    let body = deposit().to_string();
    let missing = send(&h, "/v2/s2s/event", None, &body).await;
    let unknown = send(&h, "/v2/s2s/event", Some("dp_test_key_12"), &body).await;
    let longer = send(&h, "/v2/s2s/event", Some("dp_test_key_1234"), &body).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.text, unknown.text);
    assert_eq!(missing.text, longer.text);
    assert!(!missing.text.contains("dp_"), "{}", missing.text);
    for _ in 0..5 {
        assert_eq!(send(&h, "/v2/s2s/batch", Some("nope"), "[]").await.status, 401);
    }
    // Keys from the file work; 401s above did not spend any key's budget (limit 2).
    for key in [KEY, "dp_file_key_1", "dp_file_key_2"] {
        for _ in 0..2 {
            let r = send(&h, "/v2/s2s/event", Some(key), &body).await;
            assert_eq!(r.status, 200, "{key}: {}", r.text);
        }
    }
    assert_eq!(h.stats().by_status[&401], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_61st_request_in_a_minute_gets_429_with_retry_after() {
    let h = start(|_| {}).await;
    let mut statuses = Vec::new();
    for i in 0..61 {
        // Both endpoints count, and so do invalid requests.
        let r = match i % 3 {
            0 => event(&h, &set(deposit(), "transaction_id", json!(format!("tx_{i}")))).await,
            1 => batch(&h, &json!([set(deposit(), "transaction_id", json!(format!("tx_{i}")))])).await,
            _ => event(&h, &unset(deposit(), "amount")).await,
        };
        statuses.push(r.status);
        if i == 60 {
            assert_eq!(r.status, 429, "{}", r.text);
            assert_eq!(r.json()["error"], "rate_limited");
            let secs: u64 = r.retry_after.expect("Retry-After").parse().unwrap();
            assert!((1..=60).contains(&secs), "{secs}");
        }
    }
    assert!(statuses[..60].iter().all(|s| *s != 429), "{statuses:?}");
    // Another key has its own budget.
    let h2 = start(|a| {
        a.api_keys.push("dp_other".into());
        a.rate_limit = 1;
        a.no_retry_after = true;
    })
    .await;
    assert_eq!(
        send(&h2, "/v2/s2s/event", Some(KEY), &deposit().to_string())
            .await
            .status,
        200
    );
    let limited = send(&h2, "/v2/s2s/event", Some(KEY), &deposit().to_string()).await;
    assert_eq!((limited.status, limited.retry_after), (429, None));
    assert_eq!(
        send(&h2, "/v2/s2s/event", Some("dp_other"), &deposit().to_string())
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_zero_turns_it_off() {
    let h = start(|a| a.rate_limit = 0).await;
    for i in 0..100 {
        let r = event(&h, &set(deposit(), "transaction_id", json!(format!("tx_{i}")))).await;
        assert_eq!(r.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_faults_come_in_order_and_record_nothing() {
    let h = start(|a| {
        a.faults.script = "500,500,429,ok,timeout,400,401"
            .split(',')
            .map(|s| s.parse().unwrap())
            .collect();
        a.faults.timeout_hang = Some(Duration::from_millis(50));
    })
    .await;
    let mut got = Vec::new();
    for i in 0..8 {
        let r = batch(&h, &json!([set(deposit(), "transaction_id", json!(format!("tx_{i}")))])).await;
        if r.status == 429 {
            assert_eq!(r.retry_after.as_deref(), Some("1"));
        }
        if r.status != 200 {
            assert!(
                r.json()["message"].as_str().unwrap().contains("injected") || r.status == 401,
                "{}",
                r.text
            );
        }
        got.push(r.status);
    }
    assert_eq!(got, [500, 500, 429, 200, 504, 400, 401, 200]);
    let stats = h.stats();
    assert_eq!(stats.accepted_events, 2);
    assert_eq!(stats.injected_faults["500"], 2);
    assert_eq!(stats.by_status[&500], 2);
    assert_eq!(stats.requests, 8);
    let ids: Vec<Value> = h.events().iter().map(|e| e["transaction_id"].clone()).collect();
    assert_eq!(ids, [json!("tx_3"), json!("tx_7")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_probabilities_and_auth_fail_all_change_at_run_time() {
    let h = start(|a| a.faults.fault_500 = 1.0).await;
    assert_eq!(event(&h, &deposit()).await.status, 500);
    // Over HTTP: replace the faults.
    let client = reqwest::Client::new();
    let put = client
        .put(format!("{}/_sandbox/faults", h.url()))
        .json(&json!({"fault_400": 1.0, "latency": "5ms"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let current: Faults = serde_json::from_str(&admin_get(&h, "faults").await.text).unwrap();
    assert_eq!(current.fault_400, 1.0);
    assert_eq!(current.fault_500, 0.0);
    assert_eq!(current.latency, Duration::from_millis(5));
    let r = event(&h, &deposit()).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (400, Some("injected_fault")));
    // Bad settings are refused and change nothing.
    let bad = client
        .put(format!("{}/_sandbox/faults", h.url()))
        .json(&json!({"fault_500": 0.8, "fault_429": 0.8}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(h.faults().fault_400, 1.0);
    // In process.
    h.set_faults(Faults {
        auth_fail_all: true,
        ..Faults::default()
    })
    .unwrap();
    let r = event(&h, &deposit()).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (401, Some("unauthorized")));
    h.set_faults(Faults {
        script: vec![FaultStep::Timeout],
        ..Faults::default()
    })
    .unwrap();
    // Hang until the client gives up.
    let short = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = short
        .post(format!("{}/v2/s2s/event", h.url()))
        .header("x-api-key", KEY)
        .json(&deposit())
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(h
        .set_faults(Faults {
            fault_429: 2.0,
            ..Faults::default()
        })
        .is_err());
    h.set_faults(Faults::default()).unwrap();
    assert_eq!(event(&h, &deposit()).await.status, 200);
    assert_eq!(h.stats().accepted_events, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_events_reset_and_duplicates_over_the_admin_api() {
    let h = start(|_| {}).await;
    let mut events: Vec<Value> = (0..5)
        .map(|i| set(deposit(), "transaction_id", json!(format!("tx_{i}"))))
        .collect();
    events.push(set(deposit(), "transaction_id", json!("tx_1")));
    events.push(set(
        set(deposit(), "event_name", json!("login")),
        "timestamp",
        json!(1702963200123i64),
    ));
    assert_eq!(batch(&h, &Value::from(events.clone())).await.status, 200);
    assert_eq!(
        event(&h, &set(deposit(), "transaction_id", json!("tx_1"))).await.status,
        200
    );
    let stats: Stats = serde_json::from_str(&admin_get(&h, "stats").await.text).unwrap();
    assert_eq!(stats, h.stats());
    assert_eq!(stats.requests, 2);
    assert_eq!(stats.accepted_events, 8);
    assert_eq!(stats.by_event_name["deposit"], 7);
    assert_eq!(stats.by_event_name["login"], 1);
    assert_eq!(stats.by_status[&200], 2);
    assert_eq!(
        stats.duplicate_transaction_ids.len(),
        1,
        "{:?}",
        stats.duplicate_transaction_ids
    );
    assert_eq!(stats.duplicate_transaction_ids["tx_1"], 3);
    assert_eq!(stats.suspicious_timestamps.count, 1);
    assert_eq!(stats.suspicious_timestamps.examples[0].index, 6);
    // Milliseconds sent as seconds: thousands of years ahead, implausible as well.
    assert_eq!(stats.implausible_timestamps.count, 1);
    assert_eq!(stats.implausible_timestamps.examples[0].index, 6);

    let all: Vec<Value> = serde_json::from_str(&admin_get(&h, "events").await.text).unwrap();
    assert_eq!(all, h.events());
    assert_eq!(all.len(), 8);
    assert_eq!(all[..7], events[..]);
    let page: Vec<Value> = serde_json::from_str(&admin_get(&h, "events?offset=2&limit=3").await.text).unwrap();
    assert_eq!(page, all[2..5]);

    let spec = admin_get(&h, "openapi.yaml").await;
    assert_eq!(spec.text, include_str!("../docs/openapi.yaml"));

    let reset = reqwest::Client::new()
        .post(format!("{}/_sandbox/reset", h.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200);
    assert_eq!(h.stats(), Stats::default());
    assert_eq!(admin_get(&h, "events").await.text, "[]");
}

/// Events without a transaction id accepted again, however their keys are ordered and whichever
/// endpoint carried them, are counted in `/_sandbox/stats` with examples; distinct ones, keyed
/// repeats and rejected requests are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_keyless_events_accepted_twice_are_counted_over_the_admin_api() {
    let h = start(|_| {}).await;
    let login = r#"{"client_user_id":"user_001","event_name":"login","timestamp":1702963200,
        "click_id":"clk_1","ip_address":"203.0.113.1","campaign":"spring","user_agent":null}"#;
    // The same login, its keys in another order, `null` left out, sent alone to /event.
    let login_reordered = r#"{"campaign":"spring","ip_address":"203.0.113.1","click_id":"clk_1",
        "timestamp":1702963200,"event_name":"login","client_user_id":"user_001"}"#;
    let other_click = login.replace("clk_1", "clk_2");
    let register = login.replace("\"login\"", "\"register\"");
    let keyed = deposit().to_string();
    let body = format!("[{login},{other_click},{register},{keyed}]");
    assert_eq!(send(&h, "/v2/s2s/batch", Some(KEY), &body).await.status, 200);
    assert_eq!(
        h.stats().repeated_keyless_events,
        0,
        "distinct keyless events are no repeat"
    );

    let r = send(&h, "/v2/s2s/event", Some(KEY), login_reordered).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // A keyed repeat is a duplicate id, not a keyless repeat.
    assert_eq!(send(&h, "/v2/s2s/event", Some(KEY), &keyed).await.status, 200);
    // A rejected request records nothing, its repeat included.
    let rejected = format!("[{login},{}]", set(deposit(), "amount", json!("5")));
    assert_eq!(send(&h, "/v2/s2s/batch", Some(KEY), &rejected).await.status, 400);
    // The login a third time and the registration again, in one batch.
    let body = format!("[{login},{register}]");
    assert_eq!(send(&h, "/v2/s2s/batch", Some(KEY), &body).await.status, 200);

    let stats: Stats = serde_json::from_str(&admin_get(&h, "stats").await.text).unwrap();
    assert_eq!(stats, h.stats());
    assert_eq!(stats.accepted_events, 8);
    assert_eq!(stats.repeated_keyless_events, 3, "{stats:?}");
    assert_eq!(stats.duplicate_transaction_ids["tx_554433"], 2);
    let places: Vec<(u64, u64)> = stats
        .repeated_keyless_examples
        .iter()
        .map(|e| (e.index, e.first_index))
        .collect();
    assert_eq!(places, [(4, 0), (6, 0), (7, 2)]);
    let log = h.events();
    for ex in &stats.repeated_keyless_examples {
        assert_eq!(ex.event, log[ex.index as usize], "the example is the logged event");
        assert_eq!(log[ex.first_index as usize], log[ex.index as usize]);
    }
    assert_eq!(stats.repeated_keyless_examples[0].event["click_id"], "clk_1");
    assert!(stats.repeated_keyless_examples[0].event.get("user_agent").is_none());

    let reset = reqwest::Client::new()
        .post(format!("{}/_sandbox/reset", h.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200);
    assert_eq!(send(&h, "/v2/s2s/event", Some(KEY), login).await.status, 200);
    assert_eq!(h.stats().repeated_keyless_events, 0, "reset forgets what was accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_the_admin_prefix_and_partner_keys_do_not_open_it() {
    let h = start(|a| a.admin_token = Some("adm_secret".into())).await;
    let client = reqwest::Client::new();
    let url = format!("{}/_sandbox/stats", h.url());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        client.get(&url).header("x-api-key", KEY).send().await.unwrap().status(),
        401
    );
    let wrong = client
        .get(&url)
        .header("x-admin-token", "adm_secreT")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let put = client
        .put(format!("{}/_sandbox/faults", h.url()))
        .json(&json!({"auth_fail_all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 401);
    assert!(!h.faults().auth_fail_all);
    let ok = client
        .get(&url)
        .header("X-Admin-Token", "adm_secret")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_file_gets_every_accepted_event_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("accepted.jsonl");
    let h = start(|a| {
        a.record = Some(path.clone());
        a.rate_limit = 0;
    })
    .await;
    for i in 0..20 {
        let events: Vec<Value> = (0..10)
            .map(|j| set(deposit(), "transaction_id", json!(format!("tx_{i}_{j}"))))
            .collect();
        assert_eq!(batch(&h, &Value::from(events)).await.status, 200);
    }
    assert_eq!(event(&h, &unset(deposit(), "amount")).await.status, 400);
    let in_memory = h.events();
    h.shutdown().await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 200);
    assert_eq!(lines, in_memory);
    assert_eq!(lines[199]["transaction_id"], "tx_19_9");
}

#[test]
fn the_binary_prints_its_address_and_serves() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_datapulse-bridge"))
        .args(["sandbox", "--listen", "127.0.0.1:0", "--api-key", KEY])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("sandbox listening on http://")
        .expect(&line)
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("http://{addr}/v2/s2s/event"))
            .header("x-api-key", KEY)
            .json(&deposit())
            .send()
            .await
            .unwrap()
            .status()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_click_ip_requires_them_on_every_event() {
    let lenient = start(|_| {}).await;
    assert_eq!(event(&lenient, &bet()).await.status, 200);
    let strict = start(|a| a.strict_click_ip = true).await;
    let r = event(&strict, &bet()).await;
    assert_eq!(r.status, 400);
    let fields: Vec<String> = r.json()["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["rule"] == "click_id_ip_address")
        .map(|e| e["field"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(fields, ["click_id", "ip_address"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_refuses_unusable_settings() {
    let no_key = sandbox::start(SandboxArgs {
        listen: "127.0.0.1:0".into(),
        ..SandboxArgs::default()
    })
    .await;
    assert!(matches!(no_key, Err(SandboxError::NoKey)), "{:?}", no_key.err());
    let mut bad_faults = SandboxArgs {
        listen: "127.0.0.1:0".into(),
        api_keys: vec![KEY.into()],
        ..SandboxArgs::default()
    };
    bad_faults.faults.fault_500 = 1.5;
    let err = sandbox::start(bad_faults).await.err().unwrap();
    assert!(
        matches!(&err, SandboxError::Faults(p) if p[..] == [FaultProblem::NotAProbability { name: "fault_500", value: 1.5 }]),
        "{err}"
    );
    let missing_file = sandbox::start(SandboxArgs {
        listen: "127.0.0.1:0".into(),
        api_keys_file: Some("/nonexistent/keys".into()),
        ..SandboxArgs::default()
    })
    .await;
    let err = missing_file.err().unwrap();
    assert!(
        matches!(&err, SandboxError::KeysFile { path, source }
            if path.to_str() == Some("/nonexistent/keys") && source.kind() == std::io::ErrorKind::NotFound),
        "{err}"
    );
}

/// The faults of issue 18, as a client sees them over HTTP: a gateway's body limit (413 before the
/// key is checked, nothing counted), a 503 window with `Retry-After` in both forms and a `Date` on
/// the sandbox's offset clock, a 502 that counted the batch, a 504 that did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_faults_413_503_502_504() {
    let h = start(|_| {}).await;
    h.set_faults(Faults {
        body_limit: Some(64),
        ..Faults::default()
    })
    .unwrap();
    let big = json!([deposit()]).to_string();
    assert!(big.len() > 64);
    let r = send(&h, "/v2/s2s/batch", None, &big).await;
    assert_eq!(r.status, 413, "before the key is checked: {}", r.text);
    assert_eq!(h.stats().accepted_events, 0);

    h.set_faults(Faults {
        unavailable_for: Some(Duration::from_secs(30)),
        ..Faults::default()
    })
    .unwrap();
    let r = batch(&h, &json!([deposit()])).await;
    assert_eq!(r.status, 503);
    let secs: u64 = r.retry_after.as_deref().unwrap().parse().unwrap();
    assert!((29..=30).contains(&secs), "{secs}");
    h.set_faults(Faults {
        unavailable_for: Some(Duration::from_secs(30)),
        retry_after_date: true,
        clock_offset_s: -600,
        ..Faults::default()
    })
    .unwrap();
    let resp = reqwest::Client::new()
        .post(format!("{}/v2/s2s/batch", h.url()))
        .header("x-api-key", KEY)
        .json(&json!([deposit()]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let header = |n: &str| httpdate::parse_http_date(resp.headers()[n].to_str().unwrap()).unwrap();
    let (date, until) = (header("date"), header("retry-after"));
    let wait = until.duration_since(date).unwrap();
    assert!((30..=32).contains(&wait.as_secs()), "{wait:?} after the answer's Date");
    let behind = std::time::SystemTime::now().duration_since(date).unwrap();
    assert!(
        (595..=605).contains(&behind.as_secs()),
        "the Date is 10 minutes behind: {behind:?}"
    );
    assert_eq!(h.stats().accepted_events, 0);

    h.set_faults(Faults {
        script: vec![FaultStep::Status502, FaultStep::Status504],
        ..Faults::default()
    })
    .unwrap();
    assert_eq!(batch(&h, &json!([deposit()])).await.status, 502);
    assert_eq!(h.stats().accepted_events, 1, "a 502 after the API counted the batch");
    assert_eq!(
        batch(&h, &json!([set(deposit(), "transaction_id", json!("t-504"))]))
            .await
            .status,
        504
    );
    assert_eq!(h.stats().accepted_events, 1, "a 504 before it");
}

/// The sandbox keeps amounts as it received them (exact decimals): `50.00` reads back as `50.00`,
/// a decimal longer than a double holds keeps every digit, through both endpoints and the event
/// log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amounts_are_kept_as_received() {
    let h = start(|_| {}).await;
    let body = r#"[{"client_user_id":"u1","event_name":"deposit","transaction_id":"x1","timestamp":1702963200,"amount":50.00,"currency":"USD","click_id":"c1","ip_address":"203.0.113.1"},
        {"client_user_id":"u1","event_name":"bet","transaction_id":"x2","timestamp":1702963200,"amount":9007199254740993.25,"currency":"USD","bet_result":"win","bet_result_amount":12.50}]"#;
    let r = send(&h, "/v2/s2s/batch", Some(KEY), body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let one = r#"{"client_user_id":"u1","event_name":"withdraw","transaction_id":"x3","timestamp":1702963200,"amount":0.10,"currency":"EUR","click_id":"c1","ip_address":"203.0.113.1"}"#;
    assert_eq!(send(&h, "/v2/s2s/event", Some(KEY), one).await.status, 200);
    let log = admin_get(&h, "events").await.text;
    for exact in [
        r#""amount":50.00"#,
        r#""amount":9007199254740993.25"#,
        r#""bet_result_amount":12.50"#,
        r#""amount":0.10"#,
    ] {
        assert!(log.contains(exact), "{exact} in {log}");
    }
}
