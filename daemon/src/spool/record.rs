//! Spool lines: whole records and references to the log, as a group commit builds them and as readers parse them.

use std::sync::Arc;

use crate::record::line::{self, ID, Span, TYPE, value_after};

/// The spool's part of one group commit, built by the journal writer: the bytes for the segment file, where every
/// record that is also in the log is only a reference to it (`{"seq":…,"id":…,"type":…,"in_log":true}`), and
/// the whole record lines for the in-memory blocks.
#[derive(Debug, Default, Clone)]
pub struct Group {
    pub(super) file: Vec<u8>,
    pub(super) lines: Vec<u8>,
    /// End of each record's spool line in `file`.
    pub(super) ends: Vec<u64>,
    /// Records spooled whole (not in the log).
    pub(super) whole: usize,
}

/// A point in a [`Group`] to go back to.
#[derive(Debug, Clone, Copy)]
pub struct Mark(usize, usize, usize, usize);

/// How a spool line that refers to the log ends.
pub(super) const IN_LOG: &[u8] = b",\"in_log\":true}";

impl Group {
    /// Adds a record: `line` is its whole stored line with the newline; `in_log` says it is in the log too.
    pub fn push(&mut self, line: &[u8], in_log: bool) {
        self.lines.extend_from_slice(line);
        if in_log {
            let record = &line[..line.len() - 1];
            let digits = line::seq_len(record);
            let id = value_after(&ID, record);
            let ty = value_after(&TYPE, record);
            self.file
                .extend_from_slice(&record[..line::SEQ_PREFIX.len() + digits]);
            self.file.extend_from_slice(b",\"id\":\"");
            self.file.extend_from_slice(id.bytes(record));
            self.file.extend_from_slice(b"\",\"type\":\"");
            self.file.extend_from_slice(ty.bytes(record));
            self.file.push(b'"');
            self.file.extend_from_slice(IN_LOG);
            self.file.push(b'\n');
        } else {
            self.file.extend_from_slice(line);
            self.whole += 1;
        }
        self.ends.push(self.file.len() as u64);
    }

    /// Bytes for the segment file.
    pub fn file_len(&self) -> u64 {
        self.file.len() as u64
    }

    /// True when no record was added.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The current point.
    pub fn mark(&self) -> Mark {
        Mark(
            self.file.len(),
            self.lines.len(),
            self.ends.len(),
            self.whole,
        )
    }

    /// Takes out what was added after `mark`.
    pub fn truncate(&mut self, mark: Mark) {
        self.file.truncate(mark.0);
        self.lines.truncate(mark.1);
        self.ends.truncate(mark.2);
        self.whole = mark.3;
    }

    /// Empties the group.
    pub fn clear(&mut self) {
        self.truncate(Mark(0, 0, 0, 0));
    }

    /// Memory the in-memory block needs besides the lines.
    pub(super) fn recorded_bytes(&self) -> usize {
        self.ends.len() * std::mem::size_of::<u64>()
    }
}

/// One spooled record as a sink receives it. Records of one read share one buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The record's `seq`.
    pub seq: u64,
    /// Spool position just after the record: confirming it confirms everything before.
    pub end: u64,
    pub(super) text: Arc<String>,
    pub(super) start: usize,
    pub(super) len: usize,
    /// Where the values of `id` and `type` are in the line, found once.
    pub(super) id: Span,
    pub(super) event_type: Span,
}

impl Entry {
    /// An entry holding its own copy of `line`.
    pub fn new(seq: u64, end: u64, line: &str) -> Entry {
        Entry {
            seq,
            ..Entry::parse(&Arc::new(line.to_owned()), 0, line.len(), end)
        }
    }

    /// The record at `text[start..start + len]`, which ends at spool position `end`.
    pub(super) fn parse(text: &Arc<String>, start: usize, len: usize, end: u64) -> Entry {
        let line = &text.as_bytes()[start..start + len];
        Entry {
            seq: record_seq(line),
            end,
            text: text.clone(),
            start,
            len,
            id: value_after(&ID, line),
            event_type: value_after(&TYPE, line),
        }
    }

    /// True for a spool line that only refers to a record in the log.
    pub(super) fn in_log(&self) -> bool {
        self.line().as_bytes().ends_with(IN_LOG)
    }

    /// The record line, without its newline.
    pub fn line(&self) -> &str {
        &self.text[self.start..self.start + self.len]
    }

    /// The record's event type, read from its fixed place in the line.
    pub fn event_type(&self) -> &str {
        self.event_type.of(self.line())
    }

    /// The record's id.
    pub fn id(&self) -> &str {
        self.id.of(self.line())
    }
}

/// The `seq` of a spool line (0 when it has none).
pub(super) fn record_seq(line: &[u8]) -> u64 {
    line::seq(line).unwrap_or(0)
}
