//! `GET /demo` and `GET /demo.js`: a small browser client of protocol
//! `notify.v1`, served when [`ServerConfig::demo_page`](super::ServerConfig)
//! is on.
//!
//! The page connects with the browser's own `WebSocket`, passing the token
//! as the `bearer.<jwt>` subprotocol entry, shows notifications as they are
//! delivered, acknowledges each, and keeps the last seq it showed in
//! `localStorage` so that a reload resumes after it (`?since=`). Both files
//! are compiled into the binary; the page loads nothing else, and its
//! Content-Security-Policy allows nothing else.

use http::{HeaderValue, Response, StatusCode, header};

use super::Body;

const PAGE: &str = include_str!("demo/index.html");
const SCRIPT: &str = include_str!("demo/demo.js");

/// Scripts from this origin only (no inline script), WebSockets to this
/// origin only, the page's one inline style block, and nothing framed.
const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
                   style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// The response for `path` (`demo` or `demo.js`), `None` for other paths.
pub(super) fn asset(path: &str) -> Option<Response<Body>> {
    let (body, content_type) = match path {
        "demo" => (PAGE, "text/html; charset=utf-8"),
        "demo.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        _ => return None,
    };
    let mut response = Response::new(http_kit::full(bytes::Bytes::from_static(body.as_bytes())));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(response)
}
