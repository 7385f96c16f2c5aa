//! The test harness: a temp dir, a config, the real daemon, and helpers to talk to it and read its log.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
pub use trail::client::Client;

/// The repository's own event types.
pub fn repo_event_types() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("event-types")
}

/// Polls `f` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits up to `timeout` for `child` to exit; kills it (and returns `None`) when it does not.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    let exited = wait_until(timeout, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// What to start a daemon with.
pub struct Setup {
    /// Extra lines appended to the generated config.
    pub extra_config: String,
    /// `fsync` policy.
    pub fsync: &'static str,
    /// Event-type files written next to copies of the repository's types: (file name, content).
    pub extra_types: Vec<(String, String)>,
    /// Plugin libraries installed before start: (library, installed file name).
    pub plugins: Vec<(PathBuf, String)>,
    /// Extra environment variables of the daemon.
    pub env: Vec<(String, String)>,
    /// Extra settings of the `log:` section, e.g. `max_file_bytes: 4096`.
    pub log: Option<String>,
    /// The daemon's umask, when not the test's own.
    pub umask: Option<libc::mode_t>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            extra_config: String::new(),
            fsync: "always",
            extra_types: Vec::new(),
            plugins: Vec::new(),
            env: Vec::new(),
            log: None,
            umask: None,
        }
    }
}

/// A running (or stopped) `traild` in its own temp dir.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log_dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    starts: u32,
    env: Vec<(String, String)>,
    umask: Option<libc::mode_t>,
}

impl Daemon {
    /// Starts a daemon with the repository's event types and `fsync: always`.
    pub fn start() -> Daemon {
        Daemon::with(Setup::default())
    }

    pub fn with(setup: Setup) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let types = dir.path().join("event-types");
        fs::create_dir(&types).unwrap();
        for entry in fs::read_dir(repo_event_types()).unwrap() {
            let path = entry.unwrap().path();
            fs::copy(&path, types.join(path.file_name().unwrap())).unwrap();
        }
        for (name, text) in &setup.extra_types {
            fs::write(types.join(name), text).unwrap();
        }
        let plugins = dir.path().join("plugins");
        fs::create_dir(&plugins).unwrap();
        for (library, name) in &setup.plugins {
            install_plugin(&plugins, library, name);
        }
        let config = dir.path().join("trail.yaml");
        fs::write(
            &config,
            format!(
                "socket: {{path: trail.sock}}\nevent_types: event-types\nlog: {{dir: log, fsync: {}{}}}\nshutdown_grace: 20s\n{}",
                setup.fsync,
                setup.log.as_ref().map(|l| format!(", {l}")).unwrap_or_default(),
                setup.extra_config.replace("$DIR", dir.path().to_str().unwrap())
            ),
        )
        .unwrap();
        let mut daemon = Daemon {
            socket: dir.path().join("trail.sock"),
            log_dir: dir.path().join("log"),
            config,
            dir,
            child: None,
            starts: 0,
            env: setup.env,
            umask: setup.umask,
        };
        daemon.spawn();
        daemon
    }

    /// Starts the binary on this daemon's config and waits until the socket accepts.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let stderr = fs::File::create(self.stderr_path(self.starts)).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_traild"));
        command
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(mask) = self.umask {
            use std::os::unix::process::CommandExt;
            // umask(2) is async-signal-safe, as a pre_exec hook must be.
            unsafe {
                command.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().unwrap();
        let up = wait_until(Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("traild exited early with {status}:\n{}", self.stderr());
            }
            std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
        });
        assert!(up, "traild did not open its socket:\n{}", self.stderr());
        self.child = Some(child);
    }

    fn stderr_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("traild.{start}.stderr"))
    }

    /// What the latest run wrote to standard error.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.stderr_path(self.starts)).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    /// SIGKILL, then waits for the exit.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait();
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.pid() as i32;
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_exit(&mut child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("traild did not exit:\n{}", self.stderr()))
    }

    /// The raw lines of every log file, oldest first, but the daemon's `trail_started` records (one at every
    /// start, before any other): the records the tests' clients and the daemon's other events made.
    pub fn log_lines(&self) -> Vec<String> {
        self.all_log_lines()
            .into_iter()
            .filter(|l| !is_start_record(l))
            .collect()
    }

    /// The raw lines of every log file, oldest first. While the daemon runs, a group being written may be seen
    /// half-way: the newest file's unterminated tail is then left out; once it has stopped, there must be none.
    pub fn all_log_lines(&self) -> Vec<String> {
        let running = self.child.is_some();
        let mut files: Vec<PathBuf> = fs::read_dir(&self.log_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        files.sort();
        let mut lines = Vec::new();
        let newest = files.len().saturating_sub(1);
        for (i, f) in files.iter().enumerate() {
            let mut bytes = Vec::new();
            fs::File::open(f).unwrap().read_to_end(&mut bytes).unwrap();
            if running && i == newest {
                bytes.truncate(bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1));
            }
            let text = String::from_utf8(bytes).unwrap();
            assert!(
                text.is_empty() || text.ends_with('\n'),
                "{} ends in a torn line",
                f.display()
            );
            lines.extend(text.lines().map(str::to_owned));
        }
        lines
    }

    /// Every record of the log, parsed.
    pub fn records(&self) -> Vec<Value> {
        self.log_lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("corrupt line {l:?}: {e}")))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a stored line is one of the daemon's `trail_started` records.
pub fn is_start_record(line: &str) -> bool {
    line.contains(r#","type":"trail_started","#) && line.contains(r#""daemon":true"#)
}

/// A minimal valid event of type `user_login` whose message is `message`.
pub fn login(message: &str) -> Value {
    serde_json::json!({"type": "user_login", "actor": {"id": "u-42", "name": "alice"}, "message": message, "outcome": "success", "payload": {"method": "sso"}})
}

/// Runs the `trail` tool with `args` and `stdin`, returning (exit code, stdout, stderr).
pub fn trail(args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_trail"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Test plugin libraries, built from the workspace's plugin crates once per test run.
pub mod plugins {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::{Mutex, OnceLock};

    const PACKAGES: [&str; 8] = [
        "trail-test-recorder",
        "trail-test-flaky",
        "trail-test-panicker",
        "trail-test-incompatible",
        "trail-sink-template",
        "trail-sink-webhook",
        "trail-sink-syslog",
        "trail-sink-postgres",
    ];

    /// One build at a time; outputs are copied aside before the next build can overwrite them.
    static BUILDING: Mutex<()> = Mutex::new(());

    fn workspace() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    /// A target directory of its own: the outer `cargo test` may hold the lock of the default one.
    fn target_dir() -> PathBuf {
        workspace().join("target").join("plugin-tests")
    }

    fn build(packages: &[&str], mark: Option<&str>, label: &str) -> Vec<PathBuf> {
        let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .current_dir(workspace())
            .env("CARGO_TARGET_DIR", target_dir())
            .args(["build", "--quiet"]);
        for p in packages {
            cargo.args(["-p", p]);
        }
        match mark {
            Some(m) => cargo.env("TRAIL_TEST_MARK", m),
            None => cargo.env_remove("TRAIL_TEST_MARK"),
        };
        assert!(cargo.status().unwrap().success(), "building {packages:?}");
        let staged = target_dir().join("staged-daemon-tests").join(label);
        std::fs::create_dir_all(&staged).unwrap();
        packages
            .iter()
            .map(|p| {
                let file = format!("lib{}.so", p.replace('-', "_"));
                let to = staged.join(&file);
                let tmp = staged.join(format!(".{file}.{}", std::process::id()));
                std::fs::copy(target_dir().join("debug").join(&file), &tmp).unwrap();
                std::fs::rename(&tmp, &to).unwrap();
                to
            })
            .collect()
    }

    /// The library of one of the test plugin packages (or the sink template).
    pub fn library(package: &str) -> PathBuf {
        static BUILT: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
        BUILT.get_or_init(|| {
            PACKAGES
                .iter()
                .map(|p| p.to_string())
                .zip(build(&PACKAGES, None, "default"))
                .collect()
        })[package]
            .clone()
    }

    /// The recorder built so that it marks every record `v2`.
    pub fn recorder_v2() -> PathBuf {
        static BUILT: OnceLock<PathBuf> = OnceLock::new();
        BUILT
            .get_or_init(|| build(&["trail-test-recorder"], Some("v2"), "v2").remove(0))
            .clone()
    }
}

impl Daemon {
    /// The plugin directory of this daemon's setup.
    pub fn plugins_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    /// Installs `library` as `plugins/<name>` the safe way: written aside, then renamed into place.
    pub fn install_plugin(&self, library: &Path, name: &str) {
        install_plugin(&self.plugins_dir(), library, name);
    }

    /// A path in this daemon's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Asks the admin socket.
    pub fn admin(&self, request: Value) -> Value {
        trail::client::admin(&self.dir.path().join("admin.sock"), &request).unwrap()
    }
}

/// Installs `library` into `dir` as `name`: written to a hidden temporary name, then renamed into place.
pub fn install_plugin(dir: &Path, library: &Path, name: &str) {
    fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::copy(library, &tmp).unwrap();
    fs::rename(&tmp, dir.join(name)).unwrap();
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
