//! The decision for each answer to a request: a pure function of the answer, the attempt and the
//! policy, with no I/O, so that every row of the table in `docs/delivery.md` (API-CONTRACT.md,
//! "Responses") is one unit test. The HTTP loop in `deliver` classifies what happened into an
//! [`Answer`], asks [`decide`], and does what the [`Plan`] says.

use super::retry::backoff_ceiling;
use std::time::Duration;

/// What one request got back, as far as the decision needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP answer. `retry_after` is its `Retry-After` (RFC 9110 §10.2.3), already turned into
    /// a wait: delay-seconds as given, an HTTP date judged against the answer's own `Date` header
    /// ([`super::retry::retry_after_of`]); `Duration::ZERO` for a date already past.
    Status { status: u16, retry_after: Option<Duration> },
    /// The request surely did not reach the API whole: connection refused, connect timeout, DNS or
    /// TLS failure, an error while writing the request (a reused connection the server had closed).
    NotSent,
    /// The request was written and no answer came: the timeout (`api.request_timeout`) passed, or
    /// the connection closed before any answer. The API may have counted it.
    NoAnswer,
}

/// Where the request stands when the answer comes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attempt {
    /// Answers of this request retried with backoff before this one (0 for its first answer).
    pub retries: u32,
    /// Consecutive 429/503 answers of the key before this one (any request of this process).
    pub key_throttled: u32,
    /// Events the request carries.
    pub events: usize,
    /// A uniform draw from `[0, 1]`: the full jitter of a backoff, drawn by the caller so that
    /// the decision stays a pure function.
    pub jitter: f64,
}

/// `delivery.on_ambiguous`: what becomes of the events of a request the API may have counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnAmbiguous {
    /// Never sent again automatically: dead-lettered with reason `in_doubt` for an operator
    /// (at-most-once for those ids; `dlq replay --reason in_doubt` lets them go).
    #[default]
    InDoubt,
    /// Sent again (at-least-once: the API may count them twice).
    Resend,
}

/// The settings the decision reads (`[delivery]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// `delivery.retry_backoff_initial`: the first backoff ceiling, and the shortest wait after a
    /// `Retry-After` already past.
    pub backoff_initial: Duration,
    /// `delivery.retry_backoff_max`: the largest backoff ceiling.
    pub backoff_max: Duration,
    /// `delivery.max_retries`: retries after which each further one waits `backoff_max` exactly.
    pub max_retries: Option<u32>,
    /// `delivery.auth_retry_interval`: the probe interval of a halt.
    pub auth_retry_interval: Duration,
    /// `delivery.on_ambiguous`.
    pub on_ambiguous: OnAmbiguous,
}

/// Why delivery halts (nothing moves, readiness false, a slow probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    /// 401 or 403 (`status`): the key is refused (readiness `api_key`).
    KeyRefused { status: u16 },
    /// 404, 405, 415, 3xx and any other 4xx not listed: the bridge is misconfigured (base URL or
    /// path); readiness `api_endpoint`.
    Misconfigured { status: u16 },
}

/// What to do with the request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// 2xx: its events are delivered.
    Done,
    /// 400 or 422: it holds bad events; isolate them (body indexes or bisection) and dead-letter
    /// those.
    Isolate,
    /// Send it again after `after`; it was not counted.
    Retry { after: Duration },
    /// 429 or 503: the whole key waits `pause` (every lane and, with a shared budget, every
    /// replica), then the request goes again; it was not counted.
    PauseKey { pause: Duration },
    /// 413 with more than one event: split the request in two and send the halves.
    Split,
    /// 413 for one event alone: dead-letter it (stage `api`, reason `payload_too_large`).
    TooLarge,
    /// The API may have counted it and `on_ambiguous = "in-doubt"`: its events are never sent
    /// again automatically (dead-lettered with reason `in_doubt`).
    InDoubt,
    /// Halt: probe again with the same request after `probe_after`; nothing is dead-lettered.
    Halt { why: Halt, probe_after: Duration },
}

/// A decision and how long the key must wait before any request (a `Retry-After`, on any status).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// What to do with the request.
    pub decision: Decision,
    /// The key waits at least this long, whatever the decision (RFC 9110 §10.2.3).
    pub key_wait: Option<Duration>,
}

impl Answer {
    /// Whether this answer may mean the API counted the request (the ambiguous rows).
    pub fn ambiguous(&self) -> bool {
        match *self {
            Answer::NoAnswer => true,
            Answer::NotSent => false,
            Answer::Status { status, .. } => matches!(status, 502 | 504 | 506..=599),
        }
    }
}

/// The decision for `answer` to a request at `attempt` under `policy`: the table of
/// `docs/delivery.md`, one arm a row (API-CONTRACT.md, "Responses", decided 2026-11-30).
pub fn decide(answer: Answer, attempt: &Attempt, policy: &Policy) -> Plan {
    // A date already past (or `Retry-After: 0`) still waits the shortest backoff: an answer that
    // asked to wait is never followed by an immediate retry.
    let retry_after = match answer {
        Answer::Status { retry_after, .. } => retry_after.map(|d| d.max(policy.backoff_initial)),
        _ => None,
    };
    let backoff = || {
        match policy.max_retries {
            // Past max_retries: every further retry waits the full ceiling (and logs an error).
            Some(max) if attempt.retries >= max => policy.backoff_max,
            _ => jittered(attempt.retries + 1, attempt.jitter, policy),
        }
    };
    let ambiguous = || match policy.on_ambiguous {
        OnAmbiguous::InDoubt => Decision::InDoubt,
        OnAmbiguous::Resend => Decision::Retry { after: backoff() },
    };
    let decision = match answer {
        Answer::NotSent => Decision::Retry { after: backoff() },
        Answer::NoAnswer => ambiguous(),
        Answer::Status { status, .. } => match status {
            200..=299 => Decision::Done,
            400 | 422 => Decision::Isolate,
            401 | 403 => Decision::Halt {
                why: Halt::KeyRefused { status },
                probe_after: policy.auth_retry_interval,
            },
            408 => Decision::Retry { after: backoff() },
            413 if attempt.events > 1 => Decision::Split,
            413 => Decision::TooLarge,
            429 | 503 => Decision::PauseKey {
                pause: retry_after.unwrap_or_else(|| jittered(attempt.key_throttled + 1, attempt.jitter, policy)),
            },
            500 => Decision::Retry { after: backoff() },
            502 | 504 => ambiguous(),
            // 501 Not Implemented, 505 HTTP Version Not Supported: the server does not do what
            // the bridge asks (RFC 9110 §15.6.2, §15.6.6), so nothing was counted: a server that
            // is not the API, like a wrong path.
            501 | 505 => Decision::Halt {
                why: Halt::Misconfigured { status },
                probe_after: policy.auth_retry_interval,
            },
            // A proxy's own 5xx (Cloudflare's 520-524, a 507…): whether the API counted the
            // request is unknown.
            506..=599 => ambiguous(),
            // 3xx (redirects are not followed: a body is sent only where configured), 404, 405,
            // 415 and every other 4xx: a wrong base URL or path.
            _ => Decision::Halt {
                why: Halt::Misconfigured { status },
                probe_after: policy.auth_retry_interval,
            },
        },
    };
    Plan {
        decision,
        key_wait: retry_after,
    }
}

/// Full jitter: `jitter` × the backoff ceiling of `attempt`.
fn jittered(attempt: u32, jitter: f64, policy: &Policy) -> Duration {
    backoff_ceiling(attempt, policy.backoff_initial, policy.backoff_max).mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policy() -> Policy {
        Policy {
            backoff_initial: Duration::from_millis(200),
            backoff_max: S(30),
            max_retries: None,
            auth_retry_interval: S(30),
            on_ambiguous: OnAmbiguous::InDoubt,
        }
    }

    fn first(events: usize) -> Attempt {
        Attempt {
            retries: 0,
            key_throttled: 0,
            events,
            jitter: 1.0,
        }
    }

    fn status(status: u16) -> Answer {
        Answer::Status {
            status,
            retry_after: None,
        }
    }

    fn decided(a: Answer) -> Decision {
        decide(a, &first(10), &policy()).decision
    }

    #[test]
    fn row_2xx_is_delivered() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(decided(status(s)), Decision::Done, "{s}");
        }
    }

    #[test]
    fn row_400_and_422_isolate_the_bad_events() {
        assert_eq!(decided(status(400)), Decision::Isolate);
        assert_eq!(decided(status(422)), Decision::Isolate);
    }

    #[test]
    fn row_401_403_halt_on_the_key() {
        for s in [401, 403] {
            assert_eq!(
                decided(status(s)),
                Decision::Halt {
                    why: Halt::KeyRefused { status: s },
                    probe_after: S(30)
                }
            );
        }
    }

    #[test]
    fn row_404_405_415_other_4xx_and_3xx_halt_as_misconfigured() {
        for s in [
            404, 405, 415, 402, 406, 409, 410, 411, 414, 418, 451, 499, 301, 302, 307, 308,
        ] {
            assert_eq!(
                decided(status(s)),
                Decision::Halt {
                    why: Halt::Misconfigured { status: s },
                    probe_after: S(30)
                },
                "{s}"
            );
        }
    }

    #[test]
    fn row_408_is_retried() {
        assert_eq!(
            decided(status(408)),
            Decision::Retry {
                after: Duration::from_millis(200)
            }
        );
    }

    #[test]
    fn row_413_splits_and_a_lone_event_is_too_large() {
        assert_eq!(decided(status(413)), Decision::Split);
        assert_eq!(decide(status(413), &first(2), &policy()).decision, Decision::Split);
        assert_eq!(decide(status(413), &first(1), &policy()).decision, Decision::TooLarge);
    }

    #[test]
    fn row_429_pauses_the_key_for_retry_after_or_a_backoff() {
        let a = Answer::Status {
            status: 429,
            retry_after: Some(S(7)),
        };
        let p = decide(a, &first(10), &policy());
        assert_eq!(p.decision, Decision::PauseKey { pause: S(7) });
        assert_eq!(p.key_wait, Some(S(7)));
        // Without Retry-After the pause grows with the key's consecutive throttles.
        let at = Attempt {
            key_throttled: 3,
            ..first(10)
        };
        let p = decide(status(429), &at, &policy());
        assert_eq!(
            p.decision,
            Decision::PauseKey {
                pause: Duration::from_millis(1600)
            }
        );
        assert_eq!(p.key_wait, None);
    }

    #[test]
    fn row_retry_after_on_any_status_makes_the_key_wait() {
        for s in [200, 400, 401, 404, 408, 413, 429, 500, 502, 503, 504] {
            let a = Answer::Status {
                status: s,
                retry_after: Some(S(8)),
            };
            assert_eq!(decide(a, &first(10), &policy()).key_wait, Some(S(8)), "{s}");
        }
        // A date already past (zero) is the shortest backoff, not an immediate retry; the cap
        // (one hour) is applied where the header is read.
        let past = Answer::Status {
            status: 503,
            retry_after: Some(Duration::ZERO),
        };
        let p = decide(past, &first(10), &policy());
        assert_eq!(p.key_wait, Some(Duration::from_millis(200)));
        assert_eq!(
            p.decision,
            Decision::PauseKey {
                pause: Duration::from_millis(200)
            }
        );
    }

    #[test]
    fn row_500_is_retried_with_backoff() {
        let at = Attempt {
            retries: 4,
            ..first(10)
        };
        assert_eq!(
            decide(status(500), &at, &policy()).decision,
            Decision::Retry {
                after: Duration::from_millis(200 * 16)
            }
        );
        let half = Attempt { jitter: 0.5, ..at };
        assert_eq!(
            decide(status(500), &half, &policy()).decision,
            Decision::Retry {
                after: Duration::from_millis(1600)
            }
        );
        // Past max_retries: the full ceiling each time.
        let capped = Policy {
            max_retries: Some(3),
            ..policy()
        };
        assert_eq!(
            decide(status(500), &at, &capped).decision,
            Decision::Retry { after: S(30) }
        );
    }

    #[test]
    fn row_503_pauses_the_key_for_retry_after() {
        let a = Answer::Status {
            status: 503,
            retry_after: Some(S(8)),
        };
        assert_eq!(
            decide(a, &first(10), &policy()).decision,
            Decision::PauseKey { pause: S(8) }
        );
        assert_eq!(
            decided(status(503)),
            Decision::PauseKey {
                pause: Duration::from_millis(200)
            }
        );
    }

    #[test]
    fn row_501_505_are_a_server_that_is_not_the_api() {
        for s in [501, 505] {
            assert!(!status(s).ambiguous());
            assert!(
                matches!(decided(status(s)), Decision::Halt { why: Halt::Misconfigured { status }, .. } if status == s),
                "{s}"
            );
        }
    }

    #[test]
    fn row_502_504_are_ambiguous() {
        for s in [502, 504, 520, 524] {
            assert!(status(s).ambiguous());
            assert_eq!(decided(status(s)), Decision::InDoubt, "{s}");
        }
        let resend = Policy {
            on_ambiguous: OnAmbiguous::Resend,
            ..policy()
        };
        assert_eq!(
            decide(status(502), &first(10), &resend).decision,
            Decision::Retry {
                after: Duration::from_millis(200)
            }
        );
    }

    #[test]
    fn row_no_answer_after_the_body_was_sent_is_ambiguous() {
        assert!(Answer::NoAnswer.ambiguous());
        assert_eq!(decided(Answer::NoAnswer), Decision::InDoubt);
        let resend = Policy {
            on_ambiguous: OnAmbiguous::Resend,
            ..policy()
        };
        assert!(matches!(
            decide(Answer::NoAnswer, &first(10), &resend).decision,
            Decision::Retry { .. }
        ));
    }

    #[test]
    fn row_not_sent_is_retried_with_backoff() {
        assert!(!Answer::NotSent.ambiguous());
        let at = Attempt {
            retries: 1,
            ..first(10)
        };
        assert_eq!(
            decide(Answer::NotSent, &at, &policy()).decision,
            Decision::Retry {
                after: Duration::from_millis(400)
            }
        );
    }
}
