//! The nats plugin end to end: the real daemon loads it and publishes to real `nats-server` processes started by
//! the test (the plugin's own harness, `plugins/nats/tests/support/server.rs`): one server, or a 3-node JetStream
//! cluster with a 3-replica stream. What arrived is read back by a JetStream consumer.

#[path = "../plugins/nats/tests/support/server.rs"]
mod server;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use self::server::{Auth, Cluster, Options, Reader, Server, Stored, USER};
use crate::util::{Daemon, Setup, login, one_sink_daemon, search_types, wait_until};

/// Generous: the machine may be busy building.
const DEADLINE: Duration = Duration::from_secs(90);

/// A daemon on host `host-a` whose sink `bus` sends the event types `types` to NATS with `config`.
fn daemon(config: &Value, types: &str, setup: Setup) -> Daemon {
    one_sink_daemon(("bus", "nats", "trail-sink-nats"), config, types, setup)
}

/// The sink's configuration: `urls`, stream `AUDIT` created with `replicas`, short timeouts.
fn sink_config(urls: Vec<String>, replicas: usize) -> Value {
    json!({
        "servers": urls,
        "stream": {"name": "AUDIT", "create": true, "replicas": replicas},
        "ack_timeout": "2s",
        "connect_timeout": "2s",
    })
}

fn sink_status(daemon: &Daemon) -> Value {
    daemon.admin(json!({"command": "status"}))["sinks"][0].clone()
}

#[track_caller]
fn wait_for_messages(reader: &Reader, daemon: &Daemon, n: u64, logs: &dyn Fn() -> String) {
    let ok = wait_until(DEADLINE, || reader.count("AUDIT").is_some_and(|c| c >= n));
    assert!(
        ok,
        "{:?} messages, expected {n}; status {}\n{}\n{}",
        reader.count("AUDIT"),
        daemon.admin(json!({"command": "status"})),
        daemon.stderr(),
        logs()
    );
}

/// Emits logins one after another until told to stop (or `limit`), counting those acknowledged and keeping their ids.
struct Emitter {
    acked: Arc<AtomicU64>,
    ids: Arc<Mutex<BTreeSet<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Emitter {
    fn start(daemon: &Daemon, limit: u64) -> Self {
        let (acked, ids, stop) = (Arc::default(), Arc::default(), Arc::<AtomicBool>::default());
        let mut c = daemon.client();
        let thread = {
            let (acked, ids, stop): (Arc<AtomicU64>, Arc<Mutex<BTreeSet<String>>>, _) =
                (Arc::clone(&acked), Arc::clone(&ids), Arc::clone(&stop));
            std::thread::spawn(move || {
                for i in 0..limit {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let answer = c.emit(&login(&i.to_string())).unwrap();
                    assert_eq!(answer["ok"], json!(true), "{answer}");
                    ids.lock()
                        .unwrap()
                        .insert(answer["id"].as_str().unwrap().to_owned());
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Self {
            acked,
            ids,
            stop,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until `more` events beyond those acknowledged now are acknowledged.
    #[track_caller]
    fn wait_for_more(&self, more: u64) {
        let target = self.acked() + more;
        assert!(
            wait_until(DEADLINE, || self.acked() >= target),
            "the daemon stopped acknowledging: {} of {target}",
            self.acked()
        );
    }

    /// Stops, and returns the ids of every event acknowledged.
    fn finish(mut self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.ids.lock().unwrap())
    }
}

/// Asserts that the stream holds each of `ids` exactly once, and nothing else.
#[track_caller]
fn assert_exactly_once(reader: &Reader, ids: &BTreeSet<String>) {
    let stored = reader.read_all("AUDIT");
    let stored_ids: Vec<String> = stored.iter().map(|s| s.msg_id.clone().unwrap()).collect();
    let distinct: BTreeSet<String> = stored_ids.iter().cloned().collect();
    assert_eq!(stored_ids.len(), distinct.len(), "duplicates in the stream");
    assert_eq!(
        &distinct, ids,
        "the stream holds other events than were acknowledged"
    );
    for s in &stored {
        assert_eq!(s.record["id"].as_str(), s.msg_id.as_deref());
    }
}

#[test]
fn a_consumer_of_the_stream_sees_what_trail_search_finds() {
    let server = Server::start(Options::default());
    let daemon = daemon(
        &sink_config(vec![server.url()], 1),
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
    let mut streamed = Vec::new();
    for i in 0..60 {
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
        if i % 4 != 2 {
            streamed.push(answer["id"].as_str().unwrap().to_owned());
        }
    }
    let reader = Reader::connect(&[server.url()], None);
    wait_for_messages(&reader, &daemon, 45, &|| server.log());
    let stored = reader.read_all("AUDIT");
    // In order, each once, with its id as Nats-Msg-Id and a subject from the default template.
    let ids: Vec<String> = stored.iter().map(|s| s.msg_id.clone().unwrap()).collect();
    assert_eq!(ids, streamed);
    for s in &stored {
        let ty = s.record["type"].as_str().unwrap();
        assert_eq!(s.subject, format!("audit.host-a.{ty}"));
    }

    // What trail search finds on the host, record for record.
    let found = search_types(&daemon, &["user_login", "role_granted"]);
    assert_eq!(found.len(), 30);
    let saved: Vec<Value> = stored
        .iter()
        .filter(|s| s.record["type"] != "stream_only")
        .map(|s| s.record.clone())
        .collect();
    assert_eq!(saved, found);
    assert!(
        stored
            .iter()
            .filter(|s| s.record["type"] == "stream_only")
            .all(|s| s.record.get("hash").is_none())
    );
    assert_eq!(sink_status(&daemon)["delivered"], json!(45));

    // README's consumers ("Fleet"), as written there.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let consumer = |mentions: &str| -> Value {
        let line = readme
            .lines()
            .find(|l| l.starts_with("{\"deliver_policy\"") && l.contains(mentions))
            .unwrap_or_else(|| panic!("README lacks a consumer with {mentions:?}"));
        serde_json::from_str(line).unwrap()
    };
    let mut last_hour = consumer("by_start_time");
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    last_hour["opt_start_time"] =
        json!(hour_ago.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let actor: Vec<Stored> = reader
        .consume("AUDIT", last_hour)
        .into_iter()
        .filter(|s| s.record["actor"]["id"] == "u-42")
        .collect();
    assert_eq!(actor.len(), 15, "the logins of u-42");
    let last: Vec<String> = reader
        .consume("AUDIT", consumer("last_per_subject"))
        .into_iter()
        .map(|s| s.subject)
        .collect();
    assert_eq!(
        last,
        [
            "audit.host-a.role_granted",
            "audit.host-a.stream_only",
            "audit.host-a.user_login"
        ]
    );
}

#[test]
fn every_event_arrives_once_across_a_server_restart_under_load() {
    let mut server = Server::start(Options::default());
    let daemon = daemon(
        &sink_config(vec![server.url()], 1),
        "[user_login]",
        Setup {
            fsync: "never",
            ..Setup::default()
        },
    );
    let reader = Reader::connect(&[server.url()], None);
    let emitter = Emitter::start(&daemon, 1_000_000);
    wait_for_messages(&reader, &daemon, 300, &|| server.log());
    server.stop();
    // Events go on being acknowledged, and wait in the spool.
    emitter.wait_for_more(300);
    assert!(
        wait_until(DEADLINE, || sink_status(&daemon)["retries"].as_u64()
            > Some(0)),
        "{}",
        sink_status(&daemon)
    );
    server.run();
    emitter.wait_for_more(300);
    let ids = emitter.finish();
    drop(reader);
    let reader = Reader::connect(&[server.url()], None);
    wait_for_messages(&reader, &daemon, ids.len() as u64, &|| server.log());
    assert_exactly_once(&reader, &ids);
}

#[test]
fn a_three_node_cluster_loses_nothing_when_one_node_dies_and_catches_up_after_two() {
    let mut cluster = Cluster::start();
    let daemon = daemon(
        &sink_config(cluster.urls(), 3),
        "[user_login]",
        Setup {
            fsync: "never",
            ..Setup::default()
        },
    );
    let reader = Reader::connect(&cluster.urls(), None);
    let emitter = Emitter::start(&daemon, 1_000_000);
    wait_for_messages(&reader, &daemon, 300, &|| cluster.logs());
    assert_eq!(reader.config("AUDIT")["replicas"], json!(3));

    // One node dies: delivery continues, through the other two.
    cluster.servers[0].kill();
    let at_kill = sink_status(&daemon)["delivered"].as_u64().unwrap();
    assert!(
        wait_until(DEADLINE, || sink_status(&daemon)["delivered"]
            .as_u64()
            .unwrap()
            >= at_kill + 500),
        "delivery did not continue with one node down: {}\n{}",
        sink_status(&daemon),
        cluster.logs()
    );

    // A second one dies: no quorum, delivery stalls, clients are still acknowledged.
    cluster.servers[1].kill();
    assert!(
        wait_until(DEADLINE, || sink_status(&daemon)["last_error"].is_string()),
        "{}",
        sink_status(&daemon)
    );
    let stalled = sink_status(&daemon)["delivered"].as_u64().unwrap();
    emitter.wait_for_more(300);
    let status = sink_status(&daemon);
    assert_eq!(status["delivered"].as_u64().unwrap(), stalled, "{status}");
    assert!(status["backlog_bytes"].as_u64() > Some(0), "{status}");

    // Both come back: everything acknowledged arrives, once.
    cluster.servers[0].run();
    cluster.servers[1].run();
    emitter.wait_for_more(300);
    let ids = emitter.finish();
    wait_for_messages(&reader, &daemon, ids.len() as u64, &|| cluster.logs());
    assert_exactly_once(&reader, &ids);
}

#[test]
fn trail_starts_with_the_server_down_and_catches_up() {
    let mut server = Server::prepare(Options::default());
    let daemon = daemon(
        &sink_config(vec![server.url()], 1),
        "[user_login]",
        Setup::default(),
    );
    let mut c = daemon.client();
    for i in 0..20 {
        assert_eq!(c.emit(&login(&i.to_string())).unwrap()["ok"], json!(true));
    }
    let down = |s: &Value| {
        s["last_error"].as_str().is_some_and(|e| {
            e.contains(&format!("connecting to {}", server.url()))
                && e.contains("is nats-server running there")
        })
    };
    assert!(
        wait_until(DEADLINE, || down(&sink_status(&daemon))),
        "{}",
        sink_status(&daemon)
    );
    server.run();
    let reader = Reader::connect(&[server.url()], None);
    wait_for_messages(&reader, &daemon, 20, &|| server.log());
    assert!(
        wait_until(DEADLINE, || sink_status(&daemon)["last_error"].is_null()),
        "{}",
        sink_status(&daemon)
    );
}

#[test]
fn wrong_credentials_show_in_the_log_and_status_while_events_wait_in_the_spool() {
    let options = Options {
        auth: Auth::UserPassword,
        ..Options::default()
    };
    let server = Server::start(options);
    let mut config = sink_config(vec![server.url()], 1);
    config["user"] = json!(USER);
    config["password"] = json!("not-the-password");
    let daemon = daemon(&config, "[user_login]", Setup::default());
    let mut c = daemon.client();
    for i in 0..10 {
        assert_eq!(c.emit(&login(&i.to_string())).unwrap()["ok"], json!(true));
    }
    let refused = "authorization violation: check \"user\" and \"password\"";
    assert!(
        wait_until(DEADLINE, || daemon.stderr().contains(refused)),
        "{}",
        daemon.stderr()
    );
    let status = sink_status(&daemon);
    assert!(
        status["last_error"].as_str().unwrap().contains(refused),
        "{status}"
    );
    assert_eq!(status["delivered"], json!(0));
    assert!(status["backlog_bytes"].as_u64() > Some(0), "{status}");
    // The server is given the password the sink has: everything that waited arrives.
    server.reconfigure(&Options {
        auth: Auth::Password("not-the-password".into()),
        ..Options::default()
    });
    let reader = Reader::connect(&[server.url()], Some((USER, "not-the-password")));
    wait_for_messages(&reader, &daemon, 10, &|| server.log());
}

#[test]
fn a_server_certificate_from_another_ca_shows_in_the_log_and_status() {
    let ca = trail_plugin_testkit::tls::TestCa::new("trail test nats CA");
    let server = Server::start(Options {
        tls: Some(ca.server_pem()),
        ..Options::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(
        &other,
        trail_plugin_testkit::tls::TestCa::new("someone else").pem,
    )
    .unwrap();
    let mut config = sink_config(vec![server.url()], 1);
    config["tls"] = json!({"ca_file": other});
    let daemon = daemon(&config, "[user_login]", Setup::default());
    let mut c = daemon.client();
    assert_eq!(c.emit(&login("x")).unwrap()["ok"], json!(true));
    let untrusted =
        "the server's certificate is not trusted: give the CA that signed it in \"tls.ca_file\"";
    assert!(
        wait_until(DEADLINE, || daemon.stderr().contains(untrusted)),
        "{}",
        daemon.stderr()
    );
    let status = sink_status(&daemon);
    assert!(
        status["last_error"].as_str().unwrap().contains(untrusted),
        "{status}"
    );
    assert_eq!(status["delivered"], json!(0));
}
