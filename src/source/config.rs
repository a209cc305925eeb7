//! `[kafka]`: the consumer group's settings and the librdkafka pass-through properties.

use crate::settings::{Invalid, Problem, PropertyValue, Scrubber, REDACTED};
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
    /// Topics to consume (exclusive with `topic_pattern`); from the environment `[a, b]` or `a`.
    #[serde(default, deserialize_with = "crate::settings::list_or_text")]
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

/// The properties librdkafka itself marks sensitive (`_RK_SENSITIVE` in `rdkafka_conf.c` of the
/// vendored librdkafka; it has no public API for the flag). A test reads that file and fails when
/// an upgrade adds one this list lacks.
pub const LIBRDKAFKA_SENSITIVE: &[&str] = &[
    "sasl.oauthbearer.assertion.private.key.file",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
    "sasl.password",
    "sasl.username",
    "ssl.ca.pem",
    "ssl.key.location",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
    "ssl_key",
];

/// Whether a librdkafka property holds a secret: librdkafka's own list
/// ([`LIBRDKAFKA_SENSITIVE`]), or a name that says so (`password`, `secret`, `token`, …, for
/// properties of other clients and future ones).
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if LIBRDKAFKA_SENSITIVE.contains(&k.as_str()) {
        return true;
    }
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
                for (property, reason) in refused_properties(&props) {
                    let key = if k.properties.contains_key(&property) {
                        format!("kafka.properties.{property}")
                    } else {
                        "kafka.properties_file".to_string()
                    };
                    invalid.push(Invalid {
                        key,
                        problem: Problem::RefusedProperty { property, reason },
                    });
                }
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

    /// The properties `kafka.properties_file` sets, with their values (none when it cannot be
    /// read).
    pub fn properties_file_entries(&self) -> Vec<(String, String)> {
        if self.properties_file.is_none() {
            return Vec::new();
        }
        let own = self.properties.0.len();
        self.client_properties()
            .map(|all| all.into_iter().skip(own).collect())
            .unwrap_or_default()
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

/// Appended to librdkafka's refusal of a Java client's property (`sasl.jaas.config`, …).
pub const JAVA_ONLY_HINT: &str = " (a Java client property: librdkafka has no JAAS; set `sasl.mechanism`, \
                                  `sasl.username` and `sasl.password` instead)";

/// The properties librdkafka refuses (an unknown name, a value it cannot take), checked the way
/// the client will apply them (`rd_kafka_conf_set`, no connection), each named without its value:
/// librdkafka's message quotes the value, so any value of `props` is scrubbed from it. A Java-only
/// property gets a hint.
fn refused_properties(props: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (key, value) in props {
        // librdkafka's message quotes this property's value: that value goes.
        let scrub = Scrubber::new([value.clone()]);
        let mut one = rdkafka::ClientConfig::new();
        one.set(key, value);
        if let Err(e) = one.create_native_config() {
            let reason = match &e {
                rdkafka::error::KafkaError::ClientConfig(_, desc, _, _) => scrub.scrub(desc).into_owned(),
                other => scrub.scrub(&other.to_string()).into_owned(),
            };
            let hint = if key.starts_with("sasl.jaas") || key.starts_with("sasl.login.") {
                JAVA_ONLY_HINT
            } else {
                ""
            };
            out.push((key.clone(), format!("{reason}{hint}")));
        }
    }
    out
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

    #[test]
    fn refused_properties_are_named_without_their_value() {
        let k = kafka(
            "[properties]\n\"sasl.pasword\" = \"typo-pw-8c1f\"\n\"sasl.jaas.config\" = \"x required password=\\\"jaas-pw-77\\\";\"\n\"linger.ms\" = \"soon-3e9a\"\n\"session.timeout.ms\" = 6000\n",
        );
        let invalid = k.validate();
        let refused: Vec<(&str, &str)> = invalid
            .iter()
            .filter_map(|i| match &i.problem {
                Problem::RefusedProperty { property, .. } => Some((i.key.as_str(), property.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(
            refused,
            [
                ("kafka.properties.linger.ms", "linger.ms"),
                ("kafka.properties.sasl.jaas.config", "sasl.jaas.config"),
                ("kafka.properties.sasl.pasword", "sasl.pasword"),
            ]
        );
        let shown = format!(
            "{invalid:?} {}",
            invalid.iter().map(|i| i.problem.to_string()).collect::<String>()
        );
        for secret in ["typo-pw-8c1f", "jaas-pw-77", "soon-3e9a"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(invalid.iter().any(|i| matches!(&i.problem,
            Problem::RefusedProperty { property, reason } if property == "sasl.jaas.config" && reason.ends_with(JAVA_ONLY_HINT))));
    }

    #[test]
    fn refused_properties_from_the_file_name_the_file_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.properties");
        std::fs::write(&path, "sasl.passwrd=file-pw-51d0\nsasl.mechanism=PLAIN\n").unwrap();
        let k = kafka(&format!("properties_file = {path:?}\n"));
        assert_eq!(
            k.properties_file_entries(),
            [
                ("sasl.passwrd".to_string(), "file-pw-51d0".to_string()),
                ("sasl.mechanism".into(), "PLAIN".into())
            ]
        );
        let invalid = k.validate();
        assert!(
            matches!(&invalid[..], [Invalid { key, problem: Problem::RefusedProperty { property, .. } }]
                if key == "kafka.properties_file" && property == "sasl.passwrd"),
            "{invalid:?}"
        );
        assert!(!invalid[0].problem.to_string().contains("file-pw-51d0"));
    }

    #[test]
    fn every_property_librdkafka_marks_sensitive_is_a_secret() {
        // The vendored librdkafka's property table: every entry flagged `_RK_SENSITIVE`.
        let out = std::process::Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--locked"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo metadata runs");
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata is JSON");
        let manifest = meta["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "rdkafka-sys")
            .and_then(|p| p["manifest_path"].as_str())
            .expect("rdkafka-sys is a dependency");
        let conf = std::path::Path::new(manifest).with_file_name("librdkafka/src/rdkafka_conf.c");
        let text = std::fs::read_to_string(&conf).unwrap_or_else(|e| panic!("{}: {e}", conf.display()));
        let mut flagged = Vec::new();
        for (at, _) in text.match_indices("_RK_SENSITIVE") {
            let rest = &text[at..];
            // The property's name is the first string after the flag in its table entry.
            if let Some(q) = rest.find('"') {
                let name: String = rest[q + 1..].chars().take_while(|c| *c != '"').collect();
                if rest[..q].contains(',') && !rest[..q].contains(';') {
                    flagged.push(name);
                }
            }
        }
        assert!(flagged.len() >= 10, "read {flagged:?} from {}", conf.display());
        for name in &flagged {
            assert!(
                LIBRDKAFKA_SENSITIVE.contains(&name.as_str()) && is_secret_property(name),
                "librdkafka marks `{name}` sensitive: add it to LIBRDKAFKA_SENSITIVE"
            );
        }
        assert!(is_secret_property("sasl.oauthbearer.config"));
        assert!(is_secret_property("some.future.client.secret"));
        assert!(!is_secret_property("bootstrap.servers"));
    }
}
