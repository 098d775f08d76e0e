//! With the descriptor table full, `accept` fails with EMFILE on every
//! call while the connection waits in the backlog. The loop must back off
//! (1 ms doubling to 1 s), not spin, and serve the connection once a
//! descriptor frees. Its own test binary: it lowers the process's
//! RLIMIT_NOFILE.

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, StatusCode};
use http_kit::{ServeConfig, Shutdown, json, serve};
use hyper::body::Incoming;
use rlimit::Resource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "current_thread")]
async fn accept_errors_back_off_and_recover() {
    let service = tower::service_fn(|_r: Request<Incoming>| async {
        Ok::<_, Infallible>(json(StatusCode::OK, &serde_json::json!({"ok": true})))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let server = tokio::spawn(serve(
        listener,
        service,
        ServeConfig::default(),
        shutdown.clone(),
    ));
    // The client's socket exists before the limit drops; connecting it
    // takes no new descriptor, but the server's accept needs one.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap();
    // /proc/self/fd's own directory handle is counted while listing.
    rlimit::setrlimit(Resource::NOFILE, open_fds().saturating_sub(1), hard).unwrap();
    let mut client = socket.connect(addr).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // A measuring window, not synchronization: a spinning loop fails
    // accept hundreds of thousands of times in it, a backing-off one ~9.
    tokio::time::sleep(Duration::from_millis(400)).await;
    rlimit::setrlimit(Resource::NOFILE, soft, hard).unwrap();
    let mut response = Vec::new();
    client.read_to_end(&mut response).await.unwrap();
    assert!(
        String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    shutdown.trigger();
    let report = server.await.unwrap();
    assert!(
        report.accept_errors >= 1,
        "the limit never made accept fail: {report:?}"
    );
    assert!(
        report.accept_errors <= 30,
        "accept spun instead of backing off: {report:?}"
    );
    assert_eq!(report.accepted, 1);
}
