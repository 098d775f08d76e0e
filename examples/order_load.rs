//! Load generator for `order_service`: creates orders over HTTP from many
//! concurrent clients, waits for every saga to end, checks the invariants
//! against PostgreSQL and the payment simulator, and prints a JSON summary
//! as its last line.
//!
//! ```text
//! cargo run --release --example order_load -- --url http://127.0.0.1:8081 \
//!   --payment-url http://127.0.0.1:8090 --database-url "$DATABASE_URL" \
//!   --seconds 20 --concurrency 64 --skus 200 --jwt-secret "$JWT_SECRET"
//! ```
//!
//! By default each client sends its next order when the last is answered
//! (closed loop: the highest rate the service sustains). `--rate R` sends R
//! orders a second on a fixed schedule shared by the clients (open loop),
//! and measures each create from its scheduled time, so the latency figures
//! are those at that offered load.
//!
//! `scripts/order-load` starts `payment_sim` and `order_service`, runs this,
//! and stops them. The summary's fields are described in
//! docs/PERFORMANCE.md ("order-saga").

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use http::Method;
use order_saga::http::{ClientConfig, JsonClient};
use parking_lot::Mutex;
use serde_json::{Value, json};

#[derive(Debug)]
struct Args {
    url: String,
    payment_url: Option<String>,
    database_url: Option<String>,
    jwt_secret: String,
    seconds: u64,
    concurrency: usize,
    skus: usize,
    customers: usize,
    rate: f64,
}

fn parse_args() -> Args {
    let mut a = Args {
        url: "http://127.0.0.1:8081".into(),
        payment_url: None,
        database_url: std::env::var("DATABASE_URL").ok(),
        jwt_secret: std::env::var("JWT_SECRET").unwrap_or_default(),
        seconds: 20,
        concurrency: 64,
        skus: 200,
        customers: 1000,
        rate: 0.0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let flag = argv[i].as_str();
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match flag {
            "--url" => a.url = value,
            "--payment-url" => a.payment_url = Some(value),
            "--database-url" => a.database_url = Some(value),
            "--jwt-secret" => a.jwt_secret = value,
            "--seconds" => a.seconds = value.parse().expect("--seconds N"),
            "--concurrency" => a.concurrency = value.parse().expect("--concurrency N"),
            "--skus" => a.skus = value.parse().expect("--skus N"),
            "--customers" => a.customers = value.parse().expect("--customers N"),
            "--rate" => a.rate = value.parse().expect("--rate ORDERS_PER_SEC"),
            other => {
                eprintln!("unknown flag {other}");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    if a.jwt_secret.is_empty() {
        eprintln!("order_load: set JWT_SECRET or --jwt-secret (the order service's HS256 secret)");
        std::process::exit(2);
    }
    a
}

fn token(secret: &str, sub: &str, roles: &[&str]) -> String {
    let exp = chrono::Utc::now().timestamp() + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "exp": exp, "roles": roles}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// The p99 of a bare one-row `INSERT … COMMIT` on the same database.
async fn floor_commit_p99_ms(url: &str) -> Option<f64> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS order_load_floor (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())")
        .await
        .ok()?;
    let statement = client
        .prepare("INSERT INTO order_load_floor DEFAULT VALUES")
        .await
        .ok()?;
    let mut h = hist();
    for _ in 0..2000 {
        let start = Instant::now();
        client.execute(&statement, &[]).await.ok()?;
        h.record(start.elapsed().as_micros().max(1) as u64).ok()?;
    }
    client
        .batch_execute("DROP TABLE order_load_floor")
        .await
        .ok()?;
    Some(ms(&h, 0.99))
}

/// Bare one-row commits in chains of 3 and 6 in a row, one chain every
/// 100 ms until `stop`, on their own connection while the load runs: the
/// durable writes a create (3) and a saga (6, besides its provider calls)
/// must make in sequence, with nothing on top. Their p99s in ms.
async fn commit_chains_under_load(url: String, stop: Arc<AtomicBool>) -> Option<(f64, f64)> {
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS order_load_chain (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())")
        .await
        .ok()?;
    let statement = client
        .prepare("INSERT INTO order_load_chain DEFAULT VALUES")
        .await
        .ok()?;
    let (mut three, mut six) = (hist(), hist());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let start = Instant::now();
        for n in 1..=6 {
            client.execute(&statement, &[]).await.ok()?;
            if n == 3 {
                three
                    .record(start.elapsed().as_micros().max(1) as u64)
                    .ok()?;
            }
        }
        six.record(start.elapsed().as_micros().max(1) as u64).ok()?;
    }
    let _ = client.batch_execute("DROP TABLE order_load_chain").await;
    (!six.is_empty()).then(|| (ms(&three, 0.99), ms(&six, 0.99)))
}

/// A bare one-row `INSERT … COMMIT` every 10 ms until `stop`, on its own
/// connection, while the load runs: what a commit costs on this machine
/// under this load. Its p99 in ms.
async fn floor_under_load(url: String, stop: Arc<AtomicBool>) -> Option<f64> {
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS order_load_floor_loaded (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())")
        .await
        .ok()?;
    let statement = client
        .prepare("INSERT INTO order_load_floor_loaded DEFAULT VALUES")
        .await
        .ok()?;
    let mut h = hist();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let start = Instant::now();
        client.execute(&statement, &[]).await.ok()?;
        h.record(start.elapsed().as_micros().max(1) as u64).ok()?;
    }
    let _ = client
        .batch_execute("DROP TABLE order_load_floor_loaded")
        .await;
    Some(ms(&h, 0.99))
}

/// The saga's external calls alone, while the load runs: an authorization
/// and its capture, in sequence, straight to the simulator, every 20 ms
/// until `stop` (their own order ids; pairs the simulator refused are not
/// counted). The p99 of a pair in ms.
async fn provider_pairs_under_load(payment_url: String, stop: Arc<AtomicBool>) -> Option<f64> {
    let sim = JsonClient::new(ClientConfig::new(&payment_url)).ok()?;
    let mut h = hist();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let order_id = uuid::Uuid::now_v7();
        let body = json!({"order_id": order_id, "amount_cents": 1500, "currency": "EUR"});
        let start = Instant::now();
        let authorize_key = format!("probe-{order_id}:authorize");
        let Ok((status, bytes)) = sim
            .send(
                Method::POST,
                "/v1/authorizations",
                Some(&body),
                &[("idempotency-key", authorize_key.as_str())],
            )
            .await
        else {
            continue;
        };
        if status.as_u16() != 201 {
            continue;
        }
        let Some(payment) = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_owned))
        else {
            continue;
        };
        let capture_key = format!("probe-{order_id}:capture");
        if let Ok((status, _)) = sim
            .send::<()>(
                Method::POST,
                &format!("/v1/payments/{payment}/capture"),
                None,
                &[("idempotency-key", capture_key.as_str())],
            )
            .await
            && status.as_u16() == 200
        {
            let _ = h.record(start.elapsed().as_micros().max(1) as u64);
        }
    }
    (!h.is_empty()).then(|| ms(&h, 0.99))
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let floor = match &args.database_url {
        Some(url) => floor_commit_p99_ms(url).await,
        None => None,
    };
    let client =
        JsonClient::new(ClientConfig::new(&args.url).with_timeout(Duration::from_secs(10)))
            .expect("client");
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..args.customers)
            .map(|i| {
                format!(
                    "Bearer {}",
                    token(&args.jwt_secret, &format!("load-{i}"), &[])
                )
            })
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let created_h = Arc::new(Mutex::new(hist()));
    let ids: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let statuses: Arc<Mutex<HashMap<u16, u64>>> = Arc::new(Mutex::new(HashMap::new()));
    let started = Instant::now();
    let loaded_floor = args
        .database_url
        .clone()
        .map(|url| tokio::spawn(floor_under_load(url, stop.clone())));
    let commit_chains = args
        .database_url
        .clone()
        .map(|url| tokio::spawn(commit_chains_under_load(url, stop.clone())));
    let provider_pairs = args
        .payment_url
        .clone()
        .map(|url| tokio::spawn(provider_pairs_under_load(url, stop.clone())));
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let (client, tokens, stop, created_h, ids, statuses) = (
            client.clone(),
            tokens.clone(),
            stop.clone(),
            created_h.clone(),
            ids.clone(),
            statuses.clone(),
        );
        let (skus, rate, concurrency) = (args.skus, args.rate, args.concurrency);
        workers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(w as u64);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // Open loop (`--rate`): the workers take turns on a fixed
                // schedule, and latency counts from the scheduled time, so
                // a slow answer that delays the next send is not hidden.
                let scheduled = if rate > 0.0 {
                    let slot = (n - 1) * concurrency as u64 + w as u64;
                    let at = started + Duration::from_secs_f64(slot as f64 / rate);
                    tokio::time::sleep_until(at.into()).await;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    at
                } else {
                    Instant::now()
                };
                let lines = 1 + rng.usize(..3);
                let mut picked: Vec<usize> = (0..lines).map(|_| rng.usize(..skus)).collect();
                picked.sort_unstable();
                picked.dedup();
                let items: Vec<Value> = picked.iter().map(|s| json!({"sku": format!("SKU-{s}"), "quantity": 1 + rng.u32(..2)})).collect();
                let body = json!({"items": items, "ship_to": {"name": "Load Test", "line1": "1 Bench Street", "city": "Testville", "postal_code": "00000", "country": "US"}});
                let auth = &tokens[rng.usize(..tokens.len())];
                let key = format!("load-{w}-{n}");
                let reply = client
                    .send(Method::POST, "/v1/orders", Some(&body), &[("authorization", auth.as_str()), ("idempotency-key", key.as_str())])
                    .await;
                let elapsed = scheduled.elapsed();
                match reply {
                    Ok((status, bytes)) => {
                        *statuses.lock().entry(status.as_u16()).or_default() += 1;
                        if status.as_u16() == 201 {
                            let _ = created_h.lock().record(elapsed.as_micros().max(1) as u64);
                            if let Ok(order) = serde_json::from_slice::<Value>(&bytes)
                                && let Some(id) = order["id"].as_str()
                            {
                                ids.lock().push(id.to_owned());
                            }
                        }
                    }
                    Err(e) => {
                        *statuses.lock().entry(0).or_default() += 1;
                        eprintln!("request failed: {e}");
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let load_secs = started.elapsed().as_secs_f64();
    let loaded_floor = match loaded_floor {
        Some(task) => task.await.ok().flatten(),
        None => None,
    };
    let commit_chains = match commit_chains {
        Some(task) => task.await.ok().flatten(),
        None => None,
    };
    let provider_pair_p99 = match provider_pairs {
        Some(task) => task.await.ok().flatten(),
        None => None,
    };
    // Wait for every saga to end, then read each order once.
    let admin = format!(
        "Bearer {}",
        token(&args.jwt_secret, "load-admin", &["admin"])
    );
    let ids = ids.lock().clone();
    let mut saga_h = hist();
    let mut by_state: HashMap<String, u64> = HashMap::new();
    let mut reasons: HashMap<String, u64> = HashMap::new();
    // The span from the first order created to the last saga ended, by the
    // orders' own timestamps: sagas/s counts only finished work.
    let mut first_created: Option<chrono::DateTime<chrono::FixedOffset>> = None;
    let mut last_ended: Option<chrono::DateTime<chrono::FixedOffset>> = None;
    let wait_deadline = Instant::now() + Duration::from_secs(120);
    let mut pending: Vec<String> = ids.clone();
    while !pending.is_empty() && Instant::now() < wait_deadline {
        let mut still = Vec::new();
        for chunk in pending.chunks(256) {
            let mut calls = Vec::new();
            for id in chunk {
                let client = client.clone();
                let admin = admin.clone();
                let id = id.clone();
                calls.push(tokio::spawn(async move {
                    let reply = client
                        .send::<()>(
                            Method::GET,
                            &format!("/v1/orders/{id}"),
                            None,
                            &[("authorization", admin.as_str())],
                        )
                        .await;
                    (id, reply)
                }));
            }
            for call in calls {
                let (id, reply) = call.await.expect("join");
                let order: Value = match reply {
                    Ok((status, bytes)) if status.is_success() => {
                        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
                    }
                    _ => Value::Null,
                };
                let state = order["state"].as_str().unwrap_or("unknown").to_owned();
                if matches!(
                    state.as_str(),
                    "confirmed" | "cancelled" | "needs_attention"
                ) {
                    let created = order["created_at"]
                        .as_str()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
                    let updated = order["updated_at"]
                        .as_str()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
                    if let (Some(c), Some(u)) = (created, updated) {
                        let _ =
                            saga_h.record((u - c).num_microseconds().unwrap_or(1).max(1) as u64);
                        first_created = Some(first_created.map_or(c, |f| f.min(c)));
                        last_ended = Some(last_ended.map_or(u, |l| l.max(u)));
                    }
                    if let Some(reason) = order["cancel_reason"].as_str() {
                        *reasons.entry(reason.to_owned()).or_default() += 1;
                    }
                    *by_state.entry(state).or_default() += 1;
                } else {
                    still.push(id);
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Invariants, from the services' own records.
    let (mut oversold, mut orphans) = (Value::Null, Value::Null);
    if let Some(url) = &args.database_url
        && let Ok((pg, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
    {
        tokio::spawn(connection);
        if let Ok(row) = pg
            .query_one(
                "SELECT count(*) FROM inventory.skus WHERE available < 0 OR held < 0",
                &[],
            )
            .await
        {
            oversold = json!(row.get::<_, i64>(0));
        }
        if let Ok(row) = pg
            .query_one(
                "SELECT count(*) FROM inventory.reservations r WHERE r.state = 'reserved'
                   AND NOT EXISTS (SELECT 1 FROM orders.orders o WHERE o.id = r.id AND o.state NOT IN ('confirmed', 'cancelled', 'needs_attention'))",
                &[],
            )
            .await
        {
            orphans = json!(row.get::<_, i64>(0));
        }
    }
    let mut double_charges = Value::Null;
    if let Some(payment_url) = &args.payment_url
        && let Ok(sim) = JsonClient::new(ClientConfig::new(payment_url))
        && let Ok(ledger) = sim.call::<(), Value>(Method::GET, "/v1/ledger", None).await
    {
        double_charges = ledger["summary"]["double_charges"].clone();
    }
    let created = created_h.lock();
    let completed: u64 = by_state.values().sum();
    let saga_span_secs = match (first_created, last_ended) {
        (Some(first), Some(last)) => {
            ((last - first).num_microseconds().unwrap_or(0) as f64 / 1e6).max(load_secs.min(1.0))
        }
        _ => load_secs,
    };
    let create_p99 = ms(&created, 0.99);
    let summary = json!({
        "orders": ids.len(),
        "confirmed": by_state.get("confirmed").copied().unwrap_or(0),
        "cancelled": by_state.get("cancelled").copied().unwrap_or(0),
        "needs_attention": by_state.get("needs_attention").copied().unwrap_or(0),
        "unfinished": pending.len(),
        "statuses": statuses.lock().iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "create_p50_ms": ms(&created, 0.50),
        "create_p99_ms": create_p99,
        "saga_p50_ms": ms(&saga_h, 0.50),
        "saga_p99_ms": ms(&saga_h, 0.99),
        "cancel_reasons": reasons,
        "sagas_per_sec": completed as f64 / saga_span_secs,
        "saga_span_secs": saga_span_secs,
        "oversold": oversold,
        "orphans": orphans,
        "double_charges": double_charges,
        "floor_commit_p99_ms": floor,
        "create_to_floor": floor.map(|f| create_p99 / f),
        "floor_commit_under_load_p99_ms": loaded_floor,
        "create_to_loaded_floor": loaded_floor.map(|f| create_p99 / f),
        "provider_pair_p99_ms": provider_pair_p99,
        "saga_over_provider_pair_ms": provider_pair_p99.map(|p| ms(&saga_h, 0.99) - p),
        "three_commits_under_load_p99_ms": commit_chains.map(|(three, _)| three),
        "six_commits_under_load_p99_ms": commit_chains.map(|(_, six)| six),
        "create_to_three_commits": commit_chains.map(|(three, _)| create_p99 / three),
        "saga_floor_p99_ms": match (provider_pair_p99, commit_chains) {
            (Some(pair), Some((_, six))) => Some(pair + six),
            _ => None,
        },
        "saga_to_floor": match (provider_pair_p99, commit_chains) {
            (Some(pair), Some((_, six))) => Some(ms(&saga_h, 0.99) / (pair + six)),
            _ => None,
        },
        "seconds": load_secs,
        "concurrency": args.concurrency,
        "rate": (args.rate > 0.0).then_some(args.rate),
    });
    println!("{summary}");
}
