//! The Redis store, shared by every replica.
//!
//! Keys (all under `<prefix>:`, all with a time-to-live; nothing else of an event is written, and
//! never the API key):
//! - `done:<key>` = `1`: the key was delivered (TTL `dedupe.ttl`).
//! - `claim:<key>` = owner: a process has the key in flight (TTL the lease, renewed while held).
//! - `sent:<key>` = owner: the key may have reached the API; kept until it is delivered or given
//!   up (TTL `dedupe.ttl`). Found without its claim, the owner died with the key in flight: the key
//!   is *in doubt*. Set to `doubt` once the record carrying the doubt is dead-lettered.
//! - `result:<bet>` = `a` | `b`: the bet's result was delivered embedded (a) or standalone (b).
//! - `inflight:<a|b>:<bet>`: hash owner → lease deadline (ms): results of the bet in flight.
//!
//! Each operation on a batch is one Lua script call (one round trip), atomic on the server, so two
//! replicas cannot both claim an id. A `check` that meets an id claimed by another owner claims
//! nothing in that round (holding nothing while waiting rules out deadlocks between replicas) and
//! polls until the claim is resolved.

use super::{DeadLetterClaim, LetGo, Local, Lookup, Metrics, Probe, SetupError, StoreUnavailable};
use crate::dedupe::{DedupeConfig, InDoubt};
use crate::offsets::RecordId;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, Script};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Judges and, when nothing must wait, claims. KEYS: 6 a probe (done, claim, result, in-flight of
/// the other kind, in-flight of its own kind, sent). ARGV: owner, lease ms, `1` to resend
/// ids in doubt, then one spec a probe: `1` or `0` (has a key) followed by `a`, `b` or `-` (its
/// guard kind). Answers per probe: `free`, `done`, `conflict`, `wait`, `doubt <owner>` (claimed
/// like `free`, to be dead-lettered), `doubted` (its doubt is already dead-lettered).
const CHECK_LUA: &str = r"
local owner, lease, resend = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #ARGV - 3
local out, waiting = {}, false
for i = 1, n do
  local k, spec = (i - 1) * 6, ARGV[i + 3]
  local kind = string.sub(spec, 2, 2)
  local v = 'free'
  if string.sub(spec, 1, 1) == '1' then
    if redis.call('EXISTS', KEYS[k + 1]) == 1 then
      v = 'done'
    else
      local holder = redis.call('GET', KEYS[k + 2])
      if holder and holder ~= owner then
        v = 'wait'
        waiting = true
      elseif not holder then
        local sent = redis.call('GET', KEYS[k + 6])
        if sent == 'doubt' then
          v = 'doubted'
        elseif sent and sent ~= owner and not resend then
          v = 'doubt ' .. sent
        end
      end
    end
  end
  if v == 'free' and kind ~= '-' then
    local had = redis.call('GET', KEYS[k + 3])
    if had and had ~= kind then
      v = 'conflict'
    else
      local h = redis.call('HGETALL', KEYS[k + 4])
      for j = 1, #h, 2 do
        if h[j] ~= owner and tonumber(h[j + 1]) > now then v = 'conflict' end
      end
    end
  end
  out[i] = v
end
if not waiting then
  for i = 1, n do
    local free, doubt = out[i] == 'free', string.sub(out[i], 1, 6) == 'doubt '
    if free or doubt then
      local k, spec = (i - 1) * 6, ARGV[i + 3]
      if string.sub(spec, 1, 1) == '1' then
        redis.call('SET', KEYS[k + 2], owner, 'PX', lease)
      end
      if string.sub(spec, 2, 2) ~= '-' then
        redis.call('HSET', KEYS[k + 5], owner, now + lease)
        if redis.call('PTTL', KEYS[k + 5]) < lease then redis.call('PEXPIRE', KEYS[k + 5], lease) end
      end
    end
  end
end
return out
";

/// Records delivered events and drops their claims. KEYS: 5 a probe (done, claim, result, own
/// in-flight, sent). ARGV: owner, ttl ms, specs. Returns how many claims were held by another owner.
const DELIVERED_LUA: &str = r"
local owner, ttl = ARGV[1], tonumber(ARGV[2])
local lost = 0
for i = 1, #ARGV - 2 do
  local k, spec = (i - 1) * 5, ARGV[i + 2]
  if string.sub(spec, 1, 1) == '1' then
    redis.call('SET', KEYS[k + 1], '1', 'PX', ttl)
    local holder = redis.call('GET', KEYS[k + 2])
    if holder == owner then
      redis.call('DEL', KEYS[k + 2])
    elseif holder then
      lost = lost + 1
    end
    if redis.call('GET', KEYS[k + 5]) == owner then redis.call('DEL', KEYS[k + 5]) end
  end
  local kind = string.sub(spec, 2, 2)
  if kind ~= '-' then
    local had = redis.call('GET', KEYS[k + 3])
    if not had or had == kind then redis.call('SET', KEYS[k + 3], kind, 'PX', ttl) end
    redis.call('HDEL', KEYS[k + 4], owner)
  end
end
return lost
";

/// Drops this owner's claims on probes that were not delivered. KEYS: 3 a probe (claim, own
/// in-flight, sent). ARGV: owner, mode, ttl ms, specs. Mode `release`: not counted (the API's 400,
/// given up before a request could count), this owner's `sent` mark goes too. `abandon`: given up
/// while a request may have counted, the mark stays. `doubt`: the record carrying an id in doubt
/// was dead-lettered, later copies are duplicates of it (`sent` = `doubt` for the ttl).
const RELEASE_LUA: &str = r"
local owner, mode, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
for i = 1, #ARGV - 3 do
  local k, spec = (i - 1) * 3, ARGV[i + 3]
  if string.sub(spec, 1, 1) == '1' then
    if redis.call('GET', KEYS[k + 1]) == owner then redis.call('DEL', KEYS[k + 1]) end
    if mode == 'doubt' then
      redis.call('SET', KEYS[k + 3], 'doubt', 'PX', ttl)
    elseif mode == 'release' and redis.call('GET', KEYS[k + 3]) == owner then
      redis.call('DEL', KEYS[k + 3])
    end
  end
  if string.sub(spec, 2, 2) ~= '-' then redis.call('HDEL', KEYS[k + 2], owner) end
end
return 0
";

/// Extends this owner's leases. KEYS: (claim, done, sent) triples for ARGV[3] keys, then in-flight
/// hashes. ARGV: owner, lease ms, number of keys. A claim that vanished (expired during a Redis
/// outage, or Redis restarted empty) is taken again unless the key was delivered or declared in
/// doubt meanwhile. Returns how many claims were lost to another owner.
const RENEW_LUA: &str = r"
local owner, lease, nkeys = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lost = 0
for i = 1, nkeys do
  local claim, done, sent = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local holder = redis.call('GET', claim)
  if holder == owner then
    redis.call('PEXPIRE', claim, lease)
  elseif holder or redis.call('EXISTS', done) == 1 or redis.call('GET', sent) == 'doubt' then
    lost = lost + 1
  else
    redis.call('SET', claim, owner, 'PX', lease)
  end
end
for i = 3 * nkeys + 1, #KEYS do
  redis.call('HSET', KEYS[i], owner, now + lease)
  if redis.call('PTTL', KEYS[i]) < lease then redis.call('PEXPIRE', KEYS[i], lease) end
end
return lost
";

/// Sets (ARGV[2] = `set`) or drops (`clear`, only this owner's) the `sent:` marks in KEYS: the
/// ids may have reached the API, or surely have not. ARGV: owner, mode, ttl ms.
const SENT_LUA: &str = r"
local owner, mode, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
for i = 1, #KEYS do
  if mode == 'set' then
    redis.call('SET', KEYS[i], owner, 'PX', ttl)
  elseif redis.call('GET', KEYS[i]) == owner then
    redis.call('DEL', KEYS[i])
  end
end
return 0
";

/// Claims a record's dead letter. KEYS: `dead:<topic/partition/offset>`. ARGV: owner, lease ms, ttl ms. The value
/// is `1` once written, else `claim:<owner>:<since ms>` (kept for the ttl: a claim older than the
/// lease has lapsed, and must be looked for in the topic before it is written again). Answers
/// `done`, `mine` (claimed now), `wait`, or `lapsed <since ms of the lapsed claim>` (claimed now).
const CLAIM_DEAD_LUA: &str = r"
local owner, lease, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('GET', KEYS[1])
if v == '1' then return 'done' end
local answer = 'mine'
if v then
  local holder, since = string.match(v, '^claim:(.*):(%d+)$')
  if holder == owner then return 'mine' end
  if not holder or tonumber(since) + lease > now then return 'wait' end
  answer = 'lapsed ' .. since
end
redis.call('SET', KEYS[1], 'claim:' .. owner .. ':' .. now, 'PX', ttl)
return answer
";

/// Most probes in one script call of the renewer (a check is bounded by the batch size).
const RENEW_CHUNK: usize = 1000;

pub(super) struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    owner: String,
    lease: Duration,
    ttl: Duration,
    poll: Duration,
    /// `delivery.on_ambiguous = "resend"` (alias `dedupe.redis.in_doubt`): an id whose owner died
    /// in flight is sent again.
    resend: bool,
    check: Script,
    delivered: Script,
    release: Script,
    claim_dead: Script,
    sent: Script,
    renewer: JoinHandle<()>,
    metrics: Arc<Metrics>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // A dropped deduper stops renewing: its claims expire after the lease, as after a crash.
        self.renewer.abort();
    }
}

impl RedisStore {
    pub(super) fn new(
        cfg: &DedupeConfig,
        local: Weak<Mutex<Local>>,
        metrics: Arc<Metrics>,
    ) -> Result<RedisStore, SetupError> {
        let r = &cfg.redis;
        let info = r.url.as_str().into_connection_info().map_err(SetupError::RedisUrl)?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &r.username {
            settings = settings.set_username(user);
        }
        if let Some(pw) = &r.password {
            settings = settings.set_password(pw.expose());
        }
        let client = Client::open(info.set_redis_settings(settings)).map_err(SetupError::RedisUrl)?;
        let mgr_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(r.timeout))
            .set_response_timeout(Some(r.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, mgr_cfg).map_err(SetupError::Connection)?;
        let owner = format!(
            "{}:{}:{:016x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
            std::process::id(),
            rand::random::<u64>()
        );
        let renewer = tokio::spawn(renew_loop(
            conn.clone(),
            r.prefix.clone(),
            owner.clone(),
            r.lease,
            local,
            Arc::clone(&metrics),
        ));
        Ok(RedisStore {
            conn,
            prefix: r.prefix.clone(),
            owner,
            lease: r.lease,
            ttl: cfg.ttl,
            poll: r.poll_interval,
            resend: r.in_doubt == Some(InDoubt::Resend),
            check: Script::new(CHECK_LUA),
            delivered: Script::new(DELIVERED_LUA),
            release: Script::new(RELEASE_LUA),
            claim_dead: Script::new(CLAIM_DEAD_LUA),
            sent: Script::new(SENT_LUA),
            renewer,
            metrics,
        })
    }

    pub(super) async fn ping(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| format!("redis: {e}"))
    }

    /// Claims the writing of a record's dead letter, or reports it written. While another replica
    /// holds the claim (for the lease from when it took it), polls until it is written or the
    /// claim lapses; a lapsed claim (its owner died, perhaps after the broker took the dead letter)
    /// is taken over and reported with when it was taken, so that the caller looks in the topic.
    /// After twice the lease gives up (`Err`).
    pub(super) async fn claim_dead_letter(&self, id: &RecordId) -> Result<DeadLetterClaim, String> {
        let key = self.k("dead", &id.to_string());
        let deadline = Instant::now() + self.lease * 2;
        loop {
            let mut inv = self.claim_dead.prepare_invoke();
            inv.key(&key)
                .arg(&self.owner)
                .arg(self.lease.as_millis() as u64)
                .arg(self.ttl.as_millis() as u64);
            let mut conn = self.conn.clone();
            let answer: String = inv.invoke_async(&mut conn).await.map_err(|e| format!("redis: {e}"))?;
            match answer.as_str() {
                "done" => return Ok(DeadLetterClaim::Written),
                "mine" => return Ok(DeadLetterClaim::Mine),
                other => {
                    if let Some(since_ms) = other.strip_prefix("lapsed ").and_then(|s| s.parse().ok()) {
                        return Ok(DeadLetterClaim::Lapsed { since_ms });
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "another replica has held the dead letter of {id} for twice the lease"
                ));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Remembers that a record (`topic/partition/offset`) was dead-lettered, for the dedupe ttl
    /// (replacing the claim).
    pub(super) async fn mark_dead_lettered(&self, id: &RecordId) -> Result<(), String> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.k("dead", &id.to_string()))
            .arg(1)
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))
    }

    /// Looks up and claims every probe, waiting while another owner holds one of them; not
    /// `patient`: `Contended` at once instead (the script claims nothing while any key waits).
    pub(super) async fn claim(&self, probes: &[Probe<'_>], patient: bool) -> Result<Vec<Lookup>, StoreUnavailable> {
        let mut decided: Vec<Option<Lookup>> = vec![None; probes.len()];
        // A claim lasts at most the lease unless its owner renews it; twice the lease means the
        // other owner is alive and stuck (or has a longer lease): give the batch back to the caller.
        let deadline = Instant::now() + self.lease * 2;
        loop {
            let open: Vec<usize> = (0..probes.len()).filter(|&i| decided[i].is_none()).collect();
            let mut inv = self.check.prepare_invoke();
            inv.arg(&self.owner)
                .arg(self.lease.as_millis() as u64)
                .arg(if self.resend { "1" } else { "0" });
            for &i in &open {
                let p = probes[i];
                let key = p.key.unwrap_or("");
                let (bet, kind) = p.guard.map(|(b, k)| (b, k.letter())).unwrap_or(("", "-"));
                let other = p.guard.map(|(_, k)| k.other().letter()).unwrap_or("-");
                inv.key(self.k("done", key))
                    .key(self.k("claim", key))
                    .key(self.k("result", bet))
                    .key(self.k(&format!("inflight:{other}"), bet))
                    .key(self.k(&format!("inflight:{kind}"), bet))
                    .key(self.k("sent", key))
                    .arg(spec(p));
            }
            self.metrics.lookups.inc_by(open.len() as u64);
            let start = Instant::now();
            let mut conn = self.conn.clone();
            let res: Result<Vec<String>, _> = inv.invoke_async(&mut conn).await;
            self.metrics.observe("check", start);
            let answers = res.map_err(|e| {
                self.metrics.errors.with_label_values(&["check"]).inc();
                StoreUnavailable::Unreachable {
                    reason: format!("redis: {e}"),
                }
            })?;
            let waiting = answers.iter().any(|a| a == "wait");
            for (&i, a) in open.iter().zip(&answers) {
                decided[i] = match a.as_str() {
                    "done" => Some(Lookup::Done),
                    "doubted" => Some(Lookup::Doubted),
                    "conflict" => Some(Lookup::Conflict),
                    // Claimed only when nothing waited; otherwise looked at again next round.
                    "free" if !waiting => Some(Lookup::Free),
                    a if !waiting && a.starts_with("doubt ") => Some(Lookup::InDoubt),
                    _ => None,
                };
                if decided[i] == Some(Lookup::InDoubt) {
                    tracing::warn!(
                        key = probes[i].key.unwrap_or(""),
                        owner = &a["doubt ".len()..],
                        "dedupe: an id was in flight in a process that stopped without recording the API's answer: \
                         it may or may not have reached the API; its record is dead-lettered as in_doubt"
                    );
                }
            }
            if !waiting {
                return Ok(decided.into_iter().map(|d| d.unwrap_or(Lookup::Free)).collect());
            }
            if !patient {
                return Err(StoreUnavailable::Contended {
                    reason: "an id is claimed by another replica".into(),
                });
            }
            self.metrics.waits.inc();
            if Instant::now() >= deadline {
                return Err(StoreUnavailable::Contended {
                    reason: format!(
                        "an id of this batch stayed claimed by another replica for over {:?} (twice dedupe.redis.lease); \
                         is a replica stuck, or configured with a longer lease?",
                        self.lease * 2
                    ),
                });
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Records delivered probes and drops their claims, in one round trip.
    pub(super) async fn record(&self, probes: &[Probe<'_>]) -> Result<(), String> {
        if probes.is_empty() {
            return Ok(());
        }
        let mut inv = self.delivered.prepare_invoke();
        inv.arg(&self.owner).arg(self.ttl.as_millis() as u64);
        for p in probes {
            let key = p.key.unwrap_or("");
            let (bet, kind) = p.guard.map(|(b, k)| (b, k.letter())).unwrap_or(("", "-"));
            inv.key(self.k("done", key))
                .key(self.k("claim", key))
                .key(self.k("result", bet))
                .key(self.k(&format!("inflight:{kind}"), bet))
                .key(self.k("sent", key))
                .arg(spec(*p));
        }
        let start = Instant::now();
        let mut conn = self.conn.clone();
        let res: Result<u64, _> = inv.invoke_async(&mut conn).await;
        self.metrics.observe("delivered", start);
        let lost = res.map_err(|e| {
            self.metrics.errors.with_label_values(&["delivered"]).inc();
            format!("redis: {e}")
        })?;
        if lost > 0 {
            self.metrics.claims_lost.inc_by(lost);
            tracing::error!(
                claims = lost,
                "dedupe: delivered ids whose claim another replica had taken (this one held them past its lease): \
                 they may have been sent twice"
            );
        }
        Ok(())
    }

    /// Drops this owner's claims on probes that were not delivered, in one round trip (see
    /// [`LetGo`] for what becomes of their `sent:` marks).
    pub(super) async fn release(&self, probes: &[Probe<'_>], how: LetGo) -> Result<(), String> {
        if probes.is_empty() {
            return Ok(());
        }
        let mut inv = self.release.prepare_invoke();
        inv.arg(&self.owner).arg(how.mode()).arg(self.ttl.as_millis() as u64);
        for p in probes {
            let key = p.key.unwrap_or("");
            let (bet, kind) = p.guard.map(|(b, k)| (b, k.letter())).unwrap_or(("", "-"));
            inv.key(self.k("claim", key))
                .key(self.k(&format!("inflight:{kind}"), bet))
                .key(self.k("sent", key))
                .arg(spec(*p));
        }
        let start = Instant::now();
        let mut conn = self.conn.clone();
        let res: Result<u64, _> = inv.invoke_async(&mut conn).await;
        self.metrics.observe("release", start);
        res.map(|_| ()).map_err(|e| {
            self.metrics.errors.with_label_values(&["release"]).inc();
            format!("redis: {e}")
        })
    }

    /// Marks keys as possibly reached the API (`exposed`) or surely not, in one round trip.
    pub(super) async fn mark_sent(&self, keys: &[&str], exposed: bool) -> Result<(), String> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut inv = self.sent.prepare_invoke();
        inv.arg(&self.owner)
            .arg(if exposed { "set" } else { "clear" })
            .arg(self.ttl.as_millis() as u64);
        for k in keys {
            inv.key(self.k("sent", k));
        }
        let start = Instant::now();
        let mut conn = self.conn.clone();
        let res: Result<u64, _> = inv.invoke_async(&mut conn).await;
        self.metrics.observe("sent", start);
        res.map(|_| ()).map_err(|e| {
            self.metrics.errors.with_label_values(&["sent"]).inc();
            format!("redis: {e}")
        })
    }

    /// Lets an id in doubt be sent again (`dlq replay` of its dead letter, after the operator
    /// found it missing in DataPulse). Returns whether it was in doubt.
    pub(super) async fn forget_doubt(&self, key: &str) -> Result<bool, String> {
        let mut conn = self.conn.clone();
        let sent = self.k("sent", key);
        let was: Option<String> = redis::cmd("GET")
            .arg(&sent)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        if was.as_deref() != Some("doubt") {
            return Ok(false);
        }
        redis::cmd("DEL")
            .arg(&sent)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        Ok(true)
    }

    fn k(&self, kind: &str, id: &str) -> String {
        key(&self.prefix, kind, id)
    }
}

fn key(prefix: &str, kind: &str, id: &str) -> String {
    format!("{prefix}:{kind}:{id}")
}

/// A probe's spec argument: has a key (`1`/`0`), then its guard kind (`a`, `b`, `-`).
fn spec(p: Probe<'_>) -> String {
    let has_key = if p.key.is_some() { '1' } else { '0' };
    let kind = p.guard.map(|(_, k)| k.letter()).unwrap_or("-");
    format!("{has_key}{kind}")
}

/// Renews this process's claims every third of the lease while it holds any, so that a batch that
/// takes long to deliver (the API rate-limiting or failing) keeps its ids. Ends with the store.
async fn renew_loop(
    conn: ConnectionManager,
    prefix: String,
    owner: String,
    lease: Duration,
    local: Weak<Mutex<Local>>,
    metrics: Arc<Metrics>,
) {
    let script = Script::new(RENEW_LUA);
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(local) = local.upgrade() else { return };
        let prefix = prefix.as_str();
        let (keys, bets): (Vec<String>, Vec<String>) = {
            let l = local.lock();
            let bets = l
                .bets
                .iter()
                .flat_map(|(bet, counts)| {
                    [super::ResultPattern::Embedded, super::ResultPattern::Standalone]
                        .into_iter()
                        .filter(|k| counts[k.idx()] > 0)
                        .map(move |k| key(prefix, &format!("inflight:{}", k.letter()), bet))
                })
                .collect();
            let claimed = l.keys.iter().filter(|(_, &claimed)| claimed).map(|(k, _)| k.clone());
            (claimed.collect(), bets)
        };
        drop(local);
        for chunk in keys.chunks(RENEW_CHUNK) {
            let mut inv = script.prepare_invoke();
            inv.arg(&owner).arg(lease.as_millis() as u64).arg(chunk.len());
            for k in chunk {
                inv.key(key(prefix, "claim", k))
                    .key(key(prefix, "done", k))
                    .key(key(prefix, "sent", k));
            }
            renew(&mut inv, conn.clone(), &metrics).await;
        }
        for chunk in bets.chunks(RENEW_CHUNK) {
            let mut inv = script.prepare_invoke();
            inv.arg(&owner).arg(lease.as_millis() as u64).arg(0);
            for k in chunk {
                inv.key(k);
            }
            renew(&mut inv, conn.clone(), &metrics).await;
        }
    }
}

async fn renew(inv: &mut redis::ScriptInvocation<'_>, mut conn: ConnectionManager, metrics: &Metrics) {
    let start = Instant::now();
    let res: Result<u64, _> = inv.invoke_async(&mut conn).await;
    metrics.observe("renew", start);
    match res {
        Ok(0) => {}
        Ok(lost) => {
            metrics.claims_lost.inc_by(lost);
            tracing::error!(
                claims = lost,
                "dedupe: in-flight ids were claimed by another replica after this one's lease lapsed \
                 (Redis unreachable for longer than the lease?): they may be sent twice"
            );
        }
        Err(e) => {
            metrics.errors.with_label_values(&["renew"]).inc();
            tracing::warn!(error = %e, "dedupe: cannot renew in-flight claims");
        }
    }
}
