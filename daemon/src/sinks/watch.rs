//! Watching the plugin directory for new and replaced libraries.
//!
//! Owns the `notify` watcher. It watches the directory, not the files (a watch on a file is lost when the file is
//! replaced by a rename), debounces events, and hands each changed library path to a thread of its own, which
//! waits for that file to be complete before loading it: a file still being written, or a stray file that never
//! becomes a library, is waited for without holding up the others (only loading and swapping go one at a time,
//! in [`Sinks::reload_file`]). A change to a file whose thread is still at work is left to that thread, which
//! looks at the file again when it is done. `SIGHUP` and `trail reload` do the same work by rescanning, for hosts
//! where inotify is unreliable.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
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
            // The files whose thread is at work, each with whether it changed again meanwhile.
            let busy: Arc<Mutex<HashMap<PathBuf, bool>>> = Arc::default();
            while let Ok(paths) = rx.recv() {
                for path in paths {
                    debug!(file = %path.display(), "plugin file changed");
                    reload_on_its_own(&sinks, &busy, path);
                }
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(Watcher {
        _debouncer: debouncer,
    })
}

/// Reloads `path` on a thread of its own, unless one is at work on it already (which then looks again).
fn reload_on_its_own(sinks: &Arc<Sinks>, busy: &Arc<Mutex<HashMap<PathBuf, bool>>>, path: PathBuf) {
    let lock = || busy.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(again) = lock().get_mut(&path) {
        *again = true;
        return;
    }
    lock().insert(path.clone(), false);
    let (sinks, busy_here, file) = (sinks.clone(), busy.clone(), path.clone());
    let spawned = std::thread::Builder::new()
        .name("trail-reload-file".into())
        .spawn(move || {
            let lock = || busy_here.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                sinks.reload_file(&file, true);
                let mut busy = lock();
                match busy.get_mut(&file) {
                    Some(again) if *again => *again = false,
                    _ => {
                        busy.remove(&file);
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        error!(file = %path.display(), error = %e, "cannot start a thread to reload a plugin file; reload with SIGHUP or `trail reload`");
        lock().remove(&path);
    }
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
