//! Turning SIGTERM and SIGINT into an orderly stop, and SIGHUP into a reload.
//!
//! Owns signal handling only: the first SIGTERM or SIGINT cancels the token that every task watches; what
//! stopping means is up to each task (the socket stops accepting, connections answer what they read, the journal
//! syncs). Each SIGHUP runs the reload it is given (the sinks rescan the plugin directory).

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Cancels `token` on the first SIGTERM or SIGINT.
pub fn on_signals(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "shutting down");
        token.cancel();
    });
    Ok(())
}

/// Runs `reload` (on a blocking thread, one at a time) on every SIGHUP `hup` receives until `done`. The handler
/// is installed by the caller as early as it can be, since SIGHUP's default action would end the daemon.
pub async fn reload_on_hangup(
    mut hup: Signal,
    done: CancellationToken,
    reload: impl Fn() + Clone + Send + 'static,
) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = hup.recv() => {
                let _ = tokio::task::spawn_blocking(reload.clone()).await;
            }
        }
    }
}
