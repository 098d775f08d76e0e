//! Rewrites a request's path into the normal form the router and the
//! upstream agree on (see [`crate::router::normalize_path`]).

use http::Request;
use http::uri::{PathAndQuery, Uri};

use crate::router::{PathError, PathOptions, normalize_path};

/// Replaces the request's path with its normal form, keeping the query;
/// refuses a path that has none. Idempotent, and a no-op (no allocation)
/// when the path is already normal.
pub(crate) fn normalize_request_path<B>(
    request: &mut Request<B>,
    options: PathOptions,
) -> Result<(), PathError> {
    let normal = match normalize_path(request.uri().path(), options)? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(normal) => normal,
    };
    let target = match request.uri().query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    // The normal form only holds characters the original URI held (or
    // unreserved ones), so it always parses; refusing is the safe fallback.
    let path_and_query = PathAndQuery::try_from(target).map_err(|_| PathError::MalformedEscape)?;
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    *request.uri_mut() = Uri::from_parts(parts).map_err(|_| PathError::MalformedEscape)?;
    Ok(())
}
