//! Admin state: what operators changed with `lbctl` (disabled backends, weights). Kept
//! in `state_dir` so that a restart or a reload half-way through an upgrade does not put
//! a drained backend back in rotation.
//!
//! With `[sync]`, every entry carries a [`Version`] (a hybrid logical clock stamp) and
//! the hosts of an LB pair exchange entries: [`AdminState::merge`] keeps the higher
//! version, so every host ends with the same state whatever order the entries arrive
//! in. An entry set back to the defaults is kept while it has a version (a tombstone):
//! an `enable` must beat the `disable` it undoes on a host that missed both.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::config::{BackendId, Config};

const FILE: &str = "admin.json";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminBackend {
    #[serde(default)]
    pub disabled: bool,
    /// Overrides the config's weight while set.
    #[serde(default)]
    pub weight: Option<u32>,
    /// When and where it was set (absent in files written before `[sync]`: older than
    /// any stamped change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
}

/// A hybrid logical clock stamp: wall-clock milliseconds, a counter for changes within
/// one millisecond (or while the wall clock lags a stamp already seen), and the host
/// that made the change, which breaks ties. Ordered field by field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub ms: u64,
    pub counter: u32,
    pub host: IpAddr,
}

/// Hands out versions that are above every version this host has made or seen, and
/// follow the wall clock when it is ahead.
#[derive(Clone, Debug)]
pub struct Clock {
    host: IpAddr,
    last: (u64, u32),
}

impl Clock {
    pub fn new(host: IpAddr) -> Self {
        Self { host, last: (0, 0) }
    }

    /// A stamp for a change made here at wall-clock `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Version {
        self.last = if now_ms > self.last.0 {
            (now_ms, 0)
        } else {
            (self.last.0, self.last.1.saturating_add(1))
        };
        Version {
            ms: self.last.0,
            counter: self.last.1,
            host: self.host,
        }
    }

    /// Takes note of a version made elsewhere: the next tick is above it.
    pub fn observe(&mut self, seen: Version) {
        self.last = self.last.max((seen.ms, seen.counter));
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What operators set, per backend (service and address: `BackendId`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdminState {
    pub backends: BTreeMap<BackendId, AdminBackend>,
}

/// `admin.json` as written since version 2: one entry per backend, keyed by address.
#[derive(Serialize, Deserialize)]
struct FileV2 {
    version: u32,
    backends: Vec<FileEntry>,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    service: String,
    address: IpAddr,
    #[serde(flatten)]
    admin: AdminBackend,
}

/// `admin.json` before version 2: service name -> backend name -> what was set.
#[derive(Deserialize)]
struct FileV1 {
    #[serde(default)]
    services: BTreeMap<String, BTreeMap<String, AdminBackend>>,
}

const VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not valid admin state ({source}); fix or remove it (it holds which backends operators disabled)"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path} is admin state of version {version}; this agent reads versions 1 and {VERSION}"
    )]
    Version { path: PathBuf, version: u32 },
}

impl AdminState {
    pub fn get(&self, id: &BackendId) -> AdminBackend {
        self.backends.get(id).copied().unwrap_or_default()
    }

    pub fn set(&mut self, id: &BackendId, value: AdminBackend) {
        if value == AdminBackend::default() {
            self.backends.remove(id);
        } else {
            self.backends.insert(id.clone(), value);
        }
    }

    /// Takes `remote` if its version is above ours (an entry without a version is below
    /// every stamped one); returns whether anything changed. Merging is commutative,
    /// associative and idempotent: hosts that have seen the same entries agree.
    pub fn merge(&mut self, id: &BackendId, remote: AdminBackend) -> bool {
        let Some(theirs) = remote.version else {
            return false;
        };
        let ours = self.backends.get(id).and_then(|a| a.version);
        if ours.is_some_and(|v| v >= theirs) {
            return false;
        }
        self.backends.insert(id.clone(), remote);
        true
    }

    /// The stamped entries, the ones other hosts can merge.
    pub fn versioned(&self) -> impl Iterator<Item = (&BackendId, &AdminBackend)> {
        self.backends.iter().filter(|(_, a)| a.version.is_some())
    }

    /// A digest of the stamped entries: equal on two hosts when they agree.
    pub fn digest(&self) -> [u8; 8] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (id, a) in self.versioned() {
            let v = a.version.unwrap_or(Version {
                ms: 0,
                counter: 0,
                host: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            });
            h.update(id.service.as_bytes());
            h.update([0]);
            h.update(id.address.to_string().as_bytes());
            h.update([0, u8::from(a.disabled)]);
            h.update(a.weight.map_or([0xff; 4], u32::to_be_bytes));
            h.update(v.ms.to_be_bytes());
            h.update(v.counter.to_be_bytes());
            h.update(v.host.to_string().as_bytes());
            h.update([0]);
        }
        let mut out = [0; 8];
        out.copy_from_slice(&h.finalize()[..8]);
        out
    }

    /// Reads `dir/admin.json`; a missing file is an empty state, a corrupt one an error
    /// (starting as if nothing were disabled would undo an operator's drain). A file of
    /// the first format, keyed by backend name, is read through `config` (names to
    /// addresses); entries whose backend is no longer in it are returned apart, for
    /// the caller to report, and the file is rewritten at the next save.
    pub fn load(dir: &Path, config: &Config) -> Result<(Self, Vec<String>), AdminError> {
        let path = dir.join(FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Self::default(), Vec::new()));
            }
            Err(source) => return Err(AdminError::Io { path, source }),
        };
        let corrupt = |source| AdminError::Corrupt {
            path: path.clone(),
            source,
        };
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(corrupt)?;
        if value.get("version").is_some() {
            let file: FileV2 = serde_json::from_value(value).map_err(corrupt)?;
            if file.version != VERSION {
                return Err(AdminError::Version {
                    path,
                    version: file.version,
                });
            }
            let backends = file
                .backends
                .into_iter()
                .map(|e| {
                    let id = BackendId {
                        service: e.service,
                        address: e.address,
                    };
                    (id, e.admin)
                })
                .collect();
            return Ok((Self { backends }, Vec::new()));
        }
        let old: FileV1 = serde_json::from_value(value).map_err(corrupt)?;
        let mut state = Self::default();
        let mut unknown = Vec::new();
        for (service, backends) in old.services {
            for (name, admin) in backends {
                match config.find_backend(&service, &name) {
                    Some((s, b)) => state.set(&s.backend_id(b), admin),
                    None => unknown.push(format!("{service}/{name}")),
                }
            }
        }
        Ok((state, unknown))
    }

    /// Writes atomically: a temporary file, fsync, rename, fsync of the directory.
    pub fn save(&self, dir: &Path) -> Result<(), AdminError> {
        let file = FileV2 {
            version: VERSION,
            backends: self
                .backends
                .iter()
                .map(|(id, admin)| FileEntry {
                    service: id.service.clone(),
                    address: id.address,
                    admin: *admin,
                })
                .collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
        bytes.push(b'\n');
        crate::statefile::write_atomically(dir, FILE, &bytes)
            .map_err(|(path, source)| AdminError::Io { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-admin-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn config() -> Config {
        crate::config::parse(
            "[agent]\ninterface = \"eth0\"\n[[services]]\nname = \"web\"\nvip = \"192.0.2.10\"\nport = 80\n\
             [[services.backends]]\nname = \"b1\"\naddress = \"192.0.2.21\"\n\
             [[services.backends]]\nname = \"b2\"\naddress = \"192.0.2.22\"\n",
            "t",
        )
        .unwrap()
    }

    fn id(address: &str) -> BackendId {
        BackendId {
            service: "web".into(),
            address: address.parse().unwrap(),
        }
    }

    #[test]
    fn saves_and_loads() {
        let dir = temp_dir("roundtrip");
        let (empty, _) = AdminState::load(&dir, &config()).unwrap();
        assert_eq!(empty, AdminState::default());
        let mut s = AdminState::default();
        let disabled = AdminBackend {
            disabled: true,
            ..Default::default()
        };
        s.set(&id("192.0.2.21"), disabled);
        s.set(
            &id("192.0.2.22"),
            AdminBackend {
                weight: Some(300),
                ..Default::default()
            },
        );
        s.save(&dir).unwrap();
        let text = fs::read_to_string(dir.join(FILE)).unwrap();
        assert!(text.contains("\"version\": 2"), "{text}");
        assert!(text.contains("\"address\": \"192.0.2.21\""), "{text}");
        let (back, unknown) = AdminState::load(&dir, &config()).unwrap();
        assert_eq!(back, s);
        assert!(unknown.is_empty());
        assert!(back.get(&id("192.0.2.21")).disabled);
        assert_eq!(back.get(&id("192.0.2.22")).weight, Some(300));
        assert_eq!(back.get(&id("192.0.2.23")), AdminBackend::default());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_name_keyed_file_is_read_through_the_config() {
        let dir = temp_dir("v1");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join(FILE),
            r#"{"services": {"web": {"b1": {"disabled": true}, "gone": {"weight": 5}}}}"#,
        )
        .unwrap();
        let (state, unknown) = AdminState::load(&dir, &config()).unwrap();
        assert!(state.get(&id("192.0.2.21")).disabled);
        assert_eq!(state.backends.len(), 1);
        assert_eq!(unknown, vec!["web/gone".to_string()]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_entries_are_dropped() {
        let mut s = AdminState::default();
        let disabled = AdminBackend {
            disabled: true,
            ..Default::default()
        };
        s.set(&id("192.0.2.21"), disabled);
        s.set(&id("192.0.2.21"), AdminBackend::default());
        assert!(s.backends.is_empty());
    }

    #[test]
    fn corrupt_or_future_state_is_an_error() {
        let dir = temp_dir("corrupt");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(FILE), b"{ not json").unwrap();
        assert!(matches!(
            AdminState::load(&dir, &config()),
            Err(AdminError::Corrupt { .. })
        ));
        fs::write(dir.join(FILE), br#"{"version": 3, "backends": []}"#).unwrap();
        assert!(matches!(
            AdminState::load(&dir, &config()),
            Err(AdminError::Version { version: 3, .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn v(ms: u64, counter: u32, host: &str) -> Version {
        Version {
            ms,
            counter,
            host: host.parse().unwrap(),
        }
    }

    fn stamped(disabled: bool, version: Version) -> AdminBackend {
        AdminBackend {
            disabled,
            weight: None,
            version: Some(version),
        }
    }

    #[test]
    fn the_clock_follows_the_wall_clock_and_what_it_saw() {
        let mut c = Clock::new("10.0.0.2".parse().unwrap());
        assert_eq!(c.tick(1000), v(1000, 0, "10.0.0.2"));
        assert_eq!(c.tick(1000), v(1000, 1, "10.0.0.2"));
        // The wall clock stepped back: the stamps still grow.
        assert_eq!(c.tick(900), v(1000, 2, "10.0.0.2"));
        // A peer's clock is ahead: ours goes past its stamp.
        c.observe(v(5000, 7, "10.0.0.3"));
        assert_eq!(c.tick(1001), v(5000, 8, "10.0.0.2"));
        assert_eq!(c.tick(6000), v(6000, 0, "10.0.0.2"));
        // Ties on time and counter are broken by the host address.
        assert!(v(6000, 0, "10.0.0.3") > v(6000, 0, "10.0.0.2"));
        assert!(v(6000, 1, "10.0.0.2") > v(6000, 0, "10.0.0.3"));
    }

    #[test]
    fn the_higher_version_wins_and_tombstones_beat_what_they_undo() {
        let mut s = AdminState::default();
        let b = id("192.0.2.21");
        assert!(s.merge(&b, stamped(true, v(10, 0, "10.0.0.2"))));
        assert!(!s.merge(&b, stamped(false, v(9, 5, "10.0.0.3"))), "older");
        assert!(
            !s.merge(&b, stamped(true, v(10, 0, "10.0.0.2"))),
            "the same"
        );
        assert!(
            s.merge(&b, stamped(false, v(10, 0, "10.0.0.3"))),
            "tie: higher host"
        );
        assert!(!s.get(&b).disabled);
        // The enable is kept as a tombstone, so an older disable cannot come back.
        assert!(!s.merge(&b, stamped(true, v(10, 0, "10.0.0.2"))));
        // Unstamped entries never replace anything.
        assert!(!s.merge(
            &b,
            AdminBackend {
                disabled: true,
                ..Default::default()
            }
        ));
    }

    #[test]
    fn merging_is_the_same_in_any_order() {
        let changes = [
            (id("192.0.2.21"), stamped(true, v(10, 0, "10.0.0.2"))),
            (id("192.0.2.21"), stamped(false, v(10, 0, "10.0.0.3"))),
            (id("192.0.2.21"), stamped(true, v(9, 9, "10.0.0.4"))),
            (
                id("192.0.2.22"),
                AdminBackend {
                    weight: Some(5),
                    ..stamped(false, v(11, 0, "10.0.0.2"))
                },
            ),
            (id("192.0.2.22"), stamped(true, v(11, 1, "10.0.0.2"))),
            (id("192.0.2.23"), stamped(true, v(1, 0, "10.0.0.3"))),
        ];
        let mut reference: Option<AdminState> = None;
        // Every rotation and its reverse, each change delivered twice.
        for start in 0..changes.len() {
            for reverse in [false, true] {
                let mut order: Vec<_> = changes
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(changes.len())
                    .collect();
                if reverse {
                    order.reverse();
                }
                let mut s = AdminState::default();
                for (b, a) in order.iter().chain(order.iter()) {
                    s.merge(b, *a);
                }
                match &reference {
                    None => reference = Some(s),
                    Some(r) => {
                        assert_eq!(&s, r);
                        assert_eq!(s.digest(), r.digest());
                    }
                }
            }
        }
        let r = reference.unwrap();
        assert!(!r.get(&id("192.0.2.21")).disabled);
        assert!(r.get(&id("192.0.2.22")).disabled);
        assert_ne!(r.digest(), AdminState::default().digest());
    }

    #[test]
    fn versions_are_saved_and_files_without_them_still_load() {
        let dir = temp_dir("versions");
        let mut s = AdminState::default();
        s.set(&id("192.0.2.21"), stamped(true, v(1234, 2, "10.0.0.2")));
        s.set(&id("192.0.2.22"), stamped(false, v(1235, 0, "fd00::2")));
        s.save(&dir).unwrap();
        let (back, _) = AdminState::load(&dir, &config()).unwrap();
        assert_eq!(back, s);
        fs::write(
            dir.join(FILE),
            r#"{"version": 2, "backends": [{"service": "web", "address": "192.0.2.21", "disabled": true}]}"#,
        )
        .unwrap();
        let (old, _) = AdminState::load(&dir, &config()).unwrap();
        assert!(old.get(&id("192.0.2.21")).disabled);
        assert_eq!(old.get(&id("192.0.2.21")).version, None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
