//! Turning SIGTERM and SIGINT into an orderly stop.
//!
//! Owns signal handling only: the first signal cancels the token that every task watches; what stopping means is
//! up to each task (the socket stops accepting, connections answer what they read, the journal syncs).

use tokio::signal::unix::{SignalKind, signal};
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
