//! What the daemon finds in its log directory when it starts: the last checkpoint, and records that follow a stop.
//!
//! Owns the start-up check of the rule "nothing follows a stop checkpoint until the next start": a `stop`
//! checkpoint (format 2) is written after the daemon's last record, and every start records `trail_started` as the
//! first record it appends, so a record found after a stop checkpoint that is not the daemon's `trail_started` was
//! added while the daemon was not running. The finding is reported (the daemon logs it and records
//! `trail_log_tampered`); it never stops the daemon from starting. `trail verify` applies the same rule offline.

use std::io::Read;
use std::path::Path;

use ed25519_dalek::VerifyingKey;

use super::checkpoint::{self, Checkpoint};
use super::files::{self, Chunk, Chunks};

/// The record type every start of the daemon writes first.
pub const STARTED: &str = "trail_started";

/// The newest checkpoint whose signature the daemon's key verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Last {
    /// Its file name in `checkpoints/`.
    pub name: String,
    /// `rotation`, `interval` or `stop`.
    pub reason: String,
    /// The last `seq` it covers (absent when the log had no records).
    pub seq: Option<u64>,
    /// The chain head it signed.
    pub hash: String,
    /// The checkpoint's line, as signed.
    pub line: Vec<u8>,
    /// Its C2SP note, when one was written beside it.
    pub note: Option<Vec<u8>>,
}

/// Records found after a stop checkpoint and before any start record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    /// The log file holding the first of them.
    pub file: String,
    /// The first one's `seq`.
    pub first_seq: u64,
    /// The last one's `seq`.
    pub last_seq: u64,
    /// How many there are.
    pub records: u64,
}

/// What [`inspect`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// The last checkpoint, if any.
    pub checkpoint: Option<Last>,
    /// Records after a stop checkpoint, if any.
    pub foreign: Option<Foreign>,
}

/// Looks at the log in `dir` as it is before the daemon appends to it. Checkpoints are tried newest first (by
/// `seq`, then name) until one verifies with `key`; files that cannot be read are skipped (recovery reports them).
pub fn inspect(dir: &Path, key: &VerifyingKey) -> Found {
    let mut names = checkpoint::list(dir);
    // `checkpoint-<time>-<seq, 20 digits>.json`: the highest seq first, the newest time among equal seqs.
    let seq_of = |p: &std::path::PathBuf| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.rsplit('-').next())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    names.sort_by(|a, b| (seq_of(b), b).cmp(&(seq_of(a), a)));
    let Some((name, cp, line)) = names.iter().find_map(|p| {
        let line = std::fs::read(p).ok()?;
        let cp = Checkpoint::parse(&line).ok()?;
        cp.check_signature(Some(key)).ok()?;
        Some((p.file_name()?.to_str()?.to_owned(), cp, line))
    }) else {
        return Found::default();
    };
    let last = Last {
        reason: cp.body.reason.clone(),
        seq: cp.body.seq,
        hash: cp.body.hash.clone(),
        note: std::fs::read(dir.join(checkpoint::DIR).join(checkpoint::note_name(&name))).ok(),
        name,
        line,
    };
    let foreign = if cp.body.reason == "stop" && cp.body.checkpoint >= 2 {
        after_stop(dir, &cp)
    } else {
        None
    };
    Found {
        checkpoint: Some(last),
        foreign,
    }
}

/// The records after the stop checkpoint `cp` up to the first start record: they begin where the file open at the
/// stop ended (its length in the checkpoint), or in the files after it.
fn after_stop(dir: &Path, cp: &Checkpoint) -> Option<Foreign> {
    let open = cp.body.files.last()?;
    let logs = files::list(dir).ok()?;
    let mut found: Option<Foreign> = None;
    for file in logs.iter().filter(|f| f.name >= open.name) {
        let Ok(mut reader) = file.open() else {
            continue;
        };
        if file.name == open.name {
            let skipped = std::io::copy(&mut (&mut reader).take(open.bytes), &mut std::io::sink());
            if skipped.ok() != Some(open.bytes) {
                continue;
            }
        }
        let mut chunks = Chunks::new(reader, 1 << 20);
        while let Ok(Some(Chunk::Lines(_, lines))) = chunks.next_chunk() {
            for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let Some(seq) = crate::record::line::seq(line) else {
                    continue;
                };
                if cp.body.seq.is_some_and(|s| seq <= s) {
                    continue;
                }
                if crate::record::line::own_type(line).as_deref() == Some(STARTED) {
                    return found;
                }
                match &mut found {
                    Some(f) => {
                        f.last_seq = seq;
                        f.records += 1;
                    }
                    None => {
                        found = Some(Foreign {
                            file: file
                                .path
                                .file_name()
                                .and_then(|n| n.to_str())
                                .unwrap_or(&file.name)
                                .to_owned(),
                            first_seq: seq,
                            last_seq: seq,
                            records: 1,
                        })
                    }
                }
            }
        }
    }
    found
}
