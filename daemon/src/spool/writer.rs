//! The writer's end of the spool, owned by the journal thread, and the spool's sync thread.

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use tracing::{error, warn};

use crate::config::WhenFull;
use crate::log::append::AppendFile;
use crate::record::line::event_type;

use super::log_source::LogSource;
use super::memory::Block;
use super::{CLEAN, Error, Group, Shared, io_error};

/// The writer's end, owned by the journal thread.
pub struct Writer {
    pub(super) shared: Arc<Shared>,
    /// The segment being appended to.
    pub(super) out: AppendFile,
    /// Its start position.
    pub(super) start: u64,
    pub(super) segment_bytes: u64,
    /// `fsync: always`: groups sync the spool when they need to (see [`Writer::append`]), with closed segments and
    /// the directory entries of new ones.
    pub(super) sync: bool,
    /// A segment file was created since the last sync: the next sync includes the directory.
    pub(super) created: bool,
    /// The segment holds a synced record, so that after a crash the spool's last record is known.
    pub(super) anchored: bool,
    /// The segment closed last, synced with the first group of the next one (`fsync: always`).
    pub(super) closing: Option<File>,
    /// Writeback of the segment was asked for up to here.
    pub(super) written_back: u64,
    /// The spool was closed cleanly before this start: it lacks nothing.
    pub(super) clean_start: bool,
    pub(super) last_seq: Option<u64>,
    pub(super) syncer: mpsc::Sender<SyncRequest>,
}

/// A sync running on the spool's sync thread.
pub struct PendingSync(std::io::Result<mpsc::Receiver<std::io::Result<()>>>);

impl PendingSync {
    /// Waits for the sync to finish.
    pub fn wait(self) -> std::io::Result<()> {
        self.0?
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spool's sync thread has stopped")))
    }
}

/// Work for the spool's sync thread, so that the journal writer never waits for the disk because of the spool.
pub(super) enum SyncRequest {
    /// Sync segment files (and the directory, when a segment was created since the last sync); answer.
    Sync {
        files: Vec<File>,
        dir: Option<PathBuf>,
        reply: mpsc::Sender<std::io::Result<()>>,
    },
    /// Start writing back part of a segment (see [`WRITEBACK_BYTES`]).
    Writeback { file: File, offset: u64, len: u64 },
}

/// Writeback of a spool segment starts every this many bytes appended: the references of groups that need no
/// sync of the spool (see [`Writer::append`]) are on their way to the disk anyway, and the sync that goes with
/// closing a segment waits for little.
pub(super) const WRITEBACK_BYTES: u64 = 1 << 20;

/// Starts the thread that syncs spool files for the writer; it ends when the writer is dropped.
pub(super) fn start_syncer() -> std::io::Result<mpsc::Sender<SyncRequest>> {
    let (tx, rx) = mpsc::channel::<SyncRequest>();
    std::thread::Builder::new()
        .name("trail-spool-sync".into())
        .spawn(move || {
            for request in rx {
                match request {
                    SyncRequest::Sync { files, dir, reply } => {
                        let synced = files
                            .iter()
                            .try_for_each(File::sync_data)
                            .and_then(|()| dir.map_or(Ok(()), |d| File::open(d)?.sync_all()));
                        let _ = reply.send(synced);
                    }
                    SyncRequest::Writeback { file, offset, len } => {
                        crate::log::append::start_writeback(&file, offset, len)
                    }
                }
            }
        })?;
    Ok(tx)
}

/// The spool is full and the writer was told to stop waiting.
#[derive(Debug, thiserror::Error)]
#[error("the spool is full ({max_bytes} bytes of undelivered events) and the daemon is stopping")]
pub struct Full {
    pub(super) max_bytes: u64,
}

impl Writer {
    /// Whether `bytes` more can be appended now without waiting (always, with `drop_oldest`).
    pub fn fits(&self, bytes: u64) -> bool {
        let state = self.shared.lock();
        let min = state.min_cursor().max(state.floor);
        let used = state.head - min.min(state.head);
        self.shared.when_full == WhenFull::DropOldest
            || used == 0
            || used + bytes <= self.shared.max_bytes
    }

    /// Waits until `bytes` more fit under `max_bytes` (or, with `drop_oldest`, makes room by moving the floor).
    /// Gives up with [`Full`] when `stopping` turns true while waiting.
    pub fn reserve(&mut self, bytes: u64, stopping: &dyn Fn() -> bool) -> Result<(), Full> {
        let shared = &self.shared;
        let mut state = shared.lock();
        loop {
            let min = state.min_cursor().max(state.floor);
            let used = state.head - min.min(state.head);
            if used + bytes <= shared.max_bytes {
                return Ok(());
            }
            match shared.when_full {
                WhenFull::DropOldest => {
                    // Keep the newest `max_bytes`; what ends before the floor is skipped by readers.
                    state.floor = (state.head + bytes).saturating_sub(shared.max_bytes);
                    shared.changed.notify_all();
                    return Ok(());
                }
                WhenFull::Block if used == 0 => return Ok(()),
                WhenFull::Block => {
                    if stopping() {
                        return Err(Full {
                            max_bytes: shared.max_bytes,
                        });
                    }
                    state = shared
                        .changed
                        .wait_timeout(state, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Appends a group's spool lines (not yet visible to readers) and, with `sync`, syncs them.
    ///
    /// Returns whether the group must be synced before it is acknowledged (with `fsync: always`): when it holds
    /// a stream-only record, or is the first in its segment. A group whose records are all in the log need not
    /// be: if a crash loses its references, [`Writer::repair`] writes them again from the log.
    pub fn append(&mut self, group: &Group) -> std::io::Result<bool> {
        let bytes = &group.file;
        if !self.out.is_empty() && self.out.len() + bytes.len() as u64 > self.segment_bytes {
            self.rotate()?;
        }
        self.out.append(bytes, false)?;
        if self.out.len() - self.written_back >= WRITEBACK_BYTES {
            if let Ok(file) = self.out.file().try_clone() {
                let (offset, len) = (self.written_back, self.out.len() - self.written_back);
                let _ = self
                    .syncer
                    .send(SyncRequest::Writeback { file, offset, len });
            }
            self.written_back = self.out.len();
        }
        Ok(group.whole > 0 || !self.anchored)
    }

    /// The `seq` of the last record in the spool when it was opened: the journal continues after it, so that a
    /// stream-only record (in the spool, not the log) never shares its `seq` with a later one.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Starts syncing what was appended (`fdatasync`) on the spool's sync thread, so that the caller can sync
    /// another file meanwhile; [`PendingSync::wait`] gives the outcome.
    pub fn start_sync(&mut self) -> PendingSync {
        self.anchored = true;
        let (reply, outcome) = mpsc::channel();
        let dir = std::mem::take(&mut self.created).then(|| self.shared.dir.clone());
        let closing = self.closing.take();
        let sent = self.out.file().try_clone().and_then(|file| {
            let files = closing.into_iter().chain([file]).collect();
            self.syncer
                .send(SyncRequest::Sync { files, dir, reply })
                .map_err(|_| std::io::Error::other("the spool's sync thread has stopped"))
        });
        PendingSync(sent.map(|()| outcome))
    }

    /// Takes back the last `bytes` appended (their group could not be completed); they were never published.
    pub fn undo(&mut self, bytes: u64) {
        self.out.undo(bytes);
        self.written_back = self.written_back.min(self.out.len());
        // Whether what remains was synced is not known any more: the next group syncs.
        self.anchored = false;
    }

    /// Makes everything appended so far visible to readers; `group` (cleared here) is what was appended since the
    /// last publish.
    pub fn publish(&mut self, group: &mut Group) {
        let mut state = self.shared.lock();
        let head = self.start + self.out.len();
        let (start, len) = (state.head, group.file.len() as u64);
        let capacity = group.lines.len();
        let lines = std::mem::replace(&mut group.lines, Vec::with_capacity(capacity));
        let in_memory = (lines.len() + group.recorded_bytes()) as u64 <= self.shared.memory_bytes;
        if len > 0 && start + len == head && in_memory {
            let ends = group.ends.iter().map(|&e| start + e).collect();
            let bytes = lines.len() as u64;
            state.recent.push_back(Arc::new(Block {
                start,
                len,
                bytes,
                lines: Mutex::new(lines),
                ends,
                entries: OnceLock::new(),
            }));
            state.recent_bytes += bytes;
            while state.recent_bytes > self.shared.memory_bytes {
                let oldest = state.recent.pop_front().expect("bytes are in blocks");
                state.recent_bytes -= oldest.bytes;
            }
        } else if start + len != head || len > 0 {
            // What was published is not in memory: readers go to the files until the blocks after it are there.
            state.recent.clear();
            state.recent_bytes = 0;
        }
        group.clear();
        state.head = head;
        self.shared.changed.notify_all();
    }

    /// Tells readers that no more records will come.
    pub fn close(&self) {
        match self.out.file().sync_all() {
            // Everything is in the spool: the next start has nothing to repair.
            Ok(()) => {
                let clean = self.shared.dir.join(CLEAN);
                if let Err(e) = crate::modes::create(&clean).and_then(|f| f.sync_all()) {
                    warn!(file = %clean.display(), error = %e, "cannot mark the spool as closed cleanly");
                }
            }
            Err(e) => error!(error = %e, "the spool's final sync failed"),
        }
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }

    /// After a crash (not a clean stop), adds references to the log's records after the spool's last record
    /// whose types are `streamed`: with `fsync: always` a group whose records are all in the log does not sync the
    /// spool, so a crash may lose their references (never a stream-only record: its group syncs). Returns how
    /// many were added. Run before the journal and the sinks start.
    pub fn repair(&mut self, streamed: &HashSet<String>) -> Result<u64, Error> {
        if self.clean_start {
            return Ok(0);
        }
        // A spool that never held a record has nothing to continue; new sinks get events from now on.
        let Some(last) = self.last_seq else {
            return Ok(0);
        };
        let log_dir = self.shared.log_dir.clone();
        let mut source = LogSource::new(log_dir.clone());
        let mut group = Group::default();
        let mut added = 0;
        let mut line = Vec::new();
        if source.open(last + 1, None).map_err(io_error(&log_dir))? {
            loop {
                let Some(record) = source.next_line().map_err(io_error(&log_dir))? else {
                    let first = source.file.as_ref().map_or(0, |(f, _)| *f);
                    if source
                        .open(u64::MAX, Some(first))
                        .map_err(io_error(&log_dir))?
                    {
                        continue;
                    }
                    break;
                };
                let seq = crate::record::line::seq(&record);
                if seq.is_some_and(|s| s > last) && streamed.contains(event_type(&record)) {
                    line.clear();
                    line.extend_from_slice(&record);
                    line.push(b'\n');
                    group.push(&line, true);
                    added += 1;
                    self.last_seq = seq;
                }
            }
        }
        if added > 0 {
            let dir = self.shared.dir.clone();
            self.append(&group).map_err(io_error(&dir))?;
            self.out.file().sync_all().map_err(io_error(&dir))?;
            self.anchored = true;
            self.publish(&mut group);
            warn!(
                records = added,
                after_seq = last,
                "the spool lost references to logged records in a crash: written again from the log"
            );
        }
        Ok(added)
    }

    /// Starts a new segment. With `fsync: always` the closed one is synced with the new one's first group, which
    /// always syncs (with the directory): no group in the new segment is acknowledged before the old segment is
    /// durable. If a crash comes first, the new segment may follow a gap; [`open`] then sets it aside.
    pub(super) fn rotate(&mut self) -> std::io::Result<()> {
        if self.sync {
            self.closing = Some(self.out.file().try_clone()?);
        }
        self.anchored = false;
        self.written_back = 0;
        let start = self.start + self.out.len();
        let path = self.shared.segment_path(start);
        let file = crate::modes::append(&path)?;
        self.created = self.sync;
        self.out = AppendFile::new(file, 0).without_writeback();
        self.start = start;
        self.shared.lock().segments.push(start);
        Ok(())
    }
}
