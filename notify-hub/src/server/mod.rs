//! The hyper 1.x adapter: the WebSocket endpoint (`GET /v1/ws`), the HTTP
//! API, health checks and metrics, with graceful shutdown.
//!
//! Protocol: `docs/notify-hub/PROTOCOL.md`; HTTP API: `docs/notify-hub/API.md`.

mod api;
mod demo;
mod live_socket;
mod metrics;
mod session;
mod ws;

pub use metrics::ServerMetrics;
pub use ws::close_codes;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_kit::{ApiError, BoxError, ServeConfig, ServeReport, Shutdown};

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
    /// Most open connections, WebSockets included, when served by
    /// [`NotifyServer::serve`]; more wait in the kernel's backlog.
    /// Default 50,000.
    pub max_connections: usize,
    /// Whether `GET /demo` serves the browser demo client (and
    /// `GET /demo.js` its script). Default `false`.
    pub demo_page: bool,
    /// Whether live group items are written through to `notify.v2`
    /// connections by the hub's dispatch tasks (ADR 0027) rather than
    /// queued for each connection's task. Default `true`.
    pub write_through: bool,
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
            max_connections: 50_000,
            demo_page: false,
            write_through: true,
        }
    }
}

impl ServerConfig {
    /// Sets the heartbeat interval.
    pub fn with_heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Serves (or not) the browser demo client at `GET /demo`.
    pub fn with_demo_page(mut self, on: bool) -> Self {
        self.demo_page = on;
        self
    }

    /// Writes live group items through to `notify.v2` connections, or
    /// queues them for each connection's task (see
    /// [`ServerConfig::write_through`]).
    pub fn with_write_through(mut self, on: bool) -> Self {
        self.write_through = on;
        self
    }
}

/// The response body type of the server (the suite's one body type).
pub type Body = http_kit::Body;

/// The notification server: a [`tower::Service<Request<B>>`](tower::Service)
/// (generic over the request body, so it sits behind any tower layers),
/// or run it with [`NotifyServer::serve`].
#[derive(Clone)]
pub struct NotifyServer {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Hub,
    auth: Arc<dyn Authenticator>,
    config: ServerConfig,
    metrics: Arc<ServerMetrics>,
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

    /// Answers one request. A WebSocket upgrade takes hyper's `OnUpgrade`
    /// from the request's extensions, so the request must come from a
    /// hyper server with upgrades on (as [`http_kit::serve()`] runs it).
    ///
    /// Open WebSockets end when the hub shuts down (each flushes and
    /// closes with 1001). Serving this service yourself, shut the hub down
    /// when your drain starts, as [`NotifyServer::serve`] and
    /// `examples/suite.rs` do; otherwise the drain waits its full timeout.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
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
            (&Method::GET, ["metrics"]) => self.inner.metrics.response(),
            (&Method::GET, [asset @ ("demo" | "demo.js")]) if self.inner.config.demo_page => {
                demo::asset(asset).unwrap_or_else(|| ApiError::not_found().into_response())
            }
            (_, ["v1", ..]) => api::handle(self, request, &segments).await,
            _ => ApiError::not_found().into_response(),
        }
    }

    /// Serves `listener` on [`http_kit::serve()`] until `shutdown` completes.
    /// Then it stops accepting, shuts the hub down (every queued send is
    /// stored and delivered), lets each WebSocket flush its queue and close
    /// with 1001, and waits up to [`ServerConfig::shutdown_grace`] for them.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> ServeReport {
        let grace = self.inner.config.shutdown_grace;
        let config = ServeConfig::default()
            .with_drain_timeout(grace)
            .with_max_connections(self.inner.config.max_connections);
        let drain = Shutdown::new();
        let hub = self.inner.hub.clone();
        let serving = http_kit::serve(listener, self, config, drain.clone());
        let stopping = async move {
            shutdown.await;
            // Stop accepting first, then end the hub: that stores and
            // publishes what is queued and ends every subscription, so each
            // socket flushes and closes with 1001, dropping its drain guard.
            drain.trigger();
            if !hub.shutdown(grace).await {
                tracing::warn!("hub writer did not finish within the grace period");
            }
        };
        let (report, ()) = tokio::join!(serving, stopping);
        report
    }
}

impl<B> tower::Service<Request<B>> for NotifyServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let server = self.clone();
        Box::pin(async move { Ok(server.handle(request).await) })
    }
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    http_kit::json(status, value)
}

/// The suite's error body: `{"error": code, "message": message}`.
pub(crate) fn error(status: StatusCode, code: &'static str, message: &str) -> Response<Body> {
    ApiError::new(status, code, message).into_response()
}
