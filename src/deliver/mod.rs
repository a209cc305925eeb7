//! Delivery to the Server Events API: the HTTP client, classification of responses, retries.
//!
//! PLACEHOLDER (spine issue): one request per batch, retry with capped exponential backoff on
//! anything but 2xx and 400. The delivery issue replaces the internals (rate budget, Retry-After,
//! bisection, auth halt) behind the same interface.

use crate::config::ApiConfig;
use crate::event::Event;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `[delivery]`
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {}

impl DeliveryConfig {
    pub fn validate(&self, _origin: &dyn Fn(&str) -> String) -> Vec<String> {
        Vec::new()
    }
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum EventResult {
    /// The API answered 2xx for a request that carried it.
    Delivered,
    /// The API rejected it permanently (400); the status and body go to the dead letter.
    Rejected { status: u16, body: String },
}

/// Delivery was abandoned because shutdown was requested; nothing about the batch is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

pub struct Deliverer {
    client: reqwest::Client,
    url: String,
    key: String,
}

impl Deliverer {
    pub fn new(api: &ApiConfig, _cfg: &DeliveryConfig) -> anyhow::Result<Deliverer> {
        let client = reqwest::Client::builder()
            .timeout(api.request_timeout)
            .connect_timeout(api.connect_timeout)
            .build()?;
        let url = format!("{}/v2/s2s/batch", api.base_url.trim_end_matches('/'));
        let key = api.read_key().map_err(anyhow::Error::msg)?.expose().to_string();
        Ok(Deliverer { client, url, key })
    }

    /// Delivers `events`, retrying until each has a final result or `cancel` fires. Results are
    /// in the order of `events`.
    pub async fn deliver(&self, events: &[Event], cancel: &CancellationToken) -> Result<Vec<EventResult>, Cancelled> {
        let mut body = Vec::with_capacity(events.len() * 256);
        body.push(b'[');
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            e.write_json(&mut body);
        }
        body.push(b']');
        let body = bytes::Bytes::from(body);
        let mut backoff = Duration::from_millis(100);
        loop {
            let res = self
                .client
                .post(&self.url)
                .header("content-type", "application/json")
                .header("x-api-key", &self.key)
                .body(body.clone())
                .send()
                .await;
            match res {
                Ok(r) if r.status().is_success() => return Ok(vec![EventResult::Delivered; events.len()]),
                Ok(r) if r.status().as_u16() == 400 => {
                    let body = r.text().await.unwrap_or_default();
                    return Ok(vec![EventResult::Rejected { status: 400, body }; events.len()]);
                }
                Ok(r) => tracing::warn!(status = r.status().as_u16(), "API request failed; retrying"),
                Err(e) => tracing::warn!(error = %e, "API request failed; retrying"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(Cancelled),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
