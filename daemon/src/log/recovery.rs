//! Recovery of the log directory at start: the torn tail of the newest file, its last line, the chain head.
//!
//! A crash can leave the newest file ending in a torn line; [`recover`] cuts it after copying it aside, and
//! refuses to cut more than a crash can leave behind. [`chain_head`] finds where the hash chain stands when the
//! newest file holds no record. Used by the journal (the log) and the spool (its segments have the same layout).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::warn;

use super::{chain, checkpoint, files, index};

/// The most a recovery may cut off the end of a file before it refuses to guess.
const MAX_RECOVERY_CUT: u64 = 64 << 20;

/// A log that cannot be opened or recovered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a log file or directory failed.
    #[error("log {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The end of the newest file is damaged beyond what a crash can leave behind.
    #[error(
        "log {path}: the last {bytes} bytes are not trail records; a crash cannot leave that much behind, so trail will not cut it off: move the file aside or repair it"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// How much is damaged.
        bytes: u64,
    },
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The chain head and last `seq` from before `files` ended: the last record of the newest file that holds one, else
/// the newest checkpoint, else the genesis value. Only records below `below` count.
pub(crate) fn chain_head(
    dir: &Path,
    files: &[files::LogFile],
    below: u64,
) -> (chain::Hash, Option<u64>) {
    for f in files.iter().rev() {
        match index::summary(f) {
            Ok(entry) => {
                if let (Some(seq), Some(hash)) = (entry.last_seq, entry.last_hash) {
                    if seq < below
                        && let Some(h) = chain::parse_hex(hash.as_bytes())
                    {
                        return (h, Some(seq));
                    }
                    break;
                }
            }
            Err(e) => {
                warn!(file = %f.path.display(), error = %e, "cannot read the end of a log file");
                break;
            }
        }
    }
    for path in checkpoint::list(dir).iter().rev() {
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        if let Ok(cp) = checkpoint::Checkpoint::parse(&bytes)
            && let Some(h) = chain::parse_hex(cp.body.hash.as_bytes())
            && cp.body.seq.is_none_or(|s| s < below)
        {
            return (h, cp.body.seq);
        }
    }
    (chain::GENESIS, None)
}

/// Cuts whatever follows the last complete record of `path` (a crash can leave a torn line), keeping the cut bytes
/// in a side file. Returns the new length and the last record's head.
pub(crate) fn recover(path: &Path) -> Result<(u64, Option<crate::record::line::Head>), Error> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error(path))?;
    let size = file.metadata().map_err(io_error(path))?.len();
    let mut end = size;
    let mut last_seq = None;
    while end > 0 {
        let (start, line) = last_line(&mut file, end).map_err(io_error(path))?;
        let complete = line.last() == Some(&b'\n');
        if complete && let Some(head) = crate::record::line::parse_head(&line[..line.len() - 1]) {
            last_seq = Some(head);
            break;
        }
        end = start;
        if size - end > MAX_RECOVERY_CUT {
            return Err(Error::Damaged {
                path: path.to_owned(),
                bytes: size - end,
            });
        }
    }
    if end < size {
        let mut cut = vec![0; (size - end) as usize];
        file.seek(SeekFrom::Start(end)).map_err(io_error(path))?;
        file.read_exact(&mut cut).map_err(io_error(path))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let aside = path.with_extension(format!("jsonl.torn-{end}-{nanos}"));
        crate::modes::write(&aside, &cut).map_err(io_error(&aside))?;
        file.set_len(end).map_err(io_error(path))?;
        file.sync_all().map_err(io_error(path))?;
        warn!(
            file = %path.display(),
            offset = end,
            bytes = size - end,
            kept_in = %aside.display(),
            "cut off a torn last line left by a crash"
        );
    }
    Ok((end, last_seq))
}

/// The last line of `file[..end]` (with its newline, if it has one) and where it starts.
pub(crate) fn last_line(file: &mut File, end: u64) -> std::io::Result<(u64, Vec<u8>)> {
    const CHUNK: u64 = 64 << 10;
    let mut line: Vec<u8> = Vec::new();
    let mut pos = end;
    // The line's own final newline, if any, is not its start.
    let mut skip_last = true;
    while pos > 0 {
        let from = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0; (pos - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        let search = if skip_last && chunk.last() == Some(&b'\n') {
            &chunk[..chunk.len() - 1]
        } else {
            &chunk[..]
        };
        skip_last = false;
        if let Some(i) = memchr::memrchr(b'\n', search) {
            chunk.drain(..=i);
            chunk.extend_from_slice(&line);
            return Ok((from + i as u64 + 1, chunk));
        }
        chunk.extend_from_slice(&line);
        line = chunk;
        pos = from;
    }
    Ok((0, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> String {
        format!("{{\"seq\":{seq},\"id\":\"i{seq}\"}}\n")
    }

    /// Writes `content` to a log file, recovers it, and returns (new content, last seq, side files).
    fn recovered(content: &[u8]) -> (Vec<u8>, Option<u64>, usize) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(files::file_name(UNIX_EPOCH, 1));
        std::fs::write(&path, content).unwrap();
        let (len, head) = recover(&path).unwrap();
        let seq = head.map(|h| h.seq);
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after.len() as u64, len);
        let sides = std::fs::read_dir(dir.path()).unwrap().count() - 1;
        (after, seq, sides)
    }

    #[test]
    fn recovery() {
        let three = format!("{}{}{}", record(1), record(2), record(3));
        let check = |content: &[u8], kept: &[u8], seq: Option<u64>, sides: usize| {
            assert_eq!(
                recovered(content),
                (kept.to_vec(), seq, sides),
                "{content:?}"
            );
        };
        check(b"", b"", None, 0);
        check(three.as_bytes(), three.as_bytes(), Some(3), 0);
        check(
            format!("{three}{{\"seq\":4,\"id").as_bytes(),
            three.as_bytes(),
            Some(3),
            1,
        );
        check(
            format!("{three}\0\0\0").as_bytes(),
            three.as_bytes(),
            Some(3),
            1,
        );
        check(
            format!("{three}garbage\n").as_bytes(),
            three.as_bytes(),
            Some(3),
            1,
        );
        check(b"{\"seq\":1,\"i", b"", None, 1);
        let long = format!("{}{}", record(1), record(2)).replace("i2", &"x".repeat(200_000));
        check(long.as_bytes(), long.as_bytes(), Some(2), 0);
        check(format!("{long}{{").as_bytes(), long.as_bytes(), Some(2), 1);
    }
}
