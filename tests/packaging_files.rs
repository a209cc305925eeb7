//! The packaging files outside the chart: the Dockerfile builds what CI builds, docker-compose.yml
//! wires a system whose bridge configuration `datapulse-bridge check` accepts, the dashboard and
//! alert rules parse and use only the bridge's metric names, and every environment variable and
//! configuration key the compose file, the chart and the docs name exists in the config schema.
//!
//! PromQL is parsed by the PyPI package promql-parser (`pip install promql-parser==0.11.0`).
//! Not run here (no container engine, no Prometheus): `docker build`, `docker compose up`,
//! `promtool check rules`. See docs/deployment.md.

#[path = "packaging_common/mod.rs"]
mod common;

use common::*;
use std::collections::BTreeSet;

/// The release build CI runs (.ci/run); the image must be built by the same command.
const RELEASE_BUILD: &str = "cargo build --release --locked";

/// The bridge's metric names as the packaging uses them (histograms without their suffixes).
const METRICS: &[&str] = &[
    "datapulse_bridge_records_consumed_total",
    "datapulse_bridge_records_finished_total",
    "datapulse_bridge_records_in_flight",
    "datapulse_bridge_partition_lag",
    "datapulse_bridge_partition_committed_offset",
    "datapulse_bridge_oldest_unfinished_record_age_seconds",
    "datapulse_bridge_ready",
    "datapulse_bridge_rebalances_total",
    "datapulse_bridge_dead_letters_total",
    "datapulse_bridge_api_requests_total",
    "datapulse_bridge_api_request_duration_seconds",
    "datapulse_bridge_api_events_per_request",
    "datapulse_bridge_api_retries_total",
    "datapulse_bridge_rate_budget_wait_seconds_total",
    "datapulse_bridge_auth_halted",
    "datapulse_bridge_build_info",
];
const HISTOGRAMS: &[&str] = &[
    "datapulse_bridge_api_request_duration_seconds",
    "datapulse_bridge_api_events_per_request",
];

fn metric_names(expr: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"datapulse_bridge_[a-z_]+").unwrap();
    re.find_iter(expr)
        .map(|m| {
            let name = m.as_str();
            for h in HISTOGRAMS {
                for suffix in ["_bucket", "_sum", "_count"] {
                    if name == format!("{h}{suffix}") {
                        return h.to_string();
                    }
                }
            }
            name.to_string()
        })
        .collect()
}

/// Parses each expression with a real PromQL parser (scripts/promql-check.py).
fn assert_promql_parses(exprs: &[String]) {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .arg(repo().join("scripts/promql-check.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs scripts/promql-check.py");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(exprs).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => {}
        Some(2) => panic!("{report}(CI installs it: pip install -r scripts/packaging-requirements.txt)"),
        _ => panic!("PromQL that does not parse:\n{report}"),
    }
}

/// Dockerfile instructions with continuation lines joined, comments dropped.
fn dockerfile_instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        cur.push_str(t.trim_end_matches('\\').trim());
        cur.push(' ');
        if !t.ends_with('\\') {
            out.push(cur.trim().to_string());
            cur.clear();
        }
    }
    out
}

#[test]
fn dockerfile_builds_what_ci_builds() {
    let ins = dockerfile_instructions();
    let stages: Vec<usize> = ins
        .iter()
        .enumerate()
        .filter(|(_, i)| i.starts_with("FROM "))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage: {ins:#?}");
    let (build, runtime) = (&ins[stages[0]..stages[1]], &ins[stages[1]..]);

    // Exactly one cargo invocation, and it is CI's release build, word for word.
    let cargo: Vec<&String> = build.iter().filter(|i| i.contains("cargo ")).collect();
    assert_eq!(cargo.len(), 1, "{cargo:#?}");
    let commands: Vec<&str> = cargo[0]
        .split("&&")
        .map(str::trim)
        .filter(|c| c.contains("cargo "))
        .collect();
    let last = commands.last().unwrap();
    let from = last.find("cargo ").unwrap();
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(
        &last[from..],
        RELEASE_BUILD,
        "the image must build exactly what CI builds"
    );
    if let Ok(mut ci) = std::fs::read_to_string(repo().join(".ci/run")) {
        // .ci/run and the scripts it calls.
        let called = regex::Regex::new(r"scripts/[A-Za-z0-9_.-]+\.sh").unwrap();
        for script in called.find_iter(&ci.clone()) {
            ci.push_str(&std::fs::read_to_string(repo().join(script.as_str())).unwrap_or_default());
        }
        assert!(
            ci.contains(RELEASE_BUILD),
            "CI (.ci/run and the scripts it calls) does not run `{RELEASE_BUILD}`, the image's build"
        );
    } else {
        eprintln!("note: no .ci/run in this tree; only the Dockerfile side was checked");
    }

    // The runtime stage: small base, CA certificates, numeric non-root user, the binary as entrypoint.
    assert!(runtime[0].contains("debian:bookworm-slim") || runtime[0].contains("distroless/cc"));
    assert!(runtime.iter().any(|i| i.contains("ca-certificates")));
    let user = runtime.iter().find(|i| i.starts_with("USER ")).expect("USER");
    let uid: u32 = user[5..].split(':').next().unwrap().parse().expect("numeric USER");
    assert_ne!(uid, 0);
    assert!(runtime.contains(&r#"ENTRYPOINT ["/usr/local/bin/datapulse-bridge"]"#.to_string()));
    let cmd = runtime.iter().find(|i| i.starts_with("CMD ")).expect("CMD");
    assert!(cmd.starts_with(r#"CMD ["run", "--config""#), "{cmd}");
    assert!(runtime
        .iter()
        .any(|i| i.starts_with("COPY --from=build") && i.contains("/usr/local/bin/datapulse-bridge")));

    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target/"));
}

#[test]
fn dashboard_parses_and_uses_known_metrics() {
    let dash: serde_json::Value = serde_json::from_str(&read("deploy/grafana/datapulse-bridge.json")).unwrap();
    assert_eq!(dash["uid"], "datapulse-bridge");
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id {}", p["id"]);
        assert!(p["gridPos"]["w"].as_u64().unwrap() <= 24);
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            assert!(!expr.is_empty());
            exprs.push(expr.to_string());
            used.extend(metric_names(expr));
        }
    }
    assert_promql_parses(&exprs);
    for m in &used {
        assert!(METRICS.contains(&m.as_str()), "dashboard uses unknown metric {m}");
    }
    // Outcomes, lag, budget, latency, errors: the dashboard shows every metric but the committed
    // offset's absolute value (shown as its rate) — i.e. all of them.
    for m in METRICS {
        assert!(used.contains(*m), "dashboard does not show {m}");
    }
}

#[test]
fn alert_rules_parse_and_match_the_chart_copy() {
    let text = read("deploy/prometheus/alerts.yaml");
    assert_eq!(
        text,
        read("helm/datapulse-bridge/files/alerts.yaml"),
        "the chart's PrometheusRule must ship the same rules"
    );
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let ops = read("docs/operations.md").to_lowercase();
    let mut alerts = BTreeSet::new();
    let mut exprs = Vec::new();
    for g in doc["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = r["alert"].as_str().expect("alert name");
            alerts.insert(name.to_string());
            let expr = r["expr"].as_str().unwrap();
            exprs.push(expr.to_string());
            let names = metric_names(expr);
            // The one alert on Prometheus' own `up` watches the bridge's scrape job.
            let on_up = expr.contains(r#"up{job="datapulse-bridge"}"#);
            assert!(!names.is_empty() || on_up, "{name} uses no bridge metric");
            for m in names {
                assert!(METRICS.contains(&m.as_str()), "{name} uses unknown metric {m}");
            }
            assert!(["warning", "critical"].contains(&r["labels"]["severity"].as_str().unwrap()));
            assert!(r["for"].as_str().is_some(), "{name} has no `for`");
            let runbook = r["annotations"]["runbook"].as_str().unwrap();
            let anchor = runbook
                .strip_prefix("docs/operations.md#")
                .expect("runbook in docs/operations.md");
            assert_eq!(anchor, name.to_lowercase());
            assert!(
                ops.contains(&format!("### {anchor}")),
                "docs/operations.md has no runbook for {name}"
            );
        }
    }
    assert_promql_parses(&exprs);
    for needed in [
        "DataPulseBridgeLagGrowing",
        "DataPulseBridgeOldestRecordTooOld",
        "DataPulseBridgeAuthHalted",
        "DataPulseBridgeDeadLetterRate",
        "DataPulseBridgeRateLimited",
        "DataPulseBridgeTargetDown",
    ] {
        assert!(alerts.contains(needed), "missing alert {needed}");
    }
}

fn compose() -> serde_norway::Value {
    serde_norway::from_str(&read("docker-compose.yml")).unwrap()
}

/// docker-compose.yml follows the Compose Specification: parsed and validated by the PyPI package
/// compose-spec (bindings of the Rust crate compose_spec), which refuses unknown keys and values.
#[test]
fn compose_file_follows_the_compose_specification() {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys\ntry:\n import compose_spec\nexcept ImportError:\n sys.exit(2)\n\
             p = compose_spec.PyCompose.from_yaml(open(sys.argv[1]).read())\np.validate()\n\
             print(' '.join(p.service_names()))",
        ])
        .arg(repo().join("docker-compose.yml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(2) => panic!("compose-spec is not installed (pip install -r scripts/packaging-requirements.txt)"),
        _ => panic!("docker-compose.yml is not a valid Compose file:\n{stderr}"),
    }
    let services = String::from_utf8_lossy(&out.stdout);
    assert!(
        services.contains("bridge") && services.contains("sandbox"),
        "{services}"
    );
}

fn strings(v: &serde_norway::Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn compose_file_wires_the_system() {
    let c = compose();
    let s = &c["services"];
    for name in [
        "kafka",
        "redis",
        "sandbox",
        "bridge",
        "generator",
        "prometheus",
        "grafana",
    ] {
        assert!(s[name].is_mapping(), "service {name} missing");
    }
    assert!(s["kafka"]["image"].as_str().unwrap().starts_with("apache/kafka:"));
    assert_eq!(s["kafka"]["environment"]["KAFKA_PROCESS_ROLES"], "broker,controller");

    // Files mounted into containers exist in the repository.
    for (_, svc) in s.as_mapping().unwrap() {
        for v in strings(&svc["volumes"]) {
            let host = v.split(':').next().unwrap();
            assert!(repo().join(host).exists(), "mounted file {host} does not exist");
        }
    }

    // The sandbox and the bridge run the image built from deploy/Dockerfile.
    for name in ["sandbox", "bridge"] {
        assert_eq!(s[name]["build"]["dockerfile"], "deploy/Dockerfile", "{name}");
    }
    let sandbox = strings(&s["sandbox"]["command"]);
    assert_eq!(sandbox[..3], ["sandbox", "--listen", "0.0.0.0:8080"]);
    // The subcommands and flags compose passes (and the chart's `run --config`) exist in the binary.
    for service in ["sandbox", "bridge"] {
        let args = strings(&s[service]["command"]);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_datapulse-bridge"))
            .args([args[0].as_str(), "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "`datapulse-bridge {}` does not exist", args[0]);
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            assert!(
                help.contains(flag.as_str()),
                "`{}` has no flag {flag}:\n{help}",
                args[0]
            );
        }
    }
    // The sandbox's admin endpoints (reset, faults, the record) want a token.
    let token_pos = sandbox
        .iter()
        .position(|a| a == "--admin-token")
        .expect("the sandbox runs with --admin-token");
    assert!(
        sandbox
            .get(token_pos + 1)
            .is_some_and(|t| !t.is_empty() && !t.starts_with("--")),
        "--admin-token has no value: {sandbox:?}"
    );
    let key_pos = sandbox.iter().position(|a| a == "--api-key").unwrap();
    assert_eq!(
        sandbox[key_pos + 1],
        read("deploy/compose/api-key").trim(),
        "bridge and sandbox share a key"
    );

    // The bridge reads the config file mounted where its command says.
    let bridge = strings(&s["bridge"]["command"]);
    assert_eq!(bridge[..2], ["run", "--config"]);
    let mounts = strings(&s["bridge"]["volumes"]);
    let config_mount = mounts
        .iter()
        .find(|m| m.starts_with("./deploy/compose/bridge.toml:"))
        .unwrap();
    assert_eq!(config_mount.split(':').nth(1).unwrap(), bridge[2]);

    let toml_text = read("deploy/compose/bridge.toml");
    let toml: toml::Value = toml::from_str(&toml_text).unwrap();
    let key_mount = mounts
        .iter()
        .find(|m| m.starts_with("./deploy/compose/api-key:"))
        .unwrap();
    assert_eq!(
        key_mount.split(':').nth(1).unwrap(),
        toml["api"]["key_file"].as_str().unwrap()
    );
    assert_eq!(toml["api"]["base_url"].as_str(), Some("http://sandbox:8080"));
    assert_eq!(
        toml["kafka"]["bootstrap_servers"].as_str(),
        Some(
            s["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
                .as_str()
                .unwrap()
                .trim_start_matches("PLAINTEXT://")
        )
    );

    // Prometheus scrapes the bridge's operations port; Grafana gets the dashboard it provisions.
    let port = toml["telemetry"]["listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let prom: serde_norway::Value = serde_norway::from_str(&read("deploy/prometheus/prometheus.yml")).unwrap();
    let target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
        .as_str()
        .unwrap();
    assert_eq!(target, format!("bridge:{port}"));
    let provider: serde_norway::Value =
        serde_norway::from_str(&read("deploy/grafana/provisioning/dashboards/datapulse-bridge.yaml")).unwrap();
    let dash_dir = provider["providers"][0]["options"]["path"].as_str().unwrap();
    assert!(strings(&s["grafana"]["volumes"])
        .iter()
        .any(|v| v.ends_with(&format!("{dash_dir}/datapulse-bridge.json:ro"))));

    // The configuration itself, with the environment compose gives the bridge.
    let key = key_file();
    let mut env: Vec<(String, String)> = s["bridge"]["environment"]
        .as_mapping()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap().to_string()))
        .collect();
    env.push((
        "DATAPULSE_BRIDGE_API__KEY_FILE".into(),
        key.path().display().to_string(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let checked = check(&toml_text, &env);
    assert!(
        checked.ok,
        "check refused deploy/compose/bridge.toml:\n{}",
        checked.stderr
    );
}

/// The packaging files that may name environment variables or configuration keys.
fn packaging_texts() -> Vec<(String, String)> {
    let mut files = vec![
        "docker-compose.yml".to_string(),
        "deploy/Dockerfile".to_string(),
        "deploy/compose/bridge.toml".to_string(),
        "docs/operations.md".to_string(),
        "docs/deployment.md".to_string(),
        "helm/datapulse-bridge/values.yaml".to_string(),
        "helm/datapulse-bridge/README.md".to_string(),
    ];
    // The chart's templates, tests/ included.
    let mut dirs = vec![repo().join("helm/datapulse-bridge/templates")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p.strip_prefix(repo()).unwrap().display().to_string());
            }
        }
    }
    files.into_iter().map(|f| (read(&f), f)).collect()
}

/// A configuration without the sections still being built elsewhere, to test variables one by one.
const BASE: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:9092"
group_id = "g"
topics = ["t"]
[api]
base_url = "http://127.0.0.1:8080"
"#;

#[test]
fn env_vars_named_exist() {
    let mut named = BTreeSet::new();
    for (text, file) in packaging_texts() {
        for v in env_vars_in(&text) {
            assert!(
                KNOWN_ENV.iter().any(|(k, _)| *k == v),
                "{file} names {v}: add it with a sample value to KNOWN_ENV"
            );
            named.insert(v);
        }
    }
    assert!(named.contains("DATAPULSE_BRIDGE_KAFKA__GROUP_INSTANCE_ID"));
    let key = key_file();
    let key_path = key.path().display().to_string();
    for (var, sample) in KNOWN_ENV.iter().filter(|(k, _)| named.contains(*k)) {
        // The key comes from a file, unless the variable is the key itself (not both).
        let mut env = match *var {
            "DATAPULSE_BRIDGE_API__KEY" => vec![],
            _ => vec![("DATAPULSE_BRIDGE_API__KEY_FILE", key_path.as_str())],
        };
        if *var != "DATAPULSE_BRIDGE_API__KEY_FILE" {
            env.push((var, sample));
        }
        let checked = check(BASE, &env);
        assert!(checked.ok, "{var}={sample} is refused:\n{}", checked.stderr);
        assert!(
            !checked.stdout.contains(SAMPLE_SECRET),
            "check printed a secret:\n{}",
            checked.stdout
        );
        // The override reached the configuration (secrets aside, check prints it back).
        let key = var.trim_start_matches("DATAPULSE_BRIDGE_").to_lowercase();
        let leaf = key.rsplit("__").next().unwrap();
        if *var != "DATAPULSE_BRIDGE_API__KEY_FILE" && !leaf.contains("url") {
            assert!(
                checked.stdout.contains(&format!("{leaf} = ")),
                "{var} did not show up:\n{}",
                checked.stdout
            );
        }
    }
}

/// Key paths of values.yaml (Helm values), as `a.b.c`.
fn values_paths() -> BTreeSet<String> {
    fn walk(prefix: &str, v: &serde_norway::Value, out: &mut BTreeSet<String>) {
        if let Some(m) = v.as_mapping() {
            for (k, v) in m {
                let p = format!("{prefix}{}", k.as_str().unwrap());
                out.insert(p.clone());
                walk(&format!("{p}."), v, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(
        "",
        &serde_norway::from_str(&read("helm/datapulse-bridge/values.yaml")).unwrap(),
        &mut out,
    );
    out
}

#[test]
fn config_keys_named_in_docs_exist() {
    // Configuration keys known to exist: every key `check` prints for the BASE configuration (all
    // keys with a default), those of configurations `check` accepts in these tests (compose, the
    // chart's ConfigMap from the production values and with a static share), and the keys the known
    // environment variables set.
    let key = key_file();
    let printed = check(
        BASE,
        &[("DATAPULSE_BRIDGE_API__KEY_FILE", &key.path().display().to_string())],
    );
    assert!(printed.ok, "check refused BASE:\n{}", printed.stderr);
    let mut known = toml_paths(&printed.stdout);
    known.extend(toml_paths(&read("deploy/compose/bridge.toml")));
    for set in [
        "{}",
        r#"{"autoscaling":{"enabled":false},"rateBudget":{"mode":"static_share"}}"#,
        r#"{"kafka":{"topics":[],"topicPattern":"^wallet\\..*"}}"#,
        // kafka.properties_file, dedupe.redis.username
        r#"{"kafka":{"existingSecret":"kafka-client"},"redis":{"username":"bridge"}}"#,
    ] {
        let docs = helm_template(&["helm/datapulse-bridge/ci/production-values.yaml"], &[set]).unwrap();
        let cm = manifest(&docs, "ConfigMap")["data"]["datapulse-bridge.toml"]
            .as_str()
            .unwrap()
            .to_string();
        known.extend(toml_paths(&cm));
    }
    for (var, _) in KNOWN_ENV {
        known.insert(
            var.trim_start_matches("DATAPULSE_BRIDGE_")
                .to_lowercase()
                .replace("__", "."),
        );
    }
    let values = values_paths();
    let re = regex::Regex::new(
        r"`((?:kafka|api|batch|delivery|dedupe|dead_letter|telemetry|shutdown)(?:\.[A-Za-z0-9_]+)+)`",
    )
    .unwrap();
    let mut seen = 0;
    for f in ["docs/operations.md", "docs/deployment.md"] {
        let text = read(f);
        for c in re.captures_iter(&text) {
            let key = &c[1];
            seen += 1;
            assert!(
                known.contains(key) || values.contains(key),
                "{f} names `{key}`, which is neither a configuration key nor a chart value"
            );
        }
    }
    assert!(seen > 10, "the docs name only {seen} keys: did the pattern break?");
}

/// Every port compose publishes is bound to 127.0.0.1: the sandbox's admin endpoints and Grafana's
/// anonymous Admin must not be reachable from the network (nor the bridge's or Prometheus' ports).
#[test]
fn compose_publishes_ports_on_loopback_only() {
    let c = compose();
    let mut published = BTreeSet::new();
    for (name, svc) in c["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        for p in svc["ports"].as_sequence().into_iter().flatten() {
            // Only the short syntax is used here; the long one would name host_ip instead.
            let p = p
                .as_str()
                .unwrap_or_else(|| panic!("{name}: port {p:?} not in the short syntax"));
            let parts: Vec<&str> = p.split(':').collect();
            assert_eq!(
                parts.len(),
                3,
                "{name} publishes {p} on every interface: write 127.0.0.1:HOST:CONTAINER"
            );
            assert_eq!(parts[0], "127.0.0.1", "{name} publishes {p}");
            published.insert(name.to_string());
        }
    }
    for name in ["sandbox", "grafana", "bridge", "prometheus"] {
        assert!(published.contains(name), "{name} publishes no port: {published:?}");
    }
}
