//! `datapulse-bridge demo`: the whole pipeline on embedded components, with no setup.
//!
//! librdkafka's mock cluster is the broker, the sandbox runs in-process, a generator writes
//! realistic partner records (with duplicates, malformed records and a double-counted bet), and
//! the real `run` pipeline delivers them. A progress line shows the outcomes as they happen; the
//! summary accounts for every record.

use crate::pipeline::Totals;
use crate::telemetry::Telemetry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `datapulse-bridge demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Records to generate.
    #[arg(long, default_value_t = 5000)]
    pub records: usize,
    /// Seed of the generator (the same seed gives the same records).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

const TOPIC: &str = "wallet.events";
const DLQ_TOPIC: &str = "datapulse-bridge.dead-letter";
const KEY: &str = "demo_key_0001";
const PARTITIONS: i32 = 4;

/// What the generator produced, to compare with what the bridge did.
#[derive(Debug, Default)]
pub struct Generated {
    pub records: Vec<(String, Vec<u8>)>,
    pub duplicates: usize,
    pub malformed: usize,
    pub not_events: usize,
    pub double_counts: usize,
}

/// Realistic partner records: a nested wallet/casino shape with string amounts and RFC 3339
/// times. About 2% are replays of an earlier record, 1% are malformed, 3% are balance snapshots
/// (not events for the API), and a few settle a bet that already carried its result.
pub fn generate(n: usize, seed: u64) -> Generated {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut g = Generated::default();
    let mut pattern_a_bets: Vec<(String, String)> = Vec::new();
    let mut open_bets: Vec<(String, String)> = Vec::new();
    let base = 1_764_000_000i64;
    let ccys = ["EUR", "USD", "GBP", "BRL", "BTC", "USDT"];
    let games = [
        ("slot", "GGP"),
        ("roulette", "EVO"),
        ("sports", "BETR"),
        ("poker", "PKR"),
    ];
    while g.records.len() < n {
        let i = g.records.len();
        let user = format!("p-{}", rng.random_range(1..=400));
        let at = time::OffsetDateTime::from_unix_timestamp(base + i as i64).expect("valid time");
        let occurred = at
            .format(&time::format_description::well_known::Rfc3339)
            .expect("formats");
        let player = json!({"id": user, "ip": format!("203.0.113.{}", rng.random_range(1..=254)),
                            "click_id": format!("clk-{}", rng.random_range(10_000..99_999)),
                            "agent": "Mozilla/5.0 (Linux; Android 14) Mobile"});
        let ccy = ccys[rng.random_range(0..ccys.len())];
        let money = |amount: f64| json!({"amount": format!("{amount:.2}"), "currency": ccy.to_lowercase()});
        let roll = rng.random_range(0..1000);
        let tx = format!("tx-{seed}-{i}");
        let record: Value = match roll {
            0..=19 if i > 10 => {
                // A replay of an earlier record (producer retry, CDC snapshot…).
                let j = rng.random_range(0..i);
                g.duplicates += 1;
                let (k, v) = g.records[j].clone();
                g.records.push((k, v));
                continue;
            }
            20..=24 => {
                g.malformed += 1;
                g.records
                    .push((user, b"{\"event\": \"DEPOSIT_COMPLETED\", \"player\": ".to_vec()));
                continue;
            }
            25..=29 => {
                g.malformed += 1;
                json!({"event": "DEPOSIT_COMPLETED", "ref": tx, "player": player, "occurred_at": occurred,
                       "money": {"amount": "12.00"}})
            }
            30..=59 => {
                g.not_events += 1;
                json!({"event": "BALANCE_SNAPSHOT", "ref": tx, "player": player, "occurred_at": occurred,
                       "money": money(rng.random_range(0.0..5000.0))})
            }
            60..=62 if !pattern_a_bets.is_empty() => {
                // A standalone settlement of a bet that already carried its result: double count.
                g.double_counts += 1;
                let (bet, ccy) = pattern_a_bets.swap_remove(rng.random_range(0..pattern_a_bets.len()));
                json!({"event": "BET_WON", "ref": tx, "parent_ref": bet, "player": player, "occurred_at": occurred,
                       "money": {"amount": "4.00", "currency": ccy}})
            }
            63..=149 => json!({"event": "PLAYER_REGISTERED", "player": player, "occurred_at": occurred}),
            150..=349 => json!({"event": "PLAYER_LOGIN", "player": player, "occurred_at": occurred}),
            350..=499 => json!({"event": "DEPOSIT_COMPLETED", "ref": tx, "player": player, "occurred_at": occurred,
                                "money": money(rng.random_range(5.0..500.0))}),
            500..=579 => json!({"event": "WITHDRAWAL_COMPLETED", "ref": tx, "player": player, "occurred_at": occurred,
                                "money": money(rng.random_range(10.0..800.0))}),
            580..=799 => {
                let (game, provider) = games[rng.random_range(0..2)];
                let stake: f64 = rng.random_range(0.5..50.0);
                let won = rng.random_bool(0.45);
                let net = if won {
                    stake * rng.random_range(0.1..3.0)
                } else {
                    -stake
                };
                pattern_a_bets.push((tx.clone(), ccy.to_lowercase()));
                json!({"event": "BET_PLACED", "ref": tx, "player": player, "occurred_at": occurred,
                       "game": {"type": game, "provider": provider}, "money": money(stake),
                       "result": {"outcome": if won { "win" } else { "loss" }, "net": format!("{net:.2}")}})
            }
            800..=899 => {
                let (game, provider) = games[rng.random_range(2..4)];
                open_bets.push((tx.clone(), ccy.to_lowercase()));
                json!({"event": "BET_PLACED", "ref": tx, "player": player, "occurred_at": occurred,
                       "game": {"type": game, "provider": provider}, "money": money(rng.random_range(1.0..100.0))})
            }
            _ if !open_bets.is_empty() => {
                let (bet, ccy) = open_bets.swap_remove(rng.random_range(0..open_bets.len()));
                let won = rng.random_bool(0.4);
                let net: f64 = rng.random_range(1.0..150.0);
                json!({"event": if won { "BET_WON" } else { "BET_LOST" }, "ref": tx, "parent_ref": bet,
                       "player": player, "occurred_at": occurred,
                       "money": {"amount": format!("{:.2}", if won { net } else { -net }), "currency": ccy}})
            }
            _ => json!({"event": "PLAYER_LOGIN", "player": player, "occurred_at": occurred}),
        };
        // Keyed by player, as partners do, so that a player's events stay in order.
        g.records.push((user, serde_json::to_vec(&record).expect("serialises")));
    }
    g
}

/// The demo's bridge configuration: the mapping of the generator's shape.
pub fn demo_config(bootstrap: &str, api: &str) -> String {
    format!(
        r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "datapulse-bridge-demo"
topics = ["{TOPIC}"]
commit_interval = "200ms"
[kafka.properties]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500

[api]
base_url = "{api}"
key = "{KEY}"

[batch]
max_events = 500
linger = "200ms"

[dead_letter]
topic = "{DLQ_TOPIC}"

[shutdown]
deadline = "10s"

{MAPPING}"#
    )
}

/// The mapping of the demo's partner shape (also `examples/demo/`).
pub const MAPPING: &str = r#"[[mapping]]
topics = ["wallet.events"]
skip_when = [{ from = "/event", in = ["BALANCE_SNAPSHOT"] }]
event_name = { from = "/event", table = { PLAYER_REGISTERED = "register", PLAYER_LOGIN = "login", DEPOSIT_COMPLETED = "deposit", WITHDRAWAL_COMPLETED = "withdraw", BET_PLACED = "bet", BET_WON = "win", BET_LOST = "loss" }, otherwise = "dead-letter" }
client_user_id = "/player/id"
click_id = "/player/click_id"
ip_address = "/player/ip"
user_agent = "/player/agent"
timestamp = { from = "/occurred_at", time = "rfc3339" }
transaction_id = "/ref"
parent_transaction_id = "/parent_ref"
amount = { from = "/money/amount", as = "number" }
currency = { from = "/money/currency", case = "upper" }
is_crypto = { from = "/money/currency", case = "upper", in = ["BTC", "ETH", "USDT", "USDC"] }
game_type = "/game/type"
game_provider = "/game/provider"
bet_result = "/result/outcome"
bet_result_amount = { from = "/result/net", as = "number" }
"#;

/// Runs the demo and prints the summary.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("datapulse-bridge demo: mock Kafka cluster + in-process sandbox + the real pipeline\n");
    let cluster = MockCluster::new(1)?;
    cluster.create_topic(TOPIC, PARTITIONS, 1)?;
    cluster.create_topic(DLQ_TOPIC, 1, 1)?;
    let bootstrap = cluster.bootstrap_servers();

    let sandbox = crate::sandbox::start(crate::sandbox::SandboxArgs {
        listen: "127.0.0.1:0".into(),
        api_keys: vec![KEY.into()],
        ..Default::default()
    })
    .await?;
    let api = format!("http://{}", sandbox.addr());
    println!("  sandbox (the Server Events API, 60 requests/minute per key) on {api}");

    let generated = generate(args.records, args.seed);
    println!(
        "  generating {} partner records on {TOPIC} ({PARTITIONS} partitions): {} replays, {} malformed, {} balance snapshots, {} double-counted settlements",
        generated.records.len(),
        generated.duplicates,
        generated.malformed,
        generated.not_events,
        generated.double_counts
    );
    produce(&bootstrap, &generated.records).await?;

    let cfg = crate::config::from_toml_str(&demo_config(&bootstrap, &api))?;
    let telemetry = Telemetry::new();
    let shutdown = CancellationToken::new();
    let pipeline = tokio::spawn(crate::pipeline::run(cfg, shutdown.clone(), telemetry.clone()));
    let total = generated.records.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(50);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let c = Totals::read(&telemetry);
        print!(
            "\r  consumed {:>6}  delivered {:>6}  duplicate {:>4}  filtered {:>4}  dead-lettered {:>4}  requests {:>3}",
            c.consumed,
            c.delivered,
            c.duplicate,
            c.filtered,
            c.dead_lettered,
            sandbox.stats().requests,
        );
        use std::io::{IsTerminal, Write};
        if !std::io::stdout().is_terminal() {
            println!();
        }
        let _ = std::io::stdout().flush();
        if c.finished() >= total || Instant::now() > deadline || pipeline.is_finished() {
            break;
        }
    }
    println!();
    shutdown.cancel();
    pipeline.await??;

    let stats = sandbox.stats();
    let c = Totals::read(&telemetry);
    let delivered = c.delivered;
    println!("\nSummary ({:.1}s)", started.elapsed().as_secs_f64());
    println!("  records produced      {total}");
    println!("  delivered             {delivered}");
    println!("  duplicates dropped    {}", c.duplicate);
    println!("  filtered (not events) {}", c.filtered);
    println!("  dead-lettered         {}", c.dead_lettered);
    println!("  unaccounted           {}", total.saturating_sub(c.finished()));
    let requests = stats.requests;
    println!(
        "  API requests          {requests} ({:.1} events per request); sandbox accepted {} events, {} transaction ids more than once",
        if requests > 0 { stats.accepted_events as f64 / requests as f64 } else { 0.0 },
        stats.accepted_events,
        stats.duplicate_transaction_ids.len()
    );
    let reasons = dead_letter_reasons(&bootstrap, c.dead_lettered as usize);
    println!("  dead letters on topic {DLQ_TOPIC}, by reason:");
    for ((stage, reason), n) in reasons {
        println!("    {n:>4}  {stage}: {reason}");
    }
    if c.finished() < total {
        anyhow::bail!("{} records have no outcome", total - c.finished());
    }
    Ok(())
}

async fn produce(bootstrap: &str, records: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "10")
        .create()?;
    let mut futures = Vec::with_capacity(records.len());
    for (k, v) in records {
        let record = FutureRecord::to(TOPIC).key(k.as_str()).payload(v.as_slice());
        futures.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for f in futures {
        f.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

fn dead_letter_reasons(bootstrap: &str, expected: usize) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    let Ok(consumer) = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "demo-dead-letter-reader")
        .set("auto.offset.reset", "earliest")
        .create::<BaseConsumer>()
    else {
        return out;
    };
    if consumer.subscribe(&[DLQ_TOPIC]).is_err() {
        return out;
    }
    let header = |m: &rdkafka::message::BorrowedMessage<'_>, k: &str| {
        m.headers()
            .and_then(|h| h.iter().find(|h| h.key == k).and_then(|h| h.value))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    while seen < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            seen += 1;
            *out.entry((
                header(&m, crate::dlq::headers::STAGE),
                header(&m, crate::dlq::headers::REASON),
            ))
            .or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_mixed() {
        let a = generate(2000, 1);
        let b = generate(2000, 1);
        assert_eq!(a.records, b.records);
        assert_eq!(a.records.len(), 2000);
        assert!(
            a.duplicates > 0 && a.malformed > 0 && a.not_events > 0 && a.double_counts > 0,
            "{a:?}"
        );
    }
}
