//! Test sink plugin `flaky`: fails on purpose, and records like `recorder` otherwise.
//!
//! Configuration (`mark` as for `recorder`, default `flaky`):
//!
//! - `{"path": "…", "fail_times": N}`: the first `N` calls to `write` of each instance fail
//!   with a `RETRYABLE` error without delivering anything; later calls append the records.
//!   The count is kept **in the instance**: a new instance (after a reload or a restart of the
//!   sink) fails `N` times again.
//! - `{"path": "…", "permanent": true, "reject": "SUBSTRING"}`: every record whose stored line
//!   contains `SUBSTRING` is refused with a `PERMANENT` error; the records before it in the
//!   batch are appended and reported as delivered (partial success).
//!
//! Both can be combined: the `fail_times` failures come first.

use std::path::PathBuf;

use serde::Deserialize;
use trail_plugin_api::{Host, Record, Sink, SinkError, WriteError};
use trail_test_plugin_support::{RecordFile, parse_config};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: PathBuf,
    mark: Option<String>,
    #[serde(default)]
    fail_times: u64,
    #[serde(default)]
    permanent: bool,
    reject: Option<String>,
}

struct Flaky {
    file: RecordFile,
    failures_left: u64,
    /// Lines containing this are refused permanently.
    reject: Option<String>,
    host: Host,
}

impl Flaky {
    fn new(config_json: &str, host: Host) -> Result<Self, SinkError> {
        let config: Config = parse_config(config_json)?;
        let reject = match (config.permanent, config.reject) {
            (true, Some(reject)) if !reject.is_empty() => Some(reject),
            (true, _) => {
                return Err(SinkError::config(
                    "config: \"permanent\": true needs \"reject\", the substring of lines to refuse",
                ));
            }
            (false, Some(_)) => {
                return Err(SinkError::config(
                    "config: \"reject\" is only used with \"permanent\": true",
                ));
            }
            (false, None) => None,
        };
        let mark = option_env!("TRAIL_TEST_MARK")
            .map(str::to_owned)
            .or(config.mark)
            .unwrap_or_else(|| "flaky".to_owned());
        Ok(Self {
            file: RecordFile::open(&config.path, mark)?,
            failures_left: config.fail_times,
            reject,
            host,
        })
    }
}

impl Sink for Flaky {
    fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        if self.failures_left > 0 {
            self.failures_left -= 1;
            let message = format!("failing on purpose, {} more to go", self.failures_left);
            self.host.warn(&message);
            return Err(SinkError::retryable(message).into());
        }
        let refused = self
            .reject
            .as_deref()
            .and_then(|reject| batch.iter().position(|record| record.line.contains(reject)));
        match refused {
            None => self.file.append(batch),
            Some(index) => {
                self.file.append(&batch[..index])?;
                let error = SinkError::permanent(format!(
                    "record {} contains the rejected substring",
                    batch[index].seq
                ));
                Err(WriteError::new(index as u64, error))
            }
        }
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.file.sync()
    }

    fn close(&mut self) -> Result<(), SinkError> {
        self.file.sync()
    }
}

trail_plugin_api::export_sink!(
    name: "flaky",
    version: env!("CARGO_PKG_VERSION"),
    new: Flaky::new,
);
