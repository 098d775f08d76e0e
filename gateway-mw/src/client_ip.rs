//! Who the client is, for anonymous rate limits and the audit log, when the
//! gateway sits behind proxies.
//!
//! `X-Forwarded-For` is a list each proxy appends to, so only the entries
//! added by proxies *we* trust are trustworthy. Reading from the right, every
//! hop is skipped while it is a trusted proxy; the first untrusted address is
//! the client. If the TCP peer itself is not a trusted proxy, the header is
//! ignored entirely (anyone can send it). An unparsable entry stops the walk:
//! the client is then the last trusted hop that forwarded it, which errs
//! towards limiting the proxy rather than believing garbage.
//!
//! IPv6 clients are keyed by their /64: one subscriber usually holds a whole
//! /64, so keying on single addresses would let them rotate through 2^64 keys.
//!
//! ```
//! use std::net::IpAddr;
//! use gateway_mw::client_ip::{TrustedProxies, client_ip, limit_key};
//!
//! let trusted = TrustedProxies::parse(["10.0.0.0/8"]).unwrap();
//! let peer: IpAddr = "10.1.2.3".parse().unwrap();
//! // The client forged the first entry; the load balancer appended the real one.
//! let ip = client_ip(peer, Some("1.2.3.4, 203.0.113.9, 10.9.9.9"), &trusted);
//! assert_eq!(ip, "203.0.113.9".parse::<IpAddr>().unwrap());
//! assert_eq!(limit_key("2001:db8:1:2:3:4:5:6".parse().unwrap()), "2001:db8:1:2::/64");
//! ```

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;

/// A CIDR that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid trusted-proxy CIDR {0:?}")]
pub struct InvalidCidr(pub String);

/// The networks whose proxies' `X-Forwarded-For` entries are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// No trusted proxies: the TCP peer is always the client.
    pub fn none() -> TrustedProxies {
        TrustedProxies::default()
    }

    /// Parses CIDRs such as `10.0.0.0/8` or `fd00::/8` (a bare address is a
    /// single host).
    pub fn parse<I: IntoIterator<Item = S>, S: AsRef<str>>(
        cidrs: I,
    ) -> Result<TrustedProxies, InvalidCidr> {
        let mut nets = Vec::new();
        for cidr in cidrs {
            let text = cidr.as_ref().trim();
            let net = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| InvalidCidr(text.to_owned()))?;
            nets.push(net);
        }
        Ok(TrustedProxies { nets })
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: the rightmost `X-Forwarded-For` entry not added by
/// a trusted proxy, or the TCP peer when it is not a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &TrustedProxies) -> IpAddr {
    let mut client = canonical(peer);
    if !trusted.contains(client) {
        return client;
    }
    let Some(header) = forwarded_for else {
        return client;
    };
    for entry in header.rsplit(',') {
        match entry.trim().parse::<IpAddr>() {
            Ok(hop) => {
                client = canonical(hop);
                if !trusted.contains(client) {
                    return client;
                }
            }
            Err(_) => return client,
        }
    }
    client
}

/// Appends `v4` in dotted decimal, as `Display` writes it, without the
/// formatting machinery: the gateway writes the client's address several
/// times per request (rate-limit keys, forwarding headers).
pub(crate) fn push_ipv4(out: &mut String, v4: std::net::Ipv4Addr) {
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

/// The rate-limit key of a client address: the address for IPv4, the /64
/// network for IPv6.
pub fn limit_key(ip: IpAddr) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let mut key = String::with_capacity(15);
            push_ipv4(&mut key, v4);
            key
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let prefix = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{prefix}/64")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted() -> TrustedProxies {
        TrustedProxies::parse(["10.0.0.0/8", "192.168.1.1", "fd00::/8"]).unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_the_header_says() {
        assert_eq!(
            client_ip(ip("203.0.113.5"), Some("1.1.1.1"), &trusted()),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let t = trusted();
        assert_eq!(
            client_ip(ip("10.0.0.1"), Some("198.51.100.7"), &t),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_ip(
                ip("10.0.0.1"),
                Some("6.6.6.6, 198.51.100.7, 192.168.1.1"),
                &t
            ),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), Some(" 6.6.6.6 ,198.51.100.7 "), &t),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn all_trusted_hops_give_the_leftmost() {
        assert_eq!(
            client_ip(ip("10.0.0.1"), Some("10.2.2.2, 10.3.3.3"), &trusted()),
            ip("10.2.2.2")
        );
        assert_eq!(client_ip(ip("10.0.0.1"), None, &trusted()), ip("10.0.0.1"));
    }

    #[test]
    fn garbage_stops_at_the_last_trusted_hop() {
        assert_eq!(
            client_ip(
                ip("10.0.0.1"),
                Some("1.2.3.4, not-an-ip, 10.5.5.5"),
                &trusted()
            ),
            ip("10.5.5.5")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), Some(""), &trusted()),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        let t = trusted();
        assert_eq!(
            client_ip(ip("fd00::1"), Some("2001:db8::9"), &t),
            ip("2001:db8::9")
        );
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.1"), Some("198.51.100.7"), &t),
            ip("198.51.100.7"),
            "mapped peer is trusted"
        );
        assert_eq!(
            limit_key(ip("2001:db8:aa:bb:1:2:3:4")),
            "2001:db8:aa:bb::/64"
        );
        assert_eq!(
            limit_key(ip("2001:db8:aa:bb:ffff::1")),
            "2001:db8:aa:bb::/64"
        );
        assert_eq!(limit_key(ip("::ffff:203.0.113.1")), "203.0.113.1");
        assert_eq!(limit_key(ip("203.0.113.1")), "203.0.113.1");
    }

    #[test]
    fn invalid_cidrs_are_refused() {
        assert!(TrustedProxies::parse(["10.0.0.0/33"]).is_err());
        assert!(TrustedProxies::parse(["proxy.internal"]).is_err());
    }

    proptest! {
        /// Whatever a client prepends, it cannot choose an address to the
        /// right of the first untrusted hop.
        #[test]
        fn prepended_entries_never_change_the_answer(
            forged in prop::collection::vec(any::<[u8; 4]>(), 0..5),
            real in any::<[u8; 4]>(),
        ) {
            let t = trusted();
            let real = IpAddr::from(real);
            prop_assume!(!t.contains(real));
            let honest = client_ip(ip("10.0.0.1"), Some(&format!("{real}, 10.1.1.1")), &t);
            let mut entries: Vec<String> = forged.iter().map(|b| IpAddr::from(*b).to_string()).collect();
            entries.push(real.to_string());
            entries.push("10.1.1.1".into());
            let attacked = client_ip(ip("10.0.0.1"), Some(&entries.join(", ")), &t);
            prop_assert_eq!(honest, real);
            prop_assert_eq!(attacked, real);
        }

        /// An IPv4 limit key is the address as `Display` writes it.
        #[test]
        fn ipv4_limit_keys_are_the_dotted_address(octets in any::<[u8; 4]>()) {
            let v4 = std::net::Ipv4Addr::from(octets);
            prop_assert_eq!(limit_key(IpAddr::V4(v4)), v4.to_string());
        }
    }
}
