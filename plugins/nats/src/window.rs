//! The window of publishes awaiting JetStream's acknowledgement. Each record of a batch is published with core
//! NATS, its reply subject `<inbox>.<token>` on the connection's one wildcard subscription of `<inbox>.*`; the
//! stream answers there with a publish acknowledgement (`{"stream":…,"seq":…}`, `"duplicate":true` when it
//! already held the message id) or an error (`{"error":{"code":…,"err_code":…,"description":…}}`), or the server
//! with a "no responders" status when no stream captures the subject.
//!
//! Tokens grow across batches and connections of an instance, so an acknowledgement is matched to its record
//! whatever order it comes in; one that comes twice, or late for a record of an earlier write (after a timeout
//! ended it), is ignored. Records are confirmed in order: a write succeeds up to the first record that failed
//! or was not acknowledged within `ack_timeout`. Owns no connection and no error wording (`lib.rs` does both).

use std::time::Instant;

use async_nats::{
    HeaderMap, Message, StatusCode, Subscriber,
    header::{NATS_EXPECTED_STREAM, NATS_MESSAGE_ID},
};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use trail_plugin_api::Record;

use crate::{HEADER_ROOM, config::Settings, message_id};

/// How often (in publishes) acknowledgements already received are taken in while the window has room.
const DRAIN_EVERY: usize = 64;

/// Why a record was not confirmed.
#[derive(Debug, PartialEq, Eq)]
pub enum AckError {
    /// No acknowledgement within `ack_timeout`.
    TimedOut,
    /// The server answered that nothing listens on the subject: no stream captures it.
    NoStream,
    /// The client could not publish (the connection is closed) or the subscription ended.
    Lost(String),
    /// The stream answered with an error.
    Refused {
        /// JetStream's error code (`err_code`), 0 when absent.
        code: u64,
        /// Its description, with the status code.
        description: String,
    },
    /// The record is larger than the server's `max_payload`.
    TooLarge {
        /// The record's size.
        size: usize,
        /// The server's limit.
        max_payload: usize,
    },
}

/// Where a write stopped: the first record not confirmed, and why.
pub struct Stop {
    /// Its index in the batch; every record before it is acknowledged.
    pub index: usize,
    pub error: AckError,
}

/// One instance's publishing state, kept across writes.
pub struct Window {
    /// The token of the next record published.
    next_token: u64,
    /// Per record of the current write: whether it is acknowledged.
    acked: Vec<bool>,
    /// Per record published in the current write: when.
    sent_at: Vec<Instant>,
}

/// The current write's progress.
struct Progress {
    /// The token of the write's first record.
    base: u64,
    /// Records published, and acknowledged from the first on.
    published: usize,
    confirmed: usize,
    /// The first record that failed (the batch's length while none did), and why.
    stop: usize,
    error: Option<AckError>,
}

impl Progress {
    fn fail(&mut self, index: usize, error: AckError) {
        if index < self.stop {
            self.stop = index;
            self.error = Some(error);
        }
    }
}

impl Window {
    pub fn new() -> Self {
        Self {
            next_token: 0,
            acked: Vec::new(),
            sent_at: Vec::new(),
        }
    }

    /// Publishes `batch` with at most `settings.max_in_flight` records awaiting acknowledgement, and waits
    /// until each is acknowledged in order, or one fails.
    pub async fn publish(
        &mut self,
        settings: &Settings,
        client: &async_nats::Client,
        inbox: &str,
        acks: &mut Subscriber,
        batch: &[Record<'_>],
    ) -> Result<(), Stop> {
        let n = batch.len();
        let mut progress = Progress {
            base: self.next_token,
            published: 0,
            confirmed: 0,
            stop: n,
            error: None,
        };
        self.next_token += n as u64;
        self.acked.clear();
        self.acked.resize(n, false);
        self.sent_at.clear();
        let max_payload = client.server_info().max_payload;
        let window = settings.max_in_flight;
        let mut subject = String::new();
        loop {
            while progress.confirmed < progress.published && self.acked[progress.confirmed] {
                progress.confirmed += 1;
            }
            if progress.confirmed >= progress.stop {
                break;
            }
            if progress.published < progress.stop
                && progress.published - progress.confirmed < window
            {
                let index = progress.published;
                let record = &batch[index];
                let line = record.line.as_str();
                if max_payload > 0 && line.len() + HEADER_ROOM > max_payload {
                    progress.fail(
                        index,
                        AckError::TooLarge {
                            size: line.len(),
                            max_payload,
                        },
                    );
                    continue;
                }
                settings.subject.render(record, &mut subject);
                let mut headers = HeaderMap::new();
                headers.insert(NATS_MESSAGE_ID, message_id(record).as_str());
                if let Some(stream) = &settings.stream {
                    headers.insert(NATS_EXPECTED_STREAM, stream.name.as_str());
                }
                let reply = format!("{inbox}.{}", progress.base + index as u64);
                let sent = client.publish_with_reply_and_headers(
                    subject.clone(),
                    reply,
                    headers,
                    Bytes::copy_from_slice(line.as_bytes()),
                );
                match tokio::time::timeout(settings.ack_timeout, sent).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        progress.fail(index, AckError::Lost(e.to_string()));
                        continue;
                    }
                    Err(_) => {
                        progress.fail(index, AckError::TimedOut);
                        continue;
                    }
                }
                self.sent_at.push(Instant::now());
                progress.published += 1;
                if progress.published.is_multiple_of(DRAIN_EVERY) {
                    while let Some(Some(message)) = acks.next().now_or_never() {
                        self.take(inbox, &mut progress, &message);
                    }
                }
                continue;
            }
            // The window is full, or everything is published: wait for the oldest record's acknowledgement.
            let deadline = self.sent_at[progress.confirmed] + settings.ack_timeout;
            match tokio::time::timeout_at(deadline.into(), acks.next()).await {
                Ok(Some(message)) => self.take(inbox, &mut progress, &message),
                Ok(None) => progress.fail(
                    progress.confirmed,
                    AckError::Lost("the subscription of acknowledgements ended".into()),
                ),
                Err(_) => progress.fail(progress.confirmed, AckError::TimedOut),
            }
        }
        match progress.error {
            None => Ok(()),
            Some(error) => Err(Stop {
                index: progress.stop,
                error,
            }),
        }
    }

    /// Takes in one message of the inbox: the acknowledgement (or refusal) of a record of this write, or one to
    /// ignore (late, repeated, not a token).
    fn take(&mut self, inbox: &str, progress: &mut Progress, message: &Message) {
        let Some(token) = message
            .subject
            .as_str()
            .strip_prefix(inbox)
            .and_then(|t| t.strip_prefix('.'))
            .and_then(|t| t.parse::<u64>().ok())
        else {
            return;
        };
        let Some(index) = token
            .checked_sub(progress.base)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < progress.published)
        else {
            return;
        };
        if self.acked[index] {
            return;
        }
        match parse(message) {
            Ok(()) => self.acked[index] = true,
            Err(error) => progress.fail(index, error),
        }
    }
}

/// The acknowledgement's meaning. A publish acknowledgement is told from an error without parsing it whole:
/// JetStream's answers to a publish are `{"error":{…}}` or an object with `"seq"`.
fn parse(message: &Message) -> Result<(), AckError> {
    if message.status == Some(StatusCode::NO_RESPONDERS) {
        return Err(AckError::NoStream);
    }
    if let Some(status) = message.status
        && message.payload.is_empty()
    {
        return Err(AckError::Refused {
            code: 0,
            description: format!(
                "status {status}{}",
                message
                    .description
                    .as_deref()
                    .map(|d| format!(" {d}"))
                    .unwrap_or_default()
            ),
        });
    }
    let payload = &message.payload[..];
    if !contains(payload, b"\"error\"") && contains(payload, b"\"seq\"") {
        return Ok(());
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        error: Option<ApiError>,
    }
    #[derive(serde::Deserialize)]
    struct ApiError {
        #[serde(default)]
        code: u64,
        #[serde(default)]
        err_code: u64,
        #[serde(default)]
        description: String,
    }
    let excerpt = || String::from_utf8_lossy(&payload[..payload.len().min(200)]).into_owned();
    match serde_json::from_slice::<Answer>(payload) {
        Ok(Answer { error: Some(e) }) => Err(AckError::Refused {
            code: e.err_code,
            description: format!(
                "{} (status {}, error {})",
                e.description, e.code, e.err_code
            ),
        }),
        _ => Err(AckError::Refused {
            code: 0,
            description: format!("an answer that is no acknowledgement: {}", excerpt()),
        }),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(payload: &str, status: Option<u16>, expected: Result<(), &str>) {
        let message = Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            headers: None,
            status: status.map(|s| StatusCode::from_u16(s).unwrap()),
            description: None,
            length: payload.len(),
        };
        let got = parse(&message).map_err(|e| format!("{e:?}"));
        match expected {
            Ok(()) => assert_eq!(got, Ok(()), "{payload}"),
            Err(part) => {
                let got = got.expect_err(payload);
                assert!(got.contains(part), "{payload}: {got}");
            }
        }
    }

    #[test]
    fn acknowledgements() {
        check(r#"{"stream":"AUDIT","seq":12}"#, None, Ok(()));
        check(
            r#"{"stream":"AUDIT","seq":12,"duplicate":true}"#,
            None,
            Ok(()),
        );
        check(r#"{"stream":"AUDIT","domain":"hub","seq":3}"#, None, Ok(()));
        check(
            r#"{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"},"stream":"X","seq":0}"#,
            None,
            Err(
                "code: 10060, description: \"expected stream does not match (status 400, error 10060)\"",
            ),
        );
        check(
            r#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}"#,
            None,
            Err("code: 10054"),
        );
        check("", Some(503), Err("NoStream"));
        check("", Some(408), Err("status 408"));
        check("hello", None, Err("no acknowledgement: hello"));
        check(r#"{"stream":"AUDIT"}"#, None, Err("no acknowledgement"));
    }
}
