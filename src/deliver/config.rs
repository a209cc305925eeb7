//! `[api]` and `[delivery]`: where the Server Events API is and how requests go to it.

use crate::event::{ContractOptions, TimestampUnit};
use crate::settings::{Invalid, Secret};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// `[api]`: the Server Events API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Base URL, for example `https://datapulse-api.revosurge.com/`.
    pub base_url: String,
    /// The API key (prefer `key_file`).
    #[serde(default)]
    pub key: Option<Secret>,
    /// A file holding the API key (a mounted Secret); re-read when the API answers 401.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Time limit of one request, connection included.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Time limit to open a connection.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Unit of `timestamp` the API expects (contract decision 3).
    #[serde(default)]
    pub timestamp_unit: TimestampUnit,
    /// Require click_id and ip_address on every event (contract decision 2).
    #[serde(default)]
    pub strict_click_ip: bool,
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

impl ApiConfig {
    /// What types alone cannot say about `[api]`: an http(s) URL, one of `key` and `key_file`
    /// (a readable file), a request timeout above zero.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut invalid = Vec::new();
        let mut err = |key: &str, msg: String| invalid.push(Invalid::new(key, msg));
        match reqwest::Url::parse(&self.base_url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            Ok(u) => err("api.base_url", format!("scheme `{}` is not http or https", u.scheme())),
            Err(e) => err("api.base_url", format!("not a URL: {e}")),
        }
        match (&self.key, &self.key_file) {
            (None, None) => err("api.key", "set `api.key_file` (recommended) or `api.key`".into()),
            (Some(_), Some(_)) => err(
                "api.key_file",
                "set either `api.key` or `api.key_file`, not both".into(),
            ),
            (None, Some(p)) if !p.is_file() => err("api.key_file", format!("{} is not a readable file", p.display())),
            _ => {}
        }
        if self.request_timeout.is_zero() {
            err("api.request_timeout", "must be greater than zero".into());
        }
        invalid
    }

    pub fn contract(&self) -> ContractOptions {
        ContractOptions {
            timestamp_unit: self.timestamp_unit,
            strict_click_ip: self.strict_click_ip,
        }
    }

    /// The API key: `key`, or the trimmed content of `key_file`, read now.
    ///
    /// Errors: the file cannot be read, or neither key is set.
    pub fn read_key(&self) -> Result<Secret, KeyError> {
        match (&self.key, &self.key_file) {
            (Some(k), _) => Ok(k.clone()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| Secret(s.trim().to_string()))
                .map_err(|source| KeyError::Unreadable {
                    path: path.clone(),
                    source,
                }),
            (None, None) => Err(KeyError::Unset),
        }
    }
}

/// Why [`ApiConfig::read_key`] has no key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read api.key_file {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("neither api.key nor api.key_file is set")]
    Unset,
}

/// How long an idle pooled connection to the API is kept: below the keep-alive of the usual
/// servers and load balancers (60 s and more), so that a request rarely goes out on a connection
/// the server is closing (which could not tell an unsent request from an unanswered one).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The most delivery lanes (`delivery.concurrency`).
pub const MAX_CONCURRENCY: u32 = 32;

/// `[delivery]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Where the key's rate budget is kept: `local` (this process), `redis` (shared by all
    /// replicas), `static_share` (this process, `rate_limit / replicas`).
    #[serde(default)]
    pub rate_mode: RateMode,
    /// Requests the API allows per key in `rate_window` (the API's default: 60 per minute).
    #[serde(default = "default_rate_limit")]
    pub rate_limit: u32,
    /// The window of `rate_limit`.
    #[serde(default = "default_rate_window", with = "humantime_serde")]
    pub rate_window: Duration,
    /// Requests that may leave at once after a quiet spell. Any window still holds at most
    /// `rate_limit` requests: a larger burst lowers the sustained rate to
    /// `(rate_limit − rate_burst + 1) / rate_window`.
    #[serde(default = "default_rate_burst")]
    pub rate_burst: u32,
    /// `static_share` only: how many replicas share the key.
    #[serde(default)]
    pub replicas: Option<u32>,
    /// `redis` only: the Redis holding the shared budget, e.g. `redis://redis:6379/0`.
    #[serde(default)]
    pub redis_url: Option<Secret>,
    /// `redis` only: prefix of the budget's Redis key.
    #[serde(default = "default_redis_key_prefix")]
    pub redis_key_prefix: String,
    /// `redis` only: the budget's name in Redis. Default: a SHA-256 of the API key (the key itself
    /// is never written to Redis). Set it when replicas must share a budget across key rotation.
    #[serde(default)]
    pub budget_name: Option<String>,
    /// First backoff ceiling after a 408, a 500, a request not sent, or a 429/503 without
    /// `Retry-After`; also the shortest wait after a `Retry-After` already past.
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub retry_backoff_initial: Duration,
    /// Largest backoff ceiling.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// Retries of one request after which each further retry waits the full `retry_backoff_max`
    /// and logs an error. Events are never dropped: unset (the default) keeps the jittered
    /// backoff forever.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Interval between retries while the API refuses the key (401/403).
    #[serde(default = "default_auth_retry_interval", with = "humantime_serde")]
    pub auth_retry_interval: Duration,
    /// Requests in flight at once. Each belongs to a delivery lane that owns a fixed share of the
    /// partitions, so a partition's events still reach the API in order.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// What becomes of the events of a request the API may have counted (502, 504, a timeout or a
    /// closed connection after the request was written; and ids in flight in a process that was
    /// killed): `in-doubt` (default: dead-lettered with reason `in_doubt`, never sent again
    /// automatically) or `resend` (at-least-once). Unset: `dedupe.redis.in_doubt` if that is
    /// set (its former name), else `in-doubt`; `Config::resolve` writes the value in.
    #[serde(default)]
    pub on_ambiguous: Option<super::OnAmbiguous>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateMode {
    #[default]
    Local,
    Redis,
    StaticShare,
}

fn default_rate_limit() -> u32 {
    60
}
fn default_rate_window() -> Duration {
    Duration::from_secs(60)
}
fn default_rate_burst() -> u32 {
    1
}
fn default_redis_key_prefix() -> String {
    "datapulse-bridge:rate:".into()
}
fn default_backoff_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}
fn default_auth_retry_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_concurrency() -> u32 {
    1
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            rate_mode: RateMode::Local,
            rate_limit: default_rate_limit(),
            rate_window: default_rate_window(),
            rate_burst: default_rate_burst(),
            replicas: None,
            redis_url: None,
            redis_key_prefix: default_redis_key_prefix(),
            budget_name: None,
            retry_backoff_initial: default_backoff_initial(),
            retry_backoff_max: default_backoff_max(),
            max_retries: None,
            auth_retry_interval: default_auth_retry_interval(),
            concurrency: default_concurrency(),
            on_ambiguous: None,
        }
    }
}

impl DeliveryConfig {
    /// What types alone cannot say about `[delivery]`.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut errs = Vec::new();
        let mut err = |key: &str, msg: String| errs.push(Invalid::new(format!("delivery.{key}"), msg));
        if self.rate_limit == 0 {
            err("rate_limit", "must be at least 1".into());
        }
        if self.rate_window.is_zero() {
            err("rate_window", "must be greater than zero".into());
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            err("concurrency", format!("must be between 1 and {MAX_CONCURRENCY}"));
        }
        if self.rate_burst == 0 || self.rate_burst > self.rate_limit.max(1) {
            err(
                "rate_burst",
                format!("must be between 1 and rate_limit ({})", self.rate_limit),
            );
        }
        match self.rate_mode {
            RateMode::Redis => match &self.redis_url {
                None => err("redis_url", "required when `delivery.rate_mode` is \"redis\"".into()),
                Some(u) => {
                    if let Err(e) = redis::Client::open(u.expose()) {
                        err("redis_url", format!("not a Redis URL ({:?})", e.kind()));
                    }
                }
            },
            RateMode::StaticShare => match self.replicas {
                None | Some(0) => err(
                    "replicas",
                    "set the number of replicas sharing the key when `delivery.rate_mode` is \"static_share\"".into(),
                ),
                Some(n) if self.rate_limit / n == 0 => err(
                    "replicas",
                    format!(
                        "{n} replicas leave less than one request per window of the limit {}",
                        self.rate_limit
                    ),
                ),
                Some(n) if self.rate_burst > self.rate_limit / n => err(
                    "rate_burst",
                    format!("must not exceed each replica's share ({})", self.rate_limit / n),
                ),
                Some(_) => {}
            },
            RateMode::Local => {}
        }
        if self.budget_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            err("budget_name", "must not be empty when set".into());
        }
        if self.retry_backoff_initial.is_zero() {
            err("retry_backoff_initial", "must be greater than zero".into());
        }
        if self.retry_backoff_max < self.retry_backoff_initial {
            err(
                "retry_backoff_max",
                "must not be smaller than `delivery.retry_backoff_initial`".into(),
            );
        }
        if self.auth_retry_interval.is_zero() {
            err("auth_retry_interval", "must be greater than zero".into());
        }
        errs
    }
}
