//! Reloading the configuration and the event types while running: `trail reload`, SIGHUP and the event-type
//! directory's watcher, against the real daemon.

use std::collections::HashMap;
use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::Digest;

use crate::util::{Daemon, Setup, login, plugins, recorded, trail, wait_recorded, wait_until};

const NO_WATCH: (&str, &str) = (trail::NO_WATCH_VAR, "1");

/// A definition of the event type `name` (streamed or not) whose payload must have the properties `required`.
fn definition(name: &str, streamed: bool, required: &[&str]) -> String {
    format!(
        "name: {name}\ndescription: A test type.\nsaved_to_database: true\nstreamed: {streamed}\n\
         payload:\n  type: object\n  required: {required:?}\n"
    )
}

fn event(ty: &str, message: &str, payload: Value) -> Value {
    json!({"type": ty, "message": message, "payload": payload})
}

/// `trail reload` against `daemon`: (exit code, the answer, standard error).
fn reload(daemon: &Daemon) -> (i32, Value, String) {
    let socket = daemon.admin_socket();
    let (code, out, err) = trail(&["reload", "--admin-socket", socket.to_str().unwrap()], "");
    let answer = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?} {err}"));
    (code, answer, err)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// The `trail_config_reloaded` records in the log.
fn reload_records(daemon: &Daemon) -> Vec<Value> {
    daemon
        .records()
        .into_iter()
        .filter(|r| r["type"] == "trail_config_reloaded")
        .collect()
}

/// Waits until the log holds `n` `trail_config_reloaded` records and returns them.
fn wait_reload_records(daemon: &Daemon, n: usize) -> Vec<Value> {
    let mut found = Vec::new();
    let ok = wait_until(Duration::from_secs(30), || {
        found = reload_records(daemon);
        found.len() >= n
    });
    assert!(
        ok,
        "{} trail_config_reloaded records, expected {n}",
        found.len()
    );
    found
}

fn sha256_hex(path: &std::path::Path) -> String {
    sha2::Sha256::digest(fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn rewrite(path: &std::path::Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} is not in {text}");
    fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn code(answer: &Value) -> &str {
    answer["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn event_types_added_changed_and_removed_apply_to_the_next_events_and_are_recorded() {
    let daemon = Daemon::with(Setup {
        env: vec![(NO_WATCH.0.into(), NO_WATCH.1.into())],
        extra_types: vec![("widget.yml".into(), definition("widget", false, &[]))],
        ..Setup::default()
    });
    let mut c = daemon.client();
    let types = daemon.dir.path().join("event-types");
    assert_eq!(
        c.emit(&event("widget", "no size", json!({}))).unwrap()["ok"],
        true
    );
    assert_eq!(
        code(&c.emit(&event("gadget", "before", json!({}))).unwrap()),
        "unknown_type"
    );
    assert_eq!(
        c.emit(&json!({"type": "user_logout", "message": "before"}))
            .unwrap()["ok"],
        true
    );

    fs::write(types.join("gadget.yml"), definition("gadget", false, &[])).unwrap();
    fs::write(
        types.join("widget.yml"),
        definition("widget", false, &["size"]),
    )
    .unwrap();
    fs::remove_file(types.join("user_logout.yml")).unwrap();
    let (exit, answer, err) = reload(&daemon);
    assert_eq!(exit, 0, "{answer} {err}");
    let config = &answer["config"];
    assert_eq!(config["result"], "applied", "{answer}");
    assert_eq!(config["generation"], 2);
    assert_eq!(strings(&config["types_added"]), ["gadget"]);
    assert_eq!(strings(&config["types_changed"]), ["widget"]);
    assert_eq!(strings(&config["types_removed"]), ["user_logout"]);
    assert!(
        err.contains("configuration reloaded: generation 2"),
        "{err}"
    );

    // The same connection: each read is checked against the generation in force when it was read.
    assert_eq!(
        c.emit(&event("gadget", "after", json!({}))).unwrap()["ok"],
        true
    );
    assert_eq!(
        code(&c.emit(&event("widget", "no size", json!({}))).unwrap()),
        "invalid_payload"
    );
    assert_eq!(
        c.emit(&event("widget", "sized", json!({"size": 3})))
            .unwrap()["ok"],
        true
    );
    assert_eq!(
        code(
            &c.emit(&json!({"type": "user_logout", "message": "after"}))
                .unwrap()
        ),
        "unknown_type"
    );
    // Clients may not submit the record of a reload.
    let forged = event("trail_config_reloaded", "forged", json!({}));
    assert_eq!(code(&c.emit(&forged).unwrap()), "forbidden");

    let status = daemon.admin(json!({"command": "status"}));
    assert_eq!(status["configuration"]["generation"], 2, "{status}");
    assert_eq!(
        status["configuration"]["last_reload"]["result"], "applied",
        "{status}"
    );
    assert!(
        status["configuration"]["loaded_at"]
            .as_str()
            .unwrap()
            .ends_with('Z'),
        "{status}"
    );

    let records = wait_reload_records(&daemon, 1);
    let r = &records[0];
    assert_eq!(r["source"]["daemon"], true, "{r}");
    assert_eq!(r["outcome"], "success", "{r}");
    let p = &r["payload"];
    assert_eq!(p["result"], "applied", "{r}");
    assert_eq!(p["generation"], 2, "{r}");
    assert_eq!(p["requested_by"], "admin", "{r}");
    assert_eq!(p["peer_uid"], unsafe { libc::geteuid() }, "{r}");
    assert_eq!(p["config_sha256"], sha256_hex(&daemon.config), "{r}");
    assert_eq!(strings(&p["types_added"]), ["gadget"], "{r}");
    assert_eq!(strings(&p["types_changed"]), ["widget"], "{r}");
    assert_eq!(strings(&p["types_removed"]), ["user_logout"], "{r}");
    // Accepted under the old types, stored as accepted.
    let messages: Vec<Value> = daemon
        .records()
        .iter()
        .map(|r| r["message"].clone())
        .collect();
    for m in ["no size", "before", "after", "sized"] {
        assert!(messages.contains(&json!(m)), "{m} missing: {messages:?}");
    }
}

#[test]
fn invalid_config_or_event_type_is_refused_and_the_old_generation_keeps_serving() {
    let mut daemon = Daemon::with(Setup {
        env: vec![(NO_WATCH.0.into(), NO_WATCH.1.into())],
        ..Setup::default()
    });
    let mut c = daemon.client();
    let types = daemon.dir.path().join("event-types");
    let good = fs::read_to_string(&daemon.config).unwrap();

    // A configuration mistake: refused with its line and key, exit non-zero.
    fs::write(
        &daemon.config,
        format!("{good}limits: {{max_line_bytes: 12 parsecs}}\n"),
    )
    .unwrap();
    fs::write(types.join("gadget.yml"), definition("gadget", false, &[])).unwrap();
    let (exit, answer, err) = reload(&daemon);
    assert_ne!(exit, 0, "{answer}");
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["config"]["result"], "refused", "{answer}");
    assert_eq!(answer["config"]["generation"], 1, "{answer}");
    let errors = strings(&answer["config"]["errors"]);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("max_line_bytes") && e.contains("12 parsecs")),
        "{errors:?}"
    );
    assert!(
        err.contains("configuration refused") && err.contains("12 parsecs"),
        "{err}"
    );
    // Nothing of the new generation applies, not even the valid new type.
    assert_eq!(
        code(&c.emit(&event("gadget", "x", json!({}))).unwrap()),
        "unknown_type"
    );
    assert_eq!(c.emit(&login("still served")).unwrap()["ok"], true);

    // An invalid event type, with a good configuration: refused too, naming the file.
    fs::write(&daemon.config, &good).unwrap();
    fs::write(
        types.join("broken.yml"),
        "name: broken\ndescription: x\nsaved_to_database: maybe\n",
    )
    .unwrap();
    let (exit, answer, _) = reload(&daemon);
    assert_ne!(exit, 0, "{answer}");
    let errors = strings(&answer["config"]["errors"]);
    assert!(
        errors.iter().any(|e| e.contains("broken.yml")),
        "{errors:?}"
    );
    assert_eq!(
        code(&c.emit(&event("gadget", "x", json!({}))).unwrap()),
        "unknown_type"
    );

    // SIGHUP with the same mistake: refused, the daemon keeps running and serving.
    daemon.signal(libc::SIGHUP);
    let records = wait_reload_records(&daemon, 3);
    assert!(daemon.running());
    assert_eq!(c.emit(&login("after SIGHUP")).unwrap()["ok"], true);
    let status = daemon.admin(json!({"command": "status"}));
    assert_eq!(status["configuration"]["generation"], 1, "{status}");
    let last = &status["configuration"]["last_reload"];
    assert_eq!(
        (&last["result"], &last["requested_by"]),
        (&json!("refused"), &json!("signal")),
        "{status}"
    );
    assert!(
        strings(&last["errors"])
            .iter()
            .any(|e| e.contains("broken.yml")),
        "{status}"
    );
    for r in &records {
        assert_eq!(r["outcome"], "failure", "{r}");
        assert_eq!(r["payload"]["result"], "refused", "{r}");
        assert!(
            !r["payload"]["errors"].as_array().unwrap().is_empty(),
            "{r}"
        );
    }
    assert_eq!(records[2]["payload"]["requested_by"], "signal");

    // Fixed: applied.
    fs::remove_file(types.join("broken.yml")).unwrap();
    let (exit, answer, _) = reload(&daemon);
    assert_eq!(exit, 0, "{answer}");
    assert_eq!(
        c.emit(&event("gadget", "x", json!({}))).unwrap()["ok"],
        true
    );
    assert!(daemon.stop().success(), "{}", daemon.stderr());
}

#[test]
fn settings_that_need_a_restart_are_reported_and_the_rest_applies() {
    let daemon = Daemon::with(Setup {
        env: vec![(NO_WATCH.0.into(), NO_WATCH.1.into())],
        ..Setup::default()
    });
    let files = |d: &Daemon| {
        fs::read_dir(&d.log_dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".jsonl")
            })
            .count()
    };
    let before = files(&daemon);
    rewrite(
        &daemon.config,
        "fsync: always",
        "fsync: never, max_file_bytes: 4096",
    );
    let mut text = fs::read_to_string(&daemon.config).unwrap();
    text.push_str("limits: {max_line_bytes: 400}\n");
    fs::write(&daemon.config, text).unwrap();
    let (exit, answer, err) = reload(&daemon);
    assert_eq!(exit, 0, "{answer} {err}");
    let config = &answer["config"];
    assert_eq!(config["result"], "applied", "{answer}");
    let restart = strings(&config["restart_needed"]);
    assert!(
        restart
            .iter()
            .any(|r| r.starts_with("log.fsync changed: it needs a restart")),
        "{restart:?}"
    );
    assert_eq!(restart.len(), 1, "{restart:?}");
    assert!(err.contains("needs a restart: log.fsync"), "{err}");
    let changed = strings(&config["settings_changed"]);
    assert_eq!(
        changed,
        ["limits.max_line_bytes", "log.max_file_bytes"],
        "{answer}"
    );
    assert!(
        daemon.stderr().contains("needs a restart: log.fsync"),
        "{}",
        daemon.stderr()
    );

    // A new connection has the new line limit.
    let mut c = daemon.client();
    let long = login(&"x".repeat(500));
    assert_eq!(code(&c.emit(&long).unwrap()), "too_large");
    // The log writer has the new file size: a few events start new files.
    for i in 0..60 {
        assert_eq!(c.emit(&login(&i.to_string())).unwrap()["ok"], true);
    }
    assert!(
        files(&daemon) >= before + 2,
        "{} files, {before} before",
        files(&daemon)
    );
    let r = &wait_reload_records(&daemon, 1)[0];
    assert!(
        strings(&r["payload"]["restart_needed"])[0].starts_with("log.fsync"),
        "{r}"
    );
}

#[test]
fn the_watcher_reloads_a_new_event_type_file() {
    let daemon = Daemon::start();
    // The socket is bound (and accepts into its backlog) before the watcher starts.
    let watching = wait_until(Duration::from_secs(30), || {
        daemon.stderr().contains("watching for event-type changes")
    });
    assert!(watching, "{}", daemon.stderr());
    let types = daemon.dir.path().join("event-types");
    fs::write(types.join("gadget.yml"), definition("gadget", false, &[])).unwrap();
    let mut c = daemon.client();
    let accepted = wait_until(Duration::from_secs(30), || {
        c.emit(&event("gadget", "watched", json!({}))).unwrap()["ok"] == true
    });
    assert!(accepted, "{}", daemon.stderr());
    let r = &wait_reload_records(&daemon, 1)[0];
    assert_eq!(r["payload"]["requested_by"], "watcher", "{r}");
    assert_eq!(strings(&r["payload"]["types_added"]), ["gadget"], "{r}");
    assert!(r["payload"].get("peer_uid").is_none(), "{r}");
}

/// The config of two recorder sinks' daemon: `sinks` entries after the common part.
fn sinks_config(common: &str, sinks: &[(&str, &str, &str)]) -> String {
    let mut text = format!("{common}plugins_dir: plugins\nsinks:\n");
    for (name, types, mark) in sinks {
        text.push_str(&format!(
            "  - name: {name}\n    plugin: recorder\n    events: {{types: {types}}}\n    \
             config: {{path: $DIR/{name}.jsonl, mark: {mark}}}\n    batch: {{max_events: 100, max_wait: 10ms}}\n"
        ));
    }
    text
}

#[test]
fn sinks_are_added_changed_and_removed_by_a_reload() {
    let daemon = Daemon::with(Setup {
        env: vec![(NO_WATCH.0.into(), NO_WATCH.1.into())],
        extra_config: sinks_config(
            "",
            &[("a", "[user_login]", "a1"), ("b", "[role_granted]", "b1")],
        ),
        plugins: vec![(
            plugins::library("trail-test-recorder"),
            "librecorder.so".into(),
        )],
        ..Setup::default()
    });
    let dir = daemon.dir.path().to_owned();
    let base = fs::read_to_string(&daemon.config).unwrap();
    let common = &base[..base.find("plugins_dir:").unwrap()];
    let write = |sinks: &[(&str, &str, &str)]| {
        fs::write(
            &daemon.config,
            sinks_config(common, sinks).replace("$DIR", dir.to_str().unwrap()),
        )
        .unwrap()
    };
    let mut c = daemon.client();
    let role =
        |m: &str| json!({"type": "role_granted", "message": m, "payload": {"role": "admin"}});
    assert_eq!(c.emit(&login("l1")).unwrap()["ok"], true);
    assert_eq!(c.emit(&role("r1")).unwrap()["ok"], true);
    wait_recorded(&dir.join("a.jsonl"), 1);
    wait_recorded(&dir.join("b.jsonl"), 1);

    // a's filter changes, b stays as it is, c is new.
    write(&[
        ("a", "[role_granted]", "a2"),
        ("b", "[role_granted]", "b1"),
        ("c", "[user_login]", "c1"),
    ]);
    let (exit, answer, err) = reload(&daemon);
    assert_eq!(exit, 0, "{answer} {err}");
    let config = &answer["config"];
    assert_eq!(strings(&config["sinks_added"]), ["c"], "{answer}");
    assert_eq!(strings(&config["sinks_changed"]), ["a"], "{answer}");
    assert!(strings(&config["sinks_removed"]).is_empty(), "{answer}");
    let swaps = || -> HashMap<String, u64> {
        daemon.admin(json!({"command": "status"}))["sinks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_owned(),
                    s["swaps"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    // Each worker swaps when it next looks at its messages (after its current batch).
    assert!(
        wait_until(Duration::from_secs(30), || swaps().get("a") == Some(&1)),
        "{:?}",
        swaps()
    );
    assert_eq!(c.emit(&login("l2")).unwrap()["ok"], true);
    assert_eq!(c.emit(&role("r2")).unwrap()["ok"], true);
    let a = wait_recorded(&dir.join("a.jsonl"), 2);
    let b = wait_recorded(&dir.join("b.jsonl"), 2);
    let c_lines = wait_recorded(&dir.join("c.jsonl"), 1);
    // a: its login from before, then only roles, from the instance built with the new configuration.
    let marks = |lines: &[Value]| -> Vec<(String, String)> {
        lines
            .iter()
            .map(|l| {
                (
                    l["type"].as_str().unwrap().to_owned(),
                    l["mark"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let strs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        marks(&a),
        strs(&[("user_login", "a1"), ("role_granted", "a2")])
    );
    assert_eq!(
        marks(&b),
        strs(&[("role_granted", "b1"), ("role_granted", "b1")])
    );
    // c receives events from the reload on: not l1.
    assert_eq!(marks(&c_lines), strs(&[("user_login", "c1")]));
    // b kept its instance; a got a new one.
    assert_eq!(
        swaps(),
        HashMap::from([("a".into(), 1), ("b".into(), 0), ("c".into(), 0)])
    );
    let cursors = dir.join("spool/cursors");
    assert!(cursors.join("a.json").exists());

    // a is removed: stopped, its cursor released.
    write(&[("b", "[role_granted]", "b1"), ("c", "[user_login]", "c1")]);
    let (exit, answer, _) = reload(&daemon);
    assert_eq!(exit, 0, "{answer}");
    assert_eq!(
        strings(&answer["config"]["sinks_removed"]),
        ["a"],
        "{answer}"
    );
    assert!(!cursors.join("a.json").exists());
    let status = daemon.admin(json!({"command": "status"}));
    let names: Vec<&str> = status["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b", "c"], "{status}");
    assert_eq!(c.emit(&role("r3")).unwrap()["ok"], true);
    wait_recorded(&dir.join("b.jsonl"), 3);
    assert_eq!(
        recorded(&dir.join("a.jsonl")).len(),
        2,
        "a removed sink got more"
    );
    let records = wait_reload_records(&daemon, 2);
    assert_eq!(strings(&records[0]["payload"]["sinks_added"]), ["c"]);
    assert_eq!(strings(&records[1]["payload"]["sinks_removed"]), ["a"]);

    // A sink whose plugin rejects its configuration: refused, nothing changes.
    let mut text = sinks_config(
        common,
        &[("b", "[role_granted]", "b1"), ("c", "[user_login]", "c1")],
    )
    .replace("$DIR", dir.to_str().unwrap());
    text = text.replace("mark: c1}", "mark: c1, unknown_setting: 1}");
    fs::write(&daemon.config, text).unwrap();
    let (exit, answer, _) = reload(&daemon);
    assert_ne!(exit, 0, "{answer}");
    assert!(
        strings(&answer["config"]["errors"])
            .iter()
            .any(|e| e.contains("\"c\"")),
        "{answer}"
    );
    assert_eq!(c.emit(&login("l3")).unwrap()["ok"], true);
    wait_recorded(&dir.join("c.jsonl"), 2);
}

/// Several reloads a second, each changing the event types (a type comes and goes) and a limit, while four
/// connections pipeline events: every event is acknowledged (the load client fails on anything else) and in
/// the log exactly once.
#[test]
fn reloads_under_load_lose_nothing_and_refuse_no_valid_event() {
    let daemon = Daemon::with(Setup {
        env: vec![(NO_WATCH.0.into(), NO_WATCH.1.into())],
        fsync: "never",
        ..Setup::default()
    });
    let types = daemon.dir.path().join("event-types");
    let stop = Arc::new(AtomicBool::new(false));
    let mut plan = trail_test_kit::load::Plan::new(4, u64::MAX);
    plan.stop = stop.clone();
    plan.window = 256;
    let (socket, run_plan) = (daemon.socket.clone(), plan.clone());
    let load = std::thread::spawn(move || {
        trail_test_kit::load::run(&socket, &run_plan, 200, |conn, n, buf| {
            buf.extend_from_slice(
                format!(
                    "{{\"type\":\"user_login\",\"message\":\"{conn}-{n}\",\"payload\":{{\"method\":\"sso\"}}}}\n"
                )
                .as_bytes(),
            );
        })
    });
    let good = fs::read_to_string(&daemon.config).unwrap();
    let mut reloads = 0;
    let started = std::time::Instant::now();
    // At least 10 reloads and at least 4 s of load, however slow a loaded machine makes each round trip.
    while reloads < 10 || started.elapsed() < Duration::from_secs(4) {
        if reloads % 2 == 0 {
            fs::write(types.join("gadget.yml"), definition("gadget", false, &[])).unwrap();
            fs::write(
                &daemon.config,
                format!("{good}limits: {{max_line_bytes: 4096}}\n"),
            )
            .unwrap();
        } else {
            fs::remove_file(types.join("gadget.yml")).unwrap();
            fs::write(&daemon.config, &good).unwrap();
        }
        let answer = daemon.admin(json!({"command": "reload"}));
        assert_eq!(answer["ok"], true, "{answer}");
        reloads += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let outcome = load.join().unwrap().expect("every event acknowledged");
    let acked = outcome.acked();
    assert!(acked > 1000, "{acked} events");
    let mut seen: HashMap<String, u32> = HashMap::new();
    for r in daemon.records() {
        if r["type"] == "user_login" {
            *seen
                .entry(r["message"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(
        seen.len() as u64,
        acked,
        "records in the log vs acknowledgements"
    );
    assert!(seen.values().all(|&n| n == 1), "an event stored twice");
    let status = daemon.admin(json!({"command": "status"}));
    assert_eq!(
        status["configuration"]["generation"],
        reloads + 1,
        "{status}"
    );
    assert_eq!(
        wait_reload_records(&daemon, reloads as usize).len(),
        reloads as usize
    );
}

/// A stream-only event type (not saved to the log): the spool is its only copy.
fn stream_only(name: &str) -> String {
    format!(
        "name: {name}\ndescription: A stream-only test type.\nsaved_to_database: false\nstreamed: true\n\
         payload:\n  type: object\n"
    )
}

/// What one pipelining connection was answered: the ids of the events acknowledged, in order, and how many were
/// refused `unavailable` (a generation in which no sink receives the type).
#[derive(Default)]
struct Answered {
    acked: Vec<String>,
    unavailable: u64,
}

/// A connection that writes `ticket` events as fast as the socket takes them until `stop`, while a second
/// thread reads every answer; any answer but `ok` or `unavailable` fails it. `progress` counts answers.
fn pipeline(
    socket: &std::path::Path,
    conn: usize,
    stop: Arc<AtomicBool>,
    progress: Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<Answered> {
    use std::io::{BufRead, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut write_half = stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut buf = Vec::new();
            for _ in 0..50 {
                buf.extend_from_slice(
                    format!(
                        "{{\"type\":\"ticket\",\"message\":\"{conn}-{n}\",\"payload\":{{}}}}\n"
                    )
                    .as_bytes(),
                );
                n += 1;
            }
            write_half.write_all(&buf).unwrap();
        }
        write_half.shutdown(std::net::Shutdown::Write).unwrap();
        n
    });
    std::thread::spawn(move || {
        let mut answered = Answered::default();
        for line in std::io::BufReader::new(stream).lines() {
            let line = line.expect("answers until the daemon closes the connection");
            let answer: Value = serde_json::from_str(&line).unwrap();
            if answer["ok"] == true {
                answered
                    .acked
                    .push(answer["id"].as_str().unwrap().to_owned());
            } else {
                assert_eq!(code(&answer), "unavailable", "{answer}");
                answered.unavailable += 1;
            }
            progress.fetch_add(1, Ordering::Relaxed);
        }
        let sent = writer.join().unwrap();
        assert_eq!(
            answered.acked.len() as u64 + answered.unavailable,
            sent,
            "an answer for every event"
        );
        answered
    })
}

/// The barrier: reloads that take a stream-only type out of its only sink's filter and put it back, again and
/// again, while two connections pipeline events of that type. Every event acknowledged reaches the sink exactly
/// once, in `seq` order; events answered `unavailable` (no sink received the type then) reach it never.
#[test]
fn narrowing_a_sinks_filter_under_load_loses_no_acknowledged_event() {
    let filter = |wide: bool| match wide {
        true => "[ticket, user_login]",
        false => "[user_login]",
    };
    let daemon = Daemon::with(Setup {
        env: vec![(NO_WATCH.0.into(), NO_WATCH.1.into())],
        fsync: "never",
        extra_types: vec![("ticket.yml".into(), stream_only("ticket"))],
        extra_config: sinks_config("", &[("rec", filter(true), "r")]),
        plugins: vec![(
            plugins::library("trail-test-recorder"),
            "librecorder.so".into(),
        )],
        ..Setup::default()
    });
    let dir = daemon.dir.path().to_owned();
    let base = fs::read_to_string(&daemon.config).unwrap();
    let common = base[..base.find("plugins_dir:").unwrap()].to_owned();
    let write = |sinks: &[(&str, &str, &str)]| {
        fs::write(
            &daemon.config,
            sinks_config(&common, sinks).replace("$DIR", dir.to_str().unwrap()),
        )
        .unwrap()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let connections: Vec<_> = (0..2)
        .map(|conn| pipeline(&daemon.socket, conn, stop.clone(), progress.clone()))
        .collect();
    let started = std::time::Instant::now();
    let mut reloads = 0;
    let mut wide = true;
    // At least 16 reloads and 4 s, each one with events answered since the last: the load is flowing.
    while reloads < 16 || started.elapsed() < Duration::from_secs(4) {
        let before = progress.load(Ordering::Relaxed);
        assert!(
            wait_until(Duration::from_secs(60), || progress.load(Ordering::Relaxed)
                >= before + 200),
            "no answers for a minute"
        );
        wide = !wide;
        write(&[("rec", filter(wide), "r")]);
        let (exit, answer, err) = reload(&daemon);
        assert_eq!(exit, 0, "{answer} {err}");
        assert_eq!(strings(&answer["config"]["sinks_changed"]), ["rec"]);
        // Settled in time: narrowed (a wider set would lose nothing, but would not test the narrowing).
        assert_settled(&answer);
        reloads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let answered: Vec<Answered> = connections.into_iter().map(|c| c.join().unwrap()).collect();
    let acked: std::collections::HashSet<String> = answered
        .iter()
        .flat_map(|a| a.acked.iter().cloned())
        .collect();
    let refused: u64 = answered.iter().map(|a| a.unavailable).sum();
    assert!(acked.len() > 1000, "{} events acknowledged", acked.len());
    assert!(
        refused > 0,
        "no event was refused: the filter never narrowed"
    );
    // Everything in the spool delivered (or passed over) by the sink.
    let backlog = || {
        daemon.admin(json!({"command": "status"}))["sinks"][0]["backlog_events"]
            .as_u64()
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(120), || backlog() == 0),
        "backlog {}",
        backlog()
    );
    let check = |acked: &std::collections::HashSet<String>, when: &str| {
        let lines = recorded(&dir.join("rec.jsonl"));
        let tickets: Vec<&Value> = lines.iter().filter(|l| l["type"] == "ticket").collect();
        let seqs: Vec<u64> = tickets.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{when}: tickets out of order or twice"
        );
        let delivered: std::collections::HashSet<String> = tickets
            .iter()
            .map(|l| l["id"].as_str().unwrap().to_owned())
            .collect();
        let lost = acked.difference(&delivered).count();
        let unasked = delivered.difference(acked).count();
        assert_eq!(
            (lost, unasked),
            (0, 0),
            "{when}: {} acknowledged, {} delivered, {lost} acknowledged but never delivered, {unasked} delivered \
             but not acknowledged",
            acked.len(),
            delivered.len()
        );
    };
    check(&acked, &format!("after {reloads} reloads"));

    // The type's only sink removed under load: it delivers what was accepted for it before it stops.
    if !wide {
        write(&[("rec", filter(true), "r")]);
        assert_eq!(reload(&daemon).0, 0);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let connections: Vec<_> = (2..4)
        .map(|conn| pipeline(&daemon.socket, conn, stop.clone(), progress.clone()))
        .collect();
    assert!(wait_until(Duration::from_secs(60), || progress
        .load(Ordering::Relaxed)
        >= 1000));
    write(&[("other", "[user_login]", "o")]);
    let (exit, answer, err) = reload(&daemon);
    assert_eq!(exit, 0, "{answer} {err}");
    assert_eq!(strings(&answer["config"]["sinks_removed"]), ["rec"]);
    assert_settled(&answer);
    stop.store(true, Ordering::Relaxed);
    let mut acked = acked;
    for c in connections {
        acked.extend(c.join().unwrap().acked);
    }
    // Answered after the removed sink stopped: its file is complete.
    check(&acked, "after the sink was removed");
}

/// The reload's settle finished in time: its answer has no warnings.
fn assert_settled(answer: &Value) {
    assert!(
        answer["config"]["warnings"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{answer}"
    );
}

fn connections_status(daemon: &Daemon) -> Value {
    daemon.admin(json!({"command": "status"}))["connections"].clone()
}

/// Reads until the daemon closes `s`; the answer line it sent first, if any.
fn refusal(s: &mut std::os::unix::net::UnixStream) -> Value {
    use std::io::Read;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .expect("the daemon closes the connection");
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

fn raw(daemon: &Daemon) -> std::os::unix::net::UnixStream {
    let s = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// `limits.max_connections` lowered and raised by reloads while connections are open: the open ones keep
/// working, clients beyond the new bound are refused, and raising it lets more in. `max_buffered_bytes`
/// reloads too (the number of line slots follows).
#[test]
fn max_connections_and_max_buffered_bytes_reload_without_closing_open_connections() {
    let daemon = Daemon::with(Setup {
        env: vec![(NO_WATCH.0.into(), NO_WATCH.1.into())],
        extra_config: "limits: {max_connections: 3}\n".into(),
        ..Setup::default()
    });
    let base = fs::read_to_string(&daemon.config).unwrap();
    let write = |limits: &str| {
        fs::write(&daemon.config, base.replace("max_connections: 3", limits)).unwrap()
    };
    // The harness's probe may still be counted for a moment (see connection_limits).
    assert_eq!(daemon.client().emit(&login("probe")).unwrap()["ok"], true);
    assert!(wait_until(Duration::from_secs(30), || connections_status(
        &daemon
    )["open"]
        == 0));
    let mut open: Vec<_> = (0..3).map(|_| daemon.client()).collect();
    for (i, c) in open.iter_mut().enumerate() {
        assert_eq!(c.emit(&login(&format!("a{i}"))).unwrap()["ok"], true);
    }

    // Lowered to 2 with 3 open: all 3 keep working; a new client is refused.
    write("max_connections: 2");
    let (exit, answer, err) = reload(&daemon);
    assert_eq!(exit, 0, "{answer} {err}");
    let config = &answer["config"];
    assert_eq!(
        strings(&config["settings_changed"]),
        ["limits.max_connections"],
        "{answer}"
    );
    assert!(strings(&config["restart_needed"]).is_empty(), "{answer}");
    let status = connections_status(&daemon);
    assert_eq!(
        (status["open"].clone(), status["max"].clone()),
        (json!(3), json!(2)),
        "{status}"
    );
    for (i, c) in open.iter_mut().enumerate() {
        assert_eq!(c.emit(&login(&format!("b{i}"))).unwrap()["ok"], true);
    }
    let answer = refusal(&mut raw(&daemon));
    assert_eq!(code(&answer), "too_many_connections", "{answer}");
    // One closes: 2 open, the new bound: still refused. Another closes: one more is let in, and no more.
    drop(open.pop());
    assert!(wait_until(Duration::from_secs(30), || connections_status(
        &daemon
    )["open"]
        == 2));
    let answer = refusal(&mut raw(&daemon));
    assert_eq!(code(&answer), "too_many_connections", "{answer}");
    drop(open.pop());
    assert!(wait_until(Duration::from_secs(30), || connections_status(
        &daemon
    )["open"]
        == 1));
    open.push(daemon.client());
    assert_eq!(open[1].emit(&login("c1")).unwrap()["ok"], true);
    let answer = refusal(&mut raw(&daemon));
    assert_eq!(code(&answer), "too_many_connections", "{answer}");

    // Raised to 4, and max_buffered_bytes changed: two more get in, the fifth is refused.
    write("max_connections: 4, max_buffered_bytes: 8MiB");
    let (exit, answer, err) = reload(&daemon);
    assert_eq!(exit, 0, "{answer} {err}");
    assert_eq!(
        strings(&answer["config"]["settings_changed"]),
        ["limits.max_connections", "limits.max_buffered_bytes"],
        "{answer}"
    );
    for i in 0..2 {
        let mut c = daemon.client();
        assert_eq!(c.emit(&login(&format!("d{i}"))).unwrap()["ok"], true);
        open.push(c);
    }
    let answer = refusal(&mut raw(&daemon));
    assert_eq!(code(&answer), "too_many_connections", "{answer}");
    let status = connections_status(&daemon);
    // (8 MiB - 4 connections' 16 KiB) in lines of 1 MiB (+1): 7 slots.
    assert_eq!(
        (
            status["open"].clone(),
            status["max"].clone(),
            status["long_line_slots"].clone()
        ),
        (json!(4), json!(4), json!(7)),
        "{status}"
    );
    for (i, c) in open.iter_mut().enumerate() {
        assert_eq!(c.emit(&login(&format!("e{i}"))).unwrap()["ok"], true);
    }
}

/// An open connection takes a reload's `max_line_bytes` at its next read and its `idle_timeout` at once.
#[test]
fn open_connections_take_the_new_max_line_bytes_and_idle_timeout() {
    use std::io::{BufRead, Write};
    let daemon = Daemon::with(Setup {
        env: vec![(NO_WATCH.0.into(), NO_WATCH.1.into())],
        extra_config: "limits: {idle_timeout: 1h}\n".into(),
        ..Setup::default()
    });
    let base = fs::read_to_string(&daemon.config).unwrap();
    let long = login(&"x".repeat(2000)).to_string();
    let stream = raw(&daemon);
    let mut w = stream.try_clone().unwrap();
    let mut answers = std::io::BufReader::new(stream);
    let mut ask = |line: &str| -> Value {
        w.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        answers.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    };
    assert_eq!(ask(&long)["ok"], true);

    fs::write(
        &daemon.config,
        base.replace("idle_timeout: 1h", "idle_timeout: 1h, max_line_bytes: 1024"),
    )
    .unwrap();
    let (exit, answer, err) = reload(&daemon);
    assert_eq!(exit, 0, "{answer} {err}");
    let answer = ask(&long);
    assert_eq!(code(&answer), "too_large", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1024"),
        "{answer}"
    );
    assert_eq!(ask(&login("short").to_string())["ok"], true);

    // The connection is waiting idle (under 1 h) when the reload makes it 1 s: it is closed then.
    fs::write(
        &daemon.config,
        base.replace("idle_timeout: 1h", "idle_timeout: 1s, max_line_bytes: 1024"),
    )
    .unwrap();
    let before = connections_status(&daemon)["idle_closed"].as_u64().unwrap();
    let (exit, answer, err) = reload(&daemon);
    assert_eq!(exit, 0, "{answer} {err}");
    let mut rest = String::new();
    let read = answers.read_line(&mut rest);
    assert!(
        matches!(read, Ok(0)),
        "expected the daemon to close the idle connection: {read:?} {rest:?}"
    );
    assert!(wait_until(Duration::from_secs(30), || connections_status(
        &daemon
    )["idle_closed"]
        .as_u64()
        .unwrap()
        > before));
}
