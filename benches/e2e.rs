//! End-to-end benchmark of the bridge against a baseline measured in the same run on the same
//! machine: real tansu, the sandbox and the bridge as release processes (see docs/benchmarks.md).
//!
//! 1. Produces `E2E_RECORDS` valid flat deposits (default 1,000,000) into a topic of
//!    `E2E_PARTITIONS` partitions (default 4) with normal producer batching, timed.
//! 2. Raw consume: a plain librdkafka consumer with the bridge's own consumer settings
//!    (`source::client_config`) reads every record and does nothing with it; the source's limit.
//! 3. Throughput: the bridge, rate limit off, against the sandbox (`--rate-limit 0`): events per
//!    second from the sandbox's `accepted_events` (after the first accepted event, and end to end
//!    from the bridge's start), CPU seconds per million events and peak RSS of the bridge.
//! 4. Rate-limited: a fresh group with the whole backlog waiting, the bridge and the sandbox both
//!    at `E2E_RATE_LIMIT` requests per `E2E_RATE_WINDOW` (default 60 per 60s), for
//!    `E2E_LIMITED_SECS` (default 120): events per request, 429s, peak RSS.
//!
//! tansu answers a fetch at an offset inside a record batch with the *next* batch. Every consumer
//! here starts from the beginning of each partition and is the group's only member, and the
//! throughput run sets `max_in_flight_records` above the record count so the bridge never pauses
//! (a resume re-fetches from the application's position, inside a batch). Both runs check that
//! every record arrived: offsets contiguous for the raw consumer, `accepted_events` equal to the
//! record count with no duplicate transaction id for the bridge.
//!
//! `cargo bench --bench e2e`; under `cargo test --all-targets` (no `--bench` argument) it returns
//! at once. Other settings: `E2E_CONCURRENCY` (the throughput run's `delivery.concurrency`, default
//! 1), `E2E_MAX_IN_FLIGHT` (the throughput run's `max_in_flight_records`),
//! `E2E_BATCH_RECORDS` (the producer's records per batch, default 10000; 1 makes pausing safe on
//! tansu),
//! `E2E_STALL_SECS` (default 30: the throughput run ends when nothing was accepted that long, and
//! the benchmark fails if records are missing), `E2E_PERF_OUT` (a path: `perf record` the bridge
//! during the throughput run), `E2E_RUST_LOG` (the bridge's log filter, default info).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Bridge, Broker, Sandbox};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// utime + stime of a process, in seconds (`/proc/PID/stat` fields 14 and 15).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // `rest` starts at field 3 (state): utime (field 14) and stime (15) are its 12th and 13th.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
    match (num(11), num(12)) {
        (Some(u), Some(s)) => (u + s) as f64 / clock_ticks(),
        _ => f64::NAN,
    }
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Peak resident set size (VmHWM) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Produces `n` deposits round-robin over `partitions` with normal batching; returns the count per
/// partition.
async fn produce(broker: &Broker, topic: &str, n: usize, partitions: i32) -> Vec<i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("linger.ms", "20")
        // E2E_BATCH_RECORDS=1 writes one record per batch: slower to produce, but then a paused and
        // resumed partition re-fetches from a batch boundary and tansu skips nothing, so the
        // drain can run with the default `max_in_flight_records` (memory bounded as in
        // production).
        .set(
            "batch.num.messages",
            env_or("E2E_BATCH_RECORDS", 10_000usize).to_string(),
        )
        .set("queue.buffering.max.messages", "1000000")
        .set("enable.idempotence", "false")
        .create()
        .unwrap();
    let mut ends = vec![0i64; partitions as usize];
    for start in (0..n).step_by(50_000) {
        let end = (start + 50_000).min(n);
        let recs: Vec<(i32, String, String)> = (start..end)
            .map(|i| {
                let tx = format!("bench-{i}");
                ((i as i32) % partitions, tx.clone(), common::deposit(&tx, i as u32))
            })
            .collect();
        let futs: Vec<_> = recs
            .iter()
            .map(|(p, k, v)| {
                producer
                    .send_result(FutureRecord::to(topic).partition(*p).key(k).payload(v))
                    .map_err(|(e, _)| e)
                    .unwrap()
            })
            .collect();
        for f in futs {
            let d = f.await.unwrap().map_err(|(e, _)| e).unwrap();
            ends[d.partition as usize] += 1;
        }
    }
    ends
}

struct RawResult {
    join: Duration,
    consume: Duration,
    cpu: f64,
}

/// Reads every record with the bridge's consumer settings, doing nothing with them. Panics when a
/// record is missing (an offset gap) or the count falls short within `timeout`.
fn raw_consume(broker: &Broker, topic: &str, ends: &[i64], timeout: Duration) -> RawResult {
    let toml = common::bridge_config(broker, "http://127.0.0.1:1", "raw-consume", topic, "");
    let cfg = datapulse_bridge::config::from_toml_str(&toml).expect("bench config is valid");
    let consumer: BaseConsumer = datapulse_bridge::source::client_config(&cfg.kafka).create().unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let total: i64 = ends.iter().sum();
    let mut next = vec![0i64; ends.len()];
    let mut seen = 0i64;
    let start = Instant::now();
    let mut first: Option<(Instant, f64)> = None;
    while seen < total {
        assert!(
            start.elapsed() < timeout,
            "raw consume: {seen} of {total} records within {timeout:?}"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                if first.is_none() {
                    first = Some((Instant::now(), cpu_seconds(std::process::id())));
                }
                let p = m.partition() as usize;
                assert_eq!(m.offset(), next[p], "raw consume: partition {p} skipped records");
                next[p] += 1;
                seen += 1;
            }
            Some(Err(e)) => panic!("raw consume: {e}"),
            None => {}
        }
    }
    let (t0, cpu0) = first.expect("records were read");
    assert_eq!(next, ends, "raw consume: every partition read to its end");
    RawResult {
        join: t0 - start,
        consume: t0.elapsed(),
        cpu: cpu_seconds(std::process::id()) - cpu0,
    }
}

/// The bridge's config for `group`, with `delivery` as its `[delivery]` table and
/// `max_in_flight_records` set.
fn config(
    broker: &Broker,
    sandbox: &Sandbox,
    group: &str,
    topic: &str,
    delivery: &str,
    max_in_flight: usize,
) -> String {
    common::bridge_config(broker, &sandbox.url, group, topic, delivery).replacen(
        "commit_interval = \"500ms\"",
        &format!("commit_interval = \"500ms\"\nmax_in_flight_records = {max_in_flight}"),
        1,
    )
}

struct Throughput {
    accepted: u64,
    duplicates: usize,
    join: Duration,
    deliver: Duration,
    end_to_end: Duration,
    cpu_deliver: f64,
    cpu_total: f64,
    rss: f64,
    sandbox_cpu: f64,
}

async fn throughput(broker: &Broker, dir: &std::path::Path, topic: &str, n: u64) -> Throughput {
    let sandbox = Sandbox::start(dir, &[]);
    let concurrency: u32 = env_or("E2E_CONCURRENCY", 1);
    let delivery = format!(
        "[delivery]\nrate_limit = 1000000\nrate_window = \"1s\"\nrate_burst = 100000\nconcurrency = {concurrency}"
    );
    let max_in_flight = env_or("E2E_MAX_IN_FLIGHT", n as usize + 1);
    let cfg = config(broker, &sandbox, "bench-throughput", topic, &delivery, max_in_flight);
    let start = Instant::now();
    let bridge = Bridge::start(dir, "bridge-throughput", &cfg);
    let pid = bridge.proc.pid();
    let perf = std::env::var("E2E_PERF_OUT").ok().map(|out| {
        std::process::Command::new("perf")
            .args([
                "record",
                "-F",
                "999",
                "--call-graph",
                "dwarf,16384",
                "-o",
                &out,
                "-p",
                &pid.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf starts")
    });
    // Ends when every record was accepted, or when no event was accepted for `E2E_STALL_SECS`
    // (records lost: reported and the benchmark fails after printing its table).
    let stall = Duration::from_secs(env_or("E2E_STALL_SECS", 30));
    let mut first: Option<(Instant, f64)> = None;
    let (mut accepted, mut last_progress) = (0, Instant::now());
    while accepted < n && last_progress.elapsed() < stall {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sandbox.accepted().await;
        if first.is_none() && now > 0 {
            first = Some((Instant::now(), cpu_seconds(pid)));
        }
        if now > accepted {
            (accepted, last_progress) = (now, Instant::now());
        }
    }
    let done = last_progress;
    let cpu_total = cpu_seconds(pid);
    let rss = peak_rss_mib(pid);
    if let Some(mut p) = perf {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &p.id().to_string()])
            .status();
        let _ = p.wait();
    }
    let stats = sandbox.stats().await;
    let duplicates = stats["duplicate_transaction_ids"].as_object().map_or(0, |m| m.len());
    let (t0, cpu0) = first.unwrap_or_else(|| panic!("no event delivered; see {}", bridge.proc.log.display()));
    Throughput {
        accepted: stats["accepted_events"].as_u64().unwrap_or(0),
        duplicates,
        join: t0 - start,
        deliver: done - t0,
        end_to_end: done - start,
        cpu_deliver: cpu_total - cpu0,
        cpu_total,
        rss,
        sandbox_cpu: cpu_seconds(sandbox.proc.pid()),
    }
}

struct Limited {
    secs: u64,
    accepted: u64,
    ok_requests: u64,
    too_many: u64,
    rss: f64,
    cpu: f64,
}

async fn rate_limited(broker: &Broker, dir: &std::path::Path, topic: &str, limit: u32, window: &str) -> Limited {
    let sandbox = Sandbox::start(dir, &["--rate-limit", &limit.to_string(), "--rate-window", window]);
    let delivery = format!("[delivery]\nrate_limit = {limit}\nrate_window = \"{window}\"");
    let cfg = config(broker, &sandbox, "bench-limited", topic, &delivery, 20_000);
    let bridge = Bridge::start(dir, "bridge-limited", &cfg);
    let secs = env_or("E2E_LIMITED_SECS", 120u64);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let pid = bridge.proc.pid();
    let (rss, cpu) = (peak_rss_mib(pid), cpu_seconds(pid));
    let stats = sandbox.stats().await;
    let status = |s: &str| stats["by_status"][s].as_u64().unwrap_or(0);
    Limited {
        secs,
        accepted: stats["accepted_events"].as_u64().unwrap_or(0),
        ok_requests: status("200"),
        too_many: status("429"),
        rss,
        cpu,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n: u64 = env_or("E2E_RECORDS", 1_000_000);
    let partitions: i32 = env_or("E2E_PARTITIONS", 4);
    let limit: u32 = env_or("E2E_RATE_LIMIT", 60);
    let window = std::env::var("E2E_RATE_WINDOW").unwrap_or_else(|_| "60s".into());
    // The bridge's logs at info (the harness default is debug, which logs every batch).
    std::env::set_var(
        "DPB_TEST_RUST_LOG",
        std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = common::workdir("bench-e2e");
        let broker = Broker::start(&dir);
        let topic = "bench.deposits";
        broker.create_topic(topic, partitions).await;

        let t = Instant::now();
        let ends = produce(&broker, topic, n as usize, partitions).await;
        let produce_time = t.elapsed();
        println!(
            "produced {n} records in {produce_time:.2?} ({:.0}/s)",
            n as f64 / produce_time.as_secs_f64()
        );

        let raw = tokio::task::block_in_place(|| raw_consume(&broker, topic, &ends, Duration::from_secs(1800)));
        let raw_rate = n as f64 / raw.consume.as_secs_f64();
        println!("raw consume: {raw_rate:.0}/s (group join {:.2?})", raw.join);

        let tp = throughput(&broker, &dir, topic, n).await;
        let rate = tp.accepted as f64 / tp.deliver.as_secs_f64();
        let e2e_rate = tp.accepted as f64 / tp.end_to_end.as_secs_f64();
        println!("bridge: {rate:.0}/s after the first delivery, {e2e_rate:.0}/s end to end");

        let lim = rate_limited(&broker, &dir, topic, limit, &window).await;

        let m = n as f64 / 1e6;
        let ratio = rate / raw_rate;
        let cpu_per_m = tp.cpu_deliver / (tp.accepted as f64 / 1e6);
        let row = |name: &str, value: String, target: &str| println!("| {name:<52} | {value:>16} | {target:<14} |");
        println!();
        println!(
            "records: {n}, partitions: {partitions}, cores: {}",
            std::thread::available_parallelism().map_or(0, |c| c.get())
        );
        row("measure", "value".into(), "target");
        row("-", "-".into(), "-");
        row(
            "produce (batched producer), records/s",
            format!("{:.0}", n as f64 / produce_time.as_secs_f64()),
            "",
        );
        row(
            "raw consume (bridge's consumer settings), records/s",
            format!("{raw_rate:.0}"),
            "baseline",
        );
        row("raw consume CPU s per million", format!("{:.2}", raw.cpu / m), "");
        row(
            "bridge, rate off: events/s after first delivery",
            format!("{rate:.0}"),
            "",
        );
        row("bridge, rate off: events/s end to end", format!("{e2e_rate:.0}"), "");
        row(
            "bridge: records never delivered",
            (n - tp.accepted.min(n)).to_string(),
            "0",
        );
        row(
            "bridge: transaction ids delivered twice",
            tp.duplicates.to_string(),
            "0",
        );
        row("bridge ÷ raw consume", format!("{ratio:.2}"), "≥ 0.80");
        row(
            "bridge group join + first batch, s",
            format!("{:.2}", tp.join.as_secs_f64()),
            "",
        );
        row(
            "bridge CPU s per million events (delivering)",
            format!("{cpu_per_m:.2}"),
            "< 2",
        );
        row("bridge CPU s total (incl. start)", format!("{:.2}", tp.cpu_total), "");
        row("bridge peak RSS, rate off, MiB", format!("{:.1}", tp.rss), "");
        row(
            "sandbox CPU s total (rate off run)",
            format!("{:.2}", tp.sandbox_cpu),
            "",
        );
        row(
            &format!("rate {limit}/{window} for {} s: events accepted", lim.secs),
            lim.accepted.to_string(),
            "",
        );
        row("rate-limited: requests answered 200", lim.ok_requests.to_string(), "");
        row(
            "rate-limited: events per request",
            format!("{:.1}", lim.accepted as f64 / lim.ok_requests.max(1) as f64),
            "",
        );
        row(
            "rate-limited: 429s answered by the sandbox",
            lim.too_many.to_string(),
            "0",
        );
        row("rate-limited: bridge peak RSS, MiB", format!("{:.1}", lim.rss), "< 150");
        row("rate-limited: bridge CPU s", format!("{:.2}", lim.cpu), "");
        if tp.accepted != n || tp.duplicates > 0 {
            eprintln!(
                "FAILED: the bridge delivered {} of {n} records, {} ids twice; logs kept in {}",
                tp.accepted,
                tp.duplicates,
                dir.display()
            );
            std::process::exit(1);
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}
