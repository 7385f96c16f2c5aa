//! Builds the plugins in this workspace as real dynamic libraries, loads them the way trail
//! does, and checks the contract end to end: info, writes, errors, partial success, panics,
//! the layout check, side-by-side builds, and host logging.
//!
//! Building, loading and hosting come from the plugin test kit (`plugins/testkit`), whose
//! `Plugin::try_load` is the reference for the daemon's loader.

use std::{fs, path::Path, sync::OnceLock};

use abi_stable::library::{LibraryError, RootModule};
use trail_plugin_api::{API_VERSION, ErrorKind, SinkPluginRef};
use trail_plugin_testkit::{
    Build, Event, LoadError, Plugin, TestHost, expect_error, scratch, workspace, write,
};

/// The plugins that need no special build, built together by one cargo invocation.
const PACKAGES: [&str; 5] = [
    "trail-test-recorder",
    "trail-test-flaky",
    "trail-test-panicker",
    "trail-test-incompatible",
    "trail-sink-template",
];

/// The library of `package` (one of `PACKAGES`), built once per test run.
fn built_plugin(package: &str) -> std::path::PathBuf {
    static BUILT: OnceLock<Vec<std::path::PathBuf>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        Build::new(workspace(), &PACKAGES)
            .env("TRAIL_TEST_MARK", None)
            .run()
    });
    built[PACKAGES.iter().position(|p| *p == package).unwrap()].clone()
}

/// The `trail-test-recorder` library built with `TRAIL_TEST_MARK=v2`.
fn recorder_marked_v2() -> std::path::PathBuf {
    static MARKED: OnceLock<std::path::PathBuf> = OnceLock::new();
    MARKED
        .get_or_init(|| {
            Build::new(workspace(), &["trail-test-recorder"])
                .env("TRAIL_TEST_MARK", Some("v2"))
                .label("v2")
                .run()
                .remove(0)
        })
        .clone()
}

fn load(package: &str, dir: &Path) -> Plugin {
    Plugin::try_load(&built_plugin(package), dir).unwrap_or_else(|e| panic!("{package}: {e}"))
}

/// What `host`'s plugin logged, as trail logs it: a line tagged with the sink's name.
fn logs(host: &TestHost) -> Vec<String> {
    host.messages()
        .into_iter()
        .map(|(level, message)| format!("{level} sink={}: {message}", host.sink_name()))
        .collect()
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
        .new_sink(&config(r#"{"path": "PATH", "mark": "v1"}"#, &out), &host)
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
        logs(&host),
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
    let result = recorder.new_sink(r#"{"mark": "v1"}"#, &TestHost::new("s"));
    expect_error(result, ErrorKind::CONFIG, &["missing field `path`"]);
    let flaky = load("trail-test-flaky", dir.path());
    let result = flaky.new_sink(
        &config(r#"{"path": "PATH", "permanent": true}"#, dir.path()),
        &TestHost::new("s"),
    );
    expect_error(result, ErrorKind::CONFIG, &["needs \"reject\""]);
}

#[test]
fn panics_in_new_and_write_come_back_as_panic_errors() {
    let dir = scratch();
    let plugin = load("trail-test-panicker", dir.path());

    let result = plugin.new_sink(r#"{"panic_in": "new"}"#, &TestHost::new("p"));
    let error = expect_error(
        result,
        ErrorKind::PANIC,
        &["panicking in new, as configured"],
    );
    // The location of the panic is in the message.
    assert!(error.message.contains("panicker/src/lib.rs:"), "{error}");

    let mut sink = plugin
        .new_sink(r#"{"panic_in": "write"}"#, &TestHost::new("p"))
        .unwrap();
    let error = write(&mut sink, &events(7..=9)).unwrap_err();
    assert_eq!(error.delivered, 0);
    expect_error::<()>(
        Err(error.error),
        ErrorKind::PANIC,
        &["panicking in write, as configured (first seq Some(7))"],
    );
    // The instance is broken from now on; the host drops it and makes a new one.
    expect_error(
        sink.flush().into_result(),
        ErrorKind::PANIC,
        &["unusable since it panicked"],
    );
    drop(sink);

    for (place, call) in [("flush", 0), ("close", 1)] {
        let mut sink = plugin
            .new_sink(
                &format!(r#"{{"panic_in": "{place}"}}"#),
                &TestHost::new("p"),
            )
            .unwrap();
        let result = if call == 0 {
            sink.flush()
        } else {
            sink.close()
        };
        expect_error(
            result.into_result(),
            ErrorKind::PANIC,
            &[&format!("panicking in {place}")],
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
        .new_sink(&config(r#"{"path": "PATH", "fail_times": 2}"#, &out), &host)
        .unwrap();
    let batch = events(1..=3);
    for _ in 0..2 {
        let error = write(&mut sink, &batch).unwrap_err();
        assert_eq!(error.delivered, 0);
        assert_eq!(error.error.kind, ErrorKind::RETRYABLE);
        assert!(error.error.kind.is_retryable());
    }
    assert!(write(&mut sink, &batch).is_ok());
    assert!(sink.flush().is_ok());
    assert_eq!(recorded(&out), marked("flaky", 1..=3));
    assert_eq!(
        logs(&host),
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
    let mut sink = plugin.new_sink(&config, &TestHost::new("s")).unwrap();

    let batch = events(1..=5);
    let error = write(&mut sink, &batch).unwrap_err();
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
    let error = match Plugin::try_load(&built_plugin("trail-test-incompatible"), dir.path()) {
        Ok(plugin) => panic!("loaded {}", plugin.describe()),
        Err(LoadError::Library(error)) => error,
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
    assert_eq!(<SinkPluginRef as RootModule>::NAME, "trail_sink");
}

#[test]
fn two_builds_of_one_plugin_load_side_by_side() {
    let dir = scratch();
    let out = dir.path().join("reload.jsonl");
    let config = config(r#"{"path": "PATH", "mark": "v1"}"#, &out);

    let v1 = load("trail-test-recorder", dir.path());
    let v2 = Plugin::try_load(&recorder_marked_v2(), dir.path()).unwrap();
    // A third copy of the first build is yet another library, with its own statics.
    let v1_again = load("trail-test-recorder", dir.path());

    let mut old = v1.new_sink(&config, &TestHost::new("r")).unwrap();
    let mut new = v2.new_sink(&config, &TestHost::new("r")).unwrap();
    let mut again = v1_again.new_sink(&config, &TestHost::new("r")).unwrap();
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
    let mut sink = plugin.new_sink(&config, &host).unwrap();
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
        logs(&host),
        [
            format!("info sink=file: appending to {}", out.display()),
            "debug sink=file: closing".to_owned()
        ]
    );

    let result = plugin.new_sink(r#"{"prefix": "x"}"#, &TestHost::new("file"));
    expect_error(result, ErrorKind::CONFIG, &["missing field `path`"]);
}
