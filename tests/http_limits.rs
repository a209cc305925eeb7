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
                max_connections_setting: "telemetry.max_connections",
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

/// Connects with a 4 KiB receive buffer, pipelines `requests` copies of `GET path` and never
/// reads; after three timeouts reads what is left. `true` when the server had closed the
/// connection: what was left was what the kernel buffers held (under 16 MiB), then EOF or a
/// reset; a connection still served would go on delivering its hundreds of MiB of answers.
async fn closed_while_not_reading(addr: SocketAddr, path: &str, requests: usize) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    let writer = tokio::spawn(async move {
        for _ in 0..requests {
            if wr.write_all(request.as_bytes()).await.is_err() {
                return;
            }
        }
        // Held open: the server, not this side, must end the connection.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    tokio::time::sleep(TIMEOUT * 3).await;
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = 0usize;
    let closed = tokio::time::timeout(BOUND, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => {
                    left += n;
                    if left > 16 << 20 {
                        return false;
                    }
                }
            }
        }
    })
    .await
    .unwrap_or(false);
    writer.abort();
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_answers_is_cut_off_on_both_servers() {
    let sb = sandbox(|_| {}).await;
    let ops = ops_port(8).await;
    // The sandbox's OpenAPI document (about 140 KiB) and the operations port's metrics, asked
    // far more often than any buffer holds.
    assert!(
        closed_while_not_reading(sb.addr(), "/_sandbox/openapi.yaml", 3_000).await,
        "sandbox: a client that reads none of its answers kept its connection"
    );
    assert!(
        closed_while_not_reading(ops, "/metrics", 100_000).await,
        "operations port: a client that reads none of its answers kept its connection"
    );
    // And the servers still answer others.
    assert!(get(sb.addr(), "/_sandbox/stats").await.unwrap().contains(" 200 "));
    assert!(get(ops, "/health/live").await.unwrap().contains(" 200 "));
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
        (
            SandboxArgs {
                max_stored_bytes: 1_048_575,
                ..base()
            },
            "--max-stored-bytes",
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

/// Starts the sandbox binary (its own process, so that its RSS can be read) with `extra` flags;
/// the child (killed when dropped, even by a failing test) and its URL.
fn sandbox_process(extra: &[&str]) -> (Proc, String) {
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
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().strip_prefix("sandbox listening on ").unwrap().to_string();
    (Proc(child), url)
}

/// A child process killed and reaped when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

async fn post_event(client: &reqwest::Client, url: &str, body: String) -> reqwest::Response {
    client
        .post(format!("{url}/v2/s2s/event"))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// 300 single-event requests with a 1 MB custom property, then 150 with 1 MB event names: the
/// stored log stays within its byte budget (RSS under 150 MiB, where counting events alone took
/// it to 1.38 GB), a default events page stays under its 8 MiB budget and says where to go on,
/// the long names do not grow `/_sandbox/stats`, and every counter is exact.
#[test]
fn large_events_keep_the_sandbox_small_and_pages_and_stats_short() {
    let (child, url) = sandbox_process(&[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    let big = "x".repeat(1_000_000);
    let result = rt.block_on(async {
        for i in 0..300 {
            let body = format!(
                r#"{{"client_user_id":"u","event_name":"deposit","amount":5,"currency":"EUR","timestamp":1702963200,"click_id":"c","ip_address":"203.0.113.7","transaction_id":"big_{i}","meta":"{big}"}}"#
            );
            let r = post_event(&client, &url, body).await;
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
        let rss_after_properties = rss_kib(child.0.id());

        let page = client.get(format!("{url}/_sandbox/events")).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let h = page.headers().clone();
        let text = page.bytes().await.unwrap();
        let events: Vec<serde_json::Value> = serde_json::from_slice(&text).unwrap();
        let first: u64 = h["x-sandbox-first-stored"].to_str().unwrap().parse().unwrap();
        let next: u64 = h["x-sandbox-next-offset"].to_str().unwrap().parse().unwrap();
        assert_eq!(h["x-sandbox-page-cut"], "bytes");
        assert_eq!(h["x-sandbox-accepted-events"], "300");
        assert!(first > 0, "the 32 MiB byte budget evicted the oldest");
        assert!(text.len() <= 8 * 1024 * 1024, "a page of {} bytes", text.len());
        assert!(!events.is_empty());
        assert_eq!(next, first + events.len() as u64);
        assert_eq!(events[0]["transaction_id"], format!("big_{first}"));
        // Paging on from the next offset reaches the end of the log.
        let mut offset = next;
        let mut pages = 1;
        while offset < 300 {
            let page = client
                .get(format!("{url}/_sandbox/events?offset={offset}"))
                .send()
                .await
                .unwrap();
            let n: u64 = page.headers()["x-sandbox-next-offset"].to_str().unwrap().parse().unwrap();
            let text = page.bytes().await.unwrap();
            assert!(text.len() <= 8 * 1024 * 1024);
            assert!(n > offset, "the next offset moves on");
            offset = n;
            pages += 1;
        }
        let rss_after_pages = rss_kib(child.0.id());

        let name = "n".repeat(1_000_000);
        for i in 0..150 {
            let body = format!(
                r#"{{"client_user_id":"u","event_name":"{name}","timestamp":1702963200,"click_id":"c{i}"}}"#
            );
            let r = post_event(&client, &url, body).await;
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
        let stats = client.get(format!("{url}/_sandbox/stats")).send().await.unwrap().text().await.unwrap();
        (rss_after_properties, first, pages, rss_after_pages, stats, rss_kib(child.0.id()))
    });
    let (rss_after_properties, first, pages, rss_after_pages, stats_text, rss_end) = result;
    drop(child);
    println!(
        "large events: RSS {:.1} MiB after 300 x 1 MB properties (first stored {first}), {:.1} MiB after \
         {pages} pages, {:.1} MiB after 150 x 1 MB names; stats answer {} bytes",
        rss_after_properties as f64 / 1024.0,
        rss_after_pages as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        stats_text.len()
    );
    let stats: serde_json::Value = serde_json::from_str(&stats_text).unwrap();
    assert_eq!(stats["accepted_events"], 450);
    assert_eq!(stats["by_event_name"], serde_json::json!({"deposit": 300}));
    assert_eq!(stats["other_event_names"], 150);
    assert_eq!(stats["duplicated_transaction_ids"], 0);
    assert!(
        stats_text.len() < 64 * 1024,
        "stats answer of {} bytes",
        stats_text.len()
    );
    for rss in [rss_after_properties, rss_after_pages, rss_end] {
        assert!(rss < 150 * 1024, "RSS {rss} KiB");
    }
}

/// 2,000 transaction ids each accepted twice: the counts are exact, the list stops at 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_ids_are_counted_exactly_and_listed_up_to_a_thousand() {
    let sb = sandbox(|_| {}).await;
    let client = reqwest::Client::new();
    for _ in 0..2 {
        for from in (0..2_000).step_by(500) {
            let events: Vec<serde_json::Value> = (from..from + 500)
                .map(|i| {
                    serde_json::json!({"client_user_id":"u","event_name":"deposit","amount":5,
                        "currency":"EUR","timestamp":1702963200,"click_id":"c","ip_address":"203.0.113.7",
                        "transaction_id":format!("tx_{i:04}")})
                })
                .collect();
            let r = client
                .post(format!("{}/v2/s2s/batch", sb.url()))
                .header("x-api-key", KEY)
                .json(&events)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    let stats: serde_json::Value = client
        .get(format!("{}/_sandbox/stats", sb.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["accepted_events"], 4_000);
    assert_eq!(stats["duplicated_transaction_ids"], 2_000);
    assert_eq!(stats["duplicate_acceptances"], 2_000);
    let listed = stats["duplicate_transaction_ids"].as_object().unwrap();
    assert_eq!(listed.len(), 1_000);
    assert!(listed.values().all(|n| n == 2));
    assert!(listed.contains_key("tx_0000") && listed.contains_key("tx_0999"));
    assert!(!listed.contains_key("tx_1000"));
    assert_eq!(sb.stats().duplicated_transaction_ids, 2_000);
}

/// One invalid property with a 1 MB name: its error is listed (field and message cut), not
/// dropped by the answer's byte budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_about_a_huge_property_name_is_listed_cut() {
    let sb = sandbox(|_| {}).await;
    let name = "p".repeat(1_000_000);
    let body = format!(r#"{{"client_user_id":"u","event_name":"login","timestamp":1702963200,"{name}":[]}}"#);
    let r = post_event(&reqwest::Client::new(), &sb.url(), body).await;
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.len() < 64 * 1024, "the answer is {} bytes", text.len());
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error_count"], 1);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{text:.500}");
    assert_eq!(errors[0]["rule"], "property_type");
    let field = errors[0]["field"].as_str().unwrap();
    assert!(field.starts_with("ppp") && field.ends_with("…[cut]"), "{field:.300}");
}

/// A `/_sandbox/events` query that does not parse is answered with the documented JSON error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_events_query_is_answered_json_400() {
    let sb = sandbox(|_| {}).await;
    let client = reqwest::Client::new();
    for q in ["offset=-1", "offset=x", "offset=99999999999999999999999", "limit=-5"] {
        let r = client
            .get(format!("{}/_sandbox/events?{q}", sb.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
        assert!(
            r.headers()[reqwest::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{q}"
        );
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"], "invalid_query", "{q}");
        assert!(
            v["message"].as_str().unwrap().contains("offset") || q.starts_with("limit"),
            "{q}: {v}"
        );
    }
    let ok = client
        .get(format!("{}/_sandbox/events?offset=0&limit=5", sb.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-sandbox-next-offset"], "0");
}

#[test]
fn under_a_low_descriptor_limit_the_cap_is_lowered_and_a_client_over_it_is_refused_at_once() {
    // The issue's case: 128 descriptors, the default cap of 256, 200 idle connections.
    let bin = env!("CARGO_BIN_EXE_datapulse-bridge");
    let mut child = Command::new("prlimit")
        .args([
            "--nofile=128:128",
            "--",
            bin,
            "sandbox",
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            KEY,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux) runs");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(" ")
        .next()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    let idle: Vec<std::net::TcpStream> = (0..200).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    write!(s, "GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let took = started.elapsed();
    assert!(
        text.starts_with("HTTP/1.1 503") && text.contains("too_many_connections"),
        "over the lowered cap a fast 503, got: {text:?}"
    );
    assert!(took < BOUND, "refused at once, not after a wait ({took:?})");
    drop(idle);
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    assert!(
        stderr.contains("--max-connections")
            && stderr.contains("lowered_to=96")
            && stderr.contains("descriptor_limit=128"),
        "the lowering is logged naming the flag and the numbers: {stderr}"
    );
}
