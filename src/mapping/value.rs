//! The JSON values a mapping works on. Strings borrow from the record's text wherever they have
//! no escape sequence (nearly always), and from the compiled mapping for constants and table
//! values, so that reading, converting and moving a field into the event allocates nothing.
//! Numbers are their JSON text ([`Decimal`]), so no digit changes between the record and the
//! event. Objects are sorted by key; a record with a duplicate key is refused by the reader
//! (`json`), so every object has unique keys.

use crate::decimal::Decimal;
use serde_json::Value;
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
    /// A number as its JSON text, as the record wrote it (issue 16: numbers stay exact).
    Num(Decimal<'a>),
    Str(Cow<'a, str>),
    Arr(Vec<Val<'a>>),
    /// Sorted by key, keys unique.
    Obj(Vec<(Cow<'a, str>, Val<'a>)>),
}

impl<'a> Val<'a> {
    pub fn is_null(&self) -> bool {
        matches!(self, Val::Null)
    }

    /// Whether a field or a condition takes this value as no value: null or the empty string
    /// (absent, null and empty mean the same; `docs/mapping.md`, "How values are read").
    pub fn is_absent(&self) -> bool {
        match self {
            Val::Null => true,
            Val::Str(s) => s.is_empty(),
            _ => false,
        }
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
            Val::Num(n) => Val::Num(n.reborrow()),
            Val::Str(s) => Val::Str(Cow::Borrowed(s)),
            Val::Arr(a) => Val::Arr(a.iter().map(Val::reborrow).collect()),
            Val::Obj(m) => Val::Obj(m.iter().map(|(k, v)| (Cow::Borrowed(&**k), v.reborrow())).collect()),
        }
    }

    /// The same value, owning its text.
    pub fn into_owned(self) -> Val<'static> {
        match self {
            Val::Null => Val::Null,
            Val::Bool(b) => Val::Bool(b),
            Val::Num(n) => Val::Num(n.into_owned()),
            Val::Str(s) => Val::Str(Cow::Owned(s.into_owned())),
            Val::Arr(a) => Val::Arr(a.into_iter().map(Val::into_owned).collect()),
            Val::Obj(m) => Val::Obj(
                m.into_iter()
                    .map(|(k, v)| (Cow::Owned(k.into_owned()), v.into_owned()))
                    .collect(),
            ),
        }
    }

    /// Converts from `serde_json` (configuration values); a number keeps `serde_json`'s text of it.
    pub fn from_json(v: Value) -> Val<'static> {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(b),
            Value::Number(n) => Val::Num(Decimal::from_checked(Cow::Owned(n.to_string()))),
            Value::String(s) => Val::Str(Cow::Owned(s)),
            Value::Array(a) => Val::Arr(a.into_iter().map(Val::from_json).collect()),
            // A `serde_json::Map` iterates in key order without duplicates: already sorted.
            Value::Object(m) => Val::Obj(m.into_iter().map(|(k, v)| (Cow::Owned(k), Val::from_json(v))).collect()),
        }
    }

    /// Appends the value as compact JSON; numbers as their text, strings escaped as `serde_json`
    /// escapes them, object members in the value's (sorted) order.
    pub fn write_json(&self, out: &mut String) {
        match self {
            Val::Null => out.push_str("null"),
            Val::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Val::Num(n) => out.push_str(n.as_str()),
            Val::Str(s) => write_str(out, s),
            Val::Arr(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write_json(out);
                }
                out.push(']');
            }
            Val::Obj(m) => {
                out.push('{');
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(out, k);
                    out.push(':');
                    v.write_json(out);
                }
                out.push('}');
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    // Writing a string cannot fail, and serde_json writes valid UTF-8.
    let mut buf = std::mem::take(out).into_bytes();
    serde_json::to_writer(&mut buf, s).expect("string serialisation is infallible");
    *out = String::from_utf8(buf).expect("serde_json writes UTF-8");
}

impl From<i64> for Val<'_> {
    fn from(i: i64) -> Self {
        Val::Num(Decimal::from(i))
    }
}

/// Writes the value as JSON ([`Val::write_json`]).
impl fmt::Display for Val<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::new();
        self.write_json(&mut text);
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn borrows_plain_strings_and_keeps_number_text() {
        let text =
            r#"{"b":"plain","a":"esc\"aped","n":[1,-2,2.50,77012345678901234567890123,true,null],"o":{"y":1,"x":{}}}"#;
        let v = super::super::json::parse(text).unwrap();
        assert!(matches!(v.get("b"), Some(Val::Str(Cow::Borrowed("plain")))));
        assert!(matches!(v.get("a"), Some(Val::Str(Cow::Owned(_)))));
        // Written back with the numbers as they were, members in key order.
        assert_eq!(
            v.to_string(),
            r#"{"a":"esc\"aped","b":"plain","n":[1,-2,2.50,77012345678901234567890123,true,null],"o":{"x":{},"y":1}}"#
        );
        assert_eq!(v.reborrow(), v);
        assert_eq!(v.clone().into_owned(), v);
        assert_eq!(v.get("o").and_then(|o| o.get("y")), Some(&Val::from(1)));
        // Configuration values come through serde_json, numbers as it writes them.
        let full: Value = serde_json::from_str(r#"{"x":1.5,"y":[2,"s"]}"#).unwrap();
        assert_eq!(Val::from_json(full).to_string(), r#"{"x":1.5,"y":[2,"s"]}"#);
        assert_eq!(Val::from_json(json!(1.5)), Val::Num(Decimal::parse("1.5").unwrap()));
    }
}
