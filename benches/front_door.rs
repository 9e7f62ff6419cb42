//! The Twirp front door: what it adds to a start, and what held starts cost.
//!
//! 1. Added latency with a free pod: the same `StartRoomCompositeEgress` (Twirp JSON, one
//!    client, one call at a time) sent straight to the livekit-server stand-in, and through
//!    egress-scaler (queue, dispatcher, the start, the held call woken, `ListEgress` by id),
//!    p50 and p99 side by side. The stand-in's timing is scaled to zero (no launch, no bid
//!    window), so both columns are overhead; after each sample the egress ends and the fleet
//!    is refreshed (every 50 ms) before the next, so that a pod is always free.
//! 2. Memory of held starts: the resident set of the `egress-scaler serve` process with no pod
//!    at all, idle and then holding `FRONT_DOOR_BENCH_HELD` concurrent starts (default 1,000;
//!    each a different room, each its own connection).
//!
//! `cargo bench --bench front_door` (needs `redis-server`; env `FRONT_DOOR_BENCH_SAMPLES`,
//! default 300). Goals: at most 20 ms more at p99; 1,000 held starts within 50 MB.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use egress_scaler::redis_server::RedisServer;
use egress_scaler::standin::{
    EgressPodStandIn, LiveKitServerStandIn, LiveKitStandInOptions, StartTiming,
};
use livekit_api::access_token::{AccessToken, VideoGrants};
use serde_json::{Value, json};

const KEY: &str = "bench-key";
const SECRET: &str = "bench-secret-bench-secret-bench-0";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn token() -> String {
    AccessToken::with_api_key(KEY, SECRET)
        .with_ttl(Duration::from_secs(3600))
        .with_grants(VideoGrants {
            room_record: true,
            ..Default::default()
        })
        .to_jwt()
        .expect("token")
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
}

/// `egress-scaler serve` as its own process, killed on drop.
struct Served {
    child: Child,
    http: SocketAddr,
}

impl Served {
    fn start(
        redis: &RedisServer,
        livekit: &LiveKitServerStandIn,
        metrics: &[String],
        hold: &str,
    ) -> Served {
        let http = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_egress-scaler"))
            .args(["serve", "--redis-url", &redis.url()])
            .args(["--http-listen", &http.to_string()])
            .args(["--grpc-listen", &free_port().to_string()])
            .args(["--livekit-url", &livekit.url()])
            .args(["--egress-metrics", &metrics.join(",")])
            .args(["--fleet-refresh-seconds", "0.05"])
            .args(["--fleet-start-grace-seconds", "3600"])
            .args(["--hold-seconds", hold])
            .env_clear()
            .env("LIVEKIT_API_KEY", KEY)
            .env("LIVEKIT_API_SECRET", SECRET)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("egress-scaler starts");
        Served { child, http }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Resident set and its peak, MiB, from /proc.
    fn rss(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/<pid>/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .map_or(0.0, |kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    async fn ready(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(answer) = client.get(self.url("/readyz")).send().await
                && answer.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("egress-scaler did not become ready");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn standin(pods: Vec<EgressPodStandIn>) -> LiveKitServerStandIn {
    LiveKitServerStandIn::start(
        LiveKitStandInOptions {
            api_key: KEY.to_owned(),
            api_secret: SECRET.to_owned(),
            timing: StartTiming::scaled(0.0),
            no_capacity_delay: Duration::from_secs(60),
            any_room_exists: true,
            ..LiveKitStandInOptions::default()
        },
        pods,
    )
    .await
    .expect("stand-in starts")
}

async fn start(client: &reqwest::Client, base: &str, token: &str, room: &str) -> (u16, Value) {
    let answer = client
        .post(format!(
            "{base}/twirp/livekit.Egress/StartRoomCompositeEgress"
        ))
        .bearer_auth(token)
        .json(&json!({
            "roomName": room,
            "layout": "speaker",
            "fileOutputs": [{"filepath": format!("/out/{room}.mp4")}],
        }))
        .send()
        .await
        .expect("start call");
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

async fn latency(samples: usize) -> (Vec<Duration>, Vec<Duration>) {
    let redis = RedisServer::start().expect("redis-server starts");
    let pod = EgressPodStandIn::start().await.expect("pod");
    let livekit = standin(vec![pod.clone()]).await;
    let served = Served::start(&redis, &livekit, &[pod.metrics_url()], "8");
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("client");
    served.ready(&client).await;
    let token = token();
    let (mut direct, mut front) = (Vec::new(), Vec::new());
    // A few of each first, unmeasured: connections, scripts loaded.
    for sample in 0..samples + 10 {
        for (through, base) in [(false, livekit.url()), (true, served.url(""))] {
            let room = format!("r{sample}-{through}");
            let began = Instant::now();
            let (status, body) = start(&client, &base, &token, &room).await;
            let took = began.elapsed();
            assert_eq!(status, 200, "start through {base}: {body}");
            if sample >= 10 {
                if through { &mut front } else { &mut direct }.push(took);
            }
            livekit.end_all();
            // The pod is free again once the fleet has seen it so (refresh every 50 ms): also
            // after a straight start, which the fleet may have seen busy.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    direct.sort();
    front.sort();
    (direct, front)
}

async fn held(count: usize) -> ((f64, f64), (f64, f64), Duration) {
    let redis = RedisServer::start().expect("redis-server starts");
    // A pod the fleet lists that never comes up: no capacity at all.
    let pod = EgressPodStandIn::start().await.expect("pod");
    pod.go_down().await;
    let livekit = standin(Vec::new()).await;
    let served = Served::start(&redis, &livekit, &[pod.metrics_url()], "600");
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(count)
        .build()
        .expect("client");
    served.ready(&client).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = served.rss();
    let token = token();
    let base = served.url("");
    let mut calls = tokio::task::JoinSet::new();
    let began = Instant::now();
    for n in 0..count {
        let (client, base, token) = (client.clone(), base.clone(), token.clone());
        calls.spawn(async move { start(&client, &base, &token, &format!("held-{n}")).await });
    }
    let status_of = || async {
        let status: Value = client
            .get(served.url("/v1/status"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("status JSON");
        status["queues"][0]["depth"].as_u64().unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while status_of().await < count as u64 {
        assert!(
            Instant::now() < deadline,
            "the held starts were not all queued"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let queued_in = began.elapsed();
    // Let the held calls settle into their wait (and a fallback round or two pass).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(calls.len(), count, "held calls were answered early");
    let holding = served.rss();
    calls.abort_all();
    (idle, holding, queued_in)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let samples = env_number("FRONT_DOOR_BENCH_SAMPLES", 300).clamp(10, 100_000);
    let count = env_number("FRONT_DOOR_BENCH_HELD", 1000).clamp(1, 10_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (direct, front) = runtime.block_on(latency(samples));
    println!("StartRoomCompositeEgress with a free pod, {samples} sequential calls (Twirp JSON):");
    println!("| path | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (name, values) in [
        ("straight to the stand-in", &direct),
        ("through egress-scaler", &front),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(percentile(values, 0.50)),
            ms(percentile(values, 0.90)),
            ms(percentile(values, 0.99)),
            ms(*values.last().expect("samples"))
        );
    }
    let added = |p| percentile(&front, p).saturating_sub(percentile(&direct, p));
    println!(
        "| added by the front door | {} | {} | {} | |",
        ms(added(0.50)),
        ms(added(0.90)),
        ms(added(0.99))
    );
    println!();
    let (idle, holding, queued_in) = runtime.block_on(held(count));
    println!("egress-scaler serve resident memory (no egress pod):");
    println!("| state | RSS | peak RSS |");
    println!("|---|---|---|");
    println!("| idle | {:.1} MB | {:.1} MB |", idle.0, idle.1);
    println!(
        "| {count} concurrent held starts (queued in {:.2} s) | {:.1} MB | {:.1} MB |",
        queued_in.as_secs_f64(),
        holding.0,
        holding.1
    );
    println!(
        "| added by the held starts | {:.1} MB | |",
        holding.0 - idle.0
    );
}
