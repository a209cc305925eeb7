//! The ledger of a chaos or broker-fault run: a seeded generator of partner records (valid ones,
//! duplicates of earlier valid ones, invalid ones) that remembers what it produced, and the
//! accounting that compares it with what the API accepted and what was dead-lettered.
//! Shared by `tests/chaos.rs` (tansu, processes) and `tests/broker_faults.rs` (mock cluster,
//! in-process).
#![allow(dead_code)]

use crate::common::header;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// An invalid record kind and the dead-letter reason (`dp.reason`) the bridge must give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    NotJson,
    BadCurrency,
    MissingAmount,
}

impl Invalid {
    /// `(dp.stage, dp.reason)` expected on the dead letter.
    pub fn expected(self) -> (&'static str, &'static str) {
        match self {
            Invalid::NotJson => ("mapping", "not_json"),
            Invalid::BadCurrency => ("validation", "currency"),
            Invalid::MissingAmount => ("validation", "financial_fields"),
        }
    }
}

/// What was produced: `(partition, key, value)` in production order, and what each must become.
pub struct Ledger {
    pub rng: StdRng,
    pub partitions: i32,
    pub prefix: String,
    pub records: Vec<(i32, String, String)>,
    /// Valid transaction ids, with the partition of their first copy and their payload.
    pub valid: Vec<(String, i32, String)>,
    /// Copies of valid records produced again (same transaction id and payload).
    pub duplicates: usize,
    /// Copies placed on a partition other than the original's.
    pub cross_partition_duplicates: usize,
    /// Invalid records by Kafka key.
    pub invalid: BTreeMap<String, Invalid>,
}

/// A valid flat deposit (the shape of the harness's test mapping: `/user`, `/type`, `/ts`, `/tx`,
/// `/amount`, `/ccy`, `/click`, `/ip`).
pub fn deposit(tx: &str, n: u64) -> serde_json::Value {
    serde_json::json!({
        "user": format!("u{}", n % 500), "type": "deposit", "ts": 1_764_000_000 + (n % 86_400) as i64,
        "tx": tx, "amount": 10.5 + (n % 100) as f64, "ccy": "EUR", "click": format!("c{n}"), "ip": "203.0.113.7"
    })
}

impl Ledger {
    pub fn new(seed: u64, partitions: i32, prefix: &str) -> Ledger {
        Ledger {
            rng: StdRng::seed_from_u64(seed),
            partitions,
            prefix: prefix.to_string(),
            records: Vec::new(),
            valid: Vec::new(),
            duplicates: 0,
            cross_partition_duplicates: 0,
            invalid: BTreeMap::new(),
        }
    }

    /// Generates the next record (about 65% new valid deposits, 15% new keyless events, 10%
    /// duplicates of deposits, 10% invalid), records it in the ledger and returns
    /// `(partition, key, value)`. A keyless event (a registration or a login, no `transaction_id`)
    /// has its Kafka key as its unique click id: the ledger's id for it, as `accepted_ids` gives.
    pub fn next_record(&mut self) -> (i32, String, String) {
        let n = self.records.len() as u64;
        let roll = self.rng.random_range(0..100);
        let keyed = |v: &(String, i32, String)| v.2.contains("\"tx\"");
        let rec = if roll < 10 && self.valid.iter().any(keyed) {
            // Copies are of deposits only: two records of one keyless event are two events.
            let (tx, p, value) = loop {
                let j = self.rng.random_range(0..self.valid.len());
                if keyed(&self.valid[j]) {
                    break self.valid[j].clone();
                }
            };
            let q = if self.partitions > 1 && self.rng.random_bool(0.5) {
                (p + 1 + self.rng.random_range(0..self.partitions - 1)) % self.partitions
            } else {
                p
            };
            self.duplicates += 1;
            if q != p {
                self.cross_partition_duplicates += 1;
            }
            (q, tx, value)
        } else if roll < 20 {
            let p = self.rng.random_range(0..self.partitions);
            let kind = match roll % 3 {
                0 => Invalid::NotJson,
                1 => Invalid::BadCurrency,
                _ => Invalid::MissingAmount,
            };
            let key = format!("{}-bad-{n}", self.prefix);
            let value = match kind {
                Invalid::NotJson => format!("{{\"tx\": \"{key}\", not json"),
                Invalid::BadCurrency => {
                    let mut v = deposit(&key, n);
                    v["ccy"] = "euro".into();
                    v.to_string()
                }
                Invalid::MissingAmount => {
                    let mut v = deposit(&key, n);
                    v.as_object_mut().expect("an object").remove("amount");
                    v.to_string()
                }
            };
            self.invalid.insert(key.clone(), kind);
            (p, key, value)
        } else if roll < 35 {
            let p = self.rng.random_range(0..self.partitions);
            let key = format!("{}-k{n}", self.prefix);
            let name = if n % 2 == 0 { "register" } else { "login" };
            let value = crate::common::keyless(name, &key, n as u32);
            self.valid.push((key.clone(), p, value.clone()));
            (p, key, value)
        } else {
            let p = self.rng.random_range(0..self.partitions);
            let tx = format!("{}-{n}", self.prefix);
            let value = deposit(&tx, n).to_string();
            self.valid.push((tx.clone(), p, value.clone()));
            (p, tx, value)
        };
        self.records.push(rec.clone());
        rec
    }

    /// Records produced per partition: the end offsets of a topic that started empty.
    pub fn ends(&self) -> Vec<i64> {
        let mut ends = vec![0i64; self.partitions as usize];
        for (p, _, _) in &self.records {
            ends[*p as usize] += 1;
        }
        ends
    }

    /// Where the records with Kafka key `key` are: `partition/offset` of each copy.
    pub fn positions(&self, key: &str) -> Vec<String> {
        let mut next = vec![0i64; self.partitions as usize];
        let mut out = Vec::new();
        for (p, k, _) in &self.records {
            if k == key {
                out.push(format!("{p}/{}", next[*p as usize]));
            }
            next[*p as usize] += 1;
        }
        out
    }

    pub fn summary(&self) -> String {
        format!(
            "{} records: {} valid ids, {} duplicates ({} on another partition), {} invalid",
            self.records.len(),
            self.valid.len(),
            self.duplicates,
            self.cross_partition_duplicates,
            self.invalid.len()
        )
    }
}

/// A dead letter as the accounting needs it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: String,
    pub stage: String,
    pub reason: String,
    pub source: String,
}

/// Every record of `topic`, read from the beginning with a fresh group until at least `expected`
/// arrived and nothing more came for `quiet`, or `timeout` passed.
pub fn read_dead_letters(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<DeadLetter> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("dlq-reader-{}-{}", std::process::id(), rand::random::<u32>()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("a dead-letter reader");
    consumer
        .subscribe(&[topic])
        .expect("subscribe to the dead-letter topic");
    let start = Instant::now();
    let mut last = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < timeout && (out.len() < expected || last.elapsed() < quiet) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let m = m.detach();
            last = Instant::now();
            out.push(DeadLetter {
                key: m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default(),
                stage: header(&m, "dp.stage"),
                reason: header(&m, "dp.reason"),
                source: format!(
                    "{}/{}/{}",
                    header(&m, "dp.source.topic"),
                    header(&m, "dp.source.partition"),
                    header(&m, "dp.source.offset")
                ),
            });
        }
    }
    out
}

/// What the accounting found.
#[derive(Debug, Default)]
pub struct Accounting {
    /// Problems that break the promise (loss, double sends, wrong reasons): the test fails.
    pub problems: Vec<String>,
    /// Records dead-lettered more than once: key → copies (a failure: the bridge claims dead
    /// letters by coordinates, and looks a lapsed claim up in the topic before writing again).
    pub repeated_dead_letters: BTreeMap<String, usize>,
    /// Valid ids dead-lettered as `in_doubt` (stage `dedupe`: in flight in a process that was
    /// killed; stage `api`: a request answered ambiguously), with whether the API had accepted
    /// them (the request was counted) or not.
    pub in_doubt: Vec<(String, bool)>,
}

/// Compares the ledger with the API's record (`accepted`: transaction id → times accepted) and the
/// dead letters.
/// Per-partition order (invariant 7): the ids of each partition reached the API in the order they
/// were produced there. `accepted` is the API's log of transaction ids in arrival order; a second
/// arrival of an id is left to [`account`]'s count, and ids produced on several partitions are
/// left out (which copy arrives first is a race between partitions).
pub fn order_problem(ledger: &Ledger, accepted: &[String]) -> Option<String> {
    // Id → (partition, offset of its first copy there); None when it was produced on several.
    let mut at: HashMap<&str, Option<(usize, usize)>> = HashMap::new();
    let mut next = vec![0usize; ledger.partitions as usize];
    for (p, k, _) in &ledger.records {
        let p = *p as usize;
        let offset = next[p];
        next[p] += 1;
        at.entry(k.as_str())
            .and_modify(|e| {
                if e.is_some_and(|(q, _)| q != p) {
                    *e = None;
                }
            })
            .or_insert(Some((p, offset)));
    }
    let mut last: Vec<Option<(usize, &str)>> = vec![None; next.len()];
    let mut seen = std::collections::HashSet::new();
    let mut wrong = Vec::new();
    for tx in accepted {
        let Some(Some((p, offset))) = at.get(tx.as_str()).copied() else {
            continue;
        };
        if !seen.insert(tx.as_str()) {
            continue;
        }
        if let Some((before, prev)) = last[p] {
            if offset < before {
                wrong.push(format!(
                    "{tx} (offset {offset}) after {prev} (offset {before}) on partition {p}"
                ));
            }
        }
        last[p] = Some((offset, tx.as_str()));
    }
    (!wrong.is_empty()).then(|| {
        format!(
            "{} ids reached the API out of their partition's order: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        )
    })
}

/// A dead letter of an id in doubt: stage `dedupe` (killed in flight) or `api` (an ambiguous
/// answer), reason `in_doubt`.
fn is_in_doubt(d: &DeadLetter) -> bool {
    d.reason == "in_doubt" && (d.stage == "dedupe" || d.stage == "api")
}

/// Every valid id is accepted exactly once, or (killed in flight, or answered ambiguously)
/// dead-lettered once as `in_doubt` and accepted at most once; no id is ever accepted twice.
pub fn account(ledger: &Ledger, accepted: &HashMap<String, u32>, dead: &[DeadLetter]) -> Accounting {
    let mut a = Accounting::default();
    let mut lost = Vec::new();
    let mut twice = Vec::new();
    let mut doubts: HashMap<&str, usize> = HashMap::new();
    for d in dead.iter().filter(|d| is_in_doubt(d)) {
        *doubts.entry(d.key.as_str()).or_default() += 1;
    }
    for (tx, _, _) in &ledger.valid {
        let n = accepted.get(tx).copied().unwrap_or(0);
        match (doubts.get(tx.as_str()).copied().unwrap_or(0), n) {
            (_, n) if n > 1 => twice.push(format!("{tx} x{n} at {:?}", ledger.positions(tx))),
            (0, 0) => lost.push(format!("{tx} at {:?}", ledger.positions(tx))),
            (0, _) => {}
            (d, n) => {
                a.in_doubt.push((tx.clone(), n == 1));
                if d > 1 {
                    a.repeated_dead_letters.insert(tx.clone(), d);
                }
            }
        }
    }
    let valid: std::collections::HashSet<&str> = ledger.valid.iter().map(|(t, _, _)| t.as_str()).collect();
    let unknown: Vec<&String> = accepted
        .keys()
        .filter(|t| !valid.contains(t.as_str()))
        .take(20)
        .collect();
    if !lost.is_empty() {
        a.problems.push(format!(
            "{} valid transaction ids never accepted by the API (lost): {:?}",
            lost.len(),
            &lost[..lost.len().min(20)]
        ));
    }
    if !twice.is_empty() {
        a.problems.push(format!(
            "{} transaction ids accepted more than once: {:?}",
            twice.len(),
            &twice[..twice.len().min(20)]
        ));
    }
    if !unknown.is_empty() {
        a.problems.push(format!(
            "the API accepted transaction ids that were not valid records: {unknown:?}"
        ));
    }
    let mut copies: BTreeMap<&str, Vec<&DeadLetter>> = BTreeMap::new();
    for d in dead {
        copies.entry(d.key.as_str()).or_default().push(d);
    }
    let mut missing = Vec::new();
    for (key, kind) in &ledger.invalid {
        let (stage, reason) = kind.expected();
        match copies.get(key.as_str()) {
            None => missing.push(key.clone()),
            Some(ds) => {
                for d in ds {
                    if d.stage != stage || d.reason != reason {
                        a.problems.push(format!(
                            "dead letter {key} ({}) has stage/reason {}/{}, expected {stage}/{reason}",
                            d.source, d.stage, d.reason
                        ));
                    }
                }
                if ds.len() > 1 {
                    a.repeated_dead_letters.insert(key.clone(), ds.len());
                }
            }
        }
    }
    if !a.repeated_dead_letters.is_empty() {
        a.problems.push(format!(
            "{} records dead-lettered more than once: {:?}",
            a.repeated_dead_letters.len(),
            a.repeated_dead_letters.iter().take(20).collect::<Vec<_>>()
        ));
    }
    if !missing.is_empty() {
        a.problems.push(format!(
            "{} invalid records never dead-lettered: {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        ));
    }
    let stray: Vec<String> = dead
        .iter()
        .filter(|d| {
            let in_doubt = is_in_doubt(d) && valid.contains(d.key.as_str());
            !ledger.invalid.contains_key(&d.key) && !in_doubt
        })
        .take(20)
        .map(|d| format!("{} ({}, {}/{})", d.key, d.source, d.stage, d.reason))
        .collect();
    if !stray.is_empty() {
        a.problems.push(format!("valid records were dead-lettered: {stray:?}"));
    }
    a
}
