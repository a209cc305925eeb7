//! One delivery lane: cut a batch, judge it (dedupe), send it, settle every record.
//!
//! A partition always goes to the same lane and a lane has one batch in flight at a time, so
//! each partition's events reach the API in read order (invariant 7) while several lanes'
//! requests are in flight together. For each batch:
//! 1. records of partitions revoked since they were read are dropped (their new owner reads them);
//! 2. **judge**: `Deduper::check` gives each event a verdict; duplicates are finished, double
//!    counts and ids in doubt are dead-lettered, the rest is sent;
//! 3. **send**: `Deliverer::deliver_json` until each event has a result, with the ids' `sent:`
//!    marks kept by [`SentMarks`]; at shutdown's deadline the ids are let go as *abandoned* when a
//!    request may have been counted (the next owner finds them in doubt), else *released*;
//! 4. **settle** ([`Settlement`]): the rejected are released and dead-lettered, the delivered ids
//!    are recorded in the dedupe store (invariant 3) and only then finished.

use super::outcome::{Held, Outcome, Outcomes};
use crate::backoff::{until_ok, Backoff};
use crate::batch::{Batcher, JsonLen};
use crate::dedupe::{Deduper, EventKeys, LetGo, StoreUnavailable, Verdict};
use crate::deliver::{Deliverer, EventResult, Exposure, Interrupted};
use crate::dlq::Reason;
use crate::event::TimestampUnit;
use crate::source::lock;
use std::sync::Arc;
use tracing::Instrument;

/// An event waiting for delivery, with the record it came from. The event itself is not kept
/// (it borrows from the record): only what the later stages need of it.
pub(crate) struct Pending {
    pub held: Held,
    /// Its dedupe keys, taken once.
    pub keys: EventKeys,
    /// Its `timestamp`, for the delivery latency.
    pub timestamp: i64,
    /// The event's JSON, serialised once (its length sizes the batch; the request body joins
    /// them).
    pub json: Vec<u8>,
}

impl JsonLen for Pending {
    fn json_len(&self) -> usize {
        self.json.len()
    }
}

/// What became of the events of a batch the API answered: each sent event in exactly one list.
struct Settlement {
    delivered: Vec<Pending>,
    /// With the status and body of the API's answer.
    rejected: Vec<(Pending, u16, String)>,
}

/// A batch whose delivery ended without results (shutdown's deadline): how its ids are let go.
#[derive(Debug, PartialEq, Eq)]
struct Unsent {
    how: LetGo,
}

/// One delivery lane (see the module doc).
pub(crate) struct Lane {
    pub batcher: Batcher<Pending>,
    pub deliverer: Arc<Deliverer>,
    pub deduper: Arc<Deduper>,
    pub outcomes: Arc<Outcomes>,
    /// The unit of the events' `timestamp`, for the delivery latency.
    pub unit: TimestampUnit,
}

impl Lane {
    /// Runs until the consumer loop stopped and everything queued was handled.
    pub async fn run(mut self) {
        let abandon = self.outcomes.abandon_token().clone();
        loop {
            let deliverer = &self.deliverer;
            let Some(batch) = self.batcher.next(|| deliverer.reserve(&abandon)).await else {
                return;
            };
            if abandon.is_cancelled() {
                self.outcomes.abandoned(batch.len());
                continue;
            }
            let id = self.outcomes.next_batch();
            let span = tracing::info_span!("batch", id, size = batch.len(), partitions = %partitions_of(&batch),
                delivered = tracing::field::Empty, duplicate = tracing::field::Empty, dead_lettered = tracing::field::Empty);
            self.process(batch).instrument(span).await;
        }
    }

    /// Takes one batch through dedupe and delivery to an outcome for each record.
    async fn process(&self, batch: Vec<Pending>) {
        let batch = self.drop_revoked(batch);
        if batch.is_empty() {
            return;
        }
        let Some(verdicts) = self.judge(&batch).await else {
            self.outcomes.abandoned(batch.len());
            return;
        };
        let to_send = self.route(batch, verdicts);
        if to_send.is_empty() {
            return;
        }
        let count = to_send.len();
        match self.send(to_send).await {
            Ok(settlement) => self.settle(settlement).await,
            Err(Unsent { .. }) => self.outcomes.abandoned(count),
        }
    }

    /// Records of partitions revoked since they were read belong to the new owner now.
    fn drop_revoked(&self, batch: Vec<Pending>) -> Vec<Pending> {
        let tracker = lock(self.outcomes.tracker());
        let (keep, stale): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|p| tracker.is_current(&p.held.record.id, p.held.epoch));
        self.outcomes.abandoned(stale.len());
        keep
    }

    /// The dedupe verdicts of a batch, waiting while the store is unreachable (under the `pause`
    /// policy); `None` when shutdown's deadline passed first.
    async fn judge(&self, batch: &[Pending]) -> Option<Vec<Verdict>> {
        let keys: Vec<&EventKeys> = batch.iter().map(|p| &p.keys).collect();
        until_ok(
            Backoff::STORE,
            Some(self.outcomes.abandon_token()),
            || self.deduper.check(&keys),
            |e: &StoreUnavailable, _| {
                tracing::warn!(error = %e.reason(), "dedupe store unavailable; delivery paused until it returns")
            },
        )
        .await
    }

    /// Finishes or dead-letters what must not be sent; returns the events to send, in order.
    fn route(&self, batch: Vec<Pending>, verdicts: Vec<Verdict>) -> Vec<Pending> {
        let duplicates = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Duplicate { .. }))
            .count();
        tracing::Span::current().record("duplicate", duplicates);
        let mut to_send = Vec::with_capacity(batch.len());
        for (p, v) in batch.into_iter().zip(verdicts) {
            match v {
                Verdict::Send => to_send.push(p),
                Verdict::Duplicate { reason } => {
                    tracing::debug!(record = %p.held.record.id, reason, "duplicate dropped");
                    self.outcomes.finish(&p.held, Outcome::Duplicate(reason));
                }
                Verdict::DoubleCount { reason } => {
                    let why = Reason {
                        stage: "dedupe",
                        code: "double_count".into(),
                        message: reason,
                        http_status: None,
                    };
                    self.outcomes.dead_letter(p.held, why, None);
                }
                Verdict::InDoubt { reason } => {
                    let why = Reason {
                        stage: "dedupe",
                        code: "in_doubt".into(),
                        message: format!("record {}: {reason}", p.held.record.id),
                        http_status: None,
                    };
                    self.outcomes.dead_letter(p.held, why, Some(p.keys));
                }
            }
        }
        to_send
    }

    /// Delivers the events judged `Send`; at shutdown's deadline lets their ids go as the
    /// deliverer says (a request that may have been counted leaves them in doubt for the next
    /// owner; otherwise they are free again).
    async fn send(&self, to_send: Vec<Pending>) -> Result<Settlement, Unsent> {
        let results = {
            let bodies: Vec<&[u8]> = to_send.iter().map(|p| p.json.as_slice()).collect();
            let marks = SentMarks {
                deduper: &self.deduper,
                keys: to_send.iter().map(|p| &p.keys).collect(),
            };
            match self
                .deliverer
                .deliver_json(&bodies, self.outcomes.abandon_token(), &marks)
                .await
            {
                Ok(r) => r,
                Err(Interrupted { may_have_been_counted }) => {
                    let how = if may_have_been_counted {
                        LetGo::Abandon
                    } else {
                        LetGo::Release
                    };
                    self.deduper.let_go(&marks.keys, how).await;
                    return Err(Unsent { how });
                }
            }
        };
        let mut settlement = Settlement {
            delivered: Vec::with_capacity(to_send.len()),
            rejected: Vec::new(),
        };
        for (p, r) in to_send.into_iter().zip(results) {
            match r {
                EventResult::Delivered => settlement.delivered.push(p),
                EventResult::Rejected { status, body } => settlement.rejected.push((p, status, body)),
            }
        }
        Ok(settlement)
    }

    /// Dead-letters the rejected events and finishes the delivered ones once their ids are
    /// recorded (invariant 3: after the 2xx, before the offsets become committable).
    async fn settle(&self, s: Settlement) {
        if !s.rejected.is_empty() {
            let keys: Vec<&EventKeys> = s.rejected.iter().map(|(p, _, _)| &p.keys).collect();
            self.deduper.release(&keys).await;
        }
        for (p, status, body) in s.rejected {
            let why = Reason {
                stage: "api",
                code: "rejected".into(),
                message: format!(
                    "record {}: the API answered {status}: {}",
                    p.held.record.id,
                    crate::event::truncate(&body)
                ),
                http_status: Some(status),
            };
            self.outcomes.dead_letter(p.held, why, None);
        }
        if s.delivered.is_empty() {
            return;
        }
        let keys: Vec<&EventKeys> = s.delivered.iter().map(|p| &p.keys).collect();
        let recorded = until_ok(
            Backoff::STORE,
            Some(self.outcomes.abandon_token()),
            || self.deduper.delivered(&keys),
            |e: &StoreUnavailable, _| {
                tracing::warn!(error = %e.reason(), "cannot record delivered ids in the dedupe store; retrying before committing")
            },
        )
        .await;
        if recorded.is_none() {
            self.outcomes.abandoned(s.delivered.len());
            return;
        }
        tracing::debug!("batch delivered");
        let delivered: Vec<(&Held, i64)> = s.delivered.iter().map(|p| (&p.held, p.timestamp)).collect();
        self.outcomes.delivered(&delivered, self.unit);
    }
}

/// `topic/partition` of the records of a batch, for its log span.
fn partitions_of(batch: &[Pending]) -> String {
    let mut parts: Vec<(&str, i32)> = batch
        .iter()
        .map(|p| (&*p.held.record.id.topic, p.held.record.id.partition))
        .collect();
    parts.sort_unstable();
    parts.dedup();
    parts
        .iter()
        .map(|(t, p)| format!("{t}/{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Keeps the dedupe store's `sent:` marks of a batch in step with its requests (see
/// `deliver::Exposure`): a request leaves only once its ids are marked, so that a crash leaves
/// them in doubt rather than free to be sent twice.
struct SentMarks<'a> {
    deduper: &'a Deduper,
    keys: Vec<&'a EventKeys>,
}

impl Exposure for SentMarks<'_> {
    async fn exposed(&self) {
        until_ok(
            Backoff::STORE,
            None,
            || self.deduper.mark_sent(&self.keys, true),
            |e: &StoreUnavailable, _| {
                tracing::warn!(error = %e.reason(), "cannot mark ids as sent in the dedupe store; the request waits")
            },
        )
        .await;
    }

    async fn unexposed(&self) {
        // Best effort: a mark left behind makes a crash's next owner dead-letter the ids as in
        // doubt, never send them twice.
        let _ = self.deduper.mark_sent(&self.keys, false).await;
    }
}

#[cfg(test)]
mod tests;
