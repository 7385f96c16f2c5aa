//! `line-file`: a trail sink plugin that appends each audit event's stored JSON line to a
//! file, optionally behind a fixed prefix. See README.md.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, ErrorKind, Write},
    path::PathBuf,
};

use serde::Deserialize;
use trail_plugin_api::{Host, Record, Sink, SinkError, WriteError};

/// The sink's `config` section in trail.yaml.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The file to append to; created if missing.
    path: PathBuf,
    /// Written before each line, e.g. `"audit: "`.
    #[serde(default)]
    prefix: String,
    /// Whether `flush` also `fsync`s the file (default true).
    #[serde(default = "yes")]
    fsync: bool,
}

fn yes() -> bool {
    true
}

struct LineFile {
    out: BufWriter<File>,
    config: Config,
    host: Host,
}

impl LineFile {
    fn new(config_json: &str, host: Host) -> Result<Self, SinkError> {
        let config: Config = serde_json::from_str(config_json).map_err(|e| {
            SinkError::config(format!(
                "{e}: expected {{\"path\": \"/file/to/append/to\", \"prefix\": \"…\"}}"
            ))
        })?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.path)
            .map_err(|e| {
                let message = format!("cannot open {}: {e}", config.path.display());
                match e.kind() {
                    // The user has to fix something: say what.
                    ErrorKind::NotFound | ErrorKind::PermissionDenied => SinkError::config(
                        format!("{message}: check \"path\" and that trail may write there"),
                    ),
                    // Anything else may go away (a full disk, a file system not mounted yet):
                    // trail retries later.
                    _ => SinkError::retryable(message),
                }
            })?;
        host.info(&format!("appending to {}", config.path.display()));
        Ok(Self {
            out: BufWriter::new(file),
            config,
            host,
        })
    }
}

impl Sink for LineFile {
    fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        for (delivered, record) in batch.iter().enumerate() {
            let written = self
                .out
                .write_all(self.config.prefix.as_bytes())
                .and_then(|()| self.out.write_all(record.line.as_bytes()))
                .and_then(|()| self.out.write_all(b"\n"));
            if let Err(e) = written {
                let message = format!("writing to {}: {e}", self.config.path.display());
                self.host.warn(&message);
                // Records before this one are in the buffer; retrying may duplicate a partial
                // line, which is acceptable for an append-only text file.
                return Err(WriteError::new(
                    delivered as u64,
                    SinkError::retryable(message),
                ));
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.out
            .flush()
            .and_then(|()| {
                if self.config.fsync {
                    self.out.get_ref().sync_data()
                } else {
                    Ok(())
                }
            })
            .map_err(|e| {
                SinkError::retryable(format!("flushing {}: {e}", self.config.path.display()))
            })
    }

    fn close(&mut self) -> Result<(), SinkError> {
        self.host.debug("closing");
        self.flush()
    }
}

trail_plugin_api::export_sink!(
    name: "line-file",
    version: env!("CARGO_PKG_VERSION"),
    new: LineFile::new,
);
