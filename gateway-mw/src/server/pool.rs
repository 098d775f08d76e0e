//! Pooled HTTP/1.1 connections to the upstreams, one pool per thread,
//! driven by the request's own task.
//!
//! hyper-util's pooled client keeps one pool behind a mutex, races a new
//! connection against every checkout that finds no idle one, and hands each
//! request to the connection's task through two channels; hyper's bare
//! client connection still runs a task and an HTTP/1 dispatcher of its own
//! per connection. A proxy on this path does that for every request, so the
//! gateway keeps its own, smaller pool for HTTP/1.1 upstreams (HTTP/2 ones
//! multiplex over one connection and stay on hyper-util's client):
//!
//! * idle connections are kept per thread, so a checkout takes no lock, and
//!   with one runtime per core (`runtime = "per_core"`) a connection stays
//!   on the thread whose requests use it;
//! * there is no task per connection: the request's task writes the request
//!   and reads the response head (the private `server::h1` encodes and parses, with
//!   `httparse`), and the response body reads the rest as it is polled,
//!   handing the connection back when its end was read;
//! * a connection is reused only when its last response was read to its
//!   end, neither side asked to close it, nothing more arrived, it has been
//!   idle less than [`IDLE_TIMEOUT`], and a non-blocking look finds it still
//!   open; a body dropped before its end closes its connection;
//! * a request that a reused connection failed before any of its bytes
//!   were written, or, for an idempotent method, before any byte of the
//!   response arrived (the upstream closed it meanwhile), is retried once
//!   on a fresh connection;
//! * at most [`MAX_IDLE_PER_THREAD`] idle connections per upstream and
//!   thread are kept. Nothing watches an idle connection: one the upstream
//!   closed, or idle longer than [`IDLE_TIMEOUT`], is closed at the next
//!   checkout or check-in of that upstream on its thread.
//!
//! The request goes out in origin form (`GET /path?query`), with the
//! client's `Host` kept, or the upstream's authority when it sent none, and
//! its body whole, framed by `Content-Length`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HOST, HeaderValue};
use http::uri::Authority;
use http::{HeaderMap, Method, Request, Response};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::h1::{self, ChunkedDecoder, Decoded, Framing, Head, ProtocolError};

/// An idle connection older than this is closed instead of reused (the
/// 30 s hyper-util's client was configured with).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle connections kept per upstream and thread; more are closed.
pub const MAX_IDLE_PER_THREAD: usize = 256;

/// What a connection reads at a time.
const READ_CHUNK: usize = 8 * 1024;

/// A body up to this size goes out in one write with its head.
const INLINE_BODY: usize = 16 * 1024;

/// An idle connection's buffers are dropped rather than kept above this.
const KEEP_BUFFER: usize = 32 * 1024;

/// Why a request got no response from the upstream, or its body ended
/// early.
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
    /// Writing the request or reading the response failed.
    #[error("the connection to the upstream failed")]
    Io(#[source] std::io::Error),
    /// The upstream closed the connection before its response head.
    #[error("the upstream closed the connection before responding")]
    Closed,
    /// The upstream's response is not valid HTTP/1.1.
    #[error("the upstream's response is invalid")]
    Protocol(#[source] ProtocolError),
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
    /// Bodies hand their connections back only while the pool lives.
    alive: Arc<()>,
}

/// One upstream connection and its buffers.
#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    /// Read from the upstream and not consumed yet.
    read: BytesMut,
    /// The request being written (kept for its capacity).
    write: Vec<u8>,
}

/// One thread's idle connections: (pool id, upstream) → connections, most
/// recently used last.
type Idle = Vec<((u64, Authority), Vec<(Box<Connection>, Instant)>)>;

thread_local! {
    static IDLE: RefCell<Idle> = const { RefCell::new(Vec::new()) };
}

impl Default for UpstreamPool {
    fn default() -> Self {
        UpstreamPool::new()
    }
}

/// An exchange that failed, and whether sending the request again is safe.
struct Failed {
    error: UpstreamError,
    retry: bool,
}

impl UpstreamPool {
    /// A pool with no connections yet.
    pub fn new() -> UpstreamPool {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        UpstreamPool {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            alive: Arc::new(()),
        }
    }

    /// Sends `request` to `authority` on a pooled connection (or a new one)
    /// and returns the response head; the body streams from the upstream.
    /// The request's URI may be absolute or origin form; it goes out in
    /// origin form.
    ///
    /// # Errors
    /// [`UpstreamError`] when no connection could be opened, the exchange
    /// failed, or the response head is not valid HTTP/1.1. There is no
    /// timeout here: wrap the call in one.
    pub async fn send(
        &self,
        authority: &Authority,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (mut parts, body) = request.into_parts();
        // A `Full` is one frame, ready at once.
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        };
        if !parts.headers.contains_key(HOST)
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(HOST, host);
        }
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let message = Message {
            method: &parts.method,
            target,
            headers: &parts.headers,
            body: &body,
        };
        if let Some(mut connection) = self.checkout(authority) {
            match connection.exchange(&message).await {
                Ok(head) => return Ok(self.respond(authority, connection, head)),
                Err(failed) if failed.retry => {
                    tracing::debug!(error = %failed.error, "a pooled upstream connection failed; retrying on a new one");
                }
                Err(failed) => return Err(failed.error),
            }
        }
        let mut connection = connect(authority).await?;
        let head = connection
            .exchange(&message)
            .await
            .map_err(|failed| failed.error)?;
        Ok(self.respond(authority, connection, head))
    }

    /// The response for `head`: its body whole when it already arrived
    /// (the connection goes back to the pool at once), streamed otherwise.
    fn respond(
        &self,
        authority: &Authority,
        mut connection: Box<Connection>,
        head: Head,
    ) -> Response<UpstreamBody> {
        let state = match head.framing {
            Framing::Empty => {
                keep(self.id, authority, head.reusable, connection);
                State::Whole(None)
            }
            Framing::Length(n) if connection.read.len() as u64 >= n => {
                let data = connection.read.split_to(n as usize).freeze();
                keep(self.id, authority, head.reusable, connection);
                State::Whole(Some(data))
            }
            Framing::Length(left) => State::Length { connection, left },
            Framing::Chunked => State::Chunked {
                connection,
                decoder: ChunkedDecoder::default(),
            },
            Framing::UntilClose => State::UntilClose { connection },
        };
        // Only a body still to be read needs to know where its connection
        // goes back to.
        let home = matches!(state, State::Length { .. } | State::Chunked { .. }).then(|| Home {
            pool: self.id,
            authority: authority.clone(),
            alive: Arc::downgrade(&self.alive),
            reusable: head.reusable,
        });
        head.response.map(|()| UpstreamBody { state, home })
    }

    /// A ready idle connection to `authority`, dropping closed and expired
    /// ones on the way.
    fn checkout(&self, authority: &Authority) -> Option<Box<Connection>> {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle
                .iter_mut()
                .find(|((id, a), _)| *id == self.id && a == authority)
                .map(|(_, list)| list)?;
            let now = Instant::now();
            close_expired(list, now);
            // Most recently used first: its buffers are warm, and the
            // oldest are left to expire when traffic drops.
            while let Some((connection, _)) = list.pop() {
                if connection.is_open() {
                    return Some(connection);
                }
            }
            None
        })
    }
}

/// Where a body hands its connection back.
#[derive(Debug)]
struct Home {
    pool: u64,
    authority: Authority,
    alive: Weak<()>,
    /// The response let the connection carry another request.
    reusable: bool,
}

impl Home {
    /// Keeps `connection` for reuse by this thread (see [`keep`]), while
    /// the pool lives.
    fn take_back(&self, connection: Box<Connection>) {
        if self.alive.strong_count() > 0 {
            keep(self.pool, &self.authority, self.reusable, connection);
        }
    }
}

/// Keeps `connection` idle for reuse by this thread under `pool` and
/// `authority`, when its response let it carry another request and nothing
/// past the response arrived.
fn keep(pool: u64, authority: &Authority, reusable: bool, mut connection: Box<Connection>) {
    if !reusable || !connection.read.is_empty() {
        return;
    }
    // An idle connection keeps buffers of an ordinary exchange's size, not
    // of the largest head or body it ever carried.
    if connection.read.capacity() > KEEP_BUFFER {
        connection.read = BytesMut::new();
    }
    if connection.write.capacity() > KEEP_BUFFER {
        connection.write = Vec::new();
    }
    // `try_with`: the thread may be tearing down its locals.
    let _ = IDLE.try_with(|idle| {
        let Ok(mut idle) = idle.try_borrow_mut() else {
            return;
        };
        let index = match idle
            .iter()
            .position(|((id, a), _)| *id == pool && a == authority)
        {
            Some(index) => index,
            None => {
                idle.push(((pool, authority.clone()), Vec::new()));
                idle.len() - 1
            }
        };
        let list = &mut idle[index].1;
        let now = Instant::now();
        close_expired(list, now);
        if list.len() < MAX_IDLE_PER_THREAD {
            list.push((connection, now));
        }
    });
}

/// Closes the connections idle for [`IDLE_TIMEOUT`] or longer: the oldest,
/// at the front of the list.
fn close_expired(list: &mut Vec<(Box<Connection>, Instant)>, now: Instant) {
    let expired = list
        .iter()
        .take_while(|(_, since)| now.duration_since(*since) >= IDLE_TIMEOUT)
        .count();
    list.drain(..expired);
}

impl Drop for UpstreamPool {
    /// Closes this thread's idle connections of the pool. Other threads'
    /// stay open until those threads end (no request looks for a dropped
    /// pool's connections); a pool normally lives as long as its server.
    fn drop(&mut self) {
        // `try_with`: the thread may be tearing down its locals.
        let _ = IDLE.try_with(|idle| {
            if let Ok(mut idle) = idle.try_borrow_mut() {
                idle.retain(|((id, _), _)| *id != self.id);
            }
        });
    }
}

/// A request as it goes out.
struct Message<'a> {
    method: &'a Method,
    target: &'a str,
    headers: &'a HeaderMap,
    body: &'a Bytes,
}

impl Connection {
    /// Whether an idle connection still looks usable: the upstream has not
    /// closed it and sent nothing unasked. No system call unless the
    /// runtime saw it become readable.
    fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Writes `message` and reads the response head. A failure says
    /// whether the request may be sent again: nothing of it was written,
    /// or it is idempotent and nothing of the response came.
    async fn exchange(&mut self, message: &Message<'_>) -> Result<Head, Failed> {
        self.write.clear();
        h1::encode_request_head(
            message.method,
            message.target,
            message.headers,
            message.body.len(),
            &mut self.write,
        );
        let inline = message.body.len() <= INLINE_BODY;
        if inline {
            self.write.extend_from_slice(message.body);
        }
        let idempotent = h1::is_idempotent(message.method);
        let io = |error: std::io::Error, retry: bool| Failed {
            error: UpstreamError::Io(error),
            retry,
        };
        let mut written = 0;
        while written < self.write.len() {
            match self.stream.write(&self.write[written..]).await {
                Ok(0) => {
                    return Err(io(std::io::ErrorKind::WriteZero.into(), written == 0));
                }
                Ok(n) => written += n,
                Err(e) => return Err(io(e, written == 0 || idempotent)),
            }
        }
        // A larger body goes out while the connection is watched for an
        // answer: an upstream may refuse it early (413, 401) and stop
        // reading, and an answer before the body's end also means the
        // connection cannot carry another request.
        let (mut cut_short, mut write_failed) = (false, None);
        if !inline {
            let body = &message.body[..];
            let mut sent = 0;
            while sent < body.len() {
                tokio::select! {
                    biased;
                    ready = self.stream.readable() => {
                        ready.map_err(|e| io(e, false))?;
                        match self.stream.try_read_buf(&mut self.read) {
                            Ok(_) => {
                                // An answer, or the end of the connection:
                                // either way, read what comes back.
                                cut_short = true;
                                break;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) => return Err(io(e, idempotent)),
                        }
                    }
                    ready = self.stream.writable() => {
                        ready.map_err(|e| io(e, idempotent))?;
                        match self.stream.try_write(&body[sent..]) {
                            Ok(n) => sent += n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) => {
                                // The upstream may have answered, then
                                // closed: look for its answer first.
                                write_failed = Some(e);
                                cut_short = true;
                                break;
                            }
                        }
                    }
                }
            }
        }
        let mut received = !self.read.is_empty();
        loop {
            match h1::parse_response_head(&mut self.read, message.method) {
                Ok(Some(mut head)) => {
                    head.reusable &= !cut_short;
                    return Ok(head);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(Failed {
                        error: UpstreamError::Protocol(e),
                        retry: false,
                    });
                }
            }
            self.read.reserve(READ_CHUNK);
            match self.stream.read_buf(&mut self.read).await {
                Ok(0) if !received => {
                    return Err(match write_failed {
                        Some(e) => io(e, idempotent),
                        None => Failed {
                            error: UpstreamError::Closed,
                            retry: idempotent,
                        },
                    });
                }
                Ok(0) => {
                    return Err(Failed {
                        error: UpstreamError::Protocol(ProtocolError::IncompleteHead),
                        retry: false,
                    });
                }
                Ok(_) => received = true,
                Err(e) => return Err(io(e, idempotent && !received)),
            }
        }
    }

    /// Reads what the upstream sent next into `read`: `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.read.reserve(READ_CHUNK);
        // A fresh future per poll: it holds nothing but the two borrows.
        std::pin::pin!(self.stream.read_buf(&mut self.read)).poll(cx)
    }
}

/// Opens a connection to `authority`.
async fn connect(authority: &Authority) -> Result<Box<Connection>, UpstreamError> {
    let port = authority.port_u16().unwrap_or(80);
    // An IPv6 literal is written in brackets in an authority, not in a
    // socket address.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream =
        TcpStream::connect((host, port))
            .await
            .map_err(|source| UpstreamError::Connect {
                authority: authority.clone(),
                source,
            })?;
    // Small request/response messages: Nagle's algorithm would hold them
    // back waiting for ACKs.
    let _ = stream.set_nodelay(true);
    Ok(Box::new(Connection {
        stream,
        read: BytesMut::new(),
        write: Vec::new(),
    }))
}

/// A response body read from its upstream connection as it is polled; the
/// connection goes back to its pool once the body's end was read (or at
/// once, when the whole body came with the head).
#[derive(Debug)]
pub struct UpstreamBody {
    state: State,
    home: Option<Home>,
}

#[derive(Debug)]
enum State {
    /// All of it (or nothing), already read.
    Whole(Option<Bytes>),
    /// `left` more bytes to read.
    Length {
        connection: Box<Connection>,
        left: u64,
    },
    Chunked {
        connection: Box<Connection>,
        decoder: ChunkedDecoder,
    },
    UntilClose {
        connection: Box<Connection>,
    },
    /// Read to its end, or failed.
    Done,
}

impl UpstreamBody {
    /// The body's end was read: its connection goes home.
    fn finish(&mut self) {
        let state = std::mem::replace(&mut self.state, State::Done);
        if let (State::Length { connection, .. } | State::Chunked { connection, .. }, Some(home)) =
            (state, self.home.take())
        {
            home.take_back(connection);
        }
    }

    /// The body cannot go on: its connection is closed.
    fn fail(&mut self, error: UpstreamError) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        self.state = State::Done;
        Poll::Ready(Some(Err(error)))
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        loop {
            let connection = match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Whole(data) => {
                    let data = data.take();
                    this.state = State::Done;
                    return Poll::Ready(data.map(|d| Ok(Frame::data(d))));
                }
                State::Length { connection, left } => {
                    if !connection.read.is_empty() {
                        let take = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(connection.read.len());
                        let data = connection.read.split_to(take).freeze();
                        *left -= take as u64;
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    connection
                }
                State::Chunked {
                    connection,
                    decoder,
                } => match decoder.decode(&mut connection.read) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End) => {
                        // Trailer fields are not forwarded.
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => connection,
                    Err(e) => return this.fail(UpstreamError::Protocol(e)),
                },
                State::UntilClose { connection } => {
                    if !connection.read.is_empty() {
                        let data = connection.read.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    connection
                }
            };
            match ready!(connection.poll_fill(cx)) {
                Ok(0) if matches!(this.state, State::UntilClose { .. }) => {
                    this.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(UpstreamError::Protocol(ProtocolError::IncompleteBody)),
                Ok(_) => {}
                Err(e) => return this.fail(UpstreamError::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            // What is buffered is part of `left`.
            State::Length { left, .. } => SizeHint::with_exact(*left),
            State::Done => SizeHint::with_exact(0),
            State::Chunked { .. } | State::UntilClose { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncBufReadExt;

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

    async fn text(response: Response<UpstreamBody>) -> String {
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

    /// What a scripted upstream does after reading a request.
    #[derive(Clone, Copy)]
    enum After {
        /// Keep the connection for the next request.
        Stay,
        /// Close it.
        Close,
    }

    /// A raw TCP upstream: for the n-th request on a connection (from 0),
    /// writes `reply(n)` and then stays or closes. Counts connections.
    async fn scripted(reply: fn(usize) -> (Vec<u8>, After)) -> (Authority, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufStream::new(stream);
                    for n in 0.. {
                        // The request head, then its body by Content-Length.
                        let mut length = 0usize;
                        loop {
                            let mut line = String::new();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                length = v.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; length];
                        stream.read_exact(&mut body).await.unwrap();
                        let (bytes, after) = reply(n);
                        stream.write_all(&bytes).await.unwrap();
                        stream.flush().await.unwrap();
                        if matches!(after, After::Close) {
                            return;
                        }
                    }
                });
            }
        });
        (authority, accepted)
    }

    async fn body_of(response: Response<UpstreamBody>) -> Result<Vec<u8>, UpstreamError> {
        Ok(response.into_body().collect().await?.to_bytes().to_vec())
    }

    /// Sends `n` GETs through a fresh pool to an upstream answering `reply`,
    /// each answered with `body`: the connections the upstream accepted.
    async fn connections_for_gets(
        reply: fn(usize) -> (Vec<u8>, After),
        n: usize,
        body: &[u8],
    ) -> usize {
        let (authority, accepted) = scripted(reply).await;
        let pool = UpstreamPool::new();
        for _ in 0..n {
            let response = pool.send(&authority, get(&authority, "/g")).await.unwrap();
            assert_eq!(body_of(response).await.unwrap(), body);
        }
        accepted.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_chunked_body_larger_than_a_read_streams_and_the_connection_is_reused() {
        fn reply(_: usize) -> (Vec<u8>, After) {
            let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for i in 0..40u8 {
                let chunk = vec![b'a' + i % 26; 3000];
                out.extend_from_slice(format!("{:x};x=y\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(&chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\nx-trailer: 1\r\n\r\n");
            (out, After::Stay)
        }
        let (authority, accepted) = scripted(reply).await;
        let pool = UpstreamPool::new();
        for _ in 0..3 {
            let response = pool.send(&authority, get(&authority, "/c")).await.unwrap();
            assert!(!response.headers().contains_key("content-length"));
            let body = body_of(response).await.unwrap();
            assert_eq!(body.len(), 40 * 3000);
            assert!(body[..3000].iter().all(|b| *b == b'a'));
            assert!(body[39 * 3000..].iter().all(|b| *b == b'a' + 13));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_read_to_the_close_ends_there_and_its_connection_is_not_reused() {
        fn reply(_: usize) -> (Vec<u8>, After) {
            (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end".to_vec(),
                After::Close,
            )
        }
        assert_eq!(connections_for_gets(reply, 2, b"until the end").await, 2);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_a_malformed_head_is_refused() {
        fn short(_: usize) -> (Vec<u8>, After) {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this".to_vec(),
                After::Close,
            )
        }
        let (authority, _) = scripted(short).await;
        let pool = UpstreamPool::new();
        let response = pool.send(&authority, get(&authority, "/s")).await.unwrap();
        assert!(matches!(
            body_of(response).await,
            Err(UpstreamError::Protocol(ProtocolError::IncompleteBody))
        ));

        fn garbage(_: usize) -> (Vec<u8>, After) {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello".to_vec(),
                After::Stay,
            )
        }
        let (authority, _) = scripted(garbage).await;
        let error = pool
            .send(&authority, get(&authority, "/g"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                UpstreamError::Protocol(ProtocolError::InvalidContentLength)
            ),
            "{error:?}"
        );

        fn silent(_: usize) -> (Vec<u8>, After) {
            (Vec::new(), After::Close)
        }
        let (authority, _) = scripted(silent).await;
        let error = pool
            .send(&authority, get(&authority, "/z"))
            .await
            .unwrap_err();
        assert!(matches!(error, UpstreamError::Closed), "{error:?}");
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_head_and_204_have_no_body() {
        fn reply(n: usize) -> (Vec<u8>, After) {
            let out: &[u8] = match n {
                0 => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
                // A HEAD's Content-Length describes the GET's body.
                1 => b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
                _ => b"HTTP/1.1 204 No Content\r\n\r\n",
            };
            (out.to_vec(), After::Stay)
        }
        let (authority, accepted) = scripted(reply).await;
        let pool = UpstreamPool::new();
        let post = Request::post(format!("http://{authority}/p"))
            .header("expect", "100-continue")
            .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
            .unwrap();
        let response = pool.send(&authority, post).await.unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(body_of(response).await.unwrap(), b"ok");
        let head = Request::head(format!("http://{authority}/h"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = pool.send(&authority, head).await.unwrap();
        assert!(http_body::Body::is_end_stream(response.body()));
        assert_eq!(response.headers()["content-length"], "1000");
        let response = pool.send(&authority, get(&authority, "/n")).await.unwrap();
        assert_eq!(response.status(), 204);
        assert!(body_of(response).await.unwrap().is_empty());
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// The upstream closes each connection after its response without
    /// saying so: the next request does not fail on the closed one.
    #[tokio::test]
    async fn a_connection_closed_while_idle_is_not_used_again() {
        fn reply(_: usize) -> (Vec<u8>, After) {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi".to_vec(),
                After::Close,
            )
        }
        let (authority, accepted) = scripted(reply).await;
        let pool = UpstreamPool::new();
        for i in 0..10 {
            let request = if i % 2 == 0 {
                get(&authority, "/x")
            } else {
                Request::post(format!("http://{authority}/x"))
                    .body(Full::new(Bytes::from_static(b"p")))
                    .unwrap()
            };
            let response = pool.send(&authority, request).await.unwrap();
            assert_eq!(body_of(response).await.unwrap(), b"hi");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 10);
    }

    /// A body dropped before its end takes its connection with it.
    #[tokio::test]
    async fn a_body_dropped_early_closes_its_connection() {
        fn reply(_: usize) -> (Vec<u8>, After) {
            let mut out = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n".to_vec();
            out.extend(std::iter::repeat_n(b'x', 200_000));
            (out, After::Stay)
        }
        let (authority, accepted) = scripted(reply).await;
        let pool = UpstreamPool::new();
        let response = pool.send(&authority, get(&authority, "/d")).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(!first.into_data().unwrap().is_empty());
        drop(body);
        let response = pool.send(&authority, get(&authority, "/d")).await.unwrap();
        assert_eq!(body_of(response).await.unwrap().len(), 200_000);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Read to its end, it is reused.
        let response = pool.send(&authority, get(&authority, "/d")).await.unwrap();
        assert_eq!(body_of(response).await.unwrap().len(), 200_000);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// The upstream reads the second request on a connection and closes it
    /// without an answer (it closed an idle connection just as the request
    /// arrived): a `GET` is sent again on a new connection, a `POST` is not.
    #[tokio::test]
    async fn only_an_idempotent_request_is_sent_again_after_a_silent_close() {
        fn reply(n: usize) -> (Vec<u8>, After) {
            match n {
                0 => (
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                    After::Stay,
                ),
                _ => (Vec::new(), After::Close),
            }
        }
        let (authority, accepted) = scripted(reply).await;
        let pool = UpstreamPool::new();
        let response = pool.send(&authority, get(&authority, "/1")).await.unwrap();
        assert_eq!(body_of(response).await.unwrap(), b"ok");
        let response = pool.send(&authority, get(&authority, "/2")).await.unwrap();
        assert_eq!(body_of(response).await.unwrap(), b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "the GET went again");

        let (authority, accepted) = scripted(reply).await;
        let response = pool.send(&authority, get(&authority, "/1")).await.unwrap();
        assert_eq!(body_of(response).await.unwrap(), b"ok");
        let post = Request::post(format!("http://{authority}/p"))
            .body(Full::new(Bytes::from_static(b"once")))
            .unwrap();
        let error = pool.send(&authority, post).await.unwrap_err();
        assert!(matches!(error, UpstreamError::Closed), "{error:?}");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the POST was not sent again"
        );
    }

    /// More than the response announced is not left for the next request,
    /// and an HTTP/1.0 upstream that keeps alive is reused.
    #[tokio::test]
    async fn extra_bytes_close_the_connection_and_http_1_0_keep_alive_is_reused() {
        fn extra(_: usize) -> (Vec<u8>, After) {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiEXTRA".to_vec(),
                After::Stay,
            )
        }
        assert_eq!(connections_for_gets(extra, 3, b"hi").await, 3);

        fn old(_: usize) -> (Vec<u8>, After) {
            (
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"
                    .to_vec(),
                After::Stay,
            )
        }
        assert_eq!(connections_for_gets(old, 3, b"hi").await, 1);
    }

    /// An upstream that refuses a large body after its head, without
    /// reading it: its answer comes back (not a failed write, nor a wait
    /// until the timeout), and the connection is not reused.
    #[tokio::test]
    async fn an_early_answer_to_a_large_body_is_relayed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufStream::new(stream);
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                    }
                    let refusal: &[u8] =
                        b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo long";
                    stream.write_all(refusal).await.unwrap();
                    stream.flush().await.unwrap();
                    // Keeps the connection, reading nothing more, until the
                    // client goes.
                    let mut rest = Vec::new();
                    let _ = stream.get_mut().read_to_end(&mut rest).await;
                });
            }
        });
        let pool = UpstreamPool::new();
        let large = Bytes::from(vec![b'x'; 32 * 1024 * 1024]);
        let post = Request::post(format!("http://{authority}/upload"))
            .body(Full::new(large))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(20), pool.send(&authority, post))
            .await
            .expect("the answer, not a wait")
            .unwrap();
        assert_eq!(response.status(), 413);
        assert_eq!(body_of(response).await.unwrap(), b"too long");
        assert!(pool.checkout(&authority).is_none(), "not reused");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
