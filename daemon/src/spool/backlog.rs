//! What a sink has not confirmed yet, in records and by age, for `trail status` and the metrics: read at the time
//! someone asks, never counted on the writer's or the readers' paths.
//!
//! Records after a position are counted from the in-memory blocks (their record ends) where they are there, and by
//! counting lines in the segment files before that. The files' part is remembered per range, so the next question
//! about a sink that moved on reads only what it confirmed and what left memory since, not its whole backlog again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use super::Shared;

/// The records after a position up to the spool's head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Undelivered {
    /// Records (spool lines) after the position.
    pub records: u64,
    /// When the first of them was received (Unix milliseconds, from its UUID v7 `id`); `None` when there is none.
    pub oldest_received_ms: Option<u64>,
}

/// Lines counted in the segment files between two positions.
#[derive(Debug, Clone, Copy)]
struct Counted {
    from: u64,
    to: u64,
    lines: u64,
}

/// Ranges counted in the files, a few (one per sink that is behind the spool's memory).
#[derive(Debug, Default)]
pub(super) struct Counts(Mutex<Vec<Counted>>);

/// How many ranges are remembered.
const REMEMBERED: usize = 64;

impl Shared {
    /// The records after `pos` (a sink's confirmed position; the floor when it is behind it).
    pub(super) fn undelivered(&self, pos: u64) -> std::io::Result<Undelivered> {
        // Counted under the lock, without copying: only the block holding `pos` needs a search.
        let (pos, segments, memory_start, mut records) = {
            let state = self.lock();
            let pos = pos.max(state.floor);
            if pos >= state.head {
                return Ok(Undelivered::default());
            }
            let first = state.recent.partition_point(|b| b.end() <= pos);
            let mut blocks = state.recent.range(first..);
            let (memory_start, records) = match blocks.next() {
                Some(b) => (
                    b.start.max(pos),
                    (b.ends.len() - b.ends.partition_point(|&end| end <= pos)) as u64
                        + blocks.map(|b| b.ends.len() as u64).sum::<u64>(),
                ),
                None => (state.head, 0),
            };
            (pos, state.segments.clone(), memory_start, records)
        };
        if pos < memory_start {
            records += self.counts.lines(pos, memory_start, |from, to| {
                count_lines(&self.dir, &segments, from, to)
            })?;
        }
        let oldest_received_ms = first_id_ms(&self.dir, &segments, pos)?;
        Ok(Undelivered {
            records,
            oldest_received_ms,
        })
    }
}

impl Counts {
    /// Lines in `[from, to)`, from a remembered range that `[from, to)` moved on from when there is one (what was
    /// confirmed since is counted and taken off, what left memory since counted and added), else counted whole.
    /// `count` gives `None` when a file of its range is gone (every sink is past it).
    fn lines(
        &self,
        from: u64,
        to: u64,
        count: impl Fn(u64, u64) -> std::io::Result<Option<u64>>,
    ) -> std::io::Result<u64> {
        let known = {
            let list = self.0.lock().unwrap_or_else(|e| e.into_inner());
            list.iter()
                .position(|c| c.from <= from && from <= c.to && c.to <= to)
                .map(|i| (i, list[i]))
        };
        let moved_on = match known {
            Some((_, c)) => match (count(c.from, from)?, count(c.to, to)?) {
                (Some(gone), Some(added)) => c.lines.checked_sub(gone).map(|n| n + added),
                _ => None,
            },
            None => None,
        };
        let lines = match moved_on {
            Some(n) => n,
            None => count(from, to)?.unwrap_or(0),
        };
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Counted { from, to, lines };
        match known {
            Some((i, _)) if i < list.len() => list[i] = now,
            _ => {
                if list.len() >= REMEMBERED {
                    list.remove(0);
                }
                list.push(now);
            }
        }
        Ok(lines)
    }
}

/// The segment file holding position `pos` and where it starts.
fn segment_at(segments: &[u64], pos: u64) -> Option<u64> {
    segments.iter().rev().find(|&&s| s <= pos).copied()
}

/// Counts the lines (records) of the segment files in `[from, to)`; `None` when one of those files is gone.
fn count_lines(
    dir: &std::path::Path,
    segments: &[u64],
    from: u64,
    to: u64,
) -> std::io::Result<Option<u64>> {
    let mut lines = 0;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = from;
    while pos < to {
        let Some(start) = segment_at(segments, pos) else {
            return Ok(None);
        };
        let file = match File::open(super::segment_path(dir, start)) {
            Ok(f) => f,
            // Deleted meanwhile: every sink is past it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let next = segments
            .iter()
            .find(|&&s| s > start)
            .copied()
            .unwrap_or(u64::MAX);
        while pos < to.min(next) {
            let want = (to.min(next) - pos).min(buf.len() as u64) as usize;
            let n = file.read_at(&mut buf[..want], pos - start)?;
            if n == 0 {
                break;
            }
            lines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
            pos += n as u64;
        }
        if pos < to.min(next) {
            // The file ends before the next one starts (its tail was cut): go on with the next.
            pos = next;
        }
    }
    Ok(Some(lines))
}

/// The receive time of the record at `pos`, read from its line's `id` (a UUID v7: Unix milliseconds).
fn first_id_ms(dir: &std::path::Path, segments: &[u64], pos: u64) -> std::io::Result<Option<u64>> {
    let Some(start) = segment_at(segments, pos) else {
        return Ok(None);
    };
    let mut head = [0u8; 96];
    let n = match File::open(super::segment_path(dir, start)) {
        Ok(f) => f.read_at(&mut head, pos - start)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(id_ms(&head[..n]))
}

/// Unix milliseconds of the UUID v7 `id` near the start of a spool line (`{"seq":…,"id":"…"`).
fn id_ms(line: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(line, br#""id":""#)? + 6;
    let text = std::str::from_utf8(line.get(at..at + 36)?).ok()?;
    let (secs, nanos) = uuid::Uuid::parse_str(text).ok()?.get_timestamp()?.to_unix();
    Some(secs * 1000 + u64::from(nanos) / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_give_their_time() {
        let id = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            1_700_000_000,
            250_000_000,
        ));
        let line = format!(r#"{{"seq":7,"id":"{id}","type":"x","in_log":true}}"#);
        assert_eq!(id_ms(line.as_bytes()), Some(1_700_000_000_250));
        assert_eq!(id_ms(br#"{"seq":7,"id":"short"}"#), None);
    }

    #[test]
    fn remembered_ranges_are_moved_on() {
        // A file of one line per 10 bytes: lines in [a, b) are (b - a) / 10.
        let counted = std::cell::RefCell::new(Vec::new());
        let count = |from: u64, to: u64| {
            counted.borrow_mut().push((from, to));
            Ok(Some((to - from) / 10))
        };
        let counts = Counts::default();
        assert_eq!(counts.lines(0, 100, count).unwrap(), 10);
        // Moved on: 20 bytes confirmed, 30 left memory; only those are read.
        assert_eq!(counts.lines(20, 130, count).unwrap(), 11);
        assert_eq!(*counted.borrow(), vec![(0, 100), (0, 20), (100, 130)]);
    }
}
