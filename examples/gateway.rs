//! The API gateway as a reverse proxy, configured from a TOML file.
//!
//! ```text
//! cargo run --release --features gateway-proxy --example gateway -- --config examples/gateway.toml
//! curl -s -XPOST localhost:8080/auth/token -H 'content-type: application/json' \
//!   -d '{"username":"alice","password":"alice-password"}'
//! curl -s localhost:8080/v1/orders/42 -H "authorization: Bearer $ACCESS_TOKEN"
//! ```
//!
//! `--hash-password` reads a password from standard input and prints its
//! Argon2id PHC string for `[[users]] password_hash`:
//!
//! ```text
//! echo -n 'the-password' | cargo run --release --example gateway -- --hash-password
//! ```
//!
//! It prints the effective configuration (secrets redacted), validates and
//! builds everything, then starts the demo upstream when `[demo_upstream]`
//! is set, binds, and serves until SIGINT/SIGTERM, then drains.
#![allow(clippy::print_stdout)]

#[path = "support/server.rs"]
mod server_support;

use std::convert::Infallible;

use bytes::Bytes;
use gateway_mw::config::GatewayConfig;
use gateway_mw::server::GatewayServer;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

// mimalloc rather than glibc's malloc: a proxy allocates and frees small
// buffers on every request from both worker threads, and glibc's arenas
// showed up as 11 % of the gateway's profile, lock waits included
// (docs/PERFORMANCE.md, "What was tried"). Both proxies measured by
// scripts/gateway-load use it, so their comparison stays like for like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    server_support::init_tracing();
    if std::env::args().any(|a| a == "--hash-password") {
        let mut password = String::new();
        std::io::stdin().read_line(&mut password)?;
        let password = password.trim_end_matches(['\r', '\n']);
        println!("{}", gateway_mw::config::hash_password(password)?.expose());
        return Ok(());
    }
    let path = std::env::args()
        .skip_while(|a| a != "--config")
        .nth(1)
        .unwrap_or_else(|| "examples/gateway.toml".into());
    let config = GatewayConfig::load(path.as_ref())?;
    println!("gateway effective configuration ({path}):\n{config:#?}");
    // Validate and build everything first: an invalid configuration stops
    // here, before any port is taken.
    let server = GatewayServer::build(config).await?;
    if let Some(demo) = &server.config().demo_upstream {
        let listener = tokio::net::TcpListener::bind(demo.listen).await?;
        tokio::spawn(demo_upstream(listener));
    }
    // Then bind (which logs "gateway listening"), then serve.
    server
        .bind()
        .await?
        .serve(server_support::shutdown_signal())
        .await;
    Ok(())
}

/// A trivial upstream: echoes the method, path and the identity the gateway forwarded.
async fn demo_upstream(listener: tokio::net::TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn(
            |request: http::Request<hyper::body::Incoming>| async move {
                let subject = request
                    .headers()
                    .get("x-gateway-subject")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let body = serde_json::json!({"upstream": "demo", "method": request.method().as_str(), "path": request.uri().path(), "subject": subject});
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                    body.to_string(),
                ))))
            },
        );
        tokio::spawn(async move {
            // HTTP/1.1 and h2c (prior knowledge), for `http2 = true` upstreams.
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
        });
    }
}
