//! Errors a sink returns to the host.
//!
//! This module owns the error values that cross the boundary, and the host's rule for what a
//! failed delivery of each kind causes ([`ErrorKind::host_action`]): trail's sink worker and
//! the plugin test kit both apply that one function, so what a plugin's tests see is what the
//! daemon does. The rule is plain Rust and never crosses the boundary.

use std::fmt;

use abi_stable::{StableAbi, std_types::RString};

/// What kind of failure a [`SinkError`] reports, and so what the host does next.
///
/// This is an open set: a later minor version of the API may add kinds. It is a `u8` with
/// named constants rather than a Rust `enum` so that a host receiving a value it does not know
/// is not undefined behaviour. **Hosts must treat a kind they do not know as
/// [`RETRYABLE`](Self::RETRYABLE)** ([`is_retryable`](Self::is_retryable) does this).
///
/// What trail does with each kind:
///
/// | kind | from `new` | from `write` | from `flush` / `close` |
/// |---|---|---|---|
/// | [`RETRYABLE`](Self::RETRYABLE) | retries construction with backoff | retries the undelivered part of the batch with backoff, on the same instance | retries with backoff |
/// | [`PERMANENT`](Self::PERMANENT) | the sink is not started; the error is reported | the record at index `delivered` can never be delivered: it is counted and reported as dropped, and delivery continues after it | the instance is dropped and a new one is constructed |
/// | [`CONFIG`](Self::CONFIG) | the configuration is rejected (a reload keeps the old generation) | as `PERMANENT` | as `PERMANENT` |
/// | [`PANIC`](Self::PANIC) | as `RETRYABLE` | the instance is dropped, a new one is constructed with backoff, and the whole batch is retried | the instance is dropped and a new one is constructed |
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, PartialEq, Eq, Hash)]
pub struct ErrorKind(u8);

impl ErrorKind {
    /// A transient failure (network down, disk full, remote overloaded): trying the same thing
    /// again later may succeed.
    pub const RETRYABLE: Self = Self(1);
    /// The failure will not go away by retrying. From `write` it refers to the record at index
    /// [`WriteError::delivered`] of the batch, which the host then gives up on.
    pub const PERMANENT: Self = Self(2);
    /// The configuration handed to the constructor is unusable (missing or invalid field,
    /// unreachable destination that can never work). The message should say which field and
    /// what to do.
    pub const CONFIG: Self = Self(3);
    /// The plugin panicked. Only produced by the wrappers of [`export_sink!`](crate::export_sink):
    /// the panic was caught inside the plugin and the instance must not be used again.
    pub const PANIC: Self = Self(4);

    /// Builds a kind from its wire value, known or not.
    pub const fn from_raw(raw: u8) -> Self {
        Self(raw)
    }

    /// The wire value of this kind.
    pub const fn as_raw(self) -> u8 {
        self.0
    }

    /// Whether this is one of the kinds defined by the version of the API the caller was
    /// compiled against.
    pub const fn is_known(self) -> bool {
        matches!(self.0, 1..=4)
    }

    /// Whether the host should retry: true for [`RETRYABLE`](Self::RETRYABLE) and for every kind
    /// this version does not know.
    pub const fn is_retryable(self) -> bool {
        self.0 == Self::RETRYABLE.0 || !self.is_known()
    }

    /// What a host does with a batch after a delivery call failed with this kind: the rule
    /// trail's sink worker applies to a failed [`write`](crate::Sink::write) (and to a failed
    /// [`flush`](crate::Sink::flush) after it, as if nothing had been delivered), and that
    /// plugin test kits apply so that tests see what the daemon does.
    ///
    /// | kind | action |
    /// |---|---|
    /// | [`RETRYABLE`](Self::RETRYABLE) and every kind this version does not know | [`HostAction::Retry`] |
    /// | [`PERMANENT`](Self::PERMANENT), [`CONFIG`](Self::CONFIG) | [`HostAction::GiveUp`] |
    /// | [`PANIC`](Self::PANIC) | [`HostAction::FreshInstance`] |
    ///
    /// Added in API 1.2. Not part of the ABI: a plugin built against an older version is
    /// treated by the same rule.
    pub const fn host_action(self) -> HostAction {
        match self {
            Self::PERMANENT | Self::CONFIG => HostAction::GiveUp,
            Self::PANIC => HostAction::FreshInstance,
            _ => HostAction::Retry,
        }
    }

    /// The lower-case name of a known kind (`retryable`, `permanent`, `config`, `panic`), or
    /// `None`. [`Display`](fmt::Display) prints `unknown(N)` for the others.
    pub const fn name(self) -> Option<&'static str> {
        match self {
            Self::RETRYABLE => Some("retryable"),
            Self::PERMANENT => Some("permanent"),
            Self::CONFIG => Some("config"),
            Self::PANIC => Some("panic"),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown({})", self.0),
        }
    }
}

impl fmt::Debug for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a host does after a delivery call failed: the answer of [`ErrorKind::host_action`].
///
/// In every case the first [`WriteError::delivered`] records of the batch count as delivered
/// and are not sent again. This type stays on the host's side of the boundary (it is not
/// `repr(C)` and no plugin ever sees it); later versions may add variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HostAction {
    /// Send the undelivered rest of the batch again, after a backoff, to the same instance.
    Retry,
    /// Give up on the record at index `delivered`: it can never be delivered (trail writes it
    /// to the sink's dead-letter file and counts it as failed). Delivery continues after it.
    GiveUp,
    /// The instance panicked and must not be called again: drop it, construct a new one (with
    /// backoff) and send the undelivered rest of the batch to that.
    FreshInstance,
}

/// An error returned by a sink's constructor or one of its methods.
///
/// The plugin allocates it and hands ownership to the host; the host frees it
/// ([`RString`] carries its own deallocator, so this is safe across the boundary).
///
/// The message is for people reading the daemon's log: lower case, no trailing period, and it
/// should say what to do, e.g. `config: "path" is missing: set it to the file to append to`.
#[repr(C)]
#[derive(StableAbi, Clone, PartialEq, Eq)]
pub struct SinkError {
    /// What happened, and so what the host does next.
    pub kind: ErrorKind,
    /// A human-readable description.
    pub message: RString,
}

impl SinkError {
    /// An error of any kind.
    pub fn new(kind: ErrorKind, message: impl Into<RString>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A [`RETRYABLE`](ErrorKind::RETRYABLE) error.
    pub fn retryable(message: impl Into<RString>) -> Self {
        Self::new(ErrorKind::RETRYABLE, message)
    }

    /// A [`PERMANENT`](ErrorKind::PERMANENT) error.
    pub fn permanent(message: impl Into<RString>) -> Self {
        Self::new(ErrorKind::PERMANENT, message)
    }

    /// A [`CONFIG`](ErrorKind::CONFIG) error.
    pub fn config(message: impl Into<RString>) -> Self {
        Self::new(ErrorKind::CONFIG, message)
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl fmt::Debug for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkError")
            .field("kind", &self.kind)
            .field("message", &self.message.as_str())
            .finish()
    }
}

impl std::error::Error for SinkError {}

/// The failure of a [`write`](crate::Sink::write), with how much of the batch got through.
///
/// The first `delivered` records of the batch were delivered (and need not be sent again); the
/// rest were not. `delivered` must not exceed the batch length (a host clamps it and logs a
/// warning if it does). With a [`PERMANENT`](ErrorKind::PERMANENT) or
/// [`CONFIG`](ErrorKind::CONFIG) kind, the record at index `delivered` is the one that failed.
///
/// A panic always reports `delivered: 0`: delivery is at least once, so a sink that cares about
/// duplicates should use [`Record::id`](crate::Record::id) or [`Record::seq`](crate::Record::seq)
/// to recognise them.
#[repr(C)]
#[derive(StableAbi, Clone, PartialEq, Eq)]
pub struct WriteError {
    /// How many records at the start of the batch were delivered.
    pub delivered: u64,
    /// Why the rest was not.
    pub error: SinkError,
}

impl WriteError {
    /// `delivered` records got through, then `error` happened.
    pub fn new(delivered: u64, error: SinkError) -> Self {
        Self { delivered, error }
    }
}

/// Nothing was delivered: lets `?` turn a [`SinkError`] into a [`WriteError`].
impl From<SinkError> for WriteError {
    fn from(error: SinkError) -> Self {
        Self::new(0, error)
    }
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (after {} delivered)", self.error, self.delivered)
    }
}

impl fmt::Debug for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteError")
            .field("delivered", &self.delivered)
            .field("error", &self.error)
            .finish()
    }
}

impl std::error::Error for WriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_kind(
        kind: ErrorKind,
        display: &str,
        known: bool,
        retryable: bool,
        action: HostAction,
    ) {
        assert_eq!(kind.to_string(), display);
        assert_eq!(kind.is_known(), known, "{display}");
        assert_eq!(kind.is_retryable(), retryable, "{display}");
        assert_eq!(kind.host_action(), action, "{display}");
        assert_eq!(ErrorKind::from_raw(kind.as_raw()), kind);
    }

    #[test]
    fn kinds() {
        use HostAction::{FreshInstance, GiveUp, Retry};
        check_kind(ErrorKind::RETRYABLE, "retryable", true, true, Retry);
        check_kind(ErrorKind::PERMANENT, "permanent", true, false, GiveUp);
        check_kind(ErrorKind::CONFIG, "config", true, false, GiveUp);
        check_kind(ErrorKind::PANIC, "panic", true, false, FreshInstance);
        check_kind(ErrorKind::from_raw(0), "unknown(0)", false, true, Retry);
        check_kind(ErrorKind::from_raw(5), "unknown(5)", false, true, Retry);
        check_kind(ErrorKind::from_raw(255), "unknown(255)", false, true, Retry);
    }

    #[test]
    fn messages() {
        let e = SinkError::config("\"path\" is missing: set it to the file to append to");
        assert_eq!(
            e.to_string(),
            "config: \"path\" is missing: set it to the file to append to"
        );
        let w = WriteError::new(3, SinkError::retryable("connection refused"));
        assert_eq!(
            w.to_string(),
            "retryable: connection refused (after 3 delivered)"
        );
        let w: WriteError = SinkError::permanent("too large").into();
        assert_eq!(w.delivered, 0);
        assert_eq!(w.error.kind, ErrorKind::PERMANENT);
    }
}
