//! Throughput of the webhook plugin: the release build, loaded through the plugin API, posting
//! batches of 500 realistic records to a loopback HTTP server that reads each request and
//! answers 200. Prints events/s and MB/s of request bodies; the target is 100,000 events/s.
//!
//! `cargo bench -p trail-sink-webhook` (set `TRAIL_BENCH_EVENTS` to change the number of events
//! per run, 1,000,000 by default).

#[path = "../tests/support/server.rs"]
mod server;

use std::time::{Duration, Instant};

use trail_plugin_testkit::{Event, Plugin, Profile, TestHost, events, write};

use self::server::Server;

const BATCH: usize = 500;

fn main() {
    let total: usize = std::env::var("TRAIL_BENCH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let plugin = Plugin::build_and_load("trail-sink-webhook", Profile::Release);
    // A pool of distinct records, lent over and over (as the host lends its buffers).
    let pool = events(1..20_001);
    let line_bytes: usize = pool.iter().map(|e| e.line.len()).sum();
    println!(
        "records: {} distinct, {} bytes on average; batches of {BATCH}",
        pool.len(),
        line_bytes / pool.len()
    );

    for (label, extra) in [
        ("json", ""),
        (
            "json, signed",
            r#", "signing_secret": "bench-secret-0123456789abcdef""#,
        ),
    ] {
        let server = Server::counting();
        let config = format!(r#"{{"url": "{}"{extra}}}"#, server.url("/ingest"));
        let mut sink = plugin
            .new_sink(&config, &TestHost::new("bench"))
            .expect("configuring the sink");
        // Warm up: connection, allocations, caches.
        run(&mut sink, &pool, 50_000);
        let (requests_before, bytes_before) = server.totals();
        let started = Instant::now();
        run(&mut sink, &pool, total);
        let elapsed = started.elapsed();
        let (requests, bytes) = server.totals();
        let (requests, bytes) = (requests - requests_before, bytes - bytes_before);
        assert_eq!(requests as usize, total.div_ceil(BATCH), "requests");
        report(label, total, bytes, elapsed);
    }
}

fn run(sink: &mut trail_plugin_api::SinkBox, pool: &[Event], total: usize) {
    let mut sent = 0;
    let mut start = 0;
    while sent < total {
        let n = BATCH.min(total - sent);
        if start + n > pool.len() {
            start = 0;
        }
        write(sink, &pool[start..start + n]).expect("posting a batch");
        start += n;
        sent += n;
    }
}

fn report(label: &str, events: usize, bytes: u64, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    println!(
        "webhook {label:<14} {events} events in {seconds:.2}s: {:>9.0} events/s, {:>6.1} MB/s of bodies",
        events as f64 / seconds,
        bytes as f64 / seconds / 1e6
    );
}
