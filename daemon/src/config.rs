//! Configuration: the YAML file `traild --config` reads, its defaults, and the embedded development default.
//!
//! Owns parsing and checking of settings only; it never opens sockets or log files. Relative paths in a
//! configuration file are resolved against the directory that holds the file, so a config means the same thing
//! whatever the daemon's working directory is.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Everything `traild` needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect.
    pub socket: SocketConfig,
    /// Directory of event-type definitions (`<name>.yml`).
    pub event_types: PathBuf,
    /// The durable JSON-lines log.
    pub log: LogConfig,
    /// Limits on what clients may send.
    #[serde(default)]
    pub limits: Limits,
    /// How long shutdown may take to acknowledge what was already read before the daemon exits anyway.
    #[serde(default = "default_grace", deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// Host name stamped into `source.host`; defaults to the kernel's host name.
    #[serde(default)]
    pub host_name: Option<String>,
    /// Directory of sink plugin libraries (`*.so`), watched for new and replaced files.
    #[serde(default)]
    pub plugins_dir: Option<PathBuf>,
    /// The durable queue of streamed events; used when sinks are configured.
    #[serde(default)]
    pub spool: SpoolSettings,
    /// Where streamed events go.
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
    /// The admin socket (`trail status`, `trail reload`, `trail replay`); default: `admin.sock` beside the
    /// submission socket.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// The group of the files and directories the daemon writes.
    #[serde(default)]
    pub files: FilesConfig,
    /// How long, and for how many keys, repeated submissions with the same `idempotency_key` are recognised.
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    /// Metrics over HTTP (they are always served on the admin socket too).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Who may submit which event types (see [`crate::access`]).
    #[serde(default)]
    pub access: AccessConfig,
    /// The file this configuration was read from ([`Config::load`]); a reload reads it again. `None` for the
    /// embedded development configuration and for text given to [`Config::parse`].
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// The window of idempotency keys (see [`crate::idempotency`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// How long after a keyed event was stored a repeat of its key is recognised.
    #[serde(deserialize_with = "de_duration")]
    pub window: Duration,
    /// Most keys remembered; beyond it the oldest is forgotten first.
    pub max_keys: usize,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            window: Duration::from_secs(24 * 3600),
            max_keys: 250_000,
        }
    }
}

/// The metrics' HTTP listener (`GET /metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A loopback address and port (`127.0.0.1:9464`, `[::1]:9464`) to serve `GET /metrics` on; none by default.
    /// Other addresses are refused: the listener has neither authentication nor TLS.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// How the daemon's files are shared: files 0640, directories 0750 (the signing key 0600), in one group.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// Group (name or number) of every file and directory the daemon writes; default: the daemon's own group.
    #[serde(default)]
    pub group: Option<String>,
    /// `group` as a group id, looked up when the configuration is checked.
    #[serde(skip)]
    pub gid: Option<u32>,
}

/// Why a group cannot be given files (or the socket) by this process.
enum GroupProblem {
    /// No such group on this host.
    Missing(String),
    /// It exists, but this process is neither root nor a member.
    NotMember(String),
    /// The lookup failed.
    Lookup(String),
}

/// The id of group `name` (a name, or a number), checking that this process may give files to it; `key` names
/// the setting in messages, `what` what is given to the group.
fn group_id(key: &str, name: &str, what: &str) -> Result<u32, GroupProblem> {
    let found = nix::unistd::Group::from_name(name)
        .map_err(|e| GroupProblem::Lookup(format!("{key}: cannot look up group {name:?}: {e}")))?;
    let gid = match (found, name.parse::<u32>()) {
        (Some(g), _) => g.gid.as_raw(),
        (None, Ok(n)) => n,
        (None, Err(_)) => {
            return Err(GroupProblem::Missing(format!(
                "{key}: there is no group {name:?} on this host; give a group name or number"
            )));
        }
    };
    let member = unsafe { libc::geteuid() } == 0
        || unsafe { libc::getegid() } == gid
        || nix::unistd::getgroups().is_ok_and(|g| g.iter().any(|g| g.as_raw() == gid));
    if !member {
        return Err(GroupProblem::NotMember(format!(
            "{key}: this user is not a member of group {name:?} ({gid}), so the daemon cannot give {what} to \
             it; add the daemon's user to the group"
        )));
    }
    Ok(gid)
}

impl GroupProblem {
    fn message(self) -> String {
        match self {
            GroupProblem::Missing(m) | GroupProblem::NotMember(m) | GroupProblem::Lookup(m) => m,
        }
    }
}

/// The spool as written in the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolSettings {
    /// Directory of spool segments and sink cursors; default: `spool` beside the log directory.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Most bytes of undelivered events kept; default 1 GiB.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_bytes: Option<u64>,
    /// What happens when it is full.
    #[serde(default)]
    pub when_full: WhenFull,
}

/// Size of a spool segment file. Small, so that the spool's footprint in the page cache stays close to what sinks
/// have not confirmed: a segment's pages are freed as soon as every sink is past it, and taken again for the next
/// segments, instead of the spool growing over pages that hold more useful data.
const SEGMENT_BYTES: u64 = 8 << 20;
/// Newest spooled records kept in memory for sinks that keep up (see [`SpoolConfig::memory_bytes`]).
const MEMORY_BYTES: u64 = 16 << 20;

/// The spool, resolved.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory.
    pub dir: PathBuf,
    /// Bound on undelivered bytes.
    pub max_bytes: u64,
    /// Policy when full.
    pub when_full: WhenFull,
    /// Size at which a segment file is closed and a new one started.
    pub segment_bytes: u64,
    /// Whether segment files are synced when they are closed and created (the log's `fsync: always`).
    pub sync: bool,
    /// About this many bytes of the newest published records are also kept in memory: sinks reading there take
    /// them without a system call, a copy or a parse of their own.
    pub memory_bytes: u64,
    /// The log directory: the spool refers to records that are in the log too instead of holding them twice.
    pub log_dir: PathBuf,
}

/// What to do when the spool is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Clients wait until sinks catch up: nothing is lost. The default.
    #[default]
    Block,
    /// The slowest sinks skip their oldest events; every skipped event is counted and audited.
    DropOldest,
}

/// One sink: an instance of a plugin with its own configuration, filter, batching and retry policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Unique name, used in logs, status, cursor and dead-letter files.
    pub name: String,
    /// The name the plugin declares.
    pub plugin: String,
    /// Which events it receives.
    #[serde(default)]
    pub events: crate::filter::FilterConfig,
    /// Passed to the plugin's constructor as JSON.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// How records are grouped into writes.
    #[serde(default)]
    pub batch: BatchConfig,
    /// How failed writes are retried.
    #[serde(default)]
    pub retry: RetryConfig,
    /// A sink with undelivered events and no progress for this long is reported stuck.
    #[serde(default = "default_stuck", deserialize_with = "de_duration")]
    pub stuck_after: Duration,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

fn default_stuck() -> Duration {
    Duration::from_secs(60)
}

/// Batching of one sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most records per write.
    pub max_events: usize,
    /// About the most bytes of record lines per write.
    #[serde(deserialize_with = "de_size")]
    pub max_bytes: u64,
    /// Longest a record waits for its batch to fill.
    #[serde(deserialize_with = "de_duration")]
    pub max_wait: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: 500,
            max_bytes: 1 << 20,
            max_wait: Duration::from_millis(200),
        }
    }
}

/// Retries of one sink: exponential backoff with full jitter between `initial` and `max`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First delay.
    #[serde(deserialize_with = "de_duration")]
    pub initial: Duration,
    /// Cap on the delay.
    #[serde(deserialize_with = "de_duration")]
    pub max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

/// The submission socket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    /// Filesystem path of the Unix stream socket.
    pub path: PathBuf,
    /// Permission bits of the socket file, as an octal string such as `"0660"`.
    #[serde(default = "default_mode", deserialize_with = "de_mode")]
    pub mode: u32,
    /// Group (name or number) of the socket file; not set means [`DEFAULT_SOCKET_GROUP`], or the daemon's own
    /// group when that does not exist (see [`SocketConfig::gid`]).
    #[serde(default)]
    pub group: Option<String>,
    /// The socket file's group as an id, resolved when the configuration is checked: `group`'s, or
    /// [`DEFAULT_SOCKET_GROUP`]'s when `group` is not set and that group exists and this process may use it;
    /// `None`: the daemon's own effective group (then [`SocketConfig::group_warning`] says why).
    #[serde(skip)]
    pub gid: Option<u32>,
    /// Why the socket keeps the daemon's own group although `group` was left at its default (logged at start).
    #[serde(skip)]
    pub group_warning: Option<String>,
}

/// The socket's group when `socket.group` is not set: the group the package creates (`systemd/trail.sysusers`),
/// whose members may submit.
pub const DEFAULT_SOCKET_GROUP: &str = "trail";

impl SocketConfig {
    /// A socket at `path` with permission bits `mode` and the daemon's own group.
    pub fn at(path: PathBuf, mode: u32) -> SocketConfig {
        SocketConfig {
            path,
            mode,
            group: None,
            gid: None,
            group_warning: None,
        }
    }

    /// Resolves `group` to [`SocketConfig::gid`]: a group that was set must exist and be one this process may give
    /// the socket to; the default one may be missing (then the daemon's own group, with a warning).
    fn resolve_group(&mut self) -> Result<(), String> {
        match &self.group {
            Some(name) => {
                self.gid = Some(
                    group_id("socket.group", name, "the socket").map_err(GroupProblem::message)?,
                );
            }
            None => match group_id("socket.group", DEFAULT_SOCKET_GROUP, "the socket") {
                Ok(gid) => self.gid = Some(gid),
                Err(GroupProblem::Missing(_)) => {
                    self.group_warning = Some(format!(
                        "socket.group is not set and there is no group {DEFAULT_SOCKET_GROUP:?} on this host: the \
                         socket keeps the daemon's own group; set socket.group to the group whose members may submit"
                    ));
                }
                Err(GroupProblem::NotMember(m) | GroupProblem::Lookup(m)) => {
                    self.group_warning = Some(format!(
                        "{m}; the socket keeps the daemon's own group (socket.group is not set)"
                    ));
                }
            },
        }
        Ok(())
    }
}

/// The durable log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Directory that holds the log files.
    pub dir: PathBuf,
    /// Whether an acknowledgement waits for `fdatasync`.
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// When a new file is started by the clock.
    #[serde(default)]
    pub rotate: Rotate,
    /// A file that would grow past this is closed and a new one started.
    #[serde(default = "default_max_file_bytes", deserialize_with = "de_size")]
    pub max_file_bytes: u64,
    /// Closed files older than this are deleted (oldest first); none when absent.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub retention: Option<Duration>,
    /// The oldest closed files are deleted while all files together are larger than this; none when absent.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub retention_bytes: Option<u64>,
    /// Longer retention for some event types: a file is kept while it holds an event of a type listed here that
    /// is younger than the type's period (type name globs allowed).
    #[serde(default, deserialize_with = "de_duration_map")]
    pub retention_by_type: Vec<(String, Duration)>,
    /// Compress closed files with zstd (`….jsonl.zst`).
    #[serde(default)]
    pub compress: bool,
    /// A signed checkpoint is written at least this often while records arrive (and at every rotation and stop).
    #[serde(default = "default_checkpoint_every", deserialize_with = "de_duration")]
    pub checkpoint_every: Duration,
    /// Ed25519 private key (PKCS#8 PEM) that signs checkpoints; generated on first start when missing.
    /// Default: `keys/checkpoint-ed25519.pem` beside the log directory.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
}

/// When the clock starts a new log file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rotate {
    /// At every UTC midnight. The default.
    #[default]
    Daily,
    /// At the start of every UTC hour.
    Hourly,
    /// Only by size.
    Never,
}

impl Rotate {
    /// The length of a period in seconds, `None` for [`Rotate::Never`].
    pub fn period_secs(self) -> Option<i64> {
        match self {
            Rotate::Daily => Some(86_400),
            Rotate::Hourly => Some(3_600),
            Rotate::Never => None,
        }
    }
}

fn default_max_file_bytes() -> u64 {
    256 << 20
}

fn default_checkpoint_every() -> Duration {
    Duration::from_secs(600)
}

impl LogConfig {
    /// A log in `dir` with every other setting at its default.
    pub fn in_dir(dir: PathBuf) -> LogConfig {
        LogConfig {
            dir,
            fsync: FsyncPolicy::Always,
            rotate: Rotate::Daily,
            max_file_bytes: default_max_file_bytes(),
            retention: None,
            retention_bytes: None,
            retention_by_type: Vec::new(),
            compress: false,
            checkpoint_every: default_checkpoint_every(),
            signing_key: None,
        }
    }

    /// The checkpoint signing key's path.
    pub fn signing_key(&self) -> PathBuf {
        self.signing_key.clone().unwrap_or_else(|| {
            self.dir
                .parent()
                .unwrap_or(Path::new("."))
                .join("keys")
                .join("checkpoint-ed25519.pem")
        })
    }
}

/// When the log is synced to stable storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Acknowledge only after `fdatasync` (group commit). The default.
    #[default]
    Always,
    /// Acknowledge after `write(2)`: survives a daemon crash, not a power loss.
    Never,
}

/// Limits on clients and what they send.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest request line in bytes, newline excluded; longer lines are answered `too_large`.
    #[serde(deserialize_with = "de_size_usize")]
    pub max_line_bytes: usize,
    /// Most submission connections open at once; a client beyond it is answered `too_many_connections` and closed.
    pub max_connections: usize,
    /// A connection that sends nothing for this long (or does not read the answers waiting for it) is closed.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// Most bytes of unfinished request lines held across all connections; a connection whose line needs more
    /// waits (the daemon stops reading from it) until some is free.
    #[serde(deserialize_with = "de_size_usize")]
    pub max_buffered_bytes: usize,
    /// Events per second each uid may submit (a token bucket per uid); none when absent.
    pub rate_per_uid: Option<f64>,
    /// How many events a uid may submit at once above its rate (the bucket's size); default: one second's worth
    /// of `rate_per_uid`, at least 1.
    pub rate_burst: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 1 << 20,
            max_connections: 1024,
            idle_timeout: Duration::from_secs(300),
            max_buffered_bytes: 64 << 20,
            rate_per_uid: None,
            rate_burst: None,
        }
    }
}

/// The `access:` section: which peers may submit which event types, and how their refusals are recorded.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Rules in order; for an event type, the first rule whose `types` match it decides.
    pub rules: Vec<AccessRule>,
    /// At most one `trail_submission_denied` record per (uid, type, code) per this interval.
    #[serde(deserialize_with = "de_duration")]
    pub denied_record_interval: Duration,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            rules: Vec::new(),
            denied_record_interval: Duration::from_secs(60),
        }
    }
}

/// One access rule: the event types it covers (globs, as a sink's `events.types`) and who may submit them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Glob patterns on type names (`*`, `?`, `noun:verb`); a leading `!` excludes.
    pub types: Vec<String>,
    /// Peers with these uids may submit.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Peers running as these users may submit (resolved to uids when the configuration is read).
    #[serde(default)]
    pub users: Vec<String>,
    /// Peers whose primary group (`SO_PEERCRED`) or whose user's groups include one of these gids may submit.
    #[serde(default)]
    pub gids: Vec<u32>,
    /// As `gids`, by group name (resolved to gids when the configuration is read).
    #[serde(default)]
    pub groups: Vec<String>,
    /// `users`, resolved.
    #[serde(skip)]
    pub user_ids: Vec<u32>,
    /// `groups`, resolved.
    #[serde(skip)]
    pub group_ids: Vec<u32>,
}

impl AccessConfig {
    /// Resolves user and group names to ids; an unknown name is an error naming the rule.
    fn resolve(&mut self) -> Result<(), String> {
        for (i, rule) in self.rules.iter_mut().enumerate() {
            rule.user_ids = ids(
                &format!("access.rules[{i}].users"),
                &rule.users,
                "user",
                "uids",
                |n| nix::unistd::User::from_name(n).map(|u| u.map(|u| u.uid.as_raw())),
            )?;
            rule.group_ids = ids(
                &format!("access.rules[{i}].groups"),
                &rule.groups,
                "group",
                "gids",
                |n| nix::unistd::Group::from_name(n).map(|g| g.map(|g| g.gid.as_raw())),
            )?;
        }
        Ok(())
    }
}

/// The ids of `names` (`what`: user or group, whose ids are `id`s) by `lookup`; an unknown name is an error at
/// `key` that points to the setting of ids (`uids`, `gids`).
fn ids(
    key: &str,
    names: &[String],
    what: &str,
    id: &str,
    lookup: impl Fn(&str) -> nix::Result<Option<u32>>,
) -> Result<Vec<u32>, String> {
    names
        .iter()
        .map(|name| match lookup(name) {
            Ok(Some(found)) => Ok(found),
            Ok(None) => Err(format!(
                "{key}: there is no {what} {name:?} on this host; give an existing {what} name, or the {id} under {id}s"
            )),
            Err(e) => Err(format!("{key}: cannot look up {what} {name:?}: {e}")),
        })
        .collect()
}

/// Bytes of an unfinished line each connection may hold without taking a line slot: the part of
/// `limits.max_buffered_bytes` that every connection is sure to have (so that short lines never wait).
pub const SMALL_LINE_BYTES: usize = 16 << 10;

impl Limits {
    /// How many connections at once may hold a line longer than [`SMALL_LINE_BYTES`]: what is left of
    /// `max_buffered_bytes` after every connection's small share, in whole lines of `max_line_bytes`.
    pub fn line_slots(&self) -> usize {
        self.max_buffered_bytes
            .saturating_sub(self.max_connections.saturating_mul(SMALL_LINE_BYTES))
            / self.max_line_bytes.saturating_add(1)
    }
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

fn default_mode() -> u32 {
    0o660
}

/// A configuration that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid YAML or does not match the expected structure.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is well-formed but unusable.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Config::parse(&text, path, base)?;
        config.file = Some(path.to_owned());
        Ok(config)
    }

    /// Parses configuration text; `origin` names it in errors and `base` anchors relative paths.
    pub fn parse(text: &str, origin: &Path, base: &Path) -> Result<Config, Error> {
        let mut at = None;
        let mut options = serde_saphyr::Options::default();
        options.with_snippet = false;
        let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                at = Some(e.path().to_string());
                e.into_inner()
            })
        });
        let mut config: Config = parsed.map_err(|e| Error::Parse {
            path: origin.to_owned(),
            message: user_message(&e, at.as_deref()),
        })?;
        config.resolve(base);
        config.check(origin)?;
        let invalid = |message: String| Error::Invalid {
            path: origin.to_owned(),
            message,
        };
        if let Some(name) = &config.files.group {
            config.files.gid =
                Some(group_id("files.group", name, "its files").map_err(|p| invalid(p.message()))?);
        }
        config.socket.resolve_group().map_err(invalid)?;
        config.access.resolve().map_err(invalid)?;
        Ok(config)
    }

    /// The embedded default for development: socket under `$XDG_RUNTIME_DIR/trail/` (or `./run/` when it is not
    /// set), log under `./data/log`, event types from `./event-types`.
    pub fn development() -> Config {
        let socket = trail_client::development_socket();
        let mut config = Config {
            // Only the daemon's own user may connect: the group does not matter.
            socket: SocketConfig::at(socket, 0o600),
            event_types: PathBuf::from("event-types"),
            log: LogConfig::in_dir(PathBuf::from("data").join("log")),
            limits: Limits::default(),
            shutdown_grace: default_grace(),
            host_name: None,
            plugins_dir: None,
            spool: SpoolSettings::default(),
            sinks: Vec::new(),
            admin_socket: None,
            files: FilesConfig::default(),
            idempotency: IdempotencyConfig::default(),
            metrics: MetricsConfig::default(),
            access: AccessConfig::default(),
            file: None,
        };
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        config.resolve(&cwd);
        config
    }

    fn resolve(&mut self, base: &Path) {
        let optional = [
            self.plugins_dir.as_mut(),
            self.spool.dir.as_mut(),
            self.admin_socket.as_mut(),
            self.log.signing_key.as_mut(),
        ];
        for path in [
            Some(&mut self.socket.path),
            Some(&mut self.event_types),
            Some(&mut self.log.dir),
        ]
        .into_iter()
        .chain(optional)
        .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    fn check(&self, origin: &Path) -> Result<(), Error> {
        let invalid = |message: String| Error::Invalid {
            path: origin.to_owned(),
            message,
        };
        if self.limits.max_line_bytes < 256 {
            return Err(invalid(format!(
                "limits.max_line_bytes: {} is too small; use at least 256",
                self.limits.max_line_bytes
            )));
        }
        if self.idempotency.window.is_zero() || self.idempotency.max_keys == 0 {
            return Err(invalid(
                "idempotency.window and idempotency.max_keys must be above zero".into(),
            ));
        }
        let limits = &self.limits;
        if limits.max_connections == 0 {
            return Err(invalid("limits.max_connections: must be at least 1".into()));
        }
        if limits.idle_timeout < Duration::from_millis(100) {
            return Err(invalid("limits.idle_timeout: use at least 100ms".into()));
        }
        if limits.line_slots() == 0 {
            let least = limits
                .max_connections
                .saturating_mul(SMALL_LINE_BYTES)
                .saturating_add(limits.max_line_bytes.saturating_add(1));
            return Err(invalid(format!(
                "limits.max_buffered_bytes: {} is too small for {} connections and lines of {} bytes: every \
                 connection may hold {SMALL_LINE_BYTES} bytes of an unfinished line and one more must be able to \
                 hold a whole line; use at least {least}, or lower limits.max_connections or limits.max_line_bytes",
                limits.max_buffered_bytes, limits.max_connections, limits.max_line_bytes
            )));
        }
        if let Some(rate) = limits.rate_per_uid
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(invalid(format!(
                "limits.rate_per_uid: {rate} must be a number of events per second above zero; leave it out for \
                 no limit"
            )));
        }
        if let Some(burst) = limits.rate_burst {
            if limits.rate_per_uid.is_none() {
                return Err(invalid(
                    "limits.rate_burst is set but limits.rate_per_uid is not: set the rate too, or leave both out"
                        .into(),
                ));
            }
            if burst == 0 {
                return Err(invalid("limits.rate_burst: must be at least 1".into()));
            }
        }
        if self.access.denied_record_interval < Duration::from_secs(1) {
            return Err(invalid(
                "access.denied_record_interval: use at least 1s".into(),
            ));
        }
        for (i, rule) in self.access.rules.iter().enumerate() {
            let types = crate::filter::FilterConfig {
                types: rule.types.clone(),
                ..Default::default()
            };
            if let Err(e) = crate::filter::Filter::new(&types) {
                return Err(invalid(format!("access.rules[{i}].{e}")));
            }
        }
        if self.socket.mode > 0o777 {
            return Err(invalid(format!(
                "socket.mode: {:o} has bits beyond 0777",
                self.socket.mode
            )));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if self.socket.path.as_os_str().len() > 107 {
            return Err(invalid(format!(
                "socket.path: {} is longer than the 107 bytes a Unix socket path may have",
                self.socket.path.display()
            )));
        }
        if self.log.max_file_bytes < 4096 {
            return Err(invalid(format!(
                "log.max_file_bytes: {} is too small; use at least 4096",
                self.log.max_file_bytes
            )));
        }
        if self.log.checkpoint_every < Duration::from_secs(1) {
            return Err(invalid("log.checkpoint_every: use at least 1s".into()));
        }
        if self.log.retention.is_some_and(|r| r.is_zero()) || self.log.retention_bytes == Some(0) {
            return Err(invalid(
                "log.retention and log.retention_bytes must be above zero; leave them out to keep everything"
                    .into(),
            ));
        }
        if let Some(addr) = self.metrics.listen
            && !addr.ip().is_loopback()
        {
            return Err(invalid(format!(
                "metrics.listen: {addr} is not a loopback address; the metrics listener has neither \
                 authentication nor TLS, so give 127.0.0.1:PORT or [::1]:PORT and let Prometheus reach it through \
                 a proxy or a tunnel if it runs on another host"
            )));
        }
        if matches!(&self.host_name, Some(h) if h.trim().is_empty()) {
            return Err(invalid("host_name: must not be empty".into()));
        }
        if !self.sinks.is_empty() && self.plugins_dir.is_none() {
            return Err(invalid(
                "sinks are configured but plugins_dir is not: say where the plugin libraries are"
                    .into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, sink) in self.sinks.iter().enumerate() {
            let at = format!("sinks[{i}]");
            let valid_name = !sink.name.is_empty()
                && sink
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid_name {
                return Err(invalid(format!(
                    "{at}.name: {:?} must be letters, digits, '-' or '_' (it names files)",
                    sink.name
                )));
            }
            if !names.insert(&sink.name) {
                return Err(invalid(format!(
                    "{at}.name: {:?} is used by another sink; sink names must be unique",
                    sink.name
                )));
            }
            if sink.batch.max_events == 0 || sink.batch.max_bytes == 0 {
                return Err(invalid(format!(
                    "{at}.batch: max_events and max_bytes must be at least 1"
                )));
            }
            if sink.retry.initial.is_zero() || sink.retry.max < sink.retry.initial {
                return Err(invalid(format!(
                    "{at}.retry: initial must be above zero and max at least initial"
                )));
            }
            if let Err(e) = crate::filter::Filter::new(&sink.events) {
                return Err(invalid(format!("{at}.events: {e}")));
            }
        }
        Ok(())
    }

    /// The spool's settings with defaults filled in.
    pub fn spool(&self) -> SpoolConfig {
        SpoolConfig {
            dir: self.spool.dir.clone().unwrap_or_else(|| {
                self.log
                    .dir
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join("spool")
            }),
            max_bytes: self.spool.max_bytes.unwrap_or(1 << 30),
            when_full: self.spool.when_full,
            segment_bytes: SEGMENT_BYTES,
            sync: self.log.fsync == FsyncPolicy::Always,
            memory_bytes: MEMORY_BYTES,
            log_dir: self.log.dir.clone(),
        }
    }

    /// The admin socket's path.
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket.clone().unwrap_or_else(|| {
            self.socket
                .path
                .parent()
                .unwrap_or(Path::new("."))
                .join("admin.sock")
        })
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "socket {} (mode {:04o}), event types {}, log {} (fsync {:?})",
            self.socket.path.display(),
            self.socket.mode,
            self.event_types.display(),
            self.log.dir.display(),
            self.log.fsync
        )
    }
}

/// What a YAML or structure error says, for the person who wrote the file: where (line, column, key path) and
/// what is wrong, without the names of the types it is read into.
fn user_message(e: &serde_saphyr::Error, at: Option<&str>) -> String {
    let raw = e
        .without_snippet()
        .render_with_formatter(&serde_saphyr::UserMessageFormatter);
    // The rendering starts with the location, which is given below in a form of our own.
    let text = match raw.split_once(": ") {
        Some((head, rest)) if head.starts_with("error: line") || head.starts_with("line ") => rest,
        _ => raw.as_str(),
    };
    let text = text.strip_prefix("error: ").unwrap_or(text);
    let text = match text.rfind(" at line ") {
        Some(i) if text[i..].contains(", column ") => &text[..i],
        _ => text,
    };
    let number = text
        .strip_prefix("invalid ")
        .is_some_and(|t| matches!(t, "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64"));
    let what = if number {
        "is not a whole number (0 or more)".to_owned()
    } else {
        match text {
            "expected string scalar" => "must be text, not a list or a mapping".to_owned(),
            "expected sequence start" => "must be a list, e.g. [a, b]".to_owned(),
            "expected mapping start" => {
                "must be a mapping of keys to values, e.g. {a: 1}".to_owned()
            }
            "invalid boolean" => "must be true or false".to_owned(),
            "null is not allowed here" => "has no value; give one or leave the key out".to_owned(),
            other => match other
                .strip_prefix("duplicate mapping key `")
                .and_then(|k| k.split_once('`'))
            {
                Some((key, _)) => format!("{key} is given twice; keep one of them"),
                None => other.to_owned(),
            },
        }
    };
    let mut out = String::new();
    if let Some(l) = e.location().filter(|l| l.line() > 0) {
        out.push_str(&format!("line {} column {}: ", l.line(), l.column()));
    }
    match at.filter(|p| !matches!(*p, "" | "." | "?")) {
        Some(p) => out.push_str(&format!("{p}: {what}")),
        None => out.push_str(&what),
    }
    out
}

/// Durations and sizes follow one grammar, the plugins' settings' (README.md, "Durations and sizes").
pub use trail_plugin_settings::quantity::{parse_duration, parse_size};

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    trail_plugin_settings::quantity::deserialize_duration(d)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    trail_plugin_settings::quantity::deserialize_size(d)
}

fn de_size_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let bytes = de_size(d)?;
    usize::try_from(bytes).map_err(|_| serde::de::Error::custom(format!("{bytes} is too large")))
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// A duration as a map value.
struct MapDuration(Duration);

impl<'de> Deserialize<'de> for MapDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_duration(d).map(MapDuration)
    }
}

fn de_duration_map<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, Duration)>, D::Error> {
    let raw = std::collections::BTreeMap::<String, MapDuration>::deserialize(d)?;
    Ok(raw.into_iter().map(|(k, v)| (k, v.0)).collect())
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

fn de_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    u32::from_str_radix(text.trim_start_matches("0o"), 8).map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an octal mode; write it quoted, e.g. \"0660\""
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, Path::new("trail.yaml"), Path::new("/etc/trail"))
    }

    const MINIMAL: &str = "socket: {path: /run/trail/trail.sock}\nevent_types: types\nlog: {dir: /var/lib/trail/log}\n";

    #[test]
    fn minimal_config_gets_defaults_and_resolves_relative_paths() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.event_types, Path::new("/etc/trail/types"));
        assert_eq!(c.socket.mode, 0o660);
        assert_eq!(c.log.fsync, FsyncPolicy::Always);
        assert_eq!(c.limits.max_line_bytes, 1 << 20);
        assert_eq!(c.limits.max_connections, 1024);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.limits.max_buffered_bytes, 64 << 20);
        assert_eq!(c.limits.line_slots(), 47);
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.idempotency.window, Duration::from_secs(24 * 3600));
        assert_eq!(c.idempotency.max_keys, 250_000);
        let c = parse(&format!(
            "{MINIMAL}idempotency: {{window: 10m, max_keys: 1000}}\n"
        ))
        .unwrap();
        assert_eq!(c.idempotency.window, Duration::from_secs(600));
        assert_eq!(c.idempotency.max_keys, 1000);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let check = |extra: &str, expected: &str| {
            let text = format!("{MINIMAL}{extra}");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{extra:?}: {err}");
        };
        check("colour: blue\n", "colour");
        check("log2: {}\n", "log2");
        check(
            "shutdown_grace: 10 parsecs\n",
            "line 4 column 17: shutdown_grace: \"10 parsecs\" is not a duration: use seconds or a unit such as 500ms",
        );
        check("limits: {max_line_bytes: 10}\n", "too small");
        check("limits: {max_lines: 10}\n", "max_lines");
        check("limits: {max_connections: 0}\n", "at least 1");
        check("limits: {idle_timeout: 10ms}\n", "at least 100ms");
        check(
            "limits: {max_buffered_bytes: 16MiB}\n",
            "use at least 17825793",
        );
        check("limits: {max_buffered_bytes: lots}\n", "a size");
        check("idempotency: {max_keys: 0}\n", "must be above zero");
        check("idempotency: {window: 0s}\n", "must be above zero");
        check("idempotency: {window: soon}\n", "idempotency.window");
        check("idempotency: {keys: 1}\n", "keys");
        check(
            "metrics: {listen: \"0.0.0.0:9464\"}\n",
            "metrics.listen: 0.0.0.0:9464 is not a loopback address",
        );
        check(
            "metrics: {listen: \"192.0.2.1:9464\"}\n",
            "is not a loopback address",
        );
        check("metrics: {listen: \"localhost\"}\n", "metrics.listen");
        check("metrics: {port: 9464}\n", "port");
        for ok in ["127.0.0.1:9464", "[::1]:9464", "127.0.0.2:1"] {
            let c = parse(&format!("{MINIMAL}metrics: {{listen: \"{ok}\"}}\n")).unwrap();
            assert_eq!(c.metrics.listen, Some(ok.parse().unwrap()));
        }
        assert_eq!(parse(MINIMAL).unwrap().metrics.listen, None);
        check(
            "limits: {rate_per_uid: 0}\n",
            "limits.rate_per_uid: 0 must be",
        );
        check("limits: {rate_per_uid: -1.5}\n", "above zero");
        check("limits: {rate_burst: 5}\n", "limits.rate_per_uid is not");
        check("limits: {rate_per_uid: 10, rate_burst: 0}\n", "at least 1");
        check(
            "access: {rules: [{types: ['user login']}]}\n",
            "access.rules[0].types: \"user login\" contains ' '",
        );
        check(
            "access: {rules: [{types: ['*'], users: [trail-no-such-user-here]}]}\n",
            "access.rules[0].users: there is no user \"trail-no-such-user-here\" on this host",
        );
        check(
            "access: {rules: [{types: ['*'], uids: [0]}, {types: ['*'], groups: [trail-no-such-group-here]}]}\n",
            "access.rules[1].groups: there is no group \"trail-no-such-group-here\"",
        );
        check("access: {rules: [{uids: [0]}]}\n", "types");
        check("access: {denied_record_interval: 10ms}\n", "at least 1s");
        check("access: {rules: [{types: ['*'], who: [a]}]}\n", "who");
        let err = parse("socket: {path: /x, mode: \"99\"}\nevent_types: t\nlog: {dir: l}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("octal"), "{err}");
        let err = parse(
            "socket: {path: /x, group: trail-no-such-group-here}\nevent_types: t\nlog: {dir: l}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "socket.group: there is no group \"trail-no-such-group-here\" on this host"
            ),
            "{err}"
        );
        let c = parse(&format!("{MINIMAL}limits: {{rate_per_uid: 2.5}}\n")).unwrap();
        assert_eq!(
            (c.limits.rate_per_uid, c.limits.rate_burst),
            (Some(2.5), None)
        );
        let err = parse("socket: {path: /x}\nlog: {dir: l}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("event_types"), "{err}");
    }

    #[test]
    fn config_errors_name_the_key_and_what_is_wrong_with_it() {
        let check = |extra: &str, expected: &str| {
            let err = parse(&format!("{MINIMAL}{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{extra:?}: {err}");
            for internal in [
                "Quantity",
                "untagged",
                "Option<",
                "DuplicateKeyPolicy",
                "<input>",
                "u64",
            ] {
                assert!(!err.contains(internal), "{extra:?}: {err}");
            }
        };
        let size = "is not a size: use bytes or a unit such as 64KiB, 16MiB, 1GiB";
        let duration = "is not a duration: use seconds or a unit such as 500ms, 10s, 5m, 2h, 7d";
        check(
            "spool: {max_bytes: 12 parsecs}",
            &format!("spool.max_bytes: \"12 parsecs\" {size}"),
        );
        check(
            "spool: {max_bytes: [1]}",
            &format!("spool.max_bytes: a list {size}"),
        );
        check(
            "spool: {max_bytes: -5}",
            &format!("spool.max_bytes: -5 {size}"),
        );
        check(
            "spool: {max_bytes: 1.5}",
            &format!("spool.max_bytes: 1.5 {size}"),
        );
        check(
            "spool: {max_bytes: true}",
            &format!("spool.max_bytes: true {size}"),
        );
        check(
            "spool: {max_bytes: ~}",
            "spool.max_bytes: an empty value is not a size",
        );
        check(
            "shutdown_grace: {a: 1}",
            &format!("shutdown_grace: a mapping {duration}"),
        );
        check(
            "limits: {max_line_bytes: big}",
            &format!("limits.max_line_bytes: \"big\" {size}"),
        );
        check(
            "sinks: [{name: a, plugin: p, batch: {max_wait: forever}}]",
            &format!("sinks[0].batch.max_wait: \"forever\" {duration}"),
        );
        check(
            "sinks: [{name: a, plugin: p, batch: {max_events: many}}]",
            "sinks[0].batch.max_events: is not a whole number",
        );
        check("sinks: [{name: a}]", "sinks[0]: missing field `plugin`");
        check("sinks: {a: 1}", "sinks: must be a list");
        check("plugins_dir: [a]", "plugins_dir: must be text");
        check("files: {group: [a]}", "files.group: must be text");
        check(
            "socket: {path: /x}",
            "line 4 column 1: socket is given twice; keep one of them",
        );
        let err = parse("socket: {path: ~}\nevent_types: t\nlog: {dir: l}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("socket.path: has no value"), "{err}");
        let err = parse("socket: {path: /s}\nevent_types: t\nlog: {dir: l, retention_by_type: {user_login: forever}}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "log.retention_by_type.user_login: \"forever\" {duration}"
            )),
            "{err}"
        );
    }

    #[test]
    fn files_group() {
        let group = |value: &str| {
            parse(&format!("{MINIMAL}files: {{group: {value}}}\n")).map(|c| c.files.gid)
        };
        let own = unsafe { libc::getegid() };
        let name = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(own))
            .unwrap()
            .unwrap()
            .name;
        assert_eq!(group(&own.to_string()).unwrap(), Some(own));
        assert_eq!(group(&name).unwrap(), Some(own));
        assert_eq!(parse(MINIMAL).unwrap().files.gid, None);
        let err = group("no-such-group-here").unwrap_err().to_string();
        assert!(
            err.contains("files.group: there is no group \"no-such-group-here\""),
            "{err}"
        );
    }

    #[test]
    fn log_settings() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.log.rotate, Rotate::Daily);
        assert_eq!(c.log.max_file_bytes, 256 << 20);
        assert_eq!(
            (c.log.retention, c.log.retention_bytes, c.log.compress),
            (None, None, false)
        );
        assert_eq!(c.log.checkpoint_every, Duration::from_secs(600));
        assert_eq!(
            c.log.signing_key(),
            Path::new("/var/lib/trail/keys/checkpoint-ed25519.pem")
        );
        let c = parse(
            "socket: {path: /s}\nevent_types: t\nlog: {dir: l, rotate: hourly, max_file_bytes: 64MiB, retention: 90d, \
             retention_bytes: 10GiB, retention_by_type: {user_login: 365d}, compress: true, checkpoint_every: 1m, \
             signing_key: k.pem}\n",
        )
        .unwrap();
        assert_eq!(c.log.rotate, Rotate::Hourly);
        assert_eq!(c.log.max_file_bytes, 64 << 20);
        assert_eq!(c.log.retention, Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(c.log.retention_bytes, Some(10 << 30));
        assert_eq!(
            c.log.retention_by_type,
            vec![("user_login".to_string(), Duration::from_secs(365 * 86_400))]
        );
        assert!(c.log.compress);
        assert_eq!(c.log.signing_key(), Path::new("/etc/trail/k.pem"));
        let bad = |log: &str, expected: &str| {
            let err = parse(&format!(
                "socket: {{path: /s}}\nevent_types: t\nlog: {{dir: l, {log}}}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(expected), "{log}: {err}");
        };
        bad("rotate: weekly", "weekly");
        bad("max_file_bytes: 10", "too small");
        bad("retention: 0d", "above zero");
        bad("retention_by_type: {user_login: forever}", "user_login");
        bad("checkpoint_every: 0s", "at least 1s");
        bad("retain: 7d", "retain");
    }
}
