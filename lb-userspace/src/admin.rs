//! Admin state: what operators changed with `lbctl` (disabled backends, weights). Kept
//! in `state_dir` so that a restart or a reload half-way through an upgrade does not put
//! a drained backend back in rotation.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
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
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AdminError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(FILE);
        let tmp = dir.join(format!(".{FILE}.tmp"));
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
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(())
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
            weight: None,
        };
        s.set(&id("192.0.2.21"), disabled);
        s.set(
            &id("192.0.2.22"),
            AdminBackend {
                disabled: false,
                weight: Some(300),
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
            weight: None,
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
}
