//! What the daemon writes is private to its group, whatever the umask it was started with.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::util::{
    Daemon, Setup, let_others_traverse, login, other_user, plugins, test_user, wait_until,
};

/// Every file and directory under `dir` (symlinks aside): (path relative to `root`, mode, gid, is a directory).
fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u32, u32, bool)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        // Symlinks have no mode of their own; the loader's private plugin copies are the loader's business.
        if meta.file_type().is_symlink() || path.ends_with("plugin-copies") {
            continue;
        }
        let name = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.push((name, meta.mode() & 0o7777, meta.gid(), meta.is_dir()));
        if meta.is_dir() {
            walk(root, &path, out);
        }
    }
}

#[test]
fn everything_the_daemon_writes_is_0640_in_0750_directories_under_umask_022() {
    // A group of its own, so that the test sees `files.group` applied; without root, the daemon's own group.
    let reader = test_user("trail-test-reader");
    let group = reader
        .as_ref()
        .map_or_else(|| unsafe { libc::getegid() }, |r| r.gid);
    let mut daemon = Daemon::with(Setup {
        umask: Some(0o022),
        log: Some("max_file_bytes: 4096, compress: true".into()),
        extra_config: format!(
            "files: {{group: {group}}}\nplugins_dir: plugins\nsinks:\n  - name: picky\n    plugin: flaky\n    \
             events: {{types: ['user_login']}}\n    config: {{path: $DIR/picky.jsonl, permanent: true, reject: poison}}\n    \
             batch: {{max_events: 100, max_wait: 10ms}}\n    retry: {{initial: 10ms, max: 40ms}}\n"
        ),
        plugins: vec![(plugins::library("trail-test-flaky"), "libflaky.so".into())],
        ..Setup::default()
    });
    let mut client = daemon.client();
    for i in 0..40 {
        let answer = client.emit(&login(&format!("event {i}"))).unwrap();
        assert_eq!(answer["ok"], json!(true), "{answer}");
    }
    assert_eq!(client.emit(&login("poison")).unwrap()["ok"], json!(true));
    let log_dir = daemon.log_dir.clone();
    let upkept = wait_until(Duration::from_secs(60), || {
        let names: Vec<String> = std::fs::read_dir(&log_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.iter().any(|n| n.ends_with(".zst")) && names.iter().any(|n| n.ends_with(".idx"))
    });
    assert!(
        upkept,
        "no file was compressed and indexed:\n{}",
        daemon.stderr()
    );
    let dead = daemon.path("spool/dead/picky.jsonl");
    assert!(
        wait_until(Duration::from_secs(60), || dead.exists()),
        "no dead letter:\n{}",
        daemon.stderr()
    );
    assert!(daemon.stop().success());
    // A torn tail, cut at the next start and kept aside.
    let mut newest: Vec<_> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    newest.sort();
    let newest = newest.pop().unwrap();
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&newest)
        .unwrap()
        .write_all(br#"{"seq":999,"id":"torn"#)
        .unwrap();
    daemon.spawn();
    assert_eq!(
        daemon.client().emit(&login("after")).unwrap()["ok"],
        json!(true)
    );
    assert!(daemon.stop().success());

    let mut seen = Vec::new();
    for dir in ["log", "spool", "keys"] {
        let path = daemon.path(dir);
        let meta = std::fs::metadata(&path).unwrap();
        seen.push((dir.to_owned(), meta.mode() & 0o7777, meta.gid(), true));
        walk(daemon.dir.path(), &path, &mut seen);
    }
    let mut kinds = BTreeSet::new();
    for (name, mode, gid, is_dir) in &seen {
        let expected = match (is_dir, name.as_str()) {
            (true, _) => 0o750,
            (false, "keys/checkpoint-ed25519.pem") => 0o600,
            (false, _) => 0o640,
        };
        assert_eq!(*mode, expected, "{name}: mode {mode:04o}");
        assert_eq!(*gid, group, "{name}: group");
        for kind in [
            ".jsonl",
            ".zst",
            ".idx",
            "checkpoints/checkpoint-",
            "cursors/picky.json",
            "dead/picky.jsonl",
            "spool/spool-",
            "closed-cleanly",
            ".torn-",
            ".pem",
            ".pem.pub",
        ] {
            if name.contains(kind) {
                kinds.insert(kind);
            }
        }
    }
    assert_eq!(
        kinds.len(),
        11,
        "not everything was created: {kinds:?} in {seen:?}"
    );

    // Another user cannot read the log; a member of files.group can.
    if let (Some(reader), Some(other)) = (reader, other_user()) {
        let_others_traverse(daemon.dir.path());
        // Any log file (the one with the torn tail may have been compressed since).
        let newest = std::fs::read_dir(&log_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("trail-")
            })
            .unwrap();
        let read = |user: &crate::util::TestUser| {
            user.command("cat")
                .arg(&newest)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
                .success()
        };
        assert!(read(&reader), "a member of files.group cannot read the log");
        assert!(!read(&other), "another user can read the log");
    }
}
