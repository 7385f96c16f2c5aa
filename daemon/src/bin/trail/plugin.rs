//! `trail plugin new` and `trail plugin check`: starting a sink plugin of your own, and checking a library the way
//! the daemon loads it.
//!
//! The scaffold is the sink template (`examples/sink-template`, also installed in the SDK as `sink-template/`),
//! built into this binary, with its names replaced by the new crate's and its dependencies pointed at the
//! installed SDK.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where the SDK is when neither `--sdk` nor [`SDK_VAR`] says: `share/trail/sdk` beside the directory of this
/// binary when it exists (so `/usr/share/trail/sdk` for `/usr/bin/trail`), else this.
pub const DEFAULT_SDK: &str = "/usr/share/trail/sdk";
/// The environment variable naming the SDK's directory.
pub const SDK_VAR: &str = "TRAIL_SDK";

/// The template's files: (path in the new crate, text).
const TEMPLATE: [(&str, &str); 4] = [
    (
        "Cargo.toml",
        include_str!("../../../../examples/sink-template/Cargo.toml"),
    ),
    (
        "README.md",
        include_str!("../../../../examples/sink-template/README.md"),
    ),
    (
        "src/lib.rs",
        include_str!("../../../../examples/sink-template/src/lib.rs"),
    ),
    (
        "tests/sink.rs",
        include_str!("../../../../examples/sink-template/tests/sink.rs"),
    ),
];

/// The template's crate name, its library's stem and its plugin's name, replaced by the new crate's.
const TEMPLATE_CRATE: &str = "trail-sink-template";
const TEMPLATE_PLUGIN: &str = "line-file";
/// The template's dependency paths inside trail's repository, replaced by the SDK's directories.
const TEMPLATE_API_PATH: &str = r#"path = "../../plugin-api""#;
const TEMPLATE_KIT_PATH: &str = r#"path = "../../plugins/testkit""#;

/// Why a crate name cannot be used: what cargo (and trail, for the plugin's name) would refuse.
pub fn check_name(name: &str) -> Result<(), String> {
    const KEYWORDS: [&str; 51] = [
        "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
        "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
        "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub",
        "ref", "return", "self", "static", "struct", "super", "trait", "true", "try", "type",
        "typeof", "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
    ];
    const RESERVED: [&str; 10] = [
        "std",
        "core",
        "alloc",
        "proc_macro",
        "proc-macro",
        "test",
        "build",
        "deps",
        "examples",
        "incremental",
    ];
    let bad = |why: String| Err(format!("{name:?} cannot be a plugin crate's name: {why}"));
    let Some(first) = name.chars().next() else {
        return Err("the plugin crate's name is empty: give a name such as acme-sink".into());
    };
    if name.len() > 64 {
        return bad(format!(
            "it has {} characters, at most 64 are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return bad(format!(
            "{c:?} is not allowed; use lower-case letters, digits, - and _ (the name is also the plugin's name in \
             trail.yaml)"
        ));
    }
    if !first.is_ascii_lowercase() {
        return bad("it must start with a letter".into());
    }
    if KEYWORDS.contains(&name) {
        return bad("it is a Rust keyword".into());
    }
    if RESERVED.contains(&name) {
        return bad(
            "cargo reserves it (a standard library crate or a directory of its own)".into(),
        );
    }
    Ok(())
}

/// A string as a TOML basic string, quotes included.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The template's files for the crate `name` whose dependencies point at the SDK in `sdk` (absolute).
pub fn scaffold(name: &str, sdk: &Path) -> Vec<(&'static str, String)> {
    let stem = name.replace('-', "_");
    let path_to = |dir: &str| format!("path = {}", toml_string(&sdk.join(dir).to_string_lossy()));
    let mut files: Vec<(&'static str, String)> = TEMPLATE
        .iter()
        .map(|(path, text)| {
            let text = text
                .replace(TEMPLATE_CRATE, name)
                .replace(&TEMPLATE_CRATE.replace('-', "_"), &stem)
                .replace(TEMPLATE_PLUGIN, name)
                .replace(TEMPLATE_API_PATH, &path_to("plugin-api"))
                .replace(TEMPLATE_KIT_PATH, &path_to("testkit"));
            (*path, text)
        })
        .collect();
    // A workspace of its own: the crate builds wherever it is put, even inside another cargo workspace.
    files[0].1.push_str(
        "\n# The crate is a workspace of its own, so that it builds wherever it lies.\n[workspace]\n",
    );
    files.push((".gitignore", "/target\n".to_owned()));
    files
}

/// The SDK directory to use: `--sdk`, else [`SDK_VAR`] (both handled by clap), else beside this binary, else
/// [`DEFAULT_SDK`].
fn sdk_dir(given: Option<PathBuf>) -> PathBuf {
    if let Some(dir) = given.filter(|d| !d.as_os_str().is_empty()) {
        return dir;
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("share/trail/sdk")));
    match beside {
        Some(dir) if dir.join("plugin-api/Cargo.toml").is_file() => dir,
        _ => PathBuf::from(DEFAULT_SDK),
    }
}

/// `trail plugin new NAME [DIR]`: exit 0 when the crate was written, 2 for a name, directory or SDK that cannot be
/// used, 1 when writing failed.
pub fn new(name: &str, dir: Option<PathBuf>, sdk: Option<PathBuf>) -> ExitCode {
    let fail = |code: u8, message: String| {
        eprintln!("trail plugin new: {message}");
        ExitCode::from(code)
    };
    if let Err(e) = check_name(name) {
        return fail(2, e);
    }
    let sdk = sdk_dir(sdk);
    let sdk = match fs::canonicalize(&sdk) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                2,
                format!(
                    "no trail SDK at {} ({e}): install trail with `make install` or its Debian package, or name \
                     the SDK with --sdk PATH or {SDK_VAR}",
                    sdk.display()
                ),
            );
        }
    };
    for part in ["plugin-api", "testkit"] {
        if !sdk.join(part).join("Cargo.toml").is_file() {
            return fail(
                2,
                format!(
                    "{} is not a trail SDK: it has no {part}/Cargo.toml; name the SDK with --sdk PATH or {SDK_VAR}",
                    sdk.display()
                ),
            );
        }
    }
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    match fs::read_dir(&dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return fail(
                    2,
                    format!(
                        "{} exists and is not empty: choose another directory, or remove it first",
                        dir.display()
                    ),
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return fail(
                2,
                format!("{} exists and is not a directory", dir.display()),
            );
        }
        Err(e) => return fail(1, format!("{}: {e}", dir.display())),
    }
    for (path, text) in scaffold(name, &sdk) {
        let target = dir.join(path);
        let written = fs::create_dir_all(target.parent().expect("a file in the crate"))
            .and_then(|()| {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
            })
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = written {
            return fail(1, format!("cannot write {}: {e}", target.display()));
        }
    }
    let library = format!("lib{}.so", name.replace('-', "_"));
    println!(
        "created the sink plugin crate {name} in {} (plugin {name:?}, against the SDK in {})\n\
         next: cd {} && cargo test && cargo build --release\n\
         the build produces target/release/{library}; README.md says how to install and hot-swap it",
        dir.display(),
        sdk.display(),
        dir.display()
    );
    ExitCode::SUCCESS
}

/// `trail plugin check FILE`: exit 0 only when the daemon would load the library, 1 when it would not, 2 when it
/// could not be checked.
pub fn check(file: &Path) -> ExitCode {
    use trail::sinks::validate;
    let checked = match validate::check_library(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trail plugin check: {e}");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "file: {}", file.display());
    match &checked.build {
        Some(build) => {
            let _ = writeln!(out, "plugin: {}", build.name);
            let _ = writeln!(out, "version: {}", build.version);
            let _ = writeln!(
                out,
                "api: trail-plugin-api {} (this trail speaks {})",
                build.api_version,
                trail_plugin_api::API_VERSION
            );
        }
        None => {
            let how = match &checked.identity.unreadable {
                Some(why) => format!("by its file name; its name symbol cannot be read: {why}"),
                None => "as the daemon would pick it".to_owned(),
            };
            let _ = writeln!(out, "plugin: {} ({how})", checked.identity.name);
        }
    }
    if checked.problems.is_empty() {
        let _ = writeln!(out, "result: ok: the daemon would load it");
        ExitCode::SUCCESS
    } else {
        for problem in &checked.problems {
            let _ = writeln!(out, "result: refused: {problem}");
        }
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cargo_or_trail_would_refuse_are_refused() {
        let check = |name: &str, expected: Option<&str>| match (check_name(name), expected) {
            (Ok(()), None) => {}
            (Err(e), Some(part)) => assert!(e.contains(part), "{name:?}: {e}"),
            (got, _) => panic!("{name:?}: {got:?}"),
        };
        check("acme-sink", None);
        check("acme_sink2", None);
        check("a", None);
        check("", Some("empty"));
        check("Acme", Some("'A' is not allowed"));
        check("acme sink", Some("' ' is not allowed"));
        check("acme.sink", Some("'.' is not allowed"));
        check("2acme", Some("must start with a letter"));
        check("-acme", Some("must start with a letter"));
        check("fn", Some("Rust keyword"));
        check("std", Some("cargo reserves it"));
        check(&"a".repeat(65), Some("at most 64"));
    }

    #[test]
    fn the_scaffold_names_the_crate_the_plugin_and_the_sdk() {
        let files = scaffold("acme-lines", Path::new("/opt/my \"sdk\""));
        let file = |name: &str| &files.iter().find(|(p, _)| *p == name).unwrap().1;
        let manifest = file("Cargo.toml");
        assert!(manifest.contains("name = \"acme-lines\""), "{manifest}");
        assert!(
            manifest.contains(r#"trail-plugin-api = { path = "/opt/my \"sdk\"/plugin-api" }"#),
            "{manifest}"
        );
        assert!(
            manifest.contains(r#"trail-plugin-testkit = { path = "/opt/my \"sdk\"/testkit" }"#),
            "{manifest}"
        );
        assert!(manifest.ends_with("[workspace]\n"), "{manifest}");
        assert!(file("src/lib.rs").contains("name: \"acme-lines\","));
        assert!(file("README.md").contains("target/release/libacme_lines.so"));
        for (path, text) in &files {
            for old in [
                "trail-sink-template",
                "trail_sink_template",
                "line-file",
                "../../",
            ] {
                assert!(!text.contains(old), "{path} still says {old:?}");
            }
        }
    }
}
