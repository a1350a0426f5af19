//! Admin state: what operators changed with `lbctl` (disabled backends, weights). Kept
//! in `state_dir` so that a restart or a reload half-way through an upgrade does not put
//! a drained backend back in rotation.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

const FILE: &str = "admin.json";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminBackend {
    #[serde(default)]
    pub disabled: bool,
    /// Overrides the config's weight while set.
    #[serde(default)]
    pub weight: Option<u32>,
}

/// service name -> backend name -> what the operator set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminState {
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<String, AdminBackend>>,
}

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
}

impl AdminState {
    pub fn get(&self, service: &str, backend: &str) -> AdminBackend {
        self.services
            .get(service)
            .and_then(|s| s.get(backend))
            .copied()
            .unwrap_or_default()
    }

    pub fn set(&mut self, service: &str, backend: &str, value: AdminBackend) {
        let s = self.services.entry(service.to_string()).or_default();
        if value == AdminBackend::default() {
            s.remove(backend);
        } else {
            s.insert(backend.to_string(), value);
        }
        if s.is_empty() {
            self.services.remove(service);
        }
    }

    /// Reads `dir/admin.json`; a missing file is an empty state, a corrupt one an error
    /// (starting as if nothing were disabled would undo an operator's drain).
    pub fn load(dir: &Path) -> Result<Self, AdminError> {
        let path = dir.join(FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| AdminError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(AdminError::Io { path, source }),
        }
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
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
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

    #[test]
    fn saves_and_loads() {
        let dir = temp_dir("roundtrip");
        assert_eq!(AdminState::load(&dir).unwrap(), AdminState::default());
        let mut s = AdminState::default();
        s.set(
            "web",
            "b1",
            AdminBackend {
                disabled: true,
                weight: None,
            },
        );
        s.set(
            "web",
            "b2",
            AdminBackend {
                disabled: false,
                weight: Some(300),
            },
        );
        s.save(&dir).unwrap();
        let back = AdminState::load(&dir).unwrap();
        assert_eq!(back, s);
        assert!(back.get("web", "b1").disabled);
        assert_eq!(back.get("web", "b2").weight, Some(300));
        assert_eq!(back.get("web", "b3"), AdminBackend::default());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_entries_are_dropped() {
        let mut s = AdminState::default();
        s.set(
            "web",
            "b1",
            AdminBackend {
                disabled: true,
                weight: None,
            },
        );
        s.set("web", "b1", AdminBackend::default());
        assert!(s.services.is_empty());
    }

    #[test]
    fn corrupt_state_is_an_error() {
        let dir = temp_dir("corrupt");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(FILE), b"{ not json").unwrap();
        assert!(matches!(
            AdminState::load(&dir),
            Err(AdminError::Corrupt { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
