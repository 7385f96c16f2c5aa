//! The evidence benchmark: hash-chain overhead on ingest, search and verify over about 1 GiB of logs.
//!
//! `cargo bench --bench evidence` generates (once, into `target/bench-evidence/`) about 3 million records over 30
//! days in daily files, sealed into one hash chain with the library's own chain code, with sidecar indexes as the
//! daemon's upkeep writes them; then measures:
//!
//! - search for one hour out of the month (first run in a fresh process, then warm), in-process and through the
//!   `trail` binary;
//! - a full scan for a rare actor id (MB/s of records);
//! - `verify` over everything (MB/s), the chain and the Merkle tree;
//! - `trail prove` of one record against a checkpoint over all of them (the tree cache is built once, with the
//!   daemon's code, beside the generated log);
//! - the cost of sealing a record into the chain, and the ingest rate of the real daemon (release `traild`,
//!   `fsync: always`, 4 pipelining clients), giving the share of ingest time spent hashing.
//!
//! Set `TRAIL_BENCH_EVENTS` to change the size (default 3,000,000), and `TRAIL_BENCH_BASELINE_TRAILD` to a
//! `traild` built without the hash chain to add an alternating A/B ingest comparison.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use trail::log::{chain, checkpoint, files, index, tree};
use trail::tools::{prove, search, verify};
use trail_test_kit::load::{self, Plan};
use trail_test_kit::{Daemon, Setup};

const DAYS: u64 = 30;
const START: u64 = 1_793_491_200; // 2026-11-01T00:00:00Z

fn main() {
    let events: u64 = std::env::var("TRAIL_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000_000);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench-evidence")
        .join(format!("log-{events}"));
    // The marker names the chain's definition: data sealed under another one is generated again.
    let done = dir.join("done-chain-v2");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let t = Instant::now();
        generate(&dir, events);
        println!("generated {events} records in {:.1?}", t.elapsed());
    }
    // The tree cache and a checkpoint over every record, as the daemon's checkpoint at stop leaves them.
    if !dir.join("done-tree").exists() {
        let t = Instant::now();
        seal_tree(&dir);
        println!(
            "tree cache and a checkpoint over {events} records in {:.1?}",
            t.elapsed()
        );
    }
    let total: u64 = files::list(&dir)
        .unwrap()
        .iter()
        .map(|f| std::fs::metadata(&f.path).unwrap().len())
        .sum();
    println!(
        "log: {} files, {:.1} MiB, {events} records over {DAYS} days",
        files::list(&dir).unwrap().len(),
        total as f64 / (1 << 20) as f64
    );

    // One hour out of the month: day 15, 10:00 to 11:00.
    let from = UNIX_EPOCH + Duration::from_secs(START + 14 * 86_400 + 10 * 3_600);
    let hour = search::Query {
        from: Some(files::stamp(from)),
        to: Some(files::stamp(from + Duration::from_secs(3_600))),
        newest_first: true,
        ..Default::default()
    };
    for run in ["first", "warm", "warm"] {
        let t = Instant::now();
        let mut n = 0;
        let stats = search::search(&dir, &hour, &mut |_| {
            n += 1;
            true
        })
        .unwrap();
        println!(
            "search one hour ({run}, in-process): {n} records in {:.1?}; {} of {} files opened, {:.1} MiB read",
            t.elapsed(),
            stats.files_read,
            stats.files,
            stats.bytes_read as f64 / (1 << 20) as f64
        );
    }
    let trail_bin = env!("CARGO_BIN_EXE_trail");
    let from_text = chrono::DateTime::<chrono::Utc>::from(from).to_rfc3339();
    let to_text =
        chrono::DateTime::<chrono::Utc>::from(from + Duration::from_secs(3_600)).to_rfc3339();
    for run in ["CLI", "CLI"] {
        let t = Instant::now();
        let out = std::process::Command::new(trail_bin)
            .args([
                "search",
                "--dir",
                dir.to_str().unwrap(),
                "--from",
                &from_text,
                "--to",
                &to_text,
            ])
            .output()
            .unwrap();
        let lines = out.stdout.iter().filter(|&&b| b == b'\n').count();
        println!(
            "search one hour ({run}: trail search --from {from_text} --to {to_text} > file): {lines} records in {:.1?}",
            t.elapsed()
        );
    }

    let rare = search::Query {
        actor: Some("u-rare".into()),
        newest_first: true,
        ..Default::default()
    };
    for run in ["first", "warm"] {
        let t = Instant::now();
        let mut n = 0;
        let stats = search::search(&dir, &rare, &mut |_| {
            n += 1;
            true
        })
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "full scan for a rare actor ({run}): {n} records in {:.2}s, {:.0} MB/s of records",
            secs,
            stats.bytes_read as f64 / 1e6 / secs
        );
    }

    let t = Instant::now();
    let inputs = verify::Inputs::gather(std::slice::from_ref(&dir)).unwrap();
    let report = verify::verify(&inputs, None).unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(
        report.intact(),
        "{:?}",
        &report.problems[..report.problems.len().min(5)]
    );
    println!(
        "verify: {} records, {:.0} MB in {secs:.2}s: {:.0} MB/s",
        report.records,
        report.bytes as f64 / 1e6,
        report.bytes as f64 / 1e6 / secs
    );

    // trail prove: one record's inclusion proof against the checkpoint over all of them (in-process, then the
    // command with its process start, output to a file).
    for seq in [1, events / 2 + 1, events] {
        let t = Instant::now();
        let bundle = prove::prove(&dir, seq, None).unwrap();
        let took = t.elapsed();
        let prove::Bundle::Inclusion { proof, .. } = &bundle else {
            panic!("an inclusion bundle")
        };
        println!(
            "prove seq {seq} (in-process): {:.1?}, {} hashes",
            took,
            proof.len()
        );
    }
    for seq in [events / 3, events] {
        let t = Instant::now();
        let out = std::process::Command::new(trail_bin)
            .args(["prove", &seq.to_string(), "--dir", dir.to_str().unwrap()])
            .output()
            .unwrap();
        let took = t.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "prove seq {seq} (CLI: trail prove {seq} --dir … > file): {:.1?}, {} bytes",
            took,
            out.stdout.len()
        );
    }

    hashing_overhead();
}

/// Builds the tree cache of the log in `dir` with the daemon's own code and writes one checkpoint (with its tree
/// and note) over every record, signed by a key kept beside the log directory.
fn seal_tree(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir.join(tree::DIR));
    let _ = std::fs::remove_dir_all(dir.join(checkpoint::DIR));
    let key = dir.with_extension("pem");
    let signer = checkpoint::Signer::load_or_generate(&key).unwrap();
    let entries: Vec<checkpoint::FileEntry> = files::list(dir)
        .unwrap()
        .iter()
        .map(|f| index::summary(f).unwrap())
        .collect();
    let last = entries.last().unwrap().clone();
    let body = checkpoint::Body {
        checkpoint: checkpoint::FORMAT,
        created_at: "2026-12-01T00:00:00.000000000Z".into(),
        reason: "stop".into(),
        seq: last.last_seq,
        hash: last.last_hash.unwrap(),
        files: entries,
        tree_size: None,
        tree_root: None,
        key: signer.public_hex(),
    };
    let cache = tree::Keeper::new(dir, None);
    let (_, failed) = checkpoint::write_with_tree(dir, &signer, Some(&cache), body)
        .unwrap()
        .unwrap();
    assert!(failed.is_none(), "{failed:?}");
    std::fs::write(dir.join("done-tree"), b"").unwrap();
}

/// Writes `events` records over [`DAYS`] days into daily files, sealed into one chain, with indexes.
fn generate(dir: &Path, events: u64) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let types = [
        "user_login",
        "user_logout",
        "project_deleted",
        "role_granted",
        "config_changed",
        "data_exported",
    ];
    let outcomes = ["success", "success", "success", "failure", "denied"];
    let step = DAYS * 86_400 * 1_000_000_000 / events;
    let mut chain_head = chain::GENESIS;
    let mut out = Vec::with_capacity(64 << 20);
    let mut day = u64::MAX;
    let mut file: Option<std::fs::File> = None;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut paths = Vec::new();
    for seq in 1..=events {
        let nanos = START * 1_000_000_000 + (seq - 1) * step;
        let t = UNIX_EPOCH + Duration::from_nanos(nanos);
        if nanos / 86_400_000_000_000 != day {
            day = nanos / 86_400_000_000_000;
            if let Some(mut f) = file.take() {
                f.write_all(&out).unwrap();
                out.clear();
            }
            let path = dir.join(files::file_name(t, seq));
            paths.push(path.clone());
            file = Some(std::fs::File::create(path).unwrap());
        }
        let r = next();
        let start = out.len();
        let actor = if seq % 300_000 == 7 {
            "u-rare".to_string()
        } else {
            format!("u-{}", r % 5_000)
        };
        write!(
            out,
            "{{\"seq\":{seq},\"id\":\"{:08x}-{:04x}-7{:03x}-8{:03x}-{:012x}\",\"received_at\":\"",
            r >> 32,
            r & 0xffff,
            (r >> 16) & 0xfff,
            (r >> 28) & 0xfff,
            seq
        )
        .unwrap();
        trail::record::write_rfc3339(&mut out, t);
        out.extend_from_slice(b"\",\"occurred_at\":\"");
        trail::record::write_rfc3339(&mut out, t);
        let ty = types[(r % 6) as usize];
        write!(
            out,
            "\",\"type\":\"{ty}\",\"version\":1,\"severity\":\"info\",\"source\":{{\"uid\":{},\"gid\":1000,\"pid\":{},\"host\":\"app-{}.example\"}},\"actor\":{{\"id\":\"{actor}\",\"name\":\"user {}\",\"type\":\"user\",\"ip\":\"10.0.{}.{}\"}},\"target\":{{\"type\":\"project\",\"id\":\"p-{}\"}},\"outcome\":\"{}\",\"message\":\"{ty} by {actor} on p-{}\",\"payload\":{{\"method\":\"sso\",\"request_id\":\"{:016x}\"}}",
            1000 + r % 20,
            1000 + (r >> 8) % 30_000,
            r % 8,
            r % 5_000,
            (r >> 12) % 256,
            (r >> 20) % 256,
            (r >> 24) % 900,
            outcomes[((r >> 40) % 5) as usize],
            (r >> 24) % 900,
            r.rotate_left(17)
        )
        .unwrap();
        chain_head = chain::seal(&chain_head, &mut out, start);
        out.push(b'\n');
        if out.len() > 32 << 20 {
            file.as_mut().unwrap().write_all(&out).unwrap();
            out.clear();
        }
    }
    file.unwrap().write_all(&out).unwrap();
    // Closed files get indexes from the daemon's upkeep; the newest is the one being written.
    for f in &files::list(dir).unwrap()[..paths.len() - 1] {
        index::get(f, true).unwrap();
    }
    std::fs::write(dir.join("done-chain-v2"), b"").unwrap();
}

/// Sealing cost per record, and the ingest rate of the real daemon.
fn hashing_overhead() {
    let sample = br#"{"seq":123456,"id":"019ab7c4-1234-7abc-8def-0123456789ab","received_at":"2026-11-20T10:00:00.123456789Z","occurred_at":"2026-11-20T10:00:00.123456789Z","type":"user_login","version":1,"severity":"info","code":"T1000I","source":{"uid":1000,"gid":1000,"pid":4242,"host":"app-1.example"},"actor":{"id":"u-42","name":"alice"},"outcome":"success","message":"bench","payload":{"method":"sso"}"#;
    let n = 2_000_000;
    let mut out = Vec::with_capacity(512);
    let mut head = chain::GENESIS;
    let t = Instant::now();
    for _ in 0..n {
        out.clear();
        out.extend_from_slice(sample);
        head = chain::seal(&head, &mut out, 0);
    }
    let per_record = t.elapsed().as_secs_f64() / n as f64;
    std::hint::black_box(head);
    println!(
        "sealing a {}-byte record into the chain: {:.0} ns",
        sample.len(),
        per_record * 1e9
    );
    let ours = Path::new(env!("CARGO_BIN_EXE_traild"));
    let rate = daemon_ingest_rate(ours);
    println!(
        "daemon ingest (release traild, fsync: always, 4 clients x 50,000 pipelined events): {rate:.0} events/s; \
         hashing is {:.1}% of that time (an upper bound on what removing it could gain)",
        rate * per_record * 100.0
    );
    // An A/B comparison against a daemon built without the chain, when one is given.
    if let Some(baseline) = std::env::var_os("TRAIL_BENCH_BASELINE_TRAILD") {
        let baseline = PathBuf::from(baseline);
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            without.push(daemon_ingest_rate(&baseline));
            with.push(daemon_ingest_rate(ours));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (w, wo) = (median(&mut with), median(&mut without));
        println!(
            "ingest A/B, alternating, median of 3: without chain {wo:.0} events/s, with chain {w:.0} events/s: \
             {:.1}% slower (runs: without {without:.0?}, with {with:.0?})",
            (1.0 - w / wo) * 100.0
        );
    }
}

fn daemon_ingest_rate(traild: &Path) -> f64 {
    let setup = Setup {
        env: vec![("RUST_LOG".into(), "warn".into())],
        shutdown_grace: None,
        ..Setup::default()
    };
    let mut daemon = Daemon::with(traild, setup);
    // 4 pipelining clients, 50,000 events each, writes of about 64 KiB, no window.
    let plan = Plan {
        window: u64::MAX,
        ..Plan::new(4, 200_000)
    };
    let line = |c: usize, i: u64, buf: &mut Vec<u8>| {
        writeln!(
            buf,
            r#"{{"type":"user_login","actor":{{"id":"u-{c}","name":"alice"}},"outcome":"success","message":"bench {i}","payload":{{"method":"sso"}}}}"#
        )
        .unwrap()
    };
    let mut probe = Vec::new();
    line(0, 99_999, &mut probe);
    let outcome = load::run(&daemon.socket, &plan, probe.len(), line).unwrap();
    assert_eq!(outcome.acked(), 200_000);
    daemon.stop_cleanly().unwrap();
    outcome.events_per_sec()
}
