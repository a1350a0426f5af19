//! Backend MAC addresses from the kernel's neighbour table (netlink), probed when
//! missing. DSR needs each backend on the LB's own L2 segment, so the kernel's table
//! for `interface` is the source of truth.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use futures_util::TryStreamExt;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};

#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("interface {0} not found")]
    NoInterface(String),
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct Neighbours {
    handle: rtnetlink::Handle,
    interface: String,
    ifindex: u32,
}

/// Index of a network interface, or `None` if there is none of that name.
pub fn ifindex(interface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

impl Neighbours {
    /// Opens a netlink connection; must run inside a tokio runtime.
    pub fn new(interface: &str) -> Result<Self, NeighError> {
        let ifindex =
            ifindex(interface).ok_or_else(|| NeighError::NoInterface(interface.to_string()))?;
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            interface: interface.to_string(),
            ifindex,
        })
    }

    /// Every usable entry of the interface's neighbour table.
    pub async fn table(&self) -> Result<HashMap<IpAddr, [u8; 6]>, NeighError> {
        let mut out = HashMap::new();
        let mut dump = self.handle.neighbours().get().execute();
        while let Some(msg) = dump.try_next().await? {
            if msg.header.ifindex != self.ifindex
                || matches!(
                    msg.header.state,
                    NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
                )
            {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        ip = Some(IpAddr::V4(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        ip = Some(IpAddr::V6(*a))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        mac = Some([l[0], l[1], l[2], l[3], l[4], l[5]]);
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac)
                && mac != [0; 6]
            {
                out.insert(ip, mac);
            }
        }
        Ok(out)
    }

    /// Makes the kernel resolve `ip` on our interface: one empty UDP datagram to the
    /// discard port, sent through the interface.
    pub fn probe(&self, ip: IpAddr) -> std::io::Result<()> {
        let bind: SocketAddr = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .map_err(std::io::Error::other)?;
        let socket = UdpSocket::bind(bind)?;
        let name = self.interface.as_bytes();
        // SAFETY: a valid socket and a buffer of the given length.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                name.as_ptr().cast(),
                name.len() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        socket.send_to(&[], SocketAddr::new(ip, 9))?;
        Ok(())
    }

    /// Resolves `ips`, probing the missing ones, for at most `wait`.
    pub async fn resolve(
        &self,
        ips: &[IpAddr],
        wait: Duration,
    ) -> Result<HashMap<IpAddr, [u8; 6]>, NeighError> {
        let deadline = Instant::now() + wait;
        let mut probed = false;
        loop {
            let table = self.table().await?;
            let missing: Vec<IpAddr> = ips
                .iter()
                .copied()
                .filter(|ip| !table.contains_key(ip))
                .collect();
            if missing.is_empty() || Instant::now() >= deadline {
                return Ok(table);
            }
            if !probed {
                for ip in &missing {
                    if let Err(e) = self.probe(*ip) {
                        tracing::warn!("cannot probe backend {ip} on {}: {e}", self.interface);
                    }
                }
                probed = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
