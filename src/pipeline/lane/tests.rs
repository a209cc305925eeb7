//! Unit tests of the lane: verdict routing, rejected events to dead letters, and how ids are let
//! go when shutdown's deadline interrupts a delivery. Real pieces where they run in process (the
//! memory deduper, the project's sandbox over HTTP on 127.0.0.1, the tracker); the dead-letter
//! topic is replaced by a writer that records what it was given.

use super::*;
use crate::batch::{BatchConfig, Inbox};
use crate::dedupe::DedupeConfig;
use crate::deliver::{ApiConfig, DeliveryConfig};
use crate::dlq::{Write, WriteOnce};
use crate::event::{BetResult, Event};
use crate::offsets::{RecordId, Tracker};
use crate::pipeline::outcome::Totals;
use crate::sandbox::{self, Faults, SandboxArgs, SandboxHandle};
use crate::source::Record;
use crate::telemetry::Telemetry;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const KEY: &str = "dp_lane_test_key";
const TOPIC: &str = "wallet";

/// One dead letter as the lane asked for it.
#[derive(Debug, Clone, PartialEq)]
struct Written {
    record: String,
    stage: &'static str,
    code: String,
    http_status: Option<u16>,
    dedupe_key: Option<String>,
}

/// The dead-letter seam: records each write and reports it written.
#[derive(Default)]
struct Recorded(Mutex<Vec<Written>>);

impl WriteOnce for Recorded {
    fn write_once<'a>(
        &'a self,
        rec: &'a Record,
        why: &'a Reason,
        dedupe_key: Option<&'a str>,
        _cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Write> {
        self.0.lock().push(Written {
            record: rec.id.to_string(),
            stage: why.stage,
            code: why.code.clone(),
            http_status: why.http_status,
            dedupe_key: dedupe_key.map(str::to_string),
        });
        Box::pin(async { Write::Written })
    }
}

struct World {
    lane: Lane,
    outcomes: Arc<Outcomes>,
    tracker: Arc<Mutex<Tracker>>,
    telemetry: Telemetry,
    written: Arc<Recorded>,
    sandbox: SandboxHandle,
    next_offset: i64,
    /// The lane's inbox, as the consumer loop fills it.
    queue: tokio::sync::mpsc::UnboundedSender<Vec<Pending>>,
}

async fn world() -> World {
    world_with(BatchConfig::default()).await
}

async fn world_with(batch: BatchConfig) -> World {
    let sandbox = sandbox::start(SandboxArgs {
        listen: "127.0.0.1:0".into(),
        api_keys: vec![KEY.into()],
        rate_limit: 0,
        ..SandboxArgs::default()
    })
    .await
    .expect("sandbox starts");
    let api: ApiConfig = serde_json::from_value(serde_json::json!({
        "base_url": sandbox.url(),
        "key": KEY,
        "request_timeout": "2s",
        "connect_timeout": "1s",
    }))
    .expect("api config");
    let delivery = DeliveryConfig {
        rate_limit: 1000,
        rate_window: Duration::from_secs(1),
        retry_backoff_initial: Duration::from_millis(20),
        retry_backoff_max: Duration::from_millis(100),
        auth_retry_interval: Duration::from_millis(100),
        ..DeliveryConfig::default()
    };
    let telemetry = Telemetry::new();
    let deliverer = Arc::new(Deliverer::new(&api, &delivery, &telemetry).expect("deliverer"));
    let deduper = Arc::new(
        Deduper::new(&DedupeConfig::default(), &telemetry)
            .await
            .expect("memory deduper"),
    );
    let tracker = Arc::new(Mutex::new(Tracker::new()));
    tracker.lock().assign(TOPIC, 0);
    let written = Arc::new(Recorded::default());
    let outcomes = Arc::new(Outcomes::new(
        Arc::clone(&tracker),
        &telemetry,
        Arc::clone(&written) as Arc<dyn WriteOnce>,
        Arc::clone(&deduper),
    ));
    let (queue, rx) = tokio::sync::mpsc::unbounded_channel();
    let lane = Lane {
        batcher: Batcher::new(Inbox::new(rx), batch),
        deliverer,
        deduper,
        outcomes: Arc::clone(&outcomes),
        unit: TimestampUnit::Seconds,
        stop: CancellationToken::new(),
    };
    World {
        lane,
        outcomes,
        tracker,
        telemetry,
        written,
        sandbox,
        next_offset: 0,
        queue,
    }
}

/// A valid event (a deposit needs `click_id` and `ip_address`, API-CONTRACT.md point 2).
fn event<'a>(name: &'a str, tx: &'a str) -> Event<'a> {
    Event {
        client_user_id: "u1".into(),
        click_id: Some("clk-1".into()),
        ip_address: Some("203.0.113.1".into()),
        event_name: name.into(),
        timestamp: 1_702_963_200,
        transaction_id: Some(tx.into()),
        amount: Some(5.into()),
        currency: Some("USD".into()),
        ..Event::default()
    }
}

/// A record id no world hands over (a keyed event's key does not depend on its record).
fn other_record() -> RecordId {
    RecordId {
        topic: TOPIC.into(),
        partition: 1,
        offset: 0,
    }
}

impl World {
    /// `events` as the consumer hands them over: each begun in the tracker at the next offset of
    /// partition 0.
    fn pending(&mut self, events: &[Event<'_>]) -> Vec<Pending> {
        events
            .iter()
            .map(|e| {
                let id = RecordId {
                    topic: TOPIC.into(),
                    partition: 0,
                    offset: self.next_offset,
                };
                self.next_offset += 1;
                let epoch = self.tracker.lock().begin(&id, Instant::now()).expect("assigned");
                let mut json = Vec::new();
                e.write_json(&mut json);
                let keys = self.lane.deduper.keys_of(e, &id);
                Pending {
                    held: Held {
                        record: Record {
                            id,
                            timestamp_ms: None,
                            key: None,
                            value: None,
                            headers: Vec::new(),
                        },
                        epoch,
                    },
                    keys,
                    timestamp: e.timestamp,
                    json,
                }
            })
            .collect()
    }

    /// Queues events in the lane's inbox, as the consumer loop hands them over.
    fn queue(&mut self, events: &[Event<'_>]) {
        let chunk = self.pending(events);
        self.queue.send(chunk).expect("the lane's inbox is open");
    }

    /// Processes a batch and waits for its dead letters.
    async fn process(&mut self, events: &[Event<'_>]) {
        let batch = self.pending(events);
        // A batch waiting for keys still held (a hold that leaked) must fail the test, not hang it.
        tokio::time::timeout(Duration::from_secs(10), self.lane.process(batch))
            .await
            .expect("the batch reached its outcomes within 10 s");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        assert!(self.outcomes.drain_dead_letters(deadline).await);
    }

    fn accepted_ids(&self) -> Vec<String> {
        self.sandbox
            .events()
            .iter()
            .map(|e| e["transaction_id"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The outcome totals in this world's telemetry.
    fn totals(&self) -> Totals {
        Totals::read(&self.telemetry)
    }

    fn in_flight(&self) -> usize {
        self.tracker.lock().in_flight()
    }
}

#[tokio::test]
async fn each_verdict_goes_its_own_way() {
    let mut w = world().await;
    w.process(&[event("deposit", "a-0")]).await;
    let bet = Event {
        bet_result: Some(BetResult::Win),
        bet_result_amount: Some(1.into()),
        ..event("bet", "bet-1")
    };
    let win_of_same_bet = Event {
        parent_transaction_id: Some("bet-1".into()),
        ..event("win", "win-1")
    };
    w.process(&[
        event("deposit", "a-0"), // delivered before: a duplicate from the store
        event("deposit", "a-1"),
        event("deposit", "a-1"), // the same id again in the batch
        bet,
        win_of_same_bet, // the bet's result a second time: a double count
    ])
    .await;
    assert_eq!(w.accepted_ids(), ["a-0", "a-1", "bet-1"], "each id sent once, in order");
    assert_eq!(w.totals().delivered, 3);
    assert_eq!(w.totals().duplicate, 2);
    assert_eq!(w.totals().dead_lettered, 1);
    assert_eq!(
        *w.written.0.lock(),
        [Written {
            record: "wallet/0/5".into(),
            stage: "dedupe",
            code: "double_count".into(),
            http_status: None,
            dedupe_key: None,
        }]
    );
    assert_eq!(w.in_flight(), 0, "every record finished");
    assert_eq!(w.tracker.lock().committable(TOPIC, 0), Some(6));
}

#[tokio::test]
async fn a_rejected_event_is_dead_lettered_and_its_id_let_go() {
    let mut w = world().await;
    let no_amount = Event {
        amount: None,
        ..event("deposit", "b-1")
    };
    w.process(&[event("deposit", "b-0"), no_amount, event("deposit", "b-2")])
        .await;
    assert_eq!(w.accepted_ids(), ["b-0", "b-2"]);
    let written = w.written.0.lock().clone();
    assert_eq!(written.len(), 1);
    assert_eq!(
        (
            written[0].record.as_str(),
            written[0].stage,
            written[0].code.as_str(),
            written[0].http_status
        ),
        ("wallet/0/1", "api", "rejected", Some(400))
    );
    assert_eq!(w.totals().delivered, 2);
    assert_eq!(w.totals().dead_lettered, 1);
    assert_eq!(w.in_flight(), 0);
    // The rejected id was not recorded: the corrected event goes through.
    w.process(&[event("deposit", "b-1")]).await;
    assert_eq!(w.accepted_ids(), ["b-0", "b-2", "b-1"]);
}

/// An ambiguous answer (502: the API counted the batch, a gateway lost the answer): the events
/// are dead-lettered as `in_doubt` with their dedupe key, never sent again, and the memory store
/// remembers them as doubted: a later copy is a duplicate, until a replayed record lets it go.
#[tokio::test]
async fn events_of_an_ambiguous_answer_are_in_doubt_and_later_copies_duplicates() {
    let mut w = world().await;
    w.sandbox
        .set_faults(Faults {
            script: vec![crate::sandbox::FaultStep::Status502],
            ..Faults::default()
        })
        .unwrap();
    w.process(&[event("deposit", "g-0"), event("deposit", "g-1")]).await;
    assert_eq!(
        w.accepted_ids(),
        ["g-0", "g-1"],
        "counted once by the API, never resent"
    );
    let written = w.written.0.lock().clone();
    assert_eq!(written.len(), 2);
    for (d, key) in written.iter().zip(["g-0", "g-1"]) {
        assert_eq!(
            (d.stage, d.code.as_str(), d.http_status, d.dedupe_key.as_deref()),
            ("api", "in_doubt", Some(502), Some(key))
        );
    }
    assert_eq!((w.totals().delivered, w.totals().dead_lettered), (0, 2));
    w.process(&[event("deposit", "g-0")]).await;
    assert_eq!(w.totals().duplicate, 1, "a copy of an id in doubt is a duplicate");
    assert_eq!(w.accepted_ids(), ["g-0", "g-1"]);
    // `dlq replay`: the bridge reads the replayed record and forgets the doubt.
    let keys = w.lane.deduper.keys_of(&event("deposit", "g-1"), &other_record());
    w.lane.deduper.replayed(&keys);
    w.process(&[event("deposit", "g-1")]).await;
    assert_eq!(w.accepted_ids(), ["g-0", "g-1", "g-1"], "sent again once replayed");
    assert_eq!(w.in_flight(), 0);
}

#[tokio::test]
async fn records_of_a_revoked_partition_are_left_to_the_new_owner() {
    let mut w = world().await;
    let batch = w.pending(&[event("deposit", "c-0")]);
    w.tracker.lock().revoke(TOPIC, 0);
    w.lane.process(batch).await;
    assert!(w.accepted_ids().is_empty(), "nothing sent for the old owner");
    assert_eq!(w.totals().finished(), 0);
}

/// Sends `events` against faults that never let a request through, fires shutdown's deadline
/// after a few tries, and returns how the lane let the ids go.
async fn interrupted(faults: Faults, id: &str) -> (World, Unsent) {
    let mut w = world().await;
    w.sandbox.set_faults(faults).unwrap();
    let to_send = w.pending(&[event("deposit", id)]);
    let keys: Vec<&EventKeys> = to_send.iter().map(|p| &p.keys).collect();
    assert_eq!(w.lane.deduper.check(&keys).await.unwrap(), [Verdict::Send]);
    let abandon = w.outcomes.abandon_token().clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        abandon.cancel();
    });
    let unsent = match w.lane.send(to_send).await {
        Err(u) => u,
        Ok(_) => panic!("no request could succeed"),
    };
    (w, unsent)
}

#[tokio::test]
async fn a_request_that_may_have_been_counted_leaves_its_ids_abandoned() {
    // The request hangs until the client gives up (2 s): it is out when the deadline fires.
    let (w, unsent) = interrupted(
        Faults {
            fault_timeout: 1.0,
            ..Faults::default()
        },
        "d-0",
    )
    .await;
    assert_eq!(unsent, Unsent { how: LetGo::Abandon });
    assert!(w.accepted_ids().is_empty());
    assert_eq!(
        w.totals().finished(),
        0,
        "nothing finished: read again by the next owner"
    );
    // Held no longer: a later check does not wait for this batch.
    let keys = w.lane.deduper.keys_of(&event("deposit", "d-0"), &other_record());
    let verdict = tokio::time::timeout(Duration::from_secs(2), w.lane.deduper.check(&[&keys])).await;
    assert_eq!(verdict.expect("not held").unwrap(), [Verdict::Send]);
}

#[tokio::test]
async fn requests_refused_before_counting_leave_their_ids_released() {
    let (w, unsent) = interrupted(
        Faults {
            fault_429: 1.0,
            ..Faults::default()
        },
        "e-0",
    )
    .await;
    assert_eq!(unsent, Unsent { how: LetGo::Release });
    assert!(w.accepted_ids().is_empty());
    let keys = w.lane.deduper.keys_of(&event("deposit", "e-0"), &other_record());
    let verdict = tokio::time::timeout(Duration::from_secs(2), w.lane.deduper.check(&[&keys])).await;
    assert_eq!(verdict.expect("not held").unwrap(), [Verdict::Send]);
}

#[tokio::test]
async fn a_batch_with_duplicates_is_topped_up_to_max_events_from_what_waits() {
    let mut w = world_with(BatchConfig {
        max_events: 4,
        ..BatchConfig::default()
    })
    .await;
    // Waiting behind the batch: a copy of an id in the batch, then new ids.
    w.queue(&[
        event("deposit", "x-1"),
        event("deposit", "x-2"),
        event("deposit", "x-3"),
        event("deposit", "x-4"),
    ]);
    // Cut at four, of which two are copies: two events would leave.
    w.process(&[
        event("deposit", "x-0"),
        event("deposit", "x-0"),
        event("deposit", "x-1"),
        event("deposit", "x-1"),
    ])
    .await;
    assert_eq!(
        w.accepted_ids(),
        ["x-0", "x-1", "x-2", "x-3"],
        "one full request, each id once, in order"
    );
    let stats = w.sandbox.stats();
    assert_eq!(stats.events_per_request, [(4, 1)].into_iter().collect());
    assert_eq!(w.totals().delivered, 4);
    assert_eq!(
        w.totals().duplicate,
        3,
        "two copies in the batch, one among those topping it up"
    );
    // x-4 (queued fourth, offset 3) did not fit: it leads the next batch.
    assert_eq!(w.lane.batcher.try_next().map(|p| p.held.record.id.offset), Some(3));
}

#[tokio::test]
async fn a_stopping_lane_finishes_nothing_it_never_sent() {
    let mut w = world().await;
    w.queue(&[event("deposit", "s-0"), event("deposit", "s-1")]);
    w.lane.stop.cancel();
    let World {
        lane,
        sandbox,
        telemetry,
        tracker,
        ..
    } = w;
    tokio::time::timeout(Duration::from_secs(5), lane.run())
        .await
        .expect("a stopped lane returns at once");
    assert_eq!(sandbox.stats().requests, 0, "nothing sent after shutdown");
    let totals = Totals::read(&telemetry);
    assert_eq!((totals.finished(), totals.abandoned), (0, 2), "left to the next owner");
    assert_eq!(tracker.lock().in_flight(), 2, "unfinished: not committed past");
}

#[tokio::test]
async fn shutdown_gives_up_retries_of_a_request_refused_before_counting() {
    let mut w = world().await;
    // Every request answered 429 (refused before the API counted anything): retried with backoff.
    w.sandbox
        .set_faults(Faults {
            fault_429: 1.0,
            ..Faults::default()
        })
        .unwrap();
    let to_send = w.pending(&[event("deposit", "t-0")]);
    let keys: Vec<&EventKeys> = to_send.iter().map(|p| &p.keys).collect();
    assert_eq!(w.lane.deduper.check(&keys).await.unwrap(), [Verdict::Send]);
    let stop = w.lane.stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    });
    // Shutdown's deadline (the abandon token) never fires here: the stop alone ends the retries.
    let unsent = match tokio::time::timeout(Duration::from_secs(5), w.lane.send(to_send)).await {
        Ok(Err(u)) => u,
        Ok(Ok(_)) => panic!("no request could succeed"),
        Err(_) => panic!("the retries went on after shutdown"),
    };
    assert_eq!(
        unsent,
        Unsent { how: LetGo::Release },
        "nothing was counted: the id is free"
    );
    assert!(!w.outcomes.abandon_token().is_cancelled());
    let keys = w.lane.deduper.keys_of(&event("deposit", "t-0"), &other_record());
    let verdict = tokio::time::timeout(Duration::from_secs(2), w.lane.deduper.check(&[&keys])).await;
    assert_eq!(verdict.expect("not held").unwrap(), [Verdict::Send]);
}
