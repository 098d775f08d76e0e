//! Measures `Hub::history(user, 50)` on the PostgreSQL store for a user with
//! 100,000 notifications (and, as the baseline, on the in-memory store).
//! The last line is a JSON summary.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/notify_history \
//!   cargo run --release --features notify-server --example notify_history -- --notifications 100000
//! ```
//!
//! With `--groups G` (ADR 0026), the user is a member of G groups, half of
//! the notifications are broadcasts to them in turn (one stream item each,
//! no per-member copies) and half direct sends, and what is measured is
//! `Hub::stream_history(user, 50)`, which merges the inbox with every
//! group's stream over the user's memberships.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use notify_hub::store::PgStore;
use notify_hub::{Hub, HubConfig, LocalBroker, MemoryStore, Notification, Store};

async fn fill_and_measure(
    store: impl Store,
    notifications: usize,
    calls: usize,
    groups: usize,
) -> (f64, f64, f64, f64) {
    let config = HubConfig::default().with_v1_group_fanout(groups == 0);
    let hub = Hub::start(config, store, LocalBroker::new())
        .await
        .expect("hub");
    for g in 0..groups {
        for user in ["target", "other-0"] {
            hub.join_group(&format!("g{g}"), user).await.expect("join");
        }
    }
    // Other users' rows too, so the index is not one user's alone.
    let started = Instant::now();
    let mut pending = Vec::with_capacity(256);
    for i in 0..notifications {
        let hub = hub.clone();
        pending.push(tokio::spawn(async move {
            let n =
                Notification::new("bench", format!("n{i}"), "history benchmark").with_data("i", i);
            if groups > 0 && i % 2 == 1 {
                hub.broadcast_to_group(&format!("g{}", (i / 2) % groups), n)
                    .await
                    .expect("broadcast");
            } else {
                hub.send_to_users(&["target", &format!("other-{}", i % 100)], n)
                    .await
                    .expect("send");
            }
        }));
        if pending.len() == 256 {
            for p in pending.drain(..) {
                p.await.expect("task");
            }
        }
    }
    for p in pending {
        p.await.expect("task");
    }
    let fill = started.elapsed().as_secs_f64();
    let mut latencies: Vec<Duration> = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let len = if groups > 0 {
            hub.stream_history("target", 50)
                .await
                .expect("history")
                .len()
        } else {
            hub.history("target", 50).await.expect("history").len()
        };
        latencies.push(t.elapsed());
        assert_eq!(len, 50);
    }
    latencies.sort_unstable();
    let ms = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
            .as_secs_f64()
            * 1000.0
    };
    (fill, ms(0.5), ms(0.99), ms(1.0))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let notifications = args
        .iter()
        .position(|a| a == "--notifications")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(100_000);
    let groups = args
        .iter()
        .position(|a| a == "--groups")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(0);
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL to an empty database")?;
    let pg = PgStore::connect(&url, 8).await?;
    pg.migrate().await?;
    let (pg_fill, pg_p50, pg_p99, pg_max) = fill_and_measure(pg, notifications, 1000, groups).await;
    let (_, mem_p50, mem_p99, _) = fill_and_measure(
        MemoryStore::with_retention(notifications),
        notifications,
        1000,
        groups,
    )
    .await;
    println!(
        "{}",
        serde_json::json!({
            "notifications": notifications, "groups": groups, "calls": 1000, "limit": 50,
            "pg_fill_seconds": (pg_fill * 10.0).round() / 10.0,
            "pg_p50_ms": pg_p50, "pg_p99_ms": pg_p99, "pg_max_ms": pg_max,
            "memory_p50_ms": mem_p50, "memory_p99_ms": mem_p99,
        })
    );
    Ok(())
}
