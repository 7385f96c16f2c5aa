//! Which plugin libraries run in the daemon: only those a sink uses, only when nobody but root or the daemon's
//! user can change them or a directory above them, always from private copies; a library that crashes the
//! process while loading is named.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use crate::sinks::{recorder_setup, sink, with_sinks};
use crate::util::{
    Daemon, let_others_traverse, login, other_user, plugins, recorded, repo_event_types, trail,
    wait_recorded, wait_until,
};

/// A C library, not a trail plugin, whose constructor appends to `marker` one line, `<path it was loaded from>
/// <its mode> <its uid> <its directory's mode> <that directory's uid>` (modes in octal), then aborts if `crash`.
const SPY: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

__attribute__((constructor)) static void spy(void) {
    FILE *out = fopen(MARKER, "a");
    Dl_info info;
    if (out && dladdr((void *)&spy, &info) && info.dli_fname) {
        char dir[4096];
        struct stat file_stat, dir_stat;
        strncpy(dir, info.dli_fname, sizeof dir - 1);
        dir[sizeof dir - 1] = 0;
        stat(info.dli_fname, &file_stat);
        stat(dirname(dir), &dir_stat);
        fprintf(out, "%s %o %u %o %u\n", info.dli_fname, file_stat.st_mode & 07777,
                file_stat.st_uid, dir_stat.st_mode & 07777, dir_stat.st_uid);
    }
    if (out) fclose(out);
#ifdef CRASH
    abort();
#endif
}
"#;

/// Builds [`SPY`] into `dir` with gcc.
fn spy_library(dir: &Path, marker: &Path, crash: bool) -> PathBuf {
    let source = dir.join("spy.c");
    fs::write(&source, SPY).unwrap();
    let library = dir.join(if crash { "crash.so" } else { "spy.so" });
    let mut gcc = Command::new("gcc");
    gcc.args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .arg(format!("-DMARKER=\"{}\"", marker.display()));
    if crash {
        gcc.arg("-DCRASH");
    }
    let out = gcc.output().unwrap();
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    library
}

/// A directory with `plugins/` holding `libraries` (library, installed name) and a configuration with `sinks`;
/// returns it and the configuration's path.
fn installed(libraries: &[(&Path, &str)], sinks: &[String]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for (library, name) in libraries {
        crate::util::install_plugin(&dir.path().join("plugins"), library, name);
    }
    let config = dir.path().join("trail.yaml");
    fs::write(
        &config,
        format!(
            "socket: {{path: s.sock}}\nevent_types: {}\nlog: {{dir: log}}\nplugins_dir: plugins\nsinks:\n{}",
            repo_event_types().display(),
            sinks.concat()
        ),
    )
    .unwrap();
    (dir, config)
}

fn traild(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_traild"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `traild validate` and `trail validate` on `config`: each one's exit code and standard error.
fn validate_both(config: &Path) -> [(Option<i32>, String); 2] {
    let daemon = traild(&["validate"], config);
    let (code, _, tool) = trail(&["validate", "--config", config.to_str().unwrap()], "");
    [
        (
            daemon.status.code(),
            String::from_utf8_lossy(&daemon.stderr).into_owned(),
        ),
        (Some(code), tool),
    ]
}

/// The lines the spy's constructor wrote, split into fields.
fn spied(marker: &Path) -> Vec<Vec<String>> {
    fs::read_to_string(marker)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').map(str::to_owned).collect())
        .collect()
}

#[test]
fn a_library_no_sink_uses_is_never_loaded() {
    let build = tempfile::tempdir().unwrap();
    let marker = build.path().join("marker");
    let spy = spy_library(build.path(), &marker, false);
    let recorder = sink(
        "rec",
        "recorder",
        "['user_login']",
        "{path: $DIR/rec.jsonl}",
    );
    let mut with = with_sinks(
        std::slice::from_ref(&recorder),
        &[("trail-test-recorder", "librecorder.so")],
        "",
    );
    with.plugins.push((spy.clone(), "libspy.so".into()));
    with.env.push((trail::NO_WATCH_VAR.into(), "1".into()));
    let daemon = Daemon::with(with);
    daemon.client().emit(&login("one")).unwrap();
    wait_recorded(&daemon.path("rec.jsonl"), 1);
    let maps = fs::read_to_string(format!("/proc/{}/maps", daemon.pid())).unwrap();
    assert!(maps.contains("librecorder"), "{maps}");
    assert!(!maps.contains("libspy"), "{maps}");
    // A new build of the unused library is not loaded by a rescan either, nor by validate.
    daemon.install_plugin(&spy, "libspy.so");
    let answer = daemon.admin(json!({"command": "reload"}));
    assert_eq!(answer["reloaded"], json!([]), "{answer}");
    for (code, err) in validate_both(&daemon.config) {
        assert_eq!(code, Some(0), "{err}");
    }
    assert!(
        spied(&marker).is_empty(),
        "the spy ran: {:?}",
        spied(&marker)
    );

    // A sink that uses it loads it (known by its file name: it has no name symbol), in validate's child
    // process and in the daemon, each time from a private copy in a fresh 0700 directory.
    let (dir, config) = installed(&[(&spy, "libspy.so")], &[sink("s", "spy", "['*']", "{}")]);
    for (code, err) in validate_both(&config) {
        assert_eq!(code, Some(78), "{err}");
        assert!(err.contains("libspy.so: not a trail sink plugin"), "{err}");
    }
    let start = traild(&[], &config);
    assert_eq!(start.status.code(), Some(78));
    let loads = spied(&marker);
    assert_eq!(loads.len(), 3, "{loads:?}");
    let me = unsafe { libc::geteuid() }.to_string();
    for load in &loads {
        let [path, file_mode, file_uid, dir_mode, dir_uid] = &load[..] else {
            panic!("{load:?}")
        };
        assert_eq!((dir_mode.as_str(), dir_uid), ("700", &me), "{load:?}");
        assert_eq!(file_uid, &me, "{load:?}");
        assert_eq!(
            u32::from_str_radix(file_mode, 8).unwrap() & 0o077,
            0,
            "{load:?}"
        );
        assert!(
            !path.contains("trail-validate-"),
            "a guessable path: {path}"
        );
    }
    let daemons_copy = Path::new(&loads[2][0]);
    assert_eq!(
        daemons_copy.parent().unwrap(),
        dir.path().join("spool/plugin-copies")
    );
}

#[test]
fn a_library_that_crashes_at_load_is_named() {
    let build = tempfile::tempdir().unwrap();
    let crash = spy_library(build.path(), &build.path().join("marker"), true);
    let (_dir, config) = installed(
        &[(&crash, "libcrash.so")],
        &[sink("s", "crash", "['*']", "{}")],
    );
    for (code, err) in validate_both(&config) {
        assert_eq!(code, Some(78), "{err}");
        assert!(
            err.contains("libcrash.so: crashed the process that loaded it (aborted"),
            "{err}"
        );
    }
    let start = traild(&[], &config);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&start.status),
        Some(libc::SIGABRT)
    );
    let stderr = String::from_utf8_lossy(&start.stderr);
    let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(
        last.contains("loading plugin library") && last.contains("libcrash.so"),
        "the last line does not name the library:\n{stderr}"
    );
}

/// Makes an installed setup unsafe, given its plugin directory.
type Spoil<'a> = dyn Fn(&Path) + 'a;

#[test]
fn libraries_others_could_change_are_refused_before_any_of_their_code_runs() {
    let build = tempfile::tempdir().unwrap();
    let marker = build.path().join("marker");
    let spy = spy_library(build.path(), &marker, false);
    let other = other_user();
    // The spy, installed as the recorder, would run if loaded.
    let cases: [(&str, &Spoil<'_>); 3] = [
        (
            "writable by group and others (mode 0666)",
            &|plugins: &Path| {
                fs::set_permissions(
                    plugins.join("librecorder.so"),
                    fs::Permissions::from_mode(0o666),
                )
                .unwrap()
            },
        ),
        (
            "plugins is writable by group (mode 0775)",
            &|plugins: &Path| {
                fs::set_permissions(plugins, fs::Permissions::from_mode(0o775)).unwrap()
            },
        ),
        ("is owned by uid", &|plugins: &Path| {
            if let Some(other) = &other {
                std::os::unix::fs::chown(plugins.join("librecorder.so"), Some(other.uid), None)
                    .unwrap();
            }
        }),
    ];
    for (reason, spoil) in cases {
        if reason == "is owned by uid" && other.is_none() {
            continue;
        }
        let (dir, config) = installed(
            &[(&spy, "librecorder.so")],
            &[sink("s", "recorder", "['*']", "{}")],
        );
        spoil(&dir.path().join("plugins"));
        let start = traild(&[], &config);
        let mut runs = validate_both(&config).to_vec();
        runs.push((
            start.status.code(),
            String::from_utf8_lossy(&start.stderr).into_owned(),
        ));
        for (code, err) in runs {
            assert_eq!(code, Some(78), "{err}");
            assert!(
                err.contains("librecorder.so: refused: ") && err.contains(reason),
                "{reason:?} missing from:\n{err}"
            );
        }
        assert!(spied(&marker).is_empty(), "{reason}: the library ran");
    }
}

#[test]
fn a_writable_library_overwritten_in_place_is_refused_on_reload_and_audited() {
    let mut with = recorder_setup();
    with.env.push((trail::NO_WATCH_VAR.into(), "1".into()));
    let daemon = Daemon::with(with);
    let installed = daemon.plugins_dir().join("librecorder.so");
    fs::set_permissions(&installed, fs::Permissions::from_mode(0o666)).unwrap();
    // Another user writes a build of their own into the world-writable library, in place.
    let v2 = daemon.path("v2.so");
    fs::copy(plugins::recorder_v2(), &v2).unwrap();
    fs::set_permissions(&v2, fs::Permissions::from_mode(0o644)).unwrap();
    match other_user() {
        Some(other) => {
            let_others_traverse(&daemon.plugins_dir());
            let status = other
                .command("cp")
                .arg(&v2)
                .arg(&installed)
                .status()
                .unwrap();
            assert!(status.success(), "cp as {}", other.name);
        }
        None => {
            fs::write(&installed, fs::read(&v2).unwrap()).unwrap();
        }
    }
    let answer = daemon.admin(json!({"command": "reload"}));
    let reloaded = &answer["reloaded"][0];
    assert_eq!(
        (&reloaded["ok"], &reloaded["refused"]),
        (&json!(false), &json!(true)),
        "{answer}"
    );
    assert!(
        daemon.stderr().contains("librecorder.so: refused: ")
            && daemon
                .stderr()
                .contains("writable by group and others (mode 0666)"),
        "{}",
        daemon.stderr()
    );
    let mut refusal = None;
    assert!(wait_until(std::time::Duration::from_secs(30), || {
        refusal = daemon
            .records()
            .into_iter()
            .find(|r| r["type"] == json!("trail_plugin_refused"));
        refusal.is_some()
    }));
    let refusal: Value = refusal.unwrap();
    assert_eq!(refusal["payload"]["plugin"], json!("recorder"), "{refusal}");
    assert_eq!(
        refusal["payload"]["file"],
        json!(installed.to_str().unwrap())
    );
    assert!(
        refusal["payload"]["reason"]
            .as_str()
            .unwrap()
            .contains("writable by group and others"),
        "{refusal}"
    );
    // The running build keeps serving.
    daemon.client().emit(&login("after")).unwrap();
    let lines = wait_recorded(&daemon.path("rec.jsonl"), 1);
    assert!(lines.iter().all(|l| l["mark"] == json!("v1")), "{lines:?}");
    // Once the mode is fixed, a rescan loads the new build.
    fs::set_permissions(&installed, fs::Permissions::from_mode(0o644)).unwrap();
    let answer = daemon.admin(json!({"command": "reload"}));
    assert_eq!(answer["reloaded"][0]["ok"], json!(true), "{answer}");
    assert!(wait_until(std::time::Duration::from_secs(30), || {
        daemon.client().emit(&login("probe")).unwrap();
        recorded(&daemon.path("rec.jsonl"))
            .iter()
            .any(|l| l["mark"] == json!("v2"))
    }));
}

#[test]
fn validate_never_uses_the_old_guessable_copy_directory() {
    use std::io::Write;
    let build = tempfile::tempdir().unwrap();
    let marker = build.path().join("marker");
    let spy = spy_library(build.path(), &marker, false);
    let (dir, config) = installed(&[(&spy, "libspy.so")], &[sink("s", "spy", "['*']", "{}")]);
    // validate's temporary directory is one every user may write to, like /tmp.
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).unwrap();
    let_others_traverse(&tmp);
    let victim = dir.path().join("victim");
    fs::write(&victim, "precious").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    // sh waits for a line, then becomes `trail validate` under the same pid, so the pid is known beforehand.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("read go; exec \"$0\" validate --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_trail"))
        .arg(&config)
        .env("TMPDIR", &tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Another user plants the path validate used to copy plugins to, with a link to a file of root's inside.
    let planted = tmp.join(format!("trail-validate-{}", child.id()));
    let link = planted.join("libspy.0.so");
    match other_user() {
        Some(other) => {
            assert!(
                other
                    .command("mkdir")
                    .arg(&planted)
                    .status()
                    .unwrap()
                    .success()
            );
            let ln = other
                .command("ln")
                .arg("-s")
                .arg(&victim)
                .arg(&link)
                .status();
            assert!(ln.unwrap().success());
        }
        None => {
            fs::create_dir(&planted).unwrap();
            std::os::unix::fs::symlink(&victim, &link).unwrap();
        }
    }
    writeln!(child.stdin.take().unwrap(), "go").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("libspy.so: not a trail sink plugin"), "{err}");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    let mode = fs::metadata(&victim).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        fs::read_link(&link).unwrap(),
        victim,
        "the planted link was touched"
    );
    // The copy was loaded from a fresh private directory in TMPDIR instead.
    let loads = spied(&marker);
    assert_eq!(loads.len(), 1, "{loads:?}");
    let copy = Path::new(&loads[0][0]);
    assert_eq!(copy.parent().unwrap().parent().unwrap(), tmp);
    assert!(!copy.starts_with(&planted), "{copy:?}");
    assert_eq!(loads[0][3], "700", "{loads:?}");
}
