//! Reading the dead-letter topic back: for the `dlq` commands, and to look for a dead letter whose
//! claim lapsed with its owner.

use super::headers;
use crate::offsets::RecordId;
use crate::source::Record;
use crate::source::{KafkaConfig, PropertiesFileError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// One dead letter read back from the topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The original record, with its source coordinates from the `dp.source.*` headers
    /// (`-1` where a header is missing or not a number).
    pub record: Record,
    pub stage: String,
    pub reason: String,
    pub error: String,
    pub time: Option<time::OffsetDateTime>,
    /// `dp.dedupe_key`: the key of an `in_doubt` dead letter.
    pub dedupe_key: Option<String>,
    /// Where the dead letter itself is: `topic/partition/offset`.
    pub at: String,
}

/// Why the dead-letter topic cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Properties(#[from] PropertiesFileError),
    #[error("cannot read the dead-letter topic: {0}")]
    Kafka(#[from] KafkaError),
    #[error("dead-letter topic `{topic}` does not exist or has no partitions")]
    NoSuchTopic { topic: String },
}

/// Reads every dead letter on the topic (from the beginning to the current end).
pub fn read_all(kafka: &KafkaConfig, topic: &str) -> Result<Vec<DeadLetter>, ReadError> {
    read_since(kafka, topic, None)
}

/// Whether the topic holds a dead letter of the record `id` written at or after `since_ms` (Unix ms, give or take a minute of clock skew). Asked when a
/// dead-letter claim is taken over from a process that died holding it: the broker may have taken
/// its write.
pub fn contains(kafka: &KafkaConfig, topic: &str, id: &RecordId, since_ms: i64) -> Result<bool, ReadError> {
    let since = since_ms.saturating_sub(60_000).max(0);
    Ok(read_since(kafka, topic, Some(since))?
        .iter()
        .any(|d| d.record.id == *id))
}

/// Reads the dead letters on the topic from `since_ms` (by the records' timestamps; from the
/// beginning when None, or when the broker cannot look offsets up by time) to the current end.
fn read_since(kafka: &KafkaConfig, topic: &str, since_ms: Option<i64>) -> Result<Vec<DeadLetter>, ReadError> {
    let mut c = ClientConfig::new();
    for (k, v) in kafka.client_properties()? {
        c.set(k, v);
    }
    let consumer: BaseConsumer = c
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", format!("{}-dlq-reader", kafka.group_id))
        .set("enable.auto.commit", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(ReadError::NoSuchTopic { topic: topic.into() });
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = HashMap::new();
    let by_time = match since_ms {
        Some(ms) => first_offsets_since(&consumer, topic, &partitions, ms)?,
        None => HashMap::new(),
    };
    for &p in &partitions {
        let (lo, hi) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        let lo = by_time.get(&p).map_or(lo, |&from| from.max(lo));
        if hi > lo {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(lo))?;
            ends.insert(p, hi);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut done: HashSet<i32> = HashSet::new();
    // Past the reported ends, keep reading until the topic is quiet for a second: some
    // Kafka-compatible brokers report a high watermark that lags behind what they serve.
    let mut quiet_since = std::time::Instant::now();
    while std::time::Instant::now() < deadline
        && (done.len() < ends.len() || quiet_since.elapsed() < Duration::from_secs(1))
    {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        quiet_since = std::time::Instant::now();
        let m = m?;
        if m.offset() + 1 >= ends[&m.partition()] {
            done.insert(m.partition());
        }
        out.push(DeadLetter::from_message(&m, topic));
    }
    Ok(out)
}

/// Each partition's first offset at or after `since_ms` (`i64::MAX` where none is); empty when
/// the broker cannot look offsets up by time (the whole topic is read then).
fn first_offsets_since(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    since_ms: i64,
) -> Result<HashMap<i32, i64>, KafkaError> {
    let mut q = rdkafka::TopicPartitionList::new();
    for &p in partitions {
        q.add_partition_offset(topic, p, rdkafka::Offset::Offset(since_ms))?;
    }
    Ok(match consumer.offsets_for_times(q, Duration::from_secs(10)) {
        Ok(found) => found
            .elements()
            .iter()
            .map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => (e.partition(), o),
                _ => (e.partition(), i64::MAX),
            })
            .collect(),
        Err(e) => {
            tracing::warn!(topic, error = %e, "the broker cannot look offsets up by time: reading the dead-letter topic from its start");
            HashMap::new()
        }
    })
}

impl DeadLetter {
    /// A dead letter as read from `topic`: the `dp.*` headers read, the others kept as the
    /// original record's.
    fn from_message(m: &BorrowedMessage<'_>, topic: &str) -> DeadLetter {
        let mut meta: HashMap<&str, String> = HashMap::new();
        let mut original = Vec::new();
        // Read like a source record's (`source::headers`): a name that is not UTF-8 is no panic.
        for (key, value) in crate::source::headers::of(m) {
            if !key.starts_with("dp.") {
                original.push((key, value));
                continue;
            }
            let v = value.unwrap_or_default();
            let name = match key.as_str() {
                headers::STAGE => "stage",
                headers::REASON => "reason",
                headers::ERROR => "error",
                headers::TIME => "time",
                headers::SOURCE_TOPIC => "topic",
                headers::SOURCE_PARTITION => "partition",
                headers::SOURCE_OFFSET => "offset",
                headers::DEDUPE_KEY => "dedupe_key",
                _ => continue,
            };
            meta.insert(name, String::from_utf8_lossy(&v).into_owned());
        }
        let get = |k: &str| meta.get(k).cloned().unwrap_or_default();
        DeadLetter {
            record: Record {
                id: RecordId {
                    topic: get("topic").into(),
                    partition: get("partition").parse().unwrap_or(-1),
                    offset: get("offset").parse().unwrap_or(-1),
                },
                timestamp_ms: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: original,
            },
            stage: get("stage"),
            reason: get("reason"),
            error: get("error"),
            time: parse_time(&get("time")).ok(),
            dedupe_key: meta.get("dedupe_key").cloned(),
            at: format!("{topic}/{}/{}", m.partition(), m.offset()),
        }
    }
}

/// Reads an RFC 3339 time (the `dp.time` header, the `--since`/`--until` options).
pub(super) fn parse_time(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("`{s}` is not an RFC 3339 time such as 2026-11-26T10:00:00Z: {e}"))
}
