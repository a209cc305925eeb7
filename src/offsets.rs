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
use std::sync::Arc;
use std::time::Instant;

/// A record's place in Kafka, its one identity in the bridge: in messages, dead-letter headers and
/// dedupe keys it is written `topic/partition/offset` (its `Display`). A record read again after a
/// crash or a rebalance has the same `RecordId`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId {
    /// The topic's name, shared by every record read from it.
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// A text that is not a record's `topic/partition/offset` ([`RecordId`]'s `FromStr`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a record's `topic/partition/offset`")]
pub struct NotARecordId(String);

impl NotARecordId {
    /// The text that is not a record id.
    pub fn text(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for RecordId {
    type Err = NotARecordId;

    /// Reads `topic/partition/offset` (Kafka topic names hold no `/`).
    fn from_str(s: &str) -> Result<RecordId, NotARecordId> {
        let bad = || NotARecordId(s.to_string());
        let mut parts = s.rsplitn(3, '/');
        let (Some(offset), Some(partition), Some(topic)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        if topic.is_empty() {
            return Err(bad());
        }
        Ok(RecordId {
            topic: topic.into(),
            partition: partition.parse().map_err(|_| bad())?,
            offset: offset.parse().map_err(|_| bad())?,
        })
    }
}

/// The assignment a record was read under: a number this process gives each assignment of a
/// partition to it, not Kafka's group generation (which also moves for partitions that are kept).
/// A finish carrying an epoch that has ended (the partition was revoked since) is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(u64);

#[derive(Debug)]
struct Part {
    epoch: Epoch,
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
        let epoch = Epoch(self.next_epoch);
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

    /// Whether the record's partition is still assigned in the epoch it was read under.
    pub fn is_current(&self, id: &RecordId, epoch: Epoch) -> bool {
        self.part(&id.topic, id.partition)
            .is_some_and(|p| p.assigned && p.epoch == epoch)
    }

    /// Registers a record read from Kafka; returns the epoch it is read under. `None` for a
    /// partition not assigned to us (a record fetched before a revoke took effect): the caller
    /// drops it unprocessed. `read_at`: when the record was read (the caller reads the clock once
    /// per burst).
    pub fn begin(&mut self, id: &RecordId, read_at: Instant) -> Option<Epoch> {
        let offset = id.offset;
        let p = self.topics.get_mut(&*id.topic)?.get_mut(&id.partition)?;
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
        Some(p.epoch)
    }

    /// Records the outcome of a record. Returns false when its epoch has ended (the partition was
    /// revoked since): the outcome must not count towards a commit.
    pub fn finish(&mut self, id: &RecordId, epoch: Epoch) -> bool {
        let Some(p) = self.topics.get_mut(&*id.topic).and_then(|m| m.get_mut(&id.partition)) else {
            return false;
        };
        if !p.assigned || p.epoch != epoch {
            return false;
        }
        if p.pending.remove(&id.offset).is_some() {
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

    /// The group's committed offset of a partition as the broker just answered it: when it is
    /// below what this process recorded as committed (another client committed an older offset,
    /// or the broker lost a commit), the record goes back to the broker's value, so that the
    /// finished prefix counts as not committed and the next commit sends it again. Returns the
    /// offset this process had recorded in that case; `None` otherwise (not assigned, nothing
    /// recorded, or the broker at or beyond it).
    pub fn broker_committed(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.topics.get_mut(topic)?.get_mut(&partition)?;
        match p.committed {
            Some(c) if p.assigned && offset < c => {
                p.committed = Some(offset);
                Some(c)
            }
            _ => None,
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

    /// Whether a partition is assigned now.
    pub fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        self.topics
            .get(topic)
            .and_then(|m| m.get(&partition))
            .is_some_and(|p| p.assigned)
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

    fn id(topic: &str, partition: i32, offset: i64) -> RecordId {
        RecordId {
            topic: topic.into(),
            partition,
            offset,
        }
    }

    /// Begins the record `topic/partition/offset`: its id and epoch, as the pipeline holds them.
    fn begin(t: &mut Tracker, topic: &str, partition: i32, offset: i64) -> Option<(RecordId, Epoch)> {
        let id = id(topic, partition, offset);
        let epoch = t.begin(&id, Instant::now())?;
        Some((id, epoch))
    }

    fn finish(t: &mut Tracker, (id, epoch): &(RecordId, Epoch)) -> bool {
        t.finish(id, *epoch)
    }

    #[test]
    fn a_record_id_is_written_and_read_as_topic_partition_offset() {
        assert_eq!(id("wallet.tx", 3, 42).to_string(), "wallet.tx/3/42");
        assert_eq!("wallet.tx/3/42".parse::<RecordId>(), Ok(id("wallet.tx", 3, 42)));
        for bad in ["", "t/1", "/1/2", "t/x/2", "t/1/y"] {
            assert_eq!(bad.parse::<RecordId>(), Err(NotARecordId(bad.to_string())), "{bad}");
        }
    }

    #[test]
    fn a_committed_offset_the_broker_lost_is_committed_again() {
        let mut t = Tracker::new();
        t.assign("t", 0);
        let e = t.begin(&id("t", 0, 10), Instant::now()).unwrap();
        assert!(t.finish(&id("t", 0, 10), e));
        assert_eq!(t.to_commit(), vec![("t".to_string(), 0, 11)]);
        t.committed("t", 0, 11);
        assert!(t.to_commit().is_empty());
        // The broker at or beyond what was committed: nothing to do.
        assert_eq!(t.broker_committed("t", 0, 11), None);
        assert_eq!(t.broker_committed("t", 0, 12), None);
        assert!(t.to_commit().is_empty());
        // Below: the finished prefix is committable again.
        assert_eq!(t.broker_committed("t", 0, 4), Some(11));
        assert_eq!(t.to_commit(), vec![("t".to_string(), 0, 11)]);
        // Neither for a partition not assigned nor for one with nothing committed yet.
        assert_eq!(t.broker_committed("t", 1, 0), None);
        t.assign("t", 2);
        assert_eq!(t.broker_committed("t", 2, 0), None);
        t.revoke("t", 0);
        assert_eq!(t.broker_committed("t", 0, 0), None);
    }

    #[test]
    fn commits_only_the_contiguous_finished_prefix() {
        let mut t = Tracker::new();
        t.assign("t", 0);
        let a = begin(&mut t, "t", 0, 10).unwrap();
        let b = begin(&mut t, "t", 0, 11).unwrap();
        let c = begin(&mut t, "t", 0, 12).unwrap();
        assert_eq!(t.committable("t", 0), Some(10));
        assert!(finish(&mut t, &b));
        assert!(finish(&mut t, &c));
        assert_eq!(t.committable("t", 0), Some(10), "11 and 12 are finished but 10 is not");
        assert!(finish(&mut t, &a));
        assert_eq!(t.committable("t", 0), Some(13));
        t.committed("t", 0, 13);
        assert_eq!(t.committable("t", 0), None);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn revoked_work_is_not_committed_by_the_old_owner() {
        let mut t = Tracker::new();
        t.assign("t", 1);
        let a = begin(&mut t, "t", 1, 0).unwrap();
        let b = begin(&mut t, "t", 1, 1).unwrap();
        assert!(finish(&mut t, &a));
        assert_eq!(
            t.revoke("t", 1),
            Some(1),
            "the finished prefix may be committed on revoke"
        );
        assert!(!finish(&mut t, &b), "a finish after revoke is ignored");
        assert!(
            begin(&mut t, "t", 1, 2).is_none(),
            "records of a revoked partition are dropped"
        );
        assert_eq!(t.in_flight(), 0);
        // Reassigned: a new epoch; the old ticket stays void.
        t.assign("t", 1);
        let b2 = begin(&mut t, "t", 1, 1).unwrap();
        assert!(!finish(&mut t, &b));
        assert_eq!(t.committable("t", 1), Some(1));
        assert!(finish(&mut t, &b2));
        assert_eq!(t.committable("t", 1), Some(2));
    }

    #[test]
    fn duplicate_begin_counts_once() {
        let mut t = Tracker::new();
        t.assign("t", 0);
        begin(&mut t, "t", 0, 5).unwrap();
        let a = begin(&mut t, "t", 0, 5).unwrap();
        assert_eq!(t.in_flight(), 1);
        assert!(finish(&mut t, &a));
        assert_eq!(t.in_flight(), 0);
        assert!(t.oldest_unfinished().is_none());
    }
}
