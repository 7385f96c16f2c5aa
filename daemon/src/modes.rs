//! The modes and group of everything the daemon writes: files 0640, directories 0750, the signing key 0600, all
//! in one group (`files.group`; default the daemon's own effective group), whatever the umask.
//!
//! Owns opening files for writing and creating directories; every place the daemon writes a file goes through
//! here (plugin copies aside, which the loader makes). A file is created with its mode, and every file opened
//! here, new or not, then gets exactly that mode and the group on the open descriptor (`fchown`, `fchmod`), so
//! neither the umask nor a set-group-id directory decides them. A directory the daemon creates (and every missing
//! one above it) gets 0750 and the group; an existing directory is left as it is, with a warning (once) when
//! others may enter it or the group may write to it, or when its group is not the configured one.
//!
//! The group is process-wide: `trail::run` sets it once, before anything is created.

use std::collections::HashSet;
use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use tracing::warn;

/// Mode of every file the daemon writes.
pub const FILE: u32 = 0o640;
/// Mode of every directory the daemon creates.
pub const DIR: u32 = 0o750;
/// Mode of the checkpoint signing key.
pub const SECRET: u32 = 0o600;

/// No group configured: files get the daemon's own effective group.
const OWN: u32 = u32::MAX;
static GROUP: AtomicU32 = AtomicU32::new(OWN);

/// Sets the group of everything written from now on; `None` means the daemon's own effective group.
pub fn set_group(gid: Option<u32>) {
    GROUP.store(gid.unwrap_or(OWN), Ordering::Relaxed);
}

fn group() -> (u32, bool) {
    match GROUP.load(Ordering::Relaxed) {
        OWN => (unsafe { libc::getegid() }, false),
        gid => (gid, true),
    }
}

/// Opens `path` as `options` say (they must ask for writing), creating it with `mode`; then gives it exactly
/// `mode` and the group.
pub fn open(path: &Path, options: &mut OpenOptions, mode: u32) -> io::Result<File> {
    let file = options.mode(mode).open(path)?;
    fix(&file, mode)?;
    Ok(file)
}

/// Creates (or truncates) `path` for writing, mode 0640.
pub fn create(path: &Path) -> io::Result<File> {
    open(
        path,
        OpenOptions::new().write(true).create(true).truncate(true),
        FILE,
    )
}

/// Opens `path` for appending, created when missing, mode 0640.
pub fn append(path: &Path) -> io::Result<File> {
    open(path, OpenOptions::new().append(true).create(true), FILE)
}

/// Writes `bytes` as the whole content of `path`, mode 0640 (`std::fs::write` with this module's modes).
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    create(path)?.write_all(bytes)
}

/// Writes `bytes` to a temporary file `tmp` and renames it to `path`; on any failure `tmp` is removed, so that a
/// full disk leaves nothing behind.
pub fn write_aside(tmp: &Path, path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let result = (|| {
        let mut file = create(tmp)?;
        file.write_all(bytes)?;
        if sync {
            file.sync_all()?;
        }
        std::fs::rename(tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

fn fix(file: &File, mode: u32) -> io::Result<()> {
    let meta = file.metadata()?;
    let (gid, _) = group();
    if meta.gid() != gid {
        std::os::unix::fs::fchown(file, None, Some(gid))?;
    }
    // After the chown, which may clear set-id bits.
    if meta.mode() & 0o7777 != mode || meta.gid() != gid {
        file.set_permissions(Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Creates `dir` and every missing directory above it with mode 0750 and the group. An existing `dir` is left as
/// it is; see the module docs for when that is warned about.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            check_existing(dir, &meta);
            Ok(())
        }
        _ => create_missing(dir),
    }
}

fn create_missing(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_missing(parent)?;
    }
    match DirBuilder::new().mode(DIR).create(dir) {
        Ok(()) => fix(&File::open(dir)?, DIR),
        // Created meanwhile by another thread of the daemon: it has its modes.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

fn check_existing(dir: &Path, meta: &std::fs::Metadata) {
    static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let mode = meta.mode() & 0o7777;
    let (gid, configured) = group();
    let open = mode & 0o027 != 0;
    let other_group = configured && meta.gid() != gid;
    if !open && !other_group {
        return;
    }
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if !warned
        .get_or_insert_with(HashSet::new)
        .insert(dir.to_owned())
    {
        return;
    }
    if open {
        warn!(dir = %dir.display(), mode = %format!("{mode:04o}"),
            "an existing directory of the daemon's is open to other users; its mode is left as it is: make it 0750");
    }
    if other_group {
        warn!(dir = %dir.display(), group = meta.gid(), files_group = gid,
            "an existing directory of the daemon's belongs to another group than files.group; it is left as it is");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn modes_do_not_follow_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let old = unsafe { libc::umask(0o077) };
        let nested = dir.path().join("a/b/c");
        create_dir_all(&nested).unwrap();
        let file = nested.join("f");
        write(&file, b"x").unwrap();
        unsafe { libc::umask(0o000) };
        let loose = nested.join("g");
        std::fs::write(&loose, b"x").unwrap();
        std::fs::set_permissions(&loose, Permissions::from_mode(0o666)).unwrap();
        append(&loose).unwrap();
        let key = nested.join("k");
        open(
            &key,
            OpenOptions::new().write(true).create_new(true),
            SECRET,
        )
        .unwrap();
        unsafe { libc::umask(old) };
        for d in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&dir.path().join(d)), DIR, "{d}");
        }
        assert_eq!(mode(&file), FILE);
        assert_eq!(mode(&loose), FILE);
        assert_eq!(mode(&key), SECRET);
    }

    #[test]
    fn a_failed_write_aside_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("x.tmp");
        // The rename fails: the target is a non-empty directory.
        let target = dir.path().join("x");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), b"").unwrap();
        assert!(write_aside(&tmp, &target, b"data", false).is_err());
        assert!(!tmp.exists());
        write_aside(&tmp, &dir.path().join("y"), b"data", true).unwrap();
        assert_eq!(std::fs::read(dir.path().join("y")).unwrap(), b"data");
    }
}
