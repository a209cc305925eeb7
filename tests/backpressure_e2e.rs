//! End-to-end test of invariant 8, "memory is bounded: pause on full": the built binary against a
//! tansu broker and a slow sandbox, with a backlog ten times `kafka.max_in_flight_records`.
//!
//! # The bound: `max_in_flight_records + 255`
//!
//! `pipeline::consumer` (`Reader::run`) looks at the number of unfinished records (the tracker's
//! `in_flight`) after each turn of its `select!` and pauses every assigned partition once it is
//! `>= max_in_flight_records`. A turn that reads records takes a burst: the record that woke it
//! and whatever else librdkafka has ready, up to `BURST` = 256, all handled (counted in flight)
//! before the check. The check before that turn let it run, so it began with at most
//! `max_in_flight_records - 1` unfinished (only the consumer loop adds to the count; delivery only
//! lowers it), and it ends with at most `max_in_flight_records - 1 + 256`.
//!
//! Nothing arrives after the pause. `rd_kafka_pause_partitions` (librdkafka 2.12,
//! `rd_kafka_toppar_op_pause_resume`) bumps the partition's version barrier in the calling thread
//! (the consumer loop's) before it returns; every prefetched message waiting in the consumer queue,
//! and every fetch response to a request sent before the pause, carries an older version and is
//! dropped when polled (`rd_kafka_op_filter` / `rd_kafka_op_version_outdated` in
//! `rd_kafka_q_pop_serve`), and the next fetch position is rewound to the application's position,
//! so a resume re-reads exactly what was dropped. rdkafka's `StreamConsumer` keeps no buffer of its
//! own (each `next()` is one poll of that queue). So paused partitions add nothing while paused.
//!
//! A partition *assigned* while paused adds nothing either: the assign callback pauses it as it
//! arrives (`source::Source::set_paused` is the bridge's one pause state; tested by
//! `broker_faults::a_partition_assigned_while_paused_is_paused_at_once`). This test has one bridge
//! in the group, assigned once at start, and the bound asserted is exactly
//! `max_in_flight_records + 255` (555). Seen in runs: 512 at most, two full bursts (256, under
//! 300, then 512).
//!
//! The in-flight gauge is refreshed only at commit ticks (`commit_interval`, 100 ms here) and
//! sampled every 50 ms, so what the test sees is a sample of the real count, never more than it.
//! Records are produced one per producer batch (the harness's producer sets
//! `batch.num.messages = 1`): every pause makes librdkafka re-fetch from inside what it had
//! prefetched, and tansu 0.6 answers a fetch at an offset inside a batch with the next batch,
//! skipping the rest.

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const MIN: Duration = Duration::from_secs(60);
const MAX_IN_FLIGHT: usize = 300;
/// `pipeline::consumer::BURST`: records the consumer loop handles in one turn before it checks the bound.
const BURST: usize = 256;
/// What invariant 8 promises for this test's setup (see the module documentation).
const BOUND: f64 = (MAX_IN_FLIGHT - 1 + BURST) as f64;
const RECORDS: usize = 3_000;
const PARTITIONS: i32 = 2;

/// What the sampler saw of the bridge's backpressure.
#[derive(Debug, Default)]
struct Seen {
    samples: u32,
    max_in_flight: f64,
    /// Scrapes that found the consumer paused.
    paused_samples: u32,
    /// Paused → running transitions seen by the sampler.
    resumes: u32,
    last_paused: bool,
}

/// 3,000 records against an API that takes 100 ms a request (batches of 50, so about 500 events a
/// second): the bridge reads far faster than it delivers, pauses at 300 unfinished records,
/// resumes when half are delivered, never holds more than the bound, and in the end delivers every
/// record exactly once and commits every partition to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_pauses_at_max_in_flight_and_delivers_everything_once() {
    let started = Instant::now();
    let dir = workdir("backpressure");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", PARTITIONS).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    sandbox.set_faults(json!({"latency": "100ms"})).await;
    let records = deposits("bp", RECORDS, PARTITIONS);
    tokio::time::timeout(MIN, broker.produce("tx", &records))
        .await
        .expect("the backlog is produced within a minute");
    let ends = ends_of(&records, PARTITIONS);

    let group = "g-backpressure";
    let cfg = bridge_config(&broker, &sandbox.url, group, "tx", "")
        .replace(
            "commit_interval = \"500ms\"",
            &format!("commit_interval = \"100ms\"\nmax_in_flight_records = {MAX_IN_FLIGHT}"),
        )
        .replace("max_events = 500", "max_events = 50");
    assert!(
        cfg.contains("max_in_flight_records = 300\n") && cfg.contains("max_events = 50\n"),
        "{cfg}"
    );
    let bridge = Bridge::start(&dir, "bridge", &cfg);

    // Sample the gauges every 50 ms until everything is delivered and the consumer runs again.
    let mut seen = Seen::default();
    let deadline = Instant::now() + 3 * MIN;
    loop {
        assert!(
            Instant::now() < deadline,
            "not all {RECORDS} delivered within 3 minutes; saw {seen:?}; log: {}",
            bridge.proc.log.display()
        );
        let m = tokio::time::timeout(Duration::from_secs(5), bridge.metrics())
            .await
            .expect("/metrics answers within 5 s");
        let in_flight = metric_sum(&m, "datapulse_bridge_records_in_flight", &[]);
        let paused = metric_sum(&m, "datapulse_bridge_consumer_paused", &[]) == 1.0;
        let delivered = metric_sum(
            &m,
            "datapulse_bridge_records_finished_total",
            &["outcome=\"delivered\""],
        );
        seen.samples += 1;
        seen.max_in_flight = seen.max_in_flight.max(in_flight);
        seen.paused_samples += u32::from(paused);
        seen.resumes += u32::from(seen.last_paused && !paused);
        seen.last_paused = paused;
        if delivered >= RECORDS as f64 && !paused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The exact count at each pause, from the bridge's log (`in_flight=N` on its info line): the
    // peak of each pile-up, since nothing is added while paused. Empty if DPB_TEST_RUST_LOG
    // silences info lines; the sampled gauge is checked either way.
    let at_pauses: Vec<f64> = bridge
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("partitions paused (still polling)"))
        .filter_map(|l| {
            l.split("in_flight=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    if std::env::var_os("DPB_TEST_RUST_LOG").is_none() {
        assert!(
            !at_pauses.is_empty(),
            "no \"partitions paused\" line with its in_flight count in the bridge's log"
        );
    }
    let max_at_pause = at_pauses.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "backpressure: max in flight sampled {} and at a pause {max_at_pause} (bound {BOUND}); {seen:?}; \
         in flight at each pause {at_pauses:?}; {:?} so far",
        seen.max_in_flight,
        started.elapsed()
    );

    // Invariant 8: never more unfinished records than the bound, and the bound held by pausing.
    assert!(
        seen.max_in_flight <= BOUND && max_at_pause <= BOUND,
        "records in flight over the bound of {BOUND}: {} sampled, {at_pauses:?} at pauses; {seen:?}",
        seen.max_in_flight
    );
    assert!(
        seen.paused_samples > 0,
        "the consumer was never seen paused with a backlog of {RECORDS} and a bound of {MAX_IN_FLIGHT}; {seen:?}"
    );
    assert!(
        seen.resumes > 0,
        "the consumer was never seen resuming after a pause; {seen:?}"
    );

    // And pausing lost nothing, repeated nothing, and committed everything.
    wait_until(MIN, "committed offsets at the end of every partition", || async {
        broker.committed(group, "tx", PARTITIONS) == ends
    })
    .await;
    let ids = accepted_ids(&sandbox).await;
    let missing: Vec<_> = records
        .iter()
        .filter(|(_, k, _)| !ids.contains_key(k))
        .map(|(_, k, _)| k)
        .take(10)
        .collect();
    assert!(missing.is_empty(), "never accepted: {missing:?}");
    let twice: Vec<_> = ids.iter().filter(|(_, c)| **c != 1).take(10).collect();
    assert!(twice.is_empty(), "accepted more than once: {twice:?}");
    assert_eq!(ids.len(), RECORDS, "nothing but the produced ids accepted");
    assert_eq!(sandbox.duplicate_ids().await.as_object().map_or(0, |m| m.len()), 0);

    let m = bridge.metrics().await;
    let consumed = metric_sum(&m, "datapulse_bridge_records_consumed_total", &[]);
    let delivered = metric_sum(
        &m,
        "datapulse_bridge_records_finished_total",
        &["outcome=\"delivered\""],
    );
    assert_eq!(
        consumed, RECORDS as f64,
        "each record read once: a pause re-reads nothing"
    );
    assert_eq!(consumed, delivered, "{m}");
    eprintln!("backpressure: done in {:?}", started.elapsed());
}
