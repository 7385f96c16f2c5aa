//! A PostgreSQL server of the test's own: a copy of an `initdb`-made data directory in a temporary directory,
//! `postgres` in the foreground on a free loopback port (no Unix socket), run as the `postgres` user when the
//! tests run as root (the server refuses to run as root). The superuser `postgres` gets in from loopback without a password; the role
//! `trail` (password [`PASSWORD`]) owns the database `audit`, which the sink writes to. Stopped by its
//! process id when dropped. Used by the plugin's tests and benchmark and by the daemon's end-to-end tests.

#![allow(dead_code)]

use std::{
    fs,
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The password of the role `trail`.
pub const PASSWORD: &str = "trail-password";

/// Generous: the machine may be busy building.
const READY_DEADLINE: Duration = Duration::from_secs(120);

/// How a server is set up.
#[derive(Default)]
pub struct Options {
    /// A certificate chain and its key (PEM) for TLS; without, the server has TLS off.
    pub tls: Option<(String, String)>,
    /// `fsync` stays on (for the benchmark); tests turn it off, which loses nothing when only processes die.
    pub durable: bool,
}

/// A PostgreSQL server in a temporary directory.
pub struct Server {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    options: Options,
}

impl Server {
    /// A running server without TLS.
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    /// A running server.
    pub fn start_with(options: Options) -> Self {
        let mut server = Self::prepare(options);
        server.run();
        server
    }

    /// A server set up with its port chosen, not running yet: [`run`](Self::run) starts it.
    pub fn prepare(options: Options) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("trail-postgres")
            .tempdir()
            .unwrap();
        let owner = server_user();
        if let Some((uid, gid)) = owner {
            chown(dir.path(), uid, gid);
        }
        let data = dir.path().join("data");
        let status = Command::new("cp")
            .arg("-a")
            .arg(template())
            .arg(&data)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "copying the template data directory: {status}"
        );
        fs::write(
            data.join("pg_hba.conf"),
            "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        if let Some((cert, key)) = &options.tls {
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = data.join(name);
                fs::write(&path, pem).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
                if let Some((uid, gid)) = owner {
                    chown(&path, uid, gid);
                }
            }
        }
        // Free now; taken again by the server (the window for another process to take it first is tiny).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            dir,
            port,
            child: None,
            options,
        }
    }

    /// Starts the server (again) on its port and waits until it answers; creates the role and database the
    /// first time.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let data = self.dir.path().join("data");
        let mut command = as_server_user(&bin("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "unix_socket_directories="])
            .args(["-c", "max_connections=30", "-c", "shared_buffers=32MB"]);
        if !self.options.durable {
            command.args(["-c", "fsync=off"]);
        }
        if self.options.tls.is_some() {
            command.args(["-c", "ssl=on"]);
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting postgres");
        self.child = Some(child);
        let started = Instant::now();
        let mut admin = loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("postgres exited ({status}): {}", self.log());
            }
            match postgres::Client::connect(&self.superuser_url("postgres"), postgres::NoTls) {
                Ok(client) => break client,
                Err(e) => assert!(
                    started.elapsed() < READY_DEADLINE,
                    "postgres did not answer: {e}: {}",
                    self.log()
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let exists = admin
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = 'trail'", &[])
            .unwrap()
            .is_some();
        if !exists {
            admin
                .batch_execute(&format!("CREATE ROLE trail LOGIN PASSWORD '{PASSWORD}'"))
                .unwrap();
            admin
                .batch_execute("CREATE DATABASE audit OWNER trail")
                .unwrap();
        }
    }

    /// Stops the server at once, as a crash would (`SIGQUIT`: immediate shutdown), and waits for it.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("running");
        unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
        child.wait().unwrap();
    }

    /// The port it listens on (also while it is not running).
    /// The process id of what was started (the postmaster, or the command that runs it as `postgres`) while
    /// it runs: its descendants are the server's processes.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection as the superuser to the database `audit`.
    pub fn admin(&self) -> postgres::Client {
        postgres::Client::connect(&self.superuser_url("audit"), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting as postgres: {e}: {}", self.log()))
    }

    fn superuser_url(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname} connect_timeout=10",
            self.port
        )
    }

    /// The sink's configuration for this server as the role `trail`, without TLS.
    pub fn sink_config(&self) -> serde_json::Value {
        serde_json::json!({
            "host": "127.0.0.1",
            "port": self.port,
            "user": "trail",
            "password": PASSWORD,
            "dbname": "audit",
            "sslmode": "disable",
        })
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
            let _ = child.wait();
        }
    }
}

/// A data directory made by `initdb` (owned by the server's user), copied for each server: much quicker than
/// running `initdb` each time. Kept beside the test binaries (in the target directory) across runs, one per
/// PostgreSQL installation; put in place by a rename, so a half-made one is never used.
fn template() -> PathBuf {
    static TEMPLATE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let initdb = bin("initdb");
            let name: String = initdb
                .to_string_lossy()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let exe = std::env::current_exe().unwrap();
            let path = exe
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join(format!("postgres-template{name}"));
            if path.join("PG_VERSION").exists() {
                return path;
            }
            let scratch = tempfile::Builder::new()
                .prefix("trail-initdb")
                .tempdir()
                .unwrap();
            if let Some((uid, gid)) = server_user() {
                chown(scratch.path(), uid, gid);
            }
            let made = scratch.path().join("data");
            let log = scratch.path().join("initdb.log");
            let status = as_server_user(&initdb)
                .arg("-D")
                .arg(&made)
                .args(["-N", "-A", "trust", "-U", "postgres", "-E", "UTF8"])
                .args(["--locale=C.UTF-8", "--no-instructions"])
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).unwrap())
                .status()
                .expect("running initdb");
            assert!(
                status.success(),
                "initdb failed ({status}): {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            let staged = path.with_extension(format!("tmp{}", std::process::id()));
            let copied = Command::new("cp")
                .arg("-a")
                .arg(&made)
                .arg(&staged)
                .status()
                .unwrap();
            assert!(copied.success(), "copying {}: {copied}", made.display());
            // Another test process may have put its own in place meanwhile: either is good.
            if fs::rename(&staged, &path).is_err() {
                let _ = fs::remove_dir_all(&staged);
            }
            path
        })
        .clone()
}

/// The newest installed PostgreSQL's program `name` (Debian keeps them in /usr/lib/postgresql/<version>/bin).
fn bin(name: &str) -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin").join(name)))
        })
        .filter(|(_, path)| path.exists())
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, path)) => path,
        None => {
            let found = Command::new(name).arg("--version").output();
            assert!(
                found.is_ok(),
                "{name} not found: install PostgreSQL (apt-get install postgresql)"
            );
            name.into()
        }
    }
}

/// The uid and gid of the `postgres` user when the tests run as root (who may not run the server).
fn server_user() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Some((uid, gid)),
        _ => panic!("running as root, but there is no postgres user to run the server as"),
    }
}

/// `program`, run as the `postgres` user when the tests run as root.
fn as_server_user(program: &Path) -> Command {
    match server_user() {
        Some((uid, gid)) => {
            let mut command = Command::new("setpriv");
            command
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(program);
            command
        }
        None => Command::new(program),
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(
        unsafe { libc::chown(c.as_ptr(), uid, gid) },
        0,
        "chown {}",
        path.display()
    );
}
