//! Sinks: streamed events delivered to plugin instances, each sink on its own thread, with hot reload.
//!
//! Owns the plugin table (which build of which plugin serves which sinks, and its generation), the workers, and
//! the reload procedure shared by start-up, the directory watcher, `SIGHUP` and `trail reload`: build the new
//! generation completely (load the library, construct an instance for every sink that uses it, each on its own
//! thread), then swap; if anything fails, the old generation keeps running and the failure is logged and audited.
//! Plugin code never runs on the async runtime's threads.

pub mod loader;
pub mod trust;
pub mod validate;
pub mod watch;
pub mod worker;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tracing::{error, info, warn};

use crate::audit::Auditor;
use crate::config::{Config, SinkConfig};
use crate::event_types::Registry;
use crate::filter::Filter;
use crate::spool::Spool;
use loader::{FileStamp, Loader, Plugin};
use worker::{Control, ReplayReport, Status, Worker};

/// How long a reload waits for a sink's worker to build its new instance.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);

/// Sinks that could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) with sinks:{}", .0.len(), .0.iter().map(|p| format!("\n  {p}")).collect::<String>())]
pub struct Error(pub Vec<String>);

/// The event types each sink receives, from the sinks' filters and the registry.
pub fn routes(sinks: &[SinkConfig], registry: &Registry) -> Vec<HashSet<String>> {
    sinks
        .iter()
        .map(|s| {
            let filter =
                Filter::new(&s.events).expect("filters are checked with the configuration");
            registry
                .types()
                .into_iter()
                .filter(|t| t.streamed && filter.matches(t))
                .map(|t| t.name.clone())
                .collect()
        })
        .collect()
}

struct Loaded {
    plugin: Arc<Plugin>,
    generation: u64,
}

#[derive(Default)]
struct Table {
    plugins: HashMap<String, Loaded>,
    /// The stamp of each installed file when it was last looked at, loaded or not.
    seen: HashMap<PathBuf, FileStamp>,
}

struct Handle {
    config: SinkConfig,
    control: mpsc::Sender<Control>,
    status: Arc<Status>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stuck: AtomicBool,
}

/// The running sinks.
pub struct Sinks {
    dir: PathBuf,
    loader: Loader,
    table: Mutex<Table>,
    handles: Vec<Handle>,
    spool: Spool,
    audit: Auditor,
}

/// Picks, without loading anything, the library of every plugin in `wanted`: the one file in `dir` known by the
/// plugin's name (see [`loader::identify`]). Returns the files by plugin name and the problems found.
pub(crate) fn pick(dir: &Path, wanted: &HashSet<&str>) -> (HashMap<String, PathBuf>, Vec<String>) {
    let mut picked = HashMap::new();
    let mut problems = Vec::new();
    let files = match loader::installed(dir) {
        Ok(f) => f,
        Err(e) => {
            problems.push(format!("plugins_dir {}: {e}", dir.display()));
            return (picked, problems);
        }
    };
    let mut by_name: HashMap<String, Vec<PathBuf>> = HashMap::new();
    let mut unreadable = Vec::new();
    for file in files {
        let id = loader::identify(&file);
        if let Some(e) = &id.unreadable {
            unreadable.push(format!("{}: {e}", file.display()));
        }
        by_name.entry(id.name).or_default().push(file);
    }
    let mut names: Vec<&str> = wanted.iter().copied().collect();
    names.sort_unstable();
    for name in names {
        match by_name.get(name).map(Vec::as_slice) {
            Some([file]) => {
                picked.insert(name.to_owned(), file.clone());
            }
            Some(files) if files.len() > 1 => problems.push(format!(
                "plugin {name:?} is declared by {}; remove all but one",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" and ")
            )),
            _ => {
                let mut p = format!(
                    "no library in {} declares the plugin {name:?}",
                    dir.display()
                );
                for u in &unreadable {
                    p.push_str(&format!("; {u}"));
                }
                problems.push(p);
            }
        }
    }
    (picked, problems)
}

/// Loads the library of every plugin in `wanted` (and no other); returns the plugins by name and the problems.
fn load_all(
    loader: &Loader,
    dir: &Path,
    wanted: &HashSet<&str>,
    audit: &Auditor,
) -> (HashMap<String, Arc<Plugin>>, Vec<String>) {
    let (picked, mut problems) = pick(dir, wanted);
    let mut plugins = HashMap::new();
    for (name, file) in picked {
        match loader.load(&file, &name) {
            Ok(p) => {
                info!(plugin = %p.describe(), file = %file.display(), "plugin loaded");
                plugins.insert(name, Arc::new(p));
            }
            Err(e) => {
                if e.refused {
                    audit.plugin_refused(&e.file, Some(&name), &e.reason);
                }
                problems.push(e.to_string());
            }
        }
    }
    (plugins, problems)
}

impl Sinks {
    /// Loads the plugins, builds an instance for every sink on the sink's own thread, and starts delivering.
    /// `types` are the event types each sink receives (see [`routes`]), in the order of `config.sinks`.
    pub fn start(
        config: &Config,
        types: Vec<HashSet<String>>,
        spool: Spool,
        audit: Auditor,
    ) -> Result<Sinks, Error> {
        let dir = config
            .plugins_dir
            .clone()
            .expect("checked with the configuration");
        let spool_dir = config.spool().dir;
        let copies = spool_dir.join("plugin-copies");
        let loader =
            Loader::new(&copies).map_err(|e| Error(vec![format!("{}: {e}", copies.display())]))?;
        let wanted: HashSet<&str> = config.sinks.iter().map(|s| s.plugin.as_str()).collect();
        let (plugins, problems) = load_all(&loader, &dir, &wanted, &audit);
        if !problems.is_empty() {
            return Err(Error(problems));
        }
        let mut handles = Vec::new();
        let mut starting = Vec::new();
        for (sink, types) in config.sinks.iter().zip(types) {
            let plugin = plugins[&sink.plugin].clone();
            let (control, control_rx) = mpsc::channel();
            let status = Arc::new(Status::default());
            {
                let mut d = status.detail.lock().unwrap_or_else(|p| p.into_inner());
                d.plugin = plugin.describe();
                d.file = plugin.file.clone();
            }
            let worker = Worker {
                config: sink.clone(),
                reader: spool.reader(&sink.name).wanting(types),
                plugin: plugin.clone(),
                control: control_rx,
                status: status.clone(),
                audit: audit.clone(),
                dead_dir: spool_dir.join("dead"),
            };
            let (ready_tx, ready_rx) = mpsc::channel();
            let name = sink.name.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sink-{name}"))
                .spawn(move || {
                    let config_json = worker::config_json(&worker.config);
                    match worker.plugin.instantiate(&worker.config.name, &config_json) {
                        Ok(instance) => {
                            let _ = ready_tx.send(Ok(()));
                            worker.run(instance);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                        }
                    }
                })
                .map_err(|e| Error(vec![format!("sink {name:?}: cannot start its thread: {e}")]))?;
            starting.push((sink.name.clone(), sink.plugin.clone(), ready_rx));
            handles.push(Handle {
                config: sink.clone(),
                control,
                status,
                thread: Mutex::new(Some(thread)),
                stuck: AtomicBool::new(false),
            });
        }
        let mut problems = Vec::new();
        for (name, plugin, ready) in starting {
            match ready.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => problems.push(format!(
                    "sink {name:?}: plugin {plugin:?} rejected its config: {e}"
                )),
                Err(_) => problems.push(format!("sink {name:?}: its thread ended while starting")),
            }
        }
        let mut table = Table::default();
        for (name, plugin) in plugins {
            table.seen.insert(plugin.file.clone(), plugin.stamp);
            table.plugins.insert(
                name,
                Loaded {
                    plugin,
                    generation: 1,
                },
            );
        }
        let sinks = Sinks {
            dir,
            loader,
            table: Mutex::new(table),
            handles,
            spool,
            audit,
        };
        if !problems.is_empty() {
            sinks.stop();
            return Err(Error(problems));
        }
        for loaded in sinks.lock().plugins.values() {
            sinks
                .audit
                .plugin_loaded(&loaded.plugin, 1, &sinks.users(&loaded.plugin.name));
        }
        Ok(sinks)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The directory watched for plugin libraries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn users(&self, plugin: &str) -> Vec<String> {
        self.handles
            .iter()
            .filter(|h| h.config.plugin == plugin)
            .map(|h| h.config.name.clone())
            .collect()
    }

    /// Looks at every library in the plugin directory and reloads those that changed since they were last seen.
    pub fn reload_all(&self) -> Vec<Value> {
        let files = match loader::installed(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                error!(dir = %self.dir.display(), error = %e, "cannot list the plugin directory");
                return vec![json!({"error": format!("cannot list {}: {e}", self.dir.display())})];
            }
        };
        files
            .iter()
            .filter_map(|f| self.reload_file(f, false))
            .collect()
    }

    /// Loads the library at `file` if it changed since it was last seen, and swaps it in for every sink that uses
    /// its plugin. With `settle`, first waits until the file stops changing (it may still be being written).
    /// Returns what happened, or `None` when the file is unchanged or gone.
    pub fn reload_file(&self, file: &Path, settle: bool) -> Option<Value> {
        let mut table = self.lock();
        let mut stamp = FileStamp::of(file).ok()?;
        if table.seen.get(file) == Some(&stamp) {
            return None;
        }
        let started = Instant::now();
        if settle {
            stamp = match wait_until_complete(file) {
                Ok(s) => s,
                Err(reason) => {
                    warn!(file = %file.display(), "{reason}");
                    return None;
                }
            };
            if table.seen.get(file) == Some(&stamp) {
                return None;
            }
        }
        table.seen.insert(file.to_owned(), stamp);
        let name = loader::identify(file).name;
        if !self.handles.iter().any(|h| h.config.plugin == name) {
            info!(file = %file.display(), plugin = %name, "plugin library changed, but no sink uses its plugin: not loaded");
            return None;
        }
        let plugin = match self.loader.load(file, &name) {
            Ok(p) => Arc::new(p),
            Err(e) if e.refused => {
                error!("{e}; not loaded, the running builds are kept");
                self.audit.plugin_refused(file, Some(&name), &e.reason);
                // Looked at again on the next change or rescan, e.g. once a directory's mode is fixed.
                table.seen.remove(file);
                return Some(
                    json!({"file": file, "plugin": name, "ok": false, "refused": true, "error": e.to_string()}),
                );
            }
            Err(e) => {
                error!("{e}; the running builds are kept");
                self.audit.plugin_failed(file, Some(&name), &e.reason);
                return Some(
                    json!({"file": file, "plugin": name, "ok": false, "error": e.to_string()}),
                );
            }
        };
        let users: Vec<&Handle> = self
            .handles
            .iter()
            .filter(|h| h.config.plugin == plugin.name)
            .collect();
        let generation = table
            .plugins
            .get(&plugin.name)
            .map_or(1, |l| l.generation + 1);
        // Phase one: every sink builds its new instance on its own thread.
        let replies: Vec<_> = users
            .iter()
            .map(|h| {
                let (tx, rx) = mpsc::channel();
                let sent = h.control.send(Control::Prepare {
                    plugin: plugin.clone(),
                    reply: tx,
                });
                (h, sent.is_ok().then_some(rx))
            })
            .collect();
        let mut problems = Vec::new();
        for (h, rx) in &replies {
            let answer = match rx {
                Some(rx) => rx.recv_timeout(PREPARE_TIMEOUT).unwrap_or_else(|_| {
                    Err(format!(
                        "did not answer within {PREPARE_TIMEOUT:?} (busy in a write?)"
                    ))
                }),
                None => Err("its worker has stopped".into()),
            };
            if let Err(e) = answer {
                problems.push(format!("sink {:?}: {e}", h.config.name));
            }
        }
        let sinks: Vec<String> = users.iter().map(|h| h.config.name.clone()).collect();
        if !problems.is_empty() {
            for h in &users {
                let _ = h.control.send(Control::Abort);
            }
            let reason = problems.join("; ");
            error!(plugin = %plugin.describe(), file = %file.display(), "new build rejected, the running one is kept: {reason}");
            self.audit.plugin_failed(file, Some(&plugin.name), &reason);
            return Some(
                json!({"file": file, "plugin": plugin.name, "ok": false, "error": reason}),
            );
        }
        // Phase two: swap.
        for h in &users {
            let _ = h.control.send(Control::Commit);
        }
        info!(plugin = %plugin.describe(), generation, sinks = ?sinks, elapsed = ?started.elapsed(), "plugin reloaded");
        self.audit.plugin_loaded(&plugin, generation, &sinks);
        table.plugins.insert(
            plugin.name.clone(),
            Loaded {
                plugin: plugin.clone(),
                generation,
            },
        );
        Some(
            json!({"file": file, "plugin": plugin.name, "version": plugin.version, "generation": generation, "sinks": sinks, "ok": true}),
        )
    }

    /// Sends a sink's dead letters again.
    pub fn replay(&self, sink: &str) -> Result<ReplayReport, String> {
        let handle = self
            .handles
            .iter()
            .find(|h| h.config.name == sink)
            .ok_or_else(|| format!("no sink is called {sink:?}"))?;
        let (tx, rx) = mpsc::channel();
        handle
            .control
            .send(Control::Replay { reply: tx })
            .map_err(|_| format!("sink {sink:?} has stopped"))?;
        rx.recv()
            .map_err(|_| format!("sink {sink:?} stopped during the replay"))
    }

    /// Logs sinks that became stuck (undelivered events, no progress for `stuck_after`) or recovered.
    pub fn watch_stuck(&self) {
        let (head, cursors) = self.spool.positions();
        for h in &self.handles {
            let stuck = self.is_stuck(h, head, &cursors);
            if stuck != h.stuck.swap(stuck, Ordering::Relaxed) {
                if stuck {
                    warn!(sink = %h.config.name, stuck_after = ?h.config.stuck_after, "sink is stuck: events are waiting and none was delivered");
                } else {
                    info!(sink = %h.config.name, "sink is delivering again");
                }
            }
        }
    }

    fn is_stuck(&self, h: &Handle, head: u64, cursors: &HashMap<String, u64>) -> bool {
        let waiting = cursors.get(&h.config.name).is_some_and(|&c| c < head);
        let since =
            worker::now_ms().saturating_sub(h.status.last_progress_ms.load(Ordering::Relaxed));
        waiting && Duration::from_millis(since) > h.config.stuck_after
    }

    /// Everything `trail status` shows about sinks and plugins.
    pub fn status(&self) -> Value {
        let (head, cursors) = self.spool.positions();
        let table = self.lock();
        let sinks: Vec<Value> = self
            .handles
            .iter()
            .map(|h| {
                let s = &h.status;
                let detail = s.detail.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let pos = cursors.get(&h.config.name).copied().unwrap_or(head);
                json!({
                    "name": h.config.name,
                    "plugin": h.config.plugin,
                    "serving": detail.plugin,
                    "file": detail.file,
                    "generation": table.plugins.get(&h.config.plugin).map(|l| l.generation),
                    "delivered": s.delivered.load(Ordering::Relaxed),
                    "dead_lettered": s.dead_lettered.load(Ordering::Relaxed),
                    "dropped": s.dropped.load(Ordering::Relaxed),
                    "retries": s.retries.load(Ordering::Relaxed),
                    "panics": s.panics.load(Ordering::Relaxed),
                    "swaps": s.swaps.load(Ordering::Relaxed),
                    "backlog_bytes": head.saturating_sub(pos),
                    "stuck": self.is_stuck(h, head, &cursors),
                    "last_error": detail.last_error,
                })
            })
            .collect();
        let mut plugins: Vec<Value> = table
            .plugins
            .values()
            .map(|l| {
                json!({
                    "name": l.plugin.name, "version": l.plugin.version, "api_version": l.plugin.api_version,
                    "file": l.plugin.file, "generation": l.generation,
                })
            })
            .collect();
        plugins.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        json!({
            "sinks": sinks,
            "plugins": plugins,
            // abi_stable never unloads a library: every build loaded since start stays mapped.
            "libraries_mapped": self.loader.libraries(),
            "spool": {"head": head, "backlog_bytes": self.spool.backlog()},
        })
    }

    /// Stops every worker (each finishes its current write, flushes, closes and saves its position) and waits.
    pub fn stop(&self) {
        for h in &self.handles {
            let _ = h.control.send(Control::Stop);
        }
        for h in &self.handles {
            let thread = h.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(t) = thread
                && t.join().is_err()
            {
                error!(sink = %h.config.name, "the sink's thread panicked");
            }
        }
    }
}

/// Waits until `file` has stopped changing and holds a complete shared library: a debounced change event can
/// arrive in the middle of a slow write. A file that stays unchanged but incomplete is handed on after a while, so
/// that loading it fails with a clear reason (and is audited) instead of being ignored.
fn wait_until_complete(file: &Path) -> Result<FileStamp, String> {
    const STEADY: Duration = Duration::from_millis(250);
    const STEADY_BUT_INCOMPLETE: Duration = Duration::from_secs(2);
    const GIVE_UP: Duration = Duration::from_secs(120);
    let started = Instant::now();
    let mut last = FileStamp::of(file).map_err(|e| format!("plugin {}: {e}", file.display()))?;
    let mut steady_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = FileStamp::of(file).map_err(|e| format!("plugin {}: {e}", file.display()))?;
        if now != last {
            last = now;
            steady_since = Instant::now();
        } else if steady_since.elapsed() >= STEADY
            && (steady_since.elapsed() >= STEADY_BUT_INCOMPLETE
                || loader::check_complete(file).is_ok())
        {
            return Ok(now);
        }
        if started.elapsed() > GIVE_UP {
            return Err(format!(
                "plugin {} kept changing for {GIVE_UP:?}; not loading it",
                file.display()
            ));
        }
    }
}
