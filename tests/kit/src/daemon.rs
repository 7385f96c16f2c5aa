//! The daemon launcher: a temp dir, a config, the real `traild`, and what it wrote.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// How long a daemon may take to open its socket.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long a daemon may take to exit after a signal.
const STOP_DEADLINE: Duration = Duration::from_secs(60);

/// The repository's own event types.
pub fn repo_event_types() -> PathBuf {
    crate::workspace().join("event-types")
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

/// Installs `library` into `dir` as `name`: written to a hidden temporary name, then renamed into place.
pub fn install_plugin(dir: &Path, library: &Path, name: &str) {
    fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::copy(library, &tmp).unwrap();
    fs::rename(&tmp, dir.join(name)).unwrap();
}

/// What to start a daemon with.
pub struct Setup {
    /// Extra lines appended to the generated config (`$DIR` stands for the daemon's temp dir).
    pub extra_config: String,
    /// `fsync` policy.
    pub fsync: &'static str,
    /// Event-type files written next to copies of the repository's types: (file name, content).
    pub extra_types: Vec<(String, String)>,
    /// Plugin libraries installed before start: (library, installed file name).
    pub plugins: Vec<(PathBuf, String)>,
    /// Extra environment variables of the daemon (`RUST_LOG` is `info` unless set here).
    pub env: Vec<(String, String)>,
    /// Extra settings of the `log:` section, e.g. `max_file_bytes: 4096`.
    pub log: Option<String>,
    /// The daemon's umask, when not the caller's own.
    pub umask: Option<libc::mode_t>,
    /// `shutdown_grace` in the config (`None` leaves the key out, for daemons older than it).
    pub shutdown_grace: Option<&'static str>,
    /// Where the log directory goes, when not in the temp dir: a fresh directory is made under
    /// this one (a benchmark's file system of choice; the socket stays in the short temp dir).
    pub log_parent: Option<PathBuf>,
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
            shutdown_grace: Some("20s"),
            log_parent: None,
        }
    }
}

/// A running (or stopped) `traild` in its own temp dir, killed when dropped while running.
pub struct Daemon {
    /// The temp dir: config, socket, event types, plugins, standard error of each run.
    pub dir: tempfile::TempDir,
    /// The ingest socket.
    pub socket: PathBuf,
    /// The log directory.
    pub log_dir: PathBuf,
    /// The configuration file.
    pub config: PathBuf,
    traild: PathBuf,
    child: Option<Child>,
    starts: u32,
    env: Vec<(String, String)>,
    umask: Option<libc::mode_t>,
    /// Holds `log_dir` when it is outside `dir`; dropped after the child.
    _log_parent: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Writes the setup into a fresh temp dir and starts `traild` on it; panics when it does not come up.
    pub fn with(traild: &Path, setup: Setup) -> Daemon {
        let mut daemon = Daemon::prepare(traild, setup).unwrap();
        daemon.spawn();
        daemon
    }

    /// As [`with`](Self::with), returning what went wrong instead of panicking.
    pub fn try_with(traild: &Path, setup: Setup) -> Result<Daemon> {
        let mut daemon = Daemon::prepare(traild, setup)?;
        daemon.try_spawn()?;
        Ok(daemon)
    }

    fn prepare(traild: &Path, setup: Setup) -> Result<Daemon> {
        let dir = tempfile::tempdir().context("creating the daemon's temp dir")?;
        let types = dir.path().join("event-types");
        fs::create_dir(&types)?;
        for entry in fs::read_dir(repo_event_types())? {
            let path = entry?.path();
            fs::copy(&path, types.join(path.file_name().unwrap()))?;
        }
        for (name, text) in &setup.extra_types {
            fs::write(types.join(name), text)?;
        }
        let plugins = dir.path().join("plugins");
        fs::create_dir(&plugins)?;
        for (library, name) in &setup.plugins {
            install_plugin(&plugins, library, name);
        }
        let log_parent = match &setup.log_parent {
            Some(parent) => {
                fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
                Some(
                    tempfile::Builder::new()
                        .prefix("trail-")
                        .tempdir_in(parent)
                        .with_context(|| format!("creating a directory in {}", parent.display()))?,
                )
            }
            None => None,
        };
        let (log_dir, log_key) = match &log_parent {
            Some(parent) => {
                let log_dir = parent.path().join("log");
                let quoted = serde_json::to_string(&log_dir.to_string_lossy())?;
                (log_dir, quoted)
            }
            None => (dir.path().join("log"), "log".to_owned()),
        };
        let config = dir.path().join("trail.yaml");
        fs::write(
            &config,
            format!(
                "socket: {{path: trail.sock}}\nevent_types: event-types\nlog: {{dir: {log_key}, fsync: {}{}}}\n{}{}",
                setup.fsync,
                setup
                    .log
                    .as_ref()
                    .map(|l| format!(", {l}"))
                    .unwrap_or_default(),
                setup
                    .shutdown_grace
                    .map(|g| format!("shutdown_grace: {g}\n"))
                    .unwrap_or_default(),
                setup
                    .extra_config
                    .replace("$DIR", dir.path().to_str().unwrap())
            ),
        )?;
        Ok(Daemon {
            socket: dir.path().join("trail.sock"),
            log_dir,
            config,
            dir,
            traild: traild.to_owned(),
            child: None,
            starts: 0,
            env: setup.env,
            umask: setup.umask,
            _log_parent: log_parent,
        })
    }

    /// Starts the binary on this daemon's config and waits until the socket accepts; panics when it does not.
    pub fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e:#}");
        }
    }

    /// Starts the binary on this daemon's config and waits until the socket accepts (and the admin socket, when it
    /// is in its default place).
    pub fn try_spawn(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let stderr = fs::File::create(self.stderr_path(self.starts))?;
        let mut command = Command::new(&self.traild);
        command
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
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
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", self.traild.display()))?;
        let mut exited = None;
        let up = wait_until(START_DEADLINE, || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
        });
        if let Some(status) = exited {
            bail!("traild exited early with {status}:\n{}", self.stderr());
        }
        if !up {
            let _ = child.kill();
            let _ = child.wait();
            bail!("traild did not open its socket:\n{}", self.stderr());
        }
        // The admin socket is bound just after: a test may ask it at once. (A configuration that moved it
        // elsewhere waits here in vain for a while, and goes on.)
        wait_until(Duration::from_secs(10), || {
            matches!(child.try_wait(), Ok(Some(_)))
                || std::os::unix::net::UnixStream::connect(self.admin_socket()).is_ok()
        });
        self.child = Some(child);
        Ok(())
    }

    fn stderr_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("traild.{start}.stderr"))
    }

    /// The file the latest run writes its standard error to.
    pub fn stderr_file(&self) -> PathBuf {
        self.stderr_path(self.starts)
    }

    /// What the latest run wrote to standard error.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.stderr_file()).unwrap_or_default()
    }

    /// The last `n` lines the latest run wrote to standard error, under a heading.
    pub fn stderr_tail(&self, n: usize) -> String {
        let text = self.stderr();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "--- last lines of traild's stderr ---\n{}",
            lines[from..].join("\n")
        )
    }

    /// Whether the daemon was started and not yet waited for.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    /// SIGTERM, then waits for the exit, which must be a clean one.
    pub fn stop_cleanly(&mut self) -> Result<()> {
        let status = self.stop();
        if !status.success() {
            bail!(
                "traild exited with {status} after SIGTERM\n{}",
                self.stderr_tail(30)
            );
        }
        Ok(())
    }

    /// SIGKILL, then waits for the exit.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait();
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        let pid = self.pid() as i32;
        // SAFETY: kill(2) on our own child, not reaped yet, so the pid is still ours.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Waits for the daemon to exit; panics (after killing it) when it does not.
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_exit(&mut child, STOP_DEADLINE)
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

    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.path("admin.sock")
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
