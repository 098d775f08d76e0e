//! CORS: an exact-origin allow-list, validated at start, enforced by
//! tower-http's `CorsLayer`.
//!
//! Origins are compared as whole strings (`scheme://host[:port]`, no path),
//! so suffix and prefix tricks (`https://app.example.com.evil.test`,
//! `https://evil-app.example.com`) and the `null` origin (sandboxed frames,
//! `file:` pages) never match. A disallowed origin gets no CORS headers at
//! all. Configurations that would let any site make credentialed requests
//! are refused by [`CorsConfig::layer`] instead of being built.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Why a CORS configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CorsConfigError {
    /// `*` with credentials would let any site read credentialed responses.
    #[error("allowing any origin (*) together with credentials is refused")]
    WildcardWithCredentials,
    /// `null` is sent by sandboxed and `file:` documents; allowing it allows them all.
    #[error("the origin \"null\" cannot be allowed")]
    NullOrigin,
    /// An origin is not `scheme://host[:port]`.
    #[error("invalid origin {0:?}: expected scheme://host[:port] with no path")]
    InvalidOrigin(String),
    /// A header name is invalid.
    #[error("invalid header name {0:?}")]
    InvalidHeader(String),
}

/// CORS settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CorsConfig {
    /// Exact origins allowed, e.g. `https://app.example.com`; `*` allows any
    /// origin (only without credentials). Default: none (CORS disabled).
    pub allowed_origins: Vec<String>,
    /// Methods a preflight may allow. Default GET, POST, PUT, PATCH, DELETE.
    pub allowed_methods: Vec<Method>,
    /// Request headers a preflight may allow. Default authorization,
    /// content-type, x-request-id, x-api-key.
    pub allowed_headers: Vec<String>,
    /// Response headers exposed to scripts. Default the rate-limit headers
    /// and x-request-id.
    pub exposed_headers: Vec<String>,
    /// Whether cookies and auth headers may be sent. Default false.
    pub allow_credentials: bool,
    /// How long browsers may cache a preflight. Default 10 minutes.
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: Vec::new(),
            allowed_methods: vec![
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ],
            allowed_headers: ["authorization", "content-type", "x-request-id", "x-api-key"]
                .map(String::from)
                .to_vec(),
            exposed_headers: [
                "ratelimit",
                "ratelimit-policy",
                "retry-after",
                "x-request-id",
            ]
            .map(String::from)
            .to_vec(),
            allow_credentials: false,
            max_age: Duration::from_secs(600),
        }
    }
}

impl CorsConfig {
    /// Allows `origin` (call again for more).
    pub fn allow_origin(mut self, origin: impl Into<String>) -> Self {
        self.allowed_origins.push(origin.into());
        self
    }

    /// Sets [`CorsConfig::allow_credentials`].
    pub fn with_credentials(mut self, allow: bool) -> Self {
        self.allow_credentials = allow;
        self
    }

    /// Validates the configuration and builds the layer.
    pub fn layer(&self) -> Result<CorsLayer, CorsConfigError> {
        let wildcard = self.allowed_origins.iter().any(|o| o == "*");
        if wildcard && self.allow_credentials {
            return Err(CorsConfigError::WildcardWithCredentials);
        }
        let origin = if wildcard {
            AllowOrigin::any()
        } else {
            let mut list = Vec::with_capacity(self.allowed_origins.len());
            for o in &self.allowed_origins {
                list.push(validate_origin(o)?);
            }
            AllowOrigin::list(list)
        };
        let headers = |names: &[String]| {
            names
                .iter()
                .map(|h| {
                    HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| CorsConfigError::InvalidHeader(h.clone()))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(CorsLayer::new()
            .allow_origin(origin)
            .allow_methods(self.allowed_methods.clone())
            .allow_headers(headers(&self.allowed_headers)?)
            .expose_headers(headers(&self.exposed_headers)?)
            .allow_credentials(self.allow_credentials)
            .max_age(self.max_age))
    }
}

fn validate_origin(origin: &str) -> Result<HeaderValue, CorsConfigError> {
    if origin.eq_ignore_ascii_case("null") {
        return Err(CorsConfigError::NullOrigin);
    }
    let invalid = || CorsConfigError::InvalidOrigin(origin.to_owned());
    let (scheme, rest) = origin.split_once("://").ok_or_else(invalid)?;
    if !matches!(scheme, "http" | "https")
        || rest.is_empty()
        || rest.contains(['/', '?', '#', '*', '@', ' '])
    {
        return Err(invalid());
    }
    if origin.bytes().any(|b| b.is_ascii_uppercase()) {
        // Browsers serialize origins in lowercase; an uppercase entry would never match.
        return Err(invalid());
    }
    HeaderValue::from_str(origin).map_err(|_| invalid())
}
