//! Idempotent submission: `idempotency_key`, the window per uid, its bound and its rebuild at start; and
//! `trail emit`'s exit codes and `--retry`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{Daemon, Setup, let_others_traverse, other_user, trail, wait_until};

const LONG: Duration = Duration::from_secs(60);

fn keyed(key: &str, actor: &str) -> Value {
    json!({"type": "user_logout", "actor": {"id": actor}, "idempotency_key": key})
}

/// Sends one request line as written and reads its answer.
fn send(daemon: &Daemon, line: &str) -> Value {
    daemon
        .client()
        .emit_raw(format!("{line}\n").as_bytes())
        .unwrap()
}

fn with_key(daemon: &Daemon, key: &str) -> Vec<Value> {
    daemon
        .records()
        .into_iter()
        .filter(|r| r["idempotency_key"] == json!(key))
        .collect()
}

/// Sets the daemon's `RLIMIT_FSIZE` (`None`: no limit): writes past it fail with EFBIG, as on a full disk.
fn limit_file_size(daemon: &Daemon, soft: Option<u64>) {
    let l = libc::rlimit {
        rlim_cur: soft.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    let set = unsafe {
        libc::prlimit(
            daemon.pid() as i32,
            libc::RLIMIT_FSIZE,
            &l,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(set, 0);
}

/// A full disk from now on: no log file may grow.
fn fill_disk(daemon: &Daemon) {
    // The log files only: the directory also holds subdirectories (checkpoints, the tree cache).
    let largest = std::fs::read_dir(&daemon.log_dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .max()
        .unwrap();
    limit_file_size(daemon, Some(largest));
}

#[test]
fn a_retry_after_a_lost_answer_stores_one_record_and_a_different_event_is_a_conflict() {
    let daemon = Daemon::start();
    let line = r#"{"type":"user_login","actor":{"id":"u-1","name":"alice"},"message":"caf\u00e9","outcome":"success","payload":{"method":"sso"},"idempotency_key":"lost-1"}"#;
    // The first attempt: sent, and the connection closed before the answer was read.
    let mut raw = UnixStream::connect(&daemon.socket).unwrap();
    raw.write_all(format!("{line}\n").as_bytes()).unwrap();
    drop(raw);
    assert!(wait_until(LONG, || with_key(&daemon, "lost-1").len() == 1));
    let stored = with_key(&daemon, "lost-1").remove(0);
    // The retry stores nothing and is answered with the first one's id and seq.
    let answer = send(&daemon, line);
    assert_eq!(
        answer,
        json!({"ok": true, "id": stored["id"], "seq": stored["seq"], "duplicate": true})
    );
    // The same event written differently by another client library: whitespace, key order of the envelope and of
    // actor, escapes in message.
    let other_spelling =
        r#"{ "idempotency_key" : "lost-1", "outcome": "success", "type": "user_login",
        "payload": {"method": "sso"}, "message": "café", "actor": {"name": "alice", "id": "u-1"} }"#
            .replace('\n', " ");
    assert_eq!(send(&daemon, &other_spelling)["duplicate"], json!(true));
    // The same key for a different event (another message, or an occurred_at the first did not have).
    for different in [
        line.replace("caf\\u00e9", "tea"),
        line.replace(
            r#""outcome""#,
            r#""occurred_at":"2026-01-01T00:00:00Z","outcome""#,
        ),
    ] {
        let answer = send(&daemon, &different);
        assert_eq!(answer["error"]["code"], json!("conflict"), "{answer}");
        assert_eq!(
            answer["error"]["details"][0]["path"],
            json!("/idempotency_key")
        );
    }
    assert_eq!(with_key(&daemon, "lost-1").len(), 1);
    // The key is in the record, after payload and before hash.
    let text = daemon
        .log_lines()
        .into_iter()
        .find(|l| l.contains("lost-1"))
        .unwrap();
    assert!(
        text.contains(r#""payload":{"method":"sso"},"idempotency_key":"lost-1","hash":""#),
        "{text}"
    );
    // A key too long is refused.
    let answer = send(&daemon, &keyed(&"k".repeat(129), "u").to_string());
    assert_eq!(answer["error"]["code"], json!("invalid_event"), "{answer}");
    assert_eq!(
        answer["error"]["details"][0]["path"],
        json!("/idempotency_key")
    );
}

#[test]
fn keys_survive_a_restart_within_the_window_and_expire_after_it() {
    let mut daemon = Daemon::with(Setup {
        extra_config: "idempotency: {window: 15s}\n".into(),
        ..Setup::default()
    });
    let lines = [
        keyed("r-1", "a").to_string(),
        r#"{"type":"user_login","actor":{"id":"b"},"occurred_at":"2026-11-22T10:00:00.5+01:00","message":"tab\there \"q\"","payload":{ "method" : "sso" },"idempotency_key":"r-2"}"#.to_owned(),
        r#"{"type":"user_logout","target":{"type":"session","id":"s"},"idempotency_key":"r-3 with \"quotes\" and é"}"#.to_owned(),
    ];
    let first: Vec<Value> = lines.iter().map(|l| send(&daemon, l)).collect();
    assert!(
        first
            .iter()
            .all(|a| a["ok"] == json!(true) && a.get("duplicate").is_none()),
        "{first:?}"
    );
    daemon.stop();
    daemon.spawn();
    assert!(
        daemon.stderr().contains("idempotency window rebuilt")
            && daemon.stderr().contains("keys=3"),
        "{}",
        daemon.stderr()
    );
    for (line, before) in lines.iter().zip(&first) {
        let answer = send(&daemon, line);
        assert_eq!(answer["duplicate"], json!(true), "{line}: {answer}");
        assert_eq!(
            (&answer["id"], &answer["seq"]),
            (&before["id"], &before["seq"])
        );
    }
    let answer = send(&daemon, &keyed("r-1", "someone else").to_string());
    assert_eq!(answer["error"]["code"], json!("conflict"), "{answer}");
    // Once the window after the first record is over, the key is new: the event is stored again.
    let mut again = Value::Null;
    assert!(wait_until(LONG, || {
        again = send(&daemon, &lines[0]);
        again.get("duplicate").is_none()
    }));
    assert_eq!(again["ok"], json!(true), "{again}");
    assert_eq!(with_key(&daemon, "r-1").len(), 2);
    // Records with keys are chained and verified like any other.
    daemon.stop();
    let key = daemon.dir.path().join("keys/checkpoint-ed25519.pem.pub");
    let (code, out, err) = trail(
        &[
            "verify",
            daemon.log_dir.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(code, 0, "{out}{err}");
    // The 4 events and the `trail_started` record of each of the two starts.
    assert!(
        out.lines().any(|l| l.starts_with("intact: 6 records")),
        "{out}"
    );
}

#[test]
fn keys_of_different_uids_do_not_collide() {
    let daemon = Daemon::start();
    let Some(user) = other_user() else { return };
    use std::os::unix::fs::PermissionsExt;
    let_others_traverse(daemon.dir.path());
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let emit_as = |command: &mut Command, actor: &str| {
        let out = command
            .args([
                "emit",
                "--socket",
                daemon.socket.to_str().unwrap(),
                "-t",
                "user_logout",
            ])
            .args(["--actor-id", actor, "--idempotency-key", "shared"])
            .output()
            .unwrap();
        let answer: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), answer)
    };
    let trail_bin = env!("CARGO_BIN_EXE_trail");
    let (code, mine) = emit_as(&mut Command::new(trail_bin), "root's");
    assert_eq!(code, Some(0), "{mine}");
    let (code, theirs) = emit_as(&mut user.command(trail_bin), "theirs");
    assert_eq!(code, Some(0), "{theirs}");
    assert!(theirs.get("duplicate").is_none(), "{theirs}");
    assert_ne!(mine["id"], theirs["id"]);
    // Each uid's repeat is its own duplicate.
    let (_, again) = emit_as(&mut user.command(trail_bin), "theirs");
    assert_eq!(
        (&again["duplicate"], &again["id"]),
        (&json!(true), &theirs["id"])
    );
    let (_, again) = emit_as(&mut Command::new(trail_bin), "root's");
    assert_eq!(
        (&again["duplicate"], &again["id"]),
        (&json!(true), &mine["id"])
    );
    let stored = with_key(&daemon, "shared");
    let uids: Vec<&Value> = stored.iter().map(|r| &r["source"]["uid"]).collect();
    assert_eq!(uids, [&json!(0), &json!(user.uid)]);
}

#[test]
fn the_window_bound_forgets_the_oldest_key_first() {
    let daemon = Daemon::with(Setup {
        extra_config: "idempotency: {max_keys: 3}\n".into(),
        ..Setup::default()
    });
    for key in ["a", "b", "c", "d"] {
        assert!(
            send(&daemon, &keyed(key, "x").to_string())
                .get("duplicate")
                .is_none()
        );
    }
    // "a" was forgotten when "d" came: stored again; "c" and "d" are still known.
    assert!(
        send(&daemon, &keyed("a", "x").to_string())
            .get("duplicate")
            .is_none()
    );
    for key in ["c", "d"] {
        assert_eq!(
            send(&daemon, &keyed(key, "x").to_string())["duplicate"],
            json!(true)
        );
    }
    assert_eq!(with_key(&daemon, "a").len(), 2);
    let status = daemon.admin(json!({"command": "status"}))["idempotency"].clone();
    assert_eq!(
        (&status["keys"], &status["evicted"], &status["max_keys"]),
        (&json!(3), &json!(2), &json!(3)),
        "{status}"
    );
    // "b" went when "a" came back.
    assert!(
        send(&daemon, &keyed("b", "x").to_string())
            .get("duplicate")
            .is_none()
    );
}

#[test]
fn repeats_in_flight_at_once_are_stored_once() {
    let daemon = Daemon::start();
    // In one pipeline, in one write: the second waits for the first.
    let line = keyed("burst", "x").to_string() + "\n";
    let mut raw = UnixStream::connect(&daemon.socket).unwrap();
    raw.write_all(line.repeat(50).as_bytes()).unwrap();
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    let mut text = String::new();
    raw.read_to_string(&mut text).unwrap();
    let answers: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 50);
    assert!(answers[0]["ok"] == json!(true) && answers[0].get("duplicate").is_none());
    assert!(
        answers[1..]
            .iter()
            .all(|a| a["duplicate"] == json!(true) && a["id"] == answers[0]["id"]),
        "{text}"
    );
    // From eight connections at once, each a pipeline of the same keys.
    let lines: String = (0..20)
        .map(|i| keyed(&format!("race-{i}"), "x").to_string() + "\n")
        .collect();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (socket, lines) = (daemon.socket.clone(), lines.clone());
            std::thread::spawn(move || {
                let mut raw = UnixStream::connect(socket).unwrap();
                raw.write_all(lines.as_bytes()).unwrap();
                raw.shutdown(std::net::Shutdown::Write).unwrap();
                let mut text = String::new();
                raw.read_to_string(&mut text).unwrap();
                text.lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let answers: Vec<Vec<Value>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for i in 0..20 {
        let key = format!("race-{i}");
        assert_eq!(with_key(&daemon, &key).len(), 1, "{key}");
        let fresh = answers
            .iter()
            .filter(|a| a[i].get("duplicate").is_none())
            .count();
        assert_eq!(fresh, 1, "{key}: {answers:?}");
        assert!(answers.iter().all(|a| a[i]["id"] == answers[0][i]["id"]));
    }
}

#[test]
fn an_unavailable_attempt_leaves_its_key_free() {
    let daemon = Daemon::start();
    send(&daemon, &keyed("before", "x").to_string());
    fill_disk(&daemon);
    // In one pipeline: the first is unavailable, so is the repeat that waited for it.
    let line = keyed("full", "x").to_string() + "\n";
    let mut raw = UnixStream::connect(&daemon.socket).unwrap();
    raw.write_all(line.repeat(2).as_bytes()).unwrap();
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    let mut text = String::new();
    raw.read_to_string(&mut text).unwrap();
    let answers: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        answers
            .iter()
            .all(|a| a["error"]["code"] == json!("unavailable")),
        "{text}"
    );
    limit_file_size(&daemon, None);
    let answer = send(&daemon, line.trim_end());
    assert!(
        answer["ok"] == json!(true) && answer.get("duplicate").is_none(),
        "{answer}"
    );
    assert_eq!(with_key(&daemon, "full").len(), 1);
}

#[test]
fn emit_exit_codes_follow_sysexits_and_retry_stores_each_event_once() {
    let daemon = Daemon::start();
    let socket = daemon.socket.to_str().unwrap();
    // logger's form: the message as words.
    let (code, out, err) = trail(
        &[
            "emit",
            "--socket",
            socket,
            "-t",
            "user_logout",
            "--",
            "disk",
            "replaced",
            "in slot 4",
        ],
        "",
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        daemon.records()[0]["message"],
        json!("disk replaced in slot 4")
    );
    // Refused as invalid: 65.
    let (code, out, _) = trail(&["emit", "--socket", socket, "-t", "no_such_type"], "");
    assert_eq!(code, 65, "{out}");
    let (code, out, _) = trail(
        &["emit", "--socket", socket],
        "{\"type\":\"user_logout\"}\nnot json\n",
    );
    assert_eq!(code, 65, "{out}");
    // Unreachable: 69, also after retrying for a while.
    let gone = daemon.dir.path().join("gone.sock");
    let (code, _, err) = trail(
        &[
            "emit",
            "--socket",
            gone.to_str().unwrap(),
            "--retry",
            "300ms",
            "-t",
            "user_logout",
        ],
        "",
    );
    assert_eq!(code, 69, "{err}");
    // A full disk: unavailable is 75.
    fill_disk(&daemon);
    let (code, out, _) = trail(&["emit", "--socket", socket, "-t", "user_logout"], "");
    assert_eq!(code, 75, "{out}");
    assert!(out.contains("unavailable"), "{out}");
    // With --retry, events answered unavailable are sent again (with keys, generated when missing) until the disk
    // has room again, and each is stored once.
    let mut child = Command::new(env!("CARGO_BIN_EXE_trail"))
        .args(["emit", "--socket", socket, "--retry", "60s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin: String = (0..5)
        .map(|i| {
            json!({"type": "user_logout", "actor": {"id": format!("retried-{i}")}}).to_string()
                + "\n"
        })
        .chain(std::iter::once(
            keyed("own-key", "retried-own").to_string() + "\n",
        ))
        .collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    // The disk stays full until the client says it will send them again (the daemon's own log cannot be written
    // either: its standard error is a file too).
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut said).unwrap();
    assert!(
        said.contains("6 event(s) not stored yet (unavailable)"),
        "{said}"
    );
    limit_file_size(&daemon, None);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{said}");
    let answers: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 6);
    let retried: Vec<Value> = daemon
        .records()
        .into_iter()
        .filter(|r| {
            r["actor"]["id"]
                .as_str()
                .unwrap_or("")
                .starts_with("retried-")
        })
        .collect();
    assert_eq!(retried.len(), 6, "{retried:#?}");
    for (record, answer) in retried.iter().zip(&answers) {
        assert_eq!(record["id"], answer["id"]);
    }
    assert!(retried[..5].iter().all(|r| {
        r["idempotency_key"]
            .as_str()
            .is_some_and(|k| k.starts_with("trail-emit-"))
    }));
    assert_eq!(retried[5]["idempotency_key"], json!("own-key"));
}
