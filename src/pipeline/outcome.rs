//! The one place a record's outcome is recorded and counted (invariant 1).
//!
//! Every record read is [`Held`] (with the epoch of the assignment it was read under) until it
//! reaches exactly one [`Outcome`]: delivered, duplicate, filtered or dead-lettered. Finishing it
//! moves the tracker (so its offset may be committed) and the
//! `datapulse_bridge_records_finished_total` metric together, so `consumed = finished + in_flight`
//! (+ abandoned) holds in the metrics. A record whose epoch ended meanwhile (revoked) is counted
//! with the outcome it had, but its offset is left to the new owner, who reads it again. Dead
//! letters are written in the background and finished once the broker acknowledged them.

use crate::dedupe::{Deduper, EventKeys};
use crate::dlq::{Reason, Write, WriteOnce};
use crate::event::TimestampUnit;
use crate::offsets::{Epoch, RecordId, Tracker};
use crate::source::{Metrics as SourceMetrics, Record};
use crate::telemetry::{Family, Telemetry};
use parking_lot::Mutex;
use prometheus::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The outcome a record finished with; the `&'static str` is its metric label (a duplicate's
/// reason, what filtered a record (`MapOutcome::Filtered`'s `code`), a dead letter's stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Duplicate(&'static str),
    Filtered(&'static str),
    DeadLettered(&'static str),
}

impl Outcome {
    /// The `outcome` and `reason` labels of `datapulse_bridge_records_finished_total`.
    fn labels(self) -> [&'static str; 2] {
        match self {
            Outcome::Delivered => ["delivered", ""],
            Outcome::Duplicate(r) => ["duplicate", r],
            Outcome::Filtered(r) => ["filtered", r],
            Outcome::DeadLettered(stage) => ["dead_lettered", stage],
        }
    }
}

/// Running totals of one bridge, read from its telemetry's metrics (the demo's progress line and
/// tests read them): `consumed` is `datapulse_bridge_records_consumed_total` (every record read,
/// re-reads included), the outcomes are `datapulse_bridge_records_finished_total` summed over
/// reasons, `abandoned` is `datapulse_bridge_records_abandoned_total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub consumed: u64,
    pub delivered: u64,
    pub duplicate: u64,
    pub filtered: u64,
    pub dead_lettered: u64,
    pub abandoned: u64,
}

impl Totals {
    /// The totals `telemetry` holds now.
    pub fn read(telemetry: &Telemetry) -> Totals {
        use prometheus::core::Collector;
        let metrics = telemetry.metrics::<Metrics>();
        let mut totals = Totals {
            consumed: telemetry.metrics::<SourceMetrics>().consumed.get(),
            abandoned: metrics.abandoned.get(),
            ..Totals::default()
        };
        for family in metrics.finished.collect() {
            for m in family.get_metric() {
                let outcome = m.get_label().iter().find(|l| l.name() == "outcome").map(|l| l.value());
                let slot = match outcome {
                    Some("delivered") => &mut totals.delivered,
                    Some("duplicate") => &mut totals.duplicate,
                    Some("filtered") => &mut totals.filtered,
                    Some("dead_lettered") => &mut totals.dead_lettered,
                    _ => continue,
                };
                *slot += m.get_counter().get_value() as u64;
            }
        }
        totals
    }

    /// Records that reached an outcome.
    pub fn finished(&self) -> u64 {
        self.delivered + self.duplicate + self.filtered + self.dead_lettered
    }
}

/// The outcome metrics.
pub(super) struct Metrics {
    finished: prometheus::IntCounterVec,
    abandoned: prometheus::IntCounter,
    latency: prometheus::HistogramVec,
}

impl Family for Metrics {
    fn register(r: &Registry) -> prometheus::Result<Metrics> {
        Ok(Metrics {
    finished: prometheus::register_int_counter_vec_with_registry!(
        "datapulse_bridge_records_finished_total",
        "Records that reached their outcome (delivered, duplicate, filtered, dead_lettered), by reason.",
        &["outcome", "reason"],
        r
    )?,
    abandoned: prometheus::register_int_counter_with_registry!(
        "datapulse_bridge_records_abandoned_total",
        "Records dropped unfinished because their partition was revoked or shutdown's deadline passed; they are read again.",
        r
    )?,
    latency: prometheus::register_histogram_vec_with_registry!(
        "datapulse_bridge_delivery_latency_seconds",
        "Time from the event's own timestamp (from=event) or the record's Kafka timestamp (from=kafka) to the API's 2xx.",
        &["from"],
        vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0],
        r
    )?,
        })
    }
}

/// A record the pipeline holds until its outcome, with the epoch it was read under.
#[derive(Debug)]
pub(crate) struct Held {
    pub record: Record,
    pub epoch: Epoch,
}

/// Records outcomes and writes dead letters; shared by the consumer loop and the lanes.
pub(crate) struct Outcomes {
    tracker: Arc<Mutex<Tracker>>,
    metrics: Arc<Metrics>,
    source_metrics: Arc<SourceMetrics>,
    /// Numbers the lanes' batches (for logs).
    batches: AtomicU64,
    /// Told when a batch was delivered: the consumer loop commits at once (the window a crash
    /// re-reads is then one batch, not a `commit_interval`).
    commit_wanted: tokio::sync::Notify,
    dead_letters: Arc<dyn WriteOnce>,
    /// Dedupe, to settle the keys of an event dead-lettered in doubt.
    deduper: Arc<Deduper>,
    /// Fires when shutdown's deadline passed: in-flight work is abandoned.
    abandon: CancellationToken,
    dead_letter_tasks: Mutex<JoinSet<()>>,
    /// The runtime of the delivery side, where dead-letter writes run (the consumer loop has a
    /// thread and runtime of its own).
    runtime: tokio::runtime::Handle,
}

impl Outcomes {
    /// Must be called inside the delivery side's runtime.
    pub fn new(
        tracker: Arc<Mutex<Tracker>>,
        telemetry: &Telemetry,
        dead_letters: Arc<dyn WriteOnce>,
        deduper: Arc<Deduper>,
    ) -> Outcomes {
        Outcomes {
            tracker,
            metrics: telemetry.metrics(),
            source_metrics: telemetry.metrics(),
            batches: AtomicU64::new(0),
            commit_wanted: tokio::sync::Notify::new(),
            dead_letters,
            deduper,
            abandon: CancellationToken::new(),
            dead_letter_tasks: Mutex::new(JoinSet::new()),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    pub fn tracker(&self) -> &Mutex<Tracker> {
        &self.tracker
    }

    /// Completes once a batch was delivered since the last call returned (deliveries meanwhile
    /// are folded into one).
    pub async fn commit_wanted(&self) {
        self.commit_wanted.notified().await
    }

    /// The next batch's number (1, 2, …), for logs.
    pub fn next_batch(&self) -> u64 {
        self.batches.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Begins a record read from Kafka (counted consumed, unfinished in the tracker); the epoch
    /// it is read under, or `None` for a partition not assigned to this process (fetched before a
    /// revoke took effect: it is dropped unprocessed; `records_consumed_total` counts every record
    /// read).
    pub fn begin(&self, id: &RecordId, read_at: std::time::Instant) -> Option<Epoch> {
        self.source_metrics.consumed.inc();
        self.tracker.lock().begin(id, read_at)
    }

    /// Records read and not finished.
    pub fn in_flight(&self) -> usize {
        self.tracker.lock().in_flight()
    }

    /// Fires when shutdown's deadline passed.
    pub fn abandon_token(&self) -> &CancellationToken {
        &self.abandon
    }

    /// Records dropped unfinished (revoked, or shutdown's deadline): they are read again.
    pub fn abandoned(&self, n: usize) {
        self.metrics.abandoned.inc_by(n as u64);
    }

    pub fn finish(&self, held: &Held, outcome: Outcome) {
        self.finish_all([held], outcome);
    }

    /// Finishes records with one outcome: one lock of the tracker and one metric update for all.
    ///
    /// The outcome is counted even for a record whose partition was revoked meanwhile: it
    /// happened (the API accepted the event, the dead letter is in the topic), so the counts of
    /// the group add up to what the API and the topic hold; only the offset is not this
    /// process's to commit any more (the tracker ignores it), and the partition's new owner,
    /// reading the record again, counts what it finds (a duplicate).
    pub fn finish_all<'r>(&self, records: impl IntoIterator<Item = &'r Held>, outcome: Outcome) {
        let (mut counted, mut revoked) = (0u64, 0u64);
        {
            let mut tracker = self.tracker.lock();
            for h in records {
                counted += 1;
                if !tracker.finish(&h.record.id, h.epoch) {
                    revoked += 1;
                }
            }
        }
        if revoked > 0 {
            tracing::debug!(
                records = revoked,
                ?outcome,
                "outcome of records whose partition was revoked meanwhile: not committed here"
            );
        }
        if counted == 0 {
            return;
        }
        self.metrics
            .finished
            .with_label_values(&outcome.labels())
            .inc_by(counted);
    }

    /// Finishes records the API answered 2xx for, observing their delivery latency: from the
    /// event's own `timestamp` (in `unit`) and from the record's Kafka timestamp.
    pub fn delivered(&self, records: &[(&Held, i64)], unit: TimestampUnit) {
        let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e6;
        let from_event = self.metrics.latency.with_label_values(&["event"]);
        let from_kafka = self.metrics.latency.with_label_values(&["kafka"]);
        for (held, timestamp) in records {
            let event_ms = match unit {
                TimestampUnit::Seconds => *timestamp as f64 * 1000.0,
                TimestampUnit::Milliseconds => *timestamp as f64,
            };
            from_event.observe(((now_ms - event_ms) / 1000.0).max(0.0));
            if let Some(k) = held.record.timestamp_ms {
                from_kafka.observe(((now_ms - k as f64) / 1000.0).max(0.0));
            }
        }
        self.finish_all(records.iter().map(|(h, _)| *h), Outcome::Delivered);
        self.commit_wanted.notify_one();
    }

    /// Dead-letters a record in the background; it is finished once the dead letter is in the
    /// topic. `doubt`: the keys of an event judged in doubt, held until its dead letter is
    /// written (then the id stays in doubt; if the write did not happen it is released).
    pub fn dead_letter(self: &Arc<Self>, held: Held, why: Reason, doubt: Option<EventKeys>) {
        tracing::warn!(record = %held.record.id, stage = why.stage, reason = %why.code, error = %why.message,
            "record dead-lettered");
        let outcomes = Arc::clone(self);
        let mut tasks = self.dead_letter_tasks.lock();
        while tasks.try_join_next().is_some() {}
        let fut = async move {
            let dedupe_key = doubt.as_ref().and_then(EventKeys::key);
            let write = outcomes
                .dead_letters
                .write_once(&held.record, &why, dedupe_key, &outcomes.abandon)
                .await;
            if let Some(keys) = &doubt {
                if write == Write::Cancelled {
                    outcomes.deduper.release(&[keys]).await;
                } else {
                    outcomes.deduper.doubt_dead_lettered(&[keys]).await;
                }
            }
            match write {
                Write::Written => {
                    outcomes.finish(&held, Outcome::DeadLettered(why.stage));
                    outcomes.commit_wanted.notify_one();
                }
                // Read again after its dead letter was written (a crash, a rebalance): counted
                // once across the group, by whoever wrote it.
                Write::AlreadyWritten => outcomes.finish(&held, Outcome::Duplicate("dead_lettered")),
                Write::Cancelled => {}
            }
        };
        tasks.spawn_on(fut, &self.runtime);
    }

    /// Waits for the dead-letter writes under way until `deadline`; whether all ended.
    pub async fn drain_dead_letters(&self, deadline: tokio::time::Instant) -> bool {
        let mut tasks = std::mem::take(&mut *self.dead_letter_tasks.lock());
        tokio::time::timeout_at(deadline, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_ok()
    }
}
