//! The hash chain that links every record of the log to all records before it.
//!
//! Definition (also in README.md, "The log"): every record written to the log carries `hash` as its last field,
//! 64 lower-case hex digits:
//!
//! ```text
//! hash_n = SHA-256( hash_{n-1} as 32 raw bytes  ||  seq_n as 8 bytes big-endian  ||  SHA-256(rest_n) )
//! ```
//!
//! where `canonical_n` is the record's line without its newline and without its `,"hash":"…"` field, i.e. the
//! bytes before `,"hash":"` followed by `}`, and `rest_n` is `canonical_n` after its leading `{"seq":<digits>`
//! (so it starts with `,"id":`); `hash_0` (the predecessor of the very first record) is 32 zero bytes. The inner
//! digest covers every byte of the record but the `seq`, which the outer hash covers: connection tasks compute
//! the inner digests in parallel, and the single writer, which assigns `seq`, chains 72 bytes per record.
//! The chain runs through every persisted record in `seq` order, across files, rotations, compression and
//! restarts. Records that go only to sinks (stream-only types) are not in the log and not in the chain.
//!
//! Owns the arithmetic and the line layout only; the journal writer seals records, `verify` checks them.

use sha2::{Digest, Sha256};

use crate::record::line::{self, HASH_FIELD};

/// A chain hash.
pub type Hash = [u8; 32];

/// The predecessor of the first record of a log.
pub const GENESIS: Hash = [0; 32];

/// The hash of a record whose canonical bytes are `body` followed by `}`, given its predecessor's.
pub fn link(prev: &Hash, body: &[u8]) -> Hash {
    let (seq, digest) = inner(body);
    link_digest(prev, seq, &digest)
}

/// What the chain hashes of a record besides its predecessor's hash, given its canonical bytes less the closing
/// brace: its `seq` and its inner digest ([`digest`] of what follows the `seq`). A body that does not start with
/// a `seq` gets `u64::MAX` and the digest of all of it: no hash a writer produced can match.
pub fn inner(body: &[u8]) -> (u64, Hash) {
    match line::split_seq(body) {
        Some((seq, rest)) => (seq, digest(rest)),
        None => (u64::MAX, digest(body)),
    }
}

/// The inner digest of a record: SHA-256 of `rest` (the record after its `{"seq":<digits>`, without the closing
/// brace) followed by `}`.
pub fn digest(rest: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(rest);
    h.update(b"}");
    h.finalize().into()
}

/// The hash of record `seq` whose inner digest is `digest`, given its predecessor's.
pub fn link_digest(prev: &Hash, seq: u64, digest: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(digest);
    h.finalize().into()
}

/// Seals a record whose inner digest was computed beforehand: appends `,"hash":"…"}` to `out` (which ends with
/// the record without its closing brace) and returns the new chain head. Same result as [`seal`].
pub fn seal_digest(prev: &Hash, seq: u64, digest: &Hash, out: &mut Vec<u8>) -> Hash {
    let hash = link_digest(prev, seq, digest);
    out.extend_from_slice(HASH_FIELD);
    push_hex(out, &hash);
    out.extend_from_slice(b"\"}");
    hash
}

/// Seals the record at `out[start..]` (a JSON object without its closing brace): appends `,"hash":"…"}` and
/// returns the new chain head.
pub fn seal(prev: &Hash, out: &mut Vec<u8>, start: usize) -> Hash {
    let hash = link(prev, &out[start..]);
    out.extend_from_slice(HASH_FIELD);
    push_hex(out, &hash);
    out.extend_from_slice(b"\"}");
    hash
}

/// Splits a sealed line (without newline) into its body (canonical bytes less the closing brace) and its hash;
/// `None` when the line does not end in a well-formed hash field.
pub fn split(line: &[u8]) -> Option<(&[u8], Hash)> {
    let (body, hex) = line::split_hash(line)?;
    Some((body, parse_hex(hex)?))
}

/// Appends `bytes` as lower-case hex.
pub fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let start = out.len();
    out.resize(start + 2 * bytes.len(), 0);
    for (pair, b) in out[start..].chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[(b >> 4) as usize];
        pair[1] = DIGITS[(b & 15) as usize];
    }
}

/// `bytes` as lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    String::from_utf8(out).expect("hex digits are ascii")
}

/// Parses 64 lower-case hex digits.
pub fn parse_hex(hex: &[u8]) -> Option<Hash> {
    if hex.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_with_a_digest_made_elsewhere_is_sealing() {
        let tail = br#","id":"x","type":"user_login","message":"hi""#;
        let prev = link(&GENESIS, b"{\"seq\":6,\"id\":\"w\"");
        let mut a = b"{\"seq\":7".to_vec();
        a.extend_from_slice(tail);
        let mut b = a.clone();
        let ha = seal(&prev, &mut a, 0);
        let hb = seal_digest(&prev, 7, &digest(tail), &mut b);
        assert_eq!((ha, &a), (hb, &b));
        // The seq is covered: the same bytes under another seq chain differently.
        assert_ne!(link_digest(&prev, 8, &digest(tail)), ha);
        assert_ne!(link(&prev, b"garbage"), ha);
    }

    #[test]
    fn sealing_and_splitting_agree_with_the_definition() {
        let mut out = b"junk".to_vec();
        let body = br#"{"seq":1,"id":"x","type":"t""#;
        out.extend_from_slice(body);
        let h = seal(&GENESIS, &mut out, 4);
        let line = &out[4..];
        // The definition, spelled out: SHA-256(prev || seq as u64 BE || SHA-256(rest after the seq, with `}`)).
        let mut inner = Sha256::new();
        inner.update(br#","id":"x","type":"t"}"#);
        let inner: Hash = inner.finalize().into();
        let mut expected = Sha256::new();
        expected.update([0u8; 32]);
        expected.update(1u64.to_be_bytes());
        expected.update(inner);
        assert_eq!(h, <Hash>::from(expected.finalize()));
        assert_eq!(split(line), Some((&body[..], h)));
        assert!(line.ends_with(format!(",\"hash\":\"{}\"}}", hex(&h)).as_bytes()));
        assert_eq!(parse_hex(hex(&h).as_bytes()), Some(h));
    }

    #[test]
    fn malformed_lines_do_not_split() {
        let check = |line: &str| assert_eq!(split(line.as_bytes()), None, "{line}");
        check("");
        check(r#"{"seq":1}"#);
        check(&format!(r#"{{"seq":1,"hash":"{}"}}"#, "A".repeat(64)));
        check(&format!(r#"{{"seq":1,"hash":"{}"}}x"#, "a".repeat(64)));
        check(&format!(r#"{{"seq":1,"hash":"{}"}}"#, "a".repeat(63)));
    }
}
