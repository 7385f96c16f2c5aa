//! Watching the plugin directory for new and replaced libraries.
//!
//! Owns the `notify` watcher. It watches the directory, not the files (a watch on a file is lost when the file is
//! replaced by a rename), debounces events, and hands changed library paths to a reload thread, which waits for
//! each file to be complete before loading it. `SIGHUP` and `trail reload` do the same work by rescanning, for
//! hosts where inotify is unreliable.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tracing::{debug, error, info};

use super::Sinks;
use super::loader::is_library;

/// The running watcher; dropping it stops watching.
pub struct Watcher {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

/// Starts watching the sinks' plugin directory.
pub fn start(sinks: Arc<Sinks>) -> notify::Result<Watcher> {
    let (tx, rx) = mpsc::channel::<Vec<PathBuf>>();
    let mut debouncer = new_debouncer(
        Duration::from_millis(200),
        None,
        move |result: DebounceEventResult| match result {
            Ok(events) => {
                let paths: BTreeSet<PathBuf> = events
                    .iter()
                    .filter(|e| {
                        matches!(
                            e.kind,
                            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Access(_)
                        )
                    })
                    .flat_map(|e| e.paths.iter())
                    .filter(|p| is_library(p))
                    .cloned()
                    .collect();
                if !paths.is_empty() {
                    let _ = tx.send(paths.into_iter().collect());
                }
            }
            Err(errors) => {
                for e in errors {
                    error!(error = %e, "plugin directory watch error");
                }
            }
        },
    )?;
    debouncer.watch(sinks.dir(), RecursiveMode::NonRecursive)?;
    info!(dir = %sinks.dir().display(), "watching for plugin changes");
    std::thread::Builder::new()
        .name("trail-reload".into())
        .spawn(move || {
            while let Ok(mut paths) = rx.recv() {
                // Coalesce what arrived meanwhile.
                while let Ok(more) = rx.try_recv() {
                    paths.extend(more);
                }
                paths.sort();
                paths.dedup();
                for path in paths {
                    debug!(file = %path.display(), "plugin file changed");
                    sinks.reload_file(&path, true);
                }
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(Watcher {
        _debouncer: debouncer,
    })
}

/// Looks for stuck sinks ([`Sinks::watch_stuck`]) once a second until `done`.
pub async fn watch_stuck(sinks: Arc<Sinks>, done: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tick.tick() => sinks.watch_stuck(),
        }
    }
}
