//! Test sink plugin `incompatible`: what a plugin built against a broken or forked copy of
//! `trail-plugin-api` looks like. It exports a root module with the same abi_stable names
//! (`BASE_NAME`, `NAME`) and version strings as trail's `SinkPluginRef`, and `build.rs` makes
//! its layouts claim the same package and version, but the constructor has another signature
//! (a `bool` where trail passes a `Host`). Loading it must fail with
//! `LibraryError::AbiInstability` rather than call `new` with the wrong arguments.

use abi_stable::{
    StableAbi, declare_root_module_statics, export_root_module,
    library::RootModule,
    prefix_type::PrefixTypeTrait,
    sabi_types::VersionStrings,
    std_types::{RErr, RResult, RStr},
};
use trail_plugin_api::{API_VERSION, ApiVersion, SinkBox, SinkError};

/// Trail's root module as it is, to copy its names and version from.
type Trail = trail_plugin_api::SinkPluginRef;

/// Trail's `SinkPlugin` with a different `new`.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = SinkPluginRef)))]
pub struct SinkPlugin {
    /// As in trail.
    pub name: RStr<'static>,
    /// As in trail.
    pub version: RStr<'static>,
    /// As in trail.
    pub api_version: ApiVersion,
    /// Not as in trail: a `bool` where trail passes a `Host`. (Parameter names are part of
    /// the layout too, so they are kept the same to make the type the only difference.)
    #[sabi(last_prefix_field)]
    pub new: extern "C" fn(config_json: RStr<'_>, host: bool) -> RResult<SinkBox, SinkError>,
}

impl RootModule for SinkPluginRef {
    declare_root_module_statics! {SinkPluginRef}
    const BASE_NAME: &'static str = <Trail as RootModule>::BASE_NAME;
    const NAME: &'static str = <Trail as RootModule>::NAME;
    const VERSION_STRINGS: VersionStrings = <Trail as RootModule>::VERSION_STRINGS;
}

extern "C" fn new(_config_json: RStr<'_>, _host: bool) -> RResult<SinkBox, SinkError> {
    RErr(SinkError::permanent(
        "the incompatible test plugin must never be called",
    ))
}

#[export_root_module]
fn root_module() -> SinkPluginRef {
    SinkPlugin {
        name: RStr::from_str("incompatible"),
        version: RStr::from_str(env!("CARGO_PKG_VERSION")),
        api_version: API_VERSION,
        new,
    }
    .leak_into_prefix()
}
