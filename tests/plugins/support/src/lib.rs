//! Code shared by the test plugins: configuration parsing and the JSON-lines file of received
//! records that tests read back.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::Path,
};

use serde::{Serialize, de::DeserializeOwned};
use trail_plugin_api::{Record, SinkError, WriteError};

/// Parses a sink's JSON configuration, reporting problems as `CONFIG` errors.
pub fn parse_config<T: DeserializeOwned>(config_json: &str) -> Result<T, SinkError> {
    serde_json::from_str(config_json).map_err(|e| SinkError::config(format!("config: {e}")))
}

/// One received record, as a line of the file.
#[derive(Serialize)]
struct Line<'a> {
    mark: &'a str,
    seq: u64,
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
}

/// A file that gets one JSON line per received record:
/// `{"mark":"v1","seq":1,"id":"…","type":"user_login"}`.
pub struct RecordFile {
    out: BufWriter<File>,
    mark: String,
}

impl RecordFile {
    /// Opens `path` for appending (creating it), marking every line with `mark`.
    pub fn open(path: &Path, mark: String) -> Result<Self, SinkError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| SinkError::config(format!("opening {}: {e}", path.display())))?;
        Ok(Self {
            out: BufWriter::new(file),
            mark,
        })
    }

    /// Appends one line per record.
    pub fn append(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        for (delivered, record) in batch.iter().enumerate() {
            let line = Line {
                mark: &self.mark,
                seq: record.seq,
                id: &record.id,
                event_type: &record.event_type,
            };
            serde_json::to_writer(&mut self.out, &line)
                .map_err(std::io::Error::from)
                .and_then(|()| self.out.write_all(b"\n"))
                .map_err(|e| {
                    let error = SinkError::retryable(format!("appending: {e}"));
                    WriteError::new(delivered as u64, error)
                })?;
        }
        Ok(())
    }

    /// Writes out the buffer and `fsync`s the file.
    pub fn sync(&mut self) -> Result<(), SinkError> {
        self.out
            .flush()
            .and_then(|()| self.out.get_ref().sync_all())
            .map_err(|e| SinkError::retryable(format!("syncing: {e}")))
    }
}
