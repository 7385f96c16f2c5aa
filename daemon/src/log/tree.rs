//! The Merkle tree over the log (RFC 6962 / RFC 9162 hashing), and its cache beside the log.
//!
//! Definition (also in README.md, "The log"): the tree's leaves are the log's records in `seq` order, from the
//! first record of the log. The entry of a record is 40 bytes, its `seq` and the chain's inner digest of it
//! ([`super::chain`]): SHA-256 of `rest`, the record's canonical bytes after its leading `{"seq":<digits>`. So a
//! third party computes a leaf from the record line alone, and every byte of the line but the `hash` field (which
//! the chain derives from them) is in it:
//!
//! ```text
//! entry(line)     = seq as 8 bytes big-endian || SHA-256(rest)
//! leaf_hash(line) = SHA-256(0x00 || entry(line))     node_hash(l, r) = SHA-256(0x01 || l || r)
//! ```
//!
//! and the tree of `n` leaves is RFC 9162's (section 2.1.1). The journal writer already holds the inner digest of
//! every record it seals, so the tree costs one SHA-256 block per leaf and two per node, whatever the records'
//! size. Every checkpoint (format 3 on) carries the tree's size and root at its `seq`. Hashing, proofs and the
//! stored-hash layout are `tlog_tiles`' (the port of Go's `sumdb/tlog`).
//!
//! The cache (`log.dir/tree/`: `hashes`, every stored hash in `tlog` order, 32 bytes each; `seqs`, the `seq` of
//! every leaf, 8 bytes big-endian; `format`, the leaf definition it was built with) makes roots and proofs fast;
//! both lists stay on disk and are read as needed, so the daemon's memory does not grow with the log. It is
//! rebuildable from the log files and never evidence: a proof is checked against a signed root, and `trail prove`
//! checks each leaf it uses against the record line it reads from the log. When retention deletes a file, its
//! deletion record keeps the tree at the file's last record ([`At`]: size, root, frontier), from which
//! `trail verify` grows the tree of what remains; a cache lost after retention is rebuilt the same way
//! ([`Cache::catch_up`]): the leaves before the oldest file left are known only by that frontier (`base`: the
//! tree's size, its last leaf's `seq` and the frontier, written beside the two lists, whose entries for those
//! leaves are left unwritten). Such a cache proves the records that remain, and the consistency of any tree at
//! least as large as the base with a later one.
//!
//! The daemon reaches its cache through a [`Keeper`], shared by the checkpoints and retention: it checks the cache
//! against the newest signed checkpoint before its first use and against the last root it gave before every later
//! one, and rebuilds it from the log files when they disagree. The writer hands the keeper every record it
//! commits ([`Keeper::feed`], a bounded queue of [`Entry`]s), which a thread of the daemon adds as they come
//! ([`Keeper::follow`]); what the queue could not hold is read back from the log files.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

pub use tlog_tiles::Hash;
use tlog_tiles::{HashReader, stored_hash_count};
use tracing::{debug, error, info, warn};

use super::files::{self, Chunk, Chunks};

/// The cache's directory inside the log directory.
pub const DIR: &str = "tree";
/// The file in [`DIR`] that holds the cache's [`Base`], when it was rebuilt after retention.
const BASE: &str = "base";
/// The file in [`DIR`] that names the leaf definition the cache was built with, and its content: a cache without
/// it (built by a development version whose leaves were the record lines) is built again.
const FORMAT: (&str, &[u8]) = ("format", b"leaves: seq || inner digest\n");

/// The leaf hash of record `seq` whose inner digest ([`super::chain::digest`] of what follows its `seq`) is
/// `digest`.
pub fn leaf(seq: u64, digest: &super::chain::Hash) -> Hash {
    let mut entry = [0u8; 40];
    entry[..8].copy_from_slice(&seq.to_be_bytes());
    entry[8..].copy_from_slice(digest);
    tlog_tiles::record_hash(&entry)
}

/// The leaf hash of a record's line (without its newline); `None` when the line is not a sealed record (it has
/// no `seq` or no hash field), which is no leaf of the tree.
pub fn leaf_hash(line: &[u8]) -> Option<Hash> {
    let (body, _) = super::chain::split(line)?;
    let (seq, rest) = crate::record::line::split_seq(body)?;
    Some(leaf(seq, &super::chain::digest(rest)))
}

/// A record the journal writer committed to the log, as the tree needs it.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Its `seq`.
    pub seq: u64,
    /// Its inner digest ([`super::chain::digest`]).
    pub digest: super::chain::Hash,
}

/// A tree being built in memory from its leaves, keeping only the roots of its perfect subtrees (a compact range):
/// the root at any size it passed through is known without keeping the leaves.
#[derive(Debug, Default, Clone)]
pub struct Compact {
    /// Roots of perfect subtrees, largest first, with their heights.
    stack: Vec<(Hash, u32)>,
    size: u64,
}

impl Compact {
    /// Adds a leaf.
    pub fn push(&mut self, leaf: Hash) {
        self.push_stored(leaf, |_| {});
    }

    /// Adds a leaf, giving `stored` the hashes the tree stores for it in `tlog` order: the leaf, then the root of
    /// every perfect subtree it completes, smallest first.
    fn push_stored(&mut self, leaf: Hash, mut stored: impl FnMut(Hash)) {
        stored(leaf);
        let mut node = (leaf, 0);
        while let Some(&(left, h)) = self.stack.last() {
            if h != node.1 {
                break;
            }
            self.stack.pop();
            node = (tlog_tiles::node_hash(left, node.0), h + 1);
            stored(node.0);
        }
        self.stack.push(node);
        self.size += 1;
    }

    /// The tree of `size` leaves whose [`Cache::frontier`] is `frontier`, to grow on from there; `None` when the
    /// number of hashes is not the number of ones in `size`.
    pub fn from_frontier(size: u64, frontier: &[Hash]) -> Option<Compact> {
        let heights = (0..64u32).rev().filter(|h| size & (1 << h) != 0);
        if frontier.len() != size.count_ones() as usize {
            return None;
        }
        Some(Compact {
            stack: frontier.iter().copied().zip(heights).collect(),
            size,
        })
    }

    /// The roots of its perfect subtrees, largest first (see [`Cache::frontier`]).
    pub fn frontier(&self) -> Vec<Hash> {
        self.stack.iter().map(|&(h, _)| h).collect()
    }

    /// Leaves added.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The root of the tree of the leaves added so far (RFC 9162's hash of the empty tree when none).
    pub fn root(&self) -> Hash {
        let mut iter = self.stack.iter().rev();
        let Some(&(mut h, _)) = iter.next() else {
            return tlog_tiles::EMPTY_HASH;
        };
        for &(left, _) in iter {
            h = tlog_tiles::node_hash(left, h);
        }
        h
    }
}

/// Why the tree cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the cache or a log file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A record needed is not in the log files any more (retention deleted its file) nor in the cache.
    #[error(
        "the tree cannot be built: records after seq {after} are not in the log files (deleted by retention?) and not in the tree cache {}",
        dir.display()
    )]
    Gone {
        /// The last seq the cache holds (0 for none).
        after: u64,
        /// The cache.
        dir: PathBuf,
    },
    /// The cache does not hold the record yet (the checkpoint that brings it up to date is still being written).
    #[error("the tree cache {} holds the records up to seq {last}, not yet seq {seq}", dir.display())]
    Behind {
        /// The record asked for.
        seq: u64,
        /// The last one the cache holds.
        last: u64,
        /// The cache.
        dir: PathBuf,
    },
    /// The record is in a log file retention deleted, before the leaves the cache holds one by one.
    #[error(
        "seq {seq} is in a log file retention deleted: the tree cache {} holds the leaves after seq {base} only",
        dir.display()
    )]
    Deleted {
        /// The record asked for.
        seq: u64,
        /// The last seq of the cache's base.
        base: u64,
        /// The cache.
        dir: PathBuf,
    },
    /// A proof could not be computed.
    #[error("{0}")]
    Proof(String),
}

/// The leaves a cache rebuilt after retention does not hold one by one: the tree of the deleted records, as the
/// deletion record of the last file deleted kept it.
#[derive(Debug, Clone, PartialEq)]
pub struct Base {
    /// Leaves in that tree.
    pub size: u64,
    /// The `seq` of its last leaf.
    pub last_seq: u64,
    /// Its compact range, largest subtree first ([`Cache::frontier`]).
    pub frontier: Vec<Hash>,
}

/// The most leaves a base may stand for (2^48 records: far beyond any log, and their stored hashes' offsets fit).
const MAX_LEAVES: u64 = 1 << 48;

/// The base file's format.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BaseFile {
    size: u64,
    last_seq: u64,
    frontier: Vec<String>,
}

/// A [`Base`] as the cache reads it: the stored-hash index of every frontier hash.
#[derive(Debug, Clone)]
struct Prefix {
    size: u64,
    last_seq: u64,
    /// Stored hashes of the tree of `size` leaves (none of which is held but the frontier's).
    stored: u64,
    nodes: Vec<(u64, Hash)>,
}

impl Prefix {
    fn of(base: &Base) -> Option<Prefix> {
        // A base read from a file or a record is bounded before any size is computed from it.
        if base.size == 0
            || base.size > MAX_LEAVES
            || base.frontier.len() != base.size.count_ones() as usize
        {
            return None;
        }
        let mut nodes = Vec::with_capacity(base.frontier.len());
        let mut start = 0u64;
        let mut hashes = base.frontier.iter();
        for level in (0..64u8).rev() {
            if base.size & (1 << level) != 0 {
                let hash = *hashes.next()?;
                nodes.push((tlog_tiles::stored_hash_index(level, start >> level), hash));
                start += 1 << level;
            }
        }
        Some(Prefix {
            size: base.size,
            last_seq: base.last_seq,
            stored: stored_hash_count(base.size),
            nodes,
        })
    }

    fn parse(bytes: &[u8]) -> Option<Prefix> {
        let f: BaseFile = serde_json::from_slice(bytes).ok()?;
        let frontier = f
            .frontier
            .iter()
            .map(|h| super::chain::parse_hex(h.as_bytes()).map(Hash))
            .collect::<Option<Vec<_>>>()?;
        Prefix::of(&Base {
            size: f.size,
            last_seq: f.last_seq,
            frontier,
        })
    }

    fn to_file(&self) -> Vec<u8> {
        let f = BaseFile {
            size: self.size,
            last_seq: self.last_seq,
            frontier: self
                .nodes
                .iter()
                .map(|(_, h)| super::chain::hex(&h.0))
                .collect(),
        };
        serde_json::to_vec(&f).expect("serializable")
    }
}

/// The tree as it stood at one record: what a deletion record keeps of the leaves it removes, so that the tree
/// can be checked and grown on from the records that remain.
#[derive(Debug, Clone, PartialEq)]
pub struct At {
    /// Leaves up to and including the record.
    pub size: u64,
    /// The root of that tree.
    pub root: Hash,
    /// Its compact range ([`Cache::frontier`]).
    pub frontier: Vec<Hash>,
}

/// Stored hashes held in memory at most before an update writes them to the cache (256 KiB).
const FLUSH_HASHES: usize = 1 << 13;
/// Bytes of log read at a time by [`Cache::catch_up`].
const READ_CHUNK: usize = 1 << 20;

/// The tree's cache: stored hashes and the `seq` of every leaf, kept beside the log.
///
/// Memory does not grow with the log: both lists stay on disk and are read with `pread` (a leaf's `seq` by binary
/// search, about 22 reads for 3 million records); only what an update appended and has not written out yet is
/// held, at most [`FLUSH_HASHES`] hashes and their leaves' `seq`s. A cache opened without `write` and without files
/// (a tool building a tree nobody keeps) holds everything in memory; tools that build a whole tree give it a
/// directory instead.
pub struct Cache {
    dir: PathBuf,
    hashes: Option<File>,
    seqs: Option<File>,
    /// Opened for writing: `flush` writes out what was appended.
    write: bool,
    /// Leaves held (on disk and in `seq_tail`).
    n: u64,
    /// Stored hashes on disk.
    on_disk: u64,
    /// Leaf seqs on disk.
    seqs_on_disk: u64,
    /// The `seq` of the leaves appended and not yet written.
    seq_tail: Vec<u64>,
    /// The last leaf's `seq`.
    last: Option<u64>,
    /// Stored hashes not yet written.
    tail: Vec<Hash>,
    /// Where reading the log continues: a file name and the offset after the last leaf read from it.
    resume: Option<(String, u64)>,
    /// The leaves before the oldest log file left, known only by their tree's frontier (a cache rebuilt after
    /// retention).
    prefix: Option<Prefix>,
    /// The first `seq` of the oldest log file when a gap before it was last looked into (see [`Cache::catch_up`]),
    /// and whether no tree could be found for it.
    gap_checked: Option<(u64, bool)>,
    /// The compact range of all the leaves held, once a leaf was appended: the hashes a new leaf completes are
    /// computed from it, without reading the lists.
    grow: Option<Compact>,
}

/// Removes `path` if it is there.
fn remove_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The largest number of leaves whose stored hashes fit in `stored` hashes.
fn leaves_in(stored: u64) -> u64 {
    // stored_hash_count(n) is 2n minus the number of ones in n: increasing, and at least n.
    let (mut lo, mut hi) = (0u64, stored);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if stored_hash_count(mid) <= stored {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

impl Cache {
    /// Opens the cache of the log in `log_dir`; with `write`, creates it when missing and cuts a tail that a crash
    /// left inconsistent (an unreadable base empties it); without, reads what is there (an unreadable or missing
    /// cache is an empty one, kept in memory only).
    pub fn open(log_dir: &Path, write: bool) -> Result<Cache, Error> {
        let dir = log_dir.join(DIR);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        let (hashes_path, seqs_path, base_path) =
            (dir.join("hashes"), dir.join("seqs"), dir.join(BASE));
        let open = |path: &Path| -> io::Result<File> {
            if write {
                crate::modes::open(
                    path,
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false),
                    crate::modes::FILE,
                )
            } else {
                File::open(path)
            }
        };
        if write {
            crate::modes::create_dir_all(&dir).map_err(io(&dir))?;
        }
        // Built with another leaf definition: nothing of it is used.
        let format_path = dir.join(FORMAT.0);
        let other_format = std::fs::read(&format_path).map_or(true, |f| f != FORMAT.1);
        if other_format && write {
            for path in [&hashes_path, &seqs_path, &base_path] {
                remove_present(path).map_err(io(path))?;
            }
            let tmp = dir.join(".format.tmp");
            crate::modes::write_aside(&tmp, &format_path, FORMAT.1, true)
                .map_err(io(&format_path))?;
        }
        // The base is written before the two lists grow past it, so a base without them is a crash in between.
        let (prefix, mut unreadable) = match std::fs::read(&base_path) {
            Ok(bytes) => match Prefix::parse(&bytes) {
                Some(p) => (Some(p), false),
                None => (None, true),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => (None, false),
            Err(e) if write => return Err(io(&base_path)(e)),
            Err(_) => (None, true),
        };
        let (hashes, seqs) = match (open(&hashes_path), open(&seqs_path)) {
            (Ok(h), Ok(s)) => (Some(h), Some(s)),
            (Err(e), _) if write => return Err(io(&hashes_path)(e)),
            (_, Err(e)) if write => return Err(io(&seqs_path)(e)),
            _ => (None, None),
        };
        let mut n = 0;
        if let (Some(h), Some(s)) = (&hashes, &seqs) {
            let stored = h.metadata().map_err(io(&hashes_path))?.len() / 32;
            let seq_count = s.metadata().map_err(io(&seqs_path))?.len() / 8;
            // A crash may leave one file ahead of the other: keep what both hold.
            n = seq_count.min(leaves_in(stored));
        }
        if let Some(p) = &prefix {
            n = n.max(p.size);
        }
        if unreadable && write {
            // Damaged: nothing of it is used.
            warn!(file = %base_path.display(), "the tree cache's base is unreadable; the cache is rebuilt");
            std::fs::remove_file(&base_path).map_err(io(&base_path))?;
            n = 0;
            unreadable = false;
        }
        if let (Some(h), Some(s), true) = (&hashes, &seqs, write) {
            h.set_len(stored_hash_count(n) * 32)
                .map_err(io(&hashes_path))?;
            s.set_len(n * 8).map_err(io(&seqs_path))?;
        }
        let in_files = !unreadable && (write || (n > 0 && !other_format));
        let mut cache = Cache {
            dir,
            n: if in_files { n } else { 0 },
            on_disk: if in_files { stored_hash_count(n) } else { 0 },
            seqs_on_disk: if in_files { n } else { 0 },
            seq_tail: Vec::new(),
            last: None,
            hashes: hashes.filter(|_| in_files),
            seqs: seqs.filter(|_| in_files),
            write,
            tail: Vec::new(),
            resume: None,
            prefix: prefix.filter(|_| in_files),
            gap_checked: None,
            grow: None,
        };
        if cache.n > 0 {
            cache.last = Some(cache.seq_at(cache.n - 1)?);
        }
        Ok(cache)
    }

    /// Empties the cache (a damaged one, before it is built again).
    pub fn reset(&mut self) -> Result<(), Error> {
        if self.write {
            let io = |path: PathBuf| move |source| Error::Io { path, source };
            let base = self.dir.join(BASE);
            remove_present(&base).map_err(io(base))?;
            if let (Some(h), Some(s)) = (&self.hashes, &self.seqs) {
                h.set_len(0).map_err(io(self.dir.join("hashes")))?;
                s.set_len(0).map_err(io(self.dir.join("seqs")))?;
            }
        }
        self.n = 0;
        self.on_disk = 0;
        self.seqs_on_disk = 0;
        self.seq_tail = Vec::new();
        self.tail = Vec::new();
        self.last = None;
        self.resume = None;
        self.prefix = None;
        self.gap_checked = None;
        self.grow = None;
        Ok(())
    }

    /// Starts an empty cache at `base`: the leaves before it are known only by its frontier.
    fn start_from(&mut self, base: &Base) -> Result<(), Error> {
        let prefix = Prefix::of(base).ok_or_else(|| {
            Error::Proof(format!(
                "tree cache {}: the base's frontier does not fit its size {}",
                self.dir.display(),
                base.size
            ))
        })?;
        debug_assert_eq!(self.n, 0);
        let stored = prefix.stored;
        if self.write
            && let (Some(h), Some(s)) = (&self.hashes, &self.seqs)
        {
            let io = |path: PathBuf| move |source| Error::Io { path, source };
            let path = self.dir.join(BASE);
            let tmp = self.dir.join(".base.tmp");
            crate::modes::write_aside(&tmp, &path, &prefix.to_file(), true).map_err(io(path))?;
            // The entries of the leaves before the base stay unwritten (holes).
            h.set_len(stored * 32)
                .map_err(io(self.dir.join("hashes")))?;
            s.set_len(base.size * 8)
                .map_err(io(self.dir.join("seqs")))?;
        }
        self.n = base.size;
        self.on_disk = stored;
        self.seqs_on_disk = base.size;
        self.last = Some(base.last_seq);
        self.prefix = Some(prefix);
        self.grow = None;
        Ok(())
    }

    /// The base of a cache rebuilt after retention: (leaves, the last one's `seq`) known only by their frontier.
    pub fn base(&self) -> Option<(u64, u64)> {
        self.prefix.as_ref().map(|p| (p.size, p.last_seq))
    }

    /// Leaves held.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// True when no leaf is held.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The last `seq` held.
    pub fn last_seq(&self) -> Option<u64> {
        self.last
    }

    /// Bytes held in memory for leaves not yet written out (bounded for a cache opened for writing).
    pub fn held_bytes(&self) -> usize {
        self.tail.capacity() * std::mem::size_of::<Hash>()
            + self.seq_tail.capacity() * std::mem::size_of::<u64>()
    }

    /// The `seq` of leaf `index` (below [`Cache::len`]).
    fn seq_at(&self, index: u64) -> Result<u64, Error> {
        if let Some(p) = &self.prefix
            && index < p.size
        {
            // Only the base's last seq is known; the ones before it are below it.
            return Ok(if index + 1 == p.size { p.last_seq } else { 0 });
        }
        if index >= self.seqs_on_disk {
            return Ok(self.seq_tail[(index - self.seqs_on_disk) as usize]);
        }
        let path = || self.dir.join("seqs");
        let file = self.seqs.as_ref().ok_or_else(|| Error::Io {
            path: path(),
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, index * 8)
            .map_err(|source| Error::Io {
                path: path(),
                source,
            })?;
        Ok(u64::from_be_bytes(b))
    }

    /// The tree size at `seq`: the number of leaves whose `seq` is at most `seq`.
    pub fn size_at(&self, seq: u64) -> Result<u64, Error> {
        if let Some(p) = &self.prefix
            && seq < p.last_seq
        {
            return Err(Error::Deleted {
                seq,
                base: p.last_seq,
                dir: self.dir.clone(),
            });
        }
        if self.last.is_some_and(|l| l <= seq) {
            return Ok(self.n);
        }
        let (mut lo, mut hi) = (0, self.n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.seq_at(mid)? <= seq {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// The leaf index of the record `seq`, when the cache holds it.
    pub fn index_of(&self, seq: u64) -> Result<Option<u64>, Error> {
        let size = self.size_at(seq)?;
        Ok(match size.checked_sub(1) {
            Some(i) if self.seq_at(i)? == seq => Some(i),
            _ => None,
        })
    }

    /// The roots of the perfect subtrees that make up the tree of the first `size` leaves, largest first (its
    /// compact range, RFC 9162's tree split at the ones of `size`): with `size`, all a tree needs to grow on
    /// without the leaves before.
    pub fn frontier(&self, size: u64) -> Result<Vec<Hash>, Error> {
        let mut indexes = Vec::new();
        let mut start = 0u64;
        for level in (0..64u8).rev() {
            if size & (1 << level) != 0 {
                indexes.push(tlog_tiles::stored_hash_index(level, start >> level));
                start += 1 << level;
            }
        }
        self.read_hashes(&indexes).map_err(|e| self.proof(e))
    }

    /// Adds the leaf `leaf` of record `seq` (after the last one held).
    pub fn append(&mut self, seq: u64, leaf: Hash) -> Result<(), Error> {
        let grow = match &mut self.grow {
            Some(g) => g,
            None => {
                let frontier = self.frontier(self.n)?;
                let compact = Compact::from_frontier(self.n, &frontier).ok_or_else(|| {
                    Error::Proof(format!(
                        "tree cache {}: its frontier does not fit its size {}",
                        self.dir.display(),
                        self.n
                    ))
                })?;
                self.grow.insert(compact)
            }
        };
        let tail = &mut self.tail;
        grow.push_stored(leaf, |h| tail.push(h));
        self.seq_tail.push(seq);
        self.last = Some(seq);
        self.n += 1;
        Ok(())
    }

    /// Writes what was appended (only a cache opened for writing keeps it on disk).
    pub fn flush(&mut self) -> Result<(), Error> {
        let (Some(h), Some(s)) = (&self.hashes, &self.seqs) else {
            return Ok(());
        };
        if !self.write || self.tail.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(self.tail.len() * 32);
        for hash in &self.tail {
            bytes.extend_from_slice(&hash.0);
        }
        let io = |path: PathBuf| move |source| Error::Io { path, source };
        h.write_all_at(&bytes, self.on_disk * 32)
            .map_err(io(self.dir.join("hashes")))?;
        let seqs: Vec<u8> = self.seq_tail.iter().flat_map(|s| s.to_be_bytes()).collect();
        s.write_all_at(&seqs, self.seqs_on_disk * 8)
            .map_err(io(self.dir.join("seqs")))?;
        self.on_disk += self.tail.len() as u64;
        self.seqs_on_disk += self.seq_tail.len() as u64;
        // Written out: nothing of it stays in memory.
        self.tail = Vec::new();
        self.seq_tail = Vec::new();
        Ok(())
    }

    /// Reads the records of the log in `log_dir` after the last one held, up to `upto` (every record when none),
    /// and adds them. Records are read from where the last call stopped, or from the file that holds the next
    /// `seq`.
    pub fn catch_up(&mut self, log_dir: &Path, upto: Option<u64>) -> Result<(), Error> {
        // A file listed may be compressed (or deleted by retention) before it is opened: the listing is read again
        // (the leaves read so far stay; the compressed file has the same name and bytes).
        let mut attempts = 0;
        loop {
            match self.catch_up_listed(log_dir, upto) {
                Err(Error::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound && attempts < 3 =>
                {
                    attempts += 1;
                }
                done => return done,
            }
        }
    }

    fn catch_up_listed(&mut self, log_dir: &Path, upto: Option<u64>) -> Result<(), Error> {
        if upto.is_some_and(|u| self.last_seq().is_some_and(|l| l >= u)) {
            return Ok(());
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        let logs = files::list(log_dir).map_err(io(log_dir))?;
        let next = self.last_seq().map_or(1, |s| s + 1);
        // The tree starts at the log's first record. When retention deleted records the cache does not hold, the
        // tree grows on from the one the last deletion record kept (the base); without one there is no tree. A
        // gap of seqs alone (stream-only records at the end of a deleted file) is no missing leaf.
        if let Some(first) = logs.first()
            && first.first_seq > next
            && self.gap_checked != Some((first.first_seq, false))
        {
            // Looked into once per oldest file: finding the base reads the files that hold deletion records.
            let base = match self.gap_checked {
                Some((seq, true)) if seq == first.first_seq => None,
                _ => super::deletion::base(&logs, first.first_seq),
            };
            self.gap_checked = Some((first.first_seq, base.is_none()));
            match base {
                Some((d, tree)) if d.last_seq.is_some_and(|s| s >= next) => {
                    self.reset()?;
                    self.start_from(&Base {
                        size: tree.size(),
                        last_seq: d.last_seq.unwrap_or_default(),
                        frontier: tree.frontier(),
                    })?;
                }
                Some(_) => {}
                None => {
                    return Err(Error::Gone {
                        after: next - 1,
                        dir: self.dir.clone(),
                    });
                }
            }
            self.gap_checked = Some((first.first_seq, false));
        }
        let after = self.last_seq();
        let next = after.map_or(1, |s| s + 1);
        // The file to start in: where the last call stopped, else the last whose first seq is at most `next` (or
        // the first, when `next` falls in the gap before it).
        let start = match &self.resume {
            Some((name, _)) if logs.iter().any(|f| &f.name == name) => name.clone(),
            _ => {
                let Some(f) = logs
                    .iter()
                    .rev()
                    .find(|f| f.first_seq <= next)
                    .or(logs.first())
                else {
                    return Ok(());
                };
                f.name.clone()
            }
        };
        'files: for file in logs.iter().filter(|f| f.name >= start) {
            let offset = match &self.resume {
                Some((name, at)) if name == &file.name => *at,
                _ => 0,
            };
            // Where the last call stopped, not read again: the file being appended to is read from there at every
            // checkpoint.
            let reader = file.open_at(offset).map_err(io(&file.path))?;
            let mut chunks = Chunks::new(reader, READ_CHUNK);
            // A torn tail (a group being written) ends the file for now.
            while let Some(Chunk::Lines(at, lines)) = chunks.next_chunk().map_err(io(&file.path))? {
                let mut pos = 0usize;
                for line in files::split_lines_inclusive(lines) {
                    pos += line.len();
                    let line = &line[..line.len() - 1];
                    let Some(seq) = crate::record::line::seq(line) else {
                        continue;
                    };
                    if after.is_some_and(|a| seq <= a) {
                        continue;
                    }
                    if upto.is_some_and(|u| seq > u) {
                        self.resume = Some((
                            file.name.clone(),
                            offset + at + pos as u64 - line.len() as u64 - 1,
                        ));
                        break 'files;
                    }
                    if self.last.is_some_and(|l| seq <= l) {
                        // Out of order in the files: not a log the daemon wrote; the tree follows file order only
                        // through increasing seqs.
                        continue;
                    }
                    // A line that is no sealed record is no leaf (`trail verify` reports it).
                    let Some(leaf) = leaf_hash(line) else {
                        continue;
                    };
                    self.append(seq, leaf)?;
                    // Written out as they come (a cache opened for writing): a checkpoint after a million records
                    // would otherwise hold some 64 MiB of stored hashes at once.
                    if self.write && self.tail.len() >= FLUSH_HASHES {
                        self.flush()?;
                    }
                }
                self.resume = Some((file.name.clone(), offset + at + pos as u64));
            }
        }
        self.flush()
    }

    /// The root of the tree of the first `size` leaves.
    pub fn root(&self, size: u64) -> Result<Hash, Error> {
        tlog_tiles::tree_hash(size, self).map_err(|e| self.proof(e))
    }

    /// The inclusion proof of leaf `index` in the tree of `size` leaves.
    pub fn prove(&self, size: u64, index: u64) -> Result<Vec<Hash>, Error> {
        tlog_tiles::prove_record(size, index, self).map_err(|e| self.proof(e))
    }

    /// The consistency proof of the tree of `old` leaves with the tree of `new` leaves.
    pub fn prove_consistency(&self, new: u64, old: u64) -> Result<Vec<Hash>, Error> {
        tlog_tiles::prove_tree(new, old, self).map_err(|e| self.proof(e))
    }

    /// The stored hash of leaf `index` (to compare with the record line it stands for).
    pub fn leaf(&self, index: u64) -> Result<Hash, Error> {
        let at = tlog_tiles::stored_hash_index(0, index);
        Ok(self.read_hashes(&[at]).map_err(|e| self.proof(e))?[0])
    }

    fn proof(&self, e: tlog_tiles::Error) -> Error {
        Error::Proof(format!("tree cache {}: {e}", self.dir.display()))
    }
}

/// A checkpoint's tree as signed: what the log's records must give at `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct Signed {
    /// The checkpoint's file name.
    pub name: String,
    /// The last `seq` it covers.
    pub seq: u64,
    /// Its tree size.
    pub size: u64,
    /// Its root.
    pub root: Hash,
}

impl Signed {
    /// The tree a checkpoint line signs, when it has one.
    pub fn of(name: &str, line: &[u8]) -> Option<Signed> {
        let cp = super::checkpoint::Checkpoint::parse(line).ok()?;
        if cp.body.checkpoint < 3 {
            return None;
        }
        let root = super::chain::parse_hex(cp.body.tree_root.as_deref()?.as_bytes())?;
        Some(Signed {
            name: name.to_owned(),
            seq: cp.body.seq?,
            size: cp.body.tree_size?,
            root: Hash(root),
        })
    }

    /// The tree of the newest checkpoint in `log_dir` that has one and whose signature `key` verifies.
    pub fn newest(log_dir: &Path, key: &ed25519_dalek::VerifyingKey) -> Option<Signed> {
        super::checkpoint::list(log_dir)
            .iter()
            .rev()
            .find_map(|path| {
                let line = std::fs::read(path).ok()?;
                super::checkpoint::Checkpoint::parse(&line)
                    .ok()?
                    .check_signature(Some(key))
                    .ok()?;
                Signed::of(path.file_name()?.to_str()?, &line)
            })
    }
}

/// The daemon's tree cache, shared by the checkpoints (each brings it up to its `seq`) and retention (which reads the
/// tree at an expired file's last record, bringing the cache up to it first).
///
/// The cache is opened when first needed, and again after a failure to write it. It is never trusted: before its
/// first use it must give the root of the newest signed checkpoint (the one found at start), before every later
/// use the root it gave last; a cache that does not, or whose lists do not agree, is emptied and built again from
/// the log files (from the last deletion record's tree when retention deleted the first ones).
pub struct Keeper {
    log_dir: PathBuf,
    state: Mutex<Kept>,
    /// Held while retention deletes a file (and the checkpoints that vouch only for what it deleted) and while a
    /// checkpoint is written, so that no checkpoint over deleted records is written after that clean-up.
    files: Mutex<()>,
    /// The records the writer committed and the cache has not taken yet.
    fed: Mutex<Fed>,
    /// Signalled when records are fed.
    arrived: Condvar,
}

/// Records fed and not yet taken: every log record after `after`, in `seq` order.
#[derive(Default)]
struct Fed {
    /// The log record the first entry follows (`Some(None)`: none, the log had no record before it); `None` until
    /// the writer first feeds.
    after: Option<Option<u64>>,
    entries: std::collections::VecDeque<Entry>,
    /// Records left to the log files because the queue was full, since the last report of it.
    dropped: u64,
}

/// The follower's pause after taking what was fed (at 1,000,000 records a second, 5,000 records queue meanwhile).
const FOLLOW_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// The follower's pause when it left entries to an update of the keeper.
const FOLLOW_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// The most entries fed and not taken (40 bytes each: 2.5 MiB); beyond, the records are read back from the log.
const FED_MAX: usize = 1 << 16;

impl Fed {
    /// The last record fed.
    fn last(&self) -> Option<Option<u64>> {
        self.entries.back().map(|e| Some(e.seq)).or(self.after)
    }
}

struct Kept {
    cache: Option<Cache>,
    /// Checked before the first use.
    signed: Option<Signed>,
    /// The last (size, root) the cache gave, checked before the next use.
    last: Option<(u64, Hash)>,
}

impl Keeper {
    /// The keeper of the cache of the log in `log_dir`; `signed` is the newest signed checkpoint's tree.
    pub fn new(log_dir: &Path, signed: Option<Signed>) -> Keeper {
        Keeper {
            log_dir: log_dir.to_owned(),
            state: Mutex::new(Kept {
                cache: None,
                signed,
                last: None,
            }),
            files: Mutex::new(()),
            fed: Mutex::new(Fed::default()),
            arrived: Condvar::new(),
        }
    }

    /// Hands the keeper records the writer committed: `entries`, every log record after record `after` (none: the
    /// log had no record before them), in `seq` order. Never waits for the cache: when the queue is full, the
    /// records are left to be read back from the log files.
    pub fn feed(&self, after: Option<u64>, entries: &[Entry]) {
        let Some(last) = entries.last() else {
            return;
        };
        let mut fed = self.fed.lock().unwrap_or_else(|e| e.into_inner());
        if fed.entries.len() + entries.len() > FED_MAX {
            fed.dropped += (fed.entries.len() + entries.len()) as u64;
            fed.entries.clear();
            fed.after = Some(Some(last.seq));
        } else {
            if fed.last() != Some(after) {
                fed.entries.clear();
                fed.after = Some(after);
            }
            fed.entries.extend(entries);
        }
        drop(fed);
        self.arrived.notify_one();
    }

    /// Adds the records fed as they come, until the keeper is dropped (the thread holds it only weakly).
    pub fn follow(keeper: std::sync::Weak<Keeper>) {
        while let Some(k) = keeper.upgrade() {
            // What is queued when it wakes, no more: the cache is not held longer while the writer goes on.
            let waiting = {
                let fed = k.fed.lock().unwrap_or_else(|e| e.into_inner());
                let (fed, _) = k
                    .arrived
                    .wait_timeout_while(fed, std::time::Duration::from_secs(1), |f| {
                        f.entries.is_empty()
                    })
                    .unwrap_or_else(|e| e.into_inner());
                fed.entries.back().map(|e| e.seq)
            };
            if let Some(upto) = waiting {
                let mut kept = k.lock();
                let taken = kept
                    .opened(&k.log_dir)
                    .and_then(|cache| take_fed(cache, &k.log_dir, &k.fed, Some(upto), false));
                if let Err(e) = taken {
                    if matches!(e, Error::Io { .. }) {
                        // Opened again next time (which cuts what a failed write left).
                        kept.cache = None;
                    }
                    warn!(error = %e, "cannot add the records just written to the tree cache; checkpoints read them from the log files");
                }
                drop(kept);
                // Woken at most every few milliseconds: a busy writer's groups are taken many at a time. Entries it
                // left (the cache lacks records before them) wait for an update of the keeper, which reads them.
                let left = k
                    .fed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entries
                    .front()
                    .is_some_and(|e| e.seq <= upto);
                std::thread::sleep(if left { FOLLOW_WAIT } else { FOLLOW_PAUSE });
            }
        }
    }

    /// Excludes retention's deletions (held by it while it deletes a file, and by a checkpoint while it is
    /// written).
    pub fn files_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the cache up to `seq` (every record when none) and returns the tree's size and root there.
    pub fn root_at(&self, seq: Option<u64>) -> Result<(u64, Hash), Error> {
        let mut kept = self.lock();
        let cache = kept.update(&self.log_dir, &self.fed, seq)?;
        let size = match seq {
            Some(s) => cache.size_at(s)?,
            None => cache.len(),
        };
        let root = cache.root(size)?;
        kept.last = Some((size, root));
        Ok((size, root))
    }

    /// The tree at record `seq` (for a deletion record), bringing the cache up to it first.
    pub fn at(&self, seq: u64) -> Result<At, Error> {
        let mut kept = self.lock();
        let cache = kept.update(&self.log_dir, &self.fed, Some(seq))?;
        if cache.last_seq().is_none_or(|l| l < seq) {
            return Err(Error::Behind {
                seq,
                last: cache.last_seq().unwrap_or(0),
                dir: cache.dir.clone(),
            });
        }
        let size = cache.size_at(seq)?;
        let frontier = cache.frontier(size)?;
        let root = Compact::from_frontier(size, &frontier)
            .expect("one hash per one in size")
            .root();
        Ok(At {
            size,
            root,
            frontier,
        })
    }
}

impl Kept {
    /// The cache, opened if it was not.
    fn opened(&mut self, log_dir: &Path) -> Result<&mut Cache, Error> {
        if self.cache.is_none() {
            self.cache = Some(Cache::open(log_dir, true)?);
        }
        Ok(self.cache.as_mut().expect("opened"))
    }

    /// Opens the cache if needed, checks it, brings it up to `upto`, and rebuilds it when it does not match.
    fn update(
        &mut self,
        log_dir: &Path,
        fed: &Mutex<Fed>,
        upto: Option<u64>,
    ) -> Result<&Cache, Error> {
        // The checkpoint found at start is checked as soon as the cache reaches it.
        let upto = match (&self.signed, upto) {
            (Some(s), Some(u)) => Some(u.max(s.seq)),
            (_, u) => u,
        };
        let mut rebuilt = false;
        loop {
            self.opened(log_dir)?;
            let cache = self.cache.as_mut().expect("opened");
            let why = match take_fed(cache, log_dir, fed, upto, true)
                .and_then(|()| cache.catch_up(log_dir, upto))
                .and_then(|()| cache.flush())
            {
                Ok(()) => match check(cache, self.signed.as_ref(), self.last) {
                    None => break,
                    Some(why) => why,
                },
                Err(e @ Error::Io { .. }) => {
                    // Opened again next time (which cuts what a failed write left).
                    self.cache = None;
                    return Err(e);
                }
                Err(e @ Error::Gone { .. }) => return Err(e),
                // The cache's own lists do not agree with each other.
                Err(e) => e.to_string(),
            };
            if rebuilt {
                // Built again from the log files, it still does not match: the records changed.
                error!(
                    dir = %log_dir.display(), why,
                    "the log's records do not give the Merkle tree that was signed before: the log was changed (run trail verify); the tree goes on from the records as they are"
                );
                self.signed = None;
                self.last = None;
                break;
            }
            let cache = self.cache.as_mut().expect("opened");
            warn!(dir = %cache.dir.display(), why, "the tree cache does not match the log; it is built again from the log files");
            if let Err(e) = cache.reset() {
                self.cache = None;
                return Err(e);
            }
            rebuilt = true;
        }
        let cache = self.cache.as_ref().expect("opened");
        if let Some(s) = self.signed.take() {
            self.last = Some((s.size, s.root));
        }
        if rebuilt {
            info!(dir = %cache.dir.display(), leaves = cache.len(), base = ?cache.base(), "the tree cache was built again from the log files");
        }
        Ok(cache)
    }
}

/// What `cache` must do from the log files before it can take entries fed after `after` whose first is `first`.
#[derive(PartialEq)]
enum Before {
    Nothing,
    /// Read the records up to this seq.
    Read(u64),
    /// Start again (another log's leaves), then read the records before `first`.
    Reset,
}

fn before(cache: &Cache, after: Option<u64>, first: u64) -> Before {
    let last = cache.last_seq();
    match after {
        // The writer knew no record before them (a log without records, or whose last record's hash was
        // damaged): a cache with leaves from them on is another log's; whatever the files hold before them
        // comes first.
        None if last.is_some_and(|l| l >= first) => Before::Reset,
        None if first > 1 && last.is_none_or(|l| l < first - 1) => Before::Read(first - 1),
        Some(a) if last.is_none_or(|l| l < a) => Before::Read(a),
        _ => Before::Nothing,
    }
}

/// Adds to `cache` the records fed up to `upto` (all when none). What the cache lacks before them is read from the
/// log files first, when `read` (the keeper's updates, at the lowest priority); without it (the follower, at the
/// writer's priority), such entries are left queued for the next update.
fn take_fed(
    cache: &mut Cache,
    log_dir: &Path,
    fed: &Mutex<Fed>,
    upto: Option<u64>,
    read: bool,
) -> Result<(), Error> {
    loop {
        let (after, entries) = {
            let mut fed = fed.lock().unwrap_or_else(|e| e.into_inner());
            if fed.dropped > 0 {
                debug!(
                    records = fed.dropped,
                    "the tree's queue was full: records are read back from the log files"
                );
                fed.dropped = 0;
            }
            let (Some(after), Some(first)) = (fed.after, fed.entries.front()) else {
                return Ok(());
            };
            if !read && before(cache, after, first.seq) != Before::Nothing {
                return Ok(());
            }
            let n = fed
                .entries
                .iter()
                .take(FLUSH_HASHES)
                .take_while(|e| upto.is_none_or(|u| e.seq <= u))
                .count();
            if n == 0 {
                return Ok(());
            }
            let entries: Vec<Entry> = fed.entries.drain(..n).collect();
            fed.after = Some(entries.last().map(|e| e.seq));
            (after, entries)
        };
        let first = entries[0].seq;
        match before(cache, after, first) {
            Before::Nothing => {}
            Before::Read(upto) => cache.catch_up(log_dir, Some(upto))?,
            Before::Reset => {
                cache.reset()?;
                if first > 1 {
                    cache.catch_up(log_dir, Some(first - 1))?;
                }
            }
        }
        for e in entries {
            if cache.last_seq().is_some_and(|l| e.seq <= l) {
                continue;
            }
            cache.append(e.seq, leaf(e.seq, &e.digest))?;
        }
        // Written out in large writes; what is held is read from memory meanwhile (and flushed by every update).
        if cache.tail.len() >= FLUSH_HASHES {
            cache.flush()?;
        }
    }
}

/// Why `cache` cannot be used: it does not give the signed tree (when it reaches its `seq`), or the root it gave
/// last.
fn check(cache: &Cache, signed: Option<&Signed>, last: Option<(u64, Hash)>) -> Option<String> {
    if let Some(s) = signed {
        // The cache was brought up to the checkpoint's seq: fewer leaves there are records missing from the log.
        return match cache.size_at(s.seq).and_then(|n| Ok((n, cache.root(n)?))) {
            Ok((n, root)) if n == s.size && root == s.root => None,
            Ok((n, _)) => Some(format!(
                "its tree at seq {} (size {n}) is not the one checkpoint {} signed (size {})",
                s.seq, s.name, s.size
            )),
            Err(e) => Some(e.to_string()),
        };
    }
    let (size, root) = last?;
    if cache.len() < size {
        return Some(format!(
            "it holds {} leaves, fewer than the {size} it had",
            cache.len()
        ));
    }
    match cache.root(size) {
        Ok(r) if r == root => None,
        Ok(_) => Some(format!(
            "its root at size {size} is not the one it gave before"
        )),
        Err(e) => Some(e.to_string()),
    }
}

impl HashReader for Cache {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|&i| {
                if let Some(p) = &self.prefix
                    && i < p.stored
                {
                    // Of the leaves before the base, only the frontier is known.
                    return p
                        .nodes
                        .iter()
                        .find(|(at, _)| *at == i)
                        .map(|&(_, h)| h)
                        .ok_or(tlog_tiles::Error::IndexesNotInTree);
                }
                if i >= self.on_disk {
                    return self
                        .tail
                        .get((i - self.on_disk) as usize)
                        .copied()
                        .ok_or(tlog_tiles::Error::IndexesNotInTree);
                }
                let mut b = [0u8; 32];
                self.hashes
                    .as_ref()
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)?
                    .read_exact_at(&mut b, i * 32)
                    .map_err(|_| tlog_tiles::Error::IndexesNotInTree)?;
                Ok(Hash(b))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use sha2::{Digest, Sha256};

    /// The leaf of a record line as README.md defines it, spelled out: SHA-256 of 0x00, the seq as 8 bytes
    /// big-endian and SHA-256 of the canonical bytes after `{"seq":<digits>` (the line without its hash field).
    fn readme_leaf(line: &[u8]) -> Vec<u8> {
        let text = std::str::from_utf8(line).unwrap();
        let after_seq = text.strip_prefix(r#"{"seq":"#).unwrap();
        let digits = after_seq.find(|c: char| !c.is_ascii_digit()).unwrap();
        let seq: u64 = after_seq[..digits].parse().unwrap();
        let hash_at = after_seq.rfind(r#","hash":""#).unwrap();
        let rest = format!("{}}}", &after_seq[digits..hash_at]);
        let mut h = Sha256::new();
        h.update([0]);
        h.update(seq.to_be_bytes());
        h.update(Sha256::digest(rest.as_bytes()));
        h.finalize().to_vec()
    }

    /// A sealed line of record `seq` (its hash field's value does not matter to the tree).
    fn sealed(seq: u64, fields: &str) -> Vec<u8> {
        format!(r#"{{"seq":{seq}{fields},"hash":"{}"}}"#, "ab".repeat(32)).into_bytes()
    }

    /// RFC 9162's MTH, spelled out (section 2.1.1), over the leaves of `lines`, to check the crate and the compact
    /// range against.
    fn mth(lines: &[&[u8]]) -> Hash {
        let leaves: Vec<Hash> = lines
            .iter()
            .map(|l| Hash(readme_leaf(l).try_into().unwrap()))
            .collect();
        mth_of(&leaves)
    }

    /// RFC 9162's MTH over leaf hashes.
    fn mth_of(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => Hash(Sha256::digest([]).into()),
            1 => leaves[0],
            n => {
                let k = 1 << (usize::BITS - 1 - (n - 1).leading_zeros());
                let (l, r) = (mth_of(&leaves[..k]), mth_of(&leaves[k..]));
                let mut h = Sha256::new();
                h.update([1]);
                h.update(l.0);
                h.update(r.0);
                Hash(h.finalize().into())
            }
        }
    }

    #[test]
    fn the_cache_and_the_compact_range_agree_with_the_definition() {
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<Vec<u8>> = (0..37)
            .map(|i| sealed(i + 1, &format!(r#","id":"r-{i}""#)))
            .collect();
        // The leaf from the line is the leaf from the seq and the chain's inner digest, and README's.
        for (i, line) in lines.iter().enumerate() {
            let (seq, digest) = crate::log::chain::inner(crate::log::chain::split(line).unwrap().0);
            assert_eq!(seq, i as u64 + 1);
            assert_eq!(leaf_hash(line), Some(leaf(seq, &digest)));
            assert_eq!(leaf_hash(line).unwrap().0.to_vec(), readme_leaf(line));
        }
        assert_eq!(leaf_hash(br#"{"seq":1,"id":"x"}"#), None, "no hash field");
        assert_eq!(leaf_hash(br#"{"id":"x","hash":"00"}"#), None, "no seq");
        let mut cache = Cache::open(dir.path(), true).unwrap();
        let mut compact = Compact::default();
        for (i, line) in lines.iter().enumerate() {
            cache
                .append(i as u64 + 1, leaf_hash(line).unwrap())
                .unwrap();
            compact.push(leaf_hash(line).unwrap());
            let refs: Vec<&[u8]> = lines[..=i].iter().map(|l| l.as_slice()).collect();
            assert_eq!(compact.root(), mth(&refs), "size {}", i + 1);
            if i % 5 == 0 {
                cache.flush().unwrap();
            }
        }
        cache.flush().unwrap();
        let again = Cache::open(dir.path(), false).unwrap();
        assert_eq!(again.len(), 37);
        for size in 0..=37u64 {
            let refs: Vec<&[u8]> = lines[..size as usize]
                .iter()
                .map(|l| l.as_slice())
                .collect();
            assert_eq!(again.root(size).unwrap(), mth(&refs), "size {size}");
            for index in 0..size {
                let proof = again.prove(size, index).unwrap();
                let leaf = leaf_hash(&lines[index as usize]).unwrap();
                tlog_tiles::check_record(&proof, size, mth(&refs), index, leaf).unwrap();
            }
        }
        assert_eq!(again.size_at(10).unwrap(), 10);
        assert_eq!(again.size_at(100).unwrap(), 37);
        assert_eq!(again.size_at(0).unwrap(), 0);
        assert_eq!(again.index_of(10).unwrap(), Some(9));
        assert_eq!(again.index_of(38).unwrap(), None);
        assert_eq!(again.last_seq(), Some(37));
        // The frontier at every size grows on to the trees after it.
        for size in 0..=37u64 {
            let frontier = again.frontier(size).unwrap();
            let mut grown = Compact::from_frontier(size, &frontier).unwrap();
            assert_eq!(grown.frontier(), frontier);
            for line in &lines[size as usize..] {
                grown.push(leaf_hash(line).unwrap());
            }
            assert_eq!(grown.root(), again.root(37).unwrap(), "from size {size}");
        }
        assert!(Compact::from_frontier(3, &[leaf(1, &[0; 32])]).is_none());
        // A crash that left the hashes behind the seqs: the cache keeps what both hold.
        let h = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(DIR).join("hashes"))
            .unwrap();
        h.set_len(h.metadata().unwrap().len() - 32).unwrap();
        let cut = Cache::open(dir.path(), true).unwrap();
        assert_eq!(cut.len(), 36);
    }

    /// The daemon's cache holds no list of its leaves: after an update, what it keeps in memory does not depend on
    /// how many leaves it has, and a leaf's seq is found on disk.
    #[test]
    fn the_cache_keeps_no_per_record_state_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path();
        let name = crate::log::files::file_name(std::time::UNIX_EPOCH, 1);
        let mut text = Vec::new();
        let n = 200_000u64;
        // Every third seq is missing (stream-only records leave gaps).
        let seqs: Vec<u64> = (1..).filter(|s| s % 3 != 0).take(n as usize).collect();
        for s in &seqs {
            text.extend_from_slice(&sealed(*s, r#","x":1"#));
            text.push(b'\n');
        }
        std::fs::write(log.join(&name), &text).unwrap();
        let mut cache = Cache::open(log, true).unwrap();
        cache.catch_up(log, None).unwrap();
        assert_eq!(cache.len(), n);
        assert_eq!(
            cache.held_bytes(),
            0,
            "after an update nothing stays in memory"
        );
        let again = Cache::open(log, true).unwrap();
        assert_eq!(again.held_bytes(), 0, "opening reads no list of leaves");
        assert_eq!(again.len(), n);
        assert_eq!(again.last_seq(), seqs.last().copied());
        for (i, &s) in seqs.iter().enumerate().step_by(997) {
            assert_eq!(again.index_of(s).unwrap(), Some(i as u64));
            assert_eq!(again.size_at(s).unwrap(), i as u64 + 1);
        }
        assert_eq!(again.index_of(3).unwrap(), None);
        assert_eq!(again.size_at(3).unwrap(), 2);
    }

    /// Writes `files` (each a first seq and its records' seqs) as log files of `dir`; every line is its record's
    /// leaf. A record whose seq is `deletion.0` is a deletion record of the daemon keeping the tree `deletion.1`.
    fn write_log(
        dir: &Path,
        files: &[(u64, Vec<u64>)],
        deletion: Option<(u64, u64, &At)>,
    ) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        for (i, (first, seqs)) in files.iter().enumerate() {
            let name = crate::log::files::file_name(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(3600 * i as u64),
                *first,
            );
            let mut text = Vec::new();
            for &seq in seqs {
                let line = match deletion {
                    Some((at, last_seq, t)) if at == seq => sealed(
                        seq,
                        &format!(
                            r#","type":"trail_log_file_deleted","source":{{"uid":0,"daemon":true}},"payload":{{"file":"f","last_seq":{last_seq},"tree_size":{},"tree_root":"{}","tree_frontier":[{}]}}"#,
                            t.size,
                            crate::log::chain::hex(&t.root.0),
                            t.frontier
                                .iter()
                                .map(|h| format!("\"{}\"", crate::log::chain::hex(&h.0)))
                                .collect::<Vec<_>>()
                                .join(",")
                        ),
                    ),
                    _ => sealed(seq, r#","type":"x","source":{"uid":1}"#),
                };
                text.extend_from_slice(&line);
                text.push(b'\n');
                lines.push(line);
            }
            std::fs::write(dir.join(name), text).unwrap();
        }
        lines
    }

    /// A cache lost after retention deleted the first file grows on from the tree its deletion record kept: the
    /// same roots, proofs of every record left and consistency proofs from every tree at least as large as the
    /// base, checked against the definition; on disk (the base persists), read only and in memory alike.
    #[test]
    fn a_cache_lost_after_retention_is_rebuilt_from_the_deletion_records_tree() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path();
        // seq 11 is stream-only (not in the log): the second file starts at 12.
        let first: Vec<u64> = (1..=10).collect();
        let mut base = Compact::default();
        for &s in &first {
            base.push(leaf_hash(&sealed(s, r#","type":"x","source":{"uid":1}"#)).unwrap());
        }
        let kept = At {
            size: base.size(),
            root: base.root(),
            frontier: base.frontier(),
        };
        let files = [
            (1, first),
            (12, (12..=20).collect::<Vec<_>>()),
            (21, (21..=33).collect()),
        ];
        let lines = write_log(log, &files, Some((25, 10, &kept)));
        let refs: Vec<&[u8]> = lines.iter().map(|l| l.as_slice()).collect();
        let n = lines.len() as u64;
        let mut full = Cache::open(log, true).unwrap();
        full.catch_up(log, None).unwrap();
        assert_eq!(full.root(n).unwrap(), mth(&refs));
        drop(full);
        std::fs::remove_dir_all(log.join(DIR)).unwrap();
        std::fs::remove_file(&crate::log::files::list(log).unwrap()[0].path).unwrap();
        let check = |c: &Cache| {
            assert_eq!(c.len(), n);
            assert_eq!(c.base(), Some((10, 10)));
            assert_eq!(c.last_seq(), Some(33));
            for size in 10..=n {
                let root = mth(&refs[..size as usize]);
                assert_eq!(c.root(size).unwrap(), root, "size {size}");
                for index in 10..size {
                    let proof = c.prove(size, index).unwrap();
                    tlog_tiles::check_record(
                        &proof,
                        size,
                        root,
                        index,
                        leaf_hash(refs[index as usize]).unwrap(),
                    )
                    .unwrap();
                }
                for old in 10..=size {
                    let proof = c.prove_consistency(size, old).unwrap();
                    tlog_tiles::check_tree(&proof, size, root, old, mth(&refs[..old as usize]))
                        .unwrap();
                }
            }
            // What the base does not hold is an error, never a made-up hash.
            assert!(c.prove(n, 3).is_err());
            assert!(c.prove_consistency(n, 6).is_err());
            assert!(matches!(c.size_at(5), Err(Error::Deleted { base: 10, .. })));
            assert_eq!(c.index_of(12).unwrap(), Some(10));
            assert_eq!(c.size_at(11).unwrap(), 10);
        };
        // In memory (a tool without the cache), then on disk, then the persisted base read again.
        let mut memory = Cache::open(log, false).unwrap();
        memory.catch_up(log, None).unwrap();
        check(&memory);
        let mut disk = Cache::open(log, true).unwrap();
        disk.catch_up(log, None).unwrap();
        check(&disk);
        drop(disk);
        check(&Cache::open(log, false).unwrap());
        let mut again = Cache::open(log, true).unwrap();
        again.catch_up(log, None).unwrap();
        check(&again);
        // Without the deletion record's tree, nothing can be rebuilt.
        let bare = tempfile::tempdir().unwrap();
        write_log(bare.path(), &files[1..], None);
        let mut none = Cache::open(bare.path(), false).unwrap();
        assert!(matches!(
            none.catch_up(bare.path(), None),
            Err(Error::Gone { .. })
        ));
    }

    /// The keeper never trusts the cache: one whose hashes were damaged, or whose base was, gives the signed root
    /// again after it is built again from the log files.
    #[test]
    fn the_keeper_rebuilds_a_damaged_cache() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path();
        let lines = write_log(log, &[(1, (1..=40).collect())], None);
        let refs: Vec<&[u8]> = lines.iter().map(|l| l.as_slice()).collect();
        let root = mth(&refs);
        let signed = || Signed {
            name: "checkpoint".into(),
            seq: 40,
            size: 40,
            root,
        };
        assert_eq!(
            Keeper::new(log, Some(signed())).root_at(Some(40)).unwrap(),
            (40, root)
        );
        let hashes = log.join(DIR).join("hashes");
        let len = std::fs::metadata(&hashes).unwrap().len();
        std::fs::write(&hashes, vec![0xab; len as usize]).unwrap();
        assert_ne!(Cache::open(log, false).unwrap().root(40).unwrap(), root);
        let keeper = Keeper::new(log, Some(signed()));
        assert_eq!(keeper.root_at(Some(40)).unwrap(), (40, root));
        assert_eq!(keeper.at(20).unwrap().root, mth(&refs[..20]));
        // Damaged while in use: the root it gave last is checked before the next use.
        std::fs::write(&hashes, vec![0xcd; len as usize]).unwrap();
        assert_eq!(keeper.root_at(None).unwrap(), (40, root));
        std::fs::write(log.join(DIR).join(BASE), b"{not json").unwrap();
        assert_eq!(
            Keeper::new(log, Some(signed())).root_at(None).unwrap(),
            (40, root)
        );
        // A base too large to be a log's is unreadable too, and an unreadable base a read-only cache ignores.
        let huge = format!(
            r#"{{"size":{},"last_seq":1,"frontier":["{}"]}}"#,
            1u64 << 60,
            "00".repeat(32)
        );
        std::fs::write(log.join(DIR).join(BASE), huge).unwrap();
        assert!(Cache::open(log, false).unwrap().is_empty());
        assert_eq!(
            Keeper::new(log, Some(signed())).root_at(None).unwrap(),
            (40, root)
        );
        assert_eq!(
            Keeper::new(log, Some(signed())).root_at(None).unwrap(),
            (40, root)
        );
    }

    /// Entries as the writer would feed them, but with digests that are not the files' (a tree that takes them
    /// differs from the files').
    fn fed(seqs: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
        seqs.map(|seq| Entry {
            seq,
            digest: [seq as u8; 32],
        })
        .collect()
    }

    /// The leaf of [`fed`]'s entry `seq`.
    fn fed_leaf(seq: u64) -> Hash {
        leaf(seq, &[seq as u8; 32])
    }

    /// What the writer feeds is what the tree takes (fed entries that differ from the files give their own root);
    /// what the full queue dropped, and what came before entries fed after a gap, is read from the log files.
    #[test]
    fn records_fed_by_the_writer_go_into_the_tree_and_the_rest_comes_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path();
        let lines = write_log(log, &[(1, (1..=100).collect())], None);
        let from_files: Vec<Hash> = lines.iter().map(|l| leaf_hash(l).unwrap()).collect();
        let keeper = Keeper::new(log, None);
        // Nothing fed: the files.
        assert_eq!(
            keeper.root_at(Some(40)).unwrap(),
            (40, mth_of(&from_files[..40]))
        );
        keeper.feed(Some(40), &fed(41..=60));
        keeper.feed(Some(60), &fed(61..=70));
        let mut expected: Vec<Hash> = from_files[..40].to_vec();
        expected.extend((41..=70).map(fed_leaf));
        assert_eq!(keeper.root_at(Some(70)).unwrap(), (70, mth_of(&expected)));
        // Fed after a gap (81..=90 never fed): the cache reads 71..=80 from the files first.
        keeper.feed(Some(80), &fed(81..=90));
        expected.extend_from_slice(&from_files[70..80]);
        expected.extend((81..=90).map(fed_leaf));
        assert_eq!(keeper.root_at(Some(90)).unwrap(), (90, mth_of(&expected)));
        // Only what is asked for is taken; the follower's thread takes the rest.
        keeper.feed(Some(90), &fed(91..=95));
        assert_eq!(keeper.at(92).unwrap().size, 92);
        let weak = std::sync::Arc::downgrade(&std::sync::Arc::new(Keeper::new(log, None)));
        Keeper::follow(weak); // a dropped keeper: returns at once
        // A full queue drops what it holds and what it cannot take (93..=95 not taken yet, and the rest): those
        // records come from the files.
        let many: Vec<Entry> = (96..96 + FED_MAX as u64)
            .map(|seq| Entry {
                seq,
                digest: [1; 32],
            })
            .collect();
        keeper.feed(Some(95), &many);
        expected.extend((91..=92).map(fed_leaf));
        expected.extend_from_slice(&from_files[92..]);
        assert_eq!(keeper.root_at(Some(100)).unwrap(), (100, mth_of(&expected)));
        assert!(keeper.fed.lock().unwrap().entries.is_empty());
    }

    /// Entries fed with no known predecessor (the last record's hash was damaged at start) follow the cache's
    /// leaves, after what the files hold before them: the tree still starts at the log's first record.
    #[test]
    fn entries_fed_after_no_known_record_follow_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path();
        let lines = write_log(log, &[(1, (1..=30).collect())], None);
        let from_files: Vec<Hash> = lines.iter().map(|l| leaf_hash(l).unwrap()).collect();
        // An empty cache: the first record fed comes after the files' records, not at the tree's start.
        let fresh = Keeper::new(log, None);
        fresh.feed(None, &fed(31..=31));
        let mut upto31 = from_files.clone();
        upto31.push(fed_leaf(31));
        assert_eq!(fresh.root_at(Some(31)).unwrap(), (31, mth_of(&upto31)));
        drop(fresh);
        std::fs::remove_dir_all(log.join(DIR)).unwrap();
        let keeper = Keeper::new(log, None);
        assert_eq!(
            keeper.root_at(Some(20)).unwrap(),
            (20, mth_of(&from_files[..20]))
        );
        // Records 21..=30 are in the files; 31 and 32 are fed with no predecessor known.
        keeper.feed(None, &fed(31..=32));
        let mut expected = from_files.clone();
        expected.extend((31..=32).map(fed_leaf));
        assert_eq!(keeper.root_at(Some(32)).unwrap(), (32, mth_of(&expected)));
    }

    /// The follower thread adds what is fed as it comes, without an update of the keeper; entries after records
    /// the cache lacks it leaves queued (reading the files is the updates' work, at the lowest priority), and the
    /// next update reads those records and takes them.
    #[test]
    fn the_follower_adds_what_is_fed_and_leaves_reading_the_files_to_updates() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path();
        let lines = write_log(log, &[(1, (1..=50).collect())], None);
        let from_files: Vec<Hash> = lines.iter().map(|l| leaf_hash(l).unwrap()).collect();
        let keeper = std::sync::Arc::new(Keeper::new(log, None));
        keeper.root_at(Some(20)).unwrap();
        let weak = std::sync::Arc::downgrade(&keeper);
        let follower = std::thread::spawn(move || Keeper::follow(weak));
        let queued = || keeper.fed.lock().unwrap().entries.len();
        keeper.feed(Some(20), &fed(21..=30));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while queued() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(queued(), 0, "the follower took nothing");
        let held = keeper.lock().cache.as_ref().and_then(Cache::last_seq);
        assert_eq!(held, Some(30), "taken without an update");
        // After records only the files hold (31..=40): left for the next update.
        keeper.feed(Some(40), &fed(41..=45));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(queued(), 5, "the follower read the log files");
        let mut expected = from_files[..20].to_vec();
        expected.extend((21..=30).map(fed_leaf));
        expected.extend_from_slice(&from_files[30..40]);
        expected.extend((41..=45).map(fed_leaf));
        assert_eq!(keeper.root_at(Some(45)).unwrap(), (45, mth_of(&expected)));
        // The thread ends with the keeper.
        drop(keeper);
        follower.join().unwrap();
    }
}
