//! The fiat currency codes the contract accepts (decision 4) and each one's minor-unit exponent,
//! taken from a maintained data set: the `iso_currency` crate (its table follows ISO 4217's
//! amendments; a new code such as `VED`, or a withdrawn one such as `HRK`, arrives with a version
//! of the crate rather than by editing a list here).
//!
//! Of the crate's codes, the accepted ones are its *active currencies*:
//! - not a fund code (`BOV`, `CHE`, `CHW`, `CLF`, `COU`, `MXV`, `USN`, `UYI`, `UYW`: units of
//!   account, not money a payment is made in) and not a special code (the precious metals `XAU`,
//!   `XAG`, `XPT`, `XPD`, the units `XDR`, `XSU`, `XUA`, `XAD`, the bond units `XBA`…`XBD`, the
//!   testing code `XTS`, "no currency" `XXX`): the contract's fiat is a currency;
//! - not one the crate marks superseded (`HRK` by `EUR`, `SLL` by `SLE`, `ZWL` by `ZWG`, `CUC` by
//!   `CUP`, `BGN` by `EUR`), with one documented exception, [`KEPT_THOUGH_MARKED_SUPERSEDED`].
//!
//! The lookup is one load from a table indexed by the code's three letters, built once from the
//! crate on first use: it runs for every event, in the bridge and in the sandbox.

use iso_currency::Currency;
use std::sync::LazyLock;

/// Codes the crate marks superseded that ISO 4217 keeps active. `VES`: the crate marks it
/// superseded by `VED`, but ISO 4217 amendment 170 (1 October 2021), which added `VED`, says that
/// `VES`/928 "remains the valid code" for transactions and that both stay on List One until
/// further notice; Venezuela's central bank kept `VES`. A test fails once the crate stops marking
/// a code here superseded, so that the exception goes with the error.
pub(crate) const KEPT_THOUGH_MARKED_SUPERSEDED: &[&str] = &["VES"];

/// Three upper-case letters: 26³ codes.
const CODES: usize = 26 * 26 * 26;

struct Table {
    /// By [`code_index`]: the minor-unit exponent plus one, 0 for a code that is not accepted.
    exponent: [u8; CODES],
    /// The accepted codes, sorted.
    codes: Vec<&'static str>,
}

static TABLE: LazyLock<Table> = LazyLock::new(build);

/// Whether the crate's currency `c` is an accepted fiat currency, and its exponent if so.
fn accepted(c: Currency) -> Option<u8> {
    if c.is_fund() || c.is_special() {
        return None;
    }
    if c.is_superseded().is_some() && !KEPT_THOUGH_MARKED_SUPERSEDED.contains(&c.code()) {
        return None;
    }
    c.exponent().and_then(|e| u8::try_from(e).ok())
}

fn build() -> Table {
    let mut exponent = [0u8; CODES];
    let mut codes = Vec::new();
    // The crate lists its currencies by numeric code (unique in its table; the tests check that
    // every alphabetic code is reached), which a `match` on an integer answers at once.
    for n in 0..1000 {
        let Some(c) = Currency::from_numeric(n) else { continue };
        let Some(e) = accepted(c) else { continue };
        let Some(i) = code_index(c.code()) else { continue };
        exponent[i] = e + 1;
        codes.push(c.code());
    }
    codes.sort_unstable();
    Table { exponent, codes }
}

/// The index of three upper-case ASCII letters.
#[inline]
fn code_index(s: &str) -> Option<usize> {
    match s.as_bytes() {
        [a, b, c] if a.is_ascii_uppercase() && b.is_ascii_uppercase() && c.is_ascii_uppercase() => {
            Some(((*a - b'A') as usize * 26 + (*b - b'A') as usize) * 26 + (*c - b'A') as usize)
        }
        _ => None,
    }
}

/// An active ISO 4217 currency code (upper case, as ISO writes it).
#[inline]
pub fn is_iso4217(s: &str) -> bool {
    minor_unit_exponent(s).is_some()
}

/// The minor-unit exponent of an active ISO 4217 currency (`EUR` 2, `JPY` 0, `KWD` 3): an amount
/// in minor units is the amount times 10 to this power. `None` for anything else.
#[inline]
pub fn minor_unit_exponent(code: &str) -> Option<u8> {
    let i = code_index(code)?;
    TABLE.exponent[i].checked_sub(1)
}

/// Every accepted code, sorted: the list `docs/openapi.yaml` states.
pub fn iso4217_codes() -> &'static [&'static str] {
    &TABLE.codes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_three_letter_codes() -> impl Iterator<Item = String> {
        (b'A'..=b'Z').flat_map(|a| {
            (b'A'..=b'Z').flat_map(move |b| (b'A'..=b'Z').map(move |c| String::from_utf8(vec![a, b, c]).unwrap()))
        })
    }

    #[test]
    fn the_issue_s_examples() {
        // VED is a current code (amendment 170); the hand-written table refused it.
        assert!(is_iso4217("VED"));
        assert_eq!(minor_unit_exponent("VED"), Some(2));
        // Withdrawn: the kuna (EUR since 2023), the old leone, the Zimbabwe dollar, the
        // convertible peso, the Netherlands Antillean guilder (XCG since 2025), the lev (EUR
        // since 2026).
        for gone in ["HRK", "SLL", "ZWL", "CUC", "ANG", "BGN"] {
            assert!(!is_iso4217(gone), "{gone}");
            assert_eq!(minor_unit_exponent(gone), None, "{gone}");
        }
        for current in ["VES", "SLE", "ZWG", "XCG", "EUR", "USD"] {
            assert!(is_iso4217(current), "{current}");
        }
    }

    #[test]
    fn exponents_come_with_the_codes() {
        for (code, e) in [
            ("EUR", 2),
            ("USD", 2),
            ("JPY", 0),
            ("KRW", 0),
            ("ISK", 0),
            ("BHD", 3),
            ("KWD", 3),
            ("TND", 3),
            ("VES", 2),
        ] {
            assert_eq!(minor_unit_exponent(code), Some(e), "{code}");
        }
        for (code, e) in [("CLF", 4), ("UYW", 4)] {
            // Funds have exponents too, but are not currencies a payment is made in.
            assert_eq!(Currency::from_code(code).and_then(|c| c.exponent()), Some(e));
            assert_eq!(minor_unit_exponent(code), None, "{code}");
        }
    }

    #[test]
    fn funds_specials_and_malformed_codes_are_refused() {
        for code in ["BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "UYI", "UYW"] {
            assert!(Currency::from_code(code).is_some_and(Currency::is_fund), "{code}");
            assert!(!is_iso4217(code), "{code}");
        }
        for code in ["XAU", "XAG", "XDR", "XTS", "XXX", "XSU", "XUA"] {
            assert!(!is_iso4217(code), "{code}");
        }
        for not in ["", "EU", "EURO", "eur", "Eur", "EU1", "ÉUR", "E\u{0}R", "BTC", "USDT"] {
            assert!(!is_iso4217(not), "{not:?}");
            assert_eq!(minor_unit_exponent(not), None, "{not:?}");
        }
    }

    /// The table is the crate's data, filtered only as the module doc says: built here again the
    /// slow way, by every three-letter code, it is the same.
    #[test]
    fn the_table_is_the_crate_s_active_currencies() {
        let mut by_code = Vec::new();
        for code in all_three_letter_codes() {
            if let Some(c) = Currency::from_code(&code) {
                // Every alphabetic code is reached by its numeric code too (no two share one).
                assert_eq!(Currency::from_numeric(c.numeric()), Some(c), "{code}");
                if let Some(e) = accepted(c) {
                    by_code.push((code.clone(), e));
                }
            }
            assert_eq!(
                minor_unit_exponent(&code),
                by_code.last().filter(|(k, _)| *k == code).map(|(_, e)| *e),
                "{code}"
            );
        }
        let codes: Vec<&str> = by_code.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(iso4217_codes(), codes.as_slice());
        assert!(codes.len() > 150, "{}", codes.len());
    }

    #[test]
    fn each_exception_is_still_needed() {
        for code in KEPT_THOUGH_MARKED_SUPERSEDED {
            let c = Currency::from_code(code).unwrap();
            assert!(
                c.is_superseded().is_some(),
                "the crate no longer marks {code} superseded: remove it from KEPT_THOUGH_MARKED_SUPERSEDED"
            );
            assert!(is_iso4217(code));
        }
    }

    /// `docs/openapi.yaml` states the same list (the fiat `enum` of the currency rule); regenerate
    /// it from `iso4217_codes()` when the crate's data changes.
    #[test]
    fn the_openapi_list_is_the_same() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
        let doc: serde_json::Value = serde_norway::from_str(&text).unwrap();
        let rules = doc["components"]["schemas"]["Event"]["allOf"].as_array().unwrap();
        let rule = rules
            .iter()
            .find(|r| r["description"].as_str().is_some_and(|d| d.contains("ISO 4217")))
            .expect("the currency rule");
        let listed: Vec<&str> = rule["else"]["properties"]["currency"]["anyOf"][0]["enum"]
            .as_array()
            .expect("the fiat enum")
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let want = iso4217_codes();
        assert!(
            listed == want,
            "docs/openapi.yaml's currency list differs from the crate's active codes; write:\n\
             - enum: [{}]\n(missing: {:?}; extra: {:?})",
            want.join(", "),
            want.iter().filter(|c| !listed.contains(c)).collect::<Vec<_>>(),
            listed.iter().filter(|c| !want.contains(c)).collect::<Vec<_>>(),
        );
    }
}
