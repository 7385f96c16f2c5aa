//! Test sink plugin `panicker`: panics where its configuration says, to check that a panic in
//! a plugin comes back to the host as an error instead of ending the process.
//!
//! Configuration: `{"panic_in": "new"}`, `"write"`, `"flush"` or `"close"` (required).

use serde::Deserialize;
use trail_plugin_api::{Host, Record, Sink, SinkError, WriteError};
use trail_test_plugin_support::parse_config;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    panic_in: Where,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Where {
    New,
    Write,
    Flush,
    Close,
}

struct Panicker {
    panic_in: Where,
}

impl Panicker {
    fn new(config_json: &str, _host: Host) -> Result<Self, SinkError> {
        let Config { panic_in } = parse_config(config_json)?;
        if panic_in == Where::New {
            panic!("panicking in new, as configured");
        }
        Ok(Self { panic_in })
    }
}

impl Sink for Panicker {
    fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        if self.panic_in == Where::Write {
            let seq = batch.first().map(|record| record.seq);
            panic!("panicking in write, as configured (first seq {seq:?})");
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        if self.panic_in == Where::Flush {
            panic!("panicking in flush, as configured");
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), SinkError> {
        if self.panic_in == Where::Close {
            panic!("panicking in close, as configured");
        }
        Ok(())
    }
}

trail_plugin_api::export_sink!(
    name: "panicker",
    version: env!("CARGO_PKG_VERSION"),
    new: Panicker::new,
);
