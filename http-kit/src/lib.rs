//! # http_kit: the one HTTP edge of the ferrokeel suite
//!
//! Every HTTP adapter of the suite (metrics-core's ingest API, gateway-mw's
//! layers and reverse proxy, notify-hub's WebSocket server and HTTP API,
//! order-saga's services) is a [`tower::Service<Request<B>>`](tower::Service),
//! generic over the request body, answering `Response<`[`Body`]`>`. This
//! crate holds what they share, so it is written once:
//!
//! | module | what it gives |
//! | --- | --- |
//! | [`mod@serve`] | [`serve()`]: the accept loop with back-off on accept errors, `TCP_NODELAY`, a connection cap, a header-read timeout, the peer address and a [`Shutdown`] handle in every request's extensions, HTTP/1.1 upgrades (WebSocket), and a graceful drain |
//! | [`shutdown`] | [`Shutdown`]: trigger a drain, watch for it, and keep it waiting for work a request spawned (a WebSocket task) |
//! | [`error`] | [`ApiError`]: the suite's one JSON error body, `{"error": "<code>", "message": "<text>"}` |
//! | [`body`] | [`collect_limited`]: read a request body with a byte limit checked on `Content-Length` and while streaming |
//! | [`auth`] | [`bearer_token`]: the `Authorization: Bearer` credential, scheme matched case-insensitively (RFC 9110 §11.1) |
//! | [`path`] | [`path::decode_segment`]: a path segment percent-decoded once |
//! | [`query`] | [`Query`]: `application/x-www-form-urlencoded` query strings, decoded by `form_urlencoded` |
//! | [`prometheus`] | [`prometheus::response`]: a `prometheus-client` registry as an OpenMetrics response |
//! | [`response`] | [`json`], [`text`], [`empty`]: responses with the suite's body type |
//!
//! ## The error body
//!
//! Every error any ferrokeel server returns has this shape, with
//! `Content-Type: application/json` and `Cache-Control: no-store`:
//!
//! ```json
//! {"error": "body_too_large", "message": "request body exceeds 1048576 bytes"}
//! ```
//!
//! `error` is a stable, machine-readable code in `snake_case` (each crate's
//! API docs list its codes); `message` is for people and may change. A few
//! errors add fields beside the two (for example `retry_after_secs` on 429),
//! documented where they occur.
//!
//! ## Serving a service
//!
//! ```no_run
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use http_kit::{Body, ServeConfig, Shutdown, json, serve};
//!
//! # async fn run() -> std::io::Result<()> {
//! let service = tower::service_fn(|_request: Request<hyper::body::Incoming>| async {
//!     Ok::<_, Infallible>(json(StatusCode::OK, &serde_json::json!({"status": "ok"})))
//! });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let shutdown = Shutdown::new();
//! shutdown.trigger_on(async { let _ = tokio::signal::ctrl_c().await; });
//! let report = serve(listener, service, ServeConfig::default(), shutdown).await;
//! assert!(report.drained);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod auth;
pub mod body;
pub mod error;
mod head_deadline;
pub mod path;
pub mod per_thread;
pub mod prometheus;
pub mod query;
pub mod response;
pub mod serve;
pub mod shutdown;

pub use auth::bearer_token;
pub use body::{BodyError, collect_limited};
pub use error::{ApiError, ErrorBody};
pub use query::Query;
pub use response::{Body, BoxError, boxed, empty, full, json, text};
pub use serve::{
    ConnectionService, ConnectionSlot, PeerAddr, ResponseBody, ServeConfig, ServeReport, serve,
};
pub use shutdown::{DrainGuard, Shutdown};
