//! Every metric the Grafana dashboard queries and the README documents is one the code
//! exports: the names come from a running server's `/metrics`, from the
//! `registry.register("…")` calls in `src/` (metrics that appear only after first use), and
//! from the LiveKit egress metrics of DESIGN.md 2.2.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The LiveKit egress series (DESIGN.md 2.2), served by the egress pods themselves.
const LIVEKIT_METRICS: [&str; 7] = [
    "livekit_egress_available",
    "livekit_egress_can_accept_request",
    "livekit_egress_requests",
    "livekit_egress_is_terminating",
    "livekit_egress_is_disabled",
    "livekit_node_cpu_load",
    "livekit_load_ratio",
];

/// The exported metric families, each under the name PromQL uses for it: counters with
/// `_total`, histograms by their base name (queries add `_bucket`, `_sum`, `_count`).
#[derive(Debug)]
struct Exported {
    /// Families seen on `/metrics`, with their type.
    families: BTreeSet<(String, String)>,
    /// Names given to `registry.register` in `src/`, whatever their type.
    registered: BTreeSet<String>,
}

impl Exported {
    async fn collect() -> Exported {
        let redis = support::redis();
        let server =
            support::TestServer::start(support::config(&redis, &[], &support::NoEnvironment)).await;
        let text = support::http_client()
            .get(server.http("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        server.stop().await;
        let families = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .map(|rest| {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                (name.to_owned(), kind.to_owned())
            })
            .collect();
        let mut registered = BTreeSet::new();
        for file in rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src")) {
            let source = std::fs::read_to_string(&file).unwrap();
            for after in source.split(".register(").skip(1) {
                let literal = after.trim_start();
                if let Some(rest) = literal.strip_prefix('"') {
                    registered.insert(rest.split('"').next().unwrap().to_owned());
                }
            }
        }
        Exported {
            families,
            registered,
        }
    }

    /// The names a query or the README may use for the `egress_scaler_` families.
    fn query_names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (name, kind) in &self.families {
            match kind.as_str() {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["", "_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.clone());
                }
            }
        }
        for name in &self.registered {
            for suffix in ["", "_total", "_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names
    }

    /// Whether `name` (as written in a query or the README) is exported or read.
    fn knows(&self, name: &str) -> bool {
        LIVEKIT_METRICS.contains(&name) || self.query_names().contains(name)
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files
}

/// The metric names in a PromQL expression: identifiers with one of the two prefixes.
fn metric_names(expression: &str) -> Vec<String> {
    expression
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("egress_scaler_") || word.starts_with("livekit_"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_dashboard_query_names_an_exported_metric() {
    let exported = Exported::collect().await;
    // Families without a sample yet are not on /metrics: the registered names cover them.
    assert!(!exported.families.is_empty(), "{exported:?}");
    assert!(
        exported.registered.contains("egress_scaler_queue_depth"),
        "{exported:?}"
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/egress-scaler.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();

    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expression = target["expr"].as_str().unwrap();
            let names = metric_names(expression);
            assert!(
                !names.is_empty(),
                "panel {title:?}: {expression} names no metric"
            );
            for name in names {
                assert!(
                    exported.knows(&name),
                    "panel {title:?} queries {name}, which the code does not export"
                );
                queried.insert(name);
            }
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            for name in metric_names(query) {
                assert!(exported.knows(&name), "variable query names {name}");
            }
        }
    }
    // The panels the issue asks for are there.
    for name in [
        "egress_scaler_queue_depth",
        "egress_scaler_queue_oldest_age_seconds",
        "egress_scaler_desired_replicas",
        "egress_scaler_fleet_pods",
        "livekit_egress_requests",
    ] {
        assert!(queried.contains(name), "no panel shows {name}");
    }
}

#[tokio::test]
async fn the_readme_documents_every_exported_metric_and_no_other() {
    let exported = Exported::collect().await;
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("README has a Metrics section");
    let section = section.split("\n## ").next().unwrap();
    let documented: BTreeSet<String> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .map(|rest| rest.split('`').next().unwrap().to_owned())
        .collect();
    for name in &documented {
        assert!(
            exported.knows(name),
            "the README documents {name}, which the code does not export"
        );
    }
    for (name, kind) in &exported.families {
        let documented_as = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.clone()
        };
        assert!(
            documented.contains(&documented_as),
            "{documented_as} is exported but not in the README's Metrics section"
        );
    }
    for name in &exported.registered {
        assert!(
            documented.contains(name) || documented.contains(&format!("{name}_total")),
            "{name} is registered in src/ but not in the README's Metrics section"
        );
    }
}
