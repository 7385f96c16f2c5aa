//! Ingest benchmark: the release `traild` under pipelined load over its Unix socket.
//!
//! For each fsync policy the benchmark starts a fresh daemon (temp dir, real config file), drives it from N
//! connections at the maximum rate for a fixed number of events, then starts another fresh daemon and drives it
//! at half of the measured maximum rate (paced) to see acknowledgement latency under a realistic load. Every
//! answer must be `{"ok":true,...}` and, after the daemon stopped, the log must hold exactly one record from this
//! process per acknowledged event (plus whatever the daemon recorded about itself), numbered without gaps;
//! anything else aborts the run with a non-zero exit.
//!
//! `cargo bench --bench ingest -- --help` lists the options; benches/README.md explains the figures.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;

/// Targets from the issue, for a 2-core machine with the load generator on it.
const TARGET_ALWAYS_EPS: f64 = 170_000.0;
const TARGET_NEVER_EPS: f64 = 450_000.0;
const TARGET_P99_HALF: Duration = Duration::from_millis(5);
const TARGET_RSS_KIB: u64 = 64 * 1024;

/// Largest write the generator issues (and largest read of answers).
const WRITE_BYTES: usize = 64 << 10;
const READ_BYTES: usize = 256 << 10;
/// By default a paced connection writes at most once per tick (whatever became due since its last write).
const PACE_TICK: Duration = Duration::from_micros(200);
/// How long the daemon may take to bind its socket, and to exit after SIGTERM.
const START_DEADLINE: Duration = Duration::from_secs(15);
const STOP_DEADLINE: Duration = Duration::from_secs(60);

const HELP: &str = "\
ingest benchmark: runs the release traild and pipelines ~300-byte events over N connections

usage: cargo bench --bench ingest -- [options]

  --scenario all|always|never   fsync policies to run (default all; env TRAIL_BENCH_SCENARIO)
  --events N                    events per max-rate run (default 600000 for always, 1000000 for never;
                                env TRAIL_BENCH_EVENTS)
  --paced-events N              events per half-rate run (default as --events; env TRAIL_BENCH_PACED_EVENTS)
  --connections N               client connections (default 4; env TRAIL_BENCH_CONNECTIONS)
  --window N                    unacknowledged events in flight per connection (default 4096)
  --rate R                      rate of the paced runs in events/s (default half the measured max rate)
  --tick-us N                   a paced connection writes at most every N µs (default 200)
  --no-paced                    skip the half-rate runs
  --paced-only                  skip the max-rate runs (needs --rate)
  --quick                       small counts for a smoke run (env TRAIL_BENCH_QUICK=1)
  --log-extra 'K: V, ...'       more `log:` settings for the daemon, e.g. 'max_file_bytes: 4GiB'
                                (default: the daemon's defaults; env TRAIL_BENCH_LOG_EXTRA)
  --dir PATH                    where the temp dirs with the daemon's log go (default the system temp dir;
                                must not be tmpfs for fsync to mean anything; env TRAIL_BENCH_DIR)
  --json PATH                   results file (default <target>/bench-ingest.json)
  --timeout SECS                abort a run that takes longer (default 600)
  --enforce-targets             exit 1 when a target from the issue is missed
  --help                        this text
Unknown arguments (cargo passes --bench) are ignored.
TRAIL_BENCH_DAEMON_LOG=<filter> runs the daemon with RUST_LOG=<filter> (default info) and keeps its stderr as
<target>/bench-ingest-<scenario>.log, e.g. TRAIL_BENCH_DAEMON_LOG=info,trail::journal=debug to see every group commit.
TRAIL_BENCH_TRAILD=<path> runs another traild build instead of this one (A/B comparisons).
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fsync {
    Always,
    Never,
}

impl Fsync {
    fn name(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::Never => "never",
        }
    }
}

#[derive(Debug, Clone)]
struct Options {
    policies: Vec<Fsync>,
    events: Option<u64>,
    paced_events: Option<u64>,
    connections: usize,
    window: u64,
    rate: Option<f64>,
    paced: bool,
    paced_only: bool,
    quick: bool,
    dir: Option<PathBuf>,
    json: Option<PathBuf>,
    timeout: Duration,
    enforce: bool,
    tick: Duration,
    /// Extra `log:` settings, YAML flow-mapping entries.
    log_extra: Option<String>,
}

impl Options {
    fn parse() -> Result<Options> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut o = Options {
            policies: vec![Fsync::Always, Fsync::Never],
            events: None,
            paced_events: None,
            connections: 4,
            window: 4096,
            rate: None,
            paced: true,
            paced_only: false,
            quick: env("TRAIL_BENCH_QUICK").is_some_and(|v| v != "0"),
            dir: env("TRAIL_BENCH_DIR").map(PathBuf::from),
            json: None,
            timeout: Duration::from_secs(600),
            enforce: false,
            tick: PACE_TICK,
            log_extra: env("TRAIL_BENCH_LOG_EXTRA"),
        };
        let mut scenario = env("TRAIL_BENCH_SCENARIO");
        if let Some(v) = env("TRAIL_BENCH_EVENTS") {
            o.events = Some(number(&v, "TRAIL_BENCH_EVENTS")?);
        }
        if let Some(v) = env("TRAIL_BENCH_PACED_EVENTS") {
            o.paced_events = Some(number(&v, "TRAIL_BENCH_PACED_EVENTS")?);
        }
        if let Some(v) = env("TRAIL_BENCH_CONNECTIONS") {
            o.connections = number(&v, "TRAIL_BENCH_CONNECTIONS")? as usize;
        }
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let takes_value = [
                "--scenario",
                "--events",
                "--paced-events",
                "--connections",
                "--window",
                "--rate",
                "--dir",
                "--json",
                "--timeout",
                "--tick-us",
                "--log-extra",
            ]
            .contains(&flag.as_str());
            let value = if takes_value {
                match inline {
                    Some(v) => v,
                    None => args
                        .next()
                        .with_context(|| format!("{flag} needs a value"))?,
                }
            } else {
                String::new()
            };
            match flag.as_str() {
                "--help" | "-h" => {
                    print!("{HELP}");
                    std::process::exit(0);
                }
                "--scenario" => scenario = Some(value),
                "--events" => o.events = Some(number(&value, &flag)?),
                "--paced-events" => o.paced_events = Some(number(&value, &flag)?),
                "--connections" => o.connections = number(&value, &flag)? as usize,
                "--window" => o.window = number(&value, &flag)?,
                "--rate" => o.rate = Some(number(&value, &flag)? as f64),
                "--dir" => o.dir = Some(PathBuf::from(value)),
                "--json" => o.json = Some(PathBuf::from(value)),
                "--timeout" => o.timeout = Duration::from_secs(number(&value, &flag)?),
                "--tick-us" => o.tick = Duration::from_micros(number(&value, &flag)?),
                "--log-extra" => o.log_extra = Some(value),
                "--no-paced" => o.paced = false,
                "--paced-only" => o.paced_only = true,
                "--quick" => o.quick = true,
                "--enforce-targets" => o.enforce = true,
                // `cargo bench` passes `--bench`; filters and other harness flags mean nothing here.
                _ => {}
            }
        }
        o.policies = match scenario.as_deref().unwrap_or("all") {
            "all" => vec![Fsync::Always, Fsync::Never],
            "always" => vec![Fsync::Always],
            "never" => vec![Fsync::Never],
            other => bail!("--scenario {other:?}: use all, always or never"),
        };
        ensure!(
            (1..=256).contains(&o.connections),
            "--connections must be 1..=256"
        );
        ensure!(o.window >= 16, "--window must be at least 16");
        ensure!(
            !o.paced_only || o.rate.is_some(),
            "--paced-only needs --rate (there is no max-rate run to take half of)"
        );
        Ok(o)
    }

    fn max_events(&self, fsync: Fsync) -> u64 {
        let default = match (fsync, self.quick) {
            (Fsync::Always, false) => 600_000,
            (Fsync::Never, false) => 1_000_000,
            (Fsync::Always, true) => 30_000,
            (Fsync::Never, true) => 60_000,
        };
        self.events.unwrap_or(default).max(self.connections as u64)
    }

    fn paced_events(&self, fsync: Fsync) -> u64 {
        self.paced_events
            .unwrap_or(self.max_events(fsync))
            .max(self.connections as u64)
    }
}

fn number(text: &str, what: &str) -> Result<u64> {
    let clean: String = text.chars().filter(|c| *c != '_' && *c != ',').collect();
    clean
        .parse()
        .with_context(|| format!("{what}: {text:?} is not a whole number"))
}

// ---------------------------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------------------------

/// A pre-serialized request line with fixed-width digit fields that are overwritten for every event, so no two
/// events are identical and building one is a copy plus a few digits.
struct Template {
    line: Vec<u8>,
    /// (offset, width) of: actor number, target number, connection, sequence number, ip octet.
    fields: [(usize, usize); 5],
}

const MARKERS: [&str; 5] = ["@@@@@@", "%%%%%%", "^^^", "~~~~~~~~~~", "!!!"];

fn templates() -> Vec<Template> {
    let names = ["alice", "bob", "carol", "dmitri", "eve-ops", "frank"];
    let methods = ["password", "sso", "ssh_key", "token", "webauthn"];
    let outcomes = ["success", "failure", "success", "denied"];
    let projects = ["billing", "payments-api", "search", "ledger"];
    let agents = [
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
        "curl/8.5.0",
        "trail-sdk-go/1.4",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) Firefox/121.0",
    ];
    let mut out = Vec::new();
    for i in 0..60 {
        let outcome = outcomes[i % outcomes.len()];
        let message = if outcome == "success" {
            "signed in"
        } else {
            "sign-in refused"
        };
        let line = format!(
            concat!(
                r#"{{"type":"user_login","actor":{{"id":"u-{}","name":"{}","ip":"10.20.{}.{}"}},"#,
                r#""target":{{"type":"project","id":"p-{}","name":"{}"}},"message":"{}","outcome":"{}","#,
                r#""payload":{{"method":"{}","mfa":{},"user_agent":"{} bench/c{}-n{}"}}}}"#,
                "\n"
            ),
            MARKERS[0],
            names[i % names.len()],
            100 + i,
            MARKERS[4],
            MARKERS[1],
            projects[i % projects.len()],
            message,
            outcome,
            methods[i % methods.len()],
            i % 3 != 0,
            agents[i % agents.len()],
            MARKERS[2],
            MARKERS[3],
        );
        let mut line = line.into_bytes();
        let mut fields = [(0, 0); 5];
        for (field, marker) in fields.iter_mut().zip(MARKERS) {
            let at = line
                .windows(marker.len())
                .position(|w| w == marker.as_bytes())
                .expect("marker in template");
            line[at..at + marker.len()].fill(b'0');
            *field = (at, marker.len());
        }
        out.push(Template { line, fields });
    }
    out
}

fn put_digits(slot: &mut [u8], mut n: u64) {
    for d in slot.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Appends event number `n` of connection `conn` to `buf`.
fn build_event(templates: &[Template], conn: usize, n: u64, buf: &mut Vec<u8>) {
    // A cheap mix so neighbouring events differ in more than the counter.
    let h =
        n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (conn as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let t = &templates[(h >> 40) as usize % templates.len()];
    let start = buf.len();
    buf.extend_from_slice(&t.line);
    let line = &mut buf[start..];
    let values = [
        (h >> 8) % 1_000_000,
        (h >> 24) % 1_000_000,
        conn as u64,
        n,
        100 + (h >> 50) % 150,
    ];
    for ((off, width), v) in t.fields.iter().zip(values) {
        put_digits(&mut line[*off..off + width], v);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------------------------

struct Daemon {
    child: Child,
    socket: PathBuf,
    log_dir: PathBuf,
    stderr: PathBuf,
    /// Socket and config; dropped after the child.
    _run_dir: tempfile::TempDir,
    _data_dir: tempfile::TempDir,
}

impl Daemon {
    fn start(fsync: Fsync, opts: &Options) -> Result<Daemon> {
        // The socket path must stay short (sun_path); the log goes where the caller asked.
        let run_dir = tempfile::Builder::new()
            .prefix("trail-bench-")
            .tempdir()
            .context("creating the socket dir")?;
        let data_dir = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                tempfile::Builder::new()
                    .prefix("trail-bench-")
                    .tempdir_in(d)
            }
            None => tempfile::Builder::new()
                .prefix("trail-bench-data-")
                .tempdir(),
        }
        .context("creating the data dir")?;
        let socket = run_dir.path().join("trail.sock");
        let log_dir = data_dir.path().join("log");
        let event_types = Path::new(env!("CARGO_MANIFEST_DIR")).join("event-types");
        let quote = |p: &Path| serde_json::to_string(&p.to_string_lossy()).expect("a string");
        let config = format!(
            "socket: {{path: {}}}\nevent_types: {}\nlog: {{dir: {}, fsync: {}{}}}\n",
            quote(&socket),
            quote(&event_types),
            quote(&log_dir),
            fsync.name(),
            opts.log_extra
                .as_deref()
                .map(|x| format!(", {x}"))
                .unwrap_or_default()
        );
        let config_path = run_dir.path().join("trail.yaml");
        std::fs::write(&config_path, config).context("writing the config")?;
        let stderr = run_dir.path().join("traild.stderr");
        let child = Command::new(daemon_binary())
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", daemon_log_filter().unwrap_or("info"))
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).context("creating the daemon's stderr file")?)
            .spawn()
            .context("starting traild")?;
        let mut daemon = Daemon {
            child,
            socket,
            log_dir,
            stderr,
            _run_dir: run_dir,
            _data_dir: data_dir,
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Polls until the socket accepts a connection; fails at once when the daemon exits.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "traild exited during start-up ({status})\n{}",
                    self.stderr_tail()
                );
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "traild did not accept connections on {} within {START_DEADLINE:?}\n{}",
                    self.socket.display(),
                    self.stderr_tail()
                );
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(&mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid; the child has not been reaped yet, so the pid is still ours.
        if unsafe { libc::kill(self.pid(), libc::SIGTERM) } != 0 {
            bail!("SIGTERM: {}", std::io::Error::last_os_error());
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(
                    status.success(),
                    "traild exited with {status} after SIGTERM\n{}",
                    self.stderr_tail()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "traild did not exit within {STOP_DEADLINE:?} of SIGTERM\n{}",
                    self.stderr_tail()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!(
            "--- last lines of traild's stderr ---\n{}",
            lines[from..].join("\n")
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn daemon_log_filter() -> Option<&'static str> {
    static FILTER: OnceLock<Option<String>> = OnceLock::new();
    FILTER
        .get_or_init(|| {
            std::env::var("TRAIL_BENCH_DAEMON_LOG")
                .ok()
                .filter(|v| !v.is_empty())
        })
        .as_deref()
}

/// Peak resident set size (`VmHWM`) of a process, in KiB.
fn peak_rss_kib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/<pid>/status")
}

/// User + system CPU time a process has used (all its threads).
fn cpu_time(pid: i32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc_pid_stat(5); `rest` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// CPU time the whole machine has spent busy (all CPUs; idle and iowait excluded).
fn machine_cpu_time() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    ensure!(f.len() >= 8, "unexpected /proc/stat: {line}");
    // user nice system idle iowait irq softirq steal
    let ticks = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

fn own_cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// What the log held after a run.
struct LogCheck {
    /// Bytes of all log files.
    bytes: u64,
    /// Records of all log files.
    records: u64,
    /// Records the daemon wrote about itself (not submitted by this benchmark).
    own: u64,
    files: usize,
}

/// Checks that the log holds exactly `expected` records submitted by this process (recognised by the `source` the
/// daemon stamps from the connection's credentials), that all records are numbered 1..=N without gaps, and that
/// the log ends with a complete line.
fn verify_log(dir: &Path, expected: u64) -> Result<LogCheck> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("trail-") && name.ends_with(".jsonl") {
            files.push(path);
        } else if name.starts_with("trail-") && name.ends_with(".jsonl.zst") {
            bail!(
                "{}: compressed log file; the benchmark's config does not compress",
                path.display()
            );
        }
    }
    // Names sort by start time, then first seq.
    files.sort();
    ensure!(!files.is_empty(), "no log file in {}", dir.display());
    // SAFETY: these calls have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let needle = format!(
        "\"source\":{{\"uid\":{uid},\"gid\":{gid},\"pid\":{},\"host\":",
        std::process::id()
    );
    let finder = memchr::memmem::Finder::new(needle.as_bytes());
    let (mut records, mut mine, mut bytes) = (0u64, 0u64, 0u64);
    let mut last_line = Vec::new();
    let mut buf = vec![0u8; 4 << 20];
    for path in &files {
        let mut f = File::open(path)?;
        // Whole lines only: `carry` bytes after the last newline move to the front for the next read.
        let mut carry = 0;
        loop {
            if carry == buf.len() {
                bail!("{}: a line longer than {} bytes", path.display(), buf.len());
            }
            let n = f.read(&mut buf[carry..])?;
            bytes += n as u64;
            let filled = carry + n;
            if n == 0 {
                ensure!(
                    carry == 0,
                    "{} does not end with a complete line",
                    path.display()
                );
                break;
            }
            let Some(end) = memchr::memrchr(b'\n', &buf[..filled]).map(|i| i + 1) else {
                carry = filled;
                continue;
            };
            let whole = &buf[..end];
            records += memchr::memchr_iter(b'\n', whole).count() as u64;
            mine += finder.find_iter(whole).count() as u64;
            let from = memchr::memrchr(b'\n', &whole[..end - 1]).map_or(0, |i| i + 1);
            last_line.clear();
            last_line.extend_from_slice(&whole[from..end - 1]);
            buf.copy_within(end..filled, 0);
            carry = filled - end;
        }
    }
    ensure!(
        mine == expected,
        "the log holds {mine} records from this benchmark but {expected} events were acknowledged"
    );
    let record: serde_json::Value =
        serde_json::from_slice(&last_line).context("the last log line is not JSON")?;
    ensure!(
        record["seq"].as_u64() == Some(records),
        "the log holds {records} records but the last one has seq {}",
        record["seq"]
    );
    Ok(LogCheck {
        bytes,
        records,
        own: records - mine,
        files: files.len(),
    })
}

/// Name of the file system holding `path`, for the report (fsync on tmpfs proves nothing).
fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: statfs writes into the struct we pass; `c` is a valid NUL-terminated path.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return "unknown".into();
    }
    match s.f_type as u64 {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        other => format!("f_type 0x{other:x}"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The load generator
// ---------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Load {
    /// As fast as the window allows.
    Max,
    /// Paced at this many events/s in total.
    Paced(f64),
}

/// State shared by a connection's writer and reader.
struct Shared {
    /// Events completely written.
    sent: AtomicU64,
    /// Answers read.
    acked: AtomicU64,
    writer_waiting: AtomicBool,
    abort: Arc<AtomicBool>,
    writer: OnceLock<Thread>,
}

impl Shared {
    fn wake_writer(&self) {
        if self.writer_waiting.swap(false, Ordering::SeqCst)
            && let Some(t) = self.writer.get()
        {
            t.unpark();
        }
    }
}

/// What one connection measured.
struct ConnResult {
    events: u64,
    bytes: u64,
    /// (latency in ns, number of events that had it).
    samples: Vec<(u64, u32)>,
    finished: Instant,
}

struct Plan {
    conn: usize,
    events: u64,
    window: u64,
    /// Most events in one write.
    batch_max: u64,
    /// The writer waits until the window has room for this many events (or all it has left).
    low_water: u64,
    load: Load,
    connections: usize,
    tick: Duration,
}

/// Sends `plan.events` events, never more than `plan.window` unanswered; reports each write's completion time
/// and how many events it completed to the reader.
fn writer(
    stream: UnixStream,
    plan: &Plan,
    shared: &Shared,
    stamps: mpsc::Sender<(Instant, u32)>,
    start: &Barrier,
) -> Result<u64> {
    let _ = shared.writer.set(thread::current());
    let templates = templates();
    let mut stream = stream;
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BYTES + 4096);
    let mut ends: Vec<usize> = Vec::with_capacity(1024);
    let (batch_max, low_water) = (plan.batch_max, plan.low_water);
    let mut sent = 0u64;
    let mut bytes = 0u64;
    let per_conn_rate = match plan.load {
        Load::Paced(rate) => {
            // Paced runs sleep between small writes; the default 50 µs timer slack would blur the pacing.
            // SAFETY: prctl(PR_SET_TIMERSLACK) only affects the calling thread.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
            Some(rate / plan.connections as f64)
        }
        Load::Max => None,
    };
    start.wait();
    let began = Instant::now();
    let mut last_write = began;
    // Stagger the connections of a paced run so they do not all send at the same instant.
    let offset = per_conn_rate.map_or(0.0, |r| plan.conn as f64 / plan.connections as f64 / r);
    while sent < plan.events {
        if shared.abort.load(Ordering::Relaxed) {
            bail!("aborted");
        }
        let mut want = (plan.events - sent).min(batch_max);
        if let Some(rate) = per_conn_rate {
            let elapsed = began.elapsed().as_secs_f64() - offset;
            let due = if elapsed < 0.0 {
                0
            } else {
                ((elapsed * rate) as u64 + 1).min(plan.events)
            };
            if due <= sent {
                // Sleep until the next event is due, but write at most once per tick: at high rates a
                // syscall per event would make the generator, not the daemon, the bottleneck.
                let next = (began + Duration::from_secs_f64(offset + sent as f64 / rate))
                    .max(last_write + plan.tick);
                thread::sleep(next.saturating_duration_since(Instant::now()));
                continue;
            }
            want = want.min(due - sent);
        }
        let in_flight = sent - shared.acked.load(Ordering::SeqCst);
        let room = plan.window - in_flight;
        if room < want.min(low_water) {
            shared.writer_waiting.store(true, Ordering::SeqCst);
            let in_flight = sent - shared.acked.load(Ordering::SeqCst);
            if plan.window - in_flight < want.min(low_water) {
                thread::park_timeout(Duration::from_millis(100));
            }
            shared.writer_waiting.store(false, Ordering::SeqCst);
            continue;
        }
        let n = want.min(room);
        buf.clear();
        ends.clear();
        for i in 0..n {
            build_event(&templates, plan.conn, sent + i, &mut buf);
            ends.push(buf.len());
        }
        let mut written = 0;
        let mut completed = 0;
        while written < buf.len() {
            let w = stream
                .write(&buf[written..])
                .context("writing events to the daemon")?;
            ensure!(w > 0, "the daemon stopped reading");
            written += w;
            let now = Instant::now();
            let done = ends[completed..].partition_point(|&e| e <= written);
            if done > 0 {
                completed += done;
                // Publish the count before the stamp so the reader's wake-up check sees it.
                shared.sent.fetch_add(done as u64, Ordering::SeqCst);
                if stamps.send((now, done as u32)).is_err() {
                    bail!("the reader stopped");
                }
            }
        }
        sent += n;
        bytes += buf.len() as u64;
        last_write = Instant::now();
    }
    Ok(bytes)
}

/// Reads answers until every event is answered; each must be a success.
fn reader(
    stream: UnixStream,
    plan: &Plan,
    shared: &Shared,
    stamps: mpsc::Receiver<(Instant, u32)>,
    start: &Barrier,
) -> Result<(Vec<(u64, u32)>, Instant)> {
    let mut stream = stream;
    let mut buf = vec![0u8; READ_BYTES];
    let mut have = 0usize;
    let mut acked = 0u64;
    let mut samples: Vec<(u64, u32)> = Vec::with_capacity(1 << 16);
    let mut current: Option<(Instant, u32)> = None;
    start.wait();
    while acked < plan.events {
        if have == buf.len() {
            bail!("an answer line is longer than {READ_BYTES} bytes");
        }
        let n = stream
            .read(&mut buf[have..])
            .context("reading answers from the daemon")?;
        let now = Instant::now();
        if n == 0 {
            bail!(
                "the daemon closed connection {} after {acked} of {} answers",
                plan.conn,
                plan.events
            );
        }
        have += n;
        let mut answered = 0u32;
        let mut pos = 0;
        for nl in memchr::memchr_iter(b'\n', &buf[..have]) {
            let line = &buf[pos..nl];
            if !line.starts_with(b"{\"ok\":true,") {
                shared.abort.store(true, Ordering::SeqCst);
                bail!(
                    "connection {}: answer {} is not a success: {}",
                    plan.conn,
                    acked + u64::from(answered) + 1,
                    String::from_utf8_lossy(line)
                );
            }
            answered += 1;
            pos = nl + 1;
        }
        buf.copy_within(pos..have, 0);
        have -= pos;
        // Answers come in request order: match them with the writes that completed their requests.
        let mut left = answered;
        while left > 0 {
            let (sent_at, count) = match current.take() {
                Some(c) if c.1 > 0 => c,
                _ => stamps
                    .recv()
                    .context("an answer arrived for an event that was never sent")?,
            };
            let m = count.min(left);
            samples.push((now.saturating_duration_since(sent_at).as_nanos() as u64, m));
            left -= m;
            current = Some((sent_at, count - m));
        }
        acked += u64::from(answered);
        ensure!(
            acked <= plan.events,
            "connection {}: {acked} answers for {} events",
            plan.conn,
            plan.events
        );
        shared.acked.store(acked, Ordering::SeqCst);
        let in_flight = shared.sent.load(Ordering::SeqCst).saturating_sub(acked);
        if plan.window.saturating_sub(in_flight) >= plan.low_water {
            shared.wake_writer();
        }
    }
    Ok((samples, Instant::now()))
}

struct RunOutcome {
    results: Vec<ConnResult>,
    started: Instant,
}

fn run_load(daemon: &Daemon, opts: &Options, total: u64, load: Load) -> Result<RunOutcome> {
    let n = opts.connections;
    let abort = Arc::new(AtomicBool::new(false));
    let line_len = templates()
        .iter()
        .map(|t| t.line.len())
        .max()
        .unwrap_or(300);
    let batch_max = (WRITE_BYTES / line_len).max(1) as u64;
    let low_water = batch_max.min(opts.window / 4).max(1);
    let barrier = Arc::new(Barrier::new(2 * n + 1));
    let (done_tx, done_rx) = mpsc::channel::<Result<ConnResult>>();
    let mut handles = Vec::new();
    for conn in 0..n {
        let events = total / n as u64 + u64::from((conn as u64) < total % n as u64);
        let plan = Arc::new(Plan {
            conn,
            events,
            window: opts.window,
            batch_max,
            low_water,
            load,
            connections: n,
            tick: opts.tick,
        });
        let stream = UnixStream::connect(&daemon.socket)
            .with_context(|| format!("connecting to {}", daemon.socket.display()))?;
        let read_half = stream.try_clone()?;
        let shared = Arc::new(Shared {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            writer_waiting: AtomicBool::new(false),
            abort: abort.clone(),
            writer: OnceLock::new(),
        });
        let (stamp_tx, stamp_rx) = mpsc::channel();
        let w = {
            let (plan, shared, barrier, abort) =
                (plan.clone(), shared.clone(), barrier.clone(), abort.clone());
            thread::Builder::new()
                .name(format!("bench-writer-{conn}"))
                .spawn(move || {
                    let r = writer(stream, &plan, &shared, stamp_tx, &barrier);
                    if r.is_err() {
                        abort.store(true, Ordering::SeqCst);
                    }
                    r
                })?
        };
        let r = {
            let (barrier, done_tx, abort) = (barrier.clone(), done_tx.clone(), abort.clone());
            thread::Builder::new()
                .name(format!("bench-reader-{conn}"))
                .spawn(move || {
                    let read = reader(read_half, &plan, &shared, stamp_rx, &barrier);
                    if read.is_err() {
                        abort.store(true, Ordering::SeqCst);
                        shared.wake_writer();
                    }
                    let result = read.and_then(|(samples, finished)| {
                        let bytes = w
                            .join()
                            .map_err(|_| anyhow::anyhow!("writer {conn} panicked"))??;
                        Ok(ConnResult {
                            // What the reader counted, not what was planned: checked against the plan below.
                            events: shared.acked.load(Ordering::SeqCst),
                            bytes,
                            samples,
                            finished,
                        })
                    });
                    let _ = done_tx.send(result);
                })?
        };
        handles.push(r);
    }
    drop(done_tx);
    barrier.wait();
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let mut results = Vec::new();
    let mut failure = None;
    while results.len() < n {
        match done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => {
                failure = Some(e);
                break;
            }
            Err(_) => {
                failure = Some(anyhow::anyhow!(
                    "the load did not finish within {:?}",
                    opts.timeout
                ));
                break;
            }
        }
    }
    if let Some(e) = failure {
        // Threads may be blocked on the daemon; the caller kills it, which unblocks them. Do not join here.
        abort.store(true, Ordering::SeqCst);
        return Err(anyhow::anyhow!("{e:#}\n{}", daemon.stderr_tail()));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(RunOutcome { results, started })
}

// ---------------------------------------------------------------------------------------------------------------
// Scenarios and reporting
// ---------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Figures {
    name: String,
    fsync: Fsync,
    load: Load,
    connections: usize,
    window: u64,
    events: u64,
    request_bytes: u64,
    seconds: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
    mean: Duration,
    peak_rss_kib: u64,
    daemon_cpu: Duration,
    generator_cpu: Duration,
    /// CPU time the rest of the machine used meanwhile: other processes, kernel threads (writeback), interrupts.
    other_cpu: Duration,
    log_bytes: u64,
    log_fs: String,
    load_average: String,
}

impl Figures {
    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.seconds
    }
    fn mb_per_sec(&self) -> f64 {
        self.request_bytes as f64 / self.seconds / 1e6
    }
    fn avg_line(&self) -> f64 {
        self.request_bytes as f64 / self.events as f64
    }

    fn to_json(&self) -> serde_json::Value {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        json!({
            "scenario": self.name,
            "fsync": self.fsync.name(),
            "load": match self.load { Load::Max => "max".to_string(), Load::Paced(r) => format!("paced {r:.0}/s") },
            "target_rate": match self.load { Load::Max => None, Load::Paced(r) => Some(r) },
            "connections": self.connections,
            "window_per_connection": self.window,
            "events": self.events,
            "request_bytes": self.request_bytes,
            "avg_request_line_bytes": self.avg_line(),
            "seconds": self.seconds,
            "events_per_sec": self.events_per_sec(),
            "mb_per_sec": self.mb_per_sec(),
            "latency_us": {
                "p50": us(self.p50), "p99": us(self.p99), "p999": us(self.p999),
                "max": us(self.max), "mean": us(self.mean),
            },
            "daemon_peak_rss_kib": self.peak_rss_kib,
            "daemon_cpu_seconds": self.daemon_cpu.as_secs_f64(),
            "generator_cpu_seconds": self.generator_cpu.as_secs_f64(),
            "rest_of_machine_cpu_seconds": self.other_cpu.as_secs_f64(),
            "log_bytes": self.log_bytes,
            "log_fs": self.log_fs,
            "load_average_before": self.load_average,
        })
    }
}

fn percentiles(samples: &mut [(u64, u32)]) -> (Duration, Duration, Duration, Duration, Duration) {
    samples.sort_unstable_by_key(|s| s.0);
    let total: u64 = samples.iter().map(|s| u64::from(s.1)).sum();
    let sum: u128 = samples
        .iter()
        .map(|s| u128::from(s.0) * u128::from(s.1))
        .sum();
    let at = |q: f64| {
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total.max(1));
        let mut seen = 0u64;
        for s in samples.iter() {
            seen += u64::from(s.1);
            if seen >= rank {
                return Duration::from_nanos(s.0);
            }
        }
        Duration::ZERO
    };
    let max = samples.last().map_or(0, |s| s.0);
    (
        at(0.50),
        at(0.99),
        at(0.999),
        Duration::from_nanos(max),
        Duration::from_nanos((sum / u128::from(total.max(1))) as u64),
    )
}

fn scenario(opts: &Options, fsync: Fsync, load: Load, events: u64) -> Result<Figures> {
    let name = match load {
        Load::Max => format!("{}/max", fsync.name()),
        Load::Paced(_) if opts.rate.is_none() => format!("{}/half", fsync.name()),
        Load::Paced(r) => format!("{}/{:.0}k", fsync.name(), r / 1000.0),
    };
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!(
        "\n== {name}: {events} events over {} connections ({}), load average before: {load_average}",
        opts.connections,
        match load {
            Load::Max => format!("max rate, window {}/connection", opts.window),
            Load::Paced(r) => format!("paced at {r:.0} events/s"),
        }
    );
    let mut daemon = Daemon::start(fsync, opts)?;
    let log_fs = fs_type(&daemon.log_dir);
    if log_fs == "tmpfs" && fsync == Fsync::Always {
        eprintln!(
            "warning: the log is on tmpfs, where fdatasync does nothing; use --dir on a real disk"
        );
    }
    let daemon_cpu_before = cpu_time(daemon.pid())?;
    let own_before = own_cpu_time();
    let machine_before = machine_cpu_time()?;
    let outcome = run_load(&daemon, opts, events, load)?;
    let own_cpu = own_cpu_time() - own_before;
    let daemon_cpu = cpu_time(daemon.pid())? - daemon_cpu_before;
    let other_cpu = (machine_cpu_time()? - machine_before).saturating_sub(daemon_cpu + own_cpu);
    let peak_rss_kib = peak_rss_kib(daemon.pid())?;
    daemon.stop()?;
    if daemon_log_filter().is_some() {
        let keep = target_dir().join(format!("bench-ingest-{}.log", name.replace('/', "-")));
        std::fs::copy(&daemon.stderr, &keep)
            .with_context(|| format!("keeping the daemon's stderr as {}", keep.display()))?;
        eprintln!("   daemon stderr kept as {}", keep.display());
    }
    let finished = outcome
        .results
        .iter()
        .map(|r| r.finished)
        .max()
        .expect("at least one connection");
    let seconds = finished.duration_since(outcome.started).as_secs_f64();
    let acked: u64 = outcome.results.iter().map(|r| r.events).sum();
    ensure!(
        acked == events,
        "{acked} events acknowledged, {events} sent"
    );
    let log = verify_log(&daemon.log_dir, acked)?;
    let log_bytes = log.bytes;
    let request_bytes = outcome.results.iter().map(|r| r.bytes).sum();
    let mut samples: Vec<(u64, u32)> = outcome
        .results
        .into_iter()
        .flat_map(|r| r.samples)
        .collect();
    let counted: u64 = samples.iter().map(|s| u64::from(s.1)).sum();
    ensure!(
        counted == acked,
        "latency samples cover {counted} of {acked} events"
    );
    let (p50, p99, p999, max, mean) = percentiles(&mut samples);
    let f = Figures {
        name,
        fsync,
        load,
        connections: opts.connections,
        window: opts.window,
        events,
        request_bytes,
        seconds,
        p50,
        p99,
        p999,
        max,
        mean,
        peak_rss_kib,
        daemon_cpu,
        generator_cpu: own_cpu,
        other_cpu,
        log_bytes,
        log_fs,
        load_average,
    };
    eprintln!(
        "   verified: {acked} answers all ok; the log holds exactly {acked} records from this benchmark{} in {} \
         file(s), seq 1..={} without gaps ({:.1} MB, {})",
        if log.own > 0 {
            format!(" plus {} of the daemon's own", log.own)
        } else {
            String::new()
        },
        log.files,
        log.records,
        log_bytes as f64 / 1e6,
        f.log_fs
    );
    print_table(std::slice::from_ref(&f));
    Ok(f)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn print_table(rows: &[Figures]) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>9} {:>7} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10} {:>8} {:>9}",
        "scenario",
        "events",
        "seconds",
        "events/s",
        "MB/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "RSS MiB",
        "daemon CPU",
        "gen CPU",
        "other CPU"
    );
    for f in rows {
        let _ = writeln!(
            out,
            "{:<14} {:>9} {:>7.2} {:>10.0} {:>7.1} {:>9} {:>9} {:>9} {:>9} {:>8.1} {:>9.0}% {:>7.0}% {:>8.0}%",
            f.name,
            f.events,
            f.seconds,
            f.events_per_sec(),
            f.mb_per_sec(),
            ms(f.p50),
            ms(f.p99),
            ms(f.p999),
            ms(f.max),
            f.peak_rss_kib as f64 / 1024.0,
            f.daemon_cpu.as_secs_f64() / f.seconds * 100.0,
            f.generator_cpu.as_secs_f64() / f.seconds * 100.0,
            f.other_cpu.as_secs_f64() / f.seconds * 100.0,
        );
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}

/// Target checks: (description, met).
fn targets(rows: &[Figures]) -> Vec<(String, bool)> {
    let mut checks = Vec::new();
    for f in rows {
        match (f.fsync, f.load) {
            (Fsync::Always, Load::Max) => checks.push((
                format!(
                    "fsync always: {:.0} events/s >= {TARGET_ALWAYS_EPS:.0}",
                    f.events_per_sec()
                ),
                f.events_per_sec() >= TARGET_ALWAYS_EPS,
            )),
            (Fsync::Never, Load::Max) => checks.push((
                format!(
                    "fsync never: {:.0} events/s >= {TARGET_NEVER_EPS:.0}",
                    f.events_per_sec()
                ),
                f.events_per_sec() >= TARGET_NEVER_EPS,
            )),
            (_, Load::Paced(r)) => checks.push((
                format!(
                    "fsync {}: p99 {} ms < {} ms at {r:.0} events/s ({})",
                    f.fsync.name(),
                    ms(f.p99),
                    TARGET_P99_HALF.as_millis(),
                    if f.name.ends_with("/half") {
                        "half of the measured max"
                    } else {
                        "rate set with --rate"
                    }
                ),
                f.p99 < TARGET_P99_HALF,
            )),
        }
        checks.push((
            format!(
                "{}: peak RSS {:.1} MiB < {} MiB",
                f.name,
                f.peak_rss_kib as f64 / 1024.0,
                TARGET_RSS_KIB / 1024
            ),
            f.peak_rss_kib < TARGET_RSS_KIB,
        ));
    }
    checks
}

fn target_dir() -> PathBuf {
    // The bench runs as <target>/<profile>/deps/ingest-<hash>.
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .filter(|t| t.join("CACHEDIR.TAG").exists())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string());
    json!({
        "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "generator": "same machine as the daemon",
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("\ningest benchmark FAILED: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let opts = Options::parse()?;
    let avg_template: f64 = {
        let t = templates();
        t.iter().map(|t| t.line.len()).sum::<usize>() as f64 / t.len() as f64
    };
    eprintln!(
        "trail ingest benchmark: daemon {}, {} CPUs, {} connections, events ~{avg_template:.0} bytes{}",
        daemon_binary().display(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        opts.connections,
        if opts.quick { ", quick run" } else { "" }
    );
    let mut rows = Vec::new();
    for &fsync in &opts.policies {
        let half = match opts.rate {
            Some(rate) if opts.paced_only => rate,
            _ => {
                let max = scenario(&opts, fsync, Load::Max, opts.max_events(fsync))?;
                let half = opts.rate.unwrap_or(max.events_per_sec() / 2.0);
                rows.push(max);
                half
            }
        };
        if opts.paced || opts.paced_only {
            rows.push(scenario(
                &opts,
                fsync,
                Load::Paced(half),
                opts.paced_events(fsync),
            )?);
        }
    }
    println!(
        "\n== summary ({} connections, window {}/connection; MB = 10^6 bytes of request lines; latency = answer read - request written)",
        opts.connections, opts.window
    );
    print_table(&rows);
    let avg: f64 = rows.iter().map(|f| f.request_bytes as f64).sum::<f64>()
        / rows.iter().map(|f| f.events as f64).sum::<f64>();
    println!("average request line: {avg:.1} bytes (newline included)");
    for f in &rows {
        let other = f.other_cpu.as_secs_f64() / f.seconds * 100.0;
        if other > 10.0 {
            println!(
                "note: the rest of the machine used {other:.0}% CPU during {} (other processes, writeback, \
                 interrupts): its figures are disturbed",
                f.name
            );
        }
    }
    let checks = targets(&rows);
    println!("\n== targets (2-core machine, generator on the same machine)");
    for (what, met) in &checks {
        println!("  [{}] {what}", if *met { " ok " } else { "MISS" });
    }
    let json_path = opts
        .json
        .clone()
        .unwrap_or_else(|| target_dir().join("bench-ingest.json"));
    let report = json!({
        "benchmark": "ingest",
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "machine": machine(),
        "options": {
            "connections": opts.connections,
            "window_per_connection": opts.window,
            "quick": opts.quick,
            "pace_tick_us": opts.tick.as_micros() as u64,
            "log_extra": opts.log_extra,
        },
        "avg_request_line_bytes": avg,
        "scenarios": rows.iter().map(Figures::to_json).collect::<Vec<_>>(),
        "targets": checks.iter().map(|(what, met)| json!({"check": what, "met": met})).collect::<Vec<_>>(),
    });
    if let Some(parent) = json_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut text = serde_json::to_vec_pretty(&report)?;
    text.push(b'\n');
    std::fs::write(&json_path, text).with_context(|| format!("writing {}", json_path.display()))?;
    println!("\nresults written to {}", json_path.display());
    if opts.enforce && checks.iter().any(|c| !c.1) {
        bail!("targets missed (--enforce-targets)");
    }
    Ok(())
}

/// The daemon under test: this build's `traild`, or `$TRAIL_BENCH_TRAILD` (for A/B comparisons with another build).
fn daemon_binary() -> std::path::PathBuf {
    std::env::var_os("TRAIL_BENCH_TRAILD")
        .filter(|v| !v.is_empty())
        .map_or_else(|| env!("CARGO_BIN_EXE_traild").into(), Into::into)
}
