//! The `trail_log_file_deleted` record as the log keeps it, read back: what retention wrote of a file it deleted
//! (its name, `seq` range, last hash, and the Merkle tree at its last record).
//!
//! Owns reading those records out of the remaining files for the two readers that need the tree they kept:
//! `trail verify`, which grows the tree of what remains from it, and the tree cache ([`super::tree`]), which is
//! rebuilt from it when it is lost after retention. Only the daemon's own records count (top-level `type`, and
//! `"daemon":true` in the top-level `source`); a payload that merely looks like one is not one. Nothing here is
//! trusted for more than a start: the tree grown from a deletion record is checked against signed roots by
//! whoever uses it.

use serde::Deserialize;

use super::chain;
use super::files::{Chunk, Chunks, LogFile};
use super::tree::{Compact, Hash};

/// The record type.
pub const TYPE: &str = "trail_log_file_deleted";

/// The payload of a `trail_log_file_deleted` record.
#[derive(Debug, Clone, Deserialize)]
pub struct Deletion {
    /// The deleted file's name.
    pub file: String,
    /// Its last record's `seq`.
    pub last_seq: Option<u64>,
    /// Its last record's hash (hex).
    pub last_hash: Option<String>,
    /// The Merkle tree at `last_seq`: its size.
    #[serde(default)]
    pub tree_size: Option<u64>,
    /// Its root (hex).
    #[serde(default)]
    pub tree_root: Option<String>,
    /// Its compact range (hex), largest subtree first.
    #[serde(default)]
    pub tree_frontier: Option<Vec<String>>,
}

impl Deletion {
    /// The tree the deletion record kept, when it kept one whose frontier gives its root.
    pub fn tree(&self) -> Option<Compact> {
        let frontier: Vec<Hash> = self
            .tree_frontier
            .as_ref()?
            .iter()
            .map(|h| chain::parse_hex(h.as_bytes()).map(Hash))
            .collect::<Option<_>>()?;
        let tree = Compact::from_frontier(self.tree_size?, &frontier)?;
        (Some(chain::hex(&tree.root().0)) == self.tree_root).then_some(tree)
    }
}

/// What is read of a line that may be a deletion record.
#[derive(Deserialize)]
struct Own {
    #[serde(rename = "type")]
    kind: String,
    source: Source,
    #[serde(default)]
    payload: Option<Deletion>,
}

#[derive(Deserialize)]
struct Source {
    /// Set only in the records the daemon wrote itself.
    #[serde(default)]
    daemon: bool,
}

/// The daemon's deletion records in `logs` that kept the Merkle tree, in file order. Indexes only spare reading
/// files that hold none (a file without an index, or whose index does not match it, is read).
pub fn with_trees(logs: &[LogFile]) -> Vec<Deletion> {
    const PATTERN: &[u8] = b"\"type\":\"trail_log_file_deleted\"";
    let finder = memchr::memmem::Finder::new(PATTERN);
    let mut found = Vec::new();
    for file in logs {
        if super::index::load(file).is_some_and(|ix| !ix.types.contains_key(TYPE)) {
            continue;
        }
        let Ok(reader) = file.open() else { continue };
        let mut chunks = Chunks::new(reader, 4 << 20);
        while let Ok(Some(Chunk::Lines(_, lines))) = chunks.next_chunk() {
            for at in finder.find_iter(lines) {
                let start = memchr::memrchr(b'\n', &lines[..at]).map_or(0, |i| i + 1);
                let end = memchr::memchr(b'\n', &lines[at..]).map_or(lines.len(), |i| at + i);
                let Ok(record) = serde_json::from_slice::<Own>(&lines[start..end]) else {
                    continue;
                };
                if record.kind != TYPE || !record.source.daemon {
                    continue;
                }
                if let Some(d) = record.payload.filter(|d| d.tree().is_some()) {
                    found.push(d);
                }
            }
        }
    }
    found
}

/// The tree the log's remaining records grow on from: the one kept by the deletion record (of those in `logs`)
/// with the highest `last_seq` below `first_seq`, the first `seq` of the oldest file left.
pub fn base(logs: &[LogFile], first_seq: u64) -> Option<(Deletion, Compact)> {
    with_trees(logs)
        .into_iter()
        .filter(|d| d.last_seq.is_some_and(|s| s < first_seq))
        .max_by_key(|d| d.last_seq)
        .and_then(|d| d.tree().map(|t| (d, t)))
}
