//! Test helpers: a real `redis-server` per test and the real server on 127.0.0.1:0.
#![allow(dead_code)]

pub mod prometheus;

use std::net::SocketAddr;
use std::time::Duration;

use egress_scaler::config::{Cli, Command, Environment, ServeConfig};
use egress_scaler::redis_server::RedisServer;
use egress_scaler::scaler::proto::ScaledObjectRef;
use egress_scaler::scaler::proto::external_scaler_client::ExternalScalerClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// No environment at all, so tests do not depend on the developer's shell.
pub struct NoEnvironment;

impl Environment for NoEnvironment {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Environment with only API credentials.
pub struct CredentialsEnvironment(pub &'static str, pub &'static str);

impl Environment for CredentialsEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        match name {
            "LIVEKIT_API_KEY" => Some(self.0.to_owned()),
            "LIVEKIT_API_SECRET" => Some(self.1.to_owned()),
            _ => None,
        }
    }
}

/// Installs the rustls provider reqwest needs (idempotent).
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `serve` config from flags, on loopback ports chosen by the OS.
pub fn config(redis: &RedisServer, flags: &[&str], env: &dyn Environment) -> ServeConfig {
    use clap::Parser;
    let cli = Cli::try_parse_from(
        [
            "egress-scaler",
            "serve",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--redis-url",
            &redis.url(),
        ]
        .into_iter()
        .chain(flags.iter().copied()),
    )
    .expect("test flags parse");
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    args.resolve(env).expect("test config is valid")
}

/// A running `serve` for one test.
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: ServeConfig) -> TestServer {
        init();
        let shutdown = CancellationToken::new();
        let running = egress_scaler::server::start(config, shutdown.clone())
            .await
            .expect("server starts");
        let (grpc_addr, http_addr) = (running.grpc_addr, running.http_addr);
        let task = tokio::spawn(running.wait());
        TestServer {
            grpc_addr,
            http_addr,
            shutdown,
            task: Some(task),
        }
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.http_addr, path)
    }

    pub async fn grpc(&self) -> ExternalScalerClient<Channel> {
        ExternalScalerClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .expect("gRPC connects")
    }

    /// Cancels the token and waits for a clean drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("server drains in time")
            .expect("server task joins")
            .expect("server ends without error");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A ScaledObjectRef with trigger metadata.
pub fn scaled_object(metadata: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "egress".to_owned(),
        namespace: "livekit".to_owned(),
        scaler_metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

pub fn http_client() -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client builds")
}

/// Enqueues through the HTTP API and returns (status, body).
pub async fn enqueue(
    client: &reqwest::Client,
    server: &TestServer,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = client
        .post(server.http("/v1/requests"))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON answer"))
}

/// Starts a fresh Redis for a test.
pub fn redis() -> RedisServer {
    RedisServer::start()
        .expect("redis-server starts (install it with apt-get install redis-server)")
}
