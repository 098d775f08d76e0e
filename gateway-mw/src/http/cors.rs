//! CORS: an exact-origin allow-list, validated at start, enforced by
//! tower-http's `CorsLayer` on the requests that are CORS requests.
//!
//! A request without `Origin` is not a CORS request, so [`CorsService`]
//! passes it straight to the service inside and only marks the response
//! `Vary: Origin` (a shared cache must not serve it to a cross-origin
//! request). With no origin allowed at all, CORS is off: nothing is added.
//! Both keep CORS headers off the responses that cannot use them, which is
//! most of a gateway's traffic (server-to-server calls).
//!
//! Origins are compared as whole strings (`scheme://host[:port]`, no path),
//! so suffix and prefix tricks (`https://app.example.com.evil.test`,
//! `https://evil-app.example.com`) and the `null` origin (sandboxed frames,
//! `file:` pages) never match. A disallowed origin gets no
//! `Access-Control-Allow-Origin`, so the browser refuses the response to
//! its script. Configurations that would let any site make credentialed requests
//! are refused by [`CorsConfig::layer`] instead of being built.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::header::{ORIGIN, VARY};
use http::{HeaderName, HeaderValue, Method, Request, Response};
use tower_http::cors::{AllowOrigin, Cors};

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
        let enabled = !self.allowed_origins.is_empty();
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
        let inner = tower_http::cors::CorsLayer::new()
            .allow_origin(origin)
            .allow_methods(self.allowed_methods.clone())
            .allow_headers(headers(&self.allowed_headers)?)
            .expose_headers(headers(&self.exposed_headers)?)
            .allow_credentials(self.allow_credentials)
            .max_age(self.max_age);
        Ok(CorsLayer { inner, enabled })
    }
}

/// The CORS layer built by [`CorsConfig::layer`]: tower-http's
/// `CorsLayer` for requests that carry `Origin`, `Vary: Origin` alone for
/// those that do not, and nothing when no origin is allowed.
#[derive(Debug, Clone)]
pub struct CorsLayer {
    inner: tower_http::cors::CorsLayer,
    enabled: bool,
}

impl<S> tower::Layer<S> for CorsLayer {
    type Service = CorsService<S>;

    fn layer(&self, service: S) -> Self::Service {
        CorsService {
            inner: self.inner.layer(service),
            enabled: self.enabled,
        }
    }
}

/// The service of [`CorsLayer`].
#[derive(Debug, Clone)]
pub struct CorsService<S> {
    inner: Cors<S>,
    enabled: bool,
}

impl<S, B, ResBody> tower::Service<Request<B>> for CorsService<S>
where
    S: tower::Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = CorsFuture<S::Future, <Cors<S> as tower::Service<Request<B>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // `Cors` is ready exactly when the service inside is.
        self.inner.get_mut().poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !self.enabled {
            return CorsFuture::Plain {
                future: self.inner.get_mut().call(request),
                vary: false,
            };
        }
        if !request.headers().contains_key(ORIGIN) {
            return CorsFuture::Plain {
                future: self.inner.get_mut().call(request),
                vary: true,
            };
        }
        CorsFuture::Cors {
            future: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`CorsService`]: the inner service's future
    /// (`Plain`, with whether to add `Vary: Origin`) or tower-http's (`Cors`).
    #[project = CorsFutureProj]
    #[derive(Debug)]
    #[allow(missing_docs)] // pin-project-lite cannot carry docs on variant fields
    pub enum CorsFuture<Plain, WithCors> {
        /// Not a CORS request.
        Plain { #[pin] future: Plain, vary: bool },
        /// A CORS request, handled by tower-http.
        Cors { #[pin] future: WithCors },
    }
}

impl<Plain, WithCors, ResBody, E> Future for CorsFuture<Plain, WithCors>
where
    Plain: Future<Output = Result<Response<ResBody>, E>>,
    WithCors: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CorsFutureProj::Cors { future } => future.poll(cx),
            CorsFutureProj::Plain { future, vary } => {
                let mut response = ready!(future.poll(cx))?;
                if *vary {
                    response
                        .headers_mut()
                        .append(VARY, HeaderValue::from_static("origin"));
                }
                Poll::Ready(Ok(response))
            }
        }
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
