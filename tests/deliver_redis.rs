//! The shared rate budget in Redis: replicas sharing one key draw from one GCRA budget kept by a
//! real `redis-server` (started by the test on a free port), against a sandbox with a scaled
//! limit. Each replica has its own telemetry, as each process would.

mod deliver_common;

use datapulse_bridge::deliver::{Deliverer, DeliveryConfig, EventResult, RateMode};
use datapulse_bridge::sandbox::{FaultStep, Faults};
use datapulse_bridge::settings::Secret;
use datapulse_bridge::telemetry::{Ready, Telemetry};
use deliver_common::*;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port }
    }

    fn url(&self) -> String {
        url(self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}/0")
}

fn shared(redis_url: &str, limit: u32, window: Duration) -> DeliveryConfig {
    DeliveryConfig {
        rate_mode: RateMode::Redis,
        redis_url: Some(Secret(redis_url.into())),
        rate_limit: limit,
        rate_window: window,
        ..delivery()
    }
}

fn rate_budget_ready(t: &Telemetry) -> Option<bool> {
    t.condition(Ready::RateBudget).map(|c| c.ok)
}

#[tokio::test]
async fn three_replicas_share_one_budget_and_never_meet_a_429() {
    let redis = Redis::start_on(free_port());
    let window = Duration::from_secs(2);
    let sb = sandbox(20, window, |_| {}).await;
    let cfg = shared(&redis.url(), 20, window);
    let api = api(&sb.url(), Duration::from_secs(2));
    let telemetry: Vec<Telemetry> = (0..3).map(|_| Telemetry::new()).collect();
    let replicas: Vec<Arc<Deliverer>> = telemetry
        .iter()
        .map(|t| Arc::new(deliverer_in(&api, &cfg, t)))
        .collect();
    let cancel = CancellationToken::new();
    let per_replica = 20;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (r, d) in replicas.iter().enumerate() {
        let (d, c) = (d.clone(), cancel.clone());
        tasks.push(tokio::spawn(async move {
            for b in 0..per_replica {
                let res = d.deliver(&deposits(&format!("r{r}-{b}"), 10, &[]), &c).await.unwrap();
                assert!(res.iter().all(|x| *x == EventResult::Delivered));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = start.elapsed();
    let stats = sb.stats();
    let requests = stats.requests;
    eprintln!(
        "3 replicas, shared budget 20 per 2 s: {requests} requests in {took:?} ({:.2} requests/s); statuses {:?}",
        requests as f64 / took.as_secs_f64(),
        stats.by_status
    );
    assert_eq!(
        stats.by_status.get(&429),
        None,
        "the shared budget let the key exceed its limit"
    );
    assert_eq!(requests, 3 * per_replica as u64);
    assert_eq!(stats.accepted_events, 3 * per_replica as u64 * 10);
    assert!(stats.duplicate_transaction_ids.is_empty());
    // 60 requests evenly spaced at 2 s / 20 = 100 ms: at least 59 intervals, several windows.
    assert!(took >= Duration::from_millis(5_800), "faster than the limit: {took:?}");
    for t in &telemetry {
        assert_eq!(rate_budget_ready(t), Some(true));
    }

    // Redis holds the budget under a hash, never the key itself.
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].starts_with("datapulse-bridge:rate:key-"), "{keys:?}");
    assert!(!keys[0].contains(KEY));
    let value: String = redis::cmd("GET").arg(&keys[0]).query(&mut con).unwrap();
    assert!(value.parse::<u64>().is_ok(), "the budget holds a time, got {value}");
}

#[tokio::test]
async fn a_429_on_one_replica_pauses_the_others() {
    let redis = Redis::start_on(free_port());
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    sb.set_faults(Faults {
        script: vec![FaultStep::Status429],
        ..Faults::default()
    })
    .unwrap();
    let cfg = shared(&redis.url(), 1000, Duration::from_secs(1));
    let api = api(&sb.url(), Duration::from_secs(2));
    let a = Arc::new(deliverer(&api, &cfg));
    let b = deliverer(&api, &cfg);
    let cancel = CancellationToken::new();
    let task = {
        let c = cancel.clone();
        tokio::spawn(async move { a.deliver(&deposits("a", 5, &[]), &c).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b_start = Instant::now();
    let rb = b.deliver(&deposits("b", 5, &[]), &cancel).await.unwrap();
    let b_took = b_start.elapsed();
    let ra = task.await.unwrap().unwrap();
    assert!(ra.iter().chain(&rb).all(|x| *x == EventResult::Delivered));
    let stats = sb.stats();
    assert_eq!(stats.requests, 3, "replica b sent during a's pause: {stats:?}");
    assert!(
        b_took >= Duration::from_millis(650),
        "replica b did not wait for the shared pause: {b_took:?}"
    );
}

#[tokio::test]
async fn unreachable_redis_holds_delivery_and_readiness_until_it_answers() {
    let port = free_port();
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    let t = Telemetry::new();
    let d = Arc::new(deliverer_in(
        &api(&sb.url(), Duration::from_secs(2)),
        &shared(&url(port), 60, Duration::from_secs(1)),
        &t,
    ));
    let cancel = CancellationToken::new();
    let task = {
        let (d, c) = (d.clone(), cancel.clone());
        tokio::spawn(async move { d.deliver(&deposits("u", 5, &[]), &c).await })
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!task.is_finished());
    assert_eq!(
        sb.stats().requests,
        0,
        "a request left without a unit of the shared budget"
    );
    assert_eq!(rate_budget_ready(&t), Some(false));
    let _redis = Redis::start_on(port);
    let r = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("delivery resumes once Redis answers")
        .unwrap()
        .unwrap();
    assert!(r.iter().all(|x| *x == EventResult::Delivered));
    assert_eq!(rate_budget_ready(&t), Some(true));
}

/// A 503 with `Retry-After` (issue 18, scenario 3) pauses the key for every replica sharing its
/// budget: after replica a met the 503, replica b sends nothing until the window ends, and both
/// deliver within a couple of seconds after it.
#[tokio::test]
async fn a_503_with_retry_after_on_one_replica_holds_the_others() {
    let redis = Redis::start_on(free_port());
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    let cfg = shared(&redis.url(), 1000, Duration::from_secs(1));
    let api = api(&sb.url(), Duration::from_secs(2));
    let a = Arc::new(deliverer(&api, &cfg));
    let b = deliverer(&api, &cfg);
    let t0 = Instant::now();
    sb.set_faults(Faults {
        unavailable_for: Some(Duration::from_secs(3)),
        ..Faults::default()
    })
    .unwrap();
    let cancel = CancellationToken::new();
    let task = {
        let c = cancel.clone();
        tokio::spawn(async move { a.deliver(&deposits("a", 5, &[]), &c).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rb = b.deliver(&deposits("b", 5, &[]), &cancel).await.unwrap();
    let b_done = t0.elapsed();
    let ra = task.await.unwrap().unwrap();
    assert!(ra.iter().chain(&rb).all(|x| *x == EventResult::Delivered));
    let stats = sb.stats();
    assert_eq!(
        stats.by_status.get(&503),
        Some(&1),
        "only the request that met the window was answered 503: {stats:?}"
    );
    assert!(
        b_done >= Duration::from_secs(3),
        "replica b sent inside the window: {b_done:?}"
    );
    assert!(
        b_done <= Duration::from_millis(5_500),
        "replica b waited too long: {b_done:?}"
    );
}

/// A replica that drew its next request's unit in advance (the batcher reserves while it fills a
/// batch) does not spend it inside a pause another replica met afterwards: the 503's
/// `Retry-After` holds it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_drawn_before_a_pause_is_not_spent_inside_it() {
    let redis = Redis::start_on(free_port());
    let sb = sandbox(0, Duration::from_secs(60), |_| {}).await;
    let cfg = shared(&redis.url(), 1000, Duration::from_secs(1));
    let api = api(&sb.url(), Duration::from_secs(2));
    let (a, b) = (deliverer(&api, &cfg), deliverer(&api, &cfg));
    let cancel = CancellationToken::new();
    // b draws its next unit now, before any pause.
    b.reserve(&cancel).await.unwrap();
    sb.set_faults(Faults {
        unavailable_for: Some(Duration::from_secs(3)),
        ..Faults::default()
    })
    .unwrap();
    let t0 = Instant::now();
    let a_task = tokio::spawn({
        let c = cancel.clone();
        async move { a.deliver(&deposits("a", 5, &[]), &c).await }
    });
    // a meets the 503 and pauses the key for every replica; then b sends with its old unit.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rb = b.deliver(&deposits("b", 5, &[]), &cancel).await.unwrap();
    let b_done = t0.elapsed();
    let ra = a_task.await.unwrap().unwrap();
    assert!(ra.iter().chain(&rb).all(|x| *x == EventResult::Delivered));
    assert_eq!(sb.stats().by_status.get(&503), Some(&1), "{:?}", sb.stats());
    assert!(
        b_done >= Duration::from_secs(3),
        "b spent its unit inside the window: {b_done:?}"
    );
}
