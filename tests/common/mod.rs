//! Test harness for end-to-end tests: real processes on 127.0.0.1 — a tansu broker, a
//! redis-server, the sandbox and the bridge (the built binary) — started per test and killed on
//! drop. Nothing here is a fake.
#![allow(dead_code)]

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_datapulse-bridge");
pub const API_KEY: &str = "dp_test_key_e2e_5f1c2b";

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until `cond` holds, polling; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn wait_port(port: u16, timeout: Duration, what: &str) {
    let start = Instant::now();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            start.elapsed() < timeout,
            "{what} did not listen on {port} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory for a test's files and process logs; kept on failure for reading.
pub fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dpb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `datapulse-bridge <args> --config <config>` to its end: whether it succeeded, and its
/// standard output followed by its standard error.
pub fn command(args: &[&str], config: &Path) -> (bool, String) {
    command_with_env(args, config, &[])
}

/// [`command`] with these environment variables set.
pub fn command_with_env(args: &[&str], config: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The process's peak resident memory so far (`VmHWM`), in KiB; None once it has exited.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.as_ref()?.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// SIGKILL: the process gets no chance to finish anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        unsafe_kill(c.id(), "TERM");
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return Some(s);
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A tansu broker with in-memory storage.
pub struct Broker {
    pub proc: Proc,
    pub bootstrap: String,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(which("tansu"));
        cmd.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url]);
        cmd.args(["--storage-engine", "memory://tansu/"]);
        let proc = Proc::spawn(cmd, dir.join("tansu.log"));
        wait_port(port, Duration::from_secs(20), "tansu");
        Broker {
            proc,
            bootstrap: format!("127.0.0.1:{port}"),
        }
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap();
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let res = admin.create_topics([&topic], &AdminOptions::new()).await.unwrap();
        for r in res {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("linger.ms", "5")
            // One record per batch: tansu 0.6 answers a fetch at an offset inside a record batch
            // with the *next* batch, silently skipping records (seen when librdkafka re-fetches
            // from the application's position after a cooperative rebalance pauses and resumes a
            // partition). Real Kafka returns the batch containing the offset.
            .set("batch.num.messages", "1")
            .set("enable.idempotence", "false")
            .create()
            .unwrap()
    }

    /// Produces `(partition, key, value)` records and waits for every acknowledgement.
    pub async fn produce(&self, topic: &str, records: &[(i32, String, String)]) {
        produce_with(&self.producer(), topic, records).await;
    }

    /// The group's committed offsets for partitions `0..partitions` of `topic` (-1 when none).
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect()
    }

    /// Commits `offset` for one partition on behalf of `group` from a client outside it
    /// (generation -1, no member id): what a member of an older generation does to a broker that
    /// fences none (tansu 0.6 checks no generation), or a broker that loses a commit looks like.
    pub fn commit_as_outsider(&self, group: &str, topic: &str, partition: i32, offset: i64) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .unwrap();
        consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync).unwrap();
    }

    /// Every record of `topic` (all partitions), read from the beginning until `expected` or timeout.
    pub fn read_all(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<rdkafka::message::OwnedMessage> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", format!("reader-{}", free_port()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let start = Instant::now();
        let mut out = Vec::new();
        while out.len() < expected && start.elapsed() < timeout {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                out.push(m.detach());
            }
        }
        out
    }
}

/// The end offsets of partitions `0..partitions` after producing `records` into an empty topic
/// (tansu's reported high watermark can lag behind the records it serves, so tests count).
pub fn ends_of(records: &[(i32, String, String)], partitions: i32) -> Vec<i64> {
    let mut ends = vec![0i64; partitions as usize];
    for (p, _, _) in records {
        ends[*p as usize] += 1;
    }
    ends
}

/// A redis-server on a free port, no persistence.
pub struct Redis {
    pub proc: Proc,
    pub port: u16,
}

impl Redis {
    pub fn start(dir: &Path) -> Redis {
        Self::start_on(dir, free_port())
    }

    pub fn start_on(dir: &Path, port: u16) -> Redis {
        Redis::start_with(dir, port, &[])
    }

    /// [`Redis::start_on`] with more `redis-server` arguments (e.g. `--requirepass`).
    pub fn start_with(dir: &Path, port: u16, extra: &[&str]) -> Redis {
        let mut cmd = Command::new(which("redis-server"));
        cmd.args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            "127.0.0.1",
        ]);
        cmd.args(extra);
        let proc = Proc::spawn(cmd, dir.join(format!("redis-{port}.log")));
        wait_port(port, Duration::from_secs(10), "redis-server");
        Redis { proc, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// The sandbox, as its own process.
pub struct Sandbox {
    pub proc: Proc,
    pub url: String,
    client: reqwest::Client,
}

impl Sandbox {
    /// Starts `datapulse-bridge sandbox` with the test key and `extra` flags (rate limit off unless
    /// `extra` sets one).
    pub fn start(dir: &Path, extra: &[&str]) -> Sandbox {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(BIN);
        cmd.args(["sandbox", "--listen", &listen, "--api-key", API_KEY]);
        if !extra.contains(&"--rate-limit") {
            cmd.args(["--rate-limit", "0"]);
        }
        cmd.args(extra);
        let proc = Proc::spawn(cmd, dir.join(format!("sandbox-{port}.log")));
        wait_port(port, Duration::from_secs(20), "sandbox");
        Sandbox {
            proc,
            url: format!("http://{listen}"),
            client: reqwest::Client::new(),
        }
    }

    pub async fn stats(&self) -> serde_json::Value {
        self.client
            .get(format!("{}/_sandbox/stats", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn accepted(&self) -> u64 {
        self.stats().await["accepted_events"].as_u64().unwrap_or(0)
    }

    pub async fn events(&self) -> Vec<serde_json::Value> {
        self.client
            .get(format!("{}/_sandbox/events", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn set_faults(&self, faults: serde_json::Value) {
        let r = self
            .client
            .put(format!("{}/_sandbox/faults", self.url))
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "set faults: {}", r.status());
    }

    /// Transaction ids the sandbox accepted more than once.
    pub async fn duplicate_ids(&self) -> serde_json::Value {
        self.stats().await["duplicate_transaction_ids"].clone()
    }

    /// How many times the sandbox accepted an event without a transaction id identical to one it
    /// had accepted before (its own count, over the whole event).
    pub async fn repeated_keyless_events(&self) -> u64 {
        self.stats().await["repeated_keyless_events"]
            .as_u64()
            .expect("the sandbox's stats have repeated_keyless_events")
    }
}

/// A bridge process (`datapulse-bridge run`).
pub struct Bridge {
    pub proc: Proc,
    pub ops: String,
    pub config: PathBuf,
}

impl Bridge {
    pub fn start(dir: &Path, name: &str, config_toml: &str) -> Bridge {
        Bridge::start_with_env(dir, name, config_toml, &[])
    }

    /// [`Bridge::start`] with more environment variables (set last, so `RUST_LOG` can be given).
    pub fn start_with_env(dir: &Path, name: &str, config_toml: &str, env: &[(&str, &str)]) -> Bridge {
        let ops_port = free_port();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, config_toml).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"]).arg(&config);
        cmd.env("DATAPULSE_BRIDGE_TELEMETRY__LISTEN", format!("127.0.0.1:{ops_port}"));
        cmd.env(
            "RUST_LOG",
            std::env::var("DPB_TEST_RUST_LOG")
                .unwrap_or_else(|_| "info,datapulse_bridge=debug,librdkafka=warn,rdkafka=warn".into()),
        );
        cmd.envs(env.iter().copied());
        let log = dir.join(format!("{name}-{}.log", free_port()));
        let proc = Proc::spawn(cmd, log);
        wait_port(ops_port, Duration::from_secs(20), "bridge operations server");
        Bridge {
            proc,
            ops: format!("http://127.0.0.1:{ops_port}"),
            config,
        }
    }

    /// Runs `datapulse-bridge dlq <args>` on this bridge's config (see [`command`]).
    pub fn dlq(&self, args: &[&str]) -> (bool, String) {
        command(&[&["dlq"], args].concat(), &self.config)
    }

    /// Whether its readiness says no partitions are assigned (condition `assignment`).
    /// How many partitions the consumer group assigned this bridge, from readiness condition
    /// `assignment` ("no partitions assigned" or "N partitions assigned"); `None` when the ops port
    /// does not answer or the condition says neither.
    pub async fn partitions_assigned(&self) -> Option<usize> {
        let r = reqwest::get(format!("{}/health/ready", self.ops)).await.ok()?;
        let body: serde_json::Value = r.json().await.ok()?;
        let condition = &body["conditions"]["assignment"];
        if condition["ok"] == serde_json::json!(false) {
            return Some(0);
        }
        condition["reason"].as_str()?.split(' ').next()?.parse().ok()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.ops))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `/health/ready`'s body, or `None` when the ops port does not answer (a test's diagnostics).
    pub async fn ready_body(&self) -> Option<serde_json::Value> {
        reqwest::get(format!("{}/health/ready", self.ops))
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// `/metrics`' text, or `None` when the ops port does not answer (a test's diagnostics).
    pub async fn metrics_text(&self) -> Option<String> {
        reqwest::get(format!("{}/metrics", self.ops))
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    pub async fn ready(&self) -> (u16, serde_json::Value) {
        let r = reqwest::get(format!("{}/health/ready", self.ops)).await.unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap())
    }
}

/// Sum of a Prometheus metric's samples whose labels include every `label="value"` in `labels`.
/// The bridge's committed-offset gauge (`datapulse_bridge_partition_committed_offset`) per
/// partition `0..ends.len()`, from a scrape.
pub fn committed_metric(metrics: &str, ends: &[i64]) -> Vec<i64> {
    (0..ends.len())
        .map(|p| {
            metric_sum(
                metrics,
                "datapulse_bridge_partition_committed_offset",
                &[&format!("partition=\"{p}\"")],
            ) as i64
        })
        .collect()
}

/// Waits until the bridge's committed-offset gauge shows `ends`. The gauge moves when the
/// consumer's next poll serves the broker's answer to an asynchronous commit, a moment after the
/// broker shows the offset (found: 1,000 of 2,500 read at once on a loaded machine), so a test
/// waits for it rather than reading it once the broker has the offsets.
pub async fn wait_committed_metric(bridge: &Bridge, ends: &[i64]) {
    wait_until(
        Duration::from_secs(30),
        "the committed-offset metric at the end of every partition",
        || async { committed_metric(&bridge.metrics().await, ends) == ends },
    )
    .await;
}

pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The mapping of the flat test records ([`deposit`], and [`keyless`], whose absent `/tx`,
/// `/amount` and `/ccy` leave those fields out of the event) on `topic`.
pub fn flat_mapping(topic: &str) -> String {
    format!(
        r#"[[mapping]]
topics = ["{topic}"]
client_user_id = "/user"
event_name = "/type"
timestamp = "/ts"
transaction_id = "/tx"
amount = "/amount"
currency = "/ccy"
click_id = "/click"
ip_address = "/ip"
"#
    )
}

/// The config of a bridge against `broker` and `sandbox` with the flat test mapping.
pub fn bridge_config(broker: &Broker, sandbox_url: &str, group: &str, topic: &str, extra: &str) -> String {
    format!(
        r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
topics = ["{topic}"]
commit_interval = "500ms"
[kafka.properties]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
"fetch.wait.max.ms" = 50
"statistics.interval.ms" = 1000

[api]
base_url = "{sandbox_url}"
key = "{API_KEY}"
request_timeout = "5s"

[batch]
max_events = 500
linger = "100ms"

[dead_letter]
topic = "{topic}.dlq"

[shutdown]
deadline = "10s"

{extra}
{delivery}

{mapping}"#,
        mapping = flat_mapping(topic),
        bootstrap = broker.bootstrap,
        // The sandbox's rate limit is off unless a test sets one; so is the bridge's.
        delivery = if extra.contains("[delivery]") {
            ""
        } else {
            "[delivery]\nrate_limit = 100000\nrate_window = \"1s\"\nrate_burst = 1000"
        },
    )
}

/// A valid flat deposit record with transaction id `tx`.
pub fn deposit(tx: &str, user: u32) -> String {
    serde_json::json!({
        "user": format!("u{user}"), "type": "deposit", "ts": 1_764_000_000 + i64::from(user % 1000),
        "tx": tx, "amount": 10.5, "ccy": "EUR", "click": format!("c{user}"), "ip": "203.0.113.7"
    })
    .to_string()
}

/// `n` deposits with ids `{prefix}-{i}`, spread round-robin over `partitions`.
pub fn deposits(prefix: &str, n: usize, partitions: i32) -> Vec<(i32, String, String)> {
    (0..n)
        .map(|i| {
            let tx = format!("{prefix}-{i}");
            ((i as i32) % partitions, tx.clone(), deposit(&tx, i as u32))
        })
        .collect()
}

/// A valid flat keyless record (`event_name` `login` or `register`: no transaction id, amount or
/// currency; the click id and IP address these two require). `click` should be unique in a test so
/// that a repeat is visibly a repeat: the flat mapping passes `/click` through as `click_id`, and
/// the sandbox compares whole events.
pub fn keyless(event_name: &str, click: &str, user: u32) -> String {
    serde_json::json!({
        "user": format!("u{user}"), "type": event_name, "ts": 1_764_000_000 + i64::from(user % 1000),
        "click": click, "ip": "203.0.113.7"
    })
    .to_string()
}

/// `n` records like a partner's stream, spread round-robin over `partitions` with keys
/// `{prefix}-{i}`: deposits with transaction id `{prefix}-{i}`, and among them, evenly interleaved,
/// a `keyless_share` (0 to 1) of keyless events, registrations and logins by turns, each with the
/// unique click id `clk-{prefix}-{i}`. Pass them to [`assert_each_accepted_once`].
pub fn mixed_events(prefix: &str, n: usize, partitions: i32, keyless_share: f64) -> Vec<(i32, String, String)> {
    assert!(
        (0.0..=1.0).contains(&keyless_share),
        "keyless_share {keyless_share} is not in 0..=1"
    );
    let mut keyless_so_far = 0usize;
    (0..n)
        .map(|i| {
            let key = format!("{prefix}-{i}");
            // Record i is keyless when the running share crosses the next whole event.
            let due = ((i + 1) as f64 * keyless_share).floor() as usize;
            let value = if due > keyless_so_far {
                keyless_so_far += 1;
                let name = if keyless_so_far % 2 == 1 { "register" } else { "login" };
                keyless(name, &format!("clk-{key}"), i as u32)
            } else {
                deposit(&key, i as u32)
            };
            ((i as i32) % partitions, key, value)
        })
        .collect()
}

/// What tells one expected event from every other: its transaction id, or for an event without
/// one its event name and (unique in the test data) click id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventId {
    /// An event with a `transaction_id`.
    Tx(String),
    /// An event without one.
    Keyless { event_name: String, click_id: String },
}

impl EventId {
    /// The identity of a flat test record's value (`/tx`, else `/type` and `/click`).
    pub fn of_record(value: &str) -> EventId {
        let v: serde_json::Value =
            serde_json::from_str(value).unwrap_or_else(|e| panic!("test record is not JSON ({e}): {value}"));
        Self::of(&v, "tx", "type", "click")
    }

    /// The identity of an event as the API received it.
    pub fn of_event(event: &serde_json::Value) -> EventId {
        Self::of(event, "transaction_id", "event_name", "click_id")
    }

    fn of(v: &serde_json::Value, tx: &str, name: &str, click: &str) -> EventId {
        match v[tx].as_str() {
            Some(t) => EventId::Tx(t.to_string()),
            None => EventId::Keyless {
                event_name: v[name].as_str().unwrap_or_default().to_string(),
                click_id: v[click]
                    .as_str()
                    .unwrap_or_else(|| panic!("a keyless event without a click id cannot be told apart: {v}"))
                    .to_string(),
            },
        }
    }
}

/// How the accepted events compare with the produced records: every record accepted exactly once
/// is the clean result.
#[derive(Debug, Default)]
pub struct ExactlyOnce {
    /// Records produced (expected once each).
    pub expected: usize,
    /// Produced, never accepted.
    pub missing: Vec<EventId>,
    /// Accepted more than once, with how many times.
    pub repeated: Vec<(EventId, u32)>,
    /// Accepted, never produced (or produced under another identity), with how many times.
    pub unexpected: Vec<(EventId, u32)>,
}

impl ExactlyOnce {
    /// Compares the `(partition, key, value)` records that should each reach the API (flat test
    /// records: see [`EventId::of_record`]) with the sandbox's event log (`Sandbox::events`).
    pub fn check(records: &[(i32, String, String)], accepted: &[serde_json::Value]) -> ExactlyOnce {
        use std::collections::BTreeMap;
        let mut counts: BTreeMap<EventId, u32> = BTreeMap::new();
        for e in accepted {
            *counts.entry(EventId::of_event(e)).or_default() += 1;
        }
        let mut report = ExactlyOnce {
            expected: records.len(),
            ..ExactlyOnce::default()
        };
        let mut produced = std::collections::BTreeSet::new();
        for (_, _, value) in records {
            let id = EventId::of_record(value);
            assert!(produced.insert(id.clone()), "test data: {id:?} is produced twice");
            match counts.get(&id) {
                None => report.missing.push(id),
                Some(&n) if n > 1 => report.repeated.push((id, n)),
                Some(_) => {}
            }
        }
        report.unexpected = counts.into_iter().filter(|(id, _)| !produced.contains(id)).collect();
        report
    }

    /// Whether every record was accepted exactly once and nothing else was.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.repeated.is_empty() && self.unexpected.is_empty()
    }
}

impl std::fmt::Display for ExactlyOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 10;
        let keyless =
            |ids: &mut dyn Iterator<Item = &EventId>| ids.filter(|i| matches!(i, EventId::Keyless { .. })).count();
        writeln!(f, "{} records expected once each:", self.expected)?;
        writeln!(
            f,
            "  missing: {} ({} keyless), e.g. {:?}",
            self.missing.len(),
            keyless(&mut self.missing.iter()),
            &self.missing[..self.missing.len().min(SHOWN)]
        )?;
        writeln!(
            f,
            "  accepted more than once: {} ({} keyless), e.g. {:?}",
            self.repeated.len(),
            keyless(&mut self.repeated.iter().map(|(i, _)| i)),
            &self.repeated[..self.repeated.len().min(SHOWN)]
        )?;
        write!(
            f,
            "  accepted, never produced: {}, e.g. {:?}",
            self.unexpected.len(),
            &self.unexpected[..self.unexpected.len().min(SHOWN)]
        )
    }
}

/// Asserts that every record of `records` (with or without a transaction id) was accepted
/// exactly once according to the sandbox's event log `accepted`, and nothing else was; the
/// panic message lists the missing, repeated and unexpected events with examples.
pub fn assert_each_accepted_once(records: &[(i32, String, String)], accepted: &[serde_json::Value]) {
    let report = ExactlyOnce::check(records, accepted);
    assert!(report.is_clean(), "{report}");
}

/// Produces `(partition, key, value)` records with `producer` and waits for every acknowledgement
/// (sent together, 2,000 at a time: one awaited send per record waits for the linger each time).
pub async fn produce_with(producer: &FutureProducer, topic: &str, records: &[(i32, String, String)]) {
    for chunk in records.chunks(2000) {
        let mut futs = Vec::with_capacity(chunk.len());
        for (p, k, v) in chunk {
            let record = FutureRecord::to(topic)
                .partition(*p)
                .key(k.as_str())
                .payload(v.as_str());
            futs.push(producer.send_result(record).map_err(|(e, _)| e).expect("enqueue"));
        }
        for f in futs {
            f.await
                .expect("delivery report")
                .map_err(|(e, _)| e)
                .expect("the broker acknowledged the record");
        }
    }
}

/// A header of a record (a dead letter's `dp.*`), as text ("" when absent).
pub fn header(m: &rdkafka::message::OwnedMessage, key: &str) -> String {
    use rdkafka::message::Headers;
    use rdkafka::Message;
    m.headers()
        .and_then(|h| {
            h.iter()
                .find(|h| h.key == key)
                .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
        })
        .unwrap_or_default()
}

/// `[dedupe]` on a redis-server shared by the processes of a test: what makes "nothing sent twice"
/// hold across processes and restarts.
pub fn redis_dedupe_toml(redis: &Redis, prefix: &str, lease: &str) -> String {
    format!(
        "[dedupe]\nstore = \"redis\"\n[dedupe.redis]\nurl = \"{}\"\nprefix = \"{prefix}\"\nlease = \"{lease}\"\n\
         timeout = \"1s\"\npoll_interval = \"100ms\"\n",
        redis.url()
    )
}

/// The identities of the events the sandbox accepted, with how often: the transaction id, or
/// for an event without one its click id (unique per keyless event in the test data).
pub async fn accepted_ids(sandbox: &Sandbox) -> std::collections::HashMap<String, u32> {
    let mut m = std::collections::HashMap::new();
    for e in sandbox.events().await {
        if let Some(id) = test_identity(&e) {
            *m.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    m
}

/// An accepted event's identity in the test data: its transaction id, else its click id.
pub fn test_identity(event: &serde_json::Value) -> Option<&str> {
    event["transaction_id"].as_str().or_else(|| event["click_id"].as_str())
}

fn which(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/usr/bin"));
    dirs.push(PathBuf::from("/usr/local/bin"));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{name}` is not installed: run scripts/test.sh, which installs the test prerequisites")
}

/// Reads a log file's lines (for assertions on logs).
pub fn log_lines(path: &Path) -> Vec<String> {
    match std::fs::File::open(path) {
        Ok(f) => BufReader::new(f).lines().map_while(Result::ok).collect(),
        Err(_) => Vec::new(),
    }
}
