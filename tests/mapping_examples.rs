//! Each folder of `examples/` is a partner shape: its configuration must load, and
//! `datapulse-bridge map` over its `records.jsonl` must print exactly `expected.jsonl` on stdout
//! and `expected.stderr` (the filtered and failed records, by line) on stderr.
//!
//! `BLESS=1 cargo test --test mapping_examples` rewrites the expected files; review the diff.

use datapulse_bridge::cli::{map as run_map, MapArgs};
use datapulse_bridge::mapping::Summary;
use std::path::{Path, PathBuf};

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)
}

fn run_example(name: &str) -> (String, String, Summary) {
    let dir = dir(name);
    let args = MapArgs {
        config: dir.join("datapulse-bridge.toml"),
        topic: None,
        file: Some(dir.join("records.jsonl")),
    };
    let input = std::io::BufReader::new(std::fs::File::open(dir.join("records.jsonl")).unwrap());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let summary = run_map(&args, input, &mut out, &mut err).unwrap_or_else(|e| panic!("{name}: {e}"));
    (
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
        summary,
    )
}

fn check(name: &str, min_events: usize) {
    let dir = dir(name);
    let (out, err, summary) = run_example(name);
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(dir.join("expected.jsonl"), &out).unwrap();
        std::fs::write(dir.join("expected.stderr"), &err).unwrap();
    }
    let expected = std::fs::read_to_string(dir.join("expected.jsonl")).unwrap();
    let expected_err = std::fs::read_to_string(dir.join("expected.stderr")).unwrap();
    assert_eq!(out, expected, "{name}: stdout");
    assert_eq!(err, expected_err, "{name}: stderr");
    // Each example shows good records, bad ones, and so a non-zero exit.
    assert!(summary.events >= min_events, "{name}: {summary:?}");
    assert!(summary.failed > 0, "{name}: the examples include bad records");
    // Every event line is what the API accepts: it reads back and passes the contract rules.
    let contract = datapulse_bridge::config::load(&dir.join("datapulse-bridge.toml"), true)
        .unwrap()
        .config
        .api
        .contract();
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let e = datapulse_bridge::event::Event::from_json(v.as_object().unwrap()).unwrap();
        assert!(e.validate(&contract).is_empty(), "{name}: {line}");
    }
}

#[test]
fn flat_seconds() {
    check("flat-seconds", 7);
}

#[test]
fn nested_wallet() {
    check("nested-wallet", 3);
}

#[test]
fn cdc_envelope() {
    check("cdc-envelope", 2);
}
