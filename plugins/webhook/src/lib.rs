//! `webhook`: a trail sink plugin that POSTs audit events to an HTTP or HTTPS endpoint, as
//! batches of stored JSON records or as Slack messages, each request optionally signed with
//! HMAC-SHA256. See README.md for the configuration and the receiver's side.
//!
//! This module owns delivery: building request bodies, sending them with a blocking HTTP
//! client on the sink's own thread, and turning answers into the plugin API's error kinds
//! (retryable, or permanent for the one event a server refuses).

mod config;
mod sign;
mod slack;

use std::{
    io::{self, Read},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use trail_plugin_api::{Host, Record, Sink, SinkError, WriteError};
use ureq::{
    Agent,
    http::{Response, StatusCode},
    tls::{RootCerts, TlsConfig},
};

use crate::{
    config::{Format, Settings},
    sign::Signer,
};

/// How much of a refusing server's answer goes into the error message.
const BODY_EXCERPT: usize = 200;
/// Most bytes of a successful answer read (so the connection can be reused); the rest is
/// dropped with the connection.
const DRAIN_LIMIT: u64 = 1 << 20;

struct Webhook {
    host: Host,
    settings: Settings,
    agent: Agent,
    signer: Option<Signer>,
    /// The request body being built, kept to reuse its allocation.
    body: Vec<u8>,
    /// When the server asked us to come back (`Retry-After`), capped by `max_retry_after`.
    not_before: Option<Instant>,
}

/// Why one request did not get its events delivered.
enum Failure {
    /// Worth trying again later.
    Retry(String),
    /// The server refused the request's content (400, 413, 422): with several events in it, the
    /// culprit may be found by sending fewer.
    Content(String),
    /// The server refused the request for another reason (any other 4xx).
    Refused(String),
}

impl Webhook {
    fn new(config_json: &str, host: Host) -> Result<Self, SinkError> {
        let settings = Settings::parse(config_json)?;
        let mut tls = TlsConfig::builder();
        if let Some(roots) = &settings.roots {
            tls = tls.root_certs(RootCerts::Specific(roots.clone()));
        }
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .timeout_global(Some(settings.timeout))
            .user_agent(concat!("trail-webhook/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build()
            .into();
        let signer = settings.signing.as_ref().map(|(key, _)| Signer::new(key));
        host.info(&format!(
            "posting to {} as {}{}{}",
            settings.endpoint,
            match (settings.format, settings.batch) {
                (Format::Json, true) =>
                    format!("JSON arrays of up to {} events", settings.max_events),
                (Format::Json, false) => "one JSON event per request".to_owned(),
                (Format::Slack, true) =>
                    format!("Slack messages of up to {} events", settings.max_events),
                (Format::Slack, false) => "one Slack message per event".to_owned(),
            },
            match &settings.signing {
                Some((_, header)) => format!(", signed ({header})"),
                None => String::new(),
            },
            if settings.roots.is_some() {
                ", trusting only the CAs of ca_file"
            } else {
                ""
            },
        ));
        Ok(Self {
            host,
            settings,
            agent,
            signer,
            body: Vec::new(),
            not_before: None,
        })
    }

    /// Honours a `Retry-After` from the previous write: trail has already waited its own
    /// backoff, so only the rest of the server's delay is slept here.
    fn wait_for_server(&mut self) {
        if let Some(at) = self.not_before.take() {
            let wait = at.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                self.host.debug(&format!(
                    "waiting {wait:.1?} more, as the server asked with Retry-After"
                ));
                thread::sleep(wait);
            }
        }
    }

    /// Sends `records` as requests of at most `max_events`, stopping at the first failure.
    fn deliver(&mut self, records: &[Record<'_>]) -> Result<(), WriteError> {
        let mut delivered = 0;
        while delivered < records.len() {
            let end = records.len().min(delivered + self.settings.max_events);
            let chunk = &records[delivered..end];
            match self.post(chunk) {
                Ok(()) => delivered = end,
                Err(Failure::Content(message)) if chunk.len() > 1 => {
                    // Find the first event the server refuses; the ones before it get delivered.
                    self.host.debug(&format!(
                        "{message}: narrowing down the {} events of the request",
                        chunk.len()
                    ));
                    match self.narrow(chunk, message) {
                        Narrowed::Delivered(n) => delivered += n,
                        Narrowed::Failed(n, failure) => {
                            return Err(self.failed(records, delivered + n, failure));
                        }
                    }
                }
                Err(failure) => return Err(self.failed(records, delivered, failure)),
            }
        }
        Ok(())
    }

    /// `records` were refused as one request for their content (`refusal`): delivers the
    /// longest accepted prefix and finds the first event refused on its own. The first event is
    /// tried alone first, so that a server refusing everything costs two requests per event;
    /// otherwise the rest is bisected.
    fn narrow(&mut self, records: &[Record<'_>], mut refusal: String) -> Narrowed {
        match self.post(&records[..1]) {
            Ok(()) => {}
            Err(failure) => return Narrowed::Failed(0, failure),
        }
        if records.len() == 2 {
            return match self.post(&records[1..]) {
                Ok(()) => Narrowed::Delivered(2),
                Err(failure) => Narrowed::Failed(1, failure),
            };
        }
        // From here, records[..start] are delivered, and once a request has been refused,
        // records[start..end] is the smallest range refused as a whole.
        let (mut start, mut end) = (1, records.len());
        while end - start > 1 {
            let mid = start + (end - start) / 2;
            match self.post(&records[start..mid]) {
                Ok(()) => {
                    start = mid;
                    match self.post(&records[start..end]) {
                        // Refused together, accepted in parts (a size limit, say): the events
                        // after `end` have not been tried; the caller goes on with them.
                        Ok(()) => return Narrowed::Delivered(end),
                        Err(Failure::Content(message)) => refusal = message,
                        Err(failure) => return Narrowed::Failed(start, failure),
                    }
                }
                Err(Failure::Content(message)) => {
                    end = mid;
                    refusal = message;
                }
                Err(failure) => return Narrowed::Failed(start, failure),
            }
        }
        Narrowed::Failed(start, Failure::Content(refusal))
    }

    fn failed(&self, records: &[Record<'_>], delivered: usize, failure: Failure) -> WriteError {
        let error = match failure {
            Failure::Retry(message) => SinkError::retryable(message),
            Failure::Content(message) | Failure::Refused(message) => {
                let record = &records[delivered];
                SinkError::permanent(format!(
                    "{message} (event seq {}, id {}, type {})",
                    record.seq, record.id, record.event_type
                ))
            }
        };
        // trail logs the error it gets back; this adds where in the write it happened.
        self.host.debug(&format!(
            "{error} (after {delivered} of {} delivered)",
            records.len()
        ));
        WriteError::new(delivered as u64, error)
    }

    /// One request with `records`.
    fn post(&mut self, records: &[Record<'_>]) -> Result<(), Failure> {
        self.build_body(records);
        let mut request = self
            .agent
            .post(&self.settings.url)
            .header("content-type", "application/json");
        for (name, value) in &self.settings.headers {
            request = request.header(name.clone(), value.clone());
        }
        if let (Some(signer), Some((_, header))) = (&self.signer, &self.settings.signing) {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            request = request.header(header.clone(), signer.header_value(now, &self.body));
        }
        let endpoint = &self.settings.endpoint;
        let mut response = match request.send(&self.body[..]) {
            Ok(response) => response,
            Err(e) => {
                return Err(Failure::Retry(format!(
                    "posting to {endpoint}: {}",
                    describe(&e, self.settings.timeout)
                )));
            }
        };
        let status = response.status();
        if status.is_success() {
            // Read the answer so that the connection goes back to the pool.
            let mut reader = response.body_mut().as_reader().take(DRAIN_LIMIT);
            let _ = io::copy(&mut reader, &mut io::sink());
            return Ok(());
        }

        let excerpt = excerpt(&mut response);
        let mut message = format!("posting to {endpoint}: HTTP {}", describe_status(status));
        if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error()
        {
            let retry_after = response.headers().get("retry-after");
            if let Some(delay) =
                retry_after.and_then(|v| parse_retry_after(v.to_str().ok()?, SystemTime::now()))
            {
                let wait = delay.min(self.settings.max_retry_after);
                self.not_before = Some(Instant::now() + wait);
                message.push_str(&format!(
                    ", retrying after {}s as the server asked",
                    wait.as_secs_f64().ceil()
                ));
            }
            message.push_str(&excerpt);
            return Err(Failure::Retry(message));
        }
        message.push_str(&excerpt);
        if status.is_redirection() {
            let to = response
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .and_then(|l| l.split('?').next())
                .unwrap_or("?");
            return Err(Failure::Retry(format!(
                "{message}: the server redirects to {to}: set \"url\" to the final address"
            )));
        }
        if status.is_client_error() {
            let content = matches!(status.as_u16(), 400 | 413 | 422);
            return Err(if content {
                Failure::Content(message)
            } else {
                Failure::Refused(message)
            });
        }
        Err(Failure::Retry(message))
    }

    fn build_body(&mut self, records: &[Record<'_>]) {
        let body = &mut self.body;
        body.clear();
        match (&self.settings.template, self.settings.batch) {
            (None, false) => body.extend_from_slice(records[0].line.as_bytes()),
            (None, true) => {
                body.push(b'[');
                for (i, record) in records.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(record.line.as_bytes());
                }
                body.push(b']');
            }
            (Some(template), _) => {
                let mut text = String::new();
                slack::render_lines(template, records.iter().map(|r| r.line.as_str()), &mut text);
                #[derive(serde::Serialize)]
                struct Message<'a> {
                    text: &'a str,
                }
                serde_json::to_writer(&mut *body, &Message { text: &text })
                    .expect("serializing a string to memory");
            }
        }
    }
}

enum Narrowed {
    /// The first `n` events were delivered; the rest were not tried.
    Delivered(usize),
    /// The first `n` events were delivered, then this.
    Failed(usize, Failure),
}

/// `503 Service Unavailable`.
fn describe_status(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// `: "<start of the body>"`, on one line, or nothing for an empty body.
fn excerpt(response: &mut Response<ureq::Body>) -> String {
    let mut bytes = Vec::new();
    let _ = response
        .body_mut()
        .as_reader()
        .take(BODY_EXCERPT as u64 * 4)
        .read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        return String::new();
    }
    let mut cut: String = text.chars().take(BODY_EXCERPT).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    format!(": {cut:?}")
}

/// The delay a `Retry-After` header asks for at `now`: seconds, or an HTTP date.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

fn describe(error: &ureq::Error, timeout: Duration) -> String {
    match error {
        ureq::Error::Timeout(_) => format!(
            "no complete answer within {timeout:?}: the receiver is slow or unreachable (raise \"timeout\" if it needs longer)"
        ),
        ureq::Error::HostNotFound => {
            "host not found: check the host name in \"url\" and DNS".to_owned()
        }
        ureq::Error::Rustls(e) => describe_tls(e),
        ureq::Error::Tls(e) => format!("TLS failed: {e}"),
        ureq::Error::Io(e) => match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            Some(e) => describe_tls(e),
            None => e.to_string(),
        },
        other => other.to_string(),
    }
}

fn describe_tls(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(_) => format!(
            "TLS failed: {error}: the server's certificate is not trusted; if a private CA signed it, give that CA in \"ca_file\""
        ),
        _ => format!("TLS failed: {error}"),
    }
}

impl Sink for Webhook {
    fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        self.wait_for_server();
        self.deliver(batch)
    }
}

trail_plugin_api::export_sink!(
    name: "webhook",
    version: env!("CARGO_PKG_VERSION"),
    new: Webhook::new,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        let check = |value: &str, expected: Option<u64>| {
            let parsed = parse_retry_after(value, now).map(|d| d.as_secs());
            assert_eq!(parsed, expected, "{value}");
        };
        check("120", Some(120));
        check(" 0 ", Some(0));
        check("Wed, 21 Oct 2026 07:28:30 GMT", Some(30));
        check("Wed, 21 Oct 2026 07:00:00 GMT", Some(0));
        check("-1", None);
        check("soon", None);
    }
}
