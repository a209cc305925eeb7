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

/// A librdkafka properties file as a Secret of the user's would hold it.
const SAMPLE_PROPERTIES: &str =
    "# mounted from a Secret\nsasl.username=datapulse-bridge\nsasl.password=s3cret-sample\n";

/// The file a pod sees at `path`: the mounted Secret volume item whose mount path and item path
/// make `path`, as (Secret name, item key).
fn secret_file_at(docs: &[Value], path: &str) -> (String, String) {
    let pod = &manifest(docs, "StatefulSet")["spec"]["template"]["spec"];
    for m in container(docs)["volumeMounts"].as_sequence().unwrap() {
        let dir = m["mountPath"].as_str().unwrap();
        let Some(file) = path.strip_prefix(&format!("{dir}/")) else {
            continue;
        };
        assert!(m["subPath"].is_null());
        let vol = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap();
        let item = vol["secret"]["items"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{path} is not in a Secret volume: {vol:?}"))
            .iter()
            .find(|i| i["path"] == file)
            .unwrap_or_else(|| panic!("no item of {vol:?} at {path}"));
        return (
            vol["secret"]["secretName"].as_str().unwrap().to_string(),
            item["key"].as_str().unwrap().to_string(),
        );
    }
    panic!("nothing is mounted at {path}")
}

/// `datapulse-bridge check` on the ConfigMap's TOML with the pod's environment. Files that live in
/// the pod are replaced by local ones: the API key, and the `kafka.properties_file` (the content of
/// the chart's Secret when the chart renders it, otherwise SAMPLE_PROPERTIES).
fn check_rendered(docs: &[Value]) -> Checked {
    let key = key_file();
    let mut env = pod_env(docs, &key);
    let toml: toml::Value = toml::from_str(&config_toml(docs)).unwrap();
    let mut props = tempfile::NamedTempFile::new().unwrap();
    if let Some(path) = toml["kafka"].get("properties_file") {
        let (secret, item) = secret_file_at(docs, path.as_str().unwrap());
        let content = manifests(docs, "Secret")
            .into_iter()
            .find(|s| s["metadata"]["name"] == secret.as_str())
            .map(|s| secret_item(s, &item))
            .unwrap_or_else(|| SAMPLE_PROPERTIES.to_string());
        std::io::Write::write_all(&mut props, content.as_bytes()).unwrap();
        env.push((
            "DATAPULSE_BRIDGE_KAFKA__PROPERTIES_FILE".into(),
            props.path().display().to_string(),
        ));
    }
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

    // cooldownPeriod did nothing without scaling to zero (minReplicas >= 1): gone; the HPA's
    // behavior is what tunes scale-down, for KEDA as for the plain HPA.
    assert!(so["spec"]["cooldownPeriod"].is_null());
    assert!(so["spec"]["advanced"].is_null(), "no behavior given, none rendered");
    let behavior = r#"{"scaleDown":{"stabilizationWindowSeconds":600}}"#;
    let set = format!(r#"{{"autoscaling":{{"behavior":{behavior}}}}}"#);
    let keda = helm_template(&[PRODUCTION], &[&set]).unwrap();
    let given: Value = serde_norway::from_str(behavior).unwrap();
    assert_eq!(
        manifest(&keda, "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        given
    );

    let set = format!(r#"{{"autoscaling":{{"kind":"hpa","maxReplicas":6,"behavior":{behavior}}}}}"#);
    let hpa = helm_template(&[PRODUCTION], &[&set]).unwrap();
    let hpa = manifest(&hpa, "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["maxReplicas"].as_u64(), Some(6));
    assert_eq!(hpa["spec"]["behavior"], given);
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
        // An API URL needs a host.
        (&[], r#"{"api":{"baseUrl":"https://"}}"#, "baseUrl"),
        (&[], r#"{"api":{"baseUrl":"http://"}}"#, "baseUrl"),
        (&[], r#"{"api":{"baseUrl":"https:///v2"}}"#, "baseUrl"),
        (&[], r#"{"api":{"baseUrl":"https://user:pw@api.example"}}"#, "baseUrl"),
        // Secrets: one properties file, PEM only through kafka.tls, TLS given once and whole.
        (
            &[PRODUCTION],
            r#"{"kafka":{"existingSecret":"kafka-client","properties":{"sasl.password":"pw"}}}"#,
            "sasl.password",
        ),
        (
            &[],
            r#"{"kafka":{"properties":{"ssl.key.pem":"-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----\n"}}}"#,
            "kafka.tls",
        ),
        (
            &[],
            r#"{"kafka":{"tls":{"existingSecret":"kafka-tls","ca":"-----BEGIN CERTIFICATE-----\n"}}}"#,
            "kafka.tls",
        ),
        (
            &[],
            r#"{"kafka":{"tls":{"existingSecret":"kafka-tls","certKey":"tls.crt"}}}"#,
            "keyKey",
        ),
        (
            &[],
            r#"{"kafka":{"tls":{"cert":"-----BEGIN CERTIFICATE-----\n"}}}"#,
            "kafka.tls.key",
        ),
        (
            &[],
            r#"{"kafka":{"tls":{"existingSecret":"kafka-tls"},"properties":{"ssl.ca.location":"/etc/ssl/ca.pem"}}}"#,
            "ssl.ca.location",
        ),
        (&[], r#"{"kafka":{"tls":{"ca":"not PEM"}}}"#, "ca"),
        (&[PRODUCTION], r#"{"redis":{"username":"a@b"}}"#, "username"),
        // `check` refuses rediss:// (the bridge is built without TLS to Redis): so does the chart.
        (&[PRODUCTION], r#"{"redis":{"url":"rediss://r:6380/0"}}"#, "url"),
        // Removed in 0.2.0: it did nothing (KEDA applies it only when scaling to zero).
        (
            &[PRODUCTION],
            r#"{"autoscaling":{"keda":{"cooldownPeriod":300}}}"#,
            "cooldownPeriod",
        ),
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
        (
            &[PRODUCTION],
            r#"{"autoscaling":{"kind":"hpa","behavior":{"scaleDown":{"stabilizationWindowSeconds":600,"policies":[{"type":"Pods","value":1,"periodSeconds":300}]}}}}"#,
        ),
        (&[PRODUCTION], SECRETS_INLINE),
        (&[PRODUCTION], SECRETS_EXISTING),
        (&[PRODUCTION], CONVENTIONS),
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

/// Secret values given to the chart inline, each a sentinel that must end in a Secret only.
const SECRETS_INLINE: &str = r#"{
  "api": {"existingSecret": "", "key": "dp_sentinel_api_key"},
  "kafka": {
    "properties": {
      "sasl.password": "sentinel-sasl-password",
      "sasl.username": "sentinel-sasl-user",
      "ssl.key.password": "sentinel-key-passphrase",
      "sasl.oauthbearer.config": "principal=sentinel-oidc-config"
    },
    "tls": {
      "ca": "-----BEGIN CERTIFICATE-----\nsentinel-ca\n-----END CERTIFICATE-----\n",
      "cert": "-----BEGIN CERTIFICATE-----\nsentinel-cert\n-----END CERTIFICATE-----\n",
      "key": "-----BEGIN PRIVATE KEY-----\nsentinel-private-key\n-----END PRIVATE KEY-----\n"
    }
  },
  "redis": {"username": "bridge", "url": "redis://redis.redis.svc:6380/2?protocol=resp3#primary"}
}"#;

/// The same secrets kept in the user's own Secrets.
const SECRETS_EXISTING: &str = r#"{
  "kafka": {
    "existingSecret": "kafka-client",
    "existingSecretPropertiesKey": "sasl.properties",
    "tls": {"existingSecret": "kafka-client-tls", "caKey": "ca.crt", "certKey": "tls.crt", "keyKey": "tls.key"}
  },
  "redis": {"username": "bridge"}
}"#;

/// The chart's Kubernetes conventions, all set.
const CONVENTIONS: &str = r#"{
  "commonLabels": {"team": "payments", "app.kubernetes.io/name": "not-the-selector"},
  "commonAnnotations": {"owner": "payments@example.com"},
  "priorityClassName": "data-plane",
  "service": {"annotations": {"service.example.com/scrape": "true"}},
  "envFrom": [{"secretRef": {"name": "proxy-settings"}}, {"configMapRef": {"name": "bridge-extra"}}],
  "extraVolumes": [{"name": "corp-ca", "configMap": {"name": "corp-ca-bundle"}}],
  "extraVolumeMounts": [{"name": "corp-ca", "mountPath": "/etc/ssl/corp", "readOnly": true}]
}"#;

/// Secret material given inline lands in the chart's Secrets, mounted where the configuration
/// reads it: SASL and other secret librdkafka properties as the `kafka.properties_file`, TLS as
/// files behind `ssl.*.location`. `check` accepts the result and prints no secret.
#[test]
fn inline_kafka_secrets_render_into_secrets_mounted_as_files() {
    let docs = helm_template(&[PRODUCTION], &[SECRETS_INLINE]).expect("renders");
    let toml: toml::Value = toml::from_str(&config_toml(&docs)).unwrap();
    let k = &toml["kafka"];

    // The properties file: the chart's Secret, holding exactly the secret properties.
    let path = k["properties_file"].as_str().expect("kafka.properties_file set");
    let (secret, item) = secret_file_at(&docs, path);
    assert_eq!(secret, "datapulse-bridge-kafka");
    let secret = manifests(&docs, "Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "datapulse-bridge-kafka")
        .expect("the chart creates the Kafka properties Secret");
    let file = secret_item(secret, &item);
    let mut lines: Vec<&str> = file.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "sasl.oauthbearer.config=principal=sentinel-oidc-config",
            "sasl.password=sentinel-sasl-password",
            "sasl.username=sentinel-sasl-user",
            "ssl.key.password=sentinel-key-passphrase",
        ]
    );
    // The others stay in the ConfigMap, and none of the secret ones.
    let props = k["properties"].as_table().unwrap();
    assert_eq!(props["security.protocol"].as_str(), Some("SASL_SSL"));
    for key in [
        "sasl.password",
        "sasl.username",
        "ssl.key.password",
        "sasl.oauthbearer.config",
    ] {
        assert!(!props.contains_key(key), "{key} in the ConfigMap");
    }

    // TLS: each location is the chart's TLS Secret's item of that name.
    let tls = manifests(&docs, "Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "datapulse-bridge-kafka-tls")
        .expect("the chart creates the TLS Secret");
    for (prop, item, pem) in [
        ("ssl.ca.location", "ca.crt", "sentinel-ca"),
        ("ssl.certificate.location", "tls.crt", "sentinel-cert"),
        ("ssl.key.location", "tls.key", "sentinel-private-key"),
    ] {
        let at = props[prop].as_str().unwrap_or_else(|| panic!("{prop} not set"));
        assert_eq!(
            secret_file_at(&docs, at),
            ("datapulse-bridge-kafka-tls".to_string(), item.to_string())
        );
        assert!(secret_item(tls, item).contains(pem));
    }

    // A change to the chart's Secrets rolls the pods.
    let annotations = &manifest(&docs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"];
    assert!(annotations["checksum/secret"].is_string());

    let checked = check_rendered(&docs);
    assert!(checked.ok, "check refused:\n{}", checked.stderr);
    for sentinel in [
        "sentinel-sasl-password",
        "sentinel-sasl-user",
        "sentinel-oidc",
        "sentinel-key-passphrase",
    ] {
        assert!(!checked.stdout.contains(sentinel), "check printed {sentinel}");
    }
}

/// SASL credentials and TLS material from the user's own Secrets: nothing secret rendered at all,
/// the named items mounted where the configuration reads them.
#[test]
fn kafka_secrets_from_existing_secrets() {
    let docs = helm_template(&[PRODUCTION], &[SECRETS_EXISTING]).expect("renders");
    assert!(manifests(&docs, "Secret").is_empty(), "the chart creates no Secret");
    let toml: toml::Value = toml::from_str(&config_toml(&docs)).unwrap();
    let path = toml["kafka"]["properties_file"]
        .as_str()
        .expect("kafka.properties_file set");
    assert_eq!(
        secret_file_at(&docs, path),
        ("kafka-client".to_string(), "sasl.properties".to_string())
    );
    let props = toml["kafka"]["properties"].as_table().unwrap();
    for (prop, item) in [
        ("ssl.ca.location", "ca.crt"),
        ("ssl.certificate.location", "tls.crt"),
        ("ssl.key.location", "tls.key"),
    ] {
        let at = props[prop].as_str().unwrap_or_else(|| panic!("{prop} not set"));
        assert_eq!(
            secret_file_at(&docs, at),
            ("kafka-client-tls".to_string(), item.to_string())
        );
    }
    // Secrets the chart does not render do not roll the pods (a restart reads them).
    let annotations = &manifest(&docs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"];
    assert!(annotations["checksum/secret"].is_null());

    // The bridge reads the mounted file (here SAMPLE_PROPERTIES) and never prints it.
    let checked = check_rendered(&docs);
    assert!(checked.ok, "check refused:\n{}", checked.stderr);
    assert!(!checked.stdout.contains(SAMPLE_SECRET), "{}", checked.stdout);

    // A CA alone (no client certificate): only ssl.ca.location.
    let docs = helm_template(
        &[],
        &[r#"{"kafka":{"tls":{"existingSecret":"corp-ca","caKey":"bundle.pem"}}}"#],
    )
    .unwrap();
    let toml: toml::Value = toml::from_str(&config_toml(&docs)).unwrap();
    let props = toml["kafka"]["properties"].as_table().unwrap();
    assert_eq!(
        secret_file_at(&docs, props["ssl.ca.location"].as_str().unwrap()),
        ("corp-ca".to_string(), "bundle.pem".to_string())
    );
    assert!(!props.contains_key("ssl.certificate.location") && !props.contains_key("ssl.key.location"));
    assert!(toml["kafka"].get("properties_file").is_none());
}

/// A Redis ACL user and password reach both Redis users: the dedupe store as separate keys, the
/// rate budget inside its URL, which keeps the path, query and fragment given in redis.url.
#[test]
fn redis_username_and_password_reach_the_dedupe_store_and_the_budget() {
    let url = "redis://redis.redis.svc:6380/2?protocol=resp3#primary";
    let set = format!(r#"{{"redis":{{"username":"bridge","url":"{url}"}}}}"#);
    let docs = helm_template(&[PRODUCTION], &[&set]).unwrap();
    let toml: toml::Value = toml::from_str(&config_toml(&docs)).unwrap();
    assert_eq!(toml["dedupe"]["redis"]["username"].as_str(), Some("bridge"));
    assert_eq!(toml["dedupe"]["redis"]["url"].as_str(), Some(url));
    let key = key_file();
    let env = pod_env(&docs, &key);
    let budget = &env
        .iter()
        .find(|(k, _)| k == "DATAPULSE_BRIDGE_DELIVERY__REDIS_URL")
        .unwrap()
        .1;
    assert_eq!(
        budget,
        "redis://bridge:s3cret-sample@redis.redis.svc:6380/2?protocol=resp3#primary"
    );
    assert!(env
        .iter()
        .any(|(k, v)| k == "DATAPULSE_BRIDGE_DEDUPE__REDIS__PASSWORD" && v == SAMPLE_SECRET));
    let checked = check_rendered(&docs);
    assert!(checked.ok, "check refused:\n{}", checked.stderr);
    assert!(!checked.stdout.contains(SAMPLE_SECRET), "{}", checked.stdout);

    // Without a password Secret: the user alone, in the ConfigMap's budget URL.
    let set = format!(r#"{{"redis":{{"username":"bridge","url":"{url}","existingSecret":""}}}}"#);
    let docs = helm_template(&[PRODUCTION], &[&set]).unwrap();
    let toml: toml::Value = toml::from_str(&config_toml(&docs)).unwrap();
    assert_eq!(
        toml["delivery"]["redis_url"].as_str(),
        Some("redis://bridge@redis.redis.svc:6380/2?protocol=resp3#primary")
    );
    let checked = check_rendered(&docs);
    assert!(checked.ok, "check refused:\n{}", checked.stderr);
}

/// Whatever combination of secrets is given, no ConfigMap holds one, and each lands in a Secret
/// (so none was silently dropped either).
#[test]
fn no_secret_value_in_any_configmap() {
    let variants: &[(&[&str], &str, &[&str])] = &[
        (
            &[PRODUCTION],
            SECRETS_INLINE,
            &[
                "dp_sentinel_api_key",
                "sentinel-sasl-password",
                "sentinel-sasl-user",
                "sentinel-key-passphrase",
                "sentinel-oidc-config",
                "sentinel-private-key",
            ],
        ),
        (
            &[],
            r#"{"kafka":{"properties":{"sasl.password":"sentinel-only-sasl","sasl.username":"u","security.protocol":"SASL_PLAINTEXT","sasl.mechanism":"PLAIN"}}}"#,
            &["sentinel-only-sasl"],
        ),
        (
            &[],
            r#"{"kafka":{"properties":{"ssl.keystore.password":"sentinel-keystore"},"tls":{"key":"-----BEGIN PRIVATE KEY-----\nsentinel-tls-key\n-----END PRIVATE KEY-----\n","cert":"-----BEGIN CERTIFICATE-----\nc\n-----END CERTIFICATE-----\n"}}}"#,
            &["sentinel-keystore", "sentinel-tls-key"],
        ),
        (
            &[],
            r#"{"api":{"key":"dp_sentinel_trial"},"kafka":{"properties":{"sasl.oauthbearer.client.secret":"sentinel-client-secret","sasl.oauthbearer.token.endpoint.url":"https://idp.example/token"}}}"#,
            &["dp_sentinel_trial", "sentinel-client-secret"],
        ),
    ];
    for (files, set, sentinels) in variants {
        let docs = helm_template(files, &[set]).unwrap_or_else(|e| panic!("{set}: {e}"));
        let in_configmaps: String = manifests(&docs, "ConfigMap")
            .iter()
            .map(|c| serde_norway::to_string(c).unwrap())
            .collect();
        // Secrets decoded; every other object (the StatefulSet's env, annotations...) as rendered.
        let mut in_secrets = String::new();
        let mut elsewhere = String::new();
        for d in &docs {
            if d["kind"] == "Secret" {
                for (k, _) in d["data"].as_mapping().unwrap() {
                    in_secrets.push_str(&secret_item(d, k.as_str().unwrap()));
                }
            } else if d["kind"] != "ConfigMap" {
                elsewhere.push_str(&serde_norway::to_string(d).unwrap());
            }
        }
        for s in *sentinels {
            assert!(!in_configmaps.contains(s), "{s} is in a ConfigMap ({set})");
            assert!(!elsewhere.contains(s), "{s} is in a non-Secret object ({set})");
            assert!(in_secrets.contains(s), "{s} went nowhere ({set})");
        }
    }
}

/// commonLabels/commonAnnotations on every object, without touching the selector; priorityClassName,
/// Service annotations, envFrom and extra volumes where Kubernetes reads them.
#[test]
fn kubernetes_conventions_render() {
    let docs = helm_template(&[PRODUCTION], &[CONVENTIONS]).unwrap();
    assert!(docs.len() >= 8, "{} objects", docs.len());
    for d in &docs {
        let what = format!(
            "{} {}",
            d["kind"].as_str().unwrap(),
            d["metadata"]["name"].as_str().unwrap()
        );
        assert_eq!(d["metadata"]["labels"]["team"], "payments", "{what}");
        assert_eq!(d["metadata"]["annotations"]["owner"], "payments@example.com", "{what}");
        // The chart's own labels win: a commonLabel cannot rename the workload.
        assert_ne!(
            d["metadata"]["labels"]["app.kubernetes.io/name"], "not-the-selector",
            "{what}"
        );
    }
    let sts = manifest(&docs, "StatefulSet");
    let pod = &sts["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["team"], "payments");
    for (k, v) in sts["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(
            &pod["metadata"]["labels"][k], v,
            "the pods keep the selector label {k:?}"
        );
    }
    assert_eq!(pod["spec"]["priorityClassName"], "data-plane");
    let svc = manifest(&docs, "Service");
    assert_eq!(svc["metadata"]["annotations"]["service.example.com/scrape"], "true");
    assert_eq!(svc["spec"]["selector"], sts["spec"]["selector"]["matchLabels"]);
    let c = container(&docs);
    assert_eq!(c["envFrom"][0]["secretRef"]["name"], "proxy-settings");
    assert_eq!(c["envFrom"][1]["configMapRef"]["name"], "bridge-extra");
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "corp-ca")
        .unwrap();
    assert_eq!(mount["mountPath"], "/etc/ssl/corp");
    let vol = pod["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "corp-ca")
        .unwrap();
    assert_eq!(vol["configMap"]["name"], "corp-ca-bundle");
    // The chart's own mounts are still there.
    for name in ["config", "api-key", "tmp"] {
        assert!(c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|m| m["name"] == name));
    }

    // Defaults: no priority class, no stray annotations.
    let docs = helm_template(&[], &[]).unwrap();
    assert!(manifest(&docs, "StatefulSet")["spec"]["template"]["spec"]["priorityClassName"].is_null());
    assert!(manifest(&docs, "ConfigMap")["metadata"]["annotations"].is_null());
}

/// The `helm test` hook: a Pod (hook annotation) that is no bridge to the Service, and whose
/// script, run here with stand-ins for wget and sleep, asks each pod's /health/live on the ops
/// port and fails when one does not answer.
#[test]
fn helm_test_hook_checks_each_pods_ops_port() {
    fn hook(docs: &[Value]) -> &Value {
        manifests(docs, "Pod")
            .into_iter()
            .find(|p| p["metadata"]["annotations"]["helm.sh/hook"] == "test")
            .expect("a helm test Pod")
    }
    /// Runs the hook's script with a wget that logs its URL and answers `ok`; returns (success,
    /// output, URLs asked).
    fn run(pod: &Value, ok: bool) -> (bool, String, Vec<String>) {
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["command"][0], "/bin/sh");
        let script = c["args"][0].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("urls");
        let stub = |name: &str, body: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        };
        stub(
            "wget",
            format!(
                "for a; do url=$a; done; echo \"$url\" >> {}; exit {}",
                log.display(),
                if ok { 0 } else { 1 }
            ),
        );
        stub("sleep", "exit 0".into());
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", script])
            .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
            .output()
            .unwrap();
        let urls = std::fs::read_to_string(&log).unwrap_or_default();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            urls.lines().map(String::from).collect(),
        )
    }

    let docs = helm_template(
        &[PRODUCTION],
        &[r#"{"autoscaling":{"enabled":false},"replicaCount":3,"telemetry":{"port":9191}}"#],
    )
    .unwrap();
    let pod = hook(&docs);
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    // Not selected by the Service (nor the PDB, nor the ServiceMonitor: same selector).
    let selector = manifest(&docs, "Service")["spec"]["selector"].as_mapping().unwrap();
    assert!(
        selector.iter().any(|(k, v)| &pod["metadata"]["labels"][k] != v),
        "the test Pod carries the Service's selector labels"
    );
    let (ok, out, urls) = run(pod, true);
    assert!(ok, "{out}");
    assert_eq!(
        urls,
        (0..3)
            .map(|i| format!("http://datapulse-bridge-{i}.datapulse-bridge.default.svc:9191/health/live"))
            .collect::<Vec<_>>()
    );
    // A pod that never answers fails the test, after 12 tries.
    let (ok, out, urls) = run(pod, false);
    assert!(!ok && out.contains("FAIL"), "{out}");
    assert_eq!(urls.len(), 12);

    // Autoscaled: the pods that surely exist are minReplicas.
    let docs = helm_template(&[PRODUCTION], &[]).unwrap();
    let (ok, _, urls) = run(hook(&docs), true);
    assert!(ok);
    assert_eq!(urls.len(), 2, "{urls:?}");

    // No pod, no test.
    let docs = helm_template(&[], &[r#"{"replicaCount":0}"#]).unwrap();
    assert!(manifests(&docs, "Pod").is_empty());
}

/// The alerts of files/alerts.yaml, each with a runbook_url under the configured base, and the
/// scrape job the chart's ServiceMonitor produces.
#[test]
fn prometheus_rule_links_runbooks_and_watches_its_scrape_job() {
    let file: Value = serde_norway::from_str(&read("helm/datapulse-bridge/files/alerts.yaml")).unwrap();
    let base = "https://runbooks.example.com/datapulse-bridge/operations";
    let set = format!(r#"{{"metrics":{{"prometheusRule":{{"runbookBaseUrl":"{base}"}}}},"nameOverride":"dpb"}}"#);
    let docs = helm_template(&[PRODUCTION], &[&set]).unwrap();
    let rule = manifest(&docs, "PrometheusRule");
    let mut spec = rule["spec"].clone();
    let mut n = 0;
    for g in spec["groups"].as_sequence_mut().unwrap() {
        for r in g["rules"].as_sequence_mut().unwrap() {
            let name = r["alert"].as_str().unwrap().to_lowercase();
            let a = r["annotations"].as_mapping_mut().unwrap();
            let url = a.remove("runbook_url").expect("runbook_url");
            assert_eq!(url.as_str().unwrap(), format!("{base}#{name}"));
            n += 1;
        }
    }
    assert!(n >= 9);
    // With nameOverride the ServiceMonitor's job (app.kubernetes.io/name) is "dpb", and the
    // target-down rule follows it; otherwise the rules are the file's.
    let sm = manifest(&docs, "ServiceMonitor");
    assert_eq!(sm["spec"]["jobLabel"], "app.kubernetes.io/name");
    assert_eq!(
        manifest(&docs, "Service")["metadata"]["labels"]["app.kubernetes.io/name"],
        "dpb"
    );
    let rendered = serde_norway::to_string(&spec).unwrap();
    assert!(rendered.contains(r#"up{job="dpb"}"#), "{rendered}");
    let back: Value =
        serde_norway::from_str(&rendered.replace(r#"up{job="dpb"}"#, r#"up{job="datapulse-bridge"}"#)).unwrap();
    assert_eq!(back, file);

    // An empty base: no runbook_url.
    let docs = helm_template(
        &[PRODUCTION],
        &[r#"{"metrics":{"prometheusRule":{"runbookBaseUrl":""}}}"#],
    )
    .unwrap();
    assert!(!serde_norway::to_string(manifest(&docs, "PrometheusRule"))
        .unwrap()
        .contains("runbook_url"));
}

/// The chart's README documents every value of values.yaml, with its default: leaves of the
/// values, walked along values.schema.json (a map the schema gives no fixed keys is one value).
/// A default too long for a table cell is written `see values.yaml`.
#[test]
fn chart_readme_documents_every_value() {
    fn walk(prefix: &str, v: &Value, schema: &serde_json::Value, out: &mut Vec<(String, Value)>) {
        match v.as_mapping() {
            Some(m) if !m.is_empty() && schema["properties"].is_object() => {
                for (k, v) in m {
                    let k = k.as_str().unwrap();
                    let p = if prefix.is_empty() {
                        k.to_string()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    assert!(schema["properties"][k].is_object(), "{p} is not in values.schema.json");
                    walk(&p, v, &schema["properties"][k], out);
                }
            }
            _ => out.push((prefix.to_string(), v.clone())),
        }
    }
    let values: Value = serde_norway::from_str(&read("helm/datapulse-bridge/values.yaml")).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&read("helm/datapulse-bridge/values.schema.json")).unwrap();
    let mut leaves = Vec::new();
    walk("", &values, &schema, &mut leaves);

    let readme = read("helm/datapulse-bridge/README.md");
    let row = regex::Regex::new(r"(?m)^\| `([A-Za-z0-9_.]+)` \| (`(.*)`|see values\.yaml) \| (.+) \|$").unwrap();
    let mut documented = std::collections::BTreeMap::new();
    for c in row.captures_iter(&readme) {
        let default = c.get(3).map(|m| m.as_str().to_string());
        assert!(c[4].trim().len() > 5, "{} has no description", &c[1]);
        assert!(
            documented.insert(c[1].to_string(), default).is_none(),
            "{} documented twice",
            &c[1]
        );
    }
    for (path, value) in &leaves {
        let doc = documented
            .remove(path)
            .unwrap_or_else(|| panic!("helm/datapulse-bridge/README.md does not document `{path}`"));
        let json = serde_json::to_string(&serde_json::to_value(value).unwrap()).unwrap();
        match doc {
            Some(d) => assert_eq!(
                serde_json::from_str::<serde_json::Value>(&d).unwrap_or_else(|e| panic!("{path}: default {d}: {e}")),
                serde_json::to_value(value).unwrap(),
                "README's default of {path}"
            ),
            None => assert!(json.len() > 60, "{path}: write its default ({json}) in the README"),
        }
    }
    assert!(
        documented.is_empty(),
        "README documents values that do not exist: {documented:?}"
    );
    assert!(
        leaves.len() > 90,
        "only {} values found: did the walk break?",
        leaves.len()
    );
}

/// The chart's copy of librdkafka's sensitive properties (`isSecretProperty` in `_helpers.tpl`)
/// is the bridge's list (`source::LIBRDKAFKA_SENSITIVE`, itself checked against librdkafka's
/// source), so what the bridge redacts never lands in a ConfigMap.
#[test]
fn the_charts_sensitive_properties_are_the_bridges() {
    let helpers = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/datapulse-bridge/templates/_helpers.tpl"),
    )
    .unwrap();
    let line = helpers
        .lines()
        .find(|l| l.contains("$sensitive := list"))
        .expect("the chart lists librdkafka's sensitive properties");
    let mut chart: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
    chart.sort_unstable();
    let mut bridge = datapulse_bridge::source::LIBRDKAFKA_SENSITIVE.to_vec();
    bridge.sort_unstable();
    assert_eq!(chart, bridge);
}

/// Values written for an earlier chart keep working: `dedupe.inDoubt` decides `on_ambiguous`
/// (`resend` stays `resend`, `dead-letter` is `in-doubt`), and the bridge accepts the result.
#[test]
fn the_former_in_doubt_value_decides_on_ambiguous() {
    for (former, now) in [("resend", "resend"), ("dead-letter", "in-doubt"), ("", "in-doubt")] {
        let set = format!(r#"{{"dedupe":{{"inDoubt":"{former}"}}}}"#);
        let docs = helm_template(&[], &[&set]).unwrap_or_else(|e| panic!("{set}: {e}"));
        let toml: toml::Value = toml::from_str(&config_toml(&docs)).unwrap();
        assert_eq!(toml["delivery"]["on_ambiguous"].as_str(), Some(now), "{set}");
        assert!(
            toml["dedupe"].get("redis").and_then(|r| r.get("in_doubt")).is_none(),
            "{set}"
        );
        let checked = check_rendered(&docs);
        assert!(checked.ok, "{set}: check refused:\n{}", checked.stderr);
    }
}
