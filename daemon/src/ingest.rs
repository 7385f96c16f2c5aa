//! The submission socket: accepting connections, framing, checking and stamping events, answering in order.
//!
//! Owns the socket file and every client connection. Each connection has a reader task (read, frame, check,
//! stamp, submit to the journal) and a responder task (wait for the journal, answer every request line in
//! order). The two are joined by a bounded queue and the journal's queue is bounded too, so a slow disk or a
//! client that does not read its answers stops the reading, never grows memory. Across connections, the number of
//! connections and the bytes of unfinished lines they hold are bounded too ([`Connections`]).

use std::collections::HashSet;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::access::{self, Access, Credentials};
use crate::config::{Limits, SMALL_LINE_BYTES};
use crate::event_types::{EventType, Registry};

use crate::framing::{Frame, Framer};
use crate::histogram::Histogram;
use crate::idempotency::{self, Claim, EventDigest, Window};
use crate::journal::{Ack, Batch, Route, Submitter, Unavailable};
use crate::protocol::{self, ErrorCode, Rejection};
use crate::record::{self, Source};
use crate::trust::{self, Owners};

/// Most bytes read from a connection at a time; one read becomes at most one journal submission.
const READ_BYTES: usize = 64 << 10;
/// Chunks of one connection waiting for the journal before the connection stops reading.
const PENDING_DEPTH: usize = 32;
/// How long an accept loop pauses after a failed accept (out of descriptors, most likely): the waiting client
/// stays in the socket's backlog, and accepting again at once would fail again at once.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Repeated warnings (failed accepts, refused connections) are logged at most once per this interval, with the
/// number left out since the last one.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(10);

/// What an event is checked against: one generation of the configuration (see `reload`). A reload builds a
/// new one completely and swaps it in ([`Context::swap_rules`]); every request line is checked against the one
/// generation its read took ([`Context::rules`]), never against a mix.
#[derive(Debug)]
pub struct Rules {
    /// The configuration generation these rules belong to (1 at start).
    pub generation: u64,
    /// Event types.
    pub registry: Arc<Registry>,
    /// Event types at least one sink receives.
    pub streamed_types: HashSet<String>,
    /// Longest accepted request line (for every read that takes these rules, on any connection).
    pub max_line_bytes: usize,
    /// Who may submit which types, and how fast ([`access::Policy::build`]).
    pub access: access::Policy,
    /// Told when the last holder lets these rules go (a reload's settle waits for it).
    pub retired: Arc<Retired>,
}

impl Drop for Rules {
    fn drop(&mut self) {
        self.retired.set();
    }
}

/// Whether a generation of [`Rules`] is still held: by a read being checked, or by a chunk on its way to the
/// journal. A connection lets its chunk's rules go once the chunk's records are queued for the writer
/// ([`Submitter::submit`] returned), so once a replaced generation is retired, every record checked under it is in
/// the writer's queue or written.
#[derive(Debug, Default)]
pub struct Retired {
    gone: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
}

impl Retired {
    fn set(&self) {
        *self.gone.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.changed.notify_all();
    }

    /// Waits until the rules are let go by everyone; false when `timeout` passed first. Blocks: call it from a
    /// blocking thread.
    pub fn wait(&self, timeout: Duration) -> bool {
        let gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        let (gone, _) = self
            .changed
            .wait_timeout_while(gone, timeout, |gone| !*gone)
            .unwrap_or_else(|e| e.into_inner());
        *gone
    }
}

/// What every connection shares.
pub struct Context {
    /// The generation in force: read once per read of a connection, replaced whole by a reload.
    pub rules: std::sync::RwLock<Arc<Rules>>,
    /// The journal's input.
    pub submitter: Submitter,
    /// `source.host`.
    pub host: String,
    /// The limits across connections and their counters.
    pub connections: Arc<Connections>,
    /// Idempotency keys of recent submissions.
    pub idempotency: Arc<Window>,
    /// What access control keeps across generations: rate buckets, refusal counters, refusals to record.
    pub access: Arc<Access>,
}

impl Context {
    /// The rules in force now.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `rules` in force: reads that start after this check against them; a read already being checked
    /// finishes under the rules it took. Returns the rules replaced.
    pub fn swap_rules(&self, rules: Arc<Rules>) -> Arc<Rules> {
        std::mem::replace(
            &mut *self.rules.write().unwrap_or_else(|e| e.into_inner()),
            rules,
        )
    }
}

/// The bounds across connections (`limits:`) and what they counted, shown by `trail status`.
///
/// Every connection may hold up to [`SMALL_LINE_BYTES`] of an unfinished line. A longer one needs a line slot,
/// which lets it grow to `max_line_bytes`; there are [`Limits::line_slots`] of them, so that all unfinished lines
/// together stay within `max_buffered_bytes`. A connection that needs a slot while none is free stops being read
/// (its client waits) until one is; the slot goes back as soon as its line is complete. A slot holder never waits
/// for more memory, so some line always progresses; one that stops sending is closed after `idle_timeout`.
///
/// A reload changes the bounds ([`Connections::set_limits`]): connection permits and line slots are [`Pool`]s, so
/// raising a bound lets more in at once and lowering it takes effect as permits come back; no open connection is
/// closed and no buffered line dropped for it. Open connections take the new `idle_timeout` at once (a waiting
/// one measures its idle time so far against it) and the new `max_line_bytes` at their next read.
pub struct Connections {
    permits: Arc<Pool>,
    /// Milliseconds; read at every idle wait, changed by a reload.
    idle_timeout_ms: AtomicU64,
    /// Wakes connections waiting idle, so that they measure against a changed `idle_timeout`.
    changed: tokio::sync::Notify,
    slots: Arc<Pool>,
    refused: AtomicU64,
    idle_closed: AtomicU64,
    buffered: AtomicUsize,
    waiting: AtomicUsize,
    /// From the read that completed a request line to its `ok` answer written, per event stored.
    ack_latency: Histogram,
}

/// Permits whose number a reload may change. Raising it adds permits at once; lowering it takes away the free
/// ones at once and the others as they are given back ([`Permit`]'s drop), so nothing held is ever taken away.
pub struct Pool {
    semaphore: Arc<Semaphore>,
    size: std::sync::Mutex<PoolSize>,
}

/// Invariant: permits free in the semaphore + permits held = `target` + `owed`.
#[derive(Debug)]
struct PoolSize {
    /// The number of permits configured.
    target: usize,
    /// Permits held beyond `target`, kept by the pool when they are given back.
    owed: usize,
}

/// A held permit of a [`Pool`].
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<Pool>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut size = self.pool.lock();
        if size.owed > 0
            && let Some(permit) = self.permit.take()
        {
            size.owed -= 1;
            permit.forget();
        }
    }
}

impl Pool {
    /// A pool of `n` permits.
    pub fn new(n: usize) -> Arc<Pool> {
        Arc::new(Pool {
            semaphore: Arc::new(Semaphore::new(n)),
            size: std::sync::Mutex::new(PoolSize { target: n, owed: 0 }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolSize> {
        self.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A permit if one is free now.
    pub fn try_acquire(self: &Arc<Pool>) -> Option<Permit> {
        let permit = self.semaphore.clone().try_acquire_owned().ok()?;
        Some(Permit {
            permit: Some(permit),
            pool: self.clone(),
        })
    }

    /// Waits for a permit (first come, first served).
    pub async fn acquire(self: &Arc<Pool>) -> Option<Permit> {
        let permit = self.semaphore.clone().acquire_owned().await.ok()?;
        Some(Permit {
            permit: Some(permit),
            pool: self.clone(),
        })
    }

    /// Makes the pool `n` permits (see [`Pool`]).
    pub fn resize(&self, n: usize) {
        let mut size = self.lock();
        if n >= size.target {
            let more = n - size.target;
            let repaid = more.min(size.owed);
            size.owed -= repaid;
            self.semaphore.add_permits(more - repaid);
        } else {
            size.owed += size.target - n;
            let taken = self.semaphore.forget_permits(size.owed);
            size.owed -= taken;
        }
        size.target = n;
    }

    /// (permits configured, permits held now).
    pub fn counts(&self) -> (usize, usize) {
        let size = self.lock();
        let held = (size.target + size.owed).saturating_sub(self.semaphore.available_permits());
        (size.target, held)
    }
}

/// The `connections` object of `trail status`: the bounds and what they counted (see README.md).
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsReport {
    /// Connections open now.
    pub open: usize,
    /// `limits.max_connections`.
    pub max: usize,
    /// Clients turned away by `max_connections` since start.
    pub refused: u64,
    /// Connections closed for being idle since start.
    pub idle_closed: u64,
    /// Bytes of unfinished lines now.
    pub buffered_bytes: usize,
    /// Line slots in use.
    pub long_lines: usize,
    /// Line slots in all.
    pub long_line_slots: usize,
    /// Connections not being read until a slot is free.
    pub waiting_for_buffer: usize,
}

impl Connections {
    /// Bounds as configured.
    pub fn new(limits: &Limits) -> Connections {
        Connections {
            permits: Pool::new(limits.max_connections),
            idle_timeout_ms: AtomicU64::new(limits.idle_timeout.as_millis() as u64),
            changed: tokio::sync::Notify::new(),
            slots: Pool::new(limits.line_slots().max(1)),
            refused: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            buffered: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            ack_latency: Histogram::latency(),
        }
    }

    /// Acknowledgement latency: from the read that completed a request line to the write of its `ok` answer
    /// (after its group was durable), in nanoseconds, one count per event stored.
    pub fn ack_latency(&self) -> &Histogram {
        &self.ack_latency
    }

    /// `limits.idle_timeout` now.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.load(Ordering::Relaxed))
    }

    /// Puts a reload's limits in force: `idle_timeout` for every idle wait from now on (waiting connections are
    /// woken to measure against it), and the number of connections and of line slots (see [`Pool::resize`]).
    pub fn set_limits(&self, limits: &Limits) {
        self.idle_timeout_ms
            .store(limits.idle_timeout.as_millis() as u64, Ordering::Relaxed);
        self.permits.resize(limits.max_connections);
        self.slots.resize(limits.line_slots().max(1));
        self.changed.notify_waiters();
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.permits.counts().1
    }

    /// `limits.max_connections` in force.
    pub fn max(&self) -> usize {
        self.permits.counts().0
    }

    /// The `connections` object of `trail status`.
    pub fn status(&self) -> ConnectionsReport {
        let (max, open) = self.permits.counts();
        let (slots, long_lines) = self.slots.counts();
        ConnectionsReport {
            open,
            max,
            refused: self.refused.load(Ordering::Relaxed),
            idle_closed: self.idle_closed.load(Ordering::Relaxed),
            buffered_bytes: self.buffered.load(Ordering::Relaxed),
            long_lines,
            long_line_slots: slots,
            waiting_for_buffer: self.waiting.load(Ordering::Relaxed),
        }
    }
}

/// A warning that may repeat without bound, logged at most once per [`WARN_EVERY`].
pub(crate) struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub(crate) fn new() -> Throttle {
        Throttle {
            last: None,
            suppressed: 0,
        }
    }

    /// Counts one occurrence; `Some(occurrences left out since the last logged one)` when this one is to be logged.
    pub(crate) fn hit(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < WARN_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// After a failed accept on `socket` ("submission", "admin"): warns (at a bounded rate) and pauses, so that a
/// lasting failure such as running out of file descriptors neither spins nor floods the log. Connections already
/// open keep being served meanwhile; waiting clients are accepted once descriptors are free again.
pub(crate) async fn accept_failed(throttle: &mut Throttle, socket: &str, error: &std::io::Error) {
    if let Some(suppressed) = throttle.hit() {
        warn!(
            socket,
            error = %error,
            suppressed,
            "accept failed; new clients wait in the socket's backlog (out of file descriptors? raise LimitNOFILE \
             or lower limits.max_connections)"
        );
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// The socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process answers on the socket.
    #[error(
        "socket {0} is in use by another running daemon; stop it or choose another socket.path"
    )]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("socket {0} exists and is not a socket; remove it or choose another socket.path")]
    NotASocket(PathBuf),
    /// The socket's directory, or one above it, could be written by someone else, or a link is in the way.
    #[error("socket {path}: {source}")]
    Untrusted {
        /// The socket path.
        path: PathBuf,
        /// What is wrong.
        source: trust::Untrusted,
    },
    /// A socket passed by the service manager is not the one the configuration names, or cannot be trusted.
    #[error("socket {path}, passed by the service manager: {problem}")]
    Inherited {
        /// The configured socket path.
        path: PathBuf,
        /// What is wrong, and what to change.
        problem: String,
    },
    /// The operating system refused.
    #[error("socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Binds the socket at `path` with permission bits `mode` and group `group` (`None`: the daemon's own),
/// replacing a stale socket file left by a crash.
///
/// Refuses a directory that anyone but root or the daemon's own user could write, or one below such a directory
/// (see [`crate::trust`]): they could replace the socket with their own and take the clients' events. Missing
/// directories are created with mode 0755. A symbolic link at `path` is refused, never followed.
pub fn bind(path: &Path, mode: u32, group: Option<u32>) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.to_owned(),
        source,
    };
    let untrusted = |source| BindError::Untrusted {
        path: path.to_owned(),
        source,
    };
    let Some(name) = path.file_name() else {
        return Err(BindError::NotASocket(path.to_owned()));
    };
    let parent = path.parent().unwrap_or(Path::new("."));
    if !parent.as_os_str().is_empty() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io)?;
    }
    // Bound through the checked, canonical directory: no link on the way can be changed afterwards.
    let path = &trust::check_dir(parent, &Owners::me())
        .map_err(untrusted)?
        .join(name);
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_symlink() {
            return Err(untrusted(trust::Untrusted::Symlink(path.to_owned())));
        }
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_owned()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io)?;
    if group.is_some() {
        std::os::unix::fs::chown(path, None, group).map_err(io)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    UnixListener::from_std(listener).map_err(io)
}

/// Takes `listener`, a socket passed by the service manager (socket activation), in place of binding `path`.
///
/// The service manager bound it, so the checks are those [`bind`] makes, done on what it made: a listening Unix
/// stream socket whose address is `path` (a socket unit and the configuration must name the same file); the
/// directories above it trusted as for binding ([`crate::trust::check_dir`]); at `path` a socket, not a link,
/// owned by root or the daemon's user, with no write permission (which connecting takes) beyond `mode` (the
/// socket unit's `SocketMode=` must not let more users connect than the configuration does), and, when it lets
/// its group connect, in the configured `group` (`SocketGroup=`). The file is never removed: the socket unit owns
/// it, and clients that connect while the daemon restarts wait in its backlog.
pub fn adopt(
    listener: std::os::unix::net::UnixListener,
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> Result<UnixListener, BindError> {
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    use std::os::unix::fs::MetadataExt;
    let problem = |problem: String| BindError::Inherited {
        path: path.to_owned(),
        problem,
    };
    let io = |source| BindError::Io {
        path: path.to_owned(),
        source,
    };
    let kind = getsockopt(&listener, sockopt::SockType).map_err(|e| io(e.into()))?;
    let listening = getsockopt(&listener, sockopt::AcceptConn).map_err(|e| io(e.into()))?;
    if kind != SockType::Stream || !listening {
        return Err(problem(format!(
            "it is not a listening stream socket ({kind:?}); use ListenStream= in the socket unit"
        )));
    }
    let address = listener.local_addr().map_err(io)?;
    let Some(bound) = address.as_pathname() else {
        return Err(problem(
            "it has no file name (an abstract or unnamed socket); ListenStream= must name the configured path"
                .into(),
        ));
    };
    let (Some(name), Some(bound_name)) = (path.file_name(), bound.file_name()) else {
        return Err(BindError::NotASocket(path.to_owned()));
    };
    let untrusted = |source| BindError::Untrusted {
        path: path.to_owned(),
        source,
    };
    let dir = trust::check_dir(path.parent().unwrap_or(Path::new(".")), &Owners::me())
        .map_err(untrusted)?;
    let bound_dir = std::fs::canonicalize(bound.parent().unwrap_or(Path::new("."))).map_err(io)?;
    if dir != bound_dir || name != bound_name {
        return Err(problem(format!(
            "it is bound to {}; make the socket unit's ListenStream= and the configuration name the same path",
            bound.display()
        )));
    }
    let file = dir.join(name);
    let meta = std::fs::symlink_metadata(&file).map_err(io)?;
    if meta.file_type().is_symlink() {
        return Err(untrusted(trust::Untrusted::Symlink(file)));
    }
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket(file));
    }
    let me = Owners::me();
    if !me.contains(meta.uid()) {
        return Err(problem(format!(
            "the file belongs to {}, not to {me}; set SocketUser= in the socket unit",
            trust::user(meta.uid())
        )));
    }
    // Connecting takes write permission; the other bits mean nothing on a socket.
    let file_mode = meta.mode() & 0o7777;
    if file_mode & 0o222 & !mode != 0 {
        return Err(problem(format!(
            "its file has mode {file_mode:04o}, which lets more users connect than the configured {mode:04o}; set \
             SocketMode= in the socket unit to {mode:04o}"
        )));
    }
    if let Some(gid) = group
        && file_mode & 0o020 != 0
        && meta.gid() != gid
    {
        return Err(problem(format!(
            "its file belongs to group {}, whose members may connect, not to the configured socket.group {}; set \
             SocketGroup= in the socket unit to {}",
            group_name(meta.gid()),
            group_name(gid),
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                .ok()
                .flatten()
                .map_or_else(|| gid.to_string(), |g| g.name)
        )));
    }
    listener.set_nonblocking(true).map_err(io)?;
    UnixListener::from_std(listener).map_err(io)
}

/// `gid 998 (trail)`, or `gid 998` when it has no name.
fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(g)) => format!("gid {gid} ({})", g.name),
        _ => format!("gid {gid}"),
    }
}

/// Accepts connections until `stop` is cancelled, then lets every connection answer what it has read.
/// Connections still busy after `grace` are abandoned (their events may be stored but not acknowledged).
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<Context>,
    stop: CancellationToken,
    grace: std::time::Duration,
) {
    let mut connections = JoinSet::new();
    let (mut accept_errors, mut refusals) = (Throttle::new(), Throttle::new());
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match ctx.connections.permits.try_acquire() {
                    Some(permit) => {
                        connections.spawn(connection(stream, ctx.clone(), stop.clone(), permit));
                    }
                    None => {
                        refuse(stream, &ctx);
                        if let Some(suppressed) = refusals.hit() {
                            warn!(
                                open = ctx.connections.open(),
                                max = ctx.connections.max(),
                                refused = ctx.connections.refused.load(Ordering::Relaxed),
                                suppressed,
                                "too many connections: refused a client (limits.max_connections)"
                            );
                        }
                    }
                },
                Err(e) => accept_failed(&mut accept_errors, "submission", &e).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let open = connections.len();
    info!(
        connections = open,
        "stopped accepting; answering what was read"
    );
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = connections.len(),
            ?grace,
            "shutdown grace period over; closing connections that are still busy"
        );
        connections.shutdown().await;
    }
}

/// Answers a client beyond `limits.max_connections` with one error line and closes its connection. The line is
/// written with one non-blocking `write(2)`, never waited for: a fresh connection's send buffer has room for it.
fn refuse(stream: UnixStream, ctx: &Context) {
    use std::io::Write;
    let connections = &ctx.connections;
    connections.refused.fetch_add(1, Ordering::Relaxed);
    ctx.access
        .refusals
        .count(ErrorCode::TooManyConnections, None);
    let mut line = Vec::new();
    Rejection::new(
        ErrorCode::TooManyConnections,
        format!(
            "the daemon has {} connections open, its limit (limits.max_connections); this connection is closed, \
             try again later",
            connections.max()
        ),
    )
    .encode(&mut line);
    // Straight to the socket: tokio's own try_write would wait for a readiness event the new socket has not had yet.
    if let Ok(mut stream) = stream.into_std() {
        let _ = stream.write(&line);
    }
}

/// What one read produced: an answer slot per request line, and the records to store.
///
/// A line whose idempotency key is in flight (another submission with it is on its way to the log) cannot be
/// decided yet: it and every line after it in the read are kept in `deferred`, and checked again once that
/// submission is settled, so that the connection's lines are still stored and answered in order.
struct Chunk {
    /// The generation every line of the chunk is checked against; let go once its records are queued.
    rules: Arc<Rules>,
    /// The longest line of this read (the generation's `max_line_bytes`), for the framer and `too_large`.
    max_line_bytes: usize,
    /// When its bytes were read (the start of its answers' latency).
    read_at: Instant,
    slots: Vec<Slot>,
    batch: Batch,
    claims: Claims,
    deferred: Option<Deferred>,
}

impl Chunk {
    fn new(ctx: &Context) -> Chunk {
        let rules = ctx.rules();
        Chunk {
            max_line_bytes: rules.max_line_bytes,
            rules,
            read_at: Instant::now(),
            slots: Vec::new(),
            batch: ctx.submitter.batch(),
            claims: Claims {
                window: ctx.idempotency.clone(),
                list: Vec::new(),
            },
            deferred: None,
        }
    }
}

enum Slot {
    Accepted {
        id: [u8; 36],
    },
    /// A repeat of a stored submission (same key, same event): answered with the first one's id and seq.
    Duplicate {
        id: [u8; 36],
        seq: u64,
    },
    Rejected(Rejection),
}

/// Lines that wait for the submission that holds `key` in flight; `None` stands for a too-long line.
struct Deferred {
    key: idempotency::Key,
    frames: Vec<Option<Vec<u8>>>,
    /// The line limit they were framed under.
    max_line_bytes: usize,
}

/// The keys a batch holds in flight, with each record's index in the batch and its id. Keys not settled when
/// this is dropped (the batch was not stored, or never reached the journal) are freed.
struct Claims {
    window: Arc<Window>,
    list: Vec<(usize, idempotency::Key, uuid::Uuid)>,
}

impl Drop for Claims {
    fn drop(&mut self) {
        for (_, key, _) in self.list.drain(..) {
            self.window.failed(key);
        }
    }
}

/// Who sent a connection's lines: the `source` fragment of their records and the uid their keys belong to
/// (`None` for the daemon's own events, which have no keys).
struct Peer {
    fragment: Vec<u8>,
    uid: Option<u32>,
    /// The client's credentials (`None` for the daemon's own events, which access control does not look at).
    credentials: Option<Credentials>,
    /// The rate bucket of the client's uid, fetched at its first event while a rate is configured.
    bucket: OnceLock<Arc<access::Bucket>>,
}

/// A chunk whose records are on their way to the journal.
struct Pending {
    slots: Vec<Slot>,
    ack: Option<Ack>,
    /// When the chunk was read.
    read_at: Instant,
}

async fn connection(
    stream: UnixStream,
    ctx: Arc<Context>,
    stop: CancellationToken,
    _permit: Permit,
) {
    let source = match stream.peer_cred() {
        Ok(cred) => Source {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            host: ctx.host.clone(),
            daemon: false,
        },
        Err(e) => {
            // Without credentials events could not be attributed: refuse the connection rather than guess.
            warn!(error = %e, "cannot read peer credentials; closing connection");
            return;
        }
    };
    debug!(uid = source.uid, pid = ?source.pid, "connection opened");
    let peer = Peer {
        fragment: source.fragment(),
        uid: Some(source.uid),
        credentials: Some(Credentials {
            uid: source.uid,
            gid: source.gid,
            pid: source.pid,
        }),
        bucket: OnceLock::new(),
    };
    let limits = &ctx.connections;
    let (reader, writer) = stream.into_split();
    let (pending_tx, pending_rx) = mpsc::channel(PENDING_DEPTH);
    let responder = tokio::spawn(respond(
        writer,
        pending_rx,
        ctx.connections.clone(),
        (ctx.access.clone(), source.uid),
    ));
    // Its limit is the generation's, set again at every read.
    let mut framer = Framer::new(ctx.rules().max_line_bytes);
    let mut buffered = Buffered::new(limits);
    let mut slot: Option<Permit> = None;
    let mut eof = false;
    // The connection's own token: checked before every read, it must not be a lock every connection shares.
    let stop = stop.child_token();
    // Whether the last read found nothing: only then is readiness waited for. A busy connection reads again at
    // once (the runtime's budget keeps it fair), checking only that the daemon is not stopping.
    let mut drained = false;
    loop {
        if stop.is_cancelled() {
            break;
        }
        if !drained {
            // A read that always finds data (even blank lines, which send nothing) must still give way.
            tokio::task::consume_budget().await;
        } else if !readable(&reader, &stop, limits, &source).await {
            break;
        }
        // How much this read may take: without a line slot, the unfinished line must stay within its small share.
        let held = framer.buffered();
        if slot.is_none() {
            slot = limits.slots.try_acquire();
            if slot.is_none() && held >= SMALL_LINE_BYTES {
                limits.waiting.fetch_add(1, Ordering::Relaxed);
                let got = tokio::select! {
                    biased;
                    _ = stop.cancelled() => None,
                    got = limits.slots.acquire() => got,
                };
                limits.waiting.fetch_sub(1, Ordering::Relaxed);
                match got {
                    Some(s) => slot = Some(s),
                    None => break,
                }
            }
        }
        let room = if slot.is_some() {
            READ_BYTES
        } else {
            SMALL_LINE_BYTES - held
        };
        let mut buf = Vec::with_capacity(room);
        let n = match reader.try_read_buf(&mut buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                drained = false;
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                drained = true;
                continue;
            }
            Err(e) => {
                debug!(error = %e, "read failed");
                break;
            }
        };
        let mut chunk = Chunk::new(&ctx);
        framer.set_max(chunk.max_line_bytes);
        framer.push(&buf[..n], |frame| handle(frame, &ctx, &peer, &mut chunk));
        drop(buf);
        if framer.buffered() <= SMALL_LINE_BYTES {
            // The long line is complete (or skipped): its slot and its memory go back.
            slot = None;
            framer.shrink_to(SMALL_LINE_BYTES);
        }
        buffered.set(framer.buffered());
        if !send(&ctx, &peer, chunk, &pending_tx).await {
            break;
        }
    }
    if eof {
        let mut chunk = Chunk::new(&ctx);
        framer.set_max(chunk.max_line_bytes);
        framer.finish(|frame| handle(frame, &ctx, &peer, &mut chunk));
        send(&ctx, &peer, chunk, &pending_tx).await;
    }
    drop(buffered);
    drop(slot);
    drop(framer);
    drop(pending_tx);
    let _ = responder.await;
    debug!(uid = source.uid, pid = ?source.pid, "connection closed");
}

/// Waits until `reader` can be read; false when the daemon stops, readiness fails, or the connection stays idle
/// for longer than the `idle_timeout` in force (a reload wakes the wait to measure against its own).
async fn readable(
    reader: &OwnedReadHalf,
    stop: &CancellationToken,
    limits: &Connections,
    source: &Source,
) -> bool {
    let idle_since = tokio::time::Instant::now();
    loop {
        let changed = limits.changed.notified();
        let idle_timeout = limits.idle_timeout();
        tokio::select! {
            biased;
            _ = stop.cancelled() => return false,
            ready = reader.readable() => {
                if let Err(e) = &ready {
                    debug!(error = %e, "read failed");
                }
                return ready.is_ok();
            }
            _ = tokio::time::sleep_until(idle_since + idle_timeout) => {
                limits.idle_closed.fetch_add(1, Ordering::Relaxed);
                debug!(uid = source.uid, pid = ?source.pid, timeout = ?idle_timeout, "connection idle; closing it");
                return false;
            }
            _ = changed => {}
        }
    }
}

/// A connection's share of [`Connections::buffered`], given back when it is dropped.
struct Buffered<'a> {
    total: &'a AtomicUsize,
    mine: usize,
}

impl<'a> Buffered<'a> {
    fn new(connections: &'a Connections) -> Buffered<'a> {
        Buffered {
            total: &connections.buffered,
            mine: 0,
        }
    }

    fn set(&mut self, now: usize) {
        if now > self.mine {
            self.total.fetch_add(now - self.mine, Ordering::Relaxed);
        } else {
            self.total.fetch_sub(self.mine - now, Ordering::Relaxed);
        }
        self.mine = now;
    }
}

impl Drop for Buffered<'_> {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// Hands a chunk to the journal and its answers to the responder; false when the client is gone. Deferred lines
/// are checked again once the submission they wait for is settled, and sent the same way.
async fn send(ctx: &Context, peer: &Peer, chunk: Chunk, pending: &mpsc::Sender<Pending>) -> bool {
    let mut chunk = chunk;
    loop {
        let Chunk {
            rules,
            read_at,
            slots,
            batch,
            mut claims,
            deferred,
            ..
        } = chunk;
        if !slots.is_empty() {
            let ack = if batch.is_empty() {
                None
            } else {
                let ack = ctx.submitter.submit(batch).await;
                Some(settle(std::mem::take(&mut claims.list), ctx, ack))
            };
            // Queued for the writer: the generation they were checked under is let go (see `Retired`), before
            // waiting for the responder, which waits for a client that may not read.
            drop(rules);
            if pending
                .send(Pending {
                    slots,
                    ack,
                    read_at,
                })
                .await
                .is_err()
            {
                return false;
            }
        } else {
            drop(rules);
        }
        drop(claims);
        let Some(deferred) = deferred else {
            return true;
        };
        ctx.idempotency.wait(deferred.key).await;
        chunk = Chunk::new(ctx);
        // Their latency counts from the read that brought them; too long for the limit they were framed under.
        chunk.read_at = read_at;
        chunk.max_line_bytes = deferred.max_line_bytes;
        for frame in &deferred.frames {
            let frame = frame.as_deref().map_or(Frame::TooLarge, Frame::Line);
            handle(frame, ctx, peer, &mut chunk);
        }
    }
}

/// Settles the keys a batch holds in flight as soon as the journal answers, whether or not the connection's
/// responder gets to the answer (its client may not read): returns the journal's answer for the responder.
fn settle(list: Vec<(usize, idempotency::Key, uuid::Uuid)>, ctx: &Context, ack: Ack) -> Ack {
    if list.is_empty() {
        return ack;
    }
    let mut claims = Claims {
        window: ctx.idempotency.clone(),
        list,
    };
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let stored = ack.await.unwrap_or_else(|_| {
            Err(Unavailable(
                "the log writer stopped before storing the event".into(),
            ))
        });
        if let Ok(first) = &stored {
            for (index, key, id) in claims.list.drain(..) {
                claims.window.stored(key, first + index as u64, id);
            }
        }
        // Not stored: dropping the claims frees their keys.
        drop(claims);
        let _ = tx.send(stored);
    });
    rx
}

/// Checks one frame and adds its answer slot (and its record) to `chunk`. A peer without a uid is the daemon
/// itself: only it may submit the daemon's own types.
fn handle(frame: Frame<'_>, ctx: &Context, peer: &Peer, chunk: &mut Chunk) {
    if let Some(deferred) = &mut chunk.deferred {
        match frame {
            Frame::Line(line) if line.iter().all(u8::is_ascii_whitespace) => {}
            Frame::Line(line) => deferred.frames.push(Some(line.to_vec())),
            Frame::TooLarge => deferred.frames.push(None),
        }
        return;
    }
    let line = match frame {
        Frame::TooLarge => {
            ctx.access.refusals.count(ErrorCode::TooLarge, peer.uid);
            chunk.slots.push(Slot::Rejected(Rejection::new(
                ErrorCode::TooLarge,
                format!(
                    "line is longer than {} bytes; it was skipped",
                    chunk.max_line_bytes
                ),
            )));
            return;
        }
        // Blank lines separate nothing and ask nothing: they get no answer.
        Frame::Line(line) if line.iter().all(u8::is_ascii_whitespace) => return,
        Frame::Line(line) => line,
    };
    let rules = &*chunk.rules;
    let slot = match check(line, rules, peer, &ctx.access) {
        Ok((event, ty, route)) => {
            let now = crate::clock::now();
            let id = record::new_id(now);
            let mut text = [0u8; 36];
            id.hyphenated().encode_lower(&mut text);
            let id_str = std::str::from_utf8(&text).expect("uuid text is ascii");
            let start = chunk.batch.buf().len();
            let parts =
                record::write_tail(chunk.batch.buf(), id_str, now, &event, ty, &peer.fragment);
            let claim = match (&event.request.idempotency_key, peer.uid) {
                (Some(key), Some(uid)) => {
                    let buf = chunk.batch.buf();
                    let occurred = &buf[parts.occurred_at.clone()];
                    let occurred =
                        (occurred != &buf[parts.received_at.clone()]).then_some(occurred);
                    let digest = EventDigest::new(&ty.name, occurred, &buf[parts.fields.clone()]);
                    let k = idempotency::Key::new(uid, key);
                    Some((k, ctx.idempotency.claim(k, digest, now), key, uid))
                }
                _ => None,
            };
            match claim {
                None | Some((_, Claim::New, _, _)) => {
                    if let Some((k, ..)) = claim {
                        chunk.claims.list.push((chunk.batch.len(), k, id));
                    }
                    chunk.batch.end_record(route);
                    chunk.batch.count(&ty.accepted);
                    Slot::Accepted { id: text }
                }
                Some((k, other, key, uid)) => {
                    chunk.batch.buf().truncate(start);
                    match other {
                        Claim::Duplicate { id, seq } => {
                            let mut text = [0u8; 36];
                            id.hyphenated().encode_lower(&mut text);
                            Slot::Duplicate { id: text, seq }
                        }
                        Claim::Conflict { id, seq } => Slot::Rejected(conflict(key, uid, id, seq)),
                        Claim::New | Claim::Wait => {
                            // Checked again once the key is settled: the token it took goes back.
                            if let Some(rate) = rules.access.rate() {
                                ctx.access.give_back(rate, &peer.bucket);
                            }
                            chunk.deferred = Some(Deferred {
                                key: k,
                                frames: vec![Some(line.to_vec())],
                                max_line_bytes: chunk.max_line_bytes,
                            });
                            return;
                        }
                    }
                }
            }
        }
        Err(rejection) => Slot::Rejected(rejection),
    };
    if let (Slot::Rejected(r), Some(_)) = (&slot, peer.uid) {
        ctx.access.refusals.count(r.code, peer.uid);
    }
    chunk.slots.push(slot);
}

fn conflict(key: &str, uid: u32, id: uuid::Uuid, seq: u64) -> Rejection {
    let message = format!(
        "idempotency_key {key:?} was used by uid {uid} for a different event (stored as seq {seq}, id {id}); \
         nothing was stored: use a new key for a new event"
    );
    Rejection::with_details(
        ErrorCode::Conflict,
        message.clone(),
        vec![crate::protocol::Violation {
            path: "/idempotency_key".into(),
            message,
        }],
    )
}

/// Checks a request line completely: envelope, type (the daemon's own types only from the daemon itself), access
/// (rules, actor; see [`access`]), payload, destination, then the peer's rate.
fn check<'l, 'c>(
    line: &'l [u8],
    rules: &'c Rules,
    peer: &Peer,
    access: &Access,
) -> Result<(protocol::Checked<'l>, &'c EventType, Route), Rejection> {
    let mut event = protocol::parse(line)?;
    let own = peer.credentials.is_none();
    let name = event.request.event_type.as_str();
    if !own && crate::event_types::is_daemon_type(name) {
        return Err(Rejection::new(
            ErrorCode::Forbidden,
            format!(
                "event type {name:?} is recorded by the daemon itself; clients may not submit it"
            ),
        ));
    }
    let Some(ty) = rules.registry.get(name) else {
        return Err(Rejection::new(
            ErrorCode::UnknownType,
            format!("event type {name:?} is not defined"),
        ));
    };
    if let Some(who) = peer.credentials {
        access.admit(&rules.access, ty, &mut event, who)?;
    }
    let name = event.request.event_type.as_str();
    if let Some(payload) = &event.request.payload
        && let Err(details) = ty.check_payload(payload)
    {
        let message = match details.as_slice() {
            [only] => format!(
                "invalid payload for {name:?}: {}: {}",
                only.path, only.message
            ),
            many => format!("invalid payload for {name:?}: {} problems", many.len()),
        };
        return Err(Rejection::with_details(
            ErrorCode::InvalidPayload,
            message,
            details,
        ));
    }
    let route = Route {
        persist: ty.saved_to_database,
        stream: ty.streamed && rules.streamed_types.contains(name),
    };
    if !route.persist && !route.stream {
        return Err(Rejection::new(
            ErrorCode::Unavailable,
            format!(
                "event type {name:?} is streamed only and no configured sink receives it; \
                 it was not stored (configure a sink whose events filter matches it)"
            ),
        ));
    }
    if let (Some(rate), Some(who)) = (rules.access.rate(), peer.credentials) {
        access.take(&rules.access, rate, ty, who, &peer.bucket)?;
    }
    Ok((event, ty, route))
}

/// Records one of the daemon's own events (a request line) through the same checks and journal as a client's,
/// attributed to `source`. Returns its `seq`.
pub async fn record_own(ctx: &Context, line: &[u8], source: &[u8]) -> Result<u64, Rejection> {
    let mut chunk = Chunk::new(ctx);
    let peer = Peer {
        fragment: source.to_vec(),
        uid: None,
        credentials: None,
        bucket: OnceLock::new(),
    };
    handle(Frame::Line(line), ctx, &peer, &mut chunk);
    if let Some(Slot::Rejected(r)) = chunk.slots.pop() {
        return Err(r);
    }
    let ack = ctx.submitter.submit(std::mem::take(&mut chunk.batch)).await;
    // Queued: the generation is let go before the wait for the log (see `Retired`).
    drop(chunk);
    ack.await
        .unwrap_or_else(|_| Err(Unavailable("the log writer stopped".into())))
        .map_err(|e| Rejection::new(ErrorCode::Unavailable, e.0))
}

/// The `source` of the daemon's own events: its own process, marked `"daemon":true`.
pub fn own_source(ctx: &Context) -> Vec<u8> {
    Source {
        uid: unsafe { libc::geteuid() },
        gid: unsafe { libc::getegid() },
        pid: Some(std::process::id() as i32),
        host: ctx.host.clone(),
        daemon: true,
    }
    .fragment()
}

/// Records the daemon's own audit events (the lines the auditor queues), attributed to its own process,
/// until `done` (then drains what is queued).
pub async fn record_own_events(
    ctx: Arc<Context>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    done: CancellationToken,
) {
    let source = own_source(&ctx);
    loop {
        let line = tokio::select! {
            biased;
            line = rx.recv() => match line { Some(l) => l, None => break },
            _ = done.cancelled() => match rx.try_recv() { Ok(l) => l, Err(_) => break },
        };
        if let Err(r) = record_own(&ctx, &line, &source).await {
            error!(error = %r.message, event = %String::from_utf8_lossy(&line), "cannot record the daemon's own audit event");
        }
    }
}

/// Writes the answers of a connection in request order, each once its records are durable.
///
/// A client that takes none of the answers waiting for it for `idle_timeout` is closed; its events stay stored.
async fn respond(
    mut writer: OwnedWriteHalf,
    mut pending: mpsc::Receiver<Pending>,
    connections: Arc<Connections>,
    (access, uid): (Arc<Access>, u32),
) {
    let mut out = Vec::new();
    // The `ok` answers in `out`: when their chunk was read and how many; recorded once they are written.
    let mut answered: Vec<(Instant, u64)> = Vec::new();
    let latency = |answered: &mut Vec<(Instant, u64)>| {
        let now = Instant::now();
        for (read_at, n) in answered.drain(..) {
            connections
                .ack_latency
                .observe_duration(now.duration_since(read_at), n);
        }
    };
    let stopped = || {
        Err(Unavailable(
            "the log writer stopped before storing the event".into(),
        ))
    };
    while let Some(p) = pending.recv().await {
        let stored = match p.ack {
            Some(mut ack) => match ack.try_recv() {
                Ok(stored) => stored,
                Err(oneshot::error::TryRecvError::Closed) => stopped(),
                Err(oneshot::error::TryRecvError::Empty) => {
                    // Answers already encoded are for events already stored: send them before waiting for more.
                    if !flush(&mut writer, &mut out, connections.idle_timeout()).await {
                        return;
                    }
                    latency(&mut answered);
                    ack.await.unwrap_or_else(|_| stopped())
                }
            },
            None => Ok(0),
        };
        let mut seq = stored.as_ref().copied().unwrap_or(0);
        let first = seq;
        for slot in &p.slots {
            match (slot, &stored) {
                (Slot::Accepted { id }, Ok(_)) => {
                    protocol::encode_ack(
                        std::str::from_utf8(id).unwrap_or_default(),
                        seq,
                        &mut out,
                    );
                    seq += 1;
                }
                (Slot::Accepted { .. }, Err(e)) => {
                    access.refusals.count(ErrorCode::Unavailable, Some(uid));
                    Rejection::new(ErrorCode::Unavailable, e.0.clone()).encode(&mut out)
                }
                (Slot::Duplicate { id, seq }, _) => protocol::encode_duplicate(
                    std::str::from_utf8(id).unwrap_or_default(),
                    *seq,
                    &mut out,
                ),
                (Slot::Rejected(r), _) => r.encode(&mut out),
            }
        }
        if seq > first {
            answered.push((p.read_at, seq - first));
        }
        if out.len() >= READ_BYTES || pending.is_empty() {
            if !flush(&mut writer, &mut out, connections.idle_timeout()).await {
                return;
            }
            latency(&mut answered);
        }
    }
    if flush(&mut writer, &mut out, connections.idle_timeout()).await {
        latency(&mut answered);
    }
    let _ = writer.shutdown().await;
}

/// Writes `out`; false when the client is gone or took none of it for `timeout`. A large buffer is let go
/// afterwards, so that an idle connection holds no memory for answers.
async fn flush(writer: &mut OwnedWriteHalf, out: &mut Vec<u8>, timeout: Duration) -> bool {
    if out.is_empty() {
        return true;
    }
    let ok = matches!(
        tokio::time::timeout(timeout, writer.write_all(out)).await,
        Ok(Ok(()))
    );
    out.clear();
    out.shrink_to(4 << 10);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_grow_at_once_and_shrink_as_permits_come_back() {
        let pool = Pool::new(3);
        let held: Vec<Permit> = (0..3).map(|_| pool.try_acquire().unwrap()).collect();
        assert!(pool.try_acquire().is_none());
        assert_eq!(pool.counts(), (3, 3));
        // Lowered to 1 with 3 held: nobody loses a permit; none is free until two came back.
        pool.resize(1);
        assert_eq!(pool.counts(), (1, 3));
        let mut held = held.into_iter();
        drop(held.next());
        assert!(pool.try_acquire().is_none(), "{:?}", pool.counts());
        drop(held.next());
        assert_eq!(pool.counts(), (1, 1));
        assert!(pool.try_acquire().is_none());
        // Raised to 2 while one permit is still owed: the debt is settled first, then one more is free.
        pool.resize(1);
        pool.resize(2);
        let extra = pool.try_acquire().expect("one more");
        assert!(pool.try_acquire().is_none());
        assert_eq!(pool.counts(), (2, 2));
        // Lowered to 1 with 2 held, raised to 4 before any came back: two more at once, and the owed one repaid.
        pool.resize(1);
        pool.resize(4);
        let more: Vec<Permit> = (0..2).map(|_| pool.try_acquire().unwrap()).collect();
        assert!(pool.try_acquire().is_none());
        assert_eq!(pool.counts(), (4, 4));
        drop((extra, more, held));
        assert_eq!(pool.counts(), (4, 0));
        // Shrunk while all are free: at once.
        pool.resize(2);
        let two: Vec<Permit> = (0..2).map(|_| pool.try_acquire().unwrap()).collect();
        assert!(pool.try_acquire().is_none());
        drop(two);
        assert_eq!(pool.counts(), (2, 0));
    }

    /// A listening socket at `dir/name` with file mode `mode`, as a service manager would pass it.
    fn passed(dir: &Path, name: &str, mode: u32) -> std::os::unix::net::UnixListener {
        let listener = std::os::unix::net::UnixListener::bind(dir.join(name)).unwrap();
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
        listener
    }

    #[tokio::test]
    async fn passed_sockets_are_checked_like_bound_ones() {
        let dir = tempfile::tempdir().unwrap();
        let check =
            |name: &str, file_mode: u32, configured: &str, mode: u32, expected: Option<&str>| {
                let listener = passed(dir.path(), name, file_mode);
                let got = adopt(listener, &dir.path().join(configured), mode, None);
                match (expected, got) {
                    (None, Ok(_)) => {}
                    (Some(want), Err(e)) => assert!(e.to_string().contains(want), "{name}: {e}"),
                    (want, got) => panic!("{name}: expected {want:?}, got {got:?}"),
                }
            };
        check("a.sock", 0o660, "a.sock", 0o660, None);
        // Read bits mean nothing on a socket; only write (connect) counts.
        check("b.sock", 0o644, "b.sock", 0o600, None);
        check("c.sock", 0o666, "c.sock", 0o660, Some("SocketMode="));
        check(
            "d.sock",
            0o660,
            "elsewhere.sock",
            0o660,
            Some("ListenStream="),
        );
        // A socket its group may connect to must be in the configured group (SocketGroup=); one it may not
        // connect to may be in any.
        let own = unsafe { libc::getegid() };
        let other = own.wrapping_add(54_321);
        let grouped = |name: &str, file_mode: u32, group: u32| {
            adopt(
                passed(dir.path(), name, file_mode),
                &dir.path().join(name),
                0o660,
                Some(group),
            )
        };
        assert!(grouped("g.sock", 0o660, own).is_ok());
        let got = grouped("h.sock", 0o660, other);
        assert!(
            got.as_ref()
                .is_err_and(|e| e.to_string().contains("SocketGroup=")),
            "{got:?}"
        );
        assert!(grouped("i.sock", 0o600, other).is_ok());

        // Below a directory others can write, as for binding.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let listener = passed(&open, "e.sock", 0o600);
        let got = adopt(listener, &open.join("e.sock"), 0o600, None);
        assert!(matches!(got, Err(BindError::Untrusted { .. })), "{got:?}");

        // Bound, but not listening: not a socket to accept on.
        let path = dir.path().join("f.sock");
        let unbound = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::empty(),
            None,
        )
        .unwrap();
        nix::sys::socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&unbound),
            &nix::sys::socket::UnixAddr::new(&path).unwrap(),
        )
        .unwrap();
        let got = adopt(
            std::os::unix::net::UnixListener::from(unbound),
            &path,
            0o660,
            None,
        );
        assert!(
            got.as_ref()
                .is_err_and(|e| e.to_string().contains("not a listening stream socket")),
            "{got:?}"
        );
    }
}
