//! Throughput of the postgres plugin: the release build, loaded through the plugin API, writing distinct
//! realistic records (every other one with a `hash`) in batches to a local PostgreSQL server of its own with
//! `fsync` on (the server's defaults otherwise, but for `max_wal_size`), into the default table with its four
//! indexes. Prints events/s and MB/s of records; the target is 100,000 events/s. Counts the rows afterwards:
//! every event must be there once.
//!
//! `cargo bench -p trail-sink-postgres` (set `TRAIL_BENCH_EVENTS` to change the number of events per run,
//! 500,000 by default).

#[path = "../tests/support/server.rs"]
mod server;

use std::time::{Duration, Instant};

use trail_plugin_testkit::{Event, Plugin, Profile, TestHost, events, write};

use self::server::{Options, Server};

fn main() {
    let total: u64 = std::env::var("TRAIL_BENCH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(500_000);
    let plugin = Plugin::build_and_load("trail-sink-postgres", Profile::Release);
    let server = Server::start_with(Options {
        durable: true,
        ..Options::default()
    });
    let mut admin = server.admin();
    admin
        .batch_execute("ALTER SYSTEM SET max_wal_size = '4GB'")
        .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    let mut next = 1;
    for batch in [5000, 1000, 500] {
        // Distinct records: ids already stored would be skipped, which is cheaper than storing them.
        let warm = fresh(&mut next, 20_000);
        let sent = fresh(&mut next, total);
        let bytes: usize = sent.iter().map(|e| e.line.len()).sum();
        let mut sink = plugin
            .new_sink(&server.sink_config().to_string(), &TestHost::new("bench"))
            .expect("configuring the sink");
        for chunk in warm.chunks(batch) {
            write(&mut sink, chunk).expect("writing a batch");
        }
        let started = Instant::now();
        for chunk in sent.chunks(batch) {
            write(&mut sink, chunk).expect("writing a batch");
        }
        let elapsed = started.elapsed();
        let stored: i64 = server
            .admin()
            .query_one(
                "SELECT count(*) FROM trail_events WHERE seq BETWEEN $1 AND $2",
                &[&(sent[0].seq as i64), &(sent.last().unwrap().seq as i64)],
            )
            .unwrap()
            .get(0);
        assert_eq!(stored as u64, total, "rows stored");
        report(batch, total, bytes, elapsed);
    }
}

/// `n` events after the last ones made, every other one with a hash, as saved records have.
fn fresh(next: &mut u64, n: u64) -> Vec<Event> {
    let mut made = events(*next..*next + n);
    *next += n;
    for e in &mut made {
        if e.seq % 2 == 0 {
            e.line.pop();
            e.line.push_str(&format!(r#","hash":"{:064x}"}}"#, e.seq));
        }
    }
    made
}

fn report(batch: usize, events: u64, bytes: usize, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    println!(
        "postgres batches of {batch:>4}: {events} events in {seconds:.2}s: {:>8.0} events/s, {:>5.1} MB/s of records",
        events as f64 / seconds,
        bytes as f64 / seconds / 1e6
    );
}
