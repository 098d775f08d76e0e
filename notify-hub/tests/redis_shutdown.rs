//! Shutdown with the Redis broker: every acknowledged send reaches the
//! WebSocket before its 1001 close, even when Redis's copy of the last sends
//! has not come back to this node yet.
//!
//! With plain Redis that race is timing-dependent (it lost the last one or
//! two sends in about 1 of 5 SIGTERMs). Here the copies Redis brings back are
//! held and never handed to the hub, so the round trip is "not back yet" at
//! every shutdown: deterministically the worst case.
#![cfg(all(feature = "redis", feature = "server", feature = "jwt"))]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use jsonwebtoken::{EncodingKey, Header};
use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use notify_hub::broker::RedisBroker;
use notify_hub::server::{NotifyServer, ServerConfig};
use notify_hub::store::BoxFuture;
use notify_hub::{
    Broker, BrokerError, BrokerEvent, Hub, HubConfig, MemoryStore, Notification, Published,
};
use parking_lot::Mutex;
use testkit::TestRedis;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "redis-shutdown-secret-0123456789abcdef";

/// The real Redis broker, except that what Redis brings back to this node
/// is kept here instead of being handed to the hub.
struct LateEchoBroker {
    redis: RedisBroker,
    held: Arc<Mutex<Vec<BrokerEvent>>>,
}

impl Broker for LateEchoBroker {
    fn publish(&self, message: Arc<Published>) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.redis.publish(message)
    }

    fn subscribe(
        &self,
        _sink: mpsc::Sender<BrokerEvent>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let (tx, mut rx) = mpsc::channel(4096);
            self.redis.subscribe(tx).await?;
            let held = Arc::clone(&self.held);
            tokio::spawn(async move {
                while let Some(event) = rx.recv().await {
                    held.lock().push(event);
                }
            });
            Ok(())
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.redis.ping()
    }
}

fn token(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &Header::default(),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn server_for(hub: &Hub) -> NotifyServer {
    let keys = KeySet::new()
        .with_key(VerifyingKey::hs256("k", SECRET.as_bytes()))
        .unwrap()
        .with_default_kid("k");
    NotifyServer::new(
        hub.clone(),
        JwtVerifier::new(keys, JwtConfig::default()),
        ServerConfig::default(),
    )
}

async fn connect(
    addr: SocketAddr,
    user: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("ws://{addr}/v1/ws?access_token={}", token(user));
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_send_reaches_the_socket_before_1001_with_redis() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let held = Arc::new(Mutex::new(Vec::new()));
    let broker = LateEchoBroker {
        redis: RedisBroker::connect(redis.url(), redis.prefix())
            .await
            .unwrap(),
        held: Arc::clone(&held),
    };
    let hub = Hub::start(HubConfig::default(), MemoryStore::new(), broker)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server_for(&hub).serve(listener, async move {
        let _ = stopped.await;
    }));
    let mut ws = connect(addr, "dana").await;
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(
        welcome.to_text().unwrap().contains("welcome"),
        "{welcome:?}"
    );

    // Acknowledged before the signal: each was published to Redis.
    let mut acknowledged = 0;
    for i in 1..=5 {
        hub.send_to_users(&["dana"], Notification::new("t", format!("before{i}"), "m"))
            .await
            .unwrap();
        acknowledged += 1;
    }
    // And sends in flight when it comes: some are acknowledged, the rest
    // refused with ShutDown.
    let sends: Vec<_> = (1..=100)
        .map(|i| {
            let hub = hub.clone();
            tokio::spawn(async move {
                hub.send_to_users(&["dana"], Notification::new("t", format!("during{i}"), "m"))
                    .await
            })
        })
        .collect();
    tokio::task::yield_now().await;
    let _ = stop.send(());
    for s in sends {
        if s.await.unwrap().is_ok() {
            acknowledged += 1;
        }
    }

    let mut seqs = Vec::new();
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frames before the close")
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => {
                let frame: serde_json::Value = serde_json::from_str(&t).unwrap();
                seqs.push(frame["seq"].as_u64().unwrap());
            }
            Message::Close(c) => break u16::from(c.unwrap().code),
            _ => {}
        }
    };
    assert_eq!(code, 1001);
    assert_eq!(
        seqs,
        (1..=acknowledged).collect::<Vec<u64>>(),
        "every acknowledged send, in order, before the close"
    );
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("serve returns")
        .unwrap();
}
