//! `syslog`: a trail sink plugin that forwards audit events as RFC 5424 syslog messages to a
//! local Unix datagram socket (`/dev/log`), or to a remote collector over TCP (RFC 6587
//! octet counting) or UDP. See README.md.
//!
//! This module owns the connection to the collector and the mapping of socket errors to the
//! plugin API's error kinds; [`format`] owns the messages themselves.

mod config;
mod format;

use std::{
    io::{self, Write},
    net::{Shutdown, TcpStream, ToSocketAddrs, UdpSocket},
    os::unix::net::UnixDatagram,
    time::Duration,
};

use trail_plugin_api::{Host, Record, Sink, SinkError, WriteError};

use crate::{
    config::{Destination, Settings},
    format::Formatter,
};

struct Syslog {
    host: Host,
    destination: Destination,
    timeout: Duration,
    formatter: Formatter,
    socket: Option<Socket>,
    /// The message (or, for TCP, the batch) being built, kept to reuse its allocation.
    buffer: Vec<u8>,
}

enum Socket {
    Unix(UnixDatagram),
    Udp(UdpSocket),
    Tcp(TcpStream),
}

impl Syslog {
    fn new(config_json: &str, host: Host) -> Result<Self, SinkError> {
        let settings = Settings::parse(config_json)?;
        host.info(&format!(
            "forwarding to {} as {} (facility {}, {})",
            settings.destination,
            match settings.format {
                config::Format::Json => "RFC 5424 messages holding the JSON record",
                config::Format::Structured =>
                    "RFC 5424 messages with the fields as structured data",
                config::Format::Both =>
                    "RFC 5424 messages with structured data and the JSON record",
            },
            settings.facility.0,
            match settings.severity {
                Some(s) => format!("severity {}", s.0),
                None => "severity from each event".to_owned(),
            }
        ));
        let mut sink = Self {
            host,
            destination: settings.destination.clone(),
            timeout: settings.timeout,
            formatter: Formatter::new(&settings),
            socket: None,
            buffer: Vec::new(),
        };
        // Connect now to report a problem early, but do not fail: the collector (or the local
        // syslog daemon) may start after trail, and `write` connects again.
        if let Err(e) = sink.connect() {
            sink.host
                .warn(&format!("{e}; will try again when events arrive"));
        }
        Ok(sink)
    }

    /// Opens the socket if it is not open, or if a TCP collector has closed the connection.
    fn connect(&mut self) -> Result<(), String> {
        if let Some(Socket::Tcp(stream)) = &self.socket
            && !peer_still_there(stream)
        {
            self.host.info(&format!(
                "{} closed the connection: reconnecting",
                self.destination
            ));
            self.socket = None;
        }
        if self.socket.is_some() {
            return Ok(());
        }
        let timeout = Some(self.timeout);
        let socket = match &self.destination {
            Destination::Unix(path) => {
                let socket = UnixDatagram::unbound()
                    .and_then(|s| s.connect(path).map(|()| s))
                    .map_err(|e| {
                        format!(
                            "cannot connect to {}: {e}: is the syslog daemon running, and is \"path\" its socket?",
                            path.display()
                        )
                    })?;
                socket
                    .set_write_timeout(timeout)
                    .map_err(|e| e.to_string())?;
                Socket::Unix(socket)
            }
            Destination::Udp(address) => {
                let target = resolve(address)?;
                let local = if target.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let socket = UdpSocket::bind(local)
                    .and_then(|s| s.connect(target).map(|()| s))
                    .map_err(|e| format!("cannot set up UDP to {address} ({target}): {e}"))?;
                socket
                    .set_write_timeout(timeout)
                    .map_err(|e| e.to_string())?;
                Socket::Udp(socket)
            }
            Destination::Tcp(address) => {
                let target = resolve(address)?;
                let stream = TcpStream::connect_timeout(&target, self.timeout)
                    .map_err(|e| format!("cannot connect to {address} ({target}) over TCP: {e}"))?;
                stream
                    .set_write_timeout(timeout)
                    .map_err(|e| e.to_string())?;
                self.host
                    .info(&format!("connected to {address} ({target}) over TCP"));
                Socket::Tcp(stream)
            }
        };
        self.socket = Some(socket);
        Ok(())
    }

    /// One datagram per record; stops at the first failure.
    fn send_datagrams(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        for (i, record) in batch.iter().enumerate() {
            self.buffer.clear();
            self.formatter
                .format(&record.event_type, &record.line, &mut self.buffer);
            let sent = match &self.socket {
                Some(Socket::Unix(socket)) => socket.send(&self.buffer),
                Some(Socket::Udp(socket)) => socket.send(&self.buffer),
                _ => unreachable!("datagram transports only"),
            };
            if let Err(e) = sent {
                let error = if e.raw_os_error() == Some(libc::EMSGSIZE) {
                    SinkError::permanent(format!(
                        "sending to {}: the message of event seq {} is {} bytes, too large for one datagram: use transport tcp for large events",
                        self.destination,
                        record.seq,
                        self.buffer.len()
                    ))
                } else {
                    // The socket may be stale (the daemon restarted): open a new one next time.
                    self.socket = None;
                    SinkError::retryable(format!("sending to {}: {e}", self.destination))
                };
                return Err(self.failed(i, error));
            }
        }
        Ok(())
    }

    /// The whole batch, octet-counted, in one `write_all`.
    fn send_stream(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        self.buffer.clear();
        let mut message = Vec::new();
        for record in batch {
            message.clear();
            self.formatter
                .format(&record.event_type, &record.line, &mut message);
            let _ = write!(self.buffer, "{} ", message.len());
            self.buffer.extend_from_slice(&message);
        }
        let Some(Socket::Tcp(stream)) = &mut self.socket else {
            unreachable!("tcp only")
        };
        if let Err(e) = stream.write_all(&self.buffer).and_then(|()| stream.flush()) {
            self.socket = None;
            // How much of the batch the collector got is unknown: all of it is sent again.
            let error = SinkError::retryable(format!("sending to {}: {e}", self.destination));
            return Err(self.failed(0, error));
        }
        Ok(())
    }

    fn failed(&self, delivered: usize, error: SinkError) -> WriteError {
        // trail logs the error it gets back; this adds where in the write it happened.
        self.host
            .debug(&format!("{error} (after {delivered} delivered)"));
        WriteError::new(delivered as u64, error)
    }
}

/// The first address `address` (`host:port`) resolves to.
fn resolve(address: &str) -> Result<std::net::SocketAddr, String> {
    address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address} resolves to no address"))
}

/// Whether a TCP peer has not closed the connection, without blocking: a collector that went
/// away would otherwise swallow the next batch into a dead socket.
fn peer_still_there(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let alive = match stream.peek(&mut byte) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).is_ok() && alive
}

impl Sink for Syslog {
    fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        if let Err(message) = self.connect() {
            return Err(self.failed(0, SinkError::retryable(message)));
        }
        match &self.socket {
            Some(Socket::Tcp(_)) => self.send_stream(batch),
            _ => self.send_datagrams(batch),
        }
    }

    fn close(&mut self) -> Result<(), SinkError> {
        if let Some(Socket::Tcp(stream)) = self.socket.take() {
            // A clean end of stream for the collector.
            let _ = stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }
}

trail_plugin_api::export_sink!(
    name: "syslog",
    version: env!("CARGO_PKG_VERSION"),
    new: Syslog::new,
);
