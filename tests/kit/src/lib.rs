//! trail's own harness for its integration tests (`tests/`) and benchmarks (`benches/`): the one
//! place that starts the real daemon and loads it.
//!
//! - [`daemon`]: a temp dir, a configuration, the real `traild` started on it, waiting for its
//!   socket, stopping it with `SIGTERM` and checking a clean exit, reading what it logged;
//! - [`load`]: the pipelined load client (many connections, a window of unanswered requests per
//!   connection, at full speed or paced, with the latency of every answer);
//! - building plugin libraries with a nested `cargo build`: [`Build`], from the plugin test kit
//!   (`trail-plugin-testkit`), which also drives a plugin without the daemon.
//!
//! The kit takes the daemon's binary as a path (the caller has `env!("CARGO_BIN_EXE_traild")`)
//! and does not depend on the daemon's library.

pub mod daemon;
pub mod load;

pub use daemon::{Daemon, Setup, install_plugin, repo_event_types, wait_exit, wait_until};
pub use trail_plugin_testkit::{Build, Profile, library_file_name};

use std::path::Path;

/// The root of trail's workspace.
pub fn workspace() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}
