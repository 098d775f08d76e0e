//! The bearer credential of a request.

use http::HeaderMap;
use http::header::AUTHORIZATION;

/// The token of `Authorization: Bearer <token>`, or `None` when the header
/// is missing, not UTF-8, another scheme, or has an empty token.
///
/// The scheme is matched case-insensitively, as RFC 9110 §11.1 requires
/// (`bearer`, `Bearer` and `BEARER` are the same scheme), and any run of
/// spaces between scheme and token is accepted.
///
/// ```
/// use http::HeaderMap;
/// let mut headers = HeaderMap::new();
/// headers.insert("authorization", "BEARER abc.def.ghi".parse().unwrap());
/// assert_eq!(http_kit::bearer_token(&headers), Some("abc.def.ghi"));
/// ```
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// True when the request carries an `Authorization` header of any scheme.
pub fn has_authorization(headers: &HeaderMap) -> bool {
    headers.contains_key(AUTHORIZATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            assert_eq!(
                bearer_token(&with(&format!("{scheme} t.o.k"))),
                Some("t.o.k"),
                "{scheme}"
            );
        }
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_none() {
        assert_eq!(bearer_token(&with("Basic dXNlcjpwdw==")), None);
        assert_eq!(bearer_token(&with("Bearer")), None);
        assert_eq!(bearer_token(&with("Bearer    ")), None);
        assert_eq!(bearer_token(&with("Bearertoken")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
        assert_eq!(bearer_token(&with("Bearer   spaced ")), Some("spaced"));
    }
}
