//! Helpers shared by the delivery component tests: the project's sandbox started in-process on
//! 127.0.0.1, events, and Deliverer construction.
#![allow(dead_code)]

use datapulse_bridge::deliver::ApiConfig;
use datapulse_bridge::deliver::{Deliverer, DeliveryConfig, EventResult, Exposure, Interrupted};
use datapulse_bridge::event::Event;
use datapulse_bridge::sandbox::{self, SandboxArgs, SandboxHandle};
use datapulse_bridge::telemetry::Telemetry;
use std::future::Future;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const KEY: &str = "dp_test_key_123";

/// A sandbox accepting [`KEY`], with `rate_limit` per `rate_window` (0: no limit).
pub async fn sandbox(rate_limit: u32, rate_window: Duration, tweak: impl FnOnce(&mut SandboxArgs)) -> SandboxHandle {
    let mut args = SandboxArgs {
        listen: "127.0.0.1:0".into(),
        api_keys: vec![KEY.into()],
        rate_limit,
        rate_window,
        ..SandboxArgs::default()
    };
    tweak(&mut args);
    sandbox::start(args).await.expect("sandbox starts")
}

pub fn api(base_url: &str, request_timeout: Duration) -> ApiConfig {
    serde_json::from_value(serde_json::json!({
        "base_url": base_url,
        "key": KEY,
        "request_timeout": humantime::format_duration(request_timeout).to_string(),
        "connect_timeout": "1s",
    }))
    .expect("api config")
}

pub fn api_with_key_file(base_url: &str, key_file: &Path) -> ApiConfig {
    serde_json::from_value(serde_json::json!({
        "base_url": base_url,
        "key_file": key_file,
        "request_timeout": "2s",
    }))
    .expect("api config")
}

/// Fast retries, and a local budget far above what the tests send unless they set one.
pub fn delivery() -> DeliveryConfig {
    DeliveryConfig {
        rate_limit: 1000,
        rate_window: Duration::from_secs(1),
        retry_backoff_initial: Duration::from_millis(20),
        retry_backoff_max: Duration::from_millis(200),
        auth_retry_interval: Duration::from_millis(200),
        ..DeliveryConfig::default()
    }
}

/// A deliverer with a telemetry of its own (a process of its own).
pub fn deliverer(api: &ApiConfig, cfg: &DeliveryConfig) -> Deliverer {
    deliverer_in(api, cfg, &Telemetry::new())
}

/// A deliverer whose metrics and readiness go to `telemetry`.
pub fn deliverer_in(api: &ApiConfig, cfg: &DeliveryConfig, telemetry: &Telemetry) -> Deliverer {
    Deliverer::new(api, cfg, telemetry).expect("deliverer")
}

/// `n` valid deposits with transaction ids `{tag}-{i}`; the ones at `bad` lack `amount` (a 400).
pub fn deposits(tag: &str, n: usize, bad: &[usize]) -> Vec<Event<'static>> {
    (0..n)
        .map(|i| Event {
            client_user_id: format!("user-{i}").into(),
            event_name: "deposit".into(),
            timestamp: 1_702_963_200,
            click_id: Some(format!("clk-{i}").into()),
            ip_address: Some("203.0.113.1".into()),
            transaction_id: Some(format!("{tag}-{i}").into()),
            amount: if bad.contains(&i) { None } else { Some(50.into()) },
            currency: Some("USD".into()),
            ..Event::default()
        })
        .collect()
}

/// Transaction ids the sandbox accepted, in arrival order.
pub fn accepted_ids(sb: &SandboxHandle) -> Vec<String> {
    sb.events()
        .iter()
        .map(|e| e["transaction_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// No dedupe store to tell.
pub struct NoStore;

impl Exposure for NoStore {
    async fn exposed(&self) {}
    async fn unexposed(&self) {}
}

/// `Deliverer::deliver_json` for events not serialised yet, telling no dedupe store.
pub trait DeliverEvents {
    fn deliver(
        &self,
        events: &[Event<'_>],
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Vec<EventResult>, Interrupted>> + Send;
}

impl DeliverEvents for Deliverer {
    fn deliver(
        &self,
        events: &[Event<'_>],
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Vec<EventResult>, Interrupted>> + Send {
        let json = json_of(events);
        async move {
            let slices: Vec<&[u8]> = json.iter().map(Vec::as_slice).collect();
            self.deliver_json(&slices, cancel, None, &NoStore).await
        }
    }
}

/// Each event's JSON, as the pipeline serialises it for `Deliverer::deliver_json`.
pub fn json_of(events: &[Event<'_>]) -> Vec<Vec<u8>> {
    events
        .iter()
        .map(|e| {
            let mut out = Vec::new();
            e.write_json(&mut out);
            out
        })
        .collect()
}
