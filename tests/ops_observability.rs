//! End-to-end observability (issue 7): what an operator sees of a run of the built binary against
//! a tansu broker, the sandbox and redis-server — the metrics account for every record and agree
//! with the sandbox's own record, readiness walks through its states with reasons, secrets never
//! appear, JSON logs parse, and the shipped dashboard and alert rules reference only metrics the
//! bridge exports.
//!
//! The `filtered` outcome is not exercised: the mapping engine in this tree (JSON-pointer fields)
//! has no rule that filters a record. The runs cover delivered, duplicate and dead-lettered
//! (mapping, validation and API stages).

mod common;
mod ops_support;
use common::*;
use ops_support::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

/// Values that must never be printed anywhere.
const SASL_PASSWORD: &str = "sasl-pw-never-printed-7d3e";

/// What a finished run left to look at.
struct Run {
    metrics: String,
    log: String,
    stats: serde_json::Value,
    config: std::path::PathBuf,
    ends: Vec<i64>,
    // Kept alive so that the processes outlive the assertions.
    _procs: (Broker, Sandbox, Bridge),
}

/// A run with every outcome but `filtered`: 1,000 deposits over 2 partitions, 20 of them produced
/// again (duplicates), a record that is not JSON (mapping), two with a bad currency (validation),
/// and a withdraw without `click_id` that the sandbox (`--strict-click-ip`) refuses with a 400
/// (API). The sandbox fails the key probe and the first requests (500, 429, timeout) so that the
/// retry metrics exist. Waits until every partition is committed at its end.
async fn full_run(name: &str, extra: &str, kafka_properties: &str) -> Run {
    let dir = workdir(name);
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 2).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &["--strict-click-ip", "--fault-script", "500,429,timeout,500"]);
    let mut records = deposits("m", 1_000, 2);
    for i in 0..20 {
        let tx = format!("m-{i}");
        records.push((((i + 1) % 2) as i32, tx.clone(), deposit(&tx, i)));
    }
    records.push((0, "not-json".into(), "{oops".into()));
    for i in 0..2 {
        let tx = format!("bad-ccy-{i}");
        records.push((1, tx.clone(), deposit(&tx, 3).replace("EUR", "euro")));
    }
    let withdraw = json!({"user": "u9", "type": "withdraw", "ts": 1_764_000_000, "tx": "w-no-click",
        "amount": 5.0, "ccy": "EUR", "ip": "203.0.113.7"});
    records.push((0, "w-no-click".into(), withdraw.to_string()));
    broker.produce("tx", &records).await;
    let ends = ends_of(&records, 2);
    let group = format!("g-{name}");
    // `resend`: the injected timeout (which the sandbox did not count) is retried, so that every
    // retry cause has a sample; under the default it would leave its batch in doubt.
    let delivery =
        "[delivery]\nrate_limit = 100000\nrate_window = \"1s\"\nrate_burst = 1000\nretry_backoff_max = \"1s\"\n\
                    on_ambiguous = \"resend\"\n";
    let cfg = bridge_config(&broker, &sandbox.url, &group, "tx", &format!("{extra}\n{delivery}"))
        .replace(
            "\"statistics.interval.ms\" = 1000\n",
            &format!("\"statistics.interval.ms\" = 1000\n{kafka_properties}"),
        )
        // The injected timeout hangs until the bridge gives up.
        .replace("request_timeout = \"5s\"", "request_timeout = \"1s\"");
    assert!(kafka_properties.is_empty() || cfg.contains(kafka_properties));
    let bridge = Bridge::start(&dir, "bridge", &cfg);
    wait_until(2 * MIN, "committed at the end of every partition", || async {
        broker.committed(&group, "tx", 2) == ends
    })
    .await;
    wait_until(MIN, "nothing in flight", || async {
        let o = Outcomes::of(&bridge.metrics().await);
        o.in_flight == 0.0 && o.consumed == records.len() as f64
    })
    .await;
    wait_committed_metric(&bridge, &ends).await;
    Run {
        metrics: bridge.metrics().await,
        log: bridge.proc.log_text(),
        stats: sandbox.stats().await,
        config: bridge.config.clone(),
        ends,
        _procs: (broker, sandbox, bridge),
    }
}

/// After a run, `/metrics` accounts for every record (consumed = sum of outcomes, nothing in
/// flight), the per-partition committed offsets are the ends of the topic (counted from what was
/// produced), and the counters agree with the sandbox's own record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_account_for_every_record_and_agree_with_the_sandbox() {
    let run = full_run("obs-metrics", "", "").await;
    let m = &run.metrics;
    let o = Outcomes::of(m);
    assert_eq!(
        o,
        Outcomes {
            consumed: 1_024.0,
            delivered: 1_000.0,
            duplicate: 20.0,
            filtered: 0.0,
            dead_lettered: 4.0,
            in_flight: 0.0
        },
        "{m}"
    );
    assert!(o.balanced());
    let stage = |s: &str| {
        metric_sum(
            m,
            "datapulse_bridge_records_finished_total",
            &["outcome=\"dead_lettered\"", &format!("reason=\"{s}\"")],
        )
    };
    assert_eq!((stage("mapping"), stage("validation"), stage("api")), (1.0, 2.0, 1.0));
    assert_eq!(metric_sum(m, "datapulse_bridge_dead_letters_total", &[]), 4.0, "{m}");
    assert_eq!(
        metric_sum(m, "datapulse_bridge_delivery_events_rejected_total", &[]),
        1.0
    );
    assert_eq!(
        committed_metric(m, &run.ends),
        run.ends,
        "committed offset metric per partition"
    );

    // The sandbox's record and the bridge's counters tell the same story.
    let stats = &run.stats;
    assert_eq!(stats["accepted_events"].as_u64(), Some(1_000));
    assert_eq!(stats["duplicate_transaction_ids"], json!({}));
    let requests = stats["requests"].as_u64().unwrap() as f64;
    // A request that hung until the bridge gave up has no status at the sandbox and counts as
    // `timeout` in the bridge: totals agree, and so does every status the sandbox answered.
    assert_eq!(
        metric_sum(m, "datapulse_bridge_api_requests_total", &[]),
        requests,
        "{m}\n{stats}"
    );
    for (status, n) in stats["by_status"].as_object().unwrap() {
        assert_eq!(
            metric_sum(
                m,
                "datapulse_bridge_api_requests_total",
                &[&format!("status=\"{status}\"")]
            ),
            n.as_u64().unwrap() as f64,
            "status {status}: {m}"
        );
    }
    assert_eq!(
        metric_sum(m, "datapulse_bridge_api_requests_total", &["status=\"timeout\""]),
        1.0
    );
    // Events per request: the sum over requests is what the sandbox saw in the requests it
    // accepted plus the retried and rejected ones; at least the accepted events.
    assert!(metric_sum(m, "datapulse_bridge_api_events_per_request_sum", &[]) >= 1_000.0);
    for cause in ["5xx", "429", "timeout"] {
        assert!(
            metric_sum(
                m,
                "datapulse_bridge_api_retries_total",
                &[&format!("cause=\"{cause}\"")]
            ) >= 1.0,
            "a retry after {cause} is counted: {m}"
        );
    }
}

/// `/health/ready` through each state, each with its reason: starting (503 before the group
/// assigns partitions), ready (200), the key refused (503 naming the key; 200 again once the API
/// accepts it), the Redis dedupe store down (503 naming the store; 200 again once Redis is back
/// on the same port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_walks_through_its_states() {
    let dir = workdir("obs-ready");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 2).await;
    broker.create_topic("tx.dlq", 1).await;
    let redis = Redis::start(&dir);
    let redis_port = redis.port;
    let sandbox = Sandbox::start(&dir, &[]);
    let extra = format!(
        r#"
[dedupe]
store = "redis"
[dedupe.redis]
url = "{url}"
prefix = "ready"
timeout = "500ms"
[delivery]
rate_limit = 100000
rate_window = "1s"
rate_burst = 1000
retry_backoff_max = "1s"
auth_retry_interval = "1s"
"#,
        url = redis.url()
    );
    let group = "g-obs-ready";
    let cfg = bridge_config(&broker, &sandbox.url, group, "tx", &extra);
    // Starting: a fresh group with one member is often assigned within milliseconds of the
    // operations server binding, too soon for a test to ask; a member joining a group that already
    // has one waits for the rebalance (about 3 s with tansu), which is the state to see.
    let mut holder = Bridge::start(&dir, "holder", &cfg);
    wait_until(MIN, "the first member ready", || async {
        holder.ready().await.0 == 200
    })
    .await;
    let bridge = Bridge::start(&dir, "bridge", &cfg);
    let (status, body) = bridge.ready().await;
    assert_eq!(status, 503, "not ready before assignment: {body}");
    assert_eq!(body["ready"], json!(false));
    assert_eq!(body["conditions"]["assignment"]["ok"], json!(false), "{body}");
    let reason = body["conditions"]["assignment"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("assign"), "the reason says what it waits for: {body}");
    wait_until(MIN, "the second member assigned", || async {
        bridge.ready().await.0 == 200
    })
    .await;
    // The first member leaves; the second owns both partitions from here on.
    assert!(holder
        .proc
        .terminate(Duration::from_secs(30))
        .is_some_and(|s| s.success()));

    // Ready: assigned, key accepted, store reachable.
    wait_until(MIN, "ready", || async { bridge.ready().await.0 == 200 }).await;
    let (_, body) = bridge.ready().await;
    assert_eq!(body["ready"], json!(true));
    for c in ["assignment", "api_key", "dedupe_store"] {
        assert_eq!(body["conditions"][c]["ok"], json!(true), "{c}: {body}");
    }
    let mut produced = deposits("r1", 100, 2);
    broker.produce("tx", &produced).await;
    wait_until(MIN, "first 100 accepted", || async { sandbox.accepted().await >= 100 }).await;

    // The key refused: halt, 503 naming the key.
    sandbox.set_faults(json!({"auth_fail_all": true})).await;
    let more = deposits("r2", 100, 2);
    broker.produce("tx", &more).await;
    produced.extend(more);
    wait_until(MIN, "503 naming the key", || async {
        let (s, b) = bridge.ready().await;
        s == 503 && b["conditions"]["api_key"]["ok"] == json!(false)
    })
    .await;
    let (_, body) = bridge.ready().await;
    let reason = body["conditions"]["api_key"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("key") && reason.contains("401"), "{body}");
    assert_eq!(body["conditions"]["assignment"]["ok"], json!(true));
    sandbox.set_faults(json!({})).await;
    wait_until(MIN, "ready again after the key is accepted", || async {
        bridge.ready().await.0 == 200
    })
    .await;
    wait_until(MIN, "200 accepted", || async { sandbox.accepted().await >= 200 }).await;

    // The dedupe store down: 503 naming the store.
    let mut redis = redis;
    redis.proc.kill9();
    let more = deposits("r3", 100, 2);
    broker.produce("tx", &more).await;
    produced.extend(more);
    wait_until(MIN, "503 naming the dedupe store", || async {
        let (s, b) = bridge.ready().await;
        s == 503 && b["conditions"]["dedupe_store"]["ok"] == json!(false)
    })
    .await;
    let (_, body) = bridge.ready().await;
    let reason = body["conditions"]["dedupe_store"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("redis"), "{body}");
    assert_eq!(
        sandbox.accepted().await,
        200,
        "nothing sent without the store (policy pause)"
    );

    // Redis back on the same port (empty: these ids were never delivered): ready, and delivery
    // resumes.
    let _redis = Redis::start_on(&dir, redis_port);
    wait_until(MIN, "ready after Redis returns", || async {
        bridge.ready().await.0 == 200
    })
    .await;
    wait_until(MIN, "all 300 accepted", || async { sandbox.accepted().await >= 300 }).await;
    let ends = ends_of(&produced, 2);
    wait_until(MIN, "committed at the end", || async {
        broker.committed(group, "tx", 2) == ends
    })
    .await;
    let ids = accepted_ids(&sandbox).await;
    assert_eq!(ids.len(), 300);
    assert!(ids.values().all(|&n| n == 1));
}

/// The API key and a librdkafka password never appear in any log line (stderr) or metric of a
/// run, nor in `datapulse-bridge check`; and with `log_format = "json"` every log line is a JSON
/// object, batch spans carrying their id, size and partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_and_json_logs_parse() {
    // `sasl.password` is a real librdkafka property; with the plaintext protocol it is unused.
    let props = format!("\"security.protocol\" = \"plaintext\"\n\"sasl.password\" = \"{SASL_PASSWORD}\"\n");
    let run = full_run("obs-secrets", "[telemetry]\nlog_format = \"json\"\n", &props).await;
    let cfg_text = std::fs::read_to_string(&run.config).unwrap();
    assert!(
        cfg_text.contains(API_KEY) && cfg_text.contains(SASL_PASSWORD),
        "the run had both secrets"
    );
    let (ok, out) = command(&["check"], &run.config);
    assert!(ok, "{out}");
    assert!(out.contains("<redacted>"), "{out}");
    for (what, text) in [("log", &run.log), ("metrics", &run.metrics), ("check", &out)] {
        assert!(!text.contains(API_KEY), "the API key appears in the {what}");
        assert!(!text.contains(SASL_PASSWORD), "the SASL password appears in the {what}");
    }

    let mut batch_spans = 0;
    let lines: Vec<&str> = run.log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 20, "a run logs: {}", run.log);
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{l}");
        let span = &v["span"];
        if span["name"] == "batch" {
            assert!(span["id"].is_number(), "{l}");
            assert!(span["size"].as_u64().is_some_and(|s| s > 0), "{l}");
            let parts = span["partitions"].as_str().unwrap_or_default();
            assert!(parts.starts_with("tx/"), "{l}");
            batch_spans += 1;
        }
    }
    assert!(batch_spans > 0, "some log line is inside a batch span");
}

/// Every metric name referenced by the Grafana dashboards (`deploy/grafana/*.json`) and the
/// Prometheus rules (`deploy/prometheus/*.yaml`) is exported by the bridge after a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_reference_only_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut referenced = BTreeSet::new();
    let mut files = Vec::new();
    for (dir, ext) in [("deploy/grafana", "json"), ("deploy/prometheus", "yaml")] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == ext) {
                files.push(p);
            }
        }
    }
    assert!(
        !files.is_empty(),
        "no dashboard (deploy/grafana/*.json) or alert rules (deploy/prometheus/*.yaml) in this tree: \
         they come from the `packaging` branch"
    );
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        referenced.extend(metric_names_in(&text));
    }
    assert!(
        !referenced.is_empty(),
        "the files reference no datapulse_bridge_ metric: {files:?}"
    );

    let run = full_run("obs-dash", "", "").await;
    let exported = metric_families(&run.metrics);
    let missing: Vec<&String> = referenced
        .iter()
        .filter(|n| !exported.contains(family_of(n, &exported)))
        .collect();
    assert!(
        missing.is_empty(),
        "referenced by {files:?} but not exported after a run: {missing:?}\nexported: {exported:?}"
    );
}

/// `datapulse_bridge_*` identifiers in a file.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("datapulse_bridge_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The family a sample name belongs to: histograms and summaries expose `_bucket`, `_sum` and
/// `_count` series of a family declared without the suffix.
fn family_of<'a>(name: &'a str, exported: &std::collections::HashSet<String>) -> &'a str {
    if exported.contains(name) {
        return name;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if exported.contains(base) {
                return base;
            }
        }
    }
    name
}

/// Distinct secrets planted in every place one can be given (TOML, the environment, a properties
/// file, a Redis password), then every error path this test can drive (a refused property in the
/// TOML and in the file, `check`, `run`, `dlq list`, librdkafka `debug = "all"` at trace, a key the
/// API refuses, a Redis that does not answer): no output holds any of them (stderr, the JSON log,
/// `/metrics`, readiness).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_secrets_reach_no_output_on_any_error_path() {
    const TYPO: &str = "typo-pw-2f7a";
    const FILE_TYPO: &str = "file-typo-pw-90c1";
    const SASL: &str = "sasl-pw-4b1e";
    const OIDC: &str = "oidc-secret-c3d2";
    const REDIS_PW: &str = "redis-pw-e5f6";
    const KEY: &str = "dp_planted_key_a7b8";
    const FILE_VALUE: &str = "file-user-0d9e";
    // Not a secret property, so librdkafka prints it (its `conf` debug dumps the configuration):
    // every value of the properties file is scrubbed all the same.
    const FILE_RACK: &str = "file-rack-6a2b";
    const ENV_KEY: &str = "1.50-env-key";
    // The rate budget's Redis URL holds the right password; the dedupe store's is wrong.
    const BUDGET_PW: &str = "budget-pw-1c4d";
    let planted = [
        TYPO, FILE_TYPO, SASL, OIDC, REDIS_PW, KEY, FILE_VALUE, FILE_RACK, ENV_KEY, BUDGET_PW,
    ];
    let clean = |what: &str, text: &str| {
        for p in planted {
            assert!(!text.contains(p), "`{p}` appears in the {what}:\n{text}");
        }
    };

    let dir = workdir("obs-planted");
    let broker = Broker::start(&dir);
    broker.create_topic("tx", 1).await;
    broker.create_topic("tx.dlq", 1).await;
    let sandbox = Sandbox::start(&dir, &[]);
    let props_file = dir.join("client.properties");
    std::fs::write(
        &props_file,
        format!("sasl.username={FILE_VALUE}\nclient.rack={FILE_RACK}\n"),
    )
    .unwrap();
    let redis_port = free_port();
    let _redis = Redis::start_with(&dir, redis_port, &["--requirepass", BUDGET_PW]);
    let config = |delivery: &str| {
        let extra = format!(
            "[telemetry]\nlog_format = \"json\"\n[dedupe]\nstore = \"redis\"\non_store_unavailable = \"deliver\"\n\
             [dedupe.redis]\nurl = \"redis://127.0.0.1:{redis_port}/0\"\npassword = \"{REDIS_PW}\"\n{delivery}"
        );
        bridge_config(&broker, &sandbox.url, "g-planted", "tx", &extra)
            .replace(API_KEY, KEY)
            .replace(
                "[kafka.properties]",
                &format!(
                    "properties_file = {props_file:?}\n[kafka.properties]\n\"debug\" = \"all\"\n\
                     \"security.protocol\" = \"plaintext\"\n\"sasl.password\" = \"{SASL}\"\n\
                     \"sasl.oauthbearer.config\" = \"clientSecret={OIDC}\""
                ),
            )
    };
    let base = config("");

    // A refused property, in the TOML and in the properties file: every command stops at start,
    // naming the property, never its value.
    let typo = base.replace(
        "\"debug\" = \"all\"",
        &format!("\"debug\" = \"all\"\n\"sasl.pasword\" = \"{TYPO}\""),
    );
    let typo_file = dir.join("typo.properties");
    std::fs::write(&typo_file, format!("sasl.passwrd={FILE_TYPO}\n")).unwrap();
    let file_typo = base.replace(&format!("{props_file:?}"), &format!("{typo_file:?}"));
    for (name, text, property) in [
        ("typo", &typo, "sasl.pasword"),
        ("file-typo", &file_typo, "sasl.passwrd"),
    ] {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        for args in [&["check"][..], &["run"], &["dlq", "list"]] {
            let (ok, out) = command(args, &path);
            assert!(!ok, "{args:?} with {name} succeeded: {out}");
            assert!(
                out.contains(&format!("`{property}`")),
                "{args:?} names the property: {out}"
            );
            clean(&format!("output of {args:?} ({name})"), &out);
        }
    }

    // A run at trace with librdkafka's debug log, a refused API key and an unanswering Redis.
    let run = config(&format!(
        "[delivery]\nrate_mode = \"redis\"\nredis_url = \"redis://:{BUDGET_PW}@127.0.0.1:{redis_port}/0\"\n\
         rate_limit = 100000\nrate_window = \"1s\"\nrate_burst = 1000\n"
    ));
    let bridge = Bridge::start_with_env(&dir, "planted", &run, &[("RUST_LOG", "trace")]);
    let mut records = deposits("p", 20, 1);
    records.push((0, "not-json".into(), "{oops".into()));
    broker.produce("tx", &records).await;
    wait_until(MIN, "the API refused the key", || async {
        by_status(&sandbox.stats().await, 401) >= 1
    })
    .await;
    wait_until(MIN, "readiness names the key and the store", || async {
        let (status, body) = bridge.ready().await;
        status == 503 && body["conditions"]["api_key"]["ok"] == json!(false)
    })
    .await;
    let (_, ready) = bridge.ready().await;
    let metrics = bridge.metrics().await;
    let (ok, check) = command(&["check"], &bridge.config);
    assert!(ok, "{check}");
    assert!(check.contains("<redacted>"), "{check}");
    wait_until(MIN, "the bad record dead-lettered", || async {
        bridge.dlq(&["list"]).1.contains("not_json")
    })
    .await;
    let (_, dlq) = bridge.dlq(&["list"]);
    wait_until(MIN, "a trace log with librdkafka's debug lines", || async {
        let log = bridge.proc.log_text();
        log.lines().count() > 100 && log.contains("\"target\":\"librdkafka\"")
    })
    .await;
    let log = bridge.proc.log_text();
    assert!(
        log.contains("client.rack = <redacted>"),
        "librdkafka printed the file's value, scrubbed"
    );
    for (what, text) in [
        ("log", log.as_str()),
        ("metrics", metrics.as_str()),
        ("readiness", &ready.to_string()),
        ("check", check.as_str()),
        ("dlq list", dlq.as_str()),
    ] {
        clean(what, text);
    }
    // A broker that does not answer: the log of a bridge that cannot reach it.
    let unreachable = base.replace(&broker.bootstrap, &format!("127.0.0.1:{}", free_port()));
    let lost = Bridge::start_with_env(&dir, "unreachable", &unreachable, &[("RUST_LOG", "trace")]);
    wait_until(MIN, "the bridge says the broker is unreachable", || async {
        lost.proc.log_text().contains("Connection refused")
    })
    .await;
    clean("log with the broker unreachable", &lost.proc.log_text());

    // SASL OAUTHBEARER with an unsecured token: librdkafka quotes the piece of
    // `sasl.oauthbearer.config` it cannot read (`clientSecret=…`) in an error.
    let sasl = base
        .replace(
            "\"security.protocol\" = \"plaintext\"",
            "\"security.protocol\" = \"sasl_plaintext\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\
             \"enable.sasl.oauthbearer.unsecure.jwt\" = true",
        )
        .replace(
            &format!("clientSecret={OIDC}"),
            &format!("principal=admin clientSecret={OIDC}"),
        );
    let oauth = Bridge::start_with_env(&dir, "oauth", &sasl, &[("RUST_LOG", "trace")]);
    wait_until(MIN, "librdkafka refuses the OAUTHBEARER configuration", || async {
        oauth.proc.log_text().contains("Unrecognized sasl.oauthbearer.config")
    })
    .await;
    let text = oauth.proc.log_text();
    assert!(
        text.contains("beginning at: <redacted>"),
        "the piece quoted is scrubbed"
    );
    clean("log of the OAUTHBEARER run", &text);

    // The environment's text is the key, verbatim, and still never printed.
    let env_run = dir.join("env.toml");
    std::fs::write(&env_run, base.replace(&format!("key = \"{KEY}\"\n"), "")).unwrap();
    let (ok, text) = command_with_env(&["check"], &env_run, &[("DATAPULSE_BRIDGE_API__KEY", ENV_KEY)]);
    assert!(ok, "{text}");
    clean("check with the key from the environment", &text);
}
