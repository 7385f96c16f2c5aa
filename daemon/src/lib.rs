//! trail: an audit-trail daemon.
//!
//! Programs on the host submit audit events over a Unix socket ([`ingest`], [`protocol`]); each is checked against
//! its event type ([`event_types`]), stamped with who sent it ([`record`]) and written durably to a JSON-lines log
//! ([`journal`]) before it is acknowledged; a repeated `idempotency_key` is answered from [`idempotency`] instead
//! of stored twice. See ARCHITECTURE.md for the map.

pub mod access;
pub mod admin;
pub mod audit;
pub mod client;
pub mod clock;
pub mod config;
pub mod event_types;
pub mod filter;
pub mod framing;
pub mod histogram;
pub mod idempotency;
pub mod ingest;
pub mod journal;
pub mod log;
pub mod metrics;
pub mod modes;
pub mod protocol;
pub mod record;
pub mod reload;
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
    /// The sockets passed by the service manager are unusable.
    #[error(transparent)]
    Inherited(#[from] systemd::InheritError),
    /// The metrics' HTTP listener cannot be bound.
    #[error(
        "metrics.listen: cannot listen on {addr}: {source}; choose another port or stop what listens there"
    )]
    MetricsListen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A signal handler cannot be installed.
    #[error("cannot handle {signal}: {source}")]
    Signal {
        /// The signal.
        signal: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

impl Error {
    /// The process exit code for this error: [`EXIT_CONFIG`] for mistakes in configuration, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::EventTypes(_) | Error::Sinks(_) => EXIT_CONFIG,
            Error::Socket(ingest::BindError::Untrusted { .. }) => EXIT_CONFIG,
            // A socket unit and the configuration disagree.
            Error::Socket(ingest::BindError::Inherited { .. }) | Error::Inherited(_) => EXIT_CONFIG,
            Error::Key(log::checkpoint::KeyError::Format { .. }) => EXIT_CONFIG,
            // Something else at `socket.path` (or `admin_socket`): the configuration names the wrong path.
            Error::Socket(ingest::BindError::NotASocket(_)) => EXIT_CONFIG,
            Error::Log(_)
            | Error::Socket(_)
            | Error::Spool(_)
            | Error::Key(_)
            | Error::MetricsListen { .. }
            | Error::Signal { .. } => 1,
        }
    }
}

/// What [`validate`] found in a valid setup.
#[derive(Debug)]
pub struct Validated {
    /// The loaded event types.
    pub registry: event_types::Registry,
    /// The sinks built and the plugin libraries loaded.
    pub sinks: sinks::validate::Checked,
}

impl Validated {
    /// The event types defined in the configuration's directory (not the daemon's own).
    pub fn own_event_types(&self) -> usize {
        self.registry.len() - self.builtin_event_types()
    }

    /// The daemon's own event types (`trail_*`), built in.
    pub fn builtin_event_types(&self) -> usize {
        self.registry
            .types()
            .iter()
            .filter(|t| event_types::is_daemon_type(&t.name))
            .count()
    }
}

/// Set (to anything) in the environment, the daemon watches neither the plugin directory nor the event-type
/// directory, as on hosts where inotify is unreliable: a testing aid for reloads by SIGHUP and `trail reload`.
pub const NO_WATCH_VAR: &str = "TRAIL_TEST_NO_WATCH";

/// Checks a configuration's event types and sinks (loading the plugin of every sink and building every sink once,
/// each library in a child process: see [`sinks::validate`]) without starting anything.
pub fn validate(config: &Config) -> Result<Validated, Error> {
    let registry = event_types::Registry::load_dir(&config.event_types)?;
    let sinks = sinks::validate::check(config)?;
    Ok(Validated { registry, sinks })
}

/// Runs the daemon until `stop` is cancelled: everything is checked before the socket is bound; on stop, the
/// socket stops accepting, connections answer what they read, sinks finish their current write and save their
/// positions, and the log is synced. Sockets passed by the service manager (socket activation) are used instead of
/// binding; the service manager is told when the daemon is ready, reloading and stopping (see [`systemd`]).
pub async fn run(config: Config, stop: CancellationToken) -> Result<(), Error> {
    let started = Instant::now();
    let service = Arc::new(systemd::Service::new());
    // SIGHUP is handled from the start, whatever the configuration: its default action would end the daemon.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(
        |source| Error::Signal {
            signal: "SIGHUP",
            source,
        },
    )?;
    let inherited = systemd::Inherited::take()?;
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
        // Every plugin is loaded and every sink's first instance built before the spool is opened: a configuration
        // refused there leaves no cursor and no segment behind.
        let (config_for_sinks, auditor) = (config.clone(), auditor.clone());
        let prepared =
            tokio::task::spawn_blocking(move || sinks::Sinks::prepare(&config_for_sinks, auditor))
                .await
                .expect("starting sinks")?;
        let names: Vec<String> = config.sinks.iter().map(|s| s.name.clone()).collect();
        let (mut writer, spool) = spool::open(&config.spool(), &names)?;
        writer.repair(&streamed_types)?;
        let sinks = prepared.start(sink_types, spool.clone());
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
    let progress = Arc::new(journal::Progress::default());
    if let Some(c) = found
        .checkpoint
        .as_ref()
        .and_then(|last| journal::LastCheckpoint::from_line(&last.name, &last.line))
    {
        progress.set_checkpoint(c);
    }
    // The tree cache is checked against the newest signed tree before it is first used, and rebuilt if it does not
    // give it (also when it was lost after retention): beside the start, at the lowest priority.
    let tree = Arc::new(log::tree::Keeper::new(
        &config.log.dir,
        log::tree::Signed::newest(&config.log.dir, &signer.verifying_key()),
    ));
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
            progress: progress.clone(),
            tree: Some(tree.clone()),
        },
    )?;
    {
        let weak = Arc::downgrade(&tree);
        let tree = tree.clone();
        let spawned = std::thread::Builder::new()
            .name("trail-tree".into())
            .spawn(move || {
                journal::lowest_priority();
                if let Err(e) = tree.root_at(None) {
                    warn!(error = %e, "cannot bring the tree cache up to date; checkpoints and retention try again");
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start bringing the tree cache up to date; the first checkpoint does");
        }
        // The records the writer commits are added as they come, at the writer's own priority: one SHA-256 block
        // per record and two per node, which must keep up with any rate the writer reaches.
        let spawned = std::thread::Builder::new()
            .name("trail-tree-follow".into())
            .spawn(move || log::tree::Keeper::follow(weak));
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start adding records to the tree cache as they come; checkpoints read them from the log files");
        }
    }
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
    let (socket_path, admin_path) = (config.socket.path.clone(), config.admin_socket());
    if let Some(warning) = &config.socket.group_warning {
        warn!(socket = %socket_path.display(), "{warning}");
    }
    let socket_group = config.socket.gid;
    let (listener, bound_socket) = match inherited.submission {
        Some(l) => (
            ingest::adopt(l, &socket_path, config.socket.mode, socket_group)?,
            false,
        ),
        None => (
            ingest::bind(&socket_path, config.socket.mode, socket_group)?,
            true,
        ),
    };
    let (admin_listener, bound_admin) = match inherited.admin {
        Some(l) => (ingest::adopt(l, &admin_path, 0o600, None)?, false),
        None => (ingest::bind(&admin_path, 0o600, None)?, true),
    };
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            metrics::http::bind(addr)
                .await
                .map_err(|source| Error::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    let connections = Arc::new(ingest::Connections::new(&config.limits));
    warn_if_few_descriptors(config.limits.max_connections);
    let access = Arc::new(access::Access::new());
    let ctx = Arc::new(ingest::Context {
        rules: std::sync::RwLock::new(Arc::new(ingest::Rules {
            generation: 1,
            access: access::Policy::build(&config, &registry),
            registry: Arc::new(registry),
            streamed_types,
            max_line_bytes: config.limits.max_line_bytes,
            retired: Arc::default(),
        })),
        submitter,
        host: config.host_name.clone().unwrap_or_else(host_name),
        connections: connections.clone(),
        idempotency,
        access: access.clone(),
    });
    record_start(&ctx, &found).await;
    let background = CancellationToken::new();
    let audit_task = tokio::spawn(ingest::record_own_events(
        ctx.clone(),
        audit_rx,
        background.clone(),
    ));
    tokio::spawn(record_denials(
        access.clone(),
        auditor.clone(),
        background.clone(),
    ));
    let policy = Arc::new(std::sync::Mutex::new(retention::Policy::of(&config.log)));
    let retention_report = Arc::new(retention::Report::default());
    let upkeep = {
        let (ctx, source) = (ctx.clone(), ingest::own_source(&ctx));
        tokio::spawn(retention::run(
            retention::Upkeep {
                dir: config.log.dir.clone(),
                policy: policy.clone(),
                spool,
                tree,
                rotated: rotated.clone(),
                report: retention_report.clone(),
            },
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
    let (log_dir, shutdown_grace) = (config.log.dir.clone(), config.shutdown_grace);
    let (fsync, sink_count) = (config.log.fsync, config.sinks.len());
    let reloader = Arc::new(reload::Reloader::new(
        config,
        ctx.clone(),
        sinks.clone(),
        policy,
        rotated,
        auditor.clone(),
        service.clone(),
    ));
    let metrics = Arc::new(metrics::Metrics::new(
        ctx.clone(),
        progress.clone(),
        sinks.clone(),
        reloader.clone(),
        log_dir.clone(),
        retention_report,
        started,
    ));
    tokio::spawn(metrics.clone().sample(background.clone()));
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            info!(address = %addr, "serving metrics over HTTP at /metrics");
        }
        tokio::spawn(metrics::http::serve(
            listener,
            metrics.clone(),
            background.clone(),
        ));
    }
    let admin = Arc::new(admin::Admin {
        access: access.clone(),
        sinks: sinks.clone(),
        reloader: reloader.clone(),
        ctx: ctx.clone(),
        started,
        connections,
        idempotency: ctx.idempotency.clone(),
        metrics,
    });
    tokio::spawn(admin::serve(admin_listener, admin, background.clone()));
    // What `systemctl reload` sends after `traild validate` passed: the configuration, the event types and the
    // plugins are reloaded, between `RELOADING=1` and `READY=1`, whatever the configuration.
    tokio::spawn(shutdown::reload_on_hangup(hup, background.clone(), {
        let reloader = reloader.clone();
        move || {
            info!("SIGHUP: reloading the configuration, the event types and the plugins");
            reloader.reload_all(reload::Who::Signal);
        }
    }));
    let types_watcher = if std::env::var_os(NO_WATCH_VAR).is_some() {
        warn!(
            variable = NO_WATCH_VAR,
            "the event-type directory is not watched (a testing aid); reload with SIGHUP or `trail reload`"
        );
        None
    } else {
        match reload::watch(reloader.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "cannot watch the event-type directory; reload with SIGHUP or `trail reload`");
                None
            }
        }
    };
    let watcher = match &sinks {
        Some(s) => {
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
    info!(socket = %socket_path.display(), admin = %admin_path.display(), log = %log_dir.display(), ?fsync, sinks = sink_count, socket_activated = !bound_socket, "accepting events");
    let rate = Arc::new(std::sync::Mutex::new(0.0));
    service.ready(describe(sinks.clone(), rate.clone()));
    tokio::spawn(report_status(
        service.clone(),
        progress.clone(),
        rate,
        background.clone(),
    ));
    let watchdog = match systemd::watchdog_interval() {
        Some(interval) => {
            let (p, q) = (progress.clone(), progress.clone());
            let writer = systemd::Writer {
                heartbeat: Box::new(move || p.heartbeat.load(Ordering::Relaxed)),
                waiting: Box::new(move || q.waiting.load(Ordering::Relaxed)),
            };
            match systemd::watchdog(service.clone(), interval, writer, background.clone()) {
                Ok(thread) => Some(thread),
                Err(e) => {
                    error!(error = %e, "cannot start the watchdog thread; the service manager will restart the daemon");
                    None
                }
            }
        }
        None => None,
    };
    {
        let (stop, service) = (stop.clone(), service.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            service.stopping();
        });
    }
    let submitter = ctx.submitter.clone();
    ingest::serve(listener, ctx, stop, shutdown_grace).await;
    service.stopping();
    // No client sends any more: the refusals still counted but not recorded are recorded now.
    for denied in access.denials.drain() {
        auditor.submission_denied(&denied);
    }
    // Checkpoints still being written (at the lowest CPU priority, so on a busy machine they may lag) are finished
    // now, while their `trail_checkpoint` events can still be recorded and the sinks still run: one finished
    // after that would be on disk but never streamed. The clone goes at once: it would keep the writer running.
    let finished =
        tokio::task::spawn_blocking(move || submitter.checkpoints_written(CHECKPOINTS_AT_STOP))
            .await
            .unwrap_or(false);
    if !finished {
        warn!(
            waited = ?CHECKPOINTS_AT_STOP,
            "checkpoints still being written at stop; those finished later are on disk but not recorded as trail_checkpoint events"
        );
    }
    // A socket passed by the service manager stays: its socket unit owns it, and clients wait in its backlog.
    if bound_socket {
        let _ = std::fs::remove_file(&socket_path);
    }
    stopping.store(true, Ordering::Relaxed);
    drop(watcher);
    drop(types_watcher);
    if let Some(s) = &sinks {
        let s = s.clone();
        tokio::task::spawn_blocking(move || s.stop())
            .await
            .expect("stopping sinks");
    }
    drop(sinks);
    // The reloader holds the connections' context, whose submitter keeps the log writer running.
    drop(reloader);
    drop(auditor);
    background.cancel();
    let _ = audit_task.await;
    let _ = upkeep.await;
    if bound_admin {
        let _ = std::fs::remove_file(&admin_path);
    }
    if let Some(thread) = watchdog {
        let _ = thread.join();
    }
    tokio::task::spawn_blocking(move || journal.join())
        .await
        .expect("joining the log writer");
    info!("stopped");
    Ok(())
}

/// Hands the refusals that [`access::Denials`] aggregated to the auditor as `trail_submission_denied` records, as
/// each key's interval ends, until `done` (the stop drains what is left).
async fn record_denials(
    access: Arc<access::Access>,
    auditor: audit::Auditor,
    done: CancellationToken,
) {
    let noted = Arc::new(tokio::sync::Notify::new());
    access.denials.on_due({
        let noted = noted.clone();
        move || noted.notify_one()
    });
    loop {
        for denied in access.denials.due(std::time::Instant::now()) {
            auditor.submission_denied(&denied);
        }
        let next = access.denials.next_due();
        tokio::select! {
            _ = done.cancelled() => return,
            _ = noted.notified() => {}
            _ = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// Raises the soft limit on open files to the hard one (systemd's default soft limit, 1024, is below what the
/// default `limits.max_connections` needs) and warns when even that leaves too few for `max_connections`.
pub(crate) fn warn_if_few_descriptors(max_connections: usize) {
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

/// How long the stop waits for checkpoints still being written before it stops the sinks.
const CHECKPOINTS_AT_STOP: std::time::Duration = std::time::Duration::from_secs(30);

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

/// What the status line says while running: accepting, the rate of stored events, each sink's backlog.
fn describe(
    sinks: Option<Arc<sinks::Sinks>>,
    rate: Arc<std::sync::Mutex<f64>>,
) -> Box<dyn Fn() -> String + Send + Sync> {
    Box::new(move || {
        let rate = *rate.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = format!("accepting; {rate:.1} events/s");
        match &sinks {
            None => line.push_str("; no sinks"),
            Some(s) => {
                let each: Vec<String> = s
                    .status()
                    .sinks
                    .iter()
                    .map(|sink| {
                        let stuck = if sink.stuck { " (stuck)" } else { "" };
                        format!("{} backlog {} bytes{stuck}", sink.name, sink.backlog_bytes)
                    })
                    .collect();
                line.push_str(&format!("; sinks: {}", each.join(", ")));
            }
        }
        line
    })
}

/// Refreshes the status line every [`systemd::STATUS_EVERY`], with the rate of stored events since the last one.
async fn report_status(
    service: Arc<systemd::Service>,
    progress: Arc<journal::Progress>,
    rate: Arc<std::sync::Mutex<f64>>,
    done: CancellationToken,
) {
    let mut tick = tokio::time::interval(systemd::STATUS_EVERY);
    tick.tick().await;
    let (mut last, mut last_records) = (Instant::now(), progress.records.load(Ordering::Relaxed));
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tick.tick() => {}
        }
        let records = progress.records.load(Ordering::Relaxed);
        let elapsed = last.elapsed().as_secs_f64().max(0.001);
        *rate.lock().unwrap_or_else(|e| e.into_inner()) = (records - last_records) as f64 / elapsed;
        (last, last_records) = (Instant::now(), records);
        // The sinks' status may wait for a reload in progress: not on a runtime worker.
        let service = service.clone();
        let _ = tokio::task::spawn_blocking(move || service.refresh()).await;
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
