//! The memory store: what this process delivered, bounded in entries and in time.
//!
//! It knows nothing of other processes and forgets everything on restart; `docs/dedupe.md` says
//! exactly what can repeat because of that. In-flight holds live in the [`super::Deduper`] itself.

use super::{Kind, Lookup, Probe};
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use std::time::Duration;

/// One remembered fact.
#[derive(Clone, Hash, PartialEq, Eq)]
enum Entry {
    /// This dedupe key was delivered.
    Done(String),
    /// This bet's result was delivered, in the pattern of the value.
    Result(String),
}

pub(super) struct MemoryStore {
    cache: Cache<Entry, Option<Kind>>,
}

impl MemoryStore {
    pub(super) fn new(max_entries: u64, ttl: Duration) -> MemoryStore {
        // LRU rather than moka's default TinyLFU admission: for dedupe the recently delivered ids
        // matter, and an id is seen once, so frequency says nothing.
        let cache = Cache::builder()
            .max_capacity(max_entries)
            .time_to_live(ttl)
            .eviction_policy(EvictionPolicy::lru())
            .build();
        MemoryStore { cache }
    }

    pub(super) fn lookup(&self, probes: &[Probe<'_>]) -> Vec<Lookup> {
        probes
            .iter()
            .map(|p| {
                if let Some(k) = p.key {
                    if self.cache.contains_key(&Entry::Done(k.to_string())) {
                        return Lookup::Done;
                    }
                }
                if let Some((bet, kind)) = p.guard {
                    if let Some(Some(had)) = self.cache.get(&Entry::Result(bet.to_string())) {
                        if had != kind {
                            return Lookup::Conflict;
                        }
                    }
                }
                Lookup::Free
            })
            .collect()
    }

    pub(super) fn record(&self, probes: &[Probe<'_>]) {
        for p in probes {
            if let Some(k) = p.key {
                self.cache.insert(Entry::Done(k.to_string()), None);
            }
            if let Some((bet, kind)) = p.guard {
                // The first delivered pattern of a bet stays: a later conflicting one can only have
                // been delivered under the `deliver` policy, and the first is what the API counted.
                let entry = Entry::Result(bet.to_string());
                if !matches!(self.cache.get(&entry), Some(Some(had)) if had != kind) {
                    self.cache.insert(entry, Some(kind));
                }
            }
        }
    }

    #[cfg(test)]
    pub(super) fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}
