//! Finding and reading log files, compressed or not.
//!
//! Owns the names of log files as tools see them (`trail-<UTC start>-<first seq>.jsonl`, and `….jsonl.zst` once
//! compressed) and reading their lines in large chunks without caring which form a file has. When an interrupted
//! compression left both forms, the uncompressed one is the file and the other is ignored.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The symlink in the log directory that names the file being appended to.
pub const CURRENT: &str = "current";

/// The name of a log file that starts at `time` with record `first_seq`.
pub fn file_name(time: SystemTime, first_seq: u64) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let t = chrono::DateTime::<chrono::Utc>::from_timestamp(secs as i64, 0).unwrap_or_default();
    format!("trail-{}-{first_seq:020}.jsonl", t.format("%Y%m%dT%H%M%SZ"))
}

/// Extension of a compressed log file, after `.jsonl`.
pub const ZST: &str = ".zst";

/// One log file in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its name as the log knows it: `trail-….jsonl`, also for a compressed file.
    pub name: String,
    /// UTC start from its name, seconds since the epoch.
    pub start: i64,
    /// The first `seq` it may hold, from its name.
    pub first_seq: u64,
    /// Stored as zstd frames.
    pub compressed: bool,
}

impl LogFile {
    /// Reads a log file's name; `None` when `path` does not name one.
    pub fn parse(path: &Path) -> Option<LogFile> {
        let file_name = path.file_name()?.to_str()?;
        let (name, compressed) = match file_name.strip_suffix(ZST) {
            Some(n) => (n, true),
            None => (file_name, false),
        };
        let rest = name.strip_prefix("trail-")?.strip_suffix(".jsonl")?;
        let (time, seq) = rest.split_once('-')?;
        if time.len() != 16 || seq.len() != 20 || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let start = chrono::NaiveDateTime::parse_from_str(time, "%Y%m%dT%H%M%SZ")
            .ok()?
            .and_utc()
            .timestamp();
        Some(LogFile {
            path: path.to_owned(),
            name: name.to_owned(),
            start,
            first_seq: seq.parse().ok()?,
            compressed,
        })
    }

    /// The file's bytes as records, decompressed when needed.
    pub fn open(&self) -> io::Result<Box<dyn Read + Send>> {
        let file = File::open(&self.path)?;
        if self.compressed {
            Ok(Box::new(zstd::stream::read::Decoder::new(file)?))
        } else {
            Ok(Box::new(file))
        }
    }

    /// The file's bytes as records from uncompressed offset `at` on: a plain file is read from there, a
    /// compressed one decompressed and the bytes before `at` passed over.
    pub fn open_at(&self, at: u64) -> io::Result<Box<dyn Read + Send>> {
        if self.compressed {
            let mut reader = self.open()?;
            io::copy(&mut (&mut reader).take(at), &mut io::sink())?;
            Ok(reader)
        } else {
            let mut file = File::open(&self.path)?;
            io::Seek::seek(&mut file, io::SeekFrom::Start(at))?;
            Ok(Box::new(file))
        }
    }

    /// The sidecar index's path.
    pub fn index_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".idx");
        PathBuf::from(p)
    }
}

/// The log files of `dir`, oldest first (one entry per file, the uncompressed form when both exist).
pub fn list(dir: &Path) -> io::Result<Vec<LogFile>> {
    let mut files: Vec<LogFile> = std::fs::read_dir(dir)?
        .filter_map(|e| LogFile::parse(&e.ok()?.path()))
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name).then(a.compressed.cmp(&b.compressed)));
    files.dedup_by(|later, earlier| later.name == earlier.name);
    Ok(files)
}

/// The pieces of `text` between newlines, as `text.split(|&b| b == b'\n')` yields them (the piece after the last
/// newline included, empty when `text` ends with one), found with `memchr`: a split that compares byte by byte
/// costs more than hashing the line on long records.
pub fn split_lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', text)
        .chain(std::iter::once(text.len()))
        .map(move |end| {
            let line = &text[start..end];
            start = end + 1;
            line
        })
}

/// The lines of `text`, each with its newline, as `text.split_inclusive(|&b| b == b'\n')` yields them (a last
/// piece without a newline included), found with `memchr`.
pub fn split_lines_inclusive(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', text)
        .map(|i| i + 1)
        .chain(std::iter::once(text.len()))
        .filter_map(move |end| {
            let line = &text[start..end];
            start = end;
            (!line.is_empty()).then_some(line)
        })
}

/// Reads whole lines in large chunks.
pub struct Chunks<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of `buf` that are filled.
    filled: usize,
    /// Bytes at the front of `buf` handed out by the last call.
    taken: usize,
    /// Offset in the stream of `buf[0]`.
    offset: u64,
    eof: bool,
}

/// What [`Chunks::next_chunk`] produced.
pub enum Chunk<'a> {
    /// Complete lines (each with its newline) starting at this stream offset.
    Lines(u64, &'a [u8]),
    /// The end of the stream holds bytes after the last newline: a torn or truncated line.
    Torn(u64, &'a [u8]),
}

impl<R: Read> Chunks<R> {
    /// Reads `inner` in chunks of about `size` bytes (more when a line is longer).
    pub fn new(inner: R, size: usize) -> Chunks<R> {
        Chunks {
            inner,
            buf: vec![0; size.max(1 << 12)],
            filled: 0,
            taken: 0,
            offset: 0,
            eof: false,
        }
    }

    /// The next chunk, `None` at the end.
    pub fn next_chunk(&mut self) -> io::Result<Option<Chunk<'_>>> {
        if self.taken > 0 {
            self.buf.copy_within(self.taken..self.filled, 0);
            self.filled -= self.taken;
            self.offset += self.taken as u64;
            self.taken = 0;
        }
        loop {
            while !self.eof && self.filled < self.buf.len() {
                match self.inner.read(&mut self.buf[self.filled..]) {
                    Ok(0) => self.eof = true,
                    Ok(n) => self.filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if let Some(last) = memchr::memrchr(b'\n', &self.buf[..self.filled]) {
                self.taken = last + 1;
                return Ok(Some(Chunk::Lines(self.offset, &self.buf[..self.taken])));
            }
            if self.eof {
                if self.filled == 0 {
                    return Ok(None);
                }
                self.taken = self.filled;
                return Ok(Some(Chunk::Torn(self.offset, &self.buf[..self.filled])));
            }
            // One line longer than the buffer: grow it.
            let len = self.buf.len();
            self.buf.resize(len * 2, 0);
        }
    }
}

/// Formats a time like a record's `received_at`, for comparing with [`crate::record::line::received_at`] byte
/// by byte.
pub fn stamp(t: std::time::SystemTime) -> Vec<u8> {
    let mut out = Vec::with_capacity(30);
    crate::record::write_rfc3339(&mut out, t);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn line_splits_match_the_slice_methods() {
        for text in [
            &b""[..],
            b"\n",
            b"a",
            b"a\n",
            b"a\nb",
            b"a\n\nb\n",
            b"\n\n",
            b"{\"seq\":1}\n{\"seq\":2}",
        ] {
            let split: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
            assert_eq!(
                super::split_lines(text).collect::<Vec<_>>(),
                split,
                "{text:?}"
            );
            let inclusive: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
            assert_eq!(
                super::split_lines_inclusive(text).collect::<Vec<_>>(),
                inclusive,
                "{text:?}"
            );
        }
    }

    use super::*;
    use std::time::Duration;

    #[test]
    fn names() {
        let check = |name: &str, expected: Option<(&str, i64, u64, bool)>| {
            let got = LogFile::parse(Path::new(name))
                .map(|f| (f.name.clone(), f.start, f.first_seq, f.compressed));
            assert_eq!(
                got,
                expected.map(|(n, s, q, c)| (n.to_string(), s, q, c)),
                "{name}"
            );
        };
        let plain = "trail-20261120T000000Z-00000000000000000007.jsonl";
        check(plain, Some((plain, 1_795_132_800, 7, false)));
        check(
            &format!("{plain}.zst"),
            Some((plain, 1_795_132_800, 7, true)),
        );
        check(&format!("{plain}.idx"), None);
        check(&format!("{plain}.torn-1-2"), None);
        check("trail-2026112T000000Z-00000000000000000007.jsonl", None);
        check("trail-20261120T000000Z-0000000000000000000x.jsonl", None);
        check("current", None);
    }

    #[test]
    fn chunks_hold_whole_lines_and_report_a_torn_end() {
        let text = b"a\nbb\n".repeat(3000);
        let mut torn = text.clone();
        torn.extend_from_slice(b"ccc");
        for (input, tail) in [(&text, None), (&torn, Some(&b"ccc"[..]))] {
            let mut chunks = Chunks::new(&input[..], 4096);
            let mut seen = Vec::new();
            let mut end = None;
            while let Some(c) = chunks.next_chunk().unwrap() {
                match c {
                    Chunk::Lines(offset, lines) => {
                        assert_eq!(offset as usize, seen.len());
                        assert!(lines.ends_with(b"\n"));
                        seen.extend_from_slice(lines);
                    }
                    Chunk::Torn(offset, rest) => end = Some((offset, rest.to_vec())),
                }
            }
            assert_eq!(seen, text);
            assert_eq!(
                end.map(|(o, r)| (o as usize, r)),
                tail.map(|t| (text.len(), t.to_vec()))
            );
        }
    }

    /// The first `seq` of a log file, as tools read it from the name.
    fn first_seq_of(path: &Path) -> Option<u64> {
        LogFile::parse(path).map(|f| f.first_seq)
    }

    #[test]
    fn file_names_round_trip_and_sort() {
        let a = file_name(UNIX_EPOCH + Duration::from_secs(1_795_132_800), 7);
        assert_eq!(a, "trail-20261120T000000Z-00000000000000000007.jsonl");
        assert_eq!(first_seq_of(Path::new(&a)), Some(7));
        let b = file_name(UNIX_EPOCH + Duration::from_secs(1_795_132_801), 10);
        assert!(a < b);
        for bad in [
            "trail-x.jsonl",
            "trail-20261120T000000Z-7.jsonl",
            "trail-20261120T000000Z-00000000000000000007.jsonl.torn-1-2",
        ] {
            assert_eq!(first_seq_of(Path::new(bad)), None, "{bad}");
        }
    }
}
