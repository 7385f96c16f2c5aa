//! The systemd units and snippets as systemd's own tools read them: `systemd-analyze verify` on every unit,
//! `systemd-analyze security --offline` on the service, and the sysusers/tmpfiles snippets applied to a scratch root.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

/// The unit files shipped in `systemd/`.
fn units() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = fs::read_dir(systemd_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "service" || e == "socket")
        })
        .collect();
    units.sort();
    assert!(!units.is_empty());
    units
}

fn run(command: &mut Command) -> (bool, String) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A scratch root as `systemd-analyze verify --root` needs it: the host's own units (for the default
/// dependencies), ours where an administrator installs them, and the binaries the units start.
fn scratch_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let system = root.path().join("usr/lib/systemd/system");
    fs::create_dir_all(&system).unwrap();
    for entry in fs::read_dir("/lib/systemd/system").unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            fs::copy(&path, system.join(path.file_name().unwrap())).unwrap();
        }
    }
    for unit in units() {
        fs::copy(&unit, system.join(unit.file_name().unwrap())).unwrap();
    }
    for dir in ["usr/bin", "bin"] {
        fs::create_dir_all(root.path().join(dir)).unwrap();
    }
    fs::copy(
        env!("CARGO_BIN_EXE_traild"),
        root.path().join("usr/bin/traild"),
    )
    .unwrap();
    fs::copy(
        env!("CARGO_BIN_EXE_trail"),
        root.path().join("usr/bin/trail"),
    )
    .unwrap();
    fs::copy("/bin/kill", root.path().join("bin/kill")).unwrap();
    root
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let root = scratch_root();
    for unit in units() {
        let name = unit.file_name().unwrap().to_str().unwrap();
        let (ok, text) = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", root.path().display()))
            .arg(name));
        assert!(
            ok && text.trim().is_empty(),
            "systemd-analyze verify {name}:\n{text}"
        );
    }
}

#[test]
fn the_service_is_exposed_at_most_2_0() {
    let unit = systemd_dir().join("trail.service");
    let (ok, text) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit));
    assert!(ok, "systemd-analyze security:\n{text}");
    let level: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for trail.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.0, "exposure {level} > 2.0:\n{text}");
}

/// The values of `key=` in a unit file, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let text = fs::read_to_string(systemd_dir().join(unit)).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .collect()
}

/// The socket units listen where the shipped configuration puts the sockets, no more open than it says, under the
/// names the daemon looks for; the service takes both. (The daemon refuses a passed socket bound elsewhere.)
#[test]
fn the_socket_units_match_the_shipped_configuration_and_the_service() {
    let config = trail::Config::load(&systemd_dir().join("trail.yaml")).unwrap();
    for (unit, path, mode, name) in [
        (
            "trail.socket",
            config.socket.path.clone(),
            config.socket.mode,
            trail::systemd::SUBMISSION,
        ),
        (
            "trail-admin.socket",
            config.admin_socket(),
            0o600,
            trail::systemd::ADMIN,
        ),
    ] {
        assert_eq!(
            unit_values(unit, "ListenStream"),
            [path.display().to_string()],
            "{unit}"
        );
        assert_eq!(
            unit_values(unit, "SocketMode"),
            [format!("{mode:04o}")],
            "{unit}"
        );
        assert_eq!(unit_values(unit, "FileDescriptorName"), [name], "{unit}");
        assert_eq!(unit_values(unit, "Service"), ["trail.service"], "{unit}");
        assert_eq!(unit_values(unit, "SocketUser"), ["trail"], "{unit}");
    }
    let group = config
        .socket
        .group
        .clone()
        .unwrap_or_else(|| trail::config::DEFAULT_SOCKET_GROUP.to_owned());
    assert_eq!(unit_values("trail.socket", "SocketGroup"), [group]);
    let sockets = unit_values("trail.service", "Sockets").join(" ");
    let required = unit_values("trail.service", "Requires").join(" ");
    for unit in ["trail.socket", "trail-admin.socket"] {
        assert!(sockets.split(' ').any(|s| s == unit), "Sockets={sockets}");
        assert!(
            required.split(' ').any(|s| s == unit),
            "Requires={required}"
        );
    }
    // The runtime directory holds the sockets' files: it must outlive a stop of the service.
    assert_eq!(
        unit_values("trail.service", "RuntimeDirectoryPreserve"),
        ["yes"]
    );
}

#[test]
fn sysusers_and_tmpfiles_create_the_user_and_private_directories() {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir(root.path().join("etc")).unwrap();
    let root_arg = format!("--root={}", root.path().display());
    let (ok, text) = run(Command::new("systemd-sysusers")
        .arg(&root_arg)
        .arg(systemd_dir().join("trail.sysusers")));
    assert!(ok, "systemd-sysusers:\n{text}");
    let passwd = fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let uid: u32 = passwd
        .lines()
        .find_map(|l| l.strip_prefix("trail:x:"))
        .and_then(|rest| rest.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no user trail in:\n{passwd}"));
    let group = fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(
        group.lines().any(|l| l.starts_with("trail:x:")),
        "no group trail in:\n{group}"
    );

    let (ok, text) = run(Command::new("systemd-tmpfiles")
        .arg(&root_arg)
        .arg("--create")
        .arg(systemd_dir().join("trail.tmpfiles")));
    assert!(ok, "systemd-tmpfiles:\n{text}");
    for (dir, mode) in [
        ("var/lib/trail", 0o750),
        ("var/lib/trail/log", 0o750),
        ("var/lib/trail/spool", 0o750),
        ("var/lib/trail/keys", 0o700),
        ("run/trail", 0o750),
    ] {
        let meta = fs::metadata(root.path().join(dir)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{dir}");
        assert_eq!(meta.uid(), uid, "{dir} is owned by trail");
    }
}

/// `make install` into a scratch prefix, then the installed daemon on the installed configuration: the layout
/// README promises, the paths inside the unit and the configuration rewritten to it, and a working daemon.
#[test]
fn make_install_lays_out_a_working_installation() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // What `make` would have built, staged where `make install` reads it (OUT).
    let staged = root.join("staged");
    fs::create_dir(&staged).unwrap();
    fs::copy(env!("CARGO_BIN_EXE_traild"), staged.join("traild")).unwrap();
    fs::copy(env!("CARGO_BIN_EXE_trail"), staged.join("trail")).unwrap();
    for package in [
        "trail-sink-webhook",
        "trail-sink-syslog",
        "trail-sink-postgres",
        "trail-sink-nats",
    ] {
        let library = crate::util::plugins::library(package);
        fs::copy(&library, staged.join(library.file_name().unwrap())).unwrap();
    }
    let install = || {
        run(Command::new("make")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .arg("--no-print-directory")
            .arg("install")
            .arg(format!("OUT={}", staged.display()))
            .arg(format!("PREFIX={}", root.join("usr").display()))
            .arg(format!("SYSCONFDIR={}", root.join("etc").display()))
            .arg(format!("LOCALSTATEDIR={}", root.join("var").display()))
            .arg(format!("RUNSTATEDIR={}", root.join("run").display())))
    };
    let (ok, text) = install();
    assert!(ok, "make install:\n{text}");

    let mode = |p: &str| fs::metadata(root.join(p)).unwrap().permissions().mode() & 0o7777;
    for (path, want) in [
        ("usr/bin/traild", 0o755),
        ("usr/bin/trail", 0o755),
        ("usr/lib/trail/plugins/libtrail_sink_webhook.so", 0o644),
        ("usr/lib/trail/plugins/libtrail_sink_syslog.so", 0o644),
        ("usr/lib/trail/plugins/libtrail_sink_postgres.so", 0o644),
        ("usr/lib/trail/plugins/libtrail_sink_nats.so", 0o644),
        ("usr/lib/systemd/system/trail.service", 0o644),
        ("usr/lib/systemd/system/trail.socket", 0o644),
        ("usr/lib/systemd/system/trail-admin.socket", 0o644),
        ("usr/lib/sysusers.d/trail.conf", 0o644),
        ("usr/lib/tmpfiles.d/trail.conf", 0o644),
        ("etc/trail/trail.yaml", 0o640),
        ("etc/trail/event-types/user_login.yml", 0o644),
        ("usr/share/doc/trail/README.md", 0o644),
        ("usr/share/trail/sdk/plugin-api/Cargo.toml", 0o644),
        ("usr/share/trail/sdk/plugin-api/src/lib.rs", 0o644),
        ("usr/share/trail/sdk/testkit/Cargo.toml", 0o644),
        ("usr/share/trail/sdk/sink-template/tests/sink.rs", 0o644),
        ("usr/share/trail/sdk/sink-template", 0o755),
        ("usr/share/trail/trail.rules.yml", 0o644),
    ] {
        assert_eq!(mode(path), want, "{path}");
    }
    assert!(
        !root
            .join("etc/trail/event-types/trail_plugin_loaded.yml")
            .exists(),
        "the daemon's own types are built in, not installed"
    );
    let unit = fs::read_to_string(root.join("usr/lib/systemd/system/trail.service")).unwrap();
    let bin = root.join("usr/bin/traild");
    let config = root.join("etc/trail/trail.yaml");
    assert!(
        unit.contains(&format!(
            "ExecStart={} --config {}",
            bin.display(),
            config.display()
        )),
        "{unit}"
    );
    let state = root.join("var/lib/trail");
    assert!(
        unit.contains(&format!("ReadWritePaths={} ", state.display())),
        "{unit}"
    );

    // The administrator's configuration survives a second install.
    let edited = format!("{}\n# edited\n", fs::read_to_string(&config).unwrap());
    fs::write(&config, &edited).unwrap();
    let (ok, text) = install();
    assert!(ok, "make install again:\n{text}");
    assert_eq!(fs::read_to_string(&config).unwrap(), edited);

    // The installed daemon runs on the installed configuration (what tmpfiles would create, created by hand).
    for dir in ["run/trail", "var/lib/trail"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    let mut daemon = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let socket = root.join("run/trail/trail.sock");
    let up = crate::util::wait_until(std::time::Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    if !up {
        let _ = daemon.kill();
        panic!(
            "{}",
            String::from_utf8_lossy(&daemon.wait_with_output().unwrap().stderr)
        );
    }
    let answer = crate::util::Client::connect(&socket)
        .unwrap()
        .emit(&crate::util::login("installed"))
        .unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    let logged = fs::read_dir(state.join("log"))
        .unwrap()
        .filter_map(|e| fs::read_to_string(e.unwrap().path()).ok())
        .any(|text| text.contains("\"message\":\"installed\""));
    assert!(logged, "the event is in the installed log");
}
