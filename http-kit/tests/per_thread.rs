//! `per_thread`: one socket, its connections dealt in turn to threads with a
//! runtime each, drained together.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Request, StatusCode};
use http_kit::{ServeConfig, Shutdown, json, per_thread};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request on a connection of its own, answered 200.
async fn get_one(addr: std::net::SocketAddr) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_dealt_evenly_and_the_drain_ends_the_threads() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Requests served, by the serving thread's name.
    let served: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let seen = Arc::clone(&served);
    let service = tower::service_fn(move |_request: Request<Incoming>| {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        *seen.lock().unwrap().entry(name.clone()).or_default() += 1;
        async move { Ok::<_, Infallible>(json(StatusCode::OK, &serde_json::json!({"thread": name}))) }
    });
    let shutdown = Shutdown::new();
    let threads = 3;
    let serving = tokio::spawn(per_thread::serve(
        listener,
        threads,
        service,
        ServeConfig::default(),
        shutdown.clone(),
    ));
    // One after another, so the dealing order is the connections' order.
    let connections = 30;
    for _ in 0..connections {
        get_one(addr).await;
    }
    let by_thread = served.lock().unwrap().clone();
    assert_eq!(by_thread.len(), threads, "{by_thread:?}");
    for (name, count) in &by_thread {
        assert!(name.starts_with("serve-"), "{name}");
        assert_eq!(*count, connections / threads, "{by_thread:?}");
    }
    shutdown.trigger();
    let report = serving.await.unwrap();
    assert_eq!(report.accepted, connections as u64);
    assert!(report.drained);
    // The listening socket closed with the threads.
    assert!(TcpStream::connect(addr).await.is_err());
}

/// A connection still busy when the drain starts finishes its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_at_shutdown_is_answered() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = Arc::clone(&release);
    let service = tower::service_fn(move |_request: Request<Incoming>| {
        let (arrived, gate) = (arrived_tx.clone(), Arc::clone(&gate));
        async move {
            let _ = arrived.send(());
            let _permit = gate.acquire().await.unwrap();
            Ok::<_, Infallible>(json(StatusCode::OK, &serde_json::json!({"done": true})))
        }
    });
    let shutdown = Shutdown::new();
    let serving = tokio::spawn(per_thread::serve(
        listener,
        2,
        service,
        ServeConfig::default(),
        shutdown.clone(),
    ));
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut arrived_rx = arrived_rx;
    arrived_rx.recv().await.unwrap();
    shutdown.trigger();
    release.add_permits(1);
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"done\":true"), "{response}");
    let report = serving.await.unwrap();
    assert_eq!(report.accepted, 1);
    assert!(report.drained);
}

/// The CPUs the calling thread may run on.
#[cfg(target_os = "linux")]
fn my_cpus() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    let mask = sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    (0..CpuSet::count())
        .filter(|&cpu| mask.is_set(cpu).unwrap())
        .collect()
}

/// Per serving thread: its CPUs, and those of a blocking task it starts.
#[cfg(target_os = "linux")]
type CpusByThread = HashMap<String, (Vec<usize>, Vec<usize>)>;

/// The CPUs each serving thread may run on, as its service sees them, and
/// those of a blocking task it starts, with `pin_threads` as given: as many
/// threads as the process has CPUs (at most two), each connection a
/// request.
#[cfg(target_os = "linux")]
async fn cpus_by_thread(pin: bool) -> (usize, CpusByThread) {
    let threads = my_cpus().len().min(2);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<CpusByThread>> = Arc::default();
    let record = Arc::clone(&seen);
    let service = tower::service_fn(move |_request: Request<Incoming>| {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        let cpus = my_cpus();
        let record = Arc::clone(&record);
        async move {
            let blocking = tokio::task::spawn_blocking(my_cpus).await.unwrap();
            record.lock().unwrap().insert(name, (cpus, blocking));
            Ok::<_, Infallible>(json(StatusCode::OK, &serde_json::json!({})))
        }
    });
    let shutdown = Shutdown::new();
    let serving = tokio::spawn(per_thread::serve(
        listener,
        threads,
        service,
        ServeConfig::default().with_pin_threads(pin),
        shutdown.clone(),
    ));
    for _ in 0..threads * 2 {
        get_one(addr).await;
    }
    shutdown.trigger();
    serving.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    (threads, seen)
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_threads_run_on_a_cpu_each_and_unpinned_ones_anywhere() {
    let all = my_cpus();
    let (threads, pinned) = cpus_by_thread(true).await;
    assert_eq!(pinned.len(), threads, "{pinned:?}");
    let mut used: Vec<usize> = pinned
        .values()
        .map(|(cpus, blocking)| {
            assert_eq!(cpus.len(), 1, "{pinned:?}");
            // What the serving runtime starts for blocking work is not.
            assert_eq!(*blocking, all, "{pinned:?}");
            cpus[0]
        })
        .collect();
    used.sort_unstable();
    used.dedup();
    assert_eq!(used.len(), threads, "a CPU each: {pinned:?}");
    assert!(used.iter().all(|cpu| all.contains(cpu)), "{pinned:?}");

    let (_, unpinned) = cpus_by_thread(false).await;
    assert!(
        unpinned
            .values()
            .all(|(cpus, blocking)| *cpus == all && *blocking == all),
        "{unpinned:?}"
    );
}
