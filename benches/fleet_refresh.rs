//! Refreshing a fleet of stand-in egress pods: wall time of one refresh, and the observer's
//! CPU time, extrapolated to CPU seconds per minute at the default 2 s interval.
//!
//! `cargo bench --bench fleet_refresh` (env `FLEET_REFRESH_PODS`, default 200, and
//! `FLEET_REFRESH_ROUNDS`, default 100). The stand-in pods run in a child process (this same
//! binary, started with `FLEET_REFRESH_STANDIN_CHILD=1`), so that the CPU time read from
//! /proc/self/stat is the observer's alone. Goal: one refresh of 200 pods under 250 ms.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use egress_scaler::fleet::{FleetMetrics, FleetObserver, FleetOptions, FleetSource};
use egress_scaler::model::{PodState, Settings};
use egress_scaler::standin::EgressPodStandIn;
use prometheus_client::registry::Registry;

const CHILD_ENV: &str = "FLEET_REFRESH_STANDIN_CHILD";
/// Seconds per clock tick in /proc/self/stat (USER_HZ is 100 on Linux).
const TICK: f64 = 0.01;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let pods = env_number("FLEET_REFRESH_PODS", 200).clamp(1, 2000);
    if std::env::var_os(CHILD_ENV).is_some() {
        run_standins(pods);
    } else {
        let rounds = env_number("FLEET_REFRESH_ROUNDS", 100).clamp(10, 10_000);
        run_bench(pods, rounds);
    }
}

/// Child: serve `pods` stand-ins, print their ports, exit when stdin closes.
fn run_standins(pods: usize) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let mut standins = Vec::with_capacity(pods);
        for i in 0..pods {
            let pod = EgressPodStandIn::start_on(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                Settings::default(),
            )
            .await
            .expect("bind a stand-in pod");
            // A mixed fleet: idle, one composite, tracks, a few draining.
            match i % 4 {
                0 => {}
                1 => pod.set_busy(&[("room_composite", 1)]),
                2 => pod.set_busy(&[("track", 3), ("participant", 1)]),
                _ if i % 20 == 3 => {
                    pod.set_busy(&[("web", 1)]);
                    pod.set_terminating(true);
                }
                _ => pod.set_busy(&[("track_composite", 2)]),
            }
            standins.push(pod);
        }
        let ports: Vec<String> = standins
            .iter()
            .map(|pod| pod.addr().port().to_string())
            .collect();
        println!("PORTS {}", ports.join(","));
        std::io::stdout().flush().expect("stdout");
        // The parent closes stdin when done (or dies): then stop.
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await
        .expect("stdin watcher");
        drop(standins);
    });
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here (0-based 11, 12).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 * TICK)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn run_bench(pods: usize, rounds: usize) {
    let exe = std::env::current_exe().expect("own executable");
    let mut child = Command::new(exe)
        .env(CHILD_ENV, "1")
        .env("FLEET_REFRESH_PODS", pods.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the stand-in process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("child stdout"))
        .read_line(&mut line)
        .expect("ports from the stand-in process");
    let urls: Vec<String> = line
        .trim()
        .strip_prefix("PORTS ")
        .expect("PORTS line")
        .split(',')
        .map(|port| format!("http://127.0.0.1:{port}/metrics"))
        .collect();
    assert_eq!(urls.len(), pods);

    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let options = FleetOptions::default();
    let observer = || {
        let (observer, fleet) = FleetObserver::new(
            FleetSource::Static(urls.clone()),
            options.clone(),
            Settings::default(),
            FleetMetrics::new(&mut Registry::default()),
        )
        .expect("observer");
        (observer, fleet)
    };

    let (cold, warm, cpu, ready, cpu_rounds) = runtime.block_on(async {
        // Cold: a new observer, so every pod is a new connection.
        let mut cold = Vec::new();
        for _ in 0..10 {
            let (mut observer, _fleet) = observer();
            let started = Instant::now();
            observer.refresh_once().await;
            cold.push(started.elapsed());
        }
        // Warm: one observer refreshing back to back, as the loop does every 2 s.
        let (mut observer, fleet) = observer();
        for _ in 0..3 {
            observer.refresh_once().await;
        }
        let mut warm = Vec::with_capacity(rounds);
        let cpu_before = cpu_time();
        for _ in 0..rounds {
            let started = Instant::now();
            observer.refresh_once().await;
            warm.push(started.elapsed());
        }
        let cpu = cpu_time() - cpu_before;
        let view = fleet.current().expect("fresh view");
        let ready = view.count(PodState::Ready);
        assert_eq!(view.pods.len(), pods, "every stand-in observed");
        assert_eq!(
            view.count(PodState::Unknown) + view.count(PodState::Starting),
            0
        );
        (cold, warm, cpu, ready, rounds)
    });
    drop(child.stdin.take());
    let _ = child.wait();

    let mut cold = cold;
    let mut warm = warm;
    cold.sort();
    warm.sort();
    let cpu_per_refresh = cpu / cpu_rounds as u32;
    let per_minute = cpu_per_refresh.as_secs_f64() * 30.0;
    let goal = Duration::from_millis(250);
    println!();
    println!(
        "fleet_refresh: {pods} stand-in pods in a separate process, {ready} ready; concurrency {}, scrape timeout {:?}",
        options.concurrency, options.scrape_timeout
    );
    println!("| measure | samples | median | p99 | max |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| refresh wall time, warm (kept-alive connections) | {} | {} | {} | {} |",
        warm.len(),
        ms(percentile(&warm, 0.5)),
        ms(percentile(&warm, 0.99)),
        ms(*warm.last().unwrap())
    );
    println!(
        "| refresh wall time, cold (new observer, new connections) | {} | {} | {} | {} |",
        cold.len(),
        ms(percentile(&cold, 0.5)),
        ms(percentile(&cold, 0.99)),
        ms(*cold.last().unwrap())
    );
    println!(
        "| observer CPU per warm refresh (user+sys, mean of {cpu_rounds}) | {cpu_rounds} | {} | - | - |",
        ms(cpu_per_refresh)
    );
    println!(
        "| observer CPU per minute at a 2 s interval (30 refreshes) | - | {:.3} s | - | - |",
        per_minute
    );
    let verdict = if percentile(&warm, 0.99) < goal && percentile(&cold, 0.99) < goal {
        "met"
    } else {
        "NOT met"
    };
    println!(
        "goal: one refresh of {pods} pods under {} on loopback: {verdict}",
        ms(goal)
    );
}
