//! `trail search`: finds records in the log files directly, without the daemon.
//!
//! Owns query semantics and the scan. The files are the interface: `trail search` (and any program linking this
//! library) reads the log directory; the daemon does not serve searches. A query is a conjunction of:
//!
//! - a `received_at` range, `from` inclusive, `to` exclusive (the daemon's clock, which is what file names and
//!   indexes know);
//! - event type globs (any may match); `actor.id`, `target.id`, `outcome` and `source.uid`, compared exactly;
//! - free text: a case-sensitive substring of any string value of the record (keys excluded), at any depth.
//!
//! Speed comes from not reading and not parsing: a file whose index says its records are outside the time range
//! is skipped unopened, and inside a file only the index blocks overlapping the range are read (for a compressed
//! file, only their zstd frames are decompressed). Within a block, the most selective condition is looked for
//! as a literal with `memmem` over the raw bytes (e.g. `"actor":{"id":"u-42"`), and only lines containing it are
//! parsed to confirm every condition. Files without an index (the one being written) are read whole.
//!
//! Order: newest first is the reverse of log order (`seq`), oldest first is log order.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::log::files::{self, Chunk, Chunks, LogFile};
use crate::log::index;

/// What to look for; every condition set must hold.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Earliest `received_at`, inclusive, as [`files::stamp`] formats it.
    pub from: Option<Vec<u8>>,
    /// Latest `received_at`, exclusive.
    pub to: Option<Vec<u8>>,
    /// Event type globs (`*`, `?`); any may match.
    pub types: Vec<String>,
    /// `actor.id`.
    pub actor: Option<String>,
    /// `target.id`.
    pub target: Option<String>,
    /// `outcome`.
    pub outcome: Option<String>,
    /// `source.uid`.
    pub uid: Option<u32>,
    /// A substring of any string value.
    pub text: Option<String>,
    /// Reverse log order.
    pub newest_first: bool,
    /// Stop after this many matches.
    pub limit: Option<usize>,
}

/// What a search did.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Log files present.
    pub files: usize,
    /// Files opened.
    pub files_read: usize,
    /// Bytes of records looked at (uncompressed).
    pub bytes_read: u64,
    /// Records output.
    pub matches: usize,
    /// The newest file and the offset up to which it was read (where `follow` continues).
    pub end: Option<(PathBuf, u64)>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow)]
    actor: Option<Id<'a>>,
    #[serde(borrow)]
    target: Option<Id<'a>>,
    #[serde(borrow)]
    outcome: Option<Cow<'a, str>>,
    source: Uid,
}

#[derive(Deserialize)]
struct Id<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Uid {
    uid: u32,
}

/// A compiled query: the literal to look for first and the checks on each candidate line.
pub struct Matcher {
    query: Query,
    needle: Option<memchr::memmem::Finder<'static>>,
    /// Whether lines must be parsed to confirm (anything beyond the time range).
    parse: bool,
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

impl Matcher {
    /// Compiles `query`.
    pub fn new(query: Query) -> Matcher {
        let inner = |s: &str| {
            let j = json_string(s);
            j[1..j.len() - 1].to_owned()
        };
        let literal = if let Some(a) = &query.actor {
            Some(format!("\"actor\":{{\"id\":{}", json_string(a)))
        } else if let Some(t) = &query.target {
            Some(format!("\"id\":{}", json_string(t)))
        } else if let Some(t) = query.text.as_deref().filter(|t| !t.is_empty()) {
            Some(inner(t))
        } else if let Some(u) = query.uid {
            Some(format!("\"source\":{{\"uid\":{u},"))
        } else if let [only] = query.types.as_slice()
            && !only.contains(['*', '?'])
        {
            Some(format!(",\"type\":\"{only}\""))
        } else {
            query
                .outcome
                .as_ref()
                .map(|o| format!("\"outcome\":{}", json_string(o)))
        };
        let parse = query.actor.is_some()
            || query.target.is_some()
            || query.text.is_some()
            || query.uid.is_some()
            || !query.types.is_empty()
            || query.outcome.is_some();
        Matcher {
            needle: literal.map(|l| memchr::memmem::Finder::new(l.as_bytes()).into_owned()),
            query,
            parse,
        }
    }

    fn in_time(&self, line: &[u8]) -> bool {
        if self.query.from.is_none() && self.query.to.is_none() {
            return true;
        }
        let Some(t) = crate::record::line::received_at(line) else {
            return false;
        };
        self.query.from.as_deref().is_none_or(|f| t >= f)
            && self.query.to.as_deref().is_none_or(|to| t < to)
    }

    /// Whether a line the needle (if any) already selected is accepted: in the time range and, when the query
    /// needs it, confirmed by parsing.
    fn accepts(&self, line: &[u8]) -> bool {
        self.in_time(line) && (!self.parse || self.confirm(line))
    }

    fn confirm(&self, line: &[u8]) -> bool {
        let q = &self.query;
        let Ok(p) = serde_json::from_slice::<Probe>(line) else {
            return false;
        };
        let id = |x: &Option<Id>| x.as_ref().and_then(|a| a.id.as_deref()).map(str::to_owned);
        if !q.types.is_empty()
            && !q
                .types
                .iter()
                .any(|g| crate::filter::glob(g, &p.event_type))
        {
            return false;
        }
        if q.actor.is_some() && id(&p.actor) != q.actor {
            return false;
        }
        if q.target.is_some() && id(&p.target) != q.target {
            return false;
        }
        if q.outcome.is_some() && p.outcome.as_deref() != q.outcome.as_deref() {
            return false;
        }
        if q.uid.is_some_and(|u| u != p.source.uid) {
            return false;
        }
        if let Some(text) = &q.text {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                return false;
            };
            return contains_text(&v, text);
        }
        true
    }

    /// Every matching line of `lines` (whole lines with newlines), in order.
    fn scan<'a>(&self, lines: &'a [u8], found: &mut Vec<&'a [u8]>) {
        let Some(needle) = &self.needle else {
            for line in crate::log::files::split_lines(lines) {
                if !line.is_empty() && self.accepts(line) {
                    found.push(line);
                }
            }
            return;
        };
        let mut at = 0;
        while let Some(hit) = needle.find(&lines[at..]) {
            let hit = at + hit;
            let start = memchr::memrchr(b'\n', &lines[..hit]).map_or(0, |i| i + 1);
            let end = memchr::memchr(b'\n', &lines[hit..]).map_or(lines.len(), |i| hit + i);
            let line = &lines[start..end];
            if self.accepts(line) {
                found.push(line);
            }
            at = end + 1;
            if at >= lines.len() {
                break;
            }
        }
    }
}

/// Whether any string value in `v` contains `text`.
pub fn contains_text(v: &serde_json::Value, text: &str) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains(text),
        serde_json::Value::Array(a) => a.iter().any(|x| contains_text(x, text)),
        serde_json::Value::Object(o) => o.values().any(|x| contains_text(x, text)),
        _ => false,
    }
}

/// Runs `query` over the log in `dir`, giving each matching line (without newline) to `out`, which returns false
/// to stop.
pub fn search(dir: &Path, query: &Query, out: &mut dyn FnMut(&[u8]) -> bool) -> io::Result<Stats> {
    let matcher = Matcher::new(query.clone());
    let files = files::list(dir)?;
    let mut stats = Stats {
        files: files.len(),
        ..Stats::default()
    };
    let limit = query.limit.unwrap_or(usize::MAX);
    let mut order: Vec<usize> = (0..files.len()).collect();
    if query.newest_first {
        order.reverse();
    }
    for i in order {
        if stats.matches >= limit {
            break;
        }
        let file = &files[i];
        let newest = i + 1 == files.len();
        // Every record of a file was written before the next one was started (names have whole seconds).
        if let (Some(from), Some(next)) = (&query.from, files.get(i + 1)) {
            let bound = files::stamp(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(next.start as u64 + 1),
            );
            if bound.as_slice() <= from.as_slice() {
                continue;
            }
        }
        let index = if newest { None } else { index::load(file) };
        let mut emit = |found: &[&[u8]], stats: &mut Stats| -> bool {
            let mut go = |line: &[u8], stats: &mut Stats| {
                if stats.matches >= limit {
                    return false;
                }
                stats.matches += 1;
                out(line)
            };
            if query.newest_first {
                found.iter().rev().all(|l| go(l, stats))
            } else {
                found.iter().all(|l| go(l, stats))
            }
        };
        match index {
            Some(ix) => {
                let overlaps = |t_min: &str, t_max: &str| {
                    query.from.as_deref().is_none_or(|f| t_max.as_bytes() >= f)
                        && query.to.as_deref().is_none_or(|to| t_min.as_bytes() < to)
                };
                if !overlaps(
                    ix.t_min.as_deref().unwrap_or(""),
                    ix.t_max.as_deref().unwrap_or(""),
                ) {
                    continue;
                }
                stats.files_read += 1;
                let handle = File::open(&file.path)?;
                let mut blocks: Vec<&index::Block> = ix
                    .blocks
                    .iter()
                    .filter(|b| overlaps(&b.t_min, &b.t_max))
                    .collect();
                if query.newest_first {
                    blocks.reverse();
                }
                if file.compressed && !ix.framed {
                    // Not seekable: read it whole.
                    if !scan_stream(file, &matcher, &mut stats, &mut emit)? {
                        return Ok(stats);
                    }
                    continue;
                }
                let mut raw = Vec::new();
                let mut buf = Vec::new();
                for b in blocks {
                    if stats.matches >= limit {
                        break;
                    }
                    if file.compressed {
                        raw.resize(b.zlen as usize, 0);
                        handle.read_exact_at(&mut raw, b.zoff)?;
                        buf = zstd::bulk::decompress(&raw, b.len as usize)?;
                    } else {
                        buf.resize(b.len as usize, 0);
                        handle.read_exact_at(&mut buf, b.off)?;
                    }
                    stats.bytes_read += b.len;
                    let mut found = Vec::new();
                    matcher.scan(&buf, &mut found);
                    if !emit(&found, &mut stats) {
                        return Ok(stats);
                    }
                }
            }
            None => {
                stats.files_read += 1;
                let (go_on, consumed) =
                    scan_file(file, &matcher, &mut stats, &mut emit, query.newest_first)?;
                if newest {
                    stats.end = Some((file.path.clone(), consumed));
                }
                if !go_on {
                    return Ok(stats);
                }
            }
        }
    }
    if stats.end.is_none()
        && let Some(f) = files.last()
    {
        let len = std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0);
        stats.end = Some((f.path.clone(), if f.compressed { 0 } else { len }));
    }
    Ok(stats)
}

type Emit<'e> = dyn FnMut(&[&[u8]], &mut Stats) -> bool + 'e;

/// Scans a whole file; newest first needs all its matches before emitting any. Returns whether to go on and how
/// many bytes of complete lines were read.
fn scan_file(
    file: &LogFile,
    matcher: &Matcher,
    stats: &mut Stats,
    emit: &mut Emit<'_>,
    newest_first: bool,
) -> io::Result<(bool, u64)> {
    if !newest_first {
        let consumed = scan_chunks(file, matcher, stats, &mut |found, s| emit(found, s))?;
        return Ok((consumed.0, consumed.1));
    }
    let mut all: Vec<Vec<u8>> = Vec::new();
    let (_, consumed) = scan_chunks(file, matcher, stats, &mut |found, _| {
        all.extend(found.iter().map(|l| l.to_vec()));
        true
    })?;
    let refs: Vec<&[u8]> = all.iter().map(|l| l.as_slice()).collect();
    Ok((emit(&refs, stats), consumed))
}

fn scan_stream(
    file: &LogFile,
    matcher: &Matcher,
    stats: &mut Stats,
    emit: &mut Emit<'_>,
) -> io::Result<bool> {
    Ok(scan_file(file, matcher, stats, emit, matcher.query.newest_first)?.0)
}

fn scan_chunks(
    file: &LogFile,
    matcher: &Matcher,
    stats: &mut Stats,
    emit: &mut Emit<'_>,
) -> io::Result<(bool, u64)> {
    let mut chunks = Chunks::new(file.open()?, 4 << 20);
    let mut consumed = 0;
    while let Some(chunk) = chunks.next_chunk()? {
        let Chunk::Lines(off, lines) = chunk else {
            break;
        };
        stats.bytes_read += lines.len() as u64;
        consumed = off + lines.len() as u64;
        let mut found = Vec::new();
        matcher.scan(lines, &mut found);
        if !emit(&found, stats) {
            return Ok((false, consumed));
        }
    }
    Ok((true, consumed))
}

/// Follows the log from `end` (as [`search`] left it): gives every new matching line to `out` as it is written,
/// across rotations, until `out` returns false. Polls every `every`.
pub fn follow(
    dir: &Path,
    query: &Query,
    end: Option<(PathBuf, u64)>,
    every: std::time::Duration,
    out: &mut dyn FnMut(&[u8]) -> bool,
) -> io::Result<()> {
    let matcher = Matcher::new(query.clone());
    let (mut path, mut pos) = end.unwrap_or_default();
    let mut pending: Vec<u8> = Vec::new();
    loop {
        // Listed before reading: when a newer file is already there, the current one was complete before the read,
        // so moving on after a read that found nothing skips no line.
        let newest = files::list(dir)?.pop();
        let mut read_any = false;
        if let Ok(f) = File::open(&path) {
            let len = f.metadata()?.len();
            if len > pos {
                let mut buf = vec![0; (len - pos) as usize];
                f.read_exact_at(&mut buf, pos)?;
                pos = len;
                pending.extend_from_slice(&buf);
                read_any = true;
                if let Some(last) = memchr::memrchr(b'\n', &pending) {
                    let rest = pending.split_off(last + 1);
                    let mut found = Vec::new();
                    matcher.scan(&pending, &mut found);
                    for l in found {
                        if !out(l) {
                            return Ok(());
                        }
                    }
                    pending = rest;
                }
            }
        }
        match newest {
            Some(n) if n.path != path && !read_any => {
                // The file was closed; its successor starts empty.
                path = n.path;
                pos = 0;
                pending.clear();
            }
            _ => std::thread::sleep(every),
        }
    }
}
