//! The submission protocol: what a request line may contain and how responses are written.
//!
//! Owns the wire format only (public API, documented in ARCHITECTURE.md): parsing and checking the request
//! envelope against `schemas/event.schema.json`, and encoding the response lines. It knows nothing of sockets.
//!
//! What is stored is what was sent. The payload is never parsed into a tree and written out again: its bytes are
//! copied through, token by token, without insignificant whitespace ([`json_text`]), so numbers keep every digit
//! and strings every escape. An object with a repeated key, anywhere in the line, is refused as `invalid_json`.
//!
//! A parsed request borrows from its line: strings without escapes ([`Str`]) and a payload without whitespace
//! between its tokens are not copied; a request costs allocations only for what had to be rewritten.

mod fast;
pub mod instance;
mod json_text;

use std::borrow::Cow;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

pub use json_text::MAX_DEPTH;
pub(crate) use json_text::number_end;

/// The JSON Schema of a request line.
pub const EVENT_SCHEMA: &str = include_str!("../../schemas/event.schema.json");

/// A request: one event as a client submits it, borrowing from its line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request<'a> {
    /// Name of the event type.
    #[serde(rename = "type", borrow)]
    pub event_type: Str<'a>,
    /// Who did it.
    #[serde(default, borrow)]
    pub actor: Option<Actor<'a>>,
    /// What it was done to.
    #[serde(default, borrow)]
    pub target: Option<Target<'a>>,
    /// Human-readable description.
    #[serde(default, borrow)]
    pub message: Option<Str<'a>>,
    /// How it ended.
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// Type-specific details.
    #[serde(default, borrow)]
    pub payload: Option<Payload<'a>>,
    /// When it happened, RFC 3339.
    #[serde(default, borrow)]
    pub occurred_at: Option<Str<'a>>,
    /// The client's name for this submission: a repeat with the same key from the same uid, within the daemon's
    /// window, is answered with the first one's `id` and `seq` instead of being stored again.
    #[serde(default, borrow)]
    pub idempotency_key: Option<Str<'a>>,
}

/// A JSON string of a request: borrowed from the line when it has no escapes, unescaped into its own buffer
/// otherwise.
#[derive(Clone, PartialEq, Eq)]
pub struct Str<'a>(Cow<'a, str>);

/// As the text's own: `{:?}` in messages shows a quoted string.
impl std::fmt::Debug for Str<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl<'a> Str<'a> {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Appends the string as JSON, quoted and escaped exactly as `serde_json` writes it.
    ///
    /// A borrowed string came from JSON text without a single escape, so it holds no `"`, `\` or control
    /// character (JSON text cannot hold those unescaped) and `serde_json` would write it unchanged: it is copied
    /// between quotes. A string that had escapes is written by `serde_json`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match &self.0 {
            Cow::Borrowed(s) => {
                out.push(b'"');
                out.extend_from_slice(s.as_bytes());
                out.push(b'"');
            }
            Cow::Owned(s) => {
                serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail")
            }
        }
    }
}

impl From<String> for Str<'_> {
    fn from(s: String) -> Self {
        Str(Cow::Owned(s))
    }
}

impl std::ops::Deref for Str<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Str<'a>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s)))
            }
        }
        d.deserialize_str(Visitor)
    }
}

impl Serialize for Str<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Longest `idempotency_key`, in bytes of UTF-8.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// A payload as it is stored: the JSON text the client sent, without insignificant whitespace, every number and
/// string byte for byte as written (borrowed from the line when it had no such whitespace), and the same payload
/// read for its schema check ([`instance::Doc`]), both from one pass over the text. Reading one refuses repeated
/// keys, too deep nesting and lone surrogates.
#[derive(Debug)]
pub struct Payload<'a> {
    text: Cow<'a, str>,
    doc: Result<instance::Doc<'a>, String>,
}

/// Equal when the stored texts are.
impl PartialEq for Payload<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Payload<'_> {}

impl<'a> Payload<'a> {
    /// The compact JSON text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when it is a JSON object (the envelope requires one).
    pub fn is_object(&self) -> bool {
        self.text.starts_with('{')
    }

    /// The payload as its schema check reads it, or why it cannot be read so (a number `serde_json` accepted but
    /// cannot give as a number, which no test has found).
    pub fn doc(&self) -> Result<&instance::Doc<'a>, &str> {
        self.doc.as_ref().map_err(String::as_str)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Payload<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Payload<'a>, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?.get();
        // The common case in one pass: the text read for the schema check, found compact and without anything
        // `json_text` refuses, is stored as it is.
        let read = instance::Doc::read(raw, 1);
        if let Ok((doc, true)) = read {
            return Ok(Payload {
                text: Cow::Borrowed(raw),
                doc: Ok(doc),
            });
        }
        // Whitespace to leave out, or something refused: `json_text` compacts it or says exactly what is wrong.
        let mut out = Vec::with_capacity(raw.len());
        json_text::compact(raw, "/payload", 1, json_text::Numbers::AsWritten, &mut out)
            .map_err(serde::de::Error::custom)?;
        // Only whitespace between tokens was left out, so the text is still UTF-8.
        let text = String::from_utf8(out).map_err(serde::de::Error::custom)?;
        Ok(Payload {
            text: Cow::Owned(text),
            doc: read.map(|(doc, _)| doc),
        })
    }
}

/// Who did it. Field order here is the order in stored records.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Actor<'a> {
    /// Stable identifier.
    #[serde(borrow)]
    pub id: Str<'a>,
    /// Display name.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub name: Option<Str<'a>>,
    /// Kind of actor (user, service, ...).
    #[serde(
        rename = "type",
        default,
        borrow,
        skip_serializing_if = "Option::is_none"
    )]
    pub kind: Option<Str<'a>>,
    /// Network address the action came from.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Str<'a>>,
}

impl Actor<'_> {
    /// Appends the stored form: what `serde_json` writes for it (fields in declaration order, absent ones left
    /// out), without its serializer.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        write_object(
            out,
            &[
                ("id", Some(&self.id)),
                ("name", self.name.as_ref()),
                ("type", self.kind.as_ref()),
                ("ip", self.ip.as_ref()),
            ],
        );
    }
}

/// What it was done to. Field order here is the order in stored records.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Target<'a> {
    /// Kind of object.
    #[serde(
        rename = "type",
        default,
        borrow,
        skip_serializing_if = "Option::is_none"
    )]
    pub kind: Option<Str<'a>>,
    /// Stable identifier.
    #[serde(borrow)]
    pub id: Str<'a>,
    /// Display name.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub name: Option<Str<'a>>,
}

impl Target<'_> {
    /// Appends the stored form, as [`Actor::write_json`].
    pub fn write_json(&self, out: &mut Vec<u8>) {
        write_object(
            out,
            &[
                ("type", self.kind.as_ref()),
                ("id", Some(&self.id)),
                ("name", self.name.as_ref()),
            ],
        );
    }
}

/// Appends `{"key":"value",...}` for the fields that are set; keys need no escaping.
fn write_object(out: &mut Vec<u8>, fields: &[(&str, Option<&Str<'_>>)]) {
    out.push(b'{');
    let mut first = true;
    for (key, value) in fields {
        let Some(value) = value else { continue };
        if !first {
            out.push(b',');
        }
        first = false;
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        value.write_json(out);
    }
    out.push(b'}');
}

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It worked.
    Success,
    /// It was attempted and failed.
    Failure,
    /// It was refused by policy.
    Denied,
}

impl Outcome {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
        }
    }
}

/// Why a request was refused; the wire names are a public API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The line is not JSON (or not UTF-8).
    InvalidJson,
    /// The envelope violates `schemas/event.schema.json`.
    InvalidEvent,
    /// The event type is not defined.
    UnknownType,
    /// The payload violates the type's payload schema.
    InvalidPayload,
    /// The line is longer than the configured limit.
    TooLarge,
    /// The daemon cannot take the event now (disk full, shutting down); retry later.
    Unavailable,
    /// The client may not submit this event (e.g. one of the daemon's own types); retrying does not help.
    Forbidden,
    /// The daemon has `limits.max_connections` connections open: sent once, then the connection is closed.
    TooManyConnections,
    /// The `idempotency_key` was used before, by the same uid within the window, for a different event; nothing
    /// was stored. Retrying the same request does not help.
    Conflict,
    /// The peer's uid submitted more events than `limits.rate_per_uid` allows; the answer's `retry_after_ms`
    /// says when one more will be taken.
    RateLimited,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidEvent => "invalid_event",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidPayload => "invalid_payload",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Conflict => "conflict",
            ErrorCode::RateLimited => "rate_limited",
        }
    }

    /// The position of this code in [`ErrorCode::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Every code, in the order of README's table.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidEvent,
        ErrorCode::UnknownType,
        ErrorCode::InvalidPayload,
        ErrorCode::TooLarge,
        ErrorCode::Unavailable,
        ErrorCode::Forbidden,
        ErrorCode::TooManyConnections,
        ErrorCode::Conflict,
        ErrorCode::RateLimited,
    ];
}

/// One violation found in a request (its envelope or, by an event type's schema, its payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer into the request, e.g. `/payload/ip`.
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

/// A refused request, ready to be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
    /// Every violation found, when there are several.
    pub details: Vec<Violation>,
    /// For `rate_limited`: milliseconds until the daemon takes another event from this uid.
    pub retry_after_ms: Option<u64>,
}

impl Rejection {
    /// A rejection without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
            details: Vec::new(),
            retry_after_ms: None,
        }
    }

    /// A rejection with `details`.
    pub fn with_details(
        code: ErrorCode,
        message: impl Into<String>,
        details: Vec<Violation>,
    ) -> Rejection {
        Rejection {
            details,
            ..Rejection::new(code, message)
        }
    }

    /// Appends the response line, newline included.
    pub fn encode(&self, out: &mut Vec<u8>) {
        #[derive(Serialize)]
        struct Detail<'a> {
            path: &'a str,
            message: &'a str,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            code: &'a str,
            message: &'a str,
            details: Vec<Detail<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            retry_after_ms: Option<u64>,
        }
        #[derive(Serialize)]
        struct Response<'a> {
            ok: bool,
            error: Body<'a>,
        }
        let response = Response {
            ok: false,
            error: Body {
                code: self.code.as_str(),
                message: &self.message,
                details: self
                    .details
                    .iter()
                    .map(|d| Detail {
                        path: &d.path,
                        message: &d.message,
                    })
                    .collect(),
                retry_after_ms: self.retry_after_ms,
            },
        };
        serde_json::to_writer(&mut *out, &response).expect("serializing to a Vec cannot fail");
        out.push(b'\n');
    }
}

/// Appends the success response line for an event stored as `seq` with `id`, newline included.
pub fn encode_ack(id: &str, seq: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"ok\":true,\"id\":\"");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    out.extend_from_slice(b"}\n");
}

/// Appends the answer to a repeated submission (same `idempotency_key`, same event) that stored nothing: the
/// first submission's `id` and `seq` and `"duplicate":true`, newline included.
pub fn encode_duplicate(id: &str, seq: u64, out: &mut Vec<u8>) {
    encode_ack(id, seq, out);
    out.truncate(out.len() - 2);
    out.extend_from_slice(b",\"duplicate\":true}\n");
}

/// A request that passed the envelope checks; `occurred_at` is parsed.
#[derive(Debug)]
pub struct Checked<'a> {
    /// The request.
    pub request: Request<'a>,
    /// `occurred_at`, when given.
    pub occurred_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Parses one request line (without its newline) and checks its envelope.
///
/// The fast path reads the usual line in one pass of its own (`fast`), any other deserializes straight into
/// [`Request`] (the payload's text is borrowed and read for its schema check, not parsed into a `Value`); only when
/// that fails is the whole line checked for repeated keys and then against the envelope schema, so
/// that a refused request lists every violation rather than the first.
pub fn parse(line: &[u8]) -> Result<Checked<'_>, Rejection> {
    // UTF-8 checked once for the whole line (a fast pass over ASCII), not string by string while parsing.
    let Ok(text) = std::str::from_utf8(line) else {
        return Err(syntax_error(
            line,
            &serde::de::Error::custom("invalid UTF-8"),
        ));
    };
    // The usual line in one pass of its own; any other through `serde_json` (see `fast`).
    let read = fast::parse(text).map_or_else(|| serde_json::from_str::<Request<'_>>(text), Ok);
    let first_problem = match read {
        Ok(request) => match check(request) {
            Ok(checked) => return Ok(checked),
            Err(v) => v,
        },
        Err(e) if e.classify() == serde_json::error::Category::Data => Violation {
            path: String::new(),
            message: e.to_string(),
        },
        Err(e) => return Err(syntax_error(line, &e)),
    };
    let value = slow_parse(line)?;
    let mut details: Vec<Violation> = envelope_validator()
        .iter_errors(&value)
        .map(|e| Violation {
            path: e.instance_path().to_string(),
            message: e.to_string(),
        })
        .collect();
    if details.is_empty() {
        details.push(first_problem);
    }
    let message = match details.as_slice() {
        [only] if only.path.is_empty() => format!("invalid event: {}", only.message),
        [only] => format!("invalid event: {}: {}", only.path, only.message),
        many => format!("invalid event: {} problems", many.len()),
    };
    Err(Rejection::with_details(
        ErrorCode::InvalidEvent,
        message,
        details,
    ))
}

/// Checks what serde cannot express: non-empty ids, an object payload, an RFC 3339 time.
fn check(request: Request<'_>) -> Result<Checked<'_>, Violation> {
    let violation = |path: &str, message: &str| Violation {
        path: path.to_owned(),
        message: message.to_owned(),
    };
    if request.event_type.is_empty() {
        return Err(violation("/type", "must not be empty"));
    }
    if request.actor.as_ref().is_some_and(|a| a.id.is_empty()) {
        return Err(violation("/actor/id", "must not be empty"));
    }
    if request.target.as_ref().is_some_and(|t| t.id.is_empty()) {
        return Err(violation("/target/id", "must not be empty"));
    }
    if request.payload.as_ref().is_some_and(|p| !p.is_object()) {
        return Err(violation("/payload", "must be a JSON object"));
    }
    if let Some(key) = &request.idempotency_key
        && !(1..=MAX_IDEMPOTENCY_KEY_BYTES).contains(&key.len())
    {
        return Err(violation(
            "/idempotency_key",
            &format!(
                "must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes of UTF-8, not {}",
                key.len()
            ),
        ));
    }
    let occurred_at = match &request.occurred_at {
        None => None,
        Some(text) => Some(
            chrono::DateTime::parse_from_rfc3339(text.as_str())
                .map_err(|e| {
                    violation(
                        "/occurred_at",
                        &format!("{text:?} is not an RFC 3339 time: {e}"),
                    )
                })?
                .to_utc(),
        ),
    };
    Ok(Checked {
        request,
        occurred_at,
    })
}

/// Reads a line that did not deserialize into a [`Request`]: refuses what is not JSON and any object with a
/// repeated key, then reads it as a tree (numbers beyond a 64-bit float bounded) for the envelope schema.
fn slow_parse(line: &[u8]) -> Result<Value, Rejection> {
    serde_json::from_slice::<serde::de::IgnoredAny>(line).map_err(|e| syntax_error(line, &e))?;
    let text = std::str::from_utf8(line)
        .map_err(|_| syntax_error(line, &serde::de::Error::custom("invalid UTF-8")))?;
    let mut bounded = Vec::with_capacity(line.len());
    if let Err(p) = json_text::compact(text, "", 0, json_text::Numbers::Finite, &mut bounded) {
        return Err(Rejection::with_details(
            ErrorCode::InvalidJson,
            format!("line is not acceptable JSON: {p}"),
            vec![Violation {
                path: p.path,
                message: p.message,
            }],
        ));
    }
    serde_json::from_slice(&bounded).map_err(|e| syntax_error(line, &e))
}

fn syntax_error(line: &[u8], e: &serde_json::Error) -> Rejection {
    if let Err(u) = std::str::from_utf8(line) {
        return Rejection::new(
            ErrorCode::InvalidJson,
            format!(
                "line is not valid UTF-8: invalid byte at offset {}",
                u.valid_up_to()
            ),
        );
    }
    Rejection::new(
        ErrorCode::InvalidJson,
        format!("line is not valid JSON: {e}"),
    )
}

fn envelope_validator() -> &'static jsonschema::Validator {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    V.get_or_init(|| {
        let schema: Value =
            serde_json::from_str(EVENT_SCHEMA).expect("embedded event schema is JSON");
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("embedded event schema compiles")
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small seeded generator (xorshift64) for the generated-input tests of this module and its children:
    /// `next(n)` gives a number below `n`, the same sequence for the same seed.
    pub(crate) fn xorshift(seed: u64) -> impl FnMut(usize) -> usize {
        let mut state = seed;
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        }
    }

    /// Parses `line` and renders the outcome as `ok` or `code: path, path, ...`.
    fn outcome(line: &str) -> String {
        match parse(line.as_bytes()) {
            Ok(_) => "ok".into(),
            Err(r) => {
                let mut paths: Vec<_> = r.details.iter().map(|d| d.path.as_str()).collect();
                paths.sort();
                format!("{}: {}", r.code.as_str(), paths.join(", "))
            }
        }
    }

    #[test]
    fn requests() {
        let check = |line: &str, expected: &str| assert_eq!(outcome(line), expected, "{line}");
        check(r#"{"type":"user_login"}"#, "ok");
        check(
            r#"{"type":"user_login","actor":{"id":"u-1","name":"alice","type":"user","ip":"10.0.0.7"},"target":{"type":"project","id":"p-9","name":"billing"},"message":"m","outcome":"denied","payload":{"a":1},"occurred_at":"2026-11-22T10:00:00.123+01:00"}"#,
            "ok",
        );
        check(r#"{"type":"#, "invalid_json: ");
        check("not json", "invalid_json: ");
        check(r#"{"type":"x"} trailing"#, "invalid_json: ");
        check(r#"[1,2]"#, "invalid_event: ");
        check(r#"{}"#, "invalid_event: ");
        check(r#"{"type":""}"#, "invalid_event: /type");
        check(r#"{"type":"x","colour":"blue"}"#, "invalid_event: ");
        check(r#"{"type":"x","actor":{}}"#, "invalid_event: /actor");
        check(
            r#"{"type":"x","actor":{"id":""}}"#,
            "invalid_event: /actor/id",
        );
        check(
            r#"{"type":"x","actor":{"id":"a","email":"e"}}"#,
            "invalid_event: /actor",
        );
        check(
            r#"{"type":"x","target":{"name":"n"}}"#,
            "invalid_event: /target",
        );
        check(r#"{"type":"x","payload":[1]}"#, "invalid_event: /payload");
        check(
            r#"{"type":"x","outcome":"maybe"}"#,
            "invalid_event: /outcome",
        );
        check(
            r#"{"type":"x","occurred_at":"yesterday"}"#,
            "invalid_event: /occurred_at",
        );
        check(
            r#"{"type":"x","occurred_at":"2026-11-22"}"#,
            "invalid_event: /occurred_at",
        );
        check(r#"{"type":"x","idempotency_key":"k-1"}"#, "ok");
        check(
            &format!(r#"{{"type":"x","idempotency_key":"{}"}}"#, "k".repeat(128)),
            "ok",
        );
        check(
            &format!(r#"{{"type":"x","idempotency_key":"{}"}}"#, "k".repeat(129)),
            "invalid_event: /idempotency_key",
        );
        // Bytes, not characters: 65 two-byte characters are 130 bytes.
        check(
            &format!(r#"{{"type":"x","idempotency_key":"{}"}}"#, "é".repeat(65)),
            "invalid_event: /idempotency_key",
        );
        check(
            r#"{"type":"x","idempotency_key":""}"#,
            "invalid_event: /idempotency_key",
        );
        check(
            r#"{"type":"x","idempotency_key":7}"#,
            "invalid_event: /idempotency_key",
        );
        check(
            r#"{"type":7,"outcome":"maybe","payload":"p","actor":{"id":1}}"#,
            "invalid_event: /actor/id, /outcome, /payload, /type",
        );
    }

    /// Parses `line` and renders the stored payload, or `code: message [path]` when refused.
    fn stored(line: &str) -> String {
        match parse(line.as_bytes()) {
            Ok(c) => c
                .request
                .payload
                .map_or("-".into(), |p| p.as_str().to_owned()),
            Err(r) => {
                let paths: Vec<_> = r.details.iter().map(|d| d.path.as_str()).collect();
                format!("{}: {} {paths:?}", r.code.as_str(), r.message)
            }
        }
    }

    /// The envelope's strings are written as `serde_json` writes them, whether they were borrowed from the line
    /// (no escapes) or unescaped; payloads without whitespace are borrowed, others compacted.
    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let check = |line: &str, borrowed: bool| {
            let c = parse(line.as_bytes()).unwrap_or_else(|r| panic!("{line}: {r:?}"));
            let r = &c.request;
            let (a, t) = (r.actor.as_ref().unwrap(), r.target.as_ref().unwrap());
            let mut out = Vec::new();
            a.write_json(&mut out);
            assert_eq!(out, serde_json::to_vec(a).unwrap(), "{line}");
            out.clear();
            t.write_json(&mut out);
            assert_eq!(out, serde_json::to_vec(t).unwrap(), "{line}");
            let m = r.message.as_ref().unwrap();
            out.clear();
            m.write_json(&mut out);
            assert_eq!(out, serde_json::to_vec(m.as_str()).unwrap(), "{line}");
            assert_eq!(
                matches!(a.id.0, Cow::Borrowed(_)),
                borrowed,
                "{line}: actor.id borrowed"
            );
            let p = r.payload.as_ref().unwrap();
            assert_eq!(
                matches!(p.text, Cow::Borrowed(_)),
                !line.contains(": "),
                "{line}: payload borrowed"
            );
        };
        check(
            r#"{"type":"x","actor":{"id":"u-1","ip":"10.0.0.1"},"target":{"type":"t","id":"p-1"},"message":"café /x","payload":{"a":1}}"#,
            true,
        );
        check(
            r#"{"type":"x","actor":{"ip":"::1","type":"svc","name":"n","id":"u-\"1\""},"target":{"name":"N","id":"p\\1"},"message":"tab\there","payload":{"a": 1}}"#,
            false,
        );
        check(
            r#"{"type":"x","actor":{"id":"\u00e9\u0001\/\ud83d\ude00"},"target":{"id":"\u007f"},"message":"\u2028\n\r\b\f","payload":{"s":"\u00e9"}}"#,
            false,
        );
    }

    #[test]
    fn payloads_are_stored_as_sent() {
        let check = |payload: &str, expected: &str| {
            let line = format!(r#"{{"type":"x","payload":{payload}}}"#);
            assert_eq!(stored(&line), expected, "{line}");
        };
        check(
            r#"{"n":123456789012345678901234567890}"#,
            r#"{"n":123456789012345678901234567890}"#,
        );
        check(
            r#"{"n":-123456789012345678901234567890}"#,
            r#"{"n":-123456789012345678901234567890}"#,
        );
        check(
            r#"{"n":0.1000000000000000055511151231257827}"#,
            r#"{"n":0.1000000000000000055511151231257827}"#,
        );
        check(r#"{"n":1E400,"m":-1e-400}"#, r#"{"n":1E400,"m":-1e-400}"#);
        check(
            r#"{"n":-0,"m":1.50,"o":2e+3}"#,
            r#"{"n":-0,"m":1.50,"o":2e+3}"#,
        );
        check(
            r#"{"s":"\u00e9\/é\ud83d\ude00"}"#,
            r#"{"s":"\u00e9\/é\ud83d\ude00"}"#,
        );
        check(
            "{ \"a\" : [ 1 ,\t2 ] , \"b\" : { } }",
            r#"{"a":[1,2],"b":{}}"#,
        );
        check("null", "-");
        check(
            r#"[1]"#,
            r#"invalid_event: invalid event: /payload: [1] is not of type "object" ["/payload"]"#,
        );
    }

    #[test]
    fn repeated_keys_are_refused_anywhere_in_the_line() {
        let check = |line: &str, expected: &str| assert_eq!(stored(line), expected, "{line}");
        let refused = |at: &str, key: &str| {
            let place = if at.is_empty() {
                "the top level".to_owned()
            } else {
                at.to_owned()
            };
            format!(
                "invalid_json: line is not acceptable JSON: duplicate key \"{key}\" at {place} [\"{at}\"]"
            )
        };
        check(
            r#"{"type":"x","payload":{"a":1,"a":2}}"#,
            &refused("/payload", "a"),
        );
        check(
            r#"{"type":"x","payload":{"a":1,"\u0061":2}}"#,
            &refused("/payload", "a"),
        );
        check(
            r#"{"type":"x","payload":{"x":{"y":[{"a":1},{"a":1,"a":1}]}}}"#,
            &refused("/payload/x/y/1", "a"),
        );
        check(r#"{"type":"x","type":"y"}"#, &refused("", "type"));
        check(r#"{"type":"x","\u0074ype":"x"}"#, &refused("", "type"));
        check(
            r#"{"type":"x","actor":{"id":"a","id":"b"}}"#,
            &refused("/actor", "id"),
        );
        check(
            r#"{"type":"x","target":{"id":"a","name":"n","\u006eame":"m"}}"#,
            &refused("/target", "name"),
        );
        check(
            r#"{"type":"x","colour":1,"colour":2}"#,
            &refused("", "colour"),
        );
        check(
            r#"{"type":"x","actor":{"id":"a"},"actor":{"id":"a"}}"#,
            &refused("", "actor"),
        );
        check(
            r#"{"type":"x","payload":{"s":"\ud800"}}"#,
            "invalid_json: line is not acceptable JSON: a string holds half of a UTF-16 surrogate pair (\\ud800-\\udfff), which is not Unicode text at /payload/s [\"/payload/s\"]",
        );
        // The same key in sibling objects is no repetition.
        check(
            r#"{"type":"x","actor":{"id":"a"},"target":{"id":"a"},"payload":{"id":"a","o":{"id":"a"}}}"#,
            r#"{"id":"a","o":{"id":"a"}}"#,
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let line = |n: usize| {
            format!(
                r#"{{"type":"x","payload":{{"a":{}{}}}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert!(parse(line(MAX_DEPTH - 2).as_bytes()).is_ok());
        let r = parse(line(MAX_DEPTH - 1).as_bytes()).unwrap_err();
        assert_eq!(r.code, ErrorCode::InvalidJson, "{r:?}");
        assert!(
            r.message.contains("nesting deeper than 127 levels"),
            "{r:?}"
        );
    }

    #[test]
    fn invalid_utf8_names_the_offset() {
        let r = parse(b"{\"type\":\"ab\xc3\x28\"}").unwrap_err();
        assert_eq!(r.code, ErrorCode::InvalidJson);
        assert!(
            r.message.contains("UTF-8") && r.message.contains("offset 11"),
            "{}",
            r.message
        );
    }

    #[test]
    fn answers_match_their_schema_and_every_code_is_listed() {
        let schema: Value =
            serde_json::from_str(include_str!("../../schemas/answer.schema.json")).unwrap();
        let listed = &schema["oneOf"][1]["properties"]["error"]["properties"]["code"]["enum"];
        let codes: Vec<Value> = ErrorCode::ALL.iter().map(|c| c.as_str().into()).collect();
        assert_eq!(listed, &Value::Array(codes));
        let validator = jsonschema::draft202012::new(&schema).unwrap();
        let mut out = Vec::new();
        encode_ack("019ab7c4-0000-7000-8000-000000000000", 7, &mut out);
        encode_duplicate("019ab7c4-0000-7000-8000-000000000000", 7, &mut out);
        for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(code.index(), i, "{code:?}");
            Rejection {
                retry_after_ms: (code == ErrorCode::RateLimited).then_some(100),
                ..Rejection::new(code, "m")
            }
            .encode(&mut out);
        }
        for line in String::from_utf8(out).unwrap().lines() {
            let answer: Value = serde_json::from_str(line).unwrap();
            assert!(validator.is_valid(&answer), "{line}");
        }
    }

    #[test]
    fn responses() {
        let mut out = Vec::new();
        encode_ack("0192", 42, &mut out);
        encode_duplicate("0192", 42, &mut out);
        Rejection::with_details(
            ErrorCode::InvalidPayload,
            "bad \"ip\"",
            vec![Violation {
                path: "/payload/ip".into(),
                message: "not an ipv4".into(),
            }],
        )
        .encode(&mut out);
        Rejection {
            retry_after_ms: Some(250),
            ..Rejection::new(ErrorCode::RateLimited, "slow down")
        }
        .encode(&mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"ok": true, "id": "0192", "seq": 42})
        );
        assert_eq!(
            lines[1],
            serde_json::json!({"ok": true, "id": "0192", "seq": 42, "duplicate": true})
        );
        assert_eq!(
            lines[2],
            serde_json::json!({"ok": false, "error": {"code": "invalid_payload", "message": "bad \"ip\"",
                "details": [{"path": "/payload/ip", "message": "not an ipv4"}]}})
        );
        assert_eq!(
            lines[3],
            serde_json::json!({"ok": false, "error": {"code": "rate_limited", "message": "slow down",
                "details": [], "retry_after_ms": 250}})
        );
    }
}
