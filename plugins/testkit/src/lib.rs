//! Test support for trail's first-party sink plugins.
//!
//! The plugins' tests and benchmarks use this crate to do what the daemon does with a plugin,
//! without the daemon: build the plugin as a real dynamic library, load it through the plugin
//! API from a private copy, create instances with a JSON configuration, and lend them batches of
//! realistic records, retrying and dead-lettering the way the host does; [`tls`] makes test
//! certificate authorities. It owns no knowledge of any particular plugin and must not grow any:
//! what a peer received is each test's business.

pub mod tls;

use std::{
    collections::HashMap,
    fs,
    ops::Range,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use trail_plugin_api::{
    ErrorKind, Host, HostCallbacks, LogLevel, Record, SinkBox, SinkError, SinkPluginRef,
    WriteError,
    abi_stable::{
        library::lib_header_from_path,
        std_types::{RSlice, RStr},
    },
};

/// The workspace root.
pub fn workspace() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The target directory of nested builds. A separate one: the `cargo test` or `cargo bench`
/// that runs the caller may still hold the lock of the default one, and a nested build there
/// would wait for it forever.
pub fn target_dir() -> PathBuf {
    workspace().join("target").join("plugin-tests")
}

/// How a plugin is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    /// `cargo build`: what tests use (quicker to build).
    Debug,
    /// `cargo build --release`: what benchmarks use.
    Release,
}

/// The dynamic library of the workspace package `package`, built once per process with a
/// nested `cargo build -p package` and copied aside so that a later build cannot change it
/// under the caller.
pub fn built_plugin(package: &str, profile: Profile) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<(String, Profile), PathBuf>>> = Mutex::new(None);
    // Held during the build: one nested cargo at a time in this process.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(&(package.to_owned(), profile)) {
        return path.clone();
    }

    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(workspace())
        .env("CARGO_TARGET_DIR", target_dir())
        .args(["build", "--quiet", "-p", package]);
    if profile == Profile::Release {
        cargo.arg("--release");
    }
    let started = Instant::now();
    let status = cargo.status().expect("running cargo");
    assert!(
        status.success(),
        "cargo build -p {package} failed: {status}"
    );
    eprintln!("built {package} ({profile:?}) in {:.1?}", started.elapsed());

    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        package.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    let out = match profile {
        Profile::Debug => "debug",
        Profile::Release => "release",
    };
    let from = target_dir().join(out).join(&file);
    let staged = target_dir().join("staged").join(format!("{package}-{out}"));
    fs::create_dir_all(&staged).unwrap();
    // Written aside and renamed into place, as plugins should be installed.
    let tmp = staged.join(format!(".{file}.{}", std::process::id()));
    fs::copy(&from, &tmp).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
    let path = staged.join(&file);
    fs::rename(&tmp, &path).unwrap();
    built.insert((package.to_owned(), profile), path.clone());
    path
}

/// A scratch directory under the target directory (which, unlike some `/tmp`s, is certainly
/// not mounted `noexec`, so plugin copies placed there can be loaded).
pub fn scratch() -> tempfile::TempDir {
    let parent = target_dir().join("scratch");
    fs::create_dir_all(&parent).unwrap();
    tempfile::tempdir_in(parent).unwrap()
}

/// A loaded plugin library (never unloaded, as in trail).
#[derive(Clone, Copy)]
pub struct Plugin {
    /// The library's root module.
    pub module: SinkPluginRef,
}

impl Plugin {
    /// Builds `package` and loads it from a fresh copy, as trail does.
    pub fn build_and_load(package: &str, profile: Profile) -> Self {
        let dir = scratch();
        Self::load(&built_plugin(package, profile), dir.path())
    }

    /// Loads `library` from a fresh copy in `copies_dir` with
    /// `lib_header_from_path(..).init_root_module()`, as trail does.
    pub fn load(library: &Path, copies_dir: &Path) -> Self {
        static COPIES: AtomicU64 = AtomicU64::new(0);
        let n = COPIES.fetch_add(1, Ordering::Relaxed);
        let name = library.file_name().unwrap().to_string_lossy();
        let copy = copies_dir.join(format!("{}.{n}.{name}", std::process::id()));
        fs::copy(library, &copy).unwrap_or_else(|e| panic!("copying {}: {e}", library.display()));
        let module = lib_header_from_path(&copy)
            .and_then(|header| header.init_root_module::<SinkPluginRef>())
            .unwrap_or_else(|e| panic!("loading {}: {e}", library.display()));
        let _ = fs::remove_file(&copy);
        Self { module }
    }

    /// Creates an instance with `config_json`, logging to `host`.
    pub fn new_sink(&self, config_json: &str, host: &TestHost) -> Result<SinkBox, SinkError> {
        let new = self.module.new();
        new(RStr::from_str(config_json), Host::new(host.clone())).into_result()
    }
}

/// The host side of [`HostCallbacks`]: keeps what the plugin logs.
#[derive(Clone)]
pub struct TestHost {
    sink_name: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl TestHost {
    /// A host whose sink is called `sink_name`.
    pub fn new(sink_name: &str) -> Self {
        Self {
            sink_name: sink_name.to_owned(),
            logs: Arc::default(),
        }
    }

    /// What the plugin logged so far, as `level: message` lines.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

impl HostCallbacks for TestHost {
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        let line = format!("{}: {}", level.or_info(), message);
        self.logs.lock().unwrap().push(line);
    }

    fn sink_name(&self) -> RStr<'_> {
        RStr::from_str(&self.sink_name)
    }
}

/// An event as the host holds it: owned strings, lent to the plugin as a [`Record`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Position in the log.
    pub seq: u64,
    /// Unique id.
    pub id: String,
    /// Event type name.
    pub event_type: String,
    /// The stored JSON line.
    pub line: String,
}

/// The event types [`events`] cycles through, with their severities.
pub const TYPES: [(&str, &str); 4] = [
    ("user_login", "info"),
    ("role_granted", "notice"),
    ("access_denied", "warning"),
    ("project_deleted", "critical"),
];

/// Realistic stored records with sequence numbers `seqs`: compact JSON lines of about 450
/// bytes, shaped like trail's log, cycling through [`TYPES`]. Every third record lacks the
/// optional `target`, every fifth lacks `actor`, and messages contain characters that need
/// escaping in JSON and in syslog structured data (`"`, `\`, `]`) and non-ASCII text.
pub fn events(seqs: Range<u64>) -> Vec<Event> {
    seqs.map(event).collect()
}

fn event(seq: u64) -> Event {
    let (event_type, severity) = TYPES[(seq % TYPES.len() as u64) as usize];
    let id = format!("019ab2c4-5d6e-7f80-9a1b-{seq:012x}");
    let second = 16 * 3600 + 20 * 60 + seq / 100;
    let (h, m, s) = ((second / 3600) % 24, (second / 60) % 60, second % 60);
    let nanos = (seq * 7_919_113) % 1_000_000_000;
    let mut line = format!(
        concat!(
            r#"{{"seq":{seq},"id":"{id}","received_at":"2026-11-23T{h:02}:{m:02}:{s:02}.{nanos:09}Z","#,
            r#""occurred_at":"2026-11-23T{h:02}:{m:02}:{s:02}.5+00:00","type":"{event_type}","version":1,"#,
            r#""severity":"{severity}","code":"T{code}I","#,
            r#""source":{{"uid":1000,"gid":1000,"pid":5569,"host":"app-1.example"}}"#
        ),
        seq = seq,
        id = id,
        h = h,
        m = m,
        s = s,
        nanos = nanos,
        event_type = event_type,
        severity = severity,
        code = 1000 + seq % 4,
    );
    if seq % 5 != 0 {
        line.push_str(&format!(
            r#","actor":{{"id":"u-{n}","name":"alice-{n}","type":"user","ip":"10.0.{a}.{b}"}}"#,
            n = seq % 97,
            a = seq % 250,
            b = seq % 200 + 1,
        ));
    }
    if seq % 3 != 0 {
        line.push_str(&format!(
            r#","target":{{"type":"project","id":"p-{n}","name":"billing <{n}> & co"}}"#,
            n = seq % 13,
        ));
    }
    line.push_str(&format!(
        concat!(
            r#","outcome":"success","message":"event {seq}: \"quoted\" \\ [bracketed] déjà vu","#,
            r#""payload":{{"method":"sso","attempt":{attempt},"tags":["a","b"]}}}}"#
        ),
        seq = seq,
        attempt = seq % 3,
    ));
    Event {
        seq,
        id,
        event_type: event_type.to_owned(),
        line,
    }
}

/// Lends `events` to `sink` as one batch, without copying a string (as the host does).
pub fn write(sink: &mut SinkBox, events: &[Event]) -> Result<(), WriteError> {
    let records: Vec<Record<'_>> = events
        .iter()
        .map(|e| Record::new(e.seq, &e.id, &e.event_type, &e.line))
        .collect();
    sink.write(RSlice::from_slice(&records)).into_result()
}

/// What [`deliver`] did.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Every `write` call's error, in order.
    pub errors: Vec<WriteError>,
    /// The records given up on (the host's dead letters), with the error that refused them.
    pub dead: Vec<(u64, SinkError)>,
}

/// Delivers `events` to `sink` the way trail's worker does, without its backoff: writes the
/// undelivered rest after a retryable error, and gives up on the record at `delivered` after a
/// permanent one. Panics after `max_writes` calls, or on a panic error.
pub fn deliver(sink: &mut SinkBox, events: &[Event], max_writes: usize) -> Delivery {
    let mut delivery = Delivery::default();
    let mut next = 0;
    for _ in 0..max_writes {
        let error = match write(sink, &events[next..]) {
            Ok(()) => return delivery,
            Err(error) => error,
        };
        let delivered = error.delivered as usize;
        assert!(
            next + delivered <= events.len(),
            "delivered {delivered} of {}",
            events.len() - next
        );
        next += delivered;
        match error.error.kind {
            ErrorKind::PANIC => panic!("the plugin panicked: {error}"),
            ErrorKind::PERMANENT | ErrorKind::CONFIG => {
                assert!(
                    next < events.len(),
                    "a permanent error after delivering everything"
                );
                delivery.dead.push((events[next].seq, error.error.clone()));
                next += 1;
            }
            _ => {}
        }
        delivery.errors.push(error);
        if next == events.len() {
            return delivery;
        }
    }
    panic!(
        "not delivered after {max_writes} writes: {:?}",
        delivery.errors
    );
}

/// Asserts that `result` is an error of `kind` whose message contains every one of
/// `contains`, and returns it.
pub fn expect_error<T>(
    result: Result<T, SinkError>,
    kind: ErrorKind,
    contains: &[&str],
) -> SinkError {
    let Err(error) = result else {
        panic!("expected a {kind} error containing {contains:?}, got success")
    };
    assert_eq!(error.kind, kind, "{error}");
    for part in contains {
        assert!(error.message.contains(part), "{error:?} lacks {part:?}");
    }
    error
}
