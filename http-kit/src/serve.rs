//! [`serve()`]: the suite's one accept loop.
//!
//! What it does, in order, for every connection:
//!
//! 1. Waits for a free slot (at most [`ServeConfig::max_connections`] open
//!    connections; the rest wait in the kernel's listen backlog). The cap
//!    bounds what the server holds per connection; set it below the
//!    process's descriptor limit (`ulimit -n`), since a proxy also opens
//!    sockets of its own.
//! 2. Accepts. A resource error (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`)
//!    is logged and retried after a back-off that doubles from 1 ms to 1 s,
//!    so the loop never spins on a full descriptor table; an error about
//!    one connection only (`ECONNABORTED`, `ECONNRESET`…) is retried at
//!    once, so a client that aborts handshakes cannot slow accepting down.
//! 3. Sets `TCP_NODELAY` (responses are small and latency-bound).
//! 4. Serves HTTP/1.1 with upgrades (WebSocket) and a header-read timeout
//!    (against clients that never finish their headers; bodies are bounded
//!    by size, [`collect_limited`](crate::collect_limited), not by time),
//!    inserting into every request's extensions the [`PeerAddr`], the
//!    server's [`Shutdown`] and the [`ConnectionSlot`].
//!
//! When the [`Shutdown`] is triggered it stops accepting (the listener is
//! closed), asks every connection to finish its request in flight and
//! close, and waits up to [`ServeConfig::drain_timeout`] for connections and
//! [`DrainGuard`](crate::DrainGuard)s to end. Connections still open then
//! are not aborted: `serve` returns, reporting them in
//! [`ServeReport::left_open`], and they end with the runtime. Use one
//! [`Shutdown`] per `serve` call: its counts are the drain's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use crate::head_deadline::{HeadDeadline, Tracked};
use crate::response::BoxError;
use crate::shutdown::Shutdown;

/// The TCP peer of the connection a request came on; [`serve()`] inserts
/// it into every request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The connection's place under [`ServeConfig::max_connections`], in every
/// request's extensions. Work that outlives the HTTP connection (a
/// WebSocket after the upgrade) clones it to stay counted until it ends.
#[derive(Debug, Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// Settings of [`serve()`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeConfig {
    /// Most connections open at once (WebSockets that keep their
    /// [`ConnectionSlot`] included). Default 10,000.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, counted
    /// from when the server starts waiting for them: from the connection's
    /// start, and on a keep-alive connection from when hyper took the
    /// previous response body's last frame. The connection is then closed
    /// without a response. A request body still arriving after its response
    /// has ended (a handler that answers early and keeps reading the
    /// upload) counts against this time too: give such handlers a timeout
    /// longer than their uploads. Default 30 s.
    pub header_read_timeout: Duration,
    /// How long the drain waits for connections and guards. Default 10 s.
    pub drain_timeout: Duration,
    /// Set `TCP_NODELAY` on accepted sockets. Default true.
    pub nodelay: bool,
    /// [`per_thread::serve`](crate::per_thread::serve) only, on Linux: pin
    /// serving thread *i* to the *i*-th CPU of the process's affinity mask,
    /// when there are exactly as many threads as CPUs in it (fewer threads
    /// is often a container's CPU quota, whose CPUs those are not). The
    /// threads a serving runtime starts (its blocking pool) are not pinned.
    /// Unpinned, the scheduler sometimes ran
    /// both serving threads of a 2-core machine on one core for a time
    /// slice, and every connection of the waiting thread stalled: the
    /// proxy's p99 was 4.1 ms unpinned against 0.7 ms pinned, at the same
    /// throughput (`docs/PERFORMANCE.md`, issue 14). Turn it off when other
    /// busy processes share these CPUs. Default true.
    pub pin_threads: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            nodelay: true,
            pin_threads: true,
        }
    }
}

impl ServeConfig {
    /// Sets [`ServeConfig::max_connections`] (at least 1).
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// Sets [`ServeConfig::pin_threads`].
    pub fn with_pin_threads(mut self, pin: bool) -> Self {
        self.pin_threads = pin;
        self
    }

    /// Sets [`ServeConfig::drain_timeout`].
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Sets [`ServeConfig::header_read_timeout`].
    pub fn with_header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }
}

/// How a [`serve()`] call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServeReport {
    /// Connections accepted over the server's life.
    pub accepted: u64,
    /// Accept errors survived (each followed by a back-off).
    pub accept_errors: u64,
    /// True when every connection and guard ended within the drain timeout.
    pub drained: bool,
    /// Connections and guards still open when `serve` returned.
    pub left_open: usize,
}

impl ServeReport {
    /// One report for several listeners served side by side (one per
    /// thread, say): counts add up, drained only if every one drained, and
    /// the most connections any one left open (they share one
    /// [`Shutdown`], so each saw them all). No reports: nothing accepted,
    /// drained.
    pub fn merged(reports: impl IntoIterator<Item = ServeReport>) -> ServeReport {
        reports.into_iter().fold(
            ServeReport {
                accepted: 0,
                accept_errors: 0,
                drained: true,
                left_open: 0,
            },
            |total, report| ServeReport {
                accepted: total.accepted + report.accepted,
                accept_errors: total.accept_errors + report.accept_errors,
                drained: total.drained && report.drained,
                left_open: total.left_open.max(report.left_open),
            },
        )
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The services [`serve`] and [`per_thread::serve`](crate::per_thread::serve)
/// run: a `Clone` tower service from hyper's requests to responses with body
/// `B`, whose futures may move between threads and whose errors convert to a
/// [`BoxError`]. Implemented for every such type; it only names those bounds
/// once.
pub trait ConnectionService<B>:
    tower::Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> ConnectionService<B> for S where
    S: tower::Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Clone
        + Send
        + 'static
{
}

/// The response bodies [`serve`] writes: `Send`, with `Send` chunks and
/// errors that convert to a [`BoxError`]. Implemented for every such type.
pub trait ResponseBody:
    http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static
{
}

impl<B> ResponseBody for B where
    B: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static
{
}

/// Serves `service` on `listener` until `shutdown` is triggered, then
/// drains (see the [module docs](self)).
///
/// `service` is any `tower::Service<Request<Incoming>>` that is `Clone`
/// (cloned once per request); its errors end only the connection they
/// happen on, logged at debug.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    config: ServeConfig,
    shutdown: Shutdown,
) -> ServeReport
where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let slots = Arc::new(Semaphore::new(
        config.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let mut report = ServeReport {
        accepted: 0,
        accept_errors: 0,
        drained: true,
        left_open: 0,
    };
    let mut accepting = Accepting::new(&listener, &slots, &shutdown);
    while let Some((stream, peer, permit)) = accepting.next(&mut report).await {
        report.accepted += 1;
        spawn_connection(stream, peer, permit, service.clone(), &config, &shutdown);
    }
    drop(listener);
    report.drained = shutdown.wait_idle(config.drain_timeout).await;
    report.left_open = shutdown.active();
    if !report.drained {
        tracing::warn!(
            open = report.left_open,
            "connections still open after the drain timeout"
        );
    }
    report
}

/// Steps 1 and 2 of the module docs: a slot, then a connection, with the
/// back-off on resource errors.
pub(crate) struct Accepting<'a> {
    listener: &'a TcpListener,
    slots: &'a Arc<Semaphore>,
    shutdown: &'a Shutdown,
    backoff: Duration,
}

impl<'a> Accepting<'a> {
    pub(crate) fn new(
        listener: &'a TcpListener,
        slots: &'a Arc<Semaphore>,
        shutdown: &'a Shutdown,
    ) -> Accepting<'a> {
        Accepting {
            listener,
            slots,
            shutdown,
            backoff: FIRST_BACKOFF,
        }
    }

    /// The next connection and its slot; `None` once `shutdown` is
    /// triggered. Accept errors are counted in `report`.
    pub(crate) async fn next(
        &mut self,
        report: &mut ServeReport,
    ) -> Option<(tokio::net::TcpStream, SocketAddr, OwnedSemaphorePermit)> {
        loop {
            let permit = tokio::select! {
                biased;
                () = self.shutdown.triggered() => return None,
                permit = Arc::clone(self.slots).acquire_owned() => permit.ok()?, // never closed
            };
            let accepted = tokio::select! {
                biased;
                () = self.shutdown.triggered() => return None,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    self.backoff = FIRST_BACKOFF;
                    return Some((stream, peer, permit));
                }
                Err(e) if !is_resource_error(&e) => {
                    // About this one connection (aborted, reset): the next
                    // one may be fine, so accept again at once.
                    report.accept_errors += 1;
                    tracing::debug!(error = %e, "accept failed for one connection");
                }
                Err(e) => {
                    report.accept_errors += 1;
                    tracing::warn!(error = %e, backoff_ms = self.backoff.as_millis() as u64, "accept failed; backing off");
                    drop(permit);
                    tokio::select! {
                        () = self.shutdown.triggered() => return None,
                        () = tokio::time::sleep(self.backoff) => {}
                    }
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// Steps 3 and 4 of the module docs: serves `stream` on a task of its own
/// until it closes, or finishes its request in flight once `shutdown` is
/// triggered.
pub(crate) fn spawn_connection<S, B>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    service: S,
    config: &ServeConfig,
    shutdown: &Shutdown,
) where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    if config.nodelay
        && let Err(e) = stream.set_nodelay(true)
    {
        tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
    }
    let slot = ConnectionSlot(Arc::new(permit));
    // A handle of the connection's own: cloned for every request below.
    let per_request = shutdown.for_connection();
    // The header-read timeout is kept outside hyper (see `head_deadline`).
    let head_deadline = HeadDeadline::new();
    let requests = head_deadline.clone();
    let hyper_service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let in_flight = requests.begin();
        let extensions = request.extensions_mut();
        extensions.insert(PeerAddr(peer));
        extensions.insert(per_request.clone());
        extensions.insert(slot.clone());
        Tracked::new(service.clone().oneshot(request), in_flight)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), hyper_service)
        .with_upgrades();
    let guard = shutdown.guard();
    let draining = shutdown.clone();
    let header_read_timeout = config.header_read_timeout;
    tokio::spawn(async move {
        let _guard = guard;
        tokio::pin!(connection);
        let expired = head_deadline.expired(header_read_timeout);
        tokio::pin!(expired);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = expired.as_mut() => {
                tracing::debug!(%peer, "no request head within the header-read timeout; closing");
                return;
            }
            () = draining.triggered() => {
                connection.as_mut().graceful_shutdown();
                tokio::select! {
                    result = connection.as_mut() => result,
                    () = expired.as_mut() => {
                        tracing::debug!(%peer, "no request head within the header-read timeout while draining; closing");
                        return;
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    });
}

/// Accept errors that mean the process or the system is out of something:
/// retrying at once would spin.
fn is_resource_error(error: &std::io::Error) -> bool {
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    const ENOBUFS: i32 = 105;
    matches!(
        error.raw_os_error(),
        Some(ENOMEM | ENFILE | EMFILE | ENOBUFS)
    )
}
