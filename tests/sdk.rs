//! Plugins built the way a third party builds them: from a copy of `plugin-api/` (the SDK) in a directory outside
//! trail's repository, with no workspace around. The sink template must build that way and deliver; plugins built
//! against every frozen release of the API (`tests/compat/`) must load in today's daemon and deliver; a plugin built
//! against another major version must be refused with one line naming both versions.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use abi_stable::library::RootModule;
use serde_json::{Value, json};

use crate::sinks::{refused_at_start, sink};
use crate::util::{Daemon, Setup, login, recorded, wait_recorded, wait_until};

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A plugin library built outside the workspace; the directory it was built in lives as long as this.
struct Standalone {
    _dir: tempfile::TempDir,
    library: PathBuf,
}

/// Copies the API crate `api` to `<temp>/sdk/plugin-api` (with its `version` set to `api_version` if given) and
/// the plugin crate `plugin` to `<temp>/<package>` (renamed to `package`), points the plugin's `trail-plugin-api`
/// dependency at the copy, as the guide tells authors to, and runs `cargo build --offline` there. The temp dir is
/// outside the workspace, so a manifest that inherits from trail's workspace fails to build.
fn build_outside(
    plugin: &Path,
    package: &str,
    api: &Path,
    api_version: Option<&str>,
) -> Standalone {
    // One build at a time: they share a target directory, and the output is copied out before the next one.
    static BUILDING: Mutex<()> = Mutex::new(());
    let dir = tempfile::tempdir().unwrap();
    assert!(
        !dir.path().starts_with(workspace()),
        "the temp dir must be outside the workspace"
    );
    let sdk_api = dir.path().join("sdk/plugin-api");
    copy_dir(api, &sdk_api);
    if let Some(version) = api_version {
        edit_line(
            &sdk_api.join("Cargo.toml"),
            "version = ",
            &format!("version = \"{version}\""),
        );
    }
    let crate_dir = dir.path().join(package);
    copy_dir(plugin, &crate_dir);
    let manifest = crate_dir.join("Cargo.toml");
    edit_line(&manifest, "name = ", &format!("name = \"{package}\""));
    edit_line(
        &manifest,
        "trail-plugin-api = ",
        &format!("trail-plugin-api = {{ path = \"{}\" }}", sdk_api.display()),
    );

    // A target directory of its own under the workspace's, kept between runs so that dependencies stay built.
    let target = workspace().join("target").join("sdk-tests");
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO"))
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--offline", "--quiet"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo build of {package} in {} failed:\n{}",
        crate_dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // What the docs promise: `lib<crate name with - replaced by _>.so`.
    let file = format!("lib{}.so", package.replace('-', "_"));
    let built = target.join("debug").join(&file);
    assert!(built.is_file(), "{} was not produced", built.display());
    let library = dir.path().join(&file);
    fs::copy(&built, &library).unwrap();
    Standalone { _dir: dir, library }
}

/// Copies the files of `from` to `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Replaces the first line of `file` that starts with `prefix` by `line`.
fn edit_line(file: &Path, prefix: &str, line: &str) {
    let text = fs::read_to_string(file).unwrap();
    let at = text
        .lines()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in {}", file.display()));
    let mut lines: Vec<&str> = text.lines().collect();
    lines[at] = line;
    fs::write(file, lines.join("\n") + "\n").unwrap();
}

/// A daemon with the one plugin `library` installed as `plugins/<name>` and the given sinks.
fn daemon_with(library: &Path, name: &str, sinks: &[String]) -> Daemon {
    Daemon::with(Setup {
        extra_config: format!("plugins_dir: plugins\nsinks:\n{}", sinks.concat()),
        plugins: vec![(library.to_owned(), name.to_owned())],
        ..Setup::default()
    })
}

/// Emits logins with the given messages, each of which must be accepted; returns their seqs.
fn emit(daemon: &Daemon, messages: &[&str]) -> Vec<u64> {
    let mut client = daemon.client();
    messages
        .iter()
        .map(|m| {
            let answer = client.emit(&login(m)).unwrap();
            assert_eq!(answer["ok"], json!(true), "{answer}");
            answer["seq"].as_u64().unwrap()
        })
        .collect()
}

/// The log's records with these seqs, as stored lines.
fn stored_lines(daemon: &Daemon, seqs: &[u64]) -> Vec<String> {
    seqs.iter()
        .map(|seq| {
            daemon
                .log_lines()
                .into_iter()
                .find(|l| serde_json::from_str::<Value>(l).unwrap()["seq"] == json!(seq))
                .unwrap_or_else(|| panic!("seq {seq} is not in the log"))
        })
        .collect()
}

#[test]
fn the_sink_template_builds_outside_the_repository_and_delivers() {
    let built = build_outside(
        &workspace().join("examples/sink-template"),
        "acme-sink-lines",
        &workspace().join("plugin-api"),
        None,
    );
    assert!(built.library.ends_with("libacme_sink_lines.so"));
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("audit.txt");
    let mut daemon = daemon_with(
        &built.library,
        "libacme_sink_lines.so",
        &[sink(
            "lines",
            "line-file",
            "['user_login']",
            &format!("{{path: '{}', prefix: 'audit: '}}", file.display()),
        )],
    );
    let seqs = emit(&daemon, &["one", "two", "three"]);
    let expected: Vec<String> = stored_lines(&daemon, &seqs)
        .iter()
        .map(|l| format!("audit: {l}"))
        .collect();
    let delivered = wait_until(Duration::from_secs(60), || {
        fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .count()
            >= 3
    });
    assert!(delivered, "{}", daemon.stderr());
    let text = fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().collect::<Vec<_>>(), expected);
    assert!(daemon.stop().success(), "{}", daemon.stderr());
}

/// The API versions frozen under `tests/compat/`: (version, directory).
fn frozen_apis() -> Vec<(String, PathBuf)> {
    let mut apis: Vec<(String, PathBuf)> = fs::read_dir(workspace().join("tests/compat"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            Some((name.strip_prefix("plugin-api-")?.to_owned(), p.clone()))
        })
        .collect();
    apis.sort();
    apis
}

#[test]
fn plugins_built_against_every_released_api_load_and_deliver() {
    let apis = frozen_apis();
    assert!(
        apis.iter().any(|(v, _)| v == "1.0"),
        "tests/compat/plugin-api-1.0 is missing: {apis:?}"
    );
    for (version, api) in apis {
        let built = build_outside(
            &workspace().join("tests/compat/sink"),
            "trail-compat-sink",
            &api,
            None,
        );
        let out = tempfile::tempdir().unwrap();
        let file = out.path().join("compat.jsonl");
        let mut daemon = daemon_with(
            &built.library,
            "libcompat.so",
            &[sink(
                "old",
                "compat",
                "['user_login']",
                &format!("{{path: '{}', reject: 'reject-me'}}", file.display()),
            )],
        );
        let seqs = emit(&daemon, &["first", "reject-me", "last"]);
        let lines = stored_lines(&daemon, &seqs);

        // Every field of every record arrives, in order; the permanent error dead-letters exactly its record.
        let got = wait_recorded(&file, 2);
        let expect = |i: usize| {
            json!({"seq": seqs[i], "id": serde_json::from_str::<Value>(&lines[i]).unwrap()["id"],
                "type": "user_login", "line": lines[i], "api": version})
        };
        assert_eq!(got, vec![expect(0), expect(2)], "api {version}");
        let dead_file = daemon.path("spool/dead/old.jsonl");
        assert!(
            wait_until(Duration::from_secs(60), || recorded(&dead_file).len() == 1),
            "api {version}: no dead letter\n{}",
            daemon.stderr()
        );
        let dead = recorded(&dead_file);
        assert_eq!(dead[0]["seq"], json!(seqs[1]), "api {version}");
        assert!(
            dead[0]["error"]
                .as_str()
                .unwrap()
                .contains(&format!("record {} is rejected", seqs[1])),
            "api {version}: {}",
            dead[0]
        );

        // The daemon recorded which API the plugin was built against.
        let loaded = daemon
            .records()
            .into_iter()
            .find(|r| r["type"] == json!("trail_plugin_loaded"))
            .expect("a trail_plugin_loaded record");
        assert_eq!(loaded["payload"]["api_version"], json!(version));

        // The host's logging callback works across versions; `close` runs at shutdown.
        assert!(daemon.stop().success(), "{}", daemon.stderr());
        let log = daemon.stderr();
        for line in [
            format!("compat sink built against trail-plugin-api {version} ready"),
            format!("compat sink: rejecting {}", seqs[1]),
            "compat sink: closing".to_owned(),
        ] {
            assert!(
                log.lines().any(|l| l.contains(&line) && l.contains("old")),
                "api {version}: {line:?} (tagged with the sink) missing from the daemon's log:\n{log}"
            );
        }
    }
}

#[test]
fn a_plugin_for_another_major_is_refused_in_one_line() {
    let ours = trail_plugin_api::API_VERSION;
    let next = format!("{}.0.0", ours.major + 1);
    let built = build_outside(
        &workspace().join("tests/compat/sink"),
        "trail-compat-sink",
        &workspace().join("plugin-api"),
        Some(&next),
    );
    let expected = format!(
        "built for trail-plugin-api {next}; this daemon speaks {}.x ({}): rebuild it against trail-plugin-api {}.x",
        ours.major,
        <trail_plugin_api::SinkPluginRef as RootModule>::VERSION_STRINGS.version,
        ours.major
    );
    let sink = sink("s", "compat", "['*']", "{path: /dev/null}");
    for text in refused_at_start(&built.library, "libx.so", &sink) {
        // Besides the line saying which file it is about to load, every line naming the file is this one line.
        let about: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("libx.so") && !l.contains("loading plugin library"))
            .collect();
        assert!(!about.is_empty(), "nothing about the plugin in:\n{text}");
        for line in about {
            assert!(
                line.contains(&expected),
                "{expected:?} missing from {line:?} in:\n{text}"
            );
        }
        // abi_stable's own message spreads the versions over several lines.
        assert!(!text.contains("version mismatch"), "{text}");
    }
}
