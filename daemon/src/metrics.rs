//! Metrics in the Prometheus text formats: what `trail metrics` (the admin socket) and the optional HTTP listener
//! (`metrics.listen`, [`http`]) serve.
//!
//! Owns the names, help texts, labels and types of every `trail_*` family and their encoding. It counts nothing on
//! hot paths itself: the few instruments recorded per event or per group are atomics owned where they are recorded
//! (the histograms of [`crate::journal::Progress`] and [`crate::ingest::Connections::ack_latency`], the per-type
//! counters of [`crate::event_types::EventType::accepted`]); everything else is read at scrape time from the typed
//! reports that `trail status` shows too (sinks, spool, connections, reloads, plugins) and from the log directory.
//! Labels are bounded: event types (as configured), sinks (as configured), plugins, reload results; never a uid,
//! an actor or a target.
//!
//! Encoding is `prometheus-client`'s, through its `Collector`, in either of its text encoders: OpenMetrics 1.0, or
//! the classic Prometheus text format 0.0.4 that Debian's `promtool check metrics` and older scrapers read (the
//! same samples; counters described by their `_total` names, the info family as a gauge, no `# UNIT` or `# EOF`).

pub mod http;

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::histogram::{Histogram, Snapshot};
use crate::ingest::Context;
use crate::journal::Progress;
use crate::reload::Reloader;
use crate::sinks::Sinks;

/// Which text format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The classic Prometheus text format, version 0.0.4 (`text/plain; version=0.0.4`).
    Prometheus,
    /// OpenMetrics 1.0 text (`application/openmetrics-text; version=1.0.0`), ending in `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The HTTP `Content-Type` of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// What the metrics are read from; shared by the admin socket, the HTTP listener and `trail status`.
pub struct Metrics {
    registry: Registry,
    inputs: Arc<Inputs>,
}

/// Everything a scrape reads.
struct Inputs {
    started_at: SystemTime,
    ctx: Arc<Context>,
    progress: Arc<Progress>,
    sinks: Option<Arc<Sinks>>,
    reloader: Arc<Reloader>,
    log_dir: PathBuf,
    retention: Arc<crate::retention::Report>,
    /// Snapshots of the fsync histogram, oldest first, for the last minute's quantiles.
    fsync_history: Mutex<VecDeque<(Instant, Snapshot)>>,
}

impl fmt::Debug for Inputs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inputs")
            .field("log_dir", &self.log_dir)
            .finish_non_exhaustive()
    }
}

/// The window of `trail status`'s fsync quantiles.
pub const FSYNC_WINDOW: Duration = Duration::from_secs(60);
/// How often the fsync histogram is sampled for that window.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The log directory's files and file system, as `trail status` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct LogReport {
    /// The log directory.
    pub dir: PathBuf,
    /// Log files (`.jsonl` and `.jsonl.zst`).
    pub files: u64,
    /// Their bytes on disk.
    pub bytes: u64,
    /// Bytes the daemon's user may still write on the log's file system (`statvfs`: available blocks).
    pub free_bytes: Option<u64>,
    /// The file system's size in bytes.
    pub filesystem_bytes: Option<u64>,
    /// The expired file that retention keeps because the tree cache does not cover it (absent when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_stalled: Option<crate::retention::Stalled>,
}

/// The fsync durations of the last minute, as `trail status` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct FsyncReport {
    /// Seconds the figures cover (60, or less shortly after start).
    pub window_secs: u64,
    /// Syncs in that window.
    pub syncs: u64,
    /// Median duration in milliseconds, estimated from the histogram's buckets; `None` without syncs.
    pub p50_ms: Option<f64>,
    /// 99th percentile in milliseconds, likewise.
    pub p99_ms: Option<f64>,
}

impl Metrics {
    /// Metrics over the daemon's parts; `log_dir` is the log directory whose files and file system are reported,
    /// `retention` what retention keeps waiting.
    pub fn new(
        ctx: Arc<Context>,
        progress: Arc<Progress>,
        sinks: Option<Arc<Sinks>>,
        reloader: Arc<Reloader>,
        log_dir: PathBuf,
        retention: Arc<crate::retention::Report>,
        started: Instant,
    ) -> Metrics {
        let first = (Instant::now(), progress.fsync.snapshot());
        let inputs = Arc::new(Inputs {
            started_at: crate::clock::now() - started.elapsed(),
            ctx,
            progress,
            sinks,
            reloader,
            log_dir,
            retention,
            fsync_history: Mutex::new(VecDeque::from([first])),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(inputs.clone())));
        Metrics { registry, inputs }
    }

    /// Every family, in `format`. Reads the sinks' status, which may wait for a reload in progress: call it from
    /// a blocking thread.
    pub fn render(&self, format: Format) -> String {
        let mut text = String::with_capacity(16 << 10);
        let encoded = match format {
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut text, &self.registry)
            }
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            }
        };
        if encoded.is_err() {
            // Writing to a String cannot fail: only a family's encoding can, and nothing of it is left out silently.
            text.push_str("# the metrics could not be encoded completely\n");
        }
        text
    }

    /// Samples the fsync histogram every few seconds for [`Metrics::fsync_recent`], until `stop`.
    pub async fn sample(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let mut history = self.inputs.history();
            history.push_back((now, self.inputs.progress.fsync.snapshot()));
            // Keep the newest snapshot at least FSYNC_WINDOW old, and none older.
            while history.len() > 2 && now.duration_since(history[1].0) >= FSYNC_WINDOW {
                history.pop_front();
            }
        }
    }

    /// The fsync durations of about the last minute.
    pub fn fsync_recent(&self) -> FsyncReport {
        let fsync = &self.inputs.progress.fsync;
        let now = Instant::now();
        let (since, then) = {
            let history = self.inputs.history();
            // The newest snapshot at least a window old, else the oldest (shortly after start).
            let base = history
                .iter()
                .rev()
                .find(|(t, _)| now.duration_since(*t) >= FSYNC_WINDOW)
                .or(history.front())
                .cloned();
            base.unwrap_or((now, fsync.snapshot()))
        };
        let recent = fsync.snapshot().since(&then);
        let ms = |q| {
            recent
                .quantile(fsync.bounds(), q)
                .map(|ns| (ns * fsync.scale() * 1e3 * 1000.0).round() / 1000.0)
        };
        FsyncReport {
            window_secs: now.duration_since(since).as_secs(),
            syncs: recent.count(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        }
    }

    /// The log directory's files, bytes and free space.
    pub fn log(&self) -> LogReport {
        self.inputs.log()
    }

    /// The newest checkpoint (see [`Progress::last_checkpoint`]).
    pub fn last_checkpoint(&self) -> Option<crate::journal::LastCheckpoint> {
        self.inputs.progress.last_checkpoint()
    }

    /// When the daemon started, RFC 3339.
    pub fn started_at(&self) -> String {
        let mut out = Vec::new();
        crate::record::write_rfc3339(&mut out, self.inputs.started_at);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Inputs {
    fn history(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Snapshot)>> {
        self.fsync_history.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self) -> LogReport {
        let (mut files, mut bytes) = (0, 0);
        if let Ok(list) = crate::log::files::list(&self.log_dir) {
            for file in list {
                if let Ok(meta) = std::fs::metadata(&file.path) {
                    files += 1;
                    bytes += meta.len();
                }
            }
        }
        let fs = nix::sys::statvfs::statvfs(&self.log_dir).ok();
        LogReport {
            dir: self.log_dir.clone(),
            files,
            bytes,
            free_bytes: fs
                .as_ref()
                .map(|s| s.blocks_available().saturating_mul(s.fragment_size())),
            filesystem_bytes: fs.map(|s| s.blocks().saturating_mul(s.fragment_size())),
            retention_stalled: self.retention.stalled(),
        }
    }
}

/// The collector: every family, read at scrape time.
#[derive(Debug)]
struct Scrape(Arc<Inputs>);

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let inputs = &self.0;
        let e = &mut e;
        let version = [("version", env!("CARGO_PKG_VERSION"))];
        let mut info = e.encode_descriptor(
            "trail_build",
            "The daemon's version (always 1).",
            None,
            MetricType::Info,
        )?;
        info.encode_info(&version)?;
        let started = inputs
            .started_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        gauge(
            e,
            "trail_start_time",
            "When the daemon started, Unix time.",
            Some(&Unit::Seconds),
            started,
        )?;

        // Events and the writer.
        counters(
            e,
            "trail_events_accepted",
            "Events stored (acknowledged once durable) since start, by event type; the daemon's own types included.",
            "type",
            &crate::event_types::accepted_counts(),
        )?;
        let refusals = &inputs.ctx.access.refusals;
        let by_code = refusals.by_code();
        let rows: Vec<(&str, u64)> = crate::protocol::ErrorCode::ALL
            .iter()
            .map(|code| (code.as_str(), by_code.get(*code)))
            .collect();
        counters(
            e,
            "trail_events_rejected",
            "Request lines answered with an error since start, by error code (too_many_connections counts connections turned away).",
            "code",
            &rows,
        )?;
        gauge(
            e,
            "trail_refused_uids",
            "Uids that had a line refused (forbidden, rate_limited or too_large) in the last minute; trail status names them.",
            None,
            refusals.uids_refused_within(Duration::from_secs(60)),
        )?;
        let progress = &inputs.progress;
        counter(
            e,
            "trail_records_stored",
            "Records the log writer stored since start (log and spool).",
            progress.records.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        histogram_family(
            e,
            "trail_ack_latency",
            "From the read that completed a request line to its ok answer written (its group durable), per event.",
            Some(&Unit::Seconds),
            inputs.ctx.connections.ack_latency(),
        )?;
        histogram_family(
            e,
            "trail_group_commit_events",
            "Records per group commit (one write and one sync).",
            None,
            &progress.group_records,
        )?;
        histogram_family(
            e,
            "trail_fsync_duration",
            "Duration of each group's sync (fdatasync of the log and the spool, at once), its write not included; only with fsync: always.",
            Some(&Unit::Seconds),
            &progress.fsync,
        )?;

        // The log and its file system.
        let log = inputs.log();
        gauge(
            e,
            "trail_log_files",
            "Log files (.jsonl and .jsonl.zst).",
            None,
            log.files,
        )?;
        gauge(
            e,
            "trail_log",
            "Bytes of the log files.",
            Some(&Unit::Bytes),
            log.bytes,
        )?;
        if let (Some(free), Some(size)) = (log.free_bytes, log.filesystem_bytes) {
            gauge(
                e,
                "trail_log_filesystem_free",
                "Bytes the daemon may still write on the log directory's file system.",
                Some(&Unit::Bytes),
                free,
            )?;
            gauge(
                e,
                "trail_log_filesystem_size",
                "Size of the log directory's file system.",
                Some(&Unit::Bytes),
                size,
            )?;
        }
        if let Some(checkpoint) = progress.last_checkpoint() {
            gauge(
                e,
                "trail_last_checkpoint_time",
                "When the newest checkpoint was written (or, before the first of this run, the last one found at start), Unix time.",
                Some(&Unit::Seconds),
                checkpoint.unix_secs,
            )?;
        }

        // Connections.
        let connections = inputs.ctx.connections.status();
        gauge(
            e,
            "trail_connections_open",
            "Client connections open now.",
            None,
            connections.open,
        )?;
        gauge(
            e,
            "trail_connections_max",
            "limits.max_connections.",
            None,
            connections.max,
        )?;
        counter(
            e,
            "trail_connections_refused",
            "Clients turned away by limits.max_connections since start.",
            connections.refused,
        )?;
        counter(
            e,
            "trail_connections_idle_closed",
            "Connections closed for being idle (limits.idle_timeout) since start.",
            connections.idle_closed,
        )?;

        // Configuration and reloads.
        let configuration = inputs.reloader.status();
        gauge(
            e,
            "trail_config_generation",
            "The configuration generation in force (1 at start, one more with each applied reload).",
            None,
            configuration.generation,
        )?;
        counters(
            e,
            "trail_reloads",
            "Configuration reloads since start, by result (applied, or refused: nothing changed).",
            "result",
            &[
                ("applied", configuration.reloads_applied),
                ("refused", configuration.reloads_refused),
            ],
        )?;
        if let Some(sinks) = &inputs.sinks {
            sink_families(e, &sinks.status())?;
        }
        Ok(())
    }
}

/// The sinks', plugins' and spool's families, from the sinks' typed report.
fn sink_families(e: &mut DescriptorEncoder, report: &crate::sinks::Report) -> fmt::Result {
    fn per_sink(
        report: &crate::sinks::Report,
        field: fn(&crate::sinks::SinkReport) -> u64,
    ) -> Vec<(&str, u64)> {
        report
            .sinks
            .iter()
            .map(|s| (s.name.as_str(), field(s)))
            .collect()
    }
    let by_sink = |field: fn(&crate::sinks::SinkReport) -> u64| per_sink(report, field);
    counters(
        e,
        "trail_sink_delivered",
        "Records delivered (the plugin's write and flush succeeded), by sink.",
        "sink",
        &by_sink(|s| s.delivered),
    )?;
    counters(
        e,
        "trail_sink_retries",
        "Failed writes that were retried, by sink.",
        "sink",
        &by_sink(|s| s.retries),
    )?;
    counters(
        e,
        "trail_sink_dead_lettered",
        "Records written to the sink's dead-letter file, by sink.",
        "sink",
        &by_sink(|s| s.dead_lettered),
    )?;
    counters(
        e,
        "trail_sink_dropped",
        "Records the sink skipped because the spool was full (when_full: drop_oldest), by sink.",
        "sink",
        &by_sink(|s| s.dropped),
    )?;
    counters(
        e,
        "trail_sink_panics",
        "Panics caught in the sink's plugin, by sink.",
        "sink",
        &by_sink(|s| s.panics),
    )?;
    gauges(
        e,
        "trail_sink_backlog_events",
        "Spool records after the sink's confirmed position, by sink.",
        None,
        "sink",
        &by_sink(|s| s.backlog_events),
    )?;
    gauges(
        e,
        "trail_sink_backlog",
        "Spool bytes after the sink's confirmed position, by sink.",
        Some(&Unit::Bytes),
        "sink",
        &by_sink(|s| s.backlog_bytes),
    )?;
    let ages: Vec<(&str, f64)> = report
        .sinks
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.oldest_undelivered_age_secs.unwrap_or(0.0),
            )
        })
        .collect();
    gauges(
        e,
        "trail_sink_oldest_undelivered_age",
        "Age of the oldest record the sink has not confirmed (0 when it has everything), by sink.",
        Some(&Unit::Seconds),
        "sink",
        &ages,
    )?;
    if !report.sinks.is_empty() {
        let mut m = e.encode_descriptor(
            "trail_sink_state",
            "1 for the sink's state, 0 for the others: idle (nothing to deliver), delivering, retrying (the last write failed), stuck (records waiting and none delivered for stuck_after).",
            None,
            MetricType::Gauge,
        )?;
        for s in &report.sinks {
            for state in crate::sinks::SINK_STATES {
                let labels = [("sink", s.name.as_str()), ("state", *state)];
                m.encode_family(&labels)?
                    .encode_gauge(&u64::from(*state == s.state))?;
            }
        }
    }
    gauge(
        e,
        "trail_spool_backlog",
        "Spool bytes not yet confirmed by every sink (what spool.max_bytes bounds).",
        Some(&Unit::Bytes),
        report.spool.backlog_bytes,
    )?;
    let plugins: Vec<(&str, u64)> = report
        .plugins
        .iter()
        .map(|p| (p.name.as_str(), p.generation))
        .collect();
    gauges(
        e,
        "trail_plugin_generation",
        "The serving build's generation, by plugin (1 at start, one more with each reload of its library).",
        None,
        "plugin",
        &plugins,
    )?;
    gauge(
        e,
        "trail_plugin_libraries_mapped",
        "Plugin libraries loaded since start (never unloaded, so every build stays mapped).",
        None,
        report.libraries_mapped,
    )
}

/// A counter without labels. `name` is without `_total`, which the encoder adds.
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

/// A counter family with one label, from a snapshot of `(label value, count)` rows (none: the family is left
/// out). A family fed by another part's report (rejections by code, say) is one call of this.
fn counters<V: AsRef<str>>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    key: &str,
    rows: &[(V, u64)],
) -> fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in rows {
        let labels = [(key, value.as_ref())];
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(n, None)?;
    }
    Ok(())
}

/// A gauge without labels.
fn gauge<T: prometheus_client::encoding::EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: T,
) -> fmt::Result {
    e.encode_descriptor(name, help, unit, MetricType::Gauge)?
        .encode_gauge(&value)
}

/// A gauge family with one label, from `(label value, value)` rows (none: left out).
fn gauges<V: AsRef<str>, T: prometheus_client::encoding::EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    key: &str,
    rows: &[(V, T)],
) -> fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (value, n) in rows {
        let labels = [(key, value.as_ref())];
        m.encode_family(&labels)?.encode_gauge(n)?;
    }
    Ok(())
}

/// A histogram without labels, from one of [`histogram`]'s.
fn histogram_family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    h: &Histogram,
) -> fmt::Result {
    let snapshot = h.snapshot();
    let scale = h.scale();
    let buckets: Vec<(f64, u64)> = h
        .bounds()
        .iter()
        .map(|&b| b as f64 * scale)
        .chain([f64::INFINITY])
        .zip(snapshot.counts.iter().copied())
        .collect();
    e.encode_descriptor(name, help, unit, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(
            snapshot.sum as f64 * scale,
            snapshot.count(),
            &buckets,
            None,
        )
}
