//! Turning a batch of stored records into rows: the columns read from each record's JSON line, written in
//! PostgreSQL's COPY text format, and what each host's watermark becomes. Owns the mapping from the log format
//! (README "The log") to columns; it does no I/O.

use std::{borrow::Cow, collections::HashMap, ops::Range};

use serde::Deserialize;
use trail_plugin_api::Record;

/// The fields of a record that become columns (everything else stays in the `record` column only).
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    received_at: Cow<'a, str>,
    #[serde(borrow, default)]
    occurred_at: Option<Cow<'a, str>>,
    #[serde(borrow)]
    severity: Cow<'a, str>,
    #[serde(borrow)]
    source: Source<'a>,
    #[serde(borrow, default)]
    actor: Option<Party<'a>>,
    #[serde(borrow, default)]
    target: Option<Target<'a>>,
    #[serde(borrow, default)]
    outcome: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    hash: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Source<'a> {
    #[serde(borrow)]
    host: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Party<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Target<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
}

/// A batch's rows in COPY text format, with where each row ends, so that any prefix can be sent.
#[derive(Default)]
pub struct Rows {
    data: Vec<u8>,
    ends: Vec<usize>,
    /// Per row: its host, seq and hash, for the watermarks.
    marks: Vec<(String, i64, Option<String>)>,
}

impl Rows {
    /// Encodes `records` until one cannot be a row; returns the index and reason of that one, if any.
    pub fn encode(&mut self, records: &[Record<'_>]) -> Option<(usize, String)> {
        self.data.clear();
        self.ends.clear();
        self.marks.clear();
        for (i, record) in records.iter().enumerate() {
            if let Err(reason) = self.push(record) {
                return Some((i, reason));
            }
        }
        None
    }

    fn push(&mut self, record: &Record<'_>) -> Result<(), String> {
        let fields: Fields<'_> = serde_json::from_str(&record.line).map_err(|e| {
            format!("the record is not in trail's log format ({e}): it cannot be a row")
        })?;
        let seq = i64::try_from(record.seq)
            .map_err(|_| format!("seq {} does not fit a bigint column", record.seq))?;
        let start = self.data.len();
        let out = &mut self.data;
        let mut column = |value: Option<&str>, last: bool| {
            match value {
                Some(text) => escape(out, text),
                None => out.extend_from_slice(b"\\N"),
            }
            out.push(if last { b'\n' } else { b'\t' });
        };
        column(Some(&record.id), false);
        column(Some(&seq.to_string()), false);
        column(Some(&fields.source.host), false);
        column(Some(&record.event_type), false);
        column(
            Some(fields.occurred_at.as_deref().unwrap_or(&fields.received_at)),
            false,
        );
        column(Some(&fields.received_at), false);
        column(fields.actor.as_ref().and_then(|a| a.id.as_deref()), false);
        let target = fields.target.as_ref();
        column(target.and_then(|t| t.kind.as_deref()), false);
        column(target.and_then(|t| t.id.as_deref()), false);
        column(fields.outcome.as_deref(), false);
        column(Some(&fields.severity), false);
        column(Some(&record.line), false);
        column(fields.hash.as_deref(), true);
        debug_assert!(self.data.len() > start);
        self.ends.push(self.data.len());
        self.marks.push((
            fields.source.host.into_owned(),
            seq,
            fields.hash.map(Cow::into_owned),
        ));
        Ok(())
    }

    /// How many rows were encoded.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// The COPY data of the first `n` rows.
    pub fn data(&self, n: usize) -> &[u8] {
        self.part(0..n)
    }

    /// The COPY data of the rows in `rows`.
    pub fn part(&self, rows: Range<usize>) -> &[u8] {
        if rows.is_empty() {
            return &[];
        }
        let start = match rows.start {
            0 => 0,
            i => self.ends[i - 1],
        };
        &self.data[start..self.ends[rows.end - 1]]
    }

    /// The seq of the row at `index`.
    pub fn seq(&self, index: usize) -> i64 {
        self.marks[index].1
    }

    /// For the first `n` rows: each host's last seq and the hash of that record, hosts in order of appearance.
    pub fn watermarks(&self, n: usize) -> Vec<(&str, i64, Option<&str>)> {
        let mut order: Vec<&str> = Vec::new();
        let mut last: HashMap<&str, (i64, Option<&str>)> = HashMap::new();
        for (host, seq, hash) in &self.marks[..n] {
            if last
                .insert(host.as_str(), (*seq, hash.as_deref()))
                .is_none()
            {
                order.push(host);
            }
        }
        order
            .into_iter()
            .map(|host| (host, last[host].0, last[host].1))
            .collect()
    }
}

/// Appends `text` as a COPY text-format field: backslash, tab, newline and carriage return escaped.
fn escape(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..i]);
        out.extend_from_slice(escaped);
        from = i + 1;
    }
    out.extend_from_slice(&bytes[from..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_escape(text: &str, expected: &str) {
        let mut out = Vec::new();
        escape(&mut out, text);
        assert_eq!(String::from_utf8(out).unwrap(), expected, "{text:?}");
    }

    #[test]
    fn copy_text_escapes() {
        check_escape("plain", "plain");
        check_escape("", "");
        check_escape(r#"{"m":"a\"b\\c"}"#, r#"{"m":"a\\"b\\\\c"}"#);
        check_escape("tab\there", "tab\\there");
        check_escape("line\nbreak\r", "line\\nbreak\\r");
        check_escape("déjà\\", "déjà\\\\");
    }

    const SAVED: &str = r#"{"seq":7,"id":"019ab2c4-5d6e-7f80-9a1b-000000000007","received_at":"2026-11-23T16:20:00.123456789Z","occurred_at":"2026-11-23T16:19:59.5+00:00","type":"user_login","version":1,"severity":"info","source":{"uid":1000,"gid":1000,"pid":5,"host":"app-1"},"actor":{"id":"u-42","name":"alice"},"target":{"type":"project","id":"p-9"},"outcome":"success","message":"tab\there","payload":{},"hash":"ab12"}"#;
    const STREAMED: &str = r#"{"seq":9,"id":"019ab2c4-5d6e-7f80-9a1b-000000000009","received_at":"2026-11-23T16:20:01Z","occurred_at":"2026-11-23T16:20:01Z","type":"heartbeat","version":1,"severity":"notice","source":{"uid":0,"gid":0,"host":"app-2"},"target":{"id":"t-1"}}"#;

    #[test]
    fn records_become_rows_and_watermarks() {
        let records = [
            Record::new(
                7,
                "019ab2c4-5d6e-7f80-9a1b-000000000007",
                "user_login",
                SAVED,
            ),
            Record::new(
                9,
                "019ab2c4-5d6e-7f80-9a1b-000000000009",
                "heartbeat",
                STREAMED,
            ),
            Record::new(10, "x", "t", "not json"),
        ];
        let mut rows = Rows::default();
        let (bad, reason) = rows.encode(&records).unwrap();
        assert_eq!(bad, 2);
        assert!(reason.contains("not in trail's log format"), "{reason}");
        assert_eq!(rows.len(), 2);
        let text = String::from_utf8(rows.data(2).to_vec()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let first: Vec<&str> = lines[0].split('\t').collect();
        assert_eq!(
            first[..11],
            [
                "019ab2c4-5d6e-7f80-9a1b-000000000007",
                "7",
                "app-1",
                "user_login",
                "2026-11-23T16:19:59.5+00:00",
                "2026-11-23T16:20:00.123456789Z",
                "u-42",
                "project",
                "p-9",
                "success",
                "info",
            ]
        );
        // The record, with the message's tab as JSON wrote it (backslash t), that backslash escaped.
        assert!(
            first[11].contains(r#""message":"tab\\there""#),
            "{}",
            first[11]
        );
        assert_eq!(first[12], "ab12");
        let second: Vec<&str> = lines[1].split('\t').collect();
        // No actor, no target type, no outcome, no hash (a stream-only record).
        assert_eq!(second[6], "\\N");
        assert_eq!(second[7], "\\N");
        assert_eq!(second[8], "t-1");
        assert_eq!(second[9], "\\N");
        assert_eq!(second[12], "\\N");
        assert_eq!(rows.data(1), &rows.data(2)[..lines[0].len() + 1]);
        assert_eq!(rows.data(0), b"");
        assert_eq!(rows.part(1..2), &rows.data(2)[lines[0].len() + 1..]);
        assert_eq!(rows.part(0..1), rows.data(1));
        assert_eq!(rows.part(1..1), b"");
        assert_eq!((rows.seq(0), rows.seq(1)), (7, 9));

        assert_eq!(
            rows.watermarks(2),
            [("app-1", 7, Some("ab12")), ("app-2", 9, None)]
        );
        let twice = [records[0], records[0]];
        assert!(rows.encode(&twice).is_none());
        assert_eq!(rows.watermarks(2), [("app-1", 7, Some("ab12"))]);
    }
}
