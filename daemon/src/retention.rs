//! Upkeep of closed log files: sidecar indexes, compression, and retention.
//!
//! Owns what happens to a file after the journal writer closed it. Runs after every rotation and once a minute:
//! it indexes closed files that have no index, compresses them when `log.compress` is set, and deletes the oldest
//! closed files that retention expires. The file being appended to (the newest) is never touched.
//!
//! Deletion keeps the chain verifiable: before a file is deleted, a `trail_log_file_deleted` record naming it,
//! its `seq` range and the hash of its last record is written to the log (through the journal, like any of the
//! daemon's own events); the file is deleted only once that record is durable, and only ever the oldest files,
//! so the log never has holes. The record also keeps the Merkle tree as it stood at the file's last record (size,
//! root and the compact range, `tree_frontier`), so that `trail verify` can check the roots of the checkpoints
//! that follow from the records that remain. Retention brings the tree cache up to the file's end itself (through
//! the daemon's [`tree::Keeper`]); when it cannot (the cache cannot be written), the file is kept: a file whose
//! leaves the cache lacks is never deleted. Such a wait is shown in `trail status` ([`Stalled`]) and, once it is
//! longer than three `checkpoint_every`, logged as a warning at every round. Only a log that has no tree left to
//! keep (its first files were deleted without one, by daemons before this rule) deletes files without it. The
//! spool refers to records that are in the log instead of holding them twice, so a file is never deleted while it
//! holds a record some sink has not confirmed: retention waits for the sinks.
//!
//! Compression is crash-safe: `X.jsonl.zst` is written aside, synced and renamed into place before `X.jsonl` is
//! deleted; if both exist, `X.jsonl` is the file and the other is redone. Each index block is one zstd frame, so
//! search can decompress only the blocks it needs, and the file is still an ordinary zstd stream.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::LogConfig;
use crate::log::checkpoint::{self, FileEntry};
use crate::log::files::{self, LogFile};
use crate::log::index::{self, Index};
use crate::log::{chain, tree};

/// zstd level for closed files: fast, and about 8x on audit records.
const LEVEL: i32 = 3;

/// What retention and compression do.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Closed files older than this are deleted.
    pub retention: Option<Duration>,
    /// The oldest closed files are deleted while all files together are larger than this.
    pub retention_bytes: Option<u64>,
    /// Files holding these types (globs) are kept at least this long.
    pub by_type: Vec<(String, Duration)>,
    /// Compress closed files.
    pub compress: bool,
    /// How often checkpoints bring the tree cache up to date: an expired file kept for the tree cache longer than
    /// three of these is warned about.
    pub checkpoint_every: Duration,
}

impl Policy {
    /// The policy a log configuration asks for.
    pub fn of(log: &LogConfig) -> Policy {
        Policy {
            retention: log.retention,
            retention_bytes: log.retention_bytes,
            by_type: log.retention_by_type.clone(),
            compress: log.compress,
            checkpoint_every: log.checkpoint_every,
        }
    }
}

/// An expired file kept because the tree cache does not cover it, as `trail status` shows it (`log.retention_stalled`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stalled {
    /// The file kept.
    pub file: String,
    /// Why retention expires it: `age` or `size`.
    pub expired_by: &'static str,
    /// Since when it has been kept, RFC 3339.
    pub since: String,
    /// For how long, in seconds.
    pub waited_seconds: u64,
    /// The wait after which it is warned about (three `checkpoint_every`), in seconds.
    pub warn_after_seconds: u64,
    /// Why the tree cache cannot be brought up to the file's end.
    pub error: String,
}

/// What `trail status` shows of retention: the expired file it keeps for the tree cache, if any.
#[derive(Debug, Default)]
pub struct Report {
    stalled: std::sync::Mutex<Option<(Stalled, std::time::Instant)>>,
}

impl Report {
    /// The expired file kept for the tree cache at the last round, with its wait up to now.
    pub fn stalled(&self) -> Option<Stalled> {
        let kept = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        kept.as_ref().map(|(s, since)| Stalled {
            waited_seconds: since.elapsed().as_secs(),
            ..s.clone()
        })
    }

    fn set(&self, stalled: Option<(Stalled, std::time::Instant)>) {
        *self.stalled.lock().unwrap_or_else(|e| e.into_inner()) = stalled;
    }
}

/// An expired file that the tree cache does not cover and that cannot be brought up to it now.
#[derive(Debug, Clone)]
pub struct Blocked {
    /// The file.
    pub file: LogFile,
    /// `age` or `size`.
    pub reason: &'static str,
    /// Why.
    pub error: String,
}

/// A closed file that retention wants deleted.
#[derive(Debug, Clone)]
pub struct Expired {
    /// The file.
    pub file: LogFile,
    /// Its range and last hash.
    pub entry: FileEntry,
    /// Records in it.
    pub records: u64,
    /// `age` or `size`.
    pub reason: &'static str,
    /// The Merkle tree at its last record (none when the log has no tree left: its first files were deleted
    /// without one).
    pub tree: Option<tree::At>,
}

/// What a round of upkeep found: the files to delete, oldest first, and the expired file kept for the tree cache.
#[derive(Debug, Default)]
pub struct Tidied {
    /// Files to delete, oldest first.
    pub expired: Vec<Expired>,
    /// The first expired file kept because the tree cache does not cover it.
    pub blocked: Option<Blocked>,
}

/// Indexes and (per policy) compresses every closed file of `dir`, then returns the files retention expires at
/// `now`, oldest first, stopping before the first file that holds `unconfirmed` (the lowest `seq` some sink has not
/// confirmed) or a later record, and before the first one whose end the tree cache (`tree`) cannot be brought up to.
pub fn tidy(
    dir: &Path,
    policy: &Policy,
    now: SystemTime,
    unconfirmed: Option<u64>,
    tree: &tree::Keeper,
) -> io::Result<Tidied> {
    let mut files = files::list(dir)?;
    // The newest file is being appended to.
    let newest = files.pop();
    let mut closed: Vec<(LogFile, Index)> = Vec::with_capacity(files.len());
    for f in files {
        let mut f = f;
        let mut ix = index::get(&f, true)?;
        if policy.compress && !f.compressed {
            match compress(&f, &ix) {
                Ok((zf, zix)) => {
                    (f, ix) = (zf, zix);
                }
                Err(e) => {
                    warn!(file = %f.path.display(), error = %e, "cannot compress a closed log file")
                }
            }
        }
        closed.push((f, ix));
    }
    let mut total: u64 = closed.iter().map(|(_, ix)| ix.size).sum();
    if let Some(newest) = &newest {
        total += std::fs::metadata(&newest.path)
            .map(|m| m.len())
            .unwrap_or(0);
    }
    let now_secs = crate::clock::unix_secs(now);
    let mut expired = Vec::new();
    let mut blocked = None;
    for i in 0..closed.len() {
        let (f, ix) = &closed[i];
        // Every record of a closed file was written before the next file was started.
        let end = closed
            .get(i + 1)
            .map(|(n, _)| n.start)
            .or(newest.as_ref().map(|n| n.start))
            .unwrap_or(now_secs);
        let age = Duration::from_secs((now_secs - end).max(0) as u64);
        let keep_for = ix
            .types
            .keys()
            .flat_map(|t| {
                policy
                    .by_type
                    .iter()
                    .filter(move |(g, _)| crate::filter::glob(g, t))
                    .map(|(_, d)| *d)
            })
            .chain(policy.retention)
            .max();
        let reason = if policy.retention_bytes.is_some_and(|max| total > max) {
            "size"
        } else if policy.retention.is_some() && keep_for.is_some_and(|k| age > k) {
            "age"
        } else {
            break;
        };
        let entry = ix.entry(f);
        if let Some(seq) = unconfirmed.filter(|&s| entry.last_seq.is_some_and(|l| l >= s)) {
            info!(
                file = %f.path.display(), reason, unconfirmed = seq,
                "an expired log file is kept: a sink has not confirmed all of its records yet"
            );
            break;
        }
        // The deletion record keeps the tree at the file's last record, so that the roots of the checkpoints
        // after it can still be checked from the records that remain. The rotation's checkpoint usually brought the
        // tree cache up to the file's end already; if not, it is brought there now, and a file whose end it cannot
        // reach waits.
        let tree = match entry.last_seq.map(|s| tree.at(s)) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e @ tree::Error::Gone { .. })) => {
                // No tree can ever be computed for this log again: waiting would keep every file forever.
                warn!(
                    file = %f.path.display(), error = %e,
                    "the log has no Merkle tree left to keep (its first files were deleted without one): the deletion record cannot keep the tree, and trail verify will not check the roots after it"
                );
                None
            }
            Some(Err(e)) => {
                blocked = Some(Blocked {
                    file: f.clone(),
                    reason,
                    error: e.to_string(),
                });
                break;
            }
        };
        total -= ix.size;
        expired.push(Expired {
            file: f.clone(),
            entry,
            records: ix.records,
            reason,
            tree,
        });
    }
    Ok(Tidied { expired, blocked })
}

/// Compresses a closed file, one zstd frame per index block; returns the compressed file and its index.
fn compress(file: &LogFile, ix: &Index) -> io::Result<(LogFile, Index)> {
    let mut zname = file.path.clone().into_os_string();
    zname.push(files::ZST);
    let zpath = std::path::PathBuf::from(zname);
    let mut tmp = zpath.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let source = File::open(&file.path)?;
    let result = compress_into(file, ix, &source, &tmp, &zpath);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes the frames of `file` to `tmp` and renames it to `zpath`; see [`compress`].
fn compress_into(
    file: &LogFile,
    ix: &Index,
    source: &File,
    tmp: &std::path::Path,
    zpath: &std::path::Path,
) -> io::Result<(LogFile, Index)> {
    let mut out = crate::modes::create(tmp)?;
    let mut zix = ix.clone();
    let mut zoff = 0u64;
    let mut buf = Vec::new();
    for block in &mut zix.blocks {
        buf.resize(block.len as usize, 0);
        source.read_exact_at(&mut buf, block.off)?;
        let frame = zstd::bulk::compress(&buf, LEVEL)?;
        out.write_all(&frame)?;
        block.zoff = zoff;
        block.zlen = frame.len() as u64;
        zoff += frame.len() as u64;
    }
    out.sync_all()?;
    drop(out);
    std::fs::rename(tmp, zpath)?;
    let zfile = LogFile::parse(zpath).ok_or_else(|| io::Error::other("compressed name"))?;
    zix.file = zpath
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    zix.size = zoff;
    zix.framed = true;
    index::store(&zfile, &zix)?;
    std::fs::remove_file(&file.path)?;
    let _ = std::fs::remove_file(file.index_path());
    if let Some(dir) = file.path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok((zfile, zix))
}

/// Deletes an expired file and its index, and the checkpoints that vouch only for records older than every file
/// left; no checkpoint is written meanwhile (and none over those records after it: see
/// [`tree::Keeper::files_lock`]).
pub fn delete(dir: &Path, expired: &Expired, tree: &tree::Keeper) -> io::Result<()> {
    let _writing = tree.files_lock();
    std::fs::remove_file(&expired.file.path)?;
    let _ = std::fs::remove_file(expired.file.index_path());
    File::open(dir)?.sync_all()?;
    if let Some(oldest) = files::list(dir)?.first() {
        for path in checkpoint::list(dir) {
            let seq = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.rsplit('-').next())
                .and_then(|s| s.parse::<u64>().ok());
            if seq.is_some_and(|s| s < oldest.first_seq) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    Ok(())
}

/// Removes what an interrupted compression left: a compressed copy of a file that still exists uncompressed.
fn clean_up(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.ends_with(".zst.tmp") {
            let _ = std::fs::remove_file(&path);
        } else if let Some(plain) = name.strip_suffix(files::ZST)
            && dir.join(plain).exists()
        {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(dir.join(format!("{name}.idx")));
        }
    }
}

/// Runs `work` on a thread of its own at the lowest CPU priority, so that indexing and compressing closed files
/// never delays acknowledgements on a busy machine; `None` when the thread could not run it.
async fn in_background<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("trail-upkeep".into())
        .spawn(move || {
            crate::journal::lowest_priority();
            let _ = tx.send(work());
        });
    if spawned.is_err() {
        return None;
    }
    rx.await.ok()
}

/// What retention works with beside the log directory.
pub struct Upkeep {
    /// The log directory.
    pub dir: std::path::PathBuf,
    /// The policy in force (a reload replaces it).
    pub policy: Arc<std::sync::Mutex<Policy>>,
    /// The spool, whose cursors say what sinks have confirmed.
    pub spool: Option<crate::spool::Spool>,
    /// The tree cache.
    pub tree: Arc<tree::Keeper>,
    /// Told of every rotation (and of a reload).
    pub rotated: Arc<Notify>,
    /// What `trail status` shows.
    pub report: Arc<Report>,
}

/// Runs upkeep after every rotation and once a minute until `stop` (every `checkpoint_every` while an expired file
/// waits for the tree cache); deletion records go through `record`, which resolves once the record is durable (or
/// failed).
pub async fn run<R, F>(upkeep: Upkeep, stop: CancellationToken, record: R)
where
    R: Fn(Vec<u8>) -> F,
    F: std::future::Future<Output = Result<u64, String>>,
{
    let Upkeep {
        dir,
        policy,
        spool,
        tree,
        rotated,
        report,
    } = upkeep;
    {
        let dir = dir.clone();
        let _ = tokio::task::spawn_blocking(move || clean_up(&dir)).await;
    }
    // The file kept for the tree cache, and since when (it waits as long as it stays the one kept).
    let mut kept: Option<(String, std::time::Instant, SystemTime)> = None;
    loop {
        // Read at every round: a reload may have changed it (and wakes this task through `rotated`).
        let p = policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (d, s, t) = (dir.clone(), spool.clone(), tree.clone());
        let checkpoint_every = p.checkpoint_every;
        let upkeep = move || {
            let unconfirmed = match &s {
                Some(spool) => spool.oldest_unconfirmed()?,
                None => None,
            };
            tidy(&d, &p, crate::clock::now(), unconfirmed, &t)
        };
        let tidied = match in_background(upkeep).await {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                error!(dir = %dir.display(), error = %e, "log upkeep failed");
                Tidied::default()
            }
            None => Tidied::default(),
        };
        let stalled = tidied.blocked.is_some();
        match &tidied.blocked {
            Some(b) => {
                let (since_instant, at) = match &kept {
                    Some((name, since, at)) if *name == b.file.name => (*since, *at),
                    _ => (std::time::Instant::now(), crate::clock::now()),
                };
                kept = Some((b.file.name.clone(), since_instant, at));
                let waited = since_instant.elapsed();
                let bound = checkpoint_every * 3;
                if waited > bound {
                    warn!(
                        file = %b.file.path.display(), reason = b.reason, waited_secs = waited.as_secs(), error = %b.error,
                        "an expired log file is kept: the tree cache does not cover it and cannot be brought up to its end, and the deletion record must keep the Merkle tree there; it is deleted once the cache can be updated"
                    );
                } else {
                    info!(
                        file = %b.file.path.display(), reason = b.reason, waited_secs = waited.as_secs(), error = %b.error,
                        "an expired log file is kept until the tree cache covers it"
                    );
                }
                let mut since = Vec::new();
                crate::record::write_rfc3339(&mut since, at);
                report.set(Some((
                    Stalled {
                        file: b.file.name.clone(),
                        expired_by: b.reason,
                        since: String::from_utf8(since).unwrap_or_default(),
                        waited_seconds: waited.as_secs(),
                        warn_after_seconds: bound.as_secs(),
                        error: b.error.clone(),
                    },
                    since_instant,
                )));
            }
            None => {
                kept = None;
                report.set(None);
            }
        }
        let expired = tidied.expired;
        for e in expired {
            let line = deletion_request(&e);
            match record(line).await {
                Ok(seq) => {
                    let (d, ex, t) = (dir.clone(), e.clone(), tree.clone());
                    match tokio::task::spawn_blocking(move || delete(&d, &ex, &t)).await {
                        Ok(Ok(())) => info!(
                            file = %e.file.path.display(), reason = e.reason, recorded_as = seq,
                            "deleted an expired log file (no sink was waiting for its records)"
                        ),
                        Ok(Err(err)) => {
                            error!(file = %e.file.path.display(), error = %err, "cannot delete an expired log file");
                            break;
                        }
                        Err(_) => break,
                    }
                }
                Err(reason) => {
                    warn!(file = %e.file.path.display(), error = %reason, "cannot record a log file deletion; the file is kept");
                    break;
                }
            }
        }
        // A file waiting for the tree cache is looked at again after every checkpoint interval.
        let next_round = if stalled {
            checkpoint_every.clamp(Duration::from_secs(1), Duration::from_secs(60))
        } else {
            Duration::from_secs(60)
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = rotated.notified() => {}
            _ = tokio::time::sleep(next_round) => {}
        }
    }
}

/// The daemon's own request that records a deletion.
pub fn deletion_request(e: &Expired) -> Vec<u8> {
    let mut payload = json!({
        "file": e.entry.name,
        "first_seq": e.entry.first_seq,
        "records": e.records,
        "bytes": e.entry.bytes,
        "reason": e.reason,
    });
    if let (Some(seq), Some(hash)) = (e.entry.last_seq, &e.entry.last_hash) {
        payload["last_seq"] = json!(seq);
        payload["last_hash"] = json!(hash);
    }
    if let Some(t) = &e.tree {
        payload["tree_size"] = json!(t.size);
        payload["tree_root"] = json!(chain::hex(&t.root.0));
        payload["tree_frontier"] = json!(
            t.frontier
                .iter()
                .map(|h| chain::hex(&h.0))
                .collect::<Vec<_>>()
        );
    }
    let request = json!({
        "type": "trail_log_file_deleted",
        "actor": {"id": "traild", "name": "trail daemon", "type": "system"},
        "target": {"type": "log_file", "id": e.entry.name},
        "message": format!("deleted log file {} ({} records, retention by {})", e.entry.name, e.records, e.reason),
        "outcome": "success",
        "payload": payload,
    });
    serde_json::to_vec(&request).expect("serializable")
}
