//! What every configuration section shares, a leaf of the crate: [`Secret`], which prints as
//! [`REDACTED`] everywhere it could be printed, [`PropertyValue`], a scalar as TOML or the
//! environment gives it, and [`Invalid`], what a section's validation finds wrong.

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
    /// What is wrong and what to do, e.g. "must be at least 1".
    pub problem: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}
