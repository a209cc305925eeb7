//! What the sandbox accepted: the latest accepted events (in order, compactly, at most
//! `--max-stored-events`), the counters behind `GET /_sandbox/stats`, and the optional
//! append-only JSONL file.
//!
//! Memory is bounded whatever the number of events (issue 23: the log grew ~320 bytes an event
//! without bound, 81 MB at 200k events; then 1 MB events grew it by count, not bytes). The log
//! keeps the newest `--max-stored-events` and `--max-stored-bytes` (32 MiB of JSON), evicting
//! the oldest requests whole; the counters stay exact over every event ever accepted, because
//! what they need of an event is kept as a fingerprint: a 128-bit hash of each distinct
//! transaction id (16 bytes; 16 more once it is duplicated) and of each distinct keyless event
//! (16 bytes and its first index), never the event. `by_event_name` names the first
//! [`EVENT_NAMES`] distinct names of at most [`EVENT_NAME_BYTES`] and counts the rest in
//! `other_event_names`; `duplicate_transaction_ids` lists the first [`LISTED_DUPLICATE_IDS`]
//! duplicated ids, cut to [`LISTED_TEXT_BYTES`], beside the exact counts; examples cut their
//! strings. So no stats answer grows with the size or number of events.

use super::SandboxError;
use crate::event::time_window::{self, TimeWindow};
use crate::event::{Event, TimestampUnit};
use bytes::Bytes;
use hashbrown::hash_map::Entry;
use hashbrown::{HashMap, HashSet};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use xxhash_rust::xxh3::xxh3_128;

/// How many suspicious timestamps are kept as examples (all are counted).
const SUSPICIOUS_EXAMPLES: usize = 20;

/// How many repeated keyless events are kept as examples (all are counted).
const REPEATED_KEYLESS_EXAMPLES: usize = 20;

/// How many distinct event names `by_event_name` names; events of any later name are counted in
/// `other_event_names` (the contract allows any name, so a client could otherwise grow the map
/// without bound).
pub(crate) const EVENT_NAMES: usize = 100;

/// The longest event name `by_event_name` names, in bytes: an event whose name is longer is
/// counted in `other_event_names` (a client could otherwise fill the 100 names with 1 MB each).
pub(crate) const EVENT_NAME_BYTES: usize = 128;

/// How many duplicated transaction ids `duplicate_transaction_ids` lists (the first ones seen
/// duplicated); all are counted in `duplicated_transaction_ids` and `duplicate_acceptances`.
pub(crate) const LISTED_DUPLICATE_IDS: usize = 1_000;

/// The longest text kept of a listed duplicated id, or of a string in an example, in bytes; a
/// longer one is cut at a character boundary and ends with [`CUT_MARKER`].
pub(crate) const LISTED_TEXT_BYTES: usize = 256;

/// Ends a text the sandbox cut to keep its stats bounded.
pub(crate) const CUT_MARKER: &str = "…[cut]";

/// How many members of an event object a repeated-keyless example keeps (the rest are dropped,
/// and a member `"…[cut]"` says how many).
const EXAMPLE_MEMBERS: usize = 32;

/// `s` if it is at most `max` bytes, else its first `max` bytes (at a character boundary)
/// followed by [`CUT_MARKER`].
pub(crate) fn cut_text(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT_MARKER}", &s[..end])
}

/// An example event with its strings (keys too) cut to [`LISTED_TEXT_BYTES`] and at most
/// [`EXAMPLE_MEMBERS`] members, so that an example costs a few KiB whatever the event.
fn cut_example(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(cut_text(&s, LISTED_TEXT_BYTES)),
        Value::Object(m) => {
            let total = m.len();
            let mut out: serde_json::Map<String, Value> = m
                .into_iter()
                .take(EXAMPLE_MEMBERS)
                .map(|(k, v)| (cut_text(&k, LISTED_TEXT_BYTES), cut_example(v)))
                .collect();
            if total > EXAMPLE_MEMBERS {
                out.insert(
                    CUT_MARKER.to_string(),
                    Value::String(format!("{} more members", total - EXAMPLE_MEMBERS)),
                );
            }
            Value::Object(out)
        }
        other => other,
    }
}

/// The sandbox's counters, as `GET /_sandbox/stats` serialises them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Requests to the API endpoints (`/v2/s2s/event` and `/v2/s2s/batch`), whatever the outcome.
    pub requests: u64,
    /// Events accepted (counted), across both endpoints: answered 200, or handled by a `slow` or
    /// `502` fault (counted, then answered late or 502).
    pub accepted_events: u64,
    /// Accepted events by `event_name`, for the first [`EVENT_NAMES`] (100) distinct names of
    /// at most [`EVENT_NAME_BYTES`] (128) bytes.
    pub by_event_name: BTreeMap<String, u64>,
    /// Accepted events whose name was not among the first 100 distinct names, or was longer
    /// than 128 bytes.
    #[serde(default)]
    pub other_event_names: u64,
    /// Accepted events evicted from the stored log (`--max-stored-events`); the log holds
    /// `accepted_events - evicted_events`, from index `evicted_events` on.
    #[serde(default)]
    pub evicted_events: u64,
    /// API responses by status code (a request hanging until the client gave up has none).
    pub by_status: BTreeMap<u16, u64>,
    /// Injected faults by kind (`400`, `401`, `404`, `413`, `429`, `500`, `502`, `503`, `504`,
    /// `timeout`, `slow`, `auth_fail_all`).
    pub injected_faults: BTreeMap<String, u64>,
    /// Transaction ids accepted more than once, with how many times each was accepted: only
    /// the first [`LISTED_DUPLICATE_IDS`] (1,000) ids seen duplicated, each cut to
    /// [`LISTED_TEXT_BYTES`] (256) bytes (ending `…[cut]`). An empty map does not mean no
    /// duplicates once the list is full: read [`Stats::duplicated_transaction_ids`].
    pub duplicate_transaction_ids: BTreeMap<String, u64>,
    /// How many distinct transaction ids were accepted more than once: exact, over every event.
    #[serde(default)]
    pub duplicated_transaction_ids: u64,
    /// How many acceptances repeated a transaction id accepted before (an id accepted 3 times
    /// counts 2): exact, over every event.
    #[serde(default)]
    pub duplicate_acceptances: u64,
    /// Accepted timestamps that look like the other unit (milliseconds where seconds are
    /// configured, or the reverse).
    pub suspicious_timestamps: SuspiciousTimestamps,
    /// Accepted timestamps outside the plausible window: before 2000-01-01 or more than a day
    /// after the sandbox's clock, in the configured unit (a date such as `20422`, days since
    /// 1970, sent as a time). The API accepts any integer (contract decision 3), so they are
    /// counted, not refused; the bridge refuses them (reason `time`), so for it this stays 0.
    #[serde(default)]
    pub implausible_timestamps: SuspiciousTimestamps,
    /// Extra acceptances of events without a `transaction_id`: an event identical to one accepted
    /// before (every field and custom property equal, in whatever order they were sent) counts one
    /// each time it is accepted again. The API does not deduplicate, so for the bridge this must
    /// stay 0.
    pub repeated_keyless_events: u64,
    /// The first few of those repeats.
    pub repeated_keyless_examples: Vec<RepeatedKeylessEvent>,
    /// Accepted requests by how many events each carried (both endpoints): how full the
    /// client's requests were.
    #[serde(default)]
    pub events_per_request: BTreeMap<u64, u64>,
}

/// An event without a `transaction_id` accepted again (an example in [`Stats`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepeatedKeylessEvent {
    /// Where the repeat is in the accepted-event log.
    pub index: u64,
    /// Where the first acceptance of the identical event is in the log.
    pub first_index: u64,
    /// The event, as the sandbox recorded it.
    pub event: serde_json::Value,
}

/// Accepted timestamps of one kind (in [`Stats`]): that look like the other unit, or that lie
/// outside the plausible window.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SuspiciousTimestamps {
    /// How many were accepted.
    pub count: u64,
    /// The first few, with their position in the accepted-event log.
    pub examples: Vec<SuspiciousTimestamp>,
}

impl SuspiciousTimestamps {
    /// Counts accepted event `index`, and keeps it as an example while there are few.
    fn count(&mut self, index: u64, e: &Event) {
        self.count += 1;
        if self.examples.len() < SUSPICIOUS_EXAMPLES {
            self.examples.push(SuspiciousTimestamp {
                index,
                event_name: cut_text(&e.event_name, LISTED_TEXT_BYTES),
                timestamp: e.timestamp,
            });
        }
    }
}

/// One suspicious or implausible timestamp (an example in [`SuspiciousTimestamps`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuspiciousTimestamp {
    /// Where the event is in the accepted-event log.
    pub index: u64,
    /// Its `event_name` (cut to 256 bytes, ending `…[cut]`).
    pub event_name: String,
    /// The timestamp as accepted.
    pub timestamp: i64,
}

/// The accepted events of one request, serialised (one JSON object and a newline each), ready to be
/// appended to the log. Built outside the lock.
pub(crate) struct AcceptedBatch {
    bytes: Bytes,
    /// (start, end) of each event's JSON in `bytes`, newline excluded.
    spans: Vec<(u32, u32)>,
    /// For each event without a `transaction_id`, the hash of its canonical form (see
    /// [`keyless_identity`]); `None` for events with one (counted by id instead).
    keyless: Vec<Option<u128>>,
}

impl AcceptedBatch {
    pub(crate) fn new(events: &[Event], size_hint: usize) -> AcceptedBatch {
        let mut buf = Vec::with_capacity(size_hint);
        let mut spans = Vec::with_capacity(events.len());
        let mut keyless = Vec::with_capacity(events.len());
        for e in events {
            let start = buf.len();
            e.write_json(&mut buf);
            spans.push((start as u32, buf.len() as u32));
            keyless.push(match e.transaction_id {
                Some(_) => None,
                None => Some(keyless_identity(e, &buf[start..])),
            });
            buf.push(b'\n');
        }
        buf.shrink_to_fit();
        AcceptedBatch {
            bytes: Bytes::from(buf),
            spans,
            keyless,
        }
    }
}

/// The identity of an event without a `transaction_id`: a 128-bit hash of its canonical JSON.
/// The recorded form (`json`, from [`Event::write_json`]) is already canonical in all but one
/// respect: the contract's fields come in a fixed order, `null` optional fields are dropped and
/// numbers are normalised (`50.00` and `50` are one amount); custom properties keep the order they
/// were parsed in, so they are sorted by name first when they are not already. (Parsed from a
/// `serde_json::Map` they usually are.) A hash rather than the JSON bounds the memory whatever an
/// event's size: a 24-byte map entry (hash and first index) plus the table's slack; two different
/// events share a hash with probability about n²/2¹²⁹.
fn keyless_identity(event: &Event, json: &[u8]) -> u128 {
    if event.properties.windows(2).all(|w| w[0].0 <= w[1].0) {
        return xxh3_128(json);
    }
    let mut sorted = event.clone();
    sorted.properties.sort();
    let mut canonical = Vec::with_capacity(json.len());
    sorted.write_json(&mut canonical);
    xxh3_128(&canonical)
}

/// Where a stored event lives: its request's chunk (a number counted from the first chunk ever
/// stored) and its span in that chunk.
#[derive(Clone, Copy)]
struct Slot {
    chunk: u32,
    start: u32,
    end: u32,
}

/// A 128-bit fingerprint (xxh3) as two words: 8-byte aligned, so a set entry is 16 bytes.
type Fingerprint = [u64; 2];

fn fingerprint(bytes: &[u8]) -> Fingerprint {
    split(xxh3_128(bytes))
}

fn split(h: u128) -> Fingerprint {
    [h as u64, (h >> 64) as u64]
}

/// The in-memory record. A stored event costs its compact JSON (~280 bytes) and a 12-byte slot,
/// and the log holds at most `max_stored` events and `max_stored_bytes` bytes of JSON;
/// every event ever accepted costs at most a fingerprint: 16 bytes (and the set's slack) per
/// distinct transaction id (32 for a duplicated one), 24 per distinct keyless event. Two distinct ids share a fingerprint
/// with probability about n²/2¹²⁹ (10⁻²⁶ at a million ids): the counts are exact in practice.
pub(crate) struct Record {
    unit: TimestampUnit,
    /// Most events kept in the log (at least the most events in one request).
    max_stored: usize,
    /// Most bytes of event JSON kept in the log (the newest request is kept whatever its size).
    max_stored_bytes: usize,
    /// Bytes of event JSON the log holds now (the chunks' lengths).
    stored_bytes: usize,
    /// The stored requests' JSON, oldest first, with how many events each holds.
    chunks: VecDeque<(Bytes, u32)>,
    /// The number of the chunk at the front of `chunks`.
    first_chunk: u32,
    slots: VecDeque<Slot>,
    /// The fingerprint of every transaction id accepted.
    seen_ids: HashSet<Fingerprint>,
    /// The fingerprint of every transaction id accepted more than once.
    duplicated_ids: HashSet<Fingerprint>,
    /// The first [`LISTED_DUPLICATE_IDS`] duplicated ids → their text (cut) and times accepted.
    listed_duplicates: HashMap<Fingerprint, (Box<str>, u64)>,
    /// Identity of each event without a transaction id accepted so far → its first log index.
    seen_keyless: HashMap<Fingerprint, u64>,
    stats: Stats,
    file: Option<mpsc::Sender<Bytes>>,
}

impl Record {
    /// An empty record keeping at most `max_stored` events (at least 1) and `max_stored_bytes`
    /// bytes of their JSON (at least the newest request's).
    pub(crate) fn new(
        unit: TimestampUnit,
        max_stored: usize,
        max_stored_bytes: usize,
        file: Option<mpsc::Sender<Bytes>>,
    ) -> Record {
        Record {
            unit,
            max_stored: max_stored.max(1),
            max_stored_bytes,
            stored_bytes: 0,
            chunks: VecDeque::new(),
            first_chunk: 0,
            slots: VecDeque::new(),
            seen_ids: HashSet::new(),
            duplicated_ids: HashSet::new(),
            listed_duplicates: HashMap::new(),
            seen_keyless: HashMap::new(),
            stats: Stats::default(),
            file,
        }
    }

    pub(crate) fn count_request(&mut self) {
        self.stats.requests += 1;
    }

    pub(crate) fn count_status(&mut self, status: u16) {
        *self.stats.by_status.entry(status).or_default() += 1;
    }

    pub(crate) fn count_injected(&mut self, kind: &str) {
        *self.stats.injected_faults.entry(kind.to_string()).or_default() += 1;
    }

    /// Appends the accepted events (already validated) to the log, the counters and the file.
    pub(crate) fn accept(&mut self, events: &[Event], batch: AcceptedBatch) {
        let chunk = self.first_chunk.wrapping_add(self.chunks.len() as u32);
        // One clock reading for the request.
        let now = time_window::now_nanos();
        for ((e, &(start, end)), keyless) in events.iter().zip(&batch.spans).zip(&batch.keyless) {
            let index = self.stats.accepted_events;
            self.stats.accepted_events += 1;
            self.slots.push_back(Slot { chunk, start, end });
            if let Some(n) = self.stats.by_event_name.get_mut(e.event_name.as_ref()) {
                *n += 1;
            } else if self.stats.by_event_name.len() < EVENT_NAMES && e.event_name.len() <= EVENT_NAME_BYTES {
                self.stats.by_event_name.insert(e.event_name.to_string(), 1);
            } else {
                self.stats.other_event_names += 1;
            }
            if let Some(id) = &e.transaction_id {
                let fp = fingerprint(id.as_bytes());
                if !self.seen_ids.insert(fp) {
                    // Seen before: the first acceptance was one, this one another.
                    self.stats.duplicate_acceptances += 1;
                    if self.duplicated_ids.insert(fp) {
                        self.stats.duplicated_transaction_ids += 1;
                    }
                    if let Some((_, n)) = self.listed_duplicates.get_mut(&fp) {
                        *n += 1;
                    } else if self.listed_duplicates.len() < LISTED_DUPLICATE_IDS
                        && self.stats.duplicated_transaction_ids <= LISTED_DUPLICATE_IDS as u64
                    {
                        // Listed from its second acceptance only if it is among the first
                        // ids seen duplicated (its count then stays exact).
                        self.listed_duplicates
                            .insert(fp, (cut_text(id, LISTED_TEXT_BYTES).into(), 2));
                    }
                }
            }
            if let Some(identity) = keyless {
                match self.seen_keyless.entry(split(*identity)) {
                    Entry::Vacant(v) => {
                        v.insert(index);
                    }
                    Entry::Occupied(o) => {
                        self.stats.repeated_keyless_events += 1;
                        let examples = &mut self.stats.repeated_keyless_examples;
                        if examples.len() < REPEATED_KEYLESS_EXAMPLES {
                            examples.push(RepeatedKeylessEvent {
                                index,
                                first_index: *o.get(),
                                event: cut_example(
                                    serde_json::from_slice(&batch.bytes[start as usize..end as usize])
                                        .expect("the sandbox's own JSON parses"),
                                ),
                            });
                        }
                    }
                }
            }
            if self.unit.looks_like_other_unit(e.timestamp) {
                self.stats.suspicious_timestamps.count(index, e);
            }
            if !TimeWindow::DEFAULT.contains_in(e.timestamp, self.unit, now) {
                self.stats.implausible_timestamps.count(index, e);
            }
        }
        *self.stats.events_per_request.entry(events.len() as u64).or_default() += 1;
        if let Some(tx) = &self.file {
            // Sent under the lock so that the file has the log's order. The writer thread only
            // goes away when the file failed, and then it has said so.
            if tx.send(batch.bytes.clone()).is_err() {
                self.file = None;
            }
        }
        self.stored_bytes += batch.bytes.len();
        self.chunks.push_back((batch.bytes, events.len() as u32));
        // Evict the oldest requests whole, by count and by bytes; the newest always stays (it
        // is at most --max-batch-events, which start-up keeps at or below the cap, and at most
        // about --max-body-bytes, kept at or below --max-stored-bytes).
        while (self.slots.len() > self.max_stored || self.stored_bytes > self.max_stored_bytes) && self.chunks.len() > 1
        {
            let (bytes, n) = self.chunks.pop_front().expect("more than one chunk");
            self.stored_bytes -= bytes.len();
            self.first_chunk = self.first_chunk.wrapping_add(1);
            self.slots.drain(..n as usize);
            self.stats.evicted_events += u64::from(n);
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        for (id, n) in self.listed_duplicates.values() {
            // Two ids cut to the same text share an entry.
            *s.duplicate_transaction_ids.entry(id.to_string()).or_default() += n;
        }
        s
    }

    /// How many events the log holds now.
    pub(crate) fn stored(&self) -> usize {
        self.slots.len()
    }

    /// How many events were accepted in all.
    pub(crate) fn accepted(&self) -> u64 {
        self.stats.accepted_events
    }

    /// The log index of the oldest stored event (how many were evicted).
    pub(crate) fn first_stored(&self) -> u64 {
        self.stats.evicted_events
    }

    /// The JSON of the `i`th stored event (0 is the oldest stored).
    pub(crate) fn stored_event(&self, i: usize) -> &[u8] {
        let s = self.slots[i];
        let chunk = &self.chunks[s.chunk.wrapping_sub(self.first_chunk) as usize].0;
        &chunk[s.start as usize..s.end as usize]
    }

    /// A JSON array of the stored events with log indexes `offset..offset+limit` (indexes
    /// count every event accepted; evicted ones are skipped), and the log index to ask for
    /// next. The page stops early, after at least one event, once it holds `max_bytes` bytes
    /// or would pass them: then the next index is below `offset+limit`.
    pub(crate) fn events_json(&self, offset: u64, limit: usize, max_bytes: usize) -> (Vec<u8>, u64) {
        let from = offset.saturating_sub(self.first_stored()).min(self.stored() as u64) as usize;
        let to = from.saturating_add(limit).min(self.stored());
        let mut out = Vec::with_capacity((2 + (to - from) * 256).min(max_bytes.saturating_add(2)));
        out.push(b'[');
        let mut next = from;
        for i in from..to {
            let event = self.stored_event(i);
            if i > from && out.len() + 1 + event.len() + 1 > max_bytes {
                break;
            }
            if i > from {
                out.push(b',');
            }
            out.extend_from_slice(event);
            next = i + 1;
        }
        out.push(b']');
        (out, self.first_stored() + next as u64)
    }

    /// Forgets everything in memory; the file, being append-only, is left as it is.
    pub(crate) fn reset(&mut self) {
        let file = self.file.take();
        *self = Record::new(self.unit, self.max_stored, self.max_stored_bytes, file);
    }

    /// Stops feeding the file writer so that it finishes.
    pub(crate) fn close_file(&mut self) {
        self.file = None;
    }
}

/// Opens (appending) the record file and starts the thread that writes it, so that request
/// handling never waits on the disk. The thread flushes whenever it has caught up and ends when
/// the sender is dropped.
pub(crate) fn spawn_file_writer(
    path: &Path,
) -> Result<(mpsc::Sender<Bytes>, std::thread::JoinHandle<()>), SandboxError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| SandboxError::RecordFile {
            path: path.to_path_buf(),
            source,
        })?;
    let (tx, rx) = mpsc::channel::<Bytes>();
    let shown = path.display().to_string();
    let handle = std::thread::Builder::new()
        .name("sandbox-record".into())
        .spawn(move || {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            let write = |chunk: &Bytes, out: &mut std::io::BufWriter<std::fs::File>| {
                out.write_all(chunk).map_err(|e| {
                    tracing::error!("sandbox: writing the record file {shown} failed, recording stops: {e}")
                })
            };
            while let Ok(chunk) = rx.recv() {
                if write(&chunk, &mut out).is_err() {
                    return;
                }
                while let Ok(chunk) = rx.try_recv() {
                    if write(&chunk, &mut out).is_err() {
                        return;
                    }
                }
                if let Err(e) = out.flush() {
                    tracing::error!("sandbox: flushing the record file failed, recording stops: {e}");
                    return;
                }
            }
        })
        .map_err(SandboxError::WriterThread)?;
    Ok((tx, handle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(v: serde_json::Value) -> Event<'static> {
        Event::from_json(v.as_object().unwrap()).unwrap().into_owned()
    }

    #[test]
    fn log_counts_duplicates_and_suspicious_timestamps() {
        let mut r = Record::new(TimestampUnit::Seconds, 1000, usize::MAX, None);
        let a = ev(json!({"client_user_id":"u","event_name":"deposit","timestamp":1702963200,"transaction_id":"t1"}));
        let b = ev(json!({"client_user_id":"u","event_name":"login","timestamp":1702963200000i64}));
        let events = vec![a.clone(), b];
        r.accept(&events, AcceptedBatch::new(&events, 0));
        r.accept(
            std::slice::from_ref(&a),
            AcceptedBatch::new(std::slice::from_ref(&a), 0),
        );
        let s = r.stats();
        assert_eq!(s.accepted_events, 3);
        assert_eq!(s.by_event_name["deposit"], 2);
        assert_eq!(s.duplicate_transaction_ids["t1"], 2);
        assert_eq!(s.suspicious_timestamps.count, 1);
        assert_eq!(s.suspicious_timestamps.examples[0].index, 1);
        let all: Vec<serde_json::Value> = serde_json::from_slice(&r.events_json(0, usize::MAX, usize::MAX).0).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[1]["event_name"], "login");
        let page: Vec<serde_json::Value> = serde_json::from_slice(&r.events_json(2, 5, usize::MAX).0).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(r.events_json(7, 5, usize::MAX).0, b"[]");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Stats>(&json).unwrap(), s);
        r.reset();
        assert_eq!(r.stats(), Stats::default());
    }

    fn accept_each(r: &mut Record, events: &[Event]) {
        r.accept(events, AcceptedBatch::new(events, 0));
    }

    #[test]
    fn identical_keyless_events_accepted_again_are_counted_with_examples() {
        let mut r = Record::new(TimestampUnit::Seconds, 1000, usize::MAX, None);
        let login = |click: &str| {
            ev(
                json!({"client_user_id":"u1","event_name":"login","timestamp":1702963200,
                      "click_id":click,"ip_address":"203.0.113.7","campaign":"spring","src":"web"}),
            )
        };
        let deposit = ev(
            json!({"client_user_id":"u1","event_name":"deposit","timestamp":1702963200,
                                "transaction_id":"t1","amount":5.0,"currency":"EUR"}),
        );
        // Distinct keyless events (one property apart) and a keyed event: no repeat.
        accept_each(&mut r, &[login("c1"), login("c2"), deposit.clone()]);
        assert_eq!(r.stats().repeated_keyless_events, 0);
        // The first login again, its custom properties in the other order: a repeat of index 0.
        let mut reordered = login("c1");
        reordered.properties.reverse();
        assert_ne!(reordered.properties, login("c1").properties);
        accept_each(&mut r, &[reordered]);
        // A keyed event again is a duplicate id, not a keyless repeat.
        accept_each(&mut r, std::slice::from_ref(&deposit));
        let s = r.stats();
        assert_eq!(s.repeated_keyless_events, 1);
        assert_eq!(s.duplicate_transaction_ids["t1"], 2);
        assert_eq!(s.repeated_keyless_examples.len(), 1);
        let ex = &s.repeated_keyless_examples[0];
        assert_eq!((ex.index, ex.first_index), (3, 0));
        assert_eq!(ex.event["click_id"], "c1");
        assert_eq!(ex.event["campaign"], "spring");
        // A third acceptance counts again (extra acceptances, not distinct events).
        accept_each(&mut r, &[login("c1")]);
        assert_eq!(r.stats().repeated_keyless_events, 2);
        assert_eq!(r.stats().repeated_keyless_examples[1].first_index, 0);

        // Every repeat is counted, the examples stop at REPEATED_KEYLESS_EXAMPLES.
        let many: Vec<Event> = (0..30).map(|_| login("c2")).collect();
        accept_each(&mut r, &many);
        let s = r.stats();
        assert_eq!(s.repeated_keyless_events, 32);
        assert_eq!(s.repeated_keyless_examples.len(), REPEATED_KEYLESS_EXAMPLES);
        assert_eq!(s.repeated_keyless_examples[2].first_index, 1);
        assert_eq!(s.accepted_events, 36);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Stats>(&json).unwrap(), s);

        r.reset();
        accept_each(&mut r, &[login("c1")]);
        assert_eq!(
            r.stats().repeated_keyless_events,
            0,
            "reset forgets the keyless identities"
        );
    }

    /// The log keeps the newest requests under the cap; the counters, duplicate ids and keyless
    /// repeats stay exact over every event, evicted or not; names past the 100th are "other".
    #[test]
    fn the_log_is_capped_and_the_counters_stay_exact() {
        let mut r = Record::new(TimestampUnit::Seconds, 10, usize::MAX, None);
        let keyed = |i: u64, name: &str| {
            ev(json!({"client_user_id":"u","event_name":name,"timestamp":1702963200,
                      "transaction_id":format!("t{i}")}))
        };
        let keyless = ev(json!({"client_user_id":"u","event_name":"login","timestamp":1702963200}));
        // 30 requests of 4 events: t0..t119, names n0..n119 (so 20 past the cap of names).
        for req in 0..30u64 {
            let events: Vec<Event> = (0..4)
                .map(|i| keyed(req * 4 + i, &format!("n{}", req * 4 + i)))
                .collect();
            accept_each(&mut r, &events);
        }
        accept_each(&mut r, std::slice::from_ref(&keyless));
        // Every id again (all evicted from the log by now), and the keyless event again.
        for req in 0..30u64 {
            let events: Vec<Event> = (0..4).map(|i| keyed(req * 4 + i, "n0")).collect();
            accept_each(&mut r, &events);
        }
        accept_each(&mut r, std::slice::from_ref(&keyless));
        let s = r.stats();
        assert_eq!(s.accepted_events, 242);
        assert_eq!(s.duplicate_transaction_ids.len(), 120);
        assert!(s.duplicate_transaction_ids.values().all(|&n| n == 2));
        assert_eq!(s.repeated_keyless_events, 1);
        assert_eq!(s.repeated_keyless_examples[0].first_index, 120);
        assert_eq!(s.by_event_name.len(), EVENT_NAMES);
        // n100..n119, and the two logins (a name first seen after the cap).
        assert_eq!(s.other_event_names, 22);
        assert_eq!(
            s.by_event_name["n0"], 121,
            "a name already counted goes on being counted"
        );
        // At most 10 stored, whole requests: the last three (4 + 4 + 1 = 9), from index 233.
        assert_eq!(r.stored(), 9);
        assert_eq!(s.evicted_events, 233);
        assert_eq!(r.first_stored(), 233);
        let stored: Vec<serde_json::Value> =
            serde_json::from_slice(&r.events_json(0, usize::MAX, usize::MAX).0).unwrap();
        assert_eq!(stored.len(), 9);
        assert_eq!(stored[0]["transaction_id"], "t112");
        assert_eq!(stored[8]["event_name"], "login");
        assert_eq!(stored[0]["event_name"], "n0");
        let page: Vec<serde_json::Value> = serde_json::from_slice(&r.events_json(240, 5, usize::MAX).0).unwrap();
        assert_eq!(page.len(), 2);
        assert_eq!(page[0]["transaction_id"], "t119");
    }

    /// The log is evicted by bytes as well as by count, and a page stops at its byte budget;
    /// the counters stay exact.
    #[test]
    fn the_log_and_a_page_are_capped_by_bytes() {
        let mut r = Record::new(TimestampUnit::Seconds, 1000, 50_000, None);
        let big = |i: u64| {
            ev(
                json!({"client_user_id":"u","event_name":"deposit","timestamp":1702963200,
                      "transaction_id":format!("t{i}"),"meta":"x".repeat(10_000)}),
            )
        };
        for i in 0..20 {
            accept_each(&mut r, &[big(i)]);
        }
        // About 10 KB an event: 4 fit 50,000 bytes.
        assert_eq!(r.stored(), 4);
        assert!(r.stored_bytes <= 50_000);
        assert_eq!(r.stats().accepted_events, 20);
        assert_eq!(r.stats().evicted_events, 16);
        // A request larger than the budget is still kept (alone).
        accept_each(&mut r, &[big(20), big(21), big(22), big(23), big(24), big(25)]);
        assert_eq!(r.stored(), 6);
        // A page of 25,000 bytes holds 2 events; the next offset says where to go on.
        let (page, next) = r.events_json(0, 100, 25_000);
        let page: Vec<serde_json::Value> = serde_json::from_slice(&page).unwrap();
        assert_eq!(page.len(), 2);
        assert_eq!(page[0]["transaction_id"], "t20");
        assert_eq!(next, 22);
        // One event larger than the budget still makes a page.
        let (page, next) = r.events_json(22, 100, 10);
        assert_eq!(
            serde_json::from_slice::<Vec<serde_json::Value>>(&page).unwrap().len(),
            1
        );
        assert_eq!(next, 23);
        assert_eq!(r.events_json(26, 100, 10), (b"[]".to_vec(), 26));
    }

    /// Duplicated ids are counted exactly; the first 1,000 are listed, each cut to 256 bytes.
    /// Long event names are "other"; long names in examples are cut.
    #[test]
    fn duplicates_are_counted_exactly_and_listed_up_to_a_cap() {
        let mut r = Record::new(TimestampUnit::Seconds, 100, usize::MAX, None);
        let keyed = |id: String| {
            ev(
                json!({"client_user_id":"u","event_name":"deposit","timestamp":1702963200,
                      "transaction_id":id}),
            )
        };
        let long = "L".repeat(5_000);
        for round in 0..3 {
            let mut events: Vec<Event> = (0..1_500).map(|i| keyed(format!("t{i}"))).collect();
            events.push(keyed(long.clone()));
            accept_each(&mut r, &events);
            if round == 0 {
                assert_eq!(r.stats().duplicated_transaction_ids, 0);
            }
        }
        let s = r.stats();
        assert_eq!(s.duplicated_transaction_ids, 1_501);
        assert_eq!(s.duplicate_acceptances, 2 * 1_501);
        assert_eq!(s.duplicate_transaction_ids.len(), LISTED_DUPLICATE_IDS);
        assert!(s.duplicate_transaction_ids.values().all(|&n| n == 3));
        assert_eq!(s.duplicate_transaction_ids["t0"], 3);
        // The long id is the 1,501st seen duplicated: counted, not listed.
        assert!(s
            .duplicate_transaction_ids
            .keys()
            .all(|k| k.len() <= LISTED_TEXT_BYTES + CUT_MARKER.len()));
        // Listed and cut when among the first.
        let mut r = Record::new(TimestampUnit::Seconds, 100, usize::MAX, None);
        accept_each(&mut r, &[keyed(long.clone()), keyed(long.clone())]);
        let s = r.stats();
        let (k, n) = s.duplicate_transaction_ids.iter().next().unwrap();
        assert_eq!(*n, 2);
        assert_eq!(k, &format!("{}{CUT_MARKER}", "L".repeat(LISTED_TEXT_BYTES)));

        // A name longer than 128 bytes is "other"; an example's name is cut.
        let name = "n".repeat(100_000);
        let e = ev(json!({"client_user_id":"u","event_name":name,"timestamp":1702963200000i64}));
        accept_each(&mut r, &[e.clone(), e]);
        let s = r.stats();
        assert_eq!(s.other_event_names, 2);
        assert_eq!(s.by_event_name.len(), 1);
        assert_eq!(s.suspicious_timestamps.count, 2);
        assert!(s.suspicious_timestamps.examples[0].event_name.len() <= LISTED_TEXT_BYTES + CUT_MARKER.len());
        assert_eq!(s.repeated_keyless_events, 1);
        let ex = s.repeated_keyless_examples[0].event["event_name"].as_str().unwrap();
        assert!(ex.ends_with(CUT_MARKER));
        assert!(serde_json::to_vec(&s).unwrap().len() < 64 * 1024);
    }

    #[test]
    fn keyless_identity_is_the_whole_event_whatever_its_key_order() {
        let base = json!({"client_user_id":"u1","event_name":"register","timestamp":1702963200,
                          "click_id":"c1","ip_address":"203.0.113.7","a":"1","b":"2"});
        let id = |v: &serde_json::Value| {
            let e = ev(v.clone());
            let mut buf = Vec::new();
            e.write_json(&mut buf);
            keyless_identity(&e, &buf)
        };
        let same = id(&base);
        // Every field takes part: change any one and it is another event.
        for (k, v) in [
            ("client_user_id", json!("u2")),
            ("event_name", json!("login")),
            ("timestamp", json!(1702963201)),
            ("click_id", json!("c2")),
            ("ip_address", json!("203.0.113.8")),
            ("a", json!("x")),
            ("user_agent", json!("curl")),
        ] {
            let mut other = base.clone();
            other[k] = v;
            assert_ne!(id(&other), same, "{k} takes part in the identity");
        }
        // A null optional field is the field left out, as the API reads it.
        let mut with_null = base.clone();
        with_null["user_agent"] = serde_json::Value::Null;
        assert_eq!(id(&with_null), same);
        // Properties out of order (built by hand: a serde_json map hands them over sorted).
        let mut e = ev(base.clone());
        e.properties.swap(0, 1);
        let mut buf = Vec::new();
        e.write_json(&mut buf);
        assert_eq!(keyless_identity(&e, &buf), same);
    }
}
