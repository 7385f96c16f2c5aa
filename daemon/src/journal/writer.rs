//! The group-commit loop on the writer thread: gather whatever submissions wait (up to `GROUP_BYTES`), seal them
//! into a group, commit it in parts when the spool cannot take all of it now, answer every submission, and let
//! the schedule rotate files and write checkpoints.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{debug, error, info};

use crate::config::FsyncPolicy;

use super::active::ActiveFile;
use super::commit::commit;
use super::group::Group;
use super::schedule::Schedule;
use super::submit::{Message, Spares, Submission};
use super::{GROUP_BYTES, Options};

/// Runs until every submitter is gone and the queue is drained; then syncs the log, writes the last checkpoint
/// and closes the spool's writing end.
pub(super) fn run(
    mut file: ActiveFile,
    mut rx: mpsc::Receiver<Message>,
    mut options: Options,
    spares: &Spares,
) {
    let mut queued: Vec<Submission> = Vec::new();
    let mut group = Group::with_capacity(GROUP_BYTES + (1 << 20));
    let sync = options.fsync == FsyncPolicy::Always;
    let mut schedule = Schedule::new(options.tree.clone());
    file.point_current();
    let mut submitted_since_tick = false;
    while let Some(message) = rx.blocking_recv() {
        let first = match message {
            Message::Tick => {
                if !std::mem::take(&mut submitted_since_tick) && rx.is_empty() {
                    options.progress.waiting.store(false, Ordering::Relaxed);
                }
                schedule.tick(&mut file, &mut options);
                continue;
            }
            Message::Settings(new) => {
                apply(&mut options, new);
                continue;
            }
            // Everything before it is committed (groups are committed before the next message is taken).
            Message::Barrier(done) => {
                let _ = done.send(());
                continue;
            }
            Message::Checkpoints(done) => {
                schedule.finish_checkpoints();
                let _ = done.send(());
                continue;
            }
            Message::Submit(s) => s,
        };
        submitted_since_tick = true;
        // Also set here: a submitter may have set it just before the writer cleared it.
        options.progress.waiting.store(true, Ordering::Relaxed);
        let mut ticked = false;
        let mut settings = None;
        // Answered once this group is committed: what was submitted before them is in it.
        let mut barriers = Vec::new();
        let mut checkpoints = Vec::new();
        let mut bytes = first.batch.bytes();
        queued.push(first);
        while bytes < GROUP_BYTES {
            match rx.try_recv() {
                Ok(Message::Submit(s)) => {
                    bytes += s.batch.bytes();
                    queued.push(s);
                }
                Ok(Message::Tick) => ticked = true,
                Ok(Message::Barrier(done)) => barriers.push(done),
                Ok(Message::Checkpoints(done)) => checkpoints.push(done),
                // Applied after this group: what was submitted before it is written under the old settings.
                Ok(Message::Settings(new)) => {
                    settings = Some(new);
                    break;
                }
                Err(_) => break,
            }
        }
        // Commit the group in parts when the spool cannot take all of it now: what fits is acknowledged
        // without waiting for room for the rest.
        let mut pending = &mut queued[..];
        let mut failed = false;
        while !pending.is_empty() {
            group.begin(file.next_seq, file.chain);
            let spool = options.spool.as_ref();
            let taken = pending
                .iter()
                .take_while(|s| group.add(&s.batch, |b| spool.is_none_or(|w| w.fits(b))))
                .count();
            let (part, rest) = std::mem::take(&mut pending).split_at_mut(taken);
            pending = rest;
            if group.log_bytes() > 0 && file.rotation_due(&options, group.log_bytes()) {
                schedule.rotate(&mut file, &mut options);
            }
            let started = Instant::now();
            match commit(&mut file, &mut group, sync, &mut options) {
                Ok(()) => {
                    let after = file.last_seq_any;
                    if file.advance(group.head()) {
                        schedule.changed = true;
                        if let Some(tree) = &options.tree {
                            tree.feed(after, group.leaves());
                        }
                    }
                    let mut seq = group.first_seq();
                    for s in part.iter_mut() {
                        s.batch.stored();
                        s.answer(Ok(seq));
                        seq += s.batch.len() as u64;
                    }
                    let progress = &options.progress;
                    progress
                        .records
                        .fetch_add(group.records(), Ordering::Relaxed);
                    progress.group_records.observe(group.records());
                    progress.heartbeat.fetch_add(1, Ordering::Relaxed);
                    debug!(records = group.records(), bytes = group.log_bytes() + group.spool_bytes(), elapsed = ?started.elapsed(), "group committed");
                }
                Err(reason) => {
                    failed = true;
                    error!(file = %file.path.display(), error = %reason, records = group.records(), "cannot store events; answering unavailable");
                    for s in part.iter_mut() {
                        s.answer(Err(reason.clone()));
                    }
                }
            }
        }
        // Answered (or dropped unanswered, which the submitter sees as a closed channel): the batches are free.
        for s in queued.drain(..) {
            spares.keep(s.batch);
        }
        for done in barriers {
            let _ = done.send(());
        }
        if !checkpoints.is_empty() {
            schedule.finish_checkpoints();
            for done in checkpoints {
                let _ = done.send(());
            }
        }
        if let Some(new) = settings {
            apply(&mut options, new);
        }
        if !failed && rx.is_empty() {
            options.progress.waiting.store(false, Ordering::Relaxed);
        }
        if ticked {
            schedule.tick(&mut file, &mut options);
        }
    }
    if let Err(e) = file.out.file().sync_all() {
        error!(file = %file.path.display(), error = %e, "final sync failed");
    }
    schedule.stop(&mut file, &options);
    if let Some(spool) = &options.spool {
        spool.close();
    }
    info!(next_seq = file.next_seq, "log closed");
}

/// Puts a reload's settings in force.
fn apply(options: &mut Options, new: super::Settings) {
    info!(rotate = ?new.rotate, max_file_bytes = new.max_file_bytes, checkpoint_every = ?new.checkpoint_every, "log writer settings changed");
    options.rotate = new.rotate;
    options.max_file_bytes = new.max_file_bytes;
    options.checkpoint_every = new.checkpoint_every;
}
