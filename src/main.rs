use std::process::ExitCode;

use clap::Parser;
use egress_scaler::config::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    // reqwest is built without a default TLS provider; install ring once for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match egress_scaler::cli::run(Cli::parse()).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("egress-scaler: {error:#}");
            ExitCode::FAILURE
        }
    }
}
