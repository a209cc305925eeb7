//! Helpers shared by the packaging tests: the repository's files, `datapulse-bridge check` run as
//! a subprocess, YAML streams, and the Helm chart rendered by Helm's own engine.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// What `datapulse-bridge check` said about a configuration.
pub struct Checked {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `datapulse-bridge check --config FILE` on `toml`, with only the given `DATAPULSE_BRIDGE_*`
/// variables set (inherited ones are removed, so the result does not depend on the caller's shell).
pub fn check(toml: &str, env: &[(&str, &str)]) -> Checked {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(toml.as_bytes()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_datapulse-bridge"));
    cmd.arg("check").arg("--config").arg(f.path());
    for (k, _) in std::env::vars() {
        if k.starts_with("DATAPULSE_BRIDGE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run datapulse-bridge check");
    Checked {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A file holding a fake API key, for configurations whose `api.key_file` is a pod or container path.
pub fn key_file() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(b"dp_packaging_test_key\n").unwrap();
    f
}

/// Every document of a YAML stream.
pub fn yaml_docs(s: &str) -> Vec<serde_norway::Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(s)
        .map(|d| serde_norway::Value::deserialize(d).expect("valid YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Renders the chart like `helm template` (values files relative to the repository, plus JSON
/// objects merged over them) through scripts/helm-template.py, which drives Helm's Go SDK via the
/// PyPI package helm-python-sdk. Err holds Helm's message (a `fail`, a schema violation).
pub fn helm_template(values_files: &[&str], set_json: &[&str]) -> Result<Vec<serde_norway::Value>, String> {
    helm_template_text(values_files, set_json).map(|s| yaml_docs(&s))
}

/// [`helm_template`]'s YAML stream, unparsed.
pub fn helm_template_text(values_files: &[&str], set_json: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("python3");
    cmd.arg(repo().join("scripts/helm-template.py"))
        .arg(repo().join("helm/datapulse-bridge"))
        .arg("--lint");
    for f in values_files {
        cmd.arg("-f").arg(repo().join(f));
    }
    for j in set_json {
        cmd.arg("--set-json").arg(j);
    }
    let out = cmd
        .output()
        .expect("python3 is needed to render the chart (scripts/helm-template.py)");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Some(2) => panic!(
            "cannot render the chart: {stderr}(CI installs it: pip install -r scripts/packaging-requirements.txt)"
        ),
        _ => Err(stderr),
    }
}

/// The manifest of `kind` among rendered documents.
pub fn manifest<'a>(docs: &'a [serde_norway::Value], kind: &str) -> &'a serde_norway::Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

/// Environment variables the packaging (compose, chart, docs) names, each with a sample value of
/// the right type. `check` rejects unknown keys, so accepting each one proves it is in the schema.
/// A variable named anywhere in the packaging but missing here fails `env_vars_named_exist`.
pub const KNOWN_ENV: &[(&str, &str)] = &[
    ("DATAPULSE_BRIDGE_KAFKA__GROUP_INSTANCE_ID", "datapulse-bridge-0"),
    ("DATAPULSE_BRIDGE_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
    ("DATAPULSE_BRIDGE_API__KEY_FILE", "/etc/datapulse-bridge/secret/api-key"),
    ("DATAPULSE_BRIDGE_TELEMETRY__LOG_LEVEL", "debug"),
    (
        "DATAPULSE_BRIDGE_DELIVERY__REDIS_URL",
        "redis://:s3cret-sample@127.0.0.1:6379/0",
    ),
    ("DATAPULSE_BRIDGE_DEDUPE__REDIS__PASSWORD", "s3cret-sample"),
    ("DATAPULSE_BRIDGE_API__KEY", "s3cret-sample"),
];

/// The sample secrets of [`KNOWN_ENV`]: `check` must never print them.
pub const SAMPLE_SECRET: &str = "s3cret-sample";

/// Every `DATAPULSE_BRIDGE_*` variable name in `text`.
pub fn env_vars_in(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"DATAPULSE_BRIDGE_[A-Z0-9_]*[A-Z0-9]").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_string()).collect()
}

/// Every key path (`a.b.c`) of a TOML document, tables and leaves; array-of-tables items share
/// their array's path.
pub fn toml_paths(text: &str) -> BTreeSet<String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    out.insert(p.clone());
                    walk(&p, v, out);
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| walk(prefix, v, out)),
            _ => {}
        }
    }
    let v: toml::Value = toml::from_str(text).unwrap_or_else(|e| panic!("not TOML: {e}\n{text}"));
    let mut out = BTreeSet::new();
    walk("", &v, &mut out);
    out
}

/// Every rendered document of `kind`.
pub fn manifests<'a>(docs: &'a [serde_norway::Value], kind: &str) -> Vec<&'a serde_norway::Value> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

/// Decodes standard base64 (a Secret's `data`), padding optional.
pub fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()) {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .unwrap_or_else(|| panic!("{c:?} is not base64")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A Secret's item, decoded.
pub fn secret_item(secret: &serde_norway::Value, key: &str) -> String {
    let b64 = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("Secret {:?} has no item {key}", secret["metadata"]["name"]));
    String::from_utf8(base64_decode(b64)).unwrap()
}
