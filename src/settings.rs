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
    /// A number with a fraction or an exponent that TOML reads as another binary64
    /// (`9007199254740993.0` as `9007199254740992.0`, `1e-400` as `0.0`): issue 16, no value
    /// changes on the way. A string keeps every digit (and matches a record's number of that
    /// value in a `table` or `in`).
    #[error(
        "`{written}` is read by TOML as the binary64 {read}, another number; write it as a string (\"{written}\") to keep every digit"
    )]
    InexactNumber { written: String, read: String },
    /// The value breaks a rule of its section; the sentence says which and what to do.
    #[error("{0}")]
    Invalid(String),
}

/// The configured secret values (API key, passwords, secret client properties, every value of
/// `kafka.properties_file`), to remove from text the bridge did not write itself: a dependency's
/// error message, a librdkafka log line, a panic message. Each occurrence becomes [`REDACTED`].
/// Cheap to clone (shared).
///
/// A value is also removed as the JSON log and `{:?}` write it (quotes and backslashes
/// escaped), and by its parts: a value of several `key=value` words
/// (`sasl.oauthbearer.config`) by each word and each word's value, since librdkafka quotes such
/// pieces. Parts shorter than [`Scrubber::MIN_PART`] stay (they would garble every line).
/// Matching is one leftmost-longest pass (aho-corasick), so a value never matches inside a
/// `<redacted>` already written.
#[derive(Clone, Default)]
pub struct Scrubber(Option<std::sync::Arc<aho_corasick::AhoCorasick>>, usize);

impl Scrubber {
    /// The shortest part of a value (a word, a word's value) removed on its own.
    pub const MIN_PART: usize = 6;

    /// A scrubber for `secrets`; empty values are ignored.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Scrubber {
        let mut patterns: Vec<String> = Vec::new();
        for s in secrets.into_iter().filter(|s| !s.is_empty()) {
            let mut forms = vec![s.clone()];
            for word in s.split_whitespace() {
                forms.push(word.to_string());
                if let Some((_, v)) = word.split_once('=') {
                    forms.push(v.to_string());
                }
            }
            forms.retain(|f| f == &s || f.len() >= Scrubber::MIN_PART);
            for f in forms {
                let json = serde_json::to_string(&f).unwrap_or_default();
                let debug = format!("{f:?}");
                patterns.push(json[1..json.len() - 1].to_string());
                patterns.push(debug[1..debug.len() - 1].to_string());
                patterns.push(f);
            }
        }
        patterns.sort();
        patterns.dedup();
        patterns.retain(|p| !p.is_empty());
        let n = patterns.len();
        let matcher = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(&patterns)
            .ok()
            .filter(|_| n > 0)
            .map(std::sync::Arc::new);
        Scrubber(matcher, n)
    }

    /// `text` with every secret value replaced by [`REDACTED`]; borrowed when none occurs.
    pub fn scrub<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        match &self.0 {
            Some(m) if m.is_match(text) => {
                let with: Vec<&str> = vec![REDACTED; m.patterns_len()];
                std::borrow::Cow::Owned(m.replace_all(text, &with))
            }
            _ => std::borrow::Cow::Borrowed(text),
        }
    }
}

impl fmt::Debug for Scrubber {
    /// How many values it removes, never the values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber({} patterns)", self.1)
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

/// A table of lists (`dedupe.keys_by_event`), each list as [`list_or_text`] reads it.
pub fn map_of_lists<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    struct List(#[serde(deserialize_with = "list_or_text")] Vec<String>);
    let m = std::collections::BTreeMap::<String, List>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, List(v))| (k, v)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubber_removes_every_secret_longest_first() {
        let s = Scrubber::new(["pw".to_string(), "pw-long".to_string(), String::new()]);
        assert_eq!(s.scrub("a pw-long and pw"), "a <redacted> and <redacted>");
        assert!(matches!(s.scrub("clean"), std::borrow::Cow::Borrowed("clean")));
        assert_eq!(format!("{s:?}"), "Scrubber(2 patterns)");
        // A short value never matches inside a marker already written.
        let s = Scrubber::new(["a".to_string(), "secret-a".to_string()]);
        assert_eq!(s.scrub("secret-a and a"), "<redacted> <redacted>nd <redacted>");
    }

    #[test]
    fn scrubber_removes_escaped_forms_and_pieces() {
        let s = Scrubber::new([
            r#"RACK"Q\Z-777"#.to_string(),
            "principal=admin clientSecret=OIDC-SECRET-222 scope=x".to_string(),
        ]);
        // As the JSON log and `{:?}` escape it.
        assert_eq!(s.scrub(r#"rack = RACK\"Q\\Z-777"#), "rack = <redacted>");
        // librdkafka quoting a piece of a `key=value` list: the piece, and its value alone.
        assert_eq!(
            s.scrub("Unrecognized sasl.oauthbearer.config beginning at: clientSecret=OIDC-SECRET-222"),
            "Unrecognized sasl.oauthbearer.config beginning at: <redacted>"
        );
        assert_eq!(s.scrub("token OIDC-SECRET-222"), "token <redacted>");
        // Short pieces stay: `scope=x` and `x` would garble every line.
        assert_eq!(s.scrub("scope x"), "scope x");
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
