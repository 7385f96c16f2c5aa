//! The postgres plugin end to end: the real daemon loads it and delivers to a real PostgreSQL server started by
//! the test (the plugin's own test harness, `plugins/postgres/tests/support/server.rs`).

#[path = "../plugins/postgres/tests/support/server.rs"]
mod server;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use self::server::{Options, Server};
use crate::util::{Daemon, Setup, login, one_sink_daemon, recorded, search_types, wait_until};

/// Generous: the machine may be busy building.
const DEADLINE: Duration = Duration::from_secs(90);

/// A daemon whose sink `pg` sends the event types `types` to PostgreSQL with `config`.
fn daemon(config: &Value, types: &str, setup: Setup) -> Daemon {
    one_sink_daemon(
        ("pg", "postgres", "trail-sink-postgres"),
        config,
        types,
        setup,
    )
}

/// The number of rows in `trail_events` (0 while the table does not exist).
fn count(server: &Server) -> i64 {
    server
        .admin()
        .query_one(
            "SELECT CASE WHEN to_regclass('trail_events') IS NULL THEN 0 ELSE (SELECT count(*) FROM trail_events) END",
            &[],
        )
        .map(|r| r.get(0))
        .unwrap_or(0)
}

#[track_caller]
fn wait_for_rows(server: &Server, daemon: &Daemon, n: i64) {
    let ok = wait_until(DEADLINE, || count(server) >= n);
    assert!(
        ok,
        "{} rows, expected {n}; status {}\n{}",
        count(server),
        daemon.admin(json!({"command": "status"})),
        daemon.stderr()
    );
}

fn sink_status(daemon: &Daemon) -> Value {
    daemon.admin(json!({"command": "status"}))["sinks"][0].clone()
}

/// (last_seq, last_hash) of `host-a`'s watermark; `None` also while the table does not exist.
fn watermark(server: &Server) -> Option<(i64, Option<String>)> {
    server
        .admin()
        .query_opt(
            "SELECT last_seq, last_hash FROM trail_watermarks WHERE host = 'host-a'",
            &[],
        )
        .ok()
        .flatten()
        .map(|r| (r.get(0), r.get(1)))
}

#[test]
fn the_table_holds_what_trail_search_finds_and_the_watermark_the_last_seq() {
    let server = Server::start();
    let daemon = daemon(
        &server.sink_config(),
        "[user_login, role_granted, stream_only]",
        Setup {
            extra_types: vec![(
                "stream_only.yml".into(),
                "name: stream_only\ndescription: d\nsaved_to_database: false\nstreamed: true\n"
                    .into(),
            )],
            ..Setup::default()
        },
    );
    let mut c = daemon.client();
    let (mut streamed, mut logouts) = (Vec::new(), Vec::new());
    for i in 0..80 {
        let event = match i % 4 {
            0 => {
                json!({"type": "role_granted", "actor": {"id": format!("u-{i}")}, "payload": {"role": "admin"}})
            }
            1 => json!({"type": "stream_only", "message": i.to_string()}),
            2 => json!({"type": "user_logout", "actor": {"id": "u-1"}}),
            _ => login(&i.to_string()),
        };
        let answer = c.emit(&event).unwrap();
        assert_eq!(answer["ok"], json!(true), "{answer}");
        if i % 4 == 2 {
            logouts.push(answer["seq"].as_i64().unwrap());
        } else {
            streamed.push((
                answer["seq"].as_i64().unwrap(),
                answer["id"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let last = streamed.last().unwrap().0;
    assert!(
        wait_until(DEADLINE, || watermark(&server)
            .is_some_and(|(seq, _)| seq == last)),
        "watermark {:?}, expected {last}\n{}",
        watermark(&server),
        daemon.stderr()
    );

    // What trail search finds on the host, and what the database holds, record for record.
    let found = search_types(&daemon, &["user_login", "role_granted"]);
    assert_eq!(found.len(), 40);
    let mut admin = server.admin();
    let saved: Vec<Value> = admin
        .query(
            "SELECT record::text, hash FROM trail_events WHERE type IN ('user_login', 'role_granted') ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let record: Value = serde_json::from_str(r.get::<_, &str>(0)).unwrap();
            assert_eq!(record["hash"].as_str(), r.get::<_, Option<&str>>(1));
            record
        })
        .collect();
    assert_eq!(saved, found);
    // Stream-only records are in the table, without a hash.
    let all: Vec<(i64, String, Option<String>)> = admin
        .query(
            "SELECT seq, id::text, hash FROM trail_events ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        all.iter()
            .map(|(s, id, _)| (*s, id.clone()))
            .collect::<Vec<_>>(),
        streamed
    );
    let types: Vec<String> = admin
        .query("SELECT type FROM trail_events WHERE hash IS NULL", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        types.len() == 20 && types.iter().all(|t| t == "stream_only"),
        "{types:?}"
    );
    // The watermark's hash is the log's hash of the last record.
    assert_eq!(
        watermark(&server).unwrap().1.as_deref(),
        found.last().unwrap()["hash"].as_str()
    );

    // README's queries ("Fleet"), as written there.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let query = |starts: &str| {
        let at = readme
            .find(starts)
            .unwrap_or_else(|| panic!("README lacks {starts:?}"));
        readme[at..].split_once(";\n").unwrap().0.to_owned()
    };
    let actor = admin.query(&query("-- what one actor did"), &[]).unwrap();
    assert_eq!(actor.len(), 20, "the logins of u-42");
    let silent = admin
        .query(&query("-- hosts whose watermark"), &[])
        .unwrap();
    assert!(silent.is_empty());
    let gaps: Vec<(i64, i64)> = admin
        .query(
            &query("-- gaps in a host's seq").replace("web-1.example", "host-a"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for seq in logouts {
        assert!(
            gaps.iter().any(|&(from, to)| from <= seq && seq <= to),
            "{seq} not in {gaps:?}"
        );
    }
}

#[test]
fn every_event_is_stored_once_across_a_server_crash_under_load() {
    let mut server = Server::start();
    let daemon = daemon(
        &server.sink_config(),
        "[user_login]",
        Setup {
            fsync: "never",
            ..Setup::default()
        },
    );
    const N: u64 = 3000;
    let acked = Arc::new(AtomicU64::new(0));
    let emitter = {
        let mut c = daemon.client();
        let acked = acked.clone();
        std::thread::spawn(move || {
            (0..N)
                .map(|i| {
                    let answer = c.emit(&login(&i.to_string())).unwrap();
                    assert_eq!(answer["ok"], json!(true), "{answer}");
                    acked.fetch_add(1, Ordering::Relaxed);
                    answer["id"].as_str().unwrap().to_owned()
                })
                .collect::<BTreeSet<String>>()
        })
    };
    wait_for_rows(&server, &daemon, 300);
    server.crash();
    // Events go on being acknowledged, and wait in the spool.
    let at_crash = acked.load(Ordering::Relaxed);
    assert!(
        wait_until(DEADLINE, || acked.load(Ordering::Relaxed)
            >= (at_crash + 500).min(N)),
        "the daemon stopped acknowledging while the database was down"
    );
    assert!(
        wait_until(DEADLINE, || sink_status(&daemon)["retries"].as_u64()
            > Some(0)),
        "{}",
        sink_status(&daemon)
    );
    server.run();
    let ids = emitter.join().unwrap();
    wait_for_rows(&server, &daemon, N as i64);
    let stored: BTreeSet<String> = server
        .admin()
        .query("SELECT id::text FROM trail_events", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, ids);
    let seqs: i64 = server
        .admin()
        .query_one("SELECT count(DISTINCT seq) FROM trail_events", &[])
        .unwrap()
        .get(0);
    assert_eq!(seqs, N as i64);
}

#[test]
fn trail_starts_with_the_server_down_and_catches_up() {
    let mut server = Server::prepare(Options::default());
    let daemon = daemon(&server.sink_config(), "[user_login]", Setup::default());
    let mut c = daemon.client();
    for i in 0..20 {
        assert_eq!(c.emit(&login(&i.to_string())).unwrap()["ok"], json!(true));
    }
    let down = |s: &Value| {
        s["last_error"].as_str().is_some_and(|e| {
            e.contains("connecting to trail@127.0.0.1") && e.contains("is PostgreSQL running there")
        })
    };
    assert!(
        wait_until(DEADLINE, || down(&sink_status(&daemon))),
        "{}",
        sink_status(&daemon)
    );
    server.run();
    wait_for_rows(&server, &daemon, 20);
    assert!(
        wait_until(DEADLINE, || sink_status(&daemon)["last_error"].is_null()),
        "{}",
        sink_status(&daemon)
    );
}

#[test]
fn wrong_credentials_show_in_the_log_and_status_while_events_wait_in_the_spool() {
    let server = Server::start();
    let mut config = server.sink_config();
    config["password"] = json!("not-the-password");
    let daemon = daemon(&config, "[user_login]", Setup::default());
    let mut c = daemon.client();
    for i in 0..10 {
        assert_eq!(c.emit(&login(&i.to_string())).unwrap()["ok"], json!(true));
    }
    let refused = "password authentication failed for user";
    assert!(
        wait_until(DEADLINE, || daemon.stderr().contains(refused)),
        "{}",
        daemon.stderr()
    );
    let status = sink_status(&daemon);
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("password authentication failed"),
        "{status}"
    );
    assert_eq!(status["delivered"], json!(0));
    assert!(status["backlog_bytes"].as_u64() > Some(0), "{status}");
    // The server is told the password the sink has: everything that waited arrives.
    server
        .admin()
        .batch_execute("ALTER ROLE trail PASSWORD 'not-the-password'")
        .unwrap();
    wait_for_rows(&server, &daemon, 10);
}

#[test]
fn a_row_the_server_refuses_goes_alone_to_dead_letters() {
    let server = Server::start();
    let daemon = daemon(&server.sink_config(), "[user_login]", Setup::default());
    let mut c = daemon.client();
    assert_eq!(c.emit(&login("first")).unwrap()["ok"], json!(true));
    wait_for_rows(&server, &daemon, 1);
    server
        .admin()
        .batch_execute(
            "ALTER TABLE trail_events ADD CONSTRAINT polite CHECK (record->>'message' <> 'reject-me')",
        )
        .unwrap();
    let acked: Vec<i64> = ["reject-me", "nul \u{0} inside", "last"]
        .iter()
        .map(|m| {
            let answer = c.emit(&login(m)).unwrap();
            assert_eq!(answer["ok"], json!(true), "{answer}");
            answer["seq"].as_i64().unwrap()
        })
        .collect();
    let dead_file = daemon.path("spool/dead/pg.jsonl");
    assert!(
        wait_until(DEADLINE, || recorded(&dead_file).len() == 2),
        "{:?}\n{}",
        recorded(&dead_file),
        daemon.stderr()
    );
    let dead = recorded(&dead_file);
    assert_eq!(dead[0]["seq"], json!(acked[0]));
    assert!(
        dead[0]["error"].as_str().unwrap().contains("\"polite\""),
        "{}",
        dead[0]
    );
    assert_eq!(dead[1]["seq"], json!(acked[1]));
    wait_for_rows(&server, &daemon, 2);
    let messages: Vec<String> = server
        .admin()
        .query(
            "SELECT record->>'message' FROM trail_events ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(messages, ["first", "last"]);
}
