//! The frames a new master sends so that hosts and switches move a VIP to its MAC:
//! a gratuitous ARP (request form, RFC 5227's announcement) for an IPv4 VIP and an
//! unsolicited neighbour advertisement (RFC 4861 §7.2.6) for an IPv6 VIP. Pure; the
//! speaker sends them on an `AF_PACKET` socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::packet::{add, fold};

pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// ff02::1 on Ethernet (RFC 2464 §7).
pub const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Shortest Ethernet frame without its FCS.
const ETH_MIN: usize = 60;
const ICMPV6: u8 = 58;
const NEIGHBOUR_ADVERT: u8 = 136;
const FLAG_OVERRIDE: u8 = 0x20;
const OPT_TARGET_LL: u8 = 2;

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_MIN + 26);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// "Who has VIP? tell VIP" from `mac`, to broadcast: sender = target = the VIP, so
/// every cache that knows the VIP takes the new MAC and none asks back.
pub fn gratuitous_arp(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet(BROADCAST, mac, ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet, IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[0; 6]); // target MAC: unknown, by definition
    f.extend_from_slice(&vip.octets());
    f.resize(ETH_MIN, 0);
    f
}

/// An unsolicited neighbour advertisement for `vip` from `mac`, to all nodes, with the
/// override flag (replace cached MACs) and the target link-layer address option.
pub fn unsolicited_na(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[NEIGHBOUR_ADVERT, 0, 0, 0, FLAG_OVERRIDE, 0, 0, 0]);
    icmp.extend_from_slice(&vip.octets());
    icmp.extend_from_slice(&[OPT_TARGET_LL, 1]);
    icmp.extend_from_slice(&mac);
    let mut sum = add(0, &vip.octets());
    sum = add(sum, &ALL_NODES.octets());
    sum += icmp.len() as u64 + u64::from(ICMPV6);
    let csum = fold(add(sum, &icmp));
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());

    let mut f = ethernet(ALL_NODES_MAC, mac, ETH_P_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.push(ICMPV6);
    f.push(255); // hop limit: receivers drop ND that crossed a router
    // The VIP is the source: the address whose owner changes.
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&ALL_NODES.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The announcement for one VIP, whatever its family.
pub fn frame(mac: [u8; 6], vip: IpAddr) -> Vec<u8> {
    match vip {
        IpAddr::V4(v) => gratuitous_arp(mac, v),
        IpAddr::V6(v) => unsolicited_na(mac, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

    #[test]
    fn gratuitous_arp_layout() {
        let f = gratuitous_arp(MAC, Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(f.len(), 60);
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x06,
            0, 1, 0x08, 0, 6, 4, 0, 1,
            0x02, 0, 0, 0, 0, 0x0a, 192, 0, 2, 10,
            0, 0, 0, 0, 0, 0, 192, 0, 2, 10,
        ];
        assert_eq!(f[..42], want);
        assert!(f[42..].iter().all(|b| *b == 0));
    }

    #[test]
    fn neighbour_advert_layout_and_checksum() {
        let vip: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let f = unsolicited_na(MAC, vip);
        assert_eq!(f.len(), 14 + 40 + 32);
        assert_eq!(f[..6], ALL_NODES_MAC);
        assert_eq!(f[6..12], MAC);
        assert_eq!(f[12..14], [0x86, 0xdd]);
        let ip = &f[14..54];
        assert_eq!(ip[4..8], [0, 32, 58, 255]);
        assert_eq!(ip[8..24], vip.octets());
        assert_eq!(ip[24..40], ALL_NODES.octets());
        let icmp = &f[54..];
        assert_eq!(icmp[0], 136);
        assert_eq!(icmp[4], 0x20, "override set, router and solicited clear");
        assert_eq!(icmp[8..24], vip.octets());
        assert_eq!(icmp[24..32], [2, 1, 0x02, 0, 0, 0, 0, 0x0a]);
        // Summed with its pseudo-header, a correct checksum gives 0.
        let mut sum = add(0, &ip[8..40]);
        sum += 32 + 58;
        assert_eq!(fold(add(sum, icmp)), 0);
    }

    #[test]
    fn frame_picks_the_family() {
        assert_eq!(
            frame(MAC, "192.0.2.1".parse().unwrap())[12..14],
            [0x08, 0x06]
        );
        assert_eq!(
            frame(MAC, "2001:db8::1".parse().unwrap())[12..14],
            [0x86, 0xdd]
        );
    }
}
