//! A complete gateway built from a [`GatewayConfig`] (feature `proxy`): the
//! layers of [`crate::http`] in front of a pooled hyper client that forwards
//! to the configured upstreams, plus the demo token endpoints, health,
//! readiness and metrics. The example `gateway` is a thin `main` over this.
//!
//! Request flow for `/v1/...` routes:
//! metrics → security headers → CORS → request id → client IP → validation →
//! authentication → authorization → rate limit → proxy.
//! `/auth/token`, `/auth/refresh` and `/auth/logout` skip authentication and
//! are rate-limited per client IP instead.

mod admin;
mod build;
mod h1;
mod health;
mod login;
pub mod pool;
mod proxy;
mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

use crate::audit::AuditLog;
use crate::config::{GatewayConfig, RuntimeLayout};
use crate::http::{GatewayBody, GatewayMetrics, Routed};
use crate::router::{PathOptions, normalize_path};

pub use h1::ProtocolError;
pub use pool::{UpstreamBody, UpstreamError, UpstreamPool};

use login::Tokens;
use proxy::Upstream;
use routes::{Handler, Matched};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything a request needs, shared by all connections.
struct State {
    /// HTTP/1.1 upstream connections, pooled per thread (see `pool`).
    pool: pool::UpstreamPool,
    /// For upstreams with `http2 = true`.
    client_h2: Client<HttpConnector, Full<Bytes>>,
    /// The one route table (see `routes`).
    routes: routes::RouteTable,
    all_upstreams: Vec<Upstream>,
    tokens: Option<Tokens>,
    #[cfg(feature = "redis")]
    redis: Option<fred::prelude::Client>,
    users: login::Users,
    audit: Arc<AuditLog>,
    metrics: Arc<GatewayMetrics>,
}

/// A gateway ready to serve.
pub struct GatewayServer {
    config: GatewayConfig,
    state: Arc<State>,
    api: BoxedService,
    auth: BoxedService,
}

impl std::fmt::Debug for GatewayServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayServer")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

type BoxedService =
    tower::util::BoxCloneSyncService<Request<Incoming>, Response<GatewayBody>, Infallible>;

impl GatewayServer {
    /// The configuration in use.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Binds `config.listen` and logs that the gateway is listening. The
    /// server is already built, so an invalid configuration never takes the
    /// port (see [`run`]).
    pub async fn bind(self) -> Result<BoundGateway, crate::Error> {
        let addr = self.config.listen;
        let bind_error = |source| crate::Error::Bind { addr, source };
        let sockets = match self.config.runtime {
            RuntimeLayout::MultiThread => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(bind_error)?;
                Sockets::One(listener)
            }
            RuntimeLayout::PerCore => {
                let threads = self.config.threads.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
                });
                let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
                Sockets::PerThread { listener, threads }
            }
        };
        let local = sockets.local_addr().unwrap_or(addr);
        tracing::info!(addr = %local, runtime = ?self.config.runtime, "gateway listening");
        Ok(BoundGateway {
            server: self,
            sockets,
        })
    }

    /// Serves on `listener` with [`http_kit::serve()`] until `shutdown`
    /// completes, then stops accepting, lets in-flight requests finish for
    /// up to `shutdown_grace_secs`, and flushes the audit log. It serves on
    /// the caller's runtime, whatever `runtime` says ([`BoundGateway::serve`]
    /// follows it).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        self.serve_sockets(Sockets::One(listener), shutdown).await;
    }

    async fn serve_sockets(
        self,
        sockets: Sockets,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        // Shared, so a request clones only the stack it is routed to.
        let stacks = Arc::new((self.api.clone(), self.auth.clone()));
        let state = Arc::clone(&self.state);
        let service = tower::service_fn(move |request: Request<Incoming>| {
            dispatch(Arc::clone(&stacks), Arc::clone(&state), request)
        });
        let config = http_kit::ServeConfig::default()
            .with_drain_timeout(Duration::from_secs(self.config.shutdown_grace_secs))
            .with_pin_threads(self.config.pin_threads);
        let drain = http_kit::Shutdown::new();
        let trigger = drain.clone();
        let serving = async move {
            match sockets {
                Sockets::One(listener) => http_kit::serve(listener, service, config, drain).await,
                Sockets::PerThread { listener, threads } => {
                    http_kit::per_thread::serve(listener, threads, service, config, drain).await
                }
            }
        };
        let (report, ()) = tokio::join!(serving, async move {
            shutdown.await;
            trigger.trigger();
        });
        if !report.drained {
            tracing::warn!(
                open = report.left_open,
                "in-flight requests still running after the grace period"
            );
        }
        // Write every queued audit record before returning (bounded: a
        // stuck disk must not hold the process forever).
        match tokio::time::timeout(Duration::from_secs(5), self.state.audit.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "closing the audit log failed"),
            Err(_) => tracing::error!("the audit log did not finish writing within 5 s"),
        }
    }
}

/// The listening sockets of a bound gateway.
#[derive(Debug)]
enum Sockets {
    /// One socket, served on the caller's runtime.
    One(tokio::net::TcpListener),
    /// One socket whose connections are dealt to the serving threads
    /// (`runtime = "per_core"`).
    PerThread {
        listener: std::net::TcpListener,
        threads: usize,
    },
}

impl Sockets {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Sockets::One(listener) => listener.local_addr(),
            Sockets::PerThread { listener, .. } => listener.local_addr(),
        }
    }
}

/// A built gateway that holds its listening socket(s).
#[derive(Debug)]
pub struct BoundGateway {
    server: GatewayServer,
    sockets: Sockets,
}

impl BoundGateway {
    /// The address it listens on (the port the OS chose for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.sockets.local_addr()
    }

    /// Serves until `shutdown` completes, as [`GatewayServer::serve`] does,
    /// with the configured `runtime`: on the caller's runtime, or with
    /// `per_core` on threads of its own (the caller's runtime then only
    /// waits, and runs the audit writer and the Redis connections).
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        self.server.serve_sockets(self.sockets, shutdown).await;
    }
}

/// Starts a gateway in the only safe order: validate and build everything
/// ([`GatewayServer::build`]: keys, policy, routes, the audit log, Redis),
/// then bind `config.listen`, then log that it listens, then serve until
/// `shutdown` completes. An invalid configuration returns
/// [`Error::Config`](crate::Error::Config) without ever binding the port.
pub async fn run(
    config: GatewayConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), crate::Error> {
    GatewayServer::build(config)
        .await?
        .bind()
        .await?
        .serve(shutdown)
        .await;
    Ok(())
}

/// Routes a request to health, metrics, the auth endpoints or the API stack,
/// after giving it a safe request id (`http_kit::serve` has already put the
/// peer address in its extensions).
async fn dispatch(
    stacks: Arc<(BoxedService, BoxedService)>,
    state: Arc<State>,
    mut request: Request<Incoming>,
) -> Result<Response<GatewayBody>, Infallible> {
    let request_id = crate::http::assign_request_id(&mut request)
        .header_value()
        .clone();
    // The one routing of this request; the layers and handlers behind reuse
    // it. It routes the path's normal form, the spelling validation forwards
    // (with the gateway's options: `;` refused); a path without one gets no
    // route here and is refused by validation (400) behind.
    let route = match normalize_path(request.uri().path(), PathOptions::default()) {
        Ok(path) => state
            .routes
            .find(request.method().as_str(), &path)
            .map(|r| Arc::clone(r.value)),
        Err(_) => None,
    };
    let built_in = |mut response: Response<GatewayBody>| {
        // The API stack adds these through its layer; the built-in
        // endpoints answer here, so they get them here.
        crate::http::SecurityHeaders::default().apply("", response.headers_mut());
        response
    };
    let mut response = match route.as_ref().map(|r| &r.handler) {
        Some(Handler::Healthz) => {
            built_in(json(StatusCode::OK, serde_json::json!({"status": "ok"})))
        }
        Some(Handler::Readyz) => built_in(health::readiness(&state).await),
        Some(Handler::Metrics) => {
            let mut r = text(StatusCode::OK, state.metrics.encode());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(http_kit::prometheus::CONTENT_TYPE),
            );
            built_in(r)
        }
        handler => {
            let login = matches!(handler, Some(Handler::Login(_)));
            let routed = route
                .as_ref()
                .map_or_else(Routed::default, |r| r.routed.clone());
            request.extensions_mut().insert(routed);
            if let Some(route) = route {
                request.extensions_mut().insert(Matched(route));
            }
            let (api, auth) = &*stacks;
            if login {
                auth.clone().oneshot(request).await?
            } else {
                api.clone().oneshot(request).await?
            }
        }
    };
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id);
    Ok(response)
}

pub(super) fn json(status: StatusCode, body: serde_json::Value) -> Response<GatewayBody> {
    http_kit::json(status, &body)
}

pub(super) fn text(status: StatusCode, body: String) -> Response<GatewayBody> {
    http_kit::text(status, body)
}
