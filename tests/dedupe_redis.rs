//! The Redis store against a real `redis-server` (one per test, on a free port of 127.0.0.1):
//! replicas racing on the same ids, a crashed replica, Redis going away and coming back, the
//! `deliver` policy, the bet-result guard across replicas, and round trips per batch.
//!
//! Each test has its own telemetry (metrics and readiness), shared by the replicas it plays.

use datapulse_bridge::dedupe::{
    DeadLetterClaim, DedupeConfig, Deduper, EventKeys, InDoubt, LetGo, OnStoreUnavailable, RedisConfig, ResultPattern,
    StoreKind, StoreUnavailable, Verdict,
};
use datapulse_bridge::event::{BetResult, Event};
use datapulse_bridge::source::RecordId;
use datapulse_bridge::telemetry::{Ready, Telemetry};
use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(3);

/// A `redis-server` child process, killed on drop.
struct RedisServer {
    port: u16,
    child: Child,
    /// Set for a server that keeps its data across a restart (append-only file, fsync always).
    dir: Option<tempfile::TempDir>,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = free_port();
        RedisServer {
            port,
            child: spawn_redis(port, None),
            dir: None,
        }
    }

    /// A server whose data survives `kill` + `restart` (like a production Redis with persistence).
    fn start_persistent() -> RedisServer {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = spawn_redis(port, Some(dir.path().to_path_buf()));
        RedisServer {
            port,
            child,
            dir: Some(dir),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.child = spawn_redis(self.port, self.dir.as_ref().map(|d| d.path().to_path_buf()));
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn_redis(port: u16, persist_dir: Option<PathBuf>) -> Child {
    let mut cmd = Command::new("/usr/bin/redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""]);
    match &persist_dir {
        Some(dir) => cmd
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(dir),
        None => cmd.args(["--appendonly", "no"]),
    };
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "redis-server did not start on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn config(url: String, policy: OnStoreUnavailable) -> DedupeConfig {
    let cfg = DedupeConfig {
        store: StoreKind::Redis,
        on_store_unavailable: policy,
        redis: RedisConfig {
            url,
            prefix: "dp-test".into(),
            lease: LEASE,
            poll_interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
            ..RedisConfig::default()
        },
        ..DedupeConfig::default()
    };
    let errs = cfg.validate();
    assert!(errs.is_empty(), "{errs:?}");
    cfg
}

/// One test's world: its telemetry, its own redis-server, and a config for it.
async fn world(policy: OnStoreUnavailable) -> (Telemetry, RedisServer, DedupeConfig) {
    let server = RedisServer::start();
    let cfg = config(server.url(), policy);
    (Telemetry::new(), server, cfg)
}

/// A replica: one process's deduper (its metrics summed with the test's other replicas').
async fn deduper(cfg: &DedupeConfig, t: &Telemetry) -> Deduper {
    Deduper::new(cfg, t).await.unwrap()
}

fn deposit(tx: &str) -> Event<'static> {
    Event {
        client_user_id: "user_001".into(),
        event_name: "deposit".into(),
        timestamp: 1_702_963_200,
        transaction_id: Some(tx.to_string().into()),
        amount: datapulse_bridge::decimal::Decimal::parse("50.0"),
        currency: Some("USD".into()),
        click_id: Some("clk_1".into()),
        ip_address: Some("203.0.113.1".into()),
        ..Event::default()
    }
}

fn bet_with_result(tx: &str) -> Event<'static> {
    Event {
        event_name: "bet".into(),
        bet_result: Some(BetResult::Loss),
        bet_result_amount: Some((-5).into()),
        ..deposit(tx)
    }
}

fn win_for(tx: &str, parent: &str) -> Event<'static> {
    Event {
        event_name: "win".into(),
        parent_transaction_id: Some(parent.to_string().into()),
        ..deposit(tx)
    }
}

/// The dedupe keys of `events`, as the pipeline takes them when it maps each record.
/// Each event is read from its own record (offsets 0, 1, … of `t/0`); keyed events' keys do not
/// depend on it.
fn keys(d: &Deduper, events: &[Event]) -> Vec<EventKeys> {
    (0..)
        .zip(events)
        .map(|(offset, e)| {
            let id = RecordId {
                topic: "t".into(),
                partition: 0,
                offset,
            };
            d.keys_of(e, &id)
        })
        .collect()
}

fn refs(keys: &[EventKeys]) -> Vec<&EventKeys> {
    keys.iter().collect()
}

fn metric(t: &Telemetry, name: &str, label: Option<(&str, &str)>) -> f64 {
    t.registry()
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| match label {
            Some((k, v)) => m.get_label().iter().any(|l| l.name() == k && l.value() == v),
            None => true,
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

fn ready_condition(t: &Telemetry) -> (bool, String) {
    let c = t.condition(Ready::DedupeStore).expect("dedupe_store condition set");
    (c.ok, c.reason.clone())
}

/// What one simulated replica sent, per transaction id.
type Sent = Arc<Mutex<HashMap<String, u32>>>;

/// Plays the pipeline for one replica: check, "send" the `Send` events (count them), then report
/// them delivered, batch after batch.
async fn replica(d: Deduper, batches: Vec<Vec<Event<'static>>>, sent: Sent) -> Deduper {
    for batch in batches {
        let keys = keys(&d, &batch);
        let verdicts = d.check(&refs(&keys)).await.unwrap();
        let to_send: Vec<usize> = (0..batch.len()).filter(|&i| verdicts[i] == Verdict::Send).collect();
        {
            let mut s = sent.lock().unwrap();
            for &i in &to_send {
                *s.entry(batch[i].transaction_id.as_deref().unwrap().to_string())
                    .or_default() += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await; // the API call
        d.delivered(&to_send.iter().map(|&i| &keys[i]).collect::<Vec<_>>())
            .await
            .unwrap();
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_on_the_same_ids_send_each_once() {
    let (t, _server, cfg) = world(OnStoreUnavailable::Pause).await;
    let (a, b) = (deduper(&cfg, &t).await, deduper(&cfg, &t).await);
    let ids: Vec<String> = (0..600).map(|i| format!("tx_{i}")).collect();
    // Both replicas see every id (the same transaction published on two partitions), in batches
    // of 50: one in the same order as the other (contending on every batch), then in the
    // opposite order (meeting in the middle).
    let batches = |ids: &mut dyn Iterator<Item = &String>| -> Vec<Vec<Event>> {
        let all: Vec<Event> = ids.map(|i| deposit(i)).collect();
        all.chunks(50).map(<[Event]>::to_vec).collect()
    };
    let sent: Sent = Arc::default();
    let waits_before = metric(&t, "datapulse_bridge_dedupe_claim_waits_total", None);
    let (half_a, half_b) = ids.split_at(300);
    let ha = tokio::spawn(replica(a, batches(&mut half_a.iter().chain(half_b)), sent.clone()));
    let hb = tokio::spawn(replica(
        b,
        batches(&mut half_a.iter().chain(half_b.iter().rev())),
        sent.clone(),
    ));
    let (a, b) = (ha.await.unwrap(), hb.await.unwrap());
    let waits = metric(&t, "datapulse_bridge_dedupe_claim_waits_total", None) - waits_before;
    eprintln!("claim waits during the race: {waits}");
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), ids.len(), "every id sent");
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    // Same ids once more, from both: all known.
    let again = vec![deposit("tx_0"), deposit("tx_599"), deposit("tx_300")];
    for d in [&a, &b] {
        let v = d.check(&refs(&keys(d, &again))).await.unwrap();
        assert!(v.iter().all(|v| *v == Verdict::Duplicate { reason: "store" }), "{v:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_ids_are_in_doubt_after_the_lease_and_never_sent_again() {
    let (t, _server, cfg) = world(OnStoreUnavailable::Pause).await;
    let a = deduper(&cfg, &t).await;
    let b = deduper(&cfg, &t).await;
    let c = deduper(&cfg, &t).await;
    let in_doubt_before = metric(&t, "datapulse_bridge_dedupe_in_doubt_total", None);
    let batch = vec![deposit("T1"), deposit("T2")];
    let ka = keys(&a, &batch);
    assert_eq!(a.check(&refs(&ka)).await.unwrap(), vec![Verdict::Send, Verdict::Send]);
    a.mark_sent(&refs(&ka), true).await.unwrap(); // the request leaves
    let claimed_at = Instant::now();
    drop(a); // killed with the batch in flight: the API may or may not have counted it
    let (kb, kc) = (keys(&b, &batch), keys(&c, &batch[..1]));
    let v = b.check(&refs(&kb)).await.unwrap();
    let waited = claimed_at.elapsed();
    assert_eq!(
        v,
        [
            Verdict::InDoubt { key: "T1".into() },
            Verdict::InDoubt { key: "T2".into() }
        ]
    );
    assert!(
        waited >= LEASE - Duration::from_millis(200),
        "in doubt after {waited:?}, before the lease"
    );
    assert!(waited < LEASE * 2, "waited {waited:?}");
    // While b writes the dead letters, a copy of T1 elsewhere waits for it...
    let kc = refs(&kc);
    let copy = c.check(&kc);
    tokio::pin!(copy);
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut copy)
        .await
        .is_err());
    // ... and once they are written, is a duplicate of that dead letter: never sent.
    b.doubt_dead_lettered(&refs(&kb)).await;
    assert_eq!(copy.await.unwrap(), vec![Verdict::Duplicate { reason: "in_doubt" }]);
    assert_eq!(
        b.check(&refs(&kb)).await.unwrap(),
        vec![Verdict::Duplicate { reason: "in_doubt" }; 2]
    );
    assert_eq!(
        metric(&t, "datapulse_bridge_dedupe_in_doubt_total", None) - in_doubt_before,
        2.0
    );
    // `dlq replay` of T1's dead letter (the operator found it missing): T1 is sent again, T2 not.
    assert!(c.forget_doubt("T1").await.unwrap());
    assert!(!c.forget_doubt("T1").await.unwrap(), "only an id in doubt is let go");
    let v = c.check(&refs(&keys(&c, &batch))).await.unwrap();
    assert_eq!(v, vec![Verdict::Send, Verdict::Duplicate { reason: "in_doubt" }]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_in_doubt_whose_dead_letter_was_not_written_stays_in_doubt() {
    let (t, _server, cfg) = world(OnStoreUnavailable::Pause).await;
    let (a, b) = (deduper(&cfg, &t).await, deduper(&cfg, &t).await);
    let batch = vec![deposit("D1")];
    let ka = keys(&a, &batch);
    assert_eq!(a.check(&refs(&ka)).await.unwrap(), vec![Verdict::Send]);
    a.mark_sent(&refs(&ka), true).await.unwrap();
    drop(a);
    let kb = keys(&b, &batch);
    assert!(matches!(
        b.check(&refs(&kb)).await.unwrap()[..],
        [Verdict::InDoubt { .. }]
    ));
    // b is stopped (shutdown's deadline) before the dead letter is acknowledged: it releases.
    b.release(&refs(&kb)).await;
    assert!(matches!(
        b.check(&refs(&kb)).await.unwrap()[..],
        [Verdict::InDoubt { .. }]
    ));
    // b dies holding it in doubt: the next one finds it in doubt too, after the lease.
    drop(b);
    let c = deduper(&cfg, &t).await;
    let v = c.check(&refs(&keys(&c, &batch))).await.unwrap();
    assert!(matches!(v[..], [Verdict::InDoubt { .. }]), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_surely_did_not_reach_the_api_are_not_in_doubt() {
    let (t, server, cfg) = world(OnStoreUnavailable::Pause).await;
    let (a, b) = (deduper(&cfg, &t).await, deduper(&cfg, &t).await);
    // N1: claimed, then killed while waiting for the rate budget (no request left).
    // N2: its request left and was refused (a 429, a 401): the mark is taken back.
    let batch = vec![deposit("N1"), deposit("N2")];
    let ka = keys(&a, &batch);
    assert_eq!(a.check(&refs(&ka)).await.unwrap(), vec![Verdict::Send, Verdict::Send]);
    a.mark_sent(&refs(&ka[1..]), true).await.unwrap();
    a.mark_sent(&refs(&ka[1..]), false).await.unwrap();
    drop(a);
    let kb = keys(&b, &batch);
    assert_eq!(b.check(&refs(&kb)).await.unwrap(), vec![Verdict::Send, Verdict::Send]);
    b.delivered(&refs(&kb)).await.unwrap();
    // What is left in Redis: the delivered keys, no mark.
    let mut conn = server.conn();
    let left: Vec<String> = redis::cmd("KEYS").arg("dp-test:sent:*").query(&mut conn).unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_abandoned_with_a_request_out_is_in_doubt_at_once() {
    let (t, _server, cfg) = world(OnStoreUnavailable::Pause).await;
    let (a, b) = (deduper(&cfg, &t).await, deduper(&cfg, &t).await);
    // Shutdown's deadline passes while a's request is out (A1), and before b's has left (A2).
    let (ka, kb) = (keys(&a, &[deposit("A1")]), keys(&b, &[deposit("A2")]));
    assert_eq!(a.check(&refs(&ka)).await.unwrap(), vec![Verdict::Send]);
    a.mark_sent(&refs(&ka), true).await.unwrap();
    a.let_go(&refs(&ka), LetGo::Abandon).await;
    assert_eq!(b.check(&refs(&kb)).await.unwrap(), vec![Verdict::Send]);
    b.release(&refs(&kb)).await;
    // The next owner needs no lease to know: A1 may have been counted, A2 was not.
    let c = deduper(&cfg, &t).await;
    let start = Instant::now();
    let v = c
        .check(&refs(&keys(&c, &[deposit("A1"), deposit("A2")])))
        .await
        .unwrap();
    assert!(matches!(v[..], [Verdict::InDoubt { .. }, Verdict::Send]), "{v:?}");
    assert!(start.elapsed() < LEASE / 2, "{:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_resend_sends_a_crashed_replicas_ids_again() {
    let (t, _server, mut cfg) = world(OnStoreUnavailable::Pause).await;
    cfg.redis.in_doubt = Some(InDoubt::Resend);
    let a = deduper(&cfg, &t).await;
    let b = deduper(&cfg, &t).await;
    let batch = vec![deposit("R1"), deposit("R2")];
    let ka = keys(&a, &batch);
    assert_eq!(a.check(&refs(&ka)).await.unwrap(), vec![Verdict::Send, Verdict::Send]);
    a.mark_sent(&refs(&ka), true).await.unwrap();
    let claimed_at = Instant::now();
    drop(a);
    let v = b.check(&refs(&keys(&b, &batch))).await.unwrap();
    assert_eq!(v, vec![Verdict::Send, Verdict::Send]);
    assert!(claimed_at.elapsed() >= LEASE - Duration::from_millis(200));
    b.delivered(&refs(&keys(&b, &batch))).await.unwrap();
    assert!(metric(&t, "datapulse_bridge_dedupe_claim_waits_total", None) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_claimed_across_replicas() {
    let (t, _server, cfg) = world(OnStoreUnavailable::Pause).await;
    let (a, b) = (deduper(&cfg, &t).await, deduper(&cfg, &t).await);
    // The old and the new owner of a partition both dead-letter tx/0/7: only the first claim
    // writes; the other waits and finds it written.
    assert_eq!(
        a.claim_dead_letter(&"tx/0/7".parse().unwrap()).await,
        DeadLetterClaim::Mine,
        "a claims and writes"
    );
    let record = "tx/0/7".parse().unwrap();
    let b_claim = b.claim_dead_letter(&record);
    tokio::pin!(b_claim);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut b_claim)
            .await
            .is_err(),
        "b waits while a holds the claim"
    );
    a.dead_lettered(&"tx/0/7".parse().unwrap()).await;
    assert_eq!(
        b_claim.await,
        DeadLetterClaim::Written,
        "b finds it dead-lettered and does not write"
    );
    // A claimer that dies: its claim lapses after the lease, and the next one is told when it was
    // taken, to look in the topic for a write the broker may have taken before the death.
    let before_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000 - 1000;
    assert_eq!(
        a.claim_dead_letter(&"tx/0/8".parse().unwrap()).await,
        DeadLetterClaim::Mine
    );
    let claimed_at = Instant::now();
    drop(a);
    let DeadLetterClaim::Lapsed { since_ms } = b.claim_dead_letter(&"tx/0/8".parse().unwrap()).await else {
        panic!("b must take over a lapsed claim")
    };
    assert!(claimed_at.elapsed() >= LEASE - Duration::from_millis(200));
    assert!(
        since_ms >= before_ms && since_ms <= before_ms + 10_000,
        "{since_ms} vs {before_ms}"
    );
    b.dead_lettered(&"tx/0/8".parse().unwrap()).await;
    assert_eq!(
        b.claim_dead_letter(&"tx/0/8".parse().unwrap()).await,
        DeadLetterClaim::Written
    );
    // A write given up (shutdown's deadline) and tried again by the same process: its own claim.
    assert_eq!(
        b.claim_dead_letter(&"tx/0/9".parse().unwrap()).await,
        DeadLetterClaim::Mine
    );
    b.release_dead_letter(&"tx/0/9".parse().unwrap());
    assert_eq!(
        b.claim_dead_letter(&"tx/0/9".parse().unwrap()).await,
        DeadLetterClaim::Mine
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_replica_keeps_its_claim_past_the_lease() {
    let (t, _server, cfg) = world(OnStoreUnavailable::Pause).await;
    let a = Arc::new(deduper(&cfg, &t).await);
    let b = deduper(&cfg, &t).await;
    let batch = vec![deposit("SLOW")];
    assert_eq!(a.check(&refs(&keys(&a, &batch))).await.unwrap(), vec![Verdict::Send]);
    // The API is slow (429s, retries): delivery takes longer than the lease.
    let slow = {
        let a = a.clone();
        let batch = batch.clone();
        tokio::spawn(async move {
            tokio::time::sleep(LEASE + LEASE / 2).await;
            a.delivered(&refs(&keys(&a, &batch))).await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let v = b.check(&refs(&keys(&b, &batch))).await.unwrap();
    // Without renewal the claim would have expired at the lease and b would have sent it too.
    assert_eq!(v, vec![Verdict::Duplicate { reason: "store" }]);
    slow.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_held_past_twice_the_lease_gives_the_batch_back() {
    let (t, _server, cfg) = world(OnStoreUnavailable::Deliver).await;
    let a = deduper(&cfg, &t).await;
    let b = deduper(&cfg, &t).await;
    let stuck = vec![deposit("STUCK")];
    assert_eq!(a.check(&refs(&keys(&a, &stuck))).await.unwrap(), vec![Verdict::Send]);
    // a is alive (renewing) but never finishes: b neither sends nor finishes the event, and gives
    // the batch back as an error even under `deliver` (Redis is reachable: not an outage).
    let batch = vec![deposit("FREE"), deposit("STUCK")];
    let start = Instant::now();
    let err = b.check(&refs(&keys(&b, &batch))).await.unwrap_err();
    assert!(start.elapsed() >= LEASE * 2, "{:?}", start.elapsed());
    assert!(matches!(err, StoreUnavailable::Contended { .. }), "{err}");
    // Nothing of that batch stayed held: once a gives up, b gets both.
    a.release(&refs(&keys(&a, &stuck))).await;
    assert_eq!(
        b.check(&refs(&keys(&b, &batch))).await.unwrap(),
        vec![Verdict::Send, Verdict::Send]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_check_leaves_nothing_held() {
    let (t, _server, cfg) = world(OnStoreUnavailable::Pause).await;
    let a = deduper(&cfg, &t).await;
    let b = deduper(&cfg, &t).await;
    let batch = vec![deposit("C1")];
    assert_eq!(a.check(&refs(&keys(&a, &batch))).await.unwrap(), vec![Verdict::Send]);
    // b waits for a's claim; its caller gives up (the check future is dropped).
    let cancelled = tokio::time::timeout(Duration::from_millis(300), b.check(&refs(&keys(&b, &batch)))).await;
    assert!(cancelled.is_err(), "b should have been waiting");
    a.release(&refs(&keys(&a, &batch))).await;
    // Had the cancelled call left C1 held, b would now call it a duplicate of something never sent.
    assert_eq!(b.check(&refs(&keys(&b, &batch))).await.unwrap(), vec![Verdict::Send]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_under_pause_fails_and_recovers_without_loss_or_repeat() {
    let t = Telemetry::new();
    let mut server = RedisServer::start_persistent();
    let d = Deduper::new(&config(server.url(), OnStoreUnavailable::Pause), &t)
        .await
        .unwrap();
    let ids = |r: std::ops::Range<u32>| r.map(|i| deposit(&format!("P{i}"))).collect::<Vec<_>>();
    let (b1, b2, b3) = (ids(0..10), ids(10..20), ids(20..30));
    let mut sent: HashMap<String, u32> = HashMap::new();
    let mut send = |events: &[Event], verdicts: &[Verdict]| {
        for (e, v) in events.iter().zip(verdicts) {
            if *v == Verdict::Send {
                *sent
                    .entry(e.transaction_id.as_deref().unwrap().to_string())
                    .or_default() += 1;
            }
        }
    };

    let v1 = d.check(&refs(&keys(&d, &b1))).await.unwrap();
    send(&b1, &v1);
    d.delivered(&refs(&keys(&d, &b1))).await.unwrap();
    let v2 = d.check(&refs(&keys(&d, &b2))).await.unwrap();
    send(&b2, &v2);
    assert!(ready_condition(&t).0);

    server.kill();
    // The API accepted b2, but recording it fails: the pipeline must not commit, and retries.
    assert!(d.delivered(&refs(&keys(&d, &b2))).await.is_err());
    let (ok, reason) = ready_condition(&t);
    assert!(!ok && reason.contains("redis unreachable"), "{reason}");
    let err = d.check(&refs(&keys(&d, &b3))).await.unwrap_err();
    assert!(matches!(err, StoreUnavailable::Unreachable { .. }), "{err}");
    assert!(metric(&t, "datapulse_bridge_dedupe_store_errors_total", Some(("op", "check"))) >= 1.0);

    server.restart();
    let start = Instant::now();
    while d.delivered(&refs(&keys(&d, &b2))).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "no recovery after restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready_condition(&t).0, "{}", ready_condition(&t).1);
    let v3 = d.check(&refs(&keys(&d, &b3))).await.unwrap();
    send(&b3, &v3);
    d.delivered(&refs(&keys(&d, &b3))).await.unwrap();

    // Everything is known after the outage, each id was sent exactly once.
    let all: Vec<Event> = [b1, b2, b3].concat();
    let again = d.check(&refs(&keys(&d, &all))).await.unwrap();
    assert!(
        again.iter().all(|v| *v == Verdict::Duplicate { reason: "store" }),
        "{again:?}"
    );
    assert_eq!(sent.len(), 30);
    assert!(sent.values().all(|n| *n == 1), "{sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_policy_sends_without_store_counted_and_visible() {
    let t = Telemetry::new();
    // Nothing listens on this port.
    let url = format!("redis://127.0.0.1:{}/0", free_port());
    let d = Deduper::new(&config(url, OnStoreUnavailable::Deliver), &t)
        .await
        .unwrap();
    let before_check = metric(&t, "datapulse_bridge_dedupe_unguarded_total", Some(("stage", "check")));
    let before_delivered = metric(
        &t,
        "datapulse_bridge_dedupe_unguarded_total",
        Some(("stage", "delivered")),
    );
    let batch = vec![deposit("D1"), deposit("D2"), deposit("D1")];
    let v = d.check(&refs(&keys(&d, &batch))).await.unwrap();
    // In-process dedupe still works without the store.
    assert_eq!(
        v,
        vec![Verdict::Send, Verdict::Send, Verdict::Duplicate { reason: "in_batch" }]
    );
    assert_eq!(
        metric(&t, "datapulse_bridge_dedupe_unguarded_total", Some(("stage", "check"))) - before_check,
        2.0
    );
    let (ok, reason) = ready_condition(&t);
    assert!(ok && reason.contains("WITHOUT dedupe"), "{reason}");
    d.delivered(&refs(&keys(&d, &batch[..2]))).await.unwrap();
    assert_eq!(
        metric(
            &t,
            "datapulse_bridge_dedupe_unguarded_total",
            Some(("stage", "delivered"))
        ) - before_delivered,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_works_across_replicas_in_both_orders_and_in_flight() {
    let (t, _server, cfg) = world(OnStoreUnavailable::Pause).await;
    let (a, b) = (deduper(&cfg, &t).await, deduper(&cfg, &t).await);
    let double = |v: &Verdict, b: &str| matches!(v, Verdict::DoubleCount { bet, .. } if bet == b);

    // Embedded result delivered by a, then a standalone win for the same bet at b.
    let bet1 = vec![bet_with_result("B1")];
    assert_eq!(a.check(&refs(&keys(&a, &bet1))).await.unwrap(), vec![Verdict::Send]);
    a.delivered(&refs(&keys(&a, &bet1))).await.unwrap();
    let v = b.check(&refs(&keys(&b, &[win_for("W1", "B1")]))).await.unwrap();
    assert!(
        double(&v[0], "B1")
            && matches!(
                &v[0],
                Verdict::DoubleCount {
                    this: ResultPattern::Standalone,
                    ..
                }
            ),
        "{v:?}"
    );

    // Standalone win delivered by b, then the bet with an embedded result at a.
    let win2 = vec![win_for("W2", "B2")];
    assert_eq!(b.check(&refs(&keys(&b, &win2))).await.unwrap(), vec![Verdict::Send]);
    b.delivered(&refs(&keys(&b, &win2))).await.unwrap();
    let v = a.check(&refs(&keys(&a, &[bet_with_result("B2")]))).await.unwrap();
    assert!(double(&v[0], "B2"), "{v:?}");

    // In flight at a (not delivered yet): b's standalone win is a double count too.
    let bet3 = vec![bet_with_result("B3")];
    assert_eq!(a.check(&refs(&keys(&a, &bet3))).await.unwrap(), vec![Verdict::Send]);
    let v = b.check(&refs(&keys(&b, &[win_for("W3", "B3")]))).await.unwrap();
    assert!(double(&v[0], "B3"), "{v:?}");
    // a's bet is dead-lettered (released): the win is then the only result and passes.
    a.release(&refs(&keys(&a, &bet3))).await;
    assert_eq!(
        b.check(&refs(&keys(&b, &[win_for("W3", "B3")]))).await.unwrap(),
        vec![Verdict::Send]
    );
}

fn commandstats(conn: &mut redis::Connection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_trip_per_batch_operation_and_only_ids_are_written() {
    let t = Telemetry::new();
    let server = RedisServer::start();
    let d = Deduper::new(&config(server.url(), OnStoreUnavailable::Pause), &t)
        .await
        .unwrap();
    // Warm up: loads the scripts (EVALSHA, NOSCRIPT, SCRIPT LOAD, EVALSHA).
    let warm = vec![deposit("warm"), bet_with_result("warm_bet")];
    d.check(&refs(&keys(&d, &warm))).await.unwrap();
    d.delivered(&refs(&keys(&d, &warm))).await.unwrap();
    let mut conn = server.conn();
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut conn).unwrap();

    const BATCHES: usize = 5;
    const EVENTS: usize = 200;
    for b in 0..BATCHES {
        let batch: Vec<Event> = (0..EVENTS)
            .map(|i| match i % 3 {
                0 => deposit(&format!("b{b}_{i}")),
                1 => bet_with_result(&format!("b{b}_{i}")),
                _ => win_for(&format!("b{b}_{i}"), &format!("other_{b}_{i}")),
            })
            .collect();
        let v = d.check(&refs(&keys(&d, &batch))).await.unwrap();
        assert!(v.iter().all(|v| *v == Verdict::Send));
        d.delivered(&refs(&keys(&d, &batch))).await.unwrap();
    }
    let stats = commandstats(&mut conn);
    let round_trips = stats.get("evalsha").copied().unwrap_or(0) + stats.get("eval").copied().unwrap_or(0);
    assert_eq!(round_trips, (2 * BATCHES) as u64, "{stats:?}");
    // No command is sent per event outside the scripts: the only other top-level commands are
    // this test's own (CONFIG, INFO) and possibly the renewer's EVALSHA, counted above.
    for name in stats.keys() {
        let in_script = [
            "exists", "get", "set", "hgetall", "hset", "hdel", "pttl", "pexpire", "del", "time",
        ];
        assert!(
            in_script.contains(&name.as_str())
                || ["evalsha", "eval", "config|resetstat", "info"].contains(&name.as_str()),
            "unexpected command {name}: {stats:?}"
        );
    }

    // What is in Redis: the documented key kinds under the prefix, ids only, each with a TTL.
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(!keys.is_empty());
    for k in &keys {
        let kind = k.strip_prefix("dp-test:").and_then(|r| r.split(':').next());
        assert!(matches!(kind, Some("done" | "result")), "unexpected key {k}");
        let ttl: i64 = redis::cmd("PTTL").arg(k).query(&mut conn).unwrap();
        assert!(ttl > 0, "{k} has no TTL");
        let val: String = redis::cmd("GET").arg(k).query(&mut conn).unwrap();
        assert!(["1", "a", "b"].contains(&val.as_str()), "{k} = {val}");
    }
    // Claims were all dropped on delivery; done keys are the transaction ids verbatim.
    assert!(keys.contains(&"dp-test:done:b0_0".to_string()));
    assert!(keys.contains(&"dp-test:result:b0_1".to_string()));
    assert!(keys.contains(&"dp-test:result:other_0_2".to_string()));
}
