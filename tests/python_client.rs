//! The Python client (`clients/python`): its own `unittest` suite, run against the real daemon built here.

use std::path::Path;
use std::process::Command;

#[test]
fn the_python_clients_unittest_suite_passes_against_the_real_daemon() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .args([
            "-m",
            "unittest",
            "discover",
            "-s",
            "clients/python/tests",
            "-v",
        ])
        .current_dir(root)
        .env("TRAILD", env!("CARGO_BIN_EXE_traild"))
        .env("TRAIL_EVENT_TYPES", root.join("event-types"))
        .output()
        .expect("python3 runs (Debian package python3)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client's tests failed:\n{stderr}"
    );
    // unittest reports "Ran N tests"; a suite that found nothing to run must not pass.
    assert!(
        stderr.contains("Ran ") && !stderr.contains("Ran 0 tests"),
        "no Python test ran:\n{stderr}"
    );
}
