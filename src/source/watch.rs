//! What the bridge knows of each assigned partition's progress, and which partitions are stuck.
//!
//! A partition is **stuck** when it is assigned, the bridge has not paused it, the broker holds
//! records beyond the position the bridge has read to, and no record of it was read for
//! `kafka.stuck_after` (counted from the latest of: the last record read, its assignment, the
//! bridge's last resume). librdkafka keeps a partition's pause across a revoke and a re-assignment
//! (issue 25); a partition left paused that way, or one whose fetches fail silently, is stuck.
//!
//! "Records beyond the position", not "lag": the committed offset trails what was read while
//! deliveries are slow (an auth halt, a slow API), and a partition whose every record has been
//! read cannot be read any further. Pure: the clock and the broker's answers are passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One assigned partition's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watched {
    /// The latest of: the last record read, the assignment, the bridge's last resume.
    since: Instant,
    /// One past the highest offset read in this assignment (`None` before the first record).
    next: Option<i64>,
    /// Where reading started in this assignment: the group's committed offset, or the log's start
    /// (or end) where the group has none (`None` until asked from the broker).
    start: Option<i64>,
    /// The broker's end offset of the partition (`None` until asked from the broker).
    high_watermark: Option<i64>,
}

/// A partition's offsets for the lag gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lag {
    pub topic: String,
    pub partition: i32,
    /// The broker's end offset (the next offset to be written).
    pub high_watermark: i64,
    /// `high_watermark` minus the committed offset (this process's last commit, else where its
    /// assignment started), never below 0; `None` while neither is known.
    pub lag: Option<i64>,
}

/// The progress of every assigned partition.
#[derive(Debug, Default)]
pub struct Watch {
    topics: HashMap<String, HashMap<i32, Watched>>,
}

impl Watch {
    /// A partition was assigned at `now`: its clock starts, nothing read yet.
    pub fn assign(&mut self, topic: &str, partition: i32, now: Instant) {
        self.topics.entry(topic.to_string()).or_default().insert(
            partition,
            Watched {
                since: now,
                next: None,
                start: None,
                high_watermark: None,
            },
        );
    }

    /// A partition was revoked: it is no longer watched.
    pub fn revoke(&mut self, topic: &str, partition: i32) {
        if let Some(parts) = self.topics.get_mut(topic) {
            parts.remove(&partition);
        }
    }

    /// The bridge resumed its partitions at `now`: every clock starts again (a paused partition
    /// was not read, rightly).
    pub fn resumed(&mut self, now: Instant) {
        for w in self.topics.values_mut().flat_map(|m| m.values_mut()) {
            w.since = w.since.max(now);
        }
    }

    /// Records of a partition were read at `at`, up to `offset`. Ignored for a partition not
    /// assigned.
    pub fn read(&mut self, topic: &str, partition: i32, offset: i64, at: Instant) {
        if let Some(w) = self.get_mut(topic, partition) {
            w.since = w.since.max(at);
            w.next = Some(w.next.map_or(offset + 1, |n| n.max(offset + 1)));
        }
    }

    /// The broker's end offset of a partition, as just asked.
    pub fn set_high_watermark(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(w) = self.get_mut(topic, partition) {
            w.high_watermark = Some(offset);
        }
    }

    /// Where reading of a partition started in this assignment, as just asked.
    pub fn set_start(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(w) = self.get_mut(topic, partition) {
            w.start = Some(offset);
        }
    }

    /// Whether some partition's end offset is not known yet (just assigned).
    pub fn ends_missing(&self) -> bool {
        self.topics
            .values()
            .flat_map(|m| m.values())
            .any(|w| w.high_watermark.is_none())
    }

    /// The partitions watched, in order.
    pub fn partitions(&self) -> Vec<(String, i32)> {
        let mut out: Vec<(String, i32)> = self
            .topics
            .iter()
            .flat_map(|(t, m)| m.keys().map(move |&p| (t.clone(), p)))
            .collect();
        out.sort();
        out
    }

    /// The partitions whose starting position is not known yet, in order.
    pub fn without_start(&self) -> Vec<(String, i32)> {
        let mut out: Vec<(String, i32)> = self
            .topics
            .iter()
            .flat_map(|(t, m)| {
                m.iter()
                    .filter(|(_, w)| w.start.is_none())
                    .map(move |(&p, _)| (t.clone(), p))
            })
            .collect();
        out.sort();
        out
    }

    /// The partitions stuck at `now`, in order (see the module's documentation). `paused`: the
    /// bridge's pause state (a paused bridge has no stuck partition); `committed`: this process's
    /// last commit of a partition, if any.
    pub fn stuck(
        &self,
        now: Instant,
        stuck_after: Duration,
        paused: bool,
        committed: impl Fn(&str, i32) -> Option<i64>,
    ) -> Vec<(String, i32)> {
        if paused {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (topic, parts) in &self.topics {
            for (&partition, w) in parts {
                let position = [w.next, w.start, committed(topic, partition)]
                    .into_iter()
                    .flatten()
                    .max();
                // One offset beyond the position is not a record to read: a transaction's commit
                // marker follows its last record and is never delivered (a transactional
                // producer's idle partition would otherwise be stuck for good).
                let unread = matches!((w.high_watermark, position), (Some(hw), Some(pos)) if hw > pos + 1);
                if unread && now.saturating_duration_since(w.since) >= stuck_after {
                    out.push((topic.clone(), partition));
                }
            }
        }
        out.sort();
        out
    }

    /// Every partition whose end offset is known, with its lag, in order. `committed`: as for
    /// [`Watch::stuck`].
    pub fn lags(&self, committed: impl Fn(&str, i32) -> Option<i64>) -> Vec<Lag> {
        let mut out = Vec::new();
        for (topic, parts) in &self.topics {
            for (&partition, w) in parts {
                let Some(high_watermark) = w.high_watermark else {
                    continue;
                };
                let lag = committed(topic, partition)
                    .or(w.start)
                    .map(|c| (high_watermark - c).max(0));
                out.push(Lag {
                    topic: topic.clone(),
                    partition,
                    high_watermark,
                    lag,
                });
            }
        }
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        out
    }

    fn get_mut(&mut self, topic: &str, partition: i32) -> Option<&mut Watched> {
        self.topics.get_mut(topic)?.get_mut(&partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(60);

    fn none(_: &str, _: i32) -> Option<i64> {
        None
    }

    /// Partition 0 assigned at t0, started at committed offset 100, the broker's end at 150.
    fn one(t0: Instant) -> Watch {
        let mut w = Watch::default();
        w.assign("tx", 0, t0);
        w.set_start("tx", 0, 100);
        w.set_high_watermark("tx", 0, 150);
        w
    }

    #[test]
    fn a_partition_with_records_to_read_and_none_read_for_stuck_after_is_stuck() {
        let t0 = Instant::now();
        let w = one(t0);
        assert!(w
            .stuck(t0 + AFTER - Duration::from_millis(1), AFTER, false, none)
            .is_empty());
        assert_eq!(w.stuck(t0 + AFTER, AFTER, false, none), vec![("tx".to_string(), 0)]);
    }

    #[test]
    fn a_paused_bridge_has_no_stuck_partition_and_its_resume_restarts_the_clock() {
        let t0 = Instant::now();
        let mut w = one(t0);
        assert!(
            w.stuck(t0 + 2 * AFTER, AFTER, true, none).is_empty(),
            "paused by the bridge"
        );
        w.resumed(t0 + 2 * AFTER);
        assert!(w.stuck(t0 + 2 * AFTER + AFTER / 2, AFTER, false, none).is_empty());
        assert_eq!(w.stuck(t0 + 3 * AFTER, AFTER, false, none).len(), 1);
    }

    #[test]
    fn reading_restarts_the_clock_and_reading_to_the_end_is_not_stuck() {
        let t0 = Instant::now();
        let mut w = one(t0);
        w.read("tx", 0, 120, t0 + AFTER / 2);
        assert!(w.stuck(t0 + AFTER, AFTER, false, none).is_empty());
        assert_eq!(
            w.stuck(t0 + AFTER / 2 + AFTER, AFTER, false, none).len(),
            1,
            "still 29 to read"
        );
        // Every record read (149 is the last), none committed yet: a slow API, not a stuck partition.
        w.read("tx", 0, 149, t0 + AFTER);
        assert!(w.stuck(t0 + 10 * AFTER, AFTER, false, none).is_empty());
    }

    #[test]
    fn this_process_commits_count_as_the_position_and_the_lag() {
        let t0 = Instant::now();
        let w = one(t0);
        let at_end = |_: &str, _: i32| Some(150);
        assert!(w.stuck(t0 + 2 * AFTER, AFTER, false, at_end).is_empty());
        let lags = w.lags(|_, _| Some(140));
        assert_eq!(
            lags,
            vec![Lag {
                topic: "tx".into(),
                partition: 0,
                high_watermark: 150,
                lag: Some(10)
            }]
        );
        assert_eq!(w.lags(none)[0].lag, Some(50), "from where the assignment started");
    }

    #[test]
    fn unknown_offsets_judge_nothing() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        w.assign("tx", 0, t0);
        w.set_high_watermark("tx", 0, 150);
        w.assign("tx", 1, t0);
        w.set_start("tx", 1, 0);
        assert!(w.stuck(t0 + 2 * AFTER, AFTER, false, none).is_empty());
        assert_eq!(w.lags(none)[0].lag, None, "neither a commit nor a start known");
        assert_eq!(w.without_start(), vec![("tx".to_string(), 0)]);
    }

    #[test]
    fn a_revoked_and_reassigned_partition_starts_afresh() {
        let t0 = Instant::now();
        let mut w = one(t0);
        w.read("tx", 0, 149, t0);
        w.revoke("tx", 0);
        w.read("tx", 0, 200, t0 + AFTER);
        assert!(w.partitions().is_empty(), "a read of a revoked partition is ignored");
        let t1 = t0 + 2 * AFTER;
        w.assign("tx", 0, t1);
        w.set_start("tx", 0, 150);
        w.set_high_watermark("tx", 0, 400);
        // What this process read before the revoke no longer counts: 250 records to read again.
        assert!(w.stuck(t1 + AFTER / 2, AFTER, false, none).is_empty());
        assert_eq!(w.stuck(t1 + AFTER, AFTER, false, none), vec![("tx".to_string(), 0)]);
    }
}
