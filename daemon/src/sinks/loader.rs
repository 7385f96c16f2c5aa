//! Loading sink plugin libraries.
//!
//! Owns the private directory of library copies, the rule that picks a library for a plugin name without running
//! it ([`identify`]), and the load sequence: [`Loader::load`] opens the installed file, checks who may change it
//! ([`super::trust`]) on the open file, reads it whole, checks that it is a complete ELF file, writes the bytes to a
//! path never used before in the private directory (the dynamic loader returns the already-loaded object for a
//! known path or inode, so loading a replaced file from its installed path would silently keep the old code),
//! logs which file it is about to load (a constructor that crashes the process is then named by the last log line),
//! and calls abi_stable's `lib_header_from_path(copy)?.init_root_module()` (never `RootModule::load_from_file`,
//! which caches the first module per type). abi_stable never unloads a library: every load stays mapped until the
//! process exits, which is what keeps the `'static` data plugins hand out valid; [`Loader::libraries`] counts them.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use abi_stable::library::{LibraryError, lib_header_from_path};
use abi_stable::sabi_types::VersionNumber;
use abi_stable::std_types::RStr;
use object::{Object, ObjectSegment, ObjectSymbol};
use trail_plugin_api::{Host, HostCallbacks, LogLevel, SinkBox, SinkError, SinkPluginRef};

use super::trust;
use crate::audit::Build;

/// A plugin library that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("plugin {}: {}{kind}", file.display(), if kind.is_refused() { "refused: " } else { "" })]
pub struct LoadError {
    /// The installed library.
    pub file: PathBuf,
    /// What went wrong.
    pub kind: LoadErrorKind,
}

/// Why a plugin library could not be loaded; the text is the reason given to people and to audit events.
#[derive(Debug, thiserror::Error)]
pub enum LoadErrorKind {
    /// The library, or a directory on its path, could be changed by someone other than root or the daemon's user
    /// (see [`super::trust`]); nothing of it ran.
    #[error("{0}")]
    Refused(String),
    /// The file could not be opened, examined or read.
    #[error("cannot read it: {0}")]
    Unreadable(std::io::Error),
    /// Its real path could not be found.
    #[error("cannot resolve it: {0}")]
    Unresolvable(std::io::Error),
    /// Another file took its place between opening and checking.
    #[error("it was replaced while being checked; it will be looked at again")]
    Replaced,
    /// Not a complete 64-bit little-endian ELF file.
    #[error("{0}")]
    NotElf(String),
    /// The private copy could not be written.
    #[error("cannot copy it to {}: {source}", copy.display())]
    Copy {
        /// Where the copy was to go.
        copy: PathBuf,
        /// Why it could not be written.
        source: std::io::Error,
    },
    /// The dynamic loader or abi_stable refused it (another API, not a plugin, a broken library).
    #[error("{0}")]
    Library(String),
    /// Loaded, it declares another plugin name than the one it was picked for.
    #[error(
        "it was picked for the plugin {picked:?} but declares {declared:?} when loaded; rebuild it or rename the file"
    )]
    Misnamed {
        /// The name it was picked for (from its symbol table or file name).
        picked: String,
        /// The name its root module gives.
        declared: String,
    },
}

impl LoadErrorKind {
    /// Whether the library was refused for who may change it, rather than failing to load.
    pub fn is_refused(&self) -> bool {
        matches!(self, LoadErrorKind::Refused(_))
    }
}

impl LoadError {
    /// Whether the library was refused for who may change it (nothing of it ran).
    pub fn refused(&self) -> bool {
        self.kind.is_refused()
    }

    /// What went wrong, for people, without the file's name.
    pub fn reason(&self) -> String {
        self.kind.to_string()
    }
}

/// What identifies one version of an installed file, its owner and mode included (fixing a refused library's
/// mode makes it a new version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    mode: u32,
    uid: u32,
}

impl FileStamp {
    /// The stamp of `path` now.
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        Ok(FileStamp::from(&fs::metadata(path)?))
    }

    fn from(meta: &fs::Metadata) -> FileStamp {
        FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: meta.ino(),
            mode: meta.mode(),
            uid: meta.uid(),
        }
    }
}

/// One loaded build of a plugin.
pub struct Plugin {
    /// The name the plugin declares.
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// The plugin API version it was built against.
    pub api_version: String,
    /// The installed file it was loaded from.
    pub file: PathBuf,
    /// The installed file's stamp when it was copied.
    pub stamp: FileStamp,
    module: SinkPluginRef,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Plugin {
    /// Creates an instance for the sink `sink`; call it on the thread that will drive the instance.
    pub fn instantiate(&self, sink: &str, config_json: &str) -> Result<SinkBox, SinkError> {
        let new = self.module.new();
        new(
            RStr::from_str(config_json),
            Host::new(HostLog {
                sink: sink.to_owned(),
            }),
        )
        .into_result()
    }

    /// What audit events say about this build.
    pub fn build(&self) -> Build<'_> {
        Build {
            name: &self.name,
            version: &self.version,
            api_version: &self.api_version,
            file: &self.file,
        }
    }

    /// `name version (api X.Y)` for logs.
    pub fn describe(&self) -> String {
        self.build().describe()
    }
}

/// The plugin name an installed library is known by, found without loading it.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The name it declares in its name symbol ([`trail_plugin_api::NAME_SYMBOL`]), or, for a library without
    /// one (built against plugin API 1.0, or not a readable ELF file), its file name without `lib` and `.so`.
    pub name: String,
    /// Why the file's name symbol could not be read, when it could not.
    pub unreadable: Option<String>,
}

/// Which plugin the library at `file` holds, read from its ELF dynamic symbol table: no code of it runs.
pub fn identify(file: &Path) -> Identity {
    let by_file_name = || {
        let stem = file.file_stem().unwrap_or_default().to_string_lossy();
        stem.strip_prefix("lib").unwrap_or(&stem).to_owned()
    };
    match declared_name(file) {
        Ok(Some(name)) => Identity {
            name,
            unreadable: None,
        },
        Ok(None) => Identity {
            name: by_file_name(),
            unreadable: None,
        },
        Err(e) => Identity {
            name: by_file_name(),
            unreadable: Some(e),
        },
    }
}

/// The name in `file`'s name symbol; `None` when it exports none.
fn declared_name(file: &Path) -> Result<Option<String>, String> {
    let f = fs::File::open(file).map_err(|e| format!("cannot read it: {e}"))?;
    let data = object::ReadCache::new(f);
    let elf = object::read::elf::ElfFile64::<object::Endianness, _>::parse(&data)
        .map_err(|e| format!("not a shared library (not a 64-bit ELF file: {e})"))?;
    let Some(symbol) = elf
        .dynamic_symbols()
        .find(|s| s.name_bytes() == Ok(trail_plugin_api::NAME_SYMBOL.as_bytes()))
    else {
        return Ok(None);
    };
    let (address, size) = (symbol.address(), symbol.size());
    if size == 0 || size > 1024 {
        return Err(format!(
            "its plugin name symbol has an unlikely size ({size} bytes)"
        ));
    }
    let bytes = elf
        .segments()
        .find_map(|seg| seg.data_range(address, size).ok().flatten())
        .ok_or("its plugin name symbol points outside the file's contents")?;
    String::from_utf8(bytes.to_vec())
        .map(Some)
        .map_err(|_| "its plugin name symbol is not UTF-8".into())
}

/// Loads libraries through private copies.
#[derive(Debug)]
pub struct Loader {
    copies: PathBuf,
    /// Removes a temporary directory of copies when the loader is dropped.
    _temporary: Option<tempfile::TempDir>,
    counter: AtomicU64,
    libraries: AtomicU64,
}

impl Loader {
    /// A loader whose copies go to `copies`, created afresh with mode 0700 (whatever was there is removed first:
    /// copies of earlier runs are not mapped by this process). Its parent must exist; the daemon uses its own
    /// spool directory.
    pub fn new(copies: &Path) -> std::io::Result<Loader> {
        match fs::symlink_metadata(copies) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(copies)?,
            Ok(_) => fs::remove_file(copies)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Fails if something appeared there meanwhile, rather than using it.
        fs::DirBuilder::new().mode(0o700).create(copies)?;
        Ok(Loader::with(copies.to_owned(), None))
    }

    /// A loader whose copies go to a new directory with a random name and mode 0700 in the system's temporary
    /// directory (`$TMPDIR` or `/tmp`), removed when the loader is dropped.
    pub fn temporary() -> std::io::Result<Loader> {
        let dir = tempfile::Builder::new()
            .prefix("trail-plugin-copies.")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()?;
        Ok(Loader::with(dir.path().to_owned(), Some(dir)))
    }

    fn with(copies: PathBuf, temporary: Option<tempfile::TempDir>) -> Loader {
        Loader {
            copies,
            _temporary: temporary,
            counter: AtomicU64::new(0),
            libraries: AtomicU64::new(0),
        }
    }

    /// Number of libraries mapped by this process so far (loads are never undone).
    pub fn libraries(&self) -> u64 {
        self.libraries.load(Ordering::Relaxed)
    }

    /// Loads the library installed at `file`, which [`identify`] picked for the plugin `name`.
    pub fn load(&self, file: &Path, name: &str) -> Result<Plugin, LoadError> {
        let fail = |kind| LoadError {
            file: file.to_owned(),
            kind,
        };
        let (bytes, stamp) = read_trusted(file).map_err(fail)?;
        elf_complete(&bytes).map_err(|e| fail(LoadErrorKind::NotElf(e)))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let stem = file.file_stem().unwrap_or_default().to_string_lossy();
        let copy = self.copies.join(format!("{stem}.{n}.so"));
        if let Err(source) = write_copy(&copy, &bytes) {
            return Err(fail(LoadErrorKind::Copy { copy, source }));
        }
        tracing::info!(file = %file.display(), plugin = name, copy = %copy.display(), "loading plugin library");
        let loaded =
            lib_header_from_path(&copy).and_then(|h| h.init_root_module::<SinkPluginRef>());
        // The mapping outlives the file; the copy is not needed any more.
        let _ = fs::remove_file(&copy);
        let module = loaded.map_err(|e| fail(LoadErrorKind::Library(explain(e))))?;
        self.libraries.fetch_add(1, Ordering::Relaxed);
        let declared = module.name().to_string();
        if declared != name {
            return Err(fail(LoadErrorKind::Misnamed {
                picked: name.to_owned(),
                declared,
            }));
        }
        Ok(Plugin {
            name: declared,
            version: module.version().to_string(),
            api_version: module.api_version().to_string(),
            file: file.to_owned(),
            stamp,
            module,
        })
    }
}

/// Reads the library at `file` whole, from one open file whose owner and mode, and the directories above it
/// (and above its directory entry, which may be a symbolic link), are checked first ([`trust`]).
fn read_trusted(file: &Path) -> Result<(Vec<u8>, FileStamp), LoadErrorKind> {
    use LoadErrorKind::{Refused, Replaced, Unreadable, Unresolvable};
    let mut f = fs::File::open(file).map_err(Unreadable)?;
    let meta = f.metadata().map_err(Unreadable)?;
    let entry_dir = file.parent().unwrap_or(Path::new("."));
    trust::check_dir(entry_dir).map_err(Refused)?;
    let real = fs::canonicalize(file).map_err(Unresolvable)?;
    let at_real = fs::metadata(&real).map_err(Unreadable)?;
    if (at_real.dev(), at_real.ino()) != (meta.dev(), meta.ino()) {
        return Err(Replaced);
    }
    trust::check_file(&real, &meta).map_err(Refused)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.read_to_end(&mut bytes).map_err(Unreadable)?;
    Ok((bytes, FileStamp::from(&meta)))
}

/// Writes a private copy: a new file (never an existing one, never through a symbolic link), mode 0700.
fn write_copy(copy: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(copy)?;
    f.write_all(bytes)
}

/// Checks that `file` is a complete 64-bit little-endian ELF file: its section and program headers, and every
/// segment they describe, lie within the file. A library still being written fails this (mapping a truncated
/// library can crash the process later, when code beyond the end of the file is touched).
pub fn check_complete(file: &Path) -> Result<(), String> {
    let bytes = fs::read(file).map_err(|e| format!("cannot read it: {e}"))?;
    elf_complete(&bytes)
}

fn elf_complete(b: &[u8]) -> Result<(), String> {
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as u64)
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
    };
    if b.get(..4) != Some(b"\x7fELF") {
        return Err("not a shared library (no ELF header)".into());
    }
    if b.get(4..6) != Some(&[2, 1]) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let short = || "incomplete (truncated ELF file; is it still being written?)".to_string();
    let size = b.len() as u64;
    let (phoff, shoff) = (
        u64_at(0x20).ok_or_else(short)?,
        u64_at(0x28).ok_or_else(short)?,
    );
    let (phentsize, phnum) = (
        u16_at(0x36).ok_or_else(short)?,
        u16_at(0x38).ok_or_else(short)?,
    );
    let (shentsize, shnum) = (
        u16_at(0x3a).ok_or_else(short)?,
        u16_at(0x3c).ok_or_else(short)?,
    );
    if shoff + shentsize * shnum > size || phoff + phentsize * phnum > size {
        return Err(short());
    }
    for i in 0..phnum {
        let h = (phoff + i * phentsize) as usize;
        let (offset, filesz) = (
            u64_at(h + 8).ok_or_else(short)?,
            u64_at(h + 32).ok_or_else(short)?,
        );
        if offset.saturating_add(filesz) > size {
            return Err(short());
        }
    }
    Ok(())
}

fn explain(e: LibraryError) -> String {
    match e {
        LibraryError::AbiInstability(_) => format!(
            "built against an incompatible plugin API (its types' layout differs from this daemon's \
             trail-plugin-api {}); rebuild it against this version: {e}",
            trail_plugin_api::API_VERSION
        ),
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => other_major(expected_version, actual_version),
        LibraryError::GetSymbolError { .. } => {
            format!("not a trail sink plugin (it exports no plugin root module): {e}")
        }
        other => format!("cannot be loaded: {other}"),
    }
}

/// The one-line reason for a library built against another major version of `trail-plugin-api` than the daemon's
/// (`ours`): both versions and what to do, instead of abi_stable's multi-line message.
fn other_major(ours: VersionNumber, theirs: VersionNumber) -> String {
    // Under semver, 0.y versions are compatible only within the same y.
    let series = match ours.major {
        0 => format!("0.{}.x", ours.minor),
        major => format!("{major}.x"),
    };
    format!(
        "built for trail-plugin-api {theirs}; this daemon speaks {series} ({ours}): rebuild it against \
         trail-plugin-api {series}"
    )
}

/// The daemon's side of the plugin's logging callback: lines land in the daemon's log, tagged with the sink.
struct HostLog {
    sink: String,
}

impl HostCallbacks for HostLog {
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        let (sink, message) = (self.sink.as_str(), message.as_str());
        match level.or_info() {
            LogLevel::ERROR => tracing::error!(target: "trail::plugin", sink, "{message}"),
            LogLevel::WARN => tracing::warn!(target: "trail::plugin", sink, "{message}"),
            LogLevel::DEBUG => tracing::debug!(target: "trail::plugin", sink, "{message}"),
            LogLevel::TRACE => tracing::trace!(target: "trail::plugin", sink, "{message}"),
            _ => tracing::info!(target: "trail::plugin", sink, "{message}"),
        }
    }

    fn sink_name(&self) -> RStr<'_> {
        RStr::from_str(&self.sink)
    }
}

/// The plugin libraries (`*.so`) installed in `dir`, sorted; hidden files (e.g. an install in progress) are skipped.
pub fn installed(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_library(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Whether `path` names a plugin library (`*.so`, not hidden).
pub fn is_library(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "so")
        && !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_major_is_one_line_with_both_versions() {
        let v = |major, minor, patch| VersionNumber {
            major,
            minor,
            patch,
        };
        let check = |ours, theirs, expected: &str| assert_eq!(other_major(ours, theirs), expected);
        check(
            v(1, 0, 1),
            v(2, 0, 0),
            "built for trail-plugin-api 2.0.0; this daemon speaks 1.x (1.0.1): rebuild it against trail-plugin-api 1.x",
        );
        check(
            v(0, 3, 0),
            v(0, 2, 9),
            "built for trail-plugin-api 0.2.9; this daemon speaks 0.3.x (0.3.0): rebuild it against trail-plugin-api 0.3.x",
        );
    }

    #[test]
    fn only_complete_libraries_pass() {
        let exe = fs::read("/proc/self/exe").unwrap();
        assert_eq!(elf_complete(&exe), Ok(()));
        for cut in [exe.len() - 1, exe.len() / 2, 100, 10, 0] {
            assert!(elf_complete(&exe[..cut]).is_err(), "cut at {cut}");
        }
        assert!(
            elf_complete(b"#!/bin/sh\necho\n")
                .unwrap_err()
                .contains("no ELF header")
        );
    }
}
