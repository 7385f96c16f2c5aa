//! `trail`: submit events to the daemon and check configurations.

#[path = "trail/plugin.rs"]
mod plugin;
#[path = "trail/status.rs"]
mod status;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args as ClapArgs, Parser, Subcommand};
use serde_json::{Map, Value, json};
use trail::Config;
use trail::client::{self, Client};

/// Command-line client and admin tool for the trail audit-trail daemon.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit one event built from flags (`trail emit -t TYPE -- message text` as logger does), or, without
    /// --type, every NDJSON line of standard input; prints each answer. Exits (sysexits) 0 when every event was
    /// acknowledged, 65 when one was refused as invalid (no retry helps), 75 when the daemon answered
    /// unavailable, rate_limited or too_many_connections (retry later), 69 when it cannot be reached.
    Emit(Box<Emit>),
    /// Show the running daemon's state: uptime, the configuration's generation and last reload (with its errors),
    /// event types, connections, fsync latency of the last minute, the log directory's size and free space, the
    /// last checkpoint, sinks (state, delivered, dead letters, backlog, oldest undelivered), plugins and their
    /// generations (with each plugin's last failed load, until that file loads), the spool. A table on a terminal,
    /// JSON otherwise or with --json.
    Status {
        /// Print the JSON answer even on a terminal.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the running daemon's metrics in the Prometheus text format (the same as its HTTP listener serves,
    /// `metrics.listen`); exit 2 when the daemon cannot be reached.
    Metrics {
        /// OpenMetrics text (ending in `# EOF`) instead of the classic format 0.0.4.
        #[arg(long)]
        openmetrics: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make the running daemon reload its configuration file and event types and rescan its plugin directory
    /// (as SIGHUP does). Prints the answer (JSON) and, on standard error, what was refused and what needs a
    /// restart; exits 1 when anything was refused (the old configuration or plugin build keeps serving).
    Reload(AdminArgs),
    /// Send a sink's dead letters again; those refused again go back to its dead-letter file.
    Replay {
        /// The sink's name.
        sink: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Check the log offline: the hash chain of every record, checkpoint signatures, missing, extra, truncated,
    /// reordered, repeated or modified records and files, records after a stop. Prints each problem with file,
    /// line and seq, and how many records no checkpoint covers; exit 0 only when all is intact, 1 when something
    /// is wrong, 2 when the input cannot be read.
    Verify {
        /// Log directories (with their checkpoints/), log files (.jsonl, .jsonl.zst) or checkpoint files
        /// [default: the configuration's log directory]
        paths: Vec<PathBuf>,
        /// The daemon's checkpoint public key: a PEM file or 64 hex digits.
        #[arg(long)]
        key: Option<String>,
        /// Checkpoints kept elsewhere, checked like the log's own: a directory of checkpoint files, or a JSON-lines
        /// file of checkpoint lines or trail_checkpoint records (what a sink delivered). Repeatable.
        #[arg(long, value_name = "PATH")]
        checkpoints: Vec<PathBuf>,
        /// Configuration file whose log directory to check when no path is given.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Write a JSON bundle proving that record SEQ is in the log's signed Merkle tree (the record line, its
    /// inclusion proof, the checkpoint and its C2SP note), or with --consistency OLD NEW that checkpoint NEW's tree
    /// extends OLD's. Checked without the log by `trail verify-proof`. Exit 0 with the bundle on standard output, 1
    /// when it cannot be proved, 2 on an input error.
    Prove {
        /// The record's seq (not with --consistency).
        #[arg(required_unless_present = "consistency")]
        seq: Option<u64>,
        /// The checkpoint file to prove against [default: the newest with a tree that covers SEQ].
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Two checkpoint files, older first: prove the later tree extends the earlier.
        #[arg(long, num_args = 2, value_names = ["OLD", "NEW"], conflicts_with_all = ["seq", "checkpoint"])]
        consistency: Option<Vec<PathBuf>>,
        /// The log directory [default: the configuration's].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Configuration file whose log directory to use when --dir is not given.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a bundle from `trail prove` against the daemon's public key, without the log: both signatures of
    /// each checkpoint (JSON and C2SP note) and the RFC 9162 proof. Exit 0 when it holds, 1 when not, 2 on an
    /// input error.
    VerifyProof {
        /// The bundle file (- for standard input).
        bundle: PathBuf,
        /// The daemon's checkpoint public key: a PEM file or 64 hex digits.
        #[arg(long)]
        key: String,
    },
    /// Find records in the log files (read directly; the daemon need not run). Newest first unless --oldest-first;
    /// JSON lines when the output is not a terminal, a table when it is. Exit 0 when any record matched, 1 when
    /// none did, 2 on an error.
    Search(Box<Search>),
    /// Sink plugins of your own: make a new plugin crate against the installed SDK, or check a library the way
    /// the daemon loads it.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// (Internal, used by `validate`) check one plugin library in this process: a JSON request on standard
    /// input, a JSON answer on standard output.
    #[command(name = "__check-plugin", hide = true)]
    CheckPlugin,
    /// Check a configuration and its event types without starting anything (exit 0 valid, 78 invalid).
    Validate {
        /// Configuration file; without it, the embedded development configuration.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Check this event-type directory instead of the configuration's.
        #[arg(long)]
        event_types: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Make a sink plugin crate NAME in DIR (default ./NAME) from the template built into trail: the crate and
    /// its plugin are called NAME, and its dependencies (trail-plugin-api, and trail-plugin-testkit for its tests)
    /// point at the installed SDK. It builds and passes its tests as it is (`cargo test`, `cargo build
    /// --release`); its README says which file the build produces and how to install it. Exit 0 when made, 2
    /// for a name, directory or SDK that cannot be used.
    New {
        /// The crate's name (lower-case letters, digits, - and _), also the plugin's name in trail.yaml.
        name: String,
        /// Where to make it; must not exist or be empty [default: ./NAME]
        dir: Option<PathBuf>,
        /// The SDK's directory [default: $TRAIL_SDK, else share/trail/sdk beside the directory of this binary if
        /// it exists, else /usr/share/trail/sdk]
        #[arg(long, env = plugin::SDK_VAR, value_name = "PATH")]
        sdk: Option<PathBuf>,
    },
    /// Load a plugin library the way the daemon would (picked by the name in its symbol table, owner and mode,
    /// a private copy, ELF check, API version and layout checks) without building a sink or starting anything;
    /// print its name, version, API version and the result. Owner and mode are judged as if the daemon ran as
    /// you. Exit 0 only when the daemon would load it, 1 when not, 2 when it could not be checked.
    Check {
        /// The library (a .so file).
        file: PathBuf,
    },
}

#[derive(ClapArgs)]
struct AdminArgs {
    /// The daemon's admin socket [default: $TRAIL_ADMIN_SOCKET, else admin.sock beside the development socket]
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    #[command(flatten)]
    owner: OwnerArgs,
}

#[derive(ClapArgs)]
struct OwnerArgs {
    /// The user the daemon runs as, when it is neither root nor you (a name or a uid): its socket, and the
    /// directories above it, may belong to that user. Sockets of anyone else are refused.
    #[arg(long, env = client::SOCKET_OWNER_VAR, value_name = "USER")]
    socket_owner: Option<String>,
}

impl OwnerArgs {
    /// Whom to trust with the socket; prints the error and gives exit code 2 when the user is unknown.
    fn owners(&self) -> Result<client::Owners, ExitCode> {
        let owners = client::Owners::me();
        match self
            .socket_owner
            .as_deref()
            .filter(|s| !s.trim().is_empty())
        {
            None => Ok(owners),
            Some(who) => owners.and_user(who, "--socket-owner").map_err(|e| {
                eprintln!("trail: {e}");
                ExitCode::from(2)
            }),
        }
    }
}

#[derive(ClapArgs)]
struct Search {
    /// The log directory [default: the configuration's]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Configuration file whose log directory to search.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Only records received in this last span, e.g. 15m, 1h, 7d.
    #[arg(long)]
    since: Option<String>,
    /// Only records received at or after this time (RFC 3339).
    #[arg(long)]
    from: Option<String>,
    /// Only records received before this time (RFC 3339).
    #[arg(long)]
    to: Option<String>,
    /// Event type; globs with * and ? allowed; repeat for any of several.
    #[arg(long = "type", short = 't')]
    types: Vec<String>,
    /// actor.id
    #[arg(long)]
    actor: Option<String>,
    /// target.id
    #[arg(long)]
    target: Option<String>,
    /// success, failure or denied
    #[arg(long)]
    outcome: Option<String>,
    /// source.uid
    #[arg(long)]
    uid: Option<u32>,
    /// Text that any string value contains (case-sensitive).
    #[arg(long)]
    text: Option<String>,
    /// Log order instead of newest first.
    #[arg(long)]
    oldest_first: bool,
    /// At most this many records.
    #[arg(long, short = 'n')]
    limit: Option<usize>,
    /// Output format [default: table on a terminal, json otherwise]
    #[arg(long, value_parser = ["json", "table"])]
    format: Option<String>,
    /// Keep running and print new matching records as they are written (after the latest matches, oldest first).
    #[arg(long, short = 'f')]
    follow: bool,
}

#[derive(ClapArgs)]
struct Emit {
    /// The daemon's socket [default: $TRAIL_SOCKET, else the development socket]
    #[arg(long, short)]
    socket: Option<PathBuf>,
    #[command(flatten)]
    owner: OwnerArgs,
    /// Event type; without it, events are read from standard input, one JSON object per line.
    #[arg(long = "type", short = 't')]
    event_type: Option<String>,
    /// actor.id
    #[arg(long)]
    actor_id: Option<String>,
    /// actor.name
    #[arg(long)]
    actor_name: Option<String>,
    /// actor.type
    #[arg(long)]
    actor_type: Option<String>,
    /// actor.ip
    #[arg(long)]
    actor_ip: Option<String>,
    /// target.type
    #[arg(long)]
    target_type: Option<String>,
    /// target.id
    #[arg(long)]
    target_id: Option<String>,
    /// target.name
    #[arg(long)]
    target_name: Option<String>,
    /// message
    #[arg(long, short)]
    message: Option<String>,
    /// success, failure or denied
    #[arg(long)]
    outcome: Option<String>,
    /// payload, a JSON object
    #[arg(long, short)]
    payload: Option<String>,
    /// occurred_at, RFC 3339
    #[arg(long)]
    occurred_at: Option<String>,
    /// idempotency_key: a repeat within the daemon's window stores nothing and is answered "duplicate"
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Retry answers that say "later" (unavailable, rate_limited, too_many_connections) and unreachable
    /// daemons for this long (e.g. 30s, 5m), with backoff; every event is sent with an idempotency_key (one is
    /// generated when it has none), so a retry never stores an event twice.
    #[arg(long, value_name = "DURATION", value_parser = trail::config::parse_duration)]
    retry: Option<std::time::Duration>,
    /// The message, as words (logger's form: `trail emit -t TYPE -- disk replaced in slot 4`).
    #[arg(trailing_var_arg = true, value_name = "MESSAGE")]
    words: Vec<String>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Emit(e) => emit(*e),
        Command::Status { json, admin: a } => {
            let table = !json && std::io::stdout().is_terminal();
            match ask(a, json!({"command": "status"})) {
                Ok(answer) if table => {
                    print!("{}", status::table(&answer));
                    exit_of(&answer)
                }
                Ok(answer) => print_answer(&answer),
                Err(code) => code,
            }
        }
        Command::Metrics {
            openmetrics,
            admin: a,
        } => match ask(a, json!({"command": "metrics", "openmetrics": openmetrics})) {
            Ok(answer) => match answer["text"].as_str() {
                Some(text) if answer["ok"] == json!(true) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                _ => print_answer(&answer),
            },
            Err(code) => code,
        },
        Command::Reload(a) => admin(a, json!({"command": "reload"})),
        Command::Replay { sink, admin: a } => admin(a, json!({"command": "replay", "sink": sink})),
        Command::Validate {
            config,
            event_types,
        } => validate(config, event_types),
        Command::Verify {
            paths,
            key,
            checkpoints,
            config,
        } => verify(paths, key, checkpoints, config),
        Command::Search(s) => search(*s),
        Command::Prove {
            seq,
            checkpoint,
            consistency,
            dir,
            config,
        } => prove(seq, checkpoint, consistency, dir, config),
        Command::VerifyProof { bundle, key } => verify_proof(&bundle, &key),
        Command::Plugin(PluginCommand::New { name, dir, sdk }) => plugin::new(&name, dir, sdk),
        Command::Plugin(PluginCommand::Check { file }) => plugin::check(&file),
        Command::CheckPlugin => ExitCode::from(trail::sinks::validate::child_main() as u8),
    }
}

/// The log directory of `config` (or of the development configuration).
fn log_dir(config: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    match config {
        Some(path) => Config::load(&path).map(|c| c.log.dir).map_err(|e| {
            eprintln!("{e}");
            ExitCode::from(trail::EXIT_CONFIG as u8)
        }),
        None => Ok(Config::development().log.dir),
    }
}

fn prove(
    seq: Option<u64>,
    checkpoint: Option<PathBuf>,
    consistency: Option<Vec<PathBuf>>,
    dir: Option<PathBuf>,
    config: Option<PathBuf>,
) -> ExitCode {
    use trail::tools::prove;
    let dir = match dir {
        Some(d) => d,
        None => match log_dir(config) {
            Ok(d) => d,
            Err(code) => return code,
        },
    };
    let bundle = match (consistency.as_deref(), seq) {
        (Some([old, new]), _) => prove::prove_consistency(&dir, old, new),
        (_, Some(seq)) => prove::prove(&dir, seq, checkpoint.as_deref()),
        _ => Err("give a seq or --consistency OLD NEW".into()),
    };
    match bundle {
        Ok(b) => {
            println!("{}", serde_json::to_string(&b).expect("serializable"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trail prove: {e}");
            ExitCode::FAILURE
        }
    }
}

fn verify_proof(bundle: &std::path::Path, key: &str) -> ExitCode {
    use trail::tools::prove;
    let key = match trail::log::checkpoint::read_public_key(key) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("trail verify-proof: {e}");
            return ExitCode::from(2);
        }
    };
    let text = if bundle == std::path::Path::new("-") {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t).map(|_| t)
    } else {
        std::fs::read_to_string(bundle)
    };
    let parsed = text
        .map_err(|e| format!("{}: {e}", bundle.display()))
        .and_then(|t| {
            serde_json::from_str::<prove::Bundle>(&t)
                .map_err(|e| format!("{}: not a proof bundle ({e})", bundle.display()))
        });
    let bundle = match parsed {
        Ok(b) => b,
        Err(e) => {
            eprintln!("trail verify-proof: {e}");
            return ExitCode::from(2);
        }
    };
    match prove::verify_proof(&bundle, &key) {
        Ok(what) => {
            println!("proof ok: {what}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("PROOF FAILS: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A time given as RFC 3339 or as a span back from now.
fn time_arg(flag: &str, text: &str) -> Result<std::time::SystemTime, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(std::time::SystemTime::from)
        .map_err(|e| {
            format!("--{flag} {text:?}: not an RFC 3339 time ({e}), e.g. 2026-11-20T10:00:00Z")
        })
}

fn search(args: Search) -> ExitCode {
    use trail::log::files;
    use trail::tools::search;
    let dir = match args.dir {
        Some(d) => d,
        None => match log_dir(args.config) {
            Ok(d) => d,
            Err(code) => return code,
        },
    };
    let fail = |message: String| {
        eprintln!("trail search: {message}");
        ExitCode::from(2)
    };
    let mut query = search::Query {
        types: args.types,
        actor: args.actor,
        target: args.target,
        outcome: args.outcome,
        uid: args.uid,
        text: args.text,
        newest_first: !args.oldest_first || args.follow,
        limit: args.limit,
        ..Default::default()
    };
    if let Some(since) = &args.since {
        match trail::config::parse_duration(since) {
            Ok(d) => query.from = Some(files::stamp(std::time::SystemTime::now() - d)),
            Err(e) => return fail(format!("--since: {e}")),
        }
    }
    for (flag, value, slot) in [
        ("from", &args.from, &mut query.from),
        ("to", &args.to, &mut query.to),
    ] {
        if let Some(text) = value {
            match time_arg(flag, text) {
                Ok(t) => *slot = Some(files::stamp(t)),
                Err(e) => return fail(e),
            }
        }
    }
    let table = match args.format.as_deref() {
        Some("table") => true,
        Some(_) => false,
        None => std::io::stdout().is_terminal(),
    };
    let mut out = std::io::stdout().lock();
    if table {
        let _ = writeln!(
            out,
            "{:<30}  {:>8}  {:<26}  {:<14}  {:<14}  {:<8}  message",
            "received_at", "seq", "type", "actor", "target", "outcome"
        );
    }
    let print = |line: &[u8], out: &mut std::io::StdoutLock| -> bool {
        if !table {
            return out
                .write_all(line)
                .and_then(|()| out.write_all(b"\n"))
                .is_ok();
        }
        let v: Value = serde_json::from_slice(line).unwrap_or_default();
        let s = |v: &Value| {
            v.as_str().map(str::to_owned).unwrap_or_else(|| {
                if v.is_null() {
                    String::new()
                } else {
                    v.to_string()
                }
            })
        };
        writeln!(
            out,
            "{:<30}  {:>8}  {:<26}  {:<14}  {:<14}  {:<8}  {}",
            s(&v["received_at"]),
            s(&v["seq"]),
            s(&v["type"]),
            s(&v["actor"]["id"]),
            s(&v["target"]["id"]),
            s(&v["outcome"]),
            s(&v["message"])
        )
        .is_ok()
    };
    let mut held: Vec<Vec<u8>> = Vec::new();
    let result = search::search(&dir, &query, &mut |line| {
        if args.follow {
            held.push(line.to_vec());
            true
        } else {
            print(line, &mut out)
        }
    });
    let stats = match result {
        Ok(s) => s,
        Err(e) => return fail(format!("{}: {e}", dir.display())),
    };
    if args.follow {
        for line in held.iter().rev() {
            if !print(line, &mut out) {
                return ExitCode::SUCCESS;
            }
        }
        let _ = out.flush();
        let follow = search::follow(
            &dir,
            &query,
            stats.end,
            std::time::Duration::from_millis(200),
            &mut |line| print(line, &mut out) && out.flush().is_ok(),
        );
        return match follow {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("{}: {e}", dir.display())),
        };
    }
    if stats.matches > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn verify(
    mut paths: Vec<PathBuf>,
    key: Option<String>,
    outside: Vec<PathBuf>,
    config: Option<PathBuf>,
) -> ExitCode {
    use trail::log::checkpoint;
    use trail::tools::verify;
    if paths.is_empty() {
        match log_dir(config) {
            Ok(dir) => paths.push(dir),
            Err(code) => return code,
        }
    }
    let key = match key.as_deref().map(checkpoint::read_public_key).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("trail verify: {e}");
            return ExitCode::from(2);
        }
    };
    let mut inputs = match verify::Inputs::gather(&paths) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("trail verify: {e}");
            return ExitCode::from(2);
        }
    };
    for path in &outside {
        if let Err(e) = inputs.add_outside(path) {
            eprintln!("trail verify: --checkpoints {e}");
            return ExitCode::from(2);
        }
    }
    let started = std::time::Instant::now();
    let report = match verify::verify(&inputs, key.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trail verify: {e}");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout().lock();
    for p in &report.problems {
        let _ = writeln!(out, "problem: {p}");
    }
    for n in &report.notes {
        let _ = writeln!(out, "note: {n}");
    }
    let seqs = report
        .seqs
        .map(|(a, b)| format!(", seq {a}..{b}"))
        .unwrap_or_default();
    // Always said, so that "intact" never hides that nothing was signed.
    let covered = match report.covered {
        Some(seq) => format!("after seq {seq}, the last a checkpoint covers"),
        None => "no checkpoint covers any record".to_owned(),
    };
    let _ = writeln!(
        out,
        "unsigned: {} records ({covered}); only the hash chain protects them",
        report.unsigned
    );
    if !outside.is_empty() {
        let _ = writeln!(
            out,
            "outside: {} of the checkpoints were kept elsewhere",
            report.outside
        );
    }
    let _ = writeln!(
        out,
        "{}: {} records in {} files ({} bytes{seqs}), {} checkpoints, {} problems, {:.2?}",
        if report.intact() {
            "intact"
        } else {
            "NOT INTACT"
        },
        report.records,
        report.files,
        report.bytes,
        report.checkpoints,
        report.problems.len(),
        started.elapsed()
    );
    if report.intact() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Sends one admin request and prints the answer, pretty; exits 0 when it says ok.
fn admin(args: AdminArgs, request: Value) -> ExitCode {
    let reload = request["command"] == "reload";
    match ask(args, request) {
        Ok(answer) => {
            let code = print_answer(&answer);
            if reload {
                summarize_reload(&answer);
            }
            code
        }
        Err(code) => code,
    }
}

/// Sends one admin request and reads its answer; says why on standard error (exit code 2) when the daemon
/// cannot be reached.
fn ask(args: AdminArgs, request: Value) -> Result<Value, ExitCode> {
    let owners = args.owner.owners()?;
    let socket = args
        .admin_socket
        .clone()
        .unwrap_or_else(client::default_admin_socket);
    Client::connect_trusting(&socket, &owners)
        .map_err(std::io::Error::from)
        .and_then(|mut c| c.emit(&request))
        .map_err(|e| {
            eprintln!(
                "trail: cannot talk to the daemon's admin socket {}: {e}",
                socket.display()
            );
            ExitCode::from(2)
        })
}

/// Prints an admin answer as indented JSON; exit 0 when it says `ok`, 1 otherwise.
fn print_answer(answer: &Value) -> ExitCode {
    println!(
        "{}",
        serde_json::to_string_pretty(answer).unwrap_or_default()
    );
    exit_of(answer)
}

/// Exit 0 when an admin answer says `ok`, 1 otherwise.
fn exit_of(answer: &Value) -> ExitCode {
    if answer["ok"] == json!(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Says on standard error what a reload refused and what needs a restart.
fn summarize_reload(answer: &Value) {
    let config = &answer["config"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    match config["result"].as_str() {
        Some("applied") => eprintln!(
            "trail: configuration reloaded: generation {}",
            config["generation"]
        ),
        Some(_) => {
            eprintln!(
                "trail: configuration refused; generation {} keeps serving:",
                config["generation"]
            );
            for e in strings(&config["errors"]) {
                eprintln!("  {e}");
            }
        }
        None => {}
    }
    for r in strings(&config["restart_needed"]) {
        eprintln!("trail: needs a restart: {r}");
    }
    for w in strings(&config["warnings"]) {
        eprintln!("trail: warning: {w}");
    }
    for p in answer["reloaded"].as_array().into_iter().flatten() {
        if p["ok"] == json!(false) {
            eprintln!(
                "trail: plugin {} refused: {}",
                p["plugin"].as_str().unwrap_or("?"),
                p["error"].as_str().unwrap_or("?")
            );
        }
    }
}

/// sysexits(3): the input data was incorrect (a refused event).
const EX_DATAERR: u8 = 65;
/// sysexits(3): the service is unavailable (the daemon cannot be reached).
const EX_UNAVAILABLE: u8 = 69;
/// sysexits(3): a temporary failure; trying again later may work.
const EX_TEMPFAIL: u8 = 75;
/// Lines of standard input sent (and, with --retry, retried) together.
const EMIT_BATCH: usize = 1024;

fn emit(args: Emit) -> ExitCode {
    let owners = match args.owner.owners() {
        Ok(o) => o,
        Err(code) => return code,
    };
    let socket = args.socket.clone().unwrap_or_else(client::default_socket);
    let connect = || client::connect(&socket, &owners).map_err(std::io::Error::from);
    let lines = match event_from_flags(&args) {
        Some(Ok(line)) => vec![line],
        Some(Err(message)) => {
            eprintln!("trail: {message}");
            return ExitCode::from(EX_DATAERR);
        }
        None if !args.words.is_empty() => {
            eprintln!("trail: a message given as words needs --type");
            return ExitCode::from(2);
        }
        None => {
            let mut worst = Outcome::Acknowledged;
            let mut batch = Vec::new();
            let mut stdin = std::io::stdin().lock();
            loop {
                let mut line = Vec::new();
                let n = match std::io::BufRead::read_until(&mut stdin, b'\n', &mut line) {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("trail: cannot read standard input: {e}");
                        return ExitCode::from(74);
                    }
                };
                if n > 0 && !line.iter().all(u8::is_ascii_whitespace) {
                    if line.last() != Some(&b'\n') {
                        line.push(b'\n');
                    }
                    batch.push(line);
                }
                if batch.len() == EMIT_BATCH || (n == 0 && !batch.is_empty()) {
                    worst = worst.max(submit(
                        std::mem::take(&mut batch),
                        args.retry,
                        &connect,
                        &socket,
                    ));
                    if worst == Outcome::Unreachable {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            return worst.exit_code();
        }
    };
    submit(lines, args.retry, &connect, &socket).exit_code()
}

/// How a submission of some events ended, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Acknowledged,
    /// Some answer said to try again later.
    Later,
    /// Some event was refused for what it is.
    Refused,
    /// Some event got no answer: the daemon could not be reached or closed the connection.
    Unreachable,
}

impl Outcome {
    fn exit_code(self) -> ExitCode {
        ExitCode::from(match self {
            Outcome::Acknowledged => 0,
            Outcome::Later => EX_TEMPFAIL,
            Outcome::Refused => EX_DATAERR,
            Outcome::Unreachable => EX_UNAVAILABLE,
        })
    }

    fn of(answer: &Value) -> Outcome {
        if answer["ok"] == json!(true) {
            return Outcome::Acknowledged;
        }
        match answer["error"]["code"].as_str() {
            Some("unavailable" | "rate_limited" | "too_many_connections") => Outcome::Later,
            _ => Outcome::Refused,
        }
    }
}

/// Sends `lines` (each ending in a newline) pipelined on one connection, prints the answers in order and says how
/// it ended. With `retry`, events answered "later", and those the daemon did not answer, are sent again with
/// backoff until `retry` has passed, each with the same idempotency_key every time (added when missing).
fn submit(
    mut lines: Vec<Vec<u8>>,
    retry: Option<std::time::Duration>,
    connect: &dyn Fn() -> std::io::Result<std::os::unix::net::UnixStream>,
    socket: &std::path::Path,
) -> Outcome {
    use std::time::{Duration, Instant};
    if retry.is_some() {
        for line in &mut lines {
            with_idempotency_key(line);
        }
    }
    let deadline = retry.map(|r| Instant::now() + r);
    let mut answers: Vec<Option<Value>> = vec![None; lines.len()];
    let mut todo: Vec<usize> = (0..lines.len()).collect();
    let mut backoff = Duration::from_millis(100);
    let mut failure = None;
    loop {
        let got = connect().and_then(|stream| {
            let batch: Vec<&[u8]> = todo.iter().map(|&i| lines[i].as_slice()).collect();
            exchange(stream, &batch)
        });
        let (got, error) = match got {
            Ok((got, error)) => (got, error),
            Err(e) => (Vec::new(), Some(e)),
        };
        let mut again = Vec::new();
        for (k, &i) in todo.iter().enumerate() {
            match got.get(k) {
                Some(answer) => {
                    if Outcome::of(answer) == Outcome::Later {
                        again.push(i);
                    }
                    answers[i] = Some(answer.clone());
                }
                None => again.push(i),
            }
        }
        failure = error.or(failure);
        // A rate_limited answer says when the daemon takes the next event: wait at least that long.
        let asked = again
            .iter()
            .filter_map(|&i| answers[i].as_ref()?["error"]["retry_after_ms"].as_u64())
            .max()
            .map(Duration::from_millis)
            .unwrap_or_default();
        let delay = backoff.max(asked);
        let retrying = deadline.is_some_and(|d| Instant::now() + delay < d);
        if again.is_empty() || !retrying {
            break;
        }
        eprintln!(
            "trail: {} event(s) not stored yet ({}); sending them again in {delay:?}",
            again.len(),
            failure.as_ref().map_or_else(
                || {
                    let codes: std::collections::BTreeSet<&str> = again
                        .iter()
                        .filter_map(|&i| answers[i].as_ref()?["error"]["code"].as_str())
                        .collect();
                    codes.into_iter().collect::<Vec<_>>().join(", ")
                },
                |e| e.to_string()
            )
        );
        failure = None;
        todo = again;
        std::thread::sleep(delay);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    let mut out = std::io::stdout().lock();
    let mut worst = Outcome::Acknowledged;
    let mut unanswered = 0;
    for answer in &answers {
        match answer {
            Some(a) => {
                let _ = writeln!(out, "{a}");
                worst = worst.max(Outcome::of(a));
            }
            None => unanswered += 1,
        }
    }
    if unanswered > 0 {
        let why = failure.map_or_else(|| "no answer".to_owned(), |e| e.to_string());
        eprintln!(
            "trail: cannot talk to the daemon at {}: {why}; {unanswered} event(s) got no answer",
            socket.display()
        );
        // A daemon that turned the connection away (too_many_connections) answered for the first event only.
        if worst != Outcome::Later {
            worst = Outcome::Unreachable;
        }
    }
    worst
}

/// Sends `lines` on `stream` from a second thread while reading their answers; returns the answers read and,
/// when fewer came than were sent, why.
fn exchange(
    stream: std::os::unix::net::UnixStream,
    lines: &[&[u8]],
) -> std::io::Result<(Vec<Value>, Option<std::io::Error>)> {
    let mut writer = stream.try_clone()?;
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || -> std::io::Result<()> {
            let mut buffered = std::io::BufWriter::with_capacity(64 << 10, &mut writer);
            for line in lines {
                buffered.write_all(line)?;
            }
            buffered.flush()?;
            drop(buffered);
            writer.shutdown(std::net::Shutdown::Write)
        });
        let mut answers = Vec::with_capacity(lines.len());
        let mut failure = None;
        let reader = std::io::BufReader::new(&stream);
        for line in std::io::BufRead::lines(reader).take(lines.len()) {
            match line.map(|l| serde_json::from_str::<Value>(&l)) {
                Ok(Ok(answer)) => answers.push(answer),
                Ok(Err(e)) => {
                    failure = Some(std::io::Error::other(format!("unreadable answer: {e}")));
                    break;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("sender panicked")));
        if answers.len() < lines.len() {
            let closed = std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection",
            );
            failure = failure.or(sent.err()).or(Some(closed));
        }
        Ok((answers, failure))
    })
}

/// Adds `"idempotency_key":"trail-emit-<UUID v7>"` to a request line that is a JSON object without one. Other
/// lines are left as they are (the daemon refuses them).
fn with_idempotency_key(line: &mut Vec<u8>) {
    #[derive(serde::Deserialize)]
    struct Keyed<'a> {
        #[serde(borrow)]
        idempotency_key: Option<&'a serde_json::value::RawValue>,
    }
    let has_key = match serde_json::from_slice::<Keyed>(line) {
        Ok(k) => k.idempotency_key.is_some(),
        Err(_) => return,
    };
    let Some(open) = line.iter().position(|&b| b == b'{') else {
        return;
    };
    if has_key {
        return;
    }
    let empty = line[open + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'}');
    let key = format!(
        "\"idempotency_key\":\"trail-emit-{}\"{}",
        uuid::Uuid::now_v7(),
        if empty { "" } else { "," }
    );
    line.splice(open + 1..open + 1, key.into_bytes());
}

/// The request line the flags describe, newline included; `None` when no --type was given (read standard input
/// instead). `--payload` is sent as written, not parsed and written again, so its numbers keep every digit and
/// the daemon sees any repeated key.
fn event_from_flags(args: &Emit) -> Option<Result<Vec<u8>, String>> {
    let event_type = args.event_type.as_ref()?;
    let mut event = Map::new();
    event.insert("type".into(), json!(event_type));
    let object = |fields: &[(&str, &Option<String>)]| -> Option<Value> {
        let map: Map<String, Value> = fields
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), json!(v))))
            .collect();
        (!map.is_empty()).then_some(Value::Object(map))
    };
    if let Some(actor) = object(&[
        ("id", &args.actor_id),
        ("name", &args.actor_name),
        ("type", &args.actor_type),
        ("ip", &args.actor_ip),
    ]) {
        event.insert("actor".into(), actor);
    }
    if let Some(target) = object(&[
        ("type", &args.target_type),
        ("id", &args.target_id),
        ("name", &args.target_name),
    ]) {
        event.insert("target".into(), target);
    }
    let words = (!args.words.is_empty()).then(|| args.words.join(" "));
    if words.is_some() && args.message.is_some() {
        return Some(Err(
            "give the message either with --message or as words after the flags, not both".into(),
        ));
    }
    for (key, value) in [
        ("message", args.message.as_ref().or(words.as_ref())),
        ("outcome", args.outcome.as_ref()),
        ("occurred_at", args.occurred_at.as_ref()),
        ("idempotency_key", args.idempotency_key.as_ref()),
    ] {
        if let Some(v) = value {
            event.insert(key.into(), json!(v));
        }
    }
    #[derive(serde::Serialize)]
    struct Line<'a> {
        #[serde(flatten)]
        fields: Map<String, Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<&'a serde_json::value::RawValue>,
    }
    let payload = match args.payload.as_deref().map(serde_json::from_str) {
        None => None,
        Some(Ok(raw)) => Some(raw),
        Some(Err(e)) => return Some(Err(format!("--payload is not JSON: {e}"))),
    };
    let mut line = serde_json::to_vec(&Line {
        fields: event,
        payload,
    })
    .expect("serializing to a Vec cannot fail");
    line.push(b'\n');
    Some(Ok(line))
}

fn validate(config: Option<PathBuf>, event_types: Option<PathBuf>) -> ExitCode {
    let mut config = match &config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(trail::EXIT_CONFIG as u8);
            }
        },
        None => Config::development(),
    };
    if let Some(dir) = event_types {
        config.event_types = dir;
    }
    match trail::validate(&config) {
        Ok(v) => {
            println!(
                "ok: {} event types of yours in {} and {} built in; {} sinks built; {} plugins loaded",
                v.own_event_types(),
                config.event_types.display(),
                v.builtin_event_types(),
                v.sinks.sinks.len(),
                v.sinks.plugins.len()
            );
            for sink in &v.sinks.sinks {
                println!("sink built: {sink}");
            }
            for (plugin, file) in &v.sinks.plugins {
                println!("plugin loaded: {plugin} from {}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
