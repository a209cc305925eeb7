//! Field mapping: compiles the configured `[[mapping]]` tables once at start-up and turns each
//! Kafka record into an API event, a filtered record, or an error naming the field.
//!
//! A mapping is chosen by the record's topic (the first mapping whose `topics` or
//! `topic_pattern` matches). Its JSON pointers are compiled into a reading plan (`read`), so a
//! record value is parsed once and only the fields the mapping uses are built. Each API field then
//! goes through its options in a fixed order (source, `expr`, `default`, `trim`, `case`, `table`,
//! `as`/`time`/`in`, `sign`), the custom properties are copied, and the event is checked by the
//! contract rules of `event::Event::validate`. `docs/mapping.md` is the user's reference.

mod command;
mod convert;
mod expr;
mod json;
mod read;
mod spec;
mod value;

pub use command::{run_map, MapRunError, Summary};
pub use spec::{
    AsType, Case, Condition, FieldOptions, FieldSpec, MappingConfig, Otherwise, PropertiesSpec, Sign, TimeSource,
    TimeWindowSpec, Tombstones, CONDITION_OPTIONS, FIELD_OPTIONS, MAPPING_KEYS, NAMED_SOURCES, PROPERTIES_OPTIONS,
    TIME_WINDOW_OPTIONS,
};

use crate::event::time_window::{self, Bound, TimeWindow};
use crate::event::{truncate, BetResult, ContractOptions, Event, Field as ApiField, FieldKind, TextSlot, KNOWN_FIELDS};
use convert::{describe, scalar_text, ScalarKeys, TimeReader, DEFAULT_TIME_READER};
use expr::Expr;
use read::{Place, Plan, Pointer};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use value::Val;

/// Slots (values read from a record) kept on the stack; a mapping reading more uses the heap.
const STACK_SLOTS: usize = 16;

/// The longest string a field or property may carry, in bytes. Longer values fail the record
/// (`too_long`) rather than ship megabytes to the API.
pub const MAX_TEXT_BYTES: usize = 8 * 1024;

/// The largest event body that fits a request of `batch_max_bytes` (`batch.max_bytes`): the
/// request is a JSON array, so its `[` and `]` take two bytes.
pub fn max_event_bytes(batch_max_bytes: usize) -> usize {
    batch_max_bytes.saturating_sub(2)
}

/// A Kafka record as the mapping sees it.
#[derive(Debug, Clone, Copy)]
pub struct SourceRecord<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp in milliseconds, when it has one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    /// `None` for a tombstone.
    pub value: Option<&'a [u8]>,
    /// Name and value; `None` for a header without a value (Kafka allows one): absent, as an
    /// empty value is.
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

/// Where a record failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Mapping,
    Validation,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Mapping => "mapping",
            Stage::Validation => "validation",
        }
    }
}

/// Why a record cannot become an event.
#[derive(Debug, Clone, PartialEq)]
pub struct MapError {
    pub stage: Stage,
    /// Where: the target field concerned, when there is one; for a value the reader refused
    /// (`not_json`, `duplicate_key`), the JSON pointer (RFC 6901) in the record value where it
    /// stopped, such as `/money/value` (none at the top level).
    pub field: Option<String>,
    /// A short machine-readable reason (a contract rule code, `not_json`, `unknown_value`, …).
    pub reason: String,
    /// A sentence for humans.
    pub message: String,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed", self.stage.as_str())?;
        if let Some(field) = &self.field {
            write!(f, " on field `{field}`")?;
        }
        write!(f, " ({}): {}", self.reason, self.message)
    }
}

/// The result of mapping one record. The event borrows from the record and the mapper.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // boxing the event would cost an allocation per record
pub enum MapOutcome<'a> {
    Event(Event<'a>),
    /// A rule said this record is not an event for the API.
    Filtered {
        /// Which rule, a bounded name (the `reason` label of the filtered outcome's metric):
        /// `keep_when`, `skip_when`, `otherwise` (a `table`'s `otherwise = "skip"`) or
        /// `tombstone` (`tombstones = "filter"`).
        code: &'static str,
        /// A sentence: the rule and the value it saw.
        reason: String,
    },
    Failed(MapError),
}

impl MapOutcome<'_> {
    /// The outcome with its event owned, for keeping it beyond the record.
    pub fn into_owned(self) -> MapOutcome<'static> {
        match self {
            MapOutcome::Event(e) => MapOutcome::Event(e.into_owned()),
            MapOutcome::Filtered { code, reason } => MapOutcome::Filtered { code, reason },
            MapOutcome::Failed(e) => MapOutcome::Failed(e),
        }
    }
}

/// Errors in the mapping configuration, each naming the mapping and the field.
#[derive(Debug)]
pub struct MappingErrors {
    problems: Vec<MappingProblem>,
}

impl MappingErrors {
    /// Every problem found, in the order of the configuration.
    pub fn problems(&self) -> &[MappingProblem] {
        &self.problems
    }
}

impl fmt::Display for MappingErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// One problem of one `[[mapping]]`: which mapping, where in it, the option at fault and what to
/// do. Displays as `mapping[0] (topics bets), field `amount`: option `from`: …`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{label}{at}{}: {message}", option.map(|o| format!(": option `{o}`")).unwrap_or_default())]
pub struct MappingProblem {
    /// The mapping's index in the `[[mapping]]` list, from 0.
    pub mapping: usize,
    /// The mapping as the user knows it: `mapping[0] (topics a, b)`.
    pub label: String,
    /// The part of the mapping at fault.
    pub at: At,
    /// The option at fault (`from`, `in`, `time_format`, …), when one is.
    pub option: Option<&'static str>,
    /// What is wrong and what to do.
    pub message: String,
}

/// The part of a `[[mapping]]` a [`MappingProblem`] is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// The mapping as a whole (`topics`, `topic_pattern`).
    Mapping,
    /// An API field, by its name in the contract (`amount`, `event_name`).
    Field(&'static str),
    /// The `keep_when` condition at this index.
    KeepWhen(usize),
    /// The `skip_when` condition at this index.
    SkipWhen(usize),
    /// The `[[mapping.properties]]` entry at this index.
    Properties(usize),
}

impl fmt::Display for At {
    /// Empty for the whole mapping, else `, ` and the part (`, field `amount``, `, keep_when[0]`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Mapping => Ok(()),
            At::Field(name) => write!(f, ", field `{name}`"),
            At::KeepWhen(i) => write!(f, ", keep_when[{i}]"),
            At::SkipWhen(i) => write!(f, ", skip_when[{i}]"),
            At::Properties(i) => write!(f, ", properties[{i}]"),
        }
    }
}

/// A problem found while compiling one mapping, before it is labelled with the mapping.
struct Found {
    at: At,
    option: Option<&'static str>,
    message: String,
}

impl Found {
    fn new(at: At, option: Option<&'static str>, message: impl Into<String>) -> Found {
        Found {
            at,
            option,
            message: message.into(),
        }
    }
}

impl std::error::Error for MappingErrors {}

/// The compiled mappings.
#[derive(Debug)]
pub struct Mapper {
    mappings: Vec<Compiled>,
    contract: ContractOptions,
}

/// The JSON type an API field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Num,
    Time,
    Bool,
}

/// How the mapping treats an API field's value: `bet_result` is read as text and translated.
fn kind_of(field: ApiField) -> Kind {
    match field.kind() {
        FieldKind::Time => Kind::Time,
        FieldKind::Decimal => Kind::Num,
        FieldKind::Bool => Kind::Bool,
        FieldKind::Text | FieldKind::BetResult => Kind::Str,
    }
}

#[derive(Debug)]
enum Source {
    /// A pointer into the value; `take` when no other option reads the same slot, so a field or
    /// `properties` can move the value out rather than clone it.
    Value {
        place: Place,
        take: bool,
    },
    Key,
    Header(String),
    Topic,
    Partition,
    Offset,
    Timestamp,
    Const(Val<'static>),
}

#[derive(Debug)]
enum Miss {
    DeadLetter,
    Skip,
    Keep,
    Fallback(Val<'static>),
}

#[derive(Debug)]
struct Field {
    name: &'static str,
    target: ApiField,
    kind: Kind,
    /// An `expr` without `from` reads the whole value (the pointer `""`).
    source: Source,
    expr: Option<Expr>,
    default: Option<Val<'static>>,
    trim: bool,
    case: Option<Case>,
    table: Option<(ScalarKeys<Val<'static>>, Miss)>,
    as_type: Option<AsType>,
    time: Option<TimeReader>,
    one_of: Option<ScalarKeys<()>>,
    sign: Option<(Sign, Vec<String>)>,
}

#[derive(Debug)]
struct Cond {
    /// `from`, quoted, and the `in` values, for the filtered reason.
    from: String,
    values: String,
    source: Source,
    one_of: ScalarKeys<()>,
    /// Whether `in` lists "", which stands for an absent value (absent, null or "").
    absent_holds: bool,
}

#[derive(Debug)]
struct Props {
    source: Source,
    fields: Option<Vec<String>>,
    skip: HashSet<String>,
    prefix: String,
    rename: HashMap<String, String>,
}

#[derive(Debug)]
struct Compiled {
    topics: Vec<String>,
    pattern: Option<regex::Regex>,
    plan: Plan,
    keep_when: Vec<Cond>,
    skip_when: Vec<Cond>,
    tombstones: Tombstones,
    /// `event_name` first: `sign_for` reads the mapped event name.
    fields: Vec<Field>,
    props: Vec<Props>,
    times: Times,
}

/// A mapping's `timestamp_window` and the latest clock reading it saw.
#[derive(Debug)]
struct Times {
    window: TimeWindow,
    /// Unix nanoseconds of a clock reading (the latest taken): a time that is in the window for
    /// any clock from then on needs no new reading, which is nearly every time (a default
    /// window's `latest` is a day ahead). A clock stepped back lets through, for the length of
    /// the step, times up to a day after the reading before it.
    seen: AtomicI64,
}

impl Times {
    fn new(window: TimeWindow) -> Times {
        Times {
            window,
            seen: AtomicI64::new(now_i64()),
        }
    }

    /// `Ok` when `t` (Unix nanoseconds) is in the window, else the clock reading it was judged by.
    #[inline]
    fn check(&self, t: i128) -> Result<(), i128> {
        if self
            .window
            .surely_contains(t, i128::from(self.seen.load(Ordering::Relaxed)))
        {
            return Ok(());
        }
        self.check_by_the_clock(t)
    }

    #[cold]
    fn check_by_the_clock(&self, t: i128) -> Result<(), i128> {
        let now = now_i64();
        self.seen.fetch_max(now, Ordering::Relaxed);
        let now = i128::from(now);
        if self.window.contains(t, now) {
            Ok(())
        } else {
            Err(now)
        }
    }
}

/// The clock in Unix nanoseconds, as an `i64` (enough until 2262).
fn now_i64() -> i64 {
    i64::try_from(time_window::now_nanos()).unwrap_or(i64::MAX)
}

/// How a record stops short of an event. Boxed so that the `Result`s of the per-field hot path
/// stay small (moving a large error type around cost more than the boxing).
enum Stop {
    /// The rule's name (`MapOutcome::Filtered`'s `code`) and the sentence.
    Filtered(&'static str, String),
    Failed(Box<MapError>),
}

fn fail(stage: Stage, field: Option<&str>, reason: &str, message: impl Into<String>) -> Stop {
    Stop::Failed(Box::new(MapError {
        stage,
        field: field.map(str::to_string),
        reason: reason.to_string(),
        message: message.into(),
    }))
}

impl Mapper {
    /// Compiles every mapping, or returns every error found, each naming the mapping (by index
    /// and topics) and the field.
    pub fn compile(cfgs: &[MappingConfig], contract: &ContractOptions) -> Result<Mapper, MappingErrors> {
        let mut errors = Vec::new();
        let mut mappings = Vec::new();
        let mut claimed: HashMap<&str, usize> = HashMap::new();
        for (i, cfg) in cfgs.iter().enumerate() {
            let label = mapping_label(i, cfg);
            let mut errs = Vec::new();
            for t in &cfg.topics {
                if let Some(first) = claimed.insert(t.as_str(), i) {
                    errs.push(Found::new(
                        At::Mapping,
                        Some("topics"),
                        format!("topic `{t}` is already mapped by mapping[{first}]; a topic has one mapping"),
                    ));
                }
            }
            let compiled = compile_one(cfg, &mut errs);
            errors.extend(errs.into_iter().map(|f| MappingProblem {
                mapping: i,
                label: label.clone(),
                at: f.at,
                option: f.option,
                message: f.message,
            }));
            if let Some(c) = compiled {
                mappings.push(c);
            }
        }
        if errors.is_empty() {
            Ok(Mapper {
                mappings,
                contract: *contract,
            })
        } else {
            Err(MappingErrors { problems: errors })
        }
    }

    /// The contract settings events are validated and timestamps converted with.
    pub fn contract(&self) -> &ContractOptions {
        &self.contract
    }

    /// Whether some mapping applies to `topic`.
    #[cfg(test)]
    pub fn handles(&self, topic: &str) -> bool {
        self.find(topic).is_some()
    }

    fn find(&self, topic: &str) -> Option<&Compiled> {
        self.mappings
            .iter()
            .find(|m| m.topics.iter().any(|t| t == topic) || m.pattern.as_ref().is_some_and(|p| p.is_match(topic)))
    }

    /// Maps one record. Never panics; every record gets an outcome.
    pub fn map<'a>(&'a self, rec: &SourceRecord<'a>) -> MapOutcome<'a> {
        // Filled in place: an event is a few hundred bytes, and each move through a `Result` copies it.
        let mut event = Event::default();
        match self.map_inner(rec, &mut event) {
            Ok(()) => MapOutcome::Event(event),
            Err(Stop::Filtered(code, reason)) => MapOutcome::Filtered { code, reason },
            Err(Stop::Failed(e)) => MapOutcome::Failed(*e),
        }
    }

    /// What `run` does with a record before it is delivered, and what `map` shows: maps it,
    /// appends the event's request body (`Event::write_json`) to `body`, and refuses a body over
    /// `max_event_bytes` (see [`max_event_bytes`]) with stage `validation`, reason `too_large`:
    /// one event must fit one request. `map` and `run` call this one function, so the dry run
    /// gives every verdict the service would (issue 16, item 6).
    pub fn map_for_delivery<'a>(
        &'a self,
        rec: &SourceRecord<'a>,
        max_event_bytes: usize,
        body: &mut Vec<u8>,
    ) -> MapOutcome<'a> {
        let out = self.map(rec);
        if let MapOutcome::Event(e) = &out {
            let start = body.len();
            e.write_json(body);
            let len = body.len() - start;
            if len > max_event_bytes {
                body.truncate(start);
                return MapOutcome::Failed(MapError {
                    stage: Stage::Validation,
                    field: None,
                    reason: "too_large".into(),
                    message: format!(
                        "the event is {len} bytes, over the {max_event_bytes} bytes a request of batch.max_bytes \
                         can carry"
                    ),
                });
            }
        }
        out
    }

    fn map_inner<'a>(&'a self, rec: &SourceRecord<'a>, event: &mut Event<'a>) -> Result<(), Stop> {
        let Some(m) = self.find(rec.topic) else {
            return Err(fail(
                Stage::Mapping,
                None,
                "no_mapping",
                format!("no mapping applies to topic `{}`", truncate(rec.topic)),
            ));
        };
        let Some(raw) = rec.value else {
            // Before the conditions: they read the value, and a tombstone has none (see
            // `Tombstones` for why an option rather than conditions over an absent value).
            return Err(match m.tombstones {
                Tombstones::DeadLetter => fail(
                    Stage::Mapping,
                    None,
                    "tombstone",
                    "the record has no value (a tombstone); `tombstones = \"filter\"` in its mapping filters \
                     tombstones instead",
                ),
                Tombstones::Filter => Stop::Filtered(
                    "tombstone",
                    "tombstone: the record has no value (tombstones = \"filter\")".into(),
                ),
            });
        };
        let text = std::str::from_utf8(raw).map_err(|e| {
            fail(
                Stage::Mapping,
                None,
                "not_utf8",
                format!("the value is not UTF-8 text: {e}{}", utf16_hint(raw)),
            )
        })?;
        // One leading byte order mark, as .NET's default UTF-8 writers put before the JSON: RFC 8259
        // §8.1 lets a parser ignore it (and forbids a writer to add it), so reading past it changes
        // no value.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // On the stack for the usual handful of pointers.
        let n = m.plan.slot_count();
        if n <= STACK_SLOTS {
            let mut slots: [Option<Val<'a>>; STACK_SLOTS] = [const { None }; STACK_SLOTS];
            self.map_value(m, rec, text, &mut slots[..n], event)
        } else {
            let mut slots: Vec<Option<Val<'a>>> = (0..n).map(|_| None).collect();
            self.map_value(m, rec, text, &mut slots, event)
        }
    }

    fn map_value<'a>(
        &'a self,
        m: &'a Compiled,
        rec: &SourceRecord<'a>,
        text: &'a str,
        slots: &mut [Option<Val<'a>>],
        event: &mut Event<'a>,
    ) -> Result<(), Stop> {
        match m.plan.read(text, slots) {
            Ok(true) => {}
            Ok(false) => {
                return Err(fail(
                    Stage::Mapping,
                    None,
                    "not_object",
                    "the value is JSON but not an object",
                ))
            }
            Err(e) => return Err(not_json(rec, text, &e)),
        }
        let cx = Cx { rec, slots };
        for c in &m.keep_when {
            if let Some(seen) = cx.judge(c, true)? {
                return Err(Stop::Filtered(
                    "keep_when",
                    format!("keep_when: {} is {seen}, not one of {}", c.from, c.values),
                ));
            }
        }
        for c in &m.skip_when {
            if let Some(seen) = cx.judge(c, false)? {
                return Err(Stop::Filtered("skip_when", format!("skip_when: {} is {seen}", c.from)));
            }
        }
        let mut cx = cx;
        let mut has_timestamp = false;
        for f in &m.fields {
            let present = cx.field(f, event, &self.contract, &m.times)?;
            has_timestamp |= present && f.kind == Kind::Time;
        }
        for p in &m.props {
            cx.properties(p, &mut event.properties)?;
        }
        if let Some(name) = repeated_name(&event.properties) {
            return Err(property_name_taken(name));
        }
        if !has_timestamp {
            return Err(fail(
                Stage::Validation,
                Some("timestamp"),
                "required",
                "timestamp is required: its value is absent, null or empty",
            ));
        }
        let violations = event.validate(&self.contract);
        if let Some(first) = violations.first() {
            let message = violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; ");
            return Err(fail(Stage::Validation, Some(&first.field), first.rule, message));
        }
        Ok(())
    }
}

/// A hint for a value written in UTF-16 (a .NET or Java producer's `Encoding.Unicode` or
/// `UTF_16`): it starts with a UTF-16 byte order mark (`FF FE`, `FE FF`), or one of its first two
/// bytes is a zero, as an ASCII character in UTF-16 has. JSON exchanged between systems is UTF-8
/// (RFC 8259 §8.1), and reading UTF-16 would guess at the producer's intent, so it is refused,
/// saying what the value looks like.
fn utf16_hint(raw: &[u8]) -> &'static str {
    match raw {
        [0xFF, 0xFE, 0, 0, ..] | [0, 0, 0xFE, 0xFF, ..] => {
            " (the value starts with a UTF-32 byte order mark: the producer writes UTF-32; JSON between systems is UTF-8, RFC 8259 §8.1)"
        }
        [0xFF, 0xFE, ..] | [0xFE, 0xFF, ..] => {
            " (the value starts with a UTF-16 byte order mark: the producer writes UTF-16; JSON between systems is UTF-8, RFC 8259 §8.1)"
        }
        [0, c, ..] | [c, 0, ..] if *c != 0 => {
            " (the value looks like UTF-16, a zero byte beside each ASCII character: the producer writes UTF-16; JSON between systems is UTF-8, RFC 8259 §8.1)"
        }
        _ => "",
    }
}

/// The longest JSON pointer an error names (bytes); a longer one is cut and ends with `…`.
const MAX_POINTER: usize = 1024;

/// A value the reader refused (`not_json`, or `duplicate_key` for a key twice in an object),
/// named by the JSON pointer (RFC 6901) where the reader was and the byte offset in the record
/// value (issue 16: errors name where).
#[cold]
fn not_json(rec: &SourceRecord<'_>, text: &str, e: &json::JsonError) -> Stop {
    let mut pointer = json::pointer_at(text, e.at);
    // A pointer into a record nested thousands deep is as long as the record: it goes into the
    // dead letter's headers, which must stay far below the broker's message size. Cut, marked.
    if pointer.len() > MAX_POINTER {
        let mut end = MAX_POINTER;
        while !pointer.is_char_boundary(end) {
            end -= 1;
        }
        pointer.truncate(end);
        pointer.push('…');
    }
    // Offsets count from the start of the value, a skipped byte order mark included.
    let at = e.at + rec.value.map_or(0, |v| v.len() - text.len());
    let (reason, what) = if e.what == json::DUPLICATE_KEY {
        (
            "duplicate_key",
            "a record with a key twice in one object has no single meaning",
        )
    } else {
        ("not_json", "the value is not JSON")
    };
    let place = if pointer.is_empty() {
        "at the top level".to_string()
    } else {
        format!("at `{}`", truncate(&pointer))
    };
    let hint = rec.value.map_or("", utf16_hint);
    fail(
        Stage::Mapping,
        (!pointer.is_empty()).then_some(pointer.as_str()),
        reason,
        format!("{what}: {} {place} (byte {at}){hint}", e.what),
    )
}

/// Puts a converted value into its event field.
fn set<'a>(e: &mut Event<'a>, f: &Field, v: Val<'a>) -> Result<(), Stop> {
    let name = f.name;
    let wrong = |want: &str, hint: &str| {
        fail(
            Stage::Mapping,
            Some(name),
            "type",
            format!("`{name}` must be {want}, got {}{hint}", describe(&v)),
        )
    };
    match f.kind {
        Kind::Str => {
            let Val::Str(s) = v else {
                return Err(wrong("a string", "; add `as = \"string\"` to convert"));
            };
            if s.len() > MAX_TEXT_BYTES {
                return Err(too_long(name, s.len()));
            }
            if f.target == ApiField::BetResult {
                e.bet_result = match &*s {
                    "win" => Some(BetResult::Win),
                    "loss" => Some(BetResult::Loss),
                    _ => {
                        return Err(fail(
                            Stage::Validation,
                            Some(name),
                            crate::event::Rule::BetResult.code(),
                            format!(
                                "bet_result must be \"win\" or \"loss\", got {}; a `table` can translate",
                                describe(&Val::Str(s))
                            ),
                        ))
                    }
                };
                return Ok(());
            }
            match e.text_slot(f.target) {
                Some(TextSlot::Required(slot)) => *slot = s,
                Some(TextSlot::Optional(slot)) => *slot = Some(s),
                None => unreachable!("{} is read as text but is not a text field", f.target),
            }
        }
        Kind::Num => {
            let Val::Num(x) = v else {
                return Err(wrong("a number", "; add `as = \"number\"` to convert a string"));
            };
            // The API reads an amount as a binary64: a non-zero one below its smallest
            // (`1e-400`) reads as zero, a value changed on the way (issue 16), and the sign rules
            // would judge a number the API never sees. Zero, and 5e-324, pass.
            if x.underflows() {
                return Err(fail(
                    Stage::Mapping,
                    Some(name),
                    "type",
                    format!("the number {x} is too small for the API's binary64, which would read it as 0"),
                ));
            }
            match e.decimal_slot(f.target) {
                Some(slot) => *slot = Some(x),
                None => unreachable!("{} is read as a number but is not an amount", f.target),
            }
        }
        Kind::Time => unreachable!("`Cx::field` sets the timestamp itself"),
        Kind::Bool => {
            let Val::Bool(b) = v else {
                return Err(wrong(
                    "a boolean",
                    "; add `as = \"boolean\"` or `in = [...]` to convert",
                ));
            };
            e.is_crypto = Some(b);
        }
    }
    Ok(())
}

/// A time outside the mapping's `timestamp_window` (issue 17): reason `time`, naming the value as
/// the reader got it, the reader, the time it read and the window.
#[cold]
fn implausible(f: &Field, reader: &TimeReader, v: &Val, nanos: i128, window: &TimeWindow) -> Stop {
    fail(
        Stage::Mapping,
        Some(f.name),
        "time",
        format!(
            "{} read with {} is {}, outside the plausible window {}: a date, or a time in another unit? \
             set `time` or `time_format`, or the mapping's `timestamp_window`",
            describe(v),
            reader.describe_reading(v, f.time.is_some()),
            time_window::instant(nanos),
            window.describe(),
        ),
    )
}

/// Whether a custom property's name is an API field's (a `match` over the names, not fifteen
/// string comparisons per property).
fn is_known_field(name: &str) -> bool {
    ApiField::from_name(name).is_some()
}

fn property_name_taken(name: &str) -> Stop {
    fail(
        Stage::Mapping,
        Some(name),
        "property_name",
        format!(
            "the custom property `{}` would collide with an API field or another property; \
             add a `prefix`, a `rename` or an `except`",
            truncate(name)
        ),
    )
}

/// A custom property name that appears twice, if any. Checked once after
/// all properties are copied, in O(n log n): checking each new name against the list so far took
/// 5.35 s for a 1 MB record of 70,000 properties (issue 16), with the consumer standing still. Up
/// to 16 names the pairwise check is cheaper than sorting, and needs no allocation.
fn repeated_name<'e>(props: &'e [(Cow<'_, str>, Cow<'_, str>)]) -> Option<&'e str> {
    if props.len() <= 16 {
        return props
            .iter()
            .enumerate()
            .find(|(i, (n, _))| props[..*i].iter().any(|(m, _)| m == n))
            .map(|(_, (n, _))| n.as_ref());
    }
    // Names copied from one object come in its (sorted) key order: then one pass suffices.
    if props.windows(2).all(|w| w[0].0 < w[1].0) {
        return None;
    }
    let mut names: Vec<&str> = props.iter().map(|(n, _)| n.as_ref()).collect();
    names.sort_unstable();
    names.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

fn too_long(name: &str, len: usize) -> Stop {
    fail(
        Stage::Mapping,
        Some(name),
        "too_long",
        format!("`{name}` is {len} bytes long; the limit is {MAX_TEXT_BYTES}"),
    )
}

/// One record being mapped; `'a` is the lifetime of the record and of the mapper.
struct Cx<'r, 'a> {
    rec: &'r SourceRecord<'a>,
    slots: &'r mut [Option<Val<'a>>],
}

impl<'a> Cx<'_, 'a> {
    /// The value of a source; `Val::Null` when absent or null (the options treat both alike, and
    /// a plain value returns faster than an `Option` of it). `field` names the error.
    #[inline(always)] // keeps the value in registers: returned through memory, it stalled
    fn read(&mut self, s: &'a Source, field: &str) -> Result<Val<'a>, Stop> {
        let utf8 = |what: &str, b: &'a [u8]| {
            std::str::from_utf8(b).map(|s| Val::Str(Cow::Borrowed(s))).map_err(|e| {
                fail(
                    Stage::Mapping,
                    Some(field),
                    "not_utf8",
                    format!("the {what} is not UTF-8 text: {e}"),
                )
            })
        };
        Ok(match s {
            Source::Value { place, take: true } if place.rest.is_empty() => {
                self.slots[place.slot].take().unwrap_or(Val::Null)
            }
            Source::Value { place, .. } => Plan::get(self.slots, place).cloned().unwrap_or(Val::Null),
            Source::Key => match self.rec.key {
                Some(k) => utf8("record key", k)?,
                None => Val::Null,
            },
            // The last header of the name; one without a value is absent.
            Source::Header(name) => match self.rec.headers.iter().rev().find(|h| h.0 == name) {
                Some((_, Some(v))) => utf8(&format!("header `{name}`"), v)?,
                _ => Val::Null,
            },
            Source::Topic => Val::Str(Cow::Borrowed(self.rec.topic)),
            Source::Partition => Val::from(i64::from(self.rec.partition)),
            Source::Offset => Val::from(self.rec.offset),
            Source::Timestamp => self.rec.timestamp_ms.map_or(Val::Null, Val::from),
            Source::Const(v) => v.reborrow(),
        })
    }

    /// Whether the condition holds, and what the source held (for the filtered reason).
    /// Judges condition `c`: `Ok(None)` when whether it holds is `want`, else `Ok(Some(seen))`,
    /// what it saw, for the filter's reason (described only then: not on every record kept).
    fn judge(&self, c: &'a Cond, want: bool) -> Result<Option<String>, Stop> {
        // Conditions never take from a slot; reading by reference keeps the slots for the fields.
        let read;
        let v = match &c.source {
            Source::Value { place, .. } => Plan::get(self.slots, place),
            other => {
                let mut tmp = Cx {
                    rec: self.rec,
                    slots: &mut [],
                };
                read = tmp.read(other, &c.from)?;
                Some(&read).filter(|v| !v.is_null())
            }
        };
        // Absent, null and "" are one, as for a field: one of the values only when "" is.
        let holds = match v {
            Some(v) if !v.is_absent() => c.one_of.contains(v),
            _ => c.absent_holds,
        };
        if holds == want {
            return Ok(None);
        }
        Ok(Some(match v {
            None => "absent".to_string(),
            Some(v) if v.is_absent() => format!("{} (absent)", describe(v)),
            Some(v) => describe(v),
        }))
    }

    /// Runs a field's options and sets it in `event`; `Ok(false)` when the field is absent. (Setting
    /// it here rather than returning the value keeps large `Result`s off the hot path.)
    fn field(
        &mut self,
        f: &'a Field,
        event: &mut Event<'a>,
        contract: &ContractOptions,
        times: &Times,
    ) -> Result<bool, Stop> {
        let name = f.name;
        let mapping_err = |reason: &str, msg: String| fail(Stage::Mapping, Some(name), reason, msg);
        let mut v = self.read(&f.source, name)?;
        if let Some(e) = &f.expr {
            v = e.run(&v).map_err(|m| mapping_err("expr", m))?.unwrap_or(Val::Null);
        }
        if f.trim {
            v = convert::trim(v);
        }
        // Absent, null and "" are one (issue 17): after the source, `expr` and `trim`, `default`
        // stands in for them (trimmed at start-up under `trim`, never no value: refused there),
        // else the field is left out and a rule that requires it refuses the event (`timestamp`
        // in `map_value`, the others in `Event::validate`).
        if v.is_absent() {
            match &f.default {
                Some(d) => v = d.reborrow(),
                None => return Ok(false),
            }
        }
        if let Some(c) = f.case {
            v = convert::case(v, c);
        }
        if let Some((table, miss)) = &f.table {
            let hit = table.get(&v);
            v = match (hit, miss) {
                (Some(to), _) => to.reborrow(),
                (None, Miss::Keep) => v,
                (None, Miss::Fallback(to)) => to.reborrow(),
                (None, Miss::Skip) => {
                    return Err(Stop::Filtered(
                        "otherwise",
                        format!("`{name}`: {} is not in the table (otherwise = \"skip\")", describe(&v)),
                    ))
                }
                (None, Miss::DeadLetter) => {
                    return Err(mapping_err(
                        "unknown_value",
                        format!("{} is not in the table of `{name}`", describe(&v)),
                    ))
                }
            };
            // A table value (or `fallback`) of "" turns a sentinel into no value.
            if v.is_absent() {
                return Ok(false);
            }
        }
        if let Some(t) = f.as_type {
            v = convert::as_type(v, t).map_err(|m| mapping_err("type", m))?;
        }
        if let Some(set) = &f.one_of {
            let hit = set.contains(&v);
            v = Val::Bool(hit);
        }
        if f.kind == Kind::Time {
            // Set here: an `i64` needs no trip through a value (`sign` does not apply to times).
            let reader = f.time.as_ref().unwrap_or(&DEFAULT_TIME_READER);
            let nanos = reader.nanos(&v).map_err(|m| mapping_err("time", m))?;
            if times.check(nanos).is_err() {
                return Err(implausible(f, reader, &v, nanos, &times.window));
            }
            event.timestamp =
                convert::in_unit(nanos, contract.timestamp_unit, &v).map_err(|m| mapping_err("time", m))?;
            return Ok(true);
        }
        if let Some((s, only_for)) = &f.sign {
            if only_for.is_empty() || only_for.iter().any(|n| *n == event.event_name) {
                v = convert::sign(v, *s).map_err(|m| mapping_err("type", m))?;
            }
        }
        set(event, f, v)?;
        Ok(true)
    }

    fn properties(&mut self, p: &'a Props, out: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>) -> Result<(), Stop> {
        let obj = match &p.source {
            Source::Value { place, take: true } if place.rest.is_empty() => self.slots[place.slot].take(),
            Source::Value { place, .. } => Plan::get(self.slots, place).cloned(),
            _ => None,
        };
        let Some(obj) = obj.filter(|v| !v.is_absent()) else {
            return Ok(());
        };
        let Val::Obj(mut map) = obj else {
            return Err(fail(
                Stage::Mapping,
                Some("properties"),
                "type",
                format!("properties must come from an object, got {}", describe(&obj)),
            ));
        };
        // Room for every property at once: a wide record grew the list by doubling, copying it.
        out.reserve(p.fields.as_ref().map_or(map.len(), Vec::len));
        let mut copy = |k: Cow<'a, str>, v: Val<'a>| -> Result<(), Stop> {
            if !p.skip.is_empty() && p.skip.contains(&*k) {
                return Ok(());
            }
            let text = match v {
                // Absent, null and "" are one: a custom property is optional, so left out.
                Val::Null => return Ok(()),
                Val::Str(s) if s.is_empty() => return Ok(()),
                Val::Str(s) => s,
                other => Cow::Owned(other.to_string()),
            };
            let renamed = if p.rename.is_empty() { None } else { p.rename.get(&*k) };
            let name = match (renamed, p.prefix.is_empty()) {
                (None, true) => k,
                (Some(r), true) => Cow::Borrowed(r.as_str()),
                (renamed, false) => {
                    let base = renamed.map_or(&*k, String::as_str);
                    let mut n = String::with_capacity(p.prefix.len() + base.len());
                    n.push_str(&p.prefix);
                    n.push_str(base);
                    Cow::Owned(n)
                }
            };
            if text.len() > MAX_TEXT_BYTES {
                return Err(too_long(&name, text.len()));
            }
            if is_known_field(&name) {
                return Err(property_name_taken(&name));
            }
            out.push((name, text));
            Ok(())
        };
        match &p.fields {
            Some(fields) => {
                for k in fields {
                    if let Ok(i) = map.binary_search_by(|(key, _)| key.as_ref().cmp(k)) {
                        let v = std::mem::replace(&mut map[i].1, Val::Null);
                        copy(Cow::Borrowed(k.as_str()), v)?;
                    }
                }
            }
            None => {
                for (k, v) in map {
                    copy(k, v)?;
                }
            }
        }
        Ok(())
    }
}

fn mapping_label(i: usize, cfg: &MappingConfig) -> String {
    let mut what = Vec::new();
    if !cfg.topics.is_empty() {
        what.push(format!("topics {}", cfg.topics.join(", ")));
    }
    if let Some(p) = &cfg.topic_pattern {
        what.push(format!("topic_pattern {p}"));
    }
    if what.is_empty() {
        format!("mapping[{i}]")
    } else {
        format!("mapping[{i}] ({})", what.join("; "))
    }
}

/// The placeholder source of a [`Pending`] item (any value; it is always replaced).
const UNRESOLVED: Source = Source::Topic;

/// A source before slots are assigned.
enum RawSource {
    Pointer(usize),
    Other(Source),
}

/// Collects the pointers of one mapping so the reading plan can be built once they are all known.
#[derive(Default)]
struct Pointers {
    list: Vec<Pointer>,
}

impl Pointers {
    fn source(&mut self, s: &str) -> Result<RawSource, String> {
        Ok(RawSource::Other(match s {
            "key" => Source::Key,
            "topic" => Source::Topic,
            "partition" => Source::Partition,
            "offset" => Source::Offset,
            "timestamp" => Source::Timestamp,
            _ => {
                if let Some(h) = s.strip_prefix("header:") {
                    if h.is_empty() {
                        return Err("`header:` needs a header name, for example `header:client-ip`".into());
                    }
                    Source::Header(h.to_string())
                } else {
                    return self.pointer(s);
                }
            }
        }))
    }

    fn pointer(&mut self, s: &str) -> Result<RawSource, String> {
        self.list.push(Pointer::parse(s)?);
        Ok(RawSource::Pointer(self.list.len() - 1))
    }
}

/// A configured scalar (a constant, a default, a table's value, an `in` value). A float TOML
/// reads as another number is refused where the configuration is read (`config`, issue 16).
fn scalar(v: &Value, what: &str) -> Result<(), String> {
    match v {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(()),
        _ => Err(format!("{what} must be a string, a number or a boolean")),
    }
}

fn text_set(values: &[Value], what: &str) -> Result<ScalarKeys<()>, String> {
    let texts = values
        .iter()
        .map(|v| {
            scalar(v, what)?;
            Ok((
                scalar_text(&Val::from_json(v.clone())).expect("scalar").into_owned(),
                (),
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    ScalarKeys::new(texts)
}

/// A field, condition or properties table whose source still refers to a pointer index: slots
/// are known only once every pointer of the mapping is. Until then `item.source` holds
/// [`UNRESOLVED`].
struct Pending<T> {
    item: T,
    raw: Option<RawSource>,
}

fn compile_one(cfg: &MappingConfig, errs: &mut Vec<Found>) -> Option<Compiled> {
    let mut ptrs = Pointers::default();
    if cfg.topics.is_empty() && cfg.topic_pattern.is_none() {
        errs.push(Found::new(
            At::Mapping,
            Some("topics"),
            "set `topics` (a list) or `topic_pattern` (a regular expression)",
        ));
    }
    let pattern = match &cfg.topic_pattern {
        Some(p) => match regex::Regex::new(&format!("^(?:{p})$")) {
            Ok(r) => Some(r),
            Err(e) => {
                errs.push(Found::new(
                    At::Mapping,
                    Some("topic_pattern"),
                    format!("not a valid regular expression: {e}"),
                ));
                None
            }
        },
        None => None,
    };
    for (field, spec) in cfg.fields() {
        if field.always_required() && spec.is_none() {
            errs.push(Found::new(
                At::Field(field.name()),
                None,
                "missing; every event needs `client_user_id`, `event_name` and `timestamp`",
            ));
        }
    }

    let window = time_window_of(cfg.timestamp_window.as_ref(), errs);

    let conds = |list: &[Condition], which: fn(usize) -> At, ptrs: &mut Pointers, errs: &mut Vec<Found>| {
        let mut out = Vec::new();
        for (i, c) in list.iter().enumerate() {
            let raw = match ptrs.source(&c.from) {
                Ok(r) => r,
                Err(e) => {
                    errs.push(Found::new(which(i), Some("from"), e));
                    continue;
                }
            };
            if c.one_of.is_empty() {
                errs.push(Found::new(which(i), Some("in"), "list at least one value"));
            }
            let one_of = text_set(&c.one_of, "each value of `in`").unwrap_or_else(|e| {
                errs.push(Found::new(which(i), Some("in"), e));
                ScalarKeys::new([]).expect("no entries")
            });
            out.push(Pending {
                item: Cond {
                    from: format!("`{}`", c.from),
                    values: c.one_of.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "),
                    source: UNRESOLVED,
                    absent_holds: one_of.contains(&Val::Str(Cow::Borrowed(""))),
                    one_of,
                },
                raw: Some(raw),
            });
        }
        out
    };
    let mut keep_when = conds(&cfg.keep_when, At::KeepWhen, &mut ptrs, errs);
    let mut skip_when = conds(&cfg.skip_when, At::SkipWhen, &mut ptrs, errs);

    let mut fields = Vec::new();
    let ordered = {
        let all = cfg.fields();
        let mut v: Vec<_> = all.iter().filter(|(f, _)| *f == ApiField::EventName).cloned().collect();
        v.extend(all.iter().filter(|(f, _)| *f != ApiField::EventName).cloned());
        v
    };
    for (field, spec) in ordered {
        let Some(spec) = spec else { continue };
        let f = compile_field(field, &spec.options(), &window, &mut ptrs, errs);
        if let Some(f) = f {
            fields.push(f);
        }
    }

    let mut props = Vec::new();
    for (i, p) in cfg.properties.iter().enumerate() {
        let at = || At::Properties(i);
        let from = p.from.clone().unwrap_or_default();
        let raw = match ptrs.pointer(&from) {
            Ok(r) => r,
            Err(e) => {
                errs.push(Found::new(at(), Some("from"), e));
                continue;
            }
        };
        if p.fields.is_some() && p.remaining {
            errs.push(Found::new(
                at(),
                Some("remaining"),
                "set either `fields` (copy these) or `remaining` (copy what no field reads), not both",
            ));
        }
        let prefix = p.prefix.clone().unwrap_or_default();
        for (old, new) in &p.rename {
            if let Some(fields) = &p.fields {
                if !fields.contains(old) {
                    errs.push(Found::new(
                        at(),
                        Some("rename"),
                        format!("`{old}` is not one of `fields`"),
                    ));
                }
            }
            if new.is_empty() {
                errs.push(Found::new(
                    at(),
                    Some("rename"),
                    format!("`{old}` is renamed to an empty name"),
                ));
            }
        }
        let fixed: Vec<String> = match &p.fields {
            Some(fields) => fields
                .iter()
                .map(|k| format!("{prefix}{}", p.rename.get(k).unwrap_or(k)))
                .collect(),
            None => p.rename.values().map(|n| format!("{prefix}{n}")).collect(),
        };
        for n in fixed {
            if KNOWN_FIELDS.contains(&n.as_str()) {
                errs.push(Found::new(
                    at(),
                    None,
                    format!("the custom property `{n}` is an API field name; add a `prefix` or a `rename`"),
                ));
            }
        }
        props.push(Pending {
            item: Props {
                source: UNRESOLVED,
                fields: p.fields.clone(),
                skip: p.except.iter().cloned().collect(),
                prefix,
                rename: p.rename.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            },
            raw: Some(raw),
        });
    }

    if !errs.is_empty() {
        return None;
    }

    // `remaining`: the fields of the properties object that another option reads.
    for (i, p) in cfg.properties.iter().enumerate() {
        if !p.remaining {
            continue;
        }
        let own = match &props[i].raw {
            Some(RawSource::Pointer(own)) => *own,
            _ => continue,
        };
        let base = ptrs.list[own].0.clone();
        for (j, other) in ptrs.list.iter().enumerate() {
            if j != own && other.0.len() > base.len() && other.0.starts_with(&base) {
                props[i].item.skip.insert(other.0[base.len()].clone());
            }
        }
    }

    let (plan, places) = Plan::build(&ptrs.list);
    let mut uses = vec![0usize; plan.slot_count()];
    for p in &places {
        uses[p.slot] += 1;
    }
    let resolve = |raw: Option<RawSource>, may_take: bool| -> Source {
        match raw.expect("source present") {
            RawSource::Other(s) => s,
            RawSource::Pointer(i) => {
                let place = places[i].clone();
                let take = may_take && uses[place.slot] == 1 && place.rest.is_empty();
                Source::Value { place, take }
            }
        }
    };
    let keep_when = keep_when
        .drain(..)
        .map(|mut p| {
            p.item.source = resolve(p.raw.take(), false);
            p.item
        })
        .collect();
    let skip_when = skip_when
        .drain(..)
        .map(|mut p| {
            p.item.source = resolve(p.raw.take(), false);
            p.item
        })
        .collect();
    let fields = fields
        .into_iter()
        .map(|mut p: Pending<Field>| {
            p.item.source = resolve(p.raw.take(), true);
            p.item
        })
        .collect();
    let props = props
        .into_iter()
        .map(|mut p| {
            p.item.source = resolve(p.raw.take(), true);
            p.item
        })
        .collect();
    Some(Compiled {
        topics: cfg.topics.clone(),
        pattern,
        plan,
        keep_when,
        skip_when,
        tombstones: cfg.tombstones.unwrap_or_default(),
        fields,
        props,
        times: Times::new(window),
    })
}

/// The mapping's `timestamp_window`, its defaults for the ends it leaves out; each end that
/// cannot be read, or an empty window, is a problem naming the option.
fn time_window_of(spec: Option<&TimeWindowSpec>, errs: &mut Vec<Found>) -> TimeWindow {
    let Some(spec) = spec else {
        return TimeWindow::DEFAULT;
    };
    let mut end = |option: &'static str, text: &Option<String>, default: Bound| match text {
        None => Some(default),
        Some(t) => Bound::parse(t)
            .map_err(|e| errs.push(Found::new(At::Mapping, Some(option), e)))
            .ok(),
    };
    let earliest = end(
        "timestamp_window.earliest",
        &spec.earliest,
        TimeWindow::DEFAULT.earliest,
    );
    let latest = end("timestamp_window.latest", &spec.latest, TimeWindow::DEFAULT.latest);
    let (Some(earliest), Some(latest)) = (earliest, latest) else {
        return TimeWindow::DEFAULT;
    };
    TimeWindow::new(earliest, latest, time_window::now_nanos()).unwrap_or_else(|e| {
        errs.push(Found::new(At::Mapping, Some("timestamp_window"), e));
        TimeWindow::DEFAULT
    })
}

/// A `timestamp` that is a constant (no `expr` or `table` to change it) outside the window would
/// refuse every record: refused at start-up, naming the constant, the field's reader and the
/// window (found by a new user's trial: `const = 20422` passed `check`).
fn const_time_in_window(o: &FieldOptions, reader: &TimeReader, window: &TimeWindow) -> Result<(), String> {
    let (Some(c), None, None, None) = (&o.constant, &o.from, &o.expr, &o.table) else {
        return Ok(());
    };
    let v = Val::from_json(c.clone());
    // A constant that is no time at all is refused per record, naming the reader.
    match reader.nanos(&v) {
        Ok(nanos) if !window.contains(nanos, time_window::now_nanos()) => Err(format!(
            "{} read with {} is {}, outside the plausible window {}: every record would be refused",
            describe(&v),
            reader.describe_reading(&v, o.time.is_some() || o.time_format.is_some()),
            time_window::instant(nanos),
            window.describe(),
        )),
        _ => Ok(()),
    }
}

/// Whether text is no value once the field's `trim` has run: `""`, or white space only when
/// trimmed (issue 17: absent, null and `""` are one).
fn no_text(t: &str, trim: bool) -> bool {
    if trim {
        t.trim().is_empty()
    } else {
        t.is_empty()
    }
}

/// Whether a `table` key or an `in` value can never meet a value: a value is absent once it is
/// `""` (before `table` and `in` are consulted), and with `trim` it never has white space around it.
fn never_read(t: &str, trim: bool) -> bool {
    t.is_empty() || (trim && t.trim() != t)
}

#[cold]
fn unmatchable(t: &str, trim: bool, instead: &str) -> String {
    if t.is_empty() {
        format!(
            "\"\" can never match: absent, null and \"\" mean the same and are absent before it is read ({instead})"
        )
    } else {
        debug_assert!(trim);
        format!("{t:?} can never match: `trim` removes the white space around a value before it is read")
    }
}

fn compile_field(
    field: ApiField,
    o: &FieldOptions,
    window: &TimeWindow,
    ptrs: &mut Pointers,
    errs: &mut Vec<Found>,
) -> Option<Pending<Field>> {
    let name = field.name();
    let kind = kind_of(field);
    let mut err = |opt: &'static str, m: String| errs.push(Found::new(At::Field(name), Some(opt), m));
    let raw = match (&o.from, &o.constant, &o.expr) {
        (Some(_), Some(_), _) | (None, Some(_), Some(_)) => {
            err("const", "a constant takes no `from` or `expr`".into());
            None
        }
        (Some(from), None, _) => match ptrs.source(from) {
            Ok(r) => Some(r),
            Err(e) => {
                err("from", e);
                None
            }
        },
        (None, Some(c), None) => {
            if let Err(e) = scalar(c, "a constant") {
                err("const", e);
            }
            if c.as_str().is_some_and(|t| no_text(t, o.trim)) {
                err(
                    "const",
                    format!(
                        "{c} is no value{} (absent, null and \"\" mean the same): set a value, or leave the \
                         field out",
                        if o.trim { " once trimmed" } else { "" }
                    ),
                );
            }
            Some(RawSource::Other(Source::Const(Val::from_json(c.clone()))))
        }
        // An expression without `from` reads the whole record value.
        (None, None, Some(_)) => ptrs.pointer("").ok(),
        (None, None, None) => {
            err("from", "a field needs `from`, `const` or `expr`".into());
            None
        }
    };
    let expr = match &o.expr {
        Some(code) => match Expr::compile(code) {
            Ok(e) => Some(e),
            Err(e) => {
                err("expr", e);
                None
            }
        },
        None => None,
    };
    for (opt, v) in [("default", &o.default), ("fallback", &o.fallback)] {
        if let Some(v) = v {
            if let Err(e) = scalar(v, opt) {
                err(opt, e);
            }
        }
    }
    if let Some(d) = o
        .default
        .as_ref()
        .filter(|d| d.as_str().is_some_and(|t| no_text(t, o.trim)))
    {
        err(
            "default",
            format!(
                "{d} is no default{} (absent, null and \"\" mean the same): remove `default`, and the field \
                 is left out when its value is absent",
                if o.trim { " once trimmed" } else { "" }
            ),
        );
    }
    let table = match &o.table {
        Some(t) => {
            for (k, v) in t {
                if let Err(e) = scalar(v, &format!("the table value of `{k}`")) {
                    err("table", e);
                }
                if never_read(k, o.trim) {
                    err("table", unmatchable(k, o.trim, "`default` gives an absent value one"));
                }
            }
            let miss = match (o.otherwise, &o.fallback) {
                (Some(_), Some(_)) => {
                    err("fallback", "set either `otherwise` or `fallback`, not both".into());
                    Miss::DeadLetter
                }
                (_, Some(f)) => Miss::Fallback(Val::from_json(f.clone())),
                (None | Some(Otherwise::DeadLetter), None) => Miss::DeadLetter,
                (Some(Otherwise::Skip), None) => Miss::Skip,
                (Some(Otherwise::Keep), None) => Miss::Keep,
            };
            let keys = ScalarKeys::new(t.iter().map(|(k, v)| (k.clone(), Val::from_json(v.clone()))));
            match keys {
                Ok(keys) => Some((keys, miss)),
                Err(e) => {
                    err("table", e);
                    None
                }
            }
        }
        None => {
            if o.otherwise.is_some() {
                err(
                    "otherwise",
                    "applies to values missing from a `table`; add a `table`".into(),
                );
            }
            if o.fallback.is_some() {
                err(
                    "fallback",
                    "applies to values missing from a `table`; add a `table`".into(),
                );
            }
            None
        }
    };
    let time = match (o.time, &o.time_format) {
        (Some(_), Some(_)) => {
            err("time_format", "set either `time` or `time_format`, not both".into());
            None
        }
        (Some(t), None) => Some(TimeReader::Unit(t)),
        (None, Some(f)) => match TimeReader::format(f) {
            Ok(r) => Some(r),
            Err(e) => {
                err("time_format", e);
                None
            }
        },
        (None, None) => None,
    };
    if time.is_some() && kind != Kind::Time {
        err("time", "applies to the `timestamp` field only".into());
    }
    if kind == Kind::Time {
        if let Err(e) = const_time_in_window(o, time.as_ref().unwrap_or(&DEFAULT_TIME_READER), window) {
            err("const", e);
        }
    }
    let one_of = match &o.one_of {
        Some(list) => {
            if kind != Kind::Bool {
                err("in", "makes a boolean; it applies to `is_crypto` only".into());
            }
            if o.as_type.is_some() {
                err("in", "set either `in` or `as`, not both".into());
            }
            for v in list {
                if v.as_str().is_some_and(|t| never_read(t, o.trim)) {
                    err(
                        "in",
                        unmatchable(
                            v.as_str().unwrap_or_default(),
                            o.trim,
                            "an absent value leaves `is_crypto` out",
                        ),
                    );
                }
            }
            match text_set(list, "each value of `in`") {
                Ok(s) => Some(s),
                Err(e) => {
                    err("in", e);
                    None
                }
            }
        }
        None => None,
    };
    if let Some(t) = o.as_type {
        let fits = match kind {
            Kind::Str => t == AsType::String,
            Kind::Num => matches!(t, AsType::Number | AsType::Integer),
            Kind::Bool => t == AsType::Boolean,
            Kind::Time => t != AsType::Boolean,
        };
        if !fits {
            err(
                "as",
                format!(
                    "`{}` does not fit `{name}`",
                    serde_json::to_string(&t).unwrap_or_default()
                ),
            );
        }
    }
    let sign = match o.sign {
        Some(s) => {
            if kind != Kind::Num {
                err("sign", "applies to `amount` and `bet_result_amount` only".into());
            }
            Some((s, o.sign_for.clone()))
        }
        None => {
            if !o.sign_for.is_empty() {
                err("sign_for", "says when to apply `sign`; add a `sign`".into());
            }
            None
        }
    };
    Some(Pending {
        item: Field {
            name,
            target: field,
            kind,
            source: UNRESOLVED,
            expr,
            // Trimmed here, once, as a value is (the start-up check refused one that trims to "").
            default: o.default.clone().map(|d| {
                if o.trim {
                    convert::trim(Val::from_json(d))
                } else {
                    Val::from_json(d)
                }
            }),
            trim: o.trim,
            case: o.case,
            table,
            as_type: o.as_type,
            time,
            one_of,
            sign,
        },
        raw,
    })
}

#[cfg(test)]
mod tests;
