//! The operator files agree with the code: the ScaledObjects talk to the gRPC Service with
//! metadata `serve` understands, the Deployment sets only settings `serve` reads, the
//! numbers that must match (pod CPU, ports, replica ceilings) match, and the Dockerfile
//! builds a static non-root image. `scripts/validate-manifests` checks the schemas.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use egress_scaler::kube::ScaledObject;
use egress_scaler::model::Settings;
use egress_scaler::queue::QueueName;
use egress_scaler::scaler::{METADATA_KEYS, parse_metadata};
use egress_scaler::simulate::SimOptions;
use serde::Deserialize;
use serde_json::Value;

/// Keys of the external scalers' metadata that KEDA itself reads.
const KEDA_METADATA_KEYS: [&str; 6] = [
    "scalerAddress",
    "caCert",
    "tlsClientCert",
    "tlsClientKey",
    "tlsCertFile",
    "unsafeSsl",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every document of a YAML file, as JSON values.
fn documents(relative: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(relative)).expect(relative);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).expect(relative))
        .filter(|value| !value.is_null())
        .collect()
}

/// Every document of every YAML file of a directory, with its file.
fn directory(relative: &str) -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(relative))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|path| {
            let relative = path
                .strip_prefix(root())
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            documents(&relative)
                .into_iter()
                .map(move |document| (relative.clone(), document))
        })
        .collect()
}

fn named<'a>(documents: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .map(|(_, document)| document)
        .find(|document| document["kind"] == kind && document["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

/// The environment of a Deployment's first container: name -> literal value (or "" when it
/// comes from a Secret).
fn container_env(deployment: &Value) -> HashMap<String, String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|variable| {
            (
                str_at(variable, "/name").to_owned(),
                variable["value"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn container_port(deployment: &Value, name: &str) -> u64 {
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|port| port["name"] == name)
        .and_then(|port| port["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port {name}"))
}

/// The environment variables `serve --help` lists.
fn serve_env_variables() -> BTreeSet<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_egress-scaler"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    help.split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap().to_owned())
        .collect()
}

fn namespace(kustomization: &str) -> String {
    str_at(&documents(kustomization)[0], "/namespace").to_owned()
}

#[test]
fn the_scaled_objects_reach_the_grpc_service_with_metadata_serve_understands() {
    let deploy = directory("deploy");
    let keda = directory("keda");
    let namespace = namespace("deploy/kustomization.yaml");
    assert_eq!(namespace, self::namespace("keda/kustomization.yaml"));

    let scaler = named(&deploy, "Deployment", "egress-scaler");
    let env = container_env(scaler);
    let grpc_port = container_port(scaler, "grpc");
    let listen = env
        .get("EGRESS_SCALER_GRPC_LISTEN")
        .cloned()
        .unwrap_or_else(|| "0.0.0.0:9090".to_owned());
    assert!(
        listen.ends_with(&format!(":{grpc_port}")),
        "the container port grpc ({grpc_port}) is not where serve listens ({listen})"
    );
    let service = named(&deploy, "Service", "egress-scaler-grpc");
    let service_port = service["spec"]["ports"][0].clone();
    assert_eq!(service_port["targetPort"], "grpc");
    let address = format!(
        "egress-scaler-grpc.{namespace}.svc.cluster.local:{}",
        service_port["port"]
    );

    let scaled_objects: Vec<(&String, &Value)> = keda
        .iter()
        .filter(|(_, document)| document["kind"] == "ScaledObject")
        .map(|(file, document)| (file, document))
        .collect();
    assert_eq!(scaled_objects.len(), 2, "the push and the pull variant");
    let mut trigger_types = BTreeSet::new();
    let max_replicas: u64 = env["EGRESS_SCALER_MAX_REPLICAS"].parse().unwrap();
    for (file, scaled_object) in scaled_objects {
        let spec = &scaled_object["spec"];
        assert_eq!(spec["minReplicaCount"], 0, "{file}: scales from zero");
        assert!(
            spec["maxReplicaCount"].as_u64().unwrap() <= max_replicas,
            "{file}: maxReplicaCount above serve's --max-replicas"
        );
        assert!(spec["fallback"]["replicas"].as_u64().is_some(), "{file}");
        let behavior = &spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"];
        assert_eq!(behavior["scaleUp"]["tolerance"], 0, "{file}: DESIGN 2.4");

        let triggers = spec["triggers"].as_array().unwrap();
        assert_eq!(triggers.len(), 1, "{file}");
        let trigger = &triggers[0];
        trigger_types.insert(str_at(trigger, "/type").to_owned());
        assert_eq!(trigger["metricType"], "AverageValue", "{file}");
        let metadata: HashMap<String, String> =
            serde_json::from_value(trigger["metadata"].clone()).unwrap();
        assert_eq!(metadata["scalerAddress"], address, "{file}");
        for key in metadata.keys() {
            assert!(
                METADATA_KEYS.contains(&key.as_str()) || KEDA_METADATA_KEYS.contains(&key.as_str()),
                "{file}: serve does not read the metadata key {key:?}"
            );
        }
        let target = parse_metadata(
            &metadata,
            &"default".parse::<QueueName>().unwrap(),
            &Settings::default(),
        )
        .unwrap_or_else(|error| panic!("{file}: {error}"));
        assert_eq!(target.queue.as_str(), "default");

        // mTLS: the authentication names the Secret of KEDA's client certificate, and the
        // server certificate covers the address KEDA dials.
        let auth = named(
            &keda,
            "TriggerAuthentication",
            str_at(trigger, "/authenticationRef/name"),
        );
        let parameters: BTreeSet<&str> = auth["spec"]["secretTargetRef"]
            .as_array()
            .unwrap()
            .iter()
            .map(|reference| str_at(reference, "/parameter"))
            .collect();
        assert_eq!(
            parameters,
            BTreeSet::from(["caCert", "tlsClientCert", "tlsClientKey"])
        );
        let client_secret = str_at(auth, "/spec/secretTargetRef/0/name");
        let client_certificate = deploy
            .iter()
            .map(|(_, document)| document)
            .find(|document| {
                document["kind"] == "Certificate" && document["spec"]["secretName"] == client_secret
            })
            .expect("a Certificate issues KEDA's client Secret");
        assert!(
            client_certificate["spec"]["usages"]
                .as_array()
                .unwrap()
                .contains(&Value::from("client auth"))
        );
        let server_certificate = named(&deploy, "Certificate", "egress-scaler-grpc");
        let host = address.rsplit_once(':').unwrap().0;
        assert!(
            server_certificate["spec"]["dnsNames"]
                .as_array()
                .unwrap()
                .contains(&Value::from(host)),
            "the server certificate does not name {host}"
        );
        assert_eq!(
            server_certificate["spec"]["issuerRef"], client_certificate["spec"]["issuerRef"],
            "one CA signs both ends, so ca.crt is the client CA of serve"
        );
        let mounted = str_at(scaler, "/spec/template/spec/volumes/0/secret/secretName");
        assert_eq!(mounted, str_at(server_certificate, "/spec/secretName"));
        for variable in [
            "EGRESS_SCALER_TLS_CERT",
            "EGRESS_SCALER_TLS_KEY",
            "EGRESS_SCALER_TLS_CLIENT_CA",
        ] {
            assert!(env.contains_key(variable), "{variable} not set");
        }

        let egress = named(&deploy, "Deployment", str_at(spec, "/scaleTargetRef/name"));
        assert!(
            egress["spec"]["replicas"].is_null(),
            "KEDA owns the egress replica count"
        );
    }
    assert_eq!(
        trigger_types,
        BTreeSet::from(["external".to_owned(), "external-push".to_owned()])
    );
}

#[test]
fn the_egress_scaler_deployment_sets_only_what_serve_reads() {
    let deploy = directory("deploy");
    let scaler = named(&deploy, "Deployment", "egress-scaler");
    let known = serve_env_variables();
    assert!(known.contains("EGRESS_SCALER_TLS_CERT"), "{known:?}");
    let env = container_env(scaler);
    for name in env.keys() {
        let credentials = name == "LIVEKIT_API_KEY" || name == "LIVEKIT_API_SECRET";
        assert!(
            known.contains(name) || credentials || name == "REDIS_URL",
            "serve does not read {name}"
        );
    }
    assert_eq!(scaler["spec"]["replicas"], 2);
    let container = &scaler["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        container_port(scaler, "http"),
        8080,
        "serve's --http-listen default"
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        scaler["spec"]["template"]["spec"]["securityContext"]["runAsUser"],
        65532
    );
    assert!(container["resources"]["limits"]["memory"].is_string());
}

#[test]
fn the_egress_example_matches_the_scaler_settings() {
    let deploy = directory("deploy");
    let scaler_env = container_env(named(&deploy, "Deployment", "egress-scaler"));
    let egress = named(&deploy, "Deployment", "egress");
    let container = &egress["spec"]["template"]["spec"]["containers"][0];

    // --pod-cpu is the egress container's CPU limit (DESIGN 2.1).
    let limit: f64 = str_at(container, "/resources/limits/cpu").parse().unwrap();
    let pod_cpu: f64 = scaler_env["EGRESS_SCALER_POD_CPU"].parse().unwrap();
    assert_eq!(limit, pod_cpu);

    // Recordings finish after SIGTERM: at least an hour of grace (DESIGN 2.1).
    let grace = egress["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(grace >= 3600, "{grace}");

    // The headless Service resolves to the pods' metrics port, which the egress config's
    // prometheus_port serves, and --egress-dns names that Service and port.
    let metrics_port = container_port(egress, "metrics");
    let service = named(&deploy, "Service", "egress-metrics");
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(service["spec"]["publishNotReadyAddresses"], true);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    let namespace = namespace("deploy/kustomization.yaml");
    assert_eq!(
        scaler_env["EGRESS_SCALER_EGRESS_DNS"],
        format!(
            "egress-metrics.{namespace}.svc.cluster.local:{}",
            service["spec"]["ports"][0]["port"]
        )
    );
    assert_eq!(service["spec"]["ports"][0]["port"], metrics_port);
    let secrets = documents("deploy/secret.example.yaml");
    let egress_config = secrets
        .iter()
        .find(|secret| secret["metadata"]["name"] == "egress-config")
        .unwrap();
    let config: Value =
        serde_yaml_ng::from_str(str_at(egress_config, "/stringData/config.yaml")).unwrap();
    assert_eq!(config["prometheus_port"], metrics_port);
    let utilization = config["cpu_cost"]["max_cpu_utilization"].as_f64().unwrap();
    assert_eq!(utilization, Settings::default().max_cpu_utilization);
}

#[test]
fn the_dockerfile_builds_a_static_non_root_image_without_a_shell() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, line)| line.starts_with("FROM "))
        .map(|(index, _)| index)
        .collect();
    assert!(stages.len() >= 2, "multi-stage");
    assert!(
        text.contains("--target x86_64-unknown-linux-musl"),
        "static build"
    );
    let last = &instructions[*stages.last().unwrap()..];
    assert!(
        last[0].contains("distroless/static") || last[0] == "FROM scratch",
        "a final image without a shell: {}",
        last[0]
    );
    assert!(
        !last.iter().any(|line| line.starts_with("RUN ")),
        "the final stage runs nothing (no shell)"
    );
    assert!(last.contains(&"USER 65532:65532"), "non-root");
    assert!(
        last.contains(&r#"ENTRYPOINT ["/usr/local/bin/egress-scaler", "serve"]"#),
        "exec-form entrypoint running serve"
    );
    assert!(Path::new(&root().join(".dockerignore")).is_file());
}

#[test]
fn simulate_plays_the_shipped_scaled_objects() {
    // The simulator's and the demo's defaults are read from keda/scaledobject.yaml itself; the
    // pull variant differs only in its trigger and polling.
    let shipped = ScaledObject::shipped();
    let options = SimOptions::default();
    assert_eq!(options.egress_scaler, shipped);
    assert_eq!(options.ceiling, shipped.keda.max_replicas);
    assert_eq!(options.settings.max_replicas, shipped.keda.max_replicas);
    for (file, push, polling) in [
        ("keda/scaledobject.yaml", true, shipped.keda.polling),
        ("keda/scaledobject-pull.yaml", false, 5_000),
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let read = ScaledObject::from_yaml(&text).unwrap();
        let mut expected = shipped.clone();
        expected.keda.push = push;
        expected.keda.polling = polling;
        assert_eq!(read, expected, "{file}");
    }
}
