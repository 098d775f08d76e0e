//! # testkit: real PostgreSQL and Redis for every test, isolated
//!
//! Tests in this workspace run against real servers, never mocks (see
//! `docs/adr/0002-testing-against-real-services.md`). This dev-only crate gives
//! each test its own slice of those servers, in the spirit of `#[sqlx::test]`:
//!
//! * [`TestDatabase`]: a fresh PostgreSQL database created on the server named
//!   by `DATABASE_URL` and dropped (with `FORCE`) when the value is dropped.
//! * [`TestRedis`]: a private key prefix on the Redis server named by
//!   `REDIS_URL`; every key under it is deleted when the value is dropped.
//!
//! ## When a server is missing
//!
//! `scripts/test` provisions both servers and sets `REQUIRE_SERVICES=1`. Under
//! that variable a test that cannot reach its server **fails**. Without it (a
//! newcomer running plain `cargo test` with nothing running) the constructor
//! prints one line saying why and returns `None`, and the test returns early:
//!
//! ```no_run
//! # async fn demo() {
//! let Some(db) = testkit::TestDatabase::create().await else { return };
//! let client = db.connect().await;
//! client.batch_execute("CREATE TABLE t (id int)").await.unwrap();
//! # }
//! ```
#![forbid(unsafe_code)]
// This crate is test support: failing loudly (panicking) is how a test harness
// reports a broken environment, and the skip line must reach the test output.
#![allow(clippy::print_stderr)]

mod postgres;
mod redis;
mod redis_server;

pub use postgres::{DATABASE_URL_ENV, TestDatabase};
pub use redis::{REDIS_URL_ENV, TestRedis};
pub use redis_server::RedisServer;

use std::sync::atomic::{AtomicU64, Ordering};

/// Environment variable that turns a missing service from a skip into a failure.
pub const REQUIRE_SERVICES_ENV: &str = "REQUIRE_SERVICES";

/// Whether tests must fail (instead of skipping) when a service is unreachable.
pub fn services_required() -> bool {
    std::env::var(REQUIRE_SERVICES_ENV)
        .map(|v| !v.is_empty() && v != "0")
        .unwrap_or(false)
}

/// Reports an unavailable service: panics under `REQUIRE_SERVICES`, otherwise
/// prints one skip line and returns `None` so the caller can return early.
fn unavailable<T>(service: &str, why: &str) -> Option<T> {
    skip_or_fail(services_required(), service, why)
}

fn skip_or_fail<T>(required: bool, service: &str, why: &str) -> Option<T> {
    if required {
        panic!("{service} is required (REQUIRE_SERVICES=1) but unavailable: {why}");
    }
    // Written to the real stderr, not through `eprintln!`, so the test
    // harness's output capture does not swallow the reason a test was skipped.
    let line =
        format!("skipping: {service} unavailable ({why}); run scripts/test to provision it\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    None
}

/// A name unique to this process and call, safe as a database name or key
/// prefix: `{kind}_{pid}_{counter}_{random}`.
pub fn unique_name(kind: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{kind}_{}_{n}_{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

/// Runs an async cleanup to completion from a `Drop` impl, which may itself be
/// running inside (or outside) a tokio runtime: a fresh thread with its own
/// current-thread runtime works in both cases.
fn run_cleanup<F>(cleanup: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handle = std::thread::spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(cleanup),
            Err(e) => eprintln!("testkit: cannot build cleanup runtime: {e}"),
        }
    });
    let _ = handle.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_service_is_skipped_when_not_required() {
        assert_eq!(
            skip_or_fail::<u8>(false, "PostgreSQL", "unit test of the skip path"),
            None
        );
    }

    #[test]
    #[should_panic(
        expected = "PostgreSQL is required (REQUIRE_SERVICES=1) but unavailable: not set"
    )]
    fn missing_service_fails_when_required() {
        let _ = skip_or_fail::<u8>(true, "PostgreSQL", "not set");
    }

    #[test]
    fn unique_names_differ() {
        let a = unique_name("x");
        let b = unique_name("x");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("x_{}_", std::process::id())));
    }
}
