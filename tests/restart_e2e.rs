//! Restarts and scale-out repeat nothing (issue 25), end to end: bridge processes against tansu,
//! redis-server and the sandbox, on partner-like data where a fifth of the events (registrations,
//! logins) have no `transaction_id`; each keyless event carries a unique click id, so a repeat is
//! visibly a repeat (`ExactlyOnce`, and the sandbox's `repeated_keyless_events`).
//!
//! - SIGKILL right after the first 2xx, inside the commit interval, then a restart: with Redis
//!   nothing repeats; with the memory store (killed after ten batches) at most the batches of one
//!   commit on delivery.
//! - A rolling restart (SIGTERM, then the replacement) with a backlog at the key's rate limit:
//!   the old process stops within seconds, commits what it finished, and nothing repeats; every
//!   request but the last of each process carries `batch.max_events` events although a tenth of
//!   the ids are republished copies.
//! - Three replicas started together on one group, Redis shared: every event once, every record
//!   one outcome counted once across the group.
//! - The group's committed offset moved back behind the bridge's last commit (a member of an older
//!   generation committing late, which tansu does not fence): the bridge commits again within
//!   seconds, although no new record arrives, and sends nothing again.

mod common;
use common::*;
use std::time::{Duration, Instant};

const MIN: Duration = Duration::from_secs(60);
const TOPIC: &str = "tx";
const PARTITIONS: i32 = 2;

/// A broker with the topic (`partitions`) and its dead-letter topic, and a sandbox (flags
/// `sandbox`).
async fn world(name: &str, partitions: i32, sandbox: &[&str]) -> (std::path::PathBuf, Broker, Sandbox) {
    let dir = workdir(name);
    let broker = Broker::start(&dir);
    broker.create_topic(TOPIC, partitions).await;
    broker.create_topic(&format!("{TOPIC}.dlq"), 1).await;
    let sandbox = Sandbox::start(&dir, sandbox);
    (dir, broker, sandbox)
}

/// The config of a bridge in `group` with `extra` sections and requests of at most `max_events`.
fn config(broker: &Broker, sandbox: &Sandbox, group: &str, extra: &str, max_events: usize) -> String {
    let cfg = bridge_config(broker, &sandbox.url, group, TOPIC, extra);
    let capped = cfg.replace("max_events = 500", &format!("max_events = {max_events}"));
    assert_ne!(cfg, capped, "the test config names batch.max_events");
    capped
}

fn delivery(rate_limit: u32) -> String {
    format!("[delivery]\nrate_limit = {rate_limit}\nrate_window = \"1s\"\nrate_burst = 1\n")
}

fn finished(metrics: &str, outcome: &str) -> f64 {
    metric_sum(
        metrics,
        "datapulse_bridge_records_finished_total",
        &[&format!("outcome=\"{outcome}\"")],
    )
}

/// Waits for the first accepted request, then SIGKILLs `bridge` 22 ms later: inside the commit
/// interval (500 ms in the test config), with the records just delivered perhaps uncommitted.
async fn kill_right_after_the_first_2xx(sandbox: &Sandbox, bridge: &mut Bridge) {
    wait_until(MIN, "the first 2xx", || async { sandbox.accepted().await > 0 }).await;
    tokio::time::sleep(Duration::from_millis(22)).await;
    bridge.proc.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_a_2xx_repeats_nothing_with_redis() {
    let (dir, broker, sandbox) = world("restart-kill-redis", PARTITIONS, &[]).await;
    let redis = Redis::start(&dir);
    // A short lease: claims the killed process held on a batch it never sent lapse quickly.
    let extra = format!("{}\n{}", redis_dedupe_toml(&redis, "rk", "5s"), delivery(20));
    let cfg = config(&broker, &sandbox, "g-rk-redis", &extra, 100);
    let records = mixed_events("kr", 2_000, PARTITIONS, 0.2);
    broker.produce(TOPIC, &records).await;

    let mut b1 = Bridge::start(&dir, "b1", &cfg);
    kill_right_after_the_first_2xx(&sandbox, &mut b1).await;
    let b2 = Bridge::start(&dir, "b2", &cfg);
    let ends = ends_of(&records, PARTITIONS);
    wait_until(2 * MIN, "every record committed", || async {
        broker.committed("g-rk-redis", TOPIC, PARTITIONS) == ends
    })
    .await;

    // A request out when b1 died (rare at 20 requests a second: the next leaves 50 ms after the
    // first) would leave its ids in doubt: dead-lettered, not accepted. Nothing else is missing.
    let m2 = b2.metrics().await;
    let in_doubt = metric_sum(&m2, "datapulse_bridge_dedupe_in_doubt_total", &[]) as usize;
    let report = ExactlyOnce::check(&records, &sandbox.events().await);
    println!("SIGKILL 22 ms after the first 2xx, Redis: {in_doubt} in doubt; {report}");
    assert!(report.repeated.is_empty() && report.unexpected.is_empty(), "{report}");
    assert_eq!(report.missing.len(), in_doubt, "{report}");
    assert_eq!(sandbox.repeated_keyless_events().await, 0);
}

/// With the memory store a restart forgets everything: what repeats is what was delivered and not
/// yet committed when the process died. Committing on delivery (at most every 100 ms) bounds that
/// by the batches of 100 ms and a commit's round trip: at 20 requests a second, three batches.
/// (Committing only every `commit_interval`, 500 ms here, would leave up to ten.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_deliveries_repeats_at_most_the_batches_of_one_commit_with_the_memory_store() {
    let (dir, broker, sandbox) = world("restart-kill-memory", PARTITIONS, &[]).await;
    const MAX_EVENTS: usize = 100;
    let cfg = config(&broker, &sandbox, "g-rk-memory", &delivery(20), MAX_EVENTS);
    let records = mixed_events("km", 3_000, PARTITIONS, 0.2);
    broker.produce(TOPIC, &records).await;

    let mut b1 = Bridge::start(&dir, "b1", &cfg);
    wait_until(MIN, "ten batches accepted", || async {
        sandbox.accepted().await >= 1_000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(22)).await;
    b1.proc.kill9();
    let accepted_at_kill = sandbox.accepted().await;
    let committed_at_kill = broker.committed("g-rk-memory", TOPIC, PARTITIONS);
    let _b2 = Bridge::start(&dir, "b2", &cfg);
    let ends = ends_of(&records, PARTITIONS);
    wait_until(2 * MIN, "every record committed", || async {
        broker.committed("g-rk-memory", TOPIC, PARTITIONS) == ends
    })
    .await;

    let report = ExactlyOnce::check(&records, &sandbox.events().await);
    println!(
        "SIGKILL after {accepted_at_kill} accepted, memory store: committed at the kill {committed_at_kill:?}; {report}"
    );
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report}");
    assert!(
        report.repeated.len() <= 3 * MAX_EVENTS,
        "more than the batches of one commit repeated: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_at_the_rate_limit_repeats_nothing_stops_in_seconds_and_sends_full_requests() {
    const RATE: u32 = 4;
    const MAX_EVENTS: usize = 100;
    // The sandbox allows a little more than the bridge's budget: a 429 would be the bridge's.
    let (dir, broker, sandbox) = world(
        "restart-rolling",
        PARTITIONS,
        &["--rate-limit", &(RATE + 1).to_string(), "--rate-window", "1s"],
    )
    .await;
    let redis = Redis::start(&dir);
    let extra = format!("{}\n{}", redis_dedupe_toml(&redis, "rr", "10s"), delivery(RATE));
    let cfg = config(&broker, &sandbox, "g-rolling", &extra, MAX_EVENTS);
    // A backlog: 3,000 events, a fifth keyless, and every tenth deposit republished a little
    // later on its partition (a copy the bridge drops).
    let records = mixed_events("rr", 3_000, PARTITIONS, 0.2);
    let mut produced = Vec::with_capacity(records.len() + 300);
    for (i, r) in records.iter().enumerate() {
        produced.push(r.clone());
        if i >= 20 && i % 10 == 0 && !r.2.contains("\"click\":\"clk-") {
            let earlier = &records[i - 20];
            if !earlier.2.contains("\"click\":\"clk-") {
                produced.push((r.0, earlier.1.clone(), earlier.2.clone()));
            }
        }
    }
    let copies = produced.len() - records.len();
    assert!(copies > 200, "{copies} copies");
    broker.produce(TOPIC, &produced).await;

    let mut a = Bridge::start(&dir, "a", &cfg);
    wait_until(MIN, "a few requests accepted", || async {
        sandbox.stats().await["requests"].as_u64().unwrap_or(0) >= 3
    })
    .await;
    let sigterm = Instant::now();
    let status = a.proc.terminate(Duration::from_secs(30));
    let stopped_in = sigterm.elapsed();
    assert!(status.is_some_and(|s| s.success()), "a exits cleanly: {status:?}");
    // The shutdown deadline is 10 s; at 4 requests a second the backlog would take 8 s more.
    assert!(
        stopped_in < Duration::from_secs(5),
        "a SIGTERM with a backlog at the rate limit took {stopped_in:?}"
    );
    let accepted_by_a = sandbox.accepted().await;
    let committed_by_a = broker.committed("g-rolling", TOPIC, PARTITIONS);
    assert!(
        committed_by_a.iter().sum::<i64>() > 0,
        "a committed what it delivered before leaving: {committed_by_a:?}"
    );

    let b = Bridge::start(&dir, "b", &cfg);
    let ends = ends_of(&produced, PARTITIONS);
    wait_until(3 * MIN, "every record committed", || async {
        broker.committed("g-rolling", TOPIC, PARTITIONS) == ends
    })
    .await;
    let committed_at_end = broker.committed("g-rolling", TOPIC, PARTITIONS);
    for (p, (before, after)) in committed_by_a.iter().zip(&committed_at_end).enumerate() {
        assert!(
            after >= before,
            "partition {p}'s committed offset went back: {before} → {after}"
        );
    }

    let report = ExactlyOnce::check(&records, &sandbox.events().await);
    let stats = sandbox.stats().await;
    println!(
        "rolling restart: a stopped {stopped_in:?} after SIGTERM having had {accepted_by_a} events accepted; \
         {copies} copies; {report}; requests by events carried {}",
        stats["events_per_request"]
    );
    assert!(report.is_clean(), "{report}");
    assert_eq!(stats["repeated_keyless_events"], 0);
    assert_eq!(stats["by_status"]["429"], serde_json::Value::Null, "{stats}");
    // Full requests at the limit: only the last request of each process may be short.
    let short: u64 = stats["events_per_request"]
        .as_object()
        .expect("events_per_request")
        .iter()
        .filter(|(n, _)| n.parse::<usize>().expect("a count") < MAX_EVENTS)
        .map(|(_, c)| c.as_u64().unwrap_or(0))
        .sum();
    assert!(
        short <= 2,
        "{short} requests left short: {}",
        stats["events_per_request"]
    );
    let mb = b.metrics().await;
    assert!(finished(&mb, "duplicate") > 0.0, "b dropped copies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_started_together_send_every_event_once_and_count_every_record_once() {
    const SPREAD: i32 = 3;
    let (dir, broker, sandbox) = world("restart-three", SPREAD, &[]).await;
    let redis = Redis::start(&dir);
    let extra = format!("{}\n{}", redis_dedupe_toml(&redis, "r3", "10s"), delivery(50));
    let cfg = config(&broker, &sandbox, "g-three", &extra, 100);
    let mut records = mixed_events("r3", 3_000, SPREAD, 0.2);
    // A few invalid records: each one dead letter, counted once across the group.
    for i in 0..10 {
        records.push((i % SPREAD, format!("bad-{i}"), format!("{{\"not\": \"an event {i}\"}}")));
    }
    broker.produce(TOPIC, &records).await;
    let replicas: Vec<Bridge> = ["r1", "r2", "r3"]
        .iter()
        .map(|n| Bridge::start(&dir, n, &cfg))
        .collect();
    let ends = ends_of(&records, SPREAD);
    wait_until(3 * MIN, "every record committed", || async {
        broker.committed("g-three", TOPIC, SPREAD) == ends
    })
    .await;
    let valid = &records[..3_000];
    assert_each_accepted_once(valid, &sandbox.events().await);
    assert_eq!(sandbox.repeated_keyless_events().await, 0);

    let mut dead_lettered = 0.0;
    let mut delivered = 0.0;
    for r in &replicas {
        let m = r.metrics().await;
        dead_lettered += finished(&m, "dead_lettered");
        delivered += finished(&m, "delivered");
    }
    let dead = broker.read_all(&format!("{TOPIC}.dlq"), 10, Duration::from_secs(20));
    assert_eq!(dead.len(), 10, "each invalid record dead-lettered once");
    assert_eq!(dead_lettered, 10.0, "each dead letter counted once across the group");
    assert_eq!(delivered, 3_000.0, "each event counted delivered once across the group");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_offset_moved_back_is_committed_again_without_new_records() {
    let (dir, broker, sandbox) = world("restart-regress", PARTITIONS, &[]).await;
    let cfg = config(&broker, &sandbox, "g-regress", "", 100);
    let records = mixed_events("rg", 400, PARTITIONS, 0.2);
    broker.produce(TOPIC, &records).await;
    let bridge = Bridge::start(&dir, "b1", &cfg);
    let ends = ends_of(&records, PARTITIONS);
    wait_until(MIN, "every record committed", || async {
        broker.committed("g-regress", TOPIC, PARTITIONS) == ends
    })
    .await;
    wait_committed_metric(&bridge, &ends).await;

    // Partition 1's group offset goes back by 57 records, and no record arrives after it.
    broker.commit_as_outsider("g-regress", TOPIC, 1, ends[1] - 57);
    let mut behind = ends.clone();
    behind[1] -= 57;
    assert_eq!(broker.committed("g-regress", TOPIC, PARTITIONS), behind);
    wait_until(
        Duration::from_secs(30),
        "the group's offsets back at the ends",
        || async { broker.committed("g-regress", TOPIC, PARTITIONS) == ends },
    )
    .await;
    let m = bridge.metrics().await;
    assert_eq!(metric_sum(&m, "datapulse_bridge_commit_regressions_total", &[]), 1.0);
    assert_eq!(committed_metric(&m, &ends), ends);
    let log = std::fs::read_to_string(&bridge.proc.log).unwrap();
    assert!(
        log.contains("the group's committed offset is behind what this process committed")
            && log.contains(&format!(
                "partition=tx/1 committed={} group_offset={}",
                ends[1],
                ends[1] - 57
            )),
        "the regression is logged naming the partition and both offsets"
    );
    // Committed again, not read again: each event once.
    assert_each_accepted_once(&records, &sandbox.events().await);
    assert_eq!(sandbox.repeated_keyless_events().await, 0);
    assert_eq!(finished(&m, "delivered"), 400.0);
}
