//! Files the agent keeps in `state_dir` (admin state, numbering): written so that a
//! crash at any moment leaves either the old file or the new one, never half of either.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

/// Writes `dir/name` atomically: a temporary file, fsync, rename, fsync of the
/// directory. On failure, says which path failed.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), (PathBuf, io::Error)> {
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |e| (path, e)
    };
    fs::create_dir_all(dir).map_err(at(dir))?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::File::create(&tmp).map_err(at(&tmp))?;
    f.write_all(bytes).map_err(at(&tmp))?;
    f.sync_all().map_err(at(&tmp))?;
    fs::rename(&tmp, &path).map_err(at(&path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("lb-statefile-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        write_atomically(&dir, "x.json", b"one").unwrap();
        write_atomically(&dir, "x.json", b"two").unwrap();
        assert_eq!(fs::read(dir.join("x.json")).unwrap(), b"two");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
