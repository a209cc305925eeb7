//! End-to-end: the built binary against a tansu broker and the sandbox (issue 3).

mod common;
use common::*;
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

/// 10,000 records over 4 partitions, a fifth of them keyless (registrations and logins, each with
/// a unique click id), are all accepted exactly once, the group's committed offsets reach the end
/// of every partition, and the metrics account for every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_over_four_partitions_exactly_once() {
    let dir = workdir("spine-10k");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 4).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    let records = mixed_events("d", 10_000, 4, 0.2);
    broker.produce("tx", &records).await;
    let ends = ends_of(&records, 4);
    let mut bridge = Bridge::start(&dir, "bridge", &bridge_config(&broker, &sandbox.url, "g-10k", "tx", ""));

    wait_until(2 * MIN, "10,000 events accepted", || async {
        sandbox.accepted().await >= 10_000
    })
    .await;
    wait_until(MIN, "committed offsets at the end of every partition", || async {
        broker.committed("g-10k", "tx", 4) == ends
    })
    .await;

    let events = sandbox.events().await;
    assert_each_accepted_once(&records, &events);
    let keyless = events.iter().filter(|e| e.get("transaction_id").is_none()).count();
    assert_eq!(keyless, 2_000, "a fifth of the stream is keyless");
    assert_eq!(sandbox.duplicate_ids().await.as_object().map_or(0, |m| m.len()), 0);
    assert_eq!(sandbox.repeated_keyless_events().await, 0);
    // The helper sees what it is for: a keyless event accepted twice and a deposit never accepted.
    let mut tampered = events.clone();
    let login = events.iter().find(|e| e["event_name"] == "login").unwrap().clone();
    let lost = tampered.iter().position(|e| e["event_name"] == "deposit").unwrap();
    let lost = tampered.remove(lost);
    tampered.push(login.clone());
    let report = ExactlyOnce::check(&records, &tampered);
    assert_eq!(report.missing, vec![EventId::of_event(&lost)]);
    assert_eq!(report.repeated, vec![(EventId::of_event(&login), 2)]);
    assert!(report.unexpected.is_empty() && !report.is_clean());

    // The bridge's own accounting agrees with the sandbox's record.
    wait_committed_metric(&bridge, &ends).await;
    let m = bridge.metrics().await;
    let consumed = metric_sum(&m, "datapulse_bridge_records_consumed_total", &[]);
    let delivered = metric_sum(
        &m,
        "datapulse_bridge_records_finished_total",
        &["outcome=\"delivered\""],
    );
    let finished = metric_sum(&m, "datapulse_bridge_records_finished_total", &[]);
    let in_flight = metric_sum(&m, "datapulse_bridge_records_in_flight", &[]);
    assert_eq!(consumed, 10_000.0, "{m}");
    assert_eq!(delivered, 10_000.0);
    assert_eq!(consumed, finished + in_flight);
    assert_eq!(
        committed_metric(&m, &ends),
        ends,
        "committed offset metric per partition"
    );

    let status = bridge
        .proc
        .terminate(Duration::from_secs(30))
        .expect("bridge exits on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let log = bridge.proc.log_text();
    assert!(log.contains("leaving the group"), "{log}");
    assert!(!log.contains(API_KEY), "the API key must never be logged");
}

/// While the API fails every request nothing is committed past undelivered records; a SIGKILL
/// during the outage loses nothing; after recovery every record is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_commits_nothing_and_sigkill_loses_nothing() {
    let dir = workdir("spine-outage");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 2).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    let cfg = bridge_config(&broker, &sandbox.url, "g-outage", "tx", "");

    // Phase 1: a healthy start, 1,000 delivered and committed.
    let first = deposits("a", 1_000, 2);
    broker.produce("tx", &first).await;
    let mut bridge = Bridge::start(&dir, "b1", &cfg);
    wait_until(MIN, "first 1,000 accepted", || async {
        sandbox.accepted().await >= 1_000
    })
    .await;
    wait_until(MIN, "first 1,000 committed", || async {
        broker.committed("g-outage", "tx", 2).iter().sum::<i64>() == 1_000
    })
    .await;

    // Phase 2: the API fails everything; 1,000 more records arrive.
    sandbox.set_faults(serde_json::json!({"fault_500": 1.0})).await;
    let second = deposits("b", 1_000, 2);
    broker.produce("tx", &second).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(sandbox.accepted().await, 1_000, "nothing accepted during the outage");
    assert_eq!(
        broker.committed("g-outage", "tx", 2).iter().sum::<i64>(),
        1_000,
        "nothing committed past undelivered records"
    );
    let m = bridge.metrics().await;
    assert!(metric_sum(&m, "datapulse_bridge_records_in_flight", &[]) > 0.0);

    // Phase 3: SIGKILL during the outage, restart, recover.
    bridge.proc.kill9();
    let _bridge2 = Bridge::start(&dir, "b2", &cfg);
    tokio::time::sleep(Duration::from_secs(3)).await;
    sandbox.set_faults(serde_json::json!({})).await;
    wait_until(2 * MIN, "all 2,000 accepted", || async {
        sandbox.accepted().await >= 2_000
    })
    .await;
    let ends = ends_of(&[first, second].concat(), 2);
    wait_until(MIN, "committed at the end", || async {
        broker.committed("g-outage", "tx", 2) == ends
    })
    .await;
    let ids = accepted_ids(&sandbox).await;
    for i in 0..1_000 {
        assert!(ids.contains_key(&format!("a-{i}")), "a-{i} lost");
        assert!(ids.contains_key(&format!("b-{i}")), "b-{i} lost");
    }
    assert_eq!(ids.len(), 2_000);
    assert!(
        ids.values().all(|&n| n == 1),
        "nothing was delivered twice (the kill happened while nothing was in flight at the API)"
    );
}

/// Two bridges in one group split the partitions; stopping one hands its partitions to the
/// other without loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_split_partitions_and_hand_over() {
    let dir = workdir("spine-two");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 4).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    let cfg = bridge_config(&broker, &sandbox.url, "g-two", "tx", "");
    let mut a = Bridge::start(&dir, "a", &cfg);
    let b = Bridge::start(&dir, "b", &cfg);
    // Both members hold partitions.
    wait_until(MIN, "both bridges assigned", || async {
        let (sa, _) = a.ready().await;
        let (sb, _) = b.ready().await;
        sa == 200 && sb == 200
    })
    .await;

    let first = deposits("x", 4_000, 4);
    broker.produce("tx", &first).await;
    wait_until(MIN, "first 4,000 accepted", || async {
        sandbox.accepted().await >= 4_000
    })
    .await;
    let ma = a.metrics().await;
    let mb = b.metrics().await;
    let da = metric_sum(
        &ma,
        "datapulse_bridge_records_finished_total",
        &["outcome=\"delivered\""],
    );
    let db = metric_sum(
        &mb,
        "datapulse_bridge_records_finished_total",
        &["outcome=\"delivered\""],
    );
    assert!(da > 0.0 && db > 0.0, "both bridges delivered: {da} + {db}");
    assert_eq!(da + db, 4_000.0);

    // Stop one; the other takes over its partitions and delivers what follows.
    let status = a.proc.terminate(Duration::from_secs(30)).expect("a exits");
    assert!(status.success());
    let second = deposits("y", 4_000, 4);
    broker.produce("tx", &second).await;
    wait_until(2 * MIN, "all 8,000 accepted", || async {
        sandbox.accepted().await >= 8_000
    })
    .await;
    let ends = ends_of(&[first, second].concat(), 4);
    wait_until(MIN, "committed at the end", || async {
        broker.committed("g-two", "tx", 4) == ends
    })
    .await;
    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), 8_000, "nothing lost");
    assert!(
        ids.values().all(|&n| n == 1),
        "a graceful hand-over sends nothing twice"
    );
}

/// Bad records go to the dead-letter topic with headers naming the record, the field and the
/// rule; the good ones around them are delivered; every offset is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_dead_lettered_with_reasons() {
    use rdkafka::Message;
    let dir = workdir("spine-dlq");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 1).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    let mut records = deposits("ok", 100, 1);
    records.insert(10, (0, "bad-json".into(), "{not json".into()));
    records.insert(20, (0, "bad-ccy".into(), deposit("bad-ccy", 7).replace("EUR", "euro")));
    broker.produce("tx", &records).await;
    let bridge = Bridge::start(&dir, "b", &bridge_config(&broker, &sandbox.url, "g-dlq", "tx", ""));
    wait_until(MIN, "100 accepted", || async { sandbox.accepted().await >= 100 }).await;
    wait_until(MIN, "committed at the end", || async {
        broker.committed("g-dlq", "tx", 1) == vec![102]
    })
    .await;
    let dead = broker.read_all("tx.dlq", 2, Duration::from_secs(30));
    assert_eq!(dead.len(), 2);
    let by_key: std::collections::HashMap<String, &rdkafka::message::OwnedMessage> = dead
        .iter()
        .map(|m| (String::from_utf8_lossy(m.key().unwrap()).into_owned(), m))
        .collect();
    let json = by_key["bad-json"];
    assert_eq!(header(json, "dp.stage"), "mapping");
    assert_eq!(header(json, "dp.source.offset"), "10");
    assert_eq!(json.payload().unwrap(), b"{not json", "the original value is kept");
    let ccy = by_key["bad-ccy"];
    assert_eq!(header(ccy, "dp.stage"), "validation");
    assert_eq!(header(ccy, "dp.reason"), "currency");
    assert!(
        header(ccy, "dp.error").contains("tx/0/20"),
        "{}",
        header(ccy, "dp.error")
    );

    // `dlq list` groups them by reason; `dlq replay` sends the chosen one through the running
    // pipeline again (still malformed, so it comes back with a `dp.replayed_from` header).
    let (ok, out) = bridge.dlq(&["list"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("2 dead letters") && out.contains("validation: currency") && out.contains("tx/0/20"),
        "{out}"
    );
    let (ok, out) = bridge.dlq(&["replay", "--stage", "mapping"]);
    assert!(ok && out.contains("1 dead letters replayed"), "{out}");
    wait_until(MIN, "the replayed record committed", || async {
        broker.committed("g-dlq", "tx", 1) == vec![103]
    })
    .await;
    let dead = broker.read_all("tx.dlq", 3, Duration::from_secs(30));
    assert_eq!(dead.len(), 3);
    assert!(dead
        .iter()
        .any(|m| header(m, "dp.replayed_from") == "tx.dlq/0/0" || header(m, "dp.replayed_from") == "tx.dlq/0/1"));
}
