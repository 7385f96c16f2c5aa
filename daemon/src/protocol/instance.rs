//! The payload as its type's schema sees it: a flat tree over the payload's text, in one vector, read once while
//! the request is parsed (the same pass refuses what a stored payload must not hold, see [`Doc::read`]).
//!
//! The schema check used to read the payload into a `serde_json::Value` (an ordered map per object, a `String`
//! per key and per string), check it and drop it: a dozen allocations for a small payload. [`Doc`] reads the
//! same text into one vector of items that borrow the text's strings (a string with escapes is unescaped into its
//! own buffer), and [`Tape`] lets `jsonschema` validate it in place through the crate's API for custom JSON
//! representations. The schema sees what it saw before: every number as `serde_json` reads it (the nearest
//! 64-bit float, or an integer when it is one that fits), a number beyond `±1.7976931348623157e308` as that bound,
//! members in the order written; errors report the same instance and paths, built as a `Value` only then.
//!
//! The text is a payload that `serde_json` accepted as JSON; anything else, and what a stored payload must not
//! hold, is reported as an error, never a panic.

use std::borrow::Cow;

use jsonschema::JsonType;
use jsonschema::json::{Array, Json, Node, NodeIdentity, Object};
use serde_json::{Map, Number, Value};

/// Objects with more members than this get a sorted index of their keys, so that a lookup is a binary search.
const SCAN_MEMBERS: u32 = 16;
/// No index.
const NONE: u32 = u32::MAX;

/// One JSON value of a [`Doc`]; containers are followed by their contents (an object's as key, value, key, ...).
#[derive(Debug)]
enum Item<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    /// An object member's name; its value is the next item.
    Key(Cow<'a, str>),
    /// `len` elements; `end` is the index after the last item of the array's contents.
    Array {
        len: u32,
        end: u32,
    },
    /// `len` members; `end` as for arrays; `index` is where its sorted keys start in [`Doc::index`] (or
    /// [`NONE`]).
    Object {
        len: u32,
        end: u32,
        index: u32,
    },
}

/// A payload read for its schema check.
#[derive(Debug)]
pub struct Doc<'a> {
    items: Vec<Item<'a>>,
    /// For each large object, the positions of its keys sorted by key.
    index: Vec<u32>,
}

impl<'a> Doc<'a> {
    /// Reads one JSON value, inside `depth` containers, from text that `serde_json` accepted; also says whether
    /// the text is compact (no whitespace between tokens).
    ///
    /// Refuses what [`json_text`](super::json_text) refuses: a repeated key (compared after unescaping), nesting
    /// deeper than [`MAX_DEPTH`](super::MAX_DEPTH) with the containers around it, a lone surrogate (which
    /// `serde_json` does not unescape). Its messages are short: the caller asks `json_text` for the precise one.
    pub fn read(text: &'a str, depth: usize) -> Result<(Doc<'a>, bool), String> {
        Doc::reader(text, depth, false, false)
            .run_to_end()
            .map(|(doc, compact, _)| (doc, compact))
    }

    /// Reads the JSON value at the start of `text`, which need not be JSON after it and was not checked by
    /// `serde_json`: as [`Doc::read`], and also refuses a control character in a string (every other rule of JSON
    /// holds in what `read` accepts). Returns the value, whether it is compact, and how many bytes it took.
    pub fn read_prefix(text: &'a str, depth: usize) -> Result<(Doc<'a>, bool, usize), String> {
        Doc::reader(text, depth, true, true).run_to_end()
    }

    fn reader(text: &'a str, depth: usize, prefix: bool, strict: bool) -> Reader<'a> {
        Reader {
            text,
            b: text.as_bytes(),
            i: 0,
            doc: Doc {
                // A compact payload needs at least 2 bytes per item, most need 6 or more.
                items: Vec::with_capacity(text.len() / 6 + 2),
                index: Vec::new(),
            },
            open: Vec::new(),
            depth,
            spaced: false,
            prefix,
            strict,
        }
    }

    /// The root value.
    pub fn root(&self) -> At<'_> {
        At::Item(self, 0)
    }

    /// The index after the last item of the value at `at`.
    fn end(&self, at: u32) -> u32 {
        match self.items[at as usize] {
            Item::Array { end, .. } | Item::Object { end, .. } => end,
            _ => at + 1,
        }
    }

    fn value(&self, at: u32) -> Value {
        match &self.items[at as usize] {
            Item::Null => Value::Null,
            Item::Bool(b) => Value::Bool(*b),
            Item::Number(n) => Value::Number(n.clone()),
            Item::String(s) | Item::Key(s) => Value::String(s.to_string()),
            Item::Array { .. } => Value::Array(
                Elements { doc: self, at }
                    .elements()
                    .map(|e| e.to_value().into_owned())
                    .collect(),
            ),
            Item::Object { .. } => {
                let mut map = Map::new();
                for (name, value) in (Members { doc: self, at }).members() {
                    map.insert(name.to_owned(), value.to_value().into_owned());
                }
                Value::Object(map)
            }
        }
    }
}

struct Reader<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    doc: Doc<'a>,
    /// The open containers' items.
    open: Vec<u32>,
    /// Containers around the text.
    depth: usize,
    /// Whitespace was skipped somewhere.
    spaced: bool,
    /// The value may be followed by other text.
    prefix: bool,
    /// Strings may not hold control characters (the text was not checked by `serde_json`).
    strict: bool,
}

impl<'a> Reader<'a> {
    fn run_to_end(mut self) -> Result<(Doc<'a>, bool, usize), String> {
        self.run()?;
        Ok((self.doc, !self.spaced, self.i))
    }

    fn run(&mut self) -> Result<(), String> {
        loop {
            // A value starts here (in an object, after its key).
            self.space();
            match self.peek()? {
                open @ (b'{' | b'[') if self.depth + self.open.len() + 1 > super::MAX_DEPTH => {
                    return Err(format!(
                        "{} nested too deep at byte {}",
                        open as char, self.i
                    ));
                }
                b'{' => {
                    self.i += 1;
                    self.space();
                    let at = self.push(Item::Object {
                        len: 0,
                        end: 0,
                        index: NONE,
                    });
                    self.open.push(at);
                    if self.peek()? == b'}' {
                        self.i += 1;
                        self.close()?;
                    } else {
                        self.key()?;
                        continue;
                    }
                }
                b'[' => {
                    self.i += 1;
                    self.space();
                    let at = self.push(Item::Array { len: 0, end: 0 });
                    self.open.push(at);
                    if self.peek()? == b']' {
                        self.i += 1;
                        self.close()?;
                    } else {
                        continue;
                    }
                }
                b'"' => {
                    let s = self.string()?;
                    self.push(Item::String(s));
                }
                b'-' | b'0'..=b'9' => {
                    let n = self.number()?;
                    self.push(Item::Number(n));
                }
                _ => {
                    let rest = &self.b[self.i..];
                    let (item, len) = if rest.starts_with(b"true") {
                        (Item::Bool(true), 4)
                    } else if rest.starts_with(b"false") {
                        (Item::Bool(false), 5)
                    } else if rest.starts_with(b"null") {
                        (Item::Null, 4)
                    } else {
                        return Err(self.unexpected());
                    };
                    self.i += len;
                    self.push(item);
                }
            }
            // After a value: count it in its container, close containers until one continues, or end.
            loop {
                if self.prefix && self.open.is_empty() {
                    return Ok(());
                }
                self.space();
                let Some(&parent) = self.open.last() else {
                    return if self.i == self.b.len() {
                        Ok(())
                    } else {
                        Err(self.unexpected())
                    };
                };
                let object = match &mut self.doc.items[parent as usize] {
                    Item::Array { len, .. } => {
                        *len += 1;
                        false
                    }
                    Item::Object { len, .. } => {
                        *len += 1;
                        true
                    }
                    _ => unreachable!("only containers are open"),
                };
                match (self.b.get(self.i), object) {
                    (Some(b','), _) => {
                        self.i += 1;
                        if object {
                            self.key()?;
                        }
                        break;
                    }
                    (Some(b'}'), true) | (Some(b']'), false) => {
                        self.i += 1;
                        self.close()?;
                    }
                    _ => return Err(self.unexpected()),
                }
            }
        }
    }

    fn push(&mut self, item: Item<'a>) -> u32 {
        self.doc.items.push(item);
        (self.doc.items.len() - 1) as u32
    }

    /// Closes the innermost container: its end, and for a large object the sorted index of its keys.
    fn close(&mut self) -> Result<(), String> {
        let at = self.open.pop().ok_or_else(|| self.unexpected())?;
        let end = self.doc.items.len() as u32;
        let len = match &mut self.doc.items[at as usize] {
            Item::Array { end: e, .. } => {
                *e = end;
                return Ok(());
            }
            Item::Object { end: e, len, .. } => {
                *e = end;
                *len
            }
            _ => unreachable!("only containers are open"),
        };
        let repeated = if len <= SCAN_MEMBERS {
            // Small objects, the usual case: each key against those before it.
            let mut keys = [0u32; SCAN_MEMBERS as usize];
            let mut key = at + 1;
            let mut repeated = false;
            for n in 0..len as usize {
                let name = key_of(&self.doc.items, key);
                repeated |= keys[..n]
                    .iter()
                    .any(|k| key_of(&self.doc.items, *k) == name);
                keys[n] = key;
                key = self.doc.end(key + 1);
            }
            repeated
        } else {
            let from = self.doc.index.len();
            let mut key = at + 1;
            while key < end {
                self.doc.index.push(key);
                key = self.doc.end(key + 1);
            }
            let items = &self.doc.items;
            let sorted = &mut self.doc.index[from..];
            sorted.sort_unstable_by(|a, b| key_of(items, *a).cmp(key_of(items, *b)));
            let repeated = sorted
                .windows(2)
                .any(|w| key_of(items, w[0]) == key_of(items, w[1]));
            if let Item::Object { index, .. } = &mut self.doc.items[at as usize] {
                *index = from as u32;
            }
            repeated
        };
        if repeated {
            return Err(format!(
                "an object repeats a key (it ends at byte {})",
                self.i
            ));
        }
        Ok(())
    }

    /// Reads `"key":` as the next item.
    fn key(&mut self) -> Result<(), String> {
        self.space();
        if self.peek()? != b'"' {
            return Err(self.unexpected());
        }
        let key = self.string()?;
        self.push(Item::Key(key));
        self.space();
        if self.peek()? != b':' {
            return Err(self.unexpected());
        }
        self.i += 1;
        Ok(())
    }

    /// Reads a string at its opening quote: borrowed when it has no escapes.
    fn string(&mut self) -> Result<Cow<'a, str>, String> {
        let start = self.i;
        let mut escaped = false;
        let mut i = start + 1;
        loop {
            i += plain_run(&self.b[i..]);
            match self.b.get(i) {
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    i += 2;
                }
                Some(_) if self.strict => {
                    return Err(format!("a control character in the string at byte {start}"));
                }
                // Not `strict`: `serde_json` read the text, so this cannot be (but is read on correctly).
                Some(_) => i += 1,
                None => return Err(self.unexpected()),
            }
            if i > self.b.len() {
                return Err(self.unexpected());
            }
        }
        self.i = i + 1;
        let quoted = self
            .text
            .get(start..self.i)
            .ok_or_else(|| self.unexpected())?;
        if escaped {
            // `serde_json` refuses control characters, bad escapes and lone surrogates.
            serde_json::from_str::<String>(quoted)
                .map(Cow::Owned)
                .map_err(|e| format!("string at byte {start} cannot be read: {e}"))
        } else {
            Ok(Cow::Borrowed(&quoted[1..quoted.len() - 1]))
        }
    }

    /// Reads a number as `serde_json` does; beyond the range of a 64-bit float, as the largest finite one of its
    /// sign.
    fn number(&mut self) -> Result<Number, String> {
        let start = self.i;
        self.i = crate::protocol::number_end(self.b, start);
        let written = &self.text[start..self.i];
        // The common case, a small non-negative integer without a leading zero, without a parser.
        let digits = written.as_bytes();
        if (1..=19).contains(&digits.len())
            && digits.iter().all(u8::is_ascii_digit)
            && (digits[0] != b'0' || digits.len() == 1)
            && let Ok(n) = written.parse::<u64>()
        {
            return Ok(Number::from(n));
        }
        match serde_json::from_str::<Number>(written) {
            Ok(n) => Ok(n),
            Err(e) => match written.parse::<f64>() {
                Ok(x) if x.is_infinite() => {
                    Ok(Number::from_f64(f64::MAX.copysign(x)).expect("finite"))
                }
                _ => Err(format!(
                    "number {written} at byte {start} cannot be read: {e}"
                )),
            },
        }
    }

    /// Skips whitespace between tokens, noting that there was some.
    fn space(&mut self) {
        let start = self.i;
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
        self.spaced |= self.i > start;
    }

    fn peek(&self) -> Result<u8, String> {
        self.b.get(self.i).copied().ok_or_else(|| self.unexpected())
    }

    fn unexpected(&self) -> String {
        format!("unexpected text at byte {}", self.i)
    }
}

/// The length of the run of `b` that a JSON string can hold as it is: up to the first `"`, `\\` or control
/// character (or all of `b`). Strings in requests are short, so this reads eight bytes at a time in a word
/// instead of calling out to a vectorized search whose setup would cost more than the string.
pub(super) fn plain_run(b: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // A byte of `x` below `n` (for n <= 0x80) flags its high bit. Bytes after a flagged one may be flagged
    // wrongly (the subtraction borrows), never one before it: the lowest flag is exact.
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS;
    let mut i = 0;
    while let Some(word) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let flags = below(x ^ (ONES * u64::from(b'"')), 1)
            | below(x ^ (ONES * u64::from(b'\\')), 1)
            | below(x, 0x20);
        if flags != 0 {
            return i + (flags.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + b[i..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .unwrap_or(b.len() - i)
}

fn key_of<'i>(items: &'i [Item<'_>], at: u32) -> &'i str {
    match &items[at as usize] {
        Item::Key(k) => k,
        _ => "",
    }
}

/// The representation, for `jsonschema::options_for`.
pub struct Tape;

impl Json for Tape {
    type Node<'a> = At<'a>;
    type PreparedKey = String;
    type StringBuffer = ();

    // Lookups in small objects scan their keys, as `serde_json`'s ordered map does.
    const KEYS_PER_LOOKUP: usize = 2;
    const ACYCLIC: bool = true;

    fn prepare_key(key: &str) -> String {
        key.to_owned()
    }

    fn with_string_node<T>((): &mut (), string: &str, f: impl FnOnce(At<'_>) -> T) -> T {
        f(At::Name(string))
    }
}

/// A value of a [`Doc`], or a property name being checked on its own (`propertyNames`).
#[derive(Clone, Copy)]
pub enum At<'a> {
    /// The item at this index.
    Item(&'a Doc<'a>, u32),
    /// A string that is not in the document.
    Name(&'a str),
}

impl<'a> At<'a> {
    fn item(&self) -> Option<&'a Item<'a>> {
        match *self {
            At::Item(doc, at) => Some(&doc.items[at as usize]),
            At::Name(_) => None,
        }
    }
}

impl<'a> Node<'a, Tape> for At<'a> {
    type Object = Members<'a>;
    type Array = Elements<'a>;
    type Number = &'a Number;

    fn as_object(&self) -> Option<Members<'a>> {
        match (*self, self.item()) {
            (At::Item(doc, at), Some(Item::Object { .. })) => Some(Members { doc, at }),
            _ => None,
        }
    }

    fn as_array(&self) -> Option<Elements<'a>> {
        match (*self, self.item()) {
            (At::Item(doc, at), Some(Item::Array { .. })) => Some(Elements { doc, at }),
            _ => None,
        }
    }

    fn as_string(&self) -> Option<Cow<'a, str>> {
        match (*self, self.item()) {
            (At::Name(s), _) => Some(Cow::Borrowed(s)),
            (_, Some(Item::String(s) | Item::Key(s))) => Some(Cow::Borrowed(s)),
            _ => None,
        }
    }

    fn as_number(&self) -> Option<&'a Number> {
        match self.item() {
            Some(Item::Number(n)) => Some(n),
            _ => None,
        }
    }

    fn as_boolean(&self) -> Option<bool> {
        match self.item() {
            Some(Item::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        matches!(self.item(), Some(Item::Null))
    }

    fn json_type(&self) -> JsonType {
        match self.item() {
            None | Some(Item::String(_) | Item::Key(_)) => JsonType::String,
            Some(Item::Null) => JsonType::Null,
            Some(Item::Bool(_)) => JsonType::Boolean,
            Some(Item::Number(_)) => JsonType::Number,
            Some(Item::Array { .. }) => JsonType::Array,
            Some(Item::Object { .. }) => JsonType::Object,
        }
    }

    fn string_length(&self) -> Option<u64> {
        self.as_string().map(|s| s.chars().count() as u64)
    }

    fn string_length_within(&self, min: u64, max: u64) -> Option<bool> {
        let s = self.as_string()?;
        // A code point takes one to four bytes, so the count lies in `ceil(bytes / 4)..=bytes`.
        let bytes = s.len() as u64;
        let fewest = bytes.div_ceil(4);
        if bytes < min || fewest > max {
            return Some(false);
        }
        if min <= fewest && bytes <= max {
            return Some(true);
        }
        Some((min..=max).contains(&(s.chars().count() as u64)))
    }

    fn to_value(&self) -> Cow<'a, Value> {
        match *self {
            At::Item(doc, at) => Cow::Owned(doc.value(at)),
            At::Name(s) => Cow::Owned(Value::String(s.to_owned())),
        }
    }

    fn identity(&self) -> Option<NodeIdentity> {
        match *self {
            At::Item(doc, at) => Some(NodeIdentity::tagged(
                std::ptr::from_ref::<Doc<'_>>(doc) as usize,
                at,
            )),
            At::Name(_) => None,
        }
    }
}

/// An object of a [`Doc`].
#[derive(Clone, Copy)]
pub struct Members<'a> {
    doc: &'a Doc<'a>,
    at: u32,
}

impl<'a> Object<'a, Tape> for Members<'a> {
    type Node = At<'a>;
    type MemberName = &'a str;
    type MembersIter = MembersIter<'a>;

    fn len(&self) -> usize {
        match self.doc.items[self.at as usize] {
            Item::Object { len, .. } => len as usize,
            _ => 0,
        }
    }

    fn get(&self, key: &String) -> Option<At<'a>> {
        let (len, index) = match self.doc.items[self.at as usize] {
            Item::Object { len, index, .. } => (len, index),
            _ => return None,
        };
        if index == NONE {
            return self
                .members()
                .find(|(name, _)| *name == key.as_str())
                .map(|(_, value)| value);
        }
        let keys = &self.doc.index[index as usize..(index + len) as usize];
        let items = &self.doc.items;
        keys.binary_search_by(|k| key_of(items, *k).cmp(key.as_str()))
            .ok()
            .map(|found| At::Item(self.doc, keys[found] + 1))
    }

    fn members(&self) -> MembersIter<'a> {
        MembersIter {
            doc: self.doc,
            next: self.at + 1,
            end: self.doc.end(self.at),
        }
    }
}

/// The members of an object, in the order written.
pub struct MembersIter<'a> {
    doc: &'a Doc<'a>,
    next: u32,
    end: u32,
}

impl<'a> Iterator for MembersIter<'a> {
    type Item = (&'a str, At<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let key = self.next;
        self.next = self.doc.end(key + 1);
        Some((key_of(&self.doc.items, key), At::Item(self.doc, key + 1)))
    }
}

/// An array of a [`Doc`].
#[derive(Clone, Copy)]
pub struct Elements<'a> {
    doc: &'a Doc<'a>,
    at: u32,
}

impl<'a> Array<'a, Tape> for Elements<'a> {
    type Node = At<'a>;
    type ElementsIter = ElementsIter<'a>;

    fn len(&self) -> usize {
        match self.doc.items[self.at as usize] {
            Item::Array { len, .. } => len as usize,
            _ => 0,
        }
    }

    fn elements(&self) -> ElementsIter<'a> {
        ElementsIter {
            doc: self.doc,
            next: self.at + 1,
            end: self.doc.end(self.at),
        }
    }
}

/// The elements of an array, in order.
pub struct ElementsIter<'a> {
    doc: &'a Doc<'a>,
    next: u32,
    end: u32,
}

impl<'a> Iterator for ElementsIter<'a> {
    type Item = At<'a>;

    fn next(&mut self) -> Option<At<'a>> {
        if self.next >= self.end {
            return None;
        }
        let at = self.next;
        self.next = self.doc.end(at);
        Some(At::Item(self.doc, at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads one JSON value outside any container.
    fn parse(text: &str) -> Result<Doc<'_>, String> {
        Doc::read(text, 0).map(|(doc, _)| doc)
    }

    /// The word-at-a-time scan stops where a byte-by-byte one does, wherever the stopping byte falls in a word,
    /// with bytes on either side of every boundary it tests (UTF-8's high bytes, `!`, `#`, `[`, `]`, 0x1f, 0x20).
    #[test]
    fn plain_run_stops_where_a_byte_scan_stops() {
        let bytes = [
            b'a', b' ', b'!', b'"', b'#', b'[', b'\\', b']', 0x00, 0x1f, 0x7f, 0x80, 0xc3, 0xff,
            b'\n',
        ];
        let mut next = crate::protocol::tests::xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..200_000 {
            let len = next(40);
            // Mostly plain letters, so that runs are long enough to cross words.
            let text: Vec<u8> = (0..len)
                .map(|_| {
                    if next(6) == 0 {
                        bytes[next(bytes.len())]
                    } else {
                        b'a' + next(26) as u8
                    }
                })
                .collect();
            let expected = text
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .unwrap_or(text.len());
            assert_eq!(plain_run(&text), expected, "{text:?}");
        }
    }

    /// The tree reads back as the `Value` that `serde_json` reads from the same text.
    #[test]
    fn reads_as_serde_json_does() {
        let check = |text: &str| {
            let doc = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let expected: Value = serde_json::from_str(text).unwrap();
            assert_eq!(doc.root().to_value().into_owned(), expected, "{text}");
        };
        check(r#"{}"#);
        check(r#"[]"#);
        check(r#"{"a":1,"b":[true,false,null,[],{}],"c":{"d":"e"}}"#);
        check(r#"{"s":"\u00e9\/é\ud83d\ude00\"\\","k\"ey":"v"}"#);
        check(
            r#"{"n":-0,"m":1.50,"o":2e+3,"p":-12,"q":18446744073709551615,"r":18446744073709551616}"#,
        );
        check(r#"{"n":0.1000000000000000055511151231257827,"m":123456789012345678901234567890}"#);
        check(r#"[[[[1]]],[2,[3,[4]]]]"#);
        let big: String = (0..40)
            .map(|i| format!(r#""k{i}":{i}"#))
            .collect::<Vec<_>>()
            .join(",");
        check(&format!("{{{big}}}"));
        check(r#""text""#);
        check("7");
    }

    /// `read` refuses what `json_text` refuses, finds text compact exactly when compacting leaves it unchanged,
    /// and reads it as `serde_json` does.
    #[test]
    fn read_refuses_what_json_text_refuses() {
        let nested = |n: usize| "[".repeat(n) + &"]".repeat(n);
        let members = |n: usize, last: &str| {
            let mut keys: Vec<String> = (0..n).map(|i| format!(r#""k{i}":{i}"#)).collect();
            keys.push(format!(r#""{last}":0"#));
            format!("{{{}}}", keys.join(","))
        };
        let cases = [
            r#"{"a":1,"b":2}"#.to_owned(),
            r#"{"a":1,"a":2}"#.to_owned(),
            r#"{"a":1,"\u0061":2}"#.to_owned(),
            r#"{"x":[{"b":1,"c":{},"b":2}]}"#.to_owned(),
            r#"{"a":{"b":1},"b":{"a":1}}"#.to_owned(),
            members(15, "k3"),
            members(15, "other"),
            members(40, "k39"),
            members(40, "other"),
            r#"{"s":"\ud800"}"#.to_owned(),
            r#"{"s":"\udc00x"}"#.to_owned(),
            r#"{"s":"\ud800\u0041"}"#.to_owned(),
            r#"{"s":"\ud83d\ude00\n"}"#.to_owned(),
            "{ \"a\" : [ 1 ,\t2 ] , \"b\" : { } }".to_owned(),
            "{\"a\":[1,2]\n}".to_owned(),
            " 7".to_owned(),
            nested(125),
            nested(126),
            nested(127),
            nested(128),
        ];
        for text in &cases {
            for depth in [0, 1] {
                let mut out = Vec::new();
                let compacted = crate::protocol::json_text::compact(
                    text,
                    "",
                    depth,
                    crate::protocol::json_text::Numbers::AsWritten,
                    &mut out,
                );
                let read = Doc::read(text, depth);
                assert_eq!(read.is_ok(), compacted.is_ok(), "{text} at depth {depth}");
                if let Ok((doc, compact)) = read {
                    assert_eq!(compact, out == text.as_bytes(), "{text}");
                    let expected: Value = serde_json::from_str(text).unwrap();
                    assert_eq!(doc.root().to_value().into_owned(), expected, "{text}");
                }
            }
        }
    }

    #[test]
    fn numbers_beyond_a_float_are_bounded() {
        let doc = parse(r#"[1E400,-1e400,1e-400]"#).unwrap();
        assert_eq!(
            doc.root().to_value().into_owned(),
            serde_json::json!([f64::MAX, -f64::MAX, 0.0])
        );
    }

    #[test]
    fn lookups_find_members_of_small_and_large_objects() {
        for n in [1, 5, 16, 17, 40] {
            let text = format!(
                "{{{}}}",
                (0..n)
                    .rev()
                    .map(|i| format!(r#""k{i}":{{"v":{i}}}"#))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let doc = parse(&text).unwrap();
            let object = doc.root().as_object().unwrap();
            assert_eq!(object.len(), n);
            for i in 0..n {
                let v = object
                    .get(&format!("k{i}"))
                    .unwrap()
                    .to_value()
                    .into_owned();
                assert_eq!(v, serde_json::json!({"v": i}), "{n} members, k{i}");
            }
            assert!(object.get(&"k".to_owned()).is_none());
            assert!(object.get(&format!("k{n}")).is_none());
        }
    }

    #[test]
    fn malformed_text_is_an_error_not_a_panic() {
        for text in [
            "",
            "{",
            "[",
            "{\"a\"",
            "{\"a\":",
            "{\"a\":1",
            "[1,",
            "\"abc",
            "\"ab\\",
            "tru",
            "{1:2}",
            "[1]x",
            "{\"a\":1]",
            "[1}",
            "-",
            "1e",
        ] {
            assert!(parse(text).is_err(), "{text:?}");
        }
    }
}
