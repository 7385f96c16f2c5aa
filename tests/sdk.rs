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
    // A plugin whose tests use the plugin test kit gets the kit beside the API copy, as in the installed SDK.
    if fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .any(|l| l.starts_with("trail-plugin-testkit = "))
    {
        let sdk_kit = dir.path().join("sdk/testkit");
        copy_dir(&workspace().join("plugins/testkit"), &sdk_kit);
        edit_line(
            &sdk_kit.join("Cargo.toml"),
            "trail-plugin-api = ",
            "trail-plugin-api = { path = \"../plugin-api\" }",
        );
        edit_line(
            &manifest,
            "trail-plugin-testkit = ",
            &format!(
                "trail-plugin-testkit = {{ path = \"{}\" }}",
                sdk_kit.display()
            ),
        );
    }

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
    // `trail plugin check` says the same, in one line.
    let (code, out, err) = plugin_check(&built.library);
    assert_eq!(code, 1, "{out}{err}");
    let refused: Vec<&str> = out.lines().filter(|l| l.starts_with("result:")).collect();
    assert_eq!(refused.len(), 1, "{out}");
    assert!(
        refused[0].contains(&expected),
        "{expected:?} missing from:
{out}"
    );
    assert!(
        !out.contains("version mismatch") && !out.contains("result: ok"),
        "{out}"
    );
}

/// `trail plugin check FILE`: (exit code, standard output, standard error).
fn plugin_check(file: &Path) -> (i32, String, String) {
    crate::util::trail(&["plugin", "check", file.to_str().unwrap()], "")
}

#[test]
fn plugin_check_says_whether_the_daemon_would_load_a_library() {
    let dir = tempfile::tempdir().unwrap();
    // In a directory only its owner can change, as the daemon requires.
    let good = dir.path().join("libtrail_sink_template.so");
    fs::copy(crate::util::plugins::library("trail-sink-template"), &good).unwrap();
    let (code, out, err) = plugin_check(&good);
    assert_eq!(code, 0, "{out}{err}");
    let api = trail_plugin_api::API_VERSION;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("file: {}", good.display()),
            "plugin: line-file".to_owned(),
            "version: 0.1.0".to_owned(),
            format!(
                "api: trail-plugin-api {}.{} (this trail speaks {api})",
                api.major, api.minor
            ),
            "result: ok: the daemon would load it".to_owned(),
        ],
        "{err}"
    );

    let text = dir.path().join("libnotes.so");
    fs::write(&text, "just some notes\n").unwrap();
    let (code, out, err) = plugin_check(&text);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("plugin: notes (by its file name"), "{out}");
    assert!(
        out.contains("result: refused: plugin ")
            && out.contains("not a shared library (no ELF header)"),
        "{out}"
    );

    let bytes = fs::read(&good).unwrap();
    let cut = dir.path().join("libcut.so");
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (code, out, err) = plugin_check(&cut);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("incomplete (truncated ELF file"), "{out}");
    assert!(!out.contains("result: ok"), "{out}");

    let (code, _, err) = plugin_check(&dir.path().join("missing.so"));
    assert_eq!(code, 1, "{err}");
}

/// The SDK as `make install DESTDIR=<root> PREFIX=/usr` lays it out (the install's SDK step alone).
fn installed_sdk(root: &Path) -> PathBuf {
    let out = Command::new("make")
        .arg("-C")
        .arg(workspace())
        .args(["--no-print-directory", "install-sdk", "PREFIX=/usr"])
        .arg(format!("DESTDIR={}", root.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make install-sdk:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let sdk = root.join("usr/share/trail/sdk");
    for file in [
        "plugin-api/Cargo.toml",
        "plugin-api/GUIDE.md",
        "plugin-api/src/lib.rs",
        "testkit/Cargo.toml",
        "testkit/src/lib.rs",
        "sink-template/Cargo.toml",
        "sink-template/README.md",
        "sink-template/src/lib.rs",
        "sink-template/tests/sink.rs",
    ] {
        assert!(sdk.join(file).is_file(), "the SDK lacks {file}");
    }
    // Inside the SDK the crates name each other where they lie now.
    let kit = fs::read_to_string(sdk.join("testkit/Cargo.toml")).unwrap();
    assert!(
        kit.contains(r#"trail-plugin-api = { path = "../plugin-api" }"#),
        "{kit}"
    );
    sdk
}

/// Runs cargo with `args` in `dir`, offline, in the SDK tests' target directory; returns its output, panicking
/// when it fails.
fn cargo_offline(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .current_dir(dir)
        .env(
            "CARGO_TARGET_DIR",
            workspace().join("target").join("sdk-tests"),
        )
        // Nested cargo runs (the plugin test kit's builds) are offline too.
        .env("CARGO_NET_OFFLINE", "true")
        .args(args)
        .arg("--offline")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "cargo {args:?} in {}:\n{text}",
        dir.display()
    );
    text
}

#[test]
fn a_scaffold_from_plugin_new_builds_tests_and_hot_swaps_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(!tmp.path().starts_with(workspace()));
    let sdk = installed_sdk(&tmp.path().join("root"));
    let crate_dir = tmp.path().join("acme-lines");
    let new = |args: &[&str]| {
        let mut all = vec!["plugin", "new"];
        all.extend(args);
        crate::util::trail(&all, "")
    };
    let sdk_arg = format!("--sdk={}", sdk.display());
    let (code, out, err) = new(&["acme-lines", crate_dir.to_str().unwrap(), &sdk_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("target/release/libacme_lines.so"), "{out}");
    let readme = fs::read_to_string(crate_dir.join("README.md")).unwrap();
    assert!(
        readme.contains("target/release/libacme_lines.so"),
        "{readme}"
    );
    assert!(
        readme.contains("mv ") && readme.contains("hot swap"),
        "{readme}"
    );

    // Refused: an invalid crate name, and a directory that is not empty.
    let (code, _, err) = new(&[
        "Acme Lines",
        tmp.path().join("x").to_str().unwrap(),
        &sdk_arg,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("\"Acme Lines\" cannot be a plugin crate's name"),
        "{err}"
    );
    let (code, _, err) = new(&["acme-lines", crate_dir.to_str().unwrap(), &sdk_arg]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("exists and is not empty"), "{err}");
    let (code, _, err) = new(&[
        "acme-other",
        tmp.path().join("y").to_str().unwrap(),
        "--sdk=/nonexistent/sdk",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no trail SDK at /nonexistent/sdk"), "{err}");

    // Its own tests pass and it builds, offline, outside any checkout.
    let tested = cargo_offline(&crate_dir, &["test", "--quiet"]);
    assert!(
        tested.contains("test result: ok. 3 passed"),
        "the scaffold's tests did not run:\n{tested}"
    );
    cargo_offline(&crate_dir, &["build", "--quiet"]);
    let built = workspace().join("target/sdk-tests/debug/libacme_lines.so");
    let first = tmp.path().join("libacme_lines-0.1.0.so");
    fs::copy(&built, &first).unwrap();
    let (code, out, err) = plugin_check(&first);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plugin: acme-lines\nversion: 0.1.0\n"),
        "{out}"
    );

    // A second build, 0.2.0.
    edit_line(
        &crate_dir.join("Cargo.toml"),
        "version = ",
        "version = \"0.2.0\"",
    );
    cargo_offline(&crate_dir, &["build", "--quiet"]);
    let second = tmp.path().join("libacme_lines-0.2.0.so");
    fs::copy(&built, &second).unwrap();

    // The first build serves a daemon under load; the second is installed by rename, as the README says.
    let out_file = tmp.path().join("acme.txt");
    let daemon = daemon_with(
        &first,
        "libacme_lines.so",
        &[sink(
            "acme",
            "acme-lines",
            "['user_login']",
            &format!("{{path: '{}'}}", out_file.display()),
        )],
    );
    let lines = || -> Vec<u64> {
        let text = fs::read_to_string(&out_file).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        complete
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = crate::sinks::stream_events(&daemon.socket, stop.clone());
    assert!(wait_until(Duration::from_secs(60), || lines().len() > 200));
    daemon.install_plugin(&second, "libacme_lines.so");
    let version = |daemon: &Daemon| {
        daemon.admin(json!({"command": "status"}))["plugins"][0]["version"].clone()
    };
    assert!(
        wait_until(Duration::from_secs(60), || version(&daemon)
            == json!("0.2.0")),
        "0.2.0 never served:\n{}",
        daemon.stderr()
    );
    let swapped_at = lines().len();
    assert!(wait_until(Duration::from_secs(60), || lines().len() > swapped_at + 200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = client.join().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || lines().len() >= acked.len()),
        "{} of {} delivered",
        lines().len(),
        acked.len()
    );
    // Nothing lost, nothing repeated, in order, across the swap.
    assert_eq!(lines(), acked);
    let status = daemon.admin(json!({"command": "status"}));
    assert_eq!(status["plugins"][0]["generation"], json!(2), "{status}");
    assert_eq!(status["sinks"][0]["swaps"], json!(1), "{status}");
}
