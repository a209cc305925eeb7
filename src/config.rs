//! Configuration: a TOML file merged with `DATAPULSE_BRIDGE_*` environment variables (`__` nests),
//! loaded with figment, validated at start-up, and printable with secrets redacted.
//!
//! Each section's type lives with the module that uses it (batching in `batch`, delivery in
//! `deliver`, …); this module composes them, loads them and reports errors with the key path and
//! the file or variable the value came from.

use crate::deliver::ApiConfig;
use crate::settings::{Invalid, Problem, Scrubber};
use crate::source::is_secret_property;
use crate::source::KafkaConfig;
use figment::error::Kind;
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "DATAPULSE_BRIDGE_";
/// The config file used when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "datapulse-bridge.toml";

/// The whole configuration of `datapulse-bridge run`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub api: ApiConfig,
    #[serde(default)]
    pub batch: crate::batch::BatchConfig,
    #[serde(default)]
    pub delivery: crate::deliver::DeliveryConfig,
    #[serde(default)]
    pub dedupe: crate::dedupe::DedupeConfig,
    #[serde(default)]
    pub dead_letter: crate::dlq::DeadLetterConfig,
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Field mappings, chosen per topic; see `docs/mapping.md`.
    #[serde(default)]
    pub mapping: Vec<crate::mapping::MappingConfig>,
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT: how long in-flight work may take to finish before it is abandoned
    /// (abandoned work is not committed and will be read again).
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
}

fn default_deadline() -> Duration {
    Duration::from_secs(30)
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            deadline: default_deadline(),
        }
    }
}

/// One problem of a configuration, naming where the value came from ("in FILE", "from
/// environment variable X", "(not set)").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    /// A key's value is missing, of the wrong type or invalid.
    #[error("key `{key}` {origin}: {problem}")]
    Key {
        key: String,
        origin: String,
        problem: Problem,
    },
    /// A `[[mapping]]` does not compile; `problem` names the mapping and the field.
    #[error("key `mapping` {origin}: {problem}")]
    Mapping {
        problem: crate::mapping::MappingProblem,
        origin: String,
    },
}

/// A configuration that cannot be used; rendered as "invalid configuration:" and one line per
/// problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `--config` names a file that does not exist.
    #[error("invalid configuration:\n  - config file {} does not exist\n", path.display())]
    MissingFile { path: PathBuf },
    /// Every problem found, each naming the key and where its value came from.
    #[error("invalid configuration:\n{}", problems.iter().map(|p| format!("  - {p}\n")).collect::<String>())]
    Invalid { problems: Vec<ConfigProblem> },
}

impl ConfigError {
    /// The problems found (none for a missing file).
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            ConfigError::MissingFile { .. } => &[],
            ConfigError::Invalid { problems } => problems,
        }
    }
}

/// Where a configuration was loaded from, to name the origin of a key in errors.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    figment: Figment,
}

impl Loaded {
    /// "in FILE" or "from environment variable X" for a key path such as `kafka.topics`.
    pub fn origin(&self, key: &str) -> String {
        origin(&self.figment, key)
    }
}

fn origin(figment: &Figment, key: &str) -> String {
    // A key under a table whose own keys hold dots (`kafka.properties.sasl.password`) is found
    // by the nearest enclosing key figment knows.
    let mut k = key;
    loop {
        if let Some(md) = figment.find_metadata(k) {
            return source_of(md);
        }
        match k.rsplit_once('.') {
            Some((parent, _)) => k = parent,
            None => return "(not set)".to_string(),
        }
    }
}

/// "in FILE" or "from environment variable X": where a value came from.
fn source_of(md: &figment::Metadata) -> String {
    match &md.source {
        Some(figment::Source::File(p)) => format!("in {}", p.display()),
        Some(other) => format!("from {} ({other})", md.name),
        None => format!("from {}", md.name),
    }
}

/// The floats of a TOML text that TOML's reading changes, each as a problem of its key (dotted,
/// array items by index: `mapping.0.amount.default`). TOML reads a number with a fraction or an
/// exponent as a binary64, so `9007199254740993.0`, `0.1000000000000000000001` and `1e-400`
/// would reach the bridge as other numbers (issue 16: no value changes on the way); `12.50`
/// is the value `12.5` and passes. The text's own spelling comes from `toml_edit`. A text that
/// does not parse gives none (figment reports the syntax error).
fn inexact_floats(text: &str, origin: &str) -> Vec<ConfigProblem> {
    use toml_edit::{Item, Value};
    type Found = Vec<(String, String, String)>;
    fn value(v: &Value, key: String, out: &mut Found) {
        match v {
            Value::Float(f) => {
                let Some(written) = f.as_repr().and_then(|r| r.as_raw().as_str()) else {
                    return;
                };
                let written = written.replace('_', "");
                // Rust's `Debug` of a binary64 is the shortest text that reads back as it.
                let read = format!("{:?}", f.value());
                let number =
                    |t: &str| crate::decimal::Decimal::parse(t.strip_prefix('+').unwrap_or(t)).map(|d| d.value_key());
                if number(&written).is_none() || number(&written) != number(&read) {
                    out.push((key, written, read));
                }
            }
            Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    value(v, format!("{key}.{i}"), out);
                }
            }
            Value::InlineTable(t) => {
                for (k, v) in t.iter() {
                    value(v, format!("{key}.{k}"), out);
                }
            }
            _ => {}
        }
    }
    fn item(i: &Item, key: String, out: &mut Found) {
        let join = |k: &str| {
            if key.is_empty() {
                k.to_string()
            } else {
                format!("{key}.{k}")
            }
        };
        match i {
            Item::Value(v) => value(v, key, out),
            Item::Table(t) => {
                for (k, i) in t.iter() {
                    item(i, join(k), out);
                }
            }
            Item::ArrayOfTables(a) => {
                for (n, t) in a.iter().enumerate() {
                    for (k, i) in t.iter() {
                        item(i, format!("{}.{k}", join(&n.to_string())), out);
                    }
                }
            }
            Item::None => {}
        }
    }
    let Ok(doc) = text.parse::<toml_edit::DocumentMut>() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    item(doc.as_item(), String::new(), &mut found);
    found
        .into_iter()
        .map(|(key, written, read)| ConfigProblem::Key {
            key,
            origin: origin.to_string(),
            problem: Problem::InexactNumber { written, read },
        })
        .collect()
}

/// The figment of a file (which must exist when `explicit`) and the environment.
pub fn figment(path: &Path, explicit: bool) -> Result<Figment, ConfigError> {
    figment_with(path, explicit, RawEnv::from_process())
}

fn figment_with(path: &Path, explicit: bool, env: RawEnv) -> Result<Figment, ConfigError> {
    if explicit && !path.exists() {
        return Err(ConfigError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    Ok(Figment::new().merge(Toml::file_exact(path)).merge(env))
}

/// Loads and validates the configuration. `explicit` says `--config` was given (then the file must
/// exist); otherwise a missing default file is allowed and the environment may supply everything.
pub fn load(path: &Path, explicit: bool) -> Result<Loaded, ConfigError> {
    load_with(path, explicit, RawEnv::from_process())
}

fn load_with(path: &Path, explicit: bool, env: RawEnv) -> Result<Loaded, ConfigError> {
    let figment = figment_with(path, explicit, env)?;
    // Lossy: a number or boolean key takes the environment's text ("50", "true"); every other key
    // keeps it verbatim (see `RawEnv`).
    let config: Config = figment.extract_lossy().map_err(|e| {
        let unknown_origin = || match path.exists() {
            false => format!("(no config file: {} does not exist)", path.display()),
            true => format!("in {}", path.display()),
        };
        extract_error(e, unknown_origin)
    })?;
    let mut loaded = Loaded { config, figment };
    let mut problems = match std::fs::read_to_string(path) {
        Ok(text) => inexact_floats(&text, &format!("in {}", path.display())),
        Err(_) => Vec::new(),
    };
    problems.extend(loaded.config.validate(&|k| loaded.origin(k)));
    if problems.is_empty() {
        loaded.config.resolve();
        Ok(loaded)
    } else {
        Err(ConfigError::Invalid { problems })
    }
}

/// figment's extraction errors as problems; `unknown_origin` names the origin of a value figment
/// has no metadata for.
fn extract_error(e: figment::Error, unknown_origin: impl Fn() -> String) -> ConfigError {
    let problems = e
        .into_iter()
        .map(|e| ConfigProblem::Key {
            key: if e.path.is_empty() {
                "(top level)".to_string()
            } else {
                e.path.join(".")
            },
            origin: e.metadata.as_ref().map_or_else(&unknown_origin, source_of),
            problem: match &e.kind {
                Kind::UnknownField(..) => Problem::UnknownKey(e.kind.to_string()),
                Kind::MissingField(..) => Problem::Missing(e.kind.to_string()),
                // figment quotes the value it found, which may be a secret (a password under the
                // wrong key, an environment variable's text): only its kind is said.
                Kind::InvalidType(found, expected) => {
                    Problem::WrongType(format!("invalid type: found {}, expected {expected}", kind_of(found)))
                }
                Kind::InvalidValue(found, expected) => {
                    Problem::WrongType(format!("invalid value: found {}, expected {expected}", kind_of(found)))
                }
                _ => Problem::WrongType(e.kind.to_string()),
            },
        })
        .collect();
    ConfigError::Invalid { problems }
}

/// The shortest value of `kafka.properties_file` scrubbed when its property's name does not say
/// it is a secret: shorter ones (`PLAIN`, `1`, `true`) would garble every log line they occur in.
const MIN_FILE_SECRET: usize = 8;

/// What kind of value figment found, without the value.
fn kind_of(found: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match found {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a number",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit | Actual::Option => "no value",
        Actual::Seq => "a list",
        Actual::Map => "a table",
        _ => "another kind of value",
    }
}

/// figment's environment provider with every value kept as the text the environment holds.
/// figment's own `Env` parses values (`1.50` became the number 1.5, `0012` became 12, a value
/// starting with `[` or `{` a list or a map), which changes secrets and names on the way. Numbers
/// and booleans still load (`load` extracts lossily); list-valued keys parse their text
/// (`settings::list_or_text`).
struct RawEnv {
    /// Key paths (`kafka.group_id`) and their values.
    vars: Vec<(String, String)>,
}

impl RawEnv {
    /// The process's `DATAPULSE_BRIDGE_*` variables, keys mapped as figment's `Env` maps them
    /// (prefix stripped, lowercased, `__` nests).
    fn from_process() -> RawEnv {
        let env = Env::prefixed(ENV_PREFIX).split("__");
        RawEnv {
            vars: env.iter().map(|(k, v)| (k.as_str().to_string(), v)).collect(),
        }
    }

    /// Given variables (tests), mapped by the same rule.
    #[cfg(test)]
    fn from_vars<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> RawEnv {
        RawEnv {
            vars: vars
                .into_iter()
                .filter_map(|(k, v)| {
                    let rest = k.strip_prefix(ENV_PREFIX)?;
                    Some((rest.to_ascii_lowercase().replace("__", "."), v.to_string()))
                })
                .collect(),
        }
    }
}

impl figment::Provider for RawEnv {
    fn metadata(&self) -> figment::Metadata {
        Env::prefixed(ENV_PREFIX).split("__").metadata()
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        use figment::value::{Dict, Value};
        let mut root = Dict::new();
        for (key, value) in &self.vars {
            // `kafka.properties.sasl.mechanism` after the split: a dictionary per segment but the
            // last. A key that runs into a value (`a=1` and `a.b=2`) keeps the later one.
            let segments: Vec<&str> = key.split('.').filter(|s| !s.is_empty()).collect();
            let Some((last, parents)) = segments.split_last() else {
                continue;
            };
            let mut dict = &mut root;
            for p in parents {
                let entry = dict.entry(p.to_string()).or_insert_with(|| Value::from(Dict::new()));
                if entry.as_dict().is_none() {
                    *entry = Value::from(Dict::new());
                }
                dict = match entry {
                    Value::Dict(_, d) => d,
                    _ => unreachable!("made a dictionary above"),
                };
            }
            dict.insert(last.to_string(), Value::from(value.clone()));
        }
        Ok(figment::Profile::Default.collect(root))
    }
}

/// Loads a configuration from TOML text (the demo and tests build theirs in code).
pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
    let figment = Figment::from(Toml::string(text));
    let mut config: Config = figment
        .extract()
        .map_err(|e| extract_error(e, || "in the configuration text".to_string()))?;
    let mut problems = inexact_floats(text, "in the configuration text");
    problems.extend(config.validate(&|k| origin(&figment, k)));
    if problems.is_empty() {
        config.resolve();
        Ok(config)
    } else {
        Err(ConfigError::Invalid { problems })
    }
}

/// `dedupe.redis.in_doubt` is the former name of `delivery.on_ambiguous`.
impl From<crate::deliver::OnAmbiguous> for crate::dedupe::InDoubt {
    fn from(on: crate::deliver::OnAmbiguous) -> Self {
        match on {
            crate::deliver::OnAmbiguous::InDoubt => crate::dedupe::InDoubt::DeadLetter,
            crate::deliver::OnAmbiguous::Resend => crate::dedupe::InDoubt::Resend,
        }
    }
}

impl From<crate::dedupe::InDoubt> for crate::deliver::OnAmbiguous {
    fn from(d: crate::dedupe::InDoubt) -> Self {
        match d {
            crate::dedupe::InDoubt::DeadLetter => crate::deliver::OnAmbiguous::InDoubt,
            crate::dedupe::InDoubt::Resend => crate::deliver::OnAmbiguous::Resend,
        }
    }
}

impl Config {
    /// Every secret value this configuration holds, for scrubbing text from elsewhere: the API key
    /// (from `api.key` or `api.key_file`), the Redis passwords (in `dedupe.redis.password` or a
    /// URL), librdkafka's sensitive properties and every value of `kafka.properties_file`.
    pub fn scrubber(&self) -> Scrubber {
        let mut secrets: Vec<String> = Vec::new();
        if let Ok(k) = self.api.read_key() {
            secrets.push(k.expose().to_string());
        }
        if let Some(p) = &self.dedupe.redis.password {
            secrets.push(p.expose().to_string());
        }
        for url in [
            Some(self.dedupe.redis.url.as_str()),
            self.delivery.redis_url.as_ref().map(|u| u.expose()),
            Some(self.api.base_url.as_str()),
        ]
        .into_iter()
        .flatten()
        {
            secrets.extend(url_password(url));
        }
        for (k, v) in self.kafka.properties.iter() {
            if is_secret_property(k) {
                secrets.push(v);
            }
        }
        // Every value of the file that holds a secret by its name, and every other value long
        // enough not to garble the log when removed (`PLAIN`, `1` stay).
        for (k, v) in self.kafka.properties_file_entries() {
            if is_secret_property(&k) || v.len() >= MIN_FILE_SECRET {
                secrets.push(v);
            }
        }
        Scrubber::new(secrets)
    }

    /// Checks what types alone cannot say, in every section. `origin` names where a key came
    /// from.
    pub fn validate(&self, origin: &dyn Fn(&str) -> String) -> Vec<ConfigProblem> {
        let mut invalid = self.kafka.validate();
        invalid.extend(self.api.validate());
        invalid.extend(self.batch.validate());
        invalid.extend(self.delivery.validate());
        invalid.extend(self.dedupe.validate());
        invalid.extend(self.dead_letter.validate());
        invalid.extend(self.telemetry.validate());
        if let (Some(alias), Some(on)) = (self.dedupe.redis.in_doubt, self.delivery.on_ambiguous) {
            if crate::dedupe::InDoubt::from(on) != alias {
                invalid.push(Invalid::new(
                    "dedupe.redis.in_doubt",
                    "is the former name of `delivery.on_ambiguous`, which says otherwise: remove it",
                ));
            }
        }
        let mut problems: Vec<ConfigProblem> = invalid
            .into_iter()
            .map(|Invalid { key, problem }| ConfigProblem::Key {
                origin: origin(&key),
                key,
                problem,
            })
            .collect();
        if let Err(e) = crate::mapping::Mapper::compile(&self.mapping, &self.api.contract()) {
            problems.extend(e.problems().iter().map(|m| ConfigProblem::Mapping {
                problem: m.clone(),
                origin: origin("mapping"),
            }));
        }
        problems
    }

    /// Settles aliases: `delivery.on_ambiguous` from its former name `dedupe.redis.in_doubt`
    /// when only that is set (else its default), and the alias from it, so that every path (a
    /// request answered ambiguously, ids in flight in a killed process) follows one value.
    pub fn resolve(&mut self) {
        let on = self
            .delivery
            .on_ambiguous
            .or(self.dedupe.redis.in_doubt.map(Into::into))
            .unwrap_or_default();
        self.delivery.on_ambiguous = Some(on);
        self.dedupe.redis.in_doubt = Some(on.into());
    }

    /// The resolved configuration as TOML with every secret redacted (for `check`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print configuration: {e}\n"))
    }
}

/// The password of a `redis://user:password@host` URL, if it has one: as written
/// (percent-encoded) and decoded, since either may be printed.
fn url_password(url: &str) -> Vec<String> {
    let Some(password) = url::Url::parse(url).ok().and_then(|u| u.password().map(str::to_string)) else {
        return Vec::new();
    };
    let decoded = percent_encoding::percent_decode_str(&password)
        .decode_utf8_lossy()
        .into_owned();
    vec![password, decoded]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Secret, REDACTED};
    use std::io::Write;

    fn write(toml: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(toml.as_bytes()).unwrap();
        f
    }

    const MINIMAL: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:9092"
group_id = "g"
topics = ["t"]
[kafka.properties]
"sasl.password" = "hunter2"
"fetch.wait.max.ms" = 50
[api]
base_url = "http://127.0.0.1:8080"
key = "dp_test_key_123"
"#;

    /// Issue 16: a float TOML reads as another number is refused naming its key; one it reads
    /// as the same value (`12.50` is 12.5, `-0.0`, `1_000.5`) passes.
    #[test]
    fn floats_toml_would_change_are_refused_by_key() {
        let mapping = r#"
[[mapping]]
topics = ["t"]
client_user_id = "/u"
event_name = { const = "custom" }
timestamp = { const = 1702963200 }
game_type = { from = "/g", default = 9007199254740993.0 }
is_crypto = { from = "/c", in = [1.0000000000000001, 1.5, 12.50, -0.0, 1_000.5] }
game_provider = { from = "/p", default = 1e-400 }
"#;
        let e = from_toml_str(&format!("{MINIMAL}{mapping}")).unwrap_err();
        let found: Vec<(&str, &Problem)> = e
            .problems()
            .iter()
            .filter_map(|p| match p {
                ConfigProblem::Key { key, problem, .. } => Some((key.as_str(), problem)),
                ConfigProblem::Mapping { .. } => None,
            })
            .collect();
        let inexact = |written: &str, read: &str| Problem::InexactNumber {
            written: written.into(),
            read: read.into(),
        };
        assert_eq!(
            found,
            [
                (
                    "mapping.0.game_type.default",
                    &inexact("9007199254740993.0", "9007199254740992.0")
                ),
                ("mapping.0.is_crypto.in.0", &inexact("1.0000000000000001", "1.0")),
                ("mapping.0.game_provider.default", &inexact("1e-400", "0.0")),
            ]
        );
        assert!(from_toml_str(&format!(
            "{MINIMAL}{}",
            mapping
                .replace("9007199254740993.0", "\"9007199254740993\"")
                .replace("1.0000000000000001, ", "")
                .replace("1e-400", "0.5")
        ))
        .is_ok());
    }

    /// `delivery.on_ambiguous` governs every path; `dedupe.redis.in_doubt`, its former name, still
    /// sets it, and the two must agree when both are set.
    #[test]
    fn on_ambiguous_and_its_former_name() {
        use crate::dedupe::InDoubt;
        use crate::deliver::OnAmbiguous;
        let with = |extra: &str| load(write(&format!("{MINIMAL}{extra}")).path(), true);
        let c = with("").unwrap().config;
        assert_eq!(c.delivery.on_ambiguous, Some(OnAmbiguous::InDoubt));
        assert_eq!(c.dedupe.redis.in_doubt, Some(InDoubt::DeadLetter));
        let c = with("[dedupe.redis]\nin_doubt = \"resend\"\n").unwrap().config;
        assert_eq!(c.delivery.on_ambiguous, Some(OnAmbiguous::Resend));
        assert_eq!(c.dedupe.redis.in_doubt, Some(InDoubt::Resend));
        let c = with("[delivery]\non_ambiguous = \"resend\"\n").unwrap().config;
        assert_eq!(c.dedupe.redis.in_doubt, Some(InDoubt::Resend));
        let c = with("[delivery]\non_ambiguous = \"in-doubt\"\n[dedupe.redis]\nin_doubt = \"dead-letter\"\n").unwrap();
        assert_eq!(c.config.delivery.on_ambiguous, Some(OnAmbiguous::InDoubt));
        let Err(ConfigError::Invalid { problems }) =
            with("[delivery]\non_ambiguous = \"resend\"\n[dedupe.redis]\nin_doubt = \"dead-letter\"\n")
        else {
            panic!("conflicting settings must fail at start");
        };
        assert!(
            problems
                .iter()
                .any(|p| matches!(p, ConfigProblem::Key { key, origin, .. } if key == "dedupe.redis.in_doubt" && origin.starts_with("in "))),
            "{problems:?}"
        );
        assert!(with("[delivery]\non_ambiguous = \"maybe\"\n").is_err());
    }

    #[test]
    fn minimal_loads_and_redacts() {
        let f = write(MINIMAL);
        let loaded = load(f.path(), true).unwrap();
        let printed = loaded.config.to_redacted_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("dp_test_key_123"), "{printed}");
        assert!(printed.contains(REDACTED));
        assert!(!format!("{:?}", loaded.config).contains("hunter2"));
        assert_eq!(loaded.config.batch.max_events, 500);
    }

    #[test]
    fn properties_file_applies_and_is_never_printed() {
        let secrets = write("# from a Secret\nsasl.username = bridge\nsasl.password=s3cr3t-from-file\n");
        let f = write(&MINIMAL.replace(
            "[kafka.properties]",
            &format!("properties_file = {:?}\n[kafka.properties]", secrets.path()),
        ));
        let loaded = load(f.path(), true).unwrap();
        let props = loaded.config.kafka.client_properties().unwrap();
        assert!(props.contains(&("sasl.password".into(), "s3cr3t-from-file".into())));
        assert!(!loaded.config.to_redacted_toml().contains("s3cr3t-from-file"));
        let bad = write("group.id = other\n");
        let f = write(&MINIMAL.replace(
            "[kafka.properties]",
            &format!("properties_file = {:?}\n[kafka.properties]", bad.path()),
        ));
        let e = load(f.path(), true).unwrap_err();
        assert!(
            keyed(&e).any(|(key, _, problem)| key == "kafka.properties_file"
                && *problem
                    == Problem::Reserved {
                        property: "group.id".into()
                    }),
            "{e}"
        );
    }

    /// The `Key` problems of a configuration error: key, origin, problem.
    fn keyed(e: &ConfigError) -> impl Iterator<Item = (&str, &str, &Problem)> {
        e.problems().iter().filter_map(|p| match p {
            ConfigProblem::Key { key, origin, problem } => Some((key.as_str(), origin.as_str(), problem)),
            ConfigProblem::Mapping { .. } => None,
        })
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let f = write(&format!("{MINIMAL}\n[batch]\nmax_event = 3\n"));
        let e = load(f.path(), true).unwrap_err();
        let in_file = format!("in {}", f.path().display());
        assert!(
            keyed(&e).any(|(key, origin, problem)| key == "batch.max_event"
                && origin == in_file
                && matches!(problem, Problem::UnknownKey(_))),
            "{e}"
        );
    }

    /// Issue 17: a mapping's `timestamp_window` with an unknown key, or an end that cannot be
    /// read, stops start-up naming the key and the file.
    #[test]
    fn timestamp_window_problems_name_key_and_file() {
        let mapping = |window: &str| {
            format!(
                "{MINIMAL}\n[[mapping]]\ntopics = [\"t\"]\nclient_user_id = \"/u\"\nevent_name = \"/e\"\n\
                 timestamp = \"/ts\"\ntimestamp_window = {window}\n"
            )
        };
        let f = write(&mapping(r#"{ earliest = "2000-01-01", end = "now" }"#));
        let e = load(f.path(), true).unwrap_err();
        let in_file = format!("in {}", f.path().display());
        assert!(
            keyed(&e).any(|(key, origin, problem)| key == "mapping.0.timestamp_window.end"
                && origin == in_file
                && matches!(problem, Problem::UnknownKey(_))),
            "{e}"
        );
        let f = write(&mapping(r#"{ latest = "tomorrow" }"#));
        let e = load(f.path(), true).unwrap_err();
        let in_file = format!("in {}", f.path().display());
        let text = e.to_string();
        assert!(
            text.contains(&format!("key `mapping` {in_file}: mapping[0] (topics t): option `timestamp_window.latest`: `tomorrow` is not a date")),
            "{text}"
        );
        assert!(load(
            write(&mapping(r#"{ earliest = "1990-01-01", latest = "now + 2d" }"#)).path(),
            true
        )
        .is_ok());
    }

    #[test]
    fn bad_value_names_key() {
        let f = write(&MINIMAL.replace("group_id = \"g\"", "group_id = 5"));
        let e = load(f.path(), true).unwrap_err();
        assert!(keyed(&e).any(|(key, _, _)| key == "kafka.group_id"), "{e}");
    }

    #[test]
    fn missing_required_and_conflicts() {
        let f = write(
            &MINIMAL
                .replace("topics = [\"t\"]", "")
                .replace("key = \"dp_test_key_123\"", ""),
        );
        let e = load(f.path(), true).unwrap_err();
        let keys: Vec<&str> = keyed(&e).map(|(key, _, _)| key).collect();
        assert!(keys.contains(&"kafka.topics") && keys.contains(&"api.key"), "{e}");
        let missing = load(Path::new("/nonexistent/x.toml"), true).unwrap_err();
        assert_eq!(
            missing,
            ConfigError::MissingFile {
                path: "/nonexistent/x.toml".into()
            }
        );
    }

    #[test]
    fn environment_values_arrive_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[kafka]\nbootstrap_servers = \"b:9092\"\n[api]\nbase_url = \"http://x\"\n",
        )
        .unwrap();
        let env = RawEnv::from_vars([
            ("DATAPULSE_BRIDGE_API__KEY", "1.50"),
            ("DATAPULSE_BRIDGE_KAFKA__GROUP_ID", "0012"),
            ("DATAPULSE_BRIDGE_KAFKA__TOPICS", "[bets, wins]"),
            ("DATAPULSE_BRIDGE_DEDUPE__REDIS__PASSWORD", "{not-a-map"),
            ("DATAPULSE_BRIDGE_DEDUPE__KEY", "transaction_id"),
            ("DATAPULSE_BRIDGE_BATCH__MAX_EVENTS", "50"),
            ("DATAPULSE_BRIDGE_KAFKA__COMMIT_ON_DELIVERY", "false"),
            (
                "DATAPULSE_BRIDGE_DEDUPE__KEYS_BY_EVENT__REGISTER",
                "[client_user_id, event_name]",
            ),
            ("OTHER_PREFIX_API__KEY", "ignored"),
        ]);
        let c = load_with(&path, true, env).unwrap().config;
        assert_eq!(c.api.key.as_ref().map(Secret::expose), Some("1.50"));
        assert_eq!(c.kafka.group_id, "0012");
        assert_eq!(c.kafka.topics, ["bets", "wins"]);
        assert_eq!(c.dedupe.redis.password.as_ref().map(Secret::expose), Some("{not-a-map"));
        assert_eq!(c.dedupe.key, ["transaction_id"]);
        assert_eq!(c.batch.max_events, 50);
        assert!(!c.kafka.commit_on_delivery);
        assert_eq!(c.dedupe.keys_by_event["register"], ["client_user_id", "event_name"]);
        // What the environment gives is scrubbed as given.
        assert_eq!(
            c.scrubber().scrub("key 1.50 pw {not-a-map"),
            "key <redacted> pw <redacted>"
        );
        // And its origin is named.
        let bad = RawEnv::from_vars([("DATAPULSE_BRIDGE_BATCH__MAX_EVENTS", "many")]);
        let e = load_with(&path, true, bad).unwrap_err();
        assert!(
            matches!(e.problems(), [ConfigProblem::Key { key, origin, problem: Problem::WrongType(_) }]
                if key == "batch.max_events" && origin.contains("DATAPULSE_BRIDGE_")),
            "{e}"
        );
    }

    #[test]
    fn the_scrubber_holds_every_configured_secret() {
        let dir = tempfile::tempdir().unwrap();
        let props = dir.path().join("p.properties");
        std::fs::write(&props, "sasl.username=file-user-1\n").unwrap();
        let text = MINIMAL.replace(
            "[kafka.properties]",
            &format!("properties_file = {props:?}\n[kafka.properties]\n\"sasl.oauthbearer.config\" = \"clientSecret=oidc-9\""),
        ) + "[delivery]\nrate_mode = \"redis\"\nredis_url = \"redis://:budget%40pw@127.0.0.1:6379/0\"\n";
        let c = from_toml_str(&text).unwrap();
        let scrubbed = c
            .scrubber()
            .scrub("hunter2 dp_test_key_123 file-user-1 clientSecret=oidc-9 budget%40pw budget@pw 50");
        assert_eq!(
            scrubbed,
            "<redacted> <redacted> <redacted> <redacted> <redacted> <redacted> 50"
        );
        assert!(
            c.to_redacted_toml()
                .contains("\"sasl.oauthbearer.config\" = \"<redacted>\""),
            "{}",
            c.to_redacted_toml()
        );
    }
}
