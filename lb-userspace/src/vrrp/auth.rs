//! Authenticated adverts: an HMAC-SHA256 trailer with a time-based sequence number
//! against replay. Used when `auth_key_file` is set; then every advert must carry a
//! valid trailer, and one without is dropped and counted.
//!
//! The format is keepalived's `auth_hmac` extension (keepalived 2.4 and later,
//! `keepalived/vrrp/vrrp_auth_hmac.c`), so a keepalived peer configured with
//! `auth_hmac { key 1 file:/etc/lb/vrrp.key  active_key 1  mode enforce }` and the
//! default `anti_replay time` speaks it too (keepalived wants keys of 32 to 64 bytes;
//! we accept 16 and up). The trailer follows the VRRP message, inside the IP payload
//! (so the IP length includes it):
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | type = 1      | key id = 1    |        reserved = 0           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |              seconds since the Unix epoch (UTC)               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |     fraction of a second / 2^16  |  counter within one stamp  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |       HMAC-SHA256, first 16 bytes (128 bits)                  |
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! All fields big-endian. Bytes 4 to 11 read as one 64-bit number are the sequence.
//! The HMAC (key: the key file's bytes) covers, in this order:
//! - a 20-byte pseudo-header: 4 or 6 (the IP version), 3 (the VRRP version), the VRID,
//!   0, then the packet's source address, zero-padded to 16 bytes;
//! - the VRRP message (header and addresses) with its checksum read as 0 (the checksum
//!   covers the trailer over IPv6, so the two must not depend on each other);
//! - the trailer's first 12 bytes, then 16 zero bytes in place of the HMAC.
//!
//! The destination is not covered: one signature serves every unicast peer, and the
//! source binds the advert to its sender. A receiver checks the HMAC, then drops an
//! advert whose seconds are more than the freshness window away from its own clock
//! (max(3 × advert interval in whole seconds, 5 s), at most 300 s, as keepalived: the
//! hosts need NTP), then requires the sequence to be strictly greater than the last one
//! accepted from that source. The sequence is the wall clock at send time, so it keeps
//! growing across a restart of the sender; a receiver forgets a source's last sequence
//! once it falls out
//! of the window, so a peer whose clock was stepped back recovers.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::packet::{CHECKSUM_AT, VERSION};

pub const TRAILER_LEN: usize = 28;
/// Trailer type: HMAC-SHA256 truncated to 128 bits.
pub const TYPE_HMAC_SHA256: u8 = 1;
/// The one key id we sign with and accept.
pub const KEY_ID: u8 = 1;
pub const HMAC_LEN: usize = 16;
pub const MIN_KEY_LEN: usize = 16;
const PREFIX_LEN: usize = TRAILER_LEN - HMAC_LEN;
const PSEUDO_LEN: usize = 20;
/// Sources whose last sequence is remembered; only senders holding the key get in.
const MAX_SOURCES: usize = 16;
const MIN_WINDOW_S: u64 = 5;
const MAX_WINDOW_S: u64 = 300;

/// Why an advert's authentication failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no trailer, and a key is configured")]
    Missing,
    #[error("a trailer, and no key is configured")]
    Unexpected,
    #[error("malformed trailer")]
    Malformed,
    #[error("unknown key id {0}")]
    UnknownKey(u8),
    #[error("bad HMAC (another key, or altered)")]
    BadHmac,
    /// The HMAC is right, only the stamp is too old (or ahead): the sender's clock is
    /// off, or this is an old capture. `skew_ms` > 0: the stamp is behind our clock.
    #[error("timestamp {:.1} s away from our clock, beyond the freshness window", *skew_ms as f64 / 1000.0)]
    Stale { skew_ms: i64 },
    #[error("sequence not above the last one accepted from this source (replayed)")]
    Replayed,
}

impl AuthError {
    pub fn name(&self) -> &'static str {
        match self {
            AuthError::Missing => "auth_missing",
            AuthError::Unexpected => "auth_unexpected",
            AuthError::Malformed => "auth_malformed",
            AuthError::UnknownKey(_) => "auth_unknown_key",
            AuthError::BadHmac => "auth_bad_hmac",
            AuthError::Stale { .. } => "auth_stale",
            AuthError::Replayed => "auth_replayed",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key is {len} bytes; at least {MIN_KEY_LEN} needed")]
    TooShort { len: usize },
    #[error("key file starts with \"hex:\" but the rest is not an even number of hex digits")]
    BadHex,
}

/// The shared secret. Its bytes never show in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey(Vec<u8>);

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthKey({} bytes)", self.0.len())
    }
}

impl AuthKey {
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort { len: bytes.len() });
        }
        Ok(Self(bytes))
    }

    /// The key file's raw bytes, less trailing line ends; or, as keepalived reads the
    /// same file, the bytes a `hex:` prefix spells.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes)
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut end = bytes.len();
        while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        let bytes = &bytes[..end];
        match bytes.strip_prefix(b"hex:") {
            Some(hex) => Self::from_bytes(decode_hex(hex).ok_or(KeyError::BadHex)?),
            None => Self::from_bytes(bytes.to_vec()),
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The secret itself, for signing.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn decode_hex(hex: &[u8]) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.chunks_exact(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

/// The freshness window for an advert interval: max(3 × interval in whole seconds,
/// 5 s), at most 300 s.
pub fn window_for(interval: Duration) -> Duration {
    Duration::from_secs((3 * interval.as_secs()).clamp(MIN_WINDOW_S, MAX_WINDOW_S))
}

/// The sequence number for a wall-clock reading (time since the Unix epoch): seconds in
/// the top 32 bits, the fraction of a second in the next 16, counter 0.
pub fn seq_from_unix(now: Duration) -> u64 {
    let frac = (u64::from(now.subsec_nanos()) << 16) / 1_000_000_000;
    ((now.as_secs() & 0xffff_ffff) << 32) | (frac << 16)
}

/// `a` comes after `b` (serial number arithmetic, RFC 1982), so the field may wrap.
fn after(a: u64, b: u64) -> bool {
    (a.wrapping_sub(b) as i64) > 0
}

/// Seconds from the stamp of `seq` to `now` (negative: the stamp is ahead of us).
fn age_s(now: Duration, seq: u64) -> i64 {
    i64::from((now.as_secs() as u32).wrapping_sub((seq >> 32) as u32) as i32)
}

/// Milliseconds from the stamp of `seq` (seconds and fraction) to `now`.
fn age_ms(now: Duration, seq: u64) -> i64 {
    let frac_ms = |f: u64| (((f & 0xffff) * 1000 + 0x8000) >> 16) as i64;
    age_s(now, seq) * 1000 + i64::from(now.subsec_millis()) - frac_ms(seq >> 16)
}

/// Hands out the sender's sequence numbers: the clock, or one more than the last one
/// if the clock has not moved on.
#[derive(Clone, Debug)]
pub struct Sequencer {
    last: u64,
    window: Duration,
}

impl Sequencer {
    pub fn new(window: Duration) -> Self {
        Self { last: 0, window }
    }

    pub fn next(&mut self, now_unix: Duration) -> u64 {
        let clock = seq_from_unix(now_unix);
        // A clock stepped back by more than the window would leave us beyond what
        // receivers accept: start again from the clock.
        if after(clock, self.last) || -age_s(now_unix, self.last) > self.window.as_secs() as i64 {
            self.last = clock;
        } else {
            self.last = self.last.wrapping_add(1);
        }
        self.last
    }
}

fn hmac(key: &AuthKey, src: IpAddr, router_id: u8, message: &[u8], prefix: &[u8]) -> Hmac<Sha256> {
    let mut pseudo = [0u8; PSEUDO_LEN];
    pseudo[1] = VERSION;
    pseudo[2] = router_id;
    match src {
        IpAddr::V4(a) => {
            pseudo[0] = 4;
            pseudo[4..8].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            pseudo[0] = 6;
            pseudo[4..20].copy_from_slice(&a.octets());
        }
    }
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&key.0) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(&pseudo);
    mac.update(message.get(..CHECKSUM_AT).unwrap_or(message));
    mac.update(&[0, 0]);
    mac.update(message.get(CHECKSUM_AT + 2..).unwrap_or(&[]));
    mac.update(prefix);
    mac.update(&[0u8; HMAC_LEN]);
    mac
}

/// The trailer for `message` (the VRRP message as sent, its checksum not yet
/// filled in or filled in: it is read as 0) sent from `src`.
pub fn sign(
    key: &AuthKey,
    src: IpAddr,
    router_id: u8,
    message: &[u8],
    seq: u64,
) -> [u8; TRAILER_LEN] {
    let mut trailer = [0u8; TRAILER_LEN];
    trailer[0] = TYPE_HMAC_SHA256;
    trailer[1] = KEY_ID;
    trailer[4..12].copy_from_slice(&seq.to_be_bytes());
    let tag = hmac(key, src, router_id, message, &trailer[..PREFIX_LEN])
        .finalize()
        .into_bytes();
    trailer[PREFIX_LEN..].copy_from_slice(&tag[..HMAC_LEN]);
    trailer
}

/// Checks trailers and remembers, per source, the last sequence accepted.
#[derive(Clone, Debug)]
pub struct Verifier {
    key: AuthKey,
    window: Duration,
    last: HashMap<IpAddr, u64>,
}

impl Verifier {
    pub fn new(key: AuthKey, window: Duration) -> Self {
        Self {
            key,
            window,
            last: HashMap::new(),
        }
    }

    pub fn verify(
        &mut self,
        src: IpAddr,
        router_id: u8,
        message: &[u8],
        trailer: &[u8],
        now_unix: Duration,
    ) -> Result<(), AuthError> {
        let Ok(trailer) = <&[u8; TRAILER_LEN]>::try_from(trailer) else {
            return Err(AuthError::Malformed);
        };
        if trailer[0] != TYPE_HMAC_SHA256 || trailer[2..4] != [0, 0] {
            return Err(AuthError::Malformed);
        }
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&trailer[4..12]);
        let seq = u64::from_be_bytes(seq_bytes);
        let window = self.window.as_secs() as i64;
        if trailer[1] != KEY_ID {
            return Err(AuthError::UnknownKey(trailer[1]));
        }
        // The HMAC before the stamp: a stale advert then says something true about a
        // key holder (its clock is off), which the speaker raises as an alarm. Checking
        // the stamp first would save no digest against a forger, whose stamps are fresh.
        // Nothing is remembered before the HMAC passes.
        hmac(&self.key, src, router_id, message, &trailer[..PREFIX_LEN])
            .verify_truncated_left(&trailer[PREFIX_LEN..])
            .map_err(|_| AuthError::BadHmac)?;
        if age_s(now_unix, seq).abs() > window {
            return Err(AuthError::Stale {
                skew_ms: age_ms(now_unix, seq),
            });
        }
        if let Some(&last) = self.last.get(&src) {
            // A mark outside the window only orders adverts the window rejects anyway;
            // forgetting it lets a sender whose clock was stepped back recover.
            if age_s(now_unix, last).abs() <= window && !after(seq, last) {
                return Err(AuthError::Replayed);
            }
        }
        self.last.insert(src, seq);
        if self.last.len() > MAX_SOURCES
            && let Some(oldest) = self.last.iter().min_by_key(|(_, s)| **s).map(|(a, _)| *a)
        {
            self.last.remove(&oldest);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vrrp::packet::{Advert, message};

    const NOW: Duration = Duration::from_secs(1_800_000_000);
    const KEY: &[u8] = b"a shared secret of 32 bytes here";

    fn key() -> AuthKey {
        AuthKey::from_bytes(KEY.to_vec()).unwrap()
    }

    fn src() -> IpAddr {
        "192.0.2.1".parse().unwrap()
    }

    fn msg() -> Vec<u8> {
        let adv = Advert {
            router_id: 51,
            priority: 100,
            interval_cs: 100,
            addresses: vec!["192.0.2.10".parse().unwrap()],
        };
        message(&adv, true).unwrap()
    }

    fn verifier() -> Verifier {
        Verifier::new(key(), Duration::from_secs(5))
    }

    /// Worked out independently (Python's hmac over the bytes keepalived's
    /// `pdu_hmac` feeds it) for this message, source, key and sequence.
    #[test]
    fn known_answer() {
        let seq = 0x6b49_d200_8000_0001;
        let t = sign(&key(), src(), 51, &msg(), seq);
        assert_eq!(
            t[..12],
            [1, 1, 0, 0, 0x6b, 0x49, 0xd2, 0x00, 0x80, 0x00, 0x00, 0x01]
        );
        assert_eq!(
            hex(&t[12..]),
            "8e3b9012855c24c68cc09d440149e132",
            "HMAC over keepalived's layout"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn valid_trailer_accepted() {
        let seq = seq_from_unix(NOW);
        let t = sign(&key(), src(), 51, &msg(), seq);
        assert_eq!(verifier().verify(src(), 51, &msg(), &t, NOW), Ok(()));
        // The checksum field is read as 0: a filled-in checksum changes nothing.
        let mut with_sum = msg();
        with_sum[6] = 0xab;
        assert_eq!(verifier().verify(src(), 51, &with_sum, &t, NOW), Ok(()));
    }

    #[test]
    fn any_altered_byte_is_rejected() {
        let seq = seq_from_unix(NOW);
        let m = msg();
        let t = sign(&key(), src(), 51, &m, seq);
        for i in (0..m.len()).filter(|i| !(6..8).contains(i)) {
            let mut bad = m.clone();
            bad[i] ^= 1;
            assert_eq!(
                verifier().verify(src(), 51, &bad, &t, NOW),
                Err(AuthError::BadHmac),
                "message byte {i}"
            );
        }
        for i in 10..TRAILER_LEN {
            let mut bad = t;
            bad[i] ^= 1;
            assert_eq!(
                verifier().verify(src(), 51, &m, &bad, NOW),
                Err(AuthError::BadHmac),
                "trailer byte {i}"
            );
        }
        // Another source or router id: the pseudo-header is covered.
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(
            verifier().verify(other, 51, &m, &t, NOW),
            Err(AuthError::BadHmac)
        );
        assert_eq!(
            verifier().verify(src(), 52, &m, &t, NOW),
            Err(AuthError::BadHmac)
        );
    }

    #[test]
    fn wrong_key_rejected() {
        let other = AuthKey::from_bytes(b"another secret, also long enough".to_vec()).unwrap();
        let t = sign(&other, src(), 51, &msg(), seq_from_unix(NOW));
        assert_eq!(
            verifier().verify(src(), 51, &msg(), &t, NOW),
            Err(AuthError::BadHmac)
        );
    }

    #[test]
    fn replay_rejected_per_source() {
        let mut v = verifier();
        let seq = seq_from_unix(NOW);
        let t1 = sign(&key(), src(), 51, &msg(), seq);
        let t2 = sign(&key(), src(), 51, &msg(), seq + 1);
        assert_eq!(v.verify(src(), 51, &msg(), &t2, NOW), Ok(()));
        assert_eq!(
            v.verify(src(), 51, &msg(), &t2, NOW),
            Err(AuthError::Replayed)
        );
        assert_eq!(
            v.verify(src(), 51, &msg(), &t1, NOW),
            Err(AuthError::Replayed)
        );
        // Another sender has its own count.
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t = sign(&key(), other, 51, &msg(), seq);
        assert_eq!(v.verify(other, 51, &msg(), &t, NOW), Ok(()));
        // A forged trailer moves nothing: the next genuine one still passes.
        let mut forged = sign(&key(), src(), 51, &msg(), seq + 100);
        forged[27] ^= 1;
        assert_eq!(
            v.verify(src(), 51, &msg(), &forged, NOW),
            Err(AuthError::BadHmac)
        );
        let t3 = sign(&key(), src(), 51, &msg(), seq + 2);
        assert_eq!(v.verify(src(), 51, &msg(), &t3, NOW), Ok(()));
    }

    #[test]
    fn stale_and_future_stamps_rejected() {
        let mut v = verifier();
        let old = sign(
            &key(),
            src(),
            51,
            &msg(),
            seq_from_unix(NOW - Duration::from_secs(6)),
        );
        assert_eq!(
            v.verify(src(), 51, &msg(), &old, NOW),
            Err(AuthError::Stale { skew_ms: 6000 })
        );
        let ahead = sign(
            &key(),
            src(),
            51,
            &msg(),
            seq_from_unix(NOW + Duration::from_secs(6)),
        );
        assert_eq!(
            v.verify(src(), 51, &msg(), &ahead, NOW),
            Err(AuthError::Stale { skew_ms: -6000 })
        );
        let edge = sign(
            &key(),
            src(),
            51,
            &msg(),
            seq_from_unix(NOW - Duration::from_secs(5)),
        );
        assert_eq!(v.verify(src(), 51, &msg(), &edge, NOW), Ok(()));
        // The skew to the millisecond, fraction of a second included.
        let half = sign(
            &key(),
            src(),
            51,
            &msg(),
            seq_from_unix(NOW - Duration::from_millis(5_200)),
        );
        assert_eq!(
            v.verify(src(), 51, &msg(), &half, NOW + Duration::from_secs(1)),
            Err(AuthError::Stale { skew_ms: 6_200 })
        );
        // Stale only with the right HMAC: a forged old advert is a forgery.
        let mut forged = old;
        forged[27] ^= 1;
        assert_eq!(
            v.verify(src(), 51, &msg(), &forged, NOW),
            Err(AuthError::BadHmac)
        );
    }

    #[test]
    fn a_sender_stepped_back_recovers_after_the_window() {
        let mut v = verifier();
        let t = sign(&key(), src(), 51, &msg(), seq_from_unix(NOW));
        assert_eq!(v.verify(src(), 51, &msg(), &t, NOW), Ok(()));
        // Ten seconds later the sender's clock reads 3 s behind what it sent before.
        let later = NOW + Duration::from_secs(10);
        let t = sign(
            &key(),
            src(),
            51,
            &msg(),
            seq_from_unix(NOW - Duration::from_secs(3) + Duration::from_secs(10)),
        );
        assert_eq!(v.verify(src(), 51, &msg(), &t, later), Ok(()));
    }

    #[test]
    fn missing_or_malformed_trailer_rejected() {
        let t = sign(&key(), src(), 51, &msg(), seq_from_unix(NOW));
        assert_eq!(
            verifier().verify(src(), 51, &msg(), &[], NOW),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            verifier().verify(src(), 51, &msg(), &t[..27], NOW),
            Err(AuthError::Malformed)
        );
        let mut bad = t;
        bad[0] = 2;
        assert_eq!(
            verifier().verify(src(), 51, &msg(), &bad, NOW),
            Err(AuthError::Malformed)
        );
        let mut bad = t;
        bad[3] = 1;
        assert_eq!(
            verifier().verify(src(), 51, &msg(), &bad, NOW),
            Err(AuthError::Malformed)
        );
        let mut bad = t;
        bad[1] = 2;
        assert_eq!(
            verifier().verify(src(), 51, &msg(), &bad, NOW),
            Err(AuthError::UnknownKey(2))
        );
    }

    #[test]
    fn sequence_grows_even_when_the_clock_does_not() {
        let mut s = Sequencer::new(Duration::from_secs(5));
        let a = s.next(NOW);
        assert_eq!(a, seq_from_unix(NOW));
        assert_eq!(s.next(NOW), a + 1);
        assert_eq!(s.next(NOW - Duration::from_secs(1)), a + 2);
        let b = s.next(NOW + Duration::from_millis(500));
        assert_eq!(b, seq_from_unix(NOW + Duration::from_millis(500)));
        assert_eq!(b >> 32, a >> 32);
        assert_eq!((b >> 16) & 0xffff, 0x8000);
        // Stepped back by more than the window: start again from the clock.
        let back = NOW - Duration::from_secs(60);
        assert_eq!(s.next(back), seq_from_unix(back));
    }

    #[test]
    fn window_follows_the_interval() {
        assert_eq!(
            window_for(Duration::from_millis(100)),
            Duration::from_secs(5)
        );
        assert_eq!(window_for(Duration::from_secs(3)), Duration::from_secs(9));
        assert_eq!(
            window_for(Duration::from_secs(40)),
            Duration::from_secs(120)
        );
    }

    #[test]
    fn key_file_rules() {
        assert_eq!(AuthKey::parse(b"0123456789abcdef\n").unwrap().len(), 16);
        assert_eq!(AuthKey::parse(b"0123456789abcdef\r\n").unwrap().len(), 16);
        assert!(matches!(
            AuthKey::parse(b"0123456789abcde\n"),
            Err(KeyError::TooShort { len: 15 })
        ));
        let hexed = AuthKey::parse(b"hex:000102030405060708090a0b0c0d0e0f\n").unwrap();
        assert_eq!(hexed, AuthKey::from_bytes((0..16).collect()).unwrap());
        assert!(matches!(AuthKey::parse(b"hex:0g"), Err(KeyError::BadHex)));
        assert!(matches!(AuthKey::parse(b"hex:000"), Err(KeyError::BadHex)));
        let path = std::env::temp_dir().join(format!("lb-vrrp-key-{}", std::process::id()));
        std::fs::write(&path, b"raw key bytes \x00\xff and more\n").unwrap();
        let loaded = AuthKey::load(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(loaded.unwrap().len(), 25);
        assert!(matches!(
            AuthKey::load(Path::new("/nonexistent/vrrp.key")),
            Err(KeyError::Read { .. })
        ));
        assert_eq!(format!("{:?}", key()), "AuthKey(32 bytes)");
    }
}
