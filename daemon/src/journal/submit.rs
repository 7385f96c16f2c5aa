//! The submission API: what a connection hands the writer (a [`Batch`] of record tails and their routes) and
//! how it learns the outcome (an [`Ack`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::log::chain;

use super::Progress;

/// Record tails for one submission, in one buffer (see [`crate::record`]), and where each record goes.
#[derive(Debug, Default)]
pub struct Batch {
    buf: Vec<u8>,
    ends: Vec<usize>,
    routes: Vec<Route>,
    /// The chain's inner digest of every persisted record (zeros for the others), computed by the submitter so
    /// that the single writer only chains 72 bytes per record.
    digests: Vec<chain::Hash>,
    /// Counters the writer adds to once the batch is durable, each with how much (consecutive records counted
    /// by the same counter share one entry).
    counters: Vec<(Arc<AtomicU64>, u64)>,
}

/// How many of a batch's latest counters [`Batch::count`] looks through for the one it counts with.
const COUNTERS_SCANNED: usize = 16;

/// How many batches the writer keeps for the next submissions ([`Spares`]), and the largest buffer it keeps.
const SPARES: usize = 16;
const SPARE_BYTES: usize = 512 << 10;

/// Batches the writer is done with, emptied and kept for the connections' next ones: a batch's buffers grow by
/// doubling while a connection fills it, so a new batch copies its tails again and again as it grows, and a
/// reused one starts at the size it had reached. At most [`SPARES`] are kept, none whose buffer passed
/// [`SPARE_BYTES`], so what the pool holds stays bounded (a few MiB).
#[derive(Debug, Default)]
pub(super) struct Spares(Mutex<Vec<Batch>>);

impl Spares {
    /// A kept batch, or a new one.
    fn take(&self) -> Batch {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Keeps `batch` for a later submission (emptied), unless the pool is full or the batch too large.
    pub(super) fn keep(&self, mut batch: Batch) {
        if batch.buf.capacity() > SPARE_BYTES {
            return;
        }
        batch.clear();
        let mut spares = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if spares.len() < SPARES {
            spares.push(batch);
        }
    }
}

/// Where a record is written: the log, the spool (for sinks), or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Written to the JSON-lines log.
    pub persist: bool,
    /// Written to the spool for sinks.
    pub stream: bool,
}

impl Batch {
    /// The buffer to append the next tail to; call [`Batch::end_record`] after writing it.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Marks the end of the tail just written and says where the record goes.
    pub fn end_record(&mut self, route: Route) {
        let start = self.ends.last().copied().unwrap_or(0);
        let digest = if route.persist {
            chain::digest(&self.buf[start..])
        } else {
            chain::GENESIS
        };
        self.ends.push(self.buf.len());
        self.routes.push(route);
        self.digests.push(digest);
    }

    /// Counts the record just ended with `counter`, which is added to only when the batch is stored (a failed
    /// group adds nothing). The submitter's counters (events per type) thus count exactly what is durable, and
    /// a counter among the batch's last [`COUNTERS_SCANNED`] costs no new entry (nor the writer another atomic
    /// add), however its records are interleaved with other types'.
    pub fn count(&mut self, counter: &Arc<AtomicU64>) {
        match self
            .counters
            .iter_mut()
            .rev()
            .take(COUNTERS_SCANNED)
            .find(|(c, _)| Arc::ptr_eq(c, counter))
        {
            Some((_, n)) => *n += 1,
            None => self.counters.push((counter.clone(), 1)),
        }
    }

    /// Adds to the counters of [`Batch::count`]: the batch was stored.
    pub(super) fn stored(&self) {
        for (counter, n) in &self.counters {
            counter.fetch_add(*n, Ordering::Relaxed);
        }
    }

    /// Empties the batch, keeping its buffers' capacity.
    fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
        self.routes.clear();
        self.digests.clear();
        self.counters.clear();
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when no record was added.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes of all tails together.
    pub(super) fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Every record's tail, route and inner digest, in order.
    pub(super) fn tails(&self) -> impl Iterator<Item = (&[u8], Route, &chain::Hash)> {
        let mut start = 0;
        self.ends.iter().zip(&self.routes).zip(&self.digests).map(
            move |((&end, &route), digest)| {
                let tail = &self.buf[start..end];
                start = end;
                (tail, route, digest)
            },
        )
    }
}

/// Why a submission was not stored; the client may retry.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// The outcome of a submission: the `seq` of its first record (the others follow consecutively).
pub type Ack = oneshot::Receiver<Result<u64, Unavailable>>;

/// A batch waiting for the writer, with the way to answer it.
pub(super) struct Submission {
    pub(super) batch: Batch,
    /// Taken when answered.
    done: Option<oneshot::Sender<Result<u64, Unavailable>>>,
}

impl Submission {
    /// Answers the submitter (once; later answers are ignored).
    pub(super) fn answer(&mut self, outcome: Result<u64, Unavailable>) {
        if let Some(done) = self.done.take() {
            let _ = done.send(outcome);
        }
    }
}

/// What the writer receives: work, or a reminder that time passed (rotation and checkpoints are due by the clock
/// even when no records arrive).
pub(super) enum Message {
    Submit(Submission),
    Tick,
    Settings(super::Settings),
    /// Answered once everything submitted before it is written (log and spool) or refused.
    Barrier(std::sync::mpsc::Sender<()>),
    /// Answered once every checkpoint being written is on disk and was handed to `Options::checkpointed`.
    Checkpoints(std::sync::mpsc::Sender<()>),
}

/// A handle that submits batches to the writer; cheap to clone, one per connection.
#[derive(Clone)]
pub struct Submitter {
    tx: mpsc::Sender<Message>,
    progress: Arc<Progress>,
    spares: Arc<Spares>,
}

impl Submitter {
    pub(super) fn new(
        tx: mpsc::Sender<Message>,
        progress: Arc<Progress>,
        spares: Arc<Spares>,
    ) -> Submitter {
        Submitter {
            tx,
            progress,
            spares,
        }
    }

    /// An empty batch to fill and [`submit`](Self::submit): one the writer is done with when it kept one (its
    /// buffers already grown), else a new one.
    pub fn batch(&self) -> Batch {
        self.spares.take()
    }

    /// Queues a batch, waiting while the writer's queue is full. The returned [`Ack`] resolves once the batch is
    /// durable (or could not be stored).
    pub async fn submit(&self, batch: Batch) -> Ack {
        let (done, ack) = oneshot::channel();
        self.progress.waiting.store(true, Ordering::Relaxed);
        let submission = Submission {
            batch,
            done: Some(done),
        };
        if let Err(mpsc::error::SendError(Message::Submit(mut s))) =
            self.tx.send(Message::Submit(submission)).await
        {
            s.answer(Err(Unavailable("the log writer has stopped".into())));
        }
        ack
    }

    /// Hands the writer new settings, applied before its next group; false when the writer has stopped. Waits
    /// while the writer's queue is full: call it from a blocking thread, never on the runtime.
    pub fn change(&self, settings: super::Settings) -> bool {
        self.tx.blocking_send(Message::Settings(settings)).is_ok()
    }

    /// A round trip through the writer: returns true once every batch whose [`submit`](Self::submit) returned
    /// before this call is written to the log and published to the spool (or was answered `unavailable`); false
    /// when `timeout` passed first or the writer has stopped. A full queue is waited for on a thread of its own,
    /// so the bound holds even while the writer waits for room in a full spool. Call it from a blocking thread.
    pub fn barrier(&self, timeout: std::time::Duration) -> bool {
        self.round_trip(Message::Barrier, timeout)
    }

    /// Waits until every checkpoint the writer is still writing (beside it, at the lowest CPU priority) is on disk
    /// and was handed on to be recorded as a `trail_checkpoint` event; false when `timeout` passed first or the
    /// writer has stopped. The daemon calls it at stop, while its own events are still recorded and sinks still
    /// run. Call it from a blocking thread.
    pub fn checkpoints_written(&self, timeout: std::time::Duration) -> bool {
        self.round_trip(Message::Checkpoints, timeout)
    }

    /// Sends the message `make` builds around a reply channel and waits up to `timeout` for its answer.
    fn round_trip(
        &self,
        make: fn(std::sync::mpsc::Sender<()>) -> Message,
        timeout: std::time::Duration,
    ) -> bool {
        let (done, answered) = std::sync::mpsc::channel();
        let tx = self.tx.clone();
        let queued = std::thread::Builder::new()
            .name("trail-barrier".into())
            // Dropped unsent (the writer stopped), the message drops `done`, which ends the wait below.
            .spawn(move || drop(tx.blocking_send(make(done))));
        queued.is_ok() && answered.recv_timeout(timeout).is_ok()
    }
}
