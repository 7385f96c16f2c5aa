//! The root module a plugin library exports, and the API version.

use std::fmt;

use abi_stable::{
    StableAbi, declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RResult, RStr},
};

use crate::{Host, SinkBox, SinkError};

/// A version of this API: `major.minor`, the first two numbers of the `trail-plugin-api` crate
/// version. See the crate documentation for what changes which number.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApiVersion {
    /// Incremented for changes that break plugins built against an earlier major version.
    pub major: u16,
    /// Incremented for compatible additions.
    pub minor: u16,
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl fmt::Debug for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The version of the API this code was compiled against.
///
/// In a plugin, the value recorded in its root module ([`SinkPluginRef::api_version`]) is the
/// one of the `trail-plugin-api` it was built with; in the host, this constant is the one the
/// host was built with.
pub const API_VERSION: ApiVersion = ApiVersion {
    major: parse_u16(env!("CARGO_PKG_VERSION_MAJOR")),
    minor: parse_u16(env!("CARGO_PKG_VERSION_MINOR")),
};

const fn parse_u16(digits: &str) -> u16 {
    let bytes = digits.as_bytes();
    let mut value: u16 = 0;
    let mut i = 0;
    while i < bytes.len() {
        assert!(
            bytes[i].is_ascii_digit(),
            "version component is not a number"
        );
        value = value * 10 + (bytes[i] - b'0') as u16;
        i += 1;
    }
    value
}

/// The root module of a sink plugin: what a plugin library exports and the host loads.
///
/// Plugin authors do not build this by hand: [`export_sink!`](crate::export_sink) does. Hosts
/// reach it through [`SinkPluginRef`], which is what loading returns.
///
/// This is an abi_stable *prefix type*: the fields up to and including the one marked
/// `last_prefix_field` ([`new`](Self::new)) are present in every plugin of this major version;
/// fields appended after it in later minor versions are read through accessors returning
/// `Option`, which is `None` for a plugin built against an older version.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = SinkPluginRef)))]
pub struct SinkPlugin {
    /// The name the plugin is known by: what users write in `sinks[].plugin` of trail's
    /// configuration. Lower case, stable across versions of the plugin.
    pub name: RStr<'static>,
    /// The plugin's own version (usually its crate version), for logs and diagnostics.
    pub version: RStr<'static>,
    /// The version of this API the plugin was built against.
    pub api_version: ApiVersion,
    /// Creates a sink instance.
    ///
    /// `config_json` is the sink's `config` section of trail's configuration, as a JSON
    /// document (`{}` when absent); it is borrowed for the duration of the call. `host` is
    /// owned by the instance from then on. An invalid configuration should be reported as an
    /// [`ErrorKind::CONFIG`](crate::ErrorKind::CONFIG) error that says which field is wrong.
    #[sabi(last_prefix_field)]
    // (abi_stable's derive needs function pointer types spelled out, not behind an alias.)
    pub new: extern "C" fn(config_json: RStr<'_>, host: Host) -> RResult<SinkBox, SinkError>,
}

impl RootModule for SinkPluginRef {
    declare_root_module_statics! {SinkPluginRef}

    /// The base name of sink plugin libraries (`libtrail_sink.so`) for abi_stable's
    /// directory-based loaders; trail itself loads plugins by path.
    const BASE_NAME: &'static str = "trail_sink";
    /// The name abi_stable uses for sink plugins in its error messages.
    const NAME: &'static str = "trail_sink";
    /// The `trail-plugin-api` crate version, which abi_stable compares when loading a plugin.
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_version_is_the_crate_version() {
        let crate_version = env!("CARGO_PKG_VERSION");
        assert!(
            crate_version.starts_with(&format!("{API_VERSION}.")),
            "{crate_version} vs {API_VERSION}"
        );
        assert_eq!(
            SinkPluginRef::VERSION_STRINGS.version,
            env!("CARGO_PKG_VERSION")
        );
    }

    #[test]
    fn parses_version_components() {
        assert_eq!(parse_u16("0"), 0);
        assert_eq!(parse_u16("1"), 1);
        assert_eq!(parse_u16("42"), 42);
    }
}
