//! Makes this crate's abi_stable type layouts claim to come from `trail-plugin-api` at its
//! current version (abi_stable records `CARGO_PKG_NAME` and `CARGO_PKG_VERSION` in every
//! layout), so that loading compares the root module field by field instead of stopping at
//! "different package". See src/lib.rs.

use std::fs;

fn main() {
    let manifest = "../../../plugin-api/Cargo.toml";
    println!("cargo::rerun-if-changed={manifest}");
    let text = fs::read_to_string(manifest).expect("reading plugin-api/Cargo.toml");
    let version = text
        .lines()
        .find_map(|line| line.strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("plugin-api/Cargo.toml has a `version = \"…\"` line");
    println!("cargo::rustc-env=CARGO_PKG_NAME=trail-plugin-api");
    println!("cargo::rustc-env=CARGO_PKG_VERSION={version}");
}
