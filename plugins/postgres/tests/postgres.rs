//! The postgres plugin built as a real dynamic library, loaded through the plugin API, writing to a real
//! PostgreSQL server started by the test (see `support/server.rs`).

#[path = "support/server.rs"]
mod server;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use trail_plugin_api::{ErrorKind, SinkBox};
use trail_plugin_testkit::{
    Event, Plugin, Profile, TestHost, deliver, events, expect_error, tls::TestCa, write,
};

use self::server::{Options, Server};

fn plugin() -> Plugin {
    static PLUGIN: std::sync::OnceLock<Plugin> = std::sync::OnceLock::new();
    *PLUGIN.get_or_init(|| Plugin::build_and_load("trail-sink-postgres", Profile::Debug))
}

fn new_sink(config: &Value, host: &TestHost) -> SinkBox {
    plugin()
        .new_sink(&config.to_string(), host)
        .unwrap_or_else(|e| panic!("{config}: {e}"))
}

/// `config` with `changes` merged in.
fn with(mut config: Value, changes: Value) -> Value {
    for (key, value) in changes.as_object().unwrap() {
        config[key] = value.clone();
    }
    config
}

/// Events as [`events`] makes them, every other one with a `hash` as a saved record has (the others are
/// stream-only records, which have none).
fn logged(seqs: std::ops::Range<u64>) -> Vec<Event> {
    let mut events = events(seqs);
    for e in &mut events {
        if e.seq % 2 == 0 {
            e.line.pop();
            e.line
                .push_str(&format!(r#","hash":"{:064x}"}}"#, e.seq * 7919));
        }
    }
    events
}

/// Makes the events table refuse rows whose actor is `mallory` (a CHECK constraint named `no_mallory`).
fn refuse_mallory(server: &Server) {
    server
        .admin()
        .batch_execute(
            "ALTER TABLE trail_events ADD CONSTRAINT no_mallory CHECK (actor_id IS DISTINCT FROM 'mallory')",
        )
        .unwrap();
}

/// Makes `event` one that [`refuse_mallory`]'s constraint refuses: its actor becomes `mallory`.
fn as_mallory(event: &mut Event) {
    event.line = event
        .line
        .replacen(r#""id":"u-"#, r#""id":"mallory","was":"u-"#, 1);
}

/// Puts a NUL character (`\u0000`, which `jsonb` refuses) into `event`'s message.
fn with_nul(event: &mut Event) {
    event.line = event.line.replace("déjà vu", r"nul \u0000 here");
}

/// What the table must hold after `sent` was delivered with the events at `refused` given up on: the first
/// batch's record (seq 1) and the rest of `sent`.
fn kept_but(sent: &[Event], refused: &[usize]) -> Vec<Event> {
    logged(1..2)
        .into_iter()
        .chain(
            sent.iter()
                .enumerate()
                .filter(|(i, _)| !refused.contains(i))
                .map(|(_, e)| e.clone()),
        )
        .collect()
}

/// Every stored row by seq: its columns as text, and the record as JSON.
fn stored(server: &Server, table: &str) -> BTreeMap<i64, (Vec<Option<String>>, Value)> {
    let mut admin = server.admin();
    let rows = admin
        .query(
            &format!(
                "SELECT seq, id::text, host, type, actor_id, target_type, target_id, outcome, severity, hash, record::text FROM {table}"
            ),
            &[],
        )
        .unwrap();
    let mut by_seq = BTreeMap::new();
    for row in rows {
        let columns = (1..10).map(|i| row.get::<_, Option<String>>(i)).collect();
        let record: Value = serde_json::from_str(row.get::<_, &str>(10)).unwrap();
        assert!(
            by_seq
                .insert(row.get::<_, i64>(0), (columns, record))
                .is_none(),
            "seq twice"
        );
    }
    by_seq
}

/// Checks that `table` holds exactly `sent`, each row's columns taken from its record.
#[track_caller]
fn check_stored(server: &Server, table: &str, sent: &[Event]) {
    let rows = stored(server, table);
    assert_eq!(
        rows.keys().map(|&s| s as u64).collect::<Vec<_>>(),
        sent.iter().map(|e| e.seq).collect::<Vec<_>>()
    );
    for e in sent {
        let (columns, record) = &rows[&(e.seq as i64)];
        let line: Value = serde_json::from_str(&e.line).unwrap();
        assert_eq!(*record, line, "seq {}", e.seq);
        let text = |v: &Value| v.as_str().map(str::to_owned);
        let expected = vec![
            Some(e.id.clone()),
            text(&line["source"]["host"]),
            Some(e.event_type.clone()),
            text(&line["actor"]["id"]),
            text(&line["target"]["type"]),
            text(&line["target"]["id"]),
            text(&line["outcome"]),
            text(&line["severity"]),
            text(&line["hash"]),
        ];
        assert_eq!(*columns, expected, "seq {}", e.seq);
    }
    // The times, compared by the server itself.
    let mut admin = server.admin();
    let wrong: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM {table} WHERE received_at <> (record->>'received_at')::timestamptz OR occurred_at <> (record->>'occurred_at')::timestamptz"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0);
}

/// The watermark table's rows: host, last_seq, last_hash.
fn watermarks(server: &Server, table: &str) -> Vec<(String, i64, Option<String>)> {
    server
        .admin()
        .query(
            &format!("SELECT host, last_seq, last_hash FROM {table} ORDER BY host"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn hash_of(e: &Event) -> Option<String> {
    let line: Value = serde_json::from_str(&e.line).unwrap();
    line["hash"].as_str().map(str::to_owned)
}

#[test]
fn batches_arrive_once_with_their_columns_and_the_watermark() {
    let server = Server::start();
    let host = TestHost::new("pg");
    let mut sink = new_sink(&server.sink_config(), &host);
    let sent = logged(1..1201);
    for batch in sent.chunks(500) {
        write(&mut sink, batch).unwrap();
    }
    check_stored(&server, "trail_events", &sent);
    let last = sent.last().unwrap();
    assert_eq!(
        watermarks(&server, "trail_watermarks"),
        [("app-1.example".to_owned(), 1200, hash_of(last))]
    );

    // Delivered again (at least once): nothing changes, and an older batch does not move the watermark back.
    write(&mut sink, &sent[700..1000]).unwrap();
    write(&mut sink, &sent[..10]).unwrap();
    check_stored(&server, "trail_events", &sent);
    assert_eq!(watermarks(&server, "trail_watermarks")[0].1, 1200);
    // The last record is stream-only (no hash): the watermark says so.
    let more = logged(1201..1202);
    write(&mut sink, &more).unwrap();
    assert_eq!(
        watermarks(&server, "trail_watermarks"),
        [("app-1.example".to_owned(), 1201, None)]
    );
    assert!(sink.close().is_ok());
    assert!(
        host.logs()
            .iter()
            .any(|l| l.contains("connected to trail@127.0.0.1")),
        "{:?}",
        host.logs()
    );
}

#[test]
fn tables_come_with_the_documented_columns_and_indexes() {
    let server = Server::start();
    let config = with(
        server.sink_config(),
        json!({"table": "audit_x.events", "watermark_table": "audit_x.hosts"}),
    );
    server
        .admin()
        .batch_execute("CREATE SCHEMA audit_x AUTHORIZATION trail")
        .unwrap();
    let mut sink = new_sink(&config, &TestHost::new("pg"));
    write(&mut sink, &logged(1..3)).unwrap();
    let mut admin = server.admin();
    let columns: Vec<(String, String, String)> = admin
        .query(
            "SELECT table_name::text, column_name::text, data_type::text || ' ' || is_nullable::text FROM information_schema.columns WHERE table_schema = 'audit_x' ORDER BY table_name, ordinal_position",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("events", "id", "uuid NO"),
        ("events", "seq", "bigint NO"),
        ("events", "host", "text NO"),
        ("events", "type", "text NO"),
        ("events", "occurred_at", "timestamp with time zone NO"),
        ("events", "received_at", "timestamp with time zone NO"),
        ("events", "actor_id", "text YES"),
        ("events", "target_type", "text YES"),
        ("events", "target_id", "text YES"),
        ("events", "outcome", "text YES"),
        ("events", "severity", "text NO"),
        ("events", "record", "jsonb NO"),
        ("events", "hash", "text YES"),
        ("hosts", "host", "text NO"),
        ("hosts", "last_seq", "bigint NO"),
        ("hosts", "last_hash", "text YES"),
        ("hosts", "updated_at", "timestamp with time zone NO"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(columns, expected);
    let indexes: Vec<String> = admin
        .query(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'audit_x' ORDER BY indexname",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexes,
        [
            "CREATE INDEX events_actor ON audit_x.events USING btree (actor_id, received_at) WHERE (actor_id IS NOT NULL)",
            "CREATE INDEX events_host_seq ON audit_x.events USING btree (host, seq)",
            "CREATE UNIQUE INDEX events_pkey ON audit_x.events USING btree (id)",
            "CREATE INDEX events_time ON audit_x.events USING btree (received_at)",
            "CREATE INDEX events_type ON audit_x.events USING btree (type, received_at)",
            "CREATE UNIQUE INDEX hosts_pkey ON audit_x.hosts USING btree (host)",
        ]
    );
}

#[test]
fn existing_tables_need_only_the_documented_grants() {
    let server = Server::start();
    // The owner creates the tables (through the plugin), then a role with only README's grants writes.
    let mut owner = new_sink(&server.sink_config(), &TestHost::new("owner"));
    write(&mut owner, &logged(1..3)).unwrap();
    server
        .admin()
        .batch_execute(
            "CREATE ROLE writer LOGIN PASSWORD 'writer-password';
             GRANT SELECT, INSERT ON trail_events TO writer;
             GRANT SELECT, INSERT, UPDATE ON trail_watermarks TO writer;",
        )
        .unwrap();
    let writer_config = with(
        server.sink_config(),
        json!({"user": "writer", "password": "writer-password", "create_tables": false}),
    );
    let mut writer = new_sink(&writer_config, &TestHost::new("writer"));
    let sent = logged(1..11);
    write(&mut writer, &sent[2..]).unwrap();
    check_stored(&server, "trail_events", &sent);
    assert_eq!(watermarks(&server, "trail_watermarks")[0].1, 10);

    // Without the tables, and without asking for them: a retryable error that says what to do.
    let other = with(writer_config, json!({"table": "nowhere"}));
    let mut sink = new_sink(&other, &TestHost::new("writer"));
    let error = write(&mut sink, &sent[..1]).unwrap_err();
    assert_eq!(error.delivered, 0);
    expect_error::<()>(
        Err(error.error),
        ErrorKind::RETRYABLE,
        &["relation \"nowhere\" does not exist", "create the tables"],
    );
}

#[test]
fn a_row_the_server_refuses_is_the_only_one_given_up_on() {
    let server = Server::start();
    let mut sink = new_sink(&server.sink_config(), &TestHost::new("pg"));
    write(&mut sink, &logged(1..2)).unwrap();
    refuse_mallory(&server);
    let mut sent = logged(2..202);
    // A CHECK constraint refuses one; jsonb refuses a NUL character in another.
    as_mallory(&mut sent[40]);
    with_nul(&mut sent[150]);
    let delivery = deliver(&mut sink, &sent, 10);
    let dead: Vec<u64> = delivery.dead.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(dead, [sent[40].seq, sent[150].seq]);
    assert!(
        delivery.dead[0].1.message.contains("no_mallory")
            && delivery.dead[0].1.message.contains("SQLSTATE 23514")
            && delivery.dead[0]
                .1
                .message
                .contains(&format!("event seq {}", sent[40].seq)),
        "{:?}",
        delivery.dead[0]
    );
    assert!(
        delivery.dead[1].1.message.contains("\\u0000"),
        "{:?}",
        delivery.dead[1]
    );
    check_stored(&server, "trail_events", &kept_but(&sent, &[40, 150]));
    assert_eq!(watermarks(&server, "trail_watermarks")[0].1, 201);
}

#[test]
fn a_server_restart_between_batches_costs_no_failed_write() {
    let mut server = Server::start();
    let host = TestHost::new("pg");
    let mut sink = new_sink(&server.sink_config(), &host);
    let sent = logged(1..101);
    write(&mut sink, &sent[..50]).unwrap();
    server.crash();
    // Down: a retryable error that says where it tried.
    let error = write(&mut sink, &sent[50..]).unwrap_err();
    assert_eq!(error.delivered, 0);
    expect_error::<()>(
        Err(error.error),
        ErrorKind::RETRYABLE,
        &[
            &format!("connecting to trail@127.0.0.1:{}/audit", server.port()),
            "is PostgreSQL running there",
        ],
    );
    server.run();
    write(&mut sink, &sent[50..75]).unwrap();
    // Back, then gone again between two writes: the idle connection is found dead and replaced at once.
    server.crash();
    server.run();
    write(&mut sink, &sent[75..]).unwrap();
    check_stored(&server, "trail_events", &sent);
    assert!(
        host.logs()
            .iter()
            .any(|l| l.contains("the connection was lost; connecting again")),
        "{:?}",
        host.logs()
    );
}

#[test]
fn wrong_credentials_and_untrusted_certificates_are_retryable_and_say_what_to_do() {
    let ca = TestCa::new("trail test CA");
    let server = Server::start_with(Options {
        tls: Some(ca.server_pem()),
        ..Options::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let right = dir.path().join("ca.pem");
    std::fs::write(&right, &ca.pem).unwrap();
    let wrong = dir.path().join("other.pem");
    std::fs::write(&wrong, TestCa::new("unrelated CA").pem).unwrap();
    let tls = |extra: Value| {
        let config = with(server.sink_config(), json!({"sslmode": "require"}));
        let mut config = with(config, extra);
        if config["ca_file"].is_null() {
            config.as_object_mut().unwrap().remove("ca_file");
        }
        config
    };
    let sent = logged(1..4);
    let refused = |config: Value, contains: &[&str]| {
        let mut sink = new_sink(&config, &TestHost::new("pg"));
        let error = write(&mut sink, &sent).unwrap_err();
        assert_eq!(error.delivered, 0);
        expect_error::<()>(Err(error.error), ErrorKind::RETRYABLE, contains);
    };
    refused(
        tls(json!({"ca_file": right, "password": "not-the-password"})),
        &[
            "password authentication failed for user \"trail\"",
            "check \"user\" and \"password\"",
        ],
    );
    refused(
        tls(json!({"ca_file": null})),
        &[
            "the server's certificate is not trusted",
            "give the CA that signed it in \"ca_file\"",
        ],
    );
    refused(
        tls(json!({"ca_file": wrong})),
        &["not trusted", "(the one given did not)"],
    );
    // Reaching the right address under a name the certificate does not have.
    let url = format!(
        "host=wrong.example hostaddr=127.0.0.1 port={} user=trail dbname=audit sslmode=require",
        server.port()
    );
    refused(
        json!({"url": url, "password": server::PASSWORD, "ca_file": right}),
        &["the server's certificate is not for this host name"],
    );
    // The right CA: delivered, over TLS.
    let mut sink = new_sink(&tls(json!({"ca_file": right})), &TestHost::new("pg"));
    write(&mut sink, &sent).unwrap();
    check_stored(&server, "trail_events", &sent);
    let over_tls: bool = server
        .admin()
        .query_one(
            "SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = 'trail'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(over_tls);

    // A server without TLS and a sink that requires it (the default over TCP).
    let plain = Server::start();
    let mut config = plain.sink_config();
    config.as_object_mut().unwrap().remove("sslmode");
    refused(
        with(config, json!({"ca_file": right})),
        &["server does not support TLS", "enable ssl on the server"],
    );
}

#[test]
fn configuration_errors_come_back_as_config_errors() {
    let result = plugin().new_sink(
        r#"{"host": "db", "user": "u", "tabel": "x"}"#,
        &TestHost::new("s"),
    );
    expect_error(result, ErrorKind::CONFIG, &["unknown field `tabel`"]);
    let result = plugin().new_sink(
        r#"{"host": "db", "user": "u", "table": "x\"y"}"#,
        &TestHost::new("s"),
    );
    expect_error(
        result,
        ErrorKind::CONFIG,
        &["not a table name the plugin accepts"],
    );
}

/// The plugin's notes on how each batch went in (debug messages), from `host` since `from`.
fn paths(host: &TestHost, from: usize) -> Vec<String> {
    host.logs()
        .into_iter()
        .filter(|l| l.starts_with("debug: batch of "))
        .skip(from)
        .collect()
}

#[test]
fn a_batch_that_cannot_repeat_stored_rows_is_copied_straight_into_the_table() {
    let server = Server::start();
    let host = TestHost::new("pg");
    let mut sink = new_sink(&server.sink_config(), &host);
    // The first batch of an instance may repeat what an earlier one stored: staged.
    write(&mut sink, &logged(1..101)).unwrap();
    // The next, all above it: straight into the table.
    write(&mut sink, &logged(101..201)).unwrap();
    let seen = paths(&host, 0);
    assert!(
        seen[0].contains("100 rows: through the staging table"),
        "{seen:?}"
    );
    assert_eq!(
        seen[1], "debug: batch of 100 rows: copied into the table",
        "{seen:?}"
    );

    // Another instance (as after a restart, with the first one's connection still open) stores some of the
    // next batch first: the direct copy meets their ids, and the batch goes through the staging table whole.
    let other = TestHost::new("pg");
    let mut second = new_sink(&server.sink_config(), &other);
    write(&mut second, &logged(250..261)).unwrap();
    write(&mut sink, &logged(201..301)).unwrap();
    assert_eq!(
        paths(&host, 2),
        ["debug: batch of 100 rows: an id is already stored; through the staging table"]
    );

    // A row refused: the write that follows the failed one is staged, the one after it direct again.
    let mut sent = logged(301..321);
    with_nul(&mut sent[4]);
    let delivery = deliver(&mut sink, &sent, 5);
    assert_eq!(delivery.dead.len(), 1, "{delivery:?}");
    assert_eq!(delivery.dead[0].0, 305);
    write(&mut sink, &logged(321..331)).unwrap();
    let seen = paths(&host, 3);
    assert!(
        seen.last()
            .unwrap()
            .contains("10 rows: copied into the table"),
        "{seen:?}"
    );
    assert!(
        seen[seen.len() - 2].contains("15 rows: through the staging table"),
        "{seen:?}"
    );
    // A batch with seqs not above the last stored (dead letters replayed): staged.
    let replayed = logged(305..306);
    write(&mut sink, &replayed).unwrap();
    assert!(
        paths(&host, 0)
            .last()
            .unwrap()
            .contains("1 rows: through the staging table"),
        "{:?}",
        paths(&host, 0)
    );

    check_stored(&server, "trail_events", &logged(1..331));
    assert_eq!(watermarks(&server, "trail_watermarks")[0].1, 330);
}

#[test]
fn a_server_without_fsync_is_warned_about() {
    // The tests' servers run with fsync off (nothing is lost when only processes die).
    let server = Server::start();
    let host = TestHost::new("pg");
    let mut sink = new_sink(&server.sink_config(), &host);
    write(&mut sink, &logged(1..2)).unwrap();
    let logs = host.logs().join("\n");
    assert!(
        logs.contains("the server runs with fsync off: a committed batch can be lost"),
        "{logs}"
    );
    assert!(!logs.contains("synchronous_commit off"), "{logs}");
    server
        .admin()
        .batch_execute("ALTER ROLE trail SET synchronous_commit = off")
        .unwrap();
    let host = TestHost::new("pg");
    let mut sink = new_sink(&server.sink_config(), &host);
    write(&mut sink, &logged(2..3)).unwrap();
    let logs = host.logs().join("\n");
    assert!(logs.contains("has synchronous_commit off"), "{logs}");
}

/// `config` with `connections: n`.
fn parallel(config: Value, n: usize) -> Value {
    with(config, json!({"connections": n}))
}

/// How many of `table`'s rows have a seq in `seqs`.
fn count(server: &Server, table: &str, seqs: std::ops::RangeInclusive<u64>) -> i64 {
    server
        .admin()
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE seq BETWEEN $1 AND $2"),
            &[&(*seqs.start() as i64), &(*seqs.end() as i64)],
        )
        .unwrap()
        .get(0)
}

/// The watermark names only committed rows: every seq from 1 to it is in the table.
#[track_caller]
fn check_watermark(server: &Server, expected: &Event) {
    let marks = watermarks(server, "trail_watermarks");
    assert_eq!(
        marks,
        [(
            "app-1.example".to_owned(),
            expected.seq as i64,
            hash_of(expected)
        )]
    );
    assert_eq!(
        count(server, "trail_events", 1..=expected.seq),
        expected.seq as i64,
        "rows up to the watermark"
    );
}

#[test]
fn the_watermark_moves_only_when_every_part_of_the_batch_committed() {
    let server = Server::start();
    // A part that meets a row another transaction holds fails after lock_timeout instead of waiting.
    server
        .admin()
        .batch_execute("ALTER ROLE trail SET lock_timeout = '1s'")
        .unwrap();
    let host = TestHost::new("pg");
    let mut sink = new_sink(&parallel(server.sink_config(), 4), &host);
    // 4 parts, 4 parts, 2 parts (of 600 each), and one part (too small to split).
    let sent = logged(1..10801);
    let mut at = 0;
    for size in [2000, 2001, 1200, 999, 600] {
        let batch = &sent[at..at + size];
        at += size;
        write(&mut sink, batch).unwrap();
        check_watermark(&server, batch.last().unwrap());
    }
    let seen = paths(&host, 0);
    assert!(
        seen[0].contains("2000 rows in 4 parts: through the staging table"),
        "{seen:?}"
    );
    assert_eq!(
        seen[1..],
        [
            "debug: batch of 2001 rows in 4 parts: copied into the table",
            "debug: batch of 1200 rows in 2 parts: copied into the table",
            "debug: batch of 999 rows: copied into the table",
            "debug: batch of 600 rows: copied into the table",
        ]
    );
    let mut before = sent[at - 1].clone();

    // Another transaction holds a row with the id of an event in the second part, then one in the last.
    for (held, failing) in [(700, "part 2 of 4"), (1900, "part 4 of 4")] {
        let batch = &sent[at..at + 2000];
        let mut blocker = server.admin();
        let mut holding = blocker.transaction().unwrap();
        holding
            .execute(
                "INSERT INTO trail_events (id, seq, host, type, occurred_at, received_at, severity, record)
                 VALUES ($1::text::uuid, 0, 'elsewhere', 't', now(), now(), 'info', '{}')",
                &[&batch[held].id],
            )
            .unwrap();
        let error = write(&mut sink, batch).unwrap_err();
        assert_eq!(error.delivered, 0);
        let (first, last) = (
            batch[500 * (held / 500)].seq,
            batch[500 * (held / 500) + 499].seq,
        );
        expect_error::<()>(
            Err(error.error),
            ErrorKind::RETRYABLE,
            &[
                &format!("{failing} (seqs {first} to {last}) on connection"),
                "lock timeout",
            ],
        );
        // The other parts committed (all but the last) or rolled back (the last), and the watermark stayed.
        check_watermark(&server, &before);
        let part = |i: usize| {
            count(
                &server,
                "trail_events",
                batch[500 * i].seq..=batch[500 * i + 499].seq,
            )
        };
        let parts: Vec<i64> = (0..4).map(part).collect();
        let expected = match held {
            700 => [500, 0, 500, 0],
            _ => [500, 500, 500, 0],
        };
        assert_eq!(parts, expected);
        holding.rollback().unwrap();
        // trail's retry: the whole batch again, the committed parts' rows not stored twice.
        write(&mut sink, batch).unwrap();
        check_watermark(&server, batch.last().unwrap());
        before = batch.last().unwrap().clone();
        at += 2000;
    }
    check_stored(&server, "trail_events", &sent[..at]);
}

#[test]
fn a_row_refused_with_several_connections_is_the_only_one_given_up_on() {
    let server = Server::start();
    let host = TestHost::new("pg");
    let mut sink = new_sink(&parallel(server.sink_config(), 4), &host);
    write(&mut sink, &logged(1..2)).unwrap();
    refuse_mallory(&server);
    // 2000 rows, 4 parts: a NUL in the first part, a CHECK in the third.
    let mut sent = logged(2..2002);
    with_nul(&mut sent[100]);
    as_mallory(&mut sent[1234]);
    let delivery = deliver(&mut sink, &sent, 10);
    let dead: Vec<u64> = delivery.dead.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(dead, [sent[100].seq, sent[1234].seq], "{delivery:?}");
    assert!(
        delivery.dead[1].1.message.contains("no_mallory")
            && delivery.dead[1]
                .1
                .message
                .contains(&format!("event seq {}", sent[1234].seq)),
        "{:?}",
        delivery.dead[1]
    );
    assert!(
        host.logs()
            .iter()
            .any(|l| l.contains("in 4 parts: a row was refused")),
        "{:?}",
        paths(&host, 0)
    );
    check_stored(&server, "trail_events", &kept_but(&sent, &[100, 1234]));
    check_watermark_of(&server, sent.last().unwrap());
}

/// The watermark is at `expected` (without requiring every seq below it: dead letters leave gaps).
#[track_caller]
fn check_watermark_of(server: &Server, expected: &Event) {
    assert_eq!(
        watermarks(server, "trail_watermarks"),
        [(
            "app-1.example".to_owned(),
            expected.seq as i64,
            hash_of(expected)
        )]
    );
}

#[test]
fn a_batch_holding_an_id_twice_is_written_on_one_connection() {
    let server = Server::start();
    let host = TestHost::new("pg");
    let mut sink = new_sink(&parallel(server.sink_config(), 4), &host);
    // The event of seq 1901 with the id of seq 101 (as a dead letter replayed twice over would be).
    let mut sent = logged(1..2001);
    let (own, twice) = (sent[1900].id.clone(), sent[100].id.clone());
    sent[1900].line = sent[1900].line.replacen(&own, &twice, 1);
    sent[1900].id = twice;
    write(&mut sink, &sent).unwrap();
    assert_eq!(
        paths(&host, 0),
        [
            "debug: batch of 2000 rows: through the staging table (the first of this instance, one after a failed write, or one with seqs not above the last stored)"
        ]
    );
    assert_eq!(count(&server, "trail_events", 1..=2000), 1999);
    check_watermark_of(&server, sent.last().unwrap());
}

#[test]
fn several_connections_store_every_event_once_through_a_server_restart() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    use std::time::{Duration, Instant};

    let mut server = Server::start();
    let host = TestHost::new("pg");
    let mut sink = new_sink(&parallel(server.sink_config(), 4), &host);
    let acknowledged = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // The writer delivers batches as trail's worker does (the undelivered rest again after a retryable
    // error, after a short backoff), until told to stop; batches of 4, 3 and 1 parts.
    let writer = {
        let (acknowledged, failures, stop) = (acknowledged.clone(), failures.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut sent = Vec::new();
            let mut next = 1;
            for size in [2000, 1500, 700].into_iter().cycle() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let batch = logged(next..next + size);
                next += size;
                let deadline = Instant::now() + Duration::from_secs(180);
                let mut rest = &batch[..];
                loop {
                    match write(&mut sink, rest) {
                        Ok(()) => break,
                        Err(error) => {
                            assert_eq!(error.error.kind, ErrorKind::RETRYABLE, "{error}");
                            assert!(Instant::now() < deadline, "not delivered: {error}");
                            rest = &rest[error.delivered as usize..];
                            failures.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                sent.extend(batch);
                acknowledged.fetch_add(1, Ordering::SeqCst);
            }
            (sink, sent)
        })
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !done() {
            assert!(!writer.is_finished(), "the writer ended");
            assert!(Instant::now() < deadline, "waited too long for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for("batches before the restart", &|| {
        acknowledged.load(Ordering::SeqCst) >= 4
    });
    server.crash();
    wait_for("a write to fail", &|| failures.load(Ordering::SeqCst) > 0);
    server.run();
    let restarted = acknowledged.load(Ordering::SeqCst);
    wait_for("batches after the restart", &|| {
        acknowledged.load(Ordering::SeqCst) >= restarted + 4
    });
    stop.store(true, Ordering::SeqCst);
    let (mut sink, sent) = writer.join().unwrap();
    check_stored(&server, "trail_events", &sent);
    check_watermark(&server, sent.last().unwrap());
    // The batches went out on four connections (four server backends).
    let backends: i64 = server
        .admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'trail pg'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(backends, 4);
    assert!(sink.close().is_ok());
    let logs = host.logs();
    assert!(
        logs.iter().any(
            |l| l.contains("connected to trail@127.0.0.1") && l.contains("(connection 4 of 4)")
        ),
        "{logs:?}"
    );
}

#[test]
fn connections_out_of_range_are_config_errors() {
    for n in [0, 17] {
        let config = json!({"host": "db", "user": "u", "connections": n});
        let result = plugin().new_sink(&config.to_string(), &TestHost::new("s"));
        expect_error(
            result,
            ErrorKind::CONFIG,
            &[&format!(
                "\"connections\" is {n}: give a number from 1 to 16"
            )],
        );
    }
}
