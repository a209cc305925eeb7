//! `datapulse-bridge map`: runs the configured mappings over sample records and shows, record by
//! record, what the API would receive or why it would not. Exits non-zero when a record fails, so
//! partners can run it in CI.

use super::json::Scanner;
use super::value::Val;
use super::{MapOutcome, Mapper, SourceRecord};
use std::io::{BufRead, Write};

/// Counts of what happened to the sample records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub events: usize,
    pub filtered: usize,
    pub failed: usize,
}

/// Maps each sample record of `input` (JSON lines) with `mapper`, through the same
/// [`Mapper::map_for_delivery`] as `run` (with `max_event_bytes`, see
/// [`super::max_event_bytes`]): the events to `out`, failures and filtered records to `err`.
/// `default_topic`: the topic of records that name none.
///
/// Errors: the input cannot be read or the outputs written, or a record has no topic.
pub fn run_map(
    mapper: &Mapper,
    max_event_bytes: usize,
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
        let sample = if n == 1 {
            Sample::parse_first(line)
        } else {
            Sample::parse(line)
        };
        if let Some(why) = &sample.not_envelope {
            writeln!(
                err,
                "line {n}: note: read as the record value itself, not as an envelope: {why}"
            )
            .map_err(io)?;
        }
        let Some(topic) = sample.topic.as_deref().or(default_topic.as_deref()) else {
            return Err(MapRunError::NoTopic { line: n });
        };
        let headers: Vec<(&str, Option<&[u8]>)> =
            sample.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        let rec = SourceRecord {
            topic,
            partition: 0,
            offset: i as i64,
            timestamp_ms: sample.timestamp_ms,
            key: sample.key.as_deref(),
            value: sample.value.as_deref(),
            headers: &headers,
        };
        buf.clear();
        match mapper.map_for_delivery(&rec, max_event_bytes, &mut buf) {
            MapOutcome::Event(_) => {
                summary.events += 1;
                buf.push(b'\n');
                out.write_all(&buf).map_err(io)?;
            }
            MapOutcome::Filtered { reason, .. } => {
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
#[derive(Debug, Default, PartialEq)]
struct Sample {
    topic: Option<String>,
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    /// `None`: a header without a value.
    headers: Vec<(String, Option<Vec<u8>>)>,
    /// Why a line that looks like an envelope (an object with a `value` or `value_base64` key) is
    /// not one: `map` says so rather than silently mapping the line as the record value.
    not_envelope: Option<String>,
}

const ENVELOPE_KEYS: &[&str] = &["key", "value", "value_base64", "headers", "topic", "timestamp"];

impl Sample {
    /// The envelope (`docs/mapping.md`, "How values are read"): a line that is a JSON object of
    /// envelope keys, each at most once, with `value` or `value_base64`. Its `value` is the
    /// record value: an object, array, number or boolean as its exact bytes in the line (never
    /// re-serialised: a repeated key or a long number reaches the mapping as it would from
    /// Kafka), a string as its text (for values that are not JSON), `null` for a tombstone;
    /// `value_base64` gives any bytes. `key` and each header are a string, `null` (no key; a
    /// header without a value, as Kafka allows: absent to the mapping, as in `run`),
    /// `{"base64": ".."}`, or other JSON as its exact bytes.
    /// Any other line, JSON or not, is the record value itself, so bad values can be tried too.
    fn parse(line: &[u8]) -> Sample {
        Sample::envelope(line).unwrap_or_else(|| Sample {
            value: Some(line.to_vec()),
            not_envelope: near_envelope(line),
            ..Sample::default()
        })
    }

    /// The first line of the input: a file saved with a UTF-8 byte order mark (Notepad,
    /// PowerShell 5's `-Encoding UTF8`) starts it with one, and an envelope after the mark is
    /// still an envelope. A line that is no envelope keeps its mark (the mapping ignores one).
    fn parse_first(line: &[u8]) -> Sample {
        match line.strip_prefix(b"\xEF\xBB\xBF") {
            Some(rest) => Sample::envelope(rest).unwrap_or_else(|| Sample {
                value: Some(line.to_vec()),
                not_envelope: near_envelope(rest),
                ..Sample::default()
            }),
            None => Sample::parse(line),
        }
    }

    fn envelope(line: &[u8]) -> Option<Sample> {
        let text = std::str::from_utf8(line).ok()?;
        let mut s = Scanner::new(text);
        if s.peek() != Some(b'{') {
            return None;
        }
        s.bump();
        let mut seen: Vec<String> = Vec::new();
        let mut sample = Sample::default();
        if !s.eat(b'}') {
            loop {
                let k = s.key().ok()?.into_owned();
                if !ENVELOPE_KEYS.contains(&k.as_str()) || seen.contains(&k) {
                    return None;
                }
                match k.as_str() {
                    "value" => sample.value = exact_value(&mut s, text)?,
                    "value_base64" => sample.value = Some(base64(&mut s)?),
                    "key" => sample.key = bytes(&mut s, text)?,
                    "topic" => match s.value(0).ok()? {
                        Val::Str(t) => sample.topic = Some(t.into_owned()),
                        Val::Null => {}
                        _ => return None,
                    },
                    "timestamp" => match s.value(0).ok()? {
                        Val::Num(n) => sample.timestamp_ms = Some(n.as_i64()?),
                        Val::Null => {}
                        _ => return None,
                    },
                    _ => sample.headers = headers(&mut s, text)?,
                }
                seen.push(k);
                if !s.next_member(b'}').ok()? {
                    break;
                }
            }
        }
        s.end().ok()?;
        let values = seen.iter().filter(|k| k.starts_with("value")).count();
        (values == 1).then_some(sample)
    }
}

/// For a line [`Sample::envelope`] refused: why it is not an envelope, when it looks like one (a
/// JSON object with a `value` or `value_base64` key; a record may have a field `value`, so such a
/// line is still mapped as the record value, with this said).
fn near_envelope(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?;
    let mut s = Scanner::new(text);
    s.expect(b'{', "").ok()?;
    let mut keys: Vec<String> = Vec::new();
    if !s.eat(b'}') {
        loop {
            keys.push(s.key().ok()?.into_owned());
            s.skip_syntax().ok()?;
            if !s.next_member(b'}').ok()? {
                break;
            }
        }
    }
    s.end().ok()?;
    let has = |k: &str| keys.iter().any(|x| x == k);
    if !has("value") && !has("value_base64") {
        return None;
    }
    let unknown: Vec<String> = keys
        .iter()
        .filter(|k| !ENVELOPE_KEYS.contains(&k.as_str()))
        .map(|k| format!("`{}`", crate::event::truncate(k)))
        .collect();
    let twice = ENVELOPE_KEYS
        .iter()
        .find(|e| keys.iter().filter(|k| k == e).count() > 1);
    Some(if !unknown.is_empty() {
        format!(
            "{} not an envelope key (the keys: {})",
            unknown.join(", ") + if unknown.len() == 1 { " is" } else { " are" },
            ENVELOPE_KEYS.join(", ")
        )
    } else if let Some(k) = twice {
        format!("the key `{k}` appears twice")
    } else if has("value") && has("value_base64") {
        "it has both `value` and `value_base64`".to_string()
    } else {
        "a key has a value of the wrong form (`key` and each header: a string, null or {\"base64\": \"…\"}; `headers`: an object; `topic`: a string; `timestamp`: integer milliseconds; `value_base64`: base64)".to_string()
    })
}

/// The record value of an envelope's `value`: `Some(None)` for a tombstone, `None` when the line
/// is not an envelope.
fn exact_value(s: &mut Scanner<'_>, text: &str) -> Option<Option<Vec<u8>>> {
    match s.peek()? {
        b'"' => Some(Some(s.string().ok()?.into_owned().into_bytes())),
        b'n' => s.skip().ok().map(|()| None),
        _ => {
            let start = s.offset();
            s.skip_syntax().ok()?;
            Some(Some(text.as_bytes()[start..s.offset()].to_vec()))
        }
    }
}

/// A key or header: a string (its text), `null` (`Some(None)`), `{"base64": ".."}` (the decoded
/// bytes), or any other JSON (its exact bytes, as a Debezium JSON key); `None` when the line is
/// not an envelope.
fn bytes(s: &mut Scanner<'_>, text: &str) -> Option<Option<Vec<u8>>> {
    let quoted = s.peek()? == b'"';
    let raw = exact_value(s, text)?;
    Some(raw.map(|raw| {
        match std::str::from_utf8(&raw)
            .ok()
            .filter(|_| !quoted)
            .and_then(base64_object)
        {
            Some(decoded) => decoded,
            None => raw,
        }
    }))
}

/// The bytes of `{"base64": ".."}`, when `raw` is that.
fn base64_object(raw: &str) -> Option<Vec<u8>> {
    let mut s = Scanner::new(raw);
    s.expect(b'{', "").ok()?;
    if s.key().ok()? != "base64" {
        return None;
    }
    let decoded = base64(&mut s)?;
    s.expect(b'}', "").ok()?;
    s.end().ok()?;
    Some(decoded)
}

fn base64(s: &mut Scanner<'_>) -> Option<Vec<u8>> {
    use base64::Engine;
    let Val::Str(text) = s.value(0).ok()? else {
        return None;
    };
    base64::engine::general_purpose::STANDARD.decode(text.as_bytes()).ok()
}

/// An envelope's `headers`: an object of header names (a name may repeat, as in Kafka); `null`
/// is a header without a value, as Kafka allows.
fn headers(s: &mut Scanner<'_>, text: &str) -> Option<Vec<(String, Option<Vec<u8>>)>> {
    s.expect(b'{', "").ok()?;
    let mut out = Vec::new();
    if s.eat(b'}') {
        return Some(out);
    }
    loop {
        let name = s.key().ok()?.into_owned();
        out.push((name, bytes(s, text)?));
        if !s.next_member(b'}').ok()? {
            return Some(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ContractOptions;

    #[test]
    fn an_envelope_gives_its_value_exactly_and_its_headers_as_written() {
        let line = br#"{"topic":"t","key":"k-1","value": {"a":1,"a":2,"n":77012345678901234567890123} ,"headers":{"h":"v","none":null,"bin":{"base64":"/w=="},"h":"again"},"timestamp":1702963200123}"#;
        let s = Sample::parse(line);
        assert_eq!(
            s.value.as_deref(),
            Some(&br#"{"a":1,"a":2,"n":77012345678901234567890123}"#[..]),
            "the value's bytes, not a re-serialisation (which would merge `a` and round `n`)"
        );
        assert_eq!(
            s.headers,
            [
                ("h".to_string(), Some(b"v".to_vec())),
                ("none".to_string(), None),
                ("bin".to_string(), Some(vec![0xff])),
                ("h".to_string(), Some(b"again".to_vec()))
            ]
        );
        assert_eq!(
            (s.topic.as_deref(), s.key.as_deref(), s.timestamp_ms),
            (Some("t"), Some(&b"k-1"[..]), Some(1_702_963_200_123))
        );
    }

    #[test]
    fn values_that_are_not_json_and_lines_that_are_no_envelope() {
        // A string is the value's text; null a tombstone; value_base64 any bytes.
        assert_eq!(
            Sample::parse(br#"{"value":"not {json"}"#).value.as_deref(),
            Some(&b"not {json"[..])
        );
        assert_eq!(
            Sample::parse(br#"{"value":"{\"a\":1}"}"#).value.as_deref(),
            Some(&br#"{"a":1}"#[..])
        );
        let tombstone = Sample::parse(br#"{"value":null,"key":{"base64":"AAE="}}"#);
        assert_eq!((tombstone.value, tombstone.key), (None, Some(vec![0, 1])));
        assert_eq!(
            Sample::parse(br#"{"value_base64":"/+4="}"#).value,
            Some(vec![0xff, 0xee])
        );
        // Other JSON as a key or header is its bytes, as a Debezium key is.
        let debezium = Sample::parse(br#"{"value":{},"key":{"id":101},"headers":{"n":1.50}}"#);
        assert_eq!(debezium.key.as_deref(), Some(&br#"{"id":101}"#[..]));
        assert_eq!(debezium.headers, [("n".to_string(), Some(b"1.50".to_vec()))]);
        // Not envelopes, so the line itself is the value: another key, a key twice, both value
        // forms, no value, headers that are not an object, trailing bytes.
        for line in [
            &br#"{"value":{},"other":1}"#[..],
            br#"{"value":{},"value":{}}"#,
            br#"{"value":{},"value_base64":""}"#,
            br#"{"key":"k"}"#,
            br#"{"value":{},"headers":[]}"#,
            br#"{"value":{}} x"#,
            b"\xff{}",
        ] {
            assert_eq!(
                Sample::parse(line).value.as_deref(),
                Some(line),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn a_line_that_looks_like_an_envelope_but_is_not_says_why() {
        let why = |line: &[u8]| Sample::parse(line).not_envelope;
        assert_eq!(
            why(br#"{"value":{"u":"p"},"header":{"h":"v"}}"#).as_deref(),
            Some("`header` is not an envelope key (the keys: key, value, value_base64, headers, topic, timestamp)")
        );
        assert_eq!(
            why(br#"{"value":{},"value":{}}"#).as_deref(),
            Some("the key `value` appears twice")
        );
        assert_eq!(
            why(br#"{"value":{},"value_base64":""}"#).as_deref(),
            Some("it has both `value` and `value_base64`")
        );
        assert!(why(br#"{"value":{},"timestamp":"yesterday"}"#)
            .unwrap()
            .starts_with("a key has a value of the wrong form"));
        // A record that is no envelope and does not look like one, and a real envelope: nothing.
        assert_eq!(why(br#"{"u":"p","amount":5}"#), None);
        assert_eq!(why(br#"{"value":{"u":"p"},"headers":{"h":"v"}}"#), None);
        // `map` says it on the line, and still maps the line as the record value.
        let mapper = Mapper::compile(
            &toml::from_str::<Doc>("[[mapping]]\ntopics = [\"t\"]\nclient_user_id = \"/value/u\"\nevent_name = { const = \"custom\" }\ntimestamp = { const = 1702963200 }\n")
                .unwrap()
                .mapping,
            &ContractOptions::default(),
        )
        .unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let input = br#"{"value":{"u":"p-1"},"header":{"h":"v"}}"#;
        let summary = run_map(&mapper, 1 << 20, Some("t".into()), &input[..], &mut out, &mut err).unwrap();
        assert_eq!(summary.events, 1);
        let err = String::from_utf8(err).unwrap();
        assert!(
            err.starts_with(
                "line 1: note: read as the record value itself, not as an envelope: `header` is not an envelope key"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_byte_order_mark_before_the_first_line_leaves_an_envelope_an_envelope() {
        let envelope = br#"{"topic":"t","value":{"u":"p-1"},"headers":{"h":"v"}}"#;
        let marked = [&b"\xEF\xBB\xBF"[..], envelope].concat();
        let s = Sample::parse_first(&marked);
        assert_eq!(
            (s.value.as_deref(), s.topic.as_deref(), s.headers.len()),
            (Some(&br#"{"u":"p-1"}"#[..]), Some("t"), 1)
        );
        // A record line keeps its mark (the mapping skips one, as from Kafka); only the first
        // line of a file can carry a file's mark.
        let raw = [&b"\xEF\xBB\xBF"[..], br#"{"u":"p-1"}"#].concat();
        assert_eq!(Sample::parse_first(&raw).value.as_deref(), Some(&raw[..]));
        assert_eq!(Sample::parse(&marked).value.as_deref(), Some(&marked[..]));
    }

    /// An envelope passes its value's bytes on when their structure holds: what the mapping
    /// refuses in them (`1e400`, a lone surrogate) it refuses as `run` does, naming where in the
    /// value, under the envelope's topic (found by review: such a line became a raw record).
    #[test]
    fn an_envelope_with_a_value_the_mapping_refuses_stays_an_envelope() {
        for line in [
            &br#"{"topic":"other","value":{"u":"p","x":1e400}}"#[..],
            br#"{"topic":"other","value":{"u":"p","x":"\ud800"}}"#,
            br#"{"topic":"other","value":{"u":"p"},"headers":{"n":1e400}}"#,
        ] {
            let s = Sample::parse(line);
            assert_eq!(
                (s.topic.as_deref(), s.not_envelope.as_deref()),
                (Some("other"), None),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        let s = Sample::parse(br#"{"value":{"u":"p"},"headers":{"n":1e400}}"#);
        assert_eq!(s.headers, [("n".to_string(), Some(b"1e400".to_vec()))]);
    }

    #[derive(serde::Deserialize)]
    struct Doc {
        mapping: Vec<super::super::MappingConfig>,
    }

    #[test]
    fn map_refuses_an_event_too_large_for_a_request_as_run_does() {
        let doc: Doc = toml::from_str(
            r#"[[mapping]]
topics = ["t"]
client_user_id = "/u"
event_name = { const = "custom" }
timestamp = { const = 1702963200 }
properties = { from = "/p" }
"#,
        )
        .unwrap();
        let mapper = Mapper::compile(&doc.mapping, &ContractOptions::default()).unwrap();
        // An 18 KB event, and batch.max_bytes = 16 KiB: `run` dead-letters it, so `map` fails it.
        let props: Vec<String> = (0..3).map(|i| format!(r#""p{i}":"{}""#, "x".repeat(6000))).collect();
        let input = format!("{{\"u\":\"p-1\",\"p\":{{{}}}}}\n{{\"u\":\"p-2\"}}\n", props.join(","));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let limit = super::super::max_event_bytes(16 * 1024);
        let summary = run_map(&mapper, limit, Some("t".into()), input.as_bytes(), &mut out, &mut err).unwrap();
        let err = String::from_utf8(err).unwrap();
        assert_eq!((summary.events, summary.failed), (1, 1), "{err}");
        assert!(
            err.contains("line 1: failed at validation (too_large): the event is 18"),
            "{err}"
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"client_user_id\":\"p-2\",\"event_name\":\"custom\",\"timestamp\":1702963200}\n"
        );
    }

    /// `map` gives a tombstone and a header without a value the verdicts `run` gives (issue 17):
    /// the envelope's `"value":null` is filtered under `tombstones = "filter"`, its `null` header
    /// is absent, and each line's verdict is `Mapper::map_for_delivery`'s on the same record.
    #[test]
    fn map_filters_tombstones_and_reads_headers_without_a_value_as_run_does() {
        let doc: Doc = toml::from_str(
            r#"[[mapping]]
topics = ["t"]
tombstones = "filter"
client_user_id = "/u"
event_name = { const = "bet" }
timestamp = { const = 1702963200 }
transaction_id = "key"
amount = { const = 5 }
currency = { const = "EUR" }
ip_address = "header:x-client-ip"
"#,
        )
        .unwrap();
        let mapper = Mapper::compile(&doc.mapping, &ContractOptions::default()).unwrap();
        let input = concat!(
            r#"{"key":"b-1","value":{"u":"p-1"},"headers":{"x-client-ip":null}}"#,
            "\n",
            r#"{"key":"b-1","value":null,"headers":{"x-client-ip":"198.51.100.7"}}"#,
            "\n",
            r#"{"key":"b-2","value":{"u":"p-1"},"headers":{"x-client-ip":""}}"#,
            "\n",
        );
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let summary = run_map(&mapper, 1 << 20, Some("t".into()), input.as_bytes(), &mut out, &mut err).unwrap();
        let (out, err) = (String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap());
        assert_eq!((summary.events, summary.filtered, summary.failed), (2, 1, 0), "{err}");
        assert_eq!(
            out,
            concat!(
                r#"{"client_user_id":"p-1","event_name":"bet","timestamp":1702963200,"transaction_id":"b-1","amount":5,"currency":"EUR"}"#,
                "\n",
                r#"{"client_user_id":"p-1","event_name":"bet","timestamp":1702963200,"transaction_id":"b-2","amount":5,"currency":"EUR"}"#,
                "\n"
            )
        );
        assert_eq!(
            err,
            "line 2: filtered: tombstone: the record has no value (tombstones = \"filter\")\n3 records: 2 events, 1 \
             filtered, 0 failed\n"
        );
        // What `run` gives the same records: a header without a value (`None`), a tombstone.
        let run = |value: Option<&[u8]>, ip: Option<&[u8]>| {
            let headers = [("x-client-ip", ip)];
            let rec = SourceRecord {
                topic: "t",
                partition: 0,
                offset: 0,
                timestamp_ms: None,
                key: Some(b"b-1"),
                value,
                headers: &headers,
            };
            let mut body = Vec::new();
            match mapper.map_for_delivery(&rec, 1 << 20, &mut body) {
                MapOutcome::Event(_) => String::from_utf8(body).unwrap(),
                MapOutcome::Filtered { code, .. } => code.to_string(),
                MapOutcome::Failed(e) => e.reason,
            }
        };
        assert_eq!(run(Some(br#"{"u":"p-1"}"#), None), out.lines().next().unwrap());
        assert_eq!(run(None, Some(b"198.51.100.7")), "tombstone");
    }
}
