//! The daemon as systemd runs it: sockets passed by the real `systemd-socket-activate`, sd_notify messages on a
//! `NOTIFY_SOCKET` the test binds (readiness, status, reload, stop, watchdog), the unit's `ExecReload=` lines, and
//! plugins under the kernel's memory-deny-write-execute.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::sinks::{sink, with_sinks};
use crate::util::{Client, Daemon, Setup, login, plugins, repo_event_types, wait_exit, wait_until};

/// A `NOTIFY_SOCKET` of the test's own: every datagram the daemon sends, in order.
struct Notifications {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
    /// Every message read so far.
    seen: Vec<String>,
}

impl Notifications {
    fn new() -> Notifications {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Notifications {
            socket,
            path,
            _dir: dir,
            seen: Vec::new(),
        }
    }

    /// The environment that points a daemon at this socket.
    fn env(&self) -> (String, String) {
        ("NOTIFY_SOCKET".into(), self.path.display().to_string())
    }

    fn read(&mut self) -> Option<String> {
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8(buf[..n].to_vec()).unwrap();
                self.seen.push(message.clone());
                Some(message)
            }
            Err(_) => None,
        }
    }

    /// Reads until a message for which `f` holds arrives (within 60 s) and returns it.
    fn wait_for(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(m) = self.read()
                && f(&m)
            {
                return m;
            }
        }
        panic!("no {what} in {:#?}", self.seen);
    }

    /// Every message that arrives within `window` from now.
    fn during(&mut self, window: Duration) -> Vec<String> {
        let end = Instant::now() + window;
        let mut got = Vec::new();
        while Instant::now() < end {
            if let Some(m) = self.read() {
                got.push(m);
            }
        }
        got
    }
}

/// Whether `message` holds the line `line` (messages are newline-separated `KEY=VALUE` lines).
fn has(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

/// The value of `KEY=` in `message`.
fn value<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn ready_only_once_sinks_are_loaded_then_status_reload_and_stopping() {
    let mut notes = Notifications::new();
    let mut setup = with_sinks(
        &[sink(
            "rec",
            "recorder",
            "['user_*']",
            "{path: $DIR/received.jsonl}",
        )],
        &[("trail-test-recorder", "librecorder.so")],
        "",
    );
    setup.env = vec![notes.env(), ("TRAIL_TEST_NO_WATCH".into(), "1".into())];
    let mut daemon = Daemon::with(setup);

    let starting = notes.wait_for("STATUS=starting", |m| {
        value(m, "STATUS").is_some_and(|s| s.starts_with("starting"))
    });
    assert!(!has(&starting, "READY=1"), "{starting}");
    let ready = notes.wait_for("READY=1", |m| has(m, "READY=1"));
    // The recorder creates its file when its instance is built: READY=1 came after every sink was loaded.
    assert!(
        daemon.path("received.jsonl").exists(),
        "READY=1 before the sink was built: {ready}"
    );
    let status = value(&ready, "STATUS").unwrap_or_else(|| panic!("no STATUS with READY: {ready}"));
    assert!(
        status.starts_with("accepting; ")
            && status.contains("events/s")
            && status.contains("rec backlog"),
        "{status}"
    );

    // The periodic status line counts what was stored.
    let mut client = daemon.client();
    for i in 0..20 {
        let answer = client.emit(&login(&format!("status {i}"))).unwrap();
        assert_eq!(answer["ok"], true, "{answer}");
    }
    notes.wait_for("a status line with a rate above zero", |m| {
        value(m, "STATUS").is_some_and(|s| s.contains("events/s") && !s.contains(" 0.0 events/s"))
    });

    // SIGHUP (what ExecReload= sends) and `trail reload` are announced: RELOADING=1 with the time, then READY=1.
    for how in ["SIGHUP", "admin"] {
        match how {
            "SIGHUP" => daemon.signal(libc::SIGHUP),
            _ => {
                let answer = daemon.admin(json!({"command": "reload"}));
                assert_eq!(answer["ok"], true, "{answer}");
            }
        }
        let reloading = notes.wait_for("RELOADING=1", |m| has(m, "RELOADING=1"));
        let usec: u64 = value(&reloading, "MONOTONIC_USEC")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MONOTONIC_USEC: {reloading}"));
        assert!(usec > 0);
        assert!(
            value(&reloading, "STATUS").is_some_and(|s| s.contains("reloading the plugins")),
            "{reloading}"
        );
        let after = notes.wait_for("READY=1 after the reload", |m| has(m, "READY=1"));
        assert!(
            value(&after, "STATUS").is_some_and(|s| s.starts_with("accepting")),
            "{after}"
        );
    }

    daemon.signal(libc::SIGTERM);
    notes.wait_for("STOPPING=1", |m| has(m, "STOPPING=1"));
    assert!(daemon.wait().success());
}

#[test]
fn sighup_without_sinks_keeps_the_daemon_running() {
    let mut notes = Notifications::new();
    let mut daemon = Daemon::with(Setup {
        env: vec![notes.env()],
        ..Setup::default()
    });
    notes.wait_for("READY=1", |m| has(m, "READY=1"));
    for _ in 0..3 {
        daemon.signal(libc::SIGHUP);
        notes.wait_for("RELOADING=1", |m| has(m, "RELOADING=1"));
        notes.wait_for("READY=1 after the reload", |m| has(m, "READY=1"));
    }
    let answer = daemon.client().emit(&login("after SIGHUP")).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    // Without sinks a reload still reads the configuration and the event types again.
    assert!(
        daemon.stderr().contains("configuration reloaded"),
        "{}",
        daemon.stderr()
    );
    assert!(daemon.stop().success(), "{}", daemon.stderr());
}

/// Sets the daemon's soft `RLIMIT_FSIZE` (`prlimit(2)` on another process: the test runs as its user).
fn set_file_size_limit(pid: u32, bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn watchdog_pings_stop_while_the_writer_cannot_store_and_resume_after() {
    let mut notes = Notifications::new();
    let daemon = Daemon::with(Setup {
        env: vec![notes.env(), ("WATCHDOG_USEC".into(), "2000000".into())],
        ..Setup::default()
    });
    notes.wait_for("READY=1", |m| has(m, "READY=1"));
    // Idle, nothing waiting: pinged.
    for _ in 0..3 {
        notes.wait_for("WATCHDOG=1 while idle", |m| has(m, "WATCHDOG=1"));
    }
    let answer = daemon
        .client()
        .emit(&login("before the disk fills"))
        .unwrap();
    assert_eq!(answer["ok"], true, "{answer}");

    // A full disk: no write to the log file can succeed any more (EFBIG), while clients keep submitting.
    let current = fs::metadata(daemon.log_dir.join("current")).unwrap().len();
    set_file_size_limit(daemon.pid(), Some(current));
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, refused, socket) = (stop.clone(), refused.clone(), daemon.socket.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let answer = c.emit(&login("while the disk is full")).unwrap();
                    assert_eq!(answer["ok"], false, "{answer}");
                    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    notes.wait_for("the status line saying the writer is stalled", |m| {
        value(m, "STATUS").is_some_and(|s| s.contains("no progress"))
    });
    // From then on, no ping while the clients keep failing (the watchdog would fire after 2 s).
    let quiet = notes.during(Duration::from_secs(4));
    assert!(
        !quiet.iter().any(|m| has(m, "WATCHDOG=1")),
        "pinged while the writer could not store: {quiet:#?}"
    );
    assert!(refused.load(Ordering::Relaxed) > 0);

    // The clients give up: nothing waits, the writer is idle, the pings resume (a restart would not help).
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    notes.wait_for("WATCHDOG=1 once nothing waits", |m| has(m, "WATCHDOG=1"));

    // Stalled again, then the disk has room: stored, pinged.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (stop, socket) = (stop.clone(), daemon.socket.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if c.emit(&login("until the disk has room")).unwrap()["ok"] == true {
                    return;
                }
            }
        })
    };
    notes.wait_for("the status line saying the writer is stalled again", |m| {
        value(m, "STATUS").is_some_and(|s| s.contains("no progress"))
    });
    set_file_size_limit(daemon.pid(), None);
    notes.wait_for("WATCHDOG=1 after the disk had room", |m| {
        has(m, "WATCHDOG=1")
    });
    client.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let answer = daemon
        .client()
        .emit(&login("after the disk had room"))
        .unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
}

/// A directory with a configuration for a daemon that is started by the test (not by the harness): the sockets
/// `trail.sock` and `admin.sock` in it.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new(extra: &str) -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let types = dir.path().join("event-types");
        fs::create_dir(&types).unwrap();
        for entry in fs::read_dir(repo_event_types()).unwrap() {
            let path = entry.unwrap().path();
            fs::copy(&path, types.join(path.file_name().unwrap())).unwrap();
        }
        fs::write(
            dir.path().join("trail.yaml"),
            format!(
                "socket: {{path: trail.sock, mode: \"0660\"}}\nadmin_socket: admin.sock\nevent_types: event-types\n\
                 log: {{dir: log}}\nshutdown_grace: 20s\n{}",
                extra.replace("$DIR", dir.path().to_str().unwrap())
            ),
        )
        .unwrap();
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `traild --config trail.yaml`, run by `systemd-socket-activate` listening on `listen` with `names`.
    fn socket_activated(&self, listen: &[&str], names: &str) -> Command {
        let mut command = Command::new("/usr/bin/systemd-socket-activate");
        for l in listen {
            command.arg(format!("--listen={}", self.path(l).display()));
        }
        command
            .arg(format!("--fdname={names}"))
            .args(["-E", "RUST_LOG=info"])
            .arg(env!("CARGO_BIN_EXE_traild"))
            .arg("--config")
            .arg(self.path("trail.yaml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.path("stderr")).unwrap());
        command
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.path("stderr")).unwrap_or_default()
    }
}

#[test]
fn socket_activation_serves_a_client_that_connected_before_the_daemon_ran() {
    let scratch = Scratch::new("");
    // Listed admin first: the daemon goes by the names, not by the order.
    let mut activator = scratch
        .socket_activated(&["admin.sock", "trail.sock"], "admin:submission")
        .spawn()
        .unwrap();
    let socket = scratch.path("trail.sock");
    // Connected and written before traild runs: systemd-socket-activate starts it on this connection. It binds
    // before it listens: connecting is what says it is ready.
    let mut connected = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            connected = UnixStream::connect(&socket).ok();
            connected.is_some() && scratch.path("admin.sock").exists()
        }),
        "systemd-socket-activate did not listen:\n{}",
        scratch.stderr()
    );
    let inode = fs::metadata(&socket).unwrap().ino();
    let mut early = connected.unwrap();
    let mut line = serde_json::to_vec(&login("connected before the daemon ran")).unwrap();
    line.push(b'\n');
    early.write_all(&line).unwrap();
    early
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut answer = String::new();
    BufReader::new(&early).read_line(&mut answer).unwrap();
    let answer: Value = serde_json::from_str(&answer)
        .unwrap_or_else(|e| panic!("{e}: {answer:?}\n{}", scratch.stderr()));
    assert_eq!(answer["ok"], true, "{answer}");

    // The admin socket is the one named `admin`: it answers admin requests, from the process that was started.
    let status =
        trail::client::admin(&scratch.path("admin.sock"), &json!({"command": "status"})).unwrap();
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["pid"], activator.id(), "{status}");
    let more = Client::connect(&socket)
        .unwrap()
        .emit(&login("later"))
        .unwrap();
    assert_eq!(more["ok"], true, "{more}");
    assert_eq!(
        fs::metadata(&socket).unwrap().ino(),
        inode,
        "the daemon bound a socket of its own"
    );
    assert!(
        scratch.stderr().contains("socket_activated=true"),
        "{}",
        scratch.stderr()
    );

    unsafe { libc::kill(activator.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut activator, Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{}", scratch.stderr());
    // The sockets belong to whoever passed them: left in place for the next start.
    assert!(socket.exists() && scratch.path("admin.sock").exists());
    let log = fs::read_dir(scratch.path("log"))
        .unwrap()
        .filter_map(|e| fs::read_to_string(e.unwrap().path()).ok())
        .collect::<String>();
    assert!(log.contains("connected before the daemon ran"), "{log}");
}

#[test]
fn passed_sockets_that_do_not_match_the_configuration_are_refused() {
    for (listen, names, expected) in [
        // Bound to another path than socket.path.
        (&["other.sock"][..], "submission", "ListenStream="),
        // A name the daemon does not know.
        (&["trail.sock"][..], "trail.socket", "FileDescriptorName="),
        // Two sockets of the same name.
        (
            &["trail.sock", "admin.sock"][..],
            "submission:submission",
            "two sockets",
        ),
    ] {
        let scratch = Scratch::new("");
        let mut activator = scratch.socket_activated(listen, names).spawn().unwrap();
        let first = scratch.path(listen[0]);
        // The activator binds before it listens: connecting is what says it is ready.
        let mut trigger = None;
        assert!(
            wait_until(Duration::from_secs(20), || {
                trigger = UnixStream::connect(&first).ok();
                trigger.is_some()
            }),
            "{}",
            scratch.stderr()
        );
        let status = wait_exit(&mut activator, Duration::from_secs(30));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(trail::EXIT_CONFIG),
            "{listen:?} {names}:\n{}",
            scratch.stderr()
        );
        assert!(
            scratch.stderr().contains(expected),
            "{listen:?} {names}: no {expected:?} in\n{}",
            scratch.stderr()
        );
    }
}

/// The commands of `ExecReload=` in the shipped unit, run as systemd runs them: in order, each only after the one
/// before succeeded, `$MAINPID` the daemon's pid. Returns the exit code of the first that failed, if one did.
fn exec_reload(daemon: &Daemon) -> Option<i32> {
    let unit =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/trail.service"))
            .unwrap();
    let commands: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("ExecReload="))
        .collect();
    assert!(commands.len() >= 2, "{commands:?}");
    for command in commands {
        let words: Vec<String> = command
            .split_whitespace()
            .map(|w| {
                w.replace("/usr/bin/traild", env!("CARGO_BIN_EXE_traild"))
                    .replace("/etc/trail/trail.yaml", daemon.config.to_str().unwrap())
                    .replace("$MAINPID", &daemon.pid().to_string())
            })
            .collect();
        let status = Command::new(&words[0])
            .args(&words[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if !status.success() {
            return Some(status.code().unwrap_or(-1));
        }
    }
    None
}

#[test]
fn exec_reload_refuses_an_invalid_configuration_and_the_old_one_keeps_running() {
    let mut notes = Notifications::new();
    let mut daemon = Daemon::with(Setup {
        env: vec![notes.env()],
        ..Setup::default()
    });
    notes.wait_for("READY=1", |m| has(m, "READY=1"));
    let good = fs::read_to_string(&daemon.config).unwrap();
    fs::write(&daemon.config, format!("{good}no_such_key: 1\n")).unwrap();
    assert_eq!(exec_reload(&daemon), Some(trail::EXIT_CONFIG));
    // Not signalled: no reload was announced, and the daemon serves as before.
    let after = notes.during(Duration::from_millis(500));
    assert!(!after.iter().any(|m| has(m, "RELOADING=1")), "{after:#?}");
    let answer = daemon.client().emit(&login("still serving")).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");

    fs::write(&daemon.config, good).unwrap();
    assert_eq!(exec_reload(&daemon), None);
    notes.wait_for("RELOADING=1", |m| has(m, "RELOADING=1"));
    notes.wait_for("READY=1 after the reload", |m| has(m, "READY=1"));
    assert!(daemon.stop().success(), "{}", daemon.stderr());
}

#[test]
fn plugins_load_under_memory_deny_write_execute() {
    let scratch = Scratch::new(&format!(
        "plugins_dir: plugins\nsinks:\n{}",
        sink(
            "rec",
            "recorder",
            "['user_*']",
            "{path: $DIR/received.jsonl}"
        )
    ));
    crate::util::install_plugin(
        &scratch.path("plugins"),
        &plugins::library("trail-test-recorder"),
        "librecorder.so",
    );
    let mut command = Command::new(env!("CARGO_BIN_EXE_traild"));
    command
        .arg("--config")
        .arg(scratch.path("trail.yaml"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(scratch.path("stderr")).unwrap());
    // What MemoryDenyWriteExecute=yes asks of the kernel (PR_SET_MDWE, Linux 6.3 and later): no mapping both
    // writable and executable, none made executable later; kept across exec. prctl(2) is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_MDWE,
                libc::PR_MDWE_REFUSE_EXEC_GAIN as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_GET_MDWE, 0, 0, 0, 0) != libc::PR_MDWE_REFUSE_EXEC_GAIN as i32 {
                return Err(std::io::Error::other("PR_SET_MDWE did not take effect"));
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .expect("starting traild under PR_SET_MDWE (needs Linux 6.3 or later)");
    let socket = scratch.path("trail.sock");
    let up = wait_until(Duration::from_secs(30), || {
        UnixStream::connect(&socket).is_ok()
    });
    if !up {
        let _ = child.kill();
        panic!("traild did not start under MDWE:\n{}", scratch.stderr());
    }
    let answer = Client::connect(&socket)
        .unwrap()
        .emit(&login("under mdwe"))
        .unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    let received = crate::util::wait_recorded(&scratch.path("received.jsonl"), 1);
    assert_eq!(received[0]["type"], "user_login");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{}", scratch.stderr());
}
