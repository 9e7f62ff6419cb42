//! `serve`: wires the queue, fleet observer, KEDA gRPC service, HTTP API, webhook receiver and
//! (with `--livekit-url`) one dispatcher per served queue together, and drains them when the
//! shutdown token is cancelled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::ServeConfig;
use crate::dispatch::livekit::TwirpEgressApi;
use crate::dispatch::{DispatchOptions, Dispatcher};
use crate::fleet::{Fleet, FleetMetrics, FleetObserver, FleetSource};
use crate::front_door::FrontDoor;
use crate::intake::{self, AppState};
use crate::queue::{self, QueueStore, StoreOptions};
use crate::scaler::proto::external_scaler_server::ExternalScalerServer;
use crate::scaler::{Evaluator, ScalerService};
use crate::telemetry::{DispatchMetrics, Metrics};
use crate::tls::{self, ReloadingTls};
use crate::webhook::Webhooks;

/// How long in-flight work may take to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A started server: its bound addresses and the tasks it owns.
pub struct Running {
    /// Where the KEDA gRPC service listens.
    pub grpc_addr: SocketAddr,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    tasks: JoinSet<anyhow::Result<()>>,
    shutdown: CancellationToken,
}

impl Running {
    /// Waits until every task has ended (after `shutdown`), giving up after [`SHUTDOWN_GRACE`].
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        loop {
            let next = if self.shutdown.is_cancelled() {
                match tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.join_next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        tracing::warn!(
                            "Tasks did not finish within the shutdown grace; aborting them."
                        );
                        self.tasks.abort_all();
                        break;
                    }
                }
            } else {
                tokio::select! {
                    next = self.tasks.join_next() => next,
                    _ = self.shutdown.cancelled() => continue,
                }
            };
            match next {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(error))) => {
                    tracing::error!(error = %format!("{error:#}"), "A server task failed; shutting down.");
                    self.shutdown.cancel();
                    first_error.get_or_insert(error);
                }
                Some(Err(join_error)) => {
                    self.shutdown.cancel();
                    first_error
                        .get_or_insert(anyhow::anyhow!("a server task panicked: {join_error}"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Connects to Redis, retrying until it answers or shutdown is requested.
async fn connect_store(
    url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<QueueStore>> {
    let mut delay = Duration::from_millis(200);
    loop {
        match QueueStore::connect(url, StoreOptions::default()).await {
            Ok(store) => return Ok(Some(store)),
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "Redis is not reachable yet.");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Starts every component; they stop when `shutdown` is cancelled.
pub async fn start(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let grpc_tls = match config.grpc_tls.clone() {
        Some(settings) => Some(
            ReloadingTls::load(settings)
                .map_err(|error| anyhow::anyhow!("cannot load {}: {error}", error.file.flag()))?,
        ),
        None => None,
    };
    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("cannot listen on --grpc-listen {}", config.grpc_listen))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on --http-listen {}", config.http_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let store = connect_store(&config.redis_url, &shutdown)
        .await?
        .context("shutdown requested before Redis answered")?;

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry, config.queues.clone());
    let fleet_metrics = FleetMetrics::new(&mut registry);
    let dispatch_metrics = DispatchMetrics::new(&mut registry);
    let registry = Arc::new(registry);

    let mut tasks = JoinSet::new();

    // Prometheus shows a start only after its next scrape of the pod.
    let reservation_lag = match config.fleet_source {
        FleetSource::Prometheus { .. } => config.prometheus_lag,
        _ => Duration::ZERO,
    };
    let fleet = match config.fleet_source {
        FleetSource::None => Fleet::none(),
        source => {
            let (observer, fleet) = FleetObserver::new(
                source,
                config.fleet_options.clone(),
                config.settings.clone(),
                fleet_metrics,
            )
            .context("cannot set up the fleet observer")?;
            let token = shutdown.clone();
            // Scraping and parsing hundreds of pods comes in bursts of CPU work; on a runtime
            // of its own they do not queue in front of KEDA's calls.
            let (done, finished) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("fleet-observer".to_owned())
                .spawn(move || {
                    let outcome = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map(|runtime| runtime.block_on(observer.run(token)));
                    let _ = done.send(outcome);
                })
                .context("cannot start the fleet observer thread")?;
            tasks.spawn(async move {
                match finished.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(anyhow::anyhow!("fleet observer runtime: {error}")),
                    Err(_) => Err(anyhow::anyhow!("the fleet observer thread panicked")),
                }
            });
            fleet
        }
    };

    let (events, _) = broadcast::channel(1024);
    {
        let source = store.event_source();
        let events = events.clone();
        let token = shutdown.clone();
        tasks.spawn(async move {
            queue::run_event_listener(source, events, token).await;
            Ok(())
        });
    }

    {
        // An evicted ticket hash loses a recording: say so loudly when Redis may evict.
        let (store, metrics, token) = (store.clone(), Arc::clone(&metrics), shutdown.clone());
        let events = events.subscribe();
        tasks.spawn(async move {
            let report =
                move |policy: &queue::EvictionPolicy| metrics.record_eviction_policy(policy);
            queue::watch_eviction_policy(store, events, report, token).await;
            Ok(())
        });
    }

    if let (Some(url), Some(credentials)) = (&config.livekit_url, &config.credentials) {
        let holder = format!(
            "{}-{}",
            config.holder_name,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        // Every served queue has its own dispatcher, leading (or standing by for) its own lease.
        for queue in &config.queues {
            let api = TwirpEgressApi::new(url, credentials.clone(), config.livekit_call_timeout)
                .context("cannot set up the LiveKit client")?;
            let options = DispatchOptions {
                order: config.order,
                lease: config.lease,
                // A short lease still leaves most of its time for sending starts.
                lease_margin: (config.lease / 5).min(Duration::from_secs(2)),
                max_in_flight: config.max_in_flight,
                call_timeout: api.timeout(),
                settle_after: api.timeout() + Duration::from_secs(5),
                not_found_retry: config.not_found_retry,
                reservation_lag,
                ..DispatchOptions::default()
            };
            let dispatcher = Dispatcher::new(
                queue.clone(),
                store.clone(),
                fleet.clone(),
                api,
                config.settings.clone(),
                options,
                holder.clone(),
                events.clone(),
                Arc::clone(&dispatch_metrics),
            )
            .with_served_queues(config.queues.iter().as_slice());
            let token = shutdown.clone();
            let queue = queue.clone();
            tasks.spawn(async move {
                dispatcher
                    .run(token)
                    .await
                    .with_context(|| format!("the dispatcher of queue {queue} stopped"))
            });
        }
    }

    let front_door = Arc::new(
        FrontDoor::new(
            config.hold,
            shutdown.clone(),
            config.livekit_url.as_deref(),
            config.credentials.as_ref(),
            config.livekit_call_timeout,
        )
        .context("cannot set up the Twirp front door")?,
    );
    {
        let (waiters, store, token) = (front_door.waiters(), store.clone(), shutdown.clone());
        let events = events.subscribe();
        tasks.spawn(async move {
            waiters.run(store, events, token).await;
            Ok(())
        });
    }

    let mut evaluator = Evaluator::new(store.clone(), fleet.clone(), Arc::clone(&metrics))
        .with_observation_lag(reservation_lag);
    if let Some(kube_scale) = &config.kube_scale {
        let scale = crate::kube_scale::DeploymentScale::connect(kube_scale)
            .await
            .with_context(|| format!("--kube-scale {}", kube_scale.deployment))?;
        let (assist, desired) = crate::kube_scale::ScaleUpAssist::new();
        evaluator = evaluator.with_assist(config.queues.default_queue().clone(), assist);
        let token = shutdown.clone();
        let metrics = Arc::clone(&metrics);
        tasks.spawn(async move {
            crate::kube_scale::run_assist(scale, desired, metrics, token).await;
            Ok(())
        });
    }
    let scaler = ScalerService::new(
        evaluator,
        config.queues.clone(),
        config.settings.clone(),
        events,
        Arc::clone(&metrics),
        shutdown.clone(),
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ExternalScalerServer<ScalerService>>()
        .await;
    {
        let token = shutdown.clone();
        let router = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(ExternalScalerServer::new(scaler));
        let drained = async move {
            token.cancelled().await;
            health
                .set_not_serving::<ExternalScalerServer<ScalerService>>()
                .await;
        };
        match grpc_tls {
            None => {
                // Small stream messages must not wait for a delayed ACK (Nagle): activation
                // is latency.
                let grpc_incoming = tonic::transport::server::TcpIncoming::from(grpc_listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(Duration::from_secs(60)));
                tasks.spawn(async move {
                    router
                        .serve_with_incoming_shutdown(grpc_incoming, drained)
                        .await
                        .context("gRPC server failed")
                });
            }
            Some(tls) => {
                let (grpc_incoming, accept) =
                    tls::accept_loop(grpc_listener, tls.current(), shutdown.clone());
                let token = shutdown.clone();
                tasks.spawn(async move {
                    tls.watch_files(token).await;
                    Ok(())
                });
                tasks.spawn(async move {
                    accept.await;
                    Ok(())
                });
                tasks.spawn(async move {
                    router
                        .serve_with_incoming_shutdown(
                            grpc_incoming.map(Ok::<_, std::io::Error>),
                            drained,
                        )
                        .await
                        .context("gRPC server failed")
                });
            }
        }
    }

    let state = AppState {
        store,
        fleet,
        settings: config.settings.clone(),
        queues: config.queues.clone(),
        verifier: AppState::verifier_for(config.credentials.as_ref()),
        metrics,
        dispatch_metrics,
        registry,
        webhooks: config.credentials.as_ref().map(|credentials| {
            Arc::new(Webhooks::new(
                credentials,
                config.queues.clone(),
                config.auto_record.clone(),
            ))
        }),
        front_door,
    };
    {
        let token = shutdown.clone();
        tasks.spawn(async move {
            let listener = http_listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, intake::router(state))
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .context("HTTP server failed")
        });
    }

    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr,
        queues = %config.queues,
        dispatcher = config.livekit_url.is_some(),
        grpc_tls = config.grpc_tls.is_some(),
        "egress-scaler is serving."
    );
    Ok(Running {
        grpc_addr,
        http_addr,
        tasks,
        shutdown,
    })
}

/// Runs `serve` until `shutdown` is cancelled and everything has drained.
pub async fn serve(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(config, shutdown).await?.wait().await
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; draining."),
        _ = terminate => tracing::info!("SIGTERM received; draining."),
        _ = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}
