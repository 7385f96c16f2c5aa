//! `trail verify`: checks a copy of the log offline and says exactly what is wrong and where.
//!
//! Owns the rules of verification. Every record must end in a hash field that links it to the record before
//! it ([`crate::log::chain`]); `seq` must increase; every checkpoint must carry a valid signature and agree with the
//! records and files it names; files may be missing only at the start of the log (removed by retention), and
//! then the first record left must be vouched for by a deletion record in the chain or by a checkpoint.
//!
//! Only records the daemon wrote itself are honoured as deletion records: a record of one of the daemon's own
//! types (`trail_*`) counts only when its top-level `source` carries `"daemon":true`, which the daemon puts only
//! into its own records (a client's `source` comes from its peer credentials alone, and clients are refused the
//! daemon's types). Such a record without the marker is reported as a problem and ignored.
//!
//! Each record is checked against the hash stored in the line before it, so one damaged record is reported once
//! and the records after it are still checked. A broken link is classified by looking at `seq` and the lines
//! around it: a modified record, a modified hash field, missing (deleted) records, reordered or inserted records.
//! Stream-only event types leave legitimate gaps in `seq`, so a gap alone is not a problem; a gap with a broken
//! link is.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::Deserialize;

use crate::log::chain::{self, Hash};
use crate::log::checkpoint::{self, Checkpoint};
use crate::log::deletion::Deletion;
use crate::log::files::{self, Chunk, Chunks, LogFile};

/// One thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (log file or checkpoint) it is in.
    pub file: String,
    /// 1-based line in that file, when it is about one line.
    pub line: Option<u64>,
    /// The record's `seq`, when known.
    pub seq: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(s) = self.seq {
            write!(f, ": seq {s}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What verification found.
#[derive(Debug, Default)]
pub struct Report {
    /// Everything wrong, in the order found.
    pub problems: Vec<Problem>,
    /// Notes that are not problems (e.g. no key given).
    pub notes: Vec<String>,
    /// Log files read.
    pub files: usize,
    /// Records read.
    pub records: u64,
    /// Bytes of records read (uncompressed).
    pub bytes: u64,
    /// First and last `seq` seen.
    pub seqs: Option<(u64, u64)>,
    /// Checkpoints read.
    pub checkpoints: usize,
    /// The highest `seq` a checkpoint with a good signature vouches for: every record up to it is signed.
    pub covered: Option<u64>,
    /// Of `checkpoints`, those kept elsewhere (`--checkpoints`).
    pub outside: usize,
    /// Records after `covered` (all of them when no checkpoint is good): the unsigned tail, which nothing but the
    /// chain protects.
    pub unsigned: u64,
}

impl Report {
    /// True when nothing is wrong.
    pub fn intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What to verify: log files and checkpoint files.
#[derive(Debug, Default)]
pub struct Inputs {
    /// Log files, in any order.
    pub logs: Vec<LogFile>,
    /// Checkpoint files.
    pub checkpoints: Vec<PathBuf>,
    /// Checkpoints kept elsewhere (`--checkpoints`): where each came from, and its line.
    pub outside: Vec<(String, Vec<u8>)>,
}

impl Inputs {
    /// Adds checkpoints kept elsewhere: a directory of checkpoint files (or a log directory, whose
    /// `checkpoints/` is read), or a JSON-lines file whose lines are checkpoint lines or `trail_checkpoint`
    /// records (as sinks deliver them; the checkpoint is the `line` of the payload, or of the object itself).
    pub fn add_outside(&mut self, path: &Path) -> Result<(), String> {
        let shown = path.display();
        if path.is_dir() {
            let mut names = checkpoint::list(path);
            let loose = std::fs::read_dir(path).map_err(|e| format!("{shown}: {e}"))?;
            names.extend(loose.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| {
                p.is_file()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("checkpoint-") && n.ends_with(".json"))
            }));
            names.sort();
            for p in names {
                let line = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                self.outside.push((p.display().to_string(), line));
            }
            return Ok(());
        }
        let text = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let at = format!("{shown}:{}", i + 1);
            let value: serde_json::Value =
                serde_json::from_slice(line).map_err(|e| format!("{at}: not JSON ({e})"))?;
            let inner = value
                .pointer("/payload/line")
                .or_else(|| value.get("line"))
                .and_then(|l| l.as_str());
            let line = match inner {
                Some(l) => l.as_bytes().to_vec(),
                None if value.get("checkpoint").is_some() => line.to_vec(),
                None => {
                    return Err(format!(
                        "{at}: neither a checkpoint line nor a trail_checkpoint record (no payload.line)"
                    ));
                }
            };
            self.outside.push((at, line));
        }
        Ok(())
    }

    /// Collects inputs from directories (a log directory and its `checkpoints/`) and files.
    pub fn gather(paths: &[PathBuf]) -> Result<Inputs, String> {
        let mut inputs = Inputs::default();
        for path in paths {
            if path.is_dir() {
                let logs = files::list(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let checkpoints = checkpoint::list(path);
                let own = checkpoint::list(&path.join(".."))
                    .into_iter()
                    .filter(|_| path.file_name().is_some_and(|n| n == checkpoint::DIR));
                inputs.logs.extend(logs);
                inputs.checkpoints.extend(checkpoints);
                inputs.checkpoints.extend(own);
            } else if let Some(f) = LogFile::parse(path) {
                inputs.logs.push(f);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("checkpoint-"))
            {
                inputs.checkpoints.push(path.clone());
            } else if !path.exists() {
                return Err(format!("{}: no such file or directory", path.display()));
            } else {
                return Err(format!(
                    "{}: not a log file (trail-*.jsonl[.zst]), checkpoint (checkpoint-*.json) or directory",
                    path.display()
                ));
            }
        }
        inputs
            .logs
            .sort_by(|a, b| a.name.cmp(&b.name).then(a.compressed.cmp(&b.compressed)));
        inputs
            .logs
            .dedup_by(|later, earlier| later.name == earlier.name);
        inputs
            .checkpoints
            .sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        inputs.checkpoints.dedup();
        Ok(inputs)
    }
}

/// What verify reads of a record that may be one of the daemon's own.
#[derive(Deserialize)]
struct OwnRecord {
    #[serde(rename = "type")]
    kind: String,
    source: OwnSource,
    #[serde(default)]
    payload: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OwnSource {
    #[serde(default)]
    uid: Option<u64>,
    /// Set only in the records the daemon wrote itself.
    #[serde(default)]
    daemon: bool,
}

/// A claim a checkpoint makes about one record.
struct Claim {
    hash: String,
    by: String,
    seen: bool,
}

/// The line before the one being checked.
struct Prev {
    seq: u64,
    /// The hash its line stores.
    stored: Hash,
    /// The hash its content and predecessor give, when it differs from `stored`.
    computed: Option<Hash>,
    /// Index of the problem reported for it, if any.
    problem: Option<usize>,
    /// It was reported as out of order: what follows may be disturbed.
    reordered: bool,
    /// A record with its `seq` came before (reported as such).
    repeated: bool,
}

/// The first record of the log as given, checked against its predecessor once that is known.
struct First {
    file: String,
    seq: u64,
    body: Vec<u8>,
    hash: Hash,
}

/// A broken link waiting for the next line's `seq` to be classified.
struct Pending {
    problem: usize,
    seq: u64,
    prev_seq: u64,
    /// A record with this `seq` came before.
    repeated: bool,
}

/// Every `seq` seen: runs of consecutive values (a log's seqs increase, with gaps only for stream-only records),
/// and the few that came out of order.
#[derive(Default)]
struct Seen {
    runs: Vec<(u64, u64)>,
    others: HashSet<u64>,
}

impl Seen {
    /// Adds `seq`; false when it was seen before.
    fn insert(&mut self, seq: u64) -> bool {
        match self.runs.last_mut() {
            Some((_, end)) if seq == *end + 1 => {
                *end = seq;
                return true;
            }
            Some((_, end)) if seq > *end => {}
            None => {}
            Some(_) => {
                let i = self.runs.partition_point(|&(start, _)| start <= seq);
                if i > 0 && self.runs[i - 1].1 >= seq {
                    return false;
                }
                return self.others.insert(seq);
            }
        }
        if self.others.contains(&seq) {
            return false;
        }
        self.runs.push((seq, seq));
        true
    }
}

/// Records after a stop checkpoint that no start record follows yet.
struct AfterStop {
    checkpoint: String,
    stop_seq: u64,
    /// The problem reported at the first of them.
    problem: Option<usize>,
    first_seq: u64,
    last_seq: u64,
    records: u64,
}

struct Verifier {
    report: Report,
    claims: SeqMap<Vec<Claim>>,
    deletions: Vec<Deletion>,
    prev: Option<Prev>,
    /// Stored hashes of the last few lines (for telling inserted or moved lines from damaged ones).
    window: VecDeque<Hash>,
    first: Option<First>,
    pending: Option<Pending>,
    /// The previous line was not a record, so the next link cannot be checked.
    after_damage: bool,
    seen: Seen,
    /// Format-2 stop checkpoints by the `seq` they end at: only the daemon's start record may follow.
    stops: SeqMap<String>,
    after_stop: Option<AfterStop>,
    /// The Merkle tree of the records read, while the log starts at its first record.
    tree: Option<crate::log::tree::Compact>,
    /// Tree sizes and roots checkpoints sign, by the `seq` they are at: (checkpoint, size, root hex).
    tree_claims: SeqMap<Vec<(String, u64, String)>>,
    /// Checkpoints of format 2 with a tree (not checked).
    older_trees: usize,
    /// Deletion records that kept the tree, found before the log is read in order.
    tree_bases: Vec<Deletion>,
    /// The deletion record the tree grew on from (its file), once the first record follows it.
    tree_base: Option<String>,
}

const WINDOW: usize = 4;

/// Finds the daemon's own types in a line (built once: a search built per line costs more than the search).
static OWN_TYPE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b",\"type\":\"trail_"));

/// Hashes a `seq` for the maps looked up at every record (claims, stops): one multiplication instead of SipHash.
/// The keys come from checkpoints whose signatures were checked, so flooding is not a concern.
#[derive(Default)]
struct SeqHasher(u64);

impl std::hash::Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map by `seq`.
type SeqMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<SeqHasher>>;

/// Verifies `inputs`; signatures are checked against `key` when given, else against the key each checkpoint names
/// (which proves only that the checkpoints agree with one another).
pub fn verify(inputs: &Inputs, key: Option<&VerifyingKey>) -> io::Result<Report> {
    let mut v = Verifier {
        report: Report::default(),
        claims: SeqMap::default(),
        deletions: Vec::new(),
        prev: None,
        window: VecDeque::new(),
        first: None,
        pending: None,
        after_damage: false,
        seen: Seen::default(),
        stops: SeqMap::default(),
        after_stop: None,
        tree: None,
        tree_claims: SeqMap::default(),
        older_trees: 0,
        tree_bases: Vec::new(),
        tree_base: None,
    };
    let mut sources: Vec<(Option<String>, String, io::Result<Vec<u8>>)> = inputs
        .checkpoints
        .iter()
        .map(|p| (None, display_name(p), std::fs::read(p)))
        .collect();
    sources.extend(
        inputs
            .outside
            .iter()
            .map(|(from, line)| (Some(from.clone()), from.clone(), Ok(line.clone()))),
    );
    let checkpoints = v.read_checkpoints(sources, key);
    // Retention removed the log's first files: the tree grows on from what their deletion records kept of it.
    if inputs.logs.first().is_some_and(|f| f.first_seq > 1) && !v.tree_claims.is_empty() {
        v.tree_bases = crate::log::deletion::with_trees(&inputs.logs);
    }
    v.report.covered = v.claims.keys().max().copied();
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for (i, file) in inputs.logs.iter().enumerate() {
        let unsigned = v.report.unsigned;
        let seqs = v.report.seqs;
        let bytes = v.read_file(file)?;
        sizes.insert(file.name.clone(), bytes);
        v.report.files += 1;
        let closed = i + 1 < inputs.logs.len();
        if closed && v.report.unsigned > unsigned {
            v.unsigned_closed_file(file, v.report.unsigned - unsigned, seqs, key.is_some());
        }
    }
    v.resolve_pending(None);
    v.end_after_stop();
    if v.tree.is_none() && !v.tree_claims.is_empty() && v.report.records > 0 {
        v.report.notes.push(
            "the checkpoints' Merkle tree roots were not checked: the log does not start at its first record \
             (older files were deleted by retention) and no deletion record kept the tree"
                .into(),
        );
    }
    if v.older_trees > 0 {
        v.report.notes.push(format!(
            "the Merkle tree roots of {} checkpoint(s) of format 2 (a development version's leaves) were not checked",
            v.older_trees
        ));
    }
    if let Some(file) = &v.tree_base
        && v.tree.is_some()
    {
        v.report.notes.push(format!(
            "the checkpoints' Merkle tree roots were checked from the tree that the deletion record of {file} kept"
        ));
    }
    v.check_claims();
    v.check_anchor();
    v.check_files(&checkpoints, &sizes, &inputs.logs);
    Ok(v.report)
}

impl Verifier {
    fn problem(
        &mut self,
        file: &str,
        line: Option<u64>,
        seq: Option<u64>,
        message: String,
    ) -> usize {
        self.report.problems.push(Problem {
            file: file.to_owned(),
            line,
            seq,
            message,
        });
        self.report.problems.len() - 1
    }

    /// Reads checkpoints: each with where it was kept elsewhere (`None` for the log's own), its name, its bytes.
    fn read_checkpoints(
        &mut self,
        sources: Vec<(Option<String>, String, io::Result<Vec<u8>>)>,
        key: Option<&VerifyingKey>,
    ) -> Vec<(String, Checkpoint)> {
        let mut good = Vec::new();
        let mut keys = HashSet::new();
        for (outside, name, bytes) in sources {
            self.report.checkpoints += 1;
            if outside.is_some() {
                self.report.outside += 1;
            }
            let cp = match bytes
                .map_err(|e| e.to_string())
                .and_then(|b| Checkpoint::parse(&b))
            {
                Ok(cp) => cp,
                Err(e) => {
                    self.problem(&name, None, None, format!("checkpoint unreadable: {e}"));
                    continue;
                }
            };
            // A checkpoint kept elsewhere is named by its own name and where it was kept.
            let name = match &outside {
                Some(from) => format!("{} (kept in {from})", checkpoint::file_name(&cp.body)),
                None => name,
            };
            if let Err(e) = cp.check_signature(key) {
                self.problem(&name, None, cp.body.seq, format!("checkpoint {e}"));
                continue;
            }
            keys.insert(cp.body.key.clone());
            if cp.body.checkpoint < 3 && cp.body.tree_root.is_some() {
                self.older_trees += 1;
            } else if let (Some(seq), Some(size), Some(root)) =
                (cp.body.seq, cp.body.tree_size, &cp.body.tree_root)
            {
                let claims = self.tree_claims.entry(seq).or_default();
                if !claims.iter().any(|(by, ..)| by == &name) {
                    claims.push((name.clone(), size, root.clone()));
                }
            }
            let mut claim = |seq: u64, hash: &str| {
                let claims = self.claims.entry(seq).or_default();
                if claims.iter().any(|c| c.by == name && c.hash == hash) {
                    return;
                }
                claims.push(Claim {
                    hash: hash.to_owned(),
                    by: name.clone(),
                    seen: false,
                });
            };
            if let Some(seq) = cp.body.seq {
                claim(seq, &cp.body.hash);
                if cp.body.reason == "stop" && cp.body.checkpoint >= 2 {
                    self.stops.insert(seq, name.clone());
                }
            }
            for f in &cp.body.files {
                if let (Some(seq), Some(hash)) = (f.last_seq, &f.last_hash) {
                    claim(seq, hash);
                }
            }
            good.push((name, cp));
        }
        if key.is_none() && !good.is_empty() {
            self.report.notes.push(
                "no --key given: checkpoint signatures were checked against the key each checkpoint names, which \
                 shows only that they agree with each other; pass the daemon's public key to check who signed them"
                    .into(),
            );
            if keys.len() > 1 {
                let first = &good[0].0.clone();
                self.problem(
                    first,
                    None,
                    None,
                    format!("checkpoints are signed by {} different keys", keys.len()),
                );
            }
        }
        good
    }

    /// Checks one file's records; returns its length (uncompressed).
    fn read_file(&mut self, file: &LogFile) -> io::Result<u64> {
        let name = file
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(&file.name)
            .to_owned();
        let reader = match file.open() {
            Ok(r) => r,
            Err(e) => {
                self.problem(&name, None, None, format!("cannot read: {e}"));
                return Ok(0);
            }
        };
        let mut chunks = Chunks::new(reader, 4 << 20);
        let mut line_no = 0u64;
        let mut first_in_file = true;
        let mut total = 0u64;
        loop {
            let chunk = match chunks.next_chunk() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    self.problem(
                        &name,
                        Some(line_no + 1),
                        None,
                        format!("cannot read past this line: {e}"),
                    );
                    break;
                }
            };
            match chunk {
                Chunk::Lines(_, lines) => {
                    total += lines.len() as u64;
                    for line in files::split_lines(lines) {
                        if line.is_empty() && line.as_ptr() == lines[lines.len()..].as_ptr() {
                            break;
                        }
                        line_no += 1;
                        self.line(&name, file, line_no, line, first_in_file);
                        first_in_file = false;
                    }
                }
                Chunk::Torn(offset, rest) => {
                    total += rest.len() as u64;
                    self.problem(
                        &name,
                        Some(line_no + 1),
                        None,
                        format!(
                            "the file ends inside a record at byte {offset} ({} bytes without a newline): it was truncated or cut",
                            rest.len()
                        ),
                    );
                    self.after_damage = true;
                }
            }
        }
        self.report.bytes += total;
        Ok(total)
    }

    fn line(&mut self, name: &str, file: &LogFile, line_no: u64, line: &[u8], first_in_file: bool) {
        let seq = crate::record::line::seq(line);
        self.resolve_pending(seq);
        let (Some(seq), Some((body, stored))) = (seq, chain::split(line)) else {
            self.problem(
                name,
                Some(line_no),
                seq,
                "not a sealed trail record (the line is damaged, or has no hash field)".into(),
            );
            self.after_damage = true;
            return;
        };
        self.report.records += 1;
        if self.report.covered.is_none_or(|c| seq > c) {
            self.report.unsigned += 1;
        }
        let repeated = !self.seen.insert(seq);
        self.report.seqs = Some(match self.report.seqs {
            Some((a, _)) => (a, seq),
            None => (seq, seq),
        });
        if first_in_file && seq < file.first_seq {
            self.problem(
                name,
                Some(line_no),
                Some(seq),
                format!(
                    "the file's name says it starts at seq {}, but its first record is seq {seq}",
                    file.first_seq
                ),
            );
        }
        if let Some(claims) = self.claims.get_mut(&seq) {
            let hex = chain::hex(&stored);
            let mut wrong = Vec::new();
            for c in claims.iter_mut() {
                c.seen = true;
                if c.hash != hex {
                    wrong.push(c.by.clone());
                }
            }
            for by in wrong {
                self.problem(
                    name,
                    Some(line_no),
                    Some(seq),
                    format!("the record's hash differs from the one checkpoint {by} vouches for"),
                );
            }
        }
        if OWN_TYPE.find(line).is_some() {
            self.own_record(name, line_no, seq, line);
        }
        // The inner digest serves the chain's checks and the record's Merkle leaf: one pass over its bytes.
        let (link_seq, digest) = chain::inner(body);
        let link = |prev: &chain::Hash| chain::link_digest(prev, link_seq, &digest);
        let computed;
        let mut problem = None;
        match &self.prev {
            None => {
                computed = link(&chain::GENESIS);
                // The tree starts at the log's first record, or grows on from the tree that the deletion record
                // of the file before this record kept (its last hash must be the one this record follows).
                if computed == stored {
                    self.tree = Some(Default::default());
                } else if let Some(d) = self
                    .tree_bases
                    .iter()
                    .filter(|d| d.last_seq.is_some_and(|s| s < seq))
                    .max_by_key(|d| d.last_seq)
                    && d.last_hash
                        .as_deref()
                        .and_then(|h| chain::parse_hex(h.as_bytes()))
                        .is_some_and(|h| link(&h) == stored)
                {
                    self.tree = d.tree();
                    self.tree_base = Some(d.file.clone());
                }
                self.first = Some(First {
                    file: name.to_owned(),
                    seq,
                    body: body.to_vec(),
                    hash: stored,
                });
            }
            Some(prev) => {
                computed = link(&prev.stored);
                if computed == stored {
                    if seq <= prev.seq && !repeated {
                        problem = Some(self.problem(
                            name,
                            Some(line_no),
                            Some(seq),
                            format!(
                                "seq does not increase (the record before is seq {})",
                                prev.seq
                            ),
                        ));
                    }
                } else if self.after_damage {
                    // The damaged line before was reported; its hash is unknown.
                } else if prev.computed.is_some_and(|c| link(&c) == stored) {
                    // The record before is intact but its hash field was changed.
                    if let Some(i) = prev.problem {
                        self.report.problems[i].message =
                            "the record's hash field was altered (its content is intact)".into();
                    }
                } else if let Some(back) = self
                    .window
                    .iter()
                    .rev()
                    .skip(1)
                    .position(|h| link(h) == stored)
                {
                    // This record follows one a few lines back: the lines between do not belong here.
                    if !prev.reordered
                        && !prev.repeated
                        && back == 0
                        && let Some(i) = prev.problem
                    {
                        let p = &mut self.report.problems[i];
                        p.message = "the record is not part of the chain: it was inserted".into();
                    }
                } else {
                    let prev_seq = prev.seq;
                    let index = self.problem(name, Some(line_no), Some(seq), String::new());
                    problem = Some(index);
                    self.pending = Some(Pending {
                        problem: index,
                        seq,
                        prev_seq,
                        repeated,
                    });
                }
            }
        }
        // Two records with one seq are one too many, however well each is chained (a fork: a record copied,
        // changed and chained to the same predecessor), or an exact copy of a line.
        if repeated && problem.is_none() {
            problem = Some(self.problem(
                name,
                Some(line_no),
                Some(seq),
                format!(
                    "a second record with seq {seq}: it was inserted (or copied), however well it is chained"
                ),
            ));
        }
        self.check_after_stop(name, line_no, seq, line, &stored);
        if self.tree.is_some() && link_seq == seq {
            self.check_tree(name, line_no, seq, crate::log::tree::leaf(seq, &digest));
        }
        self.after_damage = false;
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(stored);
        let reordered = self
            .prev
            .as_ref()
            .is_some_and(|p| p.reordered && problem.is_some());
        self.prev = Some(Prev {
            seq,
            stored,
            computed: (computed != stored).then_some(computed),
            problem,
            reordered,
            repeated,
        });
    }

    /// A line that may be one of the daemon's own records (the pattern may also have matched inside a payload):
    /// a deletion record is remembered only when the daemon wrote it; one of the daemon's types without the
    /// daemon's marker is reported.
    fn own_record(&mut self, name: &str, line_no: u64, seq: u64, line: &[u8]) {
        let Ok(record) = serde_json::from_slice::<OwnRecord>(line) else {
            return;
        };
        if !crate::event_types::is_daemon_type(&record.kind) {
            return;
        }
        if !record.source.daemon {
            let by = record
                .source
                .uid
                .map_or_else(String::new, |u| format!(" (submitted by uid {u})"));
            self.problem(
                name,
                Some(line_no),
                Some(seq),
                format!(
                    "a {} record the daemon did not write: its source has no \"daemon\":true{by}; it is not \
                     honoured",
                    record.kind
                ),
            );
            return;
        }
        if record.kind == "trail_log_file_deleted"
            && let Some(d) = record
                .payload
                .and_then(|p| serde_json::from_value::<Deletion>(p).ok())
        {
            self.deletions.push(d);
        }
    }

    /// Names a broken link, now that the `seq` of the line after it (if any) is known.
    fn resolve_pending(&mut self, next_seq: Option<u64>) {
        let Some(p) = self.pending.take() else { return };
        let message = if p.repeated || p.seq == p.prev_seq {
            format!(
                "a second record with seq {}: it was inserted (or copied)",
                p.seq
            )
        } else if p.seq < p.prev_seq {
            format!(
                "records out of order: this record comes after seq {} (moved or inserted)",
                p.prev_seq
            )
        } else if next_seq.is_some_and(|n| n < p.seq && n > p.prev_seq) {
            if let Some(prev) = &mut self.prev {
                prev.reordered = true;
            }
            format!(
                "records out of order: this record comes before seq {}",
                next_seq.unwrap_or_default()
            )
        } else if p.seq == p.prev_seq + 1 {
            "the record was modified: its hash does not match its content".into()
        } else {
            format!(
                "records are missing before this one: the chain is broken between seq {} and seq {} (records deleted, \
                 or this record modified)",
                p.prev_seq, p.seq
            )
        };
        self.report.problems[p.problem].message = message;
    }

    /// Records after a format-2 stop checkpoint must start with the daemon's start record: the daemon writes
    /// nothing between its stop and its next start.
    fn check_after_stop(&mut self, name: &str, line_no: u64, seq: u64, line: &[u8], stored: &Hash) {
        if let Some(after) = &mut self.after_stop {
            let started = memchr::memmem::find(line, b"\"type\":\"trail_started\"").is_some()
                && crate::record::line::own_type(line).as_deref()
                    == Some(crate::log::start::STARTED);
            if started {
                self.end_after_stop();
            } else if after.problem.is_none() {
                after.first_seq = seq;
                after.last_seq = seq;
                after.records = 1;
                let index = self.problem(name, Some(line_no), Some(seq), String::new());
                if let Some(after) = &mut self.after_stop {
                    after.problem = Some(index);
                }
            } else {
                after.last_seq = seq;
                after.records += 1;
            }
        }
        if let Some(checkpoint) = self.stops.get(&seq).cloned() {
            let vouched = self.claims.get(&seq).is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.by == checkpoint && c.hash == chain::hex(stored))
            });
            if vouched {
                self.end_after_stop();
                self.after_stop = Some(AfterStop {
                    checkpoint,
                    stop_seq: seq,
                    problem: None,
                    first_seq: 0,
                    last_seq: 0,
                    records: 0,
                });
            }
        }
    }

    /// Adds the record to the Merkle tree and compares the tree with what checkpoints signed at this record.
    fn check_tree(&mut self, name: &str, line_no: u64, seq: u64, leaf: crate::log::tree::Hash) {
        let Some(tree) = &mut self.tree else { return };
        tree.push(leaf);
        let Some(claims) = self.tree_claims.get(&seq) else {
            return;
        };
        let (size, root) = (tree.size(), chain::hex(&tree.root().0));
        let wrong: Vec<String> = claims
            .iter()
            .filter(|(_, s, r)| *s != size || *r != root)
            .map(|(by, s, _)| format!("{by} (size {s})"))
            .collect();
        for by in wrong {
            self.problem(
                name,
                Some(line_no),
                Some(seq),
                format!(
                    "the Merkle tree of the log up to this record (size {size}, root {root}) is not the one checkpoint \
                     {by} signed"
                ),
            );
        }
    }

    /// Words the problem of a run of records after a stop, now that it has ended.
    fn end_after_stop(&mut self) {
        let Some(after) = self.after_stop.take() else {
            return;
        };
        if let Some(i) = after.problem {
            self.report.problems[i].message = format!(
                "a record after the stop checkpoint {} (seq {}) and before the daemon's next trail_started record: \
                 nothing follows a stop until the daemon starts again, so {} records (seq {}..{}) were added while \
                 it was not running",
                after.checkpoint, after.stop_seq, after.records, after.first_seq, after.last_seq
            );
        }
    }

    /// A closed file holds records that no checkpoint covers: a checkpoint is written at every rotation, so the
    /// checkpoints that covered it are gone (or the log was sealed again after a change and they were removed).
    fn unsigned_closed_file(
        &mut self,
        file: &LogFile,
        records: u64,
        before: Option<(u64, u64)>,
        keyed: bool,
    ) {
        let name = display_name(&file.path);
        let first = before
            .map_or(file.first_seq, |(_, last)| last + 1)
            .max(self.report.covered.map_or(0, |c| c + 1));
        let last = self.report.seqs.map_or(first, |(_, l)| l);
        let what = format!(
            "{records} records of this closed file (seq {first}..{last}) are covered by no checkpoint, although one \
             is written at every rotation: checkpoints were removed"
        );
        if keyed {
            self.problem(&name, None, None, what);
        } else {
            self.report.notes.push(format!("{name}: {what}"));
        }
    }

    fn check_claims(&mut self) {
        let Some((first, last)) = self.report.seqs else {
            return;
        };
        let mut unseen: Vec<(u64, String)> = self
            .claims
            .iter()
            .flat_map(|(&seq, cs)| {
                cs.iter()
                    .filter(|c| !c.seen)
                    .map(move |c| (seq, c.by.clone()))
            })
            .collect();
        unseen.sort();
        for (seq, by) in unseen {
            if seq > last {
                self.problem(
                    &by,
                    None,
                    Some(seq),
                    format!("the checkpoint vouches for seq {seq}, but the log ends at seq {last}: records were removed from its end"),
                );
            } else if seq >= first {
                self.problem(
                    &by,
                    None,
                    Some(seq),
                    "the checkpoint vouches for this record, but it is not in the log".into(),
                );
            }
        }
    }

    /// The first record must start the chain, or follow a record that a deletion record or checkpoint names.
    fn check_anchor(&mut self) {
        let Some(first) = self.first.take() else {
            return;
        };
        if chain::link(&chain::GENESIS, &first.body) == first.hash {
            return;
        }
        let follows = |hash: &str| {
            chain::parse_hex(hash.as_bytes())
                .is_some_and(|h| chain::link(&h, &first.body) == first.hash)
        };
        // Retention deletes the oldest files and records each deletion, with the deleted file's last hash, in the
        // chain that remains.
        let deleted = self
            .deletions
            .iter()
            .filter(|d| d.last_seq.is_some_and(|s| s < first.seq))
            .max_by_key(|d| d.last_seq);
        if let Some(d) = deleted {
            if d.last_hash.as_deref().is_some_and(follows) {
                return;
            }
            self.problem(
                &first.file,
                Some(1),
                Some(first.seq),
                format!(
                    "the oldest record does not follow the last record of {}, deleted by retention: records are \
                     missing at the start of the log, or this record was modified",
                    d.file
                ),
            );
            return;
        }
        let vouched = self
            .claims
            .iter()
            .filter(|(s, _)| **s < first.seq)
            .max_by_key(|(s, _)| **s)
            .map(|(s, c)| (*s, c[0].by.clone()));
        let message = match vouched {
            Some((seq, by)) => format!(
                "the records up to seq {seq} (vouched for by checkpoint {by}) are gone, and no deletion record says \
                 retention removed them: a file was deleted"
            ),
            None => "the oldest record does not start the chain and nothing vouches for the record before it: \
                     older files were removed without a deletion record, or the log was cut at its start"
                .into(),
        };
        self.problem(&first.file, Some(1), Some(first.seq), message);
    }

    fn check_files(
        &mut self,
        checkpoints: &[(String, Checkpoint)],
        sizes: &BTreeMap<String, u64>,
        logs: &[LogFile],
    ) {
        let oldest = logs.first().map(|f| f.name.clone());
        // Problems name the file as it is on disk (`.jsonl.zst` once compressed).
        let on_disk: HashMap<&str, String> = logs
            .iter()
            .map(|f| (f.name.as_str(), display_name(&f.path)))
            .collect();
        let shown = |name: &String| {
            on_disk
                .get(name.as_str())
                .cloned()
                .unwrap_or_else(|| name.clone())
        };
        let mut missing_reported = HashSet::new();
        let mut size_reported = HashSet::new();
        // Newest first, so a missing file is described as the latest checkpoint saw it.
        for (by, cp) in checkpoints.iter().rev() {
            let files = &cp.body.files;
            for (i, entry) in files.iter().enumerate() {
                let open = i + 1 == files.len();
                match sizes.get(&entry.name) {
                    Some(_) if size_reported.contains(&entry.name) => {}
                    Some(&bytes) if bytes < entry.bytes => {
                        size_reported.insert(entry.name.clone());
                        self.problem(
                            &shown(&entry.name),
                            None,
                            None,
                            format!("the file is {bytes} bytes, but checkpoint {by} saw {}: it was truncated", entry.bytes),
                        );
                    }
                    Some(&bytes) if !open && bytes != entry.bytes => {
                        size_reported.insert(entry.name.clone());
                        self.problem(
                            &shown(&entry.name),
                            None,
                            None,
                            format!("the file is {bytes} bytes (uncompressed), but it was closed at {} bytes (checkpoint {by}): it was changed", entry.bytes),
                        );
                    }
                    Some(_) => {}
                    None if oldest.as_ref().is_some_and(|o| &entry.name < o) => {
                        // Older than every file present: removed by retention; the chain's anchor check covers it.
                    }
                    None => {
                        if missing_reported.insert(entry.name.clone()) {
                            let range = match entry.last_seq {
                                Some(l) => format!("seq {}..{l}", entry.first_seq),
                                None => "no records".into(),
                            };
                            self.problem(
                                &entry.name,
                                None,
                                None,
                                format!(
                                    "missing file ({range}, {} bytes) listed in checkpoint {by}",
                                    entry.bytes
                                ),
                            );
                        }
                    }
                }
            }
            if let (Some(first), Some(last)) = (files.first(), files.last()) {
                let listed: HashSet<&str> = files.iter().map(|f| f.name.as_str()).collect();
                for f in logs {
                    if f.name > first.name
                        && f.name < last.name
                        && !listed.contains(f.name.as_str())
                    {
                        self.problem(
                            &display_name(&f.path),
                            None,
                            None,
                            format!("extra file: checkpoint {by} lists the files around it but not this one"),
                        );
                    }
                }
            }
        }
    }
}

fn display_name(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends record `seq` (its fields after `seq`, given as `rest`) to `lines`, sealed after `prev`.
    fn push(lines: &mut String, prev: &mut Hash, seq: u64, rest: &str) {
        let mut out = format!("{{\"seq\":{seq}{rest}").into_bytes();
        *prev = chain::seal(prev, &mut out, 0);
        lines.push_str(std::str::from_utf8(&out).unwrap());
        lines.push('\n');
    }

    /// A log whose first file (seq 1 and 2) is gone, and whose remaining file starts with record 3, `third` (its
    /// fields after `seq`, where `LAST_HASH` stands for the deleted file's last hash): the problems verify reports.
    fn problems_after_deletion(third: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let record = r#","id":"i","received_at":"2026-01-01T00:00:00.000000000Z","type":"user_login","source":{"uid":1000,"gid":1000,"host":"h"}"#;
        let (mut first, mut second, mut prev) = (String::new(), String::new(), chain::GENESIS);
        push(&mut first, &mut prev, 1, record);
        push(&mut first, &mut prev, 2, record);
        let third = third.replace("LAST_HASH", &chain::hex(&prev));
        push(&mut second, &mut prev, 3, &third);
        push(&mut second, &mut prev, 4, record);
        let kept = dir
            .path()
            .join("trail-20260102T000000Z-00000000000000000003.jsonl");
        std::fs::write(&kept, second).unwrap();
        let inputs = Inputs {
            logs: vec![LogFile::parse(&kept).unwrap()],
            checkpoints: Vec::new(),
            outside: Vec::new(),
        };
        let report = verify(&inputs, None).unwrap();
        report.problems.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn only_the_daemons_own_deletion_records_anchor_the_log() {
        let check = |third: &str, expected: &[&str]| {
            let got = problems_after_deletion(third);
            assert_eq!(got.len(), expected.len(), "{third}: {got:#?}");
            for (g, e) in got.iter().zip(expected) {
                assert!(g.contains(e), "{third}: expected {e:?} in {got:#?}");
            }
        };
        let deletion = |source: &str| {
            format!(
                r#","id":"d","received_at":"2026-01-02T00:00:00.000000000Z","type":"trail_log_file_deleted","source":{source},"payload":{{"file":"trail-20260101T000000Z-00000000000000000001.jsonl","last_seq":2,"last_hash":"LAST_HASH"}}"#
            )
        };
        let unanchored = "seq 3: the oldest record does not start the chain";
        // Written by the daemon: it vouches for the deleted file.
        check(
            &deletion(r#"{"uid":0,"gid":0,"pid":7,"host":"h","daemon":true}"#),
            &[],
        );
        // The same record from a client (as older daemons accepted them): reported and not honoured.
        check(
            &deletion(r#"{"uid":1000,"gid":1000,"pid":8,"host":"h"}"#),
            &[
                "seq 3: a trail_log_file_deleted record the daemon did not write: its source has no \"daemon\":true (submitted by uid 1000)",
                unanchored,
            ],
        );
        // The marker inside the payload is not the record's source.
        check(
            &deletion(r#"{"uid":1000,"gid":1000,"host":"h","x":{"daemon":true}}"#),
            &["did not write", unanchored],
        );
        // A client's record of another type, its payload dressed up as a deletion: not a deletion record.
        check(
            r#","id":"d","type":"user_login","source":{"uid":1000,"gid":1000,"host":"h"},"payload":{"file":"trail-20260101T000000Z-00000000000000000001.jsonl","last_seq":2,"last_hash":"LAST_HASH","n":{"a":1,"type":"trail_log_file_deleted","source":{"daemon":true}}}"#,
            &[unanchored],
        );
        // Nothing says the file was deleted.
        check(
            r#","id":"d","type":"user_login","source":{"uid":1000,"gid":1000,"host":"h"}"#,
            &[unanchored],
        );
    }

    #[test]
    fn seen_seqs_are_remembered_in_runs_and_out_of_order() {
        let mut seen = Seen::default();
        for (seq, new) in [
            (1, true),
            (2, true),
            (2, false),
            (5, true),
            (6, true),
            (3, true),
            (3, false),
            (1, false),
            (6, false),
            (4, true),
            (7, true),
            (4, false),
        ] {
            assert_eq!(seen.insert(seq), new, "{seq}");
        }
    }

    /// Problems verify reports for a file of records 1..=5 after `edit` (on the lines, 0-based) changed it.
    fn problems_after(edit: impl Fn(&mut Vec<String>, &[Hash])) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let (mut text, mut prev, mut hashes) =
            (String::new(), chain::GENESIS, vec![chain::GENESIS]);
        for seq in 1..=5 {
            push(
                &mut text,
                &mut prev,
                seq,
                &format!(r#","id":"{seq}","type":"user_login""#),
            );
            hashes.push(prev);
        }
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        edit(&mut lines, &hashes);
        let path = dir
            .path()
            .join("trail-20260102T000000Z-00000000000000000001.jsonl");
        std::fs::write(
            &path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        let inputs = Inputs {
            logs: vec![LogFile::parse(&path).unwrap()],
            checkpoints: Vec::new(),
            outside: Vec::new(),
        };
        let report = verify(&inputs, None).unwrap();
        report.problems.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn a_second_record_with_a_seq_is_reported_at_its_line_however_it_is_chained() {
        let file = "trail-20260102T000000Z-00000000000000000001.jsonl";
        let second = |line: u64| {
            vec![format!(
                "{file}:{line}: seq 3: a second record with seq 3: it was inserted (or copied), however well it is chained"
            )]
        };
        // A fork of record 3, chained to record 2: before record 3, then after it.
        let fork = |hashes: &[Hash]| {
            let mut out = br#"{"seq":3,"id":"forged","type":"user_login""#.to_vec();
            chain::seal(&hashes[2], &mut out, 0);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(problems_after(|l, h| l.insert(2, fork(h))), second(4));
        assert_eq!(problems_after(|l, h| l.insert(3, fork(h))), second(4));
        // An exact copy, right after the line and further on.
        assert_eq!(problems_after(|l, _| l.insert(3, l[2].clone())), second(4));
        assert_eq!(problems_after(|l, _| l.insert(4, l[2].clone())), second(5));
        assert_eq!(problems_after(|_, _| {}), Vec::<String>::new());
    }
}
