use super::*;
use crate::event::TimestampUnit;
use serde_json::json;

#[derive(serde::Deserialize)]
struct Doc {
    mapping: Vec<MappingConfig>,
}

fn configs(toml_text: &str) -> Vec<MappingConfig> {
    toml::from_str::<Doc>(toml_text)
        .unwrap_or_else(|e| panic!("{e}\n{toml_text}"))
        .mapping
}

fn compile(toml_text: &str) -> Result<Mapper, MappingErrors> {
    Mapper::compile(&configs(toml_text), &ContractOptions::default())
}

fn mapper(toml_text: &str) -> Mapper {
    compile(toml_text).unwrap_or_else(|e| panic!("{e}"))
}

/// Maps one record; the event is made owned so that tests can map temporaries.
fn map_value(m: &Mapper, value: &[u8]) -> MapOutcome<'static> {
    m.map(&SourceRecord {
        topic: "t",
        partition: 3,
        offset: 42,
        timestamp_ms: Some(1_702_963_200_123),
        key: Some(b"key-1"),
        value: Some(value),
        headers: &[("client-ip", Some(b"203.0.113.9")), ("bad", Some(b"\xff\xfe"))],
    })
    .into_owned()
}

fn event_json(o: &MapOutcome) -> Value {
    match o {
        MapOutcome::Event(e) => {
            let mut json = Vec::new();
            e.write_json(&mut json);
            serde_json::from_slice(&json).unwrap()
        }
        other => panic!("expected an event, got {other:?}"),
    }
}

fn failed<'o>(o: &'o MapOutcome<'_>) -> &'o MapError {
    match o {
        MapOutcome::Failed(e) => e,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// A mapping of a non-financial event whose only variable field is `field = spec`.
fn one_field(field: &str, spec: &str) -> String {
    let mut base = vec![
        ("client_user_id", "{ const = \"u1\" }".to_string()),
        ("event_name", "{ const = \"custom\" }".to_string()),
        ("timestamp", "{ const = 1702963200 }".to_string()),
    ];
    base.retain(|(f, _)| *f != field);
    base.push((field, spec.to_string()));
    let lines: Vec<String> = base.iter().map(|(f, s)| format!("{f} = {s}")).collect();
    format!("[[mapping]]\ntopics = [\"t\"]\n{}\n", lines.join("\n"))
}

#[test]
fn every_conversion() {
    // (field, spec, record value, expected field value or failure reason)
    let ok = |v: Value| Ok::<Value, &str>(v);
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, Value, Result<Value, &str>)> = vec![
        // sources
        ("game_type", r#""/g""#, json!({"g": "slot"}), ok(json!("slot"))),
        ("game_type", r#""/a/0/b""#, json!({"a": [{"b": "deep"}]}), ok(json!("deep"))),
        ("game_type", r#""/a~1b""#, json!({"a/b": "escaped"}), ok(json!("escaped"))),
        ("game_type", r#""key""#, json!({}), ok(json!("key-1"))),
        ("ip_address", r#""header:client-ip""#, json!({}), ok(json!("203.0.113.9"))),
        ("game_type", r#""header:bad""#, json!({}), Err("not_utf8")),
        ("game_type", r#""topic""#, json!({}), ok(json!("t"))),
        ("game_type", r#"{ from = "partition", as = "string" }"#, json!({}), ok(json!("3"))),
        ("game_type", r#"{ from = "offset", as = "string" }"#, json!({}), ok(json!("42"))),
        ("timestamp", r#""timestamp""#, json!({}), ok(json!(1_702_963_200))),
        ("game_type", r#"{ const = "fixed" }"#, json!({"g": "x"}), ok(json!("fixed"))),
        ("game_type", r#"{ from = "/g", default = "none" }"#, json!({}), ok(json!("none"))),
        ("game_type", r#"{ from = "/g", default = "none" }"#, json!({"g": null}), ok(json!("none"))),
        ("game_type", r#""/g""#, json!({"g": null}), ok(Value::Null)),
        ("game_type", r#""/g""#, json!({"g": 5}), Err("type")),
        // string <-> number, boolean
        ("game_type", r#"{ from = "/g", as = "string" }"#, json!({"g": 12.5}), ok(json!("12.5"))),
        ("game_type", r#"{ from = "/g", as = "string" }"#, json!({"g": true}), ok(json!("true"))),
        ("amount", r#"{ from = "/a", as = "number" }"#, json!({"a": " 12.50 "}), ok(json!(12.5))),
        ("amount", r#"{ from = "/a", as = "number" }"#, json!({"a": "1e3"}), ok(json!(1000.0))),
        ("amount", r#"{ from = "/a", as = "number" }"#, json!({"a": "12,50"}), Err("type")),
        ("amount", r#"{ from = "/a", as = "number" }"#, json!({"a": "NaN"}), Err("type")),
        ("amount", r#"{ from = "/a", as = "integer" }"#, json!({"a": "7"}), ok(json!(7))),
        ("amount", r#"{ from = "/a", as = "integer" }"#, json!({"a": 7.5}), Err("type")),
        ("amount", r#""/a""#, json!({"a": "7"}), Err("type")),
        ("is_crypto", r#"{ from = "/c", as = "boolean" }"#, json!({"c": "Yes"}), ok(json!(true))),
        ("is_crypto", r#"{ from = "/c", as = "boolean" }"#, json!({"c": "0"}), ok(json!(false))),
        ("is_crypto", r#"{ from = "/c", as = "boolean" }"#, json!({"c": 1}), ok(json!(true))),
        ("is_crypto", r#"{ from = "/c", as = "boolean" }"#, json!({"c": 2}), Err("type")),
        ("is_crypto", r#"{ from = "/c", as = "boolean" }"#, json!({"c": "maybe"}), Err("type")),
        ("is_crypto", r#""/c""#, json!({"c": "true"}), Err("type")),
        // trimming and case
        ("game_type", r#"{ from = "/g", trim = true }"#, json!({"g": "  slot \n"}), ok(json!("slot"))),
        ("game_type", r#"{ from = "/g", case = "upper" }"#, json!({"g": "Slot"}), ok(json!("SLOT"))),
        ("game_type", r#"{ from = "/g", case = "lower", trim = true }"#, json!({"g": " SLOT "}), ok(json!("slot"))),
        // value tables
        ("event_name", r#"{ from = "/t", table = { DEPOSIT_COMPLETED = "deposit_x" } }"#,
         json!({"t": "DEPOSIT_COMPLETED"}), ok(json!("deposit_x"))),
        ("event_name", r#"{ from = "/t", table = { A = "a" } }"#, json!({"t": "B"}), Err("unknown_value")),
        ("event_name", r#"{ from = "/t", table = { A = "a" }, otherwise = "keep" }"#, json!({"t": "B"}), ok(json!("B"))),
        ("event_name", r#"{ from = "/t", table = { A = "a" }, fallback = "other" }"#, json!({"t": "B"}), ok(json!("other"))),
        ("event_name", r#"{ from = "/t", table = { "1" = "one" } }"#, json!({"t": 1}), ok(json!("one"))),
        ("event_name", r#"{ from = "/t", case = "upper", table = { A = "a" } }"#, json!({"t": "a"}), ok(json!("a"))),
        // timestamps, to seconds (the default unit)
        ("timestamp", r#"{ from = "/ts", time = "seconds" }"#, json!({"ts": 1702963200}), ok(json!(1702963200))),
        ("timestamp", r#"{ from = "/ts", time = "seconds" }"#, json!({"ts": "1702963200"}), ok(json!(1702963200))),
        ("timestamp", r#"{ from = "/ts", time = "seconds" }"#, json!({"ts": 1702963200.9}), ok(json!(1702963200))),
        ("timestamp", r#"{ from = "/ts", time = "milliseconds" }"#, json!({"ts": 1702963200999_i64}), ok(json!(1702963200))),
        ("timestamp", r#"{ from = "/ts", time = "microseconds" }"#, json!({"ts": 1702963200000000_i64}), ok(json!(1702963200))),
        ("timestamp", r#"{ from = "/ts", time = "nanoseconds" }"#, json!({"ts": 1702963200000000000_i64}), ok(json!(1702963200))),
        ("timestamp", r#"{ from = "/ts", time = "rfc3339" }"#, json!({"ts": "2023-12-19T05:20:00Z"}), ok(json!(1702963200))),
        ("timestamp", r#"{ from = "/ts", time = "rfc3339" }"#, json!({"ts": "2023-12-19T07:20:00.5+02:00"}), ok(json!(1702963200))),
        ("timestamp", r#"{ from = "/ts", time = "rfc3339" }"#, json!({"ts": "19/12/2023"}), Err("time")),
        ("timestamp", r#"{ from = "/ts", time = "iso8601" }"#, json!({"ts": "2023-12-19T05:20:00.000Z"}), ok(json!(1702963200))),
        ("timestamp", r#"{ from = "/ts", time = "iso8601" }"#, json!({"ts": "20231219T052000Z"}), ok(json!(1702963200))),
        ("timestamp", r#"{ from = "/ts", time_format = "[day]/[month]/[year] [hour]:[minute]:[second]" }"#,
         json!({"ts": "19/12/2023 05:20:00"}), ok(json!(1702963200))),
        ("timestamp", r#"{ from = "/ts", time_format = "[day]/[month]/[year] [hour]:[minute]:[second]" }"#,
         json!({"ts": "2023-12-19"}), Err("time")),
        ("timestamp", r#""/ts""#, json!({"ts": 1702963200}), ok(json!(1702963200))),
        ("timestamp", r#""/ts""#, json!({"ts": 1702963200123_i64}), ok(json!(1702963200))),
        ("timestamp", r#""/ts""#, json!({"ts": 1702963200123456_i64}), ok(json!(1702963200))),
        ("timestamp", r#""/ts""#, json!({"ts": "2023-12-19T05:20:00Z"}), ok(json!(1702963200))),
        ("timestamp", r#""/ts""#, json!({"ts": true}), Err("time")),
        ("timestamp", r#""/ts""#, json!({}), Err("required")),
        // amount sign rules
        ("amount", r#"{ from = "/a", sign = "negate" }"#, json!({"a": 5}), ok(json!(-5))),
        ("amount", r#"{ from = "/a", sign = "negative" }"#, json!({"a": -5.5}), ok(json!(-5.5))),
        ("amount", r#"{ from = "/a", sign = "positive" }"#, json!({"a": -5.5}), ok(json!(5.5))),
        ("amount", r#"{ from = "/a", sign = "negative", sign_for = ["custom"] }"#, json!({"a": 2}), ok(json!(-2))),
        ("amount", r#"{ from = "/a", sign = "negative", sign_for = ["loss"] }"#, json!({"a": 2}), ok(json!(2))),
        ("amount", r#"{ from = "/a", as = "number", sign = "negate" }"#, json!({"a": "3.25"}), ok(json!(-3.25))),
        // currency and is_crypto
        ("currency", r#"{ from = "/c", case = "upper", trim = true }"#, json!({"c": " eur"}), ok(json!("EUR"))),
        ("is_crypto", r#"{ from = "/c", case = "upper", in = ["BTC", "ETH", "USDT"] }"#, json!({"c": "usdt"}), ok(json!(true))),
        ("is_crypto", r#"{ from = "/c", in = ["BTC", "ETH"] }"#, json!({"c": "EUR"}), ok(json!(false))),
        // the escape hatch
        ("game_type", r#"{ expr = ".kind + \"/\" + .sub" }"#, json!({"kind": "slot", "sub": "megaways"}), ok(json!("slot/megaways"))),
        ("amount", r#"{ from = "/cents", expr = ". / 100" }"#, json!({"cents": 1250}), ok(json!(12.5))),
        ("game_type", r#"{ expr = "error(\"nope\")" }"#, json!({}), Err("expr")),
        ("game_type", r#"{ expr = "empty", default = "d" }"#, json!({}), ok(json!("d"))),
        // limits
        ("game_type", r#""/g""#, json!({"g": "x".repeat(MAX_TEXT_BYTES + 1)}), Err("too_long")),
    ];
    for (field, spec, value, want) in cases {
        let m = mapper(&one_field(field, spec));
        let out = map_value(&m, value.to_string().as_bytes());
        let label = format!("{field} = {spec} on {value}");
        match want {
            Ok(v) => {
                let e = event_json(&out);
                assert_eq!(e.get(field).cloned().unwrap_or(Value::Null), v, "{label}");
            }
            Err(reason) => {
                let e = failed(&out);
                assert_eq!(e.reason, reason, "{label}: {e}");
                assert_eq!(e.field.as_deref(), Some(field), "{label}: {e}");
            }
        }
    }
}

#[test]
fn timestamps_convert_to_the_configured_unit() {
    let cfg = configs(&one_field("timestamp", r#"{ from = "/ts", time = "rfc3339" }"#));
    let ms = ContractOptions {
        timestamp_unit: TimestampUnit::Milliseconds,
        ..Default::default()
    };
    let m = Mapper::compile(&cfg, &ms).unwrap();
    let e = event_json(&map_value(&m, br#"{"ts":"2023-12-19T05:20:00.123Z"}"#));
    assert_eq!(e["timestamp"], json!(1_702_963_200_123_i64));
}

const WALLET: &str = r#"
[[mapping]]
topics = ["t"]
skip_when = [{ from = "/test", in = [true] }]
event_name     = { from = "/type", table = { DEPOSIT_OK = "deposit", WITHDRAWAL_OK = "withdraw", PING = "ping" }, otherwise = "dead-letter" }
client_user_id = "/player/id"
transaction_id = "/ref"
amount         = { from = "/money/value", as = "number" }
currency       = { from = "/money/ccy", case = "upper" }
timestamp      = { from = "/occurredAt", time = "rfc3339" }
click_id       = "/click"
ip_address     = "header:client-ip"
properties     = { from = "/meta", prefix = "meta_" }
"#;

fn wallet(extra: &str) -> String {
    format!(
        r#"{{"type":"DEPOSIT_OK","player":{{"id":"p1"}},"ref":"tx1","money":{{"value":"50.00","ccy":"usd"}},
           "occurredAt":"2023-12-19T05:20:00Z","click":"c1","meta":{{"vip":3,"src":"web","n":null}}{extra}}}"#
    )
}

#[test]
fn the_engineering_example_maps_a_full_event() {
    let m = mapper(WALLET);
    let e = event_json(&map_value(&m, wallet("").as_bytes()));
    assert_eq!(
        e,
        json!({"client_user_id": "p1", "event_name": "deposit", "timestamp": 1702963200, "click_id": "c1",
               "ip_address": "203.0.113.9", "transaction_id": "tx1", "amount": 50.0, "currency": "USD",
               "meta_src": "web", "meta_vip": "3"})
    );
}

#[test]
fn filtered_and_dead_lettered_records_say_why() {
    let m = mapper(WALLET);
    match map_value(&m, wallet(r#","test":true"#).as_bytes()) {
        MapOutcome::Filtered { code, reason } => assert!(code == "skip_when" && reason.contains("/test"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let bad = wallet("").replace("DEPOSIT_OK", "REFUND");
    let e = map_value(&m, bad.as_bytes());
    let e = failed(&e);
    assert_eq!(
        (e.stage, e.reason.as_str(), e.field.as_deref()),
        (Stage::Mapping, "unknown_value", Some("event_name"))
    );
    assert!(e.message.contains("REFUND"), "{e}");
}

#[test]
fn contract_rules_fail_at_validation_naming_the_rule() {
    let m = mapper(WALLET);
    let cases = [
        (
            wallet("").replace(r#""click":"c1","#, ""),
            "click_id",
            "click_id_ip_address",
        ),
        (
            wallet("").replace(r#""ccy":"usd""#, r#""ccy":"BTC""#),
            "currency",
            "currency",
        ),
        (
            wallet("").replace(r#""ref":"tx1","#, ""),
            "transaction_id",
            "financial_fields",
        ),
        (
            wallet("").replace(r#""id":"p1""#, r#""id":"""#),
            "client_user_id",
            "required",
        ),
    ];
    for (value, field, rule) in cases {
        let out = map_value(&m, value.as_bytes());
        let e = failed(&out);
        assert_eq!(
            (e.stage, e.field.as_deref(), e.reason.as_str()),
            (Stage::Validation, Some(field), rule),
            "{e}"
        );
    }
    // A time before 1970 is outside the plausible window before any contract rule sees it
    // (issue 17); a mapping whose window admits it meets the rule `timestamp`.
    let old = wallet("").replace("2023-12-19T05:20:00Z", "1969-12-31T00:00:00Z");
    let e = failed(&map_value(&m, old.as_bytes())).clone();
    assert_eq!(
        (e.stage, e.field.as_deref(), e.reason.as_str()),
        (Stage::Mapping, Some("timestamp"), "time"),
        "{e}"
    );
    let wide = mapper(&format!("{WALLET}timestamp_window = {{ earliest = \"1969-01-01\" }}\n"));
    let e = failed(&map_value(&wide, old.as_bytes())).clone();
    assert_eq!(
        (e.stage, e.field.as_deref(), e.reason.as_str()),
        (Stage::Validation, Some("timestamp"), "timestamp"),
        "{e}"
    );
    let out = map_value(&m, wallet(r#","nothing":1"#).replace("\"meta\"", "\"x\"").as_bytes());
    assert!(matches!(out, MapOutcome::Event(_)), "{out:?}");
}

#[test]
fn bad_input_is_a_per_record_failure() {
    let m = mapper(WALLET);
    let reason = |v: Option<&[u8]>| match m.map(&SourceRecord {
        topic: "t",
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        key: None,
        value: v,
        headers: &[],
    }) {
        MapOutcome::Failed(e) => e.reason,
        other => format!("{other:?}"),
    };
    assert_eq!(reason(None), "tombstone");
    assert_eq!(reason(Some(b"not json")), "not_json");
    assert_eq!(reason(Some(b"{\"type\":\"DEPOSIT_OK\"")), "not_json");
    assert_eq!(reason(Some(b"{\"type\":\"\xff\"}")), "not_utf8");
    assert_eq!(reason(Some(b"[1,2,3]")), "not_object");
    assert_eq!(reason(Some(b"")), "not_json");
    let deep = format!("{{\"type\":{}1{}}}", "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(reason(Some(deep.as_bytes())), "not_json");
    let wrong = wallet("").replace(r#""id":"p1""#, r#""id":{"x":1}"#);
    assert_eq!(reason(Some(wrong.as_bytes())), "type");
    let huge = wallet("").replace("tx1", &"t".repeat(1 << 20));
    assert_eq!(reason(Some(huge.as_bytes())), "too_long");
    let other_topic = m.map(&SourceRecord {
        topic: "elsewhere",
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        key: None,
        value: Some(b"{}"),
        headers: &[],
    });
    assert_eq!(failed(&other_topic).reason, "no_mapping");
}

#[test]
fn properties_copy_chosen_or_remaining_fields() {
    let base = r#"
[[mapping]]
topics = ["t"]
event_name = { const = "custom" }
client_user_id = "/user"
timestamp = { const = 1702963200 }
"#;
    let run = |props: &str, value: Value| map_value(&mapper(&format!("{base}{props}\n")), value.to_string().as_bytes());
    let v = json!({"user": "u", "vip": 3, "src": "web", "tags": ["a"], "nested": {"k": "v"}});
    let e = event_json(&run(r#"properties = { remaining = true }"#, v.clone()));
    assert_eq!(
        e,
        json!({"client_user_id": "u", "event_name": "custom", "timestamp": 1702963200,
               "nested": "{\"k\":\"v\"}", "src": "web", "tags": "[\"a\"]", "vip": "3"})
    );
    let e = event_json(&run(
        r#"properties = { fields = ["vip", "src"], rename = { vip = "vip_level" }, prefix = "p_" }"#,
        v.clone(),
    ));
    assert_eq!(e["p_vip_level"], json!("3"));
    assert_eq!(e["p_src"], json!("web"));
    assert!(e.get("tags").is_none() && e.get("p_tags").is_none());
    let e = event_json(&run(
        r#"properties = { remaining = true, except = ["tags", "nested"] }"#,
        v.clone(),
    ));
    assert!(e.get("tags").is_none() && e.get("vip").is_some());
    // A dynamic name that collides with an API field fails the record, naming it.
    let out = run(
        r#"properties = { remaining = true }"#,
        json!({"user": "u", "currency": "EUR"}),
    );
    assert_eq!(
        (failed(&out).reason.as_str(), failed(&out).field.as_deref()),
        ("property_name", Some("currency"))
    );
    // Two specs: a table and a list of tables.
    let e = event_json(&run(
        r#"properties = [{ fields = ["vip"] }, { from = "/nested", prefix = "n_" }]"#,
        v,
    ));
    assert_eq!((e["vip"].clone(), e["n_k"].clone()), (json!("3"), json!("v")));
}

#[test]
fn keep_when_filters_everything_else() {
    let m = mapper(
        r#"
[[mapping]]
topic_pattern = "cdc\\..*"
keep_when = [{ from = "/op", in = ["c"] }]
event_name = { const = "register" }
client_user_id = "/after/id"
timestamp = { from = "/ts_ms", time = "milliseconds" }
click_id = "/after/click"
ip_address = "/after/ip"
"#,
    );
    let rec = |topic: &'static str, v: &'static [u8]| SourceRecord {
        topic,
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        key: None,
        value: Some(v),
        headers: &[],
    };
    let c = br#"{"op":"c","ts_ms":1702963200000,"after":{"id":"u","click":"k","ip":"::1"}}"#;
    assert!(matches!(m.map(&rec("cdc.users", c)), MapOutcome::Event(_)));
    let u = br#"{"op":"u","ts_ms":1702963200000,"after":{"id":"u","click":"k","ip":"::1"}}"#;
    assert!(matches!(m.map(&rec("cdc.users", u)), MapOutcome::Filtered { .. }));
    let d = br#"{"op":"d","ts_ms":1702963200000,"after":null}"#;
    assert!(matches!(m.map(&rec("cdc.users", d)), MapOutcome::Filtered { .. }));
    assert!(!m.handles("xcdc.users") && m.handles("cdc.users"));
}

#[test]
fn compile_errors_name_the_mapping_and_the_field() {
    let field = |name, option| (At::Field(name), Some(option));
    let cases = [
        (
            one_field("amount", r#"{ from = "player/id" }"#),
            field("amount", "from"),
        ),
        (
            one_field("game_type", r#"{ from = "/g", as = "number" }"#),
            field("game_type", "as"),
        ),
        (
            one_field("game_type", r#"{ from = "/g", time = "seconds" }"#),
            field("game_type", "time"),
        ),
        (
            one_field("game_type", r#"{ from = "/g", otherwise = "skip" }"#),
            field("game_type", "otherwise"),
        ),
        (
            one_field("game_type", r#"{ from = "/g", expr = ".a +" }"#),
            field("game_type", "expr"),
        ),
        (
            one_field("game_type", r#"{ from = "/g", const = "x" }"#),
            field("game_type", "const"),
        ),
        (one_field("game_type", r#"{ trim = true }"#), field("game_type", "from")),
        (
            one_field("timestamp", r#"{ from = "/t", time_format = "[nope]" }"#),
            field("timestamp", "time_format"),
        ),
        (
            one_field("amount", r#"{ from = "/a", sign_for = ["loss"] }"#),
            field("amount", "sign_for"),
        ),
        (
            one_field("game_type", r#"{ from = "header:" }"#),
            field("game_type", "from"),
        ),
        (
            one_field("is_crypto", r#"{ from = "/c", in = ["BTC"], as = "boolean" }"#),
            field("is_crypto", "in"),
        ),
        (
            one_field("game_type", r#""/g""#) + "properties = { fields = [\"amount\"] }\n",
            (At::Properties(0), None),
        ),
        (
            one_field("game_type", r#""/g""#) + "properties = { from = \"x\" }\n",
            (At::Properties(0), Some("from")),
        ),
        (
            one_field("game_type", r#""/g""#) + "keep_when = [{ from = \"/a\", in = [] }]\n",
            (At::KeepWhen(0), Some("in")),
        ),
        (
            one_field("game_type", r#""/g""#) + "topic_pattern = \"(\"\n",
            (At::Mapping, Some("topic_pattern")),
        ),
        // Two keys that are one number and say different things.
        (
            one_field("game_type", r#"{ from = "/g", table = { "1" = "a", "1.0" = "b" } }"#),
            field("game_type", "table"),
        ),
    ];
    for (text, (at, option)) in cases {
        let e = compile(&text).err().unwrap_or_else(|| panic!("compiled: {text}"));
        let [p] = e.problems() else {
            panic!("one problem in {e}")
        };
        assert_eq!((p.mapping, &p.at, p.option), (0, &at, option), "{text}: {e}");
        assert!(p.label.starts_with("mapping[0] (topics t"), "{e}");
        assert_eq!(p.to_string(), e.to_string());
    }
    // What each says, where two problems share a place.
    let message = |text: String| compile(&text).unwrap_err().problems()[0].message.clone();
    assert_eq!(
        message(one_field("game_type", r#"{ trim = true }"#)),
        "a field needs `from`, `const` or `expr`"
    );
    assert_eq!(
        message(one_field("game_type", r#"{ from = "header:" }"#)),
        "`header:` needs a header name, for example `header:client-ip`"
    );
    assert_eq!(
        message(one_field("game_type", r#""/g""#) + "properties = { fields = [\"amount\"] }\n"),
        "the custom property `amount` is an API field name; add a `prefix` or a `rename`"
    );
    let missing = compile("[[mapping]]\ntopics = [\"t\"]\nclient_user_id = \"/u\"\n").unwrap_err();
    assert!(missing
        .problems()
        .iter()
        .all(|p| p.message == "missing; every event needs `client_user_id`, `event_name` and `timestamp`"));
    let missing: Vec<_> = missing.problems().iter().map(|p| (&p.at, p.option)).collect();
    assert_eq!(
        missing,
        [(&At::Field("event_name"), None), (&At::Field("timestamp"), None)]
    );
    let twice = format!(
        "{}{}",
        one_field("game_type", "\"/g\""),
        one_field("game_type", "\"/g\"")
    );
    let e = compile(&twice).unwrap_err();
    let [p] = e.problems() else { panic!("{e}") };
    assert_eq!((p.mapping, &p.at, p.option), (1, &At::Mapping, Some("topics")), "{e}");
    assert_eq!(
        p.message,
        "topic `t` is already mapped by mapping[0]; a topic has one mapping"
    );
}

#[test]
fn unknown_targets_and_options_are_rejected_by_name() {
    use figment::error::Kind;
    use figment::providers::Format as _;
    // figment, as configuration is loaded: each error names the key and what it found.
    let error = |text: String| {
        let e = figment::Figment::from(figment::providers::Toml::string(&text))
            .extract::<Doc>()
            .err()
            .unwrap();
        assert_eq!(e.count(), 1, "{e}");
        (e.path.join("."), e.kind)
    };
    assert!(matches!(
        error(one_field("amout", "\"/a\"")),
        (key, Kind::UnknownField(name, _)) if key == "mapping.0.amout" && name == "amout"
    ));
    assert!(matches!(
        error(one_field("amount", "{ form = \"/a\" }")),
        (key, Kind::UnknownField(name, _)) if key == "mapping.0.amount.form" && name == "form"
    ));
    assert!(matches!(
        error(one_field("amount", "{ from = \"/a\", sign = \"flip\" }")),
        (key, Kind::UnknownVariant(value, _)) if key == "mapping.0.amount.sign" && value == "flip"
    ));
}

#[test]
fn seed_examples_pass_validation() {
    // The seed's example events, sent as record values and mapped one field to one field.
    let m = mapper(
        r#"
[[mapping]]
topics = ["t"]
client_user_id = "/client_user_id"
click_id = "/click_id"
event_name = "/event_name"
timestamp = { from = "/timestamp", time = "seconds" }
ip_address = "/ip_address"
user_agent = "/user_agent"
game_type = "/game_type"
game_provider = "/game_provider"
transaction_id = "/transaction_id"
amount = "/amount"
currency = "/currency"
is_crypto = "/is_crypto"
bet_result = "/bet_result"
bet_result_amount = "/bet_result_amount"
parent_transaction_id = "/parent_transaction_id"
"#,
    );
    let seed = [
        json!({"client_user_id": "user_001", "click_id": "clk_998877", "ip_address": "203.0.113.1",
               "event_name": "deposit", "transaction_id": "tx_554433", "timestamp": 1702963200,
               "amount": 50.0, "currency": "USD"}),
        json!({"client_user_id": "u", "click_id": "c", "event_name": "register", "timestamp": 1702963200,
               "ip_address": "203.0.113.1", "user_agent": "Mozilla/5.0"}),
        json!({"client_user_id": "u", "click_id": "c", "event_name": "login", "timestamp": 1702963200,
               "ip_address": "2001:db8::1", "user_agent": "Mozilla/5.0"}),
        json!({"client_user_id": "u", "click_id": "c", "event_name": "deposit", "currency": "BTC", "amount": 5.0,
               "transaction_id": "t1", "timestamp": 1702963200, "ip_address": "203.0.113.1", "is_crypto": true}),
        json!({"client_user_id": "u", "event_name": "bet", "game_type": "slot", "game_provider": "EA",
               "currency": "USD", "amount": 5.0, "transaction_id": "b1", "timestamp": 1702963200,
               "is_crypto": false, "bet_result": "loss", "bet_result_amount": -5.0}),
        json!({"client_user_id": "u", "event_name": "loss", "game_type": "slot", "game_provider": "EA",
               "currency": "USD", "amount": -5.0, "transaction_id": "l1", "parent_transaction_id": "b2",
               "timestamp": 1702963200, "is_crypto": false}),
        json!({"client_user_id": "u", "event_name": "withdraw", "currency": "EUR", "amount": 5.0,
               "transaction_id": "w1", "timestamp": 1702963200, "ip_address": "203.0.113.1", "is_crypto": false}),
    ];
    for ev in seed.iter() {
        let out = map_value(&m, ev.to_string().as_bytes());
        assert_eq!(&event_json(&out), ev);
    }
    // Each contract rule a mapped event can break fails at validation with the rule named.
    // (`type`, `property_type` and `amount` cannot be broken through a mapping: the mapping
    // itself fixes each field's type and refuses non-finite numbers, with reason `type`.)
    let (deposit, bet, loss) = (&seed[0], &seed[4], &seed[5]);
    let with = |base: &Value, k: &str, v: Value| {
        let mut e = base.clone();
        if v.is_null() {
            e.as_object_mut().unwrap().remove(k);
        } else {
            e[k] = v;
        }
        e
    };
    let broken = [
        (with(deposit, "client_user_id", json!("")), "client_user_id", "required"),
        (with(deposit, "event_name", json!("")), "event_name", "required"),
        (with(deposit, "amount", Value::Null), "amount", "financial_fields"),
        (
            with(deposit, "click_id", Value::Null),
            "click_id",
            "click_id_ip_address",
        ),
        (
            with(deposit, "ip_address", json!("300.1.1.1")),
            "ip_address",
            "ip_address",
        ),
        (with(deposit, "currency", json!("XBT")), "currency", "currency"),
        (
            with(bet, "bet_result_amount", Value::Null),
            "bet_result_amount",
            "bet_result",
        ),
        (with(bet, "bet_result", json!("draw")), "bet_result", "bet_result"),
        (
            with(bet, "bet_result_amount", json!(2.0)),
            "bet_result_amount",
            "amount_sign",
        ),
        (
            with(loss, "parent_transaction_id", Value::Null),
            "parent_transaction_id",
            "settlement",
        ),
        (
            with(deposit, "parent_transaction_id", json!("b1")),
            "parent_transaction_id",
            "settlement",
        ),
        (with(loss, "amount", json!(5.0)), "amount", "amount_sign"),
    ];
    for (ev, field, rule) in broken {
        let out = map_value(&m, ev.to_string().as_bytes());
        let e = failed(&out);
        assert_eq!(
            (e.stage, e.field.as_deref(), e.reason.as_str()),
            (Stage::Validation, Some(field), rule),
            "{ev}: {e}"
        );
    }
    // A time before 1970 is outside the default plausible window (reason `time`, at mapping);
    // a window that admits it leaves it to the contract rule `timestamp`.
    let negative = with(deposit, "timestamp", json!(-1)).to_string();
    let e = failed(&map_value(&m, negative.as_bytes())).clone();
    assert_eq!((e.stage, e.reason.as_str()), (Stage::Mapping, "time"), "{e}");
    let wide = mapper(&format!(
        "{}timestamp_window = {{ earliest = \"1969-01-01\" }}\n",
        one_field("timestamp", r#"{ from = "/timestamp", time = "seconds" }"#)
    ));
    let e = failed(&map_value(&wide, negative.as_bytes())).clone();
    assert_eq!(
        (e.stage, e.field.as_deref(), e.reason.as_str()),
        (Stage::Validation, Some("timestamp"), "timestamp"),
        "{e}"
    );
}

#[test]
fn known_field_match_agrees_with_the_contract_list() {
    for f in KNOWN_FIELDS {
        assert!(is_known_field(f), "{f}");
    }
    assert!(!is_known_field("vip") && !is_known_field("amount "));
}

#[test]
fn mapper_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Mapper>();
}

#[test]
fn config_round_trips_through_toml() {
    let cfgs = configs(WALLET);
    #[derive(serde::Serialize)]
    struct Out<'a> {
        mapping: &'a [MappingConfig],
    }
    let text = toml::to_string(&Out { mapping: &cfgs }).unwrap();
    assert_eq!(configs(&text), cfgs, "{text}");
}

#[test]
fn mangled_records_never_panic() {
    // Every prefix of a record, and the record with each byte replaced by a troublesome one: each
    // gets an outcome, and anything that is not a whole record fails rather than maps.
    let m = mapper(WALLET);
    let good = wallet("");
    let bytes = good.as_bytes();
    for cut in 0..bytes.len() {
        let out = map_value(&m, &bytes[..cut]);
        assert!(matches!(out, MapOutcome::Failed(_)), "prefix {cut}: {out:?}");
    }
    for i in 0..bytes.len() {
        for b in [b'"', b'{', b']', b'\\', 0xff, b'0', b' '] {
            let mut v = bytes.to_vec();
            v[i] = b;
            let _ = map_value(&m, &v);
        }
    }
}

// Reader fidelity (issue 16): each kind's example from the issue, and two more of each.

/// The body the API would receive for an event, as written (not re-read through a JSON tree,
/// which would round numbers).
fn event_text(o: &MapOutcome) -> String {
    match o {
        MapOutcome::Event(e) => {
            let mut out = Vec::new();
            e.write_json(&mut out);
            String::from_utf8(out).unwrap()
        }
        other => panic!("expected an event, got {other:?}"),
    }
}

fn with_bom(text: &str) -> Vec<u8> {
    let mut v = b"\xEF\xBB\xBF".to_vec();
    v.extend_from_slice(text.as_bytes());
    v
}

#[test]
fn one_leading_byte_order_mark_is_ignored() {
    let m = mapper(WALLET);
    // The issue's example: EF BB BF, then a valid object (.NET's default UTF-8 writer).
    let plain = map_value(&m, wallet("").as_bytes());
    let marked = map_value(&m, &with_bom(&wallet("")));
    assert_eq!(event_text(&marked), event_text(&plain));
    // A small record whose whole value is read (`properties` over the root): the mark is not
    // part of the first key.
    let root = mapper(
        r#"[[mapping]]
topics = ["t"]
client_user_id = "/u"
event_name = { const = "custom" }
timestamp = { const = 1702963200 }
properties = { remaining = true }
"#,
    );
    let out = map_value(&root, &with_bom(r#"{"a":"1","u":"p-01"}"#));
    assert_eq!(
        event_text(&out),
        r#"{"client_user_id":"p-01","event_name":"custom","timestamp":1702963200,"a":"1"}"#
    );
    // Only one mark, and only at the very start: a second one, or one after white space, is not
    // JSON (RFC 8259 §8.1 allows ignoring the mark, not stray ones).
    let mut twice = with_bom("");
    twice.extend_from_slice(&with_bom(&wallet("")));
    assert_eq!(failed(&map_value(&m, &twice)).reason, "not_json");
    let late = format!(" \u{feff}{}", wallet(""));
    assert_eq!(failed(&map_value(&m, late.as_bytes())).reason, "not_json");
}

/// A record with `n` custom properties under `/props` (`k00000` = `v0`, …), about 16 bytes each.
fn wide_record(n: usize) -> String {
    let mut s = String::from(r#"{"u":"p-01","props":{"#);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(r#""k{i:05}":"v{i}""#));
    }
    s.push_str("}}");
    s
}

const WIDE: &str = r#"[[mapping]]
topics = ["t"]
client_user_id = "/u"
event_name = { const = "custom" }
timestamp = { const = 1702963200 }
properties = { from = "/props" }
"#;

#[test]
fn wide_records_map_in_n_log_n() {
    // The issue's example: about 1 MB, 70,000 custom properties. The name-collision check was
    // quadratic (5.35 s in a release build); 2.45e9 string comparisons cannot finish in this
    // bound even unoptimised, a sort-based check finishes in a fraction of it.
    let m = mapper(WIDE);
    let text = wide_record(70_000);
    assert!(text.len() > 1_000_000, "{}", text.len());
    let started = std::time::Instant::now();
    let out = map_value(&m, text.as_bytes());
    let took = started.elapsed();
    let MapOutcome::Event(e) = &out else { panic!("{out:?}") };
    assert_eq!(e.properties.len(), 70_000);
    assert_eq!(e.properties[69_999], ("k69999".into(), "v69999".into()));
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
}

#[test]
fn colliding_property_names_are_still_named_in_wide_and_narrow_records() {
    // Wide: two tables whose names meet once, among 20,000 (the sorted check's path).
    let two = WIDE.replace(
        r#"properties = { from = "/props" }"#,
        r#"properties = [{ from = "/props" }, { from = "/more" }]"#,
    );
    let m = mapper(&two);
    let text = wide_record(20_000).replace("}}", r#"},"more":{"x":"1","k12345":"again"}}"#);
    let out = map_value(&m, text.as_bytes());
    assert_eq!(
        (failed(&out).reason.as_str(), failed(&out).field.as_deref()),
        ("property_name", Some("k12345"))
    );
    // Narrow: a `rename` onto a copied name (the pairwise path).
    let m = mapper(&WIDE.replace(
        r#"properties = { from = "/props" }"#,
        r#"properties = [{ from = "/props" }, { from = "/more", rename = { a = "k00001" } }]"#,
    ));
    let out = map_value(&m, wide_record(3).replace("}}", r#"},"more":{"a":"x"}}"#).as_bytes());
    assert_eq!(
        (failed(&out).reason.as_str(), failed(&out).field.as_deref()),
        ("property_name", Some("k00001"))
    );
}

/// A mapping of a financial event whose transaction id, amount and properties are the record's.
const BETS: &str = r#"[[mapping]]
topics = ["t"]
client_user_id = "/player"
event_name = { const = "bet" }
timestamp = { const = 1702963200 }
transaction_id = { from = "/round_id", as = "string" }
amount = { from = "/stake", as = "number" }
currency = { const = "EUR" }
properties = { from = "/meta" }
"#;

#[test]
fn numbers_converted_to_strings_keep_their_digits() {
    let m = mapper(BETS);
    let tx = |round: &str| {
        let rec = format!(r#"{{"player":"p-01","round_id":{round},"stake":"5.00"}}"#);
        match map_value(&m, rec.as_bytes()) {
            MapOutcome::Event(e) => e.transaction_id.unwrap().into_owned(),
            other => panic!("{other:?}"),
        }
    };
    // The issue's example: two bets, two ids (a binary64 made both 7.7012345678901235e+25, and
    // dedupe then dropped the second).
    assert_eq!(tx("77012345678901234567890123"), "77012345678901234567890123");
    assert_eq!(tx("77012345678901234567890124"), "77012345678901234567890124");
    assert_eq!(tx("904218376251884077"), "904218376251884077");
    // More: a fraction and an exponent are written as the record wrote them.
    assert_eq!(tx("12.50"), "12.50");
    assert_eq!(tx("-1E+2"), "-1E+2");
    // The same for custom properties; table keys (`in`, `table`) compare exact values.
    let out = map_value(
        &m,
        br#"{"player":"p-01","round_id":1,"stake":"5","meta":{"id":904218376251884077,"odds":2.50,"big":1e300}}"#,
    );
    assert!(
        event_text(&out).ends_with(r#""big":"1e300","id":"904218376251884077","odds":"2.50"}"#),
        "{}",
        event_text(&out)
    );
    let m = mapper(&one_field(
        "game_type",
        r#"{ from = "/g", table = { "9007199254740993" = "odd", "9007199254740992" = "even" } }"#,
    ));
    assert!(event_text(&map_value(&m, br#"{"g":9007199254740993}"#)).contains(r#""game_type":"odd""#));
    assert!(event_text(&map_value(&m, br#"{"g":9007199254740992.0}"#)).contains(r#""game_type":"even""#));
}

#[test]
fn amounts_are_exact_decimals() {
    let m = mapper(BETS);
    let amount = |stake: &str| {
        let rec = format!(r#"{{"player":"p-01","round_id":1,"stake":{stake}}}"#);
        let text = event_text(&map_value(&m, rec.as_bytes()));
        let at = text.find(r#""amount":"#).unwrap() + 9;
        text[at..text[at..].find(',').unwrap() + at].to_string()
    };
    // A number keeps its text; a decimal string is written as JSON number text, digits unchanged.
    assert_eq!(amount("9007199254740993"), "9007199254740993");
    assert_eq!(amount("50.00"), "50.00");
    assert_eq!(amount(r#""50.00""#), "50.00");
    assert_eq!(amount(r#"" +0012.5 ""#), "12.5");
    assert_eq!(
        amount(r#""123456789012345678901234567890.01""#),
        "123456789012345678901234567890.01"
    );
    // Sign rules are exact: the minus sign moves, no digit does.
    let neg = mapper(
        &BETS
            .replace(r#"as = "number" }"#, r#"as = "number", sign = "negative" }"#)
            .replace(
                r#"event_name = { const = "bet" }"#,
                r#"event_name = { const = "loss" }
parent_transaction_id = { const = "b-1" }"#,
            ),
    );
    let out = map_value(&neg, br#"{"player":"p-01","round_id":1,"stake":"9007199254740993.10"}"#);
    assert!(
        event_text(&out).contains(r#""amount":-9007199254740993.10,"#),
        "{}",
        event_text(&out)
    );
    // Non-finite stays impossible: `1e400` is not a number a binary64 holds.
    assert_eq!(
        failed(&map_value(&m, br#"{"player":"p","round_id":1,"stake":"1e400"}"#)).reason,
        "type"
    );
    assert_eq!(
        failed(&map_value(&m, br#"{"player":"p","round_id":1,"stake":"NaN"}"#)).reason,
        "type"
    );
}

/// An amount the API's binary64 cannot hold is refused, not sent as a number it reads as 0.
#[test]
fn amounts_too_small_for_a_binary64_are_refused() {
    let m = mapper(BETS);
    let stake = |s: &str| map_value(&m, format!(r#"{{"player":"p","round_id":1,"stake":{s}}}"#).as_bytes());
    for tiny in ["1e-400", "-2.5E-330", r#""0.1e-330""#] {
        let out = stake(tiny);
        let e = failed(&out);
        assert_eq!(
            (e.reason.as_str(), e.field.as_deref()),
            ("type", Some("amount")),
            "{tiny}"
        );
        assert!(e.message.contains("too small for the API's binary64"), "{e}");
    }
    // Zero however written, and the smallest binary64s, pass as written.
    for ok in ["0e-400", "-0.000", "5e-324", "-2.5E-320", "2.2250738585072014e-308"] {
        assert!(event_text(&stake(ok)).contains(&format!(r#""amount":{ok}"#)), "{ok}");
    }
}

#[test]
fn a_record_with_a_key_twice_is_refused_whatever_reads_it() {
    // The issue's example: `/player/id` alone, and with `properties` over `/player`, give one
    // verdict, naming the repeated key.
    let record = br#"{"player":{"id":"acct-A"},"type":"deposit","player":{"tier":"gold"}}"#;
    let alone = mapper(&one_field("client_user_id", r#""/player/id""#));
    let with_props = mapper(&format!(
        "{}properties = {{ from = \"/player\" }}\n",
        one_field("client_user_id", r#""/player/id""#)
    ));
    // Reading the whole record (every remaining field as a property) builds the top object: its
    // error names the key too, not the object's end (found by review: "at the top level").
    let whole = mapper(&format!(
        "{}properties = {{ remaining = true }}\n",
        one_field("client_user_id", r#""/player/id""#)
    ));
    for m in [&alone, &with_props, &whole] {
        let out = map_value(m, record);
        let e = failed(&out);
        assert_eq!(
            (e.reason.as_str(), e.field.as_deref()),
            ("duplicate_key", Some("/player")),
            "{e}"
        );
        assert!(e.message.contains("duplicate key"), "{e}");
    }
    // More: a repeat inside a part no option reads (skipped, not built), and one written with an
    // escape (`\u0069d` is `id`), among many keys (the sorted check).
    let out = map_value(&alone, br#"{"player":{"id":"a"},"audit":{"x":[{"k":1,"k":2}]}}"#);
    assert_eq!(
        (failed(&out).reason.as_str(), failed(&out).field.as_deref()),
        ("duplicate_key", Some("/audit/x/0/k"))
    );
    let mut wide = String::from(r#"{"player":{"id":"a"},"other":{"#);
    for i in 0..1000 {
        wide.push_str(&format!(r#""k{i}":{i},"#));
    }
    wide.push_str(r#""id":1,"\u0069d":2}}"#);
    let out = map_value(&alone, wide.as_bytes());
    assert_eq!(
        (failed(&out).reason.as_str(), failed(&out).field.as_deref()),
        ("duplicate_key", Some("/other/id"))
    );
    // A built object with a key written twice, once escaped: named by the key, as skipped.
    let props = mapper(&format!(
        "{}properties = {{ from = \"/p\" }}\n",
        one_field("client_user_id", r#""/player/id""#)
    ));
    let out = map_value(&props, br#"{"player":{"id":"a"},"p":{"k":1,"\u006B":2}}"#);
    assert_eq!(
        (failed(&out).reason.as_str(), failed(&out).field.as_deref()),
        ("duplicate_key", Some("/p/k"))
    );
    // Equal hashes are checked, not trusted: distinct keys in a wide object pass.
    let mut distinct = String::from(r#"{"player":{"id":"a"},"other":{"#);
    for i in 0..1000 {
        distinct.push_str(&format!(r#""k{i}":{i},"#));
    }
    distinct.push_str(r#""id":1}}"#);
    assert!(matches!(map_value(&alone, distinct.as_bytes()), MapOutcome::Event(_)));
}

#[test]
fn json_errors_name_the_pointer_where_the_reader_was() {
    let m = mapper(WALLET);
    let deep = format!("/money/value{}", "/0".repeat(126));
    let cases: [(&str, &str, &str); 5] = [
        // (the `money.value` of the wallet record replaced by, the pointer, words of the message)
        (r#""\ud800x""#, "/money/value", "surrogate"),
        ("NaN", "/money/value", "expected a JSON value"),
        ("1e400", "/money/value", "number out of range"),
        // The innermost array the reader opened: 128 levels from the top (2 of them money.value).
        (&"[".repeat(200), &deep, "nested too deeply"),
        (r#"{"a":tru}"#, "/money/value/a", "expected a JSON value"),
    ];
    for (value, pointer, words) in cases {
        let rec = wallet("").replace(r#""50.00""#, value);
        let out = map_value(&m, rec.as_bytes());
        let e = failed(&out);
        assert_eq!(
            (e.reason.as_str(), e.field.as_deref()),
            ("not_json", Some(pointer)),
            "{value}: {e}"
        );
        // Messages cut long pointers (64 bytes); `dp.field` carries the whole.
        let shown = crate::event::truncate(pointer);
        assert!(
            e.message.contains(&format!("at `{shown}`")) && e.message.contains(words),
            "{e}"
        );
    }
    // At the top level the message says so, and names no field; offsets count a skipped mark.
    let out = map_value(&m, &with_bom("{\"a\":1,}"));
    let e = failed(&out);
    assert_eq!(e.field, None, "{e}");
    assert!(e.message.contains("at the top level (byte 10)"), "{e}");
}

#[test]
fn a_pointer_into_a_deep_record_is_cut() {
    let m = mapper(WALLET);
    let deep = format!("{{\"x\":{}", "[".repeat(10_000));
    let e = map_value(&m, deep.as_bytes());
    let e = failed(&e);
    let field = e.field.as_deref().unwrap_or_default();
    assert!(field.len() <= 1024 + '…'.len_utf8() && field.ends_with('…'), "{field}");
    assert!(field.starts_with("/x/0/0/"), "{field}");
    assert!(e.message.len() < 1_000, "{}", e.message.len());
}

/// Issue 16: a number is compared by its decimal value, however the record or the configuration
/// writes it; a string by its text.
#[test]
fn numbers_match_tables_and_conditions_by_value() {
    let m = mapper(
        r#"[[mapping]]
topics = ["t"]
keep_when = [{ from = "/status", in = [1.5, "200"] }]
client_user_id = "/u"
event_name = { from = "/kind", table = { "1" = "one", "2.50" = "two_and_a_half", "1e2" = "hundred" }, otherwise = "dead-letter" }
timestamp = { const = 1702963200 }
"#,
    );
    let name = |kind: &str, status: &str| {
        let v = format!(r#"{{"u":"p-1","kind":{kind},"status":{status}}}"#);
        match map_value(&m, v.as_bytes()) {
            MapOutcome::Event(e) => e.event_name.to_string(),
            MapOutcome::Filtered { .. } => "filtered".to_string(),
            MapOutcome::Failed(e) => e.reason.to_string(),
        }
    };
    // The table: the number 1 however written; 2.5 for the key "2.50"; 100 for "1e2".
    for (kind, want) in [
        ("1", "one"),
        ("1.0", "one"),
        ("1.000e0", "one"),
        ("10E-1", "one"),
        ("2.5", "two_and_a_half"),
        ("25e-1", "two_and_a_half"),
        ("100", "hundred"),
        ("100.00", "hundred"),
        // Strings are text: "1" is the key "1", "1.0" is no key, "2.5" is no key "2.50".
        (r#""1""#, "one"),
        (r#""1.0""#, "unknown_value"),
        (r#""2.5""#, "unknown_value"),
        // Close is not equal.
        ("1.0000000000000001", "unknown_value"),
        ("-1", "unknown_value"),
    ] {
        assert_eq!(name(kind, "1.5"), want, "kind {kind}");
    }
    // The condition: 1.5 (a TOML float) and "200" (a string) match numbers of those values.
    for (status, want) in [
        ("1.5", "one"),
        ("1.50", "one"),
        ("15e-1", "one"),
        ("200", "one"),
        ("2e2", "one"),
        ("200.0", "one"),
        (r#""200""#, "one"),
        (r#""1.50""#, "filtered"),
        ("1.51", "filtered"),
        ("true", "filtered"),
    ] {
        assert_eq!(name("1", status), want, "status {status}");
    }
}

/// Issue 16, kind 2: a value in UTF-16 is refused with a reason that says so.
#[test]
fn utf16_values_are_refused_saying_so() {
    let m = mapper(WALLET);
    let utf16 = |text: &str, le: bool, bom: bool| {
        let mut out: Vec<u8> = if !bom {
            vec![]
        } else if le {
            vec![0xFF, 0xFE]
        } else {
            vec![0xFE, 0xFF]
        };
        for u in text.encode_utf16() {
            out.extend_from_slice(&if le { u.to_le_bytes() } else { u.to_be_bytes() });
        }
        out
    };
    let text = wallet("");
    for (value, reason, says) in [
        (utf16(&text, true, true), "not_utf8", "UTF-16 byte order mark"),
        (utf16(&text, false, true), "not_utf8", "UTF-16 byte order mark"),
        (utf16(&text, true, false), "not_json", "looks like UTF-16"),
        (utf16(&text, false, false), "not_json", "looks like UTF-16"),
        (
            [
                &[0xFF, 0xFE, 0, 0][..],
                &text.chars().flat_map(|c| (c as u32).to_le_bytes()).collect::<Vec<u8>>(),
            ]
            .concat(),
            "not_utf8",
            "UTF-32 byte order mark",
        ),
    ] {
        let out = map_value(&m, &value);
        let e = failed(&out);
        assert_eq!(e.reason, reason);
        assert!(e.message.contains(says), "{}", e.message);
    }
    // A value that is UTF-8 gets no such hint, even when it is not JSON.
    let e = map_value(&m, b"{\"a\":1,}");
    assert!(!failed(&e).message.contains("UTF-16"), "{}", failed(&e).message);
}

/// Now, in Unix seconds.
fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Issue 17's example: a Debezium `DATE` column (days since 1970) read by the default time
/// reader was sent as `"timestamp":20422`. It is refused with reason `time`, naming the value as
/// written, the reader and the time it read.
#[test]
fn a_date_column_read_as_a_time_is_refused() {
    let m = mapper(&one_field("timestamp", r#""/value_date""#));
    let out = map_value(&m, br#"{"value_date":20422}"#);
    let e = failed(&out);
    assert_eq!(
        (e.stage, e.field.as_deref(), e.reason.as_str()),
        (Stage::Mapping, Some("timestamp"), "time"),
        "{e}"
    );
    for words in [
        "the number 20422",
        "the default `time = \"auto\"`, by its size as seconds",
        "is 1970-01-01T05:40:22Z",
        "outside the plausible window 2000-01-01T00:00:00Z to now + 1day: a date",
        "`timestamp_window`",
    ] {
        assert!(e.message.contains(words), "{words:?} in {}", e.message);
    }
    // Read as the date it is (with `expr`), it passes: 20422 days is 2025-11-30.
    let m = mapper(&one_field(
        "timestamp",
        r#"{ from = "/value_date", expr = ". * 86400" }"#,
    ));
    let e = event_json(&map_value(&m, br#"{"value_date":20422}"#));
    assert_eq!(e["timestamp"], json!(20422 * 86400));
}

/// The window applies after every reader, in either unit the API is configured for; its ends are
/// included.
#[test]
fn every_time_reader_is_held_to_the_window() {
    let now = now_s();
    let ok = |v: i64| Ok::<i64, &str>(v);
    #[rustfmt::skip]
    let cases: Vec<(&str, Value, Result<i64, &str>)> = vec![
        (r#"{ from = "/ts", time = "seconds" }"#, json!({"ts": 946684800}), ok(946684800)),
        (r#"{ from = "/ts", time = "seconds" }"#, json!({"ts": 946684799}), Err("time")),
        (r#"{ from = "/ts", time = "seconds" }"#, json!({"ts": "946684799.999"}), Err("time")),
        (r#"{ from = "/ts", time = "seconds" }"#, json!({"ts": now + 3600}), ok(now + 3600)),
        (r#"{ from = "/ts", time = "seconds" }"#, json!({"ts": now + 3 * 86400}), Err("time")),
        (r#"{ from = "/ts", time = "seconds" }"#, json!({"ts": 0}), Err("time")),
        (r#"{ from = "/ts", time = "seconds" }"#, json!({"ts": -1702963200}), Err("time")),
        // Milliseconds read as seconds: thousands of years ahead.
        (r#"{ from = "/ts", time = "seconds" }"#, json!({"ts": 1702963200123_i64}), Err("time")),
        (r#"{ from = "/ts", time = "milliseconds" }"#, json!({"ts": 1702963200000_i64}), ok(1702963200)),
        (r#"{ from = "/ts", time = "milliseconds" }"#, json!({"ts": 1702963200}), Err("time")),
        (r#"{ from = "/ts", time = "microseconds" }"#, json!({"ts": 1702963200}), Err("time")),
        (r#"{ from = "/ts", time = "nanoseconds" }"#, json!({"ts": 1702963200000_i64}), Err("time")),
        (r#"{ from = "/ts", time = "rfc3339" }"#, json!({"ts": "2000-01-01T00:00:00Z"}), ok(946684800)),
        (r#"{ from = "/ts", time = "rfc3339" }"#, json!({"ts": "1999-12-31T23:59:59Z"}), Err("time")),
        (r#"{ from = "/ts", time = "iso8601" }"#, json!({"ts": "19700101T000000Z"}), Err("time")),
        (r#"{ from = "/ts", time = "iso8601" }"#, json!({"ts": "99991231T000000Z"}), Err("time")),
        (r#"{ from = "/ts", time_format = "[year]-[month]-[day] [hour]:[minute]" }"#, json!({"ts": "1899-12-31 23:00"}), Err("time")),
        (r#"{ from = "/ts", time_format = "[year]-[month]-[day] [hour]:[minute]" }"#, json!({"ts": "2023-12-19 00:00"}), ok(1702944000)),
        // The default reader, by size and as RFC 3339.
        (r#""/ts""#, json!({"ts": 1702963200000000_i64}), ok(1702963200)),
        (r#""/ts""#, json!({"ts": 86400}), Err("time")),
        (r#""/ts""#, json!({"ts": "1970-01-02T00:00:00Z"}), Err("time")),
        (r#"{ from = "/ts", default = 5 }"#, json!({}), Err("time")),
    ];
    for (spec, value, want) in cases {
        for unit in [TimestampUnit::Seconds, TimestampUnit::Milliseconds] {
            let contract = ContractOptions {
                timestamp_unit: unit,
                ..Default::default()
            };
            let m = Mapper::compile(&configs(&one_field("timestamp", spec)), &contract).unwrap();
            let out = map_value(&m, value.to_string().as_bytes());
            let label = format!("timestamp = {spec} on {value} in {unit:?}");
            match want {
                Ok(s) => {
                    let per = if unit == TimestampUnit::Seconds { 1 } else { 1000 };
                    assert_eq!(event_json(&out)["timestamp"], json!(s * per), "{label}");
                }
                Err(reason) => {
                    let e = failed(&out);
                    assert_eq!(
                        (e.reason.as_str(), e.field.as_deref()),
                        (reason, Some("timestamp")),
                        "{label}: {e}"
                    );
                }
            }
        }
    }
}

/// The record's Kafka timestamp is a time source like any other.
#[test]
fn the_kafka_timestamp_is_held_to_the_window_too() {
    let m = mapper(&one_field("timestamp", r#""timestamp""#));
    let at = |ms: i64| {
        m.map(&SourceRecord {
            topic: "t",
            partition: 0,
            offset: 0,
            timestamp_ms: Some(ms),
            key: None,
            value: Some(b"{}"),
            headers: &[],
        })
        .into_owned()
    };
    // A producer that sets no create time can leave 0 (librdkafka), read as 1970.
    let e = failed(&at(0)).clone();
    assert_eq!(e.reason, "time", "{e}");
    assert!(
        e.message
            .contains("the number 0 read with the default `time = \"auto\"`"),
        "{e}"
    );
    assert_eq!(event_json(&at(1_702_963_200_123))["timestamp"], json!(1_702_963_200));
}

/// How each reader is named in the refusal.
#[test]
fn the_refusal_names_the_reader() {
    for (spec, value, reader) in [
        (
            r#"{ from = "/ts", time = "milliseconds" }"#,
            json!({"ts": 20422}),
            "`time = \"milliseconds\"`",
        ),
        (
            r#"{ from = "/ts", time = "auto" }"#,
            json!({"ts": 20422}),
            "`time = \"auto\"`, by its size as seconds",
        ),
        (
            r#"{ from = "/ts", time = "auto" }"#,
            json!({"ts": "1990-01-01T00:00:00Z"}),
            "`time = \"auto\"`, as RFC 3339",
        ),
        (
            r#""/ts""#,
            json!({"ts": 20422000}),
            "the default `time = \"auto\"`, by its size as seconds",
        ),
        (
            r#""/ts""#,
            json!({"ts": 99999999999999_i64}),
            "by its size as milliseconds",
        ),
        (
            r#"{ from = "/ts", time_format = "[year]-[month]-[day] [hour]:[minute]" }"#,
            json!({"ts": "1990-05-01 12:00"}),
            "`time_format = \"[year]-[month]-[day] [hour]:[minute]\"`",
        ),
    ] {
        let m = mapper(&one_field("timestamp", spec));
        let out = map_value(&m, value.to_string().as_bytes());
        let e = failed(&out);
        assert_eq!(e.reason, "time", "{spec}: {e}");
        assert!(e.message.contains(reader), "{spec}: {reader:?} in {}", e.message);
    }
}

/// `timestamp_window` sets each mapping's own window; an end left out keeps its default.
#[test]
fn each_mapping_may_set_its_window() {
    let now = now_s();
    let with_window = |window: &str| {
        mapper(&format!(
            "{}timestamp_window = {window}\n",
            one_field("timestamp", r#"{ from = "/ts", time = "seconds" }"#)
        ))
    };
    let reason = |m: &Mapper, ts: i64| match map_value(m, json!({ "ts": ts }).to_string().as_bytes()) {
        MapOutcome::Event(_) => "event".to_string(),
        MapOutcome::Failed(e) => e.reason,
        other => panic!("{other:?}"),
    };
    // A replay of old history: from 1970 on, and never ahead of the clock.
    let history = with_window(r#"{ earliest = "1970-01-01T00:00:01Z", latest = "now" }"#);
    assert_eq!(reason(&history, 20422), "event");
    assert_eq!(reason(&history, 0), "time");
    assert_eq!(reason(&history, now + 3600), "time");
    // Recent events only.
    let recent = with_window(r#"{ earliest = "now - 30d" }"#);
    assert_eq!(reason(&recent, now - 86_400), "event");
    assert_eq!(reason(&recent, 1_702_963_200), "time");
    assert_eq!(
        reason(&recent, now + 3600),
        "event",
        "latest keeps its default, a day ahead"
    );
    assert_eq!(reason(&recent, now + 2 * 86_400), "time");
    // Scheduled events a year ahead.
    let ahead = with_window(r#"{ latest = "now + 400d" }"#);
    assert_eq!(reason(&ahead, now + 365 * 86_400), "event");
    assert_eq!(reason(&ahead, 20422), "time", "earliest keeps its default");
    // Two mappings, two windows.
    let two = mapper(&format!(
        "{}timestamp_window = {{ earliest = \"1970-01-02\" }}\n{}",
        one_field("timestamp", r#"{ from = "/ts", time = "seconds" }"#),
        one_field("timestamp", r#"{ from = "/ts", time = "seconds" }"#).replace("[\"t\"]", "[\"u\"]"),
    ));
    let on = |topic: &str, ts: i64| {
        let value = json!({ "ts": ts }).to_string();
        let out = two.map(&SourceRecord {
            topic,
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: None,
            value: Some(value.as_bytes()),
            headers: &[],
        });
        matches!(out, MapOutcome::Event(_))
    };
    assert!(on("t", 100_000) && !on("u", 100_000));
    assert!(!on("t", 100) && !on("u", 100));
}

#[test]
fn a_window_that_cannot_be_read_fails_at_start_up_naming_the_option() {
    let problems = |window: &str| {
        let text = format!("{}timestamp_window = {window}\n", one_field("timestamp", r#""/ts""#));
        match compile(&text) {
            Ok(_) => panic!("{window} compiled"),
            Err(e) => e
                .problems()
                .iter()
                .map(|p| (p.option.unwrap_or_default(), p.to_string()))
                .collect::<Vec<_>>(),
        }
    };
    let p = problems(r#"{ earliest = "yesterday" }"#);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "timestamp_window.earliest");
    assert!(p[0].1.contains("`yesterday` is not a date"), "{}", p[0].1);
    let p = problems(r#"{ latest = "now + soon", earliest = "2000-02-30" }"#);
    let options: Vec<&str> = p.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        options,
        ["timestamp_window.earliest", "timestamp_window.latest"],
        "{p:?}"
    );
    let p = problems(r#"{ earliest = "2030-01-01", latest = "2020-01-01" }"#);
    assert_eq!(p[0].0, "timestamp_window", "{p:?}");
    assert!(
        p[0].1
            .contains("`earliest` (2030-01-01T00:00:00Z) is after `latest` (2020-01-01T00:00:00Z)"),
        "{p:?}"
    );
    // An unknown key is refused as the configuration is read, by name.
    let text = format!(
        "{}timestamp_window = {{ start = \"2000-01-01\" }}\n",
        one_field("timestamp", r#""/ts""#)
    );
    let e = toml::from_str::<Doc>(&text).err().expect("refused");
    assert!(e.to_string().contains("unknown field `start`"), "{e}");
}

/// The hot path reads the clock only for a time it cannot judge by an earlier reading.
#[test]
fn the_clock_is_read_only_when_needed() {
    let times = Times::new(TimeWindow::DEFAULT);
    let seen = times.seen.load(Ordering::Relaxed);
    let s = 1_000_000_000i128;
    assert_eq!(times.check(1_702_963_200 * s), Ok(()));
    assert_eq!(times.seen.load(Ordering::Relaxed), seen, "answered without the clock");
    let ahead = i128::from(seen) + 2 * 86_400 * s;
    let now = times.check(ahead).unwrap_err();
    assert!(now >= i128::from(seen));
    assert_eq!(
        i128::from(times.seen.load(Ordering::Relaxed)),
        now,
        "the reading is kept"
    );
    assert!(times.check(20_422 * s).is_err());
}

// Issue 17, kind 1: absent, null and "" mean the same for an optional field.

/// Maps `value` with these headers (and key); the event made owned.
fn map_with(m: &Mapper, value: &[u8], key: Option<&[u8]>, headers: &[(&str, Option<&[u8]>)]) -> MapOutcome<'static> {
    m.map(&SourceRecord {
        topic: "t",
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        key,
        value: Some(value),
        headers,
    })
    .into_owned()
}

/// A bet with its money; `extra` adds fields to the mapping.
fn bet_mapping(extra: &str) -> Mapper {
    mapper(&format!(
        r#"
[[mapping]]
topics = ["t"]
client_user_id = "/user"
event_name = {{ const = "bet" }}
timestamp = "/ts"
transaction_id = "/tx"
amount = "/amount"
currency = "/ccy"
{extra}
"#
    ))
}

const A_BET: &str = r#"{"user":"u1","ts":1702963200,"tx":"b-1","amount":5,"ccy":"EUR"#;

/// The issue's first example: Kafka allows a header with no value; `header:` reads it as absent,
/// so the optional `ip_address` is left out (it was read as "" and dead-lettered the bet as
/// "`` is not an IPv4 or IPv6 address"). An empty value is absent too; the last header of a name
/// counts, also when it has no value.
#[test]
fn a_header_without_a_value_is_absent() {
    let m = bet_mapping(r#"ip_address = "header:x-client-ip""#);
    let value = format!("{A_BET}\"}}");
    let with = |headers: &[(&str, Option<&[u8]>)]| map_with(&m, value.as_bytes(), None, headers);
    let e = event_json(&with(&[("x-client-ip", None)]));
    assert_eq!(
        e,
        json!({"client_user_id": "u1", "event_name": "bet", "timestamp": 1702963200, "transaction_id": "b-1",
               "amount": 5, "currency": "EUR"})
    );
    assert_eq!(event_json(&with(&[("x-client-ip", Some(b""))])), e);
    assert_eq!(event_json(&with(&[])), e);
    assert_eq!(
        event_json(&with(&[("x-client-ip", Some(b"198.51.100.7")), ("x-client-ip", None)])),
        e,
        "the last header of the name has no value"
    );
    let ip = event_json(&with(&[("x-client-ip", None), ("x-client-ip", Some(b"198.51.100.7"))]));
    assert_eq!(ip["ip_address"], json!("198.51.100.7"));
    // Where the contract requires the field, the rule that requires it refuses the event.
    let register = mapper(
        r#"
[[mapping]]
topics = ["t"]
client_user_id = "/user"
event_name = { const = "register" }
timestamp = "/ts"
click_id = "/click"
ip_address = "header:x-client-ip"
"#,
    );
    let out = map_with(
        &register,
        br#"{"user":"u1","ts":1702963200,"click":"c1"}"#,
        None,
        &[("x-client-ip", None)],
    );
    let e = failed(&out);
    assert_eq!(
        (e.stage, e.field.as_deref(), e.reason.as_str()),
        (Stage::Validation, Some("ip_address"), "click_id_ip_address"),
        "{e}"
    );
}

/// The issue's second example, `"client_ip":""` mapped to the optional `ip_address`, and the
/// rule on every field: after the source, `expr`, `default` and `trim`, null, missing and "" are
/// absent; an optional field is then left out (null below) or takes its `default`.
#[test]
fn an_empty_optional_field_is_left_out_or_takes_its_default() {
    let out = map_value(
        &bet_mapping(r#"ip_address = "/client_ip""#),
        format!("{A_BET}\",\"client_ip\":\"\"}}").as_bytes(),
    );
    assert_eq!(event_json(&out).get("ip_address"), None);
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, Value, Value)> = vec![
        ("ip_address", r#""/ip""#, json!({"ip": ""}), Value::Null),
        ("user_agent", r#""/ua""#, json!({"ua": ""}), Value::Null),
        ("click_id", r#"{ from = "/c", as = "string" }"#, json!({"c": ""}), Value::Null),
        // `default` stands in for "" as for null and a missing value
        ("game_type", r#"{ from = "/g", default = "none" }"#, json!({"g": ""}), json!("none")),
        ("game_type", r#"{ from = "/g", default = "none" }"#, json!({"g": null}), json!("none")),
        ("game_type", r#"{ from = "/g", default = "none" }"#, json!({}), json!("none")),
        // white space is a value, unless trimmed
        ("game_type", r#""/g""#, json!({"g": " "}), json!(" ")),
        ("game_type", r#"{ from = "/g", trim = true }"#, json!({"g": " \t"}), Value::Null),
        ("game_type", r#"{ from = "/g", trim = true, default = " none " }"#, json!({"g": "  "}), json!("none")),
        // an expression's "" is absent; a table value "" turns a sentinel into no value
        ("game_type", r#"{ from = "/g", expr = "if . == \"-\" then \"\" else . end" }"#, json!({"g": "-"}), Value::Null),
        ("game_type", r#"{ from = "/g", expr = ". + \"\"", default = "d" }"#, json!({"g": ""}), json!("d")),
        ("game_type", r#"{ from = "/g", table = { "N/A" = "" }, otherwise = "keep" }"#, json!({"g": "N/A"}), Value::Null),
        ("game_type", r#"{ from = "/g", table = { "N/A" = "" }, otherwise = "keep" }"#, json!({"g": "slot"}), json!("slot")),
        ("game_type", r#"{ from = "/g", table = { A = "a" }, fallback = "" }"#, json!({"g": "B"}), Value::Null),
        // other types: "" is no number, boolean or time, but absent
        ("amount", r#"{ from = "/a", as = "number" }"#, json!({"a": ""}), Value::Null),
        ("is_crypto", r#"{ from = "/c", as = "boolean" }"#, json!({"c": ""}), Value::Null),
        ("is_crypto", r#"{ from = "/c", in = ["BTC"] }"#, json!({"c": ""}), Value::Null),
        ("is_crypto", r#"{ from = "/c", default = false }"#, json!({"c": ""}), json!(false)),
        ("bet_result", r#"{ from = "/r", table = { W = "win" } }"#, json!({"r": ""}), Value::Null),
        ("parent_transaction_id", r#""/p""#, json!({"p": ""}), Value::Null),
        ("timestamp", r#"{ from = "/ts", default = 1702963200 }"#, json!({"ts": ""}), json!(1702963200)),
    ];
    for (field, spec, value, want) in cases {
        let m = mapper(&one_field(field, spec));
        let out = map_value(&m, value.to_string().as_bytes());
        let e = event_json(&out);
        assert_eq!(
            e.get(field).cloned().unwrap_or(Value::Null),
            want,
            "{field} = {spec} on {value}"
        );
    }
    // The record key and a header: empty is absent too.
    let m = mapper(&one_field("game_type", r#"{ from = "key", default = "no key" }"#));
    assert_eq!(
        event_json(&map_with(&m, b"{}", Some(b""), &[]))["game_type"],
        json!("no key")
    );
    let m = mapper(&one_field("game_type", r#"{ from = "header:g", default = "none" }"#));
    for h in [None, Some(&b""[..])] {
        assert_eq!(
            event_json(&map_with(&m, b"{}", None, &[("g", h)]))["game_type"],
            json!("none")
        );
    }
}

/// A field the contract requires that is "" (or null, or missing) is refused by the rule that
/// requires it, as when it is missing: never sent as "".
#[test]
fn an_empty_required_field_is_refused_by_the_rule_that_requires_it() {
    let full = r#""user":"u1","ts":1702963200,"tx":"t-1","amount":"5","ccy":"EUR","click":"c1","ip":"::1","parent":"b-1","result":"win","net":"5""#;
    let m = mapper(
        r#"
[[mapping]]
topics = ["t"]
client_user_id = "/user"
event_name = "/name"
timestamp = "/ts"
transaction_id = "/tx"
amount = { from = "/amount", as = "number" }
currency = "/ccy"
click_id = "/click"
ip_address = "/ip"
parent_transaction_id = "/parent"
bet_result = "/result"
bet_result_amount = { from = "/net", as = "number" }
"#,
    );
    // (event name, the field made "", and the fields left out of the record)
    let cases = [
        ("deposit", "user", &[][..], "client_user_id", "required"),
        ("", "", &[][..], "event_name", "required"),
        ("deposit", "ts", &[][..], "timestamp", "required"),
        ("deposit", "tx", &[][..], "transaction_id", "financial_fields"),
        ("deposit", "amount", &[][..], "amount", "financial_fields"),
        ("deposit", "ccy", &[][..], "currency", "financial_fields"),
        ("deposit", "click", &[][..], "click_id", "click_id_ip_address"),
        ("login", "ip", &[][..], "ip_address", "click_id_ip_address"),
        ("bet", "result", &["parent"][..], "bet_result", "bet_result"),
        ("bet", "net", &["parent"][..], "bet_result_amount", "bet_result"),
        (
            "win",
            "parent",
            &["result", "net"][..],
            "parent_transaction_id",
            "settlement",
        ),
    ];
    for (name, empty, drop, field, rule) in cases {
        let mut v: serde_json::Map<String, Value> = serde_json::from_str(&format!("{{{full}}}")).unwrap();
        v.insert("name".into(), json!(name));
        if !empty.is_empty() {
            v.insert(empty.into(), json!(""));
        }
        for d in drop {
            v.remove(*d);
        }
        let out = map_value(&m, Value::Object(v).to_string().as_bytes());
        let e = failed(&out);
        assert_eq!(
            (e.stage, e.field.as_deref(), e.reason.as_str()),
            (Stage::Validation, Some(field), rule),
            "{name} with `{empty}` empty: {e}"
        );
    }
}

/// A custom property is optional: "" is left out, as null is.
#[test]
fn empty_custom_properties_are_left_out() {
    let m = mapper(&format!(
        "{}properties = {{ from = \"/meta\" }}\n",
        one_field("game_type", "\"/g\"")
    ));
    let e = event_json(&map_value(
        &m,
        br#"{"meta":{"a":"","b":null,"c":"x","d":" ","e":[""]}}"#,
    ));
    assert_eq!(
        e,
        json!({"client_user_id": "u1", "event_name": "custom", "timestamp": 1702963200, "c": "x", "d": " ",
               "e": "[\"\"]"})
    );
    // A `properties` source that is "" is absent, as a missing one is.
    assert!(matches!(map_value(&m, br#"{"meta":""}"#), MapOutcome::Event(_)));
}

/// `keep_when` and `skip_when` see what a field sees: null, missing and "" are absent, which is
/// one of the values only when "" is listed.
#[test]
fn conditions_see_empty_as_absent() {
    let m = mapper(
        r#"
[[mapping]]
topics = ["t"]
keep_when = [{ from = "/op", in = ["c"] }]
skip_when = [{ from = "/tag", in = [""] }, { from = "header:source", in = ["replay", ""] }]
client_user_id = "/user"
event_name = { const = "custom" }
timestamp = { const = 1702963200 }
"#,
    );
    let outcome = |v: &str, headers: &[(&str, Option<&[u8]>)]| match map_with(&m, v.as_bytes(), None, headers) {
        MapOutcome::Event(_) => "event".to_string(),
        MapOutcome::Filtered { code, reason } => format!("{code}: {reason}"),
        MapOutcome::Failed(e) => panic!("{e}"),
    };
    let src: &[(&str, Option<&[u8]>)] = &[("source", Some(b"live"))];
    assert_eq!(outcome(r#"{"op":"c","user":"u","tag":"t"}"#, src), "event");
    assert_eq!(
        outcome(r#"{"op":"","user":"u","tag":"t"}"#, src),
        r#"keep_when: keep_when: `/op` is the string "" (absent), not one of "c""#
    );
    assert_eq!(
        outcome(r#"{"op":null,"user":"u","tag":"t"}"#, src),
        r#"keep_when: keep_when: `/op` is null (absent), not one of "c""#
    );
    for tag in [r#","tag":"""#, r#","tag":null"#, ""] {
        assert_eq!(
            outcome(&format!(r#"{{"op":"c","user":"u"{tag}}}"#), src)
                .split(':')
                .next(),
            Some("skip_when"),
            "{tag}"
        );
    }
    for h in [None, Some(&b""[..]), Some(&b"replay"[..])] {
        assert!(
            outcome(r#"{"op":"c","user":"u","tag":"t"}"#, &[("source", h)])
                .starts_with("skip_when: skip_when: `header:source`"),
            "{h:?}"
        );
    }
    assert!(
        outcome(r#"{"op":"c","user":"u","tag":"t"}"#, &[]).starts_with("skip_when"),
        "no header"
    );
}

/// A constant or a default of "" could only mean no value: refused at start-up, naming it.
#[test]
fn an_empty_const_or_default_is_refused_at_start_up() {
    for (spec, option) in [
        (r#"{ const = "" }"#, "const"),
        (r#"{ from = "/g", default = "" }"#, "default"),
    ] {
        let problems = compile(&one_field("game_type", spec)).unwrap_err();
        let p = &problems.problems()[0];
        assert_eq!((&p.at, p.option), (&At::Field("game_type"), Some(option)), "{p}");
        assert!(p.message.contains("absent, null and \"\" mean the same"), "{p}");
    }
}

// Issue 17, kind 3: tombstones can be filtered.

/// A tombstone (a key, no value) is dead-lettered by default; `tombstones = "filter"` filters it
/// with the reason `tombstone`, before `keep_when` and `skip_when` (which read the value it does
/// not have); the rules then filter with their own names.
#[test]
fn tombstones_are_dead_lettered_unless_the_mapping_filters_them() {
    let cdc = |tombstones: &str| {
        mapper(&format!(
            r#"
[[mapping]]
topics = ["t"]
{tombstones}
keep_when = [{{ from = "/op", in = ["c"] }}]
skip_when = [{{ from = "key", in = ["k-test"] }}]
client_user_id = "/after/user"
event_name = {{ from = "/after/kind", table = {{ signup = "register" }}, otherwise = "skip" }}
timestamp = {{ const = 1702963200 }}
"#
        ))
    };
    let tombstone = |m: &Mapper| {
        m.map(&SourceRecord {
            topic: "t",
            partition: 0,
            offset: 7,
            timestamp_ms: None,
            key: Some(br#"{"id":101}"#),
            value: None,
            headers: &[("trace", None)],
        })
        .into_owned()
    };
    for config in ["", r#"tombstones = "dead-letter""#] {
        let out = tombstone(&cdc(config));
        let e = failed(&out);
        assert_eq!(
            (e.stage, e.reason.as_str(), e.field.as_deref()),
            (Stage::Mapping, "tombstone", None)
        );
        assert!(
            e.message.contains(r#"`tombstones = "filter"`"#),
            "the message says how to filter: {e}"
        );
    }
    let m = cdc(r#"tombstones = "filter""#);
    match tombstone(&m) {
        MapOutcome::Filtered { code, reason } => {
            assert_eq!(code, "tombstone");
            assert_eq!(reason, r#"tombstone: the record has no value (tombstones = "filter")"#);
        }
        other => panic!("{other:?}"),
    }
    // Records with a value go on through the rules, each filtering under its own name.
    let code = |key: &[u8], v: &str| match map_with(&m, v.as_bytes(), Some(key), &[]) {
        MapOutcome::Filtered { code, .. } => code,
        other => panic!("{other:?}"),
    };
    assert_eq!(code(b"k", r#"{"op":"d","after":null}"#), "keep_when");
    assert_eq!(code(b"k-test", r#"{"op":"c","after":{"user":"u"}}"#), "skip_when");
    assert_eq!(code(b"k", r#"{"op":"c","after":{"user":"u","kind":"x"}}"#), "otherwise");
    // An empty value is a value (not JSON), not a tombstone; a topic without a mapping has none.
    assert_eq!(failed(&map_with(&m, b"", None, &[])).reason, "not_json");
    let elsewhere = m.map(&SourceRecord {
        topic: "other",
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        key: None,
        value: None,
        headers: &[],
    });
    assert_eq!(failed(&elsewhere).reason, "no_mapping");
    // Any other word is refused at start-up, naming the choices.
    let err = toml::from_str::<Doc>("[[mapping]]\ntopics = [\"t\"]\ntombstones = \"drop\"\n")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("dead-letter") && err.contains("filter"), "{err}");
}

/// Times are read in exact decimal arithmetic (issue 17, found by a new user's trial): through a
/// binary64 the default reader let `946684799999999999` ns (a nanosecond before 2000-01-01) pass
/// the window as 2000-01-01, lost a millisecond of `1764460800001` ms, and wrote
/// `1702963200.001` s as `…000` ms. The same instant is judged the same by every reader.
#[test]
fn times_are_read_exactly_whatever_the_reader() {
    let ms = ContractOptions {
        timestamp_unit: TimestampUnit::Milliseconds,
        ..Default::default()
    };
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, Result<i64, &str>)> = vec![
        (r#""/ts""#, r#"{"ts":946684799999999999}"#, Err("time")),
        (r#""/ts""#, r#"{"ts":"946684799999999999"}"#, Err("time")),
        (r#""/ts""#, r#"{"ts":946684799.9999999999}"#, Err("time")),
        (r#""/ts""#, r#"{"ts":946684799999}"#, Err("time")),
        (r#""/ts""#, r#"{"ts":946684800000000000}"#, Ok(946684800000)),
        (r#"{ from = "/ts", time = "nanoseconds" }"#, r#"{"ts":946684799999999999}"#, Err("time")),
        (r#""/ts""#, r#"{"ts":1764460800001}"#, Ok(1764460800001)),
        (r#""/ts""#, r#"{"ts":1702963200.123}"#, Ok(1702963200123)),
        (r#""/ts""#, r#"{"ts":"1702963200.001"}"#, Ok(1702963200001)),
        (r#"{ from = "/ts", time = "seconds" }"#, r#"{"ts":1702963200.001}"#, Ok(1702963200001)),
        (r#"{ from = "/ts", time = "seconds" }"#, r#"{"ts":"1702963200.009"}"#, Ok(1702963200009)),
        (r#"{ from = "/ts", time = "seconds" }"#, r#"{"ts":1.702963200009e9}"#, Ok(1702963200009)),
        (r#"{ from = "/ts", time = "microseconds" }"#, r#"{"ts":1702963200001999.9}"#, Ok(1702963200001)),
        // By its size: 99999999999.5 is seconds' last size below 10^11 as written, not 10^11 ms.
        (r#""/ts""#, r#"{"ts":1702963200999.9999}"#, Ok(1702963200999)),
        (r#""/ts""#, r#"{"ts":1e40}"#, Err("time")),
    ];
    for (spec, value, want) in cases {
        let m = Mapper::compile(&configs(&one_field("timestamp", spec)), &ms).unwrap();
        let out = map_value(&m, value.as_bytes());
        let label = format!("timestamp = {spec} on {value}");
        match want {
            Ok(t) => assert_eq!(event_json(&out)["timestamp"], json!(t), "{label}"),
            Err(reason) => {
                let e = failed(&out);
                assert_eq!(e.reason, reason, "{label}: {e}");
            }
        }
    }
    // The refusal prints the exact instant read, not a binary64's neighbour.
    let m = Mapper::compile(&configs(&one_field("timestamp", r#""/ts""#)), &ms).unwrap();
    let out = map_value(&m, br#"{"ts":946684799999}"#);
    let e = failed(&out);
    assert!(e.message.contains("1999-12-31T23:59:59.999Z"), "{e}");
}

/// Start-up refusals a new user's trial found missing: a constant time outside the window (every
/// record would be refused), a `const`/`default` that is no value once trimmed, a `table` key or
/// an `in` value no value can meet (`""` is absent before they are read; `trim` removes the white
/// space around a value), and a window empty as the clock reads now. Each names the option.
#[test]
fn what_could_only_refuse_or_never_match_fails_at_start_up() {
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, &str, &str)> = vec![
        ("timestamp", r#"{ const = 20422 }"#, "field `timestamp`: option `const`",
         "the number 20422 read with the default `time = \"auto\"`, by its size as seconds is 1970-01-01T05:40:22Z, outside the plausible window"),
        ("timestamp", r#"{ const = "1999-12-31T23:59:59Z", time = "rfc3339" }"#, "field `timestamp`: option `const`", "every record would be refused"),
        ("click_id", r#"{ from = "/c", default = "   ", trim = true }"#, "field `click_id`: option `default`", "is no default once trimmed"),
        ("game_type", r#"{ const = "  ", trim = true }"#, "field `game_type`: option `const`", "is no value once trimmed"),
        ("game_type", r#"{ from = "/gt", table = { "" = "unknown", a = "A" }, otherwise = "keep" }"#, "field `game_type`: option `table`", "\"\" can never match"),
        ("game_type", r#"{ from = "/gt", trim = true, table = { " a" = "A" } }"#, "field `game_type`: option `table`", "`trim` removes the white space"),
        ("is_crypto", r#"{ from = "/cc", in = ["", "BTC"] }"#, "field `is_crypto`: option `in`", "\"\" can never match"),
    ];
    for (field, spec, key, words) in cases {
        let errs = compile(&one_field(field, spec))
            .err()
            .unwrap_or_else(|| panic!("{field} = {spec} compiled"));
        let text = errs.to_string();
        assert!(
            text.contains(key) && text.contains(words),
            "{field} = {spec}: want {key}: {words} in {text}"
        );
    }
    // Still fine: a constant time inside the window, white space kept without `trim`, a table
    // key with white space when nothing trims.
    for (field, spec) in [
        ("timestamp", r#"{ const = 1702963200 }"#),
        ("game_type", r#"{ const = "  " }"#),
        ("game_type", r#"{ from = "/gt", table = { " a" = "A" } }"#),
        ("is_crypto", r#"{ from = "/cc", in = ["BTC"] }"#),
    ] {
        assert!(compile(&one_field(field, spec)).is_ok(), "{field} = {spec}");
    }
    let mixed = format!(
        "{}timestamp_window = {{ earliest = \"2030-01-01\", latest = \"now\" }}\n",
        one_field("timestamp", r#""/ts""#)
    );
    let Err(errs) = compile(&mixed) else {
        panic!("a window empty as the clock reads now compiled")
    };
    let text = errs.to_string();
    assert!(
        text.contains("timestamp_window") && text.contains("as the clock reads now"),
        "{text}"
    );
}
