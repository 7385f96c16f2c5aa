//! `validate`'s check of the sinks: every library a sink uses is loaded, and an instance of each of its sinks
//! built and closed, in a child process, so that a library that crashes the process (a constructor that aborts,
//! a segmentation fault) becomes a clear problem naming the file instead of ending `validate` with a signal.
//!
//! The child is the running binary itself (`/proc/self/exe`, so `traild validate` and `trail validate` behave
//! the same) started with the hidden subcommand [`SUBCOMMAND`]. It reads one JSON request on standard input,
//! `{"file": …, "plugin": …, "sinks": [{"name": …, "config": "<the sink's config as JSON>"}]}`, and answers with
//! one line on standard output, `{"plugin": "<name version (api X.Y)>" or null, "build": {"name": …, "version": …,
//! "api_version": …} or null, "problems": ["…"]}`. Libraries no sink uses are never loaded, here or in the daemon.
//! `trail plugin check FILE` ([`check_library`]) makes the same request with no sinks. Nothing here records audit
//! events.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use trail_plugin_api::SinkError;

use super::generation::{InstanceError, InstanceProblem};
use super::loader::{self, Loader};
use super::{Error, Problem, pick, worker};
use crate::config::Config;

/// The hidden subcommand of `traild` and `trail` that runs [`child_main`].
pub const SUBCOMMAND: &str = "__check-plugin";

/// What [`check`] checked, when everything passed.
#[derive(Debug, Default)]
pub struct Checked {
    /// The sinks whose instance was built (and closed), in the configuration's order.
    pub sinks: Vec<String>,
    /// Every library loaded: `name version (api X.Y)` and its file, by plugin name.
    pub plugins: Vec<(String, PathBuf)>,
}

/// Checks the sinks of a configuration without starting them: picks the library of every plugin a sink uses
/// and checks each in a child process.
pub fn check(config: &Config) -> Result<Checked, Error> {
    let mut checked = Checked::default();
    let Some(dir) = &config.plugins_dir else {
        return Ok(checked);
    };
    if config.sinks.is_empty() {
        return Ok(checked);
    }
    let wanted: HashSet<&str> = config.sinks.iter().map(|s| s.plugin.as_str()).collect();
    let (picked, mut problems) = pick(dir, &wanted);
    let mut picked: Vec<(String, PathBuf)> = picked.into_iter().collect();
    picked.sort();
    for (plugin, file) in picked {
        let sinks = config
            .sinks
            .iter()
            .filter(|s| s.plugin == plugin)
            .map(|s| SinkRequest {
                name: s.name.clone(),
                config: worker::config_json(s),
            })
            .collect();
        let request = Request {
            file,
            plugin,
            sinks,
        };
        match in_child(&request) {
            Ok(answer) => {
                if let Some(described) = answer.plugin {
                    checked.plugins.push((described, request.file));
                }
                problems.extend(answer.problems.into_iter().map(Problem::Reported));
            }
            Err(kind) => problems.push(Problem::Check(CheckError {
                file: request.file,
                kind,
            })),
        }
    }
    if problems.is_empty() {
        checked.sinks = config.sinks.iter().map(|s| s.name.clone()).collect();
        Ok(checked)
    } else {
        Err(Error(problems))
    }
}

/// What [`check_library`] found out about a library.
#[derive(Debug)]
pub struct LibraryCheck {
    /// The plugin the daemon would take it for, read from its symbol table without loading it.
    pub identity: loader::Identity,
    /// What it declared when it was loaded, if it loaded.
    pub build: Option<BuildInfo>,
    /// Why the daemon would not load it; empty when it would.
    pub problems: Vec<String>,
}

/// A loaded build, as [`check_library`] reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildInfo {
    /// The plugin name it declares.
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// The plugin API version it was built against.
    pub api_version: String,
}

/// Loads the library at `file` the way the daemon would (picked by the name in its symbol table, the owner and
/// mode checks, a private copy, the ELF check, abi_stable's version and layout checks), in a child process, without
/// building a sink or starting anything: `trail plugin check`.
pub fn check_library(file: &Path) -> Result<LibraryCheck, CheckError> {
    let identity = loader::identify(file);
    let request = Request {
        file: file.to_owned(),
        plugin: identity.name.clone(),
        sinks: Vec::new(),
    };
    let answer = in_child(&request).map_err(|kind| CheckError {
        file: file.to_owned(),
        kind,
    })?;
    Ok(LibraryCheck {
        identity,
        build: answer.build,
        problems: answer.problems,
    })
}

/// A library that `validate` could not check in a child process.
#[derive(Debug, thiserror::Error)]
#[error("plugin {}: {kind}", file.display())]
pub struct CheckError {
    /// The library.
    pub file: PathBuf,
    /// What went wrong.
    pub kind: CheckErrorKind,
}

/// What went wrong with the process checking a library.
#[derive(Debug, thiserror::Error)]
pub enum CheckErrorKind {
    /// The process could not be started.
    #[error("cannot start a process to check it: {0}")]
    Spawn(std::io::Error),
    /// Waiting for it failed.
    #[error("cannot wait for the process checking it: {0}")]
    Wait(std::io::Error),
    /// The library crashed it.
    #[error(
        "crashed the process that loaded it ({name}, signal {signal}): its initialisation code or its sink \
         constructor is broken; it would crash the daemon the same way"
    )]
    Crashed {
        /// The signal's number.
        signal: i32,
        /// The signal's description.
        name: String,
    },
    /// It ended without answering.
    #[error("the process that checked it ended ({0}) without an answer")]
    NoAnswer(std::process::ExitStatus),
}

/// Runs the check of one library in a child process; returns its answer.
fn in_child(request: &Request) -> Result<Answer, CheckErrorKind> {
    let mut child = Command::new("/proc/self/exe")
        .arg(SUBCOMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(CheckErrorKind::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A child that dies at once closes the pipe; its exit status says why.
        let _ = stdin.write_all(&serde_json::to_vec(request).expect("serializable"));
    }
    let out = child.wait_with_output().map_err(CheckErrorKind::Wait)?;
    if let Some(signal) = out.status.signal() {
        return Err(CheckErrorKind::Crashed {
            signal,
            name: signal_name(signal),
        });
    }
    // The last answer line: the plugin's own code may have written to standard output too.
    let answer = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Answer>(l).ok());
    match answer {
        Some(a) if out.status.success() => Ok(a),
        _ => Err(CheckErrorKind::NoAnswer(out.status)),
    }
}

fn signal_name(signal: i32) -> String {
    // SAFETY: strsignal returns a pointer to a static or thread-local string, valid until the next call here.
    let text = unsafe { libc::strsignal(signal) };
    if text.is_null() {
        return format!("signal {signal}");
    }
    unsafe { std::ffi::CStr::from_ptr(text) }
        .to_string_lossy()
        .to_lowercase()
}

/// What the daemon asks the checking process.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    file: PathBuf,
    plugin: String,
    sinks: Vec<SinkRequest>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkRequest {
    name: String,
    config: String,
}

/// What the checking process answers: the build it loaded (`name version (api X.Y)`, and each part), and its
/// problems.
#[derive(Serialize, Deserialize)]
struct Answer {
    plugin: Option<String>,
    #[serde(default)]
    build: Option<BuildInfo>,
    problems: Vec<String>,
}

/// The child's side of the check: reads the request, loads the library (from a private copy in a new 0700
/// directory), builds and closes an instance of each sink, and prints the answer. Returns the exit code: 0 when
/// it answered, 2 for a request it cannot read.
pub fn child_main() -> i32 {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("{SUBCOMMAND}: cannot read the request on standard input: {e}");
        return 2;
    }
    let request: Request = match serde_json::from_str(&input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{SUBCOMMAND}: the request on standard input is not valid: {e}");
            return 2;
        }
    };
    let mut problems = Vec::new();
    let mut described = None;
    let mut build = None;
    match Loader::temporary() {
        Err(e) => problems.push(format!(
            "cannot make a private directory for plugin copies: {e}"
        )),
        Ok(loader) => match loader.load(&request.file, &request.plugin) {
            Err(e) => problems.push(Problem::Load(e).to_string()),
            Ok(plugin) => {
                described = Some(plugin.describe());
                build = Some(BuildInfo {
                    name: plugin.name.clone(),
                    version: plugin.version.clone(),
                    api_version: plugin.api_version.clone(),
                });
                for sink in &request.sinks {
                    match plugin.instantiate(&sink.name, &sink.config) {
                        Ok(mut instance) => {
                            let _ = instance.close();
                        }
                        Err(e) => problems.push(rejected(&sink.name, &request.plugin, e)),
                    }
                }
            }
        },
    }
    let answer = Answer {
        plugin: described,
        build,
        problems,
    };
    println!("{}", serde_json::to_string(&answer).expect("serializable"));
    0
}

/// A sink's configuration refused by its plugin, worded as at start-up.
fn rejected(sink: &str, plugin: &str, error: SinkError) -> String {
    Problem::Instance(InstanceProblem {
        sink: sink.to_owned(),
        plugin: plugin.to_owned(),
        error: InstanceError::Rejected(error),
    })
    .to_string()
}
