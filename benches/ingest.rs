//! Ingest benchmark: the release `traild` under pipelined load over its Unix socket.
//!
//! For each fsync policy the benchmark starts a fresh daemon (temp dir, real config file), drives it from N
//! connections at the maximum rate for a fixed number of events, then starts another fresh daemon and drives it
//! at half of the measured maximum rate (paced) to see acknowledgement latency under a realistic load. Every
//! answer must be `{"ok":true,...}` and, after the daemon stopped, the log must hold exactly one record from this
//! process per acknowledged event (plus whatever the daemon recorded about itself), numbered without gaps;
//! anything else aborts the run with a non-zero exit.
//!
//! Two workloads: `login` (the repository's `user_login` type, a small payload schema) and `realistic` (eight
//! event types of the benchmark's own, each payload checked against five required properties with regex
//! patterns, a `date-time` format and `additionalProperties: false`; ~330-byte requests; 1 and 4 connections),
//! with the daemon's CPU per event beside the rate.
//!
//! `cargo bench --bench ingest -- --help` lists the options; benches/README.md explains the figures.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use trail_test_kit::load::{self, Load, Outcome, Plan};
use trail_test_kit::{Daemon, Setup};

/// Targets from the issue, for a 2-core machine with the load generator on it.
const TARGET_ALWAYS_EPS: f64 = 170_000.0;
const TARGET_NEVER_EPS: f64 = 450_000.0;
const TARGET_P99_HALF: Duration = Duration::from_millis(5);
const TARGET_RSS_KIB: u64 = 64 * 1024;
/// Targets of the realistic workload (4 connections), same machine.
const REALISTIC_ALWAYS_EPS: f64 = 350_000.0;
const REALISTIC_NEVER_EPS: f64 = 550_000.0;
const REALISTIC_ALWAYS_CPU_US: f64 = 3.0;
const REALISTIC_NEVER_CPU_US: f64 = 2.5;
const REALISTIC_P99_HALF: Duration = Duration::from_millis(2);
/// The realistic targets are for this many connections.
const REALISTIC_TARGET_CONNECTIONS: usize = 4;

/// Largest write the generator issues.
const WRITE_BYTES: usize = 64 << 10;
/// By default a paced connection writes at most once per tick (whatever became due since its last write).
const PACE_TICK: Duration = Duration::from_micros(200);

const HELP: &str = "\
ingest benchmark: runs the release traild and pipelines ~300-byte events over N connections

usage: cargo bench --bench ingest -- [options]

  --workload login|realistic    the events (default login; env TRAIL_BENCH_WORKLOAD): login is user_login
                                requests of ~305 bytes; realistic is ~330-byte requests of 8 types whose
                                payloads are checked against 5 required properties (regex patterns, date-time)
  --scenario all|always|never   fsync policies to run (default all; env TRAIL_BENCH_SCENARIO)
  --events N                    events per max-rate run (default 600000 for always, 1000000 for never, and
                                1000000 for both with the realistic workload; env TRAIL_BENCH_EVENTS)
  --paced-events N              events per half-rate run (default as --events; env TRAIL_BENCH_PACED_EVENTS)
  --connections N[,N...]        client connections, one run per count (default 4, and 1,4 with the realistic
                                workload; env TRAIL_BENCH_CONNECTIONS)
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

/// Which events the benchmark sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// `user_login` requests (the repository's own type): a small payload schema.
    Login,
    /// Eight event types of the benchmark's own with schema-heavy payloads (see [`REALISTIC_TYPES`]).
    Realistic,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Login => "login",
            Workload::Realistic => "realistic",
        }
    }
}

#[derive(Debug, Clone)]
struct Options {
    workload: Workload,
    policies: Vec<Fsync>,
    events: Option<u64>,
    paced_events: Option<u64>,
    /// One run of each scenario per count.
    connections: Vec<usize>,
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
            workload: Workload::Login,
            policies: vec![Fsync::Always, Fsync::Never],
            events: None,
            paced_events: None,
            connections: Vec::new(),
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
        let mut workload = env("TRAIL_BENCH_WORKLOAD");
        if let Some(v) = env("TRAIL_BENCH_EVENTS") {
            o.events = Some(number(&v, "TRAIL_BENCH_EVENTS")?);
        }
        if let Some(v) = env("TRAIL_BENCH_PACED_EVENTS") {
            o.paced_events = Some(number(&v, "TRAIL_BENCH_PACED_EVENTS")?);
        }
        if let Some(v) = env("TRAIL_BENCH_CONNECTIONS") {
            o.connections = numbers(&v, "TRAIL_BENCH_CONNECTIONS")?;
        }
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let takes_value = [
                "--workload",
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
                "--workload" => workload = Some(value),
                "--events" => o.events = Some(number(&value, &flag)?),
                "--paced-events" => o.paced_events = Some(number(&value, &flag)?),
                "--connections" => o.connections = numbers(&value, &flag)?,
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
        o.workload = match workload.as_deref().unwrap_or("login") {
            "login" => Workload::Login,
            "realistic" => Workload::Realistic,
            other => bail!("--workload {other:?}: use login or realistic"),
        };
        if o.connections.is_empty() {
            o.connections = match o.workload {
                Workload::Login => vec![4],
                Workload::Realistic => vec![1, 4],
            };
        }
        ensure!(
            o.connections.iter().all(|n| (1..=256).contains(n)),
            "--connections: each count must be 1..=256"
        );
        ensure!(o.window >= 16, "--window must be at least 16");
        ensure!(
            !o.paced_only || o.rate.is_some(),
            "--paced-only needs --rate (there is no max-rate run to take half of)"
        );
        Ok(o)
    }

    fn max_events(&self, fsync: Fsync, connections: usize) -> u64 {
        let default = match (self.workload, fsync, self.quick) {
            (Workload::Login, Fsync::Always, false) => 600_000,
            (Workload::Login, Fsync::Never, false) => 1_000_000,
            (Workload::Realistic, _, false) => 1_000_000,
            (_, Fsync::Always, true) => 30_000,
            (_, Fsync::Never, true) => 60_000,
        };
        self.events.unwrap_or(default).max(connections as u64)
    }

    fn paced_events(&self, fsync: Fsync, connections: usize) -> u64 {
        self.paced_events
            .unwrap_or(self.max_events(fsync, connections))
            .max(connections as u64)
    }
}

/// A comma-separated list of whole numbers.
fn numbers(text: &str, what: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|n| number(n.trim(), what).map(|n| n as usize))
        .collect()
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
    /// (offset, width, which value of [`Field`]) of every digit field.
    fields: Vec<(usize, usize, Field)>,
}

/// The varying values of an event, each written in decimal digits into its field.
#[derive(Debug, Clone, Copy)]
enum Field {
    Actor,
    Target,
    Connection,
    Sequence,
    IpOctet,
    Tenant,
}

fn templates(workload: Workload) -> Vec<Template> {
    match workload {
        Workload::Login => login_templates(),
        Workload::Realistic => realistic_templates(),
    }
}

/// Replaces each marker of `line` by zeros and notes where it was.
fn template(line: String, markers: &[(&str, Field)]) -> Template {
    let mut line = line.into_bytes();
    let mut fields = Vec::new();
    for &(marker, value) in markers {
        let at = line
            .windows(marker.len())
            .position(|w| w == marker.as_bytes())
            .expect("marker in template");
        line[at..at + marker.len()].fill(b'0');
        fields.push((at, marker.len(), value));
    }
    Template { line, fields }
}

fn login_templates() -> Vec<Template> {
    const MARKERS: [(&str, Field); 5] = [
        ("@@@@@@", Field::Actor),
        ("%%%%%%", Field::Target),
        ("^^^", Field::Connection),
        ("~~~~~~~~~~", Field::Sequence),
        ("!!!", Field::IpOctet),
    ];
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
            MARKERS[0].0,
            names[i % names.len()],
            100 + i,
            MARKERS[4].0,
            MARKERS[1].0,
            projects[i % projects.len()],
            message,
            outcome,
            methods[i % methods.len()],
            i % 3 != 0,
            agents[i % agents.len()],
            MARKERS[2].0,
            MARKERS[3].0,
        );
        out.push(template(line, &MARKERS));
    }
    out
}

/// The realistic workload's event types: (name, code, target type, what the messages say was done).
const REALISTIC_TYPES: [(&str, &str, &str, &str); 8] = [
    ("document_viewed", "B1000I", "document", "viewed"),
    ("document_shared", "B1001N", "document", "shared"),
    ("invoice_paid", "B1002I", "invoice", "paid"),
    ("ticket_closed", "B1003I", "ticket", "closed"),
    ("secret_read", "B1004W", "secret", "read"),
    ("job_started", "B1005I", "job", "started"),
    ("key_rotated", "B1006N", "key", "rotated"),
    ("member_invited", "B1007N", "team", "invited a member to"),
];

/// The definition file of each realistic type: (file name, text). Five required properties: an integer with a
/// minimum, two strings with regex patterns, a `date-time` string and a non-empty string; nothing else.
fn realistic_definitions() -> Vec<(String, String)> {
    REALISTIC_TYPES
        .iter()
        .map(|(name, code, target, _)| {
            let severity = match code.as_bytes().last() {
                Some(b'W') => "warning",
                Some(b'N') => "notice",
                _ => "info",
            };
            let text = format!(
                "name: {name}\n\
                 description: A {target} event of the ingest benchmark's realistic workload.\n\
                 feature_category: benchmark\n\
                 saved_to_database: true\n\
                 streamed: false\n\
                 code: {code}\n\
                 severity: {severity}\n\
                 payload:\n\
                 \x20 type: object\n\
                 \x20 additionalProperties: false\n\
                 \x20 required: [attempt, tenant, request_id, at, detail]\n\
                 \x20 properties:\n\
                 \x20   attempt: {{type: integer, minimum: 1}}\n\
                 \x20   tenant: {{type: string, pattern: \"^[0-9a-f]{{8}}$\"}}\n\
                 \x20   request_id: {{type: string, pattern: \"^r-[0-9a-f]{{8}}-[0-9a-f]{{12}}$\"}}\n\
                 \x20   at: {{type: string, format: date-time}}\n\
                 \x20   detail: {{type: string, minLength: 1, maxLength: 200}}\n"
            );
            (format!("{name}.yml"), text)
        })
        .collect()
}

fn realistic_templates() -> Vec<Template> {
    const MARKERS: [(&str, Field); 6] = [
        ("@@@@@@", Field::Actor),
        ("%%%%%%", Field::Target),
        ("^^^^^^^^", Field::Connection),
        ("~~~~~~~~~~~~", Field::Sequence),
        ("!!!", Field::IpOctet),
        ("########", Field::Tenant),
    ];
    let outcomes = ["success", "success", "failure", "success", "denied"];
    let channels = ["web console", "public api", "mobile app", "admin cli"];
    let details = [
        "opened from the shared folder",
        "sent by a scheduled export job",
        "retried after a gateway timeout",
        "approved by the on-call reviewer",
    ];
    let mut out = Vec::new();
    for i in 0..64 {
        let (name, _, target, verb) = REALISTIC_TYPES[i % REALISTIC_TYPES.len()];
        let outcome = outcomes[i % outcomes.len()];
        let line = format!(
            concat!(
                r#"{{"type":"{name}","actor":{{"id":"u-{actor}","ip":"10.20.{net}.{octet}"}},"#,
                r#""target":{{"type":"{target}","id":"{t}-{target_id}"}},"outcome":"{outcome}","#,
                r#""message":"{verb} {target} via the {channel}","#,
                r#""payload":{{"attempt":{attempt},"tenant":"{tenant}","request_id":"r-{conn}-{n}","#,
                r#""at":"2026-12-03T09:{minute:02}:{second:02}.{millis:03}Z","detail":"{detail}"}}}}"#,
                "\n"
            ),
            name = name,
            actor = MARKERS[0].0,
            net = 100 + i,
            octet = MARKERS[4].0,
            target = target,
            t = &target[..1],
            target_id = MARKERS[1].0,
            outcome = outcome,
            verb = verb,
            channel = channels[i % channels.len()],
            attempt = 1 + i % 3,
            tenant = MARKERS[5].0,
            conn = MARKERS[2].0,
            n = MARKERS[3].0,
            minute = i % 60,
            second = (i * 7) % 60,
            millis = (i * 37) % 1000,
            detail = details[i % details.len()],
        );
        out.push(template(line, &MARKERS));
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
    for &(off, width, value) in &t.fields {
        let v = match value {
            Field::Actor => (h >> 8) % 1_000_000,
            Field::Target => (h >> 24) % 1_000_000,
            Field::Connection => conn as u64,
            Field::Sequence => n,
            Field::IpOctet => 100 + (h >> 50) % 150,
            Field::Tenant => (h >> 12) % 100_000_000,
        };
        put_digits(&mut line[off..off + width], v);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------------------------

/// A fresh release daemon with `fsync`, its log under `--dir` when given.
fn start_daemon(fsync: Fsync, opts: &Options) -> Result<Daemon> {
    let setup = Setup {
        fsync: fsync.name(),
        log: opts.log_extra.clone(),
        env: vec![(
            "RUST_LOG".into(),
            daemon_log_filter().unwrap_or("info").into(),
        )],
        shutdown_grace: None,
        log_parent: opts.dir.clone(),
        extra_types: match opts.workload {
            Workload::Login => Vec::new(),
            Workload::Realistic => realistic_definitions(),
        },
        ..Setup::default()
    };
    Daemon::try_with(&daemon_binary(), setup)
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

/// Drives `total` events at `load` into `daemon` over `connections` connections.
fn run_load(
    daemon: &Daemon,
    opts: &Options,
    connections: usize,
    total: u64,
    load: Load,
) -> Result<Outcome> {
    let templates = Arc::new(templates(opts.workload));
    let line_len = templates.iter().map(|t| t.line.len()).max().unwrap_or(300);
    let plan = Plan {
        window: opts.window,
        write_bytes: WRITE_BYTES,
        load,
        tick: opts.tick,
        timeout: opts.timeout,
        ..Plan::new(connections, total)
    };
    load::run(&daemon.socket, &plan, line_len, move |conn, n, buf| {
        build_event(&templates, conn, n, buf)
    })
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", daemon.stderr_tail(30)))
}

// ---------------------------------------------------------------------------------------------------------------
// Scenarios and reporting
// ---------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Figures {
    name: String,
    workload: Workload,
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
    /// The daemon's CPU time (user and system, all threads) per acknowledged event, in µs.
    fn cpu_us_per_event(&self) -> f64 {
        self.daemon_cpu.as_secs_f64() * 1e6 / self.events as f64
    }

    fn to_json(&self) -> serde_json::Value {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        json!({
            "scenario": self.name,
            "workload": self.workload.name(),
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
            "daemon_cpu_us_per_event": self.cpu_us_per_event(),
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

fn scenario(
    opts: &Options,
    fsync: Fsync,
    load: Load,
    events: u64,
    connections: usize,
) -> Result<Figures> {
    let mut name = match load {
        Load::Max => format!("{}/max", fsync.name()),
        Load::Paced(_) if opts.rate.is_none() => format!("{}/half", fsync.name()),
        Load::Paced(r) => format!("{}/{:.0}k", fsync.name(), r / 1000.0),
    };
    if opts.workload != Workload::Login || opts.connections.len() > 1 {
        let _ = write!(name, "/{connections}c");
    }
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!(
        "\n== {name}: {events} {} events over {connections} connections ({}), load average before: {load_average}",
        opts.workload.name(),
        match load {
            Load::Max => format!("max rate, window {}/connection", opts.window),
            Load::Paced(r) => format!("paced at {r:.0} events/s"),
        }
    );
    let mut daemon = start_daemon(fsync, opts)?;
    let log_fs = fs_type(&daemon.log_dir);
    if log_fs == "tmpfs" && fsync == Fsync::Always {
        eprintln!(
            "warning: the log is on tmpfs, where fdatasync does nothing; use --dir on a real disk"
        );
    }
    let pid = daemon.pid() as i32;
    let daemon_cpu_before = cpu_time(pid)?;
    let own_before = own_cpu_time();
    let machine_before = machine_cpu_time()?;
    let outcome = run_load(&daemon, opts, connections, events, load)?;
    let own_cpu = own_cpu_time() - own_before;
    let daemon_cpu = cpu_time(pid)? - daemon_cpu_before;
    let other_cpu = (machine_cpu_time()? - machine_before).saturating_sub(daemon_cpu + own_cpu);
    let peak_rss_kib = peak_rss_kib(pid)?;
    daemon.stop_cleanly()?;
    if daemon_log_filter().is_some() {
        let keep = target_dir().join(format!("bench-ingest-{}.log", name.replace('/', "-")));
        std::fs::copy(daemon.stderr_file(), &keep)
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
        workload: opts.workload,
        fsync,
        load,
        connections,
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
        "{:<16} {:>9} {:>7} {:>10} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10} {:>8} {:>9}",
        "scenario",
        "events",
        "seconds",
        "events/s",
        "µs/event",
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
            "{:<16} {:>9} {:>7.2} {:>10.0} {:>9.2} {:>7.1} {:>9} {:>9} {:>9} {:>9} {:>8.1} {:>9.0}% {:>7.0}% {:>8.0}%",
            f.name,
            f.events,
            f.seconds,
            f.events_per_sec(),
            f.cpu_us_per_event(),
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
        if f.workload == Workload::Realistic {
            realistic_targets(f, &mut checks);
            continue;
        }
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
                    if f.name.contains("/half") {
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

/// The realistic workload's targets (issue 17), checked on the runs with 4 connections; the others are reported
/// for comparison.
fn realistic_targets(f: &Figures, checks: &mut Vec<(String, bool)>) {
    let rss = (
        format!(
            "{}: peak RSS {:.1} MiB < {} MiB",
            f.name,
            f.peak_rss_kib as f64 / 1024.0,
            TARGET_RSS_KIB / 1024
        ),
        f.peak_rss_kib < TARGET_RSS_KIB,
    );
    if f.connections != REALISTIC_TARGET_CONNECTIONS {
        checks.push(rss);
        return;
    }
    let (eps, cpu) = match f.fsync {
        Fsync::Always => (REALISTIC_ALWAYS_EPS, REALISTIC_ALWAYS_CPU_US),
        Fsync::Never => (REALISTIC_NEVER_EPS, REALISTIC_NEVER_CPU_US),
    };
    match f.load {
        Load::Max => {
            checks.push((
                format!(
                    "{}: daemon CPU {:.2} µs/event <= {cpu:.1}",
                    f.name,
                    f.cpu_us_per_event()
                ),
                f.cpu_us_per_event() <= cpu,
            ));
            checks.push((
                format!("{}: {:.0} events/s >= {eps:.0}", f.name, f.events_per_sec()),
                f.events_per_sec() >= eps,
            ));
        }
        // The latency target is the `never` policy's.
        Load::Paced(r) if f.fsync == Fsync::Never => checks.push((
            format!(
                "{}: p99 {} ms < {} ms at {r:.0} events/s",
                f.name,
                ms(f.p99),
                REALISTIC_P99_HALF.as_millis()
            ),
            f.p99 < REALISTIC_P99_HALF,
        )),
        Load::Paced(_) => {}
    }
    checks.push(rss);
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
        let t = templates(opts.workload);
        t.iter().map(|t| t.line.len()).sum::<usize>() as f64 / t.len() as f64
    };
    let counts = opts
        .connections
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!(
        "trail ingest benchmark: daemon {}, {} CPUs, {} workload, {counts} connections, events ~{avg_template:.0} bytes{}",
        daemon_binary().display(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        opts.workload.name(),
        if opts.quick { ", quick run" } else { "" }
    );
    let mut rows = Vec::new();
    for &connections in &opts.connections {
        for &fsync in &opts.policies {
            let half = match opts.rate {
                Some(rate) if opts.paced_only => rate,
                _ => {
                    let events = opts.max_events(fsync, connections);
                    let max = scenario(&opts, fsync, Load::Max, events, connections)?;
                    let half = opts.rate.unwrap_or(max.events_per_sec() / 2.0);
                    rows.push(max);
                    half
                }
            };
            if opts.paced || opts.paced_only {
                let events = opts.paced_events(fsync, connections);
                rows.push(scenario(
                    &opts,
                    fsync,
                    Load::Paced(half),
                    events,
                    connections,
                )?);
            }
        }
    }
    println!(
        "\n== summary ({} workload, {counts} connections, window {}/connection; µs/event = daemon CPU per event; \
         MB = 10^6 bytes of request lines; latency = answer read - request written)",
        opts.workload.name(),
        opts.window
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
            "workload": opts.workload.name(),
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
