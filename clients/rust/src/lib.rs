//! A client for trail's submission socket.
//!
//! trail is an audit-trail daemon: programs submit audit events as JSON lines over a Unix socket, and the daemon
//! answers each one only after the event is written (and synced) to its log. This crate speaks that protocol with
//! blocking std I/O (an async client on tokio is behind the `tokio` feature, [`tokio`](crate::tokio)), and depends
//! on nothing of the daemon.
//!
//! ```no_run
//! use trail_client::{Client, Event, Outcome};
//!
//! let mut client = Client::connect(&trail_client::default_socket())?;
//! let ack = client.submit(
//!     &Event::new("user_login")
//!         .actor("u-42")
//!         .actor_field("ip", "10.0.0.7")
//!         .outcome(Outcome::Success)
//!         .payload(serde_json::json!({"method": "sso"})),
//! )?;
//! println!("stored as {} (seq {})", ack.id, ack.seq);
//! # Ok::<(), trail_client::Error>(())
//! ```
//!
//! - [`Client::submit`] sends one event and returns its [`Ack`] or the refusal as an [`Error`], one variant per
//!   protocol error code; [`Error::is_retryable`] and [`Error::retry_after`] say whether and when to try again.
//! - [`Client::submit_many`] pipelines: every event is written before the answers are read, and each event gets
//!   its own result, in order.
//! - With a [`Retry`] policy ([`Client::with_retry`]) retryable refusals and broken connections are retried with
//!   backoff, every attempt carrying the event's `idempotency_key` (a random one is set when the event has none),
//!   so that no retry stores an event twice: the daemon answers a repeat with the first request's `id` and `seq`
//!   and [`Ack::duplicate`] set.
//!
//! Before it talks to a socket the client checks that it is the daemon's ([`trust`]): every directory on its path
//! belongs to a trusted user and cannot be written by others, the socket is a socket of a trusted user, and the
//! process listening on it runs as one (`SO_PEERCRED`). Trusted are root, the client's own user and the user named
//! by `$TRAIL_SOCKET_OWNER` ([`default_owners`]).
//!
//! The protocol itself (envelope, answers, error codes) is described in trail's README, "Submitting events".

#![deny(missing_docs)]

mod answer;
mod event;
mod retry;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod trust;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

pub use answer::{Ack, Error, Refusal, Violation};
pub use event::{Event, Outcome};
pub use retry::Retry;
pub use trust::Owners;

/// The variable that names the submission socket.
pub const SOCKET_VAR: &str = "TRAIL_SOCKET";
/// The variable that names the admin socket.
pub const ADMIN_SOCKET_VAR: &str = "TRAIL_ADMIN_SOCKET";
/// Names the user, besides root and the client's own, that the daemon's socket may belong to (a name or a uid).
pub const SOCKET_OWNER_VAR: &str = "TRAIL_SOCKET_OWNER";

/// The development configuration's socket: `$XDG_RUNTIME_DIR/trail/trail.sock`, or `run/trail.sock` when
/// `$XDG_RUNTIME_DIR` is not set.
pub fn development_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("trail").join("trail.sock"),
        _ => PathBuf::from("run").join("trail.sock"),
    }
}

/// The socket a client uses when none is given: `$TRAIL_SOCKET`, else [`development_socket`].
pub fn default_socket() -> PathBuf {
    match std::env::var_os(SOCKET_VAR) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => development_socket(),
    }
}

/// The admin socket a client uses when none is given: `$TRAIL_ADMIN_SOCKET`, else `admin.sock` beside
/// [`development_socket`].
pub fn default_admin_socket() -> PathBuf {
    match std::env::var_os(ADMIN_SOCKET_VAR) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => development_socket()
            .parent()
            .unwrap_or(Path::new("."))
            .join("admin.sock"),
    }
}

/// Whom a client trusts by default: root, its own user, and the user named by `$TRAIL_SOCKET_OWNER` when set.
pub fn default_owners() -> Result<Owners, Error> {
    let owners = Owners::me();
    match std::env::var(SOCKET_OWNER_VAR) {
        Ok(who) if !who.trim().is_empty() => owners
            .and_user(&who, SOCKET_OWNER_VAR)
            .map_err(Error::Owner),
        _ => Ok(owners),
    }
}

/// Connects to the daemon's socket at `socket` after checking it (see [`trust`]): every directory on its path can
/// be written only by its owner (a user of `owners`), the socket is a socket (not a link to one) owned by a user of
/// `owners`, and the process that accepts the connection runs as one of them (`SO_PEERCRED`).
pub fn connect(socket: &Path, owners: &Owners) -> Result<UnixStream, Error> {
    // The check and the connect are two steps; that is sound only because, as just checked, nobody outside
    // `owners` can write any directory on the path, so nobody else can swap the socket in between.
    let checked = trust::check_socket(socket, owners).map_err(Error::from_untrusted)?;
    let stream = UnixStream::connect(&checked).map_err(|source| Error::Unreachable {
        socket: socket.to_owned(),
        source,
    })?;
    trust::check_peer(&stream, socket, owners).map_err(Error::Untrusted)?;
    Ok(stream)
}

/// Sends one request to the admin socket and returns the answer (trusting [`default_owners`]).
pub fn admin(socket: &Path, request: &Value) -> std::io::Result<Value> {
    Client::connect(socket)?.emit(request)
}

/// One connection to the submission socket.
///
/// The typed methods ([`submit`](Client::submit), [`submit_many`](Client::submit_many)) reconnect when the
/// connection broke; the raw ones ([`emit`](Client::emit), [`emit_raw`](Client::emit_raw),
/// [`read_answer`](Client::read_answer)) hand over the daemon's answer lines as they are, for tools and tests.
pub struct Client {
    socket: PathBuf,
    owners: Owners,
    timeout: Option<Duration>,
    retry: Option<Retry>,
    conn: Option<Connection>,
}

struct Connection {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Connection {
    fn new(writer: UnixStream, timeout: Option<Duration>) -> std::io::Result<Connection> {
        writer.set_read_timeout(timeout)?;
        writer.set_write_timeout(timeout)?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(Connection { writer, reader })
    }
}

impl Client {
    /// Connects to the daemon's socket, trusting [`default_owners`] (see [`connect`]).
    pub fn connect(socket: &Path) -> Result<Client, Error> {
        Client::connect_trusting(socket, &default_owners()?)
    }

    /// Connects to the daemon's socket, trusting `owners` (see [`connect`]).
    pub fn connect_trusting(socket: &Path, owners: &Owners) -> Result<Client, Error> {
        let mut client = Client {
            socket: socket.to_owned(),
            owners: owners.clone(),
            timeout: None,
            retry: None,
            conn: None,
        };
        client.connection()?;
        Ok(client)
    }

    /// Bounds each wait for the daemon (reading an answer, writing a request); `None` (the default) waits as long
    /// as it takes: a durable write can take a while on a busy disk. A wait that times out is [`Error::Unreachable`].
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Client {
        self.timeout = timeout;
        if let Some(conn) = &self.conn {
            let _ = conn.writer.set_read_timeout(timeout);
            let _ = conn.writer.set_write_timeout(timeout);
        }
        self
    }

    /// Retries retryable refusals and broken connections with this policy (see [`Retry`]).
    pub fn with_retry(mut self, retry: Retry) -> Client {
        self.retry = Some(retry);
        self
    }

    fn connection(&mut self) -> Result<&mut Connection, Error> {
        if self.conn.is_none() {
            let stream = connect(&self.socket, &self.owners)?;
            let conn = Connection::new(stream, self.timeout).map_err(|e| self.broken(e))?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    fn broken(&self, source: std::io::Error) -> Error {
        Error::Unreachable {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Submits one event and returns its acknowledgement, or the refusal. With a [`Retry`] policy, retryable
    /// refusals and broken connections are retried (same `idempotency_key`) until its deadline.
    pub fn submit(&mut self, event: &Event) -> Result<Ack, Error> {
        self.submit_many(std::slice::from_ref(event))?
            .pop()
            .expect("one result per event")
    }

    /// Submits `events` pipelined over one connection: all are written before the answers are read. Returns one
    /// result per event, in order; a refused event does not affect the others. The outer error is for what stops
    /// the whole batch before anything is sent (an untrusted socket). With a [`Retry`] policy, events whose result
    /// is retryable are sent again with their idempotency keys until none is or the deadline passes.
    pub fn submit_many(&mut self, events: &[Event]) -> Result<Vec<Result<Ack, Error>>, Error> {
        let Some(retry) = self.retry.clone() else {
            return self.attempt(&events.iter().collect::<Vec<_>>());
        };
        let keyed: Vec<Event> = events.iter().map(|e| e.clone().with_key()).collect();
        let mut plan = retry.start(keyed.len());
        loop {
            let batch: Vec<&Event> = plan.pending().iter().map(|&i| &keyed[i]).collect();
            let results = self.attempt(&batch)?;
            match plan.record(results) {
                Some(delay) => std::thread::sleep(delay),
                None => return Ok(plan.finish()),
            }
        }
    }

    /// Sends `batch` once. Events whose answer did not arrive because the connection broke get
    /// [`Error::Unreachable`]; an untrusted socket fails the whole call.
    fn attempt(&mut self, batch: &[&Event]) -> Result<Vec<Result<Ack, Error>>, Error> {
        let mut lines = Vec::with_capacity(batch.len() * 256);
        for event in batch {
            event.write_line(&mut lines);
        }
        let conn = match self.connection() {
            Ok(conn) => conn,
            Err(e @ (Error::Untrusted(_) | Error::Owner(_))) => return Err(e),
            Err(e) => return Ok(batch.iter().map(|_| Err(e.duplicate())).collect()),
        };
        let mut writer = &conn.writer;
        let reader = &mut conn.reader;
        // Written on a thread of its own while the answers are read: the daemon stops reading a connection whose
        // answers are not taken, so writing a long batch first and reading after could wait forever.
        let (written, results, failure) = std::thread::scope(|scope| {
            let write = scope.spawn(move || writer.write_all(&lines));
            let mut results = Vec::with_capacity(batch.len());
            let mut failure = None;
            let mut line = String::new();
            while results.len() < batch.len() {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) if answer::take(&mut results, &line) => break,
                    Ok(_) => {}
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if results.len() < batch.len() {
                // Unblock a writer still waiting for the daemon to read.
                let _ = conn.writer.shutdown(std::net::Shutdown::Both);
            }
            let written = write.join().expect("the writing thread does not panic");
            (written, results, failure)
        });
        self.finish_attempt(results, batch.len(), failure.or(written.err()))
    }

    /// Completes an attempt's results: events that got no answer share the reason (the daemon turned the
    /// connection away, or it broke), and the connection is dropped so that the next attempt reconnects.
    fn finish_attempt(
        &mut self,
        mut results: Vec<Result<Ack, Error>>,
        events: usize,
        failure: Option<std::io::Error>,
    ) -> Result<Vec<Result<Ack, Error>>, Error> {
        if results.len() < events {
            self.conn = None;
            let lost = answer::lost(&results, || self.broken(answer::eof_or(failure)));
            results.resize_with(events, || Err(lost.duplicate()));
        }
        Ok(results)
    }

    /// Sends one request and returns the daemon's answer as it is. When the daemon closed the connection before
    /// taking the request (it had too many), the answer it sent before closing is returned.
    pub fn emit(&mut self, request: &Value) -> std::io::Result<Value> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.emit_raw(&line)
    }

    /// Sends one request line as written (ending in a newline) and reads its answer. A daemon that turns the
    /// connection away (`too_many_connections`) answers and closes before reading: that answer is returned
    /// rather than the failed write.
    pub fn emit_raw(&mut self, line: &[u8]) -> std::io::Result<Value> {
        match self.send_raw(line) {
            Ok(()) => self.read_answer(),
            Err(e) => self.read_answer().map_err(|_| e),
        }
    }

    /// Writes bytes to the socket as they are (any number of request lines, or part of one).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.connection()?.writer.write_all(bytes)
    }

    /// Reads the next answer line as it is.
    pub fn read_answer(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        if self.connection()?.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection",
            ));
        }
        serde_json::from_str(&line).map_err(std::io::Error::other)
    }
}

/// Counts of a [`pipeline`] run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Events acknowledged.
    pub accepted: u64,
    /// Requests refused.
    pub rejected: u64,
}

/// Sends every non-blank line of `input` over one connection without waiting for answers, and writes each answer
/// line to `output` as it arrives (trusting [`default_owners`]).
pub fn pipeline(
    socket: &Path,
    input: impl BufRead + Send + 'static,
    output: impl Write,
) -> Result<Tally, Error> {
    let stream = connect(socket, &default_owners()?)?;
    pipeline_on(stream, input, output).map_err(|source| Error::Unreachable {
        socket: socket.to_owned(),
        source,
    })
}

/// [`pipeline`] over a stream already connected, e.g. by [`connect`].
pub fn pipeline_on(
    stream: UnixStream,
    input: impl BufRead + Send + 'static,
    mut output: impl Write,
) -> std::io::Result<Tally> {
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut sent = 0;
        let mut buffered = std::io::BufWriter::with_capacity(64 << 10, &mut writer);
        for line in input.split(b'\n') {
            let line = line?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            buffered.write_all(&line)?;
            buffered.write_all(b"\n")?;
            sent += 1;
        }
        buffered.flush()?;
        drop(buffered);
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(sent)
    });
    let mut tally = Tally::default();
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if line.starts_with("{\"ok\":true") {
            tally.accepted += 1;
        } else {
            tally.rejected += 1;
        }
        writeln!(output, "{line}")?;
    }
    let sent = sender
        .join()
        .map_err(|_| std::io::Error::other("sending thread panicked"))??;
    if sent != tally.accepted + tally.rejected {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "sent {sent} events but got {} answers: the daemon stopped",
                tally.accepted + tally.rejected
            ),
        ));
    }
    Ok(tally)
}
