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
//! 4. **settle** ([`Settlement`]): the rejected and the too large are released and dead-lettered,
//!    those in doubt (an ambiguous answer) dead-lettered as `in_doubt` and their ids remembered as
//!    doubted (`Deduper::doubt_dead_lettered`), the delivered ids recorded in the dedupe store
//!    (invariant 3) and only then finished.

use super::outcome::{Held, Outcome, Outcomes};
use crate::backoff::{until_ok, Backoff};
use crate::batch::{Batcher, JsonLen};
use crate::dedupe::{Deduper, EventKeys, LetGo, StoreUnavailable, Verdict};
use crate::deliver::{Deliverer, EventResult, Exposure, Interrupted};
use crate::dlq::Reason;
use crate::event::TimestampUnit;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
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
    /// Refused for their size alone (413), with the body of the answer.
    too_large: Vec<(Pending, String)>,
    /// In a request the API may have counted, with its status (502, 504; none without an answer)
    /// and what happened.
    in_doubt: Vec<(Pending, Option<u16>, String)>,
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
    /// Shutdown: the batch under way is finished, nothing more is sent.
    pub stop: CancellationToken,
}

impl Lane {
    /// Runs until shutdown (the batch under way finished), or until the consumer loop is gone
    /// and everything queued was handled. What was never sent at shutdown (its ids never held) is
    /// left to the next owner.
    pub async fn run(mut self) {
        let abandon = self.outcomes.abandon_token().clone();
        let stop = self.stop.clone();
        loop {
            let deliverer = &self.deliverer;
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => None,
                b = self.batcher.next(|| deliverer.reserve(&abandon)) => b,
            };
            let Some(batch) = next else { break };
            if abandon.is_cancelled() {
                self.outcomes.abandoned(batch.len());
                continue;
            }
            let id = self.outcomes.next_batch();
            let span = tracing::info_span!("batch", id, size = batch.len(), partitions = %partitions_of(&batch),
                delivered = tracing::field::Empty, duplicate = tracing::field::Empty, dead_lettered = tracing::field::Empty);
            self.process(batch).instrument(span).await;
        }
        let never_sent = self.batcher.take_all();
        if !never_sent.is_empty() {
            tracing::info!(
                records = never_sent.len(),
                "shutting down: records never sent are left to the next owner"
            );
            self.outcomes.abandoned(never_sent.len());
        }
    }

    /// Takes one batch through dedupe and delivery to an outcome for each record.
    async fn process(&mut self, batch: Vec<Pending>) {
        let batch = self.drop_revoked(batch);
        if batch.is_empty() {
            return;
        }
        let Some(verdicts) = self.judge(&batch).await else {
            self.outcomes.abandoned(batch.len());
            return;
        };
        let mut to_send = self.route(batch, verdicts);
        if to_send.is_empty() {
            return;
        }
        if !self.stop.is_cancelled() {
            self.top_up(&mut to_send).await;
        }
        // The key's budget may hold the request back (at 60 requests a minute, up to a second):
        // draw it now, then take out the records of partitions revoked meanwhile, so that what
        // leaves belongs to this process when it leaves. At shutdown a request not yet out is
        // not sent: its ids are released for the next owner.
        if self.stop.is_cancelled() || self.deliverer.reserve(&self.stop).await.is_err() {
            self.let_go(&to_send, LetGo::Release).await;
            self.outcomes.abandoned(to_send.len());
            return;
        }
        let to_send = self.drop_revoked_held(to_send).await;
        if to_send.is_empty() {
            return;
        }
        let count = to_send.len();
        match self.send(to_send).await {
            Ok(settlement) => self.settle(settlement).await,
            Err(Unsent { .. }) => self.outcomes.abandoned(count),
        }
    }

    /// Fills the room that duplicates and dead letters left in a judged batch with events already
    /// waiting, judged as later events of the same batch, so that a request carries
    /// `batch.max_events` events when there are that many to send (at the rate limit every
    /// request counts). Stops when an event's id or bet is in flight in another lane: those lead
    /// the next batch.
    async fn top_up(&mut self, to_send: &mut Vec<Pending>) {
        let (max_events, max_bytes) = (self.batcher.config().max_events, self.batcher.config().max_bytes);
        while to_send.len() < max_events {
            let mut bytes = 2 + to_send.iter().map(|p| p.json.len() + 1).sum::<usize>();
            let mut more = Vec::new();
            while to_send.len() + more.len() < max_events {
                let Some(p) = self.batcher.try_next() else { break };
                if bytes + p.json.len() + 1 > max_bytes {
                    self.batcher.put_back(vec![p]);
                    break;
                }
                bytes += p.json.len() + 1;
                more.push(p);
            }
            let more = self.drop_revoked(more);
            if more.is_empty() {
                return;
            }
            let keys: Vec<&EventKeys> = more.iter().map(|p| &p.keys).collect();
            let earlier: Vec<&EventKeys> = to_send.iter().map(|p| &p.keys).collect();
            let verdicts = match self.deduper.check_now(&earlier, &keys).await {
                Some(Ok(verdicts)) => verdicts,
                // Held by another lane meanwhile, or the store is unavailable: the next batch.
                _ => {
                    self.batcher.put_back(more);
                    return;
                }
            };
            tracing::debug!(events = more.len(), "batch topped up");
            to_send.extend(self.route(more, verdicts));
        }
    }

    /// Records of partitions revoked since they were read belong to the new owner now.
    fn drop_revoked(&self, batch: Vec<Pending>) -> Vec<Pending> {
        let tracker = self.outcomes.tracker().lock();
        let (keep, stale): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|p| tracker.is_current(&p.held.record.id, p.held.epoch));
        self.outcomes.abandoned(stale.len());
        keep
    }

    /// [`Lane::drop_revoked`] for events judged `Send`: their ids are released for the new owner.
    async fn drop_revoked_held(&self, to_send: Vec<Pending>) -> Vec<Pending> {
        let (keep, stale): (Vec<_>, Vec<_>) = {
            let tracker = self.outcomes.tracker().lock();
            to_send
                .into_iter()
                .partition(|p| tracker.is_current(&p.held.record.id, p.held.epoch))
        };
        if !stale.is_empty() {
            tracing::info!(
                records = stale.len(),
                "records of revoked partitions taken out of the batch before sending"
            );
            self.let_go(&stale, LetGo::Release).await;
            self.outcomes.abandoned(stale.len());
        }
        keep
    }

    /// Lets the held ids of `events` go (none of them was sent).
    async fn let_go(&self, events: &[Pending], how: LetGo) {
        let keys: Vec<&EventKeys> = events.iter().map(|p| &p.keys).collect();
        self.deduper.let_go(&keys, how).await;
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
                v @ Verdict::DoubleCount { .. } => {
                    let why = Reason {
                        stage: "dedupe",
                        field: None,
                        code: "double_count".into(),
                        message: v.reason().unwrap_or_default(),
                        http_status: None,
                    };
                    self.outcomes.dead_letter(p.held, why, None);
                }
                v @ Verdict::InDoubt { .. } => {
                    let why = Reason {
                        stage: "dedupe",
                        field: None,
                        code: "in_doubt".into(),
                        message: format!("record {}: {}", p.held.record.id, v.reason().unwrap_or_default()),
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
                .deliver_json(&bodies, self.outcomes.abandon_token(), Some(&self.stop), &marks)
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
            too_large: Vec::new(),
            in_doubt: Vec::new(),
        };
        for (p, r) in to_send.into_iter().zip(results) {
            match r {
                EventResult::Delivered => settlement.delivered.push(p),
                EventResult::Rejected { status, body } => settlement.rejected.push((p, status, body)),
                EventResult::TooLarge { body } => settlement.too_large.push((p, body)),
                EventResult::InDoubt { status, detail } => settlement.in_doubt.push((p, status, detail)),
            }
        }
        Ok(settlement)
    }

    /// Dead-letters the rejected events and finishes the delivered ones once their ids are
    /// recorded (invariant 3: after the 2xx, before the offsets become committable).
    async fn settle(&self, s: Settlement) {
        if !s.rejected.is_empty() || !s.too_large.is_empty() {
            let keys: Vec<&EventKeys> = s
                .rejected
                .iter()
                .map(|(p, _, _)| &p.keys)
                .chain(s.too_large.iter().map(|(p, _)| &p.keys))
                .collect();
            self.deduper.release(&keys).await;
        }
        for (p, body) in s.too_large {
            let why = Reason {
                stage: "api",
                code: "payload_too_large".into(),
                message: format!(
                    "record {}: the API (or a proxy in front of it) answered 413 to a request carrying this \
                     event alone: {}",
                    p.held.record.id,
                    crate::event::truncate(&body)
                ),
                http_status: Some(413),
                field: None,
            };
            self.outcomes.dead_letter(p.held, why, None);
        }
        for (p, status, detail) in s.in_doubt {
            let answer = match status {
                Some(s) => format!("the API answered {s}"),
                None => "no answer came after the request was written".to_string(),
            };
            let why = Reason {
                stage: "api",
                code: "in_doubt".into(),
                message: format!(
                    "record {}: in doubt: {answer} ({}), so the API may or may not have counted it \
                     (delivery.on_ambiguous = \"in-doubt\"); look it up in DataPulse and replay this dead \
                     letter only if it is missing",
                    p.held.record.id,
                    crate::event::truncate(&detail)
                ),
                http_status: status,
                field: None,
            };
            // Held until the dead letter is written, then remembered as doubted: later copies
            // are duplicates, until `dlq replay` lets the id go.
            self.outcomes.dead_letter(p.held, why, Some(p.keys));
        }
        for (p, status, body) in s.rejected {
            let why = Reason {
                stage: "api",
                field: None,
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
