//! The daemon's answers: acknowledgements, refusals by code, and what goes wrong on the way.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::trust::Untrusted;

/// The daemon's acknowledgement: the event is stored (and, with `fsync: always`, synced) under `id` and `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The record's id (a UUID v7).
    pub id: String,
    /// The record's sequence number in the daemon's log.
    pub seq: u64,
    /// True when an earlier request with the same `idempotency_key` stored the event and this one stored nothing.
    pub duplicate: bool,
}

/// One problem the daemon found in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// A JSON pointer into the request (`/payload/ip`; `""` for the request itself).
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

/// What the daemon said when it refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The daemon's message.
    pub message: String,
    /// Every violation found, when the refusal is about the request's content.
    pub details: Vec<Violation>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Why a request was not acknowledged: one variant per protocol error code, then what can go wrong on the way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `invalid_json`: not JSON, not UTF-8, a repeated key, nested deeper than 127 levels, a lone surrogate.
    #[error("invalid_json: {0}")]
    InvalidJson(Refusal),
    /// `invalid_event`: the envelope violates the event schema.
    #[error("invalid_event: {0}")]
    InvalidEvent(Refusal),
    /// `unknown_type`: no such event type is defined.
    #[error("unknown_type: {0}")]
    UnknownType(Refusal),
    /// `invalid_payload`: the payload violates the type's payload schema.
    #[error("invalid_payload: {0}")]
    InvalidPayload(Refusal),
    /// `too_large`: the line is longer than the daemon's `limits.max_line_bytes`.
    #[error("too_large: {0}")]
    TooLarge(Refusal),
    /// `unavailable`: the daemon cannot take the event now. Retryable.
    #[error("unavailable: {0}")]
    Unavailable(Refusal),
    /// `forbidden`: this client may not submit this event.
    #[error("forbidden: {0}")]
    Forbidden(Refusal),
    /// `too_many_connections`: the daemon turned the connection away. Retryable.
    #[error("too_many_connections: {0}")]
    TooManyConnections(Refusal),
    /// `rate_limited`: this user submitted more than its rate allows. Retryable after `retry_after`.
    #[error("rate_limited: {refusal}")]
    RateLimited {
        /// What the daemon said.
        refusal: Refusal,
        /// When to try again, from the answer's `retry_after_ms`.
        retry_after: Option<Duration>,
    },
    /// `conflict`: the `idempotency_key` was used before, by this user, for a different event.
    #[error("conflict: {0}")]
    Conflict(Refusal),
    /// A refusal with a code this client does not know (added to the protocol later).
    #[error("{code}: {refusal}")]
    Other {
        /// The code.
        code: String,
        /// What the daemon said.
        refusal: Refusal,
    },
    /// The daemon cannot be reached: no socket, connection refused, a timeout, or the connection broke before
    /// the answer. Retryable.
    #[error("cannot reach the daemon at {}: {source}", socket.display())]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The socket, a directory above it, or the process listening on it is not a trusted user's: it may be an
    /// impostor's, so nothing was sent.
    #[error(transparent)]
    Untrusted(Untrusted),
    /// The trusted socket owner named by `$TRAIL_SOCKET_OWNER` (or an option) is not a user.
    #[error("{0}")]
    Owner(String),
    /// The daemon answered something this client does not understand.
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
}

impl Error {
    /// The protocol error code, for refusals.
    pub fn code(&self) -> Option<&str> {
        Some(match self {
            Error::InvalidJson(_) => "invalid_json",
            Error::InvalidEvent(_) => "invalid_event",
            Error::UnknownType(_) => "unknown_type",
            Error::InvalidPayload(_) => "invalid_payload",
            Error::TooLarge(_) => "too_large",
            Error::Unavailable(_) => "unavailable",
            Error::Forbidden(_) => "forbidden",
            Error::TooManyConnections(_) => "too_many_connections",
            Error::RateLimited { .. } => "rate_limited",
            Error::Conflict(_) => "conflict",
            Error::Other { code, .. } => code,
            Error::Unreachable { .. }
            | Error::Untrusted(_)
            | Error::Owner(_)
            | Error::Protocol(_) => {
                return None;
            }
        })
    }

    /// What the daemon said, for refusals.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Error::InvalidJson(r)
            | Error::InvalidEvent(r)
            | Error::UnknownType(r)
            | Error::InvalidPayload(r)
            | Error::TooLarge(r)
            | Error::Unavailable(r)
            | Error::Forbidden(r)
            | Error::TooManyConnections(r)
            | Error::Conflict(r)
            | Error::RateLimited { refusal: r, .. }
            | Error::Other { refusal: r, .. } => Some(r),
            Error::Unreachable { .. }
            | Error::Untrusted(_)
            | Error::Owner(_)
            | Error::Protocol(_) => None,
        }
    }

    /// Whether sending the same event again later can succeed: `unavailable`, `too_many_connections`,
    /// `rate_limited`, and a daemon that could not be reached.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_)
                | Error::TooManyConnections(_)
                | Error::RateLimited { .. }
                | Error::Unreachable { .. }
        )
    }

    /// How long the daemon asked to wait before a retry (`rate_limited`'s `retry_after_ms`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the refusal says the request itself is wrong (invalid JSON, envelope, type or payload; too large):
    /// sending it again unchanged can never succeed.
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            Error::InvalidJson(_)
                | Error::InvalidEvent(_)
                | Error::UnknownType(_)
                | Error::InvalidPayload(_)
                | Error::TooLarge(_)
        )
    }

    pub(crate) fn from_untrusted(e: Untrusted) -> Error {
        match e {
            Untrusted::Io { path, source } => Error::Unreachable {
                socket: path,
                source,
            },
            other => Error::Untrusted(other),
        }
    }

    /// The same error for another event of the batch (I/O errors are not `Clone`).
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Unreachable { socket, source } => Error::Unreachable {
                socket: socket.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Untrusted(e) => Error::Untrusted(e.clone()),
            Error::Owner(m) => Error::Owner(m.clone()),
            Error::Protocol(m) => Error::Protocol(m.clone()),
            Error::RateLimited {
                refusal,
                retry_after,
            } => Error::RateLimited {
                refusal: refusal.clone(),
                retry_after: *retry_after,
            },
            Error::Other { code, refusal } => Error::Other {
                code: code.clone(),
                refusal: refusal.clone(),
            },
            refused => from_code(
                refused.code().expect("a refusal"),
                refused.refusal().expect("a refusal").clone(),
                None,
            ),
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> std::io::Error {
        match e {
            Error::Unreachable { source, .. } => source,
            Error::Untrusted(u) => u.into(),
            other => std::io::Error::other(other),
        }
    }
}

fn from_code(code: &str, refusal: Refusal, retry_after: Option<Duration>) -> Error {
    match code {
        "invalid_json" => Error::InvalidJson(refusal),
        "invalid_event" => Error::InvalidEvent(refusal),
        "unknown_type" => Error::UnknownType(refusal),
        "invalid_payload" => Error::InvalidPayload(refusal),
        "too_large" => Error::TooLarge(refusal),
        "unavailable" => Error::Unavailable(refusal),
        "forbidden" => Error::Forbidden(refusal),
        "too_many_connections" => Error::TooManyConnections(refusal),
        "rate_limited" => Error::RateLimited {
            refusal,
            retry_after,
        },
        "conflict" => Error::Conflict(refusal),
        other => Error::Other {
            code: other.to_owned(),
            refusal,
        },
    }
}

/// Adds the result of one answer line to `results`; returns whether to stop reading (the daemon turned the
/// connection away and closes it).
pub(crate) fn take(results: &mut Vec<Result<Ack, Error>>, line: &str) -> bool {
    let result = parse(line.trim_end());
    let turned_away = matches!(result, Err(Error::TooManyConnections(_)));
    results.push(result);
    turned_away
}

/// Why the events after `results` got no answer: the daemon turned the connection away, or `broken`.
pub(crate) fn lost(results: &[Result<Ack, Error>], broken: impl FnOnce() -> Error) -> Error {
    match results.last() {
        Some(Err(e @ Error::TooManyConnections(_))) => e.duplicate(),
        _ => broken(),
    }
}

/// `failure`, or the end of the connection when reading just stopped.
pub(crate) fn eof_or(failure: Option<std::io::Error>) -> std::io::Error {
    failure.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection before answering",
        )
    })
}

/// Reads one answer line.
pub(crate) fn parse(line: &str) -> Result<Ack, Error> {
    let unexpected = || Error::Protocol(line.chars().take(200).collect());
    let answer: Value = serde_json::from_str(line).map_err(|_| unexpected())?;
    match answer.get("ok") {
        Some(Value::Bool(true)) => {
            let id = answer
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(unexpected)?;
            let seq = answer
                .get("seq")
                .and_then(Value::as_u64)
                .ok_or_else(unexpected)?;
            let duplicate = answer
                .get("duplicate")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            Ok(Ack {
                id: id.to_owned(),
                seq,
                duplicate,
            })
        }
        Some(Value::Bool(false)) => {
            let error = answer.get("error").ok_or_else(unexpected)?;
            let code = error
                .get("code")
                .and_then(Value::as_str)
                .ok_or_else(unexpected)?;
            let text =
                |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
            let details = error
                .get("details")
                .and_then(Value::as_array)
                .map(|list| {
                    list.iter()
                        .map(|d| Violation {
                            path: text(d, "path"),
                            message: text(d, "message"),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let retry_after = error
                .get("retry_after_ms")
                .and_then(Value::as_u64)
                .map(Duration::from_millis);
            Err(from_code(
                code,
                Refusal {
                    message: text(error, "message"),
                    details,
                },
                retry_after,
            ))
        }
        _ => Err(unexpected()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let ack = parse(r#"{"ok":true,"id":"019a","seq":7}"#).unwrap();
        assert_eq!(
            (ack.id.as_str(), ack.seq, ack.duplicate),
            ("019a", 7, false)
        );
        assert!(
            parse(r#"{"ok":true,"id":"019a","seq":7,"duplicate":true}"#)
                .unwrap()
                .duplicate
        );
        let e = parse(
            r#"{"ok":false,"error":{"code":"invalid_payload","message":"bad","details":[{"path":"/payload/ip","message":"not an ip"}]}}"#,
        )
        .unwrap_err();
        assert!(matches!(&e, Error::InvalidPayload(r) if r.details[0].path == "/payload/ip"));
        assert!(e.is_invalid() && !e.is_retryable());
        let e = parse(r#"{"ok":false,"error":{"code":"rate_limited","message":"slow down","retry_after_ms":250}}"#)
            .unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_millis(250)));
        assert!(e.is_retryable());
        let e = parse(r#"{"ok":false,"error":{"code":"brand_new","message":"m"}}"#).unwrap_err();
        assert_eq!(e.code(), Some("brand_new"));
        assert!(matches!(parse("not json"), Err(Error::Protocol(_))));
        assert!(matches!(parse(r#"{"ok":true}"#), Err(Error::Protocol(_))));
    }

    #[test]
    fn every_code_maps_to_its_variant_and_back() {
        for code in [
            "invalid_json",
            "invalid_event",
            "unknown_type",
            "invalid_payload",
            "too_large",
            "unavailable",
            "forbidden",
            "too_many_connections",
            "rate_limited",
            "conflict",
        ] {
            let e = from_code(
                code,
                Refusal {
                    message: "m".into(),
                    details: vec![],
                },
                None,
            );
            assert!(
                !matches!(e, Error::Other { .. }),
                "{code} has its own variant"
            );
            assert_eq!(e.code(), Some(code));
            assert_eq!(e.duplicate().code(), Some(code));
        }
    }

    #[test]
    fn a_duplicated_untrusted_error_stays_untrusted() {
        let e = Error::Untrusted(crate::trust::Untrusted::Io {
            path: "/run/trail".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        });
        let copy = e.duplicate();
        assert!(
            matches!(&copy, Error::Untrusted(crate::trust::Untrusted::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound),
            "{copy:?}"
        );
        assert_eq!(copy.to_string(), e.to_string());
    }
}
