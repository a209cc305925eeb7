//! The four scenarios of issue 18 (delivery decisions), end to end: the built binary against a
//! tansu broker and the sandbox over HTTP. Each accounts for every record: the sandbox's record of
//! what it accepted (no id twice), the dead-letter topic, the bridge's outcome counters and the
//! group's committed offsets.

mod common;
mod ops_support;
use common::*;
use ops_support::*;
use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const MIN: Duration = Duration::from_secs(60);

/// Unlimited budget, short backoff: the faults shape these runs.
const FAST: &str = r#"
[delivery]
rate_limit = 100000
rate_window = "1s"
rate_burst = 1000
retry_backoff_initial = "100ms"
retry_backoff_max = "1s"
auth_retry_interval = "1s"
"#;

/// Waits until the bridge is ready (the start-up key probe answered, partitions assigned).
async fn ready(bridge: &Bridge) {
    wait_until(MIN, "bridge ready", || async { bridge.ready().await.0 == 200 }).await;
}

async fn committed_at(broker: &Broker, group: &str, ends: Vec<i64>) {
    let partitions = ends.len() as i32;
    wait_until(MIN, &format!("committed at {ends:?}"), || async {
        broker.committed(group, "tx", partitions) == ends
    })
    .await;
}

/// Scenario 1: the API counts the first batch at once and answers after 4 s, past the 2 s request
/// timeout. Its 50 ids are in doubt: dead-lettered as `in_doubt`, never sent again; the other 150
/// are delivered; no id is accepted twice; a later copy of an id in doubt is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_after_the_timeout_leaves_its_batch_in_doubt_and_never_resends_it() {
    let dir = workdir("ddoubt");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 1).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    let cfg = bridge_config(&broker, &sandbox.url, "g-ddoubt", "tx", FAST)
        .replace("max_events = 500", "max_events = 50")
        .replace("request_timeout = \"5s\"", "request_timeout = \"2s\"");
    assert!(cfg.contains("max_events = 50\n") && cfg.contains("request_timeout = \"2s\""));
    let bridge = Bridge::start(&dir, "bridge", &cfg);
    ready(&bridge).await;
    sandbox
        .set_faults(json!({"script": ["slow"], "slow_answer": "4s"}))
        .await;
    let records = deposits("q", 200, 1);
    broker.produce("tx", &records).await;

    committed_at(&broker, "g-ddoubt", vec![200]).await;
    let dead = broker.read_all("tx.dlq", 50, Duration::from_secs(30));
    assert_eq!(dead.len(), 50, "the first batch's 50 records dead-lettered");
    for d in &dead {
        assert_eq!(header(d, "dp.stage"), "api");
        assert_eq!(header(d, "dp.reason"), "in_doubt", "{}", header(d, "dp.error"));
        assert!(header(d, "dp.error").contains("no answer"), "{}", header(d, "dp.error"));
    }
    let doubted: HashSet<String> = dead.iter().map(key_of).collect();
    let first: HashSet<String> = records[..50].iter().map(|(_, k, _)| k.clone()).collect();
    assert_eq!(doubted, first, "only the ids of the request without an answer");
    // Give a wrongly resent batch time to arrive (the slow answer ends 4 s after the request).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), 200, "the API counted the first batch and the 150 others");
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "accepted twice: {twice:?}");
    wait_until(MIN, "the counters settle", || async {
        Outcomes::of(&bridge.metrics().await).in_flight == 0.0
    })
    .await;
    let m = bridge.metrics().await;
    let o = Outcomes::of(&m);
    assert_eq!(
        (o.consumed, o.delivered, o.dead_lettered, o.duplicate),
        (200.0, 150.0, 50.0, 0.0)
    );
    assert_eq!(
        metric_sum(&m, "datapulse_bridge_delivery_events_in_doubt_total", &[]),
        50.0
    );
    assert_eq!(
        metric_sum(&m, "datapulse_bridge_api_decisions_total", &["decision=\"in_doubt\""]),
        1.0
    );

    // A copy of an id in doubt is a duplicate (the memory store remembers the doubt).
    broker.produce("tx", &records[..1]).await;
    committed_at(&broker, "g-ddoubt", vec![201]).await;
    wait_until(MIN, "the copy finished as a duplicate", || async {
        let o = Outcomes::of(&bridge.metrics().await);
        o.duplicate == 1.0 && o.in_flight == 0.0
    })
    .await;
    assert_eq!(accepted_ids(&sandbox).await[&records[0].1], 1);

    // A 504 (the gateway timed out before the API counted anything) leaves one more batch in
    // doubt. The operator finds those ids missing in DataPulse and replays their dead letters: the
    // bridge (memory store) forgets the doubt when it reads a replayed record, and sends each once.
    sandbox.set_faults(json!({"script": ["504"]})).await;
    let more = deposits("r", 10, 1);
    broker.produce("tx", &more).await;
    let dead = broker.read_all("tx.dlq", 60, Duration::from_secs(30));
    let lost: Vec<_> = dead.iter().filter(|d| key_of(d).starts_with("r-")).collect();
    assert_eq!(lost.len(), 10, "the 504's batch in doubt");
    assert!(lost.iter().all(|d| header(d, "dp.http_status") == "504"));
    let mut args = vec!["replay".to_string(), "--reason".into(), "in_doubt".into()];
    for d in &lost {
        args.push("--record".into());
        args.push(format!("tx/0/{}", header(d, "dp.source.offset")));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = bridge.dlq(&args);
    assert!(ok && out.contains("10 dead letters replayed"), "{out}");
    wait_until(MIN, "the replayed ids accepted", || async {
        let ids = accepted_ids(&sandbox).await;
        more.iter().all(|(_, k, _)| ids.contains_key(k))
    })
    .await;
    committed_at(&broker, "g-ddoubt", vec![221]).await;
    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), 210);
    assert!(ids.values().all(|&n| n == 1), "none twice");
    assert!(!bridge.proc.log_text().contains(API_KEY));
}

/// Scenario 2: 1,000 deposits of about 1 KB each, default batch limits (about 495 KB a request),
/// behind a gateway that refuses bodies over 256 KiB with 413. The bridge splits, learns the
/// limit (shown by a gauge) and delivers everything once; nothing stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_body_limit_splits_requests_and_is_learned() {
    const LIMIT: u64 = 256 * 1024;
    let dir = workdir("d413");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 1).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &["--body-limit", &LIMIT.to_string()]);
    let pad = "x".repeat(800);
    let records: Vec<(i32, String, String)> = (0..1000)
        .map(|i| {
            let tx = format!("big-{i}");
            let mut v: serde_json::Value = serde_json::from_str(&deposit(&tx, i)).unwrap();
            v["meta"] = json!({ "note": pad });
            (0, tx, v.to_string())
        })
        .collect();
    let cfg = bridge_config(&broker, &sandbox.url, "g-d413", "tx", FAST)
        .replace(
            "ip_address = \"/ip\"\n",
            "ip_address = \"/ip\"\nproperties = { from = \"/meta\" }\n",
        )
        .replace("linger = \"100ms\"", "linger = \"2s\"");
    assert!(cfg.contains("properties = { from"));
    broker.produce("tx", &records).await;
    let bridge = Bridge::start(&dir, "bridge", &cfg);

    wait_until(2 * MIN, "1,000 accepted", || async { sandbox.accepted().await >= 1000 }).await;
    committed_at(&broker, "g-d413", vec![1000]).await;
    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), 1000);
    assert!(ids.values().all(|&n| n == 1), "none twice");
    let stats = sandbox.stats().await;
    let refused = by_status(&stats, 413);
    assert!(refused >= 1, "the gateway refused a body: {stats}");
    let m = bridge.metrics().await;
    let learned = metric_sum(&m, "datapulse_bridge_api_body_limit_bytes", &[]);
    assert!(
        learned > 0.0 && learned <= LIMIT as f64,
        "the learned limit {learned} is a body the gateway accepted"
    );
    // Learned once, requests are cut to it: few 413s, not one per batch.
    assert!(refused <= 3, "{refused} requests refused as too large: {stats}");
    let o = Outcomes::of(&m);
    assert_eq!((o.delivered, o.dead_lettered, o.in_flight), (1000.0, 0.0, 0.0));
    eprintln!("413: {refused} refused, learned limit {learned} bytes, sandbox {stats}");
}

/// Scenario 2, the lone event: an event whose request alone is over the gateway's limit is
/// dead-lettered as `payload_too_large`; the others are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_alone_is_dead_lettered() {
    let dir = workdir("d413one");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 1).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &["--body-limit", "4096"]);
    let mut records = deposits("s", 20, 1);
    let mut huge: serde_json::Value = serde_json::from_str(&deposit("huge-1", 77)).unwrap();
    huge["meta"] = json!({ "note": "y".repeat(6000) });
    records.insert(7, (0, "huge-1".into(), huge.to_string()));
    let cfg = bridge_config(&broker, &sandbox.url, "g-d413one", "tx", FAST)
        .replace(
            "ip_address = \"/ip\"\n",
            "ip_address = \"/ip\"\nproperties = { from = \"/meta\" }\n",
        )
        .replace("linger = \"100ms\"", "linger = \"2s\"");
    broker.produce("tx", &records).await;
    let bridge = Bridge::start(&dir, "bridge", &cfg);
    committed_at(&broker, "g-d413one", vec![21]).await;
    let dead = broker.read_all("tx.dlq", 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    assert_eq!(key_of(&dead[0]), "huge-1");
    assert_eq!(header(&dead[0], "dp.stage"), "api");
    assert_eq!(header(&dead[0], "dp.reason"), "payload_too_large");
    assert_eq!(header(&dead[0], "dp.http_status"), "413");
    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), 20);
    assert!(ids.values().all(|&n| n == 1));
    let o = Outcomes::of(&bridge.metrics().await);
    assert_eq!((o.delivered, o.dead_lettered, o.in_flight), (20.0, 1.0, 0.0));
}

/// One `unavailable_for` window of 8 s: how many 503s the bridge met and when the first request
/// after the window was accepted, from when the faults were set.
async fn window(broker: &Broker, sandbox: &Sandbox, prefix: &str, faults: serde_json::Value) -> (u64, Duration) {
    let before = sandbox.stats().await;
    let accepted_before = sandbox.accepted().await;
    let t0 = Instant::now();
    sandbox.set_faults(faults).await;
    broker.produce("tx", &deposits(prefix, 100, 2)).await;
    let mut first_ok = None;
    while t0.elapsed() < Duration::from_secs(30) {
        if sandbox.accepted().await > accepted_before {
            first_ok = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = sandbox.stats().await;
    let refused = by_status(&after, 503) - by_status(&before, 503);
    (refused, first_ok.expect("a request accepted after the window"))
}

/// Scenario 3: 503 with `Retry-After` for 8 s. Two lanes share the key: after the first 503 no
/// request goes until the window ends (at most one 503 a lane, the answers that told them), and
/// the next follows within about two seconds. Both forms of `Retry-After`: seconds, and a date
/// judged against the answer's own `Date` from a server whose clock is 5 minutes behind or ahead
/// of the bridge's (judged against the bridge's clock, "behind" would hammer and "ahead" would
/// wait 5 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_503_holds_every_lane_until_the_window_ends() {
    let dir = workdir("d503");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 2).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    let cfg = bridge_config(
        &broker,
        &sandbox.url,
        "g-d503",
        "tx",
        &format!("{FAST}concurrency = 2\n"),
    );
    let bridge = Bridge::start(&dir, "bridge", &cfg);
    ready(&bridge).await;
    let warm = deposits("w", 10, 2);
    broker.produce("tx", &warm).await;
    committed_at(&broker, "g-d503", vec![5, 5]).await;

    let mut produced = 10;
    for (prefix, faults) in [
        ("sec", json!({"unavailable_for": "8s"})),
        (
            "behind",
            json!({"unavailable_for": "8s", "retry_after_date": true, "clock_offset_s": -300}),
        ),
        (
            "ahead",
            json!({"unavailable_for": "8s", "retry_after_date": true, "clock_offset_s": 300}),
        ),
    ] {
        let (refused, first_ok) = window(&broker, &sandbox, prefix, faults).await;
        eprintln!("503 window ({prefix}): {refused} answered 503, first accepted after {first_ok:?}");
        assert!(refused >= 1, "{prefix}: the window was met");
        assert!(
            refused <= 2,
            "{prefix}: {refused} requests inside the window (two lanes)"
        );
        assert!(
            first_ok >= Duration::from_secs(8),
            "{prefix}: accepted inside the window"
        );
        assert!(
            first_ok <= Duration::from_millis(11_500),
            "{prefix}: the next request came {first_ok:?} after the window began"
        );
        produced += 100;
        committed_at(&broker, "g-d503", vec![produced / 2, produced / 2]).await;
    }
    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), 310);
    assert!(ids.values().all(|&n| n == 1));
    let o = Outcomes::of(&bridge.metrics().await);
    assert_eq!((o.delivered, o.dead_lettered), (310.0, 0.0));
}

/// Scenario 4: a base URL with a wrong path (404 to every request). Delivery halts: unready with a
/// condition naming the status and the URL's path (never the key), nothing accepted, dead-lettered
/// or committed, a slow probe. Fixed (a restart with the right URL), everything is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_path_halts_delivery_and_nothing_moves() {
    let dir = workdir("d404");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 2).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    let records = deposits("p", 200, 2);
    broker.produce("tx", &records).await;
    let wrong = format!("{}/wrong", sandbox.url);
    let cfg = bridge_config(&broker, &wrong, "g-d404", "tx", FAST);
    let mut bridge = Bridge::start(&dir, "bridge", &cfg);
    wait_until(MIN, "unready naming the endpoint", || async {
        let (s, body) = bridge.ready().await;
        s == 503 && body["conditions"]["api_endpoint"]["ok"] == json!(false)
    })
    .await;
    wait_until(MIN, "the records read", || async {
        Outcomes::of(&bridge.metrics().await).consumed == 200.0
    })
    .await;
    // The sandbox's fallback route does not count requests: the bridge's own counter does.
    let answered_404 = |m: &str| metric_sum(m, "datapulse_bridge_api_requests_total", &["status=\"404\""]);
    let t0 = Instant::now();
    let before = answered_404(&bridge.metrics().await);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let probes = answered_404(&bridge.metrics().await) - before;
    let (_, body) = bridge.ready().await;
    let reason = body["conditions"]["api_endpoint"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("404") && reason.contains("/wrong/v2/s2s/batch"),
        "{body}"
    );
    assert!(!body.to_string().contains(API_KEY), "no key in readiness");
    // One lane, probing every auth_retry_interval (1 s).
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        probes >= 2.0 && probes <= secs + 2.0,
        "{probes} probes in {secs:.1} s: a slow probe, not a retry storm"
    );
    assert_eq!(sandbox.accepted().await, 0);
    let m = bridge.metrics().await;
    let o = Outcomes::of(&m);
    assert_eq!((o.delivered, o.dead_lettered, o.in_flight), (0.0, 0.0, 200.0));
    assert_eq!(metric_sum(&m, "datapulse_bridge_api_endpoint_halted", &[]), 1.0);
    assert!(broker.committed("g-d404", "tx", 2).iter().all(|&c| c <= 0));
    assert!(broker.read_all("tx.dlq", 1, Duration::from_secs(3)).is_empty());
    let log = bridge.proc.log_text();
    assert!(!log.contains(API_KEY));
    assert!(log.contains("does not answer at the configured URL"), "{log}");

    bridge.proc.terminate(Duration::from_secs(20));
    let fixed = bridge_config(&broker, &sandbox.url, "g-d404", "tx", FAST);
    let bridge = Bridge::start(&dir, "fixed", &fixed);
    committed_at(&broker, "g-d404", ends_of(&records, 2)).await;
    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), 200);
    assert!(ids.values().all(|&n| n == 1));
    ready(&bridge).await;
}

/// Scenario 4, healing by itself: an ingress answers 404 for a while (a deploy); delivery halts,
/// then resumes on its own when the API answers again, with everything delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_during_a_deploy_heals_by_itself() {
    let dir = workdir("d404heal");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 1).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    let cfg = bridge_config(&broker, &sandbox.url, "g-d404heal", "tx", FAST);
    let bridge = Bridge::start(&dir, "bridge", &cfg);
    ready(&bridge).await;
    sandbox.set_faults(json!({"script": ["404", "404", "404"]})).await;
    let records = deposits("h", 100, 1);
    broker.produce("tx", &records).await;
    wait_until(MIN, "halted", || async {
        bridge.ready().await.1["conditions"]["api_endpoint"]["ok"] == json!(false)
    })
    .await;
    committed_at(&broker, "g-d404heal", vec![100]).await;
    ready(&bridge).await;
    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), 100);
    assert!(ids.values().all(|&n| n == 1));
    assert!(broker.read_all("tx.dlq", 1, Duration::from_secs(3)).is_empty());
    assert!(bridge.proc.log_text().contains("answers at the configured URL again"));
}
