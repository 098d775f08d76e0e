//! One single-threaded runtime per serving thread, each with its own
//! listening socket on one address: the layout of nginx and HAProxy.
//!
//! [`serve()`](crate::serve()) on a multi-threaded runtime spreads
//! connections by work stealing, and a proxy's request then often crosses
//! threads twice (to the task that owns the upstream connection and back).
//! Here each thread accepts on its own socket ([`bind_reuseport`], with
//! `SO_REUSEPORT`: the kernel spreads new connections over the sockets by a
//! hash of their addresses) and runs everything those connections start on
//! itself. Measured on the gateway in `docs/PERFORMANCE.md` (issue 14).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::convert::Infallible;
//! use http_kit::{ServeConfig, Shutdown};
//!
//! let listeners = http_kit::per_thread::bind_reuseport("127.0.0.1:8080".parse().unwrap(), 2)?;
//! let service = tower::service_fn(|_request: http::Request<hyper::body::Incoming>| async {
//!     Ok::<_, Infallible>(http_kit::text(http::StatusCode::OK, "ok".to_owned()))
//! });
//! let report = http_kit::per_thread::serve(listeners, service, ServeConfig::default(), Shutdown::new()).await;
//! # let _ = report;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::{BoxError, ServeConfig, ServeReport, Shutdown};

/// `count` (at least 1) non-blocking listening sockets on `addr`, all with
/// `SO_REUSEPORT` (and `SO_REUSEADDR`): the first binds `addr` (port 0
/// picks a port), the others the address the first got.
///
/// # Errors
/// The first socket error (an address in use without `SO_REUSEPORT`, say).
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(count.max(1));
    for _ in 0..count.max(1) {
        let at = match listeners.first() {
            Some(first) => first.local_addr()?,
            None => addr,
        };
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        #[cfg(unix)]
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(1024)?;
        listeners.push(socket.into());
    }
    Ok(listeners)
}

/// Serves each listener with [`serve()`](crate::serve()) on a thread of its
/// own (named `serve-N`) with a single-threaded runtime, until `shutdown`
/// is triggered and drained; the reports are [merged](ServeReport::merged).
///
/// The caller's runtime only waits here, so what the service hands to it
/// (tasks spawned before, channels to them) keeps running. A thread whose
/// runtime or socket registration fails logs it and serves nothing; the
/// others go on.
pub async fn serve<S, B>(
    listeners: Vec<std::net::TcpListener>,
    service: S,
    config: ServeConfig,
    shutdown: Shutdown,
) -> ServeReport
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut pending = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let (service, config, shutdown) = (service.clone(), config.clone(), shutdown.clone());
        let (report_tx, report_rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("serve-{i}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!(error = %e, thread = i, "building a serving runtime failed");
                        return;
                    }
                };
                let report = runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => Some(crate::serve(listener, service, config, shutdown).await),
                        Err(e) => {
                            tracing::error!(error = %e, thread = i, "registering a listening socket failed");
                            None
                        }
                    }
                });
                let _ = report_tx.send(report);
            });
        match spawned {
            Ok(_) => pending.push(report_rx),
            Err(e) => tracing::error!(error = %e, thread = i, "spawning a serving thread failed"),
        }
    }
    let mut reports = Vec::with_capacity(pending.len());
    for report in pending {
        // A thread that could not serve reports nothing.
        if let Ok(Some(report)) = report.await {
            reports.push(report);
        }
    }
    ServeReport::merged(reports)
}
