//! Delivery metrics, in the default Prometheus registry. Label values are bounded: endpoints are
//! fixed names, statuses are HTTP codes or `timeout`/`connect_error`/`io_error`, causes are a fixed
//! set. Nothing here ever carries the API key.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    register_counter, register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, Counter, Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use tokio::time::Instant;

pub struct Metrics {
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub events_per_request: Histogram,
    pub retries: IntCounterVec,
    pub budget_wait: Counter,
    pub budget_remaining: IntGauge,
    pub rejected: IntCounter,
    pub bisection_requests: IntCounter,
    pub auth_halted: IntGauge,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    // Registering the collector here keeps every delivery metric behind one LazyLock.
    prometheus::register(Box::new(OldestRetryAge::new())).expect("register oldest retry age");
    Metrics {
        auth_halted: prometheus::register_int_gauge!(
            "datapulse_bridge_auth_halted",
            "1 while delivery is halted because the API refused the key (401/403), else 0."
        )
        .expect("register auth_halted"),
        requests: register_int_counter_vec!(
            "datapulse_bridge_api_requests_total",
            "Requests sent to the Server Events API, by endpoint and status (HTTP code, timeout, connect_error, io_error).",
            &["endpoint", "status"]
        )
        .expect("register api_requests_total"),
        latency: register_histogram_vec!(
            "datapulse_bridge_api_request_duration_seconds",
            "Time from sending a request to the API to its response (or failure).",
            &["endpoint"],
            vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
        )
        .expect("register api_request_duration_seconds"),
        events_per_request: register_histogram!(
            "datapulse_bridge_api_events_per_request",
            "Events carried by one request to the API.",
            vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0]
        )
        .expect("register api_events_per_request"),
        retries: register_int_counter_vec!(
            "datapulse_bridge_api_retries_total",
            "Requests repeated after a retriable answer, by cause (429, 5xx, timeout, connect, 401, 403).",
            &["cause"]
        )
        .expect("register api_retries_total"),
        budget_wait: register_counter!(
            "datapulse_bridge_rate_budget_wait_seconds_total",
            "Time requests spent waiting for the key's rate budget (including 429 pauses)."
        )
        .expect("register rate_budget_wait_seconds_total"),
        budget_remaining: register_int_gauge!(
            "datapulse_bridge_rate_budget_remaining",
            "Requests the key's budget allowed at once after the last draw (best effort)."
        )
        .expect("register rate_budget_remaining"),
        rejected: register_int_counter!(
            "datapulse_bridge_delivery_events_rejected_total",
            "Events the API rejected permanently (400), isolated from their batch."
        )
        .expect("register delivery_events_rejected_total"),
        bisection_requests: register_int_counter!(
            "datapulse_bridge_delivery_bisection_requests_total",
            "Requests sent to isolate bad events of a batch answered 400 without indexes."
        )
        .expect("register delivery_bisection_requests_total"),
    }
});

/// Batches that have met a retriable failure, by id, with the time their delivery started.
static RETRYING: LazyLock<Mutex<HashMap<u64, Instant>>> = LazyLock::new(Default::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Registers a batch as under retry until dropped (also when its delivery is cancelled).
pub struct RetryGuard(u64);

impl RetryGuard {
    pub fn new(started: Instant) -> RetryGuard {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        RETRYING.lock().unwrap_or_else(|p| p.into_inner()).insert(id, started);
        RetryGuard(id)
    }
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        RETRYING.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.0);
    }
}

/// `datapulse_bridge_delivery_oldest_retry_age_seconds`, computed when scraped so it grows while a
/// batch waits between retries (a plain gauge would only move when a retry happens).
struct OldestRetryAge {
    desc: Desc,
}

const OLDEST_NAME: &str = "datapulse_bridge_delivery_oldest_retry_age_seconds";
const OLDEST_HELP: &str =
    "Age of the oldest batch under retry (since its delivery started); 0 when nothing is being retried.";

impl OldestRetryAge {
    fn new() -> OldestRetryAge {
        let desc = Desc::new(OLDEST_NAME.into(), OLDEST_HELP.into(), vec![], HashMap::new()).expect("valid desc");
        OldestRetryAge { desc }
    }
}

impl Collector for OldestRetryAge {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let oldest = RETRYING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .min()
            .copied();
        let age = oldest.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        match Gauge::with_opts(Opts::new(OLDEST_NAME, OLDEST_HELP)) {
            Ok(g) => {
                g.set(age);
                g.collect()
            }
            Err(_) => Vec::new(),
        }
    }
}

/// The age the gauge would show now (for tests and logs).
pub fn oldest_retry_age() -> std::time::Duration {
    RETRYING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .min()
        .map(|t| t.elapsed())
        .unwrap_or_default()
}
