//! Deduplication by transaction id and the bet-result double-count guard.
//!
//! The protocol (invariant 3, `docs/dedupe.md`): each event's keys are taken once, when it is mapped
//! ([`Deduper::keys_of`]); before a batch is sent, [`Deduper::check`] judges
//! each event against the earlier events of the batch, against what this process has in flight, and
//! against the store (what was delivered, and with Redis what other replicas have in flight). The
//! events judged [`Verdict::Send`] are held as in flight until the pipeline reports them
//! [`Deduper::delivered`] (the API answered 2xx; only then is a key recorded) or
//! [`Deduper::release`]d (not delivered). Two stores: `memory` (this process) and `redis` (every
//! replica; in-flight ids are claimed there with a lease).

mod config;
mod memory;
mod redis_store;

pub use config::{DedupeConfig, InDoubt, OnStoreUnavailable, RedisConfig, StoreKind};

use crate::event::Event;
use crate::offsets::RecordId;
use crate::telemetry::{Change, Family, Health, Ready, Telemetry};
use memory::MemoryStore;
use prometheus::Registry;
use prometheus::{HistogramVec, IntCounter, IntCounterVec};
use redis_store::RedisStore;
use std::borrow::Cow;
// hashbrown's default hasher (not SipHash): the in-flight holds are touched for every event.
use hashbrown::{HashMap, HashSet};
use parking_lot::{Mutex, MutexGuard};
use std::sync::Arc;
use std::time::Instant;

/// The verdict on one event before it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Send,
    /// Already delivered or already on its way: a finished outcome, never sent. The reason is a
    /// bounded label (`in_batch`, `store`).
    Duplicate { reason: &'static str },
    /// Sending it would make the API count a bet result twice (contract decision 5): the result
    /// of `bet` already reached the API the other way than `this`. Dead-letter it with reason
    /// `double_count` and [`Verdict::reason`].
    DoubleCount { bet: String, this: ResultPattern },
    /// (Redis) Its dedupe key `key` was in flight in a process that died before recording the
    /// API's answer: it may or may not have been counted. Held like `Send`; dead-letter it with
    /// reason `in_doubt` and [`Verdict::reason`], then [`Deduper::doubt_dead_lettered`] (or
    /// [`Deduper::release`] if that write did not happen).
    InDoubt { key: String },
}

impl Verdict {
    /// The sentence a dead letter carries for `DoubleCount` and `InDoubt` (values truncated);
    /// `None` for the others.
    pub fn reason(&self) -> Option<String> {
        match self {
            Verdict::DoubleCount { bet, this } => {
                let bet = crate::event::truncate(bet);
                Some(match this {
                    ResultPattern::Standalone => format!("double count: bet {bet} already carried its result"),
                    ResultPattern::Embedded => format!("double count: bet {bet} already had a standalone win/loss"),
                })
            }
            Verdict::InDoubt { key } => Some(format!(
                "in doubt: {} was in flight in a bridge process that stopped before recording the API's \
                 answer, so it may or may not have been counted; look it up in DataPulse and replay this \
                 dead letter only if it is missing",
                crate::event::truncate(key)
            )),
            Verdict::Send | Verdict::Duplicate { .. } => None,
        }
    }
}

/// The answer of [`Deduper::claim_dead_letter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterClaim {
    /// Dead-lettered already.
    Written,
    /// Claimed by this call: write it.
    Mine,
    /// Claimed by this call from an owner that died while it held the claim, taken at `since_ms`
    /// (Unix ms): the dead letter may be in the topic already.
    Lapsed { since_ms: i64 },
}

/// How held events are let go, as the Redis release script's mode says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LetGo {
    /// Not delivered and surely not counted: claims and `sent:` marks go.
    Release,
    /// May have been counted (a request was out at shutdown's deadline): claims go, marks stay.
    Abandon,
    /// In doubt and dead-lettered: claims go, the marks become `doubt`.
    Doubt,
}

impl LetGo {
    fn mode(self) -> &'static str {
        match self {
            LetGo::Release => "release",
            LetGo::Abandon => "abandon",
            LetGo::Doubt => "doubt",
        }
    }
}

/// The dedupe store could not answer; under the `pause` policy the caller waits and retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreUnavailable {
    /// The store cannot be reached (the `on_store_unavailable` policy applies).
    #[error("dedupe store unavailable: {reason}")]
    Unreachable { reason: String },
    /// Another replica kept an id in flight for longer than twice the lease (a stuck or
    /// misconfigured replica): never sent without dedupe, whatever the policy.
    #[error("dedupe store unavailable: {reason}")]
    Contended { reason: String },
}

impl StoreUnavailable {
    /// What the store's client said, e.g. `redis: Connection refused`.
    pub fn reason(&self) -> &str {
        match self {
            StoreUnavailable::Unreachable { reason } | StoreUnavailable::Contended { reason } => reason,
        }
    }
}

/// How often a check waiting for another batch's in-flight key looks again.
const LOCAL_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

/// The two ways a bet's result reaches the API (contract decision 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultPattern {
    /// Pattern A: a bet carrying `bet_result`.
    Embedded,
    /// Pattern B: a standalone win or loss naming the bet in `parent_transaction_id`.
    Standalone,
}

impl ResultPattern {
    fn idx(self) -> usize {
        match self {
            ResultPattern::Embedded => 0,
            ResultPattern::Standalone => 1,
        }
    }
    fn other(self) -> ResultPattern {
        match self {
            ResultPattern::Embedded => ResultPattern::Standalone,
            ResultPattern::Standalone => ResultPattern::Embedded,
        }
    }
    /// One letter, as stored in Redis.
    fn letter(self) -> &'static str {
        match self {
            ResultPattern::Embedded => "a",
            ResultPattern::Standalone => "b",
        }
    }
}

/// What the stores are asked about one event: its dedupe key and the bet whose result it carries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Probe<'a> {
    key: Option<&'a str>,
    guard: Option<(&'a str, ResultPattern)>,
}

/// A store's answer for one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Not delivered, nothing conflicting (with Redis: now claimed by this process).
    Free,
    /// The key was delivered.
    Done,
    /// The bet's result was delivered (or, with Redis, is in flight elsewhere) in the other pattern.
    Conflict,
    /// (Redis) The key's owner died in flight; now claimed by this process, to be dead-lettered.
    InDoubt,
    /// The key was in doubt and a record carrying it is dead-lettered already.
    Doubted,
}

/// The dedupe keys of one event, taken once when it is mapped ([`Deduper::keys_of`]) and kept with
/// it until it has an outcome (the event itself is not kept: it borrows from its record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventKeys {
    key: Option<String>,
    guard: Option<(String, ResultPattern)>,
}

impl EventKeys {
    fn is_empty(&self) -> bool {
        self.key.is_none() && self.guard.is_none()
    }

    /// The dedupe key, if the event has one.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    fn probe(&self) -> Probe<'_> {
        Probe {
            key: self.key.as_deref(),
            guard: self.guard.as_ref().map(|(b, k)| (b.as_str(), *k)),
        }
    }
}

/// The keys and bets a caller holds already (its batch so far), for [`Deduper::check_now`].
#[derive(Default)]
struct Earlier<'a> {
    keys: HashSet<&'a str>,
    bets: HashMap<&'a str, [u32; 2]>,
}

impl<'a> Earlier<'a> {
    fn of(held: &[&'a EventKeys]) -> Earlier<'a> {
        let mut e = Earlier::default();
        for k in held {
            if let Some(key) = k.key.as_deref() {
                e.keys.insert(key);
            }
            if let Some((bet, kind)) = &k.guard {
                e.bets.entry(bet.as_str()).or_default()[kind.idx()] += 1;
            }
        }
        e
    }
}

/// What this process holds in flight: checked `Send`, neither delivered nor released yet.
#[derive(Default)]
pub(crate) struct Local {
    /// Held key → whether the store has it claimed for this process (Redis; renewed only then: a
    /// key whose check still waits for another replica is not this process's to renew).
    keys: HashMap<String, bool>,
    /// Bet id → number of in-flight results per [`ResultPattern`].
    bets: HashMap<String, [u32; 2]>,
    /// Records whose dead letter a task of this process is writing.
    dead: HashSet<RecordId>,
}

impl Local {
    /// Whether `k`'s key, or the other result of its bet, is held (by another batch: a batch
    /// holds nothing before its check passes this test).
    /// Whether `k` meets a key or a bet held in flight other than by `earlier` (the caller's own
    /// batch, whose holds count as earlier events of the same batch).
    fn conflicts_beyond(&self, k: &EventKeys, earlier: &Earlier<'_>) -> bool {
        k.key
            .as_deref()
            .is_some_and(|key| self.keys.contains_key(key) && !earlier.keys.contains(key))
            || k.guard.as_ref().is_some_and(|(bet, kind)| {
                let other = kind.other().idx();
                let held = self.bets.get(bet).map_or(0, |c| c[other]);
                let mine = earlier.bets.get(bet.as_str()).map_or(0, |c| c[other]);
                held > mine
            })
    }

    fn hold(&mut self, k: &EventKeys) {
        if let Some(key) = &k.key {
            self.keys.insert(key.clone(), false);
        }
        if let Some((bet, kind)) = &k.guard {
            self.bets.entry(bet.clone()).or_default()[kind.idx()] += 1;
        }
    }

    fn unhold(&mut self, k: &EventKeys) {
        if let Some(key) = &k.key {
            self.keys.remove(key);
        }
        if let Some((bet, kind)) = &k.guard {
            if let Some(counts) = self.bets.get_mut(bet) {
                counts[kind.idx()] = counts[kind.idx()].saturating_sub(1);
                if counts == &[0, 0] {
                    self.bets.remove(bet);
                }
            }
        }
    }
}

/// Releases the holds `check` took for `pending` when dropped; forgotten once the verdicts stand.
struct HoldGuard<'a> {
    deduper: &'a Deduper,
    keys: &'a [&'a EventKeys],
    pending: &'a [usize],
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        let mut local = self.deduper.lock();
        for &i in self.pending {
            local.unhold(self.keys[i]);
        }
    }
}

enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

/// Deduplication and the double-count guard for one process. `Send + Sync`; share it by reference.
pub struct Deduper {
    key: Vec<String>,
    keys_by_event: HashMap<String, Vec<String>>,
    guard: bool,
    policy: OnStoreUnavailable,
    store: Store,
    local: Arc<Mutex<Local>>,
    /// Whether the store answers: readiness `dedupe_store`.
    store_health: Health,
    metrics: Arc<Metrics>,
}

/// Why a [`Deduper`] cannot be built. The URL itself is never repeated: it may hold a password.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Only the kind of problem is said: the client's message may hold the URL and its password.
    #[error("dedupe.redis.url is not a usable Redis URL ({:?})", .0.kind())]
    RedisUrl(#[source] redis::RedisError),
    #[error("cannot set up the Redis connection: {0}")]
    Connection(#[source] redis::RedisError),
}

impl Deduper {
    /// Builds the deduper. With Redis the connection is made lazily: an unreachable Redis at start
    /// is reported through readiness (and the policy), not as a start-up failure.
    /// Its metrics and the `dedupe_store` readiness condition go to `telemetry`.
    ///
    /// Errors: `dedupe.redis.url` unusable (not a URL, or a client cannot be set up for it).
    pub async fn new(cfg: &DedupeConfig, telemetry: &Telemetry) -> Result<Deduper, SetupError> {
        let local = Arc::new(Mutex::new(Local::default()));
        let metrics = telemetry.metrics::<Metrics>();
        let store = match cfg.store {
            StoreKind::Memory => Store::Memory(MemoryStore::new(cfg.max_entries, cfg.ttl)),
            StoreKind::Redis => Store::Redis(RedisStore::new(cfg, Arc::downgrade(&local), Arc::clone(&metrics))?),
        };
        let d = Deduper {
            key: cfg.key.clone(),
            keys_by_event: cfg.keys_by_event.clone().into_iter().collect(),
            guard: cfg.bet_result_guard,
            policy: cfg.on_store_unavailable,
            store,
            local,
            store_health: Health::new(telemetry, Ready::DedupeStore),
            metrics,
        };
        match &d.store {
            Store::Memory(_) => d.note_store(Ok(())),
            Store::Redis(r) => {
                let ping = r.ping().await;
                d.note_store(ping.as_ref().map(|_| ()).map_err(Clone::clone));
                if let Err(e) = ping {
                    tracing::warn!(error = %e, "dedupe: redis is not reachable at start; will keep trying");
                }
            }
        }
        Ok(d)
    }

    /// Judges each event of a batch about to be sent (in order: an earlier event of the same
    /// batch counts as in flight for a later one). Events judged `Send` are held as in flight
    /// until [`Deduper::delivered`] or [`Deduper::release`].
    ///
    /// An id another batch of this process has in flight (another delivery lane), or with Redis
    /// another replica, makes this call wait (polling; with Redis at most about the lease) until
    /// it is delivered (→ `Duplicate "store"`) or given up (→ `Send`): a copy is never dropped as
    /// the duplicate of something that may still fail.
    pub async fn check(&self, keys: &[&EventKeys]) -> Result<Vec<Verdict>, StoreUnavailable> {
        let mut verdicts: Vec<Option<Verdict>> = vec![None; keys.len()];
        let mut pending = Vec::new();
        // Another batch of this process (another delivery lane) may have one of these keys, or the
        // other result of one of these bets, in flight. Its outcome decides: wait until it is
        // delivered (then the store answers) or given up (then this one is sent). Nothing of this
        // batch is held while it waits, so two batches never wait on each other.
        while !self.take_holds(&Earlier::default(), keys, &mut verdicts, &mut pending) {
            self.metrics.waits.inc();
            tokio::time::sleep(LOCAL_WAIT).await;
        }
        self.look_up(keys, verdicts, pending, true).await
    }

    /// [`Deduper::check`] for events that join a batch already judged, `earlier` (topping up a
    /// request whose duplicates left room): they are judged as later events of that batch (a
    /// key of `earlier` again is `Duplicate "in_batch"`, the other result of one of its bets a
    /// double count). `None`, holding nothing, when one of them is held in flight elsewhere in
    /// this process, where `check` would wait; the caller keeps them for its next batch.
    pub async fn check_now(
        &self,
        earlier: &[&EventKeys],
        keys: &[&EventKeys],
    ) -> Option<Result<Vec<Verdict>, StoreUnavailable>> {
        let mut verdicts: Vec<Option<Verdict>> = vec![None; keys.len()];
        let mut pending = Vec::new();
        if !self.take_holds(&Earlier::of(earlier), keys, &mut verdicts, &mut pending) {
            return None;
        }
        match self.look_up(keys, verdicts, pending, false).await {
            // Held by another replica: as if held here.
            Err(StoreUnavailable::Contended { .. }) => None,
            other => Some(other),
        }
    }

    /// The store's verdicts for the events of `pending` (held by [`Deduper::take_holds`]);
    /// `verdicts` holds those already given.
    async fn look_up(
        &self,
        keys: &[&EventKeys],
        mut verdicts: Vec<Option<Verdict>>,
        mut pending: Vec<usize>,
        patient: bool,
    ) -> Result<Vec<Verdict>, StoreUnavailable> {
        // An event with neither a key nor a guarded bet has nothing to look up.
        pending.retain(|&i| {
            let lookup = !keys[i].is_empty();
            if !lookup {
                verdicts[i] = Some(Verdict::Send);
            }
            lookup
        });
        // Should this call be cancelled while the store is asked (its future dropped), the holds
        // must not outlive it: a leaked hold would finish every later copy of the id as a
        // duplicate of something never sent.
        let held = HoldGuard {
            deduper: self,
            keys,
            pending: &pending,
        };
        let probes: Vec<Probe<'_>> = pending.iter().map(|&i| keys[i].probe()).collect();
        let lookups = match self.store_check(&probes, patient).await {
            Ok(lookups) => lookups,
            Err(StoreUnavailable::Unreachable { reason: e }) if self.policy == OnStoreUnavailable::Deliver => {
                self.metrics
                    .unguarded
                    .with_label_values(&["check"])
                    .inc_by(probes.len() as u64);
                tracing::warn!(
                    error = %e,
                    events = probes.len(),
                    "dedupe store unreachable: sending without store lookup (on_store_unavailable = \"deliver\"); \
                     ids delivered by other replicas or before a restart may repeat"
                );
                vec![Lookup::Free; probes.len()]
            }
            Err(e) => {
                drop(held); // releases the holds
                return Err(e);
            }
        };
        std::mem::forget(held);
        {
            // Only the Redis renewer reads the claimed flag: the memory store skips a lookup per event.
            let renewed = matches!(self.store, Store::Redis(_));
            let mut local = self.lock();
            for (&i, lookup) in pending.iter().zip(lookups) {
                if renewed && matches!(lookup, Lookup::Free | Lookup::InDoubt) {
                    if let Some(claimed) = keys[i].key.as_ref().and_then(|k| local.keys.get_mut(k)) {
                        *claimed = true;
                    }
                }
                verdicts[i] = Some(match lookup {
                    Lookup::Free => Verdict::Send,
                    Lookup::Done => {
                        local.unhold(keys[i]);
                        Verdict::Duplicate { reason: "store" }
                    }
                    Lookup::Conflict => {
                        local.unhold(keys[i]);
                        let (bet, kind) = keys[i].guard.as_ref().expect("a conflict comes from a guard probe");
                        double_count(bet, *kind)
                    }
                    Lookup::InDoubt => Verdict::InDoubt {
                        key: keys[i].key.as_deref().unwrap_or("").to_string(),
                    },
                    Lookup::Doubted => {
                        local.unhold(keys[i]);
                        Verdict::Duplicate { reason: "in_doubt" }
                    }
                });
            }
        }
        let verdicts: Vec<Verdict> = verdicts.into_iter().map(|v| v.expect("every event judged")).collect();
        for v in &verdicts {
            match v {
                Verdict::Send => {}
                Verdict::Duplicate { reason } => self.metrics.duplicates.with_label_values(&[reason]).inc(),
                Verdict::DoubleCount { .. } => self.metrics.double_counts.inc(),
                Verdict::InDoubt { .. } => self.metrics.in_doubt.inc(),
            }
        }
        Ok(verdicts)
    }

    /// Judges the batch against itself and holds the keys of what it sends; unless a key conflicts
    /// with another batch's holds: then it holds nothing and returns false.
    fn take_holds(
        &self,
        earlier: &Earlier<'_>,
        keys: &[&EventKeys],
        verdicts: &mut [Option<Verdict>],
        pending: &mut Vec<usize>,
    ) -> bool {
        let mut local = self.lock();
        if keys.iter().any(|k| local.conflicts_beyond(k, earlier)) {
            return false;
        }
        let mut in_batch: HashSet<&str> = HashSet::with_capacity(keys.len() + earlier.keys.len());
        in_batch.extend(earlier.keys.iter().copied());
        for (i, k) in keys.iter().enumerate() {
            if let Some(key) = k.key.as_deref() {
                if in_batch.contains(key) {
                    verdicts[i] = Some(Verdict::Duplicate { reason: "in_batch" });
                    continue;
                }
            }
            if let Some((bet, kind)) = &k.guard {
                if local.bets.get(bet).is_some_and(|c| c[kind.other().idx()] > 0) {
                    verdicts[i] = Some(double_count(bet, *kind));
                    continue;
                }
            }
            // Held now, before the store is asked, so that a concurrent call sees it.
            local.hold(k);
            if let Some(key) = k.key.as_deref() {
                in_batch.insert(key);
            }
            pending.push(i);
        }
        true
    }

    /// Claims the writing of the dead letter of the record `id`,
    /// which may be read again after a crash or a rebalance, even by two owners at once.
    /// `Written`: it was dead-lettered already; finish it without writing. `Mine`: this call holds
    /// the claim; write it, then [`Deduper::dead_lettered`] (or [`Deduper::release_dead_letter`] if
    /// the write did not happen). `Lapsed`: (Redis) this call holds a claim whose previous owner
    /// died, perhaps after the broker took its write: look for it in the topic first. Waits while
    /// another task of this process, or (Redis) another replica, holds the claim. When the store
    /// cannot say, `Mine`: the dead letter is then written again rather than lost.
    pub async fn claim_dead_letter(&self, id: &RecordId) -> DeadLetterClaim {
        while !self.lock().dead.insert(id.clone()) {
            tokio::time::sleep(LOCAL_WAIT).await;
        }
        let claim = match &self.store {
            Store::Memory(m) if m.dead_lettered(id) => DeadLetterClaim::Written,
            Store::Memory(_) => DeadLetterClaim::Mine,
            Store::Redis(r) => r.claim_dead_letter(id).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, record = id.to_string().as_str(), "dedupe store cannot claim the dead letter: it may be written twice");
                DeadLetterClaim::Mine
            }),
        };
        if claim == DeadLetterClaim::Written {
            self.lock().dead.remove(id);
        }
        claim
    }

    /// Gives up a claim from [`Deduper::claim_dead_letter`] whose write did not happen (shutdown's
    /// deadline). With Redis the claim lapses after the lease.
    pub fn release_dead_letter(&self, id: &RecordId) {
        self.lock().dead.remove(id);
    }

    /// Remembers that the record `id` was dead-lettered (after the broker acknowledged it),
    /// ending the claim.
    pub async fn dead_lettered(&self, id: &RecordId) {
        match &self.store {
            Store::Memory(m) => m.mark_dead_lettered(id),
            Store::Redis(r) => {
                if let Err(e) = r.mark_dead_lettered(id).await {
                    tracing::warn!(error = %e, record = id.to_string().as_str(), "cannot remember a dead letter: a re-read may write it twice");
                }
            }
        }
        self.lock().dead.remove(id);
    }

    /// Records events the API accepted (2xx), among those `check` judged `Send`. Must succeed
    /// before their offsets are committed.
    pub async fn delivered(&self, keys: &[&EventKeys]) -> Result<(), StoreUnavailable> {
        let probes: Vec<Probe<'_>> = keys.iter().filter(|k| !k.is_empty()).map(|k| k.probe()).collect();
        let recorded = match &self.store {
            Store::Memory(m) => {
                let start = Instant::now();
                m.record(&probes);
                self.metrics.observe("delivered", start);
                Ok(())
            }
            Store::Redis(r) => {
                let res = r.record(&probes).await;
                self.note_store(res.clone());
                res
            }
        };
        if let Err(e) = recorded {
            if self.policy == OnStoreUnavailable::Pause {
                // Still in flight: the pipeline retries before it commits.
                return Err(StoreUnavailable::Unreachable { reason: e });
            }
            self.metrics
                .unguarded
                .with_label_values(&["delivered"])
                .inc_by(probes.len() as u64);
            tracing::warn!(
                error = %e,
                events = probes.len(),
                "dedupe store unreachable: delivered ids not recorded (on_store_unavailable = \"deliver\"); \
                 they may be sent again if read again"
            );
        }
        let mut local = self.lock();
        for k in keys {
            local.unhold(k);
        }
        Ok(())
    }

    /// Releases in-flight holds of events judged `Send` (or `InDoubt`) that were not delivered
    /// (dead-lettered after the API's 400, or abandoned).
    /// With Redis the claims are deleted; if that fails they expire after the lease.
    pub async fn release(&self, keys: &[&EventKeys]) {
        self.let_go(keys, LetGo::Release).await
    }

    /// Ends the hold of an event judged `InDoubt` once its dead letter is written: later copies of
    /// its key are `Duplicate "in_doubt"` (for the ttl), until `dlq replay` lets it go
    /// ([`Deduper::forget_doubt`]). If the store cannot record it, a later copy is judged in doubt
    /// again (and dead-lettered too): never sent.
    pub async fn doubt_dead_lettered(&self, keys: &[&EventKeys]) {
        self.let_go(keys, LetGo::Doubt).await
    }

    /// Lets held events go as `how` says (see [`LetGo`]).
    pub async fn let_go(&self, keys: &[&EventKeys], how: LetGo) {
        {
            let mut local = self.lock();
            for k in keys {
                local.unhold(k);
            }
        }
        match &self.store {
            Store::Redis(r) => {
                let probes: Vec<Probe<'_>> = keys.iter().filter(|k| !k.is_empty()).map(|k| k.probe()).collect();
                if let Err(e) = r.release(&probes, how).await {
                    tracing::warn!(error = %e, events = probes.len(), "dedupe: cannot release claims; they expire after the lease");
                }
            }
            Store::Memory(m) if how == LetGo::Doubt => {
                let ids: Vec<&str> = keys.iter().filter_map(|k| k.key.as_deref()).collect();
                m.doubt(&ids);
            }
            Store::Memory(_) => {}
        }
    }

    /// Marks the keys of events judged `Send` as possibly reached the API (`exposed`: a request
    /// holding them is about to leave) or surely not (`false`: every request so far was refused
    /// before the API counted anything). With Redis, a key exposed when its process dies is in doubt
    /// for the next owner; the memory store has nothing to mark. Under `pause` an unreachable store
    /// is an error (the request must not leave unmarked); under `deliver` it is counted and passed.
    pub async fn mark_sent(&self, keys: &[&EventKeys], exposed: bool) -> Result<(), StoreUnavailable> {
        let Store::Redis(r) = &self.store else {
            return Ok(());
        };
        let ids: Vec<&str> = keys.iter().filter_map(|k| k.key.as_deref()).collect();
        match r.mark_sent(&ids, exposed).await {
            Ok(()) => Ok(()),
            Err(e) if self.policy == OnStoreUnavailable::Pause && exposed => {
                Err(StoreUnavailable::Unreachable { reason: e })
            }
            Err(e) => {
                tracing::warn!(error = %e, events = ids.len(), exposed, "dedupe store unreachable: ids not marked as sent; a crash now may send them twice or leave them in doubt");
                Ok(())
            }
        }
    }

    /// Lets a key in doubt be sent again: `dlq replay` of its `in_doubt` dead letter (the operator
    /// found the event missing in DataPulse). Returns whether it was in doubt. The memory store
    /// lives in the bridge process: there the consumer calls this for a record carrying the
    /// `dp.replayed_from` header of a replay ([`Deduper::replayed`]).
    pub async fn forget_doubt(&self, key: &str) -> Result<bool, StoreUnavailable> {
        match &self.store {
            Store::Memory(m) => Ok(m.forget_doubt(key)),
            Store::Redis(r) => r
                .forget_doubt(key)
                .await
                .map_err(|reason| StoreUnavailable::Unreachable { reason }),
        }
    }

    /// A record replayed from the dead-letter topic (`dp.replayed_from`) was read: with the memory
    /// store its key is no longer in doubt (with Redis, `dlq replay` let it go already).
    pub fn replayed(&self, keys: &EventKeys) {
        if let (Store::Memory(m), Some(key)) = (&self.store, keys.key.as_deref()) {
            if m.forget_doubt(key) {
                tracing::info!(key, "a replayed record's id is no longer in doubt: it will be sent");
            }
        }
    }

    /// The dedupe key and the guarded bet of an event mapped from the record `id`.
    ///
    /// The key is the event's configured key (`dedupe.key`, or `dedupe.keys_by_event` for its
    /// event name: by default its `transaction_id`); an event without one (a registration, a
    /// login) is keyed by its record's coordinates instead, `topic/partition/offset`, which a
    /// re-read record shares (after a crash, a restart or a rebalance): so it too is sent once.
    pub fn keys_of(&self, e: &Event<'_>, id: &RecordId) -> EventKeys {
        let by_event = if self.keys_by_event.is_empty() {
            None
        } else {
            self.keys_by_event.get(e.event_name.as_ref())
        };
        let key = match by_event {
            Some(fields) => {
                let mut parts = vec![Cow::Borrowed(e.event_name.as_ref())];
                collect_fields(e, fields, &mut parts).then(|| encode_key(&parts))
            }
            None => {
                let mut parts = Vec::with_capacity(self.key.len());
                collect_fields(e, &self.key, &mut parts).then(|| encode_key(&parts))
            }
        };
        let key = key.or_else(|| Some(record_key(id)));
        let guard = if !self.guard {
            None
        } else if e.carries_bet_result() {
            nonempty(&e.transaction_id).map(|t| (t.to_string(), ResultPattern::Embedded))
        } else if e.is_standalone_settlement() {
            nonempty(&e.parent_transaction_id).map(|t| (t.to_string(), ResultPattern::Standalone))
        } else {
            None
        };
        EventKeys { key, guard }
    }

    /// `patient`: wait while another replica holds one of the keys (else answer `Contended` at
    /// once, holding nothing).
    async fn store_check(&self, probes: &[Probe<'_>], patient: bool) -> Result<Vec<Lookup>, StoreUnavailable> {
        if probes.is_empty() {
            return Ok(Vec::new());
        }
        match &self.store {
            Store::Memory(m) => {
                let start = Instant::now();
                self.metrics.lookups.inc_by(probes.len() as u64);
                let res = m.lookup(probes);
                self.metrics.observe("check", start);
                Ok(res)
            }
            Store::Redis(r) => {
                let res = r.claim(probes, patient).await;
                match &res {
                    Ok(_) => self.note_store(Ok(())),
                    Err(StoreUnavailable::Unreachable { reason }) => self.note_store(Err(reason.clone())),
                    Err(StoreUnavailable::Contended { .. }) => {}
                }
                res
            }
        }
    }

    /// Keeps the readiness condition in step with the store's health; logs each change once.
    fn note_store(&self, res: Result<(), String>) {
        match res {
            Ok(()) => {
                let reason = match &self.store {
                    Store::Memory(_) => "memory store",
                    Store::Redis(_) => "redis store reachable",
                };
                if self.store_health.up(reason) == Change::Recovered {
                    tracing::info!("dedupe: redis reachable again");
                }
            }
            Err(e) => {
                let (ready, reason) = match self.policy {
                    OnStoreUnavailable::Pause => (
                        false,
                        format!("redis unreachable, delivery paused (on_store_unavailable = \"pause\"): {e}"),
                    ),
                    OnStoreUnavailable::Deliver => (
                        true,
                        format!(
                            "redis unreachable, delivering WITHOUT dedupe (on_store_unavailable = \"deliver\"): {e}"
                        ),
                    ),
                };
                if self.store_health.down(ready, reason) != Change::Same {
                    tracing::warn!(error = %e, policy = ?self.policy, "dedupe: redis unreachable");
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        self.local.lock()
    }
}

fn double_count(bet: &str, this: ResultPattern) -> Verdict {
    Verdict::DoubleCount {
        bet: bet.to_string(),
        this,
    }
}

fn nonempty<'a>(s: &'a Option<Cow<'_, str>>) -> Option<&'a str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// Appends the values of `fields` to `parts`; false when one is missing or empty (then the event has
/// no dedupe key).
fn collect_fields<'a>(e: &'a Event<'_>, fields: &[String], parts: &mut Vec<Cow<'a, str>>) -> bool {
    for f in fields {
        match field_value(e, f) {
            Some(v) if !v.is_empty() => parts.push(v),
            _ => return false,
        }
    }
    true
}

/// The value of an API field (`Event::text`: an amount as its decimal text as sent, `50.00`) or a
/// custom property, as text.
fn field_value<'a>(e: &'a Event<'_>, field: &str) -> Option<Cow<'a, str>> {
    match crate::event::Field::from_name(field) {
        Some(api) => e.text(api),
        None => e
            .properties
            .iter()
            .find(|(k, _)| k == field)
            .map(|(_, v)| Cow::Borrowed(v.as_ref())),
    }
}

/// Longest single value kept as the key verbatim (readable in Redis); longer ones are hashed.
const MAX_RAW_KEY: usize = 128;

/// The stored form of a key: a single short value as it is (a plain transaction id stays readable),
/// anything else as a SHA-256 of its length-prefixed parts (unambiguous, bounded in size).
/// The key of an event without one of its own: its record's coordinates, hashed under a domain
/// of its own (a field key is its value alone, or the SHA-256 of values led by an event name;
/// only a `dedupe.keys_by_event` entry named `\0record` could meet this one).
fn record_key(id: &RecordId) -> String {
    let (partition, offset) = (id.partition.to_string(), id.offset.to_string());
    encode_key(&[
        Cow::Borrowed("\0record"),
        Cow::Borrowed(&*id.topic),
        Cow::Owned(partition),
        Cow::Owned(offset),
    ])
}

fn encode_key(parts: &[Cow<'_, str>]) -> String {
    if let [one] = parts {
        if one.len() <= MAX_RAW_KEY && !one.starts_with("sha256:") {
            return one.to_string();
        }
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p.as_bytes());
    }
    let digest = ctx.finish();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

pub(crate) struct Metrics {
    duplicates: IntCounterVec,
    double_counts: IntCounter,
    lookups: IntCounter,
    latency: HistogramVec,
    errors: IntCounterVec,
    unguarded: IntCounterVec,
    waits: IntCounter,
    claims_lost: IntCounter,
    in_doubt: IntCounter,
}

impl Family for Metrics {
    fn register(r: &Registry) -> prometheus::Result<Metrics> {
        Ok(Metrics {
    duplicates: prometheus::register_int_counter_vec_with_registry!(
        "datapulse_bridge_dedupe_duplicates_total",
        "Events dropped as duplicates, by reason (in_batch, store).",
        &["reason"],
        r
    )?,
    double_counts: prometheus::register_int_counter_with_registry!(
        "datapulse_bridge_dedupe_double_counts_total",
        "Events dead-lettered because their bet's result was already reported in the other pattern.",
        r
    )?,
    lookups: prometheus::register_int_counter_with_registry!(
        "datapulse_bridge_dedupe_store_lookups_total",
        "Events looked up in the dedupe store.",
        r
    )?,
    latency: prometheus::register_histogram_vec_with_registry!(
        "datapulse_bridge_dedupe_store_seconds",
        "Latency of one dedupe store operation (one Redis round trip), by operation.",
        &["op"],
        vec![0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
        r
    )?,
    errors: prometheus::register_int_counter_vec_with_registry!(
        "datapulse_bridge_dedupe_store_errors_total",
        "Failed dedupe store operations, by operation.",
        &["op"],
        r
    )?,
    unguarded: prometheus::register_int_counter_vec_with_registry!(
        "datapulse_bridge_dedupe_unguarded_total",
        "Events passed without the store under on_store_unavailable = \"deliver\": sent without lookup \
         (stage=check) or delivered without being recorded (stage=delivered).",
        &["stage"],
        r
    )?,
    waits: prometheus::register_int_counter_with_registry!(
        "datapulse_bridge_dedupe_claim_waits_total",
        "Times a check waited for an id in flight elsewhere: in another delivery lane of this process, or (Redis) in another replica.",
        r
    )?,
    claims_lost: prometheus::register_int_counter_with_registry!(
        "datapulse_bridge_dedupe_claims_lost_total",
        "In-flight claims found taken by another replica (its lease expired while this one held the id): \
         the id may have been sent twice.",
        r
    )?,
    in_doubt: prometheus::register_int_counter_with_registry!(
        "datapulse_bridge_dedupe_in_doubt_total",
        "Events whose id was in flight in a process that died before recording the API's answer \
         (dedupe.redis.in_doubt = \"dead-letter\"): dead-lettered as in_doubt, never sent twice.",
        r
    )?,
        })
    }
}

impl Metrics {
    /// Observes one store operation's latency.
    fn observe(&self, op: &str, start: Instant) {
        self.latency
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests;
