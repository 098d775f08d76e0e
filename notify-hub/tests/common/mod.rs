//! Helpers shared by the test binaries; each uses some of them.
#![allow(dead_code)]

#[cfg(feature = "redis")]
use std::sync::Arc;

#[cfg(feature = "redis")]
use notify_hub::broker::RedisBroker;
#[cfg(feature = "redis")]
use notify_hub::{Hub, HubConfig, MemoryStore};
#[cfg(feature = "redis")]
use testkit::TestRedis;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One raw HTTP/1.1 request (`connection: close`, JSON content type, the
/// token as a bearer); returns the status, the head in lowercase and the
/// body.
pub(crate) async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response[9..12].parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[cfg(feature = "redis")]
/// Two hubs on one shared store (as two nodes share one PostgreSQL), each
/// with its own Redis broker connection.
pub(crate) async fn two_hubs(redis: &TestRedis) -> (Hub, Hub) {
    let store = Arc::new(MemoryStore::new());
    let mut hubs = Vec::new();
    for _ in 0..2 {
        let broker = RedisBroker::connect(redis.url(), redis.prefix())
            .await
            .unwrap();
        hubs.push(
            Hub::start(HubConfig::default(), Arc::clone(&store), broker)
                .await
                .unwrap(),
        );
    }
    let b = hubs.pop().unwrap();
    (hubs.pop().unwrap(), b)
}

/// A broker that holds every message a hub publishes (sends and membership
/// changes) until the test releases it, in any order, or never; and hands
/// the hub whatever the test sends its sink.
#[derive(Default)]
pub(crate) struct ChaosBroker {
    pub(crate) sink: parking_lot::Mutex<Option<tokio::sync::mpsc::Sender<notify_hub::BrokerEvent>>>,
    pub(crate) held: parking_lot::Mutex<Vec<notify_hub::BrokerEvent>>,
}

impl ChaosBroker {
    /// The newest held send, if the newest held message is one.
    pub(crate) fn pop_published(&self) -> Option<std::sync::Arc<notify_hub::Published>> {
        match self.held.lock().pop()? {
            notify_hub::BrokerEvent::Published(message) => Some(message),
            _ => None,
        }
    }
}

impl notify_hub::Broker for ChaosBroker {
    fn publish(
        &self,
        message: std::sync::Arc<notify_hub::Published>,
    ) -> notify_hub::store::BoxFuture<'_, Result<(), notify_hub::BrokerError>> {
        self.held
            .lock()
            .push(notify_hub::BrokerEvent::Published(message));
        Box::pin(async { Ok(()) })
    }
    fn publish_change(
        &self,
        change: std::sync::Arc<notify_hub::MembershipChange>,
    ) -> notify_hub::store::BoxFuture<'_, Result<(), notify_hub::BrokerError>> {
        self.held
            .lock()
            .push(notify_hub::BrokerEvent::Changed(change));
        Box::pin(async { Ok(()) })
    }
    fn subscribe(
        &self,
        sink: tokio::sync::mpsc::Sender<notify_hub::BrokerEvent>,
    ) -> notify_hub::store::BoxFuture<'_, Result<(), notify_hub::BrokerError>> {
        *self.sink.lock() = Some(sink);
        Box::pin(async { Ok(()) })
    }
    fn ping(&self) -> notify_hub::store::BoxFuture<'_, Result<(), notify_hub::BrokerError>> {
        Box::pin(async { Ok(()) })
    }
}
