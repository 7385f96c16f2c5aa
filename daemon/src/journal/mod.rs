//! The durable JSON-lines log and its single writer (group commit).
//!
//! Owns writing the log directory: the writer thread that assigns `seq`, appends records and syncs them (file
//! names, recovery of a torn tail and the chain are [`crate::log`]'s). Nothing else writes to the log. A
//! submission is acknowledged only after its records are written and, with `fsync: always`, after `fdatasync`
//! returned.
//!
//! Files are named `trail-<UTC start, YYYYMMDDTHHMMSSZ>-<first seq, 20 digits>.jsonl`, so they sort by time and
//! by `seq`; the newest one is appended to and the symlink `current` names it. The writer also seals every
//! persisted record into the hash chain ([`crate::log::chain`]: it is the only place that knows the order),
//! starts a new file at period boundaries of the daemon's clock and before a file would pass `max_file_bytes`,
//! and writes signed checkpoints ([`crate::log::checkpoint`]) at each rotation, every `checkpoint_every`
//! while records arrive, and at stop. A failed write or sync changes neither the file nor the chain.
//!
//! One job per file: `submit` (the submission API: batches, routes, answers), `writer` (the group-commit loop on
//! the writer thread), `group` (sealing a group: numbering, chaining and measuring it for the spool), `commit`
//! (writing a group to the log and the spool, syncing both), `active` (the file being appended to, rotation),
//! `schedule` (when to rotate and to write checkpoints).

mod active;
mod commit;
mod group;
mod schedule;
mod submit;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tracing::{error, info};

use crate::config::{FsyncPolicy, Rotate};
use crate::histogram::Histogram;
use crate::log::chain;
use crate::log::checkpoint::Signer;
use crate::log::recovery::{Error, io_error};

pub use submit::{Ack, Batch, Route, Submitter, Unavailable};

/// The writer's settings that a reload may change ([`Submitter::change`]); the writer applies them between two
/// groups, so a group is written under one set.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// When a new file is started.
    pub rotate: Rotate,
    /// Size at which a file is closed.
    pub max_file_bytes: u64,
    /// How often a checkpoint is written while records arrive.
    pub checkpoint_every: Duration,
}

use active::ActiveFile;
use submit::Message;

/// How much the writer gathers into one write and one sync.
const GROUP_BYTES: usize = 8 << 20;
/// Submissions that may wait for the writer; beyond that, connections stop reading (back-pressure).
const QUEUE_DEPTH: usize = 512;

/// The running writer. Dropping every [`Submitter`] lets it drain, sync and stop; [`Journal::join`] waits for that.
pub struct Journal {
    thread: JoinHandle<()>,
}

/// The writer's progress, for the service watchdog and status line (see `systemd::watchdog`): the writer is
/// healthy while `heartbeat` advances or nothing waits for it. Also what metrics and `trail status` read of the
/// writer: its histograms (recorded once per group, never per record) and the last checkpoint.
#[derive(Debug)]
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
    /// Records per group committed (a group committed in parts counts each part).
    pub group_records: Histogram,
    /// How long each group's sync took (`fdatasync` of the log, and of the spool beside it), nanoseconds; only
    /// with `fsync: always`. The write before it is not included.
    pub fsync: Histogram,
    /// The newest checkpoint written (or, until one is, the last one found at start).
    pub checkpoint: Mutex<Option<LastCheckpoint>>,
}

impl Default for Progress {
    fn default() -> Progress {
        Progress {
            heartbeat: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            records: AtomicU64::new(0),
            group_records: Histogram::new(crate::histogram::GROUP_EVENTS, 1.0),
            fsync: Histogram::latency(),
            checkpoint: Mutex::new(None),
        }
    }
}

impl Progress {
    /// The newest checkpoint known.
    pub fn last_checkpoint(&self) -> Option<LastCheckpoint> {
        self.checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Remembers `checkpoint` as the newest one.
    pub fn set_checkpoint(&self, checkpoint: LastCheckpoint) {
        *self.checkpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(checkpoint);
    }
}

/// A checkpoint, as `trail status` and the metrics show the newest one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastCheckpoint {
    /// Its file name in `checkpoints/`.
    pub file: String,
    /// When it was written (its `created_at`, RFC 3339, the daemon's clock).
    pub at: String,
    /// The same time in Unix seconds.
    pub unix_secs: i64,
    /// The `seq` of the last record it covers.
    pub seq: Option<u64>,
    /// Why it was written: `rotation`, `interval` or `stop`.
    pub reason: String,
}

impl LastCheckpoint {
    /// A checkpoint read back from its line (the last one found at start); `None` if the line does not parse.
    pub fn from_line(file: &str, line: &[u8]) -> Option<LastCheckpoint> {
        let body = crate::log::checkpoint::Checkpoint::parse(line).ok()?.body;
        Some(LastCheckpoint {
            file: file.to_owned(),
            unix_secs: rfc3339_secs(&body.created_at)?,
            at: body.created_at,
            seq: body.seq,
            reason: body.reason,
        })
    }
}

/// Unix seconds of an RFC 3339 time.
pub(crate) fn rfc3339_secs(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp())
}

/// Told of a checkpoint written: its path, its line and its C2SP note.
pub type Checkpointed = Arc<dyn Fn(&Path, &[u8], Option<&[u8]>) + Send + Sync>;

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
    /// Told of every checkpoint written but the one at stop (its path and line), to stream it to sinks.
    pub checkpointed: Option<Checkpointed>,
    /// Advanced as the writer makes progress.
    pub progress: Arc<Progress>,
    /// The Merkle tree's cache, brought up to date by each checkpoint (none: checkpoints without the tree).
    pub tree: Option<Arc<crate::log::tree::Keeper>>,
}

impl Journal {
    /// Opens (and if needed recovers) the log in `dir` and starts the writer thread.
    pub fn start(dir: &Path, options: Options) -> Result<(Journal, Submitter), Error> {
        let mut file = ActiveFile::open(dir)?;
        // The newest records may be stream-only (in the spool, not the log): `seq` continues after them too.
        if let Some(spooled) = options.spool.as_ref().and_then(|s| s.last_seq()) {
            file.next_seq = file.next_seq.max(spooled + 1);
        }
        info!(file = %file.path.display(), next_seq = file.next_seq, chain = %chain::hex(&file.chain), "log open");
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
        let spares = Arc::new(submit::Spares::default());
        let kept = spares.clone();
        let thread = std::thread::Builder::new()
            .name("trail-journal".into())
            .spawn(move || writer::run(file, rx, options, &kept))
            .map_err(io_error(dir))?;
        Ok((Journal { thread }, Submitter::new(tx, progress, spares)))
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

/// Puts the calling thread at the lowest CPU priority (nice 19): for work beside the writer (checkpoints and the
/// Merkle tree, indexing and compressing closed files) that must never delay acknowledgements on a busy machine.
pub(crate) fn lowest_priority() {
    // SAFETY: plain system calls on this thread's own id; a failure only leaves the priority as it was.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}
