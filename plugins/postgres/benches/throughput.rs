//! Throughput of the postgres plugin: the release build, loaded through the plugin API, writing distinct
//! realistic records (every other one with a `hash`) in batches to a local PostgreSQL server of its own with
//! `fsync` on (the server's defaults otherwise, but for `max_wal_size`), into the default table with its four
//! indexes. Prints events/s and MB/s of records, and the CPU time per 100k events of the benchmark's process (the
//! plugin, and the test kit lending it records) and of the server's processes; the target is 100,000 events/s.
//! Counts the rows afterwards: every event must be there once.
//!
//! `cargo bench -p trail-sink-postgres` (set `TRAIL_BENCH_EVENTS` to change the number of events per run,
//! 500,000 by default; `TRAIL_BENCH_BATCHES=5000,1000` for other batch sizes; `TRAIL_BENCH_CONNECTIONS=4` for
//! the setting `connections`, 1 by default, which a build older than the setting refuses;
//! `TRAIL_BENCH_PLUGIN=/path/lib….so` to measure another build of the plugin, e.g. an older commit's, for an A/B
//! comparison).

#[path = "../tests/support/server.rs"]
mod server;

use trail_plugin_testkit::{
    Event, Plugin, Profile, TestHost,
    cpu::{Meter, Party, Usage},
    events, scratch, write,
};

use self::server::{Options, Server};

fn main() {
    let total: u64 = std::env::var("TRAIL_BENCH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(500_000);
    let copies = scratch();
    let plugin = match std::env::var_os("TRAIL_BENCH_PLUGIN") {
        Some(library) => Plugin::load(library.as_ref(), copies.path()),
        None => Plugin::build_and_load("trail-sink-postgres", Profile::Release),
    };
    let batches: Vec<usize> = std::env::var("TRAIL_BENCH_BATCHES")
        .map(|b| b.split(',').map(|n| n.parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![5000, 1000, 500]);
    let connections: Option<u64> = std::env::var("TRAIL_BENCH_CONNECTIONS")
        .ok()
        .map(|n| n.parse().expect("TRAIL_BENCH_CONNECTIONS: a number"));
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
    let parties = [
        ("plugin", Party::Own),
        ("server", Party::Tree(server.pid().unwrap())),
    ];
    let mut config = server.sink_config();
    // Only when asked: an older build of the plugin (TRAIL_BENCH_PLUGIN) does not know the setting.
    if let Some(n) = connections {
        config["connections"] = n.into();
    }
    for batch in batches {
        // Distinct records: ids already stored would be skipped, which is cheaper than storing them.
        let warm = fresh(&mut next, 20_000);
        let sent = fresh(&mut next, total);
        let bytes: usize = sent.iter().map(|e| e.line.len()).sum();
        let mut sink = plugin
            .new_sink(&config.to_string(), &TestHost::new("bench"))
            .expect("configuring the sink");
        for chunk in warm.chunks(batch) {
            write(&mut sink, chunk).expect("writing a batch");
        }
        // Read while the sink's connections are open: their server processes are counted only while they live.
        let meter = Meter::start(&parties);
        for chunk in sent.chunks(batch) {
            write(&mut sink, chunk).expect("writing a batch");
        }
        let usage = meter.stop(total);
        let stored: i64 = server
            .admin()
            .query_one(
                "SELECT count(*) FROM trail_events WHERE seq BETWEEN $1 AND $2",
                &[&(sent[0].seq as i64), &(sent.last().unwrap().seq as i64)],
            )
            .unwrap()
            .get(0);
        assert_eq!(stored as u64, total, "rows stored");
        report(batch, connections.unwrap_or(1), bytes, &usage);
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

fn report(batch: usize, connections: u64, bytes: usize, usage: &Usage) {
    let seconds = usage.elapsed.as_secs_f64();
    println!(
        "postgres batches of {batch:>4}, connections {connections}: {} events in {seconds:.2}s: {:>8.0} events/s, {:>5.1} MB/s of records",
        usage.events,
        usage.rate(),
        bytes as f64 / seconds / 1e6
    );
    println!("    {usage}");
}
