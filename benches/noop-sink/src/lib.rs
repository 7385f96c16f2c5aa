//! Sink plugin `noop`: accepts every record and keeps nothing, so that a benchmark measures trail's delivery path
//! (spool, batching, the plugin ABI) and not a destination. It touches every record's line so the work of handing
//! records over is not optimised away. Its version carries `TRAIL_BENCH_MARK` when built with it, which lets the
//! hot-swap benchmark see which build serves.

use trail_plugin_api::{Host, Record, Sink, SinkError, WriteError};

struct Noop {
    bytes: u64,
}

impl Noop {
    fn new(_config_json: &str, _host: Host) -> Result<Self, SinkError> {
        Ok(Noop { bytes: 0 })
    }
}

impl Sink for Noop {
    fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        for r in batch {
            self.bytes = self.bytes.wrapping_add(r.line.len() as u64 + r.seq);
        }
        std::hint::black_box(self.bytes);
        Ok(())
    }
}

trail_plugin_api::export_sink!(
    name: "noop",
    version: match option_env!("TRAIL_BENCH_MARK") {
        Some(mark) => mark,
        None => env!("CARGO_PKG_VERSION"),
    },
    new: Noop::new,
);
