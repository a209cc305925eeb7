//! Chaos (issue 9): for `DPB_CHAOS_SECS` (default 90) a producer writes valid records, duplicates
//! of earlier ones (some on another partition) and invalid records, while bridge processes sharing
//! a Redis dedupe store are SIGKILLed, restarted, scaled between 1 and 3 and stopped gracefully at
//! seeded random moments, and the sandbox answers 429s, 500s, timeouts, slow answers past the
//! client's timeout, 502s, 504s and 401s. Then the faults stop, one bridge finishes the backlog,
//! and the ledger is checked against the sandbox's record and the dead-letter topic: every valid id
//! accepted exactly once (or, in flight in a killed process or answered ambiguously, dead-lettered
//! once as `in_doubt` and accepted at most once: never twice; the operator step replays the ones
//! the API does not have), every invalid record
//! dead-lettered with its reason, the group's committed offsets at the end of every partition.
//!
//! `DPB_CHAOS_SEED` replays a run's schedule and records (the seed is printed);
//! `DPB_CHAOS_CONCURRENCY` sets the bridges' delivery lanes (default 1). See docs/chaos.md.

// rdkafka's `send_result` hands the record back in its error by design.
#![allow(clippy::result_large_err)]

mod chaos_support;
mod common;

use chaos_support::*;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 4;
const GROUP: &str = "g-chaos";
const TOPIC: &str = "tx";

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The API key's limit, enforced by the sandbox: every bridge draws from one budget in Redis
/// (invariant 6), so the sandbox must never answer a 429 of its own (only injected ones).
const RATE_LIMIT: u32 = 30;

/// Peak resident memory any bridge process may reach (invariant 8; the e2e bench's target).
const MAX_RSS_KIB: u64 = 150 * 1024;

fn extra_toml(redis: &Redis) -> String {
    let dedupe = redis_dedupe_toml(redis, "chaos", "5s");
    format!(
        r#"
{dedupe}
[delivery]
rate_mode = "redis"
redis_url = "{url}"
rate_limit = {RATE_LIMIT}
rate_window = "1s"
retry_backoff_max = "2s"
auth_retry_interval = "1s"
concurrency = {lanes}
"#,
        lanes = env_u64("DPB_CHAOS_CONCURRENCY").unwrap_or(1),
        url = redis.url(),
    )
}

/// The fault settings the schedule picks from: moderate, so that progress happens between them.
fn fault_menu() -> Vec<serde_json::Value> {
    vec![
        json!({}),
        json!({}),
        json!({"fault_500": 0.25}),
        json!({"fault_429": 0.25}),
        json!({"fault_timeout": 0.2, "timeout_hang": "1s"}),
        // Hangs until the bridge gives up (api.request_timeout = 5s).
        json!({"fault_timeout": 0.1}),
        json!({"fault_500": 0.1, "fault_429": 0.1, "fault_timeout": 0.05, "timeout_hang": "2s"}),
        // Counted by the API, answered after the bridge gave up (api.request_timeout = 5s): in
        // doubt, never sent again.
        json!({"fault_slow": 0.15, "slow_answer": "7s"}),
        // Gateway errors: a 502 after the API counted the batch, a 504 before it: both in doubt.
        json!({"fault_502": 0.1, "fault_504": 0.1}),
        // The key is refused: delivery halts, nothing may be dead-lettered or committed past.
        json!({"auth_fail_all": true}),
    ]
}

async fn start_bridge(dir: &Path, name: String, cfg: &str) -> Bridge {
    let (dir, cfg) = (dir.to_path_buf(), cfg.to_string());
    tokio::task::spawn_blocking(move || Bridge::start(&dir, &name, &cfg))
        .await
        .expect("bridge start")
}

/// What a stalled drain's last bridge says of itself, for the failure message (CI keeps only the
/// test's output, not the logs): its readiness, its per-partition gauges and in-flight count, and
/// the last 40 lines of its log at INFO or above (assignments, revocations, warnings).
async fn last_bridge_state(bridge: &Bridge) -> String {
    let ready = match bridge.ready_body().await {
        Some(body) => body.to_string(),
        None => "(no answer on the ops port)".into(),
    };
    let metrics = bridge.metrics_text().await.unwrap_or_default();
    let gauges: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("datapulse_bridge_partition")
                || l.starts_with("datapulse_bridge_records_in_flight")
                || l.starts_with("datapulse_bridge_partitions_stuck")
                || l.starts_with("datapulse_bridge_consumer_paused")
                || l.starts_with("datapulse_bridge_oldest_unfinished")
                || l.starts_with("datapulse_bridge_commit_errors")
                || l.starts_with("datapulse_bridge_rebalances")
        })
        .collect();
    let lines = log_lines(&bridge.proc.log);
    let telling: Vec<&String> = lines
        .iter()
        .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
        .collect();
    let tail = &telling[telling.len().saturating_sub(40)..];
    format!(
        "    ready: {ready}\n    {}\n    log ({}):\n      {}",
        gauges.join("\n    "),
        bridge.proc.log.display(),
        tail.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n      ")
    )
}

/// Counts of log lines over every bridge log in `dir`.
fn count_in_logs(dir: &Path, needle: &str) -> usize {
    bridge_logs(dir)
        .iter()
        .map(|p| log_lines(p).iter().filter(|l| l.contains(needle)).count())
        .sum()
}

fn bridge_logs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
                    n.starts_with('b') && n.ends_with(".log")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_rebalances_and_api_faults_lose_and_repeat_nothing() {
    let secs = env_u64("DPB_CHAOS_SECS").unwrap_or(90);
    let seed = env_u64("DPB_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let dir = workdir("chaos");
    println!(
        "chaos: seed {seed} (replay with DPB_CHAOS_SEED={seed}), {secs} s of chaos, logs in {}",
        dir.display()
    );
    let broker = Broker::start(&dir);
    broker.create_topic(TOPIC, PARTITIONS).await;
    broker.create_topic("tx.dlq", 1).await;
    let redis = Redis::start(&dir);
    let limit = RATE_LIMIT.to_string();
    let sandbox = Sandbox::start(&dir, &["--rate-limit", &limit, "--rate-window", "1s"]);
    // A low in-flight bound: back-pressure pauses and resumes all through the run.
    let cfg = bridge_config(&broker, &sandbox.url, GROUP, TOPIC, &extra_toml(&redis)).replace(
        "commit_interval = \"500ms\"",
        "commit_interval = \"500ms\"\nmax_in_flight_records = 500",
    );
    assert!(cfg.contains("max_in_flight_records = 500"));

    // The producer: about 40 records a second for the whole chaos period, each acknowledged
    // before the next burst; the ledger says what each record must become.
    let ledger = Arc::new(Mutex::new(Ledger::new(seed, PARTITIONS, "c")));
    let stop = CancellationToken::new();
    let producer_task = {
        let ledger = Arc::clone(&ledger);
        let stop = stop.clone();
        let producer = broker.producer();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop.is_cancelled() {
                tick.tick().await;
                let burst: Vec<_> = {
                    let mut l = ledger.lock().unwrap();
                    (0..4).map(|_| l.next_record()).collect()
                };
                produce_with(&producer, TOPIC, &burst).await;
            }
        })
    };

    // The schedule.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let menu = fault_menu();
    let started = Instant::now();
    let mut events: Vec<String> = Vec::new();
    let note = |events: &mut Vec<String>, what: String| {
        let line = format!("t={:>5.1}s {what}", started.elapsed().as_secs_f64());
        println!("chaos: {line}");
        events.push(line);
    };
    let mut next_name = 0;
    let mut name = || {
        next_name += 1;
        format!("b{next_name}")
    };
    let mut bridges: Vec<Bridge> = vec![start_bridge(&dir, name(), &cfg).await];
    // The highest peak resident memory of any bridge process, read just before it is stopped.
    let mut peak_rss_kib = 0u64;
    let (mut kills, mut restarts, mut scale_ups, mut graceful_stops, mut fault_changes) = (0, 0, 0, 0, 0);
    let end = started + Duration::from_secs(secs);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..5_000))).await;
        let roll = rng.random_range(0..100);
        if roll < 40 && !bridges.is_empty() {
            let i = rng.random_range(0..bridges.len());
            let mut b = bridges.swap_remove(i);
            let pid = b.proc.pid();
            peak_rss_kib = peak_rss_kib.max(b.proc.peak_rss_kib().unwrap_or(0));
            b.proc.kill9();
            kills += 1;
            note(&mut events, format!("SIGKILL pid {pid} ({} left)", bridges.len()));
            if bridges.is_empty() || rng.random_bool(0.6) {
                bridges.push(start_bridge(&dir, name(), &cfg).await);
                restarts += 1;
                note(&mut events, format!("restart ({} running)", bridges.len()));
            }
        } else if roll < 60 && bridges.len() < 3 {
            bridges.push(start_bridge(&dir, name(), &cfg).await);
            scale_ups += 1;
            note(&mut events, format!("scale up ({} running)", bridges.len()));
        } else if roll < 68 && bridges.len() > 1 {
            let i = rng.random_range(0..bridges.len());
            let mut b = bridges.swap_remove(i);
            let pid = b.proc.pid();
            peak_rss_kib = peak_rss_kib.max(b.proc.peak_rss_kib().unwrap_or(0));
            let status = tokio::task::spawn_blocking(move || b.proc.terminate(Duration::from_secs(20)))
                .await
                .unwrap();
            graceful_stops += 1;
            note(
                &mut events,
                format!("SIGTERM pid {pid}: {status:?} ({} left)", bridges.len()),
            );
        } else {
            let f = menu[rng.random_range(0..menu.len())].clone();
            sandbox.set_faults(f.clone()).await;
            fault_changes += 1;
            note(&mut events, format!("faults {f}"));
        }
    }

    // Drain: faults off, the producer stops, one bridge finishes everything.
    stop.cancel();
    producer_task.await.expect("the producer task");
    sandbox.set_faults(json!({})).await;
    while bridges.len() > 1 {
        let mut b = bridges.pop().unwrap();
        let pid = b.proc.pid();
        peak_rss_kib = peak_rss_kib.max(b.proc.peak_rss_kib().unwrap_or(0));
        b.proc.kill9();
        kills += 1;
        note(&mut events, format!("SIGKILL pid {pid} (drain: one bridge left)"));
    }
    if bridges.is_empty() {
        bridges.push(start_bridge(&dir, name(), &cfg).await);
        restarts += 1;
    }
    note(&mut events, "faults off, producer stopped, draining".into());
    let (ends, summary) = {
        let l = ledger.lock().unwrap();
        (l.ends(), l.summary())
    };
    println!("chaos: produced {summary}; partition ends {ends:?}");
    let drain_start = Instant::now();
    let mut nudges = 0;
    let drained = {
        let mut deadline = Instant::now() + Duration::from_secs(120);
        let (mut last, mut moved) = (Vec::new(), Instant::now());
        loop {
            let c = broker.committed(GROUP, TOPIC, PARTITIONS);
            if c == ends {
                break Ok(());
            }
            if c != last {
                (last, moved) = (c.clone(), Instant::now());
            }
            // tansu 0.6 can leave the group formed with partitions nobody owns: when a member it
            // chose as leader dies between JoinGroup and SyncGroup, the others get an empty
            // assignment, and when the leader assigned partitions to members killed meanwhile,
            // the survivor gets only its own share; no new rebalance follows when the dead
            // members' sessions expire (Kafka would rebalance). The last bridge, alone in the
            // group, then reports fewer than every partition in `assignment`; a graceful restart
            // makes a new join. A bridge that owns every partition and stands still is not
            // nudged: that is a stall of the bridge's own, and fails the run.
            let owned = bridges[0].partitions_assigned().await;
            if moved.elapsed() > Duration::from_secs(20) && nudges < 2 && owned.is_some_and(|n| n < PARTITIONS as usize)
            {
                let mut b = bridges.pop().unwrap();
                peak_rss_kib = peak_rss_kib.max(b.proc.peak_rss_kib().unwrap_or(0));
                let pid = b.proc.pid();
                tokio::task::spawn_blocking(move || b.proc.terminate(Duration::from_secs(20)))
                    .await
                    .unwrap();
                bridges.push(start_bridge(&dir, name(), &cfg).await);
                nudges += 1;
                note(
                    &mut events,
                    format!(
                        "drain: pid {pid} had {} of {PARTITIONS} partitions for 20 s (tansu's partial assignment): restarted it",
                        owned.unwrap_or(0)
                    ),
                );
                moved = Instant::now();
                deadline += Duration::from_secs(60);
            }
            if Instant::now() > deadline {
                // Said now, before the replay below feeds the partitions new records.
                break Err((c, last_bridge_state(&bridges[0]).await));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let drain_secs = drain_start.elapsed().as_secs_f64();

    // Accounting.
    let ledger = Arc::try_unwrap(ledger)
        .ok()
        .expect("the producer task has ended")
        .into_inner()
        .unwrap();
    let accepted = accepted_ids(&sandbox).await;
    let dead = read_dead_letters(
        &broker.bootstrap,
        "tx.dlq",
        ledger.invalid.len(),
        Duration::from_secs(3),
        Duration::from_secs(30),
    );
    let arrival: Vec<String> = sandbox
        .events()
        .await
        .iter()
        .filter_map(|e| test_identity(e).map(str::to_string))
        .collect();
    let acc = account(&ledger, &accepted, &dead);
    let order = order_problem(&ledger, &arrival);
    let last = &bridges[0];
    peak_rss_kib = peak_rss_kib.max(last.proc.peak_rss_kib().unwrap_or(0));
    let m = last.metrics().await;
    let regressions = count_in_logs(&dir, "the group's committed offset is behind");
    let assigns = count_in_logs(&dir, "partitions assigned");
    let revokes = count_in_logs(&dir, "partitions revoked");
    let stats = sandbox.stats().await;
    // Invariant 6: 429s the sandbox's own limit answered, beside the injected ones.
    let limited = stats["by_status"]["429"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(stats["injected_faults"]["429"].as_u64().unwrap_or(0));
    println!(
        "chaos: survived {kills} SIGKILLs, {restarts} restarts, {scale_ups} scale-ups, {graceful_stops} graceful stops, \
         {fault_changes} fault changes; {assigns} partition assignments and {revokes} revocations (bridge logs); \
         drained in {drain_secs:.1} s; sandbox: {} requests, statuses {}, injected {}",
        stats["requests"], stats["by_status"], stats["injected_faults"]
    );
    println!(
        "chaos: {} dead letters for {} invalid records; {} records dead-lettered more than once: {:?}",
        dead.len(),
        ledger.invalid.len(),
        acc.repeated_dead_letters.len(),
        acc.repeated_dead_letters.iter().take(10).collect::<Vec<_>>()
    );
    let reached = acc.in_doubt.iter().filter(|(_, accepted)| *accepted).count();
    println!(
        "chaos: {} valid ids in doubt (in flight in a killed process, or answered ambiguously), dead-lettered as in_doubt, none sent \
         again: {reached} of them had reached the API before the kill, {} had not: {:?}",
        acc.in_doubt.len(),
        acc.in_doubt.len() - reached,
        acc.in_doubt.iter().take(10).collect::<Vec<_>>()
    );
    println!(
        "chaos: shared budget {RATE_LIMIT} requests/s for every bridge: {limited} requests over the key's limit; \
         highest peak RSS of a bridge process {:.1} MiB; {nudges} drain restarts for tansu's empty assignment; \
         {regressions} group offsets found behind a bridge's commit and committed again (tansu fences no old generation)",
        peak_rss_kib as f64 / 1024.0
    );
    println!(
        "chaos: the last bridge's dedupe claim waits {}, claims lost {}, duplicates dropped {}",
        metric_sum(&m, "datapulse_bridge_dedupe_claim_waits_total", &[]),
        metric_sum(&m, "datapulse_bridge_dedupe_claims_lost_total", &[]),
        metric_sum(
            &m,
            "datapulse_bridge_records_finished_total",
            &["outcome=\"duplicate\""]
        ),
    );

    // The operator's part (docs/operations.md): ids in doubt that DataPulse (here, the sandbox)
    // does not have are replayed from the dead-letter topic. Then every valid id must have been
    // accepted exactly once.
    let missing: Vec<&DeadLetter> = dead
        .iter()
        .filter(|d| d.reason == "in_doubt" && !accepted.contains_key(&d.key))
        .collect();
    let mut replay_problem = None;
    if !missing.is_empty() {
        let mut args = vec!["replay", "--reason", "in_doubt"];
        for d in &missing {
            args.extend(["--record", d.source.as_str()]);
        }
        let (ok, out) = tokio::task::block_in_place(|| last.dlq(&args));
        if !ok || !out.contains(&format!("{} dead letters replayed", missing.len())) {
            replay_problem = Some(format!(
                "dlq replay of the {} ids in doubt failed: {out}",
                missing.len()
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let now = accepted_ids(&sandbox).await;
            if missing.iter().all(|d| now.contains_key(&d.key)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let after_replay = accepted_ids(&sandbox).await;
    let not_once: Vec<String> = ledger
        .valid
        .iter()
        .filter(|(tx, _, _)| after_replay.get(tx).copied().unwrap_or(0) != 1)
        .take(20)
        .map(|(tx, _, _)| format!("{tx} x{}", after_replay.get(tx).copied().unwrap_or(0)))
        .collect();
    println!(
        "chaos: replayed the {} ids in doubt the sandbox did not have; every valid id accepted exactly once: {}",
        missing.len(),
        not_once.is_empty()
    );

    let mut problems = acc.problems;
    problems.extend(replay_problem);
    if !not_once.is_empty() {
        problems.push(format!(
            "after replaying the ids in doubt, valid ids not accepted exactly once: {not_once:?}"
        ));
    }
    problems.extend(order);
    if limited > 0 {
        problems.push(format!(
            "the sandbox answered {limited} requests with its own 429: the bridges together exceeded the key's \
             {RATE_LIMIT} requests/s (invariant 6)"
        ));
    }
    if peak_rss_kib > MAX_RSS_KIB {
        problems.push(format!(
            "a bridge process reached {} KiB resident, over {MAX_RSS_KIB} KiB (invariant 8)",
            peak_rss_kib
        ));
    }
    if let Err((c, state)) = drained {
        problems.push(format!(
            "committed offsets {c:?} did not reach the partition ends {ends:?} within 120 s of the drain; \
             the last bridge then said:\n{state}"
        ));
    }
    for log in bridge_logs(&dir) {
        if std::fs::read_to_string(&log).unwrap_or_default().contains(API_KEY) {
            problems.push(format!("the API key appears in {}", log.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "chaos run failed (seed {seed}; replay with DPB_CHAOS_SEED={seed} DPB_CHAOS_SECS={secs}):\n  - {}\n\
         schedule:\n    {}\nlogs: {} (bridge logs: {:?})",
        problems.join("\n  - "),
        events.join("\n    "),
        dir.display(),
        bridge_logs(&dir)
            .iter()
            .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    );
    assert!(
        kills > 0 && assigns > 1,
        "the run must have killed and rebalanced something"
    );
    drop(bridges);
    let _ = std::fs::remove_dir_all(&dir);
}
