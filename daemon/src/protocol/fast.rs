//! The usual request line read without `serde`: one pass over the line that yields exactly the [`Request`]
//! `serde_json` would, or nothing.
//!
//! It takes only the plain form: known fields, each at most once; strings without escapes (and so borrowed from
//! the line); an `outcome` the enum names; a compact payload that [`Doc::read_prefix`] accepts (which checks what
//! `serde_json` would, plus what a stored payload must not hold). Anything else, valid or not, gives `None`, and
//! the caller reads the line with `serde_json` as before, which also finds the precise error. So this never
//! decides what is accepted: it only skips `serde`'s generic machinery for lines that need none of it.

use std::borrow::Cow;

use super::instance::{Doc, plain_run};
use super::{Actor, Outcome, Payload, Request, Str, Target};

/// The request in `text`, when it has the plain form (see the module docs).
pub(super) fn parse(text: &str) -> Option<Request<'_>> {
    let mut c = Cursor {
        text,
        b: text.as_bytes(),
        i: 0,
    };
    let mut event_type = None;
    let (mut actor, mut target, mut message, mut outcome) = (None, None, None, None);
    let (mut payload, mut occurred_at, mut idempotency_key) = (None, None, None);
    let mut seen = 0u8;
    c.object(|c, key| {
        let bit = match key {
            "type" => 1,
            "actor" => 2,
            "target" => 4,
            "message" => 8,
            "outcome" => 16,
            "payload" => 32,
            "occurred_at" => 64,
            "idempotency_key" => 128,
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        match bit {
            1 => event_type = Some(c.str()?),
            2 => actor = c.nullable(Cursor::actor)?,
            4 => target = c.nullable(Cursor::target)?,
            8 => message = c.nullable(Cursor::str)?,
            16 => outcome = c.nullable(Cursor::outcome)?,
            32 => payload = c.nullable(Cursor::payload)?,
            64 => occurred_at = c.nullable(Cursor::str)?,
            _ => idempotency_key = c.nullable(Cursor::str)?,
        }
        Some(())
    })?;
    c.space();
    if c.i != c.b.len() {
        return None;
    }
    Some(Request {
        event_type: event_type?,
        actor,
        target,
        message,
        outcome,
        payload,
        occurred_at,
        idempotency_key,
    })
}

struct Cursor<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn space(&mut self) {
        while self
            .b
            .get(self.i)
            .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.i += 1;
        }
    }

    /// Skips whitespace and then `byte`, or gives `None`.
    fn eat(&mut self, byte: u8) -> Option<()> {
        self.space();
        (self.b.get(self.i) == Some(&byte)).then(|| self.i += 1)
    }

    /// Reads an object, calling `member` with the cursor after each key's colon; `member` reads the value.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.space();
        if self.b.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Some(());
        }
        loop {
            self.space();
            let key = self.plain()?;
            self.eat(b':')?;
            self.space();
            member(self, key)?;
            self.space();
            match *self.b.get(self.i)? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string without escapes or control characters, at the cursor.
    fn plain(&mut self) -> Option<&'a str> {
        if self.b.get(self.i) != Some(&b'"') {
            return None;
        }
        let start = self.i + 1;
        let end = start + plain_run(&self.b[start..]);
        if self.b.get(end) != Some(&b'"') {
            return None;
        }
        self.i = end + 1;
        // Both ends are ASCII quotes in a `str`, so they are character boundaries.
        Some(&self.text[start..end])
    }

    fn str(&mut self) -> Option<Str<'a>> {
        self.plain().map(|s| Str(Cow::Borrowed(s)))
    }

    /// `null` as `Some(None)`, else what `read` reads.
    fn nullable<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.b[self.i..].starts_with(b"null") {
            self.i += 4;
            return Some(None);
        }
        read(self).map(Some)
    }

    fn outcome(&mut self) -> Option<Outcome> {
        match self.plain()? {
            "success" => Some(Outcome::Success),
            "failure" => Some(Outcome::Failure),
            "denied" => Some(Outcome::Denied),
            _ => None,
        }
    }

    fn actor(&mut self) -> Option<Actor<'a>> {
        let [id, name, kind, ip] = self.strings(["id", "name", "type", "ip"])?;
        Some(Actor {
            id: id?,
            name,
            kind,
            ip,
        })
    }

    fn target(&mut self) -> Option<Target<'a>> {
        let [kind, id, name] = self.strings(["type", "id", "name"])?;
        Some(Target {
            kind,
            id: id?,
            name,
        })
    }

    /// An object of string (or `null`) members named `names`, each at most once; the caller requires its own
    /// (`None` for a required member that is `null` or missing sends the line to `serde_json`, which refuses it).
    fn strings<const N: usize>(&mut self, names: [&str; N]) -> Option<[Option<Str<'a>>; N]> {
        let mut values = [const { None }; N];
        let mut seen = [false; N];
        self.object(|c, key| {
            let n = names.iter().position(|name| *name == key)?;
            if std::mem::replace(&mut seen[n], true) {
                return None;
            }
            values[n] = c.nullable(Cursor::str)?;
            Some(())
        })?;
        Some(values)
    }

    /// A compact payload, read for its schema check on the way.
    fn payload(&mut self) -> Option<Payload<'a>> {
        let text = &self.text[self.i..];
        let (doc, compact, len) = Doc::read_prefix(text, 1).ok()?;
        if !compact {
            return None;
        }
        self.i += len;
        Some(Payload {
            text: Cow::Borrowed(&text[..len]),
            doc: Ok(doc),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines put together from fields in many forms, valid and not, in random order and spacing: whenever the
    /// fast path reads one, `serde_json` reads the same request; and the usual forms do take the fast path.
    #[test]
    fn reads_what_serde_json_reads_or_nothing() {
        let nested = |n: usize| "[".repeat(n) + &"]".repeat(n);
        let deep: Vec<String> = [124, 125, 126, 127]
            .iter()
            .map(|&n| format!(r#"{{"a":{}}}"#, nested(n)))
            .collect();
        let fields: Vec<(&str, Vec<String>)> = vec![
            (
                "type",
                vec![
                    r#""user_login""#,
                    r#""a b""#,
                    r#""\u0061""#,
                    "null",
                    "1",
                    r#""""#,
                    "\"x\ty\"",
                ]
                .into_iter()
                .map(String::from)
                .collect(),
            ),
            (
                "actor",
                [
                    r#"{"id":"u"}"#,
                    r#"{"id":"u","name":"N","type":"user","ip":"10.1.2.3"}"#,
                    r#"{"ip":null,"id":"u"}"#,
                    r#"{"id":null}"#,
                    "{}",
                    r#"{"id":"u","id":"v"}"#,
                    r#"{"id":"u","x":1}"#,
                    "null",
                    r#""s""#,
                    r#"{ "id" : "u" , "name" : "é" }"#,
                    r#"{"id":"\"q\""}"#,
                ]
                .map(String::from)
                .to_vec(),
            ),
            (
                "target",
                [
                    r#"{"type":"project","id":"p-9"}"#,
                    r#"{"id":"p","name":null}"#,
                    r#"{"type":"t"}"#,
                    r#"{"id":"p","type":"a","type":"b"}"#,
                    r#"{"id":"p","ip":"x"}"#,
                    "[]",
                ]
                .map(String::from)
                .to_vec(),
            ),
            (
                "message",
                [
                    r#""deleted it""#,
                    r#""caf\u00e9""#,
                    r#""é ü 😀""#,
                    "null",
                    "5",
                    "\"a\nb\"",
                ]
                .map(String::from)
                .to_vec(),
            ),
            (
                "outcome",
                [
                    r#""success""#,
                    r#""denied""#,
                    r#""failure""#,
                    r#""other""#,
                    "null",
                    r#""Success""#,
                ]
                .map(String::from)
                .to_vec(),
            ),
            (
                "payload",
                [
                    "{}",
                    r#"{"a":1,"b":[true,false,null],"c":{"d":"e"}}"#,
                    r#"{"n":1E400,"m":-1e-400,"x":1.5e+3,"y":-0,"z":0.1}"#,
                    r#"{"n":01}"#,
                    r#"{"n":-}"#,
                    r#"{"n":1.}"#,
                    r#"{"s":"\ud800"}"#,
                    r#"{"s":"\udc00"}"#,
                    r#"{"s":"\ud83d\ude00"}"#,
                    r#"{"s":"\x"}"#,
                    r#"{"a":1,"a":2}"#,
                    r#"{"a":1,"\u0061":2}"#,
                    r#"{ "a": 1 }"#,
                    "[1]",
                    "7",
                    r#""s""#,
                    "null",
                    "{\"s\":\"\t\"}",
                    r#"{"a":tru}"#,
                    r#"{"a":nulls}"#,
                    r#"{"a":[1,]}"#,
                    r#"{"a":{"b":}}"#,
                    r#"{"a" 1}"#,
                    &deep[0],
                    &deep[1],
                    &deep[2],
                    &deep[3],
                ]
                .map(String::from)
                .to_vec(),
            ),
            (
                "occurred_at",
                [r#""2026-01-01T00:00:00Z""#, "null", "0"]
                    .map(String::from)
                    .to_vec(),
            ),
            (
                "idempotency_key",
                [r#""k-1""#, "null", "{}"].map(String::from).to_vec(),
            ),
            ("extra", vec!["1".to_owned()]),
        ];
        let mut next = crate::protocol::tests::xorshift(0x9e37_79b9_7f4a_7c15);
        let spaces = ["", "", "", " ", "\n", " \t "];
        let (mut fast, mut lines) = (0, 0);
        for _ in 0..30_000 {
            let mut members: Vec<String> = Vec::new();
            for (name, values) in &fields {
                // Mostly present; `extra` rarely; now and then twice.
                let wanted = match *name {
                    "type" => next(20) != 0,
                    "extra" => next(30) == 0,
                    _ => next(3) != 0,
                };
                for _ in 0..if next(40) == 0 {
                    2
                } else {
                    usize::from(wanted)
                } {
                    // Mostly the first (plain) forms.
                    let value = if next(2) == 0 {
                        &values[0]
                    } else {
                        &values[next(values.len())]
                    };
                    let (a, b) = (spaces[next(spaces.len())], spaces[next(spaces.len())]);
                    members.push(format!("{a}\"{name}\"{b}:{a}{value}{b}"));
                }
            }
            for i in (1..members.len()).rev() {
                members.swap(i, next(i + 1));
            }
            let tail = ["", "", " ", "x", "}", ","][next(6)];
            let line = format!("{{{}}}{tail}", members.join(","));
            lines += 1;
            let by_serde = serde_json::from_str::<Request<'_>>(&line);
            if let Some(request) = parse(&line) {
                fast += 1;
                let expected = by_serde.unwrap_or_else(|e| {
                    panic!("the fast path read a line serde_json refuses ({e}): {line}")
                });
                assert_eq!(format!("{request:?}"), format!("{expected:?}"), "{line}");
            }
        }
        assert!(
            fast > lines / 20,
            "only {fast} of {lines} lines took the fast path"
        );
        let usual = r#"{"type":"user_login","actor":{"id":"u-1","ip":"10.0.0.1"},"target":{"type":"project","id":"p-9"},"outcome":"success","message":"deleted the project","payload":{"n":1,"s":"a"}}"#;
        assert!(parse(usual).is_some(), "{usual}");
        // Spaces in the envelope are fine; in the payload they send the line to `serde_json`, which compacts it.
        assert!(parse(&usual.replace(r#"",""#, r#"", ""#)).is_some());
        assert!(parse(&usual.replace(r#"1,"s""#, r#"1, "s""#)).is_none());
    }
}
