//! Access control and per-uid limits with real users and groups: who may submit which event types, how fast,
//! what of a refusal is recorded (`trail_submission_denied`), the actor rules of a type, the socket's mode and
//! group, and a reload that changes the rules. The clients are `trail emit` run as the test users (`setpriv`).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{
    Daemon, Setup, TestUser, let_others_traverse, test_group, test_user, wait_until,
};

const TRAIL: &str = env!("CARGO_BIN_EXE_trail");

/// Definitions of test types (saved, not streamed, any payload), each with `extra` lines.
fn types(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(name, extra)| {
            (
                format!("{name}.yml"),
                format!(
                    "name: {name}\ndescription: a type of the access tests\nsaved_to_database: true\n\
                     streamed: false\n{extra}"
                ),
            )
        })
        .collect()
}

/// A daemon with `extra_config` and `types`, its socket opened to every user so that the test users reach it
/// (the access rules, not the socket's mode, are what these tests look at).
fn daemon(extra_config: &str, types: Vec<(String, String)>) -> Daemon {
    let daemon = Daemon::with(Setup {
        extra_config: extra_config.into(),
        extra_types: types,
        ..Setup::default()
    });
    let_others_traverse(daemon.dir.path());
    fs::set_permissions(&daemon.socket, fs::Permissions::from_mode(0o666)).unwrap();
    daemon
}

/// The test users `trail-test-acc-a` (a member of group `trail-test-acc`) and `trail-test-acc-b` (not), and the
/// group's gid; `None` when not running as root.
fn users() -> Option<(TestUser, TestUser, u32)> {
    let a = test_user("trail-test-acc-a")?;
    let b = test_user("trail-test-acc-b")?;
    let group = test_group("trail-test-acc", &[&a]);
    Some((a, b, group))
}

/// `trail` run as `user` with primary group `gid` and no supplementary groups in the process (membership of
/// other groups is the user database's, which is what the daemon reads).
fn as_user(user: &TestUser, gid: u32) -> Command {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(TRAIL);
    command
}

/// Sends `lines` on one connection with `trail emit` (standard input, pipelined): its exit code and one answer
/// per line.
fn send(mut trail: Command, daemon: &Daemon, lines: &[Value]) -> (i32, Vec<Value>) {
    trail.args(["emit", "--socket", daemon.socket.to_str().unwrap()]);
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let out = crate::util::run_with_input(trail, input.as_bytes());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(
        answers.len(),
        lines.len(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), answers)
}

/// `ok`, or the refusal's code, per answer.
fn codes(answers: &[Value]) -> Vec<String> {
    answers
        .iter()
        .map(|a| match a["ok"].as_bool() {
            Some(true) => "ok".to_owned(),
            _ => a["error"]["code"].as_str().unwrap_or("?").to_owned(),
        })
        .collect()
}

fn event(ty: &str) -> Value {
    json!({"type": ty, "payload": {"secret": "payload-of-a-refused-line"}})
}

/// The daemon's `trail_submission_denied` records as (uid, event type, code, count), sorted.
fn denied(daemon: &Daemon) -> Vec<(u64, String, String, u64)> {
    let mut out: Vec<(u64, String, String, u64)> = daemon
        .records()
        .into_iter()
        .filter(|r| r["type"] == "trail_submission_denied")
        .map(|r| {
            let p = &r["payload"];
            assert_eq!(r["source"]["daemon"], json!(true), "{r}");
            assert_eq!(r["outcome"], json!("denied"), "{r}");
            assert!(
                p.get("secret").is_none() && !r.to_string().contains("payload-of-a-refused-line"),
                "{r}"
            );
            assert!(p["first_at"].as_str() <= p["last_at"].as_str(), "{r}");
            (
                p["uid"].as_u64().unwrap(),
                p["event_type"].as_str().unwrap().to_owned(),
                p["code"].as_str().unwrap().to_owned(),
                p["count"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn rewrite(daemon: &Daemon, from: &str, to: &str) {
    let text = fs::read_to_string(&daemon.config).unwrap();
    assert!(text.contains(from), "{text}");
    fs::write(&daemon.config, text.replace(from, to)).unwrap();
}

#[test]
fn rules_allow_peers_by_uid_user_primary_group_and_membership() {
    let Some((a, b, group)) = users() else { return };
    let config = format!(
        "access:\n  rules:\n    - {{types: [acc_by_uid], uids: [{}]}}\n    - {{types: [acc_by_user], users: [{}]}}\n    \
         - {{types: [\"acc_by_group*\"], groups: [trail-test-acc]}}\n    - {{types: [acc_by_gid], gids: [{group}]}}\n",
        a.uid, b.name
    );
    let names = [
        "acc_by_uid",
        "acc_by_user",
        "acc_by_group",
        "acc_by_gid",
        "acc_open",
    ];
    let mut daemon = daemon(&config, types(&names.map(|n| (n, ""))));
    let lines: Vec<Value> = names.iter().map(|t| event(t)).collect();

    // A: by uid, a member of the group (not its primary group); not the named user.
    let (code, answers) = send(as_user(&a, a.gid), &daemon, &lines);
    assert_eq!(
        codes(&answers),
        ["ok", "forbidden", "ok", "ok", "ok"],
        "{answers:?}"
    );
    assert_eq!(code, 65, "a forbidden event is refused for what it is");
    let message = answers[1]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("uid {} ({})", a.uid, a.name))
            && message.contains("\"acc_by_user\"")
            && message.contains("access.rules[1]"),
        "{message}"
    );
    // B: the named user, in no group of the rules.
    let (_, answers) = send(as_user(&b, b.gid), &daemon, &lines);
    assert_eq!(
        codes(&answers),
        ["forbidden", "ok", "forbidden", "forbidden", "ok"],
        "{answers:?}"
    );
    // B running with the group as its primary gid (SO_PEERCRED) is let in by the group rules.
    let (_, answers) = send(as_user(&b, group), &daemon, &lines);
    assert_eq!(
        codes(&answers),
        ["forbidden", "ok", "ok", "ok", "ok"],
        "{answers:?}"
    );
    // Root is in none of the lists; the type no rule covers is open to it too.
    let (_, answers) = send(Command::new(TRAIL), &daemon, &lines);
    assert_eq!(
        codes(&answers),
        ["forbidden", "forbidden", "forbidden", "forbidden", "ok"],
        "{answers:?}"
    );

    let status = daemon.admin(json!({"command": "status"}));
    let refusals = &status["refusals"];
    assert_eq!(refusals["by_code"]["forbidden"], json!(9), "{refusals}");
    let of = |uid: u32| {
        refusals["per_uid"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["uid"] == json!(uid))
            .cloned()
            .unwrap_or_else(|| panic!("uid {uid} in {refusals}"))
    };
    assert_eq!(
        (of(b.uid)["forbidden"].clone(), of(b.uid)["user"].clone()),
        (json!(4), json!(b.name))
    );
    assert_eq!(of(a.uid)["forbidden"], json!(1));

    // Nothing of a refused line is stored; every allowed one is.
    assert!(daemon.stop().success());
    let stored: Vec<Value> = daemon
        .records()
        .into_iter()
        .filter(|r| r["type"].as_str().unwrap().starts_with("acc_"))
        .collect();
    assert_eq!(stored.len(), 4 + 2 + 4 + 1);
    // Refusals within one interval (60 s by default) are recorded at the stop, one record per uid, type and code.
    let forbidden =
        |uid: u32, ty: &str, n: u64| (uid as u64, ty.to_owned(), "forbidden".to_owned(), n);
    let mut expected = vec![
        forbidden(a.uid, "acc_by_user", 1),
        forbidden(b.uid, "acc_by_uid", 2),
        forbidden(b.uid, "acc_by_group", 1),
        forbidden(b.uid, "acc_by_gid", 1),
        forbidden(0, "acc_by_uid", 1),
        forbidden(0, "acc_by_user", 1),
        forbidden(0, "acc_by_group", 1),
        forbidden(0, "acc_by_gid", 1),
    ];
    expected.sort();
    assert_eq!(denied(&daemon), expected);
}

#[test]
fn a_burst_of_refusals_is_one_record_per_interval_with_its_count() {
    let Some((a, _, _)) = users() else { return };
    // A rule that names nobody reserves its types.
    let daemon = daemon(
        "access: {denied_record_interval: 2s, rules: [{types: [acc_closed]}]}\n",
        types(&[("acc_closed", "")]),
    );
    let burst = |n: usize| {
        let (_, answers) = send(as_user(&a, a.gid), &daemon, &vec![event("acc_closed"); n]);
        assert!(
            codes(&answers).iter().all(|c| c == "forbidden"),
            "{answers:?}"
        );
    };
    let wait_for = |n: usize| {
        let mut got = Vec::new();
        let ok = wait_until(Duration::from_secs(60), || {
            got = denied(&daemon);
            got.len() >= n
        });
        assert!(ok, "{got:?}");
        got
    };
    burst(50);
    let key = |count| {
        (
            a.uid as u64,
            "acc_closed".to_owned(),
            "forbidden".to_owned(),
            count,
        )
    };
    // Recorded when the interval ends, while the daemon runs.
    assert_eq!(wait_for(1), [key(50)]);
    // The next refusals open the next interval: 7 more, in one record (or two, should the machine take longer
    // than the interval between the two clients).
    burst(5);
    burst(2);
    let mut got = Vec::new();
    let ok = wait_until(Duration::from_secs(60), || {
        got = denied(&daemon);
        got.iter().map(|k| k.3).sum::<u64>() == 57
    });
    assert!(ok, "{got:?}");
    got.sort_by_key(|k| std::cmp::Reverse(k.3));
    assert!(
        got == [key(50), key(7)] || got == [key(50), key(5), key(2)],
        "{got:?}"
    );
    let records: Vec<Value> = daemon
        .records()
        .into_iter()
        .filter(|r| r["type"] == "trail_submission_denied")
        .collect();
    let p = &records[0]["payload"];
    assert_eq!(
        (p["gid"].clone(), p["interval_secs"].clone()),
        (json!(a.gid), json!(2))
    );
    assert_eq!(p["user"], json!(a.name));
    assert!(p["pid"].as_u64().is_some_and(|pid| pid > 0), "{p}");
    assert!(
        records[0]["message"]
            .as_str()
            .unwrap()
            .contains("was refused 50 submissions of event type \"acc_closed\" (forbidden)"),
        "{}",
        records[0]
    );
}

#[test]
fn a_uid_over_its_rate_is_answered_rate_limited_and_counted() {
    let Some((a, _, _)) = users() else { return };
    let mut daemon = daemon(
        "limits: {rate_per_uid: 0.1, rate_burst: 3}\n",
        types(&[("acc_open", "")]),
    );
    let (code, answers) = send(as_user(&a, a.gid), &daemon, &vec![event("acc_open"); 6]);
    assert_eq!(
        codes(&answers),
        [
            "ok",
            "ok",
            "ok",
            "rate_limited",
            "rate_limited",
            "rate_limited"
        ],
        "{answers:?}"
    );
    assert_eq!(code, 75, "rate_limited says: try again later");
    for limited in &answers[3..] {
        let after = limited["error"]["retry_after_ms"].as_u64().unwrap();
        assert!((1..=10_000).contains(&after), "{limited}");
        assert!(
            limited["error"]["message"]
                .as_str()
                .unwrap()
                .contains("limits.rate_per_uid"),
            "{limited}"
        );
    }
    // Another uid has a bucket of its own.
    let (_, answers) = send(Command::new(TRAIL), &daemon, &[event("acc_open")]);
    assert_eq!(codes(&answers), ["ok"]);

    let status = daemon.admin(json!({"command": "status"}));
    let refusals = &status["refusals"];
    assert_eq!(refusals["by_code"]["rate_limited"], json!(3), "{refusals}");
    let mine: Vec<&Value> = refusals["per_uid"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["uid"] == json!(a.uid))
        .collect();
    assert_eq!(mine.len(), 1, "{refusals}");
    assert_eq!(
        (&mine[0]["rate_limited"], &mine[0]["user"]),
        (&json!(3), &json!(a.name))
    );
    // The same report through `trail status` when its output is not a terminal: JSON.
    let out = Command::new(TRAIL)
        .args([
            "status",
            "--admin-socket",
            daemon.admin_socket().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["refusals"]["by_code"]["rate_limited"], json!(3));
    // On a terminal (script(1) gives it one), a short text with the same counts.
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(format!(
            "{TRAIL} status --admin-socket {}",
            daemon.admin_socket().display()
        ))
        .arg("/dev/null")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("refusals ") && l.trim_end().ends_with(" rate_limited 3")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "uid {} ({}): forbidden 0, rate_limited 3, too_large 0; last 20",
            a.uid, a.name
        )),
        "{text}"
    );
    // Metrics count the refusals by code, and the uid among those refused in the last minute (never as a label).
    let out = Command::new(TRAIL)
        .args([
            "metrics",
            "--admin-socket",
            daemon.admin_socket().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"trail_events_rejected_total{code="rate_limited"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "trail_refused_uids 1"),
        "{metrics}"
    );
    assert!(!metrics.contains(&format!("\"{}\"", a.name)), "{metrics}");

    assert!(daemon.stop().success());
    assert_eq!(
        denied(&daemon),
        [(
            a.uid as u64,
            "acc_open".to_owned(),
            "rate_limited".to_owned(),
            3
        )]
    );
    assert_eq!(
        daemon
            .records()
            .iter()
            .filter(|r| r["type"] == "acc_open")
            .count(),
        4
    );
}

#[test]
fn types_can_require_an_actor_or_take_it_from_the_peer() {
    let Some((a, _, _)) = users() else { return };
    let mut daemon = daemon(
        "",
        types(&[
            ("acc_actor", "require_actor: true\n"),
            ("acc_peer", "actor_from_peer: true\n"),
        ]),
    );
    let lines = [
        json!({"type": "acc_actor"}),
        json!({"type": "acc_actor", "actor": {"id": "u-1"}}),
        json!({"type": "acc_peer", "payload": {"n": "marker"}}),
        json!({"type": "acc_peer", "actor": {"id": a.name, "name": "Alice"}}),
        json!({"type": "acc_peer", "actor": {"id": "mallory"}}),
    ];
    let (_, answers) = send(as_user(&a, a.gid), &daemon, &lines);
    assert_eq!(
        codes(&answers),
        ["invalid_event", "ok", "ok", "ok", "forbidden"],
        "{answers:?}"
    );
    let missing = &answers[0]["error"];
    assert_eq!(
        missing["details"][0]["path"],
        json!("/actor/id"),
        "{missing}"
    );
    assert!(
        missing["message"]
            .as_str()
            .unwrap()
            .contains("requires actor.id"),
        "{missing}"
    );
    let other = answers[4]["error"]["message"].as_str().unwrap();
    assert!(
        other.contains("actor.id \"mallory\"") && other.contains(&format!("{:?}", a.name)),
        "{other}"
    );
    // The payload stays as sent, byte for byte, beside the stamped actor (root's line, on the socket itself:
    // serde_json would write 1.50 as 1.5).
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    stream
        .write_all(b"{\"type\":\"acc_peer\",\"payload\":{\"n\":1.50}}\n")
        .unwrap();
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).unwrap();
    assert!(answer.starts_with("{\"ok\":true"), "{answer}");

    assert!(daemon.stop().success());
    let lines = daemon.log_lines();
    let peer: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["type"] == "acc_peer")
        .collect();
    assert_eq!(peer[0]["actor"], json!({"id": a.name}));
    assert_eq!(peer[1]["actor"], json!({"id": a.name, "name": "Alice"}));
    // Root's own line: stamped with root's name.
    assert_eq!(peer[2]["actor"], json!({"id": "root"}));
    assert!(
        lines
            .iter()
            .any(|l| l.contains(",\"actor\":{\"id\":\"root\"},\"payload\":{\"n\":1.50}")),
        "{lines:?}"
    );
    assert_eq!(
        denied(&daemon),
        [(
            a.uid as u64,
            "acc_peer".to_owned(),
            "forbidden".to_owned(),
            1
        )]
    );
}

#[test]
fn the_socket_gets_its_mode_and_group_and_unknown_names_are_refused() {
    let Some((_, _, group)) = users() else { return };
    let mut daemon = Daemon::start();
    let default_group = Command::new("getent")
        .args(["group", "trail"])
        .output()
        .unwrap();
    let meta = fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    if default_group.status.success() {
        let gid: u32 = String::from_utf8_lossy(&default_group.stdout)
            .split(':')
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(meta.gid(), gid, "socket.group defaults to trail");
    } else {
        assert_eq!(
            meta.gid(),
            0,
            "without a group trail the socket keeps the daemon's group"
        );
        assert!(
            daemon
                .stderr()
                .contains("socket.group is not set and there is no group \"trail\" on this host"),
            "{}",
            daemon.stderr()
        );
    }
    assert!(daemon.stop().success());
    rewrite(
        &daemon,
        "socket: {path: trail.sock}",
        "socket: {path: trail.sock, mode: \"0640\", group: trail-test-acc}",
    );
    daemon.spawn();
    let meta = fs::metadata(&daemon.socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o640, group));
    assert!(daemon.stop().success());

    let validate = |from: &str, to: &str, says: &str| {
        rewrite(&daemon, from, to);
        let out = Command::new(env!("CARGO_BIN_EXE_traild"))
            .args(["validate", "--config", daemon.config.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        rewrite(&daemon, to, from);
    };
    validate(
        "group: trail-test-acc",
        "group: trail-test-no-such-group",
        "socket.group: there is no group \"trail-test-no-such-group\" on this host",
    );
    let text = fs::read_to_string(&daemon.config).unwrap();
    fs::write(
        &daemon.config,
        format!("{text}access: {{rules: [{{types: ['*'], users: [trail-test-nobody-here]}}]}}\n"),
    )
    .unwrap();
    validate(
        "trail-test-nobody-here",
        "trail-test-nobody-here",
        "access.rules[0].users: there is no user \"trail-test-nobody-here\" on this host",
    );
}

#[test]
fn a_reload_changes_the_rules_and_keeps_the_buckets() {
    let Some((a, b, _)) = users() else { return };
    let rule =
        |uid: u32| format!("access: {{rules: [{{types: [acc_reloaded], uids: [{uid}]}}]}}\n");
    let daemon = daemon(
        &format!(
            "{}limits: {{rate_per_uid: 0.01, rate_burst: 3}}\n",
            rule(a.uid)
        ),
        types(&[("acc_reloaded", ""), ("acc_open", "")]),
    );
    let (_, answers) = send(
        as_user(&a, a.gid),
        &daemon,
        &[event("acc_reloaded"), event("acc_open")],
    );
    assert_eq!(codes(&answers), ["ok", "ok"]);
    let (_, answers) = send(as_user(&b, b.gid), &daemon, &[event("acc_reloaded")]);
    assert_eq!(codes(&answers), ["forbidden"]);

    rewrite(&daemon, &rule(a.uid), &rule(b.uid));
    let answer = daemon.admin(json!({"command": "reload"}));
    assert_eq!(answer["config"]["result"], json!("applied"), "{answer}");
    assert!(
        answer["config"]["settings_changed"]
            .as_array()
            .unwrap()
            .contains(&json!("access")),
        "{answer}"
    );
    // The new rule decides; A's bucket kept the two events it took (one left of three).
    let (_, answers) = send(
        as_user(&a, a.gid),
        &daemon,
        &[event("acc_reloaded"), event("acc_open"), event("acc_open")],
    );
    assert_eq!(
        codes(&answers),
        ["forbidden", "ok", "rate_limited"],
        "{answers:?}"
    );
    let (_, answers) = send(as_user(&b, b.gid), &daemon, &[event("acc_reloaded")]);
    assert_eq!(codes(&answers), ["ok"]);

    // A rule naming an unknown user is refused; the running rules keep serving.
    rewrite(
        &daemon,
        &format!("uids: [{}]", b.uid),
        "users: [trail-test-nobody-here]",
    );
    let answer = daemon.admin(json!({"command": "reload"}));
    assert_eq!(answer["config"]["result"], json!("refused"), "{answer}");
    assert!(
        answer["config"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("access.rules[0].users: there is no user \"trail-test-nobody-here\""),
        "{answer}"
    );
    let (_, answers) = send(as_user(&b, b.gid), &daemon, &[event("acc_reloaded")]);
    assert_eq!(codes(&answers), ["ok"]);
}
