//! Reading the log by `seq`, for the spool's references to it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use crate::record::line::{ID, value_after};

/// Reads records of the log by `seq`, forwards, for the spool lines that refer to it.
pub(super) struct LogSource {
    pub(super) dir: PathBuf,
    /// The file being read: its first `seq` and a reader.
    pub(super) file: Option<(u64, BufReader<Box<dyn std::io::Read + Send>>)>,
    /// Bytes read after the last whole line (the writer is still appending to the file).
    pub(super) partial: Vec<u8>,
    /// A whole line read but not used yet: a later `seq` than was asked for.
    pub(super) ahead: Option<Vec<u8>>,
}

impl LogSource {
    pub(super) fn new(dir: PathBuf) -> LogSource {
        LogSource {
            dir,
            file: None,
            partial: Vec::new(),
            ahead: None,
        }
    }

    /// The line of record `seq` whose id is `id`, without its newline; `None` when the log does not have it.
    /// Calls ask for ever later records; what was read ahead is used by the next call. When what was read does not
    /// have the record (the writer took back a group that failed to sync and wrote other records under the same
    /// `seq`s, after this source had read ahead), it is looked for once more from a fresh start.
    pub(super) fn find(&mut self, seq: u64, id: &str) -> std::io::Result<Option<String>> {
        if let Some(line) = self.scan(seq, id)? {
            return Ok(Some(line));
        }
        self.file = None;
        self.scan(seq, id)
    }

    pub(super) fn scan(&mut self, seq: u64, id: &str) -> std::io::Result<Option<String>> {
        if self.file.is_none() && !self.open(seq, None)? {
            return Ok(None);
        }
        loop {
            let Some(line) = self.next_line()? else {
                // The end of this file: a later one may start at or before `seq`.
                let first = self.file.as_ref().map_or(0, |(f, _)| *f);
                if self.open(seq, Some(first))? {
                    continue;
                }
                return Ok(None);
            };
            match crate::record::line::seq(&line) {
                Some(s) if s == seq => {
                    if value_after(&ID, &line).bytes(&line) != id.as_bytes() {
                        return Ok(None);
                    }
                    return String::from_utf8(line).map(Some).map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                    });
                }
                Some(s) if s > seq => {
                    self.ahead = Some(line);
                    return Ok(None);
                }
                _ => {}
            }
        }
    }

    /// Opens the last file whose first `seq` is at most `seq` (and later than `after`); false when there is none.
    pub(super) fn open(&mut self, seq: u64, after: Option<u64>) -> std::io::Result<bool> {
        let files = match crate::log::files::list(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            listed => listed?,
        };
        let candidate = files
            .iter()
            .rev()
            .find(|f| f.first_seq <= seq)
            .or(files.first())
            .filter(|f| after.is_none_or(|a| f.first_seq > a));
        let Some(file) = candidate else {
            return Ok(false);
        };
        self.file = Some((
            file.first_seq,
            BufReader::with_capacity(1 << 18, file.open()?),
        ));
        self.partial.clear();
        self.ahead = None;
        Ok(true)
    }

    /// The next whole line of the file, without its newline; `None` at the end of what is written.
    pub(super) fn next_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if let Some(line) = self.ahead.take() {
            return Ok(Some(line));
        }
        let Some((_, reader)) = self.file.as_mut() else {
            return Ok(None);
        };
        let mut line = std::mem::take(&mut self.partial);
        reader.read_until(b'\n', &mut line)?;
        if line.last() != Some(&b'\n') {
            self.partial = line;
            return Ok(None);
        }
        line.pop();
        Ok(Some(line))
    }
}
