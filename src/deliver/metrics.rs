//! Delivery metrics (a [`Family`] of the bridge's telemetry). Label values are bounded: endpoints are
//! fixed names, statuses are HTTP codes or `timeout`/`connect_error`/`io_error`, causes are a fixed
//! set. Nothing here ever carries the API key.

use crate::telemetry::Family;
use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
    pub endpoint_halted: IntGauge,
    pub decisions: IntCounterVec,
    pub in_doubt: IntCounter,
    pub too_large: IntCounter,
    pub body_limit: IntGauge,
    /// Batches under retry, for `datapulse_bridge_delivery_oldest_retry_age_seconds`.
    retrying: Arc<Retrying>,
}

impl Family for Metrics {
    fn register(r: &Registry) -> prometheus::Result<Metrics> {
        let retrying = Arc::new(Retrying::default());
        r.register(Box::new(OldestRetryAge::new(Arc::clone(&retrying))?))?;
        Ok(Metrics {
        retrying,
        auth_halted: prometheus::register_int_gauge_with_registry!(
            "datapulse_bridge_auth_halted",
            "1 while delivery is halted because the API refused the key (401/403), else 0.",
            r
        )?,
        endpoint_halted: prometheus::register_int_gauge_with_registry!(
            "datapulse_bridge_api_endpoint_halted",
            "1 while delivery is halted because the API answered 404, 405, 415, 3xx or another 4xx (check api.base_url), else 0.",
            r
        )?,
        decisions: prometheus::register_int_counter_vec_with_registry!(
            "datapulse_bridge_api_decisions_total",
            "Answers of the API by what delivery decided (delivered, isolate, retry, pause_key, split, too_large, in_doubt, halt).",
            &["decision"],
            r
        )?,
        in_doubt: prometheus::register_int_counter_with_registry!(
            "datapulse_bridge_delivery_events_in_doubt_total",
            "Events of requests the API may have counted (502, 504, no answer after the request was written) under \
             delivery.on_ambiguous = \"in-doubt\": dead-lettered as in_doubt, never sent again automatically.",
            r
        )?,
        too_large: prometheus::register_int_counter_with_registry!(
            "datapulse_bridge_delivery_events_too_large_total",
            "Events refused as too large (413) in a request carrying them alone: dead-lettered as payload_too_large.",
            r
        )?,
        body_limit: prometheus::register_int_gauge_with_registry!(
            "datapulse_bridge_api_body_limit_bytes",
            "The largest request body accepted since the first 413 of this process, to which requests are cut; 0 before any 413.",
            r
        )?,
        requests: prometheus::register_int_counter_vec_with_registry!(
            "datapulse_bridge_api_requests_total",
            "Requests sent to the Server Events API, by endpoint and status (HTTP code, timeout, connect_error, io_error).",
            &["endpoint", "status"],
            r
        )?,
        latency: prometheus::register_histogram_vec_with_registry!(
            "datapulse_bridge_api_request_duration_seconds",
            "Time from sending a request to the API to its response (or failure).",
            &["endpoint"],
            vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            r
        )?,
        events_per_request: prometheus::register_histogram_with_registry!(
            "datapulse_bridge_api_events_per_request",
            "Events carried by one request to the API.",
            vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
            r
        )?,
        retries: prometheus::register_int_counter_vec_with_registry!(
            "datapulse_bridge_api_retries_total",
            "Requests repeated after an answer that was not final, by cause (401, 403, 408, 429, 4xx, 5xx, timeout, connect, io).",
            &["cause"],
            r
        )?,
        budget_wait: prometheus::register_counter_with_registry!(
            "datapulse_bridge_rate_budget_wait_seconds_total",
            "Time requests spent waiting for the key's rate budget (including 429 pauses).",
            r
        )?,
        budget_remaining: prometheus::register_int_gauge_with_registry!(
            "datapulse_bridge_rate_budget_remaining",
            "Requests the key's budget allowed at once after the last draw (best effort).",
            r
        )?,
        rejected: prometheus::register_int_counter_with_registry!(
            "datapulse_bridge_delivery_events_rejected_total",
            "Events the API rejected permanently (400), isolated from their batch.",
            r
        )?,
        bisection_requests: prometheus::register_int_counter_with_registry!(
            "datapulse_bridge_delivery_bisection_requests_total",
            "Requests sent to isolate bad events of a batch answered 400 without indexes.",
            r
        )?,
        })
    }
}

/// Batches that have met a retriable failure, by id, with the time their delivery started.
#[derive(Default)]
struct Retrying {
    started: Mutex<HashMap<u64, Instant>>,
    next_id: AtomicU64,
}

impl Retrying {
    fn oldest(&self) -> Option<Instant> {
        self.started.lock().values().min().copied()
    }
}

/// Registers a batch as under retry until dropped (also when its delivery is cancelled).
pub struct RetryGuard {
    id: u64,
    retrying: Arc<Retrying>,
}

impl RetryGuard {
    pub fn new(metrics: &Metrics, started: Instant) -> RetryGuard {
        let retrying = Arc::clone(&metrics.retrying);
        let id = retrying.next_id.fetch_add(1, Ordering::Relaxed);
        retrying.started.lock().insert(id, started);
        RetryGuard { id, retrying }
    }
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.retrying.started.lock().remove(&self.id);
    }
}

/// `datapulse_bridge_delivery_oldest_retry_age_seconds`, computed when scraped so it grows while a
/// batch waits between retries (a plain gauge would only move when a retry happens).
struct OldestRetryAge {
    desc: Desc,
    retrying: Arc<Retrying>,
}

const OLDEST_NAME: &str = "datapulse_bridge_delivery_oldest_retry_age_seconds";
const OLDEST_HELP: &str =
    "Age of the oldest batch under retry (since its delivery started); 0 when nothing is being retried.";

impl OldestRetryAge {
    fn new(retrying: Arc<Retrying>) -> prometheus::Result<OldestRetryAge> {
        let desc = Desc::new(OLDEST_NAME.into(), OLDEST_HELP.into(), vec![], HashMap::new())?;
        Ok(OldestRetryAge { desc, retrying })
    }
}

impl Collector for OldestRetryAge {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let age = self.retrying.oldest().map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        match Gauge::with_opts(Opts::new(OLDEST_NAME, OLDEST_HELP)) {
            Ok(g) => {
                g.set(age);
                g.collect()
            }
            Err(_) => Vec::new(),
        }
    }
}

impl Metrics {
    /// The age the gauge would show now (for tests and logs).
    pub fn oldest_retry_age(&self) -> std::time::Duration {
        self.retrying.oldest().map(|t| t.elapsed()).unwrap_or_default()
    }
}
