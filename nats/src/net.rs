//! Which network addresses count as internal: the webhook provider refuses to send to them
//! unless `channels.webhook.allow_private_targets` is set, and the API refuses webhook URLs naming
//! them up front, so the two agree.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether Herald refuses to send webhooks to `ip` unless private targets are allowed: loopback,
/// unspecified, private (RFC 1918), shared (100.64/10), link-local (including 169.254.169.254, the
/// cloud metadata endpoint), broadcast, multicast, reserved (0/8, 198.18/15 for benchmarks,
/// 240/4), IPv6 unique-local and link-local, the local-use NAT64 prefix (`64:ff9b:1::/48`), and
/// internal IPv4 addresses mapped into IPv6 or behind the well-known NAT64 prefix (`64:ff9b::/96`,
/// which a NAT64 gateway forwards to the IPv4 address in its last 32 bits).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped().or_else(|| nat64_inner(v6)) {
            Some(v4) => is_internal_v4(v4),
            None => {
                let first = v6.segments()[0];
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || first & 0xfe00 == 0xfc00
                    || first & 0xffc0 == 0xfe80
                    || v6.segments()[..3] == [0x64, 0xff9b, 1]
            }
        },
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || a >= 240
        || (a == 100 && b & 0xc0 == 64)
        || (a == 198 && b & 0xfe == 18)
}

/// The IPv4 address inside an address of the well-known NAT64 prefix `64:ff9b::/96`.
fn nat64_inner(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0])
        .then(|| Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7])))
}
