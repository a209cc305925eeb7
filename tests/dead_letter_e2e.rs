//! Issue 19, kinds 1 and 2: a missing dead-letter topic is refused at start-up, and a dead letter
//! that cannot be written as it is is written cut to fit. Real tansu, sandbox and bridge
//! processes on 127.0.0.1. (A topic that stops taking writes while the bridge runs is in
//! `broker_faults`: tansu 0.6 still acknowledged a dead letter written to a topic deleted through
//! the admin API, so the refusal is injected on librdkafka's mock cluster there.)

mod common;
use common::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use std::time::{Duration, Instant};

const MIN: Duration = Duration::from_secs(60);

/// A record the flat mapping refuses (no user, type, …): it is dead-lettered.
fn bad(pad: usize) -> String {
    serde_json::json!({ "pad": "x".repeat(pad) }).to_string()
}

/// The status the bridge's process exited with, waiting up to `timeout`.
fn exit_status(bridge: &mut Bridge, timeout: Duration) -> Option<std::process::ExitStatus> {
    let child = bridge.proc.child.as_mut()?;
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// A `dead_letter.topic` the broker does not have is refused at start-up, naming the topic and
/// what to do; the bridge exits non-zero (it used to start, report ready and log dead letters
/// that were never written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_is_refused_at_start() {
    let dir = workdir("dlq-missing");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    let mut bridge = Bridge::start(&dir, "b", &bridge_config(&broker, &sandbox.url, "g-missing", "tx", ""));
    let status = exit_status(&mut bridge, MIN).expect("the bridge exits at start-up");
    let log = bridge.proc.log_text();
    assert!(!status.success(), "exit status {status:?}\n{log}");
    assert!(
        log.contains("dead-letter topic `tx.dlq` does not exist") && log.contains("create it"),
        "{log}"
    );
}

/// A dead letter over the producer's `message.max.bytes` is written with its value truncated, and
/// one whose headers alone are too large with the headers omitted; each carries its coordinates
/// and says what was cut; the partition moves on (its committed offset reaches the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_dead_letter_is_written_cut_to_fit_and_the_partition_moves_on() {
    let dir = workdir("dlq-oversize");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 1).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    // One record per producer batch (Broker::producer): tansu 0.6 skips the rest of a batch.
    let producer = broker.producer();
    let mut records = deposits("ok", 10, 1);
    records.insert(3, (0, "big-value".into(), bad(50_000)));
    produce_with(&producer, "tx", &records).await;
    // Offset 11: a small bad value with 30 kB of headers.
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "trace",
            value: Some("t".repeat(30_000).as_bytes()),
        })
        .insert(Header {
            key: "small",
            value: Some("s".as_bytes()),
        });
    let value = bad(10);
    producer
        .send(
            FutureRecord::to("tx")
                .partition(0)
                .key("big-headers")
                .payload(value.as_str())
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("the broker took the record with large headers");
    produce_with(&producer, "tx", &deposits("after", 5, 1)).await;

    let config = bridge_config(&broker, &sandbox.url, "g-oversize", "tx", "").replace(
        "[kafka.properties]\n",
        "[kafka.properties]\n\"message.max.bytes\" = 20000\n",
    );
    let bridge = Bridge::start(&dir, "b", &config);
    wait_until(MIN, "15 accepted", || async { sandbox.accepted().await >= 15 }).await;
    wait_until(MIN, "committed at the end", || async {
        broker.committed("g-oversize", "tx", 1) == vec![17]
    })
    .await;
    let dead = broker.read_all("tx.dlq", 2, Duration::from_secs(30));
    assert_eq!(dead.len(), 2, "two dead letters");
    let by_offset = |o: &str| {
        dead.iter()
            .find(|m| header(m, "dp.source.offset") == o)
            .unwrap_or_else(|| panic!("a dead letter of offset {o}"))
    };

    let big = by_offset("3");
    assert_eq!(header(big, "dp.truncated"), "value");
    assert_eq!(header(big, "dp.original_value_bytes"), bad(50_000).len().to_string());
    assert!(header(big, "dp.truncated_because").contains("message.max.bytes"));
    assert_eq!(header(big, "dp.source.topic"), "tx");
    assert_eq!(header(big, "dp.stage"), "validation");
    let kept = big.payload().unwrap();
    assert!(kept.len() < 20_000 && kept.len() > 10_000, "{} bytes kept", kept.len());
    assert!(bad(50_000).as_bytes().starts_with(kept), "the value's first bytes");
    assert_eq!(big.key(), Some(&b"big-value"[..]));

    let heavy = by_offset("11");
    assert_eq!(header(heavy, "dp.truncated"), "headers_omitted");
    assert_eq!(header(heavy, "trace"), "", "the large header is left out");
    assert_eq!(heavy.payload(), Some(value.as_bytes()), "the value fits and is whole");

    let log = bridge.proc.log_text();
    assert_eq!(log.matches("record dead-lettered").count(), 2, "{log}");

    // A cut dead letter is not replayed: it would re-produce the cut record.
    let (ok, out) = bridge.dlq(&["replay", "--stage", "validation"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("skipped tx.dlq/0/") && out.contains("read tx/0/3 from the source topic"),
        "{out}"
    );
    assert!(out.contains("0 dead letters replayed"), "{out}");
    let metrics = bridge.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "datapulse_bridge_dead_letters_truncated_total", &[]),
        2.0
    );
}
