//! `[dedupe]`: the configuration section of deduplication. Every key has a default; see
//! `docs/dedupe.md` for each key with an example.

use crate::settings::{Invalid, Problem, Secret};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// `[dedupe]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {
    /// Where delivered keys are remembered: `memory` (default, this process only) or `redis`
    /// (shared by every replica).
    #[serde(default)]
    pub store: StoreKind,
    /// The fields whose values together form the dedupe key of an event (API field names or custom
    /// property names). Default `["transaction_id"]`; `["event_name", "transaction_id"]` keeps the
    /// same id apart across event names. An event lacking any of these fields is not deduplicated.
    #[serde(default = "default_key", deserialize_with = "crate::settings::list_or_text")]
    pub key: Vec<String>,
    /// Per event name, the fields that form its key instead of `key`, for events without a
    /// transaction id (for example `register = ["client_user_id"]`). The event name is always part
    /// of such a key.
    #[serde(default, deserialize_with = "crate::settings::map_of_lists")]
    pub keys_by_event: BTreeMap<String, Vec<String>>,
    /// How long a delivered key (and a delivered bet result) is remembered.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// The memory store's bound on remembered keys (and delivered bet results); the least
    /// recently used go first.
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
    /// What `check` and `delivered` do when the store cannot be reached: `pause` (default: fail,
    /// the pipeline retries and lags, readiness is false) or `deliver` (send without dedupe,
    /// counted and logged).
    #[serde(default)]
    pub on_store_unavailable: OnStoreUnavailable,
    /// Dead-letter a standalone win/loss whose bet already carried its result, and the other
    /// way round (contract decision 5). Default true.
    #[serde(default = "default_true")]
    pub bet_result_guard: bool,
    /// `[dedupe.redis]`, used when `store = "redis"`.
    #[serde(default)]
    pub redis: RedisConfig,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreUnavailable {
    #[default]
    Pause,
    Deliver,
}

/// `[dedupe.redis]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`, without a password (put it in `password`).
    #[serde(default = "default_url")]
    pub url: String,
    /// ACL user name, if any.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (redacted when printed; prefer the environment variable
    /// `DATAPULSE_BRIDGE_DEDUPE__REDIS__PASSWORD`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// Prefix of every key the bridge writes (`<prefix>:done:<key>` …). Give each deployment that
    /// shares a Redis its own prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How long a claim on an id in flight outlives its owner's last renewal: after a crash, the
    /// id is free again after this long. Renewed every third of it while in flight.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How often `check` looks again at an id another replica has in flight.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Time limit of connecting and of one round trip.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// The former name of `delivery.on_ambiguous`, kept as an alias: `dead-letter` is
    /// `in-doubt`, `resend` is `resend`. Set together with `delivery.on_ambiguous` they must
    /// agree. After `Config::resolve` it holds the value in force (the Redis store reads it for
    /// ids in flight in a process that was killed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_doubt: Option<InDoubt>,
}

/// `dedupe.redis.in_doubt`, the former name of `delivery.on_ambiguous`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum InDoubt {
    #[default]
    DeadLetter,
    Resend,
}

fn default_key() -> Vec<String> {
    vec!["transaction_id".into()]
}
fn default_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_max_entries() -> u64 {
    // An entry is the id plus about 60 bytes of map bookkeeping.
    200_000
}
fn default_true() -> bool {
    true
}
fn default_url() -> String {
    "redis://127.0.0.1:6379/0".into()
}
fn default_prefix() -> String {
    "datapulse-bridge".into()
}
fn default_lease() -> Duration {
    Duration::from_secs(60)
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(200)
}
fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig {
            store: StoreKind::default(),
            key: default_key(),
            keys_by_event: BTreeMap::new(),
            ttl: default_ttl(),
            max_entries: default_max_entries(),
            on_store_unavailable: OnStoreUnavailable::default(),
            bet_result_guard: true,
            redis: RedisConfig::default(),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: default_url(),
            username: None,
            password: None,
            prefix: default_prefix(),
            lease: default_lease(),
            poll_interval: default_poll_interval(),
            timeout: default_timeout(),
            in_doubt: None,
        }
    }
}

impl DedupeConfig {
    /// What types alone cannot say about `[dedupe]`.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut errs = Vec::new();
        let mut err = |key: &str, problem: Problem| {
            errs.push(Invalid {
                key: key.into(),
                problem,
            })
        };
        check_fields("dedupe.key", &self.key, &mut err);
        for (name, fields) in &self.keys_by_event {
            let key = format!("dedupe.keys_by_event.{name}");
            if name.is_empty() {
                err("dedupe.keys_by_event", "an event name must not be empty".into());
            }
            check_fields(&key, fields, &mut err);
        }
        if self.ttl < Duration::from_secs(1) {
            err("dedupe.ttl", "must be at least 1s".into());
        }
        if self.max_entries == 0 {
            err("dedupe.max_entries", "must be at least 1".into());
        }
        if self.store == StoreKind::Redis {
            let r = &self.redis;
            match redis::Client::open(r.url.as_str()) {
                // Neither the URL nor the client's message about it is printed: either may hold
                // the password.
                Err(e) => err(
                    "dedupe.redis.url",
                    format!("is not a Redis URL such as redis://127.0.0.1:6379/0 ({:?})", e.kind()).into(),
                ),
                Ok(c) if c.get_connection_info().redis_settings().password().is_some() => err(
                    "dedupe.redis.url",
                    Problem::SecretInUrl {
                        move_to: "dedupe.redis.password".into(),
                        env: "DATAPULSE_BRIDGE_DEDUPE__REDIS__PASSWORD".into(),
                    },
                ),
                Ok(_) => {}
            }
            if r.prefix.is_empty() {
                err("dedupe.redis.prefix", "must not be empty".into());
            }
            if r.lease < Duration::from_secs(3) {
                err(
                    "dedupe.redis.lease",
                    "must be at least 3s (claims are renewed every third of it)".into(),
                );
            }
            if r.poll_interval.is_zero() || r.poll_interval >= r.lease {
                err(
                    "dedupe.redis.poll_interval",
                    "must be more than 0 and less than `dedupe.redis.lease`".into(),
                );
            }
            if r.timeout.is_zero() || r.timeout * 3 > r.lease {
                err(
                    "dedupe.redis.timeout",
                    "must be more than 0 and at most a third of `dedupe.redis.lease` (claims must be renewed in time)"
                        .into(),
                );
            }
        }
        errs
    }
}

fn check_fields(key: &str, fields: &[String], err: &mut impl FnMut(&str, Problem)) {
    if fields.is_empty() {
        err(key, "must name at least one field".into());
    }
    for (i, f) in fields.iter().enumerate() {
        if f.is_empty() {
            err(key, "a field name must not be empty".into());
        } else if fields[..i].contains(f) {
            err(key, format!("names `{f}` twice").into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(toml_text: &str) -> Vec<Invalid> {
        let cfg: DedupeConfig = toml::from_str(toml_text).unwrap();
        cfg.validate()
    }

    fn names(e: &[Invalid], key: &str) -> bool {
        e.iter().any(|i| i.key == key)
    }

    #[test]
    fn defaults_are_valid() {
        assert!(errs("").is_empty());
        let d = DedupeConfig::default();
        assert_eq!(d.key, vec!["transaction_id"]);
        assert_eq!(d.store, StoreKind::Memory);
        assert_eq!(d.on_store_unavailable, OnStoreUnavailable::Pause);
        assert_eq!(d.redis.lease, Duration::from_secs(60));
        assert!(errs("store = \"redis\"").is_empty());
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = errs("key = []\nmax_entries = 0\nttl = \"0s\"\n[keys_by_event]\nregister = [\"a\", \"a\"]");
        assert!(names(&e, "dedupe.key"), "{e:?}");
        assert!(names(&e, "dedupe.max_entries"), "{e:?}");
        assert!(names(&e, "dedupe.ttl"), "{e:?}");
        assert!(
            e.contains(&Invalid::new("dedupe.keys_by_event.register", "names `a` twice")),
            "{e:?}"
        );
        let e = errs("store = \"redis\"\n[redis]\nurl = \"redis://:hunter2@127.0.0.1:6379\"\nlease = \"1s\"");
        assert!(
            e.iter()
                .any(|i| i.key == "dedupe.redis.url" && matches!(i.problem, Problem::SecretInUrl { .. })),
            "{e:?}"
        );
        assert!(e.iter().all(|i| !i.problem.to_string().contains("hunter2")), "{e:?}");
        assert!(names(&e, "dedupe.redis.lease"), "{e:?}");
        let e = errs("store = \"redis\"\n[redis]\nurl = \"redis://:hunter2@127.0.0.1:notaport\"");
        assert!(names(&e, "dedupe.redis.url"), "{e:?}");
        assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
        let e = errs("store = \"redis\"\n[redis]\nurl = \"http://x\"");
        assert!(names(&e, "dedupe.redis.url"), "{e:?}");
        assert!(toml::from_str::<DedupeConfig>("stor = \"memory\"").is_err());
    }

    #[test]
    fn password_is_redacted_when_printed() {
        let cfg: DedupeConfig = toml::from_str("[redis]\npassword = \"hunter2\"").unwrap();
        assert!(!toml::to_string(&cfg).unwrap().contains("hunter2"));
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}

#[cfg(test)]
mod docs_tests {
    use super::*;

    /// `docs/dedupe.md` lists every key with its default as the code has it.
    #[test]
    fn the_docs_table_matches_the_defaults() {
        let doc = include_str!("../../docs/dedupe.md");
        let rows: BTreeMap<String, String> = doc
            .lines()
            .filter_map(|l| {
                // `\|` is a pipe inside a cell (`pause` \| `deliver`).
                let l = l.replace("\\|", "/");
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let key = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((key.to_string(), cells.get(3)?.to_string()))
            })
            .collect();
        let defaults = toml::Value::try_from(DedupeConfig::default()).unwrap();
        let mut flat = Vec::new();
        flatten("", &defaults, &mut flat);
        assert!(flat.len() >= 11, "{flat:?}");
        for (key, value) in flat {
            let documented = rows
                .get(key.as_str())
                .unwrap_or_else(|| panic!("`{key}` is not in docs/dedupe.md"));
            let documented = documented.trim_matches('`');
            let same = match &value {
                toml::Value::String(s) => match (humantime::parse_duration(s), humantime::parse_duration(documented)) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => s == documented,
                },
                toml::Value::Array(a) => {
                    toml::Value::Array(a.clone()).to_string().replace(", ", ",") == documented.replace(", ", ",")
                }
                other => other.to_string() == documented,
            };
            assert!(
                same,
                "`{key}`: the code's default is {value}, docs/dedupe.md says {documented}"
            );
        }
    }

    fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
        match v {
            toml::Value::Table(t) if !t.is_empty() => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            toml::Value::Table(_) => {} // an empty map such as keys_by_event: documented by its pattern
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
}
