//! Per-partition tracking of unfinished records and the committable watermark (invariants 2, 9).
//!
//! Every record taken from Kafka is `begin`-ed with the epoch of its partition's current
//! assignment and later `finish`-ed with exactly one outcome. The offset that may be committed for
//! a partition is the lowest unfinished offset, or one past the highest seen when nothing is
//! unfinished: the contiguous finished prefix. A revoke ends the epoch: finishes that arrive later
//! for the old epoch are ignored, so the old owner never commits past work it abandoned.

// hashbrown's default hasher: these maps are looked up twice per record, and SipHash showed in
// the profile.
use hashbrown::HashMap;
use std::collections::BTreeMap;
use std::time::Instant;

/// Identifies the assignment a record was read under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub partition: i32,
    pub epoch: u64,
    pub offset: i64,
}

#[derive(Debug)]
struct Part {
    epoch: u64,
    assigned: bool,
    /// Unfinished offsets and when they were read.
    pending: BTreeMap<i64, Instant>,
    /// One past the highest offset read in this epoch (None before the first record).
    next: Option<i64>,
    /// The last offset committed (next offset to read), as far as this process knows.
    committed: Option<i64>,
}

/// The tracker of every partition this process reads.
#[derive(Debug, Default)]
pub struct Tracker {
    topics: HashMap<String, HashMap<i32, Part>>,
    next_epoch: u64,
    in_flight: usize,
    gaps: u64,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A partition was assigned to us: a new epoch starts with nothing pending.
    pub fn assign(&mut self, topic: &str, partition: i32) {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let parts = self.topics.entry(topic.to_string()).or_default();
        if let Some(old) = parts.get(&partition) {
            self.in_flight -= old.pending.len();
        }
        parts.insert(
            partition,
            Part {
                epoch,
                assigned: true,
                pending: BTreeMap::new(),
                next: None,
                committed: None,
            },
        );
    }

    /// A partition was taken from us: its unfinished records are abandoned (the new owner reads
    /// them again from the committed offset). Returns the offset that may still be committed for
    /// it (the finished prefix), if it advanced.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Option<i64> {
        let commit = self.committable(topic, partition);
        if let Some(p) = self.topics.get_mut(topic).and_then(|m| m.get_mut(&partition)) {
            self.in_flight -= p.pending.len();
            p.pending.clear();
            p.assigned = false;
        }
        commit
    }

    /// Whether a partition is assigned in the given epoch.
    pub fn is_current(&self, topic: &str, t: &Ticket) -> bool {
        self.part(topic, t.partition)
            .is_some_and(|p| p.assigned && p.epoch == t.epoch)
    }

    /// Registers a record read from Kafka. Returns `None` for a partition not assigned to us
    /// (a record fetched before a revoke took effect): the caller drops it unprocessed.
    /// `read_at`: when the record was read (the caller reads the clock once per burst).
    pub fn begin(&mut self, topic: &str, partition: i32, offset: i64, read_at: Instant) -> Option<Ticket> {
        let p = self.topics.get_mut(topic)?.get_mut(&partition)?;
        if !p.assigned {
            return None;
        }
        if p.pending.insert(offset, read_at).is_none() {
            self.in_flight += 1;
        }
        if p.next.is_some_and(|n| offset > n) {
            // Compaction and transaction markers make gaps legitimately; a broker that skips
            // records makes them too. Counted so that an operator can tell the two apart.
            self.gaps += 1;
        }
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(Ticket {
            partition,
            epoch: p.epoch,
            offset,
        })
    }

    /// Records the outcome of a record. Returns false when the ticket's epoch has ended (the
    /// partition was revoked since): the outcome must not count towards a commit.
    pub fn finish(&mut self, topic: &str, t: &Ticket) -> bool {
        let Some(p) = self.topics.get_mut(topic).and_then(|m| m.get_mut(&t.partition)) else {
            return false;
        };
        if !p.assigned || p.epoch != t.epoch {
            return false;
        }
        if p.pending.remove(&t.offset).is_some() {
            self.in_flight -= 1;
            true
        } else {
            false
        }
    }

    /// The offset that may be committed for a partition now, if it is beyond the last commit.
    pub fn committable(&self, topic: &str, partition: i32) -> Option<i64> {
        let p = self.part(topic, partition)?;
        let upto = match p.pending.keys().next() {
            Some(&lowest) => lowest,
            None => p.next?,
        };
        (p.committed.is_none_or(|c| upto > c)).then_some(upto)
    }

    /// Every assigned partition whose committable offset advanced: `(topic, partition, offset)`.
    pub fn to_commit(&self) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for (topic, parts) in &self.topics {
            for (&partition, p) in parts {
                if p.assigned {
                    if let Some(o) = self.committable(topic, partition) {
                        out.push((topic.clone(), partition, o));
                    }
                }
            }
        }
        out
    }

    /// Notes that `offset` was committed for a partition.
    pub fn committed(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self.topics.get_mut(topic).and_then(|m| m.get_mut(&partition)) {
            p.committed = Some(p.committed.map_or(offset, |c| c.max(offset)));
        }
    }

    /// The last committed offset this process knows of, per assigned partition.
    pub fn committed_offsets(&self) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for (topic, parts) in &self.topics {
            for (&partition, p) in parts {
                if let (true, Some(c)) = (p.assigned, p.committed) {
                    out.push((topic.clone(), partition, c));
                }
            }
        }
        out
    }

    /// How often a partition's next record skipped offsets since the last record read.
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    /// Records read and not finished, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// When the oldest unfinished record was read.
    pub fn oldest_unfinished(&self) -> Option<Instant> {
        self.topics
            .values()
            .flat_map(|m| m.values())
            .filter_map(|p| p.pending.values().min().copied())
            .min()
    }

    /// The partitions currently assigned.
    pub fn assigned(&self) -> Vec<(String, i32)> {
        let mut out = Vec::new();
        for (topic, parts) in &self.topics {
            for (&partition, p) in parts {
                if p.assigned {
                    out.push((topic.clone(), partition));
                }
            }
        }
        out
    }

    fn part(&self, topic: &str, partition: i32) -> Option<&Part> {
        self.topics.get(topic)?.get(&partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_contiguous_finished_prefix() {
        let mut t = Tracker::new();
        t.assign("t", 0);
        let a = t.begin("t", 0, 10, Instant::now()).unwrap();
        let b = t.begin("t", 0, 11, Instant::now()).unwrap();
        let c = t.begin("t", 0, 12, Instant::now()).unwrap();
        assert_eq!(t.committable("t", 0), Some(10));
        assert!(t.finish("t", &b));
        assert!(t.finish("t", &c));
        assert_eq!(t.committable("t", 0), Some(10), "11 and 12 are finished but 10 is not");
        assert!(t.finish("t", &a));
        assert_eq!(t.committable("t", 0), Some(13));
        t.committed("t", 0, 13);
        assert_eq!(t.committable("t", 0), None);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn revoked_work_is_not_committed_by_the_old_owner() {
        let mut t = Tracker::new();
        t.assign("t", 1);
        let a = t.begin("t", 1, 0, Instant::now()).unwrap();
        let b = t.begin("t", 1, 1, Instant::now()).unwrap();
        assert!(t.finish("t", &a));
        assert_eq!(
            t.revoke("t", 1),
            Some(1),
            "the finished prefix may be committed on revoke"
        );
        assert!(!t.finish("t", &b), "a finish after revoke is ignored");
        assert!(
            t.begin("t", 1, 2, Instant::now()).is_none(),
            "records of a revoked partition are dropped"
        );
        assert_eq!(t.in_flight(), 0);
        // Reassigned: a new epoch; the old ticket stays void.
        t.assign("t", 1);
        let b2 = t.begin("t", 1, 1, Instant::now()).unwrap();
        assert!(!t.finish("t", &b));
        assert_eq!(t.committable("t", 1), Some(1));
        assert!(t.finish("t", &b2));
        assert_eq!(t.committable("t", 1), Some(2));
    }

    #[test]
    fn duplicate_begin_counts_once() {
        let mut t = Tracker::new();
        t.assign("t", 0);
        t.begin("t", 0, 5, Instant::now()).unwrap();
        let a = t.begin("t", 0, 5, Instant::now()).unwrap();
        assert_eq!(t.in_flight(), 1);
        assert!(t.finish("t", &a));
        assert_eq!(t.in_flight(), 0);
        assert!(t.oldest_unfinished().is_none());
    }
}
