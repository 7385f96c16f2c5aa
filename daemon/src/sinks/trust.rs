//! Which plugin libraries the daemon trusts enough to load: a library runs with the daemon's privileges, so anyone
//! who can change it, or rename another file into its place, can run code as the daemon's user.
//!
//! The rule (OpenSSH's and sudo's for files they trust), applied to every path from `/` down to the library, with
//! symbolic links resolved:
//!
//! - every directory on the path and the library itself is owned by root or by the daemon's (effective) user;
//! - none of them is writable by group or others, with one exception: a directory with the sticky bit set (like
//!   `/tmp`, mode 1777) may be writable by others when the next component below it is not writable by group or
//!   others (and, like every component, owned by root or the daemon's user), since the sticky bit keeps others
//!   from renaming or removing an entry they do not own;
//! - the library is a regular file.
//!
//! The directory holding the library's directory entry (`plugins_dir`, whose entry may be a symbolic link) is
//! checked the same way, and must itself not be writable by group or others even when sticky. Group ownership is
//! not looked at, and neither are ACLs. This module only judges; it never changes a mode or an owner.

use std::fs::{self, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Checks `dir` (resolved) and every directory above it.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let real = fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    check_chain(&chain(&real, None)?)
}

/// Checks the library at `real` (a resolved path) whose metadata, taken from the open file that will be copied,
/// is `meta`, and every directory above it.
pub fn check_file(real: &Path, meta: &Metadata) -> Result<(), String> {
    if !meta.file_type().is_file() {
        return Err(format!("{} is not a regular file", real.display()));
    }
    check_chain(&chain(real, Some(meta))?)
}

/// `real` and its ancestors, from `/` down, with their metadata (`last` for `real` itself when given).
fn chain(real: &Path, last: Option<&Metadata>) -> Result<Vec<(PathBuf, Metadata)>, String> {
    let mut paths: Vec<&Path> = real.ancestors().collect();
    paths.reverse();
    paths
        .into_iter()
        .map(|p| {
            let meta = match last {
                Some(m) if p == real => m.clone(),
                _ => fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()))?,
            };
            Ok((p.to_owned(), meta))
        })
        .collect()
}

fn check_chain(chain: &[(PathBuf, Metadata)]) -> Result<(), String> {
    let me = unsafe { libc::geteuid() };
    for (i, (path, meta)) in chain.iter().enumerate() {
        let uid = meta.uid();
        if uid != 0 && uid != me {
            return Err(format!(
                "{} is owned by uid {uid}, not by root or the daemon's user (uid {me}): that user could \
                 replace the plugin; chown it",
                path.display()
            ));
        }
        if meta.file_type().is_symlink() {
            return Err(format!(
                "{} became a symbolic link while being checked",
                path.display()
            ));
        }
        let mode = meta.mode();
        if mode & 0o022 == 0 {
            continue;
        }
        let sticky = meta.is_dir() && mode & 0o1000 != 0;
        let next_locked = chain.get(i + 1).is_some_and(|(_, m)| m.mode() & 0o022 == 0);
        if sticky && next_locked {
            continue;
        }
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "group and others",
            (true, false) => "group",
            _ => "others",
        };
        return Err(format!(
            "{} is writable by {who} (mode {:04o}): whoever can write it can run code in the daemon; \
             chmod go-w it",
            path.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn modes_on_the_path_decide() {
        // Temp dirs are under /tmp, sticky and writable by all: what is below it decides.
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        fs::create_dir(&plugins).unwrap();
        let lib = plugins.join("libx.so");
        fs::write(&lib, b"x").unwrap();
        set_mode(&plugins, 0o755);
        let check = |lib: &Path| {
            let real = fs::canonicalize(lib).unwrap();
            check_file(&real, &fs::metadata(&real).unwrap())
        };
        for (mode, ok) in [(0o644, true), (0o755, true), (0o664, false), (0o646, false)] {
            set_mode(&lib, mode);
            assert_eq!(check(&lib).is_ok(), ok, "library mode {mode:o}");
        }
        set_mode(&lib, 0o644);
        assert!(check_dir(&plugins).is_ok());
        // A group-writable directory on the path, and a sticky one at the end of it.
        for mode in [0o775, 0o1777] {
            set_mode(&plugins, mode);
            let e = check_dir(&plugins).unwrap_err();
            assert!(e.contains("plugins is writable by"), "{e}");
        }
        // A sticky world-writable directory with a locked entry below it is fine (like /tmp).
        set_mode(&plugins, 0o1777);
        assert!(check(&lib).is_ok());
        // But not when the entry below it is writable too.
        set_mode(dir.path(), 0o1777);
        assert!(
            check(&lib)
                .unwrap_err()
                .contains("writable by group and others")
        );
        set_mode(dir.path(), 0o700);
        assert!(check(&plugins).unwrap_err().contains("not a regular file"));
    }
}
