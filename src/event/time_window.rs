//! The plausible window of an event's time (issue 17). The API takes any integer as `timestamp`
//! (contract decision 3), so a time read in the wrong unit or from the wrong column is counted as
//! a real event at a wrong time: a Debezium `DATE` column (`20422`, days since 1970) read as Unix
//! seconds is 1970-01-01T05:40:22Z. A time before 2000, or more than a day ahead of the clock, is
//! such a value rather than an event's time. The bridge refuses one (reason `time`, each mapping
//! may set its own window); the sandbox counts the ones it accepts (`/_sandbox/stats`).

use super::TimestampUnit;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const NANOS_PER_SECOND: i128 = 1_000_000_000;
/// The longest `now ± DURATION` a window end may take: 8000 years (a day of 86,400 s).
const MAX_OFFSET_SECONDS: u64 = 8000 * 36_525 * 864;

/// One end of the window: a fixed instant, or an offset from the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Unix time in nanoseconds.
    At(i128),
    /// Nanoseconds after (or, negative, before) the time of the check.
    FromNow(i128),
}

impl Bound {
    /// Reads `2000-01-01` (midnight UTC), an RFC 3339 time (`2000-01-01T00:00:00Z`), `now`, or
    /// `now + DURATION` / `now - DURATION` with a duration as `1d`, `36h`, `30days`, `1h 30m`.
    pub fn parse(text: &str) -> Result<Bound, String> {
        let s = text.trim();
        if let Some(rest) = s.strip_prefix("now") {
            let rest = rest.trim_start();
            if rest.is_empty() {
                return Ok(Bound::FromNow(0));
            }
            let (sign, d) = match (rest.strip_prefix('+'), rest.strip_prefix('-')) {
                (Some(d), _) => (1, d),
                (_, Some(d)) => (-1, d),
                _ => {
                    return Err(format!(
                        "`{text}`: after `now` write `+` or `-` and a duration, as `now + 1d`"
                    ))
                }
            };
            let d = humantime::parse_duration(d.trim()).map_err(|e| {
                format!(
                    "`{text}`: `{}` is not a duration ({e}); write it as `1d`, `36h`, `30days`",
                    d.trim()
                )
            })?;
            // Beyond the years 0000 to 9999 no time can be written (RFC 3339), nor refused.
            if d.as_secs() > MAX_OFFSET_SECONDS {
                return Err(format!(
                    "`{text}`: {} is further from now than 8000 years; write a date",
                    d.as_secs() / 86_400
                ) + " days");
            }
            return Ok(Bound::FromNow(sign * d.as_nanos() as i128));
        }
        if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
            return Ok(Bound::At(t.unix_timestamp_nanos()));
        }
        let date = time::format_description::parse_borrowed::<2>("[year]-[month]-[day]").expect("a valid format");
        match time::Date::parse(s, &date) {
            Ok(d) => Ok(Bound::At(d.midnight().assume_utc().unix_timestamp_nanos())),
            Err(_) => Err(format!(
                "`{text}` is not a date (`2000-01-01`), an RFC 3339 time (`2000-01-01T00:00:00Z`), `now`, \
                 `now + DURATION` or `now - DURATION`"
            )),
        }
    }

    /// The instant this bound means when the clock reads `now`.
    pub fn at(self, now: i128) -> i128 {
        match self {
            Bound::At(t) => t,
            Bound::FromNow(d) => now.saturating_add(d),
        }
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Bound::At(t) => f.write_str(&instant(t)),
            Bound::FromNow(0) => f.write_str("now"),
            Bound::FromNow(d) => {
                let n = d.unsigned_abs();
                let seconds = u64::try_from(n / NANOS_PER_SECOND as u128).unwrap_or(u64::MAX);
                let span = humantime::format_duration(Duration::new(seconds, (n % NANOS_PER_SECOND as u128) as u32));
                write!(f, "now {} {span}", if d < 0 { '-' } else { '+' })
            }
        }
    }
}

/// An instant in nanoseconds as RFC 3339 (`1970-01-01T05:40:22Z`), or as a count of seconds when
/// it is beyond the years 0000 to 9999.
pub fn instant(nanos: i128) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{} seconds from 1970", nanos.div_euclid(NANOS_PER_SECOND)))
}

/// The clock, as Unix time in nanoseconds.
pub fn now_nanos() -> i128 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// Where an event's time may lie: `earliest ≤ t ≤ latest`, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    pub earliest: Bound,
    pub latest: Bound,
}

impl TimeWindow {
    /// The default: from 2000-01-01T00:00:00Z to a day after the clock.
    pub const DEFAULT: TimeWindow = TimeWindow {
        earliest: Bound::At(946_684_800 * NANOS_PER_SECOND),
        latest: Bound::FromNow(86_400 * NANOS_PER_SECOND),
    };
    /// [`Self::DEFAULT`]'s ends, as a configuration writes them.
    pub const DEFAULT_EARLIEST: &'static str = "2000-01-01";
    pub const DEFAULT_LATEST: &'static str = "now + 1d";

    /// A window of two ends, refused when it is empty whatever the clock says, or (one end a date,
    /// the other from the clock) when it is empty as the clock reads `now` at start-up: a mapping
    /// that could only refuse every time is a configuration error.
    pub fn new(earliest: Bound, latest: Bound, now: i128) -> Result<TimeWindow, String> {
        let empty = match (earliest, latest) {
            (Bound::At(a), Bound::At(b)) | (Bound::FromNow(a), Bound::FromNow(b)) => a > b,
            _ => earliest.at(now) > latest.at(now),
        };
        if empty {
            let mixed = matches!(
                (earliest, latest),
                (Bound::At(_), Bound::FromNow(_)) | (Bound::FromNow(_), Bound::At(_))
            );
            return Err(format!(
                "`earliest` ({earliest}) is after `latest` ({latest}){}",
                if mixed {
                    format!(" as the clock reads now ({})", instant(now))
                } else {
                    String::new()
                }
            ));
        }
        Ok(TimeWindow { earliest, latest })
    }

    /// Whether `t` (Unix nanoseconds) is in the window when the clock reads `now`.
    pub fn contains(&self, t: i128, now: i128) -> bool {
        self.earliest.at(now) <= t && t <= self.latest.at(now)
    }

    /// Whether `t` is in the window whatever the clock reads, provided it reads at least
    /// `now_at_least`: so a check can skip reading the clock for nearly every event. `false`
    /// means "read the clock", not "outside".
    pub fn surely_contains(&self, t: i128, now_at_least: i128) -> bool {
        let after_earliest = match self.earliest {
            Bound::At(a) => a <= t,
            // A later clock moves this end later: no earlier reading can answer.
            Bound::FromNow(_) => false,
        };
        after_earliest && t <= self.latest.at(now_at_least)
    }

    /// [`Self::contains`] for `ts` in `unit`.
    pub fn contains_in(&self, ts: i64, unit: TimestampUnit, now: i128) -> bool {
        self.contains(nanos_of(ts, unit), now)
    }

    /// The window as written, for messages: `2000-01-01T00:00:00Z to now + 1day`. (Not the
    /// instants the clock gave its relative ends: a message is the same whenever it is made, so
    /// that `map` says what `run` says.)
    pub fn describe(&self) -> String {
        format!("{} to {}", self.earliest, self.latest)
    }
}

impl Default for TimeWindow {
    fn default() -> Self {
        TimeWindow::DEFAULT
    }
}

/// `ts` in `unit` as Unix nanoseconds.
pub fn nanos_of(ts: i64, unit: TimestampUnit) -> i128 {
    i128::from(ts)
        * match unit {
            TimestampUnit::Seconds => NANOS_PER_SECOND,
            TimestampUnit::Milliseconds => 1_000_000,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i128 = NANOS_PER_SECOND;

    #[test]
    fn bounds_are_read_as_written() {
        assert_eq!(Bound::parse("2000-01-01"), Ok(Bound::At(946_684_800 * S)));
        assert_eq!(
            Bound::parse(" 2000-01-01T01:00:00+01:00 "),
            Ok(Bound::At(946_684_800 * S))
        );
        assert_eq!(Bound::parse("now"), Ok(Bound::FromNow(0)));
        assert_eq!(Bound::parse("now + 1d"), Ok(Bound::FromNow(86_400 * S)));
        assert_eq!(Bound::parse("now+36h"), Ok(Bound::FromNow(36 * 3600 * S)));
        assert_eq!(Bound::parse("now - 30days"), Ok(Bound::FromNow(-30 * 86_400 * S)));
        for bad in [
            "",
            "yesterday",
            "2000-13-01",
            "2000-01-01 00:00",
            "now 1d",
            "now + soon",
            "1d",
            "now +",
        ] {
            assert!(Bound::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Bound::parse(TimeWindow::DEFAULT_EARLIEST),
            Ok(TimeWindow::DEFAULT.earliest)
        );
        assert_eq!(Bound::parse(TimeWindow::DEFAULT_LATEST), Ok(TimeWindow::DEFAULT.latest));
    }

    #[test]
    fn the_default_window() {
        let w = TimeWindow::DEFAULT;
        let now = 1_795_000_000 * S;
        assert!(w.contains(946_684_800 * S, now), "2000-01-01 itself");
        assert!(!w.contains(946_684_800 * S - 1, now));
        assert!(w.contains(now + 86_400 * S, now), "a day ahead itself");
        assert!(!w.contains(now + 86_400 * S + 1, now));
        // The Debezium DATE, days since 1970, read as seconds.
        assert!(!w.contains_in(20_422, TimestampUnit::Seconds, now));
        assert!(w.contains_in(1_702_963_200, TimestampUnit::Seconds, now));
        assert!(w.contains_in(1_702_963_200_000, TimestampUnit::Milliseconds, now));
        // Milliseconds where seconds are meant: far in the future.
        assert!(!w.contains_in(1_702_963_200_000, TimestampUnit::Seconds, now));
        assert_eq!(w.describe(), "2000-01-01T00:00:00Z to now + 1day");
    }

    #[test]
    fn an_earlier_clock_reading_answers_only_what_it_can() {
        let w = TimeWindow::DEFAULT;
        let seen = 1_795_000_000 * S;
        assert!(w.surely_contains(seen, seen));
        assert!(
            !w.surely_contains(seen + 2 * 86_400 * S, seen),
            "the clock may have moved on"
        );
        assert!(!w.surely_contains(20_422 * S, seen));
        let recent = TimeWindow::new(Bound::FromNow(-3600 * S), Bound::FromNow(0), 0).unwrap();
        assert!(
            !recent.surely_contains(seen, seen),
            "a relative earliest needs the clock"
        );
        assert!(recent.contains(seen, seen));
    }

    #[test]
    fn an_empty_window_is_refused() {
        let now = 1_764_547_200 * S; // 2025-12-01
        assert!(TimeWindow::new(Bound::At(2 * S), Bound::At(S), now).is_err());
        assert!(TimeWindow::new(Bound::FromNow(S), Bound::FromNow(0), now).is_err());
        assert!(TimeWindow::new(Bound::At(S), Bound::At(S), now).is_ok());
        // A date against the clock (found by a new user's trial: `earliest = "2030-01-01",
        // latest = "now"` passed `check` and refused every record): judged as the clock reads.
        let e = TimeWindow::new(Bound::parse("2030-01-01").unwrap(), Bound::FromNow(0), now).unwrap_err();
        assert!(e.contains("as the clock reads now (2025-12-01T00:00:00Z)"), "{e}");
        assert!(TimeWindow::new(Bound::At(i128::MAX), Bound::FromNow(0), now).is_err());
        assert!(TimeWindow::new(Bound::FromNow(0), Bound::parse("2020-01-01").unwrap(), now).is_err());
        assert!(TimeWindow::new(Bound::parse("2020-01-01").unwrap(), Bound::FromNow(0), now).is_ok());
        assert!(TimeWindow::new(Bound::FromNow(-S), Bound::parse("2030-01-01").unwrap(), now).is_ok());
    }

    /// An end further from the clock than any writable time is refused, not clamped (found: `now -
    /// 99999999999d` passed and printed as `now - 584years …`); a long one prints as written.
    #[test]
    fn an_end_beyond_any_year_is_refused() {
        for text in ["now - 99999999999d", "now + 8001years", "now - 3000000days"] {
            let e = Bound::parse(text).unwrap_err();
            assert!(e.contains("further from now than 8000 years"), "{text}: {e}");
        }
        let b = Bound::parse("now - 1000years").unwrap();
        assert_eq!(b.to_string(), "now - 1000years");
        assert_eq!(Bound::parse("now - 600years").unwrap().to_string(), "now - 600years");
    }
}
