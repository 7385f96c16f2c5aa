//! The contract between trail, an audit-trail daemon, and its **sink plugins**.
//!
//! A sink receives the audit events trail has stored and delivers them somewhere: a file, a
//! message bus, a database. A sink plugin is a dynamic library (`cdylib`) built against this
//! crate, which trail loads at run time and can replace while running. Because plugin and
//! daemon are compiled separately, possibly with different compilers, everything that crosses
//! between them is an [`abi_stable`] type whose layout is checked when the library is loaded.
//!
//! This crate is small on purpose and changes slowly: it has no async runtime and knows nothing
//! of the daemon's internals.
//!
//! # Writing a plugin
//!
//! Depend on this crate through a `path` dependency on a copy of it: the SDK directory
//! installed with trail (`/usr/share/trail/sdk/plugin-api`), or a checkout's `plugin-api/`. The
//! directory builds on its own, wherever it is; no trail workspace is needed around it. The
//! crate is not on crates.io yet; once it is published, `trail-plugin-api = "1"` will replace
//! the path. `GUIDE.md` beside this crate's `Cargo.toml` (in the SDK,
//! `/usr/share/trail/sdk/plugin-api/GUIDE.md`) walks through writing, testing, installing and
//! hot-swapping a first sink.
//!
//! The quickest start is `trail plugin new NAME`: it writes a crate called `NAME` (its plugin
//! called `NAME` too) from the sink template, with this dependency and the plugin test kit
//! (`trail-plugin-testkit`, `/usr/share/trail/sdk/testkit`, for `cargo test`) pointing at the
//! installed SDK (`--sdk PATH` or `TRAIL_SDK` names another). `trail plugin check FILE` loads a
//! built library the way the daemon would and says whether it would load.
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "trail-sink-example"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! trail-plugin-api = { path = "/usr/share/trail/sdk/plugin-api" }
//! ```
//!
//! Keep the default `panic = "unwind"` in your profiles: it is what lets a panic become an
//! error instead of ending the daemon ([`export_sink!`] refuses to compile with
//! `panic = "abort"`).
//!
//! `src/lib.rs`: implement [`Sink`] and export it with [`export_sink!`]:
//!
//! ```
//! use std::io::Write;
//!
//! use trail_plugin_api::{Host, Record, Sink, SinkError, WriteError};
//!
//! /// Writes each event's stored JSON line to standard error.
//! struct Stderr {
//!     host: Host,
//! }
//!
//! impl Stderr {
//!     fn new(config_json: &str, host: Host) -> Result<Self, SinkError> {
//!         if config_json.trim() != "{}" {
//!             return Err(SinkError::config("this sink takes no configuration: remove `config`"));
//!         }
//!         host.info("ready");
//!         Ok(Self { host })
//!     }
//! }
//!
//! impl Sink for Stderr {
//!     fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
//!         let mut out = std::io::stderr().lock();
//!         for (delivered, record) in batch.iter().enumerate() {
//!             if let Err(e) = writeln!(out, "{}", record.line) {
//!                 let error = SinkError::retryable(format!("writing to stderr: {e}"));
//!                 return Err(WriteError::new(delivered as u64, error));
//!             }
//!         }
//!         Ok(())
//!     }
//!
//!     fn flush(&mut self) -> Result<(), SinkError> {
//!         std::io::stderr()
//!             .flush()
//!             .map_err(|e| SinkError::retryable(format!("flushing stderr: {e}")))
//!     }
//! }
//!
//! trail_plugin_api::export_sink!(
//!     name: "stderr",
//!     version: env!("CARGO_PKG_VERSION"),
//!     new: Stderr::new,
//! );
//! # fn main() {}
//! ```
//!
//! Build it with `cargo build --release`. The library is
//! `target/release/lib<crate name with - replaced by _>.so`, here
//! `target/release/libtrail_sink_example.so` (a `cdylib` is required: without
//! `crate-type = ["cdylib"]` cargo builds no `.so`). Install it into the daemon's `plugins_dir`
//! by copying it to a temporary name in that directory and renaming it into place (`mv`): never
//! `cp` over a library the daemon has loaded, which can crash it. The file name does not matter
//! to trail; the configuration refers to the plugin by the `name` given to [`export_sink!`].
//!
//! A complete plugin to start from is the sink template: `/usr/share/trail/sdk/sink-template`
//! in the SDK, `examples/sink-template` in a checkout.
//!
//! # The contract
//!
//! **Ownership.** The configuration string and the records of a batch are borrowed from the
//! host for the duration of one call; copy what you keep. The [`Host`] handle given to the
//! constructor belongs to the sink. Errors and sink instances returned to the host belong to
//! the host, which frees them through abi_stable's vtables (so allocators never mix).
//!
//! **Threading.** Each sink instance is driven by exactly one dedicated OS thread of the host,
//! never concurrently and never on an async runtime: calls may block. Different instances (of
//! different sinks, or the old and new instance during a reload) run on different threads at
//! the same time. See [`Sink`].
//!
//! **Errors.** Every failure is a [`SinkError`] whose [`ErrorKind`] tells the host what to do
//! next (retry, give up on a record, reject the configuration). A failed
//! [`write`](Sink::write) also says how many records at the start of the batch were delivered
//! ([`WriteError`]). Delivery is at least once: a sink may see a record again after an error,
//! and [`Record::id`] / [`Record::seq`] let it recognise duplicates.
//!
//! **Panics.** A panic that unwinds across the boundary aborts the daemon. [`export_sink!`]
//! catches panics in every call and reports them as [`ErrorKind::PANIC`]; the host then drops
//! the instance and constructs a new one.
//!
//! **Logging.** A plugin's own `tracing` or `log` output goes nowhere. Use [`Host::log`]: the
//! line lands in the daemon's log, tagged with the sink's name.
//!
//! **Reloading.** Each new build of a plugin is loaded from a fresh copy of the file and gets
//! fresh `static`s; the previous build stays mapped (libraries are never unloaded), so do not
//! rely on `static` destructors, and release files, sockets and locks in
//! [`close`](Sink::close) or `Drop`.
//!
//! # Loading a plugin (for hosts)
//!
//! 0. Pick the library without running it: a library built with [`export_sink!`] (API 1.1 and
//!    later) exports a data symbol named [`NAME_SYMBOL`] in its ELF dynamic symbol table, an
//!    array of exactly the plugin name's UTF-8 bytes (no terminating NUL; the length is the
//!    symbol's size). Read it from the file; dynamic loading runs a library's constructors, so
//!    load only the libraries whose plugin the configuration uses. (trail knows a library
//!    without the symbol, built against 1.0, by its file name: `lib<name>.so` or `<name>.so`.)
//! 1. Copy the library to a path never used before (the dynamic loader caches libraries by path
//!    and inode, so reloading from the same path would return the old code).
//! 2. `abi_stable::library::lib_header_from_path(&copy)?.init_root_module::<SinkPluginRef>()`.
//!    This checks the version ([`LibraryError::IncompatibleVersionNumber`]) and the layout of
//!    every type reachable from [`SinkPlugin`] ([`LibraryError::AbiInstability`], whose message
//!    shows both layouts). Do not use `RootModule::load_from_file`: it caches the first module
//!    loaded for the type, so a reload would silently keep the old code.
//! 3. Read [`name`](SinkPluginRef::name), [`version`](SinkPluginRef::version) and
//!    [`api_version`](SinkPluginRef::api_version); check that the name is the one the library
//!    was picked by.
//! 4. On the sink's dedicated thread, call [`new`](SinkPluginRef::new) with the sink's
//!    `config` as JSON and a [`Host`] built from the host's [`HostCallbacks`], then drive the
//!    returned [`SinkBox`]: `write` with an [`RSlice`](abi_stable::std_types::RSlice) of
//!    borrowed [`Record`]s, `flush`, and finally `close` and drop.
//!
//! [`LibraryError::IncompatibleVersionNumber`]: abi_stable::library::LibraryError::IncompatibleVersionNumber
//! [`LibraryError::AbiInstability`]: abi_stable::library::LibraryError::AbiInstability
//!
//! # Versioning
//!
//! The ABI version is the version of this crate, `major.minor.patch`, also available as
//! [`API_VERSION`]. abi_stable refuses to load a plugin built against a different major
//! version, and checks the layout of every shared type at load time.
//!
//! **Breaking changes** (new major version; every plugin must be rebuilt):
//! - changing, reordering or removing anything up to and including the field or method marked
//!   `#[sabi(last_prefix_field)]` of a prefix type: the root module [`SinkPlugin`], the sink
//!   object [`SinkObject`] and the host's [`HostCallbacks`];
//! - changing any field of a `repr(C)` type ([`Record`], [`SinkError`], [`WriteError`],
//!   [`ApiVersion`], [`Host`]), including adding one;
//! - renaming a type, a field, or a parameter of a function pointer or trait method: abi_stable
//!   compares names as part of the layout;
//! - changing the meaning of an existing [`ErrorKind`] or [`LogLevel`] value, or the
//!   semantics of an existing call.
//!
//! **Compatible changes** (new minor version):
//! - appending fields to [`SinkPlugin`] after the last field: a host reads them through
//!   accessors returning `Option`, which are `None` for plugins built against an older minor;
//! - appending methods to [`SinkObject`] or [`HostCallbacks`], each with a default body that
//!   runs when the other side was built against an older minor. **Caution:** with abi_stable
//!   0.11.3 this was tried and is *not* compatible for [`SinkObject`]: a plugin built against
//!   1.0 is then refused by the newer host ("too many fields" in its vtable), because
//!   abi_stable lets the library side of a prefix type have more fields than the loader, not
//!   fewer. Until a way is shown to pass trail's compatibility test, adding a method there
//!   needs a new major version;
//! - adding [`ErrorKind`] or [`LogLevel`] values (older hosts treat an unknown kind as
//!   retryable and an unknown level as info);
//! - adding new types, functions and helpers, and new symbols exported by [`export_sink!`]
//!   (1.1 added [`NAME_SYMBOL`]; 1.2 added [`ErrorKind::host_action`] and [`HostAction`], the
//!   host's rule for each error kind, which never crosses the boundary).
//!
//! Plugins built against an older minor keep loading in newer hosts, and the other way round.
//! Patch versions change documentation and helpers only. trail's test suite holds it to this:
//! it keeps a frozen copy of every released version (`tests/compat/` in trail's repository),
//! builds a plugin against each and loads it in the current daemon. A change counts as
//! compatible only once that test passes with it.
//!
//! A plugin built against another major version is refused when it is loaded, with one line
//! naming both versions, e.g. `plugin /usr/lib/trail/plugins/libx.so: built for
//! trail-plugin-api 2.0.0; this daemon speaks 1.x (1.2.0): rebuild it against trail-plugin-api
//! 1.x`.
#![deny(missing_docs)]

mod error;
mod export;
mod host;
mod plugin;
mod record;
mod sink;

/// The ABI-stability library this API is built on, for hosts and for [`export_sink!`].
pub use abi_stable;

pub use error::{ErrorKind, HostAction, SinkError, WriteError};
#[doc(hidden)]
pub use export::__private;
pub use host::{Host, HostCallbacks, HostCallbacks_TO, HostCallbacksBox, LogLevel};
pub use plugin::{API_VERSION, ApiVersion, SinkPlugin, SinkPluginRef};

/// The dynamic symbol through which a library built with [`export_sink!`] declares its plugin
/// name without running any code: a read-only array of exactly the name's UTF-8 bytes, not
/// NUL-terminated, whose size is the name's length. Added in API 1.1; see "Loading a plugin".
pub const NAME_SYMBOL: &str = __name_symbol!();
pub use record::Record;
pub use sink::{Sink, SinkBox, SinkObject, SinkObject_TO};
