//! Subjects: the template each event's subject is made from (`audit.{host}.{type}`), and the checks of subjects
//! and stream subject patterns. Owns what may appear in a subject; it does no I/O.

use std::borrow::Cow;

use serde::Deserialize;
use trail_plugin_api::Record;

/// What a placeholder stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    /// `source.host` of the record.
    Host,
    /// The event type.
    Type,
    /// The record's severity.
    Severity,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// A checked subject template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
    /// Whether rendering needs the record's JSON (for `{host}` or `{severity}`).
    reads_line: bool,
}

/// The fields of a record a template may use.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    severity: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    source: Option<Source<'a>>,
}

#[derive(Deserialize)]
struct Source<'a> {
    #[serde(borrow, default)]
    host: Option<Cow<'a, str>>,
}

/// What stands in for a value that is missing or empty.
const MISSING: &str = "_";

impl Template {
    /// Parses `text`: literal subject text with `{host}`, `{type}` and `{severity}`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("{text:?}: a {{ without its }}"));
            };
            let name = &rest[open + 1..open + close];
            let field = match name {
                "host" => Field::Host,
                "type" => Field::Type,
                "severity" => Field::Severity,
                other => {
                    return Err(format!(
                        "unknown placeholder {{{other}}} in {text:?}: use {{host}}, {{type}} or {{severity}}"
                    ));
                }
            };
            parts.push(Part::Field(field));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{text:?}: a }} without its {{"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        // Check the shape with every placeholder standing for one plain token.
        let sample: String = parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_str(),
                Part::Field(_) => "x",
            })
            .collect();
        check_subject(&sample).map_err(|e| format!("{text:?}: {e}"))?;
        let reads_line = parts
            .iter()
            .any(|p| matches!(p, Part::Field(Field::Host | Field::Severity)));
        Ok(Self {
            text: text.to_owned(),
            parts,
            reads_line,
        })
    }

    /// The template as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// A stream subject pattern that captures every subject the template makes: its literal leading tokens,
    /// then `>`.
    pub fn capture(&self) -> String {
        let mut fixed = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => fixed.push_str(t),
                Part::Field(_) => break,
            }
        }
        if !self.parts.iter().any(|p| matches!(p, Part::Field(_))) {
            return fixed;
        }
        // Only whole tokens before the first placeholder.
        match fixed.rfind('.') {
            Some(dot) => format!("{}.>", &fixed[..dot]),
            None => ">".to_owned(),
        }
    }

    /// Writes `record`'s subject into `out` (cleared first). Each value becomes one token: characters a
    /// token cannot hold (`.`, `*`, `>`, white space and control characters) become `_`.
    pub fn render(&self, record: &Record<'_>, out: &mut String) {
        out.clear();
        let fields = if self.reads_line {
            serde_json::from_str::<Fields<'_>>(record.line.as_str()).ok()
        } else {
            None
        };
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(field) => {
                    let value: &str = match field {
                        Field::Type => record.event_type.as_str(),
                        Field::Host => fields
                            .as_ref()
                            .and_then(|f| f.source.as_ref())
                            .and_then(|s| s.host.as_deref())
                            .unwrap_or(MISSING),
                        Field::Severity => fields
                            .as_ref()
                            .and_then(|f| f.severity.as_deref())
                            .unwrap_or(MISSING),
                    };
                    push_token(out, value);
                }
            }
        }
    }
}

fn push_token(out: &mut String, value: &str) {
    if value.is_empty() {
        out.push_str(MISSING);
        return;
    }
    for c in value.chars() {
        if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
            out.push('_');
        } else {
            out.push(c);
        }
    }
}

/// A subject a message can be published to: non-empty tokens separated by `.`, no wildcards, no white space.
fn check_subject(subject: &str) -> Result<(), String> {
    for token in subject.split('.') {
        if token.is_empty() {
            return Err("a subject has no empty token (no leading, trailing or double dot)".into());
        }
        if token == "*" || token == ">" {
            return Err(format!(
                "{token} is a wildcard: a message is published to a subject without wildcards"
            ));
        }
        if token.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err("a subject has no white space".into());
        }
    }
    Ok(())
}

/// A stream's subject pattern: like a subject, and tokens may be `*`, the last one `>`.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!("{pattern:?} has an empty token"));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err(format!("{pattern:?}: > may only be the last token"));
        }
        if token.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(format!("{pattern:?} has white space"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(template: &str, event_type: &str, line: &str, expected: &str) {
        let t = Template::parse(template).unwrap();
        let record = Record::new(1, "id", event_type, line);
        let mut out = String::new();
        t.render(&record, &mut out);
        assert_eq!(out, expected, "{template} {line}");
    }

    #[test]
    fn rendering() {
        let line = r#"{"seq":1,"type":"user_login","severity":"info","source":{"uid":1,"host":"web-1.example"}}"#;
        check(
            "audit.{host}.{type}",
            "user_login",
            line,
            "audit.web-1_example.user_login",
        );
        check(
            "audit.{type}",
            "project.deleted",
            line,
            "audit.project_deleted",
        );
        check("a.{severity}.{type}", "x", line, "a.info.x");
        check("a-{type}-b", "x", line, "a-x-b");
        check("fixed", "x", line, "fixed");
        check("a.{host}", "x", r#"{"source":{"uid":1}}"#, "a._");
        check("a.{host}", "x", r#"{"source":{"host":""}}"#, "a._");
        check(
            "a.{host}",
            "x",
            r#"{"source":{"host":"a b*>\u0001"}}"#,
            "a.a_b___",
        );
        check(
            "a.{host}",
            "x",
            r#"{"source":{"host":"caf\u00e9"}}"#,
            "a.café",
        );
        check("a.{host}", "x", "not json", "a._");
    }

    #[test]
    fn capture_patterns() {
        let capture = |t: &str| Template::parse(t).unwrap().capture();
        assert_eq!(capture("audit.{host}.{type}"), "audit.>");
        assert_eq!(capture("a.b.{type}"), "a.b.>");
        assert_eq!(capture("a.b{type}"), "a.>");
        assert_eq!(capture("{type}.x"), ">");
        assert_eq!(capture("a.b"), "a.b");
    }

    #[test]
    fn bad_templates_and_patterns() {
        let error = |t: &str| Template::parse(t).unwrap_err();
        assert!(error("a.{nope}").contains("unknown placeholder {nope}"));
        assert!(error("a.{type").contains("without its }"));
        assert!(error("a.type}").contains("without its {"));
        assert!(error(".a").contains("empty token"));
        assert!(error("a.").contains("empty token"));
        assert!(error("a.>").contains("wildcard"));
        assert!(error("a b").contains("white space"));
        assert!(check_pattern("a.*.>").is_ok());
        assert!(check_pattern("a.>.b").is_err());
        assert!(check_pattern("a..b").is_err());
    }
}
