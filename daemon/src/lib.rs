//! trail: an audit-trail daemon.
//!
//! Programs on the host submit audit events over a Unix socket ([`ingest`], [`protocol`]); each is checked against
//! its event type ([`event_types`]), stamped with who sent it ([`record`]) and written durably to a JSON-lines log
//! ([`journal`]) before it is acknowledged; a repeated `idempotency_key` is answered from [`idempotency`] instead
//! of stored twice. See ARCHITECTURE.md for the map.

pub mod admin;
pub mod audit;
pub mod client;
pub mod clock;
pub mod config;
pub mod event_types;
pub mod filter;
pub mod framing;
pub mod idempotency;
pub mod ingest;
pub mod journal;
pub mod log;
pub mod modes;
pub mod protocol;
pub mod record;
pub mod retention;
pub mod shutdown;
pub mod sinks;
pub mod spool;
pub mod systemd;
pub mod telemetry;
pub mod tools;
/// Whether a socket path can be trusted (from `trail-client`, which makes the same checks before it connects).
pub use trail_client::trust;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use config::Config;

/// Exit code for an unusable configuration or event-type set (sysexits' `EX_CONFIG`).
pub const EXIT_CONFIG: i32 = 78;

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file is unusable.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// The event-type set is invalid.
    #[error(transparent)]
    EventTypes(#[from] event_types::Problems),
    /// The log cannot be opened.
    #[error(transparent)]
    Log(#[from] log::recovery::Error),
    /// The socket cannot be bound.
    #[error(transparent)]
    Socket(#[from] ingest::BindError),
    /// The sinks cannot be set up.
    #[error(transparent)]
    Sinks(#[from] sinks::Error),
    /// The spool cannot be opened.
    #[error(transparent)]
    Spool(#[from] spool::Error),
    /// The checkpoint signing key cannot be loaded or created.
    #[error(transparent)]
    Key(#[from] log::checkpoint::KeyError),
}

impl Error {
    /// The process exit code for this error: [`EXIT_CONFIG`] for mistakes in configuration, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::EventTypes(_) | Error::Sinks(_) => EXIT_CONFIG,
            Error::Socket(ingest::BindError::Untrusted { .. }) => EXIT_CONFIG,
            Error::Key(log::checkpoint::KeyError::Format { .. }) => EXIT_CONFIG,
            // Something else at `socket.path` (or `admin_socket`): the configuration names the wrong path.
            Error::Socket(ingest::BindError::NotASocket(_)) => EXIT_CONFIG,
            Error::Log(_) | Error::Socket(_) | Error::Spool(_) | Error::Key(_) => 1,
        }
    }
}

/// What [`validate`] found in a valid setup.
#[derive(Debug)]
pub struct Validated {
    /// The loaded event types.
    pub registry: event_types::Registry,
}

/// Set (to anything) in the environment, the daemon does not watch the plugin directory, as on hosts where
/// inotify is unreliable: a testing aid for reloads by SIGHUP and `trail reload`.
pub const NO_WATCH_VAR: &str = "TRAIL_TEST_NO_WATCH";

/// Checks a configuration's event types and sinks (loading the plugin of every sink and building every sink once,
/// each library in a child process: see [`sinks::validate`]) without starting anything.
pub fn validate(config: &Config) -> Result<Validated, Error> {
    let registry = event_types::Registry::load_dir(&config.event_types)?;
    sinks::validate::check(config)?;
    Ok(Validated { registry })
}

/// Runs the daemon until `stop` is cancelled: everything is checked before the socket is bound; on stop, the
/// socket stops accepting, connections answer what they read, sinks finish their current write and save their
/// positions, and the log is synced.
pub async fn run(config: Config, stop: CancellationToken) -> Result<(), Error> {
    let started = Instant::now();
    modes::set_group(config.files.gid);
    let registry = event_types::Registry::load_dir(&config.event_types)?;
    info!(count = registry.len(), dir = %config.event_types.display(), "event types loaded");
    let sink_types = sinks::routes(&config.sinks, &registry);
    let streamed_types: HashSet<String> = sink_types.iter().flatten().cloned().collect();
    let (auditor, audit_rx) = audit::Auditor::new();
    let stopping = Arc::new(AtomicBool::new(false));
    let (spool_writer, spool, sinks) = if config.sinks.is_empty() {
        (None, None, None)
    } else {
        let names: Vec<String> = config.sinks.iter().map(|s| s.name.clone()).collect();
        let (mut writer, spool) = spool::open(&config.spool(), &names)?;
        writer.repair(&streamed_types)?;
        let (config_for_sinks, auditor, for_sinks) =
            (config.clone(), auditor.clone(), spool.clone());
        let sinks = tokio::task::spawn_blocking(move || {
            sinks::Sinks::start(&config_for_sinks, sink_types, for_sinks, auditor)
        })
        .await
        .expect("starting sinks")?;
        (Some(writer), Some(spool), Some(Arc::new(sinks)))
    };
    if clock::is_shifted() {
        warn!(
            variable = clock::OFFSET_VAR,
            "the daemon's clock is shifted (a testing aid); record times and file names are not the real time"
        );
    }
    let signer = log::checkpoint::Signer::load_or_generate(&config.log.signing_key())?;
    info!(
        public_key = %signer.public_path.display(),
        key = %signer.public_hex(),
        generated = signer.generated,
        "checkpoints are signed; check the log with `trail verify LOG_DIR --key PUBLIC_KEY`"
    );
    let found = log::start::inspect(&config.log.dir, &signer.verifying_key());
    let rotated = Arc::new(tokio::sync::Notify::new());
    let (journal, submitter) = journal::Journal::start(
        &config.log.dir,
        journal::Options {
            fsync: config.log.fsync,
            spool: spool_writer,
            stopping: stopping.clone(),
            rotate: config.log.rotate,
            max_file_bytes: config.log.max_file_bytes,
            signer: Some(Arc::new(signer)),
            checkpoint_every: config.log.checkpoint_every,
            rotated: Some(rotated.clone()),
            checkpointed: Some({
                let auditor = auditor.clone();
                Arc::new(
                    move |path: &std::path::Path, line: &[u8], note: Option<&[u8]>| {
                        auditor.checkpoint(path, line, note)
                    },
                )
            }),
        },
    )?;
    let idempotency = Arc::new(idempotency::Window::new(
        config.idempotency.window,
        config.idempotency.max_keys,
    ));
    match idempotency.rebuild(&config.log.dir, clock::now()) {
        Ok(r) => {
            info!(files = r.files, bytes = r.bytes, records = r.records, keys = r.keys, elapsed = ?r.elapsed, "idempotency window rebuilt from the log")
        }
        Err(e) => warn!(error = %e, "idempotency window rebuilt in part"),
    }
    let listener = ingest::bind(&config.socket.path, config.socket.mode)?;
    let admin_path = config.admin_socket();
    let admin_listener = ingest::bind(&admin_path, 0o600)?;
    let event_type_count = registry.len();
    let connections = Arc::new(ingest::Connections::new(&config.limits));
    warn_if_few_descriptors(config.limits.max_connections);
    let ctx = Arc::new(ingest::Context {
        registry: Arc::new(registry),
        submitter,
        host: config.host_name.clone().unwrap_or_else(host_name),
        max_line_bytes: config.limits.max_line_bytes,
        streamed_types,
        connections: connections.clone(),
        idempotency,
    });
    record_start(&ctx, &found).await;
    let background = CancellationToken::new();
    let audit_task = tokio::spawn(ingest::record_own_events(
        ctx.clone(),
        audit_rx,
        background.clone(),
    ));
    let upkeep = {
        let (ctx, source) = (ctx.clone(), ingest::own_source(&ctx));
        tokio::spawn(retention::run(
            config.log.dir.clone(),
            retention::Policy::of(&config.log),
            spool,
            rotated,
            background.clone(),
            move |line| {
                let (ctx, source) = (ctx.clone(), source.clone());
                async move {
                    ingest::record_own(&ctx, &line, &source)
                        .await
                        .map_err(|r| r.message)
                }
            },
        ))
    };
    let admin = Arc::new(admin::Admin {
        sinks: sinks.clone(),
        event_types: event_type_count,
        started,
        connections,
        idempotency: ctx.idempotency.clone(),
    });
    tokio::spawn(admin::serve(admin_listener, admin, background.clone()));
    let watcher = match &sinks {
        Some(s) => {
            let for_hup = s.clone();
            tokio::spawn(shutdown::reload_on_hangup(background.clone(), move || {
                let _ = for_hup.reload_all();
            }));
            tokio::spawn(sinks::watch::watch_stuck(s.clone(), background.clone()));
            if std::env::var_os(NO_WATCH_VAR).is_some() {
                warn!(
                    variable = NO_WATCH_VAR,
                    "the plugin directory is not watched (a testing aid); reload with SIGHUP or `trail reload`"
                );
                None
            } else {
                match sinks::watch::start(s.clone()) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        warn!(error = %e, "cannot watch the plugin directory; reload with SIGHUP or `trail reload`");
                        None
                    }
                }
            }
        }
        None => None,
    };
    info!(socket = %config.socket.path.display(), admin = %admin_path.display(), log = %config.log.dir.display(), fsync = ?config.log.fsync, sinks = config.sinks.len(), "accepting events");
    systemd::notify("READY=1");
    ingest::serve(listener, ctx, stop, config.shutdown_grace).await;
    systemd::notify("STOPPING=1");
    let _ = std::fs::remove_file(&config.socket.path);
    stopping.store(true, Ordering::Relaxed);
    drop(watcher);
    if let Some(s) = &sinks {
        let s = s.clone();
        tokio::task::spawn_blocking(move || s.stop())
            .await
            .expect("stopping sinks");
    }
    drop(sinks);
    drop(auditor);
    background.cancel();
    let _ = audit_task.await;
    let _ = upkeep.await;
    let _ = std::fs::remove_file(&admin_path);
    tokio::task::spawn_blocking(move || journal.join())
        .await
        .expect("joining the log writer");
    info!("stopped");
    Ok(())
}

/// Raises the soft limit on open files to the hard one (systemd's default soft limit, 1024, is below what the
/// default `limits.max_connections` needs) and warns when even that leaves too few for `max_connections`.
fn warn_if_few_descriptors(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    // Besides one per connection: the log, the spool, sinks' files, the runtime's own and some to spare.
    let needed = max_connections as u64 + 64;
    if soft < needed {
        warn!(
            open_files = soft,
            max_connections,
            "the open-file limit is below what limits.max_connections needs; clients beyond it wait in the \
             socket's backlog: raise LimitNOFILE or lower limits.max_connections"
        );
    }
}

/// Records `trail_started` (before anything else is recorded: nothing else is submitted yet) and, when records
/// follow the last stop checkpoint, logs them and records `trail_log_tampered`; the daemon continues either way.
async fn record_start(ctx: &ingest::Context, found: &log::start::Found) {
    let source = ingest::own_source(ctx);
    let mut lines = vec![audit::started_request(found)];
    // The checkpoint at stop could not be streamed then (the sinks had stopped): it is now.
    if let Some(last) = found.checkpoint.as_ref().filter(|c| c.reason == "stop")
        && let Some(line) = audit::checkpoint_request(
            std::path::Path::new(&last.name),
            &last.line,
            last.note.as_deref(),
        )
    {
        lines.push(line);
    }
    if let (Some(last), Some(foreign)) = (&found.checkpoint, &found.foreign) {
        error!(checkpoint = %last.name, file = %foreign.file, first_seq = foreign.first_seq, last_seq = foreign.last_seq,
            records = foreign.records, "records follow the last stop checkpoint and no start of the daemon wrote them: the log was changed while the daemon was not running");
        lines.push(audit::tampered_request(last, foreign));
    }
    for line in lines {
        if let Err(r) = ingest::record_own(ctx, &line, &source).await {
            error!(error = %r.message, event = %String::from_utf8_lossy(&line), "cannot record the daemon's own audit event");
        }
    }
}

/// The kernel's host name, or `localhost` when it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
