//! `docs/mapping.md` cannot drift from the code: every TOML snippet in it compiles as a mapping,
//! and every key, option and option value the code accepts appears in it.

use datapulse_bridge::event::{ContractOptions, KNOWN_FIELDS};
use datapulse_bridge::mapping::{
    Condition, FieldOptions, Mapper, MappingConfig, PropertiesSpec, TimeWindowSpec, CONDITION_OPTIONS, FIELD_OPTIONS,
    MAPPING_KEYS, NAMED_SOURCES, PROPERTIES_OPTIONS, TIME_WINDOW_OPTIONS,
};
use serde_json::json;

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/mapping.md")).unwrap()
}

fn toml_snippets(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in doc.lines() {
        match (&mut cur, line.trim_start()) {
            (None, "```toml") => cur = Some(String::new()),
            (Some(s), "```") => {
                out.push(std::mem::take(s));
                cur = None;
            }
            (Some(s), _) => {
                s.push_str(line);
                s.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

#[derive(serde::Deserialize)]
struct Doc {
    mapping: Vec<MappingConfig>,
}

#[test]
fn every_toml_snippet_compiles() {
    let snippets = toml_snippets(&doc());
    assert!(snippets.len() >= 10, "{}", snippets.len());
    for s in snippets {
        let d: Doc = toml::from_str(&s).unwrap_or_else(|e| panic!("{e}\nin:\n{s}"));
        if let Err(e) = Mapper::compile(&d.mapping, &ContractOptions::default()) {
            panic!("{e}\nin:\n{s}");
        }
    }
}

#[test]
fn every_option_is_documented() {
    let doc = doc();
    let mut missing = Vec::new();
    let names = MAPPING_KEYS
        .iter()
        .chain(KNOWN_FIELDS)
        .chain(FIELD_OPTIONS)
        .chain(PROPERTIES_OPTIONS)
        .chain(CONDITION_OPTIONS)
        .chain(TIME_WINDOW_OPTIONS);
    for n in names {
        if !doc.contains(&format!("`{n}`")) {
            missing.push(n.to_string());
        }
    }
    for s in NAMED_SOURCES {
        if !doc.contains(&format!("`{s}")) {
            missing.push(s.to_string());
        }
    }
    // Every value of every enumerated option, as the TOML writes it.
    let values = [
        "upper",
        "lower",
        "dead-letter",
        "skip",
        "keep",
        "string",
        "number",
        "integer",
        "boolean",
        "auto",
        "seconds",
        "milliseconds",
        "microseconds",
        "nanoseconds",
        "rfc3339",
        "iso8601",
        "negate",
        "positive",
        "negative",
        "filter",
    ];
    for v in values {
        if !doc.contains(&format!("\"{v}\"")) {
            missing.push(format!("\"{v}\""));
        }
    }
    assert!(missing.is_empty(), "undocumented: {missing:?}");
}

/// The option lists above are the serde field names: a new option breaks this test until it is
/// added to the list (and so to the doc).
#[test]
fn option_lists_match_the_config_types() {
    fn keys<T: serde::Serialize>(v: &T) -> Vec<String> {
        let mut k: Vec<String> = toml::Table::try_from(v).unwrap().keys().cloned().collect();
        k.sort();
        k
    }
    fn sorted(s: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = s.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }
    let field = FieldOptions {
        from: Some("/a".into()),
        constant: Some(json!(1)),
        expr: Some(".".into()),
        default: Some(json!(1)),
        trim: true,
        case: Some(datapulse_bridge::mapping::Case::Upper),
        table: Some([("a".to_string(), json!("b"))].into()),
        otherwise: Some(datapulse_bridge::mapping::Otherwise::Keep),
        fallback: Some(json!("x")),
        as_type: Some(datapulse_bridge::mapping::AsType::String),
        time: Some(datapulse_bridge::mapping::TimeSource::Auto),
        time_format: Some("[year]".into()),
        one_of: Some(vec![json!("BTC")]),
        sign: Some(datapulse_bridge::mapping::Sign::Negate),
        sign_for: vec!["loss".into()],
    };
    assert_eq!(keys(&field), sorted(FIELD_OPTIONS));
    let props = PropertiesSpec {
        from: Some("/m".into()),
        fields: Some(vec!["a".into()]),
        remaining: true,
        except: vec!["b".into()],
        prefix: Some("p_".into()),
        rename: [("a".to_string(), "c".to_string())].into(),
    };
    assert_eq!(keys(&props), sorted(PROPERTIES_OPTIONS));
    let cond = Condition {
        from: "/op".into(),
        one_of: vec![json!("c")],
    };
    assert_eq!(keys(&cond), sorted(CONDITION_OPTIONS));
    let window = TimeWindowSpec {
        earliest: Some("2000-01-01".into()),
        latest: Some("now + 1d".into()),
    };
    assert_eq!(keys(&window), sorted(TIME_WINDOW_OPTIONS));
    let spec = Some(datapulse_bridge::mapping::FieldSpec::From("/x".into()));
    let mapping = MappingConfig {
        topics: vec!["t".into()],
        topic_pattern: Some("t".into()),
        keep_when: vec![cond.clone()],
        skip_when: vec![cond],
        tombstones: Some(datapulse_bridge::mapping::Tombstones::Filter),
        client_user_id: spec.clone(),
        event_name: spec.clone(),
        timestamp: spec.clone(),
        click_id: spec.clone(),
        ip_address: spec.clone(),
        user_agent: spec.clone(),
        game_type: spec.clone(),
        game_provider: spec.clone(),
        transaction_id: spec.clone(),
        amount: spec.clone(),
        currency: spec.clone(),
        is_crypto: spec.clone(),
        bet_result: spec.clone(),
        bet_result_amount: spec.clone(),
        parent_transaction_id: spec,
        properties: vec![props],
        timestamp_window: Some(window.clone()),
    };
    let all: Vec<&str> = MAPPING_KEYS.iter().chain(KNOWN_FIELDS).copied().collect();
    assert_eq!(keys(&mapping), sorted(&all));
}

/// The part of the doc from `## {name}` to the next `## ` heading.
fn section(doc: &str, name: &str) -> String {
    let heading = format!("\n## {name}\n");
    let start = doc.find(&heading).unwrap_or_else(|| panic!("no section `## {name}`")) + heading.len();
    let rest = &doc[start..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
}

/// The first fenced block of `lang` in `text`.
fn block(text: &str, lang: &str) -> String {
    let open = format!("```{lang}\n");
    let start = text.find(&open).unwrap_or_else(|| panic!("no ```{lang} block")) + open.len();
    text[start..start + text[start..].find("```").unwrap()].to_string()
}

/// "How values are read" shows what `map` really prints for its example: exact numbers, the
/// envelope, a record with a key twice refused naming where.
#[test]
fn how_values_are_read_is_what_map_prints() {
    let part = section(&doc(), "How values are read");
    let d: Doc = toml::from_str(&block(&part, "toml")).unwrap();
    let mapper = Mapper::compile(&d.mapping, &ContractOptions::default()).unwrap();
    let input = block(&part, "jsonl");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let limit = datapulse_bridge::mapping::max_event_bytes(1024 * 1024);
    let summary =
        datapulse_bridge::mapping::run_map(&mapper, limit, None, input.as_bytes(), &mut out, &mut err).unwrap();
    let err = String::from_utf8(err).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), block(&part, "json"), "{err}");
    assert_eq!((summary.events, summary.failed), (2, 1), "{err}");
    assert!(
        err.contains("line 3: failed at mapping on field `/player` (duplicate_key)"),
        "{err}"
    );
    for words in [
        "Numbers are exact",
        "byte order mark",
        "key twice",
        "Errors name where",
        "`value_base64`",
        "Times must be plausible",
        "2000-01-01T00:00:00Z ≤ t ≤ now + 1 day",
    ] {
        assert!(part.contains(words), "{words}");
    }
}

/// Every reason the reader and the delivery check give is in the list of reasons.
#[test]
fn reasons_of_issue_16_are_listed() {
    let doc = doc();
    let list = section(&doc, "What happens to a record");
    for reason in ["`duplicate_key`", "`too_large`", "`not_json`", "`dp.field`"] {
        assert!(list.contains(reason), "{reason}");
    }
}
