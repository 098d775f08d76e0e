//! # redis_kit: the one Redis setup of the ferrokeel suite
//!
//! gateway-mw's distributed rate limiter and refresh-token store,
//! notify-hub's pub/sub broker and order-saga's outbox all connect to Redis
//! the same way, through [`RedisSetup`]:
//!
//! - the URL is parsed once, and a bad one is a [`RedisError::BadUrl`];
//! - each connection attempt is bounded ([`RedisSetup::connect_timeout`],
//!   default 2 s) and so is the first connect as a whole
//!   ([`RedisSetup::init_timeout`], default 5 s), so a server that is down
//!   makes start-up fail with [`RedisError::Unavailable`] instead of hanging;
//! - after start-up, a lost connection is retried with exponential back-off
//!   (100 ms doubling to 2 s, forever), and every command meanwhile fails
//!   fast with fred's error, which each crate maps to its own "unavailable";
//! - key prefixes are checked by [`check_prefix`], so two deployments (or
//!   two tests) on one Redis cannot collide by accident.
//!
//! ```no_run
//! # async fn run() -> Result<(), redis_kit::RedisError> {
//! use redis_kit::RedisSetup;
//! let client = RedisSetup::new("redis://127.0.0.1:6379").connect().await?;
//! # let _ = client;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::prelude::{Builder, ClientLike, Config};
use fred::types::config::ReconnectPolicy;

pub use fred;

/// Why Redis could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisError {
    /// The URL does not parse.
    #[error("bad Redis URL")]
    BadUrl(#[source] fred::error::Error),
    /// The client could not be built from the configuration.
    #[error("invalid Redis configuration")]
    Config(#[source] fred::error::Error),
    /// The server did not answer the first connect.
    #[error("Redis is unavailable")]
    Unavailable(#[source] fred::error::Error),
    /// The first connect did not finish in time.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// A key prefix is not allowed.
    #[error("invalid Redis key prefix {prefix:?}: {why}")]
    BadPrefix {
        /// The prefix.
        prefix: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// What kind of failure a [`RedisError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisErrorKind {
    /// Configuration is wrong: fix it, retrying will not help.
    Config,
    /// The server is down or slow: retrying later may help.
    Unavailable,
}

impl RedisError {
    /// The kind of failure.
    pub fn kind(&self) -> RedisErrorKind {
        match self {
            RedisError::BadUrl(_) | RedisError::Config(_) | RedisError::BadPrefix { .. } => {
                RedisErrorKind::Config
            }
            RedisError::Unavailable(_) | RedisError::Timeout(_) => RedisErrorKind::Unavailable,
        }
    }
}

/// How the suite connects to Redis.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisSetup {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://`).
    pub url: String,
    /// Bound on each TCP connect + handshake. Default 2 s.
    pub connect_timeout: Duration,
    /// Bound on the first connect as a whole. Default 5 s.
    pub init_timeout: Duration,
    /// Capacity of fred's pub/sub broadcast channel (messages a slow
    /// subscriber may fall behind before it lags). Default 8,192.
    pub pubsub_capacity: usize,
}

impl RedisSetup {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> RedisSetup {
        RedisSetup {
            url: url.into(),
            connect_timeout: Duration::from_secs(2),
            init_timeout: Duration::from_secs(5),
            pubsub_capacity: 8192,
        }
    }

    /// Sets [`RedisSetup::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`RedisSetup::init_timeout`].
    pub fn with_init_timeout(mut self, timeout: Duration) -> Self {
        self.init_timeout = timeout;
        self
    }

    fn builder(&self) -> Result<Builder, RedisError> {
        let config = Config::from_url(&self.url).map_err(RedisError::BadUrl)?;
        let mut builder = Builder::from_config(config);
        let connect_timeout = self.connect_timeout;
        let capacity = self.pubsub_capacity;
        builder
            .with_performance_config(|p| p.broadcast_channel_capacity = capacity)
            .with_connection_config(|c| c.connection_timeout = connect_timeout)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        Ok(builder)
    }

    async fn init<C: ClientLike>(&self, client: C) -> Result<C, RedisError> {
        match tokio::time::timeout(self.init_timeout, client.init()).await {
            Ok(Ok(_)) => Ok(client),
            Ok(Err(e)) => {
                // Stop the reconnect loop the failed init started.
                let _ = client.quit().await;
                Err(RedisError::Unavailable(e))
            }
            Err(_) => {
                let _ = client.quit().await;
                Err(RedisError::Timeout(self.init_timeout))
            }
        }
    }

    /// A connected client for commands and scripts.
    pub async fn connect(&self) -> Result<Client, RedisError> {
        let client = self.builder()?.build().map_err(RedisError::Config)?;
        self.init(client).await
    }

    /// A connected client for pub/sub that re-subscribes after reconnects.
    pub async fn connect_subscriber(&self) -> Result<SubscriberClient, RedisError> {
        let client = self
            .builder()?
            .build_subscriber_client()
            .map_err(RedisError::Config)?;
        let client = self.init(client).await?;
        let _task = client.manage_subscriptions();
        Ok(client)
    }
}

/// Checks a key prefix: at most 64 bytes of `[A-Za-z0-9:_.-]`, ending in
/// `:` when not empty (so `app` and `app2` cannot see each other's keys).
pub fn check_prefix(prefix: &str) -> Result<(), RedisError> {
    let bad = |why| {
        Err(RedisError::BadPrefix {
            prefix: prefix.to_owned(),
            why,
        })
    };
    if prefix.is_empty() {
        return Ok(());
    }
    if prefix.len() > 64 {
        return bad("longer than 64 bytes");
    }
    if !prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b":_.-".contains(&b))
    {
        return bad("only ASCII letters, digits and : _ . - are allowed");
    }
    if !prefix.ends_with(':') {
        return bad("must end with ':'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("").is_ok());
        assert!(check_prefix("gw:prod:").is_ok());
        assert!(check_prefix("gw").is_err());
        assert!(check_prefix("gw prod:").is_err());
        assert!(check_prefix(&format!("{}:", "a".repeat(64))).is_err());
        assert_eq!(
            check_prefix("x").unwrap_err().kind(),
            RedisErrorKind::Config
        );
    }

    #[tokio::test]
    async fn a_bad_url_is_a_config_error() {
        let err = RedisSetup::new("not a url at all")
            .connect()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RedisErrorKind::Config, "{err:?}");
    }

    #[tokio::test]
    async fn a_server_that_is_down_fails_start_up_in_bounded_time() {
        // A loopback port with nothing listening: refused at once, and the
        // reconnect loop must not keep the call waiting.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let setup = RedisSetup::new(format!("redis://127.0.0.1:{port}"))
            .with_init_timeout(Duration::from_secs(3));
        let err = setup.connect().await.unwrap_err();
        assert_eq!(err.kind(), RedisErrorKind::Unavailable, "{err:?}");
    }

    #[tokio::test]
    async fn connects_to_a_real_server() {
        let Some(redis) = testkit::TestRedis::create().await else {
            return;
        };
        let client = RedisSetup::new(redis.url()).connect().await.unwrap();
        let pong: String = client.ping(None).await.unwrap();
        assert_eq!(pong, "PONG");
        let subscriber = RedisSetup::new(redis.url())
            .connect_subscriber()
            .await
            .unwrap();
        assert!(subscriber.is_connected());
    }
}
