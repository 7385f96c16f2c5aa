//! The Merkle tree over the log (RFC 6962 / RFC 9162 hashing), and its cache beside the log.
//!
//! Definition (also in README.md, "The log"): the tree's leaves are the log's records in `seq` order, from the
//! first record of the log; leaf `i` is the `i`-th record's line without its newline, byte for byte as stored, so a
//! third party computes a leaf from the record line alone:
//!
//! ```text
//! leaf_hash(line) = SHA-256(0x00 || line)          node_hash(l, r) = SHA-256(0x01 || l || r)
//! ```
//!
//! and the tree of `n` leaves is RFC 9162's (section 2.1.1). Every checkpoint carries the tree's size and root at its
//! `seq`. Hashing, proofs and the stored-hash layout are `tlog_tiles`' (the port of Go's `sumdb/tlog`).
//!
//! The cache (`log.dir/tree/`: `hashes`, every stored hash in `tlog` order, 32 bytes each; `seqs`, the `seq` of
//! every leaf, 8 bytes big-endian) makes roots and proofs fast; both stay on disk and are read as needed, so the
//! daemon's memory does not grow with the log. It is rebuildable from the log files (while they are all present)
//! and never evidence: a proof is checked against a signed root, and `trail prove` checks each leaf it uses against
//! the record line it reads from the log. When retention deletes a file, its deletion record keeps the tree at the
//! file's last record ([`at`]: size, root, frontier), from which `trail verify` grows the tree of what remains.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use tlog_tiles::Hash;
use tlog_tiles::{HashReader, stored_hash_count};

use super::files::{self, Chunk, Chunks};

/// The cache's directory inside the log directory.
pub const DIR: &str = "tree";

/// The hash of leaf `line` (a record's line without its newline).
pub fn leaf_hash(line: &[u8]) -> Hash {
    tlog_tiles::record_hash(line)
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
        let mut node = (leaf, 0);
        while let Some(&(left, h)) = self.stack.last() {
            if h != node.1 {
                break;
            }
            self.stack.pop();
            node = (tlog_tiles::node_hash(left, node.0), h + 1);
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
    /// A proof could not be computed.
    #[error("{0}")]
    Proof(String),
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

/// The tree at record `seq` of the log in `log_dir`, read from its cache: `None` when the cache holds nothing (no
/// checkpoint has computed a tree), [`Error::Behind`] when it does not reach `seq` yet.
pub fn at(log_dir: &Path, seq: u64) -> Result<Option<At>, Error> {
    let cache = Cache::open(log_dir, false)?;
    let Some(last) = cache.last_seq() else {
        return Ok(None);
    };
    if last < seq {
        return Err(Error::Behind {
            seq,
            last,
            dir: cache.dir,
        });
    }
    let size = cache.size_at(seq)?;
    let frontier = cache.frontier(size)?;
    let root = Compact::from_frontier(size, &frontier)
        .expect("one hash per one in size")
        .root();
    Ok(Some(At {
        size,
        root,
        frontier,
    }))
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
    /// left inconsistent; without, reads what is there (an unreadable or missing cache is an empty one, kept in
    /// memory only).
    pub fn open(log_dir: &Path, write: bool) -> Result<Cache, Error> {
        let dir = log_dir.join(DIR);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        let (hashes_path, seqs_path) = (dir.join("hashes"), dir.join("seqs"));
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
            if write {
                h.set_len(stored_hash_count(n) * 32)
                    .map_err(io(&hashes_path))?;
                s.set_len(n * 8).map_err(io(&seqs_path))?;
            }
        }
        let mut cache = Cache {
            dir,
            n,
            on_disk: stored_hash_count(n),
            seqs_on_disk: n,
            seq_tail: Vec::new(),
            last: None,
            hashes: hashes.filter(|_| write || n > 0),
            seqs,
            write,
            tail: Vec::new(),
            resume: None,
        };
        if n > 0 {
            cache.last = Some(cache.seq_at(n - 1)?);
        }
        Ok(cache)
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

    /// Adds the leaf `line` (record `seq`).
    pub fn append(&mut self, seq: u64, line: &[u8]) -> Result<(), Error> {
        let hashes = tlog_tiles::stored_hashes(self.n, line, &*self).map_err(|e| self.proof(e))?;
        self.tail.extend(hashes);
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
        if upto.is_some_and(|u| self.last_seq().is_some_and(|l| l >= u)) {
            return Ok(());
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        let logs = files::list(log_dir).map_err(io(log_dir))?;
        let after = self.last_seq();
        let next = after.map_or(1, |s| s + 1);
        // The tree starts at the log's first record: without it (and without the cache) there is no tree.
        if logs.first().is_some_and(|f| f.first_seq > next) {
            return Err(Error::Gone {
                after: after.unwrap_or(0),
                dir: self.dir.clone(),
            });
        }
        // The file to start in: where the last call stopped, else the last whose first seq is at most `next`.
        let start = match &self.resume {
            Some((name, _)) if logs.iter().any(|f| &f.name == name) => name.clone(),
            _ => {
                let Some(f) = logs.iter().rev().find(|f| f.first_seq <= next) else {
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
                    self.append(seq, line)?;
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

impl HashReader for Cache {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|&i| {
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

    /// RFC 9162's MTH, spelled out (section 2.1.1), to check the crate and the compact range against.
    fn mth(leaves: &[&[u8]]) -> Hash {
        use sha2::{Digest, Sha256};
        match leaves.len() {
            0 => Hash(Sha256::digest([]).into()),
            1 => {
                let mut h = Sha256::new();
                h.update([0]);
                h.update(leaves[0]);
                Hash(h.finalize().into())
            }
            n => {
                let k = 1 << (usize::BITS - 1 - (n - 1).leading_zeros());
                let (l, r) = (mth(&leaves[..k]), mth(&leaves[k..]));
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
            .map(|i| format!("{{\"seq\":{}}}", i + 1).into_bytes())
            .collect();
        let mut cache = Cache::open(dir.path(), true).unwrap();
        let mut compact = Compact::default();
        for (i, line) in lines.iter().enumerate() {
            cache.append(i as u64 + 1, line).unwrap();
            compact.push(leaf_hash(line));
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
                let leaf = leaf_hash(&lines[index as usize]);
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
                grown.push(leaf_hash(line));
            }
            assert_eq!(grown.root(), again.root(37).unwrap(), "from size {size}");
        }
        assert!(Compact::from_frontier(3, &[leaf_hash(b"x")]).is_none());
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
            text.extend_from_slice(format!("{{\"seq\":{s},\"x\":1}}\n").as_bytes());
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
}
