//! The test harness: a temp dir, a config, the real daemon, and helpers to talk to it and read its log.

#![allow(dead_code)]

use std::fs;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
pub use trail::client::Client;
pub use trail_test_kit::{Setup, install_plugin, repo_event_types, wait_exit, wait_until};

/// A running (or stopped) `traild` in its own temp dir: the kit's launcher with this build's binary.
pub struct Daemon(trail_test_kit::Daemon);

impl Daemon {
    /// Starts a daemon with the repository's event types and `fsync: always`.
    pub fn start() -> Daemon {
        Daemon::with(Setup::default())
    }

    pub fn with(setup: Setup) -> Daemon {
        Daemon(trail_test_kit::Daemon::with(
            Path::new(env!("CARGO_BIN_EXE_traild")),
            setup,
        ))
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }

    /// Asks the admin socket; a failure shows the end of the daemon's log.
    pub fn admin(&self, request: Value) -> Value {
        trail::client::admin(&self.admin_socket(), &request)
            .unwrap_or_else(|e| panic!("admin {request}: {e}\n{}", self.stderr_tail(40)))
    }
}

impl Deref for Daemon {
    type Target = trail_test_kit::Daemon;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

pub use trail_test_kit::daemon::is_start_record;

/// A minimal valid event of type `user_login` whose message is `message`.
pub fn login(message: &str) -> Value {
    serde_json::json!({"type": "user_login", "actor": {"id": "u-42", "name": "alice"}, "message": message, "outcome": "success", "payload": {"method": "sso"}})
}

/// Runs `command` with `stdin` as its standard input; its output, both streams captured.
pub fn run_with_input(mut command: Command, stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Runs the `trail` tool with `args` and `stdin`, returning (exit code, stdout, stderr).
pub fn trail(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_trail"));
    command.args(args);
    let out = run_with_input(command, stdin.as_bytes());
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Test plugin libraries, built from the workspace's plugin crates once per test run.
pub mod plugins {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use trail_test_kit::{Build, workspace};

    const PACKAGES: [&str; 9] = [
        "trail-test-recorder",
        "trail-test-flaky",
        "trail-test-panicker",
        "trail-test-incompatible",
        "trail-sink-template",
        "trail-sink-webhook",
        "trail-sink-syslog",
        "trail-sink-postgres",
        "trail-sink-nats",
    ];

    fn build(packages: &[&str], mark: Option<&str>, label: &str) -> Vec<PathBuf> {
        Build::new(workspace(), packages)
            .env("TRAIL_TEST_MARK", mark)
            .label(&format!("daemon-tests-{label}"))
            .run()
    }

    /// The library of one of the test plugin packages (or the sink template).
    pub fn library(package: &str) -> PathBuf {
        static BUILT: OnceLock<Vec<PathBuf>> = OnceLock::new();
        let built = BUILT.get_or_init(|| build(&PACKAGES, None, "default"));
        built[PACKAGES.iter().position(|p| *p == package).unwrap()].clone()
    }

    /// The recorder built so that it marks every record `v2`.
    pub fn recorder_v2() -> PathBuf {
        static BUILT: OnceLock<PathBuf> = OnceLock::new();
        BUILT
            .get_or_init(|| build(&["trail-test-recorder"], Some("v2"), "v2").remove(0))
            .clone()
    }
}

/// The complete lines a recorder-style plugin wrote to `path`, parsed. A plugin that is still writing may have
/// written part of a line (its buffer fills at any byte): an unterminated tail is not a line yet and is left out.
pub fn recorded(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("corrupt line {l:?}: {e}")))
        .collect()
}

/// Waits until `path` holds at least `n` recorded lines and returns them.
pub fn wait_recorded(path: &Path, n: usize) -> Vec<Value> {
    let mut lines = Vec::new();
    let ok = wait_until(Duration::from_secs(60), || {
        lines = recorded(path);
        lines.len() >= n
    });
    assert!(
        ok,
        "{} holds {} records, expected {n}",
        path.display(),
        lines.len()
    );
    lines
}

/// A local user of its own for tests of what another uid may and may not do, created once per test run with
/// `useradd` (no home, no login shell). `None` when the tests do not run as root: such tests then skip.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    /// `program` run as this user (real and effective uid and gid, no supplementary groups), through `setpriv`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg(program);
        command
    }
}

/// The test user `name` (created when missing); `None` when not running as root.
pub fn test_user(name: &str) -> Option<TestUser> {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipping the part of this test that needs a second uid");
        return None;
    }
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    let id = |flag: &str| {
        Command::new("id")
            .arg(flag)
            .arg(name)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<u32>().ok())
    };
    if id("-u").is_none() {
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .status()
            .unwrap();
        // Another test process may have created it in the meantime (exit 9: the user exists).
        assert!(
            status.success() || status.code() == Some(9),
            "useradd {name}: {status}"
        );
    }
    Some(TestUser {
        name: name.to_owned(),
        uid: id("-u").expect("uid of the test user"),
        gid: id("-g").expect("gid of the test user"),
    })
}

/// The group `name` (created when missing) with `members` (test users) added to it as a supplementary group;
/// its gid. Only as root (the caller has a [`TestUser`]).
pub fn test_group(name: &str, members: &[&TestUser]) -> u32 {
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    let status = Command::new("groupadd")
        .args(["--force", "--system", name])
        .status()
        .unwrap();
    assert!(status.success(), "groupadd {name}: {status}");
    for member in members {
        let status = Command::new("usermod")
            .args(["--append", "--groups", name, &member.name])
            .status()
            .unwrap();
        assert!(
            status.success(),
            "usermod -aG {name} {}: {status}",
            member.name
        );
    }
    let out = Command::new("getent")
        .args(["group", name])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split(':')
        .nth(2)
        .and_then(|g| g.parse().ok())
        .expect("gid of the test group")
}

/// The usual second user, `trail-test-other`.
pub fn other_user() -> Option<TestUser> {
    test_user("trail-test-other")
}

/// Opens `path` and every directory above it for traversal by other users (temp dirs are 0700), so that a test
/// user can reach a socket inside. Leaves write permission as it was.
pub fn let_others_traverse(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut dir = Some(path);
    while let Some(d) = dir {
        if let Ok(meta) = fs::metadata(d) {
            let mode = meta.permissions().mode();
            if meta.is_dir() && mode & 0o011 != 0o011 {
                fs::set_permissions(d, fs::Permissions::from_mode(mode | 0o011)).unwrap();
            }
        }
        dir = d.parent();
    }
}

/// Sets the daemon's `RLIMIT_FSIZE`: its writes past `soft` bytes into any file fail with EFBIG, as on a full disk.
pub fn limit_file_size(daemon: &Daemon, soft: u64) {
    let l = libc::rlimit {
        rlim_cur: soft,
        rlim_max: libc::RLIM_INFINITY,
    };
    let pid = daemon.pid() as i32;
    let set = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &l, std::ptr::null_mut()) };
    assert_eq!(set, 0);
}

/// A daemon on host `host-a` with one sink `name` of `plugin` (installed from the library of `package`) that gets
/// the event types `types` with `config`: batches of up to 500 events or 10 ms, retries from 20 ms to 300 ms.
pub fn one_sink_daemon(
    (name, plugin, package): (&str, &str, &str),
    config: &Value,
    types: &str,
    setup: Setup,
) -> Daemon {
    Daemon::with(Setup {
        extra_config: format!(
            "host_name: host-a\nplugins_dir: plugins\nsinks:\n  - name: {name}\n    plugin: {plugin}\n    \
             events: {{types: {types}}}\n    config: {config}\n    batch: {{max_events: 500, max_wait: 10ms}}\n    \
             retry: {{initial: 20ms, max: 300ms}}\n"
        ),
        plugins: vec![(plugins::library(package), format!("lib{plugin}.so"))],
        ..setup
    })
}

/// The records `trail search --oldest-first --format json` finds in `daemon`'s log for the event types `types`.
pub fn search_types(daemon: &Daemon, types: &[&str]) -> Vec<Value> {
    let mut args = vec!["search", "--dir", daemon.log_dir.to_str().unwrap()];
    for t in types {
        args.extend(["--type", t]);
    }
    args.extend(["--oldest-first", "--format", "json"]);
    let (code, out, err) = trail(&args, "");
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
