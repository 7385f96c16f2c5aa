//! The log as evidence: tamper detection, rotation, retention, compression, search, a full disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{Daemon, Setup, limit_file_size, login, trail, wait_until};

fn setup(log: &str) -> Setup {
    Setup {
        log: Some(log.to_owned()),
        ..Setup::default()
    }
}

/// Starts a daemon whose `log:` section also holds the settings `log` (after the harness's own).
fn start(log: &str, env: Vec<(String, String)>) -> Daemon {
    let mut s = setup(log);
    s.env = env;
    Daemon::with(s)
}

fn public_key(daemon: &Daemon) -> String {
    daemon
        .path("keys/checkpoint-ed25519.pem.pub")
        .to_string_lossy()
        .into_owned()
}

/// Runs `trail verify DIR --key KEY`: (exit code, stdout).
fn verify(dir: &Path, key: &str) -> (i32, String) {
    let (code, out, err) = trail(&["verify", dir.to_str().unwrap(), "--key", key], "");
    (code, format!("{out}{err}"))
}

/// Emits `n` logins in one pipelined batch; all must be accepted.
fn emit(daemon: &Daemon, from: usize, n: usize) {
    let mut client = daemon.client();
    for i in from..from + n {
        let answer = client.emit(&login(&format!("event {i}"))).unwrap();
        assert_eq!(answer["ok"], json!(true), "{answer}");
    }
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| trail::log::files::LogFile::parse(p).is_some())
        .collect();
    files.sort();
    files
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let path = e.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else if !path.is_symlink() {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn every_kind_of_tampering_is_detected_where_it_happened() {
    let mut daemon = start("max_file_bytes: 4096", vec![]);
    for batch in 0..4 {
        emit(&daemon, batch * 12, 12);
    }
    assert!(daemon.stop().success(), "{}", daemon.stderr());
    let key = public_key(&daemon);
    let (code, out) = verify(&daemon.log_dir, &key);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("intact: 48 records"), "{out}");
    let files = log_files(&daemon.log_dir);
    assert!(files.len() >= 3, "size rotation: {files:?}");
    for f in &files[..files.len() - 1] {
        assert!(std::fs::metadata(f).unwrap().len() <= 4096 + 12 * 500);
    }

    // Each case: a change to a copy of the log, and what the report must say.
    type Tamper = Box<dyn Fn(&Path)>;
    let m = name(&files[1]);
    let cases: Vec<(&str, Tamper, Vec<String>)> = vec![
        (
            "flip a byte",
            Box::new({
                let m = m.clone();
                move |dir: &Path| {
                    let path = dir.join(&m);
                    let mut bytes = std::fs::read(&path).unwrap();
                    let at = find_nth_line(&bytes, 2) + 120;
                    bytes[at] ^= 0x01;
                    std::fs::write(&path, bytes).unwrap();
                }
            }),
            vec![format!("{m}:3: seq "), "was modified".into()],
        ),
        (
            "delete a line",
            Box::new({
                let m = m.clone();
                move |dir: &Path| {
                    let path = dir.join(&m);
                    let mut l = lines(&path);
                    l.remove(3);
                    write_lines(&path, &l);
                }
            }),
            vec![
                format!("{m}:4: seq "),
                "records are missing before this one".into(),
            ],
        ),
        (
            "swap two lines",
            Box::new({
                let m = m.clone();
                move |dir: &Path| {
                    let path = dir.join(&m);
                    let mut l = lines(&path);
                    l.swap(3, 4);
                    write_lines(&path, &l);
                }
            }),
            vec![format!("{m}:4: seq "), "records out of order".into()],
        ),
        (
            "insert a line",
            Box::new({
                let m = m.clone();
                move |dir: &Path| {
                    let path = dir.join(&m);
                    let mut l = lines(&path);
                    let forged = l[2].replace("event", "forged");
                    l.insert(3, forged);
                    write_lines(&path, &l);
                }
            }),
            vec![format!("{m}:4: seq "), "inserted".into()],
        ),
        (
            "truncate a file",
            Box::new({
                let m = m.clone();
                move |dir: &Path| {
                    let path = dir.join(&m);
                    let len = std::fs::metadata(&path).unwrap().len();
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .unwrap()
                        .set_len(len - 40)
                        .unwrap();
                }
            }),
            vec![
                format!("{m}:"),
                "ends inside a record".into(),
                "truncated".into(),
            ],
        ),
        (
            "delete a middle file",
            Box::new({
                let m = m.clone();
                move |dir: &Path| std::fs::remove_file(dir.join(&m)).unwrap()
            }),
            vec![
                format!("{m}: missing file"),
                "records are missing before this one".into(),
            ],
        ),
        (
            "cut records off the end",
            Box::new(|dir: &Path| {
                let last = log_files(dir).pop().unwrap();
                let mut l = lines(&last);
                l.pop();
                write_lines(&last, &l);
            }),
            vec!["records were removed from its end".into()],
        ),
        (
            "edit a checkpoint",
            Box::new(|dir: &Path| {
                let cp = trail::log::checkpoint::list(dir).remove(0);
                let text =
                    std::fs::read_to_string(&cp)
                        .unwrap()
                        .replacen("\"bytes\":", "\"bytes\":1", 1);
                std::fs::write(&cp, text).unwrap();
            }),
            vec!["bad signature".into()],
        ),
    ];
    for (what, tamper, expected) in cases {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(&daemon.log_dir, copy.path());
        tamper(copy.path());
        let (code, out) = verify(copy.path(), &key);
        assert_eq!(code, 1, "{what}: {out}");
        for e in &expected {
            assert!(out.contains(e.as_str()), "{what}: expected {e:?} in\n{out}");
        }
    }
    // A checkpoint signed by another key is refused.
    let other = daemon.path("other.pub");
    let signer =
        trail::log::checkpoint::Signer::load_or_generate(&daemon.path("other.pem")).unwrap();
    std::fs::write(&other, signer.public_hex()).unwrap();
    let (code, out) = verify(&daemon.log_dir, other.to_str().unwrap());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("bad signature"), "{out}");
}

/// The byte offset where line `n` (0-based) starts.
fn find_nth_line(bytes: &[u8], n: usize) -> usize {
    let mut at = 0;
    for _ in 0..n {
        at += bytes[at..].iter().position(|&b| b == b'\n').unwrap() + 1;
    }
    at
}

#[test]
fn single_byte_changes_anywhere_are_detected() {
    let mut daemon = start("max_file_bytes: 4096", vec![]);
    emit(&daemon, 0, 6);
    assert!(daemon.stop().success());
    let key = public_key(&daemon);
    let file = log_files(&daemon.log_dir).pop().unwrap();
    let original = std::fs::read(&file).unwrap();
    // Every 7th byte, with a few different changes: each must be reported.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir, copy.path());
    let target = copy.path().join(file.file_name().unwrap());
    for (i, delta) in (0..original.len())
        .step_by(7)
        .zip([1u8, 2, 0x20, 0x80].into_iter().cycle())
    {
        let mut bytes = original.clone();
        bytes[i] ^= delta;
        std::fs::write(&target, &bytes).unwrap();
        let (code, out) = verify(copy.path(), &key);
        assert_eq!(code, 1, "byte {i} ^ {delta:#x} went unnoticed: {out}");
    }
}

#[test]
fn an_untouched_log_verifies_after_restarts_rotations_compression_and_retention() {
    let mut daemon = start(
        "max_file_bytes: 4096, compress: true, retention_bytes: 6000",
        vec![],
    );
    emit(&daemon, 0, 12);
    emit(&daemon, 12, 12);
    assert!(daemon.stop().success());
    daemon.spawn();
    for batch in 2..6 {
        emit(&daemon, batch * 12, 12);
    }
    let deleted = wait_until(Duration::from_secs(30), || {
        all_records(&daemon.log_dir)
            .iter()
            .filter(|r| r.contains(r#""type":"trail_log_file_deleted""#))
            .count()
            >= 2
    });
    let listing: Vec<_> = std::fs::read_dir(&daemon.log_dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), e.metadata().unwrap().len())
        })
        .collect();
    assert!(
        deleted,
        "retention deleted nothing: {listing:?}\n{}",
        daemon.stderr()
    );
    let compressed = wait_until(Duration::from_secs(30), || {
        log_files(&daemon.log_dir)
            .iter()
            .any(|f| f.to_string_lossy().ends_with(".zst"))
    });
    assert!(compressed, "nothing was compressed");
    assert!(daemon.stop().success());
    let stderr = daemon.stderr();
    assert!(stderr.contains("deleted an expired log file"), "{stderr}");
    let records: Vec<Value> = all_records(&daemon.log_dir)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let deletion = records
        .iter()
        .find(|r| r["type"] == json!("trail_log_file_deleted"))
        .unwrap();
    assert_eq!(deletion["payload"]["reason"], json!("size"));
    assert_eq!(deletion["source"]["daemon"], json!(true), "{deletion}");
    assert_eq!(deletion["payload"]["last_hash"].as_str().unwrap().len(), 64);
    let first = log_files(&daemon.log_dir)[0].clone();
    assert!(
        !name(&first).contains("-00000000000000000001."),
        "the oldest file is gone: {first:?}"
    );
    let (code, out) = verify(&daemon.log_dir, &public_key(&daemon));
    assert_eq!(code, 0, "{out}");
    // Without the key, signatures are still checked for consistency and the report says so.
    let (code, out, _) = trail(&["verify", daemon.log_dir.to_str().unwrap()], "");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no --key given"), "{out}");
    // Removing the oldest file without a deletion record is caught.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir, copy.path());
    std::fs::remove_file(copy.path().join(name(&first))).unwrap();
    let (code, out) = verify(copy.path(), &public_key(&daemon));
    assert_eq!(code, 1, "{out}");
}

#[test]
fn a_client_cannot_forge_the_deletion_record_that_hides_a_deleted_file() {
    let mut s = setup("max_file_bytes: 4096");
    // A type of the operator's with no payload schema: any object is accepted.
    s.extra_types = vec![(
        "note_taken.yml".into(),
        "name: note_taken\ndescription: a note\nsaved_to_database: true\nstreamed: false\n".into(),
    )];
    let mut daemon = Daemon::with(s);
    emit(&daemon, 0, 24);
    let oldest = log_files(&daemon.log_dir)[0].clone();
    assert_ne!(
        oldest,
        log_files(&daemon.log_dir).pop().unwrap(),
        "no rotation"
    );
    let last: Value = serde_json::from_str(lines(&oldest).last().unwrap()).unwrap();
    let payload = json!({"file": name(&oldest), "first_seq": 1, "last_seq": last["seq"], "bytes": 1,
        "last_hash": last["hash"], "reason": "size"});
    let mut client = daemon.client();
    let forged = json!({"type": "trail_log_file_deleted", "actor": {"id": "traild", "type": "system"},
        "payload": payload});
    let answer = client.emit(&forged).unwrap();
    assert_eq!(
        answer["error"],
        json!({"code": "forbidden", "details": [], "message":
            "event type \"trail_log_file_deleted\" is recorded by the daemon itself; clients may not submit it"}),
        "{answer}"
    );
    // Any name of the daemon's, defined or not.
    let answer = client.emit(&json!({"type": "trail_anything"})).unwrap();
    assert_eq!(answer["error"]["code"], json!("forbidden"), "{answer}");
    // A record of an open type whose payload looks like a deletion record is stored, and is no deletion record.
    let mut dressed = payload.clone();
    dressed["n"] = json!({"a": 1, "type": "trail_log_file_deleted", "source": {"daemon": true}});
    let answer = client
        .emit(&json!({"type": "note_taken", "payload": dressed}))
        .unwrap();
    assert_eq!(answer["ok"], json!(true), "{answer}");
    emit(&daemon, 24, 2);
    assert!(daemon.stop().success());
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir, copy.path());
    let (code, out) = verify(copy.path(), &public_key(&daemon));
    assert_eq!(code, 0, "{out}");
    std::fs::remove_file(copy.path().join(name(&oldest))).unwrap();
    let (code, out) = verify(copy.path(), &public_key(&daemon));
    assert_eq!(code, 1, "deleting the oldest file went unnoticed: {out}");
    assert!(
        out.contains("no deletion record says retention removed them"),
        "{out}"
    );
}

#[test]
fn the_daemon_rotates_at_utc_midnight_on_its_clock() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let midnight = (now / 86_400.0).floor() * 86_400.0 + 86_400.0;
    // The daemon's clock starts 1.5 s before the next UTC midnight.
    let offset = midnight - now - 1.5;
    let mut daemon = start(
        "rotate: daily",
        vec![("TRAIL_TEST_CLOCK_OFFSET".into(), format!("{offset}"))],
    );
    let mut i = 0;
    let rotated = wait_until(Duration::from_secs(20), || {
        emit(&daemon, i, 1);
        i += 1;
        log_files(&daemon.log_dir).len() >= 2
    });
    assert!(rotated, "no rotation at midnight:\n{}", daemon.stderr());
    emit(&daemon, i, 3);
    assert!(daemon.stop().success());
    let files = log_files(&daemon.log_dir);
    let day = |secs: f64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp(secs as i64, 0)
            .unwrap()
            .format("%Y%m%d")
            .to_string()
    };
    assert!(
        name(&files[0]).starts_with(&format!("trail-{}T2359", day(midnight - 1.0))),
        "{files:?}"
    );
    assert!(
        name(&files[1]).starts_with(&format!("trail-{}T0000", day(midnight))),
        "{files:?}"
    );
    let midnight_stamp = format!(
        "{}",
        chrono::DateTime::<chrono::Utc>::from_timestamp(midnight as i64, 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%S")
    );
    for l in lines(&files[0]) {
        let r: Value = serde_json::from_str(&l).unwrap();
        assert!(
            r["received_at"].as_str().unwrap() < midnight_stamp.as_str(),
            "{l}"
        );
    }
    assert!(!lines(&files[1]).is_empty());
    let current = std::fs::read_link(daemon.log_dir.join("current")).unwrap();
    assert_eq!(current, PathBuf::from(name(&files[1])));
    let (code, out) = verify(&daemon.log_dir, &public_key(&daemon));
    assert_eq!(code, 0, "{out}");
    assert!(
        trail::log::checkpoint::list(&daemon.log_dir).len() >= 2,
        "a checkpoint at rotation and at stop"
    );
}

/// The records of every log file (compressed or not), oldest first, read with the library. A running daemon may
/// compress (replace) a file between the listing and the reading: the listing is then taken again.
fn all_records(dir: &Path) -> Vec<String> {
    'listing: loop {
        let mut out = Vec::new();
        for f in trail::log::files::list(dir).unwrap() {
            let mut text = String::new();
            let read = f
                .open()
                .and_then(|mut r| std::io::Read::read_to_string(&mut r, &mut text));
            match read {
                Ok(_) => out.extend(text.lines().map(str::to_owned)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue 'listing,
                Err(e) => panic!("{}: {e}", f.path.display()),
            }
        }
        return out;
    }
}

#[test]
fn search_agrees_with_a_brute_force_filter_across_rotated_and_compressed_files() {
    let mut daemon = start("max_file_bytes: 8192, compress: true", vec![]);
    let types = ["user_login", "user_logout", "access_denied"];
    let outcomes = ["success", "failure", "denied"];
    let mut client = daemon.client();
    for i in 0..240usize {
        let mut event = json!({
            "type": types[i % 3],
            "actor": {"id": format!("u-{}", i % 7), "name": format!("user {}", i % 5)},
            "target": {"id": format!("p-{}", i % 4)},
            "outcome": outcomes[i % 3],
            "message": format!("event number {i} {}", if i % 11 == 0 { "needle" } else { "hay" }),
        });
        if types[i % 3] == "access_denied" {
            event["payload"] = json!({"resource": format!("r{i}"), "reason": "no"});
        }
        let a = client.emit(&event).unwrap();
        assert_eq!(a["ok"], json!(true), "{a}");
        if i % 40 == 39 {
            client = daemon.client();
        }
    }
    let compressed = wait_until(Duration::from_secs(30), || {
        log_files(&daemon.log_dir)
            .iter()
            .filter(|f| f.to_string_lossy().ends_with(".zst"))
            .count()
            >= 2
    });
    assert!(compressed, "{:?}", log_files(&daemon.log_dir));
    assert!(daemon.stop().success());
    let records = all_records(&daemon.log_dir);
    let parsed: Vec<Value> = records
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let stamp = |i: usize| parsed[i]["received_at"].as_str().unwrap().to_owned();
    let (from, to) = (stamp(50), stamp(170));
    type Filter = Box<dyn Fn(&Value) -> bool>;
    let cases: Vec<(Vec<String>, Filter)> = vec![
        (
            vec!["--actor".into(), "u-3".into()],
            Box::new(|r| r["actor"]["id"] == json!("u-3")),
        ),
        (
            vec!["--type".into(), "user_log*".into()],
            Box::new(|r| r["type"].as_str().unwrap().starts_with("user_log")),
        ),
        (
            vec!["--type".into(), "access_denied".into()],
            Box::new(|r| r["type"] == json!("access_denied")),
        ),
        (
            vec![
                "--target".into(),
                "p-2".into(),
                "--outcome".into(),
                "failure".into(),
            ],
            Box::new(|r| r["target"]["id"] == json!("p-2") && r["outcome"] == json!("failure")),
        ),
        (
            vec!["--text".into(), "needle".into()],
            Box::new(|r| r["message"].as_str().unwrap().contains("needle")),
        ),
        (
            vec!["--text".into(), "user 4".into()],
            Box::new(|r| r["actor"]["name"] == json!("user 4")),
        ),
        (
            vec!["--uid".into(), unsafe { libc::geteuid() }.to_string()],
            Box::new(|_| true),
        ),
        (vec!["--uid".into(), "4242".into()], Box::new(|_| false)),
        (
            { vec!["--from".into(), from.clone(), "--to".into(), to.clone()] },
            {
                let (f, t) = (from.clone(), to.clone());
                Box::new(move |r| {
                    let s = r["received_at"].as_str().unwrap();
                    s >= f.as_str() && s < t.as_str()
                })
            },
        ),
        (
            {
                vec![
                    "--from".into(),
                    from.clone(),
                    "--actor".into(),
                    "u-1".into(),
                    "--type".into(),
                    "user_*".into(),
                ]
            },
            {
                let f = from.clone();
                Box::new(move |r| {
                    r["received_at"].as_str().unwrap() >= f.as_str()
                        && r["actor"]["id"] == json!("u-1")
                        && r["type"].as_str().unwrap().starts_with("user_")
                })
            },
        ),
    ];
    let dir = daemon.log_dir.to_str().unwrap().to_owned();
    for (args, filter) in &cases {
        let expected: Vec<&String> = records
            .iter()
            .zip(&parsed)
            .filter(|(_, r)| filter(r))
            .map(|(l, _)| l)
            .collect();
        let mut argv = vec!["search", "--dir", &dir, "--oldest-first"];
        argv.extend(args.iter().map(String::as_str));
        let (code, out, err) = trail(&argv, "");
        assert_eq!(
            code,
            if expected.is_empty() { 1 } else { 0 },
            "{args:?}: {err}"
        );
        let got: Vec<&str> = out.lines().collect();
        assert_eq!(
            got,
            expected.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "{args:?}"
        );
        // Newest first with a limit: the last matches, reversed.
        let mut argv = vec!["search", "--dir", &dir, "--limit", "5"];
        argv.extend(args.iter().map(String::as_str));
        let (_, out, _) = trail(&argv, "");
        let newest: Vec<&str> = expected.iter().rev().take(5).map(|s| s.as_str()).collect();
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            newest,
            "{args:?} newest first"
        );
    }
    let (code, out, _) = trail(
        &["search", "--dir", &dir, "--format", "table", "--limit", "2"],
        "",
    );
    assert_eq!(code, 0);
    assert!(
        out.starts_with("received_at") && out.lines().count() == 3,
        "{out}"
    );
}

/// Every file under `dir` whose name ends in `.tmp`.
fn temporary_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            found.extend(temporary_files(&path));
        } else if path.to_string_lossy().ends_with(".tmp") {
            found.push(path);
        }
    }
    found
}

#[test]
fn a_full_disk_leaves_no_temporary_checkpoint_or_index_behind() {
    let mut daemon = start("max_file_bytes: 4096", vec![]);
    emit(&daemon, 0, 1);
    let file = log_files(&daemon.log_dir).pop().unwrap();
    let record = std::fs::metadata(&file).unwrap().len();
    let mut i = 1;
    while std::fs::metadata(&file).unwrap().len() + record <= 4096 {
        emit(&daemon, i, 1);
        i += 1;
    }
    // The next record starts a new file: the rotation's checkpoint is written (and fails) before the record is
    // (and fails), and so before the answer; the closed file's index is written (and fails) in the background.
    limit_file_size(&daemon, 100);
    let answer = daemon.client().emit(&login("past the limit")).unwrap();
    assert_eq!(answer["error"]["code"], json!("unavailable"), "{answer}");
    // The background index write may still hold its temporary file for a moment: what matters is that none stays.
    let mut left = Vec::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            left = temporary_files(&daemon.log_dir);
            left.is_empty()
        }),
        "temporary files left behind: {left:?}"
    );
    // Space is back (upkeep is tried again at the next rotation, within a minute, or at the next start): the index
    // is written, and no temporary file is left.
    limit_file_size(&daemon, libc::RLIM_INFINITY);
    emit(&daemon, i, 1);
    assert!(daemon.stop().success());
    daemon.spawn();
    let mut index = file.clone().into_os_string();
    index.push(".idx");
    let index = PathBuf::from(index);
    assert!(
        wait_until(Duration::from_secs(30), || index.exists()),
        "no index after space came back:\n{}",
        daemon.stderr()
    );
    assert!(daemon.stop().success());
    assert_eq!(temporary_files(&daemon.log_dir), Vec::<PathBuf>::new());
}

#[test]
fn a_full_disk_is_answered_unavailable_and_the_daemon_resumes() {
    let daemon = Daemon::start();
    emit(&daemon, 0, 5);
    let file = log_files(&daemon.log_dir).pop().unwrap();
    let size = std::fs::metadata(&file).unwrap().len();
    // Files of the daemon may not grow more than 600 bytes past the log's size: writes fail with EFBIG, as on a
    // full disk.
    let limit = |soft: u64| limit_file_size(&daemon, soft);
    limit(size + 600);
    let mut client = daemon.client();
    let mut refused = 0;
    let mut acked: Vec<Value> = (0..5).map(|i| json!(format!("event {i}"))).collect();
    for i in 0..10 {
        let a = client.emit(&login(&format!("full {i}"))).unwrap();
        if a["ok"] == json!(false) {
            assert_eq!(a["error"]["code"], json!("unavailable"), "{a}");
            refused += 1;
        } else {
            acked.push(json!(format!("full {i}")));
        }
    }
    assert!(refused >= 5, "writes past the limit were acknowledged");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.ends_with('\n'), "a half-written line remains");
    let acked_while_full = text.lines().count();
    limit(libc::RLIM_INFINITY);
    let a = client.emit(&login("space is back")).unwrap();
    assert_eq!(a["ok"], json!(true), "{a}\n{}", daemon.stderr());
    let messages: Vec<Value> = daemon
        .records()
        .iter()
        .map(|r| r["message"].clone())
        .collect();
    assert_eq!(messages.len(), acked_while_full + 1);
    assert_eq!(messages.last().unwrap(), &json!("space is back"));
    // Exactly what was acknowledged is in the log, in order: nothing acknowledged is missing, nothing refused is there.
    acked.push(json!("space is back"));
    assert_eq!(messages, acked);
    assert!(
        daemon.stderr().contains("unavailable"),
        "{}",
        daemon.stderr()
    );
    let mut daemon = daemon;
    assert!(daemon.stop().success());
    let (code, out) = verify(&daemon.log_dir, &public_key(&daemon));
    assert_eq!(code, 0, "{out}");
}
