//! What every configuration section shares, a leaf of the crate: [`Secret`], which prints as
//! [`REDACTED`] everywhere it could be printed, [`PropertyValue`], a scalar as TOML or the
//! environment gives it, and [`Invalid`] with its [`Problem`], what a section's validation finds
//! wrong.

use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// What secrets print as.
pub const REDACTED: &str = "<redacted>";

/// A secret string: prints as `<redacted>` in Debug, Display and Serialize.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl<'de> Deserialize<'de> for Secret {
    /// Accepts any scalar: figment reads environment variables by their look, so an all-digit
    /// password arrives as a number.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match PropertyValue::deserialize(d)? {
            PropertyValue::String(s) => Ok(Secret(s)),
            other => Ok(Secret(other.to_string())),
        }
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// A property value; TOML lets users write numbers and booleans unquoted.
#[derive(Clone, Deserialize, Serialize, Debug)]
#[serde(untagged)]
pub enum PropertyValue {
    String(String),
    Int(i64),
    Bool(bool),
    Float(f64),
}

impl fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyValue::String(s) => f.write_str(s),
            PropertyValue::Int(i) => write!(f, "{i}"),
            PropertyValue::Bool(b) => write!(f, "{b}"),
            PropertyValue::Float(x) => write!(f, "{x}"),
        }
    }
}

/// What a section's `validate` finds wrong with one key; `config` adds where the value came from
/// (`config::ConfigProblem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The key's full path, e.g. `batch.max_events`.
    pub key: String,
    /// What is wrong and what to do.
    pub problem: Problem,
}

impl Invalid {
    /// A key whose value breaks a rule the section states in `problem`, e.g. "must be at least 1".
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            problem: Problem::Invalid(problem.into()),
        }
    }
}

impl From<String> for Problem {
    /// A rule's sentence: [`Problem::Invalid`].
    fn from(sentence: String) -> Problem {
        Problem::Invalid(sentence)
    }
}

impl From<&str> for Problem {
    /// A rule's sentence: [`Problem::Invalid`].
    fn from(sentence: &str) -> Problem {
        Problem::Invalid(sentence.into())
    }
}

/// What is wrong with one configuration key. The text of each is the sentence a user reads after
/// "key `k` in FILE: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The key is not one the section has (figment's `UnknownField`; its sentence lists the
    /// expected keys).
    #[error("{0}")]
    UnknownKey(String),
    /// A required key is not set (figment's `MissingField`).
    #[error("{0}")]
    Missing(String),
    /// The value has the wrong type or shape for the key (figment's other kinds).
    #[error("{0}")]
    WrongType(String),
    /// The client property `property` is managed by the bridge (commits happen only after
    /// delivery), set in `kafka.properties` or `kafka.properties_file`.
    #[error("sets `{property}`, which is managed by the bridge (commits happen only after delivery); remove it")]
    Reserved { property: String },
    /// librdkafka refuses the client property `property` (`reason`, without the value).
    #[error("librdkafka refuses the client property `{property}`: {reason}")]
    RefusedProperty { property: String, reason: String },
    /// A URL holds a password: it belongs in the secret key `move_to` (or the environment
    /// variable `env`), which is never printed.
    #[error(
        "holds a password: move it to `{move_to}` (or the environment variable {env}) so that it is never printed"
    )]
    SecretInUrl { move_to: String, env: String },
    /// The value breaks a rule of its section; the sentence says which and what to do.
    #[error("{0}")]
    Invalid(String),
}

/// The configured secret values (API key, passwords, secret client properties, every value of
/// `kafka.properties_file`), to remove from text the bridge did not write itself: a dependency's
/// error message, a librdkafka log line, a panic message. Each occurrence becomes [`REDACTED`].
/// Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Scrubber(std::sync::Arc<[String]>);

impl Scrubber {
    /// A scrubber for `secrets`; empty values are ignored, and longer values are replaced first
    /// (so a secret that contains another is removed whole).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Scrubber {
        let mut v: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        v.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        v.dedup();
        Scrubber(v.into())
    }

    /// `text` with every secret value replaced by [`REDACTED`]; borrowed when none occurs.
    pub fn scrub<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let mut out = std::borrow::Cow::Borrowed(text);
        for s in self.0.iter() {
            if out.contains(s.as_str()) {
                out = std::borrow::Cow::Owned(out.replace(s.as_str(), REDACTED));
            }
        }
        out
    }
}

impl fmt::Debug for Scrubber {
    /// How many values it removes, never the values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber({} values)", self.0.len())
    }
}

/// Deserializes a list of strings from a list, or from one text as the environment gives it:
/// `[a, b]` (figment's syntax) or a single item `a`. Configuration from the environment arrives as
/// text verbatim (`config`), so list-valued keys parse it here.
pub fn list_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrText {
        List(Vec<String>),
        Text(String),
    }
    Ok(match ListOrText::deserialize(d)? {
        ListOrText::List(v) => v,
        ListOrText::Text(t) => {
            let trimmed = t.trim();
            match trimmed.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
                Some(inner) => inner
                    .split(',')
                    .map(|s| s.trim().trim_matches('"').to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
                None if trimmed.is_empty() => Vec::new(),
                None => vec![trimmed.to_string()],
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubber_removes_every_secret_longest_first() {
        let s = Scrubber::new(["pw".to_string(), "pw-long".to_string(), String::new()]);
        assert_eq!(s.scrub("a pw-long and pw"), "a <redacted> and <redacted>");
        assert!(matches!(s.scrub("clean"), std::borrow::Cow::Borrowed("clean")));
        assert_eq!(format!("{s:?}"), "Scrubber(2 values)");
    }

    #[test]
    fn lists_come_from_lists_or_text() {
        #[derive(Deserialize)]
        struct L {
            #[serde(deserialize_with = "list_or_text")]
            v: Vec<String>,
        }
        let of = |t: &str| toml::from_str::<L>(t).unwrap().v;
        assert_eq!(of("v = [\"a\", \"b\"]"), ["a", "b"]);
        assert_eq!(of("v = \"[a, b]\""), ["a", "b"]);
        assert_eq!(of("v = \"[\\\"a\\\",b]\""), ["a", "b"]);
        assert_eq!(of("v = \"tx\""), ["tx"]);
        assert!(of("v = \"[]\"").is_empty());
    }
}
