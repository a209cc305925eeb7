//! Exact decimal numbers, kept as JSON number text: every number the mapping reads (`mapping`'s
//! values) and the API's `amount` and `bet_result_amount` (`event`).
//!
//! Issue 16 decided that JSON numbers are text: from the source record to the request body a
//! number keeps its decimal value exactly (`9007199254740993` is never written
//! `9007199254740992`, `77012345678901234567890123` never `7.7012345678901235e+25`). A
//! [`Decimal`] is the number's text in the grammar of RFC 8259 §6, finite as a binary64 (the
//! API reads it as one; non-finite values stay impossible). A number read from a record keeps its
//! text as written (`50.00` stays `50.00`); a decimal *string* converted to a number is written in
//! that grammar (see [`Decimal::parse_lenient`]).
//!
//! Why own code rather than a decimal library or `serde_json`'s `arbitrary_precision`: the text
//! borrows from the record, so reading, converting and writing an amount allocates nothing and
//! converts nothing (the mapping bench, `docs/mapping.md` "Speed"); the only arithmetic the bridge
//! does on amounts, the sign rules, is exact on the text (a minus sign added or removed, a test
//! for zero). `bigdecimal` would allocate and re-format every amount; `rust_decimal` stops at 28
//! digits. `arbitrary_precision` is a crate-graph-wide switch of `serde_json` that allocates a
//! `String` per number and breaks numbers inside `#[serde(flatten)]` (the sandbox's request type
//! uses one); the jq path keeps numbers exact without it (jaq-json reads numbers it cannot hold
//! as an integer as decimal text). Scaling (minor units) can adopt a library when it needs
//! multiplication.

use std::borrow::Cow;
use std::fmt;

/// A finite decimal number as JSON number text (RFC 8259 §6): `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decimal<'a>(Cow<'a, str>);

/// The parts of a number's text.
struct Parts<'t> {
    negative: bool,
    int: &'t str,
    frac: &'t str,
    /// The exponent's text after `e`/`E`, sign included; empty when there is none.
    exp: &'t str,
}

/// Splits `s` if it is JSON number text.
fn json_parts(s: &str) -> Option<Parts<'_>> {
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let int_start = i;
    i = digits(i);
    let int = &s[int_start..i];
    if int.is_empty() || (int.len() > 1 && int.starts_with('0')) {
        return None;
    }
    let mut frac = "";
    if b.get(i) == Some(&b'.') {
        let end = digits(i + 1);
        if end == i + 1 {
            return None;
        }
        frac = &s[i + 1..end];
        i = end;
    }
    let mut exp = "";
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let start = i + 1;
        let sign = usize::from(matches!(b.get(start), Some(b'+' | b'-')));
        let end = digits(start + sign);
        if end == start + sign {
            return None;
        }
        exp = &s[start..end];
        i = end;
    }
    (i == b.len()).then_some(Parts {
        negative: int_start == 1,
        int,
        frac,
        exp,
    })
}

/// Whether JSON number text is finite as a binary64. Only an exponent or more than 308 integer
/// digits can overflow, so the float parse runs for those alone.
fn finite(text: &str, p: &Parts) -> bool {
    if p.exp.is_empty() && p.int.len() <= 308 {
        return true;
    }
    text.parse::<f64>().is_ok_and(f64::is_finite)
}

impl<'a> Decimal<'a> {
    /// JSON number text, kept exactly as written; `None` when `text` is not a JSON number or
    /// overflows a binary64 (`1e400`).
    pub fn parse(text: &'a str) -> Option<Decimal<'a>> {
        let p = json_parts(text)?;
        finite(text, &p).then_some(Decimal(Cow::Borrowed(text)))
    }

    /// An owned [`Decimal::parse`].
    pub fn parse_owned(text: String) -> Option<Decimal<'static>> {
        let p = json_parts(&text)?;
        let ok = finite(&text, &p);
        ok.then_some(Decimal(Cow::Owned(text)))
    }

    /// A decimal string as partners write amounts (`" 12.50 "`, `"+5"`, `".5"`, `"5."`,
    /// `"007"`, `"1E3"`): white space around it is trimmed and, when it is not JSON number text
    /// already, it is written as such: a leading `+` dropped, leading zeros of the integer part
    /// dropped, `.5` written `0.5`, `5.` written `5`. The digits are never changed. `None` for
    /// anything else (`NaN`, `Infinity`, `0x10`, `1e400`, `1,5`).
    pub fn parse_lenient(s: &'a str) -> Option<Decimal<'a>> {
        let t = s.trim();
        if let Some(d) = Decimal::parse(t) {
            return Some(d);
        }
        let (negative, rest) = match t.as_bytes().first()? {
            b'-' => (true, &t[1..]),
            b'+' => (false, &t[1..]),
            _ => (false, t),
        };
        let (mantissa, exp) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        // Only digits around the point: a second sign (`0-5`, `+-5`) is not a number, and
        // dropping the leading zeros must never bring one to the front.
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let int = int.trim_start_matches('0');
        let mut out = String::with_capacity(t.len() + 2);
        if negative {
            out.push('-');
        }
        out.push_str(if int.is_empty() { "0" } else { int });
        if !frac.is_empty() {
            out.push('.');
            out.push_str(frac);
        }
        out.push_str(exp);
        Decimal::parse_owned(out)
    }

    /// A decimal from text the caller knows to be JSON number text and finite (the JSON
    /// reader's number literals, `serde_json`'s writing of a number).
    pub(crate) fn from_checked(text: Cow<'a, str>) -> Decimal<'a> {
        debug_assert!(
            Decimal::parse(&text).is_some(),
            "{text:?} is not finite JSON number text"
        );
        Decimal(text)
    }

    /// The text, as it is written in JSON.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, moved out.
    pub fn into_text(self) -> Cow<'a, str> {
        self.0
    }

    /// The same number, borrowing from this one.
    pub fn reborrow(&self) -> Decimal<'_> {
        Decimal(Cow::Borrowed(&self.0))
    }

    /// The same number, owned.
    pub fn into_owned(self) -> Decimal<'static> {
        Decimal(Cow::Owned(self.0.into_owned()))
    }

    fn parts(&self) -> Parts<'_> {
        json_parts(&self.0).expect("a Decimal holds JSON number text")
    }

    /// Whether the number is zero (`0`, `-0.00`, `0e5`).
    pub fn is_zero(&self) -> bool {
        let p = self.parts();
        p.int.bytes().chain(p.frac.bytes()).all(|b| b == b'0')
    }

    /// Whether the number is below zero (exactly: `-0` is not).
    pub fn is_negative(&self) -> bool {
        self.0.starts_with('-') && !self.is_zero()
    }

    /// Whether the number is above zero.
    pub fn is_positive(&self) -> bool {
        !self.0.starts_with('-') && !self.is_zero()
    }

    /// The nearest binary64 (for time conversions and comparisons that need no exactness).
    pub fn to_f64(&self) -> f64 {
        self.0.parse().expect("JSON number text parses as f64")
    }

    /// The number as an `i64` when it is written as an integer that fits (`12`, not `12.0`).
    pub fn as_i64(&self) -> Option<i64> {
        let p = self.parts();
        if p.frac.is_empty() && p.exp.is_empty() {
            self.0.parse().ok()
        } else {
            None
        }
    }

    /// The absolute value: the text without its minus sign.
    pub fn abs(self) -> Decimal<'a> {
        match self.0 {
            Cow::Borrowed(s) => Decimal(Cow::Borrowed(s.strip_prefix('-').unwrap_or(s))),
            Cow::Owned(mut s) => {
                if s.starts_with('-') {
                    s.remove(0);
                }
                Decimal(Cow::Owned(s))
            }
        }
    }

    /// The number with the opposite sign; zero stays zero, written without a sign.
    pub fn negate(self) -> Decimal<'a> {
        if self.0.starts_with('-') || self.is_zero() {
            self.abs()
        } else {
            Decimal(Cow::Owned(format!("-{}", self.0)))
        }
    }

    /// The same number written as an integer (`12.000` → `12`, `1.5e1` → `15`, `-0` → `0`), or
    /// `None` when it has a fractional part or more than 40 digits. Exact: no float is involved.
    pub fn to_integer(self) -> Option<Decimal<'a>> {
        let p = self.parts();
        if p.frac.is_empty() && p.exp.is_empty() && !self.is_negative_zero_text() {
            return Some(self);
        }
        let exp: i64 = if p.exp.is_empty() { 0 } else { p.exp.parse().ok()? };
        // value = digits × 10^scale
        let digits: String = p.int.chars().chain(p.frac.chars()).collect();
        let scale = exp.checked_sub(i64::try_from(p.frac.len()).ok()?)?;
        let int_digits = if scale >= 0 {
            if digits.trim_start_matches('0').is_empty() {
                "0".to_string()
            } else {
                let zeros = usize::try_from(scale).ok().filter(|z| digits.len() + z <= 40)?;
                format!("{digits}{}", "0".repeat(zeros))
            }
        } else {
            let cut = usize::try_from(-scale).ok()?;
            let (keep, drop) = digits.split_at(digits.len().saturating_sub(cut));
            if !drop.bytes().all(|b| b == b'0') {
                return None;
            }
            if keep.is_empty() {
                "0".to_string()
            } else {
                keep.to_string()
            }
        };
        let int_digits = int_digits.trim_start_matches('0');
        let int_digits = if int_digits.is_empty() { "0" } else { int_digits };
        if int_digits.len() > 40 {
            return None;
        }
        let negative = p.negative && int_digits != "0";
        Some(Decimal(Cow::Owned(format!(
            "{}{int_digits}",
            if negative { "-" } else { "" }
        ))))
    }

    /// ⌊value × 10^`pow10`⌋, exactly (rounded toward −∞, as a time is: `-1.5` s is the instant
    /// before `-1` s), or `None` when its size is beyond 10^30. For reading times: `1702963200.001`
    /// seconds is `1702963200001000000` nanoseconds, where a binary64 gives `…000999999`, and
    /// `946684799999999999` nanoseconds stays one before 2000-01-01 (issue 17).
    pub fn floor_scaled(&self, pow10: u32) -> Option<i128> {
        // Digit by digit, without an allocation: this runs for every record's time.
        const LIMIT: i128 = 10i128.pow(30);
        let p = self.parts();
        let exp: i64 = if p.exp.is_empty() { 0 } else { p.exp.parse().ok()? };
        // value × 10^pow10 = D × 10^scale, D the digits of `int` and `frac` as one integer
        let scale = exp
            .checked_add(i64::from(pow10))?
            .checked_sub(i64::try_from(p.frac.len()).ok()?)?;
        let total = p.int.len() + p.frac.len();
        let keep = if scale >= 0 {
            total
        } else {
            total.saturating_sub(usize::try_from(scale.unsigned_abs()).unwrap_or(usize::MAX))
        };
        let (mut magnitude, mut rest_nonzero) = (0i128, false);
        for (i, b) in p.int.bytes().chain(p.frac.bytes()).enumerate() {
            let digit = i128::from(b - b'0');
            if i < keep {
                magnitude = magnitude * 10 + digit;
                if magnitude > LIMIT {
                    return None;
                }
            } else {
                rest_nonzero |= digit != 0;
            }
        }
        if magnitude != 0 {
            for _ in 0..scale.max(0) {
                magnitude *= 10;
                if magnitude > LIMIT {
                    return None;
                }
            }
        }
        Some(match (p.negative, rest_nonzero) {
            (false, _) => magnitude,
            (true, false) => -magnitude,
            (true, true) => -magnitude - 1,
        })
    }

    /// Whether the number is not zero but a binary64 reads it as zero (`1e-400`). Only an exponent
    /// or more than 320 characters can spell one, so the usual amount needs no float parse.
    pub fn underflows(&self) -> bool {
        let p = self.parts();
        (!p.exp.is_empty() || self.0.len() > 320) && self.to_f64() == 0.0 && !self.is_zero()
    }

    fn is_negative_zero_text(&self) -> bool {
        self.0.starts_with('-') && self.is_zero()
    }

    /// The number's value as a canonical text, equal for equal values however they are written:
    /// `1.5`, `1.50`, `15e-1` and `0.15E1` all give `15e1`; `0`, `-0` and `0.00e7` give `0`.
    /// Shape: the significant digits `d` (no leading or trailing zero) and the exponent `e` of
    /// `0.d × 10^e`, with a `-` before a value below zero. For exact comparisons of numbers (a
    /// `table` key, an `in` value: issue 16, how a producer writes a number decides no match),
    /// never for writing. An exponent beyond ±10^30 (only a number that is zero as a binary64,
    /// `1e-99999999999999999999999999999999`, can have one) is clamped there.
    pub fn value_key(&self) -> String {
        let p = self.parts();
        let digits = || p.int.bytes().chain(p.frac.bytes());
        let leading = digits().take_while(|&b| b == b'0').count();
        let total = p.int.len() + p.frac.len();
        if leading == total {
            return "0".to_string();
        }
        let trailing = digits().rev().take_while(|&b| b == b'0').count();
        const CLAMP: i128 = 1_000_000_000_000_000_000_000_000_000_000;
        let exp = {
            let (negative, magnitude) = match p.exp.as_bytes().first() {
                Some(b'-') => (true, &p.exp[1..]),
                Some(b'+') => (false, &p.exp[1..]),
                _ => (false, p.exp),
            };
            let magnitude = magnitude.trim_start_matches('0');
            let m = if magnitude.len() > 31 {
                CLAMP
            } else {
                magnitude.parse::<i128>().unwrap_or(0).min(CLAMP)
            };
            if negative {
                -m
            } else {
                m
            }
        };
        let point = (exp + p.int.len() as i128 - leading as i128).clamp(-CLAMP, CLAMP);
        let mut out = String::with_capacity(total - leading - trailing + 8);
        if p.negative {
            out.push('-');
        }
        out.extend(digits().skip(leading).take(total - leading - trailing).map(char::from));
        out.push('e');
        out.push_str(&point.to_string());
        out
    }
}

impl From<i64> for Decimal<'_> {
    fn from(i: i64) -> Self {
        Decimal(Cow::Owned(itoa::Buffer::new().format(i).to_string()))
    }
}

impl fmt::Display for Decimal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_scaled_is_exact_and_rounds_down() {
        let f = |t: &str, p: u32| Decimal::parse(t).unwrap().floor_scaled(p);
        assert_eq!(f("1702963200.001", 9), Some(1_702_963_200_001_000_000));
        assert_eq!(f("946684799.9999999999", 9), Some(946_684_799_999_999_999));
        assert_eq!(f("946684799999999999", 0), Some(946_684_799_999_999_999));
        assert_eq!(f("1.702963200009e9", 3), Some(1_702_963_200_009));
        assert_eq!(f("-1.5", 0), Some(-2));
        assert_eq!(f("-1.0", 0), Some(-1));
        assert_eq!(f("-0.000", 9), Some(0));
        assert_eq!(f("-1e-30", 0), Some(-1));
        assert_eq!(f("1e-99999999999999", 9), Some(0));
        assert_eq!(f("0.5E1", 0), Some(5));
        assert_eq!(f("1e30", 0), Some(10i128.pow(30)));
        assert_eq!(f("1e31", 0), None);
        assert_eq!(f("1e20", 9), Some(10i128.pow(29)));
        assert_eq!(f("1e22", 9), None);
        assert_eq!(f("1e300", 0), None);
        assert_eq!(f("-1e-99999999999999999999", 9), None);
    }

    #[test]
    fn lenient_reading_never_moves_a_sign() {
        for bad in [
            "0-5", "00-12.50", "+-5", "+0-5", "0-1e3", "--5", "0+5", "-+5", "5-", "1.-5",
        ] {
            assert_eq!(Decimal::parse_lenient(bad), None, "{bad}");
        }
        assert_eq!(
            Decimal::parse_lenient(" +0012.50 ").map(|d| d.as_str().to_string()),
            Some("12.50".into())
        );
        assert_eq!(
            Decimal::parse_lenient("-007").map(|d| d.as_str().to_string()),
            Some("-7".into())
        );
    }

    #[test]
    fn json_number_text_is_kept_as_written() {
        for ok in [
            "0",
            "-0",
            "50.00",
            "9007199254740993",
            "77012345678901234567890123",
            "1E+3",
            "-2.5e-3",
        ] {
            assert_eq!(Decimal::parse(ok).map(|d| d.to_string()).as_deref(), Some(ok));
        }
        for bad in [
            "", "-", "01", "1.", ".5", "+1", "1e", "1e+", "NaN", "Infinity", "0x10", "1e400", " 1", "1 ",
        ] {
            assert!(Decimal::parse(bad).is_none(), "{bad}");
        }
        assert!(Decimal::parse(&"9".repeat(309)).is_none());
        assert!(Decimal::parse(&"9".repeat(308)).is_some());
    }

    #[test]
    fn decimal_strings_are_written_in_the_json_grammar_with_their_digits() {
        for (from, to) in [
            (" 12.50 ", "12.50"),
            ("+5", "5"),
            (".5", "0.5"),
            ("-.5", "-0.5"),
            ("5.", "5"),
            ("007", "7"),
            ("-00.10", "-0.10"),
            ("1E3", "1E3"),
            ("+1.5e-2", "1.5e-2"),
            ("904218376251884077", "904218376251884077"),
        ] {
            assert_eq!(
                Decimal::parse_lenient(from).map(|d| d.to_string()).as_deref(),
                Some(to),
                "{from}"
            );
        }
        for bad in [
            "", " ", "+", ".", "-.", "e5", "NaN", "inf", "1,5", "1e400", "0x1", "--1", "1.2.3", "½",
        ] {
            assert!(Decimal::parse_lenient(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn equal_values_have_one_key_however_written() {
        let key = |t: &str| Decimal::parse(t).unwrap().value_key();
        for same in [
            &["1.5", "1.50", "15e-1", "0.15E1", "0.0015e+3", "150E-2"][..],
            &["100", "1e2", "1.00E2", "10e1", "100.000"],
            &["0", "-0", "0.00", "0e7", "-0.0E-3"],
            &["-2.5", "-2.50", "-25e-1"],
            &["9007199254740993", "9007199254740993.0", "9.007199254740993e15"],
            &["0.000001", "1e-6", "10E-7"],
        ] {
            let keys: Vec<String> = same.iter().map(|t| key(t)).collect();
            assert!(keys.iter().all(|k| *k == keys[0]), "{same:?}: {keys:?}");
        }
        assert_eq!(key("1.5"), "15e1");
        assert_eq!(key("-0.025"), "-25e-1");
        assert_eq!(key("0"), "0");
        // Different values, different keys: the last digit, the sign, the scale.
        for (a, b) in [
            ("9007199254740993", "9007199254740992"),
            ("1.5", "-1.5"),
            ("1.5", "15"),
            ("77012345678901234567890123", "77012345678901234567890124"),
            ("1e-400", "2e-400"),
        ] {
            assert_ne!(key(a), key(b), "{a} vs {b}");
        }
        // An absurd exponent is clamped, not an overflow.
        assert_eq!(
            key("1e-99999999999999999999999999999999999"),
            format!("1e-{}", "9".repeat(30))
        );
    }

    #[test]
    fn signs_are_exact_on_the_text() {
        let d = |s: &'static str| Decimal::parse(s).unwrap();
        assert_eq!(d("5.00").negate().as_str(), "-5.00");
        assert_eq!(d("-9007199254740993").negate().as_str(), "9007199254740993");
        assert_eq!(d("0.00").negate().as_str(), "0.00");
        assert_eq!(d("-0").abs().as_str(), "0");
        assert!(d("-0.000000000000000000000000000001").is_negative());
        assert!(d("1e-400").is_positive(), "tiny, but not zero: a binary64 would say 0");
        assert!(!d("-0.0").is_negative() && !d("-0.0").is_positive() && d("-0.0").is_zero());
        assert_eq!(d("12").as_i64(), Some(12));
        assert_eq!(d("12.0").as_i64(), None);
    }

    #[test]
    fn integers_are_found_exactly() {
        let int = |s: &'static str| Decimal::parse(s).unwrap().to_integer().map(|d| d.to_string());
        assert_eq!(int("12").as_deref(), Some("12"));
        assert_eq!(int("12.000").as_deref(), Some("12"));
        assert_eq!(int("1.5e1").as_deref(), Some("15"));
        assert_eq!(int("-0").as_deref(), Some("0"));
        assert_eq!(int("1500e-2").as_deref(), Some("15"));
        assert_eq!(
            int("77012345678901234567890123").as_deref(),
            Some("77012345678901234567890123")
        );
        assert_eq!(int("0.30000000000000000001e1"), None, "a binary64 would call it 3");
        assert_eq!(int("12.5"), None);
        assert_eq!(int("1e41"), None);
    }
}
