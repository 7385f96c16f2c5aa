//! Test sink plugin `recorder`: appends one JSON line per record to a file and `fsync`s it on
//! flush.
//!
//! Configuration: `{"path": "/tmp/x/received.jsonl", "mark": "v1"}`. Each line is
//! `{"mark":"v1","seq":N,"id":"…","type":"…"}`. `mark` (default `recorder`) tells tests which
//! build or which sink wrote a line; building with the environment variable `TRAIL_TEST_MARK`
//! set overrides it at compile time, so a test can build two differently-marked libraries and
//! see which one served a record across a hot reload.

use std::path::PathBuf;

use serde::Deserialize;
use trail_plugin_api::{Host, Record, Sink, SinkError, WriteError};
use trail_test_plugin_support::{RecordFile, parse_config};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: PathBuf,
    mark: Option<String>,
}

struct Recorder {
    file: RecordFile,
}

impl Recorder {
    fn new(config_json: &str, host: Host) -> Result<Self, SinkError> {
        let config: Config = parse_config(config_json)?;
        let mark = match option_env!("TRAIL_TEST_MARK") {
            Some(mark) => mark.to_owned(),
            None => config.mark.unwrap_or_else(|| "recorder".to_owned()),
        };
        host.info(&format!(
            "recording to {} with mark {mark}",
            config.path.display()
        ));
        let file = RecordFile::open(&config.path, mark)?;
        Ok(Self { file })
    }
}

impl Sink for Recorder {
    fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        self.file.append(batch)
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.file.sync()
    }

    fn close(&mut self) -> Result<(), SinkError> {
        self.file.sync()
    }
}

trail_plugin_api::export_sink!(
    name: "recorder",
    version: env!("CARGO_PKG_VERSION"),
    new: Recorder::new,
);
