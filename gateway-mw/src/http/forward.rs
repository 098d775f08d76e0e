//! What an upstream may see of a request: the header rules a reverse proxy
//! applies before forwarding.
//!
//! [`sanitize_forward_headers`] is the pure core (headers, the TCP peer, and
//! whether the peer is a trusted proxy); [`prepare_forward`] applies it to a
//! request's parts using the extensions [`ClientIpLayer`](super::ClientIpLayer)
//! and [`RequestIdLayer`](super::RequestIdLayer) inserted. In order:
//!
//! 1. **Hop-by-hop headers** (RFC 9110 §7.6.1): every header named in
//!    `Connection`, then `Connection`, `Proxy-Connection`, `Keep-Alive`,
//!    `Proxy-Authenticate`, `Proxy-Authorization`, `TE`, `Trailer`,
//!    `Transfer-Encoding` and `Upgrade`. A client could otherwise use
//!    `Connection: X-Gateway-Subject` style tricks, or smuggle framing.
//! 2. **Credentials**: `Authorization` and `X-Api-Key`. The gateway verified
//!    them; the upstream gets the result (`X-Gateway-Subject`,
//!    `X-Gateway-Roles`, set by the proxy afterwards), never the secret.
//!    Client-sent `X-Gateway-Subject`/`X-Gateway-Roles` are removed too.
//! 3. **Method and URL overrides**: `X-HTTP-Method-Override`,
//!    `X-HTTP-Method`, `X-Method-Override`, `X-Original-URL`,
//!    `X-Rewrite-URL`. RBAC decided on the request line; a framework that
//!    honours these would run a different method or path than the one
//!    authorized.
//! 4. **Forwarding headers**. From a trusted proxy, its `X-Forwarded-For`
//!    and `Forwarded` are kept and the peer's address is appended (RFC 7239
//!    §4); its other forwarding headers pass. From anyone else, nothing the
//!    client claimed survives: `X-Forwarded-For` becomes the peer's address
//!    alone, `Forwarded` becomes `for=<peer>`, `X-Real-IP` becomes the
//!    peer's address, and `X-Forwarded-Host`, `-Proto`, `-Port`, `-Prefix`,
//!    `-Server`, `-Ssl`, `X-Client-IP`, `True-Client-IP`,
//!    `CF-Connecting-IP`, `Fastly-Client-IP` and `X-Cluster-Client-IP` are
//!    removed.
//! 5. **`X-Request-Id`**: set to the [`RequestId`] the gateway chose (see
//!    [`super::RequestIdLayer`]), so the upstream, the response and the
//!    audit log carry the same id.
//!
//! ```
//! use std::net::IpAddr;
//! use gateway_mw::http::sanitize_forward_headers;
//!
//! let mut headers = http::HeaderMap::new();
//! headers.insert("connection", "close, x-secret".parse().unwrap());
//! headers.insert("x-secret", "1".parse().unwrap());
//! headers.insert("x-http-method-override", "DELETE".parse().unwrap());
//! headers.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
//! let peer: IpAddr = "203.0.113.9".parse().unwrap();
//! sanitize_forward_headers(&mut headers, peer, false);
//! assert!(!headers.contains_key("x-secret"));
//! assert!(!headers.contains_key("x-http-method-override"));
//! assert_eq!(headers["x-forwarded-for"], "203.0.113.9");
//! ```

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{CONNECTION, HeaderName, HeaderValue};

use super::{PeerAddr, RequestId, X_REQUEST_ID};

/// The standard hop-by-hop headers (RFC 9110 §7.6.1, plus the non-standard
/// but widely sent `Proxy-Connection` and `Keep-Alive`).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers that ask a framework to run another method or URL than the
/// request line's.
pub const OVERRIDES: [&str; 5] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// The caller's credentials, and the identity headers only the gateway sets.
const CREDENTIALS: [&str; 4] = [
    "authorization",
    "x-api-key",
    "x-gateway-subject",
    "x-gateway-roles",
];

/// Forwarding claims removed when the peer is not a trusted proxy
/// (`X-Forwarded-For`, `Forwarded` and `X-Real-IP` are replaced instead).
const UNTRUSTED_CLAIMS: [&str; 11] = [
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// What the rules do with a header a client sent, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Forwarded as sent.
    Pass,
    /// Never forwarded: hop-by-hop, credentials, overrides.
    Remove,
    /// Removed unless the peer is a trusted proxy.
    UntrustedClaim,
    /// `X-Forwarded-For`, `Forwarded`, `X-Real-IP`: rewritten.
    Rewritten,
}

/// The rule for `name` (lowercase, as `HeaderName` stores it). One match on
/// the names a request carries, rather than a hash lookup for each of the
/// 30-odd names the rules cover: most requests carry none of them.
fn rule(name: &str) -> Rule {
    if HOP_BY_HOP.contains(&name) || CREDENTIALS.contains(&name) || OVERRIDES.contains(&name) {
        Rule::Remove
    } else if UNTRUSTED_CLAIMS.contains(&name) {
        Rule::UntrustedClaim
    } else if name == "x-forwarded-for" || name == "forwarded" || name == "x-real-ip" {
        Rule::Rewritten
    } else {
        Rule::Pass
    }
}

/// `ip` as an RFC 7239 node: IPv6 in brackets and quotes.
fn forwarded_node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut node = String::with_capacity(19);
            node.push_str("for=");
            crate::client_ip::push_ipv4(&mut node, v4);
            node
        }
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// `ip` as text. IPv4, what nearly every request carries, is written
/// without the formatting machinery (twice per request otherwise).
fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            crate::client_ip::push_ipv4(&mut text, v4);
            text
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}

/// Every value of `name`, comma-joined in order (several header lines form
/// one list).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

fn set(headers: &mut HeaderMap, name: &HeaderName, value: String) {
    match HeaderValue::from_str(&value) {
        Ok(v) => {
            headers.insert(name.clone(), v);
        }
        // Only reachable with an unprintable list from a trusted proxy:
        // dropping it is safer than forwarding half of it.
        Err(_) => {
            headers.remove(name);
        }
    }
}

/// Applies steps 1–4 of the module docs to `headers`, for a request that
/// arrived from `peer`; `peer_is_trusted` says whether `peer` is one of the
/// configured trusted proxies.
pub fn sanitize_forward_headers(headers: &mut HeaderMap, peer: IpAddr, peer_is_trusted: bool) {
    remove_by_rule(headers, |rule| {
        rule == Rule::Remove || (rule == Rule::UntrustedClaim && !peer_is_trusted)
    });
    if peer_is_trusted {
        let xff = match joined(headers, &X_FORWARDED_FOR) {
            Some(list) => format!("{list}, {peer}"),
            None => peer.to_string(),
        };
        set(headers, &X_FORWARDED_FOR, xff);
        let forwarded = match joined(headers, &FORWARDED) {
            Some(list) => format!("{list}, {}", forwarded_node(peer)),
            None => forwarded_node(peer),
        };
        set(headers, &FORWARDED, forwarded);
    } else {
        // The peer's address is always printable: one value serves both.
        match HeaderValue::from_str(&ip_text(peer)) {
            Ok(address) => {
                headers.insert(X_FORWARDED_FOR.clone(), address.clone());
                headers.insert(X_REAL_IP.clone(), address);
            }
            Err(_) => {
                headers.remove(&X_FORWARDED_FOR);
                headers.remove(&X_REAL_IP);
            }
        }
        set(headers, &FORWARDED, forwarded_node(peer));
    }
}

/// Removes the hop-by-hop headers of an upstream's response before it is
/// relayed (RFC 9110 §7.6.1): every header `Connection` names, then the
/// standard set ([`HOP_BY_HOP`]). An upstream's `Connection: close` (nginx
/// sends one every `keepalive_requests` responses) ends only the upstream
/// connection, never the client's.
///
/// ```
/// use gateway_mw::http::strip_response_hop_by_hop;
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert("connection", "close, x-internal".parse().unwrap());
/// headers.insert("x-internal", "1".parse().unwrap());
/// headers.insert("keep-alive", "timeout=5".parse().unwrap());
/// headers.insert("content-type", "application/json".parse().unwrap());
/// strip_response_hop_by_hop(&mut headers);
/// assert_eq!(headers.len(), 1);
/// assert!(headers.contains_key("content-type"));
/// ```
pub fn strip_response_hop_by_hop(headers: &mut HeaderMap) {
    // Only the standard set: a response's credentials and forwarding
    // headers are the upstream's to send.
    remove_named(headers, |name| HOP_BY_HOP.contains(&name));
}

/// Removes the headers `Connection` names, then every header whose
/// [`Rule`] `remove` selects, looking at the names present once.
fn remove_by_rule(headers: &mut HeaderMap, remove: impl Fn(Rule) -> bool) {
    remove_named(headers, |name| remove(rule(name)));
}

/// Removes `Connection` and the headers it names, then every header whose
/// name `remove` selects (every caller's `remove` selects `Connection`).
/// Nothing is collected unless something is there to remove: an upstream's
/// `Connection: keep-alive` names only the standard `Keep-Alive`.
fn remove_named(headers: &mut HeaderMap, remove: impl Fn(&str) -> bool) {
    if let http::header::Entry::Occupied(entry) = headers.entry(CONNECTION) {
        let (_, values) = entry.remove_entry_mult();
        // Allocated only for a token other than the standard two.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in values {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") || token.eq_ignore_ascii_case("keep-alive") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    if headers.keys().any(|name| remove(name.as_str())) {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| remove(name.as_str()))
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
    }
}

/// Applies every step of the module docs to a request about to be
/// forwarded, reading the [`PeerAddr`], [`PeerIsTrustedProxy`] and
/// [`RequestId`] extensions. Without a [`PeerAddr`] the forwarding headers
/// are removed outright (there is no address to vouch for).
pub fn prepare_forward(parts: &mut http::request::Parts) {
    let peer = parts.extensions.get::<PeerAddr>().map(|PeerAddr(p)| p.ip());
    let trusted = parts
        .extensions
        .get::<PeerIsTrustedProxy>()
        .is_some_and(|PeerIsTrustedProxy(t)| *t);
    match peer {
        Some(peer) => sanitize_forward_headers(&mut parts.headers, peer, trusted),
        None => remove_by_rule(&mut parts.headers, |rule| rule != Rule::Pass),
    }
    match parts.extensions.get::<RequestId>() {
        Some(id) => {
            parts
                .headers
                .insert(X_REQUEST_ID.clone(), id.header_value().clone());
        }
        // No RequestIdLayer ran: forward only an id the gateway would accept.
        None => {
            let mut sent = parts.headers.get_all(&X_REQUEST_ID).iter();
            let acceptable = matches!((sent.next(), sent.next()), (Some(v), None) if RequestId::parse(v).is_some());
            if !acceptable {
                parts.headers.remove(&X_REQUEST_ID);
            }
        }
    }
}

/// Whether the request's TCP peer is a configured trusted proxy, inserted
/// by [`ClientIpLayer`](super::ClientIpLayer) next to [`ClientIp`](super::ClientIp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIsTrustedProxy(pub bool);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn headers_named_in_connection_and_the_hop_by_hop_set_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Internal-Token"),
            ("connection", "x-other"),
            ("x-internal-token", "secret"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-authenticate", "Basic"),
            ("x-kept", "yes"),
        ]);
        sanitize_forward_headers(&mut h, ip("203.0.113.1"), false);
        for gone in HOP_BY_HOP.iter().chain(&["x-internal-token", "x-other"]) {
            assert!(!h.contains_key(*gone), "{gone}");
        }
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn method_and_url_overrides_and_credentials_are_removed() {
        let mut h = headers(&[
            ("x-http-method-override", "DELETE"),
            ("X-HTTP-Method", "PUT"),
            ("x-method-override", "PATCH"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("authorization", "Bearer t"),
            ("x-api-key", "k"),
            ("x-gateway-subject", "root"),
            ("x-gateway-roles", "admin"),
        ]);
        sanitize_forward_headers(&mut h, ip("10.0.0.1"), true);
        for gone in OVERRIDES.iter().chain(&CREDENTIALS) {
            assert!(!h.contains_key(*gone), "{gone}");
        }
    }

    #[test]
    fn an_untrusted_peer_cannot_claim_forwarding_headers() {
        let mut h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("forwarded", "for=1.1.1.1;proto=https"),
            ("x-real-ip", "1.1.1.1"),
            ("x-forwarded-host", "admin.internal"),
            ("x-forwarded-proto", "https"),
            ("true-client-ip", "1.1.1.1"),
        ]);
        sanitize_forward_headers(&mut h, ip("203.0.113.7"), false);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7");
        assert_eq!(h["forwarded"], "for=203.0.113.7");
        assert_eq!(h["x-real-ip"], "203.0.113.7");
        for gone in ["x-forwarded-host", "x-forwarded-proto", "true-client-ip"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        let mut v6 = HeaderMap::new();
        sanitize_forward_headers(&mut v6, ip("2001:db8::1"), false);
        assert_eq!(v6["forwarded"], "for=\"[2001:db8::1]\"");
    }

    #[test]
    fn a_trusted_proxy_gets_its_peer_appended_and_its_claims_kept() {
        let mut h = headers(&[
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-for", "10.0.0.9"),
            ("forwarded", "for=198.51.100.7"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "198.51.100.7"),
        ]);
        sanitize_forward_headers(&mut h, ip("10.0.0.2"), true);
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 10.0.0.9, 10.0.0.2");
        assert_eq!(h["forwarded"], "for=198.51.100.7, for=10.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-real-ip"], "198.51.100.7");
    }

    #[test]
    fn prepare_forward_reads_the_extensions() {
        let mut request = http::Request::get("/x")
            .header("x-request-id", "<script>")
            .header("x-forwarded-for", "6.6.6.6")
            .body(())
            .unwrap();
        let id = super::super::assign_request_id(&mut request);
        request
            .extensions_mut()
            .insert(PeerAddr("203.0.113.9:5000".parse().unwrap()));
        // A client naming X-Request-Id in Connection does not remove it.
        request
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("x-request-id"));
        let (mut parts, ()) = request.into_parts();
        prepare_forward(&mut parts);
        assert_eq!(parts.headers["x-request-id"], id.as_str());
        assert_eq!(parts.headers["x-forwarded-for"], "203.0.113.9");

        // Without a RequestId or a peer: unsafe ids and forwarding claims go.
        let (mut parts, ()) = http::Request::get("/x")
            .header("x-request-id", "a\tb")
            .header("x-forwarded-for", "6.6.6.6")
            .body(())
            .unwrap()
            .into_parts();
        prepare_forward(&mut parts);
        assert!(!parts.headers.contains_key("x-request-id"));
        assert!(!parts.headers.contains_key("x-forwarded-for"));
    }

    proptest! {
        /// Whatever a client sends, nothing it names in Connection, no
        /// override and no forwarding claim of its own reaches the upstream.
        #[test]
        fn no_client_claim_survives(
            names in proptest::collection::vec("[a-z][a-z-]{0,12}", 0..6),
            xff in "[0-9., ]{0,20}",
        ) {
            let mut h = HeaderMap::new();
            for n in &names {
                h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_static("v"));
            }
            h.insert(CONNECTION, HeaderValue::from_str(&names.join(", ")).unwrap());
            h.insert("x-forwarded-for", HeaderValue::from_str(&xff).unwrap());
            sanitize_forward_headers(&mut h, ip("203.0.113.1"), false);
            for n in &names {
                let rewritten = ["x-forwarded-for", "forwarded", "x-real-ip"].contains(&n.as_str());
                prop_assert!(rewritten || !h.contains_key(n.as_str()), "{n}");
            }
            prop_assert_eq!(&h["x-forwarded-for"], "203.0.113.1");
            prop_assert!(!h.contains_key(CONNECTION));
        }

        /// The hand-written address text is what `Display` writes, so the
        /// upstream sees the same `X-Forwarded-For`, `X-Real-IP` and
        /// `Forwarded` as before it was written by hand.
        #[test]
        fn address_text_matches_display(v4 in any::<[u8; 4]>(), v6 in any::<[u16; 8]>()) {
            let v4 = IpAddr::from(v4);
            prop_assert_eq!(ip_text(v4), v4.to_string());
            prop_assert_eq!(forwarded_node(v4), format!("for={v4}"));
            let v6 = IpAddr::from(v6);
            prop_assert_eq!(ip_text(v6), v6.to_string());
            prop_assert_eq!(forwarded_node(v6), format!("for=\"[{v6}]\""));
            let mut h = HeaderMap::new();
            sanitize_forward_headers(&mut h, v4, false);
            let text = v4.to_string();
            prop_assert_eq!(&h["x-forwarded-for"], text.as_str());
            prop_assert_eq!(&h["x-real-ip"], text.as_str());
        }
    }
}
