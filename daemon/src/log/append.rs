//! A file that is only ever appended to, where an append that fails leaves nothing behind.
//!
//! Owns the bookkeeping shared by the log and the spool: how many bytes are known to be complete, and cutting the
//! file back to that length when a write or a sync fails (or, if even that fails, before the next append), so that
//! no half-written group stays in a file between complete ones.

use std::fs::File;
use std::io::Write;

/// Asks the kernel to start writing `count` bytes of `file` from `offset` (`sync_file_range`), without waiting for
/// it to finish (it may wait for room in the device's queue).
pub fn start_writeback(file: &File, offset: u64, count: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is owned by `file`.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            count as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Tells the kernel that `count` bytes of `file` from `offset` will not be read soon (`POSIX_FADV_DONTNEED`): their
/// page-cache pages are freed once clean (pages still dirty or being written back stay).
fn release_cache(file: &File, offset: u64, count: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is owned by `file`.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            count as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// An append-only file and the length of what it holds completely.
#[derive(Debug)]
pub struct AppendFile {
    file: File,
    len: u64,
    /// A failed append may have left bytes after `len`; they are cut before the next append.
    dirty: bool,
    /// Start of the bytes whose writeback has not been started yet (appends without sync).
    unstarted: u64,
    /// Writeback is started every this many bytes appended without sync.
    writeback_every: u64,
    /// How long the last append's sync took (its write not included).
    last_sync: std::time::Duration,
    /// Start of the bytes whose page-cache pages have not been released yet.
    released: u64,
    /// The newest this many bytes stay in the page cache; older ones are released (see [`KEEP_CACHED`]).
    keep_cached: u64,
}

/// Without syncs, writeback of appended bytes is started every this many bytes, so that dirty pages never pile
/// up until the kernel throttles the writer for a long moment.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// The newest this many bytes appended stay in the page cache; older ones, written back by then, are released
/// every [`WRITEBACK_EVERY`] bytes. Without this the page cache grows by every byte the log writes until the
/// kernel reclaims it, and each new page costs the writer a page allocation (on a virtual machine whose host
/// takes back the memory the guest frees, a fault in the host as well); released pages are reused at once. What
/// reads the log soon after it was written (sinks that fell behind the spool's memory, `trail search`, the
/// upkeep's index of a file found with records at start) reads older parts from the disk.
const KEEP_CACHED: u64 = 64 << 20;

impl AppendFile {
    /// Wraps `file`, opened for appending, whose first `len` bytes are complete.
    pub fn new(file: File, len: u64) -> AppendFile {
        AppendFile {
            file,
            len,
            dirty: false,
            unstarted: len,
            writeback_every: WRITEBACK_EVERY,
            last_sync: std::time::Duration::ZERO,
            released: len,
            keep_cached: KEEP_CACHED,
        }
    }

    /// How long the sync of the last append with `sync` took, without its write (for the fsync histogram).
    pub fn last_sync(&self) -> std::time::Duration {
        self.last_sync
    }

    /// Never starts writeback itself (the owner does, see [`start_writeback`]) and leaves the page cache alone.
    pub fn without_writeback(mut self) -> AppendFile {
        self.writeback_every = u64::MAX;
        self.keep_cached = u64::MAX;
        self
    }

    /// Bytes known to be complete.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the file holds nothing complete.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The underlying file (for syncs and clones; never write to it directly).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Appends `bytes` and, with `sync`, syncs them (`fdatasync`). On failure nothing of `bytes` remains.
    pub fn append(&mut self, bytes: &[u8], sync: bool) -> std::io::Result<()> {
        if self.dirty {
            self.file.set_len(self.len)?;
            self.dirty = false;
        }
        let written = self.file.write_all(bytes).and_then(|()| {
            if !sync {
                return Ok(());
            }
            let started = std::time::Instant::now();
            let synced = self.file.sync_data();
            self.last_sync = started.elapsed();
            synced
        });
        match written {
            Ok(()) => {
                self.len += bytes.len() as u64;
                if sync {
                    self.unstarted = self.len;
                } else if self.len - self.unstarted >= self.writeback_every {
                    self.start_writeback();
                }
                if self.len - self.released >= self.keep_cached.saturating_add(WRITEBACK_EVERY) {
                    let upto = self.len - self.keep_cached;
                    release_cache(&self.file, self.released, upto - self.released);
                    self.released = upto;
                }
                Ok(())
            }
            Err(e) => {
                self.dirty = self.file.set_len(self.len).is_err();
                Err(e)
            }
        }
    }

    /// Asks the kernel to start writing the bytes appended since the last time, without waiting for it.
    fn start_writeback(&mut self) {
        start_writeback(&self.file, self.unstarted, self.len - self.unstarted);
        self.unstarted = self.len;
    }

    /// Takes back the last `bytes` appended (their group could not be completed elsewhere).
    pub fn undo(&mut self, bytes: u64) {
        self.len = self.len.saturating_sub(bytes);
        self.unstarted = self.unstarted.min(self.len);
        self.released = self.released.min(self.len);
        self.dirty = self.file.set_len(self.len).is_err();
        if !self.dirty {
            let _ = self.file.sync_data();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_and_takes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap()
        };
        let mut f = AppendFile::new(open(), 0);
        f.append(b"one\n", true).unwrap();
        f.append(b"two\n", false).unwrap();
        assert_eq!(f.len(), 8);
        f.undo(4);
        assert_eq!(std::fs::read(&path).unwrap(), b"one\n");
        f.append(b"three\n", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\nthree\n");
        // A write that fails (a read-only handle) leaves nothing and the length unchanged.
        let mut ro = AppendFile::new(std::fs::File::open(&path).unwrap(), 10);
        assert!(ro.append(b"four\n", true).is_err());
        assert_eq!(ro.len(), 10);
        assert_eq!(std::fs::read(&path).unwrap(), b"one\nthree\n");
    }

    /// Resident page-cache pages of `file`'s first `len` bytes, one flag per page (`mincore` of a mapping).
    fn resident(file: &File, len: usize) -> Vec<bool> {
        use std::os::fd::AsRawFd;
        let page = 4096;
        let pages = len.div_ceil(page);
        let mut flags = vec![0u8; pages];
        // SAFETY: a read-only shared mapping of an open file, only passed to mincore and unmapped again.
        unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(at, libc::MAP_FAILED);
            assert_eq!(libc::mincore(at, len, flags.as_mut_ptr()), 0);
            libc::munmap(at, len);
        }
        flags.iter().map(|f| f & 1 == 1).collect()
    }

    /// Bytes more than `KEEP_CACHED` behind the end leave the page cache once clean; the newest stay; a file
    /// without writeback (the spool's) keeps everything.
    #[test]
    fn the_page_cache_is_released_behind_the_newest_bytes() {
        // Beside the test binary, on the disk the build uses: the system's temporary directory may be a tmpfs,
        // whose pages are the files themselves and are never released.
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir_in(exe.parent().unwrap()).unwrap();
        let chunk = vec![b'x'; 1 << 20];
        let total = (KEEP_CACHED + 3 * WRITEBACK_EVERY) as usize;
        let write = |name: &str, spool: bool| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(dir.path().join(name))
                .unwrap();
            let mut f = AppendFile::new(file, 0);
            if spool {
                f = f.without_writeback();
            }
            for _ in 0..total / chunk.len() {
                // Synced, so every page is clean when its turn to be released comes.
                f.append(&chunk, true).unwrap();
            }
            resident(f.file(), total)
        };
        let log = write("log", false);
        let pages = |bytes: u64| (bytes / 4096) as usize;
        let released = pages(KEEP_CACHED + 3 * WRITEBACK_EVERY - KEEP_CACHED - WRITEBACK_EVERY);
        assert!(
            log[..released].iter().all(|r| !r),
            "{} of the first {released} pages still cached",
            log[..released].iter().filter(|r| **r).count()
        );
        // Kept, not pinned: under memory pressure the kernel may still reclaim some of them.
        let mostly = |flags: &[bool]| flags.iter().filter(|r| **r).count() * 10 >= flags.len() * 9;
        let newest = pages(KEEP_CACHED);
        assert!(
            mostly(&log[log.len() - newest..]),
            "the newest {newest} pages were released"
        );
        let spool = write("spool", true);
        assert!(mostly(&spool), "the spool's pages were released");
    }
}
