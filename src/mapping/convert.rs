//! The conversions a field option asks for. Each takes a JSON value and returns the converted
//! value or a sentence saying why it cannot (the caller adds the field and the record).

use super::spec::{AsType, Case, Sign, TimeSource};
use crate::event::{truncate, TimestampUnit};
use serde_json::{Number, Value};
use time::format_description::OwnedFormatItem;
use time::{OffsetDateTime, PrimitiveDateTime};

/// A short description of a value for error messages.
pub fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {:?}", truncate(s)),
        Value::Number(n) => format!("the number {n}"),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Null => "null".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// The text of a scalar, as table keys and `in` lists compare it: strings as they are, numbers
/// and booleans as JSON writes them.
pub fn scalar_text(v: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match v {
        Value::String(s) => Some(s.as_str().into()),
        Value::Number(n) => Some(n.to_string().into()),
        Value::Bool(b) => Some(if *b { "true" } else { "false" }.into()),
        _ => None,
    }
}

pub fn trim(v: Value) -> Value {
    match v {
        Value::String(s) if s.trim().len() != s.len() => Value::String(s.trim().to_string()),
        v => v,
    }
}

pub fn case(v: Value, c: Case) -> Value {
    match v {
        // ASCII (the common case: codes, names) changes in place, without allocating.
        Value::String(mut s) if s.is_ascii() => {
            match c {
                Case::Upper => s.make_ascii_uppercase(),
                Case::Lower => s.make_ascii_lowercase(),
            }
            Value::String(s)
        }
        Value::String(s) => Value::String(match c {
            Case::Upper => s.to_uppercase(),
            Case::Lower => s.to_lowercase(),
        }),
        v => v,
    }
}

fn finite(f: f64) -> Result<Value, String> {
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| format!("{f} is not a finite number"))
}

/// Converts to the JSON type `to`.
pub fn as_type(v: Value, to: AsType) -> Result<Value, String> {
    match (to, v) {
        (AsType::String, Value::String(s)) => Ok(Value::String(s)),
        (AsType::String, Value::Number(n)) => Ok(Value::String(n.to_string())),
        (AsType::String, Value::Bool(b)) => Ok(Value::String(b.to_string())),
        (AsType::Number, Value::Number(n)) => Ok(Value::Number(n)),
        (AsType::Number, Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(f) if s.trim().bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) => finite(f),
            _ => Err(format!("{} is not a number", describe(&Value::String(s)))),
        },
        (AsType::Integer, Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Value::from(i)),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Value::from(f as i64)),
            _ => Err(format!("the number {n} is not an integer")),
        },
        (AsType::Integer, Value::String(s)) => match s.trim().parse::<i64>() {
            Ok(i) => Ok(Value::from(i)),
            Err(_) => Err(format!("{} is not an integer", describe(&Value::String(s)))),
        },
        (AsType::Boolean, Value::Bool(b)) => Ok(Value::Bool(b)),
        (AsType::Boolean, Value::Number(n)) => match n.as_f64() {
            Some(0.0) => Ok(Value::Bool(false)),
            Some(1.0) => Ok(Value::Bool(true)),
            _ => Err(format!("the number {n} is not a boolean (only 0 and 1 are)")),
        },
        (AsType::Boolean, Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "y" | "t" => Ok(Value::Bool(true)),
            "false" | "0" | "no" | "n" | "f" => Ok(Value::Bool(false)),
            _ => Err(format!(
                "{} is not a boolean (true/false, 1/0, yes/no, y/n, t/f)",
                describe(&Value::String(s))
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

/// Applies a sign rule to a number.
pub fn sign(v: Value, s: Sign) -> Result<Value, String> {
    let Some(f) = v.as_f64() else {
        return Err(format!("`sign` needs a number, got {}", describe(&v)));
    };
    let f = match s {
        Sign::Negate => -f,
        Sign::Positive => f.abs(),
        Sign::Negative => -f.abs(),
    };
    // Integers stay integers (the sign of an integer is integral).
    if v.is_i64() {
        return Ok(Value::from(f as i64));
    }
    finite(f)
}

/// How a time source is read.
#[derive(Debug)]
pub enum TimeReader {
    Unit(TimeSource),
    Format(OwnedFormatItem),
}

impl TimeReader {
    /// Compiles a custom `time_format`.
    pub fn format(f: &str) -> Result<TimeReader, String> {
        time::format_description::parse_owned::<2>(f)
            .map(TimeReader::Format)
            .map_err(|e| format!("`{f}` is not a time format: {e}"))
    }

    /// Reads `v` and returns it in `unit`, rounding down.
    pub fn read(&self, v: &Value, unit: TimestampUnit) -> Result<i64, String> {
        let nanos = self.nanos(v)?;
        let per = match unit {
            TimestampUnit::Seconds => 1_000_000_000,
            TimestampUnit::Milliseconds => 1_000_000,
        };
        i64::try_from(nanos.div_euclid(per)).map_err(|_| format!("{} is out of range as a time", describe(v)))
    }

    fn nanos(&self, v: &Value) -> Result<i128, String> {
        match self {
            TimeReader::Format(items) => {
                let Value::String(s) = v else {
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
                Value::String(s) => {
                    OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Iso8601::DEFAULT)
                        .map(|t| t.unix_timestamp_nanos())
                        .map_err(|e| format!("{} is not an ISO 8601 time with an offset: {e}", describe(v)))
                }
                _ => Err(format!("an ISO 8601 time must be a string, got {}", describe(v))),
            },
            TimeReader::Unit(TimeSource::Auto) => match v {
                Value::String(s) if !looks_numeric(s) => parse_rfc3339(v),
                _ => {
                    let n = number(v)?;
                    let unit = match n.abs() {
                        a if a < 1e11 => 1e9,
                        a if a < 1e14 => 1e6,
                        a if a < 1e17 => 1e3,
                        _ => 1.0,
                    };
                    scale(n, unit, v)
                }
            },
            TimeReader::Unit(u) => {
                let per = match u {
                    TimeSource::Seconds => 1e9,
                    TimeSource::Milliseconds => 1e6,
                    TimeSource::Microseconds => 1e3,
                    _ => 1.0,
                };
                // Integers keep full precision; only fractional inputs go through f64.
                if let Some(i) = integer(v) {
                    return Ok(i128::from(i) * per as i128);
                }
                scale(number(v)?, per, v)
            }
        }
    }
}

fn looks_numeric(s: &str) -> bool {
    let s = s.trim();
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
}

fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn number(v: &Value) -> Result<f64, String> {
    let f = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if looks_numeric(s) => s.trim().parse().ok(),
        _ => None,
    };
    f.filter(|f| f.is_finite())
        .ok_or_else(|| format!("{} is not a Unix time", describe(v)))
}

fn scale(n: f64, per: f64, v: &Value) -> Result<i128, String> {
    let x = (n * per).floor();
    if x.abs() > 9.0e27 {
        return Err(format!("{} is out of range as a time", describe(v)));
    }
    Ok(x as i128)
}

fn parse_rfc3339(v: &Value) -> Result<i128, String> {
    match v {
        Value::String(s) => OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
            .map(|t| t.unix_timestamp_nanos())
            .map_err(|e| format!("{} is not an RFC 3339 time: {e}", describe(v))),
        _ => Err(format!("an RFC 3339 time must be a string, got {}", describe(v))),
    }
}
