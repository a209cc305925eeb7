//! Operations surface: Prometheus metrics, the health endpoints and logging.
//!
//! Every module registers its own metrics in the process-wide default registry (a `LazyLock`
//! next to the code that updates them, named `datapulse_bridge_*`); `/metrics` gathers them all.
//! Readiness is the conjunction of named conditions that modules set with [`set_ready`].

use crate::settings::Invalid;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex};

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
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}

/// One readiness condition.
#[derive(Debug, Clone, Serialize)]
pub struct Condition {
    pub ok: bool,
    pub reason: String,
}

static READY_GAUGE: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    prometheus::register_int_gauge!(
        "datapulse_bridge_ready",
        "1 when every readiness condition holds (see /health/ready), else 0."
    )
    .expect("metric registers once")
});

/// A readiness condition: `/health/ready` answers 200 while every condition set holds. Each is
/// set by the module that owns it; adding one is a variant here. Named in `/health/ready` by its
/// snake_case name; declared in the order of those names (the order the conditions are listed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ready {
    /// The API accepted the key (`deliver`).
    ApiKey,
    /// The consumer group assigned at least one partition (`source`, `pipeline`, `main`).
    Assignment,
    /// The dedupe store answers (`dedupe`).
    DedupeStore,
    /// The shared rate budget's Redis answers (`deliver::budget`).
    RateBudget,
}

static READY: LazyLock<Mutex<BTreeMap<Ready, Condition>>> = LazyLock::new(Default::default);

/// Sets a readiness condition with the reason an operator reads in `/health/ready`.
pub fn set_ready(name: Ready, ok: bool, reason: impl Into<String>) {
    let mut m = READY.lock().unwrap_or_else(|p| p.into_inner());
    m.insert(
        name,
        Condition {
            ok,
            reason: reason.into(),
        },
    );
    READY_GAUGE.set(i64::from(m.values().all(|c| c.ok)));
}

/// Whether every condition holds (and at least one was set), with the conditions.
pub fn readiness() -> (bool, BTreeMap<Ready, Condition>) {
    let m = READY.lock().unwrap_or_else(|p| p.into_inner()).clone();
    (!m.is_empty() && m.values().all(|c| c.ok), m)
}

/// The Prometheus text exposition of every registered metric.
pub fn render_metrics() -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let enc = prometheus::TextEncoder::new();
    let _ = enc.encode(&prometheus::gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

async fn metrics_handler() -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], render_metrics())
}

async fn live() -> impl IntoResponse {
    Json(serde_json::json!({"status": "live"}))
}

async fn ready(State(()): State<()>) -> impl IntoResponse {
    let (ok, conditions) = readiness();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(serde_json::json!({"ready": ok, "conditions": conditions})))
}

/// The operations router: `/metrics`, `/health/live`, `/health/ready`.
pub fn router() -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(())
}

/// Binds the operations server and serves it in the background; returns the bound address.
pub async fn serve(listen: &str) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router()).await {
            tracing::error!(error = %e, "operations server stopped");
        }
    });
    Ok(addr)
}
