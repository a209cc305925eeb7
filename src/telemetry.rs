//! Operations surface: Prometheus metrics, the health endpoints and logging.
//!
//! One [`Telemetry`] value per bridge, built at start and passed in: its Prometheus registry holds
//! every metric (each module declares its own [`Family`] next to the code that updates it, named
//! `datapulse_bridge_*`), and readiness is the conjunction of the [`Ready`] conditions modules set
//! with [`Telemetry::set_ready`].

use crate::settings::{Invalid, Scrubber};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use parking_lot::Mutex;
use prometheus::{IntGauge, Registry};
use serde::{Deserialize, Serialize};
use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Address of the operations HTTP server (`/metrics`, `/health/live`, `/health/ready`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `text` (default) or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// A `tracing` filter such as `info` or `datapulse_bridge=debug,info`; `RUST_LOG` overrides.
    #[serde(default = "default_level")]
    pub log_level: String,
}

fn default_listen() -> String {
    "0.0.0.0:9090".into()
}
fn default_level() -> String {
    "info".into()
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            listen: default_listen(),
            log_format: LogFormat::Text,
            log_level: default_level(),
        }
    }
}

impl TelemetryConfig {
    /// What types alone cannot say about `[telemetry]`.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut errs = Vec::new();
        if self.listen.parse::<SocketAddr>().is_err() {
            errs.push(Invalid::new(
                "telemetry.listen",
                format!("`{}` is not an address such as 0.0.0.0:9090", self.listen),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            errs.push(Invalid::new(
                "telemetry.log_level",
                format!("`{}` is not a log filter such as `info`", self.log_level),
            ));
        }
        errs
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global tracing subscriber (once; later calls are ignored).
pub fn init_logging(format: LogFormat, level: &str, scrubber: Scrubber) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(ScrubbedStderr(scrubber))
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}

/// Makes every panic message print scrubbed of `scrubber`'s values (a panic may quote a
/// dependency's error, which may quote a secret): thread, location and message, to the writer
/// `out` makes (standard error in the bridge). Replaces the process's panic hook.
pub fn scrub_panics<W: std::io::Write>(scrubber: Scrubber, out: impl Fn() -> W + Send + Sync + 'static) {
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let at = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("<unnamed>").to_string();
        let _ = writeln!(out(), "thread '{thread}' panicked{at}:\n{}", scrubber.scrub(&message));
    }));
}

/// Standard error with every configured secret value scrubbed from what is written: the log
/// carries dependencies' messages (librdkafka's log lines arrive through the `log` bridge, Redis
/// and HTTP errors as fields), which may quote a secret. tracing's formatter writes each event with
/// one `write_all`, so a value is never split between two writes.
#[derive(Clone)]
struct ScrubbedStderr(Scrubber);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ScrubbedStderr {
    type Writer = ScrubbedStderr;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl std::io::Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(self.0.scrub(&text).as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// One readiness condition.
#[derive(Debug, Clone, Serialize)]
pub struct Condition {
    pub ok: bool,
    pub reason: String,
}

/// A readiness condition: `/health/ready` answers 200 while every condition set holds. Each is
/// set by the module that owns it; adding one is a variant here. Named in `/health/ready` by its
/// snake_case name; declared in the order of those names (the order the conditions are listed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ready {
    /// The API's batch endpoint answers at the configured URL: not a 404, 405, 415, 3xx or other
    /// 4xx (`deliver`; the reason names the status and the URL's path).
    ApiEndpoint,
    /// The API accepted the key (`deliver`).
    ApiKey,
    /// The consumer group assigned at least one partition (`source`, `pipeline`, `main`).
    Assignment,
    /// The dedupe store answers (`dedupe`).
    DedupeStore,
    /// No assigned partition is stuck: assigned, not paused by the bridge, records to read on the
    /// broker, and none read for `kafka.stuck_after` (`source`; the reason names the partitions).
    Partitions,
    /// The shared rate budget's Redis answers (`deliver::budget`).
    RateBudget,
}

/// What a report to a [`Health`] changed: its owner logs once per change, not per report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The first report (nothing was known before).
    First,
    /// Up again after being down.
    Recovered,
    /// Down after being up (or first known down: see [`Change::First`]).
    Failed,
    /// As before.
    Same,
}

/// The health behind one readiness condition (the API key, a Redis store): unknown until the
/// first report, then up or down. Each report keeps the condition in step and says what changed,
/// so that the module owning it logs once per outage and recovery.
pub struct Health {
    telemetry: Telemetry,
    condition: Ready,
    /// 0 unknown, 1 up, 2 down.
    state: std::sync::atomic::AtomicU8,
}

impl Health {
    pub fn new(telemetry: &Telemetry, condition: Ready) -> Health {
        Health {
            telemetry: telemetry.clone(),
            condition,
            state: std::sync::atomic::AtomicU8::new(0),
        }
    }

    /// It works: the condition holds with `reason` (set only when it changed: this is called
    /// on every success).
    pub fn up(&self, reason: impl Into<String>) -> Change {
        let change = self.report(1);
        if change != Change::Same {
            self.telemetry.set_ready(self.condition, true, reason);
        }
        change
    }

    /// It fails: the condition is `ready` (false, unless a policy lets the bridge go on without
    /// it) with `reason` (set on every report: the reason may change while down).
    pub fn down(&self, ready: bool, reason: impl Into<String>) -> Change {
        let change = self.report(2);
        self.telemetry.set_ready(self.condition, ready, reason);
        change
    }

    fn report(&self, new: u8) -> Change {
        match self.state.swap(new, std::sync::atomic::Ordering::Relaxed) {
            0 => Change::First,
            old if old == new => Change::Same,
            _ if new == 1 => Change::Recovered,
            _ => Change::Failed,
        }
    }
}

/// A module's metrics: registered in a [`Telemetry`]'s registry the first time the module asks
/// for them ([`Telemetry::metrics`]), then shared by every user of that telemetry.
pub trait Family: Any + Send + Sync {
    /// Creates the family's metrics and registers them in `registry`.
    ///
    /// Errors: a name already registered or not a valid Prometheus name (a programming error).
    fn register(registry: &Registry) -> prometheus::Result<Self>
    where
        Self: Sized;
}

/// The process's telemetry: one Prometheus registry (everything `/metrics` exports) and the
/// readiness conditions (`/health/ready`). Built once at start and passed to every stage, so two
/// bridges in one process (tests) never share a counter or a condition. Clones share the value.
#[derive(Clone)]
pub struct Telemetry(Arc<Shared>);

struct Shared {
    /// Applied to every readiness reason (they quote dependencies' errors).
    scrubber: Scrubber,
    registry: Registry,
    ready_gauge: IntGauge,
    conditions: Mutex<BTreeMap<Ready, Condition>>,
    families: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("conditions", &self.readiness().1)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// An empty registry with `datapulse_bridge_ready` (0 until a condition is set).
    pub fn new() -> Telemetry {
        Telemetry::with_scrubber(Scrubber::default())
    }

    /// [`Telemetry::new`] whose readiness reasons never show a value of `scrubber`.
    pub fn with_scrubber(scrubber: Scrubber) -> Telemetry {
        let registry = Registry::new();
        let ready_gauge = prometheus::register_int_gauge_with_registry!(
            "datapulse_bridge_ready",
            "1 when every readiness condition holds (see /health/ready), else 0.",
            registry
        )
        .expect("a fresh registry takes the readiness gauge");
        Telemetry(Arc::new(Shared {
            scrubber,
            registry,
            ready_gauge,
            conditions: Mutex::default(),
            families: Mutex::default(),
        }))
    }

    /// The registry `/metrics` exports.
    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }

    /// `F`'s metrics, registered on the first call (so they are exported at zero from then on).
    ///
    /// Panics if `F::register` fails: two families declaring one metric name, a programming error
    /// that every test catches.
    pub fn metrics<F: Family>(&self) -> Arc<F> {
        let mut families = self.0.families.lock();
        let entry = families.entry(TypeId::of::<F>()).or_insert_with(|| {
            let family = F::register(&self.0.registry)
                .unwrap_or_else(|e| panic!("metrics of {} register: {e}", std::any::type_name::<F>()));
            Arc::new(family)
        });
        Arc::clone(entry)
            .downcast::<F>()
            .unwrap_or_else(|_| unreachable!("families are keyed by their type"))
    }

    /// Sets a readiness condition with the reason an operator reads in `/health/ready`.
    pub fn set_ready(&self, name: Ready, ok: bool, reason: impl Into<String>) {
        let mut m = self.0.conditions.lock();
        m.insert(
            name,
            Condition {
                ok,
                reason: self.0.scrubber.scrub(&reason.into()).into_owned(),
            },
        );
        self.0.ready_gauge.set(i64::from(m.values().all(|c| c.ok)));
    }

    /// Whether every condition holds (and at least one was set), with the conditions.
    pub fn readiness(&self) -> (bool, BTreeMap<Ready, Condition>) {
        let m = self.0.conditions.lock().clone();
        (!m.is_empty() && m.values().all(|c| c.ok), m)
    }

    /// One condition, if it was set.
    pub fn condition(&self, name: Ready) -> Option<Condition> {
        self.0.conditions.lock().get(&name).cloned()
    }

    /// The Prometheus text exposition of every metric registered here.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        let _ = enc.encode(&self.0.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The operations router: `/metrics`, `/health/live`, `/health/ready`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .with_state(self.clone())
    }

    /// Binds the operations server and serves it in the background; returns the bound address.
    pub async fn serve(&self, listen: &str) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let router = self.router();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "operations server stopped");
            }
        });
        Ok(addr)
    }
}

async fn metrics_handler(State(t): State<Telemetry>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], t.render())
}

async fn live() -> impl IntoResponse {
    Json(serde_json::json!({"status": "live"}))
}

async fn ready(State(t): State<Telemetry>) -> impl IntoResponse {
    let (ok, conditions) = t.readiness();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(serde_json::json!({"ready": ok, "conditions": conditions})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_scrubbed() {
        #[derive(Clone, Default)]
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let printed = Shared::default();
        let out = printed.clone();
        scrub_panics(Scrubber::new(["panic-secret-31".to_string()]), move || out.clone());
        let caught = std::thread::Builder::new()
            .name("forced".into())
            .spawn(|| panic!("a dependency said: bad password panic-secret-31"))
            .unwrap()
            .join();
        let _ = std::panic::take_hook();
        assert!(caught.is_err());
        let text = String::from_utf8(printed.0.lock().clone()).unwrap();
        assert!(text.contains("thread 'forced' panicked at"), "{text}");
        assert!(
            text.contains("bad password <redacted>") && !text.contains("panic-secret-31"),
            "{text}"
        );
    }
}
