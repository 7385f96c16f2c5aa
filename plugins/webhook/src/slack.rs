//! `format: slack`: the text template over an event's fields, and the message body.
//!
//! Owns the template language (`{actor.name}` picks a field, `{{` and `}}` are literal braces)
//! and the list of fields a template may name, checked when the sink is configured so that a
//! typo is a configuration error rather than a silently empty message.

use std::fmt::Write as _;

use serde_json::Value;

/// The fields of a stored record a template may name, besides `payload` and `payload.<key>…`
/// (payloads are free-form, so any key below `payload` is accepted).
pub const FIELDS: [&str; 24] = [
    "seq",
    "id",
    "received_at",
    "occurred_at",
    "type",
    "version",
    "severity",
    "code",
    "outcome",
    "message",
    "source.uid",
    "source.gid",
    "source.pid",
    "source.host",
    "actor.id",
    "actor.name",
    "actor.type",
    "actor.ip",
    "target.type",
    "target.id",
    "target.name",
    "source",
    "actor",
    "target",
];

/// What an absent (optional) field renders as.
pub const ABSENT: &str = "-";

/// A parsed template.
#[derive(Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Vec<String>),
}

impl Template {
    /// Parses `text`, refusing unknown fields and unbalanced braces.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            literal.push_str(&rest[..i]);
            let at = text.len() - rest.len() + i;
            let tail = &rest[i..];
            if tail.starts_with("{{") || tail.starts_with("}}") {
                literal.push_str(&tail[..1]);
                rest = &tail[2..];
                continue;
            }
            if tail.starts_with('}') {
                return Err(format!(
                    "unmatched }} at byte {at}: write }}}} for a literal brace"
                ));
            }
            let Some(end) = tail.find('}') else {
                return Err(format!(
                    "unclosed {{ at byte {at}: close the field with }}, or write {{{{ for a literal brace"
                ));
            };
            let name = tail[1..end].trim();
            if !known(name) {
                return Err(format!(
                    "unknown field {{{name}}} at byte {at}: use one of {}, payload or payload.<key>",
                    FIELDS.join(", ")
                ));
            }
            if !literal.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut literal)));
            }
            parts.push(Part::Field(name.split('.').map(str::to_owned).collect()));
            rest = &tail[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Self { parts })
    }

    /// Appends the text for `event` (a parsed stored record) to `out`. Field values are escaped
    /// for Slack (`&`, `<`, `>`); the template's own text is not, so it may hold Slack markup
    /// such as `*bold*` or `<https://…|links>`.
    pub fn render(&self, event: &Value, out: &mut String) {
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Field(path) => {
                    let value = path.iter().try_fold(event, |v, key| v.get(key));
                    match value {
                        None | Some(Value::Null) => out.push_str(ABSENT),
                        Some(Value::String(s)) => escape(s, out),
                        Some(other) => escape(&other.to_string(), out),
                    }
                }
            }
        }
    }
}

fn known(name: &str) -> bool {
    FIELDS.contains(&name)
        || name == "payload"
        || name
            .strip_prefix("payload.")
            .is_some_and(|keys| keys.split('.').all(|k| !k.is_empty()))
}

/// Slack's escaping of text: `&`, `<` and `>` only.
fn escape(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

/// Appends the rendered lines for `lines` (stored records) to `text`, one per line. A record
/// that is not JSON (which trail never stores) is shown as it is.
pub fn render_lines<'a>(
    template: &Template,
    lines: impl Iterator<Item = &'a str>,
    text: &mut String,
) {
    for (i, line) in lines.enumerate() {
        if i > 0 {
            text.push('\n');
        }
        match serde_json::from_str::<Value>(line) {
            Ok(event) => template.render(&event, text),
            Err(_) => {
                let _ = write!(text, "(unreadable event) ");
                escape(line, text);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"seq":1,"id":"019a","received_at":"2026-11-23T16:20:41.03Z","type":"user_login","version":1,"severity":"info","source":{"uid":0,"gid":0,"pid":5569,"host":"vm"},"actor":{"id":"u-42","name":"alice","type":"user","ip":"10.0.0.7"},"target":{"type":"project","id":"p-9","name":"billing <eu> & co"},"outcome":"success","payload":{"method":"sso","n":2,"deep":{"x":[1,2]}}}"#;

    #[track_caller]
    fn check(template: &str, expected: &str) {
        let template = Template::parse(template).unwrap();
        let mut out = String::new();
        render_lines(&template, [LINE].into_iter(), &mut out);
        assert_eq!(out, expected);
    }

    #[track_caller]
    fn check_error(template: &str, expected: &str) {
        let error = Template::parse(template).unwrap_err();
        assert!(error.contains(expected), "{template}: {error}");
    }

    #[test]
    fn renders_fields() {
        check(
            "{actor.name} {type} {target.type} {target.name}: {outcome}",
            "alice user_login project billing &lt;eu&gt; &amp; co: success",
        );
        check("{seq}/{version} {source.pid}@{source.host}", "1/1 5569@vm");
        check(
            "{ payload.method } {payload.n} {payload.deep.x}",
            "sso 2 [1,2]",
        );
        check("{payload.deep}", r#"{"x":[1,2]}"#);
        // Optional fields that are absent, and payload keys that are not there.
        check("{code}|{message}|{occurred_at}|{payload.nope}", "-|-|-|-");
        check(
            "{{literal}} *{actor.name}* <https://x|link>",
            "{literal} *alice* <https://x|link>",
        );
        check("", "");
        check("no fields", "no fields");
    }

    #[test]
    fn unknown_fields_and_bad_braces_are_refused() {
        check_error("{actor.nmae}", "unknown field {actor.nmae} at byte 0");
        check_error("x {user}", "unknown field {user} at byte 2");
        check_error("{payload.}", "unknown field {payload.}");
        check_error("{}", "unknown field {}");
        check_error("{type", "unclosed { at byte 0");
        check_error("type}", "unmatched } at byte 4");
    }

    #[test]
    fn several_events_make_several_lines() {
        let template = Template::parse("{type} by {actor.name}").unwrap();
        let mut out = String::new();
        render_lines(&template, [LINE, LINE, "not json <"].into_iter(), &mut out);
        assert_eq!(
            out,
            "user_login by alice\nuser_login by alice\n(unreadable event) not json &lt;"
        );
    }
}
