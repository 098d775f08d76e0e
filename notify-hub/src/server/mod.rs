//! The hyper 1.x adapter: the WebSocket endpoint (`GET /v1/ws`), the HTTP
//! API, health checks and metrics, with graceful shutdown.
//!
//! Protocol: `docs/notify-hub/PROTOCOL.md`; HTTP API: `docs/notify-hub/API.md`.

mod api;
mod metrics;
mod ws;

pub use metrics::ServerMetrics;
pub use ws::close_codes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

use crate::Hub;
use crate::auth::Authenticator;

/// Settings of the WebSocket endpoint and the HTTP API.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Interval between server pings (at least 10 ms). Default 25 s.
    pub heartbeat: Duration,
    /// Longest a single frame write may take before the peer counts as
    /// gone and is dropped. Default 10 s.
    pub write_timeout: Duration,
    /// Pings a peer may leave unanswered before it is dropped. Default 2.
    pub max_missed_pongs: u32,
    /// Largest client message (and frame), in bytes. Default 16 KiB.
    pub max_client_message: usize,
    /// Invalid client frames tolerated (each answered with an error frame)
    /// before the connection is closed with 1008. Default 3.
    pub max_invalid_frames: u32,
    /// Largest HTTP API request body, in bytes. Default 1 MiB.
    pub max_body_bytes: usize,
    /// The role a service token needs to use the HTTP API. Default `notify:send`.
    pub service_role: String,
    /// How long shutdown waits for connections to flush and close. Default 10 s.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            heartbeat: Duration::from_secs(25),
            write_timeout: Duration::from_secs(10),
            max_missed_pongs: 2,
            max_client_message: 16 * 1024,
            max_invalid_frames: 3,
            max_body_bytes: 1024 * 1024,
            service_role: "notify:send".into(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    /// Sets the heartbeat interval.
    pub fn with_heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }
}

/// The response body type of the server.
pub type Body = Full<Bytes>;

/// The notification server: route requests with [`NotifyServer::handle`]
/// inside your own hyper service, or run [`NotifyServer::serve`].
#[derive(Clone)]
pub struct NotifyServer {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Hub,
    auth: Arc<dyn Authenticator>,
    config: ServerConfig,
    metrics: Arc<ServerMetrics>,
    /// Open HTTP connections and WebSocket tasks, so shutdown can wait for them.
    sockets: AtomicUsize,
    sockets_done: Notify,
}

impl std::fmt::Debug for NotifyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyServer")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl NotifyServer {
    /// A server for `hub`, authenticating with `auth`.
    pub fn new(hub: Hub, auth: impl Authenticator, config: ServerConfig) -> NotifyServer {
        let metrics = ServerMetrics::new(hub.clone());
        NotifyServer {
            inner: Arc::new(Inner {
                hub,
                auth: Arc::new(auth),
                config,
                metrics,
                sockets: AtomicUsize::new(0),
                sockets_done: Notify::new(),
            }),
        }
    }

    /// The hub behind the server.
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// The metrics `GET /metrics` serves.
    pub fn metrics(&self) -> &ServerMetrics {
        &self.inner.metrics
    }

    /// Answers one request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (request.method(), segments.as_slice()) {
            (&Method::GET, ["v1", "ws"]) => ws::upgrade(self, request).await,
            (&Method::GET, ["healthz"]) => {
                json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
            }
            (&Method::GET, ["readyz"]) => match self.inner.hub.ready().await {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
                Err(e) => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_ready",
                    &crate::error::report(&e),
                ),
            },
            (&Method::GET, ["metrics"]) => Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(Full::new(Bytes::from(self.inner.metrics.encode())))
                .unwrap_or_else(|_| internal()),
            (_, ["v1", ..]) => api::handle(self, request, &segments).await,
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        }
    }

    /// Serves `listener` until `shutdown` completes. Then it stops
    /// accepting, shuts the hub down (every queued send is stored and
    /// delivered), lets each WebSocket flush its queue and close with 1001,
    /// and waits up to [`ServerConfig::shutdown_grace`] for them.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        // hyper-util's GracefulShutdown does not take upgradeable
        // connections, so each connection watches this signal itself.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer): (tokio::net::TcpStream, SocketAddr) = match accepted {
                        Ok(c) => c,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let server = self.clone();
                    let service = hyper::service::service_fn(move |request| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(request).await) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    let mut stopped = stopped.clone();
                    let tracker = self.track();
                    tokio::spawn(async move {
                        let _tracker = tracker;
                        tokio::pin!(connection);
                        let result = tokio::select! {
                            r = connection.as_mut() => r,
                            () = async { let _ = stopped.wait_for(|s| *s).await; } => {
                                connection.as_mut().graceful_shutdown();
                                connection.await
                            }
                        };
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        let grace = self.inner.config.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        // Stores and publishes what is queued, then ends every subscription;
        // each socket flushes and closes with 1001.
        if !self.inner.hub.shutdown(grace).await {
            tracing::warn!("hub writer did not finish within the grace period");
        }
        let _ = stop.send(true);
        while self.inner.sockets.load(Ordering::Acquire) > 0 {
            let notified = self.inner.sockets_done.notified();
            if self.inner.sockets.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    open = self.inner.sockets.load(Ordering::Acquire),
                    "connections still open after the grace period"
                );
                break;
            }
        }
    }
}

/// Counts one open connection or socket task until dropped.
pub(crate) struct Tracker(Arc<Inner>);

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.0.sockets.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.sockets_done.notify_waiters();
        }
    }
}

impl NotifyServer {
    pub(crate) fn track(&self) -> Tracker {
        self.inner.sockets.fetch_add(1, Ordering::AcqRel);
        Tracker(Arc::clone(&self.inner))
    }
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap_or_else(|_| internal())
}

/// A JSON error body: `{"error": code, "message": message}`.
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": code, "message": message}),
    )
}

fn internal() -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

/// The bearer token of a request: `Authorization: Bearer …`.
pub(crate) fn bearer(request: &Request<Incoming>) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The first value of query parameter `name`, percent-decoded. A value
/// with a bad escape is returned as sent, so the caller's own validation
/// refuses it (rather than the parameter silently counting as absent).
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == name).then(|| percent_decode(v).unwrap_or_else(|| v.to_owned()))
    })
}

/// Decodes `%XX` escapes (and `+` as space); `None` on bad escapes or
/// invalid UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let q = Some("since=42&access_token=a.b%2Ec&x");
        assert_eq!(query_param(q, "since").as_deref(), Some("42"));
        assert_eq!(query_param(q, "access_token").as_deref(), Some("a.b.c"));
        assert_eq!(query_param(q, "x").as_deref(), Some(""));
        assert_eq!(query_param(q, "y"), None);
        assert_eq!(query_param(None, "since"), None);
        assert_eq!(
            query_param(Some("since=%zz"), "since").as_deref(),
            Some("%zz")
        );
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("a%20b+c").as_deref(), Some("a b c"));
    }
}
