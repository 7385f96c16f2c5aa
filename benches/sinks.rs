//! Sink delivery benchmark (`cargo bench --bench sinks [-- --quick]`).
//!
//! 1. delivery: records already in the spool, delivered by the real sink worker through the plugin ABI to a
//!    no-op plugin; events/s for one sink.
//! 2. fan-out: the release daemon ingesting over 4 connections with no sink and with 4 no-op sinks that each
//!    receive every event; the ratio of the two ingest rates.
//! 3. hot swap: while a client streams events, a new build of the plugin is renamed into `plugins_dir`; the time
//!    from the rename to the new build serving, and the number of acknowledged events not delivered (must be 0).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trail::Config;
use trail::audit::Auditor;
use trail::sinks::Sinks;
use trail_test_kit::load::{self, Load, Plan};
use trail_test_kit::{Build, Daemon, Profile, Setup, install_plugin, workspace};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let libs = build_noop();
    println!(
        "trail sink benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut results = serde_json::Map::new();

    let n = 2_000_000 / scale;
    let rate = delivery(&libs.v1, n, false);
    println!(
        "delivery: {n} stream-only records from the spool's files, one no-op sink: {rate:.0} events/s"
    );
    results.insert("delivery_events_per_s".into(), json!(rate));
    let rate = delivery(&libs.v1, n, true);
    println!(
        "delivery: {n} records also in the log (the spool refers to them), one no-op sink: {rate:.0} events/s"
    );
    results.insert("delivery_from_log_events_per_s".into(), json!(rate));

    for fsync in ["never", "always"] {
        let n = 400_000 / scale;
        // Alternate the two setups and take medians: the machine is shared and noisy.
        let (mut nones, mut fours) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            nones.push(ingest_with_sinks(&libs.v1, 0, n, fsync));
            fours.push(ingest_with_sinks(&libs.v1, 4, n, fsync));
        }
        let runs = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{:.0}k", r / 1e3))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (each_none, each_four) = (runs(&nones), runs(&fours));
        let (none, four) = (median(nones), median(fours));
        println!(
            "fan-out (fsync {fsync}): {n} events over 4 connections, median of 5 alternating runs: no sink {none:.0} events/s, 4 sinks {four:.0} events/s, ratio {:.2} (runs: no sink {each_none}; 4 sinks {each_four})",
            four / none
        );
        results.insert(format!("ingest_no_sink_{fsync}"), json!(none));
        results.insert(format!("ingest_4_sinks_{fsync}"), json!(four));
    }

    let (swap, acked, lost) = hot_swap(&libs);
    println!(
        "hot swap under load: new build serving {:.0} ms after the rename; {acked} events acknowledged, {lost} lost",
        swap.as_secs_f64() * 1e3
    );
    results.insert("hot_swap_ms".into(), json!(swap.as_secs_f64() * 1e3));
    results.insert("hot_swap_lost".into(), json!(lost));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-sinks.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&Value::Object(results)).unwrap(),
    )
    .unwrap();
    println!("results written to {}", out.display());
    assert_eq!(lost, 0, "events were lost during the hot swap");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Libs {
    v1: PathBuf,
    v2: PathBuf,
}

/// Builds the no-op plugin in release mode, twice: as is and marked `noop-v2`.
fn build_noop() -> Libs {
    let build = |mark: Option<&str>, label: &str| {
        Build::new(workspace(), &["trail-bench-noop"])
            .profile(Profile::Release)
            .target_dir(workspace().join("target/bench-plugins"))
            .env("TRAIL_BENCH_MARK", mark)
            .label(label)
            .run()
            .remove(0)
    };
    Libs {
        v1: build(None, "noop-v1"),
        v2: build(Some("noop-v2"), "noop-v2"),
    }
}

fn event_types() -> PathBuf {
    workspace().join("event-types")
}

fn install(dir: &Path, library: &Path) {
    install_plugin(dir, library, "libnoop.so");
}

fn sinks_yaml(count: usize) -> String {
    if count == 0 {
        return String::new();
    }
    let mut y = "plugins_dir: plugins\nsinks:\n".to_string();
    for i in 0..count {
        y.push_str(&format!(
            "  - {{name: noop{i}, plugin: noop, events: {{types: ['*']}}, batch: {{max_events: 1000, max_wait: 5ms}}}}\n"
        ));
    }
    y
}

/// Delivery rate of the real worker from a pre-filled spool to a no-op plugin. With `in_log`, the records are in
/// a log file and the spool only refers to them, as for types that are both saved and streamed: the worker reads
/// them from the log.
fn delivery(library: &Path, n: u64, in_log: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    install(&dir.path().join("plugins"), library);
    let yaml = format!(
        "socket: {{path: s.sock}}\nevent_types: {}\nlog: {{dir: log}}\nspool: {{max_bytes: 4GiB}}\n{}",
        event_types().display(),
        sinks_yaml(1)
    );
    let config = Config::parse(&yaml, Path::new("bench.yaml"), dir.path()).unwrap();
    let (mut writer, spool) = trail::spool::open(&config.spool(), &["noop0".to_string()]).unwrap();
    // Every record is read from the files, except the newest, which are also in memory.
    let log_dir = dir.path().join("log");
    std::fs::create_dir_all(&log_dir).unwrap();
    let mut log = std::io::BufWriter::new(
        std::fs::File::create(log_dir.join("trail-20261123T000000Z-00000000000000000001.jsonl"))
            .unwrap(),
    );
    let mut group = trail::spool::Group::default();
    for seq in 1..=n {
        let mut line = record(seq).into_bytes();
        line.push(b'\n');
        if in_log {
            log.write_all(&line).unwrap();
        }
        group.push(&line, in_log);
        if group.file_len() > (8 << 20) - 1024 || seq == n {
            log.flush().unwrap();
            writer.append(&group).unwrap();
            writer.publish(&mut group);
        }
    }
    let types = vec![HashSet::from(["user_login".to_string()])];
    let started = Instant::now();
    let sinks = Sinks::start(&config, types, spool, Auditor::disabled()).unwrap();
    let delivered = || sinks.status().sinks[0].delivered;
    while delivered() < n {
        std::thread::sleep(Duration::from_millis(1));
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    sinks.stop();
    writer.close();
    rate
}

fn record(seq: u64) -> String {
    format!(
        "{{\"seq\":{seq},\"id\":\"01a20935-a7c6-701e-b4fa-{seq:012}\",\"received_at\":\"2026-11-23T16:20:41.030661233Z\",\
         \"occurred_at\":\"2026-11-23T16:20:41.030661233Z\",\"type\":\"user_login\",\"version\":1,\"severity\":\"info\",\
         \"code\":\"T1000I\",\"source\":{{\"uid\":1000,\"gid\":1000,\"pid\":5569,\"host\":\"bench\"}},\
         \"actor\":{{\"id\":\"u-{}\",\"name\":\"alice\"}},\"outcome\":\"success\",\"message\":\"signed in\",\
         \"payload\":{{\"method\":\"sso\"}}}}",
        seq % 1000
    )
}

/// The release daemon with `sinks` no-op sinks that receive every event.
fn start(sinks: usize, fsync: &'static str, library: &Path) -> Daemon {
    let setup = Setup {
        fsync,
        plugins: if sinks > 0 {
            vec![(library.to_owned(), "libnoop.so".to_owned())]
        } else {
            Vec::new()
        },
        extra_config: sinks_yaml(sinks),
        env: vec![("RUST_LOG".into(), "warn".into())],
        shutdown_grace: None,
        ..Setup::default()
    };
    Daemon::with(Path::new(env!("CARGO_BIN_EXE_traild")), setup)
}

fn status(daemon: &Daemon) -> Value {
    trail::client::admin(&daemon.admin_socket(), &json!({"command": "status"})).unwrap()
}

fn request(i: u64) -> Vec<u8> {
    let mut l = serde_json::to_vec(&json!({
        "type": "user_login", "actor": {"id": format!("u-{}", i % 1000), "name": "alice", "ip": "10.0.0.7"},
        "target": {"type": "project", "id": "p-9", "name": "billing"}, "message": "signed in",
        "outcome": "success", "payload": {"method": "sso", "mfa": true}
    }))
    .unwrap();
    l.push(b'\n');
    l
}

/// Pipelines `n` events over 4 connections; returns acknowledged events per second.
fn ingest(socket: &Path, n: u64) -> f64 {
    let per = n / 4;
    let plan = Plan {
        window: u64::MAX,
        write_bytes: 1 << 20,
        ..Plan::new(4, per * 4)
    };
    let outcome = load::run(socket, &plan, request(0).len(), move |c, i, buf| {
        buf.extend_from_slice(&request(c as u64 * per + i))
    })
    .unwrap();
    assert_eq!(outcome.acked(), per * 4);
    outcome.events_per_sec()
}

fn ingest_with_sinks(library: &Path, sinks: usize, n: u64, fsync: &'static str) -> f64 {
    let mut daemon = start(sinks, fsync, library);
    let rate = ingest(&daemon.socket, n);
    if sinks > 0 {
        // Every sink must get every streamed record of the log, no more (no event lost in the measurement).
        let expected = streamed_in_log(&daemon.log_dir);
        assert_eq!(
            expected.get("user_login"),
            Some(&n),
            "acknowledged events missing from the log"
        );
        let expected: u64 = expected.values().sum();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = status(&daemon);
            let done = s["sinks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|k| k["delivered"].as_u64().unwrap() == expected);
            if done {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sinks did not receive everything: {s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    daemon.stop_cleanly().unwrap();
    rate
}

fn hot_swap(libs: &Libs) -> (Duration, u64, u64) {
    let mut daemon = start(1, "always", &libs.v1);
    // One connection, about 100 events a millisecond, until stopped.
    let plan = Plan {
        events: u64::MAX,
        window: u64::MAX,
        load: Load::Paced(100_000.0),
        tick: Duration::from_millis(1),
        ..Plan::new(1, 0)
    };
    let (stop, acked) = (plan.stop.clone(), plan.acked.clone());
    let client = {
        let socket = daemon.socket.clone();
        std::thread::spawn(move || {
            load::run(&socket, &plan, request(0).len(), |_, i, buf| {
                buf.extend_from_slice(&request(i))
            })
        })
    };
    while acked.load(Ordering::Relaxed) < 20_000 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let renamed = Instant::now();
    install(&daemon.plugins_dir(), &libs.v2);
    let serving = |d: &Daemon| {
        status(d)["sinks"][0]["serving"]
            .as_str()
            .unwrap_or("")
            .contains("noop-v2")
    };
    while !serving(&daemon) {
        assert!(
            renamed.elapsed() < Duration::from_secs(60),
            "the new build never served"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let swap = renamed.elapsed();
    while acked.load(Ordering::Relaxed) < 40_000 {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let acked = client.join().unwrap().unwrap().acked();
    // The sink receives every streamed record of the log: the client's, all acknowledged, and the daemon's own
    // (plugin loaded, reloaded). Anything short of that, or more, is reported.
    let expected = streamed_in_log(&daemon.log_dir);
    assert_eq!(
        expected.get("user_login"),
        Some(&acked),
        "acknowledged events missing from the log"
    );
    let expected: u64 = expected.values().sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered = status(&daemon)["sinks"][0]["delivered"].as_u64().unwrap();
        assert!(
            delivered <= expected,
            "{delivered} delivered, {expected} streamed: duplicates"
        );
        if delivered == expected || Instant::now() > deadline {
            daemon.stop_cleanly().unwrap();
            return (swap, acked, expected - delivered);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How many records of each streamed type the log in `dir` holds.
fn streamed_in_log(dir: &Path) -> std::collections::HashMap<String, u64> {
    let registry = trail::event_types::Registry::load_dir(&event_types()).unwrap();
    let mut counts = std::collections::HashMap::new();
    for file in trail::log::files::list(dir).unwrap() {
        let text = std::fs::read_to_string(&file.path).unwrap();
        for line in text.lines() {
            let ty = trail::record::line::event_type(line.as_bytes());
            if registry.get(ty).is_some_and(|t| t.streamed) {
                *counts.entry(ty.to_owned()).or_insert(0) += 1;
            }
        }
    }
    counts
}
