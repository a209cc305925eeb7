//! Delivery to the Server Events API: the HTTP client, the key's rate budget, classification of
//! responses, retries, isolation of bad events, and the halt on a refused key.
//!
//! [`Deliverer::deliver_json`] takes one batch and returns one [`EventResult`] per event. Every
//! request draws from the key's [`budget`] first. What each answer leads to is decided by
//! [`decide::decide`], a pure function of the answer and the attempt (the table of
//! `docs/delivery.md`, API-CONTRACT.md "Responses"); this module only does what it decides:
//! - delivered (2xx); isolate bad events (400, 422: body indexes or bisection, see
//!   [`Deliverer::isolate`]); split a request refused as too large (413) and learn the body limit;
//! - retry after a backoff (408, 500, nothing sent), or pause the whole key (429, 503);
//! - in doubt (502, 504, no answer after the request was written): the events are never sent
//!   again under `delivery.on_ambiguous = "in-doubt"` (the default);
//! - halt (401/403: readiness `api_key`; 404, 405, 415, 3xx, other 4xx: readiness `api_endpoint`),
//!   probing again every `auth_retry_interval`;
//! - and a `Retry-After` on any answer makes the whole key wait at least that long.
//!
//! See `docs/delivery.md`.

mod budget;
mod config;
pub mod decide;
mod metrics;
pub mod retry;

pub use config::{ApiConfig, DeliveryConfig, KeyError, RateMode, MAX_CONCURRENCY, POOL_IDLE_TIMEOUT};
pub use decide::OnAmbiguous;

use crate::settings::Secret;
use crate::telemetry::{Change, Health, Ready, Telemetry};
pub use budget::BudgetError;
use budget::RateBudget;
use bytes::Bytes;
use decide::{decide, Answer, Attempt, Decision, Halt, Plan, Policy};
use metrics::{Metrics, RetryGuard};
use parking_lot::RwLock;
use reqwest::header::{HeaderValue, CONTENT_TYPE, DATE, RETRY_AFTER};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What happened to one event of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum EventResult {
    /// The API answered 2xx for a request that carried it.
    Delivered,
    /// The API rejected it permanently (400 or 422); the status and body go to the dead letter.
    Rejected { status: u16, body: String },
    /// Refused for its size (413) in a request carrying it alone: dead-letter it with reason
    /// `payload_too_large`; the body of the answer goes with it.
    TooLarge { body: String },
    /// A request carrying it got an ambiguous answer (502, 504: `status`; or none: `None`) and
    /// `delivery.on_ambiguous = "in-doubt"`: the API may have counted it. Dead-letter it with
    /// reason `in_doubt`, never send it again automatically. `detail` says what happened.
    InDoubt { status: Option<u16>, detail: String },
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
    /// The URL is not the API's (404, 405, 415, 3xx, another 4xx: `status`): readiness
    /// `api_endpoint` says so; the key is unknown.
    WrongUrl { status: u16 },
    /// No answer about the key (429, 5xx, a timeout, a connection error, a misconfigured URL):
    /// try again later. `reason` says what happened (never the key).
    Unknown { reason: String },
}

/// The answer to one request that ends its retries.
enum Final {
    Accepted,
    /// 400 or 422 (`status`).
    BadRequest {
        status: u16,
        body: String,
    },
    /// 413: too large for something in front of the API.
    TooLarge {
        body: String,
    },
    /// Ambiguous under `on_ambiguous = "in-doubt"`.
    InDoubt {
        status: Option<u16>,
        detail: String,
    },
}

/// One HTTP exchange: the answer for [`decide`], the `status` label of
/// `datapulse_bridge_api_requests_total` (an HTTP code, `timeout`, `connect_error`, `io_error`),
/// the body of a 400/413 and what went wrong, for logs and dead letters.
struct Exchange {
    answer: Answer,
    label: String,
    body: String,
    detail: String,
}

impl Exchange {
    /// The `cause` label of `datapulse_bridge_api_retries_total` and of the retry logs: `401`,
    /// `403`, `408`, `429`, `4xx` (other 4xx and 3xx), `5xx`, `timeout`, `connect`, `io`.
    fn cause(&self) -> &'static str {
        // A gateway's answer that may have been counted (502, 504, a proxy's own 5xx) is its own
        // class, apart from the API's 500: under `on_ambiguous = "resend"` these retries are the
        // at-least-once ones (as are `timeout` and `io`, no answer after the body was written).
        if matches!(self.answer, Answer::Status { .. }) && self.answer.ambiguous() {
            return "ambiguous";
        }
        match self.answer {
            Answer::Status { status, .. } => match status {
                401 => "401",
                403 => "403",
                408 => "408",
                429 => "429",
                500..=599 => "5xx",
                _ => "4xx",
            },
            _ => match self.label.as_str() {
                "timeout" => "timeout",
                "connect_error" => "connect",
                _ => "io",
            },
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
    /// A request of the batch ended so that it may have been counted (502, 504, no answer after it
    /// was written; under `on_ambiguous = "resend"` it is then retried): the batch stays exposed
    /// until it has its results.
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

    fn reject(&mut self, i: usize, status: u16, body: String) {
        self.metrics.rejected.inc();
        self.results[i] = Some(EventResult::Rejected { status, body });
    }

    fn too_large(&mut self, i: usize, body: String) {
        self.metrics.too_large.inc();
        self.results[i] = Some(EventResult::TooLarge { body });
    }

    fn in_doubt(&mut self, idx: &[usize], status: Option<u16>, detail: &str) {
        self.metrics.in_doubt.inc_by(idx.len() as u64);
        for &i in idx {
            self.results[i] = Some(EventResult::InDoubt {
                status,
                detail: detail.to_string(),
            });
        }
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
    /// The path of `url`, for the `api_endpoint` readiness condition (the base URL may hold
    /// credentials; its path does not).
    url_path: String,
    key_file: Option<PathBuf>,
    credentials: RwLock<Arc<Credentials>>,
    budget: RateBudget,
    cfg: DeliveryConfig,
    policy: Policy,
    /// Whether the API accepts the key: readiness `api_key`.
    key: Health,
    /// Whether the URL is one the API answers at: readiness `api_endpoint`.
    endpoint: Health,
    /// Consecutive 429s and 503s of the key, for the pause of one without `Retry-After`.
    throttle_streak: AtomicU32,
    /// Consecutive ambiguous answers of the key (a gateway's 502s, timeouts): each pauses the
    /// key a backoff that doubles with the streak, so an outage behind a gateway dead-letters a
    /// few requests' events, not the stream (reset by any answer of the API).
    ambiguous_streak: AtomicU32,
    /// The smallest body refused with 413 (0: none yet).
    refused_body: AtomicUsize,
    /// The largest body accepted since the first 413 (0: none yet): requests are cut to it
    /// (before the first acceptance, to just below `refused_body`).
    body_limit: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Deliverer {
    /// The HTTP client, key and rate budget of one API; its metrics and the `api_key` and
    /// `api_endpoint` readiness conditions go to `telemetry`.
    ///
    /// Errors: no readable key, a key that is not a header value, the HTTP client (its TLS
    /// roots), the rate budget's settings.
    pub fn new(api: &ApiConfig, cfg: &DeliveryConfig, telemetry: &Telemetry) -> Result<Deliverer, SetupError> {
        let client = reqwest::Client::builder()
            .timeout(api.request_timeout)
            // The connection is made (DNS, TCP, TLS) well within the request's timeout, so that a
            // slow connect ends as "not sent" (retried) rather than as the request's timeout,
            // which is ambiguous.
            .connect_timeout(api.connect_timeout.min(api.request_timeout / 2))
            // HTTP/1.1 only: an HTTP/2 stream refused or cut by GOAWAY would be one more way for
            // a request not processed to look unanswered (ambiguous); the API needs nothing of h2.
            .http1_only()
            // Below the keep-alive of the usual servers and load balancers (60 s and more), so
            // that a request rarely meets a connection the server has just closed.
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // A redirect would send the body where it was not configured to go: a 3xx halts.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("datapulse-bridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let url = format!("{}/v2/s2s/batch", api.base_url.trim_end_matches('/'));
        let url_path = reqwest::Url::parse(&url)
            .map(|u| u.path().to_string())
            .unwrap_or_else(|_| "/v2/s2s/batch".into());
        let key = api.read_key()?;
        let credentials = credentials(cfg, &key)?;
        let metrics: Arc<Metrics> = telemetry.metrics();
        metrics.body_limit.set(0);
        Ok(Deliverer {
            client,
            url,
            url_path,
            key_file: if api.key.is_some() { None } else { api.key_file.clone() },
            credentials: RwLock::new(Arc::new(credentials)),
            budget: RateBudget::new(cfg, telemetry)?,
            cfg: cfg.clone(),
            policy: Policy {
                backoff_initial: cfg.retry_backoff_initial,
                backoff_max: cfg.retry_backoff_max,
                max_retries: cfg.max_retries,
                auth_retry_interval: cfg.auth_retry_interval,
                on_ambiguous: cfg.on_ambiguous.unwrap_or_default(),
            },
            key: Health::new(telemetry, Ready::ApiKey),
            endpoint: Health::new(telemetry, Ready::ApiEndpoint),
            throttle_streak: Default::default(),
            ambiguous_streak: Default::default(),
            refused_body: AtomicUsize::new(0),
            body_limit: AtomicUsize::new(0),
            metrics,
        })
    }

    /// The largest request body (bytes) accepted since the first 413 of this process, to which
    /// requests are cut; `None` before any body was accepted after a 413.
    pub fn learned_body_limit(&self) -> Option<usize> {
        Some(self.body_limit.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    /// The size requests are cut to: the learned limit, or just below the smallest body refused
    /// before any was accepted since; `None` before any 413.
    fn cut_limit(&self) -> Option<usize> {
        self.learned_body_limit().or_else(|| {
            Some(self.refused_body.load(Ordering::Relaxed))
                .filter(|&n| n > 0)
                .map(|n| n.saturating_sub(1).max(1))
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

    /// Sends the batch's events until each has a result, in order: as one request, or as
    /// requests cut to the learned body limit; what is left of a request after a 400 was isolated
    /// goes again as one request, the halves of one refused as too large (413) one after the
    /// other.
    async fn deliver_batch<E: Exposure>(&self, b: &mut Batch<'_, E>) -> Result<(), Cancelled> {
        let all: Vec<usize> = (0..b.events.len()).collect();
        let mut queue: VecDeque<Vec<usize>> = self.cut(b.events, all).into();
        while let Some(group) = queue.pop_front() {
            match self.send(b, &group).await? {
                Final::Accepted => b.delivered(&group),
                Final::InDoubt { status, detail } => b.in_doubt(&group, status, &detail),
                Final::TooLarge { body } => {
                    if let [one] = group[..] {
                        b.too_large(one, body);
                    } else {
                        let (first, second) = group.split_at(group.len() / 2);
                        queue.push_front(second.to_vec());
                        queue.push_front(first.to_vec());
                    }
                }
                Final::BadRequest { status, body } => {
                    if let Some(bad) = retry::parse_bad_indexes(body.as_bytes(), group.len()) {
                        for (i, part) in bad {
                            b.reject(group[i], status, part);
                        }
                    } else if group.len() == 1 {
                        b.reject(group[0], status, body);
                    } else if let Some(probe) = self.isolate(b, &group, status, body).await? {
                        // A probe of the isolation was refused as too large: it goes again on
                        // its own first (split, or dead-lettered alone, by the 413 rows), then
                        // what is left. Nothing before it is unresolved: order is kept.
                        let rest: Vec<usize> = group
                            .iter()
                            .copied()
                            .filter(|i| b.results[*i].is_none() && !probe.contains(i))
                            .collect();
                        if !rest.is_empty() {
                            queue.push_front(rest);
                        }
                        queue.push_front(probe);
                        continue;
                    }
                    // What is left, in order, goes again as one request.
                    let rest: Vec<usize> = group.into_iter().filter(|&i| b.results[i].is_none()).collect();
                    if !rest.is_empty() {
                        queue.push_front(rest);
                    }
                }
            }
        }
        Ok(())
    }

    /// `idx` in order, cut into requests whose bodies fit the learned body limit (an event larger
    /// than the limit goes alone).
    fn cut(&self, events: &[&[u8]], idx: Vec<usize>) -> Vec<Vec<usize>> {
        let Some(limit) = self.cut_limit() else {
            return vec![idx];
        };
        let mut out = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        let mut size = 2;
        for i in idx {
            let add = events[i].len() + usize::from(!cur.is_empty());
            if !cur.is_empty() && size + add > limit {
                out.push(std::mem::take(&mut cur));
                size = 2;
            }
            size += events[i].len() + usize::from(!cur.is_empty());
            cur.push(i);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
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
    /// Events accepted on the way are marked delivered, a probe answered ambiguously in doubt;
    /// the ones left (the halves that waited) are sent by the caller as one request. For one bad
    /// event among n this costs at most ⌈log2 n⌉ + 1 requests, and one more for the rest.
    /// `Some(probe)` when a probe was refused as too large (413): the caller sends it again on
    /// its own (to be split), then the rest.
    async fn isolate<E: Exposure>(
        &self,
        b: &mut Batch<'_, E>,
        group: &[usize],
        status: u16,
        group_body: String,
    ) -> Result<Option<Vec<usize>>, Cancelled> {
        let mut suspect = group;
        // Some(body): the suspect range itself was answered 400 with that body.
        let mut confirmed = Some((status, group_body));
        loop {
            if suspect.len() == 1 {
                let (status, body) = match confirmed {
                    Some(c) => c,
                    None => {
                        self.metrics.bisection_requests.inc();
                        match self.send(b, suspect).await? {
                            Final::Accepted => {
                                b.delivered(suspect);
                                return Ok(None);
                            }
                            Final::InDoubt { status, detail } => {
                                b.in_doubt(suspect, status, &detail);
                                return Ok(None);
                            }
                            Final::TooLarge { body } => {
                                b.too_large(suspect[0], body);
                                return Ok(None);
                            }
                            Final::BadRequest { status, body } => (status, body),
                        }
                    }
                };
                // A single-event body may still name index 0; keep that event's part then.
                let part = retry::parse_bad_indexes(body.as_bytes(), 1)
                    .and_then(|mut m| m.remove(&0))
                    .unwrap_or(body);
                b.reject(suspect[0], status, part);
                return Ok(None);
            }
            let (first, second) = suspect.split_at(suspect.len() / 2);
            self.metrics.bisection_requests.inc();
            match self.send(b, first).await? {
                Final::Accepted => {
                    b.delivered(first);
                    suspect = second;
                    confirmed = None;
                }
                Final::InDoubt { status, detail } => {
                    // Whether the bad event was in it is unknown: the search goes on in the
                    // second half, and the rest is sent by the caller.
                    b.in_doubt(first, status, &detail);
                    suspect = second;
                    confirmed = None;
                }
                Final::TooLarge { .. } => return Ok(Some(first.to_vec())),
                Final::BadRequest { status, body } => {
                    if let Some(bad) = retry::parse_bad_indexes(body.as_bytes(), first.len()) {
                        for (i, part) in bad {
                            b.reject(first[i], status, part);
                        }
                        return Ok(None);
                    }
                    suspect = first;
                    confirmed = Some((status, body));
                }
            }
        }
    }

    /// Sends the events `idx` of `events` as one request until [`decide`] gives a final answer,
    /// spending budget on every try; does what each [`Plan`] says in between.
    async fn send<E: Exposure>(&self, b: &mut Batch<'_, E>, idx: &[usize]) -> Result<Final, Cancelled> {
        let body = request_body(b.events, idx);
        let cancel = b.cancel;
        let mut retries: u32 = 0;
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
            let x = tokio::select! {
                x = self.post(&creds, body.clone(), idx.len()) => x,
                _ = cancel.cancelled() => return Err(Cancelled),
            };
            let attempt = Attempt {
                retries,
                key_throttled: self.throttle_streak.load(Ordering::Relaxed),
                events: idx.len(),
                jitter: rand::random::<f64>(),
            };
            let Plan { decision, key_wait } = decide(x.answer, &attempt, &self.policy);
            self.metrics
                .decisions
                .with_label_values(&[decision_label(&decision)])
                .inc();
            // A 429's or 503's pause is the Retry-After itself, taken below.
            if let Some(wait) = key_wait.filter(|_| !matches!(decision, Decision::PauseKey { .. })) {
                tracing::info!(status = %x.label, wait_s = wait.as_secs_f64(), "the API answered with Retry-After; every request of the key waits");
                self.budget.pause(&creds.budget_id, wait).await;
            }
            if x.answer.ambiguous() {
                b.uncertain = true;
            } else if !matches!(decision, Decision::Done | Decision::Isolate) {
                b.refused().await;
            }
            let status = match x.answer {
                Answer::Status { status, .. } => Some(status),
                _ => None,
            };
            let delay = match decision {
                Decision::Done => {
                    self.answered(&x);
                    if self.refused_body.load(Ordering::Relaxed) > 0 {
                        let before = self.body_limit.fetch_max(body.len(), Ordering::Relaxed);
                        if body.len() > before {
                            self.metrics.body_limit.set(body.len() as i64);
                        }
                    }
                    return Ok(Final::Accepted);
                }
                Decision::Isolate => {
                    self.answered(&x);
                    return Ok(Final::BadRequest {
                        status: status.unwrap_or(400),
                        body: x.body,
                    });
                }
                // A 413 comes from whatever is in front of the API: it says nothing of the key or
                // the endpoint. Only a request of several events teaches a limit: a lone event too
                // large says nothing of how large the others may be.
                Decision::Split => {
                    self.too_large(body.len(), idx.len());
                    return Ok(Final::TooLarge { body: x.body });
                }
                Decision::TooLarge => {
                    tracing::warn!(
                        body_bytes = body.len(),
                        "one event alone is refused as too large (413): dead-lettered as payload_too_large"
                    );
                    return Ok(Final::TooLarge { body: x.body });
                }
                Decision::InDoubt => {
                    let streak = self.ambiguous_streak.fetch_add(1, Ordering::Relaxed) + 1;
                    if streak > 1 {
                        let pause = retry::backoff_ceiling(
                            streak - 1,
                            self.cfg.retry_backoff_initial,
                            self.cfg.retry_backoff_max,
                        );
                        tracing::warn!(
                            consecutive = streak,
                            pause_s = pause.as_secs_f64(),
                            "ambiguous answers in a row: pausing the key so that an outage is not dead-lettered whole"
                        );
                        self.budget.pause(&creds.budget_id, pause).await;
                    }
                    tracing::warn!(
                        status = %x.label, detail = %x.detail, events = idx.len(),
                        "the API may have counted this request (delivery.on_ambiguous = \"in-doubt\"): \
                         its events are dead-lettered as in_doubt, never sent again automatically"
                    );
                    return Ok(Final::InDoubt {
                        status,
                        detail: x.detail,
                    });
                }
                Decision::Retry { after } => {
                    retries += 1;
                    self.retried(b, &x);
                    if self.cfg.max_retries.is_some_and(|max| retries > max) {
                        tracing::error!(
                            cause = x.cause(), detail = %x.detail, attempt = retries, events = idx.len(),
                            delay_s = after.as_secs_f64(),
                            "API request failed after delivery.max_retries; still retrying (events are never dropped)"
                        );
                    } else {
                        tracing::warn!(
                            cause = x.cause(), detail = %x.detail, attempt = retries, events = idx.len(),
                            delay_s = after.as_secs_f64(), "API request failed; retrying"
                        );
                    }
                    after
                }
                Decision::PauseKey { pause } => {
                    let streak = self.throttle_streak.fetch_add(1, Ordering::Relaxed) + 1;
                    self.retried(b, &x);
                    tracing::warn!(
                        cause = x.cause(),
                        pause_s = pause.as_secs_f64(),
                        consecutive_of_key = streak,
                        events = idx.len(),
                        "the API asks the key to slow down; pausing every request of the key"
                    );
                    // The pause itself is waited out in the next draw from the budget.
                    self.budget.pause(&creds.budget_id, pause).await;
                    continue;
                }
                Decision::Halt { why, probe_after } => {
                    self.retried(b, &x);
                    self.halted(why);
                    sleep(probe_after, cancel, b.stop.filter(|_| !b.exposed)).await?;
                    if matches!(why, Halt::KeyRefused { .. }) {
                        self.reload_key();
                    }
                    continue;
                }
            };
            sleep(delay, cancel, b.stop.filter(|_| !b.exposed)).await?;
        }
    }

    /// A request was retried: counted by cause, and the batch is under retry.
    fn retried<E: Exposure>(&self, b: &mut Batch<'_, E>, x: &Exchange) {
        self.metrics.retries.with_label_values(&[x.cause()]).inc();
        b.under_retry();
    }

    /// The API answered as an API does (2xx, 400): the key and the endpoint are right.
    fn answered(&self, x: &Exchange) {
        self.key_accepted();
        self.endpoint_found();
        self.ambiguous_streak.store(0, Ordering::Relaxed);
        if !matches!(x.answer, Answer::Status { status: 413, .. }) {
            self.throttle_streak.store(0, Ordering::Relaxed);
        }
    }

    /// A 413 for a body of `len` bytes: from now on requests are cut to the largest body
    /// accepted since (until one is, to just below this one). A learned limit at least this large
    /// (the limit in front of the API went down) is learned again.
    fn too_large(&self, len: usize, events: usize) {
        let refused = self.refused_body.load(Ordering::Relaxed);
        if refused == 0 || len < refused {
            self.refused_body.store(len, Ordering::Relaxed);
        }
        if self.body_limit.load(Ordering::Relaxed) >= len {
            self.body_limit.store(0, Ordering::Relaxed);
            self.metrics.body_limit.set(0);
        }
        tracing::warn!(
            body_bytes = len,
            events,
            "the API (or a proxy in front of it) refused the request as too large (413); splitting it"
        );
    }

    /// One POST; records the request metrics.
    async fn post(&self, creds: &Credentials, body: Bytes, n_events: usize) -> Exchange {
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
        let x = match result {
            Err(e) => transport_error(&e),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let header = |name| resp.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok());
                let retry_after =
                    header(RETRY_AFTER).and_then(|v| retry::retry_after_of(v, header(DATE), SystemTime::now()));
                let body = if matches!(status, 400 | 413 | 422) {
                    // An unreadable body leaves the bad events to bisection.
                    read_capped(resp).await.unwrap_or_default()
                } else {
                    String::new()
                };
                Exchange {
                    answer: Answer::Status { status, retry_after },
                    label: status.to_string(),
                    body,
                    detail: format!("HTTP {status}"),
                }
            }
        };
        self.metrics
            .requests
            .with_label_values(&[ENDPOINT_BATCH, &x.label])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[ENDPOINT_BATCH])
            .observe(started.elapsed().as_secs_f64());
        x
    }

    /// Checks the key without sending events: POSTs `[]` to the batch endpoint (the API checks
    /// the key first: 401/403 means refused; 2xx or 400 means accepted). Spends one request of
    /// the budget, and waits for it like any request (drop the future to give up). Sets readiness
    /// `api_key` (and `api_endpoint`) when the answer says something about them.
    pub async fn probe(&self) -> KeyCheck {
        let never = CancellationToken::new();
        let creds = self.current_credentials();
        if self.budget.acquire(&creds.budget_id, &never).await.is_err() {
            return KeyCheck::Unknown {
                reason: "cancelled".into(),
            };
        }
        let x = self.post(&creds, Bytes::from_static(b"[]"), 0).await;
        let attempt = Attempt {
            retries: 0,
            key_throttled: 0,
            events: 0,
            jitter: 1.0,
        };
        let plan = decide(x.answer, &attempt, &self.policy);
        if let Some(wait) = plan.key_wait {
            self.budget.pause(&creds.budget_id, wait).await;
        }
        match plan.decision {
            Decision::Done | Decision::Isolate => {
                self.answered(&x);
                KeyCheck::Accepted
            }
            Decision::Halt {
                why: Halt::KeyRefused { status },
                ..
            } => {
                self.halted(Halt::KeyRefused { status });
                KeyCheck::Refused { status }
            }
            Decision::Halt {
                why: Halt::Misconfigured { status },
                ..
            } => {
                self.halted(Halt::Misconfigured { status });
                KeyCheck::WrongUrl { status }
            }
            Decision::PauseKey { pause } => {
                self.budget.pause(&creds.budget_id, pause).await;
                KeyCheck::Unknown { reason: x.detail }
            }
            Decision::Split | Decision::TooLarge | Decision::InDoubt | Decision::Retry { .. } => {
                KeyCheck::Unknown { reason: x.detail }
            }
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

    fn endpoint_found(&self) {
        match self.endpoint.up("the API answers at the configured URL") {
            Change::Same => return,
            Change::Recovered => tracing::info!("the API answers at the configured URL again; delivery resumes"),
            Change::First | Change::Failed => {}
        }
        self.metrics.endpoint_halted.set(0);
    }

    /// Delivery halts (invariant 5): logged once per outage, readiness false.
    fn halted(&self, why: Halt) {
        match why {
            Halt::KeyRefused { status } => self.key_refused(status),
            Halt::Misconfigured { status } => self.misconfigured(status),
        }
    }

    /// A 404, 405, 415, 3xx or other 4xx: the URL is wrong (or an ingress answers for a deploy).
    /// The reason names the status and the URL's path, never the key.
    fn misconfigured(&self, status: u16) {
        let reason = format!(
            "API answered {status} to POST {}: check api.base_url (delivery halted, probing every {})",
            self.url_path,
            humantime::format_duration(self.cfg.auth_retry_interval)
        );
        if self.endpoint.down(false, reason) != Change::Same {
            tracing::error!(
                status,
                path = %self.url_path,
                retry_every_s = self.cfg.auth_retry_interval.as_secs_f64(),
                "the API does not answer at the configured URL: delivery halted (nothing is dead-lettered \
                 or committed); check api.base_url"
            );
        }
        self.metrics.endpoint_halted.set(1);
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

/// Timeouts, connection failures and other transport errors, as an [`Exchange`]. Not sent: a
/// connection that could not be made (refused, DNS, TLS, connect timeout) and an error while
/// writing the request (hyper's "error writing a body to connection", which also covers the
/// head: a reused connection the server had closed) or a request dropped before it was written.
/// Anything else (the timeout, a connection closed or reset while waiting for the answer) came
/// after the request was written: no answer. reqwest's Display names the URL (not secret) and
/// never the headers.
fn transport_error(e: &reqwest::Error) -> Exchange {
    // Report the cause chain: reqwest's top-level message alone ("error sending request") hides it.
    let mut detail = e.to_string();
    let mut not_written = false;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        not_written |= text.starts_with("error writing a body to connection") || text == "operation was canceled";
        detail.push_str(": ");
        detail.push_str(&text);
        source = s.source();
    }
    let (answer, label) = if e.is_connect() {
        (Answer::NotSent, "connect_error")
    } else if e.is_timeout() {
        (Answer::NoAnswer, "timeout")
    } else if not_written {
        (Answer::NotSent, "io_error")
    } else {
        (Answer::NoAnswer, "io_error")
    };
    Exchange {
        answer,
        label: label.to_string(),
        body: String::new(),
        detail,
    }
}

/// The `decision` label of `datapulse_bridge_api_decisions_total`.
fn decision_label(d: &Decision) -> &'static str {
    match d {
        Decision::Done => "delivered",
        Decision::Isolate => "isolate",
        Decision::Retry { .. } => "retry",
        Decision::PauseKey { .. } => "pause_key",
        Decision::Split => "split",
        Decision::TooLarge => "too_large",
        Decision::InDoubt => "in_doubt",
        Decision::Halt { .. } => "halt",
    }
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
