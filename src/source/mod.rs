//! Everything that speaks Kafka consumer: client settings, subscription, the record type, the
//! rebalance callbacks, periodic and revoke commits, pause and resume.
//!
//! Offsets are never stored or committed by librdkafka on its own (`enable.auto.commit=false`,
//! `enable.auto.offset.store=false`): [`Source::commit_finished`] commits the finished prefix the
//! tracker (`offsets`) computes. On a revoke the finished prefix of the revoked partitions is
//! committed synchronously inside the callback and their epoch ends, so work still in flight for
//! them is never committed by this process (invariant 9).

mod config;

use crate::offsets::Tracker;
pub use crate::offsets::{Epoch, RecordId};
use crate::telemetry::{Family, Ready, Telemetry};
pub use config::{is_secret_property, KafkaConfig, KafkaProperties, PropertiesFileError, RESERVED_PROPERTIES};
use prometheus::Registry;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, ClientContext, Message};
use std::sync::{Arc, Mutex};

/// A record as read from Kafka, owned, kept until its outcome (a dead letter needs the original).
#[derive(Debug, Clone)]
pub struct Record {
    pub id: RecordId,
    /// The record's Kafka timestamp (create or log-append time), Unix ms.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// The record's headers in order; a header without a value has an empty one.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// Copies a record out of librdkafka's buffer. `id`: its identity, with the topic's shared
    /// name.
    pub fn from_message(m: &BorrowedMessage<'_>, id: RecordId) -> Record {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        Record {
            id,
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
        }
    }
}

/// Properties that belong to the consumer only and must not be given to the dead-letter producer.
pub fn is_producer_property(key: &str) -> bool {
    let consumer_only = [
        "auto.offset.reset",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "partition.assignment.strategy",
        "fetch.",
        "queued.",
        "isolation.level",
        "group.",
        "enable.partition.eof",
        "check.crcs",
        "statistics.interval.ms",
    ];
    !consumer_only.iter().any(|p| key.starts_with(p))
}

pub(crate) struct Metrics {
    pub consumed: prometheus::IntCounter,
    pub rebalances: prometheus::IntCounterVec,
    pub committed: prometheus::IntGaugeVec,
    pub high_watermark: prometheus::IntGaugeVec,
    pub lag: prometheus::IntGaugeVec,
    pub commit_errors: prometheus::IntCounter,
}

impl Family for Metrics {
    fn register(r: &Registry) -> prometheus::Result<Metrics> {
        Ok(Metrics {
            consumed: prometheus::register_int_counter_with_registry!(
        "datapulse_bridge_records_consumed_total",
        "Records read from Kafka (each reaches exactly one finished outcome or is re-read after a restart/rebalance).",
        r
    )?,
            rebalances: prometheus::register_int_counter_vec_with_registry!(
                "datapulse_bridge_rebalances_total",
                "Consumer group rebalance events, by kind (assign, revoke, error).",
                &["kind"],
                r
            )?,
            committed: prometheus::register_int_gauge_vec_with_registry!(
                "datapulse_bridge_partition_committed_offset",
                "Last offset this process committed (the next offset to read), per partition.",
                &["topic", "partition"],
                r
            )?,
            high_watermark: prometheus::register_int_gauge_vec_with_registry!(
                "datapulse_bridge_partition_high_watermark",
                "High watermark (end offset) of each assigned partition, from consumer statistics.",
                &["topic", "partition"],
                r
            )?,
            lag: prometheus::register_int_gauge_vec_with_registry!(
                "datapulse_bridge_partition_lag",
                "High watermark minus committed offset, per assigned partition.",
                &["topic", "partition"],
                r
            )?,
            commit_errors: prometheus::register_int_counter_with_registry!(
                "datapulse_bridge_commit_errors_total",
                "Offset commits that failed (retried at the next commit interval).",
                r
            )?,
        })
    }
}

/// The consumer's context: keeps the tracker in step with the group's assignment.
pub struct SourceContext {
    pub tracker: Arc<Mutex<Tracker>>,
    telemetry: Telemetry,
    metrics: Arc<Metrics>,
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        let tracker = lock(&self.tracker);
        let committed: std::collections::HashMap<(String, i32), i64> = tracker
            .committed_offsets()
            .into_iter()
            .map(|(t, p, o)| ((t, p), o))
            .collect();
        for (topic, t) in &stats.topics {
            for (&partition, p) in &t.partitions {
                if partition < 0 || !p.desired {
                    continue;
                }
                let part = partition.to_string();
                let labels = [topic.as_str(), part.as_str()];
                self.metrics.high_watermark.with_label_values(&labels).set(p.hi_offset);
                if let Some(&c) = committed.get(&(topic.clone(), partition)) {
                    self.metrics
                        .lag
                        .with_label_values(&labels)
                        .set((p.hi_offset - c).max(0));
                } else if p.committed_offset >= 0 {
                    self.metrics
                        .lag
                        .with_label_values(&labels)
                        .set((p.hi_offset - p.committed_offset).max(0));
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                let lost = consumer.assignment_lost();
                let mut commit = TopicPartitionList::new();
                {
                    let mut tracker = lock(&self.tracker);
                    for e in tpl.elements() {
                        if let Some(o) = tracker.revoke(e.topic(), e.partition()) {
                            if !lost {
                                let _ = commit.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o));
                            }
                        }
                        let part = e.partition().to_string();
                        let _ = self.metrics.lag.remove_label_values(&[e.topic(), part.as_str()]);
                        let _ = self
                            .metrics
                            .high_watermark
                            .remove_label_values(&[e.topic(), part.as_str()]);
                    }
                }
                tracing::info!(partitions = %describe(tpl), lost, "partitions revoked; unfinished work is abandoned to the next owner");
                if commit.count() > 0 {
                    match consumer.commit(&commit, rdkafka::consumer::CommitMode::Sync) {
                        Ok(()) => record_commits(&self.tracker, &self.metrics, &commit),
                        Err(e) => {
                            self.metrics.commit_errors.inc();
                            tracing::warn!(error = %e, "commit of revoked partitions failed; the next owner re-reads from the previous commit");
                        }
                    }
                }
                if lock(&self.tracker).assigned().is_empty() {
                    self.telemetry
                        .set_ready(Ready::Assignment, false, "no partitions assigned");
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                self.metrics.rebalances.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "rebalance error");
            }
        }
    }

    /// The broker's answer to a commit (librdkafka's `offset_commit_cb`, served by the consumer's
    /// poll): asynchronous commits are recorded here; synchronous ones were recorded already
    /// (recording twice is harmless: a partition's committed offset only moves forward).
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => record_commits(&self.tracker, &self.metrics, offsets),
            // librdkafka reports an empty commit (nothing new to commit) as this error.
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.metrics.commit_errors.inc();
                tracing::debug!(error = %e, "offset commit failed; retried at the next one");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.metrics.rebalances.with_label_values(&["assign"]).inc();
            let mut tracker = lock(&self.tracker);
            for e in tpl.elements() {
                tracker.assign(e.topic(), e.partition());
            }
            let total = tracker.assigned().len();
            drop(tracker);
            tracing::info!(partitions = %describe(tpl), total, "partitions assigned");
            if total > 0 {
                self.telemetry
                    .set_ready(Ready::Assignment, true, format!("{total} partitions assigned"));
            }
        }
    }
}

/// Notes offsets that were committed in the tracker and the committed-offset metric.
fn record_commits(tracker: &Mutex<Tracker>, metrics: &Metrics, offsets: &TopicPartitionList) {
    let mut tracker = lock(tracker);
    for e in offsets.elements() {
        if let Offset::Offset(o) = e.offset() {
            tracker.committed(e.topic(), e.partition(), o);
            let part = e.partition().to_string();
            metrics.committed.with_label_values(&[e.topic(), part.as_str()]).set(o);
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Locks a mutex, recovering from poisoning (a panic elsewhere must not stop commits).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The consumer group member, with the tracker its rebalance callbacks keep in step.
pub struct Source {
    consumer: StreamConsumer<SourceContext>,
    tracker: Arc<Mutex<Tracker>>,
}

impl Source {
    /// The consumer's records as a stream (take one for the loop's life: each `recv()` would
    /// register a waker slot anew).
    pub fn stream(&self) -> rdkafka::consumer::MessageStream<'_, SourceContext> {
        self.consumer.stream()
    }

    /// Commits the finished prefix of every assigned partition that advanced, synchronously (one
    /// round trip; blocking: call it from the consumer's own thread), so the tracker and the
    /// metrics know what is committed. A failed commit (REBALANCE_IN_PROGRESS and friends) is
    /// counted and tried again at the next call.
    pub fn commit_finished(&self) {
        let Some(tpl) = self.finished_prefix() else {
            return;
        };
        match self.consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => record_commits(&self.tracker, self.consumer.context().metrics.as_ref(), &tpl),
            Err(e) => {
                self.consumer.context().metrics.commit_errors.inc();
                tracing::debug!(error = %e, "offset commit failed; retried at the next interval");
            }
        }
    }

    /// Commits the finished prefix without waiting for the broker (`CommitMode::Async`): called
    /// as soon as a batch was delivered, so a crash re-reads as little as possible. The answer
    /// arrives in [`SourceContext::commit_callback`] (tracker and metrics); a failed commit is
    /// counted there and the next commit carries the same offsets.
    pub fn commit_finished_async(&self) {
        let Some(tpl) = self.finished_prefix() else {
            return;
        };
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            self.consumer.context().metrics.commit_errors.inc();
            tracing::debug!(error = %e, "offset commit not sent; retried at the next one");
        }
    }

    /// The finished prefix of each assigned partition that advanced since its last commit.
    fn finished_prefix(&self) -> Option<TopicPartitionList> {
        let todo = lock(&self.tracker).to_commit();
        if todo.is_empty() {
            return None;
        }
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in &todo {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        Some(tpl)
    }

    /// Pauses (`true`) or resumes every partition assigned now; fetching stops, polling goes on,
    /// so the group membership survives. Partitions assigned later arrive unpaused.
    pub fn set_paused(&self, pause: bool) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        if assignment.count() == 0 {
            return;
        }
        let r = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, pause, "pause/resume failed");
        }
    }

    /// Leaves the consumer group (after the last commit); the client closes when dropped.
    pub fn leave(&self) {
        self.consumer.unsubscribe();
    }
}

/// The librdkafka settings of the consumer: the bridge's defaults, then the user's pass-through
/// properties, then the settings the bridge's guarantees depend on (which config validation
/// forbids users to set).
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("partition.assignment.strategy", "cooperative-sticky")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("statistics.interval.ms", "5000")
        // Bounds librdkafka's prefetch memory (its default is 64 MiB per client).
        .set("queued.max.messages.kbytes", "16384")
        .set("enable.partition.eof", "false");
    // Validated at start-up (`Config::validate`); a file that became unreadable since is skipped
    // here and librdkafka reports what is missing.
    for (k, v) in cfg.client_properties().unwrap_or_default() {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    if let Some(id) = &cfg.group_instance_id {
        c.set("group.instance.id", id);
    }
    c
}

/// Creates the consumer and subscribes to the configured topics or pattern; its metrics and the
/// `assignment` readiness condition go to `telemetry`.
///
/// Errors: librdkafka refused the client settings or the subscription.
pub fn subscribe(cfg: &KafkaConfig, tracker: Arc<Mutex<Tracker>>, telemetry: &Telemetry) -> Result<Source, KafkaError> {
    let consumer: StreamConsumer<SourceContext> = client_config(cfg).create_with_context(SourceContext {
        tracker: Arc::clone(&tracker),
        telemetry: telemetry.clone(),
        metrics: telemetry.metrics(),
    })?;
    match &cfg.topic_pattern {
        // librdkafka treats a subscription starting with `^` as a regular expression.
        Some(p) => {
            let p = if p.starts_with('^') { p.clone() } else { format!("^{p}") };
            consumer.subscribe(&[p.as_str()])?
        }
        None => {
            let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)?
        }
    }
    Ok(Source { consumer, tracker })
}
