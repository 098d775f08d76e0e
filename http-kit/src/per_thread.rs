//! One single-threaded runtime per serving thread, each serving its share of
//! the connections: the layout of nginx and HAProxy.
//!
//! [`serve()`](crate::serve()) on a multi-threaded runtime spreads
//! connections by work stealing, and a proxy's request then often crosses
//! threads twice (to the task that owns the upstream connection and back).
//! Here one listening socket is accepted on by the first thread, which deals
//! the connections to the threads in turn; each thread then runs everything
//! its connections start on itself. Dealing in turn keeps the threads'
//! shares equal (±1): with `SO_REUSEPORT` the kernel hashes connections to
//! sockets (two wrk runs of 32 connections: 42 on one thread, 28 on the
//! other), and the gateway's throughput varied by 15 % between runs
//! (`docs/PERFORMANCE.md`, issue 14). With [`ServeConfig::pin_threads`]
//! (the default, Linux) and one thread per CPU, each thread is pinned to a
//! CPU of its own, as HAProxy's `cpu-map` and nginx's `worker_cpu_affinity`
//! do.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::convert::Infallible;
//! use http_kit::{ServeConfig, Shutdown};
//!
//! let listener = std::net::TcpListener::bind("127.0.0.1:8080")?;
//! let service = tower::service_fn(|_request: http::Request<hyper::body::Incoming>| async {
//!     Ok::<_, Infallible>(http_kit::text(http::StatusCode::OK, "ok".to_owned()))
//! });
//! let report = http_kit::per_thread::serve(listener, 2, service, ServeConfig::default(), Shutdown::new()).await;
//! # let _ = report;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::serve::{Accepting, ConnectionService, ResponseBody, spawn_connection};
use crate::{ServeConfig, ServeReport, Shutdown};

/// A connection dealt to a thread, with its slot.
type Dealt = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

/// Serves `listener` on `threads` threads (at least 1, named `serve-N`),
/// each with a single-threaded runtime, until `shutdown` is triggered and
/// drained. Thread 0 accepts, as [`serve()`](crate::serve()) does (one
/// [`ServeConfig::max_connections`] cap for all threads, the same back-off),
/// and deals each connection to the next thread in turn; every thread
/// serves its connections as `serve` does. The reports are
/// [merged](ServeReport::merged).
///
/// The caller's runtime only waits here, so what the service hands to it
/// (tasks spawned before, channels to them) keeps running. A thread whose
/// runtime fails to build logs it and serves nothing (its connections go to
/// the others); if it is thread 0, nothing is accepted.
pub async fn serve<S, B>(
    listener: std::net::TcpListener,
    threads: usize,
    service: S,
    config: ServeConfig,
    shutdown: Shutdown,
) -> ServeReport
where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let threads = threads.max(1);
    // The CPUs this process may run on, read here on the caller's thread:
    // pinned only with one thread for each of them (a thread count below
    // them is often a container's CPU quota, whose CPUs are not these).
    let allowed = if config.pin_threads {
        affinity::allowed()
    } else {
        None
    };
    if let Some((_, cpus)) = &allowed
        && cpus.len() != threads
    {
        tracing::info!(
            threads,
            cpus = cpus.len(),
            "as many serving threads as CPUs are pinned; these are not"
        );
    }
    let allowed = allowed.filter(|(_, cpus)| cpus.len() == threads);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..threads)
        .map(|_| mpsc::unbounded_channel::<Dealt>())
        .unzip();
    let mut listener = Some(listener);
    let mut senders = Some(senders);
    let mut pending = Vec::with_capacity(threads);
    for (i, dealt) in receivers.into_iter().enumerate() {
        let (service, config, shutdown) = (service.clone(), config.clone(), shutdown.clone());
        // Thread 0 accepts and deals.
        let acceptor = if i == 0 {
            listener.take().zip(senders.take())
        } else {
            None
        };
        let (report_tx, report_rx) = tokio::sync::oneshot::channel();
        let pin = allowed
            .as_ref()
            .and_then(|(mask, cpus)| Some((*mask, *cpus.get(i)?)));
        let spawned = std::thread::Builder::new()
            .name(format!("serve-{i}"))
            .spawn(move || {
                let mut builder = tokio::runtime::Builder::new_current_thread();
                if let Some((mask, cpu)) = pin {
                    if !affinity::pin(cpu) {
                        tracing::warn!(thread = i, cpu, "pinning a serving thread failed");
                    }
                    // Threads this runtime starts (its blocking pool: Argon2,
                    // DNS) would inherit the pin: they get the process's
                    // CPUs back.
                    builder.on_thread_start(move || affinity::restore(&mask));
                }
                let runtime = match builder.enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!(error = %e, thread = i, "building a serving runtime failed");
                        return;
                    }
                };
                let report = runtime.block_on(async move {
                    let dealing = acceptor.map(|(listener, senders)| {
                        tokio::spawn(deal(listener, senders, config.clone(), shutdown.clone()))
                    });
                    let mut report = serve_dealt(dealt, service, &config, &shutdown).await;
                    if let Some(dealing) = dealing {
                        match dealing.await {
                            Ok(Ok(accept_errors)) => report.accept_errors = accept_errors,
                            Ok(Err(e)) => {
                                tracing::error!(error = %e, "registering the listening socket failed");
                            }
                            Err(e) => tracing::error!(error = %e, "the accepting task failed"),
                        }
                    }
                    report
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
        // A thread that could not run reports nothing.
        if let Ok(report) = report.await {
            reports.push(report);
        }
    }
    ServeReport::merged(reports)
}

/// Accepts on `listener` until `shutdown`, dealing each connection to the
/// next thread that is still serving. Returns the accept errors survived.
async fn deal(
    listener: std::net::TcpListener,
    senders: Vec<mpsc::UnboundedSender<Dealt>>,
    config: ServeConfig,
    shutdown: Shutdown,
) -> std::io::Result<u64> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(
        config.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let mut report = ServeReport::merged([]);
    let mut accepting = Accepting::new(&listener, &slots, &shutdown);
    let mut next = 0usize;
    while let Some((stream, peer, permit)) = accepting.next(&mut report).await {
        // Off this runtime's reactor, onto the receiving thread's.
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let mut dealt = (stream, peer, permit);
        for _ in 0..senders.len() {
            let to = next % senders.len();
            next = next.wrapping_add(1);
            match senders[to].send(dealt) {
                Ok(()) => break,
                // That thread has stopped: try the next one (if none is
                // left, the connection is closed when `back` drops).
                Err(mpsc::error::SendError(back)) => dealt = back,
            }
        }
    }
    // Dropping the senders ends every thread's loop.
    Ok(report.accept_errors)
}

/// Serves the connections dealt to this thread until the dealer stops (at
/// shutdown), then waits for the drain.
async fn serve_dealt<S, B>(
    mut dealt: mpsc::UnboundedReceiver<Dealt>,
    service: S,
    config: &ServeConfig,
    shutdown: &Shutdown,
) -> ServeReport
where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let mut report = ServeReport::merged([]);
    while let Some((stream, peer, permit)) = dealt.recv().await {
        match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => {
                report.accepted += 1;
                spawn_connection(stream, peer, permit, service.clone(), config, shutdown);
            }
            Err(e) => tracing::debug!(%peer, error = %e, "registering a connection failed"),
        }
    }
    report.drained = shutdown.wait_idle(config.drain_timeout).await;
    report.left_open = shutdown.active();
    report
}

/// CPU affinity, on Linux; elsewhere nothing is pinned.
#[cfg(target_os = "linux")]
mod affinity {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;

    /// The calling thread's affinity mask, and the CPUs in it.
    pub(super) fn allowed() -> Option<(CpuSet, Vec<usize>)> {
        let mask = sched_getaffinity(Pid::from_raw(0)).ok()?;
        let cpus = (0..CpuSet::count())
            .filter(|&cpu| mask.is_set(cpu).unwrap_or(false))
            .collect();
        Some((mask, cpus))
    }

    /// Runs the calling thread on `cpu` only.
    pub(super) fn pin(cpu: usize) -> bool {
        let mut one = CpuSet::new();
        one.set(cpu).is_ok() && sched_setaffinity(Pid::from_raw(0), &one).is_ok()
    }

    /// Gives the calling thread `mask` back.
    pub(super) fn restore(mask: &CpuSet) {
        if let Err(e) = sched_setaffinity(Pid::from_raw(0), mask) {
            tracing::warn!(error = %e, "restoring a thread's CPU affinity failed");
        }
    }
}

/// CPU affinity, on Linux; elsewhere nothing is pinned.
#[cfg(not(target_os = "linux"))]
mod affinity {
    /// No mask here.
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Mask;

    pub(super) fn allowed() -> Option<(Mask, Vec<usize>)> {
        None
    }

    pub(super) fn pin(_cpu: usize) -> bool {
        false
    }

    pub(super) fn restore(_mask: &Mask) {}
}
