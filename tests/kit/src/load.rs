//! The pipelined load client: many connections to the ingest socket, each with a writer thread
//! that keeps up to a window of requests unanswered (at full speed, or paced at a rate) and a
//! reader thread that checks every answer is a success and measures its latency.
//!
//! It owns no event format: the caller's `event` function appends request lines. It is the one
//! load generator of the benchmarks (ingest, sinks, evidence) and of tests that need load.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

/// The largest read of answers.
const READ_BYTES: usize = 256 << 10;

/// How fast the writers send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// As fast as the window allows.
    Max,
    /// Paced at this many events/s over all connections.
    Paced(f64),
}

/// What to send, and how.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Client connections, each with its own writer and reader thread.
    pub connections: usize,
    /// Events over all connections (spread evenly); `u64::MAX` with [`stop`](Self::stop) to
    /// send until told to stop.
    pub events: u64,
    /// Most unanswered events per connection (`u64::MAX`: no window, only the socket's
    /// back-pressure).
    pub window: u64,
    /// The largest write a writer issues.
    pub write_bytes: usize,
    /// How fast.
    pub load: Load,
    /// A paced connection writes at most once per tick (whatever became due since its last
    /// write).
    pub tick: Duration,
    /// A run that takes longer fails.
    pub timeout: Duration,
    /// Set it to end the run early: each writer stops, shuts its connection's write half, and
    /// its reader reads the answers to what was sent until the daemon closes the connection.
    pub stop: Arc<AtomicBool>,
    /// Answers read so far over all connections, for watching a run from another thread.
    pub acked: Arc<AtomicU64>,
}

impl Plan {
    /// `events` over `connections` at full speed, windows of 4096, writes of up to 64 KiB.
    pub fn new(connections: usize, events: u64) -> Self {
        Self {
            connections,
            events,
            window: 4096,
            write_bytes: 64 << 10,
            load: Load::Max,
            tick: Duration::from_micros(200),
            timeout: Duration::from_secs(600),
            stop: Arc::default(),
            acked: Arc::default(),
        }
    }
}

/// What one connection measured.
pub struct ConnResult {
    /// Events answered (all successes).
    pub events: u64,
    /// Bytes of request lines written.
    pub bytes: u64,
    /// (latency in ns, number of events that had it): each write's completion to the answer
    /// of each event it completed.
    pub samples: Vec<(u64, u32)>,
    /// When the last answer was read.
    pub finished: Instant,
}

/// What a run measured.
pub struct Outcome {
    /// One per connection.
    pub results: Vec<ConnResult>,
    /// When the writers were released.
    pub started: Instant,
}

impl Outcome {
    /// Events answered over all connections.
    pub fn acked(&self) -> u64 {
        self.results.iter().map(|r| r.events).sum()
    }

    /// Answered events per second, from the start to the last answer.
    pub fn events_per_sec(&self) -> f64 {
        let finished = self.results.iter().map(|r| r.finished).max();
        let seconds = finished.map_or(0.0, |f| f.duration_since(self.started).as_secs_f64());
        self.acked() as f64 / seconds
    }
}

/// State shared by a connection's writer and reader.
struct Shared {
    /// Events completely written.
    sent: AtomicU64,
    /// Answers read.
    acked: AtomicU64,
    writer_waiting: AtomicBool,
    /// The writer stopped early ([`Plan::stop`]) and shut the write half.
    stopped: AtomicBool,
    abort: Arc<AtomicBool>,
    writer: OnceLock<Thread>,
}

impl Shared {
    fn wake_writer(&self) {
        if self.writer_waiting.swap(false, Ordering::SeqCst)
            && let Some(t) = self.writer.get()
        {
            t.unpark();
        }
    }
}

/// One connection's share of the plan.
struct ConnPlan {
    conn: usize,
    events: u64,
    window: u64,
    /// Most events in one write.
    batch_max: u64,
    /// The writer waits until the window has room for this many events (or all it has left).
    low_water: u64,
    load: Load,
    connections: usize,
    tick: Duration,
    stop: Arc<AtomicBool>,
    acked_total: Arc<AtomicU64>,
}

/// Runs `plan` against the ingest socket `socket`. `event(conn, n, buf)` appends the `n`th
/// request line (newline included) of connection `conn` to `buf`; `line_hint` is about the
/// longest line, which sizes the writes. Every answer must be `{"ok":true,...}`.
pub fn run<F>(socket: &Path, plan: &Plan, line_hint: usize, event: F) -> Result<Outcome>
where
    F: Fn(usize, u64, &mut Vec<u8>) + Send + Sync + 'static,
{
    let n = plan.connections;
    let event = Arc::new(event);
    let abort = Arc::new(AtomicBool::new(false));
    let batch_max = (plan.write_bytes / line_hint.max(1)).max(1) as u64;
    let low_water = batch_max.min(plan.window / 4).max(1);
    let barrier = Arc::new(Barrier::new(2 * n + 1));
    let (done_tx, done_rx) = mpsc::channel::<Result<ConnResult>>();
    let mut handles = Vec::new();
    for conn in 0..n {
        let events = if plan.events == u64::MAX {
            u64::MAX
        } else {
            plan.events / n as u64 + u64::from((conn as u64) < plan.events % n as u64)
        };
        let conn_plan = Arc::new(ConnPlan {
            conn,
            events,
            window: plan.window,
            batch_max,
            low_water,
            load: plan.load,
            connections: n,
            tick: plan.tick,
            stop: plan.stop.clone(),
            acked_total: plan.acked.clone(),
        });
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let read_half = stream.try_clone()?;
        let shared = Arc::new(Shared {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            writer_waiting: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            abort: abort.clone(),
            writer: OnceLock::new(),
        });
        let (stamp_tx, stamp_rx) = mpsc::channel();
        let w = {
            let (plan, shared, barrier, abort, event) = (
                conn_plan.clone(),
                shared.clone(),
                barrier.clone(),
                abort.clone(),
                event.clone(),
            );
            thread::Builder::new()
                .name(format!("load-writer-{conn}"))
                .spawn(move || {
                    let r = writer(stream, &plan, &shared, stamp_tx, &barrier, &*event);
                    if r.is_err() {
                        abort.store(true, Ordering::SeqCst);
                    }
                    r
                })?
        };
        let r = {
            let (barrier, done_tx, abort) = (barrier.clone(), done_tx.clone(), abort.clone());
            thread::Builder::new()
                .name(format!("load-reader-{conn}"))
                .spawn(move || {
                    let read = reader(read_half, &conn_plan, &shared, stamp_rx, &barrier);
                    if read.is_err() {
                        abort.store(true, Ordering::SeqCst);
                        shared.wake_writer();
                    }
                    let result = read.and_then(|(samples, finished)| {
                        let bytes = w
                            .join()
                            .map_err(|_| anyhow::anyhow!("writer {conn} panicked"))??;
                        Ok(ConnResult {
                            // What the reader counted, not what was planned: callers check it.
                            events: shared.acked.load(Ordering::SeqCst),
                            bytes,
                            samples,
                            finished,
                        })
                    });
                    let _ = done_tx.send(result);
                })?
        };
        handles.push(r);
    }
    drop(done_tx);
    barrier.wait();
    let started = Instant::now();
    let deadline = started + plan.timeout;
    let mut results = Vec::new();
    let mut failure = None;
    while results.len() < n {
        match done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => {
                failure = Some(e);
                break;
            }
            Err(_) => {
                failure = Some(anyhow::anyhow!(
                    "the load did not finish within {:?}",
                    plan.timeout
                ));
                break;
            }
        }
    }
    if let Some(e) = failure {
        // Threads may be blocked on the daemon; the caller kills it, which unblocks them. Do not join here.
        abort.store(true, Ordering::SeqCst);
        return Err(e);
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(Outcome { results, started })
}

/// Sends `plan.events` events, never more than `plan.window` unanswered; reports each write's completion time
/// and how many events it completed to the reader.
fn writer<F: Fn(usize, u64, &mut Vec<u8>)>(
    stream: UnixStream,
    plan: &ConnPlan,
    shared: &Shared,
    stamps: mpsc::Sender<(Instant, u32)>,
    start: &Barrier,
    event: &F,
) -> Result<u64> {
    let _ = shared.writer.set(thread::current());
    let mut stream = stream;
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut ends: Vec<usize> = Vec::with_capacity(1024);
    let (batch_max, low_water) = (plan.batch_max, plan.low_water);
    let mut sent = 0u64;
    let mut bytes = 0u64;
    let per_conn_rate = match plan.load {
        Load::Paced(rate) => {
            // Paced runs sleep between small writes; the default 50 µs timer slack would blur the pacing.
            // SAFETY: prctl(PR_SET_TIMERSLACK) only affects the calling thread.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
            Some(rate / plan.connections as f64)
        }
        Load::Max => None,
    };
    start.wait();
    let began = Instant::now();
    let mut last_write = began;
    // Stagger the connections of a paced run so they do not all send at the same instant.
    let offset = per_conn_rate.map_or(0.0, |r| plan.conn as f64 / plan.connections as f64 / r);
    while sent < plan.events {
        if shared.abort.load(Ordering::Relaxed) {
            bail!("aborted");
        }
        if plan.stop.load(Ordering::Relaxed) {
            shared.stopped.store(true, Ordering::SeqCst);
            stream
                .shutdown(std::net::Shutdown::Write)
                .context("ending the requests")?;
            break;
        }
        let mut want = (plan.events - sent).min(batch_max);
        if let Some(rate) = per_conn_rate {
            let elapsed = began.elapsed().as_secs_f64() - offset;
            let due = if elapsed < 0.0 {
                0
            } else {
                ((elapsed * rate) as u64 + 1).min(plan.events)
            };
            if due <= sent {
                // Sleep until the next event is due, but write at most once per tick: at high rates a
                // syscall per event would make the generator, not the daemon, the bottleneck.
                let next = (began + Duration::from_secs_f64(offset + sent as f64 / rate))
                    .max(last_write + plan.tick);
                thread::sleep(next.saturating_duration_since(Instant::now()));
                continue;
            }
            want = want.min(due - sent);
        }
        let in_flight = sent - shared.acked.load(Ordering::SeqCst);
        let room = plan.window - in_flight;
        if room < want.min(low_water) {
            shared.writer_waiting.store(true, Ordering::SeqCst);
            let in_flight = sent - shared.acked.load(Ordering::SeqCst);
            if plan.window - in_flight < want.min(low_water) {
                thread::park_timeout(Duration::from_millis(100));
            }
            shared.writer_waiting.store(false, Ordering::SeqCst);
            continue;
        }
        let n = want.min(room);
        buf.clear();
        ends.clear();
        for i in 0..n {
            event(plan.conn, sent + i, &mut buf);
            ends.push(buf.len());
        }
        let mut written = 0;
        let mut completed = 0;
        while written < buf.len() {
            let w = stream
                .write(&buf[written..])
                .context("writing events to the daemon")?;
            ensure!(w > 0, "the daemon stopped reading");
            written += w;
            let now = Instant::now();
            let done = ends[completed..].partition_point(|&e| e <= written);
            if done > 0 {
                completed += done;
                // Publish the count before the stamp so the reader's wake-up check sees it.
                shared.sent.fetch_add(done as u64, Ordering::SeqCst);
                if stamps.send((now, done as u32)).is_err() {
                    bail!("the reader stopped");
                }
            }
        }
        sent += n;
        bytes += buf.len() as u64;
        last_write = Instant::now();
    }
    Ok(bytes)
}

/// Reads answers until every event is answered (or, after an early stop, until the daemon closes
/// the connection with every event sent answered); each must be a success.
fn reader(
    stream: UnixStream,
    plan: &ConnPlan,
    shared: &Shared,
    stamps: mpsc::Receiver<(Instant, u32)>,
    start: &Barrier,
) -> Result<(Vec<(u64, u32)>, Instant)> {
    let mut stream = stream;
    let mut buf = vec![0u8; READ_BYTES];
    let mut have = 0usize;
    let mut acked = 0u64;
    let mut samples: Vec<(u64, u32)> = Vec::with_capacity(1 << 16);
    let mut current: Option<(Instant, u32)> = None;
    start.wait();
    while acked < plan.events {
        if have == buf.len() {
            bail!("an answer line is longer than {READ_BYTES} bytes");
        }
        let n = stream
            .read(&mut buf[have..])
            .context("reading answers from the daemon")?;
        let now = Instant::now();
        if n == 0 {
            if shared.stopped.load(Ordering::SeqCst)
                && acked == shared.sent.load(Ordering::SeqCst)
                && have == 0
            {
                break;
            }
            bail!(
                "the daemon closed connection {} after {acked} of {} answers",
                plan.conn,
                shared.sent.load(Ordering::SeqCst)
            );
        }
        have += n;
        let mut answered = 0u32;
        let mut pos = 0;
        for nl in memchr::memchr_iter(b'\n', &buf[..have]) {
            let line = &buf[pos..nl];
            if !line.starts_with(b"{\"ok\":true,") {
                shared.abort.store(true, Ordering::SeqCst);
                bail!(
                    "connection {}: answer {} is not a success: {}",
                    plan.conn,
                    acked + u64::from(answered) + 1,
                    String::from_utf8_lossy(line)
                );
            }
            answered += 1;
            pos = nl + 1;
        }
        buf.copy_within(pos..have, 0);
        have -= pos;
        // Answers come in request order: match them with the writes that completed their requests.
        let mut left = answered;
        while left > 0 {
            let (sent_at, count) = match current.take() {
                Some(c) if c.1 > 0 => c,
                _ => stamps
                    .recv()
                    .context("an answer arrived for an event that was never sent")?,
            };
            let m = count.min(left);
            samples.push((now.saturating_duration_since(sent_at).as_nanos() as u64, m));
            left -= m;
            current = Some((sent_at, count - m));
        }
        acked += u64::from(answered);
        ensure!(
            acked <= plan.events,
            "connection {}: {acked} answers for {} events",
            plan.conn,
            plan.events
        );
        shared.acked.store(acked, Ordering::SeqCst);
        plan.acked_total
            .fetch_add(u64::from(answered), Ordering::SeqCst);
        let in_flight = shared.sent.load(Ordering::SeqCst).saturating_sub(acked);
        if plan.window.saturating_sub(in_flight) >= plan.low_water {
            shared.wake_writer();
        }
    }
    Ok((samples, Instant::now()))
}
