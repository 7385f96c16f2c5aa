//! An async client on tokio (feature `tokio`): the same operations as [`crate::Client`].
//!
//! ```no_run
//! # async fn run() -> Result<(), trail_client::Error> {
//! use trail_client::Event;
//! let mut client = trail_client::tokio::Client::connect(&trail_client::default_socket()).await?;
//! let ack = client.submit(&Event::new("user_logout").actor("u-42")).await?;
//! # Ok(()) }
//! ```
//!
//! The socket checks ([`crate::trust`]) look at a few directory entries with blocking calls before connecting.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::{Ack, Error, Event, Owners, Retry, answer, trust};

/// One connection to the submission socket; reconnects when it broke.
pub struct Client {
    socket: PathBuf,
    owners: Owners,
    retry: Option<Retry>,
    conn: Option<(BufReader<OwnedReadHalf>, OwnedWriteHalf)>,
}

impl Client {
    /// Connects to the daemon's socket, trusting [`crate::default_owners`].
    pub async fn connect(socket: &Path) -> Result<Client, Error> {
        Client::connect_trusting(socket, &crate::default_owners()?).await
    }

    /// Connects to the daemon's socket, trusting `owners` (see [`crate::connect`]).
    pub async fn connect_trusting(socket: &Path, owners: &Owners) -> Result<Client, Error> {
        let mut client = Client {
            socket: socket.to_owned(),
            owners: owners.clone(),
            retry: None,
            conn: None,
        };
        client.connection().await?;
        Ok(client)
    }

    /// Retries retryable refusals and broken connections with this policy (see [`Retry`]).
    pub fn with_retry(mut self, retry: Retry) -> Client {
        self.retry = Some(retry);
        self
    }

    async fn connection(
        &mut self,
    ) -> Result<&mut (BufReader<OwnedReadHalf>, OwnedWriteHalf), Error> {
        if self.conn.is_none() {
            let checked =
                trust::check_socket(&self.socket, &self.owners).map_err(Error::from_untrusted)?;
            let stream = UnixStream::connect(&checked)
                .await
                .map_err(|source| self.broken(source))?;
            trust::check_peer(&stream, &self.socket, &self.owners).map_err(Error::Untrusted)?;
            let (read, write) = stream.into_split();
            self.conn = Some((BufReader::new(read), write));
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    fn broken(&self, source: std::io::Error) -> Error {
        Error::Unreachable {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Submits one event (see [`crate::Client::submit`]).
    pub async fn submit(&mut self, event: &Event) -> Result<Ack, Error> {
        self.submit_many(std::slice::from_ref(event))
            .await?
            .pop()
            .expect("one result per event")
    }

    /// Submits `events` pipelined, one result per event (see [`crate::Client::submit_many`]).
    pub async fn submit_many(
        &mut self,
        events: &[Event],
    ) -> Result<Vec<Result<Ack, Error>>, Error> {
        let Some(retry) = self.retry.clone() else {
            return self.attempt(&events.iter().collect::<Vec<_>>()).await;
        };
        let keyed: Vec<Event> = events.iter().map(|e| e.clone().with_key()).collect();
        let mut plan = retry.start(keyed.len());
        loop {
            let batch: Vec<&Event> = plan.pending().iter().map(|&i| &keyed[i]).collect();
            let results = self.attempt(&batch).await?;
            match plan.record(results) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Ok(plan.finish()),
            }
        }
    }

    async fn attempt(&mut self, batch: &[&Event]) -> Result<Vec<Result<Ack, Error>>, Error> {
        let mut lines = Vec::with_capacity(batch.len() * 256);
        for event in batch {
            event.write_line(&mut lines);
        }
        let (mut results, failure, written) = {
            let (reader, writer) = match self.connection().await {
                Ok(conn) => conn,
                Err(e @ (Error::Untrusted(_) | Error::Owner(_))) => return Err(e),
                Err(e) => return Ok(batch.iter().map(|_| Err(e.duplicate())).collect()),
            };
            // Written while the answers are read: the daemon stops reading a connection whose answers are not taken.
            // A failed write (the daemon answered too_many_connections and closed) is found out by the reads.
            let write = async {
                writer.write_all(&lines).await?;
                writer.flush().await
            };
            let read = async {
                let mut results = Vec::with_capacity(batch.len());
                let mut line = String::new();
                let mut failure = None;
                while results.len() < batch.len() {
                    line.clear();
                    match reader.read_line(&mut line).await {
                        Ok(0) => break,
                        Ok(_) if answer::take(&mut results, &line) => break,
                        Ok(_) => {}
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                (results, failure)
            };
            // The reads decide: once every answer is in (or the daemon closed), an unfinished write is dropped.
            tokio::pin!(write, read);
            let mut written = None;
            let (results, failure) = loop {
                tokio::select! {
                    w = &mut write, if written.is_none() => written = Some(w),
                    out = &mut read => break out,
                }
            };
            (results, failure, written.unwrap_or(Ok(())))
        };
        if results.len() < batch.len() {
            self.conn = None;
            let lost = answer::lost(&results, || {
                self.broken(answer::eof_or(failure.or(written.err())))
            });
            results.resize_with(batch.len(), || Err(lost.duplicate()));
        }
        Ok(results)
    }
}
