//! `postgres`: a trail sink plugin that writes audit events into a PostgreSQL table, one transaction per batch,
//! and moves a per-host watermark in the same transaction. A batch that follows a batch this instance stored
//! whole (none of its ids can be stored yet) is copied straight into the table; any other (the first of an
//! instance, one after a failed write, or one whose direct copy met an id already stored) goes through a
//! per-connection staging table and `INSERT … ON CONFLICT (id) DO NOTHING`. With `connections` above 1, a
//! batch big enough is split into contiguous parts written at once on several connections, each part its own
//! transaction; the part of the highest seqs moves the watermark, and commits only after every other part has
//! committed. See README.md for the configuration and the tables.
//!
//! This module owns the connections (on a single-threaded tokio runtime of the plugin's own, driven from the
//! sink's thread), the batch's transactions, finding the one row the server refuses, and turning the client's
//! errors into the plugin API's error kinds with messages that say what to do.

mod config;
mod rows;
mod schema;

use std::{collections::HashSet, error::Error as _, ops::Range, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{SinkExt, future};
use tokio::{runtime::Runtime, task::JoinHandle, time::error::Elapsed};
use tokio_postgres::{Client, Statement, Transaction, error::SqlState};
use tokio_postgres_rustls::MakeRustlsConnect;
use trail_plugin_api::{Host, Record, Sink, SinkError, WriteError};

use crate::{
    config::{Settings, TableName},
    rows::Rows,
};

/// Where connection `index` of `all` is, in an error message: empty with one connection, else
/// `connection 2 of 4: `.
fn connection_label(index: usize, all: usize) -> String {
    match all {
        1 => String::new(),
        all => format!("connection {} of {all}: ", index + 1),
    }
}

/// Most bytes of COPY data sent in one message.
const COPY_CHUNK: usize = 256 * 1024;
/// Fewest rows in one part of a batch split over several connections: a smaller batch stays one transaction
/// on one connection (a part's transaction costs a few round trips and a commit, worth it only for many rows).
const MIN_PART: usize = 500;
/// How much of a server's detail line goes into a message.
const DETAIL_EXCERPT: usize = 300;

struct Postgres {
    host: Host,
    settings: Settings,
    /// The plugin's own runtime; taken and shut down in `close`.
    runtime: Option<Runtime>,
    tls: Option<MakeRustlsConnect>,
    /// `connections` slots, each opened when a batch first needs it (the first for every batch, the others for
    /// the parts of a batch big enough to split) and emptied when its connection fails.
    connections: Vec<Option<Connection>>,
    rows: Rows,
    /// The highest seq of the batch this instance stored last, when that write stored the whole batch: a
    /// batch whose seqs are all above it cannot hold an id already stored (trail hands out batches in seq
    /// order and resends only after a failed write or a restart, i.e. a new instance), so it may be copied
    /// straight into the table. `None` at first and after any failed write.
    stored_through: Option<u64>,
}

/// An open session with its prepared statements.
struct Connection {
    client: Client,
    /// Drives the socket; aborted when the connection is dropped.
    task: JoinHandle<()>,
    insert: Statement,
    watermark: Statement,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a batch's rows reach the events table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// COPY straight into the table: only for rows none of whose ids can be there.
    Direct,
    /// COPY into the staging table, then `INSERT … ON CONFLICT (id) DO NOTHING`.
    Staged,
}

/// Why a transaction did not commit.
enum Failure {
    /// A direct copy met an id already stored: the batch must go through the staging table.
    Duplicate,
    /// The server refused the data of some row (a data exception, a constraint, a limit): finding which one is
    /// worth it.
    Row(String),
    /// Anything else: worth trying again later. `lost` when the connection is gone.
    Retry { message: String, lost: bool },
}

impl Failure {
    /// The same failure, a message that is not about a row's data prefixed with where it happened.
    fn within(self, place: &str) -> Self {
        match self {
            Failure::Retry { message, lost } => Failure::Retry {
                message: format!("{place}{message}"),
                lost,
            },
            other => other,
        }
    }
}

impl Postgres {
    fn new(config_json: &str, host: Host) -> Result<Self, SinkError> {
        let settings = Settings::parse(config_json, host.sink_name())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SinkError::retryable(format!("cannot start the plugin's runtime: {e}")))?;
        let tls = settings.roots.as_ref().map(|roots| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default protocol versions")
                .with_root_certificates(Arc::clone(roots))
                .with_no_client_auth();
            MakeRustlsConnect::new(config)
        });
        host.info(&format!(
            "writing to {} into {} (watermarks in {}), {}{}",
            settings.endpoint,
            settings.table,
            settings.watermark_table,
            match settings.client.get_ssl_mode() {
                tokio_postgres::config::SslMode::Disable => "without TLS",
                tokio_postgres::config::SslMode::Prefer => "with TLS when the server offers it",
                _ => "over TLS",
            },
            match (&tls, settings.own_roots) {
                (Some(_), true) => ", trusting only the CAs of ca_file",
                _ => "",
            }
        ));
        Ok(Self {
            host,
            connections: (0..settings.connections).map(|_| None).collect(),
            settings,
            runtime: Some(runtime),
            tls,
            rows: Rows::default(),
            stored_through: None,
        })
    }

    fn runtime(&self) -> &Runtime {
        self.runtime
            .as_ref()
            .expect("the runtime lives until close")
    }

    /// Where a connection's error happened: empty with one connection, else `connection 2 of 4: `.
    fn label(&self, index: usize) -> String {
        connection_label(index, self.settings.connections)
    }

    /// The first `n` rows of `batch` as the contiguous parts written at once, one per connection: as many as
    /// there are connections, but none smaller than [`MIN_PART`] (so a small batch is one part). A batch that
    /// holds an id twice (dead letters replayed twice over) is one part: a part waiting for the last part's
    /// uncommitted row of that id, while the last part waits for it to commit, would stall until `timeout`.
    fn parts(&self, batch: &[Record<'_>], n: usize) -> Vec<Range<usize>> {
        let mut k = self.settings.connections.min(n / MIN_PART).max(1);
        if k > 1 {
            let mut ids = HashSet::with_capacity(n);
            if !batch[..n].iter().all(|r| ids.insert(r.id.as_str())) {
                k = 1;
            }
        }
        (0..k).map(|i| i * n / k..(i + 1) * n / k).collect()
    }

    /// Opens the session of connection `index`: connects, creates the tables when asked and missing, the
    /// staging table, statements.
    fn connect(&mut self, index: usize) -> Result<(), String> {
        let settings = &self.settings;
        let tls = self.tls.clone();
        let endpoint = &settings.endpoint;
        let opened = self.runtime().block_on(async {
            let connecting = async {
                let (client, task) = match tls {
                    Some(tls) => {
                        let (client, connection) = settings.client.connect(tls).await?;
                        (client, tokio::spawn(async move { _ = connection.await }))
                    }
                    None => {
                        let (client, connection) =
                            settings.client.connect(tokio_postgres::NoTls).await?;
                        (client, tokio::spawn(async move { _ = connection.await }))
                    }
                };
                Ok::<_, tokio_postgres::Error>((client, task))
            };
            let (mut client, task) = tokio::time::timeout(settings.timeout, connecting)
                .await
                .map_err(|_| format!("timed out after {:?}", settings.timeout))?
                .map_err(|e| describe(&e, settings))?;
            let prepare = async {
                if settings.create_tables {
                    create_tables(&mut client, settings).await?;
                }
                client.batch_execute(schema::CREATE_STAGING).await?;
                let durability = client.query_one(schema::DURABILITY, &[]).await?;
                let durability: (String, String) = (durability.get(0), durability.get(1));
                let insert = client.prepare(&schema::insert(&settings.table)).await?;
                let watermark = client
                    .prepare(&schema::advance_watermark(&settings.watermark_table))
                    .await?;
                Ok::<_, tokio_postgres::Error>((insert, watermark, durability))
            };
            match tokio::time::timeout(settings.timeout, prepare).await {
                Ok(Ok((insert, watermark, durability))) => Ok((
                    Connection {
                        client,
                        task,
                        insert,
                        watermark,
                    },
                    durability,
                )),
                Ok(Err(e)) => {
                    task.abort();
                    Err(format!("preparing the tables: {}", describe(&e, settings)))
                }
                Err(_) => {
                    task.abort();
                    Err(format!(
                        "preparing the tables: timed out after {:?}",
                        settings.timeout
                    ))
                }
            }
        });
        let label = self.label(index);
        let (connection, (fsync, synchronous_commit)) =
            opened.map_err(|e| format!("{label}connecting to {endpoint}: {e}"))?;
        match self.settings.connections {
            1 => self
                .host
                .info(&format!("connected to {}", self.settings.endpoint)),
            all => self.host.info(&format!(
                "connected to {} (connection {} of {all})",
                self.settings.endpoint,
                index + 1
            )),
        }
        // The same server, user and database for every connection: said once.
        if index > 0 {
            self.connections[index] = Some(connection);
            return Ok(());
        }
        if fsync == "off" {
            self.host.warn(
                "the server runs with fsync off: a committed batch can be lost if its machine fails, after trail confirmed it; turn fsync on for an audit trail",
            );
        }
        if synchronous_commit == "off" {
            self.host.warn(
                "the server (or this user or database) has synchronous_commit off: a committed batch can be lost if the server crashes, after trail confirmed it; set it to on for an audit trail",
            );
        }
        self.connections[index] = Some(connection);
        Ok(())
    }

    /// Runs the transaction of the first `n` encoded rows by `path` on the first connection; commits it when
    /// `commit`, else rolls it back (a trial while looking for a refused row).
    fn transact(&mut self, n: usize, path: Path, commit: bool) -> Result<(), Failure> {
        let Some(connection) = self.connections[0].as_mut() else {
            return Err(Failure::Retry {
                message: "not connected".into(),
                lost: true,
            });
        };
        let settings = &self.settings;
        let rows = &self.rows;
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime lives until close");
        let Connection {
            client,
            insert,
            watermark,
            ..
        } = connection;
        let result = runtime.block_on(async {
            let work = async {
                let transaction = client.transaction().await?;
                copy_rows(&transaction, insert, &settings.table, rows.data(n), path).await?;
                advance(&transaction, watermark, &rows.watermarks(n)).await?;
                if commit {
                    transaction.commit().await
                } else {
                    transaction.rollback().await
                }
            };
            tokio::time::timeout(settings.timeout, work).await
        });
        outcome(result, client, path, settings)
    }

    /// Runs the transactions of `parts` (two or more, from [`parts`](Self::parts)) by `path` at once, part
    /// `i` on connection `i` (all open). Every part but the last commits its rows on its own; the last, which
    /// holds the batch's highest seqs, does its rows, waits for the others, and only when every one of them
    /// committed moves the batch's watermarks and commits, else rolls back: the watermark never names a row
    /// that is not committed. Returns each part's outcome (the last's is `Ok` when it rolled back cleanly
    /// because another part failed).
    fn transact_parts(&mut self, parts: &[Range<usize>], path: Path) -> Vec<Result<(), Failure>> {
        let settings = &self.settings;
        let rows = &self.rows;
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime lives until close");
        let mut open: Vec<&mut Connection> = self.connections[..parts.len()]
            .iter_mut()
            .map(|c| c.as_mut().expect("every part's connection is open"))
            .collect();
        let (Some(last), Some((last_rows, first_parts))) = (open.pop(), parts.split_last()) else {
            unreachable!("a batch in parts has at least two");
        };
        let n = last_rows.end;
        runtime.block_on(async {
            let firsts = future::join_all(open.into_iter().zip(first_parts).map(
                |(connection, part)| async move {
                    let Connection { client, insert, .. } = connection;
                    let work = async {
                        let transaction = client.transaction().await?;
                        let data = rows.part(part.clone());
                        copy_rows(&transaction, insert, &settings.table, data, path).await?;
                        transaction.commit().await
                    };
                    let result = tokio::time::timeout(settings.timeout, work).await;
                    outcome(result, client, path, settings)
                },
            ));
            let Connection {
                client,
                insert,
                watermark,
                ..
            } = last;
            let begin = async {
                let transaction = client.transaction().await?;
                let data = rows.part(last_rows.clone());
                copy_rows(&transaction, insert, &settings.table, data, path).await?;
                Ok::<_, tokio_postgres::Error>(transaction)
            };
            // In a block of its own: what is left of `begun` (which borrows the client) ends with it.
            let (mut results, ended) = {
                let (results, begun) =
                    future::join(firsts, tokio::time::timeout(settings.timeout, begin)).await;
                let ended = match begun {
                    Ok(Ok(transaction)) if results.iter().all(Result::is_ok) => {
                        let finish = async {
                            advance(&transaction, watermark, &rows.watermarks(n)).await?;
                            transaction.commit().await
                        };
                        tokio::time::timeout(settings.timeout, finish).await
                    }
                    // Another part failed: this one's rows and the watermark wait for the batch's retry.
                    Ok(Ok(transaction)) => {
                        tokio::time::timeout(settings.timeout, transaction.rollback()).await
                    }
                    failed => failed.map(|r| r.map(drop)),
                };
                (results, ended)
            };
            let last_result = outcome(ended, client, path, settings);
            results.push(last_result);
            results
        })
    }

    /// Stores the rows of `parts` (two or more) by `path`, each on its own connection, connecting those not
    /// open. Goes again through the staging table when a direct copy met a stored id, and once more when
    /// connections that had been idle turn out to be gone (the server restarted in between). A failure's
    /// message names the part and its connection; a row refused in any part is returned as such. Returns the
    /// path that stored the rows.
    fn store_parts(&mut self, parts: &[Range<usize>], mut path: Path) -> Result<Path, Failure> {
        let k = parts.len();
        let mut may_retry = true;
        loop {
            let reused: Vec<bool> = self.connections[..k].iter().map(Option::is_some).collect();
            for (index, open) in reused.iter().enumerate() {
                if !open {
                    self.connect(index).map_err(|message| Failure::Retry {
                        message,
                        lost: true,
                    })?;
                }
            }
            let results = self.transact_parts(parts, path);
            let failed = results.iter().filter(|r| r.is_err()).count();
            if failed == 0 {
                return Ok(path);
            }
            let (mut refused, mut duplicate, mut retry) = (None, false, None);
            let mut lost_reused_only = true;
            for (index, result) in results.into_iter().enumerate() {
                let place = || {
                    let (first, last) = (parts[index].start, parts[index].end - 1);
                    format!(
                        "part {} of {k} (seqs {} to {}) on {}",
                        index + 1,
                        self.rows.seq(first),
                        self.rows.seq(last),
                        connection_label(index, self.settings.connections)
                    )
                };
                match result {
                    Ok(()) => {}
                    Err(Failure::Row(message)) => {
                        refused.get_or_insert(message);
                    }
                    Err(Failure::Duplicate) => duplicate = true,
                    Err(Failure::Retry { message, lost }) => {
                        if lost {
                            self.connections[index] = None;
                        }
                        lost_reused_only &= lost && reused[index];
                        retry.get_or_insert((format!("{}{message}", place()), lost));
                    }
                }
            }
            if let Some(refusal) = refused {
                return Err(Failure::Row(refusal));
            }
            if let Some((mut message, lost)) = retry {
                if failed > 1 {
                    message.push_str(&format!(" (and {} other parts failed)", failed - 1));
                }
                if !(lost_reused_only && may_retry) {
                    return Err(Failure::Retry { message, lost });
                }
                self.host.info(&format!(
                    "{message}: the connection was lost; connecting again"
                ));
                may_retry = false;
            } else {
                debug_assert!(duplicate && path == Path::Direct);
                self.host.debug(&format!(
                    "batch of {} rows in {k} parts: an id is already stored; through the staging table",
                    parts[k - 1].end
                ));
            }
            // Some parts may have committed: their rows are skipped by the staging table's insert.
            path = Path::Staged;
        }
    }

    /// Stores the first `n` encoded rows by `path` on the first connection, connecting first when needed and
    /// once more if a connection that had been idle turns out to be gone (the server restarted in between).
    fn store(&mut self, n: usize, path: Path) -> Result<(), Failure> {
        let label = self.label(0);
        self.store_on_first(n, path)
            .map_err(|failure| failure.within(&label))
    }

    fn store_on_first(&mut self, n: usize, path: Path) -> Result<(), Failure> {
        let mut reused = self.connections[0].is_some();
        loop {
            if self.connections[0].is_none() {
                self.connect(0).map_err(|message| Failure::Retry {
                    message,
                    lost: true,
                })?;
            }
            match self.transact(n, path, true) {
                Err(Failure::Retry {
                    message,
                    lost: true,
                }) => {
                    self.connections[0] = None;
                    if reused {
                        self.host.info(&format!(
                            "{message}: the connection was lost; connecting again"
                        ));
                        reused = false;
                        continue;
                    }
                    return Err(Failure::Retry {
                        message,
                        lost: true,
                    });
                }
                other => return other,
            }
        }
    }

    /// Stores the batch's `n` encoded rows in one transaction on the first connection: straight into the table
    /// when `fresh` (none of its ids can be stored yet), through the staging table otherwise or when the
    /// direct copy met a stored id.
    fn store_whole(&mut self, n: usize, fresh: bool) -> Result<(), Failure> {
        if !fresh {
            self.host.debug(&format!(
                "batch of {n} rows: through the staging table (the first of this instance, one after a failed write, or one with seqs not above the last stored)"
            ));
            return self.store(n, Path::Staged);
        }
        match self.store(n, Path::Direct) {
            Err(Failure::Duplicate) => {
                self.host.debug(&format!(
                    "batch of {n} rows: an id is already stored; through the staging table"
                ));
                self.store(n, Path::Staged)
            }
            Ok(()) => {
                self.host
                    .debug(&format!("batch of {n} rows: copied into the table"));
                Ok(())
            }
            other => other,
        }
    }

    /// Stores the batch's rows in `parts` (two or more) at once, as [`store_whole`](Self::store_whole) would
    /// choose the path. A row refused in any part sends the whole batch again through the staging table on
    /// the first connection (the parts that committed are skipped by its insert), where it is then found by
    /// [`narrow`](Self::narrow) as with one connection.
    fn store_in_parts(&mut self, parts: &[Range<usize>], fresh: bool) -> Result<(), Failure> {
        let (n, k) = (parts[parts.len() - 1].end, parts.len());
        let path = if fresh {
            Path::Direct
        } else {
            self.host.debug(&format!(
                "batch of {n} rows in {k} parts: through the staging table (the first of this instance, one after a failed write, or one with seqs not above the last stored)"
            ));
            Path::Staged
        };
        match self.store_parts(parts, path) {
            Ok(stored) => {
                if stored == Path::Direct {
                    self.host.debug(&format!(
                        "batch of {n} rows in {k} parts: copied into the table"
                    ));
                }
                Ok(())
            }
            Err(Failure::Row(refusal)) => {
                self.host.debug(&format!(
                    "batch of {n} rows in {k} parts: a row was refused ({refusal}); the batch again on one connection"
                ));
                self.store(n, Path::Staged)
            }
            Err(other) => Err(other),
        }
    }

    /// The first `n` rows were refused together for their content (`refusal`): finds the first row refused
    /// (by trials rolled back, halving the range), stores the rows before it, and reports it.
    fn narrow(&mut self, records: &[Record<'_>], n: usize, refusal: String) -> WriteError {
        // Rows [0, good) pass together; rows [0, bad) are refused, with `refusal`.
        let (mut good, mut bad, mut refusal) = (0, n, refusal);
        while bad - good > 1 {
            let mid = good + (bad - good) / 2;
            match self.transact(mid, Path::Staged, false) {
                Ok(()) => good = mid,
                Err(Failure::Row(message)) => {
                    bad = mid;
                    refusal = message;
                }
                Err(Failure::Retry { message, lost }) => {
                    if lost {
                        self.connections[0] = None;
                    }
                    let message = format!("{}{message}", self.label(0));
                    return self.failed(records, 0, SinkError::retryable(message));
                }
                Err(Failure::Duplicate) => unreachable!("only a direct copy meets duplicates"),
            }
        }
        if good > 0 {
            match self.store(good, Path::Staged) {
                Ok(()) => {}
                Err(Failure::Row(message) | Failure::Retry { message, .. }) => {
                    return self.failed(records, 0, SinkError::retryable(message));
                }
                Err(Failure::Duplicate) => unreachable!("only a direct copy meets duplicates"),
            }
        }
        self.refused(records, good, refusal)
    }

    /// The record at `index` can never be stored: a permanent error naming it.
    fn refused(&self, records: &[Record<'_>], index: usize, reason: String) -> WriteError {
        let record = &records[index];
        let error = SinkError::permanent(format!(
            "{reason} (event seq {}, id {}, type {})",
            record.seq, record.id, record.event_type
        ));
        self.failed(records, index, error)
    }

    fn failed(&self, records: &[Record<'_>], delivered: usize, error: SinkError) -> WriteError {
        // trail logs the error it gets back; this adds where in the write it happened.
        self.host.debug(&format!(
            "{error} (after {delivered} of {} stored)",
            records.len()
        ));
        WriteError::new(delivered as u64, error)
    }
}

/// Sends `data` (rows in COPY text format) by `path` within `transaction`: the COPY, and for the staged path
/// the insert from the staging table.
async fn copy_rows(
    transaction: &Transaction<'_>,
    insert: &Statement,
    table: &TableName,
    data: &[u8],
    path: Path,
) -> Result<(), tokio_postgres::Error> {
    let copy = match path {
        Path::Direct => schema::copy_direct(table),
        Path::Staged => schema::copy(),
    };
    let sink = transaction.copy_in(&copy).await?;
    futures_util::pin_mut!(sink);
    for chunk in data.chunks(COPY_CHUNK) {
        sink.feed(Bytes::copy_from_slice(chunk)).await?;
    }
    sink.as_mut().finish().await?;
    if path == Path::Staged {
        transaction.execute(insert, &[]).await?;
    }
    Ok(())
}

/// Moves each host's watermark (`marks`: host, seq, hash) forward within `transaction`.
async fn advance(
    transaction: &Transaction<'_>,
    watermark: &Statement,
    marks: &[(&str, i64, Option<&str>)],
) -> Result<(), tokio_postgres::Error> {
    for (host, seq, hash) in marks {
        transaction.execute(watermark, &[host, seq, hash]).await?;
    }
    Ok(())
}

/// What a transaction's end (`result`, as its timeout left it) on `client` means.
fn outcome(
    result: Result<Result<(), tokio_postgres::Error>, Elapsed>,
    client: &Client,
    path: Path,
    settings: &Settings,
) -> Result<(), Failure> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            let lost = e.as_db_error().is_none() || client.is_closed();
            let message = describe(&e, settings);
            if path == Path::Direct && e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                Err(Failure::Duplicate)
            } else if is_row_error(&e) {
                Err(Failure::Row(message))
            } else {
                Err(Failure::Retry { message, lost })
            }
        }
        Err(_) => Err(Failure::Retry {
            message: format!(
                "the transaction did not finish within {:?} (\"timeout\")",
                settings.timeout
            ),
            lost: true,
        }),
    }
}

/// Creates what is missing of the two tables (under a lock, so that hosts starting together do not race).
/// Tables that exist are left alone, so a role with only the documented grants works.
async fn create_tables(
    client: &mut Client,
    settings: &Settings,
) -> Result<(), tokio_postgres::Error> {
    let (events, watermarks) = (settings.table.text(), settings.watermark_table.text());
    let exist = client
        .query_one(schema::TABLES_EXIST, &[&events, &watermarks])
        .await?;
    if exist.get::<_, bool>(0) && exist.get::<_, bool>(1) {
        return Ok(());
    }
    let transaction = client.transaction().await?;
    transaction.batch_execute(schema::CREATE_LOCK).await?;
    transaction
        .batch_execute(&schema::create_events(&settings.table))
        .await?;
    transaction
        .batch_execute(&schema::create_watermarks(&settings.watermark_table))
        .await?;
    transaction.commit().await
}

/// Whether the server refused the data itself: a data exception (class 22), an integrity constraint (class
/// 23), or a limit such as an index row too large (54000). Such an error follows the row, not the moment.
fn is_row_error(error: &tokio_postgres::Error) -> bool {
    let Some(code) = error.code() else {
        return false;
    };
    let code = code.code();
    code.starts_with("22")
        || code.starts_with("23")
        || code == SqlState::PROGRAM_LIMIT_EXCEEDED.code()
}

/// A client error as a message that says what to do.
fn describe(error: &tokio_postgres::Error, settings: &Settings) -> String {
    if let Some(db) = error.as_db_error() {
        let mut message = format!(
            "the server said: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            let mut cut: String = detail.chars().take(DETAIL_EXCERPT).collect();
            if cut.len() < detail.len() {
                cut.push('…');
            }
            message.push_str(&format!("; {cut}"));
        }
        let advice = match db.code() {
            c if *c == SqlState::INVALID_PASSWORD => {
                ": check \"user\" and \"password\" (or the url's), and the server's pg_hba.conf"
            }
            c if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
                ": the server's pg_hba.conf does not let this user in from here, or not this way"
            }
            c if *c == SqlState::INVALID_CATALOG_NAME => ": create the database, or fix \"dbname\"",
            c if *c == SqlState::INSUFFICIENT_PRIVILEGE => {
                ": grant the user what README.md lists, or create the tables as their owner"
            }
            c if *c == SqlState::UNDEFINED_TABLE => {
                ": create the tables (README.md has their definitions), or set create_tables: true"
            }
            c if *c == SqlState::TOO_MANY_CONNECTIONS => {
                ": raise the server's max_connections, or lower \"connections\" (each is one of them)"
            }
            _ => "",
        };
        message.push_str(advice);
        return message;
    }
    // Not from the server: the network, TLS, or the connection's end.
    let mut sources = Vec::new();
    let mut source = error.source();
    while let Some(e) = source {
        sources.push(e);
        source = e.source();
    }
    // The client's own message is often only the outer part ("error performing TLS handshake"): add the causes.
    let mut text = error.to_string();
    for e in &sources {
        let cause = e.to_string();
        if !text.contains(&cause) {
            text.push_str(&format!(": {cause}"));
        }
    }
    for e in &sources {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return describe_tls(tls, settings);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return describe_tls(tls, settings);
            }
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return format!(
                    "{text}: is PostgreSQL running there, and listening on that address?"
                );
            }
        }
    }
    if text.contains("server does not support TLS") {
        return format!(
            "{text}: enable ssl on the server, or set sslmode: disable where the network between them is trusted"
        );
    }
    text
}

fn describe_tls(error: &rustls::Error, settings: &Settings) -> String {
    match error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => format!(
            "TLS failed: {error}: the server's certificate is not trusted; give the CA that signed it in \"ca_file\"{}",
            if settings.own_roots {
                " (the one given did not)"
            } else {
                ""
            }
        ),
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "TLS failed: {error}: the server's certificate is not for this host name; connect with a name (or address) the certificate names"
        ),
        _ => format!("TLS failed: {error}"),
    }
}

impl Sink for Postgres {
    fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        let fresh = match (
            self.stored_through.take(),
            batch.iter().map(|r| r.seq).min(),
        ) {
            (Some(through), Some(lowest)) => lowest > through,
            _ => false,
        };
        let unfit = self.rows.encode(batch);
        let n = self.rows.len();
        if n > 0 {
            let parts = self.parts(batch, n);
            let stored = if parts.len() > 1 {
                self.store_in_parts(&parts, fresh)
            } else {
                self.store_whole(n, fresh)
            };
            match stored {
                Ok(()) => {}
                Err(Failure::Row(refusal)) => return Err(self.narrow(batch, n, refusal)),
                Err(Failure::Retry { message, .. }) => {
                    return Err(self.failed(batch, 0, SinkError::retryable(message)));
                }
                Err(Failure::Duplicate) => unreachable!("a staged copy meets no duplicates"),
            }
        }
        match unfit {
            Some((index, reason)) => Err(self.refused(batch, index, reason)),
            None => {
                self.stored_through = batch.iter().map(|r| r.seq).max();
                Ok(())
            }
        }
    }

    fn close(&mut self) -> Result<(), SinkError> {
        self.connections.iter_mut().for_each(|c| *c = None);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
        Ok(())
    }
}

trail_plugin_api::export_sink!(
    name: "postgres",
    version: env!("CARGO_PKG_VERSION"),
    new: Postgres::new,
);
