//! Reading a stored line at the fixed places of its fields, without parsing the whole record.
//!
//! The one reader of record bytes: every module that needs a line's `seq`, `id`, `received_at`, `type` or `hash`
//! (the journal, recovery, the chain, indexes, the spool, the tools) reads it here. It relies on the field order
//! of [`super`]: `seq` first, then `id` and `received_at` at fixed places, `type` as the first `,"type":"` key
//! (every field before it has a fixed format), and `hash` last.

use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::Deserialize;

/// What precedes the digits of `seq` at the start of every stored line (`{"seq":N,…`).
pub const SEQ_PREFIX: &[u8] = b"{\"seq\":";
/// What precedes the 64 hex digits of `hash` at the end of a sealed line.
pub const HASH_FIELD: &[u8] = b",\"hash\":\"";
/// Bytes of the hash field at the end of a sealed line: `,"hash":"` + 64 hex digits + `"}`.
pub const HASH_SUFFIX_LEN: usize = HASH_FIELD.len() + 64 + 2;

/// Finds the `id` key in a stored line.
pub static ID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b",\"id\":\""));
/// Finds the `type` key in a stored line.
pub static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b",\"type\":\""));

/// The `seq` at the start of a stored line (`{"seq":N,…`).
pub fn seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(SEQ_PREFIX)?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    if end == 0 || end > 20 {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Digits of the `seq` at the start of a stored line (0 when it does not start with `{"seq":`).
pub fn seq_len(line: &[u8]) -> usize {
    let rest = line.strip_prefix(SEQ_PREFIX).unwrap_or(b"");
    rest.iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len())
}

/// Splits a record's bytes into its `seq` and what follows `{"seq":<digits>` (the part the chain's inner digest
/// covers); `None` when they do not start with a `seq`.
pub fn split_seq(body: &[u8]) -> Option<(u64, &[u8])> {
    let rest = body.strip_prefix(SEQ_PREFIX)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let seq = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    Some((seq, &rest[digits..]))
}

/// Splits a sealed line (without newline) into its body (canonical bytes less the closing brace) and the hex
/// digits of its hash; `None` when the line does not end in a hash field of the right length.
pub fn split_hash(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    let (body, suffix) = line.split_at(at);
    let hex = suffix.strip_prefix(HASH_FIELD)?.strip_suffix(b"\"}")?;
    Some((body, hex))
}

/// The 30 bytes of a stored line's `received_at` (`YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`), found at its fixed place
/// after `seq` and `id`; `None` when the line does not have the daemon's layout.
pub fn received_at(line: &[u8]) -> Option<&[u8]> {
    const ID: &[u8] = b",\"id\":\"";
    const RECEIVED: &[u8] = b"\",\"received_at\":\"";
    let rest = line.strip_prefix(SEQ_PREFIX)?;
    let digits = rest.iter().position(|b| !b.is_ascii_digit())?;
    let rest = rest[digits..].strip_prefix(ID)?;
    let rest = rest.get(36..)?.strip_prefix(RECEIVED)?;
    let t = rest.get(..30)?;
    (t[29] == b'Z' && t[10] == b'T').then_some(t)
}

/// A part of a line: offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span(pub u32, pub u32);

impl Span {
    /// The part of `line` (empty when it is not there).
    pub fn of<'a>(&self, line: &'a str) -> &'a str {
        line.get(self.0 as usize..(self.0 + self.1) as usize)
            .unwrap_or("")
    }

    /// The part of `line` as bytes (empty when it is not there).
    pub fn bytes<'a>(&self, line: &'a [u8]) -> &'a [u8] {
        line.get(self.0 as usize..(self.0 + self.1) as usize)
            .unwrap_or(b"")
    }
}

/// Where the string value that follows the first occurrence of `key` (a `,"name":"` prefix, [`ID`] or [`TYPE`])
/// in a stored line is.
pub fn value_after(key: &Finder<'_>, line: &[u8]) -> Span {
    let Some(at) = key.find(line) else {
        return Span::default();
    };
    let at = at + key.needle().len();
    let len = memchr::memchr(b'"', &line[at..]).unwrap_or(0);
    Span(at as u32, len as u32)
}

/// The event type of a stored line: `type` always follows the fixed-format fields, so its first occurrence is the
/// record's own.
pub fn event_type(line: &[u8]) -> &str {
    let Span(at, len) = value_after(&TYPE, line);
    std::str::from_utf8(&line[at as usize..(at + len) as usize]).unwrap_or("")
}

/// The fields of a stored record that recovery and tools need without parsing the whole thing.
#[derive(Debug, Deserialize)]
pub struct Head {
    /// Position in the log.
    pub seq: u64,
    /// Event id.
    pub id: String,
    /// Chain hash (absent in records written before the chain existed and in stream-only records).
    #[serde(default)]
    pub hash: Option<String>,
}

/// Reads the head of a stored line; `None` when it is not a trail record.
pub fn parse_head(line: &[u8]) -> Option<Head> {
    serde_json::from_slice(line).ok()
}

/// The type of a stored line when it is one of the daemon's own records: its top-level `source` carries
/// `"daemon":true`, which only the daemon puts there. `None` for any other line.
pub fn own_type(line: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Own {
        #[serde(rename = "type")]
        kind: String,
        source: OwnSource,
    }
    #[derive(Deserialize)]
    struct OwnSource {
        #[serde(default)]
        daemon: bool,
    }
    let own: Own = serde_json::from_slice(line).ok()?;
    own.source.daemon.then_some(own.kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs() {
        let check = |line: &str, expected: Option<u64>| {
            assert_eq!(seq(line.as_bytes()), expected, "{line}")
        };
        check(r#"{"seq":17,"id":"x"}"#, Some(17));
        check(r#"{"seq":,"id":"x"}"#, None);
        check(r#"{"seq":17"#, None);
        check(r#"{"id":"x","seq":17}"#, None);
    }

    #[test]
    fn received_at_is_read_from_its_fixed_place() {
        let line = br#"{"seq":12,"id":"019ab7c4-0000-7000-8000-000000000000","received_at":"2026-11-20T00:00:00.123456789Z","occurred_at":"x"}"#;
        assert_eq!(
            received_at(line),
            Some(&b"2026-11-20T00:00:00.123456789Z"[..])
        );
        assert_eq!(
            received_at(br#"{"seq":12,"id":"short","received_at":"x"}"#),
            None
        );
    }
}
