//! Everything that speaks Kafka consumer: client settings, subscription, the record type, the
//! rebalance callbacks, periodic and revoke commits, pause and resume.
//!
//! Offsets are never stored or committed by librdkafka on its own (`enable.auto.commit=false`,
//! `enable.auto.offset.store=false`): [`Source::commit_finished`] commits the finished prefix the
//! tracker (`offsets`) computes. On a revoke the finished prefix of the revoked partitions is
//! committed synchronously inside the callback and their epoch ends, so work still in flight for
//! them is never committed by this process (invariant 9).
//!
//! The bridge's pause state is the truth on every assignment: librdkafka keeps a partition's
//! pause across a revoke and a re-assignment, so each newly assigned partition is paused or resumed
//! to match [`Source::set_paused`] at once, inside the assign callback (issue 25). Every assigned
//! partition's progress is watched ([`watch`]): its end offset is asked from the broker (not taken
//! from librdkafka's statistics, whose `hi_offset` only a Fetch response updates, so it freezes
//! while a partition is paused and carries over a revoke), and a partition that should be read and
//! is not turns readiness false.

mod config;
pub mod headers;
pub mod watch;

use crate::offsets::Tracker;
pub use crate::offsets::{Epoch, RecordId};
use crate::telemetry::{Family, Ready, Telemetry};
pub use config::{
    is_secret_property, KafkaConfig, KafkaProperties, PropertiesFileError, LIBRDKAFKA_SENSITIVE, RESERVED_PROPERTIES,
};
use parking_lot::Mutex;
use prometheus::Registry;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, ClientContext, Message};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use watch::Watch;

/// How often [`Source::watch`] asks the broker for the end offsets of the assigned partitions
/// (one ListOffsets request per leader broker).
const WATERMARK_INTERVAL: Duration = Duration::from_secs(5);

/// How soon [`Source::watch`] asks again while a partition's end offset is unknown (just
/// assigned, or the broker did not answer for it).
const ENDS_MISSING_RETRY: Duration = Duration::from_millis(500);
/// How long [`Source::watch`] waits for one answer of the broker (blocking the consumer loop).
const BROKER_TIMEOUT: Duration = Duration::from_secs(1);

/// A record as read from Kafka, owned, kept until its outcome (a dead letter needs the original).
#[derive(Debug, Clone)]
pub struct Record {
    pub id: RecordId,
    /// The record's Kafka timestamp (create or log-append time), Unix ms.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// The record's headers in order, each value as the broker gave it: `None` for a header
    /// without a value (Kafka allows one, and it differs from an empty value: a dead letter
    /// writes it again without a value).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    /// Copies a record out of librdkafka's buffer. `id`: its identity, with the topic's shared
    /// name.
    pub fn from_message(m: &BorrowedMessage<'_>, id: RecordId) -> Record {
        let headers = headers::of(m);
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
    pub commit_regressions: prometheus::IntCounter,
    pub stuck: prometheus::IntGauge,
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
                "High watermark (end offset) of each assigned partition, asked from the broker every 5 s.",
                &["topic", "partition"],
                r
            )?,
            lag: prometheus::register_int_gauge_vec_with_registry!(
                "datapulse_bridge_partition_lag",
                "High watermark minus committed offset (this process's last commit, else the group's offset at assignment), per assigned partition.",
                &["topic", "partition"],
                r
            )?,
            commit_errors: prometheus::register_int_counter_with_registry!(
                "datapulse_bridge_commit_errors_total",
                "Offset commits that failed (retried at the next commit interval).",
                r
            )?,
            commit_regressions: prometheus::register_int_counter_with_registry!(
                "datapulse_bridge_commit_regressions_total",
                "Times the group's committed offset of an assigned partition was found behind what this process committed (another member committed an older offset, or the broker lost a commit); the finished prefix is committed again.",
                r
            )?,
            stuck: prometheus::register_int_gauge_with_registry!(
                "datapulse_bridge_partitions_stuck",
                "Assigned partitions not paused by the bridge, with records to read and none read for kafka.stuck_after.",
                r
            )?,
        })
    }
}

/// The consumer's context: keeps the tracker and the watch in step with the group's assignment,
/// and applies the bridge's pause state to every partition assigned.
pub struct SourceContext {
    pub tracker: Arc<Mutex<Tracker>>,
    telemetry: Telemetry,
    metrics: Arc<Metrics>,
    /// The bridge's pause state, set by [`Source::set_paused`], read on every assignment.
    paused: AtomicBool,
    watch: Mutex<Watch>,
}

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                let lost = consumer.assignment_lost();
                let mut commit = TopicPartitionList::new();
                {
                    let mut tracker = self.tracker.lock();
                    for e in tpl.elements() {
                        if let Some(o) = tracker.revoke(e.topic(), e.partition()) {
                            if !lost {
                                let _ = commit.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o));
                            }
                        }
                        self.watch.lock().revoke(e.topic(), e.partition());
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
                // The partitions are another member's now: their committed offsets are not this
                // process's to export (a late answer to an asynchronous commit is ignored too).
                for e in tpl.elements() {
                    let part = e.partition().to_string();
                    let _ = self.metrics.committed.remove_label_values(&[e.topic(), part.as_str()]);
                }
                if self.tracker.lock().assigned().is_empty() {
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

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.metrics.rebalances.with_label_values(&["assign"]).inc();
            let now = Instant::now();
            let mut tracker = self.tracker.lock();
            let mut watch = self.watch.lock();
            for e in tpl.elements() {
                tracker.assign(e.topic(), e.partition());
                watch.assign(e.topic(), e.partition(), now);
            }
            let total = tracker.assigned().len();
            drop((tracker, watch));
            // librdkafka keeps a partition's pause across a revoke and a re-assignment: a partition
            // paused here before it moved away would come back paused and never be read (issue
            // 25). The bridge's state decides, for each partition as it arrives.
            let paused = self.paused.load(Ordering::SeqCst);
            if tpl.count() > 0 {
                let r = if paused {
                    consumer.pause(tpl)
                } else {
                    consumer.resume(tpl)
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, paused, partitions = %describe(tpl), "pause/resume of assigned partitions failed");
                }
            }
            tracing::info!(partitions = %describe(tpl), total, paused, "partitions assigned");
            if total > 0 {
                self.telemetry
                    .set_ready(Ready::Assignment, true, format!("{total} partitions assigned"));
            }
        }
    }
}

/// Notes offsets that were committed in the tracker and the committed-offset metric.
fn record_commits(tracker: &Mutex<Tracker>, metrics: &Metrics, offsets: &TopicPartitionList) {
    let mut tracker = tracker.lock();
    for e in offsets.elements() {
        if let Offset::Offset(o) = e.offset() {
            tracker.committed(e.topic(), e.partition(), o);
            let part = e.partition().to_string();
            // Only forward, and only for partitions still assigned: an asynchronous commit's
            // answer may come after a later commit's, or after the revoke.
            if !tracker.is_assigned(e.topic(), e.partition()) {
                continue;
            }
            let gauge = metrics.committed.with_label_values(&[e.topic(), part.as_str()]);
            if o > gauge.get() {
                gauge.set(o);
            }
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

/// Sets readiness `assignment` false with `reason` before a consumer exists (start-up): the
/// condition is this module's, which sets it true when partitions are assigned and false when the
/// last is revoked.
pub fn awaiting_assignment(telemetry: &Telemetry, reason: &str) {
    telemetry.set_ready(Ready::Assignment, false, reason);
}

/// The consumer group member, with the tracker its rebalance callbacks keep in step.
pub struct Source {
    consumer: StreamConsumer<SourceContext>,
    tracker: Arc<Mutex<Tracker>>,
    /// `kafka.stuck_after`.
    stuck_after: Duration,
    /// Whether a partition without a committed offset starts at the log's end
    /// (`auto.offset.reset` = `latest`, `largest` or `end`) rather than its start.
    reset_to_end: bool,
    /// When the broker was last asked for end offsets.
    asked_at: Mutex<Option<Instant>>,
    /// The partitions found stuck at the last check (logged when the set changes).
    stuck: Mutex<Vec<(String, i32)>>,
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
        let todo = self.tracker.lock().to_commit();
        if todo.is_empty() {
            return None;
        }
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in &todo {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        Some(tpl)
    }

    /// Sets the bridge's pause state: pauses (`true`) or resumes every partition assigned now, and
    /// every partition assigned later is paused or resumed to match as it arrives. Fetching stops,
    /// polling goes on, so the group membership survives. A resume restarts the clock of the
    /// stuck-partition check.
    pub fn set_paused(&self, pause: bool) {
        let ctx = self.consumer.context();
        ctx.paused.store(pause, Ordering::SeqCst);
        if !pause {
            ctx.watch.lock().resumed(Instant::now());
        }
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

    /// The bridge's pause state (what [`Source::set_paused`] set last).
    pub fn paused(&self) -> bool {
        self.consumer.context().paused.load(Ordering::SeqCst)
    }

    /// Notes records read at `at`: `(topic, partition, offset)`, the highest offset of each
    /// partition read in one burst (any offset of the burst is correct, the highest is exact).
    pub fn read<'a>(&self, reads: impl IntoIterator<Item = (&'a str, i32, i64)>, at: Instant) {
        let mut watch = self.consumer.context().watch.lock();
        for (topic, partition, offset) in reads {
            watch.read(topic, partition, offset, at);
        }
    }

    /// Refreshes what the bridge knows of its partitions (call it regularly; blocking, from the
    /// consumer's own thread): every [`WATERMARK_INTERVAL`] asks the broker for the end offsets
    /// of the assigned partitions (and where reading started, once per assignment); exports
    /// `datapulse_bridge_partition_high_watermark`, `datapulse_bridge_partition_lag` and
    /// `datapulse_bridge_partitions_stuck`, and sets the `partitions` readiness condition: false
    /// while any partition is stuck (see [`watch`]), naming them.
    pub fn watch(&self, now: Instant) {
        // A partition just assigned is asked for at the next tick (its lag is then exported
        // within a commit interval of the assignment), the others every `WATERMARK_INTERVAL`.
        let ends_missing = self.consumer.context().watch.lock().ends_missing();
        let due = {
            let mut asked = self.asked_at.lock();
            let due = asked.is_none_or(|a| {
                let since = now.saturating_duration_since(a);
                since >= WATERMARK_INTERVAL || (ends_missing && since >= ENDS_MISSING_RETRY)
            });
            if due {
                *asked = Some(now);
            }
            due
        };
        if due {
            self.ask_broker();
        }
        let ctx = self.consumer.context();
        let committed: HashMap<(String, i32), i64> = self
            .tracker
            .lock()
            .committed_offsets()
            .into_iter()
            .map(|(t, p, o)| ((t, p), o))
            .collect();
        let committed = |t: &str, p: i32| committed.get(&(t.to_string(), p)).copied();
        let watch = ctx.watch.lock();
        for l in watch.lags(committed) {
            let part = l.partition.to_string();
            let labels = [l.topic.as_str(), part.as_str()];
            ctx.metrics
                .high_watermark
                .with_label_values(&labels)
                .set(l.high_watermark);
            if let Some(lag) = l.lag {
                ctx.metrics.lag.with_label_values(&labels).set(lag);
            }
        }
        let assigned = watch.partitions().len();
        let stuck = watch.stuck(now, self.stuck_after, self.paused(), committed);
        drop(watch);
        ctx.metrics.stuck.set(stuck.len() as i64);
        let names = stuck
            .iter()
            .map(|(t, p)| format!("{t}/{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut last = self.stuck.lock();
        if *last != stuck {
            if stuck.is_empty() {
                tracing::info!("no partition stuck any more");
            } else {
                tracing::warn!(partitions = %names, stuck_after = ?self.stuck_after, "partitions stuck: not paused by the bridge, records to read, none read");
            }
            *last = stuck;
        }
        drop(last);
        if names.is_empty() {
            ctx.telemetry.set_ready(
                Ready::Partitions,
                true,
                format!("none of {assigned} assigned partitions stuck"),
            );
        } else {
            ctx.telemetry.set_ready(
                Ready::Partitions,
                false,
                format!(
                    "stuck (not paused by the bridge, records to read, none read for {}): {names}",
                    humantime::format_duration(self.stuck_after)
                ),
            );
        }
    }

    /// Asks the broker for the end offsets of the assigned partitions (one ListOffsets request per
    /// leader: `offsets_for_times` with the timestamp -1, "latest") and the group's committed
    /// offsets (one OffsetFetch). The committed offsets give where reading started, for
    /// partitions whose starting position is not known yet (where the group has none, the log's
    /// start or end as `auto.offset.reset` says), and check what this process committed: a
    /// group offset behind it is counted (`datapulse_bridge_commit_regressions_total`), logged,
    /// and committed again at the next commit. Partitions the broker did not answer for keep
    /// what was known; the next call asks again.
    fn ask_broker(&self) {
        let watch = &self.consumer.context().watch;
        let parts = watch.lock().partitions();
        if parts.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &parts {
            let _ = tpl.add_partition_offset(t, *p, Offset::End);
        }
        match self.consumer.offsets_for_times(tpl, BROKER_TIMEOUT) {
            Ok(got) => {
                let mut watch = watch.lock();
                for e in got.elements() {
                    if let (Ok(()), Offset::Offset(o)) = (e.error(), e.offset()) {
                        watch.set_high_watermark(e.topic(), e.partition(), o);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "end offsets not known; asked again later"),
        }
        // The group's committed offsets of every assigned partition (one OffsetFetch): where a
        // partition's reading started, once per assignment, and a check of what this process
        // committed. A broker that does not fence a member of an older generation (tansu 0.6
        // checks none) stores a commit of its revoked partitions after the new owner's, and the
        // group's offset goes back; the new owner, having committed its finished prefix, would
        // not commit again until its next record, and a partition without new records would
        // stand behind for good while the committed-offset gauge said otherwise (found by the
        // chaos test on CI: one partition 65 records behind for the whole drain).
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &parts {
            tpl.add_partition(t, *p);
        }
        let got = match self.consumer.committed_offsets(tpl, BROKER_TIMEOUT) {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(error = %e, "committed offsets not known; asked again later");
                return;
            }
        };
        let missing = watch.lock().without_start();
        let metrics = &self.consumer.context().metrics;
        for e in got.elements() {
            if e.error().is_err() {
                continue;
            }
            if let Offset::Offset(o) = e.offset() {
                let lost = self.tracker.lock().broker_committed(e.topic(), e.partition(), o);
                if let Some(had) = lost {
                    metrics.commit_regressions.inc();
                    let part = e.partition().to_string();
                    metrics.committed.with_label_values(&[e.topic(), part.as_str()]).set(o);
                    tracing::warn!(
                        partition = %format!("{}/{}", e.topic(), e.partition()),
                        committed = had,
                        group_offset = o,
                        "the group's committed offset is behind what this process committed (another member \
                         committed an older offset, or the broker lost a commit): committing again"
                    );
                }
            }
            if !missing.iter().any(|(t, p)| t == e.topic() && *p == e.partition()) {
                continue;
            }
            let start = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => self
                    .consumer
                    .fetch_watermarks(e.topic(), e.partition(), BROKER_TIMEOUT)
                    .ok()
                    .map(|(low, high)| if self.reset_to_end { high } else { low }),
            };
            if let Some(o) = start {
                watch.lock().set_start(e.topic(), e.partition(), o);
            }
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
    let client = client_config(cfg);
    let reset_to_end = matches!(client.get("auto.offset.reset"), Some("latest" | "largest" | "end"));
    let consumer: StreamConsumer<SourceContext> = client.create_with_context(SourceContext {
        tracker: Arc::clone(&tracker),
        telemetry: telemetry.clone(),
        metrics: telemetry.metrics(),
        paused: AtomicBool::new(false),
        watch: Mutex::default(),
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
    Ok(Source {
        consumer,
        tracker,
        stuck_after: cfg.stuck_after,
        reset_to_end,
        asked_at: Mutex::new(None),
        stuck: Mutex::default(),
    })
}
