//! `trail prove` and `trail verify-proof`: a proof that one record is in the signed log, or that a later
//! checkpoint extends an earlier one, checked without the log.
//!
//! A bundle is one JSON object: `kind` (`inclusion` or `consistency`), the checkpoints it rests on (their JSON
//! lines and C2SP notes, as written), and the proof's hashes (base64, RFC 9162 order). An inclusion bundle also
//! holds the record's line, its `seq` and its leaf index. Proofs come from the tree cache ([`crate::log::tree`]),
//! brought up to date from the log files; the cache is trusted for nothing: the tree's root at the checkpoint's size
//! must be the signed one, the leaf must be the hash of the record line read from the log, and the proof must hold
//! against the signed root; otherwise (or when the cache is missing) the tree is built again from the log files,
//! growing on from the last deletion record's tree when retention deleted the first ones.

use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::log::checkpoint::{self, Checkpoint};
use crate::log::files::{self, Chunk, Chunks};
use crate::log::tree::{self, Cache, Hash};

/// A checkpoint as it travels in a bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// The checkpoint's JSON line.
    pub checkpoint: String,
    /// Its C2SP `tlog-checkpoint` note.
    pub note: String,
}

/// A proof.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Bundle {
    /// Record `seq` is leaf `index` of the tree the checkpoint signs.
    Inclusion {
        /// The record's seq.
        seq: u64,
        /// Its leaf index.
        index: u64,
        /// The tree size of the checkpoint.
        tree_size: u64,
        /// The record's line, without its newline.
        line: String,
        /// The inclusion proof, base64 hashes.
        proof: Vec<String>,
        /// The checkpoint.
        checkpoint: Sealed,
    },
    /// The tree of `new` extends the tree of `old`.
    Consistency {
        /// The earlier tree size.
        old_size: u64,
        /// The later tree size.
        new_size: u64,
        /// The consistency proof, base64 hashes.
        proof: Vec<String>,
        /// The earlier checkpoint.
        old: Sealed,
        /// The later checkpoint.
        new: Sealed,
    },
}

/// Reads a checkpoint file and the note beside it.
fn sealed(path: &Path) -> Result<(Sealed, Checkpoint), String> {
    let line = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cp = Checkpoint::parse(&line).map_err(|e| format!("{}: {e}", path.display()))?;
    let note_path = path.with_extension("note");
    let note = std::fs::read_to_string(&note_path).map_err(|e| {
        format!(
            "{}: {e} (checkpoints without a tree have no note)",
            note_path.display()
        )
    })?;
    let text = String::from_utf8(line).map_err(|_| "the checkpoint is not UTF-8".to_owned())?;
    Ok((
        Sealed {
            checkpoint: text.trim_end().to_owned(),
            note,
        },
        cp,
    ))
}

/// Answers `answer` from a tree of the log in `log_dir` brought up to `seq` whose root at `size` is the signed
/// `root`: the log's own cache when it gives that root and an answer that `holds`, else a tree built again from the
/// log files into a temporary cache (on disk, so that memory does not grow with the log), from the first record or,
/// when retention deleted the first files, from the tree the last deletion record kept.
fn with_tree<T>(
    log_dir: &Path,
    seq: u64,
    size: u64,
    root: &Hash,
    answer: impl Fn(&Cache) -> Result<T, String>,
    holds: impl Fn(&T) -> bool,
) -> Result<T, String> {
    let signed = |c: &Cache| c.root(size).is_ok_and(|r| r == *root);
    // The log's cache, read only (the daemon keeps it), when it holds anything.
    if let Ok(mut c) = Cache::open(log_dir, false)
        && !c.is_empty()
        && c.catch_up(log_dir, Some(seq)).is_ok()
        && signed(&c)
        && let Ok(a) = answer(&c)
        && holds(&a)
    {
        return Ok(a);
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut c = Cache::open(dir.path(), true).map_err(|e| e.to_string())?;
    c.catch_up(log_dir, Some(seq)).map_err(|e| e.to_string())?;
    if !signed(&c) {
        return Err(format!(
            "the log's records up to seq {seq} do not give the tree the checkpoint signs: the log was changed (run trail verify)"
        ));
    }
    let a = answer(&c)?;
    if !holds(&a) {
        return Err(format!(
            "the proof computed from the log's records up to seq {seq} does not hold against the signed root"
        ));
    }
    Ok(a)
}

/// The line of record `seq`, read from the log file that holds it.
fn find_line(log_dir: &Path, seq: u64) -> Result<Vec<u8>, String> {
    let logs = files::list(log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
    let file = logs
        .iter()
        .rev()
        .find(|f| f.first_seq <= seq)
        .ok_or_else(|| format!("no log file holds seq {seq}"))?;
    let prefix = format!("{{\"seq\":{seq},");
    let reader = file
        .open()
        .map_err(|e| format!("{}: {e}", file.path.display()))?;
    let mut chunks = Chunks::new(reader, 4 << 20);
    let finder = memchr::memmem::Finder::new(prefix.as_bytes());
    while let Some(Chunk::Lines(_, lines)) = chunks
        .next_chunk()
        .map_err(|e| format!("{}: {e}", file.path.display()))?
    {
        for at in finder.find_iter(lines) {
            if at == 0 || lines[at - 1] == b'\n' {
                let end = memchr::memchr(b'\n', &lines[at..]).map_or(lines.len(), |e| at + e);
                return Ok(lines[at..end].to_vec());
            }
        }
    }
    Err(format!("seq {seq} is not in {}", file.path.display()))
}

fn encode(proof: &[Hash]) -> Vec<String> {
    proof.iter().map(|h| h.to_string()).collect()
}

fn decode(proof: &[String]) -> Result<Vec<Hash>, String> {
    proof
        .iter()
        .map(|h| Hash::parse_hash(h).map_err(|_| format!("{h:?} is not a base64 hash")))
        .collect()
}

/// A checkpoint's `tree_root` (hex) as a hash.
fn signed_root(path: &Path, hex: &str) -> Result<Hash, String> {
    crate::log::chain::parse_hex(hex.as_bytes())
        .map(Hash)
        .ok_or_else(|| format!("{}: tree_root is not 64 hex digits", path.display()))
}

/// The newest checkpoint of `log_dir` (by seq) that covers `seq` and has a note.
fn newest_covering(log_dir: &Path, seq: u64) -> Result<PathBuf, String> {
    checkpoint::list(log_dir)
        .into_iter()
        .filter_map(|p| {
            let cp = Checkpoint::parse(&std::fs::read(&p).ok()?).ok()?;
            let s = cp.body.seq?;
            (s >= seq && cp.body.tree_size.is_some() && p.with_extension("note").exists())
                .then_some((s, p))
        })
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| format!("no checkpoint with a Merkle tree covers seq {seq} yet"))
}

/// Proves that record `seq` is in the tree of `checkpoint` (default: the newest that covers it).
pub fn prove(log_dir: &Path, seq: u64, checkpoint: Option<&Path>) -> Result<Bundle, String> {
    let path = match checkpoint {
        Some(p) => p.to_owned(),
        None => newest_covering(log_dir, seq)?,
    };
    let (sealed, cp) = sealed(&path)?;
    let (Some(cp_seq), Some(size), Some(root)) =
        (cp.body.seq, cp.body.tree_size, cp.body.tree_root.as_deref())
    else {
        return Err(format!(
            "{}: the checkpoint has no Merkle tree",
            path.display()
        ));
    };
    if seq > cp_seq {
        return Err(format!(
            "{} covers the log up to seq {cp_seq}, not seq {seq}",
            path.display()
        ));
    }
    let root = signed_root(&path, root)?;
    let line = find_line(log_dir, seq)?;
    let leaf = tree::leaf_hash(&line)
        .ok_or_else(|| format!("the line of seq {seq} is not a sealed record (no hash field)"))?;
    let (index, proof) = with_tree(
        log_dir,
        cp_seq,
        size,
        &root,
        |cache| {
            let index = cache
                .index_of(seq)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("seq {seq} is not a record of the log"))?;
            if cache.leaf(index).map_err(|e| e.to_string())? != leaf {
                return Err(format!(
                    "the record seq {seq} in the log is not the leaf the tree holds: the log was changed (run trail verify)"
                ));
            }
            Ok((index, cache.prove(size, index).map_err(|e| e.to_string())?))
        },
        |(index, proof)| tlog_tiles::check_record(proof, size, root, *index, leaf).is_ok(),
    )?;
    Ok(Bundle::Inclusion {
        seq,
        index,
        tree_size: size,
        line: String::from_utf8(line).map_err(|_| "the record is not UTF-8".to_owned())?,
        proof: encode(&proof),
        checkpoint: sealed,
    })
}

/// Proves that the tree of checkpoint `new` extends the tree of checkpoint `old`.
pub fn prove_consistency(log_dir: &Path, old: &Path, new: &Path) -> Result<Bundle, String> {
    let (old_sealed, old_cp) = sealed(old)?;
    let (new_sealed, new_cp) = sealed(new)?;
    let sizes =
        |cp: &Checkpoint, p: &Path| match (cp.body.seq, cp.body.tree_size, &cp.body.tree_root) {
            (Some(s), Some(n), Some(r)) => Ok((s, n, r.clone())),
            _ => Err(format!(
                "{}: the checkpoint has no Merkle tree",
                p.display()
            )),
        };
    let (_, old_size, old_root) = sizes(&old_cp, old)?;
    let (new_seq, new_size, new_root) = sizes(&new_cp, new)?;
    if old_size > new_size {
        return Err("the old checkpoint's tree is larger than the new one's".into());
    }
    let (old_root, new_root) = (signed_root(old, &old_root)?, signed_root(new, &new_root)?);
    let proof = with_tree(
        log_dir,
        new_seq,
        new_size,
        &new_root,
        |cache| {
            // Of the records retention deleted, the tree keeps only the frontier at the last of them.
            if let Some((base, last_seq)) = cache.base()
                && old_size < base
            {
                return Err(format!(
                    "{}: its tree ({old_size} records) ends in log files retention deleted (the tree of the records \
                     left grows on from {base} records, up to seq {last_seq}): prove from a checkpoint after seq {last_seq}",
                    old.display()
                ));
            }
            cache
                .prove_consistency(new_size, old_size)
                .map_err(|e| e.to_string())
        },
        |proof| tlog_tiles::check_tree(proof, new_size, new_root, old_size, old_root).is_ok(),
    )?;
    Ok(Bundle::Consistency {
        old_size,
        new_size,
        proof: encode(&proof),
        old: old_sealed,
        new: new_sealed,
    })
}

/// Checks a sealed checkpoint against `key`: both signatures, and that the JSON and the note agree.
fn open(sealed: &Sealed, key: &VerifyingKey) -> Result<(Checkpoint, checkpoint::NoteBody), String> {
    let note = checkpoint::open_note(sealed.note.as_bytes(), key)?;
    let cp = Checkpoint::parse(sealed.checkpoint.as_bytes())?;
    cp.check_signature(Some(key))
        .map_err(|e| format!("checkpoint {e}"))?;
    if cp.body.tree_size != Some(note.size)
        || cp.body.tree_root.as_deref() != Some(crate::log::chain::hex(&note.root.0).as_str())
    {
        return Err("the checkpoint and its note sign different trees".into());
    }
    Ok((cp, note))
}

/// Checks a bundle against the daemon's public key; says what it proves.
pub fn verify_proof(bundle: &Bundle, key: &VerifyingKey) -> Result<String, String> {
    match bundle {
        Bundle::Inclusion {
            seq,
            index,
            tree_size,
            line,
            proof,
            checkpoint: sealed,
        } => {
            let (cp, note) = open(sealed, key)?;
            if *tree_size != note.size {
                return Err(format!(
                    "the bundle says tree size {tree_size}, the checkpoint signs {}",
                    note.size
                ));
            }
            if crate::record::line::seq(line.as_bytes()) != Some(*seq) {
                return Err(format!("the record line is not seq {seq}"));
            }
            let leaf = tree::leaf_hash(line.as_bytes())
                .ok_or("the record line is not a sealed record (no hash field)")?;
            if cp.body.seq.is_none_or(|s| *seq > s) {
                return Err(format!("the checkpoint does not cover seq {seq}"));
            }
            tlog_tiles::check_record(&decode(proof)?, note.size, note.root, *index, leaf)
                .map_err(|e| format!("the inclusion proof does not hold: {e}"))?;
            Ok(format!(
                "record seq {seq} is leaf {index} of the tree of {} records signed by {} (checkpoint {})",
                note.size,
                note.origin,
                checkpoint::file_name(&cp.body)
            ))
        }
        Bundle::Consistency {
            old_size,
            new_size,
            proof,
            old,
            new,
        } => {
            let (_, old_note) = open(old, key)?;
            let (_, new_note) = open(new, key)?;
            if (*old_size, *new_size) != (old_note.size, new_note.size) {
                return Err("the bundle's sizes are not the checkpoints'".into());
            }
            tlog_tiles::check_tree(
                &decode(proof)?,
                new_note.size,
                new_note.root,
                old_note.size,
                old_note.root,
            )
            .map_err(|e| format!("the consistency proof does not hold: {e}"))?;
            Ok(format!(
                "the tree of {} records extends the tree of {} records (both signed by {})",
                new_note.size, old_note.size, new_note.origin
            ))
        }
    }
}
