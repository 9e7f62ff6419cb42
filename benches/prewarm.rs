//! GetMetrics with pre-warm on against off, with 100,000 tickets queued: two `serve` processes
//! on the same Redis and queue, one `--prewarm off`, one `--prewarm auto` (default lead time,
//! 60 s: every call reads the counters of the next minute's 5-minute window on the 6 days it is
//! compared with, 30 counters per kind). The queue has two weeks of arrival history, on every
//! day, so the read finds counters and the model places the expected arrivals. Calls alternate off/on, in 5 blocks of 1,000 after 200 to warm
//! up; the table has each block's p99 and the ratio of their medians (goal: within 1.2x).
//! Run with `cargo bench --bench prewarm`.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use egress_scaler::model::EgressKind;
use egress_scaler::prewarm::{BUCKET_MS, DAY_MS};
use egress_scaler::queue::{NewRequest, QueueName, QueueStore, StoreOptions};
use egress_scaler::redis_server::RedisServer;
use egress_scaler::scaler::proto::external_scaler_client::ExternalScalerClient;
use egress_scaler::scaler::proto::{GetMetricsRequest, ScaledObjectRef};

const QUEUED: u64 = 100_000;
const BLOCKS: usize = 5;
const BLOCK: usize = 1_000;
const WARM_UP: usize = 200;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(redis_url: &str, extra: &[&str]) -> anyhow::Result<(Server, u16, u16)> {
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
            "--queue",
            "bench",
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
) -> anyhow::Result<(Duration, i64)> {
    let started = Instant::now();
    let answer = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(ScaledObjectRef {
                name: "egress".into(),
                namespace: "bench".into(),
                scaler_metadata: [("queue".to_owned(), "bench".to_owned())]
                    .into_iter()
                    .collect(),
            }),
            metric_name: "egress-replicas-bench".to_owned(),
        })
        .await?
        .into_inner();
    Ok((started.elapsed(), answer.metric_values[0].metric_value))
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
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
    let http = reqwest::Client::new();
    let (_off, off_grpc, off_http) = spawn_server(&redis.url(), &["--prewarm", "off"])?;
    let (_on, on_grpc, on_http) = spawn_server(&redis.url(), &["--prewarm", "auto"])?;
    wait_ready(&http, off_http).await?;
    wait_ready(&http, on_http).await?;

    let store = QueueStore::connect(&redis.url(), StoreOptions::default()).await?;
    let bench: QueueName = "bench".parse()?;
    // History: tracks and composites at the same times as the next buckets on each of the
    // last 14 days, so that every call with pre-warm on finds a pattern.
    let now = now_ms();
    let next_start = (now / BUCKET_MS + 1) * BUCKET_MS;
    // The next 20 minutes: the run crosses a few minute boundaries.
    for (day, bucket) in (1..=14u64).flat_map(|day| (0..20u64).map(move |b| (day, b))) {
        for i in 0..3u64 {
            let kind = if i % 3 == 0 {
                EgressKind::RoomComposite
            } else {
                EgressKind::Track
            };
            let request = NewRequest {
                kind,
                room_name: format!("history-{day}-{bucket}-{i}"),
                request: None,
                dedup_key: None,
            };
            store
                .enqueue(
                    &bench,
                    request,
                    next_start + bucket * BUCKET_MS - day * DAY_MS + 10_000,
                )
                .await?;
        }
    }
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

    let mut off = ExternalScalerClient::connect(format!("http://127.0.0.1:{off_grpc}")).await?;
    let mut on = ExternalScalerClient::connect(format!("http://127.0.0.1:{on_grpc}")).await?;
    let (mut off_samples, mut on_samples) = (Vec::new(), Vec::new());
    let mut blocks: Vec<(Duration, Duration)> = Vec::new();
    let (mut off_desired, mut on_desired) = (0, 0);
    for round in 0..WARM_UP + BLOCKS * BLOCK {
        let (off_time, off_answer) = get_metrics(&mut off).await?;
        let (on_time, on_answer) = get_metrics(&mut on).await?;
        (off_desired, on_desired) = (off_answer, on_answer);
        if round >= WARM_UP {
            off_samples.push(off_time);
            on_samples.push(on_time);
            if off_samples.len() % BLOCK == 0 {
                let from = off_samples.len() - BLOCK;
                blocks.push((
                    percentile(&mut off_samples[from..].to_vec(), 0.99),
                    percentile(&mut on_samples[from..].to_vec(), 0.99),
                ));
            }
        }
    }

    println!("GetMetrics with {QUEUED} queued, pre-warm off vs on (lead 60 s, every call reads)");
    println!("| block | off p99 | on p99 | on / off |");
    println!("|---|---|---|---|");
    for (index, (off_p99, on_p99)) in blocks.iter().enumerate() {
        println!(
            "| {} | {} | {} | {:.2}x |",
            index + 1,
            ms(*off_p99),
            ms(*on_p99),
            on_p99.as_secs_f64() / off_p99.as_secs_f64()
        );
    }
    let mut off_p99s: Vec<Duration> = blocks.iter().map(|b| b.0).collect();
    let mut on_p99s: Vec<Duration> = blocks.iter().map(|b| b.1).collect();
    let (off_median, on_median) = (
        percentile(&mut off_p99s, 0.5),
        percentile(&mut on_p99s, 0.5),
    );
    println!(
        "| median | {} | {} | {:.2}x |",
        ms(off_median),
        ms(on_median),
        on_median.as_secs_f64() / off_median.as_secs_f64()
    );
    println!(
        "p50: off {}, on {}; desired: off {off_desired}, on {on_desired} (the pattern's pods on top)",
        ms(percentile(&mut off_samples, 0.5)),
        ms(percentile(&mut on_samples, 0.5)),
    );
    Ok(())
}
