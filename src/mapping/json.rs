//! A JSON reader (RFC 8259) made for the mapping's one pass over a record value: it builds [`Val`]s
//! that borrow their strings from the text, and checks the syntax of everything else without
//! building it. `serde_json` does the same through serde's visitors at about twice the cost, which
//! was half of the mapping's time (`docs/mapping.md`, "Speed"); `tests` below hold this reader to
//! `serde_json`'s verdicts and values on every input they try.
//!
//! Limits, as `serde_json`'s: a value that is built may nest [`MAX_DEPTH`] deep; a skipped value
//! may nest without limit (it is skipped without recursion).
//!
//! Where it deliberately differs from `serde_json` (issue 16: a record means one thing, and no
//! value changes on the way): numbers are kept as their text ([`Decimal`]), not rounded to a
//! binary64 (a number that overflows one, `1e400`, is still refused, built or skipped); an object
//! with a key twice is refused, in built and skipped parts alike, where `serde_json` keeps the
//! last. (The mapping also ignores one leading byte order mark, before this reader sees the
//! text.)

use super::value::Val;
use crate::decimal::Decimal;
use std::borrow::Cow;
use std::fmt;

/// The `what` of a [`JsonError`] for an object with a key twice.
pub const DUPLICATE_KEY: &str = "duplicate key in an object";

/// How deep a built value may nest.
pub const MAX_DEPTH: usize = 128;

/// Why a text is not JSON, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub what: &'static str,
    /// Byte offset in the text.
    pub at: usize,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

impl std::error::Error for JsonError {}

pub type Result<T> = std::result::Result<T, JsonError>;

/// A cursor over one JSON text.
pub struct Scanner<'t> {
    text: &'t str,
    b: &'t [u8],
    i: usize,
    /// The keys of the objects being read without being built, innermost last, as the byte
    /// range of each key's text between its quotes: to refuse a key seen twice in one object.
    /// Reused across records ([`Scanner::with_keys`]) so that reading allocates nothing.
    keys: Vec<NotedKey>,
    /// False while [`Scanner::skip_syntax`] runs: keys, number ranges and surrogates are then
    /// left to the reader of the bytes.
    strict: bool,
}

/// Objects with at most this many keys are checked for a repeated key pair by pair; larger ones
/// are sorted (O(n log n), issue 16: no input makes mapping slow).
const PAIRWISE_KEYS: usize = 12;

impl<'t> Scanner<'t> {
    pub fn new(text: &'t str) -> Scanner<'t> {
        Scanner::with_keys(text, Vec::new())
    }

    /// A scanner that keeps its key list in `keys` (emptied first); [`Scanner::into_keys`] gives
    /// it back for the next record.
    pub fn with_keys(text: &'t str, mut keys: Vec<NotedKey>) -> Scanner<'t> {
        keys.clear();
        Scanner {
            text,
            b: text.as_bytes(),
            i: 0,
            keys,
            strict: true,
        }
    }

    /// The byte offset of the cursor.
    pub fn offset(&self) -> usize {
        self.i
    }

    /// Skips a value checking its structure only (as serde's `IgnoredAny` does: not its keys,
    /// not whether a number fits a binary64 or a `\u` escape pairs its surrogates): for a value
    /// that is passed on as bytes (the `map` envelope's `value`), which the mapping then reads
    /// and refuses as `run` would, naming where in the value.
    pub fn skip_syntax(&mut self) -> Result<()> {
        self.strict = false;
        let skipped = self.skip();
        self.strict = true;
        skipped
    }

    /// The key list's storage, for the next scanner.
    pub fn into_keys(self) -> Vec<NotedKey> {
        self.keys
    }

    /// Where the next key list of an object starts ([`Scanner::close_keys`] takes it back).
    #[inline]
    pub fn open_keys(&self) -> usize {
        self.keys.len()
    }

    /// An object key and its `:`, noted for the check of its object's keys
    /// ([`Scanner::close_keys`]).
    #[inline(always)] // as `key` was inlined into the reader's loop: called, they cost 6% more instructions a record
    pub fn noted_key(&mut self) -> Result<Cow<'t, str>> {
        let start = self.i + 1;
        let k = self.key()?;
        if self.strict {
            let tag = key_tag(&k);
            let noted = match &k {
                // A key without an escape borrows its text: where it lies is where it points.
                Cow::Borrowed(plain) => {
                    let start = plain.as_ptr() as usize - self.text.as_ptr() as usize;
                    NotedKey {
                        start,
                        end: start + plain.len(),
                        tag,
                        escaped: false,
                    }
                }
                // `key` read the string and the `:`; the closing quote is the last before.
                Cow::Owned(_) => NotedKey {
                    start,
                    end: self.b[..self.i].iter().rposition(|&c| c == b'"').unwrap_or(start),
                    tag,
                    escaped: true,
                },
            };
            self.keys.push(noted);
        }
        Ok(k)
    }

    /// At the end of an object whose keys were noted since `mark`: fails with "duplicate key"
    /// (just after the later one) when a key appears twice, and forgets the object's keys. Keys
    /// are compared as written, and only a key with an escape is unescaped to compare (`"id"` and
    /// `"\u0069d"` are the same key).
    pub fn close_keys(&mut self, mark: usize) -> Result<()> {
        let text = self.text;
        let key = |k: &NotedKey| key_text(text, k);
        let keys = &mut self.keys[mark..];
        let mut repeated = None;
        if keys.len() <= PAIRWISE_KEYS {
            'outer: for j in 1..keys.len() {
                for i in 0..j {
                    if keys[i].tag == keys[j].tag && same_key(text, &keys[i], &keys[j]) {
                        repeated = Some(keys[j].end);
                        break 'outer;
                    }
                }
            }
        } else {
            keys.sort_unstable_by(|a, b| key(a).cmp(&key(b)).then(a.start.cmp(&b.start)));
            repeated = keys
                .windows(2)
                .find(|w| key(&w[0]) == key(&w[1]))
                .map(|w| w[0].end.max(w[1].end));
        }
        self.keys.truncate(mark);
        match repeated {
            // Just after the later key's closing quote, so that its pointer names the key.
            Some(end) => Err(JsonError {
                what: DUPLICATE_KEY,
                at: end + 1,
            }),
            None => Ok(()),
        }
    }

    pub fn err<T>(&self, what: &'static str) -> Result<T> {
        Err(JsonError { what, at: self.i })
    }

    /// Skips whitespace and returns the next byte, if any.
    #[inline]
    pub fn peek(&mut self) -> Option<u8> {
        while let Some(&c) = self.b.get(self.i) {
            if !matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                return Some(c);
            }
            self.i += 1;
        }
        None
    }

    /// Consumes `c` (after whitespace) or fails with `what`.
    #[inline]
    pub fn expect(&mut self, c: u8, what: &'static str) -> Result<()> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            self.err(what)
        }
    }

    /// Moves past the byte [`Scanner::peek`] returned.
    #[inline]
    pub fn bump(&mut self) {
        self.i += 1;
    }

    /// Consumes `c` (after whitespace) if it is next.
    #[inline]
    pub fn eat(&mut self, c: u8) -> bool {
        let next = self.peek() == Some(c);
        self.i += usize::from(next);
        next
    }

    /// After the top-level value: only whitespace may follow.
    pub fn end(&mut self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => self.err("trailing characters after the JSON value"),
        }
    }

    /// Reads a value, building it.
    pub fn value(&mut self, depth: usize) -> Result<Val<'t>> {
        match self.peek() {
            Some(b'"') => Ok(Val::Str(self.string()?)),
            Some(b'{') => {
                if depth >= MAX_DEPTH {
                    return self.err("nested too deeply");
                }
                let start = self.i;
                self.i += 1;
                let mut pairs: Vec<(Cow<'t, str>, Val<'t>)> = Vec::new();
                if !self.eat(b'}') {
                    loop {
                        let k = self.key()?;
                        pairs.push((k, self.value(depth + 1)?));
                        if !self.next_member(b'}')? {
                            break;
                        }
                    }
                }
                object(pairs).map(Val::Obj).map_err(|key| JsonError {
                    what: DUPLICATE_KEY,
                    at: self.repeated_key_end(start, &key),
                })
            }
            Some(b'[') => {
                if depth >= MAX_DEPTH {
                    return self.err("nested too deeply");
                }
                self.i += 1;
                let mut items = Vec::new();
                if !self.eat(b']') {
                    loop {
                        items.push(self.value(depth + 1)?);
                        if !self.next_member(b']')? {
                            break;
                        }
                    }
                }
                Ok(Val::Arr(items))
            }
            Some(b'-' | b'0'..=b'9') => self.number().map(Val::Num),
            Some(b't') => self.word(b"true").map(|()| Val::Bool(true)),
            Some(b'f') => self.word(b"false").map(|()| Val::Bool(false)),
            Some(b'n') => self.word(b"null").map(|()| Val::Null),
            Some(_) => self.err("expected a JSON value"),
            None => self.err("unexpected end of the text"),
        }
    }

    /// An object key and its `:`.
    #[inline(always)]
    pub fn key(&mut self) -> Result<Cow<'t, str>> {
        if self.peek() != Some(b'"') {
            return self.err("expected a string key");
        }
        let k = self.string()?;
        self.expect(b':', "expected `:` after an object key")?;
        Ok(k)
    }

    /// After a member of an object or array: `,` (true, another follows) or `close` (false).
    #[inline]
    pub fn next_member(&mut self, close: u8) -> Result<bool> {
        match self.peek() {
            Some(b',') => {
                self.i += 1;
                Ok(true)
            }
            Some(c) if c == close => {
                self.i += 1;
                Ok(false)
            }
            _ if close == b'}' => self.err("expected `,` or `}` in an object"),
            _ => self.err("expected `,` or `]` in an array"),
        }
    }

    fn word(&mut self, word: &'static [u8]) -> Result<()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            self.err("expected a JSON value")
        }
    }

    /// Skips a value, checking its syntax, without building it and without recursion.
    pub fn skip(&mut self) -> Result<()> {
        // The open containers, innermost last: for an object, where its keys start in `keys`.
        let mut open: Vec<Option<usize>> = Vec::new();
        loop {
            // A value.
            match self.peek() {
                Some(b'"') => self.skip_string()?,
                Some(b'{') => {
                    self.i += 1;
                    if !self.eat(b'}') {
                        open.push(Some(self.open_keys()));
                        self.skip_key()?;
                        continue;
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    if !self.eat(b']') {
                        open.push(None);
                        continue;
                    }
                }
                Some(b'-' | b'0'..=b'9') => {
                    // Refused as where it is built (`1e400`): a skipped part is held to the
                    // same grammar, so a record is refused or read whatever the mapping reads.
                    if self.strict {
                        self.number()?;
                    } else {
                        self.number_end()?;
                    }
                }
                Some(b't') => self.word(b"true")?,
                Some(b'f') => self.word(b"false")?,
                Some(b'n') => self.word(b"null")?,
                Some(_) => return self.err("expected a JSON value"),
                None => return self.err("unexpected end of the text"),
            }
            // Closes what ends after it, until a `,` says another member follows.
            loop {
                let Some(&keys) = open.last() else {
                    return Ok(());
                };
                if self.next_member(if keys.is_some() { b'}' } else { b']' })? {
                    if keys.is_some() {
                        self.skip_key()?;
                    }
                    break;
                }
                if let Some(mark) = keys {
                    self.close_keys(mark)?;
                }
                open.pop();
            }
        }
    }

    /// A key of a skipped object, noted for the duplicate check; only passed over (its escapes
    /// unchecked, as a value's) while [`Scanner::skip_syntax`] runs.
    fn skip_key(&mut self) -> Result<()> {
        if !self.strict {
            if self.peek() != Some(b'"') {
                return self.err("expected a string key");
            }
            self.skip_string()?;
            return self.expect(b':', "expected `:` after an object key");
        }
        self.noted_key().map(drop)
    }

    /// The offset just after the second `key` of the object that starts at `start` (for the
    /// error of a built object with a repeated key; the cold path re-reads the object's keys).
    #[cold]
    fn repeated_key_end(&self, start: usize, key: &str) -> usize {
        let mut s = Scanner::new(self.text);
        s.i = start + 1;
        let mut seen = 0;
        while s.peek() == Some(b'"') {
            let Ok(k) = s.key() else { break };
            if k == key {
                seen += 1;
                if seen == 2 {
                    // Just after the key's closing quote.
                    return s.b[..s.i].iter().rposition(|&c| c == b'"').map_or(s.i, |q| q + 1);
                }
            }
            if s.skip().is_err() || !matches!(s.next_member(b'}'), Ok(true)) {
                break;
            }
        }
        start
    }

    /// The end of the plain run of a string starting at `self.i`: the next quote, backslash or
    /// control character.
    #[inline]
    fn plain_run(&self) -> usize {
        let mut j = self.i;
        while let Some(&c) = self.b.get(j) {
            if c == b'"' || c == b'\\' || c < 0x20 {
                break;
            }
            j += 1;
        }
        j
    }

    /// A string, at its opening quote: borrowed when it has no escape.
    #[inline(always)] // the common case, a plain string, then stays in registers
    pub fn string(&mut self) -> Result<Cow<'t, str>> {
        self.i += 1;
        let start = self.i;
        self.i = self.plain_run();
        if self.b.get(self.i) == Some(&b'"') {
            self.i += 1;
            // Both ends are ASCII bytes, so character boundaries.
            return Ok(Cow::Borrowed(&self.text[start..self.i - 1]));
        }
        self.string_rest(start)
    }

    /// The rest of a string that has an escape (or an error) at `self.i`.
    #[cold]
    fn string_rest(&mut self, start: usize) -> Result<Cow<'t, str>> {
        match self.b.get(self.i) {
            Some(b'\\') => {
                let mut s = String::with_capacity(self.i - start + 16);
                s.push_str(&self.text[start..self.i]);
                loop {
                    match self.b.get(self.i) {
                        Some(b'"') => {
                            self.i += 1;
                            return Ok(Cow::Owned(s));
                        }
                        Some(b'\\') => {
                            self.i += 1;
                            self.escape(&mut s)?;
                        }
                        Some(_) => return self.err("control character in a string"),
                        None => return self.err("unterminated string"),
                    }
                    let from = self.i;
                    self.i = self.plain_run();
                    s.push_str(&self.text[from..self.i]);
                }
            }
            Some(_) => self.err("control character in a string"),
            None => self.err("unterminated string"),
        }
    }

    fn skip_string(&mut self) -> Result<()> {
        self.i += 1;
        loop {
            self.i = self.plain_run();
            match self.b.get(self.i) {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.b.get(self.i) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            self.i += 1;
                            if self.strict {
                                self.unicode_escape()?;
                            } else {
                                self.hex4()?;
                            }
                        }
                        _ => return self.err("invalid escape in a string"),
                    }
                }
                Some(_) => return self.err("control character in a string"),
                None => return self.err("unterminated string"),
            }
        }
    }

    /// One escape, after its backslash, appended to `s`.
    fn escape(&mut self, s: &mut String) -> Result<()> {
        let c = match self.b.get(self.i) {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.i += 1;
                let c = self.unicode_escape()?;
                s.push(c);
                return Ok(());
            }
            _ => return self.err("invalid escape in a string"),
        };
        self.i += 1;
        s.push(c);
        Ok(())
    }

    /// A `\u` escape, after its `u`: one character, a surrogate pair joined into one. A
    /// surrogate without its pair is refused, in built and skipped strings alike: such text is
    /// not Unicode (RFC 8259 §8.2), and `serde_json` refuses it too.
    fn unicode_escape(&mut self) -> Result<char> {
        let hi = self.hex4()?;
        let c = match hi {
            0xD800..=0xDBFF => {
                if !self.b[self.i..].starts_with(b"\\u") {
                    return self.err("lone leading surrogate in a \\u escape");
                }
                self.i += 2;
                let lo = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&lo) {
                    return self.err("lone leading surrogate in a \\u escape");
                }
                char::from_u32(0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00))
            }
            _ => char::from_u32(u32::from(hi)),
        };
        match c {
            Some(c) => Ok(c),
            None => self.err("lone trailing surrogate in a \\u escape"),
        }
    }

    fn hex4(&mut self) -> Result<u16> {
        let Some(digits) = self.b.get(self.i..self.i + 4) else {
            return self.err("invalid \\u escape");
        };
        let mut n = 0u16;
        for &d in digits {
            let v = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return self.err("invalid \\u escape"),
            };
            n = n * 16 + u16::from(v);
        }
        self.i += 4;
        Ok(n)
    }

    /// Moves past a number's literal; returns whether it has an exponent.
    fn number_end(&mut self) -> Result<bool> {
        let digits = |s: &mut Self| {
            let from = s.i;
            while s.b.get(s.i).is_some_and(u8::is_ascii_digit) {
                s.i += 1;
            }
            s.i > from
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.b.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return self.err("invalid number"),
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if !digits(self) {
                return self.err("invalid number");
            }
        }
        let mut exponent = false;
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !digits(self) {
                return self.err("invalid number");
            }
            exponent = true;
        }
        Ok(exponent)
    }

    /// A number, as its text (issue 16: numbers stay exact); refused when it overflows a
    /// binary64 (`1e400`: the API reads numbers as binary64, and non-finite values stay
    /// impossible).
    fn number(&mut self) -> Result<Decimal<'t>> {
        let start = self.i;
        let exponent = self.number_end()?;
        let lit = &self.text[start..self.i];
        // Only an exponent or more than 308 digits can overflow: the usual literal needs no
        // float parse.
        if (exponent || lit.len() > 308) && !lit.parse::<f64>().is_ok_and(f64::is_finite) {
            return Err(JsonError {
                what: "number out of range",
                at: start,
            });
        }
        Ok(Decimal::from_checked(Cow::Borrowed(lit)))
    }
}

/// An object key the reader passed: the byte range of its text between its quotes, and whether
/// that text has an escape (then it must be unescaped to be compared).
#[derive(Debug, Clone, Copy)]
pub struct NotedKey {
    start: usize,
    end: usize,
    /// [`key_tag`] of the unescaped text: keys with different tags differ, so most pairs are
    /// told apart without reading the text (profiled: comparing the text of every pair was most
    /// of the check's cost).
    tag: u32,
    escaped: bool,
}

/// A cheap summary of a key's (unescaped) text: its length, first and last byte.
#[inline]
fn key_tag(k: &str) -> u32 {
    let b = k.as_bytes();
    let (first, last) = (b.first().copied().unwrap_or(0), b.last().copied().unwrap_or(0));
    ((b.len() as u32) << 16) | (u32::from(first) << 8) | u32::from(last)
}

/// The text of a noted key: borrowed unless it has an escape.
fn key_text<'t>(text: &'t str, k: &NotedKey) -> Cow<'t, str> {
    let raw = &text[k.start..k.end];
    if !k.escaped {
        return Cow::Borrowed(raw);
    }
    let mut s = Scanner::new(text);
    s.i = k.start - 1;
    // The reader read this key before: it unescapes.
    s.string().unwrap_or(Cow::Borrowed(raw))
}

/// Whether two noted keys are the same text once unescaped; the raw comparison decides unless
/// one has an escape.
#[inline]
fn same_key(text: &str, a: &NotedKey, b: &NotedKey) -> bool {
    if !a.escaped && !b.escaped {
        return text.as_bytes()[a.start..a.end] == text.as_bytes()[b.start..b.end];
    }
    key_text(text, a) == key_text(text, b)
}

/// Object members sorted by key; `Err` with a key that appears twice.
pub fn object<'t>(
    mut pairs: Vec<(Cow<'t, str>, Val<'t>)>,
) -> std::result::Result<Vec<(Cow<'t, str>, Val<'t>)>, String> {
    pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    match pairs.windows(2).find(|w| w[0].0 == w[1].0) {
        Some(w) => Err(w[0].0.to_string()),
        None => Ok(pairs),
    }
}

/// Parses a whole JSON text (an expression's result, and tests).
pub fn parse(text: &str) -> Result<Val<'_>> {
    let mut s = Scanner::new(text);
    let v = s.value(0)?;
    s.end()?;
    Ok(v)
}

/// The JSON pointer (RFC 6901) of the value the reader was in at byte `at` of `text`: `/money/value`
/// for an error inside that value, `/money` for one between its members, `""` for the top level.
/// Computed only for an error, by a second walk over `text[..at]` (which the reader accepted).
pub fn pointer_at(text: &str, at: usize) -> String {
    // The open containers: (is an object, its current key or index as a pointer token).
    let mut open: Vec<(bool, Option<String>)> = Vec::new();
    let mut s = Scanner::new(text);
    let end = at.min(text.len());
    // In an object: the next string is a key.
    let mut want_key = false;
    while s.i < end {
        let c = s.b[s.i];
        match c {
            b'{' => {
                open.push((true, None));
                want_key = true;
                s.i += 1;
            }
            b'[' => {
                open.push((false, Some("0".into())));
                s.i += 1;
            }
            b'}' | b']' => {
                open.pop();
                want_key = false;
                s.i += 1;
            }
            b',' => {
                match open.last_mut() {
                    Some((true, key)) => {
                        *key = None;
                        want_key = true;
                    }
                    Some((false, index)) => {
                        let next = index
                            .as_deref()
                            .and_then(|i| i.parse::<usize>().ok())
                            .map_or(0, |i| i + 1);
                        *index = Some(next.to_string());
                    }
                    None => {}
                }
                s.i += 1;
            }
            b'"' => {
                let from = s.i;
                match s.string() {
                    Ok(k) if want_key => {
                        if let Some((true, key)) = open.last_mut() {
                            *key = Some(k.into_owned());
                        }
                        want_key = false;
                    }
                    Ok(_) => {}
                    // The error is inside this string: a key being read is not named yet.
                    Err(_) => break,
                }
                if s.i <= from {
                    break;
                }
            }
            _ => s.i += 1,
        }
    }
    let mut out = String::new();
    for (_, token) in &open {
        let Some(t) = token else { break };
        out.push('/');
        out.push_str(&t.replace('~', "~0").replace('/', "~1"));
    }
    out
}

/// Checks a whole JSON text without building it.
#[cfg(test)]
pub fn check(text: &str) -> Result<()> {
    let mut s = Scanner::new(text);
    s.skip()?;
    s.end()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use serde_json::Value;

    /// Equal as JSON, floats to the last few bits (serde_json's float parsing is not always
    /// correctly rounded; `str::parse` is).
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
                _ if x == y => true,
                (Some(x), Some(y)) => (x - y).abs() <= x.abs().max(y.abs()) * 4.0 * f64::EPSILON,
                _ => false,
            },
            (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|((ka, a), (kb, b))| ka == kb && same(a, b))
            }
            _ => a == b,
        }
    }

    /// This reader and serde_json agree on `text`: both refuse it, or both read the same value;
    /// except for the deliberate divergences (module doc): a key twice in an object is refused
    /// here, kept last there; numbers are kept as text here (so this reader's value, written and
    /// read by serde_json, must equal serde_json's own reading).
    fn agrees(text: &str) {
        let ours = parse(text);
        let theirs = serde_json::from_str::<Value>(text);
        match (&ours, &theirs) {
            (Ok(v), Ok(t)) => {
                let via_text: Value = serde_json::from_str(&v.to_string()).unwrap();
                assert!(same(&via_text, t), "{text:?}: {v:?} vs {t:?}");
            }
            (Err(_), Err(_)) => {}
            (Err(e), Ok(_)) if e.what == DUPLICATE_KEY => {}
            _ => panic!("{text:?}: ours {ours:?}, serde_json {theirs:?}"),
        }
        // Skipping holds a value to what building it does: serde_json's reading of a whole
        // value, not its laxer `IgnoredAny` (which passes `1e400` and a lone surrogate), so a
        // record is refused or read whatever part of it a mapping reads.
        match check(text) {
            // Refused for the key whatever serde_json says (it may refuse a later part).
            Err(e) if e.what == DUPLICATE_KEY => {}
            checked => assert_eq!(checked.is_ok(), theirs.is_ok(), "check({text:?}): {:?}", theirs.err()),
        }
    }

    const SEEDS: &[&str] = &[
        r#"{"type":"DEPOSIT_COMPLETED","player":{"id":"p-77","clickId":"ck-9","ip":"198.51.100.7"},"ref":"W-1","money":{"value":"50.00","ccy":"usd"},"occurredAt":"2023-12-19T05:20:00Z","meta":{"channel":"ios","vip":"gold"}}"#,
        r#"[1, -0, 0.5, -2.5e-3, 1E+2, 18446744073709551615, 18446744073709551616, -9223372036854775808, -9223372036854775809, 1e308, 123456789012345678901234567890]"#,
        r#"{"s":"a\"b\\c\/d\be\ff\ng\rh\ti\u00e9\ud83d\ude00 ü","e":"","n":null,"t":true,"f":false,"d":{"x":1,"y":2}}"#,
        r#"{"a":{"k":1,"\u006b":2},"b":[{"k":1},{"k":2,"j":[3]}],"a":2,"n":77012345678901234567890123}"#,
        "  [ {} , [] , [[]], {\"a\" : [ ] } ]  ",
        r#""just a string""#,
        "0",
        "-1",
    ];

    #[test]
    fn agrees_with_serde_json_on_valid_documents() {
        for s in SEEDS {
            assert!(parse(s).is_ok() || parse(s).unwrap_err().what == DUPLICATE_KEY, "{s}");
            agrees(s);
        }
    }

    #[test]
    fn agrees_with_serde_json_on_broken_ones() {
        for s in [
            "",
            " ",
            "{",
            "}",
            "[",
            "[1,]",
            "[,1]",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{a:1}",
            "{\"a\":1 \"b\":2}",
            "01",
            "-",
            "1.",
            ".5",
            "1e",
            "1e+",
            "+1",
            "--1",
            "0x10",
            "1e400",
            "-1e400",
            "tru",
            "nul",
            "falsey",
            "\"abc",
            "\"a\\x\"",
            "\"\\u12\"",
            "\"\\ud83d\"",
            "\"\\ude00\"",
            "\"\\ud83dx\"",
            "\"\\ud83d\\u0041\"",
            "\"tab\there\"",
            "\"nl\nhere\"",
            "[1] [2]",
            "{} x",
            "\u{feff}{}",
            "NaN",
            "Infinity",
            "[1,2",
        ] {
            agrees(s);
        }
    }

    /// What building refuses, skipping refuses at the same byte: a number that overflows a
    /// binary64 and a surrogate without its pair, wherever they are.
    #[test]
    fn skipped_parts_are_refused_as_built_ones() {
        for (text, what, at) in [
            (r#"{"a":1,"b":1e400}"#, "number out of range", 11),
            (r#"{"a":1,"b":[-2E+999]}"#, "number out of range", 12),
            (r#"{"a":"\ud800x"}"#, "lone leading surrogate in a \\u escape", 12),
            (r#"{"a":{"k":"\udc00"}}"#, "lone trailing surrogate in a \\u escape", 17),
            (r#"{"a":"\ud83d\u0041"}"#, "lone leading surrogate in a \\u escape", 18),
            // A key twice: just after the later key, built or skipped (a built object once
            // named its end instead, so the pointer depended on what the mapping read).
            (r#"{"a":1,"p":{"k":1,"\u006B":2}}"#, DUPLICATE_KEY, 26),
            (r#"{"player":{"id":"A"},"x":1,"player":{}}"#, DUPLICATE_KEY, 35),
        ] {
            let built = parse(text).unwrap_err();
            assert_eq!((built.what, built.at), (what, at), "built: {text}");
            assert_eq!(check(text).unwrap_err(), built, "skipped: {text}");
        }
        // Tiny numbers are finite (zero as a binary64), and a joined pair is one character.
        assert!(check(r#"{"a":1e-400,"b":"\ud83d\ude00"}"#).is_ok());
        // Passing bytes on (the `map` envelope's value) checks structure only, as `IgnoredAny`:
        // the mapping reads them and refuses them as `run` does, naming where in the value.
        for text in [
            r#"{"b":1e400}"#,
            r#"{"a":"\ud800x"}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"k\udc00":1}"#,
        ] {
            let mut s = Scanner::new(text);
            assert_eq!(s.skip_syntax(), Ok(()), "{text}");
            assert!(serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok());
        }
    }

    #[test]
    fn deep_nesting_is_refused_when_built_and_skipped_without_limit() {
        let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
        assert!(parse(&deep(MAX_DEPTH)).is_ok());
        assert_eq!(parse(&deep(MAX_DEPTH + 1)).unwrap_err().what, "nested too deeply");
        assert!(serde_json::from_str::<Value>(&deep(MAX_DEPTH + 1)).is_err());
        assert!(check(&deep(100_000)).is_ok());
        assert!(check(&("[".repeat(100_000) + &"]".repeat(99_999))).is_err());
    }

    /// Random edits of the seeds (bytes flipped, inserted, removed; text cut short), each
    /// judged by both readers: 30,000 documents, most of them broken in some way.
    #[test]
    fn agrees_with_serde_json_on_random_edits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        const BYTES: &[u8] = b"{}[],:\"\\ -+.eE0123456789abfnrtux\n\t";
        for n in 0..30_000 {
            let mut b = SEEDS[n % SEEDS.len()].as_bytes().to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..=b.len());
                match rng.random_range(0..4) {
                    0 if at < b.len() => b[at] = BYTES[rng.random_range(0..BYTES.len())],
                    1 => b.insert(at, BYTES[rng.random_range(0..BYTES.len())]),
                    2 if at < b.len() => drop(b.remove(at)),
                    _ => b.truncate(at),
                }
            }
            if let Ok(text) = std::str::from_utf8(&b) {
                agrees(text);
            }
        }
    }
}
