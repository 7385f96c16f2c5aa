//! Test support for sink plugins: drives a plugin the way trail's daemon does, without the
//! daemon.
//!
//! A plugin's tests (and benchmarks) use this crate as a dev-dependency to:
//!
//! - build the plugin as a real dynamic library with a nested `cargo build` ([`Build`],
//!   [`built_plugin`]);
//! - load it through the plugin API from a private copy, as the daemon does ([`Plugin::load`],
//!   [`Plugin::try_load`]), and create instances with a JSON configuration, logging to a
//!   [`TestHost`];
//! - lend instances batches of realistic records ([`events`], [`write`]) and deliver them by the
//!   host's rule for each error kind ([`deliver`], which applies
//!   [`ErrorKind::host_action`], the function trail's sink worker applies);
//! - make test certificate authorities (`tls`, with the feature `tls`);
//! - measure the CPU time the plugin's process and a server use in a benchmark ([`cpu`], Linux only).
//!
//! It is installed with trail as part of the SDK (`/usr/share/trail/sdk/testkit`, beside the API crate in
//! `/usr/share/trail/sdk/plugin-api`): a plugin crate made by `trail plugin new` has it as a dev-dependency, and
//! its `tests/` build the plugin with [`Build`], load it with [`Plugin::load`] and drive it with [`deliver`].
//!
//! It owns no knowledge of any particular plugin and must not grow any: what a peer received is
//! each test's business. It never starts the daemon and does not depend on it; trail's own
//! integration tests start the daemon with a separate, daemon-side kit.

pub mod cpu;
#[cfg(feature = "tls")]
pub mod tls;

use std::{
    collections::HashMap,
    fmt, fs, io,
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
    ErrorKind, Host, HostAction, HostCallbacks, LogLevel, Record, SinkBox, SinkError,
    SinkPluginRef, WriteError,
    abi_stable::{
        library::{LibraryError, lib_header_from_path},
        std_types::{RSlice, RStr},
    },
};

/// The root of the workspace this crate is in (trail's): where [`built_plugin`] builds. Only
/// meaningful inside trail's repository; a plugin of its own builds with [`Build::new`].
pub fn workspace() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The target directory of nested builds: `plugin-tests` in the target directory of the running
/// test or benchmark (found from its path, `<target>/<profile>/deps/<binary>`), or
/// `target/plugin-tests` in [`workspace`] when that cannot be told. A separate one: the `cargo
/// test` or `cargo bench` that runs the caller holds the lock of its own, and a nested build there
/// would wait for it forever.
pub fn target_dir() -> PathBuf {
    outer_target()
        .unwrap_or_else(|| workspace().join("target"))
        .join("plugin-tests")
}

/// The target directory of the running test binary, from its path.
fn outer_target() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    if deps.file_name()? != "deps" {
        return None;
    }
    Some(deps.parent()?.parent()?.to_owned())
}

/// How a plugin is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    /// `cargo build`: what tests use (quicker to build).
    Debug,
    /// `cargo build --release`: what benchmarks use.
    Release,
}

impl Profile {
    /// The directory under the target directory that cargo writes this profile's outputs to.
    pub fn dir_name(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// A nested `cargo build -p PACKAGE …` of plugin crates (`cdylib`s), whose libraries are then
/// copied aside, so that a later build (another profile, other environment variables) cannot
/// change them under the caller.
///
/// ```no_run
/// use trail_plugin_testkit::{Build, Profile};
///
/// let libraries = Build::new(env!("CARGO_MANIFEST_DIR"), &["acme-sink"])
///     .profile(Profile::Release)
///     .run();
/// // libraries[0] is `target/plugin-tests/staged/default/libacme_sink.so`
/// ```
///
/// One build runs at a time in a process; the staged copies are written aside and renamed into
/// place, as plugins should be installed.
#[derive(Clone, Debug)]
pub struct Build {
    dir: PathBuf,
    packages: Vec<String>,
    profile: Profile,
    target_dir: PathBuf,
    env: Vec<(String, Option<String>)>,
    label: String,
}

impl Build {
    /// Builds `packages` of the package or workspace in `dir`, with the debug profile, in
    /// [`target_dir`] (`<the caller's target directory>/plugin-tests`), staging the libraries in
    /// `<target>/staged/default/`.
    pub fn new(dir: impl Into<PathBuf>, packages: &[&str]) -> Self {
        let dir = dir.into();
        Self {
            target_dir: target_dir(),
            dir,
            packages: packages.iter().map(|p| p.to_string()).collect(),
            profile: Profile::Debug,
            env: Vec::new(),
            label: "default".to_owned(),
        }
    }

    /// Builds with `profile`.
    pub fn profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    /// Builds in `target_dir` instead.
    pub fn target_dir(mut self, target_dir: impl Into<PathBuf>) -> Self {
        self.target_dir = target_dir.into();
        self
    }

    /// Sets the environment variable `key` of the build to `value`, or removes it (`None`), so
    /// that a value in the caller's environment cannot leak into the build.
    pub fn env(mut self, key: &str, value: Option<&str>) -> Self {
        self.env.push((key.to_owned(), value.map(str::to_owned)));
        self
    }

    /// Stages the libraries in `<target>/staged/<label>/`: builds that differ (in environment,
    /// say) need labels of their own.
    pub fn label(mut self, label: &str) -> Self {
        self.label = label.to_owned();
        self
    }

    /// Runs the build and returns the staged library of each package, in order. Panics when
    /// cargo fails.
    pub fn run(&self) -> Vec<PathBuf> {
        static BUILDING: Mutex<()> = Mutex::new(());
        // Held until the outputs are copied aside: a concurrent build could rewrite them.
        let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .current_dir(&self.dir)
            .env("CARGO_TARGET_DIR", &self.target_dir)
            .args(["build", "--quiet"]);
        for package in &self.packages {
            cargo.args(["-p", package]);
        }
        if self.profile == Profile::Release {
            cargo.arg("--release");
        }
        for (key, value) in &self.env {
            match value {
                Some(value) => cargo.env(key, value),
                None => cargo.env_remove(key),
            };
        }
        let started = Instant::now();
        let status = cargo.status().expect("running cargo");
        assert!(
            status.success(),
            "cargo build of {:?} ({:?}) failed: {status}",
            self.packages,
            self.profile
        );
        eprintln!(
            "built {:?} ({:?}, {}) in {:.1?}",
            self.packages,
            self.profile,
            self.label,
            started.elapsed()
        );
        let staged = self.target_dir.join("staged").join(&self.label);
        fs::create_dir_all(&staged).unwrap();
        self.packages
            .iter()
            .map(|package| {
                let file = library_file_name(package);
                let from = self.target_dir.join(self.profile.dir_name()).join(&file);
                let tmp = staged.join(format!(".{file}.{}", std::process::id()));
                fs::copy(&from, &tmp).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
                let to = staged.join(&file);
                fs::rename(&tmp, &to).unwrap();
                to
            })
            .collect()
    }
}

/// The file name cargo gives the dynamic library of `package`: `lib<package with _>.so` on
/// Linux.
pub fn library_file_name(package: &str) -> String {
    format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        package.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    )
}

/// The dynamic library of the [`workspace`] package `package`, built once per process (a
/// [`Build`] labelled `<package>-<profile>`).
pub fn built_plugin(package: &str, profile: Profile) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<(String, Profile), PathBuf>>> = Mutex::new(None);
    // Held during the build: the same package is built once.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(&(package.to_owned(), profile)) {
        return path.clone();
    }
    let path = Build::new(workspace(), &[package])
        .profile(profile)
        .label(&format!("{package}-{}", profile.dir_name()))
        .run()
        .remove(0);
    built.insert((package.to_owned(), profile), path.clone());
    path
}

/// A scratch directory under [`target_dir`] (which, unlike some `/tmp`s, is certainly not
/// mounted `noexec`, so plugin copies placed there can be loaded).
pub fn scratch() -> tempfile::TempDir {
    let parent = target_dir().join("scratch");
    fs::create_dir_all(&parent).unwrap();
    tempfile::tempdir_in(parent).unwrap()
}

/// Why a plugin library could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// Copying the library to its unique path failed.
    Copy {
        /// The path of the copy.
        to: PathBuf,
        /// What went wrong.
        error: io::Error,
    },
    /// abi_stable refused the library: not loadable, not a trail sink plugin, another major
    /// version (`IncompatibleVersionNumber`) or another layout (`AbiInstability`).
    Library(LibraryError),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Copy { to, error } => {
                write!(f, "copying the plugin to {}: {error}", to.display())
            }
            Self::Library(error) => write!(f, "loading the plugin: {error}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// A loaded plugin library. It stays mapped until the process exits, as in trail: abi_stable
/// never unloads libraries, which is what makes it safe to keep the `'static` data they hand
/// out.
#[derive(Clone, Copy)]
pub struct Plugin {
    /// The library's root module.
    pub module: SinkPluginRef,
}

impl Plugin {
    /// Builds the [`workspace`] package `package` and loads it from a fresh copy, as trail does.
    pub fn build_and_load(package: &str, profile: Profile) -> Self {
        let dir = scratch();
        Self::load(&built_plugin(package, profile), dir.path())
    }

    /// [`try_load`](Self::try_load), panicking when loading fails.
    pub fn load(library: &Path, copies_dir: &Path) -> Self {
        Self::try_load(library, copies_dir).unwrap_or_else(|e| panic!("{}: {e}", library.display()))
    }

    /// Loads `library` from a fresh copy in `copies_dir`, as trail does.
    ///
    /// The copy matters: the dynamic loader hands back the already-loaded object for a path (or
    /// inode) it has seen, so reloading a rebuilt plugin from the installed path would silently
    /// keep the old code. `lib_header_from_path(..).init_root_module()` is used instead of
    /// `RootModule::load_from_file`, which caches the first module loaded per type for the
    /// whole process. The copy is removed once loaded: the mapping outlives the file.
    pub fn try_load(library: &Path, copies_dir: &Path) -> Result<Self, LoadError> {
        static COPIES: AtomicU64 = AtomicU64::new(0);
        let n = COPIES.fetch_add(1, Ordering::Relaxed);
        let name = library.file_name().unwrap_or_default().to_string_lossy();
        let copy = copies_dir.join(format!("{}.{n}.{name}", std::process::id()));
        fs::copy(library, &copy).map_err(|error| LoadError::Copy {
            to: copy.clone(),
            error,
        })?;
        let module = lib_header_from_path(&copy)
            .and_then(|header| header.init_root_module::<SinkPluginRef>())
            .map_err(LoadError::Library);
        let _ = fs::remove_file(&copy);
        Ok(Self { module: module? })
    }

    /// `name version (api X.Y.Z)`, for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} {} (api {})",
            self.module.name(),
            self.module.version(),
            self.module.api_version()
        )
    }

    /// Creates an instance with `config_json`, logging to `host`. Call this on the thread
    /// that will drive the instance.
    pub fn new_sink(&self, config_json: &str, host: &TestHost) -> Result<SinkBox, SinkError> {
        let new = self.module.new();
        new(RStr::from_str(config_json), Host::new(host.clone())).into_result()
    }
}

/// The host side of [`HostCallbacks`]: keeps what the plugin logs.
#[derive(Clone)]
pub struct TestHost {
    sink_name: String,
    logs: Arc<Mutex<Vec<(LogLevel, String)>>>,
}

impl TestHost {
    /// A host whose sink is called `sink_name`.
    pub fn new(sink_name: &str) -> Self {
        Self {
            sink_name: sink_name.to_owned(),
            logs: Arc::default(),
        }
    }

    /// The name of the sink, as the plugin sees it.
    pub fn sink_name(&self) -> &str {
        &self.sink_name
    }

    /// What the plugin logged so far, as `level: message` lines (an unknown level as `info`).
    pub fn logs(&self) -> Vec<String> {
        self.messages()
            .into_iter()
            .map(|(level, message)| format!("{level}: {message}"))
            .collect()
    }

    /// What the plugin logged so far: (level, an unknown one as `info`; message).
    pub fn messages(&self) -> Vec<(LogLevel, String)> {
        self.logs.lock().unwrap().clone()
    }
}

impl HostCallbacks for TestHost {
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        let entry = (level.or_info(), message.as_str().to_owned());
        self.logs.lock().unwrap().push(entry);
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
    if !seq.is_multiple_of(5) {
        line.push_str(&format!(
            r#","actor":{{"id":"u-{n}","name":"alice-{n}","type":"user","ip":"10.0.{a}.{b}"}}"#,
            n = seq % 97,
            a = seq % 250,
            b = seq % 200 + 1,
        ));
    }
    if !seq.is_multiple_of(3) {
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

/// Delivers `events` to `sink` the way trail's worker does, by [`ErrorKind::host_action`] and
/// without its backoff: writes the undelivered rest again after a retryable (or unknown) kind,
/// and gives up on the record at `delivered` after a permanent or config one. Panics after
/// `max_writes` calls, or on a panic error (the host would construct a fresh instance).
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
        match error.error.kind.host_action() {
            HostAction::FreshInstance => panic!("the plugin panicked: {error}"),
            HostAction::GiveUp => {
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
