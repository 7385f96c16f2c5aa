//! Throughput of the nats plugin: the release build, loaded through the plugin API as trail loads it, publishing
//! distinct realistic records (~450 bytes) in batches, each confirmed by JetStream's acknowledgement, to a
//! file-backed stream on a local `nats-server` of its own, and to a 3-replica stream on a 3-node cluster on
//! loopback. Prints events/s for several batch sizes and windows (`max_in_flight`); the targets are 150,000
//! events/s into the single node and 50,000 events/s into the cluster. Counts the stream's messages after each
//! run: every event must be there once. Prints the CPU time each party used per 100k events: the benchmark's
//! process (the plugin, and the test kit lending it records) and each server.
//!
//! `cargo bench -p trail-sink-nats` (set `TRAIL_BENCH_EVENTS` to change the number of events per run, 300,000 by
//! default; `TRAIL_BENCH_ONLY=single` or `cluster` for one setup; `TRAIL_BENCH_RUNS=5000:4096,20000:4096` for
//! other batch sizes and windows; `TRAIL_BENCH_PLUGIN=/path/libtrail_sink_nats.so` to measure another build of
//! the plugin, e.g. an older commit's, for an A/B comparison).

#[path = "../tests/support/server.rs"]
mod server;

use std::time::{Duration, Instant};

use serde_json::json;
use trail_plugin_testkit::{
    Event, Plugin, Profile, TestHost,
    cpu::{Meter, Party},
    events, scratch, write,
};

use self::server::{Cluster, Options, Reader, Server};

fn main() {
    let total: u64 = std::env::var("TRAIL_BENCH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300_000);
    let only = std::env::var("TRAIL_BENCH_ONLY").ok();
    let copies = scratch();
    let plugin = match std::env::var_os("TRAIL_BENCH_PLUGIN") {
        Some(library) => Plugin::load(library.as_ref(), copies.path()),
        None => Plugin::build_and_load("trail-sink-nats", Profile::Release),
    };
    let mut next = 1;
    let runs: Vec<(usize, usize)> = match std::env::var("TRAIL_BENCH_RUNS") {
        Ok(runs) => runs
            .split(',')
            .map(|run| {
                let (batch, window) = run
                    .split_once(':')
                    .expect("TRAIL_BENCH_RUNS: batch:max_in_flight,…");
                (batch.parse().unwrap(), window.parse().unwrap())
            })
            .collect(),
        Err(_) => vec![
            (500, 4096),
            (5000, 4096),
            (20_000, 4096),
            (20_000, 16_384),
            (5000, 256),
        ],
    };
    if only.as_deref() != Some("cluster") {
        let server = Server::start(Options::default());
        let urls = vec![server.url()];
        let parties = [
            ("plugin", Party::Own),
            ("server", Party::Tree(server.pid().unwrap())),
        ];
        for (i, &(batch, window)) in runs.iter().enumerate() {
            let stream = format!("SINGLE{i}");
            run(
                &plugin,
                &urls,
                &parties,
                &stream,
                1,
                (batch, window),
                &mut next,
                total,
                "single node",
            );
        }
    }
    if only.as_deref() != Some("single") {
        let cluster = Cluster::start();
        let urls = cluster.urls();
        let pids: Vec<u32> = cluster.servers.iter().map(|s| s.pid().unwrap()).collect();
        let parties = [
            ("plugin", Party::Own),
            ("server n1", Party::Tree(pids[0])),
            ("n2", Party::Tree(pids[1])),
            ("n3", Party::Tree(pids[2])),
        ];
        for (i, &(batch, window)) in runs.iter().enumerate() {
            let stream = format!("CLUSTER{i}");
            run(
                &plugin,
                &urls,
                &parties,
                &stream,
                3,
                (batch, window),
                &mut next,
                total,
                "3 nodes, R3",
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    plugin: &Plugin,
    urls: &[String],
    parties: &[(&str, Party)],
    stream: &str,
    replicas: usize,
    (batch, window): (usize, usize),
    next: &mut u64,
    total: u64,
    setup: &str,
) {
    let config = json!({
        "servers": urls,
        "subject": format!("{}.{{host}}.{{type}}", stream.to_lowercase()),
        "stream": {"name": stream, "create": true, "replicas": replicas},
        "max_in_flight": window,
        "connect_timeout": "30s",
    });
    let mut sink = plugin
        .new_sink(&config.to_string(), &TestHost::new("bench"))
        .expect("configuring the sink");
    // Connects and creates the stream (a cluster may still be electing its leader: retried).
    let warm = fresh(next, 10_000);
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Err(e) = write(&mut sink, &warm) {
        assert!(Instant::now() < deadline, "warming up: {e}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent = fresh(next, total);
    let meter = Meter::start(parties);
    for chunk in sent.chunks(batch) {
        write(&mut sink, chunk).expect("writing a batch");
    }
    let usage = meter.stop(total);
    sink.close().into_result().unwrap();
    let stored = Reader::connect(urls, None).count(stream).unwrap();
    assert_eq!(stored, total + warm.len() as u64, "messages stored");
    println!(
        "nats {setup:<12} batches of {batch:>6}, max_in_flight {window:>6}: {total} events in {:.2}s: {:>8.0} events/s",
        usage.elapsed.as_secs_f64(),
        usage.rate()
    );
    println!("    {usage}");
}

fn fresh(next: &mut u64, n: u64) -> Vec<Event> {
    let made = events(*next..*next + n);
    *next += n;
    made
}
