//! The spool: the durable queue of streamed events that sinks read from, each at its own confirmed position.
//!
//! Owns the spool directory: segment files of record lines (the same bytes as log lines) named by the byte
//! position of their first record in the whole spool (`spool-<pos, 20 digits>.jsonl`), and one cursor file per
//! sink (`cursors/<sink>.json`) holding the position up to which that sink confirmed delivery. The journal writer
//! appends and publishes; each sink's worker reads through a [`Reader`]. A record is visible to readers only once
//! the journal has synced it, and a segment is deleted only when every sink's cursor is past it.
//!
//! The queue is bounded by `max_bytes` of unconfirmed records (between the slowest cursor and the head). When it is
//! full the writer waits (`block`, the default: clients wait, nothing is lost) or moves a floor forward so the
//! slowest sinks skip their oldest records (`drop_oldest`); every record skipped that way is counted.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use memchr::memmem::Finder;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

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
    last_seq: Option<u64>,
    syncer: mpsc::Sender<SyncRequest>,
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

type SyncRequest = (File, mpsc::Sender<std::io::Result<()>>);

/// Starts the thread that syncs spool files for the writer; it ends when the writer is dropped.
fn start_syncer() -> std::io::Result<mpsc::Sender<SyncRequest>> {
    let (tx, rx) = mpsc::channel::<SyncRequest>();
    std::thread::Builder::new()
        .name("trail-spool-sync".into())
        .spawn(move || {
            for (file, reply) in rx {
                let _ = reply.send(file.sync_data());
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
    let shared_dir = dir.clone();
    let mut last_seq = None;
    let (start, len) = match segments.last() {
        Some(&start) => {
            let path = shared_dir.join(format!("spool-{start:020}.jsonl"));
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
        }),
        changed: Condvar::new(),
        max_bytes: config.max_bytes,
        when_full: config.when_full,
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
        out: AppendFile::new(file, len),
        start,
        segment_bytes: config.segment_bytes,
        last_seq,
        syncer: start_syncer().map_err(io_error(&shared_dir_for_errors))?,
    };
    Ok((writer, Spool { shared }))
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

    /// Appends record lines (not yet visible to readers) and, with `sync`, syncs them.
    pub fn append(&mut self, bytes: &[u8], sync: bool) -> std::io::Result<()> {
        if !self.out.is_empty() && self.out.len() + bytes.len() as u64 > self.segment_bytes {
            self.rotate()?;
        }
        self.out.append(bytes, sync)
    }

    /// The `seq` of the last record in the spool when it was opened: the journal continues after it, so that a
    /// stream-only record (in the spool, not the log) never shares its `seq` with a later one.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Starts syncing what was appended (`fdatasync`) on the spool's sync thread, so that the caller can sync
    /// another file meanwhile; [`PendingSync::wait`] gives the outcome.
    pub fn start_sync(&self) -> PendingSync {
        let (reply, outcome) = mpsc::channel();
        let sent = self.out.file().try_clone().and_then(|file| {
            self.syncer
                .send((file, reply))
                .map_err(|_| std::io::Error::other("the spool's sync thread has stopped"))
        });
        PendingSync(sent.map(|()| outcome))
    }

    /// Takes back the last `bytes` appended (their group could not be completed); they were never published.
    pub fn undo(&mut self, bytes: u64) {
        self.out.undo(bytes);
    }

    /// Makes everything appended so far visible to readers.
    pub fn publish(&self) {
        let mut state = self.shared.lock();
        state.head = self.start + self.out.len();
        self.shared.changed.notify_all();
    }

    /// Tells readers that no more records will come.
    pub fn close(&self) {
        let _ = self.out.file().sync_all();
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.file().sync_all()?;
        let start = self.start + self.out.len();
        let path = self.shared.segment_path(start);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        File::open(&self.shared.dir)?.sync_all()?;
        self.out = AppendFile::new(file, 0);
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
}

impl Entry {
    /// An entry holding its own copy of `line`.
    pub fn new(seq: u64, end: u64, line: &str) -> Entry {
        Entry {
            seq,
            end,
            text: Arc::new(line.to_owned()),
            start: 0,
            len: line.len(),
        }
    }

    /// The record line, without its newline.
    pub fn line(&self) -> &str {
        &self.text[self.start..self.start + self.len]
    }

    /// The record's event type, read from its fixed place in the line.
    pub fn event_type(&self) -> &str {
        record_type(self.line().as_bytes())
    }

    /// The record's id.
    pub fn id(&self) -> &str {
        record_id(self.line().as_bytes())
    }
}

/// The event type of a stored record line: `type` always follows the fixed-format fields, so its first occurrence
/// is the record's own.
pub fn record_type(line: &[u8]) -> &str {
    static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b",\"type\":\""));
    string_after(&TYPE, line)
}

fn record_id(line: &[u8]) -> &str {
    static ID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b",\"id\":\""));
    string_after(&ID, line)
}

/// The string value that follows the first occurrence of `key` (a `,"name":"` prefix) in a record line.
fn string_after<'a>(key: &Finder<'_>, line: &'a [u8]) -> &'a str {
    let Some(at) = key.find(line) else {
        return "";
    };
    let rest = &line[at + key.needle().len()..];
    let end = memchr::memchr(b'"', rest).unwrap_or(0);
    std::str::from_utf8(&rest[..end]).unwrap_or("")
}

fn record_seq(line: &[u8]) -> u64 {
    let rest = line.strip_prefix(b"{\"seq\":").unwrap_or(b"");
    let end = rest
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// What one [`Reader::next`] call produced.
#[derive(Debug, Default)]
pub struct Read {
    /// Records in spool order.
    pub entries: Vec<Entry>,
    /// Records skipped because the spool was full and `drop_oldest` is configured.
    pub dropped: u64,
    /// Position after the last record read or skipped.
    pub end: u64,
}

/// A sink's view of the spool: reads from its confirmed position onwards.
pub struct Reader {
    shared: Arc<Shared>,
    sink: String,
    /// Next position to read.
    pos: u64,
    file: Option<(u64, File)>,
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
        }
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
        let (limit, segment_start, floor) = {
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
            (state.head.min(next), start, state.floor)
        };
        if self.pos < segment_start {
            self.pos = segment_start;
        }
        let mut read = Read {
            end: self.pos,
            ..Read::default()
        };
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
        let mut offset = 0;
        while let Some(n) = memchr::memchr(b'\n', &bytes[offset..]) {
            let line = &bytes[offset..offset + n];
            let end = self.pos + (offset + n + 1) as u64;
            if end <= floor {
                read.dropped += 1;
            } else {
                if read.entries.len() >= max_events
                    || (!read.entries.is_empty() && offset + n > max_bytes)
                {
                    break;
                }
                read.entries.push(Entry {
                    seq: record_seq(line),
                    end,
                    text: text.clone(),
                    start: offset,
                    len: n,
                });
            }
            offset += n + 1;
            read.end = end;
        }
        self.pos = read.end;
        Ok(read)
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
        }
    }

    fn line(seq: u64) -> Vec<u8> {
        format!("{{\"seq\":{seq},\"id\":\"i{seq}\",\"received_at\":\"t\",\"occurred_at\":\"t\",\"type\":\"t{}\"}}\n", seq % 3).into_bytes()
    }

    fn append(w: &mut Writer, seqs: std::ops::Range<u64>) {
        let bytes: Vec<u8> = seqs.flat_map(line).collect();
        w.reserve(bytes.len() as u64, &|| true).unwrap();
        w.append(&bytes, true).unwrap();
        w.publish();
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
