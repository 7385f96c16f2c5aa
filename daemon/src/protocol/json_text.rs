//! JSON text as the client wrote it: one pass over text that `serde_json` has already accepted as JSON, which
//! removes insignificant whitespace and copies every token (numbers and strings byte for byte) unchanged, and
//! refuses what a stored record must not hold:
//!
//! - an object with a repeated key, compared after unescaping (`{"a":1,"\u0061":2}` repeats `a`);
//! - nesting deeper than [`MAX_DEPTH`] levels (the request object is level 1), which `serde_json` could not read
//!   back;
//! - a `\u` escape that is half of a surrogate pair, which is not Unicode text.
//!
//! It works with an explicit stack, so no input can exhaust the thread's stack, and never panics on text that is
//! not JSON after all (it reports it instead).

use std::borrow::Cow;
use std::fmt::Write as _;

/// The deepest nesting of objects and arrays a request may have, counting the request object as level 1: the
/// most that `serde_json` reads back, so every stored record stays readable by `trail search` and the sinks.
pub const MAX_DEPTH: usize = 127;

/// Where the number token starting at `from` in accepted JSON text `b` ends: its characters are digits, signs,
/// `.`, `e` and `E` (the text is valid JSON, so that run is exactly the number).
pub(crate) fn number_end(b: &[u8], from: usize) -> usize {
    from + b[from..]
        .iter()
        .take_while(|c| matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
        .count()
}

/// How numbers are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbers {
    /// Byte for byte, as written: what is stored.
    AsWritten,
    /// As written, except that a number beyond the range of a 64-bit float becomes the largest finite one of its
    /// sign (`±1.7976931348623157e308`), so that `serde_json` can read the text for a schema check.
    Finite,
}

/// What is wrong with a JSON text, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// JSON pointer to the object, array or string concerned (`""` is the whole text).
    pub path: String,
    /// What is wrong there, e.g. `duplicate key "a"`.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{} at the top level", self.message)
        } else {
            write!(f, "{} at {}", self.message, self.path)
        }
    }
}

enum Frame {
    /// An open object; its keys are `keys[keys_from..]`, the member being read is `keys.last()`.
    Object { keys_from: usize },
    /// An open array and the index of the element being read.
    Array { index: usize },
}

/// Appends `text` to `out` without insignificant whitespace, every token unchanged (see [`Numbers`]).
///
/// `text` is one JSON value that `serde_json` accepted; `base` is its JSON pointer in the request (paths in
/// problems start with it) and `depth` the number of containers around it.
pub fn compact(
    text: &str,
    base: &str,
    depth: usize,
    numbers: Numbers,
    out: &mut Vec<u8>,
) -> Result<(), Problem> {
    Walk {
        b: text.as_bytes(),
        text,
        i: 0,
        stack: Vec::new(),
        keys: Vec::new(),
        base,
        depth,
    }
    .run(numbers, out)
}

struct Walk<'a> {
    b: &'a [u8],
    text: &'a str,
    i: usize,
    stack: Vec<Frame>,
    keys: Vec<Cow<'a, str>>,
    base: &'a str,
    depth: usize,
}

impl<'a> Walk<'a> {
    fn run(mut self, numbers: Numbers, out: &mut Vec<u8>) -> Result<(), Problem> {
        loop {
            // A value starts here.
            self.skip_whitespace();
            match self.peek()? {
                open @ (b'{' | b'[') => {
                    if self.depth + self.stack.len() + 1 > MAX_DEPTH {
                        return Err(self.problem(
                            self.stack.len(),
                            format!("nesting deeper than {MAX_DEPTH} levels"),
                        ));
                    }
                    self.i += 1;
                    out.push(open);
                    self.skip_whitespace();
                    if open == b'{' {
                        self.stack.push(Frame::Object {
                            keys_from: self.keys.len(),
                        });
                        if self.peek()? != b'}' {
                            self.key(out)?;
                            continue;
                        }
                    } else {
                        self.stack.push(Frame::Array { index: 0 });
                        if self.peek()? != b']' {
                            continue;
                        }
                    }
                }
                b'"' => {
                    let (start, _) = self.string()?;
                    out.extend_from_slice(&self.b[start..self.i]);
                }
                b'-' | b'0'..=b'9' => self.number(numbers, out),
                b't' | b'f' | b'n' => {
                    let start = self.i;
                    while self.i < self.b.len() && self.b[self.i].is_ascii_lowercase() {
                        self.i += 1;
                    }
                    out.extend_from_slice(&self.b[start..self.i]);
                }
                _ => return Err(self.malformed()),
            }
            // After a value: close containers until one continues with a comma, or the text ends.
            loop {
                self.skip_whitespace();
                let Some(frame) = self.stack.last_mut() else {
                    return if self.i == self.b.len() {
                        Ok(())
                    } else {
                        Err(self.malformed())
                    };
                };
                let object = match frame {
                    Frame::Object { keys_from } => Some(*keys_from),
                    Frame::Array { .. } => None,
                };
                match (self.b.get(self.i), object) {
                    (Some(b','), object) => {
                        self.i += 1;
                        out.push(b',');
                        if let Frame::Array { index } = frame {
                            *index += 1;
                        }
                        if object.is_some() {
                            self.key(out)?;
                        }
                        break;
                    }
                    (Some(b'}'), Some(from)) => {
                        self.i += 1;
                        out.push(b'}');
                        self.close_object(from)?;
                    }
                    (Some(b']'), None) => {
                        self.i += 1;
                        out.push(b']');
                        self.stack.pop();
                    }
                    _ => return Err(self.malformed()),
                }
            }
        }
    }

    /// Reads `"key":` (copied to `out`) and makes it the member being read of the innermost object.
    fn key(&mut self, out: &mut Vec<u8>) -> Result<(), Problem> {
        self.skip_whitespace();
        if self.peek()? != b'"' {
            return Err(self.malformed());
        }
        let (start, escaped) = self.string().map_err(|mut p| {
            // The key is not read yet: the problem is in the object itself.
            p.path = self.problem(self.stack.len() - 1, String::new()).path;
            p
        })?;
        let end = self.i;
        out.extend_from_slice(&self.b[start..end]);
        let key = if escaped {
            let quoted = &self.text[start..end];
            Cow::Owned(serde_json::from_str::<String>(quoted).map_err(|e| {
                self.problem(
                    self.stack.len(),
                    format!("key {quoted} cannot be read: {e}"),
                )
            })?)
        } else {
            Cow::Borrowed(&self.text[start + 1..end - 1])
        };
        self.keys.push(key);
        self.skip_whitespace();
        if self.peek()? != b':' {
            return Err(self.malformed());
        }
        self.i += 1;
        out.push(b':');
        Ok(())
    }

    /// Closes the innermost object, whose keys are `keys[from..]`, refusing it when a key repeats.
    fn close_object(&mut self, from: usize) -> Result<(), Problem> {
        let keys = &mut self.keys[from..];
        let repeated = match keys.len() {
            0 | 1 => None,
            // Small objects, the usual case: compare each pair rather than sort.
            2..=8 => (1..keys.len()).find_map(|j| {
                keys[..j]
                    .iter()
                    .any(|k| *k == keys[j])
                    .then(|| keys[j].to_string())
            }),
            _ => {
                keys.sort_unstable();
                keys.windows(2)
                    .find(|w| w[0] == w[1])
                    .map(|w| w[0].to_string())
            }
        };
        if let Some(key) = repeated {
            return Err(self.problem(self.stack.len() - 1, format!("duplicate key {key:?}")));
        }
        self.keys.truncate(from);
        self.stack.pop();
        Ok(())
    }

    /// Skips a string starting at its opening quote; returns where it started and whether it has escapes.
    fn string(&mut self) -> Result<(usize, bool), Problem> {
        let start = self.i;
        let mut escaped = false;
        self.i += 1;
        loop {
            let Some(at) = memchr::memchr2(b'"', b'\\', &self.b[self.i..]) else {
                return Err(self.malformed());
            };
            self.i += at;
            if self.b[self.i] == b'"' {
                self.i += 1;
                return Ok((start, escaped));
            }
            escaped = true;
            match self.b.get(self.i + 1) {
                Some(b'u') => {
                    let unit = self.hex(self.i + 2)?;
                    self.i += 6;
                    if (0xdc00..0xe000).contains(&unit) {
                        return Err(self.lone_surrogate());
                    }
                    if (0xd800..0xdc00).contains(&unit) {
                        let low = (self.b.get(self.i) == Some(&b'\\')
                            && self.b.get(self.i + 1) == Some(&b'u'))
                        .then(|| self.hex(self.i + 2))
                        .transpose()?;
                        if !low.is_some_and(|l| (0xdc00..0xe000).contains(&l)) {
                            return Err(self.lone_surrogate());
                        }
                        self.i += 6;
                    }
                }
                Some(_) => self.i += 2,
                None => return Err(self.malformed()),
            }
        }
    }

    /// The four hex digits at `at`.
    fn hex(&self, at: usize) -> Result<u32, Problem> {
        self.text
            .get(at..at + 4)
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| self.malformed())
    }

    fn number(&mut self, numbers: Numbers, out: &mut Vec<u8>) {
        let start = self.i;
        self.i = number_end(self.b, start);
        let written = &self.text[start..self.i];
        if numbers == Numbers::Finite
            && let Ok(x) = written.parse::<f64>()
            && x.is_infinite()
        {
            let _ = write!(Bytes(out), "{:e}", f64::MAX.copysign(x));
            return;
        }
        out.extend_from_slice(written.as_bytes());
    }

    fn skip_whitespace(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn peek(&self) -> Result<u8, Problem> {
        self.b.get(self.i).copied().ok_or_else(|| self.malformed())
    }

    fn lone_surrogate(&self) -> Problem {
        self.problem(
            self.stack.len(),
            "a string holds half of a UTF-16 surrogate pair (\\ud800-\\udfff), which is not Unicode text".into(),
        )
    }

    fn malformed(&self) -> Problem {
        self.problem(
            self.stack.len(),
            format!("unexpected text at byte {}", self.i),
        )
    }

    /// A problem located at the JSON pointer of the first `frames` open containers' current members.
    fn problem(&self, frames: usize, message: String) -> Problem {
        let mut path = self.base.to_owned();
        for (n, frame) in self.stack.iter().enumerate().take(frames) {
            path.push('/');
            match frame {
                Frame::Array { index } => {
                    let _ = write!(path, "{index}");
                }
                Frame::Object { keys_from } => {
                    // The member being read is the object's last key so far; its keys end where the next
                    // object's begin.
                    let end = self.stack[n + 1..]
                        .iter()
                        .find_map(|f| match f {
                            Frame::Object { keys_from } => Some(*keys_from),
                            Frame::Array { .. } => None,
                        })
                        .unwrap_or(self.keys.len());
                    if end > *keys_from {
                        path.push_str(&self.keys[end - 1].replace('~', "~0").replace('/', "~1"));
                    }
                }
            }
        }
        Problem { path, message }
    }
}

/// `fmt::Write` into a byte buffer.
struct Bytes<'v>(&'v mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compacts `text` (which must be JSON) and renders the outcome: the compact text, or `error: <problem>`.
    fn outcome(text: &str, numbers: Numbers) -> String {
        serde_json::from_str::<serde::de::IgnoredAny>(text).expect("test input is JSON");
        let mut out = Vec::new();
        match compact(text, "/payload", 1, numbers, &mut out) {
            Ok(()) => String::from_utf8(out).unwrap(),
            Err(p) => format!("error: {p}"),
        }
    }

    #[test]
    fn tokens_are_copied_as_written() {
        let check = |text: &str, expected: &str| {
            assert_eq!(outcome(text, Numbers::AsWritten), expected, "{text}")
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
        check(r#"{"n":1E400}"#, r#"{"n":1E400}"#);
        check(r#"{"n":-1e-400}"#, r#"{"n":-1e-400}"#);
        check(r#"{"n":-0}"#, r#"{"n":-0}"#);
        check(
            r#"{"n":1.0,"m":1e2,"o":2.50}"#,
            r#"{"n":1.0,"m":1e2,"o":2.50}"#,
        );
        check(
            r#"{"s":"\u0061\/\"x\" é \ud83d\ude00"}"#,
            r#"{"s":"\u0061\/\"x\" é \ud83d\ude00"}"#,
        );
        check(
            "{ \"a\" :\t[ 1 , { } , [ ] , true,false , null ] ,\r\"b\" : \"  spaced  \" }",
            r#"{"a":[1,{},[],true,false,null],"b":"  spaced  "}"#,
        );
        check(r#"{}"#, r#"{}"#);
        check(r#"[]"#, r#"[]"#);
        check(
            r#"{"a":{"b":{"c":[[{"d":1}]]}}}"#,
            r#"{"a":{"b":{"c":[[{"d":1}]]}}}"#,
        );
        check(
            r#"{"a":1,"b":{"a":1},"c":[{"a":1},{"a":2}]}"#,
            r#"{"a":1,"b":{"a":1},"c":[{"a":1},{"a":2}]}"#,
        );
        check(r#"{"A":1,"a":2,"a ":3}"#, r#"{"A":1,"a":2,"a ":3}"#);
    }

    #[test]
    fn numbers_beyond_a_float_are_bounded_for_checks() {
        let check = |text: &str, expected: &str| {
            assert_eq!(outcome(text, Numbers::Finite), expected, "{text}")
        };
        check(r#"{"n":1E400}"#, r#"{"n":1.7976931348623157e308}"#);
        check(r#"{"n":-1e400}"#, r#"{"n":-1.7976931348623157e308}"#);
        check(r#"{"n":1e-400}"#, r#"{"n":1e-400}"#);
        check(
            r#"{"n":123456789012345678901234567890}"#,
            r#"{"n":123456789012345678901234567890}"#,
        );
        let digits = format!(r#"{{"n":{}}}"#, "9".repeat(400));
        check(&digits, r#"{"n":1.7976931348623157e308}"#);
    }

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        let check = |text: &str, expected: &str| {
            assert_eq!(
                outcome(text, Numbers::AsWritten),
                format!("error: {expected}"),
                "{text}"
            )
        };
        check(r#"{"a":1,"a":2}"#, r#"duplicate key "a" at /payload"#);
        check(r#"{"a":1,"\u0061":2}"#, r#"duplicate key "a" at /payload"#);
        check(
            r#"{"x":{"a":1,"b":2,"a":3}}"#,
            r#"duplicate key "a" at /payload/x"#,
        );
        check(
            r#"{"x":[{"a":1},{"b":1,"b":2}]}"#,
            r#"duplicate key "b" at /payload/x/1"#,
        );
        check(
            r#"{"x":[[0,{"y":{"k":1,"k":1}}]]}"#,
            r#"duplicate key "k" at /payload/x/0/1/y"#,
        );
        check(
            r#"{"a/b":{"c~d":{"e":1,"e":1}}}"#,
            r#"duplicate key "e" at /payload/a~1b/c~0d"#,
        );
        check(
            r#"{"x":{"a":1},"y":2,"x":3}"#,
            r#"duplicate key "x" at /payload"#,
        );
        check(
            r#"{"\"":1,"\u0022":2}"#,
            r#"duplicate key "\"" at /payload"#,
        );
        let many: Vec<String> = (0..20).map(|i| format!("\"k{i}\":{i}")).collect();
        check(
            &format!("{{{},\"k7\":0}}", many.join(",")),
            r#"duplicate key "k7" at /payload"#,
        );
        let many = format!("{{{}}}", many.join(","));
        assert_eq!(outcome(&many, Numbers::AsWritten), many);
    }

    #[test]
    fn lone_surrogates_and_deep_nesting_are_refused() {
        let check = |text: &str, expected: &str| {
            assert_eq!(
                outcome(text, Numbers::AsWritten),
                format!("error: {expected}"),
                "{text}"
            )
        };
        let half = "a string holds half of a UTF-16 surrogate pair (\\ud800-\\udfff), which is not Unicode text";
        check(r#"{"s":"\ud800"}"#, &format!("{half} at /payload/s"));
        check(r#"{"s":["\udc00x"]}"#, &format!("{half} at /payload/s/0"));
        check(r#"{"s":"\ud800\u0041"}"#, &format!("{half} at /payload/s"));
        check(r#"{"\ud800":1}"#, &format!("{half} at /payload"));
        // The payload is at level 2 of the request: 125 more levels fit, 126 do not.
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let fits = format!(r#"{{"a":{}}}"#, nested(MAX_DEPTH - 2));
        assert_eq!(outcome(&fits, Numbers::AsWritten), fits);
        let deep = format!(r#"{{"a":{}}}"#, nested(MAX_DEPTH - 1));
        let path = format!("/payload/a{}", "/0".repeat(MAX_DEPTH - 2));
        check(
            &deep,
            &format!("nesting deeper than {MAX_DEPTH} levels at {path}"),
        );
        // A million levels are refused, not a stack overflow.
        let mut out = Vec::new();
        assert!(compact(&nested(1_000_000), "", 0, Numbers::AsWritten, &mut out).is_err());
    }

    #[test]
    fn text_that_is_not_json_is_reported_not_panicked_on() {
        for text in [
            "",
            "{",
            "{\"a\"",
            "{\"a\":",
            "{\"a\":1",
            "[1,",
            "\"abc",
            "\"\\u12",
            "{\"a\":1]",
            "[1}",
            "1 2",
            "{1:2}",
            "@",
        ] {
            let mut out = Vec::new();
            assert!(
                compact(text, "", 0, Numbers::AsWritten, &mut out).is_err(),
                "{text:?}"
            );
        }
    }
}
