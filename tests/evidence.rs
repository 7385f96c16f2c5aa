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
    // 48 logins and the start record.
    assert!(out.contains("intact: 49 records"), "{out}");
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
    // Compression and retention beside the tree's catch-up never leave a checkpoint without the tree.
    assert!(
        !stderr.contains("cannot compute the Merkle tree"),
        "{stderr}"
    );
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
    // The deletion records keep the Merkle tree at the deleted file's end, and verify checks the roots of the
    // checkpoints that remain from it.
    let frontier = deletion["payload"]["tree_frontier"].as_array().unwrap();
    let size = deletion["payload"]["tree_size"].as_u64().unwrap();
    assert_eq!(frontier.len() as u32, size.count_ones(), "{deletion}");
    assert!(
        out.contains("roots were checked from the tree that the deletion record of"),
        "{out}"
    );
    assert!(!out.contains("roots were not checked"), "{out}");
    // So a checkpoint signed (with the key) over another tree is caught after retention too.
    let forged = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir, forged.path());
    let newest = trail::log::checkpoint::list(forged.path()).pop().unwrap();
    let mut cp = trail::log::checkpoint::Checkpoint::parse(&std::fs::read(&newest).unwrap())
        .unwrap()
        .body;
    assert!(cp.tree_root.is_some(), "{cp:?}");
    std::fs::remove_file(&newest).unwrap();
    cp.tree_root = Some(trail::log::chain::hex(&[9; 32]));
    let signer = trail::log::checkpoint::Signer::load_or_generate(
        &daemon.path("keys/checkpoint-ed25519.pem"),
    )
    .unwrap();
    trail::log::checkpoint::write(forged.path(), &signer, &cp).unwrap();
    let (code, out) = verify(forged.path(), &public_key(&daemon));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is not the one checkpoint"), "{out}");
    // A checkpoint of format 2 (a development version's leaves, the lines) names a root over other leaves: not
    // checked, and the report says so.
    let newest = trail::log::checkpoint::list(forged.path()).pop().unwrap();
    std::fs::remove_file(&newest).unwrap();
    cp.checkpoint = 2;
    trail::log::checkpoint::write(forged.path(), &signer, &cp).unwrap();
    let (code, out) = verify(forged.path(), &public_key(&daemon));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("the Merkle tree roots of 1 checkpoint(s) of format 2 (a development version's leaves) were not checked"),
        "{out}"
    );
    // What remains can still be proved: the first record left (in a compressed file), the last one, and that the
    // newest checkpoint extends the oldest left; checked by trail verify-proof and by the RFC 9162 checker.
    prove_what_remains(&daemon.log_dir, &public_key(&daemon), None);
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

/// The deletion records in the log of `dir`, oldest first.
fn deletions(dir: &Path) -> Vec<Value> {
    all_records(dir)
        .iter()
        .filter(|r| r.contains(r#""type":"trail_log_file_deleted""#))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An expired file that the tree cache does not cover and cannot be brought up to (its directory cannot be made)
/// is kept: warned about with its name and wait once it waited three checkpoint intervals, and shown in `trail
/// status`. Once the cache can be written again, retention brings it up to date itself and deletes the file, its
/// deletion record keeping the tree.
#[test]
fn an_expired_file_the_tree_cache_cannot_cover_is_kept_warned_about_and_shown_until_it_can() {
    let mut daemon = start(
        "max_file_bytes: 4096, retention_bytes: 6000, checkpoint_every: 1s",
        vec![],
    );
    assert!(daemon.stop().success());
    let tree = daemon.log_dir.join("tree");
    std::fs::remove_dir_all(&tree).unwrap();
    std::fs::write(&tree, b"in the way of the tree cache's directory").unwrap();
    daemon.spawn();
    for batch in 0..3 {
        emit(&daemon, batch * 12, 12);
    }
    let oldest = name(&log_files(&daemon.log_dir)[0]);
    let warning = |stderr: &str| {
        stderr
            .lines()
            .find(|l| {
                l.contains("WARN")
                    && l.contains("an expired log file is kept: the tree cache does not cover it")
                    && l.contains(&oldest)
            })
            .map(str::to_owned)
    };
    assert!(
        wait_until(Duration::from_secs(120), || warning(&daemon.stderr())
            .is_some()),
        "no warning about {oldest}\n{}",
        daemon.stderr()
    );
    let line = warning(&daemon.stderr()).unwrap();
    let waited: u64 = line
        .split("waited_secs=")
        .nth(1)
        .and_then(|w| w.split(' ').next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no wait in {line}"));
    assert!(waited >= 3, "{line}");
    assert!(line.contains("reason=\"size\""), "{line}");
    assert!(
        log_files(&daemon.log_dir).iter().any(|f| name(f) == oldest),
        "{oldest} was deleted"
    );
    assert!(deletions(&daemon.log_dir).is_empty());
    let status = daemon.admin(json!({"command": "status"}));
    let stalled = &status["log"]["retention_stalled"];
    assert_eq!(stalled["file"], json!(oldest), "{status}");
    assert_eq!(stalled["expired_by"], json!("size"), "{status}");
    assert_eq!(stalled["warn_after_seconds"], json!(3), "{status}");
    assert!(stalled["waited_seconds"].as_u64().unwrap() >= 3, "{status}");
    assert!(
        stalled["error"].as_str().unwrap().contains("tree"),
        "{status}"
    );
    assert!(
        stalled["since"].as_str().unwrap().ends_with('Z'),
        "{status}"
    );
    let (code, table, err) = trail(
        &[
            "status",
            "--admin-socket",
            daemon.admin_socket().to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(table.contains(&oldest), "{table}");
    // The cache can be written again: the next round builds it and deletes the file.
    std::fs::remove_file(&tree).unwrap();
    let deleted = wait_until(Duration::from_secs(120), || {
        deletions(&daemon.log_dir)
            .iter()
            .any(|d| d["payload"]["file"] == json!(oldest))
    });
    assert!(deleted, "{oldest} was not deleted\n{}", daemon.stderr());
    let record = deletions(&daemon.log_dir)
        .into_iter()
        .find(|d| d["payload"]["file"] == json!(oldest))
        .unwrap();
    let size = record["payload"]["tree_size"].as_u64().unwrap();
    assert_eq!(
        record["payload"]["tree_frontier"].as_array().unwrap().len() as u32,
        size.count_ones(),
        "{record}"
    );
    assert!(wait_until(Duration::from_secs(60), || {
        !log_files(&daemon.log_dir).iter().any(|f| name(f) == oldest)
            && daemon.admin(json!({"command": "status"}))["log"]
                .get("retention_stalled")
                .is_none()
    }));
    assert!(daemon.stop().success());
    let (code, out) = verify(&daemon.log_dir, &public_key(&daemon));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("roots were checked from the tree that the deletion record of"),
        "{out}"
    );
}

/// Proves the first record left, the last one, and that the newest checkpoint extends the oldest one left, from
/// the log in `dir` as it is; each bundle checked by trail verify-proof and the RFC 9162 checker. `old_before`:
/// the oldest checkpoint left must have been written before the record of this seq (a deletion record).
fn prove_what_remains(dir: &Path, key: &str, old_before: Option<u64>) {
    let log = dir.to_str().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let remaining = all_records(dir);
    for line in [&remaining[0], remaining.last().unwrap()] {
        let seq = seq_of(line).to_string();
        let (code, bundle, err) = trail(&["prove", &seq, "--dir", log], "");
        assert_eq!(code, 0, "seq {seq}: {err}");
        let b: Value = serde_json::from_str(&bundle).unwrap();
        assert_eq!(b["line"], json!(line));
        assert_eq!(
            check_bundle(scratch.path(), key, &bundle),
            (0, true),
            "seq {seq}: {bundle}"
        );
    }
    let cps = trail::log::checkpoint::list(dir);
    let old = trail::log::checkpoint::Checkpoint::parse(&std::fs::read(&cps[0]).unwrap()).unwrap();
    if let Some(before) = old_before {
        assert!(
            old.body.seq.unwrap() < before,
            "the oldest checkpoint left ({:?}) is not from before the deletion at seq {before}",
            cps[0]
        );
    }
    let bundle = prove_consistency(dir);
    let b: Value = serde_json::from_str(&bundle).unwrap();
    if old_before.is_some() {
        assert!(b["old_size"].as_u64() < b["new_size"].as_u64(), "{bundle}");
    }
    assert_eq!(
        check_bundle(scratch.path(), key, &bundle),
        (0, true),
        "{bundle}"
    );
}

/// The tree cache lost or damaged after retention deleted the log's first files is built again from the last
/// deletion record's tree and the files left: by `trail prove` (into a temporary cache; the log directory is not
/// written), and by the daemon at start, whose checkpoints carry the tree again and verify. Proofs of the first
/// record left, of the last one, and of the consistency of a checkpoint from before the deletions with the newest
/// hold.
#[test]
fn a_tree_cache_lost_or_damaged_after_retention_is_rebuilt_from_the_deletion_records_tree() {
    // Several files and their checkpoints first; retention from the next start on, so that checkpoints written
    // before every deletion remain.
    let mut daemon = start("max_file_bytes: 4096", vec![]);
    for batch in 0..6 {
        emit(&daemon, batch * 12, 12);
    }
    assert!(daemon.stop().success());
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    assert!(config.contains("max_file_bytes: 4096"), "{config}");
    std::fs::write(
        &daemon.config,
        // About half of the files go: the rotation checkpoints of the closed files left remain, older than every
        // deletion.
        config.replace(
            "max_file_bytes: 4096",
            "max_file_bytes: 4096, retention_bytes: 16000",
        ),
    )
    .unwrap();
    daemon.spawn();
    assert!(
        wait_until(Duration::from_secs(60), || deletions(&daemon.log_dir).len()
            >= 2),
        "retention deleted nothing\n{}",
        daemon.stderr()
    );
    assert!(daemon.stop().success());
    let key = public_key(&daemon);
    let tree = daemon.log_dir.join("tree");
    let first_deletion = seq_of(&deletions(&daemon.log_dir)[0].to_string());
    // Lost, with the daemon stopped: trail prove builds the tree again from the deletion record's frontier.
    std::fs::remove_dir_all(&tree).unwrap();
    prove_what_remains(&daemon.log_dir, &key, Some(first_deletion));
    assert!(!tree.exists(), "trail prove wrote into the log directory");
    // The daemon builds it again at start; the checkpoints after it carry the tree, and retention goes on.
    daemon.spawn();
    assert!(
        wait_until(Duration::from_secs(60), || tree.join("base").exists()),
        "{}",
        daemon.stderr()
    );
    emit(&daemon, 72, 24);
    assert!(daemon.stop().success());
    let stderr = daemon.stderr();
    assert!(
        !stderr.contains("cannot compute the Merkle tree"),
        "{stderr}"
    );
    assert!(!stderr.contains("kept until the tree cache"), "{stderr}");
    let newest = trail::log::checkpoint::list(&daemon.log_dir).pop().unwrap();
    let cp = trail::log::checkpoint::Checkpoint::parse(&std::fs::read(&newest).unwrap()).unwrap();
    assert!(cp.body.tree_root.is_some(), "{newest:?}");
    let (code, out) = verify(&daemon.log_dir, &key);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("roots were checked from the tree"), "{out}");
    prove_what_remains(&daemon.log_dir, &key, None);
    // Damaged: every stored hash overwritten. trail prove does not trust it, nor does the daemon at start.
    let hashes = tree.join("hashes");
    let len = std::fs::metadata(&hashes).unwrap().len() as usize;
    std::fs::write(&hashes, vec![0xab; len]).unwrap();
    prove_what_remains(&daemon.log_dir, &key, None);
    daemon.spawn();
    assert!(
        wait_until(Duration::from_secs(60), || daemon
            .stderr()
            .contains("the tree cache does not match the log")),
        "{}",
        daemon.stderr()
    );
    emit(&daemon, 96, 12);
    assert!(daemon.stop().success());
    let (code, out) = verify(&daemon.log_dir, &key);
    assert_eq!(code, 0, "{out}");
    prove_what_remains(&daemon.log_dir, &key, None);
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
    // The rotation's checkpoint and the stop's may be written at once (or in one second): each is written to a
    // temporary file of its own and created exclusively under its own name, and the stop waits for every
    // checkpoint still being written. (Both once shared one temporary file, `.checkpoint.tmp`, and the process
    // could exit while the rotation's was still being written: one of the two was lost.)
    let reasons: Vec<String> = trail::log::checkpoint::list(&daemon.log_dir)
        .iter()
        .map(|p| {
            trail::log::checkpoint::Checkpoint::parse(&std::fs::read(p).unwrap())
                .unwrap()
                .body
                .reason
        })
        .collect();
    assert!(
        reasons.iter().any(|r| r == "rotation") && reasons.last().is_some_and(|r| r == "stop"),
        "a checkpoint at rotation and at stop: {reasons:?}"
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

/// The writer builds the index of each file it started as it commits (the upkeep builds the rest from the files):
/// every closed file's stored index is the one read from the file itself, also for the file the daemon found
/// with records at a restart.
#[test]
fn the_index_of_every_closed_file_is_the_one_its_records_give() {
    let mut daemon = start("max_file_bytes: 4096", vec![]);
    emit(&daemon, 0, 20);
    assert!(daemon.stop().success());
    daemon.spawn();
    for batch in 1..5 {
        emit(&daemon, batch * 20, 20);
    }
    let closed = || {
        let mut files = log_files(&daemon.log_dir);
        files.pop();
        files
    };
    assert!(closed().len() >= 4, "{:?}", closed());
    let indexed = wait_until(Duration::from_secs(30), || {
        closed().iter().all(|p| {
            trail::log::files::LogFile::parse(p)
                .unwrap()
                .index_path()
                .exists()
        })
    });
    assert!(
        indexed,
        "not every closed file has an index: {:?}",
        closed()
    );
    for path in closed() {
        let file = trail::log::files::LogFile::parse(&path).unwrap();
        let stored = trail::log::index::load(&file)
            .unwrap_or_else(|| panic!("the index of {} does not match it", path.display()));
        assert!(stored.records > 0, "{}", path.display());
        assert_eq!(
            stored,
            trail::log::index::build(&file).unwrap(),
            "{}",
            path.display()
        );
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
    // The start record is in the file too.
    let acked_while_full = acked_while_full - 1;
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

/// The chain hash a record's line stores.
fn stored_hash(line: &str) -> trail::log::chain::Hash {
    trail::log::chain::split(line.as_bytes()).unwrap().1
}

/// `line` with its message and id changed, sealed again after the record whose hash is `prev`: a forged record
/// that the chain alone accepts there (the chain needs no key).
fn forge(line: &str, prev: &trail::log::chain::Hash) -> String {
    let (body, _) = trail::log::chain::split(line.as_bytes()).unwrap();
    let body = std::str::from_utf8(body)
        .unwrap()
        .replacen("\"message\":\"event ", "\"message\":\"forged ", 1)
        .replacen("\"id\":\"0", "\"id\":\"f", 1);
    assert!(body.contains("forged"), "{body}");
    let mut out = body.into_bytes();
    trail::log::chain::seal(prev, &mut out, 0);
    String::from_utf8(out).unwrap()
}

/// Seals every record of the (uncompressed) log files in `dir` again, in order, from the genesis value: what an
/// attacker does after changing a record.
fn reseal(dir: &Path) {
    let mut prev = trail::log::chain::GENESIS;
    for f in log_files(dir) {
        let resealed: Vec<String> = lines(&f)
            .iter()
            .map(|l| {
                let (body, _) = trail::log::chain::split(l.as_bytes()).unwrap();
                let mut out = body.to_vec();
                prev = trail::log::chain::seal(&prev, &mut out, 0);
                String::from_utf8(out).unwrap()
            })
            .collect();
        write_lines(&f, &resealed);
    }
}

/// The seq of a record's line.
fn seq_of(line: &str) -> u64 {
    serde_json::from_str::<Value>(line).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_forked_or_copied_record_is_a_second_record_with_its_seq_where_it_is() {
    let mut daemon = start("max_file_bytes: 4096", vec![]);
    emit(&daemon, 0, 30);
    assert!(daemon.stop().success(), "{}", daemon.stderr());
    let key = public_key(&daemon);
    let files = log_files(&daemon.log_dir);
    assert!(files.len() >= 3, "{files:?}");
    let newest = files.last().unwrap().clone();
    // The newest file needs a login with a record before it in the same file.
    let newest = if lines(&newest).len() >= 2 {
        newest
    } else {
        files[files.len() - 2].clone()
    };
    for (where_, file) in [("closed", files[1].clone()), ("newest", newest)] {
        let original = lines(&file);
        let i = original.len() / 2;
        assert!(i >= 1 && original[i].contains("\"type\":\"user_login\""));
        let n = seq_of(&original[i]);
        let prev = stored_hash(&original[i - 1]);
        let at = format!(
            "{}:{}: seq {n}: a second record with seq {n}",
            name(&file),
            i + 2
        );
        type Edit = Box<dyn Fn(&mut Vec<String>)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "a fork before the record",
                Box::new(move |l: &mut Vec<String>| {
                    let forged = forge(&l[i], &prev);
                    l.insert(i, forged);
                }),
            ),
            (
                "a fork after the record",
                Box::new(move |l: &mut Vec<String>| {
                    let forged = forge(&l[i], &prev);
                    l.insert(i + 1, forged);
                }),
            ),
            (
                "an exact copy of the line",
                Box::new(move |l: &mut Vec<String>| {
                    let copy = l[i].clone();
                    l.insert(i + 1, copy);
                }),
            ),
        ];
        for (what, edit) in cases {
            let copy = tempfile::tempdir().unwrap();
            copy_dir(&daemon.log_dir, copy.path());
            let mut l = original.clone();
            edit(&mut l);
            write_lines(&copy.path().join(name(&file)), &l);
            let (code, out) = verify(copy.path(), &key);
            assert_eq!(code, 1, "{what} in the {where_} file: {out}");
            assert!(
                out.contains(&at),
                "{what} in the {where_} file: expected {at:?} in\n{out}"
            );
        }
    }
}

#[test]
fn closed_files_that_no_checkpoint_covers_are_a_problem_and_the_unsigned_tail_is_counted() {
    let mut daemon = start("max_file_bytes: 4096", vec![]);
    emit(&daemon, 0, 24);
    assert!(daemon.stop().success(), "{}", daemon.stderr());
    let key = public_key(&daemon);
    let (code, out) = verify(&daemon.log_dir, &key);
    assert_eq!(code, 0, "{out}");
    // The stop checkpoint covers every record.
    assert!(
        out.contains("unsigned: 0 records (after seq 25, the last a checkpoint covers)"),
        "{out}"
    );
    let files = log_files(&daemon.log_dir);
    assert!(files.len() >= 2, "{files:?}");

    // Checkpoints deleted: the closed files are covered by nothing.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir, copy.path());
    std::fs::remove_dir_all(copy.path().join("checkpoints")).unwrap();
    let (code, out) = verify(copy.path(), &key);
    assert_eq!(code, 1, "{out}");
    let first = lines(&files[0]).len();
    assert!(
        out.contains(&format!(
            "problem: {}: {first} records of this closed file (seq 1..{first}) are covered by no checkpoint",
            name(&files[0])
        )),
        "{out}"
    );
    assert!(
        out.contains("unsigned: 25 records (no checkpoint covers any record)"),
        "{out}"
    );
    // Without a key that is said, but the checkpoints' absence is no proof of anything.
    let (code, out, _) = trail(&["verify", copy.path().to_str().unwrap()], "");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("are covered by no checkpoint"), "{out}");

    // A record changed, the whole chain sealed again and the checkpoints deleted: caught the same way.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir, copy.path());
    let target = copy.path().join(name(&files[0]));
    let mut l = lines(&target);
    l[2] = l[2].replace("event 1", "event X");
    write_lines(&target, &l);
    reseal(copy.path());
    let (code, out) = verify(copy.path(), &key);
    assert_eq!(
        code, 1,
        "the re-sealed chain with its checkpoints deleted passed: {out}"
    );
    std::fs::remove_dir_all(copy.path().join("checkpoints")).unwrap();
    let (code, out) = verify(copy.path(), &key);
    assert_eq!(
        code, 1,
        "the re-sealed chain with its checkpoints deleted passed: {out}"
    );
    assert!(out.contains("covered by no checkpoint"), "{out}");

    // A daemon still running: the records after its last checkpoint are the unsigned tail.
    daemon.spawn();
    emit(&daemon, 24, 3);
    // A file closed by these records has its checkpoint written beside the writer, possibly just after the
    // records were acknowledged: verify agrees once it is there.
    let mut out = String::new();
    let agreed = wait_until(Duration::from_secs(30), || {
        let (code, o) = verify(&daemon.log_dir, &key);
        out = o;
        code == 0
    });
    assert!(agreed, "{out}");
    // 29 records; a rotation may have written a checkpoint since the stop's, at seq 25.
    let unsigned = out.lines().find(|l| l.starts_with("unsigned: ")).unwrap();
    let covered: u64 = unsigned
        .split("after seq ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(covered >= 25, "{out}");
    assert!(
        unsigned.starts_with(&format!("unsigned: {} records", 29 - covered)),
        "{out}"
    );
    assert!(daemon.stop().success());
}

#[test]
fn records_after_a_clean_stop_are_found_by_verify_and_by_the_next_start() {
    let mut daemon = Daemon::start();
    emit(&daemon, 0, 3);
    assert!(daemon.stop().success(), "{}", daemon.stderr());
    let key = public_key(&daemon);
    let every = |d: &Daemon| -> Vec<Value> {
        d.all_log_lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let records = every(&daemon);
    // Every start's first record is the daemon's own start record, naming the last checkpoint it found.
    assert_eq!(records[0]["type"], json!("trail_started"), "{}", records[0]);
    assert_eq!(records[0]["source"]["daemon"], json!(true));
    assert!(
        records[0]["payload"].get("checkpoint").is_none(),
        "{}",
        records[0]
    );
    let stop = trail::log::checkpoint::list(&daemon.log_dir).pop().unwrap();
    let (code, out) = verify(&daemon.log_dir, &key);
    assert_eq!(code, 0, "{out}");

    // A well-chained record appended while the daemon is stopped.
    let file = log_files(&daemon.log_dir).pop().unwrap();
    let mut l = lines(&file);
    let last = l.last().unwrap().clone();
    let forged = forge(&last, &trail::log::chain::GENESIS);
    let (body, _) = trail::log::chain::split(forged.as_bytes()).unwrap();
    let body = std::str::from_utf8(body).unwrap().replacen(
        &format!("{{\"seq\":{}", seq_of(&last)),
        &format!("{{\"seq\":{}", seq_of(&last) + 1),
        1,
    );
    let mut out = body.into_bytes();
    trail::log::chain::seal(&stored_hash(&last), &mut out, 0);
    l.push(String::from_utf8(out).unwrap());
    write_lines(&file, &l);
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir, copy.path());
    let (code, out) = verify(copy.path(), &key);
    assert_eq!(code, 1, "{out}");
    let expected = format!(
        "{}:{}: seq 5: a record after the stop checkpoint {} (seq 4) and before the daemon's next trail_started record",
        name(&file),
        l.len(),
        name(&stop)
    );
    assert!(out.contains(&expected), "expected {expected:?} in\n{out}");
    assert!(
        out.contains("1 records (seq 5..5) were added while it was not running"),
        "{out}"
    );

    // The next start says so in its log and records it, and goes on.
    daemon.spawn();
    emit(&daemon, 3, 1);
    assert!(daemon.stop().success(), "{}", daemon.stderr());
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("records follow the last stop checkpoint"),
        "{stderr}"
    );
    let records = every(&daemon);
    let started = &records[5];
    assert_eq!(started["type"], json!("trail_started"), "{started}");
    assert_eq!(
        started["payload"]["checkpoint"],
        json!(name(&stop)),
        "{started}"
    );
    assert_eq!(started["payload"]["checkpoint_reason"], json!("stop"));
    assert_eq!(started["payload"]["checkpoint_seq"], json!(4));
    let tampered = &records[6];
    assert_eq!(tampered["type"], json!("trail_log_tampered"), "{tampered}");
    assert_eq!(
        tampered["payload"],
        json!({"checkpoint": name(&stop), "checkpoint_seq": 4, "file": name(&file), "first_seq": 5,
            "last_seq": 5, "records": 1})
    );
    assert_eq!(records[7]["message"], json!("event 3"));
    // The forged record stays a problem; the rest of the log is intact.
    let (code, out) = verify(&daemon.log_dir, &key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&expected), "{out}");
    assert!(out.contains(", 1 problems,"), "{out}");
}

#[test]
fn problems_in_a_compressed_file_name_the_file_on_disk() {
    let mut daemon = start("max_file_bytes: 4096, compress: true", vec![]);
    emit(&daemon, 0, 30);
    let compressed = wait_until(Duration::from_secs(30), || {
        log_files(&daemon.log_dir)
            .iter()
            .any(|f| name(f).ends_with(".jsonl.zst"))
    });
    assert!(compressed, "nothing was compressed:\n{}", daemon.stderr());
    assert!(daemon.stop().success());
    let key = public_key(&daemon);
    let zst = log_files(&daemon.log_dir)
        .into_iter()
        .find(|f| name(f).ends_with(".jsonl.zst"))
        .unwrap();
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir, copy.path());
    // A copy of one of its records appended, compressed again.
    let text =
        String::from_utf8(zstd::decode_all(std::fs::File::open(&zst).unwrap()).unwrap()).unwrap();
    let mut l: Vec<String> = text.lines().map(str::to_owned).collect();
    l.push(l[1].clone());
    let plain = l.iter().map(|x| format!("{x}\n")).collect::<String>();
    std::fs::write(
        copy.path().join(name(&zst)),
        zstd::encode_all(plain.as_bytes(), 3).unwrap(),
    )
    .unwrap();
    let (code, out) = verify(copy.path(), &key);
    assert_eq!(code, 1, "{out}");
    let seq = seq_of(&l[1]);
    assert!(
        out.contains(&format!(
            "{}:{}: seq {seq}: a second record with seq {seq}",
            name(&zst),
            l.len()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "problem: {}: the file is {} bytes (uncompressed), but it was closed",
            name(&zst),
            plain.len()
        )),
        "{out}"
    );
    assert!(
        !out.contains(&format!(
            "problem: {}:",
            name(&zst).trim_end_matches(".zst")
        )),
        "{out}"
    );
}

/// Signs a new checkpoint over the log in `dir` as it is now, with the daemon's own private key, after deleting
/// every checkpoint: what someone who controls the host does after changing the log.
fn sign_again(dir: &Path, private_key: &Path) {
    use trail::log::checkpoint;
    std::fs::remove_dir_all(dir.join(checkpoint::DIR)).unwrap();
    let signer = checkpoint::Signer::load_or_generate(private_key).unwrap();
    let files: Vec<checkpoint::FileEntry> = trail::log::files::list(dir)
        .unwrap()
        .iter()
        .map(|f| trail::log::index::summary(f).unwrap())
        .collect();
    // The last file that holds a record (the newest may have been emptied).
    let last = files.iter().rev().find(|f| f.last_seq.is_some()).unwrap();
    let mut created_at = Vec::new();
    trail::record::write_rfc3339(&mut created_at, std::time::SystemTime::now());
    let body = checkpoint::Body {
        checkpoint: trail::log::checkpoint::FORMAT,
        created_at: String::from_utf8(created_at).unwrap(),
        reason: "stop".into(),
        seq: last.last_seq,
        hash: last.last_hash.clone().unwrap(),
        files: files.clone(),
        tree_size: None,
        tree_root: None,
        key: signer.public_hex(),
    };
    checkpoint::write(dir, &signer, &body).unwrap();
}

#[test]
fn checkpoints_kept_elsewhere_catch_a_cut_end_and_a_log_rolled_back_and_signed_again() {
    let mut s = crate::sinks::with_sinks(
        // The template sink appends each record's line to a file: the checkpoints as a sink delivers them.
        &[crate::sinks::sink(
            "offsite",
            "line-file",
            "[trail_checkpoint]",
            "{path: $DIR/offsite.jsonl}",
        )],
        &[("trail-sink-template", "libtemplate.so")],
        "",
    );
    s.log = Some("max_file_bytes: 4096".into());
    let mut daemon = Daemon::with(s);
    emit(&daemon, 0, 30);
    let offsite = daemon.path("offsite.jsonl");
    let mut delivered = Vec::new();
    // Rotations' checkpoints are streamed as they are written (on a loaded machine the checkpoint thread, at the
    // lowest priority, may take a while; the stop waits for it).
    assert!(
        wait_until(Duration::from_secs(60), || {
            delivered = crate::util::recorded(&offsite);
            delivered
                .iter()
                .any(|r| r["payload"]["reason"] == json!("rotation"))
        }),
        "no rotation checkpoint was delivered: {delivered:#?}\n{}",
        daemon.stderr()
    );
    assert!(daemon.stop().success(), "{}", daemon.stderr());
    // The checkpoint at stop is streamed at the next start.
    daemon.spawn();
    assert!(
        wait_until(Duration::from_secs(60), || {
            delivered = crate::util::recorded(&offsite);
            delivered
                .iter()
                .any(|r| r["payload"]["reason"] == json!("stop"))
        }),
        "the stop checkpoint was not delivered: {delivered:#?}\n{}",
        daemon.stderr()
    );
    // Every checkpoint of the first run went off the host, those still being written when it stopped included.
    let first_run: Vec<String> = std::fs::read_dir(daemon.log_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    assert!(
        wait_until(Duration::from_secs(60), || {
            delivered = crate::util::recorded(&offsite);
            first_run
                .iter()
                .all(|n| delivered.iter().any(|r| r["payload"]["name"] == json!(n)))
        }),
        "checkpoints {first_run:?}, delivered: {delivered:#?}"
    );
    for r in &delivered {
        assert_eq!(r["type"], json!("trail_checkpoint"));
        assert_eq!(r["source"]["daemon"], json!(true));
        // The line as written in checkpoints/, byte for byte.
        let name = r["payload"]["name"].as_str().unwrap();
        let local = std::fs::read_to_string(daemon.log_dir.join("checkpoints").join(name)).unwrap();
        assert_eq!(r["payload"]["line"].as_str().unwrap(), local.trim_end());
    }
    assert!(daemon.stop().success());
    // What was delivered by the time the daemon stopped (a rotation may have added one since).
    let delivered = crate::util::recorded(&offsite);
    let key = public_key(&daemon);
    let private_key = daemon.path("keys/checkpoint-ed25519.pem");
    let outside = offsite.to_str().unwrap().to_owned();
    let with_outside = |dir: &Path, outside: &str| {
        let (code, out, err) = trail(
            &[
                "verify",
                dir.to_str().unwrap(),
                "--key",
                &key,
                "--checkpoints",
                outside,
            ],
            "",
        );
        (code, format!("{out}{err}"))
    };
    let (code, out) = with_outside(&daemon.log_dir, &outside);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "outside: {} of the checkpoints were kept elsewhere",
            delivered.len()
        )),
        "{out}"
    );

    // Records cut off the end, the checkpoints deleted and one signed again over what is left: the local log
    // verifies, the checkpoints kept elsewhere do not agree.
    let cut = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir, cut.path());
    // Everything from the last record the delivered stop checkpoint covers on.
    let stop_seq = delivered
        .iter()
        .filter(|r| r["payload"]["reason"] == json!("stop"))
        .map(|r| r["payload"]["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    for f in log_files(cut.path()) {
        let kept: Vec<String> = lines(&f)
            .into_iter()
            .filter(|l| seq_of(l) < stop_seq)
            .collect();
        if kept.is_empty() {
            std::fs::remove_file(&f).unwrap();
        } else {
            write_lines(&f, &kept);
        }
    }
    sign_again(cut.path(), &private_key);
    let (code, out) = verify(cut.path(), &key);
    assert_eq!(
        code, 0,
        "the attack is not one the local checkpoints catch: {out}"
    );
    let (code, out) = with_outside(cut.path(), &outside);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("records were removed from its end"), "{out}");
    assert!(out.contains("(kept in "), "{out}");

    // A record of a closed file changed, the chain sealed again and the checkpoints signed again.
    let rolled = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir, rolled.path());
    let closed = log_files(rolled.path())[1].clone();
    let mut l = lines(&closed);
    l[1] = l[1].replacen("\"message\":\"event ", "\"message\":\"other ", 1);
    write_lines(&closed, &l);
    reseal(rolled.path());
    sign_again(rolled.path(), &private_key);
    let (code, out) = verify(rolled.path(), &key);
    assert_eq!(
        code, 0,
        "the attack is not one the local checkpoints catch: {out}"
    );
    let (code, out) = with_outside(rolled.path(), &outside);
    assert_eq!(code, 1, "{out}");
    // Checkpoints vouch for each file's last record: the changed file's is the first that differs.
    let last = lines(&closed).len();
    let seq = seq_of(lines(&closed).last().unwrap());
    assert!(
        out.contains(&format!(
            "{}:{last}: seq {seq}: the record's hash differs from the one checkpoint",
            name(&closed)
        )),
        "{out}"
    );
    // The same from a directory of checkpoint files kept elsewhere.
    let kept = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir.join("checkpoints"), kept.path());
    let (code, out) = with_outside(rolled.path(), kept.path().to_str().unwrap());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("the record's hash differs from the one checkpoint"),
        "{out}"
    );
    // What is not a checkpoint is refused, naming the line.
    let junk = daemon.path("junk.jsonl");
    std::fs::write(&junk, "{\"type\":\"user_login\"}\n").unwrap();
    let (code, out) = with_outside(&daemon.log_dir, junk.to_str().unwrap());
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("junk.jsonl:1: neither a checkpoint line nor a trail_checkpoint record"),
        "{out}"
    );
}

/// A record line's leaf hash as README.md defines it ("Merkle tree"), in Python: SHA-256 of 0x00, the seq as 8
/// bytes big-endian and SHA-256 of the line's bytes after `{"seq":<digits>` up to its `,"hash":"` field, followed
/// by `}`.
const LEAF_PY: &str = r#"
import hashlib
H = lambda b: hashlib.sha256(b).digest()
def leaf(line):
    assert line.startswith(b'{"seq":'), line
    i = 7
    while line[i:i + 1].isdigit():
        i += 1
    rest = line[i:line.rindex(b',"hash":"')] + b"}"
    return H(b"\x00" + int(line[7:i]).to_bytes(8, "big") + H(rest))
"#;

/// RFC 9162's Merkle tree hash (section 2.1.1) over the records of a file, written from the RFC in another language
/// than the daemon's (with [`LEAF_PY`]): prints the root of the first N lines, hex, for every N given.
const MTH_PY: &str = r#"
import sys
def mth(leaves):
    n = len(leaves)
    if n == 0:
        return H(b"")
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return H(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))
leaves = [leaf(l) for l in open(sys.argv[1], "rb").read().split(b"\n")[:-1]]
for n in sys.argv[2:]:
    print(mth(leaves[:int(n)]).hex())
"#;

#[test]
fn checkpoints_sign_the_rfc_9162_tree_of_the_records_also_as_a_c2sp_note() {
    let mut daemon = start("max_file_bytes: 4096, compress: true", vec![]);
    emit(&daemon, 0, 30);
    assert!(
        wait_until(Duration::from_secs(30), || log_files(&daemon.log_dir)
            .iter()
            .any(|f| name(f).ends_with(".zst"))),
        "nothing was compressed"
    );
    assert!(daemon.stop().success(), "{}", daemon.stderr());
    let key = trail::log::checkpoint::read_public_key(&public_key(&daemon)).unwrap();
    // Every record line, across rotated and compressed files, in order.
    let records = all_records(&daemon.log_dir);
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("records.jsonl");
    std::fs::write(
        &all,
        records.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let mut expected = Vec::new();
    for path in trail::log::checkpoint::list(&daemon.log_dir) {
        let cp = trail::log::checkpoint::Checkpoint::parse(&std::fs::read(&path).unwrap()).unwrap();
        let (size, root) = (
            cp.body.tree_size.unwrap(),
            cp.body.tree_root.clone().unwrap(),
        );
        // The tree at a checkpoint holds exactly the records up to its seq.
        let upto = records
            .iter()
            .filter(|l| seq_of(l) <= cp.body.seq.unwrap())
            .count() as u64;
        assert_eq!(size, upto, "{}", path.display());
        // The C2SP note beside it says the same, signed by the checkpoint key (checked by signed_note's verifier).
        let note_path = path.with_extension("note");
        let note = std::fs::read(&note_path).unwrap();
        let opened = trail::log::checkpoint::open_note(&note, &key).unwrap();
        assert_eq!(opened.size, size);
        assert_eq!(trail::log::chain::hex(&opened.root.0), root);
        let text = String::from_utf8(note.clone()).unwrap();
        let mut l = text.lines();
        assert_eq!(
            l.next(),
            Some(trail::log::checkpoint::origin(&key).as_str())
        );
        assert_eq!(l.next(), Some(size.to_string().as_str()));
        // Another key does not open it, and a changed size breaks its signature.
        let other =
            trail::log::checkpoint::Signer::load_or_generate(&dir.path().join("o.pem")).unwrap();
        assert!(trail::log::checkpoint::open_note(&note, &other.verifying_key()).is_err());
        let forged = text.replacen(&format!("\n{size}\n"), &format!("\n{}\n", size + 1), 1);
        assert!(trail::log::checkpoint::open_note(forged.as_bytes(), &key).is_err());
        expected.push((size, root));
    }
    assert!(expected.len() >= 3, "{expected:?}");
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!("{LEAF_PY}{MTH_PY}"))
        .arg(&all)
        .args(expected.iter().map(|(s, _)| s.to_string()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let roots: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        roots,
        expected.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>()
    );

    // verify recomputes the tree: a checkpoint signed with another root (by someone with the key) is reported.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&daemon.log_dir, copy.path());
    let newest = trail::log::checkpoint::list(copy.path()).pop().unwrap();
    let mut cp = trail::log::checkpoint::Checkpoint::parse(&std::fs::read(&newest).unwrap())
        .unwrap()
        .body;
    std::fs::remove_file(&newest).unwrap();
    cp.tree_root = Some(trail::log::chain::hex(&[9; 32]));
    let signer = trail::log::checkpoint::Signer::load_or_generate(
        &daemon.path("keys/checkpoint-ed25519.pem"),
    )
    .unwrap();
    trail::log::checkpoint::write(copy.path(), &signer, &cp).unwrap();
    let (code, out) = verify(copy.path(), &public_key(&daemon));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is not the one checkpoint"), "{out}");
    let (code, out) = verify(&daemon.log_dir, &public_key(&daemon));
    assert_eq!(code, 0, "{out}");

    // Proofs for single records, across rotated and compressed files, checked by trail verify-proof and by a
    // checker written from RFC 9162 in Python.
    let key_file = public_key(&daemon);
    let log = daemon.log_dir.to_str().unwrap().to_owned();
    let check = |bundle: &str| check_bundle(dir.path(), &key_file, bundle);
    let zst_seq = log_files(&daemon.log_dir)
        .iter()
        .find(|f| name(f).ends_with(".zst"))
        .map(|f| trail::log::files::LogFile::parse(f).unwrap().first_seq + 1)
        .unwrap();
    let last_seq = seq_of(records.last().unwrap());
    for seq in [1, zst_seq, last_seq] {
        let (code, bundle, err) = trail(&["prove", &seq.to_string(), "--dir", &log], "");
        assert_eq!(code, 0, "seq {seq}: {err}");
        assert_eq!(check(&bundle), (0, true), "seq {seq}: {bundle}");
        let mut b: Value = serde_json::from_str(&bundle).unwrap();
        assert_eq!(b["seq"], json!(seq));
        // A tampered record, proof or checkpoint fails both checkers.
        let mut record = b.clone();
        record["line"] = json!(b["line"].as_str().unwrap().replacen(
            "\"type\":\"",
            "\"type\":\"x",
            1
        ));
        assert_eq!(check(&record.to_string()), (1, false), "record");
        if !b["proof"].as_array().unwrap().is_empty() {
            let mut proof = b.clone();
            proof["proof"][0] = json!(trail::log::tree::leaf(1, &[7; 32]).to_string());
            assert_eq!(check(&proof.to_string()), (1, false), "proof");
        }
        let note = b["checkpoint"]["note"].as_str().unwrap().to_owned();
        let root_line = note.lines().nth(2).unwrap().to_owned();
        let other_root = trail::log::tree::leaf(2, &[8; 32]).to_string();
        b["checkpoint"]["note"] = json!(note.replacen(&root_line, &other_root, 1));
        assert_eq!(check(&b.to_string()).0, 1, "checkpoint");
    }
    // A later checkpoint's tree extends an earlier one's.
    let bundle = prove_consistency(&daemon.log_dir);
    assert_eq!(check(&bundle), (0, true), "{bundle}");
    let mut b: Value = serde_json::from_str(&bundle).unwrap();
    if !b["proof"].as_array().unwrap().is_empty() {
        b["proof"][0] = json!(trail::log::tree::leaf(1, &[7; 32]).to_string());
        assert_eq!(check(&b.to_string()), (1, false));
    }
}

/// `trail prove --consistency` from the first checkpoint of the log in `dir` to its last: the bundle.
fn prove_consistency(dir: &Path) -> String {
    let cps = trail::log::checkpoint::list(dir);
    let (code, bundle, err) = trail(
        &[
            "prove",
            "--dir",
            dir.to_str().unwrap(),
            "--consistency",
            cps[0].to_str().unwrap(),
            cps.last().unwrap().to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    bundle
}

/// Checks a bundle of `trail prove` with `trail verify-proof --key KEY` and with the RFC 9162 checker in Python
/// (written to `dir`): (verify-proof's exit code, whether the Python checker accepted it).
fn check_bundle(dir: &Path, key_file: &str, bundle: &str) -> (i32, bool) {
    let path = dir.join("bundle.json");
    std::fs::write(&path, bundle).unwrap();
    let (code, out, err) = trail(
        &["verify-proof", path.to_str().unwrap(), "--key", key_file],
        "",
    );
    assert!(code != 2, "{out}{err}");
    let python = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!("{LEAF_PY}{RFC9162_PY}"))
        .arg(&path)
        .output()
        .unwrap();
    (code, python.status.success())
}

/// RFC 9162's inclusion (2.1.3.2) and consistency (2.1.4.2) verification, written from the RFC: checks a bundle of
/// `trail prove` against the roots its notes state (the notes' signatures are trail verify-proof's business).
const RFC9162_PY: &str = r#"
import base64, json, sys
b = json.load(open(sys.argv[1]))
def root(note):
    lines = note.split("\n")
    return int(lines[1]), base64.b64decode(lines[2])
def inclusion(index, size, leaf, proof, r):
    if index >= size: return False
    fn, sn, h = index, size - 1, leaf
    for p in proof:
        if sn == 0: return False
        if fn & 1 or fn == sn:
            h = H(b"\x01" + p + h)
            if not fn & 1:
                while True:
                    fn >>= 1; sn >>= 1
                    if fn & 1 or fn == 0: break
        else:
            h = H(b"\x01" + h + p)
        fn >>= 1; sn >>= 1
    return sn == 0 and h == r
def consistency(first, second, fh, sh, proof):
    if first == second: return not proof and fh == sh
    if first & (first - 1) == 0: proof = [fh] + proof
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1; sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0: return False
        if fn & 1 or fn == sn:
            fr = H(b"\x01" + c + fr); sr = H(b"\x01" + c + sr)
            if not fn & 1:
                while True:
                    fn >>= 1; sn >>= 1
                    if fn & 1 or fn == 0: break
        else:
            sr = H(b"\x01" + sr + c)
        fn >>= 1; sn >>= 1
    return sn == 0 and fr == fh and sr == sh
proof = [base64.b64decode(p) for p in b["proof"]]
if b["kind"] == "inclusion":
    size, r = root(b["checkpoint"]["note"])
    ok = size == b["tree_size"] and inclusion(b["index"], size, leaf(b["line"].encode()), proof, r)
else:
    (os_, orr), (ns, nr) = root(b["old"]["note"]), root(b["new"]["note"])
    ok = consistency(os_, ns, orr, nr, proof)
sys.exit(0 if ok else 1)
"#;
