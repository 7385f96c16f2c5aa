//! One sink's delivery loop, on its own OS thread.
//!
//! Owns the sink's plugin instance and its reader of the spool. Reads records in spool order, keeps those its
//! filter wants, batches them, and calls the plugin; confirms its position only after a write and a flush
//! succeeded (at least once). Retryable failures back off exponentially with jitter; a permanent failure sends the
//! one record to the dead-letter file and delivery goes on; a panic drops the instance and builds a fresh one.
//! Every generation, the first included, is two-phase (see [`super::generation`]): `Prepare` builds the new
//! instance here, `Commit` flushes and closes the old one (if any) and continues from the same position with the
//! new one, `Abort` discards it. The first generation's swap is `Start`, which brings the worker its reader of the
//! spool (opened only once every sink's first instance was built): a worker delivers nothing, and touches no
//! spool file, before it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use abi_stable::std_types::RSlice;
use serde::Serialize;
use tracing::{error, info, warn};
use trail_plugin_api::{HostAction, Record, SinkBox, SinkError, WriteError};

use super::dead_letter::{self, DeadLetters};
use super::loader::Plugin;
use crate::audit::Auditor;
use crate::config::SinkConfig;
use crate::spool::{self, Entry};

/// How long the worker waits for records before it looks at its control messages again.
const POLL: Duration = Duration::from_millis(100);
/// How often a confirmed position is written to the cursor file (it is always written on stop and swap).
const CURSOR_EVERY: Duration = Duration::from_millis(100);

/// Messages to a worker.
pub enum Control {
    /// Build an instance of `plugin` and hold it; answer whether that worked.
    Prepare {
        /// The new build.
        plugin: Arc<Plugin>,
        /// The sink's new configuration (a reload changed it), applied with the instance; `None` keeps it.
        config: Option<Box<SinkConfig>>,
        /// Where to answer: the plugin's error when it refused to build an instance.
        reply: Sender<Result<(), SinkError>>,
    },
    /// Switch to the prepared instance.
    Commit,
    /// Start delivering with the prepared instance, reading the spool with `reader`: the first generation's swap.
    Start {
        /// The sink's reader of the spool (boxed: it is large, and sent once).
        reader: Box<spool::Reader>,
    },
    /// Discard the prepared instance.
    Abort,
    /// Deliver the dead letters again.
    Replay {
        /// Where to answer.
        reply: Sender<ReplayReport>,
    },
    /// Finish the current write, flush, close, save the position, and end.
    Stop,
}

/// The outcome of a replay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    /// Dead letters delivered this time.
    pub delivered: u64,
    /// Dead letters that failed permanently again (back in the dead-letter file).
    pub failed: u64,
}

/// Counters and state of one sink, shared with status reporting.
#[derive(Debug, Default)]
pub struct Status {
    /// Records delivered.
    pub delivered: AtomicU64,
    /// Records sent to the dead-letter file.
    pub dead_lettered: AtomicU64,
    /// Records skipped because the spool was full (`drop_oldest`).
    pub dropped: AtomicU64,
    /// Failed writes that were retried.
    pub retries: AtomicU64,
    /// Panics caught in the plugin.
    pub panics: AtomicU64,
    /// Instances swapped in by hot reload.
    pub swaps: AtomicU64,
    /// When the sink last made progress or had nothing to do (ms since the epoch).
    pub last_progress_ms: AtomicU64,
    /// The plugin build serving the sink, and the last error.
    pub detail: Mutex<Detail>,
}

/// The non-counter part of [`Status`].
#[derive(Debug, Default, Clone, Serialize)]
pub struct Detail {
    /// `name version (api X.Y)` of the serving build.
    pub plugin: String,
    /// The serving build's file.
    pub file: PathBuf,
    /// The last error, if the sink has not delivered since.
    pub last_error: Option<String>,
}

impl Status {
    fn progress(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn set_error(&self, e: Option<String>) {
        self.detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error = e;
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Everything a worker needs.
pub struct Worker {
    /// The sink's configuration.
    pub config: SinkConfig,
    /// The serving build.
    pub plugin: Arc<Plugin>,
    /// Control messages.
    pub control: Receiver<Control>,
    /// Shared counters.
    pub status: Arc<Status>,
    /// The daemon's own audit events.
    pub audit: Auditor,
    /// The sink's dead-letter files.
    pub dead: DeadLetters,
}

enum Flow {
    Continue,
    Stop,
}

struct State {
    w: Worker,
    reader: spool::Reader,
    instance: Option<SinkBox>,
    prepared: Option<(Arc<Plugin>, SinkBox)>,
    /// The configuration that comes with the prepared instance, when a reload changed it.
    prepared_config: Option<Box<SinkConfig>>,
    /// Whether a generation was committed: before that, nothing is delivered and a stop touches nothing.
    serving: bool,
    attempt: u32,
    cursor_saved: Instant,
    stopping: bool,
}

impl Worker {
    /// Runs until [`Control::Stop`]: waits for its first generation (`Prepare`, then `Start`), then delivers.
    pub fn run(mut self) {
        let name = self.config.name.clone();
        let Some((reader, prepared)) = self.first_generation() else {
            return;
        };
        let mut s = State {
            w: self,
            reader,
            instance: None,
            prepared: Some(prepared),
            prepared_config: None,
            serving: false,
            attempt: 0,
            cursor_saved: Instant::now(),
            stopping: false,
        };
        s.swap();
        s.w.status.progress();
        info!(sink = %name, plugin = %s.w.plugin.describe(), "sink started");
        while !s.stopping {
            if let Flow::Stop = s.handle_controls(Duration::ZERO) {
                break;
            }
            match s.gather() {
                Ok((entries, end)) => {
                    if !entries.is_empty() {
                        s.deliver(&entries, true);
                    }
                    if !s.stopping {
                        s.confirm(end, false);
                    }
                }
                Err(e) => {
                    error!(sink = %name, error = %e, "cannot read the spool");
                    s.w.status
                        .set_error(Some(format!("cannot read the spool: {e}")));
                    if let Flow::Stop = s.handle_controls(Duration::from_secs(1)) {
                        break;
                    }
                }
            }
        }
        s.finish();
        info!(sink = %name, "sink stopped");
    }
}

impl Worker {
    /// Before the first generation: builds instances when asked (`Prepare`), discards them (`Abort`), until
    /// `Start` (the reader, and the instance built last) or `Stop` (`None`: never served, so nothing to flush or
    /// save).
    fn first_generation(&mut self) -> Option<(spool::Reader, (Arc<Plugin>, SinkBox))> {
        let mut prepared: Option<(Arc<Plugin>, SinkBox)> = None;
        let close = |prepared: &mut Option<(Arc<Plugin>, SinkBox)>| {
            if let Some((_, mut instance)) = prepared.take() {
                let _ = instance.close();
            }
        };
        loop {
            match self.control.recv() {
                Err(_) | Ok(Control::Stop) => {
                    close(&mut prepared);
                    return None;
                }
                Ok(Control::Prepare {
                    plugin,
                    config,
                    reply,
                }) => {
                    close(&mut prepared);
                    let result = plugin
                        .instantiate(
                            &self.config.name,
                            &config_json(config.as_deref().unwrap_or(&self.config)),
                        )
                        .map(|instance| prepared = Some((plugin, instance)));
                    if let (Ok(()), Some(config)) = (&result, config) {
                        // Not serving yet: the new configuration is the sink's from now on.
                        self.config = *config;
                    }
                    let _ = reply.send(result);
                }
                Ok(Control::Abort) => close(&mut prepared),
                Ok(Control::Start { reader }) => match prepared.take() {
                    Some(p) => return Some((*reader, p)),
                    None => {
                        error!(sink = %self.config.name, "told to start without a built instance");
                        return None;
                    }
                },
                // Nothing serves yet: nothing to swap or replay.
                Ok(Control::Commit) => {}
                Ok(Control::Replay { reply }) => {
                    let _ = reply.send(ReplayReport::default());
                }
            }
        }
    }
}

impl State {
    fn name(&self) -> &str {
        &self.w.config.name
    }

    /// Reads the next batch: records the filter wants, up to the batch limits or `max_wait` after the first.
    /// Also returns the position after everything read (records for other sinks included), to be confirmed.
    fn gather(&mut self) -> std::io::Result<(Vec<Entry>, Option<u64>)> {
        let batch = self.w.config.batch.clone();
        let mut entries: Vec<Entry> = Vec::new();
        let mut bytes = 0usize;
        let mut end = None;
        let mut first_at: Option<Instant> = None;
        let start = self.reader.position();
        loop {
            let wait = match first_at {
                None => POLL,
                Some(t) => batch.max_wait.saturating_sub(t.elapsed()),
            };
            let room_events = batch.max_events - entries.len();
            let room_bytes = (batch.max_bytes as usize).saturating_sub(bytes).max(1);
            // Once a batch has started, wake only when enough has arrived to fill it (or max_wait is up). Spool
            // bytes, not record bytes: records that are in the log take less room in the spool.
            let min_bytes = match entries.len() {
                0 => 1,
                n => {
                    let spooled = end.unwrap_or(start) - start;
                    (room_events as u64 * (spooled / n as u64).max(1)).min(room_bytes as u64)
                }
            };
            let read = self.reader.next(room_events, room_bytes, min_bytes, wait)?;
            if read.dropped > 0 {
                self.dropped(read.dropped);
            }
            if read.dropped > 0 || read.passed > 0 || !read.entries.is_empty() {
                end = Some(read.end);
            }
            // The reader passes over records of types this sink does not receive.
            for e in read.entries {
                bytes += e.line().len();
                entries.push(e);
            }
            if entries.is_empty() {
                // Idle, or only records for other sinks: hand back what there is to confirm.
                break;
            }
            let first = *first_at.get_or_insert_with(Instant::now);
            let full = entries.len() >= batch.max_events || bytes >= batch.max_bytes as usize;
            if full || first.elapsed() >= batch.max_wait {
                break;
            }
        }
        if end.is_none() {
            // Nothing is waiting for this sink.
            self.w.status.progress();
        }
        Ok((entries, end))
    }

    /// Delivers `entries` in order; returns when all are delivered or dead-lettered, or the worker is stopping.
    /// With `confirm`, the spool position is confirmed as records get done.
    fn deliver(&mut self, entries: &[Entry], confirm: bool) -> (u64, u64) {
        let (mut delivered, mut failed) = (0u64, 0u64);
        let mut i = 0;
        while i < entries.len() {
            if self.stopping {
                return (delivered, failed);
            }
            if confirm {
                // The spool filled up while this batch was failing (`drop_oldest`): skip what is now dropped.
                let floor = self.reader.floor();
                let skip = entries[i..].iter().take_while(|e| e.end <= floor).count();
                if skip > 0 {
                    i += skip;
                    self.dropped(skip as u64);
                    self.confirm(Some(entries[i - 1].end), false);
                    continue;
                }
            }
            let Some(instance) = self.instance.as_mut() else {
                match self
                    .w
                    .plugin
                    .instantiate(&self.w.config.name, &config_json(&self.w.config))
                {
                    Ok(fresh) => self.instance = Some(fresh),
                    Err(e) => {
                        self.failed(&format!("cannot construct a new instance: {e}"));
                        self.back_off();
                    }
                }
                continue;
            };
            let records: Vec<Record<'_>> = entries[i..]
                .iter()
                .map(|e| Record::new(e.seq, e.id(), e.event_type(), e.line()))
                .collect();
            let result = instance
                .write(RSlice::from_slice(&records))
                .into_result()
                .and_then(|()| instance.flush().into_result().map_err(WriteError::from));
            drop(records);
            match result {
                Ok(()) => {
                    let n = (entries.len() - i) as u64;
                    delivered += n;
                    i = entries.len();
                    self.succeeded(n);
                }
                Err(WriteError {
                    delivered: d,
                    error,
                }) => {
                    let d = (d as usize).min(entries.len() - i);
                    if d > 0 {
                        delivered += d as u64;
                        i += d;
                        self.succeeded(d as u64);
                    }
                    match error.kind.host_action() {
                        HostAction::GiveUp if i < entries.len() => {
                            if let Err(e) = self.dead_letter(&entries[i], &error) {
                                // Without its dead letter the record must not be skipped: retry it.
                                self.failed(&format!("cannot write the dead-letter file: {e}"));
                                self.back_off();
                                continue;
                            }
                            failed += 1;
                            i += 1;
                            self.attempt = 0;
                        }
                        HostAction::FreshInstance => {
                            self.w.status.panics.fetch_add(1, Ordering::Relaxed);
                            self.failed(&format!("the plugin panicked: {}", error.message));
                            // The instance refuses further calls: build a fresh one for the retry.
                            self.instance = None;
                            self.back_off();
                        }
                        _ => {
                            self.w.status.retries.fetch_add(1, Ordering::Relaxed);
                            self.failed(&format!("write failed: {error}"));
                            self.back_off();
                        }
                    }
                }
            }
            if confirm && i > 0 {
                self.confirm(Some(entries[i - 1].end), false);
            }
        }
        (delivered, failed)
    }

    fn dropped(&self, n: u64) {
        self.w.status.dropped.fetch_add(n, Ordering::Relaxed);
        warn!(sink = %self.name(), dropped = n, "spool full: skipped the oldest events");
        self.w.audit.sink_events_dropped(self.name(), n);
    }

    fn succeeded(&mut self, n: u64) {
        self.w.status.delivered.fetch_add(n, Ordering::Relaxed);
        self.w.status.progress();
        if self.attempt > 0 {
            info!(sink = %self.name(), "delivering again");
            self.w.status.set_error(None);
        }
        self.attempt = 0;
    }

    fn failed(&self, message: &str) {
        warn!(sink = %self.name(), attempt = self.attempt + 1, "{message}");
        self.w.status.set_error(Some(message.to_owned()));
    }

    /// Sleeps before the next attempt (exponential, full jitter, capped), handling control messages meanwhile.
    fn back_off(&mut self) {
        let retry = &self.w.config.retry;
        let exp = retry
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(retry.max);
        self.attempt = self.attempt.saturating_add(1);
        let jitter = exp.mul_f64(0.5 + 0.5 * random_unit());
        if let Flow::Stop = self.handle_controls(jitter) {
            self.stopping = true;
        }
    }

    fn confirm(&mut self, end: Option<u64>, force: bool) {
        let Some(end) = end else { return };
        let due = force || self.cursor_saved.elapsed() >= CURSOR_EVERY;
        if let Err(e) = self.reader.confirm(end, due) {
            error!(sink = %self.name(), error = %e, "cannot save the sink's position");
        } else if due {
            self.cursor_saved = Instant::now();
        }
    }

    /// Handles control messages, waiting up to `wait` for the first.
    fn handle_controls(&mut self, wait: Duration) -> Flow {
        let deadline = Instant::now() + wait;
        loop {
            let message = match self
                .w
                .control
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => return Flow::Continue,
                Err(RecvTimeoutError::Disconnected) => return Flow::Stop,
            };
            match message {
                Control::Stop => return Flow::Stop,
                Control::Prepare {
                    plugin,
                    config,
                    reply,
                } => {
                    let json = config_json(config.as_deref().unwrap_or(&self.w.config));
                    let result = plugin
                        .instantiate(&self.w.config.name, &json)
                        .map(|instance| self.prepared = Some((plugin, instance)));
                    self.prepared_config = config.filter(|_| result.is_ok());
                    let _ = reply.send(result);
                }
                Control::Commit => self.swap(),
                // Only the first generation starts, before this loop runs.
                Control::Start { .. } => {}
                Control::Abort => {
                    self.prepared_config = None;
                    if let Some((_, mut instance)) = self.prepared.take() {
                        let _ = instance.close();
                    }
                }
                Control::Replay { reply } => {
                    let report = self.replay();
                    let _ = reply.send(report);
                }
            }
            if Instant::now() >= deadline {
                return Flow::Continue;
            }
        }
    }

    fn swap(&mut self) {
        let Some((plugin, instance)) = self.prepared.take() else {
            return;
        };
        if let Some(mut old) = self.instance.take() {
            if let Err(e) = old.flush().into_result() {
                warn!(sink = %self.name(), error = %e, "the old instance failed to flush on swap");
            }
            if let Err(e) = old.close().into_result() {
                warn!(sink = %self.name(), error = %e, "the old instance failed to close on swap");
            }
        }
        self.instance = Some(instance);
        self.attempt = 0;
        if let Some(config) = self.prepared_config.take() {
            // Batch and retry settings too: the batch being gathered was delivered under the old ones.
            info!(sink = %self.name(), "the sink's configuration changed");
            self.w.config = *config;
        }
        {
            let mut d = self
                .w
                .status
                .detail
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            d.plugin = plugin.describe();
            d.file = plugin.file.clone();
        }
        if self.serving {
            self.w.status.swaps.fetch_add(1, Ordering::Relaxed);
            info!(sink = %self.name(), plugin = %plugin.describe(), "now served by the new plugin build");
        }
        self.serving = true;
        self.w.plugin = plugin;
    }

    /// Sends a record and the error that refused it to the dead-letter file, durably.
    fn dead_letter(&self, entry: &Entry, error: &SinkError) -> std::io::Result<()> {
        self.w.dead.append(entry, error)?;
        self.w.status.dead_lettered.fetch_add(1, Ordering::Relaxed);
        warn!(sink = %self.name(), seq = entry.seq, error = %error, file = %self.w.dead.path().display(), "record dead-lettered");
        Ok(())
    }

    /// Sends the dead letters again; those that fail permanently again go back to the dead-letter file.
    fn replay(&mut self) -> ReplayReport {
        let mut report = ReplayReport::default();
        let path = self.w.dead.path();
        let replaying = self.w.dead.replaying_path(now_ms());
        if std::fs::rename(&path, &replaying).is_err() {
            return report;
        }
        let entries = match dead_letter::read(&replaying) {
            Ok(e) => e,
            Err(e) => {
                error!(sink = %self.name(), error = %e, file = %replaying.display(), "cannot read dead letters");
                return report;
            }
        };
        let mut done = 0;
        for chunk in entries.chunks(self.w.config.batch.max_events) {
            let (delivered, failed) = self.deliver(chunk, false);
            report.delivered += delivered;
            report.failed += failed;
            done += (delivered + failed) as usize;
            if self.stopping {
                // Keep what was not attempted for the next replay, after what failed again meanwhile.
                if let Err(e) = dead_letter::keep_unreplayed(&replaying, done, &path) {
                    error!(sink = %self.name(), error = %e, file = %replaying.display(), "cannot keep the dead letters not replayed yet");
                    return report;
                }
                let _ = std::fs::remove_file(&replaying);
                return report;
            }
        }
        let _ = std::fs::remove_file(&replaying);
        info!(sink = %self.name(), delivered = report.delivered, failed = report.failed, "dead letters replayed");
        report
    }

    fn finish(&mut self) {
        if let Some(mut instance) = self.instance.take() {
            if let Err(e) = instance.flush().into_result() {
                warn!(sink = %self.name(), error = %e, "flush on stop failed");
            }
            if let Err(e) = instance.close().into_result() {
                warn!(sink = %self.name(), error = %e, "close on stop failed");
            }
        }
        if let Some((_, mut instance)) = self.prepared.take() {
            let _ = instance.close();
        }
        let confirmed = self.reader.confirmed();
        self.confirm(Some(confirmed), true);
    }
}

/// The sink's `config` section as the JSON text its plugin receives.
pub fn config_json(config: &SinkConfig) -> String {
    config.config.to_string()
}

/// A number in [0, 1) that differs between calls and threads (jitter needs no cryptographic quality).
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
