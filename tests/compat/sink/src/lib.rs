//! `compat`: a sink plugin written against trail-plugin-api 1.0 and nothing newer. It touches
//! every part of the 1.0 contract a daemon relies on: the constructor's configuration and
//! [`Host`] (one log line per level), records' fields, partial success with a permanent error,
//! `flush` and `close`.
//!
//! Configuration: `{"path": "/file", "reject": "substring"}`. Every record is appended to
//! `path` as `{"seq":…,"id":…,"type":…,"line":…,"api":"1.0"}` (`api` being the API version the
//! plugin was built against); a record whose line contains `reject` fails with a permanent
//! error after the records before it were delivered.

use std::{fs::File, io::Write};

use serde_json::{Value, json};
use trail_plugin_api::{API_VERSION, Host, Record, Sink, SinkError, WriteError};

struct Compat {
    out: File,
    reject: Option<String>,
    host: Host,
}

fn new(config_json: &str, host: Host) -> Result<Compat, SinkError> {
    let config: Value = serde_json::from_str(config_json)
        .map_err(|e| SinkError::config(format!("config is not JSON: {e}")))?;
    let path = config["path"]
        .as_str()
        .ok_or_else(|| SinkError::config("\"path\" is missing"))?;
    let out = File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| SinkError::config(format!("cannot open {path}: {e}")))?;
    host.debug("compat sink: debug");
    host.info(&format!(
        "compat sink built against trail-plugin-api {API_VERSION} ready"
    ));
    Ok(Compat {
        out,
        reject: config["reject"].as_str().map(str::to_owned),
        host,
    })
}

impl Sink for Compat {
    fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        for (delivered, record) in batch.iter().enumerate() {
            if let Some(reject) = &self.reject {
                if record.line.contains(reject.as_str()) {
                    self.host
                        .warn(&format!("compat sink: rejecting {}", record.seq));
                    let error = SinkError::permanent(format!("record {} is rejected", record.seq));
                    return Err(WriteError::new(delivered as u64, error));
                }
            }
            let line = json!({
                "seq": record.seq,
                "id": record.id.as_str(),
                "type": record.event_type.as_str(),
                "line": record.line.as_str(),
                "api": API_VERSION.to_string(),
            });
            // One write per line: readers (the tests) never see half a line.
            self.out.write_all(format!("{line}\n").as_bytes()).map_err(|e| {
                WriteError::new(delivered as u64, SinkError::retryable(e.to_string()))
            })?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.out
            .sync_data()
            .map_err(|e| SinkError::retryable(format!("syncing: {e}")))
    }

    fn close(&mut self) -> Result<(), SinkError> {
        self.host.info("compat sink: closing");
        self.flush()
    }
}

trail_plugin_api::export_sink!(
    name: "compat",
    version: env!("CARGO_PKG_VERSION"),
    new: new,
);
