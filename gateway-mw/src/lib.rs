//! # gateway_mw: API gateway middleware
//!
//! The decisions an API gateway makes on every request (authenticate,
//! authorize, rate-limit, audit), as transport-agnostic building blocks.
//!
//! | module | what it decides |
//! | --- | --- |
//! | [`jwt`] | whether a bearer token is authentic and current: keys pinned to algorithms and selected by `kid`, strict `exp`/`nbf`/`iss`/`aud` |
//! | [`router`] | method + path-template routing (a segment trie), shared by authorization and validation |
//! | [`rbac`] | whether a subject's roles grant the permission a route requires, deny by default |
//! | [`ratelimit`] | whether a key (user, API key, client IP) is within its quota: keyed GCRA, exact under concurrency, bounded memory |
//! | [`token`] | access tokens and rotating refresh tokens: families, reuse detection, grace, lifetimes; in-memory and Redis stores |
//! | [`client_ip`] | the client's address behind trusted proxies (rightmost-untrusted `X-Forwarded-For`), IPv6 keyed by /64 |
//! | [`audit`] | a tamper-evident, hash-chained record of every security decision |
//!
//! ## Features
//!
//! * `redis`: `ratelimit::RedisLimiter` and `token::RedisStore` (fred).
//! * `http`: the tower layers and `Gateway` in the `http` module.
//! * `proxy`: `config` and `server`, the configurable reverse proxy that the
//!   `gateway` example runs.
//!
//! Errors: [`Error`] with [`Error::kind`]; it wraps each module's own error
//! (`config::ConfigError`, [`audit::AuditError`], [`token::TokenError`],
//! each with `kind()`) and keeps the underlying cause as its `source()`.
//!
//! Security controls and what each stops: `docs/gateway-mw/SECURITY.md`;
//! configuration: `docs/gateway-mw/CONFIG.md`.
#![forbid(unsafe_code)]

pub mod audit;
pub mod client_ip;
mod error;
pub use error::{Error, ErrorKind};
#[cfg(feature = "proxy")]
pub mod config;
#[cfg(feature = "http")]
pub mod http;
/// JWT verification, re-exported from `ferrokeel-jwt` (the suite's one JWT implementation).
pub use jwt_kit as jwt;
pub mod ratelimit;
pub mod rbac;
pub mod router;
#[cfg(feature = "proxy")]
pub mod server;
pub mod token;
