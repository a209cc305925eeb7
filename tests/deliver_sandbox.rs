//! Delivery against the project's sandbox over real HTTP on 127.0.0.1: 429 storms, 5xx bursts,
//! timeouts, and isolation of bad events answered 400.

mod deliver_common;

use datapulse_bridge::deliver::{DeliveryConfig, EventResult, OnAmbiguous};
use datapulse_bridge::sandbox::{FaultStep, Faults};
use deliver_common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn all_delivered(results: &[EventResult]) -> bool {
    results.iter().all(|r| *r == EventResult::Delivered)
}

#[tokio::test]
async fn a_429_with_retry_after_pauses_the_whole_key() {
    // The first request gets 429 with Retry-After: 1. A second delivery that starts during the
    // pause must not reach the API before the pause ends.
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    sb.set_faults(Faults {
        script: vec![FaultStep::Status429],
        ..Faults::default()
    })
    .unwrap();
    let d = Arc::new(deliverer(&api(&sb.url(), Duration::from_secs(2)), &delivery()));
    let cancel = CancellationToken::new();
    let start = Instant::now();
    let a = {
        let (d, c) = (d.clone(), cancel.clone());
        tokio::spawn(async move { d.deliver(&deposits("a", 10, &[]), &c).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let b_start = Instant::now();
    let b = d.deliver(&deposits("b", 10, &[]), &cancel).await.unwrap();
    let b_took = b_start.elapsed();
    let a = a.await.unwrap().unwrap();
    assert!(all_delivered(&a) && all_delivered(&b));
    let stats = sb.stats();
    assert_eq!(stats.by_status.get(&429), Some(&1), "{stats:?}");
    assert_eq!(
        stats.requests, 3,
        "the second delivery waited for the pause instead of trying: {stats:?}"
    );
    assert_eq!(stats.accepted_events, 20);
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "Retry-After: 1 not honoured"
    );
    assert!(
        b_took >= Duration::from_millis(750),
        "b ran during the pause: {b_took:?}"
    );
}

/// Five concurrent senders that believe they may send 1000 requests a second, against a sandbox
/// allowing 4 per 2 s: every event arrives exactly once, and the key pauses as a whole, so the
/// number of 429s stays near the number of concurrent senders per pause.
async fn storm(retry_after: bool) -> (u64, u64, Duration) {
    let sb = sandbox(4, Duration::from_secs(2), |a| a.no_retry_after = !retry_after).await;
    let cfg = DeliveryConfig {
        retry_backoff_initial: Duration::from_millis(100),
        retry_backoff_max: Duration::from_secs(1),
        ..delivery()
    };
    let d = Arc::new(deliverer(&api(&sb.url(), Duration::from_secs(2)), &cfg));
    let cancel = CancellationToken::new();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..5 {
        let (d, c) = (d.clone(), cancel.clone());
        tasks.push(tokio::spawn(async move {
            for b in 0..2 {
                let r = d.deliver(&deposits(&format!("s{t}-{b}"), 20, &[]), &c).await.unwrap();
                assert!(all_delivered(&r));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = start.elapsed();
    let stats = sb.stats();
    assert_eq!(stats.accepted_events, 200, "{stats:?}");
    assert!(stats.duplicate_transaction_ids.is_empty(), "{stats:?}");
    let n429 = stats.by_status.get(&429).copied().unwrap_or(0);
    assert!(n429 > 0, "the storm produced no 429: {stats:?}");
    (n429, stats.requests, took)
}

#[tokio::test]
async fn a_429_storm_with_retry_after_delivers_everything_once() {
    let (n429, requests, took) = storm(true).await;
    eprintln!("429 storm with Retry-After: {requests} requests, {n429} answered 429, {took:?}");
    // 10 accepted requests at 4 per 2 s take at least 3 s.
    assert!(took >= Duration::from_secs(3));
    assert!(n429 <= 25, "{n429} 429s: the key did not pause as a whole");
}

#[tokio::test]
async fn a_429_storm_without_retry_after_backs_off_and_delivers_everything_once() {
    let (n429, requests, took) = storm(false).await;
    eprintln!("429 storm without Retry-After: {requests} requests, {n429} answered 429, {took:?}");
    assert!(took >= Duration::from_secs(3));
    assert!(n429 <= 60, "{n429} 429s: no backoff");
}

#[tokio::test]
async fn a_500_burst_is_retried_until_delivered() {
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    sb.set_faults(Faults {
        script: vec![FaultStep::Status500; 5],
        ..Faults::default()
    })
    .unwrap();
    let d = deliverer(&api(&sb.url(), Duration::from_secs(2)), &delivery());
    let r = d
        .deliver(&deposits("f", 50, &[]), &CancellationToken::new())
        .await
        .unwrap();
    assert!(all_delivered(&r));
    let stats = sb.stats();
    assert_eq!(stats.by_status.get(&500), Some(&5));
    assert_eq!(stats.requests, 6);
    assert_eq!(stats.accepted_events, 50);
}

/// By default a request without an answer is in doubt: its events are never sent again.
#[tokio::test]
async fn a_timeout_leaves_the_request_in_doubt() {
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    sb.set_faults(Faults {
        script: vec![FaultStep::Slow],
        slow_answer: Some(Duration::from_secs(2)),
        ..Faults::default()
    })
    .unwrap();
    let d = deliverer(&api(&sb.url(), Duration::from_millis(300)), &delivery());
    let r = d
        .deliver(&deposits("t", 30, &[]), &CancellationToken::new())
        .await
        .unwrap();
    assert!(
        r.iter().all(|r| matches!(r, EventResult::InDoubt { status: None, .. })),
        "{r:?}"
    );
    // The API counted the batch (the answer came too late): it was not sent again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = sb.stats();
    assert_eq!((stats.requests, stats.accepted_events), (1, 30));
}

/// 502 (a gateway lost the answer) is ambiguous; 504 too; with `resend` they are sent again.
#[tokio::test]
async fn gateway_errors_are_in_doubt_or_resent() {
    for step in [FaultStep::Status502, FaultStep::Status504] {
        let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
        sb.set_faults(Faults {
            script: vec![step],
            ..Faults::default()
        })
        .unwrap();
        let d = deliverer(&api(&sb.url(), Duration::from_secs(2)), &delivery());
        let r = d
            .deliver(&deposits("g", 5, &[]), &CancellationToken::new())
            .await
            .unwrap();
        let status = if step == FaultStep::Status502 { 502 } else { 504 };
        assert!(
            r.iter()
                .all(|r| matches!(r, EventResult::InDoubt { status: Some(s), .. } if *s == status)),
            "{r:?}"
        );
        assert_eq!(sb.stats().requests, 1);
        // The 502 was counted, the 504 not: what an operator finds in DataPulse.
        assert_eq!(sb.stats().accepted_events, if status == 502 { 5 } else { 0 });
    }
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    sb.set_faults(Faults {
        script: vec![FaultStep::Status504],
        ..Faults::default()
    })
    .unwrap();
    let resend = DeliveryConfig {
        on_ambiguous: Some(OnAmbiguous::Resend),
        ..delivery()
    };
    let t = datapulse_bridge::telemetry::Telemetry::new();
    let d = deliverer_in(&api(&sb.url(), Duration::from_secs(2)), &resend, &t);
    let r = d
        .deliver(&deposits("g", 5, &[]), &CancellationToken::new())
        .await
        .unwrap();
    assert!(all_delivered(&r));
    assert_eq!((sb.stats().requests, sb.stats().accepted_events), (2, 5));
    // The resend of a gateway's answer is counted as its own class, apart from the API's 500s.
    let metrics = t.render();
    assert!(
        metrics.contains("datapulse_bridge_api_retries_total{cause=\"ambiguous\"} 1"),
        "{metrics}"
    );
}

/// Ambiguous answers in a row pause the key, doubling with the streak: an outage behind a
/// gateway (every answer a 502) dead-letters a few requests' events, not the stream. Any answer
/// of the API ends the streak.
#[tokio::test]
async fn ambiguous_answers_in_a_row_pause_the_key() {
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    sb.set_faults(Faults {
        script: vec![FaultStep::Status504; 4],
        ..Faults::default()
    })
    .unwrap();
    let slow = DeliveryConfig {
        retry_backoff_initial: Duration::from_millis(400),
        retry_backoff_max: Duration::from_secs(2),
        ..delivery()
    };
    let d = deliverer(&api(&sb.url(), Duration::from_secs(2)), &slow);
    let mut at = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..5 {
        let r = d
            .deliver(&deposits(&format!("s{i}"), 1, &[]), &CancellationToken::new())
            .await
            .unwrap();
        at.push((started.elapsed(), matches!(r[0], EventResult::InDoubt { .. })));
    }
    let in_doubt: Vec<bool> = at.iter().map(|a| a.1).collect();
    assert_eq!(in_doubt, [true, true, true, true, false], "{at:?}");
    // The second request goes at once; the third waits the streak's pause (400 ms), the fourth
    // 800 ms, the fifth 1.6 s: at least 2.8 s in all, where five requests take milliseconds.
    assert!(at[1].0 < Duration::from_millis(300), "{at:?}");
    assert!(at[4].0 >= Duration::from_millis(2_800), "{at:?}");
    assert_eq!(sb.stats().requests, 5);
}

/// A connection refused is not sent: retried until the API is there, never in doubt.
#[tokio::test]
async fn a_refused_connection_is_retried_not_in_doubt() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let d = deliverer(
        &api(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2)),
        &delivery(),
    );
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.cancel();
    });
    let r = d.deliver(&deposits("n", 3, &[]), &cancel).await;
    assert_eq!(
        r,
        Err(datapulse_bridge::deliver::Interrupted {
            may_have_been_counted: false
        })
    );
}

/// A server that reads the whole request and closes the connection without an answer: the API
/// may have counted it, so it is in doubt (not retried).
#[tokio::test]
async fn a_connection_closed_after_the_request_is_in_doubt() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let s = served.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            s.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = Vec::new();
            // Read the head and the whole body (Content-Length), then close.
            loop {
                let n = sock.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if got.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            drop(sock);
        }
    });
    let d = deliverer(&api(&url, Duration::from_secs(2)), &delivery());
    let r = d
        .deliver(&deposits("z", 4, &[]), &CancellationToken::new())
        .await
        .unwrap();
    assert!(
        r.iter().all(|r| matches!(r, EventResult::InDoubt { status: None, .. })),
        "{r:?}"
    );
    assert_eq!(served.load(std::sync::atomic::Ordering::Relaxed), 1, "not sent again");
}

/// Under `resend`, a request without an answer is sent again until delivered.
#[tokio::test]
async fn timeouts_are_retried_until_delivered_under_resend() {
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    sb.set_faults(Faults {
        script: vec![FaultStep::Timeout, FaultStep::Timeout],
        ..Faults::default()
    })
    .unwrap();
    let resend = DeliveryConfig {
        on_ambiguous: Some(OnAmbiguous::Resend),
        ..delivery()
    };
    let d = deliverer(&api(&sb.url(), Duration::from_millis(300)), &resend);
    let start = Instant::now();
    let r = d
        .deliver(&deposits("t", 30, &[]), &CancellationToken::new())
        .await
        .unwrap();
    assert!(all_delivered(&r));
    assert!(start.elapsed() >= Duration::from_millis(600), "two timeouts of 300 ms");
    let stats = sb.stats();
    assert_eq!(stats.requests, 3);
    assert_eq!(stats.accepted_events, 30);
}

#[tokio::test]
async fn cancel_during_retries_returns_interrupted() {
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    sb.set_faults(Faults {
        fault_502: 1.0,
        ..Faults::default()
    })
    .unwrap();
    let resend = DeliveryConfig {
        on_ambiguous: Some(OnAmbiguous::Resend),
        ..delivery()
    };
    let d = deliverer(&api(&sb.url(), Duration::from_secs(2)), &resend);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.cancel();
    });
    let r = tokio::time::timeout(Duration::from_secs(5), d.deliver(&deposits("c", 5, &[]), &cancel)).await;
    assert_eq!(
        r.expect("returns soon after cancel"),
        Err(datapulse_bridge::deliver::Interrupted {
            // Every try was answered 502: the API may have counted one (it did).
            may_have_been_counted: true
        })
    );
    assert!(sb.stats().accepted_events > 0);
}

#[tokio::test]
async fn one_bad_event_in_500_with_bare_400_is_isolated_by_bisection() {
    let sb = sandbox(0, Duration::from_secs(60), |a| a.bare_400 = true).await;
    let d = deliverer(&api(&sb.url(), Duration::from_secs(5)), &delivery());
    let mut worst = 0;
    for (round, bad) in [0usize, 137, 250, 499].into_iter().enumerate() {
        sb.reset();
        let tag = format!("b{round}");
        let events = deposits(&tag, 500, &[bad]);
        let r = d.deliver(&events, &CancellationToken::new()).await.unwrap();
        assert_eq!(r.iter().filter(|x| **x == EventResult::Delivered).count(), 499);
        assert_eq!(
            r[bad],
            EventResult::Rejected {
                status: 400,
                body: String::new()
            }
        );
        let stats = sb.stats();
        assert_eq!(stats.accepted_events, 499);
        assert!(stats.duplicate_transaction_ids.is_empty());
        // Order kept: what reached the API is the batch minus the bad event, in order.
        let expected: Vec<String> = (0..500).filter(|&i| i != bad).map(|i| format!("{tag}-{i}")).collect();
        assert_eq!(accepted_ids(&sb), expected);
        let extra = stats.requests - 1;
        // ⌈log2 500⌉ = 9 probes, +1 to confirm a lone suspect, +1 for the rest of the batch.
        assert!(extra <= 11, "bad at {bad}: {extra} extra requests");
        worst = worst.max(extra);
    }
    eprintln!("one bad event in 500, bare 400: at most {worst} extra requests");
}

#[tokio::test]
async fn one_bad_event_in_500_with_index_body_costs_one_extra_request() {
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    let d = deliverer(&api(&sb.url(), Duration::from_secs(5)), &delivery());
    let r = d
        .deliver(&deposits("i", 500, &[321]), &CancellationToken::new())
        .await
        .unwrap();
    let stats = sb.stats();
    assert_eq!(stats.requests, 2, "{stats:?}");
    assert_eq!(stats.accepted_events, 499);
    assert_eq!(r.iter().filter(|x| **x == EventResult::Delivered).count(), 499);
    let EventResult::Rejected { status, body } = &r[321] else {
        panic!("event 321: {:?}", r[321])
    };
    assert_eq!(*status, 400);
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["errors"][0]["field"], "amount", "{body}");
}

#[tokio::test]
async fn random_faults_lose_and_duplicate_nothing() {
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    sb.set_faults(Faults {
        fault_500: 0.25,
        fault_429: 0.1,
        fault_timeout: 0.1,
        timeout_hang: Some(Duration::from_secs(5)),
        fault_502: 0.05,
        fault_504: 0.05,
        ..Faults::default()
    })
    .unwrap();
    let d = deliverer(&api(&sb.url(), Duration::from_millis(200)), &delivery());
    // What the API counted, in order: every delivered event once, and the events of a request
    // answered 502 (counted, then the answer lost) once; none of those in doubt sent again.
    let mut expected = Vec::new();
    let mut in_doubt = 0;
    for b in 0..15 {
        let tag = format!("r{b}");
        let r = d
            .deliver(&deposits(&tag, 20, &[]), &CancellationToken::new())
            .await
            .unwrap();
        for (i, r) in r.iter().enumerate() {
            match r {
                EventResult::Delivered => expected.push(format!("{tag}-{i}")),
                EventResult::InDoubt { status: Some(502), .. } => {
                    in_doubt += 1;
                    expected.push(format!("{tag}-{i}"));
                }
                EventResult::InDoubt { .. } => in_doubt += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    let stats = sb.stats();
    let mut accepted = accepted_ids(&sb);
    accepted.sort();
    expected.sort();
    assert_eq!(accepted, expected, "{stats:?}");
    eprintln!("random faults: {in_doubt} events in doubt");
    eprintln!("random faults: {stats:?}");
}

#[tokio::test]
async fn retries_spend_budget_like_first_tries() {
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    sb.set_faults(Faults {
        script: vec![FaultStep::Status500; 3],
        ..Faults::default()
    })
    .unwrap();
    // 5 per second: 200 ms between requests, whatever the (tiny) backoff says.
    let cfg = DeliveryConfig {
        rate_limit: 5,
        rate_window: Duration::from_secs(1),
        retry_backoff_initial: Duration::from_millis(1),
        retry_backoff_max: Duration::from_millis(1),
        ..delivery()
    };
    let d = deliverer(&api(&sb.url(), Duration::from_secs(2)), &cfg);
    let start = Instant::now();
    let r = d
        .deliver(&deposits("sp", 5, &[]), &CancellationToken::new())
        .await
        .unwrap();
    assert!(all_delivered(&r));
    assert_eq!(sb.stats().requests, 4);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(590),
        "4 requests at 5/s take 600 ms, took {took:?}"
    );
}

#[tokio::test]
async fn exhausted_max_retries_keeps_retrying_at_the_cap() {
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    sb.set_faults(Faults {
        script: vec![FaultStep::Status500; 3],
        ..Faults::default()
    })
    .unwrap();
    let cfg = DeliveryConfig {
        max_retries: Some(1),
        retry_backoff_initial: Duration::from_millis(10),
        retry_backoff_max: Duration::from_millis(150),
        ..delivery()
    };
    let d = deliverer(&api(&sb.url(), Duration::from_secs(2)), &cfg);
    let start = Instant::now();
    let r = d
        .deliver(&deposits("mx", 5, &[]), &CancellationToken::new())
        .await
        .unwrap();
    assert!(all_delivered(&r), "never dropped after max_retries");
    assert_eq!(sb.stats().requests, 4);
    // Failures 2 and 3 are past max_retries: each waits the full 150 ms cap.
    assert!(start.elapsed() >= Duration::from_millis(300), "{:?}", start.elapsed());
}

/// What the delivery told its `Exposure`, in order.
#[derive(Default)]
struct Told(std::sync::Mutex<Vec<&'static str>>);

impl datapulse_bridge::deliver::Exposure for Told {
    async fn exposed(&self) {
        self.0.lock().unwrap().push("exposed");
    }
    async fn unexposed(&self) {
        self.0.lock().unwrap().push("unexposed");
    }
}

/// The dedupe store's `sent:` marks follow what the API may have counted: set before a request
/// leaves, taken back after a refusal that proves nothing was counted (429, 401, 500), kept once
/// an answer leaves it open (a 502 under `resend`) even if later requests are refused.
#[tokio::test]
async fn exposure_follows_what_the_api_may_have_counted() {
    let cases: [(Vec<FaultStep>, &[&str]); 4] = [
        (vec![], &["exposed"]),
        (
            vec![FaultStep::Status429, FaultStep::Status401],
            &["exposed", "unexposed", "exposed", "unexposed", "exposed"],
        ),
        (
            vec![FaultStep::Status500, FaultStep::Status429],
            &["exposed", "unexposed", "exposed", "unexposed", "exposed"],
        ),
        (vec![FaultStep::Status504, FaultStep::Status429], &["exposed"]),
    ];
    for (script, expected) in cases {
        let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
        sb.set_faults(Faults {
            script: script.clone(),
            ..Faults::default()
        })
        .unwrap();
        let cfg = DeliveryConfig {
            auth_retry_interval: Duration::from_millis(50),
            on_ambiguous: Some(OnAmbiguous::Resend),
            ..delivery()
        };
        let d = deliverer(&api(&sb.url(), Duration::from_secs(2)), &cfg);
        let events = deposits("x", 5, &[]);
        let json = json_of(&events);
        let bodies: Vec<&[u8]> = json.iter().map(Vec::as_slice).collect();
        let told = Told::default();
        let r = d
            .deliver_json(&bodies, &CancellationToken::new(), None, &told)
            .await
            .unwrap();
        assert!(all_delivered(&r));
        assert_eq!(*told.0.lock().unwrap(), expected, "script {script:?}");
    }
}

/// A base URL with a wrong path: the start-up probe says so (not "key refused"), readiness
/// `api_endpoint` names the status and the URL's path but never the key, and a delivery halts
/// (nothing rejected) until cancelled.
#[tokio::test]
async fn a_wrong_path_halts_with_its_own_condition() {
    use datapulse_bridge::deliver::KeyCheck;
    use datapulse_bridge::telemetry::{Ready, Telemetry};
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    let t = Telemetry::new();
    let d = deliverer_in(
        &api(&format!("{}/wrong", sb.url()), Duration::from_secs(2)),
        &delivery(),
        &t,
    );
    assert_eq!(d.probe().await, KeyCheck::WrongUrl { status: 404 });
    let c = t.condition(Ready::ApiEndpoint).expect("api_endpoint set");
    assert!(!c.ok);
    assert!(
        c.reason.contains("404") && c.reason.contains("/wrong/v2/s2s/batch"),
        "{}",
        c.reason
    );
    assert!(!c.reason.contains(KEY));
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        c2.cancel();
    });
    let r = d.deliver(&deposits("w", 3, &[]), &cancel).await;
    assert_eq!(
        r,
        Err(datapulse_bridge::deliver::Interrupted {
            may_have_been_counted: false
        }),
        "halted, nothing rejected, nothing counted"
    );
    assert!(!t.readiness().0);
}
