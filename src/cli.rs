//! The subcommands: `serve` runs the server; `enqueue` and `status` are clients of its HTTP
//! API (they authenticate with a token minted from `LIVEKIT_API_KEY`/`LIVEKIT_API_SECRET`);
//! `demo` plays a burst of recordings on this machine ([`crate::demo`]).

use std::fmt::Write as _;
use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use livekit_api::access_token::{AccessToken, VideoGrants};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::{ApiCredentials, Cli, Command, EnqueueArgs, ProcessEnvironment, StatusArgs};
use crate::intake::StatusAnswer;

/// Runs the parsed command line; errors are printed as one line by `main`.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // The demo draws its own view on the terminal: only warnings and errors join it.
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    crate::telemetry::init_logging(cli.log_format, default_level);
    match cli.command {
        Command::Serve(args) => {
            let config = match args.resolve(&ProcessEnvironment) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("egress-scaler: {error}");
                    return Ok(ExitCode::from(2));
                }
            };
            let shutdown = CancellationToken::new();
            let signals = tokio::spawn(crate::server::cancel_on_signal(shutdown.clone()));
            let result = crate::server::serve(config, shutdown.clone()).await;
            shutdown.cancel();
            let _ = signals.await;
            result.map(|()| ExitCode::SUCCESS)
        }
        Command::Enqueue(args) => enqueue(args).await,
        Command::Status(args) => status(args).await,
        Command::Simulate(args) => {
            let config = match args.resolve() {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("egress-scaler: {error}");
                    return Ok(ExitCode::from(2));
                }
            };
            // Hours of virtual time are CPU work: keep it off the async runtime's threads.
            tokio::task::spawn_blocking(move || {
                crate::simulate::simulate(&config, &mut std::io::stdout().lock())
            })
            .await??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            let config = match args.resolve(rand::random) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("egress-scaler: {error}");
                    return Ok(ExitCode::from(2));
                }
            };
            crate::demo::run(config).await
        }
    }
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")
}

/// A short-lived token with `video.roomRecord`, when credentials are in the environment.
fn bearer_token() -> anyhow::Result<Option<String>> {
    let key = std::env::var("LIVEKIT_API_KEY")
        .ok()
        .filter(|v| !v.is_empty());
    let secret = std::env::var("LIVEKIT_API_SECRET")
        .ok()
        .filter(|v| !v.is_empty());
    let (Some(key), Some(secret)) = (key, secret) else {
        return Ok(None);
    };
    let token = access_token(&ApiCredentials { key, secret }, "egress-scaler-cli")
        .context("cannot sign an access token with LIVEKIT_API_KEY/LIVEKIT_API_SECRET")?;
    Ok(Some(token))
}

/// A token for the HTTP API: five minutes of `video.roomRecord`, signed with `credentials`.
pub fn access_token(
    credentials: &ApiCredentials,
    identity: &str,
) -> Result<String, livekit_api::access_token::AccessTokenError> {
    AccessToken::with_api_key(&credentials.key, &credentials.secret)
        .with_identity(identity)
        .with_ttl(Duration::from_secs(300))
        .with_grants(VideoGrants {
            room_record: true,
            ..VideoGrants::default()
        })
        .to_jwt()
}

fn authorized(builder: reqwest::RequestBuilder) -> anyhow::Result<reqwest::RequestBuilder> {
    Ok(match bearer_token()? {
        Some(token) => builder.bearer_auth(token),
        None => builder,
    })
}

/// Reads the server's answer; a non-2xx answer becomes an error with the server's message.
async fn read_answer(response: reqwest::Response) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("the server answered {status} without JSON"))?;
    if !status.is_success() {
        let message = body["message"].as_str().unwrap_or("no message");
        anyhow::bail!("the server answered {status}: {message}");
    }
    Ok((status, body))
}

async fn enqueue(args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let request = match &args.request {
        None => None,
        Some(path) => {
            let mut text = String::new();
            if path.as_os_str() == "-" {
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("cannot read the request from stdin")?;
            } else {
                text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --request {}", path.display()))?;
            }
            Some(serde_json::from_str::<Value>(&text).context("--request is not JSON")?)
        }
    };
    let mut body = json!({ "kind": args.kind.as_str(), "room_name": args.room_name });
    if let Some(request) = request {
        body["request"] = request;
    }
    if let Some(key) = args.dedup_key {
        body["dedup_key"] = json!(key);
    }
    if let Some(queue) = args.queue {
        body["queue"] = json!(queue);
    }
    let url = format!("{}/v1/requests", args.server.trim_end_matches('/'));
    let response = authorized(http_client()?.post(&url).json(&body))?
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let (_, answer) = read_answer(response).await?;
    let position = answer["position"]
        .as_u64()
        .map(|p| format!(", position {p}"))
        .unwrap_or_default();
    let duplicate = if answer["duplicate"].as_bool() == Some(true) {
        " (duplicate: already registered)"
    } else {
        ""
    };
    println!(
        "ticket {} {}{}{}",
        answer["ticket"].as_str().unwrap_or("?"),
        answer["state"].as_str().unwrap_or("?"),
        position,
        duplicate
    );
    Ok(ExitCode::SUCCESS)
}

async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let url = format!("{}/v1/status", args.server.trim_end_matches('/'));
    let response = authorized(http_client()?.get(&url))?
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let (_, answer) = read_answer(response).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        let status: StatusAnswer =
            serde_json::from_value(answer).context("unexpected status JSON")?;
        print!("{}", render_status(&status));
    }
    Ok(ExitCode::SUCCESS)
}

fn wait_text(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".to_owned(),
        Some(s) if s < 60.0 => format!("{s:.1}s"),
        Some(s) if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        Some(s) => format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        ),
    }
}

/// The status as a readable table.
pub fn render_status(status: &StatusAnswer) -> String {
    let mut out = String::new();
    if let Some(warning) = &status.redis.warning {
        let _ = writeln!(out, "WARNING: {warning}\n");
    }
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>12} {:>6} {:>6} {:>5} {:>8}  queued by kind",
        "QUEUE", "DEPTH", "OLDEST WAIT", "START", "ACTIVE", "DEAD", "DESIRED"
    );
    for queue in &status.queues {
        let kinds = if queue.queued_by_kind.is_empty() {
            "-".to_owned()
        } else {
            queue
                .queued_by_kind
                .iter()
                .map(|(kind, count)| format!("{kind}={count}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let desired = queue
            .desired_replicas
            .map(|d| d.to_string())
            .unwrap_or_else(|| "?".to_owned());
        let _ = writeln!(
            out,
            "{:<16} {:>7} {:>12} {:>6} {:>6} {:>5} {:>8}  {}",
            queue.queue,
            queue.depth,
            wait_text(queue.oldest_wait_seconds),
            queue.dispatching,
            queue.active,
            queue.dead_letters,
            desired,
            kinds
        );
    }
    for queue in &status.queues {
        let _ = writeln!(
            out,
            "\n{}: desired {} because",
            queue.queue,
            queue
                .desired_replicas
                .map(|d| d.to_string())
                .unwrap_or_else(|| "unknown".to_owned())
        );
        for reason in &queue.reasons {
            let _ = writeln!(out, "  - {reason}");
        }
        match &queue.leader {
            Some(leader) => {
                let _ = writeln!(
                    out,
                    "  dispatcher: {} (lease held {}, expires in {:.1}s, fence {})",
                    leader.holder,
                    wait_text(leader.lease_age_seconds),
                    leader.expires_in_seconds,
                    leader
                        .fence
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| "-".to_owned())
                );
            }
            None => {
                let _ = writeln!(out, "  dispatcher: none leading");
            }
        }
        if !queue.recent_dead_letters.is_empty() {
            let _ = writeln!(out, "  newest dead letters:");
            for dead in &queue.recent_dead_letters {
                let _ = writeln!(
                    out,
                    "    {} {} {} {}: {}",
                    dead.failed_at.as_deref().unwrap_or("-"),
                    dead.ticket,
                    dead.kind,
                    dead.room_name,
                    dead.error.as_deref().unwrap_or("no error recorded")
                );
            }
        }
    }
    if !status.other_queues.is_empty() {
        let _ = writeln!(
            out,
            "\nqueues in Redis not served here: {}",
            status.other_queues.join(", ")
        );
    }
    let fleet = &status.fleet;
    let states = fleet
        .pods_by_state
        .iter()
        .map(|(state, count)| format!("{state}={count}"))
        .collect::<Vec<_>>()
        .join(" ");
    let health = match &fleet.error {
        None => "healthy".to_owned(),
        Some(error) => format!("NOT HEALTHY: {error}"),
    };
    let _ = writeln!(
        out,
        "\nfleet: {} pod(s) [{}], {:.1} free cores, snapshot {:.1}s old, {}",
        fleet.pods.len(),
        states,
        fleet.free_cpu_cores,
        fleet.snapshot_age_seconds,
        health
    );
    if let Some(warning) = &fleet.warning {
        let _ = writeln!(out, "  warning: {warning}");
    }
    if !fleet.pods.is_empty() {
        let _ = writeln!(
            out,
            "{:<40} {:<20} {:<12} {:>9} {:>8}  active",
            "POD", "NODE", "STATE", "FREE CPU", "SCRAPED"
        );
        for pod in &fleet.pods {
            let active = pod["active"]
                .as_object()
                .map(|map| {
                    map.iter()
                        .map(|(kind, count)| format!("{kind}={count}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .filter(|text| !text.is_empty())
                .unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(
                out,
                "{:<40} {:<20} {:<12} {:>9} {:>8}  {}",
                pod["address"].as_str().unwrap_or("?"),
                pod["node_id"].as_str().unwrap_or("-"),
                pod["state"].as_str().unwrap_or("?"),
                pod["free_cpu_cores"]
                    .as_f64()
                    .map(|f| format!("{f:.1}"))
                    .unwrap_or_default(),
                wait_text(pod["last_scrape_age_seconds"].as_f64()),
                active
            );
            // Why a pod is not plain capacity (unknown, disabled) or why its scrapes fail.
            if let Some(reason) = pod["last_error"].as_str() {
                let _ = writeln!(out, "{:<40} why: {reason}", "");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_shows_depth_wait_desired_and_reasons() {
        let status: StatusAnswer = serde_json::from_value(json!({
            "queues": [{
                "queue": "default", "depth": 3, "queued_by_kind": {"room_composite": 3},
                "demand_by_kind": {"room_composite": 3}, "oldest_wait_seconds": 75.0,
                "dispatching": 0, "active": 1, "dead_letters": 0, "desired_replicas": 3,
                "reasons": ["3 queued job(s): 0 placed on existing pods (0 idle pod(s) taken), 3 need 3 new pod(s)"],
                "decision": null
            }],
            "fleet": {"healthy": true, "error": null, "snapshot_age_seconds": 0.5,
                      "pods_by_state": {"ready": 0}, "free_cpu_cores": 0.0, "pods": []}
        }))
        .unwrap();
        let table = render_status(&status);
        assert!(table.contains("default"), "{table}");
        assert!(table.contains("1m15s"), "{table}");
        assert!(table.contains("room_composite=3"), "{table}");
        assert!(table.contains("desired 3 because"), "{table}");
        assert!(table.contains("3 need 3 new pod(s)"), "{table}");
        assert!(table.contains("dispatcher: none leading"), "{table}");
    }

    #[test]
    fn status_table_shows_the_leader_and_the_newest_dead_letters() {
        let status: StatusAnswer = serde_json::from_value(json!({
            "queues": [{
                "queue": "default", "depth": 0, "queued_by_kind": {}, "demand_by_kind": {},
                "oldest_wait_seconds": null, "dispatching": 0, "active": 0, "dead_letters": 1,
                "desired_replicas": 0, "reasons": [], "decision": null,
                "leader": {"holder": "egress-scaler-0-1a2b3c4d", "lease_age_seconds": 95.0,
                           "expires_in_seconds": 8.2, "fence": 7},
                "recent_dead_letters": [{"ticket": "default.00", "kind": "web",
                    "room_name": "r", "error": "livekit-server refused the request: invalid_argument: no url",
                    "failed_at": "2026-01-01T00:00:00.000Z"}]
            }],
            "fleet": {"healthy": true, "error": null, "snapshot_age_seconds": 0.5,
                      "pods_by_state": {"ready": 0}, "free_cpu_cores": 0.0, "pods": []}
        }))
        .unwrap();
        let table = render_status(&status);
        assert!(
            table.contains("dispatcher: egress-scaler-0-1a2b3c4d (lease held 1m35s"),
            "{table}"
        );
        assert!(table.contains("fence 7"), "{table}");
        assert!(table.contains("invalid_argument: no url"), "{table}");
    }

    #[test]
    fn status_table_shows_the_fleet_warning_and_why_a_pod_is_unknown() {
        let status: StatusAnswer = serde_json::from_value(json!({
            "queues": [],
            "fleet": {"healthy": true, "error": null, "snapshot_age_seconds": 0.5,
                      "warning": "dns: egress-metrcs.livekit.svc does not resolve (NXDOMAIN)",
                      "pods_by_state": {"unknown": 1}, "free_cpu_cores": 0.0,
                      "pods": [{"address": "http://10.0.0.7:9090/metrics", "node_id": null,
                                "state": "unknown", "active": {}, "free_cpu_cores": 0.0,
                                "last_scrape_age_seconds": null,
                                "last_error": "never answered a scrape in 30 s: connection failed: Connection refused (os error 111)"}]}
        }))
        .unwrap();
        let table = render_status(&status);
        assert!(
            table.contains("  warning: dns: egress-metrcs.livekit.svc does not resolve"),
            "{table}"
        );
        assert!(
            table.contains("why: never answered a scrape in 30 s: connection failed"),
            "{table}"
        );
    }

    #[test]
    fn status_table_opens_with_the_redis_warning() {
        let mut answer = json!({
            "queues": [],
            "fleet": {"healthy": true, "error": null, "snapshot_age_seconds": 0.5,
                      "pods_by_state": {"ready": 0}, "free_cpu_cores": 0.0, "pods": []}
        });
        let quiet: StatusAnswer = serde_json::from_value(answer.clone()).unwrap();
        assert!(!render_status(&quiet).contains("WARNING"));
        answer["redis"] = json!({"eviction_policy": "volatile-lru", "eviction_policy_ok": false,
            "warning": "Redis maxmemory-policy is volatile-lru: set maxmemory-policy noeviction"});
        let warned: StatusAnswer = serde_json::from_value(answer).unwrap();
        let table = render_status(&warned);
        assert!(
            table.starts_with("WARNING: Redis maxmemory-policy is volatile-lru"),
            "{table}"
        );
    }
}
