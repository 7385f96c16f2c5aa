//! The nats plugin against real `nats-server` processes: built as a dynamic library and loaded through the
//! plugin API as trail does (`trail-plugin-testkit`); what arrived is read back from the stream by a consumer.

#[path = "support/server.rs"]
mod server;

use std::time::Duration;

use serde_json::{Value, json};
use server::{Auth, Options, PASSWORD, Peer, Reader, Request, Responder, Server, USER};
use trail_plugin_api::ErrorKind;
use trail_plugin_testkit::{
    Event, Plugin, Profile, TestHost, deliver, events, expect_error, tls::TestCa, write,
};

fn plugin() -> Plugin {
    Plugin::build_and_load("trail-sink-nats", Profile::Debug)
}

/// A sink configuration for `server` that creates stream `AUDIT`, with `extra` fields merged in.
fn config(urls: Vec<String>, extra: Value) -> String {
    let mut config = json!({
        "servers": urls,
        "stream": {"name": "AUDIT", "create": true},
        "ack_timeout": "2s",
        "connect_timeout": "2s",
    });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    config.to_string()
}

#[test]
fn every_event_arrives_once_with_its_id_and_subject_and_again_is_a_duplicate() {
    let server = Server::start(Options::default());
    let plugin = plugin();
    let host = TestHost::new("bus");
    let mut sink = plugin
        .new_sink(
            &config(vec![server.url()], json!({"max_in_flight": 7})),
            &host,
        )
        .unwrap();
    let batch = events(1..501);
    write(&mut sink, &batch).unwrap();
    // The same events again, as after a crash before trail confirmed them: the stream drops the duplicates.
    write(&mut sink, &batch[100..300]).unwrap();
    write(&mut sink, &events(501..601)).unwrap();
    sink.flush().into_result().unwrap();
    sink.close().into_result().unwrap();

    let reader = Reader::connect(&[server.url()], None);
    let stored = reader.read_all("AUDIT");
    let expected = events(1..601);
    assert_eq!(stored.len(), expected.len());
    for (s, e) in stored.iter().zip(&expected) {
        assert_eq!(s.msg_id.as_deref(), Some(e.id.as_str()));
        assert_eq!(s.record, serde_json::from_str::<Value>(&e.line).unwrap());
        assert_eq!(s.subject, format!("audit.app-1_example.{}", e.event_type));
    }
    assert_eq!(
        reader.config("AUDIT"),
        json!({"subjects": ["audit.>"], "replicas": 1, "duplicate_window_s": 120, "max_age_s": 0})
    );
    let logs = host.logs().join("\n");
    assert!(
        logs.contains("created stream AUDIT (subjects audit.>, 1 replicas)"),
        "{logs}"
    );
    assert!(logs.contains("connected to nats://127.0.0.1:"), "{logs}");
}

#[test]
fn an_event_with_an_idempotency_key_is_deduplicated_by_host_uid_and_key() {
    let server = Server::start(Options::default());
    let plugin = plugin();
    let host = TestHost::new("bus");
    let mut sink = plugin
        .new_sink(&config(vec![server.url()], json!({})), &host)
        .unwrap();
    // Three records with an `idempotency_key`, as trail stores it: the second repeats the
    // first's key from the same uid (a repeat trail could not recognise: two ids), the third the key from another
    // uid.
    let mut batch = events(1..4);
    for (e, uid) in batch.iter_mut().zip([1000, 1000, 1001]) {
        let mut record: Value = serde_json::from_str(&e.line).unwrap();
        record["source"]["uid"] = json!(uid);
        record["idempotency_key"] = json!("order-17");
        e.line = record.to_string();
    }
    write(&mut sink, &batch).unwrap();
    sink.flush().into_result().unwrap();
    sink.close().into_result().unwrap();
    let stored = Reader::connect(&[server.url()], None).read_all("AUDIT");
    let ids: Vec<_> = stored.iter().map(|s| s.msg_id.clone().unwrap()).collect();
    assert_eq!(
        ids,
        ["app-1.example/1000/order-17", "app-1.example/1001/order-17"]
    );
    assert_eq!(stored[0].record["id"], json!(batch[0].id));
    assert_eq!(stored[1].record["id"], json!(batch[2].id));
}

#[test]
fn an_existing_stream_that_differs_is_an_error_that_names_the_setting() {
    let server = Server::start(Options::default());
    let reader = Reader::connect(&[server.url()], None);
    reader.create_stream("AUDIT", &["audit.>"], 1);
    let plugin = plugin();
    let host = TestHost::new("bus");
    let mut sink = plugin
        .new_sink(
            &config(
                vec![server.url()],
                json!({"stream": {"name": "AUDIT", "duplicate_window": "10m", "subjects": ["audit.>"]}}),
            ),
            &host,
        )
        .unwrap();
    let error = write(&mut sink, &events(1..3)).unwrap_err();
    assert_eq!(error.delivered, 0);
    expect_error(
        Err::<(), _>(error.error),
        ErrorKind::RETRYABLE,
        &[
            "stream AUDIT differs from the configuration: duplicate_window is 120s, the configuration says 600s",
        ],
    );
    assert_eq!(reader.count("AUDIT"), Some(0));

    // Naming a stream that does not exist, without create.
    let mut sink = plugin
        .new_sink(
            &config(vec![server.url()], json!({"stream": {"name": "OTHER"}})),
            &host,
        )
        .unwrap();
    let error = write(&mut sink, &events(1..3)).unwrap_err();
    expect_error(
        Err::<(), _>(error.error),
        ErrorKind::RETRYABLE,
        &[
            "stream OTHER does not exist: create it",
            "stream.create: true",
        ],
    );

    // No stream at all captures the subject.
    let mut sink = plugin
        .new_sink(
            &json!({"servers": server.url(), "subject": "elsewhere.{type}", "ack_timeout": "2s"})
                .to_string(),
            &host,
        )
        .unwrap();
    let error = write(&mut sink, &events(1..3)).unwrap_err();
    assert_eq!(error.delivered, 0);
    expect_error(
        Err::<(), _>(error.error),
        ErrorKind::RETRYABLE,
        &[
            "no stream captures subject elsewhere.role_granted",
            "event seq 1",
        ],
    );
    // The stream as given, checked only for what the configuration writes: accepted, delivered.
    let mut sink = plugin
        .new_sink(
            &config(
                vec![server.url()],
                json!({"stream": {"name": "AUDIT", "replicas": 1}}),
            ),
            &host,
        )
        .unwrap();
    write(&mut sink, &events(1..3)).unwrap();
    assert_eq!(reader.count("AUDIT"), Some(2));
}

#[test]
fn a_server_down_is_retried_and_delivery_resumes_when_it_is_back() {
    let mut server = Server::prepare(Options::default());
    let plugin = plugin();
    let host = TestHost::new("bus");
    let mut sink = plugin
        .new_sink(&config(vec![server.url()], json!({})), &host)
        .unwrap();
    let batch = events(1..201);
    let error = write(&mut sink, &batch).unwrap_err();
    assert_eq!(error.delivered, 0);
    expect_error(
        Err::<(), _>(error.error),
        ErrorKind::RETRYABLE,
        &[
            &format!("connecting to {}", server.url()),
            "is nats-server running there",
        ],
    );
    server.run();
    write(&mut sink, &batch[..100]).unwrap();
    // Killed while connected: the client reconnects on its own; writes fail until the server is back.
    server.kill();
    let error = write(&mut sink, &batch[100..]).unwrap_err();
    assert_eq!(error.error.kind, ErrorKind::RETRYABLE, "{error}");
    assert!(
        error
            .error
            .message
            .contains("no acknowledgement from the stream within 2s")
            || error.error.message.contains("the connection was lost"),
        "{error}"
    );
    server.run();
    let delivery = deliver(&mut sink, &batch[100..], 100);
    assert!(delivery.dead.is_empty(), "{delivery:?}");
    let reader = Reader::connect(&[server.url()], None);
    let ids: Vec<String> = reader
        .read_all("AUDIT")
        .into_iter()
        .map(|s| s.msg_id.unwrap())
        .collect();
    let expected: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, expected);
}

#[test]
fn credentials_user_password_and_token() {
    let server = Server::start(Options {
        auth: Auth::UserPassword,
        ..Options::default()
    });
    let plugin = plugin();
    let host = TestHost::new("bus");
    let mut sink = plugin
        .new_sink(
            &config(
                vec![server.url()],
                json!({"user": USER, "password": "wrong"}),
            ),
            &host,
        )
        .unwrap();
    let error = write(&mut sink, &events(1..3)).unwrap_err();
    expect_error(
        Err::<(), _>(error.error),
        ErrorKind::RETRYABLE,
        &["authorization violation", "check \"user\" and \"password\""],
    );
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("password");
    std::fs::write(&secret, format!("{PASSWORD}\n")).unwrap();
    let mut sink = plugin
        .new_sink(
            &config(
                vec![server.url()],
                json!({"user": USER, "password": {"file": secret}}),
            ),
            &host,
        )
        .unwrap();
    write(&mut sink, &events(1..3)).unwrap();
    assert_eq!(
        Reader::connect(&[server.url()], Some((USER, PASSWORD))).count("AUDIT"),
        Some(2)
    );

    let server = Server::start(Options {
        auth: Auth::Token("s3cret-token".into()),
        ..Options::default()
    });
    let mut sink = plugin
        .new_sink(&config(vec![server.url()], json!({})), &host)
        .unwrap();
    let error = write(&mut sink, &events(1..3)).unwrap_err();
    expect_error(
        Err::<(), _>(error.error),
        ErrorKind::RETRYABLE,
        &["authorization violation", "the server wants credentials"],
    );
    let mut sink = plugin
        .new_sink(
            &config(vec![server.url()], json!({"token": "s3cret-token"})),
            &host,
        )
        .unwrap();
    write(&mut sink, &events(1..3)).unwrap();
}

#[test]
fn tls_with_a_custom_ca_and_a_clear_error_for_the_wrong_one() {
    let ca = TestCa::new("trail test nats CA");
    let server = Server::start(Options {
        tls: Some(ca.server_pem()),
        ..Options::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let (right, wrong) = (dir.path().join("ca.pem"), dir.path().join("other-ca.pem"));
    std::fs::write(&right, &ca.pem).unwrap();
    std::fs::write(&wrong, &TestCa::new("someone else").pem).unwrap();
    let plugin = plugin();
    let host = TestHost::new("bus");
    let mut sink = plugin
        .new_sink(
            &config(vec![server.url()], json!({"tls": {"ca_file": wrong}})),
            &host,
        )
        .unwrap();
    let error = write(&mut sink, &events(1..3)).unwrap_err();
    expect_error(
        Err::<(), _>(error.error),
        ErrorKind::RETRYABLE,
        &["the server's certificate is not trusted", "\"tls.ca_file\""],
    );
    let mut sink = plugin
        .new_sink(
            &config(vec![server.url()], json!({"tls": {"ca_file": right}})),
            &host,
        )
        .unwrap();
    write(&mut sink, &events(1..3)).unwrap();
    let logs = host.logs().join("\n");
    assert!(
        logs.contains("over TLS trusting only the CAs of tls.ca_file"),
        "{logs}"
    );
}

#[test]
fn an_event_the_stream_can_never_take_is_a_permanent_error_for_it_alone() {
    let server = Server::start(Options::default());
    let plugin = plugin();
    let host = TestHost::new("bus");
    let mut sink = plugin
        .new_sink(&config(vec![server.url()], json!({})), &host)
        .unwrap();
    let mut batch = events(1..6);
    // Bigger than the server's max_payload (1 MB).
    batch[2].line = format!(r#"{{"seq":3,"pad":"{}"}}"#, "x".repeat(1 << 20));
    let delivery = deliver(&mut sink, &batch, 5);
    assert_eq!(delivery.dead.len(), 1, "{delivery:?}");
    assert_eq!(delivery.dead[0].0, 3);
    assert_eq!(delivery.dead[0].1.kind, ErrorKind::PERMANENT);
    assert!(
        delivery.dead[0]
            .1
            .message
            .contains("more than the server accepts in one message"),
        "{:?}",
        delivery.dead[0].1
    );
    assert_eq!(delivery.errors[0].delivered, 2);
    assert_eq!(
        Reader::connect(&[server.url()], None).count("AUDIT"),
        Some(4)
    );
}

/// A publish acknowledgement as JetStream writes it.
fn ack(seq: usize, duplicate: bool) -> String {
    if duplicate {
        format!(r#"{{"stream":"AUDIT","seq":{seq},"duplicate":true}}"#)
    } else {
        format!(r#"{{"stream":"AUDIT","seq":{seq}}}"#)
    }
}

const REFUSED: &str =
    r#"{"error":{"code":503,"err_code":10077,"description":"insufficient resources"}}"#;

/// A sink that publishes to `url` with no stream of its own: the test's [`Responder`] answers.
fn answered_by_the_test(
    plugin: &Plugin,
    url: &str,
    max_in_flight: usize,
    ack_timeout: &str,
) -> trail_plugin_api::SinkBox {
    let config = json!({
        "servers": url,
        "max_in_flight": max_in_flight,
        "ack_timeout": ack_timeout,
        "connect_timeout": "30s",
    });
    plugin
        .new_sink(&config.to_string(), &TestHost::new("bus"))
        .unwrap()
}

#[test]
fn acknowledgements_out_of_order_twice_or_for_no_record_confirm_each_record_once() {
    let server = Server::start(Options::default());
    let plugin = plugin();
    let mut sink = answered_by_the_test(&plugin, &server.url(), 50, "60s");
    let responder = Responder::start(&server.url(), "audit.>", |peer: &mut Peer| {
        let mut seen = Vec::new();
        for round in 0..4 {
            let window = peer.take(50);
            // The window is full: nothing more comes until something is acknowledged. (A wrong plugin may
            // also go unnoticed here, if it is slow; a right one never fails it.)
            assert!(
                peer.next_within(Duration::from_millis(200)).is_none(),
                "more than max_in_flight awaiting acknowledgement"
            );
            if round == 0 {
                // Answers to tokens no record of the write has: ignored.
                let inbox = window[0].reply.rsplit_once('.').unwrap().0;
                peer.answer(&format!("{inbox}.999999"), REFUSED);
                peer.answer(&format!("{inbox}.x"), REFUSED);
            }
            for (i, request) in window.iter().enumerate().rev() {
                peer.answer(&request.reply, &ack(round * 50 + i, false));
                // Again: the second answer, a duplicate or even a refusal, changes nothing.
                let again = if i % 2 == 0 {
                    ack(i, true)
                } else {
                    REFUSED.to_owned()
                };
                peer.answer(&request.reply, &again);
            }
            seen.extend(window);
        }
        seen
    });
    let batch = events(1..201);
    write(&mut sink, &batch).unwrap();
    let seen = responder.join();
    let ids: Vec<_> = seen.iter().map(|r| r.msg_id.clone().unwrap()).collect();
    let expected: Vec<_> = batch.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, expected);
    assert_eq!(seen[0].subject, "audit.app-1_example.role_granted");
    sink.close().into_result().unwrap();
}

#[test]
fn a_refusal_or_a_missing_acknowledgement_stops_the_write_there_and_late_answers_are_ignored() {
    let server = Server::start(Options::default());
    let plugin = plugin();
    let mut sink = answered_by_the_test(&plugin, &server.url(), 10, "2s");
    let responder = Responder::start(&server.url(), "audit.>", |peer: &mut Peer| {
        // Write 1: the 7th record is refused, the others acknowledged, last first.
        let first = peer.take(10);
        for (i, request) in first.iter().enumerate().rev() {
            let answer = if i == 6 {
                REFUSED.to_owned()
            } else {
                ack(i, false)
            };
            peer.answer(&request.reply, &answer);
        }
        // Write 2, from the refused record on: all but its first are acknowledged; it times out.
        let second = peer.take(10);
        for request in &second[1..] {
            peer.answer(&request.reply, &ack(0, false));
        }
        // Write 3, the same records again: the answers of the earlier writes come late, first, a refusal of
        // the record write 2 timed out on among them; then every record of this write is acknowledged.
        let mut third = peer.take(10);
        peer.answer(&second[0].reply, REFUSED);
        peer.answer(&first[6].reply, REFUSED);
        for request in &third {
            peer.answer(&request.reply, &ack(0, false));
        }
        let rest = peer.take(4);
        for request in &rest {
            peer.answer(&request.reply, &ack(0, false));
        }
        third.extend(rest);
        (first, second, third)
    });
    let batch = events(1..21);
    let error = write(&mut sink, &batch).unwrap_err();
    assert_eq!(error.delivered, 6, "{error}");
    expect_error(
        Err::<(), _>(error.error),
        ErrorKind::RETRYABLE,
        &[
            "the stream refused the event: insufficient resources (status 503, error 10077)",
            "event seq 7,",
        ],
    );
    let error = write(&mut sink, &batch[6..]).unwrap_err();
    assert_eq!(error.delivered, 0, "{error}");
    expect_error(
        Err::<(), _>(error.error),
        ErrorKind::RETRYABLE,
        &[
            "no acknowledgement from the stream within 2s (\"ack_timeout\")",
            "event seq 7,",
        ],
    );
    write(&mut sink, &batch[6..]).unwrap();
    let (first, second, third) = responder.join();
    let ids = |requests: &[Request]| -> Vec<String> {
        requests.iter().map(|r| r.msg_id.clone().unwrap()).collect()
    };
    let expected =
        |events: &[Event]| -> Vec<String> { events.iter().map(|e| e.id.clone()).collect() };
    assert_eq!(ids(&first), expected(&batch[..10]));
    assert_eq!(ids(&second), expected(&batch[6..16]));
    assert_eq!(ids(&third), expected(&batch[6..]));
    sink.close().into_result().unwrap();
}
