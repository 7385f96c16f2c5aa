//! The sink itself: the [`Sink`] trait plugin authors implement, and the FFI-safe object
//! ([`SinkObject`], [`SinkBox`]) that actually crosses the boundary.

// `#[sabi_trait]` of abi_stable 0.11.3 puts trait impls inside a `const` block, which this
// newer lint flags; the impls are sound.
#![allow(non_local_definitions)]

use abi_stable::{
    sabi_trait,
    std_types::{RBox, RResult, RSlice},
};

use crate::{Record, SinkError, WriteError};

/// A sink, as a plugin author writes it. Turned into a plugin by
/// [`export_sink!`](crate::export_sink).
///
/// # Lifecycle and threading
///
/// The host constructs an instance with the constructor given to `export_sink!`, then calls
/// [`write`](Self::write) with batches of records, [`flush`](Self::flush) whenever it needs
/// everything written so far to be durable (before it acknowledges progress, and before
/// shutting down or replacing the instance), and finally [`close`](Self::close) once, after
/// which the instance is dropped without any further call.
///
/// Each instance is driven by exactly one dedicated OS thread of the host: calls never overlap
/// and never run on the host's async runtime, so they **may block** (network round-trips,
/// `fsync`). Blocking for a long time delays only this sink. The value must be `Send` because
/// it may be constructed on one thread and driven on another. Several instances of the same
/// plugin (several configured sinks, or an old and a new instance during a reload) can run at
/// the same time on different threads, so global state in a plugin needs synchronisation.
///
/// # Errors and panics
///
/// Return errors rather than panicking. A panic is caught by the code `export_sink!`
/// generates and reported to the host as [`ErrorKind::PANIC`](crate::ErrorKind::PANIC); the
/// instance is then considered broken and every further call fails without reaching it.
pub trait Sink: Send + 'static {
    /// Delivers `batch`, in order.
    ///
    /// The records borrow from the host and are valid only during this call (see
    /// [`Record`]). On success all of them were delivered. On failure, report how many at the
    /// start of the batch were delivered with [`WriteError::delivered`]; the host retries or
    /// gives up on the rest according to [`ErrorKind`](crate::ErrorKind).
    fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError>;

    /// Makes everything written so far durable (flush buffers, `fsync`, wait for
    /// acknowledgements). The default does nothing, which is right for sinks without buffers.
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Releases resources before the instance is dropped. The host calls [`flush`](Self::flush)
    /// first. The default does nothing.
    fn close(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// The FFI-safe interface of a sink instance, as the host calls it.
///
/// Plugin authors normally implement [`Sink`] and let [`export_sink!`](crate::export_sink)
/// implement this trait; the semantics are the same as [`Sink`]'s, with ABI-stable types.
/// Implementing it by hand is possible, but then catching panics is the implementor's job: a
/// panic that unwinds out of one of these methods aborts the whole daemon.
///
/// New methods may be appended after [`close`](Self::close) in a minor version of the API, each
/// with a default body: when the host calls such a method on an instance from a plugin built
/// against an older version, that default runs instead.
#[sabi_trait]
pub trait SinkObject: Send {
    /// Delivers `batch`, borrowed from the host for the duration of the call.
    fn write(&mut self, batch: RSlice<'_, Record<'_>>) -> RResult<(), WriteError>;

    /// Makes everything written so far durable.
    fn flush(&mut self) -> RResult<(), SinkError>;

    /// Releases resources; the host drops the instance afterwards.
    #[sabi(last_prefix_field)]
    fn close(&mut self) -> RResult<(), SinkError>;
}

/// An owned sink instance, as returned by a plugin's constructor: a boxed [`SinkObject`].
///
/// It is `Send` but not `Sync`. Dropping it runs the plugin's destructor for the instance
/// (inside the plugin, guarded against panics when built with `export_sink!`).
pub type SinkBox = SinkObject_TO<'static, RBox<()>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_box_can_move_to_the_sink_thread() {
        fn is_send<T: Send>() {}
        is_send::<SinkBox>();
    }
}
