//! `[kafka]`: the consumer group's settings and the librdkafka pass-through properties.

use crate::settings::{Invalid, Problem, PropertyValue, REDACTED};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// `[kafka]`: the source consumer group.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]` of the brokers.
    pub bootstrap_servers: String,
    /// The consumer group all replicas join.
    pub group_id: String,
    /// Topics to consume (exclusive with `topic_pattern`).
    #[serde(default)]
    pub topics: Vec<String>,
    /// A regular expression of topics to consume (exclusive with `topics`).
    #[serde(default)]
    pub topic_pattern: Option<String>,
    /// Static group membership id (`group.instance.id`); the Helm chart sets it from the pod name.
    #[serde(default)]
    pub group_instance_id: Option<String>,
    /// Records taken from Kafka and not yet finished, across all partitions, before the bridge
    /// pauses its partitions. Bounds memory whatever the backlog.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_records: usize,
    /// How often finished offsets are committed (synchronously), whatever else happens.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Also commit as soon as a batch was delivered (asynchronously): what a crash re-reads is
    /// then the batches delivered within a commit's round trip, not within `commit_interval`.
    /// Turn off only to spare the group coordinator a commit per request at very high request
    /// rates; with the memory dedupe store a crash then repeats up to `commit_interval` of events.
    #[serde(default = "default_true")]
    pub commit_on_delivery: bool,
    /// How long an assigned partition that the bridge has not paused may go without a record read
    /// while the broker holds records beyond what was read, before it counts as stuck
    /// (`datapulse_bridge_partitions_stuck`, the `partitions` readiness condition). Greater than
    /// zero.
    #[serde(default = "default_stuck_after", with = "humantime_serde")]
    pub stuck_after: Duration,
    /// librdkafka properties passed through as given (SASL, SSL, timeouts…). Values of keys that
    /// look secret are redacted when printed.
    #[serde(default)]
    pub properties: KafkaProperties,
    /// A file of `key=value` lines (librdkafka properties, `#` comments) read at start-up and
    /// applied over `properties`: mount a Secret here to keep SASL/SSL secrets out of the config.
    /// Its values are never printed.
    #[serde(default)]
    pub properties_file: Option<PathBuf>,
}

fn default_max_in_flight() -> usize {
    20_000
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_true() -> bool {
    true
}
fn default_stuck_after() -> Duration {
    Duration::from_secs(60)
}

/// librdkafka pass-through properties. Values whose key names a secret are redacted in Debug and
/// Serialize; [`KafkaProperties::iter`] gives the real values to the client.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct KafkaProperties(BTreeMap<String, PropertyValue>);

/// librdkafka properties the bridge sets itself (its guarantees depend on them).
pub const RESERVED_PROPERTIES: &[&str] = &[
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
    "enable.auto.commit",
    "group.instance.id",
];

/// Whether a librdkafka property holds a secret.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "ssl.key.pem",
        "ssl_key",
        "token",
        "credentials",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl KafkaConfig {
    /// What types alone cannot say about `[kafka]`: the servers, the group, topics or a pattern
    /// (one of them), the in-flight bound, durations above zero (`commit_interval`: a timer of zero
    /// period cannot tick; `stuck_after`: every partition would be stuck at once), and no property the bridge's guarantees depend on
    /// (`RESERVED_PROPERTIES`) in `properties` or `properties_file`.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut invalid = Vec::new();
        let mut err = |key: &str, msg: String| invalid.push(Invalid::new(key, msg));
        let k = self;
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
            Err(e) => err("kafka.properties_file", e.to_string()),
            Ok(props) => {
                for (key, _) in props
                    .iter()
                    .filter(|(key, _)| RESERVED_PROPERTIES.contains(&key.as_str()))
                {
                    invalid.push(Invalid {
                        key: "kafka.properties_file".into(),
                        problem: Problem::Reserved { property: key.clone() },
                    });
                }
            }
        }
        for reserved in RESERVED_PROPERTIES.iter().copied() {
            if k.properties.contains_key(reserved) {
                invalid.push(Invalid {
                    key: format!("kafka.properties.{reserved}"),
                    problem: Problem::Reserved {
                        property: reserved.into(),
                    },
                });
            }
        }
        for (key, d) in [
            ("kafka.commit_interval", self.commit_interval),
            ("kafka.stuck_after", self.stuck_after),
        ] {
            if d.is_zero() {
                invalid.push(Invalid::new(key, "must be greater than zero"));
            }
        }
        invalid
    }

    /// Every librdkafka property to apply: `properties`, then the lines of `properties_file`.
    ///
    /// Errors: the file cannot be read, or a line is not `key=value`.
    pub fn client_properties(&self) -> Result<Vec<(String, String)>, PropertiesFileError> {
        let mut out: Vec<(String, String)> = self.properties.iter().map(|(k, v)| (k.to_string(), v)).collect();
        if let Some(path) = &self.properties_file {
            let text = std::fs::read_to_string(path).map_err(|source| PropertiesFileError::Unreadable {
                path: path.clone(),
                source,
            })?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((k, v)) = line.split_once('=') else {
                    return Err(PropertiesFileError::NotKeyValue {
                        path: path.clone(),
                        line: n + 1,
                    });
                };
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Ok(out)
    }
}

/// Why `kafka.properties_file` cannot be used. Never holds a value from the file.
#[derive(Debug, thiserror::Error)]
pub enum PropertiesFileError {
    #[error("cannot read kafka.properties_file {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("kafka.properties_file {} line {line}: expected `key=value`", path.display())]
    NotKeyValue { path: PathBuf, line: usize },
}

impl KafkaProperties {
    pub fn iter(&self) -> impl Iterator<Item = (&str, String)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.to_string()))
    }
    /// Whether the user set `key` here (not in `properties_file`).
    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
    fn redacted(&self) -> BTreeMap<&str, PropertyValue> {
        self.0
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    PropertyValue::String(REDACTED.into())
                } else {
                    v.clone()
                };
                (k.as_str(), v)
            })
            .collect()
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.redacted().fmt(f)
    }
}

impl Serialize for KafkaProperties {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.redacted().serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(extra: &str) -> KafkaConfig {
        toml::from_str(&format!(
            "bootstrap_servers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn stuck_after_defaults_to_a_minute_and_durations_must_be_greater_than_zero() {
        let k = kafka("");
        assert_eq!(k.stuck_after, Duration::from_secs(60));
        assert!(k.validate().is_empty());
        assert_eq!(kafka("stuck_after = \"90s\"").stuck_after, Duration::from_secs(90));
        let keys: Vec<String> = kafka("stuck_after = \"0s\"\ncommit_interval = \"0ms\"")
            .validate()
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(keys, ["kafka.commit_interval", "kafka.stuck_after"]);
    }
}
