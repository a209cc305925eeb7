//! Unit tests of the protocol on the memory store. The Redis store is tested against a real
//! `redis-server` in `tests/dedupe_redis.rs`.

use super::*;
use crate::event::BetResult;
use crate::offsets::RecordId;
use std::time::Duration;

fn ev<'a>(name: &'a str, tx: Option<&'a str>) -> Event<'a> {
    Event {
        client_user_id: "u1".into(),
        event_name: name.into(),
        timestamp: 1_702_963_200,
        transaction_id: tx.map(Into::into),
        amount: Some(5.into()),
        currency: Some("USD".into()),
        ..Event::default()
    }
}

fn deposit(tx: &str) -> Event<'_> {
    ev("deposit", Some(tx))
}

/// A Pattern A bet.
fn bet_with_result(tx: &str) -> Event<'_> {
    Event {
        bet_result: Some(BetResult::Win),
        bet_result_amount: Some(1.into()),
        ..ev("bet", Some(tx))
    }
}

/// A Pattern B standalone win.
fn win_for<'a>(tx: &'a str, parent: &'a str) -> Event<'a> {
    Event {
        parent_transaction_id: Some(parent.into()),
        ..ev("win", Some(tx))
    }
}

async fn deduper(cfg: DedupeConfig) -> Deduper {
    Deduper::new(&cfg, &crate::telemetry::Telemetry::new()).await.unwrap()
}

/// The keys of `events` as read from records at offsets 0, 1, … of partition `t/0`.
fn keys(d: &Deduper, events: &[Event<'_>]) -> Vec<EventKeys> {
    keys_at(d, events, 0)
}

/// The keys of `events` as read from records at offsets `first`, `first + 1`, … of `t/0`.
fn keys_at(d: &Deduper, events: &[Event<'_>], first: i64) -> Vec<EventKeys> {
    (first..)
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

async fn check(d: &Deduper, events: &[Event<'_>]) -> Vec<Verdict> {
    let keys = keys(d, events);
    d.check(&keys.iter().collect::<Vec<_>>()).await.unwrap()
}

async fn delivered(d: &Deduper, events: &[Event<'_>]) {
    let keys = keys(d, events);
    d.delivered(&keys.iter().collect::<Vec<_>>()).await.unwrap()
}

async fn release(d: &Deduper, events: &[Event<'_>]) {
    let keys = keys(d, events);
    d.release(&keys.iter().collect::<Vec<_>>()).await
}

/// Asserts that a check is still waiting (for another batch's outcome) after 50 ms.
async fn assert_waiting(check: &mut (impl std::future::Future + Unpin)) {
    let waited = tokio::time::timeout(Duration::from_millis(50), check).await.is_err();
    assert!(waited, "the check did not wait for the other batch's outcome");
}

const SEND: Verdict = Verdict::Send;
fn dup(reason: &'static str) -> Verdict {
    Verdict::Duplicate { reason }
}

#[tokio::test]
async fn in_batch_duplicates_are_dropped_after_the_first() {
    let d = deduper(DedupeConfig::default()).await;
    let batch = [deposit("T1"), deposit("T2"), deposit("T1"), deposit("T1")];
    assert_eq!(
        check(&d, &batch).await,
        vec![SEND, SEND, dup("in_batch"), dup("in_batch")]
    );
}

#[tokio::test]
async fn a_batch_waits_for_another_batchs_in_flight_key() {
    let d = deduper(DedupeConfig::default()).await;
    assert_eq!(check(&d, &[deposit("T1")]).await, vec![SEND]);
    // T1 is sent but not yet acknowledged: a second batch (another delivery lane) waits for its
    // outcome rather than guess it, holding nothing meanwhile.
    let second = [deposit("T1"), deposit("T2")];
    let waiting = check(&d, &second);
    tokio::pin!(waiting);
    assert_waiting(&mut waiting).await;
    assert_eq!(
        check(&d, &[deposit("T2")]).await,
        vec![SEND],
        "the waiting batch holds nothing"
    );
    release(&d, &[deposit("T2")]).await;
    // Delivered: the waiting batch finds T1 in the store.
    delivered(&d, &[deposit("T1")]).await;
    assert_eq!(waiting.await, vec![dup("store"), SEND]);

    // Given up (the API rejected it, or its partition was revoked): the copy is sent.
    let d = deduper(DedupeConfig::default()).await;
    assert_eq!(check(&d, &[deposit("T3")]).await, vec![SEND]);
    let again = [deposit("T3")];
    let waiting = check(&d, &again);
    tokio::pin!(waiting);
    assert_waiting(&mut waiting).await;
    release(&d, &[deposit("T3")]).await;
    assert_eq!(waiting.await, vec![SEND]);
}

#[tokio::test]
async fn released_ids_can_be_sent_again_and_nothing_is_recorded_before_delivery() {
    let d = deduper(DedupeConfig::default()).await;
    assert_eq!(check(&d, &[deposit("T1"), deposit("T2")]).await, vec![SEND, SEND]);
    // T1 was dead-lettered by the API's 400, T2 abandoned at a rebalance: neither was delivered.
    release(&d, &[deposit("T1"), deposit("T2")]).await;
    assert_eq!(check(&d, &[deposit("T1"), deposit("T2")]).await, vec![SEND, SEND]);
}

#[tokio::test]
async fn events_without_a_key_are_deduplicated_by_their_record() {
    let d = deduper(DedupeConfig::default()).await;
    let login = ev("login", None);
    // Two logins alike in every field are two records: both are sent.
    let batch = [login.clone(), login.clone()];
    assert_eq!(check(&d, &batch).await, vec![SEND, SEND]);
    delivered(&d, &batch).await;
    // The same records read again (a crash, a restart, a rebalance): duplicates.
    assert_eq!(check(&d, &batch).await, vec![dup("store"), dup("store")]);
    // The same event in later records (the user logged in again): sent.
    let later = keys_at(&d, &batch, 2);
    assert_eq!(
        d.check(&later.iter().collect::<Vec<_>>()).await.unwrap(),
        vec![SEND, SEND]
    );
    // An empty transaction id is no key either: the record is.
    let empty = [deposit(""), deposit("")];
    let at = keys_at(&d, &empty, 10);
    assert_eq!(d.check(&at.iter().collect::<Vec<_>>()).await.unwrap(), vec![SEND, SEND]);
}

#[tokio::test]
async fn key_with_event_name_keeps_names_apart() {
    let plain = deduper(DedupeConfig::default()).await;
    let both = [deposit("T1"), ev("withdraw", Some("T1"))];
    assert_eq!(check(&plain, &both).await, vec![SEND, dup("in_batch")]);

    let d = deduper(DedupeConfig {
        key: vec!["event_name".into(), "transaction_id".into()],
        ..DedupeConfig::default()
    })
    .await;
    assert_eq!(check(&d, &both).await, vec![SEND, SEND]);
    delivered(&d, &both).await;
    assert_eq!(check(&d, &both).await, vec![dup("store"), dup("store")]);
}

#[tokio::test]
async fn key_from_a_custom_property() {
    let d = deduper(DedupeConfig {
        key: vec!["ref".into()],
        ..DedupeConfig::default()
    })
    .await;
    fn with_ref<'a>(tx: &'a str, r: &'a str) -> Event<'a> {
        Event {
            properties: vec![("ref".into(), r.into())],
            ..deposit(tx)
        }
    }
    // Same property value, different transaction ids: duplicates under this key.
    let batch = [with_ref("T1", "R1"), with_ref("T2", "R1"), deposit("T3")];
    assert_eq!(check(&d, &batch).await, vec![SEND, dup("in_batch"), SEND]);
}

#[tokio::test]
async fn keys_by_event_dedupes_events_without_transaction_id() {
    let mut keys_by_event = std::collections::BTreeMap::new();
    keys_by_event.insert("register".to_string(), vec!["client_user_id".to_string()]);
    let d = deduper(DedupeConfig {
        keys_by_event,
        ..DedupeConfig::default()
    })
    .await;
    let register = ev("register", None);
    let other_user = Event {
        client_user_id: "u2".into(),
        ..register.clone()
    };
    let login = ev("login", None);
    assert_eq!(
        check(
            &d,
            &[register.clone(), register.clone(), other_user, login.clone(), login]
        )
        .await,
        vec![SEND, dup("in_batch"), SEND, SEND, SEND]
    );
    delivered(&d, std::slice::from_ref(&register)).await;
    assert_eq!(check(&d, &[register]).await, vec![dup("store")]);
    // The key of a configured event is scoped by its name: a deposit whose transaction id happens
    // to equal a user id is not a duplicate of that user's registration.
    assert_eq!(check(&d, &[deposit("u1")]).await, vec![SEND]);
}

#[tokio::test]
async fn ttl_forgets_delivered_keys() {
    let d = deduper(DedupeConfig {
        ttl: Duration::from_millis(300),
        ..DedupeConfig::default()
    })
    .await;
    check(&d, &[deposit("T1")]).await;
    delivered(&d, &[deposit("T1")]).await;
    assert_eq!(check(&d, &[deposit("T1")]).await, vec![dup("store")]);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(check(&d, &[deposit("T1")]).await, vec![SEND]);
}

#[tokio::test]
async fn memory_store_is_bounded_and_keeps_the_recent_ids() {
    let store = MemoryStore::new(100, Duration::from_secs(60));
    let keys: Vec<String> = (0..1000).map(|i| format!("T{i}")).collect();
    for k in &keys {
        store.record(&[Probe {
            key: Some(k),
            guard: None,
        }]);
    }
    assert!(store.entry_count() <= 100, "{} entries", store.entry_count());
    let last = Probe {
        key: Some(&keys[999]),
        guard: None,
    };
    let first = Probe {
        key: Some(&keys[0]),
        guard: None,
    };
    assert_eq!(store.lookup(&[last, first]), vec![Lookup::Done, Lookup::Free]);
}

#[tokio::test]
async fn guard_standalone_after_embedded_is_a_double_count() {
    let d = deduper(DedupeConfig::default()).await;
    check(&d, &[bet_with_result("B1")]).await;
    delivered(&d, &[bet_with_result("B1")]).await;
    let v = check(&d, &[win_for("W1", "B1"), win_for("W2", "B9")]).await;
    assert_eq!(
        v,
        vec![
            Verdict::DoubleCount {
                bet: "B1".into(),
                this: ResultPattern::Standalone
            },
            SEND
        ]
    );
}

#[tokio::test]
async fn guard_embedded_after_standalone_is_a_double_count() {
    let d = deduper(DedupeConfig::default()).await;
    check(&d, &[win_for("W1", "B1")]).await;
    delivered(&d, &[win_for("W1", "B1")]).await;
    assert_eq!(
        check(&d, &[bet_with_result("B1")]).await,
        vec![Verdict::DoubleCount {
            bet: "B1".into(),
            this: ResultPattern::Embedded
        }]
    );
    // What the dead letter says, for both ways round and for a doubt.
    let reason = |bet: &str, this| Verdict::DoubleCount { bet: bet.into(), this }.reason();
    assert_eq!(
        reason("B1", ResultPattern::Embedded).as_deref(),
        Some("double count: bet B1 already had a standalone win/loss")
    );
    assert_eq!(
        reason("B1", ResultPattern::Standalone).as_deref(),
        Some("double count: bet B1 already carried its result")
    );
    let doubt = Verdict::InDoubt { key: "T1".into() }.reason().unwrap();
    assert!(doubt.starts_with("in doubt: T1 was in flight"), "{doubt}");
    assert_eq!(Verdict::Send.reason(), None);
    // A plain Pattern B bet with the same id is not a double count; neither is a second
    // standalone settlement of the same bet (not the guard's business).
    let plain_bet = ev("bet", Some("B1"));
    assert_eq!(check(&d, &[plain_bet, win_for("W2", "B1")]).await, vec![SEND, SEND]);
}

#[tokio::test]
async fn guard_in_batch_and_in_flight() {
    let d = deduper(DedupeConfig::default()).await;
    // In one batch, in both orders.
    let v = check(
        &d,
        &[
            bet_with_result("B1"),
            win_for("W1", "B1"),
            win_for("W2", "B2"),
            bet_with_result("B2"),
        ],
    )
    .await;
    assert_eq!(v[0], SEND);
    assert!(
        matches!(&v[1], Verdict::DoubleCount { bet, .. } if bet == "B1"),
        "{v:?}"
    );
    assert_eq!(v[2], SEND);
    assert!(
        matches!(&v[3], Verdict::DoubleCount { bet, .. } if bet == "B2"),
        "{v:?}"
    );
    // In flight in an earlier batch: the win waits for the bet's outcome. Released (the bet was
    // dead-lettered): the standalone win is the only result, and passes.
    let win = [win_for("W3", "B1")];
    let waiting = check(&d, &win);
    tokio::pin!(waiting);
    assert_waiting(&mut waiting).await;
    release(&d, &[bet_with_result("B1")]).await;
    assert_eq!(waiting.await, vec![SEND]);
    // Delivered: the store knows the bet carried its result, and the later win is a double count.
    assert_eq!(check(&d, &[bet_with_result("B5")]).await, vec![SEND]);
    let win = [win_for("W4", "B5")];
    let waiting = check(&d, &win);
    tokio::pin!(waiting);
    assert_waiting(&mut waiting).await;
    delivered(&d, &[bet_with_result("B5")]).await;
    let v = waiting.await;
    assert!(matches!(&v[0], Verdict::DoubleCount { .. }), "{v:?}");
}

#[tokio::test]
async fn guard_can_be_turned_off() {
    let d = deduper(DedupeConfig {
        bet_result_guard: false,
        ..DedupeConfig::default()
    })
    .await;
    check(&d, &[bet_with_result("B1")]).await;
    delivered(&d, &[bet_with_result("B1")]).await;
    assert_eq!(check(&d, &[win_for("W1", "B1")]).await, vec![SEND]);
}

#[tokio::test]
async fn a_redelivered_embedded_bet_is_a_duplicate_not_a_double_count() {
    let d = deduper(DedupeConfig::default()).await;
    check(&d, &[bet_with_result("B1")]).await;
    delivered(&d, &[bet_with_result("B1")]).await;
    assert_eq!(check(&d, &[bet_with_result("B1")]).await, vec![dup("store")]);
}

#[test]
fn keys_are_short_and_unambiguous() {
    let k = |parts: &[&str]| encode_key(&parts.iter().map(|p| Cow::Borrowed(*p)).collect::<Vec<_>>());
    assert_eq!(k(&["tx_554433"]), "tx_554433");
    assert_ne!(k(&["ab", "c"]), k(&["a", "bc"]));
    let long = "x".repeat(10_000);
    assert_eq!(k(&[&long]).len(), 7 + 64);
    assert!(k(&["deposit", "T1"]).starts_with("sha256:"));
    // A raw value cannot pass for a hash.
    let h = k(&["deposit", "T1"]);
    assert_ne!(k(&[&h]), h);
}

#[test]
fn deduper_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Deduper>();
}

#[tokio::test]
async fn a_dead_letter_is_written_by_one_task_and_remembered() {
    let d = deduper(DedupeConfig::default()).await;
    assert_eq!(
        d.claim_dead_letter(&"tx/0/1".parse().unwrap()).await,
        DeadLetterClaim::Mine,
        "the first task claims it"
    );
    // A second task of this process (the record read again) waits for the first one's write.
    let first_record = "tx/0/1".parse().unwrap();
    let second = d.claim_dead_letter(&first_record);
    tokio::pin!(second);
    assert_waiting(&mut second).await;
    d.dead_lettered(&"tx/0/1".parse().unwrap()).await;
    assert_eq!(
        second.await,
        DeadLetterClaim::Written,
        "the second task finishes it without writing"
    );
    // A write that did not happen (shutdown) gives the claim back.
    assert_eq!(
        d.claim_dead_letter(&"tx/0/2".parse().unwrap()).await,
        DeadLetterClaim::Mine
    );
    d.release_dead_letter(&"tx/0/2".parse().unwrap());
    assert_eq!(
        d.claim_dead_letter(&"tx/0/2".parse().unwrap()).await,
        DeadLetterClaim::Mine
    );
}
