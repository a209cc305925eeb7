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
