//! `datapulse-bridge map`: runs the configured mappings over sample records and shows, record by
//! record, what the API would receive or why it would not. Exits non-zero when a record fails, so
//! partners can run it in CI.

use super::{MapOutcome, Mapper, SourceRecord};
use serde_json::Value;
use std::io::{BufRead, Write};

/// Counts of what happened to the sample records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub events: usize,
    pub filtered: usize,
    pub failed: usize,
}

/// Maps each sample record of `input` (JSON lines) with `mapper`: the events to `out`, failures
/// and filtered records to `err`. `default_topic`: the topic of records that name none.
///
/// Errors: the input cannot be read or the outputs written, or a record has no topic.
pub fn run_map(
    mapper: &Mapper,
    default_topic: Option<String>,
    input: impl BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Summary, MapRunError> {
    let io = MapRunError::Write;
    let mut summary = Summary::default();
    let mut buf = Vec::new();
    for (i, line) in input.split(b'\n').enumerate() {
        let line = line.map_err(MapRunError::Read)?;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        let n = i + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let sample = Sample::parse(line);
        let Some(topic) = sample.topic.as_deref().or(default_topic.as_deref()) else {
            return Err(MapRunError::NoTopic { line: n });
        };
        let headers: Vec<(&str, &[u8])> = sample.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        let rec = SourceRecord {
            topic,
            partition: 0,
            offset: i as i64,
            timestamp_ms: sample.timestamp_ms,
            key: sample.key.as_deref(),
            value: sample.value.as_deref(),
            headers: &headers,
        };
        match mapper.map(&rec) {
            MapOutcome::Event(e) => {
                summary.events += 1;
                buf.clear();
                e.write_json(&mut buf);
                buf.push(b'\n');
                out.write_all(&buf).map_err(io)?;
            }
            MapOutcome::Filtered { reason } => {
                summary.filtered += 1;
                writeln!(err, "line {n}: filtered: {reason}").map_err(io)?;
            }
            MapOutcome::Failed(e) => {
                summary.failed += 1;
                let field = e.field.map(|f| format!(" on field `{f}`")).unwrap_or_default();
                writeln!(
                    err,
                    "line {n}: failed at {}{field} ({}): {}",
                    e.stage.as_str(),
                    e.reason,
                    e.message
                )
                .map_err(io)?;
            }
        }
    }
    out.flush().map_err(io)?;
    writeln!(
        err,
        "{} records: {} events, {} filtered, {} failed",
        summary.events + summary.filtered + summary.failed,
        summary.events,
        summary.filtered,
        summary.failed
    )
    .map_err(io)?;
    Ok(summary)
}

/// Why [`run_map`] stopped before the end of its input.
#[derive(Debug, thiserror::Error)]
pub enum MapRunError {
    #[error("cannot read the records: {0}")]
    Read(std::io::Error),
    #[error("cannot write: {0}")]
    Write(std::io::Error),
    /// The record on this line names no topic and there is no default.
    #[error("no topic: pass --topic, set kafka.topics, or give each record a \"topic\"")]
    NoTopic { line: usize },
}

/// One sample line as a record.
#[derive(Debug, Default)]
struct Sample {
    topic: Option<String>,
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

const ENVELOPE_KEYS: &[&str] = &["key", "value", "headers", "topic", "timestamp"];

impl Sample {
    /// An object whose keys are all envelope keys and that has `value` is an envelope; any other
    /// line, JSON or not, is the record value itself (so bad values can be tried too).
    fn parse(line: &[u8]) -> Sample {
        let raw = Sample {
            value: Some(line.to_vec()),
            ..Sample::default()
        };
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(line) else {
            return raw;
        };
        if !obj.contains_key("value") || !obj.keys().all(|k| ENVELOPE_KEYS.contains(&k.as_str())) {
            return raw;
        }
        let bytes = |v: &Value| match v {
            Value::String(s) => s.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        };
        Sample {
            topic: obj.get("topic").and_then(Value::as_str).map(str::to_string),
            timestamp_ms: obj.get("timestamp").and_then(Value::as_i64),
            key: obj.get("key").filter(|k| !k.is_null()).map(bytes),
            value: obj
                .get("value")
                .filter(|v| !v.is_null())
                .map(|v| v.to_string().into_bytes()),
            headers: match obj.get("headers") {
                Some(Value::Object(h)) => h.iter().map(|(k, v)| (k.clone(), bytes(v))).collect(),
                _ => Vec::new(),
            },
        }
    }
}
