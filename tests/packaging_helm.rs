//! The Helm chart, rendered by Helm's own engine (scripts/helm-template.py over the Go SDK): the
//! values validate against values.schema.json, the ConfigMap's TOML is accepted by
//! `datapulse-bridge check` together with the environment the pod sets, the pod's wiring (key file,
//! ports, probes, security) matches the configuration, and misconfigurations that would lose data or
//! overspend the key's rate limit are refused.
//!
//! Needs python3 and `pip install -r scripts/packaging-requirements.txt`.

#[path = "packaging_common/mod.rs"]
mod common;

use common::*;
use serde_norway::Value;

const PRODUCTION: &str = "helm/datapulse-bridge/ci/production-values.yaml";

fn config_toml(docs: &[Value]) -> String {
    manifest(docs, "ConfigMap")["data"]["datapulse-bridge.toml"]
        .as_str()
        .expect("ConfigMap holds datapulse-bridge.toml")
        .to_string()
}

fn container(docs: &[Value]) -> &Value {
    &manifest(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
}

/// The environment the pod gives the bridge, with sample values for values taken from the cluster
/// (pod name, Secrets), plus api.key_file pointed at a real file: the mount exists only in the pod.
fn pod_env(docs: &[Value], key: &tempfile::NamedTempFile) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container(docs)["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let sample = KNOWN_ENV
            .iter()
            .find(|(k, _)| *k == name)
            .unwrap_or_else(|| panic!("{name} set by the chart has no sample in KNOWN_ENV"))
            .1;
        let value = match e["value"].as_str() {
            // Kubernetes expands $(VAR) with variables defined earlier in the list.
            Some(v) => env
                .iter()
                .fold(v.to_string(), |v, (k, val)| v.replace(&format!("$({k})"), val)),
            None => sample.to_string(),
        };
        assert!(
            !value.contains("$("),
            "{name}={value} refers to a variable not defined before it"
        );
        env.push((name, value));
    }
    env.push((
        "DATAPULSE_BRIDGE_API__KEY_FILE".into(),
        key.path().display().to_string(),
    ));
    env
}

fn check_rendered(docs: &[Value]) -> Checked {
    let key = key_file();
    let env = pod_env(docs, &key);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    check(&config_toml(docs), &env)
}

#[test]
fn default_values_render_and_pass_check() {
    let docs = helm_template(&[], &[]).expect("default values render");
    let checked = check_rendered(&docs);
    assert!(checked.ok, "check refused the default ConfigMap:\n{}", checked.stderr);
    assert!(checked.stdout.contains("[kafka]"), "{}", checked.stdout);
}

#[test]
fn production_values_render_and_pass_check() {
    let docs = helm_template(&[PRODUCTION], &[]).expect("production values render");
    for kind in [
        "ScaledObject",
        "ServiceMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
        "Service",
    ] {
        manifest(&docs, kind);
    }
    let checked = check_rendered(&docs);
    assert!(
        checked.ok,
        "check refused the production ConfigMap:\n{}",
        checked.stderr
    );
    // The Redis password comes from its Secret through the environment, and is never printed.
    let env = &container(&docs)["env"];
    assert!(env
        .as_sequence()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "DATAPULSE_BRIDGE_DEDUPE__REDIS__PASSWORD"
            && e["valueFrom"]["secretKeyRef"]["name"] == "datapulse-redis"));
    assert!(!config_toml(&docs).contains("redis_url"), "{}", config_toml(&docs));
    assert!(!checked.stdout.contains(SAMPLE_SECRET), "{}", checked.stdout);
}

#[test]
fn pod_wiring_matches_the_configuration() {
    for files in [&[][..], &[PRODUCTION][..]] {
        let docs = helm_template(files, &[]).unwrap();
        let toml: toml::Value = toml::from_str(&config_toml(&docs)).unwrap();
        let sts = manifest(&docs, "StatefulSet");
        let pod = &sts["spec"]["template"]["spec"];
        let c = container(&docs);

        // api.key_file is the Secret's item in its (non-subPath) mount.
        let key_path = toml["api"]["key_file"].as_str().unwrap();
        let mount = c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "api-key")
            .unwrap();
        assert!(
            mount["subPath"].is_null(),
            "a subPath mount would never see a rotated key"
        );
        let vol = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "api-key")
            .unwrap();
        let item = &vol["secret"]["items"][0]["path"];
        assert_eq!(
            key_path,
            format!("{}/{}", mount["mountPath"].as_str().unwrap(), item.as_str().unwrap())
        );

        // The config file the container is told to read is the ConfigMap's key in its mount.
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args[..2], ["run", "--config"]);
        let cfg_mount = c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "config")
            .unwrap();
        assert_eq!(
            args[2],
            format!("{}/datapulse-bridge.toml", cfg_mount["mountPath"].as_str().unwrap())
        );

        // The operations port: telemetry.listen, the container port, the probes, the Service.
        let listen = toml["telemetry"]["listen"].as_str().unwrap();
        let port = c["ports"][0]["containerPort"].as_u64().unwrap();
        assert_eq!(listen, format!("0.0.0.0:{port}"));
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health/live");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/health/ready");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], c["ports"][0]["name"]);
        assert_eq!(
            manifest(&docs, "Service")["spec"]["ports"][0]["port"].as_u64(),
            Some(port)
        );

        // Static membership from the pod name.
        let gid = c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "DATAPULSE_BRIDGE_KAFKA__GROUP_INSTANCE_ID")
            .expect("group_instance_id set from the pod");
        assert_eq!(gid["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");

        // Locked down.
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["capabilities"]["drop"][0], "ALL");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

        // The grace period covers the bridge's own shutdown deadline.
        let deadline = toml["shutdown"]["deadline"].as_str().unwrap();
        let deadline: u64 = deadline.trim_end_matches('s').parse().unwrap();
        assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > deadline);
    }
}

#[test]
fn autoscaling_is_capped_at_the_partition_count() {
    let docs = helm_template(&[PRODUCTION], &[]).unwrap();
    let so = manifest(&docs, "ScaledObject");
    assert_eq!(so["spec"]["scaleTargetRef"]["kind"], "StatefulSet");
    let max = so["spec"]["maxReplicaCount"].as_u64().unwrap();
    assert!(max <= 12, "maxReplicaCount {max} above the 12 partitions");
    for t in so["spec"]["triggers"].as_sequence().unwrap() {
        assert_eq!(t["metadata"]["allowIdleConsumers"], "false");
        assert_eq!(t["metadata"]["consumerGroup"], "datapulse-bridge-prod");
    }
    // Autoscaled: the StatefulSet leaves its replica count to the autoscaler.
    assert!(manifest(&docs, "StatefulSet")["spec"]["replicas"].is_null());

    let hpa = helm_template(&[PRODUCTION], &[r#"{"autoscaling":{"kind":"hpa","maxReplicas":6}}"#]).unwrap();
    assert_eq!(
        manifest(&hpa, "HorizontalPodAutoscaler")["spec"]["maxReplicas"].as_u64(),
        Some(6)
    );
}

#[test]
fn static_share_passes_the_replica_count() {
    let docs = helm_template(
        &[PRODUCTION],
        &[r#"{"autoscaling":{"enabled":false},"replicaCount":3,"rateBudget":{"mode":"static_share"}}"#],
    )
    .unwrap();
    let toml: toml::Value = toml::from_str(&config_toml(&docs)).unwrap();
    let budget = &toml["delivery"];
    assert_eq!(budget["rate_mode"].as_str(), Some("static_share"));
    assert_eq!(budget["replicas"].as_integer(), Some(3));
    assert_eq!(manifest(&docs, "StatefulSet")["spec"]["replicas"].as_u64(), Some(3));
    let checked = check_rendered(&docs);
    assert!(
        checked.ok,
        "check refused the static-share ConfigMap:\n{}",
        checked.stderr
    );
}

/// Each misconfiguration, and a word of the message that must tell the user what to change.
#[test]
fn unsafe_combinations_are_refused() {
    let cases: &[(&[&str], &str, &str)] = &[
        (&[], r#"{"replicaCount":2}"#, "exceeds kafka.partitions"),
        (
            &[PRODUCTION],
            r#"{"autoscaling":{"maxReplicas":13}}"#,
            "autoscaling.maxReplicas",
        ),
        (
            &[PRODUCTION],
            r#"{"rateBudget":{"mode":"static_share"}}"#,
            "static_share",
        ),
        (
            &[PRODUCTION],
            r#"{"rateBudget":{"mode":"local"}}"#,
            "rateBudget.mode=local",
        ),
        (
            &[],
            r#"{"kafka":{"partitions":4},"replicaCount":2,"rateBudget":{"mode":"redis"},"redis":{"url":"redis://r:6379"}}"#,
            "dedupe.store=memory",
        ),
        (&[], r#"{"rateBudget":{"mode":"redis"}}"#, "redis.url"),
        (&[PRODUCTION], r#"{"redis":{"url":"redis://:pw@r:6379"}}"#, "url"),
        (
            &[],
            r#"{"kafka":{"partitions":4},"replicaCount":3,"rateBudget":{"mode":"static_share","limit":2},"dedupe":{"store":"redis"},"redis":{"url":"redis://r:6379"}}"#,
            "rateBudget.limit",
        ),
        (
            &[PRODUCTION],
            r#"{"autoscaling":{"minReplicas":8,"maxReplicas":6}}"#,
            "minReplicas",
        ),
        (&[], r#"{"kafka":{"topics":[],"topicPattern":""}}"#, "kafka.topics"),
        (
            &[],
            r#"{"kafka":{"properties":{"enable.auto.commit":true}}}"#,
            "enable.auto.commit",
        ),
        // The schema: unknown keys, wrong enums, malformed durations.
        (&[], r#"{"replicas":2}"#, "replicas"),
        (&[], r#"{"rateBudget":{"mode":"global"}}"#, "mode"),
        (&[], r#"{"batch":{"linger":"soon"}}"#, "linger"),
        (&[], r#"{"kafka":{"partitions":0}}"#, "partitions"),
    ];
    for (files, set, needle) in cases {
        match helm_template(files, &[set]) {
            Ok(_) => panic!("values {set} over {files:?} were accepted"),
            Err(e) => assert!(
                e.contains(needle),
                "values {set}: message does not mention {needle}: {e}"
            ),
        }
    }
}

#[test]
fn api_key_secret_is_created_only_on_request() {
    let docs = helm_template(&[], &[]).unwrap();
    assert!(
        docs.iter().all(|d| d["kind"] != "Secret"),
        "no key given, no Secret created"
    );
    let vol_secret = |docs: &[Value]| {
        manifest(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "api-key")
            .unwrap()["secret"]["secretName"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(vol_secret(&docs), "datapulse-bridge-api-key");

    let docs = helm_template(&[], &[r#"{"api":{"key":"dp_trial_key"}}"#]).unwrap();
    let secret = manifest(&docs, "Secret");
    assert_eq!(secret["metadata"]["name"].as_str().unwrap(), vol_secret(&docs));
    assert!(secret["data"]["api-key"].is_string());
    // The key is in the Secret only, never in the ConfigMap.
    assert!(!config_toml(&docs).contains("dp_trial_key"));

    let docs = helm_template(&[PRODUCTION], &[]).unwrap();
    assert!(docs.iter().all(|d| d["kind"] != "Secret"));
    assert_eq!(vol_secret(&docs), "datapulse-api-key");
}

#[test]
fn values_with_quotes_and_unicode_stay_valid_toml() {
    let docs = helm_template(
        &[],
        &[r#"{"kafka":{"groupId":"bridge \"quoted\" \\ é","properties":{"client.id":"a\"b"}}}"#],
    )
    .unwrap();
    let toml: toml::Value = toml::from_str(&config_toml(&docs)).unwrap();
    assert_eq!(toml["kafka"]["group_id"].as_str(), Some("bridge \"quoted\" \\ é"));
    assert_eq!(toml["kafka"]["properties"]["client.id"].as_str(), Some("a\"b"));
}

/// The rendered objects are valid Kubernetes objects: kubernetes-validate (PyPI) checks each one
/// against the Kubernetes 1.30 OpenAPI schemas, strictly (unknown fields refused). KEDA's and the
/// Prometheus operator's custom resources have no schema there and are only reported.
#[test]
fn manifests_are_valid_kubernetes_objects() {
    let variants: &[(&[&str], &str)] = &[
        (&[], "{}"),
        (
            &[],
            r#"{"api":{"key":"dp_trial_key"},"kafka":{"staticMembership":false}}"#,
        ),
        (&[PRODUCTION], "{}"),
        (&[PRODUCTION], r#"{"autoscaling":{"kind":"hpa"}}"#),
    ];
    for (files, set) in variants {
        let text = helm_template_text(files, &[set]).unwrap();
        let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        let out = std::process::Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", "1.30.0"])
            .arg(f.path())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run kubernetes-validate ({e}): pip install -r scripts/packaging-requirements.txt")
            });
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "values {set} over {files:?}: invalid objects:\n{report}"
        );
        assert!(!report.contains("ERROR"), "{report}");
    }
}
