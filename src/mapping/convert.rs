//! The conversions a field option asks for. Each takes a value and returns the converted value
//! or a sentence saying why it cannot (the caller adds the field and the record). Strings that
//! need no change stay borrowed from the record.

use super::spec::{AsType, Case, Sign, TimeSource};
use super::value::Val;
use crate::decimal::Decimal;
use crate::event::{truncate, TimestampUnit};
use std::borrow::Cow;
use time::format_description::OwnedFormatItem;
use time::{OffsetDateTime, PrimitiveDateTime};

/// A short description of a value for error messages.
pub fn describe(v: &Val) -> String {
    match v {
        Val::Str(s) => format!("the string {:?}", truncate(s)),
        Val::Num(n) => format!("the number {n}"),
        Val::Bool(b) => format!("the boolean {b}"),
        Val::Null => "null".into(),
        Val::Arr(_) => "an array".into(),
        Val::Obj(_) => "an object".into(),
    }
}

/// The scalar values a record value is compared with: a `table`'s keys, an `in` list. A record
/// string or boolean matches an entry of the same text (`true` matches `"true"`; a string
/// `"1.50"` matches `"1.50"` only); a record *number* matches an entry of the same decimal value,
/// written as a number or as a string, however either writes it (`1.50`, `1.5`, `"15e-1"`:
/// issue 16, comparisons of numbers are exact, and how a producer writes a number decides no
/// match). Sorted and binary searched: faster than hashing for the small tables mappings have.
#[derive(Debug, Clone)]
pub struct ScalarKeys<T> {
    /// By the entry's text ([`scalar_text`]).
    texts: Vec<(String, T)>,
    /// Entries that are JSON number text, by [`Decimal::value_key`]: an index into `texts`.
    numbers: Vec<(String, usize)>,
}

impl<T> ScalarKeys<T> {
    /// The entries, each a key's text and what it maps to. `Err` names two keys that are one
    /// number (`1` and `1.0`) and map to different things.
    pub fn new(entries: impl IntoIterator<Item = (String, T)>) -> Result<ScalarKeys<T>, String>
    where
        T: PartialEq,
    {
        let mut texts: Vec<(String, T)> = entries.into_iter().collect();
        texts.sort_by(|a, b| a.0.cmp(&b.0));
        texts.dedup_by(|a, b| a.0 == b.0);
        let mut numbers: Vec<(String, usize)> = texts
            .iter()
            .enumerate()
            .filter_map(|(i, (k, _))| Decimal::parse(k).map(|d| (d.value_key(), i)))
            .collect();
        numbers.sort();
        for w in numbers.windows(2) {
            let ((ka, a), (kb, b)) = (&w[0], &w[1]);
            if ka == kb && texts[*a].1 != texts[*b].1 {
                return Err(format!(
                    "`{}` and `{}` are the same number with different values",
                    texts[*a].0, texts[*b].0
                ));
            }
        }
        numbers.dedup_by(|a, b| a.0 == b.0);
        Ok(ScalarKeys { texts, numbers })
    }

    /// What `v` matches, if it is a scalar that matches an entry.
    pub fn get(&self, v: &Val) -> Option<&T> {
        let i = match v {
            // A table without number keys answers a record number without building its key.
            Val::Num(_) if self.numbers.is_empty() => return None,
            Val::Num(n) => {
                let key = n.value_key();
                let j = self.numbers.binary_search_by(|(k, _)| k.as_str().cmp(&key)).ok()?;
                self.numbers[j].1
            }
            v => {
                let text = scalar_text(v)?;
                self.texts
                    .binary_search_by(|(k, _)| k.as_str().cmp(text.as_ref()))
                    .ok()?
            }
        };
        Some(&self.texts[i].1)
    }

    /// Whether `v` matches an entry.
    pub fn contains(&self, v: &Val) -> bool {
        self.get(v).is_some()
    }
}

/// What `as = "integer"` takes, for its refusals: [`Decimal::to_integer`]'s bound, which keeps
/// an exponent from spelling a number of any length (`1e999999`); digits written out have none.
const INTEGER_DIGITS: &str = "(written with an exponent or a fraction, an integer may have at most 40 digits)";

/// The text of a scalar: strings as they are, numbers as the record wrote them (`1.50` is
/// `"1.50"`), booleans as `true` and `false`.
pub fn scalar_text<'v>(v: &'v Val) -> Option<Cow<'v, str>> {
    match v {
        Val::Str(s) => Some(Cow::Borrowed(s)),
        Val::Num(n) => Some(Cow::Borrowed(n.as_str())),
        Val::Bool(b) => Some(if *b { "true" } else { "false" }.into()),
        _ => None,
    }
}

pub fn trim(v: Val<'_>) -> Val<'_> {
    match v {
        Val::Str(Cow::Borrowed(s)) => Val::Str(Cow::Borrowed(s.trim())),
        Val::Str(Cow::Owned(s)) if s.trim().len() != s.len() => Val::Str(Cow::Owned(s.trim().to_string())),
        v => v,
    }
}

pub fn case(v: Val<'_>, c: Case) -> Val<'_> {
    let Val::Str(s) = v else { return v };
    if s.is_ascii() {
        // Codes and names usually arrive in the right case already: then nothing is copied.
        let changes = |b: &u8| match c {
            Case::Upper => b.is_ascii_lowercase(),
            Case::Lower => b.is_ascii_uppercase(),
        };
        if !s.as_bytes().iter().any(changes) {
            return Val::Str(s);
        }
        let mut s = s.into_owned();
        match c {
            Case::Upper => s.make_ascii_uppercase(),
            Case::Lower => s.make_ascii_lowercase(),
        }
        return Val::Str(Cow::Owned(s));
    }
    Val::Str(Cow::Owned(match c {
        Case::Upper => s.to_uppercase(),
        Case::Lower => s.to_lowercase(),
    }))
}

/// A decimal string as a number (`Decimal::parse_lenient`), borrowing it when it is JSON number
/// text already.
fn decimal_string(s: Cow<'_, str>) -> Option<Decimal<'_>> {
    match s {
        Cow::Borrowed(b) => Decimal::parse_lenient(b),
        Cow::Owned(o) => Decimal::parse_lenient(&o).map(Decimal::into_owned),
    }
}

/// Converts to the JSON type `to`. Numbers are exact throughout (issue 16): a number as a string
/// is its source text, a decimal string as a number keeps its digits, an integer is found without
/// a float.
pub fn as_type(v: Val<'_>, to: AsType) -> Result<Val<'_>, String> {
    match (to, v) {
        (AsType::String, Val::Str(s)) => Ok(Val::Str(s)),
        (AsType::String, Val::Num(n)) => Ok(Val::Str(n.into_text())),
        (AsType::String, Val::Bool(b)) => Ok(Val::Str(Cow::Borrowed(if b { "true" } else { "false" }))),
        (AsType::Number, Val::Num(n)) => Ok(Val::Num(n)),
        (AsType::Number, Val::Str(s)) => match decimal_string(s.clone()) {
            Some(d) => Ok(Val::Num(d)),
            None => Err(format!("{} is not a number", describe(&Val::Str(s)))),
        },
        (AsType::Integer, Val::Num(n)) => {
            let text = n.to_string();
            n.to_integer()
                .map(Val::Num)
                .ok_or_else(|| format!("the number {text} is not an integer {INTEGER_DIGITS}"))
        }
        (AsType::Integer, Val::Str(s)) => match decimal_string(s.clone()).and_then(Decimal::to_integer) {
            Some(d) => Ok(Val::Num(d)),
            None => Err(format!("{} is not an integer {INTEGER_DIGITS}", describe(&Val::Str(s)))),
        },
        (AsType::Boolean, Val::Bool(b)) => Ok(Val::Bool(b)),
        (AsType::Boolean, Val::Num(n)) => {
            let text = n.to_string();
            match n.to_integer() {
                Some(d) if d.is_zero() => Ok(Val::Bool(false)),
                Some(d) if d.as_str() == "1" => Ok(Val::Bool(true)),
                _ => Err(format!("the number {text} is not a boolean (only 0 and 1 are)")),
            }
        }
        (AsType::Boolean, Val::Str(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "y" | "t" => Ok(Val::Bool(true)),
            "false" | "0" | "no" | "n" | "f" => Ok(Val::Bool(false)),
            _ => Err(format!(
                "{} is not a boolean (true/false, 1/0, yes/no, y/n, t/f)",
                describe(&Val::Str(s))
            )),
        },
        (to, v) => Err(format!("{} cannot be converted to {}", describe(&v), as_name(to))),
    }
}

fn as_name(t: AsType) -> &'static str {
    match t {
        AsType::String => "a string",
        AsType::Number => "a number",
        AsType::Integer => "an integer",
        AsType::Boolean => "a boolean",
    }
}

/// Applies a sign rule to a number, exactly: the text's minus sign is added or removed (zero is
/// written without one).
pub fn sign(v: Val<'_>, s: Sign) -> Result<Val<'_>, String> {
    let Val::Num(n) = v else {
        return Err(format!("`sign` needs a number, got {}", describe(&v)));
    };
    Ok(Val::Num(match s {
        Sign::Negate => n.negate(),
        Sign::Positive => n.abs(),
        Sign::Negative if n.is_zero() => n.abs(),
        Sign::Negative => n.abs().negate(),
    }))
}

/// How a time source is read.
#[derive(Debug)]
pub enum TimeReader {
    Unit(TimeSource),
    /// A custom `time_format`, compiled, and as written (for messages).
    Format(OwnedFormatItem, String),
}

/// The reader of a `timestamp` without `time` or `time_format`.
pub const DEFAULT_TIME_READER: TimeReader = TimeReader::Unit(TimeSource::Auto);

impl TimeReader {
    /// Compiles a custom `time_format`.
    pub fn format(f: &str) -> Result<TimeReader, String> {
        time::format_description::parse_owned::<2>(f)
            .map(|items| TimeReader::Format(items, f.to_string()))
            .map_err(|e| format!("`{f}` is not a time format: {e}"))
    }

    /// How this reader read `v`, for a message about the time it gave: `time = "auto"` (the
    /// default) by its size as seconds, `time = "milliseconds"`, `time_format = "…"`.
    #[cold]
    pub fn describe_reading(&self, v: &Val, configured: bool) -> String {
        let default = if configured { "" } else { "the default " };
        match self {
            TimeReader::Format(_, f) => format!("`time_format = {f:?}`"),
            TimeReader::Unit(TimeSource::Auto) => {
                let how = match v {
                    Val::Str(s) if !looks_numeric(s) => "as RFC 3339".to_string(),
                    _ => match number(v).map(|d| auto_pow10(&d)) {
                        Ok(Some(9)) => "by its size as seconds".to_string(),
                        Ok(Some(6)) => "by its size as milliseconds".to_string(),
                        Ok(Some(3)) => "by its size as microseconds".to_string(),
                        _ => "by its size as nanoseconds".to_string(),
                    },
                };
                format!("{default}`time = \"auto\"`, {how}")
            }
            TimeReader::Unit(u) => {
                let name = serde_json::to_string(u).unwrap_or_default();
                format!("`time = {name}`")
            }
        }
    }

    /// Reads `v` as Unix time in nanoseconds.
    pub fn nanos(&self, v: &Val) -> Result<i128, String> {
        match self {
            TimeReader::Format(items, _) => {
                let Val::Str(s) = v else {
                    return Err(format!(
                        "a time in a custom format must be a string, got {}",
                        describe(v)
                    ));
                };
                let s = s.trim();
                OffsetDateTime::parse(s, items)
                    .or_else(|_| PrimitiveDateTime::parse(s, items).map(|p| p.assume_utc()))
                    .map(|t| t.unix_timestamp_nanos())
                    .map_err(|e| format!("{} does not match the time format: {e}", describe(v)))
            }
            TimeReader::Unit(TimeSource::Rfc3339) => parse_rfc3339(v),
            TimeReader::Unit(TimeSource::Iso8601) => match v {
                Val::Str(s) => OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Iso8601::DEFAULT)
                    .map(|t| t.unix_timestamp_nanos())
                    .map_err(|e| format!("{} is not an ISO 8601 time with an offset: {e}", describe(v))),
                _ => Err(format!("an ISO 8601 time must be a string, got {}", describe(v))),
            },
            TimeReader::Unit(TimeSource::Auto) => match v {
                Val::Str(s) if !looks_numeric(s) => parse_rfc3339(v),
                _ => {
                    let n = number(v)?;
                    let pow10 = auto_pow10(&n).ok_or_else(|| out_of_range(v))?;
                    scale(&n, pow10, v)
                }
            },
            TimeReader::Unit(u) => {
                let pow10 = match u {
                    TimeSource::Seconds => 9,
                    TimeSource::Milliseconds => 6,
                    TimeSource::Microseconds => 3,
                    _ => 0,
                };
                scale(&number(v)?, pow10, v)
            }
        }
    }
}

/// Unix nanoseconds in `unit`, rounding down; `v` names the value when it does not fit.
pub fn in_unit(nanos: i128, unit: TimestampUnit, v: &Val) -> Result<i64, String> {
    let per = match unit {
        TimestampUnit::Seconds => 1_000_000_000,
        TimestampUnit::Milliseconds => 1_000_000,
    };
    i64::try_from(nanos.div_euclid(per)).map_err(|_| format!("{} is out of range as a time", describe(v)))
}

fn looks_numeric(s: &str) -> bool {
    let s = s.trim();
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
}

/// The time's number, exactly (a numeric string as `Decimal::parse_lenient` reads it: `" 5 "`,
/// `".5"`). Times are read in exact decimal arithmetic, never through a binary64, which would
/// move `1702963200.001` s a nanosecond and `946684799999999999` ns across 2000-01-01 (issue 17).
fn number<'v>(v: &'v Val) -> Result<Decimal<'v>, String> {
    match v {
        Val::Num(n) => Some(n.reborrow()),
        Val::Str(s) if looks_numeric(s) => Decimal::parse_lenient(s),
        _ => None,
    }
    .ok_or_else(|| format!("{} is not a Unix time", describe(v)))
}

/// The unit `time = "auto"` reads a number in, by its size, as the power of ten that makes it
/// nanoseconds: below 10^11 seconds (9), below 10^14 milliseconds (6), below 10^17 microseconds
/// (3), else nanoseconds (0). Judged on the exact whole part; `None` beyond 10^30.
fn auto_pow10(n: &Decimal<'_>) -> Option<u32> {
    let whole = n.floor_scaled(0)?.abs();
    Some(match whole {
        w if w < 100_000_000_000 => 9,
        w if w < 100_000_000_000_000 => 6,
        w if w < 100_000_000_000_000_000 => 3,
        _ => 0,
    })
}

/// `n` × 10^`pow10` as Unix nanoseconds, rounded down; `v` names the value when it does not fit.
fn scale(n: &Decimal<'_>, pow10: u32, v: &Val) -> Result<i128, String> {
    n.floor_scaled(pow10).ok_or_else(|| out_of_range(v))
}

#[cold]
fn out_of_range(v: &Val) -> String {
    format!("{} is out of range as a time", describe(v))
}

fn parse_rfc3339(v: &Val) -> Result<i128, String> {
    match v {
        Val::Str(s) => OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
            .map(|t| t.unix_timestamp_nanos())
            .map_err(|e| format!("{} is not an RFC 3339 time: {e}", describe(v))),
        _ => Err(format!("an RFC 3339 time must be a string, got {}", describe(v))),
    }
}
