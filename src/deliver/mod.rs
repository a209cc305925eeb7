//! Delivery to the Server Events API: the HTTP client, the key's rate budget, classification of
//! responses, retries, isolation of bad events, and the halt on a refused key.
//!
//! [`Deliverer::deliver`] takes one batch and returns one [`EventResult`] per event. Every request
//! draws from the key's [`budget`] first. Answers (API-CONTRACT.md, Responses):
//! - 2xx: the events of the request are delivered.
//! - 400: the request holds bad events. When the body names them by index they are rejected and
//!   the rest is sent again as one request; otherwise a binary search isolates one bad event at a
//!   time (see [`Deliverer::isolate`]). Only an event the API answered 400 for alone, or that a
//!   400 body named, is ever rejected.
//! - 401/403: the key is refused: nothing is rejected, readiness `api_key` goes false, and the
//!   same request is retried every `auth_retry_interval`, re-reading `api.key_file` first.
//! - 429: the whole key pauses (`Retry-After`, or backoff), then the request is retried.
//! - anything else, timeouts and connection errors: exponential backoff with full jitter, retried.
//!
//! See `docs/delivery.md`.

mod budget;
mod config;
mod metrics;
pub mod retry;

pub use config::{ApiConfig, DeliveryConfig, KeyError, RateMode, MAX_CONCURRENCY};

use crate::settings::Secret;
use crate::telemetry::{Change, Health, Ready, Telemetry};
pub use budget::BudgetError;
use budget::RateBudget;
use bytes::Bytes;
use metrics::{Metrics, RetryGuard};
use parking_lot::RwLock;
use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What happened to one event of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum EventResult {
    /// The API answered 2xx for a request that carried it.
    Delivered,
    /// The API rejected it permanently (400); the status and body go to the dead letter.
    Rejected { status: u16, body: String },
}

/// A wait was abandoned because shutdown's deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("abandoned: shutdown's deadline passed")]
pub struct Cancelled;

/// A batch's delivery was abandoned because shutdown's deadline passed before every event had
/// its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("delivery interrupted by shutdown's deadline (a request may have been counted: {may_have_been_counted})")]
pub struct Interrupted {
    /// A request of the batch may have been counted by the API (what the batch's [`Exposure`]
    /// was last told): the ids are in doubt for the next owner rather than free to be sent again.
    pub may_have_been_counted: bool,
}

/// What [`Deliverer::probe`] learnt about the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// The API accepted the key (it answered 2xx or 400 to an empty batch).
    Accepted,
    /// The API refused the key (401 or 403).
    Refused { status: u16 },
    /// No answer about the key (429, 5xx, timeout, connection error): try again later.
    Unknown { reason: String },
}

/// The answer to one request that ends its retries.
enum Final {
    Accepted,
    BadRequest { body: String },
}

/// One HTTP exchange, classified.
enum Answer {
    Success,
    BadRequest(String),
    AuthRefused(u16),
    TooManyRequests(Option<Duration>),
    Retriable { cause: Cause, detail: String },
}

/// Why a request is tried again: the `cause` label of `datapulse_bridge_api_retries_total` and
/// of the retry logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// 401 or 403: the key was refused (invariant 5).
    Status401,
    Status403,
    /// 429: the key's rate limit (contract: honour `Retry-After`).
    Status429,
    /// Any other status outside 2xx/400: the API may have counted the batch.
    Status5xx,
    /// No answer within `api.request_timeout`: the API may have counted the batch.
    Timeout,
    /// The connection was refused or could not be made: nothing reached the API.
    Connect,
    /// The connection broke after the request may have left.
    Io,
}

impl Cause {
    /// The metric label and log value.
    pub fn label(self) -> &'static str {
        match self {
            Cause::Status401 => "401",
            Cause::Status403 => "403",
            Cause::Status429 => "429",
            Cause::Status5xx => "5xx",
            Cause::Timeout => "timeout",
            Cause::Connect => "connect",
            Cause::Io => "io",
        }
    }

    /// A refused key's cause.
    fn of_auth(status: u16) -> Cause {
        if status == 403 {
            Cause::Status403
        } else {
            Cause::Status401
        }
    }
}

/// Told when the batch's events may have reached the API and when they surely have not: with the
/// Redis dedupe store this keeps the ids' `sent:` marks, which tell the next owner after a crash
/// whether an id is in doubt (`docs/dedupe.md`).
pub trait Exposure: Sync {
    /// Before a request leaves while no earlier request of the batch may have been counted.
    fn exposed(&self) -> impl std::future::Future<Output = ()> + Send;
    /// After a refusal that proves the request was not counted (401/403, 429, no connection),
    /// when no earlier request of the batch may have been counted either.
    fn unexposed(&self) -> impl std::future::Future<Output = ()> + Send;
}

/// One batch on its way: its events, their results so far, and whether it is under retry.
struct Batch<'a, E> {
    /// Each event's JSON, serialised once by the caller.
    events: &'a [&'a [u8]],
    cancel: &'a CancellationToken,
    /// Shutdown: ends the batch's waits (budget, backoff) while nothing of it may have been
    /// counted; a batch whose request may have been counted goes on until `cancel`.
    stop: Option<&'a CancellationToken>,
    exposure: &'a E,
    /// A request of the batch may have reached the API, as far as `exposure` was told.
    exposed: bool,
    /// A request of the batch ended so that it may have been counted (a 5xx, a timeout, a broken
    /// connection): the batch stays exposed until it has its results.
    uncertain: bool,
    started: Instant,
    /// Set at the first retriable failure; feeds the oldest-under-retry gauge until dropped.
    retry_guard: Option<RetryGuard>,
    results: Vec<Option<EventResult>>,
    metrics: &'a Metrics,
}

impl<E: Exposure> Batch<'_, E> {
    /// Set before `exposure` is told, so that a delivery cancelled while telling it still
    /// reports that the ids may have left (their marks may be set).
    async fn before_request(&mut self) {
        if !self.exposed {
            self.exposed = true;
            self.exposure.exposed().await;
        }
    }

    /// The last request was refused before the API counted anything.
    async fn refused(&mut self) {
        if self.exposed && !self.uncertain {
            self.exposed = false;
            self.exposure.unexposed().await;
        }
    }

    fn delivered(&mut self, idx: &[usize]) {
        for &i in idx {
            self.results[i] = Some(EventResult::Delivered);
        }
    }

    fn reject(&mut self, i: usize, body: String) {
        self.metrics.rejected.inc();
        self.results[i] = Some(EventResult::Rejected { status: 400, body });
    }

    fn under_retry(&mut self) {
        let started = self.started;
        let metrics = self.metrics;
        self.retry_guard
            .get_or_insert_with(|| RetryGuard::new(metrics, started));
    }
}

/// Why a [`Deliverer`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Key(#[from] KeyError),
    /// RFC 9110 §5.5: a field value is visible ASCII, spaces and tabs.
    #[error("the API key contains characters that cannot be sent in an HTTP header")]
    KeyNotAHeader,
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error(transparent)]
    Budget(#[from] BudgetError),
}

/// The key and the name of its budget, replaced together when `api.key_file` changes.
struct Credentials {
    header: HeaderValue,
    budget_id: String,
}

const ENDPOINT_BATCH: &str = "batch";
/// Most bytes of a 400 body kept (it goes into dead letters).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Sends batches to the API. One per process and key; share it (`&self`) between tasks.
/// Deliberately not `Debug`: it holds the key.
pub struct Deliverer {
    client: reqwest::Client,
    url: String,
    key_file: Option<PathBuf>,
    credentials: RwLock<Arc<Credentials>>,
    budget: RateBudget,
    cfg: DeliveryConfig,
    /// Whether the API accepts the key: readiness `api_key`.
    key: Health,
    /// Consecutive 429s of the key, for the backoff of a 429 without `Retry-After`.
    throttle_streak: AtomicU32,
    metrics: Arc<Metrics>,
}

impl Deliverer {
    /// The HTTP client, key and rate budget of one API; its metrics and the `api_key` readiness
    /// condition go to `telemetry`.
    ///
    /// Errors: no readable key, a key that is not a header value, the HTTP client (its TLS
    /// roots), the rate budget's settings.
    pub fn new(api: &ApiConfig, cfg: &DeliveryConfig, telemetry: &Telemetry) -> Result<Deliverer, SetupError> {
        let client = reqwest::Client::builder()
            .timeout(api.request_timeout)
            .connect_timeout(api.connect_timeout)
            .user_agent(concat!("datapulse-bridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let url = format!("{}/v2/s2s/batch", api.base_url.trim_end_matches('/'));
        let key = api.read_key()?;
        let credentials = credentials(cfg, &key)?;
        Ok(Deliverer {
            client,
            url,
            key_file: if api.key.is_some() { None } else { api.key_file.clone() },
            credentials: RwLock::new(Arc::new(credentials)),
            budget: RateBudget::new(cfg, telemetry)?,
            cfg: cfg.clone(),
            key: Health::new(telemetry, Ready::ApiKey),
            throttle_streak: Default::default(),
            metrics: telemetry.metrics(),
        })
    }

    /// Delivers `events`, each one JSON object as `Event::write_json` writes it (the pipeline
    /// serialises each event once, to size batches), retrying until each has a final result or
    /// `cancel` fires. Results are in the order of `events`, and events reach the API in that
    /// order. `exposure` is told when the events may have reached the API (see [`Exposure`]).
    ///
    /// `Err(Interrupted)` gives no result: a request in flight may have been accepted, and during
    /// isolation of a 400 some parts may already be delivered. The caller must neither commit nor
    /// mark any of it as delivered; `may_have_been_counted` says whether its ids are in doubt.
    ///
    /// It also gives up, with `Interrupted { may_have_been_counted: false }`, when `stop` fires
    /// while the batch waits and nothing of it may have been counted (before a retry after a 429,
    /// a 401/403 or a refused connection): at shutdown only a request that may have been counted
    /// is seen through, until `cancel`.
    pub async fn deliver_json<E: Exposure>(
        &self,
        events: &[&[u8]],
        cancel: &CancellationToken,
        stop: Option<&CancellationToken>,
        exposure: &E,
    ) -> Result<Vec<EventResult>, Interrupted> {
        let mut b = Batch {
            events,
            cancel,
            stop,
            exposure,
            exposed: false,
            uncertain: false,
            started: Instant::now(),
            retry_guard: None,
            results: vec![None; events.len()],
            metrics: &self.metrics,
        };
        match self.deliver_batch(&mut b).await {
            // The loop ends only when every event has its result.
            Ok(()) => Ok(b
                .results
                .into_iter()
                .map(|r| r.expect("every event has a result"))
                .collect()),
            Err(Cancelled) => Err(Interrupted {
                may_have_been_counted: b.exposed,
            }),
        }
    }

    /// Sends the batch's events until each has a result: in order, one request for all that is
    /// left after each 400 was isolated.
    async fn deliver_batch<E: Exposure>(&self, b: &mut Batch<'_, E>) -> Result<(), Cancelled> {
        let mut pending: Vec<usize> = (0..b.events.len()).collect();
        while !pending.is_empty() {
            let body = match self.send(b, &pending).await? {
                Final::Accepted => {
                    b.delivered(&pending);
                    break;
                }
                Final::BadRequest { body } => body,
            };
            if let Some(bad) = retry::parse_bad_indexes(body.as_bytes(), pending.len()) {
                for (i, part) in bad {
                    b.reject(pending[i], part);
                }
            } else if pending.len() == 1 {
                b.reject(pending[0], body);
            } else {
                self.isolate(b, &pending, body).await?;
            }
            // What is left, in order, goes again as one request.
            pending.retain(|&i| b.results[i].is_none());
        }
        Ok(())
    }

    /// Waits until the key's budget allows one more request and draws it for the next request
    /// this deliverer sends (see `RateBudget::reserve`).
    pub async fn reserve(&self, cancel: &CancellationToken) -> Result<(), Cancelled> {
        let creds = self.current_credentials();
        self.budget.reserve(&creds.budget_id, cancel).await
    }

    /// Finds one bad event of `group`, which the API answered 400 without naming it, by binary
    /// search: the first half of the suspect range is sent; if accepted, the bad event is in the
    /// second half (not sent: inferred); if refused, the second half waits and the search goes on
    /// in the first. An event is rejected only after a request holding it alone was answered 400.
    /// Events accepted on the way are marked delivered; the ones left (the halves that waited) are
    /// sent by the caller as one request. For one bad event among n this costs at most
    /// ⌈log2 n⌉ + 1 requests, and one more for the rest.
    async fn isolate<E: Exposure>(
        &self,
        b: &mut Batch<'_, E>,
        group: &[usize],
        group_body: String,
    ) -> Result<(), Cancelled> {
        let mut suspect = group;
        // Some(body): the suspect range itself was answered 400 with that body.
        let mut confirmed = Some(group_body);
        loop {
            if suspect.len() == 1 {
                let body = match confirmed {
                    Some(body) => body,
                    None => {
                        self.metrics.bisection_requests.inc();
                        match self.send(b, suspect).await? {
                            Final::Accepted => {
                                b.delivered(suspect);
                                return Ok(());
                            }
                            Final::BadRequest { body } => body,
                        }
                    }
                };
                // A single-event body may still name index 0; keep that event's part then.
                let part = retry::parse_bad_indexes(body.as_bytes(), 1)
                    .and_then(|mut m| m.remove(&0))
                    .unwrap_or(body);
                b.reject(suspect[0], part);
                return Ok(());
            }
            let (first, second) = suspect.split_at(suspect.len() / 2);
            self.metrics.bisection_requests.inc();
            match self.send(b, first).await? {
                Final::Accepted => {
                    b.delivered(first);
                    suspect = second;
                    confirmed = None;
                }
                Final::BadRequest { body } => {
                    if let Some(bad) = retry::parse_bad_indexes(body.as_bytes(), first.len()) {
                        for (i, part) in bad {
                            b.reject(first[i], part);
                        }
                        return Ok(());
                    }
                    suspect = first;
                    confirmed = Some(body);
                }
            }
        }
    }

    /// Sends the events `idx` of `events` as one request until the API gives a final answer (2xx
    /// or 400), spending budget on every try.
    async fn send<E: Exposure>(&self, b: &mut Batch<'_, E>, idx: &[usize]) -> Result<Final, Cancelled> {
        let body = request_body(b.events, idx);
        let cancel = b.cancel;
        let mut attempt: u32 = 0;
        let mut auth_attempt: u32 = 0;
        let mut throttled_attempt: u32 = 0;
        loop {
            // Shutdown ends the waits only while nothing of the batch may have been counted.
            let stop = b.stop.filter(|_| !b.exposed);
            if stop.is_some_and(CancellationToken::is_cancelled) {
                return Err(Cancelled);
            }
            let creds = self.current_credentials();
            tokio::select! {
                r = self.budget.acquire(&creds.budget_id, cancel) => r?,
                () = stopped(stop) => return Err(Cancelled),
            }
            tokio::select! {
                () = b.before_request() => {}
                _ = cancel.cancelled() => return Err(Cancelled),
            }
            let answer = tokio::select! {
                a = self.post(&creds, body.clone(), idx.len()) => a,
                _ = cancel.cancelled() => return Err(Cancelled),
            };
            match &answer {
                Answer::AuthRefused(_)
                | Answer::TooManyRequests(_)
                | Answer::Retriable {
                    cause: Cause::Connect, ..
                } => b.refused().await,
                Answer::Retriable { .. } => b.uncertain = true,
                Answer::Success | Answer::BadRequest(_) => {}
            }
            let delay = match answer {
                Answer::Success => {
                    self.key_accepted();
                    self.throttle_streak.store(0, Ordering::Relaxed);
                    return Ok(Final::Accepted);
                }
                Answer::BadRequest(body) => {
                    self.key_accepted();
                    self.throttle_streak.store(0, Ordering::Relaxed);
                    return Ok(Final::BadRequest { body });
                }
                Answer::AuthRefused(status) => {
                    auth_attempt += 1;
                    self.metrics
                        .retries
                        .with_label_values(&[Cause::of_auth(status).label()])
                        .inc();
                    b.under_retry();
                    self.key_refused(status);
                    tracing::debug!(
                        cause = Cause::of_auth(status).label(),
                        attempt = auth_attempt,
                        events = idx.len(),
                        "key refused; retrying after delivery.auth_retry_interval"
                    );
                    sleep(self.cfg.auth_retry_interval, cancel, b.stop.filter(|_| !b.exposed)).await?;
                    self.reload_key();
                    continue;
                }
                Answer::TooManyRequests(retry_after) => {
                    throttled_attempt += 1;
                    self.metrics
                        .retries
                        .with_label_values(&[Cause::Status429.label()])
                        .inc();
                    b.under_retry();
                    let streak = self.throttle_streak.fetch_add(1, Ordering::Relaxed) + 1;
                    let pause = retry_after.unwrap_or_else(|| {
                        retry::backoff(streak, self.cfg.retry_backoff_initial, self.cfg.retry_backoff_max)
                    });
                    tracing::warn!(
                        cause = Cause::Status429.label(),
                        retry_after = retry_after.map(|d| d.as_secs_f64()),
                        pause_s = pause.as_secs_f64(),
                        attempt = throttled_attempt,
                        consecutive_429_of_key = streak,
                        events = idx.len(),
                        "API rate limit hit; pausing every request of the key"
                    );
                    // The pause itself is waited out in the next draw from the budget.
                    self.budget.pause(&creds.budget_id, pause).await;
                    continue;
                }
                Answer::Retriable { cause, detail } => {
                    attempt += 1;
                    let cause = cause.label();
                    self.metrics.retries.with_label_values(&[cause]).inc();
                    b.under_retry();
                    match self.cfg.max_retries {
                        Some(max) if attempt > max => {
                            let delay = self.cfg.retry_backoff_max;
                            tracing::error!(
                                cause, detail, attempt, events = idx.len(), delay_s = delay.as_secs_f64(),
                                "API request failed after delivery.max_retries; still retrying (events are never dropped)"
                            );
                            delay
                        }
                        _ => {
                            let delay =
                                retry::backoff(attempt, self.cfg.retry_backoff_initial, self.cfg.retry_backoff_max);
                            tracing::warn!(
                                cause,
                                detail,
                                attempt,
                                events = idx.len(),
                                delay_s = delay.as_secs_f64(),
                                "API request failed; retrying"
                            );
                            delay
                        }
                    }
                }
            };
            sleep(delay, cancel, b.stop.filter(|_| !b.exposed)).await?;
        }
    }

    /// One POST, classified; records the request metrics.
    async fn post(&self, creds: &Credentials, body: Bytes, n_events: usize) -> Answer {
        if n_events > 0 {
            self.metrics.events_per_request.observe(n_events as f64);
        }
        let started = Instant::now();
        let result = self
            .client
            .post(&self.url)
            .header(CONTENT_TYPE, "application/json")
            .header("x-api-key", creds.header.clone())
            .body(body)
            .send()
            .await;
        let (answer, status_label) = match result {
            Err(e) => {
                let answer = transport_error(&e);
                let label = match &answer {
                    Answer::Retriable {
                        cause: Cause::Timeout, ..
                    } => "timeout",
                    Answer::Retriable {
                        cause: Cause::Connect, ..
                    } => "connect_error",
                    _ => "io_error",
                };
                (answer, label.to_string())
            }
            Ok(resp) => {
                let status = resp.status();
                let answer = match status.as_u16() {
                    200..=299 => Answer::Success,
                    400 => match read_capped(resp).await {
                        Ok(b) => Answer::BadRequest(b),
                        Err(e) => transport_error(&e),
                    },
                    401 | 403 => Answer::AuthRefused(status.as_u16()),
                    429 => Answer::TooManyRequests(
                        resp.headers()
                            .get(RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| retry::parse_retry_after(v, SystemTime::now())),
                    ),
                    _ => Answer::Retriable {
                        cause: Cause::Status5xx,
                        detail: format!("HTTP {status}"),
                    },
                };
                (answer, status.as_str().to_string())
            }
        };
        self.metrics
            .requests
            .with_label_values(&[ENDPOINT_BATCH, &status_label])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[ENDPOINT_BATCH])
            .observe(started.elapsed().as_secs_f64());
        answer
    }

    /// Checks the key without sending events: POSTs `[]` to the batch endpoint (the API checks
    /// the key first: 401/403 means refused; 2xx or 400 means accepted). Spends one request of
    /// the budget, and waits for it like any request (drop the future to give up). Sets readiness
    /// `api_key` when the answer says something about the key.
    pub async fn probe(&self) -> KeyCheck {
        let never = CancellationToken::new();
        let creds = self.current_credentials();
        if self.budget.acquire(&creds.budget_id, &never).await.is_err() {
            return KeyCheck::Unknown {
                reason: "cancelled".into(),
            };
        }
        match self.post(&creds, Bytes::from_static(b"[]"), 0).await {
            Answer::Success | Answer::BadRequest(_) => {
                self.key_accepted();
                KeyCheck::Accepted
            }
            Answer::AuthRefused(status) => {
                self.key_refused(status);
                KeyCheck::Refused { status }
            }
            Answer::TooManyRequests(retry_after) => {
                if let Some(p) = retry_after {
                    self.budget.pause(&creds.budget_id, p).await;
                }
                KeyCheck::Unknown {
                    reason: "API answered 429 (rate limit)".into(),
                }
            }
            Answer::Retriable { detail, .. } => KeyCheck::Unknown { reason: detail },
        }
    }

    fn current_credentials(&self) -> Arc<Credentials> {
        self.credentials.read().clone()
    }

    /// How long the oldest batch under retry has been under way (`Duration::ZERO` when none):
    /// what `datapulse_bridge_delivery_oldest_retry_age_seconds` shows now.
    pub fn oldest_retry_age(&self) -> std::time::Duration {
        self.metrics.oldest_retry_age()
    }

    fn key_accepted(&self) {
        match self.key.up("API accepted the key") {
            Change::Same => return,
            Change::Recovered => tracing::info!("API accepted the key again; delivery resumes"),
            Change::First | Change::Failed => {}
        }
        self.metrics.auth_halted.set(0);
    }

    /// The halt of invariant 5: logged once per outage, readiness false.
    fn key_refused(&self, status: u16) {
        let reason = format!("API answered {status}: key refused");
        if self.key.down(false, reason) != Change::Same {
            tracing::error!(
                status,
                retry_every_s = self.cfg.auth_retry_interval.as_secs_f64(),
                key_file = self.key_file.as_ref().map(|p| p.display().to_string()),
                "API refused the key: delivery halted (nothing is dead-lettered or committed); \
                 fix the key (api.key_file is re-read before each retry)"
            );
        }
        self.metrics.auth_halted.set(1);
    }

    /// Re-reads `api.key_file` (a rotated Kubernetes Secret) before a retry after 401/403.
    fn reload_key(&self) {
        let Some(path) = &self.key_file else { return };
        let key = match std::fs::read_to_string(path) {
            Ok(s) => Secret(s.trim().to_string()),
            Err(e) => {
                tracing::warn!(key_file = %path.display(), error = %e, "cannot re-read api.key_file; keeping the current key");
                return;
            }
        };
        match credentials(&self.cfg, &key) {
            Ok(c) => *self.credentials.write() = Arc::new(c),
            Err(e) => tracing::warn!(key_file = %path.display(), error = %e, "keeping the current key"),
        }
    }
}

fn credentials(cfg: &DeliveryConfig, key: &Secret) -> Result<Credentials, SetupError> {
    let mut header = HeaderValue::from_str(key.expose()).map_err(|_| SetupError::KeyNotAHeader)?;
    header.set_sensitive(true);
    Ok(Credentials {
        header,
        budget_id: budget::budget_id(cfg, key),
    })
}

fn request_body(events: &[&[u8]], idx: &[usize]) -> Bytes {
    let len: usize = idx.iter().map(|&i| events[i].len() + 1).sum();
    let mut body = Vec::with_capacity(len + 2);
    body.push(b'[');
    for (n, &i) in idx.iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(events[i]);
    }
    body.push(b']');
    Bytes::from(body)
}

/// Timeouts, connection failures and other transport errors. reqwest's Display names the URL
/// (not secret) and never the headers.
fn transport_error(e: &reqwest::Error) -> Answer {
    let cause = if e.is_timeout() {
        Cause::Timeout
    } else if e.is_connect() {
        Cause::Connect
    } else {
        Cause::Io
    };
    // Report the cause chain: reqwest's top-level message alone ("error sending request") hides it.
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    Answer::Retriable { cause, detail }
}

/// The body of a response, at most [`MAX_ERROR_BODY`] bytes (lossy UTF-8).
async fn read_capped(mut resp: reqwest::Response) -> Result<String, reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_ERROR_BODY - buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Sleeps `d` unless `cancel` (or `stop`, when given) fires first.
async fn sleep(d: Duration, cancel: &CancellationToken, stop: Option<&CancellationToken>) -> Result<(), Cancelled> {
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = cancel.cancelled() => Err(Cancelled),
        () = stopped(stop) => Err(Cancelled),
    }
}

/// Completes when `stop` fires; never without one.
async fn stopped(stop: Option<&CancellationToken>) {
    match stop {
        Some(s) => s.cancelled().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
