//! Deduplication by transaction id and the bet-result double-count guard.
//!
//! PLACEHOLDER (spine issue): keeps everything. The dedupe issue replaces the internals (memory
//! and Redis stores, in-flight claims, the guard) behind the same interface.

use crate::event::Event;
use serde::{Deserialize, Serialize};

/// `[dedupe]`
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {}

impl DedupeConfig {
    pub fn validate(&self, _origin: &dyn Fn(&str) -> String) -> Vec<String> {
        Vec::new()
    }
}

/// The verdict on one event before it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Send,
    /// Already delivered or already on its way: a finished outcome, never sent. The reason is a
    /// bounded label (`in_batch`, `in_flight`, `store`).
    Duplicate { reason: &'static str },
    /// Sending it would make the API count a bet result twice: dead-letter it with this reason.
    DoubleCount { reason: String },
}

/// The dedupe store is unreachable; under the `pause` policy the caller waits and retries.
#[derive(Debug, Clone)]
pub struct StoreUnavailable(pub String);

pub struct Deduper {}

impl Deduper {
    pub async fn new(_cfg: &DedupeConfig) -> anyhow::Result<Deduper> {
        Ok(Deduper {})
    }

    /// Judges each event of a batch about to be sent (in order: an earlier event of the same
    /// batch counts as in flight for a later one). Events judged `Send` are held as in flight
    /// until [`Deduper::delivered`] or [`Deduper::release`].
    pub async fn check(&self, events: &[&Event]) -> Result<Vec<Verdict>, StoreUnavailable> {
        Ok(vec![Verdict::Send; events.len()])
    }

    /// Records events the API accepted (2xx). Must succeed before their offsets are committed.
    pub async fn delivered(&self, _events: &[&Event]) -> Result<(), StoreUnavailable> {
        Ok(())
    }

    /// Releases in-flight holds of events that were not delivered (dead-lettered or abandoned).
    pub async fn release(&self, _events: &[&Event]) {}
}
