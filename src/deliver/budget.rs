//! The rate budget of the API key: every request (first try, retry, bisection probe, key probe)
//! draws one unit before it is sent.
//!
//! The budget is a GCRA (generic cell rate algorithm) whose emission interval is chosen so that no
//! window of `rate_window` ever holds more than `rate_limit` requests, whatever window the API
//! counts in: with burst `b`, interval = window / (limit − b + 1). Three places keep it:
//! - `local`: this process alone (the `governor` crate);
//! - `static_share`: this process alone, with `rate_limit / replicas`;
//! - `redis`: every replica, through one Redis key updated by an atomic Lua script on the Redis
//!   clock. The Redis key is named by a hash of the API key (or a configured name), never the key.
//!
//! A 429 pauses the whole key: [`RateBudget::pause`] stops every draw of this process until the
//! pause ends, and in `redis` mode moves the shared budget's next-allowed time forward so that the
//! other replicas pause too.

use super::metrics::Metrics;
use super::{Cancelled, DeliveryConfig, RateMode};
use crate::backoff::{self, Backoff};
use crate::settings::Secret;
use crate::telemetry::{Change, Health, Ready, Telemetry};
use governor::clock::DefaultClock;
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

pub struct RateBudget {
    store: Store,
    /// Until when this process sends nothing to the key (a 429).
    paused_until: Mutex<Option<Instant>>,
    /// Requests drawn in advance by [`RateBudget::reserve`] and not yet used.
    prepaid: std::sync::atomic::AtomicU32,
    metrics: Arc<Metrics>,
}

enum Store {
    Local(Limiter),
    Redis(RedisBudget),
}

/// GCRA parameters: (emission interval, burst) such that any window of `window` holds at most
/// `limit` requests. Requires 1 ≤ burst ≤ limit.
pub fn gcra(limit: u32, window: Duration, burst: u32) -> (Duration, u32) {
    let burst = burst.clamp(1, limit.max(1));
    let slots = u128::from(limit.max(1) - burst + 1);
    // Rounded up: an interval a nanosecond short would let one request too many into a window.
    let nanos = window.as_nanos().div_ceil(slots);
    (Duration::from_nanos(nanos.min(u64::MAX as u128) as u64), burst)
}

/// The name of the key's budget in Redis: the configured name, or a SHA-256 of the key (the key
/// itself never reaches Redis).
pub fn budget_id(cfg: &DeliveryConfig, key: &Secret) -> String {
    match &cfg.budget_name {
        Some(name) => format!("{}{name}", cfg.redis_key_prefix),
        None => {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(b"datapulse-bridge rate budget\0");
            ctx.update(key.expose().as_bytes());
            let digest = ctx.finish();
            let hex: String = digest.as_ref().iter().take(16).map(|b| format!("{b:02x}")).collect();
            format!("{}key-{hex}", cfg.redis_key_prefix)
        }
    }
}

impl RateBudget {
    /// Its metrics and (`redis` mode) the `rate_budget` readiness condition go to `telemetry`.
    pub fn new(cfg: &DeliveryConfig, telemetry: &Telemetry) -> Result<RateBudget, BudgetError> {
        let metrics = telemetry.metrics::<Metrics>();
        let store = match cfg.rate_mode {
            RateMode::Local => Store::Local(limiter(cfg.rate_limit, cfg.rate_window, cfg.rate_burst)?),
            RateMode::StaticShare => {
                let replicas = cfg.replicas.unwrap_or(1).max(1);
                Store::Local(limiter(cfg.rate_limit / replicas, cfg.rate_window, cfg.rate_burst)?)
            }
            RateMode::Redis => {
                let url = cfg.redis_url.as_ref().ok_or(BudgetError::RedisUrlMissing)?;
                // The URL may hold a password: say what is wrong without echoing it.
                let client = redis::Client::open(url.expose()).map_err(|e| BudgetError::RedisUrl { kind: e.kind() })?;
                let (interval, burst) = gcra(cfg.rate_limit, cfg.rate_window, cfg.rate_burst);
                Store::Redis(RedisBudget {
                    client,
                    conn: OnceLock::new(),
                    interval_us: interval.as_micros().max(1) as u64,
                    tolerance_us: (interval.as_micros() * u128::from(burst - 1)) as u64,
                    health: Health::new(telemetry, Ready::RateBudget),
                    metrics: Arc::clone(&metrics),
                })
            }
        };
        Ok(RateBudget {
            store,
            paused_until: Mutex::new(None),
            prepaid: Default::default(),
            metrics,
        })
    }

    /// Waits until the key may send one more request, and draws it. `id` names the shared budget
    /// in `redis` mode (see [`budget_id`]).
    pub async fn acquire(&self, id: &str, cancel: &CancellationToken) -> Result<(), Cancelled> {
        let started = Instant::now();
        let result = self.acquire_inner(id, cancel).await;
        self.metrics.budget_wait.inc_by(started.elapsed().as_secs_f64());
        result
    }

    /// Draws one request in advance, waiting until the budget allows it; the next
    /// [`RateBudget::acquire`] uses it at once. The batcher calls this while it keeps filling a
    /// batch, so that when the budget is the bottleneck every request leaves full. Dropping the
    /// future before it completes draws nothing.
    pub async fn reserve(&self, id: &str, cancel: &CancellationToken) -> Result<(), Cancelled> {
        if self.prepaid.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return Ok(());
        }
        self.acquire(id, cancel).await?;
        self.prepaid.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    async fn acquire_inner(&self, id: &str, cancel: &CancellationToken) -> Result<(), Cancelled> {
        // A unit drawn in advance was drawn before any pause another replica has set since: in
        // `redis` mode it is given up while the shared pause lasts (spending less than the budget
        // is always safe), and the draw below waits the pause out.
        if let Store::Redis(r) = &self.store {
            if self.prepaid.load(std::sync::atomic::Ordering::Acquire) > 0 {
                let left = r.pause_left(id).await;
                if !left.is_zero() {
                    self.prepaid.store(0, std::sync::atomic::Ordering::Release);
                    sleep_until(Instant::now() + left, cancel).await?;
                }
            }
        }
        let take_prepaid = |n: u32| n.checked_sub(1);
        if self.pause_end().is_none()
            && self
                .prepaid
                .fetch_update(
                    std::sync::atomic::Ordering::AcqRel,
                    std::sync::atomic::Ordering::Acquire,
                    take_prepaid,
                )
                .is_ok()
        {
            return Ok(());
        }
        loop {
            if let Some(until) = self.pause_end() {
                sleep_until(until, cancel).await?;
                continue;
            }
            match &self.store {
                Store::Local(l) => {
                    let snapshot = tokio::select! {
                        s = l.until_ready() => s,
                        _ = cancel.cancelled() => return Err(Cancelled),
                    };
                    self.metrics
                        .budget_remaining
                        .set(i64::from(snapshot.remaining_burst_capacity()));
                }
                Store::Redis(r) => r.acquire(id, cancel).await?,
            }
            // A 429 may have paused the key while this draw waited: the unit drawn is then given
            // up (spending less than the budget is always safe) and the pause honoured.
            if self.pause_end().is_none() {
                return Ok(());
            }
        }
    }

    fn pause_end(&self) -> Option<Instant> {
        let p = *self.paused_until.lock();
        p.filter(|&until| until > Instant::now())
    }

    /// Pauses the key for `pause`: every draw of this process waits until it ends, and in `redis`
    /// mode the shared budget's next-allowed time moves past it for every replica.
    pub async fn pause(&self, id: &str, pause: Duration) {
        let until = Instant::now() + pause;
        {
            let mut p = self.paused_until.lock();
            if p.is_none_or(|old| old < until) {
                *p = Some(until);
            }
        }
        if let Store::Redis(r) = &self.store {
            r.pause(id, pause).await;
        }
    }
}

/// Why a [`RateBudget`] cannot be built (each names the `[delivery]` key at fault).
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("delivery.redis_url is required when delivery.rate_mode = \"redis\"")]
    RedisUrlMissing,
    /// The URL may hold a password: only the kind of problem is said, never the URL.
    #[error("delivery.redis_url is not a usable Redis URL ({kind:?})")]
    RedisUrl { kind: redis::ErrorKind },
    #[error("delivery.rate_limit divided among delivery.replicas is below one request per window")]
    ShareBelowOne,
    #[error("delivery.rate_window must be greater than zero")]
    ZeroWindow,
}

fn limiter(limit: u32, window: Duration, burst: u32) -> Result<Limiter, BudgetError> {
    if limit < 1 {
        return Err(BudgetError::ShareBelowOne);
    }
    let (interval, burst) = gcra(limit, window, burst);
    let quota = Quota::with_period(interval)
        .ok_or(BudgetError::ZeroWindow)?
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
    Ok(RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>())
}

async fn sleep_until(until: Instant, cancel: &CancellationToken) -> Result<(), Cancelled> {
    tokio::select! {
        _ = tokio::time::sleep_until(until) => Ok(()),
        _ = cancel.cancelled() => Err(Cancelled),
    }
}

struct RedisBudget {
    client: redis::Client,
    conn: OnceLock<ConnectionManager>,
    interval_us: u64,
    tolerance_us: u64,
    /// Whether Redis answers: readiness `rate_budget`.
    health: Health,
    metrics: Arc<Metrics>,
}

/// GCRA draw. KEYS[1] holds the theoretical arrival time (TAT, µs on the Redis clock). A request
/// conforms when now ≥ TAT − tolerance; it then moves TAT to max(TAT, now) + interval.
/// Returns {1, 0, remaining burst} when granted, {0, µs to wait, 0} when not.
const ACQUIRE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return {0, math.ceil(wait), 0} end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
local remaining = math.floor((now + tolerance - next_tat) / interval) + 1
if remaining < 0 then remaining = 0 end
return {1, 0, remaining}
"#;

/// Pause (a 429): moves TAT so that nothing conforms before now + ARGV[1] µs (ARGV[2] is the
/// tolerance). Never moves TAT backwards.
const PAUSE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local resume = now + tonumber(ARGV[1]) + tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if resume > tat then
  redis.call('SET', KEYS[1], string.format('%.0f', resume), 'PX', math.ceil((resume - now) / 1000) + 1000)
end
local ms = math.ceil(tonumber(ARGV[1]) / 1000)
if ms > 0 and redis.call('PTTL', KEYS[1] .. ':paused') < ms then
  redis.call('SET', KEYS[1] .. ':paused', '1', 'PX', ms)
end
return 1
"#;

static ACQUIRE: LazyScript = LazyScript(OnceLock::new(), ACQUIRE_LUA);
static PAUSE: LazyScript = LazyScript(OnceLock::new(), PAUSE_LUA);

struct LazyScript(OnceLock<redis::Script>, &'static str);

impl LazyScript {
    fn get(&self) -> &redis::Script {
        self.0.get_or_init(|| redis::Script::new(self.1))
    }
}

impl RedisBudget {
    fn conn(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        let c = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        Ok(self.conn.get_or_init(|| c).clone())
    }

    async fn acquire(&self, id: &str, cancel: &CancellationToken) -> Result<(), Cancelled> {
        loop {
            // An unreachable Redis is asked again per `Backoff::RATE_BUDGET`; the budget is never
            // bypassed: no request leaves without a unit drawn from Redis.
            let (granted, wait_us, remaining) = backoff::until_ok(
                Backoff::RATE_BUDGET,
                Some(cancel),
                || async {
                    let mut c = self.conn()?;
                    let mut call = ACQUIRE.get().key(id);
                    call.arg(self.interval_us).arg(self.tolerance_us);
                    call.invoke_async::<(i64, i64, i64)>(&mut c).await
                },
                |e: &redis::RedisError, _| self.set_health(Some(e)),
            )
            .await
            .ok_or(Cancelled)?;
            self.set_health(None);
            if granted == 1 {
                self.metrics.budget_remaining.set(remaining);
                return Ok(());
            }
            sleep_until(Instant::now() + Duration::from_micros(wait_us.max(1) as u64), cancel).await?;
        }
    }

    /// How long the key is still paused by a 429/503 of any replica (`PAUSE_LUA` keeps a key
    /// `<id>:paused` for the pause): a unit drawn before the pause is not spent inside it.
    /// Zero when not paused or when Redis does not answer (the next draw then waits on Redis).
    async fn pause_left(&self, id: &str) -> Duration {
        let Ok(mut c) = self.conn() else {
            return Duration::ZERO;
        };
        let ttl: redis::RedisResult<i64> = redis::cmd("PTTL").arg(format!("{id}:paused")).query_async(&mut c).await;
        Duration::from_millis(ttl.ok().filter(|ms| *ms > 0).unwrap_or(0) as u64)
    }

    async fn pause(&self, id: &str, pause: Duration) {
        let result: redis::RedisResult<i64> = match self.conn() {
            Ok(mut c) => {
                PAUSE
                    .get()
                    .key(id)
                    .arg(pause.as_micros() as u64)
                    .arg(self.tolerance_us)
                    .invoke_async(&mut c)
                    .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => self.set_health(None),
            // This process still pauses; other replicas will meet their own 429.
            Err(e) => self.set_health(Some(&e)),
        }
    }

    /// Readiness `rate_budget` and one log line per change between reachable and unreachable.
    fn set_health(&self, err: Option<&redis::RedisError>) {
        match err {
            None => {
                if self.health.up("shared rate budget in Redis reachable") == Change::Recovered {
                    tracing::info!("rate budget: Redis reachable again; delivery resumes");
                }
            }
            Some(e) => {
                // RedisError's Display names the failure, not the URL or its password.
                let reason = format!("Redis (shared rate budget) unreachable: {e}");
                if self.health.down(false, reason) != Change::Same {
                    tracing::warn!(error = %e, "rate budget: Redis unreachable; no request is sent until it answers");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_never_exceeds_limit_in_a_window() {
        // Worst case for GCRA: `burst` at once, then one per interval. Count the requests inside
        // [0, window) and check they never exceed the limit.
        for (limit, burst) in [(60, 1), (60, 10), (60, 60), (20, 5), (1, 1)] {
            let window = Duration::from_secs(60);
            let (interval, b) = gcra(limit, window, burst);
            let mut times: Vec<Duration> = vec![Duration::ZERO; b as usize];
            let mut t = Duration::ZERO;
            while t < window * 3 {
                t += interval;
                times.push(t);
            }
            for start in &times {
                let n = times.iter().filter(|&&x| x >= *start && x < *start + window).count();
                assert!(n <= limit as usize, "limit {limit} burst {burst}: {n} in a window");
            }
            // And the sustained rate uses the whole limit when burst is 1.
            if burst == 1 {
                assert_eq!(interval, window / limit);
            }
        }
    }

    #[test]
    fn budget_id_hides_the_key() {
        let cfg = DeliveryConfig::default();
        let key = Secret("dp_live_very_secret".into());
        let id = budget_id(&cfg, &key);
        assert!(!id.contains("dp_live"), "{id}");
        assert!(id.starts_with(&cfg.redis_key_prefix));
        assert_eq!(id, budget_id(&cfg, &key), "stable across calls and replicas");
        assert_ne!(id, budget_id(&cfg, &Secret("other".into())));
        let named = DeliveryConfig {
            budget_name: Some("partner-a".into()),
            ..DeliveryConfig::default()
        };
        assert_eq!(budget_id(&named, &key), format!("{}partner-a", cfg.redis_key_prefix));
    }

    #[tokio::test]
    async fn local_budget_spaces_requests() {
        let cfg = DeliveryConfig {
            rate_limit: 10,
            rate_window: Duration::from_millis(500),
            ..DeliveryConfig::default()
        };
        let b = RateBudget::new(&cfg, &Telemetry::new()).unwrap();
        let cancel = CancellationToken::new();
        let start = Instant::now();
        for _ in 0..6 {
            b.acquire("x", &cancel).await.unwrap();
        }
        // 6 draws at 50 ms spacing: the first is free, 5 intervals follow.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(245), "{took:?}");
    }

    #[tokio::test]
    async fn a_reserved_draw_is_used_by_the_next_acquire_only() {
        let cfg = DeliveryConfig {
            rate_limit: 10,
            rate_window: Duration::from_millis(500),
            ..DeliveryConfig::default()
        };
        let b = RateBudget::new(&cfg, &Telemetry::new()).unwrap();
        let cancel = CancellationToken::new();
        b.reserve("x", &cancel).await.unwrap();
        b.reserve("x", &cancel).await.unwrap(); // already holds one: draws nothing more
        let start = Instant::now();
        b.acquire("x", &cancel).await.unwrap();
        assert!(
            start.elapsed() < Duration::from_millis(40),
            "the prepaid draw is used at once"
        );
        b.acquire("x", &cancel).await.unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(40),
            "the next draw waits for the budget"
        );
    }

    #[tokio::test]
    async fn static_share_divides_the_limit() {
        let cfg = DeliveryConfig {
            rate_mode: RateMode::StaticShare,
            replicas: Some(2),
            rate_limit: 20,
            rate_window: Duration::from_secs(1),
            ..DeliveryConfig::default()
        };
        let b = RateBudget::new(&cfg, &Telemetry::new()).unwrap();
        let cancel = CancellationToken::new();
        let start = Instant::now();
        for _ in 0..4 {
            b.acquire("x", &cancel).await.unwrap();
        }
        // 10 per second for this replica: 100 ms apart.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(295), "{took:?}");
    }

    #[tokio::test]
    async fn pause_holds_every_draw() {
        let b = RateBudget::new(&DeliveryConfig::default(), &Telemetry::new()).unwrap();
        let cancel = CancellationToken::new();
        b.pause("x", Duration::from_millis(300)).await;
        let start = Instant::now();
        b.acquire("x", &cancel).await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(290));
        // Cancelled while paused.
        b.pause("x", Duration::from_secs(60)).await;
        cancel.cancel();
        assert_eq!(b.acquire("x", &cancel).await, Err(Cancelled));
    }
}
