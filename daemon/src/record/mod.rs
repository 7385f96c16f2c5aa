//! The stored record: one compact JSON object per log line, with a documented and stable field order.
//!
//! ```text
//! {"seq":…,"id":…,"received_at":…,"occurred_at":…,"type":…,"version":…,"severity":…,"code":…,
//!  "source":{"uid":…,"gid":…,"pid":…,"host":…,"daemon":true},"actor":{…},"target":{…},"outcome":…,"message":…,
//!  "payload":{…},"idempotency_key":…}
//! ```
//!
//! `code`, `actor`, `target`, `outcome`, `message`, `payload` and `idempotency_key` are present only when set; `source.pid` only when
//! the kernel reported it; `source.daemon` only in the daemon's own records (a client's `source` is built from its
//! peer credentials alone, so no client's record can carry it). Every record written to the log ends with `"hash"`, its link in the hash chain
//! (`crate::log::chain`), sealed by the journal writer. Later versions may add fields after `payload` and
//! before `hash`, never reorder; `hash` stays last.
//!
//! A record is built in two halves so that work is done where it is cheapest: the connection task, in parallel
//! with other connections, serializes everything after `seq` (the *tail*, without the closing brace); the single
//! log writer only prefixes `{"seq":N` and closes the object. Nothing here touches files.

pub mod line;

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::event_types::EventType;
use crate::protocol::Checked;

/// Who submitted events on one connection, as the kernel reported it (`SO_PEERCRED`), plus the host name; or the
/// daemon itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Effective user id of the submitting process.
    pub uid: u32,
    /// Effective group id of the submitting process.
    pub gid: u32,
    /// Process id at `connect()` time, when known.
    pub pid: Option<i32>,
    /// Host name of this machine.
    pub host: String,
    /// The daemon's own record: `"daemon":true` ends the fragment. Never set for a client's connection.
    pub daemon: bool,
}

impl Source {
    /// The `,"source":{…}` fragment, computed once per connection.
    pub fn fragment(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.host.len());
        out.extend_from_slice(b",\"source\":{\"uid\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.uid).as_bytes());
        out.extend_from_slice(b",\"gid\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.gid).as_bytes());
        if let Some(pid) = self.pid {
            out.extend_from_slice(b",\"pid\":");
            out.extend_from_slice(itoa::Buffer::new().format(pid).as_bytes());
        }
        out.extend_from_slice(b",\"host\":");
        serde_json::to_writer(&mut out, &self.host).expect("writing to a Vec cannot fail");
        if self.daemon {
            out.extend_from_slice(b",\"daemon\":true");
        }
        out.push(b'}');
        out
    }
}

/// Where the parts of a tail that [`write_tail`] appended are in its buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailParts {
    /// The text of `received_at`.
    pub received_at: std::ops::Range<usize>,
    /// The text of `occurred_at`.
    pub occurred_at: std::ops::Range<usize>,
    /// The event's own fields after `source`, keys included: `,"actor":…` up to the end of `payload` (empty when
    /// none of `actor`, `target`, `outcome`, `message`, `payload` is set).
    pub fields: std::ops::Range<usize>,
}

/// Appends the tail of a record (everything after `seq`, without the closing brace) to `out`.
pub fn write_tail(
    out: &mut Vec<u8>,
    id: &str,
    received_at: SystemTime,
    event: &Checked,
    ty: &EventType,
    source_fragment: &[u8],
) -> TailParts {
    let r = &event.request;
    out.extend_from_slice(b",\"id\":\"");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\",\"received_at\":\"");
    let received_start = out.len();
    write_rfc3339(out, received_at);
    let received_end = out.len();
    out.extend_from_slice(b"\",\"occurred_at\":\"");
    let occurred_start = out.len();
    match event.occurred_at {
        Some(t) => out.extend_from_slice(
            t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                .as_bytes(),
        ),
        None => write_rfc3339(out, received_at),
    }
    let occurred_end = out.len();
    // Type names and codes are restricted by the definition schema to characters that need no escaping.
    out.extend_from_slice(b"\",\"type\":\"");
    out.extend_from_slice(ty.name.as_bytes());
    out.extend_from_slice(b"\",\"version\":");
    out.extend_from_slice(itoa::Buffer::new().format(ty.version).as_bytes());
    out.extend_from_slice(b",\"severity\":\"");
    out.extend_from_slice(ty.severity.as_str().as_bytes());
    out.push(b'"');
    if let Some(code) = &ty.code {
        out.extend_from_slice(b",\"code\":\"");
        out.extend_from_slice(code.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(source_fragment);
    let fields_start = out.len();
    // Strings as `serde_json` escapes them (see `protocol::Str::write_json`), without its serializer.
    if let Some(a) = &r.actor {
        out.extend_from_slice(b",\"actor\":");
        a.write_json(out);
    }
    if let Some(t) = &r.target {
        out.extend_from_slice(b",\"target\":");
        t.write_json(out);
    }
    if let Some(o) = r.outcome {
        out.extend_from_slice(b",\"outcome\":\"");
        out.extend_from_slice(o.as_str().as_bytes());
        out.push(b'"');
    }
    if let Some(m) = &r.message {
        out.extend_from_slice(b",\"message\":");
        m.write_json(out);
    }
    if let Some(p) = &r.payload {
        // Copied through as sent (compact, every token unchanged), never re-serialized.
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(p.as_str().as_bytes());
    }
    let fields_end = out.len();
    if let Some(k) = &r.idempotency_key {
        out.extend_from_slice(b",\"idempotency_key\":");
        k.write_json(out);
    }
    TailParts {
        received_at: received_start..received_end,
        occurred_at: occurred_start..occurred_end,
        fields: fields_start..fields_end,
    }
}

/// A new event id: a UUID v7 (Unix milliseconds of `now`, then 74 random bits).
///
/// The random bits come from a per-thread generator seeded once from the kernel's random source, so that an id
/// costs no system call; ids are unique, not secret.
pub fn new_id(now: SystemTime) -> uuid::Uuid {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(seed());
    }
    // wyrand: a small, fast generator with good statistical quality.
    let next = || {
        STATE.with(|s| {
            let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
            s.set(x);
            let t = (x as u128).wrapping_mul((x ^ 0xe703_7ed1_a0b4_28db) as u128);
            ((t >> 64) ^ t) as u64
        })
    };
    let (a, b) = (next().to_le_bytes(), next().to_le_bytes());
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&a);
    random[8..].copy_from_slice(&b[..2]);
    let millis = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No kernel randomness: mix the time, the process and this thread's stack address instead.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let here = &t as *const u64 as u64;
        return t ^ here.rotate_left(32) ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(bytes)
}

/// Appends `t` as RFC 3339 UTC with nanoseconds, e.g. `2026-11-23T16:12:00.123456789Z`.
///
/// The date and time up to the second are cached per thread, so consecutive calls within one second only format
/// the nanoseconds.
pub fn write_rfc3339(out: &mut Vec<u8>, t: SystemTime) {
    thread_local! {
        static CACHE: RefCell<(u64, [u8; 20])> = const { RefCell::new((u64::MAX, [0; 20])) };
    }
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, nanos) = (since.as_secs(), since.subsec_nanos());
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != secs {
            let dt =
                chrono::DateTime::<chrono::Utc>::from_timestamp(secs as i64, 0).unwrap_or_default();
            let text = dt.format("%Y-%m-%dT%H:%M:%S.").to_string();
            cache.1.copy_from_slice(&text.as_bytes()[..20]);
            cache.0 = secs;
        }
        out.extend_from_slice(&cache.1);
    });
    let mut digits = [b'0'; 9];
    let mut n = nanos;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        let check = |secs: u64, nanos: u32, expected: &str| {
            let mut out = Vec::new();
            write_rfc3339(&mut out, UNIX_EPOCH + Duration::new(secs, nanos));
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        };
        check(0, 0, "1970-01-01T00:00:00.000000000Z");
        check(1_795_132_800, 123_456_789, "2026-11-20T00:00:00.123456789Z");
        check(1_795_132_800, 5, "2026-11-20T00:00:00.000000005Z");
        check(1_795_132_801, 999_999_999, "2026-11-20T00:00:01.999999999Z");
        check(1_795_132_800, 1, "2026-11-20T00:00:00.000000001Z");
    }

    #[test]
    fn ids_are_v7_time_ordered_and_unique() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_132_800_123);
        let ids: Vec<uuid::Uuid> = (0..10_000).map(|_| new_id(t)).collect();
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
            assert_eq!((secs, nanos / 1_000_000), (1_795_132_800, 123));
        }
        let later = new_id(t + Duration::from_millis(1));
        assert!(ids.iter().all(|id| *id < later));
    }

    #[test]
    fn source_fragment() {
        let s = Source {
            uid: 1000,
            gid: 100,
            pid: Some(42),
            host: "h\"1".into(),
            daemon: false,
        };
        assert_eq!(
            String::from_utf8(s.fragment()).unwrap(),
            r#","source":{"uid":1000,"gid":100,"pid":42,"host":"h\"1"}"#
        );
        let s = Source { pid: None, ..s };
        assert!(!String::from_utf8(s.fragment()).unwrap().contains("pid"));
        let s = Source { daemon: true, ..s };
        assert_eq!(
            String::from_utf8(s.fragment()).unwrap(),
            r#","source":{"uid":1000,"gid":100,"host":"h\"1","daemon":true}"#
        );
    }
}
