//! The JSON values a mapping works on. Strings borrow from the record's text wherever they have
//! no escape sequence (nearly always), and from the compiled mapping for constants and table
//! values, so that reading, converting and moving a field into the event allocates nothing.
//! Objects keep `serde_json::Map`'s semantics (keys sorted, the last of duplicate keys wins).

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::{Number, Value};
use std::borrow::Cow;
use std::fmt;

/// A JSON value borrowing its text where it can.
///
/// The tag is a full word: with a one-byte tag, moving a value through a `Result` copied the tag's
/// padding with loads that straddle earlier stores, stalling the pipeline at every step of the
/// field options (the size is the same, 32 bytes, either way).
#[derive(Debug, Clone, PartialEq)]
#[repr(u64)]
pub enum Val<'a> {
    Null,
    Bool(bool),
    Num(Number),
    Str(Cow<'a, str>),
    Arr(Vec<Val<'a>>),
    /// Sorted by key, keys unique.
    Obj(Vec<(Cow<'a, str>, Val<'a>)>),
}

impl<'a> Val<'a> {
    pub fn is_null(&self) -> bool {
        matches!(self, Val::Null)
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Val::Num(n) => n.as_f64(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Val::Num(n) => n.as_i64(),
            _ => None,
        }
    }

    pub fn is_i64(&self) -> bool {
        matches!(self, Val::Num(n) if n.is_i64())
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Val<'a>> {
        match self {
            Val::Obj(pairs) => pairs
                .binary_search_by(|(k, _)| k.as_ref().cmp(key))
                .ok()
                .map(|i| &pairs[i].1),
            _ => None,
        }
    }

    /// The same value, borrowing from this one (strings are not copied).
    pub fn reborrow(&self) -> Val<'_> {
        match self {
            Val::Null => Val::Null,
            Val::Bool(b) => Val::Bool(*b),
            Val::Num(n) => Val::Num(n.clone()),
            Val::Str(s) => Val::Str(Cow::Borrowed(s)),
            Val::Arr(a) => Val::Arr(a.iter().map(Val::reborrow).collect()),
            Val::Obj(m) => Val::Obj(m.iter().map(|(k, v)| (Cow::Borrowed(&**k), v.reborrow())).collect()),
        }
    }

    /// Converts from `serde_json` (configuration values, an expression's result).
    pub fn from_json(v: Value) -> Val<'static> {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(b),
            Value::Number(n) => Val::Num(n),
            Value::String(s) => Val::Str(Cow::Owned(s)),
            Value::Array(a) => Val::Arr(a.into_iter().map(Val::from_json).collect()),
            // A `serde_json::Map` iterates in key order without duplicates: already sorted.
            Value::Object(m) => Val::Obj(m.into_iter().map(|(k, v)| (Cow::Owned(k), Val::from_json(v))).collect()),
        }
    }

    /// Converts to `serde_json` (an expression's input).
    pub fn to_json(&self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(*b),
            Val::Num(n) => Value::Number(n.clone()),
            Val::Str(s) => Value::String(s.to_string()),
            Val::Arr(a) => Value::Array(a.iter().map(Val::to_json).collect()),
            Val::Obj(m) => Value::Object(m.iter().map(|(k, v)| (k.to_string(), v.to_json())).collect()),
        }
    }
}

impl From<i64> for Val<'_> {
    fn from(i: i64) -> Self {
        Val::Num(i.into())
    }
}

/// Writes the value as JSON.
impl fmt::Display for Val<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl Serialize for Val<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Val::Null => s.serialize_unit(),
            Val::Bool(b) => s.serialize_bool(*b),
            Val::Num(n) => n.serialize(s),
            Val::Str(t) => s.serialize_str(t),
            Val::Arr(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Val::Obj(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn borrows_plain_strings_and_converts_both_ways() {
        let text = r#"{"b":"plain","a":"esc\"aped","n":[1,-2,2.5,true,null],"b":"last","o":{"y":1,"x":{}}}"#;
        let v = super::super::json::parse(text).unwrap();
        let Val::Obj(pairs) = &v else { panic!("{v:?}") };
        assert!(matches!(
            pairs.iter().find(|p| p.0 == "b").unwrap().1,
            Val::Str(Cow::Borrowed("last"))
        ));
        assert!(matches!(v.get("a"), Some(Val::Str(Cow::Owned(_)))));
        let full: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v.to_json(), full);
        assert_eq!(Val::from_json(full.clone()), v);
        assert_eq!(v.to_string(), full.to_string());
        assert_eq!(v.reborrow(), v);
        assert_eq!(v.get("o").and_then(|o| o.get("y")), Some(&Val::from(1)));
        assert_eq!(Val::from_json(json!(1.5)).as_f64(), Some(1.5));
    }
}
