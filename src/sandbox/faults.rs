//! Fault injection: what the sandbox does instead of answering honestly, set by flags and at run
//! time through `PUT /_sandbox/faults`.

use clap::Args;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Fault settings. The same names serve as flags (`--fault-500 0.1`) and as the JSON of
/// `GET/PUT /_sandbox/faults` (`{"fault_500": 0.1}`); a PUT replaces every setting, and fields left
/// out take their defaults (no faults).
#[derive(Debug, Clone, PartialEq, Default, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Probability (0 to 1) of answering 500 instead of handling a request.
    #[arg(long = "fault-500", default_value_t = 0.0)]
    pub fault_500: f64,
    /// Probability of answering 429 (with Retry-After: 1 unless --no-retry-after).
    #[arg(long = "fault-429", default_value_t = 0.0)]
    pub fault_429: f64,
    /// Probability of a fake rejection: 400 whose body says it was injected.
    #[arg(long = "fault-400", default_value_t = 0.0)]
    pub fault_400: f64,
    /// Probability of a timeout: the request hangs (see --timeout-hang).
    #[arg(long = "fault-timeout", default_value_t = 0.0)]
    pub fault_timeout: f64,
    /// Probability of a slow answer: the request is handled (a valid batch is counted), and the
    /// answer waits --slow-answer (a client that gives up first cannot know it was counted).
    #[arg(long = "fault-slow", default_value_t = 0.0)]
    pub fault_slow: f64,
    /// How long a slow answer waits after the request was handled; absent: 10 s.
    #[arg(long = "slow-answer", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub slow_answer: Option<Duration>,
    /// Probability of 502 from a gateway that lost the answer: the request is handled (a valid
    /// batch is counted), then answered 502.
    #[arg(long = "fault-502", default_value_t = 0.0)]
    pub fault_502: f64,
    /// Probability of 504 from a gateway that timed out: the request is not handled (nothing
    /// counted), answered 504.
    #[arg(long = "fault-504", default_value_t = 0.0)]
    pub fault_504: f64,
    /// A gateway's body limit in bytes: a request declaring a larger Content-Length is answered
    /// 413 before the API sees it (no key check, no budget spent, nothing counted).
    #[arg(long = "body-limit")]
    pub body_limit: Option<usize>,
    /// For this long from when the faults are set, every API request is answered 503 with
    /// `Retry-After` (the time left, rounded up) and nothing else happens.
    #[arg(long = "unavailable-for", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub unavailable_for: Option<Duration>,
    /// Give the 503's `Retry-After` as an HTTP date instead of seconds.
    #[arg(long = "retry-after-date")]
    pub retry_after_date: bool,
    /// Seconds added to the sandbox's clock in the `Date` header and the `Retry-After` date of a
    /// 503 (a server clock off from the client's); negative for behind.
    #[arg(long = "clock-offset-s", default_value_t = 0, allow_hyphen_values = true)]
    pub clock_offset_s: i64,
    /// How long an injected timeout hangs before answering 504; absent: until the client gives up.
    #[arg(long = "timeout-hang", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub timeout_hang: Option<Duration>,
    /// Latency added to every API request, e.g. `20ms`.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Scripted outcomes consumed one per request before the probabilities apply, e.g.
    /// `500,500,429,ok,timeout` (steps: ok, 400, 401, 404, 429, 500, 502, 504, timeout, slow).
    #[arg(long = "fault-script", value_delimiter = ',')]
    pub script: Vec<FaultStep>,
    /// Answer 401 to every API request, whatever the key.
    #[arg(long)]
    pub auth_fail_all: bool,
}

impl Faults {
    /// Problems with the settings, each naming the setting; empty when usable.
    pub fn problems(&self) -> Vec<FaultProblem> {
        let mut out = Vec::new();
        let probs = [
            ("fault_500", self.fault_500),
            ("fault_429", self.fault_429),
            ("fault_400", self.fault_400),
            ("fault_timeout", self.fault_timeout),
            ("fault_slow", self.fault_slow),
            ("fault_502", self.fault_502),
            ("fault_504", self.fault_504),
        ];
        for (name, p) in probs {
            if !(0.0..=1.0).contains(&p) {
                out.push(FaultProblem::NotAProbability { name, value: p });
            }
        }
        let sum: f64 = probs.iter().map(|(_, p)| p).sum();
        if out.is_empty() && sum > 1.0 + 1e-9 {
            out.push(FaultProblem::SumAboveOne { sum });
        }
        out
    }
}

/// What is wrong with a fault setting (the sandbox's flags or `PUT /_sandbox/faults`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultProblem {
    /// `name` (`fault_500`, …) is outside 0..=1.
    #[error("`{name}` must be a probability between 0 and 1, got {value}")]
    NotAProbability { name: &'static str, value: f64 },
    /// The probabilities together exceed 1.
    #[error("the fault probabilities add up to {sum}, more than 1")]
    SumAboveOne { sum: f64 },
}

/// A step of `--fault-script` or `script` that is not one of ok, 400, 401, 404, 429, 500, 502,
/// 504, timeout, slow (the text shown truncated).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown fault step `{0}`; use ok, 400, 401, 404, 429, 500, 502, 504, timeout or slow")]
pub struct UnknownFaultStep(String);

impl UnknownFaultStep {
    /// The step as given (truncated).
    pub fn step(&self) -> &str {
        &self.0
    }
}

/// One scripted outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultStep {
    /// Handle the request honestly.
    Ok,
    Status400,
    Status401,
    /// 404, as an ingress answers while the API is being deployed.
    Status404,
    Status429,
    Status500,
    /// Handled (a valid batch counted), then answered 502.
    Status502,
    /// Not handled, answered 504.
    Status504,
    Timeout,
    /// Handled (a valid batch counted), answered after `slow_answer`.
    Slow,
}

impl FaultStep {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultStep::Ok => "ok",
            FaultStep::Status400 => "400",
            FaultStep::Status401 => "401",
            FaultStep::Status404 => "404",
            FaultStep::Status429 => "429",
            FaultStep::Status500 => "500",
            FaultStep::Status502 => "502",
            FaultStep::Status504 => "504",
            FaultStep::Timeout => "timeout",
            FaultStep::Slow => "slow",
        }
    }
}

impl FromStr for FaultStep {
    type Err = UnknownFaultStep;
    fn from_str(s: &str) -> Result<Self, UnknownFaultStep> {
        Ok(match s.trim() {
            "ok" => FaultStep::Ok,
            "400" => FaultStep::Status400,
            "401" => FaultStep::Status401,
            "404" => FaultStep::Status404,
            "429" => FaultStep::Status429,
            "500" => FaultStep::Status500,
            "502" => FaultStep::Status502,
            "504" => FaultStep::Status504,
            "timeout" => FaultStep::Timeout,
            "slow" => FaultStep::Slow,
            other => return Err(UnknownFaultStep(crate::event::truncate(other).to_string())),
        })
    }
}

impl fmt::Display for FaultStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for FaultStep {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FaultStep {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Accept 500 as well as "500" in JSON.
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => s.parse().map_err(serde::de::Error::custom),
            serde_json::Value::Number(n) => n.to_string().parse().map_err(serde::de::Error::custom),
            other => Err(serde::de::Error::custom(format!(
                "a fault step is a string such as \"500\" or \"ok\", got {other}"
            ))),
        }
    }
}

/// The live fault settings and how far the script has been consumed.
#[derive(Debug)]
pub(crate) struct FaultState {
    faults: Faults,
    script_pos: usize,
    /// When the settings were set: `unavailable_for` counts from here.
    since: std::time::Instant,
}

impl FaultState {
    pub(crate) fn new(faults: Faults) -> Self {
        FaultState {
            faults,
            script_pos: 0,
            since: std::time::Instant::now(),
        }
    }

    /// How long the sandbox still answers 503 (`unavailable_for`), if it does now.
    pub(crate) fn unavailable_left(&self) -> Option<Duration> {
        let end = self.since + self.faults.unavailable_for?;
        end.checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
    }

    pub(crate) fn body_limit(&self) -> Option<usize> {
        self.faults.body_limit
    }

    pub(crate) fn retry_after_date(&self) -> bool {
        self.faults.retry_after_date
    }

    pub(crate) fn clock_offset_s(&self) -> i64 {
        self.faults.clock_offset_s
    }

    pub(crate) fn slow_answer(&self) -> Duration {
        self.faults.slow_answer.unwrap_or(Duration::from_secs(10))
    }

    /// The settings with only the unconsumed part of the script.
    pub(crate) fn current(&self) -> Faults {
        let mut f = self.faults.clone();
        f.script.drain(..self.script_pos.min(f.script.len()));
        f
    }

    pub(crate) fn set(&mut self, faults: Faults) {
        *self = FaultState::new(faults);
    }

    pub(crate) fn latency(&self) -> Duration {
        self.faults.latency
    }

    pub(crate) fn auth_fail_all(&self) -> bool {
        self.faults.auth_fail_all
    }

    pub(crate) fn timeout_hang(&self) -> Option<Duration> {
        self.faults.timeout_hang
    }

    /// Decides the fate of one request: the next script step if any, else a roll of the dice
    /// (`roll` is uniform in [0, 1)).
    pub(crate) fn next(&mut self, roll: impl FnOnce() -> f64) -> FaultStep {
        if let Some(step) = self.faults.script.get(self.script_pos) {
            self.script_pos += 1;
            return *step;
        }
        let f = &self.faults;
        if f.fault_500 + f.fault_429 + f.fault_400 + f.fault_timeout + f.fault_slow + f.fault_502 + f.fault_504 <= 0.0 {
            return FaultStep::Ok;
        }
        let r = roll();
        let mut edge = 0.0;
        for (p, step) in [
            (f.fault_500, FaultStep::Status500),
            (f.fault_429, FaultStep::Status429),
            (f.fault_400, FaultStep::Status400),
            (f.fault_timeout, FaultStep::Timeout),
            (f.fault_slow, FaultStep::Slow),
            (f.fault_502, FaultStep::Status502),
            (f.fault_504, FaultStep::Status504),
        ] {
            edge += p;
            if r < edge {
                return step;
            }
        }
        FaultStep::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_runs_before_probabilities_and_is_consumed() {
        let mut st = FaultState::new(Faults {
            script: "500,ok,timeout".split(',').map(|s| s.parse().unwrap()).collect(),
            fault_429: 1.0,
            ..Faults::default()
        });
        assert_eq!(st.next(|| 0.5), FaultStep::Status500);
        assert_eq!(st.current().script, [FaultStep::Ok, FaultStep::Timeout]);
        assert_eq!(st.next(|| 0.5), FaultStep::Ok);
        assert_eq!(st.next(|| 0.5), FaultStep::Timeout);
        assert_eq!(st.next(|| 0.5), FaultStep::Status429);
    }

    #[test]
    fn probabilities_partition_the_roll() {
        let mut st = FaultState::new(Faults {
            fault_500: 0.1,
            fault_429: 0.2,
            fault_400: 0.3,
            fault_timeout: 0.1,
            ..Faults::default()
        });
        assert_eq!(st.next(|| 0.05), FaultStep::Status500);
        assert_eq!(st.next(|| 0.15), FaultStep::Status429);
        assert_eq!(st.next(|| 0.45), FaultStep::Status400);
        assert_eq!(st.next(|| 0.65), FaultStep::Timeout);
        assert_eq!(st.next(|| 0.75), FaultStep::Ok);
    }

    #[test]
    fn json_round_trip_and_problems() {
        let f: Faults =
            serde_json::from_str(r#"{"fault_500":0.5,"latency":"20ms","script":["500",429,"ok"]}"#).unwrap();
        assert_eq!(f.latency, Duration::from_millis(20));
        assert_eq!(f.script, [FaultStep::Status500, FaultStep::Status429, FaultStep::Ok]);
        let back: Faults = serde_json::from_value(serde_json::to_value(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        assert!(f.problems().is_empty());
        let bad = Faults {
            fault_500: 0.7,
            fault_429: 0.7,
            ..Faults::default()
        };
        assert_eq!(bad.problems(), [FaultProblem::SumAboveOne { sum: 1.4 }]);
        let bad = Faults {
            fault_timeout: -0.1,
            ..Faults::default()
        };
        assert_eq!(
            bad.problems(),
            [FaultProblem::NotAProbability {
                name: "fault_timeout",
                value: -0.1
            }]
        );
        assert_eq!("503".parse::<FaultStep>(), Err(UnknownFaultStep("503".into())));
        assert!(serde_json::from_str::<Faults>(r#"{"script":["503"]}"#).is_err());
        let f: Faults = serde_json::from_str(
            r#"{"script":["502","504","slow"],"slow_answer":"4s","body_limit":262144,"unavailable_for":"8s","retry_after_date":true,"clock_offset_s":-300}"#,
        )
        .unwrap();
        assert_eq!(f.script, [FaultStep::Status502, FaultStep::Status504, FaultStep::Slow]);
        assert_eq!(
            (f.slow_answer, f.body_limit, f.clock_offset_s),
            (Some(Duration::from_secs(4)), Some(262_144), -300)
        );
        assert!(FaultState::new(f).unavailable_left().is_some());
        assert_eq!(FaultState::new(Faults::default()).unavailable_left(), None);
        assert!(serde_json::from_str::<Faults>(r#"{"fault_501":1}"#).is_err());
    }
}
