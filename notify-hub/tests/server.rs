//! The WebSocket adapter and HTTP API over real sockets.
#![cfg(all(feature = "server", feature = "jwt"))]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use notify_hub::server::{NotifyServer, ServerConfig};
use notify_hub::{Hub, HubConfig, Notification};
use time_kit::{Clock, ManualClock, SharedClock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "server-test-secret-0123456789abcdef";

fn token_with(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(sub: &str, groups: &[&str], roles: &[&str]) -> String {
    let exp = now_secs() + 600;
    token_with(
        SECRET,
        serde_json::json!({"sub": sub, "exp": exp, "groups": groups, "roles": roles}),
    )
}

async fn start() -> (SocketAddr, Hub) {
    start_with(HubConfig::default()).await
}

/// A verifier of HS256 tokens signed with `SECRET`.
fn verifier() -> JwtVerifier {
    let keys = KeySet::new()
        .with_key(VerifyingKey::hs256("k", SECRET.as_bytes()))
        .unwrap()
        .with_default_kid("k");
    JwtVerifier::new(keys, JwtConfig::default())
}

/// A server for `hub` that accepts HS256 tokens signed with `SECRET`.
fn server_for(hub: &Hub) -> NotifyServer {
    NotifyServer::new(hub.clone(), verifier(), ServerConfig::default())
}

async fn start_with(config: HubConfig) -> (SocketAddr, Hub) {
    let hub = Hub::in_memory(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server_for(&hub).serve(listener, std::future::pending()));
    (addr, hub)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr, query: &str) -> Result<Ws, u16> {
    match tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?{query}")).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("{e}"),
    }
}

async fn frame(ws: &mut Ws) -> serde_json::Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// The server notices a closed socket asynchronously: give it a second.
async fn assert_connections_drop_to_zero(hub: &Hub) {
    for _ in 0..50 {
        if hub.connection_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hub.connection_count(), 0);
}

/// One raw HTTP/1.1 request; returns (status, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let (status, _, body) = common::http(addr, method, path, token, body).await;
    (status, body)
}

#[tokio::test]
async fn bad_and_expired_tokens_get_401_and_no_upgrade() {
    let (addr, hub) = start().await;
    let past = now_secs() - 3600;
    let future = past + 7200;
    let cases = [
        String::new(),
        "access_token=not.a.jwt".to_owned(),
        format!(
            "access_token={}",
            token_with(
                "another-secret-0123456789abcdef012",
                serde_json::json!({"sub": "u", "exp": future})
            )
        ),
        format!(
            "access_token={}",
            token_with(SECRET, serde_json::json!({"sub": "u", "exp": past}))
        ),
        format!(
            "access_token={}",
            token_with(SECRET, serde_json::json!({"sub": "u"}))
        ),
        // alg "none": header {"alg":"none"}, payload, empty signature.
        "access_token=eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1IiwiZXhwIjo0MTAyNDQ0ODAwfQ.".to_owned(),
    ];
    for query in &cases {
        assert_eq!(connect(addr, query).await.err(), Some(401), "{query}");
    }
    assert_eq!(hub.connection_count(), 0);
}

#[tokio::test]
async fn deliveries_acks_resume_and_error_frames() {
    let (addr, hub) = start().await;
    let mut ws = connect(
        addr,
        &format!("access_token={}", token("alice", &["team"], &[])),
    )
    .await
    .unwrap();
    let welcome = frame(&mut ws).await;
    assert_eq!(
        welcome,
        serde_json::json!({"type": "welcome", "user_id": "alice", "last_seq": 0})
    );
    // The groups claim joined alice to "team".
    hub.broadcast_to_group("team", Notification::new("t", "one", "m"))
        .await
        .unwrap();
    hub.send_to_users(&["alice"], Notification::new("t", "two", "m"))
        .await
        .unwrap();
    let one = frame(&mut ws).await;
    assert_eq!(
        (one["type"].as_str(), one["seq"].as_u64()),
        (Some("notification"), Some(1))
    );
    assert_eq!(one["notification"]["title"], "one");
    assert_eq!(frame(&mut ws).await["seq"], 2);
    ws.send(Message::text(r#"{"type":"ack","seq":2}"#))
        .await
        .unwrap();
    ws.send(Message::text(r#"{"type":"ack","seq":9}"#))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["code"], "invalid_ack");
    ws.send(Message::text(r#"{"type":"resume","since":1}"#))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["seq"], 2);
    // Invalid frames get error frames, then a 1008 close.
    for _ in 0..3 {
        ws.send(Message::text("{not json")).await.unwrap();
        assert_eq!(frame(&mut ws).await["code"], "invalid_frame");
    }
    ws.send(Message::text("{not json")).await.unwrap();
    let close = loop {
        match ws.next().await {
            Some(Ok(Message::Close(c))) => break c,
            Some(Ok(_)) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.unwrap().code), 1008);
    // The hub forgets the connection.
    drop(ws);
    assert_connections_drop_to_zero(&hub).await;
}

#[tokio::test]
async fn since_on_connect_and_token_in_the_subprotocol() {
    let (addr, hub) = start().await;
    for i in 1..=3 {
        hub.send_to_users(&["bob"], Notification::new("t", format!("n{i}"), "m"))
            .await
            .unwrap();
    }
    let mut request = format!("ws://{addr}/v1/ws?since=1")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("notify.v1, bearer.{}", token("bob", &[], &[]))
            .parse()
            .unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "notify.v1");
    assert_eq!(frame(&mut ws).await["last_seq"], 3);
    assert_eq!(frame(&mut ws).await["seq"], 2);
    assert_eq!(frame(&mut ws).await["seq"], 3);
    // An abrupt disconnect (no close frame) is cleaned up too.
    drop(ws);
    assert_connections_drop_to_zero(&hub).await;
}

#[tokio::test]
async fn http_api_statuses() {
    let (addr, _hub) = start().await;
    let service = token("svc", &[], &["notify:send"]);
    let user = token("alice", &[], &[]);
    let send = r#"{"user_ids":["alice"],"notification":{"type":"t","title":"a","message":"b"}}"#;
    assert_eq!(
        http(addr, "POST", "/v1/notifications", None, send).await.0,
        401
    );
    assert_eq!(
        http(addr, "POST", "/v1/notifications", Some(&user), send)
            .await
            .0,
        403
    );
    let (status, body) = http(addr, "POST", "/v1/notifications", Some(&service), send).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["recipients"],
        1
    );
    let with_id = r#"{"user_ids":["alice"],"notification":{"id":"0190c1a2-7b3c-7d4e-8f00-0123456789ab","type":"t","title":"a","message":"b"}}"#;
    let post = |body: &'static str| http(addr, "POST", "/v1/notifications", Some(&service), body);
    assert_eq!(post(with_id).await.0, 201);
    let (status, body) = post(with_id).await;
    assert_eq!(status, 409, "a retried send with the same id: {body}");
    assert!(body.contains("duplicate_id"), "{body}");
    assert_eq!(
        http(addr, "POST", "/v1/notifications", Some(&service), "{bad")
            .await
            .0,
        400
    );
    assert_eq!(
        http(
            addr,
            "POST",
            "/v1/notifications",
            Some(&service),
            r#"{"user_ids":[],"notification":{"type":"t","title":"a","message":"b"}}"#
        )
        .await
        .0,
        400
    );
    let huge = format!(
        r#"{{"user_ids":["a"],"notification":{{"type":"t","title":"a","message":"{}"}}}}"#,
        "x".repeat(1024 * 1024 + 1)
    );
    assert_eq!(
        http(addr, "POST", "/v1/notifications", Some(&service), &huge)
            .await
            .0,
        413
    );
    assert_eq!(
        http(addr, "PUT", "/v1/groups/g1/members/bob", Some(&service), "")
            .await
            .0,
        200
    );
    let group_send = r#"{"notification":{"type":"t","title":"g","message":"b"}}"#;
    let (status, body) = http(
        addr,
        "POST",
        "/v1/groups/g1/notifications",
        Some(&service),
        group_send,
    )
    .await;
    assert_eq!(
        (
            status,
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["recipients"].as_u64()
        ),
        (201, Some(1))
    );
    let (status, body) = http(
        addr,
        "GET",
        "/v1/users/bob/notifications?limit=10",
        Some(&service),
        "",
    )
    .await;
    assert_eq!(status, 200);
    let history: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(history["notifications"][0]["seq"], 1);
    assert_eq!(history["notifications"][0]["notification"]["title"], "g");
    assert_eq!(
        http(
            addr,
            "GET",
            "/v1/users/bob/notifications?limit=1001",
            Some(&service),
            ""
        )
        .await
        .0,
        400
    );
    assert_eq!(
        http(
            addr,
            "DELETE",
            "/v1/groups/g1/members/bob",
            Some(&service),
            ""
        )
        .await
        .0,
        200
    );
    assert_eq!(
        http(addr, "GET", "/v1/nope", Some(&service), "").await.0,
        404
    );
    assert_eq!(http(addr, "GET", "/healthz", None, "").await.0, 200);
    assert_eq!(http(addr, "GET", "/readyz", None, "").await.0, 200);
    let (status, metrics) = http(addr, "GET", "/metrics", None, "").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("notify_sends_total 3"), "{metrics}");
}

/// The next frame that is not a Ping or Pong.
async fn next_message(ws: &mut Ws) -> Message {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message")
            .unwrap()
            .unwrap()
        {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_with_4001_when_the_hub_clock_passes_exp() {
    // The hub, its server and the verifier read one manual clock, so expiry
    // is driven by moving it, not by waiting for it.
    let clock = ManualClock::new(SystemTime::now());
    let shared: SharedClock = Arc::new(clock.clone());
    let hub = Hub::in_memory(HubConfig::default().with_clock(Arc::clone(&shared)))
        .await
        .unwrap();
    let mut config = ServerConfig::default().with_heartbeat(Duration::from_millis(20));
    // Pings are answered only while the client reads; missed pongs are not
    // what this test is about.
    config.max_missed_pongs = u32::MAX;
    let server = NotifyServer::new(hub.clone(), verifier().with_clock(shared), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, std::future::pending()));

    let exp = clock.unix_secs() + 60;
    let short = token_with(SECRET, serde_json::json!({"sub": "eve", "exp": exp}));
    let mut ws = connect(addr, &format!("access_token={short}"))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["type"], "welcome");

    // One second before `exp`: two heartbeats later (so at least one tick
    // read the moved clock) the connection still delivers.
    clock.advance(Duration::from_secs(59));
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut pings = 0;
        while pings < 2 {
            if let Message::Ping(_) = ws.next().await.unwrap().unwrap() {
                pings += 1;
            }
        }
    })
    .await
    .expect("heartbeats");
    hub.send_to_users(&["eve"], Notification::new("t", "still open", "m"))
        .await
        .unwrap();
    let delivered = next_message(&mut ws).await;
    assert!(delivered.to_text().unwrap().contains("still open"));

    // At `exp`: closed with 4001 within a heartbeat.
    clock.advance(Duration::from_secs(1));
    let Message::Close(Some(close)) = next_message(&mut ws).await else {
        panic!("expected a close frame");
    };
    assert_eq!(u16::from(close.code), 4001);
    assert_eq!(close.reason, "token expired: reconnect with a fresh token");
    drop(ws);
    assert_connections_drop_to_zero(&hub).await;
}

/// The heartbeat and the token's expiry share one timer per connection:
/// with heartbeats far apart, the expiry still fires on its own.
#[tokio::test]
async fn a_connection_ends_with_4001_at_exp_between_heartbeats() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let config = ServerConfig::default().with_heartbeat(Duration::from_secs(3600));
    let server = NotifyServer::new(hub.clone(), verifier(), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, std::future::pending()));

    let exp = now_secs() + 2;
    let short = token_with(SECRET, serde_json::json!({"sub": "ivy", "exp": exp}));
    let mut ws = connect(addr, &format!("access_token={short}"))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["type"], "welcome");
    let Message::Close(Some(close)) = next_message(&mut ws).await else {
        panic!("expected a close frame");
    };
    assert_eq!(u16::from(close.code), 4001);
    assert!(now_secs() >= exp, "not before exp");
    drop(ws);
    assert_connections_drop_to_zero(&hub).await;
}

/// A client that answers no pings is closed with 1008 once it has missed
/// `max_missed_pongs` of them, and not before.
#[tokio::test]
async fn a_client_that_answers_no_pings_is_closed_with_1008() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let mut config = ServerConfig::default().with_heartbeat(Duration::from_millis(20));
    config.max_missed_pongs = 3;
    let server = NotifyServer::new(hub.clone(), verifier(), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, std::future::pending()));

    // A raw client: it completes the upgrade, then only reads, so it never
    // answers a ping (a WebSocket library would, and would then fail
    // writing to the closed socket before showing the close frame).
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nauthorization: Bearer {}\r\n\r\n",
        token("quiet", &[], &[])
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
        .await
        .expect("the server closes the connection")
        .unwrap();
    let head_end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    assert!(received.starts_with(b"HTTP/1.1 101"));
    // Server frames are unmasked, and these are small: FIN + opcode, a
    // 7-bit length (or 126 and 16 bits), the payload.
    let (mut pings, mut close, mut frames) = (0, None, &received[head_end..]);
    while frames.len() >= 2 {
        let opcode = frames[0] & 0x0f;
        let (len, at) = match frames[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([frames[2], frames[3]])), 4),
            n => (usize::from(n), 2),
        };
        let payload = &frames[at..at + len];
        match opcode {
            0x1 => assert!(std::str::from_utf8(payload).unwrap().contains("welcome")),
            0x9 => pings += 1,
            0x8 => {
                close = Some((
                    u16::from_be_bytes([payload[0], payload[1]]),
                    payload[2..].to_vec(),
                ))
            }
            other => panic!("unexpected opcode {other}"),
        }
        frames = &frames[at + len..];
    }
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1008);
    assert_eq!(reason, b"missed pongs");
    assert_eq!(pings, 3, "three pings unanswered, then the close");
    drop(stream);
    assert_connections_drop_to_zero(&hub).await;
}

#[tokio::test]
async fn a_token_past_exp_but_inside_the_verifier_leeway_is_refused() {
    let (addr, hub) = start().await;
    // The verifier accepts it (30 s of leeway); a connection opened with it
    // would have to close with 4001 at once, so it is refused instead.
    let recent = token_with(
        SECRET,
        serde_json::json!({"sub": "late", "exp": now_secs() - 10}),
    );
    assert_eq!(
        connect(addr, &format!("access_token={recent}")).await.err(),
        Some(401)
    );
    let (status, body) = ws_upgrade_answer(addr, &recent).await;
    assert_eq!(status, 401);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "invalid_token");
    assert_eq!(body["message"], "invalid token: token expired");
    assert_eq!(hub.connection_count(), 0);
}

/// A raw upgrade request with `token`; returns (status, body).
async fn ws_upgrade_answer(addr: SocketAddr, token: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nauthorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    // The error answer is small and complete once its body has arrived.
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        response.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&response);
        if n == 0 || text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
            break;
        }
    }
    let response = String::from_utf8(response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn since_and_resume_above_the_latest_seq_both_count_as_the_latest() {
    let (addr, hub) = start().await;
    for i in 1..=3 {
        hub.send_to_users(&["sam"], Notification::new("t", format!("n{i}"), "m"))
            .await
            .unwrap();
    }
    let user = token("sam", &[], &[]);
    let mut ws = connect(addr, &format!("since=1000&access_token={user}"))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["last_seq"], 3);
    hub.send_to_users(&["sam"], Notification::new("t", "n4", "m"))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["seq"], 4, "connect: not skipped");
    ws.send(Message::text(r#"{"type":"resume","since":1000}"#))
        .await
        .unwrap();
    // Frames are handled in order: once this is answered, so is the resume.
    ws.send(Message::text(r#"{"type":"ack","seq":100000}"#))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["code"], "invalid_ack");
    hub.send_to_users(&["sam"], Notification::new("t", "n5", "m"))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["seq"], 5, "resume: not skipped either");
}

#[tokio::test]
async fn an_ack_before_any_delivery_is_checked_against_the_start_position() {
    let (addr, hub) = start().await;
    for i in 1..=3 {
        hub.send_to_users(&["ada"], Notification::new("t", format!("n{i}"), "m"))
            .await
            .unwrap();
    }
    let mut ws = connect(addr, &format!("access_token={}", token("ada", &[], &[])))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["last_seq"], 3);
    // Up to welcome.last_seq: accepted silently (no frame); above: refused.
    for ack in [0, 2, 3, 4] {
        ws.send(Message::text(format!(r#"{{"type":"ack","seq":{ack}}}"#)))
            .await
            .unwrap();
    }
    let refused = frame(&mut ws).await;
    assert_eq!(
        refused["code"], "invalid_ack",
        "the first frame answers ack 4"
    );
    ws.send(Message::text(r#"{"type":"ack","seq":3}"#))
        .await
        .unwrap();
    ws.send(Message::text("{not json")).await.unwrap();
    assert_eq!(
        frame(&mut ws).await["code"],
        "invalid_frame",
        "ack 3 again got no answer"
    );
}

#[tokio::test]
async fn ids_and_timestamps_come_back_in_canonical_form() {
    let (addr, _hub) = start().await;
    let service = token("svc", &[], &["notify:send"]);
    let mut ws = connect(addr, &format!("access_token={}", token("cy", &[], &[])))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["type"], "welcome");
    // Upper case, no hyphens; a +01:00 offset with half a second.
    let send = r#"{"user_ids":["cy"],"notification":{"id":"0190C1A27B3C7D4E8F000123456789AB","type":"t","title":"a","message":"b","timestamp":"2026-11-24T23:00:00.5+01:00"}}"#;
    let (status, body) = http(addr, "POST", "/v1/notifications", Some(&service), send).await;
    assert_eq!(status, 201, "{body}");
    let receipt: serde_json::Value = serde_json::from_str(&body).unwrap();
    let canonical = "0190c1a2-7b3c-7d4e-8f00-0123456789ab";
    assert_eq!(receipt["id"], canonical);
    assert_eq!(receipt["timestamp"], "2026-11-24T22:00:00.500Z");
    let delivered = frame(&mut ws).await;
    assert_eq!(delivered["notification"]["id"], canonical);
    assert_eq!(
        delivered["notification"]["timestamp"],
        "2026-11-24T22:00:00.500Z"
    );
    let (_, body) = http(
        addr,
        "GET",
        "/v1/users/cy/notifications",
        Some(&service),
        "",
    )
    .await;
    let history: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(history["notifications"][0]["notification"]["id"], canonical);
    // Any spelling of the same UUID is the same id.
    for spelling in [
        canonical.to_owned(),
        format!("urn:uuid:{canonical}"),
        format!("{{{}}}", canonical.to_uppercase()),
    ] {
        let again = format!(
            r#"{{"user_ids":["cy"],"notification":{{"id":"{spelling}","type":"t","title":"a","message":"b"}}}}"#
        );
        let (status, body) = http(addr, "POST", "/v1/notifications", Some(&service), &again).await;
        assert_eq!(status, 409, "{spelling}: {body}");
    }
}

#[tokio::test]
async fn a_bad_id_or_timestamp_is_invalid_field_naming_it() {
    let (addr, hub) = start().await;
    let service = token("svc", &[], &["notify:send"]);
    let cases = [
        (r#""id":"not-a-uuid""#, "notification.id"),
        (r#""id":42"#, "notification.id"),
        (r#""timestamp":"yesterday""#, "notification.timestamp"),
        (
            r#""timestamp":"2026-11-24T22:00:00""#,
            "notification.timestamp",
        ),
        (r#""timestamp":1700000000"#, "notification.timestamp"),
    ];
    for (field, name) in cases {
        for path in ["/v1/notifications", "/v1/groups/g/notifications"] {
            let body = format!(
                r#"{{{}"notification":{{"type":"t","title":"a","message":"b",{field}}}}}"#,
                if path == "/v1/notifications" {
                    r#""user_ids":["u"],"#
                } else {
                    ""
                }
            );
            let (status, answer) = http(addr, "POST", path, Some(&service), &body).await;
            assert_eq!(status, 400, "{body}");
            let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(answer["error"], "invalid_field", "{body}");
            assert!(
                answer["message"].as_str().unwrap().contains(name),
                "{answer}"
            );
        }
    }
    // `null` is the same as leaving it out; other shape errors stay invalid_json.
    let null = r#"{"user_ids":["u"],"notification":{"id":null,"timestamp":null,"type":"t","title":"a","message":"b"}}"#;
    assert_eq!(
        http(addr, "POST", "/v1/notifications", Some(&service), null)
            .await
            .0,
        201
    );
    let (status, answer) = http(
        addr,
        "POST",
        "/v1/notifications",
        Some(&service),
        r#"{"user_ids":["u"],"notification":{"title":"a","message":"b"}}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(answer.contains("invalid_json"), "{answer}");
    assert_eq!(hub.stats().sends(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_4000_then_recovers() {
    let (addr, hub) = start_with(HubConfig::default().with_queue_capacity(4)).await;
    let mut ws = connect(addr, &format!("access_token={}", token("slow", &[], &[])))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["type"], "welcome");
    // 30 MB of notifications while the client reads nothing: the socket
    // buffers fill, the server's writes stall, the 4-deep queue overflows.
    let body = "x".repeat(15_000);
    for i in 1..=2_000 {
        hub.send_to_users(
            &["slow"],
            Notification::new("t", format!("n{i}"), body.clone()),
        )
        .await
        .unwrap();
    }
    // Now read: what was written arrives in order, then the 4000 close.
    let mut last = 0u64;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frames")
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => {
                let f: serde_json::Value = serde_json::from_str(&t).unwrap();
                let seq = f["seq"].as_u64().unwrap();
                assert_eq!(seq, last + 1, "in order, no gap before the close");
                last = seq;
            }
            Message::Close(c) => break u16::from(c.unwrap().code),
            _ => {}
        }
    };
    assert_eq!(code, 4000);
    assert!(last < 2_000, "it fell behind ({last})");
    assert!(hub.stats().overflowed() >= 1);
    drop(ws);
    // Recovery: reconnect with since = the last seq received. Sends are
    // acknowledged once queued for the dispatcher, so the tail of the burst
    // may still be on its way live when the client reconnects and overflow
    // the new 4-deep queue too: that is another 4000, and the client does
    // what PROTOCOL.md says, reconnects with since, making progress each time.
    let mut attempts = 0;
    while last < 2_000 {
        attempts += 1;
        assert!(attempts <= 10, "no progress after {attempts} reconnects");
        let mut ws = connect(
            addr,
            &format!("since={last}&access_token={}", token("slow", &[], &[])),
        )
        .await
        .unwrap();
        assert_eq!(frame(&mut ws).await["last_seq"], 2_000);
        while last < 2_000 {
            match next_message(&mut ws).await {
                Message::Text(t) => {
                    let f: serde_json::Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(f["seq"].as_u64(), Some(last + 1));
                    last += 1;
                }
                Message::Close(c) => {
                    assert_eq!(u16::from(c.unwrap().code), 4000);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_queued_notifications_then_closes_with_1001() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let server = server_for(&hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    let mut ws = connect(addr, &format!("access_token={}", token("dana", &[], &[])))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["type"], "welcome");
    // Sends in flight when the signal comes: every acknowledged one is
    // delivered before the close.
    let sends: Vec<_> = (1..=100)
        .map(|i| {
            let hub = hub.clone();
            tokio::spawn(async move {
                hub.send_to_users(&["dana"], Notification::new("t", format!("n{i}"), "m"))
                    .await
            })
        })
        .collect();
    tokio::task::yield_now().await;
    let _ = stop.send(());
    let mut acknowledged = 0;
    for s in sends {
        if s.await.unwrap().is_ok() {
            acknowledged += 1;
        }
    }
    let mut received = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frames")
            .unwrap()
            .unwrap()
        {
            Message::Text(_) => received += 1,
            Message::Close(c) => break u16::from(c.unwrap().code),
            _ => {}
        }
    };
    assert_eq!(code, 1001);
    assert_eq!(
        received, acknowledged,
        "every acknowledged send was flushed"
    );
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("serve returns")
        .unwrap();
    // New connections are refused once it has stopped.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_client_close_is_answered_and_bad_since_is_refused() {
    let (addr, hub) = start().await;
    let user = token("frank", &[], &[]);
    assert_eq!(
        connect(addr, &format!("since=%zz&access_token={user}"))
            .await
            .err(),
        Some(400)
    );
    assert_eq!(
        connect(addr, &format!("since=-1&access_token={user}"))
            .await
            .err(),
        Some(400)
    );
    // A token whose `exp` is absurdly far away works (and does not overflow).
    let far = token_with(
        SECRET,
        serde_json::json!({"sub": "frank", "exp": i64::MAX / 2}),
    );
    let mut ws = connect(addr, &format!("access_token={far}")).await.unwrap();
    assert_eq!(frame(&mut ws).await["type"], "welcome");
    ws.close(None).await.unwrap();
    // The server answers the close: the stream ends with its Close frame.
    let reply = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None => break true,
                Some(Ok(_)) => continue,
                Some(Err(_)) => break false,
            }
        }
    })
    .await
    .unwrap();
    assert!(reply, "a clean close, not a reset");
    assert_connections_drop_to_zero(&hub).await;
}

/// Every pre-upgrade error has the JSON error body, 426 included, and a
/// service mounted without upgrades refuses before joining or subscribing.
#[tokio::test]
async fn a_wrong_websocket_version_gets_426_with_the_error_body() {
    let (addr, _hub) = start().await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, close\r\nupgrade: websocket\r\nsec-websocket-version: 8\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nauthorization: Bearer {}\r\n\r\n",
        token("alice", &[], &[])
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    assert!(response.starts_with("HTTP/1.1 426"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{response}"
    );
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"], "unsupported_websocket_version");
}

#[tokio::test]
async fn an_upgrade_without_hypers_upgrade_handle_is_refused_before_subscribing() {
    use tower::ServiceExt;
    let (_addr, hub) = start().await;
    let request = http::Request::builder()
        .uri("/v1/ws")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header(
            "authorization",
            format!("Bearer {}", token("alice", &["team"], &[])),
        )
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = server_for(&hub).oneshot(request).await.unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(hub.connection_count(), 0);
}

/// Connects with the `notify.v2` subprotocol (and `query`, e.g. a
/// position); the token goes in the subprotocol list.
async fn connect_v2(addr: SocketAddr, user: &str, groups: &[&str], query: &str) -> Ws {
    let mut request = format!("ws://{addr}/v1/ws?{query}")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("notify.v2, notify.v1, bearer.{}", token(user, groups, &[]))
            .parse()
            .unwrap(),
    );
    let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "notify.v2");
    ws
}

/// notify.v2: the welcome's position, an inbox and a group stream each
/// numbered on its own, joins and leaves as frames, acks checked against
/// what was delivered, a resume from a position, and a connect with one.
#[tokio::test]
async fn notify_v2_streams_frames_acks_and_resume() {
    let (addr, hub) = start().await;
    hub.broadcast_to_group("team", Notification::new("t", "before", "m"))
        .await
        .unwrap();
    // The token's `groups` claim joins `team` at connect: after offset 1.
    let mut ws = connect_v2(addr, "vic", &["team"], "").await;
    let welcome = frame(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["protocol"], "notify.v2");
    assert_eq!(
        welcome["position"],
        serde_json::json!({"inbox": 0, "groups": {"team": 1}})
    );

    hub.broadcast_to_group("team", Notification::new("t", "b2", "m"))
        .await
        .unwrap();
    let group = frame(&mut ws).await;
    assert_eq!(
        (
            &group["type"],
            &group["stream"],
            &group["group"],
            &group["offset"]
        ),
        (
            &"notification".into(),
            &"group".into(),
            &"team".into(),
            &2.into()
        )
    );
    assert_eq!(group["notification"]["title"], "b2");
    hub.send_to_users(&["vic"], Notification::new("t", "d1", "m"))
        .await
        .unwrap();
    let inbox = frame(&mut ws).await;
    // Seq 1 was the broadcast's v1 copy: the inbox skips it.
    assert_eq!(
        (&inbox["stream"], &inbox["seq"]),
        (&"inbox".into(), &2.into())
    );
    assert_eq!(inbox["notification"]["title"], "d1");

    hub.join_group("ops", "vic").await.unwrap();
    let joined = frame(&mut ws).await;
    assert_eq!(
        joined,
        serde_json::json!({"type": "joined", "group": "ops", "joined_after": 0})
    );
    hub.leave_group("team", "vic").await.unwrap();
    let left = frame(&mut ws).await;
    assert_eq!(
        left,
        serde_json::json!({"type": "left", "group": "team", "left_after": 3})
    );

    // Acks: within what was delivered, fine; beyond it, refused.
    let ack = |p: serde_json::Value| {
        Message::text(serde_json::json!({"type": "ack", "position": p}).to_string())
    };
    ws.send(ack(serde_json::json!({"inbox": 2}))).await.unwrap();
    ws.send(ack(serde_json::json!({"inbox": 9}))).await.unwrap();
    let refused = frame(&mut ws).await;
    assert_eq!(
        (&refused["type"], &refused["code"]),
        (&"error".into(), &"invalid_ack".into())
    );
    ws.send(ack(serde_json::json!({"groups": {"nope": 1}})))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["code"], "invalid_ack");
    // A v1 frame is not a v2 frame.
    ws.send(Message::text(r#"{"type":"ack","seq":1}"#))
        .await
        .unwrap();
    assert_eq!(frame(&mut ws).await["code"], "invalid_frame");

    // Resume from an earlier position: the group is replayed up to the
    // leave, the inbox after seq 0, and `ops`, which the position does not
    // name, is announced and read from the join on (nothing in it yet).
    ws.send(Message::text(
        r#"{"type":"resume","position":{"inbox":0,"groups":{"team":1}}}"#,
    ))
    .await
    .unwrap();
    let mut replayed = Vec::new();
    for _ in 0..4 {
        let f = frame(&mut ws).await;
        replayed.push(format!(
            "{}:{}",
            f["type"].as_str().unwrap(),
            f["notification"]["title"]
                .as_str()
                .or(f["group"].as_str())
                .unwrap()
        ));
    }
    replayed.sort();
    assert_eq!(
        replayed,
        [
            "joined:ops",
            "left:team",
            "notification:b2",
            "notification:d1"
        ]
    );
    drop(ws);

    // Connecting with a position: the same replay, from the start.
    let position = r#"{"inbox":2,"groups":{"ops":0}}"#;
    hub.broadcast_to_group("ops", Notification::new("t", "o1", "m"))
        .await
        .unwrap();
    let query = format!("position={}", urlencode(position));
    let mut ws = connect_v2(addr, "vic", &[], &query).await;
    let welcome = frame(&mut ws).await;
    assert_eq!(
        welcome["position"],
        serde_json::json!({"inbox": 2, "groups": {"ops": 0}})
    );
    let o1 = frame(&mut ws).await;
    assert_eq!((&o1["group"], &o1["offset"]), (&"ops".into(), &1.into()));
    drop(ws);
    assert_connections_drop_to_zero(&hub).await;

    // The history across the streams: the group's sends while a member,
    // the direct send; newest first.
    let service = token("svc", &[], &["notify:send"]);
    let (status, body) = http(
        addr,
        "GET",
        "/v1/users/vic/streams?limit=10",
        Some(&service),
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let listed: Vec<String> = body["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            format!(
                "{}:{}",
                n["group"].as_str().unwrap_or("inbox"),
                n["notification"]["title"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(listed, ["ops:o1", "inbox:d1", "team:b2"]);
    assert_eq!(body["notifications"][0]["offset"], 1);
    assert_eq!(body["notifications"][1]["seq"], 2);
}

#[tokio::test]
async fn a_position_belongs_to_v2_and_since_to_v1() {
    let (addr, _hub) = start().await;
    let user = token("wes", &[], &[]);
    let upgrade = |query: &str, protocols: &str| {
        format!(
            "GET /v1/ws?{query} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-protocol: {protocols}\r\nauthorization: Bearer {user}\r\n\r\n"
        )
    };
    for (query, protocols, code) in [
        ("since=1", "notify.v2", "invalid_since"),
        ("position=%7B%7D", "notify.v1", "invalid_position"),
        (
            "position=%7B%22inbox%22%3A-1%7D",
            "notify.v2",
            "invalid_position",
        ),
        (
            "position=%7B%22bad%22%3A1%7D",
            "notify.v2",
            "invalid_position",
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(upgrade(query, protocols).as_bytes())
            .await
            .unwrap();
        let mut response = vec![0u8; 4096];
        let n = stream.read(&mut response).await.unwrap();
        let response = String::from_utf8_lossy(&response[..n]).to_string();
        assert!(response.starts_with("HTTP/1.1 400"), "{query}: {response}");
        assert!(response.contains(code), "{query}: {response}");
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Write-through (ADR 0027) against a client that stops reading: the
/// broadcasts written through fill the socket, some only partly (their
/// tails sent by the connection's task), the rest queue behind them; once
/// the client reads again every frame arrives whole, in offset order, once.
/// Then the same with write-through off, for the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_socket_keeps_frames_written_through_whole_and_in_order() {
    for write_through in [true, false] {
        let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServerConfig::default().with_write_through(write_through);
        tokio::spawn(
            NotifyServer::new(hub.clone(), verifier(), config)
                .serve(listener, std::future::pending()),
        );
        // A small receive buffer, so that the server's socket fills soon.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let mut request = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            format!("notify.v2, bearer.{}", token("fay", &["big"], &[]))
                .parse()
                .unwrap(),
        );
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
        let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .unwrap();
        assert_eq!(frame(&mut ws).await["type"], "welcome");

        // 150 broadcasts of ~60 KB: about 9 MB, past what loopback buffers.
        let filler = "x".repeat(60_000);
        let total = 150u64;
        for i in 1..=total {
            let note = Notification::new("t", format!("n{i}"), "m").with_data("fill", &*filler);
            hub.broadcast_to_group("big", note).await.unwrap();
        }
        for i in 1..=total {
            let f = frame(&mut ws).await;
            assert_eq!(
                (&f["stream"], &f["group"], &f["offset"]),
                (&"group".into(), &"big".into(), &i.into()),
                "write_through: {write_through}"
            );
            assert_eq!(f["notification"]["title"], format!("n{i}"));
            assert_eq!(
                f["notification"]["data"]["fill"].as_str().map(str::len),
                Some(60_000)
            );
        }
        assert_eq!(hub.stats().overflowed(), 0);
        assert_eq!(hub.stats().delivered(), total);
        // The first broadcasts at least went straight to the socket.
        let written = hub.stats().written_through();
        assert_eq!(written > 0, write_through, "written through: {written}");

        // What was written through counts as delivered for acks: no
        // `invalid_ack`; the invalid frame after it is the first answer.
        let ack =
            serde_json::json!({"type": "ack", "position": {"inbox": 0, "groups": {"big": total}}});
        ws.send(Message::text(ack.to_string())).await.unwrap();
        ws.send(Message::text(r#"{"type":"nope"}"#)).await.unwrap();
        let answer = frame(&mut ws).await;
        assert_eq!(
            (&answer["type"], &answer["code"]),
            (&"error".into(), &"invalid_frame".into())
        );
        // The answer to that frame, not to the ack.
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("nope")),
            "{answer}"
        );
    }
}
