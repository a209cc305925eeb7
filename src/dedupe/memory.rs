//! The memory store: what this process delivered, bounded in entries and in time.
//!
//! It knows nothing of other processes and forgets everything on restart; `docs/dedupe.md` says
//! exactly what can repeat because of that. In-flight holds live in the [`super::Deduper`] itself.

use super::{Lookup, Probe, ResultPattern};
use crate::offsets::RecordId;
use hashlink::LinkedHashMap;
use parking_lot::Mutex;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

/// A delivered key as this store keeps it: the seeded 128-bit XXH3 of its text. No copy of the
/// text is allocated per delivered event, and hashing and comparing it in the map is a couple of
/// word operations (the map of `String`s took 13% of the bridge's CPU in the e2e benchmark). Two
/// different keys share a fingerprint with probability 2⁻¹²⁸ per pair (the seed is random per
/// process, so ids cannot be crafted to collide): about 10⁻²⁴ over a billion lookups against the
/// default 200,000 entries.
type Fingerprint = u128;

/// Hashes a fingerprint for the map: it is uniform already, so its two halves folded.
#[derive(Default, Clone, Copy)]
struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u128` is used by `Fingerprint`; this keeps the hasher correct for anything.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = (n as u64) ^ ((n >> 64) as u64);
    }
}

/// Delivered ids and bets with an embedded result, in delivery order, each with when it was
/// recorded. Delivery order is exactly the order in which facts should be forgotten: the oldest
/// first, when they pass the time-to-live or the bound. (An LRU that refreshes on lookup would
/// only keep replayed ids longer; each id is delivered once.)
struct Facts {
    done: LinkedHashMap<Fingerprint, Instant, BuildHasherDefault<FingerprintHasher>>,
    results: LinkedHashMap<String, (ResultPattern, Instant)>,
    /// Records (`topic/partition/offset`) already dead-lettered.
    dead: LinkedHashMap<RecordId, Instant>,
    /// Keys in doubt (a request carrying them may have been counted) whose record is
    /// dead-lettered as `in_doubt`: later copies are duplicates of it for the ttl, as with Redis.
    doubted: LinkedHashMap<Fingerprint, Instant, BuildHasherDefault<FingerprintHasher>>,
}

pub(super) struct MemoryStore {
    facts: Mutex<Facts>,
    /// The seed of this process's fingerprints.
    seed: u64,
    max_entries: usize,
    ttl: Duration,
}

impl MemoryStore {
    pub(super) fn new(max_entries: u64, ttl: Duration) -> MemoryStore {
        let max_entries = usize::try_from(max_entries).unwrap_or(usize::MAX).max(1);
        MemoryStore {
            facts: Mutex::new(Facts {
                // Sized for the bound up front (about 9 bytes a slot, 2.4 MB for the default
                // 200,000): growing it rehashed every id several times on the delivery path.
                done: LinkedHashMap::with_capacity_and_hasher(max_entries.min(1 << 20), Default::default()),
                results: LinkedHashMap::new(),
                dead: LinkedHashMap::new(),
                doubted: LinkedHashMap::default(),
            }),
            seed: rand::random(),
            max_entries,
            ttl,
        }
    }

    fn fingerprint(&self, key: &str) -> Fingerprint {
        xxhash_rust::xxh3::xxh3_128_with_seed(key.as_bytes(), self.seed)
    }

    fn facts(&self) -> parking_lot::MutexGuard<'_, Facts> {
        self.facts.lock()
    }

    pub(super) fn lookup(&self, probes: &[Probe<'_>]) -> Vec<Lookup> {
        let now = Instant::now();
        let mut facts = self.facts();
        self.forget(&mut facts, now);
        probes
            .iter()
            .map(|p| {
                if p.key.is_some_and(|k| facts.done.contains_key(&self.fingerprint(k))) {
                    return Lookup::Done;
                }
                if p.key.is_some_and(|k| facts.doubted.contains_key(&self.fingerprint(k))) {
                    return Lookup::Doubted;
                }
                if let Some((bet, kind)) = p.guard {
                    if facts.results.get(bet).is_some_and(|(had, _)| *had != kind) {
                        return Lookup::Conflict;
                    }
                }
                Lookup::Free
            })
            .collect()
    }

    pub(super) fn record(&self, probes: &[Probe<'_>]) {
        let now = Instant::now();
        let mut facts = self.facts();
        for p in probes {
            if let Some(k) = p.key {
                facts.done.replace(self.fingerprint(k), now);
            }
            if let Some((bet, kind)) = p.guard {
                // The first kind recorded for a bet stays: a conflicting one was refused by lookup.
                if !facts.results.contains_key(bet) {
                    facts.results.insert(bet.to_string(), (kind, now));
                }
            }
        }
        self.forget(&mut facts, now);
    }

    /// Remembers `keys` as in doubt and dead-lettered (for the ttl, within the bound).
    pub(super) fn doubt(&self, keys: &[&str]) {
        let now = Instant::now();
        let mut facts = self.facts();
        for k in keys {
            facts.doubted.replace(self.fingerprint(k), now);
        }
        self.forget(&mut facts, now);
    }

    /// Lets a key in doubt be sent again (its dead letter was replayed); whether it was in doubt.
    pub(super) fn forget_doubt(&self, key: &str) -> bool {
        self.facts().doubted.remove(&self.fingerprint(key)).is_some()
    }

    pub(super) fn dead_lettered(&self, id: &RecordId) -> bool {
        let now = Instant::now();
        let mut facts = self.facts();
        self.forget(&mut facts, now);
        facts.dead.contains_key(id)
    }

    pub(super) fn mark_dead_lettered(&self, id: &RecordId) {
        let now = Instant::now();
        let mut facts = self.facts();
        facts.dead.replace(id.clone(), now);
        self.forget(&mut facts, now);
    }

    /// Drops facts past the time-to-live, then the oldest while over the bound.
    fn forget(&self, facts: &mut Facts, now: Instant) {
        let expired = |at: &Instant| now.duration_since(*at) >= self.ttl;
        while facts.done.front().is_some_and(|(_, at)| expired(at)) {
            facts.done.pop_front();
        }
        while facts.results.front().is_some_and(|(_, (_, at))| expired(at)) {
            facts.results.pop_front();
        }
        while facts.dead.front().is_some_and(|(_, at)| expired(at)) {
            facts.dead.pop_front();
        }
        while facts.doubted.front().is_some_and(|(_, at)| expired(at)) {
            facts.doubted.pop_front();
        }
        // Dead letters and doubts are rare: they count towards the bound only by being dropped
        // first.
        while facts.dead.len() > self.max_entries / 10 + 1 {
            facts.dead.pop_front();
        }
        while facts.doubted.len() > self.max_entries / 10 + 1 {
            facts.doubted.pop_front();
        }
        while facts.done.len() + facts.results.len() > self.max_entries {
            let oldest_done = facts.done.front().map(|(_, at)| *at);
            let oldest_result = facts.results.front().map(|(_, (_, at))| *at);
            match (oldest_done, oldest_result) {
                (Some(d), Some(r)) if r < d => {
                    facts.results.pop_front();
                }
                (Some(_), _) => {
                    facts.done.pop_front();
                }
                (None, Some(_)) => {
                    facts.results.pop_front();
                }
                (None, None) => break,
            }
        }
    }

    #[cfg(test)]
    pub(super) fn entry_count(&self) -> u64 {
        let facts = self.facts();
        (facts.done.len() + facts.results.len()) as u64
    }
}
