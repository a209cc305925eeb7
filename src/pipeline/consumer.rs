//! The consumer loop: read records, map them, hand events over to the lanes; commit and pause.
//!
//! It runs on a thread and runtime of its own (see `pipeline::run`). Records are read in bursts
//! (a record and whatever else is ready, up to [`BURST`]); each is begun in the tracker, mapped,
//! and finished at once (filtered), dead-lettered (mapping or validation failure, or too large),
//! or queued for its partition's lane. Every `commit_interval` the finished prefix is committed.
//! While [`Backpressure`] says too many records are unfinished, the partitions are paused and the
//! loop keeps polling, so the group membership survives any outage (invariants 4 and 8). The
//! decision is the source's pause state ([`Source::set_paused`]), which every partition assigned
//! later follows too. At each commit tick the source also refreshes its partitions' end offsets
//! and the stuck-partition check ([`Source::watch`]), fed with what each burst read.

use super::lane::Pending;
use super::outcome::{Held, Outcome, Outcomes};
use crate::dedupe::Deduper;
use crate::dlq::Reason;
use crate::mapping::{MapOutcome, Mapper, SourceRecord};
use crate::source::{Record, RecordId, Source};
use crate::telemetry::Family;
use futures::{FutureExt, StreamExt};
use prometheus::Registry;
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Most records the consumer loop handles in one burst before it looks at its timers and the
/// in-flight bound again. The bound can be passed by up to `BURST - 1` records.
pub(crate) const BURST: usize = 256;

/// Least time between two commits on delivery (`kafka.commit_on_delivery`). At the rate limit
/// (a request a second) every delivered batch is committed at once; at full speed (hundreds of
/// batches a second) one commit covers the batches of 100 ms: a commit per batch cost the bridge
/// about a fifth more CPU per event in `cargo bench --bench e2e` (5.2 → 6.4 s per million
/// events, medians of three runs on the project's 2-core VM).
const COMMIT_SPACING: Duration = Duration::from_millis(100);

/// The consumer loop's gauges.
pub(super) struct Metrics {
    in_flight: prometheus::IntGauge,
    oldest_age: prometheus::Gauge,
    paused: prometheus::IntGauge,
    offset_gaps: prometheus::IntGauge,
}

impl Family for Metrics {
    fn register(r: &Registry) -> prometheus::Result<Metrics> {
        Ok(Metrics {
    in_flight: prometheus::register_int_gauge_with_registry!(
        "datapulse_bridge_records_in_flight",
        "Records read from Kafka that have no outcome yet.",
        r
    )?,
    oldest_age: prometheus::register_gauge_with_registry!(
        "datapulse_bridge_oldest_unfinished_record_age_seconds",
        "How long the oldest record without an outcome has been in the bridge (0 when none).",
        r
    )?,
    paused: prometheus::register_int_gauge_with_registry!(
        "datapulse_bridge_consumer_paused",
        "1 while the bridge pauses its partitions because too many records are unfinished (every partition assigned meanwhile is paused as it arrives).",
        r
    )?,
    offset_gaps: prometheus::register_int_gauge_with_registry!(
        "datapulse_bridge_offset_gaps",
        "Times a partition's next record skipped offsets (compaction and transaction markers do this; so does a broker that loses records).",
        r
    )?,
        })
    }
}

/// Pause on full (invariant 8): pause at `max_in_flight_records` unfinished records, resume at
/// half of it. What it decides is handed to [`Source::set_paused`], the one pause state of the
/// bridge, which partitions assigned later follow as they arrive.
#[derive(Debug)]
pub(crate) struct Backpressure {
    max_in_flight: usize,
    paused: bool,
}

impl Backpressure {
    pub fn new(max_in_flight: usize) -> Backpressure {
        Backpressure {
            max_in_flight,
            paused: false,
        }
    }

    /// Whether the partitions must now be paused (`Some(true)`) or resumed (`Some(false)`), given
    /// the unfinished records; `None` while nothing changes.
    pub fn update(&mut self, in_flight: usize) -> Option<bool> {
        if !self.paused && in_flight >= self.max_in_flight {
            self.paused = true;
            Some(true)
        } else if self.paused && in_flight <= self.max_in_flight / 2 {
            self.paused = false;
            Some(false)
        } else {
            None
        }
    }
}

/// What the consumer loop hands records to.
pub(super) struct Reader {
    pub mapper: Arc<Mapper>,
    /// Takes each event's dedupe keys once, when it is mapped.
    pub deduper: Arc<Deduper>,
    pub outcomes: Arc<Outcomes>,
    /// Each lane's queue; a partition always goes to the same lane.
    pub lanes: Vec<mpsc::UnboundedSender<Vec<Pending>>>,
    /// `batch.max_bytes` less the request body's brackets: a larger event can never be sent.
    pub max_event_bytes: usize,
    pub max_in_flight: usize,
    pub commit_interval: Duration,
    /// `kafka.commit_on_delivery`.
    pub commit_on_delivery: bool,
    pub metrics: Arc<Metrics>,
}

impl Reader {
    /// Reads until `shutdown` fires; then stops reading (pauses every partition, begins no record
    /// fetched before the pause) and goes on committing what the lanes finish until `drained`
    /// fires (the lanes ended: the drain is over).
    pub async fn run(self, source: &Source, shutdown: &CancellationToken, drained: &CancellationToken) {
        let mut commit_tick = tokio::time::interval(self.commit_interval);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut recheck = tokio::time::interval(Duration::from_millis(200));
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One stream for the loop's life (each `recv()` would register a waker slot anew).
        let mut stream = source.stream();
        let mut backpressure = Backpressure::new(self.max_in_flight);
        let mut topics = Topics::default();
        let mut draining = false;
        // Commits on delivery: at most one per `COMMIT_SPACING`; a delivery meanwhile is committed
        // when the spacing has passed.
        let mut last_async = tokio::time::Instant::now() - COMMIT_SPACING;
        let mut commit_owed = false;
        loop {
            tokio::select! {
                biased;
                _ = drained.cancelled() => break,
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    source.set_paused(true);
                    tracing::info!("shutting down: reading stopped; commits go on while in-flight work ends");
                    continue;
                }
                _ = commit_tick.tick() => {
                    // Blocking, on purpose: this loop has its own thread (see `pipeline::run`).
                    source.commit_finished();
                    source.watch(Instant::now());
                    self.export_gauges(source);
                }
                // A batch was delivered: commit now, without waiting for the broker's answer
                // (issue: a crash re-reads what was delivered since the last commit).
                _ = self.outcomes.commit_wanted(), if self.commit_on_delivery && !commit_owed => {
                    if last_async.elapsed() >= COMMIT_SPACING {
                        source.commit_finished_async();
                        last_async = tokio::time::Instant::now();
                    } else {
                        commit_owed = true;
                    }
                }
                _ = tokio::time::sleep_until(last_async + COMMIT_SPACING), if commit_owed => {
                    source.commit_finished_async();
                    last_async = tokio::time::Instant::now();
                    commit_owed = false;
                }
                // While no record arrives (paused, or idle), the pause check below still runs.
                _ = recheck.tick() => {}
                m = stream.next() => {
                    if draining {
                        // Fetched before the pause took effect: not begun, so the next owner
                        // reads it.
                        continue;
                    }
                    // A burst: this record and whatever else is ready now, handed to the lanes
                    // as one chunk each (a wake-up of the delivery side per burst, not per
                    // record). Empty until used: most bursts are a record or two when traffic
                    // is low.
                    let mut chunks: Vec<Vec<Pending>> = self.lanes.iter().map(|_| Vec::new()).collect();
                    // The highest offset read of each partition in this burst (for the
                    // stuck-partition check).
                    let mut reads: Vec<(Arc<str>, i32, i64)> = Vec::new();
                    let (mut next, mut taken) = (m, 1);
                    let read_at = Instant::now();
                    loop {
                        match next {
                            Some(Ok(msg)) => {
                                let (topic, n) = topics.intern(msg.topic());
                                let lane = (n + msg.partition().unsigned_abs() as usize) % chunks.len();
                                note_read(&mut reads, &topic, msg.partition(), msg.offset());
                                self.handle(&msg, topic, &mut chunks[lane], read_at);
                            }
                            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                            None => break,
                        }
                        // Take another only to handle it: a record taken from the stream and not
                        // handled would be skipped (its offset committed past).
                        if taken == BURST {
                            break;
                        }
                        match stream.next().now_or_never() {
                            Some(m) => (next, taken) = (m, taken + 1),
                            None => break,
                        }
                    }
                    self.hand_over(chunks);
                    source.read(reads.iter().map(|(t, p, o)| (&**t, *p, *o)), read_at);
                }
            }
            if draining {
                continue;
            }
            let in_flight = self.outcomes.in_flight();
            match backpressure.update(in_flight) {
                Some(true) => {
                    source.set_paused(true);
                    self.metrics.paused.set(1);
                    tracing::info!(
                        in_flight,
                        "too many unfinished records: partitions paused (still polling)"
                    );
                }
                Some(false) => {
                    source.set_paused(false);
                    self.metrics.paused.set(0);
                    tracing::info!(in_flight, "partitions resumed");
                }
                None => {}
            }
        }
        source.set_paused(true);
    }

    /// The tracker's gauges and the pause state, refreshed at each commit tick.
    fn export_gauges(&self, source: &Source) {
        self.metrics.paused.set(i64::from(source.paused()));
        let (in_flight, oldest, gaps) = {
            let t = self.outcomes.tracker().lock();
            (t.in_flight(), t.oldest_unfinished(), t.gaps())
        };
        self.metrics.offset_gaps.set(gaps as i64);
        self.metrics.in_flight.set(in_flight as i64);
        self.metrics
            .oldest_age
            .set(oldest.map_or(0.0, |o| o.elapsed().as_secs_f64()));
    }

    fn hand_over(&self, chunks: Vec<Vec<Pending>>) {
        for (lane, chunk) in self.lanes.iter().zip(chunks) {
            if !chunk.is_empty() && lane.send(chunk).is_err() {
                tracing::error!("delivery loop has stopped; records left unfinished");
            }
        }
    }

    /// Takes one record to its outcome or into `out`, its lane's chunk.
    fn handle(&self, msg: &BorrowedMessage<'_>, topic: Arc<str>, out: &mut Vec<Pending>, read_at: Instant) {
        let id = RecordId {
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
        };
        let Some(epoch) = self.outcomes.begin(&id, read_at) else {
            // Fetched before its partition was revoked: the new owner reads it.
            tracing::warn!(topic = %id.topic, partition = id.partition, offset = id.offset,
                "record of a partition not assigned to this process ignored");
            return;
        };
        let held = Held {
            record: Record::from_message(msg, id),
            epoch,
        };
        let rec = &held.record;
        let headers: Vec<(&str, Option<&[u8]>)> = rec.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        let src = SourceRecord {
            topic: &rec.id.topic,
            partition: rec.id.partition,
            offset: rec.id.offset,
            timestamp_ms: rec.timestamp_ms,
            key: rec.key.as_deref(),
            value: rec.value.as_deref(),
            headers: &headers,
        };
        let mut json = Vec::with_capacity(256);
        let why = match self.mapper.map_for_delivery(&src, self.max_event_bytes, &mut json) {
            MapOutcome::Event(event) => {
                let (keys, timestamp) = (self.deduper.keys_of(&event, &held.record.id), event.timestamp);
                if headers.iter().any(|(k, _)| *k == "dp.replayed_from") {
                    self.deduper.replayed(&keys);
                }
                drop(event);
                drop(headers);
                out.push(Pending {
                    held,
                    keys,
                    timestamp,
                    json,
                });
                return;
            }
            MapOutcome::Filtered { code, reason } => {
                tracing::debug!(record = %rec.id, %reason, "record filtered");
                drop(headers);
                self.outcomes.finish(&held, Outcome::Filtered(code));
                return;
            }
            MapOutcome::Failed(err) => {
                let field = err.field.as_deref().unwrap_or("-");
                Reason {
                    stage: err.stage.as_str(),
                    field: err.field.clone(),
                    code: err.reason.clone(),
                    message: format!("record {}: field `{field}`: {}", rec.id, err.message),
                    http_status: None,
                }
            }
        };
        self.outcomes.dead_letter(held, why, None);
    }
}

/// Notes `offset` of a partition as read in a burst's `reads` (one entry a partition, the highest
/// offset). A burst holds a few partitions: a scan is cheaper than hashing.
fn note_read(reads: &mut Vec<(Arc<str>, i32, i64)>, topic: &Arc<str>, partition: i32, offset: i64) {
    match reads
        .iter_mut()
        .find(|(t, p, _)| *p == partition && Arc::ptr_eq(t, topic))
    {
        Some((_, _, o)) => *o = (*o).max(offset),
        None => reads.push((Arc::clone(topic), partition, offset)),
    }
}

/// The topics read so far: each name shared by its records, and its number (in order of first
/// sight; it spreads topics over lanes).
#[derive(Default)]
struct Topics(Vec<Arc<str>>);

impl Topics {
    fn intern(&mut self, topic: &str) -> (Arc<str>, usize) {
        if let Some(i) = self.0.iter().position(|t| &**t == topic) {
            return (Arc::clone(&self.0[i]), i);
        }
        self.0.push(Arc::from(topic));
        (Arc::clone(&self.0[self.0.len() - 1]), self.0.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::Backpressure;

    #[test]
    fn pauses_at_the_bound_and_resumes_at_half_of_it() {
        let mut b = Backpressure::new(100);
        assert_eq!(b.update(99), None);
        assert_eq!(b.update(100), Some(true));
        assert_eq!(b.update(300), None, "paused once");
        assert_eq!(b.update(51), None, "still over half");
        assert_eq!(b.update(50), Some(false));
        assert_eq!(b.update(50), None);
    }
}
