//! The plugin driven the way trail drives it, without trail: `cargo test` builds this crate as the dynamic library
//! trail loads (a nested `cargo build`), loads it from a private copy, creates an instance from a JSON
//! configuration, and delivers batches of realistic records by trail's rule for each error kind
//! (`trail-plugin-testkit`).

use std::{fs, path::PathBuf, sync::OnceLock};

use trail_plugin_api::ErrorKind;
use trail_plugin_testkit::{Build, Plugin, TestHost, deliver, events, expect_error, scratch};

/// This crate's library, `lib<crate name with - replaced by _>.so`, built once per test run.
fn library() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            Build::new(env!("CARGO_MANIFEST_DIR"), &[env!("CARGO_PKG_NAME")])
                .run()
                .remove(0)
        })
        .clone()
}

#[test]
fn the_library_declares_the_plugin() {
    let dir = scratch();
    let plugin = Plugin::load(&library(), dir.path());
    assert_eq!(plugin.module.name().as_str(), "line-file");
    assert_eq!(plugin.module.version().as_str(), env!("CARGO_PKG_VERSION"));
    assert!(
        library().ends_with(format!(
            "lib{}.so",
            env!("CARGO_PKG_NAME").replace('-', "_")
        )),
        "{}",
        library().display()
    );
}

#[test]
fn every_record_is_appended_in_order_behind_the_prefix() {
    let dir = scratch();
    let plugin = Plugin::load(&library(), dir.path());
    let out = dir.path().join("audit.txt");
    let host = TestHost::new("audit-text");
    let config = serde_json::json!({"path": out, "prefix": "audit: "}).to_string();
    let mut sink = plugin.new_sink(&config, &host).unwrap();
    let batch = events(1..101);
    let delivery = deliver(&mut sink, &batch, 10);
    assert!(delivery.dead.is_empty(), "{:?}", delivery.dead);
    assert!(sink.flush().is_ok());
    assert!(sink.close().is_ok());
    let expected: String = batch
        .iter()
        .map(|e| format!("audit: {}\n", e.line))
        .collect();
    assert_eq!(fs::read_to_string(&out).unwrap(), expected);
    assert_eq!(
        host.logs(),
        [
            format!("info: appending to {}", out.display()),
            "debug: closing".to_owned()
        ]
    );
}

#[test]
fn a_bad_configuration_is_refused_as_a_config_error() {
    let dir = scratch();
    let plugin = Plugin::load(&library(), dir.path());
    let host = TestHost::new("audit-text");
    let missing = plugin.new_sink(r#"{"prefix": "x"}"#, &host);
    expect_error(missing, ErrorKind::CONFIG, &["missing field `path`"]);
    let typo = plugin.new_sink(r#"{"path": "/dev/null", "prefx": "x"}"#, &host);
    expect_error(typo, ErrorKind::CONFIG, &["unknown field `prefx`"]);
    let nowhere = dir.path().join("no/such/dir/audit.txt");
    let config = serde_json::json!({ "path": nowhere }).to_string();
    expect_error(
        plugin.new_sink(&config, &host),
        ErrorKind::CONFIG,
        &["cannot open", "check \"path\""],
    );
}
