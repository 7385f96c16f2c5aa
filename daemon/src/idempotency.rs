//! The window of idempotency keys: which keyed submissions were stored recently, so that a repeat is answered
//! with the first one's `id` and `seq` instead of being stored again.
//!
//! Owns memory only, bounded by `idempotency.max_keys`, and knows nothing of sockets. A key is remembered per
//! submitting uid, as 128 bits of SHA-256 over the uid and the key ([`Key`]); with it, 128 bits of SHA-256 over
//! the event's stored fields ([`EventDigest`]: what "the same event" means), the record's `id` and its `seq`. A
//! key whose record is on its way to the log is *in flight*: a second submission with it waits
//! ([`Window::wait`]) until the first is stored or refused, so that two submissions never both store one key.
//! A refused or unavailable first attempt leaves nothing behind. Keys are forgotten `idempotency.window` after
//! their record's `received_at`, or, beyond `max_keys`, oldest first. At start [`Window::rebuild`] reads the keys
//! of the window's records back from the log files.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use memchr::memmem;
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};
use tokio::sync::Notify;

use crate::log::files::{self, Chunk, Chunks};
use crate::record::line;

/// A key as remembered: the first 128 bits of SHA-256 over the submitting uid (4 bytes, little-endian) and the
/// key's bytes. The key itself is not kept in memory (it is in the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key([u8; 16]);

impl Key {
    /// The key `key` of user `uid`.
    pub fn new(uid: u32, key: &str) -> Key {
        let mut h = Sha256::new();
        h.update(uid.to_le_bytes());
        h.update(key.as_bytes());
        Key(h.finalize()[..16].try_into().expect("16 of 32 bytes"))
    }
}

/// "The same event": the first 128 bits of SHA-256 over the event's own fields in their stored form.
///
/// The parts are the type's name; `occurred_at` as stored, when the request gave one (a stored `occurred_at`
/// equal to `received_at` counts as not given: that is the default); and the stored bytes of `actor`, `target`,
/// `outcome`, `message` and `payload` (keys included; absent fields are absent). Stored form means: whitespace
/// between tokens, the order of the envelope's keys and of `actor`'s and `target`'s keys, and the escapes in
/// `actor`, `target` and `message` do not matter, `occurred_at` is compared as a UTC time; the payload is stored
/// as sent, so the order of its keys, its escapes and the spelling of its numbers do. `source` (pid, gid) and
/// the type's version are not part of it: a retry from another process of the same user matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventDigest([u8; 16]);

impl EventDigest {
    /// The digest of an event of type `event_type` whose stored `occurred_at` is `occurred_at` (`None` when the
    /// request gave none) and whose stored fields from `,"actor":` to the end of `payload` are `fields`.
    pub fn new(event_type: &str, occurred_at: Option<&[u8]>, fields: &[u8]) -> EventDigest {
        let mut h = Sha256::new();
        for part in [event_type.as_bytes(), occurred_at.unwrap_or(b""), fields] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update([u8::from(occurred_at.is_some())]);
        EventDigest(h.finalize()[..16].try_into().expect("16 of 32 bytes"))
    }
}

/// What [`Window::claim`] found for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key is new: it is now in flight; store the event and report the outcome ([`Window::stored`],
    /// [`Window::failed`]).
    New,
    /// The same event was stored under this key: answer with its `id` and `seq`, store nothing.
    Duplicate {
        /// The stored record's id.
        id: uuid::Uuid,
        /// The stored record's seq.
        seq: u64,
    },
    /// A different event was stored under this key: refuse (`conflict`).
    Conflict {
        /// The stored record's id.
        id: uuid::Uuid,
        /// The stored record's seq.
        seq: u64,
    },
    /// Another submission with this key is in flight: wait for it ([`Window::wait`]), then claim again.
    Wait,
}

/// `seq` of an entry whose record is not stored yet.
const IN_FLIGHT: u64 = u64::MAX;

/// 40 bytes per key besides the map's own key: the record's UUID v7 also tells when it was received.
#[derive(Debug, Clone, Copy)]
struct Entry {
    event: EventDigest,
    id: [u8; 16],
    seq: u64,
}

impl Entry {
    /// Unix milliseconds of `received_at`, from the UUID v7.
    fn millis(&self) -> u64 {
        let mut b = [0u8; 8];
        b[2..].copy_from_slice(&self.id[..6]);
        u64::from_be_bytes(b)
    }
}

/// The window's counts in `trail status`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Status {
    /// Keys of stored events remembered.
    pub keys: usize,
    /// Keys whose first request is being written.
    pub in_flight: usize,
    /// `idempotency.max_keys`.
    pub max_keys: usize,
    /// `idempotency.window`, in seconds.
    pub window_secs: u64,
    /// Keys forgotten because their window passed.
    pub expired: u64,
    /// Keys forgotten early because of `max_keys`.
    pub evicted: u64,
}

/// The window shared by every connection.
pub struct Window {
    inner: Mutex<Inner>,
    /// Told whenever an in-flight key was settled.
    settled: Notify,
    window: Duration,
    max_keys: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Keys of stored entries, oldest first (in the order they were stored). In-flight keys are not here.
    order: VecDeque<Key>,
    evicted: u64,
    expired: u64,
}

impl Inner {
    /// Forgets stored keys received before `cutoff` (Unix milliseconds), oldest first.
    fn expire(&mut self, cutoff: u64) {
        while let Some(front) = self.order.front() {
            match self.entries.get(front) {
                Some(e) if e.millis() >= cutoff => break,
                _ => {
                    let key = self.order.pop_front().expect("front exists");
                    self.entries.remove(&key);
                    self.expired += 1;
                }
            }
        }
    }

    /// Forgets the oldest stored keys until at most `max` are left.
    fn bound(&mut self, max: usize) {
        while self.order.len() > max {
            let key = self.order.pop_front().expect("more than max");
            self.entries.remove(&key);
            self.evicted += 1;
        }
    }
}

/// What [`Window::rebuild`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// Log files read.
    pub files: usize,
    /// Bytes read from them (decompressed).
    pub bytes: u64,
    /// Keyed records found within the window.
    pub records: usize,
    /// Keys remembered afterwards.
    pub keys: usize,
    /// How long it took.
    pub elapsed: Duration,
}

/// A log file could not be read back.
#[derive(Debug, thiserror::Error)]
#[error(
    "idempotency window: cannot read {path}: {source}; keys of the records in it are not recognised until \
     they expire"
)]
pub struct Error {
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl Window {
    /// An empty window that remembers keys for `window` after their record was received, at most `max_keys`.
    pub fn new(window: Duration, max_keys: usize) -> Window {
        Window {
            inner: Mutex::new(Inner::default()),
            settled: Notify::new(),
            window,
            max_keys: max_keys.max(1),
        }
    }

    fn cutoff(&self, now: SystemTime) -> u64 {
        millis(now).saturating_sub(self.window.as_millis() as u64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; a poisoned one still holds consistent entries.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks `key` up for a submission of `event` at `now`; when it is new, it is in flight from now on.
    pub fn claim(&self, key: Key, event: EventDigest, now: SystemTime) -> Claim {
        let cutoff = self.cutoff(now);
        let mut inner = self.lock();
        inner.expire(cutoff);
        match inner.entries.get(&key) {
            Some(e) if e.seq == IN_FLIGHT => Claim::Wait,
            Some(e) => {
                let (id, seq) = (uuid::Uuid::from_bytes(e.id), e.seq);
                if e.event == event {
                    Claim::Duplicate { id, seq }
                } else {
                    Claim::Conflict { id, seq }
                }
            }
            None => {
                inner.entries.insert(
                    key,
                    Entry {
                        event,
                        id: [0; 16],
                        seq: IN_FLIGHT,
                    },
                );
                Claim::New
            }
        }
    }

    /// The in-flight `key`'s record is durable as `seq` with `id`.
    pub fn stored(&self, key: Key, seq: u64, id: uuid::Uuid) {
        let mut inner = self.lock();
        if let Some(e) = inner.entries.get_mut(&key)
            && e.seq == IN_FLIGHT
        {
            e.seq = seq;
            e.id = id.into_bytes();
            inner.order.push_back(key);
            inner.bound(self.max_keys);
        }
        drop(inner);
        self.settled.notify_waiters();
    }

    /// The in-flight `key`'s record was not stored: the key is free again.
    pub fn failed(&self, key: Key) {
        let mut inner = self.lock();
        if inner.entries.get(&key).is_some_and(|e| e.seq == IN_FLIGHT) {
            inner.entries.remove(&key);
        }
        drop(inner);
        self.settled.notify_waiters();
    }

    /// Waits until `key` is not in flight.
    pub async fn wait(&self, key: Key) {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self
                .lock()
                .entries
                .get(&key)
                .is_none_or(|e| e.seq != IN_FLIGHT)
            {
                return;
            }
            settled.await;
        }
    }

    /// Counts for `trail status`: keys remembered (stored and in flight) and keys forgotten by the bound.
    pub fn status(&self, now: SystemTime) -> Status {
        let cutoff = self.cutoff(now);
        let mut inner = self.lock();
        inner.expire(cutoff);
        Status {
            keys: inner.order.len(),
            in_flight: inner.entries.len() - inner.order.len(),
            max_keys: self.max_keys,
            window_secs: self.window.as_secs(),
            expired: inner.expired,
            evicted: inner.evicted,
        }
    }

    /// Remembers the keys of the log's records in `dir` received within the window before `now`: the newest
    /// files are read first, and older ones only while fewer than `max_keys` keyed records were found and the
    /// file can hold records of the window (the next file started after the window's start).
    pub fn rebuild(&self, dir: &Path, now: SystemTime) -> Result<Rebuilt, Error> {
        let started = Instant::now();
        let cutoff = now.checked_sub(self.window).unwrap_or(UNIX_EPOCH);
        let cutoff_stamp = files::stamp(cutoff);
        let cutoff_secs = millis(cutoff) as i64 / 1000;
        let list = files::list(dir).map_err(|source| Error {
            path: dir.to_owned(),
            source,
        })?;
        let mut per_file: Vec<Vec<(Key, Entry)>> = Vec::new();
        let (mut found, mut bytes) = (0, 0);
        for (i, file) in list.iter().enumerate().rev() {
            // A file's records were received before the next file started (its name has whole seconds).
            if list.get(i + 1).is_some_and(|next| next.start < cutoff_secs) {
                break;
            }
            let io = |source| Error {
                path: file.path.clone(),
                source,
            };
            let mut keyed = Vec::new();
            let mut chunks = Chunks::new(file.open().map_err(io)?, 1 << 20);
            while let Some(chunk) = chunks.next_chunk().map_err(io)? {
                let Chunk::Lines(_, lines) = chunk else { break };
                bytes += lines.len() as u64;
                let mut start = 0;
                for end in memchr::memchr_iter(b'\n', lines) {
                    if let Some(entry) = read_keyed(&lines[start..end], &cutoff_stamp) {
                        keyed.push(entry);
                    }
                    start = end + 1;
                }
            }
            found += keyed.len();
            per_file.push(keyed);
            if found >= self.max_keys {
                break;
            }
        }
        let files_read = per_file.len();
        // Newest first: a key stored twice (reused after it was forgotten) is remembered with its newest record.
        let mut inner = self.lock();
        let mut newest_first = Vec::new();
        for (key, entry) in per_file.iter().flat_map(|f| f.iter().rev()) {
            if newest_first.len() >= self.max_keys {
                break;
            }
            if inner.entries.contains_key(key) {
                continue;
            }
            inner.entries.insert(*key, *entry);
            newest_first.push(*key);
        }
        inner.order.extend(newest_first.iter().rev());
        Ok(Rebuilt {
            files: files_read,
            bytes,
            records: found,
            keys: inner.order.len(),
            elapsed: started.elapsed(),
        })
    }
}

/// The fields of a stored record that the window needs; the others are skipped.
#[derive(Deserialize)]
struct Keyed<'a> {
    seq: u64,
    id: &'a str,
    received_at: &'a str,
    occurred_at: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    source: Uid,
    #[serde(borrow, default)]
    actor: Option<&'a RawValue>,
    #[serde(borrow, default)]
    target: Option<&'a RawValue>,
    #[serde(default)]
    outcome: Option<&'a str>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Uid {
    uid: u32,
}

/// The window's entry of a stored line that has an `idempotency_key` and was received at or after
/// `cutoff_stamp` (a `received_at` text).
fn read_keyed(l: &[u8], cutoff_stamp: &[u8]) -> Option<(Key, Entry)> {
    static KEY: std::sync::LazyLock<memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memmem::Finder::new(b",\"idempotency_key\":\""));
    // Most records have no key: only those that might are parsed.
    KEY.find(l)?;
    if line::received_at(l)? < cutoff_stamp {
        return None;
    }
    let r: Keyed = serde_json::from_slice(l).ok()?;
    let key = r.idempotency_key.as_deref()?;
    let id = uuid::Uuid::parse_str(r.id).ok()?;
    // The same bytes, in the same order, as `record::write_tail` wrote between `source` and the key.
    let mut fields = Vec::new();
    for (name, raw) in [("actor", r.actor), ("target", r.target)] {
        if let Some(raw) = raw {
            fields.extend_from_slice(format!(",\"{name}\":").as_bytes());
            fields.extend_from_slice(raw.get().as_bytes());
        }
    }
    if let Some(o) = r.outcome {
        fields.extend_from_slice(b",\"outcome\":\"");
        fields.extend_from_slice(o.as_bytes());
        fields.push(b'"');
    }
    for (name, raw) in [("message", r.message), ("payload", r.payload)] {
        if let Some(raw) = raw {
            fields.extend_from_slice(format!(",\"{name}\":").as_bytes());
            fields.extend_from_slice(raw.get().as_bytes());
        }
    }
    let occurred = (r.occurred_at != r.received_at).then_some(r.occurred_at.as_bytes());
    let entry = Entry {
        event: EventDigest::new(r.event_type, occurred, &fields),
        id: id.into_bytes(),
        seq: r.seq,
    };
    Some((Key::new(r.source.uid, key), entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(millis)
    }

    fn id(millis: u64) -> uuid::Uuid {
        crate::record::new_id(at(millis))
    }

    #[test]
    fn a_key_is_new_in_flight_stored_then_duplicate_or_conflict() {
        let w = Window::new(Duration::from_secs(10), 100);
        let (k, e) = (Key::new(1000, "k"), EventDigest::new("t", None, b""));
        let other = EventDigest::new("t", None, b",\"message\":\"m\"");
        let t = 1_800_000_000_000;
        assert_eq!(w.claim(k, e, at(t)), Claim::New);
        assert_eq!(w.claim(k, e, at(t)), Claim::Wait);
        assert_eq!(w.claim(k, other, at(t)), Claim::Wait);
        let first = id(t);
        w.stored(k, 7, first);
        assert_eq!(
            w.claim(k, e, at(t + 1)),
            Claim::Duplicate { id: first, seq: 7 }
        );
        assert_eq!(
            w.claim(k, other, at(t + 1)),
            Claim::Conflict { id: first, seq: 7 }
        );
        // The same key of another uid is another key.
        assert_eq!(w.claim(Key::new(1001, "k"), other, at(t)), Claim::New);
        // Forgotten once the window after its record's received_at is over.
        assert_eq!(w.claim(k, other, at(t + 10_001)), Claim::New);
    }

    #[test]
    fn a_failed_attempt_frees_its_key() {
        let w = Window::new(Duration::from_secs(10), 100);
        let (k, e) = (Key::new(0, "k"), EventDigest::new("t", None, b""));
        assert_eq!(w.claim(k, e, at(1)), Claim::New);
        w.failed(k);
        assert_eq!(w.claim(k, e, at(2)), Claim::New);
    }

    #[test]
    fn the_bound_forgets_the_oldest_first() {
        let w = Window::new(Duration::from_secs(3600), 3);
        let e = EventDigest::new("t", None, b"");
        let t = 1_800_000_000_000;
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            assert_eq!(w.claim(Key::new(0, name), e, at(t)), Claim::New);
            w.stored(Key::new(0, name), i as u64 + 1, id(t));
        }
        assert_eq!(w.status(at(t)).keys, 3);
        assert_eq!(w.status(at(t)).evicted, 1);
        assert_eq!(w.claim(Key::new(0, "a"), e, at(t)), Claim::New);
        assert!(matches!(
            w.claim(Key::new(0, "b"), e, at(t)),
            Claim::Duplicate { seq: 2, .. }
        ));
    }

    #[test]
    fn the_digest_distinguishes_its_parts() {
        let d = |t: &str, o: Option<&[u8]>, f: &[u8]| EventDigest::new(t, o, f);
        assert_eq!(d("t", None, b"x"), d("t", None, b"x"));
        assert_ne!(d("t", None, b"x"), d("tx", None, b""));
        assert_ne!(d("t", None, b""), d("t", Some(b""), b""));
        assert_ne!(d("t", Some(b"a"), b"b"), d("t", Some(b"ab"), b""));
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_the_key_is_settled() {
        let w = std::sync::Arc::new(Window::new(Duration::from_secs(10), 10));
        let (k, e) = (Key::new(0, "k"), EventDigest::new("t", None, b""));
        assert_eq!(w.claim(k, e, at(1)), Claim::New);
        let waiter = tokio::spawn({
            let w = w.clone();
            async move { w.wait(k).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        w.stored(k, 1, id(1));
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("the waiter wakes")
            .unwrap();
    }
}
