//! The command-line tools: `trail emit`, `trail validate`, `traild validate`, start-up refusals, readiness.

use std::os::unix::net::UnixDatagram;
use std::process::Command;

use serde_json::{Value, json};

use crate::util::{Daemon, Setup, repo_event_types, trail};

#[test]
fn emit_sends_the_payload_as_written() {
    let daemon = Daemon::with(Setup {
        extra_types: vec![(
            "measured.yml".into(),
            "name: measured\ndescription: d\nsaved_to_database: true\nstreamed: false\n".into(),
        )],
        ..Setup::default()
    });
    let socket = daemon.socket.to_str().unwrap();
    let emit = |payload: &str| {
        trail(
            &[
                "emit",
                "--socket",
                socket,
                "-t",
                "measured",
                "--payload",
                payload,
            ],
            "",
        )
    };
    let (code, out, err) = emit(r#"{"n": 123456789012345678901234567890, "e": 1E400}"#);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = emit(r#"{"a":1,"a":2}"#);
    assert_eq!(code, 65, "{out}");
    assert!(out.contains(r#"duplicate key \"a\" at /payload"#), "{out}");
    let lines = daemon.log_lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains(r#","payload":{"n":123456789012345678901234567890,"e":1E400},"hash":"#),
        "{}",
        lines[0]
    );
}

#[test]
fn emit_from_flags_and_from_stdin() {
    let daemon = Daemon::start();
    let socket = daemon.socket.to_str().unwrap();
    let (code, out, err) = trail(
        &[
            "emit",
            "--socket",
            socket,
            "--type",
            "user_login",
            "--actor-id",
            "u-42",
            "--actor-name",
            "alice",
            "--target-type",
            "project",
            "--target-id",
            "p-9",
            "--message",
            "signed in",
            "--outcome",
            "success",
            "--payload",
            r#"{"method":"sso"}"#,
        ],
        "",
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("{\"ok\":true,\"id\":"), "{out}");
    let stdin = "{\"type\":\"user_logout\"}\n\nnot json\n{\"type\":\"user_logout\",\"payload\":{\"reason\":\"expired\"}}\n";
    let (code, out, _) = trail(&["emit", "--socket", socket], stdin);
    assert_eq!(code, 65, "one line was refused: {out}");
    let answers: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 3);
    assert_eq!(answers[1]["error"]["code"], json!("invalid_json"));
    // After the daemon's start record (seq 1).
    assert_eq!(answers[2]["seq"], json!(4));
    let records = daemon.records();
    assert_eq!(records[0]["actor"], json!({"id": "u-42", "name": "alice"}));
    assert_eq!(
        records[0]["target"],
        json!({"type": "project", "id": "p-9"})
    );
    let (code, _, err) = trail(
        &["emit", "--socket", "/nonexistent/trail.sock", "-t", "x"],
        "",
    );
    assert_eq!(code, 69);
    assert!(err.contains("/nonexistent/trail.sock"), "{err}");
}

#[test]
fn the_starter_set_and_the_schemas_validate() {
    let dir = repo_event_types();
    let (code, out, err) = trail(&["validate", "--event-types", dir.to_str().unwrap()], "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok: "), "{out}");
    for schema in ["event-type.schema.json", "event.schema.json"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .join(schema);
        let value: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        jsonschema::meta::validate(&value).unwrap_or_else(|e| panic!("{schema}: {e}"));
    }
}

/// Writes `files` as an event-type directory and returns what `trail validate` and `traild` say about it.
fn refusals(files: &[(&str, &str)]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let types = dir.path().join("types");
    std::fs::create_dir(&types).unwrap();
    for (name, text) in files {
        std::fs::write(types.join(name), text).unwrap();
    }
    let (code, _, validate_err) =
        trail(&["validate", "--event-types", types.to_str().unwrap()], "");
    assert_eq!(code, 78, "{validate_err}");
    let config = dir.path().join("trail.yaml");
    std::fs::write(
        &config,
        "socket: {path: s.sock}\nevent_types: types\nlog: {dir: log}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_traild"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        !dir.path().join("s.sock").exists(),
        "no socket is bound for an invalid set"
    );
    (
        validate_err,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_event_type_sets_are_refused_with_every_problem() {
    let good = "description: d\nsaved_to_database: true\nstreamed: false\n";
    let (validate, daemon) = refusals(&[
        ("bad_yaml.yml", "name: bad_yaml\ndescription: [\n"),
        ("mismatch.yml", &format!("name: other_name\n{good}")),
        (
            "no_destination.yml",
            "name: no_destination\ndescription: d\nsaved_to_database: false\nstreamed: false\n",
        ),
        (
            "wrong_field.yml",
            &format!("name: wrong_field\n{good}colour: blue\n"),
        ),
        (
            "bad_payload.yml",
            &format!(
                "name: bad_payload\n{good}payload: {{type: object, properties: {{ip: {{format: ipv5}}}}}}\n"
            ),
        ),
        ("code_a.yml", &format!("name: code_a\n{good}code: T9000I\n")),
        ("code_b.yml", &format!("name: code_b\n{good}code: T9000I\n")),
        ("dup.yml", &format!("name: dup\n{good}")),
        ("dup.yaml", &format!("name: dup\n{good}")),
        ("fine.yml", &format!("name: fine\n{good}")),
    ]);
    for text in [&validate, &daemon] {
        for needle in [
            "7 problem(s)",
            "bad_yaml.yml: invalid YAML: error: line 2",
            "mismatch.yml: /name: name \"other_name\" does not match",
            "no_destination.yml: saved_to_database and streamed are both false",
            "wrong_field.yml: Additional properties are not allowed ('colour'",
            "bad_payload.yml: /payload/properties/ip/format: Unknown format: 'ipv5'",
            "code_b.yml: /code: code \"T9000I\" is already used by",
            "dup.yml: /name: event type \"dup\" is already defined in",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        assert!(!text.contains("fine.yml"), "{text}");
    }
}

/// Writes `trail.yaml` into `dir`: a socket and a log in `dir`, the repository's event types.
fn minimal_config(dir: &std::path::Path) -> std::path::PathBuf {
    let config = dir.join("trail.yaml");
    std::fs::write(
        &config,
        format!(
            "socket: {{path: s.sock}}\nevent_types: {}\nlog: {{dir: log}}\n",
            repo_event_types().display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn traild_validate_and_a_bad_config_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("trail.yaml");
    let types = repo_event_types();
    std::fs::write(
        &config,
        format!(
            "socket: {{path: s.sock}}\nevent_types: {}\nlog: {{dir: log}}\n",
            types.display()
        ),
    )
    .unwrap();
    let ok = Command::new(env!("CARGO_BIN_EXE_traild"))
        .args(["validate", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::write(
        &config,
        "socket: {path: s.sock}\nevent_types: t\nlog: {dir: log, fsync: sometimes}\n",
    )
    .unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_traild"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(78));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("fsync") && err.contains("sometimes"), "{err}");
}

#[test]
fn a_file_in_the_way_of_the_socket_is_a_config_error_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path());
    let in_the_way = dir.path().join("s.sock");
    std::fs::write(&in_the_way, "not a socket\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_traild"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&in_the_way).unwrap(),
        "not a socket\n"
    );
}

#[test]
fn config_errors_name_the_key_and_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("trail.yaml");
    std::fs::write(
        &config,
        "socket: {path: s.sock}\nevent_types: t\nlog: {dir: log, max_file_bytes: 12 parsecs}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_traild"))
        .args(["validate", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "line 3 column 33: log.max_file_bytes: \"12 parsecs\" is not a size: use bytes or a unit such as 64KiB, 16MiB, 1GiB"
        ),
        "{err}"
    );
    assert!(
        !err.contains("Quantity") && !err.contains("<input>"),
        "{err}"
    );
}

#[test]
fn readiness_is_sent_to_the_service_manager_once_the_socket_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let config = minimal_config(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_traild"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Messages are newline-separated lines; STATUS= lines come and go around the ones this test waits for.
    let mut buf = [0u8; 4096];
    let mut wait_for = |line: &str| loop {
        let n = listener.recv(&mut buf).unwrap();
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == line)
        {
            break;
        }
    };
    wait_for("READY=1");
    // READY=1 means the socket already accepts.
    assert!(std::os::unix::net::UnixStream::connect(dir.path().join("s.sock")).is_ok());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_for("STOPPING=1");
    assert!(child.wait().unwrap().success());
}

#[test]
fn the_sample_system_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/trail.yaml");
    let config = trail::Config::load(&path).unwrap();
    assert_eq!(
        config.socket.path,
        std::path::Path::new("/run/trail/trail.sock")
    );
    assert_eq!(config.socket.mode, 0o660);
    assert_eq!(config.log.fsync, trail::config::FsyncPolicy::Always);
}
