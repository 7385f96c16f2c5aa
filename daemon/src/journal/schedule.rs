//! When the writer starts a new file and writes a checkpoint: rotation at a period boundary of the daemon's
//! clock (or before a file passes `max_file_bytes`), a checkpoint at each rotation, every `checkpoint_every`
//! while records arrive, and at stop. Signing and syncing a checkpoint happen beside the writer.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tracing::{debug, error, info};

use crate::clock;
use crate::log::{chain, checkpoint, tree};

use super::active::ActiveFile;
use super::{Options, TICK};

/// When checkpoints were written and whether the log changed since.
pub(super) struct Schedule {
    last: Instant,
    /// The log changed since the last checkpoint.
    pub(super) changed: bool,
    /// A failed rotation is tried again only after this.
    retry_rotation: Option<Instant>,
    /// Checkpoints being written beside the writer; all are waited for before the daemon exits.
    writing: Vec<JoinHandle<()>>,
    /// The Merkle tree's cache, brought up to date by each checkpoint.
    tree: Option<Arc<tree::Keeper>>,
}

impl Schedule {
    pub(super) fn new(tree: Option<Arc<tree::Keeper>>) -> Schedule {
        Schedule {
            last: Instant::now(),
            changed: false,
            retry_rotation: None,
            writing: Vec::new(),
            tree,
        }
    }

    /// What the clock asks for: a rotation at a period boundary, a checkpoint every `checkpoint_every`.
    pub(super) fn tick(&mut self, file: &mut ActiveFile, options: &mut Options) {
        if file.rotation_due(options, 0) {
            self.rotate(file, options);
        } else if self.changed && self.last.elapsed() >= options.checkpoint_every {
            self.checkpoint(file, options, "interval");
        }
    }

    /// Closes the current file, starts the next one and writes a checkpoint that covers the closed file.
    pub(super) fn rotate(&mut self, file: &mut ActiveFile, options: &mut Options) {
        if self.retry_rotation.is_some_and(|t| Instant::now() < t) {
            return;
        }
        match file.rotate() {
            Ok(closed) => {
                self.retry_rotation = None;
                info!(closed = %closed, file = %file.path.display(), next_seq = file.next_seq, "log rotated");
                self.checkpoint(file, options, "rotation");
                if let Some(n) = &options.rotated {
                    n.notify_one();
                }
            }
            Err(e) => {
                self.retry_rotation = Some(Instant::now() + TICK);
                error!(file = %file.path.display(), error = %e, "cannot start a new log file; appending to the current one");
            }
        }
    }

    /// Waits for the checkpoints being written beside the writer: each is on disk and handed on when this returns.
    pub(super) fn finish_checkpoints(&mut self) {
        for thread in self.writing.drain(..) {
            let _ = thread.join();
        }
    }

    /// At stop: the last checkpoint, when the log changed since the one before, on disk before this returns.
    pub(super) fn stop(&mut self, file: &mut ActiveFile, options: &Options) {
        if self.changed {
            self.checkpoint(file, options, "stop");
        }
        self.finish_checkpoints();
    }

    fn checkpoint(&mut self, file: &mut ActiveFile, options: &Options, reason: &str) {
        let Some(signer) = &options.signer else {
            return;
        };
        self.last = Instant::now();
        let files = match file.entries() {
            Ok(f) => f,
            Err(e) => {
                error!(dir = %file.dir.display(), error = %e, "cannot list the log files; no checkpoint written");
                return;
            }
        };
        let mut created_at = Vec::new();
        crate::record::write_rfc3339(&mut created_at, clock::now());
        let body = checkpoint::Body {
            checkpoint: checkpoint::FORMAT,
            created_at: String::from_utf8(created_at).expect("ascii"),
            reason: reason.to_owned(),
            seq: file.last_seq_any,
            hash: chain::hex(&file.chain),
            files,
            tree_size: None,
            tree_root: None,
            key: signer.public_hex(),
        };
        // Signing and syncing the checkpoint file happen beside the writer, which goes on committing groups.
        self.changed = false;
        let reason_is_stop = reason == "stop";
        let (dir, signer, reason) = (file.dir.clone(), signer.clone(), reason.to_owned());
        let told = options.checkpointed.clone().filter(|_| !reason_is_stop);
        let tree = self.tree.clone();
        let progress = options.progress.clone();
        let created_at = body.created_at.clone();
        let spawned = std::thread::Builder::new()
            .name("trail-checkpoint".into())
            .spawn(move || {
                // The tree's catch-up hashes every record once more: work that must not take CPU from the writer
                // and the connections on a busy machine (it delays only this checkpoint).
                super::lowest_priority();
                let seq = body.seq;
                match checkpoint::write_with_tree(&dir, &signer, tree.as_deref(), body) {
                    Ok(None) => {
                        debug!(seq = ?seq, reason, "checkpoint not written: retention deleted every record it covers meanwhile")
                    }
                    Ok(Some((written, failed))) => {
                        if let Some(e) = failed {
                            error!(error = %e, "cannot compute the Merkle tree; the checkpoint was written without it");
                        }
                        debug!(file = %written.path.display(), seq = ?seq, reason, "checkpoint written");
                        if let (Some(name), Some(unix_secs)) = (
                            written.path.file_name().and_then(|n| n.to_str()),
                            super::rfc3339_secs(&created_at),
                        ) {
                            progress.set_checkpoint(super::LastCheckpoint {
                                file: name.to_owned(),
                                at: created_at,
                                unix_secs,
                                seq,
                                reason: reason.clone(),
                            });
                        }
                        if let Some(tell) = told {
                            tell(&written.path, &written.line, written.note.as_deref());
                        }
                    }
                    Err(e) => error!(dir = %dir.display(), error = %e, "cannot write a checkpoint"),
                }
            });
        self.writing.retain(|t| !t.is_finished());
        match spawned {
            // Every checkpoint, the one at stop last, must be on disk before the daemon exits: one still being
            // written when the process ends is lost.
            Ok(thread) if reason_is_stop => {
                for earlier in self.writing.drain(..) {
                    let _ = earlier.join();
                }
                let _ = thread.join();
            }
            Ok(thread) => self.writing.push(thread),
            Err(e) => {
                self.changed = true;
                error!(error = %e, "cannot start writing a checkpoint");
            }
        }
    }
}
