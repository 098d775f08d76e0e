//! payment_sim: a simulated card processor over HTTP, with its own ledger,
//! idempotency keys, and faults (latency, errors, lost and late replies,
//! declines, outages) changeable at runtime with `PUT /v1/admin/faults`.
//!
//! ```text
//! cargo run --release --example payment_sim -- --latency-ms 20 --error-rate 0.05
//! ```
//!
//! Flags (each also read from the environment variable shown in `--help`):
//! `--addr` (env `BIND`, default `127.0.0.1:8090`), `--latency-ms` (mean, default 20),
//! `--latency-p99-ms` (default 3 × the mean), `--error-rate` (default 0.05),
//! `--lost-reply-rate`, `--timeout-rate`, `--decline-rate` (default 0),
//! `--late-reply-ms` (default 30000), `--seed` (default random). `RUST_LOG`
//! filters the log (default `info`). The API is in
//! `docs/order-saga/payment-sim.md`. It asks for no token: run it on a test
//! network only.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "support/server.rs"]
mod server_support;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use order_saga::http::PaymentSimService;
use order_saga::payment::sim::{SimConfig, Simulator};

/// A simulated card processor over HTTP.
#[derive(Debug, Parser)]
#[command(name = "payment_sim", version)]
struct Args {
    /// Listen address.
    #[arg(long, env = "BIND", default_value = "127.0.0.1:8090")]
    addr: SocketAddr,
    /// Mean latency of a request, in milliseconds (log-normal).
    #[arg(long, env = "PAYMENT_SIM_LATENCY_MS", default_value_t = 20.0)]
    latency_ms: f64,
    /// 99th-percentile latency, in milliseconds [default: 3 × the mean].
    #[arg(long, env = "PAYMENT_SIM_LATENCY_P99_MS")]
    latency_p99_ms: Option<f64>,
    /// Share of requests refused with 503 before acting.
    #[arg(long, env = "PAYMENT_SIM_ERROR_RATE", default_value_t = 0.05)]
    error_rate: f64,
    /// Share of requests whose reply is lost after acting (the connection
    /// is closed without a response).
    #[arg(long, env = "PAYMENT_SIM_LOST_REPLY_RATE", default_value_t = 0.0)]
    lost_reply_rate: f64,
    /// Share of requests whose reply is held back for --late-reply-ms after
    /// acting.
    #[arg(long, env = "PAYMENT_SIM_TIMEOUT_RATE", default_value_t = 0.0)]
    timeout_rate: f64,
    /// How long a late reply is held, in milliseconds.
    #[arg(long, env = "PAYMENT_SIM_LATE_REPLY_MS", default_value_t = 30_000.0)]
    late_reply_ms: f64,
    /// Share of new authorizations declined.
    #[arg(long, env = "PAYMENT_SIM_DECLINE_RATE", default_value_t = 0.0)]
    decline_rate: f64,
    /// Seed of the random draws [default: random].
    #[arg(long, env = "PAYMENT_SIM_SEED")]
    seed: Option<u64>,
}

fn millis(name: &str, ms: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(ms / 1000.0)
        .map_err(|_| format!("{name} must be a non-negative number of milliseconds, got {ms}"))
}

impl Args {
    fn config(&self) -> Result<SimConfig, String> {
        let mean = millis("--latency-ms", self.latency_ms)?;
        let p99 = millis(
            "--latency-p99-ms",
            self.latency_p99_ms.unwrap_or(self.latency_ms * 3.0),
        )?;
        let config = SimConfig::default()
            .with_latency(mean, p99)
            .with_error_rate(self.error_rate)
            .with_lost_reply_rate(self.lost_reply_rate)
            .with_timeouts(
                self.timeout_rate,
                millis("--late-reply-ms", self.late_reply_ms)?,
            )
            .with_decline_rate(self.decline_rate);
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    server_support::init_tracing();
    let args = Args::parse();
    let config = match args.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("payment_sim: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    println!("payment_sim effective configuration:");
    println!("  addr            {}", args.addr);
    println!("  latency mean    {:?}", config.latency_mean);
    println!("  latency p99     {:?}", config.latency_p99);
    println!("  error_rate      {}", config.error_rate);
    println!("  lost_reply_rate {}", config.lost_reply_rate);
    println!(
        "  timeout_rate    {} (late replies held {:?})",
        config.timeout_rate, config.late_reply_delay
    );
    println!("  decline_rate    {}", config.decline_rate);
    println!("  seed            {seed}");
    let sim = match Simulator::with_seed(config, seed) {
        Ok(sim) => Arc::new(sim),
        Err(e) => {
            eprintln!("payment_sim: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("payment_sim: cannot listen on {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    let shutdown = http_kit::Shutdown::new();
    shutdown.trigger_on(server_support::shutdown_signal());
    tracing::info!(addr = %args.addr, "payment_sim listening");
    let report = http_kit::serve(
        listener,
        PaymentSimService::new(sim),
        http_kit::ServeConfig::default(),
        shutdown,
    )
    .await;
    tracing::info!(
        accepted = report.accepted,
        drained = report.drained,
        "payment_sim stopped"
    );
    ExitCode::SUCCESS
}
