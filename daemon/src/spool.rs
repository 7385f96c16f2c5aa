//! The spool: the durable queue of streamed events that sinks read from, each at its own confirmed position.
//!
//! Owns the spool directory: segment files of one line per streamed record, named by the byte position of their
//! first line in the whole spool (`spool-<pos, 20 digits>.jsonl`), and one cursor file per sink
//! (`cursors/<sink>.json`) holding the position up to which that sink confirmed delivery. A record that is only
//! streamed is spooled whole (the line the log would hold); a record that is also in the log is spooled as a
//! reference to it, `{"seq":…,"id":…,"type":…,"in_log":true}`, and a reader that meets one reads the record from
//! the log, which keeps it until every sink has confirmed it (see `evidence::maintenance`). So such records are
//! written and synced whole once. The journal writer appends and publishes; each sink's worker reads through a
//! [`Reader`]. A record is visible to readers only once the journal has synced it, and a segment is deleted only
//! when every sink's cursor is past it.
//!
//! The newest published records (`memory_bytes` of them) are also kept in memory, in the blocks the journal
//! published them in: a sink that keeps up reads them from there, and the first sink to read a block parses it for
//! all, so the cost of a sink that keeps up is no system call, copy or parse of its own. Sinks that fall behind, and
//! every sink after a restart, read the segment files.
//!
//! The queue is bounded by `max_bytes` of unconfirmed records (between the slowest cursor and the head). When it is
//! full the writer waits (`block`, the default: clients wait, nothing is lost) or moves a floor forward so the
//! slowest sinks skip their oldest records (`drop_oldest`); every record skipped that way is counted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read as _, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, OnceLock, mpsc};
use std::time::{Duration, Instant};

use memchr::memmem::Finder;

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::append::AppendFile;
use crate::config::{SpoolConfig, WhenFull};

/// The spool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed.
    #[error("spool {path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Recovery found damage it will not cut.
    #[error(transparent)]
    Damaged(#[from] crate::journal::Error),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

struct State {
    /// Position just after the last published (synced) record.
    head: u64,
    /// Start positions of the segment files, ascending; the last is being appended to.
    segments: Vec<u64>,
    /// Confirmed position of every configured sink.
    cursors: HashMap<String, u64>,
    /// With `drop_oldest`, readers behind this position skip to it.
    floor: u64,
    /// The writer is stopping: readers stop waiting for more.
    closed: bool,
    /// The newest published blocks, contiguous and ending at `head`, at most about `memory_bytes` in all.
    recent: VecDeque<Arc<Block>>,
    /// Bytes in `recent`.
    recent_bytes: u64,
}

impl State {
    fn min_cursor(&self) -> u64 {
        self.cursors.values().copied().min().unwrap_or(self.head)
    }
}

struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    /// Signalled when the head moves (readers wait) and when a cursor moves (a blocked writer waits).
    changed: Condvar,
    max_bytes: u64,
    when_full: WhenFull,
    memory_bytes: u64,
    /// The log directory, where records the spool refers to are.
    log_dir: PathBuf,
}

/// Records published together, as kept in memory for readers: whole record lines, also of records whose spool
/// line is a reference to the log.
struct Block {
    /// Spool position of its first byte.
    start: u64,
    /// Its spool bytes.
    len: u64,
    /// Bytes of its record lines.
    bytes: u64,
    /// The record lines until the first reader parses them.
    lines: Mutex<Vec<u8>>,
    /// Spool position after each record.
    ends: Vec<u64>,
    /// Parsed once, by the first reader; `None` if the lines are not UTF-8 or do not match `ends` (readers then
    /// read the files).
    entries: OnceLock<Option<Vec<Entry>>>,
}

impl Block {
    fn end(&self) -> u64 {
        self.start + self.len
    }

    fn entries(&self) -> Option<&[Entry]> {
        self.entries
            .get_or_init(|| {
                let raw =
                    std::mem::take(&mut *self.lines.lock().unwrap_or_else(|e| e.into_inner()));
                let text = Arc::new(String::from_utf8(raw).ok()?);
                let mut entries = Vec::with_capacity(self.ends.len());
                let mut offset = 0;
                while let Some(n) = memchr::memchr(b'\n', &text.as_bytes()[offset..]) {
                    let end = *self.ends.get(entries.len())?;
                    entries.push(Entry::parse(&text, offset, n, end));
                    offset += n + 1;
                }
                (entries.len() == self.ends.len()).then_some(entries)
            })
            .as_deref()
    }
}

/// The spool's part of one group commit, built by the journal writer: the bytes for the segment file, where every
/// record that is also in the log is only a reference to it (`{"seq":…,"id":…,"type":…,"in_log":true}`), and
/// the whole record lines for the in-memory blocks.
#[derive(Debug, Default, Clone)]
pub struct Group {
    file: Vec<u8>,
    lines: Vec<u8>,
    /// End of each record's spool line in `file`.
    ends: Vec<u64>,
    /// Records spooled whole (not in the log).
    whole: usize,
}

/// A point in a [`Group`] to go back to.
#[derive(Debug, Clone, Copy)]
pub struct Mark(usize, usize, usize, usize);

/// Left in the spool directory by a clean stop: the spool then lacks nothing.
const CLEAN: &str = "closed-cleanly";

/// How a spool line that refers to the log ends.
const IN_LOG: &[u8] = b",\"in_log\":true}";

impl Group {
    /// Adds a record: `line` is its whole stored line with the newline; `in_log` says it is in the log too.
    pub fn push(&mut self, line: &[u8], in_log: bool) {
        self.lines.extend_from_slice(line);
        if in_log {
            let record = &line[..line.len() - 1];
            let digits = record_seq_len(record);
            let id = value_after(&ID, record);
            let ty = value_after(&TYPE, record);
            self.file
                .extend_from_slice(&record[..b"{\"seq\":".len() + digits]);
            self.file.extend_from_slice(b",\"id\":\"");
            self.file.extend_from_slice(id.bytes(record));
            self.file.extend_from_slice(b"\",\"type\":\"");
            self.file.extend_from_slice(ty.bytes(record));
            self.file.push(b'"');
            self.file.extend_from_slice(IN_LOG);
            self.file.push(b'\n');
        } else {
            self.file.extend_from_slice(line);
            self.whole += 1;
        }
        self.ends.push(self.file.len() as u64);
    }

    /// Bytes for the segment file.
    pub fn file_len(&self) -> u64 {
        self.file.len() as u64
    }

    /// True when no record was added.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The current point.
    pub fn mark(&self) -> Mark {
        Mark(
            self.file.len(),
            self.lines.len(),
            self.ends.len(),
            self.whole,
        )
    }

    /// Takes out what was added after `mark`.
    pub fn truncate(&mut self, mark: Mark) {
        self.file.truncate(mark.0);
        self.lines.truncate(mark.1);
        self.ends.truncate(mark.2);
        self.whole = mark.3;
    }

    /// Empties the group.
    pub fn clear(&mut self) {
        self.truncate(Mark(0, 0, 0, 0));
    }

    /// Memory the in-memory block needs besides the lines.
    fn recorded_bytes(&self) -> usize {
        self.ends.len() * std::mem::size_of::<u64>()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn segment_path(&self, start: u64) -> PathBuf {
        self.dir.join(format!("spool-{start:020}.jsonl"))
    }

    fn cursor_path(&self, sink: &str) -> PathBuf {
        self.dir.join("cursors").join(format!("{sink}.json"))
    }
}

/// A handle to the spool that opens readers; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

/// The writer's end, owned by the journal thread.
pub struct Writer {
    shared: Arc<Shared>,
    /// The segment being appended to.
    out: AppendFile,
    /// Its start position.
    start: u64,
    segment_bytes: u64,
    /// Sync the directory after creating a segment file (`fsync: always`).
    sync: bool,
    /// A segment file was created since the last sync: the next sync includes the directory.
    created: bool,
    /// The segment holds a synced record, so that after a crash the spool's last record is known.
    anchored: bool,
    /// The segment closed last, synced with the first group of the next one (`fsync: always`).
    closing: Option<File>,
    /// Writeback of the segment was asked for up to here.
    written_back: u64,
    /// The spool was closed cleanly before this start: it lacks nothing.
    clean_start: bool,
    last_seq: Option<u64>,
    syncer: mpsc::Sender<SyncRequest>,
}

/// A sync running on the spool's sync thread.
pub struct PendingSync(std::io::Result<mpsc::Receiver<std::io::Result<()>>>);

impl PendingSync {
    /// A sync that was not needed.
    pub fn done() -> PendingSync {
        let (reply, outcome) = mpsc::channel();
        let _ = reply.send(Ok(()));
        PendingSync(Ok(outcome))
    }

    /// Waits for the sync to finish.
    pub fn wait(self) -> std::io::Result<()> {
        self.0?
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spool's sync thread has stopped")))
    }
}

/// Work for the spool's sync thread, so that the journal writer never waits for the disk because of the spool.
enum SyncRequest {
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
const WRITEBACK_BYTES: u64 = 1 << 20;

/// Starts the thread that syncs spool files for the writer; it ends when the writer is dropped.
fn start_syncer() -> std::io::Result<mpsc::Sender<SyncRequest>> {
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
                        crate::append::start_writeback(&file, offset, len)
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
    max_bytes: u64,
}

#[derive(Serialize, Deserialize)]
struct CursorFile {
    pos: u64,
}

/// Opens (and recovers) the spool for `sinks`, the names of the configured sinks.
pub fn open(config: &SpoolConfig, sinks: &[String]) -> Result<(Writer, Spool), Error> {
    let dir = &config.dir;
    std::fs::create_dir_all(dir.join("cursors")).map_err(io_error(dir))?;
    let mut segments: Vec<u64> = std::fs::read_dir(dir)
        .map_err(io_error(dir))?
        .filter_map(|e| segment_start(&e.ok()?.path()))
        .collect();
    segments.sort();
    set_aside_after_gap(dir, &mut segments)?;
    let shared_dir = dir.clone();
    let clean = dir.join(CLEAN);
    let clean_start = match std::fs::remove_file(&clean) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_error(&clean)(e)),
    };
    let mut last_seq = None;
    let (start, len) = match segments.last() {
        Some(&start) => {
            let path = shared_dir.join(format!("spool-{start:020}.jsonl"));
            crate::journal::recover(&path)?;
            cut_orphans(&path, &config.log_dir)?;
            let (len, head) = crate::journal::recover(&path)?;
            last_seq = head.map(|h| h.seq);
            // A segment just started may be empty: the last seq is then in the one before.
            for &older in segments.iter().rev().skip(1) {
                if last_seq.is_some() {
                    break;
                }
                let path = shared_dir.join(format!("spool-{older:020}.jsonl"));
                last_seq = crate::journal::recover(&path)?.1.map(|h| h.seq);
            }
            (start, len)
        }
        None => {
            segments.push(0);
            (0, 0)
        }
    };
    let head = start + len;
    let oldest = segments[0];
    let mut cursors = HashMap::new();
    for sink in sinks {
        let path = dir.join("cursors").join(format!("{sink}.json"));
        let pos = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<CursorFile>(&bytes) {
                Ok(c) if c.pos > head => {
                    warn!(
                        sink,
                        pos = c.pos,
                        head,
                        "cursor is beyond the spool's end; starting at the end"
                    );
                    head
                }
                Ok(c) if c.pos < oldest => {
                    warn!(
                        sink,
                        pos = c.pos,
                        oldest,
                        "cursor points into deleted spool segments; starting at the oldest kept"
                    );
                    oldest
                }
                Ok(c) => c.pos,
                Err(e) => {
                    warn!(sink, error = %e, file = %path.display(), "unreadable cursor; redelivering everything spooled");
                    oldest
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                info!(sink, "new sink: it receives events from now on");
                head
            }
            Err(e) => return Err(io_error(&path)(e)),
        };
        cursors.insert(sink.clone(), pos);
    }
    let shared = Arc::new(Shared {
        dir: shared_dir,
        state: Mutex::new(State {
            head,
            segments,
            cursors,
            floor: 0,
            closed: false,
            recent: VecDeque::new(),
            recent_bytes: 0,
        }),
        changed: Condvar::new(),
        max_bytes: config.max_bytes,
        when_full: config.when_full,
        memory_bytes: config.memory_bytes,
        log_dir: config.log_dir.clone(),
    });
    for (sink, pos) in shared.lock().cursors.clone() {
        write_cursor(&shared, &sink, pos).map_err(io_error(&shared.cursor_path(&sink)))?;
    }
    let shared_dir_for_errors = shared.dir.clone();
    let path = shared.segment_path(start);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_error(&path))?;
    let writer = Writer {
        shared: shared.clone(),
        out: AppendFile::new(file, len).without_writeback(),
        start,
        segment_bytes: config.segment_bytes,
        sync: config.sync,
        created: false,
        anchored: false,
        closing: None,
        written_back: len,
        clean_start,
        last_seq,
        syncer: start_syncer().map_err(io_error(&shared_dir_for_errors))?,
    };
    Ok((writer, Spool { shared }))
}

/// The log and the spool of a group are synced in parallel: after a crash between the two, the spool's last
/// segment may refer to records that the log never got (their group was not acknowledged). Cuts the segment
/// before the first such reference, keeping the cut bytes aside, so that no sink looks for them.
fn cut_orphans(path: &Path, log_dir: &Path) -> Result<(), Error> {
    use std::io::Write as _;
    let Some(log_last) = log_last_seq(log_dir).map_err(io_error(log_dir))? else {
        return Ok(());
    };
    let content = std::fs::read(path).map_err(io_error(path))?;
    let mut offset = 0;
    while let Some(n) = memchr::memchr(b'\n', &content[offset..]) {
        let line = &content[offset..offset + n];
        if line.ends_with(IN_LOG) && record_seq(line) > log_last {
            let aside = path.with_extension(format!("jsonl.orphans-{offset}"));
            std::fs::File::create(&aside)
                .and_then(|mut f| f.write_all(&content[offset..]))
                .map_err(io_error(&aside))?;
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_error(path))?;
            file.set_len(offset as u64).map_err(io_error(path))?;
            file.sync_all().map_err(io_error(path))?;
            warn!(
                file = %path.display(), offset, log_last_seq = log_last, kept_in = %aside.display(),
                "the spool referred to records the log does not have (a crash between their syncs; they were \
                 never acknowledged): cut"
            );
            break;
        }
        offset += n + 1;
    }
    Ok(())
}

/// The `seq` of the last complete record of the log; `None` when the log directory does not exist yet.
fn log_last_seq(log_dir: &Path) -> std::io::Result<Option<u64>> {
    let files = match crate::evidence::files::list(log_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        listed => listed?,
    };
    let Some(newest) = files.last() else {
        return Ok(Some(0));
    };
    if !newest.compressed {
        let mut file = File::open(&newest.path)?;
        let mut end = file.metadata()?.len();
        while end > 0 {
            let (start, line) = crate::journal::last_line(&mut file, end)?;
            if line.last() == Some(&b'\n')
                && let Some(seq) = crate::evidence::chain::line_seq(&line)
            {
                return Ok(Some(seq));
            }
            end = start;
        }
    }
    // No complete record in the newest file: the log ends just before the first `seq` it may hold.
    Ok(Some(newest.first_seq.saturating_sub(1)))
}

/// A crash just after a segment was started may leave the new segment holding its first group while the old
/// one lost its unsynced tail: the new segment then starts after the old one's end. Nothing in it was acknowledged
/// (its first group waits for the old segment's sync): it is moved aside, and the old segment's lost references
/// are written again from the log by [`Writer::repair`].
fn set_aside_after_gap(dir: &Path, segments: &mut Vec<u64>) -> Result<(), Error> {
    let &[.., before, last] = segments.as_slice() else {
        return Ok(());
    };
    let path = dir.join(format!("spool-{before:020}.jsonl"));
    let (len, _) = crate::journal::recover(&path)?;
    if before + len >= last {
        return Ok(());
    }
    let after = dir.join(format!("spool-{last:020}.jsonl"));
    let aside = after.with_extension("jsonl.after-gap");
    std::fs::rename(&after, &aside).map_err(io_error(&after))?;
    warn!(
        file = %after.display(), gap_from = before + len, gap_to = last, kept_in = %aside.display(),
        "a spool segment followed a gap left by a crash (nothing in it was acknowledged): set aside"
    );
    segments.pop();
    Ok(())
}

fn segment_start(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_prefix("spool-")?.strip_suffix(".jsonl")?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

fn write_cursor(shared: &Shared, sink: &str, pos: u64) -> std::io::Result<()> {
    let path = shared.cursor_path(sink);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(&CursorFile { pos }).expect("serializable"),
    )?;
    std::fs::rename(&tmp, &path)
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
                if let Err(e) = File::create(&clean).and_then(|f| f.sync_all()) {
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
                let seq = crate::evidence::chain::line_seq(&record);
                if seq.is_some_and(|s| s > last) && streamed.contains(record_type(&record)) {
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
    fn rotate(&mut self) -> std::io::Result<()> {
        if self.sync {
            self.closing = Some(self.out.file().try_clone()?);
        }
        self.anchored = false;
        self.written_back = 0;
        let start = self.start + self.out.len();
        let path = self.shared.segment_path(start);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        self.created = self.sync;
        self.out = AppendFile::new(file, 0).without_writeback();
        self.start = start;
        self.shared.lock().segments.push(start);
        Ok(())
    }
}

/// One spooled record as a sink receives it. Records of one read share one buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The record's `seq`.
    pub seq: u64,
    /// Spool position just after the record: confirming it confirms everything before.
    pub end: u64,
    text: Arc<String>,
    start: usize,
    len: usize,
    /// Where the values of `id` and `type` are in the line, found once.
    id: Span,
    event_type: Span,
}

/// A part of a line: offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Span(u32, u32);

impl Span {
    fn of<'a>(&self, line: &'a str) -> &'a str {
        line.get(self.0 as usize..(self.0 + self.1) as usize)
            .unwrap_or("")
    }

    fn bytes<'a>(&self, line: &'a [u8]) -> &'a [u8] {
        line.get(self.0 as usize..(self.0 + self.1) as usize)
            .unwrap_or(b"")
    }
}

impl Entry {
    /// An entry holding its own copy of `line`.
    pub fn new(seq: u64, end: u64, line: &str) -> Entry {
        Entry {
            seq,
            ..Entry::parse(&Arc::new(line.to_owned()), 0, line.len(), end)
        }
    }

    /// The record at `text[start..start + len]`, which ends at spool position `end`.
    fn parse(text: &Arc<String>, start: usize, len: usize, end: u64) -> Entry {
        let line = &text.as_bytes()[start..start + len];
        Entry {
            seq: record_seq(line),
            end,
            text: text.clone(),
            start,
            len,
            id: value_after(&ID, line),
            event_type: value_after(&TYPE, line),
        }
    }

    /// True for a spool line that only refers to a record in the log.
    fn in_log(&self) -> bool {
        self.line().as_bytes().ends_with(IN_LOG)
    }

    /// The record line, without its newline.
    pub fn line(&self) -> &str {
        &self.text[self.start..self.start + self.len]
    }

    /// The record's event type, read from its fixed place in the line.
    pub fn event_type(&self) -> &str {
        self.event_type.of(self.line())
    }

    /// The record's id.
    pub fn id(&self) -> &str {
        self.id.of(self.line())
    }
}

static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b",\"type\":\""));
static ID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b",\"id\":\""));

/// The event type of a stored record line: `type` always follows the fixed-format fields, so its first occurrence
/// is the record's own.
pub fn record_type(line: &[u8]) -> &str {
    let Span(at, len) = value_after(&TYPE, line);
    std::str::from_utf8(&line[at as usize..(at + len) as usize]).unwrap_or("")
}

/// Where the string value that follows the first occurrence of `key` (a `,"name":"` prefix) in a record line is.
fn value_after(key: &Finder<'_>, line: &[u8]) -> Span {
    let Some(at) = key.find(line) else {
        return Span::default();
    };
    let at = at + key.needle().len();
    let len = memchr::memchr(b'"', &line[at..]).unwrap_or(0);
    Span(at as u32, len as u32)
}

fn record_seq(line: &[u8]) -> u64 {
    let rest = line.strip_prefix(b"{\"seq\":").unwrap_or(b"");
    std::str::from_utf8(&rest[..record_seq_len(line)])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Digits of the `seq` at the start of a record line.
fn record_seq_len(line: &[u8]) -> usize {
    let rest = line.strip_prefix(b"{\"seq\":").unwrap_or(b"");
    rest.iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len())
}

/// What one [`Reader::next`] call produced.
#[derive(Debug, Default)]
pub struct Read {
    /// Records in spool order.
    pub entries: Vec<Entry>,
    /// Records skipped because the spool was full and `drop_oldest` is configured (or, after damage, missing
    /// from the log).
    pub dropped: u64,
    /// Records of types the reader does not want, passed over.
    pub passed: u64,
    /// Position after the last record read or skipped.
    pub end: u64,
}

/// The in-memory blocks from the one holding `pos` on, enough for `max_events` records / `max_bytes` bytes; none
/// when `pos` is not in memory.
fn in_memory(
    recent: &VecDeque<Arc<Block>>,
    pos: u64,
    max_events: usize,
    max_bytes: usize,
) -> Vec<Arc<Block>> {
    if recent.front().is_none_or(|b| b.start > pos) {
        return Vec::new();
    }
    let first = recent.partition_point(|b| b.end() <= pos);
    let mut blocks = Vec::new();
    let mut bytes = 0;
    // Every block holds at least one record: `max_events` blocks are always enough.
    for block in recent.range(first..).take(max_events.max(1)) {
        blocks.push(block.clone());
        bytes += block.end() - pos.max(block.start);
        if bytes >= max_bytes as u64 {
            break;
        }
    }
    blocks
}

/// Fills a [`Read`] with records in order, skipping those below the `drop_oldest` floor and those of types the
/// reader does not want, up to the limits.
struct Taker<'a> {
    read: Read,
    floor: u64,
    wants: Option<&'a HashSet<String>>,
    max_events: usize,
    max_bytes: usize,
    bytes: usize,
}

/// What [`Taker::admit`] decided.
enum Admit {
    Take,
    Skip,
    Full,
}

impl<'a> Taker<'a> {
    /// Says whether `entry` is to be taken; advances the read's end past what is taken or skipped.
    fn admit(&mut self, entry: &Entry) -> Admit {
        if entry.end <= self.floor {
            self.read.dropped += 1;
        } else if self.wants.is_some_and(|w| !w.contains(entry.event_type())) {
            self.read.passed += 1;
        } else {
            let full = self.read.entries.len() >= self.max_events
                || (!self.read.entries.is_empty() && self.bytes + entry.len > self.max_bytes);
            if full {
                return Admit::Full;
            }
            self.bytes += entry.len + 1;
            self.read.end = entry.end;
            return Admit::Take;
        }
        self.read.end = entry.end;
        Admit::Skip
    }
}

/// Reads records of the log by `seq`, forwards, for the spool lines that refer to it.
struct LogSource {
    dir: PathBuf,
    /// The file being read: its first `seq` and a reader.
    file: Option<(u64, BufReader<Box<dyn std::io::Read + Send>>)>,
    /// Bytes read after the last whole line (the writer is still appending to the file).
    partial: Vec<u8>,
    /// A whole line read but not used yet: a later `seq` than was asked for.
    ahead: Option<Vec<u8>>,
}

impl LogSource {
    fn new(dir: PathBuf) -> LogSource {
        LogSource {
            dir,
            file: None,
            partial: Vec::new(),
            ahead: None,
        }
    }

    /// The line of record `seq` whose id is `id`, without its newline; `None` when the log does not have it.
    /// Calls ask for ever later records; what was read ahead is used by the next call. When what was read does not
    /// have the record (the writer took back a group that failed to sync and wrote other records under the same
    /// `seq`s, after this source had read ahead), it is looked for once more from a fresh start.
    fn find(&mut self, seq: u64, id: &str) -> std::io::Result<Option<String>> {
        if let Some(line) = self.scan(seq, id)? {
            return Ok(Some(line));
        }
        self.file = None;
        self.scan(seq, id)
    }

    fn scan(&mut self, seq: u64, id: &str) -> std::io::Result<Option<String>> {
        if self.file.is_none() && !self.open(seq, None)? {
            return Ok(None);
        }
        loop {
            let Some(line) = self.next_line()? else {
                // The end of this file: a later one may start at or before `seq`.
                let first = self.file.as_ref().map_or(0, |(f, _)| *f);
                if self.open(seq, Some(first))? {
                    continue;
                }
                return Ok(None);
            };
            match crate::evidence::chain::line_seq(&line) {
                Some(s) if s == seq => {
                    if value_after(&ID, &line).bytes(&line) != id.as_bytes() {
                        return Ok(None);
                    }
                    return String::from_utf8(line).map(Some).map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                    });
                }
                Some(s) if s > seq => {
                    self.ahead = Some(line);
                    return Ok(None);
                }
                _ => {}
            }
        }
    }

    /// Opens the last file whose first `seq` is at most `seq` (and later than `after`); false when there is none.
    fn open(&mut self, seq: u64, after: Option<u64>) -> std::io::Result<bool> {
        let files = match crate::evidence::files::list(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            listed => listed?,
        };
        let candidate = files
            .iter()
            .rev()
            .find(|f| f.first_seq <= seq)
            .or(files.first())
            .filter(|f| after.is_none_or(|a| f.first_seq > a));
        let Some(file) = candidate else {
            return Ok(false);
        };
        self.file = Some((
            file.first_seq,
            BufReader::with_capacity(1 << 18, file.open()?),
        ));
        self.partial.clear();
        self.ahead = None;
        Ok(true)
    }

    /// The next whole line of the file, without its newline; `None` at the end of what is written.
    fn next_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if let Some(line) = self.ahead.take() {
            return Ok(Some(line));
        }
        let Some((_, reader)) = self.file.as_mut() else {
            return Ok(None);
        };
        let mut line = std::mem::take(&mut self.partial);
        reader.read_until(b'\n', &mut line)?;
        if line.last() != Some(&b'\n') {
            self.partial = line;
            return Ok(None);
        }
        line.pop();
        Ok(Some(line))
    }
}

/// A sink's view of the spool: reads from its confirmed position onwards.
pub struct Reader {
    shared: Arc<Shared>,
    sink: String,
    /// Next position to read.
    pos: u64,
    file: Option<(u64, File)>,
    /// Where records that the spool holds only a reference to are read.
    log: LogSource,
    /// The event types the sink receives; `None` for all.
    wants: Option<HashSet<String>>,
}

impl Spool {
    /// A reader for `sink` (one of the sinks the spool was opened with), starting at its confirmed position.
    pub fn reader(&self, sink: &str) -> Reader {
        let pos = self
            .shared
            .lock()
            .cursors
            .get(sink)
            .copied()
            .unwrap_or_else(|| panic!("sink {sink:?} was not registered with the spool"));
        Reader {
            shared: self.shared.clone(),
            sink: sink.to_owned(),
            pos,
            file: None,
            log: LogSource::new(self.shared.log_dir.clone()),
            wants: None,
        }
    }

    /// The lowest `seq` that some sink has not confirmed durably (read at the positions in the cursor files, where
    /// a restart resumes); `None` when every sink has everything. The log must keep the files holding it and every
    /// later record: the spool may refer to them.
    pub fn oldest_unconfirmed(&self) -> std::io::Result<Option<u64>> {
        use std::os::unix::fs::FileExt;
        let (head, floor, sinks, segments) = {
            let state = self.shared.lock();
            let sinks: Vec<String> = state.cursors.keys().cloned().collect();
            (state.head, state.floor, sinks, state.segments.clone())
        };
        let mut cursors = Vec::with_capacity(sinks.len());
        for sink in sinks {
            let bytes = std::fs::read(self.shared.cursor_path(&sink))?;
            let cursor: CursorFile =
                serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
            cursors.push(cursor.pos);
        }
        let mut oldest: Option<u64> = None;
        for pos in cursors.into_iter().map(|p| p.max(floor)) {
            if pos >= head {
                continue;
            }
            let start = segments.iter().rev().find(|&&s| s <= pos).copied();
            let start = start.unwrap_or(segments[0]).max(segments[0]).min(pos);
            let mut head_bytes = [0u8; 32];
            let path = self.shared.segment_path(start);
            let n = File::open(&path)?.read_at(&mut head_bytes, pos.max(start) - start)?;
            let seq = record_seq(&head_bytes[..n]);
            oldest = Some(oldest.map_or(seq, |o| o.min(seq)));
        }
        Ok(oldest)
    }

    /// Bytes of records not yet confirmed by the slowest sink.
    pub fn backlog(&self) -> u64 {
        let state = self.shared.lock();
        state.head - state.min_cursor().min(state.head)
    }

    /// The confirmed position of every sink and the head.
    pub fn positions(&self) -> (u64, HashMap<String, u64>) {
        let state = self.shared.lock();
        (state.head, state.cursors.clone())
    }
}

impl Reader {
    /// Reads up to `max_events` records / about `max_bytes` bytes past the current position, waiting up to `wait`
    /// until at least `min_bytes` are there (so that a batch filling up does not wake the reader for every commit).
    /// Returns what there is when the wait ends or the spool closes, possibly nothing.
    pub fn next(
        &mut self,
        max_events: usize,
        max_bytes: usize,
        min_bytes: u64,
        wait: Duration,
    ) -> std::io::Result<Read> {
        let deadline = Instant::now() + wait;
        let wanted = self.pos + min_bytes.max(1);
        let (limit, segment_start, floor, blocks) = {
            let mut state = self.shared.lock();
            while state.head < wanted && !state.closed {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                state = self
                    .shared
                    .changed
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let start = match state.segments.iter().rev().find(|&&s| s <= self.pos) {
                Some(&s) => s,
                None => state.segments[0],
            };
            // Read no further than the head or the end of this segment.
            let next = state
                .segments
                .iter()
                .find(|&&s| s > start)
                .copied()
                .unwrap_or(u64::MAX);
            (
                state.head.min(next),
                start,
                state.floor,
                in_memory(&state.recent, self.pos, max_events, max_bytes),
            )
        };
        let mut taken = Taker {
            read: Read {
                end: self.pos,
                ..Read::default()
            },
            floor,
            wants: self.wants.as_ref(),
            max_events,
            max_bytes,
            bytes: 0,
        };
        'blocks: for block in &blocks {
            let Some(entries) = block.entries() else {
                break;
            };
            let first = entries.partition_point(|e| e.end <= taken.read.end);
            for entry in &entries[first..] {
                match taken.admit(entry) {
                    Admit::Take => taken.read.entries.push(entry.clone()),
                    Admit::Skip => {}
                    Admit::Full => break 'blocks,
                }
            }
        }
        if taken.read.end > self.pos {
            self.pos = taken.read.end;
            return Ok(taken.read);
        }
        let mut read = taken.read;
        if self.pos < segment_start {
            self.pos = segment_start;
            read.end = self.pos;
        }
        if self.pos >= limit {
            return Ok(read);
        }
        if self.file.as_ref().is_none_or(|(s, _)| *s != segment_start) {
            let path = self.shared.segment_path(segment_start);
            self.file = Some((segment_start, File::open(&path)?));
        }
        let mut file = &self.file.as_ref().expect("opened above").1;
        let available = (limit - self.pos) as usize;
        let want = available.min(max_bytes.max(1 << 16));
        let mut buf = Vec::with_capacity(want);
        file.seek(SeekFrom::Start(self.pos - segment_start))?;
        // `read_to_end` fills the buffer's spare capacity without zeroing it first.
        file.take(want as u64).read_to_end(&mut buf)?;
        // Records are published whole, so `available` ends at a newline; make sure we hold one whole line.
        while memchr::memchr(b'\n', &buf).is_none() && buf.len() < available {
            let more = (available - buf.len()).min(buf.len().max(1 << 16));
            if file.take(more as u64).read_to_end(&mut buf)? == 0 {
                break;
            }
        }
        // Only whole lines are used; they are UTF-8 (checked once per read, not per record).
        buf.truncate(memchr::memrchr(b'\n', &buf).map_or(0, |i| i + 1));
        let text: Arc<String> = Arc::new(String::from_utf8(buf).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("spool segment {segment_start} holds invalid UTF-8: {e}"),
            )
        })?);
        let bytes = text.as_bytes();
        let mut taken = Taker {
            read,
            floor,
            wants: self.wants.as_ref(),
            max_events,
            max_bytes,
            bytes: 0,
        };
        let mut offset = 0;
        while let Some(n) = memchr::memchr(b'\n', &bytes[offset..]) {
            let end = self.pos + (offset + n + 1) as u64;
            let entry = Entry::parse(&text, offset, n, end);
            match taken.admit(&entry) {
                Admit::Take => taken.read.entries.push(entry),
                Admit::Skip => {}
                Admit::Full => break,
            }
            offset += n + 1;
        }
        let mut read = taken.read;
        if read.entries.iter().any(Entry::in_log) {
            // Records that are in the log too are only referred to here: read them from there.
            let mut resolved = Vec::with_capacity(read.entries.len());
            for entry in read.entries {
                if !entry.in_log() {
                    resolved.push(entry);
                    continue;
                }
                match self.log.find(entry.seq, entry.id())? {
                    Some(line) => {
                        let len = line.len();
                        resolved.push(Entry::parse(&Arc::new(line), 0, len, entry.end));
                    }
                    None => {
                        error!(sink = %self.sink, seq = entry.seq, log = %self.log.dir.display(),
                            "a spooled record is missing from the log: the sink cannot get it");
                        read.dropped += 1;
                    }
                }
            }
            read.entries = resolved;
        }
        self.pos = read.end;
        Ok(read)
    }

    /// The position after what was read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Delivers only records of `types` (the others are passed over); records in the log are then read from it
    /// only when wanted.
    pub fn wanting(mut self, types: HashSet<String>) -> Reader {
        self.wants = Some(types);
        self
    }

    /// Records that everything before `pos` was delivered (or dead-lettered). With `persist`, also writes the
    /// position to the sink's cursor file and deletes segments that every sink is done with; without, a crash
    /// redelivers what was confirmed since the last persisted position (delivery is at least once).
    pub fn confirm(&mut self, pos: u64, persist: bool) -> std::io::Result<()> {
        {
            let mut state = self.shared.lock();
            state.cursors.insert(self.sink.clone(), pos);
            self.shared.changed.notify_all();
        }
        if !persist {
            return Ok(());
        }
        write_cursor(&self.shared, &self.sink, pos)?;
        let doomed: Vec<u64> = {
            let mut state = self.shared.lock();
            let min = state.min_cursor();
            let keep_from = state.segments.iter().rposition(|&s| s <= min).unwrap_or(0);
            state.segments.drain(..keep_from).collect()
        };
        for start in doomed {
            let path = self.shared.segment_path(start);
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(file = %path.display(), error = %e, "cannot delete a delivered spool segment");
            }
        }
        Ok(())
    }

    /// With `drop_oldest`, records ending at or before this position are to be skipped.
    pub fn floor(&self) -> u64 {
        self.shared.lock().floor
    }

    /// The sink's confirmed position.
    pub fn confirmed(&self) -> u64 {
        self.shared
            .lock()
            .cursors
            .get(&self.sink)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, max_bytes: u64, when_full: WhenFull) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_owned(),
            max_bytes,
            when_full,
            segment_bytes: 200,
            sync: true,
            memory_bytes: 1 << 20,
            log_dir: dir.join("log"),
        }
    }

    type Got = Vec<(u64, u64, String, String, String)>;

    fn take(read: &Read, got: &mut Got) {
        got.extend(read.entries.iter().map(|e| {
            let (id, ty, line) = (e.id().into(), e.event_type().into(), e.line().into());
            (e.seq, e.end, id, ty, line)
        }));
    }

    fn drain(r: &mut Reader, got: &mut Got) {
        loop {
            let read = r.next(3, 1 << 20, 1, Duration::ZERO).unwrap();
            if read.entries.is_empty() {
                return;
            }
            take(&read, got);
        }
    }

    fn line(seq: u64) -> Vec<u8> {
        format!("{{\"seq\":{seq},\"id\":\"i{seq}\",\"received_at\":\"t\",\"occurred_at\":\"t\",\"type\":\"t{}\"}}\n", seq % 3).into_bytes()
    }

    fn append(w: &mut Writer, seqs: std::ops::Range<u64>) {
        append_logged(w, seqs, None);
    }

    /// Appends records `seqs` as a group; with a log directory, every record whose `seq` is a multiple of 3 is
    /// written to the log there and the spool only refers to it.
    fn append_logged(w: &mut Writer, seqs: std::ops::Range<u64>, log: Option<&Path>) -> Group {
        let mut group = Group::default();
        for seq in seqs {
            let in_log = log.is_some() && seq % 3 == 0;
            if let (Some(dir), true) = (log, in_log) {
                std::fs::create_dir_all(dir).unwrap();
                let path = dir.join("trail-20261123T000000Z-00000000000000000001.jsonl");
                let mut f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap();
                std::io::Write::write_all(&mut f, &line(seq)).unwrap();
            }
            group.push(&line(seq), in_log);
        }
        let copy = group.clone();
        w.reserve(group.file_len(), &|| true).unwrap();
        w.append(&group).unwrap();
        w.start_sync().wait().unwrap();
        w.publish(&mut group);
        copy
    }

    fn read_all(r: &mut Reader) -> Vec<u64> {
        let mut seqs = vec![];
        loop {
            let read = r.next(7, 1 << 20, 1, Duration::ZERO).unwrap();
            if read.entries.is_empty() && read.dropped == 0 {
                return seqs;
            }
            seqs.extend(read.entries.iter().map(|e| e.seq));
        }
    }

    #[test]
    fn readers_see_published_records_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let sinks = vec!["a".to_string(), "b".to_string()];
        let cfg = config(dir.path(), 1 << 20, WhenFull::Block);
        let (mut w, spool) = open(&cfg, &sinks).unwrap();
        append(&mut w, 1..20);
        let mut a = spool.reader("a");
        let mut b = spool.reader("b");
        assert_eq!(read_all(&mut a), (1..20).collect::<Vec<_>>());
        let entry = {
            b.next(1, 1 << 20, 1, Duration::ZERO)
                .unwrap()
                .entries
                .remove(0)
        };
        assert_eq!((entry.seq, entry.event_type(), entry.id()), (1, "t1", "i1"));
        b.confirm(entry.end, true).unwrap();
        let (_, cursors) = spool.positions();
        a.confirm(cursors["b"], true).unwrap();
        drop((w, spool, a, b));
        // Restart: each sink resumes at its confirmed position.
        let (mut w, spool) = open(&cfg, &sinks).unwrap();
        append(&mut w, 20..25);
        assert_eq!(
            read_all(&mut spool.reader("b")),
            (2..25).collect::<Vec<_>>()
        );
        assert_eq!(
            read_all(&mut spool.reader("a")),
            (2..25).collect::<Vec<_>>()
        );
    }

    #[test]
    fn readers_get_the_same_records_from_memory_as_from_the_files() {
        let groups = [1, 3, 2, 5, 1, 7, 2];
        let total: u64 = groups.iter().sum();
        // Files only; memory for a few records (a reader that falls behind goes to the files); plenty of memory.
        for memory in [0, 200, 1 << 20] {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config(dir.path(), 1 << 20, WhenFull::Block);
            cfg.memory_bytes = memory;
            let log = cfg.log_dir.clone();
            let (mut w, spool) = open(&cfg, &["a".into(), "b".into(), "c".into()]).unwrap();
            let (mut a, mut b) = (spool.reader("a"), spool.reader("b"));
            let mut c = spool.reader("c").wanting(HashSet::from(["t0".to_string()]));
            let (mut got_a, mut got_b, mut got_c) = (Got::new(), Got::new(), Got::new());
            let mut expected = Got::new();
            let (mut next, mut end) = (1, 0);
            for group in groups {
                let appended = append_logged(&mut w, next..next + group, Some(&log));
                for (seq, spooled) in (next..).zip(&appended.ends) {
                    let text = String::from_utf8(line(seq)).unwrap();
                    let ty = format!("t{}", seq % 3);
                    let at = end + spooled;
                    expected.push((seq, at, format!("i{seq}"), ty, text.trim_end().into()));
                }
                end += appended.file_len();
                next += group;
                // `a` reads two records per group: it falls further behind with every group.
                take(&a.next(2, 1 << 20, 1, Duration::ZERO).unwrap(), &mut got_a);
            }
            assert_eq!(next, total + 1);
            drain(&mut a, &mut got_a);
            drain(&mut b, &mut got_b);
            loop {
                let read = c.next(3, 1 << 20, 1, Duration::ZERO).unwrap();
                if read.end == c.position() && read.entries.is_empty() && read.passed == 0 {
                    break;
                }
                take(&read, &mut got_c);
            }
            assert_eq!(got_a, expected, "memory {memory}");
            assert_eq!(got_b, expected, "memory {memory}");
            let only_t0: Got = expected.iter().filter(|e| e.3 == "t0").cloned().collect();
            assert_eq!(got_c, only_t0, "memory {memory}");
            assert!(expected.iter().any(|e| e.3 == "t0"));
        }
    }

    #[test]
    fn records_in_the_log_are_only_referred_to_in_the_spool_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 20, WhenFull::Block);
        cfg.memory_bytes = 0;
        cfg.segment_bytes = 1 << 20;
        let log = cfg.log_dir.clone();
        let (mut w, spool) = open(&cfg, &["a".into(), "b".into()]).unwrap();
        append_logged(&mut w, 1..10, Some(&log));
        let segment =
            std::fs::read_to_string(dir.path().join(format!("spool-{:020}.jsonl", 0))).unwrap();
        let lines: Vec<&str> = segment.lines().collect();
        assert_eq!(lines[2], r#"{"seq":3,"id":"i3","type":"t0","in_log":true}"#);
        assert_eq!(lines[3].as_bytes(), line(4).trim_ascii_end());
        // The slowest sink decides what the log must keep: `a` confirmed 1-4, `b` nothing.
        let mut a = spool.reader("a");
        let read = a.next(4, 1 << 20, 1, Duration::ZERO).unwrap();
        a.confirm(read.end, true).unwrap();
        assert_eq!(spool.oldest_unconfirmed().unwrap(), Some(1));
        let mut b = spool.reader("b");
        let read = b.next(100, 1 << 20, 1, Duration::ZERO).unwrap();
        assert_eq!(read.entries.len(), 9);
        b.confirm(read.end, true).unwrap();
        assert_eq!(spool.oldest_unconfirmed().unwrap(), Some(5));
        // A record that the log lost (it was deleted by hand) is counted as dropped, and the others still arrive.
        std::fs::remove_dir_all(&log).unwrap();
        let mut a = spool.reader("a");
        let read = a.next(100, 1 << 20, 1, Duration::ZERO).unwrap();
        let seqs: Vec<u64> = read.entries.iter().map(|e| e.seq).collect();
        assert_eq!((seqs, read.dropped), (vec![5, 7, 8], 2));
        a.confirm(read.end, true).unwrap();
        assert_eq!(spool.oldest_unconfirmed().unwrap(), None);
    }

    #[test]
    fn references_to_records_the_log_never_got_are_cut_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 20, WhenFull::Block);
        cfg.segment_bytes = 1 << 20;
        let log = cfg.log_dir.clone();
        let (mut w, _) = open(&cfg, &["a".into()]).unwrap();
        append_logged(&mut w, 1..5, Some(&log));
        // The log's last record is 3 (the only one of 1-4 in it); a crash lost the group of 5-7 from the log
        // but not from the spool.
        let mut group = Group::default();
        group.push(&line(5), false);
        group.push(&line(6), true);
        group.push(&line(7), false);
        w.append(&group).unwrap();
        w.start_sync().wait().unwrap();
        drop(w);
        let (w, spool) = open(&cfg, &["a".into()]).unwrap();
        assert_eq!(
            w.last_seq(),
            Some(5),
            "5 is stream-only: kept; 6 is not in the log: cut with what follows"
        );
        assert_eq!(read_all(&mut spool.reader("a")), vec![1, 2, 3, 4, 5]);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("orphans"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
    }

    #[test]
    fn references_lost_in_a_crash_are_written_again_from_the_log_but_not_after_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 20, WhenFull::Block);
        cfg.segment_bytes = 1 << 20;
        let log = cfg.log_dir.clone();
        let streamed = HashSet::from(["t0".to_string(), "t1".to_string(), "t2".to_string()]);
        let segment = dir.path().join(format!("spool-{:020}.jsonl", 0));
        let (mut w, _) = open(&cfg, &["a".into()]).unwrap();
        let first = append_logged(&mut w, 1..4, Some(&log));
        let second = append_logged(&mut w, 6..10, Some(&log));
        drop(w);
        // A crash loses the unsynced tail: the reference to 9 (7 and 8 are stream-only, whole in the spool).
        let kept = first.file_len() + second.ends[2];
        OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap()
            .set_len(kept)
            .unwrap();
        let (mut w, spool) = open(&cfg, &["a".into()]).unwrap();
        assert_eq!(w.last_seq(), Some(8));
        assert_eq!(w.repair(&streamed).unwrap(), 1);
        assert_eq!(w.last_seq(), Some(9));
        let mut a = spool.reader("a");
        assert_eq!(read_all(&mut a), vec![1, 2, 3, 6, 7, 8, 9]);
        let read = spool
            .reader("a")
            .next(100, 1 << 20, 1, Duration::ZERO)
            .unwrap();
        assert_eq!(
            read.entries.last().unwrap().line().as_bytes(),
            line(9).trim_ascii_end()
        );
        // After a clean stop the spool lacks nothing, even where the log has more of a streamed type.
        w.close();
        drop((w, spool));
        let extra = log.join("trail-20261123T000000Z-00000000000000000001.jsonl");
        let mut f = OpenOptions::new().append(true).open(extra).unwrap();
        std::io::Write::write_all(&mut f, &line(12)).unwrap();
        let (mut w, _) = open(&cfg, &["a".into()]).unwrap();
        assert_eq!(w.repair(&streamed).unwrap(), 0);
        drop(w);
        // Without the clean mark (a crash now), 12 is taken as lost and referred to.
        let (mut w, _) = open(&cfg, &["a".into()]).unwrap();
        assert_eq!(w.repair(&streamed).unwrap(), 1);
    }

    #[test]
    fn the_log_source_rereads_what_the_writer_took_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir
            .path()
            .join("trail-20261123T000000Z-00000000000000000001.jsonl");
        let record =
            |seq: u64, id: &str| format!("{{\"seq\":{seq},\"id\":\"{id}\",\"type\":\"t\"}}\n");
        std::fs::write(&path, record(1, "a") + &record(2, "b") + &record(3, "c")).unwrap();
        let mut source = LogSource::new(dir.path().to_owned());
        assert_eq!(
            source.find(1, "a").unwrap().unwrap(),
            record(1, "a").trim_end()
        );
        // Records 2 and 3 were read ahead; their group failed, was taken back, and others took their seqs.
        std::fs::write(&path, record(1, "a") + &record(2, "x") + &record(3, "y")).unwrap();
        assert_eq!(
            source.find(2, "x").unwrap().unwrap(),
            record(2, "x").trim_end()
        );
        assert_eq!(
            source.find(3, "y").unwrap().unwrap(),
            record(3, "y").trim_end()
        );
        assert_eq!(source.find(4, "z").unwrap(), None);
    }

    #[test]
    fn a_segment_after_a_gap_left_by_a_crash_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20, WhenFull::Block);
        let log = cfg.log_dir.clone();
        let streamed = HashSet::from(["t0".to_string(), "t1".to_string(), "t2".to_string()]);
        let (mut w, _) = open(&cfg, &["a".into()]).unwrap();
        // 200-byte segments of one or two records; multiples of 3 are in the log.
        for seq in 1..12 {
            append_logged(&mut w, seq..seq + 1, Some(&log));
        }
        drop(w);
        let mut segments: Vec<u64> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| segment_start(&e.unwrap().path()))
            .collect();
        segments.sort();
        let path = |start: u64| dir.path().join(format!("spool-{start:020}.jsonl"));
        let seqs_in = |start: u64| -> Vec<u64> {
            let text = std::fs::read(path(start)).unwrap();
            text.split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(record_seq)
                .collect()
        };
        let [.., before, middle, last] = segments[..] else {
            panic!("{segments:?}");
        };
        let kept: Vec<u64> = segments
            .iter()
            .take_while(|&&s| s <= before)
            .flat_map(|&s| seqs_in(s))
            .collect();
        let kept_last = *kept.last().unwrap();
        // The crash lost the middle segment's unsynced tail, but the last segment's first group made it.
        OpenOptions::new()
            .write(true)
            .open(path(middle))
            .unwrap()
            .set_len(0)
            .unwrap();
        let (mut w, spool) = open(&cfg, &["a".into()]).unwrap();
        assert!(
            dir.path()
                .join(format!("spool-{last:020}.jsonl.after-gap"))
                .exists()
        );
        assert_eq!(w.last_seq(), Some(kept_last));
        // What the log has after that is referred to again; stream-only records after the gap were never
        // acknowledged.
        let again: Vec<u64> = (kept_last + 1..12).filter(|s| s % 3 == 0).collect();
        assert_eq!(w.repair(&streamed).unwrap(), again.len() as u64);
        let mut a = spool.reader("a");
        a.pos = segments[0];
        let expected: Vec<u64> = kept.iter().copied().chain(again).collect();
        assert_eq!(read_all(&mut a), expected);
    }

    #[test]
    fn segments_are_deleted_once_every_sink_is_past_them() {
        let dir = tempfile::tempdir().unwrap();
        let sinks = vec!["a".to_string(), "b".to_string()];
        let (mut w, spool) = open(&config(dir.path(), 1 << 20, WhenFull::Block), &sinks).unwrap();
        for seq in 1..30 {
            append(&mut w, seq..seq + 1);
        }
        let segments = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| segment_start(&e.as_ref().unwrap().path()).is_some())
                .count()
        };
        let before = segments();
        assert!(before > 3, "{before}");
        let mut a = spool.reader("a");
        read_all(&mut a);
        a.confirm(spool.positions().0, true).unwrap();
        assert_eq!(segments(), before, "b has not confirmed anything");
        let mut b = spool.reader("b");
        read_all(&mut b);
        b.confirm(spool.positions().0, true).unwrap();
        assert_eq!(segments(), 1);
    }

    #[test]
    fn a_full_spool_blocks_or_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let sinks = vec!["a".to_string()];
        let one = line(1).len() as u64;
        let (mut w, spool) = open(&config(dir.path(), one * 5, WhenFull::Block), &sinks).unwrap();
        append(&mut w, 1..6);
        assert!(
            w.reserve(one, &|| true).is_err(),
            "full: the writer must wait"
        );
        let mut a = spool.reader("a");
        let read = a.next(2, 1 << 20, 1, Duration::ZERO).unwrap();
        a.confirm(read.end, true).unwrap();
        assert!(w.reserve(one * 2, &|| true).is_ok());

        let dir = tempfile::tempdir().unwrap();
        let (mut w, spool) =
            open(&config(dir.path(), one * 5, WhenFull::DropOldest), &sinks).unwrap();
        append(&mut w, 1..6);
        append(&mut w, 6..9);
        let mut a = spool.reader("a");
        let mut dropped = 0;
        let mut seqs = vec![];
        loop {
            let read = a.next(100, 1 << 20, 1, Duration::ZERO).unwrap();
            if read.entries.is_empty() && read.dropped == 0 {
                break;
            }
            dropped += read.dropped;
            seqs.extend(read.entries.iter().map(|e| e.seq));
        }
        assert_eq!(dropped, 3);
        assert_eq!(seqs, vec![4, 5, 6, 7, 8]);
    }
}
