//! The halt on a refused key (invariant 5), against the sandbox over HTTP: 401 until the key
//! file is fixed means no Rejected result, readiness false, an error logged once, and recovery
//! without a restart.

mod deliver_common;

use datapulse_bridge::deliver::{EventResult, KeyCheck};
use datapulse_bridge::telemetry::{Ready, Telemetry};
use deliver_common::*;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const WRONG_KEY: &str = "dp_wrong_key_987";

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn api_key_condition(t: &Telemetry) -> Option<(bool, String)> {
    t.condition(Ready::ApiKey).map(|c| (c.ok, c.reason))
}

#[tokio::test]
async fn refused_key_halts_without_rejecting_and_recovers_when_the_key_file_is_fixed() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .init();

    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, format!("{WRONG_KEY}\n")).unwrap();
    let t = Telemetry::new();
    let d = Arc::new(deliverer_in(&api_with_key_file(&sb.url(), &key_file), &delivery(), &t));

    // The start-up probe spends one request and reports the refusal.
    assert_eq!(d.probe().await, KeyCheck::Refused { status: 401 });
    assert_eq!(api_key_condition(&t).map(|c| c.0), Some(false));

    let cancel = CancellationToken::new();
    let started = Instant::now();
    let task = {
        let (d, c) = (d.clone(), cancel.clone());
        tokio::spawn(async move { d.deliver(&deposits("k", 10, &[]), &c).await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!task.is_finished(), "delivery must wait for a good key, not give up");
    let stats = sb.stats();
    assert_eq!(stats.accepted_events, 0);
    let refused = stats.by_status.get(&401).copied().unwrap_or(0);
    // 800 ms at one retry per 200 ms: the retries are slow, not a hot loop.
    assert!((3..=7).contains(&refused), "{refused} requests answered 401");
    let (ok, reason) = api_key_condition(&t).unwrap();
    assert!(!ok);
    assert_eq!(reason, "API answered 401: key refused");
    let age = d.oldest_retry_age();
    assert!(age >= Duration::from_millis(500), "oldest retry age {age:?}");

    // The Secret is rotated: the next retry re-reads the file and goes through.
    std::fs::write(&key_file, KEY).unwrap();
    let results = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("recovers without a restart")
        .unwrap()
        .unwrap();
    assert_eq!(
        results,
        vec![EventResult::Delivered; 10],
        "never Rejected for a refused key"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert_eq!(sb.stats().accepted_events, 10);
    assert_eq!(api_key_condition(&t).map(|c| c.0), Some(true));
    assert_eq!(d.oldest_retry_age(), Duration::ZERO);
    assert_eq!(d.probe().await, KeyCheck::Accepted);

    // The error is logged once per outage; neither key appears in logs or metrics.
    let text = logs.text();
    assert_eq!(text.matches("API refused the key").count(), 1, "{text}");
    assert!(text.contains("API accepted the key again"), "{text}");
    let metrics = t.render();
    for secret in [KEY, WRONG_KEY] {
        assert!(!text.contains(secret), "a key in the logs");
        assert!(!metrics.contains(secret), "a key in the metrics");
    }
    assert!(
        metrics.contains("datapulse_bridge_api_retries_total{cause=\"401\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("datapulse_bridge_api_requests_total{endpoint=\"batch\",status=\"401\"}"));
    assert!(
        metrics.contains("datapulse_bridge_delivery_oldest_retry_age_seconds 0"),
        "{metrics}"
    );
}
