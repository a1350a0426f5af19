//! The announced routes in the kernel: a TUN device that lives exactly as long as the
//! agent's process (`RouteDevice`), and a task that keeps the host routes on it in step
//! with the VIPs the agent wants announced (`Announcer`).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use netlink_packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio::{sync::watch, task::JoinHandle};

use super::diff;
use crate::admin::now_ms;

/// The kernel picks the first free number.
const DEVICE_TEMPLATE: &CStr = c"lbvip%d";
/// How long a failed route change waits before the whole set is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("opening /dev/net/tun: {0}")]
    Open(std::io::Error),
    #[error("creating the route device (TUNSETIFF): {0}")]
    Create(std::io::Error),
    #[error("the route device {0} has no index")]
    NoIndex(String),
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("bringing {device} up: {source}")]
    Up {
        device: String,
        source: rtnetlink::Error,
    },
}

/// A TUN device that is not persistent: the kernel destroys it, and every route on it,
/// when its last file descriptor closes, which the process's end does even on SIGKILL.
/// Nothing reads or writes it: no route of the host's own tables points at it.
pub struct RouteDevice {
    /// Held, never used: the device lives as long as this descriptor.
    _fd: OwnedFd,
    name: String,
    index: u32,
}

impl RouteDevice {
    pub fn create() -> Result<Self, AnnounceError> {
        // SAFETY: a valid NUL-terminated path; the result is checked.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if raw < 0 {
            return Err(AnnounceError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is an open descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid ifreq.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(DEVICE_TEMPLATE.to_bytes_with_nul())
        {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // No TUNSETPERSIST: the device goes with the descriptor.
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(AnnounceError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: the kernel wrote a NUL-terminated name into ifr_name.
        let name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let index =
            crate::neigh::ifindex(&name).ok_or_else(|| AnnounceError::NoIndex(name.clone()))?;
        Ok(Self {
            _fd: fd,
            name,
            index,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The routes as they are in the kernel, published by the announcer's task.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Announced {
    /// Each VIP with a route, and when (Unix ms) the route went in.
    pub routes: BTreeMap<IpAddr, u64>,
    /// Each VIP whose route this agent removed, and when (Unix ms).
    pub withdrawn: BTreeMap<IpAddr, u64>,
    /// The last failure to change a route, while it lasts (retried every second).
    pub error: Option<String>,
}

/// Keeps the host routes of the wanted VIPs on the route device, in `table`, on a task
/// of its own: the agent's loop hands it the wanted set and never waits for netlink.
pub struct Announcer {
    wanted: watch::Sender<BTreeSet<IpAddr>>,
    announced: watch::Receiver<Announced>,
    device: String,
    table: u32,
    task: JoinHandle<()>,
}

impl Announcer {
    /// Creates the route device, brings it up and starts the task, with nothing
    /// announced yet. Must run inside a tokio runtime.
    pub async fn start(table: u32) -> Result<Self, AnnounceError> {
        let device = RouteDevice::create()?;
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        handle
            .link()
            .set(LinkUnspec::new_with_index(device.index).up().build())
            .execute()
            .await
            .map_err(|source| AnnounceError::Up {
                device: device.name.clone(),
                source,
            })?;
        let (wanted, wanted_rx) = watch::channel(BTreeSet::new());
        let (announced_tx, announced) = watch::channel(Announced::default());
        let name = device.name.clone();
        let task = tokio::spawn(
            Worker {
                handle,
                device,
                table,
                announced: Announced::default(),
            }
            .run(wanted_rx, announced_tx),
        );
        Ok(Self {
            wanted,
            announced,
            device: name,
            table,
            task,
        })
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn table(&self) -> u32 {
        self.table
    }

    /// The VIPs to keep a route for from now on.
    pub fn want(&self, vips: BTreeSet<IpAddr>) {
        self.wanted.send_if_modified(|w| {
            let changed = *w != vips;
            *w = vips;
            changed
        });
    }

    /// A receiver of the routes as the kernel has them, for readers beside the loop
    /// (the metrics endpoint).
    pub fn announced_source(&self) -> watch::Receiver<Announced> {
        self.announced.clone()
    }

    /// The routes as the kernel has them now.
    pub fn announced(&self) -> Announced {
        self.announced.borrow().clone()
    }

    /// Removes every route and waits, at most `timeout`, until the kernel has none.
    /// Returns whether it got there.
    pub async fn withdraw_all(&mut self, timeout: Duration) -> bool {
        self.want(BTreeSet::new());
        let done = self.announced.wait_for(|a| a.routes.is_empty());
        matches!(tokio::time::timeout(timeout, done).await, Ok(Ok(_)))
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        // The device (and its routes) go with the task's descriptor.
        self.task.abort();
    }
}

struct Worker {
    handle: Handle,
    device: RouteDevice,
    table: u32,
    announced: Announced,
}

impl Worker {
    async fn run(
        mut self,
        mut wanted: watch::Receiver<BTreeSet<IpAddr>>,
        announced: watch::Sender<Announced>,
    ) {
        loop {
            let want = wanted.borrow_and_update().clone();
            let result = self.reconcile(&want).await;
            let failed = result.is_err();
            let error = result.err();
            if error != self.announced.error {
                match &error {
                    Some(e) => tracing::warn!(
                        "announce: {e}; retrying every {} ms",
                        RETRY_EVERY.as_millis()
                    ),
                    None => tracing::info!("announce: routes in step again"),
                }
            }
            self.announced.error = error;
            announced.send_replace(self.announced.clone());
            if failed {
                tokio::select! {
                    r = wanted.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(RETRY_EVERY) => {}
                }
            } else if wanted.changed().await.is_err() {
                return;
            }
        }
    }

    /// Adds and removes routes until the kernel has `want`; stops at the first failure.
    async fn reconcile(&mut self, want: &BTreeSet<IpAddr>) -> Result<(), String> {
        let present: BTreeSet<IpAddr> = self.announced.routes.keys().copied().collect();
        let (add, remove) = diff(&present, want);
        // Withdrawals first: a stop must not wait behind new announcements.
        for vip in remove {
            match self.handle.route().del(self.route(vip)?).execute().await {
                Ok(()) => {}
                // Already gone (someone removed it by hand): that is what we want.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
                Err(e) => return Err(format!("removing the route of {vip}: {e}")),
            }
            self.announced.routes.remove(&vip);
            self.announced.withdrawn.insert(vip, now_ms());
            tracing::info!(
                event = "announce",
                vip = %vip,
                announced = false,
                "withdrew {vip}: route removed from table {} ({})",
                self.table,
                self.device.name
            );
        }
        for vip in add {
            self.handle
                .route()
                .add(self.route(vip)?)
                .replace()
                .execute()
                .await
                .map_err(|e| format!("adding the route of {vip}: {e}"))?;
            self.announced.routes.insert(vip, now_ms());
            self.announced.withdrawn.remove(&vip);
            tracing::info!(
                event = "announce",
                vip = %vip,
                announced = true,
                "announcing {vip}: route in table {} via {}",
                self.table,
                self.device.name
            );
        }
        Ok(())
    }

    /// The host route of `vip` on the device: unicast, protocol static (BIRD's `learn`
    /// takes any protocol but kernel and its own).
    fn route(&self, vip: IpAddr) -> Result<netlink_packet_route::route::RouteMessage, String> {
        let (len, scope) = match vip {
            IpAddr::V4(_) => (32, RouteScope::Link),
            IpAddr::V6(_) => (128, RouteScope::Universe),
        };
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(vip, len)
            .map_err(|e| format!("the route of {vip}: {e}"))?
            .output_interface(self.device.index)
            .table_id(self.table)
            .protocol(RouteProtocol::Static)
            .scope(scope)
            .build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_template_fits_an_interface_name() {
        // IFNAMSIZ counts the NUL; "%d" becomes up to 5 digits.
        assert!(DEVICE_TEMPLATE.to_bytes().len() - 2 + 5 < libc::IFNAMSIZ);
    }
}
