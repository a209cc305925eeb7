//! The dead-letter topic: records that cannot be delivered, with headers saying why.
//!
//! A dead letter carries the original key, value and headers, plus `dp.*` headers: stage
//! (mapping, validation, dedupe, api), reason (a bounded code), error (a sentence), HTTP status,
//! source topic/partition/offset, time and bridge version. A record counts as finished only after
//! the broker acknowledged its dead-letter write (invariant 2), so [`DeadLetters::send`] retries
//! until acknowledged or shutdown.
//!
//! A dead letter that cannot be written as it is (larger than the producer's `message.max.bytes`
//! or the topic's `max.message.bytes`, or refused as an invalid record) is written cut to fit
//! ([`Fit`]): the coordinates, the reason and as much of the record as fits, with `dp.truncated`
//! saying what was left out; its partition moves on. When the topic cannot be written at all
//! (missing, or this client not authorised), the partitions waiting on it halt ([`Halts`]: the
//! consumer loop pauses them), readiness condition `dead_letter_topic` is false and
//! `datapulse_bridge_dead_letter_halted` is 1, and the pending write is tried again every
//! [`HALT_PROBE_INTERVAL`] until it succeeds. [`DeadLetters::check_topic`] refuses a missing topic
//! at start-up.
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

use crate::backoff::Backoff;
use crate::dedupe::{DeadLetterClaim, Deduper};
use crate::offsets::RecordId;
use crate::settings::Invalid;
use crate::source::Record;
use crate::source::{KafkaConfig, PropertiesFileError};
use crate::telemetry::{Change, Family, Health, Ready, Telemetry};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use prometheus::Registry;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// What of the record a dead letter leaves out, when it could not be written as it is
    /// ([`super::Fit::describe`]): `value` (truncated to its first bytes), `value_omitted`,
    /// `headers_omitted`, `key_omitted`, comma-separated. Absent when nothing was left out.
    pub const TRUNCATED: &str = "dp.truncated";
    /// The original value's size in bytes (with [`TRUNCATED`]).
    pub const ORIGINAL_VALUE_BYTES: &str = "dp.original_value_bytes";
    /// Why the dead letter could not be written as it is: the producer's or broker's error (with
    /// [`TRUNCATED`]).
    pub const TRUNCATED_BECAUSE: &str = "dp.truncated_because";
}

/// The dead-letter metrics.
struct Metrics {
    written: prometheus::IntCounterVec,
    write_errors: prometheus::IntCounter,
    halted: prometheus::IntGauge,
    truncated: prometheus::IntCounter,
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
            halted: prometheus::register_int_gauge_with_registry!(
                "datapulse_bridge_dead_letter_halted",
                "1 while partitions are halted because the dead-letter topic cannot be written at all (missing, not authorised), else 0.",
                r
            )?,
            truncated: prometheus::register_int_counter_with_registry!(
                "datapulse_bridge_dead_letters_truncated_total",
                "Dead letters written without part of their record (value truncated or omitted, headers or key omitted) because it could not be written as it is.",
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
    #[error(transparent)]
    Topic(#[from] TopicProblem),
}

/// Why the dead-letter topic cannot be written, as the broker's metadata says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicProblem {
    /// The broker's metadata has no such topic (`UNKNOWN_TOPIC_OR_PART`, or no partitions).
    #[error("dead-letter topic `{topic}` does not exist on {bootstrap}: create it (it must exist before the bridge starts), or set dead_letter.topic to a topic that exists")]
    Missing {
        /// `dead_letter.topic`.
        topic: String,
        /// `kafka.bootstrap_servers`.
        bootstrap: String,
    },
    /// The broker refused this client the topic (`TOPIC_AUTHORIZATION_FAILED`,
    /// `CLUSTER_AUTHORIZATION_FAILED`).
    #[error("dead-letter topic `{topic}` on {bootstrap}: the broker refused this client ({error}): grant it Describe and Write on the topic, or set dead_letter.topic")]
    NotAuthorised {
        /// `dead_letter.topic`.
        topic: String,
        /// `kafka.bootstrap_servers`.
        bootstrap: String,
        /// The broker's error, as librdkafka words it.
        error: String,
    },
}

/// How often a halted dead-letter write is tried again (the probe that resumes the halted
/// partitions once the topic can be written).
pub const HALT_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// How long [`DeadLetters::check_topic`] waits for the broker's metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// librdkafka's default `message.max.bytes`: the largest record the producer sends.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// What a failed dead-letter write means for the next try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// This dead letter can never be written as it is: too large for the producer's
    /// `message.max.bytes` (librdkafka refuses it locally) or the broker's/topic's
    /// `max.message.bytes` (`MSG_SIZE_TOO_LARGE`, `RECORD_LIST_TOO_LARGE`), or refused as an
    /// invalid record (`INVALID_RECORD`: a record without a key on a compacted topic). Written
    /// cut to fit.
    NotAsItIs,
    /// The topic cannot be written at all (`UNKNOWN_TOPIC_OR_PART`, librdkafka's
    /// `ERR__UNKNOWN_TOPIC`, `TOPIC_AUTHORIZATION_FAILED`, `CLUSTER_AUTHORIZATION_FAILED`): the
    /// partitions needing it halt.
    Topic,
    /// Anything else (a broker down, a timeout): tried again with backoff; a timeout also asks the
    /// broker whether the topic is still there.
    Transient,
}

impl Failure {
    /// The class of a producer error.
    pub fn of(e: &KafkaError) -> Failure {
        use RDKafkaErrorCode as C;
        match e.rdkafka_error_code() {
            Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidRecord) => Failure::NotAsItIs,
            Some(
                C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed,
            ) => Failure::Topic,
            _ => Failure::Transient,
        }
    }
}

/// The partitions whose dead letters wait on a topic that cannot be written, shared by the
/// dead-letter writer (which adds and removes them) and the consumer loop (which pauses them).
#[derive(Default)]
pub struct Halts {
    /// Per partition, how many of its dead letters are halted.
    partitions: Mutex<BTreeMap<(Arc<str>, i32), usize>>,
    /// Moves on every change, so the consumer loop applies only changes.
    version: AtomicU64,
}

impl Halts {
    fn add(&self, id: &RecordId) {
        *self
            .partitions
            .lock()
            .entry((Arc::clone(&id.topic), id.partition))
            .or_default() += 1;
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    fn remove(&self, id: &RecordId) {
        let mut parts = self.partitions.lock();
        let key = (Arc::clone(&id.topic), id.partition);
        if let Some(n) = parts.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                parts.remove(&key);
            }
        }
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    /// A number that moves whenever the halted partitions change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// The halted partitions, `(topic, partition)`.
    pub fn partitions(&self) -> Vec<(Arc<str>, i32)> {
        self.partitions.lock().keys().cloned().collect()
    }

    fn describe(&self) -> String {
        let parts = self.partitions.lock();
        let names: Vec<String> = parts.keys().map(|(t, p)| format!("{t}/{p}")).collect();
        names.join(", ")
    }
}

/// The dead-letter producer.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    /// For reading the topic back ([`DeadLetters::written_since`]).
    kafka: KafkaConfig,
    metrics: Arc<Metrics>,
    /// The producer's `message.max.bytes` (librdkafka's default unless `kafka.properties` sets it).
    max_message_bytes: usize,
    halts: Arc<Halts>,
    /// Readiness condition `dead_letter_topic`.
    health: Arc<Health>,
}

impl DeadLetters {
    /// The idempotent producer of `cfg.topic`, with the consumer's client properties that apply to
    /// a producer; its metrics go to `telemetry`.
    ///
    /// Errors: `kafka.properties_file` unreadable, or librdkafka refused the producer's settings.
    pub fn new(kafka: &KafkaConfig, cfg: &DeadLetterConfig, telemetry: &Telemetry) -> Result<DeadLetters, SetupError> {
        let mut c = ClientConfig::new();
        let mut max_message_bytes = DEFAULT_MESSAGE_MAX_BYTES;
        for (k, v) in kafka.client_properties()? {
            if crate::source::is_producer_property(&k) {
                if k == "message.max.bytes" {
                    max_message_bytes = v.trim().parse().unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
                }
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
            max_message_bytes,
            halts: Arc::default(),
            health: Arc::new(Health::new(telemetry, Ready::DeadLetterTopic)),
        })
    }

    /// The partitions halted by this writer (the consumer loop pauses them).
    pub fn halts(&self) -> Arc<Halts> {
        Arc::clone(&self.halts)
    }

    /// Asks the broker's metadata whether the topic exists and this client may use it. `Ok` also
    /// when the broker does not answer within 10 s (the consumer waits for the broker the same
    /// way; a write then halts if the topic is missing). Blocking: call it off the runtime's
    /// workers. A broker with `auto.create.topics.enable` may create the topic on this request
    /// (librdkafka's producer default `allow.auto.create.topics=true`).
    ///
    /// Errors: the topic is missing, or the broker refused this client access to it.
    pub fn check_topic(&self) -> Result<(), TopicProblem> {
        let found = self.topic_problem()?;
        if found {
            self.health.up(format!("dead-letter topic `{}` exists", self.topic));
        }
        Ok(())
    }

    /// What the broker's metadata says of the topic: `Ok(true)` it exists, `Ok(false)` no answer
    /// (or an error the bridge does not judge). Blocking.
    fn topic_problem(&self) -> Result<bool, TopicProblem> {
        let (topic, bootstrap) = (self.topic.clone(), self.kafka.bootstrap_servers.clone());
        let md = match self
            .producer
            .client()
            .fetch_metadata(Some(&self.topic), METADATA_TIMEOUT)
        {
            Ok(md) => md,
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "cannot ask the broker whether the dead-letter topic exists; going on (a write to a missing topic halts its partition)");
                return Ok(false);
            }
        };
        let Some(t) = md.topics().iter().find(|t| t.name() == self.topic) else {
            return Err(TopicProblem::Missing { topic, bootstrap });
        };
        match t.error() {
            None if !t.partitions().is_empty() => Ok(true),
            None | Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                Err(TopicProblem::Missing { topic, bootstrap })
            }
            Some(
                e @ (RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED
                | RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED),
            ) => Err(TopicProblem::NotAuthorised {
                topic,
                bootstrap,
                error: RDKafkaErrorCode::from(e).to_string(),
            }),
            Some(e) => {
                tracing::warn!(topic = %self.topic, error = %RDKafkaErrorCode::from(e), "the broker's metadata of the dead-letter topic has an error; going on");
                Ok(false)
            }
        }
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
    ///
    /// A dead letter that cannot be written as it is ([`Failure::NotAsItIs`]) is written cut to
    /// fit ([`Fit::decide`]: first to the producer's `message.max.bytes`, then to half of what
    /// the broker refused, down to the `dp.*` headers alone). A topic that cannot be written
    /// ([`Failure::Topic`]) halts the record's partition until a try every
    /// [`HALT_PROBE_INTERVAL`] succeeds.
    pub async fn send(&self, rec: &Record, why: &Reason, dedupe_key: Option<&str>, cancel: &CancellationToken) -> bool {
        let meta = Meta::of(rec, why, dedupe_key);
        let sizes = Sizes {
            key: rec.key.as_ref().map_or(0, Vec::len),
            value: rec.value.as_ref().map_or(0, Vec::len),
            headers: rec
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + HEADER_OVERHEAD)
                .sum(),
            meta: meta.size(),
        };
        let mut limit = self.max_message_bytes;
        let mut fit = Fit::decide(sizes, limit);
        // Why the record is cut: librdkafka's or the broker's refusal, or (before any try) the
        // producer's own limit.
        let mut because = format!("larger than the producer's message.max.bytes ({limit})");
        let mut delay = Backoff::DEAD_LETTER.initial;
        let mut halted = false;
        let written = loop {
            let cut = fit.describe(sizes).map(|what| (what, sizes.value, because.as_str()));
            let headers = meta.headers(
                if fit.headers {
                    rec.original_headers(13)
                } else {
                    OwnedHeaders::new_with_capacity(13)
                },
                cut.as_ref().map(|(w, n, b)| (w.as_str(), *n, *b)),
            );
            let record = rec.to_record(&self.topic, headers, fit);
            let sent = self.producer.send(record, Duration::from_secs(30));
            let result = tokio::select! {
                r = sent => r.map_err(|(e, _)| e),
                _ = cancel.cancelled() => break false,
            };
            let e = match result {
                Ok(_) => break true,
                Err(e) => e,
            };
            self.metrics.write_errors.inc();
            let mut failure = Failure::of(&e);
            if failure == Failure::Transient
                && e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut)
                && self.topic_missing().await
            {
                failure = Failure::Topic;
            }
            match failure {
                Failure::NotAsItIs if fit != Fit::decide(sizes, 0) => {
                    because = e.to_string();
                    limit = limit.min(fit_bytes(sizes, fit, meta.size())) / 2;
                    fit = Fit::decide(sizes, limit);
                    tracing::info!(topic = %self.topic, record = %rec.id, error = %e,
                        "the dead letter cannot be written as it is; writing it cut to fit");
                    continue;
                }
                // Not even the coordinates and the reason can be written: the topic cannot take
                // this record at all.
                Failure::NotAsItIs | Failure::Topic => {
                    if !halted {
                        halted = true;
                        self.halts.add(&rec.id);
                    }
                    self.halt(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(HALT_PROBE_INTERVAL) => {}
                        _ = cancel.cancelled() => break false,
                    }
                }
                Failure::Transient => {
                    tracing::error!(topic = %self.topic, source_topic = %rec.id.topic, partition = rec.id.partition,
                        offset = rec.id.offset, error = %e, "dead-letter write failed; retrying (the record stays unfinished)");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => break false,
                    }
                    delay = (delay * 2).min(Backoff::DEAD_LETTER.max);
                }
            }
        };
        if halted {
            self.halts.remove(&rec.id);
        }
        if written {
            self.resumed();
            if fit.cut(sizes) {
                self.metrics.truncated.inc();
            }
            self.metrics
                .written
                .with_label_values(&[why.stage, why.code.as_str()])
                .inc();
        }
        written
    }

    /// Whether the broker's metadata says the topic is missing or refused to this client (false
    /// when the broker does not answer).
    async fn topic_missing(&self) -> bool {
        let this = self.clone();
        matches!(
            tokio::task::spawn_blocking(move || this.check_topic()).await,
            Ok(Err(_))
        )
    }

    /// A write found the topic unwritable: readiness false naming the topic, logged once per
    /// outage.
    fn halt(&self, e: &KafkaError) {
        let reason = format!(
            "dead-letter topic `{}` cannot be written ({e}): partitions {} halted, trying again every {}",
            self.topic,
            self.halts.describe(),
            humantime::format_duration(HALT_PROBE_INTERVAL)
        );
        if self.health.down(false, reason) != Change::Same {
            tracing::error!(topic = %self.topic, error = %e, partitions = %self.halts.describe(),
                "the dead-letter topic cannot be written: the partitions waiting on it are halted (paused, nothing committed past); \
                 create the topic or grant this client Write on it");
        }
        self.metrics.halted.set(1);
    }

    /// A write succeeded: the topic takes writes.
    fn resumed(&self) {
        if !self.halts.partitions.lock().is_empty() {
            return;
        }
        match self
            .health
            .up(format!("dead-letter topic `{}` takes writes", self.topic))
        {
            Change::Recovered => {
                tracing::info!(topic = %self.topic, "the dead-letter topic takes writes again; halted partitions resume")
            }
            Change::Same | Change::First | Change::Failed => {}
        }
        self.metrics.halted.set(0);
    }
}

/// The bytes a dead letter in shape `fit` weighs, as [`Fit::decide`] counts them.
fn fit_bytes(s: Sizes, fit: Fit, meta: usize) -> usize {
    RECORD_OVERHEAD + meta + fit.value_bytes + if fit.key { s.key } else { 0 } + if fit.headers { s.headers } else { 0 }
}

/// The shape a dead letter is written in: what of the record's key, value and headers it
/// carries. The `dp.*` headers (coordinates, reason) are always written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fit {
    pub key: bool,
    /// The value's first bytes to carry: all of them (`value.len()`), fewer (truncated) or none.
    pub value_bytes: usize,
    pub headers: bool,
}

/// The sizes, in bytes, [`Fit::decide`] weighs: the record's key, value and headers (each
/// header's name and value, plus [`HEADER_OVERHEAD`]) and the `dp.*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sizes {
    pub key: usize,
    pub value: usize,
    pub headers: usize,
    pub meta: usize,
}

/// Bytes a header adds besides its name and value (librdkafka writes two varint lengths).
pub(crate) const HEADER_OVERHEAD: usize = 10;

/// Bytes a one-record batch adds besides key, value and headers: the v2 batch header (61) and the
/// record's own fields (at most 41, `RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`), rounded up, plus room
/// for the headers saying what was cut (`dp.truncated`, `dp.original_value_bytes`,
/// `dp.truncated_because`).
pub(crate) const RECORD_OVERHEAD: usize = 512;

impl Fit {
    /// The whole record, whatever its sizes (a replay).
    pub const EVERYTHING: Fit = Fit {
        key: true,
        value_bytes: usize::MAX,
        headers: true,
    };

    /// Everything, unchanged.
    pub fn whole(s: Sizes) -> Fit {
        Fit {
            key: true,
            value_bytes: s.value,
            headers: true,
        }
    }

    /// What fits in `limit` bytes (librdkafka's `message.max.bytes`, or a broker's
    /// `max.message.bytes`), cutting in this order: the value is truncated (or omitted), then the
    /// original headers are omitted (then the value gets what room is left), then the key. The
    /// `dp.*` headers are never cut: a limit too small for them gives the smallest shape (no key,
    /// no value, no original headers), which the broker may still refuse.
    pub fn decide(s: Sizes, limit: usize) -> Fit {
        let room = limit.saturating_sub(RECORD_OVERHEAD + s.meta);
        if s.key + s.value + s.headers <= room {
            return Fit::whole(s);
        }
        let (key, headers) = if s.key + s.headers <= room {
            (true, true)
        } else if s.key <= room {
            (true, false)
        } else {
            (false, false)
        };
        let used = if key { s.key } else { 0 } + if headers { s.headers } else { 0 };
        Fit {
            key,
            value_bytes: room.saturating_sub(used).min(s.value),
            headers,
        }
    }

    /// Whether anything of the record is left out.
    pub fn cut(&self, s: Sizes) -> bool {
        !self.key || !self.headers || self.value_bytes < s.value
    }

    /// The `dp.truncated` header's value: what was left out, comma-separated (`value` truncated
    /// to its first bytes, `value_omitted`, `headers_omitted`, `key_omitted`); `None` when
    /// nothing was.
    pub fn describe(&self, s: Sizes) -> Option<String> {
        let mut cut = Vec::new();
        if self.value_bytes == 0 && s.value > 0 {
            cut.push("value_omitted");
        } else if self.value_bytes < s.value {
            cut.push("value");
        }
        if !self.headers {
            cut.push("headers_omitted");
        }
        if !self.key {
            cut.push("key_omitted");
        }
        (!cut.is_empty()).then(|| cut.join(","))
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

    /// The bytes the `dp.*` headers take, as [`Fit::decide`] counts them.
    fn size(&self) -> usize {
        self.headers(OwnedHeaders::new(), None)
            .iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + HEADER_OVERHEAD)
            .sum()
    }

    /// `original` (the record's own headers) followed by the `dp.*` headers; `cut`: what was left
    /// out ([`headers::TRUNCATED`]), the original value's size and why.
    fn headers(&self, original: OwnedHeaders, cut: Option<(&str, usize, &str)>) -> OwnedHeaders {
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
        let size = cut.map(|(_, n, _)| n.to_string());
        let cut = cut
            .map(|(what, _, because)| {
                [
                    (headers::TRUNCATED, what),
                    (headers::ORIGINAL_VALUE_BYTES, size.as_deref().unwrap_or_default()),
                    (headers::TRUNCATED_BECAUSE, because),
                ]
            })
            .into_iter()
            .flatten();
        fixed
            .into_iter()
            .chain(present)
            .chain(cut)
            .fold(original, |h, (key, value)| {
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

    /// The record's key and value as `fit` keeps them, to `topic`, with `headers`.
    fn to_record<'a>(&'a self, topic: &'a str, headers: OwnedHeaders, fit: Fit) -> FutureRecord<'a, [u8], [u8]> {
        let mut record = FutureRecord::to(topic).headers(headers);
        if let Some(k) = self.key.as_ref().filter(|_| fit.key) {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &self.value {
            if fit.value_bytes > 0 || v.is_empty() {
                record = record.payload(&v[..fit.value_bytes.min(v.len())]);
            }
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
            .headers(OwnedHeaders::new(), None)
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

    fn sizes(key: usize, value: usize, headers: usize) -> Sizes {
        Sizes {
            key,
            value,
            headers,
            meta: 300,
        }
    }

    /// What fits is written whole; a value over the limit is cut to what is left (issue 19).
    #[test]
    fn a_dead_letter_that_fits_is_whole_and_a_large_value_is_truncated_to_fit() {
        let limit = 10_000;
        let s = sizes(20, 1_000, 200);
        assert_eq!(Fit::decide(s, limit), Fit::whole(s));
        assert_eq!(Fit::whole(s).describe(s), None);

        let s = sizes(20, 50_000, 200);
        let fit = Fit::decide(s, limit);
        assert!(fit.key && fit.headers, "{fit:?}");
        assert_eq!(fit.value_bytes, limit - RECORD_OVERHEAD - 300 - 20 - 200);
        assert_eq!(fit_bytes(s, fit, 300), limit, "uses the room, no more");
        assert_eq!(fit.describe(s).as_deref(), Some("value"));
        assert!(fit.cut(s));
    }

    /// Headers that alone do not fit are omitted (the value gets the room left); a key that alone
    /// does not fit goes too; a limit below the `dp.*` headers leaves only them.
    #[test]
    fn headers_then_the_key_are_omitted_when_they_alone_do_not_fit() {
        let limit = 10_000;
        let s = sizes(20, 50_000, 20_000);
        let fit = Fit::decide(s, limit);
        assert!(fit.key && !fit.headers, "{fit:?}");
        assert_eq!(fit.value_bytes, limit - RECORD_OVERHEAD - 300 - 20);
        assert_eq!(fit.describe(s).as_deref(), Some("value,headers_omitted"));

        let s = sizes(20, 0, 20_000);
        let fit = Fit::decide(s, limit);
        assert_eq!(fit.describe(s).as_deref(), Some("headers_omitted"), "{fit:?}");

        let s = sizes(20_000, 5_000, 100);
        let fit = Fit::decide(s, limit);
        assert!(!fit.key && !fit.headers, "{fit:?}");
        assert_eq!(fit.describe(s).as_deref(), Some("headers_omitted,key_omitted"));

        let s = sizes(20, 5_000, 100);
        let smallest = Fit::decide(s, 100);
        assert_eq!(smallest, Fit::decide(s, 0));
        assert_eq!(
            smallest.describe(s).as_deref(),
            Some("value_omitted,headers_omitted,key_omitted")
        );
    }

    /// The producer's errors that mean "never as it is", "the topic cannot be written" and
    /// "try again".
    #[test]
    fn producer_errors_are_classified() {
        use RDKafkaErrorCode as C;
        let of = |c| Failure::of(&KafkaError::MessageProduction(c));
        assert_eq!(of(C::MessageSizeTooLarge), Failure::NotAsItIs);
        assert_eq!(of(C::MessageBatchTooLarge), Failure::NotAsItIs);
        assert_eq!(of(C::InvalidRecord), Failure::NotAsItIs);
        assert_eq!(of(C::UnknownTopicOrPartition), Failure::Topic);
        assert_eq!(of(C::UnknownTopic), Failure::Topic);
        assert_eq!(of(C::TopicAuthorizationFailed), Failure::Topic);
        assert_eq!(of(C::MessageTimedOut), Failure::Transient);
        assert_eq!(of(C::AllBrokersDown), Failure::Transient);
    }

    /// A cut dead letter says what was cut, the original size and why.
    #[test]
    fn a_cut_dead_letter_says_what_was_cut() {
        let why = Reason {
            stage: "mapping",
            field: None,
            code: "not_json".into(),
            message: "m".into(),
            http_status: None,
        };
        let meta = Meta {
            why: &why,
            topic: "t",
            partition: "0".into(),
            offset: "7".into(),
            time: String::new(),
            status: None,
            dedupe_key: None,
        };
        let h = meta.headers(
            OwnedHeaders::new(),
            Some(("value", 50_000, "Broker: Message size too large")),
        );
        assert_eq!(header(&h, headers::TRUNCATED).as_deref(), Some("value"));
        assert_eq!(header(&h, headers::ORIGINAL_VALUE_BYTES).as_deref(), Some("50000"));
        assert_eq!(
            header(&h, headers::TRUNCATED_BECAUSE).as_deref(),
            Some("Broker: Message size too large")
        );
        assert_eq!(header(&h, headers::SOURCE_OFFSET).as_deref(), Some("7"));
        assert_eq!(
            header(&meta.headers(OwnedHeaders::new(), None), headers::TRUNCATED),
            None
        );
    }
}
