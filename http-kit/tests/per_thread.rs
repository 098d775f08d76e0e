//! `per_thread`: several sockets on one port, each served by a thread and
//! runtime of its own, drained together.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Request, StatusCode};
use http_kit::{ServeConfig, Shutdown, json, per_thread};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[test]
fn the_sockets_share_one_port_and_port_zero_picks_it() {
    let listeners = per_thread::bind_reuseport("127.0.0.1:0".parse().unwrap(), 3).unwrap();
    assert_eq!(listeners.len(), 3);
    let port = listeners[0].local_addr().unwrap().port();
    assert_ne!(port, 0);
    assert!(
        listeners
            .iter()
            .all(|l| l.local_addr().unwrap().port() == port)
    );
    // A count of 0 still binds one.
    assert_eq!(
        per_thread::bind_reuseport("127.0.0.1:0".parse().unwrap(), 0)
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_is_served_on_a_serving_thread_and_the_drain_ends_them() {
    let listeners = per_thread::bind_reuseport("127.0.0.1:0".parse().unwrap(), 2).unwrap();
    let addr = listeners[0].local_addr().unwrap();
    let threads = Arc::new(Mutex::new(HashSet::new()));
    let seen = Arc::clone(&threads);
    let service = tower::service_fn(move |_request: Request<Incoming>| {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        seen.lock().unwrap().insert(name.clone());
        async move { Ok::<_, Infallible>(json(StatusCode::OK, &serde_json::json!({"thread": name}))) }
    });
    let shutdown = Shutdown::new();
    let serving = tokio::spawn(per_thread::serve(
        listeners,
        service,
        ServeConfig::default(),
        shutdown.clone(),
    ));
    let connections = 40;
    for _ in 0..connections {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("\"thread\":\"serve-"), "{response}");
    }
    shutdown.trigger();
    let report = serving.await.unwrap();
    assert_eq!(report.accepted, connections);
    assert!(report.drained);
    let names = threads.lock().unwrap().clone();
    assert!(names.iter().all(|n| n.starts_with("serve-")), "{names:?}");
    // Closed with the threads.
    assert!(TcpStream::connect(addr).await.is_err());
}
