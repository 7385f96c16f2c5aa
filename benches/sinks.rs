//! Sink delivery benchmark (`cargo bench --bench sinks [-- --quick]`).
//!
//! 1. delivery: records already in the spool, delivered by the real sink worker through the plugin ABI to a
//!    no-op plugin; events/s for one sink.
//! 2. fan-out: the release daemon ingesting over 4 connections with no sink and with 4 no-op sinks that each
//!    receive every event; the ratio of the two ingest rates.
//! 3. hot swap: while a client streams events, a new build of the plugin is renamed into `plugins_dir`; the time
//!    from the rename to the new build serving, and the number of acknowledged events not delivered (must be 0).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trail::Config;
use trail::audit::Auditor;
use trail::sinks::Sinks;

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
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target/bench-plugins");
    let staged = target.join("staged");
    std::fs::create_dir_all(&staged).unwrap();
    let build = |mark: Option<&str>, name: &str| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .current_dir(root)
            .env("CARGO_TARGET_DIR", &target)
            .args(["build", "--quiet", "--release", "-p", "trail-bench-noop"]);
        match mark {
            Some(m) => cargo.env("TRAIL_BENCH_MARK", m),
            None => cargo.env_remove("TRAIL_BENCH_MARK"),
        };
        assert!(cargo.status().unwrap().success());
        let to = staged.join(name);
        std::fs::copy(target.join("release/libtrail_bench_noop.so"), &to).unwrap();
        to
    };
    Libs {
        v1: build(None, "v1.so"),
        v2: build(Some("noop-v2"), "v2.so"),
    }
}

fn event_types() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("event-types")
}

fn install(dir: &Path, library: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(".libnoop.so.tmp");
    std::fs::copy(library, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("libnoop.so")).unwrap();
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

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(sinks: usize, fsync: &str, library: &Path) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        if sinks > 0 {
            install(&dir.path().join("plugins"), library);
        }
        let config = dir.path().join("trail.yaml");
        std::fs::write(
            &config,
            format!(
                "socket: {{path: s.sock}}\nevent_types: {}\nlog: {{dir: log, fsync: {fsync}}}\n{}",
                event_types().display(),
                sinks_yaml(sinks)
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_traild"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let d = Daemon { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(d.socket()).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("s.sock")
    }

    fn status(&self) -> Value {
        trail::client::admin(
            &self.dir.path().join("admin.sock"),
            &json!({"command": "status"}),
        )
        .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
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
    let started = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|c| {
            let socket = socket.to_owned();
            std::thread::spawn(move || {
                let stream = UnixStream::connect(&socket).unwrap();
                let mut w = stream.try_clone().unwrap();
                let sender = std::thread::spawn(move || {
                    let mut buf = Vec::with_capacity(1 << 20);
                    for i in 0..per {
                        buf.extend_from_slice(&request(c * per + i));
                        if buf.len() > (1 << 20) - 1024 {
                            w.write_all(&buf).unwrap();
                            buf.clear();
                        }
                    }
                    w.write_all(&buf).unwrap();
                });
                let mut ok = 0;
                for line in BufReader::new(stream).lines().take(per as usize) {
                    assert!(line.unwrap().starts_with("{\"ok\":true"));
                    ok += 1;
                }
                sender.join().unwrap();
                ok
            })
        })
        .collect();
    let acked: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(acked, per * 4);
    acked as f64 / started.elapsed().as_secs_f64()
}

fn ingest_with_sinks(library: &Path, sinks: usize, n: u64, fsync: &str) -> f64 {
    let daemon = Daemon::start(sinks, fsync, library);
    let rate = ingest(&daemon.socket(), n);
    if sinks > 0 {
        // Every sink must get every streamed record of the log, no more (no event lost in the measurement).
        let expected = streamed_in_log(&daemon.dir.path().join("log"));
        assert_eq!(
            expected.get("user_login"),
            Some(&n),
            "acknowledged events missing from the log"
        );
        let expected: u64 = expected.values().sum();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = daemon.status();
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
    rate
}

fn hot_swap(libs: &Libs) -> (Duration, u64, u64) {
    let daemon = Daemon::start(1, "always", &libs.v1);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let client = {
        let (socket, stop, acked) = (daemon.socket(), stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let stream = UnixStream::connect(&socket).unwrap();
            let mut w = stream.try_clone().unwrap();
            let sender = std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mut buf = Vec::new();
                    for _ in 0..100 {
                        buf.extend_from_slice(&request(i));
                        i += 1;
                    }
                    w.write_all(&buf).unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                }
                w.shutdown(std::net::Shutdown::Write).unwrap();
            });
            for line in BufReader::new(stream).lines() {
                assert!(line.unwrap().starts_with("{\"ok\":true"));
                acked.fetch_add(1, Ordering::Relaxed);
            }
            sender.join().unwrap();
        })
    };
    while acked.load(Ordering::Relaxed) < 20_000 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let renamed = Instant::now();
    install(&daemon.dir.path().join("plugins"), &libs.v2);
    let serving = |d: &Daemon| {
        d.status()["sinks"][0]["serving"]
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
    client.join().unwrap();
    let acked = acked.load(Ordering::Relaxed);
    // The sink receives every streamed record of the log: the client's, all acknowledged, and the daemon's own
    // (plugin loaded, reloaded). Anything short of that, or more, is reported.
    let expected = streamed_in_log(&daemon.dir.path().join("log"));
    assert_eq!(
        expected.get("user_login"),
        Some(&acked),
        "acknowledged events missing from the log"
    );
    let expected: u64 = expected.values().sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered = daemon.status()["sinks"][0]["delivered"].as_u64().unwrap();
        assert!(
            delivered <= expected,
            "{delivered} delivered, {expected} streamed: duplicates"
        );
        if delivered == expected || Instant::now() > deadline {
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
