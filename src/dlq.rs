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
            vec![format!(
                "key `dead_letter.topic` {}: must not be empty",
                origin("dead_letter.topic")
            )]
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
    pub const DEDUPE_KEY: &str = "dp.dedupe_key";
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
    /// For reading the topic back ([`DeadLetters::written_since`]).
    kafka: KafkaConfig,
}

impl DeadLetters {
    pub fn new(kafka: &KafkaConfig, cfg: &DeadLetterConfig) -> anyhow::Result<DeadLetters> {
        let mut c = ClientConfig::new();
        for (k, v) in kafka.client_properties().map_err(anyhow::Error::msg)? {
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
        })
    }

    /// Whether the topic holds the dead letter of the record at `coords`, written since `since_ms`
    /// (see [`contains`]). When the topic cannot be read, false: written again rather than lost.
    pub async fn written_since(&self, coords: &str, since_ms: i64) -> bool {
        let (kafka, topic, c) = (self.kafka.clone(), self.topic.clone(), coords.to_string());
        let read = tokio::task::spawn_blocking(move || contains(&kafka, &topic, &c, since_ms)).await;
        match read.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(record = coords, error = %e, "cannot read the dead-letter topic back: the dead letter may be written twice");
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
    pub async fn send(
        &self,
        rec: &OwnedRecord,
        why: &Reason,
        dedupe_key: Option<&str>,
        cancel: &CancellationToken,
    ) -> bool {
        let partition = rec.partition.to_string();
        let offset = rec.offset.to_string();
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let status = why.http_status.map(|s| s.to_string());
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut h = rec.original_headers(10);
            h = h
                .insert(Header {
                    key: headers::STAGE,
                    value: Some(why.stage),
                })
                .insert(Header {
                    key: headers::REASON,
                    value: Some(why.code.as_str()),
                })
                .insert(Header {
                    key: headers::ERROR,
                    value: Some(why.message.as_str()),
                })
                .insert(Header {
                    key: headers::SOURCE_TOPIC,
                    value: Some(&*rec.topic),
                })
                .insert(Header {
                    key: headers::SOURCE_PARTITION,
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: headers::SOURCE_OFFSET,
                    value: Some(offset.as_str()),
                })
                .insert(Header {
                    key: headers::TIME,
                    value: Some(now.as_str()),
                })
                .insert(Header {
                    key: headers::VERSION,
                    value: Some(env!("CARGO_PKG_VERSION")),
                });
            if let Some(s) = &status {
                h = h.insert(Header {
                    key: headers::HTTP_STATUS,
                    value: Some(s.as_str()),
                });
            }
            if let Some(k) = dedupe_key {
                h = h.insert(Header {
                    key: headers::DEDUPE_KEY,
                    value: Some(k),
                });
            }
            let record = rec.to_record(&self.topic, h);
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

impl OwnedRecord {
    /// The record's own headers, with room for `extra` more.
    fn original_headers(&self, extra: usize) -> OwnedHeaders {
        self.headers.iter().fold(
            OwnedHeaders::new_with_capacity(self.headers.len() + extra),
            |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
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

/// `datapulse-bridge dlq` commands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters grouped by stage and reason, with examples.
    List(DlqFilter),
    /// Re-produce chosen dead letters to their source topic, so the running bridge takes them
    /// through the pipeline again (for after a mapping fix). Dedupe drops any already delivered.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// Print what would be replayed without producing anything.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which dead letters a `dlq` command concerns.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqFilter {
    /// The bridge's configuration file (for the brokers and the dead-letter topic).
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
    /// Only these reasons (repeatable), e.g. `currency`, `double_count`, `rejected`.
    #[arg(long)]
    pub reason: Vec<String>,
    /// Only this stage: mapping, validation, dedupe or api.
    #[arg(long)]
    pub stage: Option<String>,
    /// Only dead letters written at or after this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<time::OffsetDateTime>,
    /// Only dead letters written before this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<time::OffsetDateTime>,
    /// Only these source records, as `topic/partition/offset` (repeatable).
    #[arg(long = "record")]
    pub records: Vec<String>,
}

fn parse_time(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("`{s}` is not an RFC 3339 time such as 2026-11-26T10:00:00Z: {e}"))
}

/// One dead letter read back from the topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub record: OwnedRecord,
    pub stage: String,
    pub reason: String,
    pub error: String,
    pub time: Option<time::OffsetDateTime>,
    /// `dp.dedupe_key`: the key of an `in_doubt` dead letter.
    pub dedupe_key: Option<String>,
    /// Where the dead letter itself is: `topic/partition/offset`.
    pub at: String,
}

impl DlqFilter {
    fn matches(&self, d: &DeadLetter) -> bool {
        (self.reason.is_empty() || self.reason.contains(&d.reason))
            && self.stage.as_ref().is_none_or(|s| *s == d.stage)
            && self.since.is_none_or(|s| d.time.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| d.time.is_some_and(|t| t < u))
            && (self.records.is_empty() || self.records.contains(&d.record.coordinates()))
    }
}

/// Reads every dead letter on the topic (from the beginning to the current end).
pub fn read_all(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Vec<DeadLetter>> {
    read_since(kafka, topic, None)
}

/// Whether the topic holds a dead letter of the record at `coords` (`topic/partition/offset`)
/// written at or after `since_ms` (Unix ms, give or take a minute of clock skew). Asked when a
/// dead-letter claim is taken over from a process that died holding it: the broker may have taken
/// its write.
pub fn contains(kafka: &KafkaConfig, topic: &str, coords: &str, since_ms: i64) -> anyhow::Result<bool> {
    let since = since_ms.saturating_sub(60_000).max(0);
    Ok(read_since(kafka, topic, Some(since))?
        .iter()
        .any(|d| d.record.coordinates() == coords))
}

/// Reads the dead letters on the topic from `since_ms` (by the records' timestamps; from the
/// beginning when None, or when the broker cannot look offsets up by time) to the current end.
fn read_since(kafka: &KafkaConfig, topic: &str, since_ms: Option<i64>) -> anyhow::Result<Vec<DeadLetter>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::Message;
    let mut c = ClientConfig::new();
    for (k, v) in kafka.client_properties().map_err(anyhow::Error::msg)? {
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
        anyhow::bail!("dead-letter topic `{topic}` does not exist or has no partitions");
    }
    // Where each partition's reading starts: its first offset at or after `since_ms`.
    let by_time: std::collections::HashMap<i32, i64> = match since_ms {
        None => Default::default(),
        Some(ms) => {
            let mut q = rdkafka::TopicPartitionList::new();
            for &p in &partitions {
                q.add_partition_offset(topic, p, rdkafka::Offset::Offset(ms))?;
            }
            match consumer.offsets_for_times(q, Duration::from_secs(10)) {
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
                    Default::default()
                }
            }
        }
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut remaining = 0i64;
    let mut ends = std::collections::HashMap::new();
    for &p in &partitions {
        let (lo, hi) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        let lo = by_time.get(&p).map_or(lo, |&from| from.max(lo));
        if hi > lo {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(lo))?;
            remaining += hi - lo;
            ends.insert(p, hi);
        }
    }
    let mut out = Vec::new();
    if remaining == 0 {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut done: std::collections::HashSet<i32> = std::collections::HashSet::new();
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
        let mut meta: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
        let mut original = Vec::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                let v = h.value.unwrap_or_default();
                if h.key.starts_with("dp.") {
                    meta.insert(
                        match h.key {
                            headers::STAGE => "stage",
                            headers::REASON => "reason",
                            headers::ERROR => "error",
                            headers::TIME => "time",
                            headers::SOURCE_TOPIC => "topic",
                            headers::SOURCE_PARTITION => "partition",
                            headers::SOURCE_OFFSET => "offset",
                            headers::DEDUPE_KEY => "dedupe_key",
                            _ => continue,
                        },
                        String::from_utf8_lossy(v).into_owned(),
                    );
                } else {
                    original.push((h.key.to_string(), v.to_vec()));
                }
            }
        }
        let get = |k: &str| meta.get(k).cloned().unwrap_or_default();
        out.push(DeadLetter {
            record: OwnedRecord {
                topic: get("topic").into(),
                partition: get("partition").parse().unwrap_or(-1),
                offset: get("offset").parse().unwrap_or(-1),
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
        });
    }
    Ok(out)
}

/// Runs a `dlq` command; returns the process exit code.
pub async fn run_command(cmd: DlqCommand) -> anyhow::Result<()> {
    let filter = match &cmd {
        DlqCommand::List(f) => f,
        DlqCommand::Replay { filter, .. } => filter,
    };
    let (path, explicit) = match &filter.config {
        Some(p) => (p.clone(), true),
        None => (std::path::PathBuf::from(crate::config::DEFAULT_CONFIG_FILE), false),
    };
    let cfg = crate::config::load(&path, explicit)?.config;
    let topic = cfg.dead_letter.topic.clone();
    let kafka = cfg.kafka.clone();
    let all = tokio::task::spawn_blocking(move || read_all(&kafka, &topic)).await??;
    let chosen: Vec<&DeadLetter> = all.iter().filter(|d| filter.matches(d)).collect();
    match cmd {
        DlqCommand::List(_) => {
            let mut groups: std::collections::BTreeMap<(&str, &str), Vec<&DeadLetter>> = Default::default();
            for d in &chosen {
                groups.entry((d.stage.as_str(), d.reason.as_str())).or_default().push(d);
            }
            println!(
                "{} dead letters on {} ({} match)",
                all.len(),
                cfg.dead_letter.topic,
                chosen.len()
            );
            for ((stage, reason), ds) in groups {
                println!("\n{:>6}  {stage}: {reason}", ds.len());
                for d in ds.iter().take(3) {
                    println!("        {}  {}", d.record.coordinates(), d.error);
                }
            }
        }
        DlqCommand::Replay { dry_run, .. } => {
            let dl = DeadLetters::new(&cfg.kafka, &cfg.dead_letter)?;
            let cancel = CancellationToken::new();
            // An `in_doubt` dead letter's id stays a duplicate in the dedupe store until replayed:
            // replaying it says the operator found it missing in DataPulse.
            let in_doubt = chosen.iter().any(|d| d.dedupe_key.is_some());
            let deduper = match (in_doubt && !dry_run, cfg.dedupe.store) {
                (true, crate::dedupe::StoreKind::Redis) => Some(crate::dedupe::Deduper::new(&cfg.dedupe).await?),
                _ => None,
            };
            for d in &chosen {
                if d.record.topic.is_empty() {
                    println!("skipped {}: no source topic header", d.at);
                    continue;
                }
                if dry_run {
                    println!("would replay {} to {}", d.at, d.record.topic);
                    continue;
                }
                if let (Some(deduper), Some(key)) = (&deduper, &d.dedupe_key) {
                    if deduper.forget_doubt(key).await.map_err(|e| anyhow::anyhow!("{e}"))? {
                        println!("{key} is no longer in doubt: it will be sent");
                    }
                }
                dl.replay(d, &cancel).await?;
                println!("replayed {} ({}: {}) to {}", d.at, d.stage, d.reason, d.record.topic);
            }
            println!(
                "{} dead letters {}",
                chosen.len(),
                if dry_run { "would be replayed" } else { "replayed" }
            );
        }
    }
    Ok(())
}

impl DeadLetters {
    /// Produces a dead letter's original record to its source topic again, marked with a
    /// `dp.replayed_from` header.
    async fn replay(&self, d: &DeadLetter, _cancel: &CancellationToken) -> anyhow::Result<()> {
        let mut h = d.record.original_headers(1);
        h = h.insert(Header {
            key: "dp.replayed_from",
            value: Some(d.at.as_str()),
        });
        let record = d.record.to_record(&d.record.topic, h);
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        Ok(())
    }
}
