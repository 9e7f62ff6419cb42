//! Benchmarks of the KEDA path and the intake, against the real binary and a real Redis on
//! loopback. Prints one table; run with `cargo bench --bench scaler`.
//!
//! - GetMetrics latency with 100,000 queued tickets, side by side with a Redis PING round trip
//!   (interleaved call by call, so both see the same machine noise): the p99 of each of 5
//!   rounds and the medians of those, with their ratio (goal: within 3x). GetMetrics reads the
//!   demand and the starts since the fleet snapshot in one script.
//! - Enqueue throughput through the HTTP API with de-duplication on (the load generator is
//!   this process, on the same 2-core machine as the server and Redis).
//! - Activation latency: enqueue -> `StreamIsActive` sends true.
//! - GetMetrics while the fleet refreshes: two more servers observe the same 200 stand-in
//!   egress pods, one refreshing every 0.5 s, one that refreshed once; calls alternate.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use egress_scaler::model::EgressKind;
use egress_scaler::queue::{NewRequest, QueueName, QueueStore, StoreOptions};
use egress_scaler::redis_server::RedisServer;
use egress_scaler::scaler::proto::external_scaler_client::ExternalScalerClient;
use egress_scaler::scaler::proto::{GetMetricsRequest, ScaledObjectRef};
use serde_json::json;

const QUEUED: u64 = 100_000;
const LATENCY_ROUNDS: usize = 3_000;
/// The GetMetrics/PING rounds are cut in blocks; the ratio is reported per block too.
const LATENCY_BLOCKS: usize = 5;
const LATENCY_BLOCK: usize = 1_000;
const ENQUEUE_REQUESTS: u64 = 20_000;
const ENQUEUE_CONCURRENCY: u64 = 64;
const ACTIVATIONS: usize = 200;
const FLEET_PODS: usize = 200;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server(Child);

fn spawn_server(redis_url: &str, extra: &[String]) -> anyhow::Result<(Server, u16, u16)> {
    let (grpc_port, http_port) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_egress-scaler"))
        .args([
            "serve",
            "--redis-url",
            redis_url,
            "--grpc-listen",
            &format!("127.0.0.1:{grpc_port}"),
            "--http-listen",
            &format!("127.0.0.1:{http_port}"),
            // Only served queues take requests and answer KEDA.
            "--queue",
            "bench,load,act",
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .env_remove("LIVEKIT_API_KEY")
        .env_remove("LIVEKIT_API_SECRET")
        .stdout(Stdio::null())
        .spawn()?;
    Ok((Server(child), grpc_port, http_port))
}

async fn wait_ready(http: &reqwest::Client, http_port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http.get(format!("http://127.0.0.1:{http_port}/readyz")).send().await, Ok(r) if r.status().is_success())
    {
        anyhow::ensure!(Instant::now() < deadline, "the server did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn get_metrics(
    client: &mut ExternalScalerClient<tonic::transport::Channel>,
    queue: &str,
) -> anyhow::Result<(Duration, i64)> {
    let started = Instant::now();
    let answer = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(queue)),
            metric_name: format!("egress-replicas-{queue}"),
        })
        .await?
        .into_inner();
    Ok((started.elapsed(), answer.metric_values[0].metric_value))
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn scaled_object(queue: &str) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "egress".into(),
        namespace: "bench".into(),
        scaler_metadata: [("queue".to_owned(), queue.to_owned())]
            .into_iter()
            .collect(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let (_server, grpc_port, http_port) = spawn_server(&redis.url(), &[])?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let base = format!("http://127.0.0.1:{http_port}");
    wait_ready(&http, http_port).await?;

    // Fill the queue directly through the store (the HTTP path is measured separately).
    let store = QueueStore::connect(&redis.url(), StoreOptions::default()).await?;
    let bench: QueueName = "bench".parse()?;
    let fill_started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let fillers: Vec<_> = (0..32)
        .map(|_| {
            let (store, bench, next) = (store.clone(), bench.clone(), Arc::clone(&next));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= QUEUED {
                        return;
                    }
                    let kind = if i % 3 == 0 {
                        EgressKind::RoomComposite
                    } else {
                        EgressKind::Track
                    };
                    let request = NewRequest {
                        kind,
                        room_name: format!("room-{i}"),
                        request: None,
                        dedup_key: None,
                    };
                    store
                        .enqueue(&bench, request, now_ms())
                        .await
                        .expect("enqueue");
                }
            })
        })
        .collect();
    for filler in fillers {
        filler.await?;
    }
    let fill_time = fill_started.elapsed();
    let stats = store.stats(&bench).await?;
    anyhow::ensure!(
        stats.depth == QUEUED,
        "queue depth {} != {QUEUED}",
        stats.depth
    );

    // GetMetrics next to PING, interleaved.
    let mut grpc = ExternalScalerClient::connect(format!("http://127.0.0.1:{grpc_port}")).await?;
    let mut ping = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let mut metrics_samples = Vec::with_capacity(LATENCY_BLOCKS * LATENCY_BLOCK);
    let mut ping_samples = Vec::with_capacity(LATENCY_BLOCKS * LATENCY_BLOCK);
    // Per block (round) of calls: (GetMetrics p99, PING p99).
    let mut blocks: Vec<(Duration, Duration)> = Vec::with_capacity(LATENCY_BLOCKS);
    let mut desired = 0;
    for round in 0..LATENCY_BLOCKS * LATENCY_BLOCK + 200 {
        let (metrics_time, answer) = get_metrics(&mut grpc, "bench").await?;
        desired = answer;
        let started = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut ping).await?;
        let ping_time = started.elapsed();
        if round >= 200 {
            // The first rounds warm connections and caches.
            metrics_samples.push(metrics_time);
            ping_samples.push(ping_time);
            if metrics_samples.len() % LATENCY_BLOCK == 0 {
                let from = metrics_samples.len() - LATENCY_BLOCK;
                let block_metrics = percentile(&mut metrics_samples[from..].to_vec(), 0.99);
                let block_ping = percentile(&mut ping_samples[from..].to_vec(), 0.99);
                blocks.push((block_metrics, block_ping));
            }
        }
    }

    // Enqueue throughput over HTTP, distinct rooms (every request checks the dedup key).
    let mut throughputs = Vec::new();
    for run in 0..3 {
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let workers: Vec<_> = (0..ENQUEUE_CONCURRENCY)
            .map(|_| {
                let (http, base, next) = (http.clone(), base.clone(), Arc::clone(&next));
                tokio::spawn(async move {
                    let mut accepted = 0u64;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= ENQUEUE_REQUESTS {
                            return accepted;
                        }
                        let body = json!({"kind": "room_composite", "room_name": format!("load-{run}-{i}"), "queue": "load"});
                        let response = http.post(format!("{base}/v1/requests")).json(&body).send().await.expect("send");
                        if response.status().as_u16() == 202 {
                            accepted += 1;
                        }
                        let _ = response.bytes().await;
                    }
                })
            })
            .collect();
        let mut accepted = 0;
        for worker in workers {
            accepted += worker.await?;
        }
        let elapsed = started.elapsed();
        anyhow::ensure!(accepted == ENQUEUE_REQUESTS, "only {accepted} accepted");
        throughputs.push(ENQUEUE_REQUESTS as f64 / elapsed.as_secs_f64());
    }
    throughputs.sort_by(f64::total_cmp);

    // Activation latency: the queue is emptied after each round (its ticket cancelled), so each
    // round is an inactive -> active edge.
    let mut activation_samples = Vec::with_capacity(ACTIVATIONS);
    for round in 0..ACTIVATIONS {
        let queue = "act";
        let mut stream = grpc
            .stream_is_active(scaled_object(queue))
            .await?
            .into_inner();
        // Let the stream make its first (inactive) evaluation.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let started = Instant::now();
        let body =
            json!({"kind": "room_composite", "room_name": format!("r-{round}"), "queue": queue});
        let response = http
            .post(format!("{base}/v1/requests"))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(response.status().as_u16() == 202);
        let message = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??;
        anyhow::ensure!(message.map(|m| m.result) == Some(true), "no activation");
        activation_samples.push(started.elapsed());
        let answer: serde_json::Value = response.json().await?;
        let ticket = answer["ticket"].as_str().unwrap_or_default();
        let cancelled = http
            .delete(format!("{base}/v1/requests/{ticket}"))
            .send()
            .await?;
        anyhow::ensure!(
            cancelled.status().is_success(),
            "ticket {ticket} not cancelled"
        );
    }

    // GetMetrics while the fleet refreshes, next to the same fleet not refreshing.
    let mut pods = Vec::with_capacity(FLEET_PODS);
    for i in 0..FLEET_PODS {
        let pod = egress_scaler::standin::EgressPodStandIn::start().await?;
        if i % 2 == 1 {
            pod.set_busy(&[("room_composite", 1)]);
        }
        pods.push(pod);
    }
    let urls = pods
        .iter()
        .map(|pod| pod.metrics_url())
        .collect::<Vec<_>>()
        .join(",");
    let fleet_flags = |refresh: &str| -> Vec<String> {
        [
            "--egress-metrics",
            &urls,
            "--fleet-refresh-seconds",
            refresh,
            "--fleet-stale-seconds",
            "3600",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let (_refreshing, refreshing_grpc, refreshing_http) =
        spawn_server(&redis.url(), &fleet_flags("0.5"))?;
    let (_still, still_grpc, still_http) = spawn_server(&redis.url(), &fleet_flags("3000"))?;
    wait_ready(&http, refreshing_http).await?;
    wait_ready(&http, still_http).await?;
    let mut refreshing =
        ExternalScalerClient::connect(format!("http://127.0.0.1:{refreshing_grpc}")).await?;
    let mut still = ExternalScalerClient::connect(format!("http://127.0.0.1:{still_grpc}")).await?;
    // Wait for both first snapshots.
    let deadline = Instant::now() + Duration::from_secs(20);
    while get_metrics(&mut refreshing, "bench").await.is_err()
        || get_metrics(&mut still, "bench").await.is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "no fleet snapshot");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scrapes_before: u64 = pods.iter().map(|pod| pod.scrapes()).sum();
    let mut refreshing_samples = Vec::with_capacity(LATENCY_ROUNDS);
    let mut still_samples = Vec::with_capacity(LATENCY_ROUNDS);
    let fleet_started = Instant::now();
    let mut fleet_desired = (0, 0);
    for _ in 0..LATENCY_ROUNDS {
        let (time, value) = get_metrics(&mut refreshing, "bench").await?;
        refreshing_samples.push(time);
        fleet_desired.0 = value;
        let (time, value) = get_metrics(&mut still, "bench").await?;
        still_samples.push(time);
        fleet_desired.1 = value;
        // Spread the calls over several refreshes.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let fleet_elapsed = fleet_started.elapsed();
    let scrapes = pods.iter().map(|pod| pod.scrapes()).sum::<u64>() - scrapes_before;

    let metrics_p50 = percentile(&mut metrics_samples, 0.5);
    let metrics_p99 = percentile(&mut metrics_samples, 0.99);
    let ping_p50 = percentile(&mut ping_samples, 0.5);
    let ping_p99 = percentile(&mut ping_samples, 0.99);
    println!(
        "egress-scaler benchmarks (loopback, {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "queue filled with {QUEUED} tickets in {:.1} s (desired answered: {desired})",
        fill_time.as_secs_f64()
    );
    println!();
    println!(
        "GetMetrics ({QUEUED} queued) next to a Redis PING, interleaved call by call, p99 of each round of {LATENCY_BLOCK} calls:"
    );
    println!();
    println!("| round | GetMetrics p99 | PING p99 | ratio |");
    println!("|---|---|---|---|");
    for (round, (metrics, ping)) in blocks.iter().enumerate() {
        println!(
            "| {} | {} | {} | {:.2}x |",
            round + 1,
            ms(*metrics),
            ms(*ping),
            metrics.as_secs_f64() / ping.as_secs_f64()
        );
    }
    let median = |mut values: Vec<Duration>| {
        values.sort();
        values[values.len() / 2]
    };
    let median_metrics = median(blocks.iter().map(|block| block.0).collect());
    let median_ping = median(blocks.iter().map(|block| block.1).collect());
    let median_ratio = median_metrics.as_secs_f64() / median_ping.as_secs_f64();
    println!(
        "| median of {LATENCY_BLOCKS} rounds | {} | {} | {median_ratio:.2}x (goal <= 3x: {}) |",
        ms(median_metrics),
        ms(median_ping),
        if median_ratio <= 3.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!();
    println!("| measurement | p50 | p99 | goal |");
    println!("|---|---|---|---|");
    println!(
        "| GetMetrics, {QUEUED} queued ({} calls) | {} | {} | p99 <= 3x PING p99 |",
        LATENCY_BLOCKS * LATENCY_BLOCK,
        ms(metrics_p50),
        ms(metrics_p99)
    );
    println!(
        "| Redis PING round trip (same rounds) | {} | {} | |",
        ms(ping_p50),
        ms(ping_p99)
    );
    println!(
        "| activation: enqueue -> StreamIsActive true ({ACTIVATIONS} rounds) | {} | {} | p99 < 50 ms |",
        ms(percentile(&mut activation_samples, 0.5)),
        ms(percentile(&mut activation_samples, 0.99))
    );
    let (refresh_p50, refresh_p99) = (
        percentile(&mut refreshing_samples, 0.5),
        percentile(&mut refreshing_samples, 0.99),
    );
    let (still_p50, still_p99) = (
        percentile(&mut still_samples, 0.5),
        percentile(&mut still_samples, 0.99),
    );
    println!(
        "| GetMetrics, {FLEET_PODS} pods, fleet refreshing every 0.5 s ({} scrapes in {:.1} s) | {} | {} | unchanged |",
        scrapes,
        fleet_elapsed.as_secs_f64(),
        ms(refresh_p50),
        ms(refresh_p99)
    );
    println!(
        "| GetMetrics, same {FLEET_PODS} pods, no refresh running | {} | {} | |",
        ms(still_p50),
        ms(still_p99)
    );
    println!(
        "| ratio refreshing / not refreshing | {:.2}x | {:.2}x | ~1x |",
        refresh_p50.as_secs_f64() / still_p50.as_secs_f64(),
        refresh_p99.as_secs_f64() / still_p99.as_secs_f64()
    );
    println!(
        "(desired with the fleet: {} and {})",
        fleet_desired.0, fleet_desired.1
    );
    println!();
    println!(
        "| enqueue through HTTP, dedup on, {ENQUEUE_CONCURRENCY} connections, {ENQUEUE_REQUESTS} requests x 3 runs | requests/s |"
    );
    println!("|---|---|");
    println!("| median run | {:.0} |", throughputs[1]);
    println!(
        "| slowest / fastest run | {:.0} / {:.0} |",
        throughputs[0], throughputs[2]
    );
    println!("| goal | >= 5000 |");
    Ok(())
}
