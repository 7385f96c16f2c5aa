//! The Rust client crate (`trail-client`) against the real daemon: typed answers, pipelining, retries.

use std::time::Duration;

use serde_json::json;
use trail_client::{Client, Error, Event, Outcome, Retry};

use crate::util::{Daemon, Setup, limit_file_size};

const STREAM_ONLY: &str = "name: stream_only\ndescription: streamed, and no sink selects it\nsaved_to_database: false\nstreamed: true\n";

fn daemon(extra_config: &str) -> Daemon {
    Daemon::with(Setup {
        extra_config: extra_config.into(),
        extra_types: vec![("stream_only.yml".into(), STREAM_ONLY.into())],
        ..Setup::default()
    })
}

#[test]
fn submit_returns_the_stored_records_id_and_seq() {
    let daemon = daemon("");
    let mut client = Client::connect(&daemon.socket).unwrap();
    let ack = client
        .submit(
            &Event::new("role_granted")
                .actor("u-42")
                .actor_field("ip", "10.0.0.7")
                .target("user", "u-7")
                .message("granted admin")
                .outcome(Outcome::Success)
                .payload(json!({"role": "admin"})),
        )
        .unwrap();
    assert!(!ack.duplicate);
    let records = daemon.records();
    let stored: Vec<_> = records
        .iter()
        .filter(|r| r["id"] == json!(ack.id))
        .collect();
    assert_eq!(stored.len(), 1, "{records:?}");
    assert_eq!(stored[0]["seq"], json!(ack.seq));
    assert_eq!(stored[0]["target"], json!({"type": "user", "id": "u-7"}));
    assert_eq!(stored[0]["payload"], json!({"role": "admin"}));
}

#[test]
fn each_error_code_is_its_own_variant_and_the_connection_stays_usable() {
    let daemon = daemon("limits: {max_line_bytes: 4096}\n");
    let mut client = Client::connect(&daemon.socket).unwrap();
    let mut deep = json!("bottom");
    for _ in 0..200 {
        deep = json!([deep]);
    }
    type IsVariant = fn(&Error) -> bool;
    let cases: Vec<(&str, Event, IsVariant)> = vec![
        (
            "invalid_json",
            Event::new("user_login").payload(json!({"deep": deep})),
            |e| matches!(e, Error::InvalidJson(_)),
        ),
        (
            "invalid_event",
            Event::new("user_login").field("colour", json!("red")),
            |e| matches!(e, Error::InvalidEvent(_)),
        ),
        ("unknown_type", Event::new("no_such_type_here"), |e| {
            matches!(e, Error::UnknownType(_))
        }),
        (
            "invalid_payload",
            Event::new("role_granted").payload(json!({"role": 7})),
            |e| matches!(e, Error::InvalidPayload(r) if !r.details.is_empty()),
        ),
        (
            "too_large",
            Event::new("user_login").message("x".repeat(5000)),
            |e| matches!(e, Error::TooLarge(_)),
        ),
        ("unavailable", Event::new("stream_only"), |e| {
            matches!(e, Error::Unavailable(_))
        }),
        ("forbidden", Event::new("trail_log_file_deleted"), |e| {
            matches!(e, Error::Forbidden(_))
        }),
    ];
    for (code, event, is_variant) in cases {
        let err = client.submit(&event).expect_err(code);
        assert!(is_variant(&err), "{code}: {err:?}");
        assert_eq!(err.code(), Some(code));
        assert!(!err.refusal().unwrap().message.is_empty(), "{code}");
        assert_eq!(err.is_retryable(), code == "unavailable", "{code}");
    }
    // conflict: the same key for another event; the same event again is a duplicate of the first.
    let keyed = |actor: &str| {
        Event::new("user_logout")
            .actor(actor)
            .idempotency_key("conflict-1")
    };
    let first = client.submit(&keyed("a")).unwrap();
    let err = client.submit(&keyed("b")).unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(err.code(), Some("conflict"));
    assert!(!err.is_retryable());
    let again = client.submit(&keyed("a")).unwrap();
    assert!(
        again.duplicate && again.id == first.id && again.seq == first.seq,
        "{again:?}"
    );
    client
        .submit(&Event::new("user_logout").actor("u-42"))
        .unwrap();
}

#[test]
fn a_full_daemon_is_too_many_connections_and_a_missing_one_unreachable() {
    let daemon = daemon("limits: {max_connections: 1}\n");
    // Held once acknowledged: the daemon then counts this connection. The harness's readiness probe may still
    // hold the only place for a moment, so the first tries may be turned away.
    let mut holder = None;
    assert!(crate::util::wait_until(Duration::from_secs(30), || {
        let mut c = Client::connect(&daemon.socket).unwrap();
        let acked = c.submit(&Event::new("user_logout")).is_ok();
        if acked {
            holder = Some(c);
        }
        acked
    }));
    let err = Client::connect(&daemon.socket)
        .unwrap()
        .submit(&Event::new("user_logout"))
        .unwrap_err();
    assert!(matches!(err, Error::TooManyConnections(_)), "{err:?}");
    assert!(err.is_retryable());
    let err = Client::connect(&daemon.path("nobody.sock")).err().unwrap();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("nobody.sock"), "{err}");
}

#[test]
fn submit_many_pipelines_a_large_batch_in_order() {
    let daemon = daemon("");
    let mut client = Client::connect(&daemon.socket).unwrap();
    // Far more than the daemon reads before it waits for its answers to be taken.
    let events: Vec<Event> = (0..20_000)
        .map(|i| {
            if i % 1000 == 999 {
                Event::new("no_such_type_here")
            } else {
                Event::new("user_logout").actor(format!("u-{i}"))
            }
        })
        .collect();
    let results = client.submit_many(&events).unwrap();
    assert_eq!(results.len(), events.len());
    let mut last = 0;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(ack) => {
                assert!(i % 1000 != 999 && ack.seq > last, "{i}: {r:?}");
                last = ack.seq;
            }
            Err(e) => assert!(
                i % 1000 == 999 && matches!(e, Error::UnknownType(_)),
                "{i}: {e:?}"
            ),
        }
    }
}

#[test]
fn the_async_client_submits_and_gets_typed_errors() {
    let daemon = daemon("");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = trail_client::tokio::Client::connect(&daemon.socket)
            .await
            .unwrap();
        let ack = client
            .submit(&Event::new("user_logout").actor("u-1"))
            .await
            .unwrap();
        let err = client
            .submit(&Event::new("no_such_type_here"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::UnknownType(_)), "{err:?}");
        let events: Vec<Event> = (0..5000)
            .map(|i| Event::new("user_logout").actor(format!("a-{i}")))
            .collect();
        let results = client.submit_many(&events).await.unwrap();
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Ok(a) if a.seq > ack.seq))
        );
    });
}

#[test]
fn retries_of_unavailable_on_a_full_disk_store_each_event_exactly_once() {
    let daemon = daemon("");
    let mut client = Client::connect(&daemon.socket).unwrap();
    client
        .submit(&Event::new("user_logout").actor("before"))
        .unwrap();
    let log = daemon.log_dir.join(
        std::fs::read_dir(&daemon.log_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".jsonl"))
            .max()
            .unwrap(),
    );
    limit_file_size(&daemon, std::fs::metadata(&log).unwrap().len());
    let refused = client
        .submit(&Event::new("user_logout").actor("refused"))
        .unwrap_err();
    assert!(matches!(refused, Error::Unavailable(_)), "{refused:?}");
    // Every event carries its key from the first attempt on; the first attempt is refused while the disk is full.
    let events: Vec<Event> = (0..50)
        .map(|i| {
            Event::new("user_logout")
                .actor(format!("r-{i}"))
                .idempotency_key(format!("full-disk-{i}"))
        })
        .collect();
    let first = client.submit_many(&events).unwrap();
    assert!(
        first
            .iter()
            .all(|r| matches!(r, Err(Error::Unavailable(_)))),
        "{first:?}"
    );
    let socket = daemon.socket.clone();
    let sender = std::thread::spawn(move || {
        let mut client = Client::connect(&socket)
            .unwrap()
            .with_retry(Retry::for_at_most(Duration::from_secs(120)));
        client.submit_many(&events).unwrap()
    });
    // The daemon's own standard error is a file under the same limit, so nothing shows when the retries are
    // refused; the space comes back while the retrying client runs, or before its first attempt.
    limit_file_size(&daemon, libc::RLIM_INFINITY);
    let results = sender.join().unwrap();
    let acks: Vec<_> = results.iter().map(|r| r.as_ref().unwrap()).collect();
    let records = daemon.records();
    let mut stored: Vec<String> = records
        .iter()
        .filter(|r| {
            r["actor"]["id"]
                .as_str()
                .is_some_and(|a| a.starts_with("r-"))
        })
        .map(|r| r["actor"]["id"].as_str().unwrap().to_owned())
        .collect();
    stored.sort();
    let mut expected: Vec<String> = (0..50).map(|i| format!("r-{i}")).collect();
    expected.sort();
    assert_eq!(stored, expected, "each event stored exactly once");
    for ack in acks {
        assert_eq!(
            records.iter().filter(|r| r["id"] == json!(ack.id)).count(),
            1
        );
    }
    assert!(!records.iter().any(|r| r["actor"]["id"] == json!("refused")));
}
