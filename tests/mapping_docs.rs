//! `docs/mapping.md` cannot drift from the code: every TOML snippet in it compiles as a mapping,
//! and every key, option and option value the code accepts appears in it.

use datapulse_bridge::event::{ContractOptions, KNOWN_FIELDS};
use datapulse_bridge::mapping::{
    Condition, FieldOptions, Mapper, MappingConfig, PropertiesSpec, CONDITION_OPTIONS, FIELD_OPTIONS, MAPPING_KEYS,
    NAMED_SOURCES, PROPERTIES_OPTIONS,
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
        .chain(CONDITION_OPTIONS);
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
    let spec = Some(datapulse_bridge::mapping::FieldSpec::From("/x".into()));
    let mapping = MappingConfig {
        topics: vec!["t".into()],
        topic_pattern: Some("t".into()),
        keep_when: vec![cond.clone()],
        skip_when: vec![cond],
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
    };
    let all: Vec<&str> = MAPPING_KEYS.iter().chain(KNOWN_FIELDS).copied().collect();
    assert_eq!(keys(&mapping), sorted(&all));
}
