//! A small blocking client for the submission socket, used by the `trail` tool, the tests and the benchmark.
//!
//! Owns nothing of the daemon: it only speaks the public protocol. Before it talks to a socket it checks that
//! the socket is the daemon's ([`connect`]): an impostor's socket would take events and log nothing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;

pub use crate::trust::Owners;

/// Names the user, besides root and the client's own, that the daemon's socket may belong to (a name or a uid).
pub const SOCKET_OWNER_VAR: &str = "TRAIL_SOCKET_OWNER";

/// Whom a client trusts by default: root, its own user, and the user named by `$TRAIL_SOCKET_OWNER` when set.
pub fn default_owners() -> std::io::Result<Owners> {
    let owners = Owners::me();
    match std::env::var(SOCKET_OWNER_VAR) {
        Ok(who) if !who.trim().is_empty() => owners
            .and_user(&who, SOCKET_OWNER_VAR)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e)),
        _ => Ok(owners),
    }
}

/// Connects to the daemon's socket at `socket` after checking it: every directory on its path can be written only
/// by its owner (a user of `owners`), the socket is a socket (not a link to one) owned by a user of `owners`, and
/// the process that accepts the connection runs as one of them (`SO_PEERCRED`). See [`crate::trust`].
pub fn connect(socket: &Path, owners: &Owners) -> std::io::Result<UnixStream> {
    // The check and the connect are two steps; that is sound only because, as just checked, nobody outside
    // `owners` can write any directory on the path, so nobody else can swap the socket in between.
    let checked = crate::trust::check_socket(socket, owners)?;
    let stream = UnixStream::connect(&checked)?;
    crate::trust::check_peer(&stream, socket, owners)?;
    Ok(stream)
}

/// The socket a client uses when none is given: `$TRAIL_SOCKET`, else the development default.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("TRAIL_SOCKET") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => crate::Config::development().socket.path,
    }
}

/// The admin socket a client uses when none is given: `$TRAIL_ADMIN_SOCKET`, else the development default.
pub fn default_admin_socket() -> PathBuf {
    match std::env::var_os("TRAIL_ADMIN_SOCKET") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => crate::Config::development().admin_socket(),
    }
}

/// Sends one request to the admin socket and returns the answer (trusting [`default_owners`]).
pub fn admin(socket: &Path, request: &Value) -> std::io::Result<Value> {
    Client::connect(socket)?.emit(request)
}

/// One connection that sends a request and reads its answer.
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the daemon's socket, trusting [`default_owners`] (see [`connect`]).
    pub fn connect(socket: &Path) -> std::io::Result<Client> {
        Client::connect_trusting(socket, &default_owners()?)
    }

    /// Connects to the daemon's socket, trusting `owners` (see [`connect`]).
    pub fn connect_trusting(socket: &Path, owners: &Owners) -> std::io::Result<Client> {
        Client::from_stream(connect(socket, owners)?)
    }

    fn from_stream(writer: UnixStream) -> std::io::Result<Client> {
        let reader = BufReader::new(writer.try_clone()?);
        Ok(Client { writer, reader })
    }

    /// Sends one event and waits for its answer. When the daemon closed the connection before taking the request
    /// (it had too many), the answer it sent before closing is returned.
    pub fn emit(&mut self, event: &Value) -> std::io::Result<Value> {
        let mut line = serde_json::to_vec(event)?;
        line.push(b'\n');
        match self.writer.write_all(&line) {
            Ok(()) => self.read_answer(),
            Err(e) => self.read_answer().map_err(|_| e),
        }
    }

    /// Sends raw bytes (one or more lines, or part of one) without waiting.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Reads the next answer line.
    pub fn read_answer(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
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
) -> std::io::Result<Tally> {
    pipeline_on(connect(socket, &default_owners()?)?, input, output)
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
