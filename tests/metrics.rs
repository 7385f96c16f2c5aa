//! Metrics and status after a known workload: scraped over the HTTP listener (`metrics.listen`) and through the
//! admin socket (`trail metrics`), every counter equal to what the test sent; `promtool` (Debian's `prometheus`
//! package) accepts the exposition and the shipped alerting rules.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{Client, Daemon, Setup, login, plugins, trail, wait_recorded, wait_until};

/// The samples of a text exposition: `name{labels}` (labels as written) to value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (key, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample {l:?}"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|e| panic!("{l:?}: {e}")),
            };
            (key.to_owned(), value)
        })
        .collect()
}

/// `promtool`, or a failure saying how to get it.
fn promtool() -> Command {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "promtool is not installed: install the Debian package `prometheus` (apt-get install prometheus)"
    );
    Command::new("promtool")
}

/// `promtool check metrics` on `text`: panics with its complaints when it does not pass.
fn promtool_check_metrics(text: &str, what: &str) {
    let mut check = promtool();
    check.args(["check", "metrics"]);
    let out = crate::util::run_with_input(check, text.as_bytes());
    assert!(
        out.status.success(),
        "promtool check metrics refuses the {what}:\n{}{}\n--- the text:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One HTTP/1.1 request to the metrics listener: (status code, headers in lower case, body).
fn http(port: u16, method: &str, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head.to_lowercase(), body.to_owned())
}

/// A port on the loopback interface that nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `trail metrics` (classic text) for `daemon`.
fn trail_metrics(daemon: &Daemon, extra: &[&str]) -> String {
    let socket = daemon.admin_socket();
    let mut args = vec!["metrics", "--admin-socket", socket.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, out, err) = trail(&args, "");
    assert_eq!(code, 0, "trail metrics: {err}");
    out
}

/// `trail status` (JSON: the output is not a terminal).
fn trail_status(daemon: &Daemon) -> Value {
    let socket = daemon.admin_socket();
    let (code, out, err) = trail(&["status", "--admin-socket", socket.to_str().unwrap()], "");
    assert_eq!(code, 0, "trail status: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("trail status: {e}: {out}"))
}

/// Lines and bytes of the spool's segment files.
fn spool_files(dir: &Path) -> (u64, u64) {
    let (mut lines, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("spool-")
        {
            let data = std::fs::read(&path).unwrap();
            lines += data.iter().filter(|&&b| b == b'\n').count() as u64;
            bytes += data.len() as u64;
        }
    }
    (lines, bytes)
}

const USER_LOGINS: u64 = 7;
const ROLES: u64 = 5;
const LOGOUTS: u64 = 3;

#[test]
fn counters_equal_the_workload_over_http_and_the_admin_socket() {
    let port = free_port();
    let sinks = format!(
        "metrics: {{listen: \"127.0.0.1:{port}\"}}\nplugins_dir: plugins\nsinks:\n\
         - name: rec\n    plugin: recorder\n    events: {{types: [user_login]}}\n    config: {{path: $DIR/rec.jsonl}}\n    \
         batch: {{max_events: 100, max_wait: 10ms}}\n\
         - name: dl\n    plugin: flaky\n    events: {{types: [user_login]}}\n    \
         config: {{path: $DIR/dl.jsonl, permanent: true, reject: poison}}\n    batch: {{max_events: 1, max_wait: 10ms}}\n    \
         retry: {{initial: 10ms, max: 40ms}}\n\
         - name: stalled\n    plugin: flaky\n    events: {{types: ['*']}}\n    \
         config: {{path: $DIR/stalled.jsonl, fail_times: 1000000000}}\n    retry: {{initial: 10ms, max: 40ms}}\n    stuck_after: 1h\n"
    )
    .replace("\n- name", "\n  - name");
    let daemon = Daemon::with(Setup {
        extra_config: sinks,
        plugins: vec![
            (
                plugins::library("trail-test-recorder"),
                "librecorder.so".into(),
            ),
            (plugins::library("trail-test-flaky"), "libflaky.so".into()),
        ],
        ..Setup::default()
    });
    let mut c = daemon.client();
    for i in 0..USER_LOGINS {
        let message = if i == 3 {
            "poison".to_owned()
        } else {
            i.to_string()
        };
        let a = c.emit(&login(&message)).unwrap();
        assert_eq!(a["ok"], json!(true), "{a}");
    }
    for i in 0..ROLES {
        let a = c
            .emit(&json!({"type": "role_granted", "message": i.to_string(), "payload": {"role": "admin"}}))
            .unwrap();
        assert_eq!(a["ok"], json!(true), "{a}");
    }
    for i in 0..LOGOUTS {
        let a = c
            .emit(&json!({"type": "user_logout", "actor": {"id": "u-1"}, "message": i.to_string()}))
            .unwrap();
        assert_eq!(a["ok"], json!(true), "{a}");
    }
    // Refused lines are neither accepted nor acknowledged.
    for refused in [
        json!({"type": "no_such_type", "message": "x"}),
        json!({"type": "role_granted", "message": "no role", "payload": {}}),
    ] {
        let a = c.emit(&refused).unwrap();
        assert_eq!(a["ok"], json!(false), "{a}");
    }
    {
        let mut raw = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
        raw.write_all(b"this is not json\n").unwrap();
        let mut answer = [0u8; 256];
        let n = raw.read(&mut answer).unwrap();
        assert!(
            String::from_utf8_lossy(&answer[..n]).contains("\"ok\":false"),
            "{}",
            String::from_utf8_lossy(&answer[..n])
        );
    }
    wait_recorded(&daemon.path("rec.jsonl"), USER_LOGINS as usize);
    wait_recorded(&daemon.path("dl.jsonl"), USER_LOGINS as usize - 1);

    // Over HTTP: poll until the sinks' counters and the histograms caught up (each is recorded just after the
    // fact the test saw).
    let scrape = || {
        let (status, head, body) = http(port, "GET", "/metrics", None);
        assert_eq!(status, 200, "{head}{body}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        body
    };
    let v = |m: &BTreeMap<String, f64>, key: &str| m.get(key).copied().unwrap_or(f64::NAN);
    let mut m = BTreeMap::new();
    let settled = wait_until(Duration::from_secs(60), || {
        m = samples(&scrape());
        v(&m, r#"trail_sink_delivered_total{sink="rec"}"#) == USER_LOGINS as f64
            && v(&m, r#"trail_sink_dead_lettered_total{sink="dl"}"#) == 1.0
            && v(&m, "trail_ack_latency_seconds_count") == (USER_LOGINS + ROLES + LOGOUTS) as f64
            && v(&m, "trail_group_commit_events_sum") == v(&m, "trail_records_stored_total")
            && v(&m, "trail_fsync_duration_seconds_count")
                == v(&m, "trail_group_commit_events_count")
            && v(&m, r#"trail_sink_state{sink="rec",state="idle"}"#) == 1.0
            && v(&m, r#"trail_sink_retries_total{sink="stalled"}"#) >= 1.0
    });
    assert!(settled, "{m:#?}");
    for (ty, n) in [
        ("user_login", USER_LOGINS),
        ("role_granted", ROLES),
        ("user_logout", LOGOUTS),
    ] {
        assert_eq!(
            v(&m, &format!("trail_events_accepted_total{{type=\"{ty}\"}}")),
            n as f64,
            "{ty}: {m:#?}"
        );
    }
    // Every type loaded has its series; no event of another type was accepted (the daemon's own types aside).
    let mut others = 0;
    for (key, value) in &m {
        if let Some(ty) = key.strip_prefix("trail_events_accepted_total{type=\"") {
            let ty = ty.trim_end_matches("\"}");
            if !["user_login", "role_granted", "user_logout"].contains(&ty)
                && !ty.starts_with("trail_")
            {
                assert_eq!(*value, 0.0, "{key}");
                others += 1;
            }
        }
    }
    assert!(others >= 5, "{m:#?}");
    // Rejections by code: the three refused lines above, each under its code; every other code is listed at 0.
    for (code, n) in [
        ("unknown_type", 1.0),
        ("invalid_payload", 1.0),
        ("invalid_event", 0.0),
        ("invalid_json", 1.0),
        ("forbidden", 0.0),
        ("rate_limited", 0.0),
        ("too_large", 0.0),
    ] {
        assert_eq!(
            v(
                &m,
                &format!("trail_events_rejected_total{{code=\"{code}\"}}")
            ),
            n,
            "{code}: {m:#?}"
        );
    }
    // None of those is a refusal of the uid.
    assert_eq!(v(&m, "trail_refused_uids"), 0.0);
    assert_eq!(
        v(&m, r#"trail_sink_delivered_total{sink="dl"}"#),
        (USER_LOGINS - 1) as f64
    );
    assert_eq!(v(&m, r#"trail_sink_backlog_events{sink="rec"}"#), 0.0);
    assert_eq!(v(&m, r#"trail_sink_backlog_bytes{sink="rec"}"#), 0.0);
    assert_eq!(
        v(
            &m,
            r#"trail_sink_oldest_undelivered_age_seconds{sink="rec"}"#
        ),
        0.0
    );
    assert_eq!(v(&m, r#"trail_sink_delivered_total{sink="stalled"}"#), 0.0);
    assert!(
        v(&m, r#"trail_sink_retries_total{sink="stalled"}"#) >= 1.0,
        "{m:#?}"
    );
    // The ack latency histogram's buckets end in +Inf, which holds every count.
    assert_eq!(
        v(&m, r#"trail_ack_latency_seconds_bucket{le="+Inf"}"#),
        (USER_LOGINS + ROLES + LOGOUTS) as f64
    );
    assert!(v(&m, "trail_ack_latency_seconds_sum") > 0.0);
    assert!(v(&m, "trail_group_commit_events_count") >= 1.0);
    assert!(v(&m, "trail_fsync_duration_seconds_sum") > 0.0);
    assert_eq!(v(&m, r#"trail_build_info{version="0.1.0"}"#), 1.0);
    assert_eq!(v(&m, "trail_config_generation"), 1.0);
    assert_eq!(v(&m, r#"trail_reloads_total{result="applied"}"#), 0.0);
    assert_eq!(v(&m, r#"trail_plugin_generation{plugin="recorder"}"#), 1.0);
    assert_eq!(v(&m, r#"trail_plugin_generation{plugin="flaky"}"#), 1.0);
    assert!(v(&m, "trail_plugin_libraries_mapped") >= 2.0);
    assert_eq!(v(&m, "trail_connections_refused_total"), 0.0);
    assert!(v(&m, "trail_log_filesystem_free_bytes") > 0.0);
    assert!(v(&m, "trail_log_filesystem_size_bytes") >= v(&m, "trail_log_filesystem_free_bytes"));
    let started = v(&m, "trail_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started > now - 600.0 && started <= now + 1.0,
        "{started} {now}"
    );

    // The stalled sink holds every spool record: its backlog is what the spool files hold, in records and bytes.
    let spool = daemon.log_dir.parent().unwrap().join("spool");
    let mut files = (0, 0);
    let counted = wait_until(Duration::from_secs(60), || {
        m = samples(&scrape());
        files = spool_files(&spool);
        v(&m, r#"trail_sink_backlog_events{sink="stalled"}"#) == files.0 as f64
            && v(&m, r#"trail_sink_backlog_bytes{sink="stalled"}"#) == files.1 as f64
    });
    assert!(counted, "spool files {files:?}: {m:#?}");
    assert!(files.0 >= USER_LOGINS + ROLES, "{files:?}");
    assert!(
        v(
            &m,
            r#"trail_sink_oldest_undelivered_age_seconds{sink="stalled"}"#
        ) > 0.0
    );
    let stalled_state = |m: &BTreeMap<String, f64>, state: &str| {
        v(
            m,
            &format!("trail_sink_state{{sink=\"stalled\",state=\"{state}\"}}"),
        )
    };
    // Its writes fail (it is not stuck: stuck_after is an hour).
    assert_eq!(stalled_state(&m, "retrying"), 1.0, "{m:#?}");
    assert_eq!(
        stalled_state(&m, "idle") + stalled_state(&m, "delivering") + stalled_state(&m, "stuck"),
        0.0
    );

    // The log's files and bytes are what the directory holds.
    let log_files: Vec<_> = std::fs::read_dir(&daemon.log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("trail-")
        })
        .collect();
    let log_bytes: u64 = log_files
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let log_matches = wait_until(Duration::from_secs(60), || {
        m = samples(&scrape());
        v(&m, "trail_log_files") == log_files.len() as f64
            && v(&m, "trail_log_bytes") >= log_bytes as f64
    });
    assert!(log_matches, "{log_files:?} {log_bytes}: {m:#?}");

    // The same over the admin socket, and both pass promtool.
    let http_text = scrape();
    let admin_text = trail_metrics(&daemon, &[]);
    let admin = samples(&admin_text);
    for key in [
        r#"trail_events_accepted_total{type="user_login"}"#,
        r#"trail_events_accepted_total{type="role_granted"}"#,
        r#"trail_sink_delivered_total{sink="rec"}"#,
        r#"trail_sink_dead_lettered_total{sink="dl"}"#,
        "trail_ack_latency_seconds_count",
    ] {
        assert_eq!(admin.get(key), m.get(key), "{key}");
    }
    promtool_check_metrics(&http_text, "HTTP listener's exposition");
    promtool_check_metrics(&admin_text, "exposition of trail metrics");

    // OpenMetrics when asked for: the same samples, `# EOF` last, counters described without `_total`.
    let (status, head, body) = http(
        port,
        "GET",
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(
        body.contains("# TYPE trail_events_accepted counter\n"),
        "{body}"
    );
    assert!(
        body.contains("# UNIT trail_fsync_duration_seconds seconds\n"),
        "{body}"
    );
    let admin_openmetrics = trail_metrics(&daemon, &["--openmetrics"]);
    assert!(admin_openmetrics.ends_with("# EOF\n"));
    assert_eq!(
        samples(&body).get(r#"trail_events_accepted_total{type="role_granted"}"#),
        Some(&(ROLES as f64))
    );

    // Only GET (and HEAD) /metrics.
    let (status, _, body) = http(port, "GET", "/", None);
    assert_eq!(status, 404, "{body}");
    let (status, head, _) = http(port, "POST", "/metrics", None);
    assert_eq!(status, 405);
    assert!(head.contains("allow: get, head"), "{head}");
    let (status, _, body) = http(port, "HEAD", "/metrics", None);
    assert_eq!((status, body.as_str()), (200, ""));

    // Status: the same figures, and the new fields.
    let s = trail_status(&daemon);
    let own_types = std::fs::read_dir(daemon.dir.path().join("event-types"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_str().unwrap();
            name.ends_with(".yml") && !name.starts_with("trail_")
        })
        .count() as u64;
    assert_eq!(s["event_types_own"], json!(own_types), "{s:#}");
    assert!(s["event_types_builtin"].as_u64().unwrap() >= 8, "{s:#}");
    assert_eq!(
        s["event_types"].as_u64().unwrap(),
        own_types + s["event_types_builtin"].as_u64().unwrap()
    );
    assert!(s["started_at"].as_str().unwrap().ends_with('Z'), "{s:#}");
    assert!(s["fsync"]["syncs"].as_u64().unwrap() >= 1, "{s:#}");
    assert!(s["fsync"]["window_secs"].as_u64().unwrap() <= 70, "{s:#}");
    let (p50, p99) = (
        s["fsync"]["p50_ms"].as_f64().unwrap(),
        s["fsync"]["p99_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{s:#}");
    assert_eq!(s["log"]["dir"], json!(daemon.log_dir), "{s:#}");
    assert!(s["log"]["free_bytes"].as_u64().unwrap() > 0, "{s:#}");
    assert!(s["log"]["files"].as_u64().unwrap() >= 1, "{s:#}");
    let sink = |name: &str| {
        s["sinks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == json!(name))
            .unwrap()
            .clone()
    };
    assert_eq!(sink("rec")["state"], json!("idle"));
    assert_eq!(sink("rec")["backlog_events"], json!(0));
    assert_eq!(sink("rec")["oldest_undelivered_age_secs"], Value::Null);
    assert!(sink("stalled")["backlog_events"].as_u64().unwrap() >= USER_LOGINS + ROLES);
    assert!(
        sink("stalled")["oldest_undelivered_age_secs"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(s["configuration"]["reloads_applied"], json!(0));

    // On a terminal (script(1) from util-linux gives it one), a table of the same figures; JSON with --json.
    let on_terminal = |extra: &str| {
        let command = format!(
            "{} status --admin-socket {} {extra}",
            env!("CARGO_BIN_EXE_trail"),
            daemon.admin_socket().display()
        );
        let out = Command::new("script")
            .args(["-q", "-e", "-c", &command, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n")
    };
    let table = on_terminal("");
    for expected in [
        "configuration    generation 1, loaded ",
        &format!("event types      {} ({own_types} own, ", s["event_types"]),
        "connections      ",
        "fsync (",
        "last checkpoint  none",
        "SINK     STATE",
        "rec      idle",
        "stalled  retrying",
    ] {
        assert!(table.contains(expected), "{expected:?} in:\n{table}");
    }
    let json_anyway: Value = serde_json::from_str(&on_terminal("--json")).unwrap();
    assert_eq!(json_anyway["event_types_own"], json!(own_types));

    // A reload counts by its result.
    let socket = daemon.admin_socket();
    let (code, _, err) = trail(&["reload", "--admin-socket", socket.to_str().unwrap()], "");
    assert_eq!(code, 0, "{err}");
    let m = samples(&trail_metrics(&daemon, &[]));
    assert_eq!(v(&m, r#"trail_reloads_total{result="applied"}"#), 1.0);
    assert_eq!(v(&m, r#"trail_reloads_total{result="refused"}"#), 0.0);
    assert_eq!(v(&m, "trail_config_generation"), 2.0);
    assert_eq!(
        trail_status(&daemon)["configuration"]["reloads_applied"],
        json!(1)
    );
}

#[test]
fn status_names_the_last_checkpoint_and_the_listener_ends_with_the_daemon() {
    let port = free_port();
    let mut daemon = Daemon::with(Setup {
        extra_config: format!("metrics: {{listen: \"127.0.0.1:{port}\"}}\n"),
        ..Setup::default()
    });
    let mut c: Client = daemon.client();
    assert_eq!(c.emit(&login("one")).unwrap()["ok"], json!(true));
    drop(c);
    // A fresh log has no checkpoint yet.
    let s = trail_status(&daemon);
    assert_eq!(s["last_checkpoint"], Value::Null, "{s:#}");
    assert!(
        !samples(&trail_metrics(&daemon, &[])).contains_key("trail_last_checkpoint_time_seconds")
    );
    daemon.stop_cleanly().unwrap();
    // Stopped: nothing listens on the port any more.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());

    // The stop wrote a checkpoint; the next start names it until it writes one of its own.
    daemon.spawn();
    let s = trail_status(&daemon);
    let checkpoint = &s["last_checkpoint"];
    assert_eq!(checkpoint["reason"], json!("stop"), "{s:#}");
    let file = checkpoint["file"].as_str().unwrap();
    assert!(
        daemon.log_dir.join("checkpoints").join(file).is_file(),
        "{s:#}"
    );
    let m = samples(&trail_metrics(&daemon, &[]));
    assert_eq!(
        m.get("trail_last_checkpoint_time_seconds").copied(),
        checkpoint["unix_secs"].as_f64(),
        "{m:#?}"
    );
    // The daemon's own types count as accepted too (trail_started, once per start).
    assert_eq!(
        m.get(r#"trail_events_accepted_total{type="trail_started"}"#),
        Some(&1.0)
    );
    let (status, _, _) = http(port, "GET", "/metrics", None);
    assert_eq!(status, 200);
}

#[test]
fn the_shipped_alerting_rules_pass_promtool() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/trail.rules.yml");
    let out = promtool()
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules {}:\n{}{}",
        rules.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every metric the rules read is one the daemon exposes.
    let text = std::fs::read_to_string(&rules).unwrap();
    for name in [
        "trail_sink_state",
        "trail_sink_backlog_events",
        "trail_sink_oldest_undelivered_age_seconds",
        "trail_sink_dead_lettered_total",
        "trail_sink_dropped_total",
        "trail_log_filesystem_free_bytes",
        "trail_log_filesystem_size_bytes",
        "trail_fsync_duration_seconds_bucket",
        "trail_refused_uids",
    ] {
        assert!(text.contains(name), "{name}");
    }
}
