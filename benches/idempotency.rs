//! The idempotency window: resident memory per key, and how long the rebuild at start takes for a full window.
//!
//! `cargo bench --bench idempotency` (`TRAIL_BENCH_KEYS`, default 1,000,000, the default `idempotency.max_keys`
//! is smaller: see README). Three measurements, printed as lines:
//!
//! - `rss`: the window filled with that many stored keys, the process's resident set before and after;
//! - `rebuild`: a log of that many keyed records received at 100,000 events/s (the newest ones: a full window
//!   of that many keys), in files of 256 MiB (the default `log.max_file_bytes`), read back by `Window::rebuild`
//!   as the daemon does at start (page cache warm: the files were just written);
//! - `scan`: the same number of records without keys, which the rebuild skips (only lines that contain
//!   `,"idempotency_key":"` are parsed): how fast it reads past them.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use trail::idempotency::{EventDigest, Key, Window};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Writes `n` records received at 100,000 events/s ending now into `dir`, with keys when `keyed`.
fn write_log(dir: &Path, n: u64, keyed: bool) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let now = SystemTime::now();
    let start = now - Duration::from_micros(n * 10);
    let mut bytes = 0;
    let mut file: Option<std::io::BufWriter<std::fs::File>> = None;
    let mut in_file = 0u64;
    for i in 0..n {
        let t = start + Duration::from_micros(i * 10);
        if file.is_none() || in_file >= 256 << 20 {
            let name = trail::log::files::file_name(t, i + 1);
            file = Some(std::io::BufWriter::new(
                std::fs::File::create(dir.join(name)).unwrap(),
            ));
            in_file = 0;
        }
        let mut stamp = Vec::new();
        trail::record::write_rfc3339(&mut stamp, t);
        let stamp = String::from_utf8(stamp).unwrap();
        let id = trail::record::new_id(t);
        let key = if keyed {
            format!(",\"idempotency_key\":\"bench-{i:012}\"")
        } else {
            String::new()
        };
        let line = format!(
            "{{\"seq\":{},\"id\":\"{id}\",\"received_at\":\"{stamp}\",\"occurred_at\":\"{stamp}\",\"type\":\"user_login\",\
             \"version\":1,\"severity\":\"info\",\"source\":{{\"uid\":1000,\"gid\":1000,\"pid\":4242,\"host\":\"bench-host\"}},\
             \"actor\":{{\"id\":\"u-{}\",\"name\":\"alice\",\"type\":\"user\",\"ip\":\"10.0.0.7\"}},\
             \"target\":{{\"type\":\"project\",\"id\":\"p-9\",\"name\":\"billing\"}},\"outcome\":\"success\",\
             \"message\":\"signed in\",\"payload\":{{\"method\":\"sso\",\"mfa\":true}}{key},\"hash\":\"{}\"}}\n",
            i + 1,
            i % 1000,
            "0".repeat(64)
        );
        file.as_mut().unwrap().write_all(line.as_bytes()).unwrap();
        bytes += line.len() as u64;
        in_file += line.len() as u64;
    }
    file.unwrap().flush().unwrap();
    bytes
}

fn main() {
    let n: usize = std::env::var("TRAIL_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let window = Duration::from_secs(24 * 3600);

    let before = rss_kib();
    let w = Window::new(window, n);
    let now = SystemTime::now();
    let event = EventDigest::new("user_login", None, b",\"message\":\"m\"");
    for i in 0..n {
        let key = Key::new(1000, &format!("bench-{i:012}"));
        w.claim(key, event, now);
        w.stored(key, i as u64 + 1, trail::record::new_id(now));
    }
    let after = rss_kib();
    println!(
        "rss: {n} keys: {:.1} MiB more resident ({:.0} bytes per key)",
        (after - before) as f64 / 1024.0,
        (after - before) as f64 * 1024.0 / n as f64
    );
    drop(w);

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-idempotency");
    let _ = std::fs::remove_dir_all(&root);
    let keyed = root.join("keyed");
    let bytes = write_log(&keyed, n as u64, true);
    let w = Window::new(window, n);
    let r = w.rebuild(&keyed, SystemTime::now()).unwrap();
    println!(
        "rebuild: {} keyed records ({:.0} MiB in {} files, 100,000 events/s) -> {} keys in {:?} ({:.0} records/s)",
        r.records,
        bytes as f64 / (1 << 20) as f64,
        r.files,
        r.keys,
        r.elapsed,
        r.records as f64 / r.elapsed.as_secs_f64()
    );
    assert_eq!(r.keys, n);
    drop(w);

    let plain = root.join("plain");
    let bytes = write_log(&plain, n as u64, false);
    let w = Window::new(window, n);
    let r = w.rebuild(&plain, SystemTime::now()).unwrap();
    println!(
        "scan: {n} records without keys ({:.0} MiB) read past in {:?} ({:.2} GB/s, {:.0} records/s)",
        bytes as f64 / (1 << 20) as f64,
        r.elapsed,
        bytes as f64 / r.elapsed.as_secs_f64() / 1e9,
        n as f64 / r.elapsed.as_secs_f64()
    );
    assert_eq!(r.keys, 0);
    std::fs::remove_dir_all(&root).unwrap();
}
