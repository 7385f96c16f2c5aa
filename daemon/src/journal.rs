//! The durable JSON-lines log and its single writer (group commit).
//!
//! Owns the log directory: file naming, recovery of a torn tail at start, and the writer thread that assigns
//! `seq`, appends records and syncs them. Nothing else writes to the log. A submission is acknowledged only after
//! its records are written and, with `fsync: always`, after `fdatasync` returned.
//!
//! Files are named `trail-<UTC start, YYYYMMDDTHHMMSSZ>-<first seq, 20 digits>.jsonl`, so they sort by time and
//! by `seq`; the newest one is appended to and the symlink `current` names it. The writer also seals every
//! persisted record into the hash chain ([`crate::log::chain`]: it is the only place that knows the order),
//! starts a new file at period boundaries of the daemon's clock and before a file would pass `max_file_bytes`,
//! and writes signed checkpoints ([`crate::log::checkpoint`]) at each rotation, every `checkpoint_every`
//! while records arrive, and at stop. A failed write or sync changes neither the file nor the chain.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::clock;
use crate::config::{FsyncPolicy, Rotate};
use crate::log::append::AppendFile;
use crate::log::checkpoint::{self, Signer};
use crate::log::files::{self, CURRENT, file_name};
use crate::log::recovery::{Error, chain_head, io_error, recover};
use crate::log::{chain, index};
use crate::spool;

/// How much the writer gathers into one write and one sync.
const GROUP_BYTES: usize = 8 << 20;
/// Submissions that may wait for the writer; beyond that, connections stop reading (back-pressure).
const QUEUE_DEPTH: usize = 512;

/// Record tails for one submission, in one buffer (see [`crate::record`]), and where each record goes.
#[derive(Debug, Default)]
pub struct Batch {
    buf: Vec<u8>,
    ends: Vec<usize>,
    routes: Vec<Route>,
    /// The chain's inner digest of every persisted record (zeros for the others), computed by the submitter so
    /// that the single writer only chains 72 bytes per record.
    digests: Vec<chain::Hash>,
}

/// Where a record is written: the log, the spool (for sinks), or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Written to the JSON-lines log.
    pub persist: bool,
    /// Written to the spool for sinks.
    pub stream: bool,
}

impl Batch {
    /// The buffer to append the next tail to; call [`Batch::end_record`] after writing it.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Marks the end of the tail just written and says where the record goes.
    pub fn end_record(&mut self, route: Route) {
        let start = self.ends.last().copied().unwrap_or(0);
        let digest = if route.persist {
            chain::digest(&self.buf[start..])
        } else {
            chain::GENESIS
        };
        self.ends.push(self.buf.len());
        self.routes.push(route);
        self.digests.push(digest);
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when no record was added.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn tails(&self) -> impl Iterator<Item = (&[u8], Route, &chain::Hash)> {
        let mut start = 0;
        self.ends.iter().zip(&self.routes).zip(&self.digests).map(
            move |((&end, &route), digest)| {
                let tail = &self.buf[start..end];
                start = end;
                (tail, route, digest)
            },
        )
    }
}

/// Why a submission was not stored; the client may retry.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// The outcome of a submission: the `seq` of its first record (the others follow consecutively).
pub type Ack = oneshot::Receiver<Result<u64, Unavailable>>;

struct Submission {
    batch: Batch,
    /// Taken when answered.
    done: Option<oneshot::Sender<Result<u64, Unavailable>>>,
}

/// What the writer receives: work, or a reminder that time passed (rotation and checkpoints are due by the clock
/// even when no records arrive).
enum Message {
    Submit(Submission),
    Tick,
}

/// A handle that submits batches to the writer; cheap to clone, one per connection.
#[derive(Clone)]
pub struct Submitter {
    tx: mpsc::Sender<Message>,
    progress: Arc<Progress>,
}

impl Submitter {
    /// Queues a batch, waiting while the writer's queue is full. The returned [`Ack`] resolves once the batch is
    /// durable (or could not be stored).
    pub async fn submit(&self, batch: Batch) -> Ack {
        let (done, ack) = oneshot::channel();
        self.progress.waiting.store(true, Ordering::Relaxed);
        let submission = Submission {
            batch,
            done: Some(done),
        };
        if let Err(mpsc::error::SendError(Message::Submit(s))) =
            self.tx.send(Message::Submit(submission)).await
            && let Some(done) = s.done
        {
            let _ = done.send(Err(Unavailable("the log writer has stopped".into())));
        }
        ack
    }
}

/// The running writer. Dropping every [`Submitter`] lets it drain, sync and stop; [`Journal::join`] waits for that.
pub struct Journal {
    thread: JoinHandle<()>,
}

/// The writer's progress, for the service watchdog and status line (see `systemd::watchdog`): the writer is
/// healthy while `heartbeat` advances or nothing waits for it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Advanced after every group stored and every 100 ms of waiting for room in a full spool (waiting for sinks
    /// is back-pressure, not a stuck writer). It stands still while the writer is stuck in a write or sync, or
    /// fails to store what it is given.
    pub heartbeat: AtomicU64,
    /// Set by every submission (and by the writer when it takes one); cleared by the writer once it stored
    /// everything it was given and its queue is empty, or when a whole tick (1 s) passed without a submission
    /// (idle after failures).
    pub waiting: AtomicBool,
    /// Records stored since start.
    pub records: AtomicU64,
}

/// What the writer needs besides the log directory.
pub struct Options {
    /// When records are synced.
    pub fsync: FsyncPolicy,
    /// The spool's writing end, when sinks are configured.
    pub spool: Option<crate::spool::Writer>,
    /// Set when the daemon is stopping: a writer waiting for room in a full spool gives up.
    pub stopping: Arc<AtomicBool>,
    /// When a new file is started.
    pub rotate: Rotate,
    /// Size at which a file is closed.
    pub max_file_bytes: u64,
    /// Signs checkpoints; none means no checkpoints are written.
    pub signer: Option<Arc<Signer>>,
    /// How often a checkpoint is written while records arrive.
    pub checkpoint_every: Duration,
    /// Told whenever a file was closed (maintenance may index, compress or expire it).
    pub rotated: Option<Arc<Notify>>,
    /// Advanced as the writer makes progress.
    pub progress: Arc<Progress>,
}

impl Journal {
    /// Opens (and if needed recovers) the log in `dir` and starts the writer thread.
    pub fn start(dir: &Path, options: Options) -> Result<(Journal, Submitter), Error> {
        let mut log = LogFile::open(dir)?;
        // The newest records may be stream-only (in the spool, not the log): `seq` continues after them too.
        if let Some(spooled) = options.spool.as_ref().and_then(|s| s.last_seq()) {
            log.next_seq = log.next_seq.max(spooled + 1);
        }
        info!(file = %log.path.display(), next_seq = log.next_seq, chain = %chain::hex(&log.chain), "log open");
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let progress = options.progress.clone();
        let weak = tx.downgrade();
        std::thread::Builder::new()
            .name("trail-journal-tick".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(TICK);
                    let Some(tx) = weak.upgrade() else { return };
                    let _ = tx.try_send(Message::Tick);
                }
            })
            .map_err(io_error(dir))?;
        let thread = std::thread::Builder::new()
            .name("trail-journal".into())
            .spawn(move || writer(log, rx, options))
            .map_err(io_error(dir))?;
        Ok((Journal { thread }, Submitter { tx, progress }))
    }

    /// Waits until the writer has drained its queue and synced the log.
    pub fn join(self) {
        if self.thread.join().is_err() {
            error!("the log writer panicked");
        }
    }
}

/// How often the writer looks at the clock when no records arrive.
const TICK: Duration = Duration::from_secs(1);

fn writer(mut log: LogFile, mut rx: mpsc::Receiver<Message>, mut options: Options) {
    let mut group: Vec<Submission> = Vec::new();
    let mut out: Vec<u8> = Vec::with_capacity(GROUP_BYTES + (1 << 20));
    let mut streamed = spool::Group::default();
    let mut seq_text = itoa::Buffer::new();
    let sync = options.fsync == FsyncPolicy::Always;
    let mut checkpoints = Checkpoints {
        last: Instant::now(),
        changed: false,
        retry_rotation: None,
    };
    log.point_current();
    let mut submitted_since_tick = false;
    while let Some(message) = rx.blocking_recv() {
        let first = match message {
            Message::Tick => {
                if !std::mem::take(&mut submitted_since_tick) && rx.is_empty() {
                    options.progress.waiting.store(false, Ordering::Relaxed);
                }
                housekeeping(&mut log, &mut options, &mut checkpoints);
                continue;
            }
            Message::Submit(s) => s,
        };
        submitted_since_tick = true;
        // Also set here: a submitter may have set it just before the writer cleared it.
        options.progress.waiting.store(true, Ordering::Relaxed);
        let mut ticked = false;
        let mut bytes = first.batch.buf.len();
        group.push(first);
        while bytes < GROUP_BYTES {
            match rx.try_recv() {
                Ok(Message::Submit(s)) => {
                    bytes += s.batch.buf.len();
                    group.push(s);
                }
                Ok(Message::Tick) => ticked = true,
                Err(_) => break,
            }
        }
        // Commit the group in parts when the spool cannot take all of it now: what fits is acknowledged
        // without waiting for room for the rest.
        let mut pending = &mut group[..];
        let mut failed = false;
        while !pending.is_empty() {
            out.clear();
            streamed.clear();
            let first_seq = log.next_seq;
            let mut seq = first_seq;
            let mut chain = log.chain;
            let mut last_persisted = None;
            let mut taken = 0;
            for s in pending.iter() {
                let (out_len, streamed_mark) = (out.len(), streamed.mark());
                let (chain_before, last_before) = (chain, last_persisted);
                for (tail, route, digest) in s.batch.tails() {
                    let start = out.len();
                    out.extend_from_slice(crate::record::line::SEQ_PREFIX);
                    out.extend_from_slice(seq_text.format(seq).as_bytes());
                    out.extend_from_slice(tail);
                    if route.persist {
                        chain = chain::seal_digest(&chain, seq, digest, &mut out);
                        last_persisted = Some(seq);
                    } else {
                        out.push(b'}');
                    }
                    out.push(b'\n');
                    if route.stream {
                        streamed.push(&out[start..], route.persist);
                    }
                    if !route.persist {
                        out.truncate(start);
                    }
                    seq += 1;
                }
                let fits = options
                    .spool
                    .as_ref()
                    .is_none_or(|spool| spool.fits(streamed.file_len()));
                if taken > 0 && !fits {
                    out.truncate(out_len);
                    streamed.truncate(streamed_mark);
                    seq -= s.batch.len() as u64;
                    (chain, last_persisted) = (chain_before, last_before);
                    break;
                }
                taken += 1;
            }
            let (part, rest) = std::mem::take(&mut pending).split_at_mut(taken);
            pending = rest;
            if !out.is_empty() && log.rotation_due(&options, out.len() as u64) {
                rotate(&mut log, &mut options, &mut checkpoints);
            }
            let started = Instant::now();
            match store(&mut log, &out, &mut streamed, sync, &mut options) {
                Ok(()) => {
                    log.next_seq = seq;
                    if last_persisted.is_some() {
                        log.chain = chain;
                        log.last_seq = last_persisted;
                        log.last_seq_any = last_persisted;
                        checkpoints.changed = true;
                    }
                    let mut seq = first_seq;
                    for s in part.iter_mut() {
                        let n = s.batch.len() as u64;
                        if let Some(done) = s.done.take() {
                            let _ = done.send(Ok(seq));
                        }
                        seq += n;
                    }
                    let progress = &options.progress;
                    progress
                        .records
                        .fetch_add(seq - first_seq, Ordering::Relaxed);
                    progress.heartbeat.fetch_add(1, Ordering::Relaxed);
                    debug!(records = seq - first_seq, bytes = out.len() as u64 + streamed.file_len(), elapsed = ?started.elapsed(), "group committed");
                }
                Err(reason) => {
                    failed = true;
                    error!(file = %log.path.display(), error = %reason, records = seq - first_seq, "cannot store events; answering unavailable");
                    for s in part.iter_mut() {
                        if let Some(done) = s.done.take() {
                            let _ = done.send(Err(reason.clone()));
                        }
                    }
                }
            }
        }
        group.clear();
        if !failed && rx.is_empty() {
            options.progress.waiting.store(false, Ordering::Relaxed);
        }
        if ticked {
            housekeeping(&mut log, &mut options, &mut checkpoints);
        }
    }
    if let Err(e) = log.out.file().sync_all() {
        error!(file = %log.path.display(), error = %e, "final sync failed");
    }
    if checkpoints.changed {
        write_checkpoint(&mut log, &options, &mut checkpoints, "stop");
    }
    if let Some(spool) = &options.spool {
        spool.close();
    }
    info!(next_seq = log.next_seq, "log closed");
}

/// When checkpoints were written and whether the log changed since.
struct Checkpoints {
    last: Instant,
    changed: bool,
    /// A failed rotation is tried again only after this.
    retry_rotation: Option<Instant>,
}

/// What the clock asks for: a rotation at a period boundary, a checkpoint every `checkpoint_every`.
fn housekeeping(log: &mut LogFile, options: &mut Options, checkpoints: &mut Checkpoints) {
    if log.rotation_due(options, 0) {
        rotate(log, options, checkpoints);
    } else if checkpoints.changed && checkpoints.last.elapsed() >= options.checkpoint_every {
        write_checkpoint(log, options, checkpoints, "interval");
    }
}

/// Closes the current file, starts the next one and writes a checkpoint that covers the closed file.
fn rotate(log: &mut LogFile, options: &mut Options, checkpoints: &mut Checkpoints) {
    if checkpoints
        .retry_rotation
        .is_some_and(|t| Instant::now() < t)
    {
        return;
    }
    match log.rotate() {
        Ok(closed) => {
            checkpoints.retry_rotation = None;
            info!(closed = %closed, file = %log.path.display(), next_seq = log.next_seq, "log rotated");
            write_checkpoint(log, options, checkpoints, "rotation");
            if let Some(n) = &options.rotated {
                n.notify_one();
            }
        }
        Err(e) => {
            checkpoints.retry_rotation = Some(Instant::now() + TICK);
            error!(file = %log.path.display(), error = %e, "cannot start a new log file; appending to the current one");
        }
    }
}

fn write_checkpoint(
    log: &mut LogFile,
    options: &Options,
    checkpoints: &mut Checkpoints,
    reason: &str,
) {
    let Some(signer) = &options.signer else {
        return;
    };
    checkpoints.last = Instant::now();
    let files = match log.entries() {
        Ok(f) => f,
        Err(e) => {
            error!(dir = %log.dir.display(), error = %e, "cannot list the log files; no checkpoint written");
            return;
        }
    };
    let mut created_at = Vec::new();
    crate::record::write_rfc3339(&mut created_at, clock::now());
    let body = checkpoint::Body {
        checkpoint: 1,
        created_at: String::from_utf8(created_at).expect("ascii"),
        reason: reason.to_owned(),
        seq: log.last_seq_any,
        hash: chain::hex(&log.chain),
        files,
        key: signer.public_hex(),
    };
    // Signing and syncing the checkpoint file happen beside the writer, which goes on committing groups.
    checkpoints.changed = false;
    let reason_is_stop = reason == "stop";
    let (dir, signer, reason) = (log.dir.clone(), signer.clone(), reason.to_owned());
    let spawned = std::thread::Builder::new()
        .name("trail-checkpoint".into())
        .spawn(move || match checkpoint::write(&dir, &signer, &body) {
            Ok(path) => {
                debug!(file = %path.display(), seq = ?body.seq, reason, "checkpoint written")
            }
            Err(e) => error!(dir = %dir.display(), error = %e, "cannot write a checkpoint"),
        });
    match spawned {
        // The last checkpoint, at stop, must be on disk before the daemon exits.
        Ok(thread) if reason_is_stop => {
            let _ = thread.join();
        }
        Ok(_) => {}
        Err(e) => {
            checkpoints.changed = true;
            error!(error = %e, "cannot start writing a checkpoint");
        }
    }
}

/// Writes a group to the log and the spool; on success both are durable (per `sync`) and the spooled records are
/// visible to sinks. On failure nothing of the group remains in either.
fn store(
    log: &mut LogFile,
    persisted: &[u8],
    streamed: &mut spool::Group,
    sync: bool,
    options: &mut Options,
) -> Result<(), Unavailable> {
    let spool = match (&mut options.spool, streamed.is_empty()) {
        (_, true) => None,
        (Some(spool), false) => Some(spool),
        (None, false) => {
            return Err(Unavailable(
                "no spool is configured for streamed events".into(),
            ));
        }
    };
    if let Some(spool) = spool {
        let (stopping, progress) = (options.stopping.clone(), options.progress.clone());
        let waiting = || {
            progress.heartbeat.fetch_add(1, Ordering::Relaxed);
            stopping.load(Ordering::Relaxed)
        };
        spool
            .reserve(streamed.file_len(), &waiting)
            .map_err(|e| Unavailable(format!("{e}; retry later")))?;
        if !persisted.is_empty() {
            log.out.append(persisted, false).map_err(|e| {
                Unavailable(format!("the log cannot be written ({e}); retry later"))
            })?;
        }
        let spool_sync = match spool.append(streamed) {
            Ok(needed) => needed,
            Err(e) => {
                log.out.undo(persisted.len() as u64);
                return Err(Unavailable(format!(
                    "the spool cannot be written ({e}); retry later"
                )));
            }
        };
        if sync {
            // Both files are synced at once: the group waits for the slower of the two, not for their sum. The
            // spool only when it holds something the log does not (see `spool::Writer::append`).
            let spool_synced = spool_sync.then(|| spool.start_sync());
            let log_synced = if persisted.is_empty() {
                Ok(())
            } else {
                log.out.file().sync_data()
            };
            let synced = log_synced.and(spool_synced.map_or(Ok(()), spool::PendingSync::wait));
            if let Err(e) = synced {
                log.out.undo(persisted.len() as u64);
                spool.undo(streamed.file_len());
                return Err(Unavailable(format!(
                    "the log or the spool cannot be synced ({e}); retry later"
                )));
            }
        }
        spool.publish(streamed);
        return Ok(());
    }
    if !persisted.is_empty() {
        log.out
            .append(persisted, sync)
            .map_err(|e| Unavailable(format!("the log cannot be written ({e}); retry later")))?;
    }
    Ok(())
}

/// The file being appended to, and the chain's head.
struct LogFile {
    dir: PathBuf,
    path: PathBuf,
    /// The file, and how many of its bytes are complete records.
    out: AppendFile,
    next_seq: u64,
    /// UTC start of the file (from its name), seconds.
    start: i64,
    /// First `seq` of the file (from its name).
    first_seq: u64,
    /// The hash of the last record in the log (any file), or the genesis value.
    chain: chain::Hash,
    /// The last record's `seq` in this file.
    last_seq: Option<u64>,
    /// The last record's `seq` in the whole log.
    last_seq_any: Option<u64>,
    /// Checkpoint entries of closed files, by name (they do not change once closed).
    closed: HashMap<String, checkpoint::FileEntry>,
}

impl LogFile {
    fn open(dir: &Path) -> Result<LogFile, Error> {
        crate::modes::create_dir_all(dir).map_err(io_error(dir))?;
        let files = files::list(dir).map_err(io_error(dir))?;
        let Some(newest) = files.last().filter(|f| !f.compressed) else {
            let (chain, last) = chain_head(dir, &files, u64::MAX);
            let next = last
                .map_or(1, |s| s + 1)
                .max(files.last().map_or(1, |f| f.first_seq));
            let mut log = LogFile::create(dir, next, chain)?;
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
        Ok(LogFile {
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
        })
    }

    fn create(dir: &Path, first_seq: u64, chain: chain::Hash) -> Result<LogFile, Error> {
        let now = clock::now();
        let path = dir.join(file_name(now, first_seq));
        let file = crate::modes::open(
            &path,
            OpenOptions::new().append(true).create_new(true),
            crate::modes::FILE,
        )
        .map_err(io_error(&path))?;
        sync_dir(dir)?;
        Ok(LogFile {
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
        })
    }

    /// Whether the file should be closed before `bytes` more are appended: the clock passed a period boundary,
    /// or the file would grow past `max_file_bytes`.
    fn rotation_due(&self, options: &Options, bytes: u64) -> bool {
        let by_time = options.rotate.period_secs().is_some_and(|p| {
            clock::unix_secs(clock::now()).div_euclid(p) != self.start.div_euclid(p)
        });
        by_time || (!self.out.is_empty() && self.out.len() + bytes > options.max_file_bytes)
    }

    /// Closes this file and continues in a new one; returns the closed file's name.
    fn rotate(&mut self) -> Result<String, Error> {
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
        let mut next = LogFile::create(&self.dir, self.next_seq, self.chain)?;
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
    fn entries(&mut self) -> std::io::Result<Vec<checkpoint::FileEntry>> {
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
    fn point_current(&self) {
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
