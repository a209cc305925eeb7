//! Pure helpers of the retry policy: `Retry-After`, backoff delays and 400 bodies. No I/O here, so
//! each rule is unit-tested alone.

use rand::Rng;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// Longest pause a `Retry-After` may impose. A larger value is more likely a bug (a timestamp sent
/// as seconds) than a wish; the bridge pauses this long, then asks again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The pause a `Retry-After` header asks for: delay-seconds or an HTTP date (IMF-fixdate, and the
/// obsolete RFC 850 and asctime forms that HTTP recipients must accept). A date in the past means
/// no pause. `None` for anything else, in which case the caller backs off on its own.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: delay-seconds. Too many digits to fit is still "very long".
        let secs = v.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER))
}

/// The wait a `Retry-After` value asks for (RFC 9110 §10.2.3), judging an HTTP date against the
/// answer's own `Date` header (RFC 9110 §6.6.1) when it has a valid one, else against `now`: a
/// client clock off by minutes neither hammers nor waits long. A date already past is
/// `Duration::ZERO` (the decision waits the shortest backoff then). `None` when unparsable.
pub fn retry_after_of(value: &str, date: Option<&str>, now: SystemTime) -> Option<Duration> {
    let reference = date
        .and_then(|d| httpdate::parse_http_date(d.trim()).ok())
        .unwrap_or(now);
    parse_retry_after(value, reference)
}

/// Exponential backoff with full jitter: a uniform draw from `[0, min(max, initial × 2^(attempt-1))]`
/// for `attempt` ≥ 1. Full jitter spreads replicas that failed together so they do not retry
/// together.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let ceiling = backoff_ceiling(attempt, initial, max);
    if ceiling.is_zero() {
        return ceiling;
    }
    let nanos = rand::rng().random_range(0..=ceiling.as_nanos().min(u64::MAX as u128) as u64);
    Duration::from_nanos(nanos)
}

/// The upper bound of [`backoff`] for `attempt`.
pub fn backoff_ceiling(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    initial.saturating_mul(1u32 << exp.min(31)).min(max)
}

/// The bad events a 400 body names, when it names them: the sandbox (and, we hope, the API)
/// answers `{"error":"validation_failed","errors":[{"index":3,"field":…,"rule":…,"message":…}]}`.
///
/// Returns, for each named index, the part of the body about that event: the top-level `error`
/// and that event's entries of `errors`, without `index` (which only meant something inside the
/// request). `None` when the body names no event, or names one that is not in the request (then
/// the body cannot be trusted, and the caller bisects).
pub fn parse_bad_indexes(body: &[u8], request_len: usize) -> Option<BTreeMap<usize, String>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object()?;
    let errors = obj.get("errors")?.as_array()?;
    let mut by_index: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
    for entry in errors {
        let mut entry = entry.as_object()?.clone();
        let index = usize::try_from(entry.remove("index")?.as_u64()?).ok()?;
        if index >= request_len {
            return None;
        }
        by_index.entry(index).or_default().push(Value::Object(entry));
    }
    if by_index.is_empty() {
        return None;
    }
    Some(
        by_index
            .into_iter()
            .map(|(i, entries)| {
                let mut part = Map::new();
                if let Some(e) = obj.get("error") {
                    part.insert("error".into(), e.clone());
                }
                part.insert("errors".into(), Value::Array(entries));
                (i, Value::Object(part).to_string())
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn retry_after_http_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        // RFC 850 and asctime forms.
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun Nov  6 08:49:40 1994", now),
            Some(Duration::from_secs(3))
        );
        // In the past: no pause.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_date_is_judged_against_the_answers_date() {
        // The client's clock is 10 minutes ahead of the server's.
        let server = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let client = server + Duration::from_secs(600);
        let date = Some("Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(
            retry_after_of("Sun, 06 Nov 1994 08:49:45 GMT", date, client),
            Some(Duration::from_secs(8))
        );
        // Without (or with a garbled) Date: the client's clock.
        assert_eq!(
            retry_after_of("Sun, 06 Nov 1994 08:49:45 GMT", None, client),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after_of("Sun, 06 Nov 1994 08:49:45 GMT", Some("yesterday"), server),
            Some(Duration::from_secs(8))
        );
        // Seconds do not depend on any clock; the cap stays.
        assert_eq!(retry_after_of("8", date, client), Some(Duration::from_secs(8)));
        assert_eq!(retry_after_of("86400", date, client), Some(MAX_RETRY_AFTER));
        assert_eq!(
            retry_after_of("Mon, 07 Nov 1994 08:49:37 GMT", date, client),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn retry_after_garbage() {
        let now = SystemTime::now();
        for g in ["", "soon", "-5", "1.5", "12s", "Sun, 06 Nov 1994", "0x10"] {
            assert_eq!(parse_retry_after(g, now), None, "{g:?}");
        }
    }

    #[test]
    fn backoff_stays_within_bounds() {
        let initial = Duration::from_millis(200);
        let max = Duration::from_secs(30);
        assert_eq!(backoff_ceiling(1, initial, max), initial);
        assert_eq!(backoff_ceiling(2, initial, max), Duration::from_millis(400));
        assert_eq!(backoff_ceiling(8, initial, max), Duration::from_millis(25_600));
        assert_eq!(backoff_ceiling(9, initial, max), max);
        assert_eq!(backoff_ceiling(u32::MAX, initial, max), max);
        for attempt in 1..40 {
            let ceiling = backoff_ceiling(attempt, initial, max);
            let mut above_half = false;
            for _ in 0..200 {
                let d = backoff(attempt, initial, max);
                assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
                above_half |= d > ceiling / 2;
            }
            assert!(
                above_half,
                "attempt {attempt}: 200 draws all in the lower half: not full jitter"
            );
        }
        assert_eq!(backoff(3, Duration::ZERO, max), Duration::ZERO);
    }

    #[test]
    fn bad_indexes_from_sandbox_body() {
        let body = br#"{"error":"validation_failed","errors":[
            {"index":3,"field":"amount","rule":"required","message":"amount is required"},
            {"index":0,"field":"currency","rule":"currency","message":"bad"},
            {"index":3,"field":"currency","rule":"required","message":"currency is required"}]}"#;
        let m = parse_bad_indexes(body, 5).unwrap();
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), vec![0, 3]);
        let three: Value = serde_json::from_str(&m[&3]).unwrap();
        assert_eq!(three["error"], "validation_failed");
        assert_eq!(three["errors"].as_array().unwrap().len(), 2);
        assert_eq!(three["errors"][0]["field"], "amount");
        assert!(three["errors"][0].get("index").is_none());
    }

    #[test]
    fn bad_indexes_untrusted_bodies() {
        for body in [
            &b""[..],
            b"not json",
            b"[]",
            br#"{"error":"validation_failed"}"#,
            br#"{"errors":[]}"#,
            br#"{"errors":[{"field":"amount"}]}"#,
            br#"{"errors":[{"index":-1}]}"#,
            br#"{"errors":[{"index":"2"}]}"#,
            br#"{"errors":[{"index":5}]}"#, // out of a 5-event request
            br#"{"errors":[{"index":1},{"index":9}]}"#,
        ] {
            assert_eq!(parse_bad_indexes(body, 5), None, "{}", String::from_utf8_lossy(body));
        }
    }
}
