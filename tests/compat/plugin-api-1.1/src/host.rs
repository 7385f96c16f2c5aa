//! What the host offers a plugin: a logger that lands in the daemon's log.
//!
//! This module owns the [`Host`] handle and the [`HostCallbacks`] trait the daemon implements.
//! It must not grow into a back door to daemon internals: anything added here is a promise to
//! every plugin ever built.

// `#[sabi_trait]` of abi_stable 0.11.3 puts trait impls inside a `const` block, which this
// newer lint flags; the impls are sound.
#![allow(non_local_definitions)]

use std::fmt;

use abi_stable::{
    StableAbi, sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RArc, RBox, RStr},
};

/// The severity of a log line sent through [`Host::log`].
///
/// An open set like [`ErrorKind`](crate::ErrorKind): hosts print levels they do not know as
/// [`INFO`](Self::INFO).
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, PartialEq, Eq, Hash)]
pub struct LogLevel(u8);

impl LogLevel {
    /// Something failed and needs attention.
    pub const ERROR: Self = Self(1);
    /// Something unexpected happened that the sink worked around.
    pub const WARN: Self = Self(2);
    /// A notable event in the life of the sink (connected, file reopened).
    pub const INFO: Self = Self(3);
    /// Details useful when diagnosing the sink.
    pub const DEBUG: Self = Self(4);
    /// Very verbose details.
    pub const TRACE: Self = Self(5);

    /// Builds a level from its wire value, known or not.
    pub const fn from_raw(raw: u8) -> Self {
        Self(raw)
    }

    /// The wire value of this level.
    pub const fn as_raw(self) -> u8 {
        self.0
    }

    /// This level if it is known to this version of the API, [`INFO`](Self::INFO) otherwise.
    pub const fn or_info(self) -> Self {
        if matches!(self.0, 1..=5) {
            self
        } else {
            Self::INFO
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.or_info() {
            Self::ERROR => "error",
            Self::WARN => "warn",
            Self::DEBUG => "debug",
            Self::TRACE => "trace",
            _ => "info",
        })
    }
}

impl fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The services a host provides to a plugin. **Implemented by the host**, not by plugins.
///
/// Plugins use these through [`Host`]. A host implements this trait for its own type (which
/// knows, for example, the sink's name) and wraps it with [`Host::new`].
///
/// Implementations are called from any plugin thread, concurrently, and must not panic: a
/// panic here would unwind into the plugin and abort the process. They should not block for
/// long either, since the plugin may be calling from its write path.
///
/// New methods may be appended after the last one in a minor version, with a default body so
/// that hosts built against the older version keep working.
#[sabi_trait]
pub trait HostCallbacks: Send + Sync {
    /// Writes `message` to the host's log at `level`, tagged with the sink's name.
    fn log(&self, level: LogLevel, message: RStr<'_>);

    /// The name of the sink instance, as configured by the user (`sinks[].name`).
    #[sabi(last_prefix_field)]
    fn sink_name(&self) -> RStr<'_>;
}

/// The FFI-safe boxed form of a [`HostCallbacks`] implementation.
pub type HostCallbacksBox = HostCallbacks_TO<'static, RBox<()>>;

/// A handle to the host, handed to a sink's constructor.
///
/// Keep it for as long as the sink lives; clone it freely (it is reference-counted, `Send` and
/// `Sync`, so a sink may hand copies to its own threads). It stays valid after the host has
/// dropped the sink, so a background thread that outlives the sink for a moment is safe.
///
/// A plugin's own `tracing` or `log` output goes nowhere: the plugin is a separate library
/// with its own copy of those crates' global state, which the daemon never sees. Use
/// [`Host::log`] instead.
#[repr(C)]
#[derive(StableAbi, Clone)]
pub struct Host {
    callbacks: RArc<HostCallbacksBox>,
}

impl Host {
    /// Wraps the host's implementation of [`HostCallbacks`] (for hosts and tests).
    pub fn new<C>(callbacks: C) -> Self
    where
        C: HostCallbacks + 'static,
    {
        Self {
            callbacks: RArc::new(HostCallbacks_TO::from_value(callbacks, TD_Opaque)),
        }
    }

    /// Writes `message` to the daemon's log at `level`, tagged with the sink's name.
    pub fn log(&self, level: LogLevel, message: &str) {
        self.callbacks.log(level, RStr::from_str(message));
    }

    /// [`log`](Self::log) at [`LogLevel::ERROR`].
    pub fn error(&self, message: &str) {
        self.log(LogLevel::ERROR, message);
    }

    /// [`log`](Self::log) at [`LogLevel::WARN`].
    pub fn warn(&self, message: &str) {
        self.log(LogLevel::WARN, message);
    }

    /// [`log`](Self::log) at [`LogLevel::INFO`].
    pub fn info(&self, message: &str) {
        self.log(LogLevel::INFO, message);
    }

    /// [`log`](Self::log) at [`LogLevel::DEBUG`].
    pub fn debug(&self, message: &str) {
        self.log(LogLevel::DEBUG, message);
    }

    /// The name of this sink instance, as configured by the user (`sinks[].name`).
    pub fn sink_name(&self) -> &str {
        self.callbacks.sink_name().as_str()
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("sink_name", &self.sink_name())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Default)]
    struct Captured {
        lines: Mutex<Vec<(LogLevel, String)>>,
    }

    struct TestHost(Arc<Captured>);

    impl HostCallbacks for TestHost {
        fn log(&self, level: LogLevel, message: RStr<'_>) {
            self.0.lines.lock().unwrap().push((level, message.into()));
        }
        fn sink_name(&self) -> RStr<'_> {
            RStr::from_str("audit-file")
        }
    }

    #[test]
    fn host_forwards_to_callbacks_from_any_clone_and_thread() {
        let captured = Arc::new(Captured::default());
        let host = Host::new(TestHost(captured.clone()));
        assert_eq!(host.sink_name(), "audit-file");
        host.info("opened");
        let clone = host.clone();
        std::thread::spawn(move || clone.warn("slow disk"))
            .join()
            .unwrap();
        drop(host);
        host_is_send_sync_clone::<Host>();
        assert_eq!(
            *captured.lines.lock().unwrap(),
            [
                (LogLevel::INFO, "opened".to_string()),
                (LogLevel::WARN, "slow disk".to_string())
            ]
        );
    }

    fn host_is_send_sync_clone<T: Send + Sync + Clone>() {}

    #[test]
    fn levels() {
        let check = |level: LogLevel, display: &str| assert_eq!(level.to_string(), display);
        check(LogLevel::ERROR, "error");
        check(LogLevel::WARN, "warn");
        check(LogLevel::INFO, "info");
        check(LogLevel::DEBUG, "debug");
        check(LogLevel::TRACE, "trace");
        check(LogLevel::from_raw(0), "info");
        check(LogLevel::from_raw(9), "info");
        assert_eq!(LogLevel::from_raw(9).or_info(), LogLevel::INFO);
    }
}
