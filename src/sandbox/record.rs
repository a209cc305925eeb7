//! What the sandbox accepted: every accepted event (in order, compactly), the counters behind
//! `GET /_sandbox/stats`, and the optional append-only JSONL file.

use super::SandboxError;
use crate::event::time_window::{self, TimeWindow};
use crate::event::{Event, TimestampUnit};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use xxhash_rust::xxh3::xxh3_128;

/// How many suspicious timestamps are kept as examples (all are counted).
const SUSPICIOUS_EXAMPLES: usize = 20;

/// How many repeated keyless events are kept as examples (all are counted).
const REPEATED_KEYLESS_EXAMPLES: usize = 20;

/// The sandbox's counters, as `GET /_sandbox/stats` serialises them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Requests to the API endpoints (`/v2/s2s/event` and `/v2/s2s/batch`), whatever the outcome.
    pub requests: u64,
    /// Events accepted (counted), across both endpoints: answered 200, or handled by a `slow` or
    /// `502` fault (counted, then answered late or 502).
    pub accepted_events: u64,
    /// Accepted events by `event_name`.
    pub by_event_name: BTreeMap<String, u64>,
    /// API responses by status code (a request hanging until the client gave up has none).
    pub by_status: BTreeMap<u16, u64>,
    /// Injected faults by kind (`400`, `401`, `404`, `413`, `429`, `500`, `502`, `503`, `504`,
    /// `timeout`, `slow`, `auth_fail_all`).
    pub injected_faults: BTreeMap<String, u64>,
    /// Transaction ids accepted more than once, with how many times each was accepted.
    pub duplicate_transaction_ids: BTreeMap<String, u64>,
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
                event_name: e.event_name.to_string(),
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
    /// Its `event_name`.
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

/// Where event `i` of the log lives: chunk index and span in that chunk.
#[derive(Clone, Copy)]
struct Slot {
    chunk: u32,
    start: u32,
    end: u32,
}

/// The in-memory record. About 300 bytes an event: the compact JSON, a 12-byte slot and the
/// transaction-id map entry, or for an event without a transaction id the identity map entry.
pub(crate) struct Record {
    unit: TimestampUnit,
    chunks: Vec<Bytes>,
    slots: Vec<Slot>,
    /// Transaction id → times accepted.
    seen_ids: HashMap<Box<str>, u64>,
    duplicates: HashMap<Box<str>, u64>,
    /// Identity of each event without a transaction id accepted so far → its first log index.
    seen_keyless: HashMap<u128, u64>,
    stats: Stats,
    file: Option<mpsc::Sender<Bytes>>,
}

impl Record {
    pub(crate) fn new(unit: TimestampUnit, file: Option<mpsc::Sender<Bytes>>) -> Record {
        Record {
            unit,
            chunks: Vec::new(),
            slots: Vec::new(),
            seen_ids: HashMap::new(),
            duplicates: HashMap::new(),
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
        let chunk = self.chunks.len() as u32;
        // One clock reading for the request.
        let now = time_window::now_nanos();
        for ((e, &(start, end)), keyless) in events.iter().zip(&batch.spans).zip(&batch.keyless) {
            let index = self.slots.len() as u64;
            self.slots.push(Slot { chunk, start, end });
            if let Some(n) = self.stats.by_event_name.get_mut(e.event_name.as_ref()) {
                *n += 1;
            } else {
                self.stats.by_event_name.insert(e.event_name.to_string(), 1);
            }
            if let Some(id) = &e.transaction_id {
                let n = match self.seen_ids.get_mut(id.as_ref()) {
                    Some(n) => {
                        *n += 1;
                        *n
                    }
                    None => {
                        self.seen_ids.insert(id.as_ref().into(), 1);
                        1
                    }
                };
                if n > 1 {
                    self.duplicates.insert(id.as_ref().into(), n);
                }
            }
            if let Some(identity) = keyless {
                match self.seen_keyless.entry(*identity) {
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
                                event: serde_json::from_slice(&batch.bytes[start as usize..end as usize])
                                    .expect("the sandbox's own JSON parses"),
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
        self.stats.accepted_events += events.len() as u64;
        *self.stats.events_per_request.entry(events.len() as u64).or_default() += 1;
        if let Some(tx) = &self.file {
            // Sent under the lock so that the file has the log's order. The writer thread only
            // goes away when the file failed, and then it has said so.
            if tx.send(batch.bytes.clone()).is_err() {
                self.file = None;
            }
        }
        self.chunks.push(batch.bytes);
    }

    pub(crate) fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.duplicate_transaction_ids = self.duplicates.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        s
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The JSON of accepted event `i`.
    pub(crate) fn event(&self, i: usize) -> &[u8] {
        let s = self.slots[i];
        &self.chunks[s.chunk as usize][s.start as usize..s.end as usize]
    }

    /// A JSON array of the accepted events `offset..offset+limit`.
    pub(crate) fn events_json(&self, offset: usize, limit: usize) -> Vec<u8> {
        let from = offset.min(self.len());
        let to = from.saturating_add(limit).min(self.len());
        let mut out = Vec::with_capacity(2 + (to - from) * 256);
        out.push(b'[');
        for i in from..to {
            if i > from {
                out.push(b',');
            }
            out.extend_from_slice(self.event(i));
        }
        out.push(b']');
        out
    }

    /// Forgets everything in memory; the file, being append-only, is left as it is.
    pub(crate) fn reset(&mut self) {
        let file = self.file.take();
        *self = Record::new(self.unit, file);
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
        let mut r = Record::new(TimestampUnit::Seconds, None);
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
        let all: Vec<serde_json::Value> = serde_json::from_slice(&r.events_json(0, usize::MAX)).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[1]["event_name"], "login");
        let page: Vec<serde_json::Value> = serde_json::from_slice(&r.events_json(2, 5)).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(r.events_json(7, 5), b"[]");
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
        let mut r = Record::new(TimestampUnit::Seconds, None);
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
