//! Reload hygiene: stray files in `plugins_dir` never hold up a good update (hot swaps under load, with nothing lost,
//! are tested in `sinks.rs` and `sdk.rs`), a failed load shows in `trail status`
//! until that file loads, a refused start or `trail validate` leaves nothing behind, and `trail validate` says what
//! it checked.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::sinks::{recorder_setup, sink};
use crate::util::{Daemon, login, plugins, recorded, trail, wait_recorded, wait_until};

/// The first half of a plugin library: what an install caught in the middle of its copy looks like.
fn truncated(library: &Path, to: &Path) {
    let bytes = fs::read(library).unwrap();
    fs::write(to, &bytes[..bytes.len() / 2]).unwrap();
}

/// The time stamp of the `n`th (from 0) daemon log line containing `what`, and its index among the lines.
fn logged(log: &str, what: &str, n: usize) -> Option<(SystemTime, usize)> {
    let (index, line) = log
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(what))
        .nth(n)?;
    let stamp = chrono::DateTime::parse_from_rfc3339(line.split_whitespace().next()?).ok()?;
    Some((SystemTime::from(stamp), index))
}

/// Drops `strays` (name, bytes) into the plugin directory, installs `library` as `librecorder.so` at once, waits
/// for the daemon's `n`th reload and returns how long after the install it logged it, checking that new events
/// then reach the recorder marked `mark`.
fn timed_swap(
    daemon: &Daemon,
    strays: &[(&str, Vec<u8>)],
    library: &Path,
    n: usize,
    mark: &str,
) -> Duration {
    for (name, bytes) in strays {
        fs::write(daemon.plugins_dir().join(name), bytes).unwrap();
    }
    let installed = SystemTime::now();
    daemon.install_plugin(library, "librecorder.so");
    let mut reloaded = None;
    let ok = wait_until(Duration::from_secs(60), || {
        reloaded = logged(&daemon.stderr(), "plugin reloaded", n);
        reloaded.is_some()
    });
    assert!(ok, "no reload:\n{}", daemon.stderr());
    // The sink swaps between two batches: a probe or two may still reach the old build.
    let path = daemon.path("rec.jsonl");
    let seen = recorded(&path).len();
    let mut client = daemon.client();
    let served = wait_until(Duration::from_secs(60), || {
        client.emit(&login("after the swap")).unwrap();
        recorded(&path)
            .iter()
            .skip(seen)
            .any(|l| l["mark"] == json!(mark))
    });
    assert!(served, "{mark} never served:\n{}", daemon.stderr());
    reloaded
        .unwrap()
        .0
        .duration_since(installed)
        .unwrap_or_default()
}

#[test]
fn stray_files_do_not_delay_a_good_update() {
    let daemon = Daemon::with(recorder_setup());
    daemon.client().emit(&login("before")).unwrap();
    wait_recorded(&daemon.path("rec.jsonl"), 1);

    // The usual time: a good update alone.
    let alone = timed_swap(&daemon, &[], &plugins::recorder_v2(), 0, "v2");

    // A text file and a truncated library dropped next to the next good update; they sort before it, so a
    // reload that handled files one after another would look at them first.
    let library = fs::read(plugins::library("trail-test-recorder")).unwrap();
    let strays = [
        ("liba-notes.so", b"not a library, just notes\n".to_vec()),
        ("liba-truncated.so", library[..library.len() / 2].to_vec()),
    ];
    let beside = timed_swap(
        &daemon,
        &strays,
        &plugins::library("trail-test-recorder"),
        1,
        "v1",
    );
    eprintln!(
        "a good update served {alone:?} after its rename alone, {beside:?} beside two stray files"
    );

    // Each stray file is given up on only after a steady but incomplete file's wait (2 s), and the good update
    // was swapped in before that: the stray files' lines come after the reload's in the daemon's log.
    let given_up = |log: &str, file: &str| {
        log.lines().position(|l| {
            l.contains(file)
                && (l.contains("not loaded") || l.contains("the running builds are kept"))
        })
    };
    let mut log = String::new();
    let both = wait_until(Duration::from_secs(60), || {
        log = daemon.stderr();
        given_up(&log, "liba-notes.so").is_some() && given_up(&log, "liba-truncated.so").is_some()
    });
    assert!(both, "the stray files were never looked at:\n{log}");
    let (_, reloaded) = logged(&log, "plugin reloaded", 1).unwrap();
    for (file, _) in &strays {
        assert!(
            reloaded < given_up(&log, file).unwrap(),
            "the good update waited for {file}:\n{log}"
        );
    }
}

#[test]
fn status_shows_the_last_failed_load_until_that_file_loads() {
    let daemon = Daemon::with(recorder_setup());
    let path = daemon.path("rec.jsonl");
    let mut client = daemon.client();
    client.emit(&login("before")).unwrap();
    wait_recorded(&path, 1);
    let plugin = |status: &Value| status["plugins"][0].clone();
    let status = daemon.admin(json!({"command": "status"}));
    assert_eq!(plugin(&status)["last_failure"], Value::Null, "{status}");

    // A truncated build renamed into place: refused, the running build keeps serving, and status says so.
    let broken = daemon.path("broken.so");
    truncated(&plugins::library("trail-test-recorder"), &broken);
    daemon.install_plugin(&broken, "librecorder.so");
    let mut status = Value::Null;
    let failed = wait_until(Duration::from_secs(60), || {
        status = daemon.admin(json!({"command": "status"}));
        !plugin(&status)["last_failure"].is_null()
    });
    assert!(failed, "no failure in the status:\n{}", daemon.stderr());
    let failure = &plugin(&status)["last_failure"];
    let installed = daemon.plugins_dir().join("librecorder.so");
    assert_eq!(failure["file"], json!(installed), "{status}");
    assert!(
        failure["reason"]
            .as_str()
            .unwrap()
            .contains("incomplete (truncated ELF file"),
        "{status}"
    );
    let at = failure["at"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(at).is_ok() && at.ends_with('Z'),
        "{status}"
    );
    assert_eq!(plugin(&status)["generation"], json!(1), "{status}");
    client.emit(&login("still served")).unwrap();
    let lines = wait_recorded(&path, 2);
    assert_eq!(lines[1]["mark"], json!("v1"));

    // It stays until a load of that file succeeds.
    let status = daemon.admin(json!({"command": "status"}));
    assert!(!plugin(&status)["last_failure"].is_null(), "{status}");
    daemon.install_plugin(&plugins::recorder_v2(), "librecorder.so");
    let mut status = Value::Null;
    let cleared = wait_until(Duration::from_secs(60), || {
        status = daemon.admin(json!({"command": "status"}));
        plugin(&status)["generation"] == json!(2)
    });
    assert!(
        cleared,
        "the good build was not swapped in:\n{}",
        daemon.stderr()
    );
    assert_eq!(plugin(&status)["last_failure"], Value::Null, "{status}");
}

/// What a directory holds, by name, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_refused_start_or_validate_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    crate::util::install_plugin(
        &dir.path().join("plugins"),
        &plugins::library("trail-test-recorder"),
        "librecorder.so",
    );
    let cfg = dir.path().join("trail.yaml");
    // The recorder refuses a configuration field it does not know.
    let refused = sink(
        "s",
        "recorder",
        "['*']",
        "{path: $DIR/rec.jsonl, colour: red}",
    )
    .replace("$DIR", &dir.path().display().to_string());
    fs::write(
        &cfg,
        format!(
            "socket: {{path: s.sock}}\nevent_types: {}\nlog: {{dir: state/log}}\nplugins_dir: plugins\nsinks:\n{refused}",
            crate::util::repo_event_types().display(),
        ),
    )
    .unwrap();
    let before = entries(dir.path());
    assert_eq!(before, ["plugins", "trail.yaml"]);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_traild"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{log}");
    assert!(log.contains("rejected its config"), "{log}");
    // No spool (cursors, segments, copies of libraries), no log, no state directory made for them.
    assert_eq!(entries(dir.path()), before, "{log}");
    assert!(!dir.path().join("rec.jsonl").exists());

    let (code, out, err) = trail(&["validate", "--config", cfg.to_str().unwrap()], "");
    assert_eq!(code, 78, "{out}{err}");
    assert!(err.contains("rejected its config"), "{err}");
    assert_eq!(entries(dir.path()), before, "{err}");

    // The spool's directory existing already (from earlier runs) is left as it was, with nothing added.
    fs::create_dir_all(dir.path().join("state/spool")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_traild"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(entries(&dir.path().join("state/spool")).is_empty());
    assert_eq!(entries(&dir.path().join("state")), ["spool"]);
}

#[test]
fn validate_says_what_it_checked() {
    let dir = tempfile::tempdir().unwrap();
    let plugins_dir = dir.path().join("plugins");
    crate::util::install_plugin(
        &plugins_dir,
        &plugins::library("trail-test-recorder"),
        "librecorder.so",
    );
    crate::util::install_plugin(
        &plugins_dir,
        &plugins::library("trail-sink-template"),
        "libtemplate.so",
    );
    let out = dir.path().join("out");
    let sinks = [
        sink(
            "a",
            "recorder",
            "['*']",
            &format!("{{path: {}/a.jsonl}}", out.display()),
        ),
        sink(
            "b",
            "recorder",
            "['user_*']",
            &format!("{{path: {}/b.jsonl}}", out.display()),
        ),
        sink(
            "c",
            "line-file",
            "['*']",
            &format!("{{path: {}/c.txt}}", out.display()),
        ),
    ];
    fs::create_dir(&out).unwrap();
    let event_types = crate::util::repo_event_types();
    let cfg = dir.path().join("trail.yaml");
    fs::write(
        &cfg,
        format!(
            "socket: {{path: s.sock}}\nevent_types: {}\nlog: {{dir: log}}\nplugins_dir: plugins\nsinks:\n{}",
            event_types.display(),
            sinks.concat()
        ),
    )
    .unwrap();
    let (code, stdout, err) = trail(&["validate", "--config", cfg.to_str().unwrap()], "");
    assert_eq!(code, 0, "{stdout}{err}");
    let files: Vec<String> = entries(&event_types);
    let builtin = files.iter().filter(|f| f.starts_with("trail_")).count();
    let yours = files.len() - builtin;
    assert!(yours > 0 && builtin > 0, "{files:?}");
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!(
            "ok: {yours} event types of yours in {} and {builtin} built in; 3 sinks built; 2 plugins loaded",
            event_types.display()
        ),
        "{stdout}"
    );
    let rest: Vec<&str> = lines.collect();
    assert_eq!(
        rest[..3],
        ["sink built: a", "sink built: b", "sink built: c"],
        "{stdout}"
    );
    let loaded: Vec<&&str> = rest[3..].iter().collect();
    assert_eq!(loaded.len(), 2, "{stdout}");
    assert!(
        loaded[0].starts_with("plugin loaded: line-file 0.1.0 (api ")
            && loaded[0].ends_with(&format!(
                "from {}",
                plugins_dir.join("libtemplate.so").display()
            )),
        "{stdout}"
    );
    assert!(
        loaded[1].starts_with("plugin loaded: recorder ")
            && loaded[1].ends_with(&format!(
                "from {}",
                plugins_dir.join("librecorder.so").display()
            )),
        "{stdout}"
    );
    // Validation built each sink once and touched no spool.
    assert_eq!(entries(dir.path()), ["out", "plugins", "trail.yaml"]);
}
