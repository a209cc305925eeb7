//! Load benchmark of the sandbox: the release binary as a separate process (`--rate-limit 0`),
//! loaded from this process over several keep-alive connections on loopback with batches of 500
//! realistic, distinct events for a bounded time. Every response must be 200 and the sandbox's
//! count must match what was sent, with no duplicate transaction id.
//!
//! `cargo bench --bench sandbox_load` (env: SANDBOX_LOAD_SECS, default 8; SANDBOX_LOAD_CONNS,
//! default 4).

use std::fmt::Write as _;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "dp_bench_key";
const BATCH: usize = 500;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A batch of `BATCH` events from the seed document's use cases, unique by `seq`.
fn batch_body(conn: u64, seq: u64, out: &mut String) {
    out.clear();
    out.push('[');
    let ts = 1_702_963_200 + seq % 86_400;
    for i in 0..BATCH as u64 {
        if i > 0 {
            out.push(',');
        }
        let user = (seq * 7 + i) % 100_000;
        let id = format!("c{conn}_s{seq}_i{i}");
        let _ = match i % 5 {
            0 => write!(
                out,
                r#"{{"client_user_id":"user_{user}","click_id":"clk_{id}","event_name":"deposit","currency":"USD","amount":{}.50,"transaction_id":"dep_{id}","timestamp":{ts},"ip_address":"203.0.113.{}","is_crypto":false}}"#,
                10 + i % 90,
                i % 250
            ),
            1 => write!(
                out,
                r#"{{"client_user_id":"user_{user}","event_name":"bet","game_type":"slot","game_provider":"GGP","currency":"EUR","amount":5.00,"transaction_id":"bet_{id}","timestamp":{ts},"is_crypto":false,"bet_result":"win","bet_result_amount":1.25}}"#
            ),
            2 => write!(
                out,
                r#"{{"client_user_id":"user_{user}","click_id":"clk_{id}","event_name":"login","timestamp":{ts},"ip_address":"2001:db8::{:x}","user_agent":"Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"}}"#,
                i + 1
            ),
            3 => write!(
                out,
                r#"{{"client_user_id":"user_{user}","event_name":"bet","game_type":"sports","game_provider":"EA","currency":"USDT","amount":20.00,"transaction_id":"bet_{id}","timestamp":{ts},"is_crypto":true,"campaign":"winter_{}"}}"#,
                i % 4
            ),
            _ => write!(
                out,
                r#"{{"client_user_id":"user_{user}","event_name":"withdraw","currency":"GBP","amount":75.00,"transaction_id":"wd_{id}","timestamp":{ts},"ip_address":"198.51.100.{}","is_crypto":false}}"#,
                i % 250
            ),
        };
    }
    out.push(']');
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    // `cargo bench` passes --bench; anything else (`cargo test --all-targets`) gets a one-second
    // correctness run rather than the measurement.
    let measuring = std::env::args().any(|a| a == "--bench");
    let secs = env_or("SANDBOX_LOAD_SECS", if measuring { 8 } else { 1 });
    let conns = env_or("SANDBOX_LOAD_CONNS", 4);
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

    // The load generator gets one thread; the sandbox process has the rest of the machine.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(conns as usize)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let elapsed = rt.block_on(async {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for conn in 0..conns {
            let (client, url, sent, failures, stop) = (
                client.clone(),
                url.clone(),
                sent.clone(),
                failures.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut body = String::with_capacity(BATCH * 300);
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    batch_body(conn, seq, &mut body);
                    seq += 1;
                    let resp = client
                        .post(format!("{url}/v2/s2s/batch"))
                        .header("x-api-key", KEY)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                            sent.fetch_add(BATCH as u64, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            eprintln!("unexpected {status}: {}", &text[..text.len().min(500)]);
                            failures.fetch_add(1, Ordering::Relaxed);
                            stop.store(true, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("request failed: {e}");
                            failures.fetch_add(1, Ordering::Relaxed);
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    });
    let stats: serde_json::Value = rt.block_on(async {
        client
            .get(format!("{url}/_sandbox/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let sent = sent.load(Ordering::Relaxed);
    let failures = failures.load(Ordering::Relaxed);
    let accepted = stats["accepted_events"].as_u64().unwrap();
    let dups = stats["duplicate_transaction_ids"].as_object().unwrap().len();
    let rss = std::fs::read_to_string(format!("/proc/{}/status", sandbox.0.id()))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.to_string()))
        .unwrap_or_default();
    println!(
        "sandbox_load: {sent} events in {:.2}s over {conns} connections, batches of {BATCH}: {:.0} events/s \
         ({:.0} requests/s); sandbox {}",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        sent as f64 / BATCH as f64 / elapsed.as_secs_f64(),
        rss.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    );
    assert_eq!(failures, 0, "every response must be 200");
    assert_eq!(accepted, sent, "the sandbox's count must match what was sent");
    assert_eq!(dups, 0, "no transaction id was sent twice");
    assert_eq!(stats["by_status"]["200"].as_u64(), Some(sent / BATCH as u64));
}
