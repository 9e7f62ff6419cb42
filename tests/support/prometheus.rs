//! A real Prometheus server per test (Debian's `prometheus`; `scripts/ensure-prometheus`
//! installs it) on a free loopback port, with its own temporary storage and a generated
//! configuration that scrapes the given egress pods every second. Targets are replaced through
//! the lifecycle API's reload. Dropping the server kills the process and removes its directory.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a fresh server may take to answer `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Ports tried before giving up (another process may take a free port first).
const PORT_ATTEMPTS: usize = 3;

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// One scraped egress pod: its `pod` label and its metrics address.
#[derive(Debug, Clone)]
pub struct Target {
    pub pod: String,
    pub addr: SocketAddr,
}

impl Target {
    pub fn new(pod: &str, addr: SocketAddr) -> Self {
        Target {
            pod: pod.to_owned(),
            addr,
        }
    }
}

/// A running `prometheus` child process.
pub struct PrometheusServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    http: reqwest::Client,
}

impl PrometheusServer {
    /// Starts a server scraping `targets` every second; panics with its log when it does not
    /// become ready.
    pub async fn start(targets: &[Target]) -> PrometheusServer {
        super::init();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .expect("client builds");
        let mut failures = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!(
                "egress-scaler-prometheus-{}-{}",
                std::process::id(),
                NEXT_DIR.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("data")).expect("temp dir");
            std::fs::write(dir.join("prometheus.yml"), config(targets)).expect("config written");
            let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
            let child = Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--web.enable-lifecycle")
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log handle"))
                .stderr(log)
                .spawn()
                .expect("prometheus starts (install it with scripts/ensure-prometheus)");
            let mut server = PrometheusServer {
                child,
                port,
                dir,
                http: http.clone(),
            };
            match server.wait_ready().await {
                Ok(()) => return server,
                Err(reason) => {
                    let _ = writeln!(failures, "port {port}: {reason}\n{}", server.log());
                }
            }
        }
        panic!("no Prometheus became ready:\n{failures}");
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}"));
            }
            let ready = self
                .http
                .get(format!("{}/-/ready", self.url()))
                .send()
                .await;
            if matches!(&ready, Ok(answer) if answer.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready within {READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Replaces the scraped targets (a pod deleted, a pod added) and reloads the config.
    pub async fn set_targets(&self, targets: &[Target]) {
        std::fs::write(self.dir.join("prometheus.yml"), config(targets)).expect("config written");
        let answer = self
            .http
            .post(format!("{}/-/reload", self.url()))
            .send()
            .await
            .expect("reload answered");
        assert!(
            answer.status().is_success(),
            "reload refused: {}",
            answer.text().await.unwrap_or_default()
        );
    }

    /// Runs an instant query; the `data.result` array.
    pub async fn query(&self, query: &str) -> Vec<serde_json::Value> {
        let answer: serde_json::Value = self
            .http
            .get(format!("{}/api/v1/query", self.url()))
            .query(&[("query", query)])
            .send()
            .await
            .expect("query answered")
            .json()
            .await
            .expect("JSON answer");
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The configuration: every target its own static group, with the labels a Kubernetes service
/// discovery would add.
fn config(targets: &[Target]) -> String {
    let mut yaml = String::from(concat!(
        "global:\n",
        "  scrape_interval: 1s\n",
        "  scrape_timeout: 1s\n",
        "  evaluation_interval: 1s\n",
        "scrape_configs:\n",
        "  - job_name: egress\n",
        "    static_configs:\n",
    ));
    if targets.is_empty() {
        yaml.push_str("      []\n");
    }
    for target in targets {
        let _ = write!(
            yaml,
            "      - targets: [\"{}\"]\n        labels:\n          pod: \"{}\"\n          namespace: livekit\n",
            target.addr, target.pod
        );
    }
    yaml
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}
