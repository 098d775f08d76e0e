//! Pooled HTTP/1.1 connections to the upstreams, one pool per thread.
//!
//! hyper-util's pooled client keeps one pool behind a mutex, races a new
//! connection against every checkout that finds no idle one, and hands each
//! request to the connection's task through two channels. A proxy on this
//! path does that for every request, so the gateway keeps its own, smaller
//! pool for HTTP/1.1 upstreams (HTTP/2 ones multiplex over one connection
//! and stay on hyper-util's client):
//!
//! * idle connections are kept per thread, so a checkout takes no lock, and
//!   with one runtime per core (`runtime = "per_core"`) a connection's task
//!   runs on the thread whose requests use it;
//! * a connection is reused only when hyper says it is ready for another
//!   request (the previous response fully read) and it has been idle less
//!   than [`IDLE_TIMEOUT`]; a closed one is dropped;
//! * a request that a reused connection refused before sending (the
//!   upstream closed it in the meantime) is retried once on a fresh one:
//!   nothing was sent, so this is safe for every method;
//! * at most [`MAX_IDLE_PER_THREAD`] idle connections per upstream and
//!   thread are kept.
//!
//! The request goes out in origin form (`GET /path?query`), with the
//! client's `Host` kept, or the upstream's authority when it sent none: what
//! hyper-util's client did before.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// An idle connection older than this is closed instead of reused (the
/// 30 s hyper-util's client was configured with).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle connections kept per upstream and thread; more are closed.
pub const MAX_IDLE_PER_THREAD: usize = 256;

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection could not be opened.
    #[error("connecting to {authority} failed")]
    Connect {
        /// Where.
        authority: Authority,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (handshake, write, read).
    #[error("the HTTP exchange with the upstream failed")]
    Http(#[source] hyper::Error),
}

/// Pooled HTTP/1.1 connections to upstreams (see the module docs): each
/// thread keeps its own idle connections, under this pool's id.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use gateway_mw::server::UpstreamPool;
///
/// let pool = UpstreamPool::new();
/// let request = http::Request::get("http://127.0.0.1:9000/v1/orders/1")
///     .body(http_body_util::Full::new(bytes::Bytes::new()))?;
/// let authority = request.uri().authority().cloned().ok_or("no authority")?;
/// let response = pool.send(&authority, request).await?;
/// assert!(response.status().is_success());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct UpstreamPool {
    id: u64,
}

/// One thread's idle connections: (pool id, upstream) → connections, most
/// recently used last.
type Idle = Vec<((u64, Authority), Vec<(SendRequest<Full<Bytes>>, Instant)>)>;

thread_local! {
    static IDLE: RefCell<Idle> = const { RefCell::new(Vec::new()) };
}

impl Default for UpstreamPool {
    fn default() -> Self {
        UpstreamPool::new()
    }
}

impl UpstreamPool {
    /// A pool with no connections yet.
    pub fn new() -> UpstreamPool {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        UpstreamPool {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Sends `request` to `authority` on a pooled connection (or a new one)
    /// and returns the response head; the body streams from the upstream.
    /// The request's URI may be absolute or origin form; it goes out in
    /// origin form.
    ///
    /// # Errors
    /// [`UpstreamError`] when no connection could be opened or the exchange
    /// failed. There is no timeout here: wrap the call in one.
    pub async fn send(
        &self,
        authority: &Authority,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or(PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
        if !request.headers().contains_key(HOST)
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            request.headers_mut().insert(HOST, host);
        }
        if let Some(mut sender) = self.checkout(authority) {
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.checkin(authority, sender);
                    return Ok(response);
                }
                Err(mut refused) => match refused.take_message() {
                    // Never sent: the connection was closing. Once more,
                    // on a fresh connection.
                    Some(unsent) => request = unsent,
                    None => return Err(UpstreamError::Http(refused.into_error())),
                },
            }
        }
        let mut sender = connect(authority).await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(UpstreamError::Http)?;
        self.checkin(authority, sender);
        Ok(response)
    }

    /// A ready idle connection to `authority`, dropping closed and expired
    /// ones on the way.
    fn checkout(&self, authority: &Authority) -> Option<SendRequest<Full<Bytes>>> {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle
                .iter_mut()
                .find(|((id, a), _)| *id == self.id && a == authority)
                .map(|(_, list)| list)?;
            let now = Instant::now();
            list.retain(|(sender, since)| {
                !sender.is_closed() && now.duration_since(*since) < IDLE_TIMEOUT
            });
            // Most recently used first: its buffers are warm, and the
            // oldest are left to expire when traffic drops.
            let ready = list.iter().rposition(|(sender, _)| sender.is_ready())?;
            Some(list.swap_remove(ready).0)
        })
    }

    /// Keeps `sender` for reuse by this thread. It may still be reading the
    /// response; [`UpstreamPool::checkout`] takes only ready ones.
    fn checkin(&self, authority: &Authority, sender: SendRequest<Full<Bytes>>) {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let index = match idle
                .iter()
                .position(|((id, a), _)| *id == self.id && a == authority)
            {
                Some(index) => index,
                None => {
                    idle.push(((self.id, authority.clone()), Vec::new()));
                    idle.len() - 1
                }
            };
            let list = &mut idle[index].1;
            if list.len() < MAX_IDLE_PER_THREAD {
                list.push((sender, Instant::now()));
            }
        });
    }
}

impl Drop for UpstreamPool {
    /// Closes this thread's idle connections of the pool (other threads'
    /// close when they next look, or when the upstream closes them).
    fn drop(&mut self) {
        // `try_with`: the thread may be tearing down its locals.
        let _ = IDLE.try_with(|idle| {
            if let Ok(mut idle) = idle.try_borrow_mut() {
                idle.retain(|((id, _), _)| *id != self.id);
            }
        });
    }
}

/// Opens a connection to `authority` and spawns its task.
async fn connect(authority: &Authority) -> Result<SendRequest<Full<Bytes>>, UpstreamError> {
    let port = authority.port_u16().unwrap_or(80);
    // An IPv6 literal is written in brackets in an authority, not in a
    // socket address.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|source| UpstreamError::Connect {
            authority: authority.clone(),
            source,
        })?;
    // Small request/response messages: Nagle's algorithm would hold them
    // back waiting for ACKs.
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(UpstreamError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;

    use super::*;

    /// An upstream that echoes the request's path and `Host`, counts the
    /// connections it accepted, and closes each connection after one
    /// response when `close_each` is set.
    async fn upstream(close_each: bool) -> (Authority, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let host = request
                        .headers()
                        .get(HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body = format!("{} {}", request.uri(), host);
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(!close_each)
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (authority, accepted)
    }

    fn get(authority: &Authority, path: &str) -> Request<Full<Bytes>> {
        Request::get(format!("http://{authority}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn text(response: Response<Incoming>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn one_connection_serves_requests_one_after_another() {
        let (authority, accepted) = upstream(false).await;
        let pool = UpstreamPool::new();
        for i in 0..50 {
            let response = pool
                .send(&authority, get(&authority, &format!("/n/{i}")))
                .await
                .unwrap();
            // Origin form, and the upstream's authority as Host when the
            // request had none.
            assert_eq!(text(response).await, format!("/n/{i} {authority}"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_clients_host_is_kept() {
        let (authority, _) = upstream(false).await;
        let pool = UpstreamPool::new();
        let mut request = get(&authority, "/h");
        request
            .headers_mut()
            .insert(HOST, HeaderValue::from_static("api.example"));
        let response = pool.send(&authority, request).await.unwrap();
        assert_eq!(text(response).await, "/h api.example");
    }

    #[tokio::test]
    async fn connections_the_upstream_closed_are_not_reused() {
        let (authority, accepted) = upstream(true).await;
        let pool = UpstreamPool::new();
        for i in 0..20 {
            let response = pool
                .send(&authority, get(&authority, &format!("/c/{i}")))
                .await
                .unwrap();
            assert_eq!(text(response).await, format!("/c/{i} {authority}"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 20);
    }

    /// Many tasks at once on one thread: every response is the one for its
    /// own request, and connections are reused (no more than tasks).
    #[tokio::test]
    async fn concurrent_requests_each_get_their_own_response() {
        let (authority, accepted) = upstream(false).await;
        let pool = Arc::new(UpstreamPool::new());
        let (tasks, each) = (32, 30);
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (pool, authority) = (Arc::clone(&pool), authority.clone());
            handles.push(tokio::spawn(async move {
                for i in 0..each {
                    let path = format!("/t/{t}/{i}");
                    let response = pool.send(&authority, get(&authority, &path)).await.unwrap();
                    assert_eq!(text(response).await, format!("{path} {authority}"));
                }
            }));
        }
        for handle in handles {
            handle.await.unwrap();
        }
        let connections = accepted.load(Ordering::SeqCst);
        assert!(
            (1..=tasks).contains(&connections),
            "{connections} connections"
        );
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error() {
        // A port nothing listens on: bound, then closed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let error = UpstreamPool::new()
            .send(&authority, get(&authority, "/"))
            .await
            .unwrap_err();
        assert!(matches!(error, UpstreamError::Connect { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn pools_do_not_share_connections() {
        let (authority, accepted) = upstream(false).await;
        let (a, b) = (UpstreamPool::new(), UpstreamPool::new());
        for pool in [&a, &b, &a, &b] {
            let response = pool.send(&authority, get(&authority, "/p")).await.unwrap();
            text(response).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(a);
        let response = b.send(&authority, get(&authority, "/p")).await.unwrap();
        text(response).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
