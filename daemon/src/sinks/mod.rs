//! Sinks: streamed events delivered to plugin instances, each sink on its own thread, with hot reload.
//!
//! Owns the plugin table (which build of which plugin serves which sinks, and its generation) and the workers.
//! Start-up, the directory watcher, `SIGHUP` and `trail reload` go through one procedure ([`generation`]): build
//! every instance of the new generation (start-up's old generation is empty), each on its sink's own thread, then
//! swap; if anything fails, the old generation keeps running (at start-up, nothing starts) and the failure is
//! logged and audited. A configuration reload ([`Sinks::reconfigure`]) goes through the same procedure: it adds
//! sinks, gives changed sinks an instance of their new configuration, and stops removed ones after the swap.
//! Plugin code never runs on the async runtime's threads. What it reports (status, what a
//! reload did, problems) are typed values; the admin socket turns them into its answers.
//!
//! Start-up is in two steps so that a refused configuration leaves nothing behind: [`Sinks::prepare`] loads the
//! plugins and builds every sink's first instance before the spool is opened (no cursor, no segment exists yet),
//! and [`Prepared::start`] hands each worker its reader of the opened spool. A failed load or reload of an
//! installed file is kept per plugin ([`LoadFailure`], in the status) until a later load of that file succeeds.

pub mod dead_letter;
pub mod generation;
pub mod loader;
pub mod trust;
pub mod validate;
pub mod watch;
pub mod worker;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{error, info, warn};

use crate::audit::Auditor;
use crate::config::{Config, SinkConfig};
use crate::event_types::Registry;
use crate::filter::Filter;
use crate::spool::{Spool, Wants};
use dead_letter::DeadLetters;
use generation::{InstanceError, InstanceProblem, Plan, Step};
use loader::{FileStamp, LoadError, Loader, Plugin};
use worker::{Control, ReplayReport, Status, Worker};

/// Sinks that could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) with sinks:{}", .0.len(), .0.iter().map(|p| format!("\n  {p}")).collect::<String>())]
pub struct Error(pub Vec<Problem>);

/// One reason why sinks could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// `plugins_dir` could not be listed.
    #[error("plugins_dir {}: {source}", dir.display())]
    Unlisted {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// More than one library declares a plugin that a sink uses.
    #[error("plugin {name:?} is declared by {}; remove all but one", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(" and "))]
    Ambiguous {
        /// The plugin's name.
        name: String,
        /// The libraries that declare it.
        files: Vec<PathBuf>,
    },
    /// No library declares a plugin that a sink uses.
    #[error("no library in {} declares the plugin {name:?}{}", dir.display(), unreadable.iter().map(|(f, e)| format!("; {}: {e}", f.display())).collect::<String>())]
    Missing {
        /// `plugins_dir`.
        dir: PathBuf,
        /// The plugin's name.
        name: String,
        /// The libraries whose name symbol could not be read, and why.
        unreadable: Vec<(PathBuf, String)>,
    },
    /// A library could not be loaded.
    #[error("{0}")]
    Load(LoadError),
    /// The private directory of library copies could not be made.
    #[error("{}: {source}", dir.display())]
    Copies {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A sink's thread could not be started.
    #[error("sink {sink:?}: cannot start its thread: {source}")]
    Thread {
        /// The sink.
        sink: String,
        /// Why.
        source: std::io::Error,
    },
    /// A sink's first instance could not be built.
    #[error("{}", first_instance(.0))]
    Instance(InstanceProblem),
    /// `validate`'s process checking a library could not check it (see [`validate`]).
    #[error("{0}")]
    Check(validate::CheckError),
    /// A problem that `validate`'s checking process reported, as it worded it.
    #[error("{0}")]
    Reported(String),
}

/// A first instance's problem: a refused configuration names the plugin, since nothing around it does.
fn first_instance(p: &InstanceProblem) -> String {
    match &p.error {
        InstanceError::Rejected(e) => format!(
            "sink {:?}: plugin {:?} rejected its config: {e}",
            p.sink, p.plugin
        ),
        _ => p.to_string(),
    }
}

/// Why a reload kept the running builds.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The plugin directory could not be listed.
    #[error("cannot list {}: {source}", dir.display())]
    Unlisted {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The new library could not be loaded (or was refused: [`LoadError::refused`]).
    #[error("{0}")]
    Load(LoadError),
    /// Some sink could not build an instance of the new build.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Rejected(Vec<InstanceProblem>),
}

/// Why a replay did not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No sink has that name.
    #[error("no sink is called {0:?}")]
    NoSuchSink(String),
    /// The sink's worker has ended.
    #[error("sink {0:?} has stopped")]
    Stopped(String),
    /// The sink's worker ended before it answered.
    #[error("sink {0:?} stopped during the replay")]
    StoppedDuring(String),
}

/// What a reload did with one changed library.
#[derive(Debug)]
pub struct Reload {
    /// The installed library.
    pub file: PathBuf,
    /// The plugin it declares.
    pub plugin: String,
    /// The new build serving, or why the running builds are kept.
    pub result: Result<Swapped, ReloadError>,
}

/// A new build that serves its plugin's sinks.
#[derive(Debug, Clone, Serialize)]
pub struct Swapped {
    /// The build's own version.
    pub version: String,
    /// The plugin's generation it now is.
    pub generation: u64,
    /// The sinks it serves.
    pub sinks: Vec<String>,
}

/// Everything `trail status` shows about sinks and plugins.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Every sink, in the configuration's order.
    pub sinks: Vec<SinkReport>,
    /// Every loaded plugin's serving build, by name.
    pub plugins: Vec<PluginReport>,
    /// Libraries loaded since start: abi_stable never unloads one, so every build stays mapped.
    pub libraries_mapped: u64,
    /// The spool's positions.
    pub spool: SpoolReport,
}

/// One sink in [`Report`].
#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    /// The sink's name.
    pub name: String,
    /// The plugin it is configured with.
    pub plugin: String,
    /// `name version (api X.Y)` of the build serving it.
    pub serving: String,
    /// That build's installed file.
    pub file: PathBuf,
    /// The plugin's generation.
    pub generation: Option<u64>,
    /// Records delivered.
    pub delivered: u64,
    /// Records sent to the dead-letter file.
    pub dead_lettered: u64,
    /// Records skipped because the spool was full.
    pub dropped: u64,
    /// Failed writes that were retried.
    pub retries: u64,
    /// Panics caught in the plugin.
    pub panics: u64,
    /// Instances swapped in by reloads.
    pub swaps: u64,
    /// Spool bytes after the sink's cursor.
    pub backlog_bytes: u64,
    /// Spool records after the sink's cursor (of every streamed type, also those its filter passes over).
    pub backlog_events: u64,
    /// Seconds since the first of them was received; `None` when there is none.
    pub oldest_undelivered_age_secs: Option<f64>,
    /// One of [`SINK_STATES`]: `stuck` (see `stuck`), else `retrying` (the last write failed: `last_error`), else
    /// `delivering` (records after its position), else `idle`.
    pub state: &'static str,
    /// Events are waiting and none was delivered for `stuck_after`.
    pub stuck: bool,
    /// The last error, if the sink has not delivered since.
    pub last_error: Option<String>,
}

/// The states of [`SinkReport::state`].
pub const SINK_STATES: &[&str] = &["idle", "delivering", "retrying", "stuck"];

/// A sink's state from its report's other fields (see [`SinkReport::state`]).
fn state(stuck: bool, last_error: Option<&String>, backlog_events: u64) -> &'static str {
    if stuck {
        "stuck"
    } else if last_error.is_some() {
        "retrying"
    } else if backlog_events > 0 {
        "delivering"
    } else {
        "idle"
    }
}

/// One plugin in [`Report`].
#[derive(Debug, Clone, Serialize)]
pub struct PluginReport {
    /// The plugin's name.
    pub name: String,
    /// The serving build's own version.
    pub version: String,
    /// The plugin API version it was built against.
    pub api_version: String,
    /// Its installed file.
    pub file: PathBuf,
    /// Its generation (1 at start, one more with each reload).
    pub generation: u64,
    /// The last failed load of one of its files, until a later load of that file succeeds.
    pub last_failure: Option<LoadFailure>,
}

/// A load of an installed library that failed (or a new build whose instances could not be built); the running
/// build kept serving.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFailure {
    /// The installed library.
    pub file: PathBuf,
    /// Why it was not swapped in.
    pub reason: String,
    /// When (RFC 3339, UTC).
    pub at: String,
}

impl LoadFailure {
    fn now(file: &Path, reason: String) -> LoadFailure {
        let at = chrono::DateTime::<chrono::Utc>::from(crate::clock::now())
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        LoadFailure {
            file: file.to_owned(),
            reason,
            at,
        }
    }
}

/// The spool in [`Report`].
#[derive(Debug, Clone, Serialize)]
pub struct SpoolReport {
    /// The spool's end.
    pub head: u64,
    /// Bytes not yet confirmed by every sink.
    pub backlog_bytes: u64,
}

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
    /// The last failed load of each installed file, with the plugin it was for, until a load of it succeeds.
    failures: HashMap<PathBuf, (String, LoadFailure)>,
}

/// A running sink: its worker's thread and what it shares with it.
struct Handle {
    config: SinkConfig,
    /// The event types its reader delivers (a reload changes them).
    wants: Arc<Wants>,
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
    /// In the configuration's order; a reload adds and removes sinks (locked after `table`).
    handles: RwLock<Vec<Handle>>,
    spool: Spool,
    spool_dir: PathBuf,
    audit: Auditor,
}

/// What a configuration reload did to the sinks ([`Sinks::reconfigure`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Reconfigured {
    /// Sinks started (they receive events from the swap on).
    pub added: Vec<String>,
    /// Sinks whose configuration or filter changed: a new instance from the new configuration, same cursor.
    pub changed: Vec<String>,
    /// Sinks stopped, their cursors released.
    pub removed: Vec<String>,
}

/// What a configuration reload leaves for [`Sinks::settle`]: the sinks' new event types, to narrow to, and the
/// removed sinks, which go on delivering until then.
#[derive(Debug, Default)]
#[must_use = "the sinks want the types of both generations until settled"]
pub struct Narrowing {
    /// Each remaining sink with the event types of the new generation.
    wants: Vec<(String, HashSet<String>)>,
    /// Sinks the reload removed.
    removed: Vec<String>,
}

/// How long a removed sink may go on delivering what was accepted for it before its worker stops.
pub const REMOVED_DRAIN: Duration = Duration::from_secs(10);

/// Starts the worker of `sink`, which waits for its first instance and then for its reader of the spool
/// ([`start_reading`]); `wants` are the event types it will deliver.
fn spawn_worker(
    sink: &SinkConfig,
    wants: Arc<Wants>,
    plugin: Arc<Plugin>,
    spool_dir: &Path,
    audit: &Auditor,
) -> Result<Handle, Problem> {
    let (control, control_rx) = mpsc::channel();
    let status = Arc::new(Status::default());
    let worker = Worker {
        config: sink.clone(),
        plugin,
        control: control_rx,
        status: status.clone(),
        audit: audit.clone(),
        dead: DeadLetters::new(spool_dir.join("dead"), &sink.name),
    };
    let thread = std::thread::Builder::new()
        .name(format!("sink-{}", sink.name))
        .spawn(move || worker.run())
        .map_err(|source| Problem::Thread {
            sink: sink.name.clone(),
            source,
        })?;
    Ok(Handle {
        config: sink.clone(),
        wants,
        control,
        status,
        thread: Mutex::new(Some(thread)),
        stuck: AtomicBool::new(false),
    })
}

/// Tells a worker to stop and waits for its thread.
fn stop_worker(h: &Handle) {
    stop_workers(std::slice::from_ref(h));
}

/// The first generation's swap for a worker whose first instance is built: its reader of `spool` (from its
/// cursor, delivering what its `wants` say), and delivery starts.
fn start_reading(h: &Handle, spool: &Spool) {
    let reader = Box::new(spool.reader(&h.config.name).wanting_shared(h.wants.clone()));
    let _ = h.control.send(Control::Start { reader });
}

/// Picks, without loading anything, the library of every plugin in `wanted`: the one file in `dir` known by the
/// plugin's name (see [`loader::identify`]). Returns the files by plugin name and the problems found.
pub(crate) fn pick(dir: &Path, wanted: &HashSet<&str>) -> (HashMap<String, PathBuf>, Vec<Problem>) {
    let mut picked = HashMap::new();
    let mut problems = Vec::new();
    let files = match loader::installed(dir) {
        Ok(f) => f,
        Err(source) => {
            problems.push(Problem::Unlisted {
                dir: dir.to_owned(),
                source,
            });
            return (picked, problems);
        }
    };
    let mut by_name: HashMap<String, Vec<PathBuf>> = HashMap::new();
    let mut unreadable = Vec::new();
    for file in files {
        let id = loader::identify(&file);
        if let Some(e) = id.unreadable {
            unreadable.push((file.clone(), e));
        }
        by_name.entry(id.name).or_default().push(file);
    }
    let mut names: Vec<&str> = wanted.iter().copied().collect();
    names.sort_unstable();
    for name in names {
        match by_name.remove(name) {
            Some(mut files) if files.len() == 1 => {
                picked.insert(name.to_owned(), files.remove(0));
            }
            Some(files) if files.len() > 1 => problems.push(Problem::Ambiguous {
                name: name.to_owned(),
                files,
            }),
            _ => problems.push(Problem::Missing {
                dir: dir.to_owned(),
                name: name.to_owned(),
                unreadable: unreadable.clone(),
            }),
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
) -> (HashMap<String, Arc<Plugin>>, Vec<Problem>) {
    let (picked, mut problems) = pick(dir, wanted);
    let mut plugins = HashMap::new();
    for (name, file) in picked {
        match loader.load(&file, &name) {
            Ok(p) => {
                info!(plugin = %p.describe(), file = %file.display(), "plugin loaded");
                plugins.insert(name, Arc::new(p));
            }
            Err(e) => {
                if e.refused() {
                    audit.plugin_refused(&e.file, Some(&name), &e.reason());
                }
                problems.push(Problem::Load(e));
            }
        }
    }
    (plugins, problems)
}

/// Sinks whose plugins are loaded and whose first instances are built, waiting for the spool: see
/// [`Sinks::prepare`]. Dropped without [`start`](Prepared::start), it stops the workers (each closes the instance
/// it built) and removes the directories it made.
pub struct Prepared {
    dir: PathBuf,
    loader: Option<Loader>,
    plugins: HashMap<String, Arc<Plugin>>,
    handles: Vec<Handle>,
    audit: Auditor,
    spool_dir: PathBuf,
    /// The spool's directory and those above it that did not exist before, deepest last.
    created: Vec<PathBuf>,
    started: bool,
}

impl Prepared {
    /// Swaps the first generation in: every worker starts delivering from its cursor in `spool`, getting the
    /// event types in `types` (see [`routes`]; in the order of the configuration's sinks).
    pub fn start(mut self, types: Vec<HashSet<String>>, spool: Spool) -> Sinks {
        self.started = true;
        let handles = std::mem::take(&mut self.handles);
        for (h, types) in handles.iter().zip(types) {
            h.wants.set(types);
            start_reading(h, &spool);
        }
        let mut table = Table::default();
        for (name, plugin) in std::mem::take(&mut self.plugins) {
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
            dir: std::mem::take(&mut self.dir),
            loader: self.loader.take().expect("made by prepare"),
            table: Mutex::new(table),
            handles: RwLock::new(handles),
            spool,
            spool_dir: std::mem::take(&mut self.spool_dir),
            audit: self.audit.clone(),
        };
        for loaded in sinks.lock().plugins.values() {
            sinks
                .audit
                .plugin_loaded(loaded.plugin.build(), 1, &sinks.users(&loaded.plugin.name));
        }
        sinks
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if self.started {
            return;
        }
        stop_workers(&self.handles);
        // The loader's directory of copies first (the mappings outlive the files), then what was made for it.
        drop(self.loader.take());
        let _ = std::fs::remove_dir_all(self.spool_dir.join("plugin-copies"));
        for dir in self.created.iter().rev() {
            // Only if empty: whatever else is there is not ours to remove.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `dir` and those of its ancestors that do not exist, outermost first.
fn missing_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err())
        .map(Path::to_owned)
        .collect();
    missing.reverse();
    missing
}

/// Tells every worker to stop (each finishes its current write, flushes, closes and saves its position) and waits.
fn stop_workers(handles: &[Handle]) {
    for h in handles {
        let _ = h.control.send(Control::Stop);
    }
    for h in handles {
        let thread = h.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            error!(sink = %h.config.name, "the sink's thread panicked");
        }
    }
}

impl Sinks {
    /// [`prepare`](Self::prepare) and [`start`](Prepared::start) in one: for callers whose spool is open already.
    pub fn start(
        config: &Config,
        types: Vec<HashSet<String>>,
        spool: Spool,
        audit: Auditor,
    ) -> Result<Sinks, Error> {
        Ok(Sinks::prepare(config, audit)?.start(types, spool))
    }

    /// Loads the plugins, starts a worker for every sink and builds the first generation (an instance for every
    /// sink, each on the sink's own thread), without touching the spool: nothing is delivered until
    /// [`Prepared::start`]. When anything fails, the workers are stopped and the directories made for the
    /// libraries' private copies (in the spool's directory) are removed again.
    pub fn prepare(config: &Config, audit: Auditor) -> Result<Prepared, Error> {
        let dir = config
            .plugins_dir
            .clone()
            .expect("checked with the configuration");
        let spool_dir = config.spool().dir;
        let copies = spool_dir.join("plugin-copies");
        let copies_problem = |source| {
            Error(vec![Problem::Copies {
                dir: copies.clone(),
                source,
            }])
        };
        let created = missing_dirs(&spool_dir);
        crate::modes::create_dir_all(&spool_dir).map_err(copies_problem)?;
        let mut prepared = Prepared {
            dir,
            loader: None,
            plugins: HashMap::new(),
            handles: Vec::new(),
            audit,
            spool_dir,
            created,
            started: false,
        };
        prepared.loader = Some(Loader::new(&copies).map_err(copies_problem)?);
        let wanted: HashSet<&str> = config.sinks.iter().map(|s| s.plugin.as_str()).collect();
        let loader = prepared.loader.as_ref().expect("made above");
        let (plugins, problems) = load_all(loader, &prepared.dir, &wanted, &prepared.audit);
        prepared.plugins = plugins;
        if !problems.is_empty() {
            return Err(Error(problems));
        }
        for sink in &config.sinks {
            let plugin = prepared.plugins[&sink.plugin].clone();
            // What it delivers is given with the spool, in `Prepared::start`.
            let wants = Wants::new(HashSet::new());
            let handle = spawn_worker(sink, wants, plugin, &prepared.spool_dir, &prepared.audit)
                .map_err(|problem| Error(vec![problem]))?;
            prepared.handles.push(handle);
        }
        let plan = Plan::first(&prepared.handles, &prepared.plugins);
        if let Err(problems) = generation::build(&prepared.handles, &plan) {
            return Err(Error(problems.into_iter().map(Problem::Instance).collect()));
        }
        Ok(prepared)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> RwLockReadGuard<'_, Vec<Handle>> {
        self.handles.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The directory watched for plugin libraries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn users(&self, plugin: &str) -> Vec<String> {
        self.handles()
            .iter()
            .filter(|h| h.config.plugin == plugin)
            .map(|h| h.config.name.clone())
            .collect()
    }

    /// Looks at every library in the plugin directory and reloads those that changed since they were last seen.
    pub fn reload_all(&self) -> Result<Vec<Reload>, ReloadError> {
        let files = loader::installed(&self.dir).map_err(|source| {
            error!(dir = %self.dir.display(), error = %source, "cannot list the plugin directory");
            ReloadError::Unlisted {
                dir: self.dir.clone(),
                source,
            }
        })?;
        Ok(files
            .iter()
            .filter_map(|f| self.reload_file(f, false))
            .collect())
    }

    /// Loads the library at `file` if it changed since it was last seen, and swaps it in for every sink that uses
    /// its plugin (a new generation of those sinks; see [`generation`]). With `settle`, first waits until the file
    /// stops changing (it may still be being written); that wait holds no lock, so files settle side by side and
    /// only loading and swapping go one at a time. Returns what happened, or `None` when the file is unchanged or
    /// gone. A failure is kept for the status until a later load of the same file succeeds.
    pub fn reload_file(&self, file: &Path, settle: bool) -> Option<Reload> {
        let mut stamp = FileStamp::of(file).ok()?;
        if self.lock().seen.get(file) == Some(&stamp) {
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
        }
        let mut table = self.lock();
        if table.seen.get(file) == Some(&stamp) {
            return None;
        }
        table.seen.insert(file.to_owned(), stamp);
        let name = loader::identify(file).name;
        let handles = self.handles();
        if !handles.iter().any(|h| h.config.plugin == name) {
            info!(file = %file.display(), plugin = %name, "plugin library changed, but no sink uses its plugin: not loaded");
            return None;
        }
        let kept = |table: &mut Table, plugin: String, error: ReloadError| {
            let failure = LoadFailure::now(file, error.to_string());
            table
                .failures
                .insert(file.to_owned(), (plugin.clone(), failure));
            Some(Reload {
                file: file.to_owned(),
                plugin,
                result: Err(error),
            })
        };
        let plugin = match self.loader.load(file, &name) {
            Ok(p) => Arc::new(p),
            Err(e) if e.refused() => {
                error!("{e}; not loaded, the running builds are kept");
                self.audit.plugin_refused(file, Some(&name), &e.reason());
                // Looked at again on the next change or rescan, e.g. once a directory's mode is fixed.
                table.seen.remove(file);
                return kept(&mut table, name, ReloadError::Load(e));
            }
            Err(e) => {
                error!("{e}; the running builds are kept");
                self.audit.plugin_failed(file, Some(&name), &e.reason());
                return kept(&mut table, name, ReloadError::Load(e));
            }
        };
        let generation = table
            .plugins
            .get(&plugin.name)
            .map_or(1, |l| l.generation + 1);
        let sinks = match generation::build_and_swap(&handles, &Plan::new_build(&handles, &plugin))
        {
            Ok(sinks) => sinks,
            Err(problems) => {
                let error = ReloadError::Rejected(problems);
                error!(plugin = %plugin.describe(), file = %file.display(), "new build rejected, the running one is kept: {error}");
                self.audit
                    .plugin_failed(file, Some(&plugin.name), &error.to_string());
                return kept(&mut table, plugin.name.clone(), error);
            }
        };
        info!(plugin = %plugin.describe(), generation, sinks = ?sinks, elapsed = ?started.elapsed(), "plugin reloaded");
        self.audit.plugin_loaded(plugin.build(), generation, &sinks);
        table.failures.remove(file);
        table.plugins.insert(
            plugin.name.clone(),
            Loaded {
                plugin: plugin.clone(),
                generation,
            },
        );
        Some(Reload {
            file: file.to_owned(),
            plugin: plugin.name.clone(),
            result: Ok(Swapped {
                version: plugin.version.clone(),
                generation,
                sinks,
            }),
        })
    }

    /// Makes the running sinks those of `wanted`, each receiving the event types at the same index of `types`
    /// (see [`routes`]): one new generation ([`generation`]). New sinks get a worker (their cursor starts at the
    /// spool's head) and a first instance; a sink whose configuration changed gets an instance built from the
    /// new configuration and keeps its cursor; the others keep their instance, cursor and batch. Once every new
    /// instance is built, every sink is widened to want its new event types besides its old ones, `swap` runs
    /// (the caller puts the new event types in force there), and the instances are swapped in. Sinks keep wanting
    /// their old types, and removed sinks keep delivering, until the caller hands the [`Narrowing`] returned to
    /// [`settle`](Self::settle). If a plugin cannot be loaded or an instance built, nothing changes and `swap`
    /// does not run: every problem is returned.
    pub fn reconfigure(
        &self,
        wanted: &[SinkConfig],
        types: Vec<HashSet<String>>,
        swap: impl FnOnce(),
    ) -> Result<(Reconfigured, Narrowing), Vec<String>> {
        let mut table = self.lock();
        let mut handles = self.handles.write().unwrap_or_else(|p| p.into_inner());
        let mut done = Reconfigured::default();
        for w in wanted {
            match handles.iter().find(|h| h.config.name == w.name) {
                None => done.added.push(w.name.clone()),
                Some(h) if format!("{:?}", h.config) != format!("{w:?}") => {
                    done.changed.push(w.name.clone())
                }
                Some(_) => {}
            }
        }
        done.removed = handles
            .iter()
            .map(|h| h.config.name.clone())
            .filter(|n| !wanted.iter().any(|w| &w.name == n))
            .collect();
        let building = |name: &str| done.added.iter().chain(&done.changed).any(|n| n == name);
        let needed: HashSet<&str> = wanted
            .iter()
            .filter(|w| building(&w.name) && !table.plugins.contains_key(&w.plugin))
            .map(|w| w.plugin.as_str())
            .collect();
        let (fresh, problems) = load_all(&self.loader, &self.dir, &needed, &self.audit);
        if !problems.is_empty() {
            return Err(problems.iter().map(ToString::to_string).collect());
        }
        let build_of = |plugin: &str| {
            table
                .plugins
                .get(plugin)
                .map(|l| l.plugin.clone())
                .or_else(|| fresh.get(plugin).cloned())
                .expect("loaded above")
        };
        let types_of = |name: &str| {
            wanted
                .iter()
                .position(|w| w.name == name)
                .map(|i| types[i].clone())
                .unwrap_or_default()
        };
        let kept = handles.len();
        let mut problems = Vec::new();
        for w in wanted.iter().filter(|w| done.added.contains(&w.name)) {
            let started = self
                .spool
                .add_sink(&w.name)
                .map_err(|e| format!("sink {:?}: cannot register it with the spool: {e}", w.name));
            let wants = Wants::new(types_of(&w.name));
            let spawned = started.and_then(|()| {
                let plugin = build_of(&w.plugin);
                spawn_worker(w, wants, plugin, &self.spool_dir, &self.audit)
                    .map_err(|p| p.to_string())
            });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => problems.push(e),
            }
        }
        let steps = handles
            .iter()
            .map(|h| {
                let name = h.config.name.as_str();
                let new = wanted.iter().find(|w| w.name == name);
                match new {
                    Some(w) if done.added.contains(&w.name) => {
                        Step::Build(build_of(&w.plugin), None)
                    }
                    Some(w) if done.changed.contains(&w.name) => {
                        Step::Build(build_of(&w.plugin), Some(Box::new(w.clone())))
                    }
                    _ => Step::Keep,
                }
            })
            .collect();
        let swapped = match problems.is_empty() {
            false => Err(problems),
            true => generation::build_and_swap_with(&handles, &Plan::of(steps), || {
                // Widen first: a record of a type a sink now receives may be spooled as soon as `swap` returns.
                // Every sink keeps its old types too until the old generation has settled (`settle`).
                for h in handles.iter() {
                    h.wants.widen(&types_of(&h.config.name));
                }
                swap();
            })
            .map_err(|problems| problems.iter().map(ToString::to_string).collect()),
        };
        if let Err(problems) = swapped {
            for h in handles.drain(kept..) {
                stop_worker(&h);
                let _ = self.spool.remove_sink(&h.config.name);
            }
            return Err(problems);
        }
        // The new sinks' first generation: delivery starts from their cursors (the spool's head when they were
        // added).
        for h in &handles[kept..] {
            start_reading(h, &self.spool);
        }
        // Narrowed only once the old generation has settled (`settle`): until then a record of a type a sink
        // stops receiving, checked under the old generation, may still be on its way to the spool.
        let mut narrowing = Narrowing {
            removed: done.removed.clone(),
            ..Narrowing::default()
        };
        for h in handles.iter_mut() {
            if let Some(w) = wanted.iter().find(|w| w.name == h.config.name) {
                narrowing.wants.push((w.name.clone(), types_of(&w.name)));
                h.config = w.clone();
            }
        }
        // Removed sinks, still delivering until `settle`, last.
        handles.sort_by_key(|h| {
            wanted
                .iter()
                .position(|w| w.name == h.config.name)
                .unwrap_or(usize::MAX)
        });
        for (name, plugin) in fresh {
            table.seen.insert(plugin.file.clone(), plugin.stamp);
            let users: Vec<String> = handles
                .iter()
                .filter(|h| h.config.plugin == name)
                .map(|h| h.config.name.clone())
                .collect();
            self.audit.plugin_loaded(plugin.build(), 1, &users);
            table.plugins.insert(
                name,
                Loaded {
                    plugin,
                    generation: 1,
                },
            );
        }
        Ok((done, narrowing))
    }

    /// The end of a configuration reload, once the old generation has settled (`settled`: no connection holds
    /// its rules any more and the log writer has written everything submitted under them, see `reload`): every
    /// sink wants only its new types for records after the spool's head now, and each removed sink gets up to
    /// [`REMOVED_DRAIN`] to deliver (or dead-letter) the records up to that head before its worker stops and its
    /// cursor is released. Not settled, the sinks keep wanting their old types too (a wider set costs only
    /// records their filter would have skipped) until the next reload narrows them. Returns warnings: a removed
    /// sink stopped with records of its types still undelivered, and a settle that did not happen.
    pub fn settle(&self, narrowing: Narrowing, settled: bool) -> Vec<String> {
        let mut warnings = Vec::new();
        let (head, _) = self.spool.positions();
        if settled {
            let handles = self.handles();
            for (name, types) in narrowing.wants {
                if let Some(h) = handles.iter().find(|h| h.config.name == name) {
                    h.wants.narrow_after(head, types);
                }
            }
        } else if !narrowing.wants.is_empty() {
            warnings.push(
                "the old generation did not settle in time: sinks keep receiving the event types of both \
                 generations until the next reload"
                    .to_owned(),
            );
        }
        if narrowing.removed.is_empty() {
            return warnings;
        }
        let cursor = |name: &str| self.spool.positions().1.get(name).copied();
        let deadline = Instant::now() + REMOVED_DRAIN;
        for name in &narrowing.removed {
            while cursor(name).is_some_and(|c| c < head) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut handles = self.handles.write().unwrap_or_else(|p| p.into_inner());
        for name in &narrowing.removed {
            let Some(i) = handles.iter().position(|h| &h.config.name == name) else {
                continue;
            };
            let h = handles.remove(i);
            stop_worker(&h);
            if let Some(at) = cursor(name).filter(|&c| c < head) {
                warn!(sink = %name, position = at, head, drain = ?REMOVED_DRAIN, "removed sink stopped before it delivered everything accepted for it");
                warnings.push(format!(
                    "sink {name:?} was removed before it had delivered every record accepted for it \
                     within {REMOVED_DRAIN:?} (it had confirmed spool position {at} of {head}); those saved to the \
                     log are still there, stream-only ones are no longer kept for it"
                ));
            }
            if let Err(e) = self.spool.remove_sink(name) {
                warn!(sink = %name, error = %e, "cannot delete a removed sink's cursor file");
            }
            info!(sink = %name, "sink removed");
        }
        warnings
    }

    /// Sends a sink's dead letters again.
    pub fn replay(&self, sink: &str) -> Result<ReplayReport, ReplayError> {
        let handles = self.handles();
        let handle = handles
            .iter()
            .find(|h| h.config.name == sink)
            .ok_or_else(|| ReplayError::NoSuchSink(sink.to_owned()))?;
        let (tx, rx) = mpsc::channel();
        handle
            .control
            .send(Control::Replay { reply: tx })
            .map_err(|_| ReplayError::Stopped(sink.to_owned()))?;
        rx.recv()
            .map_err(|_| ReplayError::StoppedDuring(sink.to_owned()))
    }

    /// Logs sinks that became stuck (undelivered events, no progress for `stuck_after`) or recovered.
    pub fn watch_stuck(&self) {
        let (head, cursors) = self.spool.positions();
        for h in self.handles().iter() {
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
    pub fn status(&self) -> Report {
        let (head, cursors) = self.spool.positions();
        // Counted before any lock of the sinks is taken: this may read spool files.
        let now_ms = crate::clock::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let undelivered: HashMap<&String, crate::spool::Undelivered> = cursors
            .iter()
            .map(|(sink, &pos)| {
                let counted = self.spool.undelivered(pos).unwrap_or_else(|e| {
                    warn!(sink = %sink, error = %e, "cannot count the sink's backlog");
                    crate::spool::Undelivered::default()
                });
                (sink, counted)
            })
            .collect();
        let table = self.lock();
        let sinks = self
            .handles()
            .iter()
            .map(|h| {
                let undelivered = undelivered.get(&h.config.name).copied().unwrap_or_default();
                let s = &h.status;
                let detail = s.detail.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let pos = cursors.get(&h.config.name).copied().unwrap_or(head);
                SinkReport {
                    name: h.config.name.clone(),
                    plugin: h.config.plugin.clone(),
                    serving: detail.plugin,
                    file: detail.file,
                    generation: table.plugins.get(&h.config.plugin).map(|l| l.generation),
                    delivered: s.delivered.load(Ordering::Relaxed),
                    dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
                    dropped: s.dropped.load(Ordering::Relaxed),
                    retries: s.retries.load(Ordering::Relaxed),
                    panics: s.panics.load(Ordering::Relaxed),
                    swaps: s.swaps.load(Ordering::Relaxed),
                    backlog_bytes: head.saturating_sub(pos),
                    backlog_events: undelivered.records,
                    oldest_undelivered_age_secs: undelivered
                        .oldest_received_ms
                        .map(|ms| now_ms.saturating_sub(ms) as f64 / 1000.0),
                    stuck: self.is_stuck(h, head, &cursors),
                    state: "",
                    last_error: detail.last_error,
                }
            })
            .map(|mut sink: SinkReport| {
                sink.state = state(sink.stuck, sink.last_error.as_ref(), sink.backlog_events);
                sink
            })
            .collect();
        let mut plugins: Vec<PluginReport> = table
            .plugins
            .values()
            .map(|l| PluginReport {
                name: l.plugin.name.clone(),
                version: l.plugin.version.clone(),
                api_version: l.plugin.api_version.clone(),
                file: l.plugin.file.clone(),
                generation: l.generation,
                last_failure: table
                    .failures
                    .values()
                    .filter(|(plugin, _)| *plugin == l.plugin.name)
                    .map(|(_, failure)| failure)
                    .max_by(|a, b| a.at.cmp(&b.at))
                    .cloned(),
            })
            .collect();
        plugins.sort_by(|a, b| a.name.cmp(&b.name));
        Report {
            sinks,
            plugins,
            libraries_mapped: self.loader.libraries(),
            spool: SpoolReport {
                head,
                backlog_bytes: self.spool.backlog(),
            },
        }
    }

    /// Stops every worker (each finishes its current write, flushes, closes and saves its position) and waits.
    pub fn stop(&self) {
        stop_workers(&self.handles());
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
