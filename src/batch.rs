//! Grouping events into API requests under count, byte and time limits.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `[batch]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most events in one request (contract decision 7; default 500).
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// Most bytes of JSON body in one request (default 1 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Longest time the first event of a batch waits for the batch to fill.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
}

fn default_max_events() -> usize {
    500
}
fn default_max_bytes() -> usize {
    1024 * 1024
}
fn default_linger() -> Duration {
    Duration::from_millis(500)
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: default_max_events(),
            max_bytes: default_max_bytes(),
            linger: default_linger(),
        }
    }
}

impl BatchConfig {
    pub fn validate(&self, origin: &dyn Fn(&str) -> String) -> Vec<String> {
        let mut errs = Vec::new();
        if self.max_events == 0 {
            errs.push(format!(
                "key `batch.max_events` {}: must be at least 1",
                origin("batch.max_events")
            ));
        }
        if self.max_bytes < 1024 {
            errs.push(format!(
                "key `batch.max_bytes` {}: must be at least 1024",
                origin("batch.max_bytes")
            ));
        }
        errs
    }
}
