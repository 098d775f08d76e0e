//! Forwarding a request that passed every layer to its upstream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Full;

use super::State;
use crate::http::{BoxError, GatewayBody, Principal};

static X_GATEWAY_SUBJECT: HeaderName = HeaderName::from_static("x-gateway-subject");
static X_GATEWAY_ROLES: HeaderName = HeaderName::from_static("x-gateway-roles");

/// A configured upstream.
#[derive(Debug, Clone)]
pub(super) struct Upstream {
    pub(super) base: String,
    /// `base`'s scheme and authority when it has no path of its own, so a
    /// request's URI is put together from parts instead of formatted and
    /// parsed again on every request.
    origin: Option<(Scheme, Authority)>,
    pub(super) timeout: Duration,
    pub(super) http2: bool,
}

impl Upstream {
    /// The upstream at `url` (a trailing `/` is ignored).
    pub(super) fn new(url: &str, timeout: Duration, http2: bool) -> Upstream {
        let base = url.trim_end_matches('/').to_owned();
        let origin = base.parse::<Uri>().ok().and_then(|uri| {
            let parts = uri.into_parts();
            let bare = parts.path_and_query.as_ref().is_none_or(|p| p == "/");
            Some((parts.scheme?, parts.authority?)).filter(|_| bare)
        });
        Upstream {
            base,
            origin,
            timeout,
            http2,
        }
    }

    /// Where `path_and_query` of a request goes on this upstream.
    fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Option<Uri> {
        match &self.origin {
            Some((scheme, authority)) => {
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(scheme.clone());
                parts.authority = Some(authority.clone());
                parts.path_and_query = Some(
                    path_and_query
                        .cloned()
                        .unwrap_or(PathAndQuery::from_static("/")),
                );
                Uri::from_parts(parts).ok()
            }
            None => {
                let path_and_query = path_and_query.map_or("/", |p| p.as_str());
                format!("{}{path_and_query}", self.base).parse().ok()
            }
        }
    }
}

pub(super) async fn proxy(
    state: Arc<State>,
    upstream: &Upstream,
    request: Request<Full<Bytes>>,
) -> Result<Response<GatewayBody>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let Some(uri) = upstream.uri(parts.uri.path_and_query()) else {
        return Ok(crate::http::error_response(
            StatusCode::BAD_GATEWAY,
            "bad_upstream",
            "invalid upstream URL",
        ));
    };
    parts.uri = uri;
    // Hop-by-hop, credentials, overrides, forwarding claims, request id.
    crate::http::prepare_forward(&mut parts);
    if let Some(principal) = parts.extensions.get::<Principal>() {
        if let Ok(v) = HeaderValue::from_str(&principal.id) {
            parts.headers.insert(X_GATEWAY_SUBJECT.clone(), v);
        }
        if let Ok(v) = HeaderValue::from_str(&principal.roles.join(",")) {
            parts.headers.insert(X_GATEWAY_ROLES.clone(), v);
        }
    }
    let mut outgoing = Request::from_parts(parts, body);
    if upstream.http2 {
        // Hop-by-hop headers are already stripped (STRIPPED).
        *outgoing.version_mut() = http::Version::HTTP_2;
    }
    let exchange = async {
        if upstream.http2 {
            return state
                .client_h2
                .request(outgoing)
                .await
                .map(|response| response.map(http_kit::boxed))
                .map_err(BoxError::from);
        }
        // Configuration allows only `http://` upstreams, so every URI here
        // has an authority.
        let Some(authority) = outgoing.uri().authority().cloned() else {
            return Err("the upstream URI has no authority".into());
        };
        state
            .pool
            .send(&authority, outgoing)
            .await
            .map(|response| response.map(http_kit::boxed))
            .map_err(BoxError::from)
    };
    match tokio::time::timeout(upstream.timeout, exchange).await {
        Ok(Ok(mut response)) => {
            crate::http::strip_response_hop_by_hop(response.headers_mut());
            Ok(response)
        }
        Ok(Err(e)) => {
            // The error and its causes ("connecting failed: connection refused").
            let mut cause = std::error::Error::source(&*e);
            let mut error = e.to_string();
            while let Some(inner) = cause {
                error.push_str(": ");
                error.push_str(&inner.to_string());
                cause = inner.source();
            }
            tracing::warn!(%error, upstream = %upstream.base, "upstream request failed");
            Ok(crate::http::error_response(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "the upstream service is unavailable",
            ))
        }
        Err(_) => Ok(crate::http::error_response(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "the upstream service timed out",
        )),
    }
}
