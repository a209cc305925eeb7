//! Issue 23 over real sockets: both servers the project runs (the operations port and the
//! sandbox) close idle and slow clients within their timeouts and refuse connections over their
//! cap at once; the sandbox refuses to open its admin endpoints beyond loopback without a token,
//! keeps its memory bounded over a million events and answers a request full of errors briefly.
//!
//! Timeouts here are 2 s and every bound asserted is 10 s or more: nothing asserts speed.

use datapulse_bridge::http_server::Limits;
use datapulse_bridge::sandbox::{self, SandboxArgs, SandboxError, SandboxHandle};
use datapulse_bridge::telemetry::Telemetry;
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "dp_limits_key";
const TIMEOUT: Duration = Duration::from_secs(2);
/// Generous: a closed connection must be seen closed well within this.
const BOUND: Duration = Duration::from_secs(10);

async fn sandbox(tweak: impl FnOnce(&mut SandboxArgs)) -> SandboxHandle {
    let mut args = SandboxArgs {
        listen: "127.0.0.1:0".into(),
        api_keys: vec![KEY.into()],
        rate_limit: 0,
        header_read_timeout: TIMEOUT,
        body_read_timeout: TIMEOUT,
        ..SandboxArgs::default()
    };
    tweak(&mut args);
    sandbox::start(args).await.expect("sandbox starts")
}

async fn ops_port(max_connections: usize) -> SocketAddr {
    Telemetry::new()
        .serve(
            "127.0.0.1:0",
            Limits {
                header_read_timeout: TIMEOUT,
                max_connections,
            },
        )
        .await
        .expect("the operations port serves")
}

/// Reads (and drops) whatever the server sends until it closes the connection (EOF or reset);
/// how long that took, or `None` if it was still open after [`BOUND`].
async fn time_to_close(stream: &mut TcpStream, started: Instant) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(BOUND, read_all)
        .await
        .ok()
        .map(|()| started.elapsed())
}

/// Sends `head` and then a further header line every 500 ms, never ending the head.
async fn slow_header(addr: SocketAddr, head: &'static str) -> Option<Duration> {
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let drip = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if wr.write_all(format!("x-drip-{i}: 1\r\n").as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(BOUND, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| started.elapsed());
    drip.abort();
    closed
}

/// Sends a complete head declaring a 1000-byte body, then one byte of it every 500 ms. What the
/// server answered (if anything) and when the connection closed.
async fn slow_body(addr: SocketAddr, head: &'static str) -> (String, Option<Duration>) {
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let drip = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if wr.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let closed = tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| started.elapsed());
    drip.abort();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// One plain request on a fresh connection; the status line, or the error.
async fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let req = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.map_err(|e| e.to_string())?;
        Ok(text.lines().next().unwrap_or("").to_string())
    };
    tokio::time::timeout(BOUND, req)
        .await
        .map_err(|_| "no answer".to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_header_read_timeout_on_both_servers() {
    let sb = sandbox(|_| {}).await;
    let ops = ops_port(8).await;
    for (name, addr) in [("sandbox", sb.addr()), ("operations port", ops)] {
        // Never a byte.
        let started = Instant::now();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let took = time_to_close(&mut idle, started).await;
        assert!(
            took.is_some(),
            "{name}: an idle connection was still open after {BOUND:?}"
        );
        assert!(
            took.unwrap() >= TIMEOUT - Duration::from_millis(200),
            "{name}: closed early"
        );

        // Idle after one answer on a kept-alive connection.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(n > 0 && buf.starts_with(b"HTTP/1.1 "), "{name}: an answer");
        let took = time_to_close(&mut kept, Instant::now()).await;
        assert!(
            took.is_some(),
            "{name}: a kept-alive idle connection was still open after {BOUND:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_a_line_at_a_time_is_cut_off_on_both_servers() {
    let sb = sandbox(|_| {}).await;
    let ops = ops_port(8).await;
    for (name, addr, head) in [
        ("sandbox", sb.addr(), "POST /v2/s2s/batch HTTP/1.1\r\nhost: x\r\n"),
        ("operations port", ops, "GET /metrics HTTP/1.1\r\nhost: x\r\n"),
    ] {
        let took = slow_header(addr, head).await;
        assert!(
            took.is_some(),
            "{name}: a slow head was still being read after {BOUND:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_a_byte_at_a_time_is_cut_off_on_both_servers() {
    let sb = sandbox(|_| {}).await;
    let ops = ops_port(8).await;
    // The sandbox reads bodies: 408 after --body-read-timeout, and the connection closes.
    let (answer, closed) = slow_body(
        sb.addr(),
        "POST /v2/s2s/batch HTTP/1.1\r\nhost: x\r\nx-api-key: dp_limits_key\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n[",
    )
    .await;
    assert!(
        closed.is_some(),
        "sandbox: a slow body was still being read after {BOUND:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    // The admin endpoint that reads a body too.
    let (answer, closed) = slow_body(
        sb.addr(),
        "PUT /_sandbox/faults HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{",
    )
    .await;
    assert!(closed.is_some() && answer.starts_with("HTTP/1.1 408"), "{answer}");
    // The operations port reads no body: it answers, and the connection ends with the answer.
    let (answer, closed) = slow_body(ops, "POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n").await;
    assert!(closed.is_some(), "operations port: still open after {BOUND:?}");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_cap_a_connection_is_refused_at_once_and_served_once_others_close() {
    let sb = sandbox(|a| a.max_connections = 3).await;
    let ops = ops_port(3).await;
    for (name, addr, path) in [
        ("sandbox", sb.addr(), "/_sandbox/stats"),
        ("operations port", ops, "/health/live"),
    ] {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // Give the server the moment it needs to accept the three.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let mut over = TcpStream::connect(addr).await.unwrap();
        let mut text = String::new();
        let _ = tokio::time::timeout(BOUND, over.read_to_string(&mut text)).await;
        assert!(
            started.elapsed() < BOUND,
            "{name}: a connection over the cap waited instead of being refused"
        );
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 503"),
            "{name}: refused with {text:?}"
        );
        // Refused quickly: well inside the header-read timeout, so not by it.
        assert!(
            started.elapsed() < TIMEOUT,
            "{name}: refusal took {:?}",
            started.elapsed()
        );
        drop(held);
        // Once the others closed, a valid request is served (the server notices the closes at
        // once; a few tries cover the moment in between).
        let deadline = Instant::now() + BOUND;
        let status = loop {
            let status = get(addr, path).await;
            if matches!(&status, Ok(s) if s.starts_with("HTTP/1.1 200")) || Instant::now() > deadline {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            matches!(&status, Ok(s) if s.starts_with("HTTP/1.1 200")),
            "{name}: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_refuses_to_open_its_admin_endpoints_beyond_loopback_without_a_token() {
    let open = sandbox::start(SandboxArgs {
        listen: "0.0.0.0:0".into(),
        api_keys: vec![KEY.into()],
        admin_token: None,
        ..SandboxArgs::default()
    })
    .await;
    let Err(err @ SandboxError::AdminOpen { .. }) = open else {
        panic!("started without a token on 0.0.0.0: {:?}", open.map(|h| h.addr()))
    };
    let msg = err.to_string();
    assert!(
        msg.contains("DATAPULSE_SANDBOX_ADMIN_TOKEN") && msg.contains("--admin-token-file"),
        "{msg}"
    );

    // A token from a file opens it, and the endpoints want it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin-token");
    std::fs::write(&file, "adm_from_file_77\n").unwrap();
    let h = sandbox::start(SandboxArgs {
        listen: "0.0.0.0:0".into(),
        api_keys: vec![KEY.into()],
        admin_token: None,
        admin_token_file: Some(file.clone()),
        ..SandboxArgs::default()
    })
    .await
    .expect("starts with a token file");
    let url = format!("http://127.0.0.1:{}/_sandbox/stats", h.addr().port());
    let client = reqwest::Client::new();
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    let ok = client
        .get(&url)
        .header("x-admin-token", "adm_from_file_77")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    // Both forms at once, an empty file and a missing file are refused, without the token.
    let both = sandbox::start(SandboxArgs {
        listen: "127.0.0.1:0".into(),
        api_keys: vec![KEY.into()],
        admin_token: Some("adm_flag_secret".into()),
        admin_token_file: Some(file),
        ..SandboxArgs::default()
    })
    .await;
    assert!(matches!(both, Err(SandboxError::TwoAdminTokens)));
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let r = sandbox::start(SandboxArgs {
        listen: "127.0.0.1:0".into(),
        api_keys: vec![KEY.into()],
        admin_token: None,
        admin_token_file: Some(empty),
        ..SandboxArgs::default()
    })
    .await;
    assert!(matches!(r, Err(SandboxError::EmptyAdminToken)));
    // On loopback no token is needed (tests, a partner's own machine).
    let local = sandbox(|a| a.admin_token = None).await;
    assert_eq!(
        client
            .get(format!("{}/_sandbox/stats", local.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_out_of_range_are_refused_at_start_naming_the_flag() {
    let base = || SandboxArgs {
        listen: "127.0.0.1:0".into(),
        api_keys: vec![KEY.into()],
        ..SandboxArgs::default()
    };
    for (args, flag) in [
        (
            SandboxArgs {
                header_read_timeout: Duration::ZERO,
                ..base()
            },
            "--header-read-timeout",
        ),
        (
            SandboxArgs {
                body_read_timeout: Duration::ZERO,
                ..base()
            },
            "--body-read-timeout",
        ),
        (
            SandboxArgs {
                max_connections: 0,
                ..base()
            },
            "--max-connections",
        ),
        (
            SandboxArgs {
                max_stored_events: 499,
                ..base()
            },
            "--max-stored-events",
        ),
    ] {
        match sandbox::start(args).await {
            Err(e @ SandboxError::Invalid { .. }) => assert!(e.to_string().starts_with(flag), "{e}"),
            other => panic!("{flag}: {:?}", other.map(|h| h.addr())),
        }
    }
}

/// The binary takes the token from the environment (not argv, which `ps` shows), and refuses
/// 0.0.0.0 without one, saying how to set it.
#[test]
fn the_binary_takes_the_admin_token_from_the_environment() {
    let bin = env!("CARGO_BIN_EXE_datapulse-bridge");
    let out = Command::new(bin)
        .args(["sandbox", "--listen", "0.0.0.0:0", "--api-key", KEY])
        .env_remove("DATAPULSE_SANDBOX_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DATAPULSE_SANDBOX_ADMIN_TOKEN"), "{err}");

    let mut child = Command::new(bin)
        .args(["sandbox", "--listen", "0.0.0.0:0", "--api-key", KEY])
        .env("DATAPULSE_SANDBOX_ADMIN_TOKEN", "adm_env_secret_5")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let stats = |token: Option<&str>| {
        let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        s.set_read_timeout(Some(BOUND)).unwrap();
        let auth = token.map(|t| format!("x-admin-token: {t}\r\n")).unwrap_or_default();
        write!(
            s,
            "GET /_sandbox/stats HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.lines().next().unwrap_or("").to_string()
    };
    assert!(stats(None).starts_with("HTTP/1.1 401"));
    assert!(stats(Some("adm_env_secret_5")).starts_with("HTTP/1.1 200"));
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    assert!(!stderr.contains("adm_env_secret_5"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seventy_thousand_bad_properties_get_a_short_answer_that_counts_them_all() {
    let sb = sandbox(|_| {}).await;
    let mut body = String::from(r#"{"client_user_id":"u","event_name":"login","timestamp":1702963200"#);
    for i in 0..70_000 {
        body.push_str(&format!(r#","p{i}":[]"#));
    }
    body.push('}');
    assert!(body.len() <= 1_048_576, "{} bytes", body.len());
    let resp = reqwest::Client::new()
        .post(format!("{}/v2/s2s/event", sb.url()))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let text = resp.text().await.unwrap();
    assert!(text.len() < 64 * 1024, "the answer is {} bytes", text.len());
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"], "validation_failed");
    assert_eq!(v["error_count"], 70_000);
    let listed = v["errors"].as_array().unwrap();
    assert!(!listed.is_empty() && listed.len() <= 100, "{}", listed.len());
    assert_eq!(listed[0]["rule"], "property_type");
    println!("70,000 bad properties: answer of {} bytes", text.len());
}

/// A million accepted events, every id distinct, then every 1000th again: the sandbox process's
/// resident memory stays under 150 MiB and `duplicate_transaction_ids` is exact.
#[test]
fn a_million_events_keep_the_sandbox_small_and_duplicates_exact() {
    const BATCH: u64 = 500;
    const EVENTS: u64 = 1_000_000;
    let mut child = Command::new(env!("CARGO_BIN_EXE_datapulse-bridge"))
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
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().strip_prefix("sandbox listening on ").unwrap().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    let batch = |from: u64, step: u64| {
        let mut body = String::from("[");
        for i in 0..BATCH {
            if i > 0 {
                body.push(',');
            }
            let n = from + i * step;
            body.push_str(&format!(
                r#"{{"client_user_id":"user_{}","event_name":"bet","game_type":"slot","currency":"EUR","amount":5.00,"transaction_id":"bet_{n:07}","timestamp":1702963200,"bet_result":"win","bet_result_amount":1.25}}"#,
                n % 100_000
            ));
        }
        body.push(']');
        body
    };
    let send = |body: String| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let r = client
                .post(format!("{url}/v2/s2s/batch"))
                .header("x-api-key", KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    rt.block_on(async {
        // Four requests at a time.
        let mut starts = (0..EVENTS / BATCH).map(|b| b * BATCH);
        loop {
            let group: Vec<u64> = starts.by_ref().take(4).collect();
            if group.is_empty() {
                break;
            }
            futures::future::join_all(group.into_iter().map(|s| send(batch(s, 1)))).await;
        }
        // 1000 ids a second time: bet_0000000, bet_0001000, … bet_0999000.
        send(batch(0, 1000)).await;
        send(batch(500_000, 1000)).await;
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
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "1M events: sandbox RSS {} KiB ({:.1} MiB), peak {} KiB ({:.1} MiB)",
        rss_kib,
        rss_kib as f64 / 1024.0,
        hwm_kib,
        hwm_kib as f64 / 1024.0
    );
    assert_eq!(stats["accepted_events"], EVENTS + 1000);
    let dups = stats["duplicate_transaction_ids"].as_object().unwrap();
    assert_eq!(stats["duplicated_transaction_ids"], 1000);
    assert_eq!(stats["duplicate_acceptances"], 1000);
    assert_eq!(dups.len(), 1000);
    assert!(dups.values().all(|n| n == 2));
    assert!(dups.contains_key("bet_0999000"));
    // At most 100,000 stored (fewer if the 32 MiB byte budget comes first).
    assert!(stats["evicted_events"].as_u64().unwrap() >= EVENTS + 1000 - 100_000);
    assert!(rss_kib < 150 * 1024, "RSS {rss_kib} KiB");
}
