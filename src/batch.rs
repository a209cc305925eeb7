//! Grouping events into API requests under count, byte and time limits.
//!
//! A lane's events arrive through an [`Inbox`] in chunks (one per consumer burst) and leave in
//! batches cut by [`Batcher::next`]: a batch fills until it holds `max_events`, until the next
//! event would pass `max_bytes`, or until `linger` has passed *and* the budget for the next
//! request was drawn. When the budget is the bottleneck every request leaves full; when it is not,
//! linger bounds the latency. Nothing here knows Kafka or HTTP: the budget reaches the batcher as
//! a future.

use crate::settings::Invalid;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;

/// `[batch]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most events in one request (contract decision 7; default 500).
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// Most bytes of JSON body in one request (default 1 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Longest time the first event of a batch waits for the batch to fill.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
}

fn default_max_events() -> usize {
    500
}
fn default_max_bytes() -> usize {
    1024 * 1024
}
fn default_linger() -> Duration {
    Duration::from_millis(500)
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: default_max_events(),
            max_bytes: default_max_bytes(),
            linger: default_linger(),
        }
    }
}

impl BatchConfig {
    /// What types alone cannot say about `[batch]`.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut errs = Vec::new();
        if self.max_events == 0 {
            errs.push(Invalid::new("batch.max_events", "must be at least 1"));
        }
        if self.max_bytes < 1024 {
            errs.push(Invalid::new("batch.max_bytes", "must be at least 1024"));
        }
        errs
    }
}

/// What a batch is made of: an event with its serialised size.
pub trait JsonLen {
    /// Bytes of its JSON in the request body (the body adds one comma between events and two
    /// brackets around them).
    fn json_len(&self) -> usize;
}

/// A lane's end of the queue from the consumer: items arrive in chunks (one per consumer burst)
/// and leave one at a time.
pub struct Inbox<T> {
    rx: mpsc::UnboundedReceiver<Vec<T>>,
    ready: std::vec::IntoIter<T>,
}

impl<T> Inbox<T> {
    pub fn new(rx: mpsc::UnboundedReceiver<Vec<T>>) -> Inbox<T> {
        Inbox {
            rx,
            ready: Vec::new().into_iter(),
        }
    }

    /// The next item if one is here already.
    fn try_recv(&mut self) -> Option<T> {
        if let Some(p) = self.ready.next() {
            return Some(p);
        }
        self.ready = self.rx.try_recv().ok()?.into_iter();
        self.ready.next()
    }

    /// The next item; `None` once the sender is gone and everything was handed out.
    /// Cancel-safe: a received chunk is stored before the next await.
    async fn recv(&mut self) -> Option<T> {
        loop {
            if let Some(p) = self.ready.next() {
                return Some(p);
            }
            self.ready = self.rx.recv().await?.into_iter();
        }
    }
}

/// Cuts the batches of one lane, in arrival order.
pub struct Batcher<T> {
    inbox: Inbox<T>,
    cfg: BatchConfig,
    /// Items to hand out before the inbox's, in order: the one that did not fit the last
    /// batch's bytes, or those a lane put back ([`Batcher::put_back`]).
    carry: std::collections::VecDeque<T>,
    /// The batch [`Batcher::next`] is cutting.
    building: Vec<T>,
}

impl<T: JsonLen> Batcher<T> {
    pub fn new(inbox: Inbox<T>, cfg: BatchConfig) -> Batcher<T> {
        Batcher {
            inbox,
            cfg,
            carry: std::collections::VecDeque::new(),
            building: Vec::new(),
        }
    }

    /// The limits batches are cut by.
    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }

    /// The next item if one is here already (never waits): for topping up a batch some of whose
    /// items will not be sent.
    pub fn try_next(&mut self) -> Option<T> {
        self.carry.pop_front().or_else(|| self.inbox.try_recv())
    }

    /// Puts `items`, taken by [`Batcher::try_next`] and not used, back in front, in their order:
    /// the next batch starts with them.
    pub fn put_back(&mut self, items: Vec<T>) {
        for item in items.into_iter().rev() {
            self.carry.push_front(item);
        }
    }

    /// The next batch, at least one item; `None` once the inbox is closed and empty.
    ///
    /// `reserve` is called once the batch's first item is here and returns the future that draws
    /// the next request's budget; an `Err` from it (cancelled) ends the batch as it is. Items
    /// already waiting join at once; the timers matter only when none is.
    pub async fn next<F, E>(&mut self, reserve: impl FnOnce() -> F) -> Option<Vec<T>>
    where
        F: Future<Output = Result<(), E>>,
    {
        // The batch being cut lives in `self.building`, so that a call cancelled mid-way (the
        // lane stopping at shutdown) loses nothing: the next call, or `take_all`, finds it.
        if self.building.is_empty() {
            let first = match self.carry.pop_front() {
                Some(p) => p,
                None => self.inbox.recv().await?,
            };
            self.building.push(first);
        }
        let cfg = &self.cfg;
        let linger_end = tokio::time::Instant::now() + cfg.linger;
        let mut bytes = 1 + self.building.iter().map(|p| p.json_len() + 1).sum::<usize>();
        let mut lingered = false;
        let reserve = reserve();
        tokio::pin!(reserve);
        let mut reserved = false;
        // One timer per batch (a timer made per event cost a wake-up of the timer driver each).
        let linger = tokio::time::sleep_until(linger_end);
        tokio::pin!(linger);
        while self.building.len() < cfg.max_events {
            let next = match self.carry.pop_front().or_else(|| self.inbox.try_recv()) {
                Some(p) => Some(p),
                None => tokio::select! {
                    biased;
                    r = &mut reserve, if !reserved => {
                        reserved = true;
                        if lingered || r.is_err() { break }
                        continue;
                    }
                    _ = &mut linger, if !lingered => {
                        lingered = true;
                        if reserved { break }
                        continue;
                    }
                    p = self.inbox.recv() => p,
                },
            };
            let Some(p) = next else { break };
            if bytes + p.json_len() + 1 > cfg.max_bytes {
                self.carry.push_front(p);
                break;
            }
            bytes += p.json_len() + 1;
            self.building.push(p);
        }
        Some(std::mem::take(&mut self.building))
    }

    /// Every item not handed out yet, in order, without waiting: a cancelled batch's, the ones
    /// carried or put back, and those queued in the inbox (what a stopping lane never sent).
    pub fn take_all(&mut self) -> Vec<T> {
        let mut all = std::mem::take(&mut self.building);
        all.extend(self.carry.drain(..));
        while let Some(p) = self.inbox.try_recv() {
            all.push(p);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The tests' events: their JSON's bytes.
    impl JsonLen for Vec<u8> {
        fn json_len(&self) -> usize {
            self.len()
        }
    }

    fn batcher(
        max_events: usize,
        max_bytes: usize,
        linger_ms: u64,
    ) -> (mpsc::UnboundedSender<Vec<Vec<u8>>>, Batcher<Vec<u8>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let cfg = BatchConfig {
            max_events,
            max_bytes,
            linger: Duration::from_millis(linger_ms),
        };
        (tx, Batcher::new(Inbox::new(rx), cfg))
    }

    fn item(n: usize) -> Vec<u8> {
        vec![b'x'; n]
    }

    /// A budget that is there at once.
    async fn granted() -> Result<(), ()> {
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_cut_at_max_events_and_the_rest_waits_in_order() {
        let (tx, mut b) = batcher(3, 1 << 20, 500);
        tx.send((1..=7).map(item).collect()).unwrap();
        let sizes = |v: Vec<Vec<u8>>| v.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(sizes(b.next(granted).await.unwrap()), [1, 2, 3]);
        assert_eq!(sizes(b.next(granted).await.unwrap()), [4, 5, 6]);
        drop(tx);
        assert_eq!(
            sizes(b.next(granted).await.unwrap()),
            [7],
            "the closed inbox ends the last batch"
        );
        assert!(b.next(granted).await.is_none(), "closed and empty");
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_that_would_pass_max_bytes_starts_the_next_batch() {
        // 2 brackets + 500 + 1 comma + 500 = 1003 fits 1100; a third would not.
        let (tx, mut b) = batcher(100, 1100, 10);
        tx.send(vec![item(500), item(500), item(500)]).unwrap();
        assert_eq!(b.next(granted).await.unwrap().len(), 2);
        drop(tx);
        assert_eq!(
            b.next(granted).await.unwrap().len(),
            1,
            "the carried item leads the next batch"
        );
        assert!(b.next(granted).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn linger_cuts_a_partial_batch_once_the_budget_was_drawn() {
        let (tx, mut b) = batcher(100, 1 << 20, 500);
        tx.send(vec![item(1)]).unwrap();
        let start = tokio::time::Instant::now();
        assert_eq!(b.next(granted).await.unwrap().len(), 1);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(500),
            "waited for the linger, not longer"
        );
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_budget_is_not_there_the_batch_keeps_filling_past_linger() {
        let (tx, mut b) = batcher(100, 1 << 20, 100);
        tx.send(vec![item(1)]).unwrap();
        let feeder = tx.clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                feeder.send(vec![item(1)]).unwrap();
            }
        });
        let start = tokio::time::Instant::now();
        // The budget arrives after 1 s: every event read by then rides in this request.
        let batch = b
            .next(|| async {
                tokio::time::sleep(Duration::from_millis(1050)).await;
                Ok::<(), ()>(())
            })
            .await
            .unwrap();
        assert_eq!(batch.len(), 6);
        assert_eq!(start.elapsed(), Duration::from_millis(1050));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_budget_ends_the_batch_as_it_is() {
        let (tx, mut b) = batcher(100, 1 << 20, 10_000);
        tx.send(vec![item(1), item(1)]).unwrap();
        let calls = AtomicUsize::new(0);
        let batch = b
            .next(|| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err::<(), ()>(()) }
            })
            .await
            .unwrap();
        assert_eq!(
            batch.len(),
            2,
            "items already waiting joined before the budget was asked"
        );
        assert_eq!(calls.load(Ordering::Relaxed), 1, "one budget draw per batch");
        drop(tx);
    }
}
