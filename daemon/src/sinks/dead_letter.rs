//! The dead-letter file format: `spool/dead/<sink>.jsonl`, records a sink's plugin refused permanently.
//!
//! Owns the line format, writing a letter (durably), reading the letters back for a replay, and keeping the
//! letters a stopped replay did not attempt. One letter per line, its fields in this order:
//! `{"sink":…,"dead_at":"<RFC 3339, the daemon's clock>","error_kind":"permanent" or "config","error":…,"seq":…,`
//! `"record":{…}}`, `record` being the stored record's bytes as the spool holds them. A replay first renames the file aside
//! (`<sink>.replay-<ms>.jsonl`), so letters written meanwhile go to a new file.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use trail_plugin_api::SinkError;

use crate::spool::Entry;

/// The dead-letter files of one sink.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    dir: PathBuf,
    sink: String,
}

/// The fields of a letter before its record, in the order written.
#[derive(Serialize)]
struct Head<'a> {
    sink: &'a str,
    dead_at: String,
    error_kind: String,
    error: &'a str,
    seq: u64,
}

/// What a replay reads back from a letter.
#[derive(Deserialize)]
struct Letter {
    seq: u64,
    record: Box<serde_json::value::RawValue>,
}

impl DeadLetters {
    /// The dead-letter files of `sink` in `dir` (created when the first letter is written).
    pub fn new(dir: PathBuf, sink: &str) -> DeadLetters {
        DeadLetters {
            dir,
            sink: sink.to_owned(),
        }
    }

    /// The file letters are appended to.
    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.jsonl", self.sink))
    }

    /// Where a replay started at `ms` (since the epoch) moves the letters it sends.
    pub fn replaying_path(&self, ms: u64) -> PathBuf {
        self.dir.join(format!("{}.replay-{ms}.jsonl", self.sink))
    }

    /// Appends `entry` and the error that refused it, and syncs the file.
    pub fn append(&self, entry: &Entry, error: &SinkError) -> std::io::Result<()> {
        crate::modes::create_dir_all(&self.dir)?;
        let mut at = Vec::new();
        crate::record::write_rfc3339(&mut at, crate::clock::now());
        let head = Head {
            sink: &self.sink,
            dead_at: String::from_utf8(at).unwrap_or_default(),
            error_kind: error.kind.to_string(),
            error: error.message.as_str(),
            seq: entry.seq,
        };
        let mut line = Vec::with_capacity(entry.line().len() + 256);
        serde_json::to_writer(&mut line, &head).map_err(std::io::Error::other)?;
        line.pop();
        line.extend_from_slice(b",\"record\":");
        line.extend_from_slice(entry.line().as_bytes());
        line.extend_from_slice(b"}\n");
        let mut file = crate::modes::append(&self.path())?;
        file.write_all(&line)?;
        file.sync_data()
    }
}

/// The letters in `path` as spool entries (their records, with their `seq`), in file order.
pub fn read(path: &Path) -> std::io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for line in BufReader::new(File::open(path)?).lines() {
        let letter: Letter = serde_json::from_str(&line?).map_err(std::io::Error::other)?;
        entries.push(Entry::new(letter.seq, 0, letter.record.get()));
    }
    Ok(entries)
}

/// Appends the letters of `replaying` after the first `done` to the dead-letter file `path`, and syncs it.
pub fn keep_unreplayed(replaying: &Path, done: usize, path: &Path) -> std::io::Result<()> {
    let mut out = crate::modes::append(path)?;
    for line in BufReader::new(File::open(replaying)?).lines().skip(done) {
        out.write_all(line?.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_replay_keeps_what_it_did_not_attempt_after_what_failed_again() {
        let dir = tempfile::tempdir().unwrap();
        let (replaying, dead) = (
            dir.path().join("s.replay-1.jsonl"),
            dir.path().join("s.jsonl"),
        );
        let letter =
            |seq: u64| format!("{{\"seq\":{seq},\"record\":{{\"seq\":{seq}}},\"error\":\"e\"}}\n");
        std::fs::write(&replaying, (1..=4).map(letter).collect::<String>()).unwrap();
        // Seq 1 failed again during the replay and went back to the dead-letter file; 1 and 2 were attempted.
        std::fs::write(&dead, letter(1)).unwrap();
        keep_unreplayed(&replaying, 2, &dead).unwrap();
        let seqs: Vec<u64> = read(&dead).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 3, 4]);
    }

    #[test]
    fn a_letter_is_its_head_then_the_record_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        let letters = DeadLetters::new(dir.path().join("dead"), "s");
        let record = r#"{"seq":7,"id":"x","type":"t","payload":{"a":1}}"#;
        let error = SinkError::permanent("no such table");
        letters.append(&Entry::new(7, 0, record), &error).unwrap();
        let text = std::fs::read_to_string(letters.path()).unwrap();
        let (head, rest) = text.split_once(",\"dead_at\":\"").unwrap();
        assert_eq!(head, r#"{"sink":"s""#);
        let (_, rest) = rest.split_once('"').unwrap();
        assert_eq!(
            rest,
            format!(
                ",\"error_kind\":\"permanent\",\"error\":\"no such table\",\"seq\":7,\"record\":{record}}}\n"
            )
        );
        let read: Vec<(u64, String)> = read(&letters.path())
            .unwrap()
            .iter()
            .map(|e| (e.seq, e.line().to_owned()))
            .collect();
        assert_eq!(read, [(7, record.to_owned())]);
    }
}
