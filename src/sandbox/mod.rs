//! The Server Events API sandbox: this project's implementation of the contract
//! (`API-CONTRACT.md`), for tests, the demo and partners' local trials.
//!
//! Whatever the sandbox accepts, the real API accepts too: every event goes through
//! [`Event::from_json`](crate::event::Event::from_json) and
//! [`Event::validate`](crate::event::Event::validate), the rules the bridge itself checks.
//! Requests to the API endpoints go through, in order: added latency, `auth_fail_all`, the API
//! key, the rate limit (so every authenticated request spends budget, valid or not), injected
//! faults, the content type and size caps, JSON parsing, validation, and only then the record.
//!
//! Layout: `api` (the two ingest endpoints), `admin` (`/_sandbox/*`), `faults` (injection
//! settings and their script), `record` (what was accepted, the counters, the JSONL file).

mod admin;
mod api;
mod faults;
mod record;

pub use faults::{FaultProblem, FaultStep, Faults, UnknownFaultStep};
pub use record::{RepeatedKeylessEvent, Stats, SuspiciousTimestamp, SuspiciousTimestamps};

use crate::event::{ContractOptions, TimestampUnit};
use crate::settings::REDACTED;
use axum::serve::ListenerExt as _;
use clap::{Args, Parser};
use faults::FaultState;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::{Mutex, MutexGuard};
use record::Record;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `datapulse-bridge sandbox` options. `SandboxArgs::default()` has the command-line defaults.
#[derive(Clone, Args)]
pub struct SandboxArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// An accepted API key (repeatable).
    #[arg(long = "api-key")]
    pub api_keys: Vec<String>,
    /// A file of accepted API keys, one a line (blank lines and lines starting with # skipped).
    #[arg(long)]
    pub api_keys_file: Option<PathBuf>,
    /// Requests allowed per key per --rate-window, across both endpoints; 0 turns the limit off.
    #[arg(long, default_value_t = 60)]
    pub rate_limit: u32,
    /// The rate-limit window, e.g. `60s` or `10s`.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub rate_window: Duration,
    /// Leave the Retry-After header off 429 answers.
    #[arg(long)]
    pub no_retry_after: bool,
    /// Most events accepted in one batch request.
    #[arg(long, default_value_t = 500)]
    pub max_batch_events: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 1_048_576)]
    pub max_body_bytes: usize,
    /// Answer every 400 with an empty body, as the real API may.
    #[arg(long)]
    pub bare_400: bool,
    /// The unit timestamps are expected in: seconds or milliseconds.
    #[arg(long, default_value = "seconds", value_parser = parse_unit)]
    pub timestamp_unit: TimestampUnit,
    /// Require click_id and ip_address on every event, not only register, login and deposit.
    #[arg(long)]
    pub strict_click_ip: bool,
    /// Append every accepted event to this JSONL file.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Require header X-Admin-Token with this value on /_sandbox/ endpoints.
    #[arg(long)]
    pub admin_token: Option<String>,
    #[command(flatten)]
    pub faults: Faults,
}

fn parse_unit(s: &str) -> Result<TimestampUnit, String> {
    match s {
        "seconds" | "s" => Ok(TimestampUnit::Seconds),
        "milliseconds" | "ms" => Ok(TimestampUnit::Milliseconds),
        _ => Err("use seconds or milliseconds".into()),
    }
}

impl Default for SandboxArgs {
    fn default() -> Self {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: SandboxArgs,
        }
        Cli::try_parse_from(["sandbox"])
            .map(|c| c.args)
            .expect("every sandbox flag has a default")
    }
}

/// Keys and the admin token are secrets: Debug shows how many there are, never what they are.
impl fmt::Debug for SandboxArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxArgs")
            .field("listen", &self.listen)
            .field("api_keys", &vec![REDACTED; self.api_keys.len()])
            .field("api_keys_file", &self.api_keys_file)
            .field("rate_limit", &self.rate_limit)
            .field("rate_window", &self.rate_window)
            .field("no_retry_after", &self.no_retry_after)
            .field("max_batch_events", &self.max_batch_events)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("bare_400", &self.bare_400)
            .field("timestamp_unit", &self.timestamp_unit)
            .field("strict_click_ip", &self.strict_click_ip)
            .field("record", &self.record)
            .field("admin_token", &self.admin_token.as_ref().map(|_| REDACTED))
            .field("faults", &self.faults)
            .finish()
    }
}

impl SandboxArgs {
    /// The accepted keys: --api-key values, then the lines of --api-keys-file.
    fn load_keys(&self) -> Result<Vec<Vec<u8>>, SandboxError> {
        let mut keys: Vec<Vec<u8>> = self.api_keys.iter().map(|k| k.as_bytes().to_vec()).collect();
        if let Some(path) = &self.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|source| SandboxError::KeysFile {
                path: path.clone(),
                source,
            })?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| l.as_bytes().to_vec()),
            );
        }
        if keys.iter().any(|k| k.is_empty()) {
            return Err(SandboxError::EmptyKey);
        }
        if keys.is_empty() {
            return Err(SandboxError::NoKey);
        }
        Ok(keys)
    }

    fn limiter(&self) -> Result<Option<DefaultKeyedRateLimiter<usize>>, SandboxError> {
        let Some(burst) = NonZeroU32::new(self.rate_limit) else {
            return Ok(None);
        };
        // GCRA with burst = limit: a full window's requests may come at once, the next one
        // waits for a cell to come back (one every window / limit).
        let quota = Quota::with_period(self.rate_window / self.rate_limit)
            .ok_or(SandboxError::RateWindow)?
            .allow_burst(burst);
        Ok(Some(RateLimiter::keyed(quota)))
    }
}

/// State shared by every request.
pub(crate) struct Shared {
    opts: ContractOptions,
    keys: Vec<Vec<u8>>,
    admin_token: Option<Vec<u8>>,
    limiter: Option<DefaultKeyedRateLimiter<usize>>,
    rate_limit: u32,
    rate_window: Duration,
    retry_after: bool,
    bare_400: bool,
    max_batch_events: usize,
    max_body_bytes: usize,
    faults: Mutex<FaultState>,
    record: Mutex<Record>,
    shutdown: CancellationToken,
}

impl Shared {
    fn faults(&self) -> MutexGuard<'_, FaultState> {
        // A panic while holding these locks cannot leave them half-updated in a harmful way.
        self.faults.lock()
    }

    fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock()
    }

    /// The index of the key the request carries, if it is one of ours. Every key is compared,
    /// in constant time, so timing tells nothing about which keys exist.
    fn authenticate(&self, given: Option<&[u8]>) -> Option<usize> {
        let given = given?;
        let mut found = None;
        for (i, k) in self.keys.iter().enumerate() {
            if ct_eq(given, k) {
                found = Some(i);
            }
        }
        found
    }
}

/// Constant-time equality: the time depends on the lengths only, never on the contents.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = a.len() ^ b.len();
    for i in 0..n {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    std::hint::black_box(diff) == 0
}

/// A running sandbox. Shuts down on drop or [`SandboxHandle::shutdown`].
pub struct SandboxHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl SandboxHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base URL to give a client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> Stats {
        self.shared.record().stats()
    }

    /// Every accepted event, in order, as the sandbox understood it.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let rec = self.shared.record();
        (0..rec.len())
            .filter_map(|i| serde_json::from_slice(rec.event(i)).ok())
            .collect()
    }

    /// The current fault settings (the script without its consumed steps).
    pub fn faults(&self) -> Faults {
        self.shared.faults().current()
    }

    /// Replaces the fault settings (and restarts the script).
    pub fn set_faults(&self, faults: Faults) -> Result<(), SandboxError> {
        let problems = faults.problems();
        if !problems.is_empty() {
            return Err(SandboxError::Faults(problems));
        }
        self.shared.faults().set(faults);
        Ok(())
    }

    /// Forgets the accepted events and the counters (the record file is append-only and stays).
    pub fn reset(&self) {
        self.shared.record().reset();
    }

    /// Stops serving: in-flight requests finish (hanging ones answer 503), then the record file
    /// is flushed and closed.
    pub async fn shutdown(mut self) -> Result<(), SandboxError> {
        self.shared.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server
                .await
                .map_err(|_| SandboxError::Panicked("server"))?
                .map_err(SandboxError::Serve)?;
        }
        self.shared.record().close_file();
        if let Some(writer) = self.writer.take() {
            let joined = tokio::task::spawn_blocking(move || writer.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                return Err(SandboxError::Panicked("record writer"));
            }
        }
        Ok(())
    }
}

impl Drop for SandboxHandle {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.shared.record().close_file();
    }
}

/// Why the sandbox cannot start, take fault settings or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot read --api-keys-file {}: {source}", path.display())]
    KeysFile { path: PathBuf, source: std::io::Error },
    #[error("an empty --api-key is not a key")]
    EmptyKey,
    #[error("no API key: give at least one --api-key (e.g. --api-key dp_test_key_123) or --api-keys-file")]
    NoKey,
    /// Fault flags or settings out of range, every problem found.
    #[error("invalid faults: {}", joined(.0))]
    Faults(Vec<FaultProblem>),
    #[error("--max-batch-events and --max-body-bytes must be at least 1")]
    ZeroLimit,
    #[error("--rate-window divided by --rate-limit must be longer than zero")]
    RateWindow,
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot open the record file {}: {source}", path.display())]
    RecordFile { path: PathBuf, source: std::io::Error },
    #[error("cannot start the record file's writer thread: {0}")]
    WriterThread(std::io::Error),
    /// The server stopped with an I/O error.
    #[error("the sandbox server failed: {0}")]
    Serve(std::io::Error),
    /// A task of the sandbox (`server`, `record writer`) panicked.
    #[error("the sandbox's {0} panicked")]
    Panicked(&'static str),
}

/// Fault problems as one line, `; ` between them.
fn joined(problems: &[FaultProblem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Binds `--listen` and serves in the background.
pub async fn start(args: SandboxArgs) -> Result<SandboxHandle, SandboxError> {
    let keys = args.load_keys()?;
    let problems = args.faults.problems();
    if !problems.is_empty() {
        return Err(SandboxError::Faults(problems));
    }
    if args.max_batch_events == 0 || args.max_body_bytes == 0 {
        return Err(SandboxError::ZeroLimit);
    }
    let limiter = args.limiter()?;
    let listen = |source| SandboxError::Listen {
        addr: args.listen.clone(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen).await.map_err(listen)?;
    let addr = listener.local_addr().map_err(listen)?;
    let (file, writer) = match &args.record {
        Some(path) => {
            let (tx, handle) = record::spawn_file_writer(path)?;
            (Some(tx), Some(handle))
        }
        None => (None, None),
    };
    let opts = ContractOptions {
        timestamp_unit: args.timestamp_unit,
        strict_click_ip: args.strict_click_ip,
    };
    let shared = Arc::new(Shared {
        opts,
        keys,
        admin_token: args.admin_token.map(String::into_bytes),
        limiter,
        rate_limit: args.rate_limit,
        rate_window: args.rate_window,
        retry_after: !args.no_retry_after,
        bare_400: args.bare_400,
        max_batch_events: args.max_batch_events,
        max_body_bytes: args.max_body_bytes,
        faults: Mutex::new(FaultState::new(args.faults)),
        record: Mutex::new(Record::new(args.timestamp_unit, file)),
        shutdown: CancellationToken::new(),
    });
    let app = router(shared.clone());
    // Nagle's algorithm would hold small responses back behind delayed ACKs.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let stop = shared.shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    Ok(SandboxHandle {
        addr,
        shared,
        server: Some(server),
        writer,
    })
}

/// Serves until SIGINT or SIGTERM.
pub async fn run(args: SandboxArgs) -> anyhow::Result<()> {
    let handle = start(args).await?;
    println!("sandbox listening on http://{}", handle.addr());
    wait_for_signal().await?;
    Ok(handle.shutdown().await?)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn router(shared: Arc<Shared>) -> axum::Router {
    use axum::routing::post;
    axum::Router::new()
        .route("/v2/s2s/event", post(api::event))
        .route("/v2/s2s/batch", post(api::batch))
        .nest("/_sandbox", admin::router(shared.clone()))
        .fallback(api::not_found)
        .with_state(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_cli_defaults() {
        let a = SandboxArgs::default();
        assert_eq!(a.listen, "127.0.0.1:8080");
        assert_eq!(a.rate_limit, 60);
        assert_eq!(a.rate_window, Duration::from_secs(60));
        assert_eq!(a.max_batch_events, 500);
        assert_eq!(a.max_body_bytes, 1_048_576);
        assert_eq!(a.faults, Faults::default());
    }

    #[test]
    fn debug_hides_secrets() {
        let a = SandboxArgs {
            api_keys: vec!["dp_secret_key".into()],
            admin_token: Some("adm_secret".into()),
            ..SandboxArgs::default()
        };
        let shown = format!("{a:?}");
        assert!(
            !shown.contains("dp_secret_key") && !shown.contains("adm_secret"),
            "{shown}"
        );
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"a"));
        assert!(ct_eq(b"", b""));
    }
}
