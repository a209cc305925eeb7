//! Helpers shared by `tests/delivery_e2e.rs` and `tests/ops_observability.rs`, on top of the
//! harness in `tests/common/mod.rs` (which the test file must declare as `mod common;`).
#![allow(dead_code)]

use crate::common::{accepted_ids, metric_sum, Broker, Sandbox};
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use std::collections::HashSet;

/// The keys (transaction ids) of `records` per partition, in offset order (the topic was empty
/// before they were produced, so a record's offset is its index here).
pub fn keys_by_partition(records: &[(i32, String, String)], partitions: i32) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new(); partitions as usize];
    for (p, k, _) in records {
        out[*p as usize].push(k.clone());
    }
    out
}

/// Invariant 2 through the whole product: for every partition, every record below the group's
/// committed offset has reached the API (or is in `finished_elsewhere`, e.g. dead-lettered).
/// Returns the committed offsets it checked. The committed offsets are read first and the
/// sandbox's record after, so a delivery racing the check can only make it pass, never hide a
/// record committed before it was delivered.
pub async fn assert_committed_prefix_delivered(
    broker: &Broker,
    sandbox: &Sandbox,
    group: &str,
    topic: &str,
    keys: &[Vec<String>],
    finished_elsewhere: &HashSet<String>,
) -> Vec<i64> {
    let committed = broker.committed(group, topic, keys.len() as i32);
    let accepted = accepted_ids(sandbox).await;
    for (p, (c, ks)) in committed.iter().zip(keys).enumerate() {
        let upto = (*c).max(0) as usize;
        assert!(
            upto <= ks.len(),
            "partition {p} committed {c} past its {} records",
            ks.len()
        );
        for (offset, k) in ks[..upto].iter().enumerate() {
            assert!(
                accepted.contains_key(k) || finished_elsewhere.contains(k),
                "partition {p}: committed offset {c} passes offset {offset} ({k}), which the API never accepted"
            );
        }
    }
    committed
}

/// The key of a Kafka message as text.
pub fn key_of(m: &OwnedMessage) -> String {
    m.key()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .unwrap_or_default()
}

/// A count in the sandbox's `by_status` (0 when absent).
pub fn by_status(stats: &serde_json::Value, status: u16) -> u64 {
    stats["by_status"][status.to_string()].as_u64().unwrap_or(0)
}

/// Sum of the sandbox's `injected_faults`.
pub fn injected(stats: &serde_json::Value) -> u64 {
    stats["injected_faults"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(serde_json::Value::as_u64).sum())
}

/// The bridge's outcome counters from a `/metrics` text.
#[derive(Debug, PartialEq)]
pub struct Outcomes {
    pub consumed: f64,
    pub delivered: f64,
    pub duplicate: f64,
    pub filtered: f64,
    pub dead_lettered: f64,
    pub in_flight: f64,
}

impl Outcomes {
    pub fn of(m: &str) -> Outcomes {
        let fin = |o: &str| {
            metric_sum(
                m,
                "datapulse_bridge_records_finished_total",
                &[&format!("outcome=\"{o}\"")],
            )
        };
        Outcomes {
            consumed: metric_sum(m, "datapulse_bridge_records_consumed_total", &[]),
            delivered: fin("delivered"),
            duplicate: fin("duplicate"),
            filtered: fin("filtered"),
            dead_lettered: fin("dead_lettered"),
            in_flight: metric_sum(m, "datapulse_bridge_records_in_flight", &[]),
        }
    }

    /// Invariant 1: `consumed = delivered + duplicate + filtered + dead_lettered + in_flight`.
    pub fn balanced(&self) -> bool {
        self.consumed == self.delivered + self.duplicate + self.filtered + self.dead_lettered + self.in_flight
    }
}

/// The metric families a `/metrics` text declares (its `# TYPE` lines).
pub fn metric_families(text: &str) -> HashSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}
