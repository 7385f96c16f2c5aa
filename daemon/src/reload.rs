//! Reloading the configuration and the event types without a restart: the daemon-wide generation.
//!
//! Owns the configuration in force, its generation number and the last reload's outcome. `SIGHUP`, `trail reload`
//! (admin socket) and a change in the event-type directory (watched, debounced) all run [`Reloader::reload`],
//! one at a time: read the configuration file again, load the whole event-type set, work out what changed, build
//! and check everything new (sinks through [`crate::sinks::Sinks::reconfigure`], the one generation builder),
//! and only then swap: the ingest rules (event types, routes, `max_line_bytes`) in one step
//! ([`crate::ingest::Context::swap_rules`]), so that every event is checked against exactly one generation; the
//! log writer's settings between two of its groups; the retention policy at its next round; the connection
//! limits (count, line slots, idle timeout) at once. Then the reload settles before it answers: sinks receive the
//! event types of both generations until no connection holds the old rules and the log writer has spooled what
//! was submitted under them (`settle`); only then are they narrowed and removed sinks stopped
//! ([`crate::sinks::Sinks::settle`]), so no acknowledged event is passed over by the sink it was accepted for. If
//! anything is invalid, nothing changes and the old generation keeps serving. Settings that cannot change while running are
//! reported as needing a restart, and keep their running value; the rest still applies. Every reload, applied or
//! refused, is logged and recorded as `trail_config_reloaded`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use tracing::{debug, error, info, warn};

use crate::audit::Auditor;
use crate::config::Config;
use crate::event_types::Registry;
use crate::ingest::{Context, Rules};
use crate::sinks::{self, Sinks};

/// Who asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// `SIGHUP` (what `systemctl reload` sends).
    Signal,
    /// `trail reload` on the admin socket, by the peer with this uid.
    Admin {
        /// The peer's uid (`SO_PEERCRED`).
        uid: u32,
    },
    /// A change in the event-type directory.
    Watcher,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Signal => "signal",
            Who::Admin { .. } => "admin",
            Who::Watcher => "watcher",
        }
    }
}

/// How long a reload waits for the old generation to settle: for every connection to let its rules go, then
/// for the log writer to write what was submitted under them.
const SETTLE: Duration = Duration::from_secs(30);

/// Waits until no connection holds `old` (the rules just replaced) any more, then until the log writer has
/// written and spooled everything submitted before: from then on no record checked under `old` can reach the
/// spool. False when that took longer than [`SETTLE`].
fn settle(old: Arc<Rules>, submitter: &crate::journal::Submitter) -> bool {
    let started = std::time::Instant::now();
    let (generation, retired) = (old.generation, old.retired.clone());
    drop(old);
    if !retired.wait(SETTLE) {
        warn!(
            generation,
            timeout = ?SETTLE,
            "the old generation is still in use by a connection; sinks keep the event types of both"
        );
        return false;
    }
    if !submitter.barrier(SETTLE.saturating_sub(started.elapsed())) {
        warn!(
            generation,
            timeout = ?SETTLE,
            "the log writer did not write the old generation's records in time; sinks keep the event types of both"
        );
        return false;
    }
    debug!(generation, elapsed = ?started.elapsed(), "old generation settled");
    true
}

/// What one reload did (or why it did nothing): the `config` object of `trail reload`'s answer, the last reload
/// in `trail status`, the payload of `trail_config_reloaded`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// `applied`, or `refused` (nothing changed: the old generation keeps serving).
    pub result: &'static str,
    /// The configuration generation in force afterwards.
    pub generation: u64,
    /// `signal`, `admin` or `watcher`.
    pub requested_by: &'static str,
    /// The uid of the admin socket's peer that asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_uid: Option<u32>,
    /// The configuration file read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_file: Option<PathBuf>,
    /// SHA-256 of the file's bytes, when it could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// Event types defined now that were not.
    pub types_added: Vec<String>,
    /// Event types whose definition changed.
    pub types_changed: Vec<String>,
    /// Event types no longer defined.
    pub types_removed: Vec<String>,
    /// Sinks started.
    pub sinks_added: Vec<String>,
    /// Sinks with a new configuration or filter.
    pub sinks_changed: Vec<String>,
    /// Sinks stopped.
    pub sinks_removed: Vec<String>,
    /// Settings that took effect (`limits.max_line_bytes`, `log.rotate`, …).
    pub settings_changed: Vec<String>,
    /// Changes that take effect only after a restart, each with what to do; the running value is kept.
    pub restart_needed: Vec<String>,
    /// Why the reload was refused.
    pub errors: Vec<String>,
    /// What an applied reload could not do as it should: the old generation did not settle in time (sinks keep
    /// the event types of both), a removed sink stopped with records accepted for it undelivered.
    pub warnings: Vec<String>,
    /// When the reload ran (RFC 3339, UTC).
    pub at: String,
}

impl Outcome {
    /// Whether the new generation is in force.
    pub fn applied(&self) -> bool {
        self.result == "applied"
    }
}

/// The configuration generation in `trail status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// 1 at start, one more with every applied reload.
    pub generation: u64,
    /// When the generation in force was loaded (RFC 3339, UTC).
    pub loaded_at: String,
    /// The configuration file, if the daemon was started with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The last reload, applied or refused, with its errors.
    pub last_reload: Option<Outcome>,
    /// Reloads applied since start.
    pub reloads_applied: u64,
    /// Reloads refused since start (nothing changed).
    pub reloads_refused: u64,
}

struct Current {
    /// The configuration in force (settings that need a restart keep their running values).
    config: Config,
    generation: u64,
    loaded_at: String,
    last: Option<Outcome>,
    /// Reloads applied and refused since start.
    applied: u64,
    refused: u64,
}

/// Reloads the configuration and the event types; one reload at a time.
pub struct Reloader {
    current: Mutex<Current>,
    ctx: Arc<Context>,
    sinks: Option<Arc<Sinks>>,
    retention: Arc<Mutex<crate::retention::Policy>>,
    /// Wakes the upkeep task, which then reads the new retention policy.
    upkeep: Arc<tokio::sync::Notify>,
    audit: Auditor,
    service: Arc<crate::systemd::Service>,
}

/// What one `SIGHUP` or `trail reload` did: the configuration and event types, then the plugin libraries.
#[derive(Debug)]
pub struct Reloaded {
    /// The configuration and event types.
    pub config: Outcome,
    /// The plugin libraries that changed (`None` without sinks), or why the directory could not be rescanned.
    pub plugins: Option<Result<Vec<sinks::Reload>, sinks::ReloadError>>,
}

impl Reloaded {
    /// Whether everything asked for was applied: the configuration, and every changed plugin library.
    pub fn ok(&self) -> bool {
        self.config.applied()
            && match &self.plugins {
                None => true,
                Some(Ok(all)) => all.iter().all(|r| r.result.is_ok()),
                Some(Err(_)) => false,
            }
    }
}

impl Reloader {
    /// The reloader of a daemon started with `config` (generation 1).
    pub fn new(
        config: Config,
        ctx: Arc<Context>,
        sinks: Option<Arc<Sinks>>,
        retention: Arc<Mutex<crate::retention::Policy>>,
        upkeep: Arc<tokio::sync::Notify>,
        audit: Auditor,
        service: Arc<crate::systemd::Service>,
    ) -> Reloader {
        Reloader {
            current: Mutex::new(Current {
                config,
                generation: 1,
                loaded_at: now(),
                last: None,
                applied: 0,
                refused: 0,
            }),
            ctx,
            sinks,
            retention,
            upkeep,
            audit,
            service,
        }
    }

    /// What `SIGHUP` and `trail reload` do, announced to the service manager (`RELOADING=1` … `READY=1`): the
    /// configuration and event types ([`reload`](Self::reload)), then the plugin directory is rescanned. Call
    /// it from a blocking thread.
    pub fn reload_all(&self, who: Who) -> Reloaded {
        self.service
            .reload("the plugins, the configuration and the event types", || {
                let config = self.reload(who);
                let plugins = self.sinks.as_ref().map(|s| s.reload_all());
                if let Some(Err(e)) = &plugins {
                    warn!(error = %e, "the plugin directory cannot be rescanned");
                }
                Reloaded { config, plugins }
            })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The event-type directory (the one in force: changing it needs a restart).
    pub fn event_types_dir(&self) -> PathBuf {
        self.lock().config.event_types.clone()
    }

    /// The generation in force and the last reload.
    pub fn status(&self) -> Status {
        let current = self.lock();
        Status {
            generation: current.generation,
            loaded_at: current.loaded_at.clone(),
            file: current.config.file.clone(),
            last_reload: current.last.clone(),
            reloads_applied: current.applied,
            reloads_refused: current.refused,
        }
    }

    /// Reads the configuration file and the event types again and applies them (see the module's docs). Runs
    /// plugin code and waits for sink threads: call it from a blocking thread, never on the runtime.
    pub fn reload(&self, who: Who) -> Outcome {
        let mut current = self.lock();
        let mut outcome = Outcome {
            result: "refused",
            generation: current.generation,
            requested_by: who.name(),
            peer_uid: match who {
                Who::Admin { uid } => Some(uid),
                _ => None,
            },
            config_file: current.config.file.clone(),
            at: now(),
            ..Outcome::default()
        };
        let new = match &current.config.file {
            Some(path) => match read_config(path) {
                Ok((config, sha)) => {
                    outcome.config_sha256 = Some(sha);
                    Some(config)
                }
                Err((e, sha)) => {
                    outcome.config_sha256 = sha;
                    outcome.errors.push(e.to_string());
                    None
                }
            },
            // The embedded development configuration: only the event types are read again.
            None => Some(current.config.clone()),
        };
        let registry = match Registry::load_dir(&current.config.event_types) {
            Ok(r) => Some(r),
            Err(problems) => {
                outcome
                    .errors
                    .extend(problems.0.iter().map(ToString::to_string));
                None
            }
        };
        let (Some(new), Some(registry)) = (new, registry) else {
            return self.finish(&mut current, outcome);
        };
        // Not held past this: the settle waits for the old rules to be let go.
        diff_types(&self.ctx.rules().registry, &registry, &mut outcome);
        let (next, settings) = merge(&current.config, &new, self.sinks.is_some(), &mut outcome);
        let generation = current.generation + 1;
        let sink_types = crate::sinks::routes(&next.sinks, &registry);
        let streamed_types: HashSet<String> = sink_types.iter().flatten().cloned().collect();
        let new_rules = Arc::new(Rules {
            generation,
            access: crate::access::Policy::build(&next, &registry),
            registry: Arc::new(registry),
            streamed_types,
            max_line_bytes: next.limits.max_line_bytes,
            retired: Arc::default(),
        });
        let mut old = None;
        let mut swap = || {
            old = Some(self.ctx.swap_rules(new_rules.clone()));
        };
        let narrowing = match &self.sinks {
            Some(sinks) => match sinks.reconfigure(&next.sinks, sink_types, swap) {
                Ok((done, narrowing)) => {
                    outcome.sinks_added = done.added;
                    outcome.sinks_changed = done.changed;
                    outcome.sinks_removed = done.removed;
                    Some((sinks, narrowing))
                }
                Err(problems) => {
                    outcome.errors.extend(problems);
                    return self.finish(&mut current, outcome);
                }
            },
            None => {
                swap();
                None
            }
        };
        // The rest cannot fail: the writer's settings go between two of its groups, retention at its next round.
        if settings.journal != journal_settings(&current.config)
            && !self.ctx.submitter.change(settings.journal.clone())
        {
            warn!("the log writer has stopped; its new settings were not applied");
        }
        *self.retention.lock().unwrap_or_else(|e| e.into_inner()) =
            crate::retention::Policy::of(&next.log);
        self.upkeep.notify_one();
        self.ctx.connections.set_limits(&next.limits);
        if next.limits.max_connections > current.config.limits.max_connections {
            crate::warn_if_few_descriptors(next.limits.max_connections);
        }
        // The settle: sinks want the types of both generations until every record checked under the old one is
        // in the spool; then they are narrowed for the records after it, and removed sinks stop.
        if let (Some((sinks, narrowing)), Some(old)) = (narrowing, old) {
            let settled = settle(old, &self.ctx.submitter);
            outcome.warnings.extend(sinks.settle(narrowing, settled));
        }
        for w in &outcome.warnings {
            warn!(requested_by = outcome.requested_by, "{w}");
        }
        current.config = next;
        current.generation = generation;
        current.loaded_at = outcome.at.clone();
        outcome.generation = generation;
        outcome.result = "applied";
        self.finish(&mut current, outcome)
    }

    /// Logs and records the outcome and keeps it as the last reload.
    fn finish(&self, current: &mut Current, outcome: Outcome) -> Outcome {
        let ok = outcome.applied();
        let message = describe(&outcome);
        if ok {
            info!(generation = outcome.generation, requested_by = outcome.requested_by, types_added = ?outcome.types_added,
                types_changed = ?outcome.types_changed, types_removed = ?outcome.types_removed, sinks_added = ?outcome.sinks_added,
                sinks_changed = ?outcome.sinks_changed, sinks_removed = ?outcome.sinks_removed, settings_changed = ?outcome.settings_changed,
                "{message}");
        } else {
            for e in &outcome.errors {
                error!(requested_by = outcome.requested_by, "reload refused: {e}");
            }
            error!(
                generation = outcome.generation,
                requested_by = outcome.requested_by,
                "{message}"
            );
        }
        for r in &outcome.restart_needed {
            warn!(requested_by = outcome.requested_by, "needs a restart: {r}");
        }
        let mut payload = serde_json::to_value(&outcome).expect("serializable");
        if let Some(p) = payload.as_object_mut() {
            p.remove("at");
            if let Some(file) = &outcome.config_file {
                p.insert("config_file".into(), json!(file.display().to_string()));
            }
        }
        self.audit.config_reloaded(message, ok, payload);
        if ok {
            current.applied += 1;
        } else {
            current.refused += 1;
        }
        current.last = Some(outcome.clone());
        outcome
    }
}

/// One line about an outcome, for the log and the record's message.
fn describe(o: &Outcome) -> String {
    let asked = match o.peer_uid {
        Some(uid) => format!("{} (uid {uid})", o.requested_by),
        None => o.requested_by.to_owned(),
    };
    if o.applied() {
        format!(
            "configuration reloaded (generation {}, asked by {asked}): {} event type(s) added, {} changed, {} \
             removed; {} sink(s) added, {} changed, {} removed; {} setting(s) changed; {} change(s) need a restart",
            o.generation,
            o.types_added.len(),
            o.types_changed.len(),
            o.types_removed.len(),
            o.sinks_added.len(),
            o.sinks_changed.len(),
            o.sinks_removed.len(),
            o.settings_changed.len(),
            o.restart_needed.len()
        )
    } else {
        format!(
            "configuration reload refused (asked by {asked}), generation {} keeps serving: {}",
            o.generation,
            o.errors.join("; ")
        )
    }
}

/// Reads and checks the configuration file; returns it with the SHA-256 of its bytes.
fn read_config(path: &Path) -> Result<(Config, String), (crate::config::Error, Option<String>)> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|source| {
        (
            crate::config::Error::Read {
                path: path.to_owned(),
                source,
            },
            None,
        )
    })?;
    let sha = crate::log::chain::hex(&sha2::Sha256::digest(&bytes));
    let text = String::from_utf8(bytes).map_err(|e| {
        (
            crate::config::Error::Invalid {
                path: path.to_owned(),
                message: format!("not UTF-8 text: {e}"),
            },
            Some(sha.clone()),
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut config = Config::parse(&text, path, base).map_err(|e| (e, Some(sha.clone())))?;
    config.file = Some(path.to_owned());
    Ok((config, sha))
}

/// Which types were added, changed (by their definition's digest) or removed.
fn diff_types(old: &Registry, new: &Registry, outcome: &mut Outcome) {
    for t in new.types() {
        match old.get(&t.name) {
            None => outcome.types_added.push(t.name.clone()),
            Some(o) if o.digest != t.digest => outcome.types_changed.push(t.name.clone()),
            Some(_) => {}
        }
    }
    for t in old.types() {
        if new.get(&t.name).is_none() {
            outcome.types_removed.push(t.name.clone());
        }
    }
}

/// What a reload hands to the parts that are not rebuilt.
struct Settings {
    journal: crate::journal::Settings,
}

fn journal_settings(config: &Config) -> crate::journal::Settings {
    crate::journal::Settings {
        rotate: config.log.rotate,
        max_file_bytes: config.log.max_file_bytes,
        checkpoint_every: config.log.checkpoint_every,
    }
}

/// The configuration to put in force: `new`, except where a change needs a restart (then the running value,
/// reported in `restart_needed`). Settings that change are listed in `settings_changed`.
fn merge(running: &Config, new: &Config, sinks: bool, outcome: &mut Outcome) -> (Config, Settings) {
    let mut next = new.clone();
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let mut restart = |name: &str, changed: bool, keep: &mut dyn FnMut(&mut Config)| {
        if changed {
            outcome.restart_needed.push(format!(
                "{name} changed: it needs a restart; the running value is kept until then"
            ));
            keep(&mut next);
        }
    };
    // A setting that needs a restart: the running value is kept when it differs.
    macro_rules! needs_restart {
        ($name:literal, $($field:ident).+) => {
            restart(
                $name,
                running.$($field).+ != new.$($field).+,
                &mut |c: &mut Config| c.$($field).+ = running.$($field).+.clone(),
            )
        };
    }
    needs_restart!("socket.path", socket.path);
    needs_restart!("socket.mode", socket.mode);
    needs_restart!("socket.group", socket.gid);
    restart(
        "admin_socket",
        running.admin_socket() != new.admin_socket(),
        &mut |c: &mut Config| c.admin_socket = running.admin_socket.clone(),
    );
    needs_restart!("event_types (the directory)", event_types);
    needs_restart!("log.dir", log.dir);
    needs_restart!("log.fsync", log.fsync);
    restart(
        "log.signing_key",
        running.log.signing_key() != new.log.signing_key(),
        &mut |c: &mut Config| c.log.signing_key = running.log.signing_key.clone(),
    );
    needs_restart!("shutdown_grace", shutdown_grace);
    needs_restart!("host_name", host_name);
    needs_restart!("metrics.listen", metrics.listen);
    restart(
        "files.group",
        running.files.gid != new.files.gid,
        &mut |c: &mut Config| c.files = running.files.clone(),
    );
    restart(
        "idempotency",
        differs(&running.idempotency, &new.idempotency),
        &mut |c: &mut Config| c.idempotency = running.idempotency.clone(),
    );
    restart(
        "plugins_dir",
        running.plugins_dir.is_some() && running.plugins_dir != new.plugins_dir,
        &mut |c: &mut Config| c.plugins_dir = running.plugins_dir.clone(),
    );
    restart(
        "spool",
        sinks && differs(&running.spool(), &new.spool()),
        &mut |c: &mut Config| c.spool = running.spool.clone(),
    );
    // Without sinks at start there is no spool and no plugin table: the first sinks need a restart.
    restart(
        "sinks (the daemon started without sinks, so without a spool)",
        !sinks && !new.sinks.is_empty(),
        &mut |c: &mut Config| {
            c.sinks = running.sinks.clone();
            c.plugins_dir = running.plugins_dir.clone();
        },
    );
    // Settings that take effect on reload: named in the outcome when they differ.
    macro_rules! changed {
        ($name:literal, $($field:ident).+) => {
            if running.$($field).+ != next.$($field).+ {
                outcome.settings_changed.push($name.to_owned());
            }
        };
    }
    changed!("limits.max_line_bytes", limits.max_line_bytes);
    changed!("limits.idle_timeout", limits.idle_timeout);
    changed!("limits.max_connections", limits.max_connections);
    changed!("limits.max_buffered_bytes", limits.max_buffered_bytes);
    changed!("limits.rate_per_uid", limits.rate_per_uid);
    changed!("limits.rate_burst", limits.rate_burst);
    changed!("access", access);
    changed!("log.rotate", log.rotate);
    changed!("log.max_file_bytes", log.max_file_bytes);
    changed!("log.checkpoint_every", log.checkpoint_every);
    changed!("log.retention", log.retention);
    changed!("log.retention_bytes", log.retention_bytes);
    changed!("log.retention_by_type", log.retention_by_type);
    changed!("log.compress", log.compress);
    let journal = journal_settings(&next);
    (next, Settings { journal })
}

/// The time now, RFC 3339 in UTC.
fn now() -> String {
    let mut out = Vec::new();
    crate::record::write_rfc3339(&mut out, crate::clock::now());
    String::from_utf8(out).unwrap_or_default()
}

/// The running watcher of the event-type directory; dropping it stops watching.
pub struct Watcher {
    _debouncer: notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
}

/// How long the directory must be quiet before a change is reloaded.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watches the event-type directory: a definition file created, changed, renamed or removed reloads (as
/// [`Who::Watcher`]), once the directory has been quiet for a moment; changes that arrive during a reload are
/// coalesced into one more.
pub fn watch(reloader: Arc<Reloader>) -> notify::Result<Watcher> {
    use notify::{EventKind, RecursiveMode};
    use notify_debouncer_full::{DebounceEventResult, new_debouncer};
    let dir = reloader.event_types_dir();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut debouncer =
        new_debouncer(
            DEBOUNCE,
            None,
            move |result: DebounceEventResult| match result {
                Ok(events) => {
                    let relevant = events.iter().any(|e| {
                        !matches!(e.kind, EventKind::Access(_))
                            && e.paths.iter().any(|p| is_definition(p))
                    });
                    if relevant {
                        let _ = tx.send(());
                    }
                }
                Err(errors) => {
                    for e in errors {
                        error!(error = %e, "event-type directory watch error");
                    }
                }
            },
        )?;
    debouncer.watch(&dir, RecursiveMode::NonRecursive)?;
    info!(dir = %dir.display(), "watching for event-type changes");
    // Weak: the daemon's stop must not wait for this thread to let go of the reloader (and the log's submitter).
    let reloader = Arc::downgrade(&reloader);
    std::thread::Builder::new()
        .name("trail-types".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                while rx.try_recv().is_ok() {}
                let Some(reloader) = reloader.upgrade() else {
                    return;
                };
                reloader
                    .service
                    .reload("the event types", || reloader.reload(Who::Watcher));
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(Watcher {
        _debouncer: debouncer,
    })
}

/// A definition file's name (`*.yml`, `*.yaml`, not hidden), as [`Registry::load_dir`] reads them.
fn is_definition(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yml" | "yaml")
    ) && !path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}
