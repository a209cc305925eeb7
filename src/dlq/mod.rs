//! The dead-letter topic: records that cannot be delivered, with headers saying why.
//!
//! A dead letter carries the original key, value and headers, plus `dp.*` headers: stage
//! (mapping, validation, dedupe, api), reason (a bounded code), error (a sentence), HTTP status,
//! source topic/partition/offset, time and bridge version. A record counts as finished only after
//! the broker acknowledged its dead-letter write (invariant 2), so [`DeadLetters::send`] retries
//! until acknowledged or shutdown.
//!
//! A record read again (after a crash or a rebalance, possibly by two owners at once) is
//! dead-lettered once: [`DeadLetterWriter`] claims the write by the record's id in the dedupe
//! store, looks a lapsed claim up in the topic, sends, and remembers the write. It answers
//! written / not written; the caller finishes the record. The topic reader (`read`) and the
//! `dlq` commands (`command`) live apart from the writer.

mod command;
mod read;

pub use command::{run_command, DlqCommand, DlqFilter, DlqSettings};
pub use read::{contains, read_all, DeadLetter, ReadError};

use crate::backoff::{until_ok, Backoff};
use crate::dedupe::{DeadLetterClaim, Deduper};
use crate::offsets::RecordId;
use crate::settings::Invalid;
use crate::source::Record;
use crate::source::{KafkaConfig, PropertiesFileError};
use crate::telemetry::{Family, Telemetry};
use futures::future::BoxFuture;
use prometheus::Registry;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
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
    /// What types alone cannot say about `[dead_letter]`.
    pub fn validate(&self) -> Vec<Invalid> {
        if self.topic.trim().is_empty() {
            vec![Invalid::new("dead_letter.topic", "must not be empty")]
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
    /// Where in the record or event (header `dp.field`): an API field name, a custom property
    /// name, or for a value the reader refused the JSON pointer where it stopped (`/money/value`).
    pub field: Option<String>,
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
    pub const FIELD: &str = "dp.field";
    pub const HTTP_STATUS: &str = "dp.http_status";
    pub const SOURCE_TOPIC: &str = "dp.source.topic";
    pub const SOURCE_PARTITION: &str = "dp.source.partition";
    pub const SOURCE_OFFSET: &str = "dp.source.offset";
    pub const TIME: &str = "dp.time";
    pub const VERSION: &str = "dp.bridge_version";
    pub const DEDUPE_KEY: &str = "dp.dedupe_key";
}

/// The dead-letter metrics.
struct Metrics {
    written: prometheus::IntCounterVec,
    write_errors: prometheus::IntCounter,
}

impl Family for Metrics {
    fn register(r: &Registry) -> prometheus::Result<Metrics> {
        Ok(Metrics {
            written: prometheus::register_int_counter_vec_with_registry!(
                "datapulse_bridge_dead_letters_total",
                "Dead-letter writes acknowledged by the broker, by stage and reason.",
                &["stage", "reason"],
                r
            )?,
            write_errors: prometheus::register_int_counter_with_registry!(
                "datapulse_bridge_dead_letter_write_errors_total",
                "Dead-letter writes that failed and were retried.",
                r
            )?,
        })
    }
}

/// Why the dead-letter producer cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Properties(#[from] PropertiesFileError),
    #[error("cannot create the dead-letter producer: {0}")]
    Producer(#[from] KafkaError),
}

/// The dead-letter producer.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    /// For reading the topic back ([`DeadLetters::written_since`]).
    kafka: KafkaConfig,
    metrics: Arc<Metrics>,
}

impl DeadLetters {
    /// The idempotent producer of `cfg.topic`, with the consumer's client properties that apply to
    /// a producer; its metrics go to `telemetry`.
    ///
    /// Errors: `kafka.properties_file` unreadable, or librdkafka refused the producer's settings.
    pub fn new(kafka: &KafkaConfig, cfg: &DeadLetterConfig, telemetry: &Telemetry) -> Result<DeadLetters, SetupError> {
        let mut c = ClientConfig::new();
        for (k, v) in kafka.client_properties()? {
            if crate::source::is_producer_property(&k) {
                c.set(k, v);
            }
        }
        c.set("bootstrap.servers", &kafka.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5");
        let producer: FutureProducer = c.create()?;
        Ok(DeadLetters {
            producer,
            topic: cfg.topic.clone(),
            kafka: kafka.clone(),
            metrics: telemetry.metrics(),
        })
    }

    /// Whether the topic holds the dead letter of the record `id`, written since `since_ms`
    /// (see [`contains`]). When the topic cannot be read, false: written again rather than lost.
    pub async fn written_since(&self, id: &RecordId, since_ms: i64) -> bool {
        let (kafka, topic, i) = (self.kafka.clone(), self.topic.clone(), id.clone());
        let read = tokio::task::spawn_blocking(move || contains(&kafka, &topic, &i, since_ms)).await;
        // A task that panicked reads as "not found", like a topic that cannot be read.
        let found = read
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match found {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(record = id.to_string().as_str(), error = %e, "cannot read the dead-letter topic back: the dead letter may be written twice");
                false
            }
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes a dead letter and waits for the broker's acknowledgement, retrying with backoff.
    /// `dedupe_key`: the key of an event dead-lettered in doubt (header `dp.dedupe_key`, which
    /// `dlq replay` lets go). Returns false only when `cancel` fired first (the record then stays
    /// unfinished).
    pub async fn send(&self, rec: &Record, why: &Reason, dedupe_key: Option<&str>, cancel: &CancellationToken) -> bool {
        let meta = Meta::of(rec, why, dedupe_key);
        let write = || {
            let record = rec.to_record(&self.topic, meta.headers(rec.original_headers(10)));
            let sent = self.producer.send(record, Duration::from_secs(30));
            async move { sent.await.map_err(|(e, _)| e) }
        };
        let written = until_ok(Backoff::DEAD_LETTER, Some(cancel), write, |e: &KafkaError, _| {
            self.metrics.write_errors.inc();
            tracing::error!(topic = %self.topic, source_topic = %rec.id.topic, partition = rec.id.partition,
                offset = rec.id.offset, error = %e, "dead-letter write failed; retrying (the record stays unfinished)");
        })
        .await;
        if written.is_some() {
            self.metrics
                .written
                .with_label_values(&[why.stage, why.code.as_str()])
                .inc();
        }
        written.is_some()
    }
}

/// The `dp.*` headers of one dead letter, as text (a failed write is retried with the same).
struct Meta<'a> {
    why: &'a Reason,
    topic: &'a str,
    partition: String,
    offset: String,
    time: String,
    status: Option<String>,
    dedupe_key: Option<&'a str>,
}

impl<'a> Meta<'a> {
    fn of(rec: &'a Record, why: &'a Reason, dedupe_key: Option<&'a str>) -> Meta<'a> {
        Meta {
            why,
            topic: &rec.id.topic,
            partition: rec.id.partition.to_string(),
            offset: rec.id.offset.to_string(),
            time: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            status: why.http_status.map(|s| s.to_string()),
            dedupe_key,
        }
    }

    /// `original` (the record's own headers) followed by the `dp.*` headers.
    fn headers(&self, original: OwnedHeaders) -> OwnedHeaders {
        let fixed = [
            (headers::STAGE, self.why.stage),
            (headers::REASON, self.why.code.as_str()),
            (headers::ERROR, self.why.message.as_str()),
            (headers::SOURCE_TOPIC, self.topic),
            (headers::SOURCE_PARTITION, self.partition.as_str()),
            (headers::SOURCE_OFFSET, self.offset.as_str()),
            (headers::TIME, self.time.as_str()),
            (headers::VERSION, env!("CARGO_PKG_VERSION")),
        ];
        let optional = [
            (headers::FIELD, self.why.field.as_deref()),
            (headers::HTTP_STATUS, self.status.as_deref()),
            (headers::DEDUPE_KEY, self.dedupe_key),
        ];
        let present = optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v)));
        fixed.into_iter().chain(present).fold(original, |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        })
    }
}

impl Record {
    /// The record's own headers, with room for `extra` more: byte for byte, and a header without
    /// a value again without one (not with an empty value).
    fn original_headers(&self, extra: usize) -> OwnedHeaders {
        self.headers.iter().fold(
            OwnedHeaders::new_with_capacity(self.headers.len() + extra),
            |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: v.as_deref(),
                })
            },
        )
    }

    /// The record's key and value, to `topic`, with `headers`.
    fn to_record<'a>(&'a self, topic: &'a str, headers: OwnedHeaders) -> FutureRecord<'a, [u8], [u8]> {
        let mut record = FutureRecord::to(topic).headers(headers);
        if let Some(k) = &self.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &self.value {
            record = record.payload(v.as_slice());
        }
        record
    }
}

/// Writes a record's dead letter at most once, whoever reads the record (the seam the pipeline's
/// tests replace).
pub trait WriteOnce: Send + Sync {
    /// Writes the dead letter of `rec` unless it was written already (by this process or another
    /// replica, before a crash or a rebalance); [`Write::Cancelled`] when `cancel` fired first
    /// (the record then stays unfinished). `dedupe_key`: the key of an event dead-lettered in
    /// doubt (header `dp.dedupe_key`).
    fn write_once<'a>(
        &'a self,
        rec: &'a Record,
        why: &'a Reason,
        dedupe_key: Option<&'a str>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Write>;
}

/// What [`WriteOnce::write_once`] did: each record's dead letter is in the topic once, and
/// counted `dead_lettered` once across the group (the process that finds it written counts a
/// duplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Written by this call: the broker acknowledged it.
    Written,
    /// Written before (the record was read again): not written twice.
    AlreadyWritten,
    /// Shutdown's deadline came first: not written.
    Cancelled,
}

/// The dead-letter topic's writer: claim → look up a lapsed claim → send → remember, with the
/// claims in the dedupe store (Redis: for every replica).
pub struct DeadLetterWriter {
    pub dlq: DeadLetters,
    pub deduper: Arc<Deduper>,
}

impl WriteOnce for DeadLetterWriter {
    fn write_once<'a>(
        &'a self,
        rec: &'a Record,
        why: &'a Reason,
        dedupe_key: Option<&'a str>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Write> {
        Box::pin(async move {
            // Whoever claims the record first writes it; the others finish it as the dead letter
            // it already is.
            match self.deduper.claim_dead_letter(&rec.id).await {
                DeadLetterClaim::Written => {
                    tracing::debug!(record = %rec.id, "already dead-lettered");
                    Write::AlreadyWritten
                }
                // Its last claimer died holding the claim, perhaps after the broker took the write.
                DeadLetterClaim::Lapsed { since_ms } if self.dlq.written_since(&rec.id, since_ms).await => {
                    self.deduper.dead_lettered(&rec.id).await;
                    Write::AlreadyWritten
                }
                DeadLetterClaim::Mine | DeadLetterClaim::Lapsed { .. } => {
                    if self.dlq.send(rec, why, dedupe_key, cancel).await {
                        self.deduper.dead_lettered(&rec.id).await;
                        Write::Written
                    } else {
                        self.deduper.release_dead_letter(&rec.id);
                        Write::Cancelled
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn header(h: &OwnedHeaders, name: &str) -> Option<String> {
        h.iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// `dp.field` names where in the record a failure is (issue 16: errors name where), and is
    /// left out when there is no such place.
    #[test]
    fn a_dead_letter_names_the_field_when_there_is_one() {
        let mut why = Reason {
            stage: "mapping",
            field: Some("/money/value".into()),
            code: "not_json".into(),
            message: "record t/0/7: field `/money/value`: the value is not JSON".into(),
            http_status: None,
        };
        let meta = |why: &Reason| {
            Meta {
                why,
                topic: "t",
                partition: "0".into(),
                offset: "7".into(),
                time: String::new(),
                status: None,
                dedupe_key: None,
            }
            .headers(OwnedHeaders::new())
        };
        let h = meta(&why);
        assert_eq!(header(&h, headers::FIELD).as_deref(), Some("/money/value"));
        assert_eq!(header(&h, headers::REASON).as_deref(), Some("not_json"));
        why.field = None;
        assert_eq!(header(&meta(&why), headers::FIELD), None);
    }

    /// A dead letter carries the record's headers byte for byte, in order, repeats included: a
    /// header without a value again without one, an empty one empty (issue 17; it was written
    /// with an empty value, so the copy differed from the original).
    #[test]
    fn a_dead_letter_keeps_the_original_headers_byte_for_byte() {
        let original: Vec<(String, Option<Vec<u8>>)> = vec![
            ("x-client-ip".into(), None),
            ("empty".into(), Some(Vec::new())),
            ("bin".into(), Some(vec![0xff, 0x00, 0xfe])),
            ("x-client-ip".into(), Some(b"198.51.100.7".to_vec())),
        ];
        let rec = Record {
            id: RecordId {
                topic: "t".into(),
                partition: 0,
                offset: 7,
            },
            timestamp_ms: None,
            key: None,
            value: None,
            headers: original.clone(),
        };
        let h = rec.original_headers(0);
        let copied: Vec<(String, Option<Vec<u8>>)> = h
            .iter()
            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(copied, original);
    }
}
