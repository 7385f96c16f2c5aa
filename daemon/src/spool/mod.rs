//! The spool: the durable queue of streamed events that sinks read from, each at its own confirmed position.
//!
//! Owns the spool directory: segment files of one line per streamed record, named by the byte position of their
//! first line in the whole spool (`spool-<pos, 20 digits>.jsonl`), and one cursor file per sink
//! (`cursors/<sink>.json`) holding the position up to which that sink confirmed delivery. A record that is only
//! streamed is spooled whole (the line the log would hold); a record that is also in the log is spooled as a
//! reference to it, `{"seq":…,"id":…,"type":…,"in_log":true}`, and a reader that meets one reads the record from
//! the log, which keeps it until every sink has confirmed it (see `retention`). So such records are
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
//!
//! Here: opening and recovery (torn tails, references the log never got, a segment after a gap), cursors, and
//! what retention must keep. `record`: spool lines as a group builds them and readers parse them; `writer`: the
//! journal's end and the sync thread; `reader`: a sink's reads; `memory`: the in-memory blocks; `log_source`:
//! reading the log by `seq`.

mod backlog;
mod log_source;
mod memory;
mod reader;
mod record;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{SpoolConfig, WhenFull};
use crate::log::append::AppendFile;

pub use backlog::Undelivered;
use log_source::LogSource;
use memory::Block;
pub use reader::{Read, Reader, Schedule, Wants};
pub use record::{Entry, Group, Mark};
use record::{IN_LOG, record_seq};
use writer::start_syncer;
pub use writer::{Full, PendingSync, Writer};

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
    Damaged(#[from] crate::log::recovery::Error),
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
    /// Lines counted in segment files for [`Spool::undelivered`].
    counts: backlog::Counts,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn segment_path(&self, start: u64) -> PathBuf {
        segment_path(&self.dir, start)
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

#[derive(Serialize, Deserialize)]
struct CursorFile {
    pos: u64,
}

/// Left in the spool directory by a clean stop: the spool then lacks nothing.
const CLEAN: &str = "closed-cleanly";

/// Opens (and recovers) the spool for `sinks`, the names of the configured sinks.
pub fn open(config: &SpoolConfig, sinks: &[String]) -> Result<(Writer, Spool), Error> {
    let dir = &config.dir;
    crate::modes::create_dir_all(dir).map_err(io_error(dir))?;
    crate::modes::create_dir_all(&dir.join("cursors")).map_err(io_error(dir))?;
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
            let path = segment_path(&shared_dir, start);
            // Orphans first: they are whole lines, so a torn tail after them goes aside with them.
            cut_orphans(&path, &config.log_dir)?;
            let (len, head) = crate::log::recovery::recover(&path)?;
            last_seq = head.map(|h| h.seq);
            // A segment just started may be empty: the last seq is then in the one before.
            for &older in segments.iter().rev().skip(1) {
                if last_seq.is_some() {
                    break;
                }
                let path = segment_path(&shared_dir, older);
                last_seq = crate::log::recovery::recover(&path)?.1.map(|h| h.seq);
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
        counts: backlog::Counts::default(),
    });
    for (sink, pos) in shared.lock().cursors.clone() {
        write_cursor(&shared, &sink, pos).map_err(io_error(&shared.cursor_path(&sink)))?;
    }
    let shared_dir_for_errors = shared.dir.clone();
    let path = shared.segment_path(start);
    let file = crate::modes::append(&path).map_err(io_error(&path))?;
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
    let Some(log_last) = log_last_seq(log_dir).map_err(io_error(log_dir))? else {
        return Ok(());
    };
    let content = std::fs::read(path).map_err(io_error(path))?;
    let mut offset = 0;
    while let Some(n) = memchr::memchr(b'\n', &content[offset..]) {
        let line = &content[offset..offset + n];
        if line.ends_with(IN_LOG) && record_seq(line) > log_last {
            let aside = path.with_extension(format!("jsonl.orphans-{offset}"));
            crate::modes::write(&aside, &content[offset..]).map_err(io_error(&aside))?;
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
    let files = match crate::log::files::list(log_dir) {
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
            let (start, line) = crate::log::recovery::last_line(&mut file, end)?;
            if line.last() == Some(&b'\n')
                && let Some(seq) = crate::record::line::seq(&line)
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
    let path = segment_path(dir, before);
    let (len, _) = crate::log::recovery::recover(&path)?;
    if before + len >= last {
        return Ok(());
    }
    let after = segment_path(dir, last);
    let aside = after.with_extension("jsonl.after-gap");
    std::fs::rename(&after, &aside).map_err(io_error(&after))?;
    warn!(
        file = %after.display(), gap_from = before + len, gap_to = last, kept_in = %aside.display(),
        "a spool segment followed a gap left by a crash (nothing in it was acknowledged): set aside"
    );
    segments.pop();
    Ok(())
}

/// The file of the segment that starts at spool position `start`.
fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("spool-{start:020}.jsonl"))
}

fn segment_start(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_prefix("spool-")?.strip_suffix(".jsonl")?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

fn write_cursor(shared: &Shared, sink: &str, pos: u64) -> std::io::Result<()> {
    let path = shared.cursor_path(sink);
    let tmp = path.with_extension("json.tmp");
    let cursor = serde_json::to_vec(&CursorFile { pos }).expect("serializable");
    crate::modes::write_aside(&tmp, &path, &cursor, false)
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

    /// Registers a sink added by a reload: it receives what is published from now on (its cursor starts at the
    /// head and is written to its cursor file). A sink already registered keeps its position.
    pub fn add_sink(&self, sink: &str) -> std::io::Result<()> {
        let pos = {
            let mut state = self.shared.lock();
            let head = state.head;
            *state.cursors.entry(sink.to_owned()).or_insert(head)
        };
        info!(sink, pos, "new sink: it receives events from now on");
        write_cursor(&self.shared, sink, pos)
    }

    /// Forgets a sink removed by a reload (its worker has ended): its cursor no longer holds back segment
    /// deletion, the `max_bytes` bound or the log's retention, and its cursor file is deleted.
    pub fn remove_sink(&self, sink: &str) -> std::io::Result<()> {
        {
            let mut state = self.shared.lock();
            state.cursors.remove(sink);
            // A writer waiting for room may have it now.
            self.shared.changed.notify_all();
        }
        match std::fs::remove_file(self.shared.cursor_path(sink)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
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

    /// The records after `pos` (a sink's confirmed position from [`Spool::positions`]) and when the first of them
    /// was received: what that sink has not confirmed. Reads the files for the part older than the spool's memory
    /// (and only what changed since the last question about a range): for status and metrics, not hot paths.
    pub fn undelivered(&self, pos: u64) -> std::io::Result<Undelivered> {
        self.shared.undelivered(pos)
    }

    /// The confirmed position of every sink and the head.
    pub fn positions(&self) -> (u64, HashMap<String, u64>) {
        let state = self.shared.lock();
        (state.head, state.cursors.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

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

    /// A spool in `dir` whose records fit one segment, and its log directory.
    fn one_segment(dir: &Path) -> (SpoolConfig, PathBuf) {
        let mut cfg = config(dir, 1 << 20, WhenFull::Block);
        cfg.segment_bytes = 1 << 20;
        let log = cfg.log_dir.clone();
        (cfg, log)
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
        let (mut cfg, log) = one_segment(dir.path());
        cfg.memory_bytes = 0;
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
        let (cfg, log) = one_segment(dir.path());
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
        let (cfg, log) = one_segment(dir.path());
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
