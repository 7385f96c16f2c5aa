//! trail: an audit-trail daemon.
//!
//! Programs on the host submit audit events over a Unix socket ([`ingest`], [`protocol`]); each is checked against
//! its event type ([`event_types`]), stamped with who sent it ([`record`]) and written durably to a JSON-lines log
//! ([`journal`]) before it is acknowledged. See ARCHITECTURE.md for the map.

pub mod client;
pub mod config;
pub mod event_types;
pub mod framing;
pub mod ingest;
pub mod journal;
pub mod protocol;
pub mod record;
pub mod shutdown;
pub mod systemd;
pub mod telemetry;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

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
    Log(#[from] journal::Error),
    /// The socket cannot be bound.
    #[error(transparent)]
    Socket(#[from] ingest::BindError),
}

impl Error {
    /// The process exit code for this error: [`EXIT_CONFIG`] for mistakes in configuration, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::EventTypes(_) => EXIT_CONFIG,
            Error::Log(_) | Error::Socket(_) => 1,
        }
    }
}

/// What [`validate`] found in a valid setup.
#[derive(Debug)]
pub struct Validated {
    /// The loaded event types.
    pub registry: event_types::Registry,
}

/// Checks a configuration's event types without starting anything.
pub fn validate(config: &Config) -> Result<Validated, Error> {
    let registry = event_types::Registry::load_dir(&config.event_types)?;
    Ok(Validated { registry })
}

/// Runs the daemon until `stop` is cancelled: everything is checked before the socket is bound; on stop, the
/// socket stops accepting, connections answer what they read, and the log is synced.
pub async fn run(config: Config, stop: CancellationToken) -> Result<(), Error> {
    let Validated { registry } = validate(&config)?;
    info!(count = registry.len(), dir = %config.event_types.display(), "event types loaded");
    let (journal, submitter) = journal::Journal::start(&config.log.dir, config.log.fsync)?;
    let listener = ingest::bind(&config.socket.path, config.socket.mode)?;
    let ctx = Arc::new(ingest::Context {
        registry: Arc::new(registry),
        submitter,
        host: config.host_name.clone().unwrap_or_else(host_name),
        max_line_bytes: config.limits.max_line_bytes,
    });
    info!(socket = %config.socket.path.display(), log = %config.log.dir.display(), fsync = ?config.log.fsync, "accepting events");
    systemd::notify("READY=1");
    ingest::serve(listener, ctx, stop, config.shutdown_grace).await;
    systemd::notify("STOPPING=1");
    let _ = std::fs::remove_file(&config.socket.path);
    tokio::task::spawn_blocking(move || journal.join())
        .await
        .expect("joining the log writer");
    info!("stopped");
    Ok(())
}

/// The kernel's host name, or `localhost` when it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
