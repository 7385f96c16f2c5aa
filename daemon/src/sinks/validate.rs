//! `validate`'s check of the sinks: every library a sink uses is loaded, and an instance of each of its sinks
//! built and closed, in a child process, so that a library that crashes the process (a constructor that aborts,
//! a segmentation fault) becomes a clear problem naming the file instead of ending `validate` with a signal.
//!
//! The child is the running binary itself (`/proc/self/exe`, so `traild validate` and `trail validate` behave
//! the same) started with the hidden subcommand [`SUBCOMMAND`]. It reads one JSON request on standard input,
//! `{"file": …, "plugin": …, "sinks": [{"name": …, "config": "<the sink's config as JSON>"}]}`, and answers with
//! one line on standard output, `{"plugin": "<name version (api X.Y)>" or null, "problems": ["…"]}`. Libraries
//! no sink uses are never loaded, here or in the daemon. Nothing here records audit events.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::{Value, json};

use super::loader::Loader;
use super::{Error, pick, worker};
use crate::config::Config;

/// The hidden subcommand of `traild` and `trail` that runs [`child_main`].
pub const SUBCOMMAND: &str = "__check-plugin";

/// Checks the sinks of a configuration without starting them: picks the library of every plugin a sink uses
/// and checks each in a child process.
pub fn check(config: &Config) -> Result<(), Error> {
    let Some(dir) = &config.plugins_dir else {
        return Ok(());
    };
    if config.sinks.is_empty() {
        return Ok(());
    }
    let wanted: HashSet<&str> = config.sinks.iter().map(|s| s.plugin.as_str()).collect();
    let (picked, mut problems) = pick(dir, &wanted);
    let mut picked: Vec<(String, PathBuf)> = picked.into_iter().collect();
    picked.sort();
    for (plugin, file) in picked {
        let sinks: Vec<Value> = config
            .sinks
            .iter()
            .filter(|s| s.plugin == plugin)
            .map(|s| json!({"name": s.name, "config": worker::config_json(s)}))
            .collect();
        let request = json!({"file": file, "plugin": plugin, "sinks": sinks});
        problems.extend(in_child(&file, &request));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error(problems))
    }
}

/// Runs the check of one library in a child process; returns its problems.
fn in_child(file: &Path, request: &Value) -> Vec<String> {
    let problem = |what: String| vec![format!("plugin {}: {what}", file.display())];
    let child = Command::new("/proc/self/exe")
        .arg(SUBCOMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return problem(format!("cannot start a process to check it: {e}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A child that dies at once closes the pipe; its exit status says why.
        let _ = stdin.write_all(&serde_json::to_vec(request).expect("serializable"));
    }
    let out = match child.wait_with_output() {
        Ok(o) => o,
        Err(e) => return problem(format!("cannot wait for the process checking it: {e}")),
    };
    if let Some(signal) = out.status.signal() {
        return problem(format!(
            "crashed the process that loaded it ({}, signal {signal}): its initialisation code or its sink \
             constructor is broken; it would crash the daemon the same way",
            signal_name(signal)
        ));
    }
    // The last answer line: the plugin's own code may have written to standard output too.
    let answer = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v["problems"].is_array())
        });
    match answer {
        Some(a) if out.status.success() => a["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p.as_str().unwrap_or_default().to_owned())
            .collect(),
        _ => problem(format!(
            "the process that checked it ended ({}) without an answer",
            out.status
        )),
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    file: PathBuf,
    plugin: String,
    sinks: Vec<SinkRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkRequest {
    name: String,
    config: String,
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
    match Loader::temporary() {
        Err(e) => problems.push(format!(
            "cannot make a private directory for plugin copies: {e}"
        )),
        Ok(loader) => match loader.load(&request.file, &request.plugin) {
            Err(e) => problems.push(e.to_string()),
            Ok(plugin) => {
                described = Some(plugin.describe());
                for sink in &request.sinks {
                    match plugin.instantiate(&sink.name, &sink.config) {
                        Ok(mut instance) => {
                            let _ = instance.close();
                        }
                        Err(e) => problems.push(format!(
                            "sink {:?}: plugin {:?} rejected its config: {e}",
                            sink.name, request.plugin
                        )),
                    }
                }
            }
        },
    }
    println!("{}", json!({"plugin": described, "problems": problems}));
    0
}
