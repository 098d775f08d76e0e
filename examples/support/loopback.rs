//! Shared by the load generators that open more loopback connections than
//! one source address has ephemeral ports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A socket for the `i`-th of `total` connections to `server`. Beyond 10,000
/// loopback connections it binds a fresh source address (127.0.x.1) per
/// 10,000: one address has ~28K ephemeral ports, fewer while earlier runs'
/// sockets sit in TIME_WAIT.
pub(crate) fn socket_for(
    server: SocketAddr,
    i: usize,
    total: usize,
) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if total > 10_000 && server.ip().is_loopback() {
        let ip = Ipv4Addr::new(127, 0, 1 + (i / 10_000) as u8, 1);
        // Linux answers on all of 127.0.0.0/8; where another address cannot
        // be bound, connect from the default one (and run out of ports sooner).
        let _ = socket.bind(SocketAddr::new(IpAddr::V4(ip), 0));
    }
    Ok(socket)
}
