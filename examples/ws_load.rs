//! Load generator for `notify_server`: N authenticated WebSocket
//! connections, R notifications/s through the HTTP API, end-to-end latency
//! and an exactly-once check. The last line of output is a JSON summary.
//!
//! ```text
//! cargo run --release --features notify-server --example ws_load -- \
//!   --server http://127.0.0.1:8080 --connections 10000 --groups 1 --seconds 30 \
//!   --rate 1 --mode broadcast --jwt-secret "$NOTIFY_JWT_SECRET" [--protocol v2]
//! ```
//!
//! `--protocol v2` offers the subprotocol `notify.v2` (streams); the default
//! is `notify.v1`. The exactly-once check keys on the notification's own
//! counter, so it holds for either.
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "support/fd_limit.rs"]
mod fd_limit;

#[path = "support/loopback.rs"]
mod loopback;

#[path = "support/process_cpu.rs"]
mod process_cpu;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{EncodingKey, Header};
use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The parts of a server frame the loader reads.
#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    notification: Option<LoadNotification>,
}

#[derive(serde::Deserialize)]
struct LoadNotification {
    data: LoadData,
}

#[derive(serde::Deserialize)]
struct LoadData {
    k: u64,
    sent_ns: u64,
}

struct Args {
    server: String,
    connections: usize,
    groups: usize,
    seconds: u64,
    rate: f64,
    mode: String,
    secret: String,
    server_pid: Option<u32>,
    protocol: String,
}

fn parse_args() -> Args {
    let mut a = Args {
        server: "http://127.0.0.1:8080".into(),
        connections: 1000,
        groups: 10,
        seconds: 10,
        rate: 10.0,
        mode: "mixed".into(),
        secret: std::env::var("NOTIFY_JWT_SECRET").unwrap_or_default(),
        server_pid: None,
        protocol: "v1".into(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--server" => a.server = v,
            "--connections" => a.connections = v.parse().expect("--connections N"),
            "--groups" => a.groups = v.parse::<usize>().expect("--groups G").max(1),
            "--seconds" => a.seconds = v.parse().expect("--seconds S"),
            "--rate" => a.rate = v.parse().expect("--rate R"),
            "--mode" => a.mode = v,
            "--jwt-secret" => a.secret = v,
            "--server-pid" => a.server_pid = Some(v.parse().expect("--server-pid PID")),
            "--protocol" => a.protocol = v,
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        ["broadcast", "direct", "mixed"].contains(&a.mode.as_str()),
        "--mode broadcast|direct|mixed"
    );
    assert!(
        ["v1", "v2"].contains(&a.protocol.as_str()),
        "--protocol v1|v2"
    );
    assert!(
        !a.secret.is_empty(),
        "--jwt-secret SECRET (or NOTIFY_JWT_SECRET)"
    );
    a
}

fn token(secret: &str, sub: &str, groups: &[String], roles: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({"sub": sub, "exp": exp, "groups": groups, "roles": roles});
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// What one connection saw.
#[derive(Default)]
struct Seen {
    /// Got its welcome frame; a connection that never did expects nothing
    /// (it is counted in `connect_errors`, not as lost deliveries).
    connected: bool,
    keys: HashSet<u64>,
    duplicates: u64,
    latencies_us: Vec<u64>,
}

fn server_rss_mib(pid: Option<u32>) -> f64 {
    let pid = pid.or_else(|| {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == "notify_server")
                .then(|| e.file_name().to_str()?.parse().ok())
                .flatten()
        })
    });
    let Some(pid) = pid else { return -1.0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(-1.0, |kib| kib / 1024.0)
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    if let Ok(limit) = fd_limit::raise_fd_limit(1_048_576) {
        eprintln!("open-file limit {limit}");
    }
    let uri: http::Uri = args.server.parse().expect("--server URL");
    let host = uri.host().unwrap_or("127.0.0.1").to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .unwrap();
    let rss_before = server_rss_mib(args.server_pid);

    // Connect (spreading source addresses, see `loopback`).
    let connections = args.connections;
    let seen: Vec<Arc<Mutex<Seen>>> = (0..args.connections).map(|_| Arc::default()).collect();
    let connect_errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut readers = Vec::with_capacity(args.connections);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(256));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    for i in 0..args.connections {
        let user = format!("load-{i}");
        let groups = vec![format!("group-{}", i % args.groups)];
        let url = format!(
            "ws://{host}:{port}/v1/ws?access_token={}",
            token(&args.secret, &user, &groups, &[])
        );
        let subprotocol = if args.protocol == "v2" {
            "notify.v2"
        } else {
            "notify.v1"
        };
        let (seen, errors, semaphore, ready) = (
            Arc::clone(&seen[i]),
            Arc::clone(&connect_errors),
            Arc::clone(&semaphore),
            ready_tx.clone(),
        );
        readers.push(tokio::spawn(async move {
            let permit = semaphore.acquire_owned().await.unwrap();
            let Ok(socket) = loopback::socket_for(addr, i, connections) else {
                errors.fetch_add(1, Ordering::Relaxed);
                let _ = ready.send(false);
                return;
            };
            let stream = match socket.connect(addr).await {
                Ok(s) => s,
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    let _ = ready.send(false);
                    return;
                }
            };
            // A 4 KiB read buffer, like the server's: tungstenite's default
            // (128 KiB) is zeroed on every read, which made the loader, not
            // the server, the bottleneck of a 10,000-connection broadcast.
            let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
            let mut request = url.as_str().into_client_request().expect("a WebSocket URL");
            request.headers_mut().insert(
                "sec-websocket-protocol",
                http::HeaderValue::from_static(subprotocol),
            );
            let mut ws =
                match tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                    .await
                {
                    Ok((ws, _)) => ws,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let _ = ready.send(false);
                        return;
                    }
                };
            // Wait for the welcome frame: then the subscription is live.
            let welcomed = match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    matches!(serde_json::from_str::<Frame<'_>>(&text), Ok(f) if f.kind == "welcome")
                }
                _ => false,
            };
            seen.lock().connected = welcomed;
            drop(permit);
            let _ = ready.send(welcomed);
            if !welcomed {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            while let Some(Ok(message)) = ws.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let received = now_ns();
                // Only the fields the check needs; welcome, error and other
                // frames fail to parse and are skipped.
                let Ok(Frame {
                    kind: "notification",
                    notification: Some(notification),
                }) = serde_json::from_str::<Frame<'_>>(&text)
                else {
                    continue;
                };
                let (k, sent) = (notification.data.k, notification.data.sent_ns);
                let mut s = seen.lock();
                if s.keys.insert(k) {
                    s.latencies_us.push(received.saturating_sub(sent) / 1000);
                } else {
                    s.duplicates += 1;
                }
            }
        }));
    }
    drop(ready_tx);
    let mut connected = 0usize;
    for _ in 0..args.connections {
        match ready_rx.recv().await {
            Some(ok) => connected += usize::from(ok),
            None => break,
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = server_rss_mib(args.server_pid);
    eprintln!(
        "connected {connected} in {connect_secs:.1} s; server rss {rss_before:.1} -> {rss_idle:.1} MiB"
    );

    // Send at the offered rate.
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let service = token(&args.secret, "ws_load", &[], &["notify:send"]);
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let total = (args.rate * args.seconds as f64).round() as u64;
    let expected: Arc<Mutex<Vec<Vec<u64>>>> =
        Arc::new(Mutex::new(vec![Vec::new(); args.connections]));
    let send_errors = Arc::new(AtomicU64::new(0));
    let cpu_before = process_cpu::cpu_seconds();
    let mut ticker = tokio::time::interval(interval);
    let mut sends = Vec::new();
    for k in 0..total {
        ticker.tick().await;
        let broadcast = match args.mode.as_str() {
            "broadcast" => true,
            "direct" => false,
            _ => k % 2 == 0,
        };
        let notification = serde_json::json!({"type": "load.test", "title": "load", "message": "m", "data": {"k": k, "sent_ns": now_ns()}});
        let (path, body, targets): (String, serde_json::Value, Vec<usize>) = if broadcast {
            let g = (k as usize) % args.groups;
            (
                format!("/v1/groups/group-{g}/notifications"),
                serde_json::json!({"notification": notification}),
                (0..args.connections)
                    .filter(|i| i % args.groups == g)
                    .collect(),
            )
        } else {
            let i = (k as usize) % args.connections;
            (
                "/v1/notifications".into(),
                serde_json::json!({"user_ids": [format!("load-{i}")], "notification": notification}),
                vec![i],
            )
        };
        let request = http::Request::post(format!("http://{host}:{port}{path}"))
            .header("authorization", format!("Bearer {service}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let (client, expected, errors) = (
            client.clone(),
            Arc::clone(&expected),
            Arc::clone(&send_errors),
        );
        sends.push(tokio::spawn(async move {
            match client.request(request).await {
                Ok(r) if r.status().is_success() => {
                    let mut e = expected.lock();
                    for i in targets {
                        e[i].push(k);
                    }
                }
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for s in sends {
        let _ = s.await;
    }
    // Let the last deliveries arrive.
    let mut expected = expected.lock().clone();
    for (e, s) in expected.iter_mut().zip(&seen) {
        if !s.lock().connected {
            e.clear();
        }
    }
    let expected_total: u64 = expected.iter().map(|e| e.len() as u64).sum();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let delivered: u64 = seen.iter().map(|s| s.lock().keys.len() as u64).sum();
        if delivered >= expected_total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let loader_cpu = process_cpu::cpu_seconds() - cpu_before;
    let rss_end = server_rss_mib(args.server_pid);
    let (mut delivered, mut lost, mut duplicates) = (0u64, 0u64, 0u64);
    let mut latencies: Vec<u64> = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock();
        delivered += s.keys.len() as u64;
        duplicates += s.duplicates;
        lost += expected[i].iter().filter(|k| !s.keys.contains(k)).count() as u64;
        latencies.extend_from_slice(&s.latencies_us);
    }
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return -1.0;
        }
        let idx = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx] as f64 / 1000.0
    };
    for r in readers {
        r.abort();
    }
    let idle_per_conn = if connected > 0 && rss_before >= 0.0 {
        (rss_idle - rss_before) * 1024.0 * 1024.0 / connected as f64
    } else {
        -1.0
    };
    println!(
        "{}",
        serde_json::json!({
            "connections": connected, "connect_errors": connect_errors.load(Ordering::Relaxed),
            "connect_seconds": (connect_secs * 10.0).round() / 10.0, "mode": args.mode, "protocol": args.protocol,
            "sent": total - send_errors.load(Ordering::Relaxed), "send_errors": send_errors.load(Ordering::Relaxed),
            "expected_deliveries": expected_total, "delivered": delivered, "lost": lost, "duplicates": duplicates,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "server_rss_mib": rss_end, "server_rss_idle_mib": rss_idle,
            "idle_bytes_per_connection": idle_per_conn.round(),
            // This loader's own CPU while sending and receiving, per
            // delivery: it shares the machine with the server.
            "loader_cpu_us_per_delivery": if delivered > 0 { (loader_cpu * 1e7 / delivered as f64).round() / 10.0 } else { -1.0 },
        })
    );
}
