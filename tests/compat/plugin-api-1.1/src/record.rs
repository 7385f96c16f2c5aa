//! The unit of delivery: one stored audit event, lent to the sink.

use std::fmt;

use abi_stable::{StableAbi, std_types::RStr};

/// One audit event as stored in trail's log, lent to a sink for the duration of one
/// [`write`](crate::Sink::write) call.
///
/// **Ownership.** The host owns the bytes; every string borrows from the host's buffers and is
/// only valid until `write` returns. A sink that keeps anything past the call (to buffer, batch
/// or retry later) must copy it, e.g. with `record.line.to_string()`. The borrow checker
/// enforces this for sinks written with [`Sink`](crate::Sink).
///
/// Records are borrowed rather than owned so that a batch costs the host no allocation per
/// record: trail targets hundreds of thousands of events per second.
///
/// All strings are valid UTF-8.
///
/// This is a `repr(C)` type whose layout is frozen for the whole major version of the API:
/// information added later will reach sinks through new methods, never through new fields here.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// The position of the event in trail's log: strictly increasing within one log, so a sink
    /// can use it to recognise records it has already seen after a retry.
    pub seq: u64,
    /// The event's unique id, a UUID in its hyphenated lower-case text form
    /// (`0190a4f3-8d2c-7b1e-9c4d-5e6f7a8b9c0d`).
    pub id: RStr<'a>,
    /// The event type name, e.g. `user_login`, as declared in trail's event-type registry.
    pub event_type: RStr<'a>,
    /// The event exactly as trail stored it: one compact JSON object, without the trailing
    /// newline. Sinks that forward events should forward this line unchanged.
    pub line: RStr<'a>,
}

impl<'a> Record<'a> {
    /// A record borrowing the given strings (for hosts and tests).
    pub const fn new(seq: u64, id: &'a str, event_type: &'a str, line: &'a str) -> Self {
        Self {
            seq,
            id: RStr::from_str(id),
            event_type: RStr::from_str(event_type),
            line: RStr::from_str(line),
        }
    }
}

impl fmt::Debug for Record<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("seq", &self.seq)
            .field("id", &self.id.as_str())
            .field("event_type", &self.event_type.as_str())
            .field("line", &self.line.as_str())
            .finish()
    }
}
