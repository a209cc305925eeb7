//! Broker faults (issue 9): the pipeline in-process against librdkafka's mock cluster, which can do
//! what tansu cannot: fail Fetch, OffsetCommit, JoinGroup and Heartbeat requests on demand and take
//! the broker down and up. The sandbox runs in-process too. Every run produces the ledger's mix
//! (valid, duplicates, invalid), injects its fault while records are moving, and then checks the
//! same accounting as the chaos suite: every valid id accepted exactly once, every invalid record
//! dead-lettered with its reason, the group's committed offsets at the end of every partition.
//!
//! Each run has its own telemetry: assertions use the sandbox's record and each run's totals
//! (`Totals`). The pipelines' logs share the process's one tracing subscriber (one file).

// rdkafka's `send_result` hands the record back in its error by design.
#![allow(clippy::result_large_err)]

mod chaos_support;
mod common;

use chaos_support::*;
use datapulse_bridge::pipeline::{self, Totals};
use datapulse_bridge::sandbox::{self, Faults, SandboxArgs, SandboxHandle};
use datapulse_bridge::telemetry::Telemetry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const KEY: &str = "dp_test_key_broker_faults";
const TOPIC: &str = "tx";
const DLQ: &str = "tx.dlq";
const PARTITIONS: i32 = 4;

type Cluster = MockCluster<'static, DefaultProducerContext>;

struct World {
    cluster: Cluster,
    bootstrap: String,
    sandbox: SandboxHandle,
    ledger: Ledger,
    group: String,
}

/// Every pipeline of this test binary logs (debug) to one file, named in failure messages.
fn log_file() -> &'static std::path::Path {
    static LOG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let dir = common::workdir("broker-faults");
        let path = dir.join("pipelines.log");
        let file = std::fs::File::create(&path).expect("log file");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,datapulse_bridge=debug,librdkafka=warn,rdkafka=warn",
            ))
            .with_writer(Mutex::new(file))
            .with_ansi(false)
            .try_init();
        path
    })
}

async fn world(name: &str, seed: u64) -> World {
    log_file();
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, PARTITIONS, 1).expect("topic");
    cluster.create_topic(DLQ, 1, 1).expect("dead-letter topic");
    let bootstrap = cluster.bootstrap_servers();
    let sandbox = sandbox::start(SandboxArgs {
        listen: "127.0.0.1:0".into(),
        api_keys: vec![KEY.into()],
        rate_limit: 0,
        ..Default::default()
    })
    .await
    .expect("sandbox");
    println!("{name}: seed {seed}");
    World {
        cluster,
        bootstrap,
        sandbox,
        ledger: Ledger::new(seed, PARTITIONS, name),
        group: format!("g-{name}"),
    }
}

fn config(w: &World, extra: &str) -> datapulse_bridge::config::Config {
    let text = format!(
        r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
topics = ["{TOPIC}"]
commit_interval = "200ms"
[kafka.properties]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
"fetch.wait.max.ms" = 50

[api]
base_url = "{api}"
key = "{KEY}"
request_timeout = "2s"

[batch]
max_events = 200
linger = "50ms"

[dead_letter]
topic = "{DLQ}"

[shutdown]
deadline = "3s"

[delivery]
rate_limit = 100000
rate_window = "1s"
rate_burst = 1000
retry_backoff_max = "500ms"

{extra}

{mapping}"#,
        mapping = common::flat_mapping(TOPIC),
        bootstrap = w.bootstrap,
        group = w.group,
        api = w.sandbox.url(),
    );
    datapulse_bridge::config::from_toml_str(&text).unwrap_or_else(|e| panic!("config: {e}"))
}

/// `[dedupe]` on a shared redis-server: what makes "nothing sent twice" hold across processes and
/// restarts (the memory store forgets on restart, see docs/dedupe.md).
fn redis_dedupe(redis: &common::Redis, prefix: &str) -> String {
    common::redis_dedupe_toml(redis, prefix, "5s")
}

struct Running {
    task: JoinHandle<Result<(), pipeline::StartError>>,
    stop: CancellationToken,
    telemetry: Telemetry,
}

fn start(cfg: datapulse_bridge::config::Config) -> Running {
    let stop = CancellationToken::new();
    let telemetry = Telemetry::new();
    let task = tokio::spawn(pipeline::run(cfg, stop.clone(), telemetry.clone()));
    Running { task, stop, telemetry }
}

impl Running {
    /// This run's outcome totals so far.
    fn totals(&self) -> Totals {
        Totals::read(&self.telemetry)
    }

    async fn stop(self) -> Totals {
        self.stop.cancel();
        self.task.await.expect("pipeline task").expect("pipeline run");
        Totals::read(&self.telemetry)
    }
}

/// Generates `n` more records and produces them, waiting for every acknowledgement.
async fn produce(w: &mut World, n: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &w.bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let recs: Vec<_> = (0..n).map(|_| w.ledger.next_record()).collect();
    common::produce_with(&producer, TOPIC, &recs).await;
}

/// The group's committed offsets (-1 where none), read by a separate consumer in the same group.
fn committed(w: &World) -> Option<Vec<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &w.bootstrap)
        .set("group.id", &w.group)
        .create()
        .ok()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(TOPIC, p);
    }
    let got = consumer.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
    Some(
        (0..PARTITIONS)
            .map(|p| match got.find_partition(TOPIC, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect(),
    )
}

async fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_committed_at_end(w: &World, timeout: Duration) {
    let ends = w.ledger.ends();
    let start = Instant::now();
    loop {
        let c = tokio::task::block_in_place(|| committed(w));
        if c.as_ref() == Some(&ends) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "committed offsets {c:?} did not reach the partition ends {ends:?} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn accepted(w: &World) -> HashMap<String, u32> {
    let mut m = HashMap::new();
    for e in w.sandbox.events() {
        if let Some(id) = common::test_identity(&e) {
            *m.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    m
}

/// The accounting; panics with every problem found.
fn verify(w: &World, name: &str, counters: &[Totals]) {
    let dead = tokio::task::block_in_place(|| {
        read_dead_letters(
            &w.bootstrap,
            DLQ,
            w.ledger.invalid.len(),
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
    });
    // No process is killed with a request in flight here: every repeat is a failure.
    let acc = account(&w.ledger, &accepted(w), &dead);
    let delivered: u64 = counters.iter().map(|c| c.delivered).sum();
    let consumed: u64 = counters.iter().map(|c| c.consumed).sum();
    println!(
        "{name}: produced {}; consumed {consumed} (re-reads included), delivered {delivered}; {} dead letters, \
         {} invalid records dead-lettered more than once (re-read), e.g. {:?}; sandbox statuses {:?}",
        w.ledger.summary(),
        dead.len(),
        acc.repeated_dead_letters.len(),
        acc.repeated_dead_letters.iter().take(5).collect::<Vec<_>>(),
        w.sandbox.stats().by_status
    );
    let mut problems = acc.problems;
    if delivered > w.ledger.valid.len() as u64 {
        problems.push(format!(
            "the pipelines counted {delivered} deliveries for {} valid ids",
            w.ledger.valid.len()
        ));
    }
    if (consumed as usize) < w.ledger.records.len() {
        problems.push(format!(
            "the pipelines consumed {consumed} of {} records",
            w.ledger.records.len()
        ));
    }
    assert!(
        problems.is_empty(),
        "{name} (seed in the first line of its output):\n  - {}\nlogs of every pipeline of this test binary: {} \
         (run one test with --test-threads 1 for a log of that test only)",
        problems.join("\n  - "),
        log_file().display()
    );
}

fn errors(codes: &[RDKafkaRespErr], times: usize) -> Vec<RDKafkaRespErr> {
    codes.iter().copied().cycle().take(codes.len() * times).collect()
}

/// Fetch requests fail (leader moved, connection dropped, unknown partition) while records flow:
/// the consumer refetches from its position; nothing is skipped or read twice into the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_errors_lose_nothing() {
    use RDKafkaRespErr::*;
    let mut w = world("fetch", 11).await;
    produce(&mut w, 600).await;
    let run = start(config(&w, ""));
    wait_for(Duration::from_secs(30), "first deliveries", || {
        run.totals().delivered > 100
    })
    .await;
    w.cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &errors(
            &[
                RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                RD_KAFKA_RESP_ERR__TRANSPORT,
                RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
                RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            ],
            10,
        ),
    );
    produce(&mut w, 600).await;
    wait_committed_at_end(&w, Duration::from_secs(60)).await;
    let c = run.stop().await;
    verify(&w, "fetch", &[c]);
}

/// Offset commits fail (coordinator moving, rebalance in progress, timeouts, a fenced generation):
/// nothing is lost, nothing sent twice, and the offsets reach the end once commits succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_commit_errors_delay_commits_only() {
    use RDKafkaRespErr::*;
    let mut w = world("commit", 12).await;
    produce(&mut w, 600).await;
    let run = start(config(&w, ""));
    wait_for(Duration::from_secs(30), "first deliveries", || {
        run.totals().delivered > 100
    })
    .await;
    w.cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &errors(
            &[
                RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
                RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
                RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
                RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION,
            ],
            6,
        ),
    );
    produce(&mut w, 600).await;
    wait_committed_at_end(&w, Duration::from_secs(60)).await;
    let c = run.stop().await;
    verify(&w, "commit", &[c]);
}

/// The group falls apart while batches are stuck at a failing API: heartbeats answer
/// UNKNOWN_MEMBER_ID (the member's partitions are lost, not revoked) and REBALANCE_IN_PROGRESS,
/// the re-join meets JoinGroup errors. The same process gets its partitions back and reads the
/// uncommitted records again while their first copies are still in flight. Then the pipeline is
/// stopped with work in flight and a new one finishes: nothing lost, nothing sent twice (the Redis
/// store remembers across the restart; ids republished later would repeat with the memory store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_and_join_errors_during_an_outage() {
    use RDKafkaRespErr::*;
    let dir = common::workdir("broker-faults-group");
    let redis = common::Redis::start(&dir);
    let mut w = world("group", 13).await;
    let extra = redis_dedupe(&redis, "group");
    produce(&mut w, 500).await;
    let run = start(config(&w, &extra));
    wait_for(Duration::from_secs(30), "first deliveries", || {
        run.totals().delivered > 100
    })
    .await;
    w.sandbox
        .set_faults(Faults {
            fault_500: 1.0,
            ..Default::default()
        })
        .unwrap();
    produce(&mut w, 500).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    w.cluster.request_errors(
        RDKafkaApiKey::Heartbeat,
        &[
            RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID,
            RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION,
        ],
    );
    w.cluster.request_errors(
        RDKafkaApiKey::JoinGroup,
        &[
            RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
        ],
    );
    // Let the group fall apart and come back while the API still fails.
    tokio::time::sleep(Duration::from_secs(8)).await;
    w.sandbox.set_faults(Faults::default()).unwrap();
    produce(&mut w, 300).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.sandbox
        .set_faults(Faults {
            fault_500: 1.0,
            ..Default::default()
        })
        .unwrap();
    produce(&mut w, 200).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Stop with work stuck in flight (shutdown.deadline 3s): it is abandoned, not committed.
    let first = run.stop().await;
    println!(
        "group: the first pipeline stopped; committed {:?} of {:?}; it counted {} deliveries",
        tokio::task::block_in_place(|| committed(&w)),
        w.ledger.ends(),
        first.delivered
    );
    w.sandbox.set_faults(Faults::default()).unwrap();
    let run = start(config(&w, &extra));
    wait_committed_at_end(&w, Duration::from_secs(60)).await;
    let second = run.stop().await;
    verify(&w, "group", &[first, second]);
}

/// The broker goes down for longer than the session timeout while records are in flight (the
/// dead-letter writes, fetches, commits and heartbeats all fail), then comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_and_up_loses_nothing() {
    let mut w = world("down", 14).await;
    produce(&mut w, 600).await;
    let run = start(config(&w, ""));
    wait_for(Duration::from_secs(30), "first deliveries", || {
        run.totals().delivered > 100
    })
    .await;
    produce(&mut w, 600).await;
    w.cluster.broker_down(1).expect("broker down");
    tokio::time::sleep(Duration::from_secs(8)).await;
    w.cluster.broker_up(1).expect("broker up");
    produce(&mut w, 300).await;
    wait_committed_at_end(&w, Duration::from_secs(90)).await;
    let c = run.stop().await;
    verify(&w, "down", &[c]);
}

/// Scale-up under load, the Redpanda Connect loss case: a second process joins the group while the
/// first has batches in flight at a slow API (cooperative-sticky moves some partitions), later the
/// first leaves. With the shared Redis store nothing is sent twice, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_and_down_under_load_with_redis() {
    let dir = common::workdir("broker-faults-scale");
    let redis = common::Redis::start(&dir);
    let mut w = world("scale", 15).await;
    let extra = redis_dedupe(&redis, "scale");
    w.sandbox
        .set_faults(Faults {
            latency: Duration::from_millis(300),
            fault_500: 0.2,
            ..Default::default()
        })
        .unwrap();
    produce(&mut w, 800).await;
    let a = start(config(&w, &extra));
    wait_for(Duration::from_secs(30), "first deliveries", || {
        a.totals().delivered > 50
    })
    .await;
    let b = start(config(&w, &extra));
    // Records keep coming while the group rebalances, until the newcomer has delivered some.
    let since = Instant::now();
    while b.totals().delivered == 0 {
        assert!(
            since.elapsed() < Duration::from_secs(40),
            "the second process never delivered"
        );
        produce(&mut w, 100).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let first = a.stop().await;
    produce(&mut w, 400).await;
    w.sandbox.set_faults(Faults::default()).unwrap();
    wait_committed_at_end(&w, Duration::from_secs(90)).await;
    let second = b.stop().await;
    verify(&w, "scale", &[first, second]);
}

/// A gauge or counter of `telemetry` without labels, as exported (`None` while not registered).
fn metric(telemetry: &Telemetry, name: &str) -> Option<f64> {
    telemetry.render().lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

fn bridge_paused(run: &Running) -> Option<f64> {
    metric(&run.telemetry, "datapulse_bridge_consumer_paused")
}

/// Another member of the group, a plain consumer on its own thread: it polls (so it keeps its
/// membership and its partitions), commits nothing, and leaves when dropped. What it reads is
/// thrown away: the bridge re-reads it from the bridge's commits once the partitions return.
struct Member {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    assigned: std::sync::Arc<Mutex<Vec<i32>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Member {
    fn join(w: &World) -> Member {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &w.bootstrap)
            .set("group.id", &w.group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("group member");
        consumer.subscribe(&[TOPIC]).expect("subscribe");
        let stop = Arc::new(AtomicBool::new(false));
        let assigned = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (Arc::clone(&stop), Arc::clone(&assigned));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let _ = consumer.poll(Duration::from_millis(100));
                if let Ok(tpl) = consumer.assignment() {
                    *a.lock().unwrap() = tpl.elements().iter().map(|e| e.partition()).collect();
                }
            }
            consumer.unsubscribe();
            // Serve the revoke of the leave before the client closes.
            for _ in 0..10 {
                let _ = consumer.poll(Duration::from_millis(100));
            }
        });
        Member {
            stop,
            assigned,
            thread: Some(thread),
        }
    }

    fn assigned(&self) -> Vec<i32> {
        self.assigned.lock().unwrap().clone()
    }

    /// Leaves the group; returns once the client closed.
    fn leave(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("group member thread");
        }
    }
}

/// The `assignment` readiness reason ("N partitions assigned").
fn assignment(run: &Running) -> String {
    use datapulse_bridge::telemetry::Ready;
    run.telemetry
        .condition(Ready::Assignment)
        .map(|c| c.reason)
        .unwrap_or_default()
}

/// Issue 25, item 2: librdkafka keeps a partition's pause across a revoke and a re-assignment.
/// Bridge A pauses under back-pressure (the API fails, `max_in_flight_records` reached); bridge B
/// joins and takes partitions while A is paused; the API recovers, A resumes what it holds, both
/// finish their backlog; B stops and its partitions return to A, which is not paused and must
/// resume them as they arrive. Live traffic after the return (less than A's bound, so no later
/// pause and resume of A's whole assignment heals them) is delivered and committed within
/// seconds; A's pause state says not paused and no partition is stuck. Without the resume on
/// assignment, the returned partitions are never read again (their committed offsets stay put, and
/// the stuck check names them after `stuck_after`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_revoked_and_assigned_back_is_read_again() {
    use datapulse_bridge::telemetry::Ready;
    let dir = common::workdir("broker-faults-pause-return");
    let redis = common::Redis::start(&dir);
    let mut w = world("pause-return", 16).await;
    w.sandbox
        .set_faults(Faults {
            fault_500: 1.0,
            ..Default::default()
        })
        .unwrap();
    produce(&mut w, 1200).await;
    // Two processes: the shared store keeps ids and dead letters once across them.
    let mut cfg = config(&w, &redis_dedupe(&redis, "pause-return"));
    cfg.kafka.max_in_flight_records = 300;
    cfg.kafka.stuck_after = Duration::from_secs(3);
    let a = start(cfg.clone());
    wait_for(Duration::from_secs(30), "bridge A paused under back-pressure", || {
        bridge_paused(&a) == Some(1.0)
    })
    .await;
    cfg.kafka.max_in_flight_records = 20_000;
    let b = start(cfg);
    wait_for(
        Duration::from_secs(30),
        "bridge B took partitions from the paused A",
        || assignment(&b) == "2 partitions assigned",
    )
    .await;
    w.sandbox.set_faults(Faults::default()).unwrap();
    wait_committed_at_end(&w, Duration::from_secs(60)).await;
    assert_eq!(bridge_paused(&a), Some(0.0), "A's pause state before the return");
    let second = b.stop().await;
    let stopped = Instant::now();
    wait_for(Duration::from_secs(30), "every partition back with A", || {
        assignment(&a) == format!("{PARTITIONS} partitions assigned")
    })
    .await;
    produce(&mut w, 200).await;
    wait_committed_at_end(&w, Duration::from_secs(20)).await;
    println!(
        "pause-return: every partition committed at its end {:.1} s after B stopped",
        stopped.elapsed().as_secs_f64()
    );
    assert_eq!(bridge_paused(&a), Some(0.0), "A's pause state");
    // The check runs at commit ticks (200 ms): give it one after the last commit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = a
        .telemetry
        .condition(Ready::Partitions)
        .expect("partitions condition set");
    assert!(c.ok, "{}", c.reason);
    let first = a.stop().await;
    verify(&w, "pause-return", &[first, second]);
}

/// The other half of the rule: a partition assigned while the bridge is paused is paused as it
/// arrives (before this, it was read until the next commit tick). A member holds every partition
/// first; the bridge joins, takes some, pauses under back-pressure; the member leaves, its
/// partitions (never paused in the bridge's client, with records to read) come to the paused
/// bridge, which reads not one record of them until it resumes. A commit interval of 5 s makes
/// the old behaviour's window wide enough to see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_assigned_while_paused_is_paused_at_once() {
    let mut w = world("pause-assign", 17).await;
    w.sandbox
        .set_faults(Faults {
            fault_500: 1.0,
            ..Default::default()
        })
        .unwrap();
    produce(&mut w, 400).await;
    let b = Member::join(&w);
    wait_for(Duration::from_secs(30), "the member holds every partition", || {
        b.assigned().len() == PARTITIONS as usize
    })
    .await;
    let mut cfg = config(&w, "");
    cfg.kafka.max_in_flight_records = 40;
    cfg.kafka.commit_interval = Duration::from_secs(5);
    let a = start(cfg);
    wait_for(Duration::from_secs(30), "the bridge paused under back-pressure", || {
        bridge_paused(&a) == Some(1.0)
    })
    .await;
    let before = a.totals().consumed;
    let held = b.assigned();
    println!("pause-assign: the bridge paused having read {before}; the member holds {held:?}");
    assert!(!held.is_empty() && held.len() < PARTITIONS as usize, "{held:?}");
    tokio::task::block_in_place(|| b.leave());
    wait_for(
        Duration::from_secs(30),
        "every partition with the paused bridge",
        || assignment(&a) == format!("{PARTITIONS} partitions assigned"),
    )
    .await;
    // Longer than a commit interval: the old code would have read the new partitions until its
    // next tick re-paused them.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        a.totals().consumed,
        before,
        "records read from partitions assigned while the bridge was paused"
    );
    assert_eq!(bridge_paused(&a), Some(1.0), "the bridge's pause state");
    w.sandbox.set_faults(Faults::default()).unwrap();
    wait_committed_at_end(&w, Duration::from_secs(60)).await;
    assert_eq!(bridge_paused(&a), Some(0.0), "the bridge's pause state");
    let c = a.stop().await;
    verify(&w, "pause-assign", &[c]);
}
