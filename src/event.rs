//! The Server Events API event and the contract rules of `API-CONTRACT.md`.
//!
//! One set of rules serves both sides: the bridge validates what its mapping produced before it
//! sends anything, and the sandbox validates what it receives. The sandbox first turns a raw JSON
//! object into an [`Event`] with [`Event::from_json`] (which reports wrong types field by field);
//! both then call [`Event::validate`].

use crate::decimal::Decimal;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

mod currency;
pub mod time_window;
pub use currency::{is_iso4217, iso4217_codes, minor_unit_exponent};

/// Unit of the `timestamp` field the API is configured for (contract decision 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TimestampUnit {
    #[default]
    Seconds,
    Milliseconds,
}

impl TimestampUnit {
    /// Whether `ts` looks like it was written in the other unit: a seconds value after the year
    /// 5000, or a milliseconds value before 1973 (that is, a seconds value).
    pub fn looks_like_other_unit(self, ts: i64) -> bool {
        match self {
            TimestampUnit::Seconds => ts > 100_000_000_000,
            TimestampUnit::Milliseconds => ts > 0 && ts < 100_000_000_000,
        }
    }
}

/// Contract settings shared by the bridge's validation and the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ContractOptions {
    /// Unit of `timestamp` (decision 3). Default seconds.
    #[serde(default)]
    pub timestamp_unit: TimestampUnit,
    /// Require `click_id` and `ip_address` on every event, not only register/login/deposit
    /// (decision 2). Default false.
    #[serde(default)]
    pub strict_click_ip: bool,
}

/// `bet_result` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetResult {
    Win,
    Loss,
}

impl BetResult {
    pub fn as_str(self) -> &'static str {
        match self {
            BetResult::Win => "win",
            BetResult::Loss => "loss",
        }
    }
}

/// One event of the Server Events API (section 1.1 of the seed document).
///
/// Custom properties (`<<any_prop>>`) are kept in insertion order and are always strings.
///
/// The text fields borrow where they can: a mapped event from the record it was read from, the
/// sandbox's from the request body. An event lives only until it is serialised and its dedupe
/// keys are taken, so borrowing saves an allocation per field on the hot path.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event<'a> {
    pub client_user_id: Cow<'a, str>,
    pub event_name: Cow<'a, str>,
    pub timestamp: i64,
    pub click_id: Option<Cow<'a, str>>,
    pub ip_address: Option<Cow<'a, str>>,
    pub user_agent: Option<Cow<'a, str>>,
    pub game_type: Option<Cow<'a, str>>,
    pub game_provider: Option<Cow<'a, str>>,
    pub transaction_id: Option<Cow<'a, str>>,
    /// An exact decimal (issue 16), written to the body as its text.
    pub amount: Option<Decimal<'a>>,
    pub currency: Option<Cow<'a, str>>,
    pub is_crypto: Option<bool>,
    pub bet_result: Option<BetResult>,
    /// An exact decimal, as `amount`.
    pub bet_result_amount: Option<Decimal<'a>>,
    pub parent_transaction_id: Option<Cow<'a, str>>,
    pub properties: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

/// The API's fields (section 1.1 of the seed document), in its order: the one table every list of
/// them is made from (issue 17). `api_fields!(callback)` calls `callback!` with every row as
/// `(Variant, name, Kind, required)`: the [`Field`] variant, the field's name as an identifier (its
/// JSON key is `stringify!(name)`, and it is the name of the [`Event`] member and of the
/// `[[mapping]]` key), its [`FieldKind`], and whether the contract requires it on every event
/// (`true` for the three decision 0 names; the others are required only by rules that depend on
/// the event).
///
/// Made from it: [`Field`] and its lookups, [`KNOWN_FIELDS`], [`Event::from_json`],
/// [`Event::write_json`], [`Event::into_owned`], [`Event::text`], and the mapping's
/// `MappingConfig` (one key per field). The [`Event`] struct names each member once more, and the
/// compiler holds it to the table: `into_owned` builds it from the table's names alone.
macro_rules! api_fields {
    ($callback:ident) => {
        $callback! {
            (ClientUserId, client_user_id, Text, true),
            (EventName, event_name, Text, true),
            (Timestamp, timestamp, Time, true),
            (ClickId, click_id, Text, false),
            (IpAddress, ip_address, Text, false),
            (UserAgent, user_agent, Text, false),
            (GameType, game_type, Text, false),
            (GameProvider, game_provider, Text, false),
            (TransactionId, transaction_id, Text, false),
            (Amount, amount, Decimal, false),
            (Currency, currency, Text, false),
            (IsCrypto, is_crypto, Bool, false),
            (BetResult, bet_result, BetResult, false),
            (BetResultAmount, bet_result_amount, Decimal, false),
            (ParentTransactionId, parent_transaction_id, Text, false),
        }
    };
}
pub(crate) use api_fields;

/// What an API field holds on the wire (section 1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// A JSON string.
    Text,
    /// `timestamp`: a JSON integer in the configured unit (decision 3).
    Time,
    /// An amount: a JSON number, kept as exact decimal text (issue 16).
    Decimal,
    /// `is_crypto`: a JSON boolean.
    Bool,
    /// `bet_result`: `"win"` or `"loss"`.
    BetResult,
}

macro_rules! field_enum {
    ($(($variant:ident, $name:ident, $kind:ident, $required:literal)),* $(,)?) => {
        /// One of the API's fields (section 1.1), made from [`api_fields!`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Field {
            $($variant),*
        }

        impl Field {
            /// Every field, in the seed document's order.
            pub const ALL: [Field; [$(Field::$variant),*].len()] = [$(Field::$variant),*];

            /// The field's JSON key (`"client_user_id"`, …).
            pub const fn name(self) -> &'static str {
                match self {
                    $(Field::$variant => stringify!($name)),*
                }
            }

            /// The field a JSON key names; `None` for any other key (a custom property).
            pub fn from_name(name: &str) -> Option<Field> {
                match name {
                    $(stringify!($name) => Some(Field::$variant),)*
                    _ => None,
                }
            }

            /// What the field holds on the wire.
            pub const fn kind(self) -> FieldKind {
                match self {
                    $(Field::$variant => FieldKind::$kind),*
                }
            }

            /// Whether every event must carry it (decision 0: `client_user_id`, `event_name`,
            /// `timestamp`); the others are required only by the rules of [`Event::validate`].
            pub const fn always_required(self) -> bool {
                match self {
                    $(Field::$variant => $required),*
                }
            }
        }

        /// The names of the fields the contract defines, in the seed document's order. Anything
        /// else is a custom property.
        pub const KNOWN_FIELDS: &[&str] = &[$(stringify!($name)),*];
    };
}
api_fields!(field_enum);

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The events that carry money (decision 1).
pub const FINANCIAL_EVENTS: &[&str] = &["deposit", "withdraw", "bet", "win", "loss"];

/// A contract rule. Its code is what the sandbox puts in a 400 body and what the bridge puts in a
/// dead-letter reason; tests match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A field that is always required is missing or empty.
    Required,
    /// A field has the wrong JSON type.
    Type,
    /// A financial event lacks transaction_id, amount or currency.
    FinancialFields,
    /// click_id / ip_address missing where required (decision 2).
    ClickIp,
    /// ip_address is not an IPv4 or IPv6 address.
    IpAddress,
    /// currency is not ISO 4217 (fiat) or a short upper-case code (crypto).
    Currency,
    /// bet_result / bet_result_amount misuse (Pattern A).
    BetResult,
    /// parent_transaction_id misuse or a win/loss without it (Pattern B).
    Settlement,
    /// Net result sign does not match win/loss.
    AmountSign,
    /// A custom property is not a string.
    PropertyType,
    /// timestamp is not a positive integer.
    Timestamp,
    /// amount is not a finite number.
    Amount,
}

impl Rule {
    pub fn code(self) -> &'static str {
        match self {
            Rule::Required => "required",
            Rule::Type => "type",
            Rule::FinancialFields => "financial_fields",
            Rule::ClickIp => "click_id_ip_address",
            Rule::IpAddress => "ip_address",
            Rule::Currency => "currency",
            Rule::BetResult => "bet_result",
            Rule::Settlement => "settlement",
            Rule::AmountSign => "amount_sign",
            Rule::PropertyType => "property_type",
            Rule::Timestamp => "timestamp",
            Rule::Amount => "amount",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One broken rule: the field it concerns, the rule, and a sentence for humans.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Violation {
    pub field: String,
    pub rule: &'static str,
    pub message: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, rule: Rule, message: impl Into<String>) -> Self {
        Violation {
            field: field.into(),
            rule: rule.code(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "field `{}` breaks rule `{}`: {}",
            self.field, self.rule, self.message
        )
    }
}

impl<'a> Event<'a> {
    pub fn is_financial(&self) -> bool {
        FINANCIAL_EVENTS.contains(&self.event_name.as_ref())
    }

    /// Whether this is a Pattern A bet (a bet carrying its result).
    pub fn carries_bet_result(&self) -> bool {
        self.event_name == "bet" && self.bet_result.is_some()
    }

    /// Whether this is a Pattern B settlement (a standalone win or loss).
    pub fn is_standalone_settlement(&self) -> bool {
        matches!(self.event_name.as_ref(), "win" | "loss")
    }

    /// Checks every contract rule and returns each violation (empty when valid).
    pub fn validate(&self, opts: &ContractOptions) -> Vec<Violation> {
        let mut v = Vec::new();
        if self.client_user_id.is_empty() {
            v.push(Violation::new(
                "client_user_id",
                Rule::Required,
                "client_user_id is required and must not be empty",
            ));
        }
        if self.event_name.is_empty() {
            v.push(Violation::new(
                "event_name",
                Rule::Required,
                "event_name is required and must not be empty",
            ));
        }
        if self.timestamp <= 0 {
            v.push(Violation::new(
                "timestamp",
                Rule::Timestamp,
                "timestamp must be a positive Unix time integer",
            ));
        }
        let name = self.event_name.as_ref();
        if self.is_financial() {
            for (field, present) in [
                (
                    "transaction_id",
                    self.transaction_id.as_deref().is_some_and(|s| !s.is_empty()),
                ),
                ("amount", self.amount.is_some()),
                ("currency", self.currency.as_deref().is_some_and(|s| !s.is_empty())),
            ] {
                if !present {
                    v.push(Violation::new(
                        field,
                        Rule::FinancialFields,
                        format!("`{name}` is a financial event and requires `{field}`"),
                    ));
                }
            }
        }
        let needs_click_ip = opts.strict_click_ip || matches!(name, "register" | "login" | "deposit");
        if needs_click_ip {
            for (field, value) in [("click_id", &self.click_id), ("ip_address", &self.ip_address)] {
                if value.as_deref().is_none_or(str::is_empty) {
                    v.push(Violation::new(
                        field,
                        Rule::ClickIp,
                        format!("`{field}` is required for `{name}` events"),
                    ));
                }
            }
        }
        if let Some(ip) = &self.ip_address {
            if ip.parse::<IpAddr>().is_err() {
                v.push(Violation::new(
                    "ip_address",
                    Rule::IpAddress,
                    format!("`{}` is not an IPv4 or IPv6 address", truncate(ip)),
                ));
            }
        }
        if let Some(ccy) = &self.currency {
            let crypto = self.is_crypto == Some(true);
            if crypto {
                if !is_crypto_code(ccy) {
                    v.push(Violation::new(
                        "currency",
                        Rule::Currency,
                        format!(
                            "`{}` is not a crypto currency code (2 to 10 upper-case letters or digits)",
                            truncate(ccy)
                        ),
                    ));
                }
            } else if !is_iso4217(ccy) {
                v.push(Violation::new(
                    "currency",
                    Rule::Currency,
                    format!(
                        "`{}` is not an ISO 4217 fiat currency code; set is_crypto=true for crypto",
                        truncate(ccy)
                    ),
                ));
            }
        }
        // Pattern A: bet_result and bet_result_amount together, on bets only, sign by result.
        match (self.bet_result, &self.bet_result_amount) {
            (Some(_), None) => v.push(Violation::new(
                "bet_result_amount",
                Rule::BetResult,
                "bet_result requires bet_result_amount",
            )),
            (None, Some(_)) => v.push(Violation::new(
                "bet_result",
                Rule::BetResult,
                "bet_result_amount requires bet_result",
            )),
            (Some(result), Some(amount)) => {
                if name != "bet" {
                    v.push(Violation::new(
                        "bet_result",
                        Rule::BetResult,
                        format!("bet_result is only allowed on `bet` events, not `{name}`"),
                    ));
                }
                // Exact on the decimal: a binary64 would call -1e-400 zero.
                if (result == BetResult::Win && amount.is_negative())
                    || (result == BetResult::Loss && amount.is_positive())
                {
                    v.push(Violation::new(
                        "bet_result_amount",
                        Rule::AmountSign,
                        format!(
                            "a {} must have a {} bet_result_amount",
                            result.as_str(),
                            if result == BetResult::Win {
                                "positive or zero"
                            } else {
                                "negative or zero"
                            }
                        ),
                    ));
                }
            }
            (None, None) => {}
        }
        // Pattern B: win/loss link to their bet; only they carry parent_transaction_id.
        if self.is_standalone_settlement() {
            if self.parent_transaction_id.as_deref().is_none_or(str::is_empty) {
                v.push(Violation::new(
                    "parent_transaction_id",
                    Rule::Settlement,
                    format!("a standalone `{name}` requires parent_transaction_id naming its bet"),
                ));
            }
            if let Some(amount) = &self.amount {
                if (name == "win" && amount.is_negative()) || (name == "loss" && amount.is_positive()) {
                    v.push(Violation::new(
                        "amount",
                        Rule::AmountSign,
                        format!(
                            "a `{name}` must have a {} amount (the net result)",
                            if name == "win" {
                                "positive or zero"
                            } else {
                                "negative or zero"
                            }
                        ),
                    ));
                }
            }
        } else if self.parent_transaction_id.is_some() {
            v.push(Violation::new(
                "parent_transaction_id",
                Rule::Settlement,
                format!("parent_transaction_id is only allowed on `win` and `loss` events, not `{name}`"),
            ));
        }
        v
    }
}

/// How a member of [`Event`] is read from the API's JSON, written to it, shown as text and made
/// owned: one implementation per member type, so that the rows of [`api_fields!`] need no code of
/// their own.
trait Slot<'a>: Sized {
    /// The member's type with every borrow owned.
    type Static;
    /// Reads the member from `val` (the value of JSON key `k`) into `self`; a value of the wrong
    /// type leaves `self` as it is and adds a violation naming `k`.
    fn read(&mut self, k: &str, val: &'a Value, errs: &mut Vec<Violation>);
    /// Appends `key` (the member's `,"name":`, one constant) and the value; nothing when the
    /// member is absent.
    fn write(&self, key: &str, out: &mut Vec<u8>);
    /// The value as text (dedupe keys, conditions); `None` when absent.
    fn text(&self) -> Option<Cow<'_, str>>;
    fn into_static(self) -> Self::Static;
    /// The member as a place for text ([`TextSlot`]); `None` for a member that is not text.
    fn text_slot(&mut self) -> Option<TextSlot<'_, 'a>> {
        None
    }
    /// The member as a place for an amount; `None` for a member that is not one.
    fn decimal_slot(&mut self) -> Option<&mut Option<Decimal<'a>>> {
        None
    }
}

/// Where a text field of an [`Event`] is set (the mapping's writes).
pub enum TextSlot<'s, 'a> {
    /// `client_user_id`, `event_name`.
    Required(&'s mut Cow<'a, str>),
    /// Every other text field.
    Optional(&'s mut Option<Cow<'a, str>>),
}

/// A required text member (`client_user_id`, `event_name`).
impl<'a> Slot<'a> for Cow<'a, str> {
    type Static = Cow<'static, str>;
    fn read(&mut self, k: &str, val: &'a Value, errs: &mut Vec<Violation>) {
        if let Some(s) = want_str(k, val, errs) {
            *self = s;
        }
    }
    fn write(&self, key: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(key.as_bytes());
        write_str(out, self);
    }
    fn text(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(self))
    }
    fn into_static(self) -> Cow<'static, str> {
        Cow::Owned(self.into_owned())
    }
    fn text_slot(&mut self) -> Option<TextSlot<'_, 'a>> {
        Some(TextSlot::Required(self))
    }
}

/// An optional text member; JSON `null` is absent.
impl<'a> Slot<'a> for Option<Cow<'a, str>> {
    type Static = Option<Cow<'static, str>>;
    fn read(&mut self, k: &str, val: &'a Value, errs: &mut Vec<Violation>) {
        *self = want_opt_str(k, val, errs);
    }
    fn write(&self, key: &str, out: &mut Vec<u8>) {
        if let Some(v) = self {
            out.extend_from_slice(key.as_bytes());
            write_str(out, v);
        }
    }
    fn text(&self) -> Option<Cow<'_, str>> {
        self.as_deref().map(Cow::Borrowed)
    }
    fn into_static(self) -> Option<Cow<'static, str>> {
        self.map(|c| Cow::Owned(c.into_owned()))
    }
    fn text_slot(&mut self) -> Option<TextSlot<'_, 'a>> {
        Some(TextSlot::Optional(self))
    }
}

/// `timestamp`: a JSON integer (decision 3).
impl<'a> Slot<'a> for i64 {
    type Static = i64;
    fn read(&mut self, k: &str, val: &'a Value, errs: &mut Vec<Violation>) {
        match val.as_i64() {
            Some(t) => *self = t,
            None => errs.push(Violation::new(
                k,
                Rule::Type,
                format!("{k} must be an integer, got {}", json_kind(val)),
            )),
        }
    }
    fn write(&self, key: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(itoa::Buffer::new().format(*self).as_bytes());
    }
    fn text(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.to_string()))
    }
    fn into_static(self) -> i64 {
        self
    }
}

/// An amount: an exact decimal (issue 16), written as its text (`50.00` stays `50.00`).
impl<'a> Slot<'a> for Option<Decimal<'a>> {
    type Static = Option<Decimal<'static>>;
    fn read(&mut self, k: &str, val: &'a Value, errs: &mut Vec<Violation>) {
        *self = want_opt_num(k, val, errs);
    }
    fn write(&self, key: &str, out: &mut Vec<u8>) {
        if let Some(a) = self {
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(a.as_str().as_bytes());
        }
    }
    fn text(&self) -> Option<Cow<'_, str>> {
        self.as_ref().map(|a| Cow::Borrowed(a.as_str()))
    }
    fn into_static(self) -> Option<Decimal<'static>> {
        self.map(Decimal::into_owned)
    }
    fn decimal_slot(&mut self) -> Option<&mut Option<Decimal<'a>>> {
        Some(self)
    }
}

/// `is_crypto`: a JSON boolean; `null` is absent.
impl<'a> Slot<'a> for Option<bool> {
    type Static = Option<bool>;
    fn read(&mut self, k: &str, val: &'a Value, errs: &mut Vec<Violation>) {
        match val {
            Value::Null => {}
            Value::Bool(b) => *self = Some(*b),
            other => errs.push(Violation::new(
                k,
                Rule::Type,
                format!("{k} must be a boolean, got {}", json_kind(other)),
            )),
        }
    }
    fn write(&self, key: &str, out: &mut Vec<u8>) {
        if let Some(b) = self {
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(if *b { b"true" } else { b"false" });
        }
    }
    fn text(&self) -> Option<Cow<'_, str>> {
        self.map(|b| Cow::Borrowed(if b { "true" } else { "false" }))
    }
    fn into_static(self) -> Option<bool> {
        self
    }
}

/// `bet_result`: `"win"` or `"loss"`; `null` is absent.
impl<'a> Slot<'a> for Option<BetResult> {
    type Static = Option<BetResult>;
    fn read(&mut self, k: &str, val: &'a Value, errs: &mut Vec<Violation>) {
        match val {
            Value::Null => {}
            Value::String(s) if s == "win" => *self = Some(BetResult::Win),
            Value::String(s) if s == "loss" => *self = Some(BetResult::Loss),
            other => errs.push(Violation::new(
                k,
                Rule::BetResult,
                format!("{k} must be \"win\" or \"loss\", got {}", short_json(other)),
            )),
        }
    }
    fn write(&self, key: &str, out: &mut Vec<u8>) {
        if let Some(r) = self {
            out.extend_from_slice(key.as_bytes());
            write_str(out, r.as_str());
        }
    }
    fn text(&self) -> Option<Cow<'_, str>> {
        self.map(|r| Cow::Borrowed(r.as_str()))
    }
    fn into_static(self) -> Option<BetResult> {
        self
    }
}

macro_rules! event_io {
    ($(($variant:ident, $name:ident, $kind:ident, $required:literal)),* $(,)?) => {
        impl<'a> Event<'a> {
            /// Reads an event from a JSON object as the API receives it, reporting each field of
            /// the wrong type. Missing always-required fields are reported as [`Rule::Required`].
            pub fn from_json(obj: &'a Map<String, Value>) -> Result<Event<'a>, Vec<Violation>> {
                let mut errs = Vec::new();
                let mut e = Event::default();
                let mut seen = [false; Field::ALL.len()];
                for (k, val) in obj {
                    match k.as_str() {
                        $(stringify!($name) => {
                            seen[Field::$variant as usize] = true;
                            Slot::read(&mut e.$name, k, val, &mut errs);
                        })*
                        _ => match val {
                            Value::String(s) => e.properties.push((Cow::Borrowed(k), Cow::Borrowed(s))),
                            other => errs.push(Violation::new(
                                k,
                                Rule::PropertyType,
                                format!(
                                    "custom property `{}` must be a string, got {}",
                                    truncate(k),
                                    json_kind(other)
                                ),
                            )),
                        },
                    }
                }
                for field in Field::ALL {
                    if field.always_required() && !seen[field as usize] {
                        errs.push(Violation::new(field.name(), Rule::Required, format!("{field} is required")));
                    }
                }
                if errs.is_empty() {
                    Ok(e)
                } else {
                    Err(errs)
                }
            }

            /// Serialises to the JSON the API receives, appending to `out`: the fields in the
            /// order of the seed document, absent optional fields left out, then the custom
            /// properties.
            pub fn write_json(&self, out: &mut Vec<u8>) {
                let start = out.len();
                $(Slot::write(&self.$name, concat!(",\"", stringify!($name), "\":"), out);)*
                // Each field was written after a comma; the first (`client_user_id`, always
                // present) opens the object instead.
                out[start] = b'{';
                for (k, v) in &self.properties {
                    out.push(b',');
                    write_str(out, k);
                    out.push(b':');
                    write_str(out, v);
                }
                out.push(b'}');
            }

            /// The event with every field owned, for keeping it beyond its source.
            pub fn into_owned(self) -> Event<'static> {
                Event {
                    $($name: Slot::into_static(self.$name),)*
                    properties: self
                        .properties
                        .into_iter()
                        .map(|(k, v)| (Cow::Owned(k.into_owned()), Cow::Owned(v.into_owned())))
                        .collect(),
                }
            }

            /// An API field's value as text: a string as it is, `timestamp` in decimal, an amount
            /// as its exact decimal text (`50.00`), `true`/`false`, `win`/`loss`; `None` when the
            /// field is absent.
            pub fn text(&self, field: Field) -> Option<Cow<'_, str>> {
                match field {
                    $(Field::$variant => Slot::text(&self.$name)),*
                }
            }

            /// Where a text field ([`FieldKind::Text`]) is set; `None` for a field of another
            /// kind.
            pub fn text_slot(&mut self, field: Field) -> Option<TextSlot<'_, 'a>> {
                match field {
                    $(Field::$variant => Slot::text_slot(&mut self.$name)),*
                }
            }

            /// Where an amount ([`FieldKind::Decimal`]) is set; `None` for a field of another
            /// kind.
            pub fn decimal_slot(&mut self, field: Field) -> Option<&mut Option<Decimal<'a>>> {
                match field {
                    $(Field::$variant => Slot::decimal_slot(&mut self.$name)),*
                }
            }
        }
    };
}
api_fields!(event_io);

/// A JSON string. Text without a quote, a backslash or a control character (nearly all) is
/// copied as it is; anything else is escaped by `serde_json`.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // A fold without early exit: it compiles to a vector loop.
    let plain = s
        .bytes()
        .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if plain {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string into a Vec cannot fail.
        serde_json::to_writer(&mut *out, s).expect("string serialisation is infallible");
    }
}

fn want_str<'v>(k: &str, val: &'v Value, errs: &mut Vec<Violation>) -> Option<Cow<'v, str>> {
    match val {
        Value::String(s) => Some(Cow::Borrowed(s)),
        other => {
            errs.push(Violation::new(
                k,
                Rule::Type,
                format!("{k} must be a string, got {}", json_kind(other)),
            ));
            None
        }
    }
}

fn want_opt_str<'v>(k: &str, val: &'v Value, errs: &mut Vec<Violation>) -> Option<Cow<'v, str>> {
    if val.is_null() {
        return None;
    }
    want_str(k, val, errs)
}

/// A number of the body as a [`Decimal`]: its text as `serde_json` read it (the sandbox's
/// request parsing; a `serde_json::Number` is always finite).
fn want_opt_num(k: &str, val: &Value, errs: &mut Vec<Violation>) -> Option<Decimal<'static>> {
    match val {
        Value::Null => None,
        Value::Number(n) => Decimal::parse_owned(n.to_string()),
        other => {
            errs.push(Violation::new(
                k,
                Rule::Type,
                format!("{k} must be a number, got {}", json_kind(other)),
            ));
            None
        }
    }
}

/// "a string", "an object", …: the JSON type of a value, for error messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn short_json(v: &Value) -> String {
    truncate(&v.to_string()).to_string()
}

/// Cuts user-supplied text for error messages, on a character boundary.
pub fn truncate(s: &str) -> &str {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A crypto currency code: 2 to 10 upper-case ASCII letters or digits, starting with a letter.
pub fn is_crypto_code(s: &str) -> bool {
    (2..=10).contains(&s.len())
        && s.as_bytes()[0].is_ascii_uppercase()
        && s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: &Value) -> Result<Event<'_>, Vec<Violation>> {
        Event::from_json(v.as_object().unwrap())
    }

    /// The Event schema of docs/openapi.yaml: its property names in order, and its `required`.
    fn openapi_event_schema() -> (Vec<String>, Vec<String>) {
        let doc = include_str!("../docs/openapi.yaml");
        let event = &doc[doc.find("\n    Event:\n").expect("an Event schema")..];
        let required = event
            .lines()
            .find_map(|l| l.trim().strip_prefix("required: ["))
            .expect("the Event schema's required list")
            .trim_end_matches(']')
            .split(", ")
            .map(String::from)
            .collect();
        let props = &event[event.find("      properties:\n").expect("its properties") + 18..];
        let names = props
            .lines()
            .take_while(|l| l.starts_with("        ") || l.trim().is_empty())
            .filter(|l| !l.starts_with("         ") && l.trim_end().len() > 8)
            .map(|l| l.trim().split(':').next().unwrap().to_string())
            .collect();
        (names, required)
    }

    /// Issue 17, kind 5: the table of API fields is the API's list. A field added to the table
    /// but not to the OpenAPI schema (or the other way round), or a change of order or of the
    /// always-required set, fails here.
    #[test]
    fn the_field_table_is_the_openapi_schemas_list() {
        let (names, required) = openapi_event_schema();
        assert_eq!(names, KNOWN_FIELDS);
        let table_required: Vec<&str> = Field::ALL
            .iter()
            .filter(|f| f.always_required())
            .map(|f| f.name())
            .collect();
        assert_eq!(required, table_required);
        for f in Field::ALL {
            assert_eq!(Field::from_name(f.name()), Some(f));
            assert_eq!(f.to_string(), f.name());
        }
        assert_eq!(Field::from_name("amount_usd"), None);
        assert_eq!(Field::ALL.len(), 15);
    }

    /// Every field of the table goes through from_json, write_json, into_owned and text: an event
    /// with all fifteen set reads back equal, its amounts' text as written, each field's text
    /// as the API reads it.
    #[test]
    fn every_field_of_the_table_reads_writes_and_shows_its_value() {
        let body = json!({
            "client_user_id": "p-01", "event_name": "bet", "timestamp": 1767225600,
            "click_id": "c-1", "ip_address": "203.0.113.7", "user_agent": "UA/1", "game_type": "slots",
            "game_provider": "acme", "transaction_id": "t-1", "amount": 50.00, "currency": "EUR",
            "is_crypto": false, "bet_result": "win", "bet_result_amount": 12.5,
            "parent_transaction_id": "b-0", "campaign": "spring"
        });
        let e = parse(&body).unwrap();
        let mut out = Vec::new();
        e.write_json(&mut out);
        // The table's order, which is the seed document's, then the custom property.
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            r#"{"client_user_id":"p-01","event_name":"bet","timestamp":1767225600,"click_id":"c-1","ip_address":"203.0.113.7","user_agent":"UA/1","game_type":"slots","game_provider":"acme","transaction_id":"t-1","amount":50.0,"currency":"EUR","is_crypto":false,"bet_result":"win","bet_result_amount":12.5,"parent_transaction_id":"b-0","campaign":"spring"}"#
        );
        let back: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parse(&back).unwrap(), e.clone().into_owned());
        let texts: Vec<Option<String>> = Field::ALL.iter().map(|f| e.text(*f).map(|t| t.into_owned())).collect();
        let want = [
            "p-01",
            "bet",
            "1767225600",
            "c-1",
            "203.0.113.7",
            "UA/1",
            "slots",
            "acme",
            "t-1",
            "50.0",
            "EUR",
            "false",
            "win",
            "12.5",
            "b-0",
        ];
        assert_eq!(texts, want.map(|s| Some(s.to_string())));
        // Absent optional fields are left out of the body and have no text.
        let bare = json!({"client_user_id": "p-02", "event_name": "login", "timestamp": 1});
        let e = parse(&bare).unwrap();
        let mut out = Vec::new();
        e.write_json(&mut out);
        assert_eq!(out, br#"{"client_user_id":"p-02","event_name":"login","timestamp":1}"#);
        assert_eq!(e.text(Field::Amount), None);
        assert_eq!(e.text(Field::IsCrypto), None);
    }

    /// The table's wrong-type messages name the field, as the hand-written reader did.
    #[test]
    fn wrong_types_are_named_by_the_tables_field() {
        let body = json!({"client_user_id": 7, "event_name": "bet", "timestamp": "soon",
                          "is_crypto": "no", "bet_result": "draw", "amount": "5"});
        let errs = parse(&body).unwrap_err();
        // serde_json's map reads keys in sorted order.
        let got: Vec<(String, &str)> = errs.iter().map(|v| (v.field.clone(), v.rule)).collect();
        assert_eq!(
            got,
            [
                ("amount".to_string(), "type"),
                ("bet_result".to_string(), "bet_result"),
                ("client_user_id".to_string(), "type"),
                ("is_crypto".to_string(), "type"),
                ("timestamp".to_string(), "type"),
            ]
        );
        assert_eq!(errs[4].message, "timestamp must be an integer, got a string");
        assert_eq!(errs[1].message, "bet_result must be \"win\" or \"loss\", got \"draw\"");
        let missing = parse(&json!({"event_name": "x"})).unwrap_err();
        let fields: Vec<&str> = missing.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["client_user_id", "timestamp"]);
    }

    fn rules(v: Value) -> Vec<&'static str> {
        match parse(&v) {
            Ok(e) => e
                .validate(&ContractOptions::default())
                .into_iter()
                .map(|v| v.rule)
                .collect(),
            Err(errs) => errs.into_iter().map(|v| v.rule).collect(),
        }
    }

    fn deposit() -> Value {
        json!({"client_user_id": "user_001", "click_id": "clk_998877", "ip_address": "203.0.113.1",
               "event_name": "deposit", "transaction_id": "tx_554433", "timestamp": 1702963200,
               "amount": 50.00, "currency": "USD"})
    }

    fn with(mut base: Value, k: &str, v: Value) -> Value {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v;
        }
        base
    }

    #[test]
    fn seed_curl_example_is_valid_and_round_trips() {
        let seed = deposit();
        let e = parse(&seed).unwrap();
        assert!(e.validate(&ContractOptions::default()).is_empty());
        let mut json = Vec::new();
        e.write_json(&mut json);
        let back: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, deposit());
    }

    #[test]
    fn each_rule_is_named() {
        assert_eq!(rules(with(deposit(), "client_user_id", Value::Null)), ["required"]);
        assert_eq!(rules(with(deposit(), "client_user_id", json!(""))), ["required"]);
        assert_eq!(rules(with(deposit(), "timestamp", json!("1702963200"))), ["type"]);
        assert_eq!(rules(with(deposit(), "timestamp", json!(-5))), ["timestamp"]);
        assert_eq!(rules(with(deposit(), "amount", Value::Null)), ["financial_fields"]);
        assert_eq!(rules(with(deposit(), "click_id", Value::Null)), ["click_id_ip_address"]);
        assert_eq!(rules(with(deposit(), "ip_address", json!("999.1.1.1"))), ["ip_address"]);
        assert_eq!(rules(with(deposit(), "currency", json!("usd"))), ["currency"]);
        assert_eq!(rules(with(deposit(), "currency", json!("BTC"))), ["currency"]);
        let crypto = with(with(deposit(), "currency", json!("USDT")), "is_crypto", json!(true));
        assert!(rules(crypto).is_empty());
        assert_eq!(rules(with(deposit(), "bet_result", json!("win"))), ["bet_result"]);
        assert_eq!(rules(with(deposit(), "vip", json!(3))), ["property_type"]);
        assert_eq!(
            rules(with(deposit(), "parent_transaction_id", json!("b1"))),
            ["settlement"]
        );
    }

    #[test]
    fn bet_patterns() {
        let bet = json!({"client_user_id": "u", "event_name": "bet", "timestamp": 1702963200, "amount": 5.0,
                         "currency": "EUR", "transaction_id": "b1"});
        assert!(rules(bet.clone()).is_empty());
        let a = with(
            with(bet.clone(), "bet_result", json!("loss")),
            "bet_result_amount",
            json!(-5.0),
        );
        assert!(rules(a.clone()).is_empty());
        assert!(parse(&a).unwrap().carries_bet_result());
        let bad_sign = with(
            with(bet.clone(), "bet_result", json!("win")),
            "bet_result_amount",
            json!(-1.0),
        );
        assert_eq!(rules(bad_sign), ["amount_sign"]);
        let bad_value = with(
            with(bet.clone(), "bet_result", json!("draw")),
            "bet_result_amount",
            json!(0.0),
        );
        assert_eq!(rules(bad_value), ["bet_result"]);
        let win = json!({"client_user_id": "u", "event_name": "win", "timestamp": 1702963200, "amount": 3.0,
                         "currency": "EUR", "transaction_id": "w1", "parent_transaction_id": "b1"});
        assert!(rules(win.clone()).is_empty());
        assert_eq!(
            rules(with(win.clone(), "parent_transaction_id", Value::Null)),
            ["settlement"]
        );
        let loss = with(with(win, "event_name", json!("loss")), "amount", json!(2.0));
        assert_eq!(rules(loss), ["amount_sign"]);
    }

    #[test]
    fn strict_click_ip_applies_everywhere() {
        let bet = json!({"client_user_id": "u", "event_name": "bet", "timestamp": 1, "amount": 5.0,
                         "currency": "EUR", "transaction_id": "b1"});
        let bet = parse(&bet).unwrap();
        let strict = ContractOptions {
            strict_click_ip: true,
            ..Default::default()
        };
        let got: Vec<_> = bet.validate(&strict).into_iter().map(|v| v.field).collect();
        assert_eq!(got, ["click_id", "ip_address"]);
    }

    #[test]
    fn amounts_are_written_as_their_exact_text() {
        for text in [
            "50.00",
            "9007199254740993",
            "-0.000000000000000000000000000001",
            "1E+3",
            "0",
        ] {
            let seed = deposit();
            let mut e = parse(&seed).unwrap();
            e.amount = Decimal::parse(text);
            let mut out = Vec::new();
            e.write_json(&mut out);
            let out = String::from_utf8(out).unwrap();
            assert!(out.contains(&format!(",\"amount\":{text},")), "{out}");
        }
    }

    #[test]
    fn sign_rules_are_exact() {
        // A loss of 1e-400 is a positive amount: a binary64 would read it as 0 and let it pass.
        let loss = json!({"client_user_id": "u", "event_name": "loss", "timestamp": 1702963200,
                          "currency": "EUR", "transaction_id": "l1", "parent_transaction_id": "b1"});
        let mut e = parse(&loss).unwrap();
        e.amount = Decimal::parse("1e-400");
        let rules: Vec<_> = e
            .validate(&ContractOptions::default())
            .into_iter()
            .map(|v| v.rule)
            .collect();
        assert_eq!(rules, ["amount_sign"]);
        e.amount = Decimal::parse("-0.00");
        assert!(e.validate(&ContractOptions::default()).is_empty());
    }

    #[test]
    fn timestamp_unit_heuristic() {
        assert!(TimestampUnit::Seconds.looks_like_other_unit(1_702_963_200_000));
        assert!(!TimestampUnit::Seconds.looks_like_other_unit(1_702_963_200));
        assert!(TimestampUnit::Milliseconds.looks_like_other_unit(1_702_963_200));
    }
}
