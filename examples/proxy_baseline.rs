//! A bare reverse proxy: hyper server, pooled hyper client, no middleware.
//!
//! It is the baseline `scripts/gateway-load` measures beside the gateway, so
//! the cost of the extra HTTP hop and the cost of the middleware show up
//! separately.
//!
//! ```text
//! cargo run --release --features gateway-proxy --example proxy_baseline -- 127.0.0.1:8081 http://127.0.0.1:9000 [--http2]
//! ```

use std::convert::Infallible;

use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};

// mimalloc rather than glibc's malloc: a proxy allocates and frees small
// buffers on every request from both worker threads, and glibc's arenas
// showed up as 11 % of the gateway's profile, lock waits included
// (docs/PERFORMANCE.md, "What was tried"). Both proxies measured by
// scripts/gateway-load use it, so their comparison stays like for like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8081".into());
    let upstream: http::Uri = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:9000".into())
        .parse()?;
    // `--http2`: h2c to the upstream, as the gateway does for `http2 = true`.
    let http2 = args.next().as_deref() == Some("--http2");
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(connector);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let (client, upstream) = (client.clone(), upstream.clone());
        let service =
            hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let (client, upstream) = (client.clone(), upstream.clone());
                async move {
                    let (mut parts, body) = request.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let mut uri = upstream.into_parts();
                    uri.path_and_query = parts.uri.path_and_query().cloned();
                    parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
                    parts.headers.remove(http::header::CONNECTION);
                    if http2 {
                        parts.version = http::Version::HTTP_2;
                    }
                    let response = match client
                        .request(http::Request::from_parts(parts, Full::new(body)))
                        .await
                    {
                        Ok(r) => r.map(|b| b.boxed()),
                        Err(_) => http::Response::builder()
                            .status(502)
                            .body(
                                Full::new(bytes::Bytes::new())
                                    .map_err(|never| match never {})
                                    .boxed(),
                            )
                            .unwrap_or_default(),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
