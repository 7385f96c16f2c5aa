//! `trail`: submit events to the daemon and check configurations.

use std::io::Write;
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
    /// Submit one event built from flags, or, without --type, every NDJSON line of standard input; prints each
    /// answer. Exits 0 when all were accepted, 1 when any was refused, 2 when the daemon cannot be reached.
    Emit(Box<Emit>),
    /// Show the running daemon's state: sinks (delivered, dead letters, backlog, stuck), plugins and their
    /// generations, the spool.
    Status(AdminArgs),
    /// Make the running daemon rescan its plugin directory and swap in changed plugin libraries (as SIGHUP does).
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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Emit(e) => emit(*e),
        Command::Status(a) => admin(a, json!({"command": "status"})),
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
    use std::io::IsTerminal;
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
    let owners = match args.owner.owners() {
        Ok(o) => o,
        Err(code) => return code,
    };
    let socket = args
        .admin_socket
        .unwrap_or_else(client::default_admin_socket);
    match Client::connect_trusting(&socket, &owners).and_then(|mut c| c.emit(&request)) {
        Ok(answer) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&answer).unwrap_or_default()
            );
            if answer["ok"] == json!(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!(
                "trail: cannot talk to the daemon's admin socket {}: {e}",
                socket.display()
            );
            ExitCode::from(2)
        }
    }
}

fn emit(args: Emit) -> ExitCode {
    let owners = match args.owner.owners() {
        Ok(o) => o,
        Err(code) => return code,
    };
    let socket = args.socket.clone().unwrap_or_else(client::default_socket);
    let unreachable = |e: std::io::Error| {
        eprintln!(
            "trail: cannot talk to the daemon at {}: {e}",
            socket.display()
        );
        ExitCode::from(2)
    };
    let Some(event) = event_from_flags(&args) else {
        let stdin = std::io::BufReader::new(std::io::stdin());
        let piped = client::connect(&socket, &owners)
            .and_then(|stream| client::pipeline_on(stream, stdin, std::io::stdout().lock()));
        return match piped {
            Ok(t) if t.rejected == 0 => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => unreachable(e),
        };
    };
    let event = match event {
        Ok(e) => e,
        Err(message) => {
            eprintln!("trail: {message}");
            return ExitCode::from(2);
        }
    };
    let answer =
        match Client::connect_trusting(&socket, &owners).and_then(|mut c| c.emit_raw(&event)) {
            Ok(a) => a,
            Err(e) => return unreachable(e),
        };
    let _ = writeln!(std::io::stdout(), "{answer}");
    if answer["ok"] == json!(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
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
    for (key, value) in [
        ("message", &args.message),
        ("outcome", &args.outcome),
        ("occurred_at", &args.occurred_at),
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
                "ok: {} event types in {}",
                v.registry.len(),
                config.event_types.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
