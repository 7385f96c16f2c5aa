//! The submission socket: accepting connections, framing, checking and stamping events, answering in order.
//!
//! Owns the socket file and every client connection. Each connection has a reader task (read, frame, check,
//! stamp, submit to the journal) and a responder task (wait for the journal, answer every request line in
//! order). The two are joined by a bounded queue and the journal's queue is bounded too, so a slow disk or a
//! client that does not read its answers stops the reading, never grows memory.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::event_types::{EventType, Registry};

use crate::framing::{Frame, Framer};
use crate::journal::{Ack, Batch, Route, Submitter, Unavailable};
use crate::protocol::{self, ErrorCode, Rejection};
use crate::record::{self, Source};

/// Bytes read from a connection at a time; one read becomes at most one journal submission.
const READ_BYTES: usize = 64 << 10;
/// Chunks of one connection waiting for the journal before the connection stops reading.
const PENDING_DEPTH: usize = 32;

/// What every connection shares.
pub struct Context {
    /// Event types.
    pub registry: Arc<Registry>,
    /// The journal's input.
    pub submitter: Submitter,
    /// `source.host`.
    pub host: String,
    /// Longest accepted request line.
    pub max_line_bytes: usize,
    /// Event types at least one sink receives.
    pub streamed_types: HashSet<String>,
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
    /// The operating system refused.
    #[error("socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Binds the socket at `path` with permission bits `mode`, replacing a stale socket file left by a crash.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_owned()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    UnixListener::from_std(listener).map_err(io)
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
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, ctx.clone(), stop.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: keep serving the connections we have.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
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

/// What one read produced: an answer slot per request line, and the records to store.
struct Chunk {
    slots: Vec<Slot>,
    batch: Batch,
}

enum Slot {
    Accepted { id: [u8; 36] },
    Rejected(Rejection),
}

/// A chunk whose records are on their way to the journal.
struct Pending {
    slots: Vec<Slot>,
    ack: Option<Ack>,
}

async fn connection(stream: UnixStream, ctx: Arc<Context>, stop: CancellationToken) {
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
    let fragment = source.fragment();
    let (mut reader, writer) = stream.into_split();
    let (pending_tx, pending_rx) = mpsc::channel(PENDING_DEPTH);
    let responder = tokio::spawn(respond(writer, pending_rx));
    let mut framer = Framer::new(ctx.max_line_bytes);
    let mut buf = vec![0u8; READ_BYTES];
    let mut eof = false;
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            read = reader.read(&mut buf) => match read {
                Ok(0) => { eof = true; break }
                Ok(n) => n,
                Err(e) => { debug!(error = %e, "read failed"); break }
            },
        };
        let mut chunk = Chunk {
            slots: Vec::new(),
            batch: Batch::default(),
        };
        framer.push(&buf[..n], |frame| {
            handle(frame, &ctx, &fragment, false, &mut chunk)
        });
        if !send(&ctx, chunk, &pending_tx).await {
            break;
        }
    }
    if eof {
        let mut chunk = Chunk {
            slots: Vec::new(),
            batch: Batch::default(),
        };
        framer.finish(|frame| handle(frame, &ctx, &fragment, false, &mut chunk));
        send(&ctx, chunk, &pending_tx).await;
    }
    drop(pending_tx);
    let _ = responder.await;
    debug!(uid = source.uid, pid = ?source.pid, "connection closed");
}

/// Hands a chunk to the journal and its answers to the responder; false when the client is gone.
async fn send(ctx: &Context, chunk: Chunk, pending: &mpsc::Sender<Pending>) -> bool {
    if chunk.slots.is_empty() {
        return true;
    }
    let ack = if chunk.batch.is_empty() {
        None
    } else {
        Some(ctx.submitter.submit(chunk.batch).await)
    };
    pending
        .send(Pending {
            slots: chunk.slots,
            ack,
        })
        .await
        .is_ok()
}

/// `own`: the line is one of the daemon's own events (only those may have the daemon's own types).
fn handle(frame: Frame<'_>, ctx: &Context, source: &[u8], own: bool, chunk: &mut Chunk) {
    let line = match frame {
        Frame::TooLarge => {
            chunk.slots.push(Slot::Rejected(Rejection::new(
                ErrorCode::TooLarge,
                format!(
                    "line is longer than {} bytes; it was skipped",
                    ctx.max_line_bytes
                ),
            )));
            return;
        }
        // Blank lines separate nothing and ask nothing: they get no answer.
        Frame::Line(line) if line.iter().all(u8::is_ascii_whitespace) => return,
        Frame::Line(line) => line,
    };
    let slot = match check(line, ctx, own) {
        Ok((event, ty, route)) => {
            let now = crate::clock::now();
            let mut text = [0u8; 36];
            record::new_id(now).hyphenated().encode_lower(&mut text);
            let id_str = std::str::from_utf8(&text).expect("uuid text is ascii");
            record::write_tail(chunk.batch.buf(), id_str, now, &event, ty, source);
            chunk.batch.end_record(route);
            Slot::Accepted { id: text }
        }
        Err(rejection) => Slot::Rejected(rejection),
    };
    chunk.slots.push(slot);
}

/// Checks a request line completely: envelope, type (the daemon's own types only when `own`), payload, destination.
fn check<'c>(
    line: &[u8],
    ctx: &'c Context,
    own: bool,
) -> Result<(protocol::Checked, &'c EventType, Route), Rejection> {
    let event = protocol::parse(line)?;
    let name = &event.request.event_type;
    if !own && crate::event_types::is_daemon_type(name) {
        return Err(Rejection::new(
            ErrorCode::Forbidden,
            format!(
                "event type {name:?} is recorded by the daemon itself; clients may not submit it"
            ),
        ));
    }
    let Some(ty) = ctx.registry.get(name) else {
        return Err(Rejection::new(
            ErrorCode::UnknownType,
            format!("event type {name:?} is not defined"),
        ));
    };
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
        return Err(Rejection {
            code: ErrorCode::InvalidPayload,
            message,
            details,
        });
    }
    let route = Route {
        persist: ty.saved_to_database,
        stream: ty.streamed && ctx.streamed_types.contains(name),
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
    Ok((event, ty, route))
}

/// Records one of the daemon's own events (a request line) through the same checks and journal as a client's,
/// attributed to `source`. Returns its `seq`.
pub async fn record_own(ctx: &Context, line: &[u8], source: &[u8]) -> Result<u64, Rejection> {
    let mut chunk = Chunk {
        slots: Vec::new(),
        batch: Batch::default(),
    };
    handle(Frame::Line(line), ctx, source, true, &mut chunk);
    if let Some(Slot::Rejected(r)) = chunk.slots.pop() {
        return Err(r);
    }
    ctx.submitter
        .submit(chunk.batch)
        .await
        .await
        .unwrap_or_else(|_| Err(Unavailable("the log writer stopped".into())))
        .map_err(|e| Rejection::new(ErrorCode::Unavailable, e.0))
}

/// Writes the answers of a connection in request order, each once its records are durable.
async fn respond(mut writer: OwnedWriteHalf, mut pending: mpsc::Receiver<Pending>) {
    let mut out = Vec::with_capacity(READ_BYTES);
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
                    if !flush(&mut writer, &mut out).await {
                        return;
                    }
                    ack.await.unwrap_or_else(|_| stopped())
                }
            },
            None => Ok(0),
        };
        let mut seq = stored.as_ref().copied().unwrap_or(0);
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
                    Rejection::new(ErrorCode::Unavailable, e.0.clone()).encode(&mut out)
                }
                (Slot::Rejected(r), _) => r.encode(&mut out),
            }
        }
        if (out.len() >= READ_BYTES || pending.is_empty()) && !flush(&mut writer, &mut out).await {
            return;
        }
    }
    flush(&mut writer, &mut out).await;
    let _ = writer.shutdown().await;
}

async fn flush(writer: &mut OwnedWriteHalf, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    let ok = writer.write_all(out).await.is_ok();
    out.clear();
    ok
}
