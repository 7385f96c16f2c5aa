//! Who may stand behind a socket path: the daemon binds only in directories nobody else can write, and clients
//! talk only to a socket (and a listening process) of root, their own user or the user they were told to expect.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::util::{
    Daemon, let_others_traverse, login, other_user, repo_event_types, trail, wait_exit, wait_until,
};

/// Runs `traild` on `config` and expects it to refuse to start: its exit code and standard error.
fn refused_start(config: &Path) -> (Option<i32>, String) {
    let stderr_path = config.with_extension("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_traild"))
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    let status =
        status.unwrap_or_else(|| panic!("traild started although it should not have:\n{stderr}"));
    (status.code(), stderr)
}

/// A config in `dir` whose socket is `socket` (and admin socket `admin`, when given).
fn config_with(dir: &Path, socket: &Path, admin: Option<&Path>) -> PathBuf {
    let config = dir.join(format!("trail-{}.yaml", fs::read_dir(dir).unwrap().count()));
    let admin = admin
        .map(|a| format!("admin_socket: {}\n", a.display()))
        .unwrap_or_default();
    fs::write(
        &config,
        format!(
            "socket: {{path: {}}}\nevent_types: {}\nlog: {{dir: {}}}\n{admin}",
            socket.display(),
            repo_event_types().display(),
            dir.join("log").display()
        ),
    )
    .unwrap();
    config
}

fn private_dir(parent: &Path, name: &str, mode: u32) -> PathBuf {
    let d = parent.join(name);
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
    d
}

#[test]
fn the_daemon_refuses_socket_directories_others_can_write() {
    let tmp = tempfile::tempdir().unwrap();
    let expect_refusal = |socket: &Path, admin: Option<&Path>, says: &str| {
        let (code, stderr) = refused_start(&config_with(tmp.path(), socket, admin));
        assert_eq!(code, Some(78), "{}: {stderr}", socket.display());
        assert!(stderr.contains(says), "{}: {stderr}", socket.display());
        let bound = admin.unwrap_or(socket);
        assert!(
            !bound.exists(),
            "{} was bound in an untrusted directory",
            bound.display()
        );
    };
    // Writable by everyone, by its group, and /tmp itself (sticky, but anyone may create the name first).
    let open = private_dir(tmp.path(), "open", 0o777);
    expect_refusal(
        &open.join("trail.sock"),
        None,
        "can be written by users other than its owner",
    );
    let group = private_dir(tmp.path(), "group", 0o775);
    expect_refusal(&group.join("trail.sock"), None, "mode 0775");
    let in_tmp = PathBuf::from(format!("/tmp/trail-test-{}.sock", std::process::id()));
    expect_refusal(&in_tmp, None, "directory /tmp (mode 1777)");
    // A private directory below one that is writable by others (and not sticky) is no better.
    let below = private_dir(&open, "private", 0o700);
    expect_refusal(&below.join("trail.sock"), None, "directory");
    // The admin socket is held to the same rule.
    let good = private_dir(tmp.path(), "good", 0o755);
    expect_refusal(
        &good.join("trail.sock"),
        Some(&open.join("admin.sock")),
        "admin.sock",
    );
    // A directory of another user.
    if let Some(user) = other_user() {
        let theirs = private_dir(tmp.path(), "theirs", 0o755);
        std::os::unix::fs::chown(&theirs, Some(user.uid), Some(user.gid)).unwrap();
        expect_refusal(
            &theirs.join("trail.sock"),
            None,
            &format!("belongs to uid {} ({})", user.uid, user.name),
        );
    }
}

#[test]
fn a_symbolic_link_at_the_socket_path_is_never_followed() {
    // The daemon refuses to bind through one...
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("elsewhere.sock");
    let link = tmp.path().join("trail.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (code, stderr) = refused_start(&config_with(tmp.path(), &link, None));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("is a symbolic link"), "{stderr}");
    assert!(!target.exists(), "the daemon bound where the link points");
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // ...and clients refuse to connect through one, even to the real daemon's socket.
    let daemon = Daemon::start();
    let link = daemon.path("link.sock");
    std::os::unix::fs::symlink(&daemon.socket, &link).unwrap();
    let err = trail::client::Client::connect(&link)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("is a symbolic link"), "{err}");
    let (code, _, stderr) = trail(
        &[
            "emit",
            "--socket",
            link.to_str().unwrap(),
            "--type",
            "user_logout",
        ],
        "",
    );
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("is a symbolic link"), "{stderr}");
    assert!(daemon.records().is_empty());
}

#[test]
fn clients_refuse_another_users_socket_unless_told_to_expect_that_user() {
    let Some(user) = other_user() else { return };
    // A daemon run by the other user, with its socket in a directory of its own: what an impostor would do.
    let tmp = tempfile::tempdir().unwrap();
    let_others_traverse(tmp.path());
    let run = private_dir(tmp.path(), "run", 0o755);
    let data = private_dir(tmp.path(), "data", 0o755);
    for d in [&run, &data] {
        std::os::unix::fs::chown(d, Some(user.uid), Some(user.gid)).unwrap();
    }
    let socket = run.join("trail.sock");
    let admin = run.join("admin.sock");
    let config = tmp.path().join("trail.yaml");
    fs::write(
        &config,
        format!(
            "socket: {{path: {}, mode: \"0666\"}}\nevent_types: {}\nlog: {{dir: {}}}\n",
            socket.display(),
            repo_event_types().display(),
            data.join("log").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    let stderr_path = tmp.path().join("impostor.stderr");
    let mut impostor = user
        .command(env!("CARGO_BIN_EXE_traild"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(30), || {
        admin.exists() && std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let stderr = || fs::read_to_string(&stderr_path).unwrap_or_default();
    if !up {
        let _ = impostor.kill();
        panic!("the other user's daemon did not start:\n{}", stderr());
    }
    let log_lines = || -> usize {
        fs::read_dir(data.join("log"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
                    .map(|e| {
                        fs::read_to_string(e.path())
                            .unwrap_or_default()
                            .lines()
                            .filter(|l| !crate::util::is_start_record(l))
                            .count()
                    })
                    .sum()
            })
            .unwrap_or(0)
    };
    let s = socket.to_str().unwrap();
    let a = admin.to_str().unwrap();
    let owned_by = format!("belongs to uid {} ({})", user.uid, user.name);

    // Refused: by the library, by `trail emit` and by `trail status`.
    let err = trail::client::Client::connect(&socket)
        .map_err(std::io::Error::from)
        .err()
        .expect("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains(&owned_by), "{err}");
    let (code, out, err) = trail(&["emit", "--socket", s, "--type", "user_logout"], "");
    assert_eq!(code, 69, "{out}{err}");
    assert!(
        err.contains(&owned_by) && err.contains("--socket-owner"),
        "{err}"
    );
    let (code, out, err) = trail(&["status", "--admin-socket", a], "");
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains(&owned_by), "{err}");
    assert_eq!(
        log_lines(),
        0,
        "a refused client must not have sent anything"
    );

    // Accepted once the client is told that this user runs the daemon: by name, by uid, by variable.
    let (code, out, err) = trail(
        &[
            "emit",
            "--socket",
            s,
            "--socket-owner",
            &user.name,
            "--type",
            "user_logout",
        ],
        "",
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("{\"ok\":true"), "{out}");
    let line = serde_json::to_string(&login("piped")).unwrap() + "\n";
    let uid = user.uid.to_string();
    let (code, out, err) = trail(&["emit", "--socket", s, "--socket-owner", &uid], &line);
    assert_eq!(code, 0, "{out}{err}");
    let status = Command::new(env!("CARGO_BIN_EXE_trail"))
        .args(["status", "--admin-socket", a])
        .env("TRAIL_SOCKET_OWNER", &user.name)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let answer: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(answer["ok"], json!(true));
    assert!(wait_until(Duration::from_secs(30), || log_lines() == 2));

    // A socket file of root's in a directory of root's, but the listening process is the other user's: the
    // peer's credentials give it away.
    let root_dir = private_dir(tmp.path(), "root-run", 0o755);
    let relinked = root_dir.join("trail.sock");
    fs::hard_link(&socket, &relinked).unwrap();
    std::os::unix::fs::lchown(&relinked, Some(0), Some(0)).unwrap();
    let err = trail::client::Client::connect(&relinked)
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .contains(&format!("runs as uid {} ({})", user.uid, user.name)),
        "{err}"
    );

    let _ = impostor.kill();
    let _ = impostor.wait();
}
