//! Wiring the stages together: source → mapping → batch → dedupe → deliver → outcome → commit,
//! and graceful shutdown.
//!
//! Two tasks. The *consumer loop* reads records, maps them, finishes filtered ones at once, sends
//! mapping failures to the dead-letter topic, queues events for delivery, commits the finished
//! prefix every `commit_interval`, and pauses its partitions while too many records are
//! unfinished (it keeps polling, so the group membership survives any outage). The *delivery
//! loop* cuts batches under the count, byte and linger limits and takes each batch through dedupe
//! and delivery, one batch at a time, which keeps per-partition order in what reaches the API.
//! Every record read ends in exactly one outcome: delivered, duplicate, filtered or
//! dead-lettered; only then does its offset become committable.

use crate::batch::BatchConfig;
use crate::config::Config;
use crate::dedupe::{DeadLetterClaim, Deduper, EventKeys, Verdict};
use crate::deliver::{Deliverer, EventResult};
use crate::dlq::{DeadLetters, Reason};
use crate::event::TimestampUnit;
use crate::mapping::{MapOutcome, Mapper, SourceRecord};
use crate::offsets::{Ticket, Tracker};
use crate::source::{self, lock, Source, METRICS as SOURCE_METRICS};
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A record as read from Kafka, owned, kept until its outcome (a dead letter needs the original).
#[derive(Debug, Clone)]
pub struct OwnedRecord {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OwnedRecord {
    pub fn from_message(m: &BorrowedMessage<'_>, topic: Arc<str>) -> OwnedRecord {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        OwnedRecord {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// `topic/partition/offset`, the name of a record in messages.
    pub fn coordinates(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// The outcome a record finished with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Duplicate(&'static str),
    Filtered,
    DeadLettered(&'static str),
}

impl Outcome {
    fn labels(self) -> [&'static str; 2] {
        match self {
            Outcome::Delivered => ["delivered", ""],
            Outcome::Duplicate(r) => ["duplicate", r],
            Outcome::Filtered => ["filtered", ""],
            Outcome::DeadLettered(stage) => ["dead_lettered", stage],
        }
    }
}

/// Running totals of the pipeline, for the demo's progress display and for tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub consumed: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicate: AtomicU64,
    pub filtered: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub batches: AtomicU64,
}

impl Counters {
    pub fn finished(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
            + self.duplicate.load(Ordering::Relaxed)
            + self.filtered.load(Ordering::Relaxed)
            + self.dead_lettered.load(Ordering::Relaxed)
    }
}

struct Metrics {
    finished: prometheus::IntCounterVec,
    in_flight: prometheus::IntGauge,
    oldest_age: prometheus::Gauge,
    latency: prometheus::HistogramVec,
    abandoned: prometheus::IntCounter,
    paused: prometheus::IntGauge,
    build_info: prometheus::IntGaugeVec,
    shutdowns: prometheus::IntCounterVec,
    offset_gaps: prometheus::IntGauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    Metrics {
    finished: prometheus::register_int_counter_vec!(
        "datapulse_bridge_records_finished_total",
        "Records that reached their outcome (delivered, duplicate, filtered, dead_lettered), by reason.",
        &["outcome", "reason"]
    )
    .expect("metric registers once"),
    in_flight: prometheus::register_int_gauge!(
        "datapulse_bridge_records_in_flight",
        "Records read from Kafka that have no outcome yet."
    )
    .expect("metric registers once"),
    oldest_age: prometheus::register_gauge!(
        "datapulse_bridge_oldest_unfinished_record_age_seconds",
        "How long the oldest record without an outcome has been in the bridge (0 when none)."
    )
    .expect("metric registers once"),
    latency: prometheus::register_histogram_vec!(
        "datapulse_bridge_delivery_latency_seconds",
        "Time from the event's own timestamp (from=event) or the record's Kafka timestamp (from=kafka) to the API's 2xx.",
        &["from"],
        vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0]
    )
    .expect("metric registers once"),
    abandoned: prometheus::register_int_counter!(
        "datapulse_bridge_records_abandoned_total",
        "Records dropped unfinished because their partition was revoked or shutdown's deadline passed; they are read again."
    )
    .expect("metric registers once"),
    paused: prometheus::register_int_gauge!(
        "datapulse_bridge_consumer_paused",
        "1 while the consumer's partitions are paused because too many records are unfinished."
    )
    .expect("metric registers once"),
    build_info: prometheus::register_int_gauge_vec!(
        "datapulse_bridge_build_info",
        "Build information (always 1).",
        &["version"]
    )
    .expect("metric registers once"),
    shutdowns: prometheus::register_int_counter_vec!(
        "datapulse_bridge_shutdowns_total",
        "Graceful shutdowns, by how in-flight work ended (drained, abandoned).",
        &["result"]
    )
    .expect("metric registers once"),
    offset_gaps: prometheus::register_int_gauge!(
        "datapulse_bridge_offset_gaps",
        "Times a partition's next record skipped offsets (compaction and transaction markers do this; so does a broker that loses records)."
    )
    .expect("metric registers once"),
}
});

/// Records outcomes: tracker, counters and metrics move together.
#[derive(Clone)]
struct Finisher {
    tracker: Arc<Mutex<Tracker>>,
    counters: Arc<Counters>,
}

impl Finisher {
    fn finish(&self, rec: &OwnedRecord, ticket: &Ticket, outcome: Outcome) {
        self.finish_all([(rec, ticket)], outcome);
    }

    /// Finishes records with one outcome: one lock of the tracker and one metric update for all.
    fn finish_all<'r>(&self, records: impl IntoIterator<Item = (&'r OwnedRecord, &'r Ticket)>, outcome: Outcome) {
        let (mut counted, mut revoked) = (0u64, 0u64);
        {
            let mut tracker = lock(&self.tracker);
            for (rec, ticket) in records {
                if tracker.finish(&rec.topic, ticket) {
                    counted += 1;
                } else {
                    // The partition was revoked meanwhile: the new owner reads the record again.
                    revoked += 1;
                }
            }
        }
        if revoked > 0 {
            METRICS.abandoned.inc_by(revoked);
        }
        if counted == 0 {
            return;
        }
        METRICS.finished.with_label_values(&outcome.labels()).inc_by(counted);
        let c = match outcome {
            Outcome::Delivered => &self.counters.delivered,
            Outcome::Duplicate(_) => &self.counters.duplicate,
            Outcome::Filtered => &self.counters.filtered,
            Outcome::DeadLettered(_) => &self.counters.dead_lettered,
        };
        c.fetch_add(counted, Ordering::Relaxed);
    }
}

/// An event waiting for delivery, with the record it came from. The event itself is not kept
/// (it borrows from the record): only what the later stages need of it.
struct Pending {
    rec: OwnedRecord,
    ticket: Ticket,
    /// Its dedupe keys, taken once.
    keys: EventKeys,
    /// Its `timestamp`, for the delivery latency.
    timestamp: i64,
    /// The event's JSON, serialised once (its length sizes the batch; the request body joins
    /// them).
    json: Vec<u8>,
}

/// Everything the pipeline shares between its tasks.
struct Shared {
    finisher: Finisher,
    dlq: DeadLetters,
    /// Fires when shutdown's deadline passed: in-flight work is abandoned.
    abandon: CancellationToken,
    dlq_tasks: Mutex<JoinSet<()>>,
    /// Dedupe, shared by the delivery loop and the dead-letter writes.
    deduper: Arc<Deduper>,
    /// The runtime of the delivery side, where dead-letter writes run (the consumer loop has a
    /// thread and runtime of its own).
    runtime: tokio::runtime::Handle,
}

impl Shared {
    /// Dead-letters a record in the background; it is finished once the broker acknowledged.
    /// `doubt`: the keys of an event judged in doubt, held until its dead letter is written.
    fn dead_letter(self: &Arc<Self>, rec: OwnedRecord, ticket: Ticket, why: Reason, doubt: Option<EventKeys>) {
        tracing::warn!(record = %rec.coordinates(), stage = why.stage, reason = %why.code, error = %why.message,
            "record dead-lettered");
        let shared = Arc::clone(self);
        let mut tasks = lock(&self.dlq_tasks);
        while tasks.try_join_next().is_some() {}
        let fut = async move {
            // A record read again (after a crash or a rebalance, possibly by two owners at once)
            // is dead-lettered by whoever claims it first; the others finish it as the dead
            // letter it already is.
            let coords = rec.coordinates();
            let written = match shared.deduper.claim_dead_letter(&coords).await {
                DeadLetterClaim::Written => {
                    tracing::debug!(record = %coords, "already dead-lettered");
                    true
                }
                // Its last claimer died holding the claim, perhaps after the broker took the write.
                DeadLetterClaim::Lapsed { since_ms } if shared.dlq.written_since(&coords, since_ms).await => {
                    shared.deduper.dead_lettered(&coords).await;
                    true
                }
                DeadLetterClaim::Mine | DeadLetterClaim::Lapsed { .. } => {
                    let dedupe_key = doubt.as_ref().and_then(EventKeys::key);
                    if shared.dlq.send(&rec, &why, dedupe_key, &shared.abandon).await {
                        shared.deduper.dead_lettered(&coords).await;
                        true
                    } else {
                        shared.deduper.release_dead_letter(&coords);
                        false
                    }
                }
            };
            if let Some(keys) = &doubt {
                if written {
                    shared.deduper.doubt_dead_lettered(&[keys]).await;
                } else {
                    shared.deduper.release(&[keys]).await;
                }
            }
            if written {
                shared.finisher.finish(&rec, &ticket, Outcome::DeadLettered(why.stage));
            }
        };
        tasks.spawn_on(fut, &self.runtime);
    }
}

/// Runs the bridge until `shutdown` fires; then stops fetching, finishes or abandons in-flight
/// work within `shutdown.deadline`, commits, and leaves the group.
pub async fn run(cfg: Config, shutdown: CancellationToken, counters: Arc<Counters>) -> anyhow::Result<()> {
    METRICS
        .build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    crate::telemetry::set_ready(
        "assignment",
        false,
        "waiting for the consumer group to assign partitions",
    );
    let mapper = Arc::new(
        Mapper::compile(&cfg.mapping, &cfg.api.contract())
            .map_err(|e| anyhow::anyhow!("invalid mapping: {}", e.0.join("; ")))?,
    );
    let deliverer = Arc::new(Deliverer::new(&cfg.api, &cfg.delivery)?);
    // Readiness needs the API to have accepted the key once; the probe spends one request.
    let probe = Arc::clone(&deliverer);
    tokio::spawn(async move {
        match probe.probe().await {
            crate::deliver::KeyCheck::Accepted => tracing::info!("the API accepted the key"),
            other => {
                tracing::error!(result = ?other, "the API did not accept the key at start-up; delivery will halt until it does")
            }
        }
    });
    let deduper = Arc::new(Deduper::new(&cfg.dedupe).await?);
    let tracker = Arc::new(Mutex::new(Tracker::new()));
    let consumer = Arc::new(source::subscribe(&cfg.kafka, Arc::clone(&tracker))?);
    let shared = Arc::new(Shared {
        finisher: Finisher {
            tracker: Arc::clone(&tracker),
            counters: Arc::clone(&counters),
        },
        dlq: DeadLetters::new(&cfg.kafka, &cfg.dead_letter)?,
        abandon: CancellationToken::new(),
        dlq_tasks: Mutex::new(JoinSet::new()),
        runtime: tokio::runtime::Handle::current(),
        deduper: Arc::clone(&deduper),
    });
    tracing::info!(group = %cfg.kafka.group_id, topics = ?cfg.kafka.topics, pattern = ?cfg.kafka.topic_pattern,
        api = %cfg.api.base_url, dead_letter_topic = %shared.dlq.topic(), "bridge started");

    // One delivery loop per lane; a partition always goes to the same lane, so its events leave
    // in order, while the lanes' requests are in flight together.
    let mut lanes = Vec::new();
    let mut lane_tasks = Vec::new();
    for _ in 0..cfg.delivery.concurrency.max(1) {
        let (tx, rx) = mpsc::unbounded_channel::<Vec<Pending>>();
        lanes.push(tx);
        lane_tasks.push(tokio::spawn(delivery_loop(
            rx,
            cfg.batch.clone(),
            cfg.api.timestamp_unit,
            Arc::clone(&deliverer),
            Arc::clone(&deduper),
            Arc::clone(&shared),
        )));
    }
    let delivery = tokio::spawn(futures::future::join_all(lane_tasks));
    let tx = lanes;

    // The consumer loop gets a thread and a runtime of its own: librdkafka's blocking calls
    // (the synchronous commits, the revoke commit inside the rebalance callback) then never stall
    // a worker of the delivery side. A stalled worker once held the woken delivery task in its
    // un-stealable LIFO slot until reqwest's timeout fired on an answered request, which was then
    // sent again (found by tests/broker_faults.rs on a scale-up under load).
    let consumer_thread = {
        let (consumer, cfg, mapper) = (Arc::clone(&consumer), cfg.clone(), Arc::clone(&mapper));
        let (tracker, shared, shutdown) = (Arc::clone(&tracker), Arc::clone(&shared), shutdown.clone());
        std::thread::Builder::new().name("consumer".into()).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(consumer_loop(
                    &consumer, &cfg, &mapper, &tracker, &shared, tx, &shutdown,
                )),
                Err(e) => tracing::error!(error = %e, "cannot start the consumer's runtime"),
            }
        })?
    };
    let _ = tokio::task::spawn_blocking(move || consumer_thread.join()).await;

    // Shutdown: fetching has stopped; let queued and in-flight work finish until the deadline.
    tracing::info!(deadline = ?cfg.shutdown.deadline, in_flight = lock(&tracker).in_flight(), "shutting down: finishing in-flight work");
    let deadline = tokio::time::Instant::now() + cfg.shutdown.deadline;
    let mut delivery = delivery;
    let drained = tokio::select! {
        _ = &mut delivery => true,
        _ = tokio::time::sleep_until(deadline) => false,
    };
    let dlq_drained = {
        let mut tasks = std::mem::take(&mut *lock(&shared.dlq_tasks));
        tokio::time::timeout_at(deadline, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_ok()
    };
    shared.abandon.cancel();
    if !drained {
        let _ = delivery.await;
    }
    let abandoned = lock(&tracker).in_flight();
    let result = if drained && dlq_drained && abandoned == 0 {
        "drained"
    } else {
        "abandoned"
    };
    METRICS.shutdowns.with_label_values(&[result]).inc();
    let _ = tokio::task::spawn_blocking(move || {
        commit(&consumer, &tracker);
        tracing::info!(result, abandoned, "in-flight work ended; committed; leaving the group");
        consumer.unsubscribe();
        drop(consumer);
    })
    .await;
    Ok(())
}

async fn consumer_loop(
    consumer: &Source,
    cfg: &Config,
    mapper: &Mapper,
    tracker: &Arc<Mutex<Tracker>>,
    shared: &Arc<Shared>,
    lanes: Vec<mpsc::UnboundedSender<Vec<Pending>>>,
    shutdown: &CancellationToken,
) {
    let max_in_flight = cfg.kafka.max_in_flight_records;
    let max_event_bytes = cfg.batch.max_bytes.saturating_sub(2);
    let mut commit_tick = tokio::time::interval(cfg.kafka.commit_interval);
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut recheck = tokio::time::interval(Duration::from_millis(200));
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One stream for the loop's life (each `recv()` would register a waker slot anew).
    let mut stream = consumer.stream();
    let mut paused = false;
    let mut topic_names: Vec<Arc<str>> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = commit_tick.tick() => {
                // Blocking, on purpose: this loop has its own thread (see `run`).
                commit(consumer, tracker);
                let (in_flight, oldest, gaps) = {
                    let t = lock(tracker);
                    (t.in_flight(), t.oldest_unfinished(), t.gaps())
                };
                METRICS.offset_gaps.set(gaps as i64);
                METRICS.in_flight.set(in_flight as i64);
                METRICS.oldest_age.set(oldest.map_or(0.0, |o| o.elapsed().as_secs_f64()));
                if paused {
                    // Partitions assigned since the pause arrive unpaused.
                    set_paused(consumer, true);
                }
            }
            // While no record arrives (paused, or idle), the pause check below still runs.
            _ = recheck.tick() => {}
            m = stream.next() => {
                // A burst: this record and whatever else is ready now, handed to the delivery loop
                // as one chunk (a wake-up of the delivery side per burst, not per record).
                // Empty until used: most bursts are a record or two when traffic is low.
                let mut chunks: Vec<Vec<Pending>> = lanes.iter().map(|_| Vec::new()).collect();
                let (mut next, mut taken) = (m, 1);
                let read_at = std::time::Instant::now();
                loop {
                    match next {
                        Some(Ok(msg)) => {
                            let (topic, n) = intern(&mut topic_names, msg.topic());
                            let lane = (n + msg.partition().unsigned_abs() as usize) % chunks.len();
                            handle(&msg, topic, mapper, tracker, shared, &mut chunks[lane], max_event_bytes, read_at);
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
                for (lane, chunk) in lanes.iter().zip(chunks) {
                    if !chunk.is_empty() && lane.send(chunk).is_err() {
                        tracing::error!("delivery loop has stopped; records left unfinished");
                    }
                }
            }
        }
        let in_flight = lock(tracker).in_flight();
        if !paused && in_flight >= max_in_flight {
            paused = true;
            set_paused(consumer, true);
            METRICS.paused.set(1);
            tracing::info!(
                in_flight,
                "too many unfinished records: partitions paused (still polling)"
            );
        } else if paused && in_flight <= max_in_flight / 2 {
            paused = false;
            set_paused(consumer, false);
            METRICS.paused.set(0);
            tracing::info!(in_flight, "partitions resumed");
        }
    }
    set_paused(consumer, true);
}

/// The topic's shared name, and its number (in order of first sight; it spreads topics over lanes).
fn intern(names: &mut Vec<Arc<str>>, topic: &str) -> (Arc<str>, usize) {
    if let Some(i) = names.iter().position(|t| &**t == topic) {
        return (Arc::clone(&names[i]), i);
    }
    names.push(Arc::from(topic));
    (Arc::clone(&names[names.len() - 1]), names.len() - 1)
}

#[allow(clippy::too_many_arguments)]
fn handle(
    msg: &BorrowedMessage<'_>,
    topic: Arc<str>,
    mapper: &Mapper,
    tracker: &Mutex<Tracker>,
    shared: &Arc<Shared>,
    out: &mut Vec<Pending>,
    max_event_bytes: usize,
    read_at: std::time::Instant,
) {
    SOURCE_METRICS.consumed.inc();
    let Some(ticket) = lock(tracker).begin(&topic, msg.partition(), msg.offset(), read_at) else {
        // Fetched before its partition was revoked: the new owner reads it.
        tracing::warn!(topic = %topic, partition = msg.partition(), offset = msg.offset(),
            "record of a partition not assigned to this process ignored");
        return;
    };
    shared.finisher.counters.consumed.fetch_add(1, Ordering::Relaxed);
    let rec = OwnedRecord::from_message(msg, topic);
    let headers: Vec<(&str, &[u8])> = rec.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let src = SourceRecord {
        topic: &rec.topic,
        partition: rec.partition,
        offset: rec.offset,
        timestamp_ms: rec.timestamp_ms,
        key: rec.key.as_deref(),
        value: rec.value.as_deref(),
        headers: &headers,
    };
    match mapper.map(&src) {
        MapOutcome::Event(event) => {
            let mut json = Vec::with_capacity(256);
            event.write_json(&mut json);
            let (keys, timestamp) = (shared.deduper.keys_of(&event), event.timestamp);
            drop(event);
            drop(headers);
            if json.len() > max_event_bytes {
                let why = Reason {
                    stage: "validation",
                    code: "too_large".into(),
                    message: format!("the event is {} bytes, over batch.max_bytes", json.len()),
                    http_status: None,
                };
                shared.dead_letter(rec, ticket, why, None);
                return;
            }
            out.push(Pending {
                keys,
                timestamp,
                rec,
                ticket,
                json,
            });
        }
        MapOutcome::Filtered { reason } => {
            tracing::debug!(record = %rec.coordinates(), %reason, "record filtered");
            shared.finisher.finish(&rec, &ticket, Outcome::Filtered);
        }
        MapOutcome::Failed(err) => {
            let field = err.field.as_deref().unwrap_or("-");
            let why = Reason {
                stage: err.stage.as_str(),
                code: err.reason.clone(),
                message: format!("record {}: field `{field}`: {}", rec.coordinates(), err.message),
                http_status: None,
            };
            shared.dead_letter(rec, ticket, why, None);
        }
    }
}

fn set_paused(consumer: &Source, pause: bool) {
    let Ok(assignment) = consumer.assignment() else { return };
    if assignment.count() == 0 {
        return;
    }
    let r = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, pause, "pause/resume failed");
    }
}

/// Commits the finished prefix of every assigned partition that advanced, synchronously (one
/// round trip per `commit_interval`), so the tracker and the metrics know what is committed.
fn commit(consumer: &Source, tracker: &Mutex<Tracker>) {
    let todo = lock(tracker).to_commit();
    if todo.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (t, p, o) in &todo {
        let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => source::record_commits(tracker, &tpl),
        Err(e) => {
            // REBALANCE_IN_PROGRESS and friends: the next interval commits again.
            SOURCE_METRICS.commit_errors.inc();
            tracing::debug!(error = %e, "offset commit failed; retried at the next interval");
        }
    }
}

/// Most records the consumer loop handles in one burst before it looks at its timers again.
const BURST: usize = 256;

/// The delivery loop's end of the queue: records arrive in chunks (one per consumer burst) and
/// leave one at a time.
struct Inbox {
    rx: mpsc::UnboundedReceiver<Vec<Pending>>,
    ready: std::vec::IntoIter<Pending>,
}

impl Inbox {
    /// The next record if one is here already.
    fn try_recv(&mut self) -> Option<Pending> {
        if let Some(p) = self.ready.next() {
            return Some(p);
        }
        self.ready = self.rx.try_recv().ok()?.into_iter();
        self.ready.next()
    }

    /// The next record; `None` once the consumer loop stopped and everything was handed out.
    /// Cancel-safe: a received chunk is stored before the next await.
    async fn recv(&mut self) -> Option<Pending> {
        loop {
            if let Some(p) = self.ready.next() {
                return Some(p);
            }
            self.ready = self.rx.recv().await?.into_iter();
        }
    }
}

async fn delivery_loop(
    rx: mpsc::UnboundedReceiver<Vec<Pending>>,
    cfg: BatchConfig,
    unit: TimestampUnit,
    deliverer: Arc<Deliverer>,
    deduper: Arc<Deduper>,
    shared: Arc<Shared>,
) {
    let mut rx = Inbox {
        rx,
        ready: Vec::new().into_iter(),
    };
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return, // the consumer loop stopped and everything queued was handled
            },
        };
        // The batch fills until it is full or `linger` has passed *and* the budget allows a
        // request: when the budget is the bottleneck, every request leaves full; when it is not,
        // linger bounds the latency.
        let linger_end = tokio::time::Instant::now() + cfg.linger;
        let mut bytes = first.json.len() + 2;
        let mut batch = Vec::with_capacity(cfg.max_events.min(1024));
        batch.push(first);
        let mut lingered = false;
        let reserve = deliverer.reserve(&shared.abandon);
        tokio::pin!(reserve);
        let mut reserved = false;
        // One timer per batch (a timer made per event cost a wake-up of the timer driver each).
        let linger = tokio::time::sleep_until(linger_end);
        tokio::pin!(linger);
        while batch.len() < cfg.max_events {
            // Records already here join at once; the timers matter only when none is waiting.
            let next = match rx.try_recv() {
                Some(p) => Some(p),
                None => tokio::select! {
                    biased;
                    r = &mut reserve, if !reserved => {
                        reserved = true;
                        if lingered || r.is_err() { break }
                        continue;
                    }
                    _ = &mut linger, if !lingered => {
                        lingered = true;
                        if reserved { break }
                        continue;
                    }
                    p = rx.recv() => p,
                },
            };
            let Some(p) = next else { break };
            if bytes + p.json.len() + 1 > cfg.max_bytes {
                carry = Some(p);
                break;
            }
            bytes += p.json.len() + 1;
            batch.push(p);
        }
        if shared.abandon.is_cancelled() {
            METRICS.abandoned.inc_by(batch.len() as u64);
            continue;
        }
        let id = shared.finisher.counters.batches.fetch_add(1, Ordering::Relaxed) + 1;
        let span = tracing::info_span!("batch", id, size = batch.len(), partitions = %partitions_of(&batch),
            delivered = tracing::field::Empty, duplicate = tracing::field::Empty, dead_lettered = tracing::field::Empty);
        use tracing::Instrument;
        process_batch(batch, unit, &deliverer, &deduper, &shared)
            .instrument(span)
            .await;
    }
}

/// `topic/partition` of the records of a batch, for its log span.
fn partitions_of(batch: &[Pending]) -> String {
    let mut parts: Vec<(&str, i32)> = batch.iter().map(|p| (&*p.rec.topic, p.rec.partition)).collect();
    parts.sort_unstable();
    parts.dedup();
    parts
        .iter()
        .map(|(t, p)| format!("{t}/{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Takes one batch through dedupe and delivery to an outcome for each record.
async fn process_batch(
    batch: Vec<Pending>,
    unit: TimestampUnit,
    deliverer: &Deliverer,
    deduper: &Deduper,
    shared: &Arc<Shared>,
) {
    // Records of partitions revoked since they were read belong to the new owner now.
    let batch: Vec<Pending> = {
        let tracker = lock(&shared.finisher.tracker);
        let (keep, stale): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|p| tracker.is_current(&p.rec.topic, &p.ticket));
        METRICS.abandoned.inc_by(stale.len() as u64);
        keep
    };
    if batch.is_empty() {
        return;
    }
    let keys: Vec<&EventKeys> = batch.iter().map(|p| &p.keys).collect();
    let verdicts = {
        let mut backoff = Duration::from_millis(100);
        loop {
            let checked = tokio::select! {
                r = deduper.check(&keys) => r,
                _ = shared.abandon.cancelled() => {
                    METRICS.abandoned.inc_by(batch.len() as u64);
                    return;
                }
            };
            match checked {
                Ok(v) => break v,
                Err(e) => {
                    tracing::warn!(error = %e.0, "dedupe store unavailable; delivery paused until it returns");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shared.abandon.cancelled() => {
                            METRICS.abandoned.inc_by(batch.len() as u64);
                            return;
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    };
    let span = tracing::Span::current();
    let duplicates = verdicts
        .iter()
        .filter(|v| matches!(v, Verdict::Duplicate { .. }))
        .count();
    span.record("duplicate", duplicates);
    let mut to_send: Vec<Pending> = Vec::with_capacity(batch.len());
    for (p, v) in batch.into_iter().zip(verdicts) {
        match v {
            Verdict::Send => to_send.push(p),
            Verdict::Duplicate { reason } => {
                tracing::debug!(record = %p.rec.coordinates(), reason, "duplicate dropped");
                shared.finisher.finish(&p.rec, &p.ticket, Outcome::Duplicate(reason));
            }
            Verdict::DoubleCount { reason } => {
                let why = Reason {
                    stage: "dedupe",
                    code: "double_count".into(),
                    message: reason,
                    http_status: None,
                };
                shared.dead_letter(p.rec, p.ticket, why, None);
            }
            Verdict::InDoubt { reason } => {
                let why = Reason {
                    stage: "dedupe",
                    code: "in_doubt".into(),
                    message: format!("record {}: {reason}", p.rec.coordinates()),
                    http_status: None,
                };
                shared.dead_letter(p.rec, p.ticket, why, Some(p.keys));
            }
        }
    }
    if to_send.is_empty() {
        return;
    }
    let mut records: Vec<Option<(OwnedRecord, Ticket)>> = Vec::with_capacity(to_send.len());
    let mut events: Vec<(EventKeys, i64)> = Vec::with_capacity(to_send.len());
    let mut json: Vec<Vec<u8>> = Vec::with_capacity(to_send.len());
    for p in to_send {
        records.push(Some((p.rec, p.ticket)));
        events.push((p.keys, p.timestamp));
        json.push(p.json);
    }
    let bodies: Vec<&[u8]> = json.iter().map(Vec::as_slice).collect();
    let marks = SentMarks {
        deduper,
        keys: events.iter().map(|e| &e.0).collect(),
        exposed: AtomicBool::new(false),
    };
    let results = match deliverer.deliver_json(&bodies, &shared.abandon, &marks).await {
        Ok(r) => r,
        Err(_cancelled) => {
            // Shutdown's deadline: a request that may have been counted leaves its ids in doubt
            // for the next owner; otherwise they are free again.
            if marks.exposed.load(Ordering::Relaxed) {
                deduper.abandon(&marks.keys).await;
            } else {
                deduper.release(&marks.keys).await;
            }
            METRICS.abandoned.inc_by(events.len() as u64);
            return;
        }
    };
    let mut delivered: Vec<usize> = Vec::with_capacity(events.len());
    let mut rejected: Vec<(usize, u16, String)> = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            EventResult::Delivered => delivered.push(i),
            EventResult::Rejected { status, body } => rejected.push((i, status, body)),
        }
    }
    if !rejected.is_empty() {
        deduper
            .release(&rejected.iter().map(|(i, _, _)| &events[*i].0).collect::<Vec<_>>())
            .await;
    }
    for (i, status, body) in rejected {
        let Some((rec, ticket)) = records[i].take() else {
            continue;
        };
        let why = Reason {
            stage: "api",
            code: "rejected".into(),
            message: format!(
                "record {}: the API answered {status}: {}",
                rec.coordinates(),
                crate::event::truncate(&body)
            ),
            http_status: Some(status),
        };
        shared.dead_letter(rec, ticket, why, None);
    }
    if delivered.is_empty() {
        return;
    }
    // Invariant 3: ids are recorded after the 2xx and before the offsets become committable.
    let refs: Vec<&EventKeys> = delivered.iter().map(|&i| &events[i].0).collect();
    let mut backoff = Duration::from_millis(100);
    while let Err(e) = deduper.delivered(&refs).await {
        tracing::warn!(error = %e.0, "cannot record delivered ids in the dedupe store; retrying before committing");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shared.abandon.cancelled() => {
                METRICS.abandoned.inc_by(delivered.len() as u64);
                return;
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    tracing::debug!("batch delivered");
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e6;
    let from_event = METRICS.latency.with_label_values(&["event"]);
    let from_kafka = METRICS.latency.with_label_values(&["kafka"]);
    for &i in &delivered {
        let Some((rec, _)) = &records[i] else { continue };
        let event_ms = match unit {
            TimestampUnit::Seconds => events[i].1 as f64 * 1000.0,
            TimestampUnit::Milliseconds => events[i].1 as f64,
        };
        from_event.observe(((now_ms - event_ms) / 1000.0).max(0.0));
        if let Some(k) = rec.timestamp_ms {
            from_kafka.observe(((now_ms - k as f64) / 1000.0).max(0.0));
        }
    }
    let finished = delivered
        .iter()
        .filter_map(|&i| records[i].as_ref().map(|(r, t)| (r, t)));
    shared.finisher.finish_all(finished, Outcome::Delivered);
}

/// Keeps the dedupe store's `sent:` marks of a batch in step with its requests (see
/// `deliver::Exposure`): a request leaves only once its ids are marked, so that a crash leaves
/// them in doubt rather than free to be sent twice.
struct SentMarks<'a> {
    deduper: &'a Deduper,
    keys: Vec<&'a EventKeys>,
    /// What the deliverer last said: a request may have been counted.
    exposed: AtomicBool,
}

impl crate::deliver::Exposure for SentMarks<'_> {
    async fn exposed(&self) {
        self.exposed.store(true, Ordering::Relaxed);
        let mut backoff = Duration::from_millis(100);
        while let Err(e) = self.deduper.mark_sent(&self.keys, true).await {
            tracing::warn!(error = %e.0, "cannot mark ids as sent in the dedupe store; the request waits");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn unexposed(&self) {
        self.exposed.store(false, Ordering::Relaxed);
        // Best effort: a mark left behind makes a crash's next owner dead-letter the ids as in
        // doubt, never send them twice.
        let _ = self.deduper.mark_sent(&self.keys, false).await;
    }
}

/// Installs SIGTERM/SIGINT handlers that fire `token`.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGTERM handler");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
        token.cancel();
    });
}
