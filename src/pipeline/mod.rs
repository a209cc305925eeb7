//! Wiring the stages together: source → mapping → batch → dedupe → deliver → outcome → commit,
//! and graceful shutdown.
//!
//! Two sides. The *consumer loop* (`consumer`, on a thread and runtime of its own) reads records,
//! maps them, finishes filtered ones at once, dead-letters mapping failures, hands events to the
//! lanes, commits the finished prefix every `commit_interval`, and pauses its partitions while
//! too many records are unfinished. Each *lane* (`lane`, `delivery.concurrency` of them) cuts
//! batches and takes each through dedupe and delivery, one batch at a time, which keeps
//! per-partition order in what reaches the API. Every record read ends in exactly one outcome
//! (`outcome`): delivered, duplicate, filtered or dead-lettered; only then does its offset
//! become committable.

mod consumer;
mod lane;
mod outcome;

pub use outcome::{Outcome, Totals};

use crate::batch::{Batcher, Inbox};
use crate::config::Config;
use crate::dedupe::Deduper;
use crate::deliver::Deliverer;
use crate::dlq::{DeadLetterWriter, DeadLetters};
use crate::mapping::{Mapper, MappingErrors};
use crate::offsets::Tracker;
use crate::source;
use crate::telemetry::{Family, Telemetry};
use consumer::Reader;
use lane::Lane;
use outcome::Outcomes;
use parking_lot::Mutex;
use prometheus::Registry;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The pipeline's own metrics.
struct Metrics {
    build_info: prometheus::IntGaugeVec,
    shutdowns: prometheus::IntCounterVec,
}

impl Family for Metrics {
    fn register(r: &Registry) -> prometheus::Result<Metrics> {
        Ok(Metrics {
            build_info: prometheus::register_int_gauge_vec_with_registry!(
                "datapulse_bridge_build_info",
                "Build information (always 1).",
                &["version"],
                r
            )?,
            shutdowns: prometheus::register_int_counter_vec_with_registry!(
                "datapulse_bridge_shutdowns_total",
                "Graceful shutdowns, by how in-flight work ended (drained, abandoned).",
                &["result"],
                r
            )?,
        })
    }
}

/// Why [`run`] could not start the bridge (nothing was read: no offset moved).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid mapping: {}", .0.problems().iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Mapping(#[source] MappingErrors),
    #[error(transparent)]
    Delivery(#[from] crate::deliver::SetupError),
    #[error(transparent)]
    Dedupe(#[from] crate::dedupe::SetupError),
    #[error("cannot create the consumer: {0}")]
    Consumer(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    DeadLetters(#[from] crate::dlq::SetupError),
    #[error("cannot start the consumer thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Runs the bridge until `shutdown` fires; then stops fetching, finishes or abandons in-flight
/// work within `shutdown.deadline`, commits, and leaves the group. Every metric and readiness
/// condition goes to `telemetry` ([`Totals::read`] gives the running outcome totals).
///
/// Errors: an invalid mapping, or a client (HTTP, Kafka, Redis) that cannot be created.
pub async fn run(cfg: Config, shutdown: CancellationToken, telemetry: Telemetry) -> Result<(), StartError> {
    let metrics = telemetry.metrics::<Metrics>();
    metrics
        .build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    source::awaiting_assignment(&telemetry, "waiting for the consumer group to assign partitions");
    let mapper = Arc::new(Mapper::compile(&cfg.mapping, &cfg.api.contract()).map_err(StartError::Mapping)?);
    let deliverer = Arc::new(Deliverer::new(&cfg.api, &cfg.delivery, &telemetry)?);
    // Readiness needs the API to have accepted the key once; the probe spends one request.
    let probe = Arc::clone(&deliverer);
    tokio::spawn(async move {
        match probe.probe().await {
            crate::deliver::KeyCheck::Accepted => tracing::info!("the API accepted the key"),
            crate::deliver::KeyCheck::WrongUrl { status } => tracing::error!(
                status,
                "the API does not answer at the configured URL (check api.base_url); delivery will halt until it does"
            ),
            other => {
                tracing::error!(result = ?other, "the API did not accept the key at start-up; delivery will halt until it does")
            }
        }
    });
    let deduper = Arc::new(Deduper::new(&cfg.dedupe, &telemetry).await?);
    let tracker = Arc::new(Mutex::new(Tracker::new()));
    let source = Arc::new(source::subscribe(&cfg.kafka, Arc::clone(&tracker), &telemetry)?);
    let dlq = DeadLetters::new(&cfg.kafka, &cfg.dead_letter, &telemetry)?;
    tracing::info!(group = %cfg.kafka.group_id, topics = ?cfg.kafka.topics, pattern = ?cfg.kafka.topic_pattern,
        api = %cfg.api.base_url, dead_letter_topic = %dlq.topic(), "bridge started");
    let writer = DeadLetterWriter {
        dlq,
        deduper: Arc::clone(&deduper),
    };
    let outcomes = Arc::new(Outcomes::new(
        Arc::clone(&tracker),
        &telemetry,
        Arc::new(writer),
        Arc::clone(&deduper),
    ));

    let delivery = start_lanes(&cfg, &deliverer, &deduper, &outcomes, &shutdown);
    let reader = Reader {
        mapper,
        deduper: Arc::clone(&deduper),
        outcomes: Arc::clone(&outcomes),
        lanes: delivery.queues,
        max_event_bytes: crate::mapping::max_event_bytes(cfg.batch.max_bytes),
        max_in_flight: cfg.kafka.max_in_flight_records,
        commit_interval: cfg.kafka.commit_interval,
        commit_on_delivery: cfg.kafka.commit_on_delivery,
        metrics: telemetry.metrics(),
    };
    // Fired when the drain is over: the consumer loop, which commits during the drain, ends.
    let drained = CancellationToken::new();
    // The consumer loop gets a thread and a runtime of its own: librdkafka's blocking calls
    // (the synchronous commits, the revoke commit inside the rebalance callback) then never stall
    // a worker of the delivery side. A stalled worker once held the woken delivery task in its
    // un-stealable LIFO slot until reqwest's timeout fired on an answered request, which was then
    // sent again (found by tests/broker_faults.rs on a scale-up under load).
    let consumer_thread = {
        let (source, shutdown, drained) = (Arc::clone(&source), shutdown.clone(), drained.clone());
        std::thread::Builder::new().name("consumer".into()).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(reader.run(&source, &shutdown, &drained)),
                Err(e) => tracing::error!(error = %e, "cannot start the consumer's runtime"),
            }
        })?
    };
    let mut consumer = tokio::task::spawn_blocking(move || consumer_thread.join());
    let consumer_ended = tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = &mut consumer => true,
    };
    if consumer_ended {
        tracing::error!("the consumer loop ended before shutdown; stopping");
        shutdown.cancel();
    }
    shut_down(&cfg, &outcomes, delivery.lanes, &metrics).await;
    drained.cancel();
    if !consumer_ended {
        let _ = consumer.await;
    }
    let _ = tokio::task::spawn_blocking(move || {
        source.commit_finished();
        tracing::info!("committed; leaving the group");
        source.leave();
        drop(source);
    })
    .await;
    Ok(())
}

/// The lanes' queues (a partition always goes to the same lane) and the task running them all.
struct Delivery {
    queues: Vec<mpsc::UnboundedSender<Vec<lane::Pending>>>,
    lanes: tokio::task::JoinHandle<Vec<Result<(), tokio::task::JoinError>>>,
}

/// Starts one lane per `delivery.concurrency`: a partition's events leave in order, while the
/// lanes' requests are in flight together.
fn start_lanes(
    cfg: &Config,
    deliverer: &Arc<Deliverer>,
    deduper: &Arc<Deduper>,
    outcomes: &Arc<Outcomes>,
    stop: &CancellationToken,
) -> Delivery {
    let mut queues = Vec::new();
    let mut lanes = Vec::new();
    for _ in 0..cfg.delivery.concurrency.max(1) {
        let (tx, rx) = mpsc::unbounded_channel();
        queues.push(tx);
        let lane = Lane {
            batcher: Batcher::new(Inbox::new(rx), cfg.batch.clone()),
            deliverer: Arc::clone(deliverer),
            deduper: Arc::clone(deduper),
            outcomes: Arc::clone(outcomes),
            unit: cfg.api.timestamp_unit,
            stop: stop.clone(),
        };
        lanes.push(tokio::spawn(lane.run()));
    }
    Delivery {
        queues,
        lanes: tokio::spawn(futures::future::join_all(lanes)),
    }
}

/// How long abandoned lanes may take to end after `shutdown.deadline` before they are dropped.
const ABANDON_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Shutdown fired: reading has stopped (the consumer loop pauses every partition and goes on
/// committing). Each lane finishes the batch it has under way (its request out, and that
/// request's retries) and sends nothing more: what it never sent is left, its ids never held, to
/// the next owner. At `shutdown.deadline` whatever is still under way is abandoned.
async fn shut_down(
    cfg: &Config,
    outcomes: &Outcomes,
    mut lanes: tokio::task::JoinHandle<Vec<Result<(), tokio::task::JoinError>>>,
    metrics: &Metrics,
) {
    let tracker = outcomes.tracker();
    tracing::info!(deadline = ?cfg.shutdown.deadline, in_flight = tracker.lock().in_flight(), "shutting down: finishing the requests under way");
    let deadline = tokio::time::Instant::now() + cfg.shutdown.deadline;
    let drained = tokio::select! {
        _ = &mut lanes => true,
        _ = tokio::time::sleep_until(deadline) => false,
    };
    let dead_letters_drained = outcomes.drain_dead_letters(deadline).await;
    outcomes.abandon_token().cancel();
    if !drained {
        // Abandoned work ends at once (every wait of a lane watches the abandon token); a lane
        // that does not (a store or broker call that hangs) is dropped after a grace period, so
        // that shutdown never outlives its deadline by more than that: what it held is not
        // committed and is read again by the next owner.
        if tokio::time::timeout(ABANDON_GRACE, &mut lanes).await.is_err() {
            tracing::error!(
                grace = ?ABANDON_GRACE,
                "a delivery lane did not end after its work was abandoned; dropping it"
            );
            lanes.abort();
        }
    }
    let abandoned = tracker.lock().in_flight();
    let result = if drained && dead_letters_drained {
        "drained"
    } else {
        "abandoned"
    };
    metrics.shutdowns.with_label_values(&[result]).inc();
    tracing::info!(
        result,
        unfinished = abandoned,
        "in-flight work ended; the unfinished records are read again by the next owner"
    );
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
