//! End-to-end (issue 17, kinds 1 and 3): the built binary against a tansu broker and the sandbox.
//! A Kafka header without a value is absent to the mapping, a "" in the record is absent, a
//! dead letter (and its replay) carries the original headers byte for byte, no value as no
//! value, and a tombstone under `tombstones = "filter"` is filtered, counted with reason
//! `tombstone`, and committed.

mod common;
use common::*;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

/// Two topics: `bets` takes the client's IP address from a header and filters tombstones;
/// `bets.json` takes it from the record.
const MAPPINGS: &str = r#"
[[mapping]]
topics = ["bets"]
tombstones = "filter"
client_user_id = "/user"
event_name = "/type"
timestamp = "/ts"
transaction_id = "key"
amount = "/amount"
currency = "/ccy"
click_id = "/click"
ip_address = "header:x-client-ip"

[[mapping]]
topics = ["bets.json"]
client_user_id = "/user"
event_name = "/type"
timestamp = "/ts"
transaction_id = "/tx"
amount = "/amount"
currency = "/ccy"
click_id = "/click"
ip_address = "/client_ip"
"#;

fn bet(user: &str) -> String {
    format!(r#"{{"user":"{user}","type":"bet","ts":1764000000,"amount":5,"ccy":"EUR"}}"#)
}

/// The headers of a record in order: name and value, `None` for a header without a value.
fn headers_of(m: &OwnedMessage) -> Vec<(String, Option<Vec<u8>>)> {
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

/// The headers every record of `bets` carries besides `x-client-ip`: one without a value, one
/// empty, one not UTF-8, and a repeated name.
fn other_headers() -> Vec<(String, Option<Vec<u8>>)> {
    vec![
        ("trace".into(), None),
        ("empty".into(), Some(Vec::new())),
        ("bin".into(), Some(vec![0xff, 0x00, 0xfe])),
        ("trace".into(), Some(b"t-2".to_vec())),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_without_a_value_empty_values_and_tombstones() {
    let dir = workdir("empty-tombstones");
    let broker = Broker::start(&dir);
    for t in ["bets", "bets.json", "bets.dlq"] {
        broker.create_topic(t, 1).await;
    }
    let sandbox = Sandbox::start(&dir, &[]);

    // bets: (key, value (None: a tombstone), x-client-ip (None: the header without a value)).
    type Bet<'a> = (&'a str, Option<String>, Option<&'a [u8]>);
    let ip = |s: &'static str| Some(s.as_bytes());
    let bets: [Bet; 4] = [
        ("b-1", Some(bet("u1")), None),
        ("b-2", Some(bet("u2")), ip("not-an-ip")),
        ("b-1", None, ip("198.51.100.9")),
        ("b-4", Some(bet("u4")), ip("198.51.100.4")),
    ];
    let producer = broker.producer();
    for (key, value, client_ip) in &bets {
        let mut h = OwnedHeaders::new().insert(Header {
            key: "x-client-ip",
            value: *client_ip,
        });
        for (k, v) in other_headers() {
            h = h.insert(Header {
                key: &k,
                value: v.as_deref(),
            });
        }
        let mut record = FutureRecord::<str, str>::to("bets").partition(0).key(key).headers(h);
        if let Some(v) = value {
            record = record.payload(v.as_str());
        }
        producer.send(record, Duration::from_secs(10)).await.unwrap();
    }
    // bets.json: a bet whose optional IP address is "" (sent without it), a login whose required
    // one is "" (refused by the rule that requires it, `click_id_ip_address`).
    let login = r#"{"user":"u6","type":"login","ts":1764000000,"click":"c6","client_ip":""}"#;
    let json_bet = r#"{"user":"u5","type":"bet","ts":1764000000,"tx":"b-5","amount":5,"ccy":"EUR","client_ip":""}"#;
    broker
        .produce(
            "bets.json",
            &[(0, "b-5".into(), json_bet.into()), (0, "l-6".into(), login.into())],
        )
        .await;

    let config = bridge_config(&broker, &sandbox.url, "g-empty", "bets", "")
        .replace(
            "topics = [\"bets\"]\ncommit",
            "topics = [\"bets\", \"bets.json\"]\ncommit",
        )
        .replace(&flat_mapping("bets"), MAPPINGS);
    let bridge = Bridge::start(&dir, "b", &config);
    wait_until(MIN, "both topics committed at their ends", || async {
        broker.committed("g-empty", "bets", 1) == vec![4] && broker.committed("g-empty", "bets.json", 1) == vec![2]
    })
    .await;

    // Sent: b-1 and b-5 without an IP address, b-4 with its own.
    let mut events = sandbox.events().await;
    events.sort_by_key(|e| e["transaction_id"].as_str().unwrap_or_default().to_string());
    let ids: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|e| {
            (
                e["transaction_id"].as_str().unwrap(),
                e.get("ip_address").and_then(|v| v.as_str()),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [("b-1", None), ("b-4", Some("198.51.100.4")), ("b-5", None)],
        "{events:?}"
    );

    // Dead letters: b-2 (its header names no address) and the login; the tombstone is not one.
    let dead = broker.read_all("bets.dlq", 2, Duration::from_secs(30));
    assert_eq!(dead.len(), 2);
    let b2 = dead
        .iter()
        .find(|m| m.key() == Some(&b"b-2"[..]))
        .expect("b-2 dead-lettered");
    assert_eq!(
        (header(b2, "dp.stage").as_str(), header(b2, "dp.reason").as_str()),
        ("validation", "ip_address")
    );
    // The original headers first, byte for byte and in order, without a value where there was none.
    let mut original = vec![("x-client-ip".to_string(), Some(b"not-an-ip".to_vec()))];
    original.extend(other_headers());
    assert_eq!(headers_of(b2)[..original.len()], original[..]);
    assert!(headers_of(b2)[original.len()..]
        .iter()
        .all(|(k, _)| k.starts_with("dp.")));
    let l6 = dead
        .iter()
        .find(|m| m.key() == Some(&b"l-6"[..]))
        .expect("the login dead-lettered");
    assert_eq!(
        (header(l6, "dp.reason").as_str(), header(l6, "dp.field").as_str()),
        ("click_id_ip_address", "ip_address")
    );

    // The bridge's accounting: the tombstone filtered under its own reason.
    let m = bridge.metrics().await;
    let finished = |labels: &[&str]| metric_sum(&m, "datapulse_bridge_records_finished_total", labels);
    assert_eq!(finished(&["outcome=\"filtered\"", "reason=\"tombstone\""]), 1.0, "{m}");
    assert_eq!(finished(&["outcome=\"filtered\""]), 1.0);
    assert_eq!(finished(&["outcome=\"delivered\""]), 3.0);
    assert_eq!(finished(&["outcome=\"dead_lettered\""]), 2.0);
    assert_eq!(
        metric_sum(&m, "datapulse_bridge_dead_letters_total", &["reason=\"tombstone\""]),
        0.0
    );

    // A replay produces the original headers again, byte for byte: b-2 comes back to `bets`,
    // fails again, and its second dead letter still carries them.
    let (ok, out) = bridge.dlq(&["replay", "--reason", "ip_address"]);
    assert!(ok && out.contains("1 dead letters replayed"), "{out}");
    let replayed = broker.read_all("bets", 5, Duration::from_secs(30));
    let again = replayed.last().unwrap();
    assert_eq!(again.key(), Some(&b"b-2"[..]));
    assert_eq!(headers_of(again)[..original.len()], original[..]);
    wait_until(MIN, "the replayed record committed", || async {
        broker.committed("g-empty", "bets", 1) == vec![5]
    })
    .await;
    let dead = broker.read_all("bets.dlq", 3, Duration::from_secs(30));
    assert_eq!(dead.len(), 3);
    assert_eq!(headers_of(&dead[2])[..original.len()], original[..]);
}
