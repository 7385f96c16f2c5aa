//! Builds the plugins in this workspace as real dynamic libraries, loads them the way trail
//! does, and checks the contract end to end: info, writes, errors, partial success, panics,
//! the layout check, side-by-side builds, and host logging.
//!
//! The `host` module below is the reference for the daemon's loader.

use std::{
    fs,
    path::Path,
    sync::{Arc, Mutex},
};

use abi_stable::{
    library::LibraryError,
    std_types::{RResult, RSlice, RStr},
};
use trail_plugin_api::{
    API_VERSION, ErrorKind, HostCallbacks, LogLevel, Record, SinkBox, SinkError, WriteError,
};

use self::{build::built_plugin, host::Plugin};

/// How a host loads and calls a sink plugin. Kept free of test assertions so that the daemon's
/// loader can follow it.
mod host {
    use std::{
        fmt, fs, io,
        path::{Path, PathBuf},
        sync::atomic::{AtomicU64, Ordering},
    };

    use abi_stable::{
        library::{LibraryError, RootModule, lib_header_from_path},
        std_types::RStr,
    };
    use trail_plugin_api::{Host, HostCallbacks, SinkBox, SinkError, SinkPluginRef};

    /// Why a plugin library could not be loaded.
    #[derive(Debug)]
    pub enum LoadError {
        /// Copying the library to its unique path failed.
        Copy { to: PathBuf, error: io::Error },
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

    /// A loaded plugin library. It stays mapped until the process exits: abi_stable never
    /// unloads libraries, which is what makes it safe to keep the `'static` data they hand out.
    #[derive(Clone, Copy)]
    pub struct Plugin {
        pub module: SinkPluginRef,
    }

    impl Plugin {
        /// Loads `library` from a fresh copy in `copies_dir`.
        ///
        /// The copy matters: the dynamic loader hands back the already-loaded object for a
        /// path (or inode) it has seen, so reloading a rebuilt plugin from the installed path
        /// would silently keep the old code. `lib_header_from_path(..).init_root_module()` is
        /// used instead of `RootModule::load_from_file`, which caches the first module loaded
        /// per type for the whole process.
        pub fn load(library: &Path, copies_dir: &Path) -> Result<Self, LoadError> {
            static COPIES: AtomicU64 = AtomicU64::new(0);
            let stem = library.file_stem().unwrap_or_default().to_string_lossy();
            let extension = library.extension().unwrap_or_default().to_string_lossy();
            let n = COPIES.fetch_add(1, Ordering::Relaxed);
            let copy = copies_dir.join(format!("{stem}.{}.{n}.{extension}", std::process::id()));
            fs::copy(library, &copy).map_err(|error| LoadError::Copy {
                to: copy.clone(),
                error,
            })?;
            let module = lib_header_from_path(&copy)
                .and_then(|header| header.init_root_module::<SinkPluginRef>())
                .map_err(LoadError::Library)?;
            // The mapping outlives the file: the copy can go now (a daemon would do this to
            // avoid filling its runtime directory with one copy per reload).
            let _ = fs::remove_file(&copy);
            Ok(Self { module })
        }

        /// `name version (api X.Y)`, for logs.
        pub fn describe(&self) -> String {
            format!(
                "{} {} (api {})",
                self.module.name(),
                self.module.version(),
                self.module.api_version()
            )
        }

        /// Creates a sink instance. Call this on the thread that will drive the instance.
        pub fn new_sink<C>(&self, config_json: &str, callbacks: C) -> Result<SinkBox, SinkError>
        where
            C: HostCallbacks + 'static,
        {
            let new = self.module.new();
            new(RStr::from_str(config_json), Host::new(callbacks)).into_result()
        }
    }

    /// The name abi_stable gives sink plugins in its own error messages.
    pub const KIND: &str = <SinkPluginRef as RootModule>::NAME;
}

/// Builds the plugin crates with a nested `cargo build`, once per test run.
mod build {
    use std::{
        collections::HashMap,
        fs,
        path::{Path, PathBuf},
        process::Command,
        sync::{Mutex, OnceLock},
        time::Instant,
    };

    /// The workspace root.
    pub fn workspace() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
    }

    /// A separate target directory: the `cargo test` that runs this may still hold the lock of
    /// the default one, and a nested build there would wait for it forever.
    pub fn target_dir() -> PathBuf {
        workspace().join("target").join("plugin-tests")
    }

    /// The plugins that need no special build, built together by one cargo invocation.
    const PACKAGES: [&str; 5] = [
        "trail-test-recorder",
        "trail-test-flaky",
        "trail-test-panicker",
        "trail-test-incompatible",
        "trail-sink-template",
    ];

    /// One cargo build at a time in this process, and copying its outputs before the next one
    /// (a build with another `TRAIL_TEST_MARK` rewrites the same output file).
    static BUILDING: Mutex<()> = Mutex::new(());

    /// The library of `package` (one of `PACKAGES`), built once per test run.
    pub fn built_plugin(package: &str) -> PathBuf {
        static DEFAULT: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
        let built = DEFAULT.get_or_init(|| {
            let staged = cargo_build(&PACKAGES, None, "default");
            PACKAGES.iter().map(|p| p.to_string()).zip(staged).collect()
        });
        built[package].clone()
    }

    /// The `trail-test-recorder` library built with `TRAIL_TEST_MARK=v2`.
    pub fn recorder_marked_v2() -> PathBuf {
        static MARKED: OnceLock<PathBuf> = OnceLock::new();
        MARKED
            .get_or_init(|| cargo_build(&["trail-test-recorder"], Some("v2"), "v2").remove(0))
            .clone()
    }

    /// Runs `cargo build -p …` and copies the libraries to `staged/<label>/` so that a later
    /// build cannot change them under the tests.
    fn cargo_build(packages: &[&str], mark: Option<&str>, label: &str) -> Vec<PathBuf> {
        let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .current_dir(workspace())
            .env("CARGO_TARGET_DIR", target_dir())
            .arg("build")
            .arg("--quiet");
        for package in packages {
            cargo.args(["-p", package]);
        }
        match mark {
            Some(mark) => cargo.env("TRAIL_TEST_MARK", mark),
            None => cargo.env_remove("TRAIL_TEST_MARK"),
        };
        let started = Instant::now();
        let status = cargo.status().expect("running cargo");
        assert!(
            status.success(),
            "cargo build of {packages:?} failed: {status}"
        );
        eprintln!(
            "built {packages:?} (mark {mark:?}) in {:.1?}",
            started.elapsed()
        );

        let staged = target_dir().join("staged").join(label);
        fs::create_dir_all(&staged).unwrap();
        packages
            .iter()
            .map(|package| {
                let file = format!(
                    "{}{}{}",
                    std::env::consts::DLL_PREFIX,
                    package.replace('-', "_"),
                    std::env::consts::DLL_SUFFIX
                );
                let built = target_dir().join("debug").join(&file);
                // Written aside and renamed into place, as plugins should be installed.
                let tmp = staged.join(format!(".{file}.{}", std::process::id()));
                fs::copy(&built, &tmp)
                    .unwrap_or_else(|e| panic!("copying {}: {e}", built.display()));
                let path = staged.join(&file);
                fs::rename(&tmp, &path).unwrap();
                path
            })
            .collect()
    }
}

/// A host's side of [`HostCallbacks`] that keeps what plugins log.
#[derive(Clone)]
struct TestHost {
    sink_name: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl TestHost {
    fn new(sink_name: &str) -> Self {
        Self {
            sink_name: sink_name.to_owned(),
            logs: Arc::default(),
        }
    }

    fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

impl HostCallbacks for TestHost {
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        // What trail does: `tracing` event with the sink's name; here, a line.
        let line = format!("{} sink={}: {}", level.or_info(), self.sink_name, message);
        self.logs.lock().unwrap().push(line);
    }

    fn sink_name(&self) -> RStr<'_> {
        RStr::from_str(&self.sink_name)
    }
}

/// A scratch directory for one test, under the target directory (which is certainly not
/// mounted `noexec`, unlike some `/tmp`s).
fn scratch() -> tempfile::TempDir {
    let parent = build::target_dir().join("scratch");
    fs::create_dir_all(&parent).unwrap();
    tempfile::tempdir_in(parent).unwrap()
}

fn load(package: &str, dir: &Path) -> Plugin {
    Plugin::load(&built_plugin(package), dir).unwrap_or_else(|e| panic!("{package}: {e}"))
}

/// Events as the host holds them: owned strings.
struct Event {
    seq: u64,
    id: String,
    event_type: String,
    line: String,
}

fn events(seqs: std::ops::RangeInclusive<u64>) -> Vec<Event> {
    seqs.map(|seq| Event {
        seq,
        id: format!("0190a4f3-8d2c-7b1e-9c4d-{seq:012x}"),
        event_type: "user_login".to_owned(),
        line: format!(r#"{{"seq":{seq},"type":"user_login","payload":{{"user":"u{seq}"}}}}"#),
    })
    .collect()
}

/// Lends `events` to `sink` as one batch, without copying a string.
fn write(sink: &mut SinkBox, events: &[Event]) -> RResult<(), WriteError> {
    let records: Vec<Record<'_>> = events
        .iter()
        .map(|e| Record::new(e.seq, &e.id, &e.event_type, &e.line))
        .collect();
    sink.write(RSlice::from_slice(&records))
}

fn config(value: &str, path: &Path) -> String {
    value.replace("PATH", &path.display().to_string().replace('\\', "\\\\"))
}

/// The `(mark, seq)` of every line a recorder-like plugin appended.
fn recorded(path: &Path) -> Vec<(String, u64)> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let mark = line
                .split(r#""mark":""#)
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let seq = line
                .split(r#""seq":"#)
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap();
            (mark.to_owned(), seq.parse().unwrap())
        })
        .collect()
}

fn marked(mark: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<(String, u64)> {
    seqs.into_iter().map(|seq| (mark.to_owned(), seq)).collect()
}

fn expect_error<T>(result: Result<T, SinkError>, kind: ErrorKind, contains: &str) -> SinkError {
    let Err(error) = result else {
        panic!("expected a {kind} error containing {contains:?}, got success")
    };
    assert_eq!(error.kind, kind, "{error}");
    assert!(
        error.message.contains(contains),
        "{error:?} lacks {contains:?}"
    );
    error
}

#[test]
fn plugins_report_their_name_version_and_api_version() {
    let dir = scratch();
    for (package, name) in [
        ("trail-test-recorder", "recorder"),
        ("trail-test-flaky", "flaky"),
        ("trail-test-panicker", "panicker"),
        ("trail-sink-template", "line-file"),
    ] {
        let plugin = load(package, dir.path());
        assert_eq!(plugin.module.name().as_str(), name);
        assert_eq!(plugin.module.version().as_str(), "0.1.0");
        assert_eq!(plugin.module.api_version(), API_VERSION);
        assert_eq!(
            plugin.describe(),
            format!("{name} 0.1.0 (api {API_VERSION})")
        );
    }
}

#[test]
fn recorder_writes_the_records_it_is_given_and_logs_through_the_host() {
    let dir = scratch();
    let out = dir.path().join("received.jsonl");
    let plugin = load("trail-test-recorder", dir.path());
    let host = TestHost::new("audit-copy");
    let mut sink = plugin
        .new_sink(
            &config(r#"{"path": "PATH", "mark": "v1"}"#, &out),
            host.clone(),
        )
        .unwrap();

    assert!(write(&mut sink, &events(1..=3)).is_ok());
    assert!(write(&mut sink, &events(4..=4)).is_ok());
    assert!(sink.flush().is_ok());
    assert_eq!(recorded(&out), marked("v1", 1..=4));
    let first = fs::read_to_string(&out).unwrap();
    assert_eq!(
        first.lines().next().unwrap(),
        r#"{"mark":"v1","seq":1,"id":"0190a4f3-8d2c-7b1e-9c4d-000000000001","type":"user_login"}"#
    );
    assert!(sink.close().is_ok());
    drop(sink);

    // The plugin's log line reached the host, tagged with the sink name.
    assert_eq!(
        host.logs(),
        [format!(
            "info sink=audit-copy: recording to {} with mark v1",
            out.display()
        )]
    );
}

#[test]
fn bad_configuration_is_a_config_error() {
    let dir = scratch();
    let recorder = load("trail-test-recorder", dir.path());
    let result = recorder.new_sink(r#"{"mark": "v1"}"#, TestHost::new("s"));
    expect_error(result, ErrorKind::CONFIG, "missing field `path`");
    let flaky = load("trail-test-flaky", dir.path());
    let result = flaky.new_sink(
        &config(r#"{"path": "PATH", "permanent": true}"#, dir.path()),
        TestHost::new("s"),
    );
    expect_error(result, ErrorKind::CONFIG, "needs \"reject\"");
}

#[test]
fn panics_in_new_and_write_come_back_as_panic_errors() {
    let dir = scratch();
    let plugin = load("trail-test-panicker", dir.path());

    let result = plugin.new_sink(r#"{"panic_in": "new"}"#, TestHost::new("p"));
    let error = expect_error(result, ErrorKind::PANIC, "panicking in new, as configured");
    // The location of the panic is in the message.
    assert!(error.message.contains("panicker/src/lib.rs:"), "{error}");

    let mut sink = plugin
        .new_sink(r#"{"panic_in": "write"}"#, TestHost::new("p"))
        .unwrap();
    let error = write(&mut sink, &events(7..=9)).into_result().unwrap_err();
    assert_eq!(error.delivered, 0);
    expect_error::<()>(
        Err(error.error),
        ErrorKind::PANIC,
        "panicking in write, as configured (first seq Some(7))",
    );
    // The instance is broken from now on; the host drops it and makes a new one.
    expect_error(
        sink.flush().into_result(),
        ErrorKind::PANIC,
        "unusable since it panicked",
    );
    drop(sink);

    for (place, call) in [("flush", 0), ("close", 1)] {
        let mut sink = plugin
            .new_sink(&format!(r#"{{"panic_in": "{place}"}}"#), TestHost::new("p"))
            .unwrap();
        let result = if call == 0 {
            sink.flush()
        } else {
            sink.close()
        };
        expect_error(
            result.into_result(),
            ErrorKind::PANIC,
            &format!("panicking in {place}"),
        );
    }
    // Still here: no panic crossed the boundary.
}

#[test]
fn flaky_fails_the_configured_number_of_times_then_delivers() {
    let dir = scratch();
    let out = dir.path().join("flaky.jsonl");
    let plugin = load("trail-test-flaky", dir.path());
    let host = TestHost::new("flaky-sink");
    let mut sink = plugin
        .new_sink(
            &config(r#"{"path": "PATH", "fail_times": 2}"#, &out),
            host.clone(),
        )
        .unwrap();
    let batch = events(1..=3);
    for _ in 0..2 {
        let error = write(&mut sink, &batch).into_result().unwrap_err();
        assert_eq!(error.delivered, 0);
        assert_eq!(error.error.kind, ErrorKind::RETRYABLE);
        assert!(error.error.kind.is_retryable());
    }
    assert!(write(&mut sink, &batch).is_ok());
    assert!(sink.flush().is_ok());
    assert_eq!(recorded(&out), marked("flaky", 1..=3));
    assert_eq!(
        host.logs(),
        [
            "warn sink=flaky-sink: failing on purpose, 1 more to go",
            "warn sink=flaky-sink: failing on purpose, 0 more to go"
        ]
    );
}

#[test]
fn partial_success_says_how_many_records_were_delivered() {
    let dir = scratch();
    let out = dir.path().join("partial.jsonl");
    let plugin = load("trail-test-flaky", dir.path());
    let config = config(
        r#"{"path": "PATH", "permanent": true, "reject": "u3\""}"#,
        &out,
    );
    let mut sink = plugin.new_sink(&config, TestHost::new("s")).unwrap();

    let batch = events(1..=5);
    let error = write(&mut sink, &batch).into_result().unwrap_err();
    assert_eq!(error.delivered, 2);
    assert_eq!(error.error.kind, ErrorKind::PERMANENT);
    assert_eq!(
        error.error.message.as_str(),
        "record 3 contains the rejected substring"
    );

    // What a host does next: give up on the record at `delivered`, carry on after it.
    let rest = &batch[error.delivered as usize + 1..];
    assert!(write(&mut sink, rest).is_ok());
    assert!(sink.close().is_ok());
    assert_eq!(recorded(&out), marked("flaky", [1, 2, 4, 5]));
}

#[test]
fn a_plugin_with_another_layout_fails_the_abi_check() {
    let dir = scratch();
    let error = match Plugin::load(&built_plugin("trail-test-incompatible"), dir.path()) {
        Ok(plugin) => panic!("loaded {}", plugin.describe()),
        Err(host::LoadError::Library(error)) => error,
        Err(error) => panic!("{error}"),
    };
    let message = error.to_string();
    // Shown on purpose: this is what a user sees in trail's log.
    eprintln!("loading the incompatible plugin failed as expected:\n{message}");
    assert!(
        matches!(error, LibraryError::AbiInstability(_)),
        "{message}"
    );
    // The mismatch found is the constructor's second parameter, not the name or version.
    assert!(message.contains("bool"), "{message}");
    assert!(message.contains("Host"), "{message}");
    assert_eq!(host::KIND, "trail_sink");
}

#[test]
fn two_builds_of_one_plugin_load_side_by_side() {
    let dir = scratch();
    let out = dir.path().join("reload.jsonl");
    let config = config(r#"{"path": "PATH", "mark": "v1"}"#, &out);

    let v1 = load("trail-test-recorder", dir.path());
    let v2 = Plugin::load(&build::recorder_marked_v2(), dir.path()).unwrap();
    // A third copy of the first build is yet another library, with its own statics.
    let v1_again = load("trail-test-recorder", dir.path());

    let mut old = v1.new_sink(&config, TestHost::new("r")).unwrap();
    let mut new = v2.new_sink(&config, TestHost::new("r")).unwrap();
    let mut again = v1_again.new_sink(&config, TestHost::new("r")).unwrap();
    assert!(write(&mut old, &events(1..=2)).is_ok());
    assert!(old.close().is_ok());
    assert!(write(&mut new, &events(3..=4)).is_ok());
    assert!(new.close().is_ok());
    assert!(write(&mut again, &events(5..=5)).is_ok());
    assert!(again.close().is_ok());

    let mut expected = marked("v1", 1..=2);
    expected.extend(marked("v2", 3..=4));
    expected.extend(marked("v1", 5..=5));
    assert_eq!(recorded(&out), expected);
}

#[test]
fn the_template_appends_prefixed_lines() {
    let dir = scratch();
    let out = dir.path().join("lines.log");
    let plugin = load("trail-sink-template", dir.path());
    let host = TestHost::new("file");
    let config = config(r#"{"path": "PATH", "prefix": "audit: "}"#, &out);
    let mut sink = plugin.new_sink(&config, host.clone()).unwrap();
    let batch = events(1..=2);
    assert!(write(&mut sink, &batch).is_ok());
    assert!(sink.flush().is_ok());
    assert!(sink.close().is_ok());
    drop(sink);
    let expected: String = batch
        .iter()
        .map(|e| format!("audit: {}\n", e.line))
        .collect();
    assert_eq!(fs::read_to_string(&out).unwrap(), expected);
    assert_eq!(
        host.logs(),
        [
            format!("info sink=file: appending to {}", out.display()),
            "debug sink=file: closing".to_owned()
        ]
    );

    let result = plugin.new_sink(r#"{"prefix": "x"}"#, TestHost::new("file"));
    expect_error(result, ErrorKind::CONFIG, "missing field `path`");
}
