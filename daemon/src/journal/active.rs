//! The log file being appended to: opening (and recovering) the newest file at start, where numbering and the
//! chain stand, rotation to a new file, the `current` symlink, and the file list a checkpoint signs.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use tracing::{error, warn};

use crate::clock;
use crate::log::append::AppendFile;
use crate::log::checkpoint;
use crate::log::files::{self, CURRENT, file_name};
use crate::log::recovery::{Error, chain_head, io_error, recover};
use crate::log::{chain, index};

use super::Options;
use super::group::Head;

/// The log file being appended to, and the chain's head.
pub(super) struct ActiveFile {
    pub(super) dir: PathBuf,
    pub(super) path: PathBuf,
    /// The file, and how many of its bytes are complete records.
    pub(super) out: AppendFile,
    pub(super) next_seq: u64,
    /// UTC start of the file (from its name), seconds.
    start: i64,
    /// First `seq` of the file (from its name).
    first_seq: u64,
    /// The hash of the last record in the log (any file), or the genesis value.
    pub(super) chain: chain::Hash,
    /// The last record's `seq` in this file.
    last_seq: Option<u64>,
    /// The last record's `seq` in the whole log.
    pub(super) last_seq_any: Option<u64>,
    /// Checkpoint entries of closed files, by name (they do not change once closed).
    closed: HashMap<String, checkpoint::FileEntry>,
    /// The file's index, built from the records as they are committed when the file was started by this writer
    /// (a file found with records at start is indexed by the upkeep, from the file, once closed).
    index: Option<index::Builder>,
}

impl ActiveFile {
    pub(super) fn open(dir: &Path) -> Result<ActiveFile, Error> {
        crate::modes::create_dir_all(dir).map_err(io_error(dir))?;
        let files = files::list(dir).map_err(io_error(dir))?;
        let Some(newest) = files.last().filter(|f| !f.compressed) else {
            let (chain, last) = chain_head(dir, &files, u64::MAX);
            let next = last
                .map_or(1, |s| s + 1)
                .max(files.last().map_or(1, |f| f.first_seq));
            let mut log = ActiveFile::create(dir, next, chain)?;
            log.last_seq_any = last;
            return Ok(log);
        };
        let (len, last) = recover(&newest.path)?;
        let next_seq = match &last {
            Some(head) => head.seq + 1,
            None => newest.first_seq,
        };
        let (chain, last_seq_any) = match last.as_ref().and_then(|h| h.hash.as_deref()) {
            Some(hex) => match chain::parse_hex(hex.as_bytes()) {
                Some(h) => (h, last.as_ref().map(|h| h.seq)),
                None => (chain::GENESIS, None),
            },
            None if last.is_some() => {
                warn!(file = %newest.path.display(), "the last record has no hash: the hash chain starts again here");
                (chain::GENESIS, last.as_ref().map(|h| h.seq))
            }
            None => chain_head(dir, &files[..files.len() - 1], next_seq),
        };
        let file = crate::modes::open(
            &newest.path,
            OpenOptions::new().append(true),
            crate::modes::FILE,
        )
        .map_err(io_error(&newest.path))?;
        Ok(ActiveFile {
            dir: dir.to_owned(),
            path: newest.path.clone(),
            out: AppendFile::new(file, len),
            next_seq,
            start: newest.start,
            first_seq: newest.first_seq,
            chain,
            last_seq: last.map(|h| h.seq),
            last_seq_any,
            closed: HashMap::new(),
            index: (len == 0).then(|| index::Builder::new(&newest.name)),
        })
    }

    fn create(dir: &Path, first_seq: u64, chain: chain::Hash) -> Result<ActiveFile, Error> {
        let now = clock::now();
        let path = dir.join(file_name(now, first_seq));
        let file = crate::modes::open(
            &path,
            OpenOptions::new().append(true).create_new(true),
            crate::modes::FILE,
        )
        .map_err(io_error(&path))?;
        sync_dir(dir)?;
        Ok(ActiveFile {
            dir: dir.to_owned(),
            path,
            out: AppendFile::new(file, 0),
            next_seq: first_seq,
            start: clock::unix_secs(now),
            first_seq,
            chain,
            last_seq: None,
            last_seq_any: None,
            closed: HashMap::new(),
            index: Some(index::Builder::new(&file_name(now, first_seq))),
        })
    }

    /// Adds records committed at offset `from` to the file's index.
    pub(super) fn committed(&mut self, from: u64, records: &[u8]) {
        if let Some(index) = &mut self.index {
            index.lines(from, records);
        }
    }

    /// Moves numbering and chain to where a committed group left them; true when the group held a persisted
    /// record (the log changed).
    pub(super) fn advance(&mut self, head: Head) -> bool {
        self.next_seq = head.next_seq;
        let Some(last) = head.last_persisted else {
            return false;
        };
        self.chain = head.chain;
        self.last_seq = Some(last);
        self.last_seq_any = Some(last);
        true
    }

    /// Whether the file should be closed before `bytes` more are appended: the clock passed a period boundary,
    /// or the file would grow past `max_file_bytes`.
    pub(super) fn rotation_due(&self, options: &Options, bytes: u64) -> bool {
        let by_time = options.rotate.period_secs().is_some_and(|p| {
            clock::unix_secs(clock::now()).div_euclid(p) != self.start.div_euclid(p)
        });
        by_time || (!self.out.is_empty() && self.out.len() + bytes > options.max_file_bytes)
    }

    /// Closes this file and continues in a new one; returns the closed file's name.
    pub(super) fn rotate(&mut self) -> Result<String, Error> {
        // With `fsync: always` every group is already synced; with `never` the closed file may hold hundreds of
        // MiB not yet on disk. Either way the writer does not wait for that: the file is synced in the background.
        let file = self.out.file().try_clone().map_err(io_error(&self.path))?;
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("trail-log-sync".into())
            .spawn(move || {
                if let Err(e) = file.sync_all() {
                    error!(file = %path.display(), error = %e, "cannot sync a closed log file");
                }
            })
            .map_err(io_error(&self.path))?;
        let closed = self.entry();
        // The closed file's index, so that the upkeep need not read the file back (most of it is out of the page
        // cache by now, see `log::append`). A failure only leaves the upkeep to build it.
        if let Some(builder) = self.index.take()
            && let Some(file) = files::LogFile::parse(&self.path)
            && let Err(e) = index::store(&file, &builder.finish(self.out.len()))
        {
            warn!(file = %self.path.display(), error = %e, "cannot write the index of a closed log file");
        }
        let mut next = ActiveFile::create(&self.dir, self.next_seq, self.chain)?;
        next.last_seq_any = self.last_seq_any;
        next.closed = std::mem::take(&mut self.closed);
        next.closed.insert(closed.name.clone(), closed.clone());
        *self = next;
        self.point_current();
        Ok(closed.name)
    }

    /// This file as a checkpoint lists it.
    fn entry(&self) -> checkpoint::FileEntry {
        checkpoint::FileEntry {
            name: self
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned(),
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            bytes: self.out.len(),
            last_hash: self.last_seq.map(|_| chain::hex(&self.chain)),
        }
    }

    /// Every log file present, as a checkpoint lists them (closed files are read once, then remembered).
    pub(super) fn entries(&mut self) -> std::io::Result<Vec<checkpoint::FileEntry>> {
        let mut entries = Vec::new();
        for f in files::list(&self.dir)? {
            if f.path == self.path {
                continue;
            }
            let entry = match self.closed.get(&f.name) {
                Some(e) => e.clone(),
                None => {
                    let e = index::summary(&f)?;
                    self.closed.insert(f.name.clone(), e.clone());
                    e
                }
            };
            entries.push(entry);
        }
        self.closed
            .retain(|name, _| entries.iter().any(|e| &e.name == name));
        entries.push(self.entry());
        Ok(entries)
    }

    /// Points the `current` symlink of the log directory at this file.
    pub(super) fn point_current(&self) {
        let Some(name) = self.path.file_name() else {
            return;
        };
        let tmp = self.dir.join(".current.tmp");
        let _ = std::fs::remove_file(&tmp);
        let result = std::os::unix::fs::symlink(name, &tmp)
            .and_then(|()| std::fs::rename(&tmp, self.dir.join(CURRENT)));
        if let Err(e) = result {
            warn!(dir = %self.dir.display(), error = %e, "cannot update the `current` symlink");
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}
