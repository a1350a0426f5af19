//! Where the data path outlives the agent: its maps and its XDP link pinned in bpffs,
//! under `<bpffs_dir>/<interface>/v<layout version>/`, so that the next agent reuses the
//! maps (flow tables included) and replaces the program in the same link, atomically.
//!
//! Maps of another layout are never read: a directory of another version, a META map
//! holding another version, or a pinned map whose type, key, value, size or flags differ
//! from `lb_common::layout::MAPS` is refused with an error that says what to do.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::maps::{Array, MapData, MapInfo};
use lb_common::{
    layout::{self, MapLayout},
    names,
};

use crate::dataplane::{DataPlaneError, MapSizes};

type Result<T> = std::result::Result<T, DataPlaneError>;

/// `BPF_FS_MAGIC` from statfs(2).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The usual mount point of bpffs, mounted there if it is not.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// The pinned XDP link, in the version directory.
const LINK: &str = "link";

/// The pin directories of one agent: `<bpffs_dir>/<interface>/` holds one directory per
/// layout version, `v<VERSION as 8 hex digits>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinDir {
    interface_dir: PathBuf,
    dir: PathBuf,
}

/// What was found at the pin directory before loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// Maps pinned by an earlier agent, checked: they will be reused.
    pub maps: bool,
    /// An XDP link pinned by an earlier agent: the program will be replaced in it.
    pub link: bool,
}

impl PinDir {
    pub fn new(bpffs_dir: &Path, interface: &str) -> Self {
        let interface_dir = bpffs_dir.join(interface);
        let dir = interface_dir.join(version_dir_name(layout::VERSION));
        Self { interface_dir, dir }
    }

    /// The directory of this layout.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<bpffs_dir>/<interface>`, which holds the version directories.
    pub fn interface_dir(&self) -> &Path {
        &self.interface_dir
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn link_path(&self) -> PathBuf {
        self.dir.join(LINK)
    }

    /// Makes the directory (on bpffs, mounting bpffs at /sys/fs/bpf if that is where it
    /// goes and nothing is mounted there) and checks what it holds: pins of another layout
    /// or maps that do not match `sizes` are refused.
    pub fn prepare(&self, sizes: MapSizes) -> Result<Found> {
        ensure_bpffs(&self.interface_dir)?;
        if let Ok(entries) = std::fs::read_dir(&self.interface_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path != self.dir {
                    return Err(DataPlaneError::OtherLayout {
                        found: entry.file_name().to_string_lossy().into_owned(),
                        path,
                        ours: layout::VERSION,
                    });
                }
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| DataPlaneError::Pin {
            what: "creating",
            path: self.dir.clone(),
            source,
        })?;
        let mut maps = false;
        for m in &layout::MAPS {
            let path = self.map_path(m.name);
            if path.exists() {
                check_map(m, &path, sizes)?;
                maps = true;
            }
        }
        let meta = self.map_path(names::MAP_META);
        if meta.exists() {
            let found = read_meta(&meta, layout::meta::LAYOUT)?;
            if found != u64::from(layout::VERSION) {
                return Err(DataPlaneError::OtherLayout {
                    path: meta,
                    found: format!("v{found:08x} in its META map"),
                    ours: layout::VERSION,
                });
            }
        }
        Ok(Found {
            maps,
            link: self.link_path().exists(),
        })
    }
}

fn version_dir_name(version: u32) -> String {
    format!("v{version:08x}")
}

/// The size a map of the layout must have with these table sizes.
fn wanted_entries(m: &MapLayout, sizes: MapSizes) -> u32 {
    match m.name {
        names::MAP_FLOWS => lb_common::flowtab::slots_for(sizes.max_flows),
        names::MAP_PINNED => sizes.max_pinned_flows,
        names::MAP_PERSIST => sizes.max_persistent_clients,
        names::MAP_NAT_FLOWS | names::MAP_NAT_REVERSE => sizes.max_nat_flows,
        _ => m.max_entries,
    }
}

fn check_map(m: &MapLayout, path: &Path, sizes: MapSizes) -> Result<()> {
    let info = MapInfo::from_pin(path).map_err(|e| DataPlaneError::Pin {
        what: "opening the pinned map",
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    })?;
    let map_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
    let checks = [
        ("type", map_type, m.map_type),
        ("key size", info.key_size(), m.key_size),
        ("value size", info.value_size(), m.value_size),
        ("max entries", info.max_entries(), wanted_entries(m, sizes)),
        ("flags", info.map_flags(), m.flags),
    ];
    for (what, found, wanted) in checks {
        if found != wanted {
            return Err(DataPlaneError::PinnedMismatch {
                map: m.name,
                path: path.to_path_buf(),
                what,
                found,
                wanted,
            });
        }
    }
    Ok(())
}

fn read_meta(path: &Path, slot: u32) -> Result<u64> {
    let fail = |e: aya::maps::MapError| DataPlaneError::Pin {
        what: "reading the pinned map",
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    };
    let map = MapData::from_pin(path).map_err(fail)?;
    let array: Array<MapData, u64> = Array::try_from(aya::maps::Map::Array(map)).map_err(fail)?;
    array.get(&slot, 0).map_err(fail)
}

fn statfs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid C string and a zeroed statfs to write into.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// Makes sure `dir` will be on bpffs: its nearest existing ancestor must be, and if
/// that ancestor is /sys/fs/bpf with nothing mounted, bpffs is mounted there.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let Some(existing) = dir.ancestors().find(|a| a.exists()) else {
        return Err(DataPlaneError::Pin {
            what: "finding",
            path: dir.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    };
    let magic = |p: &Path| {
        statfs_magic(p).map_err(|source| DataPlaneError::Pin {
            what: "statfs",
            path: p.to_path_buf(),
            source,
        })
    };
    if magic(existing)? == BPF_FS_MAGIC {
        return Ok(());
    }
    if existing == Path::new(BPFFS_MOUNT) {
        let target = CString::new(BPFFS_MOUNT).expect("no NUL");
        let fstype = CString::new("bpf").expect("no NUL");
        // SAFETY: valid C strings; no data.
        let r = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(DataPlaneError::Pin {
                what: "mounting bpffs on",
                path: existing.to_path_buf(),
                source: io::Error::last_os_error(),
            });
        }
        tracing::info!("mounted bpffs on {BPFFS_MOUNT}");
        return Ok(());
    }
    Err(DataPlaneError::Pin {
        what: "pinning under",
        path: dir.to_path_buf(),
        source: io::Error::other(format!(
            "{} is not on a BPF file system (mount -t bpf bpf DIR)",
            existing.display()
        )),
    })
}

/// What `remove` took away.
#[derive(Debug, Default)]
pub struct Removed {
    /// Pinned links removed: each detached its program (unless an agent still holds it).
    pub links: usize,
    pub maps: usize,
}

/// Removes every pin of `<bpffs_dir>/<interface>`, whatever its layout: links first (the
/// program leaves the interface once nothing else holds the link), then the maps
/// (freed once no program uses them), then the directories.
pub fn remove(bpffs_dir: &Path, interface: &str) -> Result<Removed> {
    let interface_dir = bpffs_dir.join(interface);
    let mut removed = Removed::default();
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| DataPlaneError::Pin { what, path, source }
    };
    let versions = match std::fs::read_dir(&interface_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_err("reading", &interface_dir)(e)),
    };
    for version in versions.flatten() {
        let dir = version.path();
        let link = dir.join(LINK);
        if link.exists() {
            std::fs::remove_file(&link).map_err(io_err("removing", &link))?;
            removed.links += 1;
        }
        for entry in std::fs::read_dir(&dir)
            .map_err(io_err("reading", &dir))?
            .flatten()
        {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io_err("removing", &path))?;
            removed.maps += 1;
        }
        std::fs::remove_dir(&dir).map_err(io_err("removing", &dir))?;
    }
    std::fs::remove_dir(&interface_dir).map_err(io_err("removing", &interface_dir))?;
    // The bpffs_dir itself goes too when this was its last interface.
    let _ = std::fs::remove_dir(bpffs_dir);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_names_the_interface_and_the_layout() {
        let p = PinDir::new(Path::new("/sys/fs/bpf/lb"), "eth0");
        assert_eq!(p.interface_dir(), Path::new("/sys/fs/bpf/lb/eth0"));
        assert_eq!(
            p.dir(),
            Path::new("/sys/fs/bpf/lb/eth0").join(format!("v{:08x}", layout::VERSION))
        );
        assert_eq!(p.link_path(), p.dir().join("link"));
    }

    #[test]
    fn every_map_is_in_the_layout_once() {
        let all = [
            names::MAP_VIPS,
            names::MAP_VIP_ADDRS,
            names::MAP_VIP_FILTER,
            names::MAP_VIP_SLOTS,
            names::MAP_DSR_FILTER,
            names::MAP_RINGS,
            names::MAP_BACKENDS,
            names::MAP_FLOWS,
            names::MAP_PINNED,
            names::MAP_PERSIST,
            names::MAP_FLOOD_GUARD,
            names::MAP_STATS,
            names::MAP_CONFIG,
            names::MAP_SERVING,
            names::MAP_META,
            names::MAP_TRACE,
            names::MAP_NAT_BACKENDS,
            names::MAP_NAT_FLOWS,
            names::MAP_NAT_REVERSE,
            names::MAP_NAT_SCRATCH,
            names::MAP_NAT_CONFIG,
        ];
        for name in all {
            assert_eq!(
                layout::MAPS.iter().filter(|m| m.name == name).count(),
                1,
                "{name}"
            );
        }
        assert_eq!(layout::MAPS.len(), all.len());
        for name in layout::UNPINNED {
            assert!(layout::by_name(name).is_none(), "{name} is not pinned");
        }
    }
}
