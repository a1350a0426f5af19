//! VRRP version 3 adverts on the wire (RFC 5798 §5), encoded and strictly decoded.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |(rsvd) |     Max Adver Int     |          Checksum             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                  IPvX Address(es) (4 or 16 bytes each)        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   [auth trailer, 28 bytes, only with a key: see `auth`]       |
//! ```
//!
//! The checksum covers an IP pseudo-header (RFC 5798 §5.2.8: RFC 768's for IPv4, RFC
//! 2460 §8.1's for IPv6, protocol 112) and the message. Over IPv4 it covers the VRRP
//! message only, with the message's length in the pseudo-header: that is what
//! keepalived computes by default (`vrrp_build_vrrp_v3` and `vrrp_check_packet` in
//! keepalived/vrrp/vrrp.c; `v3_checksum_as_v2` is an opt-in), with the real destination
//! (the group, or the unicast peer). Over IPv6 it covers the whole IP payload, trailer
//! included, as the kernel does for keepalived's `IPV6_CHECKSUM` socket.
//!
//! Pure: the IP envelope (addresses, TTL) comes in as plain values.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use super::auth::{self, AuthError, AuthKey, TRAILER_LEN, Verifier};

/// IP protocol number of VRRP.
pub const IPPROTO_VRRP: u8 = 112;
pub const VERSION: u8 = 3;
pub const TYPE_ADVERT: u8 = 1;
/// Adverts are sent, and accepted, with TTL / hop limit 255 only: proof they did not
/// cross a router.
pub const TTL: u8 = 255;
pub const HEADER_LEN: usize = 8;
/// The 12-bit Max Adver Int field, in centiseconds.
pub const MAX_INTERVAL_CS: u16 = 0x0fff;
pub const GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
pub const GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);
/// Offset of the checksum in the message.
pub const CHECKSUM_AT: usize = 6;

/// One VRRP advertisement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    pub router_id: u8,
    /// 0: the sender stops being master.
    pub priority: u8,
    /// Max Advert Interval, in centiseconds.
    pub interval_cs: u16,
    /// All of the IP packet's family.
    pub addresses: Vec<IpAddr>,
}

impl Advert {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.interval_cs) * 10)
    }
}

/// What the IP layer says about a received advert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
}

/// Why a received advert was dropped; each has its own counter (`name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("shorter than a VRRP header")]
    TooShort,
    #[error("TTL / hop limit {0}, not 255 (sent across a router?)")]
    BadTtl(u8),
    #[error("VRRP version {0}, not 3")]
    BadVersion(u8),
    #[error("type {0}, not an advertisement")]
    BadType(u8),
    #[error("router id {0}, not ours")]
    WrongRouterId(u8),
    #[error("{count} addresses do not fit {len} bytes")]
    AddressCountMismatch { count: u8, len: usize },
    #[error("advert interval of 0")]
    BadInterval,
    #[error("bad checksum")]
    BadChecksum,
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
}

impl DropReason {
    /// The counter this reason is kept in.
    pub fn name(&self) -> &'static str {
        match self {
            DropReason::TooShort => "too_short",
            DropReason::BadTtl(_) => "bad_ttl",
            DropReason::BadVersion(_) => "bad_version",
            DropReason::BadType(_) => "bad_type",
            DropReason::WrongRouterId(_) => "wrong_router_id",
            DropReason::AddressCountMismatch { .. } => "address_count_mismatch",
            DropReason::BadInterval => "bad_interval",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::Auth(e) => e.name(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("addresses, source and destination must all be of one family")]
    FamilyMismatch,
    #[error("{0} addresses do not fit one advert (at most 255)")]
    TooManyAddresses(usize),
    #[error("advert interval {0} cs is not 1 to 4095")]
    Interval(u16),
}

fn addr_len(v4: bool) -> usize {
    if v4 { 4 } else { 16 }
}

/// The message alone (header and addresses), checksum zero.
pub fn message(adv: &Advert, v4: bool) -> Result<Vec<u8>, EncodeError> {
    if adv.addresses.iter().any(|a| a.is_ipv4() != v4) {
        return Err(EncodeError::FamilyMismatch);
    }
    let count = u8::try_from(adv.addresses.len())
        .map_err(|_| EncodeError::TooManyAddresses(adv.addresses.len()))?;
    if adv.interval_cs == 0 || adv.interval_cs > MAX_INTERVAL_CS {
        return Err(EncodeError::Interval(adv.interval_cs));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + adv.addresses.len() * addr_len(v4));
    out.push((VERSION << 4) | TYPE_ADVERT);
    out.push(adv.router_id);
    out.push(adv.priority);
    out.push(count);
    out.extend_from_slice(&adv.interval_cs.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    for a in &adv.addresses {
        match a {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
        }
    }
    Ok(out)
}

/// One advert's IP payload, sent from `src` to `dst`. With `auth`, the trailer is
/// signed with that key and sequence number (see `auth`).
pub fn encode(
    adv: &Advert,
    src: IpAddr,
    dst: IpAddr,
    auth: Option<(&AuthKey, u64)>,
) -> Result<Vec<u8>, EncodeError> {
    let v4 = src.is_ipv4();
    if dst.is_ipv4() != v4 {
        return Err(EncodeError::FamilyMismatch);
    }
    let mut out = message(adv, v4)?;
    let msg_len = out.len();
    if let Some((key, seq)) = auth {
        let trailer = auth::sign(key, src, adv.router_id, &out, seq);
        out.extend_from_slice(&trailer);
    }
    let covered = if v4 { msg_len } else { out.len() };
    let sum = checksum(&out[..covered], src, dst);
    out[CHECKSUM_AT..CHECKSUM_AT + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(out)
}

/// Decodes and checks one received advert for `router_id`, in the order of RFC 5798
/// §7.1; with `auth` (a key is configured) the trailer is required and verified last,
/// so only an otherwise valid advert moves the replay state.
pub fn decode(
    payload: &[u8],
    env: &Envelope,
    router_id: u8,
    auth: Option<&mut Verifier>,
    now_unix: Duration,
) -> Result<Advert, DropReason> {
    let &[vers_type, vrid, priority, count, int_hi, int_lo, ..] = payload else {
        return Err(DropReason::TooShort);
    };
    if payload.len() < HEADER_LEN {
        return Err(DropReason::TooShort);
    }
    if env.ttl != TTL {
        return Err(DropReason::BadTtl(env.ttl));
    }
    if vers_type >> 4 != VERSION {
        return Err(DropReason::BadVersion(vers_type >> 4));
    }
    if vers_type & 0x0f != TYPE_ADVERT {
        return Err(DropReason::BadType(vers_type & 0x0f));
    }
    if vrid != router_id {
        return Err(DropReason::WrongRouterId(vrid));
    }
    let v4 = env.src.is_ipv4();
    let msg_len = HEADER_LEN + usize::from(count) * addr_len(v4);
    let with_trailer = if payload.len() == msg_len {
        false
    } else if payload.len() == msg_len + TRAILER_LEN {
        true
    } else {
        return Err(DropReason::AddressCountMismatch {
            count,
            len: payload.len(),
        });
    };
    match (auth.is_some(), with_trailer) {
        (true, false) => return Err(AuthError::Missing.into()),
        (false, true) => return Err(AuthError::Unexpected.into()),
        _ => {}
    }
    // The 4 reserved bits are ignored on reception.
    let interval_cs = u16::from_be_bytes([int_hi & 0x0f, int_lo]);
    if interval_cs == 0 {
        return Err(DropReason::BadInterval);
    }
    let covered = if v4 { msg_len } else { payload.len() };
    if checksum(&payload[..covered], env.src, env.dst) != 0 {
        return Err(DropReason::BadChecksum);
    }
    if let Some(verifier) = auth {
        verifier.verify(
            env.src,
            router_id,
            &payload[..msg_len],
            &payload[msg_len..],
            now_unix,
        )?;
    }
    let addresses = payload[HEADER_LEN..msg_len]
        .chunks_exact(addr_len(v4))
        .map(|c| match <[u8; 4]>::try_from(c) {
            Ok(a) => IpAddr::from(a),
            Err(_) => {
                let mut a = [0u8; 16];
                a.copy_from_slice(c);
                IpAddr::from(a)
            }
        })
        .collect();
    Ok(Advert {
        router_id: vrid,
        priority,
        interval_cs,
        addresses,
    })
}

/// The Internet checksum of `data` behind the pseudo-header for (`src`, `dst`,
/// protocol 112, `data.len()`). Over data whose checksum field is zero it is the
/// value to put there; over data with a correct checksum it is 0.
pub fn checksum(data: &[u8], src: IpAddr, dst: IpAddr) -> u16 {
    let mut sum = 0u64;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            sum = add(sum, &s.octets());
            sum = add(sum, &d.octets());
            sum += u64::from(IPPROTO_VRRP);
            sum += data.len() as u64;
        }
        (s, d) => {
            sum = add(sum, &v6_octets(s));
            sum = add(sum, &v6_octets(d));
            sum += data.len() as u64;
            sum += u64::from(IPPROTO_VRRP);
        }
    }
    fold(add(sum, data))
}

fn v6_octets(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Adds big-endian 16-bit words (the last byte padded with zero) to a running sum.
pub(super) fn add(mut sum: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a running sum to 16 bits and complements it.
pub(super) fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Duration = Duration::from_secs(1_800_000_000);

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn advert_v4() -> Advert {
        Advert {
            router_id: 51,
            priority: 100,
            interval_cs: 100,
            addresses: vec![v4("192.0.2.10")],
        }
    }

    fn env(src: &str, dst: &str) -> Envelope {
        Envelope {
            src: v4(src),
            dst: v4(dst),
            ttl: 255,
        }
    }

    /// Built by hand from RFC 5798 §5.2. The checksum, worked out once:
    /// pseudo-header c000+0201+e000+0012+0070+000c = 1a28f, message
    /// 3133+6401+0064+0000+c000+020a = 157a2, total 2fa31 -> fa33, complement 05cc.
    const KNOWN_V4: [u8; 12] = [
        0x31, 0x33, 0x64, 0x01, 0x00, 0x64, 0x05, 0xcc, 192, 0, 2, 10,
    ];

    #[test]
    fn known_good_ipv4_advert() {
        let bytes = encode(&advert_v4(), v4("192.0.2.1"), v4("224.0.0.18"), None).unwrap();
        assert_eq!(bytes, KNOWN_V4);
        let e = env("192.0.2.1", "224.0.0.18");
        assert_eq!(decode(&KNOWN_V4, &e, 51, None, NOW), Ok(advert_v4()));
    }

    #[test]
    fn unicast_checksum_uses_the_peer_address() {
        let to_peer = encode(&advert_v4(), v4("192.0.2.1"), v4("192.0.2.2"), None).unwrap();
        assert_ne!(to_peer, KNOWN_V4);
        let e = env("192.0.2.1", "192.0.2.2");
        assert_eq!(decode(&to_peer, &e, 51, None, NOW), Ok(advert_v4()));
        // The pre-1.3.6 keepalived habit (group address in a unicast checksum) is not
        // accepted.
        let e = env("192.0.2.1", "192.0.2.2");
        assert_eq!(
            decode(&KNOWN_V4, &e, 51, None, NOW),
            Err(DropReason::BadChecksum)
        );
    }

    #[test]
    fn ipv6_round_trip() {
        let adv = Advert {
            router_id: 7,
            priority: 254,
            interval_cs: MAX_INTERVAL_CS,
            addresses: vec![v4("2001:db8::10"), v4("2001:db8::11")],
        };
        let src = v4("fe80::1");
        let dst = IpAddr::V6(GROUP_V6);
        let bytes = encode(&adv, src, dst, None).unwrap();
        assert_eq!(bytes.len(), 8 + 32);
        assert_eq!(&bytes[..6], &[0x31, 7, 254, 2, 0x0f, 0xff]);
        let e = Envelope { src, dst, ttl: 255 };
        assert_eq!(decode(&bytes, &e, 7, None, NOW), Ok(adv.clone()));
        // The pseudo-header counts: another source breaks the checksum.
        let e = Envelope {
            src: v4("fe80::2"),
            dst,
            ttl: 255,
        };
        assert_eq!(
            decode(&bytes, &e, 7, None, NOW),
            Err(DropReason::BadChecksum)
        );
    }

    #[test]
    fn many_addresses_and_none() {
        let mut adv = advert_v4();
        adv.addresses = (0..255u8).map(|i| v4(&format!("10.0.0.{i}"))).collect();
        let bytes = encode(&adv, v4("192.0.2.1"), v4("224.0.0.18"), None).unwrap();
        let e = env("192.0.2.1", "224.0.0.18");
        assert_eq!(decode(&bytes, &e, 51, None, NOW), Ok(adv.clone()));
        adv.addresses.clear();
        let bytes = encode(&adv, v4("192.0.2.1"), v4("224.0.0.18"), None).unwrap();
        assert_eq!(decode(&bytes, &e, 51, None, NOW), Ok(adv.clone()));
        adv.addresses = vec![v4("10.0.0.1"); 256];
        assert_eq!(
            encode(&adv, v4("192.0.2.1"), v4("224.0.0.18"), None),
            Err(EncodeError::TooManyAddresses(256))
        );
    }

    #[test]
    fn encode_rejects_what_the_wire_cannot_carry() {
        let mut adv = advert_v4();
        assert_eq!(
            encode(&adv, v4("fe80::1"), v4("ff02::12"), None),
            Err(EncodeError::FamilyMismatch)
        );
        assert_eq!(
            encode(&adv, v4("192.0.2.1"), v4("ff02::12"), None),
            Err(EncodeError::FamilyMismatch)
        );
        adv.interval_cs = 4096;
        assert_eq!(
            encode(&adv, v4("192.0.2.1"), v4("224.0.0.18"), None),
            Err(EncodeError::Interval(4096))
        );
    }

    /// KNOWN_V4 with one change, its checksum fixed up so that only that change counts.
    fn mutated(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut p = KNOWN_V4.to_vec();
        f(&mut p);
        p[6] = 0;
        p[7] = 0;
        let end = p.len().min(12);
        let sum = checksum(&p[..end], v4("192.0.2.1"), v4("224.0.0.18"));
        p[6..8].copy_from_slice(&sum.to_be_bytes());
        p
    }

    #[test]
    fn each_malformed_advert_is_dropped_with_its_reason() {
        let e = env("192.0.2.1", "224.0.0.18");
        let check = |p: &[u8], e: &Envelope| decode(p, e, 51, None, NOW);
        assert_eq!(check(&KNOWN_V4[..7], &e), Err(DropReason::TooShort));
        assert_eq!(check(&[], &e), Err(DropReason::TooShort));
        let ttl64 = Envelope { ttl: 64, ..e };
        assert_eq!(check(&KNOWN_V4, &ttl64), Err(DropReason::BadTtl(64)));
        assert_eq!(
            check(&mutated(|p| p[0] = 0x21), &e),
            Err(DropReason::BadVersion(2))
        );
        assert_eq!(
            check(&mutated(|p| p[0] = 0x32), &e),
            Err(DropReason::BadType(2))
        );
        assert_eq!(
            check(&mutated(|p| p[1] = 52), &e),
            Err(DropReason::WrongRouterId(52))
        );
        assert_eq!(
            check(&mutated(|p| p[3] = 2), &e),
            Err(DropReason::AddressCountMismatch { count: 2, len: 12 })
        );
        assert_eq!(
            check(&mutated(|p| p.push(0)), &e),
            Err(DropReason::AddressCountMismatch { count: 1, len: 13 })
        );
        assert_eq!(
            check(&mutated(|p| p[4..6].copy_from_slice(&[0xf0, 0])), &e),
            Err(DropReason::BadInterval)
        );
        let mut bad = KNOWN_V4;
        bad[11] ^= 1;
        assert_eq!(check(&bad, &e), Err(DropReason::BadChecksum));
        // Reserved bits are ignored.
        let reserved = mutated(|p| p[4] |= 0xf0);
        assert_eq!(check(&reserved, &e).map(|a| a.interval_cs), Ok(100));
    }

    #[test]
    fn authenticated_round_trip_and_trailer_rules() {
        let key = AuthKey::from_bytes(b"0123456789abcdef0123".to_vec()).unwrap();
        let src = v4("192.0.2.1");
        let dst = v4("224.0.0.18");
        let seq = auth::seq_from_unix(NOW);
        let bytes = encode(&advert_v4(), src, dst, Some((&key, seq))).unwrap();
        assert_eq!(bytes.len(), 12 + TRAILER_LEN);
        // The IPv4 checksum covers the message only: the same as without a trailer.
        assert_eq!(bytes[..12], KNOWN_V4);
        let e = env("192.0.2.1", "224.0.0.18");
        let mut verifier = Verifier::new(key.clone(), Duration::from_secs(5));
        assert_eq!(
            decode(&bytes, &e, 51, Some(&mut verifier), NOW),
            Ok(advert_v4())
        );
        // Replayed, also through decode.
        assert_eq!(
            decode(&bytes, &e, 51, Some(&mut verifier), NOW),
            Err(DropReason::Auth(AuthError::Replayed))
        );
        // Without a trailer while a key is set; with one while none is.
        let mut fresh = Verifier::new(key.clone(), Duration::from_secs(5));
        assert_eq!(
            decode(&KNOWN_V4, &e, 51, Some(&mut fresh), NOW),
            Err(DropReason::Auth(AuthError::Missing))
        );
        assert_eq!(
            decode(&bytes, &e, 51, None, NOW),
            Err(DropReason::Auth(AuthError::Unexpected))
        );
        assert_eq!(DropReason::Auth(AuthError::Missing).name(), "auth_missing");
    }

    #[test]
    fn ipv6_checksum_covers_the_trailer() {
        let key = AuthKey::from_bytes(vec![7u8; 32]).unwrap();
        let adv = Advert {
            router_id: 9,
            priority: 1,
            interval_cs: 10,
            addresses: vec![v4("2001:db8::10")],
        };
        let src = v4("fe80::1");
        let dst = v4("ff02::12");
        let mut bytes = encode(&adv, src, dst, Some((&key, 5))).unwrap();
        assert_eq!(checksum(&bytes, src, dst), 0);
        let e = Envelope { src, dst, ttl: 255 };
        let mut verifier = Verifier::new(key, Duration::from_secs(300));
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        assert_eq!(
            decode(&bytes, &e, 9, Some(&mut verifier), Duration::ZERO),
            Err(DropReason::BadChecksum)
        );
    }
}
