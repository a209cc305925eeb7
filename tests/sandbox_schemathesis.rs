//! Schema-driven test: schemathesis generates requests from `docs/openapi.yaml` (valid and
//! invalid ones) against the sandbox binary and checks every answer against the document: no
//! 5xx, schema-valid bodies accepted, schema-invalid ones rejected, responses as documented,
//! 401 without the key. Needs the schemathesis CLI (`pip install schemathesis`).

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

const KEY: &str = "dp_schema_key";

/// JSON Schema's "integer" admits 5.0; the contract (and the sandbox) want an integer literal in
/// the JSON, which no schema keyword can say. Generated integral floats become integers.
const HOOKS: &str = r#"
import schemathesis

def _integral_timestamp(event):
    if isinstance(event, dict):
        ts = event.get("timestamp")
        if isinstance(ts, float) and ts.is_integer():
            event["timestamp"] = int(ts)

@schemathesis.hook
def map_body(context, body):
    for event in body if isinstance(body, list) else [body]:
        _integral_timestamp(event)
    return body
"#;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn schemathesis_finds_nothing_contradicting_the_openapi_document() {
    let version = Command::new("schemathesis").arg("--version").output();
    match version {
        Ok(out) if out.status.success() => {}
        _ => panic!(
            "the schemathesis CLI is not installed (or does not run): run `pip install schemathesis` \
             and make sure `schemathesis` is on PATH"
        ),
    }

    let mut sandbox = Child(
        Command::new(env!("CARGO_BIN_EXE_datapulse-bridge"))
            .args([
                "sandbox",
                "--listen",
                "127.0.0.1:0",
                "--rate-limit",
                "0",
                "--api-key",
                KEY,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the sandbox binary"),
    );
    let mut line = String::new();
    std::io::BufReader::new(sandbox.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("sandbox listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();

    let dir = tempfile::tempdir().unwrap();
    let hooks = dir.path().join("hooks.py");
    std::fs::write(&hooks, HOOKS).unwrap();
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
    let mut run = Command::new("schemathesis");
    run.args(["run", spec, "--url", &url, "-H", &format!("X-API-Key: {KEY}")])
        .args(["--checks", "all", "--max-examples", "40", "--seed", "20261126"])
        .args(["--generation-database", "none", "--no-color", "--request-timeout", "10"])
        .args(["--report-dir", dir.path().to_str().unwrap()])
        .env("SCHEMATHESIS_HOOKS", &hooks)
        .current_dir(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let out = rt.block_on(async {
        let child = tokio::process::Command::from(run).kill_on_drop(true).output();
        tokio::time::timeout(Duration::from_secs(180), child)
            .await
            .expect("schemathesis finished within 3 minutes")
            .expect("schemathesis runs")
    });
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    assert!(text.contains("No issues found"), "{text}");

    // It really exercised the sandbox, and nothing there was a 5xx (none is injected here).
    let stats: datapulse_bridge::sandbox::Stats = rt.block_on(async {
        reqwest::get(format!("{url}/_sandbox/stats"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert!(stats.requests > 100, "{stats:?}");
    assert!(stats.accepted_events > 0, "{stats:?}");
    assert!(stats.by_status.get(&400).is_some_and(|n| *n > 0), "{stats:?}");
    assert!(stats.by_status.keys().all(|s| *s < 500), "{:?}", stats.by_status);
    assert!(stats.injected_faults.is_empty());
}
