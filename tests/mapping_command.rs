//! `datapulse-bridge map` as partners run it in CI: its exit status and its use of `--topic`.

use datapulse_bridge::cli::{map as run_map, run_map_command, MapArgs, MapCommandError};
use datapulse_bridge::config::ConfigProblem;
use datapulse_bridge::mapping::At;
use datapulse_bridge::settings::Problem;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)
}

#[test]
fn exit_status_says_whether_a_record_failed() {
    let dir = example("flat-seconds");
    let config = dir.join("datapulse-bridge.toml");
    // The example includes bad records: non-zero.
    let bad = run_map_command(MapArgs {
        config: config.clone(),
        topic: None,
        file: Some(dir.join("records.jsonl")),
    });
    assert_eq!(bad, ExitCode::FAILURE);
    // Only its good and filtered lines: zero.
    let records = std::fs::read_to_string(dir.join("records.jsonl")).unwrap();
    let mut good = tempfile::NamedTempFile::new().unwrap();
    for line in records.lines().take(9) {
        writeln!(good, "{line}").unwrap();
    }
    let ok = run_map_command(MapArgs {
        config: config.clone(),
        topic: None,
        file: Some(good.path().to_path_buf()),
    });
    assert_eq!(ok, ExitCode::SUCCESS);
    // A configuration that cannot be read: 2, distinct from a failed record.
    let missing = run_map_command(MapArgs {
        config: dir.join("no-such.toml"),
        topic: None,
        file: Some(good.path().to_path_buf()),
    });
    assert_eq!(missing, ExitCode::from(2));
}

#[test]
fn topic_flag_picks_the_mapping() {
    let dir = example("nested-wallet");
    let round = r#"{"kind":"ROUND_SETTLED","player":{"id":"p"},"round":{"id":"r","game":{"type":"SLOT","provider":"EA"},"stake":"1","result":"WIN","net":"2"},"currency":"EUR","at":1702963200000}"#;
    let run = |topic: Option<&str>| {
        let args = MapArgs {
            config: dir.join("datapulse-bridge.toml"),
            topic: topic.map(str::to_string),
            file: None,
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let s = run_map(&args, round.as_bytes(), &mut out, &mut err).unwrap();
        (s, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    };
    // Default: the first of kafka.topics (the wallet mapping), where this record lacks the fields.
    let (s, _, err) = run(None);
    assert_eq!(s.failed, 1, "{err}");
    assert!(
        err.contains("line 1: failed at validation on field `timestamp` (required)"),
        "{err}"
    );
    let (s, out, err) = run(Some("games.rounds"));
    assert_eq!((s.events, s.failed), (1, 0), "{err}");
    assert!(out.contains(r#""bet_result":"win""#), "{out}");
}

#[test]
fn mapping_mistakes_stop_start_up_naming_the_mapping_and_the_field() {
    let base = std::fs::read_to_string(example("flat-seconds").join("datapulse-bridge.toml")).unwrap();
    type Want = fn(&ConfigProblem) -> bool;
    let cases: [(String, Want); 4] = [
        // A misspelt API field, a misspelt option, a bad option value, a bad source.
        (
            base.replace("click_id = \"/click_id\"", "clik_id = \"/click_id\""),
            |p| matches!(p, ConfigProblem::Key { key, problem: Problem::UnknownKey(_), .. } if key == "mapping.0.clik_id"),
        ),
        (
            base.replace("{ from = \"/ts\", time = \"seconds\" }", "{ frm = \"/ts\" }"),
            |p| {
                matches!(p, ConfigProblem::Key { key, problem: Problem::UnknownKey(_), .. }
                    if key == "mapping.0.timestamp.frm")
            },
        ),
        (base.replace("time = \"seconds\"", "time = \"hours\""), |p| {
            matches!(p, ConfigProblem::Key { key, problem: Problem::WrongType(_), .. }
                    if key == "mapping.0.timestamp.time")
        }),
        (base.replace("user_agent = \"/ua\"", "user_agent = \"ua\""), |p| {
            matches!(p, ConfigProblem::Mapping { problem, .. }
                    if (problem.mapping, &problem.at, problem.option) == (0, &At::Field("user_agent"), Some("from"))
                        && problem.label == "mapping[0] (topics acme.events)")
        }),
    ];
    for (text, want) in cases {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let args = MapArgs {
            config: f.path().to_path_buf(),
            topic: None,
            file: None,
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let e = run_map(&args, &b""[..], &mut out, &mut err).unwrap_err();
        let MapCommandError::Config(config) = &e else {
            panic!("a configuration error, not {e:?}");
        };
        assert!(config.problems().iter().any(want), "{config:?}");
    }
}

/// Issue 17: `map` gives `run`'s verdict on implausible times (reason `time`, the value and the
/// reader named) and on the currency table (`VED` is a current code, `HRK` a withdrawn one).
#[test]
fn map_refuses_implausible_times_and_reads_the_maintained_currency_table() {
    let dir = example("flat-seconds");
    let base = std::fs::read_to_string(dir.join("datapulse-bridge.toml")).unwrap();
    // The default time reader, as in the issue.
    let config = base.replace(
        r#"timestamp = { from = "/ts", time = "seconds" }"#,
        r#"timestamp = "/ts""#,
    );
    assert_ne!(config, base);
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(config.as_bytes()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let deposit = |ts: u64, ccy: &str| {
        format!(
            r#"{{"event_type":"deposit","user_id":"u-1","click_id":"c","ip":"203.0.113.10","txn_id":"d-{ts}-{ccy}","amount":5,"currency":"{ccy}","ts":{ts}}}"#
        )
    };
    let input = [
        deposit(20422, "EUR"),
        deposit(now, "VED"),
        deposit(now, "HRK"),
        deposit(now + 3 * 86_400, "EUR"),
        deposit(1_702_963_200, "ves"),
    ]
    .join("\n");
    let args = MapArgs {
        config: file.path().to_path_buf(),
        topic: None,
        file: None,
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let s = run_map(&args, input.as_bytes(), &mut out, &mut err).unwrap();
    let (out, err) = (String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap());
    assert_eq!((s.events, s.failed), (2, 3), "{err}");
    assert!(
        err.contains("line 1: failed at mapping on field `timestamp` (time): the number 20422 read with the default `time = \"auto\"`, by its size as seconds is 1970-01-01T05:40:22Z"),
        "{err}"
    );
    assert!(
        err.contains("line 3: failed at validation on field `currency` (currency)"),
        "{err}"
    );
    assert!(
        err.contains("line 4: failed at mapping on field `timestamp` (time)"),
        "{err}"
    );
    assert!(
        out.contains(r#""currency":"VED""#) && out.contains(r#""currency":"VES""#),
        "{out}"
    );
    assert!(!out.contains("20422"), "{out}");
}
