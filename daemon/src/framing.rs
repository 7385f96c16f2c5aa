//! Splitting a byte stream into request lines, with a length limit.
//!
//! Owns framing only: bytes arrive in arbitrary pieces, lines come out whole. A line longer than the limit is
//! reported once as [`Frame::TooLarge`] and skipped up to its newline, without being buffered.

/// One unit of input.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line, without its newline (and without a `\r` before it).
    Line(&'a [u8]),
    /// A line longer than the limit was skipped.
    TooLarge,
}

/// Turns pieces of a stream into frames.
#[derive(Debug)]
pub struct Framer {
    max: usize,
    partial: Vec<u8>,
    skipping: bool,
}

impl Framer {
    /// A framer for lines of at most `max` bytes.
    pub fn new(max: usize) -> Framer {
        Framer {
            max,
            partial: Vec::new(),
            skipping: false,
        }
    }

    /// Feeds the next piece of the stream; `emit` is called for every frame it completes, in order.
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(Frame<'_>)) {
        while let Some(i) = memchr::memchr(b'\n', data) {
            let piece = &data[..i];
            data = &data[i + 1..];
            if self.skipping {
                self.skipping = false;
                emit(Frame::TooLarge);
            } else if self.partial.is_empty() {
                emit(self.frame(piece));
            } else if self.partial.len() + piece.len() > self.max + 1 {
                self.partial.clear();
                emit(Frame::TooLarge);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(piece);
                emit(self.frame(&line));
                line.clear();
                self.partial = line;
            }
        }
        if !self.skipping && !data.is_empty() {
            // One byte of slack: a `\r` may still be followed by the newline.
            if self.partial.len() + data.len() > self.max + 1 {
                self.partial.clear();
                self.skipping = true;
            } else {
                self.partial.extend_from_slice(data);
            }
        }
    }

    /// Ends the stream: an unterminated last line still counts as a line.
    pub fn finish(&mut self, mut emit: impl FnMut(Frame<'_>)) {
        if std::mem::take(&mut self.skipping) {
            emit(Frame::TooLarge);
        } else if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            emit(self.frame(&line));
        }
    }

    /// Lines of at most `max` bytes from the next piece on (a reload changed the limit); a line already held
    /// beyond it is skipped as too large.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Bytes held for an incomplete line.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Gives back memory a long line left behind, keeping room for `bytes` (or what is held, if more).
    pub fn shrink_to(&mut self, bytes: usize) {
        self.partial.shrink_to(bytes);
    }

    fn frame<'a>(&self, line: &'a [u8]) -> Frame<'a> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > self.max {
            Frame::TooLarge
        } else {
            Frame::Line(line)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, Eq, Clone)]
    enum Owned {
        Line(Vec<u8>),
        TooLarge,
    }

    fn run(max: usize, pieces: &[&[u8]]) -> Vec<Owned> {
        let mut framer = Framer::new(max);
        let mut out = Vec::new();
        let mut collect = |f: Frame<'_>| {
            out.push(match f {
                Frame::Line(l) => Owned::Line(l.to_vec()),
                Frame::TooLarge => Owned::TooLarge,
            })
        };
        for p in pieces {
            framer.push(p, &mut collect);
        }
        framer.finish(&mut collect);
        out
    }

    fn line(s: &str) -> Owned {
        Owned::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn frames() {
        use Owned::TooLarge;
        let check = |pieces: &[&[u8]], expected: &[Owned]| {
            assert_eq!(run(4, pieces), expected, "{pieces:?}");
        };
        check(&[b"a\nbb\n"], &[line("a"), line("bb")]);
        check(&[b"a", b"b\n", b"c"], &[line("ab"), line("c")]);
        check(&[b"abcd\n"], &[line("abcd")]);
        check(&[b"abcd\r\n"], &[line("abcd")]);
        check(&[b"ab", b"cd\r", b"\n"], &[line("abcd")]);
        check(&[b"abcde\nx\n"], &[TooLarge, line("x")]);
        check(&[b"abc", b"de", b"fgh", b"\nx\n"], &[TooLarge, line("x")]);
        check(&[b"abcdefgh"], &[TooLarge]);
        check(&[b"\n\n"], &[line(""), line("")]);
        check(&[b"ab\r"], &[line("ab")]);
        check(&[b"abcd\rx\n"], &[TooLarge]);
    }

    proptest! {
        /// However a stream is cut into pieces, the frames are those of the whole stream.
        #[test]
        fn splitting_does_not_change_frames(
            lines in proptest::collection::vec(proptest::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..40), 0..20),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
            max in 1usize..32,
        ) {
            let mut stream = Vec::new();
            for l in &lines {
                stream.extend_from_slice(l);
                stream.push(b'\n');
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            points.sort();
            let mut pieces: Vec<&[u8]> = Vec::new();
            let mut last = 0;
            for p in points {
                pieces.push(&stream[last..p]);
                last = p;
            }
            pieces.push(&stream[last..]);
            let whole = run(max, &[&stream]);
            prop_assert_eq!(&run(max, &pieces), &whole);
            let expected: Vec<Owned> = lines
                .iter()
                .map(|l| {
                    let l = l.strip_suffix(b"\r").unwrap_or(l);
                    if l.len() > max { Owned::TooLarge } else { Owned::Line(l.to_vec()) }
                })
                .collect();
            prop_assert_eq!(whole, expected);
        }
    }
}
