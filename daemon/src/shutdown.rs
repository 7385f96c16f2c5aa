//! Turning SIGTERM and SIGINT into an orderly stop, and SIGHUP into a reload.
//!
//! Owns signal handling only: the first SIGTERM or SIGINT cancels the token that every task watches; what
//! stopping means is up to each task (the socket stops accepting, connections answer what they read, the journal
//! syncs). Each SIGHUP runs the reload it is given (the sinks rescan the plugin directory).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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

/// Runs `reload` (on a blocking thread, one at a time) on every SIGHUP until `done`.
pub async fn reload_on_hangup(done: CancellationToken, reload: impl Fn() + Clone + Send + 'static) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot handle SIGHUP; use `trail reload`");
        return;
    };
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = hup.recv() => {
                info!("SIGHUP: rescanning the plugin directory");
                let _ = tokio::task::spawn_blocking(reload.clone()).await;
            }
        }
    }
}
