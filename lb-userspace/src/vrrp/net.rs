//! The kernel side: a raw IP socket (protocol 112) for adverts, an `AF_PACKET` socket
//! for the announcements, and the interface's own addresses. Everything that decides
//! lives elsewhere; this only moves bytes and reads the IP header's facts (source,
//! destination, TTL / hop limit).
//!
//! IPv4: the kernel builds the IP header (TTL 255, TOS 0xc0 as keepalived sends);
//! each send names its source and interface (`IP_PKTINFO`) so the checksum's
//! pseudo-header is the one on the wire. Received packets come with their IP header.
//! IPv6: hop limit 255 both ways; `IPV6_RECVHOPLIMIT` and `IPV6_RECVPKTINFO` give the
//! hop limit and the destination with each packet; the source is the interface's
//! link-local address. We compute and check the checksum ourselves (no
//! `IPV6_CHECKSUM`), so a bad one is counted rather than silently dropped.
//!
//! The sockets are bound to the interface (`SO_BINDTODEVICE`), join the group on it
//! only in multicast mode, receive no other group (`IP_MULTICAST_ALL` off) and do not
//! loop their own multicast back.

use std::{
    ffi::CStr,
    io,
    mem::{size_of, size_of_val},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use libc::{c_int, c_void, socklen_t};
use tokio::io::{Interest, unix::AsyncFd};

use super::packet::{Envelope, GROUP_V4, GROUP_V6, IPPROTO_VRRP, TTL};

/// Network control (DSCP CS6), as keepalived marks adverts.
const TOS_NETWORK_CONTROL: c_int = 0xc0;

/// A socket call that failed, and what it was for.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct NetError {
    pub what: String,
    #[source]
    pub source: io::Error,
}

impl NetError {
    fn last(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            source: io::Error::last_os_error(),
        }
    }
}

fn check(r: c_int, what: impl FnOnce() -> String) -> Result<c_int, NetError> {
    if r < 0 {
        Err(NetError::last(what()))
    } else {
        Ok(r)
    }
}

fn socket(domain: c_int, protocol: c_int, what: &str) -> Result<OwnedFd, NetError> {
    // SAFETY: plain syscall; the fd is owned from here on.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    check(fd, || format!("{what}: socket"))?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setopt<T>(
    fd: &OwnedFd,
    level: c_int,
    name: c_int,
    value: &T,
    what: &str,
) -> Result<(), NetError> {
    // SAFETY: `value` points to a live `T` of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast::<c_void>(),
            size_of::<T>() as socklen_t,
        )
    };
    check(r, || format!("setsockopt {what}")).map(|_| ())
}

fn bind_to_device(fd: &OwnedFd, interface: &str) -> Result<(), NetError> {
    // SAFETY: the name's bytes are live for the call; the kernel copies them.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            interface.as_ptr().cast::<c_void>(),
            interface.len() as socklen_t,
        )
    };
    check(r, || format!("setsockopt SO_BINDTODEVICE {interface}")).map(|_| ())
}

fn interface_index(interface: &str) -> Result<u32, NetError> {
    crate::neigh::ifindex(interface).ok_or_else(|| NetError {
        what: format!("interface {interface}"),
        source: io::Error::from(io::ErrorKind::NotFound),
    })
}

fn in_addr(a: Ipv4Addr) -> libc::in_addr {
    libc::in_addr {
        s_addr: u32::from(a).to_be(),
    }
}

fn in6_addr(a: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: a.octets(),
    }
}

/// The addresses of `interface`, in the kernel's order (the primary one first).
pub fn interface_addresses(interface: &str) -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: on success `head` is a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        if unsafe { CStr::from_ptr(ifa.ifa_name) }.to_bytes() != interface.as_bytes() {
            continue;
        }
        // SAFETY: `ifa_addr` is non-null and sized for its family.
        match c_int::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { ifa.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned() };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { ifa.ifa_addr.cast::<libc::sockaddr_in6>().read_unaligned() };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            _ => {}
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

pub fn is_link_local_v6(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// The address adverts go out from: the interface's primary IPv4 address, or its
/// IPv6 link-local address (RFC 5798 §5.1.2.1).
pub fn advert_source(interface: &str, v4: bool) -> io::Result<Option<IpAddr>> {
    Ok(interface_addresses(interface)?
        .into_iter()
        .find(|a| match a {
            IpAddr::V4(_) => v4,
            IpAddr::V6(a) => !v4 && is_link_local_v6(a),
        }))
}

/// One received advert: its envelope, and where its VRRP payload sits in the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub env: Envelope,
    pub payload: Range<usize>,
}

/// The facts of an IPv4 header and where its payload is; `None` if the header is cut
/// short or inconsistent.
pub fn parse_ipv4(packet: &[u8]) -> Option<Received> {
    let &[ver_ihl, ..] = packet else {
        return None;
    };
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 || packet.len() < ihl {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if total < ihl || total > packet.len() {
        return None;
    }
    let addr =
        |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    Some(Received {
        env: Envelope {
            src: IpAddr::V4(addr(12)),
            dst: IpAddr::V4(addr(16)),
            ttl: packet[8],
        },
        payload: ihl..total,
    })
}

/// Control-message room for one `T`, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct Cmsg<const N: usize>([u8; N]);

/// The raw socket adverts go over.
pub struct AdvertSocket {
    fd: AsyncFd<OwnedFd>,
    ifindex: u32,
    src: IpAddr,
}

impl AdvertSocket {
    /// Opens the socket on `interface`, sending from `src` (its family decides), and
    /// joins the group unless `multicast` is false (unicast peers).
    pub fn open(interface: &str, src: IpAddr, multicast: bool) -> Result<Self, NetError> {
        let ifindex = interface_index(interface)?;
        let fd = match src {
            IpAddr::V4(a) => Self::open_v4(interface, ifindex, a, multicast)?,
            IpAddr::V6(_) => Self::open_v6(interface, ifindex, multicast)?,
        };
        // SAFETY: `fd` is an open descriptor the AsyncFd owns from here on.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| {
                NetError {
                    what: "registering the VRRP socket with tokio".into(),
                    source: e.into_parts().1,
                }
            })?;
        Ok(Self { fd, ifindex, src })
    }

    fn open_v4(
        interface: &str,
        ifindex: u32,
        src: Ipv4Addr,
        multicast: bool,
    ) -> Result<OwnedFd, NetError> {
        use libc::IPPROTO_IP;
        let fd = socket(libc::AF_INET, c_int::from(IPPROTO_VRRP), "IPv4 VRRP")?;
        bind_to_device(&fd, interface)?;
        setopt(
            &fd,
            IPPROTO_IP,
            libc::IP_MULTICAST_ALL,
            &0 as &c_int,
            "IP_MULTICAST_ALL",
        )?;
        let mreqn = libc::ip_mreqn {
            imr_multiaddr: in_addr(GROUP_V4),
            imr_address: in_addr(src),
            imr_ifindex: ifindex as c_int,
        };
        if multicast {
            setopt(
                &fd,
                IPPROTO_IP,
                libc::IP_ADD_MEMBERSHIP,
                &mreqn,
                "IP_ADD_MEMBERSHIP 224.0.0.18",
            )?;
        }
        setopt(
            &fd,
            IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            &mreqn,
            "IP_MULTICAST_IF",
        )?;
        let ttl = c_int::from(TTL);
        setopt(
            &fd,
            IPPROTO_IP,
            libc::IP_MULTICAST_TTL,
            &ttl,
            "IP_MULTICAST_TTL",
        )?;
        setopt(&fd, IPPROTO_IP, libc::IP_TTL, &ttl, "IP_TTL")?;
        setopt(
            &fd,
            IPPROTO_IP,
            libc::IP_MULTICAST_LOOP,
            &0 as &c_int,
            "IP_MULTICAST_LOOP",
        )?;
        setopt(
            &fd,
            IPPROTO_IP,
            libc::IP_TOS,
            &TOS_NETWORK_CONTROL,
            "IP_TOS",
        )?;
        Ok(fd)
    }

    fn open_v6(interface: &str, ifindex: u32, multicast: bool) -> Result<OwnedFd, NetError> {
        use libc::IPPROTO_IPV6;
        let fd = socket(libc::AF_INET6, c_int::from(IPPROTO_VRRP), "IPv6 VRRP")?;
        bind_to_device(&fd, interface)?;
        setopt(
            &fd,
            IPPROTO_IPV6,
            libc::IPV6_MULTICAST_ALL,
            &0 as &c_int,
            "IPV6_MULTICAST_ALL",
        )?;
        if multicast {
            let mreq = libc::ipv6_mreq {
                ipv6mr_multiaddr: in6_addr(GROUP_V6),
                ipv6mr_interface: ifindex,
            };
            setopt(
                &fd,
                IPPROTO_IPV6,
                libc::IPV6_ADD_MEMBERSHIP,
                &mreq,
                "IPV6_ADD_MEMBERSHIP ff02::12",
            )?;
        }
        let index = ifindex as c_int;
        setopt(
            &fd,
            IPPROTO_IPV6,
            libc::IPV6_MULTICAST_IF,
            &index,
            "IPV6_MULTICAST_IF",
        )?;
        let hops = c_int::from(TTL);
        setopt(
            &fd,
            IPPROTO_IPV6,
            libc::IPV6_MULTICAST_HOPS,
            &hops,
            "IPV6_MULTICAST_HOPS",
        )?;
        setopt(
            &fd,
            IPPROTO_IPV6,
            libc::IPV6_UNICAST_HOPS,
            &hops,
            "IPV6_UNICAST_HOPS",
        )?;
        setopt(
            &fd,
            IPPROTO_IPV6,
            libc::IPV6_MULTICAST_LOOP,
            &0 as &c_int,
            "IPV6_MULTICAST_LOOP",
        )?;
        setopt(
            &fd,
            IPPROTO_IPV6,
            libc::IPV6_RECVHOPLIMIT,
            &1 as &c_int,
            "IPV6_RECVHOPLIMIT",
        )?;
        setopt(
            &fd,
            IPPROTO_IPV6,
            libc::IPV6_RECVPKTINFO,
            &1 as &c_int,
            "IPV6_RECVPKTINFO",
        )?;
        setopt(
            &fd,
            IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            &TOS_NETWORK_CONTROL,
            "IPV6_TCLASS",
        )?;
        Ok(fd)
    }

    pub fn src(&self) -> IpAddr {
        self.src
    }

    /// Waits for the next packet. `Ok(None)`: one arrived but its IP facts could not
    /// be read (cut short); the caller counts it.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let v4 = self.src.is_ipv4();
            match guard.try_io(|fd| {
                if v4 {
                    recv_v4(fd.as_raw_fd(), buf)
                } else {
                    recv_v6(fd.as_raw_fd(), buf)
                }
            }) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends one advert's payload to `dst` (the group or a peer), from our address.
    pub fn send_to(&self, dst: IpAddr, payload: &[u8]) -> io::Result<()> {
        let fd = self.fd.get_ref().as_raw_fd();
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast::<c_void>(),
            iov_len: payload.len(),
        };
        // SAFETY: msghdr is plain data; every pointer set below outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let sent = match (self.src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut to = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: in_addr(dst),
                    sin_zero: [0; 8],
                };
                let info = libc::in_pktinfo {
                    ipi_ifindex: self.ifindex as c_int,
                    ipi_spec_dst: in_addr(src),
                    ipi_addr: in_addr(Ipv4Addr::UNSPECIFIED),
                };
                let mut control = Cmsg([0u8; 64]);
                msg.msg_name = (&mut to as *mut libc::sockaddr_in).cast::<c_void>();
                msg.msg_namelen = size_of_val(&to) as socklen_t;
                // SAFETY: `control` has room for one in_pktinfo message.
                unsafe {
                    put_cmsg(
                        &mut msg,
                        &mut control,
                        libc::IPPROTO_IP,
                        libc::IP_PKTINFO,
                        info,
                    )
                };
                // SAFETY: `msg` and all it points to are live for the call.
                unsafe { libc::sendmsg(fd, &msg, 0) }
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut to = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: 0,
                    sin6_flowinfo: 0,
                    sin6_addr: in6_addr(dst),
                    sin6_scope_id: self.ifindex,
                };
                let info = libc::in6_pktinfo {
                    ipi6_addr: in6_addr(src),
                    ipi6_ifindex: self.ifindex,
                };
                let mut control = Cmsg([0u8; 64]);
                msg.msg_name = (&mut to as *mut libc::sockaddr_in6).cast::<c_void>();
                msg.msg_namelen = size_of_val(&to) as socklen_t;
                // SAFETY: `control` has room for one in6_pktinfo message.
                unsafe {
                    put_cmsg(
                        &mut msg,
                        &mut control,
                        libc::IPPROTO_IPV6,
                        libc::IPV6_PKTINFO,
                        info,
                    )
                };
                // SAFETY: `msg` and all it points to are live for the call.
                unsafe { libc::sendmsg(fd, &msg, 0) }
            }
            _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
        };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Puts one control message holding `value` into `msg`, using `control` as its room.
///
/// # Safety
/// `control` must have room for `CMSG_SPACE(size_of::<T>())` bytes and outlive every
/// use of `msg`.
unsafe fn put_cmsg<T, const N: usize>(
    msg: &mut libc::msghdr,
    control: &mut Cmsg<N>,
    level: c_int,
    kind: c_int,
    value: T,
) {
    let size = size_of::<T>() as u32;
    // SAFETY: per the function's contract.
    unsafe {
        let space = libc::CMSG_SPACE(size) as usize;
        debug_assert!(space <= N);
        msg.msg_control = control.0.as_mut_ptr().cast::<c_void>();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size) as usize;
        libc::CMSG_DATA(cmsg).cast::<T>().write_unaligned(value);
    }
}

fn recv_v4(fd: c_int, buf: &mut [u8]) -> io::Result<Option<Received>> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast::<c_void>(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(parse_ipv4(&buf[..n as usize]))
}

fn recv_v6(fd: c_int, buf: &mut [u8]) -> io::Result<Option<Received>> {
    // SAFETY: plain data.
    let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<c_void>(),
        iov_len: buf.len(),
    };
    let mut control = Cmsg([0u8; 128]);
    // SAFETY: plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_in6).cast::<c_void>();
    msg.msg_namelen = size_of_val(&from) as socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast::<c_void>();
    msg.msg_controllen = control.0.len();
    // SAFETY: `msg` describes live buffers.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Ok(None);
    }
    // Unknown until the kernel says: a missing hop limit fails the TTL check, a
    // missing destination the checksum.
    let mut ttl = 0u8;
    let mut dst = Ipv6Addr::UNSPECIFIED;
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IPV6 {
                let data = libc::CMSG_DATA(cmsg);
                match (*cmsg).cmsg_type {
                    libc::IPV6_HOPLIMIT => {
                        let hops = data.cast::<c_int>().read_unaligned();
                        ttl = u8::try_from(hops).unwrap_or(0);
                    }
                    libc::IPV6_PKTINFO => {
                        let info = data.cast::<libc::in6_pktinfo>().read_unaligned();
                        dst = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                    }
                    _ => {}
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Some(Received {
        env: Envelope {
            src: IpAddr::V6(Ipv6Addr::from(from.sin6_addr.s6_addr)),
            dst: IpAddr::V6(dst),
            ttl,
        },
        payload: 0..n as usize,
    }))
}

/// An `AF_PACKET` socket that sends whole Ethernet frames on one interface and
/// receives nothing (protocol 0).
pub struct AnnounceSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl AnnounceSocket {
    pub fn open(interface: &str) -> Result<Self, NetError> {
        let ifindex = interface_index(interface)?;
        let fd = socket(libc::AF_PACKET, 0, "AF_PACKET")?;
        Ok(Self { fd, ifindex })
    }

    /// Sends one frame (from `announce`) as it is.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        if frame.len() < 14 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut addr = [0u8; 8];
        addr[..6].copy_from_slice(&frame[..6]);
        let to = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            // Already in network order, as the frame carries it.
            sll_protocol: u16::from_ne_bytes([frame[12], frame[13]]),
            sll_ifindex: self.ifindex as c_int,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 6,
            sll_addr: addr,
        };
        // SAFETY: `frame` and `to` are live for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast::<c_void>(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast::<libc::sockaddr>(),
                size_of_val(&to) as socklen_t,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(total: u16, ttl: u8) -> Vec<u8> {
        let mut h = vec![0x45, 0xc0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0, ttl, 112, 0, 0, 192, 0, 2, 1, 224, 0, 0, 18]);
        h
    }

    #[test]
    fn ipv4_header_facts() {
        let mut p = header(32, 255);
        p.extend_from_slice(&[0x31; 12]);
        let r = parse_ipv4(&p).unwrap();
        assert_eq!(r.payload, 20..32);
        assert_eq!(r.env.ttl, 255);
        assert_eq!(r.env.src, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(r.env.dst, IpAddr::V4(GROUP_V4));
        // Trailing bytes beyond the total length are not payload.
        p.extend_from_slice(&[0; 4]);
        assert_eq!(parse_ipv4(&p).unwrap().payload, 20..32);
    }

    #[test]
    fn ipv4_with_options() {
        let mut p = header(36, 255);
        p[0] = 0x46;
        p.extend_from_slice(&[1, 1, 1, 0]);
        p.extend_from_slice(&[0x31; 12]);
        assert_eq!(parse_ipv4(&p).unwrap().payload, 24..36);
    }

    #[test]
    fn broken_ipv4_headers() {
        assert_eq!(parse_ipv4(&[]), None);
        assert_eq!(parse_ipv4(&header(32, 255)[..19]), None);
        let mut p = header(40, 255);
        p.extend_from_slice(&[0; 12]);
        assert_eq!(parse_ipv4(&p), None, "total length beyond the packet");
        let mut p = header(32, 255);
        p.extend_from_slice(&[0; 12]);
        p[0] = 0x44;
        assert_eq!(parse_ipv4(&p), None, "header length < 20");
        p[0] = 0x65;
        assert_eq!(parse_ipv4(&p), None, "not IPv4");
        let mut p = header(10, 255);
        p.extend_from_slice(&[0; 12]);
        assert_eq!(parse_ipv4(&p), None, "total length < header");
    }

    #[test]
    fn link_local() {
        assert!(is_link_local_v6(&"fe80::1".parse().unwrap()));
        assert!(is_link_local_v6(&"febf::1".parse().unwrap()));
        assert!(!is_link_local_v6(&"fec0::1".parse().unwrap()));
        assert!(!is_link_local_v6(&"2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn loopback_addresses_are_found() {
        let addrs = interface_addresses("lo").unwrap();
        // Every test machine has 127.0.0.1 on lo (inside a bare namespace lo may be down
        // but still holds it once up; tolerate its absence there).
        if !addrs.is_empty() {
            assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
        assert!(interface_addresses("no-such-if0").unwrap().is_empty());
    }
}
