//! A bare reverse proxy: the gateway's forwarding path with no middleware.
//!
//! It is the baseline `scripts/gateway-load` measures beside the gateway, so
//! the cost of the extra HTTP hop and the cost of the middleware show up
//! separately. It forwards as the gateway does: `http_kit`'s server, the
//! gateway's per-thread HTTP/1.1 upstream pool (`UpstreamPool`), and one
//! single-threaded runtime per core (`runtime = "per_core"`); `--multi-thread`
//! serves on one multi-threaded runtime instead, and `--http2` speaks h2c to
//! the upstream through hyper-util's client (`http2 = true`).
//!
//! ```text
//! cargo run --release --features gateway-proxy --example proxy_baseline -- 127.0.0.1:8081 http://127.0.0.1:9000 [--http2] [--multi-thread]
//! ```

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use gateway_mw::server::UpstreamPool;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

// mimalloc rather than glibc's malloc: a proxy allocates and frees small
// buffers on every request from both worker threads, and glibc's arenas
// showed up as 11 % of the gateway's profile, lock waits included
// (docs/PERFORMANCE.md, "What was tried"). Both proxies measured by
// scripts/gateway-load use it, so their comparison stays like for like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where requests go.
struct Forward {
    upstream: http::Uri,
    http2: Option<Client<HttpConnector, Full<Bytes>>>,
    pool: UpstreamPool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen: std::net::SocketAddr = args
        .first()
        .map_or("127.0.0.1:8081", String::as_str)
        .parse()?;
    let upstream: http::Uri = args
        .get(1)
        .map_or("http://127.0.0.1:9000", String::as_str)
        .parse()?;
    let http2 = args.iter().any(|a| a == "--http2").then(|| {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector)
    });
    let forward = Arc::new(Forward {
        upstream,
        http2,
        pool: UpstreamPool::new(),
    });
    let service = tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let forward = Arc::clone(&forward);
        async move { Ok::<_, Infallible>(forward.send(request).await) }
    });
    let (config, shutdown) = (http_kit::ServeConfig::default(), http_kit::Shutdown::new());
    if args.iter().any(|a| a == "--multi-thread") {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        http_kit::serve(listener, service, config, shutdown).await;
    } else {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let listener = std::net::TcpListener::bind(listen)?;
        http_kit::per_thread::serve(listener, threads, service, config, shutdown).await;
    }
    Ok(())
}

impl Forward {
    async fn send(
        &self,
        request: http::Request<hyper::body::Incoming>,
    ) -> http::Response<http_kit::Body> {
        let (mut parts, body) = request.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut uri = self.upstream.clone().into_parts();
        uri.path_and_query = parts.uri.path_and_query().cloned();
        parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
        parts.headers.remove(http::header::CONNECTION);
        let authority = parts.uri.authority().cloned();
        let response = match (&self.http2, authority) {
            (Some(client), _) => {
                parts.version = http::Version::HTTP_2;
                let request = http::Request::from_parts(parts, Full::new(body));
                client
                    .request(request)
                    .await
                    .map(|response| response.map(http_kit::boxed))
                    .map_err(http_kit::BoxError::from)
            }
            (None, Some(authority)) => {
                let request = http::Request::from_parts(parts, Full::new(body));
                self.pool
                    .send(&authority, request)
                    .await
                    .map(|response| response.map(http_kit::boxed))
                    .map_err(http_kit::BoxError::from)
            }
            (None, None) => Err("the upstream URI has no authority".into()),
        };
        match response {
            Ok(mut response) => {
                // As the gateway: the upstream's `Connection: close` ends
                // the upstream connection, not the client's.
                gateway_mw::http::strip_response_hop_by_hop(response.headers_mut());
                response
            }
            Err(_) => http_kit::empty(http::StatusCode::BAD_GATEWAY),
        }
    }
}
