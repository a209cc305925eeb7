//! End-to-end dedupe (issue 5): bridge processes sharing a redis-server, against a tansu broker and
//! the sandbox. Two replicas holding one transaction id on different partitions send it once; a
//! bridge killed with SIGKILL repeats nothing after its restart, whether it died after delivering
//! (records read again are known) or with a batch in flight at a failing API (its claims block the
//! ids until the lease runs out; then they are in doubt: dead-lettered, and sent once when the
//! operator replays them).

mod common;
use common::*;
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

fn dedupe_toml(redis: &Redis) -> String {
    redis_dedupe_toml(redis, "e2e", "30s")
}

fn duplicates(metrics: &str) -> f64 {
    metric_sum(
        metrics,
        "datapulse_bridge_records_finished_total",
        &["outcome=\"duplicate\""],
    )
}

/// Every transaction id is produced twice, on neighbouring partitions, to a group of two bridges:
/// the copies land on different processes at about the same time; each id reaches the API once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_send_each_transaction_id_once() {
    let dir = workdir("dedupe-two");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 4).await;
    broker.create_topic("tx.dlq", 1).await;
    let redis = Redis::start(&dir);
    let sandbox = Sandbox::start(&dir, &[]);
    let cfg = bridge_config(&broker, &sandbox.url, "g-dd-two", "tx", &dedupe_toml(&redis));
    let a = Bridge::start(&dir, "a", &cfg);
    let b = Bridge::start(&dir, "b", &cfg);
    wait_until(MIN, "both bridges assigned and ready", || async {
        a.ready().await.0 == 200 && b.ready().await.0 == 200
    })
    .await;

    const N: usize = 2_000;
    let mut records = Vec::with_capacity(2 * N);
    for i in 0..N {
        let tx = format!("t-{i}");
        let p = (i % 4) as i32;
        records.push((p, tx.clone(), deposit(&tx, i as u32)));
        records.push(((p + 1) % 4, tx.clone(), deposit(&tx, i as u32)));
    }
    broker.produce("tx", &records).await;
    // Counted from what was produced: `Broker::ends` (high watermarks) reads wrong against tansu.
    let ends = vec![(2 * N / 4) as i64; 4];
    wait_until(2 * MIN, "every record committed", || async {
        broker.committed("g-dd-two", "tx", 4) == ends
    })
    .await;

    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), N, "every id delivered");
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n != 1).take(10).collect();
    assert!(twice.is_empty(), "accepted more than once: {twice:?}");
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    let delivered = |m: &str| metric_sum(m, "datapulse_bridge_records_finished_total", &["outcome=\"delivered\""]);
    assert!(delivered(&ma) > 0.0 && delivered(&mb) > 0.0, "both bridges delivered");
    assert_eq!(delivered(&ma) + delivered(&mb), N as f64);
    assert_eq!(
        duplicates(&ma) + duplicates(&mb),
        N as f64,
        "the other copy of each id is a duplicate"
    );
}

/// SIGKILL after delivering but before committing: the restarted bridge reads the records again
/// and finds them delivered. SIGKILL with a batch in flight (the API failing): the restarted
/// bridge waits for the dead one's claims to lapse, then sends those ids once. The lease (30 s) is
/// longer than the group takes to hand the dead member's partitions over (session timeout 6 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_repeat_nothing() {
    let dir = workdir("dedupe-kill");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 2).await;
    broker.create_topic("tx.dlq", 1).await;
    let redis = Redis::start(&dir);
    let sandbox = Sandbox::start(&dir, &[]);
    let cfg = bridge_config(&broker, &sandbox.url, "g-dd-kill", "tx", &dedupe_toml(&redis));
    // The first process commits late, so that it dies with delivered records uncommitted.
    let lazy = cfg.replace(
        "commit_interval = \"500ms\"",
        "commit_interval = \"1h\"\ncommit_on_delivery = false",
    );
    assert_ne!(lazy, cfg);

    // Phase 1: delivered, recorded in Redis, not committed; then SIGKILL.
    broker.produce("tx", &deposits("a", 2_000, 2)).await;
    let mut b1 = Bridge::start(&dir, "b1", &lazy);
    wait_until(MIN, "2,000 accepted", || async { sandbox.accepted().await >= 2_000 }).await;
    // `delivered` follows the API's answer by one Redis round trip.
    tokio::time::sleep(Duration::from_secs(1)).await;
    b1.proc.kill9();
    let committed_before: i64 = broker.committed("g-dd-kill", "tx", 2).iter().map(|o| (*o).max(0)).sum();
    assert!(
        committed_before < 2_000,
        "the first process committed everything; nothing to read again"
    );

    // Phase 2: a new process reads them again and drops them all as delivered. Then the API hangs
    // (answers nothing within api.request_timeout, 5 s) while 500 more arrive: they are claimed
    // and their request is out when this process is killed too.
    let mut b2 = Bridge::start(&dir, "b2", &cfg);
    let ends = vec![1_000, 1_000];
    wait_until(2 * MIN, "the records read again committed", || async {
        broker.committed("g-dd-kill", "tx", 2) == ends
    })
    .await;
    let m2 = b2.metrics().await;
    assert_eq!(duplicates(&m2), (2_000 - committed_before) as f64, "{m2}");
    assert_eq!(sandbox.accepted().await, 2_000, "nothing sent again");

    sandbox.set_faults(serde_json::json!({"fault_timeout": 1.0})).await;
    broker.produce("tx", &deposits("b", 500, 2)).await;
    wait_until(MIN, "the new batch in flight", || async {
        metric_sum(&b2.metrics().await, "datapulse_bridge_records_in_flight", &[]) >= 500.0
    })
    .await;
    // Checked (claimed in Redis, marked sent) and out at the API, unanswered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    b2.proc.kill9();
    sandbox.set_faults(serde_json::json!({})).await;

    // Phase 3: the dead process's claims block the ids for up to the lease; then, since the API
    // may have counted them (a request out without an answer), they are in doubt: dead-lettered
    // as `in_doubt`, none sent again.
    let b3 = Bridge::start(&dir, "b3", &cfg);
    let ends = vec![1_250, 1_250];
    wait_until(2 * MIN, "committed at the end", || async {
        broker.committed("g-dd-kill", "tx", 2) == ends
    })
    .await;
    // The batch that was out at the API when b2 died is in doubt; records b2 had read but
    // not yet sent are simply sent.
    let m3 = b3.metrics().await;
    assert!(
        metric_sum(&m3, "datapulse_bridge_dedupe_claim_waits_total", &[]) > 0.0,
        "the restarted bridge waited for the dead one's claims: {m3}"
    );
    let in_doubt = metric_sum(&m3, "datapulse_bridge_dedupe_in_doubt_total", &[]) as usize;
    assert!(in_doubt > 0, "{m3}");
    let dead = broker.read_all("tx.dlq", in_doubt, Duration::from_secs(30));
    assert_eq!(dead.len(), in_doubt, "each id in doubt dead-lettered once");
    let ids = accepted_ids(&sandbox).await;
    for m in &dead {
        assert_eq!(
            (header(m, "dp.stage").as_str(), header(m, "dp.reason").as_str()),
            ("dedupe", "in_doubt")
        );
        let id = header(m, "dp.dedupe_key");
        assert!(
            id.starts_with("b-") && !ids.contains_key(&id),
            "{id} in doubt, and sent"
        );
    }
    assert_eq!(ids.len(), 2_500 - in_doubt, "everything not in doubt delivered");
    assert!(ids.values().all(|n| *n == 1));

    // The operator finds them missing in DataPulse and replays them: the replay lets each id go,
    // and the bridge sends each once.
    let (ok, out) = b3.dlq(&["replay", "--reason", "in_doubt"]);
    assert!(
        ok && out.contains(&format!("{in_doubt} dead letters replayed")),
        "{out}"
    );
    wait_until(2 * MIN, "all 2,500 accepted", || async {
        sandbox.accepted().await >= 2_500
    })
    .await;
    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), 2_500, "nothing lost");
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n != 1).take(10).collect();
    assert!(twice.is_empty(), "accepted more than once: {twice:?}");
    assert!(!b3.proc.log_text().contains(API_KEY));
}

/// Redis unreachable mid-run (the process frozen with SIGSTOP, as in a network partition: its data
/// survives, as a production Redis's must for dedupe to mean anything) under the default `pause`
/// policy: delivery stops (readiness says why), nothing is lost or sent twice, and delivery
/// resumes by itself when Redis answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_pauses_delivery_without_loss_or_duplicates() {
    let dir = workdir("dedupe-redis-outage");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 2).await;
    broker.create_topic("tx.dlq", 1).await;
    let redis = Redis::start(&dir);
    let sandbox = Sandbox::start(&dir, &[]);
    let bridge = Bridge::start(
        &dir,
        "b",
        &bridge_config(&broker, &sandbox.url, "g-dd-outage", "tx", &dedupe_toml(&redis)),
    );
    let first = deposits("before", 1_000, 2);
    broker.produce("tx", &first).await;
    wait_until(MIN, "first 1,000 accepted", || async {
        sandbox.accepted().await >= 1_000
    })
    .await;

    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .arg(sig)
            .arg(redis.proc.pid().to_string())
            .status();
        assert!(status.unwrap().success(), "kill {sig}");
    };
    signal("-STOP");
    let second = deposits("during", 1_000, 2);
    // The same ids again: after the outage they must be recognised, not re-sent.
    let replays: Vec<_> = first.iter().take(200).cloned().collect();
    broker.produce("tx", &second).await;
    broker.produce("tx", &replays).await;
    wait_until(MIN, "readiness names the store", || async {
        let (status, body) = bridge.ready().await;
        status == 503 && body["conditions"]["dedupe_store"]["ok"] == serde_json::json!(false)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        sandbox.accepted().await,
        1_000,
        "nothing is delivered while the store is down"
    );

    signal("-CONT");
    wait_until(2 * MIN, "all 2,000 ids accepted", || async {
        sandbox.accepted().await >= 2_000
    })
    .await;
    let ends = ends_of(&[first, second, replays].concat(), 2);
    wait_until(MIN, "committed at the end", || async {
        broker.committed("g-dd-outage", "tx", 2) == ends
    })
    .await;
    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), 2_000, "nothing lost");
    let twice: Vec<_> = ids.iter().filter(|(_, &n)| n > 1).map(|(id, _)| id.clone()).collect();
    assert!(twice.is_empty(), "sent twice: {twice:?}");
    assert_eq!(bridge.ready().await.0, 200, "ready again");
}

/// A process that died holding a dead-letter claim may or may not have written it: the next owner
/// looks for the record in the dead-letter topic (from the lapsed claim's time on) before writing.
/// Set up as the dead process left it: `tx/0/10`'s claim lapsed after its dead letter reached the
/// broker, `tx/0/11`'s lapsed before. Each ends with exactly one dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_dead_letter_claim_is_looked_up_in_the_topic() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    let dir = workdir("dedupe-dlq-lapsed");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 1).await;
    broker.create_topic("tx.dlq", 1).await;
    let redis = Redis::start(&dir);
    let sandbox = Sandbox::start(&dir, &[]);
    let mut records = deposits("ok", 20, 1);
    records[10] = (0, "bad-10".into(), "{not json".into());
    records[11] = (0, "bad-11".into(), "{not json".into());
    broker.produce("tx", &records).await;

    // The dead process's traces: both claims taken 10 minutes ago (long lapsed), and the dead
    // letter of tx/0/10 written.
    let since = time::OffsetDateTime::now_utc().unix_timestamp() * 1000 - 600_000;
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    for coords in ["tx/0/10", "tx/0/11"] {
        let _: () = redis::cmd("SET")
            .arg(format!("e2e:dead:{coords}"))
            .arg(format!("claim:ghost:1:0:{since}"))
            .query(&mut conn)
            .unwrap();
    }
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "dp.stage",
            value: Some("mapping"),
        })
        .insert(Header {
            key: "dp.reason",
            value: Some("not_json"),
        })
        .insert(Header {
            key: "dp.source.topic",
            value: Some("tx"),
        })
        .insert(Header {
            key: "dp.source.partition",
            value: Some("0"),
        })
        .insert(Header {
            key: "dp.source.offset",
            value: Some("10"),
        });
    broker
        .producer()
        .send(
            FutureRecord::to("tx.dlq")
                .key("bad-10")
                .payload("{not json")
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    let cfg = bridge_config(&broker, &sandbox.url, "g-dd-lapsed", "tx", &dedupe_toml(&redis));
    let bridge = Bridge::start(&dir, "b", &cfg);
    wait_until(MIN, "committed at the end", || async {
        broker.committed("g-dd-lapsed", "tx", 1) == vec![20]
    })
    .await;
    let dead = broker.read_all("tx.dlq", 2, Duration::from_secs(30));
    let mut keys: Vec<String> = dead
        .iter()
        .map(|m| String::from_utf8_lossy(rdkafka::Message::key(m).unwrap()).into_owned())
        .collect();
    keys.sort();
    assert_eq!(keys, ["bad-10", "bad-11"], "one dead letter each");
    assert_eq!(sandbox.accepted().await, 18);
    // Both are remembered now: the claim became the fact.
    for coords in ["tx/0/10", "tx/0/11"] {
        let v: String = redis::cmd("GET")
            .arg(format!("e2e:dead:{coords}"))
            .query(&mut conn)
            .unwrap();
        assert_eq!(v, "1", "{coords}");
    }
    assert!(!bridge.proc.log_text().contains(API_KEY));
}
