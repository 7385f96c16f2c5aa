//! The daemon's own log output through `tracing`: level from `RUST_LOG` (default `info`), text or JSON lines on
//! standard error (journald adds its own timestamps, so text output has none when run under systemd).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for hosts that ship logs.
    Json,
}

/// Installs the global subscriber; call once, first thing.
pub fn init(format: Format) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // An unwritable standard error (a full disk, a file-size limit) must not end the daemon: the default reports
        // such errors with `eprintln!`, which panics when standard error cannot be written.
        .log_internal_errors(false);
    match (format, under_systemd) {
        (Format::Json, _) => builder.json().flatten_event(true).init(),
        (Format::Text, true) => builder.without_time().with_ansi(false).init(),
        (Format::Text, false) => builder.init(),
    }
}
