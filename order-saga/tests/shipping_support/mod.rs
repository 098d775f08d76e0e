//! Shared by the shipping integration tests: requests, a manual clock, and
//! (with the features) tokens, a served `ShippingService` and PostgreSQL
//! stores.
#![allow(dead_code)]

use std::time::{Duration, SystemTime};

use order_saga::model::{Address, LineItem, OrderId, Sku};
use order_saga::shipping::{ScheduleShipment, ShippingConfig};
use time_kit::ManualClock;

/// The test's start: 2027-01-15T08:00:00.123456Z, with microseconds so
/// a store that dropped them would be caught.
pub(crate) fn clock() -> ManualClock {
    ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_micros(1_800_000_000_123_456))
}

/// Delivers to GB and FR only.
pub(crate) fn config() -> ShippingConfig {
    ShippingConfig::default().with_deliverable_countries(["GB", "FR"])
}

/// The `n`th order id of a test: the same for the same `n`, a valid
/// UUIDv7 (version 7, RFC 9562 variant).
pub(crate) fn order(n: u64) -> OrderId {
    OrderId::from_uuid(uuid::Uuid::from_u64_pair(
        0x018b_cfe5_6801_7000,
        0x8000_0000_0000_0000 | n,
    ))
}

/// A valid request for `order_id` to `country`.
pub(crate) fn request(order_id: OrderId, country: &str) -> ScheduleShipment {
    ScheduleShipment {
        order_id,
        ship_to: Address {
            name: "Ada Lovelace".into(),
            line1: "12 Analytical Row".into(),
            line2: Some("Flat 3".into()),
            city: "London".into(),
            postal_code: "N1 9GU".into(),
            country: country.into(),
        },
        items: vec![
            LineItem {
                sku: Sku::parse("SKU-1").unwrap(),
                quantity: 2,
            },
            LineItem {
                sku: Sku::parse("SKU-2").unwrap(),
                quantity: 1,
            },
        ],
    }
}

#[cfg(feature = "http")]
pub(crate) mod http {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
    use order_saga::http::ClientConfig;
    use order_saga::http::shipping::{HttpShipping, ShippingService, ShippingServiceConfig};
    use order_saga::shipping::Shipping;

    pub(crate) const SECRET: &[u8] = b"shipping-tests-secret-of-32-bytes-or-more";

    pub(crate) fn verifier() -> JwtVerifier {
        let keys = KeySet::new()
            .with_key(VerifyingKey::hs256("k1", SECRET))
            .unwrap()
            .with_default_kid("k1");
        JwtVerifier::new(keys, JwtConfig::default())
    }

    /// An HS256 token for `sub` with `roles`, signed with `secret`, valid
    /// for 10 minutes.
    pub(crate) fn token_signed(secret: &[u8], roles: &[&str]) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        encode(
            &header,
            &serde_json::json!({"sub": "order-service", "exp": now + 600, "roles": roles}),
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    /// A token with the `service` role.
    pub(crate) fn service_token() -> String {
        token_signed(SECRET, &["service"])
    }

    pub(crate) fn service(shipping: Arc<dyn Shipping>) -> ShippingService {
        ShippingService::new(shipping, verifier(), ShippingServiceConfig::default())
    }

    /// `service` served on a free loopback port until dropped.
    pub(crate) struct Served {
        pub(crate) addr: SocketAddr,
        shutdown: http_kit::Shutdown,
        task: tokio::task::JoinHandle<http_kit::ServeReport>,
    }

    impl Served {
        pub(crate) async fn start(service: ShippingService) -> Served {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let shutdown = http_kit::Shutdown::new();
            let task = tokio::spawn(http_kit::serve(
                listener,
                service,
                http_kit::ServeConfig::default(),
                shutdown.clone(),
            ));
            Served {
                addr,
                shutdown,
                task,
            }
        }

        pub(crate) fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        /// A client of this server with `token`.
        pub(crate) fn client_with(&self, token: &str) -> HttpShipping {
            HttpShipping::connect(ClientConfig::new(self.url()).with_bearer_token(token)).unwrap()
        }

        /// A client of this server with a service token.
        pub(crate) fn client(&self) -> HttpShipping {
            self.client_with(&service_token())
        }

        /// Stops the server and checks it drained.
        pub(crate) async fn stop(self) {
            self.shutdown.trigger();
            let report = self.task.await.unwrap();
            assert_eq!(report.left_open, 0, "{report:?}");
        }
    }
}

#[cfg(feature = "postgres")]
pub(crate) mod pg {
    use std::time::Duration;

    use order_saga::pg::{PgPool, PoolConfig, pool};
    use order_saga::shipping::{PgShipping, ShippingConfig};
    use time_kit::SharedClock;

    /// A pool on `url` that waits long enough for a connection that 200
    /// tasks sharing 16 connections on a busy machine do not time out.
    pub(crate) fn patient_pool(url: &str) -> PgPool {
        pool(
            url,
            &PoolConfig {
                max_size: 16,
                connection_timeout: Duration::from_secs(20),
                connect_timeout: Duration::from_secs(5),
                ..PoolConfig::default()
            },
        )
        .unwrap()
    }

    /// A migrated store on the test database `db`.
    pub(crate) async fn store(
        db: &testkit::TestDatabase,
        config: ShippingConfig,
        clock: SharedClock,
    ) -> PgShipping {
        let shipping = PgShipping::new(patient_pool(db.url()), config, clock);
        assert_eq!(shipping.migrate().await.unwrap(), 1);
        shipping
    }

    /// A store whose pool points at a loopback port nobody listens on.
    pub(crate) fn down(clock: SharedClock) -> PgShipping {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let pool = pool(
            &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            &PoolConfig {
                max_size: 2,
                connection_timeout: Duration::from_millis(300),
                connect_timeout: Duration::from_millis(300),
                ..PoolConfig::default()
            },
        )
        .unwrap();
        PgShipping::new(pool, super::config(), clock)
    }
}
