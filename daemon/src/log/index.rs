//! Sidecar indexes: what a closed log file holds, so that tools need not read it to know.
//!
//! Owns `<file>.idx` beside each closed log file (`trail-….jsonl.idx`, `trail-….jsonl.zst.idx`): the file's `seq`
//! range, last chain hash, event-type counts, and its records cut into blocks of about 1 MiB at line boundaries,
//! each with its byte range (and, in a compressed file, the range of the zstd frame holding it) and the earliest
//! and latest `received_at` in it. Search skips files and blocks outside a time range with it; retention reads
//! the types; checkpoints read the last hash.
//!
//! An index is a cache, never evidence: it is used only when the file name and size it records match the file, and
//! rebuilt from the file otherwise. `trail verify` ignores indexes.

use std::collections::BTreeMap;
use std::io;

use serde::{Deserialize, Serialize};

use super::chain;
use super::checkpoint::FileEntry;
use super::files::{Chunk, Chunks, LogFile};

/// About how many bytes of records a block holds.
pub const BLOCK_BYTES: u64 = 1 << 20;

/// What a closed log file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Format version, 1.
    pub index: u32,
    /// The file it describes (its name in the directory).
    pub file: String,
    /// That file's size in bytes.
    pub size: u64,
    /// The records' bytes, uncompressed.
    pub bytes: u64,
    /// Number of records.
    pub records: u64,
    /// The last record's `seq`.
    pub last_seq: Option<u64>,
    /// The last record's chain hash.
    pub last_hash: Option<String>,
    /// Earliest `received_at`.
    pub t_min: Option<String>,
    /// Latest `received_at`.
    pub t_max: Option<String>,
    /// Records per event type.
    pub types: BTreeMap<String, u64>,
    /// True when every block is one zstd frame at `zoff` (a file this daemon compressed).
    pub framed: bool,
    /// The records in about [`BLOCK_BYTES`] pieces, in file order.
    pub blocks: Vec<Block>,
}

/// A run of whole records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Offset in the uncompressed records.
    pub off: u64,
    /// Length, uncompressed.
    pub len: u64,
    /// Offset of its zstd frame in a compressed file (0 otherwise).
    pub zoff: u64,
    /// Length of that frame (0 otherwise).
    pub zlen: u64,
    /// Earliest `received_at`.
    pub t_min: String,
    /// Latest `received_at`.
    pub t_max: String,
}

impl Index {
    /// The file as a checkpoint lists it.
    pub fn entry(&self, file: &LogFile) -> FileEntry {
        FileEntry {
            name: file.name.clone(),
            first_seq: file.first_seq,
            last_seq: self.last_seq,
            bytes: self.bytes,
            last_hash: self.last_hash.clone(),
        }
    }
}

/// Reads a file's index when it matches the file.
pub fn load(file: &LogFile) -> Option<Index> {
    let bytes = std::fs::read(file.index_path()).ok()?;
    let index: Index = serde_json::from_slice(&bytes).ok()?;
    let size = std::fs::metadata(&file.path).ok()?.len();
    let name = file.path.file_name()?.to_str()?;
    (index.index == 1 && index.size == size && index.file == name).then_some(index)
}

/// Writes a file's index (aside, then renamed into place; a failure leaves no temporary file).
pub fn store(file: &LogFile, index: &Index) -> io::Result<()> {
    let path = file.index_path();
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let bytes = serde_json::to_vec(index).expect("serializable");
    crate::modes::write_aside(std::path::Path::new(&tmp), &path, &bytes, false)
}

/// Accumulates an index while records pass by.
pub struct Builder {
    index: Index,
    block: Option<Block>,
    last_line: Vec<u8>,
}

impl Builder {
    /// An index of the file named `name` (its size is filled in by [`Builder::finish`]).
    pub fn new(name: &str) -> Builder {
        Builder {
            index: Index {
                index: 1,
                file: name.to_owned(),
                size: 0,
                bytes: 0,
                records: 0,
                last_seq: None,
                last_hash: None,
                t_min: None,
                t_max: None,
                types: BTreeMap::new(),
                framed: false,
                blocks: Vec::new(),
            },
            block: None,
            last_line: Vec::new(),
        }
    }

    /// Adds complete lines (with newlines) that start at uncompressed offset `off`.
    pub fn lines(&mut self, mut off: u64, lines: &[u8]) {
        let mut last: &[u8] = &[];
        for line in super::files::split_lines_inclusive(lines) {
            let record = line.strip_suffix(b"\n").unwrap_or(line);
            let block = self.block.get_or_insert_with(|| Block {
                off,
                len: 0,
                zoff: 0,
                zlen: 0,
                t_min: String::new(),
                t_max: String::new(),
            });
            block.len += line.len() as u64;
            if let Some(t) =
                crate::record::line::received_at(record).and_then(|t| std::str::from_utf8(t).ok())
            {
                // Reused, not allocated again: the latest time changes with nearly every record.
                if block.t_min.is_empty() || t < block.t_min.as_str() {
                    block.t_min.clear();
                    block.t_min.push_str(t);
                }
                if t > block.t_max.as_str() {
                    block.t_max.clear();
                    block.t_max.push_str(t);
                }
            }
            let ty = crate::record::line::event_type(record);
            match self.index.types.get_mut(ty) {
                Some(n) => *n += 1,
                None => {
                    self.index.types.insert(ty.to_owned(), 1);
                }
            }
            self.index.records += 1;
            off += line.len() as u64;
            if block.len >= BLOCK_BYTES {
                self.close_block();
            }
            last = record;
        }
        if !last.is_empty() {
            self.last_line.clear();
            self.last_line.extend_from_slice(last);
        }
        self.index.bytes = off;
    }

    /// Ends the current block here.
    fn close_block(&mut self) {
        if let Some(b) = self.block.take() {
            self.index.blocks.push(b);
        }
    }

    /// The index of a file of `size` bytes.
    pub fn finish(mut self, size: u64) -> Index {
        self.close_block();
        let ix = &mut self.index;
        ix.size = size;
        ix.last_seq = crate::record::line::seq(&self.last_line);
        ix.last_hash = chain::split(&self.last_line).map(|(_, h)| chain::hex(&h));
        ix.t_min = ix
            .blocks
            .iter()
            .map(|b| &b.t_min)
            .filter(|t| !t.is_empty())
            .min()
            .cloned();
        ix.t_max = ix
            .blocks
            .iter()
            .map(|b| &b.t_max)
            .max()
            .filter(|t| !t.is_empty())
            .cloned();
        self.index
    }
}

/// Builds the index of a file by reading it (a torn last line is left out).
pub fn build(file: &LogFile) -> io::Result<Index> {
    let name = file
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let mut builder = Builder::new(name);
    let mut chunks = Chunks::new(file.open()?, 4 << 20);
    while let Some(chunk) = chunks.next_chunk()? {
        if let Chunk::Lines(off, lines) = chunk {
            builder.lines(off, lines);
        }
    }
    let size = std::fs::metadata(&file.path)?.len();
    Ok(builder.finish(size))
}

/// The index of a file: the stored one when it matches, else built (and stored when `keep`).
pub fn get(file: &LogFile, keep: bool) -> io::Result<Index> {
    if let Some(ix) = load(file) {
        return Ok(ix);
    }
    let ix = build(file)?;
    if keep {
        store(file, &ix)?;
    }
    Ok(ix)
}

/// A closed file as a checkpoint lists it, read from its end (uncompressed) or its index.
pub fn summary(file: &LogFile) -> io::Result<FileEntry> {
    if file.compressed {
        return Ok(get(file, false)?.entry(file));
    }
    let mut f = std::fs::File::open(&file.path)?;
    let size = f.metadata()?.len();
    let (_, line) = super::recovery::last_line(&mut f, size)?;
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    Ok(FileEntry {
        name: file.name.clone(),
        first_seq: file.first_seq,
        last_seq: crate::record::line::seq(line),
        bytes: size,
        last_hash: chain::split(line).map(|(_, h)| chain::hex(&h)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_store_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir
            .path()
            .join("trail-20260101T000000Z-00000000000000000001.jsonl");
        std::fs::write(&path, b"").unwrap();
        let file = LogFile::parse(&path).unwrap();
        let ix = build(&file).unwrap();
        // The index cannot be renamed into place: a non-empty directory is in the way.
        std::fs::create_dir(file.index_path()).unwrap();
        std::fs::write(file.index_path().join("x"), b"").unwrap();
        assert!(store(&file, &ix).is_err());
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "trail-20260101T000000Z-00000000000000000001.jsonl",
                "trail-20260101T000000Z-00000000000000000001.jsonl.idx"
            ]
        );
    }
}
