//! [`export_sink!`](crate::export_sink) and the code it relies on inside the plugin.
//!
//! Everything here is compiled into each plugin library (with the plugin's own copy of `std`),
//! never called by the host directly. It owns the rule that no panic leaves a plugin.

/// Turns a [`Sink`](crate::Sink) implementation into a loadable trail plugin.
///
/// ```
/// # use trail_plugin_api::{Host, Record, Sink, SinkError, WriteError};
/// # struct MySink;
/// # impl MySink {
/// #     fn new(_config_json: &str, _host: Host) -> Result<Self, SinkError> { Ok(Self) }
/// # }
/// # impl Sink for MySink {
/// #     fn write(&mut self, _: &[Record<'_>]) -> Result<(), WriteError> { Ok(()) }
/// # }
/// trail_plugin_api::export_sink!(
///     name: "recorder",                   // what users write in `sinks[].plugin`
///     version: env!("CARGO_PKG_VERSION"), // the plugin's own version, for logs
///     new: MySink::new,                   // fn(&str, Host) -> Result<MySink, SinkError>
/// );
/// # fn main() {}
/// ```
///
/// `new` is any function or closure taking the sink's configuration as a JSON document (`&str`,
/// `{}` when the user gave none) and the [`Host`](crate::Host) handle, and returning the sink or
/// a [`SinkError`](crate::SinkError) (use [`SinkError::config`](crate::SinkError::config) for
/// a bad configuration).
///
/// Use it once, at the root of a crate built with `crate-type = ["cdylib"]`. It generates the
/// library's root module (the `static` abi_stable looks up when the library is loaded), so the
/// plugin needs no direct dependency on `abi_stable`.
///
/// Every call the host makes into the plugin (the constructor, `write`, `flush`, `close` and
/// the destructor) runs inside [`std::panic::catch_unwind`]: a panic comes back to the host as
/// an error of kind [`ErrorKind::PANIC`](crate::ErrorKind::PANIC) whose message has the panic
/// message and location, instead of aborting the daemon. The panicked instance then refuses
/// every further call. To record the location, the plugin's (own) panic hook is wrapped: panics
/// inside those calls are not printed to stderr, others go to the previous hook.
///
/// It also exports the plugin's name as the data symbol [`NAME_SYMBOL`](crate::NAME_SYMBOL), so
/// that a host can tell which plugin a library holds without loading it.
///
/// The plugin must be compiled with `panic = "unwind"` (Rust's default); with `panic = "abort"`
/// this macro fails to compile, since a panic would end the whole daemon.
#[macro_export]
macro_rules! export_sink {
    (name: $name:expr, version: $version:expr, new: $new:expr $(,)?) => {
        const _: () = {
            struct TrailSinkExport;

            impl $crate::__private::Export for TrailSinkExport {
                const NAME: &'static str = $name;
                const VERSION: &'static str = $version;

                fn create(
                    config_json: &str,
                    host: $crate::Host,
                ) -> ::core::result::Result<$crate::SinkBox, $crate::SinkError> {
                    $crate::__private::create(config_json, host, $new)
                }
            }

            #[unsafe(export_name = $crate::__root_module_loader_symbol!())]
            pub static TRAIL_SINK_LIB_HEADER: $crate::__private::LibHeader =
                $crate::__private::lib_header::<TrailSinkExport>();

            const TRAIL_SINK_NAME_LEN: usize =
                <TrailSinkExport as $crate::__private::Export>::NAME.len();

            /// The plugin's name as plain bytes, for hosts that pick a library without running it.
            #[unsafe(export_name = $crate::__name_symbol!())]
            pub static TRAIL_SINK_PLUGIN_NAME: [u8; TRAIL_SINK_NAME_LEN] =
                $crate::__private::name_bytes::<TRAIL_SINK_NAME_LEN>(
                    <TrailSinkExport as $crate::__private::Export>::NAME,
                );
        };

        #[cfg(panic = "abort")]
        ::core::compile_error!(
            "trail sink plugins must be built with panic = \"unwind\": \
             remove `panic = \"abort\"` from the profile"
        );
    };
}

/// The name of the symbol abi_stable's loader looks up (a literal, as `export_name` needs one).
/// A test compares it with `abi_stable::library::ROOT_MODULE_LOADER_NAME`; it is stable within
/// abi_stable 0.11, since libraries built with any 0.11 must load in hosts built with any other.
#[doc(hidden)]
#[macro_export]
macro_rules! __root_module_loader_symbol {
    () => {
        "_1as_0lib_1header_0root_bmodule_bloader"
    };
}

/// The name of the data symbol holding the plugin's name (a literal, as `export_name` needs one);
/// [`NAME_SYMBOL`](crate::NAME_SYMBOL) is the same string for hosts.
#[doc(hidden)]
#[macro_export]
macro_rules! __name_symbol {
    () => {
        "trail_sink_plugin_name"
    };
}

/// Support for [`export_sink!`](crate::export_sink). Not part of the public API: it may change
/// in any release.
#[doc(hidden)]
pub mod __private {
    use std::{
        any::Any,
        cell::{Cell, RefCell},
        panic::{self, AssertUnwindSafe},
        sync::Once,
    };

    pub use abi_stable::library::LibHeader;
    use abi_stable::{
        library::{__call_root_module_loader, CheckTypeLayout, RootModuleResult},
        prefix_type::PrefixTypeTrait,
        sabi_trait::TD_Opaque,
        std_types::{RErr, ROk, RResult, RSlice, RStr},
    };

    use crate::{
        API_VERSION, ErrorKind, Host, Record, Sink, SinkBox, SinkError, SinkObject, SinkObject_TO,
        SinkPlugin, SinkPluginRef, WriteError,
    };

    /// What `export_sink!` knows about the plugin.
    pub trait Export: 'static {
        /// `SinkPlugin::name`.
        const NAME: &'static str;
        /// `SinkPlugin::version`.
        const VERSION: &'static str;
        /// Calls the author's constructor and boxes the sink.
        fn create(config_json: &str, host: Host) -> Result<SinkBox, SinkError>;
    }

    /// Calls an author's constructor and boxes the sink behind the panic-catching adapter.
    pub fn create<S, F>(config_json: &str, host: Host, new: F) -> Result<SinkBox, SinkError>
    where
        S: Sink,
        F: FnOnce(&str, Host) -> Result<S, SinkError>,
    {
        let sink = new(config_json, host.clone())?;
        Ok(SinkObject_TO::from_value(
            Guarded {
                sink: Some(sink),
                poisoned: None,
                host,
            },
            TD_Opaque,
        ))
    }

    /// `name` as an array of exactly its bytes (`N` is its length), for the name symbol.
    pub const fn name_bytes<const N: usize>(name: &str) -> [u8; N] {
        let bytes = name.as_bytes();
        assert!(bytes.len() == N, "N is the name's length");
        let mut out = [0u8; N];
        let mut i = 0;
        while i < N {
            out[i] = bytes[i];
            i += 1;
        }
        out
    }

    /// The library header `export_sink!` exports, for the plugin described by `E`.
    pub const fn lib_header<E: Export>() -> LibHeader {
        // SAFETY: `load::<E>` returns the root module built by `root_module::<E>`, whose type is
        // `SinkPluginRef`, the type given here.
        unsafe { LibHeader::from_constructor::<SinkPluginRef>(load::<E>, CheckTypeLayout::Yes) }
    }

    extern "C" fn load<E: Export>() -> RootModuleResult {
        // Catches panics, caches the module in this library's statics, erases its type.
        __call_root_module_loader(root_module::<E>)
    }

    pub(crate) fn root_module<E: Export>() -> SinkPluginRef {
        SinkPlugin {
            name: RStr::from_str(E::NAME),
            version: RStr::from_str(E::VERSION),
            api_version: API_VERSION,
            new: new_sink::<E>,
        }
        .leak_into_prefix()
    }

    extern "C" fn new_sink<E: Export>(
        config_json: RStr<'_>,
        host: Host,
    ) -> RResult<SinkBox, SinkError> {
        match guarded(|| E::create(config_json.as_str(), host)) {
            Ok(Ok(sink)) => ROk(sink),
            Ok(Err(error)) | Err(error) => RErr(error),
        }
    }

    /// An author's sink as a [`SinkObject`]: every call is guarded, and a sink that panicked is
    /// never called again.
    struct Guarded<S: Sink> {
        /// Always `Some` until the destructor takes it out to drop it under a guard.
        sink: Option<S>,
        /// The message of the panic that broke the instance.
        poisoned: Option<String>,
        /// Where to report a panic in the destructor, which has no caller to return it to.
        host: Host,
    }

    impl<S: Sink> Guarded<S> {
        fn call<T, E: From<SinkError>>(
            &mut self,
            f: impl FnOnce(&mut S) -> Result<T, E>,
        ) -> RResult<T, E> {
            let sink = match (&self.poisoned, &mut self.sink) {
                (None, Some(sink)) => sink,
                (Some(message), _) => {
                    return RErr(E::from(SinkError::new(
                        ErrorKind::PANIC,
                        format!("sink instance is unusable since it panicked: {message}"),
                    )));
                }
                (None, None) => unreachable!("the sink is only taken out by the destructor"),
            };
            match guarded(|| f(sink)) {
                Ok(result) => result.into(),
                Err(panic) => {
                    self.poisoned = Some(panic.message.to_string());
                    RErr(E::from(panic))
                }
            }
        }
    }

    impl<S: Sink> SinkObject for Guarded<S> {
        fn write(&mut self, batch: RSlice<'_, Record<'_>>) -> RResult<(), WriteError> {
            self.call(|sink| sink.write(batch.as_slice()))
        }

        fn flush(&mut self) -> RResult<(), SinkError> {
            self.call(|sink| sink.flush())
        }

        fn close(&mut self) -> RResult<(), SinkError> {
            self.call(|sink| sink.close())
        }
    }

    impl<S: Sink> Drop for Guarded<S> {
        fn drop(&mut self) {
            if let Some(sink) = self.sink.take() {
                if let Err(panic) = guarded(move || drop(sink)) {
                    self.host
                        .error(&format!("while dropping the sink: {}", panic.message));
                }
            }
        }
    }

    thread_local! {
        /// How many guarded calls are running on this thread.
        static GUARD_DEPTH: Cell<u32> = const { Cell::new(0) };
        /// Where the last panic inside a guarded call happened.
        static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    static INSTALL_HOOK: Once = Once::new();

    /// Wraps the panic hook of this library's `std` once, so that panics inside guarded calls
    /// record their location instead of printing to stderr.
    fn install_hook() {
        INSTALL_HOOK.call_once(|| {
            let previous = panic::take_hook();
            panic::set_hook(Box::new(move |info| {
                let inside = GUARD_DEPTH.try_with(Cell::get).unwrap_or(0) > 0;
                if inside {
                    let location = info
                        .location()
                        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
                    let _ = PANIC_LOCATION.try_with(|slot| *slot.borrow_mut() = location);
                } else {
                    previous(info);
                }
            }));
        });
    }

    /// Runs `f`, turning a panic into a [`ErrorKind::PANIC`] error.
    pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, SinkError> {
        install_hook();
        GUARD_DEPTH.with(|depth| depth.set(depth.get() + 1));
        let result = panic::catch_unwind(AssertUnwindSafe(f));
        GUARD_DEPTH.with(|depth| depth.set(depth.get() - 1));
        result.map_err(|payload| {
            let location = PANIC_LOCATION.with(|slot| slot.borrow_mut().take());
            let message = panic_message(&*payload);
            // Dropping the payload runs code chosen by whoever panicked, which may panic too.
            let _ = panic::catch_unwind(AssertUnwindSafe(move || drop(payload)));
            SinkError::new(
                ErrorKind::PANIC,
                match location {
                    Some(location) => format!("sink panicked at {location}: {message}"),
                    None => format!("sink panicked: {message}"),
                },
            )
        })
    }

    fn panic_message(payload: &(dyn Any + Send)) -> String {
        if let Some(message) = payload.downcast_ref::<&str>() {
            (*message).to_owned()
        } else if let Some(message) = payload.downcast_ref::<String>() {
            message.clone()
        } else {
            "(the panic payload is not a string)".to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use abi_stable::std_types::{RResult, RSlice, RStr};

    use super::__private::{self, Export};
    use crate::{
        API_VERSION, ErrorKind, Host, HostCallbacks, LogLevel, Record, Sink, SinkBox, SinkError,
        WriteError,
    };

    #[test]
    fn loader_symbol_is_the_one_abi_stable_looks_up() {
        assert_eq!(
            crate::__root_module_loader_symbol!(),
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }

    /// A sink whose behaviour is chosen by its configuration string.
    struct Scripted {
        config: String,
        written: Arc<Mutex<Vec<u64>>>,
    }

    impl Sink for Scripted {
        fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
            for (i, record) in batch.iter().enumerate() {
                if record.line.contains("panic") {
                    panic!("bad record {}", record.seq);
                }
                if record.line.contains("poison") {
                    return Err(WriteError::new(
                        i as u64,
                        SinkError::permanent(format!("cannot store record {}", record.seq)),
                    ));
                }
                self.written.lock().unwrap().push(record.seq);
            }
            Ok(())
        }

        fn flush(&mut self) -> Result<(), SinkError> {
            if self.config == "flush-panics" {
                std::panic::panic_any(42_u32);
            }
            Ok(())
        }
    }

    impl Drop for Scripted {
        fn drop(&mut self) {
            if self.config == "drop-panics" {
                panic!("dropped");
            }
        }
    }

    static WRITTEN: Mutex<Option<Arc<Mutex<Vec<u64>>>>> = Mutex::new(None);

    struct ScriptedExport;

    impl Export for ScriptedExport {
        const NAME: &'static str = "scripted";
        const VERSION: &'static str = "0.0.1";

        fn create(config_json: &str, host: Host) -> Result<SinkBox, SinkError> {
            __private::create(config_json, host, |config: &str, _host| match config {
                "new-panics" => panic!("cannot start"),
                "bad" => Err(SinkError::config("\"path\" is missing")),
                _ => Ok(Scripted {
                    config: config.to_owned(),
                    written: WRITTEN.lock().unwrap().get_or_insert_default().clone(),
                }),
            })
        }
    }

    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<(LogLevel, String)>>>);

    impl HostCallbacks for Logs {
        fn log(&self, level: LogLevel, message: RStr<'_>) {
            self.0.lock().unwrap().push((level, message.into()));
        }
        fn sink_name(&self) -> RStr<'_> {
            RStr::from_str("test")
        }
    }

    fn new_sink(config: &str) -> (Result<SinkBox, SinkError>, Logs) {
        let logs = Logs::default();
        let plugin = __private::root_module::<ScriptedExport>();
        let sink = plugin.new()(RStr::from_str(config), Host::new(logs.clone()));
        (sink.into_result(), logs)
    }

    fn write(sink: &mut SinkBox, records: &[Record<'_>]) -> RResult<(), WriteError> {
        sink.write(RSlice::from_slice(records))
    }

    fn expect_panic<T>(result: Result<T, SinkError>, expected: &str) {
        let Err(error) = result else {
            panic!("expected an error")
        };
        assert_eq!(error.kind, ErrorKind::PANIC, "{error}");
        assert!(
            error.message.contains(expected),
            "{:?} does not contain {expected:?}",
            error.message
        );
    }

    #[test]
    fn root_module_describes_the_plugin() {
        let plugin = __private::root_module::<ScriptedExport>();
        assert_eq!(plugin.name().as_str(), "scripted");
        assert_eq!(plugin.version().as_str(), "0.0.1");
        assert_eq!(plugin.api_version(), API_VERSION);
    }

    #[test]
    fn constructor_errors_and_panics_come_back_as_errors() {
        let (result, _) = new_sink("bad");
        let error = result.err().unwrap();
        assert_eq!(error.kind, ErrorKind::CONFIG);
        assert_eq!(error.message.as_str(), "\"path\" is missing");

        let (result, _) = new_sink("new-panics");
        // The location is recorded by the hook, and points into this file.
        expect_panic(result, "sink panicked at plugin-api/src/export.rs:");
        let (result, _) = new_sink("new-panics");
        expect_panic(result, ": cannot start");
    }

    #[test]
    fn writes_report_partial_success_and_panics_poison_the_instance() {
        let (sink, _) = new_sink("{}");
        let mut sink = sink.unwrap();
        let id = "0190a4f3-8d2c-7b1e-9c4d-5e6f7a8b9c0d";
        let ok = [Record::new(1, id, "t", "{}"), Record::new(2, id, "t", "{}")];
        assert!(write(&mut sink, &ok).is_ok());

        let partial = [
            Record::new(3, id, "t", "{}"),
            Record::new(4, id, "t", "poison"),
            Record::new(5, id, "t", "{}"),
        ];
        let error = write(&mut sink, &partial).unwrap_err();
        assert_eq!(error.delivered, 1);
        assert_eq!(error.error.kind, ErrorKind::PERMANENT);

        let error = write(&mut sink, &[Record::new(6, id, "t", "panic")]).unwrap_err();
        assert_eq!(error.delivered, 0);
        expect_panic::<()>(Err(error.error), "bad record 6");
        // Once panicked, the instance is never called again.
        let error = write(&mut sink, &ok).unwrap_err();
        expect_panic::<()>(
            Err(error.error),
            "unusable since it panicked: sink panicked at",
        );
        expect_panic(sink.close().into_result(), "unusable");
    }

    #[test]
    fn flush_panic_with_any_payload_is_caught() {
        let (sink, _) = new_sink("flush-panics");
        let mut sink = sink.unwrap();
        expect_panic(sink.flush().into_result(), "not a string");
    }

    #[test]
    fn a_panicking_destructor_is_logged_not_fatal() {
        let (sink, logs) = new_sink("drop-panics");
        let mut sink = sink.unwrap();
        assert!(sink.close().is_ok());
        drop(sink);
        let logs = logs.0.lock().unwrap();
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(logs[0].0, LogLevel::ERROR);
        assert!(
            logs[0]
                .1
                .starts_with("while dropping the sink: sink panicked at")
        );
        assert!(logs[0].1.ends_with(": dropped"));
    }
}
