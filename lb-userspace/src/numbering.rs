//! The numbers the data path knows things by: each VIP's number (its ring window and
//! counter slot) and each backend's id (what a flow in the connection table points to).
//!
//! The maps outlive the agent (see `pins`), so the next agent must give the same
//! backend the same id, or a flow recorded under an id would be sent to whichever
//! backend has that id now. A fresh agent numbers in config order; after reloads the
//! numbering has a history. It is saved in `state_dir/numbering.json` before any commit
//! that gives out a new number (as admin state is saved before it is applied), and an
//! agent that takes over pinned maps adopts it (`Programmer::adopt`).

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

const FILE: &str = "numbering.json";
const VERSION: u32 = 1;

/// One VIP's number.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VipNumber {
    pub vip: IpAddr,
    pub port: u16,
    pub vip_num: u32,
}

/// One backend's id: (service, address) as everywhere else.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendNumber {
    pub service: String,
    pub address: IpAddr,
    pub id: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Numbering {
    pub vips: Vec<VipNumber>,
    pub backends: Vec<BackendNumber>,
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    #[serde(flatten)]
    numbering: Numbering,
}

#[derive(Debug, thiserror::Error)]
pub enum NumberingError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl Numbering {
    /// The saved numbering, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Self>, NumberingError> {
        let path = dir.join(FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(NumberingError::Io { path, source }),
        };
        let file: File = serde_json::from_str(&text).map_err(|e| NumberingError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if file.version != VERSION {
            return Err(NumberingError::Invalid {
                path,
                reason: format!("version {}, this agent reads {VERSION}", file.version),
            });
        }
        Ok(Some(file.numbering))
    }

    /// Writes it atomically (a temporary file renamed over the old one, synced).
    pub fn save(&self, dir: &Path) -> Result<(), NumberingError> {
        let file = File {
            version: VERSION,
            numbering: self.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
        bytes.push(b'\n');
        crate::statefile::write_atomically(dir, FILE, &bytes)
            .map_err(|(path, source)| NumberingError::Io { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_and_loaded_alike() {
        let dir = std::env::temp_dir().join(format!("lb-numbering-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(Numbering::load(&dir).unwrap(), None);
        let n = Numbering {
            vips: vec![VipNumber {
                vip: "192.0.2.10".parse().unwrap(),
                port: 80,
                vip_num: 3,
            }],
            backends: vec![BackendNumber {
                service: "web".into(),
                address: "192.0.2.21".parse().unwrap(),
                id: 7,
            }],
        };
        n.save(&dir).unwrap();
        assert_eq!(Numbering::load(&dir).unwrap(), Some(n));
        fs::write(
            dir.join(FILE),
            "{\"version\": 9, \"vips\": [], \"backends\": []}",
        )
        .unwrap();
        assert!(Numbering::load(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
