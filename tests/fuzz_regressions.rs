//! Inputs for the fuzz targets' properties, replayed through the same checks the fuzzer runs
//! (`fuzz/src/checks.rs`): the seed-corpus-like bad inputs below, and every crash the fuzzer
//! finds (none so far; see docs/fuzzing.md). Each case also pins the outcome, not only "no panic".

#[path = "../fuzz/src/checks.rs"]
mod checks;

use datapulse_bridge::mapping::{MapOutcome, Stage};

/// A valid deposit in the fixed mapping's record shape.
const DEPOSIT: &str = r#"{"player":{"id":"p1"},"type":"deposit","ts":1764000000,"ref":"tx-1",
    "money":{"value":10.5,"ccy":"EUR"},"click":"c1","ip":"203.0.113.7","meta":{"brand":"acme"}}"#;

/// Runs both targets' checks on `data` and returns the mapping's failure reason (None: an event).
fn replay(data: &[u8]) -> Option<String> {
    checks::check_mapping(data);
    checks::check_sandbox_body(data);
    match checks::map_input(data) {
        MapOutcome::Event(_) => None,
        MapOutcome::Filtered { reason, .. } => Some(format!("filtered: {reason}")),
        MapOutcome::Failed(e) => Some(e.reason),
    }
}

fn deposit_with(field: &str, raw_json_value: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(DEPOSIT).unwrap();
    v[field] = serde_json::Value::Null;
    v.to_string()
        .replace(&format!("\"{field}\":null"), &format!("\"{field}\":{raw_json_value}"))
}

#[test]
fn a_valid_deposit_maps_and_round_trips() {
    assert_eq!(replay(DEPOSIT.as_bytes()), None);
    let MapOutcome::Event(e) = checks::map_input(DEPOSIT.as_bytes()) else {
        panic!("deposit did not map")
    };
    assert_eq!(e.properties, vec![("brand".into(), "acme".into())]);
}

#[test]
fn tombstone_is_a_mapping_failure() {
    assert_eq!(replay(b"").as_deref(), Some("tombstone"));
}

#[test]
fn invalid_utf8_and_non_json_are_not_json() {
    assert_eq!(replay(b"\xff\xfe{\"type\":\"deposit\"}").as_deref(), Some("not_utf8"));
    let mut bad_string = DEPOSIT.as_bytes().to_vec();
    let at = bad_string.windows(2).position(|w| w == b"p1").unwrap();
    bad_string[at] = 0xc3; // a lone UTF-8 lead byte inside a JSON string
    assert_eq!(replay(&bad_string).as_deref(), Some("not_utf8"));
    assert_eq!(replay(b"{\"type\":").as_deref(), Some("not_json"));
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    for depth in [127, 129, 100_000] {
        let doc = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let got = replay(doc.as_bytes());
        // serde_json stops at depth 128; shallower arrays parse but are no event.
        assert!(got.is_some(), "depth {depth}: {got:?}");
        let obj = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        assert!(replay(obj.as_bytes()).is_some());
    }
    // The mapping engine reads only the parts the mapping uses: a top-level array is refused as
    // such, without recursing into it.
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(replay(deep.as_bytes()).as_deref(), Some("not_object"));
}

#[test]
fn huge_strings_map_or_fail_by_rule() {
    // Strings over the engine's 8 KiB limit fail the record rather than ship megabytes.
    let big = "x".repeat(4 << 20);
    assert_eq!(
        replay(deposit_with("ref", &format!("\"{big}\"")).as_bytes()).as_deref(),
        Some("too_long")
    );
    // A huge currency (2 MiB of "é") is over the engine's string limit: a mapping failure on the
    // field, whose message is truncated.
    let ccy = format!(r#"{{"value":1,"ccy":"{}"}}"#, "é".repeat(1 << 20));
    let doc = deposit_with("money", &ccy);
    checks::check_mapping(doc.as_bytes());
    match checks::map_input(doc.as_bytes()) {
        MapOutcome::Failed(e) => {
            assert_eq!((e.stage, e.field.as_deref()), (Stage::Mapping, Some("currency")));
            assert!(
                e.message.len() < 200,
                "message not truncated: {} bytes",
                e.message.len()
            );
        }
        other => panic!("huge currency: {other:?}"),
    }
}

#[test]
fn out_of_range_and_nan_like_numbers() {
    // serde_json refuses numbers beyond f64 and the NaN/Infinity spellings: not JSON.
    for amount in [r#"{"value":1e400,"ccy":"EUR"}"#, r#"{"value":-1e400,"ccy":"EUR"}"#] {
        assert_eq!(
            replay(deposit_with("money", amount).as_bytes()).as_deref(),
            Some("not_json")
        );
    }
    for amount in ["NaN", "Infinity", "-Infinity", "nan"] {
        let doc = deposit_with("money", &format!(r#"{{"value":{amount},"ccy":"EUR"}}"#));
        assert_eq!(replay(doc.as_bytes()).as_deref(), Some("not_json"), "{amount}");
    }
    // Strings that look like NaN are the wrong type for amount.
    let doc = deposit_with("money", r#"{"value":"NaN","ccy":"EUR"}"#);
    assert_eq!(replay(doc.as_bytes()).as_deref(), Some("type"));
    // The extremes of f64 are numbers, sent as they are; one below them, which the API would read
    // as 0, is refused as an amount.
    for amount in ["1.7976931348623157e308", "5e-324", "-0.0"] {
        let doc = deposit_with("money", &format!(r#"{{"value":{amount},"ccy":"EUR"}}"#));
        assert_eq!(replay(doc.as_bytes()), None, "{amount}");
    }
    let doc = deposit_with("money", r#"{"value":1e-400,"ccy":"EUR"}"#);
    assert_eq!(replay(doc.as_bytes()).as_deref(), Some("type"));
    // Timestamps: beyond f64 is not JSON, a time outside the plausible window (a negative one,
    // 2^64 read by its magnitude as nanoseconds, the year 2554) is refused as `time` (issue 17);
    // `time = "auto"` reads a fractional number as seconds (docs/mapping.md).
    assert_eq!(
        replay(deposit_with("ts", "1e400").as_bytes()).as_deref(),
        Some("not_json")
    );
    for ts in ["-1", "0", "20422", "18446744073709551616", "9223372036854775807"] {
        assert_eq!(
            replay(deposit_with("ts", ts).as_bytes()).as_deref(),
            Some("time"),
            "ts {ts}"
        );
    }
    for ts in ["1764000000.5", "1764000000000000000"] {
        assert_eq!(replay(deposit_with("ts", ts).as_bytes()), None, "ts {ts}");
    }
}

#[test]
fn sandbox_bodies_of_every_shape() {
    for body in [
        "",
        "null",
        "[]",
        "[1,\"a\",null,[],{}]",
        r#"{"client_user_id":"u","event_name":"login","timestamp":1}"#,
        r#"[{"client_user_id":"u","event_name":"bet","timestamp":1,"transaction_id":"t","amount":1e308,"currency":"BTC","is_crypto":true,"bet_result":"loss","bet_result_amount":-0.0}]"#,
        r#"{"client_user_id":"u","event_name":"x","timestamp":9223372036854775807,"a":"","a":"dup"}"#,
        r#"{"client_user_id":"\ud800","event_name":"x","timestamp":1}"#,
        r#"{"client_user_id":"\u0000","event_name":"\u2028","timestamp":1,"\u0000":"\u0000"}"#,
    ] {
        checks::check_sandbox_body(body.as_bytes());
    }
}

/// `map` gives `run`'s verdict on every input of the fuzz corpus (the seeds, and the kinds of
/// issue 16), whether the sample line is the raw value, an envelope with the value's exact bytes,
/// or one with `value_base64` (`checks::check_map_is_run`, which the fuzz target runs too).
#[test]
fn map_is_run_over_the_corpus() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/mapping");
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&seeds)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(inputs.len() >= 3, "{}", inputs.len());
    let seeds = inputs.clone();
    for seed in &seeds {
        let text = String::from_utf8(seed.clone()).unwrap();
        let text = text.trim_end();
        // A key twice, a number past a binary64's digits, a byte order mark, broken JSON, a value
        // that is not UTF-8; and below, an event over the fuzz config's batch.max_bytes.
        inputs.push(text.replacen('{', r#"{"type":"deposit","#, 1).into_bytes());
        inputs.push(
            text.replacen("\"ref\":", r#""ref":77012345678901234567890123,"x":"#, 1)
                .into_bytes(),
        );
        inputs.push([&b"\xEF\xBB\xBF"[..], text.as_bytes()].concat());
        inputs.push(text.as_bytes()[..text.len() / 2].to_vec());
        inputs.push([text.as_bytes(), b"\xff"].concat());
    }
    let mut big: serde_json::Value = serde_json::from_str(DEPOSIT).unwrap();
    for (k, v) in [("ref", "r"), ("click", "c")] {
        big[k] = "x".repeat(8000).replace('x', v).into();
    }
    big["meta"]["brand"] = "b".repeat(8000).into();
    inputs.push(big.to_string().into_bytes());
    inputs.push(DEPOSIT.replace('\n', " ").into_bytes());
    // Found by the fuzzer (8d220f8): white space around a value an envelope carries is no part
    // of it, so `run`'s byte offsets are those of the bytes without it; and skipped parts refused.
    inputs.push(b"\t[1e400]\t".to_vec());
    inputs.push(br#" {"player":{"id":"p1"},"x":[1,"\ud800"]} "#.to_vec());
    inputs.push(br#"{"player":{"id":"p1"},"k\ud800r":{"id":"p1"}}"#.to_vec());
    for input in &inputs {
        checks::check_map_is_run(input);
    }
    // The corpus reaches more than one verdict (events and refusals of several reasons).
    let reasons: std::collections::BTreeSet<String> = inputs.iter().map(|i| checks::run_reason(i)).collect();
    for reason in ["event", "duplicate_key", "not_json", "not_utf8", "too_large"] {
        assert!(reasons.contains(reason), "{reason}: {reasons:?}");
    }
}
