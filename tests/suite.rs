//! notify-hub's WebSocket server and the metrics service behind gateway-mw's
//! auth, RBAC and rate-limit layers, in one process (the wiring of
//! `examples/suite.rs`), driven over real sockets.

#[path = "../examples/support/suite.rs"]
mod suite;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use notify_hub::Hub;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &[u8] = b"suite-test-secret-0123456789abcdef!";

fn token(sub: &str, roles: &[&str]) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = serde_json::json!({"sub": sub, "roles": roles, "exp": exp});
    encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap()
}

struct Running {
    addr: std::net::SocketAddr,
    shutdown: http_kit::Shutdown,
    server: tokio::task::JoinHandle<http_kit::ServeReport>,
    hub: Hub,
}

async fn start() -> Running {
    let (app, hub) = suite::app(SECRET).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = http_kit::Shutdown::new();
    let server = tokio::spawn(http_kit::serve(
        listener,
        app,
        http_kit::ServeConfig::default(),
        shutdown.clone(),
    ));
    Running {
        addr,
        shutdown,
        server,
        hub,
    }
}

async fn call(
    running: &Running,
    method: Method,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: String,
) -> (StatusCode, serde_json::Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", running.addr));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = client
        .request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, value)
}

fn event() -> String {
    format!(
        r#"{{"timestamp":"{}","user_id":"alice","event_type":"click","value":2.5}}"#,
        chrono::Utc::now().to_rfc3339()
    )
}

#[tokio::test]
async fn the_metrics_service_answers_only_through_the_gateway_layers() {
    let running = start().await;
    let user = token("alice", &["user"]);
    let analyst = token("ana", &["analyst"]);

    // No credential: the gateway refuses it; the backend never sees it.
    let (status, body) = call(
        &running,
        Method::GET,
        "/v1/aggregates?minutes=5",
        None,
        None,
        String::new(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // A forged token.
    let forged = format!("{}x", &user[..user.len() - 1]);
    let (status, _) = call(
        &running,
        Method::POST,
        "/v1/events",
        Some(&forged),
        Some("application/json"),
        event(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, body) = call(
        &running,
        Method::POST,
        "/v1/events",
        Some(&user),
        Some("application/json"),
        event(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 1);
    // RBAC: a user may write events but not read aggregates.
    let (status, body) = call(
        &running,
        Method::GET,
        "/v1/aggregates?minutes=5",
        Some(&user),
        None,
        String::new(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = call(
        &running,
        Method::GET,
        "/v1/aggregates?minutes=5",
        Some(&analyst),
        None,
        String::new(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["click.count"].as_f64(), Some(1.0), "{body}");
    assert_eq!(body["click.sum"].as_f64(), Some(2.5), "{body}");
    // A route no rule names is denied by default, before any backend.
    let (status, body) = call(
        &running,
        Method::GET,
        "/metrics",
        Some(&analyst),
        None,
        String::new(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    running.shutdown.trigger();
    assert!(running.server.await.unwrap().drained);
}

#[tokio::test]
async fn a_websocket_behind_the_gateway_gets_what_the_http_api_sends() {
    let running = start().await;
    let alice = token("alice", &["user"]);
    let notifier = token("svc", &["notifier"]);

    // Without a credential the upgrade is refused by the gateway.
    let url = format!("ws://{}/v1/ws", running.addr);
    let refused = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap_err();
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    // A notifier may not open a socket (no notify:connect).
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {notifier}").parse().unwrap(),
    );
    match tokio_tungstenite::connect_async(request).await.unwrap_err() {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), StatusCode::FORBIDDEN)
        }
        other => panic!("expected a 403, got {other:?}"),
    }

    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {alice}").parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let welcome = socket.next().await.unwrap().unwrap();
    let welcome: serde_json::Value = serde_json::from_str(welcome.to_text().unwrap()).unwrap();
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user_id"], "alice");

    let send = serde_json::json!({
        "user_ids": ["alice"],
        "notification": {"type": "order", "title": "Shipped", "message": "Your order shipped"}
    });
    let (status, body) = call(
        &running,
        Method::POST,
        "/v1/notifications",
        Some(&notifier),
        Some("application/json"),
        send.to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let frame = socket.next().await.unwrap().unwrap();
    let frame: serde_json::Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
    assert_eq!(frame["type"], "notification");
    assert_eq!(frame["seq"], 1);
    assert_eq!(frame["notification"]["id"], body["id"]);

    // Shutdown: stop accepting, end the hub; the socket closes with 1001
    // and the drain completes.
    running.shutdown.trigger();
    assert!(
        running
            .hub
            .shutdown(std::time::Duration::from_secs(5))
            .await
    );
    let mut close_code = None;
    while let Some(Ok(message)) = socket.next().await {
        if let tokio_tungstenite::tungstenite::Message::Close(frame) = message {
            close_code = frame.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(close_code, Some(1001));
    drop(socket);
    assert!(running.server.await.unwrap().drained);
}

#[tokio::test]
async fn each_user_is_rate_limited_by_the_gateway() {
    let running = start().await;
    let user = token("bob", &["user"]);
    let mut limited_at = None;
    for i in 0..suite::USER_QUOTA_PER_MINUTE + 5 {
        let (status, body) = call(
            &running,
            Method::POST,
            "/v1/events",
            Some(&user),
            Some("application/json"),
            event(),
        )
        .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(body["error"], "rate_limited", "{body}");
            limited_at = Some(i);
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let limited_at = limited_at.expect("the user quota never applied");
    assert!(
        (1..=suite::USER_QUOTA_PER_MINUTE).contains(&limited_at),
        "limited at {limited_at}"
    );
    // Another user is unaffected.
    let other = token("carol", &["user"]);
    let (status, _) = call(
        &running,
        Method::POST,
        "/v1/events",
        Some(&other),
        Some("application/json"),
        event(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    running.shutdown.trigger();
    assert!(running.server.await.unwrap().drained);
}

/// The client IP comes from `http_kit::serve`'s `PeerAddr`: failed
/// authentications are limited per address (gateway default 20 a minute).
#[tokio::test]
async fn failed_authentication_is_limited_per_client_address() {
    let running = start().await;
    let forged = format!("{}x", &token("mallory", &["user"])[..40]);
    let mut limited = false;
    for _ in 0..30 {
        let (status, body) = call(
            &running,
            Method::GET,
            "/v1/aggregates?minutes=5",
            Some(&forged),
            None,
            String::new(),
        )
        .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(body["error"], "auth_failures_limited", "{body}");
            limited = true;
            break;
        }
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    assert!(
        limited,
        "30 forged tokens from one address were never limited"
    );
    running.shutdown.trigger();
    assert!(running.server.await.unwrap().drained);
}
