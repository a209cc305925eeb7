//! The dead-letter topic: records that cannot be delivered, with headers saying why.
//!
//! A dead letter carries the original key, value and headers, plus `dp.*` headers: stage
//! (mapping, validation, dedupe, api), reason (a bounded code), error (a sentence), HTTP status,
//! source topic/partition/offset, time and bridge version. A record counts as finished only after
//! the broker acknowledged its dead-letter write (invariant 2), so [`DeadLetters::send`] retries
//! until acknowledged or shutdown.

use crate::config::KafkaConfig;
use crate::pipeline::OwnedRecord;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `[dead_letter]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// The topic receiving dead letters (on the source cluster; it must exist).
    #[serde(default = "default_topic")]
    pub topic: String,
}

fn default_topic() -> String {
    "datapulse-bridge-dead-letter".into()
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig { topic: default_topic() }
    }
}

impl DeadLetterConfig {
    pub fn validate(&self, origin: &dyn Fn(&str) -> String) -> Vec<String> {
        if self.topic.trim().is_empty() {
            vec![format!("key `dead_letter.topic` {}: must not be empty", origin("dead_letter.topic"))]
        } else {
            Vec::new()
        }
    }
}

/// Why a record is dead-lettered.
#[derive(Debug, Clone)]
pub struct Reason {
    /// `mapping`, `validation`, `dedupe` or `api`.
    pub stage: &'static str,
    /// A bounded code: a contract rule, a mapping reason, `double_count`, `rejected`.
    pub code: String,
    /// A sentence naming the field and the problem.
    pub message: String,
    pub http_status: Option<u16>,
}

/// Header names of the dead-letter metadata.
pub mod headers {
    pub const STAGE: &str = "dp.stage";
    pub const REASON: &str = "dp.reason";
    pub const ERROR: &str = "dp.error";
    pub const HTTP_STATUS: &str = "dp.http_status";
    pub const SOURCE_TOPIC: &str = "dp.source.topic";
    pub const SOURCE_PARTITION: &str = "dp.source.partition";
    pub const SOURCE_OFFSET: &str = "dp.source.offset";
    pub const TIME: &str = "dp.time";
    pub const VERSION: &str = "dp.bridge_version";
}

static DEAD_LETTERS: LazyLock<prometheus::IntCounterVec> = LazyLock::new(|| {
    prometheus::register_int_counter_vec!(
        "datapulse_bridge_dead_letters_total",
        "Dead-letter writes acknowledged by the broker, by stage and reason.",
        &["stage", "reason"]
    )
    .expect("metric registers once")
});

static DEAD_LETTER_ERRORS: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    prometheus::register_int_counter!(
        "datapulse_bridge_dead_letter_write_errors_total",
        "Dead-letter writes that failed and were retried."
    )
    .expect("metric registers once")
});

/// The dead-letter producer.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    pub fn new(kafka: &KafkaConfig, cfg: &DeadLetterConfig) -> anyhow::Result<DeadLetters> {
        let mut c = ClientConfig::new();
        for (k, v) in kafka.properties.iter() {
            if crate::source::is_producer_property(k) {
                c.set(k, v);
            }
        }
        c.set("bootstrap.servers", &kafka.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5");
        let producer: FutureProducer = c.create()?;
        Ok(DeadLetters { producer, topic: cfg.topic.clone() })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes a dead letter and waits for the broker's acknowledgement, retrying with backoff.
    /// Returns false only when `cancel` fired first (the record then stays unfinished).
    pub async fn send(&self, rec: &OwnedRecord, why: &Reason, cancel: &CancellationToken) -> bool {
        let partition = rec.partition.to_string();
        let offset = rec.offset.to_string();
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let status = why.http_status.map(|s| s.to_string());
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut h = OwnedHeaders::new_with_capacity(rec.headers.len() + 9);
            for (k, v) in &rec.headers {
                h = h.insert(Header { key: k, value: Some(v.as_slice()) });
            }
            h = h
                .insert(Header { key: headers::STAGE, value: Some(why.stage) })
                .insert(Header { key: headers::REASON, value: Some(why.code.as_str()) })
                .insert(Header { key: headers::ERROR, value: Some(why.message.as_str()) })
                .insert(Header { key: headers::SOURCE_TOPIC, value: Some(&*rec.topic) })
                .insert(Header { key: headers::SOURCE_PARTITION, value: Some(partition.as_str()) })
                .insert(Header { key: headers::SOURCE_OFFSET, value: Some(offset.as_str()) })
                .insert(Header { key: headers::TIME, value: Some(now.as_str()) })
                .insert(Header { key: headers::VERSION, value: Some(env!("CARGO_PKG_VERSION")) });
            if let Some(s) = &status {
                h = h.insert(Header { key: headers::HTTP_STATUS, value: Some(s.as_str()) });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(h);
            if let Some(k) = &rec.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &rec.value {
                record = record.payload(v.as_slice());
            }
            let sent = tokio::select! {
                r = self.producer.send(record, Duration::from_secs(30)) => r,
                _ = cancel.cancelled() => return false,
            };
            match sent {
                Ok(_) => {
                    DEAD_LETTERS.with_label_values(&[why.stage, why.code.as_str()]).inc();
                    return true;
                }
                Err((e, _)) => {
                    DEAD_LETTER_ERRORS.inc();
                    tracing::error!(topic = %self.topic, source_topic = %rec.topic, partition = rec.partition,
                        offset = rec.offset, error = %e, "dead-letter write failed; retrying (the record stays unfinished)");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => return false,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}
