//! The log-plus-spool commit of one group: reserve room in the spool, append to both files, sync both at once,
//! publish the spool's part to sinks; on any failure, nothing of the group remains in either file.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::spool;

use super::Options;
use super::active::ActiveFile;
use super::group::Group;
use super::submit::Unavailable;

/// Writes a group to the log and the spool; on success both are durable (per `sync`), the spooled records are
/// visible to sinks and the log's are in the file's index. On failure nothing of the group remains in either.
pub(super) fn commit(
    file: &mut ActiveFile,
    group: &mut Group,
    sync: bool,
    options: &mut Options,
) -> Result<(), Unavailable> {
    let from = file.out.len();
    write(file, group, sync, options)?;
    file.committed(from, group.parts().0);
    Ok(())
}

fn write(
    file: &mut ActiveFile,
    group: &mut Group,
    sync: bool,
    options: &mut Options,
) -> Result<(), Unavailable> {
    let (persisted, streamed) = group.parts();
    let spool = match (&mut options.spool, streamed.is_empty()) {
        (_, true) => None,
        (Some(spool), false) => Some(spool),
        (None, false) => {
            return Err(Unavailable(
                "no spool is configured for streamed events".into(),
            ));
        }
    };
    if let Some(spool) = spool {
        let (stopping, progress) = (options.stopping.clone(), options.progress.clone());
        let waiting = || {
            progress.heartbeat.fetch_add(1, Ordering::Relaxed);
            stopping.load(Ordering::Relaxed)
        };
        spool
            .reserve(streamed.file_len(), &waiting)
            .map_err(|e| Unavailable(format!("{e}; retry later")))?;
        if !persisted.is_empty() {
            file.out.append(persisted, false).map_err(|e| {
                Unavailable(format!("the log cannot be written ({e}); retry later"))
            })?;
        }
        let spool_sync = match spool.append(streamed) {
            Ok(needed) => needed,
            Err(e) => {
                file.out.undo(persisted.len() as u64);
                return Err(Unavailable(format!(
                    "the spool cannot be written ({e}); retry later"
                )));
            }
        };
        if sync {
            // Both files are synced at once: the group waits for the slower of the two, not for their sum. The
            // spool only when it holds something the log does not (see `spool::Writer::append`).
            let started = Instant::now();
            let spool_synced = spool_sync.then(|| spool.start_sync());
            let log_synced = if persisted.is_empty() {
                Ok(())
            } else {
                file.out.file().sync_data()
            };
            let synced = log_synced.and(spool_synced.map_or(Ok(()), spool::PendingSync::wait));
            if let Err(e) = synced {
                file.out.undo(persisted.len() as u64);
                spool.undo(streamed.file_len());
                return Err(Unavailable(format!(
                    "the log or the spool cannot be synced ({e}); retry later"
                )));
            }
            options
                .progress
                .fsync
                .observe_duration(started.elapsed(), 1);
        }
        spool.publish(streamed);
        return Ok(());
    }
    if !persisted.is_empty() {
        file.out
            .append(persisted, sync)
            .map_err(|e| Unavailable(format!("the log cannot be written ({e}); retry later")))?;
        if sync {
            options
                .progress
                .fsync
                .observe_duration(file.out.last_sync(), 1);
        }
    }
    Ok(())
}
