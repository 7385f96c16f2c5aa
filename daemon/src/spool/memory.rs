//! The newest published records, kept in memory for readers that keep up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use super::Entry;

/// Records published together, as kept in memory for readers: whole record lines, also of records whose spool
/// line is a reference to the log.
pub(super) struct Block {
    /// Spool position of its first byte.
    pub(super) start: u64,
    /// Its spool bytes.
    pub(super) len: u64,
    /// Bytes of its record lines.
    pub(super) bytes: u64,
    /// The record lines until the first reader parses them.
    pub(super) lines: Mutex<Vec<u8>>,
    /// Spool position after each record.
    pub(super) ends: Vec<u64>,
    /// Parsed once, by the first reader; `None` if the lines are not UTF-8 or do not match `ends` (readers then
    /// read the files).
    pub(super) entries: OnceLock<Option<Vec<Entry>>>,
}

impl Block {
    pub(super) fn end(&self) -> u64 {
        self.start + self.len
    }

    pub(super) fn entries(&self) -> Option<&[Entry]> {
        self.entries
            .get_or_init(|| {
                let raw =
                    std::mem::take(&mut *self.lines.lock().unwrap_or_else(|e| e.into_inner()));
                let text = Arc::new(String::from_utf8(raw).ok()?);
                let mut entries = Vec::with_capacity(self.ends.len());
                let mut offset = 0;
                while let Some(n) = memchr::memchr(b'\n', &text.as_bytes()[offset..]) {
                    let end = *self.ends.get(entries.len())?;
                    entries.push(Entry::parse(&text, offset, n, end));
                    offset += n + 1;
                }
                (entries.len() == self.ends.len()).then_some(entries)
            })
            .as_deref()
    }
}

/// The in-memory blocks from the one holding `pos` on, enough for `max_events` records / `max_bytes` bytes; none
/// when `pos` is not in memory.
pub(super) fn in_memory(
    recent: &VecDeque<Arc<Block>>,
    pos: u64,
    max_events: usize,
    max_bytes: usize,
) -> Vec<Arc<Block>> {
    if recent.front().is_none_or(|b| b.start > pos) {
        return Vec::new();
    }
    let first = recent.partition_point(|b| b.end() <= pos);
    let mut blocks = Vec::new();
    let mut bytes = 0;
    // Every block holds at least one record: `max_events` blocks are always enough.
    for block in recent.range(first..).take(max_events.max(1)) {
        blocks.push(block.clone());
        bytes += block.end() - pos.max(block.start);
        if bytes >= max_bytes as u64 {
            break;
        }
    }
    blocks
}
