//! The properties the fuzz targets check, shared with `tests/fuzz_regressions.rs` (which includes
//! this file) so that a crash input replays through exactly the code the fuzzer ran.
//!
//! Each check panics only when a property breaks; the code under test must never panic.

use datapulse_bridge::decimal::Decimal;
use datapulse_bridge::event::{ContractOptions, Event, TimestampUnit};
use datapulse_bridge::mapping::{MapOutcome, Mapper, SourceRecord};
use serde_json::Value;
use std::sync::OnceLock;

/// The topic the fixed mapping applies to.
pub const TOPIC: &str = "wallet.transactions";

/// A mapping in the JSON-pointer form (`field = "/path"`), nested paths and a custom property
/// included, compiled through the same config loader the bridge uses.
const CONFIG: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:9"
group_id = "fuzz"
topics = ["wallet.transactions"]

[api]
base_url = "http://127.0.0.1:9"
key = "fuzz-key"

[dead_letter]
topic = "wallet.transactions.dlq"

# Small, so that a record of a few long fields makes an event over it (`too_large`).
[batch]
max_bytes = 16384

[[mapping]]
topics = ["wallet.transactions"]
client_user_id = "/player/id"
event_name = "/type"
timestamp = "/ts"
transaction_id = "/ref"
amount = "/money/value"
currency = "/money/ccy"
is_crypto = "/money/crypto"
click_id = "/click"
ip_address = "/ip"
bet_result = "/result/kind"
bet_result_amount = "/result/amount"
parent_transaction_id = "/parent"
properties = { from = "/meta", fields = ["brand"] }
"#;

/// The compiled fuzz mapping and the largest event body `run` would deliver with its config.
fn mapper_and_limit() -> &'static (Mapper, usize) {
    static MAPPER: OnceLock<(Mapper, usize)> = OnceLock::new();
    MAPPER.get_or_init(|| {
        let cfg = datapulse_bridge::config::from_toml_str(CONFIG).expect("the fuzz config is valid");
        let mapper = Mapper::compile(&cfg.mapping, &cfg.api.contract()).expect("the fuzz mapping compiles");
        (mapper, datapulse_bridge::mapping::max_event_bytes(cfg.batch.max_bytes))
    })
}

fn mapper() -> &'static Mapper {
    &mapper_and_limit().0
}

/// What `datapulse-bridge map` prints for one sample line: (stdout, stderr).
fn map_command(line: &[u8]) -> (String, String) {
    let (mapper, limit) = mapper_and_limit();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    datapulse_bridge::mapping::run_map(mapper, *limit, Some(TOPIC.into()), line, &mut out, &mut err)
        .expect("map runs over bytes in memory");
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// The input as a record value through `run`'s path before delivery
/// (`Mapper::map_for_delivery`, with the fuzz config's limit); the body goes to `body`.
fn run_path<'a>(data: &'a [u8], body: &mut Vec<u8>) -> MapOutcome<'a> {
    let (mapper, limit) = mapper_and_limit();
    let rec = SourceRecord {
        topic: TOPIC,
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        key: None,
        value: Some(data),
        headers: &[],
    };
    mapper.map_for_delivery(&rec, *limit, body)
}

/// `run`'s verdict on the input as a record value: `event`, `filtered`, or the failure's reason.
pub fn run_reason(data: &[u8]) -> String {
    match run_path(data, &mut Vec::new()) {
        MapOutcome::Event(_) => "event".into(),
        MapOutcome::Filtered { .. } => "filtered".into(),
        MapOutcome::Failed(e) => e.reason,
    }
}

/// `map` is `run` (issue 16, item 6): the input as a sample line of `datapulse-bridge map`, given
/// as `value_base64` in an envelope, as the exact bytes of `value` when it is a JSON object or
/// array, and raw when it is no envelope itself, gets the verdict `run`'s
/// `Mapper::map_for_delivery` gives the same record: the same event body, or a failure with the
/// same reason and field.
pub fn check_map_is_run(data: &[u8]) {
    use base64::Engine;
    // One line, not blank, without the `\r` that `map` strips from a line's end.
    if data.contains(&b'\n') || data.ends_with(b"\r") || data.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    // What `run` gives a record of these bytes, as `map` prints it.
    let want_for = |data: &[u8]| {
        let mut body = Vec::new();
        match run_path(data, &mut body) {
            MapOutcome::Event(_) => (format!("{}\n", String::from_utf8_lossy(&body)), String::new()),
            MapOutcome::Filtered { reason, .. } => (String::new(), format!("line 1: filtered: {reason}\n")),
            MapOutcome::Failed(e) => {
                let field = e.field.map(|f| format!(" on field `{f}`")).unwrap_or_default();
                let line = format!(
                    "line 1: failed at {}{field} ({}): {}\n",
                    e.stage.as_str(),
                    e.reason,
                    e.message
                );
                (String::new(), line)
            }
        }
    };
    let want = want_for(data);
    let same = |line: &[u8], how: &str, want: &(String, String)| {
        let (out, err) = map_command(line);
        // stderr ends with the count line.
        let verdict = err.rsplit_once("records:").map_or(err.as_str(), |(head, _)| head);
        let verdict = verdict.rsplit_once('\n').map_or("", |(head, _)| head);
        let verdict = if verdict.is_empty() {
            String::new()
        } else {
            format!("{verdict}\n")
        };
        assert_eq!(
            (out.as_str(), verdict.as_str()),
            (want.0.as_str(), want.1.as_str()),
            "{how}: {}",
            String::from_utf8_lossy(line)
        );
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(data);
    same(
        format!(r#"{{"value_base64":"{b64}"}}"#).as_bytes(),
        "value_base64",
        &want,
    );
    let text = std::str::from_utf8(data).ok();
    let first = data.iter().find(|b| !b.is_ascii_whitespace());
    if text.is_some()
        && matches!(first, Some(b'{' | b'['))
        // An envelope's `value` is passed on as bytes when its structure holds (as
        // `IgnoredAny` checks); the mapping then refuses what `run` refuses.
        && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
    {
        let mut line = br#"{"value":"#.to_vec();
        line.extend_from_slice(data);
        line.push(b'}');
        // The envelope passes the value's bytes, not the white space around it (which is no
        // part of a JSON value): `run` of those bytes, so byte offsets in errors agree.
        same(&line, "value", &want_for(data.trim_ascii()));
    }
    if !text.is_some_and(|t| t.contains("\"value")) {
        same(data, "raw", &want);
    }
}

/// Input bytes as a Kafka record through the fixed mapping: the whole input is the value (an
/// empty input is a tombstone); the key and a header are slices of it, so they vary too.
pub fn map_input(data: &[u8]) -> MapOutcome<'static> {
    let value = (!data.is_empty()).then_some(data);
    let key = data.get(..data.len().min(16));
    let headers = [("trace", data.get(data.len() / 2..))];
    let rec = SourceRecord {
        topic: TOPIC,
        partition: 0,
        offset: 0,
        timestamp_ms: Some(1_764_000_000_000),
        key,
        value,
        headers: &headers,
    };
    mapper().map(&rec).into_owned()
}

/// [`map_input`], then: a mapped event is valid, and survives `write_json` and parsing back;
/// and [`check_map_is_run`].
pub fn check_mapping(data: &[u8]) {
    check_map_is_run(data);
    match map_input(data) {
        MapOutcome::Event(event) => {
            // A mapped event is valid, and what is sent reads back as the same valid event.
            assert!(
                event.validate(&ContractOptions::default()).is_empty(),
                "mapped event breaks the contract: {event:?}"
            );
            let back = round_trip(&event);
            assert!(
                back.validate(&ContractOptions::default()).is_empty(),
                "a valid event is invalid after serialisation: {back:?}"
            );
        }
        MapOutcome::Filtered { .. } => {}
        MapOutcome::Failed(e) => assert!(!e.reason.is_empty(), "a mapping failure names its reason"),
    }
}

/// Input bytes as a sandbox request body, parsed as the sandbox does (`serde_json` →
/// `Event::from_json` → `Event::validate`, for a single event or each item of a batch), and every
/// event that parses taken through the JSON serialisation round trip.
pub fn check_sandbox_body(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let items = match value {
        Value::Array(items) => items,
        other => vec![other],
    };
    for item in &items {
        let Value::Object(obj) = item else { continue };
        let Ok(event) = Event::from_json(obj) else { continue };
        let back = round_trip(&event);
        for opts in contract_variants() {
            assert_eq!(
                event.validate(&opts).is_empty(),
                back.validate(&opts).is_empty(),
                "validation changed across serialisation: {event:?} became {back:?}"
            );
        }
    }
}

fn contract_variants() -> [ContractOptions; 2] {
    [
        ContractOptions::default(),
        ContractOptions {
            timestamp_unit: TimestampUnit::Milliseconds,
            strict_click_ip: true,
        },
    ]
}

/// `write_json`, then parsed back as the API would. The result must equal the event, except that
/// numbers may move by the last bit (serde_json's default float parsing is not exact).
fn round_trip(event: &Event) -> Event<'static> {
    let mut out = Vec::new();
    event.write_json(&mut out);
    let value: Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "write_json produced invalid JSON ({e}): {}",
            String::from_utf8_lossy(&out)
        )
    });
    let Value::Object(obj) = value else {
        panic!("write_json produced a non-object: {}", String::from_utf8_lossy(&out))
    };
    let back = Event::from_json(&obj)
        .unwrap_or_else(|v| panic!("serialised event does not parse back: {v:?}"))
        .into_owned();
    // The body carries each amount's exact decimal text (issue 16)...
    let body = String::from_utf8_lossy(&out);
    for (k, d) in [
        ("amount", &event.amount),
        ("bet_result_amount", &event.bet_result_amount),
    ] {
        if let Some(d) = d {
            assert!(
                body.contains(&format!("\"{k}\":{d}")),
                "{k} {d} is not in the body as written: {body}"
            );
        }
    }
    // ...which serde_json, reading it back as a binary64, may move by the last bit.
    let same_num = |a: &Option<Decimal>, b: &Option<Decimal>| match (
        a.as_ref().map(Decimal::to_f64),
        b.as_ref().map(Decimal::to_f64),
    ) {
        (Some(a), Some(b)) => a == b || (a - b).abs() <= a.abs().max(b.abs()) * 4.0 * f64::EPSILON,
        (a, b) => a.is_none() && b.is_none(),
    };
    assert!(
        same_num(&event.amount, &back.amount) && same_num(&event.bet_result_amount, &back.bet_result_amount),
        "numbers changed across serialisation: {event:?} became {back:?}"
    );
    fn exact<'a>(e: &Event<'a>) -> Event<'a> {
        Event {
            amount: None,
            bet_result_amount: None,
            ..e.clone()
        }
    }
    assert_eq!(exact(event), exact(&back), "event changed across serialisation");
    back
}
