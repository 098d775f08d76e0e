//! Inserts the client's address ([`ClientIp`]) from the TCP peer
//! ([`PeerAddr`], set by the server) and trusted `X-Forwarded-For` hops, and
//! whether the peer is a trusted proxy
//! ([`PeerIsTrustedProxy`](super::PeerIsTrustedProxy), read by
//! [`prepare_forward`](super::prepare_forward)).

use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;

use crate::client_ip::{TrustedProxies, client_ip};

/// The TCP peer of the connection, as `http_kit::serve` inserts it into
/// every request (the suite's one type for it).
pub use http_kit::PeerAddr;

/// The client's address as the gateway determined it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// Computes [`ClientIp`] for each request; see [`crate::client_ip`].
#[derive(Debug, Clone, Default)]
pub struct ClientIpLayer {
    trusted: Arc<TrustedProxies>,
}

impl ClientIpLayer {
    /// Believes `X-Forwarded-For` hops added by `trusted` proxies.
    pub fn new(trusted: TrustedProxies) -> ClientIpLayer {
        ClientIpLayer {
            trusted: Arc::new(trusted),
        }
    }
}

impl<S> tower::Layer<S> for ClientIpLayer {
    type Service = ClientIpService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientIpService {
            inner,
            trusted: Arc::clone(&self.trusted),
        }
    }
}

/// The service of [`ClientIpLayer`].
#[derive(Debug, Clone)]
pub struct ClientIpService<S> {
    inner: S,
    trusted: Arc<TrustedProxies>,
}

impl<S, B> tower::Service<Request<B>> for ClientIpService<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        if let Some(PeerAddr(peer)) = request.extensions().get::<PeerAddr>().copied() {
            // Several X-Forwarded-For headers form one list, in order.
            let joined: Vec<&str> = request
                .headers()
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let forwarded = (!joined.is_empty()).then(|| joined.join(","));
            let ip = client_ip(peer.ip(), forwarded.as_deref(), &self.trusted);
            request.extensions_mut().insert(ClientIp(ip));
            // The proxy needs this to decide whose forwarding headers to keep.
            let trusted = self.trusted.contains(peer.ip());
            request
                .extensions_mut()
                .insert(super::PeerIsTrustedProxy(trusted));
        }
        self.inner.call(request)
    }
}
