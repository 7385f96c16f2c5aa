//! RFC 5424 messages from stored records.
//!
//! Owns the mapping from a trail record to `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID
//! STRUCTURED-DATA [MSG]`: which timestamp, which severity, which fields become structured
//! data and how they are escaped. It knows nothing of sockets or framing.

use std::{borrow::Cow, io::Write as _};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{Format, Settings};

/// The objects of a record whose members become parameters of their own (`actor.name`).
const FLATTENED: [&str; 3] = ["source", "actor", "target"];
/// Formats records as RFC 5424 messages for one sink.
pub struct Formatter {
    facility: u8,
    severity: Option<u8>,
    format: Format,
    sd_id: String,
    /// ` HOSTNAME APP-NAME PROCID `, the same for every message.
    middle: String,
}

/// The fields needed when the record is forwarded as it is (`format: json`).
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    received_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    severity: Option<Cow<'a, str>>,
}

impl Formatter {
    /// A formatter with `settings`; PROCID is this process's id.
    pub fn new(settings: &Settings) -> Self {
        Self {
            facility: settings.facility.0,
            severity: settings.severity.map(|s| s.0),
            format: settings.format,
            sd_id: settings.sd_id.clone(),
            middle: format!(
                " {} {} {} ",
                settings.hostname,
                settings.app_name,
                std::process::id()
            ),
        }
    }

    /// Appends the message for the record `line` of type `event_type` to `out`.
    pub fn format(&self, event_type: &str, line: &str, out: &mut Vec<u8>) {
        match self.format {
            Format::Json => {
                let head: Head<'_> = serde_json::from_str(line).unwrap_or(Head {
                    received_at: None,
                    severity: None,
                });
                self.header(
                    head.severity.as_deref(),
                    head.received_at.as_deref(),
                    event_type,
                    out,
                );
                out.extend_from_slice(b"- ");
                out.extend_from_slice(line.as_bytes());
            }
            Format::Structured | Format::Both => {
                let event: Map<String, Value> = serde_json::from_str(line).unwrap_or_default();
                let text = |key: &str| event.get(key).and_then(Value::as_str);
                self.header(text("severity"), text("received_at"), event_type, out);
                self.structured_data(&event, out);
                if self.format == Format::Both {
                    out.push(b' ');
                    out.extend_from_slice(line.as_bytes());
                } else if let Some(message) = text("message") {
                    out.push(b' ');
                    out.extend_from_slice(message.as_bytes());
                }
            }
        }
    }

    /// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID ` (with the trailing space).
    fn header(
        &self,
        severity: Option<&str>,
        received_at: Option<&str>,
        event_type: &str,
        out: &mut Vec<u8>,
    ) {
        let severity = self
            .severity
            .unwrap_or_else(|| severity_of(severity.unwrap_or_default()));
        let _ = write!(out, "<{}>1 ", self.facility as u32 * 8 + severity as u32);
        match received_at.and_then(timestamp) {
            Some(ts) => out.extend_from_slice(ts.as_bytes()),
            None => out.push(b'-'),
        }
        out.extend_from_slice(self.middle.as_bytes());
        let msgid: String = event_type
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(32)
            .collect();
        out.extend_from_slice(if msgid.is_empty() { "-" } else { &msgid }.as_bytes());
        out.push(b' ');
    }

    /// `[sd_id name="value" …]`: every field of the event except `message`, in the record's
    /// order.
    fn structured_data(&self, event: &Map<String, Value>, out: &mut Vec<u8>) {
        out.push(b'[');
        out.extend_from_slice(self.sd_id.as_bytes());
        for (key, value) in event {
            let key = key.as_str();
            if key == "message" {
                continue;
            }
            match value {
                Value::Object(members) if FLATTENED.contains(&key) => {
                    for (member, value) in members {
                        param(&format!("{key}.{member}"), value, out);
                    }
                }
                value => param(key, value, out),
            }
        }
        out.push(b']');
    }
}

/// ` name="value"`, escaped; nothing for a null or for a name RFC 5424 does not allow.
fn param(name: &str, value: &Value, out: &mut Vec<u8>) {
    let valid = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'=' | b']' | b'"'));
    if !valid || value.is_null() {
        return;
    }
    let text = match value {
        Value::String(s) => Cow::Borrowed(s.as_str()),
        other => Cow::Owned(other.to_string()),
    };
    out.push(b' ');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"=\"");
    for c in text.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push(b'\\');
        }
        let mut utf8 = [0; 4];
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    }
    out.push(b'"');
}

/// The syslog severity for trail's event severity: info 6, notice 5, warning 4, critical 2;
/// anything else is info.
pub fn severity_of(trail_severity: &str) -> u8 {
    match trail_severity {
        "critical" => 2,
        "warning" => 4,
        "notice" => 5,
        _ => 6,
    }
}

/// An RFC 3339 time as RFC 5424 allows it (at most 6 fractional digits, upper-case `T` and
/// `Z`), or `None` if `text` is not one.
pub fn timestamp(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range.clone())
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return None;
    }
    let mut rest = &text[19..];
    let mut fraction = "";
    if let Some(after_dot) = rest.strip_prefix('.') {
        let n = after_dot.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        fraction = &after_dot[..n.min(6)];
        rest = &after_dot[n..];
    }
    let offset_ok = rest == "Z"
        || (rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':'
            && digits(text.len() - 5..text.len() - 3)
            && digits(text.len() - 2..text.len()));
    if !offset_ok {
        return None;
    }
    let mut out = text[..19].to_owned();
    if !fraction.is_empty() {
        out.push('.');
        out.push_str(fraction);
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    const LINE: &str = r#"{"seq":1,"id":"019ab","received_at":"2026-11-23T16:20:41.030661233Z","occurred_at":"2026-11-23T16:20:40Z","type":"user_login","version":1,"severity":"warning","code":"T1000I","source":{"uid":0,"gid":0,"pid":5569,"host":"vm"},"actor":{"id":"u-42","name":"alice","type":"user","ip":"10.0.0.7"},"target":{"type":"project","id":"p-9","name":"bill]ing \"eu\" \\ x"},"outcome":"success","message":"signed in","payload":{"method":"sso","n":null},"extra":true,"weird key":1,"nothing":null}"#;

    #[track_caller]
    fn check(config: &str, line: &str, expected: &str) {
        let settings = Settings::parse(config).unwrap();
        let mut out = Vec::new();
        Formatter::new(&settings).format("user_login", line, &mut out);
        let pid = std::process::id();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            expected.replace("PID", &pid.to_string())
        );
    }

    #[test]
    fn json_messages_carry_the_record() {
        check(
            r#"{"hostname": "h1"}"#,
            LINE,
            &format!("<84>1 2026-11-23T16:20:41.030661Z h1 trail PID user_login - {LINE}"),
        );
        check(
            r#"{"hostname": "h1", "facility": "local0", "severity": "err", "app_name": "app"}"#,
            r#"{"received_at":"2026-11-23T16:20:41+02:00"}"#,
            r#"<131>1 2026-11-23T16:20:41+02:00 h1 app PID user_login - {"received_at":"2026-11-23T16:20:41+02:00"}"#,
        );
        check(
            r#"{"hostname": "h1"}"#,
            "not json",
            "<86>1 - h1 trail PID user_login - not json",
        );
    }

    #[test]
    fn structured_messages_carry_the_fields() {
        let sd = concat!(
            r#"[trail@32473 seq="1" id="019ab" received_at="2026-11-23T16:20:41.030661233Z" "#,
            r#"occurred_at="2026-11-23T16:20:40Z" type="user_login" version="1" severity="warning" code="T1000I" "#,
            r#"source.uid="0" source.gid="0" source.pid="5569" source.host="vm" "#,
            r#"actor.id="u-42" actor.name="alice" actor.type="user" actor.ip="10.0.0.7" "#,
            r#"target.type="project" target.id="p-9" target.name="bill\]ing \"eu\" \\ x" "#,
            r#"outcome="success" payload="{\"method\":\"sso\",\"n\":null}" extra="true"]"#
        );
        check(
            r#"{"hostname": "h1", "format": "structured"}"#,
            LINE,
            &format!("<84>1 2026-11-23T16:20:41.030661Z h1 trail PID user_login {sd} signed in"),
        );
        check(
            r#"{"hostname": "h1", "format": "both", "sd_id": "audit@99"}"#,
            LINE,
            &format!(
                "<84>1 2026-11-23T16:20:41.030661Z h1 trail PID user_login {} {LINE}",
                sd.replace("trail@32473", "audit@99")
            ),
        );
        // No message: no MSG.
        check(
            r#"{"hostname": "h1", "format": "structured"}"#,
            r#"{"seq":2,"severity":"critical"}"#,
            r#"<82>1 - h1 trail PID user_login [trail@32473 seq="2" severity="critical"]"#,
        );
    }

    #[test]
    fn severities() {
        for (trail, syslog) in [
            ("info", 6),
            ("notice", 5),
            ("warning", 4),
            ("critical", 2),
            ("", 6),
            ("bogus", 6),
        ] {
            assert_eq!(severity_of(trail), syslog, "{trail}");
        }
    }

    #[test]
    fn timestamps() {
        let check = |text: &str, expected: Option<&str>| {
            assert_eq!(timestamp(text).as_deref(), expected, "{text}");
        };
        check(
            "2026-11-23T16:20:41.030661233Z",
            Some("2026-11-23T16:20:41.030661Z"),
        );
        check("2026-11-23T16:20:41.5Z", Some("2026-11-23T16:20:41.5Z"));
        check("2026-11-23T16:20:41Z", Some("2026-11-23T16:20:41Z"));
        check(
            "2026-11-23T16:20:41.123+05:30",
            Some("2026-11-23T16:20:41.123+05:30"),
        );
        check(
            "2026-11-23T16:20:41-00:00",
            Some("2026-11-23T16:20:41-00:00"),
        );
        check("2026-11-23 16:20:41Z", None);
        check("2026-11-23T16:20:41.Z", None);
        check("2026-11-23T16:20:41", None);
        check("2026-11-23T16:20:41+0530", None);
        check("2026-11-23t16:20:41z", None);
        check("", None);
    }
}
