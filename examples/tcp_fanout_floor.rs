//! The floor under `ws_load --mode broadcast`: the same fan-out of one small
//! frame to N loopback TCP connections, with no WebSocket, no JSON, no hub
//! and no store. A writer process (this example started again with
//! `--writer`) holds the accepted sockets and, once a second, stamps the time
//! into a frame and writes it to every socket from tokio tasks; this process
//! holds the client sockets, one reading task each, and measures send time to
//! receipt on the same host clock, as `ws_load` does. The last line of
//! output is a JSON summary.
//!
//! ```text
//! cargo run --release --example tcp_fanout_floor -- \
//!   --connections 10000 --rounds 30
//! ```
//!
//! Whatever this measures is the machine's cost of the kernel and tokio
//! work alone; `ws_load`'s latency divided by it is what the notification
//! stack adds.
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "support/fd_limit.rs"]
mod fd_limit;

#[path = "support/loopback.rs"]
mod loopback;

#[path = "support/process_cpu.rs"]
mod process_cpu;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Args {
    connections: usize,
    rounds: u64,
    frame_bytes: usize,
    writers: usize,
    writer: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        connections: 10_000,
        rounds: 30,
        frame_bytes: 256,
        writers: 2,
        writer: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--writer" {
            a.writer = true;
            continue;
        }
        let v = it.next().unwrap_or_default();
        match flag.as_str() {
            "--connections" => a.connections = v.parse().expect("--connections N"),
            "--rounds" => a.rounds = v.parse().expect("--rounds R"),
            "--frame-bytes" => a.frame_bytes = v.parse::<usize>().expect("--frame-bytes B").max(8),
            "--writers" => a.writers = v.parse::<usize>().expect("--writers W").max(1),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let _ = fd_limit::raise_fd_limit(1_048_576);
    if args.writer {
        write_side(&args).await;
    } else {
        read_side(&args).await;
    }
}

/// The writer process: accept N connections, then `rounds` fan-outs, one a second.
async fn write_side(args: &Args) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    let mut sockets = Vec::with_capacity(args.connections);
    while sockets.len() < args.connections {
        let (socket, _) = listener.accept().await.unwrap();
        socket.set_nodelay(true).unwrap();
        sockets.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // One chunk of sockets per writer task, as a server's tasks would share them.
    let chunk = sockets.len().div_ceil(args.writers);
    let mut chunks: Vec<Vec<TcpStream>> = Vec::new();
    while !sockets.is_empty() {
        let rest = sockets.split_off(chunk.min(sockets.len()));
        chunks.push(std::mem::replace(&mut sockets, rest));
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    for _ in 0..args.rounds {
        ticker.tick().await;
        let mut frame = vec![b' '; args.frame_bytes];
        frame[..8].copy_from_slice(&now_ns().to_le_bytes());
        let frame: Arc<[u8]> = frame.into();
        let tasks: Vec<_> = chunks
            .drain(..)
            .map(|mut chunk| {
                let frame = Arc::clone(&frame);
                tokio::spawn(async move {
                    for socket in &mut chunk {
                        socket.write_all(&frame).await.unwrap();
                    }
                    chunk
                })
            })
            .collect();
        for task in tasks {
            chunks.push(task.await.unwrap());
        }
    }
    // Let the reader drain before the sockets close.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// This process: start the writer, connect, read every frame, report.
async fn read_side(args: &Args) {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--writer", "--connections", &args.connections.to_string()])
        .args(["--rounds", &args.rounds.to_string()])
        .args(["--frame-bytes", &args.frame_bytes.to_string()])
        .args(["--writers", &args.writers.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the writer process");
    // Killed and reaped on every way out, a panic included.
    let mut writer = Writer(child);
    let mut port = String::new();
    let read = BufReader::new(writer.0.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    assert!(read > 0, "the writer process exited before listening");
    let server: SocketAddr = format!("127.0.0.1:{}", port.trim()).parse().unwrap();

    let latencies_us = Arc::new(Mutex::new(Vec::<u64>::new()));
    let mut readers = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let socket = loopback::socket_for(server, i, args.connections).unwrap();
        let mut stream = socket.connect(server).await.unwrap();
        let (latencies_us, rounds, len) =
            (Arc::clone(&latencies_us), args.rounds, args.frame_bytes);
        readers.push(tokio::spawn(async move {
            let mut frame = vec![0u8; len];
            let mut mine = Vec::with_capacity(rounds as usize);
            for _ in 0..rounds {
                if stream.read_exact(&mut frame).await.is_err() {
                    break;
                }
                let received = now_ns();
                let sent = u64::from_le_bytes(frame[..8].try_into().unwrap());
                mine.push(received.saturating_sub(sent) / 1000);
            }
            latencies_us.lock().extend_from_slice(&mine);
            // Closed only after every reader is done: 10,000 closes in the
            // last round would otherwise be part of its latency.
            stream
        }));
    }
    let started = Instant::now();
    let cpu_before = process_cpu::cpu_seconds();
    let mut streams = Vec::with_capacity(readers.len());
    for r in readers {
        streams.extend(r.await);
    }
    let reader_cpu = process_cpu::cpu_seconds() - cpu_before;
    drop(streams);
    let status = tokio::task::spawn_blocking(move || writer.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the writer process failed: {status}");
    let mut latencies = std::mem::take(&mut *latencies_us.lock());
    latencies.sort_unstable();
    let expected = args.connections as u64 * args.rounds;
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return -1.0;
        }
        let idx = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx] as f64 / 1000.0
    };
    println!(
        "{}",
        serde_json::json!({
            "connections": args.connections, "rounds": args.rounds, "frame_bytes": args.frame_bytes,
            "writers": args.writers, "expected": expected, "received": latencies.len(),
            "lost": expected - latencies.len() as u64, "seconds": started.elapsed().as_secs_f64().round(),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            // The reading side's own CPU per frame (the loader's, in ws_load).
            "reader_cpu_us_per_frame": if latencies.is_empty() { -1.0 } else { (reader_cpu * 1e7 / latencies.len() as f64).round() / 10.0 },
        })
    );
}

/// The writer process, killed and reaped when dropped.
struct Writer(std::process::Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
