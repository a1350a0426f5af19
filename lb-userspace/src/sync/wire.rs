//! Sync messages on the wire, and their checks. Pure: no socket, no clock of its own.
//!
//! One UDP datagram, at most [`MAX_MESSAGE`] bytes, all numbers big-endian:
//!
//! ```text
//! "LBSY" (4) | format = 1 (1) | kind (1) | sender: family 4|6 (1), address (16) |
//! sequence (8) | body | HMAC-SHA256 over everything before it (32)
//! ```
//!
//! The sequence is the sender's wall clock in microseconds, made strictly increasing:
//! a receiver takes a message only if its sequence is above the last one it took from
//! that sender (replay) and within [`WINDOW_US`] of its own clock (a capture replayed
//! after the receiver restarted, when it no longer knows the last sequence). A sender
//! that restarts goes on from its clock, above what it sent before, so no state has to
//! survive a restart; the hosts need synchronised clocks, as for keyed VRRP.
//!
//! Bodies by kind: a heartbeat (admin digest and entry count), admin entries (a part of
//! the whole state, or one change to acknowledge), an acknowledgement, flow pins and
//! unpins, persistence entries. Pins and persistence entries name their backend by
//! service and address (`BackendId`), never by a host's local backend id: one table of
//! backends per message, each entry an index into it. An IPv4 pin is 20 bytes, an IPv4
//! persistence entry 17.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use hmac::{Hmac, Mac};
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PersistKey};
use sha2::Sha256;

use crate::{
    admin::{AdminBackend, Version},
    config::BackendId,
    vrrp::auth::AuthKey,
};

pub const MAGIC: &[u8; 4] = b"LBSY";
pub const FORMAT: u8 = 1;
/// The largest message: one datagram on any Ethernet path, tunnels included.
pub const MAX_MESSAGE: usize = 1400;
pub const HEADER_LEN: usize = 4 + 1 + 1 + 17 + 8;
pub const TAG_LEN: usize = 32;
/// How far a message's sequence (its send time) may be from the receiver's clock.
pub const WINDOW_US: u64 = 30_000_000;
/// Room for the body of one message.
const BODY_MAX: usize = MAX_MESSAGE - HEADER_LEN - TAG_LEN;

const KIND_HEARTBEAT: u8 = 1;
const KIND_STATE: u8 = 2;
const KIND_UPDATE: u8 = 3;
const KIND_ACK: u8 = 4;
const KIND_PINS: u8 = 5;
const KIND_UNPINS: u8 = 6;
const KIND_PERSIST: u8 = 7;
const KIND_NAT: u8 = 8;

/// One admin entry: a backend and what operators set for it, with its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminEntry {
    pub id: BackendId,
    pub admin: AdminBackend,
}

/// A flow that must keep its backend, as one host tells another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub key: FlowKey,
    pub backend: BackendId,
    /// Milliseconds since the flow's last packet, on the sender.
    pub idle_ms: u32,
    /// The client sent FIN or RST.
    pub closing: bool,
}

/// A client address's backend under persistence (`persistence_timeout_s`), as one host
/// tells another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sticky {
    pub key: PersistKey,
    pub backend: BackendId,
    /// Milliseconds since the client's last connection (or packet), on the sender.
    pub idle_ms: u32,
}

/// A NAT flow, as one host tells another: both halves of the pair follow from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatPin {
    /// The client's key (client -> VIP:port).
    pub key: FlowKey,
    pub backend: BackendId,
    /// The backend's port and the LB's source port towards it.
    pub bport: u16,
    pub nport: u16,
    /// Milliseconds since the flow's last packet, on the sender.
    pub idle_ms: u32,
    /// `NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND | NAT_F_RST | NAT_F_ESTABLISHED` as seen
    /// by the sender.
    pub flags: u8,
    /// The MAC the client's frames come from (the same segment for every LB host).
    pub client_mac: [u8; 6],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// Sent every heartbeat interval: "I am here, and this is my admin state".
    Heartbeat {
        digest: [u8; 8],
        entries: u32,
    },
    /// A part of the sender's whole admin state; `last` ends it.
    State {
        entries: Vec<AdminEntry>,
        last: bool,
    },
    /// An operator's change, to apply and acknowledge with `Ack { change }`.
    Update {
        change: u64,
        entries: Vec<AdminEntry>,
    },
    /// The change is applied and saved.
    Ack {
        change: u64,
    },
    Pins(Vec<Pin>),
    Unpins(Vec<FlowKey>),
    /// Persistence entries (new or refreshed); they expire on the receiver by themselves.
    Persist(Vec<Sticky>),
    /// NAT flows to install (or refresh); a peer collects its copies by the same rules
    /// as its own flows, so there is no removal message.
    Nat(Vec<NatPin>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub sender: IpAddr,
    pub seq: u64,
    pub body: Body,
}

/// Why a datagram was dropped; `name` is its counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    #[error("larger than {MAX_MESSAGE} bytes")]
    Oversized,
    #[error("not from a configured peer")]
    UnknownSource,
    #[error("malformed")]
    Malformed,
    #[error("bad HMAC (another key, or altered)")]
    BadTag,
    #[error("sequence not above the last one accepted (replayed)")]
    Replayed,
    #[error("sent too long ago, or in the future: clock skew, or a replay")]
    Stale,
}

impl Dropped {
    pub fn name(self) -> &'static str {
        match self {
            Dropped::Oversized => "oversized",
            Dropped::UnknownSource => "unknown_source",
            Dropped::Malformed => "malformed",
            Dropped::BadTag => "bad_tag",
            Dropped::Replayed => "replayed",
            Dropped::Stale => "stale",
        }
    }
}

/// A message that does not fit in one datagram (a service name too long, say).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a sync message would be {0} bytes, more than {MAX_MESSAGE}")]
pub struct TooBig(pub usize);

fn mac(key: &AuthKey) -> Hmac<Sha256> {
    match <Hmac<Sha256> as Mac>::new_from_slice(key.bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

// ---- writing ------------------------------------------------------------------------

fn put_addr(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

fn put_name(out: &mut Vec<u8>, s: &str) {
    // Service names are validated short; a longer one makes the message `TooBig`.
    let bytes = s.as_bytes();
    out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(bytes);
}

fn put_backend(out: &mut Vec<u8>, id: &BackendId) {
    put_name(out, &id.service);
    put_addr(out, id.address);
}

fn put_entry(out: &mut Vec<u8>, e: &AdminEntry) {
    put_backend(out, &e.id);
    let mut flags = 0u8;
    if e.admin.disabled {
        flags |= 1;
    }
    if e.admin.weight.is_some() {
        flags |= 2;
    }
    out.push(flags);
    out.extend_from_slice(&e.admin.weight.unwrap_or(0).to_be_bytes());
    let v = e.admin.version.unwrap_or(Version {
        ms: 0,
        counter: 0,
        host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    out.extend_from_slice(&v.ms.to_be_bytes());
    out.extend_from_slice(&v.counter.to_be_bytes());
    put_addr(out, v.host);
}

fn put_key(out: &mut Vec<u8>, k: &FlowKey) {
    let n = if k.family == FAMILY_V6 { 16 } else { 4 };
    out.push(if k.family == FAMILY_V6 { 6 } else { 4 });
    out.extend_from_slice(&k.src[..n]);
    out.extend_from_slice(&k.dst[..n]);
    out.extend_from_slice(&u16::from_be(k.sport_be).to_be_bytes());
    out.extend_from_slice(&u16::from_be(k.dport_be).to_be_bytes());
    out.push(k.proto);
}

fn put_persist_key(out: &mut Vec<u8>, k: &PersistKey) {
    let n = if k.family == FAMILY_V6 { 16 } else { 4 };
    out.push(if k.family == FAMILY_V6 { 6 } else { 4 });
    out.extend_from_slice(&k.client[..n]);
    out.extend_from_slice(&k.vip[..n]);
    out.extend_from_slice(&u16::from_be(k.port_be).to_be_bytes());
    out.push(k.proto);
}

fn persist_key_len(k: &PersistKey) -> usize {
    if k.family == FAMILY_V6 { 36 } else { 12 }
}

/// A table of the backends `items` name, and each item's index into it (at most 255
/// backends: the caller's split sees to that).
fn backend_table<'a, T>(
    items: &'a [T],
    backend: impl Fn(&'a T) -> &'a BackendId,
) -> (Vec<&'a BackendId>, Vec<u8>) {
    let mut table: Vec<&BackendId> = Vec::new();
    let mut index: HashMap<&BackendId, u8> = HashMap::new();
    let refs = items
        .iter()
        .map(|item| {
            let b = backend(item);
            *index.entry(b).or_insert_with(|| {
                table.push(b);
                u8::try_from(table.len() - 1).unwrap_or(u8::MAX)
            })
        })
        .collect();
    (table, refs)
}

fn key_len(k: &FlowKey) -> usize {
    if k.family == FAMILY_V6 { 38 } else { 14 }
}

fn backend_len(id: &BackendId) -> usize {
    1 + id.service.len() + if id.address.is_ipv4() { 5 } else { 17 }
}

fn entry_len(e: &AdminEntry) -> usize {
    let host = e
        .admin
        .version
        .map_or(5, |v| if v.host.is_ipv4() { 5 } else { 17 });
    backend_len(&e.id) + 1 + 4 + 8 + 4 + host
}

fn put_body(out: &mut Vec<u8>, body: &Body) {
    match body {
        Body::Heartbeat { digest, entries } => {
            out.extend_from_slice(digest);
            out.extend_from_slice(&entries.to_be_bytes());
        }
        Body::State { entries, last } => {
            out.push(u8::from(*last));
            put_entries(out, entries);
        }
        Body::Update { change, entries } => {
            out.extend_from_slice(&change.to_be_bytes());
            put_entries(out, entries);
        }
        Body::Ack { change } => out.extend_from_slice(&change.to_be_bytes()),
        Body::Pins(pins) => {
            let mut table: Vec<&BackendId> = Vec::new();
            let mut index: HashMap<&BackendId, u8> = HashMap::new();
            let mut refs = Vec::with_capacity(pins.len());
            for p in pins {
                let i = *index.entry(&p.backend).or_insert_with(|| {
                    table.push(&p.backend);
                    u8::try_from(table.len() - 1).unwrap_or(u8::MAX)
                });
                refs.push(i);
            }
            out.push(u8::try_from(table.len()).unwrap_or(u8::MAX));
            for b in table {
                put_backend(out, b);
            }
            out.extend_from_slice(&u16::try_from(pins.len()).unwrap_or(u16::MAX).to_be_bytes());
            for (p, i) in pins.iter().zip(refs) {
                put_key(out, &p.key);
                out.push(i);
                out.extend_from_slice(&p.idle_ms.to_be_bytes());
                out.push(u8::from(p.closing));
            }
        }
        Body::Unpins(keys) => {
            out.extend_from_slice(&u16::try_from(keys.len()).unwrap_or(u16::MAX).to_be_bytes());
            for k in keys {
                put_key(out, k);
            }
        }
        Body::Persist(entries) => {
            let (table, refs) = backend_table(entries, |e| &e.backend);
            out.push(u8::try_from(table.len()).unwrap_or(u8::MAX));
            for b in table {
                put_backend(out, b);
            }
            out.extend_from_slice(
                &u16::try_from(entries.len())
                    .unwrap_or(u16::MAX)
                    .to_be_bytes(),
            );
            for (e, i) in entries.iter().zip(refs) {
                put_persist_key(out, &e.key);
                out.push(i);
                out.extend_from_slice(&e.idle_ms.to_be_bytes());
            }
        }
        Body::Nat(flows) => {
            let (table, refs) = backend_table(flows, |f| &f.backend);
            out.push(u8::try_from(table.len()).unwrap_or(u8::MAX));
            for b in table {
                put_backend(out, b);
            }
            out.extend_from_slice(&u16::try_from(flows.len()).unwrap_or(u16::MAX).to_be_bytes());
            for (f, i) in flows.iter().zip(refs) {
                put_key(out, &f.key);
                out.push(i);
                out.extend_from_slice(&f.bport.to_be_bytes());
                out.extend_from_slice(&f.nport.to_be_bytes());
                out.extend_from_slice(&f.idle_ms.to_be_bytes());
                out.push(f.flags);
                out.extend_from_slice(&f.client_mac);
            }
        }
    }
}

fn put_entries(out: &mut Vec<u8>, entries: &[AdminEntry]) {
    out.extend_from_slice(
        &u16::try_from(entries.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    for e in entries {
        put_entry(out, e);
    }
}

fn kind(body: &Body) -> u8 {
    match body {
        Body::Heartbeat { .. } => KIND_HEARTBEAT,
        Body::State { .. } => KIND_STATE,
        Body::Update { .. } => KIND_UPDATE,
        Body::Ack { .. } => KIND_ACK,
        Body::Pins(_) => KIND_PINS,
        Body::Unpins(_) => KIND_UNPINS,
        Body::Persist(_) => KIND_PERSIST,
        Body::Nat(_) => KIND_NAT,
    }
}

/// The datagram for `msg`, signed with `key`.
pub fn encode(msg: &Message, key: &AuthKey) -> Result<Vec<u8>, TooBig> {
    let mut out = Vec::with_capacity(MAX_MESSAGE);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.push(kind(&msg.body));
    match msg.sender {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.to_ipv6_mapped().octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&msg.seq.to_be_bytes());
    put_body(&mut out, &msg.body);
    let mut m = mac(key);
    m.update(&out);
    out.extend_from_slice(&m.finalize().into_bytes());
    if out.len() > MAX_MESSAGE {
        return Err(TooBig(out.len()));
    }
    Ok(out)
}

/// Splits `items` into runs whose encoded sizes, after `fixed` bytes, fit one body.
fn split<T: Clone>(items: &[T], fixed: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut cur: Vec<T> = Vec::new();
    let mut used = fixed;
    for item in items {
        let n = size(item);
        if !cur.is_empty() && used + n > BODY_MAX {
            out.push(std::mem::take(&mut cur));
            used = fixed;
        }
        used += n;
        cur.push(item.clone());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The whole admin state as `State` bodies, one datagram each (at least one, so an
/// empty state is still sent and ends).
pub fn state_bodies(entries: &[AdminEntry]) -> Vec<Body> {
    let parts = split(entries, 3, entry_len);
    let n = parts.len();
    if n == 0 {
        return vec![Body::State {
            entries: Vec::new(),
            last: true,
        }];
    }
    parts
        .into_iter()
        .enumerate()
        .map(|(i, entries)| Body::State {
            entries,
            last: i + 1 == n,
        })
        .collect()
}

/// Admin entries in runs that fit an `Update` body.
pub fn update_runs(entries: &[AdminEntry]) -> Vec<Vec<AdminEntry>> {
    split(entries, 10, entry_len)
}

/// Pins as `Pins` bodies, one datagram each; at most 255 backends per datagram.
pub fn pin_bodies(pins: &[Pin]) -> Vec<Body> {
    batches(pins, |p| &p.backend, |p| key_len(&p.key) + 6, Body::Pins)
}

/// Persistence entries as `Persist` bodies, one datagram each; at most 255 backends
/// per datagram.
pub fn persist_bodies(entries: &[Sticky]) -> Vec<Body> {
    batches(
        entries,
        |e| &e.backend,
        |e| persist_key_len(&e.key) + 5,
        Body::Persist,
    )
}

/// NAT flows as `Nat` bodies, one datagram each; at most 255 backends per datagram.
pub fn nat_bodies(flows: &[NatPin]) -> Vec<Body> {
    batches(flows, |f| &f.backend, |f| key_len(&f.key) + 16, Body::Nat)
}

/// Items that name a backend, cut into bodies that each fit one datagram: a body holds
/// a table of the backends it names (at most 255), then the items, `fixed` bytes each
/// plus their reference into the table.
fn batches<T: Clone>(
    items: &[T],
    backend: impl Fn(&T) -> &BackendId,
    fixed: impl Fn(&T) -> usize,
    body: impl Fn(Vec<T>) -> Body,
) -> Vec<Body> {
    let mut out = Vec::new();
    let mut cur: Vec<T> = Vec::new();
    let mut table: HashSet<&BackendId> = HashSet::new();
    let mut used = 3;
    for item in items {
        let b = backend(item);
        let known = table.contains(b);
        let mut n = fixed(item) + if known { 0 } else { backend_len(b) };
        if !cur.is_empty() && (used + n > BODY_MAX || (!known && table.len() == 255)) {
            out.push(body(std::mem::take(&mut cur)));
            table.clear();
            used = 3;
            n = fixed(item) + backend_len(b);
        }
        table.insert(b);
        used += n;
        cur.push(item.clone());
    }
    if !cur.is_empty() {
        out.push(body(cur));
    }
    out
}

/// Unpins as `Unpins` bodies, one datagram each.
pub fn unpin_bodies(keys: &[FlowKey]) -> Vec<Body> {
    split(keys, 2, key_len)
        .into_iter()
        .map(Body::Unpins)
        .collect()
}

// ---- reading ------------------------------------------------------------------------

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn addr(&mut self) -> Option<IpAddr> {
        match self.u8()? {
            4 => {
                let b: [u8; 4] = self.take(4)?.try_into().ok()?;
                Some(IpAddr::V4(Ipv4Addr::from(b)))
            }
            6 => {
                let b: [u8; 16] = self.take(16)?.try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(b)))
            }
            _ => None,
        }
    }

    fn name(&mut self) -> Option<String> {
        let n = usize::from(self.u8()?);
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }

    fn backend(&mut self) -> Option<BackendId> {
        Some(BackendId {
            service: self.name()?,
            address: self.addr()?,
        })
    }

    fn entry(&mut self) -> Option<AdminEntry> {
        let id = self.backend()?;
        let flags = self.u8()?;
        let weight = self.u32()?;
        let version = Version {
            ms: self.u64()?,
            counter: self.u32()?,
            host: self.addr()?,
        };
        Some(AdminEntry {
            id,
            admin: AdminBackend {
                disabled: flags & 1 != 0,
                weight: (flags & 2 != 0).then_some(weight),
                version: Some(version),
            },
        })
    }

    fn entries(&mut self) -> Option<Vec<AdminEntry>> {
        let n = self.u16()?;
        (0..n).map(|_| self.entry()).collect()
    }

    fn key(&mut self) -> Option<FlowKey> {
        let (n, family) = match self.u8()? {
            4 => (4, FAMILY_V4),
            6 => (16, FAMILY_V6),
            _ => return None,
        };
        let mut src = [0; 16];
        let mut dst = [0; 16];
        src[..n].copy_from_slice(self.take(n)?);
        dst[..n].copy_from_slice(self.take(n)?);
        Some(FlowKey {
            src,
            dst,
            sport_be: self.u16()?.to_be(),
            dport_be: self.u16()?.to_be(),
            proto: self.u8()?,
            family,
            _pad: [0; 2],
        })
    }

    fn persist_key(&mut self) -> Option<PersistKey> {
        let (n, family) = match self.u8()? {
            4 => (4, FAMILY_V4),
            6 => (16, FAMILY_V6),
            _ => return None,
        };
        let mut client = [0; 16];
        let mut vip = [0; 16];
        client[..n].copy_from_slice(self.take(n)?);
        vip[..n].copy_from_slice(self.take(n)?);
        Some(PersistKey {
            client,
            vip,
            port_be: self.u16()?.to_be(),
            proto: self.u8()?,
            family,
        })
    }

    fn body(&mut self, kind: u8) -> Option<Body> {
        let body = match kind {
            KIND_HEARTBEAT => Body::Heartbeat {
                digest: self.take(8)?.try_into().ok()?,
                entries: self.u32()?,
            },
            KIND_STATE => {
                let last = self.u8()? != 0;
                Body::State {
                    entries: self.entries()?,
                    last,
                }
            }
            KIND_UPDATE => Body::Update {
                change: self.u64()?,
                entries: self.entries()?,
            },
            KIND_ACK => Body::Ack {
                change: self.u64()?,
            },
            KIND_PINS => {
                let n = self.u8()?;
                let table: Vec<BackendId> =
                    (0..n).map(|_| self.backend()).collect::<Option<_>>()?;
                let count = self.u16()?;
                let mut pins = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    let key = self.key()?;
                    let backend = table.get(usize::from(self.u8()?))?.clone();
                    pins.push(Pin {
                        key,
                        backend,
                        idle_ms: self.u32()?,
                        closing: self.u8()? != 0,
                    });
                }
                Body::Pins(pins)
            }
            KIND_UNPINS => {
                let n = self.u16()?;
                Body::Unpins((0..n).map(|_| self.key()).collect::<Option<_>>()?)
            }
            KIND_PERSIST => {
                let n = self.u8()?;
                let table: Vec<BackendId> =
                    (0..n).map(|_| self.backend()).collect::<Option<_>>()?;
                let count = self.u16()?;
                // Each entry is at least 17 bytes: a count the datagram cannot hold is
                // not honoured with an allocation.
                let mut entries = Vec::with_capacity(usize::from(count).min(self.0.len() / 17));
                for _ in 0..count {
                    let key = self.persist_key()?;
                    let backend = table.get(usize::from(self.u8()?))?.clone();
                    entries.push(Sticky {
                        key,
                        backend,
                        idle_ms: self.u32()?,
                    });
                }
                Body::Persist(entries)
            }
            KIND_NAT => {
                let n = self.u8()?;
                let table: Vec<BackendId> =
                    (0..n).map(|_| self.backend()).collect::<Option<_>>()?;
                let count = self.u16()?;
                // Each flow is at least 30 bytes: a count the datagram cannot hold is not
                // honoured with an allocation.
                let mut flows = Vec::with_capacity(usize::from(count).min(self.0.len() / 30));
                for _ in 0..count {
                    let key = self.key()?;
                    let backend = table.get(usize::from(self.u8()?))?.clone();
                    flows.push(NatPin {
                        key,
                        backend,
                        bport: self.u16()?,
                        nport: self.u16()?,
                        idle_ms: self.u32()?,
                        flags: self.u8()?,
                        client_mac: self.take(6)?.try_into().ok()?,
                    });
                }
                Body::Nat(flows)
            }
            _ => return None,
        };
        // Trailing bytes: not a message we wrote.
        self.0.is_empty().then_some(body)
    }
}

/// Checks received datagrams: size, source, tag, freshness and order per sender.
pub struct Verifier {
    key: AuthKey,
    peers: Vec<IpAddr>,
    last: HashMap<IpAddr, u64>,
}

impl Verifier {
    pub fn new(key: AuthKey, peers: Vec<IpAddr>) -> Self {
        Self {
            key,
            peers,
            last: HashMap::new(),
        }
    }

    /// The message in `datagram` from `src` (the UDP source address), received at
    /// `now_us` (wall clock, microseconds since the epoch); `len` is the datagram's
    /// full length, which may exceed what the buffer held.
    pub fn open(
        &mut self,
        src: IpAddr,
        datagram: &[u8],
        len: usize,
        now_us: u64,
    ) -> Result<Message, Dropped> {
        if len > MAX_MESSAGE || datagram.len() > MAX_MESSAGE {
            return Err(Dropped::Oversized);
        }
        let src = canonical(src);
        if !self.peers.contains(&src) {
            return Err(Dropped::UnknownSource);
        }
        if datagram.len() < HEADER_LEN + TAG_LEN || &datagram[..4] != MAGIC || datagram[4] != FORMAT
        {
            return Err(Dropped::Malformed);
        }
        let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
        let mut m = mac(&self.key);
        m.update(signed);
        m.verify_slice(tag).map_err(|_| Dropped::BadTag)?;
        let mut r = Reader(&signed[5..]);
        let kind = r.u8().ok_or(Dropped::Malformed)?;
        let family = r.u8().ok_or(Dropped::Malformed)?;
        let raw: [u8; 16] = r
            .take(16)
            .and_then(|b| b.try_into().ok())
            .ok_or(Dropped::Malformed)?;
        let v6 = Ipv6Addr::from(raw);
        let sender = match family {
            4 => IpAddr::V4(v6.to_ipv4_mapped().ok_or(Dropped::Malformed)?),
            6 => IpAddr::V6(v6),
            _ => return Err(Dropped::Malformed),
        };
        // An authentic message relayed from another address is not this peer's.
        if sender != src {
            return Err(Dropped::Malformed);
        }
        let seq = r.u64().ok_or(Dropped::Malformed)?;
        if seq.abs_diff(now_us) > WINDOW_US {
            return Err(Dropped::Stale);
        }
        if self.last.get(&src).is_some_and(|last| seq <= *last) {
            return Err(Dropped::Replayed);
        }
        let body = r.body(kind).ok_or(Dropped::Malformed)?;
        self.last.insert(src, seq);
        Ok(Message { sender, seq, body })
    }
}

/// An IPv4 peer seen through an IPv6 socket is still that IPv4 peer.
pub fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// Hands out strictly increasing sequences from the wall clock (microseconds).
#[derive(Clone, Debug, Default)]
pub struct Sequencer {
    last: u64,
}

impl Sequencer {
    pub fn next(&mut self, now_us: u64) -> u64 {
        self.last = now_us.max(self.last.saturating_add(1));
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000_000;

    fn key() -> AuthKey {
        AuthKey::from_bytes(b"0123456789abcdef-sync".to_vec()).unwrap()
    }

    fn peer() -> IpAddr {
        "10.0.0.3".parse().unwrap()
    }

    fn verifier() -> Verifier {
        Verifier::new(key(), vec![peer(), "fd00::3".parse().unwrap()])
    }

    fn id(service: &str, address: &str) -> BackendId {
        BackendId {
            service: service.into(),
            address: address.parse().unwrap(),
        }
    }

    fn entry(address: &str, disabled: bool, weight: Option<u32>) -> AdminEntry {
        AdminEntry {
            id: id("web", address),
            admin: AdminBackend {
                disabled,
                weight,
                version: Some(Version {
                    ms: 1_700_000_000_123,
                    counter: 3,
                    host: "10.0.0.3".parse().unwrap(),
                }),
            },
        }
    }

    fn flow(port: u16, v6: bool) -> FlowKey {
        let mut src = [0; 16];
        let mut dst = [0; 16];
        if v6 {
            src = "fd00::4".parse::<Ipv6Addr>().unwrap().octets();
            dst = "fd00::100".parse::<Ipv6Addr>().unwrap().octets();
        } else {
            src[..4].copy_from_slice(&[10, 0, 0, 4]);
            dst[..4].copy_from_slice(&[10, 0, 0, 100]);
        }
        FlowKey {
            src,
            dst,
            sport_be: port.to_be(),
            dport_be: 80u16.to_be(),
            proto: 6,
            family: if v6 { FAMILY_V6 } else { FAMILY_V4 },
            _pad: [0; 2],
        }
    }

    fn msg(seq: u64, body: Body) -> Message {
        Message {
            sender: peer(),
            seq,
            body,
        }
    }

    fn roundtrip(body: Body) {
        let m = msg(NOW, body);
        let bytes = encode(&m, &key()).unwrap();
        assert!(bytes.len() <= MAX_MESSAGE);
        assert_eq!(verifier().open(peer(), &bytes, bytes.len(), NOW), Ok(m));
    }

    #[test]
    fn every_kind_round_trips() {
        roundtrip(Body::Heartbeat {
            digest: [1, 2, 3, 4, 5, 6, 7, 8],
            entries: 2,
        });
        roundtrip(Body::State {
            entries: vec![
                entry("10.0.0.21", true, None),
                entry("fd00::21", false, Some(7)),
            ],
            last: true,
        });
        roundtrip(Body::Update {
            change: 99,
            entries: vec![entry("10.0.0.22", false, Some(0))],
        });
        roundtrip(Body::Ack { change: 99 });
        roundtrip(Body::Nat(vec![
            NatPin {
                key: flow(40000, false),
                backend: id("api", "10.0.1.5"),
                bport: 8443,
                nport: 2001,
                idle_ms: 12,
                flags: 3,
                client_mac: [2, 0, 0, 0, 0, 7],
            },
            NatPin {
                key: flow(40001, true),
                backend: id("api6", "2001:db8:1::5"),
                bport: 443,
                nport: 65535,
                idle_ms: u32::MAX,
                flags: 0,
                client_mac: [2, 0, 0, 0, 0, 8],
            },
        ]));
        roundtrip(Body::Pins(vec![
            Pin {
                key: flow(1000, false),
                backend: id("web", "10.0.0.21"),
                idle_ms: 1234,
                closing: false,
            },
            Pin {
                key: flow(1001, true),
                backend: id("web6", "fd00::21"),
                idle_ms: 0,
                closing: true,
            },
            Pin {
                key: flow(1002, false),
                backend: id("web", "10.0.0.21"),
                idle_ms: 5,
                closing: false,
            },
        ]));
        roundtrip(Body::Unpins(vec![flow(1, false), flow(2, true)]));
        roundtrip(Body::Persist(vec![
            sticky(1, false, "10.0.0.21", 1500),
            sticky(2, true, "fd00::21", 0),
            sticky(3, false, "10.0.0.21", u32::MAX),
        ]));
    }

    fn sticky(client: u8, v6: bool, backend: &str, idle_ms: u32) -> Sticky {
        let f = flow(1000, v6);
        let mut key = PersistKey::of_flow(&f);
        key.client[if v6 { 15 } else { 3 }] = client;
        Sticky {
            key,
            backend: id(if v6 { "web6" } else { "web" }, backend),
            idle_ms,
        }
    }

    /// Hostile persistence bodies, validly signed: a backend index beyond the table, an
    /// unknown family, a count larger than the entries, trailing bytes. All malformed,
    /// none panics or allocates for the count claimed.
    #[test]
    fn hostile_persistence_bodies_are_malformed() {
        let signed = |body: &[u8], seq: u64| {
            let mut out = Vec::new();
            out.extend_from_slice(MAGIC);
            out.push(FORMAT);
            out.push(KIND_PERSIST);
            out.push(4);
            out.extend_from_slice(&Ipv4Addr::new(10, 0, 0, 3).to_ipv6_mapped().octets());
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(body);
            let mut m = mac(&key());
            m.update(&out);
            out.extend_from_slice(&m.finalize().into_bytes());
            out
        };
        let good = {
            let bytes = encode(
                &msg(NOW, Body::Persist(vec![sticky(1, false, "10.0.0.21", 7)])),
                &key(),
            )
            .unwrap();
            bytes[HEADER_LEN..bytes.len() - TAG_LEN].to_vec()
        };
        // The good body: 1 backend (1 + 3 + 5 bytes), 1 entry.
        let mut v = verifier();
        let ok = signed(&good, NOW);
        assert!(v.open(peer(), &ok, ok.len(), NOW).is_ok());
        let table_len = 1 + 1 + 3 + 5;
        let mut bad_index = good.clone();
        bad_index[table_len + 2 + 12] = 9;
        let mut bad_family = good.clone();
        bad_family[table_len + 2] = 5;
        let mut big_count = good.clone();
        big_count[table_len..table_len + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        let mut trailing = good.clone();
        trailing.push(0);
        let empty_table_ref = {
            let mut b = vec![0u8];
            b.extend_from_slice(&1u16.to_be_bytes());
            b.extend_from_slice(&good[table_len + 2..]);
            b
        };
        for (i, body) in [bad_index, bad_family, big_count, trailing, empty_table_ref]
            .iter()
            .enumerate()
        {
            let d = signed(body, NOW + 1 + i as u64);
            assert_eq!(
                verifier().open(peer(), &d, d.len(), NOW),
                Err(Dropped::Malformed),
                "case {i}"
            );
        }
    }

    #[test]
    fn persistence_batches_fit_one_datagram_each_and_cost_17_bytes() {
        let entries: Vec<Sticky> = (0..1000u32)
            .map(|i| {
                let mut s = sticky(
                    (i % 250) as u8,
                    i % 3 == 0,
                    if i % 3 == 0 { "fd00::21" } else { "10.0.0.21" },
                    i,
                );
                s.backend = id("web", &format!("10.0.{}.{}", i % 300 / 100, i % 100));
                s.key.client[4] = (i / 250) as u8;
                s
            })
            .collect();
        let mut back = Vec::new();
        for (i, body) in persist_bodies(&entries).iter().enumerate() {
            let bytes = encode(&msg(NOW + i as u64, body.clone()), &key()).unwrap();
            assert!(bytes.len() <= MAX_MESSAGE, "{}", bytes.len());
            let Body::Persist(p) = body else { panic!() };
            back.extend(p.iter().cloned());
        }
        assert_eq!(back, entries);
        let one = |n: u8| {
            let e: Vec<Sticky> = (0..n).map(|i| sticky(i, false, "10.0.0.21", 0)).collect();
            encode(&msg(NOW, Body::Persist(e)), &key()).unwrap().len()
        };
        assert_eq!(one(11) - one(10), 17);
    }

    #[test]
    fn any_altered_byte_or_another_key_is_a_bad_tag() {
        let bytes = encode(&msg(NOW, Body::Ack { change: 1 }), &key()).unwrap();
        for i in 5..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert_eq!(
                verifier().open(peer(), &b, b.len(), NOW),
                Err(Dropped::BadTag),
                "byte {i}"
            );
        }
        let other = AuthKey::from_bytes(b"another key, 16+ bytes".to_vec()).unwrap();
        let forged = encode(&msg(NOW, Body::Ack { change: 1 }), &other).unwrap();
        assert_eq!(
            verifier().open(peer(), &forged, forged.len(), NOW),
            Err(Dropped::BadTag)
        );
    }

    #[test]
    fn replays_and_stale_messages_are_dropped_per_sender() {
        let mut v = verifier();
        let first = encode(&msg(NOW, Body::Ack { change: 1 }), &key()).unwrap();
        assert!(v.open(peer(), &first, first.len(), NOW).is_ok());
        assert_eq!(
            v.open(peer(), &first, first.len(), NOW),
            Err(Dropped::Replayed)
        );
        let older = encode(&msg(NOW - 1, Body::Ack { change: 2 }), &key()).unwrap();
        assert_eq!(
            v.open(peer(), &older, older.len(), NOW),
            Err(Dropped::Replayed)
        );
        let next = encode(&msg(NOW + 1, Body::Ack { change: 3 }), &key()).unwrap();
        assert!(v.open(peer(), &next, next.len(), NOW).is_ok());
        // Another sender has its own sequence.
        let v6 = Message {
            sender: "fd00::3".parse().unwrap(),
            ..msg(NOW - 5, Body::Ack { change: 4 })
        };
        let b = encode(&v6, &key()).unwrap();
        assert!(v.open(v6.sender, &b, b.len(), NOW).is_ok());
        // A receiver that restarted knows no last sequence: the window stops old captures.
        let mut fresh = verifier();
        let old = encode(&msg(NOW - WINDOW_US - 1, Body::Ack { change: 5 }), &key()).unwrap();
        assert_eq!(
            fresh.open(peer(), &old, old.len(), NOW),
            Err(Dropped::Stale)
        );
        let ahead = encode(&msg(NOW + WINDOW_US + 1, Body::Ack { change: 5 }), &key()).unwrap();
        assert_eq!(
            fresh.open(peer(), &ahead, ahead.len(), NOW),
            Err(Dropped::Stale)
        );
        // A sender that restarted goes on from its clock, above what it sent before.
        let mut s = Sequencer::default();
        let a = s.next(NOW);
        assert!(s.next(NOW) > a, "within one microsecond");
        assert!(Sequencer::default().next(NOW + 10) > a);
    }

    #[test]
    fn oversized_unknown_source_and_garbage_are_dropped() {
        let bytes = encode(&msg(NOW, Body::Ack { change: 1 }), &key()).unwrap();
        let mut v = verifier();
        assert_eq!(
            v.open(peer(), &[0; 1500], 1500, NOW),
            Err(Dropped::Oversized)
        );
        // The buffer held part of a larger datagram.
        assert_eq!(
            v.open(peer(), &bytes, MAX_MESSAGE + 1, NOW),
            Err(Dropped::Oversized)
        );
        let stranger: IpAddr = "10.0.0.4".parse().unwrap();
        assert_eq!(
            v.open(stranger, &bytes, bytes.len(), NOW),
            Err(Dropped::UnknownSource)
        );
        assert_eq!(v.open(peer(), b"hello", 5, NOW), Err(Dropped::Malformed));
        // Authentic, but sent from another peer's address than it names.
        let b = encode(
            &Message {
                sender: "fd00::3".parse().unwrap(),
                ..msg(NOW, Body::Ack { change: 1 })
            },
            &key(),
        )
        .unwrap();
        assert_eq!(v.open(peer(), &b, b.len(), NOW), Err(Dropped::Malformed));
        // Signed, but the body is cut short: malformed, and it does not use up the sequence.
        let mut cut = encode(&msg(NOW, Body::Ack { change: 1 }), &key()).unwrap();
        cut.truncate(cut.len() - TAG_LEN - 3);
        let mut m = mac(&key());
        m.update(&cut);
        cut.extend_from_slice(&m.finalize().into_bytes());
        assert_eq!(
            v.open(peer(), &cut, cut.len(), NOW),
            Err(Dropped::Malformed)
        );
        assert!(v.open(peer(), &bytes, bytes.len(), NOW).is_ok());
        // An IPv4 peer seen through a dual-stack socket.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 3).to_ipv6_mapped());
        assert_eq!(canonical(mapped), peer());
    }

    #[test]
    fn nat_batches_fit_one_datagram_each() {
        let flows: Vec<NatPin> = (0..1000u16)
            .map(|i| NatPin {
                key: flow(i, i % 3 == 0),
                backend: id("api", &format!("10.0.{}.{}", i % 300 / 250, i % 250)),
                bport: 443,
                nport: 1024 + i,
                idle_ms: 1,
                flags: 0,
                client_mac: [2, 0, 0, 0, 0, 1],
            })
            .collect();
        let bodies = nat_bodies(&flows);
        let mut back = Vec::new();
        for body in bodies {
            let bytes = encode(&msg(NOW, body.clone()), &key()).expect("fits");
            assert!(bytes.len() <= MAX_MESSAGE);
            let Body::Nat(f) = body else { panic!() };
            back.extend(f);
        }
        assert_eq!(back, flows);
    }

    #[test]
    fn batches_fit_one_datagram_each() {
        let pins: Vec<Pin> = (0..1000u16)
            .map(|i| Pin {
                key: flow(i, i % 3 == 0),
                backend: id("web", &format!("10.0.{}.{}", i % 300 / 100, i % 100)),
                idle_ms: u32::from(i),
                closing: false,
            })
            .collect();
        let bodies = pin_bodies(&pins);
        let mut back = Vec::new();
        for (i, body) in bodies.iter().enumerate() {
            let m = msg(NOW + i as u64, body.clone());
            let bytes = encode(&m, &key()).unwrap();
            assert!(bytes.len() <= MAX_MESSAGE, "{}", bytes.len());
            let Body::Pins(p) = body else { panic!() };
            back.extend(p.iter().cloned());
        }
        assert_eq!(back, pins);
        let entries: Vec<AdminEntry> = (0..200)
            .map(|i| {
                entry(
                    &format!("10.1.{}.{}", i / 100, i % 100),
                    i % 2 == 0,
                    Some(i),
                )
            })
            .collect();
        let bodies = state_bodies(&entries);
        assert!(bodies.len() > 1);
        assert!(matches!(
            bodies.last(),
            Some(Body::State { last: true, .. })
        ));
        for b in &bodies {
            assert!(encode(&msg(NOW, b.clone()), &key()).unwrap().len() <= MAX_MESSAGE);
        }
        assert_eq!(state_bodies(&[]).len(), 1);
        for run in update_runs(&entries) {
            let b = Body::Update {
                change: 1,
                entries: run,
            };
            assert!(encode(&msg(NOW, b), &key()).unwrap().len() <= MAX_MESSAGE);
        }
        let keys: Vec<FlowKey> = (0..500).map(|i| flow(i, i % 2 == 0)).collect();
        let n: usize = unpin_bodies(&keys)
            .iter()
            .map(|b| {
                assert!(encode(&msg(NOW, b.clone()), &key()).unwrap().len() <= MAX_MESSAGE);
                match b {
                    Body::Unpins(k) => k.len(),
                    _ => 0,
                }
            })
            .sum();
        assert_eq!(n, 500);
    }

    #[test]
    fn an_ipv4_pin_costs_twenty_bytes() {
        let one = |n: u16| {
            let pins: Vec<Pin> = (0..n)
                .map(|i| Pin {
                    key: flow(i, false),
                    backend: id("web", "10.0.0.21"),
                    idle_ms: 0,
                    closing: false,
                })
                .collect();
            encode(&msg(NOW, Body::Pins(pins)), &key()).unwrap().len()
        };
        assert_eq!(one(11) - one(10), 20);
    }
}
