//! The submission protocol end to end: stamping, every error code, pipelining, concurrency, back-pressure.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{Daemon, Setup, login, trail, wait_until};

#[test]
fn accepted_events_are_stamped_and_stored() {
    let daemon = Daemon::start();
    let mut c = daemon.client();
    let events = [
        json!({"type": "user_login", "actor": {"id": "u-42", "name": "alice", "type": "user", "ip": "10.0.0.7"},
               "target": {"type": "project", "id": "p-9", "name": "billing"}, "message": "signed in",
               "outcome": "success", "payload": {"method": "sso", "mfa": true},
               "occurred_at": "2026-11-22T10:00:00.123+01:00"}),
        json!({"type": "role_granted", "actor": {"id": "u-1"}, "target": {"id": "u-42"}, "payload": {"role": "admin"}}),
        json!({"type": "project_deleted", "target": {"type": "project", "id": "p-9"}, "outcome": "denied"}),
    ];
    let answers: Vec<Value> = events.iter().map(|e| c.emit(e).unwrap()).collect();
    let records = daemon.records();
    assert_eq!(records.len(), 3);
    let uid = unsafe { libc::getuid() };
    let gid = unsafe { libc::getgid() };
    for (i, ((answer, record), event)) in answers.iter().zip(&records).zip(&events).enumerate() {
        assert_eq!(answer["ok"], json!(true), "{answer}");
        // After the daemon's start record, seq 1.
        assert_eq!(answer["seq"], json!(i as u64 + 2));
        assert_eq!(answer["id"], record["id"]);
        assert_eq!(record["seq"], answer["seq"]);
        let id = uuid::Uuid::parse_str(record["id"].as_str().unwrap()).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(record["type"], event["type"]);
        for key in ["actor", "target", "message", "outcome", "payload"] {
            assert_eq!(record.get(key), event.get(key), "{key}");
        }
        assert_eq!(record["source"]["uid"], json!(uid));
        assert_eq!(record["source"]["gid"], json!(gid));
        assert_eq!(record["source"]["pid"], json!(std::process::id()));
        assert_eq!(record["source"]["host"], json!(trail::host_name()));
        let received = record["received_at"].as_str().unwrap();
        assert!(
            received.ends_with('Z') && received.len() == "2026-11-23T16:12:00.123456789Z".len(),
            "{received}"
        );
    }
    assert_eq!(records[0]["occurred_at"], json!("2026-11-22T09:00:00.123Z"));
    assert_eq!(records[1]["occurred_at"], records[1]["received_at"]);
    assert_eq!(records[0]["code"], json!("T1000I"));
    assert_eq!(records[1]["severity"], json!("warning"));
    assert_eq!(records[0]["version"], json!(1));
    // The documented field order.
    let line = &daemon.log_lines()[0];
    let order = [
        "\"seq\"",
        "\"id\"",
        "\"received_at\"",
        "\"occurred_at\"",
        "\"type\"",
        "\"version\"",
        "\"severity\"",
        "\"code\"",
        "\"source\"",
        "\"actor\"",
        "\"target\"",
        "\"outcome\"",
        "\"message\"",
        "\"payload\"",
    ];
    let positions: Vec<usize> = order.iter().map(|k| line.find(k).unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");
}

/// Sends `bad` between two good events on one connection and returns the three answers.
fn sandwich(c: &mut crate::util::Client, bad: &[u8]) -> [Value; 3] {
    let good = |m: &str| {
        let mut l = serde_json::to_vec(&login(m)).unwrap();
        l.push(b'\n');
        l
    };
    c.send_raw(&good("before")).unwrap();
    c.send_raw(bad).unwrap();
    c.send_raw(b"\n").unwrap();
    c.send_raw(&good("after")).unwrap();
    [
        c.read_answer().unwrap(),
        c.read_answer().unwrap(),
        c.read_answer().unwrap(),
    ]
}

#[test]
fn every_error_code_keeps_the_connection_and_its_neighbours() {
    let daemon = Daemon::with(Setup {
        extra_config: "limits: {max_line_bytes: 4096}\n".into(),
        extra_types: vec![(
            "stream_only.yml".into(),
            "name: stream_only\ndescription: d\nsaved_to_database: false\nstreamed: true\n".into(),
        )],
        ..Setup::default()
    });
    let mut c = daemon.client();
    let long = format!(
        "{{\"type\":\"user_login\",\"message\":\"{}\"}}",
        "x".repeat(5000)
    );
    let cases: Vec<(Vec<u8>, &str, Option<&str>)> = vec![
        (b"{\"type\": ".to_vec(), "invalid_json", None),
        (
            b"{\"type\":\"user_login\",\"message\":\"\xff\xfe\"}".to_vec(),
            "invalid_json",
            None,
        ),
        (
            br#"{"type":"user_login","colour":"blue"}"#.to_vec(),
            "invalid_event",
            Some(""),
        ),
        (
            br#"{"type":"user_login","outcome":"maybe"}"#.to_vec(),
            "invalid_event",
            Some("/outcome"),
        ),
        (br#"{"type":"no_such_type"}"#.to_vec(), "unknown_type", None),
        (
            br#"{"type":"user_login","payload":{"method":"carrier pigeon"}}"#.to_vec(),
            "invalid_payload",
            Some("/payload/method"),
        ),
        (long.into_bytes(), "too_large", None),
        (br#"{"type":"stream_only"}"#.to_vec(), "unavailable", None),
    ];
    for (bad, code, path) in &cases {
        let [before, answer, after] = sandwich(&mut c, bad);
        assert_eq!(before["ok"], json!(true), "{before}");
        assert_eq!(after["ok"], json!(true), "{after}");
        assert_eq!(
            after["seq"].as_u64().unwrap(),
            before["seq"].as_u64().unwrap() + 1
        );
        assert_eq!(answer["ok"], json!(false), "{answer}");
        assert_eq!(answer["error"]["code"], json!(code), "{answer}");
        assert!(!answer["error"]["message"].as_str().unwrap().is_empty());
        if let Some(path) = path {
            let paths: Vec<&str> = answer["error"]["details"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["path"].as_str().unwrap())
                .collect();
            assert!(paths.contains(path), "{answer}");
        }
    }
    // Every violation is listed, not only the first.
    let [_, answer, _] = sandwich(
        &mut c,
        br#"{"type":"user_login","outcome":"maybe","actor":{"name":"x"},"payload":[]}"#,
    );
    assert_eq!(
        answer["error"]["details"].as_array().unwrap().len(),
        3,
        "{answer}"
    );
    let [_, answer, _] = sandwich(
        &mut c,
        br#"{"type":"role_granted","payload":{"expires_at":"soon","grantee":7}}"#,
    );
    assert_eq!(answer["error"]["code"], json!("invalid_payload"));
    assert_eq!(
        answer["error"]["details"].as_array().unwrap().len(),
        3,
        "{answer}"
    );
    let records = daemon.records();
    assert_eq!(records.len(), 2 * (cases.len() + 2));
    assert!(
        records
            .iter()
            .all(|r| r["message"] == json!("before") || r["message"] == json!("after"))
    );
}

#[test]
fn ten_thousand_pipelined_events_keep_their_order() {
    let daemon = Daemon::start();
    let mut c = daemon.client();
    let n = 10_000;
    let mut batch = Vec::new();
    for i in 0..n {
        serde_json::to_writer(&mut batch, &login(&i.to_string())).unwrap();
        batch.push(b'\n');
    }
    // Send everything before reading anything: the daemon must not need answers to be read to make progress
    // for this amount, and must answer in order.
    let writer = {
        let mut w = UnixStream::connect(&daemon.socket).unwrap();
        let r = w.try_clone().unwrap();
        let t = std::thread::spawn(move || w.write_all(&batch).unwrap());
        (t, r)
    };
    let (sender, reader) = writer;
    let mut seqs = Vec::with_capacity(n);
    for line in BufReader::new(reader).lines().take(n) {
        let answer: Value = serde_json::from_str(&line.unwrap()).unwrap();
        assert_eq!(answer["ok"], json!(true), "{answer}");
        seqs.push(answer["seq"].as_u64().unwrap());
    }
    sender.join().unwrap();
    assert_eq!(seqs, (2..=n as u64 + 1).collect::<Vec<_>>());
    let messages: Vec<String> = daemon
        .records()
        .iter()
        .map(|r| r["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(messages, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
    drop(c.emit(&login("still usable")).unwrap());
}

#[test]
fn eight_concurrent_connections_lose_nothing() {
    let daemon = Daemon::start();
    let per = 2_000;
    let threads: Vec<_> = (0..8)
        .map(|conn| {
            let socket = daemon.socket.clone();
            std::thread::spawn(move || {
                let mut input = Vec::new();
                for i in 0..per {
                    serde_json::to_writer(&mut input, &login(&format!("{conn}:{i}"))).unwrap();
                    input.push(b'\n');
                }
                let mut out = Vec::new();
                let tally = trail::client::pipeline(&socket, std::io::Cursor::new(input), &mut out)
                    .unwrap();
                assert_eq!(tally.accepted, per as u64);
                String::from_utf8(out).unwrap()
            })
        })
        .collect();
    let mut acked = Vec::new();
    for t in threads {
        for line in t.join().unwrap().lines() {
            let a: Value = serde_json::from_str(line).unwrap();
            acked.push(a["seq"].as_u64().unwrap());
        }
    }
    let records = daemon.records();
    assert_eq!(records.len(), 8 * per);
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (2..=(8 * per) as u64 + 1).collect::<Vec<_>>());
    acked.sort();
    assert_eq!(acked, seqs);
    // Each connection's records are in the order it sent them.
    for conn in 0..8 {
        let prefix = format!("{conn}:");
        let mine: Vec<usize> = records
            .iter()
            .filter_map(|r| {
                r["message"]
                    .as_str()
                    .unwrap()
                    .strip_prefix(&prefix)?
                    .parse()
                    .ok()
            })
            .collect();
        assert_eq!(mine, (0..per).collect::<Vec<_>>());
    }
}

#[test]
fn a_client_that_does_not_read_answers_is_slowed_not_buffered() {
    let daemon = Daemon::start();
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream.set_nonblocking(true).unwrap();
    let mut line = serde_json::to_vec(&login("flood")).unwrap();
    line.push(b'\n');
    let block: Vec<u8> = line.repeat(1000);
    let mut written = 0usize;
    let limit = 512 << 20;
    // Write until the daemon stops reading: a daemon that buffered without bound would take all 512 MiB.
    let blocked = wait_until(Duration::from_secs(60), || {
        loop {
            match stream.write(&block) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            if written > limit {
                return true;
            }
        }
        // Blocked: give the daemon a moment to drain, then see whether it still does not read.
        std::thread::sleep(Duration::from_millis(200));
        matches!(stream.write(&block), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    });
    assert!(
        blocked && written < 64 << 20,
        "wrote {written} bytes without the daemon pushing back"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(rss_kib < 128 << 10, "daemon RSS {rss_kib} KiB");
    // Reading the answers lets everything through.
    stream.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("{\"ok\":true"), "{first}");
}

#[test]
fn payloads_are_stored_byte_for_byte_and_repeated_keys_are_refused() {
    let daemon = Daemon::with(Setup {
        extra_types: vec![(
            "measured.yml".into(),
            "name: measured\ndescription: d\nsaved_to_database: true\nstreamed: false\npayload:\n  type: object\n  properties:\n    n: {type: integer, minimum: 0}\n".into(),
        )],
        ..Setup::default()
    });
    let mut c = daemon.client();
    // (payload as sent, payload as stored)
    let accepted = [
        (
            r#"{"n":123456789012345678901234567890,"d":0.1000000000000000055511151231257827,"e":1E400,"z":-0,"s":"\u00e9\/é"}"#,
            r#"{"n":123456789012345678901234567890,"d":0.1000000000000000055511151231257827,"e":1E400,"z":-0,"s":"\u00e9\/é"}"#,
        ),
        (
            "{ \"n\" : 7 ,\t\"list\" : [ 1.50 , 2e+3 , { } ] , \"s\" : \" a  b \" }",
            r#"{"n":7,"list":[1.50,2e+3,{}],"s":" a  b "}"#,
        ),
    ];
    for (payload, _) in &accepted {
        c.send_raw(format!("{{\"type\":\"measured\",\"payload\":{payload}}}\n").as_bytes())
            .unwrap();
        let answer = c.read_answer().unwrap();
        assert_eq!(answer["ok"], json!(true), "{payload}: {answer}");
    }
    // (request line, code, path in details)
    let refused = [
        (
            r#"{"type":"measured","payload":{"n":-123456789012345678901234567890}}"#,
            "invalid_payload",
            "/payload/n",
        ),
        (
            r#"{"type":"measured","payload":{"x":{"a":1,"a":2}}}"#,
            "invalid_json",
            "/payload/x",
        ),
        (
            r#"{"type":"measured","payload":{"x":[{"a":1},{"a":1,"\u0061":2}]}}"#,
            "invalid_json",
            "/payload/x/1",
        ),
        (
            r#"{"type":"measured","actor":{"id":"a","\u0069d":"b"}}"#,
            "invalid_json",
            "/actor",
        ),
        (
            r#"{"type":"measured","type":"user_login"}"#,
            "invalid_json",
            "",
        ),
    ];
    for (line, code, path) in &refused {
        c.send_raw(format!("{line}\n").as_bytes()).unwrap();
        let answer = c.read_answer().unwrap();
        assert_eq!(answer["error"]["code"], json!(code), "{line}: {answer}");
        assert_eq!(
            answer["error"]["details"][0]["path"],
            json!(path),
            "{answer}"
        );
        if *code == "invalid_json" {
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains("duplicate key"), "{answer}");
        }
    }
    let lines = daemon.log_lines();
    assert_eq!(lines.len(), accepted.len(), "{lines:#?}");
    for (line, (_, stored)) in lines.iter().zip(&accepted) {
        assert!(
            line.contains(&format!(",\"payload\":{stored},\"hash\":")),
            "{stored} in {line}"
        );
    }
    let mut daemon = daemon;
    assert!(daemon.stop().success());
    let (code, out, err) = trail(&["verify", daemon.log_dir.to_str().unwrap()], "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("intact"), "{out}");
}
