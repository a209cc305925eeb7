//! Configuration: a TOML file merged with `DATAPULSE_BRIDGE_*` environment variables (`__` nests),
//! loaded with figment, validated at start-up, and printable with secrets redacted.
//!
//! Each section's type lives with the module that uses it (batching in `batch`, delivery in
//! `deliver`, …); this module composes them, loads them and reports errors with the key path and
//! the file or variable the value came from.

use crate::deliver::ApiConfig;
use crate::source::{KafkaConfig, RESERVED_PROPERTIES};
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
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

/// A configuration error: every problem found, each naming the key and where its value came from.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

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
    figment
        .find_metadata(key)
        .map_or_else(|| "(not set)".to_string(), source_of)
}

/// "in FILE" or "from environment variable X": where a value came from.
fn source_of(md: &figment::Metadata) -> String {
    match &md.source {
        Some(figment::Source::File(p)) => format!("in {}", p.display()),
        Some(other) => format!("from {} ({other})", md.name),
        None => format!("from {}", md.name),
    }
}

/// The figment of a file (which must exist when `explicit`) and the environment.
pub fn figment(path: &Path, explicit: bool) -> Result<Figment, ConfigError> {
    if explicit && !path.exists() {
        return Err(ConfigError(vec![format!(
            "config file {} does not exist",
            path.display()
        )]));
    }
    Ok(Figment::new()
        .merge(Toml::file_exact(path))
        .merge(Env::prefixed(ENV_PREFIX).split("__")))
}

/// Loads and validates the configuration. `explicit` says `--config` was given (then the file must
/// exist); otherwise a missing default file is allowed and the environment may supply everything.
pub fn load(path: &Path, explicit: bool) -> Result<Loaded, ConfigError> {
    let figment = figment(path, explicit)?;
    let config: Config = figment.extract().map_err(|e| {
        ConfigError(
            e.into_iter()
                .map(|e| {
                    let key = if e.path.is_empty() {
                        "(top level)".to_string()
                    } else {
                        e.path.join(".")
                    };
                    let src = match &e.metadata {
                        Some(md) => source_of(md),
                        None if !path.exists() => format!("(no config file: {} does not exist)", path.display()),
                        None => format!("in {}", path.display()),
                    };
                    format!("key `{key}` {src}: {}", e.kind)
                })
                .collect(),
        )
    })?;
    let loaded = Loaded { config, figment };
    let errors = loaded.config.validate(&|k| loaded.origin(k));
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigError(errors))
    }
}

/// Loads a configuration from TOML text (the demo and tests build theirs in code).
pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
    let figment = Figment::from(Toml::string(text));
    let config: Config = figment
        .extract()
        .map_err(|e| ConfigError(e.into_iter().map(|e| e.to_string()).collect()))?;
    let errors = config.validate(&|k| origin(&figment, k));
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError(errors))
    }
}

impl Config {
    /// Checks what types alone cannot say. `origin` names where a key came from.
    pub fn validate(&self, origin: &dyn Fn(&str) -> String) -> Vec<String> {
        let mut errs = Vec::new();
        let mut err = |key: &str, msg: String| errs.push(format!("key `{key}` {}: {msg}", origin(key)));
        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty() {
            err("kafka.bootstrap_servers", "must not be empty".into());
        }
        if k.group_id.trim().is_empty() {
            err("kafka.group_id", "must not be empty".into());
        }
        match (k.topics.is_empty(), &k.topic_pattern) {
            (true, None) => err(
                "kafka.topics",
                "set `kafka.topics` (a list) or `kafka.topic_pattern` (a regular expression)".into(),
            ),
            (false, Some(_)) => err(
                "kafka.topic_pattern",
                "set either `kafka.topics` or `kafka.topic_pattern`, not both".into(),
            ),
            (true, Some(p)) => {
                if let Err(e) = regex::Regex::new(p) {
                    err("kafka.topic_pattern", format!("not a valid regular expression: {e}"));
                }
            }
            (false, None) => {}
        }
        if k.max_in_flight_records == 0 {
            err("kafka.max_in_flight_records", "must be at least 1".into());
        }
        match k.client_properties() {
            Err(e) => err("kafka.properties_file", e),
            Ok(props) => {
                for (key, _) in props
                    .iter()
                    .filter(|(key, _)| RESERVED_PROPERTIES.contains(&key.as_str()))
                {
                    err(
                        "kafka.properties_file",
                        format!("sets `{key}`, which is managed by the bridge; remove it"),
                    );
                }
            }
        }
        for reserved in RESERVED_PROPERTIES.iter().copied() {
            if k.properties.contains_key(reserved) {
                err(
                    &format!("kafka.properties.{reserved}"),
                    "is managed by the bridge (commits happen only after delivery); remove it".into(),
                );
            }
        }
        match reqwest::Url::parse(&self.api.base_url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            Ok(u) => err("api.base_url", format!("scheme `{}` is not http or https", u.scheme())),
            Err(e) => err("api.base_url", format!("not a URL: {e}")),
        }
        match (&self.api.key, &self.api.key_file) {
            (None, None) => err("api.key", "set `api.key_file` (recommended) or `api.key`".into()),
            (Some(_), Some(_)) => err(
                "api.key_file",
                "set either `api.key` or `api.key_file`, not both".into(),
            ),
            (None, Some(p)) if !p.is_file() => err("api.key_file", format!("{} is not a readable file", p.display())),
            _ => {}
        }
        if self.api.request_timeout.is_zero() {
            err("api.request_timeout", "must be greater than zero".into());
        }
        errs.extend(self.batch.validate(origin));
        errs.extend(self.delivery.validate(origin));
        errs.extend(self.dedupe.validate(origin));
        errs.extend(self.dead_letter.validate(origin));
        errs.extend(self.telemetry.validate(origin));
        if let Err(e) = crate::mapping::Mapper::compile(&self.mapping, &self.api.contract()) {
            errs.extend(e.0.into_iter().map(|m| format!("{m} {}", origin("mapping"))));
        }
        errs
    }

    /// The resolved configuration as TOML with every secret redacted (for `check`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::REDACTED;
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
        let e = load(f.path(), true).unwrap_err().to_string();
        assert!(e.contains("kafka.properties_file") && e.contains("group.id"), "{e}");
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let f = write(&format!("{MINIMAL}\n[batch]\nmax_event = 3\n"));
        let e = load(f.path(), true).unwrap_err().to_string();
        assert!(e.contains("max_event"), "{e}");
        assert!(e.contains(&f.path().display().to_string()), "{e}");
    }

    #[test]
    fn bad_value_names_key() {
        let f = write(&MINIMAL.replace("group_id = \"g\"", "group_id = 5"));
        let e = load(f.path(), true).unwrap_err().to_string();
        assert!(e.contains("kafka.group_id"), "{e}");
    }

    #[test]
    fn missing_required_and_conflicts() {
        let f = write(
            &MINIMAL
                .replace("topics = [\"t\"]", "")
                .replace("key = \"dp_test_key_123\"", ""),
        );
        let e = load(f.path(), true).unwrap_err().to_string();
        assert!(e.contains("kafka.topics"), "{e}");
        assert!(e.contains("api.key"), "{e}");
        let missing = load(Path::new("/nonexistent/x.toml"), true).unwrap_err().to_string();
        assert!(missing.contains("does not exist"), "{missing}");
    }
}
