//! A sink's reader: from memory when it keeps up, else from the segment files, resolving references from the log.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read as _, Seek, SeekFrom};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::log_source::LogSource;
use super::memory::in_memory;
use super::{Entry, Shared, write_cursor};

/// What one [`Reader::next`] call produced.
#[derive(Debug, Default)]
pub struct Read {
    /// Records in spool order.
    pub entries: Vec<Entry>,
    /// Records skipped because the spool was full and `drop_oldest` is configured (or, after damage, missing
    /// from the log).
    pub dropped: u64,
    /// Records of types the reader does not want, passed over.
    pub passed: u64,
    /// Position after the last record read or skipped.
    pub end: u64,
}

/// Fills a [`Read`] with records in order, skipping those below the `drop_oldest` floor and those of types the
/// reader does not want, up to the limits.
pub(super) struct Taker<'a> {
    pub(super) read: Read,
    pub(super) floor: u64,
    pub(super) wants: Option<&'a Schedule>,
    pub(super) max_events: usize,
    pub(super) max_bytes: usize,
    pub(super) bytes: usize,
}

/// What [`Taker::admit`] decided.
pub(super) enum Admit {
    Take,
    Skip,
    Full,
}

impl<'a> Taker<'a> {
    /// Says whether `entry` is to be taken; advances the read's end past what is taken or skipped.
    pub(super) fn admit(&mut self, entry: &Entry) -> Admit {
        if entry.end <= self.floor {
            self.read.dropped += 1;
        } else if self
            .wants
            .is_some_and(|w| !w.at(entry.end).contains(entry.event_type()))
        {
            self.read.passed += 1;
        } else {
            let full = self.read.entries.len() >= self.max_events
                || (!self.read.entries.is_empty() && self.bytes + entry.len > self.max_bytes);
            if full {
                return Admit::Full;
            }
            self.bytes += entry.len + 1;
            self.read.end = entry.end;
            return Admit::Take;
        }
        self.read.end = entry.end;
        Admit::Skip
    }
}

/// The event types a reader delivers, shared with whoever may change them while it reads (a reload), as a
/// [`Schedule`] by spool position.
#[derive(Debug, Default)]
pub struct Wants(std::sync::RwLock<Arc<Schedule>>);

/// Which event types a reader delivers, by spool position: a record is judged by the last set that starts before
/// its end. A reload widens every set at once ([`Wants::widen`]) and narrows only for records after a position
/// it knows the old generation's records to end at or before ([`Wants::narrow_after`]), so no record accepted for
/// a sink is passed over by it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Schedule {
    /// (records ending after this position, the types wanted), by ascending position; the first starts at 0.
    sets: Vec<(u64, Arc<HashSet<String>>)>,
}

impl Schedule {
    fn of(types: HashSet<String>) -> Schedule {
        Schedule {
            sets: vec![(0, Arc::new(types))],
        }
    }

    /// The types wanted for a record ending at `end`.
    pub fn at(&self, end: u64) -> &HashSet<String> {
        static NONE: std::sync::OnceLock<HashSet<String>> = std::sync::OnceLock::new();
        self.sets
            .iter()
            .rev()
            .find(|(from, _)| *from < end)
            .or(self.sets.first())
            .map_or_else(|| NONE.get_or_init(HashSet::new), |(_, t)| t)
    }

    /// The types wanted for records after every position a reader has passed.
    pub fn last(&self) -> &HashSet<String> {
        self.at(u64::MAX)
    }
}

impl Wants {
    /// Wanting `types`.
    pub fn new(types: HashSet<String>) -> Arc<Wants> {
        Arc::new(Wants(std::sync::RwLock::new(Arc::new(Schedule::of(types)))))
    }

    /// The schedule now.
    pub fn get(&self) -> Arc<Schedule> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn change(&self, f: impl FnOnce(&mut Schedule)) {
        let mut guard = self.0.write().unwrap_or_else(|e| e.into_inner());
        let mut schedule = (**guard).clone();
        f(&mut schedule);
        *guard = Arc::new(schedule);
    }

    /// Wants `types` for every record from the next read on, whatever its position (the first generation). A
    /// read takes the schedule after it waited for records, so a record published after this call is judged by it.
    pub fn set(&self, types: HashSet<String>) {
        self.change(|s| *s = Schedule::of(types));
    }

    /// Wants `types` too, for every record not read yet (a reload, before its swap).
    pub fn widen(&self, types: &HashSet<String>) {
        self.change(|s| {
            for (_, set) in &mut s.sets {
                if !types.is_subset(set) {
                    Arc::make_mut(set).extend(types.iter().cloned());
                }
            }
        });
    }

    /// Wants only `types` for records ending after `position`; records up to it keep the sets they had.
    pub fn narrow_after(&self, position: u64, types: HashSet<String>) {
        self.change(|s| {
            s.sets.retain(|(from, _)| *from < position);
            s.sets.push((position, Arc::new(types)));
        });
    }

    /// Forgets the sets that only records ending at or before `position` used (a reader is past them).
    fn passed(&self, position: u64) {
        let passed = |s: &Schedule| s.sets.get(1).is_some_and(|(from, _)| *from <= position);
        if passed(&self.get()) {
            self.change(|s| {
                while passed(s) {
                    s.sets.remove(0);
                }
                s.sets[0].0 = 0;
            });
        }
    }
}

/// A sink's view of the spool: reads from its confirmed position onwards.
pub struct Reader {
    pub(super) shared: Arc<Shared>,
    pub(super) sink: String,
    /// Next position to read.
    pub(super) pos: u64,
    pub(super) file: Option<(u64, File)>,
    /// Where records that the spool holds only a reference to are read.
    pub(super) log: LogSource,
    /// The event types the sink receives; `None` for all.
    pub(super) wants: Option<Arc<Wants>>,
}

impl Reader {
    /// Reads up to `max_events` records / about `max_bytes` bytes past the current position, waiting up to `wait`
    /// until at least `min_bytes` are there (so that a batch filling up does not wake the reader for every commit).
    /// Returns what there is when the wait ends or the spool closes, possibly nothing.
    pub fn next(
        &mut self,
        max_events: usize,
        max_bytes: usize,
        min_bytes: u64,
        wait: Duration,
    ) -> std::io::Result<Read> {
        let deadline = Instant::now() + wait;
        let wanted = self.pos + min_bytes.max(1);
        let (limit, segment_start, floor, blocks) = {
            let mut state = self.shared.lock();
            while state.head < wanted && !state.closed {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                state = self
                    .shared
                    .changed
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let start = match state.segments.iter().rev().find(|&&s| s <= self.pos) {
                Some(&s) => s,
                None => state.segments[0],
            };
            // Read no further than the head or the end of this segment.
            let next = state
                .segments
                .iter()
                .find(|&&s| s > start)
                .copied()
                .unwrap_or(u64::MAX);
            (
                state.head.min(next),
                start,
                state.floor,
                in_memory(&state.recent, self.pos, max_events, max_bytes),
            )
        };
        // Taken after the wait, under which records were published: see `Wants::set`.
        let wants = self.wants.as_ref().map(|w| w.get());
        let mut taken = Taker {
            read: Read {
                end: self.pos,
                ..Read::default()
            },
            floor,
            wants: wants.as_deref(),
            max_events,
            max_bytes,
            bytes: 0,
        };
        'blocks: for block in &blocks {
            let Some(entries) = block.entries() else {
                break;
            };
            let first = entries.partition_point(|e| e.end <= taken.read.end);
            for entry in &entries[first..] {
                match taken.admit(entry) {
                    Admit::Take => taken.read.entries.push(entry.clone()),
                    Admit::Skip => {}
                    Admit::Full => break 'blocks,
                }
            }
        }
        if taken.read.end > self.pos {
            self.pos = taken.read.end;
            self.passed();
            return Ok(taken.read);
        }
        let mut read = taken.read;
        if self.pos < segment_start {
            self.pos = segment_start;
            read.end = self.pos;
        }
        if self.pos >= limit {
            return Ok(read);
        }
        if self.file.as_ref().is_none_or(|(s, _)| *s != segment_start) {
            let path = self.shared.segment_path(segment_start);
            self.file = Some((segment_start, File::open(&path)?));
        }
        let mut file = &self.file.as_ref().expect("opened above").1;
        let available = (limit - self.pos) as usize;
        let want = available.min(max_bytes.max(1 << 16));
        let mut buf = Vec::with_capacity(want);
        file.seek(SeekFrom::Start(self.pos - segment_start))?;
        // `read_to_end` fills the buffer's spare capacity without zeroing it first.
        file.take(want as u64).read_to_end(&mut buf)?;
        // Records are published whole, so `available` ends at a newline; make sure we hold one whole line.
        while memchr::memchr(b'\n', &buf).is_none() && buf.len() < available {
            let more = (available - buf.len()).min(buf.len().max(1 << 16));
            if file.take(more as u64).read_to_end(&mut buf)? == 0 {
                break;
            }
        }
        // Only whole lines are used; they are UTF-8 (checked once per read, not per record).
        buf.truncate(memchr::memrchr(b'\n', &buf).map_or(0, |i| i + 1));
        let text: Arc<String> = Arc::new(String::from_utf8(buf).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("spool segment {segment_start} holds invalid UTF-8: {e}"),
            )
        })?);
        let bytes = text.as_bytes();
        let mut taken = Taker {
            read,
            floor,
            wants: wants.as_deref(),
            max_events,
            max_bytes,
            bytes: 0,
        };
        let mut offset = 0;
        while let Some(n) = memchr::memchr(b'\n', &bytes[offset..]) {
            let end = self.pos + (offset + n + 1) as u64;
            let entry = Entry::parse(&text, offset, n, end);
            match taken.admit(&entry) {
                Admit::Take => taken.read.entries.push(entry),
                Admit::Skip => {}
                Admit::Full => break,
            }
            offset += n + 1;
        }
        let mut read = taken.read;
        if read.entries.iter().any(Entry::in_log) {
            // Records that are in the log too are only referred to here: read them from there.
            let mut resolved = Vec::with_capacity(read.entries.len());
            for entry in read.entries {
                if !entry.in_log() {
                    resolved.push(entry);
                    continue;
                }
                match self.log.find(entry.seq, entry.id())? {
                    Some(line) => {
                        let len = line.len();
                        resolved.push(Entry::parse(&Arc::new(line), 0, len, entry.end));
                    }
                    None => {
                        error!(sink = %self.sink, seq = entry.seq, log = %self.log.dir.display(),
                            "a spooled record is missing from the log: the sink cannot get it");
                        read.dropped += 1;
                    }
                }
            }
            read.entries = resolved;
        }
        self.pos = read.end;
        self.passed();
        Ok(read)
    }

    /// Lets the schedule forget what is behind the reader.
    fn passed(&self) {
        if let Some(w) = &self.wants {
            w.passed(self.pos);
        }
    }

    /// The position after what was read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Delivers only records of `types` (the others are passed over); records in the log are then read from it
    /// only when wanted.
    pub fn wanting(self, types: HashSet<String>) -> Reader {
        self.wanting_shared(Wants::new(types))
    }

    /// As [`wanting`](Self::wanting), with a set that can be changed while the reader runs.
    pub fn wanting_shared(mut self, wants: Arc<Wants>) -> Reader {
        self.wants = Some(wants);
        self
    }

    /// Records that everything before `pos` was delivered (or dead-lettered). With `persist`, also writes the
    /// position to the sink's cursor file and deletes segments that every sink is done with; without, a crash
    /// redelivers what was confirmed since the last persisted position (delivery is at least once).
    pub fn confirm(&mut self, pos: u64, persist: bool) -> std::io::Result<()> {
        {
            let mut state = self.shared.lock();
            state.cursors.insert(self.sink.clone(), pos);
            self.shared.changed.notify_all();
        }
        if !persist {
            return Ok(());
        }
        write_cursor(&self.shared, &self.sink, pos)?;
        let doomed: Vec<u64> = {
            let mut state = self.shared.lock();
            let min = state.min_cursor();
            let keep_from = state.segments.iter().rposition(|&s| s <= min).unwrap_or(0);
            state.segments.drain(..keep_from).collect()
        };
        for start in doomed {
            let path = self.shared.segment_path(start);
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(file = %path.display(), error = %e, "cannot delete a delivered spool segment");
            }
        }
        Ok(())
    }

    /// With `drop_oldest`, records ending at or before this position are to be skipped.
    pub fn floor(&self) -> u64 {
        self.shared.lock().floor
    }

    /// The sink's confirmed position.
    pub fn confirmed(&self) -> u64 {
        self.shared
            .lock()
            .cursors
            .get(&self.sink)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(types: &[&str]) -> HashSet<String> {
        types.iter().map(|t| t.to_string()).collect()
    }

    /// Which of `types` a record ending at `end` is delivered for.
    fn check(wants: &Wants, end: u64, expected: &[&str]) {
        let schedule = wants.get();
        let mut got: Vec<&String> = schedule.at(end).iter().collect();
        got.sort();
        assert_eq!(got, expected, "at {end}: {schedule:?}");
    }

    #[test]
    fn a_reload_widens_at_once_and_narrows_only_after_the_settled_position() {
        let wants = Wants::new(set(&["a", "b"]));
        // The filter drops b and adds c: both generations' types until settled.
        wants.widen(&set(&["a", "c"]));
        check(&wants, 10, &["a", "b", "c"]);
        // Settled at 100: records up to it keep the wide set, later ones get the new one.
        wants.narrow_after(100, set(&["a", "c"]));
        check(&wants, 100, &["a", "b", "c"]);
        check(&wants, 101, &["a", "c"]);
        // The next reload widens both parts; it narrows after its own settle.
        wants.widen(&set(&["b"]));
        check(&wants, 50, &["a", "b", "c"]);
        check(&wants, 150, &["a", "b", "c"]);
        wants.narrow_after(200, set(&["b"]));
        check(&wants, 150, &["a", "b", "c"]);
        check(&wants, 201, &["b"]);
        // A reader lets the schedule forget the sets behind it.
        wants.passed(150);
        assert_eq!(wants.get().sets.len(), 2);
        check(&wants, 151, &["a", "b", "c"]);
        wants.passed(200);
        assert_eq!(wants.get().sets.len(), 1);
        check(&wants, 201, &["b"]);
        check(&wants, 1, &["b"]);
        // The first generation replaces everything.
        wants.set(set(&["z"]));
        check(&wants, 1, &["z"]);
        check(&wants, 500, &["z"]);
    }
}
