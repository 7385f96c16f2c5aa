//! Sinks end to end: the real daemon loads real plugin libraries and delivers to them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{
    Client, Daemon, Setup, login, plugins, recorded, trail, wait_recorded, wait_until,
};

/// One entry of the `sinks` list.
pub(crate) fn sink(name: &str, plugin: &str, types: &str, config: &str) -> String {
    format!(
        "  - name: {name}\n    plugin: {plugin}\n    events: {{types: {types}}}\n    config: {config}\n    \
         batch: {{max_events: 100, max_wait: 10ms}}\n    retry: {{initial: 10ms, max: 40ms}}\n"
    )
}

pub(crate) fn with_sinks(sinks: &[String], plugins: &[(&str, &str)], extra: &str) -> Setup {
    Setup {
        extra_config: format!("plugins_dir: plugins\n{extra}sinks:\n{}", sinks.concat()),
        plugins: plugins
            .iter()
            .map(|(package, name)| (plugins::library(package), name.to_string()))
            .collect(),
        ..Setup::default()
    }
}

fn event(ty: &str, message: &str) -> Value {
    match ty {
        "role_granted" => json!({"type": ty, "message": message, "payload": {"role": "admin"}}),
        _ => json!({"type": ty, "message": message}),
    }
}

/// Emits logins with messages `0`, `1`, … `n - 1`; every one must be accepted. Returns the answers.
fn emit_logins(c: &mut Client, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let answer = c.emit(&login(&i.to_string())).unwrap();
            assert_eq!(answer["ok"], json!(true), "{answer}");
            answer
        })
        .collect()
}

fn seqs(lines: &[Value]) -> Vec<u64> {
    lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect()
}

#[test]
fn events_reach_the_sinks_their_filters_select_in_order() {
    let daemon = Daemon::with(with_sinks(
        &[
            sink(
                "logins",
                "recorder",
                "['user_*']",
                "{path: $DIR/logins.jsonl, mark: a}",
            ),
            sink(
                "privilege",
                "recorder",
                "['role_*', project_deleted]",
                "{path: $DIR/privilege.jsonl, mark: b}",
            ),
            sink(
                "everything",
                "line-file",
                "['*']",
                "{path: $DIR/everything.log, prefix: 'audit: '}",
            ),
        ],
        &[
            ("trail-test-recorder", "librecorder.so"),
            ("trail-sink-template", "libtemplate.so"),
        ],
        "",
    ));
    let mut c = daemon.client();
    let mut sent: Vec<(String, u64)> = Vec::new();
    for i in 0..60 {
        let ty = [
            "user_login",
            "role_granted",
            "project_deleted",
            "user_logout",
            "config_changed",
        ][i % 5];
        let mut e = event(ty, &i.to_string());
        if ty == "config_changed" {
            e["payload"] = json!({"setting": "x"});
        }
        let a = c.emit(&e).unwrap();
        assert_eq!(a["ok"], json!(true), "{a}");
        sent.push((ty.to_string(), a["seq"].as_u64().unwrap()));
    }
    let want = |f: &dyn Fn(&str) -> bool| -> Vec<u64> {
        sent.iter().filter(|(t, _)| f(t)).map(|(_, s)| *s).collect()
    };
    let logins = want(&|t| t.starts_with("user_") && t != "user_logout");
    let privilege = want(&|t| t == "role_granted" || t == "project_deleted");
    // user_logout is not streamed (saved only), so no sink gets it.
    let a = wait_recorded(&daemon.path("logins.jsonl"), logins.len());
    assert_eq!(seqs(&a), logins);
    assert!(
        a.iter()
            .all(|l| l["mark"] == json!("a") && l["type"] == json!("user_login"))
    );
    let b = wait_recorded(&daemon.path("privilege.jsonl"), privilege.len());
    assert_eq!(seqs(&b), privilege);
    let everything_expected = want(&|t| t != "user_logout");
    // The template's file also holds the daemon's own (streamed) plugin-loaded events: keep the client's.
    let template = || -> Vec<u64> {
        std::fs::read_to_string(daemon.path("everything.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let record: Value =
                    serde_json::from_str(l.strip_prefix("audit: ").unwrap()).unwrap();
                record["seq"].as_u64().unwrap()
            })
            .filter(|s| everything_expected.contains(s))
            .collect()
    };
    let mut mine = Vec::new();
    let ok = wait_until(Duration::from_secs(30), || {
        mine = template();
        mine.len() >= everything_expected.len()
    });
    assert!(ok, "{mine:?}");
    assert_eq!(mine, everything_expected);
    let status = daemon.admin(json!({"command": "status"}));
    assert_eq!(status["ok"], json!(true));
    let names: Vec<&str> = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["line-file", "recorder"]);
    // The daemon recorded its own plugin loads.
    let loads: Vec<Value> = daemon
        .records()
        .into_iter()
        .filter(|r| r["type"] == json!("trail_plugin_loaded"))
        .collect();
    assert_eq!(loads.len(), 2, "{loads:?}");
    assert_eq!(loads[0]["source"]["pid"], json!(daemon.pid()));
}

#[test]
fn a_failing_sink_retries_and_finally_delivers() {
    let daemon = Daemon::with(with_sinks(
        &[
            sink(
                "flaky",
                "flaky",
                "['user_login']",
                "{path: $DIR/flaky.jsonl, fail_times: 5}",
            ),
            sink(
                "steady",
                "recorder",
                "['user_login']",
                "{path: $DIR/steady.jsonl}",
            ),
        ],
        &[
            ("trail-test-flaky", "libflaky.so"),
            ("trail-test-recorder", "librecorder.so"),
        ],
        "",
    ));
    let mut c = daemon.client();
    let acked = seqs(&emit_logins(&mut c, 20));
    assert_eq!(seqs(&wait_recorded(&daemon.path("flaky.jsonl"), 20)), acked);
    assert_eq!(
        seqs(&wait_recorded(&daemon.path("steady.jsonl"), 20)),
        acked
    );
    // The recorder's file fills during the write; the counters move once the write and flush returned.
    let mut status = Value::Null;
    let counted = wait_until(Duration::from_secs(30), || {
        status = daemon.admin(json!({"command": "status"}));
        status["sinks"][0]["delivered"] == json!(20)
    });
    assert!(counted, "{status}");
    let flaky = &status["sinks"][0];
    assert_eq!(flaky["name"], json!("flaky"));
    assert!(flaky["retries"].as_u64().unwrap() >= 5, "{status}");
    assert_eq!(flaky["last_error"], Value::Null);
}

#[test]
fn permanent_failures_are_dead_lettered_and_replayed() {
    let flaky = |extra: &str| {
        sink(
            "picky",
            "flaky",
            "['user_login']",
            &format!("{{path: $DIR/picky.jsonl{extra}}}"),
        )
    };
    let mut daemon = Daemon::with(with_sinks(
        &[flaky(", permanent: true, reject: poison")],
        &[("trail-test-flaky", "libflaky.so")],
        "",
    ));
    let mut c = daemon.client();
    let messages = ["a", "poison-1", "b", "c", "poison-2", "d"];
    let acked: Vec<u64> = messages
        .iter()
        .map(|m| c.emit(&login(m)).unwrap()["seq"].as_u64().unwrap())
        .collect();
    let delivered = wait_recorded(&daemon.path("picky.jsonl"), 4);
    assert_eq!(seqs(&delivered), [acked[0], acked[2], acked[3], acked[5]]);
    let dead_file = daemon.path("spool/dead/picky.jsonl");
    assert!(wait_until(Duration::from_secs(30), || recorded(&dead_file)
        .len()
        == 2));
    let dead = recorded(&dead_file);
    assert_eq!(dead[0]["seq"], json!(acked[1]));
    assert_eq!(dead[0]["error_kind"], json!("permanent"));
    assert!(
        dead[0]["error"].as_str().unwrap().contains("rejected"),
        "{}",
        dead[0]
    );
    assert_eq!(dead[0]["record"]["message"], json!("poison-1"));
    // The operator fixes the sink's configuration, restarts, and replays.
    drop(c);
    assert!(daemon.stop().success());
    let config = std::fs::read_to_string(&daemon.config)
        .unwrap()
        .replace(", permanent: true, reject: poison", "");
    std::fs::write(&daemon.config, config).unwrap();
    daemon.spawn();
    let admin = daemon.path("admin.sock");
    let (code, out, err) = trail(
        &["replay", "picky", "--admin-socket", admin.to_str().unwrap()],
        "",
    );
    assert_eq!(code, 0, "{out}{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (answer["delivered"].as_u64(), answer["failed"].as_u64()),
        (Some(2), Some(0))
    );
    let all = wait_recorded(&daemon.path("picky.jsonl"), 6);
    assert_eq!(seqs(&all[4..]), [acked[1], acked[4]]);
    assert!(recorded(&dead_file).is_empty());
}

#[test]
fn a_panicking_plugin_does_not_stop_the_daemon_or_the_other_sinks() {
    let daemon = Daemon::with(with_sinks(
        &[
            sink("boom", "panicker", "['user_login']", "{panic_in: write}"),
            sink(
                "steady",
                "recorder",
                "['user_login']",
                "{path: $DIR/steady.jsonl}",
            ),
        ],
        &[
            ("trail-test-panicker", "libpanicker.so"),
            ("trail-test-recorder", "librecorder.so"),
        ],
        "",
    ));
    let mut c = daemon.client();
    for i in 0..10 {
        assert_eq!(c.emit(&login(&i.to_string())).unwrap()["ok"], json!(true));
    }
    wait_recorded(&daemon.path("steady.jsonl"), 10);
    let panics = wait_until(Duration::from_secs(30), || {
        daemon.admin(json!({"command": "status"}))["sinks"][0]["panics"]
            .as_u64()
            .unwrap()
            >= 3
    });
    assert!(panics, "the panicking sink is retried on fresh instances");
    let status = daemon.admin(json!({"command": "status"}));
    assert!(
        status["sinks"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("panicked"),
        "{status}"
    );
    assert_eq!(c.emit(&login("still alive")).unwrap()["ok"], json!(true));
}

/// One sink, `slow`, whose plugin fails every write until [`unstick`] restarts the daemon without that.
fn stuck_sink() -> Setup {
    with_sinks(
        &[sink(
            "slow",
            "flaky",
            "['user_login']",
            "{path: $DIR/slow.jsonl, fail_times: 1000000}",
        )],
        &[("trail-test-flaky", "libflaky.so")],
        "",
    )
}

/// Starts the stopped daemon of [`stuck_sink`] again with a plugin configuration that delivers.
fn unstick(daemon: &mut Daemon) {
    let config = std::fs::read_to_string(&daemon.config)
        .unwrap()
        .replace(", fail_times: 1000000", "");
    std::fs::write(&daemon.config, config).unwrap();
    daemon.spawn();
}

#[test]
fn restart_mid_delivery_redelivers_what_was_not_confirmed() {
    let mut daemon = Daemon::with(stuck_sink());
    let mut c = daemon.client();
    let acked = seqs(&emit_logins(&mut c, 50));
    // The sink cannot deliver; crash the daemon with everything pending.
    drop(c);
    daemon.kill9();
    unstick(&mut daemon);
    let got = wait_recorded(&daemon.path("slow.jsonl"), 50);
    assert_eq!(seqs(&got)[..50], acked[..]);
}

#[test]
fn a_sink_that_falls_behind_reads_the_log_and_retention_waits_for_it() {
    let mut setup = stuck_sink();
    setup.log = Some("max_file_bytes: 4096, compress: true, retention_bytes: 6000".into());
    let mut daemon = Daemon::with(setup);
    let mut c = daemon.client();
    let answers = emit_logins(&mut c, 60);
    let acked = seqs(&answers);
    drop(c);
    // Retention wants the oldest files gone, but the sink has not confirmed their records: they stay.
    let kept = wait_until(Duration::from_secs(30), || {
        daemon
            .stderr()
            .contains("an expired log file is kept: a sink has not confirmed")
    });
    assert!(kept, "{}", daemon.stderr());
    let first_file = |daemon: &Daemon| {
        std::fs::read_dir(&daemon.log_dir).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .contains("-00000000000000000001.jsonl")
        })
    };
    assert!(first_file(&daemon));
    assert!(!daemon.stderr().contains("deleted an expired log file"));
    // With a plugin that works, the sink gets everything, in order, from the log (compressed files included),
    // since the spool only refers to records that are in the log.
    assert!(daemon.stop().success());
    unstick(&mut daemon);
    let got = wait_recorded(&daemon.path("slow.jsonl"), 60);
    assert_eq!(seqs(&got)[..60], acked[..]);
    for (record, answer) in got.iter().zip(&answers) {
        assert_eq!(
            (&record["id"], &record["type"]),
            (&answer["id"], &json!("user_login"))
        );
    }
    assert!(!daemon.stderr().contains("missing from the log"));
    // Once the sink has confirmed them, the next upkeep (after a rotation) deletes the expired files.
    let deleted = wait_until(Duration::from_secs(30), || {
        daemon.client().emit(&login("more")).unwrap();
        !first_file(&daemon)
    });
    assert!(deleted, "{}", daemon.stderr());
}

#[test]
fn a_full_spool_makes_clients_wait_and_loses_nothing() {
    let stuck = Arc::new(AtomicBool::new(true));
    let daemon = Daemon::with(with_sinks(
        &[sink(
            "gate",
            "flaky",
            "['user_login']",
            "{path: $DIR/gate.jsonl, fail_times: 40}",
        )],
        &[("trail-test-flaky", "libflaky.so")],
        "spool: {max_bytes: 16KiB}\n",
    ));
    let acked = Arc::new(AtomicU64::new(0));
    let stream = UnixStream::connect(&daemon.socket).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let n = 2_000u64;
    let sender = std::thread::spawn(move || {
        for i in 0..n {
            let mut line = serde_json::to_vec(&login(&i.to_string())).unwrap();
            line.push(b'\n');
            writer.write_all(&line).unwrap();
        }
    });
    let reader = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().take(n as usize) {
                let a: Value = serde_json::from_str(&line.unwrap()).unwrap();
                assert_eq!(a["ok"], json!(true), "{a}");
                acked.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // While the sink fails, the spool fills and acknowledgements stop well short of everything.
    let mut max_backlog = 0;
    let done = wait_until(Duration::from_secs(60), || {
        let status = daemon.admin(json!({"command": "status"}));
        max_backlog = max_backlog.max(status["spool"]["backlog_bytes"].as_u64().unwrap());
        if status["sinks"][0]["delivered"].as_u64().unwrap() == 0 {
            assert!(
                acked.load(Ordering::Relaxed) < n / 2,
                "clients were not held back"
            );
        } else {
            stuck.store(false, Ordering::Relaxed);
        }
        acked.load(Ordering::Relaxed) == n
    });
    assert!(
        done,
        "only {} of {n} acknowledged",
        acked.load(Ordering::Relaxed)
    );
    assert!(!stuck.load(Ordering::Relaxed));
    sender.join().unwrap();
    reader.join().unwrap();
    // An empty spool takes one connection read's records whatever their size (else a large read could never be
    // stored): 64 KiB of short requests become up to about 5 times as many bytes of stamped, hashed records.
    assert!(
        max_backlog <= (16 << 10) + 5 * (64 << 10) + (64 << 10),
        "backlog {max_backlog} is not bounded"
    );
    let got = wait_recorded(&daemon.path("gate.jsonl"), n as usize);
    // seq 1 is the daemon's start record, seq 2 its own plugin-loaded event.
    assert_eq!(seqs(&got), (3..=n + 2).collect::<Vec<_>>());
}

#[test]
fn drop_oldest_skips_and_audits_instead_of_waiting() {
    let daemon = Daemon::with(with_sinks(
        &[sink(
            "lossy",
            "flaky",
            "['user_login']",
            "{path: $DIR/lossy.jsonl, fail_times: 1000000}",
        )],
        &[("trail-test-flaky", "libflaky.so")],
        "spool: {max_bytes: 4KiB, when_full: drop_oldest}\n",
    ));
    let mut input = Vec::new();
    for i in 0..200 {
        serde_json::to_writer(&mut input, &login(&i.to_string())).unwrap();
        input.push(b'\n');
    }
    let mut out = Vec::new();
    let tally =
        trail::client::pipeline(&daemon.socket, std::io::Cursor::new(input), &mut out).unwrap();
    assert_eq!(tally.accepted, 200, "nobody waits with drop_oldest");
    let dropped = wait_until(Duration::from_secs(30), || {
        daemon.admin(json!({"command": "status"}))["sinks"][0]["dropped"]
            .as_u64()
            .unwrap()
            > 0
    });
    assert!(dropped);
    let audited = wait_until(Duration::from_secs(30), || {
        daemon.records().iter().any(|r| {
            r["type"] == json!("trail_sink_events_dropped")
                && r["payload"]["sink"] == json!("lossy")
        })
    });
    assert!(audited, "every drop is itself audited");
}

/// Starts `traild` and runs `trail validate` on a configuration with `library` installed as `plugins/<file>`,
/// beside a file that is not a library (`plugins/libnot.so`), and the one sink `sink`. Both must refuse it with
/// exit code 78; returns what each printed.
pub(crate) fn refused_at_start(library: &Path, file: &str, sink: &str) -> [String; 2] {
    let dir = tempfile::tempdir().unwrap();
    crate::util::install_plugin(&dir.path().join("plugins"), library, file);
    std::fs::write(dir.path().join("plugins/libnot.so"), b"not a library").unwrap();
    let cfg = dir.path().join("trail.yaml");
    std::fs::write(
        &cfg,
        format!(
            "socket: {{path: s.sock}}\nevent_types: {}\nlog: {{dir: log}}\nplugins_dir: plugins\nsinks:\n{sink}",
            crate::util::repo_event_types().display(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_traild"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let started = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(78), "{started}");
    let (code, _, validated) = trail(&["validate", "--config", cfg.to_str().unwrap()], "");
    assert_eq!(code, 78, "{validated}");
    [started, validated]
}

#[test]
fn bad_plugins_at_start_are_refused_with_the_file_and_the_reason() {
    let check = |package: &str, file: &str, config: &str, expected: &[&str]| {
        let library = plugins::library(package);
        for text in refused_at_start(&library, file, &sink("s", "recorder", "['*']", config)) {
            for e in expected {
                assert!(text.contains(e), "{e:?} missing from:\n{text}");
            }
        }
    };
    // A library built without the name symbol is known by its file name.
    check(
        "trail-test-incompatible",
        "librecorder.so",
        "{path: /dev/null}",
        &["librecorder.so", "incompatible plugin API"],
    );
    // The template declares "line-file": no library declares "recorder".
    check(
        "trail-sink-template",
        "librecorder.so",
        "{path: /dev/null}",
        &[
            "declares the plugin \"recorder\"",
            "libnot.so: not a shared library",
        ],
    );
    // Found by its declared name, whatever the file is called.
    check(
        "trail-test-recorder",
        "libx.so",
        "{path: /dev/null, colour: blue}",
        &[
            "sink \"s\": plugin \"recorder\" rejected its config",
            "colour",
        ],
    );
}

/// Streams events on one connection until told to stop; returns the acknowledged seqs.
pub(crate) fn stream_events(
    socket: &Path,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u64>> {
    let socket = socket.to_owned();
    std::thread::spawn(move || {
        let stream = UnixStream::connect(&socket).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let sender = {
            let sent = sent.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut line = serde_json::to_vec(&login(&i.to_string())).unwrap();
                    line.push(b'\n');
                    writer.write_all(&line).unwrap();
                    sent.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    if i.is_multiple_of(50) {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                writer.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let mut acked = Vec::new();
        for line in BufReader::new(stream).lines() {
            let a: Value = serde_json::from_str(&line.unwrap()).unwrap();
            assert_eq!(a["ok"], json!(true), "{a}");
            acked.push(a["seq"].as_u64().unwrap());
        }
        sender.join().unwrap();
        assert_eq!(acked.len() as u64, sent.load(Ordering::Relaxed));
        acked
    })
}

/// One sink, `rec`, recording `user_login` events into `rec.jsonl` with the mark `v1`.
pub(crate) fn recorder_setup() -> Setup {
    with_sinks(
        &[sink(
            "rec",
            "recorder",
            "['user_login']",
            "{path: $DIR/rec.jsonl, mark: v1}",
        )],
        &[("trail-test-recorder", "librecorder.so")],
        "",
    )
}

fn recorder_daemon() -> Daemon {
    Daemon::with(recorder_setup())
}

#[test]
fn hot_reload_under_load_swaps_builds_without_losing_or_reordering() {
    let daemon = recorder_daemon();
    let path = daemon.path("rec.jsonl");
    let stop = Arc::new(AtomicBool::new(false));
    let client = stream_events(&daemon.socket, stop.clone());
    let marks = |mark: &str| {
        recorded(&path)
            .iter()
            .filter(|l| l["mark"] == json!(mark))
            .count()
    };
    assert!(wait_until(Duration::from_secs(30), || marks("v1") > 200));

    // 1. Replace by rename with a build that marks its records v2.
    daemon.install_plugin(&plugins::recorder_v2(), "librecorder.so");
    assert!(
        wait_until(Duration::from_secs(30), || marks("v2") > 200),
        "v2 never served"
    );

    // 2. A broken replacement (not a library at all) leaves v2 running.
    let broken = daemon.path("broken.so");
    std::fs::write(&broken, b"\x7fELF but not really").unwrap();
    daemon.install_plugin(&broken, "librecorder.so");
    let failed = wait_until(Duration::from_secs(30), || {
        daemon
            .records()
            .iter()
            .any(|r| r["type"] == json!("trail_plugin_failed"))
    });
    assert!(failed, "a failed reload is audited");
    let before = marks("v2");
    assert!(
        wait_until(Duration::from_secs(30), || marks("v2") > before + 100),
        "v2 keeps serving"
    );

    // 3. A slow in-place write of the v1 build: loaded only once complete.
    {
        let bytes = std::fs::read(plugins::library("trail-test-recorder")).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(daemon.plugins_dir().join("librecorder.so"))
            .unwrap();
        for chunk in bytes.chunks(bytes.len() / 10 + 1) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    let v1_now = marks("v1");
    assert!(
        wait_until(Duration::from_secs(30), || marks("v1") > v1_now + 100),
        "v1 back after the slow copy"
    );

    stop.store(true, Ordering::Relaxed);
    let acked = client.join().unwrap();
    let lines = wait_recorded(&path, acked.len());
    // Every acknowledged event exactly once, in order, across three swaps.
    assert_eq!(seqs(&lines), acked);
    let reloads: Vec<Value> = daemon
        .records()
        .into_iter()
        .filter(|r| r["type"] == json!("trail_plugin_reloaded"))
        .collect();
    assert_eq!(reloads.len(), 2, "{reloads:?}");
    let status = daemon.admin(json!({"command": "status"}));
    assert_eq!(status["plugins"][0]["generation"], json!(3), "{status}");
    assert!(status["libraries_mapped"].as_u64().unwrap() >= 3);
}

#[test]
fn reload_by_command_and_sighup_without_inotify_events() {
    let mut setup = recorder_setup();
    // No watcher: only the command and the signal can reload.
    setup.env.push((trail::NO_WATCH_VAR.into(), "1".into()));
    let daemon = Daemon::with(setup);
    let mut c = daemon.client();
    c.emit(&login("one")).unwrap();
    wait_recorded(&daemon.path("rec.jsonl"), 1);
    // Nothing changed: a reload does nothing.
    let answer = daemon.admin(json!({"command": "reload"}));
    assert_eq!(answer["reloaded"], json!([]), "{answer}");
    // A new build is not picked up by itself...
    daemon.install_plugin(&plugins::recorder_v2(), "librecorder.so");
    std::thread::sleep(Duration::from_millis(800));
    c.emit(&login("before the command")).unwrap();
    let before = wait_recorded(&daemon.path("rec.jsonl"), 2);
    assert!(
        before.iter().all(|l| l["mark"] == json!("v1")),
        "{before:?}"
    );
    // ...but by `trail reload`,
    let answer = daemon.admin(json!({"command": "reload"}));
    let reloaded = &answer["reloaded"][0];
    assert_eq!(
        (&reloaded["plugin"], &reloaded["ok"]),
        (&json!("recorder"), &json!(true)),
        "{answer}"
    );
    let mut marked = |mark: &str, after: usize| {
        wait_until(Duration::from_secs(30), || {
            c.emit(&login("probe")).unwrap();
            recorded(&daemon.path("rec.jsonl"))
                .iter()
                .skip(after)
                .any(|l| l["mark"] == json!(mark))
        })
    };
    assert!(marked("v2", 0), "the reload command did not swap");
    // and by SIGHUP (back to the first build, which marks with the configured v1).
    let seen = recorded(&daemon.path("rec.jsonl")).len();
    daemon.install_plugin(&plugins::library("trail-test-recorder"), "librecorder.so");
    daemon.signal(libc::SIGHUP);
    assert!(marked("v1", seen), "SIGHUP did not swap");
    assert!(
        daemon.stderr().contains("not watched"),
        "{}",
        daemon.stderr()
    );
}

#[test]
fn a_sink_without_progress_is_reported_stuck_and_recovers() {
    let daemon = Daemon::with(with_sinks(
        &[sink(
            "jammed",
            "flaky",
            "['user_login']",
            "{path: $DIR/jammed.jsonl, fail_times: 40}",
        )
        .replace("    retry:", "    stuck_after: 200ms\n    retry:")],
        &[("trail-test-flaky", "libflaky.so")],
        "",
    ));
    daemon.client().emit(&login("waiting")).unwrap();
    let stuck = wait_until(Duration::from_secs(30), || {
        daemon.admin(json!({"command": "status"}))["sinks"][0]["stuck"] == json!(true)
    });
    assert!(
        stuck,
        "a sink failing for longer than stuck_after is reported"
    );
    assert!(wait_until(Duration::from_secs(30), || daemon
        .stderr()
        .contains("sink is stuck")));
    wait_recorded(&daemon.path("jammed.jsonl"), 1);
    assert!(wait_until(Duration::from_secs(30), || {
        daemon.admin(json!({"command": "status"}))["sinks"][0]["stuck"] == json!(false)
    }));
    assert!(wait_until(Duration::from_secs(30), || daemon
        .stderr()
        .contains("sink is delivering again")));
}

/// A loopback HTTP server that answers 400 to requests whose body contains `reject-me` and 200 otherwise, and
/// keeps the bodies it accepted.
fn http_server() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/ingest", listener.local_addr().unwrap());
    let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                loop {
                    // One request at a time on a keep-alive connection: headers, then Content-Length bytes.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < head_end + length {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body =
                        String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
                    buf.drain(..head_end + length);
                    let status = if body.contains("reject-me") {
                        "400 Bad Request"
                    } else {
                        keep.lock().unwrap().push(body);
                        "200 OK"
                    };
                    let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\nno");
                    if stream.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

#[test]
fn the_webhook_plugin_delivers_through_the_daemon_and_a_400_is_dead_lettered() {
    let (url, accepted) = http_server();
    let daemon = Daemon::with(with_sinks(
        &[sink(
            "hook",
            "webhook",
            "['user_login']",
            &format!("{{url: '{url}', signing_secret: 'a-secret-of-16-bytes+'}}"),
        )],
        &[("trail-sink-webhook", "libwebhook.so")],
        "",
    ));
    let mut c = daemon.client();
    let acked: Vec<u64> = ["first", "reject-me", "last"]
        .iter()
        .map(|m| c.emit(&login(m)).unwrap()["seq"].as_u64().unwrap())
        .collect();
    let dead_file = daemon.path("spool/dead/hook.jsonl");
    assert!(wait_until(Duration::from_secs(60), || recorded(&dead_file)
        .len()
        == 1));
    let dead = recorded(&dead_file);
    assert_eq!(dead[0]["seq"], json!(acked[1]));
    assert!(
        dead[0]["error"].as_str().unwrap().contains("400"),
        "{}",
        dead[0]
    );
    let delivered = wait_until(Duration::from_secs(60), || {
        let bodies = accepted.lock().unwrap();
        let all = bodies.concat();
        all.contains("\"message\":\"first\"") && all.contains("\"message\":\"last\"")
    });
    assert!(delivered, "{:?}", accepted.lock().unwrap());
}

#[test]
fn seq_continues_after_stream_only_records_across_a_restart() {
    let mut daemon = Daemon::with(Setup {
        extra_types: vec![(
            "stream_only.yml".into(),
            "name: stream_only\ndescription: d\nsaved_to_database: false\nstreamed: true\n".into(),
        )],
        ..with_sinks(
            &[sink(
                "rec",
                "recorder",
                "['stream_only']",
                "{path: $DIR/rec.jsonl}",
            )],
            &[("trail-test-recorder", "librecorder.so")],
            "",
        )
    });
    let streamed = daemon
        .client()
        .emit(&json!({"type": "stream_only"}))
        .unwrap();
    assert_eq!(streamed["ok"], json!(true), "{streamed}");
    let streamed = streamed["seq"].as_u64().unwrap();
    assert!(daemon.stop().success());
    daemon.spawn();
    let next = daemon.client().emit(&login("after restart")).unwrap();
    assert!(
        next["seq"].as_u64().unwrap() > streamed,
        "{next} reuses a seq at or before {streamed}"
    );
    // Nothing in the log (the daemon's own events included) reuses the stream-only record's seq.
    let logged: Vec<u64> = daemon
        .records()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(!logged.contains(&streamed), "{logged:?} reuses {streamed}");
    assert!(logged.windows(2).all(|w| w[0] < w[1]), "{logged:?}");
    assert_eq!(
        seqs(&wait_recorded(&daemon.path("rec.jsonl"), 1)),
        [streamed]
    );
}
