//! Frames built field by field for the BPF_PROG_TEST_RUN fixtures and the benchmark.
//! Written independently of the XDP program (own checksums, own layouts), so that a
//! fixture's expected bytes are not derived from the code under test.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub const BROADCAST: [u8; 6] = [0xff; 6];

/// An Ethernet frame: addresses, optional 802.1Q tag, type, payload.
pub fn ethernet(
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    ether_type: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(id) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&(id & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// RFC 1071 one's-complement sum, folded.
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        let mut words = chunk.chunks(2);
        for w in &mut words {
            let hi = w[0] as u32;
            let lo = w.get(1).copied().unwrap_or(0) as u32;
            sum += (hi << 8) | lo;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 header fields a fixture may want to get wrong.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ihl: u8,
    pub version: u8,
    /// Flags and fragment offset, as on the wire (0x2000 = more fragments).
    pub frag: u16,
    /// Overrides the total length.
    pub total_len: Option<u16>,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            ihl: 5,
            version: 4,
            frag: 0x4000,
            total_len: None,
        }
    }

    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let hlen = self.ihl as usize * 4;
        let mut h = vec![0u8; hlen.max(20)];
        h[0] = (self.version << 4) | (self.ihl & 0x0f);
        let total = self.total_len.unwrap_or((h.len() + payload.len()) as u16);
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        h[6..8].copy_from_slice(&self.frag.to_be_bytes());
        h[8] = 64;
        h[9] = self.proto;
        h[12..16].copy_from_slice(&self.src.octets());
        h[16..20].copy_from_slice(&self.dst.octets());
        let c = checksum(&[&h]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_hdr: u8, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[6] = next_hdr;
    h[7] = hop_limit;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// A TCP segment with a correct checksum for the given addresses.
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1000u32.to_be_bytes());
    t[8..12].copy_from_slice(&(if flags & ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(payload);
    let c = l4_checksum(src, dst, 6, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let len = segment.len() as u32;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let pseudo = [
                &s.octets()[..],
                &d.octets()[..],
                &[0, proto],
                &(len as u16).to_be_bytes()[..],
            ]
            .concat();
            checksum(&[&pseudo, segment])
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let pseudo = [
                &s.octets()[..],
                &d.octets()[..],
                &len.to_be_bytes()[..],
                &[0, 0, 0, proto],
            ]
            .concat();
            checksum(&[&pseudo, segment])
        }
        _ => 0,
    }
}

/// A whole TCP frame between two hosts of the same family.
pub fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    vlan: Option<u16>,
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    flags: u8,
) -> Vec<u8> {
    let seg = tcp(src.0, dst.0, src.1, dst.1, flags, b"");
    match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet(
            dst_mac,
            src_mac,
            vlan,
            ETH_P_IP,
            &Ipv4::new(s, d, 6).build(&seg),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            ethernet(dst_mac, src_mac, vlan, ETH_P_IPV6, &ipv6(s, d, 6, 64, &seg))
        }
        _ => panic!("mixed address families"),
    }
}

/// ARP for Ethernet/IPv4: operation 1 (request) or 2 (reply).
pub fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&1u16.to_be_bytes());
    a.extend_from_slice(&ETH_P_IP.to_be_bytes());
    a.push(6);
    a.push(4);
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    a
}

/// The solicited-node multicast address of `target` (RFC 4291 2.7.1).
pub fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let t = target.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | t[13] as u16,
        u16::from_be_bytes([t[14], t[15]]),
    )
}

/// ICMPv6 neighbour solicitation (type 135), with a source link-layer option if given.
pub fn neighbour_solicitation(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    source_mac: Option<[u8; 6]>,
) -> Vec<u8> {
    let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    if let Some(mac) = source_mac {
        m.extend_from_slice(&[1, 1]);
        m.extend_from_slice(&mac);
    }
    let c = l4_checksum(IpAddr::V6(src), IpAddr::V6(dst), 58, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6(src, dst, 58, 255, &m)
}

/// ICMPv6 neighbour advertisement (type 136), solicited and override, with the
/// target link-layer option.
pub fn neighbour_advertisement(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    target_mac: [u8; 6],
) -> Vec<u8> {
    let mut m = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[2, 1]);
    m.extend_from_slice(&target_mac);
    let c = l4_checksum(IpAddr::V6(src), IpAddr::V6(dst), 58, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6(src, dst, 58, 255, &m)
}

/// The first bytes of a packet as an ICMP error quotes it: the IP header and the first
/// 8 bytes of TCP (the ports, the sequence number), lengths as in the original.
pub fn quote(src: (IpAddr, u16), dst: (IpAddr, u16), flags: u8) -> Vec<u8> {
    let seg = tcp(src.0, dst.0, src.1, dst.1, flags, &[0; 1400]);
    match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ipv4::new(s, d, 6).build(&seg)[..28].to_vec(),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, 6, 64, &seg)[..48].to_vec(),
        _ => panic!("mixed address families"),
    }
}

/// ICMP destination unreachable, fragmentation needed (type 3 code 4), with the next-hop
/// MTU, quoting `quoted`, as a router sends it.
pub fn icmp4_frag_needed(src: Ipv4Addr, dst: Ipv4Addr, mtu: u16, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![3, 4, 0, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(quoted);
    let c = checksum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    Ipv4::new(src, dst, 1).build(&m)
}

/// ICMPv6 packet too big (type 2), quoting `quoted`.
pub fn icmp6_packet_too_big(src: Ipv6Addr, dst: Ipv6Addr, mtu: u32, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![2, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(quoted);
    let c = l4_checksum(IpAddr::V6(src), IpAddr::V6(dst), 58, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6(src, dst, 58, 64, &m)
}

/// ICMP / ICMPv6 echo request (type 8 / 128).
pub fn echo_request(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut m = vec![8, 0, 0, 0, 0, 1, 0, 1];
            let c = checksum(&[&m]);
            m[2..4].copy_from_slice(&c.to_be_bytes());
            Ipv4::new(s, d, 1).build(&m)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut m = vec![128, 0, 0, 0, 0, 1, 0, 1];
            let c = l4_checksum(src, dst, 58, &m);
            m[2..4].copy_from_slice(&c.to_be_bytes());
            ipv6(s, d, 58, 64, &m)
        }
        _ => panic!("mixed address families"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies_to_zero() {
        let h = Ipv4::new(Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2), 6).build(&[]);
        assert_eq!(checksum(&[&h]), 0);
    }

    #[test]
    fn solicited_node_address() {
        let a: Ipv6Addr = "2001:db8::1:2345".parse().unwrap();
        assert_eq!(
            solicited_node(a),
            "ff02::1:ff01:2345".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn known_tcp_checksum() {
        // A segment that carries its own checksum sums to zero over the pseudo-header.
        let s = tcp(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            1,
            2,
            SYN,
            b"",
        );
        let again = l4_checksum(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            6,
            &s,
        );
        assert_eq!(again, 0, "a segment with its checksum sums to zero");
    }
}
