//! `serve()` end to end over real sockets: extensions, drain, guards,
//! the connection cap and the header-read timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_kit::{Body, PeerAddr, ServeConfig, ServeReport, Shutdown, json, serve};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

async fn start<S>(
    service: S,
    config: ServeConfig,
) -> (SocketAddr, Shutdown, JoinHandle<ServeReport>)
where
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let handle = tokio::spawn(serve(listener, service, config, shutdown.clone()));
    (addr, shutdown, handle)
}

/// Sends one keep-alive GET and reads one response head + body (small,
/// Content-Length framed, as `json` produces).
async fn get(stream: &mut TcpStream, path: &str) -> (u16, String) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_response(stream).await
}

async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed before a full response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let head = &text[..head_end];
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= head_end + 4 + len {
                let status = head[9..12].parse().unwrap();
                return (status, text[head_end + 4..head_end + 4 + len].to_owned());
            }
        }
    }
}

fn echo_peer()
-> impl tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(|request: Request<Incoming>| async move {
        let peer = request
            .extensions()
            .get::<PeerAddr>()
            .map(|p| p.0.to_string());
        let has_shutdown = request.extensions().get::<Shutdown>().is_some();
        Ok::<_, Infallible>(json(
            StatusCode::OK,
            &serde_json::json!({"peer": peer, "shutdown": has_shutdown}),
        ))
    })
}

#[tokio::test]
async fn requests_carry_the_peer_address_and_the_shutdown_handle() {
    let (addr, shutdown, server) = start(echo_peer(), ServeConfig::default()).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let local = client.local_addr().unwrap();
    let (status, body) = get(&mut client, "/").await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["peer"], local.to_string());
    assert_eq!(body["shutdown"], true);
    drop(client);
    shutdown.trigger();
    let report = server.await.unwrap();
    assert!(report.drained);
    assert_eq!(report.accepted, 1);
}

#[tokio::test]
async fn the_drain_finishes_the_request_in_flight_then_refuses_new_connections() {
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let entered = Arc::new(TakeOnce::new(entered_tx));
    let release_rx = Arc::new(TakeOnce::new(release_rx));
    let service = tower::service_fn(move |_request: Request<Incoming>| {
        let entered = Arc::clone(&entered);
        let release_rx = Arc::clone(&release_rx);
        async move {
            entered.take().map(|tx| tx.send(()));
            if let Some(rx) = release_rx.take() {
                let _ = rx.await;
            }
            Ok::<_, Infallible>(json(StatusCode::OK, &serde_json::json!({"slow": true})))
        }
    });
    let (addr, shutdown, server) = start(service, ServeConfig::default()).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    entered_rx.await.unwrap();
    shutdown.trigger();
    // The listener closes once the accept loop sees the trigger.
    let refused = loop {
        match TcpStream::connect(addr).await {
            Err(e) => break e,
            Ok(_) => tokio::task::yield_now().await,
        }
    };
    // Refused, or reset when the connect raced the close (the kernel drops
    // whatever sat in the closed listener's backlog).
    assert!(
        matches!(
            refused.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
        ),
        "{refused:?}"
    );
    assert!(
        !server.is_finished(),
        "serve returned with a request in flight"
    );
    release_tx.send(()).unwrap();
    let (status, body) = read_response(&mut client).await;
    assert_eq!((status, body.as_str()), (200, r#"{"slow":true}"#));
    let report = server.await.unwrap();
    assert!(report.drained);
    assert_eq!(report.left_open, 0);
}

/// A value handed out once, to whichever request comes first.
struct TakeOnce<T>(std::sync::Mutex<Option<T>>);

impl<T> TakeOnce<T> {
    fn new(value: T) -> Self {
        TakeOnce(std::sync::Mutex::new(Some(value)))
    }

    fn take(&self) -> Option<T> {
        self.0.lock().unwrap().take()
    }
}

#[tokio::test]
async fn the_drain_waits_for_guards_taken_by_requests() {
    let (guard_tx, guard_rx) = tokio::sync::mpsc::unbounded_channel::<http_kit::DrainGuard>();
    let service = tower::service_fn(move |request: Request<Incoming>| {
        let guard = request.extensions().get::<Shutdown>().unwrap().guard();
        guard_tx.send(guard).unwrap();
        async { Ok::<_, Infallible>(json(StatusCode::ACCEPTED, &serde_json::json!({}))) }
    });
    let (addr, shutdown, server) = start(
        service,
        ServeConfig::default().with_drain_timeout(Duration::from_secs(60)),
    )
    .await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    assert_eq!(get(&mut client, "/work").await.0, 202);
    drop(client);
    shutdown.trigger();
    let released = Arc::new(AtomicBool::new(false));
    let holder = tokio::spawn({
        let released = Arc::clone(&released);
        let mut guard_rx = guard_rx;
        async move {
            let guard = guard_rx.recv().await.unwrap();
            // Work that outlives the request: give the drain every chance
            // to (wrongly) finish before the guard goes.
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            released.store(true, Ordering::SeqCst);
            drop(guard);
        }
    });
    let report = server.await.unwrap();
    assert!(
        released.load(Ordering::SeqCst),
        "serve returned while a guard was alive"
    );
    assert!(report.drained);
    holder.await.unwrap();
}

#[tokio::test]
async fn the_connection_cap_holds_new_connections_until_a_slot_frees() {
    let first_closed = Arc::new(AtomicBool::new(false));
    let service = {
        let first_closed = Arc::clone(&first_closed);
        tower::service_fn(move |request: Request<Incoming>| {
            let path = request.uri().path().to_owned();
            let closed = first_closed.load(Ordering::SeqCst);
            async move {
                Ok::<_, Infallible>(json(
                    StatusCode::OK,
                    &serde_json::json!({"path": path, "first_closed": closed}),
                ))
            }
        })
    };
    let (addr, shutdown, server) =
        start(service, ServeConfig::default().with_max_connections(1)).await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    assert_eq!(get(&mut first, "/first").await.0, 200);
    // The second connection completes its TCP handshake (the kernel's
    // backlog) but is not served while the first holds the only slot.
    let mut second = TcpStream::connect(addr).await.unwrap();
    second
        .write_all(b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let answer = tokio::spawn(async move { read_response(&mut second).await });
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert!(!answer.is_finished());
    first_closed.store(true, Ordering::SeqCst);
    drop(first);
    let (status, body) = answer.await.unwrap();
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["first_closed"], true,
        "the second connection was served while the first held the slot"
    );
    shutdown.trigger();
    assert!(server.await.unwrap().drained);
}

/// Reads what the server sends until it closes the connection, failing if
/// it has not closed it within 20 s (`what` names the connection).
async fn read_until_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "{what} was never cut off");
    rest
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let config = ServeConfig::default().with_header_read_timeout(Duration::from_millis(200));
    let (addr, shutdown, server) = start(echo_peer(), config).await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .await
        .unwrap();
    // The server answers 408 or just closes; either way the read ends
    // (this read would hang forever without the timeout).
    read_until_closed(&mut slow, "the half-sent request").await;
    shutdown.trigger();
    assert!(server.await.unwrap().drained);
}

#[tokio::test]
async fn a_keep_alive_connection_that_stalls_in_its_next_head_is_cut_off() {
    let config = ServeConfig::default().with_header_read_timeout(Duration::from_millis(200));
    let (addr, shutdown, server) = start(echo_peer(), config).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (status, _) = get(&mut stream, "/first").await;
    assert_eq!(status, 200);
    stream
        .write_all(b"GET /second HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .await
        .unwrap();
    let rest = read_until_closed(&mut stream, "the stalled second head").await;
    assert!(rest.is_empty(), "closed without a response: {rest:?}");
    shutdown.trigger();
    assert!(server.await.unwrap().drained);
}

#[tokio::test]
async fn a_request_slower_than_the_header_timeout_still_gets_its_response() {
    let config = ServeConfig::default().with_header_read_timeout(Duration::from_millis(100));
    let slow = tower::service_fn(|_request: Request<Incoming>| async move {
        // The handler's own work outlasts the header-read timeout threefold:
        // the timeout is about heads, not about the server's answer.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok::<_, Infallible>(json(StatusCode::OK, &serde_json::json!({"slow": true})))
    });
    let (addr, shutdown, server) = start(slow, config).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (status, body) = get(&mut stream, "/slow").await;
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"slow":true}"#);
    // And the connection, now idle, is closed once the timeout passes.
    read_until_closed(&mut stream, "the idle connection").await;
    shutdown.trigger();
    assert!(server.await.unwrap().drained);
}

/// A response body that yields what a channel sends, ending when the
/// channel closes.
struct ChannelBody(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

#[tokio::test]
async fn a_response_streamed_longer_than_the_header_timeout_is_not_cut() {
    let config = ServeConfig::default().with_header_read_timeout(Duration::from_millis(100));
    let streaming = tower::service_fn(|_request: Request<Incoming>| async move {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            tx.send(bytes::Bytes::from_static(b"first ")).await.unwrap();
            // The body outlasts the header-read timeout threefold between
            // its two chunks: the response is in flight all along.
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send(bytes::Bytes::from_static(b"last")).await.unwrap();
        });
        Ok::<_, Infallible>(Response::new(http_kit::boxed(ChannelBody(rx))))
    });
    let (addr, shutdown, server) = start(streaming, config).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    // Chunked: read until the terminating chunk.
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.ends_with(b"0\r\n\r\n") {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("first ") && text.contains("last"), "{text}");
    shutdown.trigger();
    assert!(server.await.unwrap().drained);
}
