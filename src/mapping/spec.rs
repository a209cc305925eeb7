//! The `[[mapping]]` configuration as the partner writes it. Every table is
//! `deny_unknown_fields`: a misspelt option or an unknown target field fails start-up with the
//! key named. `docs/mapping.md` documents each option; `tests/mapping_docs.rs` checks that the doc
//! and the lists below name the same options.

use crate::event::{api_fields, Field};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

macro_rules! mapping_config {
    ($(($variant:ident, $name:ident, $kind:ident, $required:literal)),* $(,)?) => {
        /// One `[[mapping]]` table: which records it applies to, one entry per API field (its
        /// keys made from `event::api_fields!`), the rules that skip records, and the custom
        /// properties.
        #[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
        #[serde(deny_unknown_fields)]
        pub struct MappingConfig {
            /// Topics this mapping applies to.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub topics: Vec<String>,
            /// A regular expression; the mapping applies to every topic it matches in full.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub topic_pattern: Option<String>,
            /// Records are events only when every condition holds; others are filtered.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub keep_when: Vec<Condition>,
            /// Records matching any condition are filtered.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub skip_when: Vec<Condition>,
            /// What a tombstone (a record without a value) becomes; dead-lettered when not set.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub tombstones: Option<Tombstones>,
            $(
                #[doc = concat!("How the API field `", stringify!($name), "` is made.")]
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $name: Option<FieldSpec>,
            )*
            /// Custom properties: a table, or a list of tables.
            #[serde(default, deserialize_with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
            pub properties: Vec<PropertiesSpec>,
            /// Where a plausible `timestamp` lies; a time outside fails with `time`. Default from
            /// 2000-01-01 to a day after the clock.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub timestamp_window: Option<TimeWindowSpec>,
        }

        impl MappingConfig {
            /// The configured API fields, in the seed document's order (`Field::ALL`).
            pub fn fields(&self) -> [(Field, Option<&FieldSpec>); Field::ALL.len()] {
                [$((Field::$variant, self.$name.as_ref())),*]
            }
        }
    };
}
api_fields!(mapping_config);

/// `timestamp_window = { earliest = "2000-01-01", latest = "now + 1d" }`: each end a date, an
/// RFC 3339 time, `now`, or `now` plus or minus a duration; an end left out keeps its default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindowSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earliest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<String>,
}

/// Keys of a `[[mapping]]` table other than the API fields.
pub const MAPPING_KEYS: &[&str] = &[
    "topics",
    "topic_pattern",
    "keep_when",
    "skip_when",
    "tombstones",
    "properties",
    "timestamp_window",
];
/// Options of `timestamp_window`.
pub const TIME_WINDOW_OPTIONS: &[&str] = &["earliest", "latest"];
/// Options of a field table.
pub const FIELD_OPTIONS: &[&str] = &[
    "from",
    "const",
    "expr",
    "default",
    "trim",
    "case",
    "table",
    "otherwise",
    "fallback",
    "as",
    "time",
    "time_format",
    "in",
    "sign",
    "sign_for",
];
/// Options of a `properties` table.
pub const PROPERTIES_OPTIONS: &[&str] = &["from", "fields", "remaining", "except", "prefix", "rename"];
/// Options of a `keep_when` / `skip_when` condition.
pub const CONDITION_OPTIONS: &[&str] = &["from", "in"];
/// Named sources accepted by `from` besides a JSON pointer.
pub const NAMED_SOURCES: &[&str] = &["key", "header:", "topic", "partition", "offset", "timestamp"];

/// An API field: a source string (`"/player/id"`), or a table of options.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum FieldSpec {
    From(String),
    Options(Box<FieldOptions>),
}

impl FieldSpec {
    /// The options this spec means (a bare string is `{ from = "..." }`).
    pub fn options(&self) -> FieldOptions {
        match self {
            FieldSpec::From(s) => FieldOptions {
                from: Some(s.clone()),
                ..FieldOptions::default()
            },
            FieldSpec::Options(o) => (**o).clone(),
        }
    }
}

// Hand-written so that a misspelt option inside a table reports the option's name, which an
// untagged enum would hide behind "data did not match any variant".
impl<'de> Deserialize<'de> for FieldSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a source such as \"/player/id\", or a table of options such as { from = \"/amount\", as = \"number\" }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FieldSpec, E> {
                Ok(FieldSpec::From(s.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FieldSpec, A::Error> {
                let o = FieldOptions::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(FieldSpec::Options(Box::new(o)))
            }
        }
        d.deserialize_any(V)
    }
}

/// The options of one API field, applied in the order listed in `docs/mapping.md`:
/// source, `expr`, `default`, `trim`, `case`, `table`, `as`/`time`/`in`, `sign`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FieldOptions {
    /// Where the value comes from: a JSON pointer into the record value, `key`, `header:NAME`,
    /// `topic`, `partition`, `offset` or `timestamp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// A constant value instead of a source.
    #[serde(default, rename = "const", skip_serializing_if = "Option::is_none")]
    pub constant: Option<Value>,
    /// A jq expression run on the source value (or on the whole record value without `from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expr: Option<String>,
    /// Used when the source is absent or null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// Strip leading and trailing white space from strings.
    #[serde(default, skip_serializing_if = "is_false")]
    pub trim: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<Case>,
    /// A value table: source value (as text) → API value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<BTreeMap<String, Value>>,
    /// What a value missing from `table` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otherwise: Option<Otherwise>,
    /// The API value for values missing from `table`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Value>,
    /// Convert to this JSON type.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub as_type: Option<AsType>,
    /// How the source writes a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<TimeSource>,
    /// A custom time format (the `time` crate's format description), read as UTC unless it has
    /// an offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_format: Option<String>,
    /// The field is `true` when the value is one of these, else `false`.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign: Option<Sign>,
    /// Apply `sign` only to these (mapped) event names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sign_for: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Case {
    Upper,
    Lower,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Otherwise {
    /// The record fails with `unknown_value` and goes to the dead-letter topic (the default).
    DeadLetter,
    /// The record is filtered: not an event for the API.
    Skip,
    /// The value passes through unchanged.
    Keep,
}

/// What a tombstone (a record with a key and no value, as a compacted or CDC topic writes after a
/// delete) becomes. An option rather than conditions evaluated over an absent value: a tombstone
/// is not a record with fields missing but a different kind of record, and Kafka Connect users
/// drop them by saying so (Debezium's `drop.tombstones`, the `Filter` transform with the
/// `RecordIsTombstone` predicate, a sink's `behavior.on.null.values`). Conditions over an absent
/// value would filter tombstones only as a side effect of a `keep_when` (without one, they would
/// fail as `required`, not as tombstones), and a `skip_when` written for values would change
/// meaning unnoticed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tombstones {
    /// The record fails with `tombstone` and goes to the dead-letter topic (the default: a
    /// topic that should have no tombstones says so).
    #[default]
    DeadLetter,
    /// The record is filtered (reason `tombstone`): counted and committed, not sent.
    Filter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AsType {
    String,
    Number,
    Integer,
    Boolean,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeSource {
    /// Integers (or numeric strings) by magnitude; other strings as RFC 3339.
    Auto,
    Seconds,
    Milliseconds,
    Microseconds,
    Nanoseconds,
    Rfc3339,
    Iso8601,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sign {
    /// Flip the sign.
    Negate,
    /// Make the number positive (or zero).
    Positive,
    /// Make the number negative (or zero).
    Negative,
}

/// A condition on a record: the source value is one of `in`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub from: String,
    #[serde(rename = "in")]
    pub one_of: Vec<Value>,
}

/// Custom properties copied from an object of the record.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PropertiesSpec {
    /// A JSON pointer to the object whose fields are copied; the whole value when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Copy only these fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    /// Copy only the fields that no API field reads.
    #[serde(default, skip_serializing_if = "is_false")]
    pub remaining: bool,
    /// Never copy these fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
    /// Put before every copied name (after `rename`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Field name → property name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rename: BTreeMap<String, String>,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PropertiesSpec>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<PropertiesSpec>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a properties table such as { from = \"/meta\", prefix = \"meta_\" }, or a list of them")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Ok(vec![PropertiesSpec::deserialize(
                de::value::MapAccessDeserializer::new(map),
            )?])
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::deserialize(de::value::SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(V)
}
